//! The nats-server the JetStream tests and the collector benchmark run: Debian's
//! package at one exact version, fetched through the VM harness's private apt
//! (signed by the Debian keyring; the system's sources are left alone) and reduced
//! to its binary in `target/tools/nats-server/`.
//!
//! Why not bookworm's package: 2.9.10 has no `sync_interval: always` (acknowledged
//! records can be lost on a cluster-wide power loss), and a stream leader elected
//! after a node loss may not know recent message ids before 2.11 (nats-server PRs
//! 6415, 6485, 6486), so a SIEM export could repeat a record. trixie's 2.10.27 has
//! the first and not the second. Debian's 2.15.1-1 (forky, sid) has both; its
//! binary needs only libc6 >= 2.34 (bookworm has 2.36).
//!
//! The version is pinned ([`VERSION`]) and looked up in each of [`SUITES`]: a
//! testing suite moves on, and then this pin is what changes, on purpose. As with
//! the VM kernels, it is fetched once and recorded in `nats-server.txt`; later runs
//! use the cache and never ask the mirror again. The tests find the binary through
//! [`ENV`] (set on every cargo command xtask runs), or at the same path relative to
//! their own executable (`collector/tests/common/nats_cluster.rs`, `nats_server()`).

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::vm::{
    Cache,
    fetch::{Apt, checked},
    target_dir,
};

/// Debian's package version used, exactly.
pub const VERSION: &str = "2.15.1-1";
/// The suites that carry [`VERSION`], asked in order.
pub const SUITES: [&str; 2] = ["forky", "sid"];
/// The variable that tells tests and benchmarks where the binary is.
pub const ENV: &str = "CONDUIT_NATS_SERVER";
/// Under the target directory: the binary and its record.
const DIR: &str = "tools/nats-server";
const RECORD: &str = "nats-server.txt";

/// The cached nats-server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsServer {
    /// The suite it came from.
    pub suite: String,
    /// Debian's version of the package, e.g. `2.15.1-1`.
    pub package_version: String,
    /// What the binary says (`nats-server --version`), e.g. `v2.10.27`.
    pub upstream: String,
    pub binary: PathBuf,
}

impl NatsServer {
    fn record(&self) -> String {
        format!(
            "package=nats-server\nsuite={}\nversion={}\nupstream={}\n",
            self.suite, self.package_version, self.upstream
        )
    }

    fn parse_record(dir: &Path, text: &str) -> Option<Self> {
        let field = |key: &str| {
            text.lines()
                .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
                .map(str::to_owned)
        };
        Some(Self {
            suite: field("suite")?,
            package_version: field("version")?,
            upstream: field("upstream")?,
            binary: dir.join("nats-server"),
        })
    }
}

fn dir() -> Result<PathBuf> {
    Ok(target_dir()?.join(DIR))
}

/// The cached binary, if there is one (no network).
pub fn cached() -> Option<NatsServer> {
    let dir = dir().ok()?;
    let text = fs::read_to_string(dir.join(RECORD)).ok()?;
    // A cache of another version (an older pin) is fetched again.
    NatsServer::parse_record(&dir, &text)
        .filter(|n| n.binary.is_file() && n.package_version == VERSION)
}

/// The cached binary, downloaded and checked on first use.
pub fn ensure() -> Result<NatsServer> {
    if let Some(n) = cached() {
        return Ok(n);
    }
    let cache = Cache::new()?;
    let _lock = cache.lock("nats-server")?;
    // Another run may have filled it while this one waited.
    if let Some(n) = cached() {
        return Ok(n);
    }
    download(&cache)
}

