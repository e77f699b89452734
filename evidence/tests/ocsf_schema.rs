//! The OCSF events against the OCSF release they name (`metadata.version`), read from
//! the vendored compiled schema (`evidence/schema/ocsf-<version>/schema.json`).

use std::path::Path;
use std::sync::LazyLock;

use conduit_evidence::ecs::ChainPosition;
use conduit_evidence::ocsf::{OCSF_VERSION, ocsf_json};
use conduit_proto::v1::{
    Alarm, ChainRestart, Checkpoint, Counts, Flow, Loss, PolicyChange, Record, RecordKind,
    SpoolRecovery, Verdict, record::Body,
};
use serde_json::{Map, Value, json};

static SCHEMA: LazyLock<Value> = LazyLock::new(|| {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("schema/ocsf-{OCSF_VERSION}/schema.json"));
    serde_json::from_str(&std::fs::read_to_string(path).expect("vendored OCSF schema"))
        .expect("schema JSON")
});

/// The base type (`string_t`, `integer_t`, `long_t`, ...) of an OCSF type.
fn base_type(ty: &str) -> String {
    let mut t = ty.to_owned();
    while let Some(parent) = SCHEMA["types"][&t]["type"].as_str() {
        if parent == t {
            break;
        }
        t = parent.to_owned();
    }
    t
}

fn scalar_problem(path: &str, ty: &str, v: &Value) -> Option<String> {
    let base = base_type(ty);
    let ok = match base.as_str() {
        "string_t" => v.is_string(),
        "integer_t" => v.as_i64().is_some_and(|n| i32::try_from(n).is_ok()),
        "long_t" => v.is_i64() || v.is_u64(),
        "float_t" => v.is_number(),
        "boolean_t" => v.is_boolean(),
        "json_t" => true,
        "object" => v.is_object(),
        other => return Some(format!("{path}: unknown OCSF type {other}")),
    };
    if !ok {
        return Some(format!("{path}: {v} is not an OCSF {ty} ({base})"));
    }
    if let Some([lo, hi]) = SCHEMA["types"][ty]["range"]
        .as_array()
        .map(|r| r.as_slice())
        && let (Some(lo), Some(hi), Some(n)) = (lo.as_i64(), hi.as_i64(), v.as_i64())
        && !(lo..=hi).contains(&n)
    {
        return Some(format!("{path}: {n} outside {ty}'s range {lo}..={hi}"));
    }
    None
}

/// Every problem of `doc` against the attributes of a class or object.
fn check(path: &str, doc: &Value, attrs: &Map<String, Value>, out: &mut Vec<String>) {
    let Some(fields) = doc.as_object() else {
        out.push(format!("{path}: not an object"));
        return;
    };
    for (name, value) in fields {
        let at = if path.is_empty() {
            name.clone()
        } else {
            format!("{path}.{name}")
        };
        let Some(def) = attrs.get(name) else {
            out.push(format!("{at}: not an attribute of this class or object"));
            continue;
        };
        let ty = def["type"].as_str().unwrap_or_default();
        let items: Vec<&Value> = match (def["is_array"].as_bool().unwrap_or(false), value) {
            (true, Value::Array(items)) => items.iter().collect(),
            (true, v) => {
                out.push(format!("{at}: {v} should be an array"));
                continue;
            }
            (false, Value::Array(_)) => {
                out.push(format!("{at}: an array, OCSF has a single value"));
                continue;
            }
            (false, v) => vec![v],
        };
        for v in items {
            // `object` (e.g. `unmapped`) is OCSF's free-form object.
            if ty == "object" {
                if !v.is_object() {
                    out.push(format!("{at}: {v} is not an object"));
                }
                continue;
            }
            if let Some(object) = SCHEMA["objects"][ty]["attributes"].as_object() {
                check(&at, v, object, out);
                continue;
            }
            if let Some(p) = scalar_problem(&at, ty, v) {
                out.push(p);
            }
            if let Some(values) = def["enum"].as_object()
                && !values.contains_key(&v.to_string())
            {
                out.push(format!("{at}: {v} is not one of its enum values"));
            }
        }
    }
    for (name, def) in attrs {
        // Attributes of a profile are required only where the profile applies (none here).
        if def["requirement"] == "required"
            && def.get("profile").is_none()
            && !fields.contains_key(name)
        {
            let at = if path.is_empty() {
                name.clone()
            } else {
                format!("{path}.{name}")
            };
            out.push(format!("{at}: required, missing"));
        }
    }
}

