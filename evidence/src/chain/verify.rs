//! `verify-chain`: checks a directory of segments (an agent spool or a collector store;
//! one directory holds one chain) frame by frame, link by link, signature by signature,
//! and reports the first break.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use conduit_proto::v1::{self, RecordKind, record::Body};
use prost::Message as _;

use super::anchor::{self, Anchor};
use super::checkpoint::{signing_bytes, verify_signature};
use super::cosignature::{self, Cosignature};
use super::declared_gap::{self, DeclaredGap};
use super::hashing::{ZERO_HASH, record_hash};
use super::keys;
use crate::spool::damage::Gap;
use crate::spool::{Entry, ReadError, SpoolReader};

/// Where the trusted public key came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// Passed by the caller (`--public-key FILE`).
    Given,
    /// `signing.pub` in the verified directory.
    SpoolFile(PathBuf),
    /// No key: signatures are checked against the key the first signed record names,
    /// and every later one must use the same key. Proves integrity, not origin.
    FirstInChain,
}

/// The first thing wrong, at the first sequence number where it shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Break {
    pub seq: u64,
    pub what: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub dir: PathBuf,
    pub sensor_id: Option<String>,
    pub key_source: KeySource,
    pub public_key: Option<[u8; 32]>,
    pub segments: u64,
    /// Records whose frame, seq, link and hash verified (checkpoints included).
    pub records: u64,
    /// Checkpoints whose signature verified.
    pub checkpoints: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    /// Seq of the last verified checkpoint (0: none).
    pub last_checkpoint_seq: u64,
    /// Records after the last checkpoint: not (yet) covered by a signature. A warning,
    /// not a break: a running agent always has such a tail.
    pub unsigned_tail: u64,
    pub first_bad: Option<Break>,
    pub warnings: Vec<String>,
    /// Witness cosignatures (`witness.cosig`) whose signature verifies and whose
    /// (seq, hash) is the chain's.
    pub cosignatures: u64,
    /// Cosignatures of seqs before the chain's first stored record (deleted after
    /// acknowledgement, or pruned): signature checked, the head no longer can be.
    pub cosignatures_before: u64,
    /// The witness key cosignatures must be by (`--witness-key`); None: each is
    /// checked against the key it names (integrity, not origin).
    pub witness_key: Option<[u8; 32]>,
    /// The newest witnessed head that matched: seq and the witness's time.
    pub last_witnessed: Option<(u64, i64)>,
    /// Ranges the sensor declared lost, signed by the chain's key
    /// ([`super::declared_gap`]): verified, but the chain is incomplete there.
    pub declared_gaps: Vec<Gap>,
}

impl Report {
    /// Nothing verified yet, with a given key.
    fn new(dir: &Path, public_key: Option<[u8; 32]>, witness_key: Option<[u8; 32]>) -> Report {
        Report {
            dir: dir.to_owned(),
            sensor_id: None,
            key_source: KeySource::Given,
            public_key,
            segments: 0,
            records: 0,
            checkpoints: 0,
            first_seq: 0,
            last_seq: 0,
            last_checkpoint_seq: 0,
            unsigned_tail: 0,
            first_bad: None,
            warnings: Vec::new(),
            cosignatures: 0,
            cosignatures_before: 0,
            witness_key,
            last_witnessed: None,
            declared_gaps: Vec::new(),
        }
    }

    pub fn ok(&self) -> bool {
        self.first_bad.is_none()
    }

