//! TCP throughput through the lab gateway, the sensor on its three interfaces vs
//! none (issue 16, the data-path row). Needs root and iperf3.
//!
//! ```text
//! cargo build --release --workspace --exclude sensor-ebpf --bins
//! cargo run --release -p conduit-tests --example bench_gateway \
//!     [-- --rounds 3 --seconds 5 --perf DIR --control xdp --control xdpgeneric --control tc]
//! ```
//!
//! The lab is the tests' gateway (tests/src/topology.rs) with masquerading on the
//! uplink: the iperf3 client in OT host 1, the server in `net` (198.51.100.10), one
//! TCP stream forwarded and NATed by `gw`. Offloads are off on every veth (TSO, GSO,
//! GRO: one packet on the wire is one packet for the sensor), checked before the
//! first round and while the sensor is attached. Rounds alternate: without the
//! sensor, then with `conduit-sensor run` (the release build next to this example,
//! the lab's conduit map, `--record-all`, all three gateway interfaces), started
//! for the round and stopped after it. Each kind's median and their ratio are
//! printed, then one machine-readable `bench gateway ...` line.
//!
//! With `--perf DIR`, one more round of each kind runs under `perf record -a -g`
//! (DIR/without.data, DIR/with.data); their figures are printed but left out of the
//! medians, since sampling with call graphs slows them down.
//!
//! Each `--control MODE` adds to every round a run with only a program that passes
//! every packet (tests/lab/pass.ll, compiled with `llc`, or `$LLC`) on the three
//! interfaces: what the hook itself costs before the sensor's programs do anything.
//! MODE is `xdp` (native XDP, as the sensor attaches), `xdpgeneric` (XDP on the
//! skb), or `tc` (clsact ingress and egress).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use conduit_lab::{
    Lab, Ns, SensorRun,
    ai::lab_conduits,
    is_root, last_flow_records, scaled,
    topology::{GW_OT1_IF, GW_OT2_IF, GW_UPLINK_IF, GatewayLab, GatewayLabOptions, NET_V4, OT1_V4},
    workspace_bin,
};
use serde_json::Value;

const IPERF_PORT: u16 = 5201;
/// The sensor's metrics endpoint, inside the gateway namespace.
const METRICS_PORT: u16 = 9464;

struct Opts {
    rounds: usize,
    seconds: u32,
    perf: Option<PathBuf>,
    controls: Vec<Control>,
}

const USAGE: &str = "usage: bench_gateway [--rounds N] [--seconds S] [--perf DIR] \
                     [--control xdp|xdpgeneric|tc]...";

/// Where a control run's pass-everything program attaches.
#[derive(Clone, Copy, PartialEq)]
enum Control {
    Xdp,
    XdpGeneric,
    Tc,
}

impl Control {
    fn name(self) -> &'static str {
        match self {
            Control::Xdp => "xdp",
            Control::XdpGeneric => "xdpgeneric",
            Control::Tc => "tc",
        }
    }
}

/// The gateway's interfaces, where the sensor (or the control program) attaches.
const GW_IFS: [&str; 3] = [GW_OT1_IF, GW_OT2_IF, GW_UPLINK_IF];

impl Opts {
    fn parse() -> Result<Opts> {
        let mut opts = Opts {
            rounds: 3,
            seconds: 5,
            perf: None,
            controls: Vec::new(),
        };
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
            match arg.as_str() {
                "--rounds" => opts.rounds = value()?.parse().context("--rounds")?,
                "--seconds" => opts.seconds = value()?.parse().context("--seconds")?,
                "--perf" => opts.perf = Some(PathBuf::from(value()?)),
                "--control" => {
                    let control = match value()?.as_str() {
                        "xdp" => Control::Xdp,
                        "xdpgeneric" => Control::XdpGeneric,
                        "tc" => Control::Tc,
                        other => bail!("unknown control {other:?}; {USAGE}"),
                    };
                    if !opts.controls.contains(&control) {
                        opts.controls.push(control);
                    }
                }
                "-h" | "--help" => {
                    println!("{USAGE}");
                    std::process::exit(0);
                }
                other => bail!("unknown argument {other:?}; {USAGE}"),
            }
        }
        ensure!(
            opts.rounds > 0 && opts.seconds > 0,
            "rounds and seconds must be positive"
        );
        Ok(opts)
    }
}

