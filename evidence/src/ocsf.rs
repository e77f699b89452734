//! The OCSF view of a chained record (`conduit-collector run --format ocsf`), for
//! Security Lake and other OCSF consumers. Schema 1.8.0; its definitions (compiled
//! from the release) are vendored in `evidence/schema/ocsf-1.8.0/` and the tests
//! check every record kind against them.
//!
//! - Flow records are **Network Activity** (class 4001): `flow_start` is activity
//!   Open, `flow_update` Traffic, `flow_end` Close (Reset when the flow ended with a
//!   RST). Source and destination endpoints, `connection_info` (protocol, Community
//!   ID, outbound), `traffic` (out = what the initiator sent), `tls` (SNI, version),
//!   the verdict as `action_id`/`disposition_id` (a violation in monitoring mode was
//!   allowed, a blocked flow denied) and `severity_id` (High for a violation, Medium
//!   for blocked, else Informational).
//! - The records about the evidence itself (loss, policy change, checkpoint, chain
//!   restart, spool recovery, collector alarm) fit no OCSF activity class: they are
//!   the **Base Event** (class 0, activity Other) with a `message`, and their
//!   content under `unmapped`.
//!
//! Always: `metadata.product` (Conduit Sensor and the version that made the record),
//! `metadata.uid` the record's chain hash, `metadata.sequence` its seq, and
//! `unmapped.conduit` with the conduit fields of the ECS view (zone, endpoint,
//! conduit id, verdict, policy hash, attribution, anomalies, ...), `unmapped.chain`
//! and `unmapped.observer` (the sensor).

use conduit_proto::v1::{Counts, Record, RecordKind, Verdict, record::Body};
use serde_json::{Value, json};

use crate::ecs::{ChainPosition, PRODUCT, action_name, ecs_json, ip_text, mac_text, verdict_name};

/// The OCSF release the output follows (`metadata.version`).
pub const OCSF_VERSION: &str = "1.8.0";

const NETWORK_ACTIVITY: u64 = 4001;
const TCP_RST: u32 = 0x04;

fn ms(unix_nanos: i64) -> i64 {
    unix_nanos.div_euclid(1_000_000)
}

fn severity_name(id: u64) -> &'static str {
    match id {
        1 => "Informational",
        3 => "Medium",
        4 => "High",
        5 => "Critical",
        _ => "Unknown",
    }
}

