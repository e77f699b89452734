//! `cargo xtask demo`: a small plant in network namespaces.
//!
//! Two OT zones (assembly cell 1, MES) behind an edge gateway that masquerades on
//! its uplink and runs Conduit Sensor; fake AI endpoints (nginx for TLS, aioquic
//! for QUIC) on the other side. Real clients call them; the conduit map allows
//! some of it. The demo prints the flow records (authorized flows and violations
//! side by side), verifies the chain, tampers with a copy and shows what
//! verify-chain says. Everything is removed at the end.

use std::{
    fs,
    process::{Command, ExitCode},
    time::Duration,
};

use anyhow::{Context as _, Result};
use conduit_lab::{
    SensorRun,
    ai::{Client, LabCollector, LabPki, call, lab_conduits, start_endpoints},
    is_root, read_jsonl,
    topology::{AI_V4, AI_V6, GW_OT1_IF, GW_OT2_IF, GatewayLab, GatewayLabOptions, NET_V4},
    workspace_bin,
};
use serde_json::Value;

fn main() -> ExitCode {
    if !is_root() {
        eprintln!("demo: needs root (it creates network namespaces)");
        return ExitCode::FAILURE;
    }
    match demo() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("demo failed: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn say(s: &str) {
    println!("\n\x1b[1m== {s}\x1b[0m");
}

fn demo() -> Result<()> {
    say(
        "Building the lab: ot1 (cell-1) and ot2 (mes) -> gw (sensor, NAT) -> net (fake AI endpoints)",
    );
    let mut lab = GatewayLab::build("demo", GatewayLabOptions { masquerade: true })?;
    let pki = LabPki::create(&lab.lab)?;
    let (gw, ot1, ot2, net) = (
        lab.gw.clone(),
        lab.ot1.clone(),
        lab.ot2.clone(),
        lab.net.clone(),
    );
    start_endpoints(&mut lab.lab, &net, &pki)?;

    say("Conduit map (tests/lab/conduits.yaml)");
    let map = lab_conduits();
    let check = Command::new(workspace_bin("conduit-sensor"))
        .args(["check-config", "--conduits"])
        .arg(&map)
        .output()?;
    print!("{}", String::from_utf8_lossy(&check.stdout));
    for line in fs::read_to_string(&map)?
        .lines()
        .filter(|l| l.trim_start().starts_with("- id: C-"))
    {
        println!(
            "  conduit {}",
            line.trim_start().trim_start_matches("- id: ")
        );
    }

    say("Starting the collector (mTLS, verifying store, JSON-lines export) in the SOC network");
    let collector = LabCollector::start(&mut lab.lab, &net, NET_V4, &pki, "sensor-gw")?;
    let (store, export) = (collector.store.clone(), collector.export.clone());
    println!("  conduit-collector listening on {}", collector.url);

    say(
        "Starting conduit-sensor on the gateway's zone-facing interfaces, streaming to the collector",
    );
    let map_arg = map.display().to_string();
    let mut args: Vec<String> = [
        "--iface",
        GW_OT1_IF,
        "--iface",
        GW_OT2_IF,
        "--conduits",
        &map_arg,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(collector.sensor_args());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let sensor = SensorRun::start(&mut lab.lab, &gw, "sensor", &args)?;

    say("OT hosts call AI endpoints with real clients");
    let calls: &[(&str, &conduit_lab::Ns, Client, &str, &str)] = &[
        ("cell-1", &ot1, Client::Curl, "api.openai.com", AI_V4[0]),
        (
            "cell-1",
            &ot1,
            Client::Chromium,
            "chat.openai.com",
            AI_V4[1],
        ),
        (
            "cell-1",
            &ot1,
            Client::PythonSsl,
            "api.anthropic.com",
            AI_V6,
        ),
        (
            "cell-1",
            &ot1,
            Client::Aioquic,
            "generativelanguage.googleapis.com",
            AI_V4[2],
        ),
        (
            "mes",
            &ot2,
            Client::Curl,
            "plant01.openai.azure.com",
            AI_V4[0],
        ),
        (
            "mes",
            &ot2,
            Client::OpensslSClient,
            "plant01.openai.azure.com",
            AI_V4[1],
        ),
        ("mes", &ot2, Client::Aioquic, "api.openai.com", AI_V4[2]),
        (
            "cell-1",
            &ot1,
            Client::Curl,
            "updates.vendor.example",
            AI_V4[0],
        ),
    ];
    for (zone, ns, client, name, addr) in calls {
        let result = call(&lab.lab, ns, *client, name, addr, &pki);
        println!(
            "  {zone:<7} {:<11} https://{name:<36} {}",
            client.name(),
            if result.is_ok() { "ok" } else { "FAILED" }
        );
        result.with_context(|| format!("{} to {name}", client.name()))?;
    }
    std::thread::sleep(Duration::from_millis(500));

    say("Stopping the sensor (SIGTERM drains: every live flow gets its flow_end)");
    let spool = sensor.spool.clone();
    let records = sensor.stop(&mut lab.lab)?;
    print_table(&records);

    say("verify-chain on the sensor's spool");
    let verify = |dir: &std::path::Path| -> Result<(i32, String)> {
        let out = Command::new(workspace_bin("conduit-sensor"))
            .arg("verify-chain")
            .arg(dir)
            .output()?;
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        ))
    };
    let (code, text) = verify(&spool)?;
    print!("{text}");
    println!("  exit code {code}");
    anyhow::ensure!(code == 0, "the fresh spool does not verify");

    say("Tampering with a copy: one byte of a record in the middle of the spool");
    let copy = lab.lab.workdir.join("tampered-spool");
    Command::new("cp")
        .arg("-a")
        .arg(&spool)
        .arg(&copy)
        .status()?;
    let segment = fs::read_dir(&copy)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "cspool"))
        .min()
        .context("no segment in the spool")?;
    let mut bytes = fs::read(&segment)?;
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    fs::write(&segment, bytes)?;
    println!(
        "  flipped one bit at byte {at} of {}",
        segment.file_name().and_then(|n| n.to_str()).unwrap_or("?")
    );
    let (code, text) = verify(&copy)?;
    print!("{text}");
    println!("  exit code {code}");
    anyhow::ensure!(code == 1, "verify-chain did not catch the tampering");

    say("The collector's view");
    lab.lab.stop(
        "collector",
        nix::sys::signal::Signal::SIGTERM,
        Duration::from_secs(15),
    )?;
    let out = Command::new(workspace_bin("conduit-collector"))
        .arg("verify")
        .arg("--store")
        .arg(&store)
        .output()?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    println!(
        "  conduit-collector verify: exit code {}",
        out.status.code().unwrap_or(-1)
    );
    let exported = read_jsonl(&export)?;
    let flows = exported
        .iter()
        .filter(|r| r["event"]["action"] == "flow_start")
        .count();
    let violations = exported
        .iter()
        .filter(|r| r["event"]["action"] == "flow_start" && r["conduit"]["verdict"] == "violation")
        .count();
    println!(
        "  SIEM export {}: {} records, {} flows started, {} violations",
        export.display(),
        exported.len(),
        flows,
        violations
    );
    if let Some(v) = exported
        .iter()
        .find(|r| r["conduit"]["verdict"] == "violation")
    {
        println!("  one exported violation, as the SIEM receives it:\n  {v}");
    }

    say("The auditor's report for the sensor's run");
    // From the first signed checkpoint to the last (JSON times are milliseconds).
    let checkpoints: Vec<&str> = exported
        .iter()
        .filter(|r| r["event"]["action"] == "checkpoint" && r["observer"]["id"] == "sensor-gw")
        .filter_map(|r| r["@timestamp"].as_str())
        .collect();
    let (Some(first), Some(last)) = (checkpoints.first(), checkpoints.last()) else {
        anyhow::bail!("the export has no checkpoint of the sensor");
    };
    let fmt = time::format_description::well_known::Rfc3339;
    let since = (time::OffsetDateTime::parse(first, &fmt)? + time::Duration::milliseconds(1))
        .format(&fmt)?;
    let out_dir = workspace_bin("conduit-collector")
        .parent()
        .and_then(|p| p.parent())
        .map(|t| t.join("demo"))
        .context("no target directory")?;
    fs::create_dir_all(&out_dir)?;
    let (html, pdf) = (
        out_dir.join("conduit-report.html"),
        out_dir.join("conduit-report.pdf"),
    );
    let mut report = Command::new(workspace_bin("conduit-collector"));
    report
        .args(["report", "--store"])
        .arg(&store)
        .args(["--since", &since, "--until", last, "--out"])
        .arg(&html);
    if Command::new("sh")
        .args(["-c", "command -v chromium"])
        .output()?
        .status
        .success()
    {
        report.arg("--pdf").arg(&pdf);
    }
    let out = report.output()?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    println!(
        "  conduit-collector report: exit code {} (0: verified and complete)",
        out.status.code().unwrap_or(-1)
    );
    anyhow::ensure!(
        out.status.success(),
        "the report is not verified and complete"
    );
    println!("  open it: file://{}", html.display());
    if pdf.exists() {
        println!("  printed: {}", pdf.display());
    }

    say("Done; the lab is being removed");
    Ok(())
}

