//! The collector's store: one directory per sensor, `<store>/<sensor_id>/`, in the
//! sensor spool's own segment format (written with the spool library), plus the pinned
//! signing key as `signing.pub`, so `conduit-sensor verify-chain` works on it.
//! Every frame is verified before it is appended: hash, link, seq continuity, sensor
//! id, and checkpoint / chain_restart signatures against the pinned key.

use std::collections::VecDeque;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use conduit_evidence::chain::checkpoint::{batch_signing_bytes, signing_bytes, verify_signature};
use conduit_evidence::chain::cosignature::{self, Consistency, Cosignature};
use conduit_evidence::chain::declared_gap::{self, DeclaredGap};
use conduit_evidence::chain::keys;
use conduit_evidence::chain::{ZERO_HASH, record_hash};
use conduit_evidence::spool::{
    self, Class, FrameRef, Spool, SpoolOptions, SpoolReader, SyncPolicy, segment,
};
use conduit_proto::v1::{self, RecordKind, RejectCode, record::Body};
use prost::Message as _;

pub use crate::jetstream::Pending;

/// Recent hashes kept in memory to de-duplicate re-sent frames without reading disk.
const RECENT_HASHES: usize = 1 << 16;
/// Directory of the collector's own alarm chain inside the store.
pub const ALARM_DIR: &str = "_collector";
/// Directory of the export cursors inside the store.
pub const EXPORTS_DIR: &str = "exports";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Spool(#[from] spool::Error),
    #[error(transparent)]
    Key(#[from] keys::KeyError),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid sensor id {0:?} ({SENSOR_ID_GRAMMAR})")]
    BadSensorId(String),
}

/// Why a head was not cosigned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WitnessError {
    /// The stored chain contradicts a witnessed head: an alarm; nothing more is
    /// cosigned for this sensor until an operator looks.
    #[error("{0}")]
    Conflict(String),
    #[error("storing the cosignature: {0}")]
    Storage(String),
}

/// Why a batch was refused: the code for the sensor, the first bad seq, and text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub code: RejectCode,
    pub seq: u64,
    pub message: String,
}

impl Rejection {
    fn new(code: RejectCode, seq: u64, message: impl Into<String>) -> Rejection {
        Rejection {
            code,
            seq,
            message: message.into(),
        }
    }

    /// The alarm kind for the collector's alarm stream (None: not an alarm).
    pub fn alarm_kind(&self) -> Option<&'static str> {
        match self.code {
            RejectCode::Gap => Some("gap"),
            RejectCode::Equivocation => Some("equivocation"),
            RejectCode::BadHash => Some("bad_hash"),
            RejectCode::BadLink => Some("bad_link"),
            RejectCode::BadSignature => Some("bad_signature"),
            RejectCode::BadRecord => Some("bad_record"),
            RejectCode::KeyMismatch => Some("key_mismatch"),
            RejectCode::Identity => Some("identity"),
            RejectCode::UnknownSensor => Some("unknown_sensor"),
            _ => None,
        }
    }
}

/// Loss reasons with which a sensor reports damage to its own spool (a gap in the
/// middle, records missing at its head): each stored one becomes an alarm.
pub const SPOOL_DAMAGE_REASONS: [&str; 2] = ["spool_gap", "spool_head_lost"];
/// Reason of the damage a sensor's gap declaration reports.
pub const DECLARED_GAP: &str = "declared_gap";

/// A stored record that reports spool damage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    pub seq: u64,
    pub reason: String,
    pub detail: String,
}

/// Outcome of applying a batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    pub appended: u64,
    pub duplicates: u64,
}

pub use conduit_evidence::sensor_id::GRAMMAR as SENSOR_ID_GRAMMAR;

/// Sensor ids become directory names and SIEM fields: the one grammar
/// ([`conduit_evidence::sensor_id`]), which also keeps the collector's own names.
pub fn valid_sensor_id(id: &str) -> bool {
    conduit_evidence::sensor_id::is_valid(id)
}

