//! Witness cosignatures in a chain directory: verify-chain checks each against the
//! chain and, with a witness key, its origin. A forged cosignature, a chain that ends
//! before a witnessed head and a head rewritten after it was witnessed all fail, at
//! the witnessed seq.

use std::path::Path;
use std::time::Duration;

use conduit_evidence::chain::cosignature::{self, COSIG_FILE, Cosignature};
use conduit_evidence::chain::verify::{verify_dir, verify_dir_witnessed};
use conduit_evidence::chain::{Appended, Recorder, RecorderOptions};
use conduit_evidence::spool::{SpoolReader, SyncPolicy};
use conduit_proto::v1::{self, RecordKind, record::Body};
use ed25519_dalek::SigningKey;

const SENSOR: &str = "gw-witness";

fn flow(i: u64) -> v1::Record {
    v1::Record {
        kind: RecordKind::FlowStart as i32,
        body: Some(Body::Flow(v1::Flow {
            flow_id: i,
            source_ip: vec![10, 0, 0, 1],
            destination_ip: vec![192, 0, 2, 10],
            destination_port: 443,
            ip_protocol: 6,
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// A spool with 40 flows and a checkpoint every 10 records; returns the checkpoints
/// (seq, hash).
fn spool(dir: &Path) -> Vec<(u64, [u8; 32])> {
    let mut o = RecorderOptions::new(dir, SENSOR);
    o.sync = SyncPolicy::OsOnly;
    o.checkpoint_every_records = 10;
    o.checkpoint_every = Duration::from_secs(3600);
    let (mut rec, mut all) = Recorder::open(o).expect("open");
    for i in 0..40 {
        all.extend(rec.append(flow(i)).expect("append"));
    }
    rec.sync().expect("sync");
    all.iter()
        .filter(|a: &&Appended| a.record.kind == RecordKind::Checkpoint as i32)
        .map(|a| (a.seq, a.hash))
        .collect()
}

fn witness() -> SigningKey {
    SigningKey::from_bytes(&[42; 32])
}

fn cosign(dir: &Path, key: &SigningKey, seq: u64, hash: [u8; 32]) -> Cosignature {
    let c = Cosignature::sign(
        key,
        SENSOR,
        seq,
        &hash,
        1_764_000_000_000_000_000 + seq as i64,
    );
    cosignature::append(dir, &c).expect("append");
    c
}

#[test]
fn matching_cosignatures_verify_and_are_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cps = spool(dir.path());
    assert!(cps.len() >= 4, "{cps:?}");
    for (seq, hash) in &cps[..3] {
        cosign(dir.path(), &witness(), *seq, *hash);
    }
    let key = witness().verifying_key().to_bytes();
    let r = verify_dir_witnessed(dir.path(), None, Some(key));
    assert!(r.ok(), "{r}");
    assert_eq!(r.cosignatures, 3);
    assert_eq!(r.last_witnessed.map(|w| w.0), Some(cps[2].0));
    assert!(
        r.to_string()
            .contains("3 witness cosignatures match the chain"),
        "{r}"
    );
    // Without the witness key: present, checked against the chain, origin unverified.
    let r = verify_dir(dir.path(), None);
    assert!(r.ok(), "{r}");
    assert!(r.to_string().contains("present but unverified"), "{r}");
}

#[test]
fn a_cosignature_by_another_key_fails_against_the_witness_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cps = spool(dir.path());
    let forger = SigningKey::from_bytes(&[7; 32]);
    cosign(dir.path(), &forger, cps[1].0, cps[1].1);
    let r = verify_dir_witnessed(dir.path(), None, Some(witness().verifying_key().to_bytes()));
    let b = r.first_bad.expect("must fail");
    assert_eq!(b.seq, cps[1].0);
    assert!(b.what.contains("the witness key is"), "{}", b.what);
}

#[test]
fn a_forged_cosignature_signature_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cps = spool(dir.path());
    let mut c = Cosignature::sign(&witness(), SENSOR, cps[0].0, &cps[0].1, 5);
    c.signature[10] ^= 1;
    cosignature::append(dir.path(), &c).expect("append");
    let r = verify_dir(dir.path(), None);
    let b = r.first_bad.expect("must fail");
    assert_eq!(b.seq, cps[0].0);
    assert!(b.what.contains("signature does not verify"), "{}", b.what);
    // A cosignature for another sensor does not verify for this one either.
    let dir = tempfile::tempdir().expect("tempdir");
    let cps = spool(dir.path());
    let other = Cosignature::sign(&witness(), "gw-other", cps[0].0, &cps[0].1, 5);
    cosignature::append(dir.path(), &other).expect("append");
    assert_eq!(
        verify_dir(dir.path(), None).first_bad.map(|b| b.seq),
        Some(cps[0].0)
    );
}

#[test]
fn a_witnessed_head_with_another_hash_is_a_rewrite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cps = spool(dir.path());
    // What a witness saw of a different history at that seq.
    cosign(dir.path(), &witness(), cps[2].0, [0xaa; 32]);
    let r = verify_dir_witnessed(dir.path(), None, Some(witness().verifying_key().to_bytes()));
    let b = r.first_bad.expect("must fail");
    assert_eq!(b.seq, cps[2].0);
    assert!(b.what.contains("witnessed head rewritten"), "{}", b.what);
}

#[test]
fn a_chain_that_ends_before_a_witnessed_head_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cps = spool(dir.path());
    let last = SpoolReader::all(dir.path())
        .filter_map(Result::ok)
        .last()
        .expect("frames")
        .seq;
    cosign(dir.path(), &witness(), last + 5, [1; 32]);
    let r = verify_dir(dir.path(), None);
    let b = r.first_bad.expect("must fail");
    assert_eq!(b.seq, last + 5);
    assert!(b.what.contains("witnessed head missing"), "{}", b.what);
    assert!(
        b.what.contains(&format!("the chain ends at seq {last}")),
        "{}",
        b.what
    );
    let _ = cps;
}

#[test]
fn a_torn_last_line_is_a_warning_and_a_bad_line_a_break() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cps = spool(dir.path());
    let c = cosign(dir.path(), &witness(), cps[0].0, cps[0].1);
    let path = dir.path().join(COSIG_FILE);
    let text = std::fs::read_to_string(&path).expect("read");
    std::fs::write(&path, format!("{text}{}", &c.to_line()[..30])).expect("write");
    let r = verify_dir(dir.path(), None);
    assert!(r.ok(), "{r}");
    assert_eq!(r.cosignatures, 1);
    assert!(r.warnings.iter().any(|w| w.contains("incomplete")), "{r}");
    std::fs::write(&path, format!("{text}v1 not a cosignature\n")).expect("write");
    let r = verify_dir(dir.path(), None);
    let b = r.first_bad.expect("must fail");
    assert!(b.what.contains("line 2"), "{}", b.what);
}
