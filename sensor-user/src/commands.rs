//! The subcommands of `conduit-sensor`, each returning its exit code.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context as _, Result};
use conduit_evidence::chain::{RecorderOptions, keys, verify::verify_dir_witnessed};
use conduit_evidence::spool::SyncPolicy;
use conduit_uplink::{UplinkOptions, UplinkTls};

use crate::{
    agent::{AgentSettings, ConfigExit},
    cli::{
        CheckConfigArgs, Cli, Command, DEFAULT_CONFIG, EXIT_CHAIN_BROKEN, EXIT_CONFIG,
        EXIT_INCOMPLETE, EXIT_USAGE, KeygenArgs, ProbeArgs, ReloadArgs, ReplayArgs, RunArgs,
        VerifyChainArgs,
    },
    config::{ConduitMap, ConfigError, SensorConfig},
    flows::TrackerOptions,
};

/// Runs a parsed command line.
pub fn dispatch(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::CheckConfig(args) => check_config(args),
        Command::VerifyChain(args) => verify_chain(args),
        Command::Keygen(args) => keygen(args),
        Command::Probe(args) => probe(args),
        Command::Detach(args) => detach(args),
        Command::Reload(args) => reload(args),
        Command::Schema => schema(),
        Command::Version => {
            println!("conduit-sensor {}", env!("CARGO_PKG_VERSION"));
            Ok(ExitCode::SUCCESS)
        }
        Command::Replay(args) => replay(args),
        Command::GenerateDocs { out } => {
            use clap::CommandFactory as _;
            conduit_ops::docs::write(Cli::command(), &out)
                .with_context(|| format!("writing man pages and completions to {}", out.display()))
                .map(|files| {
                    for f in files {
                        println!("{}", f.display());
                    }
                    ExitCode::SUCCESS
                })
        }
    };
    result.unwrap_or_else(|err| {
        use conduit_ops::logging::print_error;
        if let Some(ConfigExit(cfg)) = err.downcast_ref::<ConfigExit>() {
            print_error(&cfg.to_string());
            return ExitCode::from(EXIT_CONFIG);
        }
        if let Some(cfg) = err.downcast_ref::<ConfigError>() {
            print_error(&cfg.to_string());
            return ExitCode::from(EXIT_CONFIG);
        }
        print_error(&format!("conduit-sensor: error: {err:#}"));
        ExitCode::FAILURE
    })
}

/// sensor.yaml (if given) with environment overrides.
fn load_sensor_config(path: Option<&Path>) -> Result<SensorConfig, ConfigError> {
    let mut cfg = match path {
        Some(p) => SensorConfig::load(p)?,
        None => SensorConfig::default(),
    };
    cfg.apply_env(|k| std::env::var(k).ok())?;
    Ok(cfg)
}

