//! `--jetstream URL`: sensor chains kept in NATS JetStream, so that several collectors
//! serve the same sensors (DESIGN "Scale"). Per site:
//! - the stream `CONDUIT_CHAIN_<SITE>`, subject `conduit_chain.<site>.<sensor>` per
//!   sensor (a `.` in the id is written `=`), one message per verified run of frames:
//!   a `Batch` with those frames and the gap declaration they follow, if any;
//! - the key-value bucket `conduit_heads_<site>`: per sensor its pinned key and the
//!   head (seq, hash, and the stream sequence of the message that holds it).
//!
//! No chain forks and nothing is stored twice, however collectors race:
//! - every publish carries `Nats-Expected-Last-Subject-Sequence`: the stream refuses
//!   it unless the sensor's subject still ends where this collector read its head;
//! - `Nats-Msg-Id` `<sensor>:<first>-<last>` makes a re-publish a no-op (duplicate
//!   window);
//! - the bucket's head moves by compare-and-set on its revision, after the PubAck.
//!
//! A collector acknowledges to the sensor only after both. The stream is the truth:
//! a head that lags it (a collector died between PubAck and compare-and-set) is
//! rolled forward from the sensor's last message when it is next read.

use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use conduit_evidence::chain::ZERO_HASH;
use conduit_evidence::chain::cosignature::Cosignature;
use conduit_evidence::chain::declared_gap::DeclaredGap;
use conduit_evidence::chain::verify::{ChainVerifier, Report};
use conduit_proto::v1;
use prost::Message as _;
use serde::{Deserialize, Serialize};
use tokio_stream::StreamExt as _;

use crate::alarms::ALARM_SENSOR_ID;
use crate::export::nats::canonical_site;
use crate::store::ALARM_DIR;
use conduit_evidence::spool::SpoolReader;

/// Subject prefix of the chains' messages.
const CHAIN: &str = "conduit_chain";
/// Subject prefix of the collectors' cosignatures (a line of `witness.cosig` each).
const WITNESS: &str = "conduit_witness";
/// Subject prefix of the collectors' own alarm chains: `conduit_alarm.<site>.<key
/// hex>`, one per collector, named by the public key that signs it. Sensor chains
/// live under [`CHAIN`], so no sensor id can reach these subjects.
const ALARMS: &str = "conduit_alarm";
/// Replicas of the stream and the bucket on a cluster (R3); a single server gets 1.
const CLUSTER_REPLICAS: usize = 3;
/// Room left under the server's max_payload for headers and the Batch's framing.
const PAYLOAD_MARGIN: usize = 4096;
/// How long a publish or a bucket operation may take (a cluster electing a leader).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests asked again after a timeout while a stream elects a leader.
const ELECTION_RETRIES: u32 = 3;
/// Bytes a stream reader's pull asks for at most (at least one message's worth).
const PULL_BYTES: usize = 16 << 20;
/// Messages a stream reader's pull asks for at most.
const READER_BATCH: usize = 256;
/// How often a stream reader starts again (a lost message, a failed consumer) before
/// it gives up.
const READER_RESTARTS: u32 = 5;
/// How long a collector waits for a cluster that cannot place the replicas yet (a
/// meta leader that has not heard from every peer answers "no suitable peers").
const PLACEMENT_WAIT: Duration = Duration::from_secs(120);
/// The first nats-server release with `sync_interval: always`: without it a server
/// acknowledges a message before it is on disk (fsync every 2 minutes by default),
/// so a cluster-wide power loss can take acknowledged records (docs/jetstream.md).
pub const SYNC_ALWAYS_SINCE: (u64, u64, u64) = (2, 10, 0);
/// The first nats-server release whose new stream leader applies its whole log before
/// it answers (nats-server PRs 6485, 6486): before it, a publish retried right after a
/// leader change can pass the `Nats-Msg-Id` check and be stored twice.
pub const DEDUPE_ACROSS_LEADERS_SINCE: (u64, u64, u64) = (2, 11, 0);

/// `major.minor.patch` of a nats-server version string (`2.10.27`, `v2.11.0-RC.1`).
pub fn nats_version(s: &str) -> Option<(u64, u64, u64)> {
    let s = s.trim().trim_start_matches('v');
    let core = s.split(['-', '+', ' ']).next()?;
    let mut parts = core.split('.').map(|p| p.parse::<u64>().ok());
    Some((
        parts.next()??,
        parts.next()??,
        parts.next().flatten().unwrap_or(0),
    ))
}

#[derive(Debug, thiserror::Error)]
pub enum JetError {
    #[error("NATS {what}: {detail}")]
    Nats { what: &'static str, detail: String },
    /// Another collector stored this sensor's records since its head was read.
    #[error("another collector advanced the chain of sensor {0:?}")]
    Conflict(String),
    #[error("stored head of sensor {sensor:?}: {detail}")]
    Corrupt { sensor: String, detail: String },
    #[error(
        "one frame of {bytes} bytes does not fit the NATS server's max_payload ({max} bytes); raise max_payload"
    )]
    TooLarge { bytes: usize, max: usize },
}

fn nats(what: &'static str) -> impl FnOnce(String) -> JetError {
    move |detail| JetError::Nats { what, detail }
}

/// One sensor's head as the cluster stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub key: [u8; 32],
    pub seq: u64,
    pub hash: [u8; 32],
    /// Stream sequence of the sensor's last message (0: none yet).
    pub stream_seq: u64,
    /// Revision of the sensor's entry in the bucket.
    pub revision: u64,
    /// Seq and hash of the frames of the sensor's last message, oldest first, so a
    /// re-sent frame is recognized without reading the stream.
    pub recent: Vec<(u64, [u8; 32])>,
    /// The last cosignature a collector stored for the sensor.
    pub witnessed: Option<Cosignature>,
}

/// The bucket's value: hex, so an operator can read it with `nats kv get`.
#[derive(Debug, Serialize, Deserialize)]
struct HeadValue {
    key: String,
    seq: u64,
    hash: String,
    stream_seq: u64,
}

