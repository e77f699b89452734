//! Conduit Sensor kernel programs: `conduit_xdp` (XDP, ingress) and `conduit_tc`
//! (TC clsact, egress). Both are fail-open: every path ends in PASS / TC_ACT_OK,
//! except enforcement of a `blocked` verdict.
#![no_std]
#![no_main]
// BPF has no compare-and-swap, so core's Atomic* lack fetch_add/fetch_or here; the
// intrinsics lower to BPF atomic add/or.
#![feature(core_intrinsics)]
#![expect(internal_features, reason = "atomic intrinsics, see above")]

mod classify;
mod flow;
mod parse;

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, TC_ACT_OK, xdp_action},
    macros::{classifier, map, xdp},
    maps::{
        Array, HashMap, LpmTrie, LruHashMap, LruPerCpuHashMap, PerCpuArray, ProgramArray, RingBuf,
    },
    programs::{TcContext, XdpContext},
};
use sensor_common::{
    ClassUpdate, ConduitKey, ConduitValue, Counter, Counters, DIR_FORWARD, DIR_REVERSE, DNS_PORT,
    EVENTS_RINGBUF_BYTES, FLOW_TABLE_SIZE, FlowKey, FlowStats, KernelConfig, LocalAddr, LpmV4,
    LpmV6, MAX_CLASS_UPDATES, MAX_LOCAL_ADDRS, MAX_PAYLOAD_COPIES, MAX_POLICY_CIDRS,
    MAX_POLICY_CONDUITS, MAX_POLICY_SNI, MAX_WATCHED_IFACES, POLICY_GENERATIONS, PolicyKey, SniKey,
    ZoneKeyV4, ZoneKeyV6, app_protocol, flow_state, sni_state, verdict,
};

use crate::parse::{Bounds, IPPROTO_TCP, Packet};

/// The flow table.
#[map]
static FLOWS: LruHashMap<FlowKey, FlowStats> = LruHashMap::with_max_entries(FLOW_TABLE_SIZE, 0);

/// Flow and payload events to the agent.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_RINGBUF_BYTES, 0);

/// Per-CPU counters: one [`Counters`] entry.
#[map]
static COUNTERS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(1, 0);

/// ifindex -> 1 for every interface the agent attached to.
#[map]
static WATCHED_IFACES: HashMap<u32, u8> = HashMap::with_max_entries(MAX_WATCHED_IFACES, 0);

/// The gateway's own addresses.
#[map]
static LOCAL_ADDRS: HashMap<LocalAddr, u8> = HashMap::with_max_entries(MAX_LOCAL_ADDRS, 0);

/// Runtime switches (one entry). Mmapable (5.5+): `replay` stamps each packet's
/// index into it with a store instead of a syscall.
#[map]
static CONFIG: Array<KernelConfig> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// Packets to a gateway-local address that XDP saw on a watched interface and left
/// for the egress program to count after conntrack undid the NAT. Keyed by fields NAT
/// does not rewrite.
#[map]
static HANDOFF: LruPerCpuHashMap<HandoffKey, u8> = LruPerCpuHashMap::with_max_entries(4096, 0);

// The policy tables. Every key starts with the policy generation (`PolicyKey`):
// each table holds two policies' entries at most (the one in force and, during a
// reload, the next), so it is sized for `POLICY_GENERATIONS` of them.

/// Source zone by (generation, outer VLAN or 0, initiator address) -> zone id.
#[map]
static ZONES_V4: LpmTrie<PolicyKey<ZoneKeyV4>, u16> =
    LpmTrie::with_max_entries(POLICY_GENERATIONS * MAX_POLICY_CIDRS, 0);
#[map]
static ZONES_V6: LpmTrie<PolicyKey<ZoneKeyV6>, u16> =
    LpmTrie::with_max_entries(POLICY_GENERATIONS * MAX_POLICY_CIDRS, 0);
/// AI endpoint by (generation, responder address) (CIDR -> endpoint id).
#[map]
static ENDPOINT_NETS_V4: LpmTrie<PolicyKey<LpmV4>, u16> =
    LpmTrie::with_max_entries(POLICY_GENERATIONS * MAX_POLICY_CIDRS, 0);
#[map]
static ENDPOINT_NETS_V6: LpmTrie<PolicyKey<LpmV6>, u16> =
    LpmTrie::with_max_entries(POLICY_GENERATIONS * MAX_POLICY_CIDRS, 0);