fn print_table(records: &[Value]) {
    println!(
        "\n  {:<5} {:<11} {:<7} {:<21} {:<24} {:<34} {:<5} {:<12} {:<18} {:>9} {:>11}",
        "seq",
        "action",
        "zone",
        "source",
        "destination",
        "server name",
        "proto",
        "verdict",
        "conduit",
        "pkts →/←",
        "bytes →/←"
    );
    for r in records {
        let action = r["event"]["action"].as_str().unwrap_or("");
        let s = |v: &Value| v.as_str().unwrap_or("-").to_string();
        if !action.starts_with("flow_") {
            println!(
                "  {:<5} {:<11} {}",
                r["event"]["sequence"].as_u64().unwrap_or(0),
                action,
                summary(r)
            );
            continue;
        }
        let verdict = s(&r["conduit"]["verdict"]);
        let colour = match verdict.as_str() {
            "authorized" => "\x1b[32m",
            "violation" => "\x1b[33m",
            "blocked" => "\x1b[31m",
            _ => "",
        };
        println!(
            "  {:<5} {:<11} {:<7} {:<21} {:<24} {:<34} {:<5} {colour}{:<12}\x1b[0m {:<18} {:>9} {:>11}",
            r["event"]["sequence"].as_u64().unwrap_or(0),
            action,
            s(&r["conduit"]["zone"]),
            format!("{}:{}", s(&r["source"]["ip"]), r["source"]["port"]),
            format!(
                "{}:{}",
                s(&r["destination"]["ip"]),
                r["destination"]["port"]
            ),
            s(&r["tls"]["client"]["server_name"]),
            s(&r["network"]["protocol"]),
            verdict,
            s(&r["conduit"]["id"]),
            format!("{}/{}", r["source"]["packets"], r["destination"]["packets"]),
            format!("{}/{}", r["source"]["bytes"], r["destination"]["bytes"]),
        );
    }
}

fn summary(r: &Value) -> String {
    let c = &r["conduit"];
    match r["event"]["action"].as_str().unwrap_or("") {
        "policy_change" => format!(
            "conduit map {} loaded",
            c["policy_hash"]
                .as_str()
                .unwrap_or("?")
                .get(..16)
                .unwrap_or("?")
        ),
        "checkpoint" => format!("signed checkpoint covering seq {}", c["checkpoint"]["seq"]),
        "chain_restart" => format!("new chain: {}", c["chain_restart"]["reason"]),
        "loss" => format!("LOSS {} x {}", c["loss"]["count"], c["loss"]["reason"]),
        other => other.to_string(),
    }
}
