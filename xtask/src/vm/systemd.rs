//! The `--systemd` root: a bookworm system made once with debootstrap, kept as a
//! qcow2 base image under `target/vm/systemd`; each run boots a throwaway overlay.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, Result};

use super::{Cache, SYSTEMD_SUITE, fetch, note};

/// Packages in the root beyond debootstrap's minbase: what package and unit tests
/// need, and what the command runner uses.
pub const ROOT_PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "udev",
    "dbus",
    "kmod",
    "iproute2",
    "ca-certificates",
    "procps",
    "adduser",
];

/// Units masked (by the initramfs, on each boot): consoles nobody logs in on, and
/// maintenance that would only slow the boot or run during tests.
pub const MASKED: &[&str] = &[
    "getty@tty1.service",
    "serial-getty@ttyS0.service",
    "console-getty.service",
    "systemd-firstboot.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
    "e2scrub_reap.service",
];

/// The command runner, installed by the initramfs on each boot (so the cached image
/// never goes stale when the harness changes).
pub const RUNNER: &str = r#"#!/bin/sh
# Runs the `cargo xtask vm` job named on the kernel command line, then powers off.
job=
for arg in $(cat /proc/cmdline); do
  case "$arg" in conduit.job=*) job="${arg#conduit.job=}" ;; esac
done
[ -n "$job" ] || exit 0
port() {
  for p in /sys/class/virtio-ports/*; do
    if [ "$(cat "$p/name" 2>/dev/null)" = "$1" ]; then echo "/dev/${p##*/}"; return 0; fi
  done
  return 1
}
exec 3>"$(port conduit.status)"
echo "booted $(cut -d' ' -f1 /proc/uptime)" >&3
env -i /bin/sh "/host$job" </dev/null >"$(port conduit.stdout)" 2>"$(port conduit.stderr)"
echo "exit $?" >&3
exec 3>&-
systemctl poweroff --force --force
"#;

/// Its unit: after multi-user.target, and `Type=simple` so that the boot finishes
/// (`systemctl is-system-running --wait` says `running`) while COMMAND runs.
pub const UNIT: &str = "[Unit]\n\
Description=Run the cargo xtask vm command\n\
After=multi-user.target\n\
ConditionKernelCommandLine=conduit.job\n\
\n\
[Service]\n\
Type=simple\n\
ExecStart=/usr/local/sbin/conduit-job\n\
StandardOutput=journal+console\n\
\n\
[Install]\n\
WantedBy=multi-user.target\n";

/// The cached base image, built on first use.
pub fn root_image(cache: &Cache) -> Result<PathBuf> {
    let dir = cache.dir.join("systemd");
    let base = dir.join(format!("{SYSTEMD_SUITE}.qcow2"));
    if base.exists() {
        return Ok(base);
    }
    let _lock = cache.lock("systemd")?;
    if base.exists() {
        return Ok(base);
    }
    fs::create_dir_all(&dir)?;
    let started = Instant::now();
    let root = dir.join(format!("{SYSTEMD_SUITE}.root"));
    let _ = fs::remove_dir_all(&root);
    note(&format!(
        "first use of --systemd: debootstrap {SYSTEMD_SUITE} ({}) from {} into {} (a few minutes)",
        ROOT_PACKAGES.join(","),
        fetch::mirror(),
        root.display()
    ));
    let log = dir.join("debootstrap.log");
    let status = Command::new("debootstrap")
        .args(["--variant=minbase", "--keyring"])
        .arg("/usr/share/keyrings/debian-archive-keyring.gpg")
        .arg(format!("--include={}", ROOT_PACKAGES.join(",")))
        .arg(SYSTEMD_SUITE)
        .arg(&root)
        .arg(fetch::mirror())
        .stdin(std::process::Stdio::null())
        .stdout(fs::File::create(&log)?)
        .stderr(fs::File::options().append(true).open(&log)?)
        .status()
        .context("cannot start debootstrap")?;
    if !status.success() {
        let text = fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(20).collect();
        anyhow::bail!(
            "debootstrap failed ({status}); {}:\n{}",
            log.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    configure(&root)?;
    note("making the root image");
    let raw = dir.join(format!("{SYSTEMD_SUITE}.raw"));
    let _ = fs::remove_file(&raw);
    fetch::checked(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "conduit-root", "-O", "^orphan_file", "-d"])
            .arg(&root)
            .arg(&raw)
            .arg("4G"),
        "mkfs.ext4 -d",
    )?;
    let tmp = base.with_extension("qcow2.tmp");
    fetch::checked(
        Command::new("qemu-img")
            .args(["convert", "-O", "qcow2"])
            .arg(&raw)
            .arg(&tmp),
        "qemu-img convert",
    )?;
    fs::rename(&tmp, &base)?;
    let _ = fs::remove_file(&raw);
    let _ = fs::remove_dir_all(&root);
    note(&format!(
        "root image {} ready ({:.0} s)",
        base.display(),
        started.elapsed().as_secs_f64()
    ));
    Ok(base)
}

/// Settings in the fresh root.
fn configure(root: &Path) -> Result<()> {
    let write = |path: &str, text: &str| -> Result<()> {
        let path = root.join(path);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::write(&path, text).with_context(|| format!("write {}", path.display()))
    };
    write("etc/hostname", "conduit-vm\n")?;
    write(
        "etc/hosts",
        "127.0.0.1 localhost\n127.0.1.1 conduit-vm\n::1 localhost\n",
    )?;
    write(
        "etc/fstab",
        "# / and /host are mounted by the cargo xtask vm initramfs.\n",
    )?;
    // Empty: systemd makes a transient machine id on each boot.
    write("etc/machine-id", "")?;
    fs::create_dir_all(root.join("host"))?;
    // No network in the VM: the package lists and downloaded archives are dead weight.
    for dir in ["var/lib/apt/lists", "var/cache/apt/archives"] {
        if let Ok(entries) = fs::read_dir(root.join(dir)) {
            for entry in entries.flatten() {
                if entry.path().is_file() {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
    }
    Ok(())
}

/// A throwaway copy-on-write overlay of `base` for one run.
pub fn overlay(base: &Path, run_dir: &Path) -> Result<PathBuf> {
    let overlay = run_dir.join("root.qcow2");
    fetch::checked(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(base)
            .arg(&overlay),
        "qemu-img create",
    )?;
    Ok(overlay)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runner_reports_and_powers_off() {
        assert!(RUNNER.contains("echo \"exit $?\" >&3"));
        assert!(RUNNER.contains("\"/host$job\""));
        assert!(UNIT.contains("After=multi-user.target"));
        assert!(UNIT.contains("WantedBy=multi-user.target"));
    }
}
