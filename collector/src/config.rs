//! `collector.yaml`: the collector's deployment settings, so that the unit's
//! `ExecStart=` names one file instead of every setting. Typed (unknown keys are
//! errors), and every error names the file, line and column; the CLI exits 64 on
//! one. Command-line flags override the file.
//!
//! ```yaml
//! listen: "[::]:7443"
//! store: /var/lib/conduit-collector/store
//! trusted_keys: /etc/conduit-collector/trusted-keys
//! tofu: false
//! tls:
//!   cert: /etc/conduit-collector/tls/server.crt
//!   key: /etc/conduit-collector/tls/server.key   # the systemd credential tls.key wins
//!   client_ca: /etc/conduit-collector/tls/sensors-ca.crt
//! export:
//!   jsonl: /var/lib/conduit-collector/export/records.jsonl
//!   syslog:
//!     url: "syslog+tls://siem:6514"
//!     ca: /etc/conduit-collector/tls/siem-ca.crt
//!     cert: /etc/conduit-collector/tls/siem-client.crt   # client certificate, with key
//!     key: /etc/conduit-collector/tls/siem-client.key
//!     enterprise_number: 0          # your organization's IANA PEN: SD-ID conduit@PEN
//!     max_message_bytes: 8192
//!   nats: nats://127.0.0.1:4222
//!   heartbeats: false               # checkpoints to syslog and NATS too
//!   format: ecs                     # or ocsf, for the JSON-lines and NATS exports
//! metrics: "127.0.0.1:9465"
//! jetstream: nats://10.0.0.5:4222,nats://10.0.0.6:4222   # instead of the store's chains
//! site: plant-01
//! nats_tls:                         # every NATS connection: jetstream and export.nats
//!   ca: /etc/conduit-collector/tls/nats-ca.crt
//!   cert: /etc/conduit-collector/tls/nats-client.crt   # client certificate, with key
//!   key: /etc/conduit-collector/tls/nats-client.key
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where the package installs the file; `check-config` without `--config` reads it.
pub const DEFAULT_PATH: &str = "/etc/conduit-collector/collector.yaml";
/// The name of the TLS key credential the unit loads (`LoadCredential=tls.key:...`).
pub const KEY_CREDENTIAL: &str = "tls.key";

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectorConfig {
    pub listen: Option<SocketAddr>,
    pub store: Option<PathBuf>,
    pub trusted_keys: Option<PathBuf>,
    #[serde(default)]
    pub tofu: bool,
    pub tls: Option<TlsConfig>,
    #[serde(default)]
    pub export: ExportConfig,
    pub metrics: Option<SocketAddr>,
    /// Prune whole segments whose records are all older than this many days and
    /// exported (README, "Retention"); none: keep everything.
    pub retention_days: Option<u64>,
    /// Bytes at which a sensor's store segment is sealed (the unit of retention).
    pub store_segment_bytes: Option<u64>,
    /// NATS server(s) whose JetStream keeps the sensor chains instead of `store`
    /// (comma-separated URLs; docs/jetstream.md).
    pub jetstream: Option<String>,
    /// The site of the JetStream stream and bucket (`default` when none).
    pub site: Option<String>,
    /// TLS of every NATS connection (`jetstream`, `export.nats`).
    pub nats_tls: Option<NatsTlsConfig>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsTlsConfig {
    /// CA certificate(s) (PEM) the NATS servers' certificates chain to.
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM), with `key`, for servers that require one.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: Option<PathBuf>,
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportConfig {
    pub jsonl: Option<PathBuf>,
    pub syslog: Option<SyslogConfig>,
    pub nats: Option<String>,
    /// Send checkpoint records (heartbeats) to syslog and NATS too.
    #[serde(default)]
    pub heartbeats: bool,
    /// `ecs` (default) or `ocsf`: the JSON of the JSON-lines and NATS exports.
    pub format: Option<crate::export::Format>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyslogConfig {
    pub url: String,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub enterprise_number: Option<u32>,
    pub max_message_bytes: Option<usize>,
}

/// A bad configuration: `file:line:column: message` (line and column when known).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.join("\n"))]
pub struct ConfigError(pub Vec<String>);

impl ConfigError {
    pub fn single(msg: impl Into<String>) -> ConfigError {
        ConfigError(vec![msg.into()])
    }
}

impl CollectorConfig {
    /// Reads and decodes `path`.
    pub fn load(path: &Path) -> Result<CollectorConfig, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::single(format!("{file}: cannot read the file: {e}")))?;
        Self::parse(&file, &text)
    }

    /// Decodes `text`, naming `file` in errors.
    pub fn parse(file: &str, text: &str) -> Result<CollectorConfig, ConfigError> {
        if text.trim().is_empty() {
            return Ok(CollectorConfig::default());
        }
        serde_saphyr::from_str::<CollectorConfig>(text).map_err(|err| {
            let message = err.to_string();
            let message = message.lines().next().unwrap_or("invalid YAML").trim();
            match err.location() {
                Some(loc) if loc.line() > 0 => ConfigError::single(format!(
                    "{file}:{}:{}: {}",
                    loc.line(),
                    loc.column(),
                    strip_location(message)
                )),
                _ => ConfigError::single(format!("{file}: {message}")),
            }
        })
    }

    /// The TLS key to use: the systemd credential when the unit passed one
    /// (`$CREDENTIALS_DIRECTORY/tls.key`), else `tls.key` of the file.
    pub fn tls_key(&self, credentials: Option<&Path>) -> Option<PathBuf> {
        credentials
            .map(|dir| dir.join(KEY_CREDENTIAL))
            .filter(|p| p.is_file())
            .or_else(|| self.tls.as_ref().and_then(|t| t.key.clone()))
    }

    /// Files and directories the collector would fail on at start.
    pub fn problems(&self, file: &str, credentials: Option<&Path>) -> Vec<String> {
        let mut wanted: Vec<(&str, PathBuf)> = Vec::new();
        let mut problems = Vec::new();
        if let Some(dir) = &self.trusted_keys
            && let Err(err) = std::fs::read_dir(dir)
        {
            problems.push(format!(
                "{file}: trusted_keys: cannot read {}: {err}",
                dir.display()
            ));
        }
        if let Some(tls) = &self.tls {
            wanted.push(("tls.cert", tls.cert.clone()));
            match self.tls_key(credentials) {
                Some(key) => wanted.push(("tls.key", key)),
                None => problems.push(format!(
                    "{file}: tls: no key: give tls.key, or the credential {KEY_CREDENTIAL} (LoadCredential=)"
                )),
            }
            if let Some(ca) = &tls.client_ca {
                wanted.push(("tls.client_ca", ca.clone()));
            }
        }
        if let Some(s) = &self.export.syslog {
            for (what, path) in [
                ("export.syslog.ca", &s.ca),
                ("export.syslog.cert", &s.cert),
                ("export.syslog.key", &s.key),
            ] {
                if let Some(p) = path {
                    wanted.push((what, p.clone()));
                }
            }
        }
        if let Some(n) = &self.nats_tls {
            if n.cert.is_some() != n.key.is_some() {
                problems.push(format!(
                    "{file}: nats_tls: give cert and key together, or neither"
                ));
            }
            for (what, path) in [
                ("nats_tls.ca", &n.ca),
                ("nats_tls.cert", &n.cert),
                ("nats_tls.key", &n.key),
            ] {
                if let Some(p) = path {
                    wanted.push((what, p.clone()));
                }
            }
        }
        for (what, path) in wanted {
            if let Err(err) = std::fs::File::open(&path) {
                problems.push(format!(
                    "{file}: {what}: cannot read {}: {err}",
                    path.display()
                ));
            }
        }
        problems
    }
}

