//! Witness cosignatures end to end (issue 13, deliverable 4): a real chain streamed
//! to a real collector, which cosigns the checkpoints it stores and sends the
//! cosignatures back; the sensor keeps them in its spool. Then (a) a sensor that
//! rewrites witnessed history, re-signed with its own key so that only the witness
//! can tell, fails verify-chain at the witnessed seq; (b) a collector that forges a
//! sensor's record in its store (re-linked, checkpoints re-signed with the only key it
//! has, its own, and re-cosigned) fails `conduit-collector verify`, and the sensor's
//! copies of its earlier cosignatures contradict it.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use conduit_evidence::chain::checkpoint::signing_bytes;
use conduit_evidence::chain::cosignature::{self, COSIG_FILE, Cosignature};
use conduit_evidence::chain::verify::{verify_dir, verify_dir_witnessed};
use conduit_evidence::chain::{Recorder, RecorderOptions, keys, record_hash};
use conduit_evidence::spool::frame::{self, FrameRef};
use conduit_evidence::spool::{SyncPolicy, segment};
use conduit_proto::v1::{self, RecordKind, record::Body};
use ed25519_dalek::{Signer as _, SigningKey};
use prost::Message as _;

const SENSOR: &str = "gw-witnessed";

/// (seq, prev_hash, hash, record bytes)
type Frame = (u64, [u8; 32], [u8; 32], Vec<u8>);

/// Changes the flow record at `seq` in the chain in `dir`, re-links every later frame
/// and re-signs every later checkpoint with `key`: all that someone holding `key`
/// can do to make the rewrite verify. Returns the new hash of every frame by seq.
fn rewrite(dir: &Path, seq: u64, key: &SigningKey) -> std::collections::BTreeMap<u64, [u8; 32]> {
    let mut segs = Vec::new();
    for (_, path) in segment::list(dir).expect("list") {
        let buf = fs::read(&path).expect("read");
        let scan = segment::scan(&buf).expect("scan");
        assert!(scan.bad.is_none(), "{}", path.display());
        let frames: Vec<Frame> = scan
            .frames
            .iter()
            .map(|(_, f)| (f.seq, f.prev_hash, f.hash, f.record.to_vec()))
            .collect();
        segs.push((path, buf[..scan.header_len].to_vec(), frames));
    }
    let mut prev: Option<[u8; 32]> = None;
    let mut hashes = std::collections::BTreeMap::new();
    for (_, _, frames) in &mut segs {
        for f in frames.iter_mut() {
            if f.0 == seq {
                let mut r = v1::Record::decode(&f.3[..]).expect("decode");
                let Some(Body::Flow(fl)) = r.body.as_mut() else {
                    panic!("seq {seq} is not a flow record");
                };
                fl.destination_port = 8443;
                f.3 = r.encode_to_vec();
            }
            if f.0 >= seq {
                let p = prev.expect("a frame before the changed one");
                let mut r = v1::Record::decode(&f.3[..]).expect("decode");
                if let Some(Body::Checkpoint(cp)) = r.body.as_mut() {
                    cp.hash = p.to_vec();
                    cp.public_key = key.verifying_key().to_bytes().to_vec();
                    let msg = signing_bytes(&r.sensor_id, cp.seq, &p, cp.time_unix_nano);
                    cp.signature = key.sign(&msg).to_bytes().to_vec();
                    f.3 = r.encode_to_vec();
                }
                f.1 = p;
                f.2 = record_hash(f.0, &p, &f.3);
            }
            prev = Some(f.2);
            hashes.insert(f.0, f.2);
        }
    }
    for (path, header, frames) in &segs {
        let mut out = header.clone();
        for (s, p, h, r) in frames {
            frame::encode_into(
                &FrameRef {
                    seq: *s,
                    prev_hash: *p,
                    hash: *h,
                    record: r,
                },
                &mut out,
            );
        }
        fs::write(path, out).expect("write");
    }
    hashes
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("mkdir");
    for e in fs::read_dir(from).expect("read_dir") {
        let e = e.expect("entry");
        if e.file_type().expect("type").is_file() {
            fs::copy(e.path(), to.join(e.file_name())).expect("copy");
        }
    }
}

