//! A sensor whose spool lost a middle segment after the collector stored it (issue
//! 10, failure 9): the restarted sensor names the gap in a signed `spool_gap` loss
//! record, the uplink goes on from the collector's position, and the collector raises
//! a `sensor_spool_damage` alarm for it.

mod common;

use std::time::Duration;

use common::*;
use conduit_evidence::chain::{Recorder, RecorderOptions};
use conduit_evidence::spool::{SpoolReader, SyncPolicy};
use conduit_proto::v1;
use prost::Message as _;

const SENSOR: &str = "gw-damaged";

fn options(dir: &std::path::Path) -> RecorderOptions {
    let mut o = RecorderOptions::new(dir, SENSOR);
    o.sync = SyncPolicy::OsOnly;
    o.segment_bytes = 16 * 1024;
    o
}

fn alarms(store: &std::path::Path) -> Vec<v1::Alarm> {
    SpoolReader::new(store.join("_collector"), 1)
        .filter_map(|f| v1::Record::decode(&f.ok()?.record_bytes[..]).ok())
        .filter_map(|r| match r.body {
            Some(v1::record::Body::Alarm(a)) => Some(a),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_middle_segment_is_named_by_the_sensor_and_alarmed_by_the_collector() {
    init_tracing();
    let tmp = tempfile::tempdir().expect("tempdir");
    let spool = tmp.path().join("spool");
    let store = tmp.path().join("store");
    let (mut rec, _) = Recorder::open(options(&spool)).expect("open");
    for i in 0..400 {
        rec.append(flow(i)).expect("append");
    }
    rec.sync().expect("sync");
    let head = rec.head().0;
    drop(rec);

    let c = Collector::start(&store, &tmp.path().join("collector.log"), &["--tofu"]);
    let mut up = Uplink::start(uplink_opts(&c.url("http"), SENSOR), &spool);
    up.wait_acked(head, Duration::from_secs(60)).await;
    up.stop().await;

    // A middle segment goes; the sensor restarts and names the gap.
    let segs = conduit_evidence::spool::segment::list(&spool).expect("list");
    assert!(segs.len() >= 3, "{segs:?}");
    std::fs::remove_file(&segs[1].1).expect("delete");
    let (mut rec, opened) = Recorder::open(options(&spool)).expect("reopen past the damage");
    assert!(
        opened.iter().any(|a| matches!(&a.record.body,
            Some(v1::record::Body::Loss(l)) if l.reason == "spool_gap")),
        "no spool_gap record"
    );
    rec.append(flow(1000)).expect("recording goes on");
    rec.sync().expect("sync");
    let new_head = rec.head().0;
    drop(rec);

    let mut up = Uplink::start(uplink_opts(&c.url("http"), SENSOR), &spool);
    up.wait_acked(new_head, Duration::from_secs(60)).await;
    up.stop().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let alarm = loop {
        if let Some(a) = alarms(&store)
            .into_iter()
            .find(|a| a.kind == "sensor_spool_damage")
        {
            break a;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no sensor_spool_damage alarm; log:\n{}",
            c.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(alarm.sensor_id, SENSOR);
    assert!(
        alarm.detail.starts_with("spool_gap: seqs "),
        "{}",
        alarm.detail
    );
    assert!(alarm.seq > head, "{}", alarm.seq);
    assert_eq!(verified_records(&store.join(SENSOR)), new_head);
    // The auditor's report over that time: verified, but incomplete, the loss named.
    let html = tmp.path().join("report.html");
    let now = std::time::SystemTime::now();
    let t = |d: std::time::SystemTime| {
        conduit_evidence::ecs::rfc3339(conduit_evidence::chain::checkpoint::unix_nanos(d))
    };
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_conduit-collector"))
        .args(["report", "--store"])
        .arg(&store)
        .args([
            "--since",
            &t(now - Duration::from_secs(3600)),
            "--until",
            &t(now),
            "--out",
        ])
        .arg(&html)
        .output()
        .expect("report");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{text}");
    assert!(
        text.contains("records lost from the sensor's spool (spool_gap)"),
        "{text}"
    );
}
