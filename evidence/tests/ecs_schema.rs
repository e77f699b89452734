//! The JSON lines against the ECS release they name (`ecs.version`), read from the
//! vendored field definitions (`evidence/schema/ecs-<version>/ecs_flat.yml`), and the
//! Elasticsearch index template and ingest pipeline in `deploy/elasticsearch/`
//! against the same definitions.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use conduit_evidence::ecs::{ChainPosition, ECS_VERSION, ecs_json};
use conduit_proto::v1::{
    Alarm, ChainRestart, Checkpoint, Counts, Flow, FlowEndReason, Loss, PolicyChange, Record,
    RecordKind, SpoolRecovery, Verdict, record::Body,
};
use serde::Deserialize;
use serde_json::Value;

/// Fields outside ECS that the project's contract (DESIGN.md) names; everything else
/// custom lives under `conduit.`.
const CONTRACT_FIELDS: &[&str] = &["chain.prev_hash", "observer.id", "tls.client.ja4"];

#[derive(Debug, Deserialize)]
struct AllowedValue {
    name: String,
    #[serde(default)]
    expected_event_types: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct FieldDef {
    #[serde(rename = "type")]
    ty: String,
    #[serde(default)]
    normalize: Vec<String>,
    #[serde(default)]
    allowed_values: Vec<AllowedValue>,
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

static ECS: LazyLock<BTreeMap<String, FieldDef>> = LazyLock::new(|| {
    let path = repo().join(format!("evidence/schema/ecs-{ECS_VERSION}/ecs_flat.yml"));
    let text = std::fs::read_to_string(&path).expect("vendored ECS definitions");
    serde_saphyr::from_str(&text).expect("ECS flat YAML")
});

/// Leaf fields of a JSON line as (dotted path, value); arrays are leaves.
fn leaves(prefix: &str, v: &Value, out: &mut Vec<(String, Value)>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                leaves(&p, v, out);
            }
        }
        other => out.push((prefix.to_owned(), other.clone())),
    }
}

/// Whether a JSON scalar indexes as the ECS type.
fn scalar_fits(ty: &str, v: &Value) -> bool {
    match ty {
        "keyword" | "constant_keyword" | "wildcard" | "text" | "match_only_text" => v.is_string(),
        "ip" => v
            .as_str()
            .is_some_and(|s| s.parse::<std::net::IpAddr>().is_ok()),
        "date" => v.as_str().is_some_and(is_rfc3339_utc),
        "long" | "integer" | "short" | "byte" => v.is_i64(),
        "unsigned_long" => v.is_u64(),
        "float" | "double" | "scaled_float" | "half_float" => v.is_number(),
        "boolean" => v.is_boolean(),
        _ => false,
    }
}

/// `YYYY-MM-DDTHH:MM:SS[.fraction]Z`, as ECS dates are written.
fn is_rfc3339_utc(s: &str) -> bool {
    let b = s.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
    b.len() >= 20
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && b.last() == Some(&b'Z')
        && (b.len() == 20 || (b[19] == b'.' && digits(20..b.len() - 1)))
}

/// Every problem of one JSON line against ECS (empty: it conforms).
fn problems(doc: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let mut fields = Vec::new();
    leaves("", doc, &mut fields);
    for (path, value) in &fields {
        if path.starts_with("conduit.") || CONTRACT_FIELDS.contains(&path.as_str()) {
            continue;
        }
        let Some(def) = ECS.get(path) else {
            out.push(format!("{path}: not an ECS {ECS_VERSION} field"));
            continue;
        };
        let values: Vec<&Value> = match value {
            Value::Array(items) if def.normalize.iter().any(|n| n == "array") => {
                items.iter().collect()
            }
            Value::Array(_) => {
                out.push(format!(
                    "{path}: an array, ECS does not normalize it to one"
                ));
                continue;
            }
            v => vec![v],
        };
        for v in values {
            if !scalar_fits(&def.ty, v) {
                out.push(format!("{path}: {v} does not index as ECS type {}", def.ty));
            }
            if !def.allowed_values.is_empty()
                && !def
                    .allowed_values
                    .iter()
                    .any(|a| v.as_str() == Some(&a.name))
            {
                out.push(format!("{path}: {v} is not an allowed value"));
            }
        }
    }
    // Every event.type must be one ECS expects for each event.category given.
    if let (Some(Value::Array(cats)), Some(Value::Array(types))) =
        (doc.pointer("/event/category"), doc.pointer("/event/type"))
    {
        let defs = &ECS["event.category"].allowed_values;
        for c in cats {
            let Some(def) = defs.iter().find(|a| c.as_str() == Some(&a.name)) else {
                continue;
            };
            for t in types {
                if !def
                    .expected_event_types
                    .iter()
                    .any(|e| t.as_str() == Some(e))
                {
                    out.push(format!("event.type {t} is not expected for category {c}"));
                }
            }
        }
    }
    out
}

