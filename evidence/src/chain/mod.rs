//! The record chain: every record gets `seq`, `prev_hash` and `hash`, is appended to the
//! spool, and is covered by signed checkpoints. The agent calls only [`Recorder`].
//! Byte-level format: docs/spool-format.md.

pub mod anchor;
pub mod checkpoint;
pub mod cosignature;
pub mod declared_gap;
pub mod hashing;
pub mod head_witness;
pub mod key_check;
pub mod keys;
pub mod line_file;
pub mod verify;

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use conduit_proto::v1::{self, RecordKind, record::Body};
use ed25519_dalek::SigningKey;
use prost::Message as _;

use crate::spool::{
    self, Class, FrameRef, Spool, SpoolOptions, SpoolReader, SpoolStats, SyncPolicy,
};
pub use checkpoint::CheckpointPolicy;
pub use hashing::{HASH_CONTEXT, ZERO_HASH, record_hash};
pub use keys::{keygen, load_or_create, load_signing_key, read_public_key};
pub use verify::{Report, verify_dir};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Spool(#[from] spool::Error),
    #[error(transparent)]
    Key(#[from] keys::KeyError),
    #[error("record names sensor {found:?}, this recorder writes sensor {expected:?}")]
    ForeignSensor { found: String, expected: String },
    #[error("records of kind {0:?} are written by the recorder itself, not appended")]
    ReservedKind(RecordKind),
}

/// Kinds only the recorder writes (their bodies are signed or describe the spool).
fn check_kind(record: &v1::Record) -> Result<(), Error> {
    match RecordKind::try_from(record.kind) {
        Ok(k @ (RecordKind::Checkpoint | RecordKind::ChainRestart | RecordKind::SpoolRecovery)) => {
            Err(Error::ReservedKind(k))
        }
        _ => Ok(()),
    }
}

/// Loss reason of a gap in the middle of the spool.
pub const SPOOL_GAP: &str = "spool_gap";

/// Most records a writer hands to [`Recorder::append_batch`] at once (group commit):
/// one `write(2)` per group. The agent flushes after every step of its event loop, so
/// a group is also never older than that step.
pub const GROUP_COMMIT_RECORDS: usize = 512;

/// The gaps in `dir` that no `spool_gap` loss record in it names yet.
fn unreported_gaps(dir: &std::path::Path) -> Vec<spool::damage::Gap> {
    let mut reported = std::collections::HashSet::new();
    let gaps = spool::damage::read_past_damage(dir, |f| {
        if let Ok(r) = v1::Record::decode(f.record_bytes.as_slice())
            && let Some(Body::Loss(l)) = &r.body
            && l.reason == SPOOL_GAP
            && let Some(range) = l
                .detail
                .strip_prefix("seqs ")
                .and_then(|d| d.split_once(' '))
                .and_then(|(range, _)| range.split_once("..="))
            && let (Ok(from), Ok(to)) = (range.0.parse::<u64>(), range.1.parse::<u64>())
        {
            reported.insert((from, to));
        }
    });
    match gaps {
        Ok(gaps) => gaps
            .into_iter()
            .filter(|g| !reported.contains(&(g.from, g.to)))
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot scan the spool for gaps");
            Vec::new()
        }
    }
}

/// Everything [`Recorder::open`] needs; [`RecorderOptions::new`] fills in the defaults.
#[derive(Debug, Clone)]
pub struct RecorderOptions {
    pub spool_dir: PathBuf,
    pub sensor_id: String,
    /// Signing key (PKCS#8 PEM, mode 0600). None: `spool_dir/signing.key`, created on
    /// first start.
    pub key_path: Option<PathBuf>,
    pub max_spool_bytes: u64,
    pub segment_bytes: u64,
    pub sync: SyncPolicy,
    pub checkpoint_every_records: u64,
    pub checkpoint_every: Duration,
    /// The wall clock records are stamped with (tests of old evidence set their own).
    pub clock: fn() -> SystemTime,
    /// Where the durable head is witnessed outside the spool (see head_witness);
    /// None: not witnessed.
    pub head_witness: Option<PathBuf>,
    /// `software_version` stamped on every record that has none (ECS
    /// `observer.version`); defaults to the workspace's version.
    pub software_version: String,
}

