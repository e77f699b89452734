//! Flow classification: zone / endpoint / conduit lookups, the TLS ClientHello walk
//! to the SNI, QUIC Initial detection, and payload copies for the agent.

use aya_ebpf::{
    EbpfContext,
    bindings::xdp_md,
    cty::c_void,
    helpers::{bpf_ktime_get_boot_ns, bpf_loop, bpf_skb_load_bytes, bpf_xdp_load_bytes},
    maps::lpm_trie::Key,
};
use sensor_common::{
    CONDUIT_KEY_BITS, ConduitKey, Counter, DIR_FORWARD, DIR_REVERSE, DNS_PORT, EVENT_DNS,
    EVENT_PAYLOAD, FAMILY_IPV4, FlowKey, FlowStats, KernelConfig, PAYLOAD_COPY_MAX,
    POLICY_GEN_BITS, PayloadEvent, PolicyKey, SNI_HASH_INIT, SniKey, Verdict, ZONE_KEY_VLAN_BITS,
    ZoneKeyV4, ZoneKeyV6, app_protocol, conduit_proto, sni_hash_step, sni_state,
};

use crate::{
    CONDUITS, ENDPOINT_NETS_V4, ENDPOINT_NETS_V6, EVENTS, SNI_EXACT, SNI_SUFFIX, ZONES_V4,
    ZONES_V6, bump,
    parse::{Bounds, IPPROTO_TCP, Packet},
};

/// Most TLS extensions walked before the server_name one.
const MAX_EXTENSIONS: usize = 24;
/// Longest host name hashed (RFC 1035 limit).
const MAX_SNI: usize = 253;

const QUIC_V1: u32 = 0x0000_0001;
const QUIC_V2: u32 = 0x6b33_43cf;

/// Copies packet bytes into BPF memory.
pub trait LoadBytes: EbpfContext {
    /// `bpf_xdp_load_bytes` (5.18) / `bpf_skb_load_bytes` (4.5).
    fn load_bytes_raw(&self, off: u32, dst: *mut u8, len: u32) -> i64;
    /// The same without `bpf_xdp_load_bytes`: direct packet access for XDP (the
    /// linear area only), `bpf_skb_load_bytes` for TC.
    fn load_bytes_bounded(&self, b: &Bounds, off: u32, dst: *mut u8, len: u32) -> i64;
}

impl LoadBytes for aya_ebpf::programs::XdpContext {
    #[inline(always)]
    fn load_bytes_raw(&self, off: u32, dst: *mut u8, len: u32) -> i64 {
        // SAFETY: `dst` points to at least `len` writable bytes (checked by the verifier).
        unsafe { bpf_xdp_load_bytes(self.as_ptr().cast::<xdp_md>(), off, dst.cast(), len) }
    }

    #[inline(always)]
    fn load_bytes_bounded(&self, b: &Bounds, off: u32, dst: *mut u8, len: u32) -> i64 {
        copy_direct(b, off, dst, len)
    }
}

impl LoadBytes for aya_ebpf::programs::TcContext {
    #[inline(always)]
    fn load_bytes_raw(&self, off: u32, dst: *mut u8, len: u32) -> i64 {
        // SAFETY: as above.
        unsafe { bpf_skb_load_bytes(self.as_ptr(), off, dst.cast(), len) }
    }

    #[inline(always)]
    fn load_bytes_bounded(&self, _b: &Bounds, off: u32, dst: *mut u8, len: u32) -> i64 {
        self.load_bytes_raw(off, dst, len)
    }
}

/// `v` unchanged, through a volatile stack slot: LLVM cannot see through it, so it
/// keeps the comparisons that follow as written. It would otherwise fold them into
/// forms that older verifiers (6.1 and before) learn nothing from: `p + 1 > end`
/// into `p >= end` (no packet range at offset 0), `n < 1` into `n == 0` (no
/// lower bound). The verifier tracks the spilled value exactly.
#[inline(always)]
fn opaque<T: Copy>(v: T) -> T {
    let mut slot = v;
    // SAFETY: a local, valid for reads and writes.
    unsafe {
        core::ptr::write_volatile(&raw mut slot, v);
        core::ptr::read_volatile(&raw const slot)
    }
}

