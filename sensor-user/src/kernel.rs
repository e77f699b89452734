//! Loader and map access for the kernel programs (`sensor-ebpf`).
//!
//! [`Kernel`] owns the loaded object: it attaches XDP (ingress) and TC (egress) to
//! interfaces, fills the configuration maps, reads the flow table and counters, and
//! runs the programs on crafted packets with `BPF_PROG_TEST_RUN` for tests,
//! benchmarks and `replay`.
//!
//! Needs CAP_BPF + CAP_NET_ADMIN (CAP_PERFMON for the direct packet access the
//! programs use when unprivileged BPF is restricted).

use std::{
    net::IpAddr,
    time::{Duration, SystemTime},
};

use crate::mapped_config::MappedConfig;
use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray, ProgramArray, RingBuf,
        lpm_trie::Key,
    },
    programs::{
        ProgramError, SchedClassifier, TcAttachType, TestRun, TestRunOptions, Xdp, XdpMode,
        tc::{self, SchedClassifierLinkId},
        xdp::XdpLinkId,
    },
};
use sensor_common::{
    ClassUpdate, ConduitKey, ConduitValue, Counter, EVENT_DNS, EVENT_FLOW_NEW, EVENT_PAYLOAD,
    FAMILY_IPV4, FAMILY_IPV6, FlowEvent, FlowKey, FlowStats, KernelConfig, LocalAddr, LpmV4, LpmV6,
    POLICY_GEN_BITS, PayloadEvent, PolicyKey, SniKey, ZONE_KEY_VLAN_BITS, ZoneKeyV4, ZoneKeyV6,
};

/// Program names in the object.
const PROG_XDP: &str = "conduit_xdp";
const PROG_TC: &str = "conduit_tc";
const PROG_XDP_510: &str = "conduit_xdp_510";
const PROG_TC_510: &str = "conduit_tc_510";
const PROG_XDP_CLASSIFY: &str = "conduit_xdp_classify";
const PROG_TC_CLASSIFY: &str = "conduit_tc_classify";
const PROG_XDP_CLASSIFY_BOUNDED: &str = "conduit_xdp_classify_bounded";
const PROG_TC_CLASSIFY_BOUNDED: &str = "conduit_tc_classify_bounded";
const PROG_BENCH_EMPTY: &str = "bench_empty";
const PROG_BENCH_LRU: &str = "bench_lru";
const PROG_BENCH_LRU_FLOWKEY: &str = "bench_lru_flowkey";

/// Map names in the object.
pub mod map_names {
    pub const FLOWS: &str = "FLOWS";
    pub const EVENTS: &str = "EVENTS";
    pub const COUNTERS: &str = "COUNTERS";
    pub const WATCHED_IFACES: &str = "WATCHED_IFACES";
    pub const LOCAL_ADDRS: &str = "LOCAL_ADDRS";
    pub const CONFIG: &str = "CONFIG";
    pub const ZONES_V4: &str = "ZONES_V4";
    pub const ZONES_V6: &str = "ZONES_V6";
    pub const ENDPOINT_NETS_V4: &str = "ENDPOINT_NETS_V4";
    pub const ENDPOINT_NETS_V6: &str = "ENDPOINT_NETS_V6";
    pub const SNI_EXACT: &str = "SNI_EXACT";
    pub const SNI_SUFFIX: &str = "SNI_SUFFIX";
    pub const CONDUITS: &str = "CONDUITS";
    pub const CLASS_UPDATES: &str = "CLASS_UPDATES";
    pub const JUMP_XDP: &str = "JUMP_XDP";
    pub const JUMP_TC: &str = "JUMP_TC";
}

/// Errors of the kernel loader.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// This binary was built with `AYA_BUILD_SKIP=1`: it carries no kernel programs.
    #[error(
        "this binary was built without its kernel programs (AYA_BUILD_SKIP=1); rebuild without it"
    )]
    NotBuilt,
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("the eBPF object has no {0}")]
    Missing(&'static str),
    #[error("interface {name}: {source}")]
    Interface {
        name: String,
        #[source]
        source: nix::Error,
    },
    #[error("attaching XDP to {name}: native and generic mode both failed: {source}")]
    XdpAttach {
        name: String,
        #[source]
        source: ProgramError,
    },
    #[error("map {0}: injected failure (test hook, `inject_policy_write_failure`)")]
    Injected(&'static str),
    #[error("adding clsact qdisc to {name}: {source}")]
    Clsact {
        name: String,
        #[source]
        source: tc::TcError,
    },
}

pub type Result<T, E = KernelError> = std::result::Result<T, E>;

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> KernelError {
    move |source| KernelError::Map { name, source }
}

fn prog_err(name: &'static str) -> impl FnOnce(ProgramError) -> KernelError {
    move |source| KernelError::Program { name, source }
}

/// Whether a map error means "no such key" (aya reports a delete of a missing key
/// as the syscall's ENOENT, a lookup as `KeyNotFound`).
fn is_not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(err) => err.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

/// Load-time options.
#[derive(Clone, Debug)]
pub struct KernelOptions {
    /// Capacity of the flow table (entries).
    pub flow_table_size: u32,
    /// Size of the event ring buffer (bytes; a power of two, page multiple).
    pub ringbuf_bytes: u32,
    /// Drop later forward packets of flows with a `blocked` verdict.
    pub enforce: bool,
    /// The agent records every flow, not only AI traffic.
    pub record_all: bool,
    /// [`sensor_common::action`] for AI traffic no conduit allows.
    pub default_action: u8,
    /// The best flow-program variant to try (tests force [`FlowVariant::Legacy`]
    /// to check it on new kernels); worse ones are tried when it is rejected.
    pub best_flow: FlowVariant,
    /// The same for the payload classifiers.
    pub best_classifier: ClassifierVariant,
}

impl Default for KernelOptions {
    fn default() -> Self {
        KernelOptions {
            flow_table_size: sensor_common::FLOW_TABLE_SIZE,
            ringbuf_bytes: sensor_common::EVENTS_RINGBUF_BYTES,
            enforce: false,
            record_all: false,
            default_action: sensor_common::action::ALERT,
            best_flow: FlowVariant::Current,
            best_classifier: ClassifierVariant::Helpers,
        }
    }
}

/// XDP attach mode that was used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpAttachMode {
    /// Native (driver) mode.
    Driver,
    /// Generic (skb) mode: slower, used when the driver has no XDP support.
    Skb,
}

