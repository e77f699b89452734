//! ClientHello parsing with `tls-parser`: from TLS records (TCP) or from a bare
//! handshake message (QUIC CRYPTO stream).

use std::borrow::Cow;

use tls_parser::{
    SNIType, TlsExtension, TlsMessage, TlsMessageHandshake, TlsRecordType,
    parse_tls_client_hello_extension, parse_tls_message_handshake, parse_tls_raw_record,
};

use super::ja4::{self, Ja4Input, Transport};

/// Handshake type of ClientHello.
const HS_CLIENT_HELLO: u8 = 1;
/// Largest ClientHello we accept. Real ones are < 2 KiB (8 KiB with big PQ key
/// shares); the record layer allows 2^24 which we never want to buffer.
pub const MAX_CLIENT_HELLO_LEN: usize = 64 * 1024;
/// RFC 8446 5.1: TLSPlaintext.length must not exceed 2^14.
const MAX_RECORD_LEN: usize = 1 << 14;
const EXT_ECH: u16 = 0xfe0d;

/// Why a ClientHello could not be produced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The bytes so far are a valid prefix; `needed` is a lower bound of the
    /// additional bytes required, when known.
    #[error("incomplete ClientHello (need {needed:?} more bytes)")]
    Incomplete { needed: Option<usize> },
    /// The first record is not a TLS handshake record.
    #[error("not a TLS handshake record (content type {0:#04x})")]
    NotHandshake(u8),
    /// The handshake message is something other than a ClientHello.
    #[error("handshake message type {0} is not a ClientHello")]
    NotClientHello(u8),
    /// The ClientHello is larger than [`MAX_CLIENT_HELLO_LEN`].
    #[error("ClientHello of {0} bytes exceeds the limit")]
    TooLarge(usize),
    /// Structurally invalid.
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
    /// The QUIC packets around the ClientHello could not be used.
    #[error("QUIC: {0}")]
    Quic(#[from] super::quic::QuicError),
}

impl ParseError {
    /// Whether more bytes could turn this into a success.
    pub fn is_incomplete(&self) -> bool {
        matches!(self, ParseError::Incomplete { .. })
    }
}

/// What the agent needs from a ClientHello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHelloInfo {
    /// server_name (host_name), lower-cased. `None` when absent or not UTF-8.
    pub sni: Option<String>,
    /// ALPN protocol names in offered order (lossy UTF-8).
    pub alpn: Vec<String>,
    /// "1.3" if supported_versions offers 0x0304, else from the highest offered
    /// or legacy version: "1.2", "1.1", "1.0", "ssl3", or "0x....".
    pub tls_version: String,
    /// legacy_version field of the ClientHello body.
    pub legacy_version: u16,
    /// supported_versions values in wire order (GREASE included).
    pub supported_versions: Vec<u16>,
    /// Encrypted ClientHello extension (0xfe0d) present: the SNI is the outer one.
    pub ech: bool,
    /// Cipher suites in wire order (GREASE included).
    pub cipher_suites: Vec<u16>,
    /// Extension types in wire order (GREASE included).
    pub extensions: Vec<u16>,
    /// signature_algorithms in wire order.
    pub signature_algorithms: Vec<u16>,
    /// supported_groups in wire order.
    pub supported_groups: Vec<u16>,
    /// Transport the hello was seen on.
    pub transport: Transport,
    /// JA4 fingerprint.
    pub ja4: String,
    /// JA4_r (unhashed) fingerprint.
    pub ja4_r: String,
    /// Bytes of the hello arrived twice with different values (TCP): which copy the
    /// server took is unknown, so the name is not certain.
    pub conflicting_retransmission: bool,
    /// Server names of other complete hellos the same sequence range formed, as
    /// last sent (the decoy's or the real one's, whichever was not first).
    pub rival_server_names: Vec<String>,
    /// QUIC: the version and the client's first Destination Connection ID, from
    /// which the server's Initial keys derive (to read its ServerHello).
    pub quic_initial: Option<(u32, Vec<u8>)>,
}

