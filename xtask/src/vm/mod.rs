//! `cargo xtask vm --kernel SERIES [--systemd] -- COMMAND [ARGS...]`: run a command in
//! a qemu VM with one of Debian's kernels (see `docs/vm.md`).
//!
//! Plain mode: an initramfs (busybox) loads the virtio and 9p modules, mounts the
//! host's root read-only over 9p, puts tmpfs on `/tmp` and `/run`, fresh `/proc`,
//! `/sys`, `/dev`, bpffs, debugfs, tracefs and cgroup2 in it, and runs COMMAND
//! chrooted there. `--systemd`: the initramfs mounts a throwaway overlay of a cached
//! bookworm root made with debootstrap, the host's root read-only at `/host`, and
//! hands over to systemd; a oneshot unit runs COMMAND once the system is up.
//!
//! Either way COMMAND's stdout, stderr and exit status travel over three
//! virtio-serial ports to Unix sockets this process reads; the kernel console goes
//! to a log file that is shown only when the VM fails.

pub(crate) mod fetch;
mod initramfs;
mod qemu;
mod systemd;

use std::{
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

/// Debian packages the VM harness uses; installed on first use when missing.
pub const DEBIAN_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "qemu-utils",
    "busybox-static",
    "debootstrap",
    "e2fsprogs",
    "debian-archive-keyring",
    "kmod",
    "xz-utils",
    "zstd",
];

/// Exit status when the harness itself fails (like `docker run`).
pub const EXIT_HARNESS: u8 = 125;
/// Exit status when the VM was killed for exceeding `--timeout` (like `timeout(1)`).
pub const EXIT_TIMEOUT: u8 = 124;

#[derive(clap::Args, Debug)]
#[command(trailing_var_arg = true)]
pub struct VmArgs {
    /// Kernel series: 5.10 (bullseye), 6.1 (bookworm) or 6.12 (trixie).
    #[arg(long, value_parser = parse_series)]
    pub kernel: &'static Series,
    /// Boot a writable bookworm root with systemd as PID 1; the host's file system is
    /// read-only under /host.
    #[arg(long)]
    pub systemd: bool,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = DEFAULT_MEMORY_MIB)]
    pub memory: u32,
    /// Guest CPUs.
    #[arg(long, default_value_t = DEFAULT_CPUS)]
    pub cpus: u32,
    /// Kill the VM after this many seconds (exit status 124).
    #[arg(long, default_value_t = DEFAULT_TIMEOUT_SECS)]
    pub timeout: u64,
    /// Extra environment for COMMAND, NAME=VALUE or NAME (taken from the caller).
    #[arg(long = "env", value_name = "NAME[=VALUE]")]
    pub env: Vec<String>,
    /// The command and its arguments (after `--`).
    #[arg(required = true, allow_hyphen_values = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

const DEFAULT_MEMORY_MIB: u32 = 2048;
const DEFAULT_CPUS: u32 = 2;
const DEFAULT_TIMEOUT_SECS: u64 = 1200;

impl VmArgs {
    /// COMMAND in a VM with `kernel` (a series name), with the defaults of the flags.
    pub fn new(kernel: &str, command: Vec<OsString>) -> Result<VmArgs> {
        Ok(VmArgs {
            kernel: parse_series(kernel).map_err(anyhow::Error::msg)?,
            systemd: false,
            memory: DEFAULT_MEMORY_MIB,
            cpus: DEFAULT_CPUS,
            timeout: DEFAULT_TIMEOUT_SECS,
            env: Vec::new(),
            command,
        })
    }
}

/// A kernel series and the Debian suite whose `linux-image-amd64` provides it.
#[derive(Debug, PartialEq, Eq)]
pub struct Series {
    pub name: &'static str,
    pub suite: &'static str,
}

pub const SERIES: &[Series] = &[
    Series {
        name: "5.10",
        suite: "bullseye",
    },
    Series {
        name: "6.1",
        suite: "bookworm",
    },
    Series {
        name: "6.12",
        suite: "trixie",
    },
];

/// The suite of the `--systemd` root.
pub const SYSTEMD_SUITE: &str = "bookworm";

fn parse_series(s: &str) -> Result<&'static Series, String> {
    SERIES
        .iter()
        .find(|series| series.name == s)
        .ok_or_else(|| {
            let known: Vec<&str> = SERIES.iter().map(|s| s.name).collect();
            format!("unknown kernel series {s:?}; known: {}", known.join(", "))
        })
}

/// Entry point of the subcommand: COMMAND's exit status, 124 on timeout, 125 when
/// the harness fails.
pub fn main(args: VmArgs) -> ExitCode {
    match run(args) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("xtask vm: error: {err:#}");
            ExitCode::from(EXIT_HARNESS)
        }
    }
}

/// Prints a harness message on stderr, never on COMMAND's stdout.
fn note(msg: &str) {
    eprintln!("xtask vm: {msg}");
}

