//! Kernel classification tests (BPF_PROG_TEST_RUN, needs root): hand-built TLS
//! ClientHellos, QUIC Initial headers, endpoint CIDRs, conduits and enforcement.
#![expect(clippy::unwrap_used, reason = "tests")]

mod common;

use common::{client_hello, ext, sni_ext};

use std::net::IpAddr;

use etherparse::PacketBuilder;
use sensor_common::{
    CONDUIT_KEY_BITS, ConduitKey, ConduitValue, Counter, FAMILY_IPV4, FlowKey, FlowStats, action,
    app_protocol, conduit_proto, sni_hash, sni_state, verdict,
};
use sensor_user::kernel::{
    CidrEntry, ClassifierVariant, ConduitEntry, Kernel, KernelEvent, KernelPolicy, Program,
    ZoneEntry,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

const CLIENT: [u8; 4] = [10, 10, 1, 5];
const SERVER: [u8; 4] = [192, 0, 2, 10];
const AI_NET_HOST: [u8; 4] = [198, 51, 100, 9];

fn kernel(policy: &KernelPolicy) -> Option<Kernel> {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIP: needs root");
        return None;
    }
    let mut k = Kernel::load(&common::kernel_options()).unwrap();
    assert!(
        k.payload_classification(),
        "no payload classifier loaded: {:?}",
        k.classifiers()
    );
    k.install_policy(policy).unwrap();
    Some(k)
}

fn policy(default_action: u8, enforce: bool) -> KernelPolicy {
    KernelPolicy {
        zones: vec![ZoneEntry::any_vlan(IpAddr::from([10, 10, 1, 0]), 24, 1)],
        endpoint_nets: vec![CidrEntry {
            addr: IpAddr::from([198, 51, 100, 0]),
            prefix_len: 24,
            id: 7,
        }],
        sni_exact: vec![(sni_hash(b"api.openai.com"), 5)],
        sni_suffix: vec![
            (sni_hash(b".azure.com"), 8),
            (sni_hash(b".openai.azure.com"), 6),
        ],
        conduits: vec![ConduitEntry {
            prefix_len: CONDUIT_KEY_BITS,
            key: ConduitKey::new(1, 6, conduit_proto::TLS, 443),
            value: ConduitValue {
                conduit_id: 9,
                action: action::ALLOW,
                _pad: 0,
            },
        }],
        default_action,
        enforce,
    }
}

/// Extensions before server_name, as real clients send them.
fn filler() -> Vec<Vec<u8>> {
    vec![
        ext(0xff01, &[0]),
        ext(10, &[0, 4, 0, 0x1d, 0, 0x17]),
        ext(16, &[0, 3, 2, b'h', b'2']),
        ext(13, &[0, 4, 4, 3, 8, 4]),
        ext(43, &[4, 3, 4, 3, 3]),
    ]
}

fn frame(ip: &[u8]) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00];
    f.extend_from_slice(ip);
    f
}

fn tcp(src: [u8; 4], dst: [u8; 4], sp: u16, dp: u16, syn: bool, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ipv4(src, dst, 64).tcp(sp, dp, 1, 1000);
    let b = if syn { b.syn() } else { b.ack(1).psh() };
    let mut out = Vec::new();
    b.write(&mut out, payload).unwrap();
    frame(&out)
}

fn udp(src: [u8; 4], dst: [u8; 4], sp: u16, dp: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ipv4(src, dst, 64)
        .udp(sp, dp)
        .write(&mut out, payload)
        .unwrap();
    frame(&out)
}

fn key(a: [u8; 4], ap: u16, b: [u8; 4], bp: u16, proto: u8) -> FlowKey {
    let ((x, xp), (y, yp)) = if (a, ap) <= (b, bp) {
        ((a, ap), (b, bp))
    } else {
        ((b, bp), (a, ap))
    };
    let mut lo = [0u8; 16];
    let mut hi = [0u8; 16];
    lo[..4].copy_from_slice(&x);
    hi[..4].copy_from_slice(&y);
    FlowKey {
        addr_lo: lo,
        addr_hi: hi,
        port_lo: xp,
        port_hi: yp,
        vlan: 0,
        protocol: proto,
        family: FAMILY_IPV4,
    }
}

