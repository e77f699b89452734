//! Flow accounting: direction normalisation, the LRU flow table, lifecycle events.

use core::intrinsics::{AtomicOrdering::Relaxed, atomic_or, atomic_xadd};

use aya_ebpf::helpers::{bpf_ktime_get_boot_ns, bpf_ktime_get_coarse_ns, bpf_ktime_get_ns};
use sensor_common::{
    DIR_FORWARD, DIR_REVERSE, EVENT_FLOW_NEW, FlowEvent, FlowKey, FlowStats, KernelConfig,
    flow_state, tcp_flags,
};

use crate::{Counter, EVENTS, FLOWS, SCRATCH_STATS, bump, parse::Packet};

/// The two 8-byte words of an address of a [`Packet`] (native byte order).
#[inline(always)]
fn words(a: &[u8; 16]) -> (u64, u64) {
    let w = a.as_ptr().cast::<u64>();
    // SAFETY: only called on `Packet::src`/`dst`, at offsets 0 and 16 of the 8-aligned
    // (repr(C, align(8))) `Packet`: two aligned words each. Word loads, not the 16
    // byte loads and shifts a byte-wise compare costs on every packet.
    unsafe { (*w, *w.add(1)) }
}

/// `(addr, port)` of `a` sorts before that of `b` (big-endian address comparison
/// without a memcmp call, which BPF does not have).
#[inline(always)]
fn lower(a: &[u8; 16], ap: u16, b: &[u8; 16], bp: u16) -> bool {
    let ((a0, a1), (b0, b1)) = (words(a), words(b));
    if a0 != b0 {
        return u64::from_be(a0) < u64::from_be(b0);
    }
    if a1 != b1 {
        return u64::from_be(a1) < u64::from_be(b1);
    }
    ap <= bp
}

/// A flow key at an 8-byte aligned address (`PayloadJob::key`), so that its
/// addresses are written as words.
#[repr(C, align(8))]
pub struct AlignedKey(pub FlowKey);

/// Writes address `a` of a [`Packet`] into `dst`, a field of an [`AlignedKey`].
#[inline(always)]
fn set_words(dst: *mut [u8; 16], a: &[u8; 16]) {
    let (w0, w1) = words(a);
    let d = dst.cast::<u64>();
    // SAFETY: `dst` is `addr_lo` or `addr_hi` (offsets 0 and 16) of an AlignedKey.
    unsafe {
        *d = w0;
        *d.add(1) = w1;
    }
}

/// Writes the flow key of the packet into `key`; returns whether its source is the
/// key's `lo` side.
#[inline(always)]
pub fn key_of(p: &Packet, key: &mut AlignedKey) -> bool {
    let src_lo = lower(&p.src, p.sport, &p.dst, p.dport);
    let key = &mut key.0;
    let (lo, hi) = if src_lo {
        (&p.src, &p.dst)
    } else {
        (&p.dst, &p.src)
    };
    set_words(&raw mut key.addr_lo, lo);
    set_words(&raw mut key.addr_hi, hi);
    if src_lo {
        key.port_lo = p.sport;
        key.port_hi = p.dport;
    } else {
        key.port_lo = p.dport;
        key.port_hi = p.sport;
    }
    key.vlan = p.vlan;
    key.protocol = p.protocol;
    key.family = p.family;
    src_lo
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

/// Emits a [`FlowEvent`] with a snapshot of `stats`; false when the ring is full.
#[inline(always)]
fn emit_flow_event(
    kind: u8,
    dir: usize,
    ifindex: u32,
    key: &FlowKey,
    stats: *const FlowStats,
    submit_flags: u64,
) -> bool {
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
                copy_words::<_, u16>(&raw mut (*ev).header.key, key);
                copy_words::<_, u64>(&raw mut (*ev).stats, stats);
            }
            e.submit(submit_flags);
            true
        }
        None => false,
    }
}

