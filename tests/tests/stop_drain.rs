//! SIGTERM during a burst of TLS and QUIC handshakes: the sensor stays attached
//! while it finishes the classifications in flight, so every handshake that
//! completed has its SNI in a record.
//!
//! Some handshakes are held half-way: the first part of their ClientHello (half of
//! it in one TCP segment; the first of several QUIC Initials) has passed the
//! gateway when the sensor gets SIGTERM, the rest only once the sensor says it is
//! finishing pending classifications. A sensor that detached at SIGTERM never sees
//! the rest and records these flows without their SNI.
//!
//! With `--record-all`, each flow's one `flow_start` must already carry the SNI and
//! the verdict: it is written once classification finished, not at the SYN.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    process::{Child, ChildStdin, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use conduit_lab::{
    Lab, Ns, SensorRun,
    ai::{LabPki, lab_conduits, start_endpoints},
    peer_script, read_jsonl, skip_unless_root,
    topology::{AI_V4, GW_OT1_IF, GatewayLab, GatewayLabOptions},
    verify_chain,
};
use serde_json::Value;

const SNI: &str = "api.openai.com";
/// Handshakes held half-way per protocol.
const HELD: usize = 3;
/// Burst handshakes that complete before SIGTERM is sent.
const BEFORE_SIGTERM: usize = 6;

/// A handshake of `peers/handshake.py`: its transport and local port.
#[derive(Clone, Debug)]
struct Handshake {
    transport: &'static str,
    port: u64,
}

/// A handshake process whose output lines arrive on a channel.
struct Peer {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    transport: &'static str,
}

impl Peer {
    fn spawn(lab: &Lab, ns: &Ns, proto: &str, ca: &str, mode: &str) -> Result<Peer> {
        let script = peer_script("handshake.py").display().to_string();
        let mut child = Command::new("ip")
            .args(["netns", "exec", &ns.name, "python3", &script])
            .args([proto, AI_V4[0], SNI, ca, mode])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(
                lab.workdir.join(format!("{proto}-{mode}.err")),
            )?)
            .spawn()
            .context("spawn handshake.py")?;
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Peer {
            stdin: child.stdin.take(),
            child,
            lines,
            transport: if proto == "tls" { "tcp" } else { "udp" },
        })
    }

    /// The next line, which must start with `what`; returns the port after it.
    fn expect(&self, what: &str, timeout: Duration) -> Result<u64> {
        let line = self
            .lines
            .recv_timeout(timeout)
            .with_context(|| format!("no {what:?} line within {timeout:?}"))?;
        line.strip_prefix(what)
            .and_then(|p| p.trim().parse().ok())
            .with_context(|| format!("expected {what:?}, got {line:?}"))
    }

    fn release(&mut self) -> Result<()> {
        let stdin = self.stdin.as_mut().context("released twice")?;
        stdin.write_all(b"go\n")?;
        stdin.flush()?;
        Ok(())
    }

    /// Waits for the handshake to complete; returns it.
    fn finish(mut self, port: u64) -> Result<Handshake> {
        let done = self.expect("done ", Duration::from_secs(30))?;
        ensure!(done == port, "done {done}, started on {port}");
        let status = self.child.wait()?;
        ensure!(status.success(), "handshake on port {port}: {status}");
        Ok(Handshake {
            transport: self.transport,
            port,
        })
    }
}

/// One whole handshake; `None` if it failed (the sensor's state cannot fail it,
/// but the test only counts what completed).
fn whole(lab: &Lab, ns: &Ns, proto: &str, ca: &str) -> Result<Option<Handshake>> {
    let mut peer = Peer::spawn(lab, ns, proto, ca, "whole")?;
    let port = peer.expect("port ", Duration::from_secs(30))?;
    drop(peer.stdin.take());
    Ok(peer.finish(port).ok())
}

/// The flow records of a handshake's flow.
fn flow_records<'a>(records: &'a [Value], h: &Handshake) -> Vec<&'a Value> {
    records
        .iter()
        .filter(|r| {
            r["event"]["action"]
                .as_str()
                .is_some_and(|a| a.starts_with("flow_"))
                && r["network"]["transport"] == h.transport
                && r["source"]["port"].as_u64() == Some(h.port)
                && r["destination"]["ip"] == AI_V4[0]
        })
        .collect()
}

/// Whether the flow has its SNI in a record, and one `flow_start` that already
/// carries the classification (written once it finished, even with --record-all).
fn recorded_with_sni(records: &[Value], h: &Handshake) -> bool {
    let flow = flow_records(records, h);
    let starts: Vec<&&Value> = flow
        .iter()
        .filter(|r| r["event"]["action"] == "flow_start")
        .collect();
    starts.len() == 1
        && starts[0]["tls"]["client"]["server_name"] == SNI
        && starts[0]["conduit"]["verdict"] == "violation"
        && starts[0]["conduit"]["endpoint"] == "openai"
        && flow.iter().any(|r| r["event"]["action"] == "flow_end")
}

