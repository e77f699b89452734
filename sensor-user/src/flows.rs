//! Flow lifecycle: turns kernel flow-table snapshots and events into `flow_start`,
//! `flow_update` and `flow_end` decisions, with IPFIX end reasons.
//!
//! Pure logic over `(FlowKey, FlowStats)` snapshots, so it is tested without a kernel.
//! Times are `CLOCK_BOOTTIME` nanoseconds, the kernel's `bpf_ktime_get_boot_ns`.

use std::{hash::BuildHasher as _, time::Duration};

use conduit_proto::v1::{FlowEndReason, RecordKind, Verdict};
use sensor_common::{FLOW_TABLE_SIZE, FlowKey, FlowStats, flow_state, sni_state};

use crate::completion::CLASSIFICATION_DEADLINE;
use crate::config::Attribution;

/// Default bound of the tracker: as many flows as the default kernel table holds.
pub const DEFAULT_TRACKED_FLOWS: u32 = FLOW_TABLE_SIZE;

/// Timeouts and recording scope.
#[derive(Clone, Debug)]
pub struct TrackerOptions {
    /// A flow with no packet for this long ends (`idle`).
    pub idle_timeout: Duration,
    /// A long flow gets a `flow_update` this often (IPFIX active timeout).
    pub active_timeout: Duration,
    /// After FIN from both sides or a RST, end the flow once it has had no packet
    /// for this long (its totals then include the last ACKs).
    pub end_grace: Duration,
    /// Record flows that match no AI endpoint too.
    pub record_all: bool,
    /// Most flows tracked at once; new flows beyond are counted, not tracked.
    pub max_flows: usize,
    /// A flow's `flow_start` waits for its classification at most this long after
    /// its first packet; then it is written with what is known.
    pub classification_deadline: Duration,
}

impl Default for TrackerOptions {
    fn default() -> Self {
        TrackerOptions {
            idle_timeout: Duration::from_secs(30),
            active_timeout: Duration::from_secs(60),
            end_grace: Duration::from_secs(2),
            record_all: false,
            max_flows: DEFAULT_TRACKED_FLOWS as usize,
            classification_deadline: CLASSIFICATION_DEADLINE,
        }
    }
}

/// What is known about a flow's application and policy.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Classification {
    pub app_protocol: Option<String>,
    pub server_name: Option<String>,
    pub ja4: Option<String>,
    pub tls_version: Option<String>,
    pub alpn: Vec<String>,
    pub ech: bool,
    /// The ClientHello offers a post-quantum key-exchange group.
    pub pq_offered: bool,
    /// What the ServerHello negotiated, once the agent read it.
    pub negotiated: Option<crate::tls::Negotiated>,
    /// QUIC: version and the client's first DCID, to read the server's Initial.
    pub quic_initial: Option<(u32, Vec<u8>)>,
    pub zone: Option<String>,
    pub endpoint: Option<String>,
    /// What matched the endpoint (None: no endpoint).
    pub attribution: Option<Attribution>,
    /// The name the flow is attributed to (`destination.domain`): the SNI, or the
    /// name a DNS answer to this client gave for the destination.
    pub domain: Option<String>,
    /// An HTTPS/SVCB answer for `domain` announced an ECH config.
    pub ech_announced: bool,
    pub conduit_id: Option<String>,
    pub verdict: Verdict,
    pub policy_hash: Vec<u8>,
    /// Why the flow's ClientHello could not be read unambiguously
    /// (`conduit.anomalies`, see [`anomaly`]).
    pub anomalies: Vec<&'static str>,
    /// Server names of the other ClientHellos sent at the same sequence numbers
    /// (`conflicting_retransmission`); `server_name` is the one whose verdict
    /// was the more severe.
    pub conflicting_server_names: Vec<String>,
}

/// `conduit.anomalies` values: a flow with one is recorded in every mode, so a
/// ClientHello crafted to defeat parsing does not make its flow invisible.
pub mod anomaly {
    /// A reassembly bound (bytes or fragments per flow, flows at once) was reached.
    pub const REASSEMBLY_LIMIT: &str = "reassembly_limit";
    /// It starts as a TLS handshake but does not parse as a ClientHello.
    pub const MALFORMED_CLIENT_HELLO: &str = "malformed_client_hello";
    /// The ClientHello began but did not complete within the classification
    /// deadline (more segments than the kernel copies, or never sent in full).
    pub const CLIENT_HELLO_INCOMPLETE: &str = "client_hello_incomplete";
    /// Parts of the hello arrived twice with different bytes (a decoy overlapped by
    /// the real hello, or the reverse): which copy the server took is unknown, so
    /// the flow takes the more severe verdict of the names and records the others
    /// in `conflicting_server_names`.
    pub const CONFLICTING_RETRANSMISSION: &str = "conflicting_retransmission";
    /// The flow comes from a zone with `assets_only: true`, and no asset of the map
    /// has its initiator's Ethernet or IP address.
    pub const UNKNOWN_ASSET: &str = "unknown_asset";
    /// DNS answers for the SNI's name were seen and none gave the destination
    /// address: the server name may be forged (domain fronting, a decoy name).
    pub const SNI_NOT_RESOLVED: &str = "sni_not_resolved";
}

impl Classification {
    /// Whether the flow goes to an AI endpoint (anything but unclassified).
    pub fn is_ai(&self) -> bool {
        !matches!(self.verdict, Verdict::Unspecified | Verdict::Unclassified)
    }

    /// Whether the flow is recorded when only AI flows are: an AI flow, or one whose
    /// classification met an anomaly.
    pub fn must_record(&self) -> bool {
        self.is_ai() || !self.anomalies.is_empty()
    }
}

/// A flow record to write.
#[derive(Clone, Debug)]
pub struct FlowOut {
    pub kind: RecordKind,
    pub flow_id: u64,
    pub key: FlowKey,
    pub stats: FlowStats,
    pub class: Classification,
    pub end_reason: FlowEndReason,
}

