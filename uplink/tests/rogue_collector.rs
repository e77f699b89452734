//! A rogue or broken collector (issue 10, failure 8): a Welcome or an Ack for records
//! the sensor never sent, or with another hash, is not trusted; `<spool>/acked`
//! never moves past what the spool can vouch for, so no unsent segment is deleted.

use std::time::Duration;

use conduit_evidence::chain::{Recorder, RecorderOptions};
use conduit_evidence::spool::{SpoolReader, SyncPolicy};
use conduit_proto::v1::{
    self, CollectorMessage, SensorMessage,
    collector_message::Msg,
    collector_server::{Collector, CollectorServer},
};
use conduit_uplink::{UplinkOptions, read_acked, status_channel, stream_spool};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

#[derive(Clone)]
struct Rogue {
    welcome_seq: u64,
    welcome_hash: Vec<u8>,
    /// Ack sent after the first batch (None: none).
    ack: Option<u64>,
    /// The Welcome's witnessed head.
    cosignature: Option<v1::Cosignature>,
}

#[tonic::async_trait]
impl Collector for Rogue {
    type StreamStream = ReceiverStream<Result<CollectorMessage, Status>>;

    async fn stream(
        &self,
        req: Request<Streaming<SensorMessage>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(8);
        let me = self.clone();
        tokio::spawn(async move {
            let _hello = inbound.message().await;
            let welcome = v1::Welcome {
                protocol_version: 1,
                last_stored_seq: me.welcome_seq,
                last_stored_hash: me.welcome_hash.clone(),
                last_cosignature: me.cosignature.clone(),
            };
            let _ = tx
                .send(Ok(CollectorMessage {
                    msg: Some(Msg::Welcome(welcome)),
                }))
                .await;
            if let Some(seq) = me.ack {
                let _ = inbound.message().await;
                let _ = tx
                    .send(Ok(CollectorMessage {
                        msg: Some(Msg::Ack(v1::Ack {
                            stored_seq: seq,
                            cosignature: None,
                        })),
                    }))
                    .await;
            }
            while let Ok(Some(_)) = inbound.message().await {}
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

fn rogue(welcome_seq: u64, welcome_hash: Vec<u8>, ack: Option<u64>) -> Rogue {
    Rogue {
        welcome_seq,
        welcome_hash,
        ack,
        cosignature: None,
    }
}

fn spool_with(dir: &std::path::Path, n: u64) -> Vec<[u8; 32]> {
    let mut opts = RecorderOptions::new(dir, "gw-rogue");
    opts.sync = SyncPolicy::OsOnly;
    let (mut rec, _) = Recorder::open(opts).expect("recorder");
    for i in 0..n {
        rec.append(v1::Record {
            kind: v1::RecordKind::FlowStart as i32,
            body: Some(v1::record::Body::Flow(v1::Flow {
                flow_id: i,
                ..Default::default()
            })),
            ..Default::default()
        })
        .expect("append");
    }
    rec.sync().expect("sync");
    SpoolReader::new(dir, 1)
        .map(|f| f.expect("frame").hash)
        .collect()
}

/// Runs the uplink against `rogue` until its status shows `want` in the last error
/// (or `acked_seq` reaches `until_acked`); returns the final status.
async fn run_against(
    rogue: Rogue,
    spool: &std::path::Path,
    want: &str,
) -> conduit_uplink::UplinkStatus {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(CollectorServer::new(rogue))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let mut opts = UplinkOptions::new(format!("http://127.0.0.1:{port}"), "gw-rogue");
    opts.poll_interval = Duration::from_millis(10);
    opts.backoff_max = Duration::from_millis(200);
    let (tx, mut rx) = status_channel();
    let (stop_tx, stop_rx) = watch::channel(false);
    let task = tokio::spawn(stream_spool(opts, spool.to_owned(), tx, stop_rx));
    let seen = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let s = rx.borrow().clone();
            if s.last_error.as_deref().is_some_and(|e| e.contains(want))
                || (want.is_empty() && s.connected)
            {
                return s;
            }
            if rx.changed().await.is_err() {
                return s;
            }
        }
    })
    .await
    .expect("status");
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    server.abort();
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_claiming_unsent_records_is_not_trusted() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let spool = tmp.path();
    let hashes = spool_with(spool, 20);
    let head = hashes.len() as u64;

    // A Welcome far beyond the spool's head.
    let s = run_against(rogue(1_000_000, vec![9; 32], None), spool, "not trusted").await;
    assert_eq!(s.acked_seq, 0, "{s:?}");
    assert_eq!(read_acked(spool), None);

    // A stored seq the spool holds, but with another hash.
    let s = run_against(rogue(5, vec![1; 32], None), spool, "not trusted").await;
    assert_eq!(s.acked_seq, 0, "{s:?}");
    assert_eq!(read_acked(spool), None);

    // An Ack beyond everything sent.
    let s = run_against(rogue(0, Vec::new(), Some(1_000_000)), spool, "not trusted").await;
    assert!(s.acked_seq <= head, "{s:?}");
    assert!(
        read_acked(spool).is_none_or(|a| a == 0),
        "{:?}",
        read_acked(spool)
    );

    // The right hash is accepted.
    let s = run_against(rogue(5, hashes[4].to_vec(), None), spool, "").await;
    assert_eq!(s.acked_seq, 5, "{s:?}");
    assert_eq!(read_acked(spool), Some(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cosignature_of_another_history_is_not_kept() {
    use conduit_evidence::chain::cosignature::{self, Cosignature};
    let tmp = tempfile::tempdir().expect("tempdir");
    let spool = tmp.path();
    let hashes = spool_with(spool, 20);
    let witness = ed25519_dalek::SigningKey::from_bytes(&[5; 32]);
    let welcome = |c: Cosignature| Rogue {
        cosignature: Some(c.to_proto()),
        ..rogue(5, hashes[4].to_vec(), None)
    };
    // Validly signed, but for a hash the spool does not hold at that seq.
    let lie = Cosignature::sign(&witness, "gw-rogue", 5, &[7; 32], 1);
    let s = run_against(welcome(lie), spool, "not trusted").await;
    assert_eq!(s.witnessed_seq, 0, "{s:?}");
    assert!(
        cosignature::read(spool)
            .expect("read")
            .cosignatures
            .is_empty()
    );
    // Beyond what the collector says it stored.
    let ahead = Cosignature::sign(&witness, "gw-rogue", 6, &hashes[5], 1);
    let s = run_against(welcome(ahead), spool, "not trusted").await;
    assert_eq!(s.witnessed_seq, 0, "{s:?}");
    // The spool's own head at seq 5: kept.
    let good = Cosignature::sign(&witness, "gw-rogue", 5, &hashes[4], 1);
    let s = run_against(welcome(good), spool, "").await;
    assert_eq!(s.witnessed_seq, 5, "{s:?}");
    assert_eq!(
        cosignature::read(spool).expect("read").cosignatures,
        vec![good]
    );
}