fn problems(doc: &Value) -> Vec<String> {
    let class = match doc["class_uid"].as_u64() {
        Some(4001) => "network_activity",
        Some(0) => "base_event",
        other => return vec![format!("class_uid {other:?}: not a vendored class")],
    };
    let mut out = Vec::new();
    let attrs = SCHEMA["classes"][class]["attributes"]
        .as_object()
        .expect("class attributes");
    check("", doc, attrs, &mut out);
    if doc["type_uid"].as_u64()
        != Some(
            doc["class_uid"].as_u64().unwrap_or(0) * 100 + doc["activity_id"].as_u64().unwrap_or(0),
        )
    {
        out.push("type_uid is not class_uid * 100 + activity_id".to_owned());
    }
    out
}

fn flow(kind: RecordKind, verdict: Verdict) -> Record {
    Record {
        kind: kind as i32,
        time_unix_nano: 1_700_000_002_000_000_000,
        sensor_id: "gw-01".into(),
        site: "plant-01".into(),
        software_version: "0.1.0".into(),
        body: Some(Body::Flow(Flow {
            flow_id: 7,
            start_unix_nano: 1_700_000_000_000_000_000,
            end_unix_nano: 1_700_000_001_500_000_000,
            ingress_interface: "eth1".into(),
            source_ip: vec![10, 10, 1, 5],
            source_port: 51514,
            destination_ip: vec![
                0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
            ],
            destination_port: 443,
            ip_protocol: 6,
            vlan_id: 101,
            source: Some(Counts {
                bytes: 300,
                packets: 3,
            }),
            destination: Some(Counts {
                bytes: 200,
                packets: 2,
            }),
            tcp_flags_source: if kind == RecordKind::FlowEnd {
                0x14
            } else {
                0x1b
            },
            community_id: "1:abc=".into(),
            app_protocol: "tls".into(),
            server_name: "api.openai.com".into(),
            ja4: "t13d1516h2_8daaf6152771_02713d6af862".into(),
            tls_version: "1.3".into(),
            alpn: vec!["h2".into()],
            zone: "cell-1".into(),
            endpoint: "openai".into(),
            verdict: verdict as i32,
            policy_hash: vec![9; 32],
            attribution: "sni".into(),
            source_mac: vec![2, 0, 0x5e, 0x10, 0, 1],
            host_id: "plc-7".into(),
            host_name: "Press line 7 PLC".into(),
            pq_offered: true,
            tls_cipher: "TLS_AES_128_GCM_SHA256".into(),
            tls_curve: "x25519".into(),
            ..Flow::default()
        })),
    }
}

fn every_record() -> Vec<Record> {
    let rec = |kind: RecordKind, body: Body| Record {
        kind: kind as i32,
        time_unix_nano: 1_700_000_002_000_000_000,
        sensor_id: "gw-01".into(),
        site: String::new(),
        software_version: "0.1.0".into(),
        body: Some(body),
    };
    let mut out = Vec::new();
    for kind in [
        RecordKind::FlowStart,
        RecordKind::FlowUpdate,
        RecordKind::FlowEnd,
    ] {
        for v in [
            Verdict::Authorized,
            Verdict::Violation,
            Verdict::Blocked,
            Verdict::Unclassified,
        ] {
            out.push(flow(kind, v));
        }
    }
    out.push(rec(
        RecordKind::Loss,
        Body::Loss(Loss {
            reason: "ringbuf_full".into(),
            count: 3,
            unit: "event".into(),
            origin: "kernel".into(),
            detail: String::new(),
        }),
    ));
    out.push(rec(
        RecordKind::PolicyChange,
        Body::PolicyChange(PolicyChange {
            policy_hash: vec![1; 32],
            trigger: "reload".into(),
            ..PolicyChange::default()
        }),
    ));
    out.push(rec(
        RecordKind::Checkpoint,
        Body::Checkpoint(Checkpoint {
            seq: 9,
            hash: vec![2; 32],
            ..Checkpoint::default()
        }),
    ));
    out.push(rec(
        RecordKind::ChainRestart,
        Body::ChainRestart(ChainRestart {
            reason: "no_spool".into(),
            ..ChainRestart::default()
        }),
    ));
    out.push(rec(
        RecordKind::SpoolRecovery,
        Body::SpoolRecovery(SpoolRecovery {
            truncated_bytes: 17,
            ..SpoolRecovery::default()
        }),
    ));
    out.push(rec(
        RecordKind::Alarm,
        Body::Alarm(Alarm {
            kind: "gap".into(),
            sensor_id: "gw-02".into(),
            seq: 5,
            detail: String::new(),
        }),
    ));
    out
}

