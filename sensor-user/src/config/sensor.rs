//! `sensor.yaml`: the deployment settings (operations' file). Every field has
//! a default, so an empty or missing file works; `CONDUIT_SENSOR_<FIELD>`
//! environment variables override the main scalars (the CLI flags override both).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::yaml::{self, Ctx, Node, describe};
use super::{ConfigError, Diagnostic, read_file};

pub(crate) const TOP_KEYS: &[&str] = &[
    "sensor_id",
    "interfaces",
    "conduits",
    "spool",
    "signing_key",
    "collector",
    "metrics",
    "enforcement",
    "record_all",
    "jsonl",
    "timeouts",
    "checkpoint",
    "capacity",
];
pub(crate) const SPOOL_KEYS: &[&str] = &["dir", "max_bytes", "segment_bytes", "sync"];
pub(crate) const SYNC_KEYS: &[&str] = &["interval_ms", "records"];
pub(crate) const COLLECTOR_KEYS: &[&str] = &["url", "tls"];
pub(crate) const TLS_KEYS: &[&str] = &["cert", "key", "ca"];
pub(crate) const METRICS_KEYS: &[&str] = &["listen"];
pub(crate) const TIMEOUT_KEYS: &[&str] = &["idle", "active", "tcp_end_grace"];
pub(crate) const CHECKPOINT_KEYS: &[&str] = &["every_records", "every_seconds"];
pub(crate) const CAPACITY_KEYS: &[&str] = &["flow_table", "ring_buffer_bytes", "tracked_flows"];

/// Environment variables read by [`SensorConfig::apply_env`].
pub const ENV_VARS: &[&str] = &[
    "CONDUIT_SENSOR_SENSOR_ID",
    "CONDUIT_SENSOR_INTERFACES",
    "CONDUIT_SENSOR_CONDUITS",
    "CONDUIT_SENSOR_SPOOL_DIR",
    "CONDUIT_SENSOR_SIGNING_KEY",
    "CONDUIT_SENSOR_COLLECTOR_URL",
    "CONDUIT_SENSOR_METRICS_LISTEN",
    "CONDUIT_SENSOR_ENFORCEMENT",
    "CONDUIT_SENSOR_RECORD_ALL",
    "CONDUIT_SENSOR_JSONL",
];

pub const DEFAULT_CONFIG: &str = "/etc/conduit-sensor/sensor.yaml";
pub const DEFAULT_CONDUITS: &str = "/etc/conduit-sensor/conduits.yaml";
pub const DEFAULT_SPOOL_DIR: &str = "/var/lib/conduit-sensor/spool";
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9464";

#[derive(Debug, Clone, PartialEq)]
pub struct SensorConfig {
    /// Defaults to the host name.
    pub sensor_id: String,
    /// Interfaces to watch (normally the zone-facing ones).
    pub interfaces: Vec<String>,
    /// Path of the conduit map.
    pub conduits: PathBuf,
    pub spool: SpoolConfig,
    /// ed25519 key; `None` = created in the spool directory on first start.
    pub signing_key: Option<PathBuf>,
    /// `None` = standalone (everything stays in the spool).
    pub collector: Option<CollectorConfig>,
    /// `None` = no metrics endpoint (opt-in).
    pub metrics: Option<MetricsConfig>,
    pub enforcement: bool,
    pub record_all: bool,
    pub jsonl: Option<PathBuf>,
    pub timeouts: Timeouts,
    pub checkpoint: CheckpointConfig,
    pub capacity: Capacity,
}

/// Table sizes (README, "Limits"): the kernel maps are sized at load time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Capacity {
    /// Entries of the kernel flow table.
    pub flow_table: u32,
    /// Bytes of the event ring buffer (a power of two, at least one page).
    pub ring_buffer_bytes: u32,
    /// Flows the agent tracks at most; beyond, new flows are counted, not tracked.
    pub tracked_flows: u32,
}