/// The OCSF event of a chained record.
pub fn ocsf_json(record: &Record, pos: &ChainPosition) -> Value {
    let kind = RecordKind::try_from(record.kind).unwrap_or(RecordKind::Unspecified);
    let ecs = ecs_json(record, pos);
    let mut metadata = json!({
        "product": {"name": PRODUCT, "vendor_name": PRODUCT},
        "version": OCSF_VERSION,
        "uid": hex::encode(pos.hash),
        "log_name": action_name(kind),
    });
    if !record.software_version.is_empty() {
        metadata["product"]["version"] = json!(record.software_version);
    }
    // OCSF's sequence is a 32-bit integer; the exact seq is under unmapped.
    if let Ok(seq) = i32::try_from(pos.seq) {
        metadata["sequence"] = json!(seq);
    }
    let unmapped = json!({
        "conduit": ecs.get("conduit").cloned().unwrap_or_else(|| json!({})),
        "chain": {"seq": pos.seq, "prev_hash": hex::encode(pos.prev_hash)},
        "observer": {"id": record.sensor_id},
        "event": {"action": action_name(kind)},
    });
    let time = ms(record.time_unix_nano);
    let Some(Body::Flow(f)) = &record.body else {
        let (severity, message) = evidence_event(record);
        return json!({
            "class_uid": 0,
            "class_name": "Base Event",
            "category_uid": 0,
            "category_name": "Uncategorized",
            "activity_id": 99,
            "activity_name": "Other",
            "type_uid": 99,
            "type_name": "Base Event: Other",
            "severity_id": severity,
            "severity": severity_name(severity),
            "time": time,
            "message": message,
            "metadata": metadata,
            "unmapped": unmapped,
        });
    };
    let (activity, activity_name) = match kind {
        RecordKind::FlowStart => (1, "Open"),
        RecordKind::FlowEnd if (f.tcp_flags_source | f.tcp_flags_destination) & TCP_RST != 0 => {
            (3, "Reset")
        }
        RecordKind::FlowEnd => (2, "Close"),
        _ => (6, "Traffic"),
    };
    let verdict = Verdict::try_from(f.verdict).unwrap_or(Verdict::Unspecified);
    let severity = match verdict {
        Verdict::Violation => 4,
        Verdict::Blocked => 3,
        _ => 1,
    };
    // action: what happened to the traffic; disposition: the sensor's outcome.
    let (action, action_name_, disposition, disposition_name) = match verdict {
        Verdict::Authorized | Verdict::Violation => (1, "Allowed", 1, "Allowed"),
        Verdict::Blocked => (2, "Denied", 2, "Blocked"),
        Verdict::Unclassified | Verdict::Unspecified => (3, "Observed", 0, "Unknown"),
    };
    let counts = |c: &Option<Counts>| c.unwrap_or_default();
    let (out, back) = (counts(&f.source), counts(&f.destination));
    let mut src = json!({"port": f.source_port});
    if let Some(ip) = ip_text(&f.source_ip) {
        src["ip"] = json!(ip);
    }
    if let Some(mac) = mac_text(&f.source_mac) {
        src["mac"] = json!(mac);
    }
    // The device that initiated the flow (the map's `assets:`).
    if !f.host_id.is_empty() {
        src["uid"] = json!(f.host_id);
    }
    if !f.host_name.is_empty() {
        src["name"] = json!(f.host_name);
    }
    if f.vlan_id != 0 {
        src["vlan_uid"] = json!(f.vlan_id.to_string());
    }
    if !f.ingress_interface.is_empty() {
        src["interface_name"] = json!(f.ingress_interface);
    }
    let mut dst = json!({"port": f.destination_port});
    if let Some(ip) = ip_text(&f.destination_ip) {
        dst["ip"] = json!(ip);
    }
    // The attributed name (SNI or DNS); records from before it existed carry the SNI.
    let domain = if f.destination_domain.is_empty() {
        &f.server_name
    } else {
        &f.destination_domain
    };
    if !domain.is_empty() {
        dst["domain"] = json!(domain);
    }
    let mut connection = json!({
        "protocol_num": f.ip_protocol,
        // OT zone to AI endpoint: the initiator is inside, the endpoint outside.
        "direction_id": 2,
        "direction": "Outbound",
    });
    match f.ip_protocol {
        6 => connection["protocol_name"] = json!("tcp"),
        17 => connection["protocol_name"] = json!("udp"),
        _ => {}
    }
    if !f.community_id.is_empty() {
        connection["community_uid"] = json!(f.community_id);
    }
    let mut doc = json!({
        "class_uid": NETWORK_ACTIVITY,
        "class_name": "Network Activity",
        "category_uid": 4,
        "category_name": "Network Activity",
        "activity_id": activity,
        "activity_name": activity_name,
        "type_uid": NETWORK_ACTIVITY * 100 + activity,
        "type_name": format!("Network Activity: {activity_name}"),
        "severity_id": severity,
        "severity": severity_name(severity),
        "action_id": action,
        "action": action_name_,
        "disposition_id": disposition,
        "disposition": disposition_name,
        "time": time,
        "start_time": ms(f.start_unix_nano),
        "end_time": ms(f.end_unix_nano),
        "duration": ms(f.end_unix_nano.saturating_sub(f.start_unix_nano).max(0)),
        "message": format!(
            "{} {}: {}:{} -> {}:{}{}",
            action_name(kind),
            verdict_name(f.verdict),
            ip_text(&f.source_ip).unwrap_or_default(),
            f.source_port,
            ip_text(&f.destination_ip).unwrap_or_default(),
            f.destination_port,
            if f.server_name.is_empty() { String::new() } else { format!(" ({})", f.server_name) }
        ),
        "src_endpoint": src,
        "dst_endpoint": dst,
        "connection_info": connection,
        "traffic": {
            "bytes_out": out.bytes,
            "bytes_in": back.bytes,
            "bytes": out.bytes + back.bytes,
            "packets_out": out.packets,
            "packets_in": back.packets,
            "packets": out.packets + back.packets,
        },
        "metadata": metadata,
        "unmapped": unmapped,
    });
    if !f.tls_version.is_empty() || !f.server_name.is_empty() {
        // `version` is required in the tls object: "unknown" when the hello did not say.
        let mut tls = json!({"version": if f.tls_version.is_empty() { "unknown" } else { f.tls_version.as_str() }});
        if !f.server_name.is_empty() {
            tls["sni"] = json!(f.server_name);
        }
        if !f.tls_cipher.is_empty() {
            tls["cipher"] = json!(f.tls_cipher);
        }
        doc["tls"] = tls;
    }
    if !f.ja4.is_empty() {
        doc["unmapped"]["tls"] = json!({"ja4": f.ja4, "alpn": f.alpn});
    }
    // OCSF's tls object has no key-exchange group (conduit.pq is in unmapped.conduit).
    if !f.tls_curve.is_empty() {
        doc["unmapped"]["tls"]["curve"] = json!(f.tls_curve);
    }
    doc
}

/// Severity and message of a record about the evidence itself.
fn evidence_event(record: &Record) -> (u64, String) {
    match &record.body {
        Some(Body::Loss(l)) => (
            3,
            format!(
                "loss: {} {} {} lost ({})",
                l.reason, l.count, l.unit, l.origin
            ),
        ),
        Some(Body::PolicyChange(p)) => (
            1,
            format!(
                "policy change ({}): {} zones, {} endpoints, {} conduits",
                p.trigger, p.zones, p.endpoints, p.conduits
            ),
        ),
        Some(Body::Checkpoint(c)) => (1, format!("checkpoint at seq {}", c.seq)),
        Some(Body::ChainRestart(c)) => (3, format!("chain restart: {}", c.reason)),
        Some(Body::SpoolRecovery(r)) => (
            3,
            format!("spool recovery: {} bytes truncated", r.truncated_bytes),
        ),
        Some(Body::Alarm(a)) => (
            5,
            format!("collector alarm {} about {}", a.kind, a.sensor_id),
        ),
        Some(Body::Flow(_)) | None => (0, String::new()),
    }
}