/// Post-quantum key-exchange groups by IANA TLS Supported Groups code point: the
/// hybrids (X25519MLKEM768 and its kin, and the Kyber drafts browsers shipped
/// before it) and pure ML-KEM.
pub const POST_QUANTUM_GROUPS: &[(u16, &str)] = &[
    (0x11ec, "X25519MLKEM768"),
    (0x11eb, "SecP256r1MLKEM768"),
    (0x11ed, "SecP384r1MLKEM1024"),
    (0x6399, "X25519Kyber768Draft00"),
    (0x639a, "SecP256r1Kyber768Draft00"),
    (0x0200, "MLKEM512"),
    (0x0201, "MLKEM768"),
    (0x0202, "MLKEM1024"),
];

impl ClientHelloInfo {
    /// Whether the client offers a post-quantum group (every key share it sends
    /// is one of its supported_groups, RFC 8446 4.2.8).
    pub fn offers_post_quantum(&self) -> bool {
        self.supported_groups
            .iter()
            .any(|g| POST_QUANTUM_GROUPS.iter().any(|(code, _)| code == g))
    }
}

fn nom_incomplete<E>(e: &tls_parser::Err<E>) -> Option<Option<usize>> {
    match e {
        tls_parser::Err::Incomplete(tls_parser::nom::Needed::Size(n)) => Some(Some(n.get())),
        tls_parser::Err::Incomplete(tls_parser::nom::Needed::Unknown) => Some(None),
        _ => None,
    }
}

/// Parse a ClientHello from TLS record-layer bytes (the start of a TCP stream).
///
/// The handshake message may span several handshake records; bytes after the
/// ClientHello are ignored.
pub fn parse_client_hello(record_bytes: &[u8]) -> Result<ClientHelloInfo, ParseError> {
    // Fast path: the whole ClientHello in the first record (the usual case).
    let mut rest = record_bytes;
    let mut hs: Cow<'_, [u8]> = Cow::Borrowed(&[]);
    loop {
        if let Some(&ct) = rest.first()
            && ct != TlsRecordType::Handshake.0
        {
            return Err(if hs.is_empty() {
                ParseError::NotHandshake(ct)
            } else {
                // Something else interleaved before the ClientHello ended.
                ParseError::Malformed("non-handshake record inside ClientHello")
            });
        }
        if let Some(&major) = rest.get(1)
            && major != 3
        {
            return Err(ParseError::Malformed("record version major is not 3"));
        }
        if let (Some(&hi), Some(&lo)) = (rest.get(3), rest.get(4)) {
            let len = usize::from(u16::from_be_bytes([hi, lo]));
            if len > MAX_RECORD_LEN {
                return Err(ParseError::Malformed("record longer than 2^14"));
            }
            if len == 0 {
                return Err(ParseError::Malformed("empty handshake record"));
            }
        }
        // Reject a non-ClientHello as soon as its type byte is visible, without
        // waiting for the rest of the record.
        if hs.is_empty()
            && let Some(&ht) = rest.get(5)
            && ht != HS_CLIENT_HELLO
        {
            return Err(ParseError::NotClientHello(ht));
        }
        let (after, record) = match parse_tls_raw_record(rest) {
            Ok(v) => v,
            Err(e) => {
                return Err(match nom_incomplete(&e) {
                    Some(needed) => ParseError::Incomplete { needed },
                    None => ParseError::Malformed("bad record header"),
                });
            }
        };
        rest = after;
        if hs.is_empty() {
            hs = Cow::Borrowed(record.data);
        } else {
            let buf = hs.to_mut();
            if buf.len().saturating_add(record.data.len())
                > MAX_CLIENT_HELLO_LEN + 4 + MAX_RECORD_LEN
            {
                return Err(ParseError::TooLarge(buf.len()));
            }
            buf.extend_from_slice(record.data);
        }
        match parse_handshake_for(&hs, Transport::Tcp) {
            Err(ParseError::Incomplete { needed }) => {
                if rest.is_empty() {
                    // Next record header plus the missing handshake bytes.
                    return Err(ParseError::Incomplete {
                        needed: Some(needed.unwrap_or(1).saturating_add(5)),
                    });
                }
            }
            other => return other,
        }
    }
}