/// Writes `<dir>/signing.pub` (hex, 0644) atomically.
pub fn pin_key(dir: &Path, key: &[u8; 32]) -> Result<(), StoreError> {
    let path = dir.join(keys::PUB_FILE);
    let tmp = dir.join(format!("{}.tmp", keys::PUB_FILE));
    let io = |e| StoreError::Io {
        path: path.clone(),
        source: e,
    };
    let mut f = fs::File::create(&tmp).map_err(io)?;
    f.set_permissions(fs::Permissions::from_mode(0o644))
        .map_err(io)?;
    f.write_all(format!("{}\n", hex::encode(key)).as_bytes())
        .map_err(io)?;
    f.sync_all().map_err(io)?;
    fs::rename(&tmp, &path).map_err(io)?;
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
    Ok(())
}

/// The pinned key in a sensor's store directory, if any.
pub fn pinned_key(dir: &Path) -> Result<Option<[u8; 32]>, StoreError> {
    let path = dir.join(keys::PUB_FILE);
    if !path.exists() {
        return Ok(None);
    }
    Ok(Some(keys::read_public_key(&path)?))
}

/// One sensor's chain in the store. One writer (one stream) at a time.
pub struct SensorStore {
    sensor_id: String,
    dir: PathBuf,
    /// Opened (and the directory created, the key pinned) with the first stored
    /// frame: a Hello alone leaves nothing on disk.
    spool: Option<Spool>,
    key: [u8; 32],
    segment_bytes: u64,
    head: (u64, [u8; 32]),
    /// Hashes of the last stored seqs: `recent[i]` is the hash of `recent_first + i`.
    recent: VecDeque<[u8; 32]>,
    recent_first: u64,
    unsynced: bool,
    /// Read handle of the newest segment, for [`SensorStore::durability_point`].
    newest: Option<(PathBuf, Arc<fs::File>)>,
    /// When the last stream let go of this store.
    idle_since: Instant,
    /// Stored records in which the sensor reports damage to its own spool, not yet
    /// raised as alarms ([`SensorStore::take_damage`]).
    damage: Vec<Damage>,
    /// The newest checkpoint record stored (seq, record hash), a head to witness.
    last_checkpoint: Option<(u64, [u8; 32])>,
    /// The last head this collector cosigned for the sensor (`witness.cosig`).
    witnessed: Option<Cosignature>,
    /// Why the stored chain contradicts a witnessed head: nothing more is cosigned.
    witness_conflict: Option<String>,
    /// Detached ([`SensorStore::detached`]): verified frames wait here for the caller
    /// to store them elsewhere (JetStream) instead of going to files.
    outbox: Option<Vec<Pending>>,
}

impl SensorStore {
    /// Opens (creating) `<root>/<sensor_id>` with the pinned key `key`; recovers the
    /// head from the segments (a torn tail past the last fsync is cut, as in the sensor).
    pub fn open(
        root: &Path,
        sensor_id: &str,
        key: [u8; 32],
        segment_bytes: u64,
    ) -> Result<SensorStore, StoreError> {
        if !valid_sensor_id(sensor_id) {
            return Err(StoreError::BadSensorId(
                crate::text::bounded(sensor_id, conduit_proto::limits::MAX_SENSOR_ID_BYTES)
                    .into_owned(),
            ));
        }
        let dir = root.join(sensor_id);
        let (spool, head) = if dir.exists() {
            let (spool, head) = open_spool(&dir, sensor_id, &key, segment_bytes)?;
            (Some(spool), head)
        } else {
            (None, (0, ZERO_HASH))
        };
        let witnessed = cosignature::read(&dir)
            .map_err(|e| StoreError::Io {
                path: dir.join(cosignature::COSIG_FILE),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            })?
            .last()
            .copied();
        let mut st = SensorStore::empty(sensor_id, dir, key, head, witnessed);
        st.spool = spool;
        st.segment_bytes = segment_bytes;
        Ok(st)
    }