    /// Verified, and no record is declared missing.
    pub fn complete(&self) -> bool {
        self.ok() && self.declared_gaps.is_empty()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.key_source {
            KeySource::Given => writeln!(f, "public key: given")?,
            KeySource::SpoolFile(p) => {
                writeln!(f, "public key: {} (from the directory)", p.display())?
            }
            KeySource::FirstInChain => writeln!(
                f,
                "public key: none given and no signing.pub; using the key in the chain (integrity only, not origin)"
            )?,
        }
        if let Some(k) = &self.public_key {
            writeln!(f, "public key hex: {}", hex::encode(k))?;
        }
        writeln!(
            f,
            "{} records verified ({} checkpoints) in {} segments, seq {}..{}",
            self.records, self.checkpoints, self.segments, self.first_seq, self.last_seq
        )?;
        let witnessed = self.cosignatures + self.cosignatures_before;
        if witnessed > 0 || self.witness_key.is_some() {
            match &self.witness_key {
                Some(k) => writeln!(f, "witness key hex: {}", hex::encode(k))?,
                None => writeln!(
                    f,
                    "witness key: not given (--witness-key); cosignatures checked against the key each names (integrity, not origin): present but unverified"
                )?,
            }
            write!(
                f,
                "{} witness cosignatures match the chain",
                self.cosignatures
            )?;
            if let Some((seq, t)) = self.last_witnessed {
                write!(
                    f,
                    "; last witnessed head: seq {seq} at {}",
                    crate::ecs::rfc3339(t)
                )?;
            }
            if self.cosignatures_before > 0 {
                write!(
                    f,
                    "; {} of seqs before the first stored record (signature checked)",
                    self.cosignatures_before
                )?;
            }
            writeln!(f)?;
        }
        for g in &self.declared_gaps {
            writeln!(
                f,
                "declared gap: seqs {}..={} are missing, declared lost by the sensor (signed by the chain's key): {}",
                g.from, g.to, g.why
            )?;
        }
        for w in &self.warnings {
            writeln!(f, "warning: {w}")?;
        }
        if let Some(b) = &self.first_bad {
            writeln!(f, "first bad sequence number: {}: {}", b.seq, b.what)?;
        }
        Ok(())
    }
}

struct State {
    report: Report,
    trusted: Option<[u8; 32]>,
    expected: Option<u64>,
    prev_hash: [u8; 32],
    sensor_id: Option<String>,
    /// Where retention pruned the chain: the first stored record links to it.
    anchor: Option<Anchor>,
    /// Witnessed heads by seq, checked as the walk reaches them.
    cosigs: BTreeMap<u64, Vec<Cosignature>>,
    /// Declared gaps by first missing seq, taken as the walk reaches them.
    declared: BTreeMap<u64, DeclaredGap>,
}

impl State {
    /// The anchor's checkpoint: signed by the sensor's key.
    fn check_anchor(&mut self) -> Result<(), Break> {
        let Some((seq, _, bytes)) = self.anchor.as_ref().and_then(|a| a.checkpoint.clone()) else {
            return Ok(());
        };
        let bad = |what: String| Break {
            seq,
            what: format!("retention anchor's checkpoint: {what}"),
        };
        let record = v1::Record::decode(&bytes[..]).map_err(|e| bad(e.to_string()))?;
        let Some(Body::Checkpoint(cp)) = &record.body else {
            return Err(bad("not a checkpoint".to_owned()));
        };
        let hash: [u8; 32] = cp.hash[..]
            .try_into()
            .map_err(|_| bad("hash is not 32 bytes".to_owned()))?;
        self.check_key(&cp.public_key, "checkpoint").map_err(bad)?;
        let msg = signing_bytes(&record.sensor_id, cp.seq, &hash, cp.time_unix_nano);
        verify_signature(&cp.public_key, &msg, &cp.signature).map_err(bad)
    }
    fn next_seq(&self) -> u64 {
        self.expected.unwrap_or(1)
    }

    /// The walk found `seq` (linking to `prev_hash`) where `expected` was due: fine
    /// only if the sensor declared exactly `expected..seq` lost, with its key, and
    /// `seq` links to the hash the declaration names.
    fn declared_step(
        &mut self,
        expected: u64,
        seq: u64,
        prev_hash: &[u8; 32],
    ) -> Option<Result<(), String>> {
        let g = self.declared.remove(&expected)?;
        let checked = (|| {
            if g.to + 1 != seq {
                return Err(format!(
                    "the sensor declared seqs {}..={} lost, but the chain resumes at seq {seq}",
                    g.from, g.to
                ));
            }
            let key = self.trusted.ok_or_else(|| {
                "a declared gap needs the chain's key (none given and no signing.pub)".to_owned()
            })?;
            let sensor = self.sensor_id.clone().unwrap_or_default();
            g.verify(&key, &sensor)
                .map_err(|e| format!("declared gap ({}): {e}", declared_gap::GAPS_FILE))?;
            if g.resume_prev_hash != *prev_hash {
                return Err(format!(
                    "seq {seq} does not link to the hash the declared gap {}..={} names",
                    g.from, g.to
                ));
            }
            Ok(())
        })();
        if checked.is_ok() {
            self.prev_hash = *prev_hash;
            self.report.declared_gaps.push(Gap {
                from: g.from,
                to: g.to,
                why: g.reason,
            });
        }
        Some(checked)
    }