/// What a verified batch adds to the chain, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Pending {
    Gap(v1::GapDeclaration),
    Frame(v1::Frame),
}

/// A site's chains in JetStream.
pub struct JetChains {
    js: jetstream::Context,
    stream: stream::Stream,
    heads: kv::Store,
    site: String,
    max_payload: usize,
}

/// Creates (or binds) a stream with [`CLUSTER_REPLICAS`] replicas, or one on a
/// server that is not part of a cluster; returns it and its replica count.
pub async fn create_replicated(
    js: &jetstream::Context,
    mut config: stream::Config,
) -> Result<(stream::Stream, usize), JetError> {
    let name = config.name.clone();
    let failed = |e: jetstream::context::CreateStreamError| nats("stream")(format!("{name}: {e}"));
    config.num_replicas = CLUSTER_REPLICAS;
    // A stream whose leader was on a node that just died answers nothing until its
    // replicas elect another (seconds): a timed-out request is asked again. A cluster
    // that just started may not know its peers yet: waited for, with backoff.
    let mut attempts = 0;
    let placement_deadline = tokio::time::Instant::now() + PLACEMENT_WAIT;
    let mut backoff = Duration::from_millis(200);
    let first = loop {
        match js.get_or_create_stream(config.clone()).await {
            Err(e)
                if e.kind() == jetstream::context::CreateStreamErrorKind::TimedOut
                    && attempts < ELECTION_RETRIES =>
            {
                attempts += 1;
                tracing::warn!(stream = %name, attempt = attempts, "no answer (a leader election?): asking again");
            }
            Err(e)
                if matches!(e.kind(), jetstream::context::CreateStreamErrorKind::JetStream(j)
                    if [jetstream::ErrorCode::CLUSTER_NO_PEERS, jetstream::ErrorCode::INSUFFICIENT_RESOURCES]
                        .contains(&j.error_code()))
                    && tokio::time::Instant::now() < placement_deadline =>
            {
                tracing::warn!(stream = %name, error = %e, retry_in = ?backoff, "the cluster cannot place the replicas yet: waiting");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            r => break r,
        }
    };
    match first {
        Ok(s) => Ok((s, CLUSTER_REPLICAS)),
        Err(e)
            if matches!(e.kind(), jetstream::context::CreateStreamErrorKind::JetStream(j)
                if j.error_code() == jetstream::ErrorCode::STREAM_REPLICAS_NOT_SUPPORTED) =>
        {
            tracing::warn!(stream = %name, "NATS is a single server, not a cluster: one replica");
            config.num_replicas = 1;
            let s = js.get_or_create_stream(config).await.map_err(failed)?;
            Ok((s, 1))
        }
        Err(e) => Err(failed(e)),
    }
}

/// Reads one subject prefix of a site's stream in order, through an ephemeral pull
/// consumer without acks whose pulls are bounded in bytes ([`JetChains::pull_bytes`]).
/// Ends at the message that had nothing pending after it. A skipped consumer
/// sequence (a message lost to the client) or a failed consumer makes it start again
/// from the stream sequence after the last one returned, so nothing is skipped and
/// nothing returned twice.
struct Reader<'a> {
    chains: &'a JetChains,
    filter: String,
    token_at: String,
    /// The stream sequence to start from when (re)creating the consumer.
    next_seq: u64,
    messages: Option<jetstream::consumer::pull::Stream>,
    /// The consumer sequence of the last message returned by the current consumer.
    consumer_seq: u64,
    done: bool,
    restarts: u32,
}

impl Reader<'_> {
    /// The next (stream sequence, sensor id or alarm key, payload), or None at the end.
    async fn next(&mut self) -> Result<Option<(u64, String, bytes::Bytes)>, JetError> {
        loop {
            if self.done {
                return Ok(None);
            }
            let Some(messages) = self.messages.as_mut() else {
                self.start().await?;
                continue;
            };
            let m = match messages.next().await {
                Some(Ok(m)) => m,
                failed => {
                    let e = failed.map_or("the consumer ended".to_owned(), |r| {
                        r.err().map(|e| e.to_string()).unwrap_or_default()
                    });
                    self.restart(e)?;
                    continue;
                }
            };
            let info = m.info().map_err(|e| nats("read")(e.to_string()))?;
            if info.consumer_sequence != self.consumer_seq + 1 {
                let e = format!(
                    "consumer sequence {} after {}",
                    info.consumer_sequence, self.consumer_seq
                );
                self.restart(e)?;
                continue;
            }
            self.consumer_seq = info.consumer_sequence;
            self.next_seq = info.stream_sequence + 1;
            self.done = info.pending == 0;
            if let Some(token) = m.subject.as_str().strip_prefix(&self.token_at) {
                return Ok(Some((
                    info.stream_sequence,
                    sensor_from_token(token),
                    m.payload.clone(),
                )));
            }
        }
    }

    fn restart(&mut self, why: String) -> Result<(), JetError> {
        self.restarts += 1;
        if self.restarts > READER_RESTARTS {
            return Err(nats("read")(format!("{}: {why}", self.filter)));
        }
        tracing::warn!(filter = %self.filter, from = self.next_seq, %why, "stream reader: starting again");
        self.messages = None;
        Ok(())
    }

    /// A consumer from `next_seq` on. A cluster that just lost a node may be electing
    /// its meta leader: creating it is retried for a while.
    async fn start(&mut self) -> Result<(), JetError> {
        let config = jetstream::consumer::pull::Config {
            filter_subject: self.filter.clone(),
            deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence {
                start_sequence: self.next_seq,
            },
            ack_policy: jetstream::consumer::AckPolicy::None,
            inactive_threshold: Duration::from_secs(60),
            num_replicas: 1,
            memory_storage: true,
            ..Default::default()
        };
        let mut attempts = 0;
        let consumer = loop {
            match self.chains.stream.create_consumer(config.clone()).await {
                Ok(c) => break c,
                Err(e) if attempts < ELECTION_RETRIES => {
                    attempts += 1;
                    tracing::warn!(error = %e, attempt = attempts, "creating the stream reader: retrying");
                }
                Err(e) => return Err(nats("consumer")(e.to_string())),
            }
        };
        self.consumer_seq = 0;
        if consumer.cached_info().num_pending == 0 {
            self.done = true;
            return Ok(());
        }
        let messages = consumer
            .stream()
            .max_messages_per_batch(READER_BATCH)
            .max_bytes_per_batch(self.chains.pull_bytes())
            .messages()
            .await
            .map_err(|e| nats("consumer")(e.to_string()))?;
        self.messages = Some(messages);
        Ok(())
    }
}

