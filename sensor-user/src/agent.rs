//! `conduit-sensor run`: one event loop that owns the kernel programs, the flow
//! tracker, the classifier and the recorder, so no state is shared behind locks.
//!
//! Inputs: ring-buffer events (new flows, payload to classify), a periodic sweep of
//! the kernel flow table (updates, ends, evictions, loss counters), timers for
//! checkpoints and group commit, and signals (SIGHUP reload, SIGTERM/SIGINT drain).

use std::{
    collections::HashMap,
    fs::OpenOptions,
    io::BufWriter,
    net::IpAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result};
use conduit_evidence::chain::{Appended, Recorder, RecorderOptions};
use conduit_proto::v1::{Loss, Record, RecordKind, Verdict, record::Body};
use sensor_common::{
    ClassUpdate, Counter, DIR_REVERSE, FlowKey, FlowStats, app_protocol, sni_state, verdict,
};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};

use conduit_uplink::UplinkOptions;

use crate::{
    completion::{CLASSIFICATION_DEADLINE, Completed, Completion},
    config::{self, AppProto, Attribution, ConduitMap, DefaultAction, Names},
    dns::{DnsCache, DnsLimits, Resolves},
    flows::{Classification, FlowOut, FlowTracker, TrackerOptions, anomaly},
    jsonl::{JsonlOut, JsonlThread},
    kernel::BootClock,
    kernel::{self, Kernel, KernelEvent, KernelOptions},
    kernel_policy::kernel_policy,
    metrics::Metrics,
    policy_change::policy_change_record,
    record::{endpoints, flow_record},
    tls::ClientHelloInfo,
};

/// Everything `run` needs, after sensor.yaml and the flags are merged.
#[derive(Clone, Debug)]
pub struct AgentSettings {
    pub sensor_id: String,
    pub ifaces: Vec<String>,
    pub conduits: Option<PathBuf>,
    pub recorder: RecorderOptions,
    pub jsonl: Option<PathBuf>,
    pub tracker: TrackerOptions,
    /// Kernel flow-table entries and ring-buffer bytes (sensor.yaml `capacity`).
    pub flow_table_size: u32,
    pub ringbuf_bytes: u32,
    pub enforcement: bool,
    pub metrics: Option<std::net::SocketAddr>,
    /// Stream the spool to a collector.
    pub uplink: Option<UplinkOptions>,
}

/// How often the kernel flow table is swept.
const SWEEP_INTERVAL: Duration = Duration::from_millis(500);
/// How often the recorder gets a tick (timed checkpoints, group commit).
const RECORDER_TICK: Duration = Duration::from_millis(100);

struct Agent {
    settings: AgentSettings,
    kernel: Kernel,
    tracker: FlowTracker,
    sink: Sink,
    policy: Option<ConduitMap>,
    metrics: Arc<Metrics>,
    completion: Completion,
    /// What DNS responses crossing the gateway told each client.
    dns: DnsCache,
    /// Kernel counter values already reported, to report only increases as loss.
    reported_counters: [u64; Counter::COUNT as usize],
    /// Flows already reported lost because their announcement was lost and no sweep
    /// found them (see `report_unannounced`).
    reported_unannounced: u64,
    /// Flows already reported refused by the tracker.
    reported_refused: u64,
    /// Link status when streaming to a collector.
    uplink: Option<tokio::sync::watch::Receiver<conduit_uplink::UplinkStatus>>,
}

/// Runs the agent until SIGTERM/SIGINT; returns after a clean drain.
pub async fn run(settings: AgentSettings) -> Result<()> {
    let metrics = Arc::new(Metrics::default());
    metrics
        .spool_max_bytes
        .store(settings.recorder.max_spool_bytes, Ordering::Relaxed);
    if let Some(addr) = settings.metrics {
        let m = metrics.clone();
        tokio::spawn(async move {
            if let Err(err) = crate::metrics::serve(addr, m).await {
                tracing::error!(%addr, "metrics server: {err}");
            }
        });
    }
    let uplink = settings.uplink.clone();
    let spool_dir = settings.recorder.spool_dir.clone();
    let mut agent = Agent::start(settings, metrics.clone(), Clock::Live)?;

    // The uplink reads the spool files on its own; the recorder stays their only writer.
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let link = uplink.map(|mut opts| {
        opts.public_key = Some(agent.sink.recorder.public_key());
        tracing::info!(collectors = ?opts.collectors, "streaming the spool to the collector");
        let (status_tx, status_rx) = conduit_uplink::status_channel();
        let task = tokio::spawn(conduit_uplink::stream_spool(
            opts,
            spool_dir.clone(),
            status_tx,
            shutdown_rx,
        ));
        agent.uplink = Some(status_rx.clone());
        (task, status_rx)
    });

    metrics.ready.store(true, Ordering::Relaxed);
    tracing::info!("sensor running");
    conduit_ops::notify::ready(&agent.status_line("running"));
    let result = agent.event_loop().await;

    if let Some((task, mut status)) = link {
        // Give the collector a moment to store the final records (flow_end, checkpoint).
        let head = agent.sink.recorder.head().0;
        let _ = tokio::time::timeout(UPLINK_DRAIN, status.wait_for(|s| s.acked_seq >= head)).await;
        let _ = shutdown_tx.send(true);
        match tokio::time::timeout(Duration::from_secs(5), task).await {
            Ok(Ok(Err(err))) => tracing::error!("uplink: {err}"),
            Ok(_) => {}
            Err(_) => tracing::warn!("uplink did not stop within 5 s"),
        }
        let acked = status.borrow().acked_seq;
        if acked < head {
            tracing::warn!(
                acked,
                head,
                "collector has not acknowledged everything; the rest stays in the spool and is sent on the next start"
            );
        }
    }
    result?;
    tracing::info!(peak_rss_kib = peak_rss_kib(), "sensor stopped");
    Ok(())
}

/// How long a stopping agent waits for the collector to acknowledge its last records.
const UPLINK_DRAIN: Duration = Duration::from_secs(5);