/// Merges sensor.yaml and the flags (flags win).
pub fn settings_from(args: &RunArgs) -> Result<AgentSettings, ConfigError> {
    let cfg = load_sensor_config(args.config.as_deref())?;
    let conduits = args.conduits.clone().or_else(|| {
        // The default map path is used only when it exists or a config file named it.
        (args.config.is_some() || cfg.conduits.exists()).then(|| cfg.conduits.clone())
    });
    let spool_dir = args.spool.clone().unwrap_or_else(|| cfg.spool.dir.clone());
    let sensor_id = args
        .sensor_id
        .clone()
        .unwrap_or_else(|| cfg.sensor_id.clone());
    // The flag, the environment and the host-name default meet the same grammar as
    // the file (the collector enforces it too).
    if !conduit_evidence::sensor_id::is_valid(&sensor_id) {
        return Err(ConfigError::single(
            "sensor id (--sensor-id, CONDUIT_SENSOR_SENSOR_ID or the host name)",
            format!(
                "{sensor_id:?} is not a valid sensor id — use {}",
                conduit_evidence::sensor_id::GRAMMAR
            ),
        ));
    }
    let ifaces = if args.ifaces.is_empty() {
        cfg.interfaces.clone()
    } else {
        args.ifaces.clone()
    };
    let mut recorder = RecorderOptions::new(spool_dir, sensor_id.clone());
    recorder.head_witness = conduit_evidence::chain::head_witness::beside(&recorder.spool_dir);
    recorder.key_path = cfg.signing_key.clone();
    recorder.max_spool_bytes = cfg.spool.max_bytes;
    recorder.segment_bytes = cfg.spool.segment_bytes;
    recorder.checkpoint_every_records = cfg.checkpoint.every_records;
    recorder.checkpoint_every = Duration::from_secs(cfg.checkpoint.every_seconds);
    recorder.sync = SyncPolicy::Group {
        interval: Duration::from_millis(cfg.spool.sync.interval_ms),
        records: cfg.spool.sync.records,
    };
    let uplink = uplink_options(args, &cfg, &sensor_id)?;
    Ok(AgentSettings {
        sensor_id,
        ifaces,
        conduits,
        recorder,
        jsonl: args.jsonl.clone().or(cfg.jsonl.clone()),
        tracker: TrackerOptions {
            idle_timeout: args.idle_timeout.unwrap_or(cfg.timeouts.idle),
            active_timeout: args.active_timeout.unwrap_or(cfg.timeouts.active),
            end_grace: cfg.timeouts.tcp_end_grace,
            record_all: args.record_all || cfg.record_all,
            max_flows: cfg.capacity.tracked_flows as usize,
            ..TrackerOptions::default()
        },
        flow_table_size: cfg.capacity.flow_table,
        ringbuf_bytes: cfg.capacity.ring_buffer_bytes,
        enforcement: args.enforce || cfg.enforcement,
        metrics: args.metrics.or(cfg.metrics.map(|m| m.listen)),
        uplink,
    })
}

/// The collector link from the flags and sensor.yaml; `https://` needs all three
/// TLS files (mTLS), `http://` is allowed with a warning.
fn uplink_options(
    args: &RunArgs,
    cfg: &SensorConfig,
    sensor_id: &str,
) -> Result<Option<UplinkOptions>, ConfigError> {
    let file_tls = cfg.collector.as_ref().and_then(|c| c.tls.clone());
    let urls = if args.collector.is_empty() {
        cfg.collector
            .as_ref()
            .map(|c| c.urls.clone())
            .unwrap_or_default()
    } else {
        args.collector.clone()
    };
    let Some(first) = urls.first() else {
        return Ok(None);
    };
    let mut opts = UplinkOptions::new(first.clone(), sensor_id);
    opts.collectors.clone_from(&urls);
    // The recorder's key signs every batch too (None: `<spool>/signing.key`).
    opts.signing_key = cfg.signing_key.clone();
    let pick = |flag: &Option<PathBuf>, file: Option<PathBuf>| flag.clone().or(file);
    let cert = pick(
        &args.tls_cert,
        file_tls.as_ref().and_then(|t| t.cert.clone()),
    );
    let key = pick(&args.tls_key, file_tls.as_ref().and_then(|t| t.key.clone()));
    let ca = pick(&args.tls_ca, file_tls.as_ref().and_then(|t| t.ca.clone()));
    // One set of TLS files for every collector: each is verified by its own name.
    if let Some(url) = urls.iter().find(|u| u.starts_with("https://")) {
        match (cert, key, ca) {
            (Some(cert), Some(key), Some(ca)) => {
                opts.tls = Some(UplinkTls {
                    cert,
                    key,
                    ca,
                    domain: None,
                });
            }
            _ => {
                return Err(ConfigError::single(
                    "--collector",
                    format!(
                        "{url} is https: give --tls-cert, --tls-key and --tls-ca (or collector.tls in sensor.yaml) for mTLS"
                    ),
                ));
            }
        }
    }
    if let Some(url) = urls
        .iter()
        .find(|u| !u.starts_with("https://") && !u.starts_with("http://"))
    {
        return Err(ConfigError::single(
            "--collector",
            format!(
                "{url}: the collector URL must start with https:// (mTLS) or http:// (plain text)"
            ),
        ));
    }
    Ok(Some(opts))
}

