//! The gRPC service: authenticates a sensor (mTLS identity, pinned signing key),
//! verifies and stores its frames, acknowledges what is fsynced.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use conduit_evidence::chain::keys;
use conduit_proto::v1::{
    self, CollectorMessage, RejectCode, SensorMessage, StreamProtocol, collector_message,
    collector_server, sensor_message,
};
use tokio::sync::{Notify, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::alarms::Alarms;
use crate::jetstream::{JetChains, JetError};
use crate::limits::Limits;
use crate::listener::{Gate, StreamGuard};
use crate::store::{self, Rejection, SensorStore};
use crate::text::bounded;

pub const PROTOCOL_VERSION: u32 = StreamProtocol::V1 as u32;
/// Batches applied before one fsync and one Ack (group commit).
const GROUP_BATCHES: usize = 16;
/// How long a new stream waits for an older stream of the same sensor to end.
const BUSY_WAIT: Duration = Duration::from_secs(10);
/// Longest Reject message or logged rejection text.
const MAX_MESSAGE_BYTES: usize = 1024;

#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub store: PathBuf,
    /// `<dir>/<sensor_id>.pub` per trusted sensor.
    pub trusted_keys: Option<PathBuf>,
    /// Trust an unknown sensor's key on first use (and pin it in the store).
    pub tofu: bool,
    /// Size at which a sensor's store segment is sealed: the unit of retention.
    pub segment_bytes: u64,
    /// Sensor chains in NATS JetStream instead of `store` (which then keeps only the
    /// collector's own alarm chain and export cursors).
    pub jetstream: Option<Arc<JetChains>>,
}

type Slot = Arc<tokio::sync::Mutex<Option<SensorStore>>>;

pub struct Shared {
    pub opts: ServerOptions,
    pub alarms: Alarms,
    /// Woken after every commit (exports follow the store).
    pub committed: Notify,
    /// True when the collector shuts down: streams finish their sync, ack and end.
    pub shutdown: watch::Sender<bool>,
    /// Connection and stream caps, shared with the accept loop.
    pub gate: Arc<Gate>,
    sensors: Mutex<HashMap<String, Slot>>,
}

impl Shared {
    pub fn new(opts: ServerOptions, alarms: Alarms, limits: Limits) -> Arc<Shared> {
        let gate = Gate::new(limits, alarms.metrics.clone());
        Arc::new(Shared {
            opts,
            alarms,
            committed: Notify::new(),
            shutdown: watch::channel(false).0,
            gate,
            sensors: Mutex::new(HashMap::new()),
        })
    }

    pub fn limits(&self) -> &Limits {
        self.gate.limits()
    }

    /// Closes sensor stores that no stream used for the store idle timeout, so an
    /// idle or departed sensor holds no file descriptors.
    pub fn close_idle_stores(&self) {
        let idle = self.limits().store_idle_timeout;
        let mut map = match self.sensors.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        map.retain(|_, slot| {
            let Ok(mut st) = slot.try_lock() else {
                return true; // a stream holds it
            };
            if st.as_ref().is_some_and(|s| s.idle_for() >= idle) {
                *st = None;
            }
            st.is_some() || Arc::strong_count(slot) > 1
        });
    }

    /// Runs `f` (blocking) with the sensor's store slot held, so no stream writes to
    /// the chain meanwhile; `f` gets the open store, if one is open.
    pub fn with_store<R>(
        &self,
        sensor_id: &str,
        f: impl FnOnce(Option<&mut SensorStore>) -> R,
    ) -> R {
        let slot = self.slot(sensor_id);
        let mut guard = slot.blocking_lock();
        f(guard.as_mut())
    }

    fn slot(&self, sensor_id: &str) -> Slot {
        let mut map = match self.sensors.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        map.entry(sensor_id.to_owned()).or_default().clone()
    }

