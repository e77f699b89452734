//! Types shared by the kernel programs (`sensor-ebpf`) and the agent (`sensor-user`).
//!
//! Everything here is `#[repr(C)]` with explicit padding so that both sides agree on
//! the byte layout of map keys, map values and ring-buffer events.
#![no_std]

/// Default capacity of the flow table (LRU hash); `capacity.flow_table` in
/// sensor.yaml sets it at load time. Sized so that a burst of 120,000 new flows
/// evicts nothing (README, "Limits").
pub const FLOW_TABLE_SIZE: u32 = 262_144;
/// Default ring buffer size in bytes (a power of two and a multiple of the page
/// size); `capacity.ring_buffer_bytes` sets it at load time. About 27,000 new-flow
/// events; flows whose announcement does not fit are recovered from the table by
/// the next sweep (`flow_state::UNANNOUNCED`), so the ring need not hold a burst.
/// The agent maps the data twice, so its RSS grows by twice this size.
pub const EVENTS_RINGBUF_BYTES: u32 = 1 << 22;
/// Most bytes of payload the kernel copies to userspace for a flow it could not
/// classify on its own (split ClientHello, QUIC Initial).
pub const PAYLOAD_COPY_MAX: usize = 1536;
/// Maximum number of interfaces that can be watched at once.
pub const MAX_WATCHED_IFACES: u32 = 64;
/// Maximum number of local addresses of the gateway the kernel knows about.
pub const MAX_LOCAL_ADDRS: u32 = 256;
/// Capacity of each CIDR trie (zones, endpoint networks; per address family).
pub const MAX_POLICY_CIDRS: u32 = 4096;
/// Capacity of each SNI map (exact names, suffixes).
pub const MAX_POLICY_SNI: u32 = 8192;
/// Capacity of the conduit map.
pub const MAX_POLICY_CONDUITS: u32 = 8192;
/// Policies each policy table holds at once (see [`PolicyKey`]): the one in force
/// and the next, during a reload. The tables are sized for this many of the
/// `MAX_POLICY_*` limits above, which bound one policy.
pub const POLICY_GENERATIONS: u32 = 2;

/// Address family tag stored in [`FlowKey::family`].
pub const FAMILY_IPV4: u8 = 4;
/// Address family tag stored in [`FlowKey::family`].
pub const FAMILY_IPV6: u8 = 6;

/// Index into [`FlowStats::packets`] and [`FlowStats::bytes`]: what the initiator sent.
pub const DIR_FORWARD: usize = 0;
/// Index into [`FlowStats::packets`] and [`FlowStats::bytes`]: what came back.
pub const DIR_REVERSE: usize = 1;

/// Direction-normalised five-tuple (+ outer VLAN): both directions of a flow map to
/// the same key. The `lo` side is the numerically smaller (address, port) pair.
///
/// Addresses are in network byte order; IPv4 uses the first 4 bytes, the rest is zero.
/// Ports are in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub addr_lo: [u8; 16],
    pub addr_hi: [u8; 16],
    pub port_lo: u16,
    pub port_hi: u16,
    /// Outer VLAN id, 0 when untagged.
    pub vlan: u16,
    /// IP protocol number (6 TCP, 17 UDP).
    pub protocol: u8,
    /// [`FAMILY_IPV4`] or [`FAMILY_IPV6`].
    pub family: u8,
}

/// TCP flag bits as they appear in the TCP header's flag byte.
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
    pub const URG: u8 = 0x20;
    pub const ECE: u8 = 0x40;
    pub const CWR: u8 = 0x80;
}

/// Bits of [`FlowStats::state`].
pub mod flow_state {
    /// The initiator sent a FIN.
    pub const FIN_FORWARD: u8 = 0x01;
    /// The responder sent a FIN.
    pub const FIN_REVERSE: u8 = 0x02;
    /// Either side sent a RST.
    pub const RST: u8 = 0x04;
    /// The flow's [`super::EVENT_FLOW_NEW`] was lost (ring buffer full, counted in
    /// [`super::Counter::LossNewFlowEvent`]); the agent learns of the flow from a
    /// sweep of the table instead and counts it as recovered.
    pub const UNANNOUNCED: u8 = 0x08;
    /// The responder's first payload of a TLS flow (its ServerHello) was copied to
    /// the agent, once per flow, for the negotiated version, cipher and group.
    pub const REPLY_COPIED: u8 = 0x10;
}

