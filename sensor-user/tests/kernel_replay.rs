//! `conduit-sensor replay` of a capture with a TLS ClientHello split over two TCP
//! segments and a QUIC v1 Initial (RFC 9001 A.2), through the real binary (needs
//! root). It is the check of "classifies on this kernel" that `cargo xtask test`
//! runs in each VM: whichever program variants load, SNI and QUIC must come out.
#![expect(clippy::unwrap_used, reason = "tests")]

mod common;

use std::{path::Path, process::Command};

use common::{client_hello, ext, sni_ext};
use etherparse::{PacketBuilder, PacketBuilderStep, TcpHeader};

const CLIENT: [u8; 4] = [10, 10, 1, 5];
const OPENAI: [u8; 4] = [192, 0, 2, 10];
const EXAMPLE: [u8; 4] = [192, 0, 2, 20];

const CONDUITS: &str = "version: 1
site: replay-test
default_action: alert
zones:
  - id: cell-1
    name: Cell 1
    level: 1
    networks: [10.10.1.0/24]
endpoints:
  - id: openai
    provider: OpenAI
    sni: [api.openai.com]
  - id: example
    provider: Example
    sni: [example.com]
conduits: []
";

fn tcp_frame(builder: PacketBuilderStep<TcpHeader>, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    builder.write(&mut out, payload).unwrap();
    out
}

fn eth() -> PacketBuilderStep<etherparse::Ethernet2Header> {
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
}

/// Handshake, ClientHello in two segments, from CLIENT:40000 to OPENAI:443.
fn tls_packets() -> Vec<Vec<u8>> {
    let hello = client_hello(&[
        ext(0xff01, &[0]),
        ext(10, &[0, 4, 0, 0x1d, 0, 0x17]),
        ext(16, &[0, 3, 2, b'h', b'2']),
        sni_ext("api.openai.com"),
        ext(43, &[4, 3, 4, 3, 3]),
    ]);
    // The split falls inside the server_name extension.
    let cut = hello.len() - 12;
    let (a, b) = hello.split_at(cut);
    let (cs, ss) = (1000u32, 5000u32);
    let c2s = |seq: u32, ack: u32| {
        eth()
            .ipv4(CLIENT, OPENAI, 64)
            .tcp(40000, 443, seq, 64240)
            .ack(ack)
    };
    vec![
        tcp_frame(
            eth()
                .ipv4(CLIENT, OPENAI, 64)
                .tcp(40000, 443, cs, 64240)
                .syn(),
            &[],
        ),
        tcp_frame(
            eth()
                .ipv4(OPENAI, CLIENT, 64)
                .tcp(443, 40000, ss, 64240)
                .syn()
                .ack(cs + 1),
            &[],
        ),
        tcp_frame(c2s(cs + 1, ss + 1), &[]),
        tcp_frame(c2s(cs + 1, ss + 1).psh(), a),
        tcp_frame(c2s(cs + 1 + a.len() as u32, ss + 1).psh(), b),
    ]
}

/// The client Initial of RFC 9001 A.2 (SNI example.com), CLIENT:40001 to EXAMPLE:443.
fn quic_packet() -> Vec<u8> {
    let initial = include_str!("../src/tls/testdata/rfc9001_a2_client_initial.hex");
    udp_frame((CLIENT, 40001), (EXAMPLE, 443), &unhex(initial))
}

/// A UDP datagram carrying `payload` from `src` to `dst` (address, port).
fn udp_frame(src: ([u8; 4], u16), dst: ([u8; 4], u16), payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    eth()
        .ipv4(src.0, dst.0, 64)
        .udp(src.1, dst.1)
        .write(&mut out, payload)
        .unwrap();
    out
}

/// The bytes of a hex test vector (white space ignored).
fn unhex(text: &str) -> Vec<u8> {
    hex::decode(text.split_whitespace().collect::<String>()).unwrap()
}

