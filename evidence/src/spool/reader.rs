//! The one reader of a segment directory (an agent spool or a collector store), for
//! every use: streaming stored frames from a seq ([`super::Spool::read_from`]),
//! following a directory that a writer keeps appending to (the uplink, the SIEM
//! exports), and walking every frame as stored (`chain::verify`). It never writes or
//! truncates; recovery is the writer's job.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use super::frame::{self, FrameError, StoredFrame};
use super::segment::{self, HeaderError};

/// How many reads a bad frame at the end of a followed segment may persist before it
/// is reported (a concurrent `write(2)` can briefly be visible half-done).
const BAD_FRAME_PATIENCE: u32 = 50;
const READ_CHUNK: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {error}", path.display())]
    Header { path: PathBuf, error: HeaderError },
    #[error("{} offset {offset}: {error}", path.display())]
    Frame {
        path: PathBuf,
        offset: u64,
        error: FrameError,
    },
    #[error("{} offset {offset}: found seq {found} where {expected} was expected", path.display())]
    OutOfOrder {
        path: PathBuf,
        offset: u64,
        found: u64,
        expected: u64,
    },
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

/// A segment whose header the reader has just read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentInfo {
    /// The first seq its file name announces.
    pub first_seq: u64,
    pub path: PathBuf,
    pub sensor_id: String,
}

/// What [`SpoolReader::next_entry`] found next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Segment(SegmentInfo),
    /// A frame and its offset in the current segment's file.
    Frame {
        offset: u64,
        frame: StoredFrame,
    },
}

struct Current {
    first_seq: u64,
    path: PathBuf,
    file: File,
    /// File offset of `SpoolReader::buf[0]`.
    buf_start: u64,
    header_done: bool,
}

/// Reads the frames of a segment directory in order, segment after segment.
///
/// - [`SpoolReader::new`] reads from a seq on and enforces order: the first frame is
///   that seq, each next one the seq after it; anything else is an error.
/// - [`SpoolReader::follow`] does the same on a directory a writer is appending to:
///   a frame or header not complete yet is waited for (`None`: nothing new for now,
///   call again later), and a segment is left only once a newer one exists.
/// - [`SpoolReader::all`] yields every stored frame as it is, oldest segment first,
///   with the segments' headers, for verification (which checks the order itself).
///
/// A segment deleted after acknowledgement, before the reader got to it, is not an
/// error unless the wanted seq was in it ([`ReadError::Missing`]). Corruption is
/// reported with the segment's path and the offset of the bad frame.
pub struct SpoolReader {
    dir: PathBuf,
    /// The seq wanted next; None: every frame as stored.
    wanted: Option<u64>,
    /// Whether a frame was yielded (before that, frames below `wanted` are skipped).
    started: bool,
    live: bool,
    cur: Option<Current>,
    /// First seq of the last segment read to its end.
    finished: Option<u64>,
    /// Bytes read from `cur` and not consumed before `off`.
    buf: Vec<u8>,
    off: usize,
    bad_reads: u32,
    /// The iterator stops after an error.
    failed: bool,
    /// Declared gaps of the directory (first missing seq to last), read when a jump
    /// first shows: the only seqs an ordered reader steps over.
    declared: Option<BTreeMap<u64, u64>>,
}

impl SpoolReader {
    /// A reader of the stored frames with seq >= `from_seq` (1: from the beginning).
    pub fn new(dir: impl Into<PathBuf>, from_seq: u64) -> SpoolReader {
        SpoolReader::with(dir.into(), Some(from_seq.max(1)), false)
    }

    /// Like [`SpoolReader::new`], on a directory that is still being written.
    pub fn follow(dir: impl Into<PathBuf>, from_seq: u64) -> SpoolReader {
        SpoolReader::with(dir.into(), Some(from_seq.max(1)), true)
    }

    /// A reader of every stored frame, in file order, without order checks.
    pub fn all(dir: impl Into<PathBuf>) -> SpoolReader {
        SpoolReader::with(dir.into(), None, false)
    }

