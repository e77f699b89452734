//! Command line of `conduit-sensor` (contract in DESIGN.md). Flags override
//! `sensor.yaml`; every setting has a flag or a default.

use std::{net::SocketAddr, path::PathBuf};

use clap::{Args, Parser, Subcommand};

/// Exit code for configuration errors (EX_USAGE), fixed by the contract.
pub const EXIT_CONFIG: u8 = 64;
/// Exit code when verify-chain finds a break.
pub const EXIT_CHAIN_BROKEN: u8 = 1;

#[derive(Debug, Parser)]
#[command(
    name = "conduit-sensor",
    version,
    about = "Records flows from OT zones to AI endpoints as signed, hash-chained audit records"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Attach to the interfaces and record flows until SIGTERM (SIGHUP reloads the conduit map).
    Run(RunArgs),
    /// Validate sensor.yaml and the conduit map; exit 0, or 64 with errors (file:line:column).
    CheckConfig(CheckConfigArgs),
    /// Verify a spool or a collector store: hashes, links, sequence, checkpoint signatures.
    VerifyChain(VerifyChainArgs),
    /// Run the kernel program over the packets of a pcap (BPF_PROG_TEST_RUN) and write records.
    Replay(ReplayArgs),
    /// Create an ed25519 signing key pair (signing.key 0600, signing.pub).
    Keygen(KeygenArgs),
    /// Report kernel and interface capabilities.
    Probe(ProbeArgs),
    /// Print the JSON Schema of sensor.yaml and conduits.yaml.
    Schema,
    /// Print the version.
    Version,
}

#[derive(Debug, Args, Clone, Default)]
pub struct RunArgs {
    /// sensor.yaml (deployment settings). Optional: every setting has a default.
    #[arg(long, env = "CONDUIT_SENSOR_CONFIG")]
    pub config: Option<PathBuf>,
    /// conduits.yaml (the conduit map). Without one, every flow is recorded.
    #[arg(long, env = "CONDUIT_SENSOR_CONDUITS")]
    pub conduits: Option<PathBuf>,
    /// Interface to watch (repeatable): normally the gateway's zone-facing interfaces.
    #[arg(long = "iface", value_name = "NAME")]
    pub ifaces: Vec<String>,
    /// Spool directory (records, segments, signing key).
    #[arg(long, env = "CONDUIT_SENSOR_SPOOL")]
    pub spool: Option<PathBuf>,
    /// Collector URL: https:// (with --tls-*) or http:// (plain text, warned).
    #[arg(long, env = "CONDUIT_SENSOR_COLLECTOR")]
    pub collector: Option<String>,
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// Also write every record as one JSON line to FILE.
    #[arg(long)]
    pub jsonl: Option<PathBuf>,
    /// Sensor id (default: the host name).
    #[arg(long, env = "CONDUIT_SENSOR_ID")]
    pub sensor_id: Option<String>,
    /// Also record flows that match no AI endpoint.
    #[arg(long)]
    pub record_all: bool,
    /// Drop packets of flows whose verdict is `blocked` (off by default).
    #[arg(long)]
    pub enforce: bool,
    /// Prometheus metrics and /livez /readyz on this address (e.g. 127.0.0.1:9464).
    #[arg(long, env = "CONDUIT_SENSOR_METRICS")]
    pub metrics: Option<SocketAddr>,
    /// Idle timeout (e.g. 30s).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub idle_timeout: Option<std::time::Duration>,
    /// Active timeout: a flow_update this often (e.g. 60s).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub active_timeout: Option<std::time::Duration>,
}

#[derive(Debug, Args)]
pub struct CheckConfigArgs {
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long)]
    pub conduits: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct VerifyChainArgs {
    /// Spool directory or collector store directory.
    pub dir: PathBuf,
    /// Sensor public key (hex or PEM file). Default: signing.pub in DIR.
    #[arg(long)]
    pub public_key: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    #[arg(long)]
    pub conduits: PathBuf,
    /// Capture file (pcap or pcapng, Ethernet link type).
    pub pcap: PathBuf,
    /// Also write every record as one JSON line to FILE.
    #[arg(long)]
    pub jsonl: Option<PathBuf>,
    /// Spool for the replay's chain (default: a new directory under $TMPDIR).
    #[arg(long)]
    pub spool: Option<PathBuf>,
    #[arg(long, default_value = "replay")]
    pub sensor_id: String,
    /// Also record flows that match no AI endpoint.
    #[arg(long)]
    pub record_all: bool,
}

#[derive(Debug, Args)]
pub struct KeygenArgs {
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// Interfaces to check (default: all).
    #[arg(long = "iface")]
    pub ifaces: Vec<String>,
}
