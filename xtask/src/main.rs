//! `cargo xtask`: the project's automation. `setup` installs everything a fresh
//! Debian 12 machine lacks, every toolchain and tool at a pinned version; `test`,
//! `demo` and `bench` run setup first, so each of the README's two commands works on a
//! fresh machine.

mod matrix;
mod nats;
mod package;
mod toolchain;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

mod vm;

#[derive(Parser)]
#[command(about = "Conduit Sensor project automation")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what a fresh machine lacks (Debian packages, LLVM 22, the pinned Rust
    /// toolchains, bpf-linker, Python peers). Idempotent; seconds when all is there.
    Setup {
        /// Only the Rust toolchains and bpf-linker (what the fresh-toolchain check runs).
        #[arg(long, hide = true)]
        toolchains_only: bool,
    },
    /// Build release binaries.
    Build,
    /// Setup, then every check and test: fmt, clippy, unit, kernel (BPF_PROG_TEST_RUN)
    /// and end-to-end tests in network namespaces.
    Test {
        /// Skip fmt and clippy.
        #[arg(long)]
        no_lint: bool,
        /// Run the whole kernel suite in each VM of the kernel matrix (5.10, 6.1,
        /// 6.12), not only the smoke tests.
        #[arg(long)]
        kernels: bool,
        /// Run the kernel matrix only on this kernel series (5.10, 6.1, 6.12);
        /// repeatable. Default: all three.
        #[arg(long = "kernel", value_name = "SERIES")]
        kernel: Vec<String>,
    },
    /// Setup, then the demo: a lab of namespaces with OT hosts, a gateway running the
    /// sensor, fake AI endpoints; prints the flow records; leaves nothing behind.
    Demo,
    /// Setup, then every benchmark, each printed next to its baseline.
    Bench,
    /// Setup, then run each fuzz target (ClientHello, TCP reassembly, QUIC Initial)
    /// with cargo-fuzz for the given time.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u32,
    },
    /// Build the Debian packages: target/debian/conduit-sensor_VERSION_amd64.deb and
    /// target/debian/conduit-collector_VERSION_amd64.deb (release binaries, units,
    /// sysusers.d/tmpfiles.d, conffiles, man pages, completions, examples, docs).
    Package,
    /// Only the kernel matrix of `test` (smoke tests, or with --full the kernel suite)
    /// in the 5.10, 6.1 and 6.12 VMs.
    Matrix {
        /// The whole kernel suite and the end-to-end test, not only the smoke tests.
        #[arg(long)]
        full: bool,
        /// Only this kernel series (5.10, 6.1, 6.12); repeatable. Default: all three.
        #[arg(long = "kernel", value_name = "SERIES")]
        kernel: Vec<String>,
    },
    /// Run COMMAND as root in a VM with one of Debian's kernels (5.10, 6.1, 6.12):
    /// the host's files read-only, /tmp writable; exits with COMMAND's status.
    Vm(vm::VmArgs),
}

/// Debian packages the build, the tests and the demo use (besides LLVM, which
/// [`toolchain::llvm_packages`] names after the pinned major).
const DEBIAN_PACKAGES: &[&str] = &[
    // Building: bpf-linker against LLVM, protobuf for prost-build.
    "libzstd-dev",
    "zlib1g-dev",
    "protobuf-compiler",
    "pkg-config",
    // The lab: namespaces, veth, offload settings, NAT, counters.
    "iproute2",
    "ethtool",
    "iptables",
    "nftables",
    "tcpdump",
    // Real clients and servers.
    "curl",
    "openssl",
    "nginx-light",
    "socat",
    "chromium",
    "rsyslog",
    "rsyslog-gnutls",
    // nats-server is not here: bookworm's 2.9.10 lacks `sync_interval: always` and
    // the message-id fixes of 2.11; the tests run Debian's 2.15.1-1 (forky), fetched
    // into target/tools by [`nats::ensure`].
    // DNS attribution (tests/tests/dns_attribution.rs): a real resolver and client.
    "dnsmasq-base",
    "bind9-dnsutils",
    // bench_gateway's TCP throughput through the lab gateway; its package asks
    // whether to start a daemon: preseeded to no (the bench runs its own server).
    "iperf3",
    // promtool checks deploy/prometheus (collector/tests/siem_content.rs).
    "prometheus",
    // bench_replay's second peer (SNIs of a capture); its debconf question about
    // non-root capture takes the default under DEBIAN_FRONTEND=noninteractive.
    "tshark",
];

