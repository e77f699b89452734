//! JSON Schemas (draft 2020-12) of both files, for `conduit-sensor schema` and
//! editors. Written by hand so the descriptions and patterns are useful; a test
//! checks that the property names match the keys the decoders accept.

use serde_json::{Value, json};

/// `{"conduits.yaml": <schema>, "sensor.yaml": <schema>}`.
pub fn json_schema() -> Value {
    json!({
        "conduits.yaml": conduits_schema(),
        "sensor.yaml": sensor_schema(),
    })
}

const ID_PATTERN: &str = "^[A-Za-z0-9._-]+$";
const SNI_PATTERN: &str =
    r"^(\*\.)?([A-Za-z0-9_-]+|\*)(\.([A-Za-z0-9_-]+|\*))*\.[A-Za-z0-9_-]+\.?$|^[A-Za-z0-9_-]+\.?$";

fn cidr_list(description: &str) -> Value {
    json!({
        "type": "array",
        "description": description,
        "items": {"type": "string", "description": "IPv4 or IPv6 network (CIDR, host bits zero) or a single address"}
    })
}

pub fn conduits_schema() -> Value {
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "Conduit Sensor conduit map (conduits.yaml)",
        "type": "object",
        "additionalProperties": false,
        "required": ["version", "site"],
        "properties": {
            "version": {"const": 1, "description": "Format version; must be 1."},
            "site": {"type": "string", "minLength": 1, "description": "Site name, carried in every record."},
            "default_action": {"enum": ["alert", "block"], "default": "alert",
                "description": "For AI traffic that no conduit allows: alert (violation) or block (dropped when enforcement is on)."},
            "catalogue": {
                "type": "object",
                "additionalProperties": false,
                "description": "Use the shipped catalogue of AI endpoints (deploy/catalogue/ai-endpoints.yaml).",
                "properties": {
                    "path": {"type": "string", "description": "Catalogue file; relative to the map's directory. Default: next to the map, deploy/catalogue/, or the built-in copy."},
                    "include": {
                        "description": "Catalogue ids to add as endpoints (endpoint id = catalogue id), or \"all\".",
                        "oneOf": [
                            {"const": "all"},
                            {"type": "array", "items": {"type": "string", "pattern": ID_PATTERN}}
                        ]
                    }
                }
            },
            "zones": {
                "type": "array",
                "items": {
                    "type": "object",
                    "additionalProperties": false,
                    "required": ["id", "networks"],
                    "properties": {
                        "id": {"type": "string", "pattern": ID_PATTERN},
                        "name": {"type": "string"},
                        "level": {"type": "integer", "minimum": 0, "maximum": 5, "description": "Purdue level"},
                        "networks": cidr_list("Source networks of the zone; must not overlap other zones' (unless their vlans differ)."),
                        "vlans": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 4094},
                            "description": "If set, only these VLANs belong to the zone."},
                        "assets_only": {"type": "boolean", "default": false,
                            "description": "Flows from this zone must come from a device listed in `assets`; others get conduit.anomalies unknown_asset."},
                        "description": {"type": "string"}
                    }
                }
            },
            "endpoints": {
                "type": "array",
                "items": {
                    "type": "object",
                    "additionalProperties": false,
                    "required": ["id"],
                    "properties": {
                        "id": {"type": "string", "pattern": ID_PATTERN},
                        "provider": {"type": "string"},
                        "sni": {"type": "array", "items": {"type": "string", "pattern": SNI_PATTERN},
                            "description": "Exact names, `*.suffix` (one or more labels) or `a.*.b` (`*` = exactly one label)."},
                        "networks": cidr_list("Destination networks of the endpoint."),
                        "catalogue": {"type": "string", "pattern": ID_PATTERN,
                            "description": "Take provider, names and networks from this catalogue entry; `sni` here adds names."},
                        "description": {"type": "string"}
                    }
                }
            },
            "conduits": {
                "type": "array",
                "items": {
                    "type": "object",
                    "additionalProperties": false,
                    "required": ["id", "from", "to"],
                    "properties": {
                        "id": {"type": "string", "pattern": ID_PATTERN},
                        "from": {"type": "string", "description": "Zone id"},
                        "to": {"type": "string", "description": "Endpoint id"},
                        "ports": {"type": "array", "description": "Empty or absent = any port.",
                            "items": {"oneOf": [
                                {"type": "integer", "minimum": 1, "maximum": 65535},
                                {"type": "string", "pattern": "^[0-9]+(-[0-9]+)?$"}
                            ]}},
                        "protocols": {"type": "array", "items": {"enum": ["tls", "quic"]},
                            "description": "Empty or absent = any."},
                        "action": {"enum": ["allow", "alert", "block"], "default": "allow"},
                        "purpose": {"type": "string"},
                        "owner": {"type": "string"},
                        "description": {"type": "string"}
                    }
                }
            },
            "assets": {
                "type": "array",
                "description": "The zones' devices: records name a flow's initiator (host.id, host.name) by Ethernet address, else by IP address.",
                "items": {
                    "type": "object",
                    "additionalProperties": false,
                    "required": ["id"],
                    "anyOf": [{"required": ["mac"]}, {"required": ["addresses"]}],
                    "properties": {
                        "id": {"type": "string", "pattern": ID_PATTERN},
                        "name": {"type": "string"},
                        "mac": {"type": "string", "pattern": "^[0-9A-Fa-f]{2}([:-][0-9A-Fa-f]{2}){5}$"},
                        "addresses": cidr_list("The device's addresses (or a network of such devices)."),
                        "zone": {"type": "string", "description": "Zone id"},
                        "owner": {"type": "string"}
                    }
                }
            }
        }
    })
}

