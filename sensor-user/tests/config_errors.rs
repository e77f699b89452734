//! One broken conduit map per error class: each must be reported as
//! `FILE:LINE:COLUMN: message — fix`, and all problems of a file at once.

use std::path::{Path, PathBuf};

use sensor_user::config::{ConduitMap, ConfigError, SensorConfig};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/config")
        .join(name)
}

fn load_err(name: &str) -> ConfigError {
    let path = fixture(name);
    match ConduitMap::load(&path, None) {
        Ok(_) => panic!("{name} should not load"),
        Err(e) => e,
    }
}

/// Asserts that the errors of `name` are exactly `expected`, as
/// `(line, column, message fragment)`, in order.
fn check(name: &str, expected: &[(usize, usize, &str)]) {
    let err = load_err(name);
    let text = err.to_string();
    let path = fixture(name).display().to_string();
    assert_eq!(
        err.diagnostics.len(),
        expected.len(),
        "{name}: wrong number of errors:\n{text}"
    );
    for (d, (line, col, frag)) in err.diagnostics.iter().zip(expected) {
        assert_eq!(d.file, path, "{name}");
        assert_eq!((d.line, d.column), (*line, *col), "{name}: {d}");
        assert!(d.message.contains(frag), "{name}: `{frag}` not in: {d}");
        // Every message says how to fix it.
        assert!(d.message.contains(" — "), "{name}: no fix in: {d}");
        assert!(
            text.contains(&format!("{path}:{line}:{col}: ")),
            "{name}: display: {text}"
        );
    }
}

#[test]
fn yaml_syntax() {
    check(
        "syntax.yaml",
        &[(6, 7, "YAML syntax error: illegal placement of ':'")],
    );
}

#[test]
fn unknown_key() {
    check(
        "unknown_key.yaml",
        &[(
            15,
            5,
            "unknown key `purpsoe` in `conduits[0]` — did you mean `purpose`?",
        )],
    );
}

#[test]
fn wrong_type() {
    check(
        "wrong_type.yaml",
        &[
            (
                5,
                12,
                "`zones[0].level` must be an integer from 0 to 5, found `high`",
            ),
            (6, 15, "`zones[0].networks` must be a list, found a string"),
        ],
    );
}

#[test]
fn missing_field() {
    check(
        "missing_field.yaml",
        &[(12, 5, "missing field `from` in a conduit")],
    );
}

#[test]
fn unknown_zone() {
    check(
        "unknown_zone.yaml",
        &[(
            13,
            11,
            "unknown zone `cell-2` in `from` — use one of the zone ids: cell-1, mes",
        )],
    );
}

#[test]
fn bad_assets() {
    check(
        "bad_assets.yaml",
        &[
            (6, 18, "assets_only"),
            (
                18,
                10,
                "`assets[1].mac` is not an Ethernet address: `02:00:5e:10:00`",
            ),
            (
                20,
                11,
                "`assets[2].zone` names an unknown zone `cell-9` — use one of the map's zones: cell-1",
            ),
            (22, 5, "duplicate asset id `plc-7` (first at line 12)"),
            (
                25,
                10,
                "asset `plc-8` has the Ethernet address of asset `plc-7` (line 14)",
            ),
            (26, 5, "asset assets[5] has neither `mac` nor `addresses`"),
        ],
    );
}