/// (generation, `sni_hash(name)`) -> endpoint id.
#[map]
static SNI_EXACT: HashMap<SniKey, u16> =
    HashMap::with_max_entries(POLICY_GENERATIONS * MAX_POLICY_SNI, 0);
/// (generation, `sni_hash(".suffix")`) -> endpoint id.
#[map]
static SNI_SUFFIX: HashMap<SniKey, u16> =
    HashMap::with_max_entries(POLICY_GENERATIONS * MAX_POLICY_SNI, 0);
/// (generation, zone, endpoint, proto, port prefix) -> conduit.
#[map]
static CONDUITS: LpmTrie<PolicyKey<ConduitKey>, ConduitValue> =
    LpmTrie::with_max_entries(POLICY_GENERATIONS * MAX_POLICY_CONDUITS, 0);

/// Per-CPU scratch for hashing the SNI.
#[map]
static SNI_SCRATCH: PerCpuArray<classify::SniScratch> = PerCpuArray::with_max_entries(1, 0);

/// The agent's classifications, merged into the flow table by the kernel (see
/// [`sensor_common::ClassUpdate`]).
#[map]
static CLASS_UPDATES: HashMap<FlowKey, ClassUpdate> =
    HashMap::with_max_entries(MAX_CLASS_UPDATES, 0);

/// Per-CPU scratch for building a new flow's value (BPF stack is 512 bytes).
#[map]
static SCRATCH_STATS: PerCpuArray<FlowStats> = PerCpuArray::with_max_entries(1, 0);

/// Baseline for the benchmark: one LRU lookup + update on a fixed key.
#[map]
static BENCH_LRU: LruHashMap<u64, u64> = LruHashMap::with_max_entries(16, 0);

/// Second baseline: the same with a FlowKey-sized key (hashing 40 bytes, as the flow
/// table does).
#[map]
static BENCH_LRU_FLOWKEY: LruHashMap<FlowKey, u64> = LruHashMap::with_max_entries(16, 0);

#[repr(C)]
#[derive(Clone, Copy)]
struct HandoffKey {
    /// Source address of the packet (the remote peer; SNAT undo rewrites only the destination).
    remote: [u8; 16],
    /// IPv4 id or UDP length (UDP), TCP sequence and acknowledgement numbers (TCP).
    disc: u64,
    remote_port: u16,
    protocol: u8,
    family: u8,
    _pad: u32,
}

#[inline(always)]
fn bump(c: Counter) {
    bump_by(c, 1);
}

#[inline(always)]
fn bump_by(c: Counter, n: u64) {
    bump_in(counters(), c, n);
}

/// This CPU's counters, for a hot path that bumps several of them.
#[inline(always)]
fn counters() -> Option<*mut Counters> {
    COUNTERS.get_ptr_mut(0)
}

#[inline(always)]
fn bump_in(counters: Option<*mut Counters>, c: Counter, n: u64) {
    if let Some(p) = counters {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU; `c` < COUNT.
        unsafe { (*p).values[c as usize] += n };
    }
}

#[inline(always)]
fn config() -> KernelConfig {
    match CONFIG.get(0) {
        Some(c) => *c,
        None => KernelConfig::default(),
    }
}

#[inline(always)]
fn handoff_key(p: &Packet) -> HandoffKey {
    let disc = if p.protocol == IPPROTO_TCP {
        ((p.tcp_seq as u64) << 32) | p.tcp_ack as u64
    } else {
        ((p.payload_len as u64) << 16) | p.ip_id as u64
    };
    HandoffKey {
        remote: p.src,
        disc,
        remote_port: p.sport,
        protocol: p.protocol,
        family: p.family,
        _pad: 0,
    }
}

/// If the packet is addressed to the gateway itself, records it in HANDOFF and
/// returns true. Not inlined: its keys get their own stack frame.
#[inline(never)]
fn hand_off_if_local(p: &Packet) -> bool {
    // Aligned wrapper + word writes: a 3-byte `_pad` literal becomes a memset call.
    #[repr(C, align(8))]
    struct Aligned(LocalAddr);
    let mut la = core::mem::MaybeUninit::<Aligned>::uninit();
    // SAFETY: 8-byte aligned; zero is a valid LocalAddr; fields set below.
    let la = unsafe {
        flow::zero_words::<_, u64>(la.as_mut_ptr());
        let mut la = la.assume_init();
        la.0.addr = p.dst;
        la.0.family = p.family;
        la
    };
    if LOCAL_ADDRS.get_ptr(la.0).is_none() {
        return false;
    }
    if HANDOFF.insert(handoff_key(p), 1, 0).is_err() {
        bump(Counter::LossHandoff);
    }
    true
}