/// Copies a `T` as `size_of::<T>() / size_of::<W>()` words. Volatile so that LLVM
/// does not turn it back into a memcpy call (compiler_builtins' byte loop, which the
/// verifier then walks byte by byte on every path).
///
/// # Safety
/// `dst` and `src` valid for a `T`, aligned for `W`.
#[inline(always)]
pub unsafe fn copy_words<T, W: Copy>(dst: *mut T, src: *const T) {
    let n = size_of::<T>() / size_of::<W>();
    let d = dst.cast::<W>();
    let s = src.cast::<W>();
    let mut i = 0;
    while i < n {
        // SAFETY: i < n words inside both objects.
        unsafe { core::ptr::write_volatile(d.add(i), core::ptr::read_volatile(s.add(i))) };
        i += 1;
    }
}

/// Zeroes a `T` word by word (volatile: see [`copy_words`]; memset is a byte loop).
///
/// # Safety
/// `dst` valid for a `T`, aligned for `W`; all-zero must be a valid `T`.
#[inline(always)]
pub unsafe fn zero_words<T, W: Copy + Default>(dst: *mut T) {
    let n = size_of::<T>() / size_of::<W>();
    let d = dst.cast::<W>();
    let mut i = 0;
    while i < n {
        // SAFETY: i < n words inside the object.
        unsafe { core::ptr::write_volatile(d.add(i), W::default()) };
        i += 1;
    }
}

/// Result of accounting a packet: the flow's value pointer and the packet direction.
pub struct Accounted {
    pub stats: *mut FlowStats,
    pub dir: usize,
    pub new: bool,
}

/// The two things of the flow path that old kernels lack, in two variants; the
/// loader (`sensor-user`'s `kernel::FlowVariant`) loads the first one the kernel
/// accepts.
pub trait FlowOps {
    /// Boot-clock time in ns; `boot_offset_ns` is CLOCK_BOOTTIME - CLOCK_MONOTONIC.
    fn now(boot_offset_ns: u64) -> u64;
    /// ORs `bits` into `*word`.
    ///
    /// # Safety
    /// `word` is a live, 8-byte aligned flow-table word.
    unsafe fn or_word(word: *mut u64, bits: u64);
}

/// 5.12 and later: atomic OR (BPF_ATOMIC, 5.12) and the coarse clock (5.11).
pub struct Current;

/// 5.10 and 5.11: no atomic OR, so a plain read-modify-write (a packet of the same
/// flow on another CPU at the same instant can lose its TCP flag bits: a FIN or
/// RST missed this way ends the flow at the idle timeout instead), and no coarse
/// clock: the monotonic clock (about 50 ns more per packet) plus the same offset.
pub struct Legacy;

impl FlowOps for Current {
    #[inline(always)]
    fn now(boot_offset_ns: u64) -> u64 {
        // bpf_ktime_get_boot_ns costs ~50 ns on this class of VM (half the
        // per-packet budget); the coarse clock (tick resolution) plus the
        // agent-supplied offset gives boot-clock timestamps for a few ns.
        // SAFETY: a helper without arguments.
        unsafe { bpf_ktime_get_coarse_ns() }.wrapping_add(boot_offset_ns)
    }

    #[inline(always)]
    unsafe fn or_word(word: *mut u64, bits: u64) {
        // SAFETY: the caller's.
        unsafe { atomic_or::<u64, u64, { Relaxed }>(word, bits) };
    }
}

impl FlowOps for Legacy {
    #[inline(always)]
    fn now(boot_offset_ns: u64) -> u64 {
        // Monotonic plus the agent's offset, as `Current`: boot-clock time live,
        // and in `replay` the packet's index (the boot clock alone would ignore
        // the offset `replay` stamps, and map every flow to one packet's time).
        // SAFETY: a helper without arguments.
        unsafe { bpf_ktime_get_ns() }.wrapping_add(boot_offset_ns)
    }

