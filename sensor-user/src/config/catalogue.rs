//! The shipped catalogue of well-known AI API endpoints
//! (`deploy/catalogue/ai-endpoints.yaml`), which a conduit map can include by id.

use std::path::{Path, PathBuf};

use ipnet::IpNet;

use super::conduits::{check_id, networks, sni_list};
use super::pattern::SniPattern;
use super::yaml::{self, Ctx, Pos};
use super::{ConfigError, read_file};

/// The catalogue compiled into the binary, used when no file is found, so a
/// conduit map works on a gateway without the repository.
pub const EMBEDDED_CATALOGUE: &str = include_str!("../../../deploy/catalogue/ai-endpoints.yaml");

/// How the built-in copy is named in messages.
pub const EMBEDDED_NAME: &str = "built-in deploy/catalogue/ai-endpoints.yaml";

/// File name looked for next to the map and in a catalogue directory.
pub const CATALOGUE_FILE: &str = "ai-endpoints.yaml";

#[derive(Debug, Clone, PartialEq)]
pub struct CatalogueEntry {
    pub id: String,
    pub provider: String,
    pub sni: Vec<SniPattern>,
    pub networks: Vec<IpNet>,
    /// Public documentation that names the API host.
    pub source: String,
    pub pos: Pos,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Catalogue {
    pub version: String,
    pub entries: Vec<CatalogueEntry>,
    /// Where it came from (a path, or `<embedded>`).
    pub file: String,
    /// blake3 of the catalogue bytes.
    pub hash: [u8; 32],
}

const TOP_KEYS: &[&str] = &["catalogue_version", "endpoints"];
const ENTRY_KEYS: &[&str] = &["id", "provider", "sni", "networks", "source", "notes"];

impl Catalogue {
    pub fn parse(file: &str, text: &str) -> Result<Catalogue, ConfigError> {
        let root = yaml::parse(file, text)?;
        let mut ctx = Ctx::new(file);
        let mut cat = Catalogue {
            version: String::new(),
            entries: Vec::new(),
            file: file.to_owned(),
            hash: *blake3::hash(text.as_bytes()).as_bytes(),
        };
        let Some(top) = ctx.fields(&root, "catalogue", TOP_KEYS) else {
            return ctx.into_result(cat);
        };
        if let Some(v) = top.required(&mut ctx, "catalogue_version", "the catalogue") {
            cat.version = ctx.nonempty_str(v, "catalogue_version").unwrap_or_default();
        }
        let items = top
            .required(&mut ctx, "endpoints", "the catalogue")
            .and_then(|n| ctx.seq(n, "endpoints"))
            .unwrap_or(&[]);
        for (i, item) in items.iter().enumerate() {
            let what = format!("endpoints[{i}]");
            let Some(f) = ctx.fields(item, &what, ENTRY_KEYS) else {
                continue;
            };
            let id = f
                .required(&mut ctx, "id", "a catalogue entry")
                .and_then(|n| check_id(&mut ctx, n, &format!("{what}.id")));
            let provider = f
                .required(&mut ctx, "provider", "a catalogue entry")
                .and_then(|n| ctx.nonempty_str(n, &format!("{what}.provider")));
            let source = f
                .required(&mut ctx, "source", "a catalogue entry")
                .and_then(|n| ctx.nonempty_str(n, &format!("{what}.source")));
            if let (Some(src), Some(n)) = (&source, f.get("source"))
                && !src.starts_with("https://")
            {
                ctx.err(
                    n.pos,
                    format!("`{what}.source` must be an https:// URL"),
                    "link the provider's API documentation page",
                );
            }
            let sni = f
                .get("sni")
                .map(|n| sni_list(&mut ctx, n, &format!("{what}.sni")))
                .unwrap_or_default();
            let nets = f
                .get("networks")
                .map(|n| networks(&mut ctx, n, &format!("{what}.networks")))
                .unwrap_or_default();
            if sni.is_empty() && nets.is_empty() {
                ctx.err(
                    item.pos,
                    format!("catalogue entry {what} has neither `sni` nor `networks`"),
                    "add the API host names under `sni:`",
                );
            }
            if let Some(id) = id {
                if let Some(prev) = cat.entries.iter().find(|e| e.id == id) {
                    ctx.err(
                        item.pos,
                        format!(
                            "duplicate catalogue id `{id}` (first at line {})",
                            prev.pos.line
                        ),
                        "give every entry its own id",
                    );
                    continue;
                }
                cat.entries.push(CatalogueEntry {
                    id,
                    provider: provider.unwrap_or_default(),
                    sni,
                    networks: nets,
                    source: source.unwrap_or_default(),
                    pos: item.pos,
                });
            }
        }
        ctx.into_result(cat)
    }

    pub fn load(path: &Path) -> Result<Catalogue, ConfigError> {
        let bytes = read_file(path)?;
        let name = path.display().to_string();
        let text = String::from_utf8(bytes)
            .map_err(|_| ConfigError::single(&name, "the file is not UTF-8 — save it as UTF-8"))?;
        Catalogue::parse(&name, &text)
    }

    /// The catalogue compiled into the binary.
    pub fn embedded() -> Result<Catalogue, ConfigError> {
        Catalogue::parse(EMBEDDED_NAME, EMBEDDED_CATALOGUE)
    }

    pub fn get(&self, id: &str) -> Option<&CatalogueEntry> {
        self.entries.iter().find(|e| e.id == id)
    }

    /// Where to look, in order, when the map names no catalogue path:
    /// `catalogue_dir` (a directory or the file), next to the map, then
    /// `deploy/catalogue/` under the working directory. `None` = embedded.
    pub fn locate(catalogue_dir: Option<&Path>, map_dir: Option<&Path>) -> Option<PathBuf> {
        let mut candidates: Vec<PathBuf> = Vec::new();
        if let Some(dir) = catalogue_dir {
            if dir.is_file() {
                return Some(dir.to_path_buf());
            }
            candidates.push(dir.join(CATALOGUE_FILE));
        }
        if let Some(dir) = map_dir {
            candidates.push(dir.join(CATALOGUE_FILE));
        }
        candidates.push(Path::new("deploy/catalogue").join(CATALOGUE_FILE));
        candidates.into_iter().find(|p| p.is_file())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_catalogue_is_valid() {
        let cat = Catalogue::embedded().unwrap_or_else(|e| panic!("{e}"));
        assert!(cat.entries.len() >= 25, "{} entries", cat.entries.len());
        assert!(!cat.version.is_empty());
        for id in [
            "openai",
            "azure-openai",
            "anthropic",
            "google-gemini",
            "google-vertex-ai",
            "aws-bedrock",
            "github-copilot",
            "ibm-watsonx",
            "nvidia-nim",
        ] {
            assert!(cat.get(id).is_some(), "missing {id}");
        }
        let bedrock = cat.get("aws-bedrock").map(|e| &e.sni);
        assert!(bedrock.is_some_and(|s| {
            s.iter()
                .any(|p| p.matches("bedrock-runtime.eu-central-1.amazonaws.com"))
        }));
        // No two entries claim the same pattern.
        let mut seen = std::collections::HashSet::new();
        for e in &cat.entries {
            for p in &e.sni {
                assert!(seen.insert(p.as_str().to_owned()), "{} twice", p);
            }
        }
    }
}
