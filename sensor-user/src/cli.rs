//! Command line of `conduit-sensor` (contract in DESIGN.md). Flags override
//! `sensor.yaml`; every setting has a flag or a default.

use std::{net::SocketAddr, path::PathBuf};

use clap::{Args, Parser, Subcommand};

/// Exit code for configuration errors (EX_USAGE), fixed by the contract.
pub const EXIT_CONFIG: u8 = 64;
/// Exit code when verify-chain finds a break, or a runtime failure.
pub const EXIT_CHAIN_BROKEN: u8 = 1;
/// Exit code for usage errors and missing paths (clap's own usage errors are 2 too).
pub const EXIT_USAGE: u8 = 2;
/// Exit code when verify-chain verifies everything stored but records are declared
/// missing (a collector store with a sensor's signed gap declaration).
pub const EXIT_INCOMPLETE: u8 = 3;
/// sensor.yaml where the package installs it; `check-config` without arguments checks it.
pub const DEFAULT_CONFIG: &str = "/etc/conduit-sensor/sensor.yaml";

#[derive(Debug, Parser)]
#[command(
    name = "conduit-sensor",
    version,
    about = "Records flows from OT zones to AI endpoints as signed, hash-chained audit records",
    after_help = "Exit status: 0 ok; 1 verification or runtime failure; 2 usage error or missing path; \
64 bad configuration (file:line:column).\n\
Environment: RUST_LOG sets the log filter (default info, e.g. RUST_LOG=info,sensor_user=debug); \
CONDUIT_SENSOR_<FIELD> overrides sensor.yaml (see sensor.yaml(5) in the example config)."
)]
pub struct Cli {
    #[command(flatten)]
    pub log: conduit_ops::logging::LogArgs,
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
    /// Remove the sensor's TC programs left on an interface by an agent that did
    /// not shut down (kernels without TCX keep netlink filters after the process).
    Detach(DetachArgs),
    /// Reload a running agent and wait for its outcome: SIGHUP to PID, then exit 0 once
    /// it applied the conduit map, 1 if it rejected it or did not answer in time (for
    /// ExecReload=; needs RUNTIME_DIRECTORY, as the unit sets it).
    Reload(ReloadArgs),
    /// Print the JSON Schema of sensor.yaml and conduits.yaml.
    Schema,
    /// Print the version.
    Version,
    /// Write man pages and shell completions from this command line (for packaging).
    #[command(hide = true)]
    GenerateDocs {
        /// Directory for man/ and completions/.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

#[derive(Debug, Args, Clone, Default)]
pub struct RunArgs {
    /// sensor.yaml (deployment settings). Optional: every setting has a default.
    /// Its settings can also come from CONDUIT_SENSOR_<FIELD> variables (one name per
    /// setting, read by the config loader); flags override both.
    #[arg(long, value_name = "FILE", env = "CONDUIT_SENSOR_CONFIG")]
    pub config: Option<PathBuf>,
    /// conduits.yaml (the conduit map) [default: `conduits:` of sensor.yaml, or
    /// /etc/conduit-sensor/conduits.yaml if it exists; without one, every flow is recorded].
    #[arg(long, value_name = "FILE")]
    pub conduits: Option<PathBuf>,
    /// Interface to watch (repeatable): normally the gateway's zone-facing interfaces
    /// [default: `interfaces:` of sensor.yaml; one is required].
    #[arg(long = "iface", value_name = "NAME")]
    pub ifaces: Vec<String>,
    /// Spool directory: segments and, unless configured, the signing key
    /// [default: /var/lib/conduit-sensor/spool].
    #[arg(long, value_name = "DIR")]
    pub spool: Option<PathBuf>,
    /// Collector URL: https:// (with --tls-*) or http:// (plain text, warned);
    /// repeatable, in order of preference: the sensor sticks to one and fails over
    /// to the next [default: collector.url, else none: records stay in the spool].
    #[arg(long, value_name = "URL")]
    pub collector: Vec<String>,
    /// Client certificate (PEM) for mTLS to the collector [default: collector.tls.cert].
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// Client key (PEM) for mTLS to the collector [default: collector.tls.key].
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// CA certificate (PEM) that signed the collector's certificate [default: collector.tls.ca].
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Also write every record as one JSON line to FILE; a write error is counted
    /// and logged, and the file is reopened on SIGHUP [default: none].
    #[arg(long, value_name = "FILE")]
    pub jsonl: Option<PathBuf>,
    /// Sensor id [default: the host name].
    #[arg(long, value_name = "ID")]
    pub sensor_id: Option<String>,
    /// Also record flows that match no AI endpoint [default: off].
    #[arg(long)]
    pub record_all: bool,
    /// Drop packets of flows whose verdict is `blocked` [default: off].
    #[arg(long)]
    pub enforce: bool,
    /// Prometheus metrics and /livez /readyz on this address, e.g. 127.0.0.1:9464
    /// [default: off].
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,
    /// Idle timeout: a flow without packets this long ends [default: 30s].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub idle_timeout: Option<std::time::Duration>,
    /// Active timeout: a flow_update this often [default: 60s].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub active_timeout: Option<std::time::Duration>,
}

#[derive(Debug, Args)]
pub struct CheckConfigArgs {
    /// sensor.yaml to check, with the files it names [default: /etc/conduit-sensor/sensor.yaml;
    /// without either option and without that file, exit 2].
    #[arg(long, value_name = "FILE", env = "CONDUIT_SENSOR_CONFIG")]
    pub config: Option<PathBuf>,
    /// Conduit map to check [default: `conduits:` of the sensor.yaml checked].
    #[arg(long, value_name = "FILE")]
    pub conduits: Option<PathBuf>,
    /// Check the files only, not this host: skip the checks that the interfaces
    /// exist and that the key and TLS files are readable (for CI, off the gateway).
    #[arg(long)]
    pub syntax_only: bool,
}

#[derive(Debug, Args)]
pub struct VerifyChainArgs {
    /// Spool directory or collector store directory.
    pub dir: PathBuf,
    /// Sensor public key (hex or PEM file) [default: signing.pub in DIR].
    #[arg(long, value_name = "FILE")]
    pub public_key: Option<PathBuf>,
    /// The collector's public key (hex or PEM; `<store>/_collector/signing.pub`):
    /// every witness cosignature in DIR must be by it. Without it, cosignatures are
    /// checked against the chain and the key each names (present but unverified).
    #[arg(long, value_name = "FILE")]
    pub witness_key: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// Conduit map to classify with.
    #[arg(long, value_name = "FILE")]
    pub conduits: PathBuf,
    /// Capture file (pcap or pcapng, Ethernet link type).
    pub pcap: PathBuf,
    /// Also write every record as one JSON line to FILE.
    #[arg(long, value_name = "FILE")]
    pub jsonl: Option<PathBuf>,
    /// Spool for the replay's chain [default: a new directory under $TMPDIR].
    #[arg(long, value_name = "DIR")]
    pub spool: Option<PathBuf>,
    /// Sensor id written into the records.
    #[arg(long, value_name = "ID", default_value = "replay")]
    pub sensor_id: String,
    /// Also record flows that match no AI endpoint.
    #[arg(long)]
    pub record_all: bool,
}

#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Directory for signing.key and signing.pub (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct DetachArgs {
    /// Interface to clean (repeatable); one that does not exist makes detach exit 2.
    #[arg(long = "iface", value_name = "NAME", required = true)]
    pub ifaces: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// Interface to check (repeatable); one that does not exist makes probe exit 2
    /// [default: all].
    #[arg(long = "iface", value_name = "NAME")]
    pub ifaces: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ReloadArgs {
    /// Process id of the running agent (the unit passes $MAINPID).
    #[arg(long, value_name = "PID")]
    pub pid: i32,
    /// How long to wait for the agent's outcome.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration,
          default_value = "60s")]
    pub timeout: std::time::Duration,
}