/// Classification progress, [`FlowStats::sni_state`].
pub mod sni_state {
    /// No payload seen yet.
    pub const NONE: u8 = 0;
    /// Payload copied to userspace; waiting for the agent to finish classification.
    pub const PENDING: u8 = 1;
    /// Classification is final (SNI found, or the flow is not TLS/QUIC).
    pub const DONE: u8 = 2;
    /// A second ClientHello began at a later forward segment while the flow's
    /// first one was pending or done (a retransmission with a different name: a
    /// decoy the server ignored, then the real one). The verdict may still rise,
    /// never fall: by the kernel's own reading of the later hello, or by the
    /// agent's updates, which the kernel keeps merging for this flow.
    pub const CONTESTED: u8 = 3;
}

/// The verdict of a flow, the one type the kernel and the agent share. The kernel
/// stores it as a `u8` in [`FlowStats::verdict`] and [`ClassUpdate::verdict`];
/// the discriminants are part of the kernel/user ABI.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Not AI traffic: counted, not recorded per flow.
    Unclassified = 0,
    /// A conduit allows it.
    Authorized = 1,
    /// AI traffic that no conduit allows (or an `alert` conduit).
    Violation = 2,
    /// A violation while enforcement is on (dropped).
    Blocked = 3,
}

impl Verdict {
    /// The stored byte back as a verdict (unknown values are `Unclassified`).
    pub const fn from_u8(v: u8) -> Verdict {
        match v {
            1 => Verdict::Authorized,
            2 => Verdict::Violation,
            3 => Verdict::Blocked,
            _ => Verdict::Unclassified,
        }
    }

    /// The name used in records and JSON (`conduit.verdict`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Verdict::Unclassified => "unclassified",
            Verdict::Authorized => "authorized",
            Verdict::Violation => "violation",
            Verdict::Blocked => "blocked",
        }
    }

    /// The one decision rule, used by the kernel and by the agent: `endpoint` says
    /// whether the responder is an AI endpoint, `conduit_action` is the [`action`] of
    /// the conduit that matched (if any), `default_action` the map's [`action`] for
    /// AI traffic no conduit allows.
    #[inline(always)]
    pub const fn decide(
        endpoint: bool,
        conduit_action: Option<u8>,
        default_action: u8,
        enforce: bool,
    ) -> Verdict {
        if !endpoint {
            return Verdict::Unclassified;
        }
        let act = match conduit_action {
            Some(a) => a,
            None if default_action == action::ALLOW => action::ALERT,
            None => default_action,
        };
        match act {
            action::ALLOW => Verdict::Authorized,
            action::BLOCK if enforce => Verdict::Blocked,
            _ => Verdict::Violation,
        }
    }
}

/// [`Verdict`] discriminants as the bytes the kernel stores.
pub mod verdict {
    use super::Verdict;
    pub const UNCLASSIFIED: u8 = Verdict::Unclassified as u8;
    pub const AUTHORIZED: u8 = Verdict::Authorized as u8;
    pub const VIOLATION: u8 = Verdict::Violation as u8;
    pub const BLOCKED: u8 = Verdict::Blocked as u8;
}

/// Application protocol detected on the flow, [`FlowStats::app_protocol`].
pub mod app_protocol {
    pub const UNKNOWN: u8 = 0;
    pub const TLS: u8 = 1;
    pub const QUIC: u8 = 2;
    /// UDP to or from port 53: the kernel copies every response to the agent
    /// ([`super::EVENT_DNS`]) for DNS attribution; nothing else is classified.
    pub const DNS: u8 = 3;
}

/// The DNS port: UDP flows to it are marked [`app_protocol::DNS`].
pub const DNS_PORT: u16 = 53;

