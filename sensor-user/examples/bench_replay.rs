//! `conduit-sensor replay` against nfstream (nDPI) and tshark on one synthetic
//! capture (needs root: replay loads the kernel programs).
//!
//! `cargo run --release -p sensor-user --example bench_replay`
//!
//! Writes a pcap of `BENCH_FLOWS` (default 20,000) TLS flows into a temporary
//! directory: TCP handshake, a browser-like ClientHello with a distinct SNI per
//! flow, the server's ServerHello + ChangeCipherSpec + encrypted flight, FIN/ACK
//! exchange (9 packets a flow). Then runs, each `BENCH_RUNS` times (default 3),
//! as whole processes (start-up, program load and interpreter import included):
//! - the release `conduit-sensor replay --jsonl`, counting the distinct
//!   `tls.client.server_name` of its records;
//! - nfstream's `NFStreamer` (defaults), counting distinct `requested_server_name`;
//! - `tshark -T fields -e tls.handshake.extensions_server_name`, counting distinct names.
//!
//! Prints the median wall time of each and one machine-readable line:
//! `bench replay packets=.. flows=.. sensor_secs=.. sensor_snis=.. nfstream_secs=..
//! nfstream_snis=.. ratio=.. tshark_secs=.. tshark_snis=..` (ratio = nfstream
//! time / sensor time). A peer that is not installed is reported as such and its
//! fields are `na`. `BENCH_DIR=DIR` writes the capture there and keeps it.
//!
//! Before them, in this process: the floor of a replay with one
//! BPF_PROG_TEST_RUN per packet (programs load; the test runs with stamp and ring
//! read, no agent), as `bench replay_floor load_secs=.. test_runs_secs=..`.

