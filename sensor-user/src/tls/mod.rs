//! TLS ClientHello and QUIC Initial parsing, reassembly, JA4.
