//! A reload either applies whole or leaves the old policy whole: a write that fails
//! half-way through any one of the seven policy tables, or the generation switch
//! failing after every table has the new policy's entries (injected through the
//! test-only hook), leaves the old policy in force, checked by running probe flows
//! through the kernel program (BPF_PROG_TEST_RUN) against the agent's classifier of
//! the old map; the next good reload then applies whole. The second case is what a
//! packet classified during a reload meets: the new entries are all in the tables,
//! and the kernel still sees only the old policy. A map that fits the tables
//! reloads even when the old and the new one together do not.

mod common;

use std::net::{IpAddr, Ipv4Addr};

use common::{client_hello, sni_ext};
use etherparse::PacketBuilder;
use sensor_common::{FAMILY_IPV4, FlowKey, Verdict};
use sensor_user::{
    config::{AppProto, ConduitMap},
    kernel::{Kernel, KernelError, KernelOptions, Program, inject_policy_write_failure, map_names},
    kernel_policy::kernel_policy,
};

/// Old map: zone a, endpoint a by address and name, conduit a (allow, port 443).
const OLD: &str = r#"version: 1
site: reload
default_action: alert
zones:
  - id: zone-a
    networks: [10.0.1.0/24]
endpoints:
  - id: ep-a
    sni: ["a.example.com", "*.a.example"]
    networks: [192.0.2.0/24]
conduits:
  - id: C-A
    from: zone-a
    to: ep-a
    ports: [443]
    protocols: [tls, quic]
    action: allow
"#;

/// New map: every table differs (zone b first, so indexes move too).
const NEW: &str = r#"version: 1
site: reload
default_action: block
zones:
  - id: zone-b
    networks: [10.0.2.0/24]
  - id: zone-a
    networks: [10.0.3.0/24]
endpoints:
  - id: ep-b
    sni: ["b.example.com", "*.b.example"]
    networks: [198.51.100.0/24]
  - id: ep-a
    sni: ["a.example.com"]
conduits:
  - id: C-B
    from: zone-b
    to: ep-b
    protocols: [tls]
    action: allow
  - id: C-A2
    from: zone-a
    to: ep-a
    ports: [8443]
    action: allow
"#;

const SOURCES: [[u8; 4]; 3] = [[10, 0, 1, 5], [10, 0, 2, 5], [10, 0, 3, 5]];
const DESTINATIONS: [[u8; 4]; 3] = [[192, 0, 2, 10], [198, 51, 100, 10], [203, 0, 113, 10]];
const NAMES: [Option<&str>; 5] = [
    None,
    Some("a.example.com"),
    Some("x.a.example"),
    Some("b.example.com"),
    Some("x.b.example"),
];
const PORTS: [u16; 2] = [443, 8443];

fn map(text: &str) -> ConduitMap {
    ConduitMap::from_bytes("reload.yaml", text.as_bytes(), None, None).expect("kernel reload test")
}