/// `n` as the size argument of a helper (`bpf_*_load_bytes`), which must be at
/// least 1: `None` unless 1 <= n <= max. The signed compare gives 6.1's verifier
/// the lower bound; the second barrier keeps LLVM from merging both checks into
/// one range check on a copy of `n`.
#[inline(always)]
fn helper_len(n: usize, max: usize) -> Option<u32> {
    let m = opaque(n) as i64;
    if m < 1 {
        return None;
    }
    let m = opaque(m as usize);
    if m > max {
        return None;
    }
    Some(m as u32)
}

/// Pointer to `N` packet bytes at `off`, if they are all in the packet: the end of
/// the bytes is compared with the packet end (see [`opaque`] for why).
#[inline(always)]
fn packet_bytes<const N: usize>(b: &Bounds, off: usize) -> Option<*const u8> {
    let last = opaque(b.start + off + N);
    if last > b.end {
        return None;
    }
    Some((last - N) as *const u8)
}

/// Bytes copied per step of [`copy_direct`].
const CHUNK: usize = 32;

/// Copies `len` (at most [`PAYLOAD_COPY_MAX`]) packet bytes at `off` into `dst` by
/// direct packet access, each step checked against the packet end: whole chunks,
/// then the last `CHUNK` bytes again (overlapping), so the tail does not depend on
/// where the chunk loop stopped and the verifier walks it once; payloads shorter
/// than a chunk byte by byte. Returns 0, or -1 if the bytes are not all in the
/// linear area.
#[inline(always)]
fn copy_direct(b: &Bounds, off: u32, dst: *mut u8, len: u32) -> i64 {
    // The mask gives the verifier a bound; parse() never yields offsets above it.
    let off = off as usize & 0x3fff;
    let len = len as usize;
    if len > PAYLOAD_COPY_MAX {
        return -1;
    }
    if len < CHUNK {
        let mut j = 0;
        while j < CHUNK - 1 {
            if j >= forget(len) {
                break;
            }
            let Some(src) = packet_bytes::<1>(b, off + j) else {
                return -1;
            };
            // SAFETY: one byte inside the packet; j < len <= the size of `dst`.
            unsafe { core::ptr::write_volatile(dst.add(j), core::ptr::read_volatile(src)) };
            j += 1;
        }
        return 0;
    }
    let mut done = 0usize;
    let mut i = 0;
    while i < PAYLOAD_COPY_MAX / CHUNK {
        if done + CHUNK > forget(len) {
            break;
        }
        if copy_chunk(b, off + done, dst, done).is_none() {
            return -1;
        }
        done += CHUNK;
        i += 1;
    }
    let last = opaque(len - CHUNK);
    if last > PAYLOAD_COPY_MAX - CHUNK || copy_chunk(b, off + last, dst, last).is_none() {
        return -1;
    }
    0
}

/// Copies `CHUNK` packet bytes at `off` to `dst + at` (`at + CHUNK` within `dst`).
#[inline(always)]
fn copy_chunk(b: &Bounds, off: usize, dst: *mut u8, at: usize) -> Option<()> {
    let src = packet_bytes::<CHUNK>(b, off)?;
    // SAFETY: `src` is CHUNK bytes inside the packet; the caller bounds `at`.
    unsafe { crate::flow::copy_words::<[u8; CHUNK], u8>(dst.add(at).cast(), src.cast()) };
    Some(())
}

/// How a payload classifier reads the packet and hashes the SNI. The loader loads
/// the best one the kernel accepts (`sensor-user`'s `kernel::ClassifierVariant`).
pub trait Variant {
    /// Whether a contesting hello's name is read in the kernel (see
    /// [`classify_hello`]); without, the agent's reading raises the verdict.
    const READS_CONTESTING_HELLO: bool;
    /// Copies `len` packet bytes at `off` into `dst`; 0 on success.
    fn copy<C: LoadBytes>(ctx: &C, b: &Bounds, off: u32, dst: *mut u8, len: u32) -> i64;
    /// Hash and endpoint (in policy generation `generation`) of the host name at
    /// `name_off` (relative to the payload, which starts at packet offset
    /// `payload_off` and is copied in `data`).
    fn sni<C: LoadBytes>(
        ctx: &C,
        data: &[u8; PAYLOAD_COPY_MAX],
        payload_off: u32,
        name_off: u32,
        name_len: u32,
        generation: u8,
    ) -> Option<(u64, u16)>;
}

/// `bpf_xdp_load_bytes` (5.18) and `bpf_loop` (5.17): reads XDP frags, and the
/// verifier checks the SNI hash step once.
pub struct Helpers;

