//! Starting qemu, the KVM probe, and the host side of the virtio-serial ports.

use std::{
    fs,
    io::{BufRead as _, BufReader, Read as _},
    os::unix::{net::UnixListener, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::{Cache, EXIT_HARNESS, EXIT_TIMEOUT, fetch::Kernel, note};

/// How the guest's CPUs are run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }

    fn args(self) -> [&'static str; 4] {
        match self {
            Accel::Kvm => ["-accel", "kvm", "-cpu", "host"],
            Accel::Tcg => ["-accel", "tcg,thread=multi", "-cpu", "max"],
        }
    }
}

/// KVM if `/dev/kvm` really runs a guest, else TCG. The answer is cached per boot of
/// the host (`target/vm/kvm-probe`); `CONDUIT_VM_ACCEL=kvm|tcg` overrides it.
pub fn accel(cache: &Cache, kernel: &Kernel) -> Result<Accel> {
    match std::env::var("CONDUIT_VM_ACCEL").as_deref() {
        Ok("kvm") => return Ok(Accel::Kvm),
        Ok("tcg") => return Ok(Accel::Tcg),
        Ok(other) => bail!("CONDUIT_VM_ACCEL={other}: expected kvm or tcg"),
        Err(_) => {}
    }
    if !Path::new("/dev/kvm").exists() {
        return Ok(Accel::Tcg);
    }
    let boot_id = fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let record = cache.dir.join("kvm-probe");
    if let Ok(text) = fs::read_to_string(&record)
        && let Some(accel) = parse_probe_record(&text, &boot_id)
    {
        return Ok(accel);
    }
    let started = Instant::now();
    let works = probe(Accel::Kvm, kernel, &cache.dir)?;
    let accel = if works { Accel::Kvm } else { Accel::Tcg };
    note(&format!(
        "KVM probe: {} ({:.1} s; cached for this boot of the host)",
        if works {
            "a guest runs, using KVM"
        } else {
            "a guest does not run under KVM, using TCG"
        },
        started.elapsed().as_secs_f64()
    ));
    fs::write(&record, format!("{boot_id} {}\n", accel.name()))?;
    Ok(accel)
}

fn parse_probe_record(text: &str, boot_id: &str) -> Option<Accel> {
    let (id, accel) = text.trim().split_once(' ')?;
    if id != boot_id || boot_id.is_empty() {
        return None;
    }
    match accel {
        "kvm" => Some(Accel::Kvm),
        "tcg" => Some(Accel::Tcg),
        _ => None,
    }
}

/// Whether a guest runs with `accel`: `kernel` with a probe initramfs must reach
/// userspace, print a marker on the serial console and power off within 20 s.
/// (Here KVM_CREATE_VM works and real-mode code runs, but without nested
/// virtualisation the kernel hangs or qemu aborts, so nothing less than a kernel
/// boot tells.)
fn probe(accel: Accel, kernel: &Kernel, dir: &Path) -> Result<bool> {
    let initrd = dir.join("probe.cpio");
    let console = dir.join("probe.log");
    fs::write(&initrd, super::initramfs::probe()?)?;
    let _ = fs::remove_file(&console);
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ])
    .args(["-machine", "pc", "-m", "256"])
    .args(accel.args())
    .arg("-kernel")
    .arg(kernel.image())
    .arg("-initrd")
    .arg(&initrd)
    .args(["-append", "console=ttyS0 quiet panic=-1"])
    .arg("-serial")
    .arg(format!("file:{}", console.display()))
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    die_with_parent(&mut cmd);
    let mut child = cmd.spawn().context("cannot start qemu-system-x86_64")?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let log = fs::read_to_string(&console).unwrap_or_default();
    let _ = fs::remove_file(&console);
    let _ = fs::remove_file(&initrd);
    Ok(log.contains(super::initramfs::PROBE_MARKER))
}

/// Kill the child when this process dies (Ctrl-C, kill), so no VM outlives it.
fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
}

