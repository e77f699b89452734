//! The Conduit Sensor agent library: everything `conduit-sensor` does, as modules
//! the binary's thin `main` and the tests can call.

pub mod chain;
pub mod cli;
pub mod community_id;
pub mod config;
pub mod flows;
pub mod kernel;
pub mod record;
pub mod spool;
pub mod tls;
pub mod uplink;
