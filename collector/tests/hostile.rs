//! Hostile peers against a collector process (issue 10): descriptor exhaustion
//! (failure 1), oversized ids (2), amplifying batches before Hello (3), reserved
//! names and sensor ALARMs (6), Hello-then-disconnect (7), a silent stream holding
//! the slot. After each attack an honest sensor must still stream.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use conduit_evidence::chain::keys;
use conduit_proto::v1::{
    self, CollectorMessage, RejectCode, SensorMessage, collector_client::CollectorClient,
    collector_message, sensor_message,
};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tonic::Streaming;

/// Waits for `cond` with a deadline; panics with `what` after it.
fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for {what}");
}

/// Starts the collector binary under `prlimit --nofile=N:N`.
fn start_limited(nofile: u32, store: &Path, log: &Path, port: u16, extra: &[&str]) -> Child {
    let out = std::fs::File::create(log).expect("log");
    let child = Command::new("prlimit")
        .arg(format!("--nofile={nofile}:{nofile}"))
        .arg(env!("CARGO_BIN_EXE_conduit-collector"))
        .args(["run", "--listen", &format!("127.0.0.1:{port}"), "--store"])
        .arg(store)
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(out)
        .spawn()
        .expect("spawn prlimit conduit-collector");
    wait_for("the collector to listen", Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    child
}

/// `n` idle TCP connections spread over source addresses 127.0.0.2.. (4 per address,
/// under the per-peer cap), that never speak.
async fn idle_connections(port: u16, n: usize) -> Vec<TcpStream> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let sock = TcpSocket::new_v4().expect("socket");
        let src = std::net::Ipv4Addr::new(127, 0, 1 + (i / 4 / 250) as u8, 2 + (i / 4 % 250) as u8);
        sock.bind((src, 0).into()).expect("bind source");
        if let Ok(Ok(s)) = tokio::time::timeout(
            Duration::from_secs(5),
            sock.connect(([127, 0, 0, 1], port).into()),
        )
        .await
        {
            out.push(s);
        }
    }
    out
}

fn sigterm(child: &Child) {
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill -TERM failed");
}

fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            return st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the collector did not exit within {timeout:?} of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Failure 1: with 64 descriptors and hundreds of idle connections the accept loop
/// keeps going, idle connections are closed, an honest sensor streams, SIGTERM exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_keeps_serving_and_sigterm_exits() {
    init_tracing();
    let tmp = tempfile::tempdir().expect("tempdir");
    let (store, spool, log) = (
        tmp.path().join("store"),
        tmp.path().join("spool"),
        tmp.path().join("collector.log"),
    );
    let port = free_port();
    let mut child = start_limited(64, &store, &log, port, &["--tofu", "--hello-timeout", "2"]);
    let attackers = idle_connections(port, 200).await;
    assert!(attackers.len() > 64, "only {} connections", attackers.len());
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_for(
        "an accept error in the log",
        Duration::from_secs(20),
        || log_text().contains("accept failed"),
    );

    let head = write_spool(&spool, "gw-honest", 300);
    let mut up = Uplink::start(
        uplink_opts(&format!("http://127.0.0.1:{port}"), "gw-honest"),
        &spool,
    );
    up.wait_acked(head, Duration::from_secs(90)).await;
    up.stop().await;
    assert_eq!(verified_records(&store.join("gw-honest")), head);

    // The server closed the idle connections it accepted (EOF or reset on read).
    let mut closed = 0;
    for mut s in attackers.into_iter().take(20) {
        // Read past the server's HTTP/2 preface to the end of the stream.
        let drained = tokio::time::timeout(Duration::from_secs(20), async {
            let mut b = [0u8; 256];
            while let Ok(n @ 1..) = tokio::io::AsyncReadExt::read(&mut s, &mut b).await {
                let _ = n;
            }
        })
        .await;
        closed += usize::from(drained.is_ok());
    }
    assert_eq!(closed, 20, "idle connections were not closed");

    // SIGTERM while idle connections are held again.
    let _held = idle_connections(port, 100).await;
    sigterm(&child);
    let st = wait_exit(&mut child, Duration::from_secs(30));
    assert!(st.success(), "exit status {st}; log:\n{}", log_text());
}

struct Raw {
    tx: mpsc::Sender<SensorMessage>,
    rx: Streaming<CollectorMessage>,
}

