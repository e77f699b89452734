//! Tampering with a spool in every way verify-chain must catch, each asserting the
//! exact first bad sequence number. Also: torn-tail recovery at every byte offset.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use conduit_evidence::chain::verify::{KeySource, verify_dir};
use conduit_evidence::chain::{Recorder, RecorderOptions, keys, record_hash};
use conduit_evidence::spool::frame::{self, FrameRef};
use conduit_evidence::spool::{SyncPolicy, segment};
use conduit_proto::v1::{self, RecordKind, record::Body};
use prost::Message as _;

fn flow_record(i: u64) -> v1::Record {
    v1::Record {
        kind: RecordKind::FlowEnd as i32,
        body: Some(Body::Flow(v1::Flow {
            flow_id: i,
            source_ip: vec![10, 0, 0, 1],
            destination_ip: vec![192, 0, 2, 10],
            source_port: 40000 + (i % 1000) as u32,
            destination_port: 443,
            ip_protocol: 6,
            server_name: "api.openai.com".to_owned(),
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn opts(dir: &Path, sensor: &str) -> RecorderOptions {
    let mut o = RecorderOptions::new(dir, sensor);
    o.sync = SyncPolicy::OsOnly;
    o.checkpoint_every_records = 10;
    o.checkpoint_every = Duration::from_secs(3600);
    o
}

/// A spool with `n` flow records (plus restart and checkpoints), cleanly closed.
fn make_spool(dir: &Path, sensor: &str, n: u64) -> u64 {
    let (mut rec, _) = Recorder::open(opts(dir, sensor)).expect("open");
    for i in 0..n {
        rec.append(flow_record(i)).expect("append");
    }
    rec.sync().expect("sync");
    rec.head().0
}

/// (seq, prev_hash, hash, record bytes)
type Frame = (u64, [u8; 32], [u8; 32], Vec<u8>);

struct Frames {
    path: PathBuf,
    header: Vec<u8>,
    frames: Vec<Frame>,
}

/// Reads the single segment of `dir` into frames.
fn load(dir: &Path) -> Frames {
    let segs = segment::list(dir).expect("list");
    assert_eq!(segs.len(), 1, "test expects one segment");
    let path = segs[0].1.clone();
    let buf = fs::read(&path).expect("read");
    let scan = segment::scan(&buf).expect("scan");
    assert!(scan.bad.is_none());
    Frames {
        header: buf[..scan.header_len].to_vec(),
        frames: scan
            .frames
            .iter()
            .map(|(_, f)| (f.seq, f.prev_hash, f.hash, f.record.to_vec()))
            .collect(),
        path,
    }
}

impl Frames {
    fn idx(&self, seq: u64) -> usize {
        self.frames
            .iter()
            .position(|f| f.0 == seq)
            .expect("seq present")
    }
    fn store(&self) {
        let mut out = self.header.clone();
        for (seq, prev, hash, rec) in &self.frames {
            frame::encode_into(
                &FrameRef {
                    seq: *seq,
                    prev_hash: *prev,
                    hash: *hash,
                    record: rec,
                },
                &mut out,
            );
        }
        fs::write(&self.path, out).expect("write");
    }
    fn record(&self, seq: u64) -> v1::Record {
        v1::Record::decode(&self.frames[self.idx(seq)].3[..]).expect("decode")
    }
}

fn first_bad(dir: &Path) -> (u64, String) {
    let r = verify_dir(dir, None);
    let b = r
        .first_bad
        .clone()
        .unwrap_or_else(|| panic!("expected a break, got:\n{r}"));
    (b.seq, b.what)
}

fn fresh(n: u64) -> (tempfile::TempDir, u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let head = make_spool(dir.path(), "gw-01", n);
    (dir, head)
}

#[test]
fn clean_spool_verifies() {
    let (dir, head) = fresh(50);
    let r = verify_dir(dir.path(), None);
    assert!(r.ok(), "{r}");
    assert_eq!(r.records, head);
    assert_eq!(
        r.key_source,
        KeySource::SpoolFile(dir.path().join("signing.pub"))
    );
    // restart checkpoint + one per 10 records
    assert_eq!(r.checkpoints, 1 + 5);
    assert!(
        r.to_string()
            .contains(&format!("{head} records verified (6 checkpoints)")),
        "{r}"
    );
}

#[test]
fn flipped_bit_in_record_is_caught_by_crc() {
    let (dir, _) = fresh(30);
    let f = load(dir.path());
    let mut buf = fs::read(&f.path).expect("read");
    // Find seq 17's frame and flip a bit in its record bytes.
    let mut off = f.header.len();
    for (seq, _, _, rec) in &f.frames {
        let len = frame::encoded_len(rec.len());
        if *seq == 17 {
            buf[off + len - 1] ^= 0x10;
        }
        off += len;
    }
    fs::write(&f.path, buf).expect("write");
    let (seq, what) = first_bad(dir.path());
    assert_eq!(seq, 17, "{what}");
    assert!(what.contains("CRC"), "{what}");
}

#[test]
fn rewritten_record_with_valid_framing_is_caught_by_hash() {
    let (dir, _) = fresh(30);
    let mut f = load(dir.path());
    let i = f.idx(12);
    let mut r = f.record(12);
    if let Some(Body::Flow(fl)) = r.body.as_mut() {
        fl.destination_port = 8443;
    }
    f.frames[i].3 = r.encode_to_vec();
    f.store();
    let (seq, what) = first_bad(dir.path());
    assert_eq!(seq, 12, "{what}");
    assert!(what.contains("hash mismatch"), "{what}");
}

#[test]
fn rewritten_record_with_rehashed_chain_is_caught_by_checkpoint() {
    let (dir, _) = fresh(30);
    let mut f = load(dir.path());
    let i = f.idx(12);
    let mut r = f.record(12);
    if let Some(Body::Flow(fl)) = r.body.as_mut() {
        fl.destination_port = 8443;
    }
    f.frames[i].3 = r.encode_to_vec();
    // Recompute every hash after it, as a careful forger would.
    for j in i..f.frames.len() {
        let prev = if j == 0 { [0; 32] } else { f.frames[j - 1].2 };
        f.frames[j].1 = prev;
        f.frames[j].2 = record_hash(f.frames[j].0, &prev, &f.frames[j].3);
    }
    f.store();
    // The next checkpoint after seq 12 no longer covers the (new) hash before it.
    let next_cp = f.frames[i..]
        .iter()
        .find(|fr| {
            v1::Record::decode(&fr.3[..]).expect("decode").kind == RecordKind::Checkpoint as i32
        })
        .expect("a checkpoint follows")
        .0;
    let (seq, what) = first_bad(dir.path());
    assert_eq!(seq, next_cp, "{what}");
    assert!(what.contains("checkpoint covers"), "{what}");
}

#[test]
fn deleted_record_is_a_gap() {
    let (dir, _) = fresh(30);
    let mut f = load(dir.path());
    let i = f.idx(9);
    f.frames.remove(i);
    f.store();
    let (seq, what) = first_bad(dir.path());
    assert_eq!(seq, 9, "{what}");
    assert!(what.contains("missing"), "{what}");
}

#[test]
fn deleted_record_with_renumbered_tail_breaks_the_link() {
    let (dir, _) = fresh(30);
    let mut f = load(dir.path());
    let i = f.idx(9);
    f.frames.remove(i);
    for fr in &mut f.frames[i..] {
        fr.0 -= 1;
    }
    f.store();
    let (seq, what) = first_bad(dir.path());
    assert_eq!(seq, 9, "{what}");
}

#[test]
fn reordered_records() {
    let (dir, _) = fresh(30);
    let mut f = load(dir.path());
    let i = f.idx(14);
    f.frames.swap(i, i + 1);
    f.store();
    let (seq, what) = first_bad(dir.path());
    assert_eq!(seq, 14, "{what}");
}

#[test]
fn duplicated_record() {
    let (dir, _) = fresh(30);
    let mut f = load(dir.path());
    let i = f.idx(20);
    let dup = f.frames[i].clone();
    f.frames.insert(i + 1, dup);
    f.store();
    let (seq, what) = first_bad(dir.path());
    assert_eq!(seq, 21, "{what}");
    assert!(what.contains("again"), "{what}");
}

/// Replaces the signature of the checkpoint at or after `from`; returns its seq.
fn tamper_checkpoint(f: &mut Frames, from: u64, change: impl Fn(&mut v1::Checkpoint)) -> u64 {
    let start = f.idx(from);
    for j in start..f.frames.len() {
        let mut r = v1::Record::decode(&f.frames[j].3[..]).expect("decode");
        if let Some(Body::Checkpoint(cp)) = r.body.as_mut() {
            change(cp);
            f.frames[j].3 = r.encode_to_vec();
            let prev = f.frames[j].1;
            f.frames[j].2 = record_hash(f.frames[j].0, &prev, &f.frames[j].3);
            // Re-link the rest so that only the signature is wrong.
            for k in j + 1..f.frames.len() {
                let p = f.frames[k - 1].2;
                f.frames[k].1 = p;
                f.frames[k].2 = record_hash(f.frames[k].0, &p, &f.frames[k].3);
            }
            return f.frames[j].0;
        }
    }
    panic!("no checkpoint after {from}");
}

#[test]
fn forged_checkpoint_signature() {
    let (dir, _) = fresh(30);
    let mut f = load(dir.path());
    let cp = tamper_checkpoint(&mut f, 5, |cp| cp.signature[3] ^= 1);
    f.store();
    let (seq, what) = first_bad(dir.path());
    assert_eq!(seq, cp, "{what}");
    assert!(what.contains("signature does not verify"), "{what}");
}

#[test]
fn missing_checkpoint_signature() {
    let (dir, _) = fresh(30);
    let mut f = load(dir.path());
    let cp = tamper_checkpoint(&mut f, 5, |cp| cp.signature.clear());
    f.store();
    let (seq, what) = first_bad(dir.path());
    assert_eq!(seq, cp, "{what}");
}

#[test]
fn checkpoint_signed_by_another_key() {
    let (dir, _) = fresh(30);
    let mut f = load(dir.path());
    let other = ed25519_dalek::SigningKey::from_bytes(&[42; 32]);
    let sensor = f.record(1).sensor_id;
    let cp = tamper_checkpoint(&mut f, 5, |cp| {
        use ed25519_dalek::Signer as _;
        let hash: [u8; 32] = cp.hash.clone().try_into().expect("32");
        let msg = conduit_evidence::chain::checkpoint::signing_bytes(
            &sensor,
            cp.seq,
            &hash,
            cp.time_unix_nano,
        );
        cp.public_key = other.verifying_key().to_bytes().to_vec();
        cp.signature = other.sign(&msg).to_bytes().to_vec();
    });
    f.store();
    let (seq, what) = first_bad(dir.path());
    assert_eq!(seq, cp, "{what}");
    assert!(what.contains("another key"), "{what}");
}

#[test]
fn whole_spool_resigned_with_another_key_fails_against_pinned_key() {
    let (dir, _) = fresh(5);
    let pinned = keys::read_public_key(&dir.path().join("signing.pub")).expect("pub");
    // Replace the key files: a forger with write access to the spool directory.
    fs::remove_file(dir.path().join("signing.key")).expect("rm");
    fs::remove_file(dir.path().join("signing.pub")).expect("rm");
    let forged = tempfile::tempdir().expect("tempdir");
    make_spool(forged.path(), "gw-01", 5);
    for (_, p) in segment::list(dir.path()).expect("list") {
        fs::remove_file(p).expect("rm");
    }
    for (_, p) in segment::list(forged.path()).expect("list") {
        fs::copy(&p, dir.path().join(p.file_name().expect("name"))).expect("copy");
    }
    assert!(
        verify_dir(dir.path(), None).ok(),
        "self-consistent without a pinned key"
    );
    let r = verify_dir(dir.path(), Some(pinned));
    let b = r.first_bad.expect("must fail against the pinned key");
    assert_eq!(b.seq, 1, "{}", b.what);
    assert!(b.what.contains("another key"), "{}", b.what);
}

#[test]
fn spliced_from_another_sensor() {
    let (dir, _) = fresh(30);
    let other = tempfile::tempdir().expect("tempdir");
    make_spool(other.path(), "gw-02", 30);
    let mut f = load(dir.path());
    let g = load(other.path());
    // Same seq from the other sensor's chain, at the same position.
    let i = f.idx(16);
    f.frames[i] = g.frames[g.idx(16)].clone();
    f.store();
    let (seq, what) = first_bad(dir.path());
    assert_eq!(seq, 16, "{what}");
    assert!(what.contains("prev_hash does not link"), "{what}");
}

#[test]
fn spliced_and_relinked_from_another_sensor_is_caught_by_sensor_id() {
    let (dir, _) = fresh(30);
    let other = tempfile::tempdir().expect("tempdir");
    make_spool(other.path(), "gw-02", 30);
    let mut f = load(dir.path());
    let g = load(other.path());
    let i = f.idx(16);
    let mut fr = g.frames[g.idx(16)].clone();
    fr.1 = f.frames[i - 1].2;
    fr.2 = record_hash(fr.0, &fr.1, &fr.3);
    f.frames[i] = fr;
    f.store();
    let (seq, what) = first_bad(dir.path());
    assert_eq!(seq, 16, "{what}");
    assert!(what.contains("gw-02"), "{what}");
}

#[test]
fn segment_of_another_sensor_in_the_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut o = opts(dir.path(), "gw-01");
    o.segment_bytes = 2048;
    let (mut rec, _) = Recorder::open(o).expect("open");
    for i in 0..60 {
        rec.append(flow_record(i)).expect("append");
    }
    drop(rec);
    let segs = segment::list(dir.path()).expect("list");
    assert!(segs.len() >= 3);
    let (first, victim) = segs[1].clone();
    let mut buf = fs::read(&victim).expect("read");
    let (_, hl) = segment::decode_header(&buf).expect("header");
    let mut new = segment::encode_header("gw-02");
    new.extend_from_slice(&buf.split_off(hl));
    fs::write(&victim, new).expect("write");
    let (seq, what) = first_bad(dir.path());
    assert_eq!(seq, first, "{what}");
    assert!(what.contains("gw-02"), "{what}");
}

#[test]
fn unsigned_tail_is_a_warning() {
    let (dir, head) = fresh(25);
    let r = verify_dir(dir.path(), None);
    assert!(r.ok(), "{r}");
    // checkpoint after every 10 flow records: the last 5 are not covered yet
    assert_eq!(r.unsigned_tail, 5, "{r}");
    assert_eq!(r.last_seq, head);
    assert!(
        r.warnings.iter().any(|w| w.contains("unsigned tail")),
        "{r}"
    );
}

/// Torn tail: cut the file at every byte offset inside the last frame, reopen
/// (recovery), append, and verify.
#[test]
fn torn_tail_recovers_at_every_offset() {
    let base = tempfile::tempdir().expect("tempdir");
    make_spool(base.path(), "gw-01", 3);
    let f = load(base.path());
    let full = fs::read(&f.path).expect("read");
    let last_len = frame::encoded_len(f.frames.last().expect("frames").3.len());
    let last_good_seq = f.frames.last().expect("frames").0 - 1;
    for cut in (full.len() - last_len)..full.len() {
        let dir = tempfile::tempdir().expect("tempdir");
        for name in ["signing.key", "signing.pub"] {
            fs::copy(base.path().join(name), dir.path().join(name)).expect("copy key");
        }
        let seg = dir.path().join(f.path.file_name().expect("name"));
        fs::write(&seg, &full[..cut]).expect("write");
        let (mut rec, opened) = Recorder::open(opts(dir.path(), "gw-01")).expect("recover");
        let torn = (cut - (full.len() - last_len)) as u64;
        if torn > 0 {
            let rr = opened
                .iter()
                .find_map(|a| match &a.record.body {
                    Some(Body::SpoolRecovery(r)) => Some(r.clone()),
                    _ => None,
                })
                .unwrap_or_else(|| panic!("cut {cut}: no spool_recovery record"));
            assert_eq!(rr.truncated_bytes, torn, "cut {cut}");
            assert_eq!(rr.last_good_seq, last_good_seq, "cut {cut}");
            assert!(
                dir.path().join(&rr.saved_as).exists(),
                "cut {cut}: evidence kept"
            );
        } else {
            assert!(
                opened
                    .iter()
                    .all(|a| !matches!(a.record.body, Some(Body::SpoolRecovery(_))))
            );
        }
        assert_eq!(
            opened[0].seq,
            last_good_seq + 1,
            "cut {cut}: continues the chain"
        );
        rec.append(flow_record(99)).expect("append after recovery");
        drop(rec);
        let r = verify_dir(dir.path(), None);
        assert!(r.ok(), "cut {cut}: {r}");
    }
}

#[test]
fn batched_appends_rotate_and_verify() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut o = opts(dir.path(), "gw-01");
    o.segment_bytes = 4096;
    let (mut rec, opened) = Recorder::open(o).expect("open");
    let mut seqs: Vec<u64> = opened.iter().map(|a| a.seq).collect();
    for b in 0..20u64 {
        let batch = (0..37).map(|i| flow_record(b * 100 + i)).collect();
        seqs.extend(
            rec.append_batch(batch)
                .expect("batch")
                .iter()
                .map(|a| a.seq),
        );
        seqs.extend(
            rec.append(flow_record(9999))
                .expect("single")
                .iter()
                .map(|a| a.seq),
        );
    }
    drop(rec);
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "every seq returned once"
    );
    let r = verify_dir(dir.path(), None);
    assert!(r.ok(), "{r}");
    assert!(r.segments > 5, "{r}");
    // restart checkpoint + one per 10 non-checkpoint records (1 restart + 760 flows)
    assert_eq!(r.checkpoints, 1 + 76, "{r}");
}

#[test]
fn timed_checkpoint_even_without_records() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut o = opts(dir.path(), "gw-01");
    o.checkpoint_every = Duration::from_secs(10);
    let (mut rec, opened) = Recorder::open(o).expect("open");
    let is_cp =
        |a: &conduit_evidence::chain::Appended| a.record.kind == RecordKind::Checkpoint as i32;
    assert!(opened.last().is_some_and(is_cp), "checkpoint on open");
    let t0 = std::time::SystemTime::now();
    assert!(
        rec.tick(t0 + Duration::from_secs(5))
            .expect("tick")
            .is_empty()
    );
    let out = rec.tick(t0 + Duration::from_secs(11)).expect("tick");
    assert_eq!(out.len(), 1);
    assert!(is_cp(&out[0]));
    assert!(
        rec.tick(t0 + Duration::from_secs(12))
            .expect("tick")
            .is_empty()
    );
    assert_eq!(
        rec.tick(t0 + Duration::from_secs(22)).expect("tick").len(),
        1
    );
    drop(rec);
    let r = verify_dir(dir.path(), None);
    assert!(r.ok(), "{r}");
    assert_eq!(r.checkpoints, 3);
    assert_eq!(r.unsigned_tail, 0, "the last record is a checkpoint: {r}");
}

fn restart_reason(opened: &[conduit_evidence::chain::Appended]) -> Option<String> {
    opened.iter().find_map(|a| match &a.record.body {
        Some(Body::ChainRestart(c)) => Some(c.reason.clone()),
        _ => None,
    })
}

#[test]
fn chain_restart_reasons() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (rec, opened) = Recorder::open(opts(dir.path(), "gw-01")).expect("open");
    assert_eq!(opened[0].seq, 1);
    assert_eq!(restart_reason(&opened).as_deref(), Some("no_spool"));
    drop(rec);
    // Reopen: the chain continues, no restart.
    let (rec, opened) = Recorder::open(opts(dir.path(), "gw-01")).expect("reopen");
    assert_eq!(restart_reason(&opened), None);
    assert_eq!(opened[0].seq, 3);
    drop(rec);
    // Every segment unreadable: a new chain, saying why, with the old bytes kept.
    for (_, p) in segment::list(dir.path()).expect("list") {
        fs::write(&p, b"garbage").expect("write");
    }
    let (rec, opened) = Recorder::open(opts(dir.path(), "gw-01")).expect("open unreadable");
    assert_eq!(restart_reason(&opened).as_deref(), Some("spool_unreadable"));
    assert_eq!(opened[0].seq, 1);
    drop(rec);
    assert!(verify_dir(dir.path(), None).ok());
    assert!(fs::read_dir(dir.path()).expect("readdir").any(|e| {
        e.expect("entry")
            .file_name()
            .to_string_lossy()
            .contains(".torn-0")
    }));
}

