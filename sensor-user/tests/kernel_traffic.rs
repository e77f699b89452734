//! Real traffic through an attached veth (needs root; creates and removes its own
//! network namespace). The host side sends (TC egress, locally generated, GSO
//! aggregates) and receives (XDP ingress); both directions must land in one flow.
#![expect(clippy::unwrap_used, reason = "tests")]

use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, TcpStream},
    process::{Child, Command},
    thread::sleep,
    time::{Duration, Instant},
};

use sensor_common::{DIR_FORWARD, DIR_REVERSE, FAMILY_IPV4, FlowKey, flow_state};
use sensor_user::kernel::{Kernel, KernelOptions};

const NS: &str = "csktns";
const HOST_IF: &str = "csktv0";
const PEER_IF: &str = "csktv1";

/// `d` multiplied by `CONDUIT_TEST_TIMEOUT_SCALE` (default 1): the kernel matrix sets
/// it in its TCG VMs, where Python starts and the programs load many times slower.
fn scaled(d: Duration) -> Duration {
    let scale = std::env::var("CONDUIT_TEST_TIMEOUT_SCALE")
        .ok()
        .and_then(|v| v.trim().parse::<u32>().ok())
        .unwrap_or(1)
        .max(1);
    d * scale
}

fn ip(args: &[&str]) {
    let ok = Command::new("ip").args(args).status().unwrap().success();
    assert!(ok, "ip {args:?}");
}

struct Net(Option<Child>);

impl Net {
    fn new() -> Net {
        let _ = Command::new("ip").args(["netns", "del", NS]).status();
        let _ = Command::new("ip").args(["link", "del", HOST_IF]).status();
        ip(&["netns", "add", NS]);
        ip(&[
            "link", "add", HOST_IF, "type", "veth", "peer", "name", PEER_IF,
        ]);
        ip(&["link", "set", PEER_IF, "netns", NS]);
        ip(&["addr", "add", "10.213.0.1/30", "dev", HOST_IF]);
        ip(&["link", "set", HOST_IF, "up"]);
        ip(&["-n", NS, "addr", "add", "10.213.0.2/30", "dev", PEER_IF]);
        ip(&["-n", NS, "link", "set", PEER_IF, "up"]);
        ip(&["-n", NS, "link", "set", "lo", "up"]);
        Net(None)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip").args(["link", "del", HOST_IF]).status();
        let _ = Command::new("ip").args(["netns", "del", NS]).status();
    }
}

#[test]
fn tcp_both_directions_counted_once() {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIP: needs root");
        return;
    }
    let mut net = Net::new();
    // Server in the namespace: read everything, then send 1 MiB back and close.
    let server = r"
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('10.213.0.2', 18080))
s.listen(1)
c, _ = s.accept()
while c.recv(65536):
    pass
c.sendall(b'y' * (1 << 20))
c.close()
";
    net.0 = Some(
        Command::new("ip")
            .args(["netns", "exec", NS, "python3", "-c", server])
            .spawn()
            .unwrap(),
    );
    let mut k = Kernel::load(&KernelOptions::default()).unwrap();
    k.attach(HOST_IF).unwrap();

    // Until the server listens (Python starts slowly in a TCG VM).
    let deadline = Instant::now() + scaled(Duration::from_secs(15));
    let mut conn = None;
    while Instant::now() < deadline {
        match TcpStream::connect("10.213.0.2:18080") {
            Ok(c) => {
                conn = Some(c);
                break;
            }
            Err(_) => sleep(Duration::from_millis(100)),
        }
    }
    let Some(mut c) = conn else {
        panic!(
            "connect to the namespace server; counters {:?}",
            k.counters().unwrap()
        );
    };
    let cport = c.local_addr().unwrap().port();
    c.write_all(&vec![b'x'; 256 * 1024]).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut back = Vec::new();
    c.read_to_end(&mut back).unwrap();
    assert_eq!(back.len(), 1 << 20);
    drop(c);

    let mut lo = [0u8; 16];
    let mut hi = [0u8; 16];
    lo[..4].copy_from_slice(&[10, 213, 0, 1]);
    hi[..4].copy_from_slice(&[10, 213, 0, 2]);
    let key = FlowKey {
        addr_lo: lo,
        addr_hi: hi,
        port_lo: cport,
        port_hi: 18080,
        vlan: 0,
        protocol: 6,
        family: FAMILY_IPV4,
    };
    // Both FINs went through the programs before read_to_end returned (XDP runs
    // before the stack, TC egress in the sender's context); wait for the table to
    // show them, with a deadline.
    let both_fins = flow_state::FIN_FORWARD | flow_state::FIN_REVERSE;
    let deadline = Instant::now() + scaled(Duration::from_secs(5));
    let s = loop {
        let s = k.flow(&key).unwrap().expect("flow in the table");
        if s.state & both_fins == both_fins || Instant::now() >= deadline {
            break s;
        }
        sleep(Duration::from_millis(20));
    };
    println!("{s:?}");
    assert_eq!(s.initiator_is_lo, 1);
    // Sent 256 KiB (+ headers), received 1 MiB (+ headers); GSO aggregates are
    // counted per segment, so bytes stay close to the wire total.
    let fwd = s.bytes[DIR_FORWARD];
    let rev = s.bytes[DIR_REVERSE];
    assert!(
        (256 * 1024..256 * 1024 * 11 / 10).contains(&fwd),
        "fwd {fwd}"
    );
    assert!(((1 << 20)..(1 << 20) * 11 / 10).contains(&rev), "rev {rev}");
    assert!(s.packets[DIR_FORWARD] >= 256 * 1024 / 65536);
    assert!(s.packets[DIR_REVERSE] >= (1 << 20) / 65536);
    assert_eq!(
        s.state & (flow_state::FIN_FORWARD | flow_state::FIN_REVERSE),
        flow_state::FIN_FORWARD | flow_state::FIN_REVERSE
    );
}
