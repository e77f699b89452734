//! Raw protocol against a collector process: de-duplication, equivocation, gaps,
//! tampered hashes, unknown sensors, wrong versions; alarms land in the alarm chain.

mod common;

use std::time::Duration;

use common::*;
use conduit_evidence::chain::record_hash;
use conduit_evidence::spool::SpoolReader;
use conduit_proto::v1::{
    self, CollectorMessage, RejectCode, SensorMessage, collector_client::CollectorClient,
    collector_message, sensor_message,
};
use prost::Message as _;
use tokio::sync::mpsc;
use tonic::Streaming;

const SENSOR: &str = "gw-raw";

/// The sensor's signing key: every batch is signed over its last frame.
static SIGNER: std::sync::OnceLock<ed25519_dalek::SigningKey> = std::sync::OnceLock::new();

struct Conn {
    tx: mpsc::Sender<SensorMessage>,
    rx: Streaming<CollectorMessage>,
}

async fn connect(port: u16, hello: v1::Hello) -> (Conn, collector_message::Msg) {
    let mut client = CollectorClient::connect(format!("http://127.0.0.1:{port}"))
        .await
        .expect("connect");
    let (tx, rx) = mpsc::channel(16);
    tx.send(SensorMessage {
        msg: Some(sensor_message::Msg::Hello(hello)),
    })
    .await
    .expect("hello");
    let mut rx = client
        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("stream")
        .into_inner();
    let first = next(&mut rx).await;
    (Conn { tx, rx }, first)
}

async fn next(rx: &mut Streaming<CollectorMessage>) -> collector_message::Msg {
    tokio::time::timeout(Duration::from_secs(10), rx.message())
        .await
        .expect("timeout")
        .expect("status")
        .and_then(|m| m.msg)
        .expect("message")
}

fn hello(key: &[u8; 32], version: u32) -> v1::Hello {
    v1::Hello {
        protocol_version: version,
        sensor_id: SENSOR.to_owned(),
        public_key: key.to_vec(),
        head_seq: 0,
        head_hash: Vec::new(),
    }
}

impl Conn {
    async fn send(&mut self, frames: &[v1::Frame]) -> collector_message::Msg {
        self.tx
            .send(SensorMessage {
                msg: Some(sensor_message::Msg::Batch(v1::Batch {
                    frames: frames.to_vec(),
                    signature: sign(frames),
                    gap: None,
                })),
            })
            .await
            .expect("send");
        next(&mut self.rx).await
    }
}

fn sign(frames: &[v1::Frame]) -> Vec<u8> {
    let (Some(key), Some(last)) = (SIGNER.get(), frames.last()) else {
        return Vec::new();
    };
    let hash: [u8; 32] = last.hash[..].try_into().unwrap_or([0; 32]);
    conduit_evidence::chain::checkpoint::sign_batch(key, SENSOR, last.seq, &hash)
}

fn frames(spool: &std::path::Path) -> Vec<v1::Frame> {
    SpoolReader::new(spool, 1)
        .map(|f| f.expect("read"))
        .map(|f| v1::Frame {
            seq: f.seq,
            prev_hash: f.prev_hash.to_vec().into(),
            hash: f.hash.to_vec().into(),
            record: f.record_bytes.into(),
        })
        .collect()
}

fn expect_ack(m: collector_message::Msg, seq: u64) {
    match m {
        collector_message::Msg::Ack(a) => assert_eq!(a.stored_seq, seq),
        other => panic!("expected Ack {seq}, got {other:?}"),
    }
}

/// After an Ack, the collector answers a refused batch with Reject.
async fn expect_reject(conn: &mut Conn, first: collector_message::Msg, code: RejectCode) -> u64 {
    let mut m = first;
    if let collector_message::Msg::Ack(_) = m {
        m = next(&mut conn.rx).await;
    }
    match m {
        collector_message::Msg::Reject(r) => {
            assert_eq!(r.code, code as i32, "{}", r.message);
            r.seq
        }
        other => panic!("expected Reject {code:?}, got {other:?}"),
    }
}