/// Writes the report of the last hour and returns its embedded summary.
fn report_summary(store: &Path, html: &Path) -> serde_json::Value {
    let now = conduit_evidence::chain::checkpoint::unix_nanos(std::time::SystemTime::now());
    let t = conduit_evidence::ecs::rfc3339;
    let out = Command::new(env!("CARGO_BIN_EXE_conduit-collector"))
        .args(["report", "--store"])
        .arg(store)
        .args([
            "--since",
            &t(now - 3600 * 1_000_000_000),
            "--until",
            &t(now + 1_000_000_000),
            "--out",
        ])
        .arg(html)
        .output()
        .expect("report");
    assert!(
        matches!(out.status.code(), Some(0 | 3)),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let text = fs::read_to_string(html).expect("html");
    let tag = r#"<script type="application/json" id="summary">"#;
    let start = text.find(tag).expect("summary") + tag.len();
    let end = start + text[start..].find("</script>").expect("end");
    serde_json::from_str(&text[start..end]).expect("summary json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewritten_or_forged_witnessed_head_is_caught() {
    init_tracing();
    let tmp = tempfile::tempdir().expect("tempdir");
    let spool = tmp.path().join("spool");
    let store = tmp.path().join("store");
    let mut o = RecorderOptions::new(&spool, SENSOR);
    o.sync = SyncPolicy::OsOnly;
    o.checkpoint_every_records = 25;
    o.checkpoint_every = Duration::from_secs(3600);
    let (mut rec, _) = Recorder::open(o).expect("open");
    for i in 0..200 {
        rec.append(flow(i)).expect("append");
    }
    rec.checkpoint_now().expect("checkpoint");
    rec.sync().expect("sync");
    let head = rec.head().0;
    drop(rec);

    let c = Collector::start(&store, &tmp.path().join("collector.log"), &["--tofu"]);
    let mut up = Uplink::start(uplink_opts(&c.url("http"), SENSOR), &spool);
    up.wait_acked(head, Duration::from_secs(60)).await;
    // The last record is a checkpoint: once it is stored, it is witnessed.
    let witnessed = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if up.status.borrow().witnessed_seq >= head {
                return;
            }
            if up.status.changed().await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(
        witnessed.is_ok() && up.status.borrow().witnessed_seq == head,
        "head {head} not witnessed: {:?}; log:\n{}",
        *up.status.borrow(),
        c.log_text()
    );
    up.stop().await;

    // Both sides hold the cosignatures, by the collector's own key.
    let witness_pub =
        keys::read_public_key(&store.join("_collector").join(keys::PUB_FILE)).expect("witness key");
    let sensor_side = cosignature::read(&spool).expect("sensor cosignatures");
    let store_side = cosignature::read(&store.join(SENSOR)).expect("store cosignatures");
    assert!(!sensor_side.cosignatures.is_empty());
    assert_eq!(sensor_side.last().map(|c| c.seq), Some(head));
    for c in &sensor_side.cosignatures {
        assert_eq!(c.witness_key, witness_pub);
        assert!(
            store_side.cosignatures.contains(c),
            "{c:?} not in the store"
        );
    }
    let r = verify_dir_witnessed(&spool, None, Some(witness_pub));
    assert!(r.ok(), "{r}");
    assert_eq!(r.cosignatures, sensor_side.cosignatures.len() as u64);
    let (code, text) = collector_verify(&store);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("witness cosignatures match the chain"),
        "{text}"
    );
    // The auditor's report lists the witnessed heads and counts them.
    let summary = report_summary(&store, &tmp.path().join("report.html"));
    let sensor = summary["sensors"]
        .as_array()
        .and_then(|s| s.iter().find(|x| x["id"] == SENSOR))
        .expect("sensor in the summary");
    let n = store_side.cosignatures.len() as u64;
    assert_eq!(sensor["witnessed_heads"], n, "{sensor}");
    assert_eq!(summary["witnessed_heads"], n);
    assert_eq!(sensor["cosignatures_verified"], n);
    assert_eq!(
        sensor["witnessed"]
            .as_array()
            .and_then(|w| w.last())
            .map(|w| w["seq"].clone()),
        Some(head.into())
    );

    // (a) The sensor rewrites a witnessed part of its spool, re-signed with its own
    // key: the chain alone still verifies, the witness's cosignature does not match.
    let changed = 30;
    let sensor_key = keys::load_signing_key(&spool.join(keys::KEY_FILE)).expect("sensor key");
    rewrite(&spool, changed, &sensor_key);
    let bare = tmp.path().join("spool-without-cosignatures");
    copy_dir(&spool, &bare);
    fs::remove_file(bare.join(COSIG_FILE)).expect("rm");
    let r = verify_dir(&bare, None);
    assert!(r.ok(), "the rewrite must verify without a witness: {r}");
    let first_witnessed = sensor_side
        .cosignatures
        .iter()
        .map(|c| c.seq)
        .filter(|s| *s >= changed)
        .min()
        .expect("a witnessed head after the change");
    let r = verify_dir_witnessed(&spool, None, Some(witness_pub));
    let b = r
        .first_bad
        .clone()
        .unwrap_or_else(|| panic!("rewrite not caught:\n{r}"));
    assert_eq!(b.seq, first_witnessed, "{r}");
    assert!(b.what.contains("witnessed head rewritten"), "{}", b.what);
    assert!(
        r.to_string()
            .contains(&format!("first bad sequence number: {first_witnessed}")),
        "{r}"
    );

    // (b) The collector forges a record in its store. It has no sensor key: it
    // re-signs the later checkpoints with its own and re-cosigns the forged heads.
    drop(c);
    let chain = store.join(SENSOR);
    let collector_key =
        keys::load_signing_key(&store.join("_collector").join(keys::KEY_FILE)).expect("key");
    let forged = rewrite(&chain, changed, &collector_key);
    fs::remove_file(chain.join(COSIG_FILE)).expect("rm");
    for c in &store_side.cosignatures {
        let re = Cosignature::sign(
            &collector_key,
            SENSOR,
            c.seq,
            &forged[&c.seq],
            c.time_unix_nano,
        );
        cosignature::append(&chain, &re).expect("append");
    }
    let first_cp_after = conduit_evidence::spool::SpoolReader::all(&chain)
        .filter_map(Result::ok)
        .find(|f| {
            f.seq > changed
                && v1::Record::decode(&f.record_bytes[..])
                    .is_ok_and(|r| r.kind == RecordKind::Checkpoint as i32)
        })
        .expect("a checkpoint after the forged record")
        .seq;
    let (code, text) = collector_verify(&store);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains(&format!("first bad sequence number: {first_cp_after}")),
        "{text}"
    );
    assert!(text.contains("checkpoint signed by another key"), "{text}");
    // The sensor's copies of the collector's earlier cosignatures contradict the
    // forged store: the witness cannot take back what it signed.
    let audit = tmp.path().join("forged-store-vs-sensor-cosignatures");
    copy_dir(&chain, &audit);
    fs::copy(spool.join(COSIG_FILE), audit.join(COSIG_FILE)).expect("copy");
    let sensor_pub = keys::read_public_key(&spool.join(keys::PUB_FILE)).expect("pub");
    let r = verify_dir_witnessed(&audit, Some(sensor_pub), Some(witness_pub));
    assert!(!r.ok(), "{r}");
    let contradicted: Vec<u64> = sensor_side
        .cosignatures
        .iter()
        .filter(|c| c.seq >= changed && forged[&c.seq] != c.hash)
        .map(|c| c.seq)
        .collect();
    assert!(contradicted.contains(&first_witnessed), "{contradicted:?}");
}

