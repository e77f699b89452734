//! `conduit-sensor replay` runs the same kernel program over a capture
//! (BPF_PROG_TEST_RUN) and must produce the same flow records as the live sensor
//! that saw the same packets: same flows, same per-direction packet and byte counts,
//! same classification.

use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use conduit_lab::{
    SensorRun,
    ai::{Client, LabPki, call, lab_conduits, start_endpoints},
    last_flow_records, peer_script, read_jsonl, sh, skip_unless_root,
    topology::{AI_V4, GW_OT1_IF, GatewayLab, GatewayLabOptions},
    verify_chain, workspace_bin,
};

#[test]
fn replay_of_a_capture_gives_the_live_records() -> Result<()> {
    if skip_unless_root("replay_of_a_capture_gives_the_live_records") {
        return Ok(());
    }
    let mut lab = GatewayLab::build("replay", GatewayLabOptions::default())?;
    let pki = LabPki::create(&lab.lab)?;
    let (gw, ot1, net) = (lab.gw.clone(), lab.ot1.clone(), lab.net.clone());
    start_endpoints(&mut lab.lab, &net, &pki)?;
    let echo = peer_script("echo.py").display().to_string();
    lab.lab.spawn(
        &net,
        "udp-server",
        &["python3", &echo, "server", "udp", AI_V4[1], "5000"],
    )?;
    lab.lab
        .wait_for_port(&net, "udp", 5000, Duration::from_secs(10))?;

    let pcap = lab.lab.workdir.join("gw.pcap");
    let pcap_arg = pcap.display().to_string();
    lab.lab.spawn(
        &gw,
        "tcpdump",
        &[
            "tcpdump",
            "-i",
            GW_OT1_IF,
            "-w",
            &pcap_arg,
            "--immediate-mode",
            "-U",
            "ip or ip6",
        ],
    )?;
    lab.lab
        .wait_for_log("tcpdump", "listening on", Duration::from_secs(10))?;

    let map = lab_conduits().display().to_string();
    let sensor = SensorRun::start(
        &mut lab.lab,
        &gw,
        "sensor",
        &["--iface", GW_OT1_IF, "--conduits", &map, "--record-all"],
    )?;
    lab.lab.exec(
        &ot1,
        &[
            "python3", &echo, "client", "udp", AI_V4[1], "5000", "6", "200",
        ],
    )?;
    call(
        &lab.lab,
        &ot1,
        Client::Curl,
        "api.openai.com",
        AI_V4[0],
        &pki,
    )?;
    std::thread::sleep(Duration::from_millis(500));
    let live = sensor.stop(&mut lab.lab)?;
    lab.lab.stop(
        "tcpdump",
        nix::sys::signal::Signal::SIGINT,
        Duration::from_secs(10),
    )?;

    let jsonl = lab.lab.workdir.join("replay.jsonl");
    let spool = lab.lab.workdir.join("replay-spool");
    sh(std::process::Command::new(workspace_bin("conduit-sensor"))
        .args(["replay", "--conduits", &map, "--record-all", "--jsonl"])
        .arg(&jsonl)
        .arg("--spool")
        .arg(&spool)
        .arg(&pcap))?;
    let replayed = read_jsonl(&jsonl)?;

    let live_flows = last_flow_records(&live);
    let replay_flows = last_flow_records(&replayed);
    ensure!(
        live_flows.len() >= 2,
        "live sensor recorded too few flows: {live_flows:#?}"
    );
    for (key, l) in &live_flows {
        let r = replay_flows
            .get(key)
            .with_context(|| format!("replay has no flow {key:?}; replay: {replay_flows:#?}"))?;
        for field in [
            ("source", "packets"),
            ("source", "bytes"),
            ("destination", "packets"),
            ("destination", "bytes"),
        ] {
            ensure!(
                l[field.0][field.1] == r[field.0][field.1],
                "{key:?} {field:?}: live {} replay {}",
                l[field.0][field.1],
                r[field.0][field.1]
            );
        }
        for path in [
            ["conduit", "verdict"],
            ["conduit", "endpoint"],
            ["network", "protocol"],
        ] {
            ensure!(
                l[path[0]][path[1]] == r[path[0]][path[1]],
                "{key:?} {path:?}: live {} replay {}",
                l[path[0]][path[1]],
                r[path[0]][path[1]]
            );
        }
        ensure!(
            l["tls"]["client"]["server_name"] == r["tls"]["client"]["server_name"],
            "{key:?}: SNI live {} replay {}",
            l["tls"]["client"]["server_name"],
            r["tls"]["client"]["server_name"]
        );
    }
    ensure!(
        replay_flows.len() == live_flows.len(),
        "replay has extra flows: {replay_flows:#?}"
    );
    // The TLS flow must really be classified, not merely equal on both sides.
    let tls = replay_flows
        .iter()
        .find(|((t, _, _, d, p), _)| t == "tcp" && d.to_string() == AI_V4[0] && *p == 443)
        .map(|(_, r)| r)
        .context("no TLS flow in the replay")?;
    ensure!(
        tls["tls"]["client"]["server_name"] == "api.openai.com",
        "{tls:#}"
    );
    ensure!(
        tls["conduit"]["verdict"] == "violation" && tls["conduit"]["zone"] == "cell-1",
        "{tls:#}"
    );
    ensure!(
        tls["event"]["reason"] == "end",
        "the capture closed the TLS flow with FIN: {tls:#}"
    );

    // Every time is the capture's: each flow's start and end are the capture times
    // of its first and last packet (to the millisecond the JSON carries), and every
    // flow and policy record is stamped within the capture, not with the replay's
    // clock.
    for ((transport, sip, sport, dip, dport), r) in &replay_flows {
        let filter =
            format!("{transport} and host {sip} and port {sport} and host {dip} and port {dport}");
        let times = capture_times(&pcap, &filter)?;
        let (first, last) = (
            times.first().context("no packet")?,
            times.last().context("no packet")?,
        );
        ensure!(
            r["event"]["start"] == rfc3339_ms(first)? && r["event"]["end"] == rfc3339_ms(last)?,
            "{filter}: start/end {} {} in the replay, first/last packet {first} {last} in the capture",
            r["event"]["start"],
            r["event"]["end"]
        );
    }
    let all = capture_times(&pcap, "")?;
    let lo = rfc3339_ms(all.first().context("empty capture")?)?;
    let hi = rfc3339_ms(all.last().context("empty capture")?)?;
    for r in &replayed {
        // Every record: flows, the policy change, and the chain's own (chain
        // start, checkpoints).
        let action = r["event"]["action"].as_str().unwrap_or_default();
        let at = r["@timestamp"].as_str().unwrap_or_default();
        ensure!(
            lo.as_str() <= at && at <= hi.as_str(),
            "{action} stamped {at}, outside the capture ({lo} to {hi}): {r:#}"
        );
    }
    ensure!(
        verify_chain(&spool)?.contains("records verified"),
        "replay spool does not verify"
    );
    Ok(())
}

/// Capture times (`tcpdump -tt`: seconds.microseconds) of the packets matching
/// `filter`, in file order.
fn capture_times(pcap: &std::path::Path, filter: &str) -> Result<Vec<String>> {
    let mut cmd = std::process::Command::new("tcpdump");
    cmd.args(["-r"]).arg(pcap).args(["-n", "-tt"]);
    if !filter.is_empty() {
        cmd.arg(filter);
    }
    let out = sh(&mut cmd)?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect())
}

/// `seconds.fraction` as the JSON's RFC 3339 UTC with milliseconds (truncated).
fn rfc3339_ms(t: &str) -> Result<String> {
    let out = sh(std::process::Command::new("date").args([
        "-u",
        "-d",
        &format!("@{t}"),
        "+%Y-%m-%dT%H:%M:%S.%3NZ",
    ]))?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}