fn duration(default: &str) -> Value {
    json!({"type": "string", "pattern": "^[0-9]+ ?[a-z]+( ?[0-9]+ ?[a-z]+)*$", "default": default,
        "description": "Duration such as 30s, 5m, 1h"})
}

fn size(default: u64) -> Value {
    json!({"oneOf": [
        {"type": "integer", "minimum": 1},
        {"type": "string", "pattern": "^[0-9_]+ ?([KMGT]i?B?|[kmgt]i?b?)?$"}
    ], "default": default, "description": "Bytes, or a size such as 512MiB"})
}

pub fn sensor_schema() -> Value {
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "Conduit Sensor deployment settings (sensor.yaml)",
        "description": "Every field is optional. CONDUIT_SENSOR_<FIELD> environment variables override the main scalars; command-line flags override both.",
        "type": "object",
        "additionalProperties": false,
        "properties": {
            "sensor_id": {"type": "string", "description": "Default: the host name."},
            "interfaces": {"type": "array", "items": {"type": "string", "maxLength": 15}},
            "conduits": {"type": "string", "default": super::sensor::DEFAULT_CONDUITS},
            "spool": {
                "type": "object", "additionalProperties": false,
                "properties": {
                    "dir": {"type": "string", "default": super::sensor::DEFAULT_SPOOL_DIR},
                    "max_bytes": size(1 << 30),
                    "segment_bytes": size(64 << 20),
                    "sync": {"type": "object", "additionalProperties": false, "properties": {
                        "interval_ms": {"type": "integer", "minimum": 0, "default": 1000},
                        "records": {"type": "integer", "minimum": 1, "default": 256}
                    }}
                }
            },
            "signing_key": {"type": "string", "description": "ed25519 key file; default: created in the spool directory."},
            "collector": {
                "type": "object", "additionalProperties": false, "required": ["url"],
                "properties": {
                    "url": {
                        "description": "Collector URL, or a list of them in order of preference: the sensor sticks to one and fails over to the next.",
                        "oneOf": [
                            {"type": "string", "pattern": "^https?://"},
                            {"type": "array", "minItems": 1, "items": {"type": "string", "pattern": "^https?://"}}
                        ]
                    },
                    "tls": {"type": "object", "additionalProperties": false, "properties": {
                        "cert": {"type": "string"}, "key": {"type": "string"}, "ca": {"type": "string"}
                    }}
                }
            },
            "metrics": {
                "type": "object", "additionalProperties": false,
                "properties": {"listen": {"type": "string", "default": super::sensor::DEFAULT_METRICS_LISTEN}}
            },
            "enforcement": {"type": "boolean", "default": false},
            "record_all": {"type": "boolean", "default": false},
            "jsonl": {"type": "string"},
            "timeouts": {
                "type": "object", "additionalProperties": false,
                "properties": {
                    "idle": duration("30s"),
                    "active": duration("60s"),
                    "tcp_end_grace": duration("5s")
                }
            },
            "capacity": {
                "type": "object", "additionalProperties": false,
                "properties": {
                    "flow_table": {"type": "integer", "minimum": 1024, "default": sensor_common::FLOW_TABLE_SIZE},
                    "ring_buffer_bytes": {"type": "integer", "minimum": 4096, "default": sensor_common::EVENTS_RINGBUF_BYTES},
                    "tracked_flows": {"type": "integer", "minimum": 1024, "default": crate::flows::DEFAULT_TRACKED_FLOWS}
                }
            },
            "checkpoint": {
                "type": "object", "additionalProperties": false,
                "properties": {
                    "every_records": {"type": "integer", "minimum": 1, "default": conduit_evidence::chain::checkpoint::DEFAULT_EVERY_RECORDS},
                    "every_seconds": {"type": "integer", "minimum": 1, "maximum": 86400, "default": conduit_evidence::chain::checkpoint::DEFAULT_EVERY.as_secs()}
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{conduits, sensor};

    fn keys(v: &Value) -> Vec<String> {
        let mut k: Vec<String> = v["properties"]
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        k.sort();
        k
    }

    fn sorted(list: &[&str]) -> Vec<String> {
        let mut k: Vec<String> = list.iter().map(|s| (*s).to_owned()).collect();
        k.sort();
        k
    }

    #[test]
    fn schema_keys_match_decoders() {
        let c = conduits_schema();
        assert_eq!(keys(&c), sorted(conduits::TOP_KEYS));
        assert_eq!(
            keys(&c["properties"]["catalogue"]),
            sorted(conduits::CATALOGUE_KEYS)
        );
        assert_eq!(
            keys(&c["properties"]["zones"]["items"]),
            sorted(conduits::ZONE_KEYS)
        );
        assert_eq!(
            keys(&c["properties"]["endpoints"]["items"]),
            sorted(conduits::ENDPOINT_KEYS)
        );
        assert_eq!(
            keys(&c["properties"]["conduits"]["items"]),
            sorted(conduits::CONDUIT_KEYS)
        );
        assert_eq!(
            keys(&c["properties"]["assets"]["items"]),
            sorted(crate::config::assets::ASSET_KEYS)
        );
        let s = sensor_schema();
        let p = &s["properties"];
        assert_eq!(keys(&s), sorted(sensor::TOP_KEYS));
        assert_eq!(keys(&p["spool"]), sorted(sensor::SPOOL_KEYS));
        assert_eq!(
            keys(&p["spool"]["properties"]["sync"]),
            sorted(sensor::SYNC_KEYS)
        );
        assert_eq!(keys(&p["collector"]), sorted(sensor::COLLECTOR_KEYS));
        assert_eq!(
            keys(&p["collector"]["properties"]["tls"]),
            sorted(sensor::TLS_KEYS)
        );
        assert_eq!(keys(&p["metrics"]), sorted(sensor::METRICS_KEYS));
        assert_eq!(keys(&p["timeouts"]), sorted(sensor::TIMEOUT_KEYS));
        assert_eq!(keys(&p["checkpoint"]), sorted(sensor::CHECKPOINT_KEYS));
        let both = json_schema();
        assert!(both["conduits.yaml"].is_object() && both["sensor.yaml"].is_object());
    }
}
