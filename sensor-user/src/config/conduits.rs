//! `conduits.yaml`: the conduit map (zones, AI endpoints, conduits).
//!
//! Zones, endpoints and conduits get 1-based `u16` indexes in file order
//! (catalogue includes come after the map's own endpoints); the kernel maps
//! use these indexes, 0 meaning "none".

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ipnet::IpNet;

use super::assets::{self, Assets};
use super::catalogue::Catalogue;
use super::pattern::{KernelSniKey, SniPattern};
use super::yaml::{self, Ctx, Node, Pos, Value, describe};
use super::{ConfigError, read_file};

pub const SUPPORTED_VERSION: u64 = 1;

pub(crate) const TOP_KEYS: &[&str] = &[
    "version",
    "site",
    "default_action",
    "catalogue",
    "zones",
    "endpoints",
    "conduits",
    "assets",
];
pub(crate) const CATALOGUE_KEYS: &[&str] = &["path", "include"];
pub(crate) const ZONE_KEYS: &[&str] = &[
    "id",
    "name",
    "level",
    "networks",
    "vlans",
    "assets_only",
    "description",
];
pub(crate) const ENDPOINT_KEYS: &[&str] = &[
    "id",
    "provider",
    "sni",
    "networks",
    "catalogue",
    "description",
];
pub(crate) const CONDUIT_KEYS: &[&str] = &[
    "id",
    "from",
    "to",
    "ports",
    "protocols",
    "action",
    "purpose",
    "owner",
    "description",
];

/// What happens to AI traffic that no conduit allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultAction {
    Alert,
    Block,
}

impl DefaultAction {
    /// The kernel's [`sensor_common::action`] value.
    pub fn code(self) -> u8 {
        match self {
            DefaultAction::Alert => sensor_common::action::ALERT,
            DefaultAction::Block => sensor_common::action::BLOCK,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Alert,
    Block,
}

impl Action {
    /// The kernel's [`sensor_common::action`] value.
    pub fn code(self) -> u8 {
        match self {
            Action::Allow => sensor_common::action::ALLOW,
            Action::Alert => sensor_common::action::ALERT,
            Action::Block => sensor_common::action::BLOCK,
        }
    }
}

/// Application protocol a conduit covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AppProto {
    Tls,
    Quic,
}

impl AppProto {
    pub fn as_str(self) -> &'static str {
        match self {
            AppProto::Tls => "tls",
            AppProto::Quic => "quic",
        }
    }
}

/// An inclusive port range; a single port has `first == last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Zone {
    pub id: String,
    /// 1-based, file order.
    pub index: u16,
    pub name: Option<String>,
    /// Purdue level 0-5.
    pub level: Option<u8>,
    pub networks: Vec<IpNet>,
    /// Empty = any VLAN (and untagged).
    pub vlans: Vec<u16>,
    /// Flows from this zone must come from a listed asset (else `unknown_asset`).
    pub assets_only: bool,
    pub pos: Pos,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    pub id: String,
    /// 1-based, file order.
    pub index: u16,
    pub provider: Option<String>,
    pub sni: Vec<SniPattern>,
    pub networks: Vec<IpNet>,
    /// Catalogue entry this endpoint was built from, if any.
    pub catalogue: Option<String>,
    /// Documentation URL (from the catalogue).
    pub source: Option<String>,
    pub pos: Pos,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Conduit {
    pub id: String,
    /// 1-based, file order.
    pub index: u16,
    /// Zone id and its index.
    pub from: String,
    pub from_index: u16,
    /// Endpoint id and its index.
    pub to: String,
    pub to_index: u16,
    /// Empty = any port.
    pub ports: Vec<PortRange>,
    /// Empty = any protocol.
    pub protocols: Vec<AppProto>,
    pub action: Action,
    pub purpose: Option<String>,
    pub owner: Option<String>,
    pub pos: Pos,
}

/// The map's `catalogue:` section.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CatalogueRef {
    /// `catalogue.path`, resolved against the map's directory.
    pub path: Option<PathBuf>,
    /// Ids included as endpoints (`all` expands to every entry).
    pub include: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ConduitMap {
    pub version: u32,
    pub site: String,
    pub default_action: DefaultAction,
    pub catalogue: CatalogueRef,
    pub zones: Vec<Zone>,
    pub endpoints: Vec<Endpoint>,
    pub conduits: Vec<Conduit>,
    /// The `assets:` section (empty when absent).
    pub assets: Assets,
    /// The file the map was read from.
    pub file: String,
    /// Version of the catalogue used, if the map used it.
    pub catalogue_version: Option<String>,
    /// blake3 of the catalogue bytes, if the map used it.
    pub catalogue_hash: Option<[u8; 32]>,
    policy_hash: [u8; 32],
}

