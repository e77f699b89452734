//! Records per second through the whole record path on one core, as the agent writes
//! them: build a realistic flow_end Record, encode, chain (blake3), checkpoint-sign
//! (default policy: every 1000 records / 10 s) and append to the spool in groups of
//! `GROUP_COMMIT_RECORDS` (one `write(2)` each, default fsync policy), next to plain
//! `write(2)` appends of the same bytes to a file (no hashing, no signing, no sync).
//! One `write(2)` per record (the agent before group commit) is printed as well.
//!
//! `cargo run --release -p conduit-evidence --example bench_chain [-- RECORDS]`

/// The agent's allocator (conduit-sensor's `main.rs`), so that this measures its path.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::fs::OpenOptions;
use std::io::Write as _;
use std::time::{Instant, SystemTime};

use conduit_evidence::chain::{GROUP_COMMIT_RECORDS, Recorder, RecorderOptions};
use conduit_proto::v1::{self, Counts, FlowEndReason, RecordKind, Verdict, record::Body};
use prost::Message as _;

/// CPU time of this process (all threads), seconds: on a shared machine wall time
/// measures the neighbours too.
fn cpu_secs() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec to the valid pointer we pass.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return f64::NAN;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// Records per `append_batch` call and per plain write(2): the agent's group.
const BATCH: u64 = GROUP_COMMIT_RECORDS as u64;

fn flow_end(i: u64, now: i64) -> v1::Record {
    v1::Record {
        software_version: String::new(),
        kind: RecordKind::FlowEnd as i32,
        time_unix_nano: now,
        sensor_id: String::new(),
        site: "plant-01".to_owned(),
        body: Some(Body::Flow(v1::Flow {
            anomalies: Vec::new(),
            pq_offered: false,
            tls_cipher: String::new(),
            tls_curve: String::new(),
            pq_negotiated: false,
            host_id: String::new(),
            host_name: String::new(),
            destination_domain: String::new(),
            ech_announced: false,
            conflicting_server_names: Vec::new(),
            source_mac: Vec::new(),
            attribution: String::new(),
            flow_id: 0x9e37_79b9_7f4a_7c15 ^ i,
            start_unix_nano: now - 61_000_000_000,
            end_unix_nano: now - 1_000_000,
            ingress_interface: "eth1".to_owned(),
            source_ip: vec![10, 10, 1, (i % 250) as u8],
            source_port: 40_000 + (i % 20_000) as u32,
            destination_ip: vec![192, 0, 2, 10],
            destination_port: 443,
            ip_protocol: 6,
            vlan_id: 101,
            source: Some(Counts {
                bytes: 18_230 + i % 977,
                packets: 41,
            }),
            destination: Some(Counts {
                bytes: 1_284_112 + i % 7919,
                packets: 912,
            }),
            tcp_flags_source: 0x1b,
            tcp_flags_destination: 0x1b,
            community_id: "1:LQU9qZlK+B5F3KDmev6m5PMibrg=".to_owned(),
            end_reason: FlowEndReason::EndOfFlow as i32,
            app_protocol: "tls".to_owned(),
            server_name: "api.openai.com".to_owned(),
            ja4: "t13d1516h2_8daaf6152771_02713d6af862".to_owned(),
            tls_version: "1.3".to_owned(),
            alpn: vec!["h2".to_owned(), "http/1.1".to_owned()],
            ech: false,
            zone: "cell-1".to_owned(),
            endpoint: "openai".to_owned(),
            conduit_id: String::new(),
            verdict: Verdict::Violation as i32,
            policy_hash: vec![0xab; 32],
        })),
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: u64 = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(2_000_000);
    let tmp = tempfile::Builder::new()
        .prefix("bench-chain-")
        .tempdir_in(std::env::var_os("BENCH_DIR").unwrap_or_else(|| std::env::temp_dir().into()))?;
    let spool_dir = tmp.path().join("spool");
    let now = i64::try_from(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)?
            .as_nanos(),
    )?;

    let sample = flow_end(1, now).encode_to_vec();
    println!(
        "record: flow_end, {} bytes encoded; {n} records; spool in {}",
        sample.len(),
        spool_dir.display()
    );

    // Chained path: build, encode, hash, sign (every 1000), append, group commit;
    // one append (one write(2)) per record.
    let (mut rec, _) = Recorder::open(RecorderOptions::new(&spool_dir, "gw-bench-01"))?;
    let start = Instant::now();
    for i in 0..n {
        rec.append(flow_end(i, now))?;
    }
    rec.sync()?;
    let single_secs = start.elapsed().as_secs_f64();
    drop(rec);
    std::fs::remove_dir_all(&spool_dir)?;

    // The agent's path: groups of BATCH records per write(2).
    let (mut rec, _) = Recorder::open(RecorderOptions::new(&spool_dir, "gw-bench-01"))?;
    let start = Instant::now();
    let cpu0 = cpu_secs();
    let mut written = 0u64;
    let mut i = 0;
    while i < n {
        let batch: Vec<_> = (i..(i + BATCH).min(n)).map(|j| flow_end(j, now)).collect();
        i += batch.len() as u64;
        written += rec.append_batch(batch)?.len() as u64;
    }
    rec.sync()?;
    let chain_secs = start.elapsed().as_secs_f64();
    let chain_cpu = cpu_secs() - cpu0;
    let stats = rec.stats();
    drop(rec);

    // Plain path: the same encoded bytes, BATCH records per write(2), no hashing,
    // signing, framing or fsync.
    let plain_path = tmp.path().join("plain.bin");
    let mut plain = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&plain_path)?;
    let start = Instant::now();
    let cpu0 = cpu_secs();
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut i = 0;
    while i < n {
        buf.clear();
        for j in i..(i + BATCH).min(n) {
            flow_end(j, now).encode(&mut buf)?;
        }
        i += BATCH;
        plain.write_all(&buf)?;
    }
    plain.sync_data()?;
    let plain_secs = start.elapsed().as_secs_f64();
    let plain_cpu = cpu_secs() - cpu0;

    let chain_rps = n as f64 / chain_secs;
    let plain_rps = n as f64 / plain_secs;
    println!(
        "chained, as the agent writes them (groups of {BATCH}): {n} records ({written} incl. checkpoints) in {chain_secs:.3} s; spool {} bytes in {} segments, {} fsyncs",
        stats.bytes, stats.segments, stats.syncs
    );
    println!("plain:   {n} appends in {plain_secs:.3} s");
    println!(
        "per CPU second (neighbours excluded): chained {:.0} records/s ({chain_cpu:.3} s CPU), plain {:.0} appends/s ({plain_cpu:.3} s CPU)",
        n as f64 / chain_cpu,
        n as f64 / plain_cpu
    );
    let single_rps = n as f64 / single_secs;
    println!(
        "chained, one write(2) per record (the agent before group commit): {single_rps:.0} records/s; goal 500000"
    );
    println!(
        "bench chain records_per_sec={chain_rps:.0} plain_appends_per_sec={plain_rps:.0} ratio={:.3} single_append_records_per_sec={single_rps:.0} batch={BATCH} records_per_cpu_sec={:.0} plain_appends_per_cpu_sec={:.0}",
        chain_rps / plain_rps,
        n as f64 / chain_cpu,
        n as f64 / plain_cpu
    );
    Ok(())
}