/// No `bpf_loop` or `bpf_xdp_load_bytes`: direct packet access in fixed chunks for
/// XDP (linear data only) and a bounded loop for the SNI hash.
pub struct Bounded;

impl Variant for Helpers {
    const READS_CONTESTING_HELLO: bool = true;

    #[inline(always)]
    fn copy<C: LoadBytes>(ctx: &C, _b: &Bounds, off: u32, dst: *mut u8, len: u32) -> i64 {
        ctx.load_bytes_raw(off, dst, len)
    }

    #[inline(always)]
    fn sni<C: LoadBytes>(
        ctx: &C,
        _data: &[u8; PAYLOAD_COPY_MAX],
        payload_off: u32,
        name_off: u32,
        name_len: u32,
        generation: u8,
    ) -> Option<(u64, u16)> {
        sni_lookup(ctx, payload_off + name_off, name_len, generation)
    }
}

impl Variant for Bounded {
    // A second walk of the hello and the name would take 5.10's verifier past its
    // 1M-instruction limit.
    const READS_CONTESTING_HELLO: bool = false;

    #[inline(always)]
    fn copy<C: LoadBytes>(ctx: &C, b: &Bounds, off: u32, dst: *mut u8, len: u32) -> i64 {
        ctx.load_bytes_bounded(b, off, dst, len)
    }

    #[inline(always)]
    fn sni<C: LoadBytes>(
        _ctx: &C,
        data: &[u8; PAYLOAD_COPY_MAX],
        _payload_off: u32,
        name_off: u32,
        name_len: u32,
        generation: u8,
    ) -> Option<(u64, u16)> {
        sni_hash_bounded(data, name_off, name_len, generation)
    }
}

/// Initiator address, responder address and responder port of a packet in `dir`.
#[inline(always)]
fn sides(p: &Packet, dir: usize) -> (&[u8; 16], &[u8; 16], u16) {
    if dir == DIR_FORWARD {
        (&p.src, &p.dst, p.dport)
    } else {
        (&p.dst, &p.src, p.sport)
    }
}

/// Zone of the initiator: (VLAN, address) among VLAN-scoped zones, else (0, address)
/// among zones for any VLAN, in policy generation `generation`. The map loader
/// rejects overlaps, so at most one applies.
#[inline(always)]
fn zone_of(generation: u8, family: u8, addr: &[u8; 16], vlan: u16) -> u16 {
    let lookup = |vlan: u16| -> u16 {
        let v = vlan.to_be_bytes();
        if family == FAMILY_IPV4 {
            let data = ZoneKeyV4 {
                vlan: v,
                addr: [addr[0], addr[1], addr[2], addr[3]],
            };
            let k = Key::new(
                POLICY_GEN_BITS + ZONE_KEY_VLAN_BITS + 32,
                PolicyKey::new(generation, data),
            );
            ZONES_V4.get(k).copied().unwrap_or(0)
        } else {
            let data = ZoneKeyV6 {
                vlan: v,
                addr: *addr,
            };
            let k = Key::new(
                POLICY_GEN_BITS + ZONE_KEY_VLAN_BITS + 128,
                PolicyKey::new(generation, data),
            );
            ZONES_V6.get(k).copied().unwrap_or(0)
        }
    };
    let scoped = if vlan != 0 { lookup(vlan) } else { 0 };
    if scoped != 0 { scoped } else { lookup(0) }
}

/// Endpoint of the responder by CIDR, in policy generation `generation`.
#[inline(always)]
fn endpoint_by_net(generation: u8, family: u8, addr: &[u8; 16]) -> u16 {
    if family == FAMILY_IPV4 {
        let data = [addr[0], addr[1], addr[2], addr[3]];
        let k = Key::new(POLICY_GEN_BITS + 32, PolicyKey::new(generation, data));
        ENDPOINT_NETS_V4.get(k).copied().unwrap_or(0)
    } else {
        let k = Key::new(POLICY_GEN_BITS + 128, PolicyKey::new(generation, *addr));
        ENDPOINT_NETS_V6.get(k).copied().unwrap_or(0)
    }
}

/// Writes zone, endpoint, conduit and verdict into the flow.
#[inline(always)]
fn decide(s: *mut FlowStats, zone: u16, endpoint: u16, port: u16, proto: u8, cfg: &KernelConfig) {
    let (conduit, v) = decision(zone, endpoint, port, proto, cfg);
    write_class(s, zone, endpoint, conduit, v);
}

