//! Flow accounting: direction normalisation, the LRU flow table, lifecycle events.

use core::intrinsics::{AtomicOrdering::Relaxed, atomic_or, atomic_xadd};

use aya_ebpf::helpers::bpf_ktime_get_boot_ns;
use sensor_common::{
    DIR_FORWARD, DIR_REVERSE, EVENT_FLOW_END, EVENT_FLOW_NEW, FlowEvent, FlowKey, FlowStats,
    flow_state, tcp_flags,
};

use crate::{Counter, EVENTS, FLOWS, SCRATCH_STATS, bump, parse::Packet};

/// `(addr, port)` of `a` sorts before that of `b` (big-endian address comparison
/// without a memcmp call, which BPF does not have).
#[inline(always)]
fn lower(a: &[u8; 16], ap: u16, b: &[u8; 16], bp: u16) -> bool {
    let a0 = u64::from_be_bytes([a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]]);
    let b0 = u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
    if a0 != b0 {
        return a0 < b0;
    }
    let a1 = u64::from_be_bytes([a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15]]);
    let b1 = u64::from_be_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]);
    if a1 != b1 {
        return a1 < b1;
    }
    ap <= bp
}

/// Flow key of the packet and whether its source is the key's `lo` side.
#[inline(always)]
pub fn key_of(p: &Packet) -> (FlowKey, bool) {
    let src_lo = lower(&p.src, p.sport, &p.dst, p.dport);
    let key = if src_lo {
        FlowKey {
            addr_lo: p.src,
            addr_hi: p.dst,
            port_lo: p.sport,
            port_hi: p.dport,
            vlan: p.vlan,
            protocol: p.protocol,
            family: p.family,
        }
    } else {
        FlowKey {
            addr_lo: p.dst,
            addr_hi: p.src,
            port_lo: p.dport,
            port_hi: p.sport,
            vlan: p.vlan,
            protocol: p.protocol,
            family: p.family,
        }
    };
    (key, src_lo)
}

/// State bits a packet with these TCP flags sets, in direction `dir`.
#[inline(always)]
fn state_bits(flags: u8, dir: usize) -> u8 {
    let mut s = 0;
    if flags & tcp_flags::FIN != 0 {
        s |= if dir == DIR_FORWARD {
            flow_state::FIN_FORWARD
        } else {
            flow_state::FIN_REVERSE
        };
    }
    if flags & tcp_flags::RST != 0 {
        s |= flow_state::RST;
    }
    s
}

#[inline(always)]
fn ended(state: u8) -> bool {
    state & flow_state::RST != 0
        || state & (flow_state::FIN_FORWARD | flow_state::FIN_REVERSE)
            == (flow_state::FIN_FORWARD | flow_state::FIN_REVERSE)
}

/// Emits a [`FlowEvent`] with a snapshot of `stats`.
#[inline(always)]
pub fn emit_flow_event(kind: u8, dir: usize, ifindex: u32, key: &FlowKey, stats: *const FlowStats) {
    match EVENTS.reserve::<FlowEvent>(0) {
        Some(mut e) => {
            let ev = e.as_mut_ptr();
            // SAFETY: `ev` points to a reservation of size_of::<FlowEvent>(); `stats`
            // points to a map value or a stack value of the right type.
            unsafe {
                (*ev).header.kind = kind;
                (*ev).header.direction = dir as u8;
                (*ev).header._pad = [0; 2];
                (*ev).header.ifindex = ifindex;
                (*ev).header.ts_ns = bpf_ktime_get_boot_ns();
                (*ev).header.key = *key;
                (*ev).stats = *stats;
            }
            e.submit(0);
        }
        None => bump(Counter::LossRingbufFull),
    }
}

/// Result of accounting a packet: the flow's value pointer and the packet direction.
pub struct Accounted {
    pub stats: *mut FlowStats,
    pub dir: usize,
    pub new: bool,
}

