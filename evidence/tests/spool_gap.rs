//! A spool with a deleted or cut middle segment (issue 10, failure 9, the sensor's
//! start): the recorder reads past the damage, names each gap once in a signed
//! `loss` record (reason `spool_gap`: which seqs are missing and why), and goes on
//! recording.

use std::path::Path;

use conduit_evidence::chain::{Recorder, RecorderOptions, SPOOL_GAP};
use conduit_evidence::spool::SyncPolicy;
use conduit_evidence::spool::damage::read_past_damage;
use conduit_proto::v1::{self, RecordKind, record::Body};

fn options(dir: &Path) -> RecorderOptions {
    let mut o = RecorderOptions::new(dir, "gw-gap");
    o.sync = SyncPolicy::OsOnly;
    o.segment_bytes = 4096;
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

fn segments(dir: &Path) -> Vec<(u64, std::path::PathBuf)> {
    conduit_evidence::spool::segment::list(dir).expect("list")
}

fn gap_losses(opened: &[conduit_evidence::chain::Appended]) -> Vec<v1::Loss> {
    opened
        .iter()
        .filter_map(|a| match &a.record.body {
            Some(Body::Loss(l)) if l.reason == SPOOL_GAP => Some(l.clone()),
            _ => None,
        })
        .collect()
}

fn filled(dir: &Path) -> u64 {
    let (mut rec, _) = Recorder::open(options(dir)).expect("open");
    for i in 0..300 {
        rec.append(flow(i)).expect("append");
    }
    rec.sync().expect("sync");
    rec.head().0
}

#[test]
fn a_deleted_middle_segment_is_named_once_and_recording_goes_on() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let spool = tmp.path().join("spool");
    let head = filled(&spool);
    let segs = segments(&spool);
    assert!(segs.len() >= 4, "{segs:?}");
    let (from, _) = segs[1];
    let (next, _) = segs[2];
    std::fs::remove_file(&segs[1].1).expect("delete a middle segment");

    let (mut rec, opened) = Recorder::open(options(&spool)).expect("open past the damage");
    let losses = gap_losses(&opened);
    assert_eq!(losses.len(), 1, "{losses:?}");
    assert_eq!(losses[0].count, next - from);
    assert!(
        losses[0]
            .detail
            .starts_with(&format!("seqs {from}..={} are missing", next - 1)),
        "{}",
        losses[0].detail
    );
    assert!(rec.head().0 > head, "the chain goes on at its head");
    rec.append(flow(1000)).expect("recording goes on");
    rec.sync().expect("sync");
    drop(rec);

    // Every readable frame is there, and the gap is the only one.
    let mut frames = 0;
    let gaps = read_past_damage(&spool, |_| frames += 1).expect("read");
    assert_eq!(gaps.len(), 1);
    assert!(frames > 0);

    // Named once: the next start does not repeat it.
    let (_, again) = Recorder::open(options(&spool)).expect("reopen");
    assert!(gap_losses(&again).is_empty());
}

#[test]
fn a_cut_middle_segment_is_named_with_where_it_broke() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let spool = tmp.path().join("spool");
    filled(&spool);
    let segs = segments(&spool);
    let (_, path) = &segs[1];
    let len = std::fs::metadata(path).expect("meta").len();
    // Mid-frame: the segment's tail is unreadable.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("seg");
    f.set_len(len / 2 + 3).expect("truncate");
    drop(f);

    let (_, opened) = Recorder::open(options(&spool)).expect("open past the damage");
    let losses = gap_losses(&opened);
    assert_eq!(losses.len(), 1, "{losses:?}");
    assert!(
        losses[0].detail.contains("are missing from the spool"),
        "{}",
        losses[0].detail
    );
    assert!(losses[0].count > 0);
}