/// Result of a sweep over the kernel flow table.
#[derive(Debug, Default)]
pub struct Sweep {
    /// Time of the snapshot.
    pub now_ns: u64,
    /// Records to write, in order.
    pub out: Vec<FlowOut>,
    /// Kernel entries the agent must delete (ended flows).
    pub remove: Vec<FlowKey>,
    /// Recorded flows that vanished from the kernel table before they ended
    /// (LRU eviction): each gets its `flow_end` (lack of resources) with the last
    /// counts seen; packets after those are not counted.
    pub evicted: u64,
    /// Flows that ended without ever being recorded (not AI traffic).
    pub unrecorded_ended: u64,
    /// Unannounced flows this walk found in the table but could not track (the
    /// tracker was full): neither recovered nor gone yet, so not yet lost.
    pub unannounced_pending: u64,
    /// Their keys, so a walk that meets one twice counts it once.
    pending: std::collections::HashSet<FlowKey>,
}

/// What the tracker keeps of a flow's kernel entry: what its records carry (the
/// classification fields live in [`Classification`]). 64 bytes instead of 96.
#[derive(Clone, Copy, Debug, Default)]
struct Held {
    first_seen_ns: u64,
    last_seen_ns: u64,
    packets: [u64; 2],
    bytes: [u64; 2],
    ifindex: u32,
    tcp_flags: [u8; 2],
    initiator_is_lo: u8,
    state: u8,
    initiator_mac: [u8; 6],
}

impl Held {
    fn of(s: &FlowStats) -> Held {
        Held {
            first_seen_ns: s.first_seen_ns,
            last_seen_ns: s.last_seen_ns,
            packets: s.packets,
            bytes: s.bytes,
            ifindex: s.ifindex,
            tcp_flags: s.tcp_flags,
            initiator_is_lo: s.initiator_is_lo,
            state: s.state,
            initiator_mac: s.initiator_mac,
        }
    }

    fn stats(&self) -> FlowStats {
        FlowStats {
            first_seen_ns: self.first_seen_ns,
            last_seen_ns: self.last_seen_ns,
            packets: self.packets,
            bytes: self.bytes,
            ifindex: self.ifindex,
            tcp_flags: self.tcp_flags,
            initiator_is_lo: self.initiator_is_lo,
            state: self.state,
            initiator_mac: self.initiator_mac,
            ..FlowStats::default()
        }
    }

    /// Whether `s` is a snapshot of the same kernel entry: an entry keeps its first
    /// packet's time while it lives (0: not known, taken as the same).
    fn same_entry(&self, s: &FlowStats) -> bool {
        self.first_seen_ns == 0 || s.first_seen_ns == 0 || s.first_seen_ns == self.first_seen_ns
    }

    /// Counters only grow; a snapshot read while packets arrive may be older than
    /// the one already held, so keep the larger of each.
    fn merge(&mut self, new: &FlowStats) {
        for d in 0..2 {
            self.packets[d] = self.packets[d].max(new.packets[d]);
            self.bytes[d] = self.bytes[d].max(new.bytes[d]);
            self.tcp_flags[d] |= new.tcp_flags[d];
        }
        self.last_seen_ns = self.last_seen_ns.max(new.last_seen_ns);
        self.state |= new.state;
        if self.first_seen_ns == 0 {
            self.first_seen_ns = new.first_seen_ns;
        }
        self.ifindex = new.ifindex;
        self.initiator_is_lo = new.initiator_is_lo;
        if new.initiator_mac != [0; 6] {
            self.initiator_mac = new.initiator_mac;
        }
    }
}

/// One live flow: 136 bytes, boxed, so the table's buckets are one pointer each.
#[derive(Debug)]
struct Tracked {
    key: FlowKey,
    flow_id: u64,
    last_report_ns: u64,
    held: Held,
    /// Boxed: most flows have none, and the tracker holds every live flow.
    class: Option<Box<Classification>>,
    /// The last sweep that saw the flow in the kernel table.
    seen: u32,
    recorded: bool,
    /// The agent finished classifying the flow (ClientHello parsed, or not TLS).
    class_final: bool,
}

impl Tracked {
    fn must_record(&self) -> bool {
        self.class.as_ref().is_some_and(|c| c.must_record())
    }
}

/// The live flows by key. A table of boxes whose entries hold their own key: at
/// 120,000 flows its 262,144 buckets take 2 MiB (48 bytes each with a separate
/// key and pointer), and a resize copies pointers only.
#[derive(Default)]
struct FlowTable {
    table: hashbrown::HashTable<Box<Tracked>>,
    hasher: hashbrown::DefaultHashBuilder,
}

impl std::fmt::Debug for FlowTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowTable")
            .field("len", &self.table.len())
            .finish_non_exhaustive()
    }
}

impl FlowTable {
    fn len(&self) -> usize {
        self.table.len()
    }

    fn get(&self, key: &FlowKey) -> Option<&Tracked> {
        let hash = self.hasher.hash_one(key);
        self.table.find(hash, |t| t.key == *key).map(|t| &**t)
    }

    fn get_mut(&mut self, key: &FlowKey) -> Option<&mut Tracked> {
        let hash = self.hasher.hash_one(key);
        self.table
            .find_mut(hash, |t| t.key == *key)
            .map(|t| &mut **t)
    }

    fn contains(&self, key: &FlowKey) -> bool {
        self.get(key).is_some()
    }

    /// Inserts a flow that is not in the table.
    fn insert_new(&mut self, t: Box<Tracked>) -> &mut Tracked {
        let Self { table, hasher } = self;
        let hash = hasher.hash_one(t.key);
        table
            .insert_unique(hash, t, |t| hasher.hash_one(t.key))
            .into_mut()
    }

    fn remove(&mut self, key: &FlowKey) -> Option<Box<Tracked>> {
        let hash = self.hasher.hash_one(key);
        match self.table.find_entry(hash, |t| t.key == *key) {
            Ok(entry) => Some(entry.remove().0),
            Err(_) => None,
        }
    }

    fn iter(&self) -> impl Iterator<Item = &Tracked> {
        self.table.iter().map(|t| &**t)
    }

    /// Every flow, leaving the table empty (and its memory freed). The boxes stay
    /// boxed: a drain moves pointers, not every entry.
    #[allow(clippy::vec_box)]
    fn take_all(&mut self) -> Vec<Box<Tracked>> {
        let all = self.table.drain().collect();
        self.table = hashbrown::HashTable::new();
        all
    }
}