/// The conduit and verdict of (zone, endpoint, protocol, port). The conduit trie
/// holds each (zone, endpoint, protocol)'s ports as disjoint prefixes, first
/// conduit in the file winning (see `sensor_common::ConduitKey`); the verdict rule
/// is the shared one.
#[inline(always)]
fn decision(zone: u16, endpoint: u16, port: u16, proto: u8, cfg: &KernelConfig) -> (u16, Verdict) {
    let (conduit, act) = if endpoint == 0 {
        (0, None)
    } else {
        let ck = Key::new(
            POLICY_GEN_BITS + CONDUIT_KEY_BITS,
            PolicyKey::new(cfg.policy_gen, ConduitKey::new(zone, endpoint, proto, port)),
        );
        match CONDUITS.get(ck) {
            Some(c) => (c.conduit_id, Some(c.action)),
            None => (0, None),
        }
    };
    let v = Verdict::decide(endpoint != 0, act, cfg.default_action, cfg.enforce != 0);
    (conduit, v)
}

#[inline(always)]
fn write_class(s: *mut FlowStats, zone: u16, endpoint: u16, conduit: u16, v: Verdict) {
    // SAFETY: live flow-table value; plain stores of classification fields.
    unsafe {
        (*s).zone_id = zone;
        (*s).endpoint_id = endpoint;
        (*s).conduit_id = conduit;
        (*s).verdict = v as u8;
    }
}

/// Classification of a new flow by its responder's address (endpoint networks).
/// Not inlined: the LPM and conduit keys get their own stack frame.
#[inline(never)]
pub fn on_new_flow(p: &Packet, dir: usize, s: *mut FlowStats, cfg: &KernelConfig) {
    // DNS (either side on port 53, so a flow first seen by its response counts too):
    // its responses go to the agent for DNS attribution, its queries nowhere.
    if p.protocol != IPPROTO_TCP && (p.sport == DNS_PORT || p.dport == DNS_PORT) {
        // SAFETY: live flow-table value.
        unsafe {
            (*s).app_protocol = app_protocol::DNS;
            (*s).sni_state = sni_state::DONE;
        }
        return;
    }
    let (init, resp, port) = sides(p, dir);
    let endpoint = endpoint_by_net(cfg.policy_gen, p.family, resp);
    if endpoint == 0 {
        return;
    }
    let zone = zone_of(cfg.policy_gen, p.family, init, p.vlan);
    let proto = if p.protocol == IPPROTO_TCP {
        conduit_proto::TLS
    } else {
        conduit_proto::QUIC
    };
    decide(s, zone, endpoint, port, proto, cfg);
}