/// serde-saphyr's message carries its own "error: line L column C: " prefix or
/// " at line L column C" suffix; ours is file:line:column.
fn strip_location(message: &str) -> &str {
    let mut m = message.strip_prefix("error: ").unwrap_or(message);
    if let Some(rest) = m.strip_prefix("line ")
        && let Some((_, after)) = rest.split_once(": ")
    {
        m = after;
    }
    m.find(" at line ").map_or(m, |i| &m[..i])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_format_heartbeats_and_syslog_keys() {
        let cfg = CollectorConfig::parse(
            "c.yaml",
            "export:\n  format: ocsf\n  heartbeats: true\n  syslog:\n    url: tcp://h:514\n    enterprise_number: 55555\n    max_message_bytes: 4096\n",
        )
        .expect("parses");
        assert_eq!(cfg.export.format, Some(crate::export::Format::Ocsf));
        assert!(cfg.export.heartbeats);
        let syslog = cfg.export.syslog.expect("syslog");
        assert_eq!(
            (syslog.enterprise_number, syslog.max_message_bytes),
            (Some(55555), Some(4096))
        );
        // An unknown format is an error at its position.
        let err =
            CollectorConfig::parse("c.yaml", "export:\n  format: xml\n").expect_err("bad format");
        assert!(err.to_string().starts_with("c.yaml:2:"), "{err}");
    }

    #[test]
    fn the_shipped_example_parses() {
        let text = include_str!("../../deploy/examples/collector.yaml");
        let cfg = CollectorConfig::parse("collector.yaml", text).expect("example parses");
        assert!(cfg.listen.is_some());
        assert!(cfg.store.is_some());
        assert!(cfg.tls.is_some());
    }

    #[test]
    fn an_unknown_key_names_file_line_and_column() {
        let err = CollectorConfig::parse("c.yaml", "listen: \"127.0.0.1:1\"\nstroe: /x\n")
            .expect_err("unknown key");
        let text = err.to_string();
        assert!(text.starts_with("c.yaml:2:1: "), "{text}");
        assert!(text.contains("stroe"), "{text}");
        assert!(!text.contains("line 2"), "{text}");
    }

    #[test]
    fn a_bad_address_names_its_line() {
        let err = CollectorConfig::parse("c.yaml", "store: /x\nlisten: nowhere\n")
            .expect_err("bad address");
        assert!(err.to_string().starts_with("c.yaml:2:"), "{err}");
    }

    #[test]
    fn the_credential_wins_over_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = CollectorConfig {
            tls: Some(TlsConfig {
                cert: "/c".into(),
                key: Some("/k".into()),
                client_ca: None,
            }),
            ..CollectorConfig::default()
        };
        assert_eq!(cfg.tls_key(Some(dir.path())), Some(PathBuf::from("/k")));
        std::fs::write(dir.path().join(KEY_CREDENTIAL), "k").expect("write");
        assert_eq!(
            cfg.tls_key(Some(dir.path())),
            Some(dir.path().join(KEY_CREDENTIAL))
        );
    }
}