/// SYN, then the ClientHello; returns the flow and the payload events.
fn tls_flow(
    k: &mut Kernel,
    sport: u16,
    hello: &[u8],
) -> (FlowStats, Vec<sensor_common::PayloadEvent>) {
    assert_eq!(
        k.test_run(Program::Xdp, &tcp(CLIENT, SERVER, sport, 443, true, b""))
            .unwrap(),
        XDP_PASS
    );
    assert_eq!(
        k.test_run(Program::Xdp, &tcp(CLIENT, SERVER, sport, 443, false, hello))
            .unwrap(),
        XDP_PASS
    );
    let s = k
        .flow(&key(CLIENT, sport, SERVER, 443, 6))
        .unwrap()
        .unwrap();
    // Only new flows and payload copies are events; the kernel's own SNI
    // classification reaches the agent through the flow table.
    let mut payloads = Vec::new();
    for e in k.drain_events() {
        if let KernelEvent::Payload(p) = e {
            payloads.push(*p);
        }
    }
    (s, payloads)
}

#[test]
fn sni_exact_in_later_extension_uppercase() {
    let Some(mut k) = kernel(&policy(action::ALERT, false)) else {
        return;
    };
    let mut exts = filler();
    exts.push(sni_ext("API.OpenAI.com"));
    let hello = client_hello(&exts);
    let (s, payloads) = tls_flow(&mut k, 40000, &hello);
    assert_eq!(s.sni_hash, sni_hash(b"api.openai.com"));
    // Classified by the kernel, but PENDING until the agent has the whole hello.
    assert_eq!(s.sni_state, sni_state::PENDING);
    assert_eq!(s.app_protocol, app_protocol::TLS);
    assert_eq!((s.zone_id, s.endpoint_id, s.conduit_id), (1, 5, 0));
    assert_eq!(s.verdict, verdict::VIOLATION);
    assert_eq!(payloads.len(), 1);
    let p = &payloads[0];
    assert_eq!(p.payload_len as usize, hello.len());
    assert_eq!(p.copied_len as usize, hello.len());
    assert_eq!(&p.data[..hello.len()], hello.as_slice());
}

#[test]
fn sni_suffix_match_authorized_by_conduit() {
    let Some(mut k) = kernel(&policy(action::ALERT, false)) else {
        return;
    };
    let mut exts = filler();
    exts.push(sni_ext("x.y.openai.azure.com"));
    let (s, _) = tls_flow(&mut k, 40001, &client_hello(&exts));
    // The longest suffix (.openai.azure.com) wins over .azure.com.
    assert_eq!((s.zone_id, s.endpoint_id, s.conduit_id), (1, 6, 9));
    assert_eq!(s.verdict, verdict::AUTHORIZED);
    // Only .azure.com matches here.
    let mut exts = filler();
    exts.push(sni_ext("foo.azure.com."));
    let (s, _) = tls_flow(&mut k, 40002, &client_hello(&exts));
    assert_eq!(s.endpoint_id, 8);
    assert_eq!(s.sni_hash, sni_hash(b"foo.azure.com"));
}

#[test]
fn sni_no_match_and_not_tls() {
    let Some(mut k) = kernel(&policy(action::ALERT, false)) else {
        return;
    };
    let (s, payloads) = tls_flow(&mut k, 40003, &client_hello(&[sni_ext("example.org")]));
    assert_eq!(s.sni_hash, sni_hash(b"example.org"));
    assert_eq!((s.endpoint_id, s.verdict), (0, verdict::UNCLASSIFIED));
    assert_eq!(s.sni_state, sni_state::PENDING);
    assert_eq!(payloads.len(), 1);
    // Not TLS: done, no payload copy.
    let (s, payloads) = tls_flow(&mut k, 40004, b"GET / HTTP/1.1\r\n\r\n");
    assert_eq!(
        (s.app_protocol, s.sni_state),
        (app_protocol::UNKNOWN, sni_state::DONE)
    );
    assert!(payloads.is_empty());
}

