//! The Rust toolchains and bpf-linker, pinned by exact version, and their installation.
//!
//! The channels come from the two rust-toolchain.toml files (the workspace's stable and
//! `sensor-ebpf`'s nightly, which sensor-user/build.rs reads too); bpf-linker's version
//! and the LLVM major it links are pinned here. A fresh machine must get exactly these:
//! [`fresh_check`] proves it in `cargo xtask test` with empty rustup and cargo homes.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, Result, bail};
use serde::Deserialize;

use crate::{run, step, workspace_root};

/// bpf-linker release installed by setup (`cargo install --locked`).
pub const BPF_LINKER_VERSION: &str = "0.13.0";
/// The LLVM major that bpf-linker links (Debian's llvm-22-dev) and that the pinned
/// nightly's rustc must use: bitcode from a newer LLVM is an "Invalid record" to it.
pub const LLVM_MAJOR: u32 = 22;

/// The LLVM Debian packages bpf-linker builds against.
pub fn llvm_packages() -> [String; 2] {
    [
        format!("llvm-{LLVM_MAJOR}-dev"),
        format!("libpolly-{LLVM_MAJOR}-dev"),
    ]
}

fn llvm_prefix() -> PathBuf {
    PathBuf::from(format!("/usr/lib/llvm-{LLVM_MAJOR}"))
}

/// One pinned rustup toolchain.
#[derive(Debug, Clone, Deserialize)]
pub struct Channel {
    pub channel: String,
    #[serde(default)]
    pub components: Vec<String>,
}

#[derive(Deserialize)]
struct ToolchainFile {
    toolchain: Channel,
}

/// The workspace's toolchain (everything but the eBPF object).
pub fn host() -> Result<Channel> {
    read_channel(&workspace_root().join("rust-toolchain.toml"))
}

/// The eBPF crate's toolchain (a dated nightly).
pub fn ebpf() -> Result<Channel> {
    read_channel(
        &workspace_root()
            .join("sensor-ebpf")
            .join("rust-toolchain.toml"),
    )
}

fn read_channel(path: &Path) -> Result<Channel> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let file: ToolchainFile =
        toml::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
    Ok(file.toolchain)
}

/// `$CARGO_HOME` as rustup and cargo resolve it.
pub fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".cargo"))
}

fn home() -> PathBuf {
    std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from)
}

/// `PATH` with `$CARGO_HOME/bin` first, so that every child (rustc's BPF target looks
/// up `bpf-linker` there) finds the pinned bpf-linker, not another one.
pub fn path_env() -> OsString {
    let bin = cargo_home().join("bin");
    let rest = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![bin.clone()];
    dirs.extend(std::env::split_paths(&rest).filter(|d| *d != bin));
    std::env::join_paths(dirs).unwrap_or(rest)
}

/// `rustup run CHANNEL PROGRAM`: the pinned toolchain explicitly, whatever
/// `RUSTUP_TOOLCHAIN`, `CARGO` or a directory override say.
pub fn rustup_run(channel: &Channel, program: &str) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", &channel.channel, program])
        .env("PATH", path_env());
    without_toolchain_env(&mut cmd);
    cmd
}

/// Removes what the calling cargo or rustup set for itself, so that a child picks
/// the toolchain it is told to, not the one xtask happens to run under.
fn without_toolchain_env(cmd: &mut Command) -> &mut Command {
    cmd.env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .env_remove("RUSTC")
}

/// Installs both toolchains with their components and bpf-linker, and checks that
/// the LLVM majors agree. Each step checks before it changes anything, so an
/// interrupted run is finished by the next one.
pub fn install() -> Result<()> {
    let host = host()?;
    let ebpf = ebpf()?;
    for channel in [&host, &ebpf] {
        step(&format!(
            "Rust {} with {}",
            channel.channel,
            channel.components.join(", ")
        ));
        install_channel(channel)?;
    }
    step(&format!("LLVM of {} (must be {LLVM_MAJOR})", ebpf.channel));
    let rustc_llvm = rustc_llvm_major(&ebpf)?;
    if rustc_llvm != LLVM_MAJOR {
        bail!(
            "{} uses LLVM {rustc_llvm}, but bpf-linker links LLVM {LLVM_MAJOR}: pin a nightly \
             whose `rustc -vV` says `LLVM version: {LLVM_MAJOR}.x` in \
             sensor-ebpf/rust-toolchain.toml, or move LLVM_MAJOR and BPF_LINKER_VERSION in \
             xtask/src/toolchain.rs together (bpf-linker's features name the LLVMs it supports)",
            ebpf.channel
        );
    }
    println!("    LLVM {rustc_llvm}");
    step(&format!(
        "bpf-linker {BPF_LINKER_VERSION} against LLVM {LLVM_MAJOR}"
    ));
    install_bpf_linker(&host)
}