use std::{
    collections::HashSet,
    fs::File,
    io::{BufRead as _, BufReader, BufWriter},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use etherparse::PacketBuilder;
use pcap_file::pcap::{PcapPacket, PcapWriter};

/// Every SNI ends in this suffix; the conduit map's endpoint matches `*.` it, so
/// each flow is an AI flow the sensor records (a violation: no conduit allows it).
const SNI_SUFFIX: &str = "api.example-ai.net";

const CONDUITS: &str = "version: 1
site: bench
default_action: alert
zones:
  - id: cell-1
    name: Cell 1
    level: 1
    networks: [10.10.0.0/16]
endpoints:
  - id: example-ai
    provider: Example AI
    sni: [\"*.api.example-ai.net\"]
conduits: []
";

const NFSTREAM_SCRIPT: &str = "
import sys
from nfstream import NFStreamer
names = set()
flows = 0
for f in NFStreamer(source=sys.argv[1]):
    flows += 1
    if f.requested_server_name:
        names.add(f.requested_server_name)
print(flows, len(names))
";

fn main() -> Result<()> {
    let flows: u32 = env_or("BENCH_FLOWS", 20_000)?;
    let runs: usize = env_or("BENCH_RUNS", 3)?;
    ensure!(runs > 0, "BENCH_RUNS must be at least 1");
    if !nix::unistd::Uid::effective().is_root() {
        bail!(
            "bench_replay runs `conduit-sensor replay`, which loads kernel programs: run as root"
        );
    }
    let sensor = sensor_binary()?;
    // BENCH_DIR keeps the capture for a closer look (perf); else a temporary directory.
    let temp = tempfile::tempdir()?;
    let dir =
        std::env::var_os("BENCH_DIR").map_or_else(|| temp.path().to_path_buf(), PathBuf::from);
    std::fs::create_dir_all(&dir)?;
    let pcap = dir.join("tls-flows.pcap");
    let conduits = dir.join("conduits.yaml");
    std::fs::write(&conduits, CONDUITS)?;
    let packets = write_capture(&pcap, flows)?;
    let size = std::fs::metadata(&pcap)?.len();
    println!(
        "capture: {flows} TLS flows, {packets} packets, {:.1} MB ({})",
        size as f64 / 1e6,
        pcap.display()
    );

    let floor = kernel_floor(&pcap)?;
    println!(
        "kernel floor (this process, no agent): programs load {:.3} s; {packets} test runs {:.3} s = {:.2} us a packet",
        floor.0.as_secs_f64(),
        floor.1.as_secs_f64(),
        floor.1.as_secs_f64() * 1e6 / packets.max(1) as f64
    );

    let sensor_run = median_run(runs, "conduit-sensor replay", |i| {
        let jsonl = dir.join(format!("replay-{i}.jsonl"));
        let spool = dir.join(format!("spool-{i}"));
        let (took, out) = timed(
            Command::new(&sensor)
                .arg("replay")
                .arg("--conduits")
                .arg(&conduits)
                .arg("--jsonl")
                .arg(&jsonl)
                .arg("--spool")
                .arg(&spool)
                .arg(&pcap)
                .stdout(Stdio::null()),
        )
        .context("running conduit-sensor replay")?;
        ensure!(
            out.status.success(),
            "conduit-sensor replay failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let snis = sensor_snis(&jsonl)?;
        let _ = std::fs::remove_file(&jsonl);
        let _ = std::fs::remove_dir_all(&spool);
        Ok((took, snis))
    })?;

    let nfstream_run = if peer_present("python3", &["-c", "import nfstream"]) {
        Some(median_run(runs, "nfstream", |_| {
            let (took, out) = timed(
                Command::new("python3")
                    .args(["-c", NFSTREAM_SCRIPT])
                    .arg(&pcap),
            )
            .context("running nfstream")?;
            ensure!(
                out.status.success(),
                "nfstream failed ({}):\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            let text = String::from_utf8_lossy(&out.stdout);
            let snis = text
                .split_whitespace()
                .nth(1)
                .and_then(|n| n.parse().ok())
                .with_context(|| format!("nfstream printed {text:?}"))?;
            Ok((took, snis))
        })?)
    } else {
        println!(
            "nfstream: not installed (python3 -m pip install -r tests/requirements.txt); skipped"
        );
        None
    };

    let tshark_run = if peer_present("tshark", &["--version"]) {
        Some(median_run(runs, "tshark", |_| {
            let (took, out) = timed(Command::new("tshark").args(["-n", "-r"]).arg(&pcap).args([
                "-T",
                "fields",
                "-e",
                "tls.handshake.extensions_server_name",
            ]))
            .context("running tshark")?;
            ensure!(
                out.status.success(),
                "tshark failed ({}):\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            let names: HashSet<&[u8]> = out
                .stdout
                .split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
                .collect();
            Ok((took, names.len()))
        })?)
    } else {
        println!("tshark: not installed (apt-get install tshark); skipped");
        None
    };

    let secs = |r: &Option<(Duration, usize)>| {
        r.map_or("na".to_string(), |(d, _)| format!("{:.3}", d.as_secs_f64()))
    };
    let snis = |r: &Option<(Duration, usize)>| r.map_or("na".to_string(), |(_, n)| n.to_string());
    let ratio = nfstream_run.map_or("na".to_string(), |(d, _)| {
        format!("{:.2}", d.as_secs_f64() / sensor_run.0.as_secs_f64())
    });
    println!(
        "conduit-sensor replay {:.3} s, nfstream {} s, tshark {} s; nfstream / replay = {ratio}",
        sensor_run.0.as_secs_f64(),
        secs(&nfstream_run),
        secs(&tshark_run)
    );
    println!(
        "bench replay_floor load_secs={:.3} test_runs_secs={:.3}",
        floor.0.as_secs_f64(),
        floor.1.as_secs_f64()
    );
    println!(
        "bench replay packets={packets} flows={flows} sensor_secs={:.3} sensor_snis={} nfstream_secs={} nfstream_snis={} ratio={ratio} tshark_secs={} tshark_snis={}",
        sensor_run.0.as_secs_f64(),
        sensor_run.1,
        secs(&nfstream_run),
        snis(&nfstream_run),
        secs(&tshark_run),
        snis(&tshark_run),
    );
    Ok(())
}

/// What a replay cannot go below with one BPF_PROG_TEST_RUN per packet (its
/// `repeat` reruns the same packet): the programs' load, and the test runs alone
/// with the per-packet stamp and the ring read, no agent behind them.
fn kernel_floor(pcap: &Path) -> Result<(Duration, Duration)> {
    use sensor_user::kernel::{Kernel, KernelOptions, Program};
    let packets = sensor_user::pcap::read_packets(pcap)?;
    let start = Instant::now();
    let mut kernel = Kernel::load(&KernelOptions::default())?;
    let load = start.elapsed();
    kernel.watch_ifindex(1)?;
    kernel.set_ring_wakeups(false)?;
    let start = Instant::now();
    let mut events = 0usize;
    for (i, (_, packet)) in packets.iter().enumerate() {
        kernel.stamp_replay_packet(u32::try_from(i + 1)?)?;
        kernel.test_run(Program::Xdp, packet)?;
        events += kernel.drain_events().len();
    }
    let runs = start.elapsed();
    ensure!(events > 0, "the test runs produced no events");
    Ok((load, runs))
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> Result<T> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .map_err(|_| anyhow::anyhow!("{name}={v}: not a number")),
        Err(_) => Ok(default),
    }
}

/// Runs `cmd` to its end (stderr captured); the time is the process's alone,
/// from spawn to exit, without the counting that follows.
fn timed(cmd: &mut Command) -> std::io::Result<(Duration, std::process::Output)> {
    let start = Instant::now();
    let out = cmd.stderr(Stdio::piped()).output()?;
    Ok((start.elapsed(), out))
}

/// Runs `f` (one timed run: its time and SNI count) `runs` times; prints each;
/// returns the median time and the SNI count (every run must count the same).
fn median_run(
    runs: usize,
    name: &str,
    mut f: impl FnMut(usize) -> Result<(Duration, usize)>,
) -> Result<(Duration, usize)> {
    let mut times = Vec::with_capacity(runs);
    let mut count = None;
    for i in 0..runs {
        let (t, n) = f(i)?;
        println!("{name}: run {}: {:.3} s, {n} SNIs", i + 1, t.as_secs_f64());
        if let Some(prev) = count
            && prev != n
        {
            bail!(
                "{name}: run {} counted {n} SNIs, the one before {prev}",
                i + 1
            );
        }
        count = Some(n);
        times.push(t);
    }
    times.sort();
    Ok((times[times.len() / 2], count.unwrap_or_default()))
}

fn peer_present(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The release `conduit-sensor` beside this example (target/release), built
/// first when cargo runs the bench (`cargo run` does not build the package's binaries).
fn sensor_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .context("no target directory above this example")?;
    if let Ok(cargo) = std::env::var("CARGO") {
        let status = Command::new(cargo)
            .args([
                "build",
                "--release",
                "-p",
                "sensor-user",
                "--bin",
                "conduit-sensor",
            ])
            .status()
            .context("building conduit-sensor")?;
        ensure!(status.success(), "building conduit-sensor failed");
    }
    let bin = dir.join("conduit-sensor");
    ensure!(
        bin.exists(),
        "{} is missing: cargo build --release -p sensor-user",
        bin.display()
    );
    Ok(bin)
}

/// Distinct `tls.client.server_name` values of a JSON-lines record file.
fn sensor_snis(jsonl: &Path) -> Result<usize> {
    let mut names = HashSet::new();
    for line in BufReader::new(File::open(jsonl)?).lines() {
        let v: serde_json::Value = serde_json::from_str(&line?)?;
        if let Some(name) = v["tls"]["client"]["server_name"].as_str() {
            names.insert(name.to_string());
        }
    }
    Ok(names.len())
}

/// Writes the capture; returns the number of packets. Flows start 50 µs apart and
/// overlap, so the packets of many flows interleave, as on a real link.
fn write_capture(path: &Path, flows: u32) -> Result<usize> {
    let mut packets: Vec<(u64, Vec<u8>)> = Vec::with_capacity(flows as usize * 9);
    for i in 0..flows {
        packets.extend(flow_packets(i)?);
    }
    packets.sort_by_key(|(t, _)| *t);
    let mut w = PcapWriter::new(BufWriter::new(File::create(path)?))?;
    for (t, data) in &packets {
        let len = u32::try_from(data.len())?;
        w.write_packet(&PcapPacket::new(Duration::from_nanos(*t), len, data))?;
    }
    Ok(packets.len())
}

/// The SNI of flow `i`.
fn sni(i: u32) -> String {
    format!("node{i}.{SNI_SUFFIX}")
}

/// The nine packets of flow `i` with their capture times (unix ns).
fn flow_packets(i: u32) -> Result<Vec<(u64, Vec<u8>)>> {
    const START_NS: u64 = 1_800_000_000_000_000_000;
    let client = [10, 10, (i / 250 % 250) as u8, (i % 250 + 1) as u8];
    let server = [198, 18, (i / 200 % 256) as u8, (i % 200 + 1) as u8];
    let cport = 32768 + (i % 28000) as u16;
    let (cs, ss) = (
        0x1000_0000u32.wrapping_add(i.wrapping_mul(7919)),
        0x6000_0000u32.wrapping_add(i.wrapping_mul(104_729)),
    );
    let hello = client_hello(&sni(i), i);
    if i == 0 {
        // The capture is only worth timing if its ClientHello parses as real ones do.
        let info = sensor_user::tls::parse_client_hello(&hello)
            .map_err(|e| anyhow::anyhow!("the synthetic ClientHello does not parse: {e:?}"))?;
        ensure!(info.sni.as_deref() == Some(sni(0).as_str()), "{info:?}");
    }
    let reply = server_flight(i);
    let (hl, rl) = (u32::try_from(hello.len())?, u32::try_from(reply.len())?);
    let t0 = START_NS + u64::from(i) * 50_000;
    let eth = |from_client: bool, seq: u32| {
        let (a, b) = ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
        let (src, dst, sp, dp) = if from_client {
            (client, server, cport, 443)
        } else {
            (server, client, 443, cport)
        };
        let (sm, dm) = if from_client { (a, b) } else { (b, a) };
        PacketBuilder::ethernet2(sm, dm).ipv4(src, dst, 64).tcp(
            sp,
            dp,
            seq,
            if from_client { 64240 } else { 65160 },
        )
    };
    let frame = |b: etherparse::PacketBuilderStep<etherparse::TcpHeader>,
                 payload: &[u8]|
     -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(64 + payload.len());
        b.write(&mut out, payload)?;
        Ok(out)
    };
    let c = |seq: u32| eth(true, seq);
    let s = |seq: u32| eth(false, seq);
    let ms = 1_000_000u64;
    Ok(vec![
        (t0, frame(c(cs).syn(), &[])?),
        (t0 + ms, frame(s(ss).syn().ack(cs + 1), &[])?),
        (t0 + ms + 20_000, frame(c(cs + 1).ack(ss + 1), &[])?),
        (
            t0 + ms + 60_000,
            frame(c(cs + 1).ack(ss + 1).psh(), &hello)?,
        ),
        (
            t0 + 3 * ms,
            frame(s(ss + 1).ack(cs + 1 + hl).psh(), &reply)?,
        ),
        (
            t0 + 3 * ms + 50_000,
            frame(c(cs + 1 + hl).ack(ss + 1 + rl), &[])?,
        ),
        (
            t0 + 10 * ms,
            frame(c(cs + 1 + hl).ack(ss + 1 + rl).fin(), &[])?,
        ),
        (
            t0 + 11 * ms,
            frame(s(ss + 1 + rl).ack(cs + 2 + hl).fin(), &[])?,
        ),
        (
            t0 + 11 * ms + 30_000,
            frame(c(cs + 2 + hl).ack(ss + 2 + rl), &[])?,
        ),
    ])
}

fn u16be(v: usize) -> [u8; 2] {
    u16::try_from(v).unwrap_or(u16::MAX).to_be_bytes()
}

fn ext(ty: u16, data: &[u8]) -> Vec<u8> {
    let mut e = ty.to_be_bytes().to_vec();
    e.extend_from_slice(&u16be(data.len()));
    e.extend_from_slice(data);
    e
}

/// A list with a 2-byte length prefix.
fn vec16(items: &[u8]) -> Vec<u8> {
    let mut v = u16be(items.len()).to_vec();
    v.extend_from_slice(items);
    v
}

/// Bytes that differ per flow (randoms, keys), cheaply.
fn noise(seed: u32, len: usize) -> Vec<u8> {
    let mut x = u64::from(seed).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn record(content_type: u8, body: &[u8]) -> Vec<u8> {
    let mut r = vec![content_type, 3, 3];
    r.extend_from_slice(&u16be(body.len()));
    r.extend_from_slice(body);
    r
}

fn handshake(ty: u8, body: &[u8]) -> Vec<u8> {
    let mut hs = vec![ty, 0];
    hs.extend_from_slice(&u16be(body.len()));
    hs.extend_from_slice(body);
    hs
}

/// A TLS 1.3 ClientHello as a current browser sends it: 15 suites, 14 extensions.
fn client_hello(name: &str, seed: u32) -> Vec<u8> {
    let mut body = vec![3, 3];
    body.extend_from_slice(&noise(seed, 32));
    body.push(32);
    body.extend_from_slice(&noise(seed ^ 0x5a5a, 32));
    let suites: [u16; 15] = [
        0x1301, 0x1302, 0x1303, 0xc02b, 0xc02f, 0xc02c, 0xc030, 0xcca9, 0xcca8, 0xc013, 0xc014,
        0x009c, 0x009d, 0x002f, 0x0035,
    ];
    let suites: Vec<u8> = suites.iter().flat_map(|s| s.to_be_bytes()).collect();
    body.extend_from_slice(&vec16(&suites));
    body.extend_from_slice(&[1, 0]);
    let mut server_name = vec![0];
    server_name.extend_from_slice(&vec16(name.as_bytes()));
    let mut key_share = vec![0, 0x1d];
    key_share.extend_from_slice(&vec16(&noise(seed ^ 0xa5a5, 32)));
    let sig_algs: Vec<u8> = [
        0x0403u16, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601,
    ]
    .iter()
    .flat_map(|s| s.to_be_bytes())
    .collect();
    let alpn = vec16(&[
        2, b'h', b'2', 8, b'h', b't', b't', b'p', b'/', b'1', b'.', b'1',
    ]);
    let exts = [
        ext(0, &vec16(&server_name)),
        ext(23, &[]),
        ext(0xff01, &[0]),
        ext(10, &vec16(&[0, 0x1d, 0, 0x17, 0, 0x18])),
        ext(11, &[1, 0]),
        ext(35, &[]),
        ext(16, &alpn),
        ext(5, &[1, 0, 0, 0, 0]),
        ext(13, &vec16(&sig_algs)),
        ext(18, &[]),
        ext(51, &vec16(&key_share)),
        ext(45, &[1, 1]),
        ext(43, &[4, 3, 4, 3, 3]),
        ext(27, &[2, 0, 2]),
    ]
    .concat();
    body.extend_from_slice(&vec16(&exts));
    record(22, &handshake(1, &body))
}

/// ServerHello (TLS 1.3, x25519), ChangeCipherSpec and an encrypted flight of
/// about 1 KB (EncryptedExtensions, Certificate, ... as application data).
fn server_flight(seed: u32) -> Vec<u8> {
    let mut body = vec![3, 3];
    body.extend_from_slice(&noise(seed ^ 0x3c3c, 32));
    body.push(32);
    body.extend_from_slice(&noise(seed ^ 0x5a5a, 32));
    body.extend_from_slice(&[0x13, 0x01, 0]);
    let mut key_share = vec![0, 0x1d];
    key_share.extend_from_slice(&vec16(&noise(seed ^ 0xc3c3, 32)));
    let exts = [ext(43, &[3, 4]), ext(51, &key_share)].concat();
    body.extend_from_slice(&vec16(&exts));
    [
        record(22, &handshake(2, &body)),
        record(20, &[1]),
        record(23, &noise(seed ^ 0x7777, 1024)),
    ]
    .concat()
}