fn download(cache: &Cache) -> Result<NatsServer> {
    let dir = dir()?;
    let mut offered = Vec::new();
    let mut found = None;
    for suite in SUITES {
        let apt = Apt::new(cache, suite)?;
        println!(
            "    first use: fetching {suite}'s package index into {}",
            apt.dir.display()
        );
        apt.update()?;
        let show = apt.show("nats-server")?;
        let version = field(&show, "Version").context("apt-cache show nats-server: no Version")?;
        if version == VERSION {
            found = Some((suite, apt));
            break;
        }
        offered.push(format!("{suite} has {version}"));
    }
    let Some((suite, apt)) = found else {
        bail!(
            "Debian's nats-server {VERSION} is in none of {SUITES:?} any more ({}): \
             pin the version they carry now in xtask/src/nats.rs (2.11 or later)",
            offered.join(", ")
        );
    };
    let version = VERSION.to_owned();
    let upstream = upstream_version(&version).context("VERSION is a Debian version")?;
    println!("    downloading nats-server {version} from {suite}");
    let tmp = dir.with_extension("tmp");
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp)?;
    let deb = apt.download("nats-server", &version, &tmp)?;
    let extracted = tmp.join("x");
    checked(
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&extracted),
        "dpkg-deb -x",
    )?;
    let found = ["usr/bin/nats-server", "usr/sbin/nats-server"]
        .iter()
        .map(|p| extracted.join(p))
        .find(|p| p.is_file())
        .context("the package has no usr/bin/nats-server")?;
    let staged = tmp.join("nats-server");
    fs::create_dir_all(&staged)?;
    let binary = staged.join("nats-server");
    fs::rename(&found, &binary)?;
    fs::set_permissions(&binary, fs::Permissions::from_mode(0o755))?;
    // The binary must run here (glibc) and be the version the package claims.
    let said = checked(
        Command::new(&binary).arg("--version"),
        "nats-server --version",
    )?;
    let said = said
        .trim()
        .trim_start_matches("nats-server:")
        .trim()
        .to_owned();
    if upstream_version(said.trim_start_matches('v')) != Some(upstream) {
        bail!("the package {version} holds a nats-server that says {said:?}");
    }
    let server = NatsServer {
        suite: suite.to_owned(),
        package_version: version,
        upstream: said,
        binary: dir.join("nats-server"),
    };
    fs::write(staged.join(RECORD), server.record())?;
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.parent().unwrap_or(Path::new(".")))?;
    fs::rename(&staged, &dir)?;
    let _ = fs::remove_dir_all(&tmp);
    Ok(server)
}

/// `Field: value` of the first paragraph of `apt-cache show` output.
fn field(show: &str, name: &str) -> Option<String> {
    show.lines()
        .take_while(|l| !l.is_empty())
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(|v| v.trim().to_owned())
}

/// The upstream release in a Debian version: `2.10.27-1+b2` is 2.10.27.
fn upstream_version(debian: &str) -> Option<(u32, u32, u32)> {
    let no_epoch = debian.split_once(':').map_or(debian, |(_, v)| v);
    let upstream = no_epoch.split(['-', '+', '~']).next()?;
    let mut parts = upstream.split('.').map(|p| p.parse::<u32>().ok());
    let v = (
        parts.next()??,
        parts.next()??,
        parts.next().flatten().unwrap_or(0),
    );
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debian_versions() {
        assert_eq!(upstream_version("2.10.27-1+b2"), Some((2, 10, 27)));
        assert_eq!(upstream_version("2.9.10-1"), Some((2, 9, 10)));
        assert_eq!(upstream_version("1:2.11.0~rc1-1"), Some((2, 11, 0)));
        assert_eq!(upstream_version("2.10"), Some((2, 10, 0)));
        assert_eq!(upstream_version("v2"), None);
        // The pin has the fixes named in the module's comment.
        assert!(upstream_version(VERSION).expect("parses") >= (2, 11, 0));
    }

    #[test]
    fn show_fields() {
        let show = "Package: nats-server\nVersion: 2.10.27-1+b2\nDepends: libc6 (>= 2.34), adduser\n\n\
                    Package: nats-server\nVersion: 2.9.10-1\n";
        assert_eq!(field(show, "Version").as_deref(), Some("2.10.27-1+b2"));
        assert_eq!(field(show, "Size"), None);
    }

    #[test]
    fn record_round_trip() {
        let n = NatsServer {
            suite: "forky".into(),
            package_version: "2.15.1-1".into(),
            upstream: "v2.15.1".into(),
            binary: PathBuf::from("/t/tools/nats-server/nats-server"),
        };
        let back = NatsServer::parse_record(Path::new("/t/tools/nats-server"), &n.record())
            .expect("parses");
        assert_eq!(back, n);
    }
}
