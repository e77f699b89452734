//! Building records, and their JSON-lines projection (ECS field names, the contract
//! in DESIGN.md). The protobuf record is the evidence; JSON is a view of it.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use conduit_proto::v1::{Counts, Flow, FlowEndReason, Record, RecordKind, Verdict, record::Body};
use sensor_common::{DIR_FORWARD, DIR_REVERSE, FAMILY_IPV4, FlowKey, FlowStats};
use serde_json::{Map, Value, json};

use crate::{community_id::community_id_v1, flows::FlowOut, kernel::BootClock};

/// Source and destination of a flow as its initiator sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoints {
    pub src: IpAddr,
    pub src_port: u16,
    pub dst: IpAddr,
    pub dst_port: u16,
}

fn ip_of(family: u8, addr: &[u8; 16]) -> IpAddr {
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
            tls_version: c.tls_version.clone().unwrap_or_default(),
            alpn: c.alpn.clone(),
            ech: c.ech,
            zone: c.zone.clone().unwrap_or_default(),
            endpoint: c.endpoint.clone().unwrap_or_default(),
            conduit_id: c.conduit_id.clone().unwrap_or_default(),
            verdict: if c.verdict == Verdict::Unspecified {
                Verdict::Unclassified as i32
            } else {
                c.verdict as i32
            },
            policy_hash: c.policy_hash.clone(),
        })),
        ..Record::default()
    }
}

/// Where a record sits in the chain.
#[derive(Clone, Copy, Debug)]
pub struct ChainPosition {
    pub seq: u64,
    pub hash: [u8; 32],
    pub prev_hash: [u8; 32],
}

/// `event.action` of a record kind.
pub fn action_name(kind: RecordKind) -> &'static str {
    match kind {
        RecordKind::Unspecified => "unspecified",
        RecordKind::FlowStart => "flow_start",
        RecordKind::FlowUpdate => "flow_update",
        RecordKind::FlowEnd => "flow_end",
        RecordKind::Loss => "loss",
        RecordKind::PolicyChange => "policy_change",
        RecordKind::Checkpoint => "checkpoint",
        RecordKind::ChainRestart => "chain_restart",
        RecordKind::SpoolRecovery => "spool_recovery",
        RecordKind::Alarm => "alarm",
    }
}

fn verdict_name(v: i32) -> &'static str {
    match Verdict::try_from(v).unwrap_or(Verdict::Unspecified) {
        Verdict::Authorized => "authorized",
        Verdict::Violation => "violation",
        Verdict::Blocked => "blocked",
        Verdict::Unclassified | Verdict::Unspecified => "unclassified",
    }
}

fn end_reason_name(v: i32) -> Option<&'static str> {
    match FlowEndReason::try_from(v).unwrap_or(FlowEndReason::Unspecified) {
        FlowEndReason::Unspecified => None,
        FlowEndReason::IdleTimeout => Some("idle"),
        FlowEndReason::ActiveTimeout => Some("active"),
        FlowEndReason::EndOfFlow => Some("end"),
        FlowEndReason::ForcedEnd => Some("forced"),
        FlowEndReason::LackOfResources => Some("lack of resources"),
    }
}

/// RFC 3339 UTC with milliseconds, as in the contract (`2026-11-22T10:00:00.123Z`).
pub fn rfc3339(unix_nanos: i64) -> String {
    let t = time::OffsetDateTime::UNIX_EPOCH
        + Duration::from_nanos(u64::try_from(unix_nanos).unwrap_or(0));
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    t.format(&fmt).unwrap_or_default()
}

fn ip_text(bytes: &[u8]) -> Option<String> {
    match bytes.len() {
        4 => Some(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]).to_string()),
        16 => <[u8; 16]>::try_from(bytes)
            .ok()
            .map(|a| Ipv6Addr::from(a).to_string()),
        _ => None,
    }
}

fn non_empty(s: &str) -> Value {
    if s.is_empty() {
        Value::Null
    } else {
        Value::String(s.to_string())
    }
}

/// Drops null members so absent values are omitted.
fn prune(v: Value) -> Value {
    match v {
        Value::Object(map) => {
            let pruned: Map<String, Value> = map
                .into_iter()
                .map(|(k, v)| (k, prune(v)))
                .filter(|(_, v)| !v.is_null() && !matches!(v, Value::Object(m) if m.is_empty()))
                .collect();
            Value::Object(pruned)
        }
        other => other,
    }
}

