//! Bounded, allocation-free header parser shared by the XDP and TC programs.
//!
//! Works on direct packet access (`data`..`data_end`); every read is preceded by a
//! bounds check the verifier can follow. Errors are the [`Counter`] to increment.

use core::mem::size_of;

use sensor_common::{Counter, FAMILY_IPV4, FAMILY_IPV6};

/// Most IPv6 extension headers followed before giving up.
pub const MAX_IPV6_EXT: usize = 6;

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Start and end of the packet's linear data.
#[derive(Clone, Copy)]
pub struct Bounds {
    pub start: usize,
    pub end: usize,
}

impl Bounds {
    /// Pointer to a `T` at `off`, if the whole `T` is inside the packet.
    #[inline(always)]
    pub fn ptr<T>(&self, off: usize) -> Option<*const T> {
        if self.start + off + size_of::<T>() > self.end {
            return None;
        }
        Some((self.start + off) as *const T)
    }

    /// Copy of a `T` (alignment 1) at `off`.
    #[inline(always)]
    pub fn read<T: Copy>(&self, off: usize) -> Option<T> {
        // SAFETY: bounds checked by `ptr`; all header types are byte arrays (align 1).
        self.ptr::<T>(off).map(|p| unsafe { *p })
    }
}

#[inline(always)]
fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

/// Copies an IPv6 address as two u64 stores (a plain array copy becomes a memmove call).
#[inline(always)]
fn set_addr(dst: &mut [u8; 16], src: &[u8; 16]) {
    let a = u64::from_ne_bytes([
        src[0], src[1], src[2], src[3], src[4], src[5], src[6], src[7],
    ]);
    let b = u64::from_ne_bytes([
        src[8], src[9], src[10], src[11], src[12], src[13], src[14], src[15],
    ]);
    let d = dst.as_mut_ptr().cast::<u64>();
    // SAFETY: only called on `Packet::src`/`dst`, which sit at offsets 0 and 16 of
    // the 8-aligned (repr(C, align(8))) `Packet`.
    unsafe {
        core::ptr::write_volatile(d, a);
        core::ptr::write_volatile(d.add(1), b);
    }
}

