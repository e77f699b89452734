//! Read-only, incremental reader of a segment directory that another process (or task)
//! is appending to: the agent's spool for the uplink, a collector store for the SIEM
//! exports. Uses the spool's own frame and header codec; never writes or truncates
//! (recovery is the writer's job).

use std::fs::File;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use conduit_evidence::spool::StoredFrame;
use conduit_evidence::spool::frame::{self, FrameError};
use conduit_evidence::spool::segment;

/// How many polls a bad frame at the end of the data may persist before it is reported
/// (a concurrent `write(2)` can briefly be visible half-done).
const BAD_FRAME_PATIENCE: u32 = 50;
const READ_CHUNK: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum TailError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {what}", path.display())]
    Corrupt { path: PathBuf, what: String },
    #[error(
        "{}: seq {wanted} is no longer stored (oldest segment starts at {oldest})",
        dir.display()
    )]
    Missing {
        dir: PathBuf,
        wanted: u64,
        oldest: u64,
    },
}

struct Current {
    first_seq: u64,
    path: PathBuf,
    file: File,
    header_done: bool,
}

/// Yields the frames with seq >= the start seq, in order, as they are written.
pub struct SegmentTail {
    dir: PathBuf,
    next_seq: u64,
    cur: Option<Current>,
    buf: Vec<u8>,
    off: usize,
    bad_polls: u32,
}