    /// The key this sensor must use: trusted-keys file, else the key `pinned` for it
    /// (in the store, or in JetStream), else (with --tofu) the key it presents.
    fn resolve_key(
        &self,
        sensor_id: &str,
        presented: &[u8],
        pinned: Option<[u8; 32]>,
    ) -> Result<[u8; 32], Rejection> {
        let reject = |code, message: String| Rejection {
            code,
            seq: 0,
            message,
        };
        let presented: [u8; 32] = presented.try_into().map_err(|_| {
            reject(
                RejectCode::KeyMismatch,
                format!("public key is {} bytes, not 32", presented.len()),
            )
        })?;
        let trusted = match &self.opts.trusted_keys {
            Some(dir) => {
                let path = dir.join(format!("{sensor_id}.pub"));
                if path.exists() {
                    Some(keys::read_public_key(&path).map_err(|e| {
                        reject(RejectCode::UnknownSensor, format!("trusted key: {e}"))
                    })?)
                } else {
                    None
                }
            }
            None => None,
        };
        let key = match (trusted, pinned) {
            (Some(t), Some(p)) if t != p => {
                return Err(reject(
                    RejectCode::KeyMismatch,
                    format!(
                        "trusted key {} differs from the key pinned in the store {}",
                        hex::encode(t),
                        hex::encode(p)
                    ),
                ));
            }
            (Some(k), _) | (None, Some(k)) => k,
            (None, None) if self.opts.tofu => {
                tracing::warn!(sensor = sensor_id, key = %hex::encode(presented),
                    "trusting a new sensor key on first use (--tofu); it is pinned in the store");
                presented
            }
            (None, None) => {
                return Err(reject(
                    RejectCode::UnknownSensor,
                    format!(
                        "no trusted key for sensor {sensor_id:?} (add {sensor_id}.pub to --trusted-keys, or run with --tofu)"
                    ),
                ));
            }
        };
        if key != presented {
            return Err(reject(
                RejectCode::KeyMismatch,
                format!(
                    "sensor presents key {}, trusted key is {}",
                    hex::encode(presented),
                    hex::encode(key)
                ),
            ));
        }
        Ok(key)
    }
}

/// Names the client certificate vouches for: subject CN and DNS SANs.
pub fn cert_identities(der: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return out;
    };
    for cn in cert.subject().iter_common_name() {
        if let Ok(s) = cn.as_str() {
            out.push(s.to_owned());
        }
    }
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = name {
                out.push((*d).to_owned());
            }
        }
    }
    out
}

pub struct CollectorService {
    pub shared: Arc<Shared>,
}

#[tonic::async_trait]
impl collector_server::Collector for CollectorService {
    type StreamStream = ReceiverStream<Result<CollectorMessage, Status>>;

    async fn stream(
        &self,
        request: Request<Streaming<SensorMessage>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        // With mTLS, the certificate names who may speak for which sensor.
        let identities = request
            .peer_certs()
            .and_then(|certs| certs.first().map(|c| cert_identities(c.as_ref())));
        let peer = request.remote_addr();
        let stream_guard = self.shared.gate.stream_started(peer);
        let inbound = request.into_inner();
        let (out_tx, out_rx) = mpsc::channel(32);
        let shared = self.shared.clone();
        shared.alarms.metrics.connections.inc();
        tokio::spawn(async move {
            let session = Session {
                shared,
                out: out_tx,
                identities,
                _stream: stream_guard,
            };
            session.run(inbound, peer).await;
        });
        Ok(Response::new(ReceiverStream::new(out_rx)))
    }
}

struct Session {
    shared: Arc<Shared>,
    out: mpsc::Sender<Result<CollectorMessage, Status>>,
    identities: Option<Vec<String>>,
    /// Keeps the connection's idle clock stopped while this stream runs.
    _stream: Option<StreamGuard>,
}

#[expect(
    clippy::result_large_err,
    reason = "the response stream's item type is fixed by tonic"
)]
fn msg(m: collector_message::Msg) -> Result<CollectorMessage, Status> {
    Ok(CollectorMessage { msg: Some(m) })
}