    /// A store of `sensor_id` at `head` with nothing opened and nothing remembered
    /// but the head's own hash.
    fn empty(
        sensor_id: &str,
        dir: PathBuf,
        key: [u8; 32],
        head: (u64, [u8; 32]),
        witnessed: Option<Cosignature>,
    ) -> SensorStore {
        let mut st = SensorStore {
            sensor_id: sensor_id.to_owned(),
            dir,
            spool: None,
            key,
            segment_bytes: 0,
            recent_first: head.0.max(1),
            head,
            recent: VecDeque::with_capacity(1024),
            unsynced: false,
            newest: None,
            idle_since: Instant::now(),
            damage: Vec::new(),
            last_checkpoint: None,
            witnessed,
            witness_conflict: None,
            outbox: None,
        };
        if head.0 > 0 {
            st.remember(head.0, head.1);
        }
        st
    }

    /// A chain verified here and stored by the caller: no directory; the head and
    /// the hashes of the newest stored frames (oldest first) come from the caller,
    /// and what [`SensorStore::apply_batch`] accepts is taken with
    /// [`SensorStore::take_outbox`]; [`SensorStore::cosign`] returns cosignatures
    /// for the caller to store.
    pub fn detached(
        sensor_id: &str,
        key: [u8; 32],
        head: (u64, [u8; 32]),
        recent: &[(u64, [u8; 32])],
        witnessed: Option<Cosignature>,
    ) -> SensorStore {
        let mut st = SensorStore::empty(sensor_id, PathBuf::new(), key, head, witnessed);
        st.outbox = Some(Vec::new());
        // Only a run that ends at the head is usable (seq i at recent_first + i).
        if recent.last().map(|r| r.0) == Some(head.0)
            && recent.windows(2).all(|w| w[1].0 == w[0].0 + 1)
        {
            st.recent.clear();
            for &(seq, hash) in recent {
                st.remember(seq, hash);
            }
        }
        st
    }