/// The agent's view of live flows.
#[derive(Debug)]
pub struct FlowTracker {
    opts: TrackerOptions,
    /// With no conduit map every flow is recorded (foundation behaviour).
    policy_loaded: bool,
    flows: FlowTable,
    next_flow_id: u64,
    /// Number of the current sweep; a tracked flow a sweep did not see is gone.
    epoch: u32,
    /// New flows not tracked because the tracker was full (they have no record).
    refused: u64,
    /// Flows whose announcement the kernel lost, found in the table instead.
    recovered: u64,
    /// Earlier incarnations of a five-tuple, ended when a new one appeared (see
    /// [`FlowTracker::renew`]): their records, taken by the caller at once...
    retired_out: Vec<FlowOut>,
    /// ...and their counts, reported with the next sweep's.
    retired_evicted: u64,
    retired_unrecorded: u64,
}

impl FlowTracker {
    pub fn new(opts: TrackerOptions, policy_loaded: bool) -> Self {
        FlowTracker {
            opts,
            policy_loaded,
            flows: FlowTable::default(),
            // Flow ids are unique within a spool: a restart continues after the highest
            // stored one (`continue_ids_after`).
            next_flow_id: 1,
            refused: 0,
            recovered: 0,
            epoch: 0,
            retired_out: Vec::new(),
            retired_evicted: 0,
            retired_unrecorded: 0,
        }
    }

    /// Continues flow ids after `max` (the highest id a previous run stored).
    pub fn continue_ids_after(&mut self, max: u64) {
        self.next_flow_id = self.next_flow_id.max(max + 1);
    }

    /// `replay` at the end of its capture: no later packet can come, so flows that
    /// ended (FIN from both sides, RST) end now, without the grace for late ACKs.
    pub fn capture_over(&mut self) {
        self.opts.end_grace = Duration::ZERO;
    }

    pub fn set_policy_loaded(&mut self, loaded: bool) {
        self.policy_loaded = loaded;
    }