/// The flow programs (`conduit_xdp`, `conduit_tc`) loaded: the first variant the
/// verifier accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowVariant {
    /// Atomic OR (5.12) for the TCP flags and the coarse clock (5.11).
    Current,
    /// `conduit_xdp_510` / `conduit_tc_510`: a plain read-modify-write for the TCP
    /// flags (a flag of a packet handled on another CPU at the same instant can be
    /// lost; a lost FIN or RST ends the flow at the idle timeout) and
    /// the fine monotonic clock (some 50 ns more per packet) plus the same offset.
    Legacy,
}

impl FlowVariant {
    /// Short name, as `probe` prints it.
    pub fn name(self) -> &'static str {
        match self {
            FlowVariant::Current => "current",
            FlowVariant::Legacy => "legacy",
        }
    }

    const fn programs(self) -> (&'static str, &'static str) {
        match self {
            FlowVariant::Current => (PROG_XDP, PROG_TC),
            FlowVariant::Legacy => (PROG_XDP_510, PROG_TC_510),
        }
    }
}

/// The payload (TLS ClientHello / QUIC Initial) classifier a hook runs: the first
/// of these the kernel's verifier accepts. Decided by loading, never by version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClassifierVariant {
    /// `bpf_loop` (5.17) and, for XDP, `bpf_xdp_load_bytes` (5.18): the copy also
    /// reads XDP fragments (multi-buffer frames).
    Helpers,
    /// Bounded loops; XDP copies by direct packet access, so only the frame's
    /// linear area (all of it except for multi-buffer XDP). Same classification.
    Bounded,
    /// No classifier loaded: flows are classified by address only (no SNI, no QUIC).
    None,
}

impl ClassifierVariant {
    /// Short name, as `probe` prints it.
    pub fn name(self) -> &'static str {
        match self {
            ClassifierVariant::Helpers => "helpers",
            ClassifierVariant::Bounded => "bounded",
            ClassifierVariant::None => "none",
        }
    }
}

/// Which payload classifiers [`Kernel::load`] loaded, and why better ones failed.
#[derive(Clone, Debug)]
pub struct Classifiers {
    /// Tail-called from `conduit_xdp` (ingress).
    pub xdp: ClassifierVariant,
    /// Tail-called from `conduit_tc` (egress).
    pub tc: ClassifierVariant,
    /// (program, error with the end of the verifier log) for each variant rejected.
    pub rejected: Vec<(&'static str, String)>,
}

impl Classifiers {
    /// Whether both hooks classify TLS and QUIC payloads.
    pub fn complete(&self) -> bool {
        self.xdp != ClassifierVariant::None && self.tc != ClassifierVariant::None
    }
}

/// What [`Kernel::attach`] did.
#[derive(Clone, Debug)]
pub struct AttachInfo {
    pub ifname: String,
    pub ifindex: u32,
    pub xdp_mode: XdpAttachMode,
}

/// Which program [`Kernel::test_run`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Program {
    /// `conduit_xdp` (ingress).
    Xdp,
    /// `conduit_tc` (egress).
    Tc,
    /// Benchmark baseline: returns XDP_PASS.
    BenchEmpty,
    /// Benchmark baseline: one LRU lookup + update (8-byte key).
    BenchLru,
    /// Benchmark baseline: one LRU lookup + update with a 40-byte `FlowKey`.
    BenchLruFlowKey,
}

impl Program {
    const fn name(self) -> &'static str {
        match self {
            Program::Xdp => PROG_XDP,
            Program::Tc => PROG_TC,
            Program::BenchEmpty => PROG_BENCH_EMPTY,
            Program::BenchLru => PROG_BENCH_LRU,
            Program::BenchLruFlowKey => PROG_BENCH_LRU_FLOWKEY,
        }
    }
}

/// A decoded ring-buffer event.
#[derive(Clone, Debug)]
pub enum KernelEvent {
    /// `EVENT_FLOW_NEW`.
    Flow(FlowEvent),
    /// `EVENT_PAYLOAD`.
    Payload(Box<PayloadEvent>),
    /// `EVENT_DNS`: a DNS response as it crossed the gateway.
    Dns(Box<PayloadEvent>),
}

impl KernelEvent {
    /// Decodes one ring-buffer record; `None` for unknown kinds or short records.
    pub fn decode(bytes: &[u8]) -> Option<KernelEvent> {
        match *bytes.first()? {
            EVENT_FLOW_NEW => {
                if bytes.len() < size_of::<FlowEvent>() {
                    return None;
                }
                // SAFETY: length checked; FlowEvent is repr(C) plain data, any bit
                // pattern is valid.
                Some(KernelEvent::Flow(unsafe {
                    bytes.as_ptr().cast::<FlowEvent>().read_unaligned()
                }))
            }
            kind @ (EVENT_PAYLOAD | EVENT_DNS) => {
                if bytes.len() < size_of::<PayloadEvent>() {
                    return None;
                }
                // SAFETY: as above.
                let ev =
                    Box::new(unsafe { bytes.as_ptr().cast::<PayloadEvent>().read_unaligned() });
                Some(if kind == EVENT_DNS {
                    KernelEvent::Dns(ev)
                } else {
                    KernelEvent::Payload(ev)
                })
            }
            _ => None,
        }
    }
}

/// Converts the kernel's boot-clock timestamps (`FlowStats::first_seen_ns`,
/// `last_seen_ns`, `EventHeader::ts_ns`) to wall-clock time.
#[derive(Clone, Copy, Debug)]
pub struct BootClock {
    /// CLOCK_REALTIME - CLOCK_BOOTTIME, in ns, sampled at construction.
    offset_ns: i128,
}

impl BootClock {
    /// Samples the offset between the boot clock and the wall clock now. Re-create it
    /// after wall-clock steps (NTP) to stay accurate.
    pub fn now() -> BootClock {
        let boot = clock_ns(libc::CLOCK_BOOTTIME);
        let real = clock_ns(libc::CLOCK_REALTIME);
        BootClock {
            offset_ns: real - boot,
        }
    }

    /// Wall-clock time of a boot-clock timestamp.
    pub fn to_system_time(&self, boot_ns: u64) -> SystemTime {
        let ns = boot_ns as i128 + self.offset_ns;
        if ns >= 0 {
            SystemTime::UNIX_EPOCH + Duration::from_nanos(ns as u64)
        } else {
            SystemTime::UNIX_EPOCH
        }
    }

    /// A clock with a given CLOCK_REALTIME - CLOCK_BOOTTIME offset (tests, replays).
    pub fn from_offset(offset_ns: i128) -> BootClock {
        BootClock { offset_ns }
    }

    /// Unix nanoseconds of a boot-clock timestamp.
    pub fn unix_nanos(&self, boot_ns: u64) -> i64 {
        i64::try_from(boot_ns as i128 + self.offset_ns).unwrap_or(i64::MAX)
    }

