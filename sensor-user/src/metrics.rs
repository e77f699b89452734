//! Prometheus metrics, `/livez` and `/readyz`, on an opt-in (normally localhost)
//! address. Counters are atomics the agent updates; the server only reads them.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

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
    pub verdict_authorized: AtomicU64,
    pub verdict_violation: AtomicU64,
    pub verdict_blocked: AtomicU64,
    pub records_written: AtomicU64,
    pub loss_records: AtomicU64,
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
}

impl Metrics {
    /// Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let mut gauge = |name: &str, help: &str, kind: &str, v: u64| {
            let _ = writeln!(
                s,
                "# HELP conduit_sensor_{name} {help}\n# TYPE conduit_sensor_{name} {kind}\nconduit_sensor_{name} {v}"
            );
        };
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        gauge(
            "flows_active",
            "Flows the agent is tracking.",
            "gauge",
            get(&self.flows_active),
        );
        gauge(
            "flows_started_total",
            "Flows recorded (flow_start written).",
            "counter",
            get(&self.flows_started),
        );
        gauge(
            "flows_ended_total",
            "Recorded flows that ended.",
            "counter",
            get(&self.flows_ended),
        );
        gauge(
            "flows_unrecorded_total",
            "Flows that ended without a record (not AI traffic).",
            "counter",
            get(&self.flows_unrecorded),
        );
        gauge(
            "flows_evicted_total",
            "Recorded flows evicted from the kernel flow table.",
            "counter",
            get(&self.flows_evicted),
        );
        gauge(
            "verdict_authorized_total",
            "Flows authorized by a conduit.",
            "counter",
            get(&self.verdict_authorized),
        );
        gauge(
            "verdict_violation_total",
            "AI flows no conduit allows.",
            "counter",
            get(&self.verdict_violation),
        );
        gauge(
            "verdict_blocked_total",
            "AI flows blocked by enforcement.",
            "counter",
            get(&self.verdict_blocked),
        );
        gauge(
            "records_written_total",
            "Records appended to the chain.",
            "counter",
            get(&self.records_written),
        );
        gauge(
            "loss_records_total",
            "Signed loss records written.",
            "counter",
            get(&self.loss_records),
        );
        gauge(
            "spool_bytes",
            "Bytes in the spool.",
            "gauge",
            get(&self.spool_bytes),
        );
        gauge(
            "spool_max_bytes",
            "Configured spool bound.",
            "gauge",
            get(&self.spool_max_bytes),
        );
        gauge(
            "spool_records_refused_total",
            "Records refused because the spool was full.",
            "counter",
            get(&self.spool_records_refused),
        );
        gauge(
            "policy_reloads_total",
            "Conduit map reloads that succeeded.",
            "counter",
            get(&self.policy_reloads),
        );
        gauge(
            "policy_reload_failures_total",
            "Conduit map reloads rejected.",
            "counter",
            get(&self.policy_reload_failures),
        );
        gauge(
            "jsonl_errors_total",
            "JSONL side-file open or write failures (the records stay in the spool).",
            "counter",
            get(&self.jsonl_errors),
        );
        gauge(
            "chain_sequence",
            "Sequence number of the chain head.",
            "gauge",
            get(&self.chain_seq),
        );
        gauge(
            "collector_connected",
            "1 while the stream to the collector is up.",
            "gauge",
            u64::from(self.collector_connected.load(Ordering::Relaxed)),
        );
        gauge(
            "collector_acked_sequence",
            "Highest sequence number the collector has acknowledged (stored).",
            "gauge",
            get(&self.collector_acked_seq),
        );
        gauge(
            "collector_lag_records",
            "Records written but not yet acknowledged by the collector.",
            "gauge",
            get(&self.collector_lag_records),
        );
        let _ = writeln!(
            s,
            "# HELP conduit_sensor_build_info The running build.\n# TYPE conduit_sensor_build_info gauge\nconduit_sensor_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        let _ = writeln!(
            s,
            "# HELP conduit_sensor_kernel_total Kernel counters by reason.\n# TYPE conduit_sensor_kernel_total counter"
        );
        for (i, c) in sensor_common::Counter::ALL.iter().enumerate() {
            let _ = writeln!(
                s,
                "conduit_sensor_kernel_total{{reason=\"{}\"}} {}",
                c.name(),
                get(&self.kernel[i])
            );
        }
        s
    }
}

impl conduit_ops::http::Endpoint for Metrics {
    fn metrics(&self) -> String {
        self.render()
    }
    fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}

/// Serves `/metrics`, `/livez`, `/readyz` (conduit-ops' endpoint) until the task is dropped.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<()> {
    conduit_ops::http::bind(addr, metrics).await?.await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_uplink_gauges_and_the_spool_bound() {
        let m = Metrics::default();
        m.collector_connected.store(true, Ordering::Relaxed);
        m.collector_acked_seq.store(41, Ordering::Relaxed);
        m.collector_lag_records.store(2, Ordering::Relaxed);
        m.spool_max_bytes.store(1 << 30, Ordering::Relaxed);
        let text = m.render();
        for line in [
            "conduit_sensor_collector_connected 1",
            "conduit_sensor_collector_acked_sequence 41",
            "conduit_sensor_collector_lag_records 2",
            "conduit_sensor_spool_max_bytes 1073741824",
            "# TYPE conduit_sensor_jsonl_errors_total counter",
            "conduit_sensor_build_info{version=\"0.1.0\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
    }
}