    fn with(dir: PathBuf, wanted: Option<u64>, live: bool) -> SpoolReader {
        SpoolReader {
            dir,
            wanted,
            started: false,
            live,
            cur: None,
            finished: None,
            buf: Vec::new(),
            off: 0,
            bad_reads: 0,
            failed: false,
            declared: None,
        }
    }

    /// The next segment header or frame; None at the end of what is stored now.
    pub fn next_entry(&mut self) -> Result<Option<Entry>, ReadError> {
        loop {
            if self.cur.is_none() && !self.open_next()? {
                return Ok(None);
            }
            if let Some(entry) = self.decode()? {
                return Ok(Some(entry));
            }
            if !self.read_more()? {
                return Ok(None);
            }
        }
    }

    /// The next frame; None at the end of what is stored now.
    pub fn next_frame(&mut self) -> Result<Option<StoredFrame>, ReadError> {
        loop {
            match self.next_entry()? {
                Some(Entry::Frame { frame, .. }) => return Ok(Some(frame)),
                Some(Entry::Segment(_)) => {}
                None => return Ok(None),
            }
        }
    }

    /// Appends to `out` up to `max_frames` frames (and about `max_bytes` record bytes)
    /// that are stored now. Returns how many were added; 0 means "nothing new".
    pub fn poll(
        &mut self,
        max_frames: usize,
        max_bytes: usize,
        out: &mut Vec<StoredFrame>,
    ) -> Result<usize, ReadError> {
        let (mut added, mut bytes) = (0, 0);
        while added < max_frames && bytes < max_bytes {
            let Some(f) = self.next_frame()? else {
                break;
            };
            bytes += f.record_bytes.len();
            out.push(f);
            added += 1;
        }
        Ok(added)
    }

    /// Decodes the next entry from the buffer; None when more bytes are needed.
    fn decode(&mut self) -> Result<Option<Entry>, ReadError> {
        let Some(cur) = self.cur.as_mut() else {
            return Ok(None);
        };
        if !cur.header_done {
            return match segment::decode_header(&self.buf[self.off..]) {
                Ok((sensor_id, n)) => {
                    self.off += n;
                    cur.header_done = true;
                    Ok(Some(Entry::Segment(SegmentInfo {
                        first_seq: cur.first_seq,
                        path: cur.path.clone(),
                        sensor_id,
                    })))
                }
                Err(HeaderError::Truncated(_)) => Ok(None),
                Err(error) => Err(ReadError::Header {
                    path: cur.path.clone(),
                    error,
                }),
            };
        }
        loop {
            let offset = cur.buf_start + self.off as u64;
            let (f, n) = match frame::decode(&self.buf[self.off..]) {
                Ok(decoded) => decoded,
                Err(FrameError::Truncated { .. }) => return Ok(None),
                // Possibly a write in progress; report it only if it stays.
                Err(_) if self.live && self.bad_reads < BAD_FRAME_PATIENCE => {
                    self.bad_reads += 1;
                    return Ok(None);
                }
                Err(error) => {
                    return Err(ReadError::Frame {
                        path: cur.path.clone(),
                        offset,
                        error,
                    });
                }
            };
            self.bad_reads = 0;
            if let Some(wanted) = self.wanted {
                if f.seq < wanted && !self.started {
                    self.off += n;
                    continue;
                }
                let stepped = f.seq > wanted
                    && declared_missing(&mut self.declared, &self.dir, wanted, f.seq);
                if f.seq != wanted && !stepped {
                    return Err(ReadError::OutOfOrder {
                        path: cur.path.clone(),
                        offset,
                        found: f.seq,
                        expected: wanted,
                    });
                }
                self.wanted = Some(f.seq + 1);
            }
            self.off += n;
            self.started = true;
            return Ok(Some(Entry::Frame {
                offset,
                frame: f.to_owned_frame(),
            }));
        }
    }