#[test]
fn truncated_client_hello_is_pending() {
    let Some(mut k) = kernel(&policy(action::ALERT, false)) else {
        return;
    };
    let mut exts = filler();
    exts.push(ext(21, &[0u8; 600]));
    exts.push(sni_ext("api.openai.com"));
    let hello = client_hello(&exts);
    // First segment ends before the server_name extension.
    let first = &hello[..500];
    let (s, payloads) = tls_flow(&mut k, 40005, first);
    assert_eq!(s.app_protocol, app_protocol::TLS);
    assert_eq!(s.sni_state, sni_state::PENDING);
    assert_eq!(s.sni_hash, 0);
    assert_eq!(payloads.len(), 1);
    assert_eq!(payloads[0].copied_len, 500);
}

#[test]
fn quic_initial_v1_v2() {
    let Some(mut k) = kernel(&policy(action::ALERT, false)) else {
        return;
    };
    for (sport, first, version) in [(50000u16, 0xc3u8, 1u32), (50001, 0xd3, 0x6b33_43cf)] {
        let mut p = vec![first];
        p.extend_from_slice(&version.to_be_bytes());
        p.resize(1200, 0);
        assert_eq!(
            k.test_run(Program::Xdp, &udp(CLIENT, SERVER, sport, 443, &p))
                .unwrap(),
            XDP_PASS
        );
        let s = k
            .flow(&key(CLIENT, sport, SERVER, 443, 17))
            .unwrap()
            .unwrap();
        assert_eq!(s.app_protocol, app_protocol::QUIC, "version {version:#x}");
        assert_eq!(s.sni_state, sni_state::PENDING);
        let ev: Vec<_> = k
            .drain_events()
            .into_iter()
            .filter_map(|e| match e {
                KernelEvent::Payload(p) => Some(p),
                KernelEvent::Flow(_) | KernelEvent::Dns(_) => None,
            })
            .collect();
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].copied_len, 1200);
    }
    // A QUIC v1 Handshake packet (type 2) or a short header is not an Initial.
    let mut p = vec![0xe3];
    p.extend_from_slice(&1u32.to_be_bytes());
    p.resize(100, 0);
    k.test_run(Program::Xdp, &udp(CLIENT, SERVER, 50002, 443, &p))
        .unwrap();
    let s = k
        .flow(&key(CLIENT, 50002, SERVER, 443, 17))
        .unwrap()
        .unwrap();
    assert_eq!(
        (s.app_protocol, s.sni_state),
        (app_protocol::UNKNOWN, sni_state::DONE)
    );
}

#[test]
fn payload_truncated_counter() {
    let Some(k) = kernel(&policy(action::ALERT, false)) else {
        return;
    };
    let mut p = vec![0xc3];
    p.extend_from_slice(&1u32.to_be_bytes());
    p.resize(1400 + 300, 0);
    let before = k.counters().unwrap()[Counter::LossPayloadTruncated as usize];
    k.test_run(Program::Xdp, &udp(CLIENT, SERVER, 50003, 443, &p))
        .unwrap();
    let after = k.counters().unwrap()[Counter::LossPayloadTruncated as usize];
    assert_eq!(after - before, 1);
}

