//! `conduit-collector`: `run` (gRPC server, store, exports) and `verify`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use conduit_collector::alarms::Alarms;
use conduit_collector::config::{self, CollectorConfig, ConfigError};
use conduit_collector::export::{self, jsonl::JsonlSink, nats::NatsSink, syslog};
use conduit_collector::limits::Limits;
use conduit_collector::listener;
use conduit_collector::server::{CollectorService, ServerOptions, Shared};
use conduit_proto::limits::MAX_MESSAGE_BYTES;
use conduit_proto::v1::collector_server::CollectorServer;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use tonic::transport::Server;

#[derive(Parser)]
#[command(
    name = "conduit-collector",
    version,
    about = "Conduit Sensor collector: verifies sensor chains, stores records, exports to the SIEM",
    after_help = "Exit status: 0 ok; 1 verification or runtime failure; 2 usage error or missing path; \
64 bad configuration (file:line:column).\n\
Environment: RUST_LOG sets the log filter (default info); under systemd the TLS key comes \
from the credential tls.key ($CREDENTIALS_DIRECTORY)."
)]
struct Cli {
    #[command(flatten)]
    log: conduit_ops::logging::LogArgs,
    #[command(subcommand)]
    cmd: Cmd,
}

/// Exit code for usage errors and missing paths.
const EXIT_USAGE: u8 = 2;
/// Exit code for a bad configuration.
const EXIT_CONFIG: u8 = 64;
/// Exit code when everything stored verifies but records are missing (declared gaps).
const EXIT_INCOMPLETE: u8 = 3;
/// Site of `--jetstream` when none is given.
const DEFAULT_SITE: &str = "default";
/// Where `run --jetstream` keeps the collector's own alarm chain without `--store`.
const DEFAULT_STATE_DIR: &str = "/var/lib/conduit-collector/state";

#[derive(Subcommand)]
#[expect(
    clippy::large_enum_variant,
    reason = "parsed once at start-up; boxing would only complicate the derive"
)]
enum Cmd {
    /// Accept sensor streams, verify, store, export.
    Run(RunArgs),
    /// Verify every chain in the store (or in JetStream); exit 1 at the first bad
    /// sequence number, 3 if records are declared missing.
    Verify {
        #[command(flatten)]
        source: Source,
    },
    /// Print the stored records that match, as JSON lines of the export (or a table).
    Query(QueryArgs),
    /// Write the auditor's report for a window: exit 0 verified and complete,
    /// 1 verification failed, 3 verified but incomplete.
    Report(ReportArgs),
    /// Check collector.yaml and the files it names; exit 0, or 64 with errors (file:line:column).
    CheckConfig {
        /// collector.yaml [default: /etc/conduit-collector/collector.yaml; exit 2 if it is missing].
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Write man pages and shell completions from this command line (for packaging).
    #[command(hide = true)]
    GenerateDocs {
        /// Directory for man/ and completions/.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

/// Where `verify`, `query` and `report` read: a store, or the chains in JetStream.
#[derive(clap::Args)]
struct Source {
    /// Store directory (as `run --store`).
    #[arg(
        long,
        value_name = "DIR",
        required_unless_present = "jetstream",
        conflicts_with = "jetstream"
    )]
    store: Option<PathBuf>,
    /// NATS server of the chains kept in JetStream (as `run --jetstream`); `query` and
    /// `report` read them into a temporary store first (time and space grow with the
    /// stream).
    #[arg(long, value_name = "URL")]
    jetstream: Option<String>,
    /// The site whose chains to read (as `run --site`).
    #[arg(long, value_name = "ID", default_value = DEFAULT_SITE, requires = "jetstream")]
    site: String,
    #[command(flatten)]
    nats_tls: NatsTlsArgs,
}

/// TLS of the collector's NATS connections (JetStream and the NATS export).
#[derive(clap::Args, Clone, Default)]
struct NatsTlsArgs {
    /// CA certificate (PEM) the NATS servers' certificates chain to; TLS is then
    /// required [default: nats_tls.ca of collector.yaml].
    #[arg(long, value_name = "FILE")]
    nats_ca: Option<PathBuf>,
    /// Client certificate (PEM) for NATS servers that require one, with --nats-key
    /// [default: nats_tls.cert].
    #[arg(long, value_name = "FILE")]
    nats_cert: Option<PathBuf>,
    /// Client key (PEM) for --nats-cert [default: nats_tls.key].
    #[arg(long, value_name = "FILE")]
    nats_key: Option<PathBuf>,
}

impl NatsTlsArgs {
    /// The flags over the file's `nats_tls:`.
    fn resolve(
        self,
        file: Option<&config::NatsTlsConfig>,
    ) -> Result<conduit_collector::nats_client::NatsTls, ConfigError> {
        let cert = client_certificate(
            self.nats_cert.or_else(|| file.and_then(|f| f.cert.clone())),
            self.nats_key.or_else(|| file.and_then(|f| f.key.clone())),
            "NATS client certificate: give both --nats-cert and --nats-key (nats_tls.cert and key), or neither",
        )?;
        Ok(conduit_collector::nats_client::NatsTls {
            ca: self.nats_ca.or_else(|| file.and_then(|f| f.ca.clone())),
            cert,
        })
    }
}

impl Source {
    /// The store directory to read, and the temporary copy of the JetStream chains
    /// that must live as long as it is read.
    /// The NATS TLS flags; a usage error (64) if they do not go together.
    fn tls(&self, cmd: &str) -> Result<conduit_collector::nats_client::NatsTls, ExitCode> {
        self.nats_tls.clone().resolve(None).map_err(|e| {
            eprintln!("conduit-collector {cmd}: {}", e.0.join("; "));
            ExitCode::from(EXIT_USAGE)
        })
    }

