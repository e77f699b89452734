//! Recovery on open: find the chain head in the newest segments, cut a torn tail
//! (kept aside as evidence), and say what was done. Never asks a person to act.

use std::fs;
use std::path::{Path, PathBuf};

use super::{Error, io_err, segment};

/// What recovery did with one damaged segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncation {
    /// Segment file name.
    pub segment: String,
    /// Offset the file was cut at (its new length).
    pub offset: u64,
    /// Bytes removed from the segment.
    pub bytes: u64,
    /// Seq of the last good frame before the cut (0 if none in this segment).
    pub last_good_seq: u64,
    /// File (in the spool directory) that keeps the removed bytes.
    pub saved_as: Option<String>,
    /// Why the bytes were not a frame.
    pub why: String,
}

/// The outcome of recovery.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Seq and hash of the last good record; None when there is nothing to continue.
    pub head: Option<(u64, [u8; 32])>,
    /// Torn tails that were cut.
    pub truncations: Vec<Truncation>,
    /// Why an existing spool could not be continued (its files were kept aside).
    pub unreadable: Option<String>,
    /// Whether there were segment files at all.
    pub had_segments: bool,
}

pub(super) struct Recovered {
    pub recovery: Recovery,
    /// Surviving segments (first seq, path, length).
    pub segments: Vec<(u64, PathBuf, u64)>,
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Keeps `bytes` as `<segment>.torn-<offset>` so that a cut never destroys evidence.
/// The file is created exclusively (O_CREAT|O_EXCL, which never follows a symlink,
/// dangling or not) with O_NOFOLLOW and mode 0600: a name planted in the spool makes
/// us pick the next name, never write elsewhere.
fn save_aside(path: &Path, offset: u64, bytes: &[u8]) -> Result<String, Error> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    // A later crash at the same offset must not overwrite earlier evidence.
    let base = format!("{}.torn-{offset}", file_name(path));
    let mut name = base.clone();
    let mut n = 0u64;
    loop {
        let aside = path.with_file_name(&name);
        let opened = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&aside);
        match opened {
            Ok(mut f) => {
                f.write_all(bytes)
                    .and_then(|()| f.sync_all())
                    .map_err(|e| io_err(&aside, e))?;
                return Ok(name);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                n += 1;
                name = format!("{base}.{n}");
            }
            Err(e) => return Err(io_err(&aside, e)),
        }
    }
}

/// Opens an existing segment for writing without following a symlink.
pub(super) fn open_segment_write(path: &Path, append: bool) -> std::io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    fs::OpenOptions::new()
        .write(true)
        .append(append)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

pub(super) fn recover(dir: &Path, sensor_id: &str) -> Result<Recovered, Error> {
    let listed = segment::list(dir).map_err(|e| io_err(dir, e))?;
    let mut recovery = Recovery {
        had_segments: !listed.is_empty(),
        ..Recovery::default()
    };
    let mut segments: Vec<(u64, PathBuf, u64)> = Vec::with_capacity(listed.len());
    for (first, path) in &listed {
        let meta = fs::symlink_metadata(path).map_err(|e| io_err(path, e))?;
        if !meta.file_type().is_file() {
            // A planted symlink (or anything but a file) is no segment: set it aside
            // by name, never read or write through it.
            let aside = path.with_file_name(format!("{}.not-a-file", file_name(path)));
            fs::rename(path, &aside).map_err(|e| io_err(path, e))?;
            recovery.truncations.push(Truncation {
                segment: file_name(path),
                offset: 0,
                bytes: 0,
                last_good_seq: 0,
                saved_as: Some(file_name(&aside)),
                why: "not a regular file (a symlink?): renamed, not followed".to_owned(),
            });
            continue;
        }
        let len = meta.len();
        segments.push((*first, path.clone(), len));
    }
    // Walk back from the newest segment until one yields a good frame.
    while let Some((_, path, _)) = segments.last().cloned() {
        let buf = fs::read(&path).map_err(|e| io_err(&path, e))?;
        let scan = match segment::scan(&buf) {
            Ok(scan) => scan,
            Err(e) => {
                // A torn or foreign header: the file holds no frame we can read.
                let saved = save_aside(&path, 0, &buf)?;
                fs::remove_file(&path).map_err(|err| io_err(&path, err))?;
                recovery.truncations.push(Truncation {
                    segment: file_name(&path),
                    offset: 0,
                    bytes: buf.len() as u64,
                    last_good_seq: 0,
                    saved_as: Some(saved),
                    why: format!("bad segment header: {e}"),
                });
                segments.pop();
                continue;
            }
        };
        if scan.sensor_id != sensor_id {
            return Err(Error::SensorMismatch {
                path: path.clone(),
                found: scan.sensor_id,
                expected: sensor_id.to_owned(),
            });
        }
        let last = scan.frames.last().map(|(_, f)| (f.seq, f.hash));
        if let Some((off, why)) = &scan.bad {
            let saved = save_aside(&path, *off, &buf[*off as usize..])?;
            let file = open_segment_write(&path, false).map_err(|e| io_err(&path, e))?;
            file.set_len(*off).map_err(|e| io_err(&path, e))?;
            file.sync_all().map_err(|e| io_err(&path, e))?;
            recovery.truncations.push(Truncation {
                segment: file_name(&path),
                offset: *off,
                bytes: buf.len() as u64 - off,
                last_good_seq: last.map_or(0, |(s, _)| s),
                saved_as: Some(saved),
                why: why.to_string(),
            });
        }
        match last {
            Some(head) => {
                if let Some(seg) = segments.last_mut() {
                    seg.2 = scan.good_len;
                }
                recovery.head = Some(head);
                break;
            }
            None => {
                // Header only: nothing to continue from here; the next append recreates it.
                fs::remove_file(&path).map_err(|e| io_err(&path, e))?;
                segments.pop();
            }
        }
    }
    if recovery.head.is_none() && recovery.had_segments {
        // Every segment was unreadable (each was kept aside as `*.torn-0`); the caller
        // starts a new chain and says why.
        let why = recovery
            .truncations
            .iter()
            .map(|t| format!("{}: {}", t.segment, t.why))
            .collect::<Vec<_>>()
            .join("; ");
        recovery.unreadable = Some(if why.is_empty() {
            "segments hold no records".to_owned()
        } else {
            why
        });
    }
    if !recovery.truncations.is_empty() {
        super::sync_dir(dir)?;
    }
    Ok(Recovered { recovery, segments })
}