pub struct Boot<'a> {
    pub kernel: &'a Kernel,
    pub initrd: &'a Path,
    pub job: &'a Path,
    pub run_dir: &'a Path,
    pub accel: Accel,
    pub memory: u32,
    pub cpus: u32,
    pub timeout: Duration,
    pub disk: Option<&'a Path>,
    pub systemd: bool,
    pub prepared: Duration,
}

/// A line the guest writes on the status port.
#[derive(Debug, PartialEq)]
pub enum Status {
    /// COMMAND is about to start; the guest's uptime in seconds.
    Booted(f64),
    /// COMMAND's exit status.
    Exit(u8),
    /// The guest could not run COMMAND.
    Error(String),
}

pub fn parse_status(line: &str) -> Option<Status> {
    let line = line.trim();
    let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
    match word {
        "booted" => rest.parse().ok().map(Status::Booted),
        "exit" => rest.parse::<u8>().ok().map(Status::Exit),
        "error" => Some(Status::Error(rest.to_owned())),
        _ => None,
    }
}

/// The kernel command line.
fn cmdline(boot: &Boot<'_>) -> String {
    let mut line = format!(
        "console=ttyS0 quiet loglevel=4 panic=-1 conduit.job={} conduit.kdir={}",
        boot.job.display(),
        boot.kernel.dir.display()
    );
    if boot.systemd {
        line.push_str(" systemd.show_status=false");
    }
    // For debugging the guest, e.g. CONDUIT_VM_APPEND="loglevel=7".
    if let Ok(extra) = std::env::var("CONDUIT_VM_APPEND") {
        line.push(' ');
        line.push_str(&extra);
    }
    line
}

/// Boots the VM, forwards COMMAND's output and returns its exit status.
pub fn boot(boot: &Boot<'_>) -> Result<u8> {
    for path in [boot.job, &boot.kernel.dir] {
        if path.to_string_lossy().contains(char::is_whitespace) {
            bail!(
                "{} contains white space, which the kernel command line cannot carry",
                path.display()
            );
        }
    }
    let sock = |name: &str| boot.run_dir.join(format!("{name}.sock"));
    let listeners = ["stdout", "stderr", "status"]
        .map(|name| UnixListener::bind(sock(name)).with_context(|| format!("bind {name}.sock")));
    let [out_l, err_l, status_l] = listeners;
    let (out_l, err_l, status_l) = (out_l?, err_l?, status_l?);

    let console = boot.run_dir.join("console.log");
    let qemu_log = boot.run_dir.join("qemu.log");
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ])
    .args(["-machine", "pc"])
    .args(boot.accel.args())
    .args([
        "-m",
        &boot.memory.to_string(),
        "-smp",
        &boot.cpus.to_string(),
    ])
    .arg("-kernel")
    .arg(boot.kernel.image())
    .arg("-initrd")
    .arg(boot.initrd)
    .args(["-append", &cmdline(boot)])
    .arg("-serial")
    .arg(format!("file:{}", console.display()))
    .args(["-device", "virtio-serial-pci,id=vs"]);
    for name in ["stdout", "stderr", "status"] {
        cmd.arg("-chardev")
            .arg(format!("socket,id={name},path={}", sock(name).display()))
            .arg("-device")
            .arg(format!(
                "virtserialport,bus=vs.0,chardev={name},name=conduit.{name}"
            ));
    }
    cmd.args([
        "-virtfs",
        "local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap",
    ]);
    if let Some(disk) = boot.disk {
        cmd.arg("-drive").arg(format!(
            "file={},if=virtio,format=qcow2,cache=unsafe,discard=unmap",
            disk.display()
        ));
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&qemu_log)?);
    die_with_parent(&mut cmd);
    let started = Instant::now();
    let mut child = cmd.spawn().context("cannot start qemu-system-x86_64")?;

    let out_t = forward(out_l, std::io::stdout);
    let err_t = forward(err_l, std::io::stderr);
    let (tx, rx) = mpsc::channel();
    let status_t = thread::spawn(move || {
        let Ok((stream, _)) = status_l.accept() else {
            return;
        };
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if let Some(status) = parse_status(&line)
                && tx.send(status).is_err()
            {
                break;
            }
        }
    });

    let mut result: Option<Status> = None;
    let mut timed_out = false;
    loop {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(Status::Booted(uptime)) => note(&format!(
                "kernel {} ({}) booted in {:.1} s ({}, guest uptime {uptime:.1} s; preparation {:.1} s)",
                boot.kernel.series,
                boot.kernel.release,
                started.elapsed().as_secs_f64(),
                boot.accel.name(),
                boot.prepared.as_secs_f64()
            )),
            Ok(status) => result = Some(status),
            Err(_) => {}
        }
        if child.try_wait()?.is_some() {
            break;
        }
        if started.elapsed() > boot.timeout {
            timed_out = true;
            let _ = child.kill();
            break;
        }
    }
    let qemu_status = child.wait()?;
    // Unblock any accept that qemu never connected to (qemu failed early).
    for name in ["stdout", "stderr", "status"] {
        let _ = std::os::unix::net::UnixStream::connect(sock(name));
    }
    let _ = out_t.join();
    let _ = err_t.join();
    let _ = status_t.join();
    while let Ok(status) = rx.try_recv() {
        if !matches!(status, Status::Booted(_)) {
            result = Some(status);
        }
    }
    let total = started.elapsed().as_secs_f64();
    if timed_out {
        note(&format!(
            "timed out after {} s; killed the VM (exit status {EXIT_TIMEOUT})",
            boot.timeout.as_secs()
        ));
        show_log("kernel console (last lines)", &console);
        return Ok(EXIT_TIMEOUT);
    }
    match result {
        Some(Status::Exit(code)) => {
            note(&format!("done in {total:.1} s, exit status {code}"));
            Ok(code)
        }
        Some(Status::Error(msg)) => {
            show_log("kernel console (last lines)", &console);
            bail!("the guest could not run the command: {msg}")
        }
        _ => {
            show_log("qemu", &qemu_log);
            show_log("kernel console (last lines)", &console);
            note(&format!(
                "the VM ended ({qemu_status}) without reporting an exit status"
            ));
            Ok(EXIT_HARNESS)
        }
    }
}