    fn open(&self, cmd: &str) -> Result<(PathBuf, Option<tempfile::TempDir>), ExitCode> {
        let (Some(url), None) = (&self.jetstream, &self.store) else {
            let store = self.store.clone().unwrap_or_default();
            store_dir_or_usage(cmd, &store)?;
            return Ok((store, None));
        };
        let _ = rustls::crypto::ring::default_provider().install_default();
        let tls = self.tls(cmd)?;
        let tmp = tempfile::tempdir().map_err(|e| {
            eprintln!("conduit-collector {cmd}: temporary directory: {e}");
            ExitCode::FAILURE
        })?;
        let copied = runtime()?.block_on(async {
            let chains =
                conduit_collector::jetstream::JetChains::connect(url, &self.site, &tls).await?;
            chains.copy_to_store(tmp.path()).await
        });
        match copied {
            Ok(_) => Ok((tmp.path().to_owned(), Some(tmp))),
            Err(e) => {
                eprintln!("conduit-collector {cmd}: {e}");
                Err(ExitCode::FAILURE)
            }
        }
    }
}

#[derive(clap::Args)]
struct QueryArgs {
    #[command(flatten)]
    source: Source,
    /// Only this sensor's chain (`collector` for the collector's alarms) [default: all].
    #[arg(long, value_name = "ID")]
    sensor: Option<String>,
    /// Records made at or after T (RFC 3339, e.g. 2026-12-01T08:00:00Z) [default: the first].
    #[arg(long, value_name = "T", value_parser = parse_time)]
    since: Option<i64>,
    /// Records made before T (RFC 3339) [default: the last].
    #[arg(long, value_name = "T", value_parser = parse_time)]
    until: Option<i64>,
    /// Flows whose initiator (source.ip) is IP.
    #[arg(long, value_name = "IP")]
    src_ip: Option<std::net::IpAddr>,
    /// Flows from this zone id (conduit.zone).
    #[arg(long, value_name = "ID")]
    zone: Option<String>,
    /// Flows through this conduit id (conduit.id).
    #[arg(long, value_name = "ID")]
    conduit: Option<String>,
    /// Flows with this verdict: authorized, violation, blocked, unclassified.
    #[arg(long, value_name = "V", value_parser = parse_verdict)]
    verdict: Option<conduit_proto::v1::Verdict>,
    /// Records of this kind (event.action): flow_start, flow_update, flow_end, loss,
    /// policy_change, checkpoint, chain_restart, spool_recovery, alarm.
    #[arg(long, value_name = "KIND", value_parser = parse_action)]
    action: Option<conduit_proto::v1::RecordKind>,
    /// Output: `jsonl` (the export's JSON lines) or `table` (one readable line each).
    #[arg(long, value_name = "FORMAT", default_value = "jsonl", value_parser = ["jsonl", "table"])]
    format: String,
    /// Print on stderr how many index blocks and frames were read.
    #[arg(long)]
    stats: bool,
}

#[derive(clap::Args)]
struct ReportArgs {
    #[command(flatten)]
    source: Source,
    /// Window start, inclusive (RFC 3339).
    #[arg(long, value_name = "T", value_parser = parse_time)]
    since: i64,
    /// Window end, exclusive (RFC 3339).
    #[arg(long, value_name = "T", value_parser = parse_time)]
    until: i64,
    /// The HTML report to write (self-contained, printable).
    #[arg(long, value_name = "FILE.html")]
    out: PathBuf,
    /// Also print it to PDF with headless Chromium (`chromium` on PATH, or $CHROMIUM).
    #[arg(long, value_name = "FILE.pdf")]
    pdf: Option<PathBuf>,
    /// The most rows each list (violations, blocked flows, loss records, alarms)
    /// shows; the counts and the summary stay exact, `query` lists every record.
    #[arg(long, value_name = "N", default_value_t = conduit_collector::report::DEFAULT_MAX_ROWS)]
    max_rows: usize,
}

fn parse_time(s: &str) -> Result<i64, String> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|e| format!("not an RFC 3339 time ({e}), e.g. 2026-12-01T08:00:00Z"))?;
    i64::try_from(t.unix_timestamp_nanos()).map_err(|_| "out of range".to_owned())
}

fn parse_verdict(s: &str) -> Result<conduit_proto::v1::Verdict, String> {
    conduit_collector::query::parse_verdict(s)
        .ok_or_else(|| "one of authorized, violation, blocked, unclassified".to_owned())
}