fn events() -> Vec<Value> {
    let pos = ChainPosition {
        seq: 17,
        hash: [1; 32],
        prev_hash: [2; 32],
    };
    every_record().iter().map(|r| ocsf_json(r, &pos)).collect()
}

#[test]
fn every_record_kind_conforms_to_ocsf() {
    for doc in events() {
        let p = problems(&doc);
        assert!(p.is_empty(), "{doc:#}\n{p:#?}");
        assert_eq!(doc["metadata"]["version"], OCSF_VERSION);
        assert_eq!(doc["metadata"]["uid"], hex::encode([1; 32]));
    }
}

#[test]
fn flows_are_network_activity_with_what_a_soc_keys_on() {
    let docs = events();
    let start_violation = &docs[1];
    assert_eq!(start_violation["class_uid"], 4001);
    assert_eq!(start_violation["activity_id"], 1);
    assert_eq!(start_violation["type_uid"], 400101);
    assert_eq!(start_violation["severity_id"], 4);
    assert_eq!(start_violation["tls"]["sni"], "api.openai.com");
    assert_eq!(start_violation["dst_endpoint"]["ip"], "2001:db8::10");
    assert_eq!(start_violation["src_endpoint"]["mac"], "02-00-5E-10-00-01");
    assert_eq!(start_violation["src_endpoint"]["uid"], "plc-7");
    assert_eq!(start_violation["src_endpoint"]["name"], "Press line 7 PLC");
    assert_eq!(start_violation["traffic"]["bytes_out"], 300);
    assert_eq!(
        start_violation["connection_info"]["community_uid"],
        "1:abc="
    );
    assert_eq!(
        start_violation["unmapped"]["conduit"]["verdict"],
        "violation"
    );
    assert_eq!(start_violation["unmapped"]["conduit"]["zone"], "cell-1");
    // flow_end with RST: Reset; blocked: denied and blocked.
    let end_blocked = &docs[10];
    assert_eq!(end_blocked["activity_id"], 3);
    assert_eq!(
        (
            end_blocked["action_id"].clone(),
            end_blocked["disposition_id"].clone()
        ),
        (json!(2), json!(2))
    );
    // The evidence's own records: Base Event with the content under unmapped.
    let loss = &docs[12];
    assert_eq!(loss["class_uid"], 0);
    assert_eq!(loss["unmapped"]["conduit"]["loss"]["count"], 3);
}

#[test]
fn the_check_rejects_what_ocsf_does_not_define() {
    let mut doc = events().remove(0);
    doc["src_endpoint"]["port"] = json!(70000);
    doc["tls"]["ja4"] = json!("x");
    doc["activity_id"] = json!(42);
    doc["traffic"]["bytes_out"] = json!("300");
    doc.as_object_mut().map(|o| o.remove("severity_id"));
    let p = problems(&doc);
    for needle in [
        "src_endpoint.port: 70000 outside",
        "tls.ja4: not an attribute",
        "activity_id: 42 is not one of its enum values",
        "traffic.bytes_out: \"300\" is not an OCSF long_t",
        "severity_id: required, missing",
    ] {
        assert!(p.iter().any(|m| m.contains(needle)), "{needle}: {p:#?}");
    }
}