    /// Number of live flows.
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.len() == 0
    }

    /// New flows refused because the tracker was full, since the start.
    pub fn refused(&self) -> u64 {
        self.refused
    }

    /// Counts `n` flows as refused: unannounced flows the full tracker could not
    /// take before the drain's last walk.
    pub fn refuse(&mut self, n: u64) {
        self.refused += n;
    }

    /// Unannounced flows found in the table, since the start.
    pub fn recovered(&self) -> u64 {
        self.recovered
    }

    fn recordable(&self, class: Option<&Classification>) -> bool {
        !self.policy_loaded
            || self.opts.record_all
            || class.is_some_and(Classification::must_record)
    }

    /// Records of earlier incarnations ended since the last call (see
    /// [`FlowTracker::renew`]); write them before any record the same event returns.
    pub fn take_retired(&mut self) -> Vec<FlowOut> {
        std::mem::take(&mut self.retired_out)
    }

    /// Ends the tracked flow of `key` if `stats` is a later incarnation of the
    /// five-tuple: the LRU evicted the tracked one, and the same five-tuple came
    /// back, before a sweep noticed. Each kernel entry is stamped with its first
    /// packet's time, which never changes while the entry lives, so a different
    /// `first_seen_ns` is a different flow. The old one ends as an eviction
    /// (`lack of resources`, its last counts), the new one gets a flow id of its own.
    /// A snapshot of an earlier incarnation than the tracked one (its announcement
    /// read late) is such an ended flow too. Returns whether `stats` belongs to the
    /// tracked flow (or none is tracked).
    fn renew(&mut self, key: &FlowKey, stats: &FlowStats) -> bool {
        let Some(later) = self
            .flows
            .get(key)
            .filter(|t| !t.held.same_entry(stats))
            .map(|t| stats.first_seen_ns > t.held.first_seen_ns)
        else {
            return true;
        };
        let ended = if later {
            self.flows.remove(key)
        } else {
            Some(self.new_flow(*key, stats, 0))
        };
        if let Some(t) = ended {
            let recordable = self.recordable(t.class.as_deref());
            if evict(t, recordable, &mut self.retired_out) {
                self.retired_evicted += 1;
            } else {
                self.retired_unrecorded += 1;
            }
        }
        later
    }

    /// A new flow with the next flow id, not yet in the table.
    fn new_flow(&mut self, key: FlowKey, stats: &FlowStats, now_ns: u64) -> Box<Tracked> {
        let flow_id = self.next_flow_id;
        self.next_flow_id += 1;
        Box::new(Tracked {
            key,
            flow_id,
            last_report_ns: now_ns,
            held: Held::of(stats),
            class: None,
            seen: self.epoch,
            recorded: false,
            class_final: false,
        })
    }

    /// The flow's entry, created if there is room. Callers [`FlowTracker::renew`]
    /// first, so an entry found is the same flow.
    fn track(&mut self, key: FlowKey, stats: FlowStats, now_ns: u64) -> Option<&mut Tracked> {
        if self.flows.contains(&key) {
            return self.flows.get_mut(&key);
        }
        if self.flows.len() >= self.opts.max_flows {
            return None;
        }
        let t = self.new_flow(key, &stats, now_ns);
        Some(self.flows.insert_new(t))
    }

    /// A new flow reported by the kernel. Its `flow_start` waits for the
    /// classification (or its deadline), so it carries the verdict. Past the bound
    /// the flow is counted as refused and never tracked.
    pub fn on_new(&mut self, key: FlowKey, stats: FlowStats, now_ns: u64) {
        if !self.renew(&key, &stats) {
            return;
        }
        if self.track(key, stats, now_ns).is_none() {
            self.refused += 1;
        }
    }

    /// Classification finished (kernel or agent). Returns the `flow_start` if this
    /// makes the flow recordable, so a violation is visible at once. A flow that is
    /// not tracked was refused (and counted) already, unless the kernel lost its
    /// announcement: then this recovers it.
    pub fn on_classified(
        &mut self,
        key: FlowKey,
        stats: FlowStats,
        class: Classification,
        now_ns: u64,
    ) -> Option<FlowOut> {
        if !self.renew(&key, &stats) {
            return None;
        }
        let known = self.flows.contains(&key);
        let unannounced = stats.state & flow_state::UNANNOUNCED != 0;
        if !known && !unannounced {
            return None;
        }
        let recordable = self.recordable(Some(&class));
        if !known {
            if self.flows.len() >= self.opts.max_flows {
                return None;
            }
            self.recovered += 1;
        }
        let t = self.track(key, stats, now_ns)?;
        t.held.merge(&stats);
        t.class_final = true;
        // One verdict, decided once: a flow_start already written keeps its
        // classification (a ClientHello completed past the deadline).
        if t.recorded {
            return None;
        }
        let mut class = class;
        // A ServerHello read before the ClientHello was done stays.
        if class.negotiated.is_none() {
            class.negotiated = t.class.as_mut().and_then(|c| c.negotiated.take());
        }
        t.class = Some(Box::new(class));
        if !recordable {
            return None;
        }
        Some(start(t))
    }

    /// The agent found the flow is not TLS/QUIC (or gave up): its classification is
    /// final as the kernel has it. Returns the `flow_start` if it is recorded.
    /// With an `anomaly`, the flow is recorded in every mode and carries it.
    pub fn on_unclassified(
        &mut self,
        key: FlowKey,
        stats: FlowStats,
        anomaly: Option<&'static str>,
    ) -> Option<FlowOut> {
        let policy_loaded = self.policy_loaded;
        let record_all = self.opts.record_all;
        if !self.renew(&key, &stats) {
            return None;
        }
        let t = self.flows.get_mut(&key)?;
        t.held.merge(&stats);
        t.class_final = true;
        if let Some(a) = anomaly {
            let class = t.class.get_or_insert_with(Box::default);
            // Only a TLS record or QUIC Initial gets this far.
            class
                .app_protocol
                .get_or_insert_with(|| if key.protocol == 17 { "quic" } else { "tls" }.to_owned());
            if !class.anomalies.contains(&a) {
                class.anomalies.push(a);
            }
        }
        if t.recorded || !(!policy_loaded || record_all || t.must_record()) {
            return None;
        }
        Some(start(t))
    }

    /// Whether the agent's classification of the flow is final.
    pub fn hello_read(&self, key: &FlowKey) -> bool {
        self.flows.get(key).is_some_and(|t| t.class_final)
    }

    /// A second hello contested the flow's first (see `Completed::Contested`): its
    /// classification is now `class`. Returns the record that says so at once: the
    /// `flow_start` if this makes the flow recordable, a `flow_update` if it was
    /// recorded already.
    pub fn on_contested(&mut self, key: &FlowKey, class: Classification) -> Option<FlowOut> {
        let recordable = self.recordable(Some(&class));
        let t = self.flows.get_mut(key)?;
        t.class = Some(Box::new(class));
        if t.recorded {
            return Some(out(t, RecordKind::FlowUpdate, FlowEndReason::Unspecified));
        }
        recordable.then(|| start(t))
    }

    /// The flow's ServerHello was read: its later records carry what it negotiated.
    pub fn on_server_hello(&mut self, key: &FlowKey, negotiated: crate::tls::Negotiated) {
        if let Some(t) = self.flows.get_mut(key) {
            t.class.get_or_insert_with(Box::default).negotiated = Some(negotiated);
        }
    }

    /// Current classification of a flow, if tracked.
    pub fn classification(&self, key: &FlowKey) -> Option<&Classification> {
        self.flows.get(key).and_then(|t| t.class.as_deref())
    }

    /// Walks a snapshot of the kernel table taken at `now_ns` (see
    /// [`FlowTracker::sweep_entry`]).
    pub fn sweep(
        &mut self,
        now_ns: u64,
        entries: &[(FlowKey, FlowStats)],
        kernel_class: &dyn Fn(&FlowKey, &FlowStats) -> Option<Classification>,
    ) -> Sweep {
        let mut sweep = self.begin_sweep(now_ns);
        for (key, stats) in entries {
            self.sweep_entry(&mut sweep, key, stats, kernel_class);
        }
        self.end_sweep(&mut sweep);
        sweep
    }

    /// Starts a walk over the kernel table; feed every entry to
    /// [`FlowTracker::sweep_entry`], then call [`FlowTracker::end_sweep`]. The walk
    /// streams: no copy of the table is held.
    pub fn begin_sweep(&mut self, now_ns: u64) -> Sweep {
        self.epoch = self.epoch.wrapping_add(1);
        Sweep {
            now_ns,
            ..Sweep::default()
        }
    }

    /// One entry of the kernel table.
    ///
    /// `kernel_class` turns a kernel-side classification (ids in [`FlowStats`]) into
    /// names, for flows the agent has no classification of its own for.
    pub fn sweep_entry(
        &mut self,
        sweep: &mut Sweep,
        key: &FlowKey,
        stats: &FlowStats,
        kernel_class: &dyn Fn(&FlowKey, &FlowStats) -> Option<Classification>,
    ) {
        let now_ns = sweep.now_ns;
        let deadline = nanos(self.opts.classification_deadline);
        let idle = nanos(self.opts.idle_timeout);
        let active = nanos(self.opts.active_timeout);
        let grace = nanos(self.opts.end_grace);
        let policy_loaded = self.policy_loaded;
        let record_all = self.opts.record_all;
        let epoch = self.epoch;
        // A walk reads the live entry, never an older incarnation than the tracked.
        self.renew(key, stats);
        sweep.out.append(&mut self.retired_out);
        // Only flows the kernel could not announce are picked up here: any other
        // untracked flow was refused (counted) or its announcement is still in the
        // ring buffer.
        let known = self.flows.contains(key);
        if !known && stats.state & flow_state::UNANNOUNCED == 0 {
            return;
        }
        if !known {
            if self.flows.len() >= self.opts.max_flows {
                if sweep.pending.insert(*key) {
                    sweep.unannounced_pending += 1;
                }
                return;
            }
            self.recovered += 1;
        }
        let Some(t) = self.track(*key, *stats, now_ns) else {
            return;
        };
        t.seen = epoch;
        t.held.merge(stats);
        // The kernel's classification stands when the agent has none of its own
        // and no flow_start fixed it yet.
        if !t.recorded
            && !t.class_final
            && let Some(class) = kernel_class(key, stats)
        {
            t.class = Some(Box::new(class));
        }
        let recordable = !policy_loaded || record_all || t.must_record();
        // Classification is over when the agent finished it, the kernel marked it
        // done (not TLS/QUIC, or the agent's result merged), or its deadline passed.
        let classified = t.class_final
            || stats.sni_state == sni_state::DONE
            || now_ns.saturating_sub(t.held.first_seen_ns) >= deadline;

        let ended = stats.state & (flow_state::RST) != 0
            || stats.state & (flow_state::FIN_FORWARD | flow_state::FIN_REVERSE)
                == (flow_state::FIN_FORWARD | flow_state::FIN_REVERSE);
        let reason = if ended {
            (now_ns.saturating_sub(t.held.last_seen_ns) >= grace)
                .then_some(FlowEndReason::EndOfFlow)
        } else if now_ns.saturating_sub(stats.last_seen_ns) >= idle {
            Some(FlowEndReason::IdleTimeout)
        } else {
            None
        };
        if !t.recorded && recordable && (classified || reason.is_some()) {
            sweep.out.push(start(t));
        }

        if let Some(reason) = reason {
            sweep.remove.push(*key);
            if let Some(t) = self.flows.remove(key) {
                if t.recorded {
                    sweep.out.push(out(&t, RecordKind::FlowEnd, reason));
                } else {
                    sweep.unrecorded_ended += 1;
                }
            }
        } else if t.recorded && now_ns.saturating_sub(t.last_report_ns) >= active {
            t.last_report_ns = now_ns;
            sweep
                .out
                .push(out(t, RecordKind::FlowUpdate, FlowEndReason::Unspecified));
        }
    }

    /// Ends the walk. Tracked flows are in the kernel table before the walk started
    /// (their announcement was read first), so any the walk did not see are gone:
    /// the LRU evicted them.
    ///
    /// Why the walk misses no entry that is in the table throughout, even while the
    /// LRU evicts: it steps with `BPF_MAP_GET_NEXT_KEY` from the last key it read.
    /// The kernel finds that key again by lookup and continues after it in its
    /// bucket, then in the following buckets; when the key is gone (evicted or
    /// deleted meanwhile) it starts again from the first bucket. Deleting other
    /// entries does not unlink the ones still there, and entries never move between
    /// buckets, so every entry present from the walk's start to its end is
    /// returned at least once (a restart returns some twice, which `seen` and
    /// `pending` absorb). A key read whose value is gone by the lookup is skipped:
    /// that flow was evicted and is handled as above. Entries inserted during the
    /// walk may be missed; they are new, announced through the ring buffer (then
    /// tracked, and swept next time) or marked UNANNOUNCED (counted by the kernel
    /// before the snapshot of the next walk, which sees them or counts them lost).
    /// So each flow ends up recorded (tracked flows get a `flow_start` at the
    /// latest with their `flow_end`) or counted once: refused by the tracker,
    /// unrecorded by policy, or lost unannounced. A five-tuple the LRU evicts and
    /// that comes back before a walk noticed is told apart by its entry's first
    /// packet time ([`FlowTracker::renew`]): two flows, two flow ids.
    pub fn end_sweep(&mut self, sweep: &mut Sweep) {
        let epoch = self.epoch;
        let gone: Vec<FlowKey> = self
            .flows
            .iter()
            .filter(|t| t.seen != epoch)
            .map(|t| t.key)
            .collect();
        sweep.out.append(&mut self.retired_out);
        sweep.evicted += std::mem::take(&mut self.retired_evicted);
        sweep.unrecorded_ended += std::mem::take(&mut self.retired_unrecorded);
        for key in gone {
            if let Some(t) = self.flows.remove(&key) {
                let recordable = self.recordable(t.class.as_deref());
                if evict(t, recordable, &mut sweep.out) {
                    sweep.evicted += 1;
                } else {
                    sweep.unrecorded_ended += 1;
                }
            }
        }
    }

    /// Takes the latest totals of a flow (final snapshot before a drain).
    pub fn update_stats(&mut self, key: &FlowKey, stats: &FlowStats) {
        if let Some(t) = self.flows.get_mut(key)
            && t.held.same_entry(stats)
        {
            t.held.merge(stats);
        }
    }

    /// Takes every flow out of the tracker: those that are recorded (or
    /// recordable, still waiting for their classification) in flow id order, and
    /// the number that leave unrecorded (not AI traffic). [`Drained::close`] then
    /// ends them one at a time, so a drain holds no copy of every record.
    pub fn drain_all(&mut self) -> (Vec<Drained>, u64) {
        let (policy_loaded, record_all) = (self.policy_loaded, self.opts.record_all);
        let all = self.flows.take_all();
        let before = all.len();
        let mut keep: Vec<Drained> = all
            .into_iter()
            .filter(|t| t.recorded || !policy_loaded || record_all || t.must_record())
            .map(Drained)
            .collect();
        keep.sort_unstable_by_key(|d| d.0.flow_id);
        let unrecorded = (before - keep.len()) as u64;
        (keep, unrecorded)
    }

    /// Ends every recorded flow (`forced`), e.g. on shutdown, with the totals of the
    /// final snapshot.
    pub fn drain(&mut self, entries: &[(FlowKey, FlowStats)]) -> Vec<FlowOut> {
        for (key, stats) in entries {
            self.update_stats(key, stats);
        }
        let (flows, _) = self.drain_all();
        flows.into_iter().flat_map(Drained::close).collect()
    }
}