fn key(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> FlowKey {
    let mut a = [0u8; 16];
    a[..4].copy_from_slice(&src);
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(&dst);
    let ((lo, lp), (hi, hp)) = if (a, sport) <= (b, dport) {
        ((a, sport), (b, dport))
    } else {
        ((b, dport), (a, sport))
    };
    FlowKey {
        addr_lo: lo,
        addr_hi: hi,
        port_lo: lp,
        port_hi: hp,
        vlan: 0,
        protocol: 6,
        family: FAMILY_IPV4,
    }
}

/// Runs one new flow per (source, destination, name, port) and requires the kernel
/// to classify each exactly as the agent's classifier of `expect` does.
fn assert_in_force(k: &mut Kernel, expect: &ConduitMap, what: &str, next_port: &mut u16) {
    let mut checked = 0;
    for src in SOURCES {
        for dst in DESTINATIONS {
            for name in NAMES {
                for dport in PORTS {
                    *next_port += 1;
                    let sport = *next_port;
                    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
                        .ipv4(src, dst, 64)
                        .tcp(sport, dport, 1, 1000);
                    let mut packet = Vec::new();
                    match name {
                        None => b.syn().write(&mut packet, &[]).expect("kernel reload test"),
                        Some(n) => b
                            .ack(1)
                            .psh()
                            .write(&mut packet, &client_hello(&[sni_ext(n)]))
                            .expect("kernel reload test"),
                    }
                    k.test_run(Program::Xdp, &packet)
                        .expect("kernel reload test");
                    k.drain_events();
                    let flow = key(src, sport, dst, dport);
                    let s = k
                        .flow(&flow)
                        .expect("kernel reload test")
                        .expect("kernel reload test");
                    let want = expect.classify(
                        IpAddr::V4(Ipv4Addr::from(src)),
                        None,
                        IpAddr::V4(Ipv4Addr::from(dst)),
                        dport,
                        AppProto::Tls,
                        name,
                        true,
                    );
                    let idx = |i: Option<u16>| i.unwrap_or(0);
                    let endpoint = idx(want.endpoint.as_ref().map(|e| e.index));
                    let got = (
                        Verdict::from_u8(s.verdict),
                        s.endpoint_id,
                        s.conduit_id,
                        if endpoint != 0 { s.zone_id } else { 0 },
                    );
                    let wanted = (
                        want.verdict,
                        endpoint,
                        idx(want.conduit.as_ref().map(|c| c.index)),
                        if endpoint != 0 {
                            idx(want.zone.as_ref().map(|z| z.index))
                        } else {
                            0
                        },
                    );
                    assert_eq!(
                        got, wanted,
                        "{what}: {src:?} -> {dst:?}:{dport} sni {name:?}: kernel (verdict, endpoint, conduit, zone) {got:?}, map {wanted:?}"
                    );
                    k.remove_flow(&flow).expect("kernel reload test");
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(checked, 90);
}

#[test]
fn a_reload_that_fails_half_way_leaves_the_old_policy_whole() {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIP a_reload_that_fails_half_way_leaves_the_old_policy_whole: needs root");
        return;
    }
    let mut k = Kernel::load(&KernelOptions::default()).expect("kernel reload test");
    let (old, new) = (map(OLD), map(NEW));
    // Enforcement on: the new map's default_action block gives `blocked`, so a
    // switch that reached the kernel config early would show.
    let (old_p, new_p) = (
        kernel_policy(&old, true).expect("kernel reload test"),
        kernel_policy(&new, true).expect("kernel reload test"),
    );
    let mut port = 20_000u16;
    for failing in [
        map_names::ZONES_V4,
        map_names::ZONES_V6,
        map_names::ENDPOINT_NETS_V4,
        map_names::ENDPOINT_NETS_V6,
        map_names::SNI_EXACT,
        map_names::SNI_SUFFIX,
        map_names::CONDUITS,
        map_names::CONFIG,
    ] {
        k.install_policy(&old_p).expect("kernel reload test");
        assert_in_force(&mut k, &old, "old map installed", &mut port);

        inject_policy_write_failure(Some(failing));
        let err = k.install_policy(&new_p).expect_err("the injected failure");
        inject_policy_write_failure(None);
        assert!(
            matches!(err, KernelError::Injected(m) if m == failing),
            "{failing}: {err}"
        );
        assert_in_force(
            &mut k,
            &old,
            &format!("reload failed writing {failing}"),
            &mut port,
        );

        k.install_policy(&new_p).expect("kernel reload test");
        assert_in_force(
            &mut k,
            &new,
            &format!("good reload after a failure in {failing}"),
            &mut port,
        );
    }
}

/// `n` zones of one /24 each, numbered from `first`, with one endpoint and conduit.
fn many_zones(first: usize, n: usize) -> String {
    let mut out = String::from(
        "version: 1\nsite: reload\ndefault_action: alert\nendpoints:\n  - id: ep\n    networks: [192.0.2.0/24]\nconduits:\n  - id: C\n    from: z0\n    to: ep\n    action: allow\nzones:\n",
    );
    for i in 0..n {
        let z = first + i;
        out.push_str(&format!(
            "  - id: z{i}\n    networks: [10.{}.{}.0/24]\n",
            z / 256,
            z % 256
        ));
    }
    out
}

#[test]
fn a_map_that_fits_reloads_even_when_old_and_new_together_do_not() {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIP a_map_that_fits_reloads_even_when_old_and_new_together_do_not: needs root");
        return;
    }
    let mut k = Kernel::load(&KernelOptions::default()).expect("kernel reload test");
    // 3000 + 3000 different zone networks: more than the trie's 4096 together.
    let (a, b) = (map(&many_zones(0, 3000)), map(&many_zones(3000, 3000)));
    k.install_policy(&kernel_policy(&a, false).expect("kernel reload test"))
        .expect("kernel reload test");
    k.install_policy(&kernel_policy(&b, false).expect("kernel reload test"))
        .expect("kernel reload test");
    // The first zone of the new map (10.11.184.0/24, z0) reaches the endpoint under
    // conduit C; the old map's 10.0.0.0/24 is gone.
    for (src, want) in [
        ([10, 11, 184, 7], Verdict::Authorized),
        ([10, 0, 0, 7], Verdict::Violation),
    ] {
        let packet = {
            let mut p = Vec::new();
            PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
                .ipv4(src, [192, 0, 2, 10], 64)
                .tcp(40_000, 443, 1, 1000)
                .syn()
                .write(&mut p, &[])
                .expect("kernel reload test");
            p
        };
        k.test_run(Program::Xdp, &packet)
            .expect("kernel reload test");
        k.drain_events();
        let s = k
            .flow(&key(src, 40_000, [192, 0, 2, 10], 443))
            .expect("kernel reload test")
            .expect("kernel reload test");
        assert_eq!(Verdict::from_u8(s.verdict), want, "{src:?}");
    }
}
