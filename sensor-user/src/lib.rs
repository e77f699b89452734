//! The Conduit Sensor agent library: everything `conduit-sensor` does, as modules
//! the binary's thin `main` and the tests can call.

pub mod agent;
pub mod cli;
pub mod commands;
pub mod community_id;
pub mod completion;
pub mod config;
pub mod crash_recovery;
pub mod dns;
pub mod flows;
pub mod jsonl;
pub mod kernel;
pub mod kernel_policy;
pub mod map_batch;
pub mod mapped_config;
pub mod metrics;
pub mod pcap;
pub mod policy_change;
pub mod record;
pub mod reload;
pub mod tls;