impl ConduitMap {
    /// Reads and validates a conduit map. The catalogue (only read when the
    /// map uses it) is `catalogue.path` from the map, else `catalogue_dir`, else
    /// `ai-endpoints.yaml` next to the map, else `deploy/catalogue/`, else the
    /// copy compiled into the binary.
    pub fn load(path: &Path, catalogue_dir: Option<&Path>) -> Result<ConduitMap, ConfigError> {
        let bytes = read_file(path)?;
        ConduitMap::from_bytes(
            &path.display().to_string(),
            &bytes,
            path.parent(),
            catalogue_dir,
        )
    }

    /// Validates a map held in memory; `map_dir` resolves relative paths.
    pub fn from_bytes(
        file: &str,
        bytes: &[u8],
        map_dir: Option<&Path>,
        catalogue_dir: Option<&Path>,
    ) -> Result<ConduitMap, ConfigError> {
        let text = std::str::from_utf8(bytes)
            .map_err(|_| ConfigError::single(file, "the file is not UTF-8 — save it as UTF-8"))?;
        let root = yaml::parse(file, text)?;
        let mut ctx = Ctx::new(file);
        let mut map = ConduitMap {
            version: 0,
            site: String::new(),
            default_action: DefaultAction::Alert,
            catalogue: CatalogueRef::default(),
            zones: Vec::new(),
            endpoints: Vec::new(),
            conduits: Vec::new(),
            assets: Assets::default(),
            file: file.to_owned(),
            catalogue_version: None,
            catalogue_hash: None,
            policy_hash: *blake3::hash(bytes).as_bytes(),
        };
        let mut extra = Vec::new();
        decode(
            &mut ctx,
            &root,
            &mut map,
            map_dir,
            catalogue_dir,
            &mut extra,
        );
        let mut result = ctx.into_result(map);
        // Problems inside the catalogue file itself come after the map's.
        if !extra.is_empty() {
            match &mut result {
                Ok(_) => result = Err(ConfigError { diagnostics: extra }),
                Err(e) => e.diagnostics.extend(extra),
            }
        }
        result
    }

    /// blake3 of the map file's bytes (logged, and carried in every record).
    pub fn policy_hash(&self) -> [u8; 32] {
        self.policy_hash
    }

    pub fn zone(&self, id: &str) -> Option<&Zone> {
        self.zones.iter().find(|z| z.id == id)
    }

    pub fn endpoint(&self, id: &str) -> Option<&Endpoint> {
        self.endpoints.iter().find(|e| e.id == id)
    }

    pub fn conduit(&self, id: &str) -> Option<&Conduit> {
        self.conduits.iter().find(|c| c.id == id)
    }

    /// Zone by 1-based index.
    pub fn zone_by_index(&self, index: u16) -> Option<&Zone> {
        self.zones.get(usize::from(index).checked_sub(1)?)
    }

    pub fn endpoint_by_index(&self, index: u16) -> Option<&Endpoint> {
        self.endpoints.get(usize::from(index).checked_sub(1)?)
    }

    pub fn conduit_by_index(&self, index: u16) -> Option<&Conduit> {
        self.conduits.get(usize::from(index).checked_sub(1)?)
    }
}