fn parse_action(s: &str) -> Result<conduit_proto::v1::RecordKind, String> {
    conduit_collector::query::parse_action(s).ok_or_else(|| {
        "one of flow_start, flow_update, flow_end, loss, policy_change, checkpoint, chain_restart, spool_recovery, alarm".to_owned()
    })
}

#[derive(clap::Args)]
struct RunArgs {
    /// collector.yaml with the settings below; flags override it [default: none].
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to listen on, e.g. [::]:7443 [default: `listen:` of collector.yaml; one is required].
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Store directory, one sub-directory per sensor [default: `store:` of collector.yaml;
    /// one is required without --jetstream]. With --jetstream it keeps only the
    /// collector's own alarm chain [default there: /var/lib/conduit-collector/state].
    #[arg(long, value_name = "DIR")]
    store: Option<PathBuf>,
    /// Keep sensor chains in NATS JetStream at URL (e.g. nats://10.0.0.5:4222; several
    /// comma-separated) instead of the store, so several collectors serve the same
    /// sensors; R3 on a cluster [default: `jetstream:` of collector.yaml].
    #[arg(long, value_name = "URL")]
    jetstream: Option<String>,
    /// The site: the JetStream stream CONDUIT_CHAIN_<SITE> and bucket conduit_heads_<site>
    /// [default: `site:` of collector.yaml, else default].
    #[arg(long, value_name = "ID")]
    site: Option<String>,
    #[command(flatten)]
    nats_tls: NatsTlsArgs,
    /// Also write every record as one ECS JSON line to FILE [default: export.jsonl].
    #[arg(long, value_name = "FILE")]
    jsonl: Option<PathBuf>,
    /// syslog+tcp://host:port or syslog+tls://host:port (RFC 5424, octet counting)
    /// [default: export.syslog.url].
    #[arg(long, value_name = "URL")]
    syslog: Option<String>,
    /// CA certificate (PEM) for syslog over TLS [default: export.syslog.ca].
    #[arg(long, value_name = "FILE")]
    syslog_ca: Option<PathBuf>,
    /// Client certificate (PEM) for syslog over TLS, with --syslog-key [default: export.syslog.cert].
    #[arg(long, value_name = "FILE")]
    syslog_cert: Option<PathBuf>,
    /// Client key (PEM) for --syslog-cert [default: export.syslog.key].
    #[arg(long, value_name = "FILE")]
    syslog_key: Option<PathBuf>,
    /// IANA private enterprise number of the SD-ID conduit@N: your organization's
    /// [default: export.syslog.enterprise_number, else 0].
    #[arg(long, value_name = "N")]
    syslog_enterprise_number: Option<u32>,
    /// Longest syslog message; a longer JSON line is replaced by a short one naming the
    /// record (at least 1024) [default: export.syslog.max_message_bytes, else 8192].
    #[arg(long, value_name = "BYTES")]
    syslog_max_message_bytes: Option<usize>,
    /// Send checkpoint records (the chains' heartbeats) to syslog and NATS too
    /// [default: export.heartbeats, else off].
    #[arg(long)]
    export_heartbeats: bool,
    /// The JSON of the JSON-lines and NATS exports: ECS lines, or OCSF events
    /// (Network Activity 4001 for flows) [default: export.format, else ecs].
    #[arg(long, value_enum)]
    format: Option<export::Format>,
    /// NATS server for JetStream export, e.g. nats://127.0.0.1:4222 [default: export.nats].
    #[arg(long, value_name = "URL")]
    nats: Option<String>,
    /// Directory of `<sensor_id>.pub` files (ed25519 public key, hex) [default: trusted_keys].
    #[arg(long, value_name = "DIR")]
    trusted_keys: Option<PathBuf>,
    /// Trust an unknown sensor's signing key on first use and pin it in the store [default: off].
    #[arg(long)]
    tofu: bool,
    /// Server certificate (PEM) [default: tls.cert; without one, plain text, warned].
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// Server key (PEM) [default: the credential tls.key under systemd, else tls.key].
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// CA for client certificates: with it, every sensor needs a client certificate
    /// whose CN or a DNS SAN is its sensor id [default: tls.client_ca].
    #[arg(long, value_name = "FILE")]
    client_ca: Option<PathBuf>,
    /// Prune whole store segments whose records are all older than DAYS and exported,
    /// leaving a retention anchor [default: retention_days, else keep everything].
    #[arg(long, value_name = "DAYS", value_parser = clap::value_parser!(u64).range(1..))]
    retention: Option<u64>,
    /// Bytes at which a sensor's store segment is sealed: retention prunes whole
    /// segments [default: store_segment_bytes, else 64 MiB].
    #[arg(long, value_name = "BYTES", value_parser = clap::value_parser!(u64).range(4096..))]
    store_segment_bytes: Option<u64>,
    /// Prometheus metrics on this address [default: metrics, else off].
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// Open connections in total [default: 512].
    #[arg(long)]
    max_connections: Option<usize>,
    /// Open connections from one IP address [default: 16].
    #[arg(long)]
    max_connections_per_peer: Option<usize>,
    /// Seconds a connection may go without a stream that said Hello [default: 15].
    #[arg(long, value_name = "SECS")]
    hello_timeout: Option<f64>,
    /// Seconds from TCP accept to the end of the TLS handshake [default: 10].
    #[arg(long, value_name = "SECS")]
    handshake_timeout: Option<f64>,
    /// Seconds a sensor stream may send nothing before it is evicted [default: 120].
    #[arg(long, value_name = "SECS")]
    stream_idle_timeout: Option<f64>,
    /// Seconds without a message from a sensor that streamed before it raises the
    /// alarm `sensor_silent` (once; `sensor_resumed` when it speaks again) [default: 30].
    #[arg(long, value_name = "SECS")]
    silent_after: Option<f64>,
}

impl RunArgs {
    /// The limits: each flag, else [`Limits::default`] (the one source of defaults).
    fn limits(&self) -> anyhow::Result<Limits> {
        let secs = |v: Option<f64>, d: Duration, name: &str| -> anyhow::Result<Duration> {
            match v {
                None => Ok(d),
                Some(s) => Duration::try_from_secs_f64(s)
                    .ok()
                    .filter(|d| !d.is_zero())
                    .with_context(|| format!("--{name}: {s} is not a positive number of seconds")),
            }
        };
        let d = Limits::default();
        Ok(Limits {
            max_connections: self.max_connections.unwrap_or(d.max_connections),
            max_connections_per_peer: self
                .max_connections_per_peer
                .unwrap_or(d.max_connections_per_peer),
            hello_timeout: secs(self.hello_timeout, d.hello_timeout, "hello-timeout")?,
            handshake_timeout: secs(
                self.handshake_timeout,
                d.handshake_timeout,
                "handshake-timeout",
            )?,
            stream_idle_timeout: secs(
                self.stream_idle_timeout,
                d.stream_idle_timeout,
                "stream-idle-timeout",
            )?,
            silent_after: secs(self.silent_after, d.silent_after, "silent-after")?,
            ..d
        })
    }
}

/// What `run` uses: collector.yaml with the flags applied.
struct Settings {
    listen: SocketAddr,
    store: PathBuf,
    jetstream: Option<String>,
    site: String,
    jsonl: Option<PathBuf>,
    syslog: Option<String>,
    syslog_opts: syslog::SyslogOptions,
    selection: export::Selection,
    format: export::Format,
    nats: Option<String>,
    /// TLS of every NATS connection (JetStream and the NATS export).
    nats_tls: conduit_collector::nats_client::NatsTls,
    trusted_keys: Option<PathBuf>,
    tofu: bool,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
    metrics: Option<SocketAddr>,
    retention_days: Option<u64>,
    store_segment_bytes: u64,
    limits: Limits,
}

fn credentials_dir() -> Option<PathBuf> {
    std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from)
}

