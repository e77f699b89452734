//! Exact accounting under a burst: 120,000 one-datagram UDP flows from an OT host
//! through the lab gateway, the sensor on all three interfaces with `--record-all`
//! and its default capacities. Every flow the gateway received either has a
//! `flow_start` record or is counted in a `loss` record with unit `flow`:
//! recorded + lost == received, exactly; with the defaults nothing is lost. The
//! agent's peak RSS is printed and bounded by [`PEAK_RSS_BOUND_KIB`]. Past its
//! limits (a 64 KiB ring, a tracker bound of 100,000) the equation still holds
//! exactly, and the loss records say why.

use std::{collections::HashSet, time::Duration};

use anyhow::{Context as _, Result, ensure};
use conduit_lab::{
    SensorRun, nft_counters, skip_unless_root,
    topology::{GW_OT1_IF, GW_OT2_IF, GW_UPLINK_IF, GatewayLab, GatewayLabOptions, OT1_V4},
};

const FLOWS: u64 = 120_000;
/// Issue 9's goal: 64 MiB. Measured peaks are 50-52 MiB with mimalloc (36-37 MiB
/// with glibc's malloc; README, Limits): the tracker keeps 136-byte boxed entries in
/// a table of pointers.
const PEAK_RSS_BOUND_KIB: u64 = 64 * 1024;
const PORT: u16 = 9000;

/// Counts what reaches the gateway's zone interface after XDP (netdev ingress).
fn nft_rules() -> String {
    format!(
        r#"
table netdev burst {{
  counter flows {{}}
  chain in {{
    type filter hook ingress device "{GW_OT1_IF}" priority 0; policy accept;
    ip saddr {OT1_V4} udp dport {PORT}-{} counter name flows
  }}
}}
"#,
        PORT + 9
    )
}

/// What a burst left: flows the gateway received, recorded, lost
/// (loss records in unit `flow`, by reason), and the agent's peak RSS.
struct Outcome {
    received: u64,
    recorded: u64,
    lost: u64,
    lost_by_reason: std::collections::BTreeMap<String, u64>,
    peak_kib: u64,
}

#[test]
fn burst_of_120k_flows_is_recorded_or_counted_exactly() -> Result<()> {
    if skip_unless_root("burst_of_120k_flows_is_recorded_or_counted_exactly") {
        return Ok(());
    }
    let o = burst("burst", None)?;
    ensure!(
        o.lost == 0,
        "the defaults lost {} flows: {:?}",
        o.lost,
        o.lost_by_reason
    );
    ensure!(
        o.peak_kib <= PEAK_RSS_BOUND_KIB,
        "peak RSS {} KiB over {PEAK_RSS_BOUND_KIB} KiB",
        o.peak_kib
    );
    Ok(())
}

#[test]
fn past_its_limits_the_accounting_stays_exact() -> Result<()> {
    if skip_unless_root("past_its_limits_the_accounting_stays_exact") {
        return Ok(());
    }
    // A ring that holds about 400 announcements and a tracker bound below the burst.
    let o = burst(
        "overload",
        Some("capacity:\n  ring_buffer_bytes: 65536\n  tracked_flows: 100000\n"),
    )?;
    ensure!(
        o.recorded == o.received.min(100_000),
        "the tracker holds 100,000 flows; received {}, recorded {}",
        o.received,
        o.recorded
    );
    ensure!(
        o.lost_by_reason
            .keys()
            .all(|r| r == "tracker_full" || r == "new_flow_event_lost"),
        "unexpected loss reasons: {:?}",
        o.lost_by_reason
    );
    Ok(())
}