fn flow(verdict: Verdict) -> Flow {
    Flow {
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
        tcp_flags_source: 0x1b,
        tcp_flags_destination: 0x1b,
        community_id: "1:abc=".into(),
        end_reason: FlowEndReason::EndOfFlow as i32,
        app_protocol: "tls".into(),
        server_name: "api.openai.com".into(),
        ja4: "t13d1516h2_8daaf6152771_02713d6af862".into(),
        tls_version: "1.3".into(),
        alpn: vec!["h2".into()],
        ech: true,
        zone: "cell-1".into(),
        endpoint: "openai".into(),
        conduit_id: "cell1-openai".into(),
        verdict: verdict as i32,
        policy_hash: vec![9; 32],
        attribution: "sni".into(),
        source_mac: vec![0x02, 0x00, 0x5e, 0x10, 0x00, 0x01],
        pq_offered: true,
        anomalies: vec!["conflicting_retransmission".into()],
        tls_cipher: "TLS_AES_128_GCM_SHA256".into(),
        tls_curve: "X25519MLKEM768".into(),
        pq_negotiated: true,
        host_id: "plc-7".into(),
        host_name: "Press line 7 PLC".into(),
        destination_domain: "api.openai.com".into(),
        ech_announced: true,
        conflicting_server_names: vec!["harmless.example".into()],
    }
}

/// One record of every kind (and a flow of every kind and verdict), fields filled.
fn every_record() -> Vec<Record> {
    let rec = |kind: RecordKind, body: Body| Record {
        kind: kind as i32,
        time_unix_nano: 1_700_000_002_000_000_000,
        sensor_id: "gw-01".into(),
        site: "plant-01".into(),
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
            out.push(rec(kind, Body::Flow(flow(v))));
        }
    }
    out.push(rec(
        RecordKind::Loss,
        Body::Loss(Loss {
            reason: "ringbuf_full".into(),
            count: 3,
            unit: "event".into(),
            origin: "kernel".into(),
            detail: "x".into(),
        }),
    ));
    out.push(rec(
        RecordKind::PolicyChange,
        Body::PolicyChange(PolicyChange {
            policy_hash: vec![1; 32],
            path: "/etc/conduit-sensor/conduits.yaml".into(),
            zones: 2,
            endpoints: 3,
            conduits: 1,
            enforcement: true,
            trigger: "reload".into(),
            default_action: "alert".into(),
            ..PolicyChange::default()
        }),
    ));
    out.push(rec(
        RecordKind::Checkpoint,
        Body::Checkpoint(Checkpoint {
            seq: 9,
            hash: vec![2; 32],
            time_unix_nano: 1,
            public_key: vec![3; 32],
            signature: vec![4; 64],
            records_since_last: 8,
            interval_ms: 10_000,
        }),
    ));
    out.push(rec(
        RecordKind::ChainRestart,
        Body::ChainRestart(ChainRestart {
            reason: "no_spool".into(),
            detail: "first start".into(),
            public_key: vec![3; 32],
            signature: vec![4; 64],
        }),
    ));
    out.push(rec(
        RecordKind::SpoolRecovery,
        Body::SpoolRecovery(SpoolRecovery {
            segment: "00000001.seg".into(),
            truncated_bytes: 17,
            last_good_seq: 8,
            detail: "torn tail".into(),
            saved_as: String::new(),
        }),
    ));
    out.push(rec(
        RecordKind::Alarm,
        Body::Alarm(Alarm {
            kind: "gap".into(),
            sensor_id: "gw-02".into(),
            seq: 5,
            detail: "x".into(),
        }),
    ));
    out
}

fn lines() -> Vec<Value> {
    let pos = ChainPosition {
        seq: 17,
        hash: [1; 32],
        prev_hash: [2; 32],
    };
    every_record().iter().map(|r| ecs_json(r, &pos)).collect()
}

#[test]
fn every_record_kind_conforms_to_ecs() {
    for doc in lines() {
        let p = problems(&doc);
        assert!(p.is_empty(), "{doc}\n{p:#?}");
        assert_eq!(doc["ecs"]["version"], ECS_VERSION);
    }
}

