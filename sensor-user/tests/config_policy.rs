//! The example files parse, and the userspace classifier follows the rules
//! (exact, suffix, inner `*`, case, trailing dot, CIDR endpoint, VLAN-scoped
//! zones, IPv6, ports, protocols, actions, enforcement).

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use sensor_user::config::{
    AppProto, Attribution, ConduitMap, KernelSniKey, Names, SensorConfig, Verdict,
};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

#[test]
fn example_conduit_map_parses() {
    let path = repo().join("deploy/examples/conduits.yaml");
    let map = ConduitMap::load(&path, Some(&repo().join("deploy/catalogue")))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(map.site, "plant-01");
    let bytes = std::fs::read(&path).unwrap_or_default();
    assert_eq!(map.policy_hash(), *blake3::hash(&bytes).as_bytes());
    assert!(map.endpoint("github-copilot").is_some());
    assert!(
        map.endpoint("azure-openai")
            .is_some_and(|e| e.catalogue.is_some())
    );
    let ip = |s: &str| s.parse::<IpAddr>().unwrap_or(IpAddr::from([0, 0, 0, 0]));
    let c = map.classify(
        ip("10.20.3.4"),
        None,
        ip("203.0.113.9"),
        443,
        AppProto::Tls,
        Some("myres.openai.azure.com"),
        false,
    );
    assert_eq!(c.verdict, Verdict::Authorized);
    assert_eq!(c.conduit.map(|c| c.id).as_deref(), Some("C-MES-AZURE"));
}

