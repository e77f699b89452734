//! Records per second from a sensor spool to a verified collector store over loopback,
//! with mTLS and in plain text, next to the raw spool append rate; and, when
//! `cargo xtask setup` fetched nats-server (`nats_cluster::nats_server`), to verified
//! JetStream (R3 on a 3-node cluster on this machine, `sync_interval: always`) next
//! to the file store.
//!
//! `cargo run --release -p conduit-collector --example bench_collector [RECORDS [WINDOW]]`
//! prints `bench collector mtls_records_per_sec=… plain_records_per_sec=…
//! spool_append_per_sec=… ratio=…` (ratio: mTLS stream rate / spool append rate) and
//! `bench collector_jetstream r3_records_per_sec=… file_records_per_sec=… ratio=…
//! wall_s=… collector_cpu_s=… nats_cpu_s=… cpu_busy=…` (CPU seconds of this process
//! and of the three servers during the JetStream run, upload and verify; cpu_busy:
//! their sum over the machine's core-seconds).

#[path = "../tests/common/nats_cluster.rs"]
#[expect(
    dead_code,
    reason = "the tests' cluster helper; the benchmark needs a part"
)]
mod nats_cluster;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use conduit_collector::alarms::Alarms;
use conduit_collector::jetstream::JetChains;
use conduit_collector::server::{CollectorService, ServerOptions, Shared};
use conduit_evidence::chain::{Recorder, RecorderOptions};
use conduit_proto::v1::{self, RecordKind, collector_server::CollectorServer, record::Body};
use conduit_uplink::{UplinkOptions, UplinkTls};
use tokio::sync::watch;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

