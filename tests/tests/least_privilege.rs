//! The sensor needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON, not root: run it as
//! `nobody` with exactly those capabilities (setpriv) and check that it attaches,
//! records flows with exact counts, and drains cleanly on SIGTERM.
//!
//! CAP_PERFMON is needed: without it the verifier applies its Spectre v1 hardening
//! for unprivileged loaders and rejects the parser's packet-pointer arithmetic
//! ("pointer arithmetic with it prohibited for !root"); the second test shows it.

use std::{os::unix::fs::PermissionsExt as _, time::Duration};

use anyhow::{Result, ensure};
use conduit_lab::{
    SensorRun, last_flow_records, peer_script, skip_unless_root,
    topology::{AI_V4, GW_OT1_IF, GatewayLab, GatewayLabOptions},
};

#[test]
fn sensor_runs_as_nobody_with_cap_bpf_net_admin_perfmon() -> Result<()> {
    if skip_unless_root("sensor_runs_as_nobody_with_cap_bpf_net_admin_perfmon") {
        return Ok(());
    }
    let mut lab = GatewayLab::build("caps", GatewayLabOptions { masquerade: true })?;
    let dir = lab.lab.workdir.join("nobody");
    std::fs::create_dir_all(&dir)?;
    nix::unistd::chown(
        &dir,
        Some(nix::unistd::Uid::from_raw(65534)),
        Some(nix::unistd::Gid::from_raw(65534)),
    )?;
    std::fs::set_permissions(&lab.lab.workdir, std::fs::Permissions::from_mode(0o755))?;

    let echo = peer_script("echo.py").display().to_string();
    let (net, ot1, gw) = (lab.net.clone(), lab.ot1.clone(), lab.gw.clone());
    lab.lab.spawn(
        &net,
        "udp-server",
        &["python3", &echo, "server", "udp", AI_V4[0], "5000"],
    )?;
    lab.lab
        .wait_for_port(&net, "udp", 5000, Duration::from_secs(10))?;

    let setpriv = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all,+bpf,+net_admin,+perfmon",
        "--ambient-caps=-all,+bpf,+net_admin,+perfmon",
        "--bounding-set=-all,+bpf,+net_admin,+perfmon",
        "--no-new-privs",
    ];
    let sensor = SensorRun::start_as(
        &mut lab.lab,
        &gw,
        "sensor",
        &setpriv,
        &dir,
        &["--iface", GW_OT1_IF],
    )?;
    let status = std::fs::read_to_string(format!(
        "/proc/{}/status",
        lab.lab.pid("sensor").map(|p| p.as_raw()).unwrap_or(0)
    ))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .unwrap_or("")
            .to_string()
    };
    ensure!(
        field("Uid:").starts_with("65534"),
        "not running as nobody: {}",
        field("Uid:")
    );
    // CAP_NET_ADMIN is bit 12, CAP_PERFMON 38, CAP_BPF 39: exactly those three.
    let eff = u64::from_str_radix(&field("CapEff:"), 16)?;
    ensure!(
        eff == (1 << 12) | (1 << 38) | (1 << 39),
        "effective capabilities {eff:#x}"
    );

    lab.lab.exec(
        &ot1,
        &[
            "python3", &echo, "client", "udp", AI_V4[0], "5000", "4", "50",
        ],
    )?;
    let records = sensor.stop(&mut lab.lab)?;
    let flows = last_flow_records(&records);
    let flow = flows
        .iter()
        .find(|((t, _, _, _, port), _)| t == "udp" && *port == 5000)
        .map(|(_, r)| r);
    let Some(flow) = flow else {
        anyhow::bail!("no UDP flow recorded: {records:#?}");
    };
    ensure!(
        flow["source"]["packets"] == 4 && flow["destination"]["packets"] == 4,
        "{flow:#}"
    );
    ensure!(flow["source"]["bytes"] == 4 * (20 + 8 + 50), "{flow:#}");
    Ok(())
}

#[test]
fn without_cap_perfmon_the_load_fails_with_a_clear_error() -> Result<()> {
    if skip_unless_root("without_cap_perfmon_the_load_fails_with_a_clear_error") {
        return Ok(());
    }
    let lab = GatewayLab::build("noperf", GatewayLabOptions::default())?;
    let dir = lab.lab.workdir.join("nobody");
    std::fs::create_dir_all(&dir)?;
    nix::unistd::chown(
        &dir,
        Some(nix::unistd::Uid::from_raw(65534)),
        Some(nix::unistd::Gid::from_raw(65534)),
    )?;
    let bin = conduit_lab::workspace_bin("conduit-sensor")
        .display()
        .to_string();
    let spool = dir.join("spool").display().to_string();
    let out = lab.lab.exec_any(
        &lab.gw,
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all,+bpf,+net_admin",
            "--ambient-caps=-all,+bpf,+net_admin",
            "--bounding-set=-all,+bpf,+net_admin",
            "--no-new-privs",
            &bin,
            "run",
            "--iface",
            GW_OT1_IF,
            "--spool",
            &spool,
        ],
    )?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success(),
        "the sensor loaded without CAP_PERFMON; update the docs and this test"
    );
    ensure!(
        stderr.contains("CAP_PERFMON"),
        "the error does not name the missing capability:\n{stderr}"
    );
    Ok(())
}
