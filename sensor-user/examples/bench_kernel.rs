//! Kernel program cost per packet, measured with BPF_PROG_TEST_RUN (needs root), in
//! the configuration of a live gateway: the gateway's own addresses set (as the agent
//! sets them), the lab's conduit map with the AI endpoint catalogue installed, and
//! real client bytes.
//!
//! `cargo run --release -p sensor-user --example bench_kernel`
//!
//! - lru is one LRU lookup + update with an 8-byte key; lru_flowkey the same with a
//!   40-byte FlowKey (the flow table's key, so the hashing cost is the same).
//! - empty, lru, established: `repeat` = 1,000,000 in one syscall; the kernel reports
//!   the mean time per run; we print the median of 9 such runs.
//! - new_flow: every run must create a flow, so `repeat` cannot be used (it reruns the
//!   same packet = same key). We run 20,000 packets with distinct source ports,
//!   `repeat` = 1 each, and print the median of the kernel-reported durations (which
//!   exclude syscall overhead but have ~tens of ns of timer granularity). It includes
//!   the flow insert and the NEW ring-buffer event.
//! - client_hello: a SYN creates the flow (not timed), then Chromium 156's 1,922-byte
//!   ClientHello (captured, `src/tls/testdata`) in two segments (1,448 + 474 bytes),
//!   each timed with `repeat` = 1: parse, count, tail call, the SNI walk, its hash,
//!   the policy lookups and the ring-buffer payload copies. Median of 5,000 flows
//!   (the sum of both segments).
//! - quic_initial: a new UDP flow whose first packet is a QUIC v1 Initial (RFC 9001
//!   A.2, 1,200 bytes): flow insert, NEW event and the payload copy. Median of 5,000.

use anyhow::{Context as _, bail};
use etherparse::PacketBuilder;
use sensor_user::{
    config::ConduitMap,
    kernel::{Kernel, KernelOptions, Program},
    kernel_policy::kernel_policy,
};

const REPEAT: u32 = 1_000_000;
const RUNS: usize = 9;

fn frame(ip: &[u8]) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00];
    f.extend_from_slice(ip);
    f
}

fn tcp(sport: u16, syn: bool, payload: &[u8]) -> anyhow::Result<Vec<u8>> {
    tcp_at(sport, syn, 1, payload)
}

fn tcp_at(sport: u16, syn: bool, seq: u32, payload: &[u8]) -> anyhow::Result<Vec<u8>> {
    let b = PacketBuilder::ipv4(CLIENT, SERVER, 64).tcp(sport, 443, seq, 1000);
    let b = if syn { b.syn() } else { b.ack(1) };
    let mut out = Vec::new();
    b.write(&mut out, payload)?;
    Ok(frame(&out))
}

fn udp(sport: u16, payload: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    PacketBuilder::ipv4(CLIENT, SERVER, 64)
        .udp(sport, 443)
        .write(&mut out, payload)?;
    Ok(frame(&out))
}

/// An OT host in the lab map's zone `cell-1`, and an AI endpoint address.
const CLIENT: [u8; 4] = [10, 10, 1, 5];
const SERVER: [u8; 4] = [192, 0, 2, 10];
/// The gateway's own addresses (the agent sets those of its interfaces).
const GATEWAY: [&str; 4] = ["10.10.1.1", "10.20.0.1", "198.51.100.1", "fd00:10:1::1"];

fn unhex(text: &str) -> anyhow::Result<Vec<u8>> {
    Ok(hex::decode(text.split_whitespace().collect::<String>())?)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn repeated(k: &Kernel, prog: Program, pkt: &[u8]) -> anyhow::Result<f64> {
    let mut runs = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let r = k.test_run_opts(prog, pkt, REPEAT, None)?;
        runs.push(r.duration.as_nanos() as f64);
    }
    Ok(median(runs))
}

