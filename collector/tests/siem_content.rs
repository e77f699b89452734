//! The SIEM content in `deploy/`: the Sigma rules (sigma-cli's checks and
//! conversions, and each rule's detection evaluated on the JSON lines of the records
//! it is about), the Prometheus rules (`promtool check rules` and `promtool test
//! rules`), and the metric names the rules and the Grafana dashboard use. sigma and
//! promtool come from `cargo xtask setup`; missing: SKIP.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use conduit_evidence::ecs::{ChainPosition, ecs_json};
use conduit_proto::v1::{self, RecordKind, Verdict, record::Body};
use serde_json::{Value, json};

fn deploy(sub: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(sub)
}

fn has(binary: &str) -> bool {
    Command::new(binary)
        .arg("--help")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn rules() -> Vec<(String, Value)> {
    let mut out: Vec<(String, Value)> = std::fs::read_dir(deploy("sigma"))
        .expect("deploy/sigma")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yml"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("rule");
            let rule: Value = serde_saphyr::from_str(&text).expect("rule YAML");
            (
                p.file_stem().expect("name").to_string_lossy().into_owned(),
                rule,
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn sigma_cli_checks_and_converts_every_rule() {
    if !has("sigma") {
        println!("SKIP: sigma (sigma-cli) not installed");
        return;
    }
    // The ATT&CK and D3FEND tag validators download their data: offline here.
    let out = Command::new("sigma")
        .args([
            "check",
            "--fail-on-issues",
            "-x",
            "attacktag",
            "-x",
            "d3_fendtag",
        ])
        .arg(deploy("sigma"))
        .output()
        .expect("sigma check");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("Found 0 errors, 0 condition errors and 0 issues"),
        "{text}"
    );
    for (name, rule) in rules() {
        for target in ["lucene", "esql"] {
            let out = Command::new("sigma")
                .args(["convert", "-t", target, "--without-pipeline"])
                .arg(deploy("sigma").join(format!("{name}.yml")))
                .output()
                .expect("sigma convert");
            let query = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "{name} {target}: {query}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            // The query keys on the fields the rule names, as the JSON lines spell them.
            for selection in rule["detection"].as_object().expect("detection").values() {
                for field in selection.as_object().into_iter().flat_map(|m| m.keys()) {
                    assert!(
                        query.contains(field.as_str()),
                        "{name} {target}: {field} not in {query}"
                    );
                }
            }
        }
    }
}

fn record(kind: RecordKind, body: Body) -> v1::Record {
    v1::Record {
        kind: kind as i32,
        time_unix_nano: 1_700_000_000_000_000_000,
        sensor_id: "gw-01".into(),
        site: "plant-01".into(),
        software_version: "0.1.0".into(),
        body: Some(body),
    }
}

fn flow(verdict: Verdict) -> Body {
    Body::Flow(v1::Flow {
        flow_id: 1,
        source_ip: vec![10, 10, 1, 5],
        destination_ip: vec![192, 0, 2, 10],
        ip_protocol: 6,
        server_name: "api.openai.com".into(),
        verdict: verdict as i32,
        ..v1::Flow::default()
    })
}

fn alarm(kind: &str) -> Body {
    Body::Alarm(v1::Alarm {
        kind: kind.into(),
        sensor_id: "gw-01".into(),
        seq: 9,
        detail: String::new(),
    })
}

/// The JSON lines of one record of each kind a rule is about, by name.
fn samples() -> Vec<(&'static str, Value)> {
    let pos = ChainPosition {
        seq: 1,
        hash: [1; 32],
        prev_hash: [0; 32],
    };
    let restart = |reason: &str| {
        Body::ChainRestart(v1::ChainRestart {
            reason: reason.into(),
            ..v1::ChainRestart::default()
        })
    };
    [
        (
            "authorized",
            record(RecordKind::FlowStart, flow(Verdict::Authorized)),
        ),
        (
            "violation",
            record(RecordKind::FlowStart, flow(Verdict::Violation)),
        ),
        (
            "violation_end",
            record(RecordKind::FlowEnd, flow(Verdict::Violation)),
        ),
        (
            "blocked",
            record(RecordKind::FlowStart, flow(Verdict::Blocked)),
        ),
        (
            "unclassified",
            record(RecordKind::FlowStart, flow(Verdict::Unclassified)),
        ),
        (
            "loss",
            record(
                RecordKind::Loss,
                Body::Loss(v1::Loss {
                    reason: "ringbuf_full".into(),
                    count: 3,
                    ..v1::Loss::default()
                }),
            ),
        ),
        (
            "restart_first",
            record(RecordKind::ChainRestart, restart("no_spool")),
        ),
        (
            "restart_key",
            record(RecordKind::ChainRestart, restart("key_mismatch")),
        ),
        ("alarm_gap", record(RecordKind::Alarm, alarm("gap"))),
        (
            "alarm_silent",
            record(RecordKind::Alarm, alarm("sensor_silent")),
        ),
        (
            "alarm_resumed",
            record(RecordKind::Alarm, alarm("sensor_resumed")),
        ),
        (
            "checkpoint",
            record(
                RecordKind::Checkpoint,
                Body::Checkpoint(v1::Checkpoint::default()),
            ),
        ),
    ]
    .into_iter()
    .map(|(n, r)| (n, ecs_json(&r, &pos)))
    .collect()
}

fn field<'a>(doc: &'a Value, dotted: &str) -> Option<&'a Value> {
    dotted.split('.').try_fold(doc, |v, k| v.get(k))
}

