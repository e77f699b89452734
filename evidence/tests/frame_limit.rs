//! No writer emits a frame a reader would refuse: an oversized record (issue 10,
//! failure 2: a 20 MB sensor id in an alarm) is an error, and the chain stays readable.

use conduit_evidence::chain::verify::verify_dir;
use conduit_evidence::chain::{Recorder, RecorderOptions};
use conduit_evidence::spool::frame::MAX_RECORD_LEN;
use conduit_proto::v1::{self, RecordKind, record::Body};

fn alarm(detail: String) -> v1::Record {
    v1::Record {
        kind: RecordKind::Alarm as i32,
        body: Some(Body::Alarm(v1::Alarm {
            kind: "identity".to_owned(),
            detail,
            ..Default::default()
        })),
        ..Default::default()
    }
}

#[test]
fn oversized_record_is_refused_and_the_chain_stays_readable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut rec, _) = Recorder::open(RecorderOptions::new(dir.path(), "collector")).expect("open");
    rec.append(alarm("small".to_owned())).expect("small alarm");
    let err = rec
        .append(alarm("x".repeat(MAX_RECORD_LEN + 1)))
        .expect_err("a record over the frame limit must be refused");
    assert!(err.to_string().contains("frame limit"), "{err}");
    rec.append(alarm("after".to_owned())).expect("append after");
    rec.sync().expect("sync");
    drop(rec);
    let report = verify_dir(dir.path(), None);
    assert!(report.ok(), "{report}");
}