    /// The break a read error is: at the seq that would have come next.
    fn read_break(&self, e: &ReadError) -> Break {
        let what = match e {
            ReadError::Header { path, error } => format!("segment {}: {error}", file_name(path)),
            ReadError::Frame {
                path,
                offset,
                error,
            } => format!(
                "segment {} offset {offset}: {error} (flipped bit, or torn tail not yet recovered)",
                file_name(path)
            ),
            e => e.to_string(),
        };
        Break {
            seq: self.next_seq(),
            what,
        }
    }

    /// Checks the key a signed record names against the trusted one (pinning it if none).
    fn check_key(&mut self, named: &[u8], what: &str) -> Result<(), String> {
        match self.trusted {
            Some(t) if t[..] == *named => Ok(()),
            Some(t) => Err(format!(
                "{what} signed by another key ({}), trusted key is {}",
                hex::encode(named),
                hex::encode(t)
            )),
            None => {
                let k: [u8; 32] = named
                    .try_into()
                    .map_err(|_| format!("{what} names a public key of {} bytes", named.len()))?;
                self.trusted = Some(k);
                self.report.public_key = Some(k);
                Ok(())
            }
        }
    }

    /// Checks one frame; Err is (bad seq, what).
    fn frame(
        &mut self,
        seq: u64,
        prev_hash: &[u8; 32],
        hash: &[u8; 32],
        bytes: &[u8],
    ) -> Result<(), Break> {
        let bad = |seq: u64, what: String| Break { seq, what };
        match self.expected {
            None if seq == 1 => {
                if *prev_hash != ZERO_HASH {
                    return Err(bad(1, "prev_hash of seq 1 is not all zero".to_owned()));
                }
            }
            None => match &self.anchor {
                Some(a) if seq == a.seq + 1 => {
                    if *prev_hash != a.hash {
                        return Err(bad(
                            seq,
                            format!(
                                "prev_hash does not link to the retention anchor (seq {}, hash {})",
                                a.seq,
                                hex::encode(a.hash)
                            ),
                        ));
                    }
                    self.prev_hash = *prev_hash;
                }
                Some(a) if seq > a.seq + 1 => {
                    return Err(bad(
                        a.seq + 1,
                        format!(
                            "missing: the chain resumes at seq {seq}, the retention anchor ends at seq {}",
                            a.seq
                        ),
                    ));
                }
                _ => match self.declared_step(1, seq, prev_hash) {
                    Some(checked) => checked.map_err(|what| bad(1, what))?,
                    None => {
                        self.report.warnings.push(format!(
                            "chain starts at seq {seq} (earlier segments deleted after acknowledgement?); the prev_hash of seq {seq} is not checked"
                        ));
                        self.prev_hash = *prev_hash;
                    }
                },
            },
            Some(exp) if seq == exp => {}
            Some(exp) if seq < exp => {
                return Err(bad(
                    exp,
                    format!(
                        "found seq {seq} again where {exp} was expected (duplicated or reordered record)"
                    ),
                ));
            }
            Some(exp) => match self.declared_step(exp, seq, prev_hash) {
                Some(checked) => checked.map_err(|what| bad(exp, what))?,
                None => {
                    return Err(bad(
                        exp,
                        format!(
                            "missing: found seq {seq} where {exp} was expected (deleted or reordered records)"
                        ),
                    ));
                }
            },
        }
        if *prev_hash != self.prev_hash {
            return Err(bad(
                seq,
                format!(
                    "prev_hash does not link to the hash of seq {} (record from another chain?)",
                    seq - 1
                ),
            ));
        }
        if let Some(a) = &self.anchor
            && seq == a.seq
            && *hash != a.hash
        {
            return Err(bad(
                seq,
                "hash differs from the retention anchor's".to_owned(),
            ));
        }
        if record_hash(seq, prev_hash, bytes) != *hash {
            return Err(bad(
                seq,
                "hash mismatch: the record bytes or seq were changed".to_owned(),
            ));
        }
        let record = v1::Record::decode(bytes)
            .map_err(|e| bad(seq, format!("record does not decode: {e}")))?;
        let sensor = self.sensor_id.clone().unwrap_or_default();
        if record.sensor_id != sensor {
            return Err(bad(
                seq,
                format!(
                    "record names sensor {:?}, this chain is sensor {sensor:?} (spliced from another sensor?)",
                    record.sensor_id
                ),
            ));
        }
        self.signed(seq, prev_hash, &record)
            .map_err(|what| bad(seq, what))?;
        if let Some(cosigs) = self.cosigs.remove(&seq) {
            for c in &cosigs {
                self.witnessed(c, hash).map_err(|what| bad(seq, what))?;
            }
        }
        self.report.records += 1;
        if self.report.records == 1 {
            self.report.first_seq = seq;
        }
        self.report.last_seq = seq;
        self.prev_hash = *hash;
        self.expected = Some(seq + 1);
        Ok(())
    }