fn decode(
    ctx: &mut Ctx,
    root: &Node,
    map: &mut ConduitMap,
    map_dir: Option<&Path>,
    catalogue_dir: Option<&Path>,
    extra: &mut Vec<super::Diagnostic>,
) {
    if root.is_null() {
        ctx.err(
            root.pos,
            "the conduit map is empty",
            "start from deploy/examples/conduits.yaml",
        );
        return;
    }
    let Some(top) = ctx.fields(root, "conduit map", TOP_KEYS) else {
        return;
    };
    if let Some(n) = top.required(ctx, "version", "the conduit map") {
        match &n.value {
            Value::Scalar { text, .. } if text.trim() == SUPPORTED_VERSION.to_string() => {
                map.version = 1;
            }
            _ => ctx.err(
                n.pos,
                format!("unsupported version {}", describe(n)),
                format!("this sensor reads `version: {SUPPORTED_VERSION}`"),
            ),
        }
    }
    if let Some(n) = top.required(ctx, "site", "the conduit map") {
        map.site = ctx.nonempty_str(n, "site").unwrap_or_default();
    }
    if let Some(n) = top.get("default_action") {
        match scalar(n) {
            Some("alert") => map.default_action = DefaultAction::Alert,
            Some("block") => map.default_action = DefaultAction::Block,
            _ => ctx.err(
                n.pos,
                format!("`default_action` must be alert or block, found {}", describe(n)),
                "write `default_action: alert` (record violations) or `block` (drop them when enforcement is on)",
            ),
        }
    }

    // Catalogue section: loaded lazily, only if something refers to it.
    let mut cat_path_pos = None;
    let mut include: Vec<(String, Pos)> = Vec::new();
    if let Some(n) = top.get("catalogue")
        && let Some(f) = ctx.fields(n, "catalogue", CATALOGUE_KEYS)
    {
        if let Some(p) = f.get("path")
            && let Some(s) = ctx.nonempty_str(p, "catalogue.path")
        {
            let p_buf = PathBuf::from(&s);
            let resolved = match map_dir {
                Some(dir) if p_buf.is_relative() => dir.join(p_buf),
                _ => p_buf,
            };
            map.catalogue.path = Some(resolved);
            cat_path_pos = Some(p.pos);
        }
        if let Some(n) = f.get("include") {
            if scalar(n) == Some("all") {
                include.push(("all".to_owned(), n.pos));
            } else if let Some(items) = ctx.seq(n, "catalogue.include") {
                for item in items {
                    if let Some(s) = ctx.nonempty_str(item, "catalogue.include[]") {
                        include.push((s, item.pos));
                    }
                }
            }
        }
    }
    let endpoint_nodes = top
        .get("endpoints")
        .and_then(|n| ctx.seq(n, "endpoints"))
        .unwrap_or(&[]);
    let uses_catalogue = !include.is_empty()
        || map.catalogue.path.is_some()
        || endpoint_nodes.iter().any(|e| match &e.value {
            Value::Map(entries) => entries.iter().any(|(k, _)| scalar(k) == Some("catalogue")),
            _ => false,
        });
    let catalogue = if uses_catalogue {
        let loaded = match &map.catalogue.path {
            Some(p) => {
                if p.is_file() {
                    Catalogue::load(p)
                } else {
                    ctx.err(
                        cat_path_pos.unwrap_or(top.pos),
                        format!("catalogue file {} not found", p.display()),
                        "fix `catalogue.path` (relative paths start at the map's directory) or remove it to use the built-in catalogue",
                    );
                    Err(ConfigError {
                        diagnostics: Vec::new(),
                    })
                }
            }
            None => match Catalogue::locate(catalogue_dir, map_dir) {
                Some(p) => Catalogue::load(&p),
                None => Catalogue::embedded(),
            },
        };
        match loaded {
            Ok(c) => {
                map.catalogue_version = Some(c.version.clone());
                map.catalogue_hash = Some(c.hash);
                map.catalogue.path = Some(PathBuf::from(&c.file));
                Some(c)
            }
            Err(e) => {
                extra.extend(e.diagnostics);
                None
            }
        }
    } else {
        None
    };

    // Zones.
    let mut zone_ids: HashMap<String, (u16, Pos)> = HashMap::new();
    let zone_nodes = top
        .get("zones")
        .and_then(|n| ctx.seq(n, "zones"))
        .unwrap_or(&[]);
    let mut net_pos: Vec<Vec<Pos>> = Vec::new();
    for (i, node) in zone_nodes.iter().enumerate() {
        let what = format!("zones[{i}]");
        let Some(f) = ctx.fields(node, &what, ZONE_KEYS) else {
            continue;
        };
        let id = f
            .required(ctx, "id", "a zone")
            .and_then(|n| check_id(ctx, n, &format!("{what}.id")));
        let name = f
            .get("name")
            .and_then(|n| ctx.str(n, &format!("{what}.name")));
        let level = f
            .get("level")
            .and_then(|n| ctx.uint(n, &format!("{what}.level"), 0, 5))
            .and_then(|v| u8::try_from(v).ok());
        let nets_node = f.required(ctx, "networks", "a zone");
        let (nets, positions) = nets_node
            .map(|n| networks_with_pos(ctx, n, &format!("{what}.networks")))
            .unwrap_or_default();
        if let Some(n) = nets_node
            && matches!(&n.value, Value::Seq(v) if v.is_empty())
        {
            ctx.err(
                n.pos,
                format!("zone {what} has no networks"),
                "list the zone's CIDRs, e.g. `networks: [10.10.1.0/24]`",
            );
        }
        let vlans = f
            .get("vlans")
            .and_then(|n| ctx.seq(n, &format!("{what}.vlans")))
            .map(|items| {
                items
                    .iter()
                    .filter_map(|v| ctx.uint(v, &format!("{what}.vlans[]"), 1, 4094))
                    .filter_map(|v| u16::try_from(v).ok())
                    .collect()
            })
            .unwrap_or_default();
        let assets_only = f
            .get("assets_only")
            .and_then(|n| ctx.bool(n, &format!("{what}.assets_only")))
            .unwrap_or(false);
        let Some(id) = id else { continue };
        if let Some((_, first)) = zone_ids.get(&id) {
            ctx.err(
                node.pos,
                format!("duplicate zone id `{id}` (first at line {})", first.line),
                "give every zone its own id",
            );
            continue;
        }
        let Some(index) = next_index(ctx, map.zones.len(), node.pos, "zones") else {
            continue;
        };
        zone_ids.insert(id.clone(), (index, node.pos));
        map.zones.push(Zone {
            id,
            index,
            name,
            level,
            networks: nets,
            vlans,
            assets_only,
            pos: node.pos,
        });
        net_pos.push(positions);
    }
    check_zone_overlaps(ctx, &map.zones, &net_pos);

    // Assets: the devices of the zones.
    let ids: Vec<&str> = map.zones.iter().map(|z| z.id.as_str()).collect();
    let list = match top.get("assets").and_then(|n| ctx.seq(n, "assets")) {
        Some(nodes) => assets::decode(ctx, nodes, &ids),
        None => Vec::new(),
    };
    map.assets = Assets::new(list, &map.zones);

    // Endpoints: the map's own, then catalogue includes.
    let mut endpoint_ids: HashMap<String, Pos> = HashMap::new();
    for (i, node) in endpoint_nodes.iter().enumerate() {
        let what = format!("endpoints[{i}]");
        let Some(f) = ctx.fields(node, &what, ENDPOINT_KEYS) else {
            continue;
        };
        let id = f
            .required(ctx, "id", "an endpoint")
            .and_then(|n| check_id(ctx, n, &format!("{what}.id")));
        let mut provider = f
            .get("provider")
            .and_then(|n| ctx.str(n, &format!("{what}.provider")));
        let mut sni = f
            .get("sni")
            .map(|n| sni_list(ctx, n, &format!("{what}.sni")))
            .unwrap_or_default();
        let mut nets = f
            .get("networks")
            .map(|n| networks(ctx, n, &format!("{what}.networks")))
            .unwrap_or_default();
        let mut source = None;
        let mut cat_id = None;
        if let Some(n) = f.get("catalogue")
            && let Some(cid) = ctx.nonempty_str(n, &format!("{what}.catalogue"))
            && let Some(cat) = &catalogue
        {
            match cat.get(&cid) {
                Some(entry) => {
                    provider = provider.or_else(|| Some(entry.provider.clone()));
                    let mut merged = entry.sni.clone();
                    merged.extend(sni.into_iter().filter(|p| !entry.sni.contains(p)));
                    sni = merged;
                    nets.extend(entry.networks.iter().copied());
                    source = Some(entry.source.clone());
                    cat_id = Some(cid);
                }
                None => unknown_catalogue_id(ctx, cat, &cid, n.pos),
            }
        }
        // Judge the keys, not the parsed lists, so a bad pattern is not reported twice.
        if ["sni", "networks", "catalogue"]
            .iter()
            .all(|k| f.get(k).is_none())
        {
            ctx.err(
                node.pos,
                format!("endpoint {what} has no `sni`, `networks` or `catalogue`"),
                "add `sni: [api.example.com]`, `networks: [...]` or `catalogue: <id>`",
            );
        }
        let Some(id) = id else { continue };
        if let Some(first) = endpoint_ids.get(&id) {
            ctx.err(
                node.pos,
                format!(
                    "duplicate endpoint id `{id}` (first at line {})",
                    first.line
                ),
                "give every endpoint its own id",
            );
            continue;
        }
        let Some(index) = next_index(ctx, map.endpoints.len(), node.pos, "endpoints") else {
            continue;
        };
        endpoint_ids.insert(id.clone(), node.pos);
        map.endpoints.push(Endpoint {
            id,
            index,
            provider,
            sni,
            networks: nets,
            catalogue: cat_id,
            source,
            pos: node.pos,
        });
    }
    if let Some(cat) = &catalogue {
        let mut wanted: Vec<(String, Pos)> = Vec::new();
        for (id, pos) in &include {
            if id == "all" {
                wanted.extend(cat.entries.iter().map(|e| (e.id.clone(), *pos)));
            } else if cat.get(id).is_some() {
                wanted.push((id.clone(), *pos));
            } else {
                unknown_catalogue_id(ctx, cat, id, *pos);
            }
        }
        for (id, pos) in wanted {
            // The map's own endpoint of the same id replaces the catalogue's.
            if endpoint_ids.contains_key(&id) {
                continue;
            }
            let Some(entry) = cat.get(&id) else { continue };
            let Some(index) = next_index(ctx, map.endpoints.len(), pos, "endpoints") else {
                break;
            };
            endpoint_ids.insert(id.clone(), pos);
            map.endpoints.push(Endpoint {
                id,
                index,
                provider: Some(entry.provider.clone()),
                sni: entry.sni.clone(),
                networks: entry.networks.clone(),
                catalogue: Some(entry.id.clone()),
                source: Some(entry.source.clone()),
                pos,
            });
        }
        map.catalogue.include = include.into_iter().map(|(id, _)| id).collect();
    }
    check_duplicate_patterns(ctx, &map.endpoints);

    // Conduits.
    let mut conduit_ids: HashMap<String, Pos> = HashMap::new();
    let conduit_nodes = top
        .get("conduits")
        .and_then(|n| ctx.seq(n, "conduits"))
        .unwrap_or(&[]);
    for (i, node) in conduit_nodes.iter().enumerate() {
        let what = format!("conduits[{i}]");
        let Some(f) = ctx.fields(node, &what, CONDUIT_KEYS) else {
            continue;
        };
        let id = f
            .required(ctx, "id", "a conduit")
            .and_then(|n| check_id(ctx, n, &format!("{what}.id")));
        let from = f.required(ctx, "from", "a conduit").and_then(|n| {
            let s = ctx.nonempty_str(n, &format!("{what}.from"))?;
            match zone_ids.get(&s) {
                Some((idx, _)) => Some((s, *idx)),
                None => {
                    let known: Vec<&str> = map.zones.iter().map(|z| z.id.as_str()).collect();
                    ctx.err(
                        n.pos,
                        format!("unknown zone `{s}` in `from`"),
                        format!("use one of the zone ids: {}", list_or_none(&known)),
                    );
                    None
                }
            }
        });
        let to = f.required(ctx, "to", "a conduit").and_then(|n| {
            let s = ctx.nonempty_str(n, &format!("{what}.to"))?;
            match map.endpoints.iter().find(|e| e.id == s) {
                Some(e) => Some((s, e.index)),
                None => {
                    let known: Vec<&str> = map.endpoints.iter().map(|e| e.id.as_str()).collect();
                    let hint = if catalogue.as_ref().and_then(|c| c.get(&s)).is_some()
                        || (catalogue.is_none()
                            && Catalogue::embedded().is_ok_and(|c| c.get(&s).is_some()))
                    {
                        format!(
                            "`{s}` is in the catalogue: add it to `catalogue: {{include: [{s}]}}`"
                        )
                    } else {
                        format!("use one of the endpoint ids: {}", list_or_none(&known))
                    };
                    ctx.err(n.pos, format!("unknown endpoint `{s}` in `to`"), hint);
                    None
                }
            }
        });
        let ports = f
            .get("ports")
            .map(|n| ports(ctx, n, &format!("{what}.ports")))
            .unwrap_or_default();
        let mut protocols = Vec::new();
        if let Some(items) = f
            .get("protocols")
            .and_then(|n| ctx.seq(n, &format!("{what}.protocols")))
        {
            for item in items {
                match scalar(item).map(str::to_ascii_lowercase).as_deref() {
                    Some("tls") => protocols.push(AppProto::Tls),
                    Some("quic") => protocols.push(AppProto::Quic),
                    _ => ctx.err(
                        item.pos,
                        format!("unknown protocol {}", describe(item)),
                        "use `tls` and/or `quic`",
                    ),
                }
            }
        }
        let action = match f.get("action") {
            None => Some(Action::Allow),
            Some(n) => match scalar(n) {
                Some("allow") => Some(Action::Allow),
                Some("alert") => Some(Action::Alert),
                Some("block") => Some(Action::Block),
                _ => {
                    ctx.err(
                        n.pos,
                        format!(
                            "`action` must be allow, alert or block, found {}",
                            describe(n)
                        ),
                        "write `action: allow` for an authorized conduit",
                    );
                    None
                }
            },
        };
        let purpose = f
            .get("purpose")
            .and_then(|n| ctx.str(n, &format!("{what}.purpose")));
        let owner = f
            .get("owner")
            .and_then(|n| ctx.str(n, &format!("{what}.owner")));
        let (Some(id), Some((from, from_index)), Some((to, to_index)), Some(action)) =
            (id, from, to, action)
        else {
            continue;
        };
        if let Some(first) = conduit_ids.get(&id) {
            ctx.err(
                node.pos,
                format!("duplicate conduit id `{id}` (first at line {})", first.line),
                "give every conduit its own id",
            );
            continue;
        }
        let Some(index) = next_index(ctx, map.conduits.len(), node.pos, "conduits") else {
            continue;
        };
        conduit_ids.insert(id.clone(), node.pos);
        map.conduits.push(Conduit {
            id,
            index,
            from,
            from_index,
            to,
            to_index,
            ports,
            protocols,
            action,
            purpose,
            owner,
            pos: node.pos,
        });
    }
}

