//! How the kernel's cost grows (needs root), with BPF_PROG_TEST_RUN in the live
//! configuration (`bench_kernel`: the gateway's addresses set, a conduit map):
//!
//! - with flows in the table (10,000, 100,000, 1,000,000): the mean cost of a packet
//!   of an established flow picked at random among them (repeat = 1 each, so cache
//!   misses count), and the sweep's read of the whole table (batch lookups);
//! - with SNI patterns in the map (10, 1,000, 8,000: the kernel's cap per policy is
//!   8,192): the median cost of Chromium's two-segment ClientHello.
//!
//! Prints the table and writes it as a chart to `docs/scaling.svg` and, with
//! headless Chromium (`$CHROMIUM` or `chromium`), `docs/scaling.png`.
//!
//! `cargo run --release -p sensor-user --example bench_scaling`

use std::{fmt::Write as _, path::Path, time::Instant};

use anyhow::{Context as _, bail};
use etherparse::PacketBuilder;
use sensor_user::{
    config::ConduitMap,
    kernel::{Kernel, KernelOptions, Program},
    kernel_policy::kernel_policy,
};

const SERVER: [u8; 4] = [192, 0, 2, 10];
const GATEWAY: [&str; 3] = ["10.10.1.1", "10.20.0.1", "198.51.100.1"];
const TABLE_FILLS: [u32; 3] = [10_000, 100_000, 1_000_000];
const SNI_PATTERNS: [usize; 3] = [10, 1_000, 8_000];
/// Packets timed per table fill.
const PROBES: u32 = 20_000;

fn frame(ip: &[u8]) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00];
    f.extend_from_slice(ip);
    f
}

/// Flow `i`'s client address and port (distinct for every i < 2^24).
fn client(i: u32) -> ([u8; 4], u16) {
    (
        [10, 10, (i >> 16) as u8, (i >> 8) as u8],
        1024 + (i & 0xff) as u16,
    )
}

fn tcp(i: u32, syn: bool, seq: u32, payload: &[u8]) -> anyhow::Result<Vec<u8>> {
    let (src, sport) = client(i);
    let b = PacketBuilder::ipv4(src, SERVER, 64).tcp(sport, 443, seq, 1000);
    let b = if syn { b.syn() } else { b.ack(1) };
    let mut out = Vec::new();
    b.write(&mut out, payload)?;
    Ok(frame(&out))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A conduit map with `n` SNI patterns (half exact names, half `*.` suffixes) besides
/// the lab's endpoints.
fn map_with_patterns(dir: &Path, n: usize) -> anyhow::Result<ConduitMap> {
    let mut yaml = String::from(
        "version: 1\nsite: bench\ndefault_action: alert\nzones:\n  - id: cell-1\n    name: Cell 1\n    level: 1\n    networks: [10.10.0.0/16]\nendpoints:\n  - id: openai\n    provider: OpenAI\n    sni: [api.openai.com]\n",
    );
    let per = 100;
    for e in 0..n.div_ceil(per) {
        let _ = write!(yaml, "  - id: ep{e}\n    provider: P{e}\n    sni: [");
        for j in 0..per.min(n - e * per) {
            let sep = if j == 0 { "" } else { ", " };
            if j % 2 == 0 {
                let _ = write!(yaml, "{sep}\"api{j}.svc{e}.example\"");
            } else {
                let _ = write!(yaml, "{sep}\"*.z{j}.svc{e}.example\"");
            }
        }
        yaml.push_str("]\n");
    }
    yaml.push_str("conduits: []\n");
    let path = dir.join(format!("conduits-{n}.yaml"));
    std::fs::write(&path, yaml)?;
    ConduitMap::load(&path, None).map_err(|e| anyhow::anyhow!("{e}"))
}

/// Mean kernel-reported time of [`PROBES`] packets of flows picked in a fixed
/// pseudo-random order (an LCG) among the first `n`, one test run each.
fn random_flow_ns(k: &Kernel, program: Program, n: u32) -> anyhow::Result<f64> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut total = 0u128;
    for _ in 0..PROBES {
        x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        let i = ((x >> 33) % u64::from(n)) as u32;
        total += k
            .test_run_opts(program, &tcp(i, false, 2, b"")?, 1, None)?
            .duration
            .as_nanos();
    }
    Ok(total as f64 / f64::from(PROBES))
}