    /// A cosignature's signature: by the given witness key, if one was given.
    fn cosignature_signed(&self, c: &Cosignature) -> Result<(), String> {
        if let Some(w) = self.report.witness_key
            && w != c.witness_key
        {
            return Err(format!(
                "the cosignature of seq {} is by key {}, the witness key is {}",
                c.seq,
                hex::encode(c.witness_key),
                hex::encode(w)
            ));
        }
        let sensor = self.sensor_id.clone().unwrap_or_default();
        c.verify(&sensor).map_err(|e| {
            format!(
                "the cosignature of seq {}: {e} ({} was changed?)",
                c.seq,
                cosignature::COSIG_FILE
            )
        })
    }

    /// A witnessed head the walk reached: signed, and the chain's own.
    fn witnessed(&mut self, c: &Cosignature, hash: &[u8; 32]) -> Result<(), String> {
        self.cosignature_signed(c)?;
        if c.hash != *hash {
            return Err(format!(
                "witnessed head rewritten: the collector (key {}) cosigned seq {} with hash {} at {}, the chain has hash {} there: the chain was changed after this head was witnessed",
                hex::encode(c.witness_key),
                c.seq,
                hex::encode(c.hash),
                crate::ecs::rfc3339(c.time_unix_nano),
                hex::encode(hash)
            ));
        }
        self.report.cosignatures += 1;
        if self.report.last_witnessed.is_none_or(|(s, _)| s <= c.seq) {
            self.report.last_witnessed = Some((c.seq, c.time_unix_nano));
        }
        Ok(())
    }

    /// After the walk: the cosignatures it did not reach.
    fn unreached_cosignatures(&mut self) -> Result<(), Break> {
        let cosigs = std::mem::take(&mut self.cosigs);
        for c in cosigs.values().flatten() {
            let bad = |what: String| Break { seq: c.seq, what };
            self.cosignature_signed(c).map_err(bad)?;
            if self.report.records > 0 && c.seq < self.report.first_seq {
                self.report.cosignatures_before += 1;
                continue;
            }
            return Err(bad(format!(
                "witnessed head missing: the collector (key {}) cosigned seq {} (hash {}) at {}, but the chain ends at seq {}: witnessed records were deleted or the chain was replaced",
                hex::encode(c.witness_key),
                c.seq,
                hex::encode(c.hash),
                crate::ecs::rfc3339(c.time_unix_nano),
                self.report.last_seq
            )));
        }
        Ok(())
    }

    /// Kind-specific checks: signatures of checkpoints and chain restarts.
    fn signed(
        &mut self,
        seq: u64,
        prev_hash: &[u8; 32],
        record: &v1::Record,
    ) -> Result<(), String> {
        let sensor = record.sensor_id.as_str();
        match (RecordKind::try_from(record.kind), &record.body) {
            (Ok(RecordKind::Checkpoint), Some(Body::Checkpoint(cp))) => {
                if cp.seq != seq - 1 || cp.hash != prev_hash[..] {
                    return Err(format!(
                        "checkpoint covers seq {} / hash {}, not the record before it (seq {})",
                        cp.seq,
                        hex::encode(&cp.hash),
                        seq - 1
                    ));
                }
                self.check_key(&cp.public_key, "checkpoint")?;
                let msg = signing_bytes(sensor, cp.seq, prev_hash, cp.time_unix_nano);
                verify_signature(&cp.public_key, &msg, &cp.signature)
                    .map_err(|e| format!("checkpoint: {e}"))?;
                self.report.checkpoints += 1;
                self.report.last_checkpoint_seq = seq;
            }
            (Ok(RecordKind::ChainRestart), Some(Body::ChainRestart(cr))) => {
                if seq != 1 {
                    return Err("chain_restart record in the middle of a chain".to_owned());
                }
                self.check_key(&cr.public_key, "chain_restart")?;
                let msg = signing_bytes(sensor, 0, &ZERO_HASH, record.time_unix_nano);
                verify_signature(&cr.public_key, &msg, &cr.signature)
                    .map_err(|e| format!("chain_restart: {e}"))?;
            }
            (Ok(RecordKind::Checkpoint | RecordKind::ChainRestart), _) => {
                return Err("kind and body do not match".to_owned());
            }
            _ => {}
        }
        Ok(())
    }
}