/// The Welcome: what is stored of the sensor's chain ((0, zero): nothing).
fn welcome(
    (seq, hash): (u64, [u8; 32]),
    cosignature: Option<v1::Cosignature>,
) -> collector_message::Msg {
    collector_message::Msg::Welcome(v1::Welcome {
        protocol_version: PROTOCOL_VERSION,
        last_stored_seq: seq,
        last_stored_hash: if seq == 0 { Vec::new() } else { hash.to_vec() },
        last_cosignature: cosignature,
    })
}

/// A reader task keeps the next batches decoded while earlier ones are stored.
fn spawn_reader(
    mut inbound: Streaming<SensorMessage>,
) -> (
    tokio::task::JoinHandle<()>,
    mpsc::Receiver<Result<v1::Batch, Status>>,
) {
    let (btx, brx) = mpsc::channel::<Result<v1::Batch, Status>>(GROUP_BATCHES);
    let reader = tokio::spawn(async move {
        loop {
            let m = match inbound.message().await {
                Ok(Some(m)) => m,
                Ok(None) => return,
                Err(e) => {
                    let _ = btx.send(Err(e)).await;
                    return;
                }
            };
            let item = match m.msg {
                Some(sensor_message::Msg::Batch(b)) => Ok(b),
                _ => Err(Status::invalid_argument("expected Batch")),
            };
            if btx.send(item).await.is_err() {
                return;
            }
        }
    });
    (reader, brx)
}

/// Receives up to [`GROUP_BATCHES`] batches: the first awaited, the rest as ready.
fn group_after(
    first: Result<v1::Batch, Status>,
    brx: &mut mpsc::Receiver<Result<v1::Batch, Status>>,
) -> Vec<Result<v1::Batch, Status>> {
    let mut group = vec![first];
    while group.len() < GROUP_BATCHES
        && let Ok(b) = brx.try_recv()
    {
        group.push(b);
    }
    group
}

impl Session {
    /// Sends a message to the sensor; false when the stream is gone.
    async fn send(&self, m: collector_message::Msg) -> bool {
        self.out.send(msg(m)).await.is_ok()
    }

    /// Cosigns the newest checkpoint that `durable_seq` made durable, if it extends
    /// what this collector witnessed before (docs/witness.md). A contradiction is an
    /// alarm; a failure to store the cosignature only delays it to the next one.
    fn witness(
        &self,
        st: &mut SensorStore,
        sensor_id: &str,
        durable_seq: u64,
    ) -> Option<conduit_evidence::chain::cosignature::Cosignature> {
        let now = conduit_evidence::chain::checkpoint::unix_nanos(std::time::SystemTime::now());
        let key = self.shared.alarms.witness_key();
        // An fsync of witness.cosig: off the async workers.
        match tokio::task::block_in_place(|| st.cosign(durable_seq, key, now)) {
            Ok(c) => c,
            Err(store::WitnessError::Conflict(why)) => {
                let seq = st.witnessed().map_or(0, |w| w.seq);
                tokio::task::block_in_place(|| {
                    self.shared
                        .alarms
                        .raise("witness_conflict", sensor_id, seq, &why);
                });
                None
            }
            Err(e) => {
                tracing::error!(sensor = sensor_id, error = %e, "cosignature not stored");
                None
            }
        }
    }

    async fn reject(&self, sensor_id: &str, r: &Rejection) {
        let sensor_id = &*bounded(sensor_id, conduit_proto::limits::MAX_SENSOR_ID_BYTES);
        let message = bounded(&r.message, MAX_MESSAGE_BYTES).into_owned();
        self.shared.alarms.metrics.batches_rejected.inc();
        if let Some(kind) = r.alarm_kind() {
            let shared = self.shared.clone();
            let (kind, sensor, seq, detail) = (
                kind.to_owned(),
                sensor_id.to_owned(),
                r.seq,
                message.clone(),
            );
            let _ = tokio::task::spawn_blocking(move || {
                shared.alarms.raise(&kind, &sensor, seq, &detail);
                shared.committed.notify_waiters();
            })
            .await;
        } else {
            tracing::warn!(sensor = sensor_id, code = ?r.code, seq = r.seq, %message, "stream rejected");
        }
        let _ = self
            .out
            .send(msg(collector_message::Msg::Reject(v1::Reject {
                code: r.code as i32,
                message,
                seq: r.seq,
            })))
            .await;
    }