/// The syslog options: each flag, else collector.yaml, else the defaults in
/// [`syslog::SyslogOptions`].
/// A client certificate and its key, given together or not at all (`unpaired`: the
/// error otherwise).
fn client_certificate(
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    unpaired: &str,
) -> Result<Option<(PathBuf, PathBuf)>, ConfigError> {
    match (cert, key) {
        (Some(c), Some(k)) => Ok(Some((c, k))),
        (None, None) => Ok(None),
        _ => Err(ConfigError::single(unpaired)),
    }
}

fn syslog_options(
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    enterprise_number: Option<u32>,
    max_message_bytes: Option<usize>,
    file: Option<&config::SyslogConfig>,
) -> Result<syslog::SyslogOptions, ConfigError> {
    let d = syslog::SyslogOptions::default();
    let client_cert = client_certificate(
        cert.or_else(|| file.and_then(|f| f.cert.clone())),
        key.or_else(|| file.and_then(|f| f.key.clone())),
        "syslog client certificate: give both --syslog-cert and --syslog-key (export.syslog.cert and key), or neither",
    )?;
    let max_message_bytes = max_message_bytes
        .or_else(|| file.and_then(|f| f.max_message_bytes))
        .unwrap_or(d.max_message_bytes);
    if max_message_bytes < syslog::MIN_MESSAGE_BYTES {
        return Err(ConfigError::single(format!(
            "syslog max_message_bytes {max_message_bytes}: at least {} bytes",
            syslog::MIN_MESSAGE_BYTES
        )));
    }
    Ok(syslog::SyslogOptions {
        enterprise_number: enterprise_number
            .or_else(|| file.and_then(|f| f.enterprise_number))
            .unwrap_or(d.enterprise_number),
        max_message_bytes,
        ca: ca.or_else(|| file.and_then(|f| f.ca.clone())),
        client_cert,
    })
}

