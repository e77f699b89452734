//! QUIC Initial path. Random bytes almost never pass AEAD, so the input drives
//! three layers: the raw datagram parser, the frame walker, and the full table
//! fed with validly protected packets whose plaintext frames are the input.
#![no_main]

use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use sensor_user::tls::quic::{
    QUIC_V1, QUIC_V2, for_each_crypto_frame, parse_long_header, protect_client_initial,
};
use sensor_user::tls::{Limits, QuicInitialTable};

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let mut table = QuicInitialTable::new(Limits::default());
    // 1. The input as a datagram.
    let _ = parse_long_header(data);
    let _ = table.push(0u8, data, now);
    // 2. The input as decrypted Initial payload.
    let _ = for_each_crypto_frame(data, |_, _| {});
    // 3. The input split into up to 3 packet payloads, protected, and pushed
    //    to one flow (first byte picks the version and split points).
    let Some((&ctl, payload)) = data.split_first() else {
        return;
    };
    let version = if ctl & 1 == 0 { QUIC_V1 } else { QUIC_V2 };
    let cut = usize::from(ctl >> 1) * payload.len() / 128;
    let (a, b) = payload.split_at(cut.min(payload.len()));
    let dcid = [0x83, 0x94, 0xc8, 0xf0, 0x3e, 0x51, 0x57, 0x08];
    for (pn, part) in [(0u32, b), (1u32, a)] {
        if let Some(pkt) = protect_client_initial(version, &dcid, &[], pn, part) {
            let _ = table.push(1u8, &pkt, now);
        }
    }
});