/// One iperf3 run, from its JSON report.
struct Iperf {
    gbps: f64,
    bytes_received: u64,
    retransmits: u64,
    sender_cpu: f64,
    receiver_cpu: f64,
}

impl std::fmt::Display for Iperf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.2} Gbit/s ({} retransmits, cpu sender {:.0}% receiver {:.0}%)",
            self.gbps, self.retransmits, self.sender_cpu, self.receiver_cpu
        )
    }
}

/// What the sensor said about a round.
struct SensorCounters {
    flows_recorded: usize,
    loss_records: Vec<Value>,
    /// IP bytes the sensor counted from client to server on the biggest iperf3 flow.
    data_flow_bytes: u64,
    /// Non-zero `conduit_sensor_kernel_total` counters, by reason.
    kernel: BTreeMap<String, u64>,
    /// `conduit_sensor_interface_attached` lines: interface and XDP mode.
    attached: Vec<String>,
}

fn main() -> Result<()> {
    let opts = Opts::parse()?;
    if !is_root() {
        bail!("bench_gateway creates network namespaces: run it as root");
    }
    let sensor_bin = workspace_bin("conduit-sensor");
    ensure!(
        sensor_bin.exists(),
        "{} is missing: run `cargo build --release --workspace --exclude sensor-ebpf --bins` first",
        sensor_bin.display()
    );
    ensure!(
        std::process::Command::new("iperf3")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success()),
        "iperf3 is missing: `cargo xtask setup` installs it"
    );
    if let Some(dir) = &opts.perf {
        fs::create_dir_all(dir).with_context(|| format!("mkdir {}", dir.display()))?;
    }

    // The lab's namespaces and processes go with `lab` on return, error or panic.
    let mut lab = GatewayLab::build("bench", GatewayLabOptions { masquerade: true })?;
    check_offloads_off(&lab)?;
    let pass_obj = if opts.controls.is_empty() {
        None
    } else {
        Some(compile_pass(&lab.lab)?)
    };
    let net = lab.net.clone();
    let port = IPERF_PORT.to_string();
    lab.lab.spawn(
        &net,
        "iperf3-server",
        &["iperf3", "-s", "-B", NET_V4, "-p", &port],
    )?;
    lab.lab
        .wait_for_port(&net, "tcp", IPERF_PORT, Duration::from_secs(10))?;

    println!(
        "bench gateway: iperf3 {OT1_V4} -> {NET_V4}:{IPERF_PORT} through the NAT gateway, \
         {} s per run, {} alternating rounds, offloads off; sensor {}",
        opts.seconds,
        opts.rounds,
        sensor_bin.display()
    );
    // Neighbour entries, conntrack and the server's first accept out of the way.
    let warm = iperf(&lab, 1)?;
    println!("warm-up (not counted): {warm}");

    let (mut without, mut with) = (Vec::new(), Vec::new());
    let mut controls: Vec<Vec<f64>> = vec![Vec::new(); opts.controls.len()];
    for round in 1..=opts.rounds {
        let r = iperf(&lab, opts.seconds)?;
        println!("round {round} without sensor: {r}");
        without.push(r.gbps);

        let (r, c) = with_sensor(&mut lab, &format!("sensor-r{round}"), opts.seconds, None)?;
        println!("round {round} with sensor:    {r}");
        print_counters(&c);
        check_counters(&r, &c)?;
        with.push(r.gbps);

        if let Some(obj) = &pass_obj {
            for (control, gbps) in opts.controls.iter().zip(&mut controls) {
                let r = with_pass(&lab, *control, obj, opts.seconds)?;
                println!("round {round} pass-only {}: {r}", control.name());
                gbps.push(r.gbps);
            }
        }
    }

    if let Some(dir) = &opts.perf {
        let file = dir.join("without.data");
        let gw = lab.gw.clone();
        perf_start(&mut lab.lab, &gw, "perf-without", &file)?;
        let r = iperf(&lab, opts.seconds);
        perf_stop(&mut lab.lab, "perf-without")?;
        println!(
            "under perf (not counted) without sensor: {} -> {}",
            r?,
            file.display()
        );
        let file = dir.join("with.data");
        let (r, c) = with_sensor(&mut lab, "sensor-perf", opts.seconds, Some(&file))?;
        println!(
            "under perf (not counted) with sensor:    {r} -> {}",
            file.display()
        );
        print_counters(&c);
        check_counters(&r, &c)?;
    }

    for (control, gbps) in opts.controls.iter().zip(&controls) {
        let (name, gbps) = (control.name(), median(gbps));
        let ratio = gbps / median(&without);
        println!(
            "median with only a pass program ({name}) on the three interfaces {gbps:.2} Gbit/s, \
             ratio {ratio:.3}"
        );
        println!(
            "bench gateway control={name} gbps={gbps:.2} ratio={ratio:.3} rounds={}",
            opts.rounds
        );
    }
    let (without_gbps, with_gbps) = (median(&without), median(&with));
    let ratio = with_gbps / without_gbps;
    println!(
        "median without sensor {without_gbps:.2} Gbit/s, with sensor {with_gbps:.2} Gbit/s, \
         ratio {ratio:.3} (goal >= 0.95)"
    );
    println!(
        "bench gateway without_gbps={without_gbps:.2} with_gbps={with_gbps:.2} ratio={ratio:.3} \
         rounds={} offloads=off",
        opts.rounds
    );
    Ok(())
}