    /// Current boot-clock time in ns (same clock as the kernel's timestamps).
    pub fn boot_now_ns() -> u64 {
        clock_ns(libc::CLOCK_BOOTTIME) as u64
    }
}

/// Flow-table entries read per BPF_MAP_LOOKUP_BATCH call in a sweep.
const SWEEP_CHUNK: usize = 4096;

/// The packet index a timestamp written after [`Kernel::stamp_replay_packet`]
/// carries.
pub fn replay_stamp_index(stamp_ns: u64) -> u32 {
    (stamp_ns >> 32) as u32
}

fn boot_offset_ns() -> u64 {
    (clock_ns(libc::CLOCK_BOOTTIME) - clock_ns(libc::CLOCK_MONOTONIC)).max(0) as u64
}

fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec; CLOCK_BOOTTIME/REALTIME always exist on Linux.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
}

/// IPv4 or IPv6 CIDR with a 16-bit id, as installed in the LPM tries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CidrEntry {
    pub addr: IpAddr,
    pub prefix_len: u8,
    pub id: u16,
}

/// A zone network: `vlan` is 0 for a zone that applies to any VLAN, else one of
/// the zone's VLANs (one entry per VLAN).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ZoneEntry {
    pub cidr: CidrEntry,
    pub vlan: u16,
}

impl ZoneEntry {
    /// A zone network for any VLAN.
    pub fn any_vlan(addr: IpAddr, prefix_len: u8, id: u16) -> ZoneEntry {
        ZoneEntry {
            cidr: CidrEntry {
                addr,
                prefix_len,
                id,
            },
            vlan: 0,
        }
    }
}

/// One prefix of the conduit trie: `prefix_len` bits of `key` (at least
/// [`sensor_common::CONDUIT_KEY_FIXED_BITS`]) map to `value`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConduitEntry {
    pub prefix_len: u32,
    pub key: ConduitKey,
    pub value: ConduitValue,
}

/// Everything the kernel needs from the conduit map. Ids are the agent's indexes
/// (0 means "none" and must not be used).
#[derive(Clone, Debug, Default)]
pub struct KernelPolicy {
    pub zones: Vec<ZoneEntry>,
    pub endpoint_nets: Vec<CidrEntry>,
    /// `sni_hash(exact name)` -> endpoint id.
    pub sni_exact: Vec<(u64, u16)>,
    /// `sni_hash(".suffix")` (leading dot included) -> endpoint id.
    pub sni_suffix: Vec<(u64, u16)>,
    pub conduits: Vec<ConduitEntry>,
    /// [`sensor_common::action`] for AI traffic no conduit allows.
    pub default_action: u8,
    pub enforce: bool,
}

/// The loaded kernel programs and their maps.
pub struct Kernel {
    ebpf: Ebpf,
    config: KernelConfig,
    xdp_links: Vec<(String, XdpLinkId)>,
    tc_links: Vec<(String, SchedClassifierLinkId)>,
    watched: Vec<u32>,
    events: Option<RingBuf<MapData>>,
    flow_variant: FlowVariant,
    classifiers: Classifiers,
    /// Whether the flow table is read with batch lookups (until the kernel refuses).
    batch_flows: std::cell::Cell<bool>,
    /// `CONFIG` mapped for `replay`'s per-packet stamps (see [`Kernel::stamp_replay_packet`]);
    /// `Err` once mapping failed: stamps then go through the syscall.
    mapped_config: Option<std::result::Result<MappedConfig, ()>>,
}

impl std::fmt::Debug for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kernel")
            .field("config", &self.config)
            .field("watched", &self.watched)
            .finish_non_exhaustive()
    }
}

impl Kernel {
    /// Loads the embedded object and all its programs (nothing is attached yet).
    pub fn load(opts: &KernelOptions) -> Result<Kernel> {
        let object = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sensor"));
        if object.is_empty() {
            return Err(KernelError::NotBuilt);
        }
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(map_names::FLOWS, opts.flow_table_size)
            .map_max_entries(map_names::EVENTS, opts.ringbuf_bytes)
            .load(object)?;
        for name in [PROG_BENCH_EMPTY, PROG_BENCH_LRU, PROG_BENCH_LRU_FLOWKEY] {
            load_xdp(&mut ebpf, name)?;
        }
        let flow_variant = load_flow_programs(&mut ebpf, opts.best_flow)?;
        let classifiers = load_classifiers(&mut ebpf, opts.best_classifier)?;
        for (prog, error) in &classifiers.rejected {
            tracing::debug!(program = prog, %error, "payload classifier variant rejected");
        }
        if !classifiers.complete() {
            // The empty jump-table slot makes the tail call a no-op: flows are still
            // counted and classified by address.
            tracing::warn!(
                xdp = classifiers.xdp.name(),
                tc = classifiers.tc.name(),
                "payload (SNI/QUIC) classification unavailable: the verifier rejected every variant (`conduit-sensor probe` shows why)"
            );
        }
        let events = ebpf
            .take_map(map_names::EVENTS)
            .ok_or(KernelError::Missing(map_names::EVENTS))?;
        let events = RingBuf::try_from(events).map_err(map_err(map_names::EVENTS))?;
        let mut k = Kernel {
            ebpf,
            config: KernelConfig::default(),
            xdp_links: Vec::new(),
            tc_links: Vec::new(),
            watched: Vec::new(),
            events: Some(events),
            flow_variant,
            classifiers,
            batch_flows: std::cell::Cell::new(true),
            mapped_config: None,
        };
        k.config.enforce = opts.enforce as u8;
        k.config.record_all = opts.record_all as u8;
        k.config.default_action = opts.default_action;
        k.config.boot_offset_ns = boot_offset_ns();
        k.write_config()?;
        Ok(k)
    }

    /// Re-samples CLOCK_BOOTTIME - CLOCK_MONOTONIC (changes only across suspend) for
    /// the kernel's flow timestamps.
    pub fn refresh_clock(&mut self) -> Result<()> {
        self.config.boot_offset_ns = boot_offset_ns();
        self.write_config()
    }

