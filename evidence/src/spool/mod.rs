//! The local spool: append-only segment files holding the chained records, crash-safe
//! and bounded. Format: docs/spool-format.md.
//!
//! Durability: every frame goes to the kernel with one `write(2)` before `append`
//! returns, so a killed process loses nothing that was appended; `fdatasync` (power
//! loss) follows [`SyncPolicy`].

pub mod damage;
pub mod frame;
mod reader;
mod recovery;
pub mod segment;

use std::fs::{self, File};
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use frame::{FrameRef, StoredFrame};
pub use reader::{Entry, ReadError, SegmentInfo, SpoolReader};
pub use recovery::{Recovery, Truncation};

/// When written frames are forced to stable storage (`fdatasync`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncPolicy {
    /// After every record: nothing acknowledged by `append` is lost on power failure.
    EveryRecord,
    /// Group commit: after `records` records or `interval`, whichever comes first
    /// (checked on each append and on `tick`). Power loss loses at most that window.
    Group { interval: Duration, records: u64 },
    /// Only on rotation and `sync()`; the kernel writes back on its own schedule.
    OsOnly,
}

impl Default for SyncPolicy {
    fn default() -> Self {
        SyncPolicy::Group {
            interval: Duration::from_millis(200),
            records: 1000,
        }
    }
}

pub const DEFAULT_MAX_BYTES: u64 = 1 << 30;
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;
pub const DEFAULT_WARN_PERCENT: u8 = 80;
/// Size of `.reserve`, a placeholder file deleted when the file system itself is full
/// so that the `loss` record saying so can still be written.
pub const RESERVE_FILE_BYTES: u64 = 256 * 1024;
const RESERVE_FILE: &str = ".reserve";
const LOCK_FILE: &str = ".lock";

#[derive(Debug, Clone)]
pub struct SpoolOptions {
    pub dir: PathBuf,
    pub sensor_id: String,
    /// Bound on the segment files' total size.
    pub max_bytes: u64,
    /// A new segment starts when the current one would grow past this.
    pub segment_bytes: u64,
    pub sync: SyncPolicy,
    /// `SpoolStats::above_warning` turns on above this percentage of `max_bytes`.
    pub warn_percent: u8,
}

impl SpoolOptions {
    pub fn new(dir: impl Into<PathBuf>, sensor_id: impl Into<String>) -> Self {
        SpoolOptions {
            dir: dir.into(),
            sensor_id: sensor_id.into(),
            max_bytes: DEFAULT_MAX_BYTES,
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            sync: SyncPolicy::default(),
            warn_percent: DEFAULT_WARN_PERCENT,
        }
    }
}

/// Counters for metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpoolStats {
    /// Total size of the segment files.
    pub bytes: u64,
    pub max_bytes: u64,
    pub segments: u64,
    pub records_written: u64,
    /// Records refused because the spool (or its file system) was full.
    pub records_refused: u64,
    /// Whether the last data append was refused.
    pub full: bool,
    pub above_warning: bool,
    pub head_seq: u64,
    pub acked_seq: u64,
    pub syncs: u64,
    pub segments_deleted: u64,
    /// Bytes cut from torn tails when the spool was opened.
    pub truncated_bytes: u64,
}

/// What a frame is, for the size bound: control frames (loss, checkpoint, recovery,
/// restart) may use the last part of the budget that data frames may not, so that
/// the spool can always say that it is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Data,
    Control,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("spool {} is full ({bytes} of {max} bytes, nothing acknowledged to delete)", dir.display())]
    Full { dir: PathBuf, bytes: u64, max: u64 },
    #[error("{}: no space left on the file system", path.display())]
    NoSpace { path: PathBuf },
    #[error(
        "{}: segment belongs to sensor {found:?}, this sensor is {expected:?} (one spool directory holds one sensor's chain; use another --spool directory)",
        path.display()
    )]
    SensorMismatch {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("sensor id must be 1 to {max} bytes, got {0}", max = segment::MAX_SENSOR_ID_LEN)]
    BadSensorId(usize),
    #[error("record of {0} bytes is over the frame limit of {max} bytes; not written", max = frame::MAX_RECORD_LEN)]
    RecordTooLarge(usize),
    #[error("{}: the spool is in use by another process (one writer per spool directory)", path.display())]
    Locked { path: PathBuf },
}

/// Refuses a record that would make a frame no reader accepts.
fn check_record_len(frame: &FrameRef<'_>) -> Result<(), Error> {
    if frame.record.len() > frame::MAX_RECORD_LEN {
        return Err(Error::RecordTooLarge(frame.record.len()));
    }
    Ok(())
}

