//! `--jsonl FILE`: one JSON line per record (ECS, or OCSF with `--format ocsf`),
//! fsynced before the cursor moves.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::PathBuf;

use super::{ExportError, Format, Item, Sink};

pub struct JsonlSink {
    path: PathBuf,
    format: Format,
    file: Option<File>,
    buf: Vec<u8>,
}

impl JsonlSink {
    pub fn new(path: PathBuf, format: Format) -> JsonlSink {
        JsonlSink {
            path,
            format,
            file: None,
            buf: Vec::new(),
        }
    }

    fn write(&mut self, items: &[Item]) -> Result<(), ExportError> {
        let io = |e| ExportError::Io {
            what: self.path.display().to_string(),
            source: e,
        };
        self.buf.clear();
        for item in items {
            serde_json::to_writer(&mut self.buf, &item.render(self.format))
                .map_err(|e| ExportError::Target(e.to_string()))?;
            self.buf.push(b'\n');
        }
        if self.file.is_none() {
            self.file = Some(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.path)
                    .map_err(io)?,
            );
        }
        let Some(f) = self.file.as_mut() else {
            return Ok(());
        };
        let r = f.write_all(&self.buf).and_then(|()| f.sync_data());
        if let Err(e) = r {
            // Reopen next time (the file may have been rotated away).
            self.file = None;
            return Err(io(e));
        }
        Ok(())
    }
}

impl Sink for JsonlSink {
    fn name(&self) -> &str {
        "jsonl"
    }

    async fn send(&mut self, items: &[Item]) -> Result<(), ExportError> {
        tokio::task::block_in_place(|| self.write(items))
    }
}