    /// For `replay`: the flow timestamps of the next test runs carry `index` in
    /// their upper 32 bits (see [`replay_stamp_index`]), so the agent can give them
    /// the capture time of packet `index`. The kernel stamps with the coarse
    /// monotonic clock plus the configured offset; the clock moves by far less than
    /// 2^32 ns (4.3 s) during one test run.
    ///
    /// The store goes into the mapped `CONFIG` (one memory write, no syscall);
    /// where the map cannot be mapped, through `BPF_MAP_UPDATE_ELEM`.
    pub fn stamp_replay_packet(&mut self, index: u32) -> Result<()> {
        let coarse = clock_ns(libc::CLOCK_MONOTONIC_COARSE) as u64;
        self.config.boot_offset_ns = (u64::from(index) << 32).wrapping_sub(coarse);
        if self.mapped_config.is_none() {
            self.mapped_config = Some(self.map_config());
        }
        match &mut self.mapped_config {
            Some(Ok(m)) => {
                m.set_boot_offset(self.config.boot_offset_ns);
                Ok(())
            }
            _ => self.write_config(),
        }
    }

    fn map_config(&self) -> std::result::Result<MappedConfig, ()> {
        use std::os::fd::AsFd as _;
        let name = map_names::CONFIG;
        let mapped = match self.ebpf.map(name) {
            Some(aya::maps::Map::Array(data)) => {
                MappedConfig::map(data.fd().as_fd()).map_err(|e| e.to_string())
            }
            _ => Err("not an array map".to_string()),
        };
        mapped.map_err(|err| {
            tracing::warn!(
                "mapping {name} failed ({err}); replay stamps each packet with a map update"
            );
        })
    }

    /// Whether the programs' ring-buffer submits wake a waiting reader (the
    /// default). `replay` turns them off: it reads the ring after each test run
    /// and never waits on it, and each wakeup costs a self-interrupt.
    pub fn set_ring_wakeups(&mut self, on: bool) -> Result<()> {
        self.config.ring_no_wakeup = u8::from(!on);
        self.write_config()
    }

    fn write_config(&mut self) -> Result<()> {
        let name = map_names::CONFIG;
        let mut m: Array<&mut MapData, KernelConfig> =
            Array::try_from(self.ebpf.map_mut(name).ok_or(KernelError::Missing(name))?)
                .map_err(map_err(name))?;
        m.set(0, self.config, 0).map_err(map_err(name))
    }

    /// Whether both hooks have a TLS/QUIC payload classifier.
    pub fn payload_classification(&self) -> bool {
        self.classifiers.complete()
    }

    /// Which flow programs loaded.
    pub fn flow_variant(&self) -> FlowVariant {
        self.flow_variant
    }

