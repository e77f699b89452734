//! The kernel matrix: the kernel tests inside the VMs of `cargo xtask vm`, one VM
//! per Debian kernel, with the test binaries built on the host (the VM sees the
//! host's files).

use std::{path::PathBuf, time::Instant};

use anyhow::{Context as _, Result, bail};

use crate::{cargo, step};

/// The kernels of the matrix (`cargo xtask vm --kernel`).
pub const KERNELS: [&str; 3] = ["5.10", "6.1", "6.12"];

/// What `cargo xtask test` runs in each VM: `probe`, the replay of a capture with a
/// split ClientHello and a QUIC Initial, and the SIGKILL fail-open check.
const SMOKE_TESTS: &[&str] = &["kernel_replay", "kernel_failopen"];

/// The end-to-end test `--kernels` runs in each VM: a gateway namespace between OT hosts and
/// AI endpoints, the sensor on the gateway, curl, openssl s_client and Python ssl (TLS)
/// and aioquic (QUIC) as clients. It is `#[ignore]`d on the host, which runs the same
/// test with Chromium besides (`tls_and_quic_clients_are_classified`); headless
/// Chromium under TCG takes minutes and adds no kernel coverage.
const E2E_TEST: (&str, &str) = ("classify", "kernel_matrix_clients_are_classified");

/// The lab's deadlines are multiplied by this in the VMs (`CONDUIT_TEST_TIMEOUT_SCALE`,
/// read by `conduit_lab::scaled`): under TCG the guest runs 5 to 20 times slower than
/// the host. A caller's own `CONDUIT_TEST_TIMEOUT_SCALE` wins.
const VM_TIMEOUT_SCALE: &str = "10";

/// What `cargo xtask test --kernels` runs in each VM besides: the rest of the
/// BPF_PROG_TEST_RUN suite.
const FULL_TESTS: &[&str] = &[
    "kernel_classify",
    "kernel_parse",
    "kernel_agree",
    "kernel_attach",
    "kernel_traffic",
    "kernel_sweep",
];

/// The kernels `--kernel` selects (all of [`KERNELS`] when none is given); an
/// unknown series is an error that names the known ones.
pub fn select_kernels(wanted: &[String]) -> Result<Vec<&'static str>> {
    if wanted.is_empty() {
        return Ok(KERNELS.to_vec());
    }
    let mut chosen = Vec::new();
    for w in wanted {
        let Some(k) = KERNELS.iter().find(|k| **k == w.as_str()) else {
            bail!("--kernel {w}: the matrix has {}", KERNELS.join(", "));
        };
        if !chosen.contains(k) {
            chosen.push(*k);
        }
    }
    Ok(chosen)
}

/// Runs the matrix on `kernels`: the smoke tests, or with `full` the whole kernel
/// suite and the end-to-end test.
pub fn run_matrix(full: bool, kernels: &[&str]) -> Result<()> {
    let names: Vec<&str> = SMOKE_TESTS
        .iter()
        .chain(if full { FULL_TESTS } else { &[] })
        .copied()
        .collect();
    step(&format!(
        "Kernel matrix ({}): {} in VMs with {}",
        if full { "full" } else { "smoke" },
        names.join(", "),
        kernels.join(", ")
    ));
    let binaries = build_tests("sensor-user", &names)?;
    let (e2e, e2e_filter) = E2E_TEST;
    let e2e_exe = if full {
        build_tests("conduit-tests", &[e2e])?
    } else {
        Vec::new()
    };
    let sensor = crate::workspace_root().join("target/debug/conduit-sensor");
    // In this process, not through the xtask binary: an earlier step may have
    // rebuilt (replaced) it.
    std::env::set_current_dir(crate::workspace_root()).context("the workspace root")?;
    let mut times = Vec::new();
    for &kernel in kernels {
        let started = Instant::now();
        let vm = |args: &[&std::ffi::OsStr]| -> Result<()> {
            let shown: Vec<String> = args
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect();
            println!(
                "    $ cargo xtask vm --kernel {kernel} -- {}",
                shown.join(" ")
            );
            let command = args.iter().map(|a| a.to_os_string()).collect();
            let mut vm_args = crate::vm::VmArgs::new(kernel, command)?;
            if std::env::var_os("CONDUIT_TEST_TIMEOUT_SCALE").is_none() {
                vm_args
                    .env
                    .push(format!("CONDUIT_TEST_TIMEOUT_SCALE={VM_TIMEOUT_SCALE}"));
            }
            match crate::vm::run(vm_args)? {
                0 => Ok(()),
                code => bail!(
                    "`{}` in the {kernel} VM exited with {code}",
                    shown.join(" ")
                ),
            }
        };
        vm(&[
            sensor.as_os_str(),
            "probe".as_ref(),
            "--iface".as_ref(),
            "lo".as_ref(),
        ])?;
        for (name, exe) in &binaries {
            step(&format!("{name} on {kernel}"));
            vm(&[exe.as_os_str(), "--test-threads=1".as_ref()])?;
        }
        for (name, exe) in &e2e_exe {
            step(&format!("{name} ({e2e_filter}) on {kernel}"));
            vm(&[
                exe.as_os_str(),
                "--test-threads=1".as_ref(),
                "--ignored".as_ref(),
                "--exact".as_ref(),
                e2e_filter.as_ref(),
            ])?;
        }
        let secs = started.elapsed().as_secs_f64();
        println!("    kernel {kernel}: {secs:.0} s");
        times.push(format!("{kernel} {secs:.0} s"));
    }
    println!(
        "    kernel matrix ({}): {}",
        if full { "full" } else { "smoke" },
        times.join(", ")
    );
    Ok(())
}

/// Builds the named test binaries of `package` (debug, with the binaries they run:
/// they find conduit-sensor next to themselves); returns (name, executable).
fn build_tests(package: &str, names: &[&str]) -> Result<Vec<(String, PathBuf)>> {
    let mut cmd = cargo();
    cmd.args(["test", "-p", package, "--no-run", "--message-format=json"]);
    for n in names {
        cmd.args(["--test", n]);
    }
    println!(
        "    $ cargo test -p {package} --no-run --test {}",
        names.join(" --test ")
    );
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
