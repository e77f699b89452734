//! TLS ClientHello and QUIC Initial parsing, reassembly, JA4.
//!
//! The kernel hands over payloads it could not classify itself (ClientHello
//! split over TCP segments, QUIC Initials); this module finishes the job:
//! [`reassembly`] for TCP, [`quic`] for QUIC, both ending in [`client_hello`]; and
//! the responder's first payload of a TLS flow is read by [`server_hello`].

pub mod client_hello;
pub mod ja4;
pub mod quic;
pub mod reassembly;
pub mod server_hello;

pub use client_hello::{ClientHelloInfo, ParseError, parse_client_hello, parse_handshake};
pub use ja4::Transport;
pub use quic::{
    QuicError, QuicInitialTable, protect_client_initial, protect_server_initial,
    server_initial_crypto,
};
pub use reassembly::{ClientHelloAssembler, Limits, Push, ReassemblyTable};
pub use server_hello::{Negotiated, parse_server_hello, parse_server_hello_handshake};