    fn xdp_prog(&self) -> &'static str {
        self.flow_variant.programs().0
    }

    fn tc_prog(&self) -> &'static str {
        self.flow_variant.programs().1
    }

    /// Which payload classifiers loaded.
    pub fn classifiers(&self) -> &Classifiers {
        &self.classifiers
    }

    /// Current runtime switches.
    pub fn config(&self) -> KernelConfig {
        self.config
    }

    /// Turns enforcement (XDP_DROP of `blocked` flows) on or off.
    pub fn set_enforce(&mut self, on: bool) -> Result<()> {
        self.config.enforce = on as u8;
        self.write_config()
    }

    /// Attaches XDP (native, else generic with a warning) and TC egress to `ifname`
    /// and marks it watched.
    pub fn attach(&mut self, ifname: &str) -> Result<AttachInfo> {
        let ifindex =
            nix::net::if_::if_nametoindex(ifname).map_err(|source| KernelError::Interface {
                name: ifname.to_owned(),
                source,
            })?;
        // Watched first, so TC never sees the interface half-registered.
        self.watch_ifindex(ifindex)?;

        let xdp_name = self.xdp_prog();
        let xdp: &mut Xdp = self
            .ebpf
            .program_mut(xdp_name)
            .ok_or(KernelError::Missing(xdp_name))?
            .try_into()
            .map_err(prog_err(xdp_name))?;
        let (link, mode) = match xdp.attach(ifname, XdpMode::Driver) {
            Ok(link) => (link, XdpAttachMode::Driver),
            Err(e) => {
                tracing::warn!(
                    iface = ifname,
                    error = %e,
                    "native XDP not available, falling back to generic (skb) mode"
                );
                let link =
                    xdp.attach(ifname, XdpMode::Skb)
                        .map_err(|source| KernelError::XdpAttach {
                            name: ifname.to_owned(),
                            source,
                        })?;
                (link, XdpAttachMode::Skb)
            }
        };
        self.xdp_links.push((ifname.to_owned(), link));

        // Kernels >= 6.6 attach through TCX and need no qdisc; older ones need clsact.
        let tcx = aya::util::KernelVersion::current()
            .map(|v| v >= aya::util::KernelVersion::new(6, 6, 0))
            .unwrap_or(false);
        // A filter of an agent that died is still there on netlink kernels: remove
        // it, so that one sensor program runs per interface, not one per restart.
        match detach_stale(ifname) {
            Ok(removed) => {
                for r in removed {
                    tracing::warn!(iface = ifname, "removed a stale attachment: {r}");
                }
            }
            Err(e) => tracing::warn!(iface = ifname, error = %e, "looking for stale TC filters"),
        }
        if !tcx {
            match tc::qdisc_add_clsact(ifname) {
                Ok(()) => {}
                Err(e) if is_exists(&e) => {}
                Err(source) => {
                    return Err(KernelError::Clsact {
                        name: ifname.to_owned(),
                        source,
                    });
                }
            }
        }
        let tc_name = self.tc_prog();
        let tc: &mut SchedClassifier = self
            .ebpf
            .program_mut(tc_name)
            .ok_or(KernelError::Missing(tc_name))?
            .try_into()
            .map_err(prog_err(tc_name))?;
        let link = tc
            .attach(ifname, TcAttachType::Egress)
            .map_err(prog_err(tc_name))?;
        self.tc_links.push((ifname.to_owned(), link));
        Ok(AttachInfo {
            ifname: ifname.to_owned(),
            ifindex,
            xdp_mode: mode,
        })
    }

    /// Marks `ifindex` as watched (done by [`Kernel::attach`]; tests use it directly,
    /// e.g. for loopback, the ingress interface of `BPF_PROG_TEST_RUN`).
    pub fn watch_ifindex(&mut self, ifindex: u32) -> Result<()> {
        let name = map_names::WATCHED_IFACES;
        let mut m: HashMap<&mut MapData, u32, u8> =
            HashMap::try_from(self.ebpf.map_mut(name).ok_or(KernelError::Missing(name))?)
                .map_err(map_err(name))?;
        m.insert(ifindex, 1, 0).map_err(map_err(name))?;
        if !self.watched.contains(&ifindex) {
            self.watched.push(ifindex);
        }
        Ok(())
    }

    /// Detaches every program from every interface (also done on drop). Errors are
    /// logged: on shutdown we detach as much as we can.
    pub fn detach_all(&mut self) {
        let (xdp_name, tc_name) = self.flow_variant.programs();
        if let Some(Ok(xdp)) = self.ebpf.program_mut(xdp_name).map(<&mut Xdp>::try_from) {
            for (ifname, link) in self.xdp_links.drain(..) {
                if let Err(e) = xdp.detach(link) {
                    tracing::warn!(iface = %ifname, error = %e, "detaching XDP");
                }
            }
        }
        if let Some(Ok(tc)) = self
            .ebpf
            .program_mut(tc_name)
            .map(<&mut SchedClassifier>::try_from)
        {
            for (ifname, link) in self.tc_links.drain(..) {
                if let Err(e) = tc.detach(link) {
                    tracing::warn!(iface = %ifname, error = %e, "detaching TC");
                }
            }
        }
        if let Some(m) = self.ebpf.map_mut(map_names::WATCHED_IFACES)
            && let Ok(mut m) = HashMap::<&mut MapData, u32, u8>::try_from(m)
        {
            for ifindex in self.watched.drain(..) {
                let _ = m.remove(&ifindex);
            }
        }
    }

    /// Replaces the set of the gateway's own addresses.
    pub fn set_local_addrs(&mut self, addrs: &[IpAddr]) -> Result<()> {
        let name = map_names::LOCAL_ADDRS;
        let new: Vec<LocalAddr> = addrs.iter().map(|a| local_addr(*a)).collect();
        {
            let mut m: HashMap<&mut MapData, LocalAddr, u8> =
                HashMap::try_from(self.ebpf.map_mut(name).ok_or(KernelError::Missing(name))?)
                    .map_err(map_err(name))?;
            for a in &new {
                m.insert(a, 1, 0).map_err(map_err(name))?;
            }
            let stale: Vec<LocalAddr> = m
                .keys()
                .filter_map(|k| k.ok())
                .filter(|k| !new.contains(k))
                .collect();
            for k in stale {
                let _ = m.remove(&k);
            }
        }
        self.config.has_local_addrs = (!new.is_empty()) as u8;
        self.write_config()
    }

    fn flows(&self) -> Result<HashMap<&MapData, FlowKey, FlowStats>> {
        let name = map_names::FLOWS;
        HashMap::try_from(self.ebpf.map(name).ok_or(KernelError::Missing(name))?)
            .map_err(map_err(name))
    }

    fn flows_mut(&mut self) -> Result<HashMap<&mut MapData, FlowKey, FlowStats>> {
        let name = map_names::FLOWS;
        HashMap::try_from(self.ebpf.map_mut(name).ok_or(KernelError::Missing(name))?)
            .map_err(map_err(name))
    }

    fn class_updates_mut(&mut self) -> Result<HashMap<&mut MapData, FlowKey, ClassUpdate>> {
        let name = map_names::CLASS_UPDATES;
        HashMap::try_from(self.ebpf.map_mut(name).ok_or(KernelError::Missing(name))?)
            .map_err(map_err(name))
    }

    /// Every flow in the table. Entries evicted or deleted during the walk are skipped.
    pub fn flow_entries(&self) -> Result<Vec<(FlowKey, FlowStats)>> {
        let mut out = Vec::new();
        self.for_each_flow(|k, s| out.push((k, s)))?;
        Ok(out)
    }

    /// Reads the flow table entry by entry from now on (`false`), as on kernels
    /// without batch lookups; `bench_kernel` compares the two.
    pub fn set_batch_lookups(&self, on: bool) {
        self.batch_flows.set(on);
    }

    /// Calls `f` for every flow in the table without holding a copy of it: in
    /// chunks of [`SWEEP_CHUNK`] (BPF_MAP_LOOKUP_BATCH, 5.6+), else key by key.
    pub fn for_each_flow(&self, mut f: impl FnMut(FlowKey, FlowStats)) -> Result<()> {
        use std::os::fd::AsFd as _;
        let name = map_names::FLOWS;
        if self.batch_flows.get()
            && let Some(aya::maps::Map::LruHashMap(data) | aya::maps::Map::HashMap(data)) =
                self.ebpf.map(name)
        {
            match crate::map_batch::for_each(data.fd().as_fd(), SWEEP_CHUNK, &mut f) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {
                    tracing::info!(
                        "no batch lookups on this kernel: the sweep reads the flow table key by key"
                    );
                    self.batch_flows.set(false);
                }
                Err(io_error) => {
                    return Err(map_err(name)(MapError::SyscallError(
                        aya::sys::SyscallError {
                            call: "bpf_map_lookup_batch",
                            io_error,
                        },
                    )));
                }
            }
        }
        let flows = self.flows()?;
        for r in flows.iter() {
            match r {
                Ok((k, s)) => f(k, s),
                // The key vanished between get_next_key and lookup (LRU eviction).
                Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(map_names::FLOWS)(e)),
            }
        }
        Ok(())
    }

    /// One flow, if present.
    pub fn flow(&self, key: &FlowKey) -> Result<Option<FlowStats>> {
        match self.flows()?.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(map_names::FLOWS)(e)),
        }
    }

    /// Deletes a flow (after the agent recorded its end). Missing keys are fine.
    pub fn remove_flow(&mut self, key: &FlowKey) -> Result<()> {
        match self.flows_mut()?.remove(key) {
            Err(e) if !is_not_found(&e) => return Err(map_err(map_names::FLOWS)(e)),
            _ => {}
        }
        // A classification the kernel had no packet left to merge.
        match self.class_updates_mut()?.remove(key) {
            Err(e) if !is_not_found(&e) => Err(map_err(map_names::CLASS_UPDATES)(e)),
            _ => Ok(()),
        }
    }

    /// Hands the agent's classification of a flow to the kernel, which merges it into
    /// the flow on the flow's next packet (and stops copying payload). The agent never
    /// rewrites a flow-table value, so no packet counted meanwhile is lost. Returns
    /// false if the flow is gone.
    pub fn update_classification(&mut self, key: &FlowKey, update: &ClassUpdate) -> Result<bool> {
        if self.flow(key)?.is_none() {
            return Ok(false);
        }
        self.class_updates_mut()?
            .insert(key, update, 0)
            .map_err(map_err(map_names::CLASS_UPDATES))?;
        Ok(true)
    }

    /// Counters summed over CPUs, indexed by [`Counter`].
    pub fn counters(&self) -> Result<[u64; Counter::COUNT as usize]> {
        let name = map_names::COUNTERS;
        let m: PerCpuArray<&MapData, sensor_common::Counters> =
            PerCpuArray::try_from(self.ebpf.map(name).ok_or(KernelError::Missing(name))?)
                .map_err(map_err(name))?;
        let mut out = [0u64; Counter::COUNT as usize];
        for cpu in m.get(&0, 0).map_err(map_err(name))?.iter() {
            for (sum, v) in out.iter_mut().zip(cpu.values) {
                *sum += v;
            }
        }
        Ok(out)
    }

    /// Hands the event ring buffer to the caller (once), e.g. to wrap its fd in
    /// `tokio::io::unix::AsyncFd` and drain it with `next()` + [`KernelEvent::decode`].
    pub fn take_ring_buf(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }

    /// Drains the ring buffer synchronously (if it was not taken).
    pub fn drain_events(&mut self) -> Vec<KernelEvent> {
        let mut out = Vec::new();
        if let Some(rb) = self.events.as_mut() {
            while let Some(item) = rb.next() {
                if let Some(ev) = KernelEvent::decode(&item) {
                    out.push(ev);
                }
            }
        }
        out
    }

    /// Runs `program` once on `packet` with `BPF_PROG_TEST_RUN`; returns its verdict.
    /// XDP runs see ingress ifindex 1 (loopback).
    pub fn test_run(&self, program: Program, packet: &[u8]) -> Result<u32> {
        Ok(self.test_run_opts(program, packet, 1, None)?.return_value)
    }

    /// `BPF_PROG_TEST_RUN` with `repeat` and an optional context (`struct xdp_md` or
    /// `struct __sk_buff`, e.g. to set `ingress_ifindex` or `gso_segs` for TC). The
    /// result's duration is the mean per run.
    pub fn test_run_opts(
        &self,
        program: Program,
        packet: &[u8],
        repeat: u32,
        ctx_in: Option<&[u8]>,
    ) -> Result<aya::programs::TestRunResult> {
        let name = match program {
            Program::Xdp => self.xdp_prog(),
            Program::Tc => self.tc_prog(),
            _ => program.name(),
        };
        let prog = self.ebpf.program(name).ok_or(KernelError::Missing(name))?;
        let opts = TestRunOptions {
            data_in: Some(packet),
            ctx_in,
            repeat,
            ..TestRunOptions::default()
        };
        match program {
            Program::Tc => {
                let p: &SchedClassifier = prog.try_into().map_err(prog_err(name))?;
                p.test_run(opts).map_err(prog_err(name))
            }
            _ => {
                let p: &Xdp = prog.try_into().map_err(prog_err(name))?;
                p.test_run(opts).map_err(prog_err(name))
            }
        }
    }

    /// Installs the kernel part of a conduit map, whole or not at all, and
    /// switches to it at once: its entries go into every policy table under the
    /// generation not in force (see `sensor_common::PolicyKey`), then one config
    /// write switches the generation together with `default_action` and `enforce`.
    /// Until then packets see only the old policy; from then only the new one. On
    /// an error the new generation's entries leave again and the old policy stays
    /// in force, untouched. The tables hold two policies, so a map that fits the
    /// limits always installs.
    pub fn install_policy(&mut self, p: &KernelPolicy) -> Result<()> {
        let next = 1 - (self.config.policy_gen & 1);
        let entries = PolicyEntries::new(p, next);
        write_generation(&mut self.ebpf, &entries, next)?;
        let before = self.config;
        self.config.policy_gen = next;
        self.config.default_action = p.default_action;
        self.config.enforce = p.enforce as u8;
        let switched = if injected(map_names::CONFIG) {
            Err(KernelError::Injected(map_names::CONFIG))
        } else {
            self.write_config()
        };
        if let Err(err) = switched {
            self.config = before;
            clear_generation(&mut self.ebpf, next);
            return Err(err);
        }
        // The old generation is out of force: its entries are inert, and the next
        // install clears whatever of them this leaves.
        clear_generation(&mut self.ebpf, 1 - next);
        Ok(())
    }
}

