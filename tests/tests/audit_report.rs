//! The auditor's report on a real lab run: a sensor on the gateway streams over
//! mTLS to a collector; a violation (cell-1 to OpenAI) and an authorized flow (MES
//! to Azure OpenAI) cross the gateway; the sensor stops for 20 s and comes back.
//! The report for the window before the stop is verified and complete (exit 0); the
//! window over the stop is incomplete, with the silence named (exit 3).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use conduit_lab::{
    SensorRun,
    ai::{Client, LabCollector, LabPki, call, lab_conduits, start_endpoints},
    skip_unless_root,
    topology::{AI_V4, GW_OT1_IF, GW_OT2_IF, GatewayLab, GatewayLabOptions, NET_V4},
    workspace_bin,
};
use serde_json::Value;

fn collector(args: &[&str]) -> Result<std::process::Output> {
    Command::new(workspace_bin("conduit-collector"))
        .args(args)
        .output()
        .context("running conduit-collector")
}

/// (seq, @timestamp) of every checkpoint of the sensor's chain in the store.
fn checkpoints(store: &Path, sensor: &str) -> Result<Vec<(u64, String)>> {
    let out = collector(&[
        "query",
        "--store",
        &store.display().to_string(),
        "--sensor",
        sensor,
        "--action",
        "checkpoint",
    ])?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| {
            Some((
                v["event"]["sequence"].as_u64()?,
                v["@timestamp"].as_str()?.to_owned(),
            ))
        })
        .collect())
}

fn head(records: &[Value]) -> Result<u64> {
    records
        .iter()
        .filter_map(|r| r["event"]["sequence"].as_u64())
        .max()
        .context("no records")
}

