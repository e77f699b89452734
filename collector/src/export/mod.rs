//! SIEM exports. Each export follows the store's chains with its own durable cursor
//! (`<store>/exports/<name>.cursor`, one `sensor_id seq` line per chain) and advances
//! it only after the target took the records: an outage delays, never loses
//! (at-least-once; NATS de-duplicates with `Nats-Msg-Id`).

pub mod jsonl;
pub mod nats;
pub mod syslog;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use conduit_evidence::ecs::{ChainPosition, ecs_json};
use conduit_evidence::spool::{SpoolReader, StoredFrame};
use conduit_proto::v1;
use prost::Message as _;
use tokio::sync::watch;

use crate::server::Shared;
use crate::store::{EXPORTS_DIR, chain_dirs};

const BATCH_FRAMES: usize = 1000;
const BATCH_BYTES: usize = 4 << 20;
/// Longest wait before a failed chain is exported again.
const MAX_RETRY: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{0}")]
    Config(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Target(String),
}

/// One stored record, decoded, with its chain position.
#[derive(Debug, Clone)]
pub struct Item {
    /// Store directory name: the sensor id (or `_collector` for alarms).
    pub chain: String,
    pub pos: ChainPosition,
    pub record: v1::Record,
}

impl Item {
    /// The item of a stored frame of `chain` whose record decoded as `record`.
    pub fn new(chain: &str, frame: &StoredFrame, record: v1::Record) -> Item {
        Item {
            chain: chain.to_owned(),
            pos: ChainPosition {
                seq: frame.seq,
                hash: frame.hash,
                prev_hash: frame.prev_hash,
            },
            record,
        }
    }

    pub fn ecs(&self) -> serde_json::Value {
        ecs_json(&self.record, &self.pos)
    }

    /// The record as `format` has it.
    pub fn render(&self, format: Format) -> serde_json::Value {
        match format {
            Format::Ecs => self.ecs(),
            Format::Ocsf => conduit_evidence::ocsf::ocsf_json(&self.record, &self.pos),
        }
    }

    pub fn action(&self) -> &'static str {
        conduit_evidence::ecs::action_name(
            v1::RecordKind::try_from(self.record.kind).unwrap_or(v1::RecordKind::Unspecified),
        )
    }

    /// The sensor the record is about (the record's own id; the alarm chain's
    /// records name `collector`).
    pub fn sensor(&self) -> &str {
        if self.record.sensor_id.is_empty() {
            &self.chain
        } else {
            &self.record.sensor_id
        }
    }
}

/// The shape of the JSON the JSON-lines and NATS exports write: the ECS line of the
/// contract (default), or OCSF (Network Activity 4001 for flows; docs/siem.md).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    #[default]
    Ecs,
    Ocsf,
}

/// Which records a SIEM export sends. The evidence is every record (the store, the
/// JSON-lines file); a SIEM wants the events: flows, loss, policy changes, alarms,
/// chain restarts and spool recoveries. Checkpoints (each chain's signed heartbeat,
/// every 10 s) would be a third of the messages and carry nothing to detect on;
/// `--export-heartbeats` sends them too.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Selection {
    pub heartbeats: bool,
}

impl Selection {
    pub fn selects(&self, record: &v1::Record) -> bool {
        self.heartbeats || record.kind != v1::RecordKind::Checkpoint as i32
    }
}

/// A SIEM target. `send` returns only when the target has the records (as far as
/// its protocol can tell); on error the same items are sent again later.
pub trait Sink: Send {
    fn name(&self) -> &str;
    fn send(
        &mut self,
        items: &[Item],
    ) -> impl std::future::Future<Output = Result<(), ExportError>> + Send;
}

/// Durable per-chain cursor: the last exported seq.
pub struct Cursor {
    path: PathBuf,
    pub seqs: BTreeMap<String, u64>,
}