#[test]
fn example_map_works_with_the_embedded_catalogue_only() {
    // As on a gateway: the map alone in a directory, no repository around it.
    let dir = std::env::temp_dir().join(format!("conduit-cfg-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_default();
    let path = dir.join("conduits.yaml");
    let text = std::fs::read(repo().join("deploy/examples/conduits.yaml")).unwrap_or_default();
    std::fs::write(&path, text).unwrap_or_default();
    let map = ConduitMap::load(&path, Some(&dir));
    let _ = std::fs::remove_dir_all(&dir);
    let map = map.unwrap_or_else(|e| panic!("{e}"));
    assert!(map.endpoint("aws-bedrock").is_some());
}

#[test]
fn example_sensor_yaml_parses() {
    let path = repo().join("deploy/examples/sensor.yaml");
    let bytes = std::fs::read(&path).unwrap_or_default();
    let cfg = SensorConfig::from_bytes("sensor.yaml", &bytes).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.sensor_id, "gw-01");
    assert_eq!(cfg.interfaces, ["eth1", "eth2"]);
    assert_eq!(cfg.spool.max_bytes, 1 << 30);
    assert_eq!(
        cfg.metrics.map(|m| m.listen.to_string()).as_deref(),
        Some("127.0.0.1:9464")
    );
    assert!(cfg.collector.is_some_and(|c| c.tls.is_some()));
}

const MAP: &str = r#"
version: 1
site: test
default_action: alert
zones:
  - id: cell-1
    networks: [10.10.1.0/24, "fd00:10:1::/64"]
  - id: cell-2-red
    networks: [10.10.2.0/24]
    vlans: [201]
  - id: cell-2-blue
    networks: [10.10.2.0/24]
    vlans: [202]
  - id: mes
    networks: [10.20.0.0/16, 10.20.5.0/24]
endpoints:
  - id: openai
    sni: [api.openai.com, "*.openai.com"]
  - id: openai-chat
    sni: [chat.openai.com]
  - id: bedrock
    sni: [bedrock-runtime.*.amazonaws.com]
  - id: vision
    networks: [192.0.2.0/24, "2001:db8:5::/48"]
conduits:
  - id: C-MES-OPENAI
    from: mes
    to: openai
    ports: [443]
    protocols: [tls]
  - id: C-CELL1-BEDROCK
    from: cell-1
    to: bedrock
    protocols: [quic]
  - id: C-RED-VISION
    from: cell-2-red
    to: vision
    ports: ["8000-8100"]
  - id: C-BLUE-VISION
    from: cell-2-blue
    to: vision
    action: block
  - id: C-CELL1-CHAT
    from: cell-1
    to: openai-chat
    action: alert
"#;

fn map(text: &str) -> ConduitMap {
    ConduitMap::from_bytes("t.yaml", text.as_bytes(), None, None).unwrap_or_else(|e| panic!("{e}"))
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

struct Case {
    src: &'static str,
    vlan: Option<u16>,
    dst: &'static str,
    port: u16,
    proto: AppProto,
    sni: Option<&'static str>,
    zone: Option<&'static str>,
    endpoint: Option<&'static str>,
    conduit: Option<&'static str>,
    verdict: Verdict,
}

#[test]
fn classification_table() {
    use AppProto::{Quic, Tls};
    use Verdict::*;
    let m = map(MAP);
    let cases = [
        // Exact name, allowed on 443/tls from mes.
        Case {
            src: "10.20.1.1",
            vlan: None,
            dst: "203.0.113.1",
            port: 443,
            proto: Tls,
            sni: Some("api.openai.com"),
            zone: Some("mes"),
            endpoint: Some("openai"),
            conduit: Some("C-MES-OPENAI"),
            verdict: Authorized,
        },
        // Case and trailing dot do not matter.
        Case {
            src: "10.20.1.1",
            vlan: None,
            dst: "203.0.113.1",
            port: 443,
            proto: Tls,
            sni: Some("API.OpenAI.COM."),
            zone: Some("mes"),
            endpoint: Some("openai"),
            conduit: Some("C-MES-OPENAI"),
            verdict: Authorized,
        },
        // Suffix match, several labels deep.
        Case {
            src: "10.20.1.1",
            vlan: None,
            dst: "203.0.113.1",
            port: 443,
            proto: Tls,
            sni: Some("a.b.openai.com"),
            zone: Some("mes"),
            endpoint: Some("openai"),
            conduit: Some("C-MES-OPENAI"),
            verdict: Authorized,
        },
        // Wrong port / wrong protocol: no conduit, default alert.
        Case {
            src: "10.20.1.1",
            vlan: None,
            dst: "203.0.113.1",
            port: 8443,
            proto: Tls,
            sni: Some("api.openai.com"),
            zone: Some("mes"),
            endpoint: Some("openai"),
            conduit: None,
            verdict: Violation,
        },
        Case {
            src: "10.20.1.1",
            vlan: None,
            dst: "203.0.113.1",
            port: 443,
            proto: Quic,
            sni: Some("api.openai.com"),
            zone: Some("mes"),
            endpoint: Some("openai"),
            conduit: None,
            verdict: Violation,
        },
        // Most specific zone network (10.20.5.0/24 inside 10.20.0.0/16 of the same zone).
        Case {
            src: "10.20.5.9",
            vlan: Some(7),
            dst: "203.0.113.1",
            port: 443,
            proto: Tls,
            sni: Some("api.openai.com"),
            zone: Some("mes"),
            endpoint: Some("openai"),
            conduit: Some("C-MES-OPENAI"),
            verdict: Authorized,
        },
        // Exact name beats a suffix of another endpoint; alert conduit = violation.
        Case {
            src: "10.10.1.5",
            vlan: None,
            dst: "203.0.113.2",
            port: 443,
            proto: Tls,
            sni: Some("chat.openai.com"),
            zone: Some("cell-1"),
            endpoint: Some("openai-chat"),
            conduit: Some("C-CELL1-CHAT"),
            verdict: Violation,
        },
        // Inner `*`: exactly one label.
        Case {
            src: "10.10.1.5",
            vlan: None,
            dst: "203.0.113.3",
            port: 443,
            proto: Quic,
            sni: Some("bedrock-runtime.eu-central-1.amazonaws.com"),
            zone: Some("cell-1"),
            endpoint: Some("bedrock"),
            conduit: Some("C-CELL1-BEDROCK"),
            verdict: Authorized,
        },
        Case {
            src: "10.10.1.5",
            vlan: None,
            dst: "203.0.113.3",
            port: 443,
            proto: Quic,
            sni: Some("bedrock-runtime.a.b.amazonaws.com"),
            zone: Some("cell-1"),
            endpoint: None,
            conduit: None,
            verdict: Unclassified,
        },
        // IPv6 source.
        Case {
            src: "fd00:10:1::42",
            vlan: None,
            dst: "2001:db8::1",
            port: 443,
            proto: Quic,
            sni: Some("bedrock-runtime.us-east-1.amazonaws.com"),
            zone: Some("cell-1"),
            endpoint: Some("bedrock"),
            conduit: Some("C-CELL1-BEDROCK"),
            verdict: Authorized,
        },
        // CIDR endpoint (no SNI), VLAN-scoped zones on the same subnet.
        Case {
            src: "10.10.2.7",
            vlan: Some(201),
            dst: "192.0.2.10",
            port: 8080,
            proto: Tls,
            sni: None,
            zone: Some("cell-2-red"),
            endpoint: Some("vision"),
            conduit: Some("C-RED-VISION"),
            verdict: Authorized,
        },
        Case {
            src: "10.10.2.7",
            vlan: Some(202),
            dst: "192.0.2.10",
            port: 8080,
            proto: Tls,
            sni: None,
            zone: Some("cell-2-blue"),
            endpoint: Some("vision"),
            conduit: Some("C-BLUE-VISION"),
            verdict: Violation,
        },
        // Untagged traffic is in neither VLAN-scoped zone.
        Case {
            src: "10.10.2.7",
            vlan: None,
            dst: "192.0.2.10",
            port: 8080,
            proto: Tls,
            sni: None,
            zone: None,
            endpoint: Some("vision"),
            conduit: None,
            verdict: Violation,
        },
        // IPv6 CIDR endpoint.
        Case {
            src: "10.10.2.7",
            vlan: Some(201),
            dst: "2001:db8:5::9",
            port: 8000,
            proto: Tls,
            sni: None,
            zone: Some("cell-2-red"),
            endpoint: Some("vision"),
            conduit: Some("C-RED-VISION"),
            verdict: Authorized,
        },
        // Not AI traffic.
        Case {
            src: "10.20.1.1",
            vlan: None,
            dst: "198.51.100.1",
            port: 443,
            proto: Tls,
            sni: Some("www.example.com"),
            zone: Some("mes"),
            endpoint: None,
            conduit: None,
            verdict: Unclassified,
        },
        Case {
            src: "10.20.1.1",
            vlan: None,
            dst: "198.51.100.1",
            port: 443,
            proto: Tls,
            sni: Some("openai.com"),
            zone: Some("mes"),
            endpoint: None,
            conduit: None,
            verdict: Unclassified,
        },
        // Unknown source zone, AI endpoint: default action.
        Case {
            src: "172.16.0.1",
            vlan: None,
            dst: "203.0.113.1",
            port: 443,
            proto: Tls,
            sni: Some("api.openai.com"),
            zone: None,
            endpoint: Some("openai"),
            conduit: None,
            verdict: Violation,
        },
    ];
    for (i, c) in cases.iter().enumerate() {
        let got = m.classify(ip(c.src), c.vlan, ip(c.dst), c.port, c.proto, c.sni, false);
        assert_eq!(got.zone.as_ref().map(|z| z.id.as_str()), c.zone, "case {i}");
        assert_eq!(
            got.endpoint.as_ref().map(|e| e.id.as_str()),
            c.endpoint,
            "case {i}"
        );
        assert_eq!(
            got.conduit.as_ref().map(|c| c.id.as_str()),
            c.conduit,
            "case {i}"
        );
        assert_eq!(got.verdict, c.verdict, "case {i}");
    }
}

#[test]
fn enforcement_and_default_block() {
    let m = map(MAP);
    // A `block` conduit blocks only with enforcement on.
    let blue = |enf| {
        m.classify(
            ip("10.10.2.7"),
            Some(202),
            ip("192.0.2.10"),
            443,
            AppProto::Tls,
            None,
            enf,
        )
        .verdict
    };
    assert_eq!(blue(false), Verdict::Violation);
    assert_eq!(blue(true), Verdict::Blocked);
    // default_action: block.
    let m = map(&MAP.replace("default_action: alert", "default_action: block"));
    let stray = |enf| {
        m.classify(
            ip("172.16.0.1"),
            None,
            ip("203.0.113.1"),
            443,
            AppProto::Tls,
            Some("api.openai.com"),
            enf,
        )
        .verdict
    };
    assert_eq!(stray(false), Verdict::Violation);
    assert_eq!(stray(true), Verdict::Blocked);
    // Allowed stays allowed with enforcement.
    let ok = m.classify(
        ip("10.20.1.1"),
        None,
        ip("203.0.113.1"),
        443,
        AppProto::Tls,
        Some("api.openai.com"),
        true,
    );
    assert_eq!(ok.verdict, Verdict::Authorized);
}

#[test]
fn kernel_indexes_and_keys() {
    let m = map(MAP);
    let idx: Vec<u16> = m.zones.iter().map(|z| z.index).collect();
    assert_eq!(idx, [1, 2, 3, 4]);
    assert_eq!(
        m.conduit("C-CELL1-BEDROCK")
            .map(|c| (c.index, c.from_index, c.to_index)),
        Some((2, 1, 3))
    );
    assert_eq!(m.zone_by_index(4).map(|z| z.id.as_str()), Some("mes"));
    let openai = m.endpoint("openai").map(|e| {
        e.sni
            .iter()
            .filter_map(|p| p.kernel_key())
            .collect::<Vec<_>>()
    });
    assert_eq!(
        openai,
        Some(vec![
            KernelSniKey::Exact(sensor_common::sni_hash(b"api.openai.com")),
            KernelSniKey::Suffix(sensor_common::sni_hash(b".openai.com")),
        ])
    );
    assert_eq!(
        m.endpoint("bedrock").and_then(|e| e.sni[0].kernel_key()),
        None
    );
}

#[test]
fn ipv4_mapped_source_is_the_ipv4_host() {
    let m = map(MAP);
    let c = m.classify(
        ip("::ffff:10.20.1.1"),
        None,
        ip("203.0.113.1"),
        443,
        AppProto::Tls,
        Some("api.openai.com"),
        false,
    );
    assert_eq!(c.zone.map(|z| z.id).as_deref(), Some("mes"));
    assert_eq!(c.verdict, Verdict::Authorized);
}

/// The order of attribution: the SNI when it names an endpoint, else the name DNS
/// gave the client for the destination, else the destination's network.
#[test]
fn sni_then_dns_name_then_address() {
    let m = map(MAP);
    let classify = |dst: &str, sni: Option<&str>, dns: Option<&str>| {
        let c = m.classify(
            ip("10.20.1.1"),
            None,
            ip(dst),
            443,
            AppProto::Tls,
            Names { sni, dns },
            false,
        );
        c.endpoint.map(|e| (e.id, e.by))
    };
    let openai = Some(("openai".to_string(), Attribution::Sni));
    // The SNI wins over what DNS said.
    assert_eq!(
        classify(
            "198.51.100.7",
            Some("api.openai.com"),
            Some("chat.openai.com")
        ),
        openai
    );
    // An ECH outer name names no endpoint: the DNS name does.
    let by_dns = Some(("openai-chat".to_string(), Attribution::Dns));
    assert_eq!(
        classify(
            "198.51.100.7",
            Some("cloudflare-ech.com"),
            Some("chat.openai.com")
        ),
        by_dns
    );
    assert_eq!(
        classify("198.51.100.7", None, Some("CHAT.openai.com.")),
        by_dns
    );
    // The DNS name wins over the address; without a name, the address.
    assert_eq!(classify("192.0.2.9", None, Some("chat.openai.com")), by_dns);
    assert_eq!(
        classify("192.0.2.9", Some("cloudflare-ech.com"), Some("example.org")),
        Some(("vision".to_string(), Attribution::Address))
    );
    assert_eq!(classify("198.51.100.7", None, Some("example.org")), None);
    // DNS attribution decides the conduit and verdict like any other.
    let c = m.classify(
        ip("10.20.1.1"),
        None,
        ip("198.51.100.7"),
        443,
        AppProto::Tls,
        Names {
            sni: Some("cloudflare-ech.com"),
            dns: Some("api.openai.com"),
        },
        false,
    );
    assert_eq!(c.conduit.map(|c| c.id).as_deref(), Some("C-MES-OPENAI"));
    assert_eq!(c.verdict, Verdict::Authorized);
}
