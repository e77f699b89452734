//! The lab: network namespaces joined by veth pairs, with real processes in them.
//!
//! Every namespace a lab creates is named `cs<pid>-<tag>-<host>` and is deleted when
//! the [`Lab`] is dropped, also when a test panics; `cargo xtask test` removes
//! namespaces whose pid no longer exists (a test killed with SIGKILL). Traffic stays
//! inside the lab: no namespace has a link to the root namespace.

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead as _, BufReader},
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

pub mod ai;
pub mod topology;

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);

/// Whether the process can create namespaces. Tests that need it print a SKIP line
/// and return early otherwise (so a non-root `cargo test` says what it did not run).
pub fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// Prints why a test is skipped; returns true if it must be.
pub fn skip_unless_root(test: &str) -> bool {
    if is_root() {
        false
    } else {
        println!("SKIP {test}: needs root (network namespaces)");
        true
    }
}

/// How much longer than on the host the lab waits for anything: the value of
/// `CONDUIT_TEST_TIMEOUT_SCALE` (a whole number, at least 1; default 1). The kernel
/// matrix sets it in its VMs, whose TCG guests run 5 to 20 times slower than the
/// host. Every deadline of the lab ([`Lab::wait_for_log`], [`Lab::wait_for_port`],
/// [`Lab::stop`]) and every client's own time limit is multiplied by it; the peer
/// scripts read the same variable.
pub fn timeout_scale() -> u32 {
    std::env::var("CONDUIT_TEST_TIMEOUT_SCALE")
        .ok()
        .and_then(|v| v.trim().parse::<u32>().ok())
        .unwrap_or(1)
        .max(1)
}

/// `timeout` multiplied by [`timeout_scale`].
pub fn scaled(timeout: Duration) -> Duration {
    timeout * timeout_scale()
}

/// A set of namespaces and processes that is torn down on drop.
pub struct Lab {
    prefix: String,
    namespaces: Vec<String>,
    processes: Vec<(String, Child)>,
    pub workdir: PathBuf,
}

/// A namespace of a [`Lab`].
#[derive(Clone, Debug)]
pub struct Ns {
    pub name: String,
}

impl Lab {
    /// A new, empty lab. `tag` names it in `ip netns list`.
    pub fn new(tag: &str) -> Result<Lab> {
        let n = LAB_COUNTER.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("cs{}-{tag}{n}", std::process::id());
        let workdir = std::env::temp_dir().join(&prefix);
        let _ = fs::remove_dir_all(&workdir);
        fs::create_dir_all(&workdir).with_context(|| format!("mkdir {}", workdir.display()))?;
        Ok(Lab {
            prefix,
            namespaces: Vec::new(),
            processes: Vec::new(),
            workdir,
        })
    }

    /// Adds a namespace with loopback up.
    pub fn ns(&mut self, host: &str) -> Result<Ns> {
        let name = format!("{}-{host}", self.prefix);
        sh(Command::new("ip").args(["netns", "add", &name]))?;
        self.namespaces.push(name.clone());
        let ns = Ns { name };
        self.exec(&ns, &["ip", "link", "set", "lo", "up"])?;
        // Deterministic counts: no IPv6 router solicitations or DAD traffic.
        self.exec(&ns, &["sysctl", "-qw", "net.ipv6.conf.all.accept_ra=0"])?;
        self.exec(
            &ns,
            &["sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0"],
        )?;
        self.exec(
            &ns,
            &["sysctl", "-qw", "net.ipv6.conf.default.dad_transmits=0"],
        )?;
        Ok(ns)
    }

    /// Joins two namespaces with a veth pair, brings both ends up and turns off the
    /// offloads (TSO/GSO/GRO) so one packet on the wire is one packet everywhere.
    pub fn link(&mut self, a: &Ns, a_if: &str, b: &Ns, b_if: &str) -> Result<()> {
        sh(Command::new("ip").args([
            "link", "add", a_if, "netns", &a.name, "type", "veth", "peer", "name", b_if, "netns",
            &b.name,
        ]))?;
        for (ns, ifname) in [(a, a_if), (b, b_if)] {
            self.exec(ns, &["ip", "link", "set", ifname, "up"])?;
            self.exec(
                ns,
                &[
                    "ethtool", "-K", ifname, "tso", "off", "gso", "off", "gro", "off",
                ],
            )?;
        }
        Ok(())
    }

    /// Adds an address (CIDR notation) to an interface.
    pub fn addr(&self, ns: &Ns, ifname: &str, cidr: &str) -> Result<()> {
        let mut args = vec!["ip"];
        if cidr.contains(':') {
            args.push("-6");
        }
        args.extend(["addr", "add", cidr, "dev", ifname]);
        if cidr.contains(':') {
            args.push("nodad");
        }
        self.exec(ns, &args)?;
        Ok(())
    }

