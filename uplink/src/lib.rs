//! The uplink: streams the spool directory to the collector over gRPC
//! (`conduit.v1.Collector/Stream`, proto/conduit/v1/stream.proto).
//!
//! It reads the segment files on disk (never the agent's memory), so it is a separate
//! task that only needs the spool directory. The collector acknowledges what it has
//! fsynced; the uplink publishes that watermark in [`UplinkStatus`] and in the file
//! `<spool>/acked` ([`read_acked`]), from which the agent calls
//! `Recorder::acknowledge` (the only writer of the spool stays the agent).
//!
//! The collector's witness cosignatures (in Acks, and the last one in the Welcome)
//! are checked against the spool and kept in `<spool>/witness.cosig`
//! (docs/witness.md); the segments stay the agent's alone.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::Duration;

use conduit_proto::v1::{
    self, SensorMessage, StreamProtocol, collector_client::CollectorClient, collector_message,
    sensor_message,
};
use tokio::sync::{mpsc, watch};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use conduit_evidence::chain::checkpoint::sign_batch;
use conduit_evidence::chain::cosignature::{self, Cosignature};
use conduit_evidence::chain::declared_gap::DeclaredGap;
use conduit_evidence::chain::keys;
use conduit_evidence::spool::{ReadError, SpoolReader, StoredFrame};

/// Version of the stream protocol this sensor speaks.
pub const PROTOCOL_VERSION: u32 = StreamProtocol::V1 as u32;
/// `<spool>/witness.cosig` is cut to its newest [`COSIG_KEEP`] lines once it is
/// larger than this (about 430 lines).
pub const COSIG_COMPACT_BYTES: u64 = 128 * 1024;
pub const COSIG_KEEP: usize = 128;
/// File in the spool directory holding the collector's acknowledged seq (decimal).
pub const ACKED_FILE: &str = "acked";

/// Client certificate, key and CA (PEM files) for mTLS.
#[derive(Debug, Clone)]
pub struct UplinkTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    /// Name to verify in the collector's certificate; default: the URL's host.
    pub domain: Option<String>,
}

#[derive(Debug, Clone)]
pub struct UplinkOptions {
    /// Collectors in order of preference, each `https://host:port` (needs `tls`) or
    /// `http://host:port` (plain text, warned). The uplink sticks to one and moves
    /// to the next when its stream fails; each resumes from what it has stored.
    pub collectors: Vec<String>,
    pub sensor_id: String,
    pub tls: Option<UplinkTls>,
    /// Signing public key; None: read `<spool>/signing.pub`.
    pub public_key: Option<[u8; 32]>,
    /// The chain's signing key (PKCS#8 PEM), which signs every batch;
    /// None: `<spool>/signing.key`.
    pub signing_key: Option<PathBuf>,
    pub batch_max_frames: usize,
    pub batch_max_bytes: usize,
    /// Batches sent and not yet acknowledged, at most.
    pub window: usize,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// How often to look for new frames when the spool has nothing new.
    pub poll_interval: Duration,
    pub connect_timeout: Duration,
}