impl RecorderOptions {
    pub fn new(spool_dir: impl Into<PathBuf>, sensor_id: impl Into<String>) -> Self {
        RecorderOptions {
            spool_dir: spool_dir.into(),
            sensor_id: sensor_id.into(),
            key_path: None,
            max_spool_bytes: spool::DEFAULT_MAX_BYTES,
            segment_bytes: spool::DEFAULT_SEGMENT_BYTES,
            sync: SyncPolicy::default(),
            checkpoint_every_records: checkpoint::DEFAULT_EVERY_RECORDS,
            checkpoint_every: checkpoint::DEFAULT_EVERY,
            clock: SystemTime::now,
            head_witness: None,
            software_version: env!("CARGO_PKG_VERSION").to_owned(),
        }
    }
}

/// One record as written: its chain position and the exact stored bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Appended {
    pub seq: u64,
    pub prev_hash: [u8; 32],
    pub hash: [u8; 32],
    pub record: v1::Record,
    pub record_bytes: Vec<u8>,
}

/// Owns the chain head, the spool, the signing key and the checkpoint policy.
pub struct Recorder {
    spool: Spool,
    key: SigningKey,
    key_created: bool,
    sensor_id: String,
    policy: CheckpointPolicy,
    seq: u64,
    hash: [u8; 32],
    since_checkpoint: u64,
    last_checkpoint: SystemTime,
    /// In a "spool full" episode, and refusals not yet counted in a loss record.
    full_episode: bool,
    refused_unreported: u64,
    checkpoints_skipped: u64,
    software_version: String,
    clock: fn() -> SystemTime,
    head_witness: Option<PathBuf>,
}

