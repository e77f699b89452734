//! A sensor whose spool lost a middle segment after the collector stored it (issue
//! 10, failure 9): the restarted sensor names the gap in a signed `spool_gap` loss
//! record, the uplink goes on from the collector's position, and the collector raises
//! a `sensor_spool_damage` alarm for it.

mod common;

use std::path::Path;
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
    let alarm = wait_alarm(&c, "sensor_spool_damage", "spool_gap: seqs ").await;
    assert_eq!(alarm.sensor_id, SENSOR);
    assert!(
        alarm.detail.starts_with("spool_gap: seqs "),
        "{}",
        alarm.detail
    );
    assert!(alarm.seq > head, "{}", alarm.seq);
    assert_eq!(verified_records(&store.join(SENSOR)), new_head);
    // The auditor's report over that time: verified, but incomplete, the loss named.
    let (code, text) = report_last_hour(&store, &tmp.path().join("report.html"));
    assert_eq!(code, Some(3), "{text}");
    assert!(
        text.contains("records lost from the sensor's spool (spool_gap)"),
        "{text}"
    );
}

/// `conduit-collector report` over the last hour: exit code and what it printed.
fn report_last_hour(store: &Path, html: &Path) -> (Option<i32>, String) {
    let now = std::time::SystemTime::now();
    let t = |d: std::time::SystemTime| {
        conduit_evidence::ecs::rfc3339(conduit_evidence::chain::checkpoint::unix_nanos(d))
    };
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_conduit-collector"))
        .args(["report", "--store"])
        .arg(store)
        .args([
            "--since",
            &t(now - Duration::from_secs(3600)),
            "--until",
            &t(now),
            "--out",
        ])
        .arg(html)
        .output()
        .expect("report");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Waits for the first alarm of `kind` whose detail starts with `detail` in the
/// collector's alarm chain.
async fn wait_alarm(c: &Collector, kind: &str, detail: &str) -> v1::Alarm {
    let find = || {
        alarms(&c.store)
            .into_iter()
            .find(|a| a.kind == kind && a.detail.starts_with(detail))
    };
    let what = format!("a {kind} alarm {detail:?}");
    wait_until(
        &what,
        Duration::from_secs(10),
        || find().is_some(),
        || c.log_text(),
    )
    .await;
    find().expect("found")
}

/// Failure 9, the link side: a middle segment lost before the collector stored it.
/// The uplink declares the gap (signed), streams on past it, and the collector keeps
/// the declaration, raises the alarm, exports what follows, and its verify and report
/// say "verified but incomplete" (exit 3) naming the seqs; a changed declaration is a
/// break (exit 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_lost_before_the_collector_stored_them_are_declared_and_streamed_past() {
    init_tracing();
    let tmp = tempfile::tempdir().expect("tempdir");
    let spool = tmp.path().join("spool");
    let store = tmp.path().join("store");
    let jsonl = tmp.path().join("export.jsonl");
    let (mut rec, _) = Recorder::open(options(&spool)).expect("open");
    for i in 0..400 {
        rec.append(flow(i)).expect("append");
    }
    rec.sync().expect("sync");
    drop(rec);
    let segs = conduit_evidence::spool::segment::list(&spool).expect("list");
    assert!(segs.len() >= 3, "{segs:?}");
    let (from, to) = (segs[1].0, segs[2].0 - 1);
    std::fs::remove_file(&segs[1].1).expect("delete");
    let (mut rec, _) = Recorder::open(options(&spool)).expect("reopen past the damage");
    rec.append(flow(1000)).expect("recording goes on");
    rec.sync().expect("sync");
    let head = rec.head().0;
    drop(rec);

    let c = Collector::start(
        &store,
        &tmp.path().join("collector.log"),
        &["--tofu", "--jsonl", &jsonl.display().to_string()],
    );
    let mut up = Uplink::start(uplink_opts(&c.url("http"), SENSOR), &spool);
    up.wait_acked(head, Duration::from_secs(60)).await;
    up.stop().await;

    let declared = format!("declared_gap: seqs {from}..={to} declared lost by the sensor: ");
    let alarm = wait_alarm(&c, "sensor_spool_damage", &declared).await;
    assert_eq!(alarm.seq, from, "{}", alarm.detail);
    let report = conduit_evidence::chain::verify::verify_dir(&store.join(SENSOR), None);
    assert!(report.ok(), "{report}");
    assert_eq!(report.records, head - (to - from + 1), "{report}");
    assert_eq!(report.declared_gaps.len(), 1, "{report}");
    assert_eq!(
        (report.declared_gaps[0].from, report.declared_gaps[0].to),
        (from, to)
    );

    let (code, text) = collector_verify(&store);
    assert_eq!(code, Some(3), "{text}");
    assert!(
        text.contains(&format!("declared gap: seqs {from}..={to} are missing")),
        "{text}"
    );
    let (code, text) = report_last_hour(&store, &tmp.path().join("report.html"));
    assert_eq!(code, Some(3), "{text}");
    assert!(
        text.contains(&format!("records seq {from}..={to} lost")),
        "{text}"
    );

    // The export steps over the gap too: the head record reaches the SIEM.
    let exported = |seq: u64| {
        std::fs::read_to_string(&jsonl)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .any(|v| v["event"]["sequence"].as_u64() == Some(seq))
    };
    let what = format!("seq {head} exported");
    wait_until(
        &what,
        Duration::from_secs(20),
        || exported(head),
        || c.log_text(),
    )
    .await;
    assert!(!exported(from), "a declared-lost seq was exported");

    // A declaration changed after the fact (a wider range) no longer verifies.
    let file = store.join(SENSOR).join("gaps.declared");
    let text = std::fs::read_to_string(&file).expect("declaration");
    std::fs::write(
        &file,
        text.replace(
            &format!("\"from\":{from}"),
            &format!("\"from\":{}", from - 1),
        ),
    )
    .expect("rewrite");
    let (code, text) = collector_verify(&store);
    assert_eq!(code, Some(1), "{text}");
}