fn install_channel(channel: &Channel) -> Result<()> {
    let installed = Command::new("rustup")
        .args([
            "component",
            "list",
            "--installed",
            "--toolchain",
            &channel.channel,
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    let missing: Vec<&String> = channel
        .components
        .iter()
        .filter(|c| {
            installed
                .as_deref()
                .is_none_or(|list| !list.lines().any(|l| l.starts_with(c.as_str())))
        })
        .collect();
    if installed.is_some() && missing.is_empty() {
        println!("    present");
        return Ok(());
    }
    let mut cmd = Command::new("rustup");
    cmd.args([
        "toolchain",
        "install",
        &channel.channel,
        "--profile",
        "minimal",
        "--no-self-update",
    ]);
    for component in &channel.components {
        cmd.args(["--component", component]);
    }
    run(&mut cmd)
}

/// The LLVM major of a toolchain's rustc (`rustc -vV`: "LLVM version: 22.1.6").
fn rustc_llvm_major(channel: &Channel) -> Result<u32> {
    let out = rustup_run(channel, "rustc")
        .arg("-vV")
        .output()
        .with_context(|| format!("rustc of {}", channel.channel))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .and_then(|major| major.trim().parse().ok())
        .with_context(|| format!("no LLVM version in `rustc -vV` of {}", channel.channel))
}

/// What the bpf-linker at `path` is: its version and the LLVM major of the libLLVM it
/// loads (Debian's LLVM is a shared library, so `ldd` names it: libLLVM.so.22.1).
fn bpf_linker_identity(path: &Path) -> Option<(String, u32)> {
    let version = Command::new(path).arg("--version").output().ok()?;
    let version = String::from_utf8_lossy(&version.stdout)
        .trim()
        .strip_prefix("bpf-linker ")?
        .to_owned();
    let ldd = Command::new("ldd").arg(path).output().ok()?;
    let ldd = String::from_utf8_lossy(&ldd.stdout);
    // Debian names it libLLVM.so.22.1 (LLVM 18 and later) or libLLVM-17.so.
    let llvm = ldd.lines().find_map(|l| {
        let l = l.trim();
        l.strip_prefix("libLLVM.so.")
            .or_else(|| l.strip_prefix("libLLVM-"))
    })?;
    let major = llvm
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    Some((version, major))
}

fn install_bpf_linker(host: &Channel) -> Result<()> {
    let bin = cargo_home().join("bin");
    let target = bin.join("bpf-linker");
    let wanted = (BPF_LINKER_VERSION.to_owned(), LLVM_MAJOR);
    match bpf_linker_identity(&target) {
        Some(found) if found == wanted => println!("    present at {}", target.display()),
        found => {
            if let Some((version, llvm)) = found {
                println!("    replacing bpf-linker {version} (LLVM {llvm})");
            }
            // Build into a staging root and move the binary in only once it is checked:
            // a failed or interrupted build leaves the old state, not half of a new one.
            let staging = cargo_home().join("xtask-staging").join("bpf-linker");
            let _ = std::fs::remove_dir_all(&staging);
            let prefix = llvm_prefix();
            let path = {
                let mut dirs = vec![prefix.join("bin")];
                dirs.extend(std::env::split_paths(&path_env()));
                std::env::join_paths(dirs)?
            };
            run(rustup_run(host, "cargo")
                .args(["install", "--locked", "--force", "--root"])
                .arg(&staging)
                .arg(format!("bpf-linker@{BPF_LINKER_VERSION}"))
                .args(["--no-default-features", "--features"])
                .arg(format!("llvm-{LLVM_MAJOR}"))
                .env("LLVM_PREFIX", &prefix)
                .env("PATH", path))?;
            let built = staging.join("bin").join("bpf-linker");
            match bpf_linker_identity(&built) {
                Some(found) if found == wanted => {}
                other => bail!(
                    "the bpf-linker just built is {other:?}, not {wanted:?}; is \
                     {} Debian's LLVM {LLVM_MAJOR}?",
                    prefix.display()
                ),
            }
            std::fs::create_dir_all(&bin)?;
            std::fs::rename(&built, &target)
                .with_context(|| format!("move bpf-linker into {}", bin.display()))?;
            let _ = std::fs::remove_dir_all(&staging);
            println!("    installed {}", target.display());
        }
    }
    // What the build will actually run: the first bpf-linker on the children's PATH.
    let resolved = std::env::split_paths(&path_env())
        .map(|d| d.join("bpf-linker"))
        .find(|p| p.is_file());
    if resolved.as_deref() != Some(target.as_path()) {
        bail!(
            "`bpf-linker` on PATH resolves to {resolved:?}, not {}",
            target.display()
        );
    }
    Ok(())
}

/// The check that CI fails the way a fresh machine would: setup's toolchain step in
/// empty rustup and cargo homes, then the eBPF object built with only what it
/// installed. Nothing comes from the toolchains this machine happens to have. The
/// homes live under `target/fresh-toolchain/` and are reused while the pins stay the
/// same (a fresh clone, as in CI, starts with none).
pub fn fresh_check() -> Result<()> {
    let started = Instant::now();
    let host = host()?;
    let ebpf = ebpf()?;
    let root = workspace_root();
    let dir = root.join("target").join("fresh-toolchain");
    let stamp = dir.join("pins");
    let pins = format!(
        "{} {} bpf-linker {BPF_LINKER_VERSION} llvm {LLVM_MAJOR}\n",
        host.channel, ebpf.channel
    );
    if std::fs::read_to_string(&stamp).ok().as_deref() != Some(pins.as_str()) {
        let _ = std::fs::remove_dir_all(&dir);
    }
    std::fs::create_dir_all(&dir)?;
    let rustup_home = dir.join("rustup");
    let cargo_home = dir.join("cargo");
    let exe = std::env::current_exe().context("the xtask binary")?;
    // A fresh rustup install: the rustup binary and its proxies (cargo, rustc, ...
    // are links to it) in the fresh cargo home's bin, first on PATH; the rest of PATH
    // is the system's, without this machine's ~/.cargo/bin.
    let rustup = which("rustup").context("rustup is not on PATH")?;
    let bin = cargo_home.join("bin");
    std::fs::create_dir_all(&bin)?;
    for proxy in RUSTUP_PROXIES {
        let link = bin.join(proxy);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(&rustup, &link)?;
        }
    }
    let link = bin.join("rustup");
    let system = [
        "/usr/local/sbin",
        "/usr/local/bin",
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
    ];
    let path = std::env::join_paths(
        std::iter::once(bin.clone()).chain(system.into_iter().map(PathBuf::from)),
    )?;
    let fresh = |cmd: &mut Command| {
        without_toolchain_env(cmd)
            .env_remove("RUSTC_WRAPPER")
            .env_remove("CARGO_TARGET_DIR")
            .env("RUSTUP_HOME", &rustup_home)
            .env("CARGO_HOME", &cargo_home)
            .env("PATH", &path);
    };
    step("Fresh-toolchain check: setup's toolchain step with empty RUSTUP_HOME and CARGO_HOME");
    let mut setup = Command::new(&exe);
    setup.args(["setup", "--toolchains-only"]);
    fresh(&mut setup);
    run(&mut setup)?;
    std::fs::write(&stamp, &pins)?;

    step("Fresh-toolchain check: the eBPF object from those toolchains alone");
    let target_dir = dir.join("target");
    let mut build = Command::new(&link);
    build
        .current_dir(root.join("sensor-ebpf"))
        .args([
            "run",
            &ebpf.channel,
            "cargo",
            "build",
            "--package",
            "sensor-ebpf",
        ])
        .args(["--bins", "--release", "--target", "bpfel-unknown-none"])
        .args(["-Z", "build-std=core", "--target-dir"])
        .arg(&target_dir)
        // The flags aya-build passes (sensor-user/build.rs builds with the same).
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "--cfg=bpf_target_arch=\"x86_64\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf",
        );
    fresh(&mut build);
    run(&mut build)?;
    let object = target_dir
        .join("bpfel-unknown-none")
        .join("release")
        .join("sensor");
    let elf = std::fs::read(&object).with_context(|| format!("read {}", object.display()))?;
    // ELF, 64-bit, little endian, e_machine EM_BPF (247).
    let is_bpf = elf.len() > 20
        && elf.starts_with(b"\x7fELF\x02\x01")
        && u16::from_le_bytes([elf[18], elf[19]]) == 247;
    if !is_bpf {
        bail!("{} is not a BPF ELF object", object.display());
    }
    println!(
        "    {} ({} bytes) built by {} with bpf-linker {BPF_LINKER_VERSION}, in {:.0} s",
        object.display(),
        elf.len(),
        ebpf.channel,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// What rustup-init links into `$CARGO_HOME/bin`.
const RUSTUP_PROXIES: &[&str] = &[
    "rustup",
    "cargo",
    "rustc",
    "rustdoc",
    "cargo-clippy",
    "clippy-driver",
    "cargo-fmt",
    "rustfmt",
];

fn which(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}