impl Default for Capacity {
    fn default() -> Self {
        Capacity {
            flow_table: sensor_common::FLOW_TABLE_SIZE,
            ring_buffer_bytes: sensor_common::EVENTS_RINGBUF_BYTES,
            tracked_flows: crate::flows::DEFAULT_TRACKED_FLOWS,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SpoolConfig {
    pub dir: PathBuf,
    pub max_bytes: u64,
    pub segment_bytes: u64,
    pub sync: SyncConfig,
}

/// fsync the spool every `interval_ms` or every `records` records.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SyncConfig {
    pub interval_ms: u64,
    pub records: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CollectorConfig {
    /// Collectors in order of preference (`url:` is one URL or a list): the uplink
    /// sticks to one and fails over to the next.
    pub urls: Vec<String>,
    pub tls: Option<TlsFiles>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TlsFiles {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub ca: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MetricsConfig {
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timeouts {
    pub idle: Duration,
    pub active: Duration,
    /// How long a flow stays after FIN/RST, for the last packets.
    pub tcp_end_grace: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CheckpointConfig {
    pub every_records: u64,
    pub every_seconds: u64,
}

impl Default for SensorConfig {
    fn default() -> Self {
        SensorConfig {
            sensor_id: default_sensor_id(),
            interfaces: Vec::new(),
            conduits: PathBuf::from(DEFAULT_CONDUITS),
            spool: SpoolConfig::default(),
            signing_key: None,
            collector: None,
            metrics: None,
            enforcement: false,
            record_all: false,
            jsonl: None,
            timeouts: Timeouts::default(),
            checkpoint: CheckpointConfig::default(),
            capacity: Capacity::default(),
        }
    }
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            dir: PathBuf::from(DEFAULT_SPOOL_DIR),
            max_bytes: 1 << 30,
            segment_bytes: 64 << 20,
            sync: SyncConfig {
                interval_ms: 1000,
                records: 256,
            },
        }
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            idle: Duration::from_secs(30),
            active: Duration::from_secs(60),
            tcp_end_grace: Duration::from_secs(5),
        }
    }
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        // The one source of the heartbeat defaults is the chain's checkpoint policy.
        use conduit_evidence::chain::checkpoint::{DEFAULT_EVERY, DEFAULT_EVERY_RECORDS};
        CheckpointConfig {
            every_records: DEFAULT_EVERY_RECORDS,
            every_seconds: DEFAULT_EVERY.as_secs(),
        }
    }
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
        }
    }
}

fn default_sensor_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "conduit-sensor".to_owned())
}

impl SensorConfig {
    /// Reads `path`, then applies `CONDUIT_SENSOR_*` overrides. The file must exist.
    /// Relative paths in the file are taken from the file's directory (the
    /// agent runs with `/` as its working directory under systemd).
    pub fn load(path: &Path) -> Result<SensorConfig, ConfigError> {
        let bytes = read_file(path)?;
        let mut cfg = SensorConfig::from_bytes(&path.display().to_string(), &bytes)?;
        if let Some(base) = path.parent() {
            cfg.resolve_relative(base);
        }
        cfg.apply_env(|k| std::env::var(k).ok())?;
        Ok(cfg)
    }

    /// `--config` given: that file; not given: [`DEFAULT_CONFIG`] if it
    /// exists, else the defaults. Environment overrides apply in all cases.
    pub fn load_opt(path: Option<&Path>) -> Result<SensorConfig, ConfigError> {
        match path {
            Some(p) => SensorConfig::load(p),
            None => SensorConfig::load_or_default(Path::new(DEFAULT_CONFIG)),
        }
    }

