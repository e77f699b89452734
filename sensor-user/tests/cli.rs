//! The command-line contract of `conduit-sensor` (exit codes and outputs), driven
//! through the real binary as outside programs drive it.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use conduit_evidence::chain::{Recorder, RecorderOptions};
use conduit_proto::v1::{Loss, Record, RecordKind, record::Body};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_conduit-sensor"))
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/config")
        .join(name)
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn check_config_accepts_the_examples() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = bin()
        .arg("check-config")
        .arg("--conduits")
        .arg(root.join("deploy/examples/conduits.yaml"))
        .arg("--config")
        .arg(root.join("deploy/examples/sensor.yaml"))
        .arg("--syntax-only")
        .output()
        .expect("run conduit-sensor");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("policy hash"), "{}", text(&out));
}

#[test]
fn check_config_exits_64_with_file_line_column() {
    let path = fixture("unknown_zone.yaml");
    let out = bin()
        .arg("check-config")
        .arg("--conduits")
        .arg(&path)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let expected = format!("{}:13:11: unknown zone `cell-2`", path.display());
    assert!(
        stderr.contains(&expected),
        "expected {expected:?} in:\n{stderr}"
    );
}

#[test]
fn run_with_a_broken_map_exits_64_before_touching_the_kernel() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = bin()
        .args(["run", "--iface", "lo", "--conduits"])
        .arg(fixture("syntax.yaml"))
        .arg("--spool")
        .arg(dir.path())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(text(&out).contains("syntax.yaml:"), "{}", text(&out));
}

#[test]
fn broken_sensor_yaml_exits_64() {
    let out = bin()
        .arg("check-config")
        .arg("--config")
        .arg(fixture("sensor_bad.yaml"))
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(text(&out).contains("sensor_bad.yaml:"), "{}", text(&out));
}

#[test]
fn schema_prints_both_files() {
    let out = bin().arg("schema").output().expect("run");
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("schema is JSON");
    assert!(
        v.get("conduits.yaml").is_some() && v.get("sensor.yaml").is_some(),
        "{v}"
    );
}

#[test]
fn version_prints_the_version() {
    let out = bin().arg("version").output().expect("run");
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn keygen_writes_a_private_key_only_the_owner_can_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = bin()
        .arg("keygen")
        .arg("--out")
        .arg(dir.path())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let mode = std::fs::metadata(dir.path().join("signing.key"))
        .expect("key")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let public = std::fs::read_to_string(dir.path().join("signing.pub")).expect("pub");
    assert_eq!(public.trim().len(), 64);
    // A second keygen must not overwrite the key.
    let again = bin()
        .arg("keygen")
        .arg("--out")
        .arg(dir.path())
        .output()
        .expect("run");
    assert_ne!(again.status.code(), Some(0), "{}", text(&again));
}

#[test]
fn verify_chain_counts_records_and_names_the_first_bad_sequence() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spool = dir.path().join("spool");
    let (mut rec, _) = Recorder::open(RecorderOptions::new(&spool, "gw-cli")).expect("open");
    for i in 0..20 {
        rec.append(Record {
            kind: RecordKind::Loss as i32,
            body: Some(Body::Loss(Loss {
                reason: format!("test{i}"),
                count: i,
                ..Loss::default()
            })),
            ..Record::default()
        })
        .expect("append");
    }
    rec.checkpoint_now().expect("checkpoint");
    rec.sync().expect("sync");
    drop(rec);

    let out = bin().arg("verify-chain").arg(&spool).output().expect("run");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("records verified"), "{}", text(&out));

    // Rewrite one byte of the 10th frame's record bytes, fixing nothing else.
    let segment = std::fs::read_dir(&spool)
        .expect("dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "cspool"))
        .expect("segment");
    let mut bytes = std::fs::read(&segment).expect("read");
    let last = bytes.len() - 3;
    bytes[last] ^= 0x40;
    std::fs::write(&segment, bytes).expect("write");
    let out = bin().arg("verify-chain").arg(&spool).output().expect("run");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("first bad sequence number:"),
        "{}",
        text(&out)
    );
}

