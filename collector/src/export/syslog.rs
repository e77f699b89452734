//! `--syslog URL`: RFC 5424 messages over TCP (`syslog+tcp://`, `tcp://`) or TLS
//! (`syslog+tls://`, `tls://`, RFC 5425) with octet-counting framing (`LEN SP MSG`).
//! MSG: `<PRI>1 TIMESTAMP HOSTNAME conduit-sensor - ACTION [conduit@PEN seq="" sensor=""] JSON`,
//! HOSTNAME the sensor the record is about (the collector's host for its own alarm
//! chain), PEN the configured private enterprise number.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;

use super::{ExportError, Item, Sink};

/// The default private enterprise number of the SD-ID `conduit@PEN`. The project
/// has no IANA number of its own, and 32473 is IANA's documentation-only number
/// (RFC 5612): 0 (IANA's "Reserved") marks the SD-ID as unregistered until the
/// operator sets their organization's number (`--syslog-enterprise-number`).
pub const DEFAULT_ENTERPRISE_NUMBER: u32 = 0;
/// Default cap on one message (RFC 5424 6.1: receivers should accept 2048 octets;
/// rsyslog's default is 8 KiB).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 8192;
/// The smallest cap: the header with the longest HOSTNAME and sensor id, and the
/// truncated form of the JSON, fit in it.
pub const MIN_MESSAGE_BYTES: usize = 1024;
/// APP-NAME of every message.
pub const APP_NAME: &str = "conduit-sensor";
const FACILITY_LOCAL0: u8 = 16;

/// How messages are written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyslogOptions {
    pub enterprise_number: u32,
    pub max_message_bytes: usize,
    /// CA of the syslog server's certificate (TLS).
    pub ca: Option<PathBuf>,
    /// Client certificate and key (PEM) for TLS, both or neither.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

