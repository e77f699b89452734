//! `--syslog URL`: RFC 5424 messages over TCP (`syslog+tcp://`, `tcp://`) or TLS
//! (`syslog+tls://`, `tls://`, RFC 5425) with octet-counting framing (`LEN SP MSG`).
//! MSG: `<PRI>1 TIMESTAMP HOSTNAME conduit-collector - ACTION [conduit@32473 seq="" sensor=""] JSON`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;

use super::{ExportError, Item, Sink};

/// Private enterprise number used in the structured-data id.
pub const SD_ID: &str = "conduit@32473";
const FACILITY_LOCAL0: u8 = 16;

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
    tls: Option<tokio_rustls::TlsConnector>,
    hostname: String,
    conn: Option<Box<dyn Conn>>,
    buf: Vec<u8>,
}

impl SyslogSink {
    /// `ca`: PEM file of the CA that signed the syslog server's certificate (TLS only).
    pub fn new(target: SyslogTarget, ca: Option<PathBuf>) -> Result<SyslogSink, ExportError> {
        let tls = if target.tls {
            let ca = ca.ok_or_else(|| {
                ExportError::Config("syslog over TLS needs --syslog-ca FILE".to_owned())
            })?;
            let pem = std::fs::read(&ca).map_err(|e| ExportError::Io {
                what: ca.display().to_string(),
                source: e,
            })?;
            let mut roots = rustls::RootCertStore::empty();
            use rustls::pki_types::{CertificateDer, pem::PemObject as _};
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert =
                    cert.map_err(|e| ExportError::Config(format!("{}: {e}", ca.display())))?;
                roots
                    .add(cert)
                    .map_err(|e| ExportError::Config(format!("{}: {e}", ca.display())))?;
            }
            let config = rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth();
            Some(tokio_rustls::TlsConnector::from(Arc::new(config)))
        } else {
            None
        };
        Ok(SyslogSink {
            target,
            tls,
            hostname: hostname(),
            conn: None,
            buf: Vec::new(),
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
    pub fn frame(&self, item: &Item, out: &mut Vec<u8>) {
        let msg = format_message(&self.hostname, item);
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

/// The RFC 5424 message for one record.
pub fn format_message(hostname: &str, item: &Item) -> String {
    let pri = FACILITY_LOCAL0 * 8 + severity(item);
    let ts = conduit_evidence::ecs::rfc3339(item.record.time_unix_nano);
    let json = item.ecs().to_string();
    format!(
        "<{pri}>1 {ts} {hostname} conduit-collector - {action} [{SD_ID} seq=\"{seq}\" sensor=\"{sensor}\"] {json}",
        action = item.action(),
        seq = item.pos.seq,
        sensor = sd_escape(item.sensor()),
    )
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