#[test]
fn endpoint_cidr_and_enforcement() {
    let Some(mut k) = kernel(&policy(action::BLOCK, true)) else {
        return;
    };
    let syn = tcp(CLIENT, AI_NET_HOST, 41000, 443, true, b"");
    assert_eq!(k.test_run(Program::Xdp, &syn).unwrap(), XDP_PASS);
    let fk = key(CLIENT, 41000, AI_NET_HOST, 443, 6);
    let s = k.flow(&fk).unwrap().unwrap();
    assert_eq!((s.zone_id, s.endpoint_id), (1, 7));
    assert_eq!(s.verdict, verdict::BLOCKED);
    // Later forward packets are dropped; the reverse direction is not.
    let before = k.counters().unwrap()[Counter::PacketsDropped as usize];
    let data = tcp(CLIENT, AI_NET_HOST, 41000, 443, false, b"x");
    assert_eq!(k.test_run(Program::Xdp, &data).unwrap(), XDP_DROP);
    let back = tcp(AI_NET_HOST, CLIENT, 443, 41000, false, b"y");
    assert_eq!(k.test_run(Program::Xdp, &back).unwrap(), XDP_PASS);
    let after = k.counters().unwrap()[Counter::PacketsDropped as usize];
    assert_eq!(after - before, 1);
    // Enforcement off: nothing is dropped.
    k.set_enforce(false).unwrap();
    assert_eq!(k.test_run(Program::Xdp, &data).unwrap(), XDP_PASS);
    // Policy replacement removes stale entries.
    let mut p = policy(action::ALERT, false);
    p.endpoint_nets.clear();
    k.install_policy(&p).unwrap();
    let syn = tcp(CLIENT, AI_NET_HOST, 41001, 443, true, b"");
    k.test_run(Program::Xdp, &syn).unwrap();
    let s = k
        .flow(&key(CLIENT, 41001, AI_NET_HOST, 443, 6))
        .unwrap()
        .unwrap();
    assert_eq!(s.endpoint_id, 0);
}

/// A ClientHello over two segments: both are copied to the agent; the agent's
/// classification (CLASS_UPDATES) is merged on the next packet; what the client
/// sends before the server has spoken is still copied (a second hello would be
/// seen), nothing after; no packet count is lost to the agent's write.
#[test]
fn split_hello_is_copied_until_the_agent_classifies() {
    let Some(mut k) = kernel(&policy(action::ALERT, false)) else {
        return;
    };
    let mut exts = filler();
    exts.push(sni_ext("api.openai.com"));
    let hello = client_hello(&exts);
    let (first, second) = hello.split_at(hello.len() / 2);
    let sport = 40100;
    let fkey = key(CLIENT, sport, SERVER, 443, 6);
    for payload in [&b""[..], first, second] {
        let syn = payload.is_empty();
        assert_eq!(
            k.test_run(Program::Xdp, &tcp(CLIENT, SERVER, sport, 443, syn, payload))
                .unwrap(),
            XDP_PASS
        );
    }
    let copies: Vec<_> = k
        .drain_events()
        .into_iter()
        .filter_map(|e| match e {
            KernelEvent::Payload(p) => Some(p),
            KernelEvent::Flow(_) | KernelEvent::Dns(_) => None,
        })
        .collect();
    assert_eq!(copies.len(), 2, "both segments must reach the agent");
    assert_eq!(&copies[1].data[..second.len()], second);
    let s = k.flow(&fkey).unwrap().unwrap();
    assert_eq!((s.sni_state, s.payload_copies), (sni_state::PENDING, 2));

    // The agent classifies; the kernel merges on the next packet.
    let update = sensor_common::ClassUpdate {
        sni_hash: sni_hash(b"api.openai.com"),
        zone_id: 1,
        endpoint_id: 5,
        conduit_id: 0,
        verdict: verdict::BLOCKED,
        app_protocol: app_protocol::TLS,
    };
    assert!(k.update_classification(&fkey, &update).unwrap());
    assert_eq!(
        k.test_run(
            Program::Xdp,
            &tcp(CLIENT, SERVER, sport, 443, false, b"more")
        )
        .unwrap(),
        XDP_PASS
    );
    let s = k.flow(&fkey).unwrap().unwrap();
    assert_eq!(
        (s.sni_state, s.verdict),
        (sni_state::DONE, verdict::BLOCKED)
    );
    assert_eq!(s.packets[0], 4, "every packet counted");
    let copied = |k: &mut Kernel| {
        k.drain_events()
            .iter()
            .filter(|e| matches!(e, KernelEvent::Payload(p) if p.header.direction == 0))
            .count()
    };
    assert_eq!(copied(&mut k), 1, "sent before the server spoke: copied");
    // The server's first payload; after it, nothing the client sends is copied.
    let reply = tcp(
        SERVER,
        CLIENT,
        443,
        sport,
        false,
        b"\x16\x03\x03\x00\x01\x02",
    );
    assert_eq!(k.test_run(Program::Xdp, &reply).unwrap(), XDP_PASS);
    let data = tcp(CLIENT, SERVER, sport, 443, false, b"data");
    assert_eq!(k.test_run(Program::Xdp, &data).unwrap(), XDP_PASS);
    assert_eq!(copied(&mut k), 0);
}

