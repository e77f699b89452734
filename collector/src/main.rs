//! `conduit-collector`: `run` (gRPC server, store, exports) and `verify`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use conduit_collector::alarms::Alarms;
use conduit_collector::export::{self, jsonl::JsonlSink, nats::NatsSink, syslog};
use conduit_collector::limits::Limits;
use conduit_collector::listener;
use conduit_collector::server::{CollectorService, ServerOptions, Shared};
use conduit_proto::limits::MAX_MESSAGE_BYTES;
use conduit_proto::v1::collector_server::CollectorServer;
use tonic::transport::Server;

#[derive(Parser)]
#[command(
    name = "conduit-collector",
    version,
    about = "Conduit Sensor collector"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

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
        #[arg(long)]
        store: PathBuf,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Address to listen on, e.g. 0.0.0.0:7443.
    #[arg(long)]
    listen: SocketAddr,
    /// Store directory (one sub-directory per sensor).
    #[arg(long)]
    store: PathBuf,
    /// Also write every record as one ECS JSON line to FILE.
    #[arg(long)]
    jsonl: Option<PathBuf>,
    /// syslog+tcp://host:port or syslog+tls://host:port (RFC 5424, octet counting).
    #[arg(long)]
    syslog: Option<String>,
    /// CA certificate (PEM) for syslog over TLS.
    #[arg(long)]
    syslog_ca: Option<PathBuf>,
    /// NATS server for JetStream export, e.g. nats://127.0.0.1:4222.
    #[arg(long)]
    nats: Option<String>,
    /// Directory of `<sensor_id>.pub` files (ed25519 public key, hex).
    #[arg(long)]
    trusted_keys: Option<PathBuf>,
    /// Trust an unknown sensor's signing key on first use and pin it in the store.
    #[arg(long)]
    tofu: bool,
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CA for client certificates: with it, every sensor needs a client certificate
    /// whose CN or a DNS SAN is its sensor id.
    #[arg(long, requires = "tls_cert")]
    client_ca: Option<PathBuf>,
    /// Prometheus metrics on this address (text format, any path).
    #[arg(long)]
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

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Verify { store } => verify(&store),
        Cmd::Run(args) => {
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
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn verify(store: &std::path::Path) -> ExitCode {
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

async fn run(args: RunArgs) -> anyhow::Result<()> {
    // Both rustls users (tonic, syslog TLS, NATS) use ring; make it the process default.
    let _ = rustls::crypto::ring::default_provider().install_default();
    std::fs::create_dir_all(&args.store)
        .with_context(|| format!("creating the store {}", args.store.display()))?;
    if args.trusted_keys.is_none() && !args.tofu {
        tracing::warn!("neither --trusted-keys nor --tofu: every sensor will be rejected");
    }
    let limits = args.limits()?;
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
    if let Some(addr) = args.metrics {
        serve_metrics(addr, shared.clone()).await?;
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

/// The TLS acceptor: the server identity, and with `client_ca` a required client
/// certificate; ALPN h2 as gRPC needs.
fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
    client_ca: Option<&std::path::Path>,
) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let read = |p: &std::path::Path| std::fs::read(p).with_context(|| p.display().to_string());
    let certs = rustls_pemfile::certs(&mut read(cert)?.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}: certificates", cert.display()))?;
    let key = rustls_pemfile::private_key(&mut read(key)?.as_slice())
        .with_context(|| key.display().to_string())?
        .with_context(|| format!("{}: no private key", key.display()))?;
    let builder = rustls::ServerConfig::builder();
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in rustls_pemfile::certs(&mut read(ca)?.as_slice()) {
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

async fn serve_metrics(addr: SocketAddr, shared: Arc<Shared>) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("metrics {addr}"))?;
    tokio::spawn(async move {
        loop {
            // Out of descriptors is not the end of the metrics endpoint either.
            let Ok((mut s, _)) = listener.accept().await else {
                tokio::time::sleep(shared.limits().accept_backoff).await;
                continue;
            };
            let body = shared.alarms.metrics.render();
            tokio::spawn(async move {
                let mut req = [0u8; 1024];
                let _ = s.read(&mut req).await;
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    Ok(())
}
