//! Crash safety: a child process (this test binary, re-executed) appends as fast as it
//! can and reports each seq that `append` returned; it is killed with SIGKILL at a
//! random moment. Every reported seq must be in the spool after reopening, and the
//! chain must verify. Twenty rounds on the same spool; the chain is verified every fifth round.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use conduit_evidence::chain::verify::verify_dir;
use conduit_evidence::chain::{Recorder, RecorderOptions};
use conduit_proto::v1::{self, RecordKind, record::Body};

const CHILD_ENV: &str = "CONDUIT_SPOOL_CRASH_CHILD_DIR";

fn options(dir: &std::path::Path) -> RecorderOptions {
    let mut o = RecorderOptions::new(dir, "gw-crash");
    o.segment_bytes = 256 * 1024; // rotate often, so kills also land near rotations
    o.checkpoint_every_records = 100;
    o
}

/// Not a test on its own: the body of the child process.
#[test]
fn crash_child() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let (mut rec, _) = Recorder::open(options(dir.as_ref())).expect("child open");
    for i in 0.. {
        let r = v1::Record {
            kind: RecordKind::FlowEnd as i32,
            body: Some(Body::Flow(v1::Flow {
                flow_id: i,
                server_name: "api.example.com".to_owned(),
                ..Default::default()
            })),
            ..Default::default()
        };
        for a in rec.append(r).expect("child append") {
            println!("APPENDED {}", a.seq);
        }
    }
}

#[test]
fn kill_9_loses_nothing_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = std::env::current_exe().expect("current_exe");
    let mut last_head = 0;
    for round in 0..20u64 {
        let mut child = Command::new(&exe)
            .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn child");
        let stdout = child.stdout.take().expect("stdout");
        let reader = std::thread::spawn(move || {
            let mut max = 0u64;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(n) = line.strip_prefix("APPENDED ").and_then(|s| s.parse().ok()) {
                    max = max.max(n);
                }
            }
            max
        });
        // Vary the moment of death: 30..250 ms.
        std::thread::sleep(Duration::from_millis(30 + (round * 37) % 220));
        child.kill().expect("SIGKILL");
        child.wait().expect("wait");
        let reported = reader.join().expect("reader");
        let (rec, _) = Recorder::open(options(dir.path())).expect("reopen after kill");
        let (head, _) = rec.head();
        assert!(
            head > reported,
            "round {round}: seq {reported} was reported written, spool head is {head}"
        );
        assert!(head > last_head, "round {round}: chain went backwards");
        last_head = head;
        drop(rec);
        // Full verification is slow in debug builds; every fifth round covers all kills
        // since the previous one (the chain is verified from seq 1 each time).
        if round % 5 == 4 {
            let report = verify_dir(dir.path(), None);
            assert!(report.ok(), "round {round}: {report}");
            assert_eq!(report.last_seq, head, "round {round}");
        }
    }
    assert!(
        last_head > 1000,
        "the child should have appended plenty, head {last_head}"
    );
}
