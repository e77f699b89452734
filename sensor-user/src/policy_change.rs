//! The `policy_change` record: which conduit map is in force from now on, with its
//! content (zones, endpoints, conduits with owner and purpose), so an auditor's
//! report can show the map without the YAML file or its parser.

use conduit_proto::limits::MAX_POLICY_CONTENT_BYTES;
use conduit_proto::v1::{
    MapConduit, MapEndpoint, MapZone, PolicyChange, Record, RecordKind, record::Body,
};
use prost::Message as _;

use crate::config::conduits::{Action, Conduit, ConduitMap, DefaultAction, Endpoint, Zone};

/// The record for `map`, loaded at `trigger` ("startup" or "reload").
pub fn policy_change_record(map: &ConduitMap, enforcement: bool, trigger: &str) -> Record {
    let mut change = PolicyChange {
        policy_hash: map.policy_hash().to_vec(),
        path: map.file.clone(),
        zones: map.zones.len() as u32,
        endpoints: map.endpoints.len() as u32,
        conduits: map.conduits.len() as u32,
        enforcement,
        trigger: trigger.to_string(),
        default_action: match map.default_action {
            DefaultAction::Alert => "alert",
            DefaultAction::Block => "block",
        }
        .to_string(),
        ..PolicyChange::default()
    };
    // Conduits first: they are what the auditor checks; then the zones and endpoints
    // they name. Each entry goes in only while the content stays within its bound.
    let mut budget = MAX_POLICY_CONTENT_BYTES;
    let mut fits = |len: usize| {
        let cost = len + 4;
        let ok = cost <= budget;
        if ok {
            budget -= cost;
        }
        ok
    };
    for c in &map.conduits {
        let entry = conduit(c);
        if fits(entry.encoded_len()) {
            change.conduit_list.push(entry);
        } else {
            change.content_truncated = true;
        }
    }
    for z in &map.zones {
        let entry = zone(z);
        if fits(entry.encoded_len()) {
            change.zone_list.push(entry);
        } else {
            change.content_truncated = true;
        }
    }
    for e in &map.endpoints {
        let entry = endpoint(e);
        if fits(entry.encoded_len()) {
            change.endpoint_list.push(entry);
        } else {
            change.content_truncated = true;
        }
    }
    Record {
        kind: RecordKind::PolicyChange as i32,
        site: map.site.clone(),
        body: Some(Body::PolicyChange(change)),
        ..Record::default()
    }
}

fn zone(z: &Zone) -> MapZone {
    MapZone {
        id: z.id.clone(),
        name: z.name.clone().unwrap_or_default(),
        level: z.level.map_or(0, u32::from),
        networks: z.networks.iter().map(ToString::to_string).collect(),
        vlans: z.vlans.iter().map(|&v| u32::from(v)).collect(),
    }
}

fn endpoint(e: &Endpoint) -> MapEndpoint {
    MapEndpoint {
        id: e.id.clone(),
        provider: e.provider.clone().unwrap_or_default(),
        sni: e.sni.iter().map(ToString::to_string).collect(),
        networks: e.networks.iter().map(ToString::to_string).collect(),
        catalogue: e.catalogue.clone().unwrap_or_default(),
    }
}

fn conduit(c: &Conduit) -> MapConduit {
    MapConduit {
        id: c.id.clone(),
        from: c.from.clone(),
        to: c.to.clone(),
        ports: c
            .ports
            .iter()
            .map(|p| {
                if p.first == p.last {
                    p.first.to_string()
                } else {
                    format!("{}-{}", p.first, p.last)
                }
            })
            .collect(),
        protocols: c.protocols.iter().map(|p| p.as_str().to_string()).collect(),
        action: match c.action {
            Action::Allow => "allow",
            Action::Alert => "alert",
            Action::Block => "block",
        }
        .to_string(),
        owner: c.owner.clone().unwrap_or_default(),
        purpose: c.purpose.clone().unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAP: &str = "version: 1\nsite: plant\nzones:\n  - id: cell-1\n    name: Cell 1\n    level: 2\n    networks: [10.1.0.0/24]\nendpoints:\n  - id: llm\n    provider: Example\n    sni: [api.example.com]\nconduits:\n  - id: c1\n    from: cell-1\n    to: llm\n    ports: [443, 8000-8100]\n    protocols: [tls]\n    action: allow\n    owner: ot-team\n    purpose: copilot\n";

    #[test]
    fn carries_the_map_content() {
        let map =
            ConduitMap::from_bytes("conduits.yaml", MAP.as_bytes(), None, None).expect("valid map");
        let r = policy_change_record(&map, false, "startup");
        let Some(Body::PolicyChange(p)) = r.body else {
            panic!("not a policy change")
        };
        assert_eq!(r.site, "plant");
        assert!(!p.content_truncated);
        assert_eq!(p.conduit_list.len(), 1);
        let c = &p.conduit_list[0];
        assert_eq!(
            (
                c.from.as_str(),
                c.to.as_str(),
                c.owner.as_str(),
                c.purpose.as_str()
            ),
            ("cell-1", "llm", "ot-team", "copilot")
        );
        assert_eq!(c.ports, ["443", "8000-8100"]);
        assert_eq!(p.zone_list[0].networks, ["10.1.0.0/24"]);
        assert_eq!(p.zone_list[0].level, 2);
        assert_eq!(p.endpoint_list[0].sni, ["api.example.com"]);
        assert_eq!(p.default_action, "alert");
    }
}