impl SegmentTail {
    /// A reader of `dir` that starts at `from_seq` (1: from the beginning).
    pub fn new(dir: impl Into<PathBuf>, from_seq: u64) -> SegmentTail {
        SegmentTail {
            dir: dir.into(),
            next_seq: from_seq.max(1),
            cur: None,
            buf: Vec::new(),
            off: 0,
            bad_polls: 0,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Seq of the next frame this reader will return.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Appends to `out` up to `max_frames` frames (and about `max_bytes` record bytes)
    /// that are complete on disk now. Returns how many were added; 0 means "nothing new".
    pub fn poll(
        &mut self,
        max_frames: usize,
        max_bytes: usize,
        out: &mut Vec<StoredFrame>,
    ) -> Result<usize, TailError> {
        let mut added = 0;
        let mut bytes = 0;
        while added < max_frames && bytes < max_bytes {
            if self.cur.is_none() && !self.open_segment()? {
                break;
            }
            match self.decode_next()? {
                Some(f) => {
                    bytes += f.record_bytes.len();
                    out.push(f);
                    added += 1;
                }
                None => {
                    if !self.read_more()? {
                        break;
                    }
                }
            }
        }
        Ok(added)
    }

    /// Decodes the next wanted frame from the buffer; None when more bytes are needed.
    fn decode_next(&mut self) -> Result<Option<StoredFrame>, TailError> {
        let Some(cur) = self.cur.as_mut() else {
            return Ok(None);
        };
        if !cur.header_done {
            match segment::decode_header(&self.buf[self.off..]) {
                Ok((_, n)) => {
                    self.off += n;
                    cur.header_done = true;
                }
                Err(segment::HeaderError::Truncated(_)) => return Ok(None),
                Err(e) => {
                    return Err(TailError::Corrupt {
                        path: cur.path.clone(),
                        what: e.to_string(),
                    });
                }
            }
        }
        loop {
            match frame::decode(&self.buf[self.off..]) {
                Ok((f, n)) => {
                    self.off += n;
                    self.bad_polls = 0;
                    if f.seq < self.next_seq {
                        continue;
                    }
                    if f.seq != self.next_seq {
                        return Err(TailError::Corrupt {
                            path: cur.path.clone(),
                            what: format!(
                                "found seq {} where {} was expected",
                                f.seq, self.next_seq
                            ),
                        });
                    }
                    self.next_seq += 1;
                    return Ok(Some(f.to_owned_frame()));
                }
                Err(FrameError::Truncated { .. }) => return Ok(None),
                Err(e) => {
                    // Possibly a write in progress; report it only if it stays.
                    self.bad_polls += 1;
                    if self.bad_polls > BAD_FRAME_PATIENCE {
                        return Err(TailError::Corrupt {
                            path: cur.path.clone(),
                            what: e.to_string(),
                        });
                    }
                    return Ok(None);
                }
            }
        }
    }

    /// Reads more of the current segment, or moves on to the next one. False: nothing
    /// new on disk for now.
    fn read_more(&mut self) -> Result<bool, TailError> {
        let Some(cur) = self.cur.as_mut() else {
            return Ok(false);
        };
        if self.off > 0 {
            self.buf.drain(..self.off);
            self.off = 0;
        }
        if read_chunk(cur, &mut self.buf)? {
            return Ok(true);
        }
        // End of this segment for now. If a newer one exists, the writer has finished
        // this one: read it to the end once more (the last frame may have landed just
        // before the rotation), then switch.
        let newer = list(&self.dir)?.into_iter().any(|(s, _)| s > cur.first_seq);
        if !newer {
            return Ok(false);
        }
        if read_chunk(cur, &mut self.buf)? {
            return Ok(true);
        }
        if self.buf.len() > self.off {
            return Err(TailError::Corrupt {
                path: cur.path.clone(),
                what: format!(
                    "{} bytes after the last frame in a finished segment",
                    self.buf.len() - self.off
                ),
            });
        }
        self.cur = None;
        self.buf.clear();
        self.off = 0;
        self.open_segment()
    }

    /// Opens the segment that holds `next_seq` (the last one starting at or before it).
    fn open_segment(&mut self) -> Result<bool, TailError> {
        let list = match list(&self.dir) {
            Ok(l) => l,
            // The directory does not exist yet: nothing written.
            Err(TailError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return Ok(false);
            }
            Err(e) => return Err(e),
        };
        let Some((first_seq, path)) = list
            .iter()
            .rev()
            .find(|(s, _)| *s <= self.next_seq)
            .cloned()
        else {
            return match list.first() {
                Some((oldest, _)) => Err(TailError::Missing {
                    dir: self.dir.clone(),
                    wanted: self.next_seq,
                    oldest: *oldest,
                }),
                None => Ok(false),
            };
        };
        let file = match File::open(&path) {
            Ok(f) => f,
            // Deleted after acknowledgement between list and open: try again later.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(TailError::Io { path, source: e }),
        };
        self.buf.clear();
        self.off = 0;
        self.cur = Some(Current {
            first_seq,
            path,
            file,
            header_done: false,
        });
        Ok(true)
    }
}

fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>, TailError> {
    segment::list(dir).map_err(|e| TailError::Io {
        path: dir.to_owned(),
        source: e,
    })
}

/// Appends up to one chunk of the file to `buf`; false at end of file.
fn read_chunk(cur: &mut Current, buf: &mut Vec<u8>) -> Result<bool, TailError> {
    let start = buf.len();
    buf.resize(start + READ_CHUNK, 0);
    let n = loop {
        match cur.file.read(&mut buf[start..]) {
            Ok(n) => break n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                buf.truncate(start);
                return Err(TailError::Io {
                    path: cur.path.clone(),
                    source: e,
                });
            }
        }
    };
    buf.truncate(start + n);
    Ok(n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use conduit_evidence::spool::{Class, FrameRef, Spool, SpoolOptions, SyncPolicy};

    fn append(spool: &mut Spool, seq: u64, data: &[u8]) {
        spool
            .append(
                &FrameRef {
                    seq,
                    prev_hash: [0; 32],
                    hash: [seq as u8; 32],
                    record: data,
                },
                Class::Data,
            )
            .expect("append");
    }

    #[test]
    fn follows_writes_and_rotation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut opts = SpoolOptions::new(dir.path(), "gw");
        opts.segment_bytes = 400;
        opts.sync = SyncPolicy::OsOnly;
        let (mut spool, _) = Spool::open(opts).expect("open");
        let mut tail = SegmentTail::new(dir.path(), 1);
        let mut out = Vec::new();
        assert_eq!(tail.poll(100, 1 << 20, &mut out).expect("poll"), 0);
        for seq in 1..=10 {
            append(&mut spool, seq, &[seq as u8; 50]);
        }
        tail.poll(4, 1 << 20, &mut out).expect("poll");
        assert_eq!(out.len(), 4);
        for seq in 11..=30 {
            append(&mut spool, seq, &[seq as u8; 50]);
        }
        while tail.poll(100, 1 << 20, &mut out).expect("poll") > 0 {}
        let seqs: Vec<u64> = out.iter().map(|f| f.seq).collect();
        assert_eq!(seqs, (1..=30).collect::<Vec<_>>());
        let mut late = SegmentTail::new(dir.path(), 17);
        let mut out2 = Vec::new();
        while late.poll(100, 1 << 20, &mut out2).expect("poll") > 0 {}
        assert_eq!(out2.first().map(|f| f.seq), Some(17));
        assert_eq!(out2.len(), 14);
    }
}
