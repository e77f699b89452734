//! Conduit Sensor collector: accepts sensor streams (gRPC, `conduit.v1.Collector`),
//! verifies every chain and checkpoint, stores records in the spool segment format,
//! acknowledges what is fsynced, and exports to the SIEM. Design: docs/collector.md.

pub mod alarms;
pub mod config;
pub mod export;
pub mod jetstream;
pub mod limits;
pub mod listener;
pub mod metrics;
pub mod nats_client;
pub mod query;
pub mod report;
pub mod retention;
pub mod server;
pub mod store;
pub mod text;
pub mod time_index;

use std::path::Path;

use conduit_evidence::chain::keys;
use conduit_evidence::chain::verify::{Report, verify_dir_witnessed};

/// The collector's own public key (`<store>/_collector/signing.pub`): it signs the
/// alarm chain and cosigns the sensors' checkpoints. None: not there (or unreadable).
pub fn witness_key(store: &Path) -> Option<[u8; 32]> {
    keys::read_public_key(&store.join(store::ALARM_DIR).join(keys::PUB_FILE)).ok()
}

/// Verifies every chain in the store, and every sensor chain's cosignatures against
/// the collector's own key; reports in store order.
pub fn verify_store(store: &Path) -> std::io::Result<Vec<Report>> {
    let witness = witness_key(store);
    Ok(store::chain_dirs(store)?
        .into_iter()
        .map(|(name, dir)| {
            let w = if store::is_alarm_dir(&name) {
                None
            } else {
                witness
            };
            verify_dir_witnessed(&dir, None, w)
        })
        .collect())
}
