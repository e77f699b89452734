//! Operating the sensor: the opt-in metrics endpoint serves Prometheus text with the
//! kernel counters and flow metrics, `/livez` and `/readyz`.

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use conduit_lab::{
    SensorRun, peer_script, skip_unless_root,
    topology::{AI_V4, GW_OT1_IF, GatewayLab, GatewayLabOptions},
};

#[test]
fn metrics_livez_and_readyz() -> Result<()> {
    if skip_unless_root("metrics_livez_and_readyz") {
        return Ok(());
    }
    let mut lab = GatewayLab::build("ops", GatewayLabOptions::default())?;
    let echo = peer_script("echo.py").display().to_string();
    let (net, ot1, gw) = (lab.net.clone(), lab.ot1.clone(), lab.gw.clone());
    lab.lab.spawn(
        &net,
        "udp-server",
        &["python3", &echo, "server", "udp", AI_V4[0], "5000"],
    )?;
    lab.lab
        .wait_for_port(&net, "udp", 5000, Duration::from_secs(10))?;
    let sensor = SensorRun::start(
        &mut lab.lab,
        &gw,
        "sensor",
        &["--iface", GW_OT1_IF, "--metrics", "127.0.0.1:9464"],
    )?;
    lab.lab.exec(
        &ot1,
        &[
            "python3", &echo, "client", "udp", AI_V4[0], "5000", "3", "10",
        ],
    )?;

    let get = |path: &str| -> Result<(String, String)> {
        let out = lab.lab.exec_any(
            &gw,
            &[
                "curl",
                "-s",
                "-w",
                "\n%{http_code}",
                &format!("http://127.0.0.1:9464{path}"),
            ],
        )?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or((&text, ""));
        Ok((code.to_string(), body.to_string()))
    };
    let value = |body: &str, name: &str| -> Option<u64> {
        body.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    };
    // The sweep publishes the kernel counters every 500 ms: wait for them.
    let deadline = Instant::now() + Duration::from_secs(15);
    let body = loop {
        let (code, body) = get("/metrics")?;
        ensure!(code == "200", "/metrics answered {code}");
        if value(
            &body,
            "conduit_sensor_kernel_total{reason=\"packets_counted\"}",
        )
        .is_some_and(|v| v >= 6)
            || Instant::now() > deadline
        {
            break body;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let value = |name: &str| value(&body, name);
    ensure!(
        value("conduit_sensor_kernel_total{reason=\"packets_counted\"}").is_some_and(|v| v >= 6),
        "{body}"
    );
    ensure!(
        value("conduit_sensor_flows_started_total").is_some_and(|v| v >= 1),
        "{body}"
    );
    ensure!(
        value("conduit_sensor_records_written_total").is_some_and(|v| v >= 3),
        "{body}"
    );
    ensure!(
        body.contains("# TYPE conduit_sensor_chain_sequence gauge"),
        "{body}"
    );
    // Labels, not one name per value; the build and the attached interface.
    ensure!(
        value("conduit_sensor_verdicts_total{verdict=\"violation\"}").is_some(),
        "{body}"
    );
    ensure!(
        body.contains(&format!(
            "conduit_sensor_interface_attached{{interface=\"{GW_OT1_IF}\",xdp_mode=\""
        )),
        "{body}"
    );
    ensure!(
        value("conduit_sensor_build_info{version=").is_some_and(|v| v == 1),
        "{body}"
    );
    ensure!(
        value("conduit_sensor_ready").is_some_and(|v| v == 1),
        "{body}"
    );
    ensure!(get("/livez")?.0 == "200", "/livez");
    ensure!(get("/readyz")?.0 == "200", "/readyz");
    ensure!(get("/nope")?.0 == "404", "unknown path");
    sensor.stop(&mut lab.lab)?;
    Ok(())
}