impl Recorder {
    /// Opens the spool (recovering a torn tail), loads or creates the key, and continues
    /// the chain, or starts a new one with a `chain_restart` record. Returns the records
    /// written on open (restart, spool recovery, and a checkpoint).
    pub fn open(opts: RecorderOptions) -> Result<(Recorder, Vec<Appended>), Error> {
        let (key, key_created) = match &opts.key_path {
            Some(path) => (keys::load_signing_key(path)?, false),
            None => keys::load_or_create(&opts.spool_dir)?,
        };
        // A chain signed by another key is not continued (see key_check).
        let retired =
            key_check::retire_if_foreign(&opts.spool_dir, &key.verifying_key().to_bytes())
                .map_err(|source| spool::Error::Io {
                    path: opts.spool_dir.clone(),
                    source,
                })?;
        // So that `verify-chain DIR` finds the key without --public-key.
        keys::write_public_key_if_missing(&opts.spool_dir, &key)?;
        let (spool, recovery) = Spool::open(SpoolOptions {
            dir: opts.spool_dir.clone(),
            sensor_id: opts.sensor_id.clone(),
            max_bytes: opts.max_spool_bytes,
            segment_bytes: opts.segment_bytes,
            sync: opts.sync,
            warn_percent: spool::DEFAULT_WARN_PERCENT,
        })?;
        let now = (opts.clock)();
        let (seq, hash) = recovery.head.unwrap_or((0, ZERO_HASH));
        let mut rec = Recorder {
            spool,
            key,
            key_created,
            sensor_id: opts.sensor_id,
            policy: CheckpointPolicy {
                every_records: opts.checkpoint_every_records,
                every: opts.checkpoint_every,
            },
            seq,
            hash,
            since_checkpoint: 0,
            last_checkpoint: now,
            full_episode: false,
            refused_unreported: 0,
            checkpoints_skipped: 0,
            clock: opts.clock,
            head_witness: opts.head_witness.clone(),
            software_version: opts.software_version.clone(),
        };
        let mut out = Vec::new();
        if recovery.head.is_none() {
            let (reason, detail) = match (&retired, &recovery.unreadable) {
                (Some(r), _) => (
                    "key_mismatch",
                    format!(
                        "the spool's chain (up to seq {}) is signed by key {}, this sensor's signing key is {}; the old chain was moved to {} and still verifies with its signing.pub",
                        r.head_seq,
                        hex::encode(r.chain_key),
                        hex::encode(rec.key.verifying_key().to_bytes()),
                        r.moved_to.display()
                    ),
                ),
                (None, Some(why)) => ("spool_unreadable", why.clone()),
                (None, None) => (
                    "no_spool",
                    format!(
                        "no spool segments in {} (first start, or the spool was lost)",
                        opts.spool_dir.display()
                    ),
                ),
            };
            tracing::warn!(reason, detail, "starting a new record chain");
            let r =
                checkpoint::chain_restart_record(&rec.key, &rec.sensor_id, reason, &detail, now);
            out.push(rec.write(r, Class::Control)?);
        }
        for t in &recovery.truncations {
            tracing::warn!(
                segment = t.segment,
                bytes = t.bytes,
                why = t.why,
                "spool recovery cut a torn tail"
            );
            let body = Body::SpoolRecovery(v1::SpoolRecovery {
                segment: t.segment.clone(),
                truncated_bytes: t.bytes,
                last_good_seq: rec.seq,
                detail: format!("cut at offset {}: {}", t.offset, t.why),
                saved_as: t.saved_as.clone().unwrap_or_default(),
            });
            out.push(rec.write_control(RecordKind::SpoolRecovery, body, now)?);
        }
        // Seqs lost in the middle of the spool (a deleted or cut segment): each gap
        // gets one signed loss record, the first time it is seen.
        for gap in unreported_gaps(&opts.spool_dir) {
            tracing::error!(
                from = gap.from,
                to = gap.to,
                why = gap.why,
                "records missing from the spool"
            );
            let body = Body::Loss(v1::Loss {
                reason: SPOOL_GAP.to_owned(),
                count: gap.to - gap.from + 1,
                unit: "record".to_owned(),
                origin: "agent".to_owned(),
                detail: format!(
                    "seqs {}..={} are missing from the spool: {}",
                    gap.from, gap.to, gap.why
                ),
            });
            out.push(rec.write_control(RecordKind::Loss, body, now)?);
        }
        // Records lost from the head of the spool, if the witness outside it saw more.
        if let Some(witness) = rec.head_witness.as_deref().and_then(head_witness::read)
            && retired.is_none()
            && let Some(detail) = head_witness::compare(witness, seq, &hash)
        {
            tracing::error!(detail, "records missing from the head of the spool");
            let body = Body::Loss(v1::Loss {
                reason: "spool_head_lost".to_owned(),
                count: witness.seq.saturating_sub(seq).max(1),
                unit: "record".to_owned(),
                origin: "agent".to_owned(),
                detail,
            });
            out.push(rec.write_control(RecordKind::Loss, body, now)?);
        }
        // Sign the head at once, so that a restart is visible and the tail before the
        // crash is covered.
        if let Some(cp) = rec.checkpoint(now)? {
            out.push(cp);
        }
        rec.spool.sync()?;
        rec.witness_head();
        Ok((rec, out))
    }

