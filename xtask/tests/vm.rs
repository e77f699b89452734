//! End-to-end: `cargo xtask vm` boots each kernel series and keeps its contract.
//! The first run downloads the kernels into target/vm (Debian's mirror); warm, each
//! test is one VM boot of a few seconds under TCG.

use std::process::{Command, Output};

fn xtask_vm(args: &[&str], cwd: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xtask"))
        .arg("vm")
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("xtask runs")
}

/// One boot checks everything, so each series costs a single VM.
const PROBE: &str = "uname -r; pwd; echo to-stderr >&2; \
    test -e /sys/kernel/btf/vmlinux && echo btf; \
    if touch /etc/conduit-vm-test 2>/dev/null; then echo host-writable; else echo host-read-only; fi; \
    echo x > /tmp/conduit-vm-test && test -s /tmp/conduit-vm-test && echo tmp-writable; \
    test -d /sys/fs/bpf && grep -q ' /sys/fs/bpf bpf ' /proc/mounts && echo bpffs; \
    exit 7";

fn check_series(series: &str) {
    let cwd = env!("CARGO_MANIFEST_DIR");
    let out = xtask_vm(&["--kernel", series, "--", "sh", "-c", PROBE], cwd);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        out.status.code(),
        Some(7),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert_eq!(lines.len(), 6, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(
        lines[0].starts_with(&format!("{series}.")),
        "uname -r {:?} is not of series {series}",
        lines[0]
    );
    assert_eq!(lines[1], cwd);
    assert_eq!(
        &lines[2..],
        ["btf", "host-read-only", "tmp-writable", "bpffs"]
    );
    assert!(
        stderr.lines().any(|l| l == "to-stderr"),
        "stderr:\n{stderr}"
    );
    assert!(!stdout.contains("xtask vm:"), "harness messages on stdout");
    assert!(stderr.contains("xtask vm:") && stderr.contains("booted in"));
    assert!(!std::path::Path::new("/etc/conduit-vm-test").exists());
}

#[test]
fn kernel_5_10() {
    check_series("5.10");
}

#[test]
fn kernel_6_1() {
    check_series("6.1");
}

#[test]
fn kernel_6_12() {
    check_series("6.12");
}

#[test]
fn usage_errors_are_not_command_statuses() {
    let out = xtask_vm(&["--kernel", "4.19", "--", "true"], "/");
    assert_eq!(out.status.code(), Some(2));
}

/// The systemd root is made with debootstrap on first use (minutes), so this one is
/// opt-in: `cargo test -p xtask --test vm -- --ignored`.
#[test]
#[ignore = "first run debootstraps a bookworm root (minutes)"]
fn systemd_mode() {
    let cwd = env!("CARGO_MANIFEST_DIR");
    let script = "cat /proc/1/comm; systemctl is-system-running --wait; pwd; \
        test -r /host/etc/os-release && echo host-visible; \
        if touch /host/etc/conduit-vm-test 2>/dev/null; then echo host-writable; else echo host-read-only; fi; \
        touch /etc/conduit-vm-test && echo root-writable; exit 5";
    let out = xtask_vm(
        &["--kernel", "6.1", "--systemd", "--", "sh", "-c", script],
        cwd,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(5),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let lines: Vec<&str> = stdout.lines().collect();
    let host_cwd = format!("/host{cwd}");
    assert_eq!(
        lines,
        [
            "systemd",
            "running",
            host_cwd.as_str(),
            "host-visible",
            "host-read-only",
            "root-writable"
        ],
        "stderr:\n{stderr}"
    );
}