    /// Reads more of the current segment, or moves on to the next one. False: nothing
    /// more stored for now.
    fn read_more(&mut self) -> Result<bool, ReadError> {
        let Some(cur) = self.cur.as_mut() else {
            return Ok(false);
        };
        if self.off > 0 {
            self.buf.drain(..self.off);
            cur.buf_start += self.off as u64;
            self.off = 0;
        }
        if read_chunk(cur, &mut self.buf)? {
            return Ok(true);
        }
        let first_seq = cur.first_seq;
        let newer = self.list()?.into_iter().any(|(s, _)| s > first_seq);
        let Some(cur) = self.cur.as_mut() else {
            return Ok(false);
        };
        if self.live {
            if !newer {
                return Ok(false);
            }
            // The writer has moved on: read this one to the end once more (the last
            // frame may have landed just before the rotation).
            if read_chunk(cur, &mut self.buf)? {
                return Ok(true);
            }
        }
        // The segment is complete: whatever is left of it will never be a frame.
        if !cur.header_done {
            if let Err(error) = segment::decode_header(&self.buf) {
                return Err(ReadError::Header {
                    path: cur.path.clone(),
                    error,
                });
            }
        } else if !self.buf.is_empty()
            && let Err(error) = frame::decode(&self.buf)
        {
            return Err(ReadError::Frame {
                path: cur.path.clone(),
                offset: cur.buf_start,
                error,
            });
        }
        if !newer {
            return Ok(false);
        }
        self.finished = Some(first_seq);
        self.cur = None;
        self.open_next()
    }

    /// Opens the next segment to read. False: there is none (yet).
    fn open_next(&mut self) -> Result<bool, ReadError> {
        let mut vanished = None;
        loop {
            let Some((first_seq, path)) = self.pick()? else {
                return Ok(false);
            };
            match File::open(&path) {
                Ok(file) => {
                    self.buf.clear();
                    self.off = 0;
                    self.cur = Some(Current {
                        first_seq,
                        path,
                        file,
                        buf_start: 0,
                        header_done: false,
                    });
                    return Ok(true);
                }
                // Deleted after acknowledgement between listing and opening: look again.
                Err(e)
                    if e.kind() == std::io::ErrorKind::NotFound && vanished != Some(first_seq) =>
                {
                    vanished = Some(first_seq);
                }
                Err(source) => return Err(ReadError::Io { path, source }),
            }
        }
    }

    /// The segment after the last one finished; at the start, the oldest one, or the
    /// one holding the wanted seq (the last one starting at or before it).
    fn pick(&mut self) -> Result<Option<(u64, PathBuf)>, ReadError> {
        let mut list = self.list()?;
        if let Some(after) = self.finished {
            return Ok(list.into_iter().find(|(s, _)| *s > after));
        }
        let Some(wanted) = self.wanted else {
            return Ok(list.into_iter().next());
        };
        match list.iter().rposition(|(s, _)| *s <= wanted) {
            Some(i) => Ok(Some(list.swap_remove(i))),
            None => match list.first() {
                // The chain's first records are declared lost: it starts there.
                Some((oldest, _))
                    if declared_missing(&mut self.declared, &self.dir, wanted, *oldest) =>
                {
                    Ok(Some(list.swap_remove(0)))
                }
                Some((oldest, _)) => Err(ReadError::Missing {
                    dir: self.dir.clone(),
                    wanted,
                    oldest: *oldest,
                }),
                None => Ok(None),
            },
        }
    }

    fn list(&self) -> Result<Vec<(u64, PathBuf)>, ReadError> {
        match segment::list(&self.dir) {
            Ok(l) => Ok(l),
            // A followed directory that does not exist yet: nothing written.
            Err(e) if self.live && e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(source) => Err(ReadError::Io {
                path: self.dir.clone(),
                source,
            }),
        }
    }
}