impl UplinkOptions {
    pub fn new(collector: impl Into<String>, sensor_id: impl Into<String>) -> UplinkOptions {
        UplinkOptions {
            collectors: vec![collector.into()],
            sensor_id: sensor_id.into(),
            tls: None,
            public_key: None,
            signing_key: None,
            batch_max_frames: conduit_proto::limits::MAX_BATCH_FRAMES,
            batch_max_bytes: conduit_proto::limits::MAX_BATCH_BYTES,
            window: 16,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(30),
            poll_interval: Duration::from_millis(50),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// For metrics and `/readyz`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UplinkStatus {
    pub connected: bool,
    /// The collector streamed to (or last tried).
    pub collector: String,
    /// Highest seq the collector has stored durably.
    pub acked_seq: u64,
    /// Records read from the spool and not yet acknowledged.
    pub lag_records: u64,
    /// Highest seq read from the spool so far.
    pub read_seq: u64,
    pub reconnects: u64,
    pub last_error: Option<String>,
    /// Seq of the newest head the collector cosigned and the spool keeps (0: none).
    pub witnessed_seq: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error("collector URL {url:?}: {what}")]
    Config { url: String, what: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Key(#[from] keys::KeyError),
    #[error("connecting to the collector: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("collector: {0}")]
    Status(Box<tonic::Status>),
    #[error("collector rejected the stream ({code:?}) at seq {seq}: {message}")]
    Rejected {
        code: v1::RejectCode,
        message: String,
        seq: u64,
    },
    #[error("collector protocol error: {0}")]
    Protocol(String),
    #[error("collector closed the stream")]
    Closed,
    #[error(transparent)]
    Read(#[from] ReadError),
}

impl From<tonic::Status> for UplinkError {
    fn from(s: tonic::Status) -> Self {
        UplinkError::Status(Box::new(s))
    }
}

/// A status channel to pass to [`stream_spool`].
pub fn status_channel() -> (watch::Sender<UplinkStatus>, watch::Receiver<UplinkStatus>) {
    watch::channel(UplinkStatus::default())
}

/// The collector's acknowledged seq as last written by the uplink (None: none yet).
pub fn read_acked(spool_dir: &Path) -> Option<u64> {
    std::fs::read_to_string(spool_dir.join(ACKED_FILE))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The collector's stored position, if this spool can vouch for it: the spool holds
/// that seq with the same hash, or the seq is at most what this uplink already
/// verified and recorded as acknowledged (its segments may be deleted since).
fn check_welcome(spool_dir: &Path, w: &v1::Welcome) -> Result<u64, UplinkError> {
    let seq = w.last_stored_seq;
    if seq == 0 {
        return Ok(0);
    }
    let untrusted = |why: String| {
        UplinkError::Protocol(format!(
            "collector says it stored up to seq {seq}, but {why}: not trusted, nothing acknowledged"
        ))
    };
    match SpoolReader::new(spool_dir, seq).next_frame() {
        Ok(Some(f)) if f.seq == seq => {
            if f.hash[..] == w.last_stored_hash[..] {
                Ok(seq)
            } else {
                Err(untrusted(format!(
                    "the spool's seq {seq} has hash {}, the collector's {}",
                    hex(&f.hash),
                    hex(&w.last_stored_hash)
                )))
            }
        }
        Ok(_) if read_acked(spool_dir).is_some_and(|a| seq <= a) => Ok(seq),
        Ok(_) => Err(untrusted(
            "the spool does not hold that seq and it was never acknowledged".to_owned(),
        )),
        Err(e) => Err(untrusted(format!(
            "its seq cannot be read from the spool ({e})"
        ))),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Checks a cosignature the collector sent and keeps it in `<spool>/witness.cosig`
/// if it is new. It must be signed by the key it names, for this sensor, for a seq
/// the collector has stored (at most `stored_seq`), and name the hash the spool
/// holds at that seq: a collector that cosigns another history is not trusted.
/// Returns the seq kept, if any.
fn keep_cosignature(
    spool_dir: &Path,
    sensor_id: &str,
    c: &v1::Cosignature,
    stored_seq: u64,
    witnessed_seq: u64,
) -> Result<Option<u64>, UplinkError> {
    let untrusted =
        |why: String| UplinkError::Protocol(format!("collector's cosignature {why}: not trusted"));
    let c = Cosignature::from_proto(c).map_err(untrusted)?;
    if c.seq <= witnessed_seq {
        return Ok(None);
    }
    if c.seq > stored_seq {
        return Err(untrusted(format!(
            "is for seq {}, beyond what it stored (seq {stored_seq})",
            c.seq
        )));
    }
    c.verify(sensor_id)
        .map_err(|e| untrusted(format!("of seq {}: {e}", c.seq)))?;
    match SpoolReader::new(spool_dir, c.seq).next_frame() {
        Ok(Some(f)) if f.seq == c.seq => {
            if f.hash != c.hash {
                return Err(untrusted(format!(
                    "names hash {} for seq {}, the spool holds hash {}",
                    hex(&c.hash),
                    c.seq,
                    hex(&f.hash)
                )));
            }
        }
        // Deleted since it was acknowledged: the spool cannot vouch for it.
        Ok(_) => return Ok(None),
        Err(e) => {
            return Err(untrusted(format!(
                "of seq {} cannot be checked against the spool ({e})",
                c.seq
            )));
        }
    }
    cosignature::append(spool_dir, &c).map_err(|e| UplinkError::Io {
        path: spool_dir.join(cosignature::COSIG_FILE),
        source: e,
    })?;
    // Bounded beside the spool: the newest witnessed head covers all before it.
    if let Err(e) = cosignature::compact(spool_dir, COSIG_COMPACT_BYTES, COSIG_KEEP) {
        tracing::warn!(error = %e, "cannot compact the witness cosignatures");
    }
    tracing::debug!(seq = c.seq, "collector cosigned the chain head");
    Ok(Some(c.seq))
}

/// The newest seq in `<spool>/witness.cosig` (0: none or unreadable).
fn witnessed_seq(spool_dir: &Path) -> u64 {
    match cosignature::read(spool_dir) {
        Ok(w) => w.last().map_or(0, |c| c.seq),
        Err(e) => {
            tracing::warn!(error = %e, "witness cosignatures unreadable");
            0
        }
    }
}

fn write_acked(spool_dir: &Path, seq: u64) -> Result<(), UplinkError> {
    let path = spool_dir.join(ACKED_FILE);
    let tmp = spool_dir.join(format!("{ACKED_FILE}.tmp"));
    // Rename is atomic; no fsync: a lost watermark only delays segment deletion.
    std::fs::write(&tmp, format!("{seq}\n"))
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| UplinkError::Io { path, source: e })
}

/// Streams `spool_dir` to the collector until `shutdown` turns true, reconnecting
/// with exponential backoff and jitter. Returns Err only for configuration errors.
pub async fn stream_spool(
    opts: UplinkOptions,
    spool_dir: PathBuf,
    status: watch::Sender<UplinkStatus>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), UplinkError> {
    let mut endpoints = Vec::with_capacity(opts.collectors.len());
    for url in &opts.collectors {
        endpoints.push((url.as_str(), endpoint(&opts, url).await?));
    }
    if endpoints.is_empty() {
        return Err(UplinkError::Config {
            url: String::new(),
            what: "no collector URL".to_owned(),
        });
    }
    let mut delay = opts.backoff_min;
    // The collector in use, and how many failed in turn since the last progress.
    let (mut at, mut failed_in_turn) = (0, 0);
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let (url, endpoint) = &endpoints[at];
        status.send_modify(|s| s.collector = (*url).to_owned());
        let mut progressed = false;
        let result = session(
            &opts,
            url,
            endpoint,
            &spool_dir,
            &status,
            &mut shutdown,
            &mut progressed,
        )
        .await;
        let err = match result {
            Ok(()) => return Ok(()),
            Err(e @ (UplinkError::Config { .. } | UplinkError::Key(_))) => return Err(e),
            Err(e) => e,
        };
        if progressed {
            delay = opts.backoff_min;
            failed_in_turn = 0;
        }
        // Fail over to the next collector; it resumes from what it has stored.
        at = (at + 1) % endpoints.len();
        failed_in_turn += 1;
        let jittered = delay.mul_f64(rand::Rng::gen_range(&mut rand::thread_rng(), 0.5..1.5));
        tracing::warn!(collector = %url, error = %err, next = %endpoints[at].0,
            retry_in_ms = jittered.as_millis() as u64, "collector uplink down");
        status.send_modify(|s| {
            s.connected = false;
            s.reconnects += 1;
            s.last_error = Some(err.to_string());
        });
        tokio::select! {
            _ = tokio::time::sleep(jittered) => {}
            _ = shutdown.changed() => return Ok(()),
        }
        // Back off further only once every collector has failed in turn.
        if failed_in_turn >= endpoints.len() {
            failed_in_turn = 0;
            delay = (delay * 2).min(opts.backoff_max);
        }
    }
}

async fn endpoint(opts: &UplinkOptions, url: &str) -> Result<Endpoint, UplinkError> {
    let cfg_err = |what: String| UplinkError::Config {
        url: url.to_owned(),
        what,
    };
    let mut ep = Endpoint::from_shared(url.to_owned())
        .map_err(|e| cfg_err(e.to_string()))?
        .connect_timeout(opts.connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    let https = url.starts_with("https://");
    match (&opts.tls, https) {
        (Some(tls), true) => {
            let cert = read_file(&tls.cert).await?;
            let key = read_file(&tls.key).await?;
            let ca = read_file(&tls.ca).await?;
            let mut cfg = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca))
                .identity(Identity::from_pem(cert, key));
            if let Some(d) = &tls.domain {
                cfg = cfg.domain_name(d.clone());
            }
            ep = ep.tls_config(cfg)?;
        }
        (None, true) => {
            return Err(cfg_err(
                "https:// needs --tls-cert, --tls-key and --tls-ca".to_owned(),
            ));
        }
        (Some(_), false) => {
            return Err(cfg_err(
                "TLS files given but the URL is not https://".to_owned(),
            ));
        }
        (None, false) => {
            tracing::warn!(
                collector = %url,
                "uplink uses plain text (http://): records and the sensor identity are not protected in transit; use https:// with mTLS"
            );
        }
    }
    Ok(ep)
}

async fn read_file(path: &Path) -> Result<Vec<u8>, UplinkError> {
    tokio::fs::read(path).await.map_err(|e| UplinkError::Io {
        path: path.to_owned(),
        source: e,
    })
}

fn frame_msg(f: StoredFrame) -> v1::Frame {
    v1::Frame {
        seq: f.seq,
        prev_hash: f.prev_hash.to_vec().into(),
        hash: f.hash.to_vec().into(),
        record: f.record_bytes.into(),
    }
}

/// One connection: Hello, Welcome, then batches until an error or shutdown.
async fn session(
    opts: &UplinkOptions,
    url: &str,
    endpoint: &Endpoint,
    spool_dir: &Path,
    status: &watch::Sender<UplinkStatus>,
    shutdown: &mut watch::Receiver<bool>,
    progressed: &mut bool,
) -> Result<(), UplinkError> {
    let public_key = match opts.public_key {
        Some(k) => k,
        None => keys::read_public_key(&spool_dir.join(keys::PUB_FILE))?,
    };
    let key_path = opts
        .signing_key
        .clone()
        .unwrap_or_else(|| spool_dir.join(keys::KEY_FILE));
    let signing_key = keys::load_signing_key(&key_path)?;
    if signing_key.verifying_key().to_bytes() != public_key {
        return Err(UplinkError::Config {
            url: url.to_owned(),
            what: format!(
                "the signing key {} is not the chain's public key {}",
                key_path.display(),
                hex(&public_key)
            ),
        });
    }
    let channel: Channel = endpoint.connect().await?;
    let mut client = CollectorClient::new(channel)
        .max_decoding_message_size(conduit_proto::limits::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(conduit_proto::limits::MAX_MESSAGE_BYTES);
    let (tx, rx) = mpsc::channel::<SensorMessage>(opts.window.max(1) + 1);
    let read_seq = status.borrow().read_seq;
    let hello = SensorMessage {
        msg: Some(sensor_message::Msg::Hello(v1::Hello {
            protocol_version: PROTOCOL_VERSION,
            sensor_id: opts.sensor_id.clone(),
            public_key: public_key.to_vec(),
            head_seq: read_seq,
            head_hash: Vec::new(),
        })),
    };
    tx.send(hello).await.map_err(|_| UplinkError::Closed)?;
    let mut inbound = client
        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let welcome = match inbound.message().await?.and_then(|m| m.msg) {
        Some(collector_message::Msg::Welcome(w)) => w,
        Some(collector_message::Msg::Reject(r)) => return Err(rejected(r)),
        Some(other) => {
            return Err(UplinkError::Protocol(format!(
                "expected Welcome, got {other:?}"
            )));
        }
        None => return Err(UplinkError::Closed),
    };
    if welcome.protocol_version != PROTOCOL_VERSION {
        return Err(UplinkError::Protocol(format!(
            "collector speaks protocol version {}, this sensor {PROTOCOL_VERSION}",
            welcome.protocol_version
        )));
    }
    // What an earlier stream (maybe to another collector) had acknowledged: records
    // up to there may be gone from the spool without being lost.
    let acked_before = read_acked(spool_dir).unwrap_or(0);
    // A rogue or broken collector must not make us count unsent records as stored.
    let mut acked = check_welcome(spool_dir, &welcome)?;
    tracing::info!(
        collector = %url,
        last_stored_seq = acked,
        "connected to the collector"
    );
    write_acked(spool_dir, acked)?;
    let mut witnessed = witnessed_seq(spool_dir);
    if let Some(c) = &welcome.last_cosignature
        && let Some(seq) = keep_cosignature(spool_dir, &opts.sensor_id, c, acked, witnessed)?
    {
        witnessed = seq;
    }
    status.send_modify(|s| {
        s.witnessed_seq = witnessed;
        s.connected = true;
        s.acked_seq = acked;
        s.read_seq = s.read_seq.max(acked);
        s.lag_records = s.read_seq - acked;
        s.last_error = None;
    });
    let mut spool = SpoolReader::follow(spool_dir, acked + 1);
    // Last seq of each batch sent and not yet acknowledged.
    let mut in_flight: VecDeque<u64> = VecDeque::new();
    // Highest seq sent on this stream: an Ack beyond it cannot be true.
    let mut sent_seq = acked;
    let mut idle = false;
    let mut frames = Vec::new();
    // Declared for the next batch, which starts right after it.
    let mut gap: Option<DeclaredGap> = None;
    loop {
        let can_send = in_flight.len() < opts.window.max(1);
        let wait = if idle {
            opts.poll_interval
        } else {
            Duration::ZERO
        };
        tokio::select! {
            biased;
            _ = shutdown.changed() => return Ok(()),
            m = inbound.message() => match m?.and_then(|m| m.msg) {
                Some(collector_message::Msg::Ack(a)) => {
                    if a.stored_seq > sent_seq {
                        return Err(UplinkError::Protocol(format!(
                            "collector acknowledged seq {} but only {sent_seq} was sent: not trusted",
                            a.stored_seq
                        )));
                    }
                    while in_flight.front().is_some_and(|s| *s <= a.stored_seq) {
                        in_flight.pop_front();
                    }
                    if let Some(c) = &a.cosignature
                        && let Some(seq) = keep_cosignature(
                            spool_dir, &opts.sensor_id, c, a.stored_seq, witnessed,
                        )?
                    {
                        witnessed = seq;
                        status.send_modify(|s| s.witnessed_seq = seq);
                    }
                    if a.stored_seq > acked {
                        // Only stored records reset the backoff: a collector that
                        // welcomes and then rejects must not be hammered.
                        *progressed = true;
                        acked = a.stored_seq;
                        write_acked(spool_dir, acked)?;
                        status.send_modify(|s| {
                            s.acked_seq = acked;
                            s.lag_records = s.read_seq.saturating_sub(acked);
                        });
                    }
                }
                Some(collector_message::Msg::Reject(r)) => return Err(rejected(r)),
                Some(collector_message::Msg::Welcome(_)) => {
                    return Err(UplinkError::Protocol("second Welcome".to_owned()));
                }
                None => return Err(UplinkError::Closed),
            },
            _ = tokio::time::sleep(wait), if can_send => {
                frames.clear();
                // Page-cache reads of at most a chunk: short enough to do inline.
                if let Err(e) = spool.poll(opts.batch_max_frames, opts.batch_max_bytes, &mut frames)
                    && frames.is_empty()
                {
                    // Damage where nothing was stored: declare it and go on after it
                    // (frames read before it go first; the reader stops at it again).
                    let (next, g) = declare_gap(
                        spool_dir, &opts.sensor_id, &signing_key, sent_seq + 1, acked_before, e,
                    )?;
                    spool = next;
                    gap = Some(g);
                    continue;
                }
                let Some(last) = frames.last().map(|f| f.seq) else {
                    idle = true;
                    continue;
                };
                idle = false;
                let last_hash = frames.last().map_or([0; 32], |f| f.hash);
                let batch = v1::Batch {
                    signature: sign_batch(&signing_key, &opts.sensor_id, last, &last_hash),
                    frames: frames.drain(..).map(frame_msg).collect(),
                    gap: gap.take().map(|g| g.to_proto()),
                };
                tx.send(SensorMessage { msg: Some(sensor_message::Msg::Batch(batch)) })
                    .await
                    .map_err(|_| UplinkError::Closed)?;
                in_flight.push_back(last);
                sent_seq = sent_seq.max(last);
                status.send_modify(|s| {
                    s.read_seq = s.read_seq.max(last);
                    s.lag_records = s.read_seq.saturating_sub(s.acked_seq);
                });
            }
        }
    }
}

/// The spool cannot give `wanted` (a deleted or cut segment, records this collector
/// never stored): the records up to the next segment are lost to it. Returns a reader
/// from that segment and the signed declaration of `wanted..` up to it. With no
/// segment after the damage (the newest one is the writer's to recover), the read
/// error stays. Records up to `acked_before` were acknowledged by an earlier stream
/// (another collector, or this one before it lost its store), and the reason says so.
fn declare_gap(
    spool_dir: &Path,
    sensor_id: &str,
    key: &ed25519_dalek::SigningKey,
    wanted: u64,
    acked_before: u64,
    error: ReadError,
) -> Result<(SpoolReader, DeclaredGap), UplinkError> {
    // An I/O error may pass; only damage in what is stored makes records lost.
    if matches!(error, ReadError::Io { .. }) {
        return Err(error.into());
    }
    let segments =
        conduit_evidence::spool::segment::list(spool_dir).map_err(|e| UplinkError::Io {
            path: spool_dir.to_owned(),
            source: e,
        })?;
    let Some(&(resume, _)) = segments.iter().find(|(first, _)| *first > wanted) else {
        return Err(error.into());
    };
    let first = match SpoolReader::new(spool_dir, resume).next_frame() {
        Ok(Some(f)) if f.seq == resume => f,
        _ => return Err(error.into()),
    };
    let reason = if resume - 1 <= acked_before {
        format!(
            "acknowledged earlier (up to seq {acked_before}) and deleted from the spool since: {error}"
        )
    } else {
        error.to_string()
    };
    let g = DeclaredGap::sign(
        key,
        sensor_id,
        wanted,
        resume - 1,
        &first.prev_hash,
        &reason,
    );
    tracing::error!(from = g.from, to = g.to, reason = %g.reason,
        "spool records lost before the collector stored them: declaring the gap and streaming on");
    Ok((SpoolReader::follow(spool_dir, resume), g))
}

fn rejected(r: v1::Reject) -> UplinkError {
    UplinkError::Rejected {
        code: v1::RejectCode::try_from(r.code).unwrap_or(v1::RejectCode::Unspecified),
        message: r.message,
        seq: r.seq,
    }
}
