//! Compiles a validated conduit map into the kernel's lookup tables.
//!
//! The kernel decides what it can on its own (zone and endpoint CIDRs, VLAN-scoped
//! zones, exact and `*.suffix` SNI hashes, conduits by port, port-less conduits) so
//! that a violation is visible and a blocked flow dropped without waiting for the
//! agent; it reaches the same verdict as the agent's classifier
//! (`ConduitMap::classify`) for every flow it can see (`tests/kernel_agree.rs`).
//! Only one-label `*` patterns inside a name are left to the agent, which decides
//! them from the ClientHello and writes back.

use std::collections::BTreeMap;

use sensor_common::{
    CONDUIT_KEY_FIXED_BITS, ConduitKey, ConduitValue, MAX_POLICY_CIDRS, MAX_POLICY_CONDUITS,
    MAX_POLICY_SNI, conduit_proto,
};

use crate::{
    config::{AppProto, ConduitMap},
    kernel::{CidrEntry, ConduitEntry, KernelPolicy, ZoneEntry},
};

/// The conduit map needs more kernel entries than a table holds.
#[derive(Debug, thiserror::Error)]
#[error("the conduit map needs {needed} kernel {table} entries, at most {max} fit")]
pub struct PolicyTooLarge {
    pub table: &'static str,
    pub needed: usize,
    pub max: u32,
}

/// The kernel tables for `map`.
pub fn kernel_policy(map: &ConduitMap, enforce: bool) -> Result<KernelPolicy, PolicyTooLarge> {
    let cidr = |net: &ipnet::IpNet, id: u16| CidrEntry {
        addr: net.network(),
        prefix_len: net.prefix_len(),
        id,
    };
    let mut zones = Vec::new();
    for (net, id, vlans) in map.zone_networks() {
        let cidr = cidr(&net, id);
        if vlans.is_empty() {
            zones.push(ZoneEntry { cidr, vlan: 0 });
        }
        zones.extend(vlans.iter().map(|&vlan| ZoneEntry { cidr, vlan }));
    }
    let mut policy = KernelPolicy {
        zones,
        endpoint_nets: map
            .endpoint_networks()
            .iter()
            .map(|(net, id)| cidr(net, *id))
            .collect(),
        default_action: map.default_action.code(),
        enforce,
        conduits: conduit_entries(map),
        ..KernelPolicy::default()
    };
    for (key, endpoint) in map.kernel_sni_entries() {
        match key {
            crate::config::KernelSniKey::Exact(h) => policy.sni_exact.push((h, endpoint)),
            crate::config::KernelSniKey::Suffix(h) => policy.sni_suffix.push((h, endpoint)),
        }
    }
    let v4 = |v: &[CidrEntry]| v.iter().filter(|c| c.addr.is_ipv4()).count();
    let v6 = |v: &[CidrEntry]| v.iter().filter(|c| c.addr.is_ipv6()).count();
    let zone_cidrs: Vec<CidrEntry> = policy.zones.iter().map(|z| z.cidr).collect();
    for (table, needed, max) in [
        ("conduit", policy.conduits.len(), MAX_POLICY_CONDUITS),
        ("IPv4 zone", v4(&zone_cidrs), MAX_POLICY_CIDRS),
        ("IPv6 zone", v6(&zone_cidrs), MAX_POLICY_CIDRS),
        ("IPv4 endpoint", v4(&policy.endpoint_nets), MAX_POLICY_CIDRS),
        ("IPv6 endpoint", v6(&policy.endpoint_nets), MAX_POLICY_CIDRS),
        ("exact SNI", policy.sni_exact.len(), MAX_POLICY_SNI),
        ("SNI suffix", policy.sni_suffix.len(), MAX_POLICY_SNI),
    ] {
        if needed > max as usize {
            return Err(PolicyTooLarge { table, needed, max });
        }
    }
    Ok(policy)
}

/// A port range a conduit won: (first, last, its value); disjoint, sorted.
type Won = (u32, u32, ConduitValue);

/// Conduit trie entries: per (zone, endpoint, protocol), the ports each conduit
/// wins (the first matching conduit in the file, as the agent's classifier picks),
/// as disjoint port prefixes. A conduit without `ports:` covers every port.
fn conduit_entries(map: &ConduitMap) -> Vec<ConduitEntry> {
    // (zone, endpoint, proto) -> the ports each conduit won.
    let mut won: BTreeMap<(u16, u16, u8), Vec<Won>> = BTreeMap::new();
    for c in &map.conduits {
        let value = ConduitValue {
            conduit_id: c.index,
            action: c.action.code(),
            ..ConduitValue::default()
        };
        let protos: &[AppProto] = if c.protocols.is_empty() {
            &[AppProto::Tls, AppProto::Quic]
        } else {
            &c.protocols
        };
        let ranges: Vec<(u32, u32)> = if c.ports.is_empty() {
            vec![(0, u32::from(u16::MAX))]
        } else {
            c.ports
                .iter()
                .map(|r| (u32::from(r.first), u32::from(r.last)))
                .collect()
        };
        for proto in protos {
            let slot = won
                .entry((c.from_index, c.to_index, proto_code(*proto)))
                .or_default();
            for &(first, last) in &ranges {
                for (a, b) in unclaimed(slot, first, last) {
                    slot.push((a, b, value));
                }
                slot.sort_by_key(|r| r.0);
            }
        }
    }
    let mut out = Vec::new();
    for ((zone, endpoint, proto), ranges) in won {
        for (first, last, value) in ranges {
            for (port, bits) in prefixes(first, last) {
                out.push(ConduitEntry {
                    prefix_len: CONDUIT_KEY_FIXED_BITS + bits,
                    key: ConduitKey::new(zone, endpoint, proto, port),
                    value,
                });
            }
        }
    }
    out
}