#[test]
fn sigterm_during_handshakes_records_every_completed_sni() -> Result<()> {
    if skip_unless_root("sigterm_during_handshakes_records_every_completed_sni") {
        return Ok(());
    }
    let mut lab = GatewayLab::build("stopdrain", GatewayLabOptions { masquerade: true })?;
    let pki = LabPki::create(&lab.lab)?;
    let (gw, ot1, net) = (lab.gw.clone(), lab.ot1.clone(), lab.net.clone());
    start_endpoints(&mut lab.lab, &net, &pki)?;
    let map = lab_conduits().display().to_string();
    let sensor = SensorRun::start(
        &mut lab.lab,
        &gw,
        "sensor",
        &["--iface", GW_OT1_IF, "--conduits", &map, "--record-all"],
    )?;
    let ca = pki.ca.display().to_string();

    // The burst: TLS and QUIC handshakes back to back until the sensor has exited.
    let lab = Arc::new(lab);
    let stop = Arc::new(AtomicBool::new(false));
    let completed: Arc<Mutex<Vec<(Handshake, Instant)>>> = Arc::default();
    let workers: Vec<_> = ["tls", "quic", "tls", "quic"]
        .into_iter()
        .map(|proto| {
            let (lab, stop, completed) = (lab.clone(), stop.clone(), completed.clone());
            let (ot1, ca) = (ot1.clone(), ca.clone());
            thread::spawn(move || -> Result<()> {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(h) = whole(&lab.lab, &ot1, proto, &ca)? {
                        completed
                            .lock()
                            .expect("results lock")
                            .push((h, Instant::now()));
                    }
                }
                Ok(())
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    while completed.lock().expect("results lock").len() < BEFORE_SIGTERM {
        ensure!(Instant::now() < deadline, "the burst does not complete");
        thread::sleep(Duration::from_millis(50));
    }

    // Handshakes held half-way through their ClientHello (started together: the
    // agent gives up a ClientHello left incomplete for 5 s).
    let mut held = Vec::new();
    for proto in ["tls", "quic"] {
        for _ in 0..HELD {
            held.push(Peer::spawn(&lab.lab, &ot1, proto, &ca, "held")?);
        }
    }
    let mut held: Vec<(Peer, u64)> = held
        .into_iter()
        .map(|peer| {
            let port = peer.expect("port ", Duration::from_secs(30))?;
            Ok((peer, port))
        })
        .collect::<Result<_>>()?;

    lab.lab
        .signal("sensor", nix::sys::signal::Signal::SIGTERM)?;
    lab.lab.wait_for_log(
        "sensor",
        "finishing pending classifications",
        Duration::from_secs(30),
    )?;
    // Every handshake completed by now completed while the sensor was attached.
    let released = Instant::now();
    for (peer, _) in held.iter_mut() {
        peer.release()?;
    }
    let mut held_done = Vec::new();
    for (peer, port) in held {
        held_done.push(peer.finish(port)?);
    }

    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().map_err(|_| anyhow::anyhow!("worker panicked"))??;
    }
    let mut lab = Arc::try_unwrap(lab)
        .ok()
        .context("the lab is still shared")?;
    // Wait for the exit (a second SIGTERM changes nothing in a draining sensor).
    let code = lab.lab.stop(
        "sensor",
        nix::sys::signal::Signal::SIGTERM,
        Duration::from_secs(60),
    )?;
    if code != Some(0) {
        let log = std::fs::read_to_string(lab.lab.log_path("sensor")).unwrap_or_default();
        bail!("sensor exited with {code:?}; log:\n{log}");
    }
    let records = read_jsonl(&sensor.jsonl)?;
    let before: Vec<Handshake> = completed
        .lock()
        .expect("results lock")
        .iter()
        .filter(|(_, at)| *at < released)
        .map(|(h, _)| h.clone())
        .collect();
    ensure!(before.len() >= BEFORE_SIGTERM);
    let missing: Vec<&Handshake> = held_done
        .iter()
        .chain(&before)
        .filter(|h| !recorded_with_sni(&records, h))
        .collect();
    ensure!(
        missing.is_empty(),
        "completed handshakes without their SNI and verdict in the flow_start: {missing:?}; sensor log:\n{}",
        std::fs::read_to_string(lab.lab.log_path("sensor")).unwrap_or_default()
    );
    println!(
        "{} held and {} burst handshakes completed while attached, all with SNI",
        held_done.len(),
        before.len()
    );
    verify_chain(&sensor.spool)?;
    Ok(())
}
