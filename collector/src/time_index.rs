//! A time index of a store's chains, so a query for a narrow window reads only the
//! frames that can match. Each segment is cut into blocks of [`BLOCK_FRAMES`] frames
//! with their file offset and the range of record times (`Record.time_unix_nano`,
//! read without decoding the record) in them; clocks can step back, so a block's
//! range is its true minimum and maximum, not its first and last time.
//!
//! Segments only grow (records are appended, never rewritten), so their blocks are
//! cached in `<store>/_index/<chain>.json` (a name no sensor id can take) with the
//! file length they cover: an unchanged segment is not read, a grown one (the
//! newest) is read from its last block on. A store the caller cannot write is
//! indexed in memory only.

use std::collections::HashMap;
use std::fs;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};

use conduit_evidence::spool::frame::{self, StoredFrame};
use conduit_evidence::spool::segment;
use serde::{Deserialize, Serialize};

/// Frames per block: a narrow query decodes at most about two blocks per segment edge.
pub const BLOCK_FRAMES: usize = 4096;
/// Directory of the cached indexes inside the store.
pub const INDEX_DIR: &str = "_index";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Block {
    /// File offset of the block's first frame.
    pub offset: u64,
    /// File offset just after its last frame.
    pub end: u64,
    pub first_seq: u64,
    pub frames: u64,
    pub min_time: i64,
    pub max_time: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentIndex {
    pub first_seq: u64,
    pub file_len: u64,
    pub blocks: Vec<Block>,
    /// Where the segment stops being readable, if it does not end cleanly.
    pub bad_offset: Option<u64>,
    #[serde(skip)]
    pub path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {error}", path.display())]
    Header {
        path: PathBuf,
        error: segment::HeaderError,
    },
    #[error("{} offset {offset}: {error}", path.display())]
    Frame {
        path: PathBuf,
        offset: u64,
        error: frame::FrameError,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> IndexError + '_ {
    move |source| IndexError::Io {
        path: path.to_owned(),
        source,
    }
}

/// `Record.time_unix_nano` (field 2) and `Record.kind` (field 1) of encoded record
/// bytes, without decoding the record: a walk over its top-level fields.
pub fn kind_and_time(record: &[u8]) -> (i32, i64) {
    let (mut kind, mut time) = (0i32, 0i64);
    let mut buf = record;
    while let Some((key, rest)) = varint(buf) {
        buf = rest;
        let (field, wire) = (key >> 3, key & 7);
        match wire {
            0 => {
                let Some((v, rest)) = varint(buf) else { break };
                buf = rest;
                match field {
                    1 => kind = v as i32,
                    2 => time = v as i64,
                    _ => {}
                }
            }
            1 => buf = buf.get(8..).unwrap_or_default(),
            5 => buf = buf.get(4..).unwrap_or_default(),
            2 => {
                let Some((len, rest)) = varint(buf) else {
                    break;
                };
                buf = usize::try_from(len)
                    .ok()
                    .and_then(|l| rest.get(l..))
                    .unwrap_or_default();
            }
            _ => break,
        }
    }
    (kind, time)
}

fn varint(buf: &[u8]) -> Option<(u64, &[u8])> {
    let mut v = 0u64;
    for (i, &b) in buf.iter().enumerate().take(10) {
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((v, &buf[i + 1..]));
        }
    }
    None
}

/// Blocks of consecutive frames (each with its file offset).
fn blocks_of(frames: &[(u64, frame::FrameRef<'_>)]) -> Vec<Block> {
    frames
        .chunks(BLOCK_FRAMES)
        .map(|chunk| {
            let (mut min_time, mut max_time) = (i64::MAX, i64::MIN);
            for (_, f) in chunk {
                let (_, t) = kind_and_time(f.record);
                min_time = min_time.min(t);
                max_time = max_time.max(t);
            }
            let (last_off, last) = chunk[chunk.len() - 1];
            Block {
                offset: chunk[0].0,
                end: last_off + frame::encoded_len(last.record.len()) as u64,
                first_seq: chunk[0].1.seq,
                frames: chunk.len() as u64,
                min_time,
                max_time,
            }
        })
        .collect()
}

/// Scans one segment file into blocks.
pub fn scan_segment(first_seq: u64, path: &Path) -> Result<SegmentIndex, IndexError> {
    let bytes = fs::read(path).map_err(io(path))?;
    let scan = segment::scan(&bytes).map_err(|error| IndexError::Header {
        path: path.to_owned(),
        error,
    })?;
    Ok(SegmentIndex {
        first_seq,
        file_len: bytes.len() as u64,
        blocks: blocks_of(&scan.frames),
        bad_offset: scan.bad.map(|(off, _)| off),
        path: path.to_owned(),
    })
}

/// Extends the index of a segment's first `c.file_len` bytes (ending cleanly on a
/// frame) to the file's end, reading only from its last, possibly partial, block:
/// a growing newest segment costs what was appended, not its whole length.
fn extend_segment(mut c: SegmentIndex, path: &Path) -> Result<SegmentIndex, IndexError> {
    let resume = match c.blocks.last() {
        Some(b) if (b.frames as usize) < BLOCK_FRAMES => b.offset,
        Some(b) => b.end,
        None => return scan_segment(c.first_seq, path),
    };
    if c.blocks.last().is_some_and(|b| b.offset == resume) {
        c.blocks.pop();
    }
    let mut f = fs::File::open(path).map_err(io(path))?;
    f.seek(SeekFrom::Start(resume)).map_err(io(path))?;
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes).map_err(io(path))?;
    let mut frames = Vec::new();
    let mut off = 0;
    c.bad_offset = None;
    while off < bytes.len() {
        match frame::decode(&bytes[off..]) {
            Ok((fr, n)) => {
                frames.push((resume + off as u64, fr));
                off += n;
            }
            Err(_) => {
                c.bad_offset = Some(resume + off as u64);
                break;
            }
        }
    }
    c.blocks.extend(blocks_of(&frames));
    c.file_len = resume + bytes.len() as u64;
    c.path = path.to_owned();
    Ok(c)
}

/// The blocks of every segment of one chain directory, oldest first.
pub fn chain_index(store: &Path, chain: &str, dir: &Path) -> Result<Vec<SegmentIndex>, IndexError> {
    let cache_path = store.join(INDEX_DIR).join(format!("{chain}.json"));
    let mut cached: HashMap<u64, SegmentIndex> = fs::read(&cache_path)
        .ok()
        .and_then(|b| serde_json::from_slice::<Vec<SegmentIndex>>(&b).ok())
        .map(|v| v.into_iter().map(|s| (s.first_seq, s)).collect())
        .unwrap_or_default();
    let segments = segment::list(dir).map_err(io(dir))?;
    let mut out = Vec::with_capacity(segments.len());
    let mut changed = false;
    for (first_seq, path) in &segments {
        let len = fs::metadata(path).map_err(io(path))?.len();
        let idx = match cached.remove(first_seq).filter(|c| c.bad_offset.is_none()) {
            Some(mut c) if c.file_len == len => {
                c.path.clone_from(path);
                c
            }
            Some(c) if c.file_len < len => {
                changed = true;
                extend_segment(c, path)?
            }
            _ => {
                changed = true;
                scan_segment(*first_seq, path)?
            }
        };
        out.push(idx);
    }
    if changed {
        // Best effort: an auditor may read a store they cannot write.
        if let Ok(json) = serde_json::to_vec(&out) {
            let _ = fs::create_dir_all(store.join(INDEX_DIR)).and_then(|()| {
                let tmp = cache_path.with_extension("json.tmp");
                fs::write(&tmp, json)?;
                fs::rename(&tmp, &cache_path)
            });
        }
    }
    Ok(out)
}

/// The frames of one block, in file order.
pub fn read_block(seg: &SegmentIndex, block: &Block) -> Result<Vec<StoredFrame>, IndexError> {
    let path = &seg.path;
    let mut f = fs::File::open(path).map_err(io(path))?;
    f.seek(SeekFrom::Start(block.offset)).map_err(io(path))?;
    let mut buf = vec![0; usize::try_from(block.end - block.offset).unwrap_or(0)];
    f.read_exact(&mut buf).map_err(io(path))?;
    let mut out = Vec::with_capacity(block.frames as usize);
    let mut off = 0;
    while off < buf.len() {
        let (fr, n) = frame::decode(&buf[off..]).map_err(|error| IndexError::Frame {
            path: path.clone(),
            offset: block.offset + off as u64,
            error,
        })?;
        out.push(fr.to_owned_frame());
        off += n;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use conduit_proto::v1::{Record, RecordKind};
    use prost::Message as _;

    #[test]
    fn reads_kind_and_time_without_decoding() {
        for (kind, time) in [
            (RecordKind::FlowEnd, 1_764_000_000_123_456_789),
            (RecordKind::Checkpoint, 1),
            (RecordKind::Unspecified, 0),
        ] {
            let r = Record {
                software_version: String::new(),
                kind: kind as i32,
                time_unix_nano: time,
                sensor_id: "gw-01".into(),
                site: "plant".into(),
                body: None,
            };
            assert_eq!(kind_and_time(&r.encode_to_vec()), (kind as i32, time));
        }
        assert_eq!(kind_and_time(&[0xff]), (0, 0));
    }

    /// A growing segment: the extended index equals a fresh scan of the whole file.
    #[test]
    fn extending_a_grown_segment_equals_a_full_scan() {
        use conduit_evidence::spool::FrameRef;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(segment::file_name(1));
        let mut bytes = segment::encode_header("gw-01");
        let mut seq = 0;
        let mut append = |bytes: &mut Vec<u8>, n: u64| {
            for _ in 0..n {
                seq += 1;
                let r = Record {
                    kind: RecordKind::FlowEnd as i32,
                    time_unix_nano: 1_000 + (seq as i64 % 977) * 1_000_000,
                    ..Record::default()
                }
                .encode_to_vec();
                frame::encode_into(
                    &FrameRef {
                        seq,
                        prev_hash: [0; 32],
                        hash: [1; 32],
                        record: &r,
                    },
                    bytes,
                );
            }
        };
        append(&mut bytes, BLOCK_FRAMES as u64 + 10);
        fs::write(&path, &bytes).expect("write");
        let first = scan_segment(1, &path).expect("scan");
        assert_eq!(first.blocks.len(), 2);
        append(&mut bytes, BLOCK_FRAMES as u64 * 2);
        fs::write(&path, &bytes).expect("write");
        let mut extended = extend_segment(first, &path).expect("extend");
        let mut full = scan_segment(1, &path).expect("scan");
        extended.path = PathBuf::new();
        full.path = PathBuf::new();
        assert_eq!(extended, full);
        assert_eq!(full.blocks.len(), 4);
    }
}