fn live_kernel(flow_table_size: u32) -> anyhow::Result<Kernel> {
    let mut k = Kernel::load(&KernelOptions {
        flow_table_size,
        ..KernelOptions::default()
    })
    .context("loading the kernel programs")?;
    let gateway: Vec<std::net::IpAddr> = GATEWAY
        .iter()
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    k.set_local_addrs(&gateway)?;
    Ok(k)
}

fn main() -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIP: needs root");
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let lab = ConduitMap::load(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/lab/conduits.yaml"),
        None,
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;

    // Flows in the table.
    let mut by_flows = Vec::new();
    for n in TABLE_FILLS {
        let mut k = live_kernel(n.next_power_of_two().max(1 << 18))?;
        k.install_policy(&kernel_policy(&lab, false)?)?;
        for i in 0..n {
            k.test_run(Program::Xdp, &tcp(i, true, 1, b"")?)?;
            if i % 1000 == 999 {
                k.drain_events();
            }
        }
        let flows = k.flow_entries()?.len();
        if flows != n as usize {
            bail!("{flows} flows in the table, {n} created");
        }
        let packet_ns = random_flow_ns(&k, Program::Xdp, n)?;
        // The same packets through a program that only passes them: what a single
        // test run costs by itself (timer, cold packet buffer).
        let empty_ns = random_flow_ns(&k, Program::BenchEmpty, n)?;
        let mut sweeps = Vec::new();
        for _ in 0..3 {
            let start = Instant::now();
            let mut seen = 0usize;
            k.for_each_flow(|_, _| seen += 1)?;
            sweeps.push(start.elapsed().as_secs_f64() * 1e3);
            if seen != n as usize {
                bail!("the sweep read {seen} of {n} flows");
            }
        }
        let sweep_ms = median(sweeps);
        println!(
            "flows {n:>9}: established packet (random flow) {packet_ns:6.1} ns (empty program, same packets: {empty_ns:5.1} ns), sweep read {sweep_ms:7.1} ms"
        );
        by_flows.push((n, packet_ns, sweep_ms));
    }

    // SNI patterns in the map.
    let hex: String = include_str!("../src/tls/testdata/chromium156_client_hello.hex")
        .split_whitespace()
        .collect();
    let hello = hex::decode(hex)?;
    let (first, second) = hello.split_at(1448);
    let mut by_patterns = Vec::new();
    for m in SNI_PATTERNS {
        let mut k = live_kernel(1 << 18)?;
        k.install_policy(&kernel_policy(&map_with_patterns(tmp.path(), m)?, false)?)?;
        let mut ch = Vec::new();
        for i in 0..3_000u32 {
            k.test_run(Program::Xdp, &tcp(i, true, 1, b"")?)?;
            let a = k.test_run_opts(Program::Xdp, &tcp(i, false, 1, first)?, 1, None)?;
            let b = k.test_run_opts(Program::Xdp, &tcp(i, false, 1449, second)?, 1, None)?;
            ch.push((a.duration + b.duration).as_nanos() as f64);
            if i % 200 == 199 {
                k.drain_events();
            }
        }
        let ns = median(ch);
        println!("sni patterns {m:>6}: ClientHello (2 segments) {ns:7.1} ns");
        by_patterns.push((m, ns));
    }

    let (first_flows, last_flows) = (by_flows[0], by_flows[by_flows.len() - 1]);
    let (first_sni, last_sni) = (by_patterns[0], by_patterns[by_patterns.len() - 1]);
    println!(
        "bench scaling packet_ns_10k={:.1} packet_ns_1m={:.1} ratio={:.2} sweep_ms_10k={:.1} sweep_ms_1m={:.1} hello_ns_10_patterns={:.1} hello_ns_8000_patterns={:.1} ratio={:.2}",
        first_flows.1,
        last_flows.1,
        last_flows.1 / first_flows.1.max(1.0),
        first_flows.2,
        last_flows.2,
        first_sni.1,
        last_sni.1,
        last_sni.1 / first_sni.1.max(1.0)
    );
    write_chart(&by_flows, &by_patterns)
}