/// One round with the sensor: start it on the gateway's three interfaces, run
/// iperf3 (under perf if `perf` names a file), read its counters, stop it.
fn with_sensor(
    lab: &mut GatewayLab,
    label: &str,
    seconds: u32,
    perf: Option<&Path>,
) -> Result<(Iperf, SensorCounters)> {
    let conduits = lab_conduits().display().to_string();
    let metrics = format!("127.0.0.1:{METRICS_PORT}");
    let gw = lab.gw.clone();
    let sensor = SensorRun::start(
        &mut lab.lab,
        &gw,
        label,
        &[
            "--iface",
            GW_IFS[0],
            "--iface",
            GW_IFS[1],
            "--iface",
            GW_IFS[2],
            "--conduits",
            &conduits,
            // The iperf3 flows match no AI endpoint: recorded, so they can be checked.
            "--record-all",
            "--metrics",
            &metrics,
        ],
    )?;
    lab.lab
        .wait_for_port(&gw, "tcp", METRICS_PORT, Duration::from_secs(10))?;
    // Attaching XDP to a veth must not turn an offload back on.
    check_offloads_off(lab)?;

    let perf_label = format!("perf-{label}");
    if let Some(file) = perf {
        perf_start(&mut lab.lab, &gw, &perf_label, file)?;
    }
    let run = iperf(lab, seconds);
    if perf.is_some() {
        perf_stop(&mut lab.lab, &perf_label)?;
    }
    let run = run?;

    let metrics_text = lab
        .lab
        .exec(&gw, &["curl", "-sf", &format!("http://{metrics}/metrics")])?;
    let metrics_text = String::from_utf8_lossy(&metrics_text.stdout).into_owned();
    let records = sensor.stop(&mut lab.lab)?;
    Ok((run, sensor_counters(&records, &metrics_text)))
}

fn sensor_counters(records: &[Value], metrics: &str) -> SensorCounters {
    let flows_recorded = records
        .iter()
        .filter(|r| r["event"]["action"] == "flow_start")
        .filter_map(|r| {
            Some((
                r["network"]["transport"].as_str()?.to_string(),
                r["source"]["ip"].as_str()?.to_string(),
                r["source"]["port"].as_u64()?,
                r["destination"]["ip"].as_str()?.to_string(),
                r["destination"]["port"].as_u64()?,
            ))
        })
        .collect::<BTreeSet<_>>()
        .len();
    let loss_records = records
        .iter()
        .filter(|r| r["event"]["action"] == "loss")
        .cloned()
        .collect();
    let data_flow_bytes = last_flow_records(records)
        .iter()
        .filter(|((transport, _, _, dst, dport), _)| {
            transport == "tcp" && dst.to_string() == NET_V4 && *dport == u64::from(IPERF_PORT)
        })
        .filter_map(|(_, r)| r["source"]["bytes"].as_u64())
        .max()
        .unwrap_or(0);
    let mut kernel = BTreeMap::new();
    let mut attached = Vec::new();
    for line in metrics.lines() {
        if let Some(rest) = line.strip_prefix("conduit_sensor_kernel_total{reason=\"")
            && let Some((reason, value)) = rest.split_once("\"} ")
            && let Ok(n) = value.trim().parse::<u64>()
            && n > 0
        {
            kernel.insert(reason.to_string(), n);
        } else if line.starts_with("conduit_sensor_interface_attached{") {
            attached.push(line.to_string());
        }
    }
    attached.sort();
    SensorCounters {
        flows_recorded,
        loss_records,
        data_flow_bytes,
        kernel,
        attached,
    }
}