/// The JSON-lines view of a chained record (ECS names; contract in DESIGN.md).
pub fn ecs_json(record: &Record, pos: &ChainPosition) -> Value {
    let kind = RecordKind::try_from(record.kind).unwrap_or(RecordKind::Unspecified);
    let mut event = json!({
        "action": action_name(kind),
        "sequence": pos.seq,
        "hash": hex::encode(pos.hash),
        "kind": if matches!(kind, RecordKind::Loss | RecordKind::Alarm) { "alert" } else { "event" },
    });
    let mut doc = json!({
        "@timestamp": rfc3339(record.time_unix_nano),
        "chain": {"prev_hash": hex::encode(pos.prev_hash)},
        "observer": {"id": non_empty(&record.sensor_id)},
    });
    let mut conduit = json!({ "site": non_empty(&record.site) });

    match &record.body {
        Some(Body::Flow(f)) => {
            event["start"] = json!(rfc3339(f.start_unix_nano));
            event["end"] = json!(rfc3339(f.end_unix_nano));
            if let Some(reason) = end_reason_name(f.end_reason) {
                event["reason"] = json!(reason);
            }
            doc["observer"]["ingress"] =
                json!({"interface": {"name": non_empty(&f.ingress_interface)}});
            let counts = |c: &Option<Counts>| c.unwrap_or_default();
            let (s, d) = (counts(&f.source), counts(&f.destination));
            doc["source"] = json!({"ip": ip_text(&f.source_ip), "port": f.source_port, "bytes": s.bytes, "packets": s.packets});
            doc["destination"] = json!({"ip": ip_text(&f.destination_ip), "port": f.destination_port, "bytes": d.bytes, "packets": d.packets});
            let transport = match f.ip_protocol {
                6 => "tcp".to_string(),
                17 => "udp".to_string(),
                n => n.to_string(),
            };
            doc["network"] = json!({
                "transport": transport,
                "iana_number": f.ip_protocol.to_string(),
                "protocol": non_empty(&f.app_protocol),
                "community_id": non_empty(&f.community_id),
                "bytes": s.bytes + d.bytes,
                "packets": s.packets + d.packets,
                "vlan": if f.vlan_id != 0 { json!({"id": f.vlan_id}) } else { Value::Null },
            });
            if !f.server_name.is_empty() || !f.ja4.is_empty() || !f.tls_version.is_empty() {
                doc["tls"] = json!({
                    "client": {"server_name": non_empty(&f.server_name), "ja4": non_empty(&f.ja4)},
                    "version": non_empty(&f.tls_version),
                    "version_protocol": if f.tls_version.is_empty() { Value::Null } else { json!("tls") },
                    "next_protocol": f.alpn.first().map(|a| json!(a)).unwrap_or(Value::Null),
                });
                if f.ech {
                    doc["tls"]["client"]["ech"] = json!(true);
                }
            }
            conduit["zone"] = non_empty(&f.zone);
            conduit["endpoint"] = non_empty(&f.endpoint);
            conduit["verdict"] = json!(verdict_name(f.verdict));
            conduit["policy_hash"] = if f.policy_hash.is_empty() {
                Value::Null
            } else {
                json!(hex::encode(&f.policy_hash))
            };
            conduit["flow_id"] = json!(f.flow_id);
            // `conduit.id` is part of the contract: null when no conduit allows the flow.
            let id = non_empty(&f.conduit_id);
            doc["conduit"] = prune(conduit);
            doc["conduit"]["id"] = id;
            doc["event"] = event;
            return prune_top(doc);
        }
        Some(Body::Loss(l)) => {
            conduit["loss"] = json!({"reason": l.reason, "count": l.count, "unit": non_empty(&l.unit), "origin": non_empty(&l.origin), "detail": non_empty(&l.detail)});
            event["reason"] = json!(l.reason);
        }
        Some(Body::PolicyChange(p)) => {
            conduit["policy_hash"] = json!(hex::encode(&p.policy_hash));
            conduit["policy"] = json!({"path": non_empty(&p.path), "zones": p.zones, "endpoints": p.endpoints, "conduits": p.conduits, "enforcement": p.enforcement, "trigger": non_empty(&p.trigger)});
        }
        Some(Body::Checkpoint(c)) => {
            conduit["checkpoint"] = json!({"seq": c.seq, "hash": hex::encode(&c.hash), "public_key": hex::encode(&c.public_key), "signature": hex::encode(&c.signature), "records_since_last": c.records_since_last});
        }
        Some(Body::ChainRestart(c)) => {
            event["reason"] = json!(c.reason);
            conduit["chain_restart"] = json!({"reason": c.reason, "detail": non_empty(&c.detail), "public_key": hex::encode(&c.public_key)});
        }
        Some(Body::SpoolRecovery(r)) => {
            conduit["spool_recovery"] = json!({"segment": r.segment, "truncated_bytes": r.truncated_bytes, "last_good_seq": r.last_good_seq, "detail": non_empty(&r.detail)});
        }
        Some(Body::Alarm(a)) => {
            event["reason"] = json!(a.kind);
            conduit["alarm"] = json!({"kind": a.kind, "sensor_id": non_empty(&a.sensor_id), "seq": a.seq, "detail": non_empty(&a.detail)});
        }
        None => {}
    }
    doc["event"] = event;
    doc["conduit"] = conduit;
    prune_top(doc)
}

/// Prunes nulls everywhere except `conduit.id` and `chain.prev_hash`, which the
/// contract shows even when null.
fn prune_top(doc: Value) -> Value {
    let conduit_id = doc.get("conduit").and_then(|c| c.get("id")).cloned();
    let mut doc = prune(doc);
    if let Some(id) = conduit_id
        && let Some(c) = doc.get_mut("conduit")
    {
        c["id"] = id;
    }
    doc
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::Classification;

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
        assert_eq!(j["observer"]["ingress"]["interface"]["name"], "eth1");
        assert_eq!(j["source"]["ip"], "192.0.2.10");
        assert_eq!(j["source"]["port"], 51514);
        assert_eq!(j["source"]["packets"], 3);
        assert_eq!(j["destination"]["ip"], "10.10.1.5");
        assert_eq!(j["destination"]["bytes"], 200);
        assert_eq!(j["network"]["transport"], "tcp");
        assert_eq!(j["network"]["protocol"], "tls");
        assert_eq!(j["network"]["vlan"]["id"], 101);
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