#[test]
fn foreign_sensor_directory_is_refused_with_the_file_name() {
    let (dir, _) = fresh(3);
    let err = Recorder::open(opts(dir.path(), "gw-02"))
        .err()
        .expect("must refuse");
    let msg = err.to_string();
    assert!(
        msg.contains("seg-00000000000000000001.cspool") && msg.contains("gw-01"),
        "{msg}"
    );
}

#[test]
fn second_writer_and_reserved_kinds_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut rec, _) = Recorder::open(opts(dir.path(), "gw-01")).expect("open");
    let err = Recorder::open(opts(dir.path(), "gw-01"))
        .err()
        .expect("second writer must be refused");
    assert!(
        err.to_string().contains("in use by another process"),
        "{err}"
    );
    let forged = v1::Record {
        kind: RecordKind::Checkpoint as i32,
        ..Default::default()
    };
    assert!(rec.append(forged.clone()).is_err());
    assert!(rec.append_batch(vec![flow_record(1), forged]).is_err());
    assert_eq!(rec.head().0, 2, "nothing written");
}

/// Parses a segment with nothing but docs/spool-format.md, blake3, crc32c and
/// ed25519: the document and the code must agree.
#[test]
fn independent_parse_per_spec() {
    use ed25519_dalek::Verifier as _;
    let (dir, head) = fresh(12);
    let segs = segment::list(dir.path()).expect("list");
    let buf = fs::read(&segs[0].1).expect("read");
    assert_eq!(&buf[..8], b"CSPOOL\r\n");
    assert_eq!(u16::from_le_bytes([buf[8], buf[9]]), 1);
    let l = u16::from_le_bytes([buf[10], buf[11]]) as usize;
    assert_eq!(&buf[12..12 + l], b"gw-01");
    let crc = u32::from_le_bytes(buf[12 + l..16 + l].try_into().expect("4"));
    assert_eq!(crc, crc32c::crc32c(&buf[..12 + l]));
    let pk_hex = fs::read_to_string(dir.path().join("signing.pub")).expect("pub");
    let pk: [u8; 32] = hex::decode(pk_hex.trim())
        .expect("hex")
        .try_into()
        .expect("32");
    let vk = ed25519_dalek::VerifyingKey::from_bytes(&pk).expect("key");
    let mut off = 16 + l;
    let mut prev = [0u8; 32];
    let mut expect_seq = 1u64;
    let mut checkpoints = 0;
    while off < buf.len() {
        let n = u32::from_le_bytes(buf[off..off + 4].try_into().expect("4")) as usize;
        let crc = u32::from_le_bytes(buf[off + 4..off + 8].try_into().expect("4"));
        let mut c = buf[off..off + 4].to_vec();
        c.extend_from_slice(&buf[off + 8..off + 8 + n]);
        assert_eq!(crc, crc32c::crc32c(&c));
        let p = &buf[off + 8..off + 8 + n];
        let seq = u64::from_be_bytes(p[..8].try_into().expect("8"));
        assert_eq!(seq, expect_seq);
        assert_eq!(&p[8..40], &prev);
        let record = &p[72..];
        let mut input = p[..40].to_vec();
        input.extend_from_slice(record);
        let hash = blake3::derive_key("conduit-sensor record v1", &input);
        assert_eq!(&p[40..72], &hash);
        let r = v1::Record::decode(record).expect("record");
        if let Some(Body::Checkpoint(cp)) = &r.body {
            let mut msg = b"conduit-sensor checkpoint v1\0".to_vec();
            msg.extend_from_slice(&(r.sensor_id.len() as u16).to_be_bytes());
            msg.extend_from_slice(r.sensor_id.as_bytes());
            msg.extend_from_slice(&(seq - 1).to_be_bytes());
            msg.extend_from_slice(&prev);
            msg.extend_from_slice(&cp.time_unix_nano.to_be_bytes());
            let sig = ed25519_dalek::Signature::from_slice(&cp.signature).expect("sig");
            vk.verify(&msg, &sig)
                .expect("checkpoint signature per spec");
            checkpoints += 1;
        }
        if let Some(Body::ChainRestart(cr)) = &r.body {
            let mut msg = b"conduit-sensor checkpoint v1\0".to_vec();
            msg.extend_from_slice(&(r.sensor_id.len() as u16).to_be_bytes());
            msg.extend_from_slice(r.sensor_id.as_bytes());
            msg.extend_from_slice(&0u64.to_be_bytes());
            msg.extend_from_slice(&[0; 32]);
            msg.extend_from_slice(&r.time_unix_nano.to_be_bytes());
            let sig = ed25519_dalek::Signature::from_slice(&cr.signature).expect("sig");
            vk.verify(&msg, &sig).expect("restart signature per spec");
        }
        prev = hash;
        expect_seq += 1;
        off += 8 + n;
    }
    assert_eq!(expect_seq - 1, head);
    assert_eq!(checkpoints, 2);
}

#[test]
fn read_from_streams_stored_frames_across_segments() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut o = opts(dir.path(), "gw-01");
    o.segment_bytes = 2048;
    let (mut rec, mut all) = Recorder::open(o).expect("open");
    for i in 0..80 {
        all.extend(rec.append(flow_record(i)).expect("append"));
    }
    assert!(rec.stats().segments > 5);
    for from in [1, 2, 17, 40, all.len() as u64] {
        let got: Vec<_> = rec.read_from(from).collect::<Result<_, _>>().expect("read");
        let want: Vec<_> = all.iter().filter(|a| a.seq >= from).collect();
        assert_eq!(got.len(), want.len(), "from {from}");
        for (g, w) in got.iter().zip(want) {
            assert_eq!((g.seq, g.prev_hash, g.hash), (w.seq, w.prev_hash, w.hash));
            assert_eq!(g.record_bytes, w.record_bytes);
        }
    }
    assert_eq!(rec.read_from(all.len() as u64 + 1).count(), 0);
}
