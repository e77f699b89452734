//! The kernel matrix: the kernel tests inside the VMs of `cargo xtask vm`, one VM
//! per Debian kernel, with the test binaries built on the host (the VM sees the
//! host's files).

use std::{path::PathBuf, process::Command, time::Instant};

use anyhow::{Context as _, Result, bail};

use crate::{cargo, run, step};

/// The kernels of the matrix (`cargo xtask vm --kernel`).
pub const KERNELS: [&str; 3] = ["5.10", "6.1", "6.12"];

/// What `cargo xtask test` runs in each VM: `probe`, the replay of a capture with a
/// split ClientHello and a QUIC Initial, and the SIGKILL fail-open check.
const SMOKE_TESTS: &[&str] = &["kernel_replay", "kernel_failopen"];

/// What `cargo xtask test --kernels` runs in each VM besides: the rest of the
/// BPF_PROG_TEST_RUN suite.
const FULL_TESTS: &[&str] = &[
    "kernel_classify",
    "kernel_parse",
    "kernel_agree",
    "kernel_attach",
    "kernel_traffic",
];

/// Runs the matrix: the smoke tests, or with `full` the whole kernel suite.
pub fn run_matrix(full: bool) -> Result<()> {
    let names: Vec<&str> = SMOKE_TESTS
        .iter()
        .chain(if full { FULL_TESTS } else { &[] })
        .copied()
        .collect();
    step(&format!(
        "Kernel matrix ({}): {} in VMs with {}",
        if full { "full" } else { "smoke" },
        names.join(", "),
        KERNELS.join(", ")
    ));
    let binaries = build_tests(&names)?;
    let sensor = crate::workspace_root().join("target/debug/conduit-sensor");
    let xtask = std::env::current_exe().context("the xtask binary's path")?;
    for kernel in KERNELS {
        let started = Instant::now();
        let vm = |args: &[&std::ffi::OsStr]| {
            let mut cmd = Command::new(&xtask);
            cmd.current_dir(crate::workspace_root())
                .args(["vm", "--kernel", kernel, "--"])
                .args(args);
            cmd
        };
        run(&mut vm(&[
            sensor.as_os_str(),
            "probe".as_ref(),
            "--iface".as_ref(),
            "lo".as_ref(),
        ]))?;
        for (name, exe) in &binaries {
            step(&format!("{name} on {kernel}"));
            run(&mut vm(&[exe.as_os_str(), "--test-threads=1".as_ref()]))?;
        }
        println!(
            "    kernel {kernel}: {:.0} s",
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// Builds the named sensor-user test binaries (and the conduit-sensor binary they
/// run); returns (name, executable).
fn build_tests(names: &[&str]) -> Result<Vec<(String, PathBuf)>> {
    let mut cmd = cargo();
    cmd.args([
        "test",
        "-p",
        "sensor-user",
        "--no-run",
        "--message-format=json",
    ]);
    for n in names {
        cmd.args(["--test", n]);
    }
    println!("    $ cargo test -p sensor-user --no-run --test ...");
    let out = cmd.output().context("cargo test --no-run")?;
    if !out.status.success() {
        bail!(
            "building the kernel tests failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(name), Some(exe)) = (msg["target"]["name"].as_str(), msg["executable"].as_str())
        else {
            continue;
        };
        if msg["profile"]["test"] == true && names.contains(&name) {
            found.push((name.to_owned(), PathBuf::from(exe)));
        }
    }
    for n in names {
        if !found.iter().any(|(f, _)| f == n) {
            bail!("cargo built no test binary {n}");
        }
    }
    Ok(found)
}