/// A classic pcap of (microseconds after the first packet, frame).
fn write_pcap_timed(path: &Path, packets: &[(u64, Vec<u8>)]) {
    let mut out = Vec::new();
    out.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&4u16.to_le_bytes());
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&65535u32.to_le_bytes());
    out.extend_from_slice(&1u32.to_le_bytes());
    for (at, p) in packets {
        let secs = 1_800_000_000 + u32::try_from(at / 1_000_000).unwrap();
        out.extend_from_slice(&secs.to_le_bytes());
        out.extend_from_slice(&((at % 1_000_000) as u32).to_le_bytes());
        out.extend_from_slice(&(p.len() as u32).to_le_bytes());
        out.extend_from_slice(&(p.len() as u32).to_le_bytes());
        out.extend_from_slice(p);
    }
    std::fs::write(path, out).unwrap();
}

#[test]
fn replay_classifies_split_tls_and_quic() {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIP: needs root");
        return;
    }
    let mut packets = tls_packets();
    packets.push(quic_packet());
    let (records, log) = replay(&packets, &["--record-all"]);
    let find = |protocol: &str, name: &str| {
        records.iter().find(|r| {
            r["network"]["protocol"] == protocol && r["tls"]["client"]["server_name"] == name
        })
    };
    let tls = find("tls", "api.openai.com")
        .unwrap_or_else(|| panic!("no TLS record for api.openai.com: {records:#?}\n{log}"));
    assert_eq!(tls["conduit"]["endpoint"], "openai", "{tls:#}");
    let quic = find("quic", "example.com")
        .unwrap_or_else(|| panic!("no QUIC record for example.com: {records:#?}\n{log}"));
    assert_eq!(quic["conduit"]["endpoint"], "example", "{quic:#}");
}

/// A handshake from CLIENT:`port` to OPENAI:443 whose client payload is `parts`, one
/// segment each, as (TTL, sequence offset from the first payload byte, bytes).
fn tls_flow(port: u16, parts: &[(u8, u32, &[u8])]) -> Vec<Vec<u8>> {
    tls_flow_to(OPENAI, port, parts)
}

/// [`tls_flow`] to `server`.
fn tls_flow_to(server: [u8; 4], port: u16, parts: &[(u8, u32, &[u8])]) -> Vec<Vec<u8>> {
    let (cs, ss) = (7000u32, 9000u32);
    let mut out = vec![
        tcp_frame(
            eth()
                .ipv4(CLIENT, server, 64)
                .tcp(port, 443, cs, 64240)
                .syn(),
            &[],
        ),
        tcp_frame(
            eth()
                .ipv4(server, CLIENT, 64)
                .tcp(443, port, ss, 64240)
                .syn()
                .ack(cs + 1),
            &[],
        ),
    ];
    for (ttl, off, p) in parts {
        out.push(tcp_frame(
            eth()
                .ipv4(CLIENT, server, *ttl)
                .tcp(port, 443, cs + 1 + off, 64240)
                .ack(ss + 1)
                .psh(),
            p,
        ));
    }
    out
}

/// `bytes` cut into `n` in-order segments with TTL 64.
fn segments(bytes: &[u8], n: usize) -> Vec<(u8, u32, &[u8])> {
    let chunk = bytes.len().div_ceil(n);
    bytes
        .chunks(chunk)
        .enumerate()
        .map(|(i, c)| (64, (i * chunk) as u32, c))
        .collect()
}

