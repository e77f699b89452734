//! Prometheus metrics, `/livez` and `/readyz`, on an opt-in (normally localhost)
//! address, through conduit-ops' endpoint and prometheus-client's encoder.
//!
//! The agent updates plain atomics on its hot paths (no locks, no allocation);
//! [`Snapshot`] turns them into metric families at each scrape. Values with open
//! label sets (loss by reason, unit and origin; attached interfaces) are
//! prometheus-client families the agent updates directly.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
    },
    registry::Registry,
};

/// Labels of the loss families: what a `loss` record says.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LossLabels {
    pub reason: String,
    pub unit: String,
    pub origin: String,
}

/// Labels of an attached interface.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InterfaceLabels {
    pub interface: String,
    /// `native` or `generic` XDP.
    pub xdp_mode: String,
}

/// Everything the agent exports.
#[derive(Debug, Default)]
pub struct Metrics {
    pub ready: AtomicBool,
    /// Kernel per-CPU counters summed, by `sensor_common::Counter` index.
    pub kernel: [AtomicU64; sensor_common::Counter::COUNT as usize],
    pub flows_active: AtomicU64,
    pub flows_started: AtomicU64,
    pub flows_ended: AtomicU64,
    pub flows_unrecorded: AtomicU64,
    pub flows_evicted: AtomicU64,
    pub flows_unknown_asset: AtomicU64,
    pub flows_sni_not_resolved: AtomicU64,
    pub client_hellos_contested: AtomicU64,
    pub client_hello_watch_refused: AtomicU64,
    pub flows_dns_attributed: AtomicU64,
    pub dns_responses_learned: AtomicU64,
    pub dns_responses_unparsed: AtomicU64,
    pub dns_cache_entries: AtomicU64,
    pub dns_cache_evicted: AtomicU64,
    pub verdict_authorized: AtomicU64,
    pub verdict_violation: AtomicU64,
    pub verdict_blocked: AtomicU64,
    pub records_written: AtomicU64,
    pub spool_bytes: AtomicU64,
    pub spool_max_bytes: AtomicU64,
    pub spool_records_refused: AtomicU64,
    pub policy_reloads: AtomicU64,
    pub policy_reload_failures: AtomicU64,
    /// Failed writes or opens of the JSONL side file (the spool still has the records).
    pub jsonl_errors: AtomicU64,
    pub chain_seq: AtomicU64,
    pub collector_connected: AtomicBool,
    pub collector_acked_seq: AtomicU64,
    pub collector_lag_records: AtomicU64,
    /// Signed loss records written, and the sum of their counts.
    pub loss_records: Family<LossLabels, Counter>,
    pub lost: Family<LossLabels, Counter>,
    /// 1 per interface the programs are attached to.
    pub interfaces: Family<InterfaceLabels, Gauge>,
}

impl Metrics {
    /// One signed `loss` record of `count` units was written.
    pub fn count_loss(&self, reason: &str, unit: &str, origin: &str, count: u64) {
        let labels = LossLabels {
            reason: reason.to_owned(),
            unit: unit.to_owned(),
            origin: origin.to_owned(),
        };
        self.loss_records.get_or_create(&labels).inc();
        self.lost.get_or_create(&labels).inc_by(count);
    }

    /// The programs are attached to `interface`.
    pub fn attached(&self, interface: &str, mode: crate::kernel::XdpAttachMode) {
        let xdp_mode = match mode {
            crate::kernel::XdpAttachMode::Driver => "native",
            crate::kernel::XdpAttachMode::Skb => "generic",
        };
        self.interfaces
            .get_or_create(&InterfaceLabels {
                interface: interface.to_owned(),
                xdp_mode: xdp_mode.to_owned(),
            })
            .set(1);
    }

    /// The registry the endpoint encodes: `conduit_sensor_*`.
    pub fn registry(self: &Arc<Self>) -> Registry {
        let mut registry =
            conduit_ops::metrics::registry("conduit_sensor", env!("CARGO_PKG_VERSION"));
        registry.register_collector(Box::new(Snapshot(self.clone())));
        registry.register(
            "loss_records",
            "Signed loss records written, by reason, unit and origin",
            self.loss_records.clone(),
        );
        registry.register(
            "lost",
            "Sum of the counts of the loss records (units lost), by reason, unit and origin",
            self.lost.clone(),
        );
        registry.register(
            "interface_attached",
            "1 for each interface the programs are attached to, with the XDP mode",
            self.interfaces.clone(),
        );
        registry
    }

    /// The text exposition (what `/metrics` serves).
    pub fn render(self: &Arc<Self>) -> String {
        conduit_ops::metrics::encode(&self.registry())
    }
}

/// The atomics as metric families, read at each scrape.
#[derive(Debug)]
struct Snapshot(Arc<Metrics>);

