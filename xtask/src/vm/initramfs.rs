//! The initramfs (busybox-static, the few modules needed to reach the host's files,
//! and a generated `/init`) and the job script COMMAND runs from.

use std::{
    collections::{HashMap, HashSet},
    ffi::OsString,
    fs,
    os::unix::ffi::OsStrExt as _,
    path::Path,
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use super::fetch::Kernel;

/// What the initramfs hands over to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Run COMMAND chrooted into the host's root (9p, read-only).
    Plain,
    /// Mount the disk as root, the host's root at /host, and exec systemd.
    Systemd,
}

/// Modules the plain mode needs (with their dependencies from modules.dep); any of
/// them may be built in.
const PLAIN_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_console",
    "9pnet_virtio",
    "9p",
    "overlay",
];
/// The systemd mode also needs the disk and its file system.
const SYSTEMD_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_console",
    "9pnet_virtio",
    "9p",
    "virtio_blk",
    "crc32c_generic",
    "ext4",
];

/// Busybox applets the init scripts use.
const APPLETS: &[&str] = &[
    "sh",
    "mount",
    "umount",
    "mkdir",
    "insmod",
    "cat",
    "cut",
    "sleep",
    "poweroff",
    "chroot",
    "switch_root",
    "ip",
    "uname",
    "cp",
    "ln",
];

/// Writes the initramfs for `kernel` in `mode` to `out` (an uncompressed newc cpio).
pub fn build(kernel: &Kernel, mode: Mode, out: &Path) -> Result<()> {
    let wanted = match mode {
        Mode::Plain => PLAIN_MODULES,
        Mode::Systemd => SYSTEMD_MODULES,
    };
    let moddir = kernel.modules();
    let dep = fs::read_to_string(moddir.join("modules.dep"))
        .with_context(|| format!("read {}/modules.dep", moddir.display()))?;
    let builtin = fs::read_to_string(moddir.join("modules.builtin")).unwrap_or_default();
    let order = load_order(&dep, &builtin, wanted)?;

    let mut cpio = Cpio::default();
    for dir in [
        "bin",
        "sbin",
        "dev",
        "proc",
        "sys",
        "newroot",
        "lib",
        "lib/modules",
        "run",
        "tmp",
    ] {
        cpio.dir(dir);
    }
    cpio.char_dev("dev/console", 5, 1);
    cpio.char_dev("dev/null", 1, 3);
    let busybox = fs::read("/bin/busybox").context("read /bin/busybox (busybox-static)")?;
    cpio.file("bin/busybox", 0o755, &busybox);
    for applet in APPLETS {
        cpio.symlink(&format!("bin/{applet}"), "busybox");
    }
    let mut names = Vec::new();
    for (name, rel) in &order {
        let data = read_module(&moddir.join(rel))?;
        cpio.file(&format!("lib/modules/{name}.ko"), 0o644, &data);
        names.push(name.as_str());
    }
    if mode == Mode::Plain {
        // The kernel's module auto-loading runs /sbin/modprobe in PID 1's root, the
        // initramfs; hand it to the host's kmod with the guest kernel's modules.
        cpio.file("sbin/modprobe", 0o755, MODPROBE_WRAPPER.as_bytes());
    }
    if mode == Mode::Systemd {
        cpio.dir("conduit");
        cpio.file(
            "conduit/conduit-job",
            0o755,
            super::systemd::RUNNER.as_bytes(),
        );
        cpio.file(
            "conduit/conduit-job.service",
            0o644,
            super::systemd::UNIT.as_bytes(),
        );
    }
    cpio.file("init", 0o755, init_script(mode, &names).as_bytes());
    fs::write(out, cpio.finish()).with_context(|| format!("write {}", out.display()))
}

/// What the probe initramfs prints once the kernel runs its userspace.
pub const PROBE_MARKER: &str = "conduit-vm-probe-ok";