impl std::fmt::Debug for JetChains {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetChains")
            .field("site", &self.site)
            .field("max_payload", &self.max_payload)
            .finish_non_exhaustive()
    }
}

pub fn stream_name(site: &str) -> String {
    format!("CONDUIT_CHAIN_{}", site.to_ascii_uppercase())
}

pub fn bucket_name(site: &str) -> String {
    format!("conduit_heads_{site}")
}

/// The sensor's subject token and bucket key: sensor ids are `[A-Za-z0-9._-]`, and a
/// `.` would split a subject token, so it is written `=` (which ids never contain).
pub fn sensor_token(sensor_id: &str) -> String {
    sensor_id.replace('.', "=")
}

fn sensor_from_token(token: &str) -> String {
    token.replace('=', ".")
}

impl JetChains {
    /// Connects (`url` may list several servers, comma-separated; a cluster also
    /// tells the client its other members) and creates the site's stream and bucket
    /// if missing (R3 when the server is part of a cluster).
    pub async fn connect(
        url: &str,
        site: &str,
        tls: &crate::nats_client::NatsTls,
    ) -> Result<JetChains, JetError> {
        let site = canonical_site(site);
        let servers: Vec<&str> = url.split(',').map(str::trim).collect();
        let client = tls
            .options("conduit-collector", url)
            .connect(servers)
            .await
            .map_err(|e| nats("connect")(format!("{}: {e}", crate::nats_client::redact(url))))?;
        // Connected: the server's INFO is known.
        let max_payload = client.server_info().max_payload;
        let version = client.server_info().version;
        if nats_version(&version).is_none_or(|v| v < SYNC_ALWAYS_SINCE) {
            tracing::warn!(
                %version,
                "nats-server before 2.10 cannot sync_interval: always: records it acknowledged can be lost if every node loses power at once (docs/jetstream.md)"
            );
        }
        let mut js = jetstream::new(client);
        js.set_timeout(REQUEST_TIMEOUT);
        let chains = stream::Config {
            name: stream_name(&site),
            description: Some(format!("Conduit Sensor chains of site {site}")),
            subjects: vec![
                format!("{CHAIN}.{site}.>"),
                format!("{WITNESS}.{site}.>"),
                format!("{ALARMS}.{site}.>"),
            ],
            storage: stream::StorageType::File,
            // Evidence: nothing expires or is discarded by the stream itself.
            retention: stream::RetentionPolicy::Limits,
            discard: stream::DiscardPolicy::New,
            duplicate_window: Duration::from_secs(120),
            allow_direct: true,
            ..Default::default()
        };
        // The heads: a key-value bucket as JetStream lays one out (stream
        // KV_<bucket>, one message per key). Made here rather than with
        // create_key_value, which needs an account-info reply that nats-server 2.9
        // (Debian bookworm's) words differently from what async-nats parses.
        let bucket = bucket_name(&site);
        let heads = stream::Config {
            name: format!("KV_{bucket}"),
            description: Some(format!("Conduit Sensor chain heads of site {site}")),
            subjects: vec![format!("$KV.{bucket}.>")],
            max_messages_per_subject: 1,
            storage: stream::StorageType::File,
            discard: stream::DiscardPolicy::New,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        };
        let subjects = chains.subjects.clone();
        let (mut stream, replicas) = create_replicated(&js, chains).await?;
        // A stream made by an older collector lacks the alarm subjects: add them.
        let config = stream.cached_info().config.clone();
        if let Some(missing) = subjects.iter().find(|s| !config.subjects.contains(s)) {
            tracing::info!(stream = %config.name, subject = %missing, "adding subjects to the stream");
            let mut config = config;
            for s in &subjects {
                if !config.subjects.contains(s) {
                    config.subjects.push(s.clone());
                }
            }
            js.update_stream(&config)
                .await
                .map_err(|e| nats("stream update")(format!("{}: {e}", config.name)))?;
            stream = js
                .get_stream(&config.name)
                .await
                .map_err(|e| nats("stream")(format!("{}: {e}", config.name)))?;
        }
        create_replicated(&js, heads).await?;
        let heads = js
            .get_key_value(&bucket)
            .await
            .map_err(|e| nats("key-value bucket")(format!("{bucket}: {e}")))?;
        let url = crate::nats_client::redact(url);
        tracing::info!(%url, site = %site, replicas, max_payload, "JetStream chains ready");
        Ok(JetChains {
            js,
            stream,
            heads,
            site,
            max_payload,
        })
    }

    pub fn site(&self) -> &str {
        &self.site
    }

    fn subject(&self, sensor_id: &str) -> String {
        format!("{CHAIN}.{}.{}", self.site, sensor_token(sensor_id))
    }

    fn witness_subject(&self, sensor_id: &str) -> String {
        format!("{WITNESS}.{}.{}", self.site, sensor_token(sensor_id))
    }