fn hello_for(name: &str, padding: usize) -> Vec<u8> {
    let mut exts = vec![
        ext(10, &[0, 4, 0, 0x1d, 0, 0x17]),
        sni_ext(name),
        ext(43, &[4, 3, 4, 3, 3]),
    ];
    if padding > 0 {
        exts.push(ext(21, &vec![0; padding]));
    }
    let record = client_hello(&exts);
    // Re-cut the handshake into records of at most 16 KiB, as TLS must.
    let hs = &record[5..];
    let mut out = Vec::new();
    for part in hs.chunks(16_000) {
        out.extend_from_slice(&[22, 3, 1]);
        out.extend_from_slice(&u16::try_from(part.len()).unwrap().to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

/// Issue 10's evasions in the default mode (only AI flows recorded):
/// - a ClientHello in more segments than the kernel copies, and a handshake record
///   that is no ClientHello, are recorded with the anomaly, not left out;
/// - a 20 KiB hello in 15 segments is read whole;
/// - a decoy hello with TTL 1 (it dies at the gateway) does not decide the SNI;
/// - a hello whose bytes arrive twice with different values is flagged, and takes
///   the more severe name: a complete decoy the server ignores (bad TCP checksum,
///   normal TTL) before the real hello or after it, and a decoy prefix overlapped
///   by the real hello, all record api.openai.com and name the decoy;
/// - a hello whose first segment is shorter than a TLS record header is read, and one
///   sent a byte a segment is recorded with the anomaly.
#[test]
fn replay_records_client_hellos_that_defeat_parsing_with_their_anomaly() {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIP: needs root");
        return;
    }
    let hello = hello_for("api.openai.com", 0);
    // More segments than the kernel copies.
    let padded = hello_for("api.openai.com", 800);
    let too_many = usize::from(sensor_common::MAX_PAYLOAD_COPIES) + 12;
    let mut packets = tls_flow(40010, &segments(&padded, too_many));
    // A TLS handshake record whose body is not a ClientHello.
    let mut bogus = vec![0x16, 0x03, 0x01, 0x00, 0x20, 0x01, 0x00, 0x00, 0x1c];
    bogus.extend_from_slice(&[0xff; 28]);
    packets.extend(tls_flow(40011, &[(64, 0, &bogus)]));
    let big = hello_for("api.openai.com", 20_000);
    assert!(big.len() > 20_000);
    packets.extend(tls_flow(40012, &segments(&big, 15)));
    // Same length as the real name, so the decoys cover the same sequence range.
    let decoy = hello_for("api.example.co", 0);
    assert_eq!(decoy.len(), hello.len());
    packets.extend(tls_flow(40013, &[(1, 0, &decoy), (64, 0, &hello)]));
    let cut = decoy.len() - 3;
    packets.extend(tls_flow(40014, &[(64, 0, &decoy[..cut]), (64, 0, &hello)]));
    // The hello's first byte alone, then the rest (a DPI evasion): read whole. Every
    // byte in its own segment: more than the kernel copies, recorded with the anomaly.
    packets.extend(tls_flow(
        40015,
        &[(64, 0, &hello[..1]), (64, 1, &hello[1..])],
    ));
    packets.extend(tls_flow(40016, &segments(&hello, hello.len())));
    // A complete decoy with a bad checksum (a router forwards it, the server drops
    // it), then the real hello at the same sequence number; and the reverse order.
    let harmless = hello_for("harmless.example.org", 0);
    let mut decoy_first = tls_flow(40017, &[(64, 0, &harmless), (64, 0, &hello)]);
    break_tcp_checksum(&mut decoy_first[2]);
    packets.extend(decoy_first);
    let mut decoy_after = tls_flow(40018, &[(64, 0, &hello), (64, 0, &harmless)]);
    break_tcp_checksum(&mut decoy_after[3]);
    packets.extend(decoy_after);
    let (records, log) = replay(&packets, &[]);
    let start = |port: u16| {
        let starts: Vec<_> = records
            .iter()
            .filter(|r| r["event"]["action"] == "flow_start" && r["source"]["port"] == port)
            .collect();
        assert_eq!(starts.len(), 1, "port {port}: {records:#?}\n{log}");
        assert_eq!(starts[0]["network"]["protocol"], "tls", "{:#}", starts[0]);
        starts[0].clone()
    };
    let anomalies = |port: u16| start(port)["conduit"]["anomalies"].clone();
    assert_eq!(
        anomalies(40010),
        serde_json::json!(["client_hello_incomplete"])
    );
    assert_eq!(
        anomalies(40011),
        serde_json::json!(["malformed_client_hello"])
    );
    assert_eq!(
        anomalies(40016),
        serde_json::json!(["client_hello_incomplete"])
    );
    for port in [40012, 40013, 40015] {
        let r = start(port);
        assert_eq!(r["tls"]["client"]["server_name"], "api.openai.com", "{r:#}");
        assert!(r["conduit"]["anomalies"].is_null(), "{r:#}");
    }
    // The last record of each flow: a decoy after the real hello comes once the
    // flow_start is written, and a flow_update says so.
    let last = |port: u16| {
        records
            .iter()
            .rfind(|r| r["source"]["port"] == port)
            .cloned()
            .unwrap()
    };
    assert_eq!(
        start(40018)["tls"]["client"]["server_name"],
        "api.openai.com"
    );
    for (port, decoy) in [
        (40014, "api.example.co"),
        (40017, "harmless.example.org"),
        (40018, "harmless.example.org"),
    ] {
        let r = last(port);
        assert_eq!(r["event"]["action"], "flow_end", "{r:#}");
        assert_eq!(
            r["conduit"]["anomalies"],
            serde_json::json!(["conflicting_retransmission"]),
            "port {port}: {r:#}"
        );
        assert_eq!(r["tls"]["client"]["server_name"], "api.openai.com", "{r:#}");
        assert_eq!(r["conduit"]["endpoint"], "openai", "{r:#}");
        assert_eq!(r["conduit"]["verdict"], "violation", "{r:#}");
        assert_eq!(
            r["conduit"]["conflicting_server_names"],
            serde_json::json!([decoy]),
            "port {port}: {r:#}"
        );
    }
}

/// Corrupts the TCP checksum of an Ethernet/IPv4 (no options) frame.
fn break_tcp_checksum(frame: &mut [u8]) {
    frame[14 + 20 + 16] ^= 0xff;
}

/// Runs `conduit-sensor replay` over `packets` with [`CONDUITS`] and `extra` flags;
/// returns the JSON lines it wrote and its log.
fn replay(packets: &[Vec<u8>], extra: &[&str]) -> (Vec<serde_json::Value>, String) {
    replay_with(CONDUITS, packets, extra)
}

/// [`replay`] with another conduit map.
fn replay_with(map: &str, packets: &[Vec<u8>], extra: &[&str]) -> (Vec<serde_json::Value>, String) {
    let timed: Vec<_> = packets
        .iter()
        .enumerate()
        .map(|(i, p)| (i as u64 * 1000, p.clone()))
        .collect();
    replay_timed(map, &timed, extra)
}

/// [`replay_with`] of packets at given times (microseconds after the first).
fn replay_timed(
    map: &str,
    packets: &[(u64, Vec<u8>)],
    extra: &[&str],
) -> (Vec<serde_json::Value>, String) {
    let dir = tempfile::tempdir().unwrap();
    let (pcap, conduits, jsonl) = (
        dir.path().join("capture.pcap"),
        dir.path().join("conduits.yaml"),
        dir.path().join("out.jsonl"),
    );
    write_pcap_timed(&pcap, packets);
    std::fs::write(&conduits, map).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_conduit-sensor"))
        .arg("replay")
        .args(extra)
        .arg("--conduits")
        .arg(&conduits)
        .arg(&pcap)
        .arg("--jsonl")
        .arg(&jsonl)
        .current_dir(dir.path())
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "replay failed: {out:?}");
    let records = std::fs::read_to_string(&jsonl)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (records, log)
}

/// A TLS 1.3 ServerHello record choosing `cipher` and key-share `group` (with a
/// key of `key_len` bytes), then the ChangeCipherSpec that follows it.
fn server_hello(cipher: u16, group: u16, key_len: usize) -> Vec<u8> {
    let mut exts = vec![0, 43, 0, 2, 3, 4, 0, 51];
    exts.extend_from_slice(&u16::try_from(key_len + 4).unwrap().to_be_bytes());
    exts.extend_from_slice(&group.to_be_bytes());
    exts.extend_from_slice(&u16::try_from(key_len).unwrap().to_be_bytes());
    exts.extend(std::iter::repeat_n(7u8, key_len));
    let mut body = vec![3, 3];
    body.extend_from_slice(&[0x11; 32]);
    body.push(32);
    body.extend_from_slice(&[0x22; 32]);
    body.extend_from_slice(&cipher.to_be_bytes());
    body.push(0);
    body.extend_from_slice(&u16::try_from(exts.len()).unwrap().to_be_bytes());
    body.extend_from_slice(&exts);
    let mut hs = vec![2];
    hs.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut rec = vec![22, 3, 3];
    rec.extend_from_slice(&u16::try_from(hs.len()).unwrap().to_be_bytes());
    rec.extend_from_slice(&hs);
    rec.extend_from_slice(&[20, 3, 3, 0, 1, 1]);
    rec
}

/// The server's reply in a [`tls_flow`] to CLIENT:`port`, after a client payload
/// of `sent` bytes.
fn server_reply(port: u16, sent: usize, payload: &[u8]) -> Vec<u8> {
    let (cs, ss) = (7000u32, 9000u32);
    tcp_frame(
        eth()
            .ipv4(OPENAI, CLIENT, 64)
            .tcp(443, port, ss + 1, 64240)
            .ack(cs + 1 + u32::try_from(sent).unwrap())
            .psh(),
        payload,
    )
}

/// The crypto posture (issue 17): the ServerHello the responder sends first (for QUIC,
/// inside the server's Initial) is copied once, and the flow's records then carry the
/// negotiated version, cipher and group, and whether that group is post-quantum.
#[test]
fn replay_records_what_the_server_hello_negotiated() {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIP: needs root");
        return;
    }
    let hello = hello_for("api.openai.com", 0);
    let mut packets = tls_flow(40020, &[(64, 0, &hello)]);
    // The ServerHello with 2 KB of encrypted records after it in one packet (as a
    // GSO packet carries it): more than the copy bound, and no loss.
    let mut long = server_hello(0x1302, 0x001d, 32);
    long.extend_from_slice(&[23, 3, 3, 0x07, 0xd0]);
    long.extend(std::iter::repeat_n(0x5a, 2000));
    packets.push(server_reply(40020, hello.len(), &long));
    packets.extend(tls_flow(40021, &[(64, 0, &hello)]));
    let pq = server_hello(0x1301, 0x11ec, 1088);
    packets.push(server_reply(40021, hello.len(), &pq));
    // Only the first reply is read: a later one does not change the record.
    packets.push(server_reply(
        40021,
        hello.len(),
        &server_hello(0x1303, 0x0017, 65),
    ));
    // QUIC: RFC 9001's client Initial, and a server Initial aioquic encrypted for it.
    packets.push(quic_packet());
    let initial = include_str!("../src/tls/testdata/aioquic_server_initial.hex");
    packets.push(udp_frame((EXAMPLE, 443), (CLIENT, 40001), &unhex(initial)));
    let (records, log) = replay(&packets, &[]);
    let last = |port: u16| {
        records
            .iter()
            .rfind(|r| r["source"]["port"] == port && r["event"]["action"] == "flow_end")
            .unwrap_or_else(|| panic!("no flow_end for {port}: {records:#?}\n{log}"))
            .clone()
    };
    let payload_losses: Vec<_> = records
        .iter()
        .filter(|r| {
            r["conduit"]["loss"]["reason"]
                .as_str()
                .is_some_and(|x| x.starts_with("payload_"))
        })
        .collect();
    assert!(payload_losses.is_empty(), "{payload_losses:#?}");
    let r = last(40020);
    assert_eq!(r["tls"]["version"], "1.3", "{r:#}");
    assert_eq!(r["tls"]["cipher"], "TLS_AES_256_GCM_SHA384", "{r:#}");
    assert_eq!(r["tls"]["curve"], "x25519", "{r:#}");
    assert_eq!(r["conduit"]["pq"]["negotiated"], false, "{r:#}");
    let r = last(40021);
    assert_eq!(r["tls"]["cipher"], "TLS_AES_128_GCM_SHA256", "{r:#}");
    assert_eq!(r["tls"]["curve"], "X25519MLKEM768", "{r:#}");
    assert_eq!(r["conduit"]["pq"]["negotiated"], true, "{r:#}");
    let r = last(40001);
    assert_eq!(r["network"]["protocol"], "quic", "{r:#}");
    assert_eq!(r["tls"]["version"], "1.3", "{r:#}");
    assert_eq!(r["tls"]["cipher"], "TLS_AES_128_GCM_SHA256", "{r:#}");
    assert_eq!(r["tls"]["curve"], "x25519", "{r:#}");
    assert_eq!(r["conduit"]["pq"]["negotiated"], false, "{r:#}");
}