/// An initramfs whose init prints [`PROBE_MARKER`] and powers off (the KVM probe).
pub fn probe() -> Result<Vec<u8>> {
    let mut cpio = Cpio::default();
    for dir in ["bin", "dev", "proc"] {
        cpio.dir(dir);
    }
    cpio.char_dev("dev/console", 5, 1);
    let busybox = fs::read("/bin/busybox").context("read /bin/busybox (busybox-static)")?;
    cpio.file("bin/busybox", 0o755, &busybox);
    for applet in ["sh", "poweroff"] {
        cpio.symlink(&format!("bin/{applet}"), "busybox");
    }
    let init = format!("#!/bin/sh\necho {PROBE_MARKER} >/dev/console\n/bin/poweroff -f\n");
    cpio.file("init", 0o755, init.as_bytes());
    Ok(cpio.finish())
}

const MODPROBE_WRAPPER: &str = "#!/bin/sh\n\
for arg in $(cat /proc/cmdline); do\n\
  case \"$arg\" in conduit.kdir=*) kdir=\"${arg#conduit.kdir=}\" ;; esac\n\
done\n\
exec chroot /newroot /sbin/modprobe -d \"$kdir\" \"$@\"\n";

/// Module names and their paths relative to the modules directory, dependencies
/// first; built-in modules are skipped.
fn load_order(dep: &str, builtin: &str, wanted: &[&str]) -> Result<Vec<(String, String)>> {
    let mut table: HashMap<String, (String, Vec<String>)> = HashMap::new();
    for line in dep.lines() {
        let Some((path, deps)) = line.split_once(':') else {
            continue;
        };
        let deps = deps.split_whitespace().map(module_name).collect();
        table.insert(module_name(path), (path.to_owned(), deps));
    }
    let builtin: HashSet<String> = builtin.lines().map(module_name).collect();
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    fn visit(
        name: &str,
        table: &HashMap<String, (String, Vec<String>)>,
        builtin: &HashSet<String>,
        seen: &mut HashSet<String>,
        order: &mut Vec<(String, String)>,
    ) -> Result<()> {
        if builtin.contains(name) || !seen.insert(name.to_owned()) {
            return Ok(());
        }
        let Some((path, deps)) = table.get(name) else {
            bail!("module {name} is neither built in nor in modules.dep");
        };
        for dep in deps {
            visit(dep, table, builtin, seen, order)?;
        }
        order.push((name.to_owned(), path.clone()));
        Ok(())
    }
    for name in wanted {
        visit(
            &name.replace('-', "_"),
            &table,
            &builtin,
            &mut seen,
            &mut order,
        )?;
    }
    Ok(order)
}

/// `kernel/fs/9p/9p.ko.xz` → `9p`; `-` and `_` are the same in module names.
fn module_name(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    let base = base.split(".ko").next().unwrap_or(base);
    base.replace('-', "_")
}

/// A module file, decompressed (busybox insmod takes plain .ko files).
fn read_module(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".ko.xz") {
        Some("xz")
    } else if name.ends_with(".ko.zst") {
        Some("zstd")
    } else if name.ends_with(".ko.gz") {
        Some("gzip")
    } else {
        None
    };
    match tool {
        None => fs::read(path).with_context(|| format!("read {name}")),
        Some(tool) => {
            let out = Command::new(tool)
                .arg("-dc")
                .arg(path)
                .output()
                .with_context(|| format!("cannot start {tool}"))?;
            if !out.status.success() {
                bail!("{tool} -dc {name} failed");
            }
            Ok(out.stdout)
        }
    }
}

/// Shell helpers both init scripts share: the command line, the virtio ports by
/// name, and reporting a failure to the host.
const INIT_COMMON: &str = r#"#!/bin/sh
# /init, generated by cargo xtask vm.
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    conduit.job=*) job="${arg#conduit.job=}" ;;
    conduit.kdir=*) kdir="${arg#conduit.kdir=}" ;;
  esac
done
for m in $MODULES; do
  insmod "/lib/modules/$m.ko" || echo "conduit-init: insmod $m failed" >/dev/console
