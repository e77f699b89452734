//! The audit evidence that the sensor writes and the collector verifies and stores:
//! the hash chain with its signed checkpoints ([`chain`]), the segment spool that
//! holds it ([`spool`], format in docs/spool-format.md), and the records' JSON-lines
//! views ([`ecs`], and [`ocsf`] for OCSF consumers). Needs no kernel or eBPF toolchain, so the collector builds
//! without one.

pub mod chain;
pub mod ecs;
pub mod ocsf;
pub mod sensor_id;
pub mod spool;