impl Default for SyslogOptions {
    fn default() -> Self {
        SyslogOptions {
            enterprise_number: DEFAULT_ENTERPRISE_NUMBER,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            ca: None,
            client_cert: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct SyslogTarget {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

/// Parses `syslog+tcp://host:port`, `tcp://`, `syslog+tls://`, `tls://`.
pub fn parse_url(url: &str) -> Result<SyslogTarget, ExportError> {
    let bad = |what: &str| ExportError::Config(format!("--syslog {url:?}: {what}"));
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| bad("expected syslog+tcp://host:port or syslog+tls://host:port"))?;
    let tls = match scheme {
        "syslog+tcp" | "tcp" => false,
        "syslog+tls" | "tls" => true,
        _ => return Err(bad("scheme must be syslog+tcp, tcp, syslog+tls or tls")),
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = rest.rsplit_once(':').ok_or_else(|| bad("missing :port"))?;
    let port = port.parse().map_err(|_| bad("bad port"))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    if host.is_empty() {
        return Err(bad("missing host"));
    }
    Ok(SyslogTarget { host, port, tls })
}

trait Conn: AsyncWrite + Unpin + Send + Sync {}
impl<T: AsyncWrite + Unpin + Send + Sync> Conn for T {}

pub struct SyslogSink {
    target: SyslogTarget,
    opts: SyslogOptions,
    tls: Option<tokio_rustls::TlsConnector>,
    hostname: String,
    conn: Option<Box<dyn Conn>>,
    buf: Vec<u8>,
    /// Messages whose JSON did not fit the cap (see [`format_message`]).
    pub truncated: u64,
}

fn pem_error(path: &std::path::Path, e: impl std::fmt::Display) -> ExportError {
    ExportError::Config(format!("{}: {e}", path.display()))
}

fn read_pem(path: &std::path::Path) -> Result<Vec<u8>, ExportError> {
    std::fs::read(path).map_err(|e| ExportError::Io {
        what: path.display().to_string(),
        source: e,
    })
}

impl SyslogSink {
    pub fn new(target: SyslogTarget, opts: SyslogOptions) -> Result<SyslogSink, ExportError> {
        if opts.max_message_bytes < MIN_MESSAGE_BYTES {
            return Err(ExportError::Config(format!(
                "syslog: the message cap {} is below the minimum of {MIN_MESSAGE_BYTES} bytes",
                opts.max_message_bytes
            )));
        }
        let tls = if target.tls {
            use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
            let ca = opts.ca.as_ref().ok_or_else(|| {
                ExportError::Config("syslog over TLS needs --syslog-ca FILE".to_owned())
            })?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(&read_pem(ca)?) {
                roots
                    .add(cert.map_err(|e| pem_error(ca, e))?)
                    .map_err(|e| pem_error(ca, e))?;
            }
            let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
            let config = match &opts.client_cert {
                None => builder.with_no_client_auth(),
                Some((cert, key)) => {
                    let chain = CertificateDer::pem_slice_iter(&read_pem(cert)?)
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|e| pem_error(cert, e))?;
                    if chain.is_empty() {
                        return Err(pem_error(cert, "no certificate"));
                    }
                    let key_der = PrivateKeyDer::from_pem_slice(&read_pem(key)?)
                        .map_err(|e| pem_error(key, e))?;
                    builder
                        .with_client_auth_cert(chain, key_der)
                        .map_err(|e| pem_error(key, e))?
                }
            };
            Some(tokio_rustls::TlsConnector::from(Arc::new(config)))
        } else {
            None
        };
        Ok(SyslogSink {
            target,
            opts,
            tls,
            hostname: hostname(),
            conn: None,
            buf: Vec::new(),
            truncated: 0,
        })
    }

    async fn connect(&self) -> Result<Box<dyn Conn>, ExportError> {
        let addr = format!("{}:{}", self.target.host, self.target.port);
        let io = |e| ExportError::Io {
            what: format!("syslog {addr}"),
            source: e,
        };
        let tcp = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(&addr))
            .await
            .map_err(|_| ExportError::Target(format!("syslog {addr}: connect timeout")))?
            .map_err(io)?;
        tcp.set_nodelay(true).map_err(io)?;
        match &self.tls {
            None => Ok(Box::new(tcp)),
            Some(connector) => {
                let name = rustls::pki_types::ServerName::try_from(self.target.host.clone())
                    .map_err(|e| ExportError::Config(format!("syslog host: {e}")))?;
                let stream = connector.connect(name, tcp).await.map_err(io)?;
                Ok(Box::new(stream))
            }
        }
    }

    /// One framed message: `LEN SP MSG`.
    pub fn frame(&mut self, item: &Item, out: &mut Vec<u8>) {
        let (msg, truncated) = format_message(&self.hostname, &self.opts, item);
        self.truncated += u64::from(truncated);
        out.extend_from_slice(msg.len().to_string().as_bytes());
        out.push(b' ');
        out.extend_from_slice(msg.as_bytes());
    }
}

impl Sink for SyslogSink {
    fn name(&self) -> &str {
        "syslog"
    }

    async fn send(&mut self, items: &[Item]) -> Result<(), ExportError> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        for item in items {
            self.frame(item, &mut buf);
        }
        if self.conn.is_none() {
            self.conn = Some(self.connect().await?);
        }
        let result = match self.conn.as_mut() {
            Some(c) => {
                let r = c.write_all(&buf).await;
                match r {
                    Ok(()) => c.flush().await,
                    Err(e) => Err(e),
                }
            }
            None => Ok(()),
        };
        self.buf = buf;
        if let Err(e) = result {
            self.conn = None;
            return Err(ExportError::Io {
                what: "syslog write".to_owned(),
                source: e,
            });
        }
        Ok(())
    }
}

/// Severity: alarms critical, loss and policy violations warning, the rest informational.
fn severity(item: &Item) -> u8 {
    use conduit_proto::v1::{RecordKind, Verdict, record::Body};
    match (RecordKind::try_from(item.record.kind), &item.record.body) {
        (Ok(RecordKind::Alarm), _) => 2,
        (Ok(RecordKind::Loss | RecordKind::ChainRestart | RecordKind::SpoolRecovery), _) => 4,
        (_, Some(Body::Flow(f)))
            if f.verdict == Verdict::Violation as i32 || f.verdict == Verdict::Blocked as i32 =>
        {
            4
        }
        _ => 6,
    }
}

fn sd_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '"' | '\\' | ']') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// RFC 5424 HOSTNAME of a record: the sensor it is about (its id, 1 to 255
/// printable US-ASCII characters, anything else replaced by `_`), or the collector's
/// own host name for the collector's alarm chain.
fn record_hostname<'a>(collector: &'a str, item: &'a Item) -> std::borrow::Cow<'a, str> {
    let id = item.sensor();
    if item.chain == crate::store::ALARM_DIR || id.is_empty() {
        return collector.into();
    }
    if id.len() <= 255 && id.bytes().all(|b| b.is_ascii_graphic()) {
        return id.into();
    }
    id.chars()
        .take(255)
        .map(|c| if c.is_ascii_graphic() { c } else { '_' })
        .collect::<String>()
        .into()
}