pub(crate) fn list_or_none(ids: &[&str]) -> String {
    if ids.is_empty() {
        "(none defined)".to_owned()
    } else {
        ids.join(", ")
    }
}

fn unknown_catalogue_id(ctx: &mut Ctx, cat: &Catalogue, id: &str, pos: Pos) {
    let ids: Vec<&str> = cat.entries.iter().map(|e| e.id.as_str()).collect();
    let best = yaml::suggest(id, &ids);
    let mut close: Vec<&str> = best.into_iter().collect();
    close.extend(
        ids.iter()
            .filter(|c| Some(**c) != best && (c.contains(id) || id.contains(**c)))
            .take(4),
    );
    let fix = if close.is_empty() {
        format!(
            "use an id from the catalogue {} ({} entries)",
            cat.file,
            cat.entries.len()
        )
    } else {
        format!("did you mean {}?", close.join(" or "))
    };
    ctx.err(pos, format!("unknown catalogue id `{id}`"), fix);
}

fn next_index(ctx: &mut Ctx, len: usize, pos: Pos, what: &str) -> Option<u16> {
    match u16::try_from(len + 1) {
        Ok(i) => Some(i),
        Err(_) => {
            ctx.err(
                pos,
                format!("too many {what} (at most 65535)"),
                "split the map by site",
            );
            None
        }
    }
}

