//! Debian packages through a private apt configuration under `target/vm/apt`
//! (the system's sources are left alone), and the kernel cache under
//! `target/vm/kernels/SERIES`.
//!
//! Each series' kernel is resolved through its suite's `linux-image-amd64`
//! metapackage at first download and the result is recorded in `kernel.txt`; later
//! runs use the cache and never ask the mirror again (exact ABI pins would break when
//! Debian drops old ABIs from the mirror).

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use super::{Cache, Series, note};

const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// A kernel in the cache.
#[derive(Debug, Clone)]
pub struct Kernel {
    pub series: &'static str,
    pub package: String,
    pub version: String,
    /// `uname -r` of the kernel, the name of its modules directory.
    pub release: String,
    /// `target/vm/kernels/SERIES`; holds `vmlinuz` and `lib/modules/RELEASE`.
    pub dir: PathBuf,
}

impl Kernel {
    pub fn vmlinuz(&self) -> PathBuf {
        self.dir.join("vmlinuz")
    }

    /// What qemu boots: the uncompressed `vmlinux` (PVH entry; saves the seconds
    /// the guest spends decompressing itself under TCG), else `vmlinuz`.
    pub fn image(&self) -> PathBuf {
        let vmlinux = self.dir.join("vmlinux");
        if vmlinux.exists() {
            vmlinux
        } else {
            self.vmlinuz()
        }
    }

    pub fn modules(&self) -> PathBuf {
        self.dir.join("lib/modules").join(&self.release)
    }

    fn record(&self) -> String {
        format!(
            "package={}\nversion={}\nrelease={}\n",
            self.package, self.version, self.release
        )
    }

    fn parse_record(series: &'static str, dir: PathBuf, text: &str) -> Option<Self> {
        let field = |key: &str| {
            text.lines()
                .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
                .map(str::to_owned)
        };
        Some(Self {
            series,
            package: field("package")?,
            version: field("version")?,
            release: field("release")?,
            dir,
        })
    }
}

/// The cached kernel of `series`, downloaded on first use.
pub fn kernel(cache: &Cache, series: &'static Series) -> Result<Kernel> {
    if let Some(kernel) = cached(cache, series) {
        return Ok(kernel);
    }
    let _lock = cache.lock(&format!("kernel-{}", series.name))?;
    // Another run may have filled it while this one waited.
    if let Some(kernel) = cached(cache, series) {
        return Ok(kernel);
    }
    download(cache, series)
}

fn cached(cache: &Cache, series: &'static Series) -> Option<Kernel> {
    let dir = cache.dir.join("kernels").join(series.name);
    let text = fs::read_to_string(dir.join("kernel.txt")).ok()?;
    Kernel::parse_record(series.name, dir, &text).filter(|k| k.vmlinuz().exists())
}

fn download(cache: &Cache, series: &'static Series) -> Result<Kernel> {
    let dir = cache.dir.join("kernels").join(series.name);
    let started = Instant::now();
    let apt = Apt::new(cache, series.suite)?;
    note(&format!(
        "first use of kernel {}: fetching {}'s package index into {}",
        series.name,
        series.suite,
        apt.dir.display()
    ));
    apt.update()?;
    let (package, version) = resolve_metapackage(&apt.show("linux-image-amd64")?)
        .with_context(|| format!("resolve linux-image-amd64 in {}", series.suite))?;
    let release = package
        .strip_prefix("linux-image-")
        .with_context(|| format!("unexpected kernel package name {package}"))?
        .to_owned();
    note(&format!(
        "downloading {package} {version} from {} ({})",
        series.suite,
        mirror()
    ));
    let tmp = dir.with_extension("tmp");
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp)?;
    let deb = apt.download(&package, &version, &tmp)?;
    let extracted = tmp.join("x");
    checked(
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&extracted),
        "dpkg-deb -x",
    )?;
    let kernel = Kernel {
        series: series.name,
        package,
        version,
        release,
        dir: dir.clone(),
    };
    let staged = tmp.join("kernel");
    fs::create_dir_all(staged.join("lib/modules"))?;
    fs::rename(
        extracted
            .join("boot")
            .join(format!("vmlinuz-{}", kernel.release)),
        staged.join("vmlinuz"),
    )
    .context("the package has no /boot/vmlinuz-RELEASE")?;
    let config = extracted
        .join("boot")
        .join(format!("config-{}", kernel.release));
    let pvh = fs::read_to_string(&config).is_ok_and(|c| c.lines().any(|l| l == "CONFIG_PVH=y"));
    let _ = fs::rename(&config, staged.join("config"));
    if pvh && let Some(vmlinux) = extract_vmlinux(&fs::read(staged.join("vmlinuz"))?) {
        fs::write(staged.join("vmlinux"), vmlinux)?;
    }
    // Bookworm and older ship /lib/modules, trixie /usr/lib/modules.
    let modules = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|dir| extracted.join(dir).join(&kernel.release))
        .find(|dir| dir.is_dir())
        .context("the package has no modules directory")?;
    fs::rename(&modules, staged.join("lib/modules").join(&kernel.release))?;
    // Debian generates modules.dep in the package's postinst; do it here.
    checked(
        Command::new("depmod")
            .arg("-b")
            .arg(&staged)
            .arg(&kernel.release),
        "depmod",
    )?;
    fs::write(staged.join("kernel.txt"), kernel.record())?;
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.parent().unwrap_or(Path::new(".")))?;
    fs::rename(&staged, &dir)?;
    let _ = fs::remove_dir_all(&tmp);
    note(&format!(
        "kernel {} cached in {} ({:.1} s)",
        kernel.release,
        dir.display(),
        started.elapsed().as_secs_f64()
    ));
    Ok(kernel)
}