    /// Runs a command in a namespace and waits for it; fails on non-zero exit.
    pub fn exec(&self, ns: &Ns, args: &[&str]) -> Result<Output> {
        sh(Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .args(args))
    }

    /// Runs a command in a namespace; returns its output whatever the exit status.
    pub fn exec_any(&self, ns: &Ns, args: &[&str]) -> Result<Output> {
        Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .args(args)
            .output()
            .with_context(|| format!("ip netns exec {} {}", ns.name, args.join(" ")))
    }

    /// Starts a long-running process in a namespace; it is killed when the lab drops.
    /// Its stdout and stderr go to `<workdir>/<label>.log`.
    pub fn spawn(&mut self, ns: &Ns, label: &str, args: &[&str]) -> Result<()> {
        let log = self.workdir.join(format!("{label}.log"));
        let out = fs::File::create(&log)?;
        let err = out.try_clone()?;
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("spawn {}", args.join(" ")))?;
        self.processes.push((label.to_string(), child));
        Ok(())
    }

    /// Pid of a spawned process (`ip netns exec` execs the program, so this is the
    /// program's own pid).
    pub fn pid(&self, label: &str) -> Option<nix::unistd::Pid> {
        self.processes
            .iter()
            .find(|(l, _)| l == label)
            .map(|(_, c)| nix::unistd::Pid::from_raw(c.id() as i32))
    }

    /// Sends a signal to a spawned process.
    pub fn signal(&self, label: &str, signal: nix::sys::signal::Signal) -> Result<()> {
        let pid = self
            .pid(label)
            .with_context(|| format!("no process {label}"))?;
        nix::sys::signal::kill(pid, signal)?;
        Ok(())
    }

    /// Path of a spawned process's log.
    pub fn log_path(&self, label: &str) -> PathBuf {
        self.workdir.join(format!("{label}.log"))
    }

    /// Sends `signal` to a spawned process and waits up to `timeout` for it to exit;
    /// returns its exit code.
    pub fn stop(
        &mut self,
        label: &str,
        signal: nix::sys::signal::Signal,
        timeout: Duration,
    ) -> Result<Option<i32>> {
        let idx = self
            .processes
            .iter()
            .position(|(l, _)| l == label)
            .with_context(|| format!("no process {label}"))?;
        let (_, mut child) = self.processes.remove(idx);
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        // `ip netns exec` execs the command, so the child's pid is the program's.
        let _ = nix::sys::signal::kill(pid, signal);
        let timeout = scaled(timeout);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status.code());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{label} did not exit within {timeout:?} after {signal}");
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until a spawned process's log contains `needle`.
    pub fn wait_for_log(&self, label: &str, needle: &str, timeout: Duration) -> Result<()> {
        let path = self.log_path(label);
        let timeout = scaled(timeout);
        let deadline = Instant::now() + timeout;
        loop {
            let text = fs::read_to_string(&path).unwrap_or_default();
            if text.contains(needle) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{label} did not log {needle:?} within {timeout:?}; log:\n{text}");
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until a TCP or UDP port listens in a namespace.
    pub fn wait_for_port(&self, ns: &Ns, proto: &str, port: u16, timeout: Duration) -> Result<()> {
        let timeout = scaled(timeout);
        let deadline = Instant::now() + timeout;
        let flag = if proto == "udp" { "-lun" } else { "-ltn" };
        loop {
            let out = self.exec_any(ns, &["ss", flag])?;
            let text = String::from_utf8_lossy(&out.stdout);
            if text.lines().any(|l| l.contains(&format!(":{port} "))) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "port {proto}/{port} not listening in {} within {timeout:?}",
                    ns.name
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for (_, child) in &mut self.processes {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Processes started with `ip netns exec` outside `spawn` (clients) have
        // finished; any stragglers die with their namespace's pids killed here.
        for ns in self.namespaces.iter().rev() {
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    if let Ok(pid) = pid.parse::<i32>() {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                }
            }
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        if std::env::var_os("CONDUIT_KEEP_LAB").is_none() {
            let _ = fs::remove_dir_all(&self.workdir);
        }
    }
}

/// Runs a command; fails with its stderr on a non-zero exit.
pub fn sh(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// Path of a binary of this workspace, from the same profile as the running test.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/test-xxxx, target/<profile>/examples/bench-xxxx or
    // target/<profile>/demo
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") || dir.ends_with("examples") {
        dir.pop();
    }
    dir.join(name)
}

/// Runs `conduit-sensor verify-chain DIR`; fails unless the chain verifies;
/// returns its report.
pub fn verify_chain(dir: &Path) -> Result<String> {
    let out = Command::new(workspace_bin("conduit-sensor"))
        .arg("verify-chain")
        .arg(dir)
        .output()
        .context("running conduit-sensor verify-chain")?;
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "{} does not verify ({}):\n{report}{}",
            dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(report)
}

/// Reads a JSON-lines file.
pub fn read_jsonl(path: &Path) -> Result<Vec<Value>> {
    let file = fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(
            serde_json::from_str(&line)
                .with_context(|| format!("{}:{}: not JSON: {line}", path.display(), i + 1))?,
        );
    }
    Ok(out)
}

/// The latest flow record of each flow, keyed by (transport, source ip, source port,
/// destination ip, destination port): a `flow_update`/`flow_end` carries the totals.
pub fn last_flow_records(records: &[Value]) -> BTreeMap<(String, IpAddr, u64, IpAddr, u64), Value> {
    let mut flows = BTreeMap::new();
    for r in records {
        let action = r["event"]["action"].as_str().unwrap_or_default();
        if !action.starts_with("flow_") {
            continue;
        }
        let (Some(sip), Some(dip)) = (
            r["source"]["ip"].as_str().and_then(|s| s.parse().ok()),
            r["destination"]["ip"].as_str().and_then(|s| s.parse().ok()),
        ) else {
            continue;
        };
        let key = (
            r["network"]["transport"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            sip,
            r["source"]["port"].as_u64().unwrap_or_default(),
            dip,
            r["destination"]["port"].as_u64().unwrap_or_default(),
        );
        flows.insert(key, r.clone());
    }
    flows
}

/// Path of a file under `tests/peers/`.
pub fn peer_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("peers")
        .join(name)
}

/// A running `conduit-sensor run` in a lab namespace.
pub struct SensorRun {
    pub label: String,
    pub spool: PathBuf,
    pub jsonl: PathBuf,
}

impl SensorRun {
    /// Starts the sensor in `ns` with `extra` arguments and waits until it says
    /// it is running.
    pub fn start(lab: &mut Lab, ns: &Ns, label: &str, extra: &[&str]) -> Result<SensorRun> {
        Self::start_as(lab, ns, label, &[], &lab.workdir.clone(), extra)
    }

    /// Like [`SensorRun::start`], with the sensor run under `wrapper` (e.g. setpriv)
    /// and its spool and JSON lines in `dir`.
    pub fn start_as(
        lab: &mut Lab,
        ns: &Ns,
        label: &str,
        wrapper: &[&str],
        dir: &Path,
        extra: &[&str],
    ) -> Result<SensorRun> {
        let spool = dir.join(format!("{label}-spool"));
        let jsonl = dir.join(format!("{label}.jsonl"));
        let bin = workspace_bin("conduit-sensor");
        let mut args: Vec<String> = wrapper.iter().map(|s| s.to_string()).collect();
        args.extend([
            bin.display().to_string(),
            "run".into(),
            "--spool".into(),
            spool.display().to_string(),
            "--jsonl".into(),
            jsonl.display().to_string(),
            "--sensor-id".into(),
            format!("{label}-gw"),
        ]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        lab.spawn(ns, label, &refs)?;
        lab.wait_for_log(label, "sensor running", Duration::from_secs(30))?;
        Ok(SensorRun {
            label: label.to_string(),
            spool,
            jsonl,
        })
    }

    /// SIGTERM, expect exit 0 (a clean drain), return every JSON record.
    pub fn stop(self, lab: &mut Lab) -> Result<Vec<Value>> {
        let code = lab.stop(
            &self.label,
            nix::sys::signal::Signal::SIGTERM,
            Duration::from_secs(30),
        )?;
        if code != Some(0) {
            let log = fs::read_to_string(lab.log_path(&self.label)).unwrap_or_default();
            bail!("sensor exited with {code:?} after SIGTERM; log:\n{log}");
        }
        read_jsonl(&self.jsonl)
    }
}

/// Named nftables counters of a table, as (packets, bytes).
pub fn nft_counters(
    lab: &Lab,
    ns: &Ns,
    family: &str,
    table: &str,
) -> Result<BTreeMap<String, (u64, u64)>> {
    let out = lab.exec(
        ns,
        &["nft", "-j", "list", "counters", "table", family, table],
    )?;
    let v: Value = serde_json::from_slice(&out.stdout)?;
    let mut counters = BTreeMap::new();
    for item in v["nftables"].as_array().into_iter().flatten() {
        if let Some(c) = item.get("counter") {
            counters.insert(
                c["name"].as_str().unwrap_or_default().to_string(),
                (
                    c["packets"].as_u64().unwrap_or(0),
                    c["bytes"].as_u64().unwrap_or(0),
                ),
            );
        }
    }
    Ok(counters)
}
