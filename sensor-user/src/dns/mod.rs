//! DNS answers seen on the wire, and what they told each client.
//!
//! The kernel copies DNS responses (UDP/53 payloads, possibly cut short) to the
//! agent. A TLS or QUIC flow whose SNI is missing, an ECH outer name or an IP
//! literal can then still be attributed to the name its client resolved to the
//! flow's destination ([`DnsCache::name_for`]), and an SNI that no answer ever
//! gave the destination for can be flagged ([`DnsCache::resolves`]).
//!
//! [`message`] turns one response into `(name, address, ttl)` answers (following
//! CNAME chains and HTTPS/SVCB records); [`cache`] keeps them per client, bounded
//! and expiring on the caller's clock (the capture's in replay).

pub mod cache;
pub mod message;

pub use cache::{
    DEFAULT_MAX_ENTRIES, DEFAULT_TTL_CAP_S, DEFAULT_TTL_FLOOR_S, DnsCache, DnsLimits, Resolved,
    Resolves,
};
pub use message::{Answer, DnsError, Response, parse_response};