    #[inline(always)]
    unsafe fn or_word(word: *mut u64, bits: u64) {
        // SAFETY: the caller's.
        unsafe { core::ptr::write_volatile(word, core::ptr::read_volatile(word) | bits) };
    }
}

/// Counts `segs` packets / `bytes` bytes of `p` in the flow table, creating the flow
/// on its first packet. `found` is the caller's lookup of `key`. `None` when the flow
/// table refused the insert.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub fn account<F: FlowOps>(
    found: Option<*mut FlowStats>,
    p: &Packet,
    key: &FlowKey,
    src_lo: bool,
    segs: u64,
    bytes: u64,
    ifindex: u32,
    boot_offset_ns: u64,
) -> Option<Accounted> {
    let now = F::now(boot_offset_ns);
    if let Some(v) = found {
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
        update_flags::<F>(v, p.tcp_flags, dir);
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
    // SAFETY: `s` is an aligned FlowStats; zero is a valid FlowStats.
    unsafe { zero_words::<_, u64>(&raw mut *s) };
    s.first_seen_ns = now;
    s.last_seen_ns = now;
    s.ifindex = ifindex;
    s.initiator_is_lo = initiator_is_lo as u8;
    s.packets[dir] = segs;
    s.bytes[dir] = bytes;
    s.tcp_flags[dir] = p.tcp_flags;
    s.state = state_bits(p.tcp_flags, dir);
    if dir == DIR_FORWARD {
        s.initiator_mac = p.src_mac;
    }
    if FLOWS.insert(key, s, BPF_NOEXIST).is_err() {
        // Lost a race with another CPU (EEXIST): account on the winner's entry.
        if let Some(v) = FLOWS.get_ptr_mut(key) {
            unsafe {
                atomic_xadd::<u64, u64, { Relaxed }>(&raw mut (*v).packets[dir], segs);
                atomic_xadd::<u64, u64, { Relaxed }>(&raw mut (*v).bytes[dir], bytes);
            }
            update_flags::<F>(v, p.tcp_flags, dir);
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
    Some(Accounted {
        stats: v,
        dir,
        new: true,
    })
}

/// Announces a new flow (after the caller classified it by address). When the ring
/// is full the flow is marked UNANNOUNCED and counted, so the agent can tell the
/// flows it recovers from the table from those that are gone.
#[inline(always)]
pub fn announce_new<F: FlowOps>(acc: &Accounted, ifindex: u32, key: &FlowKey, cfg: &KernelConfig) {
    let flags = cfg.ringbuf_submit_flags();
    if emit_flow_event(EVENT_FLOW_NEW, acc.dir, ifindex, key, acc.stats, flags) {
        return;
    }
    bump(Counter::LossNewFlowEvent);
    // SAFETY: see update_flags; the state byte is the top byte of this word.
    unsafe {
        let word = (&raw mut (*acc.stats).ifindex).cast::<u64>();
        F::or_word(word, (flow_state::UNANNOUNCED as u64) << 56);
    }
}

const BPF_NOEXIST: u64 = 1;

/// ORs the TCP flags and state bits into the flow (one atomic OR on the 8-byte word
/// `ifindex, tcp_flags[0], tcp_flags[1], initiator_is_lo, state`, little-endian).
#[inline(always)]
fn update_flags<F: FlowOps>(v: *mut FlowStats, flags: u8, dir: usize) {
    let sbits = state_bits(flags, dir);
    let want = ((flags as u64) << (32 + dir as u64 * 8)) | ((sbits as u64) << 56);
    // SAFETY: offset 56..64 of FlowStats is this 8-byte aligned word (checked by a
    // layout test in sensor-common).
    let word = unsafe { (&raw mut (*v).ifindex).cast::<u64>() };
    let cur = unsafe { core::ptr::read_volatile(word) };
    if cur & want != want {
        unsafe { F::or_word(word, want) };
    }
}
