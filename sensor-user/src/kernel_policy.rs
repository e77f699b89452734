//! Compiles a validated conduit map into the kernel's lookup tables.
//!
//! The kernel decides what it can on its own (zone and endpoint CIDRs, exact and
//! `*.suffix` SNI hashes, conduits by exact port) so that a violation is visible and
//! a blocked flow dropped without waiting for the agent. Whatever it cannot express
//! (one-label `*` inside a name, VLAN-scoped zones sharing a CIDR) the agent decides
//! from the ClientHello and writes back.

use sensor_common::{ConduitKey, ConduitValue, action, conduit_proto};

use crate::{
    config::{Action, AppProto, ConduitMap, DefaultAction, KernelSniKey},
    kernel::{CidrEntry, KernelPolicy},
};

/// Most ports one conduit's port ranges expand to in the kernel table; wider
/// ranges are left to the agent's classification.
const MAX_PORTS_PER_CONDUIT: usize = 256;

/// The kernel tables for `map`.
pub fn kernel_policy(map: &ConduitMap, enforce: bool) -> KernelPolicy {
    let cidr = |net: &ipnet::IpNet, id: u16| CidrEntry {
        addr: net.network(),
        prefix_len: net.prefix_len(),
        id,
    };
    let mut policy = KernelPolicy {
        zones: map
            .zone_networks()
            .iter()
            .map(|(net, id, _vlans)| cidr(net, *id))
            .collect(),
        endpoint_nets: map
            .endpoint_networks()
            .iter()
            .map(|(net, id)| cidr(net, *id))
            .collect(),
        default_action: match map.default_action {
            DefaultAction::Alert => action::ALERT,
            DefaultAction::Block => action::BLOCK,
        },
        enforce,
        ..KernelPolicy::default()
    };
    for (key, endpoint) in map.kernel_sni_entries() {
        match key {
            KernelSniKey::Exact(h) => policy.sni_exact.push((h, endpoint)),
            KernelSniKey::Suffix(h) => policy.sni_suffix.push((h, endpoint)),
        }
    }
    for c in &map.conduits {
        let value = ConduitValue {
            conduit_id: c.index,
            action: match c.action {
                Action::Allow => action::ALLOW,
                Action::Alert => action::ALERT,
                Action::Block => action::BLOCK,
            },
            ..ConduitValue::default()
        };
        let protos: Vec<u8> = if c.protocols.is_empty() {
            vec![conduit_proto::TLS, conduit_proto::QUIC]
        } else {
            c.protocols
                .iter()
                .map(|p| match p {
                    AppProto::Tls => conduit_proto::TLS,
                    AppProto::Quic => conduit_proto::QUIC,
                })
                .collect()
        };
        // Port 0 stands for "any port" (a conduit without `ports:`).
        let mut ports: Vec<u16> = c
            .ports
            .iter()
            .flat_map(|r| r.first..=r.last)
            .take(MAX_PORTS_PER_CONDUIT)
            .collect();
        if c.ports.is_empty() {
            ports.push(0);
        }
        for proto in protos {
            for &port in &ports {
                policy.conduits.push((
                    ConduitKey {
                        zone: c.from_index,
                        endpoint: c.to_index,
                        port,
                        proto,
                        _pad: 0,
                    },
                    value,
                ));
            }
        }
    }
    policy
}

#[cfg(test)]
mod tests {
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
        let p = kernel_policy(&map, true);
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
        // C1: 3 ports x quic; C2: any port x (tls, quic).
        assert_eq!(p.conduits.len(), 3 + 2);
        assert!(
            p.conduits
                .iter()
                .any(|(k, v)| k.port == 0 && v.action == action::BLOCK && v.conduit_id == 2)
        );
    }
}