/// Copies what qemu sends on one port to `sink` until qemu closes it.
fn forward<W: std::io::Write + 'static>(
    listener: UnixListener,
    sink: fn() -> W,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let Ok((mut stream, _)) = listener.accept() else {
            return;
        };
        let mut buf = [0_u8; 65536];
        let mut out = sink();
        loop {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if out.write_all(&buf[..n]).and_then(|()| out.flush()).is_err() {
                        break;
                    }
                }
            }
        }
    })
}

fn show_log(what: &str, path: &PathBuf) {
    let Ok(text) = fs::read_to_string(path) else {
        return;
    };
    let lines: Vec<&str> = text.lines().collect();
    if lines.is_empty() {
        return;
    }
    note(&format!("{what}, {}:", path.display()));
    for line in &lines[lines.len().saturating_sub(40)..] {
        eprintln!("    {line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(parse_status("booted 1.23\n"), Some(Status::Booted(1.23)));
        assert_eq!(parse_status("exit 7"), Some(Status::Exit(7)));
        assert_eq!(parse_status("exit 255"), Some(Status::Exit(255)));
        assert_eq!(parse_status("exit 256"), None);
        assert_eq!(
            parse_status("error no stdout port"),
            Some(Status::Error("no stdout port".into()))
        );
        assert_eq!(parse_status("noise"), None);
    }

    #[test]
    fn probe_record_is_per_boot() {
        assert_eq!(parse_probe_record("abc tcg\n", "abc"), Some(Accel::Tcg));
        assert_eq!(parse_probe_record("abc kvm", "abc"), Some(Accel::Kvm));
        assert_eq!(parse_probe_record("abc kvm", "def"), None);
        assert_eq!(parse_probe_record("", ""), None);
    }
}
