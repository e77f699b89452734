//! Random and mutated packets through the kernel programs (BPF_PROG_TEST_RUN, root):
//! whatever the bytes, XDP and TC must pass the packet (enforcement off), and every
//! packet must be accounted for, either counted in a flow or counted under a reason.
//! Deterministic: a fixed-seed generator, so a failure reproduces.
#![expect(clippy::unwrap_used, reason = "tests")]

use std::net::IpAddr;

use etherparse::PacketBuilder;
use sensor_common::{Counter, action, sni_hash};
use sensor_user::kernel::{Kernel, KernelOptions, KernelPolicy, Program, ZoneEntry};

const XDP_PASS: u32 = 2;
const TC_ACT_OK: u32 = 0;
const ROUNDS: usize = 4000;

/// xorshift64*: small, deterministic, good enough to spread mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A TLS record header + ClientHello-looking bytes with an SNI, to get the payload
/// classifiers involved before mutation.
fn hello_like() -> Vec<u8> {
    let name = b"api.openai.com";
    let mut ext = vec![0, 0];
    let list_len = name.len() + 3;
    ext.extend_from_slice(&((list_len + 2) as u16).to_be_bytes());
    ext.extend_from_slice(&(list_len as u16).to_be_bytes());
    ext.push(0);
    ext.extend_from_slice(&(name.len() as u16).to_be_bytes());
    ext.extend_from_slice(name);
    let mut body = vec![3, 3];
    body.extend_from_slice(&[7; 32]);
    body.extend_from_slice(&[0, 0, 2, 0x13, 0x01, 1, 0]);
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);
    let mut hs = vec![1, 0];
    hs.extend_from_slice(&(body.len() as u16).to_be_bytes());
    hs.extend_from_slice(&body);
    let mut rec = vec![22, 3, 1];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

fn templates() -> Vec<Vec<u8>> {
    let mac = ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
    let mut out = Vec::new();
    let hello = hello_like();
    let mut b = Vec::new();
    PacketBuilder::ethernet2(mac.0, mac.1)
        .ipv4([10, 10, 1, 5], [192, 0, 2, 10], 64)
        .tcp(40000, 443, 1, 65535)
        .write(&mut b, &hello)
        .unwrap();
    out.push(b);
    let mut b = Vec::new();
    PacketBuilder::ethernet2(mac.0, mac.1)
        .single_vlan(101.try_into().unwrap())
        .ipv6(
            [0xfd, 0, 0, 0x10, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5],
            [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10],
            64,
        )
        .udp(50000, 443)
        .write(
            &mut b,
            &[0xc0, 0, 0, 0, 1, 8, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0x44, 0xd0],
        )
        .unwrap();
    out.push(b);
    let mut b = Vec::new();
    PacketBuilder::ethernet2(mac.0, mac.1)
        .ipv4([10, 10, 1, 5], [198, 51, 100, 10], 64)
        .udp(5353, 5000)
        .write(&mut b, b"plain datagram")
        .unwrap();
    out.push(b);
    out
}

#[test]
fn random_and_mutated_packets_always_pass_and_are_accounted() {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIP random_and_mutated_packets_always_pass_and_are_accounted: needs root");
        return;
    }
    let mut k = Kernel::load(&KernelOptions {
        default_action: action::ALERT,
        ..KernelOptions::default()
    })
    .unwrap();
    k.install_policy(&KernelPolicy {
        zones: vec![ZoneEntry::any_vlan(IpAddr::from([10, 10, 1, 0]), 24, 1)],
        sni_exact: vec![(sni_hash(b"api.openai.com"), 1)],
        default_action: action::ALERT,
        ..KernelPolicy::default()
    })
    .unwrap();
    let templates = templates();
    let mut rng = Rng(0x5eed_c0d1_7a11_0001);
    let mut runs = 0u64;
    for round in 0..ROUNDS {
        let mut pkt = if round % 5 == 0 {
            // Pure noise of any length a frame can have.
            let len = 14 + rng.below(1500);
            (0..len).map(|_| rng.next() as u8).collect()
        } else {
            templates[rng.below(templates.len())].clone()
        };
        // Flip up to 8 bytes, then maybe cut the tail.
        for _ in 0..rng.below(9) {
            let i = rng.below(pkt.len());
            pkt[i] = rng.next() as u8;
        }
        if rng.below(3) == 0 {
            let keep = 14 + rng.below(pkt.len() - 13);
            pkt.truncate(keep);
        }
        let program = if round % 2 == 0 {
            Program::Xdp
        } else {
            Program::Tc
        };
        let verdict = match k.test_run(program, &pkt) {
            Ok(v) => v,
            // The skb test harness refuses a truncated IP header itself (EINVAL) before
            // the program runs; the stack never hands TC such an skb.
            Err(e) if program == Program::Tc && format!("{e:?}").contains("InvalidInput") => {
                continue;
            }
            Err(e) => panic!("round {round}: {e:?}"),
        };
        let expected = if program == Program::Xdp {
            XDP_PASS
        } else {
            TC_ACT_OK
        };
        assert_eq!(
            verdict, expected,
            "round {round}: {program:?} returned {verdict} for {pkt:02x?}"
        );
        runs += 1;
        let _ = k.drain_events();
    }
    let c = k.counters().unwrap();
    let seen = c[Counter::PacketsSeen as usize];
    assert_eq!(seen, runs, "every run is seen: {c:?}");
    // Every packet ends up counted in a flow or under exactly one reason.
    let reasons: u64 = Counter::ALL
        .iter()
        .filter(|r| {
            r.is_parse_error()
                || matches!(
                    r,
                    Counter::NonIp
                        | Counter::NonTcpUdp
                        | Counter::IpFragment
                        | Counter::SkippedAlreadyCounted
                        | Counter::HandedOffLocal
                )
        })
        .map(|r| c[*r as usize])
        .sum();
    let counted = c[Counter::PacketsCounted as usize];
    assert!(counted > 0 && reasons > 0, "both paths exercised: {c:?}");
    assert_eq!(
        counted + reasons,
        seen,
        "every packet counted exactly once, in a flow or under a reason: {c:?}"
    );
}
