//! Fail-open after a crash (needs root): an agent killed with SIGKILL leaves
//! nothing that can drop traffic. XDP (a bpf_link) goes with the process; on
//! kernels without TCX (before 6.6) the TC egress filter stays, always passes, and
//! is removed by the next start or by `conduit-sensor detach`.
#![expect(clippy::unwrap_used, reason = "tests")]

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

const IFACE: &str = "cskf0";
const PEER: &str = "cskf1";

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_conduit-sensor"))
}

fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Veth;

impl Veth {
    fn new() -> Veth {
        let _ = Command::new("ip").args(["link", "del", IFACE]).status();
        let ok = Command::new("ip")
            .args(["link", "add", IFACE, "type", "veth", "peer", "name", PEER])
            .status()
            .unwrap()
            .success();
        assert!(ok, "ip link add {IFACE}");
        for dev in [IFACE, PEER] {
            Command::new("ip")
                .args(["link", "set", dev, "up"])
                .status()
                .unwrap();
        }
        Veth
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", IFACE]).status();
    }
}

/// XDP program on the interface (`ip link` shows `prog/xdp`).
fn has_xdp() -> bool {
    sh(&["ip", "-d", "link", "show", IFACE]).contains("prog/xdp")
}

/// The sensor's TC egress filters (netlink) on the interface.
fn tc_filters() -> usize {
    sh(&["tc", "filter", "show", "dev", IFACE, "egress"])
        .lines()
        .filter(|l| l.contains("conduit_tc"))
        .count()
}

fn wait_for(what: &str, deadline: Duration, log: &std::path::Path, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < deadline,
            "timed out waiting for {what}; agent log:\n{}",
            agent_log(log)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts the agent on IFACE, its log in `log`.
fn start_agent(spool: &std::path::Path, log: &std::path::Path) -> Child {
    bin()
        // VMs have no host name: give the sensor an id.
        .args([
            "run",
            "--sensor-id",
            "failopen-test",
            "--iface",
            IFACE,
            "--spool",
        ])
        .arg(spool)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

fn agent_log(log: &std::path::Path) -> String {
    std::fs::read_to_string(log).unwrap_or_default()
}

/// Whether the agent logged `n` completed attachments (XDP and TC both in place).
fn attached(log: &std::path::Path, n: usize) -> bool {
    agent_log(log).matches(" attached iface=").count() >= n
}

fn kill9(mut child: Child) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    child.wait().unwrap();
}

/// Netlink kernels (no TCX) show the agent's egress filter in `tc filter show`;
/// TCX kernels show none, and nothing outlives the agent there.
#[test]
fn an_agent_killed_with_sigkill_leaves_nothing_that_drops() {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIP: needs root");
        return;
    }
    let _veth = Veth::new();
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let log = dir.path().join("agent.log");

    let agent = start_agent(&spool, &log);
    // Loading takes tens of seconds under TCG (the 5.10 VM verifies the bounded
    // classifiers slowly).
    let load = Duration::from_secs(300);
    wait_for("the agent to attach", load, &log, || attached(&log, 1));
    let netlink = tc_filters();
    assert!(netlink <= 1, "one TC filter at most, found {netlink}");
    kill9(agent);

    // The XDP link closed with the process: nothing left can drop a packet.
    wait_for(
        "XDP to go with the process",
        Duration::from_secs(10),
        &log,
        || !has_xdp(),
    );
    // What is left (netlink kernels) is the egress filter, which passes every packet.
    assert_eq!(tc_filters(), netlink, "the TC filter outlives the process");

    // A restart replaces the stale filter instead of stacking a second one.
    let agent = start_agent(&spool, &log);
    wait_for("the restarted agent to attach", load, &log, || {
        attached(&log, 1)
    });
    assert!(has_xdp());
    let text = agent_log(&log);
    assert_eq!(tc_filters(), netlink, "stale filter kept on start: {text}");
    if netlink == 1 {
        assert!(text.contains("removed a stale attachment"), "{text}");
    }
    kill9(agent);
    wait_for("XDP to go again", Duration::from_secs(10), &log, || {
        !has_xdp()
    });

    // The operator's cleanup.
    let out = bin().args(["detach", "--iface", IFACE]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "detach: {out:?}");
    assert_eq!(tc_filters(), 0, "detach left a filter: {text}");
    if netlink == 1 {
        assert!(text.contains("removed"), "{text}");
    } else {
        assert!(text.contains("nothing"), "{text}");
    }
    // Again: nothing to do, still exit 0.
    let out = bin().args(["detach", "--iface", IFACE]).output().unwrap();
    assert!(out.status.success(), "second detach: {out:?}");
}

#[test]
fn detach_of_a_missing_interface_exits_2() {
    let out = bin().args(["detach", "--iface", "nope0"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}