fn print_counters(c: &SensorCounters) {
    println!(
        "    sensor: {} flows recorded, {} loss records, {} IP bytes counted on the data flow",
        c.flows_recorded,
        c.loss_records.len(),
        c.data_flow_bytes
    );
    let kernel: Vec<String> = c.kernel.iter().map(|(k, v)| format!("{k}={v}")).collect();
    // The metrics show the counters as of the agent's last sweep, not of the scrape.
    println!(
        "    kernel counters (agent's last sweep): {}",
        kernel.join(" ")
    );
    for line in &c.attached {
        println!("    {line}");
    }
    for loss in &c.loss_records {
        println!("    loss: {}", loss["conduit"]["loss"]);
    }
}

/// A with-sensor round only counts if the sensor really watched the stream and
/// lost nothing.
fn check_counters(run: &Iperf, c: &SensorCounters) -> Result<()> {
    ensure!(
        c.loss_records.is_empty(),
        "the sensor wrote {} loss records",
        c.loss_records.len()
    );
    ensure!(
        c.attached.len() == 3,
        "the sensor is attached to {} interfaces, not 3: {:?}",
        c.attached.len(),
        c.attached
    );
    // IP bytes include headers, so they are at least the payload iperf3 received.
    ensure!(
        c.data_flow_bytes >= run.bytes_received,
        "the sensor counted {} bytes on the data flow, iperf3 received {}",
        c.data_flow_bytes,
        run.bytes_received
    );
    Ok(())
}

/// Compiles tests/lab/pass.ll into the lab's directory; returns the object.
fn compile_pass(lab: &Lab) -> Result<PathBuf> {
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("lab")
        .join("pass.ll");
    let obj = lab.workdir.join("pass.o");
    let llc = std::env::var("LLC").unwrap_or_else(|_| "llc".into());
    conduit_lab::sh(
        std::process::Command::new(&llc)
            .args(["-march=bpf", "-filetype=obj", "-o"])
            .arg(&obj)
            .arg(&source),
    )
    .with_context(|| format!("{llc} (set LLC to another llc)"))?;
    Ok(obj)
}

/// One control run: the pass program attached as `control` on the gateway's
/// three interfaces, detached afterwards whatever happened.
fn with_pass(lab: &GatewayLab, control: Control, obj: &Path, seconds: u32) -> Result<Iperf> {
    let obj = obj.display().to_string();
    let gw = |args: &[&str]| -> Result<()> {
        lab.lab.exec(&lab.gw, args)?;
        Ok(())
    };
    let attach = |ifname: &str| -> Result<()> {
        match control {
            Control::Xdp | Control::XdpGeneric => gw(&[
                "ip",
                "link",
                "set",
                "dev",
                ifname,
                control.name(),
                "obj",
                &obj,
                "sec",
                "xdp",
            ]),
            Control::Tc => {
                gw(&["tc", "qdisc", "add", "dev", ifname, "clsact"])?;
                for hook in ["ingress", "egress"] {
                    gw(&[
                        "tc", "filter", "add", "dev", ifname, hook, "bpf", "da", "obj", &obj,
                        "sec", "tc",
                    ])?;
                }
                Ok(())
            }
        }
    };
    let detach = |ifname: &str| -> Result<()> {
        match control {
            Control::Xdp | Control::XdpGeneric => {
                gw(&["ip", "link", "set", "dev", ifname, control.name(), "off"])
            }
            Control::Tc => gw(&["tc", "qdisc", "del", "dev", ifname, "clsact"]),
        }
    };
    let run = GW_IFS
        .iter()
        .try_for_each(|ifname| attach(ifname))
        .and_then(|()| check_offloads_off(lab))
        .and_then(|()| iperf(lab, seconds));
    for ifname in GW_IFS {
        // An interface the attach never reached has nothing to detach.
        let detached = detach(ifname);
        if run.is_ok() {
            detached?;
        }
    }
    run
}