/// One Sigma selection (a map of field to value or list of values, all must hold).
fn selected(doc: &Value, selection: &Value) -> bool {
    selection
        .as_object()
        .expect("selection map")
        .iter()
        .all(|(k, want)| {
            let got = field(doc, k);
            let equal = |w: &Value| {
                got.is_some_and(|g| g == w || g.as_str() == w.as_str() && w.is_string())
            };
            match want {
                Value::Array(options) => options.iter().any(equal),
                w => equal(w),
            }
        })
}

/// The rules' conditions are `selection` or `selection and not filter...`.
fn matches(rule: &Value, doc: &Value) -> bool {
    let det = &rule["detection"];
    let condition = det["condition"].as_str().expect("condition");
    let mut parts = condition.split(" and not ");
    let first = parts.next().expect("selection");
    selected(doc, &det[first]) && parts.all(|f| !selected(doc, &det[f.trim()]))
}

#[test]
fn each_sigma_rule_matches_the_records_it_is_about_and_no_others() {
    let want: &[(&str, &[&str])] = &[
        ("conduit_blocked_flow", &["blocked"]),
        ("conduit_chain_restart", &["restart_key"]),
        ("conduit_collector_alarm", &["alarm_gap"]),
        ("conduit_loss_record", &["loss"]),
        ("conduit_sensor_silent", &["alarm_silent"]),
        ("conduit_violation_seen", &["violation", "violation_end"]),
    ];
    let rules = rules();
    assert_eq!(
        rules.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        want.iter().map(|(n, _)| *n).collect::<Vec<_>>()
    );
    let samples = samples();
    for ((name, rule), (_, expected)) in rules.iter().zip(want) {
        let hits: Vec<&str> = samples
            .iter()
            .filter(|(_, doc)| matches(rule, doc))
            .map(|(n, _)| *n)
            .collect();
        assert_eq!(&hits, expected, "{name}");
    }
    // The evaluation can fail: a rule on a field the lines do not have matches nothing.
    let wrong =
        json!({"detection": {"selection": {"tls.client.ech": true}, "condition": "selection"}});
    assert!(!samples.iter().any(|(_, d)| matches(&wrong, d)));
}

#[test]
fn promtool_checks_and_unit_tests_the_alerting_rules() {
    if !has("promtool") {
        println!("SKIP: promtool (Debian prometheus) not installed");
        return;
    }
    let dir = deploy("prometheus");
    for args in [
        vec!["check", "rules", "conduit-rules.yml"],
        vec!["test", "rules", "conduit-rules.test.yml"],
    ] {
        let out = Command::new("promtool")
            .args(&args)
            .current_dir(&dir)
            .output()
            .expect("promtool");
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `conduit_collector_*` names in `text` (PromQL in rules and the dashboard).
fn names(text: &str, prefix: &str) -> Vec<String> {
    let mut out: Vec<String> = text
        .match_indices(prefix)
        .map(|(i, _)| {
            text[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

#[test]
fn rules_and_dashboard_use_only_metrics_the_collector_exports() {
    let m = Arc::new(conduit_collector::metrics::Metrics::default());
    // Labelled families show once they have a series.
    m.alarm("gap");
    m.refused(conduit_collector::listener::Refusal::PerPeer);
    m.sensor_seen("gw-01", 1);
    m.export_started("jsonl");
    m.exported("jsonl", "gw-01", 1);
    let exported = conduit_ops::metrics::encode(&m.registry());
    let mut used = 0;
    for file in [
        deploy("prometheus/conduit-rules.yml"),
        deploy("grafana/conduit-dashboard.json"),
    ] {
        let text = std::fs::read_to_string(&file).expect("content");
        for name in names(&text, "conduit_collector_") {
            used += 1;
            assert!(
                exported.lines().any(|l| l.starts_with(&format!("{name}{{"))
                    || l.starts_with(&format!("{name} "))
                    // A labelled family with no series yet: its TYPE line (a
                    // counter's without `_total`).
                    || l.starts_with(&format!(
                        "# TYPE {} ",
                        name.strip_suffix("_total").unwrap_or(&name)
                    ))),
                "{}: {name} is not a collector metric:\n{exported}",
                file.display()
            );
        }
    }
    assert!(used >= 6, "the content uses collector metrics");
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(deploy("grafana/conduit-dashboard.json")).expect("dashboard"),
    )
    .expect("dashboard JSON");
    assert!(dashboard["panels"].as_array().is_some_and(|p| p.len() > 8));
}