/// A flow taken out of the tracker by [`FlowTracker::drain_all`].
#[derive(Debug)]
pub struct Drained(Box<Tracked>);

impl Drained {
    /// Its `flow_start` if it was still waiting for its classification, then its
    /// `flow_end` (`forced`).
    pub fn close(self) -> Vec<FlowOut> {
        let mut t = self.0;
        let mut outs = Vec::with_capacity(2);
        if !t.recorded {
            outs.push(start(&mut t));
        }
        outs.push(out(&t, RecordKind::FlowEnd, FlowEndReason::ForcedEnd));
        outs
    }
}

/// Ends a flow the kernel table no longer holds: a recorded (or recordable) flow
/// gets its `flow_end` (lack of resources), preceded by its `flow_start` if it was
/// still waiting for its classification. Returns whether it has records (else it
/// leaves unrecorded).
fn evict(mut t: Box<Tracked>, recordable: bool, records: &mut Vec<FlowOut>) -> bool {
    if !t.recorded && recordable {
        records.push(start(&mut t));
    }
    if t.recorded {
        records.push(out(&t, RecordKind::FlowEnd, FlowEndReason::LackOfResources));
    }
    t.recorded
}

fn start(t: &mut Tracked) -> FlowOut {
    t.recorded = true;
    out(t, RecordKind::FlowStart, FlowEndReason::Unspecified)
}