/// TC egress: whether XDP already counted this packet on a watched ingress interface
/// (and did not hand it off). Not inlined, see above.
#[inline(never)]
fn counted_by_xdp(p: &Packet, ingress_ifindex: u32) -> bool {
    if ingress_ifindex == 0 || WATCHED_IFACES.get_ptr(ingress_ifindex).is_none() {
        return false;
    }
    let hk = handoff_key(p);
    if HANDOFF.get_ptr(hk).is_none() {
        return true;
    }
    let _ = HANDOFF.remove(hk);
    false
}

#[xdp]
pub fn conduit_xdp(ctx: XdpContext) -> u32 {
    xdp_main::<flow::Current>(&ctx)
}

/// `conduit_xdp` for kernels without atomic OR or the coarse clock (5.10, 5.11).
#[xdp]
pub fn conduit_xdp_510(ctx: XdpContext) -> u32 {
    xdp_main::<flow::Legacy>(&ctx)
}

#[inline(always)]
fn xdp_main<F: flow::FlowOps>(ctx: &XdpContext) -> u32 {
    match try_xdp::<F>(ctx) {
        Ok(v) => v,
        Err(c) => {
            bump(c);
            xdp_action::XDP_PASS
        }
    }
}

#[inline(always)]
fn try_xdp<F: flow::FlowOps>(ctx: &XdpContext) -> Result<u32, Counter> {
    let ctr = counters();
    bump_in(ctr, Counter::PacketsSeen, 1);
    let b = Bounds {
        start: ctx.data(),
        end: ctx.data_end(),
    };
    let Some(job) = PAYLOAD_JOB.get_ptr_mut(0) else {
        return Ok(xdp_action::XDP_PASS);
    };
    // SAFETY: per-CPU scratch, used by this invocation (and its tail call) only.
    let job = unsafe { &mut *job };
    parse::parse(&b, &mut job.pkt)?;
    let src_lo = flow::key_of(&job.pkt, &mut job.key);
    let (p, key) = (&job.pkt, &job.key.0);
    let ifindex = ctx.ingress_ifindex() as u32;
    let cfg = config();

    // Known flow: count it. Unknown flow to a gateway-local address: the masqueraded
    // return path of a flow that TC egress will see de-NATed; leave it to TC. One
    // flow-table lookup serves both.
    let found = FLOWS.get_ptr_mut(key);
    if found.is_none() && cfg.has_local_addrs != 0 && hand_off_if_local(p) {
        bump(Counter::HandedOffLocal);
        return Ok(xdp_action::XDP_PASS);
    }
    let Some(acc) = flow::account::<F>(
        found,
        p,
        key,
        src_lo,
        1,
        p.ip_len as u64,
        ifindex,
        cfg.boot_offset_ns,
    ) else {
        return Ok(xdp_action::XDP_PASS);
    };
    bump_in(ctr, Counter::PacketsCounted, 1);
    let (blocked, first_payload) = after_account::<F>(p, key, &acc, ifindex, &cfg);
    if blocked && cfg.enforce != 0 {
        bump(Counter::PacketsDropped);
        return Ok(xdp_action::XDP_DROP);
    }
    // A segment that arrives with TTL (hop limit) 1 or 0 dies at this gateway's
    // forwarding step: it never reaches the server, so it must not decide the SNI
    // (a decoy ClientHello sent with TTL 1 ahead of the real one). It is counted.
    let first_payload = first_payload && p.ttl > 1;
    if first_payload {
        // Does not return on success; on failure (not installed) count and pass.
        // SAFETY: ctx is this program's context.
        unsafe { JUMP_XDP.tail_call(ctx, 0) };
        bump(Counter::LossTailCall);
    }
    Ok(xdp_action::XDP_PASS)
}