/// The RFC 5424 message for one record, at most `opts.max_message_bytes` long, and
/// whether its JSON had to be truncated. A JSON line that does not fit is replaced by
/// a short one that still identifies the record (`@timestamp`, `event.action`,
/// `event.sequence`, `event.hash`, `observer.id`) with `conduit.truncated: true` and
/// `conduit.original_bytes`: a SIEM parses every message, and the whole record is in
/// the store under that hash. Never cut inside UTF-8 or an SD-PARAM escape.
pub fn format_message(collector: &str, opts: &SyslogOptions, item: &Item) -> (String, bool) {
    let pri = FACILITY_LOCAL0 * 8 + severity(item);
    let ts = conduit_evidence::ecs::rfc3339(item.record.time_unix_nano);
    let header = format!(
        "<{pri}>1 {ts} {host} {APP_NAME} - {action} [conduit@{pen} seq=\"{seq}\" sensor=\"{sensor}\"] ",
        host = record_hostname(collector, item),
        action = item.action(),
        pen = opts.enterprise_number,
        seq = item.pos.seq,
        sensor = sd_escape(item.sensor()),
    );
    let doc = item.ecs();
    let json = doc.to_string();
    if header.len() + json.len() <= opts.max_message_bytes {
        return (header + &json, false);
    }
    let short = serde_json::json!({
        "@timestamp": doc["@timestamp"],
        "event": {
            "action": doc["event"]["action"],
            "sequence": doc["event"]["sequence"],
            "hash": doc["event"]["hash"],
            "kind": doc["event"]["kind"],
        },
        "observer": {"id": doc["observer"]["id"]},
        "conduit": {"truncated": true, "original_bytes": json.len()},
    });
    (header + &short.to_string(), true)
}

fn hostname() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    // RFC 5424 HOSTNAME: printable US-ASCII, no spaces; "-" when unknown.
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic()) {
        "-".to_owned()
    } else {
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use conduit_proto::v1;

    fn item(chain: &str, sensor: &str, detail_len: usize) -> Item {
        let record = v1::Record {
            kind: v1::RecordKind::Loss as i32,
            time_unix_nano: 1_700_000_000_000_000_000,
            sensor_id: sensor.to_owned(),
            body: Some(v1::record::Body::Loss(v1::Loss {
                reason: "ringbuf_full".to_owned(),
                count: 1,
                unit: "event".to_owned(),
                origin: "kernel".to_owned(),
                detail: "é".repeat(detail_len),
            })),
            ..v1::Record::default()
        };
        Item {
            chain: chain.to_owned(),
            pos: conduit_evidence::ecs::ChainPosition {
                seq: 42,
                hash: [7; 32],
                prev_hash: [6; 32],
            },
            record,
        }
    }

    #[test]
    fn the_header_names_the_sensor_and_the_configured_enterprise_number() {
        let opts = SyslogOptions {
            enterprise_number: 55555,
            ..SyslogOptions::default()
        };
        let (msg, truncated) = format_message("collector-host", &opts, &item("gw-01", "gw-01", 3));
        assert!(!truncated);
        assert!(
            msg.starts_with("<132>1 2023-11-14T22:13:20.000Z gw-01 conduit-sensor - loss [conduit@55555 seq=\"42\" sensor=\"gw-01\"] {"),
            "{msg}"
        );
        let json: serde_json::Value =
            serde_json::from_str(&msg[msg.find("] ").unwrap_or(0) + 2..]).expect("json");
        assert_eq!(json["event"]["sequence"], 42);
        // The collector's own alarm chain: the collector's host name.
        let (msg, _) = format_message(
            "collector-host",
            &opts,
            &item(crate::store::ALARM_DIR, "", 1),
        );
        assert!(msg.contains(" collector-host conduit-sensor - "), "{msg}");
        // Not printable: replaced, never a space in HOSTNAME.
        assert_eq!(record_hostname("c", &item("x y", "x y", 1)), "x_y");
    }

    #[test]
    fn a_message_over_the_cap_carries_a_short_parseable_json() {
        let opts = SyslogOptions {
            max_message_bytes: MIN_MESSAGE_BYTES,
            ..SyslogOptions::default()
        };
        // Multi-byte characters across the cut: still valid UTF-8 and JSON.
        let (msg, truncated) = format_message("c", &opts, &item("gw-01", "gw-01", 4000));
        assert!(truncated);
        assert!(msg.len() <= MIN_MESSAGE_BYTES, "{}", msg.len());
        let json: serde_json::Value =
            serde_json::from_str(&msg[msg.find("] ").unwrap_or(0) + 2..]).expect("json");
        assert_eq!(json["conduit"]["truncated"], true);
        assert_eq!(json["event"]["hash"], hex::encode([7; 32]));
        assert!(json["conduit"]["original_bytes"].as_u64().unwrap_or(0) > 8000);
        assert!(
            SyslogSink::new(
                parse_url("tcp://h:1").expect("url"),
                SyslogOptions {
                    max_message_bytes: 480,
                    ..SyslogOptions::default()
                }
            )
            .is_err()
        );
    }

    #[test]
    fn urls() {
        let t = parse_url("syslog+tls://127.0.0.1:6514").expect("parse");
        assert!(t.tls);
        assert_eq!(t.port, 6514);
        assert!(!parse_url("tcp://localhost:514").expect("parse").tls);
        assert!(parse_url("udp://x:1").is_err());
        assert!(parse_url("tcp://x").is_err());
    }
}
