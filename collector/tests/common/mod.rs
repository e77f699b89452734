//! Shared helpers for the collector integration tests: real collector processes on
//! loopback, sensor spools written with the chain library, the uplink in-process.
#![expect(dead_code, reason = "each test binary uses a different subset")]

pub mod nats_cluster;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use conduit_evidence::chain::{Recorder, RecorderOptions};
use conduit_evidence::spool::SyncPolicy;
use conduit_proto::v1::{self, RecordKind, record::Body};
use conduit_uplink::{UplinkOptions, UplinkStatus};
use tokio::sync::watch;

/// A child process killed (and reaped) on drop, also when a test fails.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A collector process; killed on drop.
pub struct Collector {
    pub child: Child,
    pub port: u16,
    pub store: PathBuf,
    pub log: PathBuf,
    args: Vec<String>,
}

impl Collector {
    pub fn start(store: &Path, log: &Path, extra: &[&str]) -> Collector {
        Self::start_on(free_port(), store, log, extra)
    }

    pub fn start_on(port: u16, store: &Path, log: &Path, extra: &[&str]) -> Collector {
        let mut args = vec![
            "run".to_owned(),
            "--listen".to_owned(),
            format!("127.0.0.1:{port}"),
            "--store".to_owned(),
            store.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let child = spawn(&args, log);
        let c = Collector {
            child,
            port,
            store: store.to_owned(),
            log: log.to_owned(),
            args,
        };
        c.wait_listening();
        c
    }

    fn wait_listening(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("collector did not listen; log:\n{}", self.log_text());
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the process still runs, or how it ended (for failure messages).
    pub fn status(&self) -> String {
        // `try_wait` needs `&mut`; /proc answers without reaping the child.
        match std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())) {
            Ok(stat) if !stat.contains(") Z ") => "running".to_owned(),
            Ok(_) => "exited (zombie, not yet reaped)".to_owned(),
            Err(_) => "gone".to_owned(),
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Kills (SIGKILL) and starts again with the same arguments.
    pub fn restart(&mut self) {
        self.kill();
        self.child = spawn(&self.args, &self.log);
        self.wait_listening();
    }

    pub fn url(&self, scheme: &str) -> String {
        let host = if scheme == "https" {
            "localhost"
        } else {
            "127.0.0.1"
        };
        format!("{scheme}://{host}:{}", self.port)
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn(args: &[String], log: &Path) -> Child {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    Command::new(env!("CARGO_BIN_EXE_conduit-collector"))
        .args(args)
        // CONDUIT_TEST_COLLECTOR_LOG: another filter when a test needs more.
        .env(
            "RUST_LOG",
            std::env::var("CONDUIT_TEST_COLLECTOR_LOG").unwrap_or_else(|_| "info".to_owned()),
        )
        .stdout(Stdio::null())
        .stderr(out)
        .spawn()
        .expect("spawn conduit-collector")
}

pub fn flow(i: u64) -> v1::Record {
    v1::Record {
        software_version: String::new(),
        kind: RecordKind::FlowStart as i32,
        time_unix_nano: 0,
        sensor_id: String::new(),
        site: "plant-01".to_owned(),
        body: Some(Body::Flow(v1::Flow {
            flow_id: i,
            source_ip: vec![10, 10, 1, 5],
            source_port: 40000 + (i % 20000) as u32,
            destination_ip: vec![192, 0, 2, 10],
            destination_port: 443,
            ip_protocol: 6,
            server_name: "api.openai.com".to_owned(),
            app_protocol: "tls".to_owned(),
            zone: "cell-1".to_owned(),
            endpoint: "openai".to_owned(),
            verdict: v1::Verdict::Violation as i32,
            ..Default::default()
        })),
    }
}

pub fn recorder(dir: &Path, sensor_id: &str) -> Recorder {
    let mut opts = RecorderOptions::new(dir, sensor_id);
    opts.segment_bytes = 1 << 20;
    opts.sync = SyncPolicy::OsOnly;
    Recorder::open(opts).expect("recorder").0
}

/// The frames of a spool from `from` on, as a sensor sends them.
pub fn spool_frames(spool: &Path, from: u64) -> Vec<v1::Frame> {
    conduit_evidence::spool::SpoolReader::new(spool, from)
        .map(|f| {
            let f = f.expect("frame");
            v1::Frame {
                seq: f.seq,
                prev_hash: f.prev_hash.to_vec().into(),
                hash: f.hash.to_vec().into(),
                record: f.record_bytes.into(),
            }
        })
        .collect()
}

/// Writes `n` flow records to a spool; returns the head seq.
pub fn write_spool(dir: &Path, sensor_id: &str, n: u64) -> u64 {
    let mut rec = recorder(dir, sensor_id);
    for i in 0..n {
        rec.append(flow(i)).expect("append");
    }
    rec.sync().expect("sync");
    rec.head().0
}

/// A running uplink task.
pub struct Uplink {
    pub status: watch::Receiver<UplinkStatus>,
    shutdown: watch::Sender<bool>,
    pub task: tokio::task::JoinHandle<Result<(), conduit_uplink::UplinkError>>,
}

impl Uplink {
    pub fn start(opts: UplinkOptions, spool: &Path) -> Uplink {
        let (tx, rx) = conduit_uplink::status_channel();
        let (stx, srx) = watch::channel(false);
        let task = tokio::spawn(conduit_uplink::stream_spool(
            opts,
            spool.to_owned(),
            tx,
            srx,
        ));
        Uplink {
            status: rx,
            shutdown: stx,
            task,
        }
    }

    /// Waits until the collector acknowledged `seq`; panics after `timeout`.
    pub async fn wait_acked(&mut self, seq: u64, timeout: Duration) {
        let r = tokio::time::timeout(timeout, async {
            loop {
                if self.status.borrow().acked_seq >= seq {
                    return;
                }
                if self.status.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        assert!(
            r.is_ok() && self.status.borrow().acked_seq >= seq,
            "not acknowledged up to {seq}: {:?}",
            *self.status.borrow()
        );
    }

    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

pub fn uplink_opts(url: &str, sensor_id: &str) -> UplinkOptions {
    let mut o = UplinkOptions::new(url, sensor_id);
    o.poll_interval = Duration::from_millis(10);
    o.backoff_max = Duration::from_millis(500);
    o
}

/// Test PKI made with rcgen: a CA, a server cert for localhost, client certs.
pub struct Pki {
    pub dir: PathBuf,
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

impl Pki {
    pub fn new(dir: &Path) -> Pki {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "conduit test CA");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let ca = params.self_signed(&ca_key).expect("ca");
        std::fs::write(dir.join("ca.pem"), ca.pem()).expect("write ca");
        Pki {
            dir: dir.to_owned(),
            ca,
            ca_key,
        }
    }

    /// Writes `<name>.pem` and `<name>.key`; returns their paths.
    pub fn issue(&self, name: &str, cn: &str, sans: &[&str]) -> (PathBuf, PathBuf) {
        let mut params =
            rcgen::CertificateParams::new(sans.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
                .expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params
            .signed_by(&key, &self.ca, &self.ca_key)
            .expect("sign");
        let cp = self.dir.join(format!("{name}.pem"));
        let kp = self.dir.join(format!("{name}.key"));
        std::fs::write(&cp, cert.pem()).expect("write cert");
        std::fs::write(&kp, key.serialize_pem()).expect("write key");
        (cp, kp)
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
}

/// Records in a stored chain (verifies it too).
pub fn verified_records(dir: &Path) -> u64 {
    let report = conduit_evidence::chain::verify::verify_dir(dir, None);
    assert!(report.ok(), "store does not verify: {report}");
    report.records
}

/// Waits until `cond` holds, checking every 50 ms; panics after `timeout` with
/// `what` and `context()` (a log, say).
pub async fn wait_until(
    what: &str,
    timeout: Duration,
    mut cond: impl FnMut() -> bool,
    context: impl Fn() -> String,
) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "{what} not within {timeout:?}:\n{}",
            context()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `conduit-collector verify --store`: its exit code and what it printed.
pub fn collector_verify(store: &Path) -> (Option<i32>, String) {
    let store = store.display().to_string();
    collector_output(&["verify", "--store", &store])
}

/// `conduit-collector ARGS`: its exit code and what it printed (stdout, then stderr).
pub fn collector_output(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_conduit-collector"))
        .args(args)
        .output()
        .expect("conduit-collector");
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

pub fn has_binary(name: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!(
            "command -v {name} >/dev/null 2>&1 || test -x /usr/sbin/{name}"
        ))
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// The collector's `/metrics` page (status line and headers included).
pub fn http_get(addr: &str) -> String {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(addr).expect("metrics connect");
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    out
}