#[test]
fn replay_names_the_device_or_flags_an_unknown_one() {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIP: needs root");
        return;
    }
    let packets = tls_flow(40030, &[(64, 0, &hello_for("api.openai.com", 0))]);
    let start = |records: &[serde_json::Value], log: &str| {
        records
            .iter()
            .find(|r| r["event"]["action"] == "flow_start" && r["source"]["port"] == 40030)
            .unwrap_or_else(|| panic!("no flow_start: {records:#?}\n{log}"))
            .clone()
    };
    // The client's Ethernet address (eth()) names the asset.
    let listed = CONDUITS.replace(
        "conduits: []\n",
        "conduits: []\nassets:\n  - id: plc-5\n    name: Press line 5 PLC\n    mac: \"02:00:00:00:00:01\"\n    zone: cell-1\n",
    );
    let (records, log) = replay_with(&listed, &packets, &[]);
    let r = start(&records, &log);
    assert_eq!(r["host"]["id"], "plc-5", "{r:#}");
    assert_eq!(r["host"]["name"], "Press line 5 PLC", "{r:#}");
    assert!(r["conduit"]["anomalies"].is_null(), "{r:#}");
    // A zone that admits only listed devices, and the client is not one of them.
    let strict = CONDUITS
        .replace(
            "    networks: [10.10.1.0/24]\n",
            "    networks: [10.10.1.0/24]\n    assets_only: true\n",
        )
        .replace(
            "conduits: []\n",
            "conduits: []\nassets:\n  - id: hmi-9\n    mac: \"02:00:00:00:00:99\"\n",
        );
    let (records, log) = replay_with(&strict, &packets, &[]);
    let r = start(&records, &log);
    assert!(r["host"].is_null(), "{r:#}");
    assert_eq!(
        r["conduit"]["anomalies"],
        serde_json::json!(["unknown_asset"]),
        "{r:#}"
    );
}

