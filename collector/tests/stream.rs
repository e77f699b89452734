//! Sensor spool -> uplink -> collector process -> store, over loopback.

mod common;

use std::time::Duration;

use common::*;
use conduit_uplink::UplinkTls;

const SENSOR: &str = "gw-01";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_stream_stores_every_record_once_and_exports_jsonl() {
    init_tracing();
    let tmp = tempfile::tempdir().expect("tempdir");
    let spool = tmp.path().join("spool");
    let store = tmp.path().join("store");
    let jsonl = tmp.path().join("out.jsonl");
    let head = write_spool(&spool, SENSOR, 5000);
    let c = Collector::start(
        &store,
        &tmp.path().join("collector.log"),
        &["--tofu", "--jsonl", jsonl.to_str().expect("utf8")],
    );
    let mut up = Uplink::start(uplink_opts(&c.url("http"), SENSOR), &spool);
    up.wait_acked(head, Duration::from_secs(60)).await;
    assert_eq!(verified_records(&store.join(SENSOR)), head);
    assert_eq!(conduit_uplink::read_acked(&spool), Some(head), "acked file");
    // The pinned key is the sensor's.
    assert_eq!(
        std::fs::read_to_string(store.join(SENSOR).join("signing.pub")).expect("pin"),
        std::fs::read_to_string(spool.join("signing.pub")).expect("pub")
    );
    // JSON lines: every record of the sensor once, with the chain fields.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut seqs = Vec::new();
    while std::time::Instant::now() < deadline {
        seqs = std::fs::read_to_string(&jsonl)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["observer"]["id"] == SENSOR)
            .map(|v| {
                assert!(v["event"]["hash"].is_string() && v["chain"]["prev_hash"].is_string());
                v["event"]["sequence"].as_u64().expect("sequence")
            })
            .collect();
        if seqs.len() as u64 >= head {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(seqs, (1..=head).collect::<Vec<_>>());
    // `verify --store` agrees.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_conduit-collector"))
        .args(["verify", "--store", store.to_str().expect("utf8")])
        .output()
        .expect("verify");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    up.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_killed_mid_stream_resumes_without_loss_or_duplicates() {
    init_tracing();
    let tmp = tempfile::tempdir().expect("tempdir");
    let spool = tmp.path().join("spool");
    let store = tmp.path().join("store");
    let head = write_spool(&spool, SENSOR, 100_000);
    let mut c = Collector::start(&store, &tmp.path().join("collector.log"), &["--tofu"]);
    let mut up = Uplink::start(uplink_opts(&c.url("http"), SENSOR), &spool);
    up.wait_acked(1000, Duration::from_secs(60)).await;
    c.restart();
    let acked_at_kill = up.status.borrow().acked_seq;
    assert!(acked_at_kill < head, "the stream was already complete");
    up.wait_acked(head, Duration::from_secs(120)).await;
    assert!(up.status.borrow().reconnects >= 1);
    assert_eq!(verified_records(&store.join(SENSOR)), head);
    up.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sensors_at_once() {
    init_tracing();
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = tmp.path().join("store");
    let c = Collector::start(&store, &tmp.path().join("collector.log"), &["--tofu"]);
    let mut ups = Vec::new();
    for i in 0..3 {
        let id = format!("gw-{i}");
        let spool = tmp.path().join(&id);
        let head = write_spool(&spool, &id, 3000 + i * 1000);
        ups.push((
            id.clone(),
            head,
            Uplink::start(uplink_opts(&c.url("http"), &id), &spool),
        ));
    }
    for (id, head, up) in &mut ups {
        up.wait_acked(*head, Duration::from_secs(60)).await;
        assert_eq!(verified_records(&store.join(&*id)), *head);
    }
    for (_, _, up) in ups {
        up.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_identity_is_checked() {
    init_tracing();
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(tmp.path());
    let (scert, skey) = pki.issue("server", "collector", &["localhost"]);
    let (good_cert, good_key) = pki.issue("gw", SENSOR, &[SENSOR]);
    let (other_cert, other_key) = pki.issue("other", "gw-99", &["gw-99"]);
    let foreign = tmp.path().join("foreign");
    std::fs::create_dir_all(&foreign).expect("mkdir");
    let foreign_pki = Pki::new(&foreign);
    let (f_cert, f_key) = foreign_pki.issue("gw", SENSOR, &[SENSOR]);

    let store = tmp.path().join("store");
    let spool = tmp.path().join("spool");
    let head = write_spool(&spool, SENSOR, 2000);
    let c = Collector::start(
        &store,
        &tmp.path().join("collector.log"),
        &[
            "--tofu",
            "--tls-cert",
            scert.to_str().expect("utf8"),
            "--tls-key",
            skey.to_str().expect("utf8"),
            "--client-ca",
            pki.ca_path().to_str().expect("utf8"),
        ],
    );
    let tls = |cert: &std::path::Path, key: &std::path::Path| UplinkTls {
        cert: cert.to_owned(),
        key: key.to_owned(),
        ca: pki.ca_path(),
        domain: None,
    };
    // Certificate for another sensor id: rejected by identity.
    let mut o = uplink_opts(&c.url("https"), SENSOR);
    o.tls = Some(tls(&other_cert, &other_key));
    let mut bad = Uplink::start(o, &spool);
    wait_error(&mut bad, "Identity").await;
    bad.stop().await;
    // Certificate from a CA the collector does not trust: the handshake fails.
    let mut o = uplink_opts(&c.url("https"), SENSOR);
    o.tls = Some(tls(&f_cert, &f_key));
    let mut bad = Uplink::start(o, &spool);
    wait_error(&mut bad, "").await;
    assert!(!bad.status.borrow().connected);
    bad.stop().await;
    // No client certificate at all: refused.
    let no_cert = tonic::transport::Endpoint::from_shared(c.url("https"))
        .expect("endpoint")
        .tls_config(tonic::transport::ClientTlsConfig::new().ca_certificate(
            tonic::transport::Certificate::from_pem(std::fs::read(pki.ca_path()).expect("ca")),
        ))
        .expect("tls");
    let refused = match no_cert.connect().await {
        Err(_) => true,
        Ok(ch) => {
            let mut client = conduit_proto::v1::collector_client::CollectorClient::new(ch);
            let (_tx, rx) = tokio::sync::mpsc::channel(1);
            client
                .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .is_err()
        }
    };
    assert!(refused, "a client without certificate was accepted");
    assert!(
        !store
            .join(SENSOR)
            .join("seg-00000000000000000001.cspool")
            .exists()
    );
    // The right certificate streams everything.
    let mut o = uplink_opts(&c.url("https"), SENSOR);
    o.tls = Some(tls(&good_cert, &good_key));
    let mut up = Uplink::start(o, &spool);
    up.wait_acked(head, Duration::from_secs(60)).await;
    assert_eq!(verified_records(&store.join(SENSOR)), head);
    up.stop().await;
}

async fn wait_error(up: &mut Uplink, contains: &str) {
    let r = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Some(e) = &up.status.borrow().last_error
                && e.contains(contains)
            {
                return;
            }
            if up.status.changed().await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(
        r.is_ok(),
        "no error containing {contains:?}: {:?}",
        *up.status.borrow()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_while_the_agent_writes_and_deletes_acknowledged_segments() {
    init_tracing();
    let tmp = tempfile::tempdir().expect("tempdir");
    let spool = tmp.path().join("spool");
    let store = tmp.path().join("store");
    let c = Collector::start(&store, &tmp.path().join("collector.log"), &["--tofu"]);
    // The agent's side: a Recorder with a small spool, acknowledging from `acked`.
    let mut opts = conduit_evidence::chain::RecorderOptions::new(&spool, SENSOR);
    opts.segment_bytes = 64 << 10;
    opts.max_spool_bytes = 4 << 20;
    let (mut rec, _) = conduit_evidence::chain::Recorder::open(opts).expect("recorder");
    let mut up = Uplink::start(uplink_opts(&c.url("http"), SENSOR), &spool);
    let spool_dir = spool.clone();
    let writer = std::thread::spawn(move || {
        for i in 0..40_000u64 {
            rec.append(flow(i)).expect("append");
            if i % 500 == 0 {
                if let Some(seq) = conduit_uplink::read_acked(&spool_dir) {
                    rec.acknowledge(seq).expect("ack");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        rec.sync().expect("sync");
        (rec.head().0, rec.stats())
    });
    let (head, stats) = tokio::task::spawn_blocking(move || writer.join().expect("writer"))
        .await
        .expect("join");
    up.wait_acked(head, Duration::from_secs(120)).await;
    // If the uplink falls behind (a loaded test machine), the spool refuses records
    // and says so in loss records; either way the collector holds the whole chain,
    // and acknowledged segments were deleted under the uplink's feet.
    if stats.records_refused > 0 {
        println!(
            "note: {} records refused (spool full)",
            stats.records_refused
        );
    }
    assert!(stats.segments_deleted > 0, "{stats:?}");
    assert_eq!(verified_records(&store.join(SENSOR)), head);
    up.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_streams_and_exits_cleanly() {
    init_tracing();
    let tmp = tempfile::tempdir().expect("tempdir");
    let spool = tmp.path().join("spool");
    let store = tmp.path().join("store");
    let head = write_spool(&spool, SENSOR, 1000);
    let mut c = Collector::start(&store, &tmp.path().join("collector.log"), &["--tofu"]);
    let mut up = Uplink::start(uplink_opts(&c.url("http"), SENSOR), &spool);
    up.wait_acked(head, Duration::from_secs(60)).await;
    let status = std::process::Command::new("kill")
        .args(["-TERM", &c.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(8);
    let code = loop {
        if let Some(s) = c.child.try_wait().expect("wait") {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "collector still running after SIGTERM:\n{}",
            c.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(code.success(), "exit {code:?}:\n{}", c.log_text());
    up.stop().await;
}