/// What the flow accounting needs from one packet.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
pub struct Packet {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub vlan: u16,
    pub protocol: u8,
    pub family: u8,
    pub tcp_flags: u8,
    /// Ethernet source address.
    pub src_mac: [u8; 6],
    /// IPv4 TTL or IPv6 hop limit.
    pub ttl: u8,
    /// IP total length (IPv4 tot_len, IPv6 payload_len + 40).
    pub ip_len: u32,
    /// IP header (incl. options / extension headers) + L4 header length.
    pub hdr_len: u32,
    /// Offset of the L4 payload from the start of the frame.
    pub payload_off: u32,
    /// L4 payload length according to the IP header.
    pub payload_len: u32,
    pub tcp_seq: u32,
    pub tcp_ack: u32,
    /// IPv4 identification (0 for IPv6).
    pub ip_id: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv4Hdr {
    vihl: u8,
    tos: u8,
    tot_len: [u8; 2],
    id: [u8; 2],
    frag: [u8; 2],
    ttl: u8,
    proto: u8,
    csum: [u8; 2],
    src: [u8; 4],
    dst: [u8; 4],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv6Hdr {
    vtcfl: [u8; 4],
    payload_len: [u8; 2],
    next: u8,
    hop: u8,
    src: [u8; 16],
    dst: [u8; 16],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct TcpHdr {
    sport: [u8; 2],
    dport: [u8; 2],
    seq: [u8; 4],
    ack: [u8; 4],
    doff: u8,
    flags: u8,
    win: [u8; 2],
    csum: [u8; 2],
    urg: [u8; 2],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UdpHdr {
    sport: [u8; 2],
    dport: [u8; 2],
    len: [u8; 2],
    csum: [u8; 2],
}

/// Parses Ethernet / VLAN / IP / TCP|UDP. `Err` carries the counter to bump; the
/// caller passes the packet in every case.
#[inline(always)]
pub fn parse(b: &Bounds, p: &mut Packet) -> Result<(), Counter> {
    let eth = b.ptr::<[u8; 14]>(0).ok_or(Counter::ErrEthTruncated)?;
    // Byte by byte from the packet: a copy of the 6-byte array became a memcpy call
    // (a byte loop) on every packet.
    // SAFETY: `ptr` checked that the 14 bytes are inside the packet.
    let (mut ethertype, src_mac) = unsafe {
        let e = &*eth;
        (be16([e[12], e[13]]), [e[6], e[7], e[8], e[9], e[10], e[11]])
    };
    let mut off = 14usize;
    let mut vlan = 0u16;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        let tag = b.read::<[u8; 4]>(off).ok_or(Counter::ErrVlanTruncated)?;
        vlan = be16([tag[0], tag[1]]) & 0x0fff;
        ethertype = be16([tag[2], tag[3]]);
        off += 4;
        if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
            let tag = b.read::<[u8; 4]>(off).ok_or(Counter::ErrVlanTruncated)?;
            ethertype = be16([tag[2], tag[3]]);
            off += 4;
            if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
                return Err(Counter::ErrVlanTooDeep);
            }
        }
    }

    // `p` is per-CPU scratch (the BPF stack is too small): reset what some paths
    // skip. Volatile so LLVM does not merge the stores into a memset call (a byte
    // loop in BPF).
    // SAFETY: plain field writes.
    unsafe {
        use core::ptr::write_volatile as w;
        w(&raw mut p.sport, 0);
        w(&raw mut p.dport, 0);
        w(&raw mut p.vlan, vlan);
        w(&raw mut p.src_mac, src_mac);
        w(&raw mut p.tcp_flags, 0);
        w(&raw mut p.hdr_len, 0);
        w(&raw mut p.payload_off, 0);
        w(&raw mut p.payload_len, 0);
        w(&raw mut p.tcp_seq, 0);
        w(&raw mut p.tcp_ack, 0);
        w(&raw mut p.ip_id, 0);
    }
    let l3_off = off;
    let l4_off;
    match ethertype {
        ETH_P_IP => {
            let ip = b.read::<Ipv4Hdr>(off).ok_or(Counter::ErrIpv4Truncated)?;
            let ihl = ((ip.vihl & 0x0f) as usize) * 4;
            let tot_len = be16(ip.tot_len) as usize;
            if ip.vihl >> 4 != 4 || ihl < 20 || tot_len < ihl {
                return Err(Counter::ErrIpv4BadHeader);
            }
            // Options must be present in the frame too.
            if b.ptr::<u8>(off + ihl - 1).is_none() {
                return Err(Counter::ErrIpv4Truncated);
            }
            if be16(ip.frag) & 0x1fff != 0 {
                return Err(Counter::IpFragment);
            }
            p.family = FAMILY_IPV4;
            p.protocol = ip.proto;
            p.ttl = ip.ttl;
            // Via u128 so the zero tail is two stores, not a memset call.
            p.src = (u32::from_ne_bytes(ip.src) as u128).to_ne_bytes();
            p.dst = (u32::from_ne_bytes(ip.dst) as u128).to_ne_bytes();
            p.ip_len = tot_len as u32;
            p.ip_id = be16(ip.id);
            l4_off = off + ihl;
            p.payload_len = (tot_len - ihl) as u32;
        }
        ETH_P_IPV6 => {
            let ip = b.read::<Ipv6Hdr>(off).ok_or(Counter::ErrIpv6Truncated)?;
            p.family = FAMILY_IPV6;
            p.ttl = ip.hop;
            set_addr(&mut p.src, &ip.src);
            set_addr(&mut p.dst, &ip.dst);
            let plen = be16(ip.payload_len) as usize;
            p.ip_len = plen as u32 + 40;
            off += 40;
            let mut next = ip.next;
            let mut i = 0;
            while i < MAX_IPV6_EXT {
                i += 1;
                match next {
                    // Hop-by-hop, routing, destination options: (len + 1) * 8 bytes.
                    0 | 43 | 60 => {
                        let h = b.read::<[u8; 2]>(off).ok_or(Counter::ErrIpv6ExtTruncated)?;
                        next = h[0];
                        off += (h[1] as usize + 1) * 8;
                    }
                    // Authentication header: (len + 2) * 4 bytes.
                    51 => {
                        let h = b.read::<[u8; 2]>(off).ok_or(Counter::ErrIpv6ExtTruncated)?;
                        next = h[0];
                        off += (h[1] as usize + 2) * 4;
                    }
                    44 => {
                        let h = b.read::<[u8; 8]>(off).ok_or(Counter::ErrIpv6ExtTruncated)?;
                        if be16([h[2], h[3]]) & 0xfff8 != 0 {
                            return Err(Counter::IpFragment);
                        }
                        next = h[0];
                        off += 8;
                    }
                    _ => break,
                }
            }
            if matches!(next, 0 | 43 | 44 | 51 | 60) {
                return Err(Counter::ErrIpv6ExtTooDeep);
            }
            p.protocol = next;
            l4_off = off;
            let ext = off - l3_off - 40;
            p.payload_len = (plen as u32).saturating_sub(ext as u32);
        }
        _ => return Err(Counter::NonIp),
    }

    match p.protocol {
        IPPROTO_TCP => {
            let t = b.read::<TcpHdr>(l4_off).ok_or(Counter::ErrL4Truncated)?;
            let thl = ((t.doff >> 4) as u32) * 4;
            if thl < 20 {
                return Err(Counter::ErrL4Truncated);
            }
            p.sport = be16(t.sport);
            p.dport = be16(t.dport);
            p.tcp_flags = t.flags;
            p.tcp_seq = u32::from_be_bytes(t.seq);
            p.tcp_ack = u32::from_be_bytes(t.ack);
            p.hdr_len = (l4_off - l3_off) as u32 + thl;
            p.payload_off = l4_off as u32 + thl;
            p.payload_len = p.payload_len.saturating_sub(thl);
        }
        IPPROTO_UDP => {
            let u = b.read::<UdpHdr>(l4_off).ok_or(Counter::ErrL4Truncated)?;
            p.sport = be16(u.sport);
            p.dport = be16(u.dport);
            p.hdr_len = (l4_off - l3_off) as u32 + 8;
            p.payload_off = l4_off as u32 + 8;
            p.payload_len = (be16(u.len) as u32).saturating_sub(8);
        }
        _ => return Err(Counter::NonTcpUdp),
    }
    Ok(())
}