/// A DNS name in wire form, uncompressed.
fn dns_name(name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for label in name.split('.').filter(|l| !l.is_empty()) {
        out.push(u8::try_from(label.len()).unwrap());
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out
}

/// One resource record.
fn dns_rr(owner: &str, ty: u16, ttl: u32, rdata: &[u8]) -> Vec<u8> {
    let mut out = dns_name(owner);
    out.extend_from_slice(&ty.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&ttl.to_be_bytes());
    out.extend_from_slice(&u16::try_from(rdata.len()).unwrap().to_be_bytes());
    out.extend_from_slice(rdata);
    out
}

/// A NOERROR response to `qname`/`qtype` with `answers`, written by hand (the
/// agent parses it with its DNS library).
fn dns_response(qname: &str, qtype: u16, answers: &[Vec<u8>]) -> Vec<u8> {
    let mut out = vec![0x12, 0x34, 0x81, 0x80, 0, 1];
    out.extend_from_slice(&u16::try_from(answers.len()).unwrap().to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&dns_name(qname));
    out.extend_from_slice(&qtype.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    for a in answers {
        out.extend_from_slice(a);
    }
    out
}

const RESOLVER: [u8; 4] = [10, 10, 1, 53];
/// An address behind Cloudflare, which DNS gives for api.openai.com.
const CLOUDFLARE: [u8; 4] = [104, 18, 7, 192];

/// A TLS flow from CLIENT:`port` to `server`:443 whose ClientHello names `sni`,
/// with an outer encrypted_client_hello extension when `ech`.
fn hello_flow(server: [u8; 4], port: u16, sni: &str, ech: bool) -> Vec<Vec<u8>> {
    let mut exts = vec![ext(10, &[0, 4, 0, 0x1d, 0, 0x17]), sni_ext(sni)];
    if ech {
        // Outer ECH: type 0, HKDF-SHA256/AES-128-GCM, config id, enc, payload.
        let mut body = vec![0, 0, 1, 0, 1, 7, 0, 32];
        body.extend_from_slice(&[0x42; 32]);
        body.extend_from_slice(&[0, 64]);
        body.extend_from_slice(&[0x17; 64]);
        exts.push(ext(0xfe0d, &body));
    }
    exts.push(ext(43, &[4, 3, 4, 3, 3]));
    let hello = client_hello(&exts);
    tls_flow_to(server, port, &[(64, 0, &hello)])
}

/// DNS correlation through the kernel's copies of DNS responses:
/// - an ECH ClientHello (outer name cloudflare-ech.com) to the address DNS gave for
///   api.openai.com is attributed to the openai endpoint through DNS, with the
///   CNAME chain followed and the HTTPS record's ECH announcement noted;
/// - a ClientHello naming a host DNS resolved elsewhere, sent to the address DNS
///   gave api.openai.com, is flagged `sni_not_resolved` and attributed by DNS;
/// - once the answer's TTL has run out, the same ECH flow is no longer attributed.
#[test]
fn replay_attributes_hidden_names_through_dns_and_flags_forged_ones() {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIP: needs root");
        return;
    }
    let (a, cname, https) = (1u16, 5u16, 65u16);
    let cdn = "api.openai.com.cdn.cloudflare.net";
    let answer = dns_response(
        "api.openai.com",
        a,
        &[
            dns_rr("api.openai.com", cname, 300, &dns_name(cdn)),
            dns_rr(cdn, a, 300, &CLOUDFLARE),
        ],
    );
    // HTTPS 1 . ech=<config> ipv4hint=104.18.7.192
    let mut svcb = vec![0, 1, 0];
    svcb.extend_from_slice(&[0, 4, 0, 4]);
    svcb.extend_from_slice(&CLOUDFLARE);
    svcb.extend_from_slice(&[0, 5, 0, 6, 0, 4, 0xfe, 0x0d, 0, 0]);
    let https_answer = dns_response(
        "api.openai.com",
        https,
        &[dns_rr("api.openai.com", https, 300, &svcb)],
    );
    let decoy = dns_response(
        "harmless.example.org",
        a,
        &[dns_rr("harmless.example.org", a, 300, &[192, 0, 2, 99])],
    );
    let dns = |port: u16, payload: &[u8]| udp_frame((RESOLVER, 53), (CLIENT, port), payload);
    let mut packets: Vec<Vec<u8>> = vec![
        udp_frame((CLIENT, 5300), (RESOLVER, 53), b"\x12\x34\x01\x00query"),
        dns(5300, &answer),
        dns(5301, &https_answer),
        dns(5302, &decoy),
    ];
    packets.extend(hello_flow(CLOUDFLARE, 40040, "cloudflare-ech.com", true));
    packets.extend(hello_flow(CLOUDFLARE, 40041, "harmless.example.org", false));
    let mut timed: Vec<(u64, Vec<u8>)> = packets
        .into_iter()
        .enumerate()
        .map(|(i, p)| (i as u64 * 1000, p))
        .collect();
    // Two hours later (past the 300 s TTL, and past the cache's floor).
    for (i, p) in hello_flow(CLOUDFLARE, 40042, "cloudflare-ech.com", true)
        .into_iter()
        .enumerate()
    {
        timed.push((7_200_000_000 + i as u64 * 1000, p));
    }
    let (records, log) = replay_timed(CONDUITS, &timed, &["--record-all"]);
    let start = |port: u16| {
        records
            .iter()
            .find(|r| r["event"]["action"] == "flow_start" && r["source"]["port"] == port)
            .unwrap_or_else(|| panic!("no flow_start for {port}: {records:#?}\n{log}"))
            .clone()
    };

    let r = start(40040);
    assert_eq!(r["conduit"]["attribution"], "dns", "{r:#}");
    assert_eq!(r["conduit"]["endpoint"], "openai", "{r:#}");
    assert_eq!(r["conduit"]["verdict"], "violation", "{r:#}");
    assert_eq!(r["destination"]["domain"], "api.openai.com", "{r:#}");
    assert_eq!(
        r["tls"]["client"]["server_name"], "cloudflare-ech.com",
        "{r:#}"
    );
    assert_eq!(r["conduit"]["ech"], true, "{r:#}");
    assert_eq!(r["conduit"]["ech_announced"], true, "{r:#}");
    assert!(r["conduit"]["anomalies"].is_null(), "{r:#}");

    let r = start(40041);
    assert_eq!(
        r["conduit"]["anomalies"],
        serde_json::json!(["sni_not_resolved"]),
        "{r:#}"
    );
    assert_eq!(r["conduit"]["attribution"], "dns", "{r:#}");
    assert_eq!(r["conduit"]["endpoint"], "openai", "{r:#}");
    assert_eq!(
        r["tls"]["client"]["server_name"], "harmless.example.org",
        "{r:#}"
    );

    let r = start(40042);
    assert!(r["conduit"]["attribution"].is_null(), "{r:#}");
    assert!(r["conduit"]["endpoint"].is_null(), "{r:#}");
    assert_eq!(r["destination"]["domain"], "cloudflare-ech.com", "{r:#}");
    assert_eq!(r["conduit"]["verdict"], "unclassified", "{r:#}");
}