/// New-flow announcement and classification by address. Returns whether the packet
/// is a forward packet of a flow already `blocked`, and whether it is the first
/// forward payload packet (the caller then tail-calls the payload classifier).
#[inline(always)]
fn after_account<F: flow::FlowOps>(
    p: &Packet,
    key: &FlowKey,
    acc: &flow::Accounted,
    ifindex: u32,
    cfg: &KernelConfig,
) -> (bool, bool) {
    // SAFETY: live flow-table value.
    let sni = unsafe { (*acc.stats).sni_state };
    if sni == sni_state::PENDING || sni == sni_state::CONTESTED {
        merge_class_update(key, acc.stats);
    }
    // SAFETY: live flow-table value. Read before classifying: enforcement applies
    // to packets after the one that produced the verdict.
    let v = unsafe { (*acc.stats).verdict };
    if acc.new {
        classify::on_new_flow(p, acc.dir, acc.stats, cfg);
        flow::announce_new::<F>(acc, ifindex, key, cfg);
    }
    // SAFETY: live flow-table value.
    if unsafe { (*acc.stats).app_protocol } == app_protocol::DNS {
        // Every response goes to the agent (the payload classifier copies it as a
        // reply); queries carry nothing it needs.
        let response = p.payload_len > 0 && p.sport == DNS_PORT;
        if response && let Some(job) = PAYLOAD_JOB.get_ptr_mut(0) {
            // SAFETY: per-CPU slot handed to the tail-called program.
            unsafe {
                (*job).ifindex = ifindex;
                (*job).dir = DIR_REVERSE as u32;
            }
        }
        return (false, response);
    }
    if acc.dir != DIR_FORWARD {
        // The responder's first payload of a TLS or QUIC flow, once: its ServerHello
        // (in QUIC, inside the server's Initial) says what was negotiated.
        // SAFETY: live flow-table value.
        let (app, state) = unsafe { ((*acc.stats).app_protocol, (*acc.stats).state) };
        let reply = p.payload_len > 0
            && (app == app_protocol::TLS || app == app_protocol::QUIC)
            && state & flow_state::REPLY_COPIED == 0;
        if reply {
            // SAFETY: offset 56..64 of FlowStats is the 8-byte word `ifindex ..=
            // state` (layout test in sensor-common); `state` is its top byte.
            unsafe {
                let word = (&raw mut (*acc.stats).ifindex).cast::<u64>();
                F::or_word(word, (flow_state::REPLY_COPIED as u64) << 56);
            }
            if let Some(job) = PAYLOAD_JOB.get_ptr_mut(0) {
                // SAFETY: per-CPU slot handed to the tail-called program.
                unsafe {
                    (*job).ifindex = ifindex;
                    (*job).dir = acc.dir as u32;
                }
            }
        }
        return (false, reply);
    }
    // SAFETY: as above.
    let (state, copies, app, flags) = unsafe {
        (
            (*acc.stats).sni_state,
            (*acc.stats).payload_copies,
            (*acc.stats).app_protocol,
            (*acc.stats).state,
        )
    };
    // Until the server has spoken, a TLS client sends nothing but its hello: what
    // else it sends before then is copied too, so that a second hello at the same
    // sequence numbers (a decoy the server ignored, then the real one) is seen.
    let unanswered_tls = app == app_protocol::TLS && flags & flow_state::REPLY_COPIED == 0;
    // The first payload packet, and later ones while the agent still needs bytes
    // (a ClientHello split over segments, CRYPTO frames over several Initials).
    let first_payload = p.payload_len > 0
        && (state == sni_state::NONE
            || (copies < MAX_PAYLOAD_COPIES
                && (state == sni_state::PENDING
                    || ((state == sni_state::DONE || state == sni_state::CONTESTED)
                        && unanswered_tls))));
    if p.payload_len > 0 && state == sni_state::PENDING && copies >= MAX_PAYLOAD_COPIES {
        bump(Counter::LossPayloadCopyLimit);
    }
    if first_payload && let Some(job) = PAYLOAD_JOB.get_ptr_mut(0) {
        // SAFETY: per-CPU slot handed to the tail-called program on this CPU; `p`
        // and `key` already live in it.
        unsafe {
            (*job).ifindex = ifindex;
            (*job).dir = DIR_FORWARD as u32;
        }
    }
    (v == verdict::BLOCKED, first_payload)
}

