//! Configuration: sensor.yaml (operations) and conduits.yaml (network team).
//!
//! Both files are parsed into a positioned YAML tree ([`yaml`]) and decoded by
//! hand, so that every problem (syntax, unknown key, wrong type, bad reference,
//! bad CIDR, ...) is reported as `FILE:LINE:COLUMN: message — how to fix`, and
//! all problems of a file are reported at once, not only the first.

pub mod assets;
pub mod catalogue;
pub mod conduits;
pub mod pattern;
pub mod policy;
pub mod schema;
pub mod sensor;
pub mod yaml;

use std::fmt;

pub use assets::{Asset, Assets};
pub use catalogue::{Catalogue, CatalogueEntry, EMBEDDED_CATALOGUE};
pub use conduits::{
    Action, AppProto, CatalogueRef, Conduit, ConduitMap, DefaultAction, Endpoint, PortRange, Zone,
};
pub use pattern::{KernelSniKey, PatternError, SniPattern};
pub use policy::{Attribution, Classification, ConduitRef, EndpointRef, Names, Verdict, ZoneRef};
pub use sensor::{Capacity, SensorConfig};

/// One problem found in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// File name as given by the caller (or `environment` for env overrides).
    pub file: String,
    /// 1-based line; 0 when the problem has no position (missing file, env).
    pub line: usize,
    /// 1-based column; 0 when the problem has no position.
    pub column: usize,
    /// `what is wrong — how to fix it`.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file, self.line, self.column, self.message
            )
        }
    }
}

/// All problems found in one load. The CLI exits 64 on it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub diagnostics: Vec<Diagnostic>,
}

impl ConfigError {
    /// Exit code for configuration errors (EX_USAGE).
    pub const EXIT_CODE: i32 = 64;

    pub(crate) fn single(file: &str, message: impl Into<String>) -> Self {
        ConfigError {
            diagnostics: vec![Diagnostic {
                file: file.to_owned(),
                line: 0,
                column: 0,
                message: message.into(),
            }],
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.diagnostics.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

/// Reads a file, turning an I/O error into a one-line diagnostic.
pub(crate) fn read_file(path: &std::path::Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| {
        ConfigError::single(
            &path.display().to_string(),
            format!("cannot read the file: {e} — check the path and its permissions"),
        )
    })
}
