//! Kernel program tests with BPF_PROG_TEST_RUN on crafted packets (needs root).
//!
//! XDP test runs see ingress ifindex 1 (loopback). `conduit_xdp` does not check
//! WATCHED_IFACES (it is only ever attached to watched interfaces), so it counts
//! these packets as it would on a real watched interface.
#![expect(clippy::unwrap_used, reason = "tests")]

use etherparse::PacketBuilder;
use sensor_common::{
    Counter, DIR_FORWARD, DIR_REVERSE, EVENT_FLOW_NEW, FAMILY_IPV4, FAMILY_IPV6, FlowKey,
    FlowStats, flow_state, tcp_flags,
};
use sensor_user::kernel::{BootClock, Kernel, KernelEvent, KernelOptions, Program};

const XDP_PASS: u32 = 2;
const TC_ACT_OK: u32 = 0;
const EINVAL: i32 = 22;
const ETH_HLEN: usize = 14;

fn kernel() -> Option<Kernel> {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIP: needs root");
        return None;
    }
    Some(Kernel::load(&KernelOptions::default()).unwrap())
}

const C4: [u8; 4] = [10, 10, 1, 5];
const S4: [u8; 4] = [192, 0, 2, 10];
const C6: [u8; 16] = [0xfd, 0, 0, 0x10, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5];
const S6: [u8; 16] = [0x20, 1, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10];

/// Ethernet header with VLAN tags `(tpid, vid)` in front of `l3`.
fn eth(tags: &[(u16, u16)], ethertype: u16, l3: &[u8]) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2];
    for (tpid, vid) in tags {
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&vid.to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(l3);
    f
}

#[derive(Clone, Copy, Default)]
struct Tcp {
    syn: bool,
    ack: bool,
    fin: bool,
    rst: bool,
    seq: u32,
    ackn: u32,
}

fn v4_tcp(src: [u8; 4], dst: [u8; 4], sp: u16, dp: u16, t: Tcp, payload: &[u8]) -> Vec<u8> {
    let mut b = PacketBuilder::ipv4(src, dst, 64).tcp(sp, dp, t.seq, 1000);
    if t.syn {
        b = b.syn();
    }
    if t.ack {
        b = b.ack(t.ackn);
    }
    if t.fin {
        b = b.fin();
    }
    if t.rst {
        b = b.rst();
    }
    let mut out = Vec::new();
    b.write(&mut out, payload).unwrap();
    out
}

fn v6_udp(src: [u8; 16], dst: [u8; 16], sp: u16, dp: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ipv6(src, dst, 64)
        .udp(sp, dp)
        .write(&mut out, payload)
        .unwrap();
    out
}

fn v6_tcp(src: [u8; 16], dst: [u8; 16], sp: u16, dp: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ipv6(src, dst, 64)
        .tcp(sp, dp, 1, 1000)
        .syn()
        .write(&mut out, payload)
        .unwrap();
    out
}

/// Inserts `opt` (multiple of 4 bytes) as IPv4 options; fixes IHL and total length.
fn with_v4_options(mut ip: Vec<u8>, opt: &[u8]) -> Vec<u8> {
    assert_eq!(opt.len() % 4, 0);
    let ihl = (ip[0] & 0x0f) as usize * 4;
    ip.splice(ihl..ihl, opt.iter().copied());
    ip[0] = 0x40 | ((ihl + opt.len()) / 4) as u8;
    let tot = ip.len() as u16;
    ip[2..4].copy_from_slice(&tot.to_be_bytes());
    ip
}

/// Inserts IPv6 extension headers `(type, total length)` after the fixed header.
/// Fragment headers (44) get `frag_off`.
fn with_v6_ext(mut ip: Vec<u8>, exts: &[(u8, usize)], frag_off: u16) -> Vec<u8> {
    let mut next = ip[6];
    let mut bytes = Vec::new();
    for (i, &(ty, len)) in exts.iter().enumerate().rev() {
        let mut h = vec![0u8; len];
        h[0] = next;
        match ty {
            44 => h[2..4].copy_from_slice(&(frag_off << 3).to_be_bytes()),
            51 => h[1] = (len / 4 - 2) as u8,
            _ => h[1] = (len / 8 - 1) as u8,
        }
        next = ty;
        let _ = i;
        h.extend_from_slice(&bytes);
        bytes = h;
    }
    ip[6] = next;
    ip.splice(40..40, bytes);
    let plen = (ip.len() - 40) as u16;
    ip[4..6].copy_from_slice(&plen.to_be_bytes());
    ip
}