    /// Makes the file's relative paths relative to `base`.
    pub fn resolve_relative(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.conduits);
        fix(&mut self.spool.dir);
        self.signing_key.as_mut().map(fix);
        self.jsonl.as_mut().map(fix);
        if let Some(tls) = self.collector.as_mut().and_then(|c| c.tls.as_mut()) {
            tls.cert.as_mut().map(fix);
            tls.key.as_mut().map(fix);
            tls.ca.as_mut().map(fix);
        }
    }

    /// Like [`SensorConfig::load`], but a missing file gives the defaults.
    pub fn load_or_default(path: &Path) -> Result<SensorConfig, ConfigError> {
        if path.exists() {
            return SensorConfig::load(path);
        }
        let mut cfg = SensorConfig::default();
        cfg.apply_env(|k| std::env::var(k).ok())?;
        Ok(cfg)
    }

    /// Parses a sensor.yaml held in memory (no environment overrides).
    pub fn from_bytes(file: &str, bytes: &[u8]) -> Result<SensorConfig, ConfigError> {
        let text = std::str::from_utf8(bytes)
            .map_err(|_| ConfigError::single(file, "the file is not UTF-8 — save it as UTF-8"))?;
        let root = yaml::parse(file, text)?;
        let mut ctx = Ctx::new(file);
        let mut cfg = SensorConfig::default();
        decode(&mut ctx, &root, &mut cfg);
        ctx.into_result(cfg)
    }

    /// Applies `CONDUIT_SENSOR_*` overrides from `get` (the process
    /// environment in [`SensorConfig::load`]; a map in tests).
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let mut diags = Vec::new();
        let mut bad = |var: &str, msg: String| {
            diags.push(Diagnostic {
                file: format!("environment variable {var}"),
                line: 0,
                column: 0,
                message: msg,
            });
        };
        let parse_bool = |v: &str| match v.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Some(true),
            "0" | "false" | "no" | "off" => Some(false),
            _ => None,
        };
        if let Some(v) = get("CONDUIT_SENSOR_SENSOR_ID").filter(|v| !v.is_empty()) {
            self.sensor_id = v;
        }
        if let Some(v) = get("CONDUIT_SENSOR_INTERFACES") {
            self.interfaces = v
                .split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect();
        }
        if let Some(v) = get("CONDUIT_SENSOR_CONDUITS").filter(|v| !v.is_empty()) {
            self.conduits = PathBuf::from(v);
        }
        if let Some(v) = get("CONDUIT_SENSOR_SPOOL_DIR").filter(|v| !v.is_empty()) {
            self.spool.dir = PathBuf::from(v);
        }
        if let Some(v) = get("CONDUIT_SENSOR_SIGNING_KEY").filter(|v| !v.is_empty()) {
            self.signing_key = Some(PathBuf::from(v));
        }
        if let Some(v) = get("CONDUIT_SENSOR_JSONL").filter(|v| !v.is_empty()) {
            self.jsonl = Some(PathBuf::from(v));
        }
        if let Some(v) = get("CONDUIT_SENSOR_COLLECTOR_URL").filter(|v| !v.is_empty()) {
            match check_url(&v) {
                Ok(()) => match &mut self.collector {
                    Some(c) => c.urls = vec![v],
                    None => {
                        self.collector = Some(CollectorConfig {
                            urls: vec![v],
                            tls: None,
                        });
                    }
                },
                Err(fix) => bad(
                    "CONDUIT_SENSOR_COLLECTOR_URL",
                    format!("invalid collector URL `{v}` — {fix}"),
                ),
            }
        }
        if let Some(v) = get("CONDUIT_SENSOR_METRICS_LISTEN").filter(|v| !v.is_empty()) {
            match v.parse::<SocketAddr>() {
                Ok(listen) => self.metrics = Some(MetricsConfig { listen }),
                Err(_) => bad(
                    "CONDUIT_SENSOR_METRICS_LISTEN",
                    format!(
                        "invalid address `{v}` — write ADDRESS:PORT such as {DEFAULT_METRICS_LISTEN}"
                    ),
                ),
            }
        }
        for (var, field) in [
            ("CONDUIT_SENSOR_ENFORCEMENT", &mut self.enforcement),
            ("CONDUIT_SENSOR_RECORD_ALL", &mut self.record_all),
        ] {
            if let Some(v) = get(var) {
                match parse_bool(&v) {
                    Some(b) => *field = b,
                    None => bad(var, format!("`{v}` is not a boolean — use true or false")),
                }
            }
        }
        if diags.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { diagnostics: diags })
        }
    }
}

/// `Err(fix)` unless the URL is http(s)://host[:port][/...].
fn check_url(url: &str) -> Result<(), &'static str> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or("use https://HOST:PORT (http:// only for tests)")?;
    let host = rest.split('/').next().unwrap_or("");
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err("the URL needs a host: https://collector.example:4317");
    }
    Ok(())
}