/// Sends the burst through a sensor with the defaults, or with `capacity` (YAML
/// for sensor.yaml) added; checks recorded + lost == received, and that every
/// datagram of the burst either reached the gateway or was dropped by the link.
fn burst(tag: &str, capacity: Option<&str>) -> Result<Outcome> {
    let mut lab = GatewayLab::build(tag, GatewayLabOptions::default())?;
    let rules = lab.lab.workdir.join("burst.nft");
    std::fs::write(&rules, nft_rules())?;
    let gw = lab.gw.clone();
    lab.lab
        .exec(&gw, &["nft", "-f", &rules.display().to_string()])?;
    let mut args: Vec<String> = [
        "--iface",
        GW_OT1_IF,
        "--iface",
        GW_OT2_IF,
        "--iface",
        GW_UPLINK_IF,
        "--record-all",
        "--idle-timeout",
        "300s",
    ]
    .map(String::from)
    .to_vec();
    if let Some(capacity) = capacity {
        let file = lab.lab.workdir.join("sensor.yaml");
        std::fs::write(&file, capacity)?;
        // A config file brings the default conduit map path; none here.
        args.extend(["--config".into(), file.display().to_string()]);
        args.extend([
            "--conduits".into(),
            conduit_lab::ai::lab_conduits().display().to_string(),
        ]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let sensor = SensorRun::start(&mut lab.lab, &gw, "sensor", &args)?;

    let dropped_before = tx_dropped(&lab)?;
    let started = std::time::Instant::now();
    let burst = lab.udp_burst(PORT, FLOWS, 1.5)?;
    let took = started.elapsed();
    let sent = burst.sent;
    ensure!(sent == FLOWS, "the sender sent {sent}");

    // Wait until the gateway has seen what it will see (the count stops moving),
    // so the drain's final sweep closes the accounting over all of it.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut received = 0;
    loop {
        let now = nft_counters(&lab.lab, &gw, "netdev", "burst")?["flows"].0;
        if now == FLOWS || (now == received && now > 0) {
            received = now;
            break;
        }
        received = now;
        ensure!(
            std::time::Instant::now() < deadline,
            "gateway counted only {received} datagrams"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    let label = sensor.label.clone();
    let records = sensor.stop(&mut lab.lab)?;
    let mut recorded = HashSet::new();
    let mut lost = 0u64;
    let mut losses = Vec::new();
    let mut lost_by_reason = std::collections::BTreeMap::new();
    for r in &records {
        match r["event"]["action"].as_str() {
            Some("flow_start")
                if r["source"]["ip"] == OT1_V4
                    && r["network"]["transport"] == "udp"
                    && r["destination"]["port"]
                        .as_u64()
                        .is_some_and(|p| (u64::from(PORT)..u64::from(PORT) + 10).contains(&p)) =>
            {
                let key = (
                    r["source"]["port"].as_u64(),
                    r["destination"]["port"].as_u64(),
                );
                ensure!(recorded.insert(key), "two flow_start for {key:?}");
            }
            Some("loss") => {
                let l = &r["conduit"]["loss"];
                losses.push(l.clone());
                if l["unit"] == "flow" {
                    let n = l["count"].as_u64().context("loss count")?;
                    lost += n;
                    *lost_by_reason
                        .entry(l["reason"].as_str().unwrap_or_default().to_string())
                        .or_insert(0) += n;
                }
            }
            _ => {}
        }
    }
    let log = std::fs::read_to_string(lab.lab.log_path(&label))?;
    // `peak_rss_kib=N` (possibly with ANSI styling around the `=`).
    let peak_kib: u64 = log
        .lines()
        .filter(|l| l.contains("sensor stopped"))
        .find_map(|l| l.split("peak_rss_kib").nth(1))
        .and_then(|v| {
            v.split(|c: char| !c.is_ascii_digit())
                .find(|d| !d.is_empty() && d.len() > 2)
                .and_then(|d| d.parse().ok())
        })
        .with_context(|| format!("no peak_rss_kib in the sensor log:\n{log}"))?;
    let recorded = recorded.len() as u64;
    // A datagram the sender's veth dropped (its peer's XDP ring full on a loaded
    // host) never reached the gateway's XDP: not the sensor's to count. The
    // sender resends those the device reports (ENOBUFS); whatever the link
    // dropped beyond them is the gateway's shortfall, measured, not assumed, so
    // a datagram lost anywhere else fails the test.
    let link_dropped = tx_dropped(&lab)? - dropped_before;
    let link_lost = link_dropped.saturating_sub(burst.resent);
    println!(
        "sent {sent} in {took:?}, gateway received {received}, the sender's link dropped {link_dropped} (resent {}), recorded {recorded}, lost {lost}, peak RSS {} KiB; loss records: {losses:?}",
        burst.resent, peak_kib
    );
    ensure!(
        recorded + lost == received,
        "recorded {recorded} + lost {lost} != received {received}; losses {losses:?}"
    );
    ensure!(
        received + link_lost == FLOWS && link_dropped >= burst.resent,
        "the gateway received {received} of {FLOWS}; the sender's link dropped \
         {link_dropped}, the sender resent {}",
        burst.resent
    );
    ensure!(
        received > FLOWS * 9 / 10,
        "the link lost {link_lost} of the burst: too few reached the gateway to test it"
    );
    conduit_lab::verify_chain(&lab.lab.workdir.join(format!("{label}-spool")))?;
    Ok(Outcome {
        received,
        recorded,
        lost,
        lost_by_reason,
        peak_kib,
    })
}

/// The OT host's veth drops (what its peer could not take), from sysfs.
fn tx_dropped(lab: &GatewayLab) -> Result<u64> {
    let out = lab.lab.exec(
        &lab.ot1,
        &["cat", "/sys/class/net/eth0/statistics/tx_dropped"],
    )?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}
