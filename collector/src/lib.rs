//! Conduit Sensor collector: accepts sensor streams (gRPC, `conduit.v1.Collector`),
//! verifies every chain and checkpoint, stores records in the spool segment format,
//! acknowledges what is fsynced, and exports to the SIEM. Design: docs/collector.md.

pub mod alarms;
pub mod config;
pub mod export;
pub mod limits;
pub mod listener;
pub mod metrics;
pub mod query;
pub mod report;
pub mod retention;
pub mod server;
pub mod store;
pub mod text;
pub mod time_index;

use std::path::Path;

use conduit_evidence::chain::verify::{Report, verify_dir};

/// Verifies every chain in the store; reports in store order.
pub fn verify_store(store: &Path) -> std::io::Result<Vec<Report>> {
    Ok(store::chain_dirs(store)?
        .into_iter()
        .map(|(_, dir)| verify_dir(&dir, None))
        .collect())
}