pub(crate) fn scalar(node: &Node) -> Option<&str> {
    match &node.value {
        Value::Scalar { text, .. } => Some(text.trim()),
        _ => None,
    }
}

/// Ids: letters, digits, `.`, `_`, `-`, so they are safe in logs and JSON keys.
pub(crate) fn check_id(ctx: &mut Ctx, node: &Node, what: &str) -> Option<String> {
    let id = ctx.nonempty_str(node, what)?;
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        ctx.err(
            node.pos,
            format!("`{what}` `{id}` contains `{c}`"),
            "ids use letters, digits, `-`, `_` and `.`",
        );
        return None;
    }
    Some(id)
}

pub(crate) fn sni_list(ctx: &mut Ctx, node: &Node, what: &str) -> Vec<SniPattern> {
    let Some(items) = ctx.seq(node, what) else {
        return Vec::new();
    };
    let mut out: Vec<SniPattern> = Vec::new();
    for item in items {
        let Some(s) = ctx.str(item, &format!("{what}[]")) else {
            continue;
        };
        match SniPattern::parse(&s) {
            Ok(p) => {
                if !out.contains(&p) {
                    out.push(p);
                }
            }
            Err(e) => ctx.err(item.pos, format!("invalid SNI pattern `{s}`: {e}"), e.fix()),
        }
    }
    out
}