/// Answers to the packages' install-time questions (debconf-set-selections lines).
/// iperf3 would otherwise offer to run a server as a service on port 5201.
const DEBCONF_PRESEED: &str = "iperf3 iperf3/start_daemon boolean false\n";

/// Python packages the tests use as real peers (aioquic: QUIC client and server;
/// scapy; nfstream for bench_replay), each pinned with its dependencies.
const PYTHON_REQUIREMENTS: &str = "tests/requirements.txt";

/// cargo-fuzz release `cargo xtask fuzz` installs.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Setup { toolchains_only } => {
            if toolchains_only {
                toolchain::install()
            } else {
                setup()
            }
        }
        Cmd::Build => build_release(),
        Cmd::Package => package::package(),
        Cmd::Test {
            no_lint,
            kernels,
            kernel,
        } => matrix::select_kernels(&kernel)
            .and_then(|k| setup().and_then(|()| test(!no_lint, kernels, &k))),
        Cmd::Demo => setup().and_then(|()| demo()),
        Cmd::Bench => setup().and_then(|()| bench()),
        Cmd::Fuzz { seconds } => setup().and_then(|()| fuzz(seconds)),
        Cmd::Matrix { full, kernel } => {
            matrix::select_kernels(&kernel).and_then(|k| matrix::run_matrix(full, &k))
        }
        Cmd::Vm(args) => return vm::main(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn step(msg: &str) {
    println!("==> {msg}");
}

/// Runs a command, echoing it, failing on a non-zero exit.
fn run(cmd: &mut Command) -> Result<()> {
    println!("    $ {}", display(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {}", display(cmd)))?;
    if !status.success() {
        bail!("{} failed with {status}", display(cmd));
    }
    Ok(())
}

fn display(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace_root())
        .env("PATH", toolchain::path_env());
    // The tests and benchmarks that start a NATS cluster run this binary.
    if let Some(nats) = nats::cached() {
        cmd.env(nats::ENV, &nats.binary);
    }
    cmd
}

fn setup() -> Result<()> {
    let started = Instant::now();
    if !nix_is_root() {
        bail!("setup installs packages and the tests create network namespaces: run as root");
    }
    step("Debian packages");
    let wanted: Vec<String> = toolchain::llvm_packages()
        .into_iter()
        .chain(
            DEBIAN_PACKAGES
                .iter()
                .chain(vm::DEBIAN_PACKAGES)
                .map(|p| (*p).to_string()),
        )
        .collect();
    let missing: Vec<&String> = wanted
        .iter()
        .filter(|pkg| !debian_package_installed(pkg))
        .collect();
    if missing.is_empty() {
        println!("    all {} present", wanted.len());
    } else {
        println!(
            "    missing: {}",
            missing
                .iter()
                .map(|p| p.as_str())
                .collect::<Vec<_>>()
                .join(" ")
        );
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        preseed_debconf(DEBCONF_PRESEED)?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    // The lab starts its own nginx/rsyslog/nats processes; the distribution's
    // services are not needed and would hold the ports.
    for service in ["nginx", "rsyslog", "nats-server", "prometheus", "iperf3"] {
        let _ = Command::new("systemctl")
            .args(["disable", "--now", "--quiet", service])
            .stderr(std::process::Stdio::null())
            .status();
    }

    step(&format!(
        "nats-server {} from Debian {}",
        nats::VERSION,
        nats::SUITES.join(" or ")
    ));
    let server = nats::ensure()?;
    println!(
        "    {} (package {} from {}) at {}",
        server.upstream,
        server.package_version,
        server.suite,
        server.binary.display()
    );

    toolchain::install()?;

    step("Python packages (real QUIC peers), pinned");
    run(Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--root-user-action=ignore",
            "--requirement",
        ])
        .arg(workspace_root().join(PYTHON_REQUIREMENTS)))?;

    step("Kernel");
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        println!("    warning: no BTF at /sys/kernel/btf/vmlinux; `conduit-sensor probe` explains");
    } else {
        println!("    BTF present");
    }
    println!("==> setup done in {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}

fn nix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn debian_package_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// Feeds `selections` to debconf-set-selections, before the packages that ask.
fn preseed_debconf(selections: &str) -> Result<()> {
    use std::io::Write as _;
    println!(
        "    $ debconf-set-selections <<< {:?}",
        selections.trim_end()
    );
    let mut child = Command::new("debconf-set-selections")
        .stdin(std::process::Stdio::piped())
        .spawn()
        .context("cannot start debconf-set-selections")?;
    child
        .stdin
        .take()
        .context("debconf-set-selections stdin")?
        .write_all(selections.as_bytes())?;
    let status = child.wait()?;
    if !status.success() {
        bail!("debconf-set-selections failed with {status}");
    }
    Ok(())
}

fn build_release() -> Result<()> {
    step("Release build");
    run(cargo().args([
        "build",
        "--release",
        "--workspace",
        "--exclude",
        "sensor-ebpf",
        "--bins",
    ]))
}

fn test(lint: bool, full_matrix: bool, matrix_kernels: &[&str]) -> Result<()> {
    remove_stale_labs();
    toolchain::fresh_check()?;
    collector_free_of_ebpf_build()?;
    lock_free_of_unmaintained()?;
    if lint {
        step("cargo fmt --check");
        run(cargo().args(["fmt", "--all", "--check"]))?;
        // Default members: everything but the eBPF crate, which only builds for BPF.
        step("cargo clippy --all-targets -- -D warnings");
        run(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
        let ebpf = toolchain::ebpf()?;
        step(&format!(
            "clippy on the eBPF crate, for the BPF target ({})",
            ebpf.channel
        ));
        run(toolchain::rustup_run(&ebpf, "cargo")
            .current_dir(workspace_root().join("sensor-ebpf"))
            .args([
                "clippy",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--bins",
                "--",
                "-D",
                "warnings",
            ]))?;
    }
    step("Unit, kernel-program (BPF_PROG_TEST_RUN), chain, spool and collector tests");
    run(cargo().args([
        "test",
        "--workspace",
        "--exclude",
        "sensor-ebpf",
        "--exclude",
        "conduit-tests",
    ]))?;
    step("Classification tests with the variants a 5.10 kernel loads, on this kernel");
    run(cargo()
        .args([
            "test",
            "-p",
            "sensor-user",
            "--test",
            "kernel_classify",
            "--test",
            "kernel_agree",
        ])
        .env("CONDUIT_TEST_KERNEL_VARIANTS", "oldest"))?;
    matrix::run_matrix(full_matrix, matrix_kernels)?;
    step("End-to-end tests (network namespaces, real clients and servers)");
    // The binaries under test are the release ones the demo uses.
    build_release()?;
    let result = run(cargo().args([
        "test",
        "--release",
        "-p",
        "conduit-tests",
        "--",
        "--test-threads=1",
    ]));
    remove_stale_labs();
    result?;
    step("The Debian packages under real systemd (a bookworm VM)");
    package::package()?;
    run(cargo().args([
        "test",
        "--release",
        "-p",
        "conduit-tests",
        "--test",
        "package",
        "--",
        "--ignored",
        "--nocapture",
    ]))
}

/// The collector runs where no eBPF toolchain is: nothing in its dependency graph
/// (normal, build and dev) may build the kernel programs.
fn collector_free_of_ebpf_build() -> Result<()> {
    step("The collector's dependency graph has no eBPF build");
    let out = cargo()
        .args(["tree", "-p", "conduit-collector", "-e", "normal,build,dev"])
        .args(["--prefix", "none", "--format", "{p}"])
        .output()
        .context("cargo tree")?;
    if !out.status.success() {
        bail!("cargo tree -p conduit-collector failed");
    }
    let tree = String::from_utf8_lossy(&out.stdout);
    let banned: Vec<&str> = tree
        .lines()
        .filter(|line| {
            let name = line.split_whitespace().next().unwrap_or_default();
            name.starts_with("aya") || name == "sensor-ebpf" || name == "sensor-user"
        })
        .collect();
    if !banned.is_empty() {
        bail!(
            "conduit-collector depends on the eBPF build through: {}",
            banned.join(", ")
        );
    }
    println!(
        "    {} packages, none of aya*, sensor-ebpf, sensor-user",
        tree.lines().count()
    );
    Ok(())
}

/// Crates with an advisory that names no fixed version (unmaintained): the lock
/// file must not bring them back through an upgrade or a new dependency.
const UNMAINTAINED: &[(&str, &str)] = &[("rustls-pemfile", "RUSTSEC-2025-0134")];

fn lock_free_of_unmaintained() -> Result<()> {
    step("The lock file has no crate known to be unmaintained");
    let lock =
        std::fs::read_to_string(workspace_root().join("Cargo.lock")).context("Cargo.lock")?;
    let lock: toml::Table = toml::from_str(&lock).context("parsing Cargo.lock")?;
    let names: Vec<&str> = lock
        .get("package")
        .and_then(toml::Value::as_array)
        .context("Cargo.lock has no [[package]]")?
        .iter()
        .filter_map(|p| p.get("name").and_then(toml::Value::as_str))
        .collect();
    let found: Vec<String> = UNMAINTAINED
        .iter()
        .filter(|(name, _)| names.contains(name))
        .map(|(name, advisory)| format!("{name} ({advisory})"))
        .collect();
    if !found.is_empty() {
        bail!("Cargo.lock holds unmaintained crates: {}", found.join(", "));
    }
    println!("    {} packages, none of {:?}", names.len(), UNMAINTAINED);
    Ok(())
}

fn demo() -> Result<()> {
    build_release()?;
    remove_stale_labs();
    step("Demo");
    let result = run(cargo().args(["run", "--release", "-p", "conduit-tests", "--bin", "demo"]));
    remove_stale_labs();
    result
}

fn fuzz(seconds: u32) -> Result<()> {
    step(&format!("cargo-fuzz {CARGO_FUZZ_VERSION}"));
    let wanted = format!("cargo-fuzz {CARGO_FUZZ_VERSION}");
    let found = Command::new(toolchain::cargo_home().join("bin").join("cargo-fuzz"))
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    if found == wanted {
        println!("    present");
    } else {
        run(cargo()
            .args(["install", "--locked", "--force"])
            .arg(format!("cargo-fuzz@{CARGO_FUZZ_VERSION}")))?;
    }
    let nightly = toolchain::ebpf()?;
    let dir = workspace_root().join("sensor-user").join("fuzz");
    for target in [
        "client_hello",
        "reassembly",
        "quic_initial",
        "config",
        "stream_decode",
        "dns_response",
    ] {
        step(&format!("fuzz {target} for {seconds} s"));
        let corpus = dir.join("corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        // cargo-fuzz needs a nightly for the sanitizers: the pinned one.
        run(toolchain::rustup_run(&nightly, "cargo")
            .current_dir(&dir)
            // The parsers do not need the kernel programs.
            .env("AYA_BUILD_SKIP", "1")
            .args(["fuzz", "run", target])
            .arg(&corpus)
            .arg(dir.join("seeds").join(target))
            .arg("--")
            .arg(format!("-max_total_time={seconds}")))?;
    }
    Ok(())
}

fn bench() -> Result<()> {
    // bench_gateway runs the release conduit-sensor; a lab left by a killed run
    // would hold its namespaces.
    build_release()?;
    remove_stale_labs();
    // The gateway benchmark's baselines: a program that only passes packets, attached
    // as the sensor attaches (native XDP) and at TC, built with the toolchain's llc.
    let llc = format!("/usr/lib/llvm-{}/bin/llc", toolchain::LLVM_MAJOR);
    let gateway_args: &[&str] = &["--control", "xdp", "--control", "tc"];
    for (package, example, args) in [
        ("sensor-user", "bench_kernel", &[][..]),
        // Cost against flows and SNI patterns; rewrites docs/scaling.{svg,png}.
        ("sensor-user", "bench_scaling", &[]),
        ("conduit-evidence", "bench_chain", &[]),
        ("sensor-user", "bench_tls", &[]),
        // `conduit-sensor replay` against nfstream and tshark on one synthetic capture.
        ("sensor-user", "bench_replay", &[]),
        ("conduit-collector", "bench_collector", &[]),
        // TCP through the lab gateway, sensor vs none (needs root and the release bins).
        ("conduit-tests", "bench_gateway", gateway_args),
        // A 10-million-record store (about 2.3 GB in a temporary directory).
        ("conduit-collector", "bench_query", &[]),
    ] {
        step(example);
        run(cargo()
            .args([
                "run",
                "--release",
                "-p",
                package,
                "--example",
                example,
                "--",
            ])
            .args(args)
            .env("LLC", &llc))?;
    }
    Ok(())
}

/// Namespaces left by a lab whose process died (killed test, power loss). Labs name
/// their namespaces `cs<pid>-...`; a namespace whose pid is gone is stale.
fn remove_stale_labs() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix("cs")
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            println!("    removing stale namespace {name}");
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

#[cfg(test)]
mod lock_tests {
    #[test]
    fn the_lock_file_parses_and_has_no_unmaintained_crate() -> anyhow::Result<()> {
        super::lock_free_of_unmaintained()
    }
}