/// Parse a ClientHello handshake message without record layer (QUIC CRYPTO data).
pub fn parse_handshake(handshake_bytes: &[u8]) -> Result<ClientHelloInfo, ParseError> {
    parse_handshake_for(handshake_bytes, Transport::Quic)
}

/// Like [`parse_handshake`], with the transport used for JA4.
pub fn parse_handshake_for(
    handshake_bytes: &[u8],
    transport: Transport,
) -> Result<ClientHelloInfo, ParseError> {
    let (&ht, header_rest) = match handshake_bytes.split_first() {
        Some(v) => v,
        None => return Err(ParseError::Incomplete { needed: Some(4) }),
    };
    if ht != HS_CLIENT_HELLO {
        return Err(ParseError::NotClientHello(ht));
    }
    let (Some(&a), Some(&b), Some(&c)) =
        (header_rest.first(), header_rest.get(1), header_rest.get(2))
    else {
        return Err(ParseError::Incomplete {
            needed: Some(4usize.saturating_sub(handshake_bytes.len())),
        });
    };
    let body_len = usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c);
    if body_len > MAX_CLIENT_HELLO_LEN {
        return Err(ParseError::TooLarge(body_len));
    }
    let total = body_len + 4;
    let Some(msg_bytes) = handshake_bytes.get(..total) else {
        return Err(ParseError::Incomplete {
            needed: Some(total - handshake_bytes.len()),
        });
    };
    let ch = match parse_tls_message_handshake(msg_bytes) {
        Ok((_, TlsMessage::Handshake(TlsMessageHandshake::ClientHello(ch)))) => ch,
        Ok(_) => return Err(ParseError::Malformed("unexpected handshake message")),
        // The message is complete, so any nom error means a bad body.
        Err(_) => return Err(ParseError::Malformed("bad ClientHello body")),
    };

    let mut info = ClientHelloInfo {
        sni: None,
        alpn: Vec::new(),
        tls_version: String::new(),
        legacy_version: ch.version.0,
        supported_versions: Vec::new(),
        ech: false,
        cipher_suites: ch.ciphers.iter().map(|c| c.0).collect(),
        extensions: Vec::new(),
        signature_algorithms: Vec::new(),
        supported_groups: Vec::new(),
        transport,
        ja4: String::new(),
        ja4_r: String::new(),
        conflicting_retransmission: false,
        rival_server_names: Vec::new(),
        quic_initial: None,
    };
    let mut first_alpn: Option<&[u8]> = None;
    let mut sni_present = false;

    let mut ext = ch.ext.unwrap_or(&[]);
    while !ext.is_empty() {
        let (Some(&t0), Some(&t1), Some(&l0), Some(&l1)) =
            (ext.first(), ext.get(1), ext.get(2), ext.get(3))
        else {
            return Err(ParseError::Malformed("truncated extension header"));
        };
        let ext_type = u16::from_be_bytes([t0, t1]);
        let ext_total = 4 + usize::from(u16::from_be_bytes([l0, l1]));
        let Some(one) = ext.get(..ext_total) else {
            return Err(ParseError::Malformed("extension overruns the ClientHello"));
        };
        ext = ext.get(ext_total..).unwrap_or(&[]);
        info.extensions.push(ext_type);
        if ext_type == EXT_ECH {
            info.ech = true;
        }
        if ext_type == 0 {
            // JA4 counts the extension even if its content is unusable.
            sni_present = true;
        }
        // Content parse errors are tolerated: the type list (JA4) is still valid.
        let Ok((_, parsed)) = parse_tls_client_hello_extension(one) else {
            continue;
        };
        match parsed {
            TlsExtension::SNI(names) => {
                info.sni = names
                    .iter()
                    .find(|(t, _)| *t == SNIType::HostName)
                    .and_then(|(_, name)| std::str::from_utf8(name).ok())
                    .map(|s| s.trim_end_matches('.').to_ascii_lowercase());
            }
            TlsExtension::ALPN(protos) => {
                first_alpn = protos.first().copied();
                info.alpn = protos
                    .iter()
                    .map(|p| String::from_utf8_lossy(p).into_owned())
                    .collect();
            }
            TlsExtension::SupportedVersions(vs) => {
                info.supported_versions = vs.iter().map(|v| v.0).collect();
            }
            TlsExtension::SignatureAlgorithms(sigs) => info.signature_algorithms = sigs,
            TlsExtension::EllipticCurves(groups) => {
                info.supported_groups = groups.iter().map(|g| g.0).collect();
            }
            _ => {}
        }
    }

    let version = ja4::effective_version(info.legacy_version, &info.supported_versions);
    info.tls_version = version_name(version);
    let input = Ja4Input {
        transport,
        legacy_version: info.legacy_version,
        supported_versions: &info.supported_versions,
        sni_present,
        cipher_suites: &info.cipher_suites,
        extensions: &info.extensions,
        first_alpn,
        signature_algorithms: &info.signature_algorithms,
    };
    (info.ja4, info.ja4_r) = ja4::ja4_and_raw(&input);
    Ok(info)
}