/// A decoy ClientHello (a harmless name; the server never accepts it: a bad
/// checksum) and then the real one at the same sequence number: the real hello is
/// copied too and the flow is `CONTESTED`. The `helpers` classifier reads it in the
/// kernel, so its blocked endpoint raises the verdict at once (the `bounded` one,
/// 5.10's, leaves that to the agent's update). An update that would lower the
/// verdict (the agent's reading of the decoy) is not applied, one that raises it
/// is. The same hello again (a plain retransmission) changes nothing.
#[test]
fn a_second_hello_at_the_same_sequence_contests_and_only_raises_the_verdict() {
    let Some(mut k) = kernel(&policy(action::BLOCK, true)) else {
        return;
    };
    let hello_for = |name: &str| {
        let mut exts = filler();
        exts.push(sni_ext(name));
        client_hello(&exts)
    };
    let (decoy, real) = (hello_for("harmless.example"), hello_for("api.openai.com"));
    let sport = 40200;
    let fkey = key(CLIENT, sport, SERVER, 443, 6);
    let (s, copies) = tls_flow(&mut k, sport, &decoy);
    assert_eq!(copies.len(), 1);
    assert_eq!(
        (s.sni_state, s.verdict),
        (sni_state::PENDING, verdict::UNCLASSIFIED)
    );
    // The same decoy again: a retransmission, nothing contested (unless the
    // kernel cannot read it: then the agent tells).
    let reads = k.classifiers().xdp == ClassifierVariant::Helpers;
    let pkt = |p: &[u8]| tcp(CLIENT, SERVER, sport, 443, false, p);
    assert_eq!(k.test_run(Program::Xdp, &pkt(&decoy)).unwrap(), XDP_PASS);
    let s = k.flow(&fkey).unwrap().unwrap();
    let expected = if reads {
        sni_state::PENDING
    } else {
        sni_state::CONTESTED
    };
    assert_eq!(s.sni_state, expected);
    // The real hello: copied, contested, and (read in the kernel) the verdict rises.
    assert_eq!(k.test_run(Program::Xdp, &pkt(&real)).unwrap(), XDP_PASS);
    let s = k.flow(&fkey).unwrap().unwrap();
    assert_eq!(s.sni_state, sni_state::CONTESTED);
    if reads {
        assert_eq!(
            (s.verdict, s.endpoint_id, s.sni_hash),
            (verdict::BLOCKED, 5, sni_hash(b"api.openai.com"))
        );
    } else {
        assert_eq!(s.verdict, verdict::UNCLASSIFIED);
    }
    let copied = k
        .drain_events()
        .iter()
        .filter(|e| matches!(e, KernelEvent::Payload(_)))
        .count();
    assert_eq!(
        copied, 2,
        "the retransmission and the real hello reach the agent"
    );
    // The agent's reading of the decoy arrives late: it would lower the verdict.
    let lower = sensor_common::ClassUpdate {
        sni_hash: sni_hash(b"harmless.example"),
        zone_id: 1,
        endpoint_id: 0,
        conduit_id: 0,
        verdict: verdict::UNCLASSIFIED,
        app_protocol: app_protocol::TLS,
    };
    let raise = sensor_common::ClassUpdate {
        verdict: verdict::BLOCKED,
        endpoint_id: 5,
        sni_hash: sni_hash(b"api.openai.com"),
        ..lower
    };
    if !reads {
        // The agent's reading of the real hello.
        assert!(k.update_classification(&fkey, &raise).unwrap());
        assert_eq!(k.test_run(Program::Xdp, &pkt(b"next")).unwrap(), XDP_DROP);
    }
    assert!(k.update_classification(&fkey, &lower).unwrap());
    assert_eq!(k.test_run(Program::Xdp, &pkt(b"fin")).unwrap(), XDP_DROP);
    let s = k.flow(&fkey).unwrap().unwrap();
    assert_eq!(
        (s.sni_state, s.verdict, s.sni_hash),
        (
            sni_state::CONTESTED,
            verdict::BLOCKED,
            sni_hash(b"api.openai.com")
        )
    );

    // A contest the kernel cannot read (the real name in a later segment): the
    // agent's update raises the verdict.
    let sport = 40201;
    let fkey = key(CLIENT, sport, SERVER, 443, 6);
    let pkt = |p: &[u8]| tcp(CLIENT, SERVER, sport, 443, false, p);
    tls_flow(&mut k, sport, &decoy);
    let (head, _) = real.split_at(real.len() - 20);
    assert_eq!(k.test_run(Program::Xdp, &pkt(head)).unwrap(), XDP_PASS);
    let s = k.flow(&fkey).unwrap().unwrap();
    assert_eq!(
        (s.sni_state, s.verdict),
        (sni_state::CONTESTED, verdict::UNCLASSIFIED)
    );
    assert!(k.update_classification(&fkey, &raise).unwrap());
    assert_eq!(k.test_run(Program::Xdp, &pkt(b"next")).unwrap(), XDP_DROP);
}