    /// Verifies and applies a group of batches in order, raising the alarms for the
    /// spool damage they report; stops at the first refused batch (the rejection) or
    /// at the end of the stream (true).
    fn apply_group(
        &self,
        st: &mut SensorStore,
        sensor_id: &str,
        group: &[Result<v1::Batch, Status>],
    ) -> (store::Applied, Option<Rejection>, bool) {
        let mut applied = store::Applied::default();
        for item in group {
            match item {
                Ok(batch) => match st.apply_batch(batch) {
                    Ok(a) => {
                        applied.appended += a.appended;
                        applied.duplicates += a.duplicates;
                        // The sensor's own signed word that its spool lost records:
                        // an alarm for the SIEM.
                        for d in st.take_damage() {
                            self.shared.alarms.raise(
                                "sensor_spool_damage",
                                sensor_id,
                                d.seq,
                                &format!("{}: {}", d.reason, d.detail),
                            );
                        }
                    }
                    Err(r) => return (applied, Some(r), false),
                },
                Err(status) => {
                    tracing::info!(sensor = %sensor_id, %status, "sensor stream ended");
                    return (applied, None, true);
                }
            }
        }
        (applied, None, false)
    }

    /// A sensor stream whose chain is kept in JetStream: the head is read from the
    /// cluster under this collector's slot for the sensor, every group of batches is
    /// verified, published and the head moved by compare-and-set before the Ack. If
    /// another collector stored records of the sensor meanwhile, the stream ends
    /// (Busy) and the sensor resumes from the stored head on its next stream.
    async fn run_jetstream(
        self,
        js: Arc<JetChains>,
        sensor_id: &str,
        hello: &v1::Hello,
        inbound: Streaming<SensorMessage>,
        peer: Option<std::net::SocketAddr>,
    ) {
        let slot = self.shared.slot(sensor_id);
        let Ok(_guard) = tokio::time::timeout(BUSY_WAIT, slot.lock_owned()).await else {
            let r = Rejection {
                code: RejectCode::Busy,
                seq: 0,
                message: format!("another stream of sensor {sensor_id:?} is active"),
            };
            return self.reject(sensor_id, &r).await;
        };
        let storage = |e: JetError| Rejection {
            code: RejectCode::Storage,
            seq: 0,
            message: format!("JetStream: {e}"),
        };
        let stored = match js.head(sensor_id).await {
            Ok(h) => h,
            Err(e) => return self.reject(sensor_id, &storage(e)).await,
        };
        let key = match self.shared.resolve_key(
            sensor_id,
            &hello.public_key,
            stored.as_ref().map(|h| h.key),
        ) {
            Ok(k) => k,
            Err(r) => return self.reject(sensor_id, &r).await,
        };
        let mut head = match stored {
            Some(h) => h,
            None => match js.pin(sensor_id, key).await {
                Ok(h) if h.key == key => h,
                Ok(h) => {
                    let r = Rejection {
                        code: RejectCode::KeyMismatch,
                        seq: 0,
                        message: format!(
                            "sensor presents key {}, another collector pinned key {} for it",
                            hex::encode(key),
                            hex::encode(h.key)
                        ),
                    };
                    return self.reject(sensor_id, &r).await;
                }
                Err(e) => return self.reject(sensor_id, &storage(e)).await,
            },
        };
        let mut st = SensorStore::detached(
            sensor_id,
            key,
            (head.seq, head.hash),
            &head.recent,
            head.witnessed,
        );
        self.shared.alarms.metrics.sensor_seen(sensor_id, head.seq);
        tracing::info!(sensor = %sensor_id, ?peer, stored_seq = head.seq, sensor_head = hello.head_seq,
            site = js.site(), "sensor connected (JetStream)");
        let cosignature = head.witnessed.map(|c| c.to_proto());
        if !self.send(welcome((head.seq, head.hash), cosignature)).await {
            return;
        }
        let (reader, mut brx) = spawn_reader(inbound);
        let mut stop = self.shared.shutdown.subscribe();
        let idle_timeout = self.shared.limits().stream_idle_timeout;
        let silence = tokio::time::sleep(idle_timeout);
        tokio::pin!(silence);
        loop {
            let first = tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => {
                    tracing::info!(sensor = %sensor_id, "collector shutting down: ending the stream");
                    break;
                }
                () = &mut silence => {
                    tracing::warn!(sensor = %sensor_id, timeout = ?idle_timeout,
                        "sensor stream silent: evicting it");
                    self.shared.alarms.metrics.streams_evicted.inc();
                    break;
                }
                first = brx.recv() => first,
            };
            silence
                .as_mut()
                .reset(tokio::time::Instant::now() + idle_timeout);
            let Some(first) = first else {
                break;
            };
            let group = group_after(first, &mut brx);
            let (applied, rejection, ended) =
                tokio::task::block_in_place(|| self.apply_group(&mut st, sensor_id, &group));
            // What verified before a refused batch is stored, as with files.
            let pending = st.take_outbox();
            if !pending.is_empty() {
                match js.commit(sensor_id, &mut head, pending).await {
                    Ok(()) => {}
                    Err(e @ JetError::Conflict(_)) => {
                        let r = Rejection {
                            code: RejectCode::Busy,
                            seq: head.seq + 1,
                            message: format!("{e}; reconnect to resume from the stored head"),
                        };
                        self.reject(sensor_id, &r).await;
                        break;
                    }
                    Err(e) => {
                        let mut r = storage(e);
                        r.seq = head.seq + 1;
                        self.reject(sensor_id, &r).await;
                        break;
                    }
                }
            }
            let m = &self.shared.alarms.metrics;
            m.records_stored.inc_by(applied.appended);
            m.records_duplicate.inc_by(applied.duplicates);
            m.sensor_seen(sensor_id, head.seq);
            self.shared.committed.notify_waiters();
            // The head is durable at the cluster: witnessed like a store's.
            let mut cosignature = self.witness(&mut st, sensor_id, head.seq);
            if let Some(c) = &cosignature
                && let Err(e) = js.publish_cosignature(sensor_id, c).await
            {
                tracing::error!(sensor = %sensor_id, error = %e, "cosignature not stored");
                cosignature = None;
            }
            let ack = v1::Ack {
                stored_seq: head.seq,
                cosignature: cosignature.map(|c| c.to_proto()),
            };
            if !self.send(collector_message::Msg::Ack(ack)).await {
                break;
            }
            if let Some(r) = rejection {
                self.reject(sensor_id, &r).await;
                break;
            }
            if ended {
                break;
            }
        }
        reader.abort();
        tracing::info!(sensor = %sensor_id, stored_seq = head.seq, "sensor disconnected");
    }

    async fn run(self, mut inbound: Streaming<SensorMessage>, peer: Option<std::net::SocketAddr>) {
        let hello_timeout = self.shared.limits().hello_timeout;
        let Ok(first) = tokio::time::timeout(hello_timeout, inbound.message()).await else {
            tracing::debug!(?peer, "no Hello within the deadline: stream closed");
            self.shared.alarms.metrics.streams_evicted.inc();
            return;
        };
        let hello = match first {
            Ok(Some(SensorMessage {
                msg: Some(sensor_message::Msg::Hello(h)),
            })) => h,
            Ok(_) => {
                let r = Rejection {
                    code: RejectCode::Protocol,
                    seq: 0,
                    message: "the first message must be Hello".to_owned(),
                };
                self.reject("", &r).await;
                return;
            }
            Err(e) => {
                tracing::debug!(error = %e, "stream ended before Hello");
                return;
            }
        };
        let sensor_id = hello.sensor_id.clone();
        // Checked first: every later use (logs, alarms, paths) sees a bounded, valid id.
        if !store::valid_sensor_id(&sensor_id) {
            let r = Rejection {
                code: RejectCode::Identity,
                seq: 0,
                message: format!(
                    "invalid sensor id {:?}: {}",
                    bounded(&sensor_id, conduit_proto::limits::MAX_SENSOR_ID_BYTES),
                    store::SENSOR_ID_GRAMMAR
                ),
            };
            self.reject(&sensor_id, &r).await;
            return;
        }
        if hello.protocol_version != PROTOCOL_VERSION {
            let r = Rejection {
                code: RejectCode::Version,
                seq: 0,
                message: format!(
                    "unsupported stream protocol version {}; this collector speaks version {PROTOCOL_VERSION}",
                    hello.protocol_version
                ),
            };
            self.reject(&sensor_id, &r).await;
            return;
        }
        if let Some(ids) = &self.identities
            && !ids.contains(&sensor_id)
        {
            let r = Rejection {
                code: RejectCode::Identity,
                seq: 0,
                message: format!(
                    "sensor id {sensor_id:?} is not the client certificate's CN or a DNS SAN ({ids:?})"
                ),
            };
            self.reject(&sensor_id, &r).await;
            return;
        }
        if let Some(js) = self.shared.opts.jetstream.clone() {
            return self
                .run_jetstream(js, &sensor_id, &hello, inbound, peer)
                .await;
        }
        let pinned = match store::pinned_key(&self.shared.opts.store.join(&sensor_id)) {
            Ok(k) => k,
            Err(e) => {
                let r = Rejection {
                    code: RejectCode::Storage,
                    seq: 0,
                    message: e.to_string(),
                };
                self.reject(&sensor_id, &r).await;
                return;
            }
        };
        let key = match self
            .shared
            .resolve_key(&sensor_id, &hello.public_key, pinned)
        {
            Ok(k) => k,
            Err(r) => {
                self.reject(&sensor_id, &r).await;
                return;
            }
        };
        let slot = self.shared.slot(&sensor_id);
        let Ok(mut guard) = tokio::time::timeout(BUSY_WAIT, slot.lock_owned()).await else {
            let r = Rejection {
                code: RejectCode::Busy,
                seq: 0,
                message: format!("another stream of sensor {sensor_id:?} is active"),
            };
            self.reject(&sensor_id, &r).await;
            return;
        };
        if guard.as_ref().is_some_and(|s| s.key() != key) {
            *guard = None;
        }
        if guard.is_none() {
            let root = self.shared.opts.store.clone();
            let segment_bytes = self.shared.opts.segment_bytes;
            let id = sensor_id.clone();
            let opened = tokio::task::spawn_blocking(move || {
                SensorStore::open(&root, &id, key, segment_bytes)
            })
            .await;
            match opened {
                Ok(Ok(s)) => *guard = Some(s),
                Ok(Err(e)) => {
                    let r = Rejection {
                        code: RejectCode::Storage,
                        seq: 0,
                        message: format!("cannot open the store: {e}"),
                    };
                    self.reject(&sensor_id, &r).await;
                    return;
                }
                Err(e) => {
                    tracing::error!(error = %e, "store open task failed");
                    return;
                }
            }
        }
        let Some(st) = guard.as_mut() else {
            return;
        };
        let (head_seq, head_hash) = st.head();
        self.shared.alarms.metrics.sensor_seen(&sensor_id, head_seq);
        tracing::info!(sensor = %sensor_id, ?peer, stored_seq = head_seq, sensor_head = hello.head_seq,
            "sensor connected");
        let cosignature = st.witnessed().map(|c| c.to_proto());
        if !self.send(welcome((head_seq, head_hash), cosignature)).await {
            return;
        }
        let (reader, mut brx) = spawn_reader(inbound);
        // Pipeline: while one fdatasync runs on a blocking thread, the next batches are
        // verified and appended; each Ack names what the finished sync covered.
        let mut acked = head_seq;
        let mut syncing: Option<tokio::task::JoinHandle<std::io::Result<u64>>> = None;
        let mut dirty = false;
        let mut closing: Option<Option<Rejection>> = None;
        let mut stop = self.shared.shutdown.subscribe();
        let mut storage_failed = false;
        // A stream that sends nothing is evicted, so a held slot cannot lock a sensor out.
        let idle_timeout = self.shared.limits().stream_idle_timeout;
        let silence = tokio::time::sleep(idle_timeout);
        tokio::pin!(silence);
        loop {
            if syncing.is_none() && (dirty || closing.is_some()) {
                dirty = false;
                match st.durability_point() {
                    Ok(Some((seq, file))) if seq > acked => {
                        syncing = Some(tokio::task::spawn_blocking(move || {
                            file.sync_data().map(|()| seq)
                        }));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        storage_failed = true;
                        let r = Rejection {
                            code: RejectCode::Storage,
                            seq: st.head().0,
                            message: format!("store: {e}"),
                        };
                        self.reject(&sensor_id, &r).await;
                        break;
                    }
                }
            }
            if syncing.is_none()
                && let Some(rejection) = closing.take()
            {
                if let Some(r) = rejection {
                    self.reject(&sensor_id, &r).await;
                }
                break;
            }
            tokio::select! {
                biased;
                done = async {
                    match syncing.as_mut() {
                        Some(h) => h.await,
                        None => std::future::pending().await,
                    }
                }, if syncing.is_some() => {
                    syncing = None;
                    let seq = match done {
                        Ok(Ok(seq)) => seq,
                        Ok(Err(e)) => {
                            storage_failed = true;
                            let r = Rejection {
                                code: RejectCode::Storage,
                                seq: acked + 1,
                                message: format!("fsync of the store failed: {e}"),
                            };
                            self.reject(&sensor_id, &r).await;
                            break;
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "fsync task failed");
                            break;
                        }
                    };
                    acked = acked.max(seq);
                    self.shared.committed.notify_waiters();
                    let cosignature = self.witness(st, &sensor_id, acked);
                    if self
                        .out
                        .send(msg(collector_message::Msg::Ack(v1::Ack {
                            stored_seq: acked,
                            cosignature: cosignature.map(|c| c.to_proto()),
                        })))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                () = async {
                    let _ = stop.wait_for(|s| *s).await;
                }, if closing.is_none() => {
                    tracing::info!(sensor = %sensor_id, "collector shutting down: ending the stream");
                    closing = Some(None);
                }
                () = &mut silence, if closing.is_none() => {
                    tracing::warn!(sensor = %sensor_id, timeout = ?idle_timeout,
                        "sensor stream silent: evicting it");
                    self.shared.alarms.metrics.streams_evicted.inc();
                    closing = Some(None);
                }
                first = brx.recv(), if closing.is_none() => {
                    silence.as_mut().reset(tokio::time::Instant::now() + idle_timeout);
                    let Some(first) = first else {
                        closing = Some(None);
                        continue;
                    };
                    let group = group_after(first, &mut brx);
                    // Verification and appends are CPU and disk work: off the async workers.
                    let (applied, rejection, ended) =
                        tokio::task::block_in_place(|| self.apply_group(st, &sensor_id, &group));
                    let m = &self.shared.alarms.metrics;
                    m.records_stored.inc_by(applied.appended);
                    m.records_duplicate.inc_by(applied.duplicates);
                    m.sensor_seen(&sensor_id, st.head().0);
                    dirty = true;
                    if applied.appended == 0 && applied.duplicates > 0 && st.head().0 == acked {
                        // Only re-sent frames: acknowledge at once so the sensor moves on.
                        dirty = false;
                        if self
                            .out
                            .send(msg(collector_message::Msg::Ack(v1::Ack {
                                stored_seq: acked,
                                cosignature: None,
                            })))
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                    storage_failed |= rejection.as_ref().is_some_and(|r| r.code == RejectCode::Storage);
                    if rejection.is_some() || ended {
                        closing = Some(rejection);
                    }
                }
            }
        }
        reader.abort();
        st.touch();
        if storage_failed || st.head().0 != acked {
            // Unknown state on disk: the next stream reopens the store (recovery).
            tracing::warn!(sensor = %sensor_id, "store error: reopening it for the next stream");
            *guard = None;
        }
        tracing::info!(sensor = %sensor_id, stored_seq = acked, "sensor disconnected");
    }
}
