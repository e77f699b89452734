//! Kernel program cost per packet, measured with BPF_PROG_TEST_RUN (needs root).
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
//! - client_hello: a SYN creates the flow (not timed), then the ClientHello is timed
//!   with `repeat` = 1: parse, count, tail call, ClientHello walk to the SNI, bpf_loop
//!   hash, lookups and a 1.6 KiB ring-buffer payload copy. Median of 5,000 flows.

use anyhow::{Context as _, bail};
use etherparse::PacketBuilder;
use sensor_user::kernel::{Kernel, KernelOptions, Program};

const REPEAT: u32 = 1_000_000;
const RUNS: usize = 9;

fn frame(ip: &[u8]) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00];
    f.extend_from_slice(ip);
    f
}

fn tcp(sport: u16, syn: bool, payload: &[u8]) -> anyhow::Result<Vec<u8>> {
    let b = PacketBuilder::ipv4([10, 10, 1, 5], [192, 0, 2, 10], 64).tcp(sport, 443, 1, 1000);
    let b = if syn { b.syn() } else { b.ack(1) };
    let mut out = Vec::new();
    b.write(&mut out, payload)?;
    Ok(frame(&out))
}

fn client_hello(name: &str) -> Vec<u8> {
    let be = |v: usize| (v as u16).to_be_bytes();
    let mut sni = be(name.len() + 3).to_vec();
    sni.push(0);
    sni.extend_from_slice(&be(name.len()));
    sni.extend_from_slice(name.as_bytes());
    let mut exts = Vec::new();
    for (ty, data) in [
        (10u16, vec![0, 4, 0, 0x1d, 0, 0x17]),
        (16, vec![0, 3, 2, b'h', b'2']),
        (0, sni),
    ] {
        exts.extend_from_slice(&ty.to_be_bytes());
        exts.extend_from_slice(&be(data.len()));
        exts.extend_from_slice(&data);
    }
    let mut body = vec![3, 3];
    body.extend_from_slice(&[7; 32]);
    body.push(0);
    body.extend_from_slice(&[0, 2, 0x13, 0x01, 1, 0]);
    body.extend_from_slice(&be(exts.len()));
    body.extend_from_slice(&exts);
    let mut hs = vec![1, 0];
    hs.extend_from_slice(&be(body.len()));
    hs.extend_from_slice(&body);
    let mut rec = vec![22, 3, 1];
    rec.extend_from_slice(&be(hs.len()));
    rec.extend_from_slice(&hs);
    rec
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

    let hello = client_hello("api.openai.com");
    let mut ch = Vec::new();
    for i in 0..5_000u16 {
        let sport = 20_000 + i;
        k.test_run(Program::Xdp, &tcp(sport, true, b"")?)?;
        let r = k.test_run_opts(Program::Xdp, &tcp(sport, false, &hello)?, 1, None)?;
        ch.push(r.duration.as_nanos() as f64);
        if i % 500 == 499 {
            k.drain_events();
        }
    }
    let client_hello_ns = median(ch);
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
        "bench kernel empty_ns={empty:.1} new_flow_ns={new_flow:.1} client_hello_ns={client_hello_ns:.1} repeat={REPEAT} runs={RUNS}"
    );
    Ok(())
}
