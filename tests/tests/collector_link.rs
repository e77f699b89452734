//! The gateway's sensor streams its spool over mTLS to a collector in another
//! namespace. The collector starts only after the sensor has already recorded flows
//! (a dead collector means spooling, not dropping); at the end the collector's store
//! verifies with `verify-chain` and holds exactly the sensor's records, and its JSON
//! lines carry the classified flows.

use std::{path::Path, time::Duration};

use anyhow::{Context as _, Result, ensure};
use conduit_lab::{
    Lab, SensorRun,
    ai::{Client, LabCollector, LabPki, call, lab_conduits, start_endpoints},
    read_jsonl, skip_unless_root,
    topology::{AI_V4, GW_OT1_IF, GatewayLab, GatewayLabOptions, NET_V4},
    verify_chain,
};
use serde_json::Value;

#[test]
fn sensor_streams_to_a_collector_that_starts_late_and_verifies_everything() -> Result<()> {
    if skip_unless_root("sensor_streams_to_a_collector_that_starts_late_and_verifies_everything") {
        return Ok(());
    }
    let mut lab = GatewayLab::build("coll", GatewayLabOptions { masquerade: true })?;
    let pki = LabPki::create(&lab.lab)?;
    let (gw, ot1, net) = (lab.gw.clone(), lab.ot1.clone(), lab.net.clone());
    start_endpoints(&mut lab.lab, &net, &pki)?;
    let map = lab_conduits().display().to_string();
    // The sensor is told about a collector that is not running yet.
    let (cli_cert, cli_key) = pki.issue(
        &lab.lab,
        "sensor-client",
        "sensor-gw",
        &["DNS:sensor-gw"],
        true,
    )?;
    let s = |p: &std::path::Path| p.display().to_string();
    let url = format!("https://{NET_V4}:7443");
    let sensor = SensorRun::start(
        &mut lab.lab,
        &gw,
        "sensor",
        &[
            "--iface",
            GW_OT1_IF,
            "--conduits",
            &map,
            "--collector",
            &url,
            "--tls-cert",
            &s(&cli_cert),
            "--tls-key",
            &s(&cli_key),
            "--tls-ca",
            &s(&pki.ca),
        ],
    )?;
    // The collector is not there yet: the sensor keeps everything in its spool.
    call(
        &lab.lab,
        &ot1,
        Client::Curl,
        "api.openai.com",
        AI_V4[0],
        &pki,
    )?;

    let collector = LabCollector::start(&mut lab.lab, &net, NET_V4, &pki, "sensor-gw")?;
    let (store, jsonl) = (collector.store.clone(), collector.export.clone());
    call(
        &lab.lab,
        &ot1,
        Client::Curl,
        "chat.openai.com",
        AI_V4[1],
        &pki,
    )?;
    std::thread::sleep(Duration::from_secs(1));
    let records = sensor.stop(&mut lab.lab)?;
    let head = records
        .iter()
        .filter_map(|r| r["event"]["sequence"].as_u64())
        .max()
        .context("no records")?;

    let exported = stop_and_check_collector(&mut lab.lab, &store, &jsonl, head)?;
    for name in ["api.openai.com", "chat.openai.com"] {
        ensure!(
            exported
                .iter()
                .any(|r| r["tls"]["client"]["server_name"] == name
                    && r["conduit"]["verdict"] == "violation"),
            "no exported violation for {name}"
        );
    }
    Ok(())
}