/// Per-flow state kept in the kernel flow table (value of the LRU hash).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowStats {
    /// Boot-clock (CLOCK_BOOTTIME) ns of the first packet, tick resolution (see
    /// [`KernelConfig::boot_offset_ns`]).
    pub first_seen_ns: u64,
    /// Boot-clock ns of the latest packet, tick resolution.
    pub last_seen_ns: u64,
    /// Packets per direction, indexed by [`DIR_FORWARD`] / [`DIR_REVERSE`].
    pub packets: [u64; 2],
    /// Sum of IP total lengths per direction (IPFIX octetDeltaCount).
    pub bytes: [u64; 2],
    /// Hash of the lower-cased SNI (see [`sni_hash`]), 0 when unknown.
    pub sni_hash: u64,
    /// Interface on which the flow's first packet was observed.
    pub ifindex: u32,
    /// TCP flags seen, OR-ed per direction.
    pub tcp_flags: [u8; 2],
    /// 1 when the initiator is the `lo` side of the [`FlowKey`].
    pub initiator_is_lo: u8,
    /// [`flow_state`] bits. `ifindex..=state` form one 8-byte aligned word that the
    /// kernel updates with a single atomic OR.
    pub state: u8,
    /// Zone of the initiator (index into the agent's zone table, 0 = none).
    pub zone_id: u16,
    /// AI endpoint class of the responder (0 = none).
    pub endpoint_id: u16,
    /// Conduit that matched (0 = none).
    pub conduit_id: u16,
    /// [`verdict`] value.
    pub verdict: u8,
    /// [`sni_state`] value.
    pub sni_state: u8,
    /// [`app_protocol`] value.
    pub app_protocol: u8,
    /// Forward payload packets copied to the agent so far (bounded by
    /// [`MAX_PAYLOAD_COPIES`]).
    pub payload_copies: u8,
    /// Ethernet source address of the flow's first packet when the initiator sent
    /// it (zero when the first packet seen came from the responder).
    pub initiator_mac: [u8; 6],
}

/// Most forward payload packets of one flow the kernel copies to the agent while
/// the flow is [`sni_state::PENDING`] (a ClientHello over several TCP segments, or
/// CRYPTO frames over several QUIC Initials).
pub const MAX_PAYLOAD_COPIES: u8 = 48;

/// Capacity of `CLASS_UPDATES`.
pub const MAX_CLASS_UPDATES: u32 = 4096;

/// The agent's classification of a flow (value of `CLASS_UPDATES`, keyed by
/// [`FlowKey`]). The kernel merges it into the flow on the flow's next packet and
/// sets [`sni_state::DONE`]: the agent never writes the flow table itself, so no
/// packet the kernel counts concurrently can be lost to a read-modify-write.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClassUpdate {
    pub sni_hash: u64,
    pub zone_id: u16,
    pub endpoint_id: u16,
    pub conduit_id: u16,
    pub verdict: u8,
    pub app_protocol: u8,
}

/// Ring-buffer event kinds ([`EventHeader::kind`]). Only what the agent uses is
/// emitted: flow ends and the kernel's own classifications reach it through the
/// sweep of the flow table (kinds 2 and 4 are retired).
pub const EVENT_FLOW_NEW: u8 = 1;
/// Payload the kernel could not classify on its own ([`PayloadEvent`]).
pub const EVENT_PAYLOAD: u8 = 3;
/// A DNS response (UDP from port 53), copied as it is in a [`PayloadEvent`].
pub const EVENT_DNS: u8 = 5;

/// Common prefix of every ring-buffer event.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventHeader {
    /// One of the `EVENT_*` constants.
    pub kind: u8,
    /// [`DIR_FORWARD`] or [`DIR_REVERSE`] of the packet that caused the event.
    pub direction: u8,
    pub _pad: [u8; 2],
    /// Interface the packet was observed on.
    pub ifindex: u32,
    /// `bpf_ktime_get_boot_ns` when the event was emitted.
    pub ts_ns: u64,
    pub key: FlowKey,
}

/// A new flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowEvent {
    pub header: EventHeader,
    pub stats: FlowStats,
}