fn flow(i: u64) -> v1::Record {
    v1::Record {
        kind: RecordKind::FlowEnd as i32,
        site: "plant-01".to_owned(),
        body: Some(Body::Flow(v1::Flow {
            flow_id: i,
            start_unix_nano: 1_700_000_000_000_000_000,
            end_unix_nano: 1_700_000_001_000_000_000,
            ingress_interface: "eth1".to_owned(),
            source_ip: vec![10, 10, 1, 5],
            source_port: 40000 + (i % 20000) as u32,
            destination_ip: vec![192, 0, 2, 10],
            destination_port: 443,
            ip_protocol: 6,
            source: Some(v1::Counts {
                bytes: 1234 + i,
                packets: 12,
            }),
            destination: Some(v1::Counts {
                bytes: 54321,
                packets: 40,
            }),
            community_id: "1:LQU9qZlK+B5F3KDmev6m5PMibrg=".to_owned(),
            server_name: "api.openai.com".to_owned(),
            app_protocol: "tls".to_owned(),
            tls_version: "1.3".to_owned(),
            zone: "cell-1".to_owned(),
            endpoint: "openai".to_owned(),
            verdict: v1::Verdict::Violation as i32,
            policy_hash: vec![7; 32],
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// User plus system CPU seconds of a process (`self` or a pid), from /proc.
fn cpu_seconds(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command's closing parenthesis; utime and stime are the 12th
    // and 13th of them (14th and 15th of the line).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz
}

/// Writes the spool; returns (head seq, append rate).
fn write_spool(dir: &Path, n: u64) -> (u64, f64) {
    let (mut rec, _) = Recorder::open(RecorderOptions::new(dir, "bench-gw")).expect("recorder");
    let records: Vec<v1::Record> = (0..n).map(flow).collect();
    let t = Instant::now();
    for r in records {
        rec.append(r).expect("append");
    }
    rec.sync().expect("sync");
    let rate = n as f64 / t.elapsed().as_secs_f64();
    (rec.head().0, rate)
}

struct Tls {
    server_cert: String,
    server_key: String,
    ca: String,
    dir: std::path::PathBuf,
}

fn pki(dir: &Path) -> Tls {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let ca = ca_params.self_signed(&ca_key).expect("ca");
    let issue = |cn: &str, san: &str| {
        let mut p = rcgen::CertificateParams::new(vec![san.to_owned()]).expect("params");
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        let k = rcgen::KeyPair::generate().expect("key");
        let c = p.signed_by(&k, &ca, &ca_key).expect("sign");
        (c.pem(), k.serialize_pem())
    };
    let (sc, sk) = issue("collector", "localhost");
    let (cc, ck) = issue("bench-gw", "bench-gw");
    std::fs::write(dir.join("ca.pem"), ca.pem()).expect("write");
    std::fs::write(dir.join("client.pem"), cc).expect("write");
    std::fs::write(dir.join("client.key"), ck).expect("write");
    Tls {
        server_cert: sc,
        server_key: sk,
        ca: ca.pem(),
        dir: dir.to_owned(),
    }
}

/// Streams the spool to a fresh in-process collector; returns records per second.
async fn stream_once(
    spool: &Path,
    store: &Path,
    head: u64,
    tls: Option<&Tls>,
    window: usize,
    jetstream: Option<Arc<JetChains>>,
) -> f64 {
    let alarms = Alarms::open(store).expect("alarms");
    let shared = Shared::new(
        ServerOptions {
            store: store.to_owned(),
            trusted_keys: None,
            tofu: true,
            segment_bytes: conduit_evidence::spool::DEFAULT_SEGMENT_BYTES,
            jetstream: jetstream.clone(),
        },
        alarms,
        conduit_collector::limits::Limits::default(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let mut builder = Server::builder().tcp_nodelay(true);
    if let Some(t) = tls {
        builder = builder
            .tls_config(
                ServerTlsConfig::new()
                    .identity(Identity::from_pem(&t.server_cert, &t.server_key))
                    .client_ca_root(Certificate::from_pem(&t.ca)),
            )
            .expect("tls");
    }
    let service = CollectorServer::new(CollectorService { shared })
        .max_decoding_message_size(conduit_proto::limits::MAX_MESSAGE_BYTES);
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let server = tokio::spawn(builder.add_service(service).serve_with_incoming_shutdown(
        tokio_stream::wrappers::TcpListenerStream::new(listener),
        async move {
            let _ = stop_rx.changed().await;
        },
    ));
    let url = match tls {
        Some(_) => format!("https://localhost:{port}"),
        None => format!("http://127.0.0.1:{port}"),
    };
    let mut opts = UplinkOptions::new(url, "bench-gw");
    opts.poll_interval = Duration::from_millis(5);
    opts.window = window;
    opts.tls = tls.map(|t| UplinkTls {
        cert: t.dir.join("client.pem"),
        key: t.dir.join("client.key"),
        ca: t.dir.join("ca.pem"),
        domain: None,
    });
    let (status_tx, mut status) = conduit_uplink::status_channel();
    let (up_stop, up_rx) = watch::channel(false);
    let t = Instant::now();
    let task = tokio::spawn(conduit_uplink::stream_spool(
        opts,
        spool.to_owned(),
        status_tx,
        up_rx,
    ));
    while status.borrow().acked_seq < head {
        if status.changed().await.is_err() {
            panic!("uplink ended: {:?}", task.await);
        }
    }
    let rate = head as f64 / t.elapsed().as_secs_f64();
    let _ = up_stop.send(true);
    let _ = task.await;
    let _ = stop_tx.send(true);
    let _ = server.await;
    let report = match &jetstream {
        Some(js) => js
            .verify()
            .await
            .expect("verify JetStream")
            .into_iter()
            .find(|r| r.sensor_id.as_deref() == Some("bench-gw"))
            .expect("the chain in JetStream"),
        None => conduit_evidence::chain::verify::verify_dir(&store.join("bench-gw"), None),
    };
    assert!(report.ok() && report.records == head, "store: {report}");
    rate
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(500_000);
    let window: usize = std::env::args()
        .nth(2)
        .and_then(|a| a.parse().ok())
        .unwrap_or(UplinkOptions::new("", "").window);
    let tmp = tempfile::tempdir().expect("tempdir");
    let spool = tmp.path().join("spool");
    let (head, append_rate) = write_spool(&spool, n);
    let tls = pki(tmp.path());
    let plain = stream_once(
        &spool,
        &tmp.path().join("store-plain"),
        head,
        None,
        window,
        None,
    )
    .await;
    let mtls = stream_once(
        &spool,
        &tmp.path().join("store-mtls"),
        head,
        Some(&tls),
        window,
        None,
    )
    .await;
    println!(
        "bench collector mtls_records_per_sec={mtls:.0} plain_records_per_sec={plain:.0} spool_append_per_sec={append_rate:.0} ratio={:.2} records={head} window={window}",
        mtls / append_rate
    );
    // The same spool into JetStream, in plain text as `plain` above.
    let nats = tmp.path().join("nats");
    std::fs::create_dir_all(&nats).expect("nats dir");
    let Some(cluster) = nats_cluster::Cluster::start(&nats).await else {
        println!("bench collector_jetstream SKIPPED: no nats-server (cargo xtask setup)");
        return;
    };
    let js = Arc::new(
        JetChains::connect(&cluster.urls(), "bench", &Default::default())
            .await
            .expect("JetStream"),
    );
    // Where the time goes: CPU seconds of this process (uplink and collector) and of
    // the three servers over the JetStream run (the upload and the verify after it),
    // against the machine's core-seconds.
    let pids: Vec<u32> = cluster.nodes.iter().filter_map(|n| n.pid()).collect();
    let cpu = |pid: &str| cpu_seconds(pid);
    let nats_cpu = || pids.iter().map(|p| cpu(&p.to_string())).sum::<f64>();
    let (self0, nats0, wall) = (cpu("self"), nats_cpu(), Instant::now());
    let jet = stream_once(
        &spool,
        &tmp.path().join("store-js"),
        head,
        None,
        window,
        Some(js),
    )
    .await;
    let (self_s, nats_s) = (cpu("self") - self0, nats_cpu() - nats0);
    let wall = wall.elapsed().as_secs_f64();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    println!(
        "bench collector_jetstream r3_records_per_sec={jet:.0} file_records_per_sec={plain:.0} ratio={:.2} records={head} nodes=3 \
         wall_s={wall:.2} collector_cpu_s={self_s:.2} nats_cpu_s={nats_s:.2} cpu_busy={:.2}",
        jet / plain,
        (self_s + nats_s) / (wall * cores)
    );
}
