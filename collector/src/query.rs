//! `conduit-collector query`: the records of a store that match a filter, read
//! through the time index (only blocks whose time range meets the window are read
//! and decoded), in store order: chain by chain, seq by seq.

use std::net::IpAddr;
use std::path::Path;

use conduit_evidence::ecs::{action_name, ip_text, verdict_name};
use conduit_proto::v1::{self, RecordKind, Verdict, record::Body};
use prost::Message as _;

use crate::export::Item;
use crate::store::chain_dirs;
use crate::time_index::{self, IndexError};

/// What `query` selects; every field given must match. Times are
/// `Record.time_unix_nano` (`@timestamp`): `since <= t < until`.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub sensor: Option<String>,
    pub since: Option<i64>,
    pub until: Option<i64>,
    pub src_ip: Option<IpAddr>,
    pub zone: Option<String>,
    pub conduit: Option<String>,
    pub verdict: Option<Verdict>,
    pub action: Option<RecordKind>,
}

/// The verdict a `--verdict` value names (the JSON line's `conduit.verdict`).
pub fn parse_verdict(s: &str) -> Option<Verdict> {
    Some(match s {
        "authorized" => Verdict::Authorized,
        "violation" => Verdict::Violation,
        "blocked" => Verdict::Blocked,
        "unclassified" => Verdict::Unclassified,
        _ => return None,
    })
}

/// The record kind an `--action` value names (the JSON line's `event.action`).
pub fn parse_action(s: &str) -> Option<RecordKind> {
    (1..=9)
        .filter_map(|k| RecordKind::try_from(k).ok())
        .find(|&k| action_name(k) == s)
}

impl Filter {
    fn time_overlaps(&self, min: i64, max: i64) -> bool {
        self.since.is_none_or(|s| max >= s) && self.until.is_none_or(|u| min < u)
    }

    fn time_matches(&self, t: i64) -> bool {
        self.time_overlaps(t, t)
    }

    fn needs_flow(&self) -> bool {
        self.src_ip.is_some()
            || self.zone.is_some()
            || self.conduit.is_some()
            || self.verdict.is_some()
    }

    /// Whether a decoded record matches (the time and sensor are checked before).
    pub fn matches(&self, r: &v1::Record) -> bool {
        if self.action.is_some_and(|a| a as i32 != r.kind) {
            return false;
        }
        if !self.needs_flow() {
            return true;
        }
        let Some(Body::Flow(f)) = &r.body else {
            return false;
        };
        let ip_is = |want: IpAddr| match want {
            IpAddr::V4(a) => f.source_ip == a.octets(),
            IpAddr::V6(a) => f.source_ip == a.octets(),
        };
        self.src_ip.is_none_or(ip_is)
            && self.zone.as_ref().is_none_or(|z| &f.zone == z)
            && self.conduit.as_ref().is_none_or(|c| &f.conduit_id == c)
            && self.verdict.is_none_or(|v| {
                // Unclassified is also what an unset verdict means.
                f.verdict == v as i32
                    || (v == Verdict::Unclassified && f.verdict == Verdict::Unspecified as i32)
            })
    }
}

/// Calls `each` with every matching record, chain by chain in store order; stops at
/// the first error `each` returns or the first unreadable frame.
pub fn query(
    store: &Path,
    filter: &Filter,
    mut each: impl FnMut(Item) -> anyhow::Result<()>,
) -> anyhow::Result<QueryStats> {
    let mut stats = QueryStats::default();
    for (chain, dir) in chain_dirs(store)? {
        // `_collector` (`--sensor collector`) selects every collector's alarm chain
        // (several in a copy from JetStream).
        let alarms =
            |s: &String| s == crate::store::ALARM_DIR && crate::store::is_alarm_dir(&chain);
        if filter
            .sensor
            .as_ref()
            .is_some_and(|s| s != &chain && !alarms(s))
        {
            continue;
        }
        for seg in time_index::chain_index(store, &chain, &dir)? {
            for block in &seg.blocks {
                stats.blocks += 1;
                if !filter.time_overlaps(block.min_time, block.max_time) {
                    continue;
                }
                stats.blocks_read += 1;
                for f in time_index::read_block(&seg, block)? {
                    stats.frames_read += 1;
                    let (_, t) = time_index::kind_and_time(&f.record_bytes);
                    if !filter.time_matches(t) {
                        continue;
                    }
                    let record =
                        v1::Record::decode(&f.record_bytes[..]).map_err(|e| IndexError::Io {
                            path: seg.path.clone(),
                            source: std::io::Error::other(format!(
                                "seq {}: record does not decode: {e}",
                                f.seq
                            )),
                        })?;
                    if filter.matches(&record) {
                        stats.matched += 1;
                        each(Item::new(&chain, &f, record))?;
                    }
                }
            }
        }
    }
    Ok(stats)
}

/// How much of the store a query touched (printed with `--stats`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueryStats {
    pub blocks: u64,
    pub blocks_read: u64,
    pub frames_read: u64,
    pub matched: u64,
}

/// One line of `--format table`.
pub fn table_row(item: &Item) -> String {
    let r = &item.record;
    let time = conduit_evidence::ecs::rfc3339(r.time_unix_nano);
    let action = item.action();
    let rest = match &r.body {
        Some(Body::Flow(f)) => {
            let ip = |b: &[u8]| ip_text(b).unwrap_or_else(|| "-".to_owned());
            format!(
                "{:<12} {}:{} -> {}:{} {} {} {}",
                verdict_name(f.verdict),
                ip(&f.source_ip),
                f.source_port,
                ip(&f.destination_ip),
                f.destination_port,
                if f.server_name.is_empty() {
                    "-"
                } else {
                    &f.server_name
                },
                if f.zone.is_empty() { "-" } else { &f.zone },
                if f.conduit_id.is_empty() {
                    "-"
                } else {
                    &f.conduit_id
                },
            )
        }
        Some(Body::Loss(l)) => format!("{} {} {} ({})", l.reason, l.count, l.unit, l.origin),
        Some(Body::Alarm(a)) => format!(
            "{} sensor {} seq {}: {}",
            a.kind, a.sensor_id, a.seq, a.detail
        ),
        Some(Body::PolicyChange(p)) => format!("{} {}", p.trigger, hex::encode(&p.policy_hash)),
        Some(Body::Checkpoint(c)) => format!("covers seq {}", c.seq),
        Some(Body::ChainRestart(c)) => format!("{} {}", c.reason, c.detail),
        Some(Body::SpoolRecovery(s)) => {
            format!("{} truncated {} bytes", s.segment, s.truncated_bytes)
        }
        None => String::new(),
    };
    format!(
        "{time} {:<16} {:>8} {action:<14} {rest}",
        item.chain, item.pos.seq
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(parse_action("flow_end"), Some(RecordKind::FlowEnd));
        assert_eq!(parse_action("alarm"), Some(RecordKind::Alarm));
        assert_eq!(parse_action("nope"), None);
        assert_eq!(parse_verdict("violation"), Some(Verdict::Violation));
        assert_eq!(parse_verdict("Violation"), None);
    }

    #[test]
    fn window_is_half_open() {
        let f = Filter {
            since: Some(10),
            until: Some(20),
            ..Filter::default()
        };
        assert!(f.time_matches(10) && f.time_matches(19));
        assert!(!f.time_matches(20) && !f.time_matches(9));
        assert!(f.time_overlaps(0, 10) && !f.time_overlaps(20, 30));
    }
}