fn main() -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIP: needs root");
        return Ok(());
    }
    let mut k = Kernel::load(&KernelOptions::default()).context("loading the kernel programs")?;
    let gateway: Vec<std::net::IpAddr> = GATEWAY
        .iter()
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    k.set_local_addrs(&gateway)?;
    let lab_map =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/lab/conduits.yaml");
    let map = ConduitMap::load(&lab_map, None).map_err(|e| anyhow::anyhow!("{e}"))?;
    k.install_policy(&kernel_policy(&map, false)?)?;
    println!(
        "live configuration: {} local addresses; conduit map {} ({} zones, {} endpoints with the catalogue, {} conduits)",
        gateway.len(),
        lab_map.display(),
        map.zones.len(),
        map.endpoints.len(),
        map.conduits.len()
    );

    let empty = repeated(&k, Program::BenchEmpty, &tcp(1, true, b"")?)?;
    let lru = repeated(&k, Program::BenchLru, &tcp(1, true, b"")?)?;
    let lru40 = repeated(&k, Program::BenchLruFlowKey, &tcp(1, true, b"")?)?;

    // Established: SYN and a first (non-TLS) payload make the flow DONE; then the
    // same data packet again and again.
    k.test_run(Program::Xdp, &tcp(2, true, b"")?)?;
    let data = tcp(2, false, &[0x42; 100])?;
    k.test_run(Program::Xdp, &data)?;
    let established = repeated(&k, Program::Xdp, &data)?;
    k.drain_events();

    let mut new_flow = Vec::new();
    for i in 0..20_000u32 {
        let pkt = tcp(10_000 + (i % 40_000) as u16, true, b"")?;
        let r = k.test_run_opts(Program::Xdp, &pkt, 1, None)?;
        new_flow.push(r.duration.as_nanos() as f64);
        if i % 1000 == 999 {
            k.drain_events();
        }
    }
    let new_flow = median(new_flow);
    for (key, _) in k.flow_entries()? {
        k.remove_flow(&key)?;
    }

    let hello = unhex(include_str!(
        "../src/tls/testdata/chromium156_client_hello.hex"
    ))?;
    let (first, second) = hello.split_at(1448);
    let mut ch = Vec::new();
    for i in 0..5_000u16 {
        let sport = 20_000 + i;
        k.test_run(Program::Xdp, &tcp(sport, true, b"")?)?;
        let a = k.test_run_opts(Program::Xdp, &tcp_at(sport, false, 1, first)?, 1, None)?;
        let b = k.test_run_opts(Program::Xdp, &tcp_at(sport, false, 1449, second)?, 1, None)?;
        ch.push((a.duration + b.duration).as_nanos() as f64);
        if i % 200 == 199 {
            k.drain_events();
        }
    }
    let client_hello_ns = median(ch);
    k.drain_events();

    let initial = unhex(include_str!(
        "../src/tls/testdata/rfc9001_a2_client_initial.hex"
    ))?;
    let mut quic = Vec::new();
    for i in 0..5_000u16 {
        let r = k.test_run_opts(Program::Xdp, &udp(30_000 + i, &initial)?, 1, None)?;
        quic.push(r.duration.as_nanos() as f64);
        if i % 200 == 199 {
            k.drain_events();
        }
    }
    let quic_ns = median(quic);
    // The sweep's read of the flow table at 100,000 flows: batch lookups against the
    // entry-by-entry walk (two system calls per flow).
    for (key, _) in k.flow_entries()? {
        k.remove_flow(&key)?;
    }
    for i in 0..100_000u32 {
        let src = [10, 10, (i >> 16) as u8 + 1, (i >> 8) as u8];
        let mut out = Vec::new();
        PacketBuilder::ipv4(src, SERVER, 64)
            .tcp(1024 + (i & 0xff) as u16, 443, 1, 1000)
            .syn()
            .write(&mut out, &[])?;
        k.test_run(Program::Xdp, &frame(&out))?;
        if i % 1000 == 999 {
            k.drain_events();
        }
    }
    let sweep = |k: &Kernel, batch: bool| -> anyhow::Result<(f64, usize)> {
        k.set_batch_lookups(batch);
        let mut times = Vec::new();
        let mut n = 0;
        for _ in 0..5 {
            let start = std::time::Instant::now();
            n = 0;
            k.for_each_flow(|_, _| n += 1)?;
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
        Ok((median(times), n))
    };
    let (sweep_walk_ms, walked) = sweep(&k, false)?;
    let (sweep_batch_ms, batched) = sweep(&k, true)?;
    if walked != 100_000 || batched != 100_000 {
        bail!("the sweep read {walked} flows entry by entry and {batched} in batches, not 100000");
    }
    let counters = k.counters()?;
    use sensor_common::Counter::{LossNewFlowEvent, LossPayloadEvent};
    if counters[LossNewFlowEvent as usize] + counters[LossPayloadEvent as usize] > 0 {
        bail!("ring buffer overflowed during the benchmark; numbers would be skewed");
    }

    println!(
        "{:<14} {:>10} {:>10} {:>10}",
        "case", "ns/packet", "x empty", "x lru"
    );
    for (name, ns) in [
        ("empty", empty),
        ("lru", lru),
        ("lru_flowkey", lru40),
        ("established", established),
        ("new_flow", new_flow),
        ("client_hello", client_hello_ns),
        ("quic_initial", quic_ns),
    ] {
        println!(
            "{name:<14} {ns:>10.1} {:>10.2} {:>10.2}",
            ns / empty.max(1.0),
            ns / lru.max(1.0)
        );
    }
    println!(
        "bench kernel established_ns={established:.1} lru_ns={lru:.1} ratio_vs_lru={:.2}",
        established / lru.max(1.0)
    );
    println!(
        "bench kernel established_ns={established:.1} lru_flowkey_ns={lru40:.1} ratio_vs_lru_flowkey={:.2}",
        established / lru40.max(1.0)
    );
    println!(
        "sweep of 100,000 flows: batch lookups {sweep_batch_ms:.1} ms, entry by entry {sweep_walk_ms:.1} ms ({:.1}x faster)",
        sweep_walk_ms / sweep_batch_ms.max(0.001)
    );
    println!(
        "bench kernel sweep_flows=100000 sweep_batch_ms={sweep_batch_ms:.1} sweep_walk_ms={sweep_walk_ms:.1} ratio={:.3}",
        sweep_batch_ms / sweep_walk_ms.max(0.001)
    );
    println!(
        "bench kernel empty_ns={empty:.1} new_flow_ns={new_flow:.1} client_hello_ns={client_hello_ns:.1} quic_initial_ns={quic_ns:.1} repeat={REPEAT} runs={RUNS} local_addrs={} policy=lab+catalogue",
        gateway.len()
    );
    Ok(())
}