/// The uncompressed kernel inside a bzImage: the first xz, zstd or gzip stream that
/// decompresses to a whole ELF file.
fn extract_vmlinux(bzimage: &[u8]) -> Option<Vec<u8>> {
    const FORMATS: &[(&[u8], &str, &[&str])] = &[
        (b"\xfd7zXZ\x00", "xz", &["-dc", "--single-stream"]),
        (b"\x28\xb5\x2f\xfd", "zstd", &["-dcq"]),
        (b"\x1f\x8b\x08", "gzip", &["-dcq"]),
    ];
    for (magic, tool, args) in FORMATS {
        let Some(at) = bzimage.windows(magic.len()).position(|w| w == *magic) else {
            continue;
        };
        let Ok(mut child) = Command::new(tool)
            .args(*args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
        else {
            continue;
        };
        let mut stdin = child.stdin.take()?;
        let input = bzimage[at..].to_vec();
        let writer = std::thread::spawn(move || {
            use std::io::Write as _;
            let _ = stdin.write_all(&input);
        });
        let out = child.wait_with_output().ok()?;
        let _ = writer.join();
        if whole_elf(&out.stdout) {
            return Some(out.stdout);
        }
    }
    None
}

/// An ELF64 file whose section headers lie within it (not cut short).
fn whole_elf(data: &[u8]) -> bool {
    if data.len() < 64 || &data[..4] != b"\x7fELF" || data[4] != 2 {
        return false;
    }
    let u64_at = |at: usize| {
        data.get(at..at + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    let u16_at = |at: usize| {
        data.get(at..at + 2)
            .and_then(|b| b.try_into().ok())
            .map(u16::from_le_bytes)
    };
    let (Some(shoff), Some(entsize), Some(num)) = (u64_at(0x28), u16_at(0x3a), u16_at(0x3c)) else {
        return false;
    };
    shoff + u64::from(entsize) * u64::from(num) <= data.len() as u64
}

/// The Debian mirror (`CONDUIT_VM_MIRROR` overrides deb.debian.org).
pub fn mirror() -> String {
    std::env::var("CONDUIT_VM_MIRROR").unwrap_or_else(|_| DEFAULT_MIRROR.to_owned())
}

/// A private apt configuration for one suite.
pub(crate) struct Apt {
    pub(crate) dir: PathBuf,
}

impl Apt {
    pub(crate) fn new(cache: &Cache, suite: &str) -> Result<Self> {
        let dir = cache.dir.join("apt").join(suite);
        for sub in ["lists/partial", "cache/archives/partial", "sources.list.d"] {
            fs::create_dir_all(dir.join(sub))?;
        }
        fs::write(dir.join("sources.list"), sources_list(&mirror(), suite))?;
        if !dir.join("status").exists() {
            fs::write(dir.join("status"), "")?;
        }
        Ok(Self { dir })
    }

    fn options(&self) -> Vec<String> {
        let d = self.dir.display();
        vec![
            format!("-oDir::Etc::SourceList={d}/sources.list"),
            format!("-oDir::Etc::SourceParts={d}/sources.list.d"),
            format!("-oDir::State={d}"),
            format!("-oDir::State::Lists={d}/lists"),
            format!("-oDir::State::status={d}/status"),
            format!("-oDir::Cache={d}/cache"),
            "-oAPT::Architectures::=amd64".into(),
            "-oAPT::Sandbox::User=root".into(),
            "-oAcquire::Languages=none".into(),
            "-oAcquire::IndexTargets::deb::DEP-11::DefaultEnabled=false".into(),
            "-oAcquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false".into(),
            "-oAcquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false".into(),
        ]
    }

    pub(crate) fn update(&self) -> Result<()> {
        checked(
            Command::new("apt-get")
                .args(self.options())
                .args(["-qq", "update"]),
            "apt-get update (private configuration)",
        )
        .map(drop)
    }

    pub(crate) fn show(&self, package: &str) -> Result<String> {
        checked(
            Command::new("apt-cache").args(self.options()).args([
                "show",
                "--no-all-versions",
                package,
            ]),
            "apt-cache show",
        )
    }

    pub(crate) fn download(&self, package: &str, version: &str, into: &Path) -> Result<PathBuf> {
        checked(
            Command::new("apt-get")
                .current_dir(into)
                .args(self.options())
                .args(["-qq", "download", &format!("{package}={version}")]),
            "apt-get download",
        )?;
        fs::read_dir(into)?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .with_context(|| format!("apt-get download left no .deb for {package}"))
    }
}

/// One-line sources for a suite, verified with the Debian archive keyring (its
/// bookworm version, 2023.3+deb12u2, also holds the trixie keys).
fn sources_list(mirror: &str, suite: &str) -> String {
    format!("deb [signed-by={KEYRING}] {mirror} {suite} main\n")
}

/// The kernel package and version `linux-image-amd64` depends on, from
/// `apt-cache show` output.
fn resolve_metapackage(show: &str) -> Result<(String, String)> {
    let depends = show
        .lines()
        .find_map(|line| line.strip_prefix("Depends:"))
        .context("no Depends field")?;
    let first = depends
        .split(',')
        .next()
        .context("empty Depends")?
        .split('|')
        .next()
        .unwrap_or_default()
        .trim();
    let (name, rest) = first.split_once(' ').unwrap_or((first, ""));
    if !name.starts_with("linux-image-") {
        bail!("unexpected dependency {first:?}");
    }
    let version = rest
        .trim()
        .strip_prefix("(=")
        .and_then(|v| v.strip_suffix(')'))
        .map(str::trim)
        .context("the dependency has no exact version")?;
    Ok((name.to_owned(), version.to_owned()))
}

/// Runs a command, returning its stdout; on failure, the error carries its stderr.
pub fn checked(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metapackage_resolution() {
        let show = "Package: linux-image-amd64\nSource: linux-signed-amd64 (6.12.117+1)\n\
                    Version: 6.12.117-1\nDepends: linux-image-6.12.117+deb13-amd64 (= 6.12.117-1)\n";
        let (pkg, ver) = resolve_metapackage(show).expect("resolves");
        assert_eq!(pkg, "linux-image-6.12.117+deb13-amd64");
        assert_eq!(ver, "6.12.117-1");
        let bullseye = "Depends: linux-image-5.10.0-32-amd64 (= 5.10.223-1), foo\n";
        assert_eq!(
            resolve_metapackage(bullseye).expect("resolves").0,
            "linux-image-5.10.0-32-amd64"
        );
        assert!(resolve_metapackage("Depends: libc6\n").is_err());
        assert!(resolve_metapackage("Version: 1\n").is_err());
    }

    #[test]
    fn record_round_trip() {
        let kernel = Kernel {
            series: "6.1",
            package: "linux-image-6.1.0-40-amd64".into(),
            version: "6.1.153-1".into(),
            release: "6.1.0-40-amd64".into(),
            dir: PathBuf::from("/x"),
        };
        let back =
            Kernel::parse_record("6.1", PathBuf::from("/x"), &kernel.record()).expect("parses");
        assert_eq!(back.release, kernel.release);
        assert_eq!(back.version, kernel.version);
        assert_eq!(
            back.modules(),
            PathBuf::from("/x/lib/modules/6.1.0-40-amd64")
        );
    }

    #[test]
    fn elf_sanity() {
        let mut elf = vec![0_u8; 128];
        elf[..5].copy_from_slice(b"\x7fELF\x02");
        elf[0x28] = 64; // section headers at 64
        elf[0x3a] = 64; // of 64 bytes
        elf[0x3c] = 1; // one
        assert!(whole_elf(&elf));
        assert!(!whole_elf(&elf[..100]));
        assert!(!whole_elf(b"MZ"));
    }

    #[test]
    fn vmlinux_from_an_xz_stream() {
        let mut elf = vec![0_u8; 4096];
        elf[..5].copy_from_slice(b"\x7fELF\x02");
        let xz = Command::new("xz")
            .args(["-c", "--check=crc32"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write as _;
                child.stdin.take().expect("stdin").write_all(&elf)?;
                child.wait_with_output()
            });
        let Ok(xz) = xz else {
            eprintln!("skipped: no xz");
            return;
        };
        let mut bzimage = b"setup code".to_vec();
        bzimage.extend(&xz.stdout);
        bzimage.extend(b"trailing");
        assert_eq!(extract_vmlinux(&bzimage), Some(elf));
    }

    #[test]
    fn sources_are_signed() {
        assert_eq!(
            sources_list("http://m/debian", "trixie"),
            "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://m/debian trixie main\n"
        );
    }
}
