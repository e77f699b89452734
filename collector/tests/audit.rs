//! The auditor's tools on a real store: a sensor chain with a timeline the test sets
//! (heartbeats every 10 s, a 30 s silence), streamed to a real collector with its
//! JSON-lines export. `query` agrees with the export; `report` is verified and
//! complete before the silence (exit 0), names the gap over it (exit 3), and names
//! the first bad seq of a tampered store (exit 1); headless Chromium prints it.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime};

use common::*;
use conduit_evidence::chain::checkpoint::unix_nanos;
use conduit_proto::v1::{self, RecordKind, record::Body};

const SENSOR: &str = "gw-01";

fn collector(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_conduit-collector"))
        .args(args)
        .output()
        .expect("run conduit-collector")
}

fn rfc(t: SystemTime) -> String {
    conduit_evidence::ecs::rfc3339(unix_nanos(t))
}

/// Writes the timeline: one record a second from `t0` for 60 s with a heartbeat
/// (`tick`) each second, then nothing for 30 s, then 30 s more; a violation at
/// t0+5 s and an authorized flow at t0+7 s. Returns the head seq.
fn write_timeline(spool: &Path, t0: SystemTime) -> u64 {
    let mut rec = recorder(spool, SENSOR);
    let at = |s: u64| t0 + Duration::from_secs(s);
    let flow = |i: u64, verdict: v1::Verdict, conduit: &str| {
        let mut r = flow(i);
        r.kind = RecordKind::FlowEnd as i32;
        if let Some(Body::Flow(f)) = &mut r.body {
            f.verdict = verdict as i32;
            f.conduit_id = conduit.to_owned();
            f.source = Some(v1::Counts {
                bytes: 1000 + i,
                packets: 3,
            });
        }
        r
    };
    for s in (0..60).chain(90..120) {
        rec.tick(at(s)).expect("tick");
        let mut r = match s {
            5 => flow(s, v1::Verdict::Violation, ""),
            7 => {
                // Its ServerHello was read: a post-quantum TLS 1.3 handshake.
                let mut r = flow(s, v1::Verdict::Authorized, "cell1-copilot");
                if let Some(Body::Flow(f)) = &mut r.body {
                    f.tls_version = "1.3".to_owned();
                    f.tls_cipher = "TLS_AES_128_GCM_SHA256".to_owned();
                    f.tls_curve = "X25519MLKEM768".to_owned();
                    f.pq_negotiated = true;
                }
                r
            }
            _ => {
                let mut r = flow(s, v1::Verdict::Unclassified, "");
                r.kind = RecordKind::FlowUpdate as i32;
                r
            }
        };
        r.time_unix_nano = unix_nanos(at(s)) + 500_000_000;
        rec.append(r).expect("append");
        if s == 55 {
            // The violation of second 5 ends here, after the first report's window:
            // what its handshake negotiated (TLS 1.2) still reaches that report.
            let mut r = flow(5, v1::Verdict::Violation, "");
            if let Some(Body::Flow(f)) = &mut r.body {
                f.tls_version = "1.2".to_owned();
                f.tls_cipher = "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256".to_owned();
            }
            r.time_unix_nano = unix_nanos(at(s)) + 600_000_000;
            rec.append(r).expect("append");
        }
    }
    rec.tick(at(121)).expect("tick");
    rec.tick(at(135)).expect("tick");
    rec.sync().expect("sync");
    rec.head().0
}