done
echo "<6>conduit-init: modules loaded" >/dev/kmsg
port() {
  for p in /sys/class/virtio-ports/*; do
    if [ "$(cat "$p/name" 2>/dev/null)" = "$1" ]; then echo "/dev/${p##*/}"; return 0; fi
  done
  return 1
}
i=0
until st=$(port conduit.status); do
  i=$((i + 1))
  if [ $i -ge 1000 ]; then echo "conduit-init: no status port" >/dev/console; poweroff -f; fi
  sleep 0.01
done
exec 3>"$st"
echo "<6>conduit-init: ports up" >/dev/kmsg
fail() {
  echo "conduit-init: $*" >/dev/console
  echo "error $*" >&3
  poweroff -f
  sleep 10
}
mkdir -p /newroot
"#;

const INIT_PLAIN: &str = r#"out=$(port conduit.stdout) || fail "no stdout port"
err=$(port conduit.stderr) || fail "no stderr port"
mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=262144,cache=loose host /newroot \
  || fail "cannot mount the host's root over 9p"
# /tmp: the host's /tmp (a clone or target directory may live there) with writes
# going to a tmpfs overlay, so the guest writes there and the host stays untouched.
mkdir -p /ovl && mount -t tmpfs -o mode=755 tmpfs /ovl && mkdir -p /ovl/upper /ovl/work \
  && chmod 1777 /ovl/upper
mount -t overlay overlay -o lowerdir=/newroot/tmp,upperdir=/ovl/upper,workdir=/ovl/work \
  /newroot/tmp || fail "cannot mount /tmp"
mount -t tmpfs -o mode=755 tmpfs /newroot/run || fail "cannot mount /run"
mount -t devtmpfs devtmpfs /newroot/dev || fail "cannot mount /dev"
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts /newroot/dev/pts
mount -t tmpfs -o mode=1777 tmpfs /newroot/dev/shm
mount -t proc proc /newroot/proc || fail "cannot mount /proc"
mount -t sysfs sysfs /newroot/sys || fail "cannot mount /sys"
mount -t bpf bpf /newroot/sys/fs/bpf || fail "cannot mount bpffs"
mount -t cgroup2 cgroup2 /newroot/sys/fs/cgroup 2>/dev/null
mount -t debugfs debugfs /newroot/sys/kernel/debug 2>/dev/null
mount -t tracefs tracefs /newroot/sys/kernel/tracing 2>/dev/null
ip link set lo up
echo "<6>conduit-init: mounted" >/dev/kmsg
[ -n "$job" ] || fail "no conduit.job on the kernel command line"
echo "booted $(cut -d' ' -f1 /proc/uptime)" >&3
chroot /newroot /usr/bin/env -i /bin/sh "$job" </dev/null >"$out" 2>"$err"
echo "exit $?" >&3
poweroff -f
sleep 10
"#;

const INIT_SYSTEMD: &str = r#"i=0
until [ -b /dev/vda ]; do
  i=$((i + 1))
  [ $i -ge 500 ] && fail "no disk /dev/vda"
  sleep 0.01
done
mount -t ext4 -o rw /dev/vda /newroot || fail "cannot mount the root disk"
mkdir -p /newroot/host
mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=262144,cache=loose host /newroot/host \
  || fail "cannot mount the host's root over 9p"
rel=$(uname -r)
mkdir -p "/newroot/lib/modules/$rel"
mount -o bind "/newroot/host$kdir/lib/modules/$rel" "/newroot/lib/modules/$rel" \
  || fail "cannot bind the kernel's modules"
[ -e /newroot/sbin/init ] || [ -L /newroot/sbin/init ] || fail "the root has no /sbin/init"
# The command runner comes with this initramfs, so the cached root never goes stale.
mkdir -p /newroot/usr/local/sbin /newroot/etc/systemd/system/multi-user.target.wants
cp /conduit/conduit-job /newroot/usr/local/sbin/conduit-job
cp /conduit/conduit-job.service /newroot/etc/systemd/system/conduit-job.service
ln -sf /etc/systemd/system/conduit-job.service \
  /newroot/etc/systemd/system/multi-user.target.wants/conduit-job.service
for unit in $MASKED; do ln -sf /dev/null "/newroot/etc/systemd/system/$unit"; done
exec 3>&-
umount /proc /sys
mount -o move /dev /newroot/dev
exec switch_root /newroot /sbin/init
"#;

