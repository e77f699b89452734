//! The conduit map's optional `assets:` section: the devices of the zones (IEC 62443
//! SR 1.1 asks which device made a call, not only which address). A flow's initiator
//! is matched by its Ethernet address first, then by its IP address; records carry
//! the asset as `host.id` / `host.name`, and a flow from a zone with
//! `assets_only: true` that matches no asset gets `conduit.anomalies:
//! ["unknown_asset"]`.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use ipnet::IpNet;

use super::conduits::{Zone, check_id, list_or_none, networks};
use super::yaml::{Ctx, Node, Pos};

pub(crate) const ASSET_KEYS: &[&str] = &["id", "name", "mac", "addresses", "zone", "owner"];

/// One device of the plant.
#[derive(Debug, Clone, PartialEq)]
pub struct Asset {
    pub id: String,
    pub name: Option<String>,
    pub mac: Option<[u8; 6]>,
    /// Single addresses or networks (a DHCP pool of one device class, say).
    pub addresses: Vec<IpNet>,
    /// The zone the device belongs to, if given (a zone id of the map).
    pub zone: Option<String>,
    pub owner: Option<String>,
    pub pos: Pos,
}

/// The assets of a map, indexed for the record path.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Assets {
    list: Vec<Asset>,
    by_mac: HashMap<[u8; 6], usize>,
    by_addr: HashMap<IpAddr, usize>,
    /// Assets given by a network rather than one address, in file order.
    by_net: Vec<(IpNet, usize)>,
    /// Zones with `assets_only: true`.
    assets_only: HashSet<String>,
}

impl Assets {
    pub fn new(list: Vec<Asset>, zones: &[Zone]) -> Assets {
        let mut a = Assets {
            assets_only: zones
                .iter()
                .filter(|z| z.assets_only)
                .map(|z| z.id.clone())
                .collect(),
            ..Assets::default()
        };
        for (i, asset) in list.iter().enumerate() {
            if let Some(mac) = asset.mac {
                a.by_mac.entry(mac).or_insert(i);
            }
            for net in &asset.addresses {
                if net.prefix_len() == net.max_prefix_len() {
                    a.by_addr.entry(net.addr()).or_insert(i);
                } else {
                    a.by_net.push((*net, i));
                }
            }
        }
        a.list = list;
        a
    }

    /// No asset and no `assets_only` zone: records are left as they are.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty() && self.assets_only.is_empty()
    }

    /// The asset that initiated a flow: by Ethernet address (empty: not seen), else
    /// by address (an exact address before the first network that holds it).
    pub fn identify(&self, mac: &[u8], src: IpAddr) -> Option<&Asset> {
        let by_mac = <[u8; 6]>::try_from(mac)
            .ok()
            .and_then(|m| self.by_mac.get(&m));
        let i = by_mac
            .or_else(|| self.by_addr.get(&src))
            .copied()
            .or_else(|| {
                self.by_net
                    .iter()
                    .find(|(net, _)| net.contains(&src))
                    .map(|(_, i)| *i)
            })?;
        self.list.get(i)
    }

    /// Whether a flow of `zone` must come from a listed asset.
    pub fn required_in(&self, zone: &str) -> bool {
        self.assets_only.contains(zone)
    }
}

/// Parses `aa:bb:cc:dd:ee:ff` (or with `-`), case-insensitive.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = text.split([':', '-']).collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(parts) {
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    Some(mac)
}