fn summary(html: &str) -> serde_json::Value {
    let start = html
        .find(r#"<script type="application/json" id="summary">"#)
        .expect("summary element");
    let rest = &html[start..];
    let json =
        &rest[rest.find('>').expect("test step") + 1..rest.find("</script>").expect("test step")];
    serde_json::from_str(json).expect("summary is JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_agrees_with_the_export_and_the_report_proves_the_window() {
    init_tracing();
    let tmp = tempfile::tempdir().expect("test step");
    let (spool, store) = (tmp.path().join("spool"), tmp.path().join("store"));
    let export = tmp.path().join("export.jsonl");
    // The timeline starts an hour ahead so the recorder's own start-up records
    // (written at the real time) stay out of every window.
    let t0 = SystemTime::now() + Duration::from_secs(3600);
    let head = write_timeline(&spool, t0);
    let c = Collector::start(
        &store,
        &tmp.path().join("collector.log"),
        &["--tofu", "--jsonl", export.to_str().expect("test step")],
    );
    let mut up = Uplink::start(uplink_opts(&c.url("http"), SENSOR), &spool);
    up.wait_acked(head, Duration::from_secs(30)).await;
    up.stop().await;
    // The export is written behind the store: wait for the head to be in it.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let exported = loop {
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(&export)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("test step"))
            .filter(|v: &serde_json::Value| v["observer"]["id"] == SENSOR)
            .collect();
        if lines.iter().any(|v| v["event"]["sequence"] == head) {
            break lines;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "export did not reach seq {head}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let store_s = store.to_str().expect("test step");
    let (since, until) = (t0 + Duration::from_secs(10), t0 + Duration::from_secs(40));

    // query: the window, as the export shows it.
    let out = collector(&[
        "query",
        "--store",
        store_s,
        "--sensor",
        SENSOR,
        "--since",
        &rfc(since),
        "--until",
        &rfc(until),
        "--stats",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .expect("test step")
        .lines()
        .map(|l| serde_json::from_str(l).expect("test step"))
        .collect();
    let window = |v: &serde_json::Value| {
        let t = v["@timestamp"].as_str().expect("test step").to_owned();
        t >= rfc(since) && t < rfc(until)
    };
    let want: Vec<serde_json::Value> = exported.iter().filter(|v| window(v)).cloned().collect();
    assert!(want.len() >= 30, "{} records in the window", want.len());
    assert_eq!(got, want, "query and export differ");
    // Narrow filters.
    let out = collector(&["query", "--store", store_s, "--verdict", "violation"]);
    let lines = String::from_utf8(out.stdout).expect("test step");
    // The violation of second 5 and its end at second 55: one flow, two records.
    assert_eq!(lines.lines().count(), 2, "{lines}");
    assert!(
        lines
            .lines()
            .all(|l| l.contains(r#""verdict":"violation""#) && l.contains(r#""flow_id":5,"#)),
        "{lines}"
    );
    let out = collector(&[
        "query",
        "--store",
        store_s,
        "--conduit",
        "cell1-copilot",
        "--format",
        "table",
    ]);
    let lines = String::from_utf8(out.stdout).expect("test step");
    assert_eq!(lines.lines().count(), 1, "{lines}");
    assert!(
        lines.contains("authorized") && lines.contains("10.10.1.5"),
        "{lines}"
    );
    let out = collector(&[
        "query",
        "--store",
        store_s,
        "--action",
        "checkpoint",
        "--src-ip",
        "10.10.1.5",
    ]);
    assert!(out.status.success() && out.stdout.is_empty());
    assert_eq!(
        collector(&["query", "--store", "/nonexistent"])
            .status
            .code(),
        Some(2)
    );
    assert_eq!(
        collector(&["query", "--store", store_s, "--since", "yesterday"])
            .status
            .code(),
        Some(2)
    );

    // report: before the silence, verified and complete.
    let html = tmp.path().join("ok.html");
    let pdf = tmp.path().join("ok.pdf");
    let mut args = vec!["report", "--store", store_s, "--since"];
    let (s0, u0) = (
        rfc(t0 + Duration::from_secs(2)),
        rfc(t0 + Duration::from_secs(50)),
    );
    args.extend([
        s0.as_str(),
        "--until",
        u0.as_str(),
        "--out",
        html.to_str().expect("test step"),
    ]);
    let chromium = has_binary("chromium");
    if chromium {
        args.extend(["--pdf", pdf.to_str().expect("test step")]);
    } else {
        println!("SKIP PDF: chromium not installed");
    }
    let out = collector(&args);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ok_html = std::fs::read_to_string(&html).expect("test step");
    let s = summary(&ok_html);
    assert_eq!(
        (s["verified"].as_bool(), s["complete"].as_bool()),
        (Some(true), Some(true)),
        "{s}"
    );
    assert_eq!(s["violations"], 1);
    assert_eq!(s["blocked"], 0);
    assert_eq!(s["loss"], 0);
    let sensor = &s["sensors"][0];
    assert_eq!(sensor["id"], SENSOR);
    assert!(sensor["gaps"].as_array().expect("test step").is_empty());
    assert!(
        sensor["records"].as_u64().expect("test step") >= 48 + 4,
        "{sensor}"
    );
    assert!(
        sensor["checkpoints"].as_u64().expect("test step") >= 4,
        "{sensor}"
    );
    assert!(
        sensor["first_seq"].as_u64().expect("test step")
            < sensor["last_seq"].as_u64().expect("test step")
    );
    // The crypto section: per conduit, what the handshakes negotiated.
    let crypto = s["crypto"].as_array().expect("crypto rows");
    assert!(
        crypto.contains(&serde_json::json!({
            "conduit": "cell1-copilot", "version": "1.3", "cipher": "TLS_AES_128_GCM_SHA256",
            "curve": "X25519MLKEM768", "pq_negotiated": true, "flows": 1,
        })),
        "{crypto:?}"
    );
    assert!(
        crypto
            .iter()
            .any(|c| c["conduit"] == "(no conduit) openai" && c["pq_negotiated"].is_null()),
        "{crypto:?}"
    );
    assert!(
        crypto.contains(&serde_json::json!({
            "conduit": "(no conduit) openai", "version": "1.2",
            "cipher": "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256", "curve": "",
            "pq_negotiated": false, "flows": 1,
        })),
        "{crypto:?}"
    );
    assert!(ok_html.contains("Cryptography per conduit") && ok_html.contains("X25519MLKEM768"));
    assert!(ok_html.contains("VERIFIED AND COMPLETE"));
    assert!(ok_html.contains("SR 3.9") && ok_html.contains("Art. 23"));

    // Over the silence: verified, incomplete, the gap named.
    let gap_html = tmp.path().join("gap.html");
    let (s1, u1) = (
        rfc(t0 + Duration::from_secs(40)),
        rfc(t0 + Duration::from_secs(110)),
    );
    let out = collector(&[
        "report",
        "--store",
        store_s,
        "--since",
        &s1,
        "--until",
        &u1,
        "--out",
        gap_html.to_str().expect("test step"),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{text}");
    let s = summary(&std::fs::read_to_string(&gap_html).expect("test step"));
    assert_eq!(
        (s["verified"].as_bool(), s["complete"].as_bool()),
        (Some(true), Some(false)),
        "{s}"
    );
    let gaps = s["sensors"][0]["gaps"].as_array().expect("test step");
    assert_eq!(gaps.len(), 1, "{gaps:?}");
    assert!(
        gaps[0]["reason"]
            .as_str()
            .expect("test step")
            .starts_with("silence"),
        "{gaps:?}"
    );
    let secs = gaps[0]["seconds"].as_f64().expect("test step");
    // Heartbeats at 0, 10, .., 50 s, then the next at 90 s.
    assert!((39.0..=41.0).contains(&secs), "{gaps:?}");
    assert!(text.contains("gap"), "{text}");

    // The browser renders it: PDF text and a screenshot with the verdict's colour.
    if chromium {
        let py = "import pypdf,sys; r=pypdf.PdfReader(sys.argv[1]); print(len(r.pages)); print(''.join(p.extract_text() for p in r.pages))";
        let out = Command::new("python3")
            .args(["-c", py])
            .arg(&pdf)
            .output()
            .expect("test step");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("VERIFIED AND COMPLETE"), "{text}");
        assert!(text.contains(SENSOR) && text.contains("SR 2.8"), "{text}");
        for (page, colour) in [(&html, [0xd8, 0xf0, 0xd8]), (&gap_html, [0xff, 0xf1, 0xc8])] {
            let png = page.with_extension("png");
            let st = Command::new("chromium")
                .args([
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--hide-scrollbars",
                    "--window-size=1200,900",
                ])
                .arg(format!("--screenshot={}", png.display()))
                .arg(format!("file://{}", page.display()))
                .output()
                .expect("test step");
            assert!(png.exists(), "{}", String::from_utf8_lossy(&st.stderr));
            let decoder = png::Decoder::new(std::io::BufReader::new(
                std::fs::File::open(&png).expect("test step"),
            ));
            let mut reader = decoder.read_info().expect("test step");
            let mut buf = vec![0; reader.output_buffer_size().expect("test step")];
            let info = reader.next_frame(&mut buf).expect("test step");
            let px = info.color_type.samples();
            let hits = buf[..info.buffer_size()]
                .chunks(px)
                .filter(|p| p[..3] == colour)
                .count();
            assert!(
                hits > 1000,
                "{}: {hits} pixels of the verdict colour",
                png.display()
            );
        }
    }

    // A flipped byte in the middle of the stored chain: exit 1, the first bad seq named.
    let seg = conduit_evidence::spool::segment::list(&store.join(SENSOR)).expect("test step")[0]
        .1
        .clone();
    let mut bytes = std::fs::read(&seg).expect("test step");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&seg, bytes).expect("test step");
    let out = collector(&[
        "report",
        "--store",
        store_s,
        "--since",
        &s0,
        "--until",
        &u0,
        "--out",
        html.to_str().expect("test step"),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("first bad sequence number"), "{text}");
    let s = summary(&std::fs::read_to_string(&html).expect("test step"));
    assert_eq!(s["verified"], false);
    assert!(
        s["sensors"][0]["first_bad_seq"]
            .as_u64()
            .expect("test step")
            > 1
    );
}

static CLOCK_BEHIND_SECS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The recorder's clock in the retention test: the real time, minus an offset the test sets.
fn test_clock() -> SystemTime {
    SystemTime::now()
        - Duration::from_secs(CLOCK_BEHIND_SECS.load(std::sync::atomic::Ordering::Relaxed))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_prunes_old_exported_segments_and_the_rest_still_verifies() {
    use conduit_evidence::chain::anchor;
    use conduit_evidence::chain::verify::verify_dir;
    use std::sync::atomic::Ordering;
    init_tracing();
    let tmp = tempfile::tempdir().expect("tempdir");
    let (spool, store) = (tmp.path().join("spool"), tmp.path().join("store"));
    let export = tmp.path().join("export.jsonl");
    // 2000 records three days old (over many small segments), then 300 of today.
    CLOCK_BEHIND_SECS.store(3 * 86_400, Ordering::Relaxed);
    let mut opts = conduit_evidence::chain::RecorderOptions::new(&spool, SENSOR);
    opts.segment_bytes = 64 << 10;
    opts.sync = conduit_evidence::spool::SyncPolicy::OsOnly;
    opts.clock = test_clock;
    let mut rec = conduit_evidence::chain::Recorder::open(opts)
        .expect("recorder")
        .0;
    for i in 0..2000 {
        rec.append(flow(i)).expect("append");
    }
    rec.checkpoint_now().expect("checkpoint");
    CLOCK_BEHIND_SECS.store(0, Ordering::Relaxed);
    for i in 2000..2300 {
        rec.append(flow(i)).expect("append");
    }
    rec.checkpoint_now().expect("checkpoint");
    rec.sync().expect("sync");
    let head = rec.head().0;

    let export_s = export.to_str().expect("utf8");
    let mut c = Collector::start(
        &store,
        &tmp.path().join("c1.log"),
        &[
            "--tofu",
            "--jsonl",
            export_s,
            "--store-segment-bytes",
            "65536",
        ],
    );
    let mut up = Uplink::start(uplink_opts(&c.url("http"), SENSOR), &spool);
    up.wait_acked(head, Duration::from_secs(30)).await;
    up.stop().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&export)
        .unwrap_or_default()
        .contains(&format!(r#""sequence":{head}"#))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "export did not reach {head}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The export cursor is saved right after the lines: wait for it, since
    // retention keeps what the cursor has not passed.
    let cursor = store.join("exports").join("jsonl.cursor");
    while !std::fs::read_to_string(&cursor)
        .unwrap_or_default()
        .lines()
        .any(|l| l == format!("{SENSOR} {head}"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the export cursor did not reach {head}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    c.kill();
    let dir = store.join(SENSOR);
    let before = conduit_evidence::spool::segment::list(&dir).expect("segments");
    assert!(
        before.len() > 5,
        "{} segments: {before:?}; log:\n{}",
        before.len(),
        c.log_text()
    );

    // Restart with a one-day retention: it prunes at once.
    let store_s = store.to_str().expect("utf8");
    let c = Collector::start_on(
        c.port,
        &store,
        &tmp.path().join("c2.log"),
        &[
            "--tofu",
            "--jsonl",
            export_s,
            "--store-segment-bytes",
            "65536",
            "--retention",
            "1",
        ],
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let a = loop {
        if let Ok(Some(a)) = anchor::read(&dir) {
            break a;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no pruning; log:\n{}",
            c.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // The anchor is written before the segments it covers are removed: wait for
    // the removal to finish.
    let after = loop {
        let after = conduit_evidence::spool::segment::list(&dir).expect("segments");
        if after.first().is_some_and(|s| s.0 > a.seq) {
            break after;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "pruning did not finish: {after:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        after.len() < before.len() && !after.is_empty(),
        "{} -> {}",
        before.len(),
        after.len()
    );
    assert_eq!(
        after[0].0,
        a.seq + 1,
        "the first kept segment follows the anchor"
    );
    assert!(
        a.seq < 2000,
        "a record of today was pruned: anchor at {}",
        a.seq
    );
    assert!(a.checkpoint.is_some() && a.retention_days == 1);
    // The rest verifies from the anchor, link checked (no "not checked" warning).
    let report = verify_dir(&dir, None);
    assert!(report.ok(), "{report}");
    assert!(
        report.warnings.iter().all(|w| !w.contains("not checked")),
        "{report}"
    );
    assert_eq!(
        collector(&["verify", "--store", store_s]).status.code(),
        Some(0)
    );
    // The collector's own signed chain says what it pruned.
    let out = collector(&[
        "query",
        "--store",
        store_s,
        "--sensor",
        "collector",
        "--action",
        "alarm",
    ]);
    let alarms = String::from_utf8_lossy(&out.stdout);
    assert!(
        alarms.contains("retention") && alarms.contains(&format!("..{}", a.seq)),
        "{alarms}"
    );
    // A report over the pruned days is incomplete and says why.
    let html = tmp.path().join("old.html");
    let now = SystemTime::now();
    let (s, u) = (rfc(now - Duration::from_secs(4 * 86_400)), rfc(now));
    let out = collector(&[
        "report",
        "--store",
        store_s,
        "--since",
        &s,
        "--until",
        &u,
        "--out",
        html.to_str().expect("utf8"),
    ]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let page = std::fs::read_to_string(&html).expect("html");
    assert!(
        page.contains("pruned by retention (1 days)"),
        "no pruning gap"
    );
    // A forged anchor (another hash) breaks verification.
    let text = std::fs::read_to_string(dir.join(anchor::ANCHOR_FILE)).expect("anchor");
    let forged = text.replace(&hex::encode(a.hash), &hex::encode([9u8; 32]));
    std::fs::write(dir.join(anchor::ANCHOR_FILE), forged).expect("write");
    let report = verify_dir(&dir, None);
    assert_eq!(report.first_bad.map(|b| b.seq), Some(a.seq + 1));
}

/// A report over more violations and loss records than it lists: the counts and the
/// summary stay exact, each flow is counted and listed once (with its last record's
/// totals), and the report says how to list the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_lists_a_bounded_number_of_rows_and_counts_every_one() {
    init_tracing();
    let tmp = tempfile::tempdir().expect("test step");
    let (spool, store) = (tmp.path().join("spool"), tmp.path().join("store"));
    let t0 = SystemTime::now() + Duration::from_secs(3600);
    let head = {
        let mut rec = recorder(&spool, SENSOR);
        let at = |ms: u64| unix_nanos(t0 + Duration::from_millis(ms));
        for i in 0..30u64 {
            for (kind, bytes) in [(RecordKind::FlowStart, 10), (RecordKind::FlowEnd, 5000 + i)] {
                let mut r = flow(i);
                r.kind = kind as i32;
                r.time_unix_nano = at(100 * i + if kind == RecordKind::FlowEnd { 50 } else { 0 });
                if let Some(Body::Flow(f)) = &mut r.body {
                    f.source = Some(v1::Counts { bytes, packets: 2 });
                }
                rec.append(r).expect("append");
            }
        }
        for i in 0..12u64 {
            rec.append(v1::Record {
                kind: RecordKind::Loss as i32,
                time_unix_nano: at(3000 + i),
                body: Some(Body::Loss(v1::Loss {
                    reason: "ringbuf_full".to_owned(),
                    count: 2,
                    unit: "event".to_owned(),
                    origin: "kernel".to_owned(),
                    detail: String::new(),
                })),
                ..v1::Record::default()
            })
            .expect("append");
        }
        rec.sync().expect("sync");
        rec.head().0
    };
    let c = Collector::start(&store, &tmp.path().join("collector.log"), &["--tofu"]);
    let mut up = Uplink::start(uplink_opts(&c.url("http"), SENSOR), &spool);
    up.wait_acked(head, Duration::from_secs(30)).await;
    up.stop().await;

    let html = tmp.path().join("r.html");
    let (since, until) = (rfc(t0), rfc(t0 + Duration::from_secs(10)));
    let out = collector(&[
        "report",
        "--store",
        store.to_str().expect("test step"),
        "--since",
        &since,
        "--until",
        &until,
        "--out",
        html.to_str().expect("test step"),
        "--max-rows",
        "5",
    ]);
    // No heartbeats cover the window: verified, incomplete.
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let html = std::fs::read_to_string(&html).expect("test step");
    let s = summary(&html);
    assert_eq!(s["flows"], 30, "{s}");
    assert_eq!(s["violations"], 30);
    assert_eq!(s["loss"], 24);
    let table = &html[html.find(r#"<table id="violations">"#).expect("table")..];
    let table = &table[..table.find("</table>").expect("table end")];
    assert_eq!(table.matches("<b>violation</b>").count(), 5, "{table}");
    // Listed with the totals of their flow_end: 5000 + i (i = 0..5), start bytes + end bytes.
    for i in 0..5 {
        assert!(
            table.contains(&format!(">{}</td></tr>", 5000 + i)),
            "{table}"
        );
    }
    assert!(
        html.contains("the first 5 of 30 violations"),
        "truncation note"
    );
    assert!(html.contains("the first 5 of 12 loss records"), "loss note");
    assert!(html.contains("--verdict violation"));
}

/// A sensor that streamed and then went quiet raises `sensor_silent` once, as a signed
/// alarm record that the exports carry; when it streams again, `sensor_resumed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_sensor_raises_an_alarm_once_and_its_return_is_noted() {
    init_tracing();
    let tmp = tempfile::tempdir().expect("test step");
    let (spool, store) = (tmp.path().join("spool"), tmp.path().join("store"));
    let export = tmp.path().join("export.jsonl");
    let head = write_spool(&spool, SENSOR, 20);
    let c = Collector::start(
        &store,
        &tmp.path().join("collector.log"),
        &[
            "--tofu",
            "--silent-after",
            "1",
            "--jsonl",
            export.to_str().expect("test step"),
        ],
    );
    let mut up = Uplink::start(uplink_opts(&c.url("http"), SENSOR), &spool);
    up.wait_acked(head, Duration::from_secs(30)).await;
    up.stop().await;
    let alarms = |kind: &str| {
        std::fs::read_to_string(&export)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["event"]["action"] == "alarm" && v["conduit"]["alarm"]["kind"] == kind)
            .count()
    };
    let wait_for = |kind: &'static str| async move {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while alarms(kind) == 0 {
            assert!(std::time::Instant::now() < deadline, "no {kind} alarm");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    wait_for("sensor_silent").await;
    // Once per silence, however long it lasts.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(alarms("sensor_silent"), 1);
    let line = std::fs::read_to_string(&export).expect("test step");
    assert!(line.contains(r#""sensor_id":"gw-01""#), "{line}");

    let mut rec = recorder(&spool, SENSOR);
    rec.append(flow(99)).expect("append");
    rec.sync().expect("sync");
    let head = rec.head().0;
    drop(rec);
    let mut up = Uplink::start(uplink_opts(&c.url("http"), SENSOR), &spool);
    up.wait_acked(head, Duration::from_secs(30)).await;
    wait_for("sensor_resumed").await;
    up.stop().await;
}