/// The generated `/init` for `mode`, loading `modules` in order.
pub fn init_script(mode: Mode, modules: &[&str]) -> String {
    let mut script = INIT_COMMON.replace("$MODULES", &modules.join(" "));
    match mode {
        Mode::Plain => script.push_str(INIT_PLAIN),
        Mode::Systemd => {
            script.push_str(&INIT_SYSTEMD.replace("$MASKED", &super::systemd::MASKED.join(" ")))
        }
    }
    script
}

/// The script COMMAND runs from, in a clean environment (`env -i /bin/sh JOB`): the
/// environment, the working directory (under `/host` in systemd mode), COMMAND.
pub fn job_script(
    cwd: &Path,
    env: &[(String, String)],
    command: &[OsString],
    systemd: bool,
) -> Vec<u8> {
    let mut s = b"# generated by cargo xtask vm\n".to_vec();
    for (name, value) in env {
        if !is_name(name) {
            continue;
        }
        s.extend_from_slice(format!("export {name}=").as_bytes());
        s.extend(quote(value.as_bytes()));
        s.push(b'\n');
    }
    let mut dir = Vec::new();
    if systemd {
        dir.extend_from_slice(b"/host");
    }
    dir.extend_from_slice(cwd.as_os_str().as_bytes());
    let dir = quote(&dir);
    s.extend_from_slice(b"cd ");
    s.extend(&dir);
    s.extend_from_slice(b" || { echo \"xtask vm: cannot enter ");
    s.extend(dir.iter().filter(|&&b| b != b'"' && b != b'\''));
    s.extend_from_slice(b" in the guest\" >&2; exit 125; }\nexec");
    for arg in command {
        s.push(b' ');
        s.extend(quote(arg.as_bytes()));
    }
    s.push(b'\n');
    s
}

fn is_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Single-quotes bytes for sh.
fn quote(bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![b'\''];
    for &b in bytes {
        if b == b'\'' {
            out.extend_from_slice(b"'\\''");
        } else {
            out.push(b);
        }
    }
    out.push(b'\'');
    out
}

