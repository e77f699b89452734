//! A swapped signing key (issue 10, failure 13): the recorder checks its key against
//! the key the spool's chain is signed with, and on a mismatch does not continue that
//! chain: the old chain is moved aside intact and a new one starts with a signed
//! `chain_restart` (reason `key_mismatch`) that says so.

use std::path::Path;

use conduit_evidence::chain::verify::verify_dir;
use conduit_evidence::chain::{Recorder, RecorderOptions, keygen};
use conduit_evidence::spool::{SpoolReader, SyncPolicy};
use conduit_proto::v1::{self, RecordKind, record::Body};
use prost::Message as _;

fn open(dir: &Path) -> (Recorder, Vec<conduit_evidence::chain::Appended>) {
    let mut o = RecorderOptions::new(dir, "gw-swap");
    o.sync = SyncPolicy::OsOnly;
    Recorder::open(o).expect("open")
}

fn flow(i: u64) -> v1::Record {
    v1::Record {
        kind: RecordKind::FlowStart as i32,
        body: Some(Body::Flow(v1::Flow {
            flow_id: i,
            ..Default::default()
        })),
        ..Default::default()
    }
}

#[test]
fn a_swapped_key_starts_a_new_chain_with_a_signed_key_mismatch_restart() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let spool = tmp.path().join("spool");
    let (mut rec, _) = open(&spool);
    let old_key = rec.public_key();
    for i in 0..20 {
        rec.append(flow(i)).expect("append");
    }
    rec.checkpoint_now().expect("checkpoint");
    rec.sync().expect("sync");
    let old_head = rec.head().0;
    drop(rec);

    // Same key again: the chain continues.
    let (rec, opened) = open(&spool);
    assert!(
        opened
            .iter()
            .all(|a| a.record.kind != RecordKind::ChainRestart as i32)
    );
    assert!(rec.head().0 > old_head);
    let old_head = rec.head().0;
    drop(rec);

    // Swap signing.key for another key.
    let other = tmp.path().join("other");
    keygen(&other).expect("keygen");
    std::fs::copy(other.join("signing.key"), spool.join("signing.key")).expect("swap");
    let (rec, opened) = open(&spool);
    assert_ne!(rec.public_key(), old_key);
    let first = &opened[0];
    assert_eq!(first.seq, 1, "the new chain starts at 1");
    let Some(Body::ChainRestart(cr)) = &first.record.body else {
        panic!("first record is not a chain_restart: {:?}", first.record);
    };
    assert_eq!(cr.reason, "key_mismatch");
    assert!(cr.detail.contains(&hex::encode(old_key)), "{}", cr.detail);
    assert!(
        cr.detail.contains(&format!("seq {old_head}")),
        "{}",
        cr.detail
    );
    drop(rec);

    // The new chain verifies with the new signing.pub; the old one, moved aside with
    // its own signing.pub, still verifies whole.
    let report = verify_dir(&spool, None);
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.first_seq, 1);
    let retired: Vec<_> = std::fs::read_dir(&spool)
        .expect("dir")
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| p.is_dir())
        .collect();
    assert_eq!(retired.len(), 1, "{retired:?}");
    let old = verify_dir(&retired[0], None);
    assert!(old.ok(), "{old:?}");
    assert_eq!(old.last_seq, old_head);
    assert_eq!(old.public_key, Some(old_key));
    // The new chain holds no frame of the old one.
    let mut reader = SpoolReader::all(&spool);
    let mut n = 0;
    while let Some(f) = reader.next_frame().expect("read") {
        let r = v1::Record::decode(f.record_bytes.as_slice()).expect("decode");
        assert!(
            !matches!(r.body, Some(Body::Flow(_))),
            "old flow in the new chain"
        );
        n += 1;
    }
    assert!(n >= 2);
}
