//! One verdict, decided once: random conduit maps and flows go through the kernel
//! program (BPF_PROG_TEST_RUN) and through the agent's classifier
//! (`ConduitMap::classify`); zone, endpoint, conduit and verdict must agree
//! (needs root).
//!
//! Maps draw VLAN-scoped and any-VLAN zones over shared and nested networks,
//! exact and `*.suffix` SNI patterns (inner-`*` patterns are the agent's alone by
//! design), endpoint CIDRs, conduits with and without `ports:`, overlapping port
//! ranges, every protocol set and action. Flows are TCP SYNs and UDP datagrams
//! (classified by address) and ClientHellos (classified by SNI), IPv4 and IPv6,
//! untagged and tagged.
#![expect(clippy::unwrap_used, reason = "tests")]

mod common;

use std::net::IpAddr;

use common::{client_hello, sni_ext};
use etherparse::PacketBuilder;
use proptest::{
    prelude::*,
    test_runner::{Config, TestCaseError, TestRunner},
};
use sensor_common::{FAMILY_IPV4, FAMILY_IPV6, FlowKey, Verdict};
use sensor_user::{
    config::{AppProto, ConduitMap},
    kernel::{Kernel, Program},
    kernel_policy::kernel_policy,
};

const ZONE_NETS: &[&str] = &[
    "10.0.0.0/24",
    "10.0.1.0/24",
    "10.0.0.0/16",
    "10.1.0.0/16",
    "fd00:1::/64",
    "fd00::/16",
];
const VLAN_SETS: &[&[u16]] = &[&[], &[101], &[102], &[101, 102]];
const SNI_PATTERNS: &[&str] = &[
    "api.openai.com",
    "*.openai.com",
    "*.azure.com",
    "x.openai.azure.com",
    "*.openai.azure.com",
    "claude.ai",
];
const ENDPOINT_NETS: &[&str] = &[
    "192.0.2.0/24",
    "192.0.2.128/25",
    "198.51.100.0/24",
    "2001:db8::/32",
    "2001:db8:1::/48",
];
const PORTS: &[&str] = &["443", "8443", "\"440-450\"", "\"1-1000\"", "\"8000-9000\""];
const PROTOS: &[&str] = &["", "[tls]", "[quic]", "[tls, quic]"];
const ACTIONS: &[&str] = &["allow", "alert", "block"];

const SRC_V4: &[[u8; 4]] = &[[10, 0, 0, 5], [10, 0, 1, 7], [10, 1, 2, 3], [10, 2, 0, 1]];
const SRC_V6: &[&str] = &["fd00:1::5", "fd00:2::1", "fd01::1"];
const DST_V4: &[[u8; 4]] = &[
    [192, 0, 2, 10],
    [192, 0, 2, 200],
    [198, 51, 100, 1],
    [203, 0, 113, 5],
];
const DST_V6: &[&str] = &["2001:db8::1", "2001:db8:1::1", "2001:db9::1"];
const VLANS: &[u16] = &[0, 101, 102, 200];
const DPORTS: &[u16] = &[443, 445, 8443, 80, 1000, 1001, 8500, 1];
const NAMES: &[&str] = &[
    "api.openai.com",
    "a.openai.com",
    "b.x.openai.com",
    "openai.com",
    "foo.azure.com",
    "x.openai.azure.com",
    "y.openai.azure.com",
    "CLAUDE.ai.",
    "example.org",
];

#[derive(Debug, Clone)]
struct ZoneSpec {
    nets: Vec<usize>,
    vlans: usize,
}

#[derive(Debug, Clone)]
struct EndpointSpec {
    sni: Vec<usize>,
    nets: Vec<usize>,
}

#[derive(Debug, Clone)]
struct ConduitSpec {
    from: usize,
    to: usize,
    ports: Option<Vec<usize>>,
    protos: usize,
    action: usize,
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Syn,
    Udp,
    Hello(usize),
}

#[derive(Debug, Clone)]
struct FlowSpec {
    v6: bool,
    src: usize,
    vlan: usize,
    dst: usize,
    dport: usize,
    kind: Kind,
}