/// First forward payload packet of a flow: TLS ClientHello or QUIC Initial (and
/// later segments while the agent needs them); or, with `dir` DIR_REVERSE, the
/// responder's first payload of a TLS flow, copied as it is (its ServerHello).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub fn on_first_payload<C: LoadBytes, V: Variant>(
    ctx: &C,
    b: &Bounds,
    p: &Packet,
    key: &FlowKey,
    s: *mut FlowStats,
    ifindex: u32,
    dir: u32,
    cfg: &KernelConfig,
) {
    let reply = dir != DIR_FORWARD as u32;
    // A later forward segment: of a ClientHello still pending, or one sent before
    // the server spoke after the classification (see `sni_state::CONTESTED`).
    // SAFETY: live flow-table value.
    let continuation = !reply
        && unsafe {
            (*s).payload_copies = (*s).payload_copies.saturating_add(1);
            (*s).sni_state != sni_state::NONE
        };
    let app = if reply {
        // SAFETY: live flow-table value.
        unsafe { (*s).app_protocol }
    } else if continuation {
        // A later segment (or a later Initial): copy it as it is.
        // SAFETY: live flow-table value.
        unsafe { (*s).app_protocol }
    } else {
        // The mask gives the verifier a bound; parse() never yields offsets above it
        // (6 IPv6 extension headers of 2 KiB at most).
        let off = p.payload_off as usize & 0x3fff;
        let short = p.payload_len < 6;
        // A TLS record cut after fewer than 6 bytes (an evasion: no client does it)
        // is told by its first byte; the agent reassembles the rest. The IP length
        // says how short: the frame may carry Ethernet padding after the payload.
        // Read through the copy helpers: a direct 1-byte read's bounds check is one
        // LLVM folds into a form the verifier learns nothing from.
        let first_is_handshake = short && p.protocol == IPPROTO_TCP && {
            let mut h = 0u8;
            V::copy(ctx, b, p.payload_off, &raw mut h, 1) == 0 && h == 22
        };
        let head = match b.read::<[u8; 6]>(off) {
            Some(h) if !short => h,
            _ if first_is_handshake => [22, 3, 0, 0, 0, 1],
            _ => {
                // Too short to tell: wait for a later packet.
                // SAFETY: live flow-table value.
                unsafe { (*s).payload_copies = (*s).payload_copies.saturating_sub(1) };
                return;
            }
        };
        let app = if p.protocol == IPPROTO_TCP {
            // TLS record: handshake (22), version 3.x, then handshake type ClientHello (1).
            if head[0] == 22 && head[1] == 3 && head[5] == 1 {
                app_protocol::TLS
            } else {
                app_protocol::UNKNOWN
            }
        } else {
            let version = u32::from_be_bytes([head[1], head[2], head[3], head[4]]);
            let long_fixed = head[0] & 0xc0 == 0xc0;
            let ty = (head[0] >> 4) & 0x03;
            if long_fixed && ((version == QUIC_V1 && ty == 0) || (version == QUIC_V2 && ty == 1)) {
                app_protocol::QUIC
            } else {
                app_protocol::UNKNOWN
            }
        };
        // The flow stays PENDING until the agent has parsed the whole ClientHello
        // and written its classification (CLASS_UPDATES), even when the kernel
        // classifies it below: the agent still needs the remaining segments.
        // SAFETY: live flow-table value.
        unsafe {
            (*s).app_protocol = app;
            (*s).sni_state = if app == app_protocol::UNKNOWN {
                sni_state::DONE
            } else {
                sni_state::PENDING
            };
        }
        app
    };
    if app == app_protocol::UNKNOWN {
        return;
    }

    // Copy the payload into a ring-buffer record; the agent parses SNI, ALPN, JA4,
    // or the DNS answers. A TLS/QUIC reply it cannot copy whole is no loss: it
    // classifies nothing (its record then shows no negotiated posture), and its
    // first bytes are what is read. A DNS response lost is counted: flows it would
    // have attributed may be left to their address.
    let dns = app == app_protocol::DNS;
    let lost = |c: Counter| {
        if dns {
            bump(match c {
                Counter::LossPayloadEvent => Counter::LossDnsEvent,
                _ => Counter::LossDnsTruncated,
            });
        } else if !reply {
            bump(c);
        }
    };
    let Some(mut e) = EVENTS.reserve::<PayloadEvent>(0) else {
        lost(Counter::LossPayloadEvent);
        return;
    };
    let ev = e.as_mut_ptr();
    // The helpers read paged skb data and XDP frags too: copy what the packet
    // carries, up to the bound; fall back to the linear area if that read fails.
    let mut n = p.payload_len as usize;
    if n > PAYLOAD_COPY_MAX {
        n = PAYLOAD_COPY_MAX;
        lost(Counter::LossPayloadTruncated);
    }
    let in_frame = ((b.end - b.start) as u32).saturating_sub(p.payload_off) as usize;
    // SAFETY: `ev` is a reservation of size_of::<PayloadEvent>(); every length passed
    // is <= data.len().
    let copied = unsafe {
        let data = (&raw mut (*ev).data).cast::<u8>();
        match helper_len(n, PAYLOAD_COPY_MAX) {
            None => 0,
            Some(len) if V::copy(ctx, b, p.payload_off, data, len) == 0 => n,
            Some(_) => match helper_len(in_frame, PAYLOAD_COPY_MAX) {
                Some(part)
                    if (part as usize) < n && V::copy(ctx, b, p.payload_off, data, part) == 0 =>
                {
                    lost(Counter::LossPayloadPartial);
                    in_frame
                }
                _ => {
                    lost(Counter::LossPayloadLoad);
                    0
                }
            },
        }
    };
    // SAFETY: header fields of the reservation.
    unsafe {
        (*ev).header.kind = if dns { EVENT_DNS } else { EVENT_PAYLOAD };
        (*ev).header.direction = if reply { DIR_REVERSE } else { DIR_FORWARD } as u8;
        (*ev).header._pad = [0; 2];
        (*ev).header.ifindex = ifindex;
        (*ev).header.ts_ns = bpf_ktime_get_boot_ns();
        crate::flow::copy_words::<_, u16>(&raw mut (*ev).header.key, key);
        (*ev).tcp_seq = p.tcp_seq;
        (*ev).payload_len = p.payload_len;
        (*ev).copied_len = copied as u32;
        (*ev)._pad = 0;
    }
    if app == app_protocol::TLS && !reply {
        // SAFETY: the data array of the reservation; bytes past `copied` are never read.
        let data = unsafe { &(*ev).data };
        classify_hello::<C, V>(ctx, data, copied, p, s, continuation, cfg);
    }
    if dns {
        bump(Counter::DnsCopied);
    }
    e.submit(cfg.ringbuf_submit_flags());
}