impl Error {
    /// Whether this error means "no room": the record was refused, nothing was written.
    pub fn is_full(&self) -> bool {
        matches!(self, Error::Full { .. } | Error::NoSpace { .. })
    }
}

pub(crate) fn io_err(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.to_owned(),
        source,
    }
}

fn is_enospc(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::StorageFull || e.raw_os_error() == Some(libc::ENOSPC)
}

pub(crate) fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err(dir, e))
}

struct Segment {
    first_seq: u64,
    path: PathBuf,
    len: u64,
}

/// An open spool directory. One writer per directory.
pub struct Spool {
    opts: SpoolOptions,
    segments: Vec<Segment>,
    /// Open handle of the last segment and whether it holds a frame yet.
    current: Option<File>,
    head: Option<(u64, [u8; 32])>,
    total_bytes: u64,
    acked: u64,
    pending_sync: u64,
    last_sync: Instant,
    buf: Vec<u8>,
    stats: SpoolStats,
    /// Group commit runs `fdatasync` on this thread, so the writer never waits for the disk.
    syncer: Option<Syncer>,
    /// `.lock`, held (flock) while the spool is open: one writer per directory.
    _lock: File,
}

/// A thread that `fdatasync`s a duplicate of the segment's descriptor on request.
struct Syncer {
    tx: Option<std::sync::mpsc::SyncSender<File>>,
    shared: std::sync::Arc<SyncShared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct SyncShared {
    syncs: std::sync::atomic::AtomicU64,
    error: std::sync::Mutex<Option<std::io::Error>>,
}

impl Syncer {
    fn start() -> std::io::Result<Syncer> {
        // Capacity 1: one sync queued behind the running one covers every write so far.
        let (tx, rx) = std::sync::mpsc::sync_channel::<File>(1);
        let shared = std::sync::Arc::new(SyncShared::default());
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("spool-sync".to_owned())
            .spawn(move || {
                for file in rx {
                    match file.sync_data() {
                        Ok(()) => {
                            s.syncs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        Err(e) => {
                            if let Ok(mut slot) = s.error.lock() {
                                *slot = Some(e);
                            }
                        }
                    }
                }
            })?;
        Ok(Syncer {
            tx: Some(tx),
            shared,
            thread: Some(thread),
        })
    }

    /// Queues a sync of `file` unless one is already queued.
    fn request(&self, file: &File) -> std::io::Result<()> {
        if let Some(tx) = &self.tx {
            match tx.try_send(file.try_clone()?) {
                Ok(()) | Err(std::sync::mpsc::TrySendError::Full(_)) => {}
                Err(std::sync::mpsc::TrySendError::Disconnected(_)) => {
                    return Err(std::io::Error::other("spool sync thread stopped"));
                }
            }
        }
        Ok(())
    }

    /// An error the thread saw since the last call.
    fn take_error(&self) -> Option<std::io::Error> {
        self.shared.error.lock().ok().and_then(|mut e| e.take())
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Spool {
    /// Opens (creating if needed) and recovers the spool directory.
    pub fn open(opts: SpoolOptions) -> Result<(Spool, Recovery), Error> {
        if opts.sensor_id.is_empty() || opts.sensor_id.len() > segment::MAX_SENSOR_ID_LEN {
            return Err(Error::BadSensorId(opts.sensor_id.len()));
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&opts.dir)
            .map_err(|e| io_err(&opts.dir, e))?;
        let lock_path = opts.dir.join(LOCK_FILE);
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|e| io_err(&lock_path, e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Err(Error::Locked { path: lock_path }),
            Err(fs::TryLockError::Error(e)) => return Err(io_err(&lock_path, e)),
        }
        let recovered = recovery::recover(&opts.dir, &opts.sensor_id)?;
        let segments: Vec<Segment> = recovered
            .segments
            .into_iter()
            .map(|(first_seq, path, len)| Segment {
                first_seq,
                path,
                len,
            })
            .collect();
        let current = match segments.last() {
            Some(seg) => Some(
                recovery::open_segment_write(&seg.path, true).map_err(|e| io_err(&seg.path, e))?,
            ),
            None => None,
        };
        let recovery = recovered.recovery;
        let total_bytes = segments.iter().map(|s| s.len).sum();
        let mut spool = Spool {
            stats: SpoolStats {
                max_bytes: opts.max_bytes,
                truncated_bytes: recovery.truncations.iter().map(|t| t.bytes).sum(),
                ..SpoolStats::default()
            },
            opts,
            segments,
            current,
            head: recovery.head,
            total_bytes,
            acked: 0,
            pending_sync: 0,
            last_sync: Instant::now(),
            buf: Vec::with_capacity(4096),
            syncer: None,
            _lock: lock,
        };
        if matches!(spool.opts.sync, SyncPolicy::Group { .. }) {
            spool.syncer = Some(Syncer::start().map_err(|e| io_err(&spool.opts.dir, e))?);
        }
        spool.restore_reserve();
        Ok((spool, recovery))
    }

    pub fn dir(&self) -> &Path {
        &self.opts.dir
    }

    pub fn sensor_id(&self) -> &str {
        &self.opts.sensor_id
    }

    /// Seq and hash of the last stored frame.
    pub fn head(&self) -> Option<(u64, [u8; 32])> {
        self.head
    }

    /// Appends one frame with a single `write(2)`; rotates and syncs per the options.
    /// On any error nothing of the frame stays in the file.
    pub fn append(&mut self, frame: &FrameRef<'_>, class: Class) -> Result<(), Error> {
        check_record_len(frame)?;
        let len = frame::encoded_len(frame.record.len()) as u64;
        // A segment holds consecutive seqs and is named by its first: a frame after a
        // declared gap (a collector store) starts a new one.
        let follows = self.head.is_none_or(|(seq, _)| seq + 1 == frame.seq);
        let rotate = match self.segments.last() {
            None => true,
            Some(_) if !follows => true,
            Some(seg) => seg.len > self.header_len() && seg.len + len > self.opts.segment_bytes,
        };
        let need = len + if rotate { self.header_len() } else { 0 };
        self.make_room(need, class)?;
        if rotate {
            self.rotate(frame.seq, class)?;
        }
        self.buf.clear();
        frame::encode_into(frame, &mut self.buf);
        match self.write_buf() {
            Ok(()) => {}
            Err(e) if is_enospc(&e) && class == Class::Control && self.drop_reserve() => {
                self.write_buf().map_err(|e| self.write_failed(e))?;
            }
            // The file system is full before our own bound: acknowledged data may go.
            Err(e) if is_enospc(&e) && self.delete_oldest_acked()? => {
                self.write_buf().map_err(|e| self.write_failed(e))?;
            }
            Err(e) => return Err(self.write_failed(e)),
        }
        if let Some(seg) = self.segments.last_mut() {
            seg.len += len;
        }
        self.total_bytes += len;
        self.head = Some((frame.seq, frame.hash));
        self.stats.records_written += 1;
        self.pending_sync += 1;
        self.sync_after_write()
    }

    /// Appends consecutive frames with a single `write(2)` if they fit the current
    /// segment and the data budget without deleting anything; returns false (and
    /// writes nothing) otherwise, so that the caller appends them one by one.
    pub fn append_batch(&mut self, frames: &[FrameRef<'_>]) -> Result<bool, Error> {
        let (Some(first), Some(last)) = (frames.first(), frames.last()) else {
            return Ok(true);
        };
        frames.iter().try_for_each(check_record_len)?;
        let len: u64 = frames
            .iter()
            .map(|f| frame::encoded_len(f.record.len()) as u64)
            .sum();
        let fits_segment = self
            .segments
            .last()
            .is_some_and(|seg| seg.len + len <= self.opts.segment_bytes);
        let limit = self.opts.max_bytes - self.control_reserve();
        if !fits_segment
            || self.total_bytes + len > limit
            || self.head.map(|h| h.0 + 1) != Some(first.seq)
        {
            return Ok(false);
        }
        self.buf.clear();
        for f in frames {
            frame::encode_into(f, &mut self.buf);
        }
        self.write_buf().map_err(|e| self.write_failed(e))?;
        if let Some(seg) = self.segments.last_mut() {
            seg.len += len;
        }
        self.total_bytes += len;
        self.head = Some((last.seq, last.hash));
        self.stats.records_written += frames.len() as u64;
        self.stats.full = false;
        self.pending_sync += frames.len() as u64;
        self.sync_after_write()?;
        Ok(true)
    }

    fn sync_after_write(&mut self) -> Result<(), Error> {
        match self.opts.sync {
            SyncPolicy::EveryRecord => self.sync(),
            SyncPolicy::Group { records, .. } if self.pending_sync >= records => {
                self.background_sync()
            }
            SyncPolicy::Group { interval, .. } if self.last_sync.elapsed() >= interval => {
                self.background_sync()
            }
            _ => Ok(()),
        }
    }

    /// Group commit: hands the `fdatasync` to the sync thread; reports its errors.
    fn background_sync(&mut self) -> Result<(), Error> {
        let (Some(syncer), Some(f), Some(seg)) = (
            self.syncer.as_ref(),
            self.current.as_ref(),
            self.segments.last(),
        ) else {
            return self.sync();
        };
        if let Some(e) = syncer.take_error() {
            return Err(io_err(&seg.path, e));
        }
        syncer.request(f).map_err(|e| io_err(&seg.path, e))?;
        self.pending_sync = 0;
        self.last_sync = Instant::now();
        Ok(())
    }

    fn header_len(&self) -> u64 {
        (12 + self.opts.sensor_id.len() + 4) as u64
    }

    /// Writes the staged frame; on error cuts any partial write off again, so that a
    /// retry (or the next frame) starts at a frame boundary.
    fn write_buf(&mut self) -> std::io::Result<()> {
        let (Some(f), Some(seg)) = (self.current.as_mut(), self.segments.last()) else {
            return Err(std::io::Error::other("no open segment"));
        };
        f.write_all(&self.buf).inspect_err(|_| {
            // Best effort: if even this fails, recovery cuts the tail on the next open.
            let _ = f.set_len(seg.len);
        })
    }

    /// Maps a write error (the partial write is already cut off).
    fn write_failed(&mut self, e: std::io::Error) -> Error {
        let Some(seg) = self.segments.last() else {
            return io_err(&self.opts.dir, e);
        };
        if is_enospc(&e) {
            self.stats.full = true;
            Error::NoSpace {
                path: seg.path.clone(),
            }
        } else {
            io_err(&seg.path, e)
        }
    }

    /// Deletes fully acknowledged old segments until `need` more bytes fit the budget
    /// of `class`, or says the spool is full.
    fn make_room(&mut self, need: u64, class: Class) -> Result<(), Error> {
        let max = self.opts.max_bytes;
        let limit = match class {
            Class::Control => max,
            Class::Data => max - self.control_reserve(),
        };
        while self.total_bytes + need > limit {
            if !self.delete_oldest_acked()? {
                if class == Class::Data {
                    self.stats.full = true;
                }
                return Err(Error::Full {
                    dir: self.opts.dir.clone(),
                    bytes: self.total_bytes,
                    max,
                });
            }
        }
        if class == Class::Data {
            self.stats.full = false;
        }
        Ok(())
    }

    /// Part of the budget only control records may use.
    fn control_reserve(&self) -> u64 {
        (self.opts.max_bytes / 16).min(1 << 20)
    }

    /// Deletes the oldest segment if every record in it is acknowledged (never the
    /// segment being written).
    fn delete_oldest_acked(&mut self) -> Result<bool, Error> {
        if self.segments.len() < 2 || self.segments[1].first_seq.saturating_sub(1) > self.acked {
            return Ok(false);
        }
        let seg = self.segments.remove(0);
        fs::remove_file(&seg.path).map_err(|e| io_err(&seg.path, e))?;
        self.total_bytes -= seg.len;
        self.stats.segments_deleted += 1;
        tracing::info!(segment = %seg.path.display(), "deleted acknowledged spool segment");
        Ok(true)
    }

    fn rotate(&mut self, first_seq: u64, class: Class) -> Result<(), Error> {
        if self.current.is_some() {
            self.sync()?;
        }
        let path = self.opts.dir.join(segment::file_name(first_seq));
        let header = segment::encode_header(&self.opts.sensor_id);
        let attempt = || -> std::io::Result<File> {
            let mut f = fs::OpenOptions::new()
                .create_new(true)
                .append(true)
                .mode(0o600)
                .open(&path)?;
            if let Err(e) = f.write_all(&header).and_then(|()| f.sync_data()) {
                let _ = fs::remove_file(&path);
                return Err(e);
            }
            Ok(f)
        };
        let file = match attempt() {
            Ok(f) => f,
            Err(e) if is_enospc(&e) && class == Class::Control && self.drop_reserve() => {
                attempt().map_err(|e| io_err(&path, e))?
            }
            Err(e) if is_enospc(&e) => {
                self.stats.full = true;
                return Err(Error::NoSpace { path });
            }
            Err(e) => return Err(io_err(&path, e)),
        };
        sync_dir(&self.opts.dir)?;
        self.current = Some(file);
        self.total_bytes += header.len() as u64;
        self.segments.push(Segment {
            first_seq,
            path,
            len: header.len() as u64,
        });
        Ok(())
    }

    /// Forces written frames to stable storage (synchronously, whatever the policy).
    pub fn sync(&mut self) -> Result<(), Error> {
        if let (Some(syncer), Some(seg)) = (self.syncer.as_ref(), self.segments.last())
            && let Some(e) = syncer.take_error()
        {
            return Err(io_err(&seg.path, e));
        }
        if (self.pending_sync > 0 || self.syncer.is_some())
            && let (Some(f), Some(seg)) = (self.current.as_ref(), self.segments.last())
        {
            f.sync_data().map_err(|e| io_err(&seg.path, e))?;
            self.stats.syncs += 1;
        }
        self.pending_sync = 0;
        self.last_sync = Instant::now();
        Ok(())
    }

    /// Group commit on a timer: syncs if the policy's interval has passed.
    pub fn sync_if_due(&mut self) -> Result<(), Error> {
        match self.opts.sync {
            SyncPolicy::Group { interval, .. } if self.last_sync.elapsed() >= interval => {
                self.background_sync()
            }
            SyncPolicy::EveryRecord => self.sync(),
            _ => Ok(()),
        }
    }

    /// Everything up to `seq` is stored elsewhere (collector); segments made only of
    /// such records may be deleted when space is needed.
    pub fn acknowledge(&mut self, seq: u64) -> Result<(), Error> {
        // Nothing past our own head was ever sent: an acknowledgement beyond it (a
        // rogue collector, a planted `acked` file) must not cover future records.
        let seq = seq.min(self.head.map_or(0, |h| h.0));
        self.acked = self.acked.max(seq);
        let warn = self.warn_bytes();
        while self.total_bytes > warn && self.delete_oldest_acked()? {}
        Ok(())
    }

    /// Deletes the oldest segments whose every record is at or below `seq`, never the
    /// newest one (a collector's retention; the caller has anchored the chain).
    /// Returns how many were deleted.
    pub fn delete_through(&mut self, seq: u64) -> Result<u64, Error> {
        self.acked = self.acked.max(seq.min(self.head.map_or(0, |h| h.0)));
        let mut n = 0;
        while self.delete_oldest_acked()? {
            n += 1;
        }
        Ok(n)
    }

    fn warn_bytes(&self) -> u64 {
        self.opts.max_bytes / 100 * u64::from(self.opts.warn_percent)
    }

    /// Whether a data record of `record_len` bytes would fit now (after deleting
    /// acknowledged segments if needed).
    pub fn has_room_for(&mut self, record_len: usize) -> Result<bool, Error> {
        let need = frame::encoded_len(record_len) as u64 + self.header_len();
        match self.make_room(need, Class::Data) {
            Ok(()) => Ok(true),
            Err(e) if e.is_full() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Deletes `.reserve` to free file-system space; true if it existed.
    fn drop_reserve(&mut self) -> bool {
        fs::remove_file(self.opts.dir.join(RESERVE_FILE)).is_ok()
    }

    /// Recreates `.reserve` if missing, deleting acknowledged segments when the file
    /// system has no room for it; false when it still cannot be made.
    pub fn restore_reserve(&mut self) -> bool {
        let path = self.opts.dir.join(RESERVE_FILE);
        loop {
            if fs::symlink_metadata(&path).is_ok_and(|m| m.is_file()) {
                return true;
            }
            let made = fs::OpenOptions::new()
                .create_new(true)
                .write(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path)
                .and_then(|mut f| {
                    f.write_all(&vec![0; RESERVE_FILE_BYTES as usize])
                        .and_then(|()| f.sync_all())
                });
            match made {
                Ok(()) => return true,
                Err(e) => {
                    let _ = fs::remove_file(&path);
                    if !(is_enospc(&e) && self.delete_oldest_acked().unwrap_or(false)) {
                        return false;
                    }
                }
            }
        }
    }

    /// Counts a record the caller could not store because the spool was full.
    pub fn note_refused(&mut self) {
        self.stats.records_refused += 1;
        self.stats.full = true;
    }

    pub fn stats(&self) -> SpoolStats {
        SpoolStats {
            bytes: self.total_bytes,
            segments: self.segments.len() as u64,
            above_warning: self.total_bytes > self.warn_bytes(),
            head_seq: self.head.map_or(0, |(s, _)| s),
            syncs: self.stats.syncs
                + self.syncer.as_ref().map_or(0, |s| {
                    s.shared.syncs.load(std::sync::atomic::Ordering::Relaxed)
                }),
            acked_seq: self.acked,
            ..self.stats.clone()
        }
    }

    /// Stored frames with seq >= `seq`, in order (for streaming to the collector).
    pub fn read_from(&self, seq: u64) -> SpoolReader {
        SpoolReader::new(&self.opts.dir, seq)
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        let _ = self.sync();
    }
}