#[test]
fn assets_load_and_name_devices() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().join("conduits.yaml");
    std::fs::write(
        &path,
        "version: 1\nsite: p\nzones:\n  - id: cell-1\n    networks: [10.10.1.0/24]\n    assets_only: true\nendpoints: []\nconduits: []\nassets:\n  - id: plc-7\n    name: Press line 7 PLC\n    mac: \"02:00:5E:10:00:07\"\n    zone: cell-1\n  - id: hmis\n    addresses: [10.10.1.64/26]\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let map = ConduitMap::load(&path, None).unwrap_or_else(|e| panic!("{e}"));
    assert!(map.zones[0].assets_only);
    assert!(map.assets.required_in("cell-1"));
    let ip = |s: &str| {
        s.parse::<std::net::IpAddr>()
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let plc = map
        .assets
        .identify(&[2, 0, 0x5e, 0x10, 0, 7], ip("10.10.1.7"));
    assert_eq!(
        plc.map(|a| (a.id.as_str(), a.name.as_deref())),
        Some(("plc-7", Some("Press line 7 PLC")))
    );
    assert_eq!(
        map.assets
            .identify(&[], ip("10.10.1.70"))
            .map(|a| a.id.as_str()),
        Some("hmis")
    );
    assert_eq!(map.assets.identify(&[], ip("10.10.1.5")), None);
}

#[test]
fn unknown_endpoint() {
    check(
        "unknown_endpoint.yaml",
        &[(
            14,
            9,
            "unknown endpoint `anthropic` in `to` — `anthropic` is in the catalogue",
        )],
    );
}

#[test]
fn duplicate_id() {
    check(
        "duplicate_id.yaml",
        &[(11, 5, "duplicate endpoint id `openai` (first at line 9)")],
    );
}

#[test]
fn invalid_cidr() {
    check(
        "invalid_cidr.yaml",
        &[
            (5, 16, "invalid CIDR `10.10.1.0/33`"),
            (5, 30, "invalid CIDR `not-a-network`"),
        ],
    );
}

#[test]
fn host_bits_set() {
    check(
        "host_bits.yaml",
        &[(
            5,
            16,
            "CIDR `10.10.1.5/24` has host bits set (the network is 10.10.1.0/24)",
        )],
    );
}

#[test]
fn invalid_sni_patterns() {
    check(
        "bad_sni.yaml",
        &[
            (
                6,
                9,
                "invalid SNI pattern `api..openai.com`: the name has an empty label",
            ),
            (7, 9, "character `:` is not allowed"),
            (8, 9, "`*` must be a whole label"),
            (9, 9, "`*` cannot be the last label"),
        ],
    );
}

#[test]
fn unknown_catalogue_id() {
    check(
        "unknown_catalogue.yaml",
        &[
            (
                4,
                24,
                "unknown catalogue id `opneai` — did you mean openai?",
            ),
            (7, 16, "unknown catalogue id `not-a-provider`"),
        ],
    );
}

#[test]
fn overlapping_zones() {
    check(
        "overlap.yaml",
        &[(
            7,
            16,
            "network 10.10.1.0/24 of zone `cell-1` overlaps 10.0.0.0/8 of zone `plant` (line 4)",
        )],
    );
}

#[test]
fn invalid_ports() {
    check(
        "invalid_port.yaml",
        &[
            (15, 18, "invalid port `0`"),
            (15, 21, "invalid port `70000`"),
            (15, 28, "invalid port `https`"),
        ],
    );
}

#[test]
fn unsupported_version() {
    check(
        "version.yaml",
        &[(
            1,
            10,
            "unsupported version `2` — this sensor reads `version: 1`",
        )],
    );
}

#[test]
fn all_errors_are_collected() {
    check(
        "many_errors.yaml",
        &[
            (5, 16, "has host bits set"),
            (
                6,
                5,
                "unknown key `vlan` in `zones[0]` — did you mean `vlans`?",
            ),
            (9, 11, "invalid SNI pattern `*`"),
            (12, 11, "unknown zone `b`"),
            (13, 9, "unknown endpoint `f`"),
            (
                14,
                13,
                "`action` must be allow, alert or block, found `permit`",
            ),
        ],
    );
}

#[test]
fn missing_file_is_an_error() {
    let err = ConduitMap::load(&fixture("does-not-exist.yaml"), None).expect_err("missing");
    assert!(err.to_string().contains("cannot read the file"));
}

#[test]
fn sensor_yaml_errors_are_positioned() {
    let path = fixture("sensor_bad.yaml");
    let err = SensorConfig::load(&path).expect_err("broken");
    let text = err.to_string();
    let p = path.display().to_string();
    for want in [
        format!("{p}:2:14: `spool.max_bytes` must be a size, found `lots`"),
        format!("{p}:4:8: invalid collector URL `ftp://c.example`"),
        format!("{p}:5:14: `enforcement` must be true or false, found `maybe`"),
        format!("{p}:7:11: `timeouts.active` must be a duration, found `forever`"),
    ] {
        assert!(text.contains(&want), "missing `{want}` in:\n{text}");
    }
    assert_eq!(err.diagnostics.len(), 4, "{text}");
}