/// Counts `segs` packets / `bytes` bytes of `p` in the flow table, creating the flow
/// on its first packet. `None` when the flow table refused the insert.
#[inline(always)]
pub fn account(
    p: &Packet,
    key: &FlowKey,
    src_lo: bool,
    segs: u64,
    bytes: u64,
    ifindex: u32,
) -> Option<Accounted> {
    let now = unsafe { bpf_ktime_get_boot_ns() };
    if let Some(v) = FLOWS.get_ptr_mut(key) {
        // SAFETY: `v` is a live LRU value; concurrent updaters use atomics for the
        // counters and tolerate lost `last_seen` races.
        let dir = if src_lo == (unsafe { (*v).initiator_is_lo } != 0) {
            DIR_FORWARD
        } else {
            DIR_REVERSE
        };
        unsafe {
            atomic_xadd::<u64, u64, { Relaxed }>(&raw mut (*v).packets[dir], segs);
            atomic_xadd::<u64, u64, { Relaxed }>(&raw mut (*v).bytes[dir], bytes);
            (*v).last_seen_ns = now;
        }
        update_flags(v, p.tcp_flags, dir, ifindex, key);
        return Some(Accounted {
            stats: v,
            dir,
            new: false,
        });
    }

    // New flow. The initiator is the source, unless the first packet we see is a
    // SYN-ACK (we missed the SYN): then it is the destination.
    let synack =
        p.tcp_flags & (tcp_flags::SYN | tcp_flags::ACK) == (tcp_flags::SYN | tcp_flags::ACK);
    let initiator_is_lo = src_lo != synack;
    let dir = if synack { DIR_REVERSE } else { DIR_FORWARD };
    // The new value is built in a per-CPU scratch slot: the stack is too small.
    let s = SCRATCH_STATS.get_ptr_mut(0)?;
    // SAFETY: per-CPU slot, only this program invocation uses it.
    let s = unsafe { &mut *s };
    *s = FlowStats {
        first_seen_ns: now,
        last_seen_ns: now,
        ifindex,
        initiator_is_lo: initiator_is_lo as u8,
        ..FlowStats::default()
    };
    s.packets[dir] = segs;
    s.bytes[dir] = bytes;
    s.tcp_flags[dir] = p.tcp_flags;
    s.state = state_bits(p.tcp_flags, dir);
    if FLOWS.insert(key, &*s, BPF_NOEXIST).is_err() {
        // Lost a race with another CPU (EEXIST): account on the winner's entry.
        if let Some(v) = FLOWS.get_ptr_mut(key) {
            unsafe {
                atomic_xadd::<u64, u64, { Relaxed }>(&raw mut (*v).packets[dir], segs);
                atomic_xadd::<u64, u64, { Relaxed }>(&raw mut (*v).bytes[dir], bytes);
            }
            update_flags(v, p.tcp_flags, dir, ifindex, key);
            return Some(Accounted {
                stats: v,
                dir,
                new: false,
            });
        }
        bump(Counter::LossFlowTableFull);
        return None;
    }
    let v = FLOWS.get_ptr_mut(key)?;
    emit_flow_event(EVENT_FLOW_NEW, dir, ifindex, key, v);
    if ended(s.state) {
        update_flags(v, 0, dir, ifindex, key);
    }
    Some(Accounted {
        stats: v,
        dir,
        new: true,
    })
}

const BPF_NOEXIST: u64 = 1;

/// ORs the TCP flags and state bits into the flow (one atomic OR on the 8-byte word
/// `ifindex, tcp_flags[0], tcp_flags[1], initiator_is_lo, state`, little-endian) and
/// emits the end event once.
#[inline(always)]
fn update_flags(v: *mut FlowStats, flags: u8, dir: usize, ifindex: u32, key: &FlowKey) {
    let sbits = state_bits(flags, dir);
    let want = ((flags as u64) << (32 + dir as u64 * 8)) | ((sbits as u64) << 56);
    // SAFETY: offset 56..64 of FlowStats is this 8-byte aligned word (checked by a
    // layout test in sensor-common).
    let word = unsafe { (&raw mut (*v).ifindex).cast::<u64>() };
    let cur = unsafe { core::ptr::read_volatile(word) };
    if cur & want != want {
        unsafe { atomic_or::<u64, u64, { Relaxed }>(word, want) };
    }
    let state = ((cur | want) >> 56) as u8;
    if ended(state) && state & flow_state::END_REPORTED == 0 {
        let old = unsafe {
            atomic_or::<u64, u64, { Relaxed }>(word, (flow_state::END_REPORTED as u64) << 56)
        };
        if (old >> 56) as u8 & flow_state::END_REPORTED == 0 {
            emit_flow_event(EVENT_FLOW_END, dir, ifindex, key, v);
        }
    }
}
