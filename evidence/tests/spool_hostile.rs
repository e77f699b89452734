//! Damaged and planted spool state (issue 10, failure 11): recovery never writes
//! through a planted symlink, and keeps torn bytes in a new 0600 file.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use conduit_evidence::chain::verify::verify_dir;
use conduit_evidence::chain::{Recorder, RecorderOptions};
use conduit_evidence::spool::SyncPolicy;
use conduit_proto::v1::{self, RecordKind, record::Body};

fn open(dir: &Path) -> Recorder {
    let mut o = RecorderOptions::new(dir, "gw-planted");
    o.sync = SyncPolicy::OsOnly;
    Recorder::open(o).expect("open").0
}

fn flow(i: u64) -> v1::Record {
    v1::Record {
        kind: RecordKind::FlowStart as i32,
        body: Some(Body::Flow(v1::Flow {
            flow_id: i,
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// Segment files, oldest first (the spool's own listing).
fn segments(dir: &Path) -> Vec<std::path::PathBuf> {
    conduit_evidence::spool::segment::list(dir)
        .expect("list")
        .into_iter()
        .map(|(_, path)| path)
        .collect()
}

#[test]
fn planted_dangling_symlinks_are_never_followed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (spool, outside) = (tmp.path().join("spool"), tmp.path().join("outside"));
    std::fs::create_dir(&outside).expect("outside");
    let mut rec = open(&spool);
    for i in 0..10 {
        rec.append(flow(i)).expect("append");
    }
    rec.sync().expect("sync");
    drop(rec);
    // A torn tail, and the name recovery would keep it under planted as a dangling
    // symlink out of the spool.
    let seg = segments(&spool).pop().expect("segment");
    let good = std::fs::metadata(&seg).expect("meta").len();
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&seg)
        .expect("seg");
    std::io::Write::write_all(&mut f, &[0xAB; 37]).expect("tear");
    drop(f);
    let planted = seg.with_file_name(format!(
        "{}.torn-{good}",
        seg.file_name().expect("name").to_string_lossy()
    ));
    let target = outside.join("torn-bytes");
    std::os::unix::fs::symlink(&target, &planted).expect("symlink");
    // And a segment name that is a symlink to a file outside.
    let victim = outside.join("victim");
    std::fs::write(&victim, b"not a segment").expect("victim");
    std::os::unix::fs::symlink(&victim, spool.join("seg-00000000000099999999.cspool"))
        .expect("symlink");

    let mut rec = open(&spool);
    rec.append(flow(99)).expect("append after recovery");
    rec.sync().expect("sync");
    drop(rec);

    assert!(
        !target.exists(),
        "recovery wrote through the planted symlink"
    );
    assert_eq!(std::fs::read(&victim).expect("victim"), b"not a segment");
    let kept = planted.with_file_name(format!(
        "{}.1",
        planted.file_name().expect("name").to_string_lossy()
    ));
    let meta = std::fs::symlink_metadata(&kept).expect("torn bytes kept under the next name");
    assert!(meta.file_type().is_file());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(std::fs::read(&kept).expect("kept"), vec![0xAB; 37]);
    let report = verify_dir(&spool, None);
    assert!(report.ok(), "{report}");
}