fn counters(k: &Kernel) -> [u64; Counter::COUNT as usize] {
    k.counters().unwrap()
}

/// Runs XDP on `frame`, asserts XDP_PASS, returns the counters that changed.
fn run_xdp(k: &Kernel, frame: &[u8]) -> Vec<(Counter, u64)> {
    let before = counters(k);
    let ret = k.test_run(Program::Xdp, frame).unwrap();
    assert_eq!(ret, XDP_PASS, "XDP must always pass");
    let after = counters(k);
    Counter::ALL
        .iter()
        .filter(|c| after[**c as usize] != before[**c as usize])
        .map(|c| (*c, after[*c as usize] - before[*c as usize]))
        .collect()
}

fn v4key(a: [u8; 4], ap: u16, b: [u8; 4], bp: u16, proto: u8, vlan: u16) -> FlowKey {
    let mut lo = [0u8; 16];
    let mut hi = [0u8; 16];
    let (x, xp, y, yp) = if (a, ap) <= (b, bp) {
        (a, ap, b, bp)
    } else {
        (b, bp, a, ap)
    };
    lo[..4].copy_from_slice(&x);
    hi[..4].copy_from_slice(&y);
    FlowKey {
        addr_lo: lo,
        addr_hi: hi,
        port_lo: xp,
        port_hi: yp,
        vlan,
        protocol: 6,
        family: FAMILY_IPV4,
    }
    .with_proto(proto)
}

trait WithProto {
    fn with_proto(self, p: u8) -> Self;
}
impl WithProto for FlowKey {
    fn with_proto(mut self, p: u8) -> Self {
        self.protocol = p;
        self
    }
}

fn v6key(a: [u8; 16], ap: u16, b: [u8; 16], bp: u16, proto: u8) -> FlowKey {
    let (x, xp, y, yp) = if (a, ap) <= (b, bp) {
        (a, ap, b, bp)
    } else {
        (b, bp, a, ap)
    };
    FlowKey {
        addr_lo: x,
        addr_hi: y,
        port_lo: xp,
        port_hi: yp,
        vlan: 0,
        protocol: proto,
        family: FAMILY_IPV6,
    }
}

fn only(changed: &[(Counter, u64)], c: Counter) {
    let mut want = vec![(Counter::PacketsSeen, 1), (c, 1)];
    want.sort_by_key(|(c, _)| *c as u32);
    assert_eq!(changed, want.as_slice(), "expected only {c:?}");
}

fn counted(changed: &[(Counter, u64)]) {
    only(changed, Counter::PacketsCounted);
}

