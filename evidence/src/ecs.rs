//! The JSON-lines view of a chained record (ECS field names, the contract in
//! DESIGN.md). The protobuf record is the evidence; JSON is a view of it, rendered the
//! same way by the agent (`--jsonl`) and by the collector's exports.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use conduit_proto::v1::{Counts, FlowEndReason, Record, RecordKind, Verdict, record::Body};
use serde_json::{Value, json};

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

/// `conduit.verdict` of a flow's verdict value.
pub fn verdict_name(v: i32) -> &'static str {
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

/// An address field of a flow as text (None unless 4 or 16 bytes).
pub fn ip_text(bytes: &[u8]) -> Option<String> {
    match bytes.len() {
        4 => Some(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]).to_string()),
        16 => <[u8; 16]>::try_from(bytes)
            .ok()
            .map(|a| Ipv6Addr::from(a).to_string()),
        _ => None,
    }
}

/// A MAC address as ECS writes it: upper-case hex pairs joined by `-` (None unless
/// 6 bytes).
pub fn mac_text(bytes: &[u8]) -> Option<String> {
    (bytes.len() == 6).then(|| {
        bytes
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<Vec<_>>()
            .join("-")
    })
}

fn non_empty(s: &str) -> Value {
    if s.is_empty() {
        Value::Null
    } else {
        Value::String(s.to_string())
    }
}

/// Drops null members, and objects that only held nulls, so absent values are
/// omitted. In place: rebuilding every object (collect into a new map) was a
/// third of a record's JSON time.
fn prune(mut v: Value) -> Value {
    prune_in_place(&mut v);
    v
}

fn prune_in_place(v: &mut Value) {
    if let Value::Object(map) = v {
        map.retain(|_, v| {
            prune_in_place(v);
            !v.is_null() && !matches!(v, Value::Object(m) if m.is_empty())
        });
    }
}

/// The ECS release the JSON lines follow (`ecs.version`); its field definitions are
/// vendored in `evidence/schema/ecs-<version>/` and the tests check every line against
/// them.
pub const ECS_VERSION: &str = "9.4.0";

/// `observer.product` and `observer.vendor`.
pub const PRODUCT: &str = "Conduit Sensor";

/// ECS `event.kind`: `alert` for a flow the conduit map does not authorize (a
/// violation, or blocked), else `event`. Loss records and collector alarms are
/// events about the evidence, not detections: SIEM content keys on their
/// `event.action`.
fn event_kind(record: &Record) -> &'static str {
    match &record.body {
        Some(Body::Flow(f))
            if matches!(
                Verdict::try_from(f.verdict),
                Ok(Verdict::Violation | Verdict::Blocked)
            ) =>
        {
            "alert"
        }
        _ => "event",
    }
}

/// ECS `event.category` and `event.type` (arrays of ECS's allowed values). A flow is
/// `network`/`connection` with `start`, `end` or `info` (an update), and `allowed`
/// or `denied` once the conduit map decided: a violation in monitoring mode went
/// through (`allowed`; `event.kind: alert` flags it), a blocked flow did not. A
/// policy change is `configuration`/`change`. Records about the evidence itself
/// (checkpoints, loss, restarts, alarms) have no ECS category.
fn categorization(kind: RecordKind, record: &Record) -> (Value, Value) {
    match &record.body {
        Some(Body::Flow(f)) => {
            let mut types = vec!["connection"];
            types.push(match kind {
                RecordKind::FlowStart => "start",
                RecordKind::FlowEnd => "end",
                _ => "info",
            });
            match Verdict::try_from(f.verdict).unwrap_or(Verdict::Unspecified) {
                Verdict::Authorized | Verdict::Violation => types.push("allowed"),
                Verdict::Blocked => types.push("denied"),
                Verdict::Unclassified | Verdict::Unspecified => {}
            }
            (json!(["network"]), json!(types))
        }
        Some(Body::PolicyChange(_)) => (json!(["configuration"]), json!(["change"])),
        _ => (Value::Null, Value::Null),
    }
}