    /// What was verified since the last call, in chain order (detached stores only).
    pub fn take_outbox(&mut self) -> Vec<Pending> {
        self.outbox.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// The last head this collector witnessed for the sensor.
    pub fn witnessed(&self) -> Option<Cosignature> {
        self.witnessed
    }

    /// Cosigns the newest stored checkpoint if it is durable (at or below
    /// `durable_seq`) and extends the last witnessed head; appends the cosignature
    /// to `witness.cosig` (fsynced) and returns it. Ok(None): nothing new to witness.
    /// Err: the stored chain contradicts what was witnessed (an alarm), or the
    /// cosignature could not be stored; nothing is cosigned then.
    pub fn cosign(
        &mut self,
        durable_seq: u64,
        key: &ed25519_dalek::SigningKey,
        now_unix_nano: i64,
    ) -> Result<Option<Cosignature>, WitnessError> {
        if self.witness_conflict.is_some() {
            return Ok(None);
        }
        let Some(head) = self.last_checkpoint.filter(|(seq, _)| *seq <= durable_seq) else {
            return Ok(None);
        };
        let last = self.witnessed.map(|w| (w.seq, w.hash));
        let hash_at_last = last.and_then(|(seq, _)| self.stored_hash(seq));
        match cosignature::check_extends(last, head, hash_at_last, self.head.0) {
            Consistency::AlreadyWitnessed => Ok(None),
            Consistency::Conflict(why) => {
                let why = format!("not cosigning seq {}: {why}", head.0);
                self.witness_conflict = Some(why.clone());
                Err(WitnessError::Conflict(why))
            }
            Consistency::Extends => {
                let c = Cosignature::sign(key, &self.sensor_id, head.0, &head.1, now_unix_nano);
                if self.outbox.is_some() {
                    // Detached: the caller stores it.
                    self.witnessed = Some(c);
                    return Ok(Some(c));
                }
                cosignature::append(&self.dir, &c).map_err(|e| {
                    WitnessError::Storage(format!(
                        "{}: {e}",
                        self.dir.join(cosignature::COSIG_FILE).display()
                    ))
                })?;
                self.witnessed = Some(c);
                Ok(Some(c))
            }
        }
    }

    /// The spool, created on first use.
    fn spool(&mut self) -> Result<&mut Spool, StoreError> {
        let spool = match self.spool.take() {
            Some(s) => s,
            None => open_spool(&self.dir, &self.sensor_id, &self.key, self.segment_bytes)?.0,
        };
        Ok(self.spool.insert(spool))
    }

    /// Marks the end of a stream's use (for [`SensorStore::idle_for`]).
    pub fn touch(&mut self) {
        self.idle_since = Instant::now();
    }

    /// How long no stream has used this store.
    pub fn idle_for(&self) -> Duration {
        self.idle_since.elapsed()
    }

    pub fn sensor_id(&self) -> &str {
        &self.sensor_id
    }

    pub fn key(&self) -> [u8; 32] {
        self.key
    }

    /// Seq and hash of the last stored frame ((0, zero) when empty).
    pub fn head(&self) -> (u64, [u8; 32]) {
        self.head
    }

    /// Checks the batch's signature (the pinned key over its last frame), then
    /// [`SensorStore::apply`]s it: nothing a valid signature does not cover is stored.
    pub fn apply_batch(&mut self, batch: &v1::Batch) -> Result<Applied, Rejection> {
        let Some(last) = batch.frames.last() else {
            return Ok(Applied::default());
        };
        let hash = to_hash(&last.hash, last.seq, "hash")?;
        let msg = batch_signing_bytes(&self.sensor_id, last.seq, &hash);
        verify_signature(&self.key, &msg, &batch.signature).map_err(|e| {
            Rejection::new(
                RejectCode::BadSignature,
                batch.frames.first().map_or(last.seq, |f| f.seq),
                format!(
                    "batch ending at seq {} is not signed by the pinned key: {e}",
                    last.seq
                ),
            )
        })?;
        let Some(gap) = &batch.gap else {
            return self.apply(&batch.frames);
        };
        let gap = self.accept_gap(gap, &batch.frames[0])?;
        // The chain continues from the declared hash; a refused batch restores it.
        let before = (self.head, self.recent.clone(), self.recent_first);
        self.head = (gap.to, gap.resume_prev_hash);
        self.recent.clear();
        self.remember(gap.to, gap.resume_prev_hash);
        match self.apply(&batch.frames) {
            Ok(applied) => {
                self.damage.push(Damage {
                    seq: gap.from,
                    reason: DECLARED_GAP.to_owned(),
                    detail: format!(
                        "seqs {}..={} declared lost by the sensor: {}",
                        gap.from, gap.to, gap.reason
                    ),
                });
                Ok(applied)
            }
            Err(r) => {
                // Nothing after the gap stored: the chain ends where it did. (A
                // storage error after some frames leaves the head at the last one.)
                if self.head == (gap.to, gap.resume_prev_hash) {
                    (self.head, self.recent, self.recent_first) = before;
                    if let Some(outbox) = self.outbox.as_mut() {
                        outbox.pop();
                    }
                }
                Err(r)
            }
        }
    }

    /// Checks a gap declaration against the head, the batch's first frame and the
    /// pinned key, and keeps it durably beside the chain before any frame after it
    /// is stored (a crash in between leaves a declaration that nothing reaches yet;
    /// the sensor declares it again).
    fn accept_gap(
        &mut self,
        g: &v1::GapDeclaration,
        first: &v1::Frame,
    ) -> Result<DeclaredGap, Rejection> {
        let bad = |code, what: String| Rejection::new(code, g.from_seq, what);
        let gap = DeclaredGap::from_proto(g).map_err(|e| bad(RejectCode::BadRecord, e))?;
        gap.verify(&self.key, &self.sensor_id)
            .map_err(|e| bad(RejectCode::BadSignature, format!("gap declaration: {e}")))?;
        if gap.from != self.head.0 + 1 {
            return Err(bad(
                RejectCode::Gap,
                format!(
                    "gap declared from seq {}, the stored chain ends at seq {}",
                    gap.from, self.head.0
                ),
            ));
        }
        if first.seq != gap.to + 1 || first.prev_hash[..] != gap.resume_prev_hash {
            return Err(bad(
                RejectCode::BadLink,
                format!(
                    "the batch after the gap {}..={} must start at seq {} linking to the declared hash",
                    gap.from,
                    gap.to,
                    gap.to + 1
                ),
            ));
        }
        if let Some(outbox) = self.outbox.as_mut() {
            outbox.push(Pending::Gap(g.clone()));
            return Ok(gap);
        }
        // The chain directory (and the pinned key) exist before the declaration.
        self.spool()
            .map_err(|e| bad(RejectCode::Storage, format!("store: {e}")))?;
        declared_gap::append(&self.dir, &gap).map_err(|e| bad(RejectCode::Storage, e))?;
        Ok(gap)
    }

    /// Verifies the whole batch, then appends its new frames (nothing of a refused
    /// batch is stored). Identical re-sent frames are skipped.
    pub fn apply(&mut self, frames: &[v1::Frame]) -> Result<Applied, Rejection> {
        let mut out = Applied::default();
        let (mut seq, mut hash) = self.head;
        let mut first_new = None;
        let mut damage = Vec::new();
        let mut checkpoints = Vec::new();
        for (i, f) in frames.iter().enumerate() {
            let fh = to_hash(&f.hash, f.seq, "hash")?;
            let fp = to_hash(&f.prev_hash, f.seq, "prev_hash")?;
            if f.seq <= seq {
                // Re-sent: identical is fine, anything else is equivocation.
                let stored = if f.seq > self.head.0 {
                    // Earlier in this same batch.
                    frames[first_new.unwrap_or(0)..i]
                        .iter()
                        .find(|g| g.seq == f.seq)
                        .map(|g| to_hash(&g.hash, g.seq, "hash"))
                        .transpose()?
                } else {
                    self.stored_hash(f.seq)
                };
                match stored {
                    Some(h) if h == fh => {
                        out.duplicates += 1;
                        continue;
                    }
                    Some(h) => {
                        return Err(Rejection::new(
                            RejectCode::Equivocation,
                            f.seq,
                            format!(
                                "seq {} was stored with hash {}, now sent with hash {}",
                                f.seq,
                                hex::encode(h),
                                hex::encode(fh)
                            ),
                        ));
                    }
                    None => {
                        return Err(Rejection::new(
                            RejectCode::Equivocation,
                            f.seq,
                            format!("seq {} re-sent but its stored hash cannot be read", f.seq),
                        ));
                    }
                }
            }
            if f.seq != seq + 1 {
                return Err(Rejection::new(
                    RejectCode::Gap,
                    seq + 1,
                    format!("gap: received seq {} where {} was expected", f.seq, seq + 1),
                ));
            }
            if fp != hash {
                return Err(Rejection::new(
                    RejectCode::BadLink,
                    f.seq,
                    format!(
                        "prev_hash of seq {} is {}, the stored hash of seq {} is {}",
                        f.seq,
                        hex::encode(fp),
                        seq,
                        hex::encode(hash)
                    ),
                ));
            }
            if record_hash(f.seq, &fp, &f.record) != fh {
                return Err(Rejection::new(
                    RejectCode::BadHash,
                    f.seq,
                    format!(
                        "hash of seq {} does not match seq || prev_hash || record bytes",
                        f.seq
                    ),
                ));
            }
            let (d, is_checkpoint) = self.check_record(f.seq, &fp, &f.record)?;
            damage.extend(d);
            if is_checkpoint {
                checkpoints.push((f.seq, fh));
            }
            first_new.get_or_insert(i);
            seq = f.seq;
            hash = fh;
        }
        let Some(start) = first_new else {
            return Ok(out);
        };
        // The verified new frames: head+1, head+2, ... (re-sent ones in between skipped).
        let mut refs = Vec::with_capacity(frames.len() - start);
        let mut next = self.head.0 + 1;
        for f in &frames[start..] {
            if f.seq != next {
                continue;
            }
            refs.push(FrameRef {
                seq: f.seq,
                prev_hash: to_hash(&f.prev_hash, f.seq, "prev_hash")?,
                hash: to_hash(&f.hash, f.seq, "hash")?,
                record: &f.record,
            });
            next += 1;
        }
        let storage = |seq: u64, e: spool::Error| {
            Rejection::new(RejectCode::Storage, seq, format!("store: {e}"))
        };
        // One write(2) for the batch when it fits the segment; else frame by frame
        // (the spool rotates segments there).
        let first_seq = refs.first().map_or(0, |f| f.seq);
        let opened =
            |e: StoreError| Rejection::new(RejectCode::Storage, first_seq, format!("store: {e}"));
        if let Some(outbox) = self.outbox.as_mut() {
            // The verified frames themselves (their bytes are shared, not copied).
            let mut next = first_seq;
            for f in &frames[start..] {
                if f.seq == next {
                    outbox.push(Pending::Frame(f.clone()));
                    next += 1;
                }
            }
            for f in &refs {
                self.remember(f.seq, f.hash);
            }
            if let Some(last) = refs.last() {
                self.head = (last.seq, last.hash);
            }
        } else if self
            .spool()
            .map_err(opened)?
            .append_batch(&refs)
            .map_err(|e| storage(first_seq, e))?
        {
            for f in &refs {
                self.remember(f.seq, f.hash);
            }
            if let Some(last) = refs.last() {
                self.head = (last.seq, last.hash);
            }
        } else {
            for f in &refs {
                self.spool()
                    .map_err(opened)?
                    .append(f, Class::Data)
                    .map_err(|e| storage(f.seq, e))?;
                // Head follows every stored frame, so an error leaves it exact.
                self.head = (f.seq, f.hash);
                self.remember(f.seq, f.hash);
                self.unsynced = true;
            }
        }
        self.unsynced |= !refs.is_empty();
        out.appended = refs.len() as u64;
        // Only what was stored now (re-sent frames were reported the first time).
        let stored = refs.first().map_or(u64::MAX, |f| f.seq);
        self.damage
            .extend(damage.into_iter().filter(|d| d.seq >= stored));
        if let Some(cp) = checkpoints
            .into_iter()
            .rfind(|(seq, _)| *seq >= stored && *seq <= self.head.0)
        {
            self.last_checkpoint = Some(cp);
        }
        Ok(out)
    }

    /// The spool damage reported by records stored since the last call.
    pub fn take_damage(&mut self) -> Vec<Damage> {
        std::mem::take(&mut self.damage)
    }

    /// Forces appended frames to stable storage; after this they may be acknowledged.
    /// Deletes the oldest segments wholly at or below `seq` (retention; the chain
    /// directory already holds its anchor). Returns how many.
    pub fn delete_through(&mut self, seq: u64) -> Result<u64, StoreError> {
        match self.spool.as_mut() {
            Some(spool) => Ok(spool.delete_through(seq)?),
            None => Ok(0), // nothing stored yet
        }
    }

    pub fn sync(&mut self) -> Result<(), StoreError> {
        if self.unsynced
            && let Some(spool) = self.spool.as_mut()
        {
            spool.sync()?;
            self.unsynced = false;
        }
        Ok(())
    }

    /// The head and a handle of the newest segment: `sync_data` on it makes every frame
    /// appended so far durable (older segments were synced by the spool when it
    /// rotated), so it can run on another thread while appends go on. None: empty.
    pub fn durability_point(&mut self) -> Result<Option<(u64, Arc<fs::File>)>, StoreError> {
        let io = |path: &Path, e| StoreError::Io {
            path: path.to_owned(),
            source: e,
        };
        if self.spool.is_none() {
            return Ok(None);
        }
        let Some((_, path)) = segment::list(&self.dir)
            .map_err(|e| io(&self.dir, e))?
            .pop()
        else {
            return Ok(None);
        };
        let file = match &self.newest {
            Some((p, f)) if *p == path => f.clone(),
            _ => {
                let f = Arc::new(fs::File::open(&path).map_err(|e| io(&path, e))?);
                self.newest = Some((path, f.clone()));
                f
            }
        };
        Ok(Some((self.head.0, file)))
    }

    fn remember(&mut self, seq: u64, hash: [u8; 32]) {
        if self.recent.is_empty() {
            self.recent_first = seq;
        }
        self.recent.push_back(hash);
        if self.recent.len() > RECENT_HASHES {
            self.recent.pop_front();
            self.recent_first += 1;
        }
    }

    /// Hash stored for `seq` (memory first, then the segment files).
    fn stored_hash(&self, seq: u64) -> Option<[u8; 32]> {
        if seq >= self.recent_first
            && let Some(h) = self.recent.get((seq - self.recent_first) as usize)
        {
            return Some(*h);
        }
        if self.outbox.is_some() {
            return None; // detached: only what the caller handed over
        }
        let frame = SpoolReader::new(&self.dir, seq).next_frame().ok()??;
        // A seq inside a declared gap reads as the frame after it.
        (frame.seq == seq).then_some(frame.hash)
    }

    /// Record-level checks: decodes, names this sensor, signatures verify with the
    /// pinned key. Returns the spool damage the record reports, if any, and whether
    /// it is a checkpoint.
    fn check_record(
        &self,
        seq: u64,
        prev_hash: &[u8; 32],
        bytes: &[u8],
    ) -> Result<(Option<Damage>, bool), Rejection> {
        let bad = |code, msg: String| Rejection::new(code, seq, msg);
        let record = v1::Record::decode(bytes).map_err(|e| {
            bad(
                RejectCode::BadRecord,
                format!("seq {seq}: record does not decode: {e}"),
            )
        })?;
        if record.sensor_id != self.sensor_id {
            return Err(bad(
                RejectCode::BadRecord,
                format!(
                    "seq {seq}: record names sensor {:?}, the stream is sensor {:?}",
                    record.sensor_id, self.sensor_id
                ),
            ));
        }
        if record.kind == RecordKind::Alarm as i32 || matches!(record.body, Some(Body::Alarm(_))) {
            return Err(bad(
                RejectCode::BadRecord,
                format!("seq {seq}: ALARM records come only from the collector, not from a sensor"),
            ));
        }
        let (named_key, msg, sig) = match (RecordKind::try_from(record.kind), &record.body) {
            (Ok(RecordKind::Checkpoint), Some(Body::Checkpoint(cp))) => {
                if cp.seq + 1 != seq || cp.hash[..] != prev_hash[..] {
                    return Err(bad(
                        RejectCode::BadSignature,
                        format!(
                            "checkpoint at seq {seq} covers seq {}, not the record before it",
                            cp.seq
                        ),
                    ));
                }
                (
                    &cp.public_key,
                    signing_bytes(&record.sensor_id, cp.seq, prev_hash, cp.time_unix_nano),
                    &cp.signature,
                )
            }
            (Ok(RecordKind::ChainRestart), Some(Body::ChainRestart(cr))) => {
                if seq != 1 {
                    return Err(bad(
                        RejectCode::BadRecord,
                        format!("chain_restart at seq {seq}, not at the start of a chain"),
                    ));
                }
                (
                    &cr.public_key,
                    signing_bytes(&record.sensor_id, 0, &ZERO_HASH, record.time_unix_nano),
                    &cr.signature,
                )
            }
            (Ok(RecordKind::Checkpoint | RecordKind::ChainRestart), _) => {
                return Err(bad(
                    RejectCode::BadRecord,
                    format!("seq {seq}: kind and body do not match"),
                ));
            }
            (_, Some(Body::Loss(l))) if SPOOL_DAMAGE_REASONS.contains(&l.reason.as_str()) => {
                return Ok((
                    Some(Damage {
                        seq,
                        reason: l.reason.clone(),
                        detail: l.detail.clone(),
                    }),
                    false,
                ));
            }
            _ => return Ok((None, false)),
        };
        let is_checkpoint = record.kind == RecordKind::Checkpoint as i32;
        if named_key[..] != self.key[..] {
            return Err(bad(
                RejectCode::KeyMismatch,
                format!(
                    "seq {seq} is signed by key {}, the pinned key is {}",
                    hex::encode(named_key),
                    hex::encode(self.key)
                ),
            ));
        }
        verify_signature(&self.key, &msg, sig)
            .map(|()| (None, is_checkpoint))
            .map_err(|e| bad(RejectCode::BadSignature, format!("seq {seq}: {e}")))
    }
}

/// Opens the store's spool (creating the directory) and pins the key; returns the
/// recovered head.
fn open_spool(
    dir: &Path,
    sensor_id: &str,
    key: &[u8; 32],
    segment_bytes: u64,
) -> Result<(Spool, (u64, [u8; 32])), StoreError> {
    let (spool, recovery) = Spool::open(SpoolOptions {
        dir: dir.to_owned(),
        sensor_id: sensor_id.to_owned(),
        // The store is never trimmed by the spool logic (nothing is acknowledged).
        max_bytes: u64::MAX / 4,
        segment_bytes,
        sync: SyncPolicy::OsOnly,
        warn_percent: 100,
    })?;
    for t in &recovery.truncations {
        tracing::warn!(sensor = sensor_id, segment = %t.segment, bytes = t.bytes, why = %t.why,
            "store recovery cut a torn tail (not acknowledged; the sensor re-sends it)");
    }
    if pinned_key(dir)? != Some(*key) {
        pin_key(dir, key)?;
    }
    Ok((spool, recovery.head.unwrap_or((0, ZERO_HASH))))
}

fn to_hash(b: &[u8], seq: u64, what: &str) -> Result<[u8; 32], Rejection> {
    b.try_into().map_err(|_| {
        Rejection::new(
            RejectCode::BadRecord,
            seq,
            format!("seq {seq}: {what} is {} bytes, not 32", b.len()),
        )
    })
}

/// Whether a store directory holds a collector's alarm chain: this collector's
/// (`_collector`), or one copied from JetStream, named after its collector's key
/// (`_collector-<64 hex>`). Sensor ids start with a letter or digit: never these.
pub fn is_alarm_dir(name: &str) -> bool {
    name == ALARM_DIR
        || name
            .strip_prefix(ALARM_DIR)
            .and_then(|rest| rest.strip_prefix('-'))
            .is_some_and(|key| key.len() == 64 && key.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Sensor directories in the store (with the alarm chains), sorted.
pub fn chain_dirs(root: &Path) -> std::io::Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(root)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !entry.file_type()?.is_dir() || name == EXPORTS_DIR {
            continue;
        }
        if valid_sensor_id(&name) || is_alarm_dir(&name) {
            out.push((name, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alarm_dirs_are_never_sensor_ids() {
        let copied = format!("{ALARM_DIR}-{}", "ab".repeat(32));
        for name in [ALARM_DIR, copied.as_str()] {
            assert!(is_alarm_dir(name), "{name}");
            assert!(!valid_sensor_id(name), "{name}");
        }
        for name in [
            "collector",
            "_collector-",
            "_collector-abc",
            &format!("{ALARM_DIR}-{}", "zz".repeat(32)),
            &format!("{ALARM_DIR}_{}", "ab".repeat(32)),
            "gw-01",
        ] {
            assert!(!is_alarm_dir(name), "{name}");
        }
    }
}