#[derive(Debug, Clone)]
struct Case {
    zones: Vec<ZoneSpec>,
    endpoints: Vec<EndpointSpec>,
    conduits: Vec<ConduitSpec>,
    block_by_default: bool,
    enforce: bool,
    flows: Vec<FlowSpec>,
}

fn case() -> impl Strategy<Value = Case> {
    let zone = (
        prop::collection::vec(0..ZONE_NETS.len(), 1..3),
        0..VLAN_SETS.len(),
    )
        .prop_map(|(nets, vlans)| ZoneSpec { nets, vlans });
    let endpoint = (
        prop::collection::vec(0..SNI_PATTERNS.len(), 0..3),
        prop::collection::vec(0..ENDPOINT_NETS.len(), 0..2),
    )
        .prop_map(|(sni, nets)| EndpointSpec { sni, nets });
    let conduit = (
        0..4usize,
        0..4usize,
        prop::option::of(prop::collection::vec(0..PORTS.len(), 1..3)),
        0..PROTOS.len(),
        0..ACTIONS.len(),
    )
        .prop_map(|(from, to, ports, protos, action)| ConduitSpec {
            from,
            to,
            ports,
            protos,
            action,
        });
    let kind = prop_oneof![
        Just(Kind::Syn),
        Just(Kind::Udp),
        (0..NAMES.len()).prop_map(Kind::Hello),
    ];
    let flow = (
        any::<bool>(),
        0..8usize,
        0..VLANS.len(),
        0..8usize,
        0..DPORTS.len(),
        kind,
    )
        .prop_map(|(v6, src, vlan, dst, dport, kind)| FlowSpec {
            v6,
            src,
            vlan,
            dst,
            dport,
            kind,
        });
    (
        prop::collection::vec(zone, 1..4),
        prop::collection::vec(endpoint, 1..4),
        prop::collection::vec(conduit, 0..5),
        any::<bool>(),
        any::<bool>(),
        prop::collection::vec(flow, 1..10),
    )
        .prop_map(
            |(zones, endpoints, conduits, block_by_default, enforce, flows)| Case {
                zones,
                endpoints,
                conduits,
                block_by_default,
                enforce,
                flows,
            },
        )
}