/// The SNI of a ClientHello at the start of `data` (`copied` bytes) decides the
/// flow.
///
/// A `continuation` segment that begins a ClientHello record of its own contests
/// the first: a decoy the server ignored (bad checksum) then the real hello at the
/// same sequence number, or the reverse. Its name may raise the verdict, never
/// lower it, and the flow becomes [`sni_state::CONTESTED`] so that the agent's
/// reading of both (which can rise further) still reaches the kernel. The same name
/// again (a plain retransmission) changes nothing. The [`Bounded`] variant leaves
/// the contesting name to the agent.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn classify_hello<C: LoadBytes, V: Variant>(
    ctx: &C,
    data: &[u8; PAYLOAD_COPY_MAX],
    copied: usize,
    p: &Packet,
    s: *mut FlowStats,
    continuation: bool,
    cfg: &KernelConfig,
) {
    // TLS record: handshake (22), version 3.x, handshake type ClientHello (1).
    let begins_hello = at(data, copied, 0) == Some(22)
        && at(data, copied, 1) == Some(3)
        && at(data, copied, 5) == Some(1);
    if continuation && !begins_hello {
        return;
    }
    let named = if continuation && !V::READS_CONTESTING_HELLO {
        None
    } else {
        client_hello_sni(data, copied).and_then(|(name_off, name_len)| {
            V::sni(ctx, data, p.payload_off, name_off, name_len, cfg.policy_gen)
        })
    };
    let Some((hash, endpoint)) = named else {
        if continuation {
            // The name is in a later segment, or this variant does not read it:
            // the agent does.
            // SAFETY: live flow-table value.
            unsafe { (*s).sni_state = sni_state::CONTESTED };
        }
        return;
    };
    let (init, resp, port) = sides(p, DIR_FORWARD);
    let endpoint = if endpoint != 0 {
        endpoint
    } else {
        endpoint_by_net(cfg.policy_gen, p.family, resp)
    };
    let zone = zone_of(cfg.policy_gen, p.family, init, p.vlan);
    let (conduit, v) = decision(zone, endpoint, port, conduit_proto::TLS, cfg);
    // SAFETY: live flow-table value.
    unsafe {
        if continuation {
            if hash == (*s).sni_hash {
                return;
            }
            (*s).sni_state = sni_state::CONTESTED;
            if (v as u8) <= (*s).verdict {
                return;
            }
        }
        write_class(s, zone, endpoint, conduit, v);
        (*s).sni_hash = hash;
    }
}

/// Byte `i` of the first `n` bytes of `d`. The index goes through [`opaque`] so that
/// LLVM checks each index itself (6.1's verifier cannot bound `i + 1` from the
/// checks on `i` that LLVM would otherwise reuse).
#[inline(always)]
fn at(d: &[u8; PAYLOAD_COPY_MAX], n: usize, i: usize) -> Option<u8> {
    let i = opaque(i);
    if i >= n {
        return None;
    }
    d.get(i).copied()
}

#[inline(always)]
fn at16(d: &[u8; PAYLOAD_COPY_MAX], n: usize, i: usize) -> Option<usize> {
    Some(((at(d, n, i)? as usize) << 8) | at(d, n, i + 1)? as usize)
}