    /// The last cosignature stored for a sensor.
    async fn last_cosignature(&self, sensor_id: &str) -> Result<Option<Cosignature>, JetError> {
        match self
            .stream
            .get_last_raw_message_by_subject(&self.witness_subject(sensor_id))
            .await
        {
            Ok(m) => Cosignature::parse_line(&String::from_utf8_lossy(&m.payload))
                .map(Some)
                .map_err(|e| JetError::Corrupt {
                    sensor: sensor_id.to_owned(),
                    detail: format!("cosignature at stream message {}: {e}", m.sequence),
                }),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(nats("last cosignature")(e.to_string())),
        }
    }

    /// Stores a cosignature this collector made for a sensor's durable head.
    pub async fn publish_cosignature(
        &self,
        sensor_id: &str,
        c: &Cosignature,
    ) -> Result<(), JetError> {
        self.js
            .publish(self.witness_subject(sensor_id), c.to_line().into())
            .await
            .map_err(|e| nats("publish cosignature")(e.to_string()))?
            .await
            .map_err(|e| nats("cosignature ack")(e.to_string()))?;
        Ok(())
    }

    /// A reader of every message under `prefix` of this site, in stream order.
    fn reader(&self, prefix: &str) -> Reader<'_> {
        Reader {
            chains: self,
            filter: format!("{prefix}.{}.>", self.site),
            token_at: format!("{prefix}.{}.", self.site),
            next_seq: 1,
            messages: None,
            consumer_seq: 0,
            done: false,
            restarts: 0,
        }
    }

    /// Bytes a pull may ask for: a bound well under the server's slow-consumer limit
    /// (64 MiB pending per client by default; an unbounded pull of 500 large batches
    /// exceeded it and the server dropped the reader's messages), yet room for one
    /// message of `max_payload`.
    fn pull_bytes(&self) -> usize {
        PULL_BYTES.max(self.max_payload + PAYLOAD_MARGIN)
    }

    /// The sensor's head, rolled forward to the stream's last message if the bucket
    /// lags it. None: the cluster does not know the sensor (no key pinned).
    pub async fn head(&self, sensor_id: &str) -> Result<Option<Head>, JetError> {
        let corrupt = |detail: String| JetError::Corrupt {
            sensor: sensor_id.to_owned(),
            detail,
        };
        let Some(entry) = self
            .heads
            .entry(sensor_token(sensor_id))
            .await
            .map_err(|e| nats("head")(e.to_string()))?
        else {
            return Ok(None);
        };
        if entry.operation != kv::Operation::Put {
            return Ok(None);
        }
        let v: HeadValue =
            serde_json::from_slice(&entry.value).map_err(|e| corrupt(e.to_string()))?;
        let mut head = Head {
            key: hex32(&v.key).ok_or_else(|| corrupt("key is not 32 hex bytes".to_owned()))?,
            seq: v.seq,
            hash: hex32(&v.hash).ok_or_else(|| corrupt("hash is not 32 hex bytes".to_owned()))?,
            stream_seq: v.stream_seq,
            revision: entry.revision,
            recent: Vec::new(),
            witnessed: self.last_cosignature(sensor_id).await?,
        };
        let last = match self
            .stream
            .get_last_raw_message_by_subject(&self.subject(sensor_id))
            .await
        {
            Ok(m) => m,
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {
                if head.stream_seq != 0 {
                    return Err(corrupt(format!(
                        "the bucket names stream message {}, the stream has none of this sensor",
                        head.stream_seq
                    )));
                }
                return Ok(Some(head));
            }
            Err(e) => return Err(nats("last message")(e.to_string())),
        };
        if last.sequence < head.stream_seq {
            return Err(corrupt(format!(
                "the bucket names stream message {}, the sensor's last is {}",
                head.stream_seq, last.sequence
            )));
        }
        let batch = v1::Batch::decode(&last.payload[..])
            .map_err(|e| corrupt(format!("stream message {}: {e}", last.sequence)))?;
        for f in &batch.frames {
            let hash = f.hash[..]
                .try_into()
                .map_err(|_| corrupt(format!("stream message {}: hash size", last.sequence)))?;
            head.recent.push((f.seq, hash));
        }
        if last.sequence > head.stream_seq
            && let Some(&(seq, hash)) = head.recent.last()
        {
            tracing::warn!(
                sensor = sensor_id,
                bucket = head.seq,
                stream = seq,
                "the head in the bucket lags the stream (a collector stopped between the two): rolled forward"
            );
            (head.seq, head.hash, head.stream_seq) = (seq, hash, last.sequence);
        }
        Ok(Some(head))
    }

    /// Pins `key` for a sensor the cluster does not know (an empty head). If another
    /// collector pinned one first, returns its head instead.
    pub async fn pin(&self, sensor_id: &str, key: [u8; 32]) -> Result<Head, JetError> {
        let value = head_value(&key, 0, &ZERO_HASH, 0);
        match self.heads.create(sensor_token(sensor_id), value).await {
            Ok(revision) => Ok(Head {
                key,
                seq: 0,
                hash: ZERO_HASH,
                stream_seq: 0,
                revision,
                recent: Vec::new(),
                witnessed: None,
            }),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => self
                .head(sensor_id)
                .await?
                .ok_or_else(|| JetError::Conflict(sensor_id.to_owned())),
            Err(e) => Err(nats("pin key")(e.to_string())),
        }
    }

    /// Stores verified records after `head` and moves `head` past them: each message
    /// only if the sensor's subject still ends at `head`, then the bucket by
    /// compare-and-set. Err(Conflict): another collector got there first; reload.
    pub async fn commit(
        &self,
        sensor_id: &str,
        head: &mut Head,
        pending: Vec<Pending>,
    ) -> Result<(), JetError> {
        let subject = self.subject(sensor_id);
        for batch in pack(pending, self.max_payload.saturating_sub(PAYLOAD_MARGIN))? {
            let (Some(first), Some(last)) = (batch.frames.first(), batch.frames.last()) else {
                continue;
            };
            let (first_seq, last_seq) = (first.seq, last.seq);
            let last_hash: [u8; 32] = last.hash[..].try_into().unwrap_or(ZERO_HASH);
            let recent: Vec<(u64, [u8; 32])> = batch
                .frames
                .iter()
                .map(|f| (f.seq, f.hash[..].try_into().unwrap_or(ZERO_HASH)))
                .collect();
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(
                async_nats::header::NATS_MESSAGE_ID,
                format!("{sensor_id}:{first_seq}-{last_seq}").as_str(),
            );
            headers.insert(
                async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                head.stream_seq.to_string().as_str(),
            );
            let ack = self
                .js
                .publish_with_headers(subject.clone(), headers, batch.encode_to_vec().into())
                .await
                .map_err(|e| nats("publish")(e.to_string()))?
                .await;
            let ack = match ack {
                Ok(a) if a.duplicate => return Err(JetError::Conflict(sensor_id.to_owned())),
                Ok(a) => a,
                Err(e) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => {
                    return Err(JetError::Conflict(sensor_id.to_owned()));
                }
                Err(e) => return Err(nats("publish ack")(e.to_string())),
            };
            (head.seq, head.hash, head.stream_seq) = (last_seq, last_hash, ack.sequence);
            head.recent = recent;
        }
        let value = head_value(&head.key, head.seq, &head.hash, head.stream_seq);
        match self
            .heads
            .update(sensor_token(sensor_id), value, head.revision)
            .await
        {
            Ok(revision) => {
                head.revision = revision;
                Ok(())
            }
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                // The records are in the stream; whoever moved the bucket read them.
                Err(JetError::Conflict(sensor_id.to_owned()))
            }
            Err(e) => Err(nats("head update")(e.to_string())),
        }
    }

    /// Verifies every sensor chain in the site's stream, in stream order, with the
    /// keys pinned in the bucket and the collectors' cosignatures. Reports are sorted
    /// by sensor id.
    pub async fn verify(&self) -> Result<Vec<Report>, JetError> {
        let mut cosigs: std::collections::BTreeMap<String, Vec<Cosignature>> = Default::default();
        let mut chains: std::collections::BTreeMap<String, ChainVerifier> = Default::default();
        let mut bad_cosig: Vec<(String, String)> = Vec::new();
        let mut witness = self.reader(WITNESS);
        while let Some((seq, sensor, payload)) = witness.next().await? {
            match Cosignature::parse_line(&String::from_utf8_lossy(&payload)) {
                Ok(c) => cosigs.entry(sensor).or_default().push(c),
                Err(e) => {
                    bad_cosig.push((sensor, format!("cosignature at stream message {seq}: {e}")))
                }
            }
        }
        let mut chain = self.reader(CHAIN);
        while let Some((seq, sensor, payload)) = chain.next().await? {
            if !chains.contains_key(&sensor) {
                let name = std::path::PathBuf::from(format!(
                    "nats:{}/{}",
                    stream_name(&self.site),
                    sensor
                ));
                let key = self.head(&sensor).await?.map(|h| h.key);
                let mut v = ChainVerifier::new(&name, &sensor, key.unwrap_or_default());
                if key.is_none() {
                    v.broken(format!(
                        "no key pinned for sensor {sensor:?} in {}",
                        bucket_name(&self.site)
                    ));
                }
                v.cosignatures(cosigs.remove(&sensor).unwrap_or_default());
                for (_, what) in bad_cosig.iter().filter(|(s, _)| *s == sensor) {
                    v.broken(what.clone());
                }
                chains.insert(sensor.clone(), v);
            }
            if let Some(v) = chains.get_mut(&sensor) {
                feed(v, seq, &payload);
            }
        }
        // The collectors' alarm chains, each with the key that names it.
        let mut alarms = self.reader(ALARMS);
        while let Some((seq, token, payload)) = alarms.next().await? {
            let name = alarm_chain_name(&token);
            if !chains.contains_key(&name) {
                let path =
                    std::path::PathBuf::from(format!("nats:{}/{name}", stream_name(&self.site)));
                let key = alarm_key(&token);
                let mut v = ChainVerifier::new(&path, ALARM_SENSOR_ID, key.unwrap_or_default());
                if key.is_none() {
                    v.broken(format!("alarm chain subject {token:?} names no key"));
                }
                chains.insert(name.clone(), v);
            }
            if let Some(v) = chains.get_mut(&name) {
                feed(v, seq, &payload);
            }
        }
        Ok(chains.into_values().map(ChainVerifier::finish).collect())
    }

    /// Publishes the frames of this collector's alarm chain that the stream does not
    /// hold yet, so that every reader of the site (`verify`, `report`, `query`
    /// `--jetstream`) sees every collector's alarms. Each message must extend the
    /// chain's subject where this shipper last saw it end.
    pub async fn ship_alarms(&self, shipper: &mut AlarmShipper) -> Result<u64, JetError> {
        let subject = format!("{ALARMS}.{}.{}", self.site, hex::encode(shipper.public));
        let corrupt = |detail: String| JetError::Corrupt {
            sensor: ALARM_SENSOR_ID.to_owned(),
            detail,
        };
        let (stream_seq, stored) = match shipper.stored {
            Some(at) => at,
            None => {
                let at = match self.stream.get_last_raw_message_by_subject(&subject).await {
                    Ok(m) => {
                        let b = v1::Batch::decode(&m.payload[..]).map_err(|e| {
                            corrupt(format!("alarm chain message {}: {e}", m.sequence))
                        })?;
                        (m.sequence, b.frames.last().map_or(0, |f| f.seq))
                    }
                    Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => (0, 0),
                    Err(e) => return Err(nats("last alarm message")(e.to_string())),
                };
                shipper.reader = Some(SpoolReader::follow(&shipper.dir, at.1 + 1));
                shipper.stored = Some(at);
                at
            }
        };
        let reader = shipper
            .reader
            .get_or_insert_with(|| SpoolReader::follow(&shipper.dir, stored + 1));
        let mut frames = Vec::new();
        let read = reader.poll(ALARM_SHIP_FRAMES, usize::MAX, &mut frames);
        if let Err(e) = read {
            shipper.reset();
            return Err(corrupt(format!("{}: {e}", shipper.dir.display())));
        }
        let Some(first) = frames.first() else {
            return Ok(0);
        };
        if first.seq != stored + 1 {
            shipper.reset();
            return Err(corrupt(format!(
                "the stream holds the alarm chain to seq {stored}, the local one goes on at {}",
                first.seq
            )));
        }
        let pending = frames
            .into_iter()
            .map(|f| {
                Pending::Frame(v1::Frame {
                    seq: f.seq,
                    prev_hash: f.prev_hash.to_vec().into(),
                    hash: f.hash.to_vec().into(),
                    record: f.record_bytes.into(),
                })
            })
            .collect();
        let (mut stream_seq, mut shipped) = (stream_seq, 0);
        for mut batch in pack(pending, self.max_payload.saturating_sub(PAYLOAD_MARGIN))? {
            let (Some(first), Some(last)) = (batch.frames.first(), batch.frames.last()) else {
                continue;
            };
            let (first_seq, last_seq) = (first.seq, last.seq);
            let hash: [u8; 32] = last.hash[..].try_into().unwrap_or(ZERO_HASH);
            batch.signature = conduit_evidence::chain::checkpoint::sign_batch(
                &shipper.key,
                ALARM_SENSOR_ID,
                last_seq,
                &hash,
            );
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(
                async_nats::header::NATS_MESSAGE_ID,
                format!(
                    "alarm:{}:{first_seq}-{last_seq}",
                    hex::encode(shipper.public)
                )
                .as_str(),
            );
            headers.insert(
                async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                stream_seq.to_string().as_str(),
            );
            let ack = self
                .js
                .publish_with_headers(subject.clone(), headers, batch.encode_to_vec().into())
                .await
                .map_err(|e| nats("publish alarms")(e.to_string()))?
                .await;
            match ack {
                Ok(a) if !a.duplicate => {
                    stream_seq = a.sequence;
                    shipped += (last_seq - first_seq) + 1;
                    shipper.stored = Some((stream_seq, last_seq));
                }
                // Stored before (a publish whose ack was lost): read where the
                // stream ends and go on from there.
                Ok(_) => {
                    shipper.reset();
                    return Err(JetError::Conflict(ALARM_SENSOR_ID.to_owned()));
                }
                Err(e) => {
                    shipper.reset();
                    return Err(nats("publish alarms ack")(e.to_string()));
                }
            }
        }
        Ok(shipped)
    }
}