    /// Chains and stores one record (filling `sensor_id` and `time_unix_nano` if
    /// empty). Returns every record written: this one, and a checkpoint or `loss`
    /// record if one was due. When the spool is full the record is refused: it is not
    /// in the result, `stats().records_refused` counts it, and a `loss` record with
    /// reason `spool_full` says so (once when the episode starts, and with the count of
    /// further refusals when space is available again).
    pub fn append(&mut self, mut record: v1::Record) -> Result<Vec<Appended>, Error> {
        check_kind(&record)?;
        self.stamp_version(&mut record);
        if record.sensor_id.is_empty() {
            record.sensor_id.clone_from(&self.sensor_id);
        } else if record.sensor_id != self.sensor_id {
            return Err(Error::ForeignSensor {
                found: record.sensor_id,
                expected: self.sensor_id.clone(),
            });
        }
        if record.time_unix_nano == 0 {
            record.time_unix_nano = checkpoint::unix_nanos((self.clock)());
        }
        let mut out = Vec::with_capacity(1);
        if self.full_episode {
            self.end_full_episode(record.encoded_len(), &mut out)?;
            if self.full_episode {
                // Still full (or the reserve is not back): refused, counted, reported
                // when the episode closes.
                self.spool.note_refused();
                self.refused_unreported += 1;
                return Ok(out);
            }
        }
        match self.write(record, Class::Data) {
            Ok(a) => out.push(a),
            Err(Error::Spool(e)) if e.is_full() => {
                self.refused(&e, &mut out)?;
                return Ok(out);
            }
            Err(e) => return Err(e),
        }
        self.since_checkpoint += 1;
        if self.policy.due_by_count(self.since_checkpoint)
            && let Some(cp) = self.checkpoint((self.clock)())?
        {
            out.push(cp);
        }
        Ok(out)
    }

    /// Like [`Recorder::append`] for many records (e.g. one ring-buffer drain): chains
    /// them, adds the checkpoints that come due, and stores them all with a single
    /// `write(2)`. Falls back to one-by-one appends when the batch does not fit the
    /// current segment or the spool is (nearly) full, so the results are the same.
    pub fn append_batch(&mut self, records: Vec<v1::Record>) -> Result<Vec<Appended>, Error> {
        let now = (self.clock)();
        let now_nanos = checkpoint::unix_nanos(now);
        for r in &records {
            check_kind(r)?;
            if !r.sensor_id.is_empty() && r.sensor_id != self.sensor_id {
                return Err(Error::ForeignSensor {
                    found: r.sensor_id.clone(),
                    expected: self.sensor_id.clone(),
                });
            }
        }
        if self.full_episode {
            return self.append_each(records);
        }
        let mut out = Vec::with_capacity(records.len() + 1);
        let (mut seq, mut hash, mut since) = (self.seq, self.hash, self.since_checkpoint);
        // Which entries of `out` are checkpoints made here (dropped again on fallback).
        let mut made_here = Vec::with_capacity(records.len() + 1);
        // One chain step: the record's exact bytes linked after (seq, hash).
        let link =
            |seq: &mut u64, hash: &mut [u8; 32], record: v1::Record, out: &mut Vec<Appended>| {
                let record_bytes = record.encode_to_vec();
                let prev_hash = *hash;
                *seq += 1;
                *hash = record_hash(*seq, &prev_hash, &record_bytes);
                out.push(Appended {
                    seq: *seq,
                    prev_hash,
                    hash: *hash,
                    record,
                    record_bytes,
                });
            };
        for mut record in records {
            self.stamp_version(&mut record);
            if record.sensor_id.is_empty() {
                record.sensor_id.clone_from(&self.sensor_id);
            }
            if record.time_unix_nano == 0 {
                record.time_unix_nano = now_nanos;
            }
            link(&mut seq, &mut hash, record, &mut out);
            made_here.push(false);
            since += 1;
            if self.policy.due_by_count(since) {
                let mut record = checkpoint::checkpoint_record(
                    &self.key,
                    &self.sensor_id,
                    seq,
                    &hash,
                    now,
                    since,
                    self.policy.every,
                );
                self.stamp_version(&mut record);
                link(&mut seq, &mut hash, record, &mut out);
                made_here.push(true);
                since = 0;
            }
        }
        let frames: Vec<FrameRef<'_>> = out
            .iter()
            .map(|a| FrameRef {
                seq: a.seq,
                prev_hash: a.prev_hash,
                hash: a.hash,
                record: &a.record_bytes,
            })
            .collect();
        // A full file system is handled record by record (refusal, loss record).
        let stored = match self.spool.append_batch(&frames) {
            Ok(stored) => stored,
            Err(e) if e.is_full() => false,
            Err(e) => return Err(e.into()),
        };
        if stored {
            self.seq = seq;
            self.hash = hash;
            self.since_checkpoint = since;
            if made_here.contains(&true) {
                self.last_checkpoint = now;
            }
            return Ok(out);
        }
        let records = out
            .into_iter()
            .zip(made_here)
            .filter(|(_, made)| !made)
            .map(|(a, _)| a.record)
            .collect();
        self.append_each(records)
    }

