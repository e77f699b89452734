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