/// The case's conduit map as YAML. Networks and patterns the loader would reject
/// (overlapping zones on shared VLANs, a pattern or network in two endpoints) are
/// left out, so every case is a valid map.
fn yaml(c: &Case) -> String {
    let mut out = format!(
        "version: 1\nsite: prop\ndefault_action: {}\nzones:\n",
        if c.block_by_default { "block" } else { "alert" }
    );
    let mut kept: Vec<(ipnet::IpNet, &[u16])> = Vec::new();
    let mut zones = 0;
    for z in &c.zones {
        let vlans = VLAN_SETS[z.vlans];
        let mut nets = Vec::new();
        for &n in &z.nets {
            let net: ipnet::IpNet = ZONE_NETS[n].parse().unwrap();
            let clash = kept.iter().any(|(k, kv)| {
                let meet =
                    kv.is_empty() || vlans.is_empty() || kv.iter().any(|v| vlans.contains(v));
                meet && (k.contains(&net.network()) || net.contains(&k.network()))
            });
            if !clash && !nets.contains(&net) {
                nets.push(net);
            }
        }
        if nets.is_empty() {
            continue;
        }
        kept.extend(nets.iter().map(|n| (*n, vlans)));
        let nets: Vec<String> = nets.iter().map(|n| format!("\"{n}\"")).collect();
        out += &format!("  - id: z{zones}\n    networks: [{}]\n", nets.join(", "));
        if !vlans.is_empty() {
            out += &format!("    vlans: {vlans:?}\n");
        }
        zones += 1;
    }
    out += "endpoints:\n";
    let (mut used_sni, mut used_nets) = (Vec::new(), Vec::new());
    let mut endpoints = 0;
    for e in &c.endpoints {
        let sni: Vec<&str> = e
            .sni
            .iter()
            .map(|&i| SNI_PATTERNS[i])
            .filter(|p| !used_sni.contains(p))
            .collect();
        let mut sni_dedup: Vec<&str> = Vec::new();
        for p in sni {
            if !sni_dedup.contains(&p) {
                sni_dedup.push(p);
            }
        }
        let mut nets: Vec<&str> = Vec::new();
        for &i in &e.nets {
            let n = ENDPOINT_NETS[i];
            if !used_nets.contains(&n) && !nets.contains(&n) {
                nets.push(n);
            }
        }
        if sni_dedup.is_empty() && nets.is_empty() {
            continue;
        }
        used_sni.extend(&sni_dedup);
        used_nets.extend(&nets);
        let q = |v: &[&str]| {
            v.iter()
                .map(|s| format!("\"{s}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        out += &format!(
            "  - id: e{endpoints}\n    sni: [{}]\n    networks: [{}]\n",
            q(&sni_dedup),
            q(&nets)
        );
        endpoints += 1;
    }
    if endpoints == 0 {
        out += "  []\n";
    }
    out += "conduits:\n";
    let mut conduits = 0;
    if endpoints > 0 {
        for (i, cd) in c.conduits.iter().enumerate() {
            out += &format!(
                "  - id: C{i}\n    from: z{}\n    to: e{}\n    action: {}\n",
                cd.from % zones,
                cd.to % endpoints,
                ACTIONS[cd.action]
            );
            if let Some(ports) = &cd.ports {
                let p: Vec<&str> = ports.iter().map(|&p| PORTS[p]).collect();
                out += &format!("    ports: [{}]\n", p.join(", "));
            }
            if !PROTOS[cd.protos].is_empty() {
                out += &format!("    protocols: {}\n", PROTOS[cd.protos]);
            }
            conduits += 1;
        }
    }
    if conduits == 0 {
        out += "  []\n";
    }
    out.replace("endpoints:\n  []\n", "endpoints: []\n")
        .replace("conduits:\n  []\n", "conduits: []\n")
}

/// Ethernet (with an 802.1Q tag unless `vlan` is 0) around an IP packet.
fn frame(vlan: u16, v6: bool, ip: &[u8]) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2];
    if vlan != 0 {
        f.extend_from_slice(&[0x81, 0x00]);
        f.extend_from_slice(&vlan.to_be_bytes());
    }
    f.extend_from_slice(if v6 { &[0x86, 0xdd] } else { &[0x08, 0x00] });
    f.extend_from_slice(ip);
    f
}

fn octets(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V4(v4) => {
            let mut o = [0u8; 16];
            o[..4].copy_from_slice(&v4.octets());
            o
        }
        IpAddr::V6(v6) => v6.octets(),
    }
}

struct Flow {
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    vlan: u16,
    tcp: bool,
    sni: Option<&'static str>,
}

impl Flow {
    fn packet(&self) -> Vec<u8> {
        let b = match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => PacketBuilder::ipv4(s.octets(), d.octets(), 64),
            (IpAddr::V6(s), IpAddr::V6(d)) => PacketBuilder::ipv6(s.octets(), d.octets(), 64),
            _ => unreachable!("one family per flow"),
        };
        let mut ip = Vec::new();
        match (self.tcp, self.sni) {
            (true, None) => b
                .tcp(self.sport, self.dport, 1, 1000)
                .syn()
                .write(&mut ip, &[])
                .unwrap(),
            // The ClientHello is the flow's first packet, so the kernel's SNI
            // decision is the one that stands (no address verdict drops it first).
            (true, Some(name)) => b
                .tcp(self.sport, self.dport, 1, 1000)
                .ack(1)
                .psh()
                .write(&mut ip, &client_hello(&[sni_ext(name)]))
                .unwrap(),
            (false, _) => b.udp(self.sport, self.dport).write(&mut ip, b"x").unwrap(),
        }
        frame(self.vlan, self.src.is_ipv6(), &ip)
    }

    fn key(&self) -> FlowKey {
        let (a, b) = (
            (octets(self.src), self.sport),
            (octets(self.dst), self.dport),
        );
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        FlowKey {
            addr_lo: lo.0,
            addr_hi: hi.0,
            port_lo: lo.1,
            port_hi: hi.1,
            vlan: self.vlan,
            protocol: if self.tcp { 6 } else { 17 },
            family: if self.src.is_ipv6() {
                FAMILY_IPV6
            } else {
                FAMILY_IPV4
            },
        }
    }
}

