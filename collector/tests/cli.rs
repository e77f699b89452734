//! The command line of `conduit-collector`: one test per exit code of the contract
//! (0 ok, 1 verification failed, 2 usage or missing path, 64 bad configuration).

use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_conduit-collector"))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `check-config --config FILE` on a file holding `yaml`; returns the output and the path.
fn check_config(yaml: &str) -> (Output, std::path::PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("collector.yaml");
    std::fs::write(&path, yaml).expect("write");
    let out = bin()
        .arg("check-config")
        .arg("--config")
        .arg(&path)
        .env_remove("CREDENTIALS_DIRECTORY")
        .output()
        .expect("run");
    (out, path, dir)
}

#[test]
fn verify_of_an_empty_store_exits_0() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = bin()
        .args(["verify", "--store"])
        .arg(dir.path())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

#[test]
fn verify_of_a_missing_store_exits_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = bin()
        .args(["verify", "--store"])
        .arg(dir.path().join("nope"))
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

#[test]
fn check_config_exits_64_with_file_line_column() {
    let (out, path, _dir) = check_config("listen: \"127.0.0.1:7443\"\nstroe: /tmp/x\n");
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    let expected = format!("{}:2:1:", path.display());
    assert!(text(&out).contains(&expected), "{}", text(&out));
}

#[test]
fn check_config_names_unreadable_files() {
    let (out, _, _dir) = check_config(
        "listen: \"127.0.0.1:7443\"\nstore: /tmp/x\ntls:\n  cert: /nonexistent/server.crt\n  key: /nonexistent/server.key\n",
    );
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(text(&out).contains("tls.cert"), "{}", text(&out));
    assert!(text(&out).contains("tls.key"), "{}", text(&out));
}

#[test]
fn check_config_names_nats_tls_files_and_a_lone_certificate() {
    let (out, _, _dir) = check_config(
        "listen: \"127.0.0.1:7443\"\njetstream: tls://n1:4222\nnats_tls:\n  ca: /nonexistent/nats-ca.crt\n  cert: /nonexistent/nats.crt\n",
    );
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    for expected in ["nats_tls.ca", "nats_tls.cert", "cert and key together"] {
        assert!(text(&out).contains(expected), "{expected}: {}", text(&out));
    }
}

#[test]
fn check_config_accepts_a_good_file() {
    let (out, _, _dir) = check_config("listen: \"127.0.0.1:7443\"\nstore: /tmp/x\n");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

#[test]
fn check_config_without_a_file_exits_2() {
    if std::path::Path::new("/etc/conduit-collector/collector.yaml").exists() {
        return;
    }
    let out = bin().arg("check-config").output().expect("run");
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

#[test]
fn run_without_listen_or_store_exits_64() {
    let out = bin().arg("run").output().expect("run");
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(text(&out).contains("--listen"), "{}", text(&out));
}

#[test]
fn usage_errors_exit_2() {
    let out = bin().args(["run", "--bogus"]).output().expect("run");
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
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
        "man/conduit-collector.1",
        "man/conduit-collector-run.1",
        "completions/conduit-collector.bash",
        "completions/_conduit-collector",
        "completions/conduit-collector.fish",
    ] {
        assert!(dir.path().join(file).is_file(), "{file} missing");
    }
}

#[test]
fn verify_of_a_tampered_store_exits_1_with_the_first_bad_seq() {
    use conduit_evidence::chain::{Recorder, RecorderOptions};
    use conduit_proto::v1::{self, RecordKind, record::Body};
    let dir = tempfile::tempdir().expect("tempdir");
    let chain = dir.path().join("gw-1");
    let (mut rec, _) = Recorder::open(RecorderOptions::new(&chain, "gw-1")).expect("open");
    for i in 0..5 {
        rec.append(v1::Record {
            kind: RecordKind::FlowStart as i32,
            body: Some(Body::Flow(v1::Flow {
                flow_id: i,
                ..Default::default()
            })),
            ..Default::default()
        })
        .expect("append");
    }
    rec.sync().expect("sync");
    drop(rec);
    let ok = bin()
        .args(["verify", "--store"])
        .arg(dir.path())
        .output()
        .expect("run");
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok));
    // Flip one byte of the last frame's record bytes.
    let seg = conduit_evidence::spool::segment::list(&chain)
        .expect("list")
        .pop()
        .expect("segment")
        .1;
    let mut bytes = std::fs::read(&seg).expect("read");
    let n = bytes.len();
    bytes[n - 3] ^= 0x40;
    std::fs::write(&seg, bytes).expect("write");
    let out = bin()
        .args(["verify", "--store"])
        .arg(dir.path())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("first bad sequence number"),
        "{}",
        text(&out)
    );
}