fn path(ctx: &mut Ctx, node: &Node, what: &str) -> Option<PathBuf> {
    ctx.nonempty_str(node, what).map(PathBuf::from)
}

/// A size: a number of bytes, or a string such as `512MiB`, `1GiB`, `64MB`.
fn size(ctx: &mut Ctx, node: &Node, what: &str) -> Option<u64> {
    let text = super::conduits::scalar(node).unwrap_or("");
    let digits_end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '_'))
        .unwrap_or(text.len());
    let (num, unit) = text.split_at(digits_end);
    let mult: Option<u64> = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => Some(1),
        "k" | "kb" => Some(1_000),
        "kib" => Some(1 << 10),
        "m" | "mb" => Some(1_000_000),
        "mib" => Some(1 << 20),
        "g" | "gb" => Some(1_000_000_000),
        "gib" => Some(1 << 30),
        "t" | "tb" => Some(1_000_000_000_000),
        "tib" => Some(1 << 40),
        _ => None,
    };
    let value = num
        .replace('_', "")
        .parse::<u64>()
        .ok()
        .zip(mult)
        .and_then(|(n, m)| n.checked_mul(m))
        .filter(|v| *v > 0);
    if value.is_none() {
        ctx.err(
            node.pos,
            format!("`{what}` must be a size, found {}", describe(node)),
            "write a number of bytes or a size such as 512MiB or 2GiB",
        );
    }
    value
}

fn duration(ctx: &mut Ctx, node: &Node, what: &str) -> Option<Duration> {
    let text = super::conduits::scalar(node).unwrap_or("");
    match humantime::parse_duration(text) {
        Ok(d) if !d.is_zero() => Some(d),
        _ => {
            ctx.err(
                node.pos,
                format!("`{what}` must be a duration, found {}", describe(node)),
                "write a duration such as 30s, 5m or 1h",
            );
            None
        }
    }
}