/// Frames of the alarm chain one [`JetChains::ship_alarms`] call reads at most.
const ALARM_SHIP_FRAMES: usize = 1024;

/// This collector's alarm chain on its way into the stream: where the stream ends
/// (read from it on first use and after any failure) and the local reader past it.
pub struct AlarmShipper {
    dir: std::path::PathBuf,
    key: ed25519_dalek::SigningKey,
    public: [u8; 32],
    /// Stream sequence and chain seq of the chain's last message in the stream.
    stored: Option<(u64, u64)>,
    reader: Option<SpoolReader>,
}

impl AlarmShipper {
    /// The alarm chain in `dir` (`<store>/_collector`), signed by `key`.
    pub fn new(dir: &std::path::Path, key: &ed25519_dalek::SigningKey) -> AlarmShipper {
        AlarmShipper {
            dir: dir.to_owned(),
            key: key.clone(),
            public: key.verifying_key().to_bytes(),
            stored: None,
            reader: None,
        }
    }

    fn reset(&mut self) {
        self.stored = None;
        self.reader = None;
    }
}

/// The store directory of a collector's alarm chain copied from the stream (its
/// subject token is the key's hex): `_collector-<hex>`, see
/// [`crate::store::is_alarm_dir`].
fn alarm_chain_name(token: &str) -> String {
    format!("{ALARM_DIR}-{}", token.to_ascii_lowercase())
}