/// Waits until the collector's store holds `seq` of the sensor's chain.
fn wait_stored(store: &Path, sensor: &str, seq: u64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let stored = checkpoints(store, sensor)?.last().map_or(0, |c| c.0);
        if stored >= seq {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "the collector stored checkpoints up to {stored}, not {seq}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn summary(html: &str) -> Result<Value> {
    let tag = r#"<script type="application/json" id="summary">"#;
    let start = html.find(tag).context("no summary element")? + tag.len();
    let end = start
        + html[start..]
            .find("</script>")
            .context("unclosed summary")?;
    Ok(serde_json::from_str(&html[start..end])?)
}

/// Shifts an RFC 3339 millisecond timestamp by `ms`.
fn shift(t: &str, ms: i64) -> Result<String> {
    let fmt = time::format_description::well_known::Rfc3339;
    let t = time::OffsetDateTime::parse(t, &fmt)? + time::Duration::milliseconds(ms);
    Ok(t.format(&fmt)?)
}

#[test]
fn report_is_complete_before_a_sensor_stop_and_names_the_gap_over_it() -> Result<()> {
    if skip_unless_root("report_is_complete_before_a_sensor_stop_and_names_the_gap_over_it") {
        return Ok(());
    }
    let mut lab = GatewayLab::build("rep", GatewayLabOptions::default())?;
    let pki = LabPki::create(&lab.lab)?;
    let (gw, ot1, ot2, net) = (
        lab.gw.clone(),
        lab.ot1.clone(),
        lab.ot2.clone(),
        lab.net.clone(),
    );
    start_endpoints(&mut lab.lab, &net, &pki)?;
    let coll = LabCollector::start(&mut lab.lab, &net, NET_V4, &pki, "sensor-gw")?;
    let map = lab_conduits().display().to_string();
    let mut args: Vec<String> = [
        "--iface",
        GW_OT1_IF,
        "--iface",
        GW_OT2_IF,
        "--conduits",
        &map,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(coll.sensor_args());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();

    let sensor = SensorRun::start(&mut lab.lab, &gw, "sensor", &args)?;
    call(
        &lab.lab,
        &ot1,
        Client::Curl,
        "api.openai.com",
        AI_V4[0],
        &pki,
    )?;
    call(
        &lab.lab,
        &ot2,
        Client::Curl,
        "plant01.openai.azure.com",
        AI_V4[1],
        &pki,
    )?;
    // Let a heartbeat pass inside the run (every 10 s by default).
    std::thread::sleep(Duration::from_secs(12));
    let first_head = head(&sensor.stop(&mut lab.lab)?)?;
    std::thread::sleep(Duration::from_secs(20));
    let sensor = SensorRun::start(&mut lab.lab, &gw, "sensor", &args)?;
    std::thread::sleep(Duration::from_secs(3));
    let last_head = head(&sensor.stop(&mut lab.lab)?)?;
    ensure!(
        last_head > first_head,
        "the second run did not continue the chain"
    );
    // Both runs end on a checkpoint (the drain signs the head).
    wait_stored(&coll.store, "sensor-gw", last_head)?;

    let store = coll.store.display().to_string();
    let cps = checkpoints(&coll.store, "sensor-gw")?;
    let run1: Vec<&(u64, String)> = cps.iter().filter(|c| c.0 <= first_head).collect();
    let run2: Vec<&(u64, String)> = cps.iter().filter(|c| c.0 > first_head).collect();
    ensure!(run1.len() >= 2, "run 1 has checkpoints {run1:?}");
    // The first run's window: from its first signed checkpoint to its last.
    let (a0, a1) = (run1[0].1.clone(), run1[run1.len() - 1].1.clone());
    let b0 = run2.first().context("no checkpoint in run 2")?.1.clone();
    let html = lab.lab.workdir.join("before.html");
    let pdf = lab.lab.workdir.join("before.pdf");
    // The first run's window, inside its first and last signed checkpoints.
    let out = collector(&[
        "report",
        "--store",
        &store,
        "--since",
        // JSON times are in milliseconds: the checkpoint itself lies within a0's.
        &shift(&a0, 1)?,
        "--until",
        &a1,
        "--out",
        &html.display().to_string(),
        "--pdf",
        &pdf.display().to_string(),
    ])?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.code() == Some(0),
        "report before the stop: {:?}\n{text}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let s = summary(&std::fs::read_to_string(&html)?)?;
    ensure!(s["verified"] == true && s["complete"] == true, "{s}");
    ensure!(s["violations"] == 1, "violations: {s}");
    ensure!(s["blocked"] == 0 && s["loss"] == 0, "{s}");
    ensure!(s["sensors"][0]["id"] == "sensor-gw", "{s}");
    ensure!(
        s["violation_list"][0]["server_name"] == "api.openai.com",
        "{s}"
    );
    ensure!(std::fs::metadata(&pdf)?.len() > 10_000, "tiny PDF");
    let page = std::fs::read_to_string(&html)?;
    for want in [
        "C-MES-AZURE",
        "Work-instruction generation",
        "OT network team",
        "lab-plant",
        "azure-openai",
    ] {
        ensure!(page.contains(want), "the report does not show {want}");
    }

    // Over the stop: verified but incomplete, the 20 s silence named.
    let gap_html = lab.lab.workdir.join("over.html");
    let out = collector(&[
        "report",
        "--store",
        &store,
        "--since",
        &shift(&a1, -2000)?,
        "--until",
        &shift(&b0, 1000)?,
        "--out",
        &gap_html.display().to_string(),
    ])?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.code() == Some(3),
        "report over the stop: {:?}\n{text}",
        out.status
    );
    let s = summary(&std::fs::read_to_string(&gap_html)?)?;
    ensure!(s["verified"] == true && s["complete"] == false, "{s}");
    let gaps = s["sensors"][0]["gaps"].as_array().context("gaps")?;
    ensure!(
        gaps.iter().any(
            |g| g["reason"].as_str().unwrap_or("").starts_with("silence")
                && g["seconds"].as_f64().unwrap_or(0.0) >= 20.0
        ),
        "no 20 s silence named: {gaps:?}"
    );
    Ok(())
}