/// Applies the agent's classification of a flow, if it wrote one.
#[inline(always)]
fn merge_class_update(key: &FlowKey, s: *mut FlowStats) {
    // SAFETY: the value is copied out before the entry is removed.
    let Some(u) = (unsafe { CLASS_UPDATES.get(key) }).copied() else {
        return;
    };
    let _ = CLASS_UPDATES.remove(key);
    // SAFETY: live flow-table value.
    unsafe {
        // A contested flow's verdict only rises (see `sni_state::CONTESTED`).
        let contested = (*s).sni_state == sni_state::CONTESTED;
        if contested && u.verdict < (*s).verdict {
            return;
        }
        (*s).sni_hash = u.sni_hash;
        (*s).zone_id = u.zone_id;
        (*s).endpoint_id = u.endpoint_id;
        (*s).conduit_id = u.conduit_id;
        (*s).verdict = u.verdict;
        (*s).app_protocol = u.app_protocol;
        if !contested {
            (*s).sni_state = sni_state::DONE;
        }
    }
}

/// Input of the payload classifiers (tail-called so that the verifier checks the
/// ClientHello walk once, not once per header-parsing path).
#[repr(C)]
pub struct PayloadJob {
    pkt: Packet,
    key: flow::AlignedKey,
    ifindex: u32,
    /// DIR_FORWARD: a ClientHello / Initial to classify; DIR_REVERSE: a reply to copy.
    dir: u32,
}

#[map]
static PAYLOAD_JOB: PerCpuArray<PayloadJob> = PerCpuArray::with_max_entries(1, 0);

/// Index 0: `conduit_xdp_classify`.
#[map]
static JUMP_XDP: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// Index 0: `conduit_tc_classify`.
#[map]
static JUMP_TC: ProgramArray = ProgramArray::with_max_entries(1, 0);

#[inline(always)]
fn classify_job<C: classify::LoadBytes, V: classify::Variant>(ctx: &C, start: usize, end: usize) {
    let Some(job) = PAYLOAD_JOB.get_ptr(0) else {
        return;
    };
    // SAFETY: per-CPU slot written by the program that tail-called us.
    let job = unsafe { &*job };
    let Some(s) = FLOWS.get_ptr_mut(job.key.0) else {
        return;
    };
    let b = Bounds { start, end };
    classify::on_first_payload::<C, V>(
        ctx,
        &b,
        &job.pkt,
        &job.key.0,
        s,
        job.ifindex,
        job.dir,
        &config(),
    );
}

/// First forward payload packet of a flow (XDP): TLS ClientHello / QUIC Initial.
#[xdp]
pub fn conduit_xdp_classify(ctx: XdpContext) -> u32 {
    classify_job::<_, classify::Helpers>(&ctx, ctx.data(), ctx.data_end());
    xdp_action::XDP_PASS
}

/// First forward payload packet of a flow (TC egress).
#[classifier]
pub fn conduit_tc_classify(ctx: TcContext) -> i32 {
    classify_job::<_, classify::Helpers>(&ctx, ctx.data(), ctx.data_end());
    TC_ACT_OK
}

/// `conduit_xdp_classify` for kernels without `bpf_loop` / `bpf_xdp_load_bytes`.
#[xdp]
pub fn conduit_xdp_classify_bounded(ctx: XdpContext) -> u32 {
    classify_job::<_, classify::Bounded>(&ctx, ctx.data(), ctx.data_end());
    xdp_action::XDP_PASS
}

/// `conduit_tc_classify` for kernels without `bpf_loop`.
#[classifier]
pub fn conduit_tc_classify_bounded(ctx: TcContext) -> i32 {
    classify_job::<_, classify::Bounded>(&ctx, ctx.data(), ctx.data_end());
    TC_ACT_OK
}

#[classifier]
pub fn conduit_tc(ctx: TcContext) -> i32 {
    tc_main::<flow::Current>(&ctx)
}

/// `conduit_tc` for kernels without atomic OR or the coarse clock (5.10, 5.11).
#[classifier]
pub fn conduit_tc_510(ctx: TcContext) -> i32 {
    tc_main::<flow::Legacy>(&ctx)
}

#[inline(always)]
fn tc_main<F: flow::FlowOps>(ctx: &TcContext) -> i32 {
    match try_tc::<F>(ctx) {
        Ok(v) => v,
        Err(c) => {
            bump(c);
            TC_ACT_OK
        }
    }
}

/// Headers (and a payload's first bytes) we want in the linear area for direct
/// access, when they are not there.
const TC_PULL_LEN: u32 = 128;

#[inline(always)]
fn pull_len(skb_len: u32) -> u32 {
    if skb_len < TC_PULL_LEN {
        skb_len
    } else {
        TC_PULL_LEN
    }
}