fn run(args: RunArgs) -> Result<ExitCode> {
    let settings = settings_from(&args).map_err(ConfigExit)?;
    if settings.ifaces.is_empty() {
        return Err(ConfigExit(ConfigError::single(
            "--iface",
            "no interface to watch: give --iface NAME (repeatable) or `interfaces:` in sensor.yaml",
        ))
        .into());
    }
    for url in settings.uplink.iter().flat_map(|u| &u.collectors) {
        if url.starts_with("http://") {
            tracing::warn!(%url, "PLAIN-TEXT collector link: records travel unencrypted and unauthenticated; use https:// with --tls-cert/--tls-key/--tls-ca");
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    runtime.block_on(crate::agent::run(settings))?;
    Ok(ExitCode::SUCCESS)
}

fn replay(args: ReplayArgs) -> Result<ExitCode> {
    // Parsed by a reader thread while the programs load and run.
    let packets = crate::pcap::stream_packets(&args.pcap)?;
    let run_args = RunArgs {
        conduits: Some(args.conduits.clone()),
        jsonl: args.jsonl.clone(),
        spool: Some(args.spool.clone().unwrap_or_else(|| {
            std::env::temp_dir().join(format!("conduit-replay-{}", std::process::id()))
        })),
        sensor_id: Some(args.sensor_id.clone()),
        record_all: args.record_all,
        ..RunArgs::default()
    };
    let settings = settings_from(&run_args).map_err(ConfigExit)?;
    let spool = settings.recorder.spool_dir.clone();
    let n = crate::agent::replay(settings, packets)?;
    eprintln!(
        "replayed {n} packets from {}; records in {}",
        args.pcap.display(),
        spool.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn check_config(mut args: CheckConfigArgs) -> Result<ExitCode> {
    if args.config.is_none() && args.conduits.is_none() {
        if !Path::new(DEFAULT_CONFIG).exists() {
            conduit_ops::logging::print_error(&format!(
                "conduit-sensor check-config: nothing to check: {DEFAULT_CONFIG} does not exist; give --config FILE and/or --conduits FILE"
            ));
            return Ok(ExitCode::from(EXIT_USAGE));
        }
        args.config = Some(PathBuf::from(DEFAULT_CONFIG));
    }
    let mut errors = Vec::new();
    let cfg = match load_sensor_config(args.config.as_deref()) {
        Ok(cfg) => Some(cfg),
        Err(err) => {
            errors.push(err.to_string());
            None
        }
    };
    let conduits: Option<PathBuf> = args.conduits.clone().or_else(|| {
        cfg.as_ref()
            .filter(|_| args.config.is_some())
            .map(|c| c.conduits.clone())
    });
    if let Some(path) = &conduits {
        // A map must also fit the kernel tables, or the agent would refuse it.
        let fits = |map: ConduitMap| {
            crate::kernel_policy::kernel_policy(&map, false)
                .map(|_| map)
                .map_err(|e| format!("{}: {e}", path.display()))
        };
        match ConduitMap::load(path, None)
            .map_err(|e| e.to_string())
            .and_then(fits)
        {
            Ok(map) => println!(
                "{}: ok: site {}, {} zones, {} endpoints, {} conduits, policy hash {}",
                path.display(),
                map.site,
                map.zones.len(),
                map.endpoints.len(),
                map.conduits.len(),
                hex::encode(map.policy_hash())
            ),
            Err(err) => errors.push(err),
        }
    }
    if let (Some(path), Some(cfg)) = (&args.config, &cfg) {
        let before = errors.len();
        if !args.syntax_only {
            errors.extend(deployment_problems(&path.display().to_string(), cfg));
        }
        if errors.len() == before {
            println!("{}: ok", path.display());
        }
    }
    if errors.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        for e in errors {
            conduit_ops::logging::print_error(&e);
        }
        Ok(ExitCode::from(EXIT_CONFIG))
    }
}

/// What sensor.yaml names that the agent would fail on at start: interfaces that
/// do not exist, files it cannot read.
fn deployment_problems(file: &str, cfg: &SensorConfig) -> Vec<String> {
    let mut problems = Vec::new();
    for iface in &cfg.interfaces {
        if !Path::new("/sys/class/net").join(iface).exists() {
            problems.push(format!(
                "{file}: interfaces: `{iface}` does not exist on this host (see `ip link`)"
            ));
        }
    }
    let mut files: Vec<(&str, &Path)> = Vec::new();
    if let Some(key) = &cfg.signing_key {
        files.push(("signing_key", key));
    }
    if let Some(tls) = cfg.collector.as_ref().and_then(|c| c.tls.as_ref()) {
        for (what, path) in [
            ("collector.tls.cert", &tls.cert),
            ("collector.tls.key", &tls.key),
            ("collector.tls.ca", &tls.ca),
        ] {
            if let Some(path) = path {
                files.push((what, path));
            }
        }
    }
    for (what, path) in files {
        if let Err(err) = std::fs::File::open(path) {
            problems.push(format!(
                "{file}: {what}: cannot read {}: {err}",
                path.display()
            ));
        }
    }
    problems
}

fn verify_chain(args: VerifyChainArgs) -> Result<ExitCode> {
    if !args.dir.is_dir() {
        eprintln!(
            "conduit-sensor verify-chain: {}: not a directory (give a spool or a collector store)",
            args.dir.display()
        );
        return Ok(ExitCode::from(EXIT_USAGE));
    }
    let key = match &args.public_key {
        Some(path) => Some(keys::read_public_key(path)?),
        None => None,
    };
    let witness = match &args.witness_key {
        Some(path) => Some(keys::read_public_key(path)?),
        None => None,
    };
    let report = verify_dir_witnessed(&args.dir, key, witness);
    print!("{report}");
    Ok(if report.complete() {
        ExitCode::SUCCESS
    } else if report.ok() {
        ExitCode::from(EXIT_INCOMPLETE)
    } else {
        ExitCode::from(EXIT_CHAIN_BROKEN)
    })
}

fn keygen(args: KeygenArgs) -> Result<ExitCode> {
    let key = keys::keygen(&args.out)?;
    println!(
        "wrote {}/signing.key (0600) and signing.pub; public key {}",
        args.out.display(),
        hex::encode(key.verifying_key().to_bytes())
    );
    Ok(ExitCode::SUCCESS)
}

fn reload(args: ReloadArgs) -> Result<ExitCode> {
    use crate::reload::ReloadError;
    match crate::reload::reload(args.pid, args.timeout) {
        Ok(status) => {
            eprintln!(
                "reload applied (generation {}): {}",
                status.generation, status.message
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(err @ (ReloadError::NoRuntimeDirectory | ReloadError::Signal { .. })) => {
            conduit_ops::logging::print_error(&format!("conduit-sensor reload: {err}"));
            Ok(ExitCode::from(EXIT_USAGE))
        }
        Err(err) => {
            conduit_ops::logging::print_error(&format!("conduit-sensor reload: {err}"));
            Ok(ExitCode::from(EXIT_CHAIN_BROKEN))
        }
    }
}

fn schema() -> Result<ExitCode> {
    println!(
        "{}",
        serde_json::to_string_pretty(&crate::config::schema::json_schema())?
    );
    Ok(ExitCode::SUCCESS)
}

fn detach(args: crate::cli::DetachArgs) -> Result<ExitCode> {
    let mut code = ExitCode::SUCCESS;
    for iface in &args.ifaces {
        if !Path::new("/sys/class/net").join(iface).exists() {
            eprintln!("conduit-sensor: interface {iface} does not exist");
            code = ExitCode::from(EXIT_USAGE);
            continue;
        }
        let removed = crate::kernel::detach_stale(iface)
            .with_context(|| format!("detaching the sensor from {iface}"))?;
        if removed.is_empty() {
            println!("{iface}: nothing of the sensor attached");
        }
        for r in removed {
            println!("{iface}: removed {r}");
        }
    }
    Ok(code)
}

/// One line of `probe` on a hook's payload classifier and what it means.
fn print_classifier(hook: &str, v: crate::kernel::ClassifierVariant) {
    use crate::kernel::ClassifierVariant;
    let meaning = match v {
        ClassifierVariant::Helpers => {
            "bpf_loop, bpf_xdp_load_bytes / bpf_skb_load_bytes: SNI, split ClientHellos and QUIC Initials; XDP also reads multi-buffer frames"
        }
        ClassifierVariant::Bounded => {
            "bounded loops, XDP by direct packet access (this kernel rejected the helper variant): SNI, split ClientHellos and QUIC Initials; XDP copies only a frame's linear area"
        }
        ClassifierVariant::None => {
            "NOT LOADED: flows are classified by address only; endpoints known only by SNI are missed and QUIC is not recognized"
        }
    };
    println!("payload classification, {hook}: {} ({meaning})", v.name());
}

fn probe(args: ProbeArgs) -> Result<ExitCode> {
    let uname = nix::sys::utsname::uname()?;
    let release = uname.release().to_string_lossy().into_owned();
    println!("kernel: {release}");
    let btf = Path::new("/sys/kernel/btf/vmlinux").exists();
    println!(
        "BTF: {}",
        if btf {
            "present"
        } else {
            "absent (programs still load; CO-RE relocations unavailable)"
        }
    );
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    for (name, bit) in [
        ("CAP_NET_ADMIN", 12),
        ("CAP_SYS_ADMIN", 21),
        ("CAP_PERFMON", 38),
        ("CAP_BPF", 39),
    ] {
        println!(
            "{name}: {}",
            if cap_eff & (1 << bit) != 0 {
                "yes"
            } else {
                "no"
            }
        );
    }
    let mut code = ExitCode::SUCCESS;
    // What this kernel supports is what its verifier accepts: load and see.
    match crate::kernel::Kernel::load(&crate::kernel::KernelOptions::default()) {
        Ok(k) => {
            use crate::kernel::FlowVariant;
            let flow = match k.flow_variant() {
                FlowVariant::Current => "conduit_xdp, conduit_tc",
                FlowVariant::Legacy => {
                    "conduit_xdp_510, conduit_tc_510: no atomic OR or coarse clock on this kernel, so a TCP flag of a packet handled on another CPU at the same instant can be lost (a lost FIN/RST ends the flow at the idle timeout)"
                }
            };
            println!(
                "kernel programs: load ok, flow variant {} ({flow}): flows, counters, classification by address",
                k.flow_variant().name()
            );
            let c = k.classifiers();
            print_classifier("XDP ingress", c.xdp);
            print_classifier("TC egress", c.tc);
            for (prog, error) in &c.rejected {
                println!(
                    "  {prog} rejected: {}",
                    error.trim_end().replace('\n', "\n    ")
                );
            }
        }
        Err(err) => {
            println!("kernel programs: FAILED to load: {err}");
            code = ExitCode::from(EXIT_CHAIN_BROKEN);
        }
    }
    let ifaces: Vec<String> = if args.ifaces.is_empty() {
        std::fs::read_dir("/sys/class/net")
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    } else {
        args.ifaces
    };
    for iface in ifaces {
        if !Path::new("/sys/class/net").join(&iface).exists() {
            println!("interface {iface}: DOES NOT EXIST");
            code = ExitCode::from(EXIT_USAGE);
            continue;
        }
        let driver = std::fs::read_link(format!("/sys/class/net/{iface}/device/driver"))
            .ok()
            .and_then(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()))
            .or_else(|| {
                let uevent =
                    std::fs::read_to_string(format!("/sys/class/net/{iface}/uevent")).ok()?;
                uevent
                    .lines()
                    .find_map(|l| l.strip_prefix("DEVTYPE=").map(str::to_string))
            })
            .unwrap_or_else(|| "virtual".into());
        let mtu =
            std::fs::read_to_string(format!("/sys/class/net/{iface}/mtu")).unwrap_or_default();
        println!("interface {iface}: driver {driver}, mtu {}", mtu.trim());
    }
    Ok(code)
}
