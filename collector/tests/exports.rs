//! SIEM exports against real targets started by the test: rsyslog (TCP and TLS with
//! gtls) and nats-server with JetStream. Missing binaries: SKIP.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use tokio_stream::StreamExt as _;

const SENSOR: &str = "gw-01";

fn wait_port(port: u16) -> bool {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// nats-server with JetStream on a free port (None, with a SKIP line: not installed).
/// Ready means a connection on the port reads this server's `INFO` greeting; a server
/// that lost the port to a parallel test exits, and is started again on another.
fn start_nats(dir: &Path) -> Option<(Proc, String)> {
    let Some(binary) = common::nats_cluster::nats_server() else {
        println!("SKIP: no nats-server (cargo xtask setup fetches it)");
        return None;
    };
    for _ in 0..3 {
        let port = free_port();
        let mut proc = Proc(
            Command::new(&binary)
                .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
                .arg(dir.join("js"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("nats-server"),
        );
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if proc.0.try_wait().expect("nats-server status").is_some() {
                break;
            }
            if greets_as_nats(port) {
                return Some((proc, format!("nats://127.0.0.1:{port}")));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    panic!("nats-server did not become ready on three ports");
}

fn greets_as_nats(port: u16) -> bool {
    use std::io::Read as _;
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut head = [0u8; 5];
    s.read_exact(&mut head).is_ok() && &head == b"INFO "
}

/// A client of the test's server; connecting is retried up to a deadline because a
/// loaded machine can reset a connection the server has not accepted yet.
async fn nats_client(url: &str) -> async_nats::Client {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match async_nats::connect(url).await {
            Ok(c) => return c,
            Err(e) if Instant::now() < deadline => {
                eprintln!("nats connect: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("nats connect: {e}"),
        }
    }
}

/// Records of a spool that the SIEM exports send by default (all but checkpoints).
fn events_in(spool: &Path) -> u64 {
    use prost::Message as _;
    conduit_evidence::spool::SpoolReader::new(spool, 1)
        .map(|f| f.expect("frame"))
        .filter(|f| {
            conduit_proto::v1::Record::decode(&f.record_bytes[..])
                .expect("record")
                .kind
                != conduit_proto::v1::RecordKind::Checkpoint as i32
        })
        .count() as u64
}

fn rsyslogd() -> Option<&'static str> {
    ["/usr/sbin/rsyslogd", "/sbin/rsyslogd"]
        .into_iter()
        .find(|p| Path::new(p).exists())
}

fn start_rsyslog(dir: &Path, port: u16, tls: Option<(&Path, &Path, &Path)>) -> Proc {
    let out = dir.join("out.log");
    let (global, input) = match tls {
        Some((ca, cert, key)) => (
            format!(
                "global(workDirectory=\"{d}\" DefaultNetstreamDriver=\"gtls\" DefaultNetstreamDriverCAFile=\"{}\" DefaultNetstreamDriverCertFile=\"{}\" DefaultNetstreamDriverKeyFile=\"{}\")\n\
                 module(load=\"imtcp\" StreamDriver.Name=\"gtls\" StreamDriver.Mode=\"1\" StreamDriver.AuthMode=\"x509/certvalid\")\n",
                ca.display(),
                cert.display(),
                key.display(),
                d = dir.display()
            ),
            format!("input(type=\"imtcp\" port=\"{port}\" address=\"127.0.0.1\")\n"),
        ),
        None => (
            format!(
                "global(workDirectory=\"{}\")\nmodule(load=\"imtcp\")\n",
                dir.display()
            ),
            format!("input(type=\"imtcp\" port=\"{port}\" address=\"127.0.0.1\")\n"),
        ),
    };
    let conf = format!(
        "{global}{input}template(name=\"raw\" type=\"string\" string=\"%rawmsg%\\n\")\n\
         action(type=\"omfile\" file=\"{}\" template=\"raw\")\n",
        out.display()
    );
    let conf_path = dir.join("rsyslog.conf");
    std::fs::write(&conf_path, conf).expect("conf");
    let log = std::fs::File::create(dir.join("rsyslogd.log")).expect("log");
    let child = Command::new(rsyslogd().expect("rsyslogd"))
        .arg("-n")
        .arg("-f")
        .arg(&conf_path)
        .arg("-i")
        .arg(dir.join("rsyslogd.pid"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn rsyslogd");
    let p = Proc(child);
    assert!(
        wait_port(port),
        "rsyslogd did not listen: {}",
        std::fs::read_to_string(dir.join("rsyslogd.log")).unwrap_or_default()
    );
    p
}

/// Lines from `out.log` that carry our sensor's records; waits for `want` of them.
async fn syslog_lines(dir: &Path, want: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let lines: Vec<String> = std::fs::read_to_string(dir.join("out.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(&format!("sensor=\"{SENSOR}\"")))
            .map(str::to_owned)
            .collect();
        if lines.len() >= want || Instant::now() > deadline {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn syslog_case(tls: bool) {
    init_tracing();
    if rsyslogd().is_none() {
        println!("SKIP: rsyslogd not installed");
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let rdir = tmp.path().join("rsyslog");
    std::fs::create_dir_all(&rdir).expect("mkdir");
    let pki = Pki::new(tmp.path());
    let (cert, key) = pki.issue("syslog", "localhost", &["localhost"]);
    let port = free_port();
    let _rsyslog = start_rsyslog(
        &rdir,
        port,
        tls.then_some((pki.ca_path().as_path(), cert.as_path(), key.as_path())),
    );
    let spool = tmp.path().join("spool");
    let store = tmp.path().join("store");
    let head = write_spool(&spool, SENSOR, 3000);
    let url = if tls {
        format!("syslog+tls://localhost:{port}")
    } else {
        format!("syslog+tcp://127.0.0.1:{port}")
    };
    let ca = pki.ca_path();
    // rsyslog requires a client certificate signed by the CA (x509/certvalid).
    let (client_cert, client_key) = pki.issue("siem-client", "conduit-collector", &["collector"]);
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut args = vec![
        "--tofu",
        "--syslog",
        url.as_str(),
        "--metrics",
        &metrics,
        "--syslog-enterprise-number",
        "55555",
    ];
    if tls {
        args.extend([
            "--syslog-ca",
            ca.to_str().expect("utf8"),
            "--syslog-cert",
            client_cert.to_str().expect("utf8"),
            "--syslog-key",
            client_key.to_str().expect("utf8"),
        ]);
    }
    let c = Collector::start(&store, &tmp.path().join("collector.log"), &args);
    let mut up = Uplink::start(uplink_opts(&c.url("http"), SENSOR), &spool);
    up.wait_acked(head, Duration::from_secs(60)).await;
    // Checkpoints stay out of the SIEM by default: every other record arrives.
    let events = events_in(&spool);
    assert!(events < head, "the spool has checkpoints");
    let lines = syslog_lines(&rdir, events as usize).await;
    assert_eq!(
        lines.len() as u64,
        events,
        "collector log:\n{}",
        c.log_text()
    );
    assert!(
        lines.iter().all(|l| !l.contains(" checkpoint [")),
        "a checkpoint was exported"
    );
    let first = &lines[0];
    assert!(first.starts_with('<'), "{first}");
    // HOSTNAME is the sensor, APP-NAME the sensor's software.
    assert!(
        first.contains(&format!(" {SENSOR} conduit-sensor - ")),
        "{first}"
    );
    assert!(
        first.contains("[conduit@55555 seq=\"1\" sensor=\"gw-01\"]"),
        "{first}"
    );
    let json = &first[first.find("] {").expect("json") + 2..];
    let v: serde_json::Value = serde_json::from_str(json).expect("json");
    assert_eq!(v["event"]["sequence"], 1);
    // The export's position and lag per sensor: everything shipped, lag 0 (the cursor
    // is saved right after the send: wait for it).
    let shipped = format!(
        "conduit_collector_export_sequence{{export=\"syslog\",sensor=\"{SENSOR}\"}} {head}"
    );
    let lag =
        format!("conduit_collector_export_lag_records{{export=\"syslog\",sensor=\"{SENSOR}\"}} 0");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut text = http_get(&metrics);
    while !(text.contains(&shipped) && text.contains(&lag)) && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
        text = http_get(&metrics);
    }
    assert!(text.contains(&shipped), "{text}");
    assert!(text.contains(&lag), "{text}");
    up.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syslog_tcp_receives_every_record() {
    syslog_case(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syslog_tls_receives_every_record() {
    syslog_case(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_jetstream_receives_every_record_once() {
    init_tracing();
    let tmp = tempfile::tempdir().expect("tempdir");
    let Some((_nats, url)) = start_nats(tmp.path()) else {
        return;
    };
    let spool = tmp.path().join("spool");
    let store = tmp.path().join("store");
    let head = write_spool(&spool, SENSOR, 3000);
    let mut c = Collector::start(
        &store,
        &tmp.path().join("collector.log"),
        // Every record, checkpoints too.
        &["--tofu", "--nats", &url, "--export-heartbeats"],
    );
    let mut up = Uplink::start(uplink_opts(&c.url("http"), SENSOR), &spool);
    up.wait_acked(head, Duration::from_secs(60)).await;

    let client = nats_client(&url).await;
    let js = async_nats::jetstream::new(client);
    let count = |js: async_nats::jetstream::Context| async move {
        let mut total = 0;
        for name in ["CONDUIT_PLANT-01", "CONDUIT_DEFAULT"] {
            let Ok(stream) = js.get_stream(name).await else {
                continue;
            };
            let mut subjects = stream
                .info_with_subjects(format!("conduit.*.{SENSOR}.>"))
                .await
                .expect("info");
            while let Some(Ok((_, n))) = subjects.next().await {
                total += n as u64;
            }
        }
        total
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut n = 0;
    while Instant::now() < deadline {
        n = count(js.clone()).await;
        if n >= head {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(n, head, "collector log:\n{}", c.log_text());

    // Restart the collector with its cursor removed: it publishes everything again,
    // and the Nats-Msg-Id header makes JetStream drop every duplicate.
    std::fs::remove_file(store.join("exports").join("nats.cursor")).expect("cursor");
    c.restart();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline
        && std::fs::metadata(store.join("exports").join("nats.cursor")).is_err()
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(count(js.clone()).await, head);
    // And directly: the same id again is reported as a duplicate.
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", format!("{SENSOR}-5").as_str());
    let ack = js
        .publish_with_headers(
            format!("conduit.plant-01.{SENSOR}.flow_start"),
            headers,
            "x".into(),
        )
        .await
        .expect("publish")
        .await
        .expect("ack");
    assert!(ack.duplicate);
    up.stop().await;
}

/// Issue 10, failure 5: sites `plant` and `PLANT` are one NATS stream, and a chain
/// whose export keeps failing (its stream exists with foreign subjects) does not
/// stop the other chains from exporting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_sites_are_canonical_and_a_failing_chain_does_not_stall_the_others() {
    init_tracing();
    let tmp = tempfile::tempdir().expect("tempdir");
    let Some((_nats, url)) = start_nats(tmp.path()) else {
        return;
    };
    let client = nats_client(&url).await;
    let js = async_nats::jetstream::new(client);
    // A stream named like site `broken`'s, but not holding its subjects.
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "CONDUIT_BROKEN".to_owned(),
        subjects: vec!["elsewhere.>".to_owned()],
        ..Default::default()
    })
    .await
    .expect("create stream");

    let store = tmp.path().join("store");
    let c = Collector::start(
        &store,
        &tmp.path().join("collector.log"),
        &["--tofu", "--nats", &url, "--export-heartbeats"],
    );
    // Chains sort as gw-a (broken) < gw-b (plant) < gw-c (PLANT).
    let mut heads = Vec::new();
    for (sensor, site) in [("gw-a", "broken"), ("gw-b", "plant"), ("gw-c", "PLANT")] {
        let spool = tmp.path().join(sensor);
        let mut rec = recorder(&spool, sensor);
        for i in 0..50 {
            let mut r = flow(i);
            r.site = site.to_owned();
            rec.append(r).expect("append");
        }
        rec.sync().expect("sync");
        let head = rec.head().0;
        drop(rec);
        let mut up = Uplink::start(uplink_opts(&c.url("http"), sensor), &spool);
        up.wait_acked(head, Duration::from_secs(30)).await;
        up.stop().await;
        heads.push((sensor, head));
    }
    // Records before the first site (the chain_restart) go to `default`.
    let count = |js: async_nats::jetstream::Context, sensor: &'static str| async move {
        let mut total = 0;
        for (name, site) in [("CONDUIT_PLANT", "plant"), ("CONDUIT_DEFAULT", "default")] {
            let Ok(stream) = js.get_stream(name).await else {
                continue;
            };
            let mut subjects = stream
                .info_with_subjects(format!("conduit.{site}.{sensor}.>"))
                .await
                .expect("info");
            while let Some(Ok((_, n))) = subjects.next().await {
                total += n as u64;
            }
        }
        total
    };
    for (sensor, head) in &heads[1..] {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut n = 0;
        while Instant::now() < deadline {
            n = count(js.clone(), sensor).await;
            if n >= *head {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(n, *head, "{sensor}; collector log:\n{}", c.log_text());
    }
    assert!(c.log_text().contains("export of this chain failed"));
}

/// `--format ocsf`: the NATS messages are OCSF events, flows as Network Activity
/// (4001) with the record's chain hash as `metadata.uid`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_receives_ocsf_events_with_format_ocsf() {
    init_tracing();
    let tmp = tempfile::tempdir().expect("tempdir");
    let Some((_nats, url)) = start_nats(tmp.path()) else {
        return;
    };
    let spool = tmp.path().join("spool");
    let store = tmp.path().join("store");
    let head = write_spool(&spool, SENSOR, 50);
    let c = Collector::start(
        &store,
        &tmp.path().join("collector.log"),
        &["--tofu", "--nats", &url, "--format", "ocsf"],
    );
    let mut up = Uplink::start(uplink_opts(&c.url("http"), SENSOR), &spool);
    up.wait_acked(head, Duration::from_secs(60)).await;
    let js = async_nats::jetstream::new(nats_client(&url).await);
    let subject = format!("conduit.plant-01.{SENSOR}.flow_start");
    let deadline = Instant::now() + Duration::from_secs(30);
    let message = loop {
        if let Ok(stream) = js.get_stream("CONDUIT_PLANT-01").await
            && let Ok(m) = stream.get_last_raw_message_by_subject(&subject).await
        {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "no OCSF flow event; collector log:\n{}",
            c.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let event: serde_json::Value = serde_json::from_slice(&message.payload).expect("OCSF JSON");
    assert_eq!(event["class_uid"], 4001, "{event:#}");
    assert_eq!(event["activity_id"], 1, "{event:#}");
    assert_eq!(
        event["metadata"]["version"],
        conduit_evidence::ocsf::OCSF_VERSION
    );
    let seq = event["unmapped"]["chain"]["seq"].as_u64().expect("seq");
    let frame = conduit_evidence::spool::SpoolReader::new(&spool, seq)
        .next()
        .expect("frame")
        .expect("frame");
    assert_eq!(frame.seq, seq);
    assert_eq!(
        event["metadata"]["uid"],
        hex::encode(frame.hash),
        "{event:#}"
    );
    up.stop().await;
}