/// The uplink to the collector is cut (link down) while OT traffic between the
/// zones goes on, then restored; then the sensor is restarted on the same spool.
/// The collector's store ends up with every record of both runs exactly once, in
/// one verifying chain.
#[test]
fn link_cut_under_traffic_and_sensor_restart_lose_nothing() -> Result<()> {
    if skip_unless_root("link_cut_under_traffic_and_sensor_restart_lose_nothing") {
        return Ok(());
    }
    let mut lab = GatewayLab::build("cut", GatewayLabOptions::default())?;
    let pki = LabPki::create(&lab.lab)?;
    let (gw, ot1, ot2, net) = (
        lab.gw.clone(),
        lab.ot1.clone(),
        lab.ot2.clone(),
        lab.net.clone(),
    );
    let echo = conduit_lab::peer_script("echo.py").display().to_string();
    lab.lab.spawn(
        &ot2,
        "udp-server",
        &["python3", &echo, "server", "udp", "10.20.0.10", "5000"],
    )?;
    lab.lab
        .wait_for_port(&ot2, "udp", 5000, Duration::from_secs(10))?;
    let collector = LabCollector::start(&mut lab.lab, &net, NET_V4, &pki, "sensor-gw")?;
    let mut args: Vec<String> = [
        "--iface",
        GW_OT1_IF,
        "--iface",
        conduit_lab::topology::GW_OT2_IF,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(collector.sensor_args());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();

    // Flows between the two zones: recorded (no conduit map), independent of the uplink.
    let traffic = |lab: &GatewayLab, n: usize| -> Result<()> {
        for _ in 0..n {
            lab.lab.exec(
                &ot1,
                &[
                    "python3",
                    &echo,
                    "client",
                    "udp",
                    "10.20.0.10",
                    "5000",
                    "2",
                    "20",
                ],
            )?;
        }
        Ok(())
    };
    let sensor = SensorRun::start(&mut lab.lab, &gw, "sensor", &args)?;
    traffic(&lab, 3)?;
    lab.lab.exec(
        &gw,
        &[
            "ip",
            "link",
            "set",
            conduit_lab::topology::GW_UPLINK_IF,
            "down",
        ],
    )?;
    traffic(&lab, 5)?;
    std::thread::sleep(Duration::from_secs(2));
    lab.lab.exec(
        &gw,
        &[
            "ip",
            "link",
            "set",
            conduit_lab::topology::GW_UPLINK_IF,
            "up",
        ],
    )?;
    traffic(&lab, 3)?;
    let first = sensor.stop(&mut lab.lab)?;

    // Restart on the same spool: the chain continues and streaming resumes.
    let sensor = SensorRun::start(&mut lab.lab, &gw, "sensor", &args)?;
    traffic(&lab, 2)?;
    std::thread::sleep(Duration::from_secs(1));
    let second = sensor.stop(&mut lab.lab)?;
    let head = second
        .iter()
        .filter_map(|r| r["event"]["sequence"].as_u64())
        .max()
        .context("no records")?;
    let first_head = first
        .iter()
        .filter_map(|r| r["event"]["sequence"].as_u64())
        .max()
        .context("no records")?;
    ensure!(
        head > first_head,
        "the restarted sensor did not continue the chain: {first_head} then {head}"
    );

    stop_and_check_collector(&mut lab.lab, &collector.store, &collector.export, head)?;
    Ok(())
}

/// Stops the collector, then checks that its store for `sensor-gw` verifies and
/// holds exactly seq 1..=head, and that its JSON-lines export has every one of those
/// records once, in order. Returns the exported records.
fn stop_and_check_collector(
    lab: &mut Lab,
    store: &Path,
    export: &Path,
    head: u64,
) -> Result<Vec<Value>> {
    lab.stop(
        "collector",
        nix::sys::signal::Signal::SIGTERM,
        Duration::from_secs(15),
    )?;
    let report = verify_chain(&store.join("sensor-gw"))?;
    ensure!(
        report.contains(&format!("seq 1..{head}")),
        "store does not hold seq 1..{head}:\n{report}"
    );
    let exported = read_jsonl(export)?;
    let seqs: Vec<u64> = exported
        .iter()
        .filter(|r| r["observer"]["id"] == "sensor-gw")
        .filter_map(|r| r["event"]["sequence"].as_u64())
        .collect();
    ensure!(
        seqs == (1..=head).collect::<Vec<_>>(),
        "exported seqs {seqs:?}, expected 1..={head}"
    );
    Ok(exported)
}