/// Runs COMMAND in a VM and returns its exit status.
pub fn run(args: VmArgs) -> Result<u8> {
    let started = Instant::now();
    ensure_packages()?;
    let cache = Cache::new()?;
    let kernel = fetch::kernel(&cache, args.kernel)?;
    let root = if args.systemd {
        Some(systemd::root_image(&cache)?)
    } else {
        None
    };
    let accel = qemu::accel(&cache, &kernel)?;
    let cwd = std::env::current_dir().context("current directory")?;
    let run_dir = cache.new_run_dir()?;
    let mut env = job_env(&args.env, args.systemd);
    if !args.systemd {
        // The host's kmod, with the guest kernel's modules: `modprobe veth` works.
        env.push((
            "MODPROBE_OPTIONS".into(),
            format!("-d {}", kernel.dir.display()),
        ));
    }
    let job = initramfs::job_script(&cwd, &env, &args.command, args.systemd);
    let job_path = run_dir.path.join("job.sh");
    fs::write(&job_path, job)?;
    let mode = if args.systemd {
        initramfs::Mode::Systemd
    } else {
        initramfs::Mode::Plain
    };
    let initrd = run_dir.path.join("initramfs.cpio");
    initramfs::build(&kernel, mode, &initrd)?;
    let prepared = started.elapsed();
    let overlay = match &root {
        Some(base) => Some(systemd::overlay(base, &run_dir.path)?),
        None => None,
    };
    let outcome = qemu::boot(&qemu::Boot {
        kernel: &kernel,
        initrd: &initrd,
        job: &job_path,
        run_dir: &run_dir.path,
        accel,
        memory: args.memory,
        cpus: args.cpus,
        timeout: std::time::Duration::from_secs(args.timeout),
        disk: overlay.as_deref(),
        systemd: args.systemd,
        prepared,
    })?;
    Ok(outcome)
}

/// Installs whichever of [`DEBIAN_PACKAGES`] is missing.
fn ensure_packages() -> Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|pkg| !package_installed(pkg))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    note(&format!("installing {}", missing.join(" ")));
    let quiet = |cmd: &mut Command| -> Result<()> {
        let out = cmd
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot start {cmd:?}"))?;
        if !out.status.success() {
            bail!(
                "{cmd:?} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    };
    quiet(Command::new("apt-get").args(["update", "-qq"]))?;
    quiet(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing),
    )
}

fn package_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// Variables COMMAND sees: a clean environment with the caller's essentials.
fn job_env(extra: &[String], systemd: bool) -> Vec<(String, String)> {
    const STANDARD_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
    let mut env: Vec<(String, String)> = Vec::new();
    let path = if systemd {
        STANDARD_PATH.to_owned()
    } else {
        std::env::var("PATH").unwrap_or_else(|_| STANDARD_PATH.to_owned())
    };
    env.push(("PATH".into(), path));
    env.push(("HOME".into(), "/root".into()));
    env.push(("USER".into(), "root".into()));
    env.push(("LOGNAME".into(), "root".into()));
    for (name, value) in std::env::vars() {
        let passed = matches!(
            name.as_str(),
            "TERM"
                | "LANG"
                | "LC_ALL"
                | "TZ"
                | "RUST_LOG"
                | "RUST_BACKTRACE"
                | "RUST_LIB_BACKTRACE"
        ) || name.starts_with("CONDUIT_");
        if passed {
            env.push((name, value));
        }
    }
    for item in extra {
        match item.split_once('=') {
            Some((name, value)) => env.push((name.to_owned(), value.to_owned())),
            None => {
                if let Ok(value) = std::env::var(item) {
                    env.push((item.clone(), value));
                }
            }
        }
    }
    env
}

/// Cargo's target directory (`CARGO_TARGET_DIR`, else the workspace's `target`),
/// absolute: the caches live under it.
pub(crate) fn target_dir() -> Result<PathBuf> {
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => crate::workspace_root().join("target"),
    };
    Ok(std::path::absolute(&target)?)
}

/// The cache under `target/vm`.
pub struct Cache {
    pub dir: PathBuf,
}

impl Cache {
    pub(crate) fn new() -> Result<Self> {
        let dir = target_dir()?.join("vm");
        fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        Ok(Self { dir })
    }

    /// An exclusive lock on one cache entry while it is being filled.
    pub(crate) fn lock(&self, entry: &str) -> Result<nix::fcntl::Flock<fs::File>> {
        let file = fs::File::create(self.dir.join(format!(".lock-{entry}")))?;
        nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, errno)| anyhow::anyhow!("lock {}: {errno}", self.dir.display()))
    }

    /// A directory for one run, removed when dropped. Directories of runs whose
    /// process is gone (killed) are removed first.
    fn new_run_dir(&self) -> Result<RunDir> {
        let runs = self.dir.join("run");
        fs::create_dir_all(&runs)?;
        for entry in fs::read_dir(&runs)?.flatten() {
            let name = entry.file_name();
            let pid = name.to_string_lossy().parse::<u32>().ok();
            if pid.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
        let path = runs.join(std::process::id().to_string());
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path)?;
        Ok(RunDir { path })
    }
}

struct RunDir {
    path: PathBuf,
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if std::env::var_os("CONDUIT_VM_KEEP").is_none() {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_table() {
        assert_eq!(parse_series("5.10").map(|s| s.suite), Ok("bullseye"));
        assert_eq!(parse_series("6.1").map(|s| s.suite), Ok("bookworm"));
        assert_eq!(parse_series("6.12").map(|s| s.suite), Ok("trixie"));
        assert!(parse_series("6.6").is_err());
    }

    #[test]
    fn args_take_the_command_after_the_separator() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            vm: VmArgs,
        }
        let cli = Cli::try_parse_from([
            "vm", "--kernel", "6.1", "--", "sh", "-c", "exit 7", "--kernel",
        ])
        .expect("parses");
        assert_eq!(cli.vm.kernel.name, "6.1");
        assert_eq!(cli.vm.memory, 2048);
        assert_eq!(cli.vm.cpus, 2);
        assert!(!cli.vm.systemd);
        let command: Vec<&str> = cli.vm.command.iter().filter_map(|a| a.to_str()).collect();
        assert_eq!(command, ["sh", "-c", "exit 7", "--kernel"]);
    }
}
