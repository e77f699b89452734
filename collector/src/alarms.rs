//! The collector's own alarms: logged, counted, and appended as signed ALARM records
//! to its own chain in `<store>/_collector/` (same format as a sensor spool, with its
//! own key, so `conduit-sensor verify-chain` checks it and the exports ship it).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use conduit_evidence::chain::{Recorder, RecorderOptions};
use conduit_evidence::spool::SyncPolicy;
use conduit_proto::v1::{self, RecordKind, record::Body};

use crate::listener::Refusal;
use crate::store::ALARM_DIR;
use crate::text::bounded;

/// Longest alarm detail kept (peer-controlled text is cut, never stored whole).
const MAX_DETAIL_BYTES: usize = 2048;

/// Sensor id of the alarm chain.
pub const ALARM_SENSOR_ID: &str = "collector";

#[derive(Debug, Default)]
pub struct Metrics {
    pub connections: AtomicU64,
    pub records_stored: AtomicU64,
    pub records_duplicate: AtomicU64,
    pub batches_rejected: AtomicU64,
    pub alarms: AtomicU64,
    pub alarm_gap: AtomicU64,
    pub alarm_equivocation: AtomicU64,
    pub alarm_other: AtomicU64,
    pub connections_open: AtomicU64,
    pub accept_errors: AtomicU64,
    pub refused_total_limit: AtomicU64,
    pub refused_per_peer_limit: AtomicU64,
    pub refused_handshake: AtomicU64,
    pub closed_idle: AtomicU64,
    pub streams_evicted: AtomicU64,
    /// Rate limits of the corresponding warnings (unix seconds of the last one).
    pub last_refusal_log: AtomicU64,
    pub last_accept_log: AtomicU64,
}

impl Metrics {
    pub fn refused(&self, why: Refusal) {
        match why {
            Refusal::Total => &self.refused_total_limit,
            Refusal::PerPeer => &self.refused_per_peer_limit,
            Refusal::Handshake => &self.refused_handshake,
            Refusal::Idle => &self.closed_idle,
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    /// Prometheus text exposition, with HELP and TYPE for every family.
    pub fn render(&self) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = String::new();
        for (name, kind, help, samples) in [
            (
                "connections_total",
                "counter",
                "Sensor streams accepted.",
                vec![("", g(&self.connections))],
            ),
            (
                "records_stored_total",
                "counter",
                "Records verified and stored.",
                vec![("", g(&self.records_stored))],
            ),
            (
                "records_duplicate_total",
                "counter",
                "Re-sent records already stored (de-duplicated).",
                vec![("", g(&self.records_duplicate))],
            ),
            (
                "batches_rejected_total",
                "counter",
                "Batches rejected by verification.",
                vec![("", g(&self.batches_rejected))],
            ),
            (
                "alarms_total",
                "counter",
                "Alarms raised, by kind.",
                vec![
                    ("{kind=\"gap\"}", g(&self.alarm_gap)),
                    ("{kind=\"equivocation\"}", g(&self.alarm_equivocation)),
                    ("{kind=\"other\"}", g(&self.alarm_other)),
                ],
            ),
            (
                "connections_open",
                "gauge",
                "Connections open now.",
                vec![("", g(&self.connections_open))],
            ),
            (
                "accept_errors_total",
                "counter",
                "Failed accepts (for example out of file descriptors), waited out.",
                vec![("", g(&self.accept_errors))],
            ),
            (
                "connections_rejected_total",
                "counter",
                "Connections refused or closed before a stream, by reason.",
                vec![
                    ("{reason=\"max_connections\"}", g(&self.refused_total_limit)),
                    (
                        "{reason=\"max_connections_per_peer\"}",
                        g(&self.refused_per_peer_limit),
                    ),
                    ("{reason=\"handshake\"}", g(&self.refused_handshake)),
                    ("{reason=\"idle\"}", g(&self.closed_idle)),
                ],
            ),
            (
                "streams_evicted_total",
                "counter",
                "Sensor streams evicted after a silence.",
                vec![("", g(&self.streams_evicted))],
            ),
        ] {
            out.push_str(&format!(
                "# HELP conduit_collector_{name} {help}\n# TYPE conduit_collector_{name} {kind}\n"
            ));
            for (labels, value) in samples {
                out.push_str(&format!("conduit_collector_{name}{labels} {value}\n"));
            }
        }
        out.push_str(&format!(
            "# HELP conduit_collector_build_info The running build.\n# TYPE conduit_collector_build_info gauge\nconduit_collector_build_info{{version=\"{}\"}} 1\n",
            env!("CARGO_PKG_VERSION")
        ));
        out
    }
}

pub struct Alarms {
    recorder: Mutex<Recorder>,
    pub metrics: Arc<Metrics>,
}

impl Alarms {
    pub fn open(store: &Path) -> Result<Alarms, conduit_evidence::chain::Error> {
        let mut opts = RecorderOptions::new(store.join(ALARM_DIR), ALARM_SENSOR_ID);
        opts.sync = SyncPolicy::EveryRecord;
        let (recorder, _) = Recorder::open(opts)?;
        Ok(Alarms {
            recorder: Mutex::new(recorder),
            metrics: Arc::default(),
        })
    }

    /// Logs, counts and records an alarm about `sensor_id` at `seq`.
    pub fn raise(&self, kind: &str, sensor_id: &str, seq: u64, detail: &str) {
        let sensor_id = bounded(sensor_id, conduit_proto::limits::MAX_SENSOR_ID_BYTES);
        let detail = bounded(detail, MAX_DETAIL_BYTES);
        let (sensor_id, detail) = (sensor_id.as_ref(), detail.as_ref());
        tracing::error!(alarm = kind, sensor = sensor_id, seq, detail, "ALARM");
        self.metrics.alarms.fetch_add(1, Ordering::Relaxed);
        match kind {
            "gap" => &self.metrics.alarm_gap,
            "equivocation" => &self.metrics.alarm_equivocation,
            _ => &self.metrics.alarm_other,
        }
        .fetch_add(1, Ordering::Relaxed);
        self.append(kind, sensor_id, seq, detail);
    }

    /// Records an event of the collector's own (e.g. `retention`) in its signed
    /// chain, without raising an alarm.
    pub fn note(&self, kind: &str, sensor_id: &str, seq: u64, detail: &str) {
        let sensor_id = bounded(sensor_id, conduit_proto::limits::MAX_SENSOR_ID_BYTES);
        let detail = bounded(detail, MAX_DETAIL_BYTES);
        self.append(kind, &sensor_id, seq, &detail);
    }

    fn append(&self, kind: &str, sensor_id: &str, seq: u64, detail: &str) {
        let record = v1::Record {
            kind: RecordKind::Alarm as i32,
            time_unix_nano: 0,
            sensor_id: String::new(),
            site: String::new(),
            body: Some(Body::Alarm(v1::Alarm {
                kind: kind.to_owned(),
                sensor_id: sensor_id.to_owned(),
                seq,
                detail: detail.to_owned(),
            })),
        };
        let mut rec = match self.recorder.lock() {
            Ok(r) => r,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Err(e) = rec.append(record).and_then(|_| rec.sync()) {
            tracing::error!(error = %e, "could not write the alarm record");
        }
    }

    /// Timer: checkpoints the alarm chain so that its silence is signed too.
    pub fn tick(&self) {
        let mut rec = match self.recorder.lock() {
            Ok(r) => r,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Err(e) = rec.tick(SystemTime::now()).and_then(|_| rec.sync()) {
            tracing::error!(error = %e, "alarm chain tick failed");
        }
    }
}