/// `conduit-sensor replay`: runs the kernel program over every packet of a pcap with
/// BPF_PROG_TEST_RUN and feeds its events to the same agent logic, so the records are
/// those a live sensor would write. Every time is the capture's: each packet's
/// kernel timestamps carry its index (`Kernel::stamp_replay_packet`), which the
/// agent maps to the packet's capture time, and the agent's own clock (sweeps,
/// timeouts, record times) follows the capture. `packets` come in batches, in
/// capture order (`pcap::stream_packets`: parsed by a reader thread while the
/// programs load and run). Returns the number of packets run.
pub fn replay(
    mut settings: AgentSettings,
    packets: impl IntoIterator<Item = Result<Vec<crate::pcap::Captured>, crate::pcap::PcapError>>,
) -> Result<u64> {
    let mut batches = packets.into_iter();
    // The first packet's time is the clock's start: the chain's own records (chain
    // start, checkpoints) follow the capture too.
    let head = batches.next().transpose()?.unwrap_or_default();
    let first = head.first().map_or(0, |(t, _)| *t);
    REPLAY_NOW_NANOS.store(first, Ordering::Relaxed);
    settings.recorder.clock = replay_wall_clock;
    let clock = Clock::Replay {
        times: Vec::new(),
        now: first,
    };
    let mut agent = Agent::start(settings, Arc::new(Metrics::default()), clock)?;
    let sweep_every = u64::try_from(SWEEP_INTERVAL.as_nanos()).unwrap_or(u64::MAX);
    let (mut last_sweep, mut last) = (first, first);
    let mut count = 0u64;
    // A capture that breaks off (truncated) is replayed up to the break and its
    // chain closed as usual; the error is returned after the drain.
    let mut broken = None;
    for batch in std::iter::once(Ok(head)).chain(batches) {
        let batch = match batch {
            Ok(batch) => batch,
            Err(err) => {
                broken = Some(err);
                break;
            }
        };
        for (t, packet) in batch {
            count += 1;
            let index = u32::try_from(count).context("more than 2^32 packets in one capture")?;
            agent.sink.clock.push_packet(t);
            agent.kernel.stamp_replay_packet(index)?;
            agent.kernel.test_run(kernel::Program::Xdp, &packet)?;
            for ev in agent.kernel.drain_events() {
                agent.on_event(ev)?;
            }
            if t.saturating_sub(last_sweep) >= sweep_every {
                agent.sweep()?;
                agent.tick()?;
                last_sweep = t;
            }
            last = t;
        }
    }
    for ev in agent.kernel.drain_events() {
        agent.on_event(ev)?;
    }
    // The capture is over: no later ACK can come, so the flows it closed (FIN from
    // both sides, RST) end as such in the final sweep, at the capture's last time;
    // the rest are forced.
    agent.sink.clock.set_now(last);
    agent.tracker.capture_over();
    agent.drain()?;
    match broken {
        Some(err) => Err(anyhow::Error::new(err).context(format!(
            "the capture breaks off after {count} packets (their records are written)"
        ))),
        None => Ok(count),
    }
}

/// The capture time a replay has reached (one replay per process), for the
/// recorder's clock: [`replay_wall_clock`].
static REPLAY_NOW_NANOS: AtomicU64 = AtomicU64::new(0);

fn replay_wall_clock() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_nanos(REPLAY_NOW_NANOS.load(Ordering::Relaxed))
}

/// Whose time the agent keeps.
#[derive(Clone, Debug)]
enum Clock {
    /// The machine's: CLOCK_BOOTTIME, as the kernel stamps, and the wall clock.
    Live,
    /// The capture's (`replay`): unix nanoseconds; kernel stamps carry the index
    /// (from 1) of the packet that wrote them, `times[index - 1]` is its time.
    Replay { times: Vec<u64>, now: u64 },
}

impl Clock {
    fn now_ns(&self) -> u64 {
        match self {
            Clock::Live => BootClock::boot_now_ns(),
            Clock::Replay { now, .. } => *now,
        }
    }

    /// `replay`: the next packet of the capture, captured at `t`: its stamp index
    /// is the number of packets so far, and the clock moves to it.
    fn push_packet(&mut self, t: u64) {
        if let Clock::Replay { times, .. } = self {
            times.push(t);
        }
        self.set_now(t);
    }

    fn set_now(&mut self, t: u64) {
        if let Clock::Replay { now, .. } = self {
            *now = t;
            REPLAY_NOW_NANOS.store(t, Ordering::Relaxed);
        }
    }

    /// Wall-clock time for the recorder's timer (checkpoints).
    fn wall_now(&self) -> SystemTime {
        match self {
            Clock::Live => SystemTime::now(),
            Clock::Replay { .. } => replay_wall_clock(),
        }
    }

    /// Turns this clock's nanoseconds into wall-clock time for records.
    fn boot_clock(&self) -> BootClock {
        match self {
            Clock::Live => BootClock::now(),
            Clock::Replay { .. } => BootClock::from_offset(0),
        }
    }

    /// The time a record is written at, if not now.
    fn record_time(&self) -> Option<i64> {
        match self {
            Clock::Live => None,
            Clock::Replay { now, .. } => i64::try_from(*now).ok(),
        }
    }

    /// A kernel flow value with its timestamps in this clock.
    fn stats(&self, mut s: FlowStats) -> FlowStats {
        if let Clock::Replay { times, .. } = self {
            let at = |stamp: u64| {
                let i = kernel::replay_stamp_index(stamp) as usize;
                if i == 0 {
                    stamp
                } else {
                    times.get(i - 1).copied().unwrap_or(stamp)
                }
            };
            s.first_seen_ns = at(s.first_seen_ns);
            s.last_seen_ns = at(s.last_seen_ns);
        }
        s
    }
}

impl Agent {
    /// Attaches to the interfaces with the live clock; runs packets through test
    /// runs (`replay`) with the capture's.
    fn start(settings: AgentSettings, metrics: Arc<Metrics>, clock: Clock) -> Result<Agent> {
        let policy = match &settings.conduits {
            Some(path) => {
                let map = ConduitMap::load(path, None).map_err(ConfigExit)?;
                tracing::info!(path = %path.display(), policy_hash = %hex::encode(map.policy_hash()), zones = map.zones.len(), endpoints = map.endpoints.len(), conduits = map.conduits.len(), "conduit map loaded");
                Some(map)
            }
            None => {
                tracing::warn!("no conduit map: every flow is recorded");
                None
            }
        };

        let (recorder, opened) = Recorder::open(settings.recorder.clone()).with_context(|| {
            format!(
                "opening the spool in {}",
                settings.recorder.spool_dir.display()
            )
        })?;
        tracing::info!(public_key = %hex::encode(recorder.public_key()), spool = %settings.recorder.spool_dir.display(), "recorder ready");

        let mut kernel = Kernel::load(&KernelOptions {
            flow_table_size: settings.flow_table_size,
            ringbuf_bytes: settings.ringbuf_bytes,
            enforce: settings.enforcement,
            record_all: settings.tracker.record_all,
            default_action: match policy.as_ref().map(|p| p.default_action) {
                Some(DefaultAction::Block) => sensor_common::action::BLOCK,
                _ => sensor_common::action::ALERT,
            },
            ..KernelOptions::default()
        })
        .context("loading the kernel programs (needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON; `conduit-sensor probe` shows what this process has)")?;
        let c = kernel.classifiers();
        tracing::info!(
            flow = kernel.flow_variant().name(),
            xdp_classifier = c.xdp.name(),
            tc_classifier = c.tc.name(),
            "kernel programs loaded"
        );
        let mut ifnames = HashMap::new();
        match clock {
            Clock::Live => {
                for iface in &settings.ifaces {
                    let info = kernel
                        .attach(iface)
                        .with_context(|| format!("attaching to {iface}"))?;
                    tracing::info!(iface, mode = ?info.xdp_mode, "attached");
                    metrics.attached(iface, info.xdp_mode);
                    ifnames.insert(info.ifindex, iface.clone());
                }
                kernel
                    .set_local_addrs(&local_addresses())
                    .context("local addresses")?;
            }
            Clock::Replay { .. } => {
                // BPF_PROG_TEST_RUN runs XDP as if the packet arrived on loopback.
                kernel.watch_ifindex(1)?;
                // The ring is read after every test run: nobody waits to be woken.
                kernel.set_ring_wakeups(false)?;
                ifnames.insert(1, "replay".to_string());
            }
        }

        let mut jsonl = settings
            .jsonl
            .as_deref()
            .and_then(|path| open_jsonl(path, &metrics));
        // A replay is bound by time: its JSON is encoded beside the test runs.
        if let (Clock::Replay { .. }, Some(JsonlOut::Inline(_))) = (&clock, &jsonl)
            && let Some(JsonlOut::Inline(out)) = jsonl.take()
        {
            jsonl = Some(JsonlOut::Thread(
                JsonlThread::spawn(out).context("starting the JSON-lines writer")?,
            ));
        }

        let site = policy.as_ref().map(|p| p.site.clone()).unwrap_or_default();
        let mut agent = Agent {
            tracker: FlowTracker::new(settings.tracker.clone(), policy.is_some()),
            sink: Sink {
                recorder,
                jsonl,
                jsonl_path: settings.jsonl.clone(),
                metrics: metrics.clone(),
                ifnames,
                site,
                clock,
                pending: Vec::with_capacity(GROUP_COMMIT),
                assets: crate::config::Assets::default(),
            },
            settings,
            kernel,
            policy: None,
            metrics,
            completion: Completion::new(),
            dns: DnsCache::new(DnsLimits::default()),
            reported_counters: [0; Counter::COUNT as usize],
            reported_unannounced: 0,
            reported_refused: 0,
            uplink: None,
        };
        agent.emit_appended(opened)?;
        agent.close_crashed_flows()?;
        if let Some(map) = policy {
            agent.install_policy(map, "startup")?;
        }
        agent.sink.flush()?;
        Ok(agent)
    }
}

