//! The collector's metrics (prometheus-client), served by conduit-ops' endpoint as
//! `conduit_collector_*`. Counters and gauges are the library's own types; the
//! per-sensor positions (head, last seen, export lag) are read at each scrape from
//! one table, so the lag is always head minus what each export has shipped.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;
use std::sync::Arc;

use crate::listener::Refusal;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// Where a sensor's chain stands in this collector.
#[derive(Clone, Copy, Debug, Default)]
struct Position {
    head: u64,
    /// Unix seconds of the sensor's last message.
    last_seen: f64,
}

#[derive(Debug, Default)]
pub struct Metrics {
    pub connections: Counter,
    pub records_stored: Counter,
    pub records_duplicate: Counter,
    pub batches_rejected: Counter,
    pub alarms: Family<KindLabels, Counter>,
    pub connections_open: Gauge,
    pub accept_errors: Counter,
    pub connections_rejected: Family<ReasonLabels, Counter>,
    pub streams_evicted: Counter,
    /// Rate limits of the corresponding warnings (unix seconds of the last one).
    pub last_refusal_log: AtomicU64,
    pub last_accept_log: AtomicU64,
    sensors: Mutex<BTreeMap<String, Position>>,
    /// Last exported seq by (export, chain).
    exported: Mutex<BTreeMap<(String, String), u64>>,
    exports: Mutex<BTreeSet<String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Metrics {
    pub fn refused(&self, why: Refusal) {
        let reason = match why {
            Refusal::Total => "max_connections",
            Refusal::PerPeer => "max_connections_per_peer",
            Refusal::Handshake => "handshake",
            Refusal::Idle => "idle",
        };
        self.connections_rejected
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub fn alarm(&self, kind: &str) {
        self.alarms
            .get_or_create(&KindLabels {
                kind: kind.to_owned(),
            })
            .inc();
    }

    /// `sensor` spoke now; its stored chain ends at `head`.
    pub fn sensor_seen(&self, sensor: &str, head: u64) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        lock(&self.sensors).insert(
            sensor.to_owned(),
            Position {
                head,
                last_seen: now,
            },
        );
    }

    /// Each sensor seen since the start with its stored head and the Unix seconds of
    /// its last message.
    pub fn last_seen(&self) -> Vec<(String, u64, f64)> {
        lock(&self.sensors)
            .iter()
            .map(|(id, p)| (id.clone(), p.head, p.last_seen))
            .collect()
    }

    /// The export `export` runs (its lag is reported for every sensor).
    pub fn export_started(&self, export: &str) {
        lock(&self.exports).insert(export.to_owned());
    }

    /// The export `export` has shipped `chain` up to `seq`.
    pub fn exported(&self, export: &str, chain: &str, seq: u64) {
        lock(&self.exported).insert((export.to_owned(), chain.to_owned()), seq);
    }

    /// Every family, `conduit_collector_*`.
    pub fn registry(self: &Arc<Self>) -> Registry {
        let mut r = conduit_ops::metrics::registry("conduit_collector", env!("CARGO_PKG_VERSION"));
        r.register(
            "connections",
            "Sensor streams accepted",
            self.connections.clone(),
        );
        r.register(
            "records_stored",
            "Records verified and stored",
            self.records_stored.clone(),
        );
        r.register(
            "records_duplicate",
            "Re-sent records already stored (de-duplicated)",
            self.records_duplicate.clone(),
        );
        r.register(
            "batches_rejected",
            "Batches rejected (verification, identity, protocol)",
            self.batches_rejected.clone(),
        );
        r.register(
            "alarms",
            "Alarms raised (each also a signed ALARM record in the collector's chain), by kind",
            self.alarms.clone(),
        );
        r.register(
            "connections_open",
            "Connections open now",
            self.connections_open.clone(),
        );
        r.register(
            "accept_errors",
            "Failed accepts (for example out of file descriptors), waited out",
            self.accept_errors.clone(),
        );
        r.register(
            "connections_rejected",
            "Connections refused or closed before a stream, by reason",
            self.connections_rejected.clone(),
        );
        r.register(
            "streams_evicted",
            "Sensor streams closed because they sent nothing (no Hello, or silent past the idle timeout)",
            self.streams_evicted.clone(),
        );
        r.register_collector(Box::new(Positions(self.clone())));
        r
    }
}

/// Per-sensor and per-export positions, read at each scrape.
#[derive(Debug)]
struct Positions(Arc<Metrics>);

fn gauge_i64(v: u64) -> ConstGauge<i64> {
    ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX))
}

impl Collector for Positions {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> std::fmt::Result {
        let sensors = lock(&self.0.sensors).clone();
        let exported = lock(&self.0.exported).clone();
        let exports = lock(&self.0.exports).clone();
        {
            let mut f = e.encode_descriptor(
                "sensor_head_sequence",
                "Last stored seq of each sensor's chain (sensors seen since this collector started)",
                None,
                MetricType::Gauge,
            )?;
            for (id, p) in &sensors {
                gauge_i64(p.head).encode(f.encode_family(&[("sensor", id.as_str())])?)?;
            }
        }
        {
            let mut f = e.encode_descriptor(
                "sensor_last_seen_timestamp_seconds",
                "Unix time of each sensor's last message",
                None,
                MetricType::Gauge,
            )?;
            for (id, p) in &sensors {
                ConstGauge::new(p.last_seen)
                    .encode(f.encode_family(&[("sensor", id.as_str())])?)?;
            }
        }
        {
            let mut f = e.encode_descriptor(
                "export_sequence",
                "Last seq each export has shipped, by export and chain",
                None,
                MetricType::Gauge,
            )?;
            for ((export, chain), seq) in &exported {
                gauge_i64(*seq).encode(
                    f.encode_family(&[("export", export.as_str()), ("sensor", chain.as_str())])?,
                )?;
            }
        }
        let mut f = e.encode_descriptor(
            "export_lag_records",
            "Records stored but not yet shipped by an export (head minus export position), by export and sensor",
            None,
            MetricType::Gauge,
        )?;
        for export in &exports {
            for (id, p) in &sensors {
                let done = exported
                    .get(&(export.clone(), id.clone()))
                    .copied()
                    .unwrap_or(0);
                gauge_i64(p.head.saturating_sub(done)).encode(
                    f.encode_family(&[("export", export.as_str()), ("sensor", id.as_str())])?,
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_and_positions() {
        let m = Arc::new(Metrics::default());
        m.alarm("gap");
        m.alarm("gap");
        m.refused(Refusal::PerPeer);
        m.sensor_seen("gw-01", 120);
        m.export_started("jsonl");
        m.exported("jsonl", "gw-01", 100);
        let text = conduit_ops::metrics::encode(&m.registry());
        for line in [
            "conduit_collector_alarms_total{kind=\"gap\"} 2",
            "conduit_collector_connections_rejected_total{reason=\"max_connections_per_peer\"} 1",
            "conduit_collector_sensor_head_sequence{sensor=\"gw-01\"} 120",
            "conduit_collector_export_sequence{export=\"jsonl\",sensor=\"gw-01\"} 100",
            "conduit_collector_export_lag_records{export=\"jsonl\",sensor=\"gw-01\"} 20",
            "conduit_collector_build_info{version=\"0.1.0\"} 1",
            "# TYPE conduit_collector_records_stored_total counter",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
        assert!(
            text.contains(
                "conduit_collector_sensor_last_seen_timestamp_seconds{sensor=\"gw-01\"} "
            )
        );
    }
}
