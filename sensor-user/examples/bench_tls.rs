//! Throughput of the userspace ClientHello and QUIC Initial paths.
//!
//! `cargo run --release -p sensor-user --example bench_tls`
//!
//! Prints machine-parsable lines:
//! `bench tls client_hellos_per_sec=N baseline=M ratio=R` where the baseline is
//! tls-parser's own record + extension parse of the same bytes (our extraction
//! and JA4 on top of it), and
//! `bench quic initials_per_sec=N baseline=M ratio=R` where the baseline is
//! header-protection removal + AES-GCM decryption alone with precomputed keys
//! (key derivation, frame walk, reassembly and parse on top of it).

use std::hint::black_box;
use std::time::{Duration, Instant};

use sensor_user::tls::quic::{QUIC_V1, client_initial_keys, decrypt_initial, parse_long_header};
use sensor_user::tls::reassembly::Limits;
use sensor_user::tls::{QuicInitialTable, parse_client_hello};

fn unhex(s: &str) -> Vec<u8> {
    hex::decode(s.split_whitespace().collect::<String>()).unwrap_or_default()
}

/// Runs `f` repeatedly for about `dur`; returns calls per second.
fn rate(dur: Duration, mut f: impl FnMut()) -> f64 {
    // Warm-up.
    for _ in 0..1000 {
        f();
    }
    let start = Instant::now();
    let mut n = 0u64;
    loop {
        for _ in 0..256 {
            f();
        }
        n += 256;
        let el = start.elapsed();
        if el >= dur {
            return n as f64 / el.as_secs_f64();
        }
    }
}

fn main() {
    let dur = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .map_or(Duration::from_secs(2), Duration::from_secs_f64);

    // RFC 9001 A.2 ClientHello in one TLS record, as a TCP flow would carry it.
    let hello = unhex(include_str!(
        "../src/tls/testdata/rfc9001_a2_client_hello.hex"
    ));
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&u16::try_from(hello.len()).unwrap_or(0).to_be_bytes());
    record.extend_from_slice(&hello);

    let ours = rate(dur, || {
        let r = parse_client_hello(black_box(&record));
        black_box(r.map(|i| i.ja4.len()).unwrap_or(0));
    });
    let baseline = rate(dur, || {
        let mut n = 0usize;
        if let Ok((_, p)) = tls_parser::parse_tls_plaintext(black_box(&record)) {
            for m in &p.msg {
                if let tls_parser::TlsMessage::Handshake(
                    tls_parser::TlsMessageHandshake::ClientHello(ch),
                ) = m
                    && let Some(ext) = ch.ext
                    && let Ok((_, exts)) = tls_parser::parse_tls_client_hello_extensions(ext)
                {
                    n += exts.len();
                }
            }
        }
        black_box(n);
    });
    println!(
        "bench tls client_hellos_per_sec={ours:.0} baseline={baseline:.0} ratio={:.3}",
        ours / baseline
    );

    // RFC 9001 A.2 protected client Initial (1200 bytes).
    let pkt = unhex(include_str!(
        "../src/tls/testdata/rfc9001_a2_client_initial.hex"
    ));
    let start = Instant::now();
    let mut key = 0u64;
    let mut table = QuicInitialTable::new(Limits::default());
    let ours_q = rate(dur, || {
        // A new flow each time: key derivation is part of the per-flow cost.
        key += 1;
        let r = table.push(key, black_box(&pkt), start);
        black_box(matches!(r, sensor_user::tls::Push::Done(_)));
    });
    let hdr = parse_long_header(&pkt).ok();
    let keys = hdr
        .as_ref()
        .and_then(|h| client_initial_keys(QUIC_V1, h.dcid));
    let baseline_q = match (hdr, keys) {
        (Some(h), Some(k)) => rate(dur, || {
            let r = decrypt_initial(black_box(&pkt), h.pn_offset, &k);
            black_box(r.map(|p| p.payload.len()).unwrap_or(0));
        }),
        _ => f64::NAN,
    };
    println!(
        "bench quic initials_per_sec={ours_q:.0} baseline={baseline_q:.0} ratio={:.3}",
        ours_q / baseline_q
    );
}
