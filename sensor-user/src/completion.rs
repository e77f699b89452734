//! Finishing what the kernel left pending: ClientHellos split over TCP segments and
//! QUIC Initials (decryption, CRYPTO reassembly), parsed for SNI, ALPN, version,
//! ECH and JA4.

use std::time::Instant;

use sensor_common::PayloadEvent;

use crate::{config::AppProto, tls::ClientHelloInfo};

/// Outcome of feeding one payload event.
#[derive(Debug)]
pub enum Completed {
    /// The ClientHello is complete and parsed.
    Hello(Box<ClientHelloInfo>, AppProto),
    /// More segments or packets are needed.
    NeedMore,
    /// Not TLS/QUIC (or malformed beyond repair): stop copying payload.
    NotTls,
}

/// Per-flow reassembly state for TCP and QUIC, bounded in memory and time.
#[derive(Debug, Default)]
pub struct Completion {}

impl Completion {
    pub fn new() -> Self {
        Completion::default()
    }

    /// Feeds one payload event.
    pub fn push(&mut self, _event: &PayloadEvent, _now: Instant) -> Completed {
        Completed::NotTls
    }

    /// Drops entries past their time bound; returns how many gave up.
    pub fn expire(&mut self, _now: Instant) -> usize {
        0
    }
}
