//! After a crash (kill -9, power loss): the flows the spool shows started and never
//! ended. The restarted agent closes each with a `flow_end` (IPFIX reason lack of
//! resources) carrying the last counts the spool has, and continues flow ids after
//! the highest one stored, so the closing records cannot be mistaken for new flows.

use std::{collections::HashMap, path::Path};

use conduit_evidence::spool::ReadError;
use conduit_proto::v1::{FlowEndReason, Record, RecordKind, record::Body};
use prost::Message as _;

/// What a spool says about its flows.
#[derive(Debug, Default)]
pub struct SpoolFlows {
    /// The last record (start or update) of every flow that has no `flow_end`, in
    /// flow id order.
    pub open: Vec<Record>,
    /// Highest flow id stored.
    pub max_flow_id: u64,
}

/// Reads every stored record of `dir` (after the recorder has cut a torn tail).
pub fn spool_flows(dir: &Path) -> Result<SpoolFlows, ReadError> {
    let mut open: HashMap<u64, Record> = HashMap::new();
    let mut max_flow_id = 0;
    // Past damage (a deleted or cut middle segment, reported by the recorder as a
    // `spool_gap` loss): the flows on either side still get closed.
    conduit_evidence::spool::damage::read_past_damage(dir, |frame| {
        let Ok(record) = Record::decode(frame.record_bytes.as_slice()) else {
            return;
        };
        let Some(Body::Flow(flow)) = &record.body else {
            return;
        };
        let id = flow.flow_id;
        max_flow_id = max_flow_id.max(id);
        match RecordKind::try_from(record.kind) {
            Ok(RecordKind::FlowStart | RecordKind::FlowUpdate) => {
                open.insert(id, record);
            }
            Ok(RecordKind::FlowEnd) => {
                open.remove(&id);
            }
            _ => {}
        }
    })?;
    let mut open: Vec<(u64, Record)> = open.into_iter().collect();
    open.sort_by_key(|(id, _)| *id);
    Ok(SpoolFlows {
        open: open.into_iter().map(|(_, r)| r).collect(),
        max_flow_id,
    })
}

/// The `flow_end` that closes `last` (a flow's last stored record): same flow, last
/// known counts, reason lack of resources, a new record time.
pub fn closing_record(last: &Record) -> Record {
    let mut r = last.clone();
    r.kind = RecordKind::FlowEnd as i32;
    r.time_unix_nano = 0;
    if let Some(Body::Flow(f)) = &mut r.body {
        f.end_reason = FlowEndReason::LackOfResources as i32;
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use conduit_evidence::chain::{Recorder, RecorderOptions};
    use conduit_proto::v1::Flow;

    fn flow(kind: RecordKind, id: u64, packets: u64) -> Record {
        Record {
            kind: kind as i32,
            body: Some(Body::Flow(Flow {
                flow_id: id,
                source: Some(conduit_proto::v1::Counts {
                    bytes: packets * 100,
                    packets,
                }),
                ..Flow::default()
            })),
            ..Record::default()
        }
    }

    #[test]
    fn started_and_never_ended_flows_are_found_with_their_last_counts() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let opts = RecorderOptions::new(dir.path(), "gw");
        let (mut rec, _) = Recorder::open(opts).unwrap_or_else(|e| panic!("{e}"));
        for r in [
            flow(RecordKind::FlowStart, 1, 1),
            flow(RecordKind::FlowStart, 2, 1),
            flow(RecordKind::FlowUpdate, 2, 5),
            flow(RecordKind::FlowStart, 3, 1),
            flow(RecordKind::FlowEnd, 3, 2),
        ] {
            rec.append(r).unwrap_or_else(|e| panic!("{e}"));
        }
        rec.sync().unwrap_or_else(|e| panic!("{e}"));
        drop(rec);
        let found = spool_flows(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(found.max_flow_id, 3);
        let ids: Vec<u64> = found
            .open
            .iter()
            .map(|r| match &r.body {
                Some(Body::Flow(f)) => f.flow_id,
                _ => 0,
            })
            .collect();
        assert_eq!(ids, vec![1, 2]);
        let end = closing_record(&found.open[1]);
        assert_eq!(end.kind, RecordKind::FlowEnd as i32);
        let Some(Body::Flow(f)) = &end.body else {
            panic!("not a flow")
        };
        assert_eq!(f.end_reason, FlowEndReason::LackOfResources as i32);
        assert_eq!(f.source.as_ref().map(|c| c.packets), Some(5));
    }
}
