//! The JSON-lines mirror of the chain (`--jsonl`). The live agent writes it in
//! place; `replay`, bound by time, hands each batch to a thread of its own, so
//! building and encoding the ECS JSON (a fifth of a replay's CPU) runs beside the
//! test runs on another core. Both write the same bytes in the same order.

use std::{
    fs::File,
    io::{self, BufWriter, Write as _},
    sync::mpsc::{SyncSender, sync_channel},
    thread::JoinHandle,
};

use conduit_evidence::chain::Appended;
use conduit_evidence::ecs::{ChainPosition, ecs_json};

/// Batches in flight to the writer thread before the sender waits.
const QUEUE: usize = 64;

/// Where the JSON lines go.
pub enum JsonlOut {
    /// Written by the caller, flushed after each batch (tail -f sees a step at once).
    Inline(BufWriter<File>),
    /// Written by a thread, flushed when its buffer fills and at the end.
    Thread(JsonlThread),
}

impl JsonlOut {
    /// Writes one batch of chained records.
    pub fn write(&mut self, written: Vec<Appended>) -> io::Result<()> {
        match self {
            JsonlOut::Inline(out) => {
                write_records(out, &written)?;
                out.flush()
            }
            JsonlOut::Thread(t) => t.send(written),
        }
    }

    /// Everything written reaches the disk (flush, fsync); a thread is joined
    /// and reports the first error it met.
    pub fn finish(&mut self) -> io::Result<()> {
        match self {
            JsonlOut::Inline(out) => out.flush().and_then(|()| out.get_ref().sync_all()),
            JsonlOut::Thread(t) => t.finish(),
        }
    }
}

/// A writer thread for the JSON lines.
pub struct JsonlThread {
    tx: Option<SyncSender<Vec<Appended>>>,
    handle: Option<JoinHandle<io::Result<()>>>,
}

impl JsonlThread {
    pub fn spawn(mut out: BufWriter<File>) -> io::Result<JsonlThread> {
        let (tx, rx) = sync_channel::<Vec<Appended>>(QUEUE);
        let handle = std::thread::Builder::new()
            .name("jsonl".into())
            .spawn(move || {
                for batch in rx {
                    write_records(&mut out, &batch)?;
                }
                out.flush()?;
                out.get_ref().sync_all()
            })?;
        Ok(JsonlThread {
            tx: Some(tx),
            handle: Some(handle),
        })
    }

    fn send(&mut self, written: Vec<Appended>) -> io::Result<()> {
        let sent = self.tx.as_ref().map(|tx| tx.send(written).is_ok());
        if sent == Some(true) {
            return Ok(());
        }
        // The thread stopped (a write failed): its error says why.
        self.finish().and(Err(io::Error::other(
            "the JSON-lines writer thread stopped",
        )))
    }

    fn finish(&mut self) -> io::Result<()> {
        self.tx = None;
        match self.handle.take() {
            Some(h) => h
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("the JSON-lines writer thread panicked"))),
            None => Ok(()),
        }
    }
}

impl Drop for JsonlThread {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// One line per record: its ECS JSON with its place in the chain.
fn write_records(out: &mut BufWriter<File>, written: &[Appended]) -> io::Result<()> {
    for a in written {
        let pos = ChainPosition {
            seq: a.seq,
            hash: a.hash,
            prev_hash: a.prev_hash,
        };
        serde_json::to_writer(&mut *out, &ecs_json(&a.record, &pos))?;
        out.write_all(b"\n")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![expect(clippy::unwrap_used, reason = "tests")]

    use conduit_proto::v1::{Loss, Record, RecordKind, record::Body};

    use super::*;

    fn batch(from: u64, n: u64) -> Vec<Appended> {
        (from..from + n)
            .map(|seq| Appended {
                seq,
                prev_hash: [seq as u8; 32],
                hash: [(seq as u8).wrapping_add(1); 32],
                record: Record {
                    kind: RecordKind::Loss as i32,
                    site: "s".into(),
                    body: Some(Body::Loss(Loss {
                        reason: format!("r{seq}"),
                        count: seq,
                        ..Loss::default()
                    })),
                    ..Record::default()
                },
                record_bytes: Vec::new(),
            })
            .collect()
    }

    fn write_all(out: &mut JsonlOut) {
        for i in 0..50 {
            out.write(batch(i * 7, 7)).unwrap();
        }
        out.finish().unwrap();
    }

    #[test]
    fn thread_writes_what_inline_writes() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("inline"), dir.path().join("thread"));
        write_all(&mut JsonlOut::Inline(BufWriter::new(
            File::create(&a).unwrap(),
        )));
        let t = JsonlThread::spawn(BufWriter::new(File::create(&b).unwrap())).unwrap();
        write_all(&mut JsonlOut::Thread(t));
        let (a, b) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
        assert_eq!(a, b);
        assert_eq!(a.iter().filter(|&&c| c == b'\n').count(), 350);
        assert!(String::from_utf8(a).unwrap().contains("\"r349\""));
    }

    #[test]
    fn a_failed_write_is_reported_not_lost() {
        // /dev/full: every write fails with ENOSPC.
        let Ok(full) = File::options().write(true).open("/dev/full") else {
            return;
        };
        let mut out = JsonlOut::Thread(JsonlThread::spawn(BufWriter::new(full)).unwrap());
        let mut failed = false;
        for i in 0..10_000 {
            if out.write(batch(i, 1)).is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed || out.finish().is_err());
    }
}
