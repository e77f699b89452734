//! The userspace classifier: used for flows the kernel left pending, and as
//! the reference the kernel's verdicts are tested against.

use std::net::IpAddr;

use super::conduits::{AppProto, ConduitMap};

/// A zone by id and 1-based index (the kernel's zone id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZoneRef {
    pub id: String,
    pub index: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointRef {
    pub id: String,
    pub index: u16,
    pub by: Attribution,
}

/// What matched a flow to its AI endpoint (`conduit.attribution`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attribution {
    /// The TLS/QUIC server name.
    Sni,
    /// The name whose DNS answer to the client gave the destination address (the
    /// SNI was hidden by ECH, absent, an IP literal, or named no endpoint).
    Dns,
    /// The destination address alone.
    Address,
}

impl Attribution {
    pub fn as_str(self) -> &'static str {
        match self {
            Attribution::Sni => "sni",
            Attribution::Dns => "dns",
            Attribution::Address => "address",
        }
    }
}

/// The names a flow can be attributed by: its TLS/QUIC server name, and the name
/// whose DNS answer to the client gave the destination address.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Names<'a> {
    pub sni: Option<&'a str>,
    pub dns: Option<&'a str>,
}

impl<'a> From<Option<&'a str>> for Names<'a> {
    /// The server name alone.
    fn from(sni: Option<&'a str>) -> Self {
        Names { sni, dns: None }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConduitRef {
    pub id: String,
    pub index: u16,
}

/// The one verdict type, shared with the kernel.
pub use sensor_common::Verdict;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classification {
    pub zone: Option<ZoneRef>,
    pub endpoint: Option<EndpointRef>,
    pub conduit: Option<ConduitRef>,
    pub verdict: Verdict,
}

impl ConduitMap {
    /// Zone of a source address: the most specific network that contains it,
    /// among zones whose `vlans` (if any) include `vlan`.
    pub fn zone_of(&self, src: IpAddr, vlan: Option<u16>) -> Option<ZoneRef> {
        self.zones
            .iter()
            .filter(|z| z.vlans.is_empty() || vlan.is_some_and(|v| z.vlans.contains(&v)))
            .filter_map(|z| {
                z.networks
                    .iter()
                    .filter(|n| n.contains(&src))
                    .map(|n| n.prefix_len())
                    .max()
                    .map(|len| (len, z))
            })
            // Longest prefix wins; on a tie the first zone in the file.
            .max_by(|(la, za), (lb, zb)| la.cmp(lb).then(zb.index.cmp(&za.index)))
            .map(|(_, z)| ZoneRef {
                id: z.id.clone(),
                index: z.index,
            })
    }

    /// AI endpoint of a destination: by SNI first (the most specific matching
    /// pattern, as the kernel's exact-then-longest-suffix lookup; ties go to
    /// the first endpoint), then by the DNS name the same way (an ECH outer name,
    /// an IP literal or a name of no endpoint leaves the SNI unusable), else by
    /// the most specific network containing `dst`.
    pub fn endpoint_of<'a>(&self, dst: IpAddr, names: impl Into<Names<'a>>) -> Option<EndpointRef> {
        let names = names.into();
        let by_name = |name: Option<&str>, by: Attribution| {
            let name = name.filter(|s| !s.is_empty())?;
            self.endpoints
                .iter()
                .flat_map(|e| e.sni.iter().map(move |p| (p, e)))
                .filter(|(p, _)| p.matches(name))
                .max_by(|(pa, ea), (pb, eb)| {
                    pa.specificity()
                        .cmp(&pb.specificity())
                        .then(eb.index.cmp(&ea.index))
                })
                .map(|(_, e)| (e, by))
        };
        let by_names =
            by_name(names.sni, Attribution::Sni).or_else(|| by_name(names.dns, Attribution::Dns));
        let found = by_names.or_else(|| {
            self.endpoints
                .iter()
                .filter_map(|e| {
                    e.networks
                        .iter()
                        .filter(|n| n.contains(&dst))
                        .map(|n| n.prefix_len())
                        .max()
                        .map(|len| (len, e))
                })
                .max_by(|(la, ea), (lb, eb)| la.cmp(lb).then(eb.index.cmp(&ea.index)))
                .map(|(_, e)| (e, Attribution::Address))
        });
        found.map(|(e, by)| EndpointRef {
            id: e.id.clone(),
            index: e.index,
            by,
        })
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "the signature mirrors the flow tuple the kernel classifies on"
    )]
    pub fn classify<'a>(
        &self,
        src: IpAddr,
        vlan: Option<u16>,
        dst: IpAddr,
        dst_port: u16,
        proto: AppProto,
        names: impl Into<Names<'a>>,
        enforcement: bool,
    ) -> Classification {
        // An IPv4-mapped IPv6 address is the IPv4 host (as the kernel sees it).
        let (src, dst) = (src.to_canonical(), dst.to_canonical());
        let zone = self.zone_of(src, vlan);
        let Some(endpoint) = self.endpoint_of(dst, names) else {
            return Classification {
                zone,
                endpoint: None,
                conduit: None,
                verdict: Verdict::Unclassified,
            };
        };
        let conduit = zone.as_ref().and_then(|z| {
            self.conduits.iter().find(|c| {
                c.from_index == z.index
                    && c.to_index == endpoint.index
                    && (c.ports.is_empty() || c.ports.iter().any(|r| r.contains(dst_port)))
                    && (c.protocols.is_empty() || c.protocols.contains(&proto))
            })
        });
        let verdict = Verdict::decide(
            true,
            conduit.map(|c| c.action.code()),
            self.default_action.code(),
            enforcement,
        );
        Classification {
            zone,
            endpoint: Some(endpoint),
            conduit: conduit.map(|c| ConduitRef {
                id: c.id.clone(),
                index: c.index,
            }),
            verdict,
        }
    }
}