/// The JSON-lines view of a chained record (ECS names; contract in DESIGN.md).
pub fn ecs_json(record: &Record, pos: &ChainPosition) -> Value {
    let kind = RecordKind::try_from(record.kind).unwrap_or(RecordKind::Unspecified);
    let (category, types) = categorization(kind, record);
    let mut event = json!({
        "action": action_name(kind),
        "sequence": pos.seq,
        "hash": hex::encode(pos.hash),
        "kind": event_kind(record),
        "category": category,
        "type": types,
    });
    let mut doc = json!({
        "@timestamp": rfc3339(record.time_unix_nano),
        "ecs": {"version": ECS_VERSION},
        "chain": {"prev_hash": hex::encode(pos.prev_hash)},
        "observer": {
            "id": non_empty(&record.sensor_id),
            "name": non_empty(&record.sensor_id),
            "type": "sensor",
            "product": PRODUCT,
            "vendor": PRODUCT,
            "version": non_empty(&record.software_version),
        },
    });
    let mut conduit = json!({ "site": non_empty(&record.site) });

    match &record.body {
        Some(Body::Flow(f)) => {
            event["start"] = json!(rfc3339(f.start_unix_nano));
            event["end"] = json!(rfc3339(f.end_unix_nano));
            event["duration"] = json!(f.end_unix_nano.saturating_sub(f.start_unix_nano).max(0));
            if let Some(reason) = end_reason_name(f.end_reason) {
                event["reason"] = json!(reason);
            }
            doc["observer"]["ingress"] =
                json!({"interface": {"name": non_empty(&f.ingress_interface)}});
            let counts = |c: &Option<Counts>| c.unwrap_or_default();
            let (s, d) = (counts(&f.source), counts(&f.destination));
            doc["source"] = json!({"ip": ip_text(&f.source_ip), "port": f.source_port, "bytes": s.bytes, "packets": s.packets, "mac": mac_text(&f.source_mac)});
            doc["destination"] = json!({"ip": ip_text(&f.destination_ip), "port": f.destination_port, "bytes": d.bytes, "packets": d.packets, "domain": non_empty(if f.destination_domain.is_empty() { &f.server_name } else { &f.destination_domain })});
            // The device that initiated the flow (the map's `assets:`).
            if !f.host_id.is_empty() {
                doc["host"] = json!({"id": f.host_id, "name": non_empty(&f.host_name)});
            }
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
                // ECS types the VLAN id as a keyword.
                "vlan": if f.vlan_id != 0 { json!({"id": f.vlan_id.to_string()}) } else { Value::Null },
            });
            if !f.server_name.is_empty() || !f.ja4.is_empty() || !f.tls_version.is_empty() {
                doc["tls"] = json!({
                    "client": {"server_name": non_empty(&f.server_name), "ja4": non_empty(&f.ja4)},
                    "version": non_empty(&f.tls_version),
                    "version_protocol": if f.tls_version.is_empty() { Value::Null } else { json!("tls") },
                    "next_protocol": f.alpn.first().map(|a| json!(a)).unwrap_or(Value::Null),
                    "cipher": non_empty(&f.tls_cipher),
                    "curve": non_empty(&f.tls_curve),
                });
            }
            // ECS has no field for Encrypted Client Hello.
            if f.ech {
                conduit["ech"] = json!(true);
            }
            if f.ech_announced {
                conduit["ech_announced"] = json!(true);
            }
            // Post-quantum key exchange: offered, known once the ClientHello was
            // parsed; negotiated, once the ServerHello was.
            if !f.ja4.is_empty() || !f.tls_cipher.is_empty() {
                conduit["pq"] = json!({
                    "offered": if f.ja4.is_empty() { Value::Null } else { json!(f.pq_offered) },
                    "negotiated": if f.tls_cipher.is_empty() { Value::Null } else { json!(f.pq_negotiated) },
                });
            }
            if !f.anomalies.is_empty() {
                conduit["anomalies"] = json!(f.anomalies);
            }
            if !f.conflicting_server_names.is_empty() {
                conduit["conflicting_server_names"] = json!(f.conflicting_server_names);
            }
            conduit["zone"] = non_empty(&f.zone);
            conduit["endpoint"] = non_empty(&f.endpoint);
            conduit["attribution"] = non_empty(&f.attribution);
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
mod prune_tests {
    use serde_json::json;

    use super::prune;

    #[test]
    fn drops_nulls_and_objects_left_empty_keeps_the_rest() {
        let doc = json!({
            "a": null,
            "b": {"c": null, "d": {"e": null}},
            "f": {"g": 0, "h": null, "i": "", "j": [null, {}], "k": {}},
            "l": false
        });
        assert_eq!(
            prune(doc),
            json!({"f": {"g": 0, "i": "", "j": [null, {}]}, "l": false})
        );
    }
}