fn decode(ctx: &mut Ctx, root: &Node, cfg: &mut SensorConfig) {
    let Some(top) = ctx.fields(root, "sensor.yaml", TOP_KEYS) else {
        return;
    };
    if let Some(n) = top.get("sensor_id")
        && let Some(v) = ctx.nonempty_str(n, "sensor_id")
    {
        if conduit_evidence::sensor_id::is_valid(&v) {
            cfg.sensor_id = v;
        } else {
            ctx.err(
                n.pos,
                format!("`sensor_id` {v:?} is not a valid sensor id"),
                format!("use {}", conduit_evidence::sensor_id::GRAMMAR),
            );
        }
    }
    if let Some(items) = top.get("interfaces").and_then(|n| ctx.seq(n, "interfaces")) {
        cfg.interfaces = items
            .iter()
            .filter_map(|i| {
                let name = ctx.nonempty_str(i, "interfaces[]")?;
                // IFNAMSIZ is 16 including the NUL.
                if name.len() > 15 || name.contains(['/', ' ']) {
                    ctx.err(
                        i.pos,
                        format!("`{name}` is not a valid interface name"),
                        "use the name `ip link` shows, at most 15 characters",
                    );
                    return None;
                }
                Some(name)
            })
            .collect();
    }
    if let Some(p) = top.get("conduits").and_then(|n| path(ctx, n, "conduits")) {
        cfg.conduits = p;
    }
    if let Some(n) = top.get("spool")
        && let Some(f) = ctx.fields(n, "spool", SPOOL_KEYS)
    {
        if let Some(p) = f.get("dir").and_then(|n| path(ctx, n, "spool.dir")) {
            cfg.spool.dir = p;
        }
        if let Some(v) = f
            .get("max_bytes")
            .and_then(|n| size(ctx, n, "spool.max_bytes"))
        {
            cfg.spool.max_bytes = v;
        }
        if let Some(v) = f
            .get("segment_bytes")
            .and_then(|n| size(ctx, n, "spool.segment_bytes"))
        {
            cfg.spool.segment_bytes = v;
        }
        if let (Some(n), true) = (
            f.get("segment_bytes").or(f.get("max_bytes")),
            cfg.spool.segment_bytes > cfg.spool.max_bytes,
        ) {
            ctx.err(
                n.pos,
                format!(
                    "spool.segment_bytes ({}) is larger than spool.max_bytes ({})",
                    cfg.spool.segment_bytes, cfg.spool.max_bytes
                ),
                "make max_bytes several segments large",
            );
        }
        if let Some(n) = f.get("sync")
            && let Some(s) = ctx.fields(n, "spool.sync", SYNC_KEYS)
        {
            if let Some(v) = s
                .get("interval_ms")
                .and_then(|n| ctx.uint(n, "spool.sync.interval_ms", 0, 3_600_000))
            {
                cfg.spool.sync.interval_ms = v;
            }
            if let Some(v) = s
                .get("records")
                .and_then(|n| ctx.uint(n, "spool.sync.records", 1, u64::from(u32::MAX)))
            {
                cfg.spool.sync.records = v;
            }
        }
    }
    if let Some(p) = top
        .get("signing_key")
        .and_then(|n| path(ctx, n, "signing_key"))
    {
        cfg.signing_key = Some(p);
    }
    if let Some(n) = top.get("collector")
        && let Some(f) = ctx.fields(n, "collector", COLLECTOR_KEYS)
    {
        let one_url = |ctx: &mut Ctx, n: &Node| {
            let u = ctx.nonempty_str(n, "collector.url")?;
            match check_url(&u) {
                Ok(()) => Some(u),
                Err(fix) => {
                    ctx.err(n.pos, format!("invalid collector URL `{u}`"), fix);
                    None
                }
            }
        };
        // One URL, or a list of them in order of preference (failover).
        let urls = f
            .required(ctx, "url", "collector")
            .and_then(|n| match &n.value {
                yaml::Value::Seq(items) if items.is_empty() => {
                    ctx.err(
                        n.pos,
                        "`collector.url` is an empty list",
                        "give at least one URL",
                    );
                    None
                }
                yaml::Value::Seq(items) => {
                    let urls: Vec<String> = items.iter().filter_map(|i| one_url(ctx, i)).collect();
                    (urls.len() == items.len()).then_some(urls)
                }
                _ => one_url(ctx, n).map(|u| vec![u]),
            });
        let tls = f.get("tls").and_then(|n| {
            let t = ctx.fields(n, "collector.tls", TLS_KEYS)?;
            let files = TlsFiles {
                cert: t
                    .get("cert")
                    .and_then(|n| path(ctx, n, "collector.tls.cert")),
                key: t.get("key").and_then(|n| path(ctx, n, "collector.tls.key")),
                ca: t.get("ca").and_then(|n| path(ctx, n, "collector.tls.ca")),
            };
            if files.cert.is_some() != files.key.is_some() {
                ctx.err(
                    n.pos,
                    "collector.tls needs both `cert` and `key` (or neither)",
                    "add the missing file, or remove both for server-only TLS",
                );
            }
            Some(files)
        });
        if let Some(urls) = urls {
            cfg.collector = Some(CollectorConfig { urls, tls });
        }
    }
    if let Some(n) = top.get("metrics")
        && let Some(f) = ctx.fields(n, "metrics", METRICS_KEYS)
    {
        let mut m = MetricsConfig::default();
        if let Some(l) = f.get("listen")
            && let Some(s) = ctx.str(l, "metrics.listen")
        {
            match s.parse::<SocketAddr>() {
                Ok(a) => m.listen = a,
                Err(_) => ctx.err(
                    l.pos,
                    format!("`metrics.listen` must be ADDRESS:PORT, found `{s}`"),
                    format!("write `listen: \"{DEFAULT_METRICS_LISTEN}\"` (keep it on localhost unless a firewall protects it)"),
                ),
            }
        }
        cfg.metrics = Some(m);
    }
    if let Some(v) = top
        .get("enforcement")
        .and_then(|n| ctx.bool(n, "enforcement"))
    {
        cfg.enforcement = v;
    }
    if let Some(v) = top
        .get("record_all")
        .and_then(|n| ctx.bool(n, "record_all"))
    {
        cfg.record_all = v;
    }
    if let Some(p) = top.get("jsonl").and_then(|n| path(ctx, n, "jsonl")) {
        cfg.jsonl = Some(p);
    }
    if let Some(n) = top.get("timeouts")
        && let Some(f) = ctx.fields(n, "timeouts", TIMEOUT_KEYS)
    {
        if let Some(d) = f
            .get("idle")
            .and_then(|n| duration(ctx, n, "timeouts.idle"))
        {
            cfg.timeouts.idle = d;
        }
        if let Some(d) = f
            .get("active")
            .and_then(|n| duration(ctx, n, "timeouts.active"))
        {
            cfg.timeouts.active = d;
        }
        if let Some(d) = f
            .get("tcp_end_grace")
            .and_then(|n| duration(ctx, n, "timeouts.tcp_end_grace"))
        {
            cfg.timeouts.tcp_end_grace = d;
        }
    }
    if let Some(n) = top.get("checkpoint")
        && let Some(f) = ctx.fields(n, "checkpoint", CHECKPOINT_KEYS)
    {
        if let Some(v) = f
            .get("every_records")
            .and_then(|n| ctx.uint(n, "checkpoint.every_records", 1, u64::from(u32::MAX)))
        {
            cfg.checkpoint.every_records = v;
        }
        if let Some(v) = f
            .get("every_seconds")
            .and_then(|n| ctx.uint(n, "checkpoint.every_seconds", 1, 86_400))
        {
            cfg.checkpoint.every_seconds = v;
        }
    }
    if let Some(n) = top.get("capacity")
        && let Some(f) = ctx.fields(n, "capacity", CAPACITY_KEYS)
    {
        let max = u64::from(u32::MAX);
        if let Some(v) = f
            .get("flow_table")
            .and_then(|n| ctx.uint(n, "capacity.flow_table", 1024, max))
        {
            cfg.capacity.flow_table = v as u32;
        }
        if let Some(n) = f.get("ring_buffer_bytes")
            && let Some(v) = ctx.uint(n, "capacity.ring_buffer_bytes", 4096, 1 << 31)
        {
            if v.is_power_of_two() {
                cfg.capacity.ring_buffer_bytes = v as u32;
            } else {
                ctx.err(
                    n.pos,
                    format!("`capacity.ring_buffer_bytes` must be a power of two, found {v}"),
                    format!("write {}", v.next_power_of_two()),
                );
            }
        }
        if let Some(v) = f
            .get("tracked_flows")
            .and_then(|n| ctx.uint(n, "capacity.tracked_flows", 1024, max))
        {
            cfg.capacity.tracked_flows = v as u32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let cfg = SensorConfig::from_bytes("s.yaml", b"").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.timeouts.idle, Duration::from_secs(30));
        assert_eq!(cfg.timeouts.active, Duration::from_secs(60));
        assert!(!cfg.enforcement);
        assert!(cfg.metrics.is_none());
        assert!(!cfg.sensor_id.is_empty());
    }

    #[test]
    fn sensor_id_follows_the_one_grammar() {
        for bad in ["collector", "EXPORTS", "_x", "a/b"] {
            let text = format!("sensor_id: \"{bad}\"\n");
            let err = SensorConfig::from_bytes("s.yaml", text.as_bytes())
                .err()
                .unwrap_or_else(|| panic!("{bad} accepted"));
            let d = &err.diagnostics[0];
            assert_eq!((d.line, d.column), (1, 12), "{d:?}");
            assert!(d.message.contains("not a valid sensor id"), "{}", d.message);
        }
        let cfg = SensorConfig::from_bytes("s.yaml", b"sensor_id: gw-01\n")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.sensor_id, "gw-01");
    }

    #[test]
    fn collector_url_is_one_or_a_list_in_order() {
        let urls = |text: &str| {
            SensorConfig::from_bytes("s.yaml", text.as_bytes())
                .map(|c| c.collector.map(|c| c.urls).unwrap_or_default())
        };
        assert_eq!(
            urls("collector: {url: \"https://a:4317\"}\n").expect("one"),
            ["https://a:4317"]
        );
        assert_eq!(
            urls("collector:\n  url:\n    - https://a:4317\n    - https://b:4317\n").expect("two"),
            ["https://a:4317", "https://b:4317"]
        );
        let err = urls("collector:\n  url: [https://a:4317, \"ftp://b\"]\n").expect_err("bad");
        let d = &err.diagnostics[0];
        assert_eq!((d.line, d.column), (2, 25), "{d:?}");
        assert!(
            d.message.contains("invalid collector URL `ftp://b`"),
            "{}",
            d.message
        );
        let err = urls("collector: {url: []}\n").expect_err("empty");
        assert!(err.to_string().contains("empty list"), "{err}");
    }

    #[test]
    fn missing_file_gives_defaults() {
        let cfg = SensorConfig::load_or_default(Path::new("/nonexistent/sensor.yaml"));
        assert!(cfg.is_ok());
        assert!(SensorConfig::load(Path::new("/nonexistent/sensor.yaml")).is_err());
    }

    #[test]
    fn values_and_errors() {
        let cfg = SensorConfig::from_bytes(
            "s.yaml",
            b"spool: {max_bytes: 2GiB, segment_bytes: 1048576}\ntimeouts: {idle: 5m}\nmetrics: {}\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.spool.max_bytes, 2 << 30);
        assert_eq!(cfg.spool.segment_bytes, 1 << 20);
        assert_eq!(cfg.timeouts.idle, Duration::from_secs(300));
        assert_eq!(
            cfg.metrics.map(|m| m.listen.to_string()).as_deref(),
            Some(DEFAULT_METRICS_LISTEN)
        );
        let err = SensorConfig::from_bytes(
            "s.yaml",
            b"enforcement: yes\ntimeouts:\n  idle: soon\ncolector: {}\n",
        )
        .expect_err("broken");
        let text = err.to_string();
        assert!(
            text.contains("s.yaml:1:14: `enforcement` must be true or false"),
            "{text}"
        );
        assert!(
            text.contains("s.yaml:3:9: `timeouts.idle` must be a duration"),
            "{text}"
        );
        assert!(
            text.contains("s.yaml:4:1: unknown key `colector`"),
            "{text}"
        );
        assert!(text.contains("did you mean `collector`"), "{text}");
    }

    #[test]
    fn env_overrides() {
        let mut cfg = SensorConfig::default();
        let env = |k: &str| match k {
            "CONDUIT_SENSOR_ENFORCEMENT" => Some("true".to_owned()),
            "CONDUIT_SENSOR_INTERFACES" => Some("eth1, eth2".to_owned()),
            "CONDUIT_SENSOR_COLLECTOR_URL" => Some("https://c.example:4317".to_owned()),
            _ => None,
        };
        cfg.apply_env(env).unwrap_or_else(|e| panic!("{e}"));
        assert!(cfg.enforcement);
        assert_eq!(cfg.interfaces, ["eth1", "eth2"]);
        assert_eq!(
            cfg.collector.as_ref().map(|c| c.urls.as_slice()),
            Some(&["https://c.example:4317".to_owned()][..])
        );
        let err = cfg
            .apply_env(|k| (k == "CONDUIT_SENSOR_RECORD_ALL").then(|| "maybe".to_owned()))
            .expect_err("bad bool");
        assert!(
            err.to_string()
                .starts_with("environment variable CONDUIT_SENSOR_RECORD_ALL: ")
        );
    }

    #[test]
    fn relative_paths_follow_the_file() {
        let mut cfg = SensorConfig::from_bytes(
            "s.yaml",
            b"conduits: conduits.yaml\nspool: {dir: /abs/spool}\njsonl: out/r.jsonl\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        cfg.resolve_relative(Path::new("/etc/cs"));
        assert_eq!(cfg.conduits, Path::new("/etc/cs/conduits.yaml"));
        assert_eq!(cfg.spool.dir, Path::new("/abs/spool"));
        assert_eq!(cfg.jsonl.as_deref(), Some(Path::new("/etc/cs/out/r.jsonl")));
    }
}
