//! Collectors side by side on NATS JetStream (issue 15, DESIGN "More contracts":
//! `run --jetstream URL [--site ID]`, `verify --jetstream URL`), against a real
//! 3-node nats-server cluster on loopback: several sensors streaming to two
//! collectors, a collector killed mid-stream, a NATS node killed, two collectors
//! racing for one sensor, and a forked history. After each, `verify --jetstream`
//! proves every record is in the stream exactly once (a duplicate or a missing seq
//! is a break) and every chain verifies.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::nats_cluster::Cluster;
use common::*;
use conduit_evidence::chain::{Recorder, RecorderOptions};
use conduit_evidence::spool::SyncPolicy;
use conduit_proto::v1::{
    self, RejectCode, SensorMessage, collector_client::CollectorClient, collector_message,
    sensor_message,
};

const SITE: &str = "plant-js";

fn start_collector(dir: &Path, name: &str, nats: &str) -> Collector {
    start_exporting(dir, name, nats, &[])
}

fn start_exporting(dir: &Path, name: &str, nats: &str, export: &[&str]) -> Collector {
    let mut args = vec!["--tofu", "--jetstream", nats, "--site", SITE];
    args.extend(export);
    Collector::start(
        &dir.join(format!("{name}-local")),
        &dir.join(format!("{name}.log")),
        &args,
    )
}

/// The export consumer's state, for failure messages.
async fn export_state(nats: &str) -> String {
    let Ok(client) = async_nats::connect(nats).await else {
        return "no connection".to_owned();
    };
    let js = async_nats::jetstream::new(client);
    let Ok(stream) = js
        .get_stream(format!("CONDUIT_CHAIN_{}", SITE.to_uppercase()))
        .await
    else {
        return "no chain stream".to_owned();
    };
    match stream
        .get_consumer::<async_nats::jetstream::consumer::pull::Config>("export-nats")
        .await
    {
        Ok(mut c) => match c.info().await {
            Ok(i) => format!(
                "export consumer: pending {} ack_pending {} redelivered {} delivered {:?} ack_floor {:?} waiting {}",
                i.num_pending,
                i.num_ack_pending,
                i.num_redelivered,
                i.delivered,
                i.ack_floor,
                i.num_waiting
            ),
            Err(e) => format!("consumer info: {e}"),
        },
        Err(e) => format!("consumer: {e}"),
    }
}

/// The `event.sequence` of every message of `sensor` in the SIEM export's streams
/// (`--nats`; sites as records name them).
/// Err: a stream could not be read (yet: a leader election after a node loss).
async fn exported(nats: &str, sensor: &str) -> Result<Vec<u64>, String> {
    let client = async_nats::connect(nats).await.map_err(|e| e.to_string())?;
    let js = async_nats::jetstream::new(client);
    let mut seqs = Vec::new();
    // Checkpoints name no site: with JetStream they go to the collectors' --site.
    for site in ["plant-01", SITE] {
        let name = format!("CONDUIT_{}", site.to_uppercase());
        let Ok(stream) = js.get_stream(&name).await else {
            continue;
        };
        // An unacknowledged R1 reader that the cluster drops a second after use:
        // this runs every half second, and readers left for the default 30 s would
        // pile up as work for the meta leader when a node dies.
        let config = async_nats::jetstream::consumer::pull::Config {
            filter_subject: format!("conduit.{site}.{}.>", sensor.replace('.', "_")),
            ack_policy: async_nats::jetstream::consumer::AckPolicy::None,
            inactive_threshold: Duration::from_secs(1),
            num_replicas: 1,
            memory_storage: true,
            ..Default::default()
        };
        let consumer = stream
            .create_consumer(config)
            .await
            .map_err(|e| format!("reading {name}: {e}"))?;
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| format!("reading {name}: {e}"))?;
        while let Ok(Some(Ok(m))) = tokio::time::timeout(
            Duration::from_secs(2),
            tokio_stream::StreamExt::next(&mut messages),
        )
        .await
        {
            let doc: serde_json::Value = serde_json::from_slice(&m.payload).expect("json");
            seqs.push(doc["event"]["sequence"].as_u64().expect("event.sequence"));
            if m.info().map(|i| i.pending).unwrap_or(0) == 0 {
                break;
            }
        }
        drop(messages);
        let _ = stream.delete_consumer(&consumer.cached_info().name).await;
    }
    Ok(seqs)
}

