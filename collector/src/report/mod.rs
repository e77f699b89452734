//! `conduit-collector report`: the auditor's report for a time window. It verifies
//! every chain, proves per sensor that the window was monitored without a silence
//! longer than the sensor's heartbeat (the signed checkpoints that bracket the window
//! and every heartbeat between them), and shows what crossed the conduits: the maps
//! in force, the zone x endpoint matrix, every violation, blocked flow and loss.
//!
//! The HTML is self-contained and printable; `summary` (the contract's machine-
//! readable part) is embedded as JSON. Exit: 0 verified and complete, 1 a chain does
//! not verify, 3 verified but incomplete.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Duration;

use conduit_evidence::chain::checkpoint::DEFAULT_EVERY;
use conduit_evidence::chain::cosignature;
use conduit_evidence::chain::declared_gap::{self, DeclaredGap};
use conduit_evidence::chain::verify::verify_dir_witnessed;
use conduit_evidence::ecs::{ip_text, rfc3339, verdict_name};
use conduit_proto::v1::{self, RecordKind, record::Body};
use prost::Message as _;
use serde::Serialize;
use serde_json::json;

use crate::store::{chain_dirs, is_alarm_dir};
use crate::time_index;

const TEMPLATE: &str = include_str!("report.html.j2");

/// How late a heartbeat may be beyond its interval before the silence is a gap: half
/// the interval (at least 1 s), for the agent's timer tick and the clock's jitter.
pub fn heartbeat_grace(interval: Duration) -> Duration {
    (interval / 2).max(Duration::from_secs(1))
}