/// Payload copied for userspace classification.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PayloadEvent {
    pub header: EventHeader,
    /// TCP sequence number of the first payload byte (host order), 0 for UDP.
    pub tcp_seq: u32,
    /// Bytes of payload the packet carried (may exceed `data`).
    pub payload_len: u32,
    /// Bytes copied into `data` (at most [`PAYLOAD_COPY_MAX`]).
    pub copied_len: u32,
    pub _pad: u32,
    pub data: [u8; PAYLOAD_COPY_MAX],
}

/// Conduit actions ([`ConduitValue::action`], [`KernelConfig::default_action`]).
pub mod action {
    pub const ALLOW: u8 = 0;
    pub const ALERT: u8 = 1;
    pub const BLOCK: u8 = 2;
}

/// Protocol of a [`ConduitKey`] (the conduit map's `protocols: [tls, quic]`).
pub mod conduit_proto {
    pub const TLS: u8 = 1;
    pub const QUIC: u8 = 2;
}

/// Key data of the `CONDUITS` LPM trie: (source zone, endpoint, protocol,
/// destination port), all big-endian so that a prefix can end inside the port.
///
/// The agent compiles each conduit's port ranges into disjoint prefixes of the port
/// (a conduit without `ports:` is the one prefix of length
/// [`CONDUIT_KEY_FIXED_BITS`]), resolving overlaps by file order as the agent's
/// classifier does; the kernel looks up the full key ([`CONDUIT_KEY_BITS`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConduitKey {
    pub zone: [u8; 2],
    pub endpoint: [u8; 2],
    /// [`conduit_proto`] value.
    pub proto: u8,
    /// Destination port.
    pub port: [u8; 2],
    pub _pad: u8,
}

/// Bits of a [`ConduitKey`] before the port (zone, endpoint, protocol).
pub const CONDUIT_KEY_FIXED_BITS: u32 = 40;
/// Bits of a [`ConduitKey`] a lookup matches (everything but the padding).
pub const CONDUIT_KEY_BITS: u32 = CONDUIT_KEY_FIXED_BITS + 16;

impl ConduitKey {
    #[inline(always)]
    pub const fn new(zone: u16, endpoint: u16, proto: u8, port: u16) -> ConduitKey {
        ConduitKey {
            zone: zone.to_be_bytes(),
            endpoint: endpoint.to_be_bytes(),
            proto,
            port: port.to_be_bytes(),
            _pad: 0,
        }
    }
}

/// Key data of the zone LPM tries: the flow's outer VLAN (big-endian, 0 for zones
/// that apply to any VLAN) followed by the address. A VLAN-scoped zone has one entry
/// per VLAN; the kernel looks up (VLAN, address) first, then (0, address).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZoneKeyV4 {
    pub vlan: [u8; 2],
    pub addr: [u8; 4],
}

/// IPv6 counterpart of [`ZoneKeyV4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZoneKeyV6 {
    pub vlan: [u8; 2],
    pub addr: [u8; 16],
}

/// Bits of the VLAN in front of a zone key's address.
pub const ZONE_KEY_VLAN_BITS: u32 = 16;

/// Key of every policy table: the policy generation the entry belongs to, then the
/// table's own key (for the LPM tries, the generation is the first
/// [`POLICY_GEN_BITS`] of the prefix). A reload writes the new policy under the
/// generation not in force, then switches [`KernelConfig::policy_gen`] in one
/// write; a lookup only ever sees entries of the generation it read from the
/// config, so a packet meets the old policy whole or the new one whole.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyKey<K> {
    pub generation: u8,
    pub key: K,
}

impl<K> PolicyKey<K> {
    #[inline(always)]
    pub const fn new(generation: u8, key: K) -> PolicyKey<K> {
        PolicyKey { generation, key }
    }
}

/// Bits of the generation in front of a policy trie key.
pub const POLICY_GEN_BITS: u32 = 8;

/// Key of the SNI hash tables: the name hash's bytes (native order), so that a
/// [`PolicyKey`] of it has no padding.
pub type SniKey = PolicyKey<[u8; 8]>;

impl SniKey {
    #[inline(always)]
    pub const fn sni(generation: u8, hash: u64) -> SniKey {
        PolicyKey::new(generation, hash.to_ne_bytes())
    }
}