/// Decodes the `assets:` list; `zone_ids` are the map's zones, in file order.
pub(crate) fn decode(ctx: &mut Ctx, nodes: &[Node], zone_ids: &[&str]) -> Vec<Asset> {
    let mut out: Vec<Asset> = Vec::new();
    let mut ids: HashMap<String, Pos> = HashMap::new();
    let mut macs: HashMap<[u8; 6], (String, Pos)> = HashMap::new();
    for (i, node) in nodes.iter().enumerate() {
        let what = format!("assets[{i}]");
        let Some(f) = ctx.fields(node, &what, ASSET_KEYS) else {
            continue;
        };
        let id = f
            .required(ctx, "id", "an asset")
            .and_then(|n| check_id(ctx, n, &format!("{what}.id")));
        let name = f
            .get("name")
            .and_then(|n| ctx.str(n, &format!("{what}.name")));
        let owner = f
            .get("owner")
            .and_then(|n| ctx.str(n, &format!("{what}.owner")));
        let mac = f.get("mac").and_then(|n| {
            let text = ctx.nonempty_str(n, &format!("{what}.mac"))?;
            let mac = parse_mac(text.trim());
            if mac.is_none() {
                ctx.err(
                    n.pos,
                    format!("`{what}.mac` is not an Ethernet address: `{text}`"),
                    "write six hex bytes, e.g. `mac: \"02:00:5e:10:00:01\"`",
                );
            }
            mac
        });
        let addresses = f
            .get("addresses")
            .map(|n| networks(ctx, n, &format!("{what}.addresses")))
            .unwrap_or_default();
        let zone = f.get("zone").and_then(|n| {
            let z = ctx.nonempty_str(n, &format!("{what}.zone"))?;
            if !zone_ids.contains(&z.as_str()) {
                ctx.err(
                    n.pos,
                    format!("`{what}.zone` names an unknown zone `{z}`"),
                    format!("use one of the map's zones: {}", list_or_none(zone_ids)),
                );
                return None;
            }
            Some(z)
        });
        if f.get("mac").is_none() && f.get("addresses").is_none() {
            ctx.err(
                node.pos,
                format!("asset {what} has neither `mac` nor `addresses`"),
                "give the device's Ethernet address (`mac:`) or its IP addresses (`addresses:`), or both",
            );
        }
        let Some(id) = id else { continue };
        if let Some(first) = ids.get(&id) {
            ctx.err(
                node.pos,
                format!("duplicate asset id `{id}` (first at line {})", first.line),
                "give every asset its own id",
            );
            continue;
        }
        if let (Some(m), Some(n)) = (mac, f.get("mac")) {
            if let Some((other, first)) = macs.get(&m) {
                ctx.err(
                    n.pos,
                    format!(
                        "asset `{id}` has the Ethernet address of asset `{other}` (line {})",
                        first.line
                    ),
                    "one Ethernet address names one device: fix one of them",
                );
                continue;
            }
            macs.insert(m, (id.clone(), n.pos));
        }
        ids.insert(id.clone(), node.pos);
        out.push(Asset {
            id,
            name,
            mac,
            addresses,
            zone,
            owner,
            pos: node.pos,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asset(id: &str, mac: Option<[u8; 6]>, addrs: &[&str]) -> Asset {
        Asset {
            id: id.to_owned(),
            name: Some(format!("{id} name")),
            mac,
            addresses: addrs
                .iter()
                .map(|a| a.parse().unwrap_or_else(|_| panic!("{a}")))
                .collect(),
            zone: None,
            owner: None,
            pos: Pos::default(),
        }
    }

    #[test]
    fn macs_parse_in_both_notations() {
        assert_eq!(
            parse_mac("02:00:5E:10:00:01"),
            Some([2, 0, 0x5e, 0x10, 0, 1])
        );
        assert_eq!(
            parse_mac("02-00-5e-10-00-01"),
            Some([2, 0, 0x5e, 0x10, 0, 1])
        );
        for bad in [
            "02:00:5e:10:00",
            "02:00:5e:10:00:01:02",
            "2:0:5e:10:0:1",
            "zz:00:5e:10:00:01",
            "",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_ethernet_address_wins_then_the_exact_address_then_the_network() {
        let a = Assets::new(
            vec![
                asset("plc-7", Some([2, 0, 0, 0, 0, 7]), &["10.10.1.7/32"]),
                asset("hmi-pool", None, &["10.10.1.0/24"]),
                asset("cam-3", None, &["10.10.1.30/32"]),
            ],
            &[],
        );
        let ip = |s: &str| s.parse::<IpAddr>().unwrap_or(IpAddr::from([0, 0, 0, 0]));
        // A MAC match names the device even at another address (DHCP moved it).
        assert_eq!(
            a.identify(&[2, 0, 0, 0, 0, 7], ip("10.10.1.99"))
                .map(|x| x.id.as_str()),
            Some("plc-7")
        );
        assert_eq!(
            a.identify(&[], ip("10.10.1.30")).map(|x| x.id.as_str()),
            Some("cam-3")
        );
        assert_eq!(
            a.identify(&[2, 0, 0, 0, 0, 9], ip("10.10.1.44"))
                .map(|x| x.id.as_str()),
            Some("hmi-pool")
        );
        assert_eq!(a.identify(&[], ip("10.20.0.5")), None);
    }
}