/// The key an alarm chain's subject token names.
fn alarm_key(token: &str) -> Option<[u8; 32]> {
    hex::decode(token).ok()?.try_into().ok()
}

/// An export's durable consumer of the site's chains, shared by every collector of
/// the site: each stored message goes to one of them, and is acknowledged after the
/// export's target took its records; unacknowledged ones are delivered again.
pub struct ExportFeed {
    consumer: jetstream::consumer::Consumer<jetstream::consumer::pull::Config>,
    prefix: String,
    /// Bytes one fetch may ask for ([`JetChains::pull_bytes`]).
    pull_bytes: usize,
}

/// How long a collector may hold an export's message before the cluster gives it to
/// another (a collector that died mid-send).
const EXPORT_ACK_WAIT: Duration = Duration::from_secs(30);
/// Messages an export takes per fetch (each holds up to a sensor batch of records),
/// few enough to be sent well within [`EXPORT_ACK_WAIT`].
pub const EXPORT_FETCH: usize = 16;
/// How long one fetch waits for messages.
const EXPORT_FETCH_WAIT: Duration = Duration::from_millis(500);

impl JetChains {
    /// The durable consumer `export-<name>` (created if missing).
    pub async fn export_feed(&self, name: &str) -> Result<ExportFeed, JetError> {
        let durable = format!("export-{}", crate::export::nats::token(name));
        let consumer = self
            .stream
            .get_or_create_consumer(
                &durable,
                jetstream::consumer::pull::Config {
                    durable_name: Some(durable.clone()),
                    description: Some(format!("Conduit collector export {name}")),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: EXPORT_ACK_WAIT,
                    filter_subject: format!("{CHAIN}.{}.>", self.site),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| nats("export consumer")(format!("{durable}: {e}")))?;
        Ok(ExportFeed {
            consumer,
            prefix: format!("{CHAIN}.{}.", self.site),
            pull_bytes: self.pull_bytes(),
        })
    }
}

/// Messages of an export, with the records they hold.
pub struct Fetched {
    pub messages: Vec<jetstream::Message>,
    /// (sensor id, frame, decoded record) of every frame, in order.
    pub records: Vec<(String, v1::Frame, v1::Record)>,
}

impl ExportFeed {
    /// Up to `max` messages no collector exported yet: what arrives within
    /// [`EXPORT_FETCH_WAIT`]. (A pull request that expires always ends; a no-wait one
    /// that finds fewer than `max` messages can leave the batch open on nats-server
    /// 2.9.)
    pub async fn fetch(&self, max: usize) -> Result<Fetched, JetError> {
        let mut batch = self
            .consumer
            .batch()
            .max_messages(max)
            .max_bytes(self.pull_bytes)
            .expires(EXPORT_FETCH_WAIT)
            .messages()
            .await
            .map_err(|e| nats("export fetch")(e.to_string()))?;
        let mut out = Fetched {
            messages: Vec::new(),
            records: Vec::new(),
        };
        // The server ends the request at its expiry; the deadline guards against a
        // reply lost in a reconnect.
        let deadline = tokio::time::Instant::now() + EXPORT_FETCH_WAIT * 4;
        while let Ok(Some(m)) = tokio::time::timeout_at(deadline, batch.next()).await {
            let m = m.map_err(|e| nats("export fetch")(e.to_string()))?;
            if let Some(token) = m.subject.as_str().strip_prefix(&self.prefix)
                && let Ok(b) = v1::Batch::decode(&m.payload[..])
            {
                let sensor = sensor_from_token(token);
                for f in b.frames {
                    // Verified before it was published: a record decodes.
                    if let Ok(r) = v1::Record::decode(&f.record[..]) {
                        out.records.push((sensor.clone(), f, r));
                    }
                }
            }
            out.messages.push(m);
        }
        Ok(out)
    }