/// Verifies the chain in `dir`. Without `public_key`, `dir/signing.pub` is the trusted
/// key; without either, the key named by the chain's first signed record (reported).
/// Cosignatures in `dir/witness.cosig` are checked against the chain; their origin
/// only with [`verify_dir_witnessed`].
pub fn verify_dir(dir: &Path, public_key: Option<[u8; 32]>) -> Report {
    verify_dir_witnessed(dir, public_key, None)
}

/// [`verify_dir`], with every cosignature required to be by `witness_key` (the
/// collector's pinned public key).
pub fn verify_dir_witnessed(
    dir: &Path,
    public_key: Option<[u8; 32]>,
    witness_key: Option<[u8; 32]>,
) -> Report {
    let mut report = Report::new(dir, public_key, witness_key);
    if public_key.is_none() {
        let pub_path = dir.join(keys::PUB_FILE);
        if pub_path.exists() {
            report.key_source = KeySource::SpoolFile(pub_path.clone());
            match keys::read_public_key(&pub_path) {
                Ok(k) => report.public_key = Some(k),
                Err(e) => {
                    report.first_bad = Some(Break {
                        seq: 0,
                        what: e.to_string(),
                    });
                    return report;
                }
            }
        } else {
            report.key_source = KeySource::FirstInChain;
        }
    }
    let mut st = State {
        trusted: report.public_key,
        report,
        expected: None,
        prev_hash: ZERO_HASH,
        sensor_id: None,
        anchor: None,
        cosigs: BTreeMap::new(),
        declared: BTreeMap::new(),
    };
    match declared_gap::read(dir) {
        Ok(d) => st.declared = d,
        Err(what) => {
            st.report.first_bad = Some(Break { seq: 0, what });
            return st.report;
        }
    }
    match anchor::read(dir) {
        Ok(a) => st.anchor = a,
        Err(what) => {
            st.report.first_bad = Some(Break { seq: 0, what });
            return st.report;
        }
    }
    match cosignature::read(dir) {
        Ok(w) => {
            if w.torn_tail {
                st.report.warnings.push(format!(
                    "{}: the last line is incomplete (an append cut by a crash); not counted",
                    cosignature::COSIG_FILE
                ));
            }
            for c in w.cosignatures {
                st.cosigs.entry(c.seq).or_default().push(c);
            }
        }
        Err(what) => {
            st.report.first_bad = Some(Break { seq: 0, what });
            return st.report;
        }
    }
    if let Err(b) = st
        .check_anchor()
        .and_then(|()| walk(dir, &mut st))
        .and_then(|()| st.unreached_cosignatures())
    {
        st.report.first_bad = Some(b);
    }
    st.finish()
}

impl State {
    /// The report once the walk is over: declarations it did not reach, the unsigned
    /// tail, and the warnings about both.
    fn finish(mut self) -> Report {
        if self.report.first_bad.is_none() {
            // Declarations before the first stored record were pruned with their segments.
            let last = self.report.last_seq;
            for g in self.declared.values().filter(|g| g.from > last) {
                self.report.warnings.push(format!(
                    "declared gap {}..={} is not reached by the stored chain (its records after it not stored yet?)",
                    g.from, g.to
                ));
            }
        }
        let mut report = self.report;
        if report.first_bad.is_none() {
            report.unsigned_tail = report.last_seq
                - report
                    .last_checkpoint_seq
                    .max(report.first_seq.saturating_sub(1));
            if report.records > 0 && report.checkpoints == 0 {
                report
                    .warnings
                    .push("no checkpoint: no record is covered by a signature".to_owned());
            } else if report.unsigned_tail > 0 {
                report.warnings.push(format!(
                    "unsigned tail: {} records after the last checkpoint (seq {}) are not covered by a signature yet",
                    report.unsigned_tail, report.last_checkpoint_seq
                ));
            }
        }
        report.sensor_id = self.sensor_id;
        report
    }
}

