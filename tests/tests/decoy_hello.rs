//! A decoy ClientHello the server ignores, live through the lab gateway: a client
//! in an OT zone sends a complete hello naming a harmless host with a broken TCP
//! checksum (the gateway forwards it, the server's TCP drops it), then its real
//! hello at the same sequence number on the kernel's socket (`peers/decoy_hello.py`).
//! The sensor must record the real name, flag the conflict and name the decoy, and
//! with `--enforce` block a call the map blocks however the decoy named it.

use anyhow::{Context as _, Result, ensure};
use conduit_lab::{
    Lab, Ns,
    ai::{LabPki, start_endpoints, start_lab_sensor},
    peer_script, skip_unless_root,
    topology::{AI_V4, GatewayLab, GatewayLabOptions, OT1_V4},
};
use serde_json::Value;

const DECOY: &str = "harmless.example.org";

/// Runs the decoy client from `ns` to `addr` naming `sni`; returns its local port
/// and whether its request was answered.
fn decoy_call(lab: &Lab, ns: &Ns, ca: &str, addr: &str, sni: &str) -> Result<(u64, bool)> {
    let script = peer_script("decoy_hello.py").display().to_string();
    let out = lab.exec_any(ns, &["python3", &script, addr, sni, DECOY, ca])?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let port = stdout
        .lines()
        .find_map(|l| l.strip_prefix("port ")?.parse().ok())
        .with_context(|| {
            format!(
                "decoy_hello.py to {sni} sent no decoy: {stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    Ok((port, out.status.success() && stdout.contains("done ")))
}

/// The last flow record of the call from OT1's `port`.
fn last_record(records: &[Value], port: u64) -> Result<&Value> {
    records
        .iter()
        .rfind(|r| r["source"]["ip"] == OT1_V4 && r["source"]["port"] == port)
        .with_context(|| {
            let all: Vec<String> = records.iter().map(Value::to_string).collect();
            format!("no record of port {port}:\n{}", all.join("\n"))
        })
}

fn check(r: &Value, sni: &str, endpoint: &str, verdict: &str) -> Result<()> {
    let what = format!("{r:#}");
    ensure!(
        r["tls"]["client"]["server_name"] == sni,
        "server name: {what}"
    );
    ensure!(r["conduit"]["endpoint"] == endpoint, "endpoint: {what}");
    ensure!(r["conduit"]["verdict"] == verdict, "verdict: {what}");
    ensure!(
        r["conduit"]["anomalies"] == serde_json::json!(["conflicting_retransmission"]),
        "anomalies: {what}"
    );
    ensure!(
        r["conduit"]["conflicting_server_names"] == serde_json::json!([DECOY]),
        "conflicting names: {what}"
    );
    Ok(())
}

#[test]
fn a_decoy_hello_the_server_ignores_neither_hides_nor_unblocks_the_call() -> Result<()> {
    if skip_unless_root("a_decoy_hello_the_server_ignores_neither_hides_nor_unblocks_the_call") {
        return Ok(());
    }
    let mut lab = GatewayLab::build("decoy", GatewayLabOptions { masquerade: true })?;
    let pki = LabPki::create(&lab.lab)?;
    let (gw, net, ot1) = (lab.gw.clone(), lab.net.clone(), lab.ot1.clone());
    start_endpoints(&mut lab.lab, &net, &pki)?;
    let sensor = start_lab_sensor(&mut lab.lab, &gw, &["--enforce"])?;
    let ca = pki.ca.display().to_string();

    // The server took the real hello: the call is answered.
    let (openai, answered) = decoy_call(&lab.lab, &ot1, &ca, AI_V4[0], "api.openai.com")?;
    ensure!(answered, "the call behind the decoy was not answered");
    // A conduit blocks cell-1 from anthropic: the decoy's harmless name must not
    // let the call through.
    let (anthropic, answered) = decoy_call(&lab.lab, &ot1, &ca, AI_V4[1], "api.anthropic.com")?;
    ensure!(!answered, "a blocked call went through behind a decoy");
    let records = sensor.stop(&mut lab.lab)?;

    check(
        last_record(&records, openai)?,
        "api.openai.com",
        "openai",
        "violation",
    )?;
    check(
        last_record(&records, anthropic)?,
        "api.anthropic.com",
        "anthropic",
        "blocked",
    )?;
    Ok(())
}