/// Opens a stream whose first message is `first`; returns the first answer (or the
/// status the stream ended with).
async fn open(
    c: &Collector,
    first: SensorMessage,
) -> (Raw, Result<collector_message::Msg, String>) {
    let mut client = match CollectorClient::connect(c.url("http")).await {
        Ok(client) => client,
        Err(e) => panic!(
            "connect: {e:?}; collector {}; log:\n{}",
            c.status(),
            c.log_text()
        ),
    };
    let (tx, rx) = mpsc::channel(4);
    tx.send(first).await.expect("first message");
    let rx = client
        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map(tonic::Response::into_inner);
    let mut rx = match rx {
        Ok(rx) => rx,
        Err(status) => panic!("stream refused: {status}"),
    };
    let answer = next(&mut rx).await;
    (Raw { tx, rx }, answer)
}

async fn next(rx: &mut Streaming<CollectorMessage>) -> Result<collector_message::Msg, String> {
    match tokio::time::timeout(Duration::from_secs(30), rx.message()).await {
        Err(_) => Err("timeout".to_owned()),
        Ok(Err(status)) => Err(status.to_string()),
        Ok(Ok(None)) => Err("end of stream".to_owned()),
        Ok(Ok(Some(m))) => m.msg.ok_or_else(|| "empty message".to_owned()),
    }
}

fn hello(sensor_id: &str, key: &[u8]) -> SensorMessage {
    SensorMessage {
        msg: Some(sensor_message::Msg::Hello(v1::Hello {
            protocol_version: 1,
            sensor_id: sensor_id.to_owned(),
            public_key: key.to_vec(),
            head_seq: 0,
            head_hash: Vec::new(),
        })),
    }
}

fn batch(frames: Vec<v1::Frame>) -> SensorMessage {
    signed_batch(frames, None, "")
}

/// A batch, signed by `key` (as sensor `sensor_id`) over its last frame.
fn signed_batch(
    frames: Vec<v1::Frame>,
    key: Option<&ed25519_dalek::SigningKey>,
    sensor_id: &str,
) -> SensorMessage {
    let signature = match (key, frames.last()) {
        (Some(k), Some(last)) => conduit_evidence::chain::checkpoint::sign_batch(
            k,
            sensor_id,
            last.seq,
            &last.hash[..].try_into().unwrap_or([0; 32]),
        ),
        _ => Vec::new(),
    };
    SensorMessage {
        msg: Some(sensor_message::Msg::Batch(v1::Batch {
            frames,
            signature,
            gap: None,
        })),
    }
}

fn rejected(answer: &Result<collector_message::Msg, String>) -> Option<(RejectCode, usize)> {
    match answer {
        Ok(collector_message::Msg::Reject(r)) => Some((
            RejectCode::try_from(r.code).unwrap_or(RejectCode::Unspecified),
            r.message.len(),
        )),
        _ => None,
    }
}

