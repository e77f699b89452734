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
use conduit_collector::server::{CollectorService, ServerOptions, Shared};
use conduit_proto::v1::collector_server::CollectorServer;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

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
    let alarms = Alarms::open(&args.store).context("opening the alarm chain")?;
    let shared = Shared::new(
        ServerOptions {
            store: args.store.clone(),
            trusted_keys: args.trusted_keys.clone(),
            tofu: args.tofu,
        },
        alarms,
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
                        let _ = tokio::task::spawn_blocking(move || sh.alarms.tick()).await;
                    }
                    _ = rx.changed() => return,
                }
            }
        });
    }
    if let Some(addr) = args.metrics {
        serve_metrics(addr, shared.clone()).await?;
    }

    let mut builder = Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)));
    match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let cert = std::fs::read(cert).with_context(|| cert.display().to_string())?;
            let key = std::fs::read(key).with_context(|| key.display().to_string())?;
            let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
            match &args.client_ca {
                Some(ca) => {
                    let ca = std::fs::read(ca).with_context(|| ca.display().to_string())?;
                    tls = tls.client_ca_root(Certificate::from_pem(ca));
                }
                None => tracing::warn!(
                    "TLS without --client-ca: sensors are not authenticated by certificate"
                ),
            }
            builder = builder.tls_config(tls).context("TLS configuration")?;
        }
        _ => {
            tracing::warn!(
                "!!! NO TLS: listening in PLAIN TEXT; records and sensor identities are unprotected in transit. Use --tls-cert/--tls-key/--client-ca. !!!"
            );
        }
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    tracing::info!(listen = %listener.local_addr()?, store = %args.store.display(), "collector listening");
    let service = CollectorServer::new(CollectorService {
        shared: shared.clone(),
    })
    .max_decoding_message_size(64 << 20)
    .max_encoding_message_size(64 << 20);
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let signal = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
        tracing::info!("shutting down");
        shared.shutdown.send_replace(true);
    };
    let server = builder
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, signal);
    let mut stop = shutdown_rx.clone();
    tokio::select! {
        r = server => r.context("gRPC server")?,
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

async fn serve_metrics(addr: SocketAddr, shared: Arc<Shared>) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("metrics {addr}"))?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
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