pub(crate) fn networks(ctx: &mut Ctx, node: &Node, what: &str) -> Vec<IpNet> {
    networks_with_pos(ctx, node, what).0
}

fn networks_with_pos(ctx: &mut Ctx, node: &Node, what: &str) -> (Vec<IpNet>, Vec<Pos>) {
    let Some(items) = ctx.seq(node, what) else {
        return Default::default();
    };
    let mut nets = Vec::new();
    let mut positions = Vec::new();
    for item in items {
        let Some(s) = ctx.str(item, &format!("{what}[]")) else {
            continue;
        };
        if let Some(net) = parse_cidr(ctx, &s, item.pos) {
            nets.push(net);
            positions.push(item.pos);
        }
    }
    (nets, positions)
}

/// A CIDR; a bare address is a host route (/32, /128).
fn parse_cidr(ctx: &mut Ctx, s: &str, pos: Pos) -> Option<IpNet> {
    let s = s.trim();
    let net = match IpNet::from_str(s) {
        Ok(n) => n,
        Err(_) => match std::net::IpAddr::from_str(s) {
            Ok(a) => IpNet::from(a),
            Err(_) => {
                ctx.err(
                    pos,
                    format!("invalid CIDR `{s}`"),
                    "write an IPv4 or IPv6 network such as 10.10.1.0/24 or \"fd00:10:1::/64\" (quote IPv6)",
                );
                return None;
            }
        },
    };
    if net.trunc() != net {
        ctx.err(
            pos,
            format!(
                "CIDR `{s}` has host bits set (the network is {})",
                net.trunc()
            ),
            format!(
                "write {} or the host as /{}",
                net.trunc(),
                net.max_prefix_len()
            ),
        );
        return None;
    }
    Some(net)
}

fn ports(ctx: &mut Ctx, node: &Node, what: &str) -> Vec<PortRange> {
    let Some(items) = ctx.seq(node, what) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for item in items {
        let parsed = scalar(item).and_then(|s| {
            let (a, b) = s.split_once('-').unwrap_or((s, s));
            let first = a.trim().parse::<u16>().ok()?;
            let last = b.trim().parse::<u16>().ok()?;
            (first >= 1 && first <= last).then_some(PortRange { first, last })
        });
        match parsed {
            Some(r) => out.push(r),
            None => ctx.err(
                item.pos,
                format!("invalid port {}", describe(item)),
                "ports are 1-65535, or a range written as a string such as \"8000-8100\"",
            ),
        }
    }
    out
}

/// Two zones must not claim the same address for the same VLANs: the kernel
/// would pick one of them silently. Two prefixes overlap only when one contains the
/// other, so one sweep over the sorted networks with a stack of the enclosing ones
/// finds every pair (n log n; comparing every zone with every other one made
/// 20k zones take seconds).
fn check_zone_overlaps(ctx: &mut Ctx, zones: &[Zone], net_pos: &[Vec<Pos>]) {
    // (network, zone index, index in the zone's networks), containers first.
    let mut nets: Vec<(IpNet, usize, usize)> = zones
        .iter()
        .enumerate()
        .flat_map(|(z, zone)| {
            zone.networks
                .iter()
                .enumerate()
                .map(move |(k, n)| (n.trunc(), z, k))
        })
        .collect();
    nets.sort_unstable();
    // (later zone, its network, earlier zone) -> the earlier zone's first overlapping network.
    let mut found: BTreeMap<(usize, usize, usize), usize> = BTreeMap::new();
    let mut stack: Vec<(IpNet, usize, usize)> = Vec::new();
    for &(net, z, k) in &nets {
        while stack
            .last()
            .is_some_and(|(outer, ..)| !outer.contains(&net))
        {
            stack.pop();
        }
        for &(_, oz, ok) in &stack {
            if oz == z {
                continue;
            }
            let (a, b) = (&zones[oz.min(z)], &zones[oz.max(z)]);
            let vlans_meet = a.vlans.is_empty()
                || b.vlans.is_empty()
                || a.vlans.iter().any(|v| b.vlans.contains(v));
            if !vlans_meet {
                continue;
            }
            let (key, na) = if oz < z {
                ((z, k, oz), ok)
            } else {
                ((oz, ok, z), k)
            };
            found
                .entry(key)
                .and_modify(|v| *v = (*v).min(na))
                .or_insert(na);
        }
        stack.push((net, z, k));
    }
    for ((j, k, ai), na) in found {
        let (a, b) = (&zones[ai], &zones[j]);
        let (na, nb) = (a.networks[na], b.networks[k]);
        let pos = net_pos
            .get(j)
            .and_then(|p| p.get(k))
            .copied()
            .unwrap_or(b.pos);
        ctx.err(
            pos,
            format!(
                "network {nb} of zone `{}` overlaps {na} of zone `{}` (line {})",
                b.id, a.id, a.pos.line
            ),
            "a source address must belong to one zone: split the networks, or give the zones different `vlans`",
        );
    }
}