/// Value of the `CONDUITS` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConduitValue {
    pub conduit_id: u16,
    /// [`action`] value.
    pub action: u8,
    pub _pad: u8,
}

/// `bpf_ringbuf_submit` flag: no wakeup of a reader waiting on the ring (BPF_RB_NO_WAKEUP).
pub const RINGBUF_NO_WAKEUP: u64 = 1;

impl KernelConfig {
    /// Flags for `bpf_ringbuf_submit` under this config: 0 is the kernel's
    /// adaptive wakeup (a reader that has caught up is woken).
    #[inline(always)]
    pub fn ringbuf_submit_flags(&self) -> u64 {
        // Without a branch: one in the payload classifier doubles the paths the
        // verifier walks after it, and 5.10 then rejects the bounded XDP
        // classifier at its 1M-instruction limit.
        u64::from(self.ring_no_wakeup & 1) * RINGBUF_NO_WAKEUP
    }
}

/// Runtime switches, the single entry of the `CONFIG` array map (set by the agent).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelConfig {
    /// 1: XDP_DROP later forward packets of flows whose verdict is `BLOCKED`.
    pub enforce: u8,
    /// 1: the agent records every flow (informational for the kernel).
    pub record_all: u8,
    /// [`action`] for AI traffic that no conduit allows.
    pub default_action: u8,
    /// 1 when `LOCAL_ADDRS` has entries; lets the fast path skip that lookup.
    pub has_local_addrs: u8,
    /// The policy generation in force (0 or 1, see [`PolicyKey`]). It shares the
    /// first aligned word with `enforce` and `default_action`, so the three switch
    /// together: the program copies the config once per packet.
    pub policy_gen: u8,
    /// 1: ring-buffer submits wake no reader ([`RINGBUF_NO_WAKEUP`]). Set by
    /// `replay`, which reads the ring after each test run and never waits on it:
    /// every wakeup is an irq_work self-interrupt, which in a VM is an exit to
    /// the hypervisor (about a quarter of a replay's time before this switch).
    pub ring_no_wakeup: u8,
    pub _pad: [u8; 2],
    /// CLOCK_BOOTTIME - CLOCK_MONOTONIC in ns, sampled by the agent. Flow timestamps
    /// are `bpf_ktime_get_coarse_ns() + boot_offset_ns`: boot-clock time at tick
    /// resolution, much cheaper than `bpf_ktime_get_boot_ns`.
    pub boot_offset_ns: u64,
}

/// IPv4 LPM trie key data (address in network byte order).
pub type LpmV4 = [u8; 4];
/// IPv6 LPM trie key data (address in network byte order).
pub type LpmV6 = [u8; 16];

/// Key of the local-address map: the gateway's own addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LocalAddr {
    pub addr: [u8; 16],
    pub family: u8,
    pub _pad: [u8; 3],
}