/// Waits until the SIEM export holds every seq 1..=`head` of `sensor`; returns how
/// many messages were duplicates.
async fn wait_exported(nats: &str, sensor: &str, head: u64, b: &Collector) -> usize {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (seqs, error) = match exported(nats, sensor).await {
            Ok(seqs) => (seqs, String::new()),
            Err(e) => (Vec::new(), e),
        };
        let distinct: std::collections::BTreeSet<u64> = seqs.iter().copied().collect();
        let whole = distinct.len() as u64 == head && distinct.last() == Some(&head);
        if whole {
            return seqs.len() - distinct.len();
        }
        assert!(
            Instant::now() < deadline,
            "{sensor}: the SIEM export holds {} distinct of seqs 1..={head} {error}; {}\nb's log:\n{}",
            distinct.len(),
            export_state(nats).await,
            b.log_text()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A stream's info through the raw API (None: no leader answers now).
async fn stream_info(client: &async_nats::Client, stream: &str) -> Option<serde_json::Value> {
    let m = tokio::time::timeout(
        Duration::from_secs(2),
        client.request(format!("$JS.API.STREAM.INFO.{stream}"), "".into()),
    )
    .await
    .ok()?
    .ok()?;
    serde_json::from_slice::<serde_json::Value>(&m.payload)
        .ok()
        .filter(|v| v.get("error").is_none())
}

/// Messages in a stream now (0 while it has no leader).
async fn siem_messages(nats: &str, stream: &str) -> u64 {
    let client = async_nats::connect(nats).await.expect("connect");
    stream_info(&client, stream)
        .await
        .and_then(|v| v["state"]["messages"].as_u64())
        .unwrap_or(0)
}

/// Moves the leadership of `stream` to the node `name`: its leader steps down until
/// the cluster elects that node (2.10 cannot name the next leader), so that killing
/// `name` then forces a leader change.
async fn lead_on(nats: &str, stream: &str, name: &str) {
    let client = async_nats::connect(nats).await.expect("connect");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let leader = stream_info(&client, stream)
            .await
            .and_then(|v| v["cluster"]["leader"].as_str().map(str::to_owned));
        if leader.as_deref() == Some(name) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{stream}: leader {leader:?}, not {name}"
        );
        if leader.is_some() {
            let _ = client
                .request(
                    format!("$JS.API.STREAM.LEADER.STEPDOWN.{stream}"),
                    "".into(),
                )
                .await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `conduit-collector verify --jetstream`: exit code and output.
fn verify_jetstream(nats: &str) -> (Option<i32>, String) {
    collector_output(&["verify", "--jetstream", nats, "--site", SITE])
}

/// Each chain `verify --jetstream` reports, with its verified records: the name
/// after the stream's (a sensor id, or `_collector-<key hex>` for a collector's
/// alarm chain).
fn chain_records(out: &str) -> Vec<(String, u64)> {
    let mut chains = Vec::new();
    let mut name = None;
    for line in out.lines() {
        if let Some(n) = line.strip_prefix("== ") {
            name = n.rsplit('/').next().map(str::to_owned);
        } else if let Some((records, _)) = line.split_once(" records verified (")
            && let Some(n) = name.take()
        {
            chains.push((n, records.parse().expect("records")));
        }
    }
    chains
}

/// The sensors' chains and records in `verify --jetstream` output, the collectors'
/// alarm chains apart; the line `N chains, M records verified` counts them all.
fn totals(out: &str) -> (u64, u64) {
    let line = out
        .lines()
        .find(|l| l.ends_with("records verified"))
        .unwrap_or_else(|| panic!("no totals in:\n{out}"));
    let w: Vec<&str> = line.split_whitespace().collect();
    let all: (u64, u64) = (
        w[0].parse().expect("chains"),
        w[2].parse().expect("records"),
    );
    let chains = chain_records(out);
    assert_eq!(
        (chains.len() as u64, chains.iter().map(|c| c.1).sum::<u64>()),
        all,
        "{out}"
    );
    let sensors: Vec<&(String, u64)> = chains
        .iter()
        .filter(|(n, _)| !n.starts_with("_collector-"))
        .collect();
    (
        sensors.len() as u64,
        sensors.iter().map(|c| c.1).sum::<u64>(),
    )
}

/// `conduit-collector report --jetstream` over `since..until`: its exit code and the
/// HTML's machine-readable summary.
fn report_jetstream(
    nats: &str,
    html: &Path,
    since: &str,
    until: &str,
) -> (Option<i32>, serde_json::Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_conduit-collector"))
        .args(["report", "--since", since, "--until", until, "--out"])
        .arg(html)
        .args(["--jetstream", nats, "--site", SITE])
        .output()
        .expect("conduit-collector");
    let page = std::fs::read_to_string(html).unwrap_or_else(|e| {
        panic!(
            "report: {e}\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let start = page
        .find(r#"<script type="application/json" id="summary">"#)
        .expect("summary element");
    let rest = &page[start..];
    let summary = serde_json::from_str(
        &rest[rest.find('>').expect("tag") + 1..rest.find("</script>").expect("end")],
    )
    .expect("summary JSON");
    (out.status.code(), summary)
}

fn recorder(spool: &Path, sensor: &str) -> Recorder {
    let mut o = RecorderOptions::new(spool, sensor);
    o.sync = SyncPolicy::OsOnly;
    o.segment_bytes = 64 * 1024;
    Recorder::open(o).expect("recorder").0
}

/// Appends `n` flow records (ids from `from`); returns the head seq.
fn append(rec: &mut Recorder, from: u64, n: u64) -> u64 {
    for i in from..from + n {
        rec.append(flow(i)).expect("append");
    }
    rec.sync().expect("sync");
    rec.head().0
}

async fn next(rx: &mut tonic::Streaming<v1::CollectorMessage>) -> collector_message::Msg {
    tokio::time::timeout(Duration::from_secs(20), rx.message())
        .await
        .expect("timeout")
        .expect("status")
        .and_then(|m| m.msg)
        .expect("message")
}

/// Waits until `f` holds, at most `timeout`; whether it did.
async fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while !f() {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collectors_share_sensors_through_a_collector_kill_and_a_nats_node_kill() {
    init_tracing();
    let tmp = tempfile::tempdir().expect("tempdir");
    let Some(mut cluster) = Cluster::start(tmp.path()).await else {
        return;
    };
    let a_nats = cluster.nodes[0].url();
    let b_nats = cluster.nodes[1].url();
    // Both export every record (checkpoints too) to NATS through one durable
    // consumer: each record reaches the SIEM stream once, whichever collector
    // stored it and whichever exported it.
    let siem = cluster.nodes[2].url();
    let export = ["--nats", &siem, "--export-heartbeats"];
    let mut a = start_exporting(tmp.path(), "a", &a_nats, &export);
    let b = start_exporting(tmp.path(), "b", &b_nats, &export);
    let sensors = ["gw-js-1", "gw-js-2", "plant.gw-3"];
    let mut recs: Vec<Recorder> = Vec::new();
    let mut uplinks = Vec::new();
    for (i, s) in sensors.iter().enumerate() {
        let spool = tmp.path().join(s);
        let mut rec = recorder(&spool, s);
        append(&mut rec, 0, 1500);
        // Two sensors prefer collector a, one prefers b.
        let (first, second) = if i < 2 { (&a, &b) } else { (&b, &a) };
        let mut opts = uplink_opts(&first.url("http"), s);
        opts.collectors.push(second.url("http"));
        uplinks.push(Uplink::start(opts, &spool));
        recs.push(rec);
    }
    for (u, r) in uplinks.iter_mut().zip(&recs) {
        u.wait_acked(r.head().0, Duration::from_secs(120)).await;
    }
    let a_url = a.url("http");
    assert_eq!(uplinks[0].status.borrow().collector, a_url);
    assert_eq!(uplinks[2].status.borrow().collector, b.url("http"));

    // Collector a dies (SIGKILL) while its sensors stream: they move to b, which
    // resumes each from what the cluster stored, whoever stored it.
    let started = uplinks[0].status.borrow().acked_seq;
    for (i, r) in recs.iter_mut().enumerate() {
        append(r, 10_000 * (i as u64 + 1), 3000);
    }
    let moving = wait_for(Duration::from_secs(60), || {
        uplinks[0].status.borrow().acked_seq > started
    })
    .await;
    assert!(
        moving,
        "sensor 1 does not stream on: {:?}\na's log:\n{}",
        *uplinks[0].status.borrow(),
        a.log_text()
    );
    a.kill();
    // Records written after the kill can only be acknowledged by b: a fast
    // collector may have taken the whole batch above before it died.
    let heads: Vec<u64> = recs
        .iter_mut()
        .enumerate()
        .map(|(i, r)| append(r, 20_000 * (i as u64 + 1), 500))
        .collect();
    for (u, h) in uplinks.iter_mut().zip(&heads) {
        u.wait_acked(*h, Duration::from_secs(120)).await;
    }
    assert_eq!(uplinks[0].status.borrow().collector, b.url("http"));
    // The records a's export had taken when it died are delivered again to b's:
    // the SIEM stream holds each record once (de-duplicated by Nats-Msg-Id).
    for (s, h) in sensors.iter().zip(&heads) {
        let duplicates = wait_exported(&siem, s, *h, &b).await;
        assert_eq!(duplicates, 0, "{s}: duplicates in the SIEM export");
    }

    // A NATS node dies (the one b is connected to) while the export publishes, and
    // it leads the SIEM streams then: they elect another leader mid-export, the
    // case where a stream may forget recent Nats-Msg-Ids. b's client moves to
    // another node and the R3 streams keep their quorum; nothing is lost or doubled.
    let siem_streams = ["CONDUIT_PLANT-01", "CONDUIT_PLANT-JS"];
    for stream in siem_streams {
        lead_on(&siem, stream, "n1").await;
    }
    let before = siem_messages(&siem, siem_streams[0]).await;
    let heads: Vec<u64> = recs
        .iter_mut()
        .enumerate()
        .map(|(i, r)| append(r, 100_000 * (i as u64 + 1), 3000))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    let at_kill = loop {
        let now = siem_messages(&siem, siem_streams[0]).await;
        if now > before {
            break now;
        }
        assert!(Instant::now() < deadline, "the export does not publish");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    cluster.nodes[1].kill();
    println!(
        "NATS node n1 (the SIEM streams' leader) killed with {} of {} new records in {}",
        at_kill - before,
        sensors.len() * 3000,
        siem_streams[0]
    );
    cluster.wait_ready().await;
    for (u, h) in uplinks.iter_mut().zip(&heads) {
        u.wait_acked(*h, Duration::from_secs(120)).await;
    }
    for u in uplinks {
        u.stop().await;
    }

    let (code, out) = verify_jetstream(&cluster.nodes[2].url());
    assert_eq!(
        code,
        Some(0),
        "{out}\nb's log:\n{}\n{}",
        b.log_text(),
        cluster.logs()
    );
    let want: u64 = heads.iter().sum();
    assert_eq!(totals(&out), (3, want), "{out}");
    for s in sensors {
        assert!(
            out.contains(&format!("CONDUIT_CHAIN_PLANT-JS/{s}")),
            "{out}"
        );
        // The collectors witnessed the durable heads, and the uplink kept what it got.
        let cosigs =
            std::fs::read_to_string(tmp.path().join(s).join("witness.cosig")).unwrap_or_default();
        assert!(
            cosigs.lines().count() > 0,
            "{s}: no cosignature in its spool"
        );
    }
    let witnessed = out
        .lines()
        .filter(|l| l.contains("witness cosignatures match the chain"))
        .filter(|l| !l.starts_with('0'))
        .count();
    assert_eq!(
        witnessed, 3,
        "every chain carries verified cosignatures:\n{out}"
    );
    // Every record reaches the SIEM export once, through the node loss too.
    for (s, h) in sensors.iter().zip(&heads) {
        let duplicates = wait_exported(&siem, s, *h, &b).await;
        assert_eq!(
            duplicates, 0,
            "{s}: duplicates in the SIEM export after the node loss"
        );
    }
    // Nothing went to the local stores but the collectors' own alarm chains.
    for dir in [tmp.path().join("a-local"), tmp.path().join("b-local")] {
        for s in sensors {
            assert!(!dir.join(s).exists(), "{}", dir.join(s).display());
        }
    }
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_collectors_racing_for_one_sensor_store_each_record_once() {
    init_tracing();
    let tmp = tempfile::tempdir().expect("tempdir");
    let Some(cluster) = Cluster::start(tmp.path()).await else {
        return;
    };
    // Both export to NATS through the shared consumer: the race stores each batch
    // once, so the SIEM stream gets each record once.
    let siem = cluster.nodes[2].url();
    let export = ["--nats", siem.as_str(), "--export-heartbeats"];
    let a = start_exporting(tmp.path(), "a", &cluster.nodes[0].url(), &export);
    let b = start_exporting(tmp.path(), "b", &cluster.nodes[1].url(), &export);
    // One sensor's spool in two copies, streamed at once to the two collectors: the
    // same chain reaches the cluster twice, in a race, batch against batch.
    const SENSOR: &str = "gw-race";
    let spool = tmp.path().join("spool");
    let mut rec = recorder(&spool, SENSOR);
    let head = append(&mut rec, 0, 4000);
    drop(rec);
    let copy = tmp.path().join("spool-copy");
    std::fs::create_dir_all(&copy).expect("copy dir");
    for e in std::fs::read_dir(&spool).expect("spool") {
        let e = e.expect("entry");
        std::fs::copy(e.path(), copy.join(e.file_name())).expect("copy");
    }
    let mut one = Uplink::start(uplink_opts(&a.url("http"), SENSOR), &spool);
    let mut two = Uplink::start(uplink_opts(&b.url("http"), SENSOR), &copy);
    one.wait_acked(head, Duration::from_secs(120)).await;
    two.wait_acked(head, Duration::from_secs(120)).await;
    one.stop().await;
    two.stop().await;
    let (code, out) = verify_jetstream(&cluster.urls());
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(totals(&out), (1, head), "{out}");
    let duplicates = wait_exported(&siem, SENSOR, head, &b).await;
    assert_eq!(
        duplicates,
        0,
        "duplicates in the SIEM export: {}",
        a.log_text()
    );

    // query and report read the chains from JetStream as from a store.
    let nats = cluster.nodes[2].url();
    let collector = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_conduit-collector"))
            .args(args)
            .output()
            .expect("conduit-collector")
    };
    let js = ["--jetstream", nats.as_str(), "--site", SITE];
    let mut args = vec!["query", "--action", "flow_start"];
    args.extend(js);
    let out = collector(&args);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seqs: std::collections::BTreeSet<u64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let doc: serde_json::Value = serde_json::from_str(l).expect("json line");
            doc["event"]["sequence"].as_u64().expect("event.sequence")
        })
        .collect();
    assert_eq!(seqs.len(), 4000, "flow_start records from JetStream");
    let html = tmp.path().join("report.html");
    let (code, summary) =
        report_jetstream(&nats, &html, "1970-01-01T00:00:00Z", "1970-01-01T00:01:00Z");
    assert!(matches!(code, Some(0 | 3)), "{summary}");
    // The report verified the whole chain it read from the stream.
    assert_eq!(summary["verified"], true, "{summary}");
    assert_eq!(summary["sensors"][0]["id"], SENSOR, "{summary}");
    assert_eq!(summary["sensors"][0]["chain_records"], head, "{summary}");
    assert_eq!(summary["sensors"][0]["chain_last_seq"], head, "{summary}");
    assert!(
        summary["sensors"][0]["cosignatures_verified"]
            .as_u64()
            .unwrap_or(0)
            > 0,
        "cosignatures from JetStream in the report: {summary}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forked_history_is_rejected_with_an_alarm() {
    init_tracing();
    let tmp = tempfile::tempdir().expect("tempdir");
    let Some(cluster) = Cluster::start(tmp.path()).await else {
        return;
    };
    let a = start_collector(tmp.path(), "a", &cluster.nodes[0].url());
    let b = start_collector(tmp.path(), "b", &cluster.nodes[2].url());
    const SENSOR: &str = "gw-fork";
    let spool = tmp.path().join("spool");
    let mut rec = recorder(&spool, SENSOR);
    let head = append(&mut rec, 0, 50);
    drop(rec);
    let mut up = Uplink::start(uplink_opts(&a.url("http"), SENSOR), &spool);
    up.wait_acked(head, Duration::from_secs(60)).await;
    up.stop().await;

    // The same key signs another history (the sensor's state was rolled back and it
    // recorded again); its seqs 41..60 are sent to the other collector, raw.
    let fork = tmp.path().join("fork");
    std::fs::create_dir_all(&fork).expect("fork dir");
    for f in ["signing.key", "signing.pub"] {
        std::fs::copy(spool.join(f), fork.join(f)).expect("key");
    }
    let mut rec = recorder(&fork, SENSOR);
    append(&mut rec, 777, 60);
    drop(rec);
    let key =
        conduit_evidence::chain::keys::load_signing_key(&spool.join("signing.key")).expect("key");
    let frames: Vec<v1::Frame> = spool_frames(&fork, 41);
    let mut client = CollectorClient::connect(b.url("http"))
        .await
        .expect("connect");
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(SensorMessage {
        msg: Some(sensor_message::Msg::Hello(v1::Hello {
            protocol_version: 1,
            sensor_id: SENSOR.to_owned(),
            public_key: key.verifying_key().to_bytes().to_vec(),
            head_seq: 0,
            head_hash: Vec::new(),
        })),
    })
    .await
    .expect("hello");
    let mut rx = client
        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("stream")
        .into_inner();
    match next(&mut rx).await {
        collector_message::Msg::Welcome(w) => assert_eq!(w.last_stored_seq, head),
        other => panic!("expected Welcome, got {other:?}"),
    }
    let last = frames.last().expect("frames");
    let hash: [u8; 32] = last.hash[..].try_into().expect("hash");
    tx.send(SensorMessage {
        msg: Some(sensor_message::Msg::Batch(v1::Batch {
            signature: conduit_evidence::chain::checkpoint::sign_batch(
                &key, SENSOR, last.seq, &hash,
            ),
            frames: frames.clone(),
            gap: None,
        })),
    })
    .await
    .expect("batch");
    let mut m = next(&mut rx).await;
    if let collector_message::Msg::Ack(_) = m {
        m = next(&mut rx).await;
    }
    match m {
        collector_message::Msg::Reject(r) => {
            assert_eq!(r.code, RejectCode::Equivocation as i32, "{}", r.message);
            assert_eq!(r.seq, 41, "{}", r.message);
        }
        other => panic!("expected Reject, got {other:?}"),
    }
    let alarms: Vec<String> = spool_frames(&tmp.path().join("b-local").join("_collector"), 1)
        .iter()
        .filter_map(|f| prost::Message::decode(&f.record[..]).ok())
        .filter_map(|r: v1::Record| match r.body {
            Some(v1::record::Body::Alarm(a)) => Some(a.kind),
            _ => None,
        })
        .collect();
    assert!(alarms.iter().any(|k| k == "equivocation"), "{alarms:?}");
    // b also keeps its alarm chain in the stream: the report any collector or
    // auditor makes from JetStream lists the equivocation b saw.
    let html = tmp.path().join("report.html");
    let deadline = Instant::now() + Duration::from_secs(30);
    let alarm = loop {
        let (code, summary) = report_jetstream(
            &cluster.nodes[0].url(),
            &html,
            "2000-01-01T00:00:00Z",
            "2100-01-01T00:00:00Z",
        );
        assert!(matches!(code, Some(0 | 3)), "{summary}");
        let found = summary["alarms"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["kind"] == "equivocation")
            .cloned();
        if let Some(a) = found {
            assert!(summary["alarm_count"].as_u64() >= Some(1), "{summary}");
            break a;
        }
        assert!(
            Instant::now() < deadline,
            "no equivocation alarm in report --jetstream: {summary}\nb's log:\n{}",
            b.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(alarm["sensor"], SENSOR, "{alarm}");
    // query prints it too, as the collectors' records (`--sensor collector`).
    let out = Command::new(env!("CARGO_BIN_EXE_conduit-collector"))
        .args(["query", "--sensor", "collector", "--action", "alarm"])
        .args(["--jetstream", &cluster.nodes[2].url(), "--site", SITE])
        .output()
        .expect("conduit-collector");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.lines().any(|l| l.contains("equivocation")),
        "query --sensor collector --jetstream:\n{text}"
    );
    // verify --jetstream verifies b's alarm chain with the sensor chains, against the
    // key its subject names (b's alarm key, as in b's store).
    let (code, out) = verify_jetstream(&cluster.nodes[1].url());
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(totals(&out), (1, head), "{out}");
    let b_key = std::fs::read_to_string(tmp.path().join("b-local/_collector/signing.pub"))
        .expect("b's alarm key");
    let b_chain = format!("_collector-{}", b_key.trim());
    assert!(
        chain_records(&out)
            .iter()
            .any(|(n, records)| *n == b_chain && *records > 0),
        "b's alarm chain in:\n{out}"
    );
}

/// A site's stream of large batches (up to the cluster's 8 MB max_payload), larger
/// than what nats-server lets a client have pending (64 MiB by default), is read
/// whole by `verify --jetstream` and by the export. Their pulls are bounded in bytes
/// (an unbounded pull of 500 large batches made the server drop the benchmark's
/// reader as a slow consumer, and `verify` waited for ever), yet each pull must take
/// the largest message: with pulls of 1 MiB this test waits out its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_of_large_batches_is_read_whole_by_verify_and_the_export() {
    init_tracing();
    let tmp = tempfile::tempdir().expect("tempdir");
    let Some(cluster) = Cluster::start(tmp.path()).await else {
        return;
    };
    let jsonl = tmp.path().join("export.jsonl");
    let a = start_exporting(
        tmp.path(),
        "a",
        &cluster.nodes[0].url(),
        &["--jsonl", jsonl.to_str().expect("utf-8 path")],
    );
    // About 2 KiB a record, 48,000 records: about 100 MB in the stream, in batches
    // of up to the cluster's max_payload (8 MB).
    const SENSOR: &str = "gw-large";
    let spool = tmp.path().join("spool");
    let mut rec = recorder(&spool, SENSOR);
    for i in 0..48_000 {
        let mut r = flow(i);
        if let Some(v1::record::Body::Flow(f)) = r.body.as_mut() {
            f.conflicting_server_names =
                (0..8).map(|k| format!("{k}{}", "x".repeat(250))).collect();
        }
        rec.append(r).expect("append");
    }
    rec.sync().expect("sync");
    let head = rec.head().0;
    drop(rec);
    let mut up = Uplink::start(uplink_opts(&a.url("http"), SENSOR), &spool);
    up.wait_acked(head, Duration::from_secs(300)).await;
    up.stop().await;

    // verify, with a deadline: a reader that lost messages waits for ever.
    let mut child = Command::new(env!("CARGO_BIN_EXE_conduit-collector"))
        .args(["verify", "--jetstream", &cluster.urls(), "--site", SITE])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("conduit-collector verify");
    let done = wait_for(Duration::from_secs(300), || {
        child.try_wait().expect("wait").is_some()
    })
    .await;
    if !done {
        let _ = child.kill();
    }
    let out = child.wait_with_output().expect("verify output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(done, "verify --jetstream did not finish in 300 s:\n{text}");
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert_eq!(totals(&text), (1, head), "{text}");

    // The export's pulls are bounded too: every record reaches the JSON lines once.
    let exported = |path: &Path| -> Vec<u64> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|d| d["observer"]["id"] == SENSOR)
            .filter_map(|d| d["event"]["sequence"].as_u64())
            .collect()
    };
    let whole = wait_for(Duration::from_secs(300), || {
        exported(&jsonl).len() as u64 >= head
    })
    .await;
    let seqs = exported(&jsonl);
    let distinct: std::collections::BTreeSet<u64> = seqs.iter().copied().collect();
    assert!(
        whole && distinct.len() as u64 == head && seqs.len() == distinct.len(),
        "the JSON-lines export holds {} lines, {} distinct of 1..={head}\na's log:\n{}",
        seqs.len(),
        distinct.len(),
        a.log_text()
    );
}

/// A NATS server that requires TLS with a client certificate and a password: the
/// collector's chains and export connect with `--nats-ca/--nats-cert/--nats-key`
/// and the URL's user and password; `verify --jetstream` reads with the same, and is
/// refused without the client certificate or with a wrong password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_server_that_requires_tls_client_certificates_and_a_password() {
    init_tracing();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let Some(binary) = common::nats_cluster::nats_server() else {
        println!("SKIP: no nats-server (cargo xtask setup fetches it)");
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(tmp.path());
    let (server_cert, server_key) = pki.issue("nats", "nats", &["localhost"]);
    let (client_cert, client_key) = pki.issue("collector", "collector", &["collector"]);
    let port = free_port();
    let conf = tmp.path().join("nats.conf");
    std::fs::write(
        &conf,
        format!(
            "listen: 127.0.0.1:{port}\n\
             jetstream {{ store_dir: \"{}\", sync_interval: always }}\n\
             tls {{ cert_file: \"{}\", key_file: \"{}\", ca_file: \"{}\", verify: true, timeout: 5 }}\n\
             authorization {{ users: [ {{ user: collector, password: s3cret }} ] }}\n",
            tmp.path().join("js").display(),
            server_cert.display(),
            server_key.display(),
            pki.ca_path().display()
        ),
    )
    .expect("nats conf");
    let log = std::fs::File::create(tmp.path().join("nats.log")).expect("log");
    let server = Proc(
        Command::new(&binary)
            .arg("-c")
            .arg(&conf)
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("nats-server"),
    );
    assert!(
        wait_for(Duration::from_secs(20), || std::net::TcpStream::connect((
            "127.0.0.1",
            port
        ))
        .is_ok())
        .await,
        "nats-server did not listen"
    );
    let url = format!("tls://collector:s3cret@localhost:{port}");
    let tls = conduit_collector::nats_client::NatsTls {
        ca: Some(pki.ca_path()),
        cert: Some((client_cert.clone(), client_key.clone())),
    };
    let (ca, cert, key) = (
        pki.ca_path().display().to_string(),
        client_cert.display().to_string(),
        client_key.display().to_string(),
    );
    let tls_args = ["--nats-ca", &ca, "--nats-cert", &cert, "--nats-key", &key];
    let mut args = vec!["--nats", url.as_str(), "--export-heartbeats"];
    args.extend(tls_args);
    let a = start_exporting(tmp.path(), "a", &url, &args);

    const SENSOR: &str = "gw-tls";
    let spool = tmp.path().join("spool");
    let mut rec = recorder(&spool, SENSOR);
    let head = append(&mut rec, 0, 500);
    drop(rec);
    let mut up = Uplink::start(uplink_opts(&a.url("http"), SENSOR), &spool);
    up.wait_acked(head, Duration::from_secs(120)).await;
    up.stop().await;

    let verify = |extra: &[&str], url: &str| {
        let mut args = vec!["verify", "--jetstream", url, "--site", SITE];
        args.extend(extra);
        collector_output(&args)
    };
    let (code, out) = verify(&tls_args, &url);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(totals(&out), (1, head), "{out}");
    // The server refuses a client without a certificate, and a wrong password.
    let (code, out) = verify(&["--nats-ca", &ca], &url);
    assert_ne!(
        code,
        Some(0),
        "verified without a client certificate:\n{out}"
    );
    let wrong = url.replace("s3cret", "guess");
    let (code, out) = verify(&tls_args, &wrong);
    assert_ne!(code, Some(0), "verified with a wrong password:\n{out}");
    // Passwords never reach logs or errors.
    assert!(
        out.contains("collector:***@") && !out.contains("guess"),
        "{out}"
    );
    assert!(!a.log_text().contains("s3cret"), "{}", a.log_text());
    // A half-given client certificate: a usage error for verify, a configuration
    // error (64) for run.
    let (code, out) = verify(&["--nats-ca", &ca, "--nats-cert", &cert], &url);
    assert_eq!(code, Some(2), "{out}");
    let store = tmp.path().join("b-local").display().to_string();
    let (code, out) = collector_output(&[
        "run",
        "--listen",
        "127.0.0.1:0",
        "--store",
        &store,
        "--jetstream",
        &url,
        "--nats-cert",
        &cert,
    ]);
    assert_eq!(code, Some(64), "{out}");

    // The export went over the same TLS: every record is in the SIEM streams.
    let client = tls
        .options("test", &url)
        .connect(url.as_str())
        .await
        .expect("connect over TLS");
    let js = async_nats::jetstream::new(client);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // The sensor's records (the collector's own alarms are exported too).
        let mut total = 0;
        for site in ["plant-01", SITE] {
            if let Ok(s) = js
                .get_stream(format!("CONDUIT_{}", site.to_uppercase()))
                .await
                && let Ok(c) = s
                    .create_consumer(async_nats::jetstream::consumer::pull::Config {
                        filter_subject: format!("conduit.{site}.{SENSOR}.>"),
                        ack_policy: async_nats::jetstream::consumer::AckPolicy::None,
                        inactive_threshold: Duration::from_secs(1),
                        ..Default::default()
                    })
                    .await
            {
                total += c.cached_info().num_pending;
            }
        }
        if total == head {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the SIEM streams hold {total} of {head} records\n{}",
            a.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(server);
}