#[inline(always)]
fn try_tc<F: flow::FlowOps>(ctx: &TcContext) -> Result<i32, Counter> {
    let ctr = counters();
    bump_in(ctr, Counter::PacketsSeen, 1);
    // SAFETY: reading plain fields of the __sk_buff context.
    let (ingress_ifindex, ifindex, gso_segs, skb_len) = unsafe {
        let skb = ctx.skb.skb;
        (
            (*skb).ingress_ifindex,
            (*skb).ifindex,
            (*skb).gso_segs,
            (*skb).len,
        )
    };
    let Some(job) = PAYLOAD_JOB.get_ptr_mut(0) else {
        return Ok(TC_ACT_OK);
    };
    // SAFETY: per-CPU scratch, used by this invocation (and its tail call) only.
    let job = unsafe { &mut *job };
    let b = Bounds {
        start: ctx.data(),
        end: ctx.data_end(),
    };
    // The headers of a GSO or paged skb may lie beyond its linear area: pull them, but
    // only then. A pull can copy (linearize) the skb, and most packets here are
    // forwarded ones that XDP already counted and that need nothing more.
    if let Err(c) = parse::parse(&b, &mut job.pkt) {
        let want = pull_len(skb_len);
        if ((b.end - b.start) as u32) >= want || ctx.pull_data(want).is_err() {
            return Err(c);
        }
        let b = Bounds {
            start: ctx.data(),
            end: ctx.data_end(),
        };
        parse::parse(&b, &mut job.pkt)?;
    }
    let p = &job.pkt;

    // Count once: skip what XDP already counted on a watched ingress interface,
    // unless XDP handed it over (addressed to the gateway before de-NAT).
    if counted_by_xdp(p, ingress_ifindex) {
        bump_in(ctr, Counter::SkippedAlreadyCounted, 1);
        return Ok(TC_ACT_OK);
    }

    let src_lo = flow::key_of(&job.pkt, &mut job.key);
    let (p, key) = (&job.pkt, &job.key.0);
    let segs = if gso_segs > 1 { gso_segs } else { 1 };
    // A GSO aggregate carries one set of headers for `segs` wire packets.
    let bytes = p.ip_len as u64 + (segs as u64 - 1) * p.hdr_len as u64;
    let cfg = config();
    let Some(acc) = flow::account::<F>(
        FLOWS.get_ptr_mut(key),
        p,
        key,
        src_lo,
        segs as u64,
        bytes,
        ifindex,
        cfg.boot_offset_ns,
    ) else {
        return Ok(TC_ACT_OK);
    };
    bump_in(ctr, Counter::PacketsCounted, segs as u64);
    // Egress never drops: enforcement is XDP's job.
    let (_, first_payload) = after_account::<F>(p, key, &acc, ifindex, &cfg);
    if first_payload {
        // The classifier reads the payload's first bytes directly: make them linear.
        let _ = ctx.pull_data(pull_len(skb_len));
        // SAFETY: ctx is this program's context.
        unsafe { JUMP_TC.tail_call(ctx, 0) };
        bump(Counter::LossTailCall);
    }
    Ok(TC_ACT_OK)
}

/// Benchmark baseline: does nothing.
#[xdp]
pub fn bench_empty(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Benchmark baseline: one LRU lookup and update on a fixed key.
#[xdp]
pub fn bench_lru(_ctx: XdpContext) -> u32 {
    let key = 1u64;
    match BENCH_LRU.get_ptr_mut(key) {
        Some(v) => unsafe { *v += 1 },
        None => {
            let _ = BENCH_LRU.insert(key, 1, 0);
        }
    }
    xdp_action::XDP_PASS
}

/// Benchmark baseline: one LRU lookup and update with a 40-byte FlowKey.
#[xdp]
pub fn bench_lru_flowkey(_ctx: XdpContext) -> u32 {
    let key = FlowKey {
        addr_lo: [1; 16],
        addr_hi: [2; 16],
        port_lo: 3,
        port_hi: 4,
        vlan: 0,
        protocol: 6,
        family: 4,
    };
    match BENCH_LRU_FLOWKEY.get_ptr_mut(key) {
        Some(v) => unsafe { *v += 1 },
        None => {
            let _ = BENCH_LRU_FLOWKEY.insert(key, 1, 0);
        }
    }
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