/// Per-CPU counters (index into [`Counters::values`]).
///
/// Every place where the kernel drops information has one; the agent turns increases
/// into signed `loss` records and metrics.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Packets the programs were invoked on.
    PacketsSeen = 0,
    /// Packets accounted to a flow.
    PacketsCounted,
    /// Not IPv4/IPv6 (ARP, LLDP, ...): passed, not an error.
    NonIp,
    /// IP but neither TCP nor UDP (ICMP, ...): passed, not an error.
    NonTcpUdp,
    /// Frame shorter than an Ethernet header.
    ErrEthTruncated,
    /// VLAN tag truncated.
    ErrVlanTruncated,
    /// More than two VLAN tags.
    ErrVlanTooDeep,
    /// IPv4 header truncated.
    ErrIpv4Truncated,
    /// IPv4 IHL < 5 or total length inconsistent.
    ErrIpv4BadHeader,
    /// IPv6 header truncated.
    ErrIpv6Truncated,
    /// IPv6 extension header truncated.
    ErrIpv6ExtTruncated,
    /// More IPv6 extension headers than the bounded walk follows.
    ErrIpv6ExtTooDeep,
    /// TCP/UDP header truncated.
    ErrL4Truncated,
    /// Non-first IP fragments (no L4 header to key on).
    IpFragment,
    /// The ring buffer was full; a new flow's announcement was lost (the flow is
    /// marked [`flow_state::UNANNOUNCED`]).
    LossNewFlowEvent,
    /// The flow table refused an insert; the packet is not counted.
    LossFlowTableFull,
    /// Egress packets skipped because the ingress program already counted them.
    SkippedAlreadyCounted,
    /// Ingress packets to a gateway-local address, handed to the egress program.
    HandedOffLocal,
    /// Payload longer than [`PAYLOAD_COPY_MAX`]; the copy was truncated.
    LossPayloadTruncated,
    /// Packets dropped by enforcement (`block` verdict).
    PacketsDropped,
    /// The ring buffer was full; a payload copy for the agent was lost.
    LossPayloadEvent,
    /// Reading the payload failed; an empty copy went to the agent.
    LossPayloadLoad,
    /// Only the bytes in the linear area could be copied (the full read failed).
    LossPayloadPartial,
    /// A payload packet of a still-pending flow after [`MAX_PAYLOAD_COPIES`] copies.
    LossPayloadCopyLimit,
    /// The handoff map refused an insert; the egress program counts the packet as
    /// already counted (it is not counted).
    LossHandoff,
    /// The tail call to the payload classifier failed; the payload was not read.
    LossTailCall,
    /// DNS responses copied to the agent ([`EVENT_DNS`]).
    DnsCopied,
    /// The ring buffer was full; a DNS response for the agent was lost.
    LossDnsEvent,
    /// A DNS response longer than [`PAYLOAD_COPY_MAX`]: only its start was copied
    /// (the agent uses the answers that fit).
    LossDnsTruncated,
}

/// The value of the `COUNTERS` per-CPU array's one entry: every counter of one CPU,
/// so that a program bumps several after one map lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Counters {
    pub values: [u64; Counter::COUNT as usize],
}

impl Counter {
    /// Number of counters.
    pub const COUNT: u32 = Counter::LossDnsTruncated as u32 + 1;

    /// Every counter in index order.
    pub const ALL: [Counter; Counter::COUNT as usize] = [
        Counter::PacketsSeen,
        Counter::PacketsCounted,
        Counter::NonIp,
        Counter::NonTcpUdp,
        Counter::ErrEthTruncated,
        Counter::ErrVlanTruncated,
        Counter::ErrVlanTooDeep,
        Counter::ErrIpv4Truncated,
        Counter::ErrIpv4BadHeader,
        Counter::ErrIpv6Truncated,
        Counter::ErrIpv6ExtTruncated,
        Counter::ErrIpv6ExtTooDeep,
        Counter::ErrL4Truncated,
        Counter::IpFragment,
        Counter::LossNewFlowEvent,
        Counter::LossFlowTableFull,
        Counter::SkippedAlreadyCounted,
        Counter::HandedOffLocal,
        Counter::LossPayloadTruncated,
        Counter::PacketsDropped,
        Counter::LossPayloadEvent,
        Counter::LossPayloadLoad,
        Counter::LossPayloadPartial,
        Counter::LossPayloadCopyLimit,
        Counter::LossHandoff,
        Counter::LossTailCall,
        Counter::DnsCopied,
        Counter::LossDnsEvent,
        Counter::LossDnsTruncated,
    ];

