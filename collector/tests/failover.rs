//! Sensor failover (issue 15, DESIGN "More contracts": `--collector` may be given
//! several times): the uplink sticks to the first collector, moves to the next when
//! its stream fails, resumes there from what that collector has stored, and moves on
//! again (back to the first, resuming from its position) when that one fails too.
//! Records the spool deleted after the first collector acknowledged them reach the
//! second as a signed gap declaration: its chain verifies, incomplete.

mod common;

use std::time::Duration;

use common::*;
use conduit_evidence::chain::{Recorder, RecorderOptions};
use conduit_evidence::spool::SyncPolicy;

const SENSOR: &str = "gw-failover";

/// Appends `n` flow records in 16 KiB segments; returns the head seq.
fn append(spool: &std::path::Path, n: u64) -> u64 {
    let mut o = RecorderOptions::new(spool, SENSOR);
    o.sync = SyncPolicy::OsOnly;
    o.segment_bytes = 16 * 1024;
    let (mut rec, _) = Recorder::open(o).expect("recorder");
    for i in 0..n {
        rec.append(flow(i)).expect("append");
    }
    rec.sync().expect("sync");
    rec.head().0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_uplink_sticks_to_one_collector_and_fails_over_to_the_next() {
    init_tracing();
    let tmp = tempfile::tempdir().expect("tempdir");
    let spool = tmp.path().join("spool");
    let (store_a, store_b) = (tmp.path().join("store-a"), tmp.path().join("store-b"));
    let mut a = Collector::start(&store_a, &tmp.path().join("a.log"), &["--tofu"]);
    let mut b = Collector::start(&store_b, &tmp.path().join("b.log"), &["--tofu"]);
    let head = append(&spool, 300);

    let mut opts = uplink_opts(&a.url("http"), SENSOR);
    opts.collectors.push(b.url("http"));
    let mut up = Uplink::start(opts, &spool);
    up.wait_acked(head, Duration::from_secs(60)).await;
    assert_eq!(up.status.borrow().collector, a.url("http"));
    assert_eq!(verified_records(&store_a.join(SENSOR)), head);
    assert!(
        !store_b.join(SENSOR).exists(),
        "the second collector was used while the first one worked"
    );

    // The first collector dies (SIGKILL) while the sensor records on, and the oldest
    // segment goes as the agent deletes acknowledged ones: the uplink moves to the
    // second, which has stored nothing; it gets the rest of the chain, and the
    // deleted records as a declared gap that names their acknowledgement.
    let acked_by_a = head;
    a.kill();
    let segs = conduit_evidence::spool::segment::list(&spool).expect("segments");
    assert!(segs.len() >= 2, "{segs:?}");
    std::fs::remove_file(&segs[0].1).expect("delete the oldest segment");
    let deleted = segs[1].0 - 1;
    let head = append(&spool, 200);
    up.wait_acked(head, Duration::from_secs(60)).await;
    assert_eq!(up.status.borrow().collector, b.url("http"));
    let report = conduit_evidence::chain::verify::verify_dir(&store_b.join(SENSOR), None);
    assert!(report.ok(), "{report}");
    assert_eq!(report.records, head - deleted, "{report}");
    assert_eq!(report.declared_gaps.len(), 1, "{report}");
    let gap = &report.declared_gaps[0];
    assert_eq!((gap.from, gap.to), (1, deleted), "{report}");
    assert!(
        gap.why
            .starts_with(&format!("acknowledged earlier (up to seq {acked_by_a})")),
        "{}",
        gap.why
    );

    // The first one is back, the second dies: the uplink returns to the first, which
    // resumes after what it had stored, and its chain is whole again.
    a.restart();
    b.kill();
    let head = append(&spool, 100);
    up.wait_acked(head, Duration::from_secs(60)).await;
    assert_eq!(up.status.borrow().collector, a.url("http"));
    assert_eq!(verified_records(&store_a.join(SENSOR)), head);
    assert!(
        up.status.borrow().reconnects >= 2,
        "{:?}",
        *up.status.borrow()
    );
    up.stop().await;
}