#[test]
fn verify_chain_checks_witness_cosignatures_against_the_witness_key() {
    use conduit_evidence::chain::cosignature::{self, Cosignature};
    let dir = tempfile::tempdir().expect("tempdir");
    let spool = dir.path().join("spool");
    let (mut rec, _) = Recorder::open(RecorderOptions::new(&spool, "gw-cli")).expect("open");
    rec.append(Record {
        kind: RecordKind::Loss as i32,
        body: Some(Body::Loss(Loss::default())),
        ..Record::default()
    })
    .expect("append");
    let cp = rec.checkpoint_now().expect("checkpoint");
    rec.sync().expect("sync");
    drop(rec);
    let (seq, hash) = (cp[0].seq, cp[0].hash);
    // The collector's key, as `<store>/_collector/signing.pub` holds it.
    let witness =
        conduit_evidence::chain::keys::keygen(&dir.path().join("collector")).expect("witness key");
    let witness_pub = dir.path().join("collector/signing.pub");
    let c = Cosignature::sign(&witness, "gw-cli", seq, &hash, 1);
    cosignature::append(&spool, &c).expect("append");
    let verify = |extra: &[&std::ffi::OsStr]| {
        bin()
            .arg("verify-chain")
            .arg(&spool)
            .args(extra)
            .output()
            .expect("run")
    };
    let out = verify(&["--witness-key".as_ref(), witness_pub.as_os_str()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        text(&out).contains("1 witness cosignatures match the chain"),
        "{}",
        text(&out)
    );
    let out = verify(&[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        text(&out).contains("present but unverified"),
        "{}",
        text(&out)
    );
    // The same seq witnessed with another hash: the chain was rewritten after it.
    let other = Cosignature::sign(&witness, "gw-cli", seq, &[9; 32], 2);
    cosignature::append(&spool, &other).expect("append");
    let out = verify(&["--witness-key".as_ref(), witness_pub.as_os_str()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains(&format!(
            "first bad sequence number: {seq}: witnessed head rewritten"
        )),
        "{}",
        text(&out)
    );
}

// One test per exit code of the contract: 0 ok, 1 verification failure (above),
// 2 usage or missing path, 64 bad configuration.

#[test]
fn usage_errors_exit_2() {
    let out = bin().args(["run", "--no-such-flag"]).output().expect("run");
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

#[test]
fn verify_chain_on_a_missing_path_exits_2_not_the_tamper_code() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = bin()
        .arg("verify-chain")
        .arg(dir.path().join("nope"))
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(!text(&out).contains("first bad sequence"), "{}", text(&out));
}

#[test]
fn probe_of_a_missing_interface_exits_2() {
    let out = bin()
        .args(["probe", "--iface", "nope0"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("nope0: DOES NOT EXIST"),
        "{}",
        text(&out)
    );
}

#[test]
fn check_config_without_arguments_checks_the_default_or_exits_2() {
    let out = bin().arg("check-config").output().expect("run");
    if Path::new(sensor_user::cli::DEFAULT_CONFIG).exists() {
        assert_ne!(out.status.code(), Some(2), "{}", text(&out));
    } else {
        assert_eq!(out.status.code(), Some(2), "{}", text(&out));
        assert!(
            text(&out).contains(sensor_user::cli::DEFAULT_CONFIG),
            "{}",
            text(&out)
        );
    }
}

#[test]
fn run_without_an_interface_exits_64() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = bin()
        .arg("run")
        .arg("--spool")
        .arg(dir.path())
        .env_remove("CONDUIT_SENSOR_INTERFACES")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(text(&out).contains("--iface"), "{}", text(&out));
}

#[test]
fn every_repeated_collector_url_is_checked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = bin()
        .arg("run")
        .arg("--spool")
        .arg(dir.path())
        .args(["--iface", "lo"])
        .args(["--collector", "http://127.0.0.1:4317"])
        .args(["--collector", "ftp://second.example"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(
        text(&out).contains("ftp://second.example: the collector URL must start with"),
        "{}",
        text(&out)
    );
}

#[test]
fn check_config_names_missing_interfaces_and_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("sensor.yaml");
    std::fs::write(
        &cfg,
        "interfaces: [nope0]\nsigning_key: /nonexistent/signing.key\n",
    )
    .expect("write");
    let out = bin()
        .arg("check-config")
        .arg("--config")
        .arg(&cfg)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(
        text(&out).contains("`nope0` does not exist"),
        "{}",
        text(&out)
    );
    assert!(text(&out).contains("signing_key"), "{}", text(&out));
}

#[test]
fn generate_docs_writes_man_pages_and_completions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = bin()
        .arg("generate-docs")
        .arg("--out")
        .arg(dir.path())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    for file in [
        "man/conduit-sensor.1",
        "man/conduit-sensor-run.1",
        "completions/conduit-sensor.bash",
        "completions/_conduit-sensor",
        "completions/conduit-sensor.fish",
    ] {
        assert!(dir.path().join(file).is_file(), "{file} missing");
    }
    let page = std::fs::read_to_string(dir.path().join("man/conduit-sensor-run.1")).expect("man");
    assert!(page.contains("iface"), "{page}");
    let help = bin().args(["run", "--help"]).output().expect("help");
    assert!(
        String::from_utf8_lossy(&help.stdout).contains("[default: 30s]"),
        "{}",
        text(&help)
    );
}

#[test]
fn logs_have_priorities_and_no_ansi_under_journald() {
    use std::os::unix::fs::MetadataExt as _;
    let dir = tempfile::tempdir().expect("tempdir");
    // JOURNAL_STREAM names stderr's device and inode, as systemd sets it. Without a
    // conduit map the agent warns (tracing), then fails to attach to nope0.
    let log = dir.path().join("stderr");
    let file = std::fs::File::create(&log).expect("create");
    let meta = file.metadata().expect("stat");
    let out = bin()
        .args(["run", "--iface", "nope0", "--spool"])
        .arg(dir.path().join("spool"))
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .env("RUST_LOG", "info")
        .stderr(file)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let journal = std::fs::read_to_string(&log).expect("log");
    assert!(!journal.contains('\x1b'), "{journal}");
    assert!(
        journal
            .lines()
            .any(|l| l.starts_with("<4>") && l.contains("no conduit map")),
        "no warning with priority 4 in:\n{journal}"
    );

    // --log-format json: one object per line.
    let out = bin()
        .args(["--log-format", "json", "run", "--iface", "nope0", "--spool"])
        .arg(dir.path().join("spool2"))
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let first = stderr.lines().next().unwrap_or_default();
    let value: serde_json::Value =
        serde_json::from_str(first).unwrap_or_else(|e| panic!("{e}: {stderr}"));
    assert_eq!(value["level"], "WARN", "{stderr}");
}

#[test]
fn reload_without_a_runtime_directory_exits_2() {
    let out = bin()
        .args(["reload", "--pid", &std::process::id().to_string()])
        .env_remove("RUNTIME_DIRECTORY")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("RUNTIME_DIRECTORY"), "{}", text(&out));
}

#[test]
fn reload_of_a_process_that_never_answers_fails_at_its_deadline() {
    // A process that survives SIGHUP and writes no outcome: reload must not hang
    // and must not report success (the agent's own answers are in tests/package).
    let mut quiet = Command::new("sh")
        .args(["-c", "trap '' HUP; sleep 30"])
        .spawn()
        .expect("sh");
    let dir = tempfile::tempdir().expect("tempdir");
    let out = bin()
        .args([
            "reload",
            "--pid",
            &quiet.id().to_string(),
            "--timeout",
            "500ms",
        ])
        .env("RUNTIME_DIRECTORY", dir.path())
        .output()
        .expect("run");
    let _ = quiet.kill();
    let _ = quiet.wait();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("no reload outcome"), "{}", text(&out));
}