/// A newc ("070701") cpio archive, what the kernel unpacks as initramfs.
#[derive(Default)]
struct Cpio {
    data: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), body: &[u8]) {
        self.ino += 1;
        let namesize = name.len() + 1;
        let fields = [
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            u32::try_from(body.len()).unwrap_or(u32::MAX),
            0,
            0,
            rdev.0,
            rdev.1,
            u32::try_from(namesize).unwrap_or(u32::MAX),
            0,
        ];
        self.data.extend_from_slice(b"070701");
        for field in fields {
            self.data
                .extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.data.extend_from_slice(name.as_bytes());
        self.data.push(0);
        self.pad();
        self.data.extend_from_slice(body);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.data.len().is_multiple_of(4) {
            self.data.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, (0, 0), &[]);
    }

    fn file(&mut self, name: &str, perm: u32, body: &[u8]) {
        self.entry(name, 0o100_000 | perm, (0, 0), body);
    }

    fn symlink(&mut self, name: &str, target: &str) {
        self.entry(name, 0o120_777, (0, 0), target.as_bytes());
    }

    fn char_dev(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020_600, (major, minor), &[]);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.data
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "kernel/fs/9p/9p.ko.xz: kernel/net/9p/9pnet.ko.xz kernel/fs/netfs/netfs.ko.xz\n\
        kernel/net/9p/9pnet.ko.xz:\n\
        kernel/fs/netfs/netfs.ko.xz:\n\
        kernel/net/9p/9pnet_virtio.ko.xz: kernel/net/9p/9pnet.ko.xz kernel/drivers/virtio/virtio_ring.ko.xz\n\
        kernel/drivers/virtio/virtio_ring.ko.xz:\n\
        kernel/drivers/char/virtio_console.ko.xz: kernel/drivers/virtio/virtio_ring.ko.xz\n";

    #[test]
    fn modules_load_after_their_dependencies_and_builtins_are_skipped() {
        let order = load_order(
            DEP,
            "kernel/drivers/virtio/virtio_pci.ko\n",
            &["virtio_pci", "virtio_console", "9pnet_virtio", "9p"],
        )
        .expect("resolves");
        let names: Vec<&str> = order.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "virtio_ring",
                "virtio_console",
                "9pnet",
                "9pnet_virtio",
                "netfs",
                "9p"
            ]
        );
        assert_eq!(order[5].1, "kernel/fs/9p/9p.ko.xz");
        assert!(load_order(DEP, "", &["virtio_pci"]).is_err());
    }

    #[test]
    fn module_names() {
        assert_eq!(module_name("kernel/fs/9p/9p.ko.xz"), "9p");
        assert_eq!(module_name("kernel/x/crc32c-generic.ko"), "crc32c_generic");
    }

    #[test]
    fn job_script_quotes_and_enters_the_directory() {
        let script = job_script(
            Path::new("/work/it's here"),
            &[
                ("PATH".into(), "/usr/bin:/bin".into()),
                ("bad-name".into(), "x".into()),
            ],
            &["sh".into(), "-c".into(), "echo 'a b'; exit 7".into()],
            false,
        );
        let script = String::from_utf8(script).expect("utf-8");
        assert!(script.contains("export PATH='/usr/bin:/bin'\n"), "{script}");
        assert!(!script.contains("bad-name"));
        assert!(script.contains("cd '/work/it'\\''s here' || "), "{script}");
        assert!(
            script.ends_with("exec 'sh' '-c' 'echo '\\''a b'\\''; exit 7'\n"),
            "{script}"
        );
        let systemd = job_script(Path::new("/w"), &[], &["true".into()], true);
        assert!(String::from_utf8_lossy(&systemd).contains("cd '/host/w' || "));
    }

    #[test]
    fn job_script_runs_in_sh() {
        // The generated script, run by the host's sh, reports the directory and the
        // arguments exactly.
        let dir = std::env::temp_dir();
        let script = job_script(
            &dir,
            &[("CONDUIT_X".into(), "a'b c".into())],
            &[
                "sh".into(),
                "-c".into(),
                "printf '%s|' \"$PWD\" \"$CONDUIT_X\" \"$1\"; exit 7".into(),
                "arg0".into(),
                "x  y".into(),
            ],
            false,
        );
        let out = Command::new("sh")
            .arg("-c")
            .arg(String::from_utf8_lossy(&script).as_ref())
            .output()
            .expect("sh runs");
        assert_eq!(out.status.code(), Some(7));
        let expected = format!("{}|a'b c|x  y|", dir.display());
        assert_eq!(String::from_utf8_lossy(&out.stdout), expected);
    }

    #[test]
    fn init_scripts() {
        let plain = init_script(Mode::Plain, &["virtio_ring", "9p"]);
        assert!(plain.starts_with("#!/bin/sh\n"));
        assert!(plain.contains("for m in virtio_ring 9p; do"));
        assert!(plain.contains("mount -t bpf bpf /newroot/sys/fs/bpf"));
        assert!(plain.contains("echo \"exit $?\" >&3"));
        assert!(!plain.contains("switch_root"));
        let systemd = init_script(Mode::Systemd, &[]);
        assert!(systemd.contains("exec switch_root /newroot /sbin/init"));
        assert!(systemd.contains("/newroot/host"));
        assert!(systemd.contains("for unit in getty@tty1.service "));
    }

    #[test]
    fn cpio_layout() {
        let mut cpio = Cpio::default();
        cpio.file("init", 0o755, b"abc");
        let data = cpio.finish();
        assert!(data.starts_with(b"070701"));
        // Header (110) + "init\0" padded to 116, then 3 bytes of data padded to 120.
        assert_eq!(&data[110..115], b"init\0");
        assert_eq!(&data[116..119], b"abc");
        assert_eq!(&data[120..126], b"070701");
        assert_eq!(&data[6..14], b"00000001");
        // mode
        assert_eq!(&data[14..22], b"000081ed");
        assert!(data.len().is_multiple_of(4));
        assert!(data.windows(10).any(|w| w == b"TRAILER!!!"));
    }
}