fn alarm_kinds(store: &std::path::Path) -> Vec<String> {
    frames(&store.join("_collector"))
        .iter()
        .filter_map(|f| v1::Record::decode(&f.record[..]).ok())
        .filter_map(|r| match r.body {
            Some(v1::record::Body::Alarm(a)) => Some(a.kind),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedupe_equivocation_gap_tamper_and_authentication() {
    init_tracing();
    let tmp = tempfile::tempdir().expect("tempdir");
    let spool = tmp.path().join("spool");
    let store = tmp.path().join("store");
    let keys = tmp.path().join("keys");
    std::fs::create_dir_all(&keys).expect("mkdir");
    let head = write_spool(&spool, SENSOR, 40);
    let all = frames(&spool);
    assert_eq!(all.len() as u64, head);
    let key: [u8; 32] =
        conduit_evidence::chain::keys::read_public_key(&spool.join("signing.pub")).expect("pub");
    let _ = SIGNER.set(
        conduit_evidence::chain::keys::load_signing_key(&spool.join("signing.key")).expect("key"),
    );
    let metrics = format!("127.0.0.1:{}", free_port());
    let c = Collector::start(
        &store,
        &tmp.path().join("collector.log"),
        &[
            "--trusted-keys",
            keys.to_str().expect("utf8"),
            "--metrics",
            &metrics,
        ],
    );

    // Unknown sensor (no key file, no --tofu).
    let (_conn, m) = connect(c.port, hello(&key, 1)).await;
    assert!(
        matches!(m, collector_message::Msg::Reject(r) if r.code == RejectCode::UnknownSensor as i32)
    );
    std::fs::copy(
        spool.join("signing.pub"),
        keys.join(format!("{SENSOR}.pub")),
    )
    .expect("trust");
    // Wrong key.
    let (_conn, m) = connect(c.port, hello(&[7; 32], 1)).await;
    assert!(
        matches!(m, collector_message::Msg::Reject(r) if r.code == RejectCode::KeyMismatch as i32)
    );
    // Wrong protocol version.
    let (_conn, m) = connect(c.port, hello(&key, 99)).await;
    assert!(
        matches!(m, collector_message::Msg::Reject(r) if r.code == RejectCode::Version as i32 && r.message.contains("version 1"))
    );

    let (mut conn, m) = connect(c.port, hello(&key, 1)).await;
    assert!(matches!(m, collector_message::Msg::Welcome(w) if w.last_stored_seq == 0));
    expect_ack(conn.send(&all[..10]).await, 10);
    // Re-sent frames (5..=15): 5..=10 skipped, 11..=15 stored.
    expect_ack(conn.send(&all[4..15]).await, 15);
    expect_ack(conn.send(&all[..15]).await, 15);

    // Equivocation: seq 10 again with other bytes and a correct hash for them.
    let mut eq = all[9].clone();
    let mut rec = v1::Record::decode(&eq.record[..]).expect("decode");
    rec.time_unix_nano += 1;
    eq.record = rec.encode_to_vec().into();
    let prev: [u8; 32] = eq.prev_hash[..].try_into().expect("32");
    eq.hash = record_hash(eq.seq, &prev, &eq.record).to_vec().into();
    let m = conn.send(&[eq]).await;
    assert_eq!(
        expect_reject(&mut conn, m, RejectCode::Equivocation).await,
        10
    );

    // Gap: 20 after 15.
    let (mut conn, m) = connect(c.port, hello(&key, 1)).await;
    assert!(matches!(m, collector_message::Msg::Welcome(w) if w.last_stored_seq == 15));
    let m = conn.send(&all[19..25]).await;
    assert_eq!(expect_reject(&mut conn, m, RejectCode::Gap).await, 16);

    // Tampered record bytes (hash no longer matches).
    let (mut conn, _) = connect(c.port, hello(&key, 1)).await;
    let mut bad = all[15].clone();
    let mut record = bad.record.to_vec();
    let last = record.len() - 1;
    record[last] ^= 1;
    bad.record = record.into();
    let m = conn.send(&[bad]).await;
    assert_eq!(expect_reject(&mut conn, m, RejectCode::BadHash).await, 16);

    // A tampered batch stored nothing; the rest still goes through.
    let (mut conn, m) = connect(c.port, hello(&key, 1)).await;
    assert!(matches!(m, collector_message::Msg::Welcome(w) if w.last_stored_seq == 15));
    expect_ack(conn.send(&all[15..]).await, head);
    assert_eq!(verified_records(&store.join(SENSOR)), head);

    // Alarms: logged, counted and in the signed alarm chain.
    let kinds = alarm_kinds(&store);
    for k in [
        "unknown_sensor",
        "key_mismatch",
        "equivocation",
        "gap",
        "bad_hash",
    ] {
        assert!(kinds.iter().any(|x| x == k), "no {k} alarm in {kinds:?}");
    }
    verified_records(&store.join("_collector"));
    assert!(c.log_text().contains("ALARM"));
    let text = http_get(&metrics);
    for line in [
        "conduit_collector_alarms_total{kind=\"gap\"} 1",
        "conduit_collector_alarms_total{kind=\"equivocation\"} 1",
        "conduit_collector_alarms_total{kind=\"unknown_sensor\"} 1",
    ] {
        assert!(text.contains(line), "{text}");
    }
    // Where the sensor's chain stands: its stored head and when it last spoke.
    let sample = |name: &str| -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(&format!("{name}{{sensor=\"{SENSOR}\"}} ")))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    };
    assert!(
        sample("conduit_collector_sensor_head_sequence").is_some_and(|v| v >= 1.0),
        "{text}"
    );
    assert!(
        sample("conduit_collector_sensor_last_seen_timestamp_seconds").is_some_and(|v| v > 1.7e9),
        "{text}"
    );

    // `verify` finds a flipped byte in the store and names the seq.
    drop(conn);
    let seg = store.join(SENSOR).join("seg-00000000000000000001.cspool");
    let mut bytes = std::fs::read(&seg).expect("read");
    let n = bytes.len();
    bytes[n - 3] ^= 0x40;
    std::fs::write(&seg, bytes).expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_conduit-collector"))
        .args(["verify", "--store", store.to_str().expect("utf8")])
        .output()
        .expect("verify");
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("first bad sequence number: {head}")),
        "{text}"
    );
}