fn version_name(v: u16) -> String {
    match v {
        0x0304 => "1.3".to_owned(),
        0x0303 => "1.2".to_owned(),
        0x0302 => "1.1".to_owned(),
        0x0301 => "1.0".to_owned(),
        0x0300 => "ssl3".to_owned(),
        other => format!("{other:#06x}"),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// RFC 9001 A.2 ClientHello (handshake message, no record layer).
    pub(crate) fn rfc_client_hello() -> Vec<u8> {
        let hex: String = include_str!("testdata/rfc9001_a2_client_hello.hex")
            .split_whitespace()
            .collect();
        hex::decode(hex).unwrap_or_default()
    }

    /// A ClientHello record as Chromium 156 sent it to `api.openai.com` (captured on
    /// this project's machine with socat: 1,922 bytes, an X25519MLKEM768 key share).
    /// `bench_kernel` measures with it.
    #[test]
    fn chromium_hello_parses_with_its_post_quantum_share() {
        let hex: String = include_str!("testdata/chromium156_client_hello.hex")
            .split_whitespace()
            .collect();
        let bytes = hex::decode(hex).unwrap_or_default();
        assert_eq!(bytes.len(), 1922);
        let info = parse_client_hello(&bytes).expect("Chromium's hello parses");
        assert_eq!(info.sni.as_deref(), Some("api.openai.com"));
        assert_eq!(info.tls_version, "1.3");
        assert!(info.offers_post_quantum());
    }

    /// Wrap a handshake message in TLS records of at most `chunk` bytes each.
    pub(crate) fn records(hs: &[u8], chunk: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for part in hs.chunks(chunk.max(1)) {
            out.extend_from_slice(&[0x16, 0x03, 0x01]);
            out.extend_from_slice(&u16::try_from(part.len()).unwrap_or(0).to_be_bytes());
            out.extend_from_slice(part);
        }
        out
    }

    fn check_rfc(info: &ClientHelloInfo) {
        assert_eq!(info.sni.as_deref(), Some("example.com"));
        assert_eq!(info.alpn, vec!["alpn".to_owned()]);
        assert_eq!(info.tls_version, "1.3");
        assert_eq!(info.cipher_suites, vec![0x1301, 0x1302]);
        assert!(!info.ech);
        assert_eq!(
            info.extensions,
            vec![
                0x0000, 0xff01, 0x000a, 0x0010, 0x0005, 0x0033, 0x002b, 0x000d, 0x002d, 0x001c,
                0x0039
            ]
        );
    }

    #[test]
    fn post_quantum_offer_is_told_by_the_group_code_point() {
        let mut info = parse_handshake(&rfc_client_hello()).expect("parse");
        // RFC 9001's client offers x25519, secp256r1, ... and no PQ group.
        assert!(!info.supported_groups.is_empty());
        assert!(!info.offers_post_quantum());
        // Chromium's order: GREASE, X25519MLKEM768, x25519, secp256r1, secp384r1.
        info.supported_groups = vec![0x4a4a, 0x11ec, 0x001d, 0x0017, 0x0018];
        assert!(info.offers_post_quantum());
    }

    #[test]
    fn handshake_rfc9001() {
        let hs = rfc_client_hello();
        let info = parse_handshake(&hs).expect("parse");
        check_rfc(&info);
        assert!(info.ja4.starts_with("q13d0211an_"), "{}", info.ja4);
    }

    #[test]
    fn single_record() {
        let info = parse_client_hello(&records(&rfc_client_hello(), 16384)).expect("parse");
        check_rfc(&info);
        assert!(info.ja4.starts_with("t13d0211an_"), "{}", info.ja4);
        assert_eq!(
            info.ja4[10..],
            parse_handshake(&rfc_client_hello()).expect("q").ja4[10..]
        );
    }

    #[test]
    fn split_across_records() {
        let hs = rfc_client_hello();
        for chunk in [1, 2, 3, 7, 100, 240] {
            let info = parse_client_hello(&records(&hs, chunk)).expect("parse");
            check_rfc(&info);
        }
    }

    #[test]
    fn every_prefix_is_incomplete_not_panic() {
        let bytes = records(&rfc_client_hello(), 50);
        for n in 0..bytes.len() {
            match parse_client_hello(&bytes[..n]) {
                Err(ParseError::Incomplete { needed }) => {
                    if let Some(k) = needed {
                        assert!(k > 0);
                    }
                }
                other => panic!("prefix {n}: {other:?}"),
            }
        }
        let hs = rfc_client_hello();
        for n in 0..hs.len() {
            assert!(
                parse_handshake(&hs[..n]).is_err_and(|e| e.is_incomplete()),
                "{n}"
            );
        }
    }

    #[test]
    fn not_tls() {
        assert_eq!(
            parse_client_hello(b"GET / HTTP/1.1\r\n"),
            Err(ParseError::NotHandshake(b'G'))
        );
        // ServerHello inside a handshake record, seen early and complete.
        assert_eq!(
            parse_client_hello(&[0x16, 0x03, 0x03, 0x01, 0x00, 0x02]),
            Err(ParseError::NotClientHello(2))
        );
        assert_eq!(
            parse_client_hello(&[0x16, 0x03, 0x03, 0x00, 0x04, 0x02, 0x00, 0x00, 0x00]),
            Err(ParseError::NotClientHello(2))
        );
    }

    #[test]
    fn corrupted_bytes_never_panic() {
        let base = records(&rfc_client_hello(), 100);
        let mut state = 0x1234_5678_u32;
        for _ in 0..3000 {
            let mut b = base.clone();
            for _ in 0..4 {
                // xorshift: deterministic pseudo-random positions and values.
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                let pos = state as usize % b.len();
                if let Some(x) = b.get_mut(pos) {
                    *x = (state >> 8) as u8;
                }
            }
            let _ = parse_client_hello(&b);
            let _ = parse_handshake(b.get(5..).unwrap_or(&[]));
        }
    }

    fn ext(out: &mut Vec<u8>, ty: u16, body: &[u8]) {
        out.extend_from_slice(&ty.to_be_bytes());
        out.extend_from_slice(&u16::try_from(body.len()).unwrap_or(0).to_be_bytes());
        out.extend_from_slice(body);
    }

    /// A Chrome 143-shaped ClientHello (wire order from a public JA4 service's
    /// ja4_ro); other extension bodies are empty, which must not matter.
    fn chrome_hello() -> Vec<u8> {
        let ciphers: [u16; 16] = [
            0x3a3a, 0x1301, 0x1302, 0x1303, 0xc02b, 0xc02f, 0xc02c, 0xc030, 0xcca9, 0xcca8, 0xc013,
            0xc014, 0x009c, 0x009d, 0x002f, 0x0035,
        ];
        let mut exts = Vec::new();
        for ty in [
            0x5a5a, 0x002d, 0x0033, 0x0010, 0xfe0d, 0x0017, 0x44cd, 0x0000, 0x000b, 0x000a, 0x002b,
            0xff01, 0x0023, 0x0012, 0x0005, 0x000d, 0x001b, 0xfafa,
        ] {
            let body: Vec<u8> = match ty {
                0x0000 => {
                    let name = b"API.OpenAI.com";
                    let mut b = vec![0, 17, 0, 0, 14];
                    b.extend_from_slice(name);
                    b
                }
                0x0010 => b"\x00\x0c\x02h2\x08http/1.1".to_vec(),
                0x002b => vec![6, 0x2a, 0x2a, 3, 4, 3, 3],
                0x000d => vec![0, 16, 4, 3, 8, 4, 4, 1, 5, 3, 8, 5, 5, 1, 8, 6, 6, 1],
                _ => Vec::new(),
            };
            ext(&mut exts, ty, &body);
        }
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[7u8; 32]);
        body.push(0);
        body.extend_from_slice(&32u16.to_be_bytes());
        for c in ciphers {
            body.extend_from_slice(&c.to_be_bytes());
        }
        body.extend_from_slice(&[1, 0]);
        body.extend_from_slice(&u16::try_from(exts.len()).unwrap_or(0).to_be_bytes());
        body.extend_from_slice(&exts);
        let len = u32::try_from(body.len()).unwrap_or(0).to_be_bytes();
        let mut hs = vec![1, len[1], len[2], len[3]];
        hs.extend_from_slice(&body);
        hs
    }

    #[test]
    fn chrome_shaped_hello_ja4() {
        let info = parse_client_hello(&records(&chrome_hello(), 16384)).expect("parse");
        assert_eq!(info.ja4, "t13d1516h2_8daaf6152771_d8a2da3f94cd");
        assert_eq!(info.sni.as_deref(), Some("api.openai.com"));
        assert_eq!(info.alpn, vec!["h2".to_owned(), "http/1.1".to_owned()]);
        assert_eq!(info.tls_version, "1.3");
        assert!(info.ech);
        let q = parse_handshake(&chrome_hello()).expect("parse");
        assert_eq!(q.ja4, "q13d1516h2_8daaf6152771_d8a2da3f94cd");
    }

    #[test]
    fn ech_and_grease() {
        // Minimal ClientHello: GREASE cipher + ECH extension + GREASE extension.
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[0u8; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0x00, 0x04, 0x0a, 0x0a, 0x13, 0x01]);
        body.extend_from_slice(&[0x01, 0x00]);
        let exts = [0x1a, 0x1a, 0x00, 0x00, 0xfe, 0x0d, 0x00, 0x01, 0x00];
        body.extend_from_slice(&u16::try_from(exts.len()).unwrap_or(0).to_be_bytes());
        body.extend_from_slice(&exts);
        let mut hs = vec![1, 0, 0, u8::try_from(body.len()).unwrap_or(0)];
        hs.extend_from_slice(&body);
        let info = parse_client_hello(&records(&hs, 1000)).expect("parse");
        assert!(info.ech);
        assert_eq!(info.sni, None);
        assert_eq!(info.tls_version, "1.2");
        assert!(info.ja4.starts_with("t12i010100_"), "{}", info.ja4);
    }
}