impl Cursor {
    pub fn load(store: &Path, name: &str) -> Result<Cursor, ExportError> {
        let dir = store.join(EXPORTS_DIR);
        fs::create_dir_all(&dir).map_err(|e| ExportError::Io {
            what: dir.display().to_string(),
            source: e,
        })?;
        let path = dir.join(format!("{name}.cursor"));
        let mut seqs = BTreeMap::new();
        if let Ok(text) = fs::read_to_string(&path) {
            for line in text.lines() {
                if let Some((id, seq)) = line.split_once(' ')
                    && let Ok(seq) = seq.trim().parse()
                {
                    seqs.insert(id.to_owned(), seq);
                }
            }
        }
        Ok(Cursor { path, seqs })
    }

    /// Writes the cursor atomically and durably.
    pub fn save(&self) -> Result<(), ExportError> {
        let io = |e| ExportError::Io {
            what: self.path.display().to_string(),
            source: e,
        };
        let tmp = self.path.with_extension("cursor.tmp");
        let mut text = String::new();
        for (id, seq) in &self.seqs {
            text.push_str(&format!("{id} {seq}\n"));
        }
        let mut f = fs::File::create(&tmp).map_err(io)?;
        f.write_all(text.as_bytes()).map_err(io)?;
        f.sync_data().map_err(io)?;
        fs::rename(&tmp, &self.path).map_err(io)?;
        Ok(())
    }
}

/// Sends one fetch of the JetStream chains: Some(messages handled), None at
/// shutdown; a failed send is delivered again later (to any collector).
async fn export_feed<S: Sink>(
    sink: &mut S,
    selection: Selection,
    feed: &crate::jetstream::ExportFeed,
    shutdown: &mut watch::Receiver<bool>,
    metrics: &crate::metrics::Metrics,
) -> Result<Option<usize>, ExportError> {
    let target = |e: crate::jetstream::JetError| ExportError::Target(e.to_string());
    let fetched = feed
        .fetch(crate::jetstream::EXPORT_FETCH)
        .await
        .map_err(target)?;
    tracing::debug!(
        export = sink.name(),
        messages = fetched.messages.len(),
        records = fetched.records.len(),
        "fetched from JetStream"
    );
    if fetched.messages.is_empty() {
        return Ok(Some(0));
    }
    let mut last: BTreeMap<&str, u64> = BTreeMap::new();
    let items: Vec<Item> = fetched
        .records
        .iter()
        .filter(|(_, _, r)| selection.selects(r))
        .map(|(sensor, f, r)| {
            let hash = |b: &[u8]| b.try_into().unwrap_or([0; 32]);
            Item {
                chain: sensor.clone(),
                pos: ChainPosition {
                    seq: f.seq,
                    hash: hash(&f.hash),
                    prev_hash: hash(&f.prev_hash),
                },
                record: r.clone(),
            }
        })
        .collect();
    for (sensor, f, _) in &fetched.records {
        let seq = last.entry(sensor).or_default();
        *seq = (*seq).max(f.seq);
    }
    let sent = tokio::select! {
        r = async { if items.is_empty() { Ok(()) } else { sink.send(&items).await } } => r,
        _ = shutdown.changed() => return Ok(None),
    };
    tracing::debug!(
        export = sink.name(),
        ok = sent.is_ok(),
        "sent the records from JetStream"
    );
    if let Err(e) = sent {
        feed.retry(&fetched.messages, Duration::from_secs(1)).await;
        return Err(e);
    }
    feed.done(&fetched.messages).await.map_err(target)?;
    tracing::debug!(export = sink.name(), "acknowledged to JetStream");
    for (sensor, seq) in last {
        metrics.exported(sink.name(), sensor, seq);
    }
    Ok(Some(fetched.messages.len()))
}

/// [`run`], with its end logged when it is an error (the collector reports it only
/// at shutdown; the export must not stop unnoticed before).
pub async fn run_logged<S: Sink>(
    sink: S,
    selection: Selection,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), ExportError> {
    let name = sink.name().to_owned();
    let r = run(sink, selection, shared, shutdown).await;
    if let Err(e) = &r {
        tracing::error!(export = %name, error = %e, "export stopped");
    }
    r
}