/// One SNI pattern (or one CIDR) in two endpoints is ambiguous: the kernel's
/// SNI map and LPM trie hold one endpoint per key.
fn check_duplicate_patterns(ctx: &mut Ctx, endpoints: &[Endpoint]) {
    let mut seen: HashMap<String, &str> = HashMap::new();
    let mut keys: HashMap<KernelSniKey, &str> = HashMap::new();
    let mut nets: HashMap<IpNet, &str> = HashMap::new();
    for e in endpoints {
        for p in &e.sni {
            if let Some(first) = seen.get(p.as_str()) {
                ctx.err(
                    e.pos,
                    format!(
                        "SNI pattern `{p}` of endpoint `{}` is already used by endpoint `{first}`",
                        e.id
                    ),
                    "keep each name in one endpoint (an endpoint with `catalogue:` already has the catalogue's names)",
                );
                continue;
            }
            seen.insert(p.as_str().to_owned(), &e.id);
            // Distinct names whose 64-bit hashes collide cannot both be in the kernel map.
            if let Some(key) = p.kernel_key()
                && let Some(other) = keys.insert(key, p.as_str())
                && other != p.as_str()
            {
                ctx.err(
                    e.pos,
                    format!("SNI pattern `{p}` has the same kernel hash as `{other}`"),
                    "report this; as a workaround write one of them as an inner-`*` pattern",
                );
            }
        }
        for n in &e.networks {
            match nets.get(n) {
                Some(first) if *first != e.id => ctx.err(
                    e.pos,
                    format!(
                        "network {n} of endpoint `{}` is already used by endpoint `{first}`",
                        e.id
                    ),
                    "keep each network in one endpoint",
                ),
                _ => {
                    nets.insert(*n, &e.id);
                }
            }
        }
    }
}

/// Views of the map in the shapes the kernel maps take.
impl ConduitMap {
    /// Exact and `*.suffix` SNI keys with their endpoint index.
    pub fn kernel_sni_entries(&self) -> Vec<(KernelSniKey, u16)> {
        self.endpoints
            .iter()
            .flat_map(|e| {
                e.sni
                    .iter()
                    .filter_map(|p| Some((p.kernel_key()?, e.index)))
            })
            .collect()
    }

    /// Inner-`*` patterns, which only the agent can match; when there are
    /// any, flows with an SNI the kernel did not recognise go to userspace.
    pub fn userspace_sni_patterns(&self) -> Vec<(&SniPattern, u16)> {
        self.endpoints
            .iter()
            .flat_map(|e| {
                e.sni
                    .iter()
                    .filter(|p| p.kernel_key().is_none())
                    .map(|p| (p, e.index))
            })
            .collect()
    }

    /// Zone LPM entries: network, zone index, VLANs (empty = any).
    pub fn zone_networks(&self) -> Vec<(IpNet, u16, &[u16])> {
        self.zones
            .iter()
            .flat_map(|z| z.networks.iter().map(|n| (*n, z.index, z.vlans.as_slice())))
            .collect()
    }