/// A chart panel: title, unit, and (label, value) bars.
type Panel = (&'static str, &'static str, Vec<(String, f64)>);

/// Three small panels: packet cost and sweep time against flows (log scale), hello
/// cost against SNI patterns.
fn write_chart(by_flows: &[(u32, f64, f64)], by_patterns: &[(usize, f64)]) -> anyhow::Result<()> {
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs");
    let (w, h, pw) = (960.0, 360.0, 300.0);
    let mut svg = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-family='sans-serif' font-size='12'><rect width='100%' height='100%' fill='white'/>"
    );
    let panels: [Panel; 3] = [
        (
            "Established packet, random flow",
            "ns",
            by_flows
                .iter()
                .map(|(n, ns, _)| (flows_label(*n), *ns))
                .collect(),
        ),
        (
            "Sweep read of the flow table",
            "ms",
            by_flows
                .iter()
                .map(|(n, _, ms)| (flows_label(*n), *ms))
                .collect(),
        ),
        (
            "ClientHello (Chromium, 2 segments)",
            "ns",
            by_patterns
                .iter()
                .map(|(m, ns)| (format!("{m} SNI"), *ns))
                .collect(),
        ),
    ];
    for (p, (title, unit, points)) in panels.iter().enumerate() {
        let x0 = 20.0 + p as f64 * (pw + 20.0);
        let max = points.iter().map(|(_, v)| *v).fold(0.0, f64::max).max(1e-9);
        let _ = write!(
            svg,
            "<text x='{}' y='24' font-weight='bold'>{title}</text>",
            x0 + 4.0
        );
        let (top, bottom) = (50.0, h - 50.0);
        let bar = pw / points.len() as f64;
        for (i, (label, v)) in points.iter().enumerate() {
            let bh = (bottom - top) * v / max;
            let x = x0 + i as f64 * bar + bar * 0.2;
            let _ = write!(
                svg,
                "<rect x='{x:.1}' y='{:.1}' width='{:.1}' height='{bh:.1}' fill='#3b6ea5'/><text x='{:.1}' y='{:.1}' text-anchor='middle'>{v:.1} {unit}</text><text x='{:.1}' y='{:.1}' text-anchor='middle'>{label}</text>",
                bottom - bh,
                bar * 0.6,
                x + bar * 0.3,
                bottom - bh - 6.0,
                x + bar * 0.3,
                bottom + 18.0
            );
        }
        let _ = write!(
            svg,
            "<line x1='{x0}' y1='{bottom}' x2='{}' y2='{bottom}' stroke='black'/>",
            x0 + pw
        );
    }
    svg.push_str("</svg>\n");
    let svg_path = docs.join("scaling.svg");
    std::fs::write(&svg_path, &svg)?;
    println!("chart: {}", svg_path.display());
    let chromium = std::env::var_os("CHROMIUM").unwrap_or_else(|| "chromium".into());
    let png = docs.join("scaling.png");
    let profile = tempfile::tempdir()?;
    let status = std::process::Command::new(&chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--window-size={w},{h}"))
        .arg(format!("--screenshot={}", png.display()))
        .arg(format!("file://{}", svg_path.canonicalize()?.display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    match status {
        Ok(s) if s.success() && png.exists() => println!("chart: {}", png.display()),
        _ => println!("no PNG: headless Chromium did not run (set CHROMIUM)"),
    }
    Ok(())
}

fn flows_label(n: u32) -> String {
    if n >= 1_000_000 {
        format!("{}M flows", n / 1_000_000)
    } else {
        format!("{}k flows", n / 1_000)
    }
}
