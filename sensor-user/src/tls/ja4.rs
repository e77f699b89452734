//! JA4 TLS client fingerprint (FoxIO spec, `technical_details/JA4.md`).
//!
//! `JA4 = a_b_c` where
//! - `a` = transport (`t`/`q`), version, SNI (`d`/`i`), cipher count, extension
//!   count, first+last character of the first ALPN value;
//! - `b` = sha256 (12 hex) of the sorted cipher suites;
//! - `c` = sha256 (12 hex) of the sorted extensions (without SNI and ALPN),
//!   `_`, signature algorithms in original order.
//!
//! GREASE values (RFC 8701) are ignored everywhere.

use sha2::{Digest, Sha256};

/// Transport the ClientHello was carried on (first JA4 character).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// TLS over TCP: `t`.
    Tcp,
    /// QUIC: `q`.
    Quic,
}

/// The ClientHello fields JA4 is computed from, in wire order.
#[derive(Debug, Clone, Copy)]
pub struct Ja4Input<'a> {
    pub transport: Transport,
    /// `legacy_version` of the ClientHello body.
    pub legacy_version: u16,
    /// Values of the supported_versions extension, if present.
    pub supported_versions: &'a [u16],
    pub sni_present: bool,
    pub cipher_suites: &'a [u16],
    /// Extension types in wire order.
    pub extensions: &'a [u16],
    /// Raw bytes of the first ALPN protocol name.
    pub first_alpn: Option<&'a [u8]>,
    /// signature_algorithms values in wire order.
    pub signature_algorithms: &'a [u16],
}

/// RFC 8701 GREASE: 0x?a?a with both bytes equal.
pub fn is_grease(v: u16) -> bool {
    (v & 0x0f0f) == 0x0a0a && (v >> 8) == (v & 0xff)
}

const EXT_SNI: u16 = 0x0000;
const EXT_ALPN: u16 = 0x0010;

/// Two-character JA4 version code.
pub fn version_code(v: u16) -> &'static str {
    match v {
        0x0304 => "13",
        0x0303 => "12",
        0x0302 => "11",
        0x0301 => "10",
        0x0300 => "s3",
        0x0002 => "s2",
        0xfeff => "d1",
        0xfefd => "d2",
        0xfefc => "d3",
        _ => "00",
    }
}

/// Version JA4 uses: highest non-GREASE supported_versions value, else legacy.
pub fn effective_version(legacy: u16, supported: &[u16]) -> u16 {
    supported
        .iter()
        .copied()
        .filter(|v| !is_grease(*v))
        .max()
        .unwrap_or(legacy)
}

