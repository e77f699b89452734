//! Building flow records from the kernel's flow table entries. Their JSON view is
//! `conduit_evidence::ecs`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use conduit_proto::v1::{Counts, Flow, Record, Verdict, record::Body};
use sensor_common::{DIR_FORWARD, DIR_REVERSE, FAMILY_IPV4, FlowKey, FlowStats};

use crate::{community_id::community_id_v1, flows::FlowOut, kernel::BootClock};

/// Source and destination of a flow as its initiator sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoints {
    pub src: IpAddr,
    pub src_port: u16,
    pub dst: IpAddr,
    pub dst_port: u16,
}

pub fn ip_of(family: u8, addr: &[u8; 16]) -> IpAddr {
    if family == FAMILY_IPV4 {
        IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(*addr))
    }
}

/// Orients a normalised key by the flow's initiator.
pub fn endpoints(key: &FlowKey, stats: &FlowStats) -> Endpoints {
    let lo = (ip_of(key.family, &key.addr_lo), key.port_lo);
    let hi = (ip_of(key.family, &key.addr_hi), key.port_hi);
    let ((src, src_port), (dst, dst_port)) = if stats.initiator_is_lo != 0 {
        (lo, hi)
    } else {
        (hi, lo)
    };
    Endpoints {
        src,
        src_port,
        dst,
        dst_port,
    }
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// Builds the record of a flow decision.
pub fn flow_record(flow: &FlowOut, clock: &BootClock, ifname: &str) -> Record {
    let ep = endpoints(&flow.key, &flow.stats);
    let s = &flow.stats;
    let c = &flow.class;
    Record {
        kind: flow.kind as i32,
        body: Some(Body::Flow(Flow {
            flow_id: flow.flow_id,
            start_unix_nano: clock.unix_nanos(s.first_seen_ns),
            end_unix_nano: clock.unix_nanos(s.last_seen_ns),
            ingress_interface: ifname.to_string(),
            source_ip: ip_bytes(ep.src),
            source_port: u32::from(ep.src_port),
            destination_ip: ip_bytes(ep.dst),
            destination_port: u32::from(ep.dst_port),
            ip_protocol: u32::from(flow.key.protocol),
            vlan_id: u32::from(flow.key.vlan),
            source_mac: if s.initiator_mac == [0; 6] {
                Vec::new()
            } else {
                s.initiator_mac.to_vec()
            },
            source: Some(Counts {
                bytes: s.bytes[DIR_FORWARD],
                packets: s.packets[DIR_FORWARD],
            }),
            destination: Some(Counts {
                bytes: s.bytes[DIR_REVERSE],
                packets: s.packets[DIR_REVERSE],
            }),
            tcp_flags_source: u32::from(s.tcp_flags[DIR_FORWARD]),
            tcp_flags_destination: u32::from(s.tcp_flags[DIR_REVERSE]),
            community_id: community_id_v1(
                ep.src,
                ep.src_port,
                ep.dst,
                ep.dst_port,
                flow.key.protocol,
            ),
            end_reason: flow.end_reason as i32,
            app_protocol: c.app_protocol.clone().unwrap_or_default(),
            server_name: c.server_name.clone().unwrap_or_default(),
            ja4: c.ja4.clone().unwrap_or_default(),
            // The version the server chose, once known; else the hello's.
            tls_version: c
                .negotiated
                .as_ref()
                .and_then(|n| n.version)
                .map(str::to_owned)
                .or_else(|| c.tls_version.clone())
                .unwrap_or_default(),
            tls_cipher: c
                .negotiated
                .as_ref()
                .map(|n| n.cipher.clone())
                .unwrap_or_default(),
            tls_curve: c
                .negotiated
                .as_ref()
                .and_then(crate::tls::Negotiated::curve)
                .unwrap_or_default(),
            pq_negotiated: c
                .negotiated
                .as_ref()
                .is_some_and(crate::tls::Negotiated::post_quantum),
            alpn: c.alpn.clone(),
            ech: c.ech,
            pq_offered: c.pq_offered,
            anomalies: c.anomalies.iter().map(|a| (*a).to_owned()).collect(),
            zone: c.zone.clone().unwrap_or_default(),
            endpoint: c.endpoint.clone().unwrap_or_default(),
            attribution: c
                .attribution
                .map(|a| a.as_str().to_owned())
                .unwrap_or_default(),
            conduit_id: c.conduit_id.clone().unwrap_or_default(),
            verdict: if c.verdict == Verdict::Unspecified {
                Verdict::Unclassified as i32
            } else {
                c.verdict as i32
            },
            policy_hash: c.policy_hash.clone(),
            // Filled by the agent from the map's assets (`Sink::write_flow`).
            host_id: String::new(),
            host_name: String::new(),
            destination_domain: c.domain.clone().unwrap_or_default(),
            ech_announced: c.ech_announced,
            conflicting_server_names: c.conflicting_server_names.clone(),
        })),
        ..Record::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::Classification;
    use conduit_evidence::ecs::{ChainPosition, ecs_json};
    use conduit_proto::v1::{FlowEndReason, RecordKind};

    fn sample() -> FlowOut {
        let mut key = FlowKey {
            addr_lo: [0; 16],
            addr_hi: [0; 16],
            port_lo: 443,
            port_hi: 51514,
            vlan: 101,
            protocol: 6,
            family: 4,
        };
        key.addr_lo[..4].copy_from_slice(&[10, 10, 1, 5]);
        key.addr_hi[..4].copy_from_slice(&[192, 0, 2, 10]);
        // lo = 10.10.1.5:443? No: lo is (10.10.1.5, 443); the initiator is the hi side.
        let stats = FlowStats {
            first_seen_ns: 1_000,
            last_seen_ns: 2_000,
            packets: [3, 2],
            bytes: [300, 200],
            initiator_is_lo: 0,
            ..FlowStats::default()
        };
        FlowOut {
            kind: RecordKind::FlowStart,
            flow_id: 7,
            key,
            stats,
            class: Classification {
                app_protocol: Some("tls".into()),
                server_name: Some("api.openai.com".into()),
                verdict: Verdict::Violation,
                zone: Some("cell-1".into()),
                endpoint: Some("openai".into()),
                ..Classification::default()
            },
            end_reason: FlowEndReason::Unspecified,
        }
    }

    #[test]
    fn json_has_contract_fields() {
        let clock = BootClock::from_offset(1_700_000_000_000_000_000);
        let mut rec = flow_record(&sample(), &clock, "eth1");
        rec.sensor_id = "gw-01".into();
        rec.site = "plant-01".into();
        rec.time_unix_nano = 1_700_000_000_123_000_000;
        let pos = ChainPosition {
            seq: 17,
            hash: [1; 32],
            prev_hash: [2; 32],
        };
        let j = ecs_json(&rec, &pos);
        assert_eq!(j["@timestamp"], "2023-11-14T22:13:20.123Z");
        assert_eq!(j["event"]["action"], "flow_start");
        assert_eq!(j["event"]["sequence"], 17);
        assert_eq!(j["event"]["hash"], hex::encode([1; 32]));
        assert_eq!(j["chain"]["prev_hash"], hex::encode([2; 32]));
        assert_eq!(j["observer"]["id"], "gw-01");
        assert_eq!(j["observer"]["name"], "gw-01");
        assert_eq!(j["event"]["kind"], "alert");
        assert_eq!(
            j["event"]["type"],
            serde_json::json!(["connection", "start", "allowed"])
        );
        assert_eq!(j["event"]["duration"], 1_000);
        assert_eq!(j["destination"]["domain"], "api.openai.com");
        assert_eq!(j["observer"]["ingress"]["interface"]["name"], "eth1");
        assert_eq!(j["source"]["ip"], "192.0.2.10");
        assert_eq!(j["source"]["port"], 51514);
        assert_eq!(j["source"]["packets"], 3);
        assert_eq!(j["destination"]["ip"], "10.10.1.5");
        assert_eq!(j["destination"]["bytes"], 200);
        assert_eq!(j["network"]["transport"], "tcp");
        assert_eq!(j["network"]["protocol"], "tls");
        assert_eq!(j["network"]["vlan"]["id"], "101");
        assert!(
            j["network"]["community_id"]
                .as_str()
                .is_some_and(|c| c.starts_with("1:"))
        );
        assert_eq!(j["tls"]["client"]["server_name"], "api.openai.com");
        assert_eq!(j["conduit"]["verdict"], "violation");
        assert_eq!(j["conduit"]["site"], "plant-01");
        assert!(j["conduit"]["id"].is_null());
        assert!(
            j["conduit"]
                .as_object()
                .is_some_and(|c| c.contains_key("id"))
        );
    }
}