fn settings(args: RunArgs) -> Result<Settings, ConfigError> {
    let file = match &args.config {
        Some(path) => CollectorConfig::load(path)?,
        None => CollectorConfig::default(),
    };
    let tls = file.tls.clone();
    let syslog = file.export.syslog.clone();
    let key_flag = args.tls_key.is_some();
    let limits = args
        .limits()
        .map_err(|e| ConfigError::single(format!("{e:#}")))?;
    let settings = Settings {
        listen: args.listen.or(file.listen).ok_or_else(|| {
            ConfigError::single("--listen: no address to listen on: give --listen ADDR or `listen:` in collector.yaml")
        })?,
        store: args
            .store
            .or(file.store.clone())
            .or_else(|| {
                (args.jetstream.is_some() || file.jetstream.is_some())
                    .then(|| PathBuf::from(DEFAULT_STATE_DIR))
            })
            .ok_or_else(|| {
                ConfigError::single("--store: no store directory: give --store DIR or `store:` in collector.yaml")
            })?,
        jetstream: args.jetstream.clone().or(file.jetstream.clone()),
        site: args
            .site
            .clone()
            .or(file.site.clone())
            .unwrap_or_else(|| DEFAULT_SITE.to_owned()),
        jsonl: args.jsonl.or(file.export.jsonl.clone()),
        syslog: args.syslog.or(syslog.as_ref().map(|s| s.url.clone())),
        syslog_opts: syslog_options(
            args.syslog_ca,
            args.syslog_cert,
            args.syslog_key,
            args.syslog_enterprise_number,
            args.syslog_max_message_bytes,
            syslog.as_ref(),
        )?,
        selection: export::Selection {
            heartbeats: args.export_heartbeats || file.export.heartbeats,
        },
        format: args.format.or(file.export.format).unwrap_or_default(),
        nats: args.nats.or(file.export.nats.clone()),
        nats_tls: args.nats_tls.clone().resolve(file.nats_tls.as_ref())?,
        trusted_keys: args.trusted_keys.or(file.trusted_keys.clone()),
        tofu: args.tofu || file.tofu,
        tls_cert: args.tls_cert.or(tls.as_ref().map(|t| t.cert.clone())),
        tls_key: args
            .tls_key
            .or_else(|| file.tls_key(credentials_dir().as_deref())),
        client_ca: args.client_ca.or(tls.and_then(|t| t.client_ca)),
        metrics: args.metrics.or(file.metrics),
        retention_days: args.retention.or(file.retention_days),
        store_segment_bytes: args
            .store_segment_bytes
            .or(file.store_segment_bytes)
            .unwrap_or(conduit_evidence::spool::DEFAULT_SEGMENT_BYTES),
        limits,
    };
    if settings.jetstream.is_some() && settings.retention_days.is_some() {
        return Err(ConfigError::single(
            "--jetstream with --retention: retention prunes the file store; set the stream's limits in JetStream instead",
        ));
    }
    match (&settings.tls_cert, &settings.tls_key) {
        (Some(_), None) => Err(ConfigError::single(
            "--tls-cert without a key: give --tls-key, tls.key, or the credential tls.key",
        )),
        (None, Some(_)) if key_flag => Err(ConfigError::single("--tls-key without --tls-cert")),
        (None, _) if settings.client_ca.is_some() => Err(ConfigError::single(
            "--client-ca needs --tls-cert and --tls-key",
        )),
        _ => Ok(settings),
    }
}