    /// Stable snake_case name used in metrics and `loss` records.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::PacketsSeen => "packets_seen",
            Counter::PacketsCounted => "packets_counted",
            Counter::NonIp => "non_ip",
            Counter::NonTcpUdp => "non_tcp_udp",
            Counter::ErrEthTruncated => "eth_truncated",
            Counter::ErrVlanTruncated => "vlan_truncated",
            Counter::ErrVlanTooDeep => "vlan_too_deep",
            Counter::ErrIpv4Truncated => "ipv4_truncated",
            Counter::ErrIpv4BadHeader => "ipv4_bad_header",
            Counter::ErrIpv6Truncated => "ipv6_truncated",
            Counter::ErrIpv6ExtTruncated => "ipv6_ext_truncated",
            Counter::ErrIpv6ExtTooDeep => "ipv6_ext_too_deep",
            Counter::ErrL4Truncated => "l4_truncated",
            Counter::IpFragment => "ip_fragment",
            Counter::LossNewFlowEvent => "new_flow_event_lost",
            Counter::LossFlowTableFull => "flow_table_full",
            Counter::SkippedAlreadyCounted => "skipped_already_counted",
            Counter::HandedOffLocal => "handed_off_local",
            Counter::LossPayloadTruncated => "payload_truncated",
            Counter::PacketsDropped => "packets_dropped",
            Counter::LossPayloadEvent => "payload_event_lost",
            Counter::LossPayloadLoad => "payload_load_failed",
            Counter::LossPayloadPartial => "payload_partial_copy",
            Counter::LossPayloadCopyLimit => "payload_copy_limit",
            Counter::LossHandoff => "handoff_full",
            Counter::LossTailCall => "tail_call_failed",
            Counter::DnsCopied => "dns_responses_copied",
            Counter::LossDnsEvent => "dns_event_lost",
            Counter::LossDnsTruncated => "dns_truncated",
        }
    }

    /// Whether an increase of this counter means information was lost and must
    /// become a `loss` record (as opposed to plain traffic statistics).
    pub const fn is_loss(self) -> bool {
        matches!(
            self,
            Counter::LossNewFlowEvent
                | Counter::LossFlowTableFull
                | Counter::LossPayloadTruncated
                | Counter::LossPayloadEvent
                | Counter::LossPayloadLoad
                | Counter::LossPayloadPartial
                | Counter::LossPayloadCopyLimit
                | Counter::LossHandoff
                | Counter::LossTailCall
                | Counter::LossDnsEvent
                | Counter::LossDnsTruncated
        )
    }

    /// Unit of a loss counter's `loss` record. New-flow announcements are not
    /// reported as they are: the agent reconciles them with the flows it recovered
    /// from the table and reports the flows that have no record (unit `flow`).
    pub const fn loss_unit(self) -> &'static str {
        match self {
            Counter::LossNewFlowEvent => "flow",
            _ => "packet",
        }
    }

    /// Whether this counter counts a packet the parser could not handle.
    pub const fn is_parse_error(self) -> bool {
        matches!(
            self,
            Counter::ErrEthTruncated
                | Counter::ErrVlanTruncated
                | Counter::ErrVlanTooDeep
                | Counter::ErrIpv4Truncated
                | Counter::ErrIpv4BadHeader
                | Counter::ErrIpv6Truncated
                | Counter::ErrIpv6ExtTruncated
                | Counter::ErrIpv6ExtTooDeep
                | Counter::ErrL4Truncated
        )
    }
}

/// FNV-1a 64 over the name's bytes **from last to first**, lower-cased, ignoring one
/// trailing dot. The kernel and the agent must hash names identically, so this is the
/// one definition both use.
///
/// Hashing from the right lets the kernel match `*.suffix` patterns in one pass over
/// the SNI: walking right to left, each time it has just hashed a `.`, the running
/// hash equals `sni_hash(".suffix")` of the suffix starting at that dot.
pub const fn sni_hash(name: &[u8]) -> u64 {
    let mut len = name.len();
    if len > 0 && name[len - 1] == b'.' {
        len -= 1;
    }
    let mut hash = SNI_HASH_INIT;
    while len > 0 {
        len -= 1;
        hash = sni_hash_step(hash, name[len]);
    }
    hash
}

/// Initial value of [`sni_hash`] (FNV-1a 64 offset basis).
pub const SNI_HASH_INIT: u64 = 0xcbf2_9ce4_8422_2325;