impl Iterator for SpoolReader {
    type Item = Result<StoredFrame, ReadError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let next = self.next_frame().transpose();
        self.failed = matches!(next, Some(Err(_)));
        next
    }
}

/// Whether `dir`'s declared gaps ([`crate::chain::declared_gap`]) say that every seq
/// from `wanted` to `found - 1` is gone. Read again at each jump not yet known: a
/// collector store gains declarations while its exports follow it.
fn declared_missing(
    declared: &mut Option<BTreeMap<u64, u64>>,
    dir: &Path,
    wanted: u64,
    found: u64,
) -> bool {
    let covers = |m: &BTreeMap<u64, u64>| {
        m.range(..=wanted)
            .next_back()
            .is_some_and(|(_, to)| *to >= wanted && to + 1 == found)
    };
    if declared.as_ref().is_some_and(covers) {
        return true;
    }
    covers(declared.insert(crate::chain::declared_gap::ranges(dir)))
}

/// Appends up to one chunk of the file to `buf`; false at end of file.
fn read_chunk(cur: &mut Current, buf: &mut Vec<u8>) -> Result<bool, ReadError> {
    let start = buf.len();
    buf.resize(start + READ_CHUNK, 0);
    let n = loop {
        match cur.file.read(&mut buf[start..]) {
            Ok(n) => break n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(source) => {
                buf.truncate(start);
                return Err(ReadError::Io {
                    path: cur.path.clone(),
                    source,
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
    use crate::spool::{Class, FrameRef, Spool, SpoolOptions, SyncPolicy};

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

    /// A spool holding seqs 1..=last, in segments of three frames at most.
    fn spool(dir: &std::path::Path, last: u64) -> Spool {
        let mut opts = SpoolOptions::new(dir, "gw");
        opts.segment_bytes = 400;
        opts.sync = SyncPolicy::OsOnly;
        let (mut spool, _) = Spool::open(opts).expect("open");
        for seq in 1..=last {
            append(&mut spool, seq, &[seq as u8; 50]);
        }
        spool
    }

    fn seqs(reader: SpoolReader) -> Vec<u64> {
        reader.map(|f| f.expect("read").seq).collect()
    }

    #[test]
    fn follows_writes_and_rotation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut spool = spool(dir.path(), 0);
        let mut tail = SpoolReader::follow(dir.path(), 1);
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
        let mut late = SpoolReader::follow(dir.path(), 17);
        let mut out2 = Vec::new();
        while late.poll(100, 1 << 20, &mut out2).expect("poll") > 0 {}
        assert_eq!(out2.first().map(|f| f.seq), Some(17));
        assert_eq!(out2.len(), 14);
    }

    #[test]
    fn followed_directory_may_not_exist_yet() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("later");
        let mut out = Vec::new();
        let polled = SpoolReader::follow(&missing, 1).poll(10, 1 << 20, &mut out);
        assert_eq!(polled.expect("poll"), 0);
        assert!(matches!(
            SpoolReader::all(&missing).next_entry(),
            Err(ReadError::Io { .. })
        ));
    }

    #[test]
    fn deleted_segments_before_the_wanted_seq_are_no_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _spool = spool(dir.path(), 30);
        let segs = segment::list(dir.path()).expect("list");
        assert!(segs.len() > 3);
        let (second, _) = segs[1];
        std::fs::remove_file(&segs[0].1).expect("delete");
        assert_eq!(
            seqs(SpoolReader::new(dir.path(), second)),
            (second..=30).collect::<Vec<_>>()
        );
        match SpoolReader::new(dir.path(), 1).next_frame() {
            Err(ReadError::Missing { wanted, oldest, .. }) => {
                assert_eq!((wanted, oldest), (1, second));
            }
            other => panic!("expected Missing, got {other:?}"),
        }
        // Every frame as stored: from the oldest segment left.
        let first = SpoolReader::all(dir.path())
            .next_frame()
            .expect("read")
            .map(|f| f.seq);
        assert_eq!(first, Some(second));
    }

    #[test]
    fn corruption_names_path_and_offset() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _spool = spool(dir.path(), 3);
        let (_, path) = segment::list(dir.path()).expect("list").remove(0);
        let mut bytes = std::fs::read(&path).expect("read");
        let header = segment::encode_header("gw").len();
        let second = header + frame::encoded_len(50);
        bytes[second + 20] ^= 1;
        std::fs::write(&path, &bytes).expect("write");
        let mut reader = SpoolReader::new(dir.path(), 1);
        assert_eq!(reader.next().map(|f| f.map(|f| f.seq).ok()), Some(Some(1)));
        match reader.next() {
            Some(Err(ReadError::Frame {
                path: p, offset, ..
            })) => {
                assert_eq!((p, offset), (path, second as u64));
            }
            other => panic!("expected a frame error, got {other:?}"),
        }
        assert!(reader.next().is_none(), "stops after an error");
        // A follower waits for a bad frame at the end of the newest segment a while
        // (a write in progress), then reports it.
        let mut tail = SpoolReader::follow(dir.path(), 2);
        let mut out = Vec::new();
        let err = (0..=BAD_FRAME_PATIENCE).find_map(|_| tail.poll(10, 1 << 20, &mut out).err());
        assert!(matches!(err, Some(ReadError::Frame { .. })), "{err:?}");
        assert!(out.is_empty());
    }

    #[test]
    fn ordered_readers_step_over_declared_gaps_only() {
        use crate::chain::declared_gap::{self, DeclaredGap};
        let dir = tempfile::tempdir().expect("tempdir");
        let mut spool = spool(dir.path(), 3);
        for seq in 7..=9 {
            append(&mut spool, seq, &[seq as u8; 50]);
        }
        let follower = |from| {
            let mut out = Vec::new();
            SpoolReader::follow(dir.path(), from)
                .poll(100, 1 << 20, &mut out)
                .map(|_| out.iter().map(|f| f.seq).collect::<Vec<_>>())
        };
        assert!(follower(1).is_err(), "an undeclared jump is an error");
        let key = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
        // A declaration that does not cover the whole jump changes nothing.
        let short = DeclaredGap::sign(&key, "gw", 4, 5, &[6; 32], "cut");
        declared_gap::append(dir.path(), &short).expect("declare");
        assert!(seqs_checked(SpoolReader::new(dir.path(), 1)).is_err());
        let whole = DeclaredGap::sign(&key, "gw", 4, 6, &[6; 32], "deleted");
        std::fs::remove_file(dir.path().join(declared_gap::GAPS_FILE)).expect("rm");
        declared_gap::append(dir.path(), &whole).expect("declare");
        assert_eq!(
            seqs(SpoolReader::new(dir.path(), 1)),
            vec![1, 2, 3, 7, 8, 9]
        );
        assert_eq!(follower(2).expect("follow"), vec![2, 3, 7, 8, 9]);
        // From inside the gap, the reader starts after it.
        assert_eq!(seqs(SpoolReader::new(dir.path(), 5)), vec![7, 8, 9]);
    }

    fn seqs_checked(reader: SpoolReader) -> Result<Vec<u64>, ReadError> {
        reader.map(|f| f.map(|f| f.seq)).collect()
    }

    #[test]
    fn order_is_enforced_from_a_seq_not_for_all() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut spool = spool(dir.path(), 2);
        append(&mut spool, 4, &[4; 50]);
        let mut reader = SpoolReader::new(dir.path(), 1);
        assert_eq!(reader.next_frame().expect("1").map(|f| f.seq), Some(1));
        assert_eq!(reader.next_frame().expect("2").map(|f| f.seq), Some(2));
        assert!(matches!(
            reader.next_frame(),
            Err(ReadError::OutOfOrder {
                found: 4,
                expected: 3,
                ..
            })
        ));
        assert_eq!(seqs(SpoolReader::all(dir.path())), vec![1, 2, 4]);
    }
}
