//! Finishing what the kernel left pending: ClientHellos split over TCP segments and
//! QUIC Initials (decryption, CRYPTO reassembly), parsed for SNI, ALPN, version,
//! ECH and JA4. Bounded in memory and time by the tables' limits.

use std::time::{Duration, Instant};

use sensor_common::{FlowKey, PayloadEvent};

use crate::{
    config::AppProto,
    tls::{
        ClientHelloInfo, QuicInitialTable,
        reassembly::{Limits, Push, ReassemblyTable},
    },
};

/// How long a flow's classification may take: an incomplete ClientHello is given
/// up after it, a `flow_start` waits for it at most this long, and a stopping agent
/// stays attached at most this long to finish what is pending.
pub const CLASSIFICATION_DEADLINE: Duration = Duration::from_secs(5);

/// Outcome of feeding one payload event.
#[derive(Debug)]
pub enum Completed {
    /// The ClientHello is complete and parsed.
    Hello(Box<ClientHelloInfo>, AppProto),
    /// More segments or packets are needed.
    NeedMore,
    /// Not TLS/QUIC: stop copying payload.
    NotTls,
    /// A TLS handshake record or QUIC Initial that does not parse: stop copying
    /// payload; the flow is recorded with the anomaly.
    Malformed,
    /// A memory bound was hit: the agent writes a `loss` record.
    Limit,
    /// The parsed hello's bytes came again with other values (TCP): the server
    /// names of the rival hellos they form, not reported before (may be empty).
    Contested(Vec<String>),
    /// A later segment of a flow whose hello was read: nothing to do.
    Ignored,
}

/// Per-flow reassembly state for TCP and QUIC.
pub struct Completion {
    tcp: ReassemblyTable<FlowKey>,
    quic: QuicInitialTable<FlowKey>,
}

impl Default for Completion {
    fn default() -> Self {
        let limits = || Limits {
            timeout: CLASSIFICATION_DEADLINE,
            ..Limits::default()
        };
        Completion {
            tcp: ReassemblyTable::new(limits()),
            quic: QuicInitialTable::new(limits()),
        }
    }
}

impl std::fmt::Debug for Completion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Completion").finish_non_exhaustive()
    }
}

impl Completion {
    pub fn new() -> Self {
        Completion::default()
    }

    /// Feeds one payload event. `hello_read`: the flow's classification is final
    /// (a segment after it is only compared with a watched hello, never read as a
    /// new one).
    pub fn push(&mut self, event: &PayloadEvent, hello_read: bool, now: Instant) -> Completed {
        let key = event.header.key;
        let copied = (event.copied_len as usize).min(event.data.len());
        let data = &event.data[..copied];
        if hello_read && (key.protocol == 17 || !self.tcp.watches(&key)) {
            return Completed::Ignored;
        }
        let (push, proto) = if key.protocol == 17 {
            (self.quic.push(key, data, now), AppProto::Quic)
        } else {
            (self.tcp.push(key, event.tcp_seq, data, now), AppProto::Tls)
        };
        match push {
            Push::Done(info) => Completed::Hello(info, proto),
            Push::NeedMore => Completed::NeedMore,
            Push::NotTls => Completed::NotTls,
            Push::Failed(_) => Completed::Malformed,
            Push::Limit => Completed::Limit,
            Push::Contested { names } => Completed::Contested(names),
        }
    }

    /// The flow's server spoke: its hello is no longer watched.
    pub fn answered(&mut self, key: &FlowKey) {
        self.tcp.answered(key);
    }

    /// Parsed hellos left unwatched because the watch table was full.
    pub fn watch_refused(&self) -> u64 {
        self.tcp.watch_refused()
    }

    /// ClientHellos still being reassembled or decrypted.
    pub fn pending(&self) -> usize {
        self.tcp.len() + self.quic.len()
    }

    /// Drops entries past their time bound; returns the flows that gave up.
    pub fn expire(&mut self, now: Instant) -> Vec<FlowKey> {
        let mut gone = self.tcp.expire(now);
        gone.extend(self.quic.expire(now));
        gone
    }
}