/// Walks a ClientHello (TLS record at offset 0 of `d`, `n` valid bytes) to the
/// server_name extension. Returns the host name's offset and length (without one
/// trailing dot) if the whole name is in these bytes.
#[inline(never)]
fn client_hello_sni(d: &[u8; PAYLOAD_COPY_MAX], n: usize) -> Option<(u32, u32)> {
    // 5 record header + 4 handshake header + 2 version + 32 random.
    let mut off = 43usize;
    let sid = at(d, n, off)? as usize;
    off += 1 + sid;
    let cs = at16(d, n, off)?;
    off += 2 + cs;
    let comp = at(d, n, off)? as usize;
    off += 1 + comp;
    let ext_total = at16(d, n, off)?;
    off += 2;
    let ext_end = off + ext_total;
    let mut i = 0;
    while i < MAX_EXTENSIONS {
        i += 1;
        if off + 4 > ext_end {
            return None;
        }
        let ty = at16(d, n, off)?;
        let len = at16(d, n, off + 2)?;
        off += 4;
        if ty == 0 {
            // server_name: list length (2), name type (1) = host_name, name length (2).
            if at(d, n, off + 2)? != 0 {
                return None;
            }
            let start = off + 5;
            let mut name_len = at16(d, n, off + 3)?;
            if name_len == 0 || name_len > MAX_SNI + 1 {
                return None;
            }
            // The whole name must be in the copied bytes.
            if at(d, n, start + name_len - 1)? == b'.' {
                name_len -= 1;
            }
            if name_len == 0 || name_len > MAX_SNI {
                return None;
            }
            return Some((start as u32, name_len as u32));
        }
        off += len;
    }
    None
}

/// Per-CPU scratch for hashing the SNI: the name right-aligned at `name[256]`, and the
/// running hashes seen just after a '.' (candidate `*.suffix` keys).
#[repr(C)]
pub struct SniScratch {
    name: [u8; 512],
    suffixes: [u64; MAX_SUFFIXES],
    /// Suffix hashes found so far ([`sni_hash_bounded`] keeps it here, not in a
    /// register, so that the verifier does not walk one path per count).
    found: u64,
    /// See [`forget`].
    slot: u64,
}

/// `v`, as the verifier sees a value loaded from a map: unknown, with no link to
/// `v`'s register. A bounded loop that compares `v` itself narrows `v`'s range on
/// every exit, so the paths after the loop differ and never merge (one walk of the
/// rest of the program per exit: 5.10 and the host's kernel give up at the 1M
/// instruction limit). Compared through this, nothing of the loop stays in `v`.
#[inline(always)]
fn forget(v: usize) -> usize {
    // Not `v` on this (never taken) path: a compare of `v` itself there would
    // narrow it again.
    let Some(sc) = crate::SNI_SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: per-CPU scratch, used by this invocation only.
    unsafe {
        core::ptr::write_volatile(&raw mut (*sc).slot, v as u64);
        core::ptr::read_volatile(&raw const (*sc).slot) as usize
    }
}

/// State of the SNI hashing loop.
#[repr(C)]
struct SniLoop {
    hash: u64,
    suffixes: u64,
    /// The per-CPU scratch, looked up once by the caller (not once per byte).
    sc: *mut SniScratch,
}

/// One step of the SNI hash, right to left over the right-aligned name.
#[inline(never)]
extern "C" fn sni_step(i: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the `SniLoop` on sni_lookup's stack; `st.sc` is the per-CPU
    // scratch it looked up.
    unsafe {
        let st = &mut *ctx.cast::<SniLoop>();
        let sc = st.sc;
        let c = (*sc).name[255 - (i as usize & 0xff)];
        st.hash = sni_hash_step(st.hash, c);
        if c == b'.' && st.suffixes < MAX_SUFFIXES as u64 {
            (*sc).suffixes[st.suffixes as usize & (MAX_SUFFIXES - 1)] = st.hash;
            st.suffixes += 1;
        }
    }
    0
}

/// Most `.`-suffixes of one name checked against SNI_SUFFIX.
const MAX_SUFFIXES: usize = 8;