/// Verifies one chain fed frame by frame, for chains kept outside a directory (NATS
/// JetStream): the checks of [`verify_dir`], with the chain's key given. `name` only
/// labels the report. Each unit of storage (a stream message) counts as a segment.
pub struct ChainVerifier {
    st: State,
}

impl ChainVerifier {
    pub fn new(name: &Path, sensor_id: &str, key: [u8; 32]) -> ChainVerifier {
        ChainVerifier {
            st: State {
                trusted: Some(key),
                report: Report::new(name, Some(key), None),
                expected: None,
                prev_hash: ZERO_HASH,
                sensor_id: Some(sensor_id.to_owned()),
                anchor: None,
                cosigs: BTreeMap::new(),
                declared: BTreeMap::new(),
            },
        }
    }

    /// Whether a break was found (later input is ignored).
    pub fn failed(&self) -> bool {
        self.st.report.first_bad.is_some()
    }

    /// The next unit of storage begins; `gap` is a declaration it carries, which the
    /// frames after it must match.
    pub fn segment(&mut self, gap: Option<DeclaredGap>) {
        self.st.report.segments += 1;
        if let Some(g) = gap {
            self.st.declared.insert(g.from, g);
        }
    }

    /// Checks the next frame; after the first break, nothing more is checked.
    pub fn frame(&mut self, seq: u64, prev_hash: &[u8; 32], hash: &[u8; 32], bytes: &[u8]) {
        if self.failed() {
            return;
        }
        if let Err(b) = self.st.frame(seq, prev_hash, hash, bytes) {
            self.st.report.first_bad = Some(b);
        }
    }

    /// Witness cosignatures of the chain, checked as the frames reach their seqs and,
    /// at [`ChainVerifier::finish`], for heads the chain never reached. Before the
    /// frames.
    pub fn cosignatures(&mut self, cosignatures: impl IntoIterator<Item = Cosignature>) {
        for c in cosignatures {
            self.st.cosigs.entry(c.seq).or_default().push(c);
        }
    }

    /// A break found outside the frames (storage that cannot be read or decoded).
    pub fn broken(&mut self, what: String) {
        if !self.failed() {
            let seq = self.st.next_seq();
            self.st.report.first_bad = Some(Break { seq, what });
        }
    }

    pub fn finish(mut self) -> Report {
        if !self.failed()
            && let Err(b) = self.st.unreached_cosignatures()
        {
            self.st.report.first_bad = Some(b);
        }
        self.st.finish()
    }
}

fn walk(dir: &Path, st: &mut State) -> Result<(), Break> {
    let mut reader = SpoolReader::all(dir);
    let mut name = String::new();
    // The name's first seq, until the segment's first frame is checked against it.
    let mut first = None;
    while let Some(entry) = reader.next_entry().map_err(|e| st.read_break(&e))? {
        match entry {
            Entry::Segment(seg) => {
                name = file_name(&seg.path);
                st.report.segments += 1;
                match &st.sensor_id {
                    None => st.sensor_id = Some(seg.sensor_id),
                    Some(id) if *id != seg.sensor_id => {
                        return Err(Break {
                            seq: st.next_seq(),
                            what: format!(
                                "segment {name} belongs to sensor {:?}, this chain is sensor {id:?}",
                                seg.sensor_id
                            ),
                        });
                    }
                    Some(_) => {}
                }
                first = Some(seg.first_seq);
            }
            Entry::Frame { offset, frame: f } => {
                st.frame(f.seq, &f.prev_hash, &f.hash, &f.record_bytes)?;
                if let Some(first) = first.take()
                    && f.seq != first
                {
                    return Err(Break {
                        seq: f.seq,
                        what: format!(
                            "segment {name} (offset {offset}) starts with seq {} but its name says {first}",
                            f.seq
                        ),
                    });
                }
            }
        }
    }
    if st.report.segments == 0 {
        return Err(Break {
            seq: 1,
            what: format!("no segment files (seg-*.cspool) in {}", dir.display()),
        });
    }
    Ok(())
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}