#[test]
fn categorization_is_what_siem_content_keys_on() {
    let docs = lines();
    let find = |action: &str, verdict: &str| {
        docs.iter()
            .find(|d| d["event"]["action"] == action && d["conduit"]["verdict"] == verdict)
            .unwrap_or_else(|| panic!("{action} {verdict}"))
    };
    let start = find("flow_start", "violation");
    assert_eq!(start["event"]["kind"], "alert");
    assert_eq!(start["event"]["category"], serde_json::json!(["network"]));
    assert_eq!(
        start["event"]["type"],
        serde_json::json!(["connection", "start", "allowed"])
    );
    assert_eq!(start["event"]["duration"], 1_500_000_000_i64);
    assert_eq!(start["network"]["vlan"]["id"], "101");
    assert_eq!(start["destination"]["domain"], "api.openai.com");
    assert_eq!(start["observer"]["type"], "sensor");
    assert_eq!(start["observer"]["version"], "0.1.0");
    assert_eq!(start["conduit"]["attribution"], "sni");
    assert_eq!(start["source"]["mac"], "02-00-5E-10-00-01");
    assert_eq!(start["host"]["id"], "plc-7");
    assert_eq!(start["host"]["name"], "Press line 7 PLC");
    assert_eq!(start["conduit"]["pq"]["offered"], true);
    assert_eq!(start["conduit"]["ech"], true);
    let end = find("flow_end", "blocked");
    assert_eq!(end["event"]["kind"], "alert");
    assert_eq!(
        end["event"]["type"],
        serde_json::json!(["connection", "end", "denied"])
    );
    assert_eq!(find("flow_update", "authorized")["event"]["kind"], "event");
    let unclassified = find("flow_start", "unclassified");
    assert_eq!(
        unclassified["event"]["type"],
        serde_json::json!(["connection", "start"])
    );
    for d in docs.iter().filter(|d| {
        d["event"]["action"] != "flow_start"
            && d["event"]["action"] != "flow_update"
            && d["event"]["action"] != "flow_end"
    }) {
        assert_eq!(d["event"]["kind"], "event", "{d}");
    }
    let policy = docs
        .iter()
        .find(|d| d["event"]["action"] == "policy_change")
        .expect("policy change");
    assert_eq!(
        policy["event"]["category"],
        serde_json::json!(["configuration"])
    );
}

#[test]
fn the_check_rejects_what_ecs_does_not_define() {
    let mut doc = lines().remove(0);
    doc["network"]["vlan"]["id"] = serde_json::json!(101);
    doc["tls"]["client"]["ech"] = serde_json::json!(true);
    doc["event"]["kind"] = serde_json::json!("detection");
    doc["event"]["type"] = serde_json::json!(["connection", "creation"]);
    doc["source"]["port"] = serde_json::json!([1, 2]);
    let p = problems(&doc);
    for needle in [
        "network.vlan.id: 101 does not index as ECS type keyword",
        "tls.client.ech: not an ECS",
        "event.kind: \"detection\" is not an allowed value",
        "event.type \"creation\" is not expected for category \"network\"",
        "source.port: an array",
    ] {
        assert!(p.iter().any(|m| m.contains(needle)), "{needle}: {p:#?}");
    }
}

/// The leaf mappings of an index template as (dotted path, type).
fn mapped(
    prefix: &str,
    props: &serde_json::Map<String, Value>,
    out: &mut BTreeMap<String, String>,
) {
    for (k, v) in props {
        let p = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        if let Some(Value::Object(inner)) = v.get("properties") {
            mapped(&p, inner, out);
        } else if let Some(t) = v["type"].as_str() {
            out.insert(p, t.to_owned());
        }
    }
}

fn deploy_json(name: &str) -> Value {
    let path = repo().join("deploy/elasticsearch").join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).expect(name)).expect(name)
}

#[test]
fn the_index_template_maps_every_field_as_ecs_types_it() {
    let template = deploy_json("conduit-index-template.json");
    let props = template
        .pointer("/template/mappings/properties")
        .and_then(Value::as_object)
        .expect("template.mappings.properties");
    let mut types = BTreeMap::new();
    mapped("", props, &mut types);
    let mut emitted = BTreeSet::new();
    for doc in lines() {
        let mut f = Vec::new();
        leaves("", &doc, &mut f);
        emitted.extend(f.into_iter().map(|(p, _)| p));
    }
    for path in &emitted {
        let Some(ty) = types.get(path) else {
            panic!("{path} is emitted but the index template does not map it");
        };
        if let Some(def) = ECS.get(path) {
            assert_eq!(
                ty, &def.ty,
                "{path}: the template maps {ty}, ECS says {}",
                def.ty
            );
        }
    }
    for (path, ty) in &types {
        if let Some(def) = ECS.get(path) {
            assert_eq!(ty, &def.ty, "{path}");
        } else {
            assert!(
                path.starts_with("conduit.") || CONTRACT_FIELDS.contains(&path.as_str()),
                "{path} is mapped but is neither ECS nor conduit.*"
            );
        }
    }
    assert_eq!(
        template.pointer("/_meta/ecs_version"),
        Some(&Value::from(ECS_VERSION))
    );
}

#[test]
fn the_ingest_pipeline_writes_only_ecs_fields() {
    let pipeline = deploy_json("conduit-ingest-pipeline.json");
    let processors = pipeline["processors"].as_array().expect("processors");
    assert!(!processors.is_empty());
    for p in processors {
        let (kind, body) = p
            .as_object()
            .and_then(|o| o.iter().next())
            .expect("processor");
        for key in ["field", "target_field"] {
            let Some(field) = body.get(key).and_then(Value::as_str) else {
                continue;
            };
            // A geoip or registered_domain target is an object field set of ECS.
            let known =
                ECS.contains_key(field) || ECS.keys().any(|k| k.starts_with(&format!("{field}.")));
            assert!(known, "{kind}.{key} = {field} is not an ECS field");
        }
    }
}
