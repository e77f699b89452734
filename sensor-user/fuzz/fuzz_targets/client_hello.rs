//! ClientHello parser: record layer (TCP) and bare handshake (QUIC CRYPTO data).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sensor_user::tls::{parse_client_hello, parse_handshake};

fuzz_target!(|data: &[u8]| {
    if let Ok(info) = parse_client_hello(data) {
        // JA4 always has the a_b_c shape.
        assert_eq!(info.ja4.split('_').count(), 3);
    }
    let _ = parse_handshake(data);
});