fn load_xdp(ebpf: &mut Ebpf, name: &'static str) -> Result<()> {
    let p: &mut Xdp = ebpf
        .program_mut(name)
        .ok_or(KernelError::Missing(name))?
        .try_into()
        .map_err(prog_err(name))?;
    p.load().map_err(prog_err(name))
}

fn load_tc(ebpf: &mut Ebpf, name: &'static str) -> Result<()> {
    let p: &mut SchedClassifier = ebpf
        .program_mut(name)
        .ok_or(KernelError::Missing(name))?
        .try_into()
        .map_err(prog_err(name))?;
    p.load().map_err(prog_err(name))
}

/// Loads the best pair of flow programs the verifier accepts, from `best` down.
/// When even the legacy pair is rejected, the error is the current pair's (the
/// one that says what a supported kernel lacks) with the legacy one's appended.
fn load_flow_programs(ebpf: &mut Ebpf, best: FlowVariant) -> Result<FlowVariant> {
    let load_pair = |ebpf: &mut Ebpf, v: FlowVariant| {
        let (xdp, tc) = v.programs();
        load_xdp(ebpf, xdp)?;
        load_tc(ebpf, tc)
    };
    if best == FlowVariant::Current {
        match load_pair(ebpf, FlowVariant::Current) {
            Ok(()) => return Ok(FlowVariant::Current),
            Err(e) => {
                tracing::debug!(error = %e, "flow programs rejected; trying the 5.10 variant")
            }
        }
    }
    load_pair(ebpf, FlowVariant::Legacy)?;
    Ok(FlowVariant::Legacy)
}

/// Loads, for each hook, the best payload classifier the verifier accepts (from
/// `best` down) and puts it in slot 0 of the hook's jump table.
fn load_classifiers(ebpf: &mut Ebpf, best: ClassifierVariant) -> Result<Classifiers> {
    let mut rejected = Vec::new();
    let from = match best {
        ClassifierVariant::Helpers => 0,
        ClassifierVariant::Bounded => 1,
        ClassifierVariant::None => 2,
    };
    let xdp = load_best(
        ebpf,
        map_names::JUMP_XDP,
        &[
            (PROG_XDP_CLASSIFY, ClassifierVariant::Helpers),
            (PROG_XDP_CLASSIFY_BOUNDED, ClassifierVariant::Bounded),
        ][from.min(2)..],
        load_xdp,
        &mut rejected,
    )?;
    let tc = load_best(
        ebpf,
        map_names::JUMP_TC,
        &[
            (PROG_TC_CLASSIFY, ClassifierVariant::Helpers),
            (PROG_TC_CLASSIFY_BOUNDED, ClassifierVariant::Bounded),
        ][from.min(2)..],
        load_tc,
        &mut rejected,
    )?;
    Ok(Classifiers { xdp, tc, rejected })
}

/// Most bytes of a rejected program's verifier log kept (its end says why).
const VERIFIER_LOG_TAIL: usize = 2048;