/// One step of [`sni_hash`]: folds in one byte (lower-cased).
#[inline(always)]
pub const fn sni_hash_step(hash: u64, byte: u8) -> u64 {
    (hash ^ byte.to_ascii_lowercase() as u64).wrapping_mul(0x0000_0100_0000_01b3)
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)], contain only integers and byte arrays, and
    // have no implicit padding (explicit `_pad` fields fill every gap).
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowStats {}
    unsafe impl aya::Pod for super::ClassUpdate {}
    unsafe impl aya::Pod for super::LocalAddr {}
    unsafe impl aya::Pod for super::ConduitKey {}
    unsafe impl aya::Pod for super::ZoneKeyV4 {}
    unsafe impl aya::Pod for super::ZoneKeyV6 {}
    // Only keys of alignment 1: a `PolicyKey` of them has no padding.
    unsafe impl aya::Pod for super::PolicyKey<super::ZoneKeyV4> {}
    unsafe impl aya::Pod for super::PolicyKey<super::ZoneKeyV6> {}
    unsafe impl aya::Pod for super::PolicyKey<super::LpmV4> {}
    unsafe impl aya::Pod for super::PolicyKey<super::LpmV6> {}
    unsafe impl aya::Pod for super::PolicyKey<super::ConduitKey> {}
    unsafe impl aya::Pod for super::SniKey {}
    unsafe impl aya::Pod for super::ConduitValue {}
    unsafe impl aya::Pod for super::KernelConfig {}
    unsafe impl aya::Pod for super::Counters {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<FlowKey>(), 16 + 16 + 2 + 2 + 2 + 1 + 1);
        assert_eq!(
            core::mem::size_of::<FlowStats>(),
            8 * 7 + 4 + 2 * 3 + 2 + 5 + 7
        );
        assert_eq!(core::mem::size_of::<EventHeader>(), 4 + 4 + 8 + 40);
        assert_eq!(core::mem::size_of::<LocalAddr>(), 20);
        assert_eq!(core::mem::size_of::<ClassUpdate>(), 16);
        assert_eq!(core::mem::size_of::<ConduitKey>(), 8);
        assert_eq!(core::mem::size_of::<ConduitValue>(), 4);
        assert_eq!(core::mem::size_of::<ZoneKeyV4>(), 6);
        assert_eq!(core::mem::size_of::<ZoneKeyV6>(), 18);
        assert_eq!(core::mem::size_of::<KernelConfig>(), 16);
        // The kernel ORs TCP flags and state bits into the 8-byte word at 56 atomically.
        assert_eq!(core::mem::offset_of!(FlowStats, ifindex), 56);
        assert_eq!(core::mem::offset_of!(FlowStats, tcp_flags), 60);
        assert_eq!(core::mem::offset_of!(FlowStats, state), 63);
    }

    #[test]
    fn one_verdict_rule() {
        use action::{ALERT, ALLOW, BLOCK};
        assert_eq!(
            Verdict::decide(false, Some(ALLOW), BLOCK, true),
            Verdict::Unclassified
        );
        assert_eq!(
            Verdict::decide(true, Some(ALLOW), BLOCK, true),
            Verdict::Authorized
        );
        assert_eq!(
            Verdict::decide(true, Some(ALERT), BLOCK, true),
            Verdict::Violation
        );
        assert_eq!(
            Verdict::decide(true, Some(BLOCK), ALERT, true),
            Verdict::Blocked
        );
        assert_eq!(
            Verdict::decide(true, Some(BLOCK), ALERT, false),
            Verdict::Violation
        );
        assert_eq!(Verdict::decide(true, None, BLOCK, true), Verdict::Blocked);
        assert_eq!(Verdict::decide(true, None, ALERT, true), Verdict::Violation);
        for v in [
            Verdict::Unclassified,
            Verdict::Authorized,
            Verdict::Violation,
            Verdict::Blocked,
        ] {
            assert_eq!(Verdict::from_u8(v as u8), v);
        }
    }

    #[test]
    fn sni_hash_ignores_case_and_trailing_dot() {
        assert_eq!(sni_hash(b"API.OpenAI.com."), sni_hash(b"api.openai.com"));
        assert_ne!(sni_hash(b"api.openai.com"), sni_hash(b"api.openai.co"));
        // A right-to-left walk of "x.openai.com" passes through the hash of ".openai.com".
        let name = b"x.openai.com";
        let mut h = SNI_HASH_INIT;
        let mut seen = false;
        for &b in name.iter().rev() {
            h = sni_hash_step(h, b);
            seen |= b == b'.' && h == sni_hash(b".openai.com");
        }
        assert!(seen);
        assert_eq!(Counter::ALL.len(), Counter::COUNT as usize);
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
    }
}