fn out(t: &Tracked, kind: RecordKind, end_reason: FlowEndReason) -> FlowOut {
    FlowOut {
        kind,
        flow_id: t.flow_id,
        key: t.key,
        stats: t.held.stats(),
        class: t.class.as_deref().cloned().unwrap_or_default(),
        end_reason,
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn key(port: u16) -> FlowKey {
        FlowKey {
            addr_lo: [10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            addr_hi: [10, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            port_lo: port,
            port_hi: 443,
            vlan: 0,
            protocol: 6,
            family: 4,
        }
    }

    fn stats(last_seen: u64, packets: u64, state: u8) -> FlowStats {
        FlowStats {
            first_seen_ns: S,
            last_seen_ns: last_seen,
            packets: [packets, packets],
            bytes: [packets * 60, packets * 60],
            ..FlowStats::default()
        }
        .with_state(state)
    }

    trait WithState {
        fn with_state(self, state: u8) -> Self;
    }
    impl WithState for FlowStats {
        fn with_state(mut self, state: u8) -> Self {
            self.state = state;
            self
        }
    }

    fn none(_: &FlowKey, _: &FlowStats) -> Option<Classification> {
        None
    }

    fn opts() -> TrackerOptions {
        TrackerOptions {
            idle_timeout: Duration::from_secs(10),
            active_timeout: Duration::from_secs(60),
            end_grace: Duration::from_secs(2),
            record_all: false,
            max_flows: DEFAULT_TRACKED_FLOWS as usize,
            classification_deadline: Duration::from_secs(3),
        }
    }

    #[test]
    fn a_tracked_flow_stays_small() {
        // The RSS budget (README, Limits): 136 bytes per entry (a 144-byte malloc
        // chunk, as 128 bytes were) plus its bucket.
        assert_eq!(size_of::<Tracked>(), 136);
    }

    #[test]
    fn without_policy_every_flow_starts_updates_and_ends_idle() {
        let mut tr = FlowTracker::new(opts(), false);
        tr.on_new(key(1), stats(S, 1, 0), S);

        // Not classified yet, and within the deadline: no flow_start yet.
        let sw = tr.sweep(2 * S, &[(key(1), stats(2 * S, 2, 0))], &none);
        assert!(sw.out.is_empty() && sw.remove.is_empty());
        // Past the deadline the flow_start is written with what is known.
        let sw = tr.sweep(5 * S, &[(key(1), stats(4 * S, 3, 0))], &none);
        assert_eq!(sw.out.len(), 1);
        assert_eq!(sw.out[0].kind, RecordKind::FlowStart);
        assert!(sw.remove.is_empty());

        let sw = tr.sweep(62 * S, &[(key(1), stats(61 * S, 9, 0))], &none);
        assert_eq!(sw.out.len(), 1);
        assert_eq!(sw.out[0].kind, RecordKind::FlowUpdate);
        assert_eq!(sw.out[0].stats.packets, [9, 9]);

        let sw = tr.sweep(72 * S, &[(key(1), stats(61 * S, 9, 0))], &none);
        assert_eq!(sw.out[0].kind, RecordKind::FlowEnd);
        assert_eq!(sw.out[0].end_reason, FlowEndReason::IdleTimeout);
        assert_eq!(sw.remove, vec![key(1)]);
        assert!(tr.is_empty());
    }

    #[test]
    fn fin_from_both_sides_ends_after_grace() {
        let mut tr = FlowTracker::new(opts(), false);
        tr.on_new(key(2), stats(S, 1, 0), S);
        let fin = flow_state::FIN_FORWARD | flow_state::FIN_REVERSE;
        assert!(
            tr.sweep(3 * S, &[(key(2), stats(3 * S, 5, fin))], &none)
                .out
                .is_empty()
        );
        let sw = tr.sweep(5 * S, &[(key(2), stats(3 * S, 6, fin))], &none);
        // Ended before its classification deadline: flow_start, then flow_end.
        assert_eq!(sw.out[0].kind, RecordKind::FlowStart);
        assert_eq!(sw.out[1].end_reason, FlowEndReason::EndOfFlow);
        assert_eq!(sw.out[1].stats.packets, [6, 6]);
    }

    #[test]
    fn flow_start_waits_for_the_classification_and_carries_it() {
        let mut tr = FlowTracker::new(
            TrackerOptions {
                record_all: true,
                ..opts()
            },
            true,
        );
        tr.on_new(key(8), stats(S, 1, 0), S);
        // The ClientHello is still being reassembled: nothing written at the sweep.
        let mut pending = stats(S, 2, 0);
        pending.sni_state = sni_state::PENDING;
        assert!(tr.sweep(2 * S, &[(key(8), pending)], &none).out.is_empty());
        let class = Classification {
            verdict: Verdict::Authorized,
            server_name: Some("api.openai.com".into()),
            ..Classification::default()
        };
        let start = tr.on_classified(key(8), pending, class.clone(), 2 * S);
        assert_eq!(start.map(|o| o.class), Some(class.clone()));
        // Decided once: nothing later changes it.
        let other = Classification {
            verdict: Verdict::Violation,
            ..Classification::default()
        };
        assert!(tr.on_classified(key(8), pending, other, 3 * S).is_none());
        assert_eq!(tr.classification(&key(8)), Some(&class));

        // A flow the kernel classified on its own (not TLS: done) starts at the sweep.
        tr.on_new(key(9), stats(S, 1, 0), S);
        let mut done = stats(S, 1, 0);
        done.sni_state = sni_state::DONE;
        let sw = tr.sweep(2 * S, &[(key(8), pending), (key(9), done)], &none);
        assert_eq!(sw.out.len(), 1);
        assert_eq!(sw.out[0].key, key(9));
        assert_eq!(sw.out[0].kind, RecordKind::FlowStart);

        // The agent found no TLS: the flow_start is written at once.
        tr.on_new(key(10), stats(S, 1, 0), S);
        let out = tr.on_unclassified(key(10), stats(S, 1, 0), None);
        assert_eq!(out.map(|o| o.kind), Some(RecordKind::FlowStart));
    }

    #[test]
    fn a_client_hello_that_defeats_parsing_is_recorded_with_its_anomaly() {
        // The default mode: a map is loaded, only AI flows are recorded.
        let mut tr = FlowTracker::new(opts(), true);
        tr.on_new(key(11), stats(S, 1, 0), S);
        tr.on_new(key(12), stats(S, 1, 0), S);
        // Not TLS at all: not AI traffic, not recorded.
        assert!(tr.on_unclassified(key(11), stats(S, 1, 0), None).is_none());
        // A hello over the reassembly bound: recorded, with why its SNI is unknown.
        let out = tr
            .on_unclassified(key(12), stats(S, 2, 0), Some(anomaly::REASSEMBLY_LIMIT))
            .expect("recorded");
        assert_eq!(out.kind, RecordKind::FlowStart);
        assert_eq!(out.class.anomalies, vec![anomaly::REASSEMBLY_LIMIT]);
        assert_eq!(out.class.app_protocol.as_deref(), Some("tls"));
        assert_eq!(out.class.verdict, Verdict::Unspecified);
        // It ends like any recorded flow.
        let mut ended = stats(S, 2, 0);
        ended.state = flow_state::RST;
        let sw = tr.sweep(20 * S, &[(key(12), ended)], &none);
        assert!(
            sw.out
                .iter()
                .any(|o| o.key == key(12) && o.kind == RecordKind::FlowEnd)
        );
    }

    #[test]
    fn a_flow_waiting_for_its_classification_is_closed_with_both_records() {
        let mut tr = FlowTracker::new(opts(), false);
        // Evicted before its classification finished: flow_start + flow_end.
        tr.on_new(key(11), stats(S, 1, 0), S);
        let sw = tr.sweep(2 * S, &[], &none);
        let kinds: Vec<_> = sw.out.iter().map(|o| o.kind).collect();
        assert_eq!(kinds, [RecordKind::FlowStart, RecordKind::FlowEnd]);
        assert_eq!(sw.evicted, 1);
        // Drained before its classification finished: flow_start + forced end.
        tr.on_new(key(12), stats(S, 1, 0), S);
        let out = tr.drain(&[(key(12), stats(S, 2, 0))]);
        let kinds: Vec<_> = out.iter().map(|o| o.kind).collect();
        assert_eq!(kinds, [RecordKind::FlowStart, RecordKind::FlowEnd]);
        assert_eq!(out[1].end_reason, FlowEndReason::ForcedEnd);
    }

    #[test]
    fn with_policy_only_ai_flows_are_recorded() {
        let mut tr = FlowTracker::new(opts(), true);
        tr.on_new(key(3), stats(S, 1, 0), S);
        let class = Classification {
            verdict: Verdict::Violation,
            server_name: Some("api.openai.com".into()),
            ..Classification::default()
        };
        let start = tr.on_classified(key(3), stats(S, 2, 0), class, S);
        assert_eq!(start.map(|o| o.class.verdict), Some(Verdict::Violation));
        // Unclassified flow ends unrecorded.
        tr.on_new(key(4), stats(S, 1, 0), S);
        let sw = tr.sweep(
            20 * S,
            &[(key(3), stats(19 * S, 2, 0)), (key(4), stats(S, 1, 0))],
            &none,
        );
        assert_eq!(sw.unrecorded_ended, 1);
        assert!(sw.out.is_empty());
    }

    #[test]
    fn vanished_recorded_flow_is_an_eviction() {
        let mut tr = FlowTracker::new(opts(), false);
        tr.on_new(key(5), stats(S, 1, 0), S);
        tr.sweep(2 * S, &[(key(5), stats(2 * S, 4, 0))], &none);
        let sw = tr.sweep(3 * S, &[], &none);
        assert_eq!(sw.evicted, 1);
        let end = sw.out.last().expect("a flow_end");
        assert_eq!(end.end_reason, FlowEndReason::LackOfResources);
        assert_eq!(end.stats.packets, [4, 4]);
    }

    #[test]
    fn flow_evicted_before_any_sweep_leaves_the_tracker() {
        let mut tr = FlowTracker::new(opts(), false);
        tr.on_new(key(7), stats(S, 1, 0), S);
        let sw = tr.sweep(2 * S, &[], &none);
        assert_eq!(sw.evicted, 1);
        assert_eq!(
            sw.out.last().map(|o| o.end_reason),
            Some(FlowEndReason::LackOfResources)
        );
        assert!(tr.is_empty());
    }

    /// A later incarnation of the same five-tuple: the entry was evicted and
    /// re-created between two walks.
    fn reborn(first_seen: u64, last_seen: u64, packets: u64) -> FlowStats {
        FlowStats {
            first_seen_ns: first_seen,
            ..stats(last_seen, packets, 0)
        }
    }

    #[test]
    fn a_five_tuple_recreated_before_a_sweep_noticed_is_a_new_flow() {
        let mut tr = FlowTracker::new(opts(), false);
        tr.on_new(key(8), stats(S, 1, 0), S);
        let sw = tr.sweep(5 * S, &[(key(8), stats(5 * S, 9, 0))], &none);
        let first_id = sw.out[0].flow_id;
        // Evicted, then the same five-tuple again, announced before the next walk.
        tr.on_new(key(8), reborn(6 * S, 6 * S, 1), 6 * S);
        let retired = tr.take_retired();
        assert_eq!(retired.len(), 1);
        assert_eq!(retired[0].flow_id, first_id);
        assert_eq!(retired[0].kind, RecordKind::FlowEnd);
        assert_eq!(retired[0].end_reason, FlowEndReason::LackOfResources);
        assert_eq!(retired[0].stats.packets, [9, 9]);
        // The new flow has its own id and its own counts, not the old ones'.
        let sw = tr.sweep(9 * S, &[(key(8), reborn(6 * S, 9 * S, 2))], &none);
        assert_eq!(sw.evicted, 1);
        let start = &sw.out[0];
        assert_eq!(start.kind, RecordKind::FlowStart);
        assert_ne!(start.flow_id, first_id);
        assert_eq!(start.stats.packets, [2, 2]);
        assert_eq!(start.stats.first_seen_ns, 6 * S);
        assert_eq!(tr.len(), 1);
    }

    #[test]
    fn a_walk_that_meets_the_new_incarnation_first_ends_the_old_one() {
        let mut tr = FlowTracker::new(opts(), false);
        tr.on_new(key(9), stats(S, 1, 0), S);
        tr.sweep(5 * S, &[(key(9), stats(5 * S, 5, 0))], &none);
        // Its announcement is still in the ring buffer: the walk ends the old
        // flow and leaves the new one to its announcement.
        let sw = tr.sweep(7 * S, &[(key(9), reborn(6 * S, 7 * S, 1))], &none);
        assert_eq!(sw.evicted, 1);
        assert_eq!(sw.out.len(), 1);
        assert_eq!(sw.out[0].end_reason, FlowEndReason::LackOfResources);
        assert_eq!(sw.out[0].stats.packets, [5, 5]);
        assert!(tr.is_empty());
        tr.on_new(key(9), reborn(6 * S, 6 * S, 1), 7 * S);
        assert!(tr.take_retired().is_empty());
        assert_eq!((tr.len(), tr.refused()), (1, 0));
    }

    #[test]
    fn a_late_announcement_of_an_earlier_incarnation_is_its_own_flow() {
        let mut tr = FlowTracker::new(opts(), false);
        // The walk recovered the new incarnation (its announcement was lost)...
        let lost = FlowStats {
            state: flow_state::UNANNOUNCED,
            ..reborn(3 * S, 3 * S, 1)
        };
        let sw = tr.sweep(6 * S, &[(key(10), lost)], &none);
        let new_id = sw.out[0].flow_id;
        // ...then the earlier one's announcement is read: recorded and ended, and
        // the tracked flow keeps its own counts.
        tr.on_new(key(10), stats(S, 4, 0), 6 * S);
        let retired = tr.take_retired();
        assert_eq!(retired.len(), 2);
        assert_eq!(retired[0].kind, RecordKind::FlowStart);
        assert_eq!(retired[1].end_reason, FlowEndReason::LackOfResources);
        assert_ne!(retired[1].flow_id, new_id);
        assert_eq!(retired[1].stats.packets, [4, 4]);
        assert_eq!((tr.len(), tr.refused()), (1, 0));
        let sw = tr.sweep(7 * S, &[(key(10), reborn(3 * S, 7 * S, 3))], &none);
        assert_eq!(sw.evicted, 1);
        assert!(sw.out.is_empty());
    }

    #[test]
    fn with_policy_an_unrecorded_old_incarnation_is_counted_unrecorded() {
        let mut tr = FlowTracker::new(opts(), true);
        tr.on_new(key(11), stats(S, 1, 0), S);
        tr.on_new(key(11), reborn(3 * S, 3 * S, 1), 3 * S);
        assert!(tr.take_retired().is_empty());
        let sw = tr.sweep(4 * S, &[(key(11), reborn(3 * S, 4 * S, 1))], &none);
        assert_eq!((sw.evicted, sw.unrecorded_ended), (0, 1));
        assert_eq!(tr.len(), 1);
    }

    #[test]
    fn past_its_bound_the_tracker_counts_and_does_not_grow() {
        let mut tr = FlowTracker::new(
            TrackerOptions {
                max_flows: 2,
                ..opts()
            },
            false,
        );
        for p in 10..15 {
            tr.on_new(key(p), stats(S, 1, 0), S);
        }
        assert_eq!((tr.len(), tr.refused()), (2, 3));
        // Refused flows stay unrecorded when a sweep sees them in the table.
        let entries: Vec<_> = (10..15).map(|p| (key(p), stats(S, 1, 0))).collect();
        let sw = tr.sweep(2 * S, &entries, &none);
        assert!(sw.out.is_empty());
        assert_eq!((tr.len(), tr.refused(), tr.recovered()), (2, 3, 0));
    }

    #[test]
    fn unannounced_flow_is_recovered_once() {
        let mut tr = FlowTracker::new(opts(), false);
        let lost = stats(S, 1, flow_state::UNANNOUNCED);
        let sw = tr.sweep(5 * S, &[(key(20), lost)], &none);
        assert_eq!(sw.out[0].kind, RecordKind::FlowStart);
        let sw = tr.sweep(6 * S, &[(key(20), lost)], &none);
        assert!(sw.out.is_empty());
        assert_eq!(tr.recovered(), 1);
    }

    #[test]
    fn an_unannounced_flow_the_full_tracker_cannot_take_is_pending_not_lost() {
        let mut tr = FlowTracker::new(
            TrackerOptions {
                max_flows: 1,
                ..opts()
            },
            false,
        );
        tr.on_new(key(30), stats(S, 1, 0), S);
        let lost = stats(S, 1, flow_state::UNANNOUNCED);
        // Met twice in one walk (a restarted walk), counted once.
        let sw = tr.sweep(
            2 * S,
            &[(key(30), stats(S, 1, 0)), (key(31), lost), (key(31), lost)],
            &none,
        );
        assert_eq!((sw.unannounced_pending, tr.recovered()), (1, 0));
        // The tracked flow left the table: this walk frees its room at the end...
        let sw = tr.sweep(3 * S, &[(key(31), lost)], &none);
        assert_eq!((sw.unannounced_pending, sw.evicted), (1, 1));
        // ...and the next walk recovers the pending one.
        let sw = tr.sweep(4 * S, &[(key(31), lost)], &none);
        assert_eq!((sw.unannounced_pending, tr.recovered()), (0, 1));
    }

    #[test]
    fn drain_forces_end_with_final_totals() {
        let mut tr = FlowTracker::new(opts(), false);
        tr.on_new(key(6), stats(S, 1, 0), S);
        let out = tr.drain(&[(key(6), stats(2 * S, 7, 0))]);
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].end_reason, FlowEndReason::ForcedEnd);
        assert_eq!(out[1].stats.packets, [7, 7]);
    }
}
