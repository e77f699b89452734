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

#[derive(Subcommand)]
#[expect(
    clippy::large_enum_variant,
    reason = "parsed once at start-up; boxing would only complicate the derive"
)]
enum Cmd {
    /// Accept sensor streams, verify, store, export.
    Run(RunArgs),
    /// Verify every chain in the store; exit 1 at the first bad sequence number.
    Verify {
        /// Store directory (as `run --store`).
        #[arg(long, value_name = "DIR")]
        store: PathBuf,
    },
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

#[derive(clap::Args)]
struct RunArgs {
    /// collector.yaml with the settings below; flags override it [default: none].
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to listen on, e.g. [::]:7443 [default: `listen:` of collector.yaml; one is required].
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Store directory, one sub-directory per sensor [default: `store:` of collector.yaml;
    /// one is required].
    #[arg(long, value_name = "DIR")]
    store: Option<PathBuf>,
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
            ..d
        })
    }
}

/// What `run` uses: collector.yaml with the flags applied.
struct Settings {
    listen: SocketAddr,
    store: PathBuf,
    jsonl: Option<PathBuf>,
    syslog: Option<String>,
    syslog_ca: Option<PathBuf>,
    nats: Option<String>,
    trusted_keys: Option<PathBuf>,
    tofu: bool,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
    metrics: Option<SocketAddr>,
    limits: Limits,
}

fn credentials_dir() -> Option<PathBuf> {
    std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from)
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
        store: args.store.or(file.store.clone()).ok_or_else(|| {
            ConfigError::single("--store: no store directory: give --store DIR or `store:` in collector.yaml")
        })?,
        jsonl: args.jsonl.or(file.export.jsonl.clone()),
        syslog: args.syslog.or(syslog.as_ref().map(|s| s.url.clone())),
        syslog_ca: args.syslog_ca.or(syslog.and_then(|s| s.ca)),
        nats: args.nats.or(file.export.nats.clone()),
        trusted_keys: args.trusted_keys.or(file.trusted_keys.clone()),
        tofu: args.tofu || file.tofu,
        tls_cert: args.tls_cert.or(tls.as_ref().map(|t| t.cert.clone())),
        tls_key: args
            .tls_key
            .or_else(|| file.tls_key(credentials_dir().as_deref())),
        client_ca: args.client_ca.or(tls.and_then(|t| t.client_ca)),
        metrics: args.metrics.or(file.metrics),
        limits,
    };
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
        Cmd::Verify { store } => verify(&store),
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
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
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
    let reports = match conduit_collector::verify_store(store) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {}: {e}", store.display());
            return ExitCode::FAILURE;
        }
    };
    let mut bad = None;
    for r in &reports {
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
    match bad {
        Some(seq) => {
            println!("first bad sequence number: {seq}");
            ExitCode::FAILURE
        }
        None => ExitCode::SUCCESS,
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
    let shared = Shared::new(
        ServerOptions {
            store: args.store.clone(),
            trusted_keys: args.trusted_keys.clone(),
            tofu: args.tofu,
        },
        alarms,
        limits.clone(),
    );
    let shutdown_rx = shared.shutdown.subscribe();
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(path) = &args.jsonl {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating the export directory {}", dir.display()))?;
        }
        let (sink, sh, rx) = (
            JsonlSink::new(path.clone()),
            shared.clone(),
            shutdown_rx.clone(),
        );
        tasks.spawn(async move { export::run(sink, sh, rx).await });
    }
    if let Some(url) = &args.syslog {
        let target = syslog::parse_url(url)?;
        let sink = syslog::SyslogSink::new(target, args.syslog_ca.clone())?;
        let (sh, rx) = (shared.clone(), shutdown_rx.clone());
        tasks.spawn(async move { export::run(sink, sh, rx).await });
    }
    if let Some(url) = &args.nats {
        let (sink, sh, rx) = (
            NatsSink::new(url.clone()),
            shared.clone(),
            shutdown_rx.clone(),
        );
        tasks.spawn(async move { export::run(sink, sh, rx).await });
    }
    {
        let (sh, mut rx) = (shared.clone(), shutdown_rx.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {
                        let sh = sh.clone();
                        let _ = tokio::task::spawn_blocking(move || {
                            sh.alarms.tick();
                            sh.close_idle_stores();
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
