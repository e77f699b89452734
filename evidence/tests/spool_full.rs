//! A full spool: records are refused, never silently; a `loss` record with reason
//! `spool_full` says so; acknowledged segments make room again.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use conduit_evidence::chain::verify::verify_dir;
use conduit_evidence::chain::{Appended, Recorder, RecorderOptions};
use conduit_evidence::spool::SyncPolicy;
use conduit_proto::v1::{self, RecordKind, record::Body};

fn flow(i: u64) -> v1::Record {
    v1::Record {
        kind: RecordKind::FlowEnd as i32,
        body: Some(Body::Flow(v1::Flow {
            flow_id: i,
            server_name: "api.openai.com".to_owned(),
            source_ip: vec![10, 1, 2, 3],
            destination_ip: vec![192, 0, 2, 10],
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn losses(a: &[Appended]) -> Vec<v1::Loss> {
    a.iter()
        .filter_map(|a| match &a.record.body {
            Some(Body::Loss(l)) => Some(l.clone()),
            _ => None,
        })
        .collect()
}

fn options(dir: &Path, max: u64) -> RecorderOptions {
    let mut o = RecorderOptions::new(dir, "gw-full");
    o.max_spool_bytes = max;
    o.segment_bytes = 16 * 1024;
    o.sync = SyncPolicy::OsOnly;
    o.checkpoint_every = Duration::from_secs(3600);
    o
}

#[test]
fn bounded_spool_refuses_says_so_and_recovers_after_ack() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut rec, _) = Recorder::open(options(dir.path(), 128 * 1024)).expect("open");
    let mut written = Vec::new();
    let mut i = 0;
    while rec.stats().records_refused < 50 {
        written.extend(rec.append(flow(i)).expect("append never errors when full"));
        i += 1;
        assert!(i < 100_000, "never filled");
    }
    let l = losses(&written);
    assert_eq!(l.len(), 1, "one loss record when the episode starts: {l:?}");
    assert_eq!(l[0].reason, "spool_full");
    assert_eq!(l[0].count, 1);
    let stats = rec.stats();
    assert!(stats.full && stats.above_warning, "{stats:?}");
    assert!(stats.bytes <= 128 * 1024, "{stats:?}");
    // The collector acknowledges everything: old segments go, records are accepted.
    let (head, _) = rec.head();
    rec.acknowledge(head).expect("ack");
    let after = rec.append(flow(i)).expect("append after ack");
    let l = losses(&after);
    assert_eq!(l.len(), 1, "closing loss record: {after:?}");
    assert_eq!(l[0].count, 49, "refusals after the first");
    assert!(matches!(
        after.last().map(|a| &a.record.body),
        Some(Some(Body::Flow(_)))
    ));
    assert!(rec.stats().segments_deleted > 0);
    drop(rec);
    let r = verify_dir(dir.path(), None);
    assert!(r.ok(), "{r}");
    assert!(r.first_seq > 1, "oldest segments were deleted: {r}");
}

/// Unmounts on drop, whatever happened.
struct Mount(std::path::PathBuf);

/// A 1 MiB tmpfs in a fresh directory (None, with a SKIP line: not root or no mount).
fn small_tmpfs() -> Option<(tempfile::TempDir, Mount)> {
    if nix::unistd::geteuid().as_raw() != 0 {
        println!("SKIP: needs root (mounts a small tmpfs)");
        return None;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "conduit-spool-test"])
        .arg(dir.path())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        println!("SKIP: cannot mount tmpfs");
        return None;
    }
    let mount = Mount(dir.path().to_owned());
    Some((dir, mount))
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn file_system_full_tmpfs() {
    let Some((dir, _mount)) = small_tmpfs() else {
        return;
    };
    let (mut rec, _) = Recorder::open(options(dir.path(), 1 << 30)).expect("open");
    let mut written = Vec::new();
    let mut i = 0;
    while rec.stats().records_refused < 20 {
        // Both paths: single appends and batches (one write(2) per batch).
        let out = if i % 2 == 0 {
            rec.append(flow(i))
        } else {
            rec.append_batch(vec![flow(i), flow(i + 100_000)])
        };
        written.extend(out.expect("append never errors when full"));
        i += 1;
        assert!(i < 100_000, "never filled");
    }
    let l = losses(&written);
    assert_eq!(l.len(), 1, "loss record written from the reserve: {l:?}");
    assert_eq!(l[0].reason, "spool_full");
    assert!(rec.stats().full);
    // A timed checkpoint must not fail either.
    rec.tick(std::time::SystemTime::now() + Duration::from_secs(7200))
        .expect("tick when full");
    rec.sync().expect("sync");
    drop(rec);
    let r = verify_dir(dir.path(), None);
    assert!(r.ok(), "{r}");
    // Reopen on the full file system: recovery must work without space.
    let (rec, _) = Recorder::open(options(dir.path(), 1 << 30)).expect("reopen when full");
    drop(rec);
    assert!(verify_dir(dir.path(), None).ok());
}

/// Issue 10, failure 8: an acknowledgement beyond the spool's own head (a rogue
/// collector, a planted `acked` file) does not cover records written afterwards.
#[test]
fn acknowledgement_beyond_the_head_covers_no_future_records() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Over 80 % of this bound, acknowledged segments are deleted.
    let mut opts = options(dir.path(), 48 << 10);
    opts.segment_bytes = 4096;
    let (mut rec, _) = Recorder::open(opts).expect("open");
    for i in 0..10 {
        rec.append(flow(i)).expect("append");
    }
    let first_head = rec.head().0;
    rec.acknowledge(1_000_000).expect("ack");
    for i in 10..300 {
        rec.append(flow(i)).expect("append");
    }
    rec.acknowledge(first_head).expect("ack");
    rec.sync().expect("sync");
    drop(rec);
    let report = verify_dir(dir.path(), None);
    assert!(report.ok(), "{report}");
    // Every record after the first head is still there.
    let first_kept = conduit_evidence::spool::SpoolReader::new(dir.path(), 1)
        .next()
        .and_then(Result::ok)
        .map(|f| f.seq);
    assert!(
        first_kept.is_some_and(|s| s <= first_head + 1),
        "{first_kept:?}"
    );
}

/// Issue 10, failure 10: a second file-system-full episode opens with its own
/// `loss` record, because the first one restored the reserve before it closed.
#[test]
fn file_system_full_twice_tmpfs() {
    let Some((dir, _mount)) = small_tmpfs() else {
        return;
    };
    let (mut rec, _) = Recorder::open(options(dir.path(), 1 << 30)).expect("open");
    let mut written = Vec::new();
    let mut i = 0;
    let mut fill = |rec: &mut Recorder, until: u64, written: &mut Vec<Appended>| {
        while rec.stats().records_refused < until {
            written.extend(rec.append(flow(i)).expect("append never errors when full"));
            i += 1;
            assert!(i < 200_000, "never filled");
        }
    };
    fill(&mut rec, 20, &mut written);
    // The collector acknowledges everything: segments go, the episode closes.
    rec.acknowledge(rec.head().0).expect("ack");
    let before = rec.stats().records_refused;
    written.extend(rec.append(flow(0)).expect("append after ack"));
    assert_eq!(rec.stats().records_refused, before, "no room after the ack");
    fill(&mut rec, before + 20, &mut written);
    let opened: Vec<_> = losses(&written)
        .into_iter()
        .filter(|l| l.detail.contains("refusing new records"))
        .collect();
    assert_eq!(
        opened.len(),
        2,
        "each episode opens with a loss record: {opened:?}"
    );
    rec.sync().expect("sync");
    drop(rec);
    assert!(verify_dir(dir.path(), None).ok());
}
