//! Deleting the newest segment (issue 10, failure 12): the spool recovers cleanly
//! and seqs would be reused without a word. The head witnessed beside the spool
//! shows the loss, and the recorder writes a signed `loss` record about it.

use std::path::Path;

use conduit_evidence::chain::verify::verify_dir;
use conduit_evidence::chain::{Recorder, RecorderOptions, head_witness};
use conduit_evidence::spool::SyncPolicy;
use conduit_proto::v1::{self, RecordKind, record::Body};

fn options(dir: &Path) -> RecorderOptions {
    let mut o = RecorderOptions::new(dir, "gw-head");
    o.sync = SyncPolicy::OsOnly;
    // Small segments, so that the newest one can be deleted alone.
    o.segment_bytes = 4096;
    o.head_witness = head_witness::beside(dir);
    o
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

/// Segment files, oldest first (the spool's own listing).
fn segments(dir: &Path) -> Vec<std::path::PathBuf> {
    conduit_evidence::spool::segment::list(dir)
        .expect("list")
        .into_iter()
        .map(|(_, path)| path)
        .collect()
}

#[test]
fn a_deleted_newest_segment_is_recorded_as_lost() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let spool = tmp.path().join("spool");
    let (mut rec, _) = Recorder::open(options(&spool)).expect("open");
    for i in 0..200 {
        rec.append(flow(i)).expect("append");
    }
    rec.checkpoint_now().expect("checkpoint");
    rec.sync().expect("sync");
    let head = rec.head().0;
    drop(rec);
    let witness = head_witness::read(&tmp.path().join("spool.head")).expect("witness");
    assert_eq!(witness.seq, head);

    // A clean restart says nothing.
    let (rec, opened) = Recorder::open(options(&spool)).expect("open");
    assert!(
        opened
            .iter()
            .all(|a| a.record.kind != RecordKind::Loss as i32)
    );
    let head = rec.head().0;
    drop(rec);

    let segs = segments(&spool);
    assert!(segs.len() >= 3, "{segs:?}");
    std::fs::remove_file(segs.last().expect("newest")).expect("delete newest");
    let (rec, opened) = Recorder::open(options(&spool)).expect("open");
    let spool_head = opened[0].seq - 1;
    assert!(spool_head < head);
    let loss = opened
        .iter()
        .find_map(|a| match &a.record.body {
            Some(Body::Loss(l)) => Some(l.clone()),
            _ => None,
        })
        .expect("a loss record");
    assert_eq!(loss.reason, "spool_head_lost");
    assert_eq!(loss.unit, "record");
    assert_eq!(loss.count, head - spool_head);
    assert!(
        loss.detail
            .contains(&format!("records {}..={head} were deleted", spool_head + 1)),
        "{}",
        loss.detail
    );
    // It is covered by the checkpoint written on open, and the chain verifies.
    assert!(
        opened
            .iter()
            .any(|a| a.record.kind == RecordKind::Checkpoint as i32)
    );
    drop(rec);
    assert!(verify_dir(&spool, None).ok());
}
