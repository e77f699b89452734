//! After kill -9 the restarted sensor closes, in the chain, every flow the spool
//! shows started and never ended: a `flow_end` with reason lack of resources and
//! the last counts stored. Flow ids continue after the highest stored one.

use std::{collections::BTreeMap, time::Duration};

use anyhow::{Result, ensure};
use conduit_lab::{
    SensorRun, read_jsonl, skip_unless_root,
    topology::{GW_OT1_IF, GatewayLab, GatewayLabOptions},
};

const FLOWS: u64 = 50;

fn flow_ids(records: &[serde_json::Value], action: &str) -> BTreeMap<u64, serde_json::Value> {
    records
        .iter()
        .filter(|r| r["event"]["action"] == action)
        .filter_map(|r| Some((r["conduit"]["flow_id"].as_u64()?, r.clone())))
        .collect()
}

#[test]
fn restart_after_kill_9_closes_every_open_flow() -> Result<()> {
    if skip_unless_root("restart_after_kill_9_closes_every_open_flow") {
        return Ok(());
    }
    let mut lab = GatewayLab::build("crash", GatewayLabOptions::default())?;
    let gw = lab.gw.clone();
    let args = [
        "--iface",
        GW_OT1_IF,
        "--record-all",
        "--idle-timeout",
        "300s",
    ];
    let sensor = SensorRun::start(&mut lab.lab, &gw, "sensor", &args)?;
    ensure!(lab.udp_burst(6000, FLOWS, 0.1)?.sent == FLOWS);
    // Wait until every flow has its flow_start, then crash the sensor.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let starts = flow_ids(&read_jsonl(&sensor.jsonl).unwrap_or_default(), "flow_start");
        if starts.len() as u64 >= FLOWS {
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "only {} flow_start records",
            starts.len()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    lab.lab.stop(
        "sensor",
        nix::sys::signal::Signal::SIGKILL,
        Duration::from_secs(10),
    )?;
    let crashed = read_jsonl(&sensor.jsonl)?;
    let open: Vec<u64> = {
        let (starts, ends) = (
            flow_ids(&crashed, "flow_start"),
            flow_ids(&crashed, "flow_end"),
        );
        starts
            .keys()
            .filter(|id| !ends.contains_key(id))
            .copied()
            .collect()
    };
    ensure!(!open.is_empty(), "the crash left no flow open");
    let max_before = flow_ids(&crashed, "flow_start")
        .keys()
        .max()
        .copied()
        .unwrap_or(0);

    // Restart on the same spool; the crash's open flows are closed at once.
    let again = SensorRun::start(&mut lab.lab, &gw, "sensor", &args)?;
    let spool = again.spool.clone();
    let records = again.stop(&mut lab.lab)?;
    let ends = flow_ids(&records, "flow_end");
    for id in &open {
        let end = ends.get(id);
        ensure!(
            end.is_some_and(|e| e["event"]["reason"] == "lack of resources"
                && e["source"]["packets"].as_u64() == Some(1)),
            "flow {id} was not closed after the crash: {end:?}"
        );
    }
    // No new flow reuses an id of the crashed run.
    let new_starts: Vec<u64> = records
        .iter()
        .skip(crashed.len())
        .filter(|r| r["event"]["action"] == "flow_start")
        .filter_map(|r| r["conduit"]["flow_id"].as_u64())
        .collect();
    ensure!(
        new_starts.iter().all(|id| *id > max_before),
        "flow ids reused: {new_starts:?} after {max_before}"
    );
    println!(
        "{} flows left open by kill -9, all closed on restart",
        open.len()
    );
    conduit_lab::verify_chain(&spool)?;
    Ok(())
}