/// DNS over UDP: every response (from port 53) reaches the agent as `EVENT_DNS`,
/// whichever side the flow was first seen from; queries are not copied; a
/// response longer than the copy bound is counted as truncated.
#[test]
fn dns_responses_are_copied_queries_are_not() {
    let Some(mut k) = kernel(&policy(action::ALERT, false)) else {
        return;
    };
    let resolver = [10, 10, 1, 53];
    let counter = |k: &Kernel, c: Counter| k.counters().unwrap()[c as usize];
    let (copied, truncated) = (
        counter(&k, Counter::DnsCopied),
        counter(&k, Counter::LossDnsTruncated),
    );
    let query = b"\x12\x34\x01\x00query";
    let answer = b"\x12\x34\x81\x80answer";
    for (sp, dp, payload) in [
        (40053, 53, &query[..]),
        (53, 40053, &answer[..]),
        (53, 40053, &answer[..]),
    ] {
        let (src, dst) = if dp == 53 {
            (CLIENT, resolver)
        } else {
            (resolver, CLIENT)
        };
        let r = k.test_run(Program::Xdp, &udp(src, dst, sp, dp, payload));
        assert_eq!(r.unwrap(), XDP_PASS);
    }
    // A flow first seen from its response (the query took another path).
    k.test_run(Program::Xdp, &udp(resolver, CLIENT, 53, 40054, answer))
        .unwrap();
    let mut long = answer.to_vec();
    long.resize(sensor_common::PAYLOAD_COPY_MAX + 200, 0);
    k.test_run(Program::Xdp, &udp(resolver, CLIENT, 53, 40055, &long))
        .unwrap();

    let events = k.drain_events();
    let dns: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            KernelEvent::Dns(p) => Some(p),
            _ => None,
        })
        .collect();
    assert_eq!(dns.len(), 4, "three responses and the long one: {events:?}");
    assert_eq!(&dns[0].data[..dns[0].copied_len as usize], answer);
    assert_eq!(dns[0].header.key, key(CLIENT, 40053, resolver, 53, 17));
    assert_eq!(dns[3].copied_len as usize, sensor_common::PAYLOAD_COPY_MAX);
    assert!(
        !events.iter().any(|e| matches!(e, KernelEvent::Payload(_))),
        "the query is not copied"
    );
    assert_eq!(counter(&k, Counter::DnsCopied) - copied, 4);
    assert_eq!(counter(&k, Counter::LossDnsTruncated) - truncated, 1);
    let s = k
        .flow(&key(CLIENT, 40053, resolver, 53, 17))
        .unwrap()
        .unwrap();
    assert_eq!(
        (s.app_protocol, s.sni_state, s.packets),
        (app_protocol::DNS, sni_state::DONE, [1, 2])
    );
}
