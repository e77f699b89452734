//! Running as a service, shared by `conduit-sensor` and `conduit-collector`:
//! logging that suits a terminal, journald or a log shipper ([`logging`]), the
//! systemd readiness protocol ([`notify`]), and man pages and shell completions
//! generated from the same clap definitions that parse the command line ([`docs`]),
//! and the metrics endpoint with `/livez` and `/readyz` ([`http`], [`metrics`]).

pub mod docs;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod notify;