fn check_config(path: Option<PathBuf>) -> ExitCode {
    let path = match path {
        Some(p) => p,
        None if std::path::Path::new(config::DEFAULT_PATH).exists() => {
            PathBuf::from(config::DEFAULT_PATH)
        }
        None => {
            eprintln!(
                "conduit-collector check-config: nothing to check: {} does not exist; give --config FILE",
                config::DEFAULT_PATH
            );
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let file = path.display().to_string();
    let problems = match CollectorConfig::load(&path) {
        Ok(cfg) => cfg.problems(&file, credentials_dir().as_deref()),
        Err(err) => err.0,
    };
    if problems.is_empty() {
        println!("{file}: ok");
        ExitCode::SUCCESS
    } else {
        for p in problems {
            conduit_ops::logging::print_error(&p);
        }
        ExitCode::from(EXIT_CONFIG)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    conduit_ops::logging::init(cli.log.log_format);
    match cli.cmd {
        Cmd::Verify { source } => match (&source.jetstream, &source.store) {
            (Some(url), _) => match source.tls("verify") {
                Ok(tls) => verify_jetstream(url, &source.site, &tls),
                Err(code) => code,
            },
            (None, Some(store)) => verify(store),
            (None, None) => ExitCode::from(EXIT_USAGE),
        },
        Cmd::Query(args) => query(&args),
        Cmd::Report(args) => report(&args),
        Cmd::CheckConfig { config } => check_config(config),
        Cmd::GenerateDocs { out } => {
            use clap::CommandFactory as _;
            match conduit_ops::docs::write(Cli::command(), &out) {
                Ok(files) => {
                    for f in files {
                        println!("{}", f.display());
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {}: {e}", out.display());
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Run(args) => {
            let args = match settings(args) {
                Ok(s) => s,
                Err(e) => {
                    conduit_ops::logging::print_error(&e.to_string());
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let rt = match runtime() {
                Ok(rt) => rt,
                Err(code) => return code,
            };
            match rt.block_on(run(args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    conduit_ops::logging::print_error(&format!("error: {e:#}"));
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn verify(store: &std::path::Path) -> ExitCode {
    if !store.is_dir() {
        eprintln!(
            "conduit-collector verify: {}: not a directory (give the store of `run --store`)",
            store.display()
        );
        return ExitCode::from(EXIT_USAGE);
    }
    match conduit_collector::verify_store(store) {
        Ok(reports) => print_verified(&reports),
        Err(e) => {
            eprintln!("error: {}: {e}", store.display());
            ExitCode::FAILURE
        }
    }
}

/// The tokio runtime of `run` and `verify --jetstream` (its error printed).
fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        })
}

fn verify_jetstream(
    url: &str,
    site: &str,
    tls: &conduit_collector::nats_client::NatsTls,
) -> ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let reports = rt.block_on(async {
        let chains = conduit_collector::jetstream::JetChains::connect(url, site, tls).await?;
        chains.verify().await
    });
    match reports {
        Ok(reports) => print_verified(&reports),
        Err(e) => {
            eprintln!("conduit-collector verify: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Prints each chain's report and the totals; the exit status of `verify`.
fn print_verified(reports: &[conduit_evidence::chain::verify::Report]) -> ExitCode {
    let mut bad = None;
    for r in reports {
        println!("== {}", r.dir.display());
        print!("{r}");
        if bad.is_none()
            && let Some(b) = &r.first_bad
        {
            bad = Some(b.seq);
        }
    }
    let total: u64 = reports.iter().map(|r| r.records).sum();
    println!("{} chains, {total} records verified", reports.len());
    let declared: usize = reports.iter().map(|r| r.declared_gaps.len()).sum();
    match bad {
        Some(seq) => {
            println!("first bad sequence number: {seq}");
            ExitCode::FAILURE
        }
        None if declared > 0 => {
            println!("verified but INCOMPLETE: {declared} declared gaps");
            ExitCode::from(EXIT_INCOMPLETE)
        }
        None => ExitCode::SUCCESS,
    }
}

fn store_dir_or_usage(cmd: &str, store: &std::path::Path) -> Result<(), ExitCode> {
    if store.is_dir() {
        return Ok(());
    }
    eprintln!(
        "conduit-collector {cmd}: {}: not a directory (give the store of `run --store`)",
        store.display()
    );
    Err(ExitCode::from(EXIT_USAGE))
}

fn query(args: &QueryArgs) -> ExitCode {
    use conduit_collector::query::{Filter, query, table_row};
    use std::io::Write as _;
    let (store, _copy) = match args.source.open("query") {
        Ok(s) => s,
        Err(code) => return code,
    };
    let sensor = args.sensor.as_ref().map(|s| {
        if s == "collector" {
            conduit_collector::store::ALARM_DIR.to_owned()
        } else {
            s.clone()
        }
    });
    let filter = Filter {
        sensor,
        since: args.since,
        until: args.until,
        src_ip: args.src_ip,
        zone: args.zone.clone(),
        conduit: args.conduit.clone(),
        verdict: args.verdict,
        action: args.action,
    };
    let table = args.format == "table";
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let result = query(&store, &filter, |item| {
        if table {
            writeln!(out, "{}", table_row(&item))?;
        } else {
            serde_json::to_writer(&mut out, &item.ecs())?;
            out.write_all(b"\n")?;
        }
        Ok(())
    })
    .and_then(|stats| {
        out.flush()?;
        Ok(stats)
    });
    match result {
        Ok(stats) => {
            if args.stats {
                eprintln!(
                    "{} records matched; read {} of {} index blocks, {} frames",
                    stats.matched, stats.blocks_read, stats.blocks, stats.frames_read
                );
            }
            ExitCode::SUCCESS
        }
        // A closed pipe (`| head`) is not a failure.
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("conduit-collector query: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn report(args: &ReportArgs) -> ExitCode {
    use conduit_collector::report;
    if args.until <= args.since {
        eprintln!("conduit-collector report: --until must be after --since");
        return ExitCode::from(EXIT_USAGE);
    }
    let (store, _copy) = match args.source.open("report") {
        Ok(s) => s,
        Err(code) => return code,
    };
    let now = conduit_evidence::chain::checkpoint::unix_nanos(std::time::SystemTime::now());
    let written = report::build(&store, args.since, args.until, now, args.max_rows).and_then(|s| {
        let html = report::render_html(&s)?;
        std::fs::write(&args.out, html)
            .with_context(|| format!("writing {}", args.out.display()))?;
        if let Some(pdf) = &args.pdf {
            report::print_pdf(&args.out, pdf)?;
        }
        Ok(s)
    });
    match written {
        Ok(s) => {
            for x in &s.sensors {
                if let Some(seq) = x.first_bad_seq {
                    println!("sensor {}: first bad sequence number: {seq}", x.id);
                }
                for g in &x.gaps {
                    println!("sensor {}: gap {} .. {}: {}", x.id, g.from, g.to, g.reason);
                }
            }
            println!(
                "{}: {} sensors, {} flows, {} violations, {} blocked, loss {}; {}",
                args.out.display(),
                s.sensors.len(),
                s.flows,
                s.violations,
                s.blocked,
                s.loss,
                match s.exit_code() {
                    0 => "verified and complete",
                    1 => "VERIFICATION FAILED",
                    _ => "verified but INCOMPLETE",
                }
            );
            ExitCode::from(s.exit_code())
        }
        Err(e) => {
            eprintln!("conduit-collector report: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// With JetStream, this collector's alarm chain goes into the site's stream as well
/// (its own subject, named by its key), so that every reader of the site sees every
/// collector's alarms; shipped after each record, retried with backoff on failure.
async fn ship_alarms(
    chains: Arc<conduit_collector::jetstream::JetChains>,
    shared: Arc<Shared>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    const RETRY_FIRST: Duration = Duration::from_millis(100);
    const RETRY_MAX: Duration = Duration::from_secs(30);
    let alarms = &shared.alarms;
    let mut shipper =
        conduit_collector::jetstream::AlarmShipper::new(alarms.dir(), alarms.witness_key());
    let mut retry = RETRY_FIRST;
    loop {
        let wait = match chains.ship_alarms(&mut shipper).await {
            // More may be waiting: read again at once.
            Ok(n) if n > 0 => continue,
            Ok(_) => {
                retry = RETRY_FIRST;
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_ms = retry.as_millis() as u64, "alarm chain not shipped to JetStream yet");
                let wait = retry;
                retry = (retry * 2).min(RETRY_MAX);
                Some(wait)
            }
        };
        tokio::select! {
            _ = alarms.appended.notified(), if wait.is_none() => {}
            _ = tokio::time::sleep(wait.unwrap_or_default()), if wait.is_some() => {}
            _ = shutdown.changed() => return,
        }
    }
}

async fn run(args: Settings) -> anyhow::Result<()> {
    // Both rustls users (tonic, syslog TLS, NATS) use ring; make it the process default.
    let _ = rustls::crypto::ring::default_provider().install_default();
    std::fs::create_dir_all(&args.store)
        .with_context(|| format!("creating the store {}", args.store.display()))?;
    if args.trusted_keys.is_none() && !args.tofu {
        tracing::warn!("neither --trusted-keys nor --tofu: every sensor will be rejected");
    }
    let limits = args.limits.clone();
    let alarms = Alarms::open(&args.store).context("opening the alarm chain")?;
    let jetstream = match &args.jetstream {
        Some(url) => Some(Arc::new(
            conduit_collector::jetstream::JetChains::connect(url, &args.site, &args.nats_tls)
                .await?,
        )),
        None => None,
    };
    let shared = Shared::new(
        ServerOptions {
            store: args.store.clone(),
            trusted_keys: args.trusted_keys.clone(),
            tofu: args.tofu,
            segment_bytes: args.store_segment_bytes,
            jetstream,
        },
        alarms,
        limits.clone(),
    );
    let shutdown_rx = shared.shutdown.subscribe();
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(chains) = shared.opts.jetstream.clone() {
        tokio::spawn(ship_alarms(chains, shared.clone(), shutdown_rx.clone()));
    }
    if let Some(path) = &args.jsonl {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating the export directory {}", dir.display()))?;
        }
        let (sink, sh, rx) = (
            JsonlSink::new(path.clone(), args.format),
            shared.clone(),
            shutdown_rx.clone(),
        );
        // The JSON-lines file is the complete record stream (as `query` prints it).
        let all = export::Selection { heartbeats: true };
        tasks.spawn(export::run_logged(sink, all, sh, rx));
    }
    let selection = args.selection;
    if let Some(url) = &args.syslog {
        let target = syslog::parse_url(url)?;
        let sink = syslog::SyslogSink::new(target, args.syslog_opts.clone())?;
        let (sh, rx) = (shared.clone(), shutdown_rx.clone());
        tasks.spawn(export::run_logged(sink, selection, sh, rx));
    }
    if let Some(url) = &args.nats {
        let (sink, sh, rx) = (
            match &args.jetstream {
                Some(_) => NatsSink::new(url.clone(), args.format, args.nats_tls.clone())
                    .site_less_to(&args.site),
                None => NatsSink::new(url.clone(), args.format, args.nats_tls.clone()),
            },
            shared.clone(),
            shutdown_rx.clone(),
        );
        tasks.spawn(export::run_logged(sink, selection, sh, rx));
    }
    {
        let (sh, mut rx) = (shared.clone(), shutdown_rx.clone());
        let retention = args
            .retention_days
            .map(|days| conduit_collector::retention::Policy {
                days,
                exports: [
                    args.jsonl.as_ref().map(|_| "jsonl"),
                    args.syslog.as_ref().map(|_| "syslog"),
                    args.nats.as_ref().map(|_| "nats"),
                ]
                .into_iter()
                .flatten()
                .map(str::to_owned)
                .collect(),
            });
        let mut next_prune = std::time::Instant::now();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {
                        let sh = sh.clone();
                        let prune = retention
                            .clone()
                            .filter(|_| std::time::Instant::now() >= next_prune);
                        if prune.is_some() {
                            next_prune += conduit_collector::retention::PRUNE_EVERY;
                        }
                        let _ = tokio::task::spawn_blocking(move || {
                            sh.alarms.tick();
                            sh.alarms.check_silence(sh.limits().silent_after);
                            sh.close_idle_stores();
                            if let Some(policy) = prune {
                                conduit_collector::retention::prune_store(&sh, &policy, std::time::SystemTime::now());
                            }
                        })
                        .await;
                    }
                    _ = rx.changed() => return,
                }
            }
        });
    }
    let endpoint = Arc::new(CollectorEndpoint {
        registry: shared.alarms.metrics.registry(),
        shared: shared.clone(),
        ready: std::sync::atomic::AtomicBool::new(false),
    });
    if let Some(addr) = args.metrics {
        let serve = conduit_ops::http::bind(addr, endpoint.clone())
            .await
            .with_context(|| format!("metrics {addr}"))?;
        tokio::spawn(serve);
    }

    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(tls_acceptor(cert, key, args.client_ca.as_deref())?),
        _ => {
            tracing::warn!(
                "!!! NO TLS: listening in PLAIN TEXT; records and sensor identities are unprotected in transit. Use --tls-cert/--tls-key/--client-ca. !!!"
            );
            None
        }
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    tracing::info!(listen = %listener.local_addr()?, store = %args.store.display(),
        max_connections = limits.max_connections,
        max_connections_per_peer = limits.max_connections_per_peer, "collector listening");
    endpoint
        .ready
        .store(true, std::sync::atomic::Ordering::Relaxed);
    conduit_ops::notify::ready(&format!("listening on {}", listener.local_addr()?));
    let service = CollectorServer::new(CollectorService {
        shared: shared.clone(),
    })
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let signal = {
        let shared = shared.clone();
        async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
            }
            tracing::info!("shutting down");
            conduit_ops::notify::stopping();
            shared.shutdown.send_replace(true);
        }
    };
    let mut builder = Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .max_concurrent_streams(Some(limits.max_streams_per_connection))
        .http2_max_header_list_size(Some(16 * 1024));
    let router = builder.add_service(service);
    // Our own accept loop: it survives accept errors and enforces the caps and deadlines.
    let server: std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<(), tonic::transport::Error>> + Send>,
    > = match tls {
        Some(acceptor) => Box::pin(router.serve_with_incoming_shutdown(
            listener::incoming(listener, shared.clone(), move |io| {
                let acceptor = acceptor.clone();
                async move { acceptor.accept(io).await }
            }),
            signal,
        )),
        None => Box::pin(router.serve_with_incoming_shutdown(
            listener::incoming(listener, shared.clone(), |io| async move { Ok(io) }),
            signal,
        )),
    };
    let mut stop = shutdown_rx.clone();
    tokio::select! {
        r = server => {
            r.context("gRPC server")?;
            // The connection stream ends only at shutdown; anything else is a failure.
            if !*shutdown_rx.borrow() {
                bail!("the gRPC server stopped serving without a shutdown request");
            }
        }
        // Streams end on shutdown; a peer that never closes must not keep us alive.
        _ = async {
            let _ = stop.wait_for(|s| *s).await;
            tokio::time::sleep(Duration::from_secs(10)).await;
        } => tracing::warn!("streams did not close within 10 s; exiting anyway"),
    }
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => bail!("export: {e}"),
            Err(e) => bail!("export task: {e}"),
        }
    }
    Ok(())
}

/// The collector's side of the shared metrics endpoint: ready once listening.
struct CollectorEndpoint {
    registry: prometheus_client::registry::Registry,
    shared: Arc<Shared>,
    ready: std::sync::atomic::AtomicBool,
}

impl conduit_ops::http::Endpoint for CollectorEndpoint {
    fn registry(&self) -> &prometheus_client::registry::Registry {
        &self.registry
    }
    fn ready(&self) -> bool {
        self.ready.load(std::sync::atomic::Ordering::Relaxed) && !*self.shared.shutdown.borrow()
    }
}

/// The TLS acceptor: the server identity, and with `client_ca` a required client
/// certificate; ALPN h2 as gRPC needs.
fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
    client_ca: Option<&std::path::Path>,
) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let read = |p: &std::path::Path| std::fs::read(p).with_context(|| p.display().to_string());
    let certs = CertificateDer::pem_slice_iter(&read(cert)?)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}: certificates", cert.display()))?;
    let key = PrivateKeyDer::from_pem_slice(&read(key)?)
        .with_context(|| format!("{}: no private key", key.display()))?;
    let builder = rustls::ServerConfig::builder();
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(&read(ca)?) {
                roots
                    .add(c.with_context(|| ca.display().to_string())?)
                    .with_context(|| ca.display().to_string())?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
                .build()
                .context("client CA")?;
            builder.with_client_cert_verifier(verifier)
        }
        None => {
            tracing::warn!("TLS without --client-ca: sensors are not authenticated by certificate");
            builder.with_no_client_auth()
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .context("TLS configuration")?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}