/// Runs one export of the records `selection` picks until shutdown (its cursor
/// passes the others).
pub async fn run<S: Sink>(
    mut sink: S,
    selection: Selection,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ExportError> {
    let store = shared.opts.store.clone();
    let mut cursor = Cursor::load(&store, sink.name())?;
    let metrics = &shared.alarms.metrics;
    metrics.export_started(sink.name());
    for (chain, seq) in &cursor.seqs {
        metrics.exported(sink.name(), chain, *seq);
    }
    // With JetStream, the sensors' chains come from the cluster (the store keeps
    // only this collector's alarm chain), through a consumer made on first use.
    let mut feed: Option<crate::jetstream::ExportFeed> = None;
    let mut feed_delay = Duration::from_millis(100);
    let mut readers: BTreeMap<String, SpoolReader> = BTreeMap::new();
    let mut frames = Vec::new();
    // Chains whose last send failed: when to try again, and the next delay. A
    // failing chain waits alone; the others go on.
    let mut backoff: HashMap<String, (Instant, Duration)> = HashMap::new();
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        // Register interest before looking, so a commit in between is not missed.
        let notified = shared.committed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let mut progressed = false;
        let dirs = chain_dirs(&store).unwrap_or_default();
        for (chain, dir) in dirs {
            if backoff
                .get(&chain)
                .is_some_and(|(at, _)| Instant::now() < *at)
            {
                continue;
            }
            let reader = readers.entry(chain.clone()).or_insert_with(|| {
                SpoolReader::follow(dir, cursor.seqs.get(&chain).copied().unwrap_or(0) + 1)
            });
            frames.clear();
            if let Err(e) = reader.poll(BATCH_FRAMES, BATCH_BYTES, &mut frames) {
                tracing::error!(export = sink.name(), chain = %chain, error = %e, "cannot read the store");
                readers.remove(&chain);
                continue;
            }
            let Some(last) = frames.last().map(|f| f.seq) else {
                continue;
            };
            let items: Vec<Item> = frames
                .iter()
                .filter_map(|f| {
                    let record = v1::Record::decode(&f.record_bytes[..]).ok()?;
                    selection
                        .selects(&record)
                        .then(|| Item::new(&chain, f, record))
                })
                .collect();
            let sent = tokio::select! {
                r = async { if items.is_empty() { Ok(()) } else { sink.send(&items).await } } => r,
                _ = shutdown.changed() => return Ok(()),
            };
            if let Err(e) = sent {
                let delay = backoff
                    .get(&chain)
                    .map_or(Duration::from_millis(100), |(_, d)| (*d * 2).min(MAX_RETRY));
                tracing::warn!(export = sink.name(), chain = %chain, error = %e,
                    retry_ms = delay.as_millis() as u64,
                    "export of this chain failed; its records wait in the store, other chains go on");
                backoff.insert(chain.clone(), (Instant::now() + delay, delay));
                // Read the same records again on the retry.
                readers.remove(&chain);
                continue;
            }
            backoff.remove(&chain);
            cursor.seqs.insert(chain.clone(), last);
            cursor.save()?;
            metrics.exported(sink.name(), &chain, last);
            progressed = true;
        }
        if let Some(js) = &shared.opts.jetstream {
            let fed = match &feed {
                Some(f) => export_feed(&mut sink, selection, f, &mut shutdown, metrics).await,
                None => match js.export_feed(sink.name()).await {
                    Ok(f) => {
                        feed = Some(f);
                        Ok(Some(0))
                    }
                    Err(e) => Err(ExportError::Target(e.to_string())),
                },
            };
            match fed {
                Ok(Some(n)) => {
                    progressed |= n > 0;
                    feed_delay = Duration::from_millis(100);
                }
                Ok(None) => return Ok(()),
                Err(e) => {
                    tracing::warn!(export = sink.name(), error = %e, retry_ms = feed_delay.as_millis() as u64,
                        "export of the JetStream chains failed; their records wait in the cluster");
                    tokio::select! {
                        _ = tokio::time::sleep(feed_delay) => {}
                        _ = shutdown.changed() => return Ok(()),
                    }
                    feed_delay = (feed_delay * 2).min(MAX_RETRY);
                }
            }
        }
        if !progressed {
            // With JetStream, the fetch itself waited for new records.
            let idle = if shared.opts.jetstream.is_some() {
                Duration::ZERO
            } else {
                Duration::from_secs(1)
            };
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep(idle) => {}
                _ = shutdown.changed() => return Ok(()),
            }
        }
    }
}