impl Agent {
    /// Flows a previous run started and never ended (it crashed) get their
    /// `flow_end` now: lack of resources, last counts the spool has.
    fn close_crashed_flows(&mut self) -> Result<()> {
        let found = crate::crash_recovery::spool_flows(&self.settings.recorder.spool_dir)
            .context("reading the spool for flows a crash left open")?;
        self.tracker.continue_ids_after(found.max_flow_id);
        if found.open.is_empty() {
            return Ok(());
        }
        tracing::warn!(
            flows = found.open.len(),
            "closing flows the previous run left open (crash): flow_end, reason lack of resources"
        );
        for last in &found.open {
            self.metrics.flows_ended.fetch_add(1, Ordering::Relaxed);
            self.append(crate::crash_recovery::closing_record(last))?;
        }
        Ok(())
    }
}

/// A configuration error: `main` exits 64 for it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigExit(pub config::ConfigError);

impl Agent {
    async fn event_loop(&mut self) -> Result<()> {
        let ring = self
            .kernel
            .take_ring_buf()
            .context("the EVENTS ring buffer was already taken")?;
        // SAFETY: the RingBuf owns its map fd and is moved into the AsyncFd, which
        // keeps it open until the loop ends.
        let mut events = unsafe { AsyncFd::register(ring) }
            .map_err(|e| anyhow::anyhow!("registering the ring buffer fd: {e}"))?;
        let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
        let mut tick = tokio::time::interval(RECORDER_TICK);
        let mut hup = signal(SignalKind::hangup())?;
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let result: Result<()> = loop {
            let step: Result<()> = tokio::select! {
                guard = events.readable_mut() => match guard {
                    Ok(mut guard) => {
                        let batch = read_events(guard.get_inner_mut(), EVENT_BATCH);
                        // A full batch may leave events behind: stay ready.
                        if batch.len() < EVENT_BATCH {
                            guard.clear_ready();
                        }
                        batch.into_iter().try_for_each(|ev| self.on_event(ev))
                    }
                    Err(e) => Err(e.into()),
                },
                _ = sweep.tick() => self.sweep(),
                _ = tick.tick() => self.tick(),
                _ = hup.recv() => {
                    self.reload();
                    Ok(())
                }
                _ = term.recv() => break Ok(()),
                _ = int.recv() => break Ok(()),
            };
            // Group commit: what this step wrote goes to the spool in one write(2).
            if let Err(err) = step.and_then(|()| self.sink.flush()) {
                break Err(err);
            }
        };
        // Stopping or failing, the same path. Still attached (forwarding never
        // stops: the programs always pass), finish the classifications in flight;
        // then detach so the accounting can close, read the ring buffer to its end,
        // and drain.
        conduit_ops::notify::stopping();
        let mut failure = result.err();
        if let Some(err) = &failure {
            tracing::error!("event loop failed: {err:#}; draining");
            let detail = format!("{err:#}");
            if let Err(e) = self.write_loss("agent_error", 1, "event", "agent", &detail) {
                tracing::error!("recording the failure: {e:#}");
            }
        }
        if let Err(e) = self.finish_pending(&mut events).await {
            tracing::error!("finishing pending classifications: {e:#}");
            failure.get_or_insert(e);
        }
        self.kernel.detach_all();
        tracing::info!("detached; reading the ring buffer to its end");
        loop {
            let rest = read_events(events.get_mut(), EVENT_BATCH);
            if rest.is_empty() {
                break;
            }
            for ev in rest {
                if let Err(e) = self.on_event(ev) {
                    tracing::error!("draining the ring buffer: {e:#}");
                    failure.get_or_insert(e);
                }
            }
        }
        let drained = self.drain();
        match failure {
            Some(err) => Err(err),
            None => drained,
        }
    }