/// The spool's frames from `from` on, as the uplink sends them.
fn record_flows(spool: &Path, from: u64, n: u64) -> u64 {
    let mut o = RecorderOptions::new(spool, SENSOR);
    o.sync = SyncPolicy::OsOnly;
    o.checkpoint_every_records = 10;
    o.checkpoint_every = Duration::from_secs(3600);
    let (mut rec, _) = Recorder::open(o).expect("open");
    for i in from..from + n {
        rec.append(flow(i)).expect("append");
    }
    rec.checkpoint_now().expect("checkpoint");
    rec.sync().expect("sync");
    rec.head().0
}

#[test]
fn the_store_cosigns_only_durable_heads_that_extend_what_it_witnessed() {
    use conduit_collector::store::{SensorStore, WitnessError};
    let tmp = tempfile::tempdir().expect("tempdir");
    let spool = tmp.path().join("spool");
    let store = tmp.path().join("store");
    let head = record_flows(&spool, 0, 30);
    let key = keys::read_public_key(&spool.join(keys::PUB_FILE)).expect("pub");
    let witness = SigningKey::from_bytes(&[9; 32]);
    let frames = spool_frames(&spool, 1);
    let mut st = SensorStore::open(&store, SENSOR, key, 1 << 20).expect("open");
    st.apply(&frames[..15]).expect("apply");
    let first = st
        .cosign(15, &witness, 1)
        .expect("cosign")
        .expect("a checkpoint among the first 15 frames");
    assert!(first.seq <= 15);
    assert_eq!(st.cosign(15, &witness, 2), Ok(None), "already witnessed");
    st.apply(&frames[15..]).expect("apply");
    // Not durable yet: nothing.
    assert_eq!(st.cosign(first.seq, &witness, 3), Ok(None));
    let last = st
        .cosign(head, &witness, 4)
        .expect("cosign")
        .expect("new head");
    assert_eq!(last.seq, head);
    assert_eq!(
        cosignature::read(&store.join(SENSOR))
            .expect("read")
            .cosignatures,
        vec![first, last]
    );
    drop(st);

    // The store beneath the witness no longer holds what it witnessed (here: the
    // witness file names another hash for its last head): nothing more is cosigned.
    let planted = Cosignature::sign(&witness, SENSOR, head, &[1; 32], 5);
    cosignature::append(&store.join(SENSOR), &planted).expect("append");
    let mut st = SensorStore::open(&store, SENSOR, key, 1 << 20).expect("reopen");
    let new_head = record_flows(&spool, 100, 15);
    st.apply(&spool_frames(&spool, head + 1)).expect("apply");
    match st.cosign(new_head, &witness, 6) {
        Err(WitnessError::Conflict(why)) => {
            assert!(why.contains("was witnessed with hash"), "{why}")
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(st.cosign(new_head, &witness, 7), Ok(None), "stays refused");
}