/// Peak resident memory of a process (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Failures 2, 3, 6, 7 and a silent stream, against one collector; an honest sensor
/// streams afterwards and the whole store (alarm chain included) verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_messages_are_refused_cheaply() {
    init_tracing();
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = tmp.path().join("store");
    let c = Collector::start(
        &store,
        &tmp.path().join("collector.log"),
        &["--tofu", "--stream-idle-timeout", "2"],
    );
    let key = [7u8; 32];

    // Failure 2: a 20 MB sensor id is refused at decoding; 100 KB is refused by
    // the grammar with a bounded message and a bounded alarm.
    let (_, a) = open(&c, hello(&"A".repeat(20 << 20), &key)).await;
    assert!(a.is_err(), "a 20 MB Hello was accepted: {a:?}");
    let (_, a) = open(&c, hello(&"B".repeat(100 << 10), &key)).await;
    let (code, len) = rejected(&a).unwrap_or_else(|| panic!("not rejected: {a:?}"));
    assert_eq!(code, RejectCode::Identity);
    assert!(len < 4096, "reject message of {len} bytes");

    // Failure 3: a first message of empty frames, no Hello. Over the message limit,
    // and under it but over the frame count: refused before decoding.
    let before = peak_rss(c.child.id());
    for n in [2_000_000usize, 500_000] {
        let (_, a) = open(&c, batch(vec![v1::Frame::default(); n])).await;
        assert!(
            a.is_err() || rejected(&a).is_some(),
            "{n} empty frames accepted: {a:?}"
        );
    }
    let grown = peak_rss(c.child.id()).saturating_sub(before);
    assert!(grown < 64 << 20, "peak memory grew by {grown} bytes");

    // Failure 6: the collector's own names cannot be claimed.
    for id in ["collector", "exports", "EXPORTS", "_collector"] {
        let (_, a) = open(&c, hello(id, &key)).await;
        assert_eq!(
            rejected(&a).map(|r| r.0),
            Some(RejectCode::Identity),
            "{id}: {a:?}"
        );
    }

    // Failure 6: an ALARM record signed into a sensor's chain is refused.
    let spool = tmp.path().join("alarm-spool");
    let mut rec = recorder(&spool, "gw-forger");
    rec.append(v1::Record {
        kind: v1::RecordKind::Alarm as i32,
        body: Some(v1::record::Body::Alarm(v1::Alarm {
            kind: "gap".to_owned(),
            sensor_id: "gw-victim".to_owned(),
            seq: 1,
            detail: "forged".to_owned(),
        })),
        ..Default::default()
    })
    .expect("append");
    rec.sync().expect("sync");
    drop(rec);
    let forger_key = keys::read_public_key(&spool.join(keys::PUB_FILE)).expect("key");
    let forger_signer = keys::load_signing_key(&spool.join(keys::KEY_FILE)).expect("key");
    let frames = spool_frames(&spool, 1);
    let (mut raw, a) = open(&c, hello("gw-forger", &forger_key)).await;
    assert!(matches!(a, Ok(collector_message::Msg::Welcome(_))), "{a:?}");
    raw.tx
        .send(signed_batch(frames, Some(&forger_signer), "gw-forger"))
        .await
        .expect("send");
    let a = next(&mut raw.rx).await;
    assert_eq!(
        rejected(&a).map(|r| r.0),
        Some(RejectCode::BadRecord),
        "{a:?}"
    );

    // Failure 7: Hello then disconnect leaves nothing on disk.
    let (raw, a) = open(&c, hello("gw-ghost", &key)).await;
    assert!(matches!(a, Ok(collector_message::Msg::Welcome(_))), "{a:?}");
    drop(raw);

    // A silent stream is evicted, and the sensor can connect again (not BUSY).
    let (mut raw, a) = open(&c, hello("gw-silent", &key)).await;
    assert!(matches!(a, Ok(collector_message::Msg::Welcome(_))), "{a:?}");
    let end = next(&mut raw.rx).await;
    assert!(end.is_err(), "silent stream got {end:?}");
    let (_raw2, a) = open(&c, hello("gw-silent", &key)).await;
    assert!(matches!(a, Ok(collector_message::Msg::Welcome(_))), "{a:?}");

    // The honest sensor still streams.
    let spool = tmp.path().join("honest");
    let head = write_spool(&spool, "gw-honest", 200);
    let mut up = Uplink::start(uplink_opts(&c.url("http"), "gw-honest"), &spool);
    up.wait_acked(head, Duration::from_secs(30)).await;
    up.stop().await;

    // Failure 4: an attacker who knows the sensor's public key (plain text, no
    // client certificate) appends frames with valid hashes that continue its chain;
    // without the sensor's signing key the batch is refused and nothing is stored.
    let honest_key = keys::read_public_key(&spool.join(keys::PUB_FILE)).expect("key");
    let (head_seq, head_hash) = {
        let last = spool_frames(&spool, head).pop().expect("head frame");
        (last.seq, <[u8; 32]>::try_from(&last.hash[..]).expect("32"))
    };
    let record = prost::Message::encode_to_vec(&flow(9999));
    let forged = v1::Frame {
        seq: head_seq + 1,
        prev_hash: head_hash.to_vec().into(),
        hash: conduit_evidence::chain::record_hash(head_seq + 1, &head_hash, &record)
            .to_vec()
            .into(),
        record: record.into(),
    };
    let other = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
    for signer in [None, Some(&other)] {
        let (mut raw, a) = open(&c, hello("gw-honest", &honest_key)).await;
        assert!(matches!(a, Ok(collector_message::Msg::Welcome(_))), "{a:?}");
        raw.tx
            .send(signed_batch(vec![forged.clone()], signer, "gw-honest"))
            .await
            .expect("send");
        let a = next(&mut raw.rx).await;
        assert_eq!(
            rejected(&a).map(|r| r.0),
            Some(RejectCode::BadSignature),
            "{a:?}"
        );
    }
    assert_eq!(verified_records(&store.join("gw-honest")), head);

    assert!(
        !store.join("gw-ghost").exists(),
        "Hello alone created a store directory"
    );
    let (code, out) = collector_verify(&store);
    assert_eq!(code, Some(0), "store does not verify:\n{out}");
    // The alarm chain holds bounded records only.
    let alarm_bytes: u64 = std::fs::read_dir(store.join("_collector"))
        .expect("alarm chain")
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    assert!(alarm_bytes < 1 << 20, "alarm chain is {alarm_bytes} bytes");
}