/// Hashes the name right to left (see `sensor_common::sni_hash`); returns the hash
/// and the endpoint of the exact name, else of the longest matching `.suffix`.
///
/// The name is loaded from the packet into a fixed-size map buffer so the byte loop
/// has constant bounds (cheap for the verifier); suffix lookups happen after it.
#[inline(always)]
fn sni_lookup<C: LoadBytes>(ctx: &C, pkt_off: u32, len: u32, generation: u8) -> Option<(u64, u16)> {
    let sc = crate::SNI_SCRATCH.get_ptr_mut(0)?;
    let n = helper_len(len as usize, MAX_SNI)?;
    let len = n as usize;
    let dst_off = (256 - len) & 0xff;
    // SAFETY: dst_off + len <= 256 < name.len().
    let ok = unsafe {
        let dst = (&raw mut (*sc).name).cast::<u8>().add(dst_off);
        ctx.load_bytes_raw(pkt_off, dst, n) == 0
    };
    if !ok {
        return None;
    }
    // bpf_loop: the verifier checks the body once instead of every iteration.
    let mut st = SniLoop {
        hash: SNI_HASH_INIT,
        suffixes: 0,
        sc,
    };
    // SAFETY: `sni_step` has the callback signature bpf_loop expects; `st` lives on
    // this stack frame for the whole call.
    unsafe {
        bpf_loop(
            len as u32,
            sni_step as *mut c_void,
            (&raw mut st).cast::<c_void>(),
            0,
        )
    };
    // SAFETY: per-CPU scratch, used by this invocation only.
    Some(sni_endpoint(
        generation,
        st.hash,
        st.suffixes as usize,
        unsafe { &*sc },
    ))
}

/// [`sni_lookup`] without `bpf_loop`: hashes the name in the copied payload, right
/// to left, in a loop of [`MAX_SNI`] steps the verifier walks one by one. Every
/// step runs (a byte past the name changes nothing) and the loop keeps no
/// per-path state in registers, so the verifier's paths merge at each step: 5.10
/// otherwise gives up at its 1M-instruction limit.
#[inline(always)]
fn sni_hash_bounded(
    data: &[u8; PAYLOAD_COPY_MAX],
    name_off: u32,
    name_len: u32,
    generation: u8,
) -> Option<(u64, u16)> {
    let sc = crate::SNI_SCRATCH.get_ptr_mut(0)?;
    let (start, len) = (name_off as usize, name_len as usize);
    if len == 0 || len > MAX_SNI || start >= PAYLOAD_COPY_MAX {
        return None;
    }
    let end = start + len;
    let mut hash = SNI_HASH_INIT;
    // SAFETY: per-CPU scratch, used by this invocation only.
    unsafe { core::ptr::write_volatile(&raw mut (*sc).found, 0) };
    let mut i = 0usize;
    while i < MAX_SNI {
        // Through memory: LLVM would turn the test into an early exit, and the
        // verifier would walk one path per length (see `forget`).
        // The index is opaque too: LLVM would check one copy of it and address
        // with another, which 5.10 cannot follow.
        if i < forget(len)
            && let Some(&c) = data.get(opaque(forget(end).wrapping_sub(1 + i)))
        {
            hash = sni_hash_step(hash, c);
            if c == b'.' {
                // SAFETY: as above.
                // Volatile: LLVM would keep the count in a register otherwise.
                unsafe {
                    let k = core::ptr::read_volatile(&raw const (*sc).found);
                    if k < MAX_SUFFIXES as u64 {
                        (*sc).suffixes[k as usize & (MAX_SUFFIXES - 1)] = hash;
                        core::ptr::write_volatile(&raw mut (*sc).found, k + 1);
                    }
                }
            }
        }
        i += 1;
    }
    // SAFETY: as above.
    let found = unsafe { core::ptr::read_volatile(&raw const (*sc).found) };
    // SAFETY: as above.
    Some(sni_endpoint(generation, hash, found as usize, unsafe {
        &*sc
    }))
}

/// Endpoint of the exact name's hash `h`, else of the longest of the `k` suffix
/// hashes in `sc` that SNI_SUFFIX holds (0 if none), in policy generation
/// `generation`; returns `(h, endpoint)`.
#[inline(always)]
fn sni_endpoint(generation: u8, h: u64, k: usize, sc: &SniScratch) -> (u64, u16) {
    if let Some(ep) = SNI_EXACT.get_ptr(SniKey::sni(generation, h)) {
        // SAFETY: map value pointer from a successful lookup.
        return (h, unsafe { *ep });
    }
    let mut endpoint = 0u16;
    let mut i = 0usize;
    while i < MAX_SUFFIXES {
        if i >= k {
            break;
        }
        // Later entries are longer (more specific) suffixes and win.
        if let Some(ep) = SNI_SUFFIX.get_ptr(SniKey::sni(generation, sc.suffixes[i])) {
            // SAFETY: as above.
            endpoint = unsafe { *ep };
        }
        i += 1;
    }
    (h, endpoint)
}