/// Runs the iperf3 client in OT host 1 for `seconds`.
fn iperf(lab: &GatewayLab, seconds: u32) -> Result<Iperf> {
    let limit = scaled(Duration::from_secs(u64::from(seconds) + 30))
        .as_secs()
        .to_string();
    let (port, secs) = (IPERF_PORT.to_string(), seconds.to_string());
    let out = lab.lab.exec_any(
        &lab.ot1,
        &[
            "timeout", &limit, "iperf3", "-c", NET_V4, "-p", &port, "-t", &secs, "-J",
        ],
    )?;
    let report: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "iperf3 printed no JSON ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    if let Some(error) = report["error"].as_str() {
        bail!("iperf3: {error}");
    }
    ensure!(out.status.success(), "iperf3 exited with {}", out.status);
    let end = &report["end"];
    let bps = end["sum_received"]["bits_per_second"]
        .as_f64()
        .context("no end.sum_received.bits_per_second in iperf3's report")?;
    Ok(Iperf {
        gbps: bps / 1e9,
        bytes_received: end["sum_received"]["bytes"].as_u64().unwrap_or(0),
        retransmits: end["sum_sent"]["retransmits"].as_u64().unwrap_or(0),
        sender_cpu: end["cpu_utilization_percent"]["host_total"]
            .as_f64()
            .unwrap_or(0.0),
        receiver_cpu: end["cpu_utilization_percent"]["remote_total"]
            .as_f64()
            .unwrap_or(0.0),
    })
}

/// Fails unless TSO, GSO and GRO are off on every veth of the lab.
fn check_offloads_off(lab: &GatewayLab) -> Result<()> {
    for (ns, ifname) in [
        (&lab.ot1, "eth0"),
        (&lab.ot2, "eth0"),
        (&lab.gw, GW_OT1_IF),
        (&lab.gw, GW_OT2_IF),
        (&lab.gw, GW_UPLINK_IF),
        (&lab.net, "eth0"),
    ] {
        let out = lab.lab.exec(ns, &["ethtool", "-k", ifname])?;
        let text = String::from_utf8_lossy(&out.stdout);
        for feature in [
            "tcp-segmentation-offload",
            "generic-segmentation-offload",
            "generic-receive-offload",
        ] {
            let on = text
                .lines()
                .find_map(|l| l.trim().strip_prefix(&format!("{feature}: ")))
                .with_context(|| format!("ethtool -k {ifname} does not list {feature}"))?;
            ensure!(
                on.starts_with("off"),
                "{feature} is {on} on {ifname} in {}",
                ns.name
            );
        }
    }
    Ok(())
}

/// Starts `perf record -a -g` into `file` and waits until it records.
fn perf_start(lab: &mut Lab, ns: &Ns, label: &str, file: &Path) -> Result<()> {
    let _ = fs::remove_file(file);
    let path = file.display().to_string();
    lab.spawn(
        ns,
        label,
        &["perf", "record", "-a", "-g", "-q", "-o", &path],
    )?;
    // perf writes the file's header once its events are open.
    let deadline = Instant::now() + scaled(Duration::from_secs(30));
    while !fs::metadata(file).is_ok_and(|m| m.len() > 0) {
        ensure!(
            Instant::now() < deadline,
            "perf did not start recording into {path}; log:\n{}",
            fs::read_to_string(lab.log_path(label)).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Stops perf with SIGINT, as at the terminal, and waits for it to write the file.
fn perf_stop(lab: &mut Lab, label: &str) -> Result<()> {
    lab.stop(
        label,
        nix::sys::signal::Signal::SIGINT,
        Duration::from_secs(120),
    )?;
    Ok(())
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}