    fn append_each(&mut self, records: Vec<v1::Record>) -> Result<Vec<Appended>, Error> {
        let mut out = Vec::with_capacity(records.len());
        for r in records {
            out.extend(self.append(r)?);
        }
        Ok(out)
    }

    /// Timer: writes a checkpoint if `checkpoint_every` has passed (even with no new
    /// records, so silence is visible), ends a "spool full" episode if there is room
    /// again, and runs group commit.
    pub fn tick(&mut self, now: SystemTime) -> Result<Vec<Appended>, Error> {
        let mut out = Vec::new();
        if self.full_episode {
            self.end_full_episode(0, &mut out)?;
        }
        if self.policy.due_by_time(self.last_checkpoint, now)
            && let Some(cp) = self.checkpoint(now)?
        {
            out.push(cp);
            if self.head_witness.is_some() {
                self.spool.sync()?;
                self.witness_head();
            }
        }
        self.spool.sync_if_due()?;
        Ok(out)
    }

    /// Writes the (durable) head to the witness file; a failure is logged, not fatal.
    fn witness_head(&self) {
        let Some(path) = &self.head_witness else {
            return;
        };
        let head = head_witness::Head {
            seq: self.seq,
            hash: self.hash,
        };
        if let Err(err) = head_witness::write(path, head) {
            tracing::warn!(path = %path.display(), "chain head witness: {err}");
        }
    }

    /// Writes a checkpoint now, so that a chain that stops (shutdown) ends on a
    /// signature rather than an unsigned tail. Nothing is written when the last
    /// record already is a checkpoint.
    pub fn checkpoint_now(&mut self) -> Result<Vec<Appended>, Error> {
        if self.since_checkpoint == 0 {
            return Ok(Vec::new());
        }
        Ok(self.checkpoint((self.clock)())?.into_iter().collect())
    }

    /// Forces everything written to stable storage (shutdown).
    pub fn sync(&mut self) -> Result<(), Error> {
        self.spool.sync()?;
        self.witness_head();
        Ok(())
    }

    /// The collector has stored everything up to `seq`.
    pub fn acknowledge(&mut self, seq: u64) -> Result<(), Error> {
        Ok(self.spool.acknowledge(seq)?)
    }