#[test]
fn header_combinations() {
    let Some(k) = kernel() else { return };
    let syn = Tcp {
        syn: true,
        ..Tcp::default()
    };
    let tcp4 = v4_tcp(C4, S4, 40000, 443, syn, b"");

    // Untagged.
    counted(&run_xdp(&k, &eth(&[], 0x0800, &tcp4)));
    let s = k.flow(&v4key(C4, 40000, S4, 443, 6, 0)).unwrap().unwrap();
    // The initiator's Ethernet source address (the frame's bytes 6..12).
    assert_eq!(s.initiator_mac, [2, 0, 0, 0, 0, 2]);
    // 802.1Q.
    counted(&run_xdp(&k, &eth(&[(0x8100, 101)], 0x0800, &tcp4)));
    assert!(
        k.flow(&v4key(C4, 40000, S4, 443, 6, 101))
            .unwrap()
            .is_some()
    );
    // QinQ: 802.1ad outer + 802.1Q inner; the key carries the outer id.
    counted(&run_xdp(
        &k,
        &eth(&[(0x88a8, 0x2000 | 200), (0x8100, 7)], 0x0800, &tcp4),
    ));
    assert!(
        k.flow(&v4key(C4, 40000, S4, 443, 6, 200))
            .unwrap()
            .is_some()
    );
    // Three tags: too deep.
    only(
        &run_xdp(
            &k,
            &eth(&[(0x88a8, 1), (0x8100, 2), (0x8100, 3)], 0x0800, &tcp4),
        ),
        Counter::ErrVlanTooDeep,
    );
    // IPv4 with options (NOP NOP NOP EOL and a 12-byte record-route-ish block).
    let opt = with_v4_options(
        v4_tcp(C4, S4, 40001, 443, syn, b""),
        &[1, 1, 1, 0, 7, 11, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    );
    counted(&run_xdp(&k, &eth(&[], 0x0800, &opt)));
    let f = k.flow(&v4key(C4, 40001, S4, 443, 6, 0)).unwrap().unwrap();
    assert_eq!(f.bytes[DIR_FORWARD], opt.len() as u64);
    // IHL < 5.
    let mut bad = tcp4.clone();
    bad[0] = 0x44;
    only(
        &run_xdp(&k, &eth(&[], 0x0800, &bad)),
        Counter::ErrIpv4BadHeader,
    );
    // IPv4 non-first fragment.
    let mut frag = tcp4.clone();
    frag[6..8].copy_from_slice(&(0x0010u16).to_be_bytes());
    only(&run_xdp(&k, &eth(&[], 0x0800, &frag)), Counter::IpFragment);
    // IPv4 first fragment (MF, offset 0) has the L4 header: counted.
    let mut first = v4_tcp(C4, S4, 40009, 443, syn, b"");
    first[6] = 0x20;
    counted(&run_xdp(&k, &eth(&[], 0x0800, &first)));

    // IPv6 UDP, TCP, with extension chains.
    let udp6 = v6_udp(C6, S6, 5353, 53, b"hello");
    counted(&run_xdp(&k, &eth(&[], 0x86dd, &udp6)));
    let f = k.flow(&v6key(C6, 5353, S6, 53, 17)).unwrap().unwrap();
    assert_eq!(f.bytes[DIR_FORWARD], 40 + 8 + 5);
    let chain = with_v6_ext(
        v6_tcp(C6, S6, 40002, 443, b""),
        &[(0, 8), (60, 16), (43, 24), (51, 16), (44, 8)],
        0,
    );
    counted(&run_xdp(&k, &eth(&[], 0x86dd, &chain)));
    let f = k.flow(&v6key(C6, 40002, S6, 443, 6)).unwrap().unwrap();
    assert_eq!(f.bytes[DIR_FORWARD], chain.len() as u64);
    assert_eq!(f.tcp_flags[DIR_FORWARD], tcp_flags::SYN);
    // Six extension headers: the bound.
    let six = with_v6_ext(
        v6_udp(C6, S6, 40003, 443, b"x"),
        &[(0, 8), (60, 8), (43, 8), (60, 8), (51, 16), (44, 8)],
        0,
    );
    counted(&run_xdp(&k, &eth(&[], 0x86dd, &six)));
    // Seven: too deep.
    let seven = with_v6_ext(
        v6_udp(C6, S6, 40004, 443, b"x"),
        &[
            (0, 8),
            (60, 8),
            (43, 8),
            (60, 8),
            (43, 8),
            (51, 16),
            (44, 8),
        ],
        0,
    );
    only(
        &run_xdp(&k, &eth(&[], 0x86dd, &seven)),
        Counter::ErrIpv6ExtTooDeep,
    );
    // IPv6 non-first fragment.
    let frag6 = with_v6_ext(v6_udp(C6, S6, 40005, 443, b"x"), &[(44, 8)], 100);
    only(&run_xdp(&k, &eth(&[], 0x86dd, &frag6)), Counter::IpFragment);

    // ICMP: IP but not TCP/UDP.
    let mut icmp = Vec::new();
    PacketBuilder::ipv4(C4, S4, 64)
        .icmpv4_echo_request(1, 1)
        .write(&mut icmp, b"ping")
        .unwrap();
    only(&run_xdp(&k, &eth(&[], 0x0800, &icmp)), Counter::NonTcpUdp);
    // ARP.
    only(&run_xdp(&k, &eth(&[], 0x0806, &[0u8; 28])), Counter::NonIp);
    // ARP behind a VLAN tag.
    only(
        &run_xdp(&k, &eth(&[(0x8100, 5)], 0x0806, &[0u8; 28])),
        Counter::NonIp,
    );
}

/// Runs every prefix of `frame`; prefixes shorter than `hdr_end` must bump exactly
/// one parse-error counter, longer ones are counted.
fn truncations(k: &Kernel, frame: &[u8], hdr_end: usize, expect: impl Fn(usize) -> Counter) {
    for len in 0..=frame.len() {
        let before = counters(k);
        match k.test_run(Program::Xdp, &frame[..len]) {
            Ok(ret) => assert_eq!(ret, XDP_PASS, "len {len}"),
            Err(e) => {
                // Newer kernels refuse test-run frames shorter than an Ethernet header.
                assert!(len < ETH_HLEN, "len {len}: {e}");
                let src = std::error::Error::source(&e).map(|s| s.to_string());
                assert!(
                    src.as_deref().unwrap_or("").contains(&EINVAL.to_string())
                        || e.to_string().contains("nvalid")
                        || len < ETH_HLEN,
                    "len {len}: {e}"
                );
                continue;
            }
        }
        let after = counters(k);
        let changed: Vec<_> = Counter::ALL
            .iter()
            .filter(|c| after[**c as usize] != before[**c as usize])
            .map(|c| (*c, after[*c as usize] - before[*c as usize]))
            .collect();
        if len < ETH_HLEN {
            // Kernels before 5.18 (5.10 here) check the XDP test-run buffer's size,
            // not the frame's, against ETH_HLEN, and run shorter frames: not even the
            // Ethernet header is there.
            only(&changed, Counter::ErrEthTruncated);
        } else if len < hdr_end {
            only(&changed, expect(len));
        } else {
            counted(&changed);
        }
    }
}

#[test]
fn truncation_tcp_ipv4() {
    let Some(k) = kernel() else { return };
    let t = Tcp {
        syn: true,
        ..Tcp::default()
    };
    let frame = eth(
        &[(0x8100, 9)],
        0x0800,
        &with_v4_options(v4_tcp(C4, S4, 1234, 80, t, b"payload"), &[1, 1, 1, 0]),
    );
    // eth 14 + vlan 4 + ipv4 24 + tcp 20.
    truncations(&k, &frame, 14 + 4 + 24 + 20, |len| match len {
        0..=17 => Counter::ErrVlanTruncated,
        18..=41 => Counter::ErrIpv4Truncated,
        _ => Counter::ErrL4Truncated,
    });
}

#[test]
fn truncation_udp_ipv6() {
    let Some(k) = kernel() else { return };
    let frame = eth(
        &[],
        0x86dd,
        &with_v6_ext(v6_udp(C6, S6, 1234, 443, b"quic"), &[(0, 8), (44, 8)], 0),
    );
    // eth 14 + ipv6 40 + hop-by-hop 8 + fragment 8 + udp 8.
    truncations(&k, &frame, 14 + 40 + 16 + 8, |len| match len {
        0..=53 => Counter::ErrIpv6Truncated,
        54..=69 => Counter::ErrIpv6ExtTruncated,
        _ => Counter::ErrL4Truncated,
    });
}

fn ev_kinds(k: &mut Kernel) -> Vec<(u8, FlowKey)> {
    k.drain_events()
        .into_iter()
        .filter_map(|e| match e {
            KernelEvent::Flow(f) => Some((f.header.kind, f.header.key)),
            KernelEvent::Payload(_) | KernelEvent::Dns(_) => None,
        })
        .collect()
}

/// A full TCP conversation in both directions: normalisation, per-direction
/// counts, flags, initiator, end detection, events.
#[test]
fn tcp_conversation() {
    let Some(mut k) = kernel() else { return };
    // The client is the numerically *higher* side, so forward = hi -> lo.
    let cli = [198, 51, 100, 7];
    let srv = [10, 0, 0, 1];
    let key = v4key(cli, 50000, srv, 443, 6, 0);
    let c2s = |t: Tcp, p: &[u8]| eth(&[], 0x0800, &v4_tcp(cli, srv, 50000, 443, t, p));
    let s2c = |t: Tcp, p: &[u8]| eth(&[], 0x0800, &v4_tcp(srv, cli, 443, 50000, t, p));
    let frames = [
        (
            c2s(
                Tcp {
                    syn: true,
                    ..Tcp::default()
                },
                b"",
            ),
            DIR_FORWARD,
        ),
        (
            s2c(
                Tcp {
                    syn: true,
                    ack: true,
                    ..Tcp::default()
                },
                b"",
            ),
            DIR_REVERSE,
        ),
        (
            c2s(
                Tcp {
                    ack: true,
                    ..Tcp::default()
                },
                b"hello",
            ),
            DIR_FORWARD,
        ),
        (
            s2c(
                Tcp {
                    ack: true,
                    ..Tcp::default()
                },
                b"world!",
            ),
            DIR_REVERSE,
        ),
        (
            c2s(
                Tcp {
                    fin: true,
                    ack: true,
                    ..Tcp::default()
                },
                b"",
            ),
            DIR_FORWARD,
        ),
    ];
    let mut want = FlowStats::default();
    for (f, dir) in &frames {
        counted(&run_xdp(&k, f));
        want.packets[*dir] += 1;
        want.bytes[*dir] += (f.len() - 14) as u64;
    }
    let s = k.flow(&key).unwrap().unwrap();
    assert_eq!(s.packets, want.packets);
    assert_eq!(s.bytes, want.bytes);
    assert_eq!(s.initiator_is_lo, 0, "client is the hi side");
    assert_eq!(
        s.tcp_flags[DIR_FORWARD],
        tcp_flags::SYN | tcp_flags::ACK | tcp_flags::FIN
    );
    assert_eq!(s.tcp_flags[DIR_REVERSE], tcp_flags::SYN | tcp_flags::ACK);
    assert_eq!(s.state, flow_state::FIN_FORWARD);
    assert_eq!(s.ifindex, 1);
    assert!(s.first_seen_ns > 0 && s.last_seen_ns >= s.first_seen_ns);
    // Boot-clock timestamps at tick resolution (coarse clock + agent offset).
    let now = BootClock::boot_now_ns();
    assert!(s.last_seen_ns <= now + 20_000_000 && s.first_seen_ns + 10_000_000_000 > now);
    assert_eq!(ev_kinds(&mut k), vec![(EVENT_FLOW_NEW, key)]);

    // Second FIN ends the flow: the state says so; no event (the agent's sweep
    // ends flows).
    let fin_back = s2c(
        Tcp {
            fin: true,
            ack: true,
            ..Tcp::default()
        },
        b"",
    );
    counted(&run_xdp(&k, &fin_back));
    counted(&run_xdp(&k, &fin_back));
    let s = k.flow(&key).unwrap().unwrap();
    assert_eq!(s.state, flow_state::FIN_FORWARD | flow_state::FIN_REVERSE);
    assert_eq!(ev_kinds(&mut k), vec![]);
}

/// A flow whose first packet we see is the SYN-ACK: the initiator is its destination.
#[test]
fn synack_first_and_rst() {
    let Some(mut k) = kernel() else { return };
    let cli = [10, 0, 0, 9];
    let srv = [10, 0, 0, 200];
    let key = v4key(cli, 40000, srv, 22, 6, 0);
    let synack = Tcp {
        syn: true,
        ack: true,
        ..Tcp::default()
    };
    counted(&run_xdp(
        &k,
        &eth(&[], 0x0800, &v4_tcp(srv, cli, 22, 40000, synack, b"")),
    ));
    let s = k.flow(&key).unwrap().unwrap();
    assert_eq!(s.initiator_is_lo, 1, "client 10.0.0.9 is lo and initiated");
    assert_eq!(s.packets, [0, 1]);
    // The responder's frame is not the initiator's address.
    assert_eq!(s.initiator_mac, [0; 6]);
    let rst = Tcp {
        rst: true,
        ..Tcp::default()
    };
    counted(&run_xdp(
        &k,
        &eth(&[], 0x0800, &v4_tcp(cli, srv, 40000, 22, rst, b"")),
    ));
    let s = k.flow(&key).unwrap().unwrap();
    assert_eq!(s.packets, [1, 1]);
    assert_eq!(s.state, flow_state::RST);
    assert_eq!(ev_kinds(&mut k), vec![(EVENT_FLOW_NEW, key)]);
    k.remove_flow(&key).unwrap();
    assert!(k.flow(&key).unwrap().is_none());
    assert_eq!(k.flow_entries().unwrap().len(), 0);
}

/// `struct __sk_buff` for TC test runs: ingress_ifindex at 36, gso_segs at 164.
fn skb_ctx(ingress_ifindex: u32, gso_segs: u32) -> Vec<u8> {
    let mut c = vec![0u8; 192];
    c[36..40].copy_from_slice(&ingress_ifindex.to_ne_bytes());
    c[164..168].copy_from_slice(&gso_segs.to_ne_bytes());
    c
}

fn run_tc(k: &Kernel, frame: &[u8], ingress_ifindex: u32, gso_segs: u32) -> Vec<(Counter, u64)> {
    let before = counters(k);
    let ctx = skb_ctx(ingress_ifindex, gso_segs);
    let r = k.test_run_opts(Program::Tc, frame, 1, Some(&ctx)).unwrap();
    assert_eq!(r.return_value, TC_ACT_OK);
    let after = counters(k);
    Counter::ALL
        .iter()
        .filter(|c| after[**c as usize] != before[**c as usize])
        .map(|c| (*c, after[*c as usize] - before[*c as usize]))
        .collect()
}

/// Whether this kernel's TC test runs take `ingress_ifindex` from the context. Older
/// kernels (5.10 here) accept only some `__sk_buff` fields in a test run's context
/// (mark, priority, ifindex, cb, tstamp, wire_len, gso_segs, gso_size) and refuse
/// any other with EINVAL, so a test run cannot show the program a packet that
/// arrived on an interface. Probed with a context that differs from an accepted one
/// only in that field.
fn tc_ctx_takes_ingress_ifindex(k: &Kernel) -> bool {
    let frame = eth(&[], 0x0806, &[0u8; 28]);
    k.test_run_opts(Program::Tc, &frame, 1, Some(&skb_ctx(0, 0)))
        .expect("a TC test run with a zero context");
    match k.test_run_opts(Program::Tc, &frame, 1, Some(&skb_ctx(1, 0))) {
        Ok(_) => true,
        Err(e) => {
            assert!(
                format!("{e:?}").contains(&format!("code: {EINVAL}")),
                "ingress_ifindex in a TC test-run context: {e:?}"
            );
            false
        }
    }
}

/// TC egress counts locally generated and non-watched-ingress packets, skips what
/// XDP counted, and counts GSO aggregates as their segments.
#[test]
fn tc_egress_counting() {
    let Some(mut k) = kernel() else { return };
    k.watch_ifindex(1).unwrap();
    let with_ingress = tc_ctx_takes_ingress_ifindex(&k);
    let t = Tcp {
        ack: true,
        ..Tcp::default()
    };
    let ip = v4_tcp(S4, C4, 443, 40000, t, &[0u8; 1000]);
    let frame = eth(&[], 0x0800, &ip);
    let key = v4key(C4, 40000, S4, 443, 6, 0);
    // Locally generated (ingress_ifindex 0).
    counted(&run_tc(&k, &frame, 0, 0));
    // From a non-watched interface (e.g. the uplink), as a 4-segment GSO aggregate;
    // where the context cannot carry an ingress interface, locally generated.
    let other = if with_ingress {
        // From a watched interface: XDP counted it already.
        only(&run_tc(&k, &frame, 1, 0), Counter::SkippedAlreadyCounted);
        77
    } else {
        println!(
            "this kernel's TC test runs take no ingress_ifindex: \
             the watched-ingress skip is not checked here"
        );
        0
    };
    let changed = run_tc(&k, &frame, other, 4);
    assert_eq!(
        changed,
        vec![(Counter::PacketsSeen, 1), (Counter::PacketsCounted, 4)]
    );
    let s = k.flow(&key).unwrap().unwrap();
    assert_eq!(s.packets.iter().sum::<u64>(), 5);
    // 20 IP + 20 TCP header bytes per extra segment.
    assert_eq!(s.bytes.iter().sum::<u64>(), ip.len() as u64 * 2 + 3 * 40);
}

/// Masqueraded return traffic: XDP sees it addressed to the gateway and hands it
/// off; TC egress sees it de-NATed (addressed to the OT host) and counts it.
#[test]
fn handoff_local_to_egress() {
    let Some(mut k) = kernel() else { return };
    // The handoff map is per CPU: keep XDP and TC runs on one CPU.
    // SAFETY: plain syscall on the current thread with a zeroed, then filled, cpu set.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
    }
    k.watch_ifindex(1).unwrap();
    let with_ingress = tc_ctx_takes_ingress_ifindex(&k);
    let gw = [203, 0, 113, 1];
    k.set_local_addrs(&[std::net::IpAddr::from(gw)]).unwrap();
    let t = Tcp {
        ack: true,
        seq: 1111,
        ackn: 2222,
        ..Tcp::default()
    };
    // Forward: OT host -> cloud, counted by XDP (not local).
    counted(&run_xdp(
        &k,
        &eth(
            &[],
            0x0800,
            &v4_tcp(C4, S4, 40000, 443, Tcp { ack: true, ..t }, b"q"),
        ),
    ));
    // Return on the uplink: cloud -> gateway (masqueraded port 61000).
    only(
        &run_xdp(&k, &eth(&[], 0x0800, &v4_tcp(S4, gw, 443, 61000, t, b"a"))),
        Counter::HandedOffLocal,
    );
    assert!(k.flow(&v4key(S4, 443, gw, 61000, 6, 0)).unwrap().is_none());
    if !with_ingress {
        println!(
            "this kernel's TC test runs take no ingress_ifindex: \
             the egress half of the handoff is not checked here"
        );
        return;
    }
    // De-NATed on the OT interface egress, arrived from a watched interface.
    let back = eth(&[], 0x0800, &v4_tcp(S4, C4, 443, 40000, t, b"a"));
    counted(&run_tc(&k, &back, 1, 0));
    // A second copy is not in the handoff map any more: skipped.
    only(&run_tc(&k, &back, 1, 0), Counter::SkippedAlreadyCounted);
    let s = k.flow(&v4key(C4, 40000, S4, 443, 6, 0)).unwrap().unwrap();
    assert_eq!(s.packets, [1, 1]);
}