    /// Endpoint LPM entries: network, endpoint index.
    pub fn endpoint_networks(&self) -> Vec<(IpNet, u16)> {
        self.endpoints
            .iter()
            .flat_map(|e| e.networks.iter().map(|n| (*n, e.index)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ConduitMap, ConfigError> {
        ConduitMap::from_bytes("m.yaml", text.as_bytes(), None, None)
    }

    #[test]
    fn minimal_map() {
        let m = parse(
            "version: 1\nsite: s\nzones:\n  - id: z\n    networks: [10.0.0.0/8]\n\
             endpoints:\n  - id: e\n    sni: [a.example.com]\nconduits:\n  - id: c\n    from: z\n    to: e\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(m.zones[0].index, 1);
        assert_eq!(m.conduits[0].to_index, 1);
        assert_eq!(m.conduits[0].action, Action::Allow);
        assert_eq!(m.policy_hash().len(), 32);
    }

    #[test]
    fn collects_all_errors() {
        let err = parse(
            "version: 2\nsite: s\nzones:\n  - id: z\n    networks: [10.0.0.1/8]\n    colour: red\n\
             conduits:\n  - id: c\n    from: nope\n    to: e\n    ports: [0]\n",
        )
        .expect_err("broken");
        let text = err.to_string();
        assert_eq!(err.diagnostics.len(), 6, "{text}");
        assert!(text.contains("m.yaml:1:10: unsupported version"), "{text}");
        assert!(
            text.contains(
                "m.yaml:5:16: CIDR `10.0.0.1/8` has host bits set (the network is 10.0.0.0/8)"
            ),
            "{text}"
        );
    }

    #[test]
    fn catalogue_include_and_reference() {
        let m = parse(
            "version: 1\nsite: s\ncatalogue:\n  include: [anthropic]\nzones: []\n\
             endpoints:\n  - id: oai\n    catalogue: openai\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(m.endpoints.len(), 2);
        assert_eq!(m.endpoints[0].id, "oai");
        assert!(
            m.endpoints[0]
                .sni
                .iter()
                .any(|p| p.matches("api.openai.com"))
        );
        assert_eq!(m.endpoints[1].id, "anthropic");
        assert_eq!(m.endpoints[1].index, 2);
        assert!(m.catalogue_version.is_some());
    }

    #[test]
    fn ambiguous_endpoints_are_rejected() {
        let err = parse(
            "version: 1\nsite: s\nendpoints:\n  - id: a\n    sni: [x.example.com]\n    networks: [192.0.2.0/24]\n\
             \x20 - id: b\n    sni: [X.Example.com.]\n    networks: [192.0.2.0/24]\n",
        )
        .expect_err("ambiguous");
        let text = err.to_string();
        assert!(text.contains("m.yaml:7:5: SNI pattern `x.example.com` of endpoint `b` is already used by endpoint `a`"), "{text}");
        assert!(
            text.contains(
                "m.yaml:7:5: network 192.0.2.0/24 of endpoint `b` is already used by endpoint `a`"
            ),
            "{text}"
        );
    }

    /// Issue 10, failure 15: the zone-overlap check was quadratic. 60k zones (the
    /// kernel tables index at most 65535) decode; overlaps are still found.
    #[test]
    fn many_zones_decode_and_overlaps_are_found() {
        let mut text = String::from("version: 1\nsite: big\nzones:\n");
        for i in 0..60_000u32 {
            let (a, b) = (i / 256, i % 256);
            text.push_str(&format!(
                "  - {{id: z{i}, networks: [10.{a}.{b}.0/24, \"fd00:{i:x}::/64\"]}}\n"
            ));
        }
        let map = parse(&text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(map.zones.len(), 60_000);
        // A zone inside another one, and one equal to it, are reported at their line.
        text.push_str("  - {id: inner, networks: [10.3.4.128/25]}\n");
        text.push_str("  - {id: same, networks: [10.3.4.0/24]}\n");
        let err = parse(&text)
            .err()
            .unwrap_or_else(|| panic!("overlaps accepted"));
        let msgs: Vec<String> = err.diagnostics.iter().map(|d| d.to_string()).collect();
        assert_eq!(msgs.len(), 3, "{msgs:#?}");
        assert!(
            msgs[0].contains("10.3.4.128/25 of zone `inner` overlaps 10.3.4.0/24 of zone `z772`"),
            "{msgs:#?}"
        );
        assert!(
            msgs[1].contains("zone `same` overlaps 10.3.4.0/24 of zone `z772`"),
            "{msgs:#?}"
        );
        assert!(
            msgs[2].contains("zone `same` overlaps 10.3.4.128/25 of zone `inner`"),
            "{msgs:#?}"
        );
    }

    #[test]
    fn kernel_views() {
        let m = parse(
            "version: 1\nsite: s\nzones:\n  - id: z\n    networks: [10.0.0.0/8, \"fd00::/8\"]\n    vlans: [7]\n\
             endpoints:\n  - id: e\n    sni: [a.example.com, \"*.example.org\", \"b.*.example.net\"]\n    networks: [192.0.2.0/24]\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(m.kernel_sni_entries().len(), 2);
        assert_eq!(m.userspace_sni_patterns().len(), 1);
        assert_eq!(m.zone_networks().len(), 2);
        assert_eq!(m.zone_networks()[0].2, &[7]);
        assert_eq!(m.endpoint_networks().len(), 1);
    }

    #[test]
    fn empty_and_non_mapping_files() {
        let err = parse("").expect_err("empty");
        assert!(
            err.to_string()
                .starts_with("m.yaml:1:1: the conduit map is empty")
        );
        let err = parse("- a\n").expect_err("list");
        assert!(err.to_string().contains("must be a mapping"), "{err}");
    }
}