    /// Stored frames from `seq` on (streaming).
    pub fn read_from(&self, seq: u64) -> SpoolReader {
        self.spool.read_from(seq)
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    /// Whether `open` created the signing key (first start).
    pub fn key_created(&self) -> bool {
        self.key_created
    }

    /// Seq and hash of the last record written.
    pub fn head(&self) -> (u64, [u8; 32]) {
        (self.seq, self.hash)
    }

    pub fn stats(&self) -> SpoolStats {
        self.spool.stats()
    }

    /// Checkpoints not written because even the control reserve was full.
    pub fn checkpoints_skipped(&self) -> u64 {
        self.checkpoints_skipped
    }

    fn stamp_version(&self, record: &mut v1::Record) {
        if record.software_version.is_empty() {
            record.software_version.clone_from(&self.software_version);
        }
    }

    fn write(&mut self, mut record: v1::Record, class: Class) -> Result<Appended, Error> {
        self.stamp_version(&mut record);
        let record_bytes = record.encode_to_vec();
        let seq = self.seq + 1;
        let hash = record_hash(seq, &self.hash, &record_bytes);
        self.spool.append(
            &FrameRef {
                seq,
                prev_hash: self.hash,
                hash,
                record: &record_bytes,
            },
            class,
        )?;
        let prev_hash = std::mem::replace(&mut self.hash, hash);
        self.seq = seq;
        Ok(Appended {
            seq,
            prev_hash,
            hash,
            record,
            record_bytes,
        })
    }

    /// Writes a record of the recorder's own (recovery, damage found on start) at
    /// `now`, from the control reserve.
    fn write_control(
        &mut self,
        kind: RecordKind,
        body: Body,
        now: SystemTime,
    ) -> Result<Appended, Error> {
        let r = v1::Record {
            software_version: String::new(),
            kind: kind as i32,
            time_unix_nano: checkpoint::unix_nanos(now),
            sensor_id: self.sensor_id.clone(),
            site: String::new(),
            body: Some(body),
        };
        self.write(r, Class::Control)
    }

    /// Writes a checkpoint covering the head; None if even the control reserve is full.
    fn checkpoint(&mut self, now: SystemTime) -> Result<Option<Appended>, Error> {
        let r = checkpoint::checkpoint_record(
            &self.key,
            &self.sensor_id,
            self.seq,
            &self.hash,
            now,
            self.since_checkpoint,
            self.policy.every,
        );
        self.last_checkpoint = now;
        match self.write(r, Class::Control) {
            Ok(a) => {
                self.since_checkpoint = 0;
                Ok(Some(a))
            }
            Err(Error::Spool(e)) if e.is_full() => {
                self.checkpoints_skipped += 1;
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    fn loss_record(&self, count: u64, detail: String) -> v1::Record {
        v1::Record {
            software_version: String::new(),
            kind: RecordKind::Loss as i32,
            time_unix_nano: checkpoint::unix_nanos((self.clock)()),
            sensor_id: self.sensor_id.clone(),
            site: String::new(),
            body: Some(Body::Loss(v1::Loss {
                reason: "spool_full".to_owned(),
                count,
                unit: "record".to_owned(),
                origin: "agent".to_owned(),
                detail,
            })),
        }
    }

    fn refused(&mut self, why: &spool::Error, out: &mut Vec<Appended>) -> Result<(), Error> {
        self.spool.note_refused();
        self.refused_unreported += 1;
        if self.full_episode {
            return Ok(());
        }
        self.full_episode = true;
        tracing::error!(error = %why, "spool full: refusing records until acknowledged segments can be deleted");
        let r = self.loss_record(
            self.refused_unreported,
            format!("{why}; refusing new records until space is freed"),
        );
        match self.write(r, Class::Control) {
            Ok(a) => {
                self.refused_unreported = 0;
                out.push(a);
                Ok(())
            }
            Err(Error::Spool(e)) if e.is_full() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// If a record of `record_len` bytes fits again and the file-system reserve is
    /// back, writes the closing `loss` record and ends the episode. Without the reserve
    /// the episode stays open: the next one could not write its opening `loss` record.
    fn end_full_episode(
        &mut self,
        record_len: usize,
        out: &mut Vec<Appended>,
    ) -> Result<(), Error> {
        if !self.spool.has_room_for(record_len)? || !self.spool.restore_reserve() {
            return Ok(());
        }
        if self.refused_unreported > 0 {
            let r = self.loss_record(
                self.refused_unreported,
                "spool full episode ended: records refused since the last spool_full loss record"
                    .to_owned(),
            );
            match self.write(r, Class::Control) {
                Ok(a) => out.push(a),
                Err(Error::Spool(e)) if e.is_full() => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        self.refused_unreported = 0;
        // The closing record may have used the reserve.
        if !self.spool.restore_reserve() {
            return Ok(());
        }
        self.full_episode = false;
        tracing::info!("spool has room again");
        Ok(())
    }
}