fn proto_code(p: AppProto) -> u8 {
    match p {
        AppProto::Tls => conduit_proto::TLS,
        AppProto::Quic => conduit_proto::QUIC,
    }
}

/// Parts of `first..=last` that no range in `claimed` (sorted, disjoint) covers.
fn unclaimed(claimed: &[Won], first: u32, last: u32) -> Vec<(u32, u32)> {
    let mut out = Vec::new();
    let mut next = first;
    for &(a, b, _) in claimed {
        if b < next || a > last {
            continue;
        }
        if a > next {
            out.push((next, a - 1));
        }
        next = b + 1;
        if next > last {
            return out;
        }
    }
    out.push((next, last));
    out
}

/// `first..=last` as aligned port prefixes: (first port, prefix bits of the port).
fn prefixes(mut first: u32, last: u32) -> Vec<(u16, u32)> {
    let mut out = Vec::new();
    while first <= last {
        // Largest aligned block starting at `first` that ends at or before `last`.
        let mut size = if first == 0 {
            1 << 16
        } else {
            1 << first.trailing_zeros().min(16)
        };
        while first + size - 1 > last {
            size >>= 1;
        }
        out.push((first as u16, 16 - size.trailing_zeros()));
        first += size;
    }
    out
}

#[cfg(test)]
mod tests {
    use sensor_common::action;

    use super::*;

    #[test]
    fn lab_map_compiles_to_kernel_tables() {
        let yaml = br#"
version: 1
site: t
default_action: block
zones:
  - id: z
    networks: [10.0.0.0/24, "fd00::/64"]
endpoints:
  - id: e
    sni: ["api.example.com", "*.example.net", "a.*.example.org"]
    networks: [192.0.2.0/24]
conduits:
  - id: C1
    from: z
    to: e
    ports: [443, "8000-8001"]
    protocols: [quic]
    action: allow
  - id: C2
    from: z
    to: e
    action: block
"#;
        let map =
            ConduitMap::from_bytes("t.yaml", yaml, None, None).unwrap_or_else(|e| panic!("{e}"));
        let p = kernel_policy(&map, true).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.zones.len(), 2);
        assert_eq!(p.endpoint_nets.len(), 1);
        assert_eq!(
            p.sni_exact,
            vec![(sensor_common::sni_hash(b"api.example.com"), 1)]
        );
        assert_eq!(
            p.sni_suffix,
            vec![(sensor_common::sni_hash(b".example.net"), 1)]
        );
        assert_eq!(p.default_action, action::BLOCK);
        // quic: C1 wins 443 and 8000-8001 (two prefixes), C2 the rest of the ports;
        // tls: C2 alone, one prefix for every port.
        let quic: Vec<_> = p
            .conduits
            .iter()
            .filter(|c| c.key.proto == conduit_proto::QUIC)
            .collect();
        let c1: Vec<_> = quic.iter().filter(|c| c.value.conduit_id == 1).collect();
        assert_eq!(c1.len(), 2);
        let tls: Vec<_> = p
            .conduits
            .iter()
            .filter(|c| c.key.proto == conduit_proto::TLS)
            .collect();
        assert_eq!(tls.len(), 1);
        assert_eq!(tls[0].prefix_len, CONDUIT_KEY_FIXED_BITS);
        assert_eq!(tls[0].value.action, action::BLOCK);
        // Every quic port is covered exactly once.
        let covered: u32 = quic
            .iter()
            .map(|c| 1u32 << (CONDUIT_KEY_FIXED_BITS + 16 - c.prefix_len))
            .sum();
        assert_eq!(covered, 1 << 16);
    }

    #[test]
    fn ranges_split_into_aligned_prefixes() {
        assert_eq!(prefixes(0, 65535), vec![(0, 0)]);
        assert_eq!(prefixes(443, 443), vec![(443, 16)]);
        assert_eq!(prefixes(8000, 8001), vec![(8000, 15)]);
        assert_eq!(prefixes(1, 3), vec![(1, 16), (2, 15)]);
        let all: u32 = prefixes(1, 65535)
            .iter()
            .map(|(_, b)| 1u32 << (16 - b))
            .sum();
        assert_eq!(all, 65535);
        let v = ConduitValue::default();
        assert_eq!(unclaimed(&[(10, 20, v)], 0, 30), vec![(0, 9), (21, 30)]);
        assert_eq!(unclaimed(&[(10, 20, v)], 12, 15), vec![]);
        assert_eq!(unclaimed(&[(0, 65535, v)], 443, 443), vec![]);
    }

    #[test]
    fn earlier_portless_conduit_wins_every_port() {
        let yaml = br#"
version: 1
site: t
zones:
  - id: z
    networks: [10.0.0.0/24]
    vlans: [5, 6]
endpoints:
  - id: e
    networks: [192.0.2.0/24]
conduits:
  - id: ANY
    from: z
    to: e
    action: alert
  - id: HTTPS
    from: z
    to: e
    ports: [443]
    action: allow
"#;
        let map =
            ConduitMap::from_bytes("t.yaml", yaml, None, None).unwrap_or_else(|e| panic!("{e}"));
        let p = kernel_policy(&map, false).unwrap_or_else(|e| panic!("{e}"));
        assert!(p.conduits.iter().all(|c| c.value.conduit_id == 1));
        // One zone entry per VLAN, none for "any VLAN".
        assert_eq!(
            p.zones.iter().map(|z| z.vlan).collect::<Vec<_>>(),
            vec![5, 6]
        );
    }
}
