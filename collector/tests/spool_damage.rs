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

/// Gap declarations a sensor did not sign, or that do not fit the stored head or the
/// batch, are refused and leave the store as it was; a refused batch after a valid
/// declaration leaves the head where it was too; the valid one is stored once.
#[test]
fn gap_declarations_that_do_not_fit_are_refused_and_change_nothing() {
    use conduit_collector::store::{DECLARED_GAP, SensorStore};
    use conduit_evidence::chain::checkpoint::sign_batch;
    use conduit_evidence::chain::declared_gap::{DeclaredGap, GAPS_FILE};
    use conduit_evidence::chain::keys;
    use conduit_proto::v1::RejectCode;

    let tmp = tempfile::tempdir().expect("tempdir");
    let (spool, store) = (tmp.path().join("spool"), tmp.path().join("store"));
    let (mut rec, _) = Recorder::open(options(&spool)).expect("open");
    for i in 0..60 {
        rec.append(flow(i)).expect("append");
    }
    rec.sync().expect("sync");
    drop(rec);
    let key = keys::read_public_key(&spool.join(keys::PUB_FILE)).expect("pub");
    let signer = keys::load_signing_key(&spool.join(keys::KEY_FILE)).expect("key");
    let frames = spool_frames(&spool, 1);
    let batch = |frames: &[v1::Frame], gap: Option<&DeclaredGap>| {
        let last = frames.last().expect("frames");
        let hash: [u8; 32] = last.hash[..].try_into().expect("32");
        v1::Batch {
            frames: frames.to_vec(),
            signature: sign_batch(&signer, SENSOR, last.seq, &hash),
            gap: gap.map(DeclaredGap::to_proto),
        }
    };
    let mut st = SensorStore::open(&store, SENSOR, key, 1 << 20).expect("store");
    st.apply_batch(&batch(&frames[..10], None))
        .expect("seqs 1..=10");
    // Seqs 11..=20 are lost; the batch resumes at 21.
    let after = &frames[20..];
    let resume: [u8; 32] = after[0].prev_hash[..].try_into().expect("32");
    let other = ed25519_dalek::SigningKey::from_bytes(&[5; 32]);
    let refused = [
        (
            DeclaredGap::sign(&other, SENSOR, 11, 20, &resume, "forged"),
            RejectCode::BadSignature,
        ),
        (
            DeclaredGap::sign(&signer, SENSOR, 12, 20, &resume, "not after the head"),
            RejectCode::Gap,
        ),
        (
            DeclaredGap::sign(&signer, SENSOR, 11, 19, &resume, "not up to the batch"),
            RejectCode::BadLink,
        ),
        (
            DeclaredGap::sign(&signer, SENSOR, 11, 20, &[7; 32], "another hash"),
            RejectCode::BadLink,
        ),
    ];
    for (g, code) in &refused {
        let r = st.apply_batch(&batch(after, Some(g))).expect_err(&g.reason);
        assert_eq!(r.code, *code, "{}: {}", g.reason, r.message);
        assert_eq!(st.head().0, 10, "{}", g.reason);
    }
    assert!(!store.join(SENSOR).join(GAPS_FILE).exists());

    let valid = DeclaredGap::sign(&signer, SENSOR, 11, 20, &resume, "segment deleted");
    // A frame after the gap whose hash does not match: refused, the head stays.
    let mut broken = after.to_vec();
    broken[3].record = b"rewritten".to_vec().into();
    let r = st
        .apply_batch(&batch(&broken, Some(&valid)))
        .expect_err("bad hash");
    assert_eq!(r.code, RejectCode::BadHash, "{}", r.message);
    assert_eq!(st.head().0, 10);
    assert!(st.take_damage().is_empty());

    let applied = st.apply_batch(&batch(after, Some(&valid))).expect("valid");
    assert_eq!(applied.appended, after.len() as u64);
    assert_eq!(st.head().0, frames.last().expect("frames").seq);
    let damage = st.take_damage();
    assert_eq!(damage.len(), 1);
    assert_eq!(
        (damage[0].seq, damage[0].reason.as_str()),
        (11, DECLARED_GAP)
    );
    drop(st);
    let lines = std::fs::read_to_string(store.join(SENSOR).join(GAPS_FILE)).expect("declared");
    assert_eq!(lines.lines().count(), 1, "{lines}");
    let report = conduit_evidence::chain::verify::verify_dir(&store.join(SENSOR), None);
    assert!(report.ok(), "{report}");
    assert_eq!(report.declared_gaps.len(), 1, "{report}");
    assert_eq!(report.records, frames.len() as u64 - 10, "{report}");
}