fn counter(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    v: &AtomicU64,
) -> std::fmt::Result {
    let c = ConstCounter::new(v.load(Ordering::Relaxed));
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(e: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let g = ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Collector for Snapshot {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> std::fmt::Result {
        let m = &self.0;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        gauge(
            &mut e,
            "ready",
            "1 once the programs are attached and the spool is open, 0 while draining",
            u64::from(m.ready.load(Ordering::Relaxed)),
        )?;
        gauge(
            &mut e,
            "flows_active",
            "Flows the agent is tracking",
            get(&m.flows_active),
        )?;
        counter(
            &mut e,
            "flows_started",
            "Flows recorded (flow_start written)",
            &m.flows_started,
        )?;
        counter(
            &mut e,
            "flows_ended",
            "Recorded flows that ended (flow_end written)",
            &m.flows_ended,
        )?;
        counter(
            &mut e,
            "flows_unrecorded",
            "Flows that ended without a record (not AI traffic, without --record-all)",
            &m.flows_unrecorded,
        )?;
        counter(
            &mut e,
            "flows_evicted",
            "Recorded flows evicted from the kernel flow table before they ended",
            &m.flows_evicted,
        )?;
        counter(
            &mut e,
            "flow_records_unknown_asset",
            "Flow records from a zone with assets_only whose initiator matches no asset of the map (conduit.anomalies unknown_asset)",
            &m.flows_unknown_asset,
        )?;
        counter(
            &mut e,
            "flow_records_sni_not_resolved",
            "Flows whose SNI names a host for which DNS answers were seen, none giving the destination address (conduit.anomalies sni_not_resolved)",
            &m.flows_sni_not_resolved,
        )?;
        counter(
            &mut e,
            "client_hellos_contested",
            "TLS flows whose ClientHello bytes were sent again with other values, a decoy and the real hello (conduit.anomalies conflicting_retransmission)",
            &m.client_hellos_contested,
        )?;
        counter(
            &mut e,
            "client_hello_watch_refused",
            "Parsed ClientHellos not watched for a second hello at the same sequence numbers because the watch table was full (the kernel still reads a whole second hello itself)",
            &m.client_hello_watch_refused,
        )?;
        counter(
            &mut e,
            "flows_dns_attributed",
            "TLS/QUIC flows attributed to their endpoint through a DNS answer to the client (conduit.attribution dns)",
            &m.flows_dns_attributed,
        )?;
        counter(
            &mut e,
            "dns_responses_learned",
            "DNS responses copied by the kernel that the agent parsed into its name cache",
            &m.dns_responses_learned,
        )?;
        counter(
            &mut e,
            "dns_responses_unparsed",
            "DNS responses copied by the kernel that did not parse (malformed, or cut by the copy bound before any answer)",
            &m.dns_responses_unparsed,
        )?;
        counter(
            &mut e,
            "dns_cache_evicted",
            "Unexpired DNS answers dropped to keep the name cache within its bound",
            &m.dns_cache_evicted,
        )?;
        gauge(
            &mut e,
            "dns_cache_entries",
            "(client, name, address) answers in the agent's DNS cache",
            m.dns_cache_entries.load(Ordering::Relaxed),
        )?;
        {
            let mut family = e.encode_descriptor(
                "verdicts",
                "Flows classified, by verdict (authorized: a conduit allows it; violation: AI traffic no conduit allows; blocked: a violation under enforcement)",
                None,
                MetricType::Counter,
            )?;
            for (verdict, v) in [
                ("authorized", &m.verdict_authorized),
                ("violation", &m.verdict_violation),
                ("blocked", &m.verdict_blocked),
            ] {
                ConstCounter::new(get(v)).encode(family.encode_family(&[("verdict", verdict)])?)?;
            }
        }
        counter(
            &mut e,
            "records_written",
            "Records appended to the chain",
            &m.records_written,
        )?;
        gauge(
            &mut e,
            "spool_bytes",
            "Bytes in the spool",
            get(&m.spool_bytes),
        )?;
        gauge(
            &mut e,
            "spool_max_bytes",
            "Configured spool bound in bytes",
            get(&m.spool_max_bytes),
        )?;
        counter(
            &mut e,
            "spool_records_refused",
            "Records refused because the spool was full",
            &m.spool_records_refused,
        )?;
        counter(
            &mut e,
            "policy_reloads",
            "Conduit map reloads applied",
            &m.policy_reloads,
        )?;
        counter(
            &mut e,
            "policy_reload_failures",
            "Conduit map reloads rejected (the previous map stays in force)",
            &m.policy_reload_failures,
        )?;
        counter(
            &mut e,
            "jsonl_errors",
            "JSONL side-file open or write failures (the records stay in the spool)",
            &m.jsonl_errors,
        )?;
        gauge(
            &mut e,
            "chain_sequence",
            "Sequence number of the chain head",
            get(&m.chain_seq),
        )?;
        gauge(
            &mut e,
            "collector_connected",
            "1 while the stream to the collector is up",
            u64::from(m.collector_connected.load(Ordering::Relaxed)),
        )?;
        gauge(
            &mut e,
            "collector_acked_sequence",
            "Highest sequence number the collector has acknowledged (stored)",
            get(&m.collector_acked_seq),
        )?;
        gauge(
            &mut e,
            "collector_lag_records",
            "Records written but not yet acknowledged by the collector",
            get(&m.collector_lag_records),
        )?;
        let mut family = e.encode_descriptor(
            "kernel",
            "Kernel counters (summed over CPUs), by reason: packets seen and counted, and every place the kernel can lose data",
            None,
            MetricType::Counter,
        )?;
        for (i, c) in sensor_common::Counter::ALL.iter().enumerate() {
            ConstCounter::new(get(&m.kernel[i]))
                .encode(family.encode_family(&[("reason", c.name())])?)?;
        }
        Ok(())
    }
}

struct Exporter {
    registry: Registry,
    metrics: Arc<Metrics>,
}

impl conduit_ops::http::Endpoint for Exporter {
    fn registry(&self) -> &Registry {
        &self.registry
    }
    fn ready(&self) -> bool {
        self.metrics.ready.load(Ordering::Relaxed)
    }
}

/// Serves `/metrics`, `/livez`, `/readyz` (conduit-ops' endpoint) until the task is dropped.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let exporter = Exporter {
        registry: metrics.registry(),
        metrics,
    };
    conduit_ops::http::bind(addr, Arc::new(exporter))
        .await?
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Prometheus rules and the Grafana dashboard in deploy/ use only metrics the
    /// sensor exports (the collector's are checked in collector/tests/siem_content.rs).
    #[test]
    fn the_deployed_rules_and_dashboard_use_only_sensor_metrics() {
        let m = Arc::new(Metrics::default());
        // Labelled families show once they have a series.
        m.count_loss("ringbuf_full", "event", "kernel", 1);
        m.attached("eth1", crate::kernel::XdpAttachMode::Driver);
        let text = m.render();
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
        let mut used = 0;
        for file in [
            "prometheus/conduit-rules.yml",
            "grafana/conduit-dashboard.json",
        ] {
            let content = std::fs::read_to_string(root.join(file)).unwrap_or_default();
            for (i, _) in content.match_indices("conduit_sensor_") {
                let name: String = content[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                used += 1;
                assert!(
                    text.lines().any(|l| l.starts_with(&format!("{name} "))
                        || l.starts_with(&format!("{name}{{"))),
                    "{file}: {name} is not a sensor metric:\n{text}"
                );
            }
        }
        assert!(used >= 8, "the content uses sensor metrics");
    }

    #[test]
    fn renders_labels_the_uplink_gauges_and_the_spool_bound() {
        let m = Arc::new(Metrics::default());
        m.collector_connected.store(true, Ordering::Relaxed);
        m.collector_acked_seq.store(41, Ordering::Relaxed);
        m.collector_lag_records.store(2, Ordering::Relaxed);
        m.spool_max_bytes.store(1 << 30, Ordering::Relaxed);
        m.verdict_violation.store(5, Ordering::Relaxed);
        m.count_loss("tracker_full", "flow", "agent", 7);
        m.count_loss("tracker_full", "flow", "agent", 3);
        m.attached("eth1", crate::kernel::XdpAttachMode::Driver);
        let text = m.render();
        for line in [
            "conduit_sensor_collector_connected 1",
            "conduit_sensor_collector_acked_sequence 41",
            "conduit_sensor_collector_lag_records 2",
            "conduit_sensor_spool_max_bytes 1073741824",
            "# TYPE conduit_sensor_jsonl_errors_total counter",
            "conduit_sensor_jsonl_errors_total 0",
            "conduit_sensor_build_info{version=\"0.1.0\"} 1",
            "conduit_sensor_verdicts_total{verdict=\"violation\"} 5",
            "conduit_sensor_verdicts_total{verdict=\"authorized\"} 0",
            "conduit_sensor_kernel_total{reason=\"packets_counted\"} 0",
            "conduit_sensor_loss_records_total{reason=\"tracker_full\",unit=\"flow\",origin=\"agent\"} 2",
            "conduit_sensor_lost_total{reason=\"tracker_full\",unit=\"flow\",origin=\"agent\"} 10",
            "conduit_sensor_interface_attached{interface=\"eth1\",xdp_mode=\"native\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
        // Every family has its HELP and TYPE.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "no TYPE for {name}"
            );
        }
    }
}
