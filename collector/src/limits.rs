//! Resource limits of the collector: the one source of their defaults (the CLI
//! flags default to these). Everything a peer can hold open is capped and timed.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Limits {
    /// Open connections in total (a full server closes new ones at once).
    pub max_connections: usize,
    /// Open connections from one IP address.
    pub max_connections_per_peer: usize,
    /// Concurrent gRPC streams on one connection (HTTP/2 SETTINGS).
    pub max_streams_per_connection: u32,
    /// From TCP accept to a finished TLS handshake.
    pub handshake_timeout: Duration,
    /// From accept (or the end of its last stream) to a stream's Hello: a
    /// connection without a live stream for this long is closed.
    pub hello_timeout: Duration,
    /// A stream that sends nothing for this long is evicted (sensors send a signed
    /// checkpoint at least every 10 s, so this is many missed heartbeats).
    pub stream_idle_timeout: Duration,
    /// A sensor store that no stream used for this long is closed (its files too).
    pub store_idle_timeout: Duration,
    /// Pause after a failed accept (EMFILE and the like) so the loop cannot spin.
    pub accept_backoff: Duration,
    /// A sensor that streamed and then sent nothing for this long raises the alarm
    /// `sensor_silent` (three missed 10-second heartbeats).
    pub silent_after: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 512,
            max_connections_per_peer: 16,
            max_streams_per_connection: 2,
            handshake_timeout: Duration::from_secs(10),
            hello_timeout: Duration::from_secs(15),
            stream_idle_timeout: Duration::from_secs(120),
            store_idle_timeout: Duration::from_secs(300),
            accept_backoff: Duration::from_millis(100),
            silent_after: Duration::from_secs(30),
        }
    }
}