fn alpn_chars(first_alpn: Option<&[u8]>) -> String {
    let Some(alpn) = first_alpn else {
        return "00".to_owned();
    };
    let (Some(&first), Some(&last)) = (alpn.first(), alpn.last()) else {
        return "00".to_owned();
    };
    if first.is_ascii_alphanumeric() && last.is_ascii_alphanumeric() {
        let mut s = String::with_capacity(2);
        s.push(char::from(first));
        s.push(char::from(last));
        s
    } else {
        // Spec: first and last character of the hex form of the value.
        let hi = HEX.get(usize::from(first >> 4)).copied().unwrap_or(b'0');
        let lo = HEX.get(usize::from(last & 0x0f)).copied().unwrap_or(b'0');
        let mut s = String::with_capacity(2);
        s.push(char::from(hi));
        s.push(char::from(lo));
        s
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn push_hex_nibble(s: &mut String, n: u8) {
    s.push(char::from(
        HEX.get(usize::from(n & 0x0f)).copied().unwrap_or(b'0'),
    ));
}

/// Comma-separated 4-digit lower-case hex (hand-rolled: `write!` dominated
/// the fingerprint cost).
fn hex_list(values: &[u16]) -> String {
    let mut s = String::with_capacity(values.len() * 5);
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        for b in v.to_be_bytes() {
            push_hex_nibble(&mut s, b >> 4);
            push_hex_nibble(&mut s, b);
        }
    }
    s
}

fn hash12(s: &str) -> String {
    if s.is_empty() {
        return "000000000000".to_owned();
    }
    let digest = Sha256::digest(s.as_bytes());
    let mut out = String::with_capacity(12);
    for b in digest.iter().take(6) {
        push_hex_nibble(&mut out, b >> 4);
        push_hex_nibble(&mut out, *b);
    }
    out
}

/// Two decimal digits, capped at 99 (spec).
fn push_two_digits(s: &mut String, n: usize) {
    let n = n.min(99);
    for d in [n / 10, n % 10] {
        s.push(char::from(b'0' + u8::try_from(d).unwrap_or(0)));
    }
}

/// The three JA4 parts before hashing: (`a`, sorted ciphers, sorted extensions
/// `_` signature algorithms). Joined with `_` this is `JA4_r`.
fn parts(input: &Ja4Input<'_>) -> (String, String, String) {
    let mut ciphers: Vec<u16> = input
        .cipher_suites
        .iter()
        .copied()
        .filter(|c| !is_grease(*c))
        .collect();
    let ext_count = input.extensions.iter().filter(|e| !is_grease(**e)).count();
    let mut exts: Vec<u16> = input
        .extensions
        .iter()
        .copied()
        .filter(|e| !is_grease(*e) && *e != EXT_SNI && *e != EXT_ALPN)
        .collect();
    let sigs: Vec<u16> = input
        .signature_algorithms
        .iter()
        .copied()
        .filter(|s| !is_grease(*s))
        .collect();

    let mut a = String::with_capacity(10);
    a.push(match input.transport {
        Transport::Tcp => 't',
        Transport::Quic => 'q',
    });
    a.push_str(version_code(effective_version(
        input.legacy_version,
        input.supported_versions,
    )));
    a.push(if input.sni_present { 'd' } else { 'i' });
    push_two_digits(&mut a, ciphers.len());
    push_two_digits(&mut a, ext_count);
    a.push_str(&alpn_chars(input.first_alpn));

    ciphers.sort_unstable();
    exts.sort_unstable();
    let b = hex_list(&ciphers);
    let mut c = hex_list(&exts);
    // Spec: without signature algorithms the string ends without `_`.
    if !sigs.is_empty() {
        c.push('_');
        c.push_str(&hex_list(&sigs));
    }
    (a, b, c)
}

/// JA4 and JA4_r (the unhashed form) computed together.
pub fn ja4_and_raw(input: &Ja4Input<'_>) -> (String, String) {
    let (a, b, c) = parts(input);
    // Empty lists hash to twelve zeros (spec).
    let hashed = format!("{a}_{}_{}", hash12(&b), hash12(&c));
    (hashed, format!("{a}_{b}_{c}"))
}

/// JA4 fingerprint, e.g. `t13d1516h2_8daaf6152771_b186095e22b6`.
pub fn ja4(input: &Ja4Input<'_>) -> String {
    let (a, b, c) = parts(input);
    format!("{a}_{}_{}", hash12(&b), hash12(&c))
}

/// JA4_r: the unhashed form, useful for debugging and tests.
pub fn ja4_r(input: &Ja4Input<'_>) -> String {
    let (a, b, c) = parts(input);
    format!("{a}_{b}_{c}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Chrome 143 ClientHello as observed by a public JA4 service (ja4_ro gives the
    /// wire order; ja4 and ja4_r the expected results).
    const CIPHERS: [u16; 16] = [
        0x3a3a, 0x1301, 0x1302, 0x1303, 0xc02b, 0xc02f, 0xc02c, 0xc030, 0xcca9, 0xcca8, 0xc013,
        0xc014, 0x009c, 0x009d, 0x002f, 0x0035,
    ];
    const EXTS: [u16; 18] = [
        0x5a5a, 0x002d, 0x0033, 0x0010, 0xfe0d, 0x0017, 0x44cd, 0x0000, 0x000b, 0x000a, 0x002b,
        0xff01, 0x0023, 0x0012, 0x0005, 0x000d, 0x001b, 0xfafa,
    ];
    const SIGS: [u16; 8] = [
        0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601,
    ];

    fn chrome() -> Ja4Input<'static> {
        Ja4Input {
            transport: Transport::Tcp,
            legacy_version: 0x0303,
            supported_versions: &[0x2a2a, 0x0304, 0x0303],
            sni_present: true,
            cipher_suites: &CIPHERS,
            extensions: &EXTS,
            first_alpn: Some(b"h2"),
            signature_algorithms: &SIGS,
        }
    }

    #[test]
    fn chrome_matches_reference() {
        let input = chrome();
        assert_eq!(ja4(&input), "t13d1516h2_8daaf6152771_d8a2da3f94cd");
        assert_eq!(
            ja4_r(&input),
            "t13d1516h2_002f,0035,009c,009d,1301,1302,1303,c013,c014,c02b,c02c,c02f,c030,cca8,cca9_0005,000a,000b,000d,0012,0017,001b,0023,002b,002d,0033,44cd,fe0d,ff01_0403,0804,0401,0503,0805,0501,0806,0601"
        );
    }

    #[test]
    fn quic_no_sni_no_alpn() {
        let mut input = chrome();
        input.transport = Transport::Quic;
        input.sni_present = false;
        input.first_alpn = None;
        assert!(ja4(&input).starts_with("q13i151600_8daaf6152771_"));
    }

    #[test]
    fn alpn_edge_cases() {
        assert_eq!(alpn_chars(Some(b"http/1.1")), "h1");
        assert_eq!(alpn_chars(Some(b"h")), "hh");
        assert_eq!(alpn_chars(Some(b"")), "00");
        assert_eq!(alpn_chars(Some(&[0xab, 0xcd])), "ad");
        // 'h' = 0x68, '/' = 0x2f: hex form "68322f".
        assert_eq!(alpn_chars(Some(b"h2/")), "6f");
    }

    #[test]
    fn empty_lists_hash_to_zeros() {
        let input = Ja4Input {
            transport: Transport::Tcp,
            legacy_version: 0x0303,
            supported_versions: &[],
            sni_present: false,
            cipher_suites: &[],
            extensions: &[],
            first_alpn: None,
            signature_algorithms: &[],
        };
        assert_eq!(ja4(&input), "t12i000000_000000000000_000000000000");
    }

    #[test]
    fn grease_detection() {
        assert!(is_grease(0x0a0a));
        assert!(is_grease(0xfafa));
        assert!(!is_grease(0x0a1a));
        assert!(!is_grease(0x1301));
    }
}