/// A full ring loses new-flow announcements: each is counted once and its flow is
/// marked UNANNOUNCED, so the agent can recover it from the table. The tables are
/// sized at load time.
#[test]
fn full_ring_marks_new_flows_unannounced() {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIP: needs root");
        return;
    }
    let mut k = Kernel::load(&KernelOptions {
        flow_table_size: 1024,
        ringbuf_bytes: 4096,
        ..KernelOptions::default()
    })
    .unwrap();
    let syn = Tcp {
        syn: true,
        ..Tcp::default()
    };
    let flows = 100u16;
    for sp in 0..flows {
        let f = eth(
            &[],
            0x0800,
            &v4_tcp(C4, [10, 0, 0, 200], 30000 + sp, 80, syn, b""),
        );
        k.test_run(Program::Xdp, &f).unwrap();
    }
    let announced = ev_kinds(&mut k).len() as u64;
    let lost = counters(&k)[Counter::LossNewFlowEvent as usize];
    assert!(
        announced > 0 && lost > 0,
        "{announced} announced, {lost} lost"
    );
    assert_eq!(announced + lost, u64::from(flows));
    let unannounced = k
        .flow_entries()
        .unwrap()
        .iter()
        .filter(|(_, s)| s.state & flow_state::UNANNOUNCED != 0)
        .count() as u64;
    assert_eq!(unannounced, lost);
}