#[derive(Debug, Clone, Serialize)]
pub struct Gap {
    pub from: String,
    pub to: String,
    pub reason: String,
    /// Seconds without a heartbeat.
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckpointRef {
    pub seq: u64,
    pub time: String,
    pub hash: String,
}

/// A head the collector witnessed (cosigned).
#[derive(Debug, Clone, Serialize)]
pub struct WitnessedHead {
    pub seq: u64,
    /// The first 16 hex digits of the checkpoint record's hash.
    pub hash: String,
    /// The collector's time of the cosignature.
    pub time: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct SensorSummary {
    pub id: String,
    /// Seqs of the first and last record in the window (0 when there is none).
    pub first_seq: u64,
    pub last_seq: u64,
    pub records: u64,
    pub checkpoints: u64,
    pub gaps: Vec<Gap>,
    pub verified: bool,
    /// The first seq that does not verify, with why.
    pub first_bad_seq: Option<u64>,
    pub first_bad: Option<String>,
    pub public_key: Option<String>,
    pub key_source: String,
    pub heartbeat_seconds: f64,
    /// The last signed checkpoint at or before the window's start, the first at or after its end.
    pub bracket_before: Option<CheckpointRef>,
    pub bracket_after: Option<CheckpointRef>,
    pub chain_records: u64,
    pub chain_first_seq: u64,
    pub chain_last_seq: u64,
    /// What retention pruned from this chain, under which policy, and when.
    pub retention: Option<String>,
    /// Heads the collector cosigned within the window (by its witness time).
    pub witnessed_heads: u64,
    pub witnessed: Vec<WitnessedHead>,
    /// The last head witnessed before the window, the first at or after its end.
    pub witnessed_before: Option<WitnessedHead>,
    pub witnessed_after: Option<WitnessedHead>,
    /// Cosignatures that verify against the collector's key and match the chain.
    pub cosignatures_verified: u64,
    pub witness_key: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FlowRow {
    pub time: String,
    pub sensor: String,
    pub seq: u64,
    pub verdict: String,
    #[serde(skip)]
    pub flow_id: u64,
    pub source: String,
    pub destination: String,
    pub server_name: String,
    pub zone: String,
    pub endpoint: String,
    pub conduit: String,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LossRow {
    pub time: String,
    pub sensor: String,
    pub seq: u64,
    pub reason: String,
    pub count: u64,
    pub unit: String,
    pub origin: String,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct PolicyRow {
    pub time: String,
    pub sensor: String,
    pub seq: u64,
    pub trigger: String,
    pub hash: String,
    pub path: String,
    pub enforcement: bool,
    pub default_action: String,
    pub zones: Vec<serde_json::Value>,
    pub endpoints: Vec<serde_json::Value>,
    pub conduits: Vec<serde_json::Value>,
    pub counts: (u32, u32, u32),
    pub truncated: bool,
    /// In force at the window's start (loaded before it), not changed within it.
    pub in_force_at_start: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct AlarmRow {
    pub time: String,
    pub seq: u64,
    pub kind: String,
    pub sensor: String,
    pub detail: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Cell {
    pub flows: BTreeMap<String, u64>,
    pub bytes: BTreeMap<String, u64>,
}

/// The contract's machine-readable summary (`<script id="summary">`) and the rest
/// of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub verified: bool,
    pub complete: bool,
    pub since: String,
    pub until: String,
    pub generated: String,
    pub site: String,
    pub sensors: Vec<SensorSummary>,
    pub flows: u64,
    pub violations: u64,
    pub blocked: u64,
    pub loss: u64,
    /// Heads the collector cosigned within the window, all sensors.
    pub witnessed_heads: u64,
    pub policies: Vec<PolicyRow>,
    pub violation_list: Vec<FlowRow>,
    pub blocked_list: Vec<FlowRow>,
    pub loss_list: Vec<LossRow>,
    pub alarms: Vec<AlarmRow>,
    /// Loss records and collector alarms in the window (the lists hold at most
    /// `max_rows` of each).
    pub loss_records: u64,
    pub alarm_count: u64,
    /// The most rows each list holds; the counts stay exact and `query` lists the rest.
    pub max_rows: usize,
    /// zone -> endpoint -> flows and bytes per verdict.
    pub matrix: BTreeMap<String, BTreeMap<String, Cell>>,
    /// Per conduit, the flows by what their TLS handshake negotiated.
    pub crypto: Vec<CryptoRow>,
}

/// Flows of one conduit (or of an AI endpoint no conduit allowed) that negotiated
/// the same TLS version, cipher suite and key-exchange group.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct CryptoRow {
    pub conduit: String,
    pub version: String,
    pub cipher: String,
    pub curve: String,
    /// A post-quantum group was negotiated (None: the ServerHello was not seen).
    pub pq_negotiated: Option<bool>,
    pub flows: u64,
}

/// How far past the window the report looks for what a flow of the window
/// negotiated: two active timeouts (60 s by default), so its next flow_update or
/// flow_end is there.
const POSTURE_HORIZON_NS: i64 = 120_000_000_000;

/// A flow's negotiated posture as one interned string: version, cipher, curve and
/// post-quantum, tab-separated; empty when no ServerHello was read.
fn posture(f: &v1::Flow) -> String {
    if f.tls_cipher.is_empty() {
        return String::new();
    }
    format!(
        "{}\t{}\t{}\t{}",
        f.tls_version, f.tls_cipher, f.tls_curve, f.pq_negotiated
    )
}

impl Summary {
    /// 0 verified and complete, 1 a chain fails verification, 3 incomplete.
    pub fn exit_code(&self) -> u8 {
        if !self.verified {
            1
        } else if !self.complete {
            3
        } else {
            0
        }
    }
}

/// What the report keeps of a flow (about 40 bytes, whatever the store's size).
struct FlowTally {
    verdict: &'static str,
    zone: u32,
    endpoint: u32,
    /// The conduit that allowed it, or the endpoint it went to without one.
    conduit: u32,
    /// What its ServerHello negotiated (see [`posture`]).
    posture: u32,
    bytes: u64,
    /// Its row in the violation or blocked list, if listed.
    listed: Option<u32>,
}

/// Zone and endpoint names, each kept once.
#[derive(Default)]
struct Names {
    ids: HashMap<String, u32>,
    names: Vec<String>,
}

impl Names {
    fn id(&mut self, name: &str) -> u32 {
        if let Some(&id) = self.ids.get(name) {
            return id;
        }
        let id = u32::try_from(self.names.len()).unwrap_or(u32::MAX);
        self.names.push(name.to_owned());
        self.ids.insert(name.to_owned(), id);
        id
    }

    fn name(&self, id: u32) -> &str {
        self.names.get(id as usize).map_or("", String::as_str)
    }
}

struct Heartbeat {
    time: i64,
    interval: Duration,
    seq: u64,
    hash: String,
}

/// How many rows each list of the report holds by default: the report stays
/// readable and its memory bounded on any store, while every count stays exact.
pub const DEFAULT_MAX_ROWS: usize = 10_000;

/// Builds the report of `store` for `since <= t < until` (Unix nanoseconds), listing
/// at most `max_rows` violations and blocked flows, loss records and alarms each.
pub fn build(
    store: &Path,
    since: i64,
    until: i64,
    now: i64,
    max_rows: usize,
) -> anyhow::Result<Summary> {
    let mut s = Summary {
        verified: true,
        complete: true,
        since: rfc3339(since),
        until: rfc3339(until),
        generated: rfc3339(now),
        site: String::new(),
        sensors: Vec::new(),
        flows: 0,
        violations: 0,
        blocked: 0,
        loss: 0,
        witnessed_heads: 0,
        policies: Vec::new(),
        violation_list: Vec::new(),
        blocked_list: Vec::new(),
        loss_list: Vec::new(),
        alarms: Vec::new(),
        loss_records: 0,
        alarm_count: 0,
        max_rows,
        matrix: BTreeMap::new(),
        crypto: Vec::new(),
    };
    for (chain, dir) in chain_dirs(store)? {
        if is_alarm_dir(&chain) {
            alarms(store, &chain, &dir, since, until, &mut s)?;
            continue;
        }
        sensor(store, &chain, &dir, since, until, &mut s)?;
    }
    s.verified = s.sensors.iter().all(|x| x.verified);
    s.witnessed_heads = s.sensors.iter().map(|x| x.witnessed_heads).sum();
    s.complete = s.sensors.iter().all(|x| x.gaps.is_empty());
    Ok(s)
}

fn alarms(
    store: &Path,
    chain: &str,
    dir: &Path,
    since: i64,
    until: i64,
    s: &mut Summary,
) -> anyhow::Result<()> {
    // An unreadable chain shows as not verified (verify_dir names why).
    for seg in time_index::chain_index(store, chain, dir).unwrap_or_default() {
        for block in seg
            .blocks
            .iter()
            .filter(|b| b.max_time >= since && b.min_time < until)
        {
            // A damaged block ends the walk here; the verification names the break.
            let Ok(frames) = time_index::read_block(&seg, block) else {
                break;
            };
            for f in frames {
                let (_, t) = time_index::kind_and_time(&f.record_bytes);
                if t < since || t >= until {
                    continue;
                }
                if let Ok(r) = v1::Record::decode(&f.record_bytes[..])
                    && let Some(Body::Alarm(a)) = r.body
                {
                    s.alarm_count += 1;
                    if s.alarms.len() >= s.max_rows {
                        continue;
                    }
                    s.alarms.push(AlarmRow {
                        time: rfc3339(t),
                        seq: f.seq,
                        kind: a.kind,
                        sensor: a.sensor_id,
                        detail: a.detail,
                    });
                }
            }
        }
    }
    Ok(())
}

fn sensor(
    store: &Path,
    chain: &str,
    dir: &Path,
    since: i64,
    until: i64,
    s: &mut Summary,
) -> anyhow::Result<()> {
    let v = verify_dir_witnessed(dir, None, crate::witness_key(store));
    let mut out = SensorSummary {
        id: chain.to_owned(),
        first_seq: 0,
        last_seq: 0,
        records: 0,
        checkpoints: 0,
        gaps: Vec::new(),
        verified: v.ok(),
        first_bad_seq: v.first_bad.as_ref().map(|b| b.seq),
        first_bad: v.first_bad.as_ref().map(|b| b.what.clone()),
        public_key: v.public_key.map(hex::encode),
        key_source: match &v.key_source {
            conduit_evidence::chain::verify::KeySource::Given => "given".to_owned(),
            conduit_evidence::chain::verify::KeySource::SpoolFile(_) => {
                "pinned by the collector (signing.pub)".to_owned()
            }
            conduit_evidence::chain::verify::KeySource::FirstInChain => {
                "none pinned: the key the chain names (integrity only)".to_owned()
            }
        },
        heartbeat_seconds: 0.0,
        bracket_before: None,
        bracket_after: None,
        chain_records: v.records,
        chain_first_seq: v.first_seq,
        chain_last_seq: v.last_seq,
        retention: None,
        witnessed_heads: 0,
        witnessed: Vec::new(),
        witnessed_before: None,
        witnessed_after: None,
        cosignatures_verified: v.cosignatures,
        witness_key: v.witness_key.map(hex::encode),
    };
    witnessed_heads(dir, since, until, &mut out);
    let anchor = conduit_evidence::chain::anchor::read(dir).ok().flatten();
    if let Some(a) = &anchor {
        out.retention = Some(format!(
            "seq {}..{} ({} segments, records up to {}) pruned under a {}-day retention, last on {}; the chain verifies from the anchor at seq {} (hash {})",
            a.pruned_from,
            a.seq,
            a.segments,
            rfc3339(a.pruned_until),
            a.retention_days,
            a.time,
            a.seq,
            hex::encode(a.hash)
        ));
    }
    let mut beats: Vec<Heartbeat> = Vec::new();
    let mut policy_before: Option<PolicyRow> = None;
    // Each flow in the window, as its latest record has it; the rows of violations
    // and blocked flows are kept only up to the list's bound.
    let mut flows: HashMap<u64, FlowTally> = HashMap::new();
    let mut names = Names::default();
    let (first_violation, first_blocked) = (s.violation_list.len(), s.blocked_list.len());
    // Ranges the sensor declared lost (signed; the verification checks them), and
    // the seq and time of the record before the current one, which bound their time.
    let declared = declared_gap::read(dir).unwrap_or_default();
    let mut before: (u64, i64) = (0, i64::MIN);
    // An unreadable chain shows as not verified (verify_dir names why).
    for seg in time_index::chain_index(store, chain, dir).unwrap_or_default() {
        for block in &seg.blocks {
            // A damaged block ends the walk here; the verification names the break.
            let Ok(frames) = time_index::read_block(&seg, block) else {
                break;
            };
            for f in frames {
                let (kind, t) = time_index::kind_and_time(&f.record_bytes);
                if let Some(g) = declared.get(&(before.0 + 1))
                    && g.to + 1 == f.seq
                    && t >= since
                    && before.1 < until
                {
                    out.gaps.push(declared_gap_row(g, before.1, t));
                }
                before = (f.seq, t);
                let in_window = t >= since && t < until;
                // A flow's ServerHello comes after its flow_start: its next record,
                // within an active timeout of the window's end, tells the crypto
                // section what a flow of the window negotiated (nothing else).
                let late = t >= until
                    && t < until.saturating_add(POSTURE_HORIZON_NS)
                    && (kind == RecordKind::FlowUpdate as i32
                        || kind == RecordKind::FlowEnd as i32);
                let wanted = in_window
                    || late
                    || kind == RecordKind::Checkpoint as i32
                    || kind == RecordKind::PolicyChange as i32;
                if !wanted {
                    continue;
                }
                let Ok(r) = v1::Record::decode(&f.record_bytes[..]) else {
                    continue; // verify_dir names it
                };
                if in_window {
                    out.records += 1;
                    if out.first_seq == 0 {
                        out.first_seq = f.seq;
                    }
                    out.last_seq = f.seq;
                }
                match r.body {
                    Some(Body::Checkpoint(c)) => {
                        let interval = match c.interval_ms {
                            0 => DEFAULT_EVERY,
                            ms => Duration::from_millis(ms),
                        };
                        if in_window {
                            out.checkpoints += 1;
                        }
                        beats.push(Heartbeat {
                            time: t,
                            interval,
                            seq: f.seq,
                            hash: hex::encode(f.hash),
                        });
                    }
                    Some(Body::PolicyChange(p)) => {
                        if !r.site.is_empty() {
                            s.site.clone_from(&r.site);
                        }
                        let row = PolicyRow {
                            time: rfc3339(t),
                            sensor: chain.to_owned(),
                            seq: f.seq,
                            trigger: p.trigger,
                            hash: hex::encode(&p.policy_hash),
                            path: p.path,
                            enforcement: p.enforcement,
                            default_action: p.default_action,
                            zones: p.zone_list.iter().map(|z| json!({"id": z.id, "name": z.name, "level": z.level, "networks": z.networks, "vlans": z.vlans})).collect(),
                            endpoints: p.endpoint_list.iter().map(|e| json!({"id": e.id, "provider": e.provider, "sni": e.sni, "networks": e.networks, "catalogue": e.catalogue})).collect(),
                            conduits: p.conduit_list.iter().map(|c| json!({"id": c.id, "from": c.from, "to": c.to, "ports": c.ports, "protocols": c.protocols, "action": c.action, "owner": c.owner, "purpose": c.purpose})).collect(),
                            counts: (p.zones, p.endpoints, p.conduits),
                            truncated: p.content_truncated,
                            in_force_at_start: false,
                        };
                        if in_window {
                            s.policies.push(row);
                        } else if t < since {
                            policy_before = Some(PolicyRow {
                                in_force_at_start: true,
                                ..row
                            });
                        }
                    }
                    Some(Body::Flow(fl)) if late => {
                        if !fl.tls_cipher.is_empty()
                            && let Some(tally) = flows.get_mut(&fl.flow_id)
                        {
                            tally.posture = names.id(&posture(&fl));
                        }
                    }
                    Some(Body::Flow(fl)) => {
                        let bytes = fl.source.map_or(0, |c| c.bytes)
                            + fl.destination.map_or(0, |c| c.bytes);
                        let verdict = verdict_name(fl.verdict);
                        let (zone, endpoint) = (names.id(&fl.zone), names.id(&fl.endpoint));
                        let conduit = if fl.conduit_id.is_empty() {
                            names.id(&format!("(no conduit) {}", fl.endpoint))
                        } else {
                            names.id(&fl.conduit_id)
                        };
                        let posture = names.id(&posture(&fl));
                        let tally = flows.entry(fl.flow_id).or_insert(FlowTally {
                            verdict,
                            zone,
                            endpoint,
                            conduit,
                            posture,
                            bytes,
                            listed: None,
                        });
                        (tally.verdict, tally.zone, tally.endpoint, tally.bytes) =
                            (verdict, zone, endpoint, bytes);
                        tally.conduit = conduit;
                        // A later record without it (none) keeps what an earlier had.
                        if !fl.tls_cipher.is_empty() {
                            tally.posture = posture;
                        }
                        let list = match verdict {
                            "violation" => &mut s.violation_list,
                            "blocked" => &mut s.blocked_list,
                            _ => continue,
                        };
                        let row = || FlowRow {
                            time: rfc3339(t),
                            sensor: chain.to_owned(),
                            seq: f.seq,
                            verdict: verdict.to_owned(),
                            flow_id: fl.flow_id,
                            source: format!(
                                "{}:{}",
                                ip_text(&fl.source_ip).unwrap_or_default(),
                                fl.source_port
                            ),
                            destination: format!(
                                "{}:{}",
                                ip_text(&fl.destination_ip).unwrap_or_default(),
                                fl.destination_port
                            ),
                            server_name: fl.server_name.clone(),
                            zone: fl.zone.clone(),
                            endpoint: fl.endpoint.clone(),
                            conduit: fl.conduit_id.clone(),
                            bytes,
                        };
                        match tally.listed {
                            Some(i) => list[i as usize] = row(),
                            None if list.len() < s.max_rows => {
                                tally.listed = u32::try_from(list.len()).ok();
                                list.push(row());
                            }
                            None => {}
                        }
                    }
                    Some(Body::Loss(l)) => {
                        s.loss += l.count;
                        s.loss_records += 1;
                        // Records the sensor itself lost (damaged spool): the window
                        // is not complete, whatever the heartbeats say.
                        if crate::store::SPOOL_DAMAGE_REASONS.contains(&l.reason.as_str()) {
                            out.gaps.push(Gap {
                                from: rfc3339(t),
                                to: rfc3339(t),
                                reason: format!(
                                    "{} records lost from the sensor's spool ({}): {}",
                                    l.count, l.reason, l.detail
                                ),
                                seconds: 0.0,
                            });
                        }
                        if s.loss_list.len() >= s.max_rows {
                            continue;
                        }
                        s.loss_list.push(LossRow {
                            time: rfc3339(t),
                            sensor: chain.to_owned(),
                            seq: f.seq,
                            reason: l.reason,
                            count: l.count,
                            unit: l.unit,
                            origin: l.origin,
                            detail: l.detail,
                        });
                    }
                    _ => {}
                }
            }
        }
    }
    if let Some(p) = policy_before {
        s.policies.insert(0, p);
    }
    let mut crypto: BTreeMap<(u32, u32), u64> = BTreeMap::new();
    for f in flows.into_values() {
        s.flows += 1;
        if !names.name(f.endpoint).is_empty() {
            *crypto.entry((f.conduit, f.posture)).or_default() += 1;
        }
        let zone = match names.name(f.zone) {
            "" => "(no zone)",
            z => z,
        };
        let endpoint = match names.name(f.endpoint) {
            "" => "(no AI endpoint)",
            e => e,
        };
        let cell = s
            .matrix
            .entry(zone.to_owned())
            .or_default()
            .entry(endpoint.to_owned())
            .or_default();
        *cell.flows.entry(f.verdict.to_owned()).or_default() += 1;
        *cell.bytes.entry(f.verdict.to_owned()).or_default() += f.bytes;
        match f.verdict {
            "violation" => s.violations += 1,
            "blocked" => s.blocked += 1,
            _ => {}
        }
    }
    for ((conduit, posture), flows) in crypto {
        let mut p = names.name(posture).split('\t');
        let mut field = || p.next().unwrap_or_default().to_owned();
        let (version, cipher, curve, pq) = (field(), field(), field(), field());
        s.crypto.push(CryptoRow {
            conduit: names.name(conduit).to_owned(),
            version,
            cipher,
            curve,
            pq_negotiated: (!pq.is_empty()).then(|| pq == "true"),
            flows,
        });
    }
    s.crypto.sort();
    let by_time =
        |a: &FlowRow, b: &FlowRow| (a.time.as_str(), a.seq).cmp(&(b.time.as_str(), b.seq));
    s.violation_list[first_violation..].sort_by(by_time);
    s.blocked_list[first_blocked..].sort_by(by_time);
    heartbeat_gaps(&beats, since, until, &mut out);
    if let Some(a) = anchor.filter(|a| a.pruned_until >= since) {
        out.gaps.insert(
            0,
            Gap {
                from: rfc3339(since),
                to: rfc3339(a.pruned_until.min(until)),
                reason: format!(
                    "records pruned by retention ({} days) on {}",
                    a.retention_days, a.time
                ),
                seconds: (a.pruned_until.min(until) - since) as f64 / 1e9,
            },
        );
    }
    s.sensors.push(out);
    Ok(())
}

/// The heads the collector cosigned in the window and the two that bracket it (the
/// verification above checked each against the chain).
fn witnessed_heads(dir: &Path, since: i64, until: i64, out: &mut SensorSummary) {
    let Ok(w) = cosignature::read(dir) else {
        return; // the verification names it
    };
    let head = |c: &cosignature::Cosignature| WitnessedHead {
        seq: c.seq,
        hash: hex::encode(&c.hash[..8]),
        time: rfc3339(c.time_unix_nano),
    };
    let mut cosigs = w.cosignatures;
    cosigs.sort_by_key(|c| (c.time_unix_nano, c.seq));
    for c in &cosigs {
        if c.time_unix_nano < since {
            out.witnessed_before = Some(head(c));
        } else if c.time_unix_nano < until {
            out.witnessed.push(head(c));
        } else if out.witnessed_after.is_none() {
            out.witnessed_after = Some(head(c));
        }
    }
    out.witnessed_heads = out.witnessed.len() as u64;
}

/// Every silence longer than the heartbeat (plus its grace) that meets the window,
/// and the checkpoints that bracket it.
/// A declared gap as the report lists it: its records were made between the
/// record before it (`after`; none: the chain's start) and the one after it.
fn declared_gap_row(g: &DeclaredGap, after: i64, until: i64) -> Gap {
    let from = if after == i64::MIN { until } else { after };
    Gap {
        from: rfc3339(from),
        to: rfc3339(until),
        reason: format!(
            "records seq {}..={} lost from the sensor's spool before the collector stored them (declared and signed by the sensor): {}",
            g.from, g.to, g.reason
        ),
        seconds: (until - from) as f64 / 1e9,
    }
}

fn heartbeat_gaps(beats: &[Heartbeat], since: i64, until: i64, out: &mut SensorSummary) {
    let nanos = |d: Duration| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX);
    let secs = |a: i64, b: i64| (b - a) as f64 / 1e9;
    let gap = |from: i64, to: i64, reason: &str, out: &mut SensorSummary| {
        out.gaps.push(Gap {
            from: rfc3339(from),
            to: rfc3339(to),
            reason: reason.to_owned(),
            seconds: secs(from, to),
        });
    };
    let cref = |b: &Heartbeat| CheckpointRef {
        seq: b.seq,
        time: rfc3339(b.time),
        hash: b.hash.clone(),
    };
    let before = beats.iter().rposition(|b| b.time <= since);
    let after = beats.iter().position(|b| b.time >= until);
    out.bracket_before = before.map(|i| cref(&beats[i]));
    out.bracket_after = after.map(|i| cref(&beats[i]));
    out.heartbeat_seconds = beats
        .iter()
        .rev()
        .find(|b| b.time < until)
        .or(beats.first())
        .map_or(DEFAULT_EVERY, |b| b.interval)
        .as_secs_f64();
    let lo = before.unwrap_or(0);
    let hi = after.unwrap_or(beats.len().saturating_sub(1));
    let span = if beats.is_empty() {
        &[][..]
    } else {
        &beats[lo..=hi]
    };
    match (before, span.first()) {
        (None, Some(first)) if first.time > since => gap(
            since,
            first.time.min(until),
            "no signed checkpoint before the window's start (the sensor had not started, or its records are gone)",
            out,
        ),
        (_, None) => gap(
            since,
            until,
            "no signed checkpoint from this sensor at all",
            out,
        ),
        _ => {}
    }
    for w in span.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        let allowed = nanos(a.interval + heartbeat_grace(a.interval));
        if b.time - a.time > allowed && b.time > since && a.time < until {
            gap(
                a.time.max(since),
                b.time.min(until),
                &format!(
                    "silence: no heartbeat for {:.1} s (interval {:.0} s): sensor stopped or link down",
                    secs(a.time, b.time),
                    a.interval.as_secs_f64()
                ),
                out,
            );
        }
    }
    if after.is_none()
        && let Some(last) = span.last()
    {
        gap(
            last.time.max(since),
            until,
            "no signed checkpoint at or after the window's end yet (sensor silent since, or the window is not over)",
            out,
        );
    }
}

/// The report as one self-contained HTML document.
pub fn render_html(s: &Summary) -> anyhow::Result<String> {
    let mut env = minijinja::Environment::new();
    env.add_template("report.html", TEMPLATE)?;
    // Embedded JSON must not close its <script> element early.
    let summary_json = serde_json::to_string(&contract_summary(s))?
        .replace("</", "<\\/")
        .replace("<!--", "<\\!--");
    let html = env
        .get_template("report.html")?
        .render(minijinja::context! {
            s => minijinja::Value::from(minijinja::value::Serde(s)),
            summary_json => minijinja::Value::from_safe_string(summary_json),
            version => env!("CARGO_PKG_VERSION"),
        })?;
    Ok(html)
}

/// Prints the HTML report to PDF with headless Chromium (`$CHROMIUM`, else
/// `chromium` on PATH), so the PDF is what a browser shows.
pub fn print_pdf(html: &Path, pdf: &Path) -> anyhow::Result<()> {
    let html = std::path::absolute(html)?;
    let chromium = std::env::var_os("CHROMIUM").unwrap_or_else(|| "chromium".into());
    let out = std::process::Command::new(&chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-pdf-header-footer",
        ])
        .arg(format!("--print-to-pdf={}", pdf.display()))
        .arg(format!("file://{}", html.display()))
        .output()
        .map_err(|e| {
            anyhow::anyhow!(
                "running {}: {e} (install chromium or set CHROMIUM)",
                chromium.to_string_lossy()
            )
        })?;
    if !out.status.success() || !pdf.exists() {
        anyhow::bail!(
            "{} could not print {} to PDF: {}",
            chromium.to_string_lossy(),
            html.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The contract's summary object: the fields DESIGN.md names, plus the details.
pub fn contract_summary(s: &Summary) -> serde_json::Value {
    let mut v = serde_json::to_value(s).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.remove("matrix");
        o.remove("policies");
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(secs: i64) -> Heartbeat {
        Heartbeat {
            time: secs * 1_000_000_000,
            interval: Duration::from_secs(10),
            seq: secs as u64,
            hash: String::new(),
        }
    }

    fn summary() -> SensorSummary {
        SensorSummary {
            id: "gw".into(),
            first_seq: 0,
            last_seq: 0,
            records: 0,
            checkpoints: 0,
            gaps: Vec::new(),
            verified: true,
            first_bad_seq: None,
            first_bad: None,
            public_key: None,
            key_source: String::new(),
            heartbeat_seconds: 0.0,
            bracket_before: None,
            bracket_after: None,
            chain_records: 0,
            chain_first_seq: 0,
            chain_last_seq: 0,
            retention: None,
            witnessed_heads: 0,
            witnessed: Vec::new(),
            witnessed_before: None,
            witnessed_after: None,
            cosignatures_verified: 0,
            witness_key: None,
        }
    }

    const S: i64 = 1_000_000_000;

    #[test]
    fn witnessed_heads_in_and_around_the_window() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
        for (seq, t) in [(10, 5), (20, 12), (30, 18), (40, 25), (50, 30)] {
            let c = cosignature::Cosignature::sign(&key, "gw", seq, &[seq as u8; 32], t * S);
            cosignature::append(dir.path(), &c).expect("append");
        }
        let mut out = summary();
        witnessed_heads(dir.path(), 10 * S, 20 * S, &mut out);
        assert_eq!(out.witnessed_heads, 2);
        let seqs: Vec<u64> = out.witnessed.iter().map(|w| w.seq).collect();
        assert_eq!(seqs, vec![20, 30]);
        assert_eq!(out.witnessed_before.as_ref().map(|w| w.seq), Some(10));
        assert_eq!(out.witnessed_after.as_ref().map(|w| w.seq), Some(40));
        assert_eq!(out.witnessed[0].hash, "1414141414141414");
    }

    #[test]
    fn steady_heartbeats_bracket_the_window() {
        let beats: Vec<_> = (0..10).map(|i| beat(i * 10)).collect();
        let mut out = summary();
        heartbeat_gaps(&beats, 15 * S, 65 * S, &mut out);
        assert!(out.gaps.is_empty(), "{:?}", out.gaps);
        assert_eq!(out.bracket_before.expect("bracket").seq, 10);
        assert_eq!(out.bracket_after.expect("bracket").seq, 70);
    }

    #[test]
    fn a_silence_is_a_named_gap() {
        let beats: Vec<_> = [0, 10, 20, 50, 60, 70].into_iter().map(beat).collect();
        let mut out = summary();
        heartbeat_gaps(&beats, 5 * S, 65 * S, &mut out);
        assert_eq!(out.gaps.len(), 1, "{:?}", out.gaps);
        assert!(out.gaps[0].reason.starts_with("silence"));
        assert_eq!(out.gaps[0].seconds, 30.0);
        // Within the grace (15 s for a 10 s heartbeat): no gap.
        let beats: Vec<_> = [0, 10, 24, 34].into_iter().map(beat).collect();
        let mut out = summary();
        heartbeat_gaps(&beats, S, 30 * S, &mut out);
        assert!(out.gaps.is_empty(), "{:?}", out.gaps);
    }

    #[test]
    fn an_open_or_unstarted_window_is_incomplete() {
        let beats: Vec<_> = [20, 30].into_iter().map(beat).collect();
        let mut out = summary();
        heartbeat_gaps(&beats, 0, 25 * S, &mut out);
        assert_eq!(out.gaps.len(), 1);
        assert!(out.gaps[0].reason.contains("before the window"));
        let mut out = summary();
        heartbeat_gaps(&beats, 21 * S, 40 * S, &mut out);
        assert_eq!(out.gaps.len(), 1);
        assert!(out.gaps[0].reason.contains("window's end"));
        let mut out = summary();
        heartbeat_gaps(&[], 0, S, &mut out);
        assert_eq!(out.gaps.len(), 1);
    }
}