/// Tries `variants` in order; the first that loads goes into `jump_map`. Load
/// failures are recorded in `rejected`; map errors are errors.
fn load_best(
    ebpf: &mut Ebpf,
    jump_map: &'static str,
    variants: &[(&'static str, ClassifierVariant)],
    load: fn(&mut Ebpf, &'static str) -> Result<()>,
    rejected: &mut Vec<(&'static str, String)>,
) -> Result<ClassifierVariant> {
    for &(prog, variant) in variants {
        if let Err(e) = load(ebpf, prog) {
            let text = e.to_string();
            let tail = text
                .char_indices()
                .rev()
                .nth(VERIFIER_LOG_TAIL)
                .map_or(&text[..], |(i, _)| &text[i..]);
            rejected.push((prog, tail.to_owned()));
            continue;
        }
        let fd = ebpf
            .program(prog)
            .ok_or(KernelError::Missing(prog))?
            .fd()
            .map_err(prog_err(prog))?
            .try_clone()
            .map_err(|e| prog_err(prog)(ProgramError::IOError(e)))?;
        let mut jump: ProgramArray<&mut MapData> = ProgramArray::try_from(
            ebpf.map_mut(jump_map)
                .ok_or(KernelError::Missing(jump_map))?,
        )
        .map_err(map_err(jump_map))?;
        jump.set(0, &fd, 0).map_err(map_err(jump_map))?;
        return Ok(variant);
    }
    Ok(ClassifierVariant::None)
}

/// Netlink (TC) attachments that [`detach_stale`] looks for: hook and program name.
/// Ingress is listed too, in case an operator attached the program there by hand.
const NETLINK_ATTACHMENTS: [(TcAttachType, &str, &str); 4] = [
    (TcAttachType::Egress, "egress", PROG_TC),
    (TcAttachType::Egress, "egress", PROG_TC_510),
    (TcAttachType::Ingress, "ingress", PROG_TC),
    (TcAttachType::Ingress, "ingress", PROG_TC_510),
];

/// Removes the sensor's TC filters from `ifname`: what an agent that died (kill -9,
/// OOM, power loss of the process) leaves behind on kernels without TCX (before
/// 6.6), where TC programs are netlink filters that outlive their process. XDP is
/// attached through a bpf_link (5.9+) and goes with the process. The clsact qdisc
/// stays (without filters it does nothing). Returns what was removed.
pub fn detach_stale(ifname: &str) -> Result<Vec<String>, tc::TcError> {
    let mut removed = Vec::new();
    for (hook, hook_name, prog) in NETLINK_ATTACHMENTS {
        match tc::qdisc_detach_program(ifname, hook, prog) {
            Ok(()) => removed.push(format!("TC {hook_name} filter(s) of {prog}")),
            // No such filter, or no clsact qdisc at all (TCX kernels, clean interfaces).
            Err(tc::TcError::IoError(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) if is_no_qdisc(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(removed)
}

fn is_no_qdisc(e: &tc::TcError) -> bool {
    match e {
        tc::TcError::NetlinkError(n) => {
            matches!(n.raw_os_error(), Some(libc::ENOENT) | Some(libc::EINVAL))
        }
        _ => false,
    }
}

impl Drop for Kernel {
    fn drop(&mut self) {
        self.detach_all();
    }
}

fn is_exists(e: &tc::TcError) -> bool {
    // aya reports netlink errors with the raw errno; EEXIST means clsact is there.
    match e {
        tc::TcError::NetlinkError(n) => n.raw_os_error() == Some(libc::EEXIST),
        _ => e.to_string().contains("exists"),
    }
}

fn local_addr(a: IpAddr) -> LocalAddr {
    let mut addr = [0u8; 16];
    let family = match a {
        IpAddr::V4(v4) => {
            addr[..4].copy_from_slice(&v4.octets());
            FAMILY_IPV4
        }
        IpAddr::V6(v6) => {
            addr = v6.octets();
            FAMILY_IPV6
        }
    };
    LocalAddr {
        addr,
        family,
        _pad: [0; 3],
    }
}

/// The entries of the conduit map's kernel tables under one policy generation.
#[derive(Default)]
struct PolicyEntries {
    z4: Vec<(Key<PolicyKey<ZoneKeyV4>>, u16)>,
    z6: Vec<(Key<PolicyKey<ZoneKeyV6>>, u16)>,
    e4: Vec<(Key<PolicyKey<LpmV4>>, u16)>,
    e6: Vec<(Key<PolicyKey<LpmV6>>, u16)>,
    sni_exact: Vec<(SniKey, u16)>,
    sni_suffix: Vec<(SniKey, u16)>,
    conduits: Vec<(Key<PolicyKey<ConduitKey>>, ConduitValue)>,
}

impl PolicyEntries {
    fn new(p: &KernelPolicy, generation: u8) -> PolicyEntries {
        let mut e = PolicyEntries::default();
        for z in &p.zones {
            let vlan = z.vlan.to_be_bytes();
            let bits = |max: u8| ZONE_KEY_VLAN_BITS + u32::from(z.cidr.prefix_len.min(max));
            match z.cidr.addr {
                IpAddr::V4(a) => {
                    let data = ZoneKeyV4 {
                        vlan,
                        addr: a.octets(),
                    };
                    e.z4.push((policy_key(generation, bits(32), data), z.cidr.id));
                }
                IpAddr::V6(a) => {
                    let data = ZoneKeyV6 {
                        vlan,
                        addr: a.octets(),
                    };
                    e.z6.push((policy_key(generation, bits(128), data), z.cidr.id));
                }
            }
        }
        for n in &p.endpoint_nets {
            match n.addr {
                IpAddr::V4(a) => e.e4.push((
                    policy_key(generation, u32::from(n.prefix_len.min(32)), a.octets()),
                    n.id,
                )),
                IpAddr::V6(a) => e.e6.push((
                    policy_key(generation, u32::from(n.prefix_len.min(128)), a.octets()),
                    n.id,
                )),
            }
        }
        let sni = |v: &[(u64, u16)]| {
            v.iter()
                .map(|&(h, id)| (SniKey::sni(generation, h), id))
                .collect()
        };
        e.sni_exact = sni(&p.sni_exact);
        e.sni_suffix = sni(&p.sni_suffix);
        e.conduits = p
            .conduits
            .iter()
            .map(|c| (policy_key(generation, c.prefix_len, c.key), c.value))
            .collect();
        e
    }
}

/// The trie key of `data` (its first `bits` significant) under `generation`.
fn policy_key<K>(generation: u8, bits: u32, data: K) -> Key<PolicyKey<K>>
where
    PolicyKey<K>: aya::Pod,
{
    Key::new(POLICY_GEN_BITS + bits, PolicyKey::new(generation, data))
}

/// The policy tables, in write order.
const POLICY_MAPS: [&str; 7] = [
    map_names::ZONES_V4,
    map_names::ZONES_V6,
    map_names::ENDPOINT_NETS_V4,
    map_names::ENDPOINT_NETS_V6,
    map_names::SNI_EXACT,
    map_names::SNI_SUFFIX,
    map_names::CONDUITS,
];

/// Test hook: the next policy writes of this map fail half-way through its entries.
static FAIL_POLICY_MAP: std::sync::Mutex<Option<&'static str>> = std::sync::Mutex::new(None);

/// **Test only.** Makes every later write of the named policy map (one of
/// [`map_names`]) fail after half of its entries, as a kernel error half-way through
/// a reload would; [`map_names::CONFIG`] makes the switch itself fail, after every
/// table got the new generation. `None` ends it.
#[doc(hidden)]
pub fn inject_policy_write_failure(map: Option<&'static str>) {
    *FAIL_POLICY_MAP.lock().unwrap_or_else(|e| e.into_inner()) = map;
}

fn injected(name: &str) -> bool {
    *FAIL_POLICY_MAP.lock().unwrap_or_else(|e| e.into_inner()) == Some(name)
}

/// Writes `e` into every policy table under `generation`, which is not in force:
/// first what an earlier failed install left of that generation leaves. On an
/// error the generation is cleared again (nothing looks it up either way).
fn write_generation(ebpf: &mut Ebpf, e: &PolicyEntries, generation: u8) -> Result<()> {
    let result = (|| {
        for (step, name) in POLICY_MAPS.iter().enumerate() {
            clear_step(ebpf, step, generation)?;
            let fail = injected(name);
            match step {
                0 => insert_lpm(ebpf, name, &e.z4, fail),
                1 => insert_lpm(ebpf, name, &e.z6, fail),
                2 => insert_lpm(ebpf, name, &e.e4, fail),
                3 => insert_lpm(ebpf, name, &e.e6, fail),
                4 => insert_hash(ebpf, name, &e.sni_exact, fail),
                5 => insert_hash(ebpf, name, &e.sni_suffix, fail),
                _ => insert_lpm(ebpf, name, &e.conduits, fail),
            }?;
        }
        Ok(())
    })();
    if result.is_err() {
        clear_generation(ebpf, generation);
    }
    result
}

/// Removes every entry of `generation` from the policy tables; errors are logged
/// (the entries of a generation not in force are never looked up).
fn clear_generation(ebpf: &mut Ebpf, generation: u8) {
    for (step, name) in POLICY_MAPS.iter().enumerate() {
        if let Err(err) = clear_step(ebpf, step, generation) {
            tracing::warn!(
                map = name,
                generation,
                "clearing a policy generation: {err}"
            );
        }
    }
}

fn clear_step(ebpf: &mut Ebpf, step: usize, generation: u8) -> Result<()> {
    let name = POLICY_MAPS[step];
    match step {
        0 => clear_lpm::<ZoneKeyV4, u16>(ebpf, name, generation),
        1 => clear_lpm::<ZoneKeyV6, u16>(ebpf, name, generation),
        2 => clear_lpm::<LpmV4, u16>(ebpf, name, generation),
        3 => clear_lpm::<LpmV6, u16>(ebpf, name, generation),
        4 | 5 => clear_hash(ebpf, name, generation),
        _ => clear_lpm::<ConduitKey, ConduitValue>(ebpf, name, generation),
    }
}

fn clear_lpm<K: Copy, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
    generation: u8,
) -> Result<()>
where
    PolicyKey<K>: aya::Pod,
{
    let mut m: LpmTrie<&mut MapData, PolicyKey<K>, V> =
        LpmTrie::try_from(ebpf.map_mut(name).ok_or(KernelError::Missing(name))?)
            .map_err(map_err(name))?;
    let keys: Vec<Key<PolicyKey<K>>> = m.keys().collect::<Result<_, _>>().map_err(map_err(name))?;
    let stale: Vec<_> = keys
        .into_iter()
        .filter(|k| k.data().generation == generation)
        .collect();
    remove_all(name, &stale, |k| m.remove(k))
}

fn clear_hash(ebpf: &mut Ebpf, name: &'static str, generation: u8) -> Result<()> {
    let mut m: HashMap<&mut MapData, SniKey, u16> =
        HashMap::try_from(ebpf.map_mut(name).ok_or(KernelError::Missing(name))?)
            .map_err(map_err(name))?;
    let keys: Vec<SniKey> = m.keys().collect::<Result<_, _>>().map_err(map_err(name))?;
    let stale: Vec<_> = keys
        .into_iter()
        .filter(|k| k.generation == generation)
        .collect();
    remove_all(name, &stale, |k| m.remove(k))
}

/// Removes keys, ignoring those already gone.
fn remove_all<K>(
    name: &'static str,
    keys: &[K],
    mut remove: impl FnMut(&K) -> Result<(), MapError>,
) -> Result<()> {
    for k in keys {
        match remove(k) {
            Err(e) if !is_not_found(&e) => return Err(map_err(name)(e)),
            _ => {}
        }
    }
    Ok(())
}

/// Inserts `entries`; `fail` (test hook) stops after half of them.
fn insert_lpm<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
    entries: &[(Key<K>, V)],
    fail: bool,
) -> Result<()> {
    let mut m: LpmTrie<&mut MapData, K, V> =
        LpmTrie::try_from(ebpf.map_mut(name).ok_or(KernelError::Missing(name))?)
            .map_err(map_err(name))?;
    for (i, (k, v)) in entries.iter().enumerate() {
        if fail && i >= entries.len() / 2 {
            return Err(KernelError::Injected(name));
        }
        m.insert(k, v, 0).map_err(map_err(name))?;
    }
    if fail {
        return Err(KernelError::Injected(name));
    }
    Ok(())
}

/// [`insert_lpm`] for a hash table.
fn insert_hash<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
    entries: &[(K, V)],
    fail: bool,
) -> Result<()> {
    let mut m: HashMap<&mut MapData, K, V> =
        HashMap::try_from(ebpf.map_mut(name).ok_or(KernelError::Missing(name))?)
            .map_err(map_err(name))?;
    for (i, (k, v)) in entries.iter().enumerate() {
        if fail && i >= entries.len() / 2 {
            return Err(KernelError::Injected(name));
        }
        m.insert(k, v, 0).map_err(map_err(name))?;
    }
    if fail {
        return Err(KernelError::Injected(name));
    }
    Ok(())
}