fn flow(f: &FlowSpec, sport: u16) -> Flow {
    let (src, dst) = if f.v6 {
        (
            SRC_V6[f.src % SRC_V6.len()].parse().unwrap(),
            DST_V6[f.dst % DST_V6.len()].parse().unwrap(),
        )
    } else {
        (
            IpAddr::from(SRC_V4[f.src % SRC_V4.len()]),
            IpAddr::from(DST_V4[f.dst % DST_V4.len()]),
        )
    };
    let (tcp, sni) = match f.kind {
        Kind::Syn => (true, None),
        Kind::Udp => (false, None),
        Kind::Hello(n) => (true, Some(NAMES[n])),
    };
    Flow {
        src,
        dst,
        sport,
        dport: DPORTS[f.dport],
        vlan: VLANS[f.vlan],
        tcp,
        sni,
    }
}

fn check(k: &mut Kernel, c: &Case, next_port: &mut u16) -> Result<(), TestCaseError> {
    let text = yaml(c);
    let map = ConduitMap::from_bytes("prop.yaml", text.as_bytes(), None, None)
        .map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
    let policy = kernel_policy(&map, c.enforce).unwrap();
    k.install_policy(&policy).unwrap();
    for spec in &c.flows {
        *next_port = next_port.checked_add(1).unwrap_or(1024);
        let f = flow(spec, *next_port);
        k.test_run(Program::Xdp, &f.packet()).unwrap();
        // Keep the ring buffer empty: a full ring would skip the SNI walk.
        k.drain_events();
        let s = k.flow(&f.key()).unwrap().unwrap();
        let proto = if f.tcp { AppProto::Tls } else { AppProto::Quic };
        let want = map.classify(
            f.src,
            (f.vlan != 0).then_some(f.vlan),
            f.dst,
            f.dport,
            proto,
            f.sni,
            c.enforce,
        );
        let got = Verdict::from_u8(s.verdict);
        let idx = |i: Option<u16>| i.unwrap_or(0);
        let endpoint = idx(want.endpoint.as_ref().map(|e| e.index));
        let what = format!(
            "flow {} vlan {} -> {}:{} {:?} sni {:?}\nkernel: zone {} endpoint {} conduit {} {:?}\nagent: {want:?}\n{text}",
            f.src,
            f.vlan,
            f.dst,
            f.dport,
            proto,
            f.sni,
            s.zone_id,
            s.endpoint_id,
            s.conduit_id,
            got
        );
        prop_assert_eq!(got, want.verdict, "{}", what);
        prop_assert_eq!(s.endpoint_id, endpoint, "{}", what);
        prop_assert_eq!(
            s.conduit_id,
            idx(want.conduit.as_ref().map(|c| c.index)),
            "{}",
            what
        );
        // The kernel looks up the zone only for AI traffic.
        if endpoint != 0 {
            prop_assert_eq!(
                s.zone_id,
                idx(want.zone.as_ref().map(|z| z.index)),
                "{}",
                what
            );
        }
        k.remove_flow(&f.key()).unwrap();
    }
    Ok(())
}

#[test]
fn kernel_and_agent_agree_on_random_maps_and_flows() {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIP kernel_and_agent_agree_on_random_maps_and_flows: needs root");
        return;
    }
    let k = Kernel::load(&common::kernel_options()).unwrap();
    assert!(
        k.payload_classification(),
        "no payload classifier loaded: {:?}",
        k.classifiers()
    );
    let mut runner = TestRunner::new(Config {
        cases: 256,
        failure_persistence: None,
        ..Config::default()
    });
    let state = std::cell::RefCell::new((k, 1024u16));
    runner
        .run(&case(), |c| {
            let (k, next_port) = &mut *state.borrow_mut();
            check(k, &c, next_port)
        })
        .unwrap();
}
