//! `conduit-collector query` on a large store: a narrow window through the time
//! index, next to the baseline of decoding every record (what a query without the
//! index costs), from one run.
//!
//! `cargo run --release -p conduit-collector --example bench_query [RECORDS]`
//! (default 10,000,000) writes a signed chain of RECORDS flow records, one per
//! millisecond of record time, in a temporary store, then prints
//! `bench query records=… store_bytes=… full_decode_s=…
//! narrow_cold_s=… (builds the index) narrow_warm_s=… narrow_matched=… ratio=…`
//! (ratio: warm narrow query time / full decode time), then the auditor's report
//! over the same minute: `bench report minute_s=… minute_flows=… ratio=…` (ratio:
//! the report's time / full decode time), and over the whole store (every record a
//! violation): `bench report whole_s=… whole_flows=… listed=… ratio=…
//! peak_rss_mib_before=… peak_rss_mib_after=…` (the process's peak resident size
//! before and after the whole-store report: its memory is a small tally per flow,
//! and at most `DEFAULT_MAX_ROWS` listed rows per list).

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use conduit_collector::query::{Filter, query};
use conduit_evidence::chain::checkpoint::unix_nanos;
use conduit_evidence::chain::{Recorder, RecorderOptions};
use conduit_evidence::spool::{SpoolReader, SyncPolicy};
use conduit_proto::v1::{self, RecordKind, record::Body};
use prost::Message as _;

fn flow(i: u64, t: i64) -> v1::Record {
    v1::Record {
        software_version: String::new(),
        kind: RecordKind::FlowEnd as i32,
        time_unix_nano: t,
        sensor_id: String::new(),
        site: "plant-01".to_owned(),
        body: Some(Body::Flow(v1::Flow {
            flow_id: i,
            start_unix_nano: t - 1_000_000_000,
            end_unix_nano: t,
            ingress_interface: "eth1".to_owned(),
            source_ip: vec![10, 10, (i >> 8) as u8, i as u8],
            source_port: 40000 + (i % 20000) as u32,
            destination_ip: vec![192, 0, 2, 10],
            destination_port: 443,
            ip_protocol: 6,
            source: Some(v1::Counts {
                bytes: 1234 + i,
                packets: 12,
            }),
            destination: Some(v1::Counts {
                bytes: 54321,
                packets: 40,
            }),
            server_name: "api.openai.com".to_owned(),
            app_protocol: "tls".to_owned(),
            zone: "cell-1".to_owned(),
            endpoint: "openai".to_owned(),
            verdict: v1::Verdict::Violation as i32,
            ..Default::default()
        })),
    }
}

/// The recorder's clock follows the synthetic timeline, so checkpoints are stamped
/// with the time of the records around them, as in a real store.
static NOW_NANOS: AtomicI64 = AtomicI64::new(0);

fn synthetic_now() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_nanos(NOW_NANOS.load(Ordering::Relaxed).max(0) as u64)
}

fn main() -> anyhow::Result<()> {
    let n: u64 = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(10_000_000);
    let tmp = tempfile::tempdir()?;
    let store = tmp.path().join("store");
    let dir = store.join("gw-01");
    let t0 = unix_nanos(SystemTime::now()) - (n as i64) * 1_000_000;
    {
        let mut opts = RecorderOptions::new(&dir, "gw-01");
        opts.sync = SyncPolicy::OsOnly;
        opts.max_spool_bytes = u64::MAX;
        opts.checkpoint_every_records = 10_000;
        opts.checkpoint_every = Duration::from_secs(3600 * 24 * 365);
        opts.clock = synthetic_now;
        NOW_NANOS.store(t0, Ordering::Relaxed);
        let mut rec = Recorder::open(opts)?.0;
        let mut batch = Vec::with_capacity(1000);
        for i in 0..n {
            let t = t0 + (i as i64) * 1_000_000;
            batch.push(flow(i, t));
            if batch.len() == 1000 {
                NOW_NANOS.store(t, Ordering::Relaxed);
                rec.append_batch(std::mem::take(&mut batch))?;
            }
        }
        rec.append_batch(batch)?;
        rec.sync()?;
    }
    let store_bytes: u64 = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();

    // Baseline: read and decode every record of the chain.
    let started = Instant::now();
    let mut reader = SpoolReader::new(&dir, 1);
    let mut decoded = 0u64;
    while let Some(f) = reader.next_frame()? {
        let r = v1::Record::decode(&f.record_bytes[..])?;
        decoded += u64::from(r.time_unix_nano != 0);
    }
    let full = started.elapsed().as_secs_f64();

    // One minute of records from the middle of the store.
    let mid = t0 + (n as i64 / 2) * 1_000_000;
    let filter = Filter {
        since: Some(mid),
        until: Some(mid + 60_000_000_000),
        ..Filter::default()
    };
    let run = || -> anyhow::Result<(f64, u64)> {
        let started = Instant::now();
        let mut matched = 0u64;
        query(&store, &filter, |item| {
            matched += u64::from(item.pos.seq > 0);
            Ok(())
        })?;
        Ok((started.elapsed().as_secs_f64(), matched))
    };
    let (cold, matched) = run()?;
    let (warm, again) = run()?;
    anyhow::ensure!(
        matched == again,
        "the two runs differ: {matched} vs {again}"
    );
    println!(
        "bench query records={n} decoded={decoded} store_bytes={store_bytes} full_decode_s={full:.2} \
         narrow_cold_s={cold:.3} narrow_warm_s={warm:.4} narrow_matched={matched} ratio={:.5}",
        warm / full
    );

    // The report (summary and HTML) over that minute.
    let now = unix_nanos(SystemTime::now());
    let report = |since: i64, until: i64| -> anyhow::Result<(f64, u64, usize)> {
        let started = Instant::now();
        let summary = conduit_collector::report::build(
            &store,
            since,
            until,
            now,
            conduit_collector::report::DEFAULT_MAX_ROWS,
        )?;
        let html = conduit_collector::report::render_html(&summary)?;
        anyhow::ensure!(
            summary.verified && !html.is_empty(),
            "the report did not verify the store"
        );
        Ok((
            started.elapsed().as_secs_f64(),
            summary.flows,
            summary.violation_list.len(),
        ))
    };
    let (minute_s, minute_flows, _) = report(mid, mid + 60_000_000_000)?;
    println!(
        "bench report minute_s={minute_s:.3} minute_flows={minute_flows} ratio={:.4}",
        minute_s / full
    );
    let before = peak_rss_mib();
    let (whole_s, whole_flows, listed) = report(0, i64::MAX / 2)?;
    println!(
        "bench report whole_s={whole_s:.2} whole_flows={whole_flows} listed={listed} ratio={:.3} \
         peak_rss_mib_before={before} peak_rss_mib_after={}",
        whole_s / full,
        peak_rss_mib()
    );
    Ok(())
}

/// The process's peak resident set (VmHWM), MiB.
fn peak_rss_mib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024)
}