    /// The target took them: acknowledged, no collector sends them again.
    pub async fn done(&self, messages: &[jetstream::Message]) -> Result<(), JetError> {
        for m in messages {
            m.ack()
                .await
                .map_err(|e| nats("export ack")(e.to_string()))?;
        }
        Ok(())
    }

    /// The target failed: delivered again after `delay` (to any collector).
    pub async fn retry(&self, messages: &[jetstream::Message], delay: Duration) {
        for m in messages {
            let _ = m.ack_with(jetstream::AckKind::Nak(Some(delay))).await;
        }
    }
}

impl JetChains {
    /// Copies every sensor chain of the site, as stored, into `root` in the file
    /// store's layout (segments, pinned key, declared gaps, cosignatures), for `query`
    /// and `report`: they then read and verify it as a store, so a chain broken in
    /// the stream is reported broken, not repaired. Returns the messages read.
    pub async fn copy_to_store(&self, root: &std::path::Path) -> Result<u64, JetError> {
        use conduit_evidence::spool::{Class, FrameRef, Spool, SpoolOptions, SyncPolicy};
        let copy = |sensor: &str, what: String| JetError::Corrupt {
            sensor: sensor.to_owned(),
            detail: what,
        };
        let mut spools: std::collections::HashMap<String, Spool> = Default::default();
        let mut read = 0;
        // Sensor chains by sensor id; the collectors' alarm chains by key, each into
        // `_collector-<key hex>` (the report lists their alarms).
        for (prefix, alarm) in [(CHAIN, false), (ALARMS, true)] {
            let mut reader = self.reader(prefix);
            while let Some((seq, name, payload)) = reader.next().await? {
                read += 1;
                let (sensor, spool_id) = if alarm {
                    (alarm_chain_name(&name), ALARM_SENSOR_ID.to_owned())
                } else {
                    (name.clone(), name.clone())
                };
                let dir = root.join(&sensor);
                if !spools.contains_key(&sensor) {
                    let key = if alarm {
                        alarm_key(&name).ok_or_else(|| {
                            copy(&sensor, "the alarm chain's subject names no key".to_owned())
                        })?
                    } else {
                        let Some(head) = self.head(&sensor).await? else {
                            return Err(copy(&sensor, "no key pinned in the bucket".to_owned()));
                        };
                        head.key
                    };
                    std::fs::create_dir_all(&dir).map_err(|e| copy(&sensor, e.to_string()))?;
                    crate::store::pin_key(&dir, &key).map_err(|e| copy(&sensor, e.to_string()))?;
                    let mut o = SpoolOptions::new(&dir, &spool_id);
                    o.max_bytes = u64::MAX / 4;
                    o.sync = SyncPolicy::OsOnly;
                    let (spool, _) = Spool::open(o).map_err(|e| copy(&sensor, e.to_string()))?;
                    spools.insert(sensor.clone(), spool);
                }
                let batch = v1::Batch::decode(&payload[..])
                    .map_err(|e| copy(&sensor, format!("stream message {seq}: {e}")))?;
                if let Some(g) = &batch.gap {
                    let g = DeclaredGap::from_proto(g)
                        .map_err(|e| copy(&sensor, format!("stream message {seq}: {e}")))?;
                    conduit_evidence::chain::declared_gap::append(&dir, &g)
                        .map_err(|e| copy(&sensor, e))?;
                }
                let Some(spool) = spools.get_mut(&sensor) else {
                    continue;
                };
                for f in &batch.frames {
                    let hash = |b: &[u8]| <[u8; 32]>::try_from(b).unwrap_or(ZERO_HASH);
                    spool
                        .append(
                            &FrameRef {
                                seq: f.seq,
                                prev_hash: hash(&f.prev_hash),
                                hash: hash(&f.hash),
                                record: &f.record,
                            },
                            Class::Data,
                        )
                        .map_err(|e| copy(&sensor, format!("stream message {seq}: {e}")))?;
                }
            }
        }
        for (sensor, mut spool) in spools {
            spool.sync().map_err(|e| copy(&sensor, e.to_string()))?;
        }
        let mut witness = self.reader(WITNESS);
        while let Some((seq, sensor, payload)) = witness.next().await? {
            read += 1;
            let dir = root.join(&sensor);
            let c = Cosignature::parse_line(&String::from_utf8_lossy(&payload))
                .map_err(|e| copy(&sensor, format!("cosignature at stream message {seq}: {e}")))?;
            std::fs::create_dir_all(&dir).map_err(|e| copy(&sensor, e.to_string()))?;
            conduit_evidence::chain::cosignature::append(&dir, &c)
                .map_err(|e| copy(&sensor, e.to_string()))?;
        }
        Ok(read)
    }
}

/// One stream message into a chain's verifier.
fn feed(v: &mut ChainVerifier, stream_seq: u64, payload: &[u8]) {
    let batch = match v1::Batch::decode(payload) {
        Ok(b) => b,
        Err(e) => return v.broken(format!("stream message {stream_seq} does not decode: {e}")),
    };
    let gap = match batch.gap.as_ref().map(DeclaredGap::from_proto).transpose() {
        Ok(g) => g,
        Err(e) => return v.broken(format!("stream message {stream_seq}: gap declaration: {e}")),
    };
    v.segment(gap);
    for f in &batch.frames {
        let (Ok(prev), Ok(hash)) = (
            <[u8; 32]>::try_from(&f.prev_hash[..]),
            <[u8; 32]>::try_from(&f.hash[..]),
        ) else {
            return v.broken(format!(
                "stream message {stream_seq}: seq {}: hash size",
                f.seq
            ));
        };
        v.frame(f.seq, &prev, &hash, &f.record);
    }
}

fn head_value(key: &[u8; 32], seq: u64, hash: &[u8; 32], stream_seq: u64) -> bytes::Bytes {
    serde_json::to_vec(&HeadValue {
        key: hex::encode(key),
        seq,
        hash: hex::encode(hash),
        stream_seq,
    })
    .unwrap_or_default()
    .into()
}

fn hex32(s: &str) -> Option<[u8; 32]> {
    hex::decode(s).ok()?.try_into().ok()
}

/// Packs pending records into messages of at most `max` encoded bytes: a gap
/// declaration opens a message, frames fill it in order.
fn pack(pending: Vec<Pending>, max: usize) -> Result<Vec<v1::Batch>, JetError> {
    let mut out: Vec<v1::Batch> = Vec::new();
    let mut size = 0;
    for p in pending {
        match p {
            Pending::Gap(g) => {
                size = g.encoded_len();
                out.push(v1::Batch {
                    gap: Some(g),
                    ..Default::default()
                });
            }
            Pending::Frame(f) => {
                let len = f.encoded_len() + 8;
                if len + 64 > max {
                    return Err(JetError::TooLarge { bytes: len, max });
                }
                match out.last_mut() {
                    Some(b) if size + len <= max => b.frames.push(f),
                    _ => {
                        out.push(v1::Batch {
                            frames: vec![f],
                            ..Default::default()
                        });
                        size = 0;
                    }
                }
                size += len;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alarm_chains_are_named_by_their_key() {
        let key = [0xab_u8; 32];
        let token = hex::encode(key);
        assert_eq!(alarm_key(&token), Some(key));
        assert_eq!(alarm_key("abcd"), None);
        assert_eq!(alarm_key("gw-01"), None);
        let name = alarm_chain_name(&token);
        assert!(crate::store::is_alarm_dir(&name), "{name}");
        assert!(!crate::store::valid_sensor_id(&name), "{name}");
    }

    #[test]
    fn nats_versions() {
        assert_eq!(nats_version("2.10.27"), Some((2, 10, 27)));
        assert_eq!(nats_version("v2.11.0-RC.1"), Some((2, 11, 0)));
        assert_eq!(nats_version(" v2.9.10 "), Some((2, 9, 10)));
        assert_eq!(nats_version("2.12"), Some((2, 12, 0)));
        assert_eq!(nats_version("dev"), None);
        assert!(nats_version("2.9.10").expect("parses") < SYNC_ALWAYS_SINCE);
        assert!(nats_version("2.10.27").expect("parses") >= SYNC_ALWAYS_SINCE);
        assert!(nats_version("2.10.27").expect("parses") < DEDUPE_ACROSS_LEADERS_SINCE);
    }

    fn frame(seq: u64, bytes: usize) -> Pending {
        Pending::Frame(v1::Frame {
            seq,
            prev_hash: vec![0; 32].into(),
            hash: vec![1; 32].into(),
            record: vec![7; bytes].into(),
        })
    }

    #[test]
    fn packing_keeps_order_opens_a_message_at_a_gap_and_respects_the_size() {
        let gap = Pending::Gap(v1::GapDeclaration {
            from_seq: 3,
            to_seq: 9,
            ..Default::default()
        });
        let pending = vec![
            frame(1, 600),
            frame(2, 600),
            gap,
            frame(10, 600),
            frame(11, 600),
        ];
        let out = pack(pending, 1000).expect("pack");
        let seqs: Vec<Vec<u64>> = out
            .iter()
            .map(|b| b.frames.iter().map(|f| f.seq).collect())
            .collect();
        assert_eq!(seqs, vec![vec![1], vec![2], vec![10], vec![11]]);
        assert!(out[2].gap.is_some() && out.iter().filter(|b| b.gap.is_some()).count() == 1);
        for b in &out {
            assert!(b.encoded_len() <= 1000, "{}", b.encoded_len());
        }
        let big = pack(vec![frame(1, 10), frame(2, 10), frame(3, 10)], 1000).expect("pack");
        assert_eq!(big.len(), 1);
        assert!(matches!(
            pack(vec![frame(1, 5000)], 1000),
            Err(JetError::TooLarge { .. })
        ));
    }

    #[test]
    fn sensor_ids_map_to_one_subject_token_and_back() {
        for id in ["gw-01", "plant.1_gw", "a..b", "x."] {
            let t = sensor_token(id);
            assert!(!t.contains('.'), "{t}");
            assert_eq!(sensor_from_token(&t), id);
        }
    }
}