    /// While still attached, reads events until no ClientHello is left half
    /// reassembled (its next segments still pass through the programs), or until
    /// [`CLASSIFICATION_DEADLINE`].
    async fn finish_pending(
        &mut self,
        events: &mut AsyncFd<aya::maps::RingBuf<aya::maps::MapData>>,
    ) -> Result<()> {
        let deadline = tokio::time::Instant::now() + CLASSIFICATION_DEADLINE;
        tracing::info!(
            pending = self.completion.pending(),
            "stopping: finishing pending classifications before detaching"
        );
        loop {
            let batch = read_events(events.get_mut(), EVENT_BATCH);
            let more = !batch.is_empty();
            for ev in batch {
                self.on_event(ev)?;
            }
            if more {
                continue;
            }
            if self.completion.pending() == 0 {
                tracing::info!("no classification pending");
                return Ok(());
            }
            tokio::select! {
                guard = events.readable_mut() => {
                    let mut guard = guard?;
                    let batch = read_events(guard.get_inner_mut(), EVENT_BATCH);
                    if batch.len() < EVENT_BATCH {
                        guard.clear_ready();
                    }
                    for ev in batch {
                        self.on_event(ev)?;
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::warn!(
                        pending = self.completion.pending(),
                        "classifications still pending at the deadline; their flows keep the kernel's classification"
                    );
                    return Ok(());
                }
            }
        }
    }

    fn tick(&mut self) -> Result<()> {
        self.sink.flush()?;
        self.acknowledge_collector()?;
        let written = self.sink.recorder.tick(self.sink.clock.wall_now())?;
        self.emit_appended(written)
    }

    fn on_event(&mut self, ev: KernelEvent) -> Result<()> {
        let now = self.sink.clock.now_ns();
        match ev {
            KernelEvent::Flow(fe) => {
                if fe.header.kind == sensor_common::EVENT_FLOW_NEW {
                    let stats = self.sink.clock.stats(fe.stats);
                    self.tracker.on_new(fe.header.key, stats, now);
                    self.write_retired()?;
                }
            }
            // The responder's first payload of a TLS flow: what it negotiated.
            KernelEvent::Payload(pe) if usize::from(pe.header.direction) == DIR_REVERSE => {
                let copied = (pe.copied_len as usize).min(pe.data.len());
                let data = &pe.data[..copied];
                let key = pe.header.key;
                let negotiated = match self
                    .tracker
                    .classification(&key)
                    .and_then(|c| c.quic_initial.as_ref())
                {
                    // QUIC: the ServerHello is in the server's Initial.
                    Some((version, dcid)) => {
                        crate::tls::server_initial_crypto(data, *version, dcid)
                            .and_then(|hs| crate::tls::parse_server_hello_handshake(&hs))
                    }
                    None => crate::tls::parse_server_hello(data),
                };
                tracing::debug!(copied, ?negotiated, "responder first payload");
                self.completion.answered(&key);
                if let Some(n) = negotiated {
                    self.tracker.on_server_hello(&key, n);
                }
            }
            KernelEvent::Dns(pe) => self.on_dns(&pe),
            KernelEvent::Payload(pe) => {
                let key = pe.header.key;
                let hello_read = self.tracker.hello_read(&key);
                let completed = self.completion.push(&pe, hello_read, Instant::now());
                tracing::debug!(
                    seq = pe.tcp_seq,
                    len = pe.payload_len,
                    hello_read,
                    ?completed,
                    "client payload"
                );
                self.metrics
                    .client_hello_watch_refused
                    .store(self.completion.watch_refused(), Ordering::Relaxed);
                match completed {
                    Completed::Hello(info, proto) => self.classified(key, *info, proto)?,
                    Completed::Contested(names) => self.contested(key, names)?,
                    Completed::NeedMore | Completed::Ignored => {}
                    Completed::NotTls => self.finish_unclassified(key, None)?,
                    Completed::Malformed => {
                        self.finish_unclassified(key, Some(anomaly::MALFORMED_CLIENT_HELLO))?;
                    }
                    Completed::Limit => {
                        self.finish_unclassified(key, Some(anomaly::REASSEMBLY_LIMIT))?;
                        self.write_loss(
                            "reassembly_limit",
                            1,
                            "flow",
                            "agent",
                            "ClientHello reassembly memory bound reached; flow left unclassified",
                        )?;
                    }
                }
            }
        }
        Ok(())
    }

    /// A DNS response crossed the gateway: learn what it told its client (the side
    /// not on port 53; a resolver talking to a resolver teaches nothing here).
    fn on_dns(&mut self, pe: &sensor_common::PayloadEvent) {
        let k = &pe.header.key;
        let client = match (
            k.port_lo == sensor_common::DNS_PORT,
            k.port_hi == sensor_common::DNS_PORT,
        ) {
            (true, false) => crate::record::ip_of(k.family, &k.addr_hi),
            (false, true) => crate::record::ip_of(k.family, &k.addr_lo),
            _ => return,
        };
        let copied = (pe.copied_len as usize).min(pe.data.len());
        match crate::dns::parse_response(&pe.data[..copied]) {
            Ok(response) => {
                self.dns.learn(client, &response, self.sink.clock.now_ns());
                self.metrics
                    .dns_responses_learned
                    .fetch_add(1, Ordering::Relaxed);
            }
            Err(err) => {
                tracing::debug!(%client, copied, "DNS response not used: {err}");
                self.metrics
                    .dns_responses_unparsed
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        self.metrics
            .dns_cache_entries
            .store(self.dns.len() as u64, Ordering::Relaxed);
        self.metrics
            .dns_cache_evicted
            .store(self.dns.evicted(), Ordering::Relaxed);
    }

    /// The ClientHello is known: classify with the conduit map, write the result back
    /// into the kernel (so later packets are attributed and blocked flows dropped) and
    /// record `flow_start` at once.
    fn classified(&mut self, key: FlowKey, info: ClientHelloInfo, proto: AppProto) -> Result<()> {
        let Some(mut stats) = self.kernel.flow(&key)? else {
            return Ok(());
        };
        let mut class = Classification {
            app_protocol: Some(proto.as_str().to_string()),
            ja4: Some(info.ja4.clone()),
            tls_version: Some(info.tls_version.clone()),
            alpn: info.alpn.clone(),
            ech: info.ech,
            pq_offered: info.offers_post_quantum(),
            quic_initial: info.quic_initial.clone(),
            ..Classification::default()
        };
        // Two hellos at the same sequence numbers: the flow takes the more severe
        // verdict of their names (an ignored decoy must not lower it).
        let mut attributed = self.attribute(&key, &stats, proto, info.sni.as_deref());
        if info.conflicting_retransmission || !info.rival_server_names.is_empty() {
            class.anomalies.push(anomaly::CONFLICTING_RETRANSMISSION);
            self.metrics
                .client_hellos_contested
                .fetch_add(1, Ordering::Relaxed);
        }
        for rival in &info.rival_server_names {
            let other = self.attribute(&key, &stats, proto, Some(rival));
            attributed = attributed.or_more_severe(other, &mut class.conflicting_server_names);
        }
        attributed.apply(&mut class, &mut stats);
        if class.anomalies.contains(&anomaly::SNI_NOT_RESOLVED) {
            self.metrics
                .flows_sni_not_resolved
                .fetch_add(1, Ordering::Relaxed);
        }
        stats.sni_state = sni_state::DONE;
        stats.app_protocol = if proto == AppProto::Quic {
            app_protocol::QUIC
        } else {
            app_protocol::TLS
        };
        self.kernel
            .update_classification(&key, &class_update(&stats))?;
        self.count_verdict(class.verdict);
        let (stats, now) = (self.sink.clock.stats(stats), self.sink.clock.now_ns());
        let start = self.tracker.on_classified(key, stats, class, now);
        self.write_retired()?;
        if let Some(out) = start {
            self.write_flow(out)?;
        }
        Ok(())
    }

    /// The flow's parsed hello was sent again with other bytes after it was
    /// classified: flag it, and let the rival names raise the verdict (in the
    /// record and in the kernel, which keeps merging for a contested flow).
    fn contested(&mut self, key: FlowKey, names: Vec<String>) -> Result<()> {
        let Some(mut class) = self.tracker.classification(&key).cloned() else {
            return Ok(());
        };
        let Some(mut stats) = self.kernel.flow(&key)? else {
            return Ok(());
        };
        if !class
            .anomalies
            .contains(&anomaly::CONFLICTING_RETRANSMISSION)
        {
            class.anomalies.push(anomaly::CONFLICTING_RETRANSMISSION);
            self.metrics
                .client_hellos_contested
                .fetch_add(1, Ordering::Relaxed);
        }
        let proto = if key.protocol == 17 {
            AppProto::Quic
        } else {
            AppProto::Tls
        };
        let before = class.verdict;
        let mut attributed = Attributed::of(&class, &stats);
        for name in &names {
            let other = self.attribute(&key, &stats, proto, Some(name));
            attributed = attributed.or_more_severe(other, &mut class.conflicting_server_names);
        }
        attributed.apply(&mut class, &mut stats);
        if class.verdict != before {
            self.kernel
                .update_classification(&key, &class_update(&stats))?;
            self.count_verdict(class.verdict);
        }
        tracing::info!(
            flow = ?key,
            server_name = class.server_name.as_deref().unwrap_or(""),
            others = ?class.conflicting_server_names,
            "a second ClientHello at the same sequence numbers"
        );
        let start = self.tracker.on_contested(&key, class);
        self.write_retired()?;
        if let Some(out) = start {
            self.write_flow(out)?;
        }
        Ok(())
    }

    /// The flow's classification if its ClientHello named `sni`: by the SNI, else
    /// the name this client's DNS answers gave for the destination, else its
    /// address; and whether the name looks forged.
    fn attribute(
        &self,
        key: &FlowKey,
        stats: &FlowStats,
        proto: AppProto,
        sni: Option<&str>,
    ) -> Attributed {
        let ep = endpoints(key, stats);
        let now = self.sink.clock.now_ns();
        let sni = sni.filter(|s| !s.is_empty());
        let mut a = Attributed {
            server_name: sni.map(str::to_owned),
            zone: None,
            endpoint: None,
            attribution: None,
            conduit_id: None,
            policy_hash: Vec::new(),
            domain: None,
            ech_announced: false,
            sni_not_resolved: false,
            zone_index: stats.zone_id,
            endpoint_index: stats.endpoint_id,
            conduit_index: stats.conduit_id,
            kernel_verdict: sensor_common::Verdict::from_u8(stats.verdict),
        };
        // DNS: the name this client's answers gave for the destination, used when
        // the SNI names no endpoint (ECH outer name, none, an IP literal); and a
        // server name whose answers never gave this address may be forged.
        let (dns_name, dns_ech) = self
            .dns
            .name_for(ep.src, ep.dst, now)
            .map_or((None, false), |r| {
                (Some(r.name.to_owned()), r.ech_announced)
            });
        a.sni_not_resolved =
            sni.is_some_and(|name| self.dns.resolves(name, ep.dst, now) == Resolves::No);
        if let Some(map) = &self.policy {
            let vlan = (key.vlan != 0).then_some(key.vlan);
            let names = Names {
                sni,
                dns: dns_name.as_deref(),
            };
            let c = map.classify(
                ep.src,
                vlan,
                ep.dst,
                ep.dst_port,
                proto,
                names,
                self.settings.enforcement,
            );
            a.zone = c.zone.as_ref().map(|z| z.id.clone());
            a.endpoint = c.endpoint.as_ref().map(|e| e.id.clone());
            a.attribution = c.endpoint.as_ref().map(|e| e.by);
            a.conduit_id = c.conduit.as_ref().map(|c| c.id.clone());
            a.policy_hash = map.policy_hash().to_vec();
            a.zone_index = c.zone.as_ref().map_or(0, |z| z.index);
            a.endpoint_index = c.endpoint.as_ref().map_or(0, |e| e.index);
            a.conduit_index = c.conduit.as_ref().map_or(0, |c| c.index);
            a.kernel_verdict = c.verdict;
        }
        // The name the flow is attributed to: the SNI when it named the endpoint,
        // else what DNS said, else the SNI as sent.
        let by_dns = dns_name.is_some() && a.attribution != Some(Attribution::Sni);
        a.ech_announced = by_dns && dns_ech;
        a.domain = if by_dns {
            dns_name
        } else {
            sni.map(str::to_owned)
        };
        a
    }

    /// Not TLS/QUIC after all: tell the kernel to stop copying payload. The
    /// kernel's classification is final, so the flow_start can be written.
    fn finish_unclassified(&mut self, key: FlowKey, anomaly: Option<&'static str>) -> Result<()> {
        if let Some(s) = self.kernel.flow(&key)? {
            self.kernel.update_classification(&key, &class_update(&s))?;
            let s = self.sink.clock.stats(s);
            let start = self.tracker.on_unclassified(key, s, anomaly);
            self.write_retired()?;
            if let Some(out) = start {
                self.write_flow(out)?;
            }
        }
        Ok(())
    }

    /// The records of flows an event found replaced by a later incarnation of their
    /// five-tuple (counted with the next sweep).
    fn write_retired(&mut self) -> Result<()> {
        for out in self.tracker.take_retired() {
            self.write_flow(out)?;
        }
        Ok(())
    }

    /// What the collector has durably stored may leave the spool when space is needed.
    fn acknowledge_collector(&mut self) -> Result<()> {
        let Some(status) = &self.uplink else {
            return Ok(());
        };
        let s = status.borrow().clone();
        let m = &self.metrics;
        m.collector_connected.store(s.connected, Ordering::Relaxed);
        m.collector_acked_seq.store(s.acked_seq, Ordering::Relaxed);
        m.collector_lag_records.store(
            self.sink.recorder.head().0.saturating_sub(s.acked_seq),
            Ordering::Relaxed,
        );
        if let Some(acked) = conduit_uplink::read_acked(&self.settings.recorder.spool_dir)
            && acked > 0
        {
            self.sink.recorder.acknowledge(acked)?;
        }
        Ok(())
    }

    fn count_verdict(&self, v: Verdict) {
        let m = &self.metrics;
        match v {
            Verdict::Authorized => m.verdict_authorized.fetch_add(1, Ordering::Relaxed),
            Verdict::Violation => m.verdict_violation.fetch_add(1, Ordering::Relaxed),
            Verdict::Blocked => m.verdict_blocked.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
    }

    fn sweep(&mut self) -> Result<()> {
        self.sweep_table(false)
    }

    /// One walk over the kernel table. `last`: the drain's final walk, after which
    /// nothing is tracked any more, so unannounced flows the full tracker could not
    /// take are lost now (`tracker_full`).
    fn sweep_table(&mut self, last: bool) -> Result<()> {
        // ClientHellos that gave up are recorded first, so the walk ends their
        // flows like any other; the last walk gives up whatever is still pending.
        let expired = self.completion.expire(if last {
            Instant::now() + CLASSIFICATION_DEADLINE
        } else {
            Instant::now()
        });
        if !expired.is_empty() {
            self.write_loss(
                "reassembly_limit",
                expired.len() as u64,
                "classification",
                "agent",
                "ClientHello reassembly gave up (time or memory bound); the flows are recorded with conduit.anomalies client_hello_incomplete",
            )?;
        }
        for key in expired {
            self.finish_unclassified(key, Some(anomaly::CLIENT_HELLO_INCOMPLETE))?;
        }
        let now = self.sink.clock.now_ns();
        // Counters before the table: every flow the kernel counted as unannounced
        // by now is in this snapshot unless it is gone (see `report_unannounced`).
        let counters = self.kernel.counters()?;
        let policy = self.policy.as_ref();
        let resolve = |_: &FlowKey, s: &FlowStats| kernel_classification(policy, s);
        let (tracker, sink) = (&mut self.tracker, &mut self.sink);
        let mut sweep = tracker.begin_sweep(now);
        // Records are written as the walk goes: a burst's flow_starts are not held.
        let mut written: Result<()> = Ok(());
        self.kernel.for_each_flow(|k, s| {
            let s = sink.clock.stats(s);
            tracker.sweep_entry(&mut sweep, &k, &s, &resolve);
            for out in sweep.out.drain(..) {
                if written.is_ok() {
                    written = sink.write_flow(out);
                }
            }
        })?;
        written?;
        tracker.end_sweep(&mut sweep);
        for key in &sweep.remove {
            self.kernel.remove_flow(key)?;
        }
        let m = &self.metrics;
        m.flows_unrecorded
            .fetch_add(sweep.unrecorded_ended, Ordering::Relaxed);
        m.flows_evicted.fetch_add(sweep.evicted, Ordering::Relaxed);
        m.flows_active
            .store(self.tracker.len() as u64, Ordering::Relaxed);
        for out in sweep.out {
            self.write_flow(out)?;
        }
        if sweep.evicted > 0 {
            // Not lost flows: each has its flow_end (lack of resources).
            self.write_loss(
                "flow_table_eviction",
                sweep.evicted,
                "incomplete_flow",
                "kernel",
                "recorded flows evicted from the kernel flow table before they ended; their flow_end carries the last counts seen, later packets are not counted",
            )?;
        }
        if last {
            // Nothing is tracked after the last walk: the flows the full tracker
            // could not take have no record.
            self.tracker.refuse(sweep.unannounced_pending);
        }
        self.report_refused()?;
        self.report_kernel_counters(&counters, sweep.unannounced_pending)
    }

    /// Flows the tracker refused (full) have no record: loss in flow units.
    fn report_refused(&mut self) -> Result<()> {
        let refused = self.tracker.refused();
        if refused > self.reported_refused {
            let delta = refused - self.reported_refused;
            self.reported_refused = refused;
            self.write_loss(
                "tracker_full",
                delta,
                "flow",
                "agent",
                "new flows not tracked: the agent's flow tracker was at its bound (capacity.tracked_flows)",
            )?;
        }
        Ok(())
    }

    /// Kernel loss counters that grew become signed `loss` records.
    fn report_kernel_counters(
        &mut self,
        counters: &[u64; Counter::COUNT as usize],
        unannounced_pending: u64,
    ) -> Result<()> {
        for c in Counter::ALL {
            let i = c as usize;
            self.metrics.kernel[i].store(counters[i], Ordering::Relaxed);
            let delta = counters[i].saturating_sub(self.reported_counters[i]);
            if delta > 0 && c.is_loss() && c != Counter::LossNewFlowEvent {
                self.write_loss(c.name(), delta, c.loss_unit(), "kernel", "")?;
            }
        }
        self.reported_counters = *counters;
        self.report_unannounced(
            counters[Counter::LossNewFlowEvent as usize],
            unannounced_pending,
        )
    }

    /// Flows whose announcement the kernel lost and that no sweep found before they
    /// left the table have no record. `announced_lost` was read before the table
    /// snapshot the tracker just swept, so each such flow is by now recovered, gone,
    /// or `pending` (in the table, but the tracker was full): `announced_lost -
    /// recovered - pending` never exceeds the flows without a record, and equals
    /// those that left the table once the last sweep has run (its pending ones are
    /// counted as `tracker_full`).
    fn report_unannounced(&mut self, announced_lost: u64, pending: u64) -> Result<()> {
        let lost = announced_lost.saturating_sub(self.tracker.recovered() + pending);
        if lost > self.reported_unannounced {
            let delta = lost - self.reported_unannounced;
            self.reported_unannounced = lost;
            self.write_loss(
                Counter::LossNewFlowEvent.name(),
                delta,
                "flow",
                "kernel",
                "new flows whose announcement was lost (ring buffer full) and that left the flow table before a sweep found them",
            )?;
        }
        Ok(())
    }

    /// SIGHUP: the conduit map, and the JSONL side file is reopened (rotation, or
    /// after a write error). systemd hears RELOADING=1, then READY=1 with a STATUS=
    /// that says whether the map was applied.
    fn reload(&mut self) {
        conduit_ops::notify::reloading();
        if let Some(path) = self.settings.jsonl.clone() {
            if let Some(mut old) = self.sink.jsonl.take() {
                let _ = old.finish();
            }
            self.sink.jsonl = open_jsonl(&path, &self.metrics);
        }
        let applied = self.reload_map();
        // What `conduit-sensor reload` (ExecReload=) waits for.
        crate::reload::record(
            applied,
            if applied {
                "conduit map applied"
            } else {
                "conduit map rejected (its errors are in the journal)"
            },
        );
        let status = self.status_line(if applied {
            "running; reload applied"
        } else {
            "running; RELOAD FAILED, the previous conduit map stays in force"
        });
        conduit_ops::notify::reloaded(&status);
    }

    /// One line for `systemctl status`: state, policy hash, chain head.
    fn status_line(&self, state: &str) -> String {
        let policy = self
            .policy
            .as_ref()
            .map(|m| hex::encode(&m.policy_hash()[..8]))
            .unwrap_or_else(|| "none".into());
        format!(
            "{state}; policy {policy}; seq {}",
            self.sink.recorder.head().0
        )
    }

    /// Whether a new map was installed.
    fn reload_map(&mut self) -> bool {
        let Some(path) = self.settings.conduits.clone() else {
            tracing::warn!("SIGHUP: no conduit map configured; nothing to reload");
            return true;
        };
        match ConduitMap::load(&path, None) {
            Ok(map) => {
                tracing::info!(path = %path.display(), policy_hash = %hex::encode(map.policy_hash()), "conduit map reloaded");
                if let Err(err) = self.install_policy(map, "reload") {
                    self.metrics
                        .policy_reload_failures
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::error!("reload: {err:#}; the previous map stays in force");
                    false
                } else {
                    self.metrics.policy_reloads.fetch_add(1, Ordering::Relaxed);
                    true
                }
            }
            Err(err) => {
                self.metrics
                    .policy_reload_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::error!("reload rejected, the previous map stays in force:\n{err}");
                false
            }
        }
    }

    fn install_policy(&mut self, map: ConduitMap, trigger: &str) -> Result<()> {
        self.kernel
            .install_policy(&kernel_policy(&map, self.settings.enforcement)?)
            .context("installing the conduit map into the kernel")?;
        self.sink.site = map.site.clone();
        self.sink.assets = map.assets.clone();
        let record = policy_change_record(&map, self.settings.enforcement, trigger);
        self.policy = Some(map);
        self.tracker.set_policy_loaded(true);
        self.append(record)
    }

    fn write_flow(&mut self, out: FlowOut) -> Result<()> {
        self.sink.write_flow(out)
    }

    fn write_loss(
        &mut self,
        reason: &str,
        count: u64,
        unit: &str,
        origin: &str,
        detail: &str,
    ) -> Result<()> {
        self.sink.write_loss(reason, count, unit, origin, detail)
    }

    fn append(&mut self, record: Record) -> Result<()> {
        self.sink.append(record)
    }

    fn emit_appended(&mut self, written: Vec<Appended>) -> Result<()> {
        self.sink.emit_appended(written)
    }

    /// SIGTERM: final sweep, forced end of every recorded flow, final loss report,
    /// fsync, detach.
    fn drain(&mut self) -> Result<()> {
        tracing::info!("draining");
        self.metrics.ready.store(false, Ordering::Relaxed);
        // The final sweep also makes the final loss report: its counters were read
        // before its table snapshot, which closes the accounting.
        self.sweep_table(true)?;
        let (tracker, clock) = (&mut self.tracker, &self.sink.clock);
        self.kernel
            .for_each_flow(|k, s| tracker.update_stats(&k, &clock.stats(s)))?;
        let (flows, unrecorded) = self.tracker.drain_all();
        self.metrics
            .flows_unrecorded
            .fetch_add(unrecorded, Ordering::Relaxed);
        for flow in flows {
            for out in flow.close() {
                self.write_flow(out)?;
            }
        }
        self.sink.flush()?;
        let last = self.sink.recorder.checkpoint_now()?;
        self.emit_appended(last)?;
        self.sink.recorder.sync()?;
        if let Some(out) = &mut self.sink.jsonl
            && let Err(err) = out.finish()
        {
            self.metrics.jsonl_errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!("JSONL side file: {err}");
        }
        self.kernel.detach_all();
        Ok(())
    }
}

/// Where records go: the chain (spool) and its JSON-lines mirror. Apart from the
/// rest of the agent so a table walk can write records as it goes.
struct Sink {
    recorder: Recorder,
    jsonl: Option<JsonlOut>,
    jsonl_path: Option<PathBuf>,
    metrics: Arc<Metrics>,
    ifnames: HashMap<u32, String>,
    site: String,
    clock: Clock,
    /// Records of the current step, chained and stored together by [`Sink::flush`].
    pending: Vec<Record>,
    /// The map's devices, which name a flow's initiator (`host.id`, `host.name`).
    assets: crate::config::Assets,
}

/// A step that writes more records (a sweep ending many flows) stores them in groups.
const GROUP_COMMIT: usize = conduit_evidence::chain::GROUP_COMMIT_RECORDS;

impl Sink {
    fn write_flow(&mut self, out: FlowOut) -> Result<()> {
        let m = &self.metrics;
        match out.kind {
            RecordKind::FlowStart => m.flows_started.fetch_add(1, Ordering::Relaxed),
            RecordKind::FlowEnd => m.flows_ended.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
        let ifname = self
            .ifnames
            .get(&out.stats.ifindex)
            .cloned()
            .unwrap_or_default();
        let mut record = flow_record(&out, &self.clock.boot_clock(), &ifname);
        if let Some(Body::Flow(flow)) = &mut record.body {
            self.name_the_device(flow, &out);
        }
        self.append(record)
    }

    /// The asset that initiated the flow, by Ethernet then IP address; a flow from a
    /// zone that admits only listed assets and matches none is flagged.
    fn name_the_device(&self, flow: &mut conduit_proto::v1::Flow, out: &FlowOut) {
        if self.assets.is_empty() {
            return;
        }
        let src = crate::record::endpoints(&out.key, &out.stats).src;
        match self.assets.identify(&flow.source_mac, src) {
            Some(asset) => {
                flow.host_id.clone_from(&asset.id);
                flow.host_name = asset.name.clone().unwrap_or_default();
            }
            None => {
                if out
                    .class
                    .zone
                    .as_deref()
                    .is_some_and(|z| self.assets.required_in(z))
                {
                    flow.anomalies.push(anomaly::UNKNOWN_ASSET.to_owned());
                    self.metrics
                        .flows_unknown_asset
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    fn write_loss(
        &mut self,
        reason: &str,
        count: u64,
        unit: &str,
        origin: &str,
        detail: &str,
    ) -> Result<()> {
        tracing::warn!(reason, count, origin, "loss");
        self.metrics.count_loss(reason, unit, origin, count);
        self.append(Record {
            kind: RecordKind::Loss as i32,
            body: Some(Body::Loss(Loss {
                reason: reason.to_string(),
                count,
                unit: unit.to_string(),
                origin: origin.to_string(),
                detail: detail.to_string(),
            })),
            ..Record::default()
        })
    }

    fn append(&mut self, mut record: Record) -> Result<()> {
        if record.site.is_empty() {
            record.site = self.site.clone();
        }
        if let Some(t) = self.clock.record_time() {
            record.time_unix_nano = t;
        }
        self.pending.push(record);
        if self.pending.len() >= GROUP_COMMIT {
            self.flush()?;
        }
        Ok(())
    }

    /// Chains, signs and stores the step's records (group commit): one `write(2)`
    /// for the lot, with the checkpoints that come due among them.
    fn flush(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let records = std::mem::replace(&mut self.pending, Vec::with_capacity(GROUP_COMMIT));
        let written = self.recorder.append_batch(records)?;
        self.emit_appended(written)
    }

    /// Mirrors chained records to the JSON-lines file and metrics.
    fn emit_appended(&mut self, written: Vec<Appended>) -> Result<()> {
        if written.is_empty() {
            return Ok(());
        }
        self.metrics
            .records_written
            .fetch_add(written.len() as u64, Ordering::Relaxed);
        if let Some(last) = written.last() {
            self.metrics.chain_seq.store(last.seq, Ordering::Relaxed);
        }
        let stats = self.recorder.stats();
        self.metrics
            .spool_bytes
            .store(stats.bytes, Ordering::Relaxed);
        if let Some(out) = &mut self.jsonl
            && let Err(err) = out.write(written)
        {
            // The spool is the evidence; the side file is a convenience. A full
            // disk here must not stop the recorder: count, log, and drop the file
            // until SIGHUP reopens it.
            self.metrics.jsonl_errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                path = %self.jsonl_path.as_deref().unwrap_or(std::path::Path::new("")).display(),
                "JSONL side file: {err}; records stay in the spool; the file is reopened on SIGHUP"
            );
            self.jsonl = None;
        }
        Ok(())
    }
}

/// Most ring-buffer events handled per wake-up: the batch stays small, and the
/// other timers get their turn under a burst.
const EVENT_BATCH: usize = 1024;

/// Up to `max` events waiting in the ring buffer.
fn read_events(ring: &mut aya::maps::RingBuf<aya::maps::MapData>, max: usize) -> Vec<KernelEvent> {
    let mut batch = Vec::with_capacity(max.min(EVENT_BATCH));
    while batch.len() < max
        && let Some(item) = ring.next()
    {
        if let Some(ev) = KernelEvent::decode(&item) {
            batch.push(ev);
        }
    }
    batch
}

/// Peak resident set size of this process in KiB (VmHWM), if readable.
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Opens the JSONL side file for appending; a failure is counted and logged, not
/// fatal (the spool holds the records).
fn open_jsonl(path: &std::path::Path, metrics: &Metrics) -> Option<JsonlOut> {
    match OpenOptions::new().create(true).append(true).open(path) {
        Ok(file) => Some(JsonlOut::Inline(BufWriter::new(file))),
        Err(err) => {
            metrics.jsonl_errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(path = %path.display(), "JSONL side file: {err}; records stay in the spool; retried on SIGHUP");
            None
        }
    }
}

/// The classification fields of a flow, for the kernel to merge (it sets DONE).
/// A flow's classification by one ClientHello's name ([`Agent::attribute`]).
#[derive(Debug)]
struct Attributed {
    server_name: Option<String>,
    zone: Option<String>,
    endpoint: Option<String>,
    attribution: Option<Attribution>,
    conduit_id: Option<String>,
    policy_hash: Vec<u8>,
    domain: Option<String>,
    ech_announced: bool,
    sni_not_resolved: bool,
    /// The kernel's ids and verdict for the same.
    zone_index: u16,
    endpoint_index: u16,
    conduit_index: u16,
    kernel_verdict: sensor_common::Verdict,
}

impl Attributed {
    /// What `class` (and the kernel's `stats`) already hold.
    fn of(class: &Classification, stats: &FlowStats) -> Self {
        Attributed {
            server_name: class.server_name.clone(),
            zone: class.zone.clone(),
            endpoint: class.endpoint.clone(),
            attribution: class.attribution,
            conduit_id: class.conduit_id.clone(),
            policy_hash: class.policy_hash.clone(),
            domain: class.domain.clone(),
            ech_announced: class.ech_announced,
            sni_not_resolved: class.anomalies.contains(&anomaly::SNI_NOT_RESOLVED),
            zone_index: stats.zone_id,
            endpoint_index: stats.endpoint_id,
            conduit_index: stats.conduit_id,
            kernel_verdict: match class.verdict {
                Verdict::Authorized => sensor_common::Verdict::Authorized,
                Verdict::Violation => sensor_common::Verdict::Violation,
                Verdict::Blocked => sensor_common::Verdict::Blocked,
                Verdict::Unspecified | Verdict::Unclassified => {
                    sensor_common::Verdict::Unclassified
                }
            },
        }
    }

    /// The more severe of the two (`self` on a tie); the other's server name is
    /// added to `others`.
    fn or_more_severe(self, other: Attributed, others: &mut Vec<String>) -> Attributed {
        let (kept, dropped) = if (other.kernel_verdict as u8) > (self.kernel_verdict as u8) {
            (other, self)
        } else {
            (self, other)
        };
        if let Some(name) = dropped.server_name
            && kept.server_name.as_ref() != Some(&name)
            && !others.contains(&name)
        {
            others.push(name);
        }
        kept
    }

    fn apply(self, class: &mut Classification, stats: &mut FlowStats) {
        if let Some(name) = &self.server_name {
            stats.sni_hash = sensor_common::sni_hash(name.as_bytes());
        }
        class.server_name = self.server_name;
        class.zone = self.zone;
        class.endpoint = self.endpoint;
        class.attribution = self.attribution;
        class.conduit_id = self.conduit_id;
        class.policy_hash = self.policy_hash;
        class.domain = self.domain;
        class.ech_announced = self.ech_announced;
        class.verdict = proto_verdict(self.kernel_verdict);
        class.anomalies.retain(|a| *a != anomaly::SNI_NOT_RESOLVED);
        if self.sni_not_resolved {
            class.anomalies.push(anomaly::SNI_NOT_RESOLVED);
        }
        stats.zone_id = self.zone_index;
        stats.endpoint_id = self.endpoint_index;
        stats.conduit_id = self.conduit_index;
        stats.verdict = self.kernel_verdict as u8;
    }
}

fn class_update(s: &FlowStats) -> ClassUpdate {
    ClassUpdate {
        sni_hash: s.sni_hash,
        zone_id: s.zone_id,
        endpoint_id: s.endpoint_id,
        conduit_id: s.conduit_id,
        verdict: s.verdict,
        app_protocol: s.app_protocol,
    }
}

/// The record's verdict for the shared verdict type.
fn proto_verdict(v: sensor_common::Verdict) -> Verdict {
    match v {
        sensor_common::Verdict::Unclassified => Verdict::Unclassified,
        sensor_common::Verdict::Authorized => Verdict::Authorized,
        sensor_common::Verdict::Violation => Verdict::Violation,
        sensor_common::Verdict::Blocked => Verdict::Blocked,
    }
}

/// Names for a classification the kernel made on its own (ids in `FlowStats`).
fn kernel_classification(policy: Option<&ConduitMap>, s: &FlowStats) -> Option<Classification> {
    let map = policy?;
    if s.verdict == verdict::UNCLASSIFIED {
        return None;
    }
    Some(Classification {
        app_protocol: match s.app_protocol {
            app_protocol::TLS => Some("tls".into()),
            app_protocol::QUIC => Some("quic".into()),
            _ => None,
        },
        zone: map.zone_by_index(s.zone_id).map(|z| z.id.clone()),
        endpoint: map.endpoint_by_index(s.endpoint_id).map(|e| e.id.clone()),
        // The kernel matched by the SNI's hash when it had one, else by address.
        attribution: Some(if s.sni_hash != 0 {
            Attribution::Sni
        } else {
            Attribution::Address
        }),
        conduit_id: map.conduit_by_index(s.conduit_id).map(|c| c.id.clone()),
        verdict: proto_verdict(sensor_common::Verdict::from_u8(s.verdict)),
        policy_hash: map.policy_hash().to_vec(),
        ..Classification::default()
    })
}

/// The gateway's own addresses: packets to them are NAT return traffic or local.
fn local_addresses() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addrs
        .filter_map(|a| a.address)
        .filter_map(|sa| {
            if let Some(v4) = sa.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                sa.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect()
}
