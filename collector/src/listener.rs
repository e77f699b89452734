//! The accept loop: never ends on an accept error (EMFILE and the like are logged,
//! counted and waited out), admits a connection only under the total and per-peer
//! caps, bounds the TLS handshake, and closes a connection that holds no stream for
//! longer than the Hello deadline. Its stream of connections ends only at shutdown.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Sleep;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::server::Shared;

/// Open connections, by peer, with each connection's stream count.
#[derive(Debug)]
pub struct Gate {
    limits: Limits,
    metrics: Arc<Metrics>,
    state: Mutex<GateState>,
}

#[derive(Debug, Default)]
struct GateState {
    total: usize,
    per_peer: HashMap<IpAddr, usize>,
    conns: HashMap<SocketAddr, Arc<ConnState>>,
}

/// What the connection's reader needs to know about its streams.
#[derive(Debug)]
pub struct ConnState {
    streams: AtomicUsize,
    /// Milliseconds since `epoch` when the last stream ended (or the accept).
    idle_since_ms: AtomicU64,
    epoch: Instant,
}

impl ConnState {
    fn new() -> ConnState {
        ConnState {
            streams: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    fn idle_for(&self) -> Duration {
        if self.streams.load(Ordering::Acquire) > 0 {
            return Duration::ZERO;
        }
        let since = Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire));
        self.epoch.elapsed().saturating_sub(since)
    }
}

/// Held by a stream while it runs; its end starts the connection's idle clock.
pub struct StreamGuard(Arc<ConnState>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let ms = u64::try_from(self.0.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.0.idle_since_ms.store(ms, Ordering::Release);
        self.0.streams.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One admitted connection's place under the caps; released on drop.
pub struct Permit {
    gate: Arc<Gate>,
    peer: SocketAddr,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut st = self.gate.lock();
        st.total -= 1;
        st.conns.remove(&self.peer);
        if let Some(n) = st.per_peer.get_mut(&self.peer.ip()) {
            *n -= 1;
            if *n == 0 {
                st.per_peer.remove(&self.peer.ip());
            }
        }
        self.gate.metrics.connections_open.dec();
    }
}

/// Why a connection was refused or closed early (metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Total,
    PerPeer,
    Handshake,
    Idle,
}

impl Gate {
    pub fn new(limits: Limits, metrics: Arc<Metrics>) -> Arc<Gate> {
        Arc::new(Gate {
            limits,
            metrics,
            state: Mutex::new(GateState::default()),
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// A place for a new connection from `peer`, or why not.
    pub fn admit(self: &Arc<Self>, peer: SocketAddr) -> Result<(Permit, Arc<ConnState>), Refusal> {
        let mut st = self.lock();
        if st.total >= self.limits.max_connections {
            return Err(Refusal::Total);
        }
        let n = st.per_peer.entry(peer.ip()).or_default();
        if *n >= self.limits.max_connections_per_peer {
            return Err(Refusal::PerPeer);
        }
        *n += 1;
        st.total += 1;
        let conn = Arc::new(ConnState::new());
        st.conns.insert(peer, conn.clone());
        self.metrics.connections_open.inc();
        Ok((
            Permit {
                gate: self.clone(),
                peer,
            },
            conn,
        ))
    }

    /// Marks a stream as running on the connection from `peer` (None: unknown peer,
    /// e.g. an in-process transport).
    pub fn stream_started(&self, peer: Option<SocketAddr>) -> Option<StreamGuard> {
        let conn = self.lock().conns.get(&peer?)?.clone();
        conn.streams.fetch_add(1, Ordering::AcqRel);
        Some(StreamGuard(conn))
    }

    fn refused(&self, why: Refusal, peer: SocketAddr) {
        self.metrics.refused(why);
        warn_limited(&self.metrics.last_refusal_log, || {
            tracing::warn!(%peer, reason = ?why, "connection refused or closed (resource limit)");
        });
    }
}

/// Logs at most once a second per `slot` (a hostile peer must not flood the log).
fn warn_limited(slot: &AtomicU64, log: impl FnOnce()) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if slot.swap(now, Ordering::Relaxed) != now {
        log();
    }
}

/// A TCP connection under the caps: closes itself (a read error) once it has held
/// no stream for `hello_timeout`.
pub struct Guarded {
    inner: TcpStream,
    conn: Arc<ConnState>,
    _permit: Permit,
    gate: Arc<Gate>,
    tick: Pin<Box<Sleep>>,
}

impl Guarded {
    fn check_every(&self) -> Duration {
        (self.gate.limits.hello_timeout / 4).max(Duration::from_millis(100))
    }

    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        while self.tick.as_mut().poll(cx).is_ready() {
            if self.conn.idle_for() >= self.gate.limits.hello_timeout {
                return true;
            }
            let next = tokio::time::Instant::now() + self.check_every();
            self.tick.as_mut().reset(next);
        }
        false
    }
}

impl Connected for Guarded {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.expired(cx) {
            let peer = self._permit.peer;
            self.gate.refused(Refusal::Idle, peer);
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no stream within the Hello deadline: connection closed",
            )));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Connections accepted on `listener`, each through `handshake` (TLS, or none)
/// within the handshake deadline. Ends only when the collector shuts down.
pub fn incoming<IO, F, Fut>(
    listener: TcpListener,
    shared: Arc<Shared>,
    handshake: F,
) -> ReceiverStream<io::Result<IO>>
where
    IO: Send + 'static,
    F: Fn(Guarded) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = io::Result<IO>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let gate = shared.gate.clone();
        let metrics = shared.alarms.metrics.clone();
        let mut stop = shared.shutdown.subscribe();
        loop {
            let accepted = tokio::select! {
                r = listener.accept() => r,
                _ = stop.wait_for(|s| *s) => return,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    metrics.accept_errors.inc();
                    warn_limited(&metrics.last_accept_log, || {
                        tracing::error!(error = %e, "accept failed (out of file descriptors?); still listening");
                    });
                    // The pending connection stays queued: wait before the next try.
                    tokio::select! {
                        () = tokio::time::sleep(gate.limits.accept_backoff) => continue,
                        _ = stop.wait_for(|s| *s) => return,
                    }
                }
            };
            let (permit, conn) = match gate.admit(peer) {
                Ok(p) => p,
                Err(why) => {
                    gate.refused(why, peer);
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let guarded = Guarded {
                inner: tcp,
                conn,
                _permit: permit,
                gate: gate.clone(),
                tick: Box::pin(tokio::time::sleep(gate.limits.hello_timeout)),
            };
            let (tx, handshake, gate) = (tx.clone(), handshake.clone(), gate.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(gate.limits.handshake_timeout, handshake(guarded)).await
                {
                    Ok(Ok(io)) => {
                        let _ = tx.send(Ok(io)).await;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "handshake failed");
                        gate.metrics.refused(Refusal::Handshake);
                    }
                    Err(_) => gate.refused(Refusal::Handshake, peer),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
