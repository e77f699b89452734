//! The lab's real peers work without the sensor: every client reaches the fake AI
//! endpoints over TLS (v4 and v6) and QUIC. If this fails, the classification tests
//! would fail for reasons that have nothing to do with the sensor.

use anyhow::{Result, ensure};
use conduit_lab::{
    ai::{Client, LabPki, call, start_endpoints},
    skip_unless_root,
    topology::{AI_V4, AI_V6, GatewayLab, GatewayLabOptions},
};

#[test]
fn real_clients_reach_the_fake_ai_endpoints() -> Result<()> {
    if skip_unless_root("real_clients_reach_the_fake_ai_endpoints") {
        return Ok(());
    }
    let mut lab = GatewayLab::build("peers", GatewayLabOptions { masquerade: true })?;
    let pki = LabPki::create(&lab.lab)?;
    let net = lab.net.clone();
    start_endpoints(&mut lab.lab, &net, &pki)?;
    for client in [
        Client::Curl,
        Client::OpensslSClient,
        Client::PythonSsl,
        Client::Chromium,
    ] {
        let out = call(&lab.lab, &lab.ot1, client, "api.openai.com", AI_V4[0], &pki)?;
        ensure!(out.contains("ok"), "{}: {out}", client.name());
    }
    let out = call(
        &lab.lab,
        &lab.ot1,
        Client::Curl,
        "api.anthropic.com",
        AI_V6,
        &pki,
    )?;
    ensure!(out.contains("ok"), "curl v6: {out}");
    let out = call(
        &lab.lab,
        &lab.ot2,
        Client::Aioquic,
        "api.openai.com",
        AI_V4[1],
        &pki,
    )?;
    ensure!(out.contains("ok"), "aioquic: {out}");
    Ok(())
}
