//! The ServerHello of a TLS flow: the first bytes the responder sends, copied once by
//! the kernel. It says what the connection negotiated: the version, the cipher suite
//! and (TLS 1.3) the key-exchange group, which the records carry as `tls.version`,
//! `tls.cipher`, `tls.curve` and `conduit.pq.negotiated` (NIS2 Art. 21(2)(h): evidence
//! of the cryptography in use). A HelloRetryRequest names the group the server chose
//! as well, and is read the same way.

use tls_parser::{
    TlsCipherSuite, TlsExtension, TlsRecordType, parse_tls_handshake_server_hello,
    parse_tls_server_hello_extensions,
};

use super::client_hello::POST_QUANTUM_GROUPS;

/// What the server chose.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Negotiated {
    /// "1.3", "1.2", ... (supported_versions, else the legacy version field).
    pub version: Option<&'static str>,
    /// IANA name of the cipher suite (`TLS_AES_128_GCM_SHA256`), or its code point
    /// in hex when the name is not known.
    pub cipher: String,
    /// IANA TLS Supported Groups code point of the key share (TLS 1.3 only: TLS 1.2
    /// names its curve in a later, separate message).
    pub group: Option<u16>,
}

/// Group names as IANA lists them (ECS's own example: `secp256r1`).
const GROUP_NAMES: &[(u16, &str)] = &[
    (0x0017, "secp256r1"),
    (0x0018, "secp384r1"),
    (0x0019, "secp521r1"),
    (0x001d, "x25519"),
    (0x001e, "x448"),
    (0x0100, "ffdhe2048"),
    (0x0101, "ffdhe3072"),
    (0x0102, "ffdhe4096"),
    (0x0103, "ffdhe6144"),
    (0x0104, "ffdhe8192"),
];

impl Negotiated {
    /// The key-exchange group's name (hex for one not known).
    pub fn curve(&self) -> Option<String> {
        let g = self.group?;
        Some(
            GROUP_NAMES
                .iter()
                .chain(POST_QUANTUM_GROUPS)
                .find(|(code, _)| *code == g)
                .map_or_else(|| format!("0x{g:04x}"), |(_, name)| (*name).to_owned()),
        )
    }

    /// Whether the chosen group is a post-quantum one (a hybrid such as
    /// X25519MLKEM768, or pure ML-KEM).
    pub fn post_quantum(&self) -> bool {
        self.group
            .is_some_and(|g| POST_QUANTUM_GROUPS.iter().any(|(code, _)| *code == g))
    }
}

fn version_name(v: u16) -> Option<&'static str> {
    match v {
        0x0304 => Some("1.3"),
        0x0303 => Some("1.2"),
        0x0302 => Some("1.1"),
        0x0301 => Some("1.0"),
        _ => None,
    }
}

/// Reads the ServerHello at the start of `bytes` (the responder's first TCP payload,
/// possibly cut short by the copy bound). None: not a complete TLS ServerHello.
pub fn parse_server_hello(bytes: &[u8]) -> Option<Negotiated> {
    // Record header: handshake (22), version, length; then the handshake header:
    // ServerHello (2) or, for 1.3's HelloRetryRequest, the same type and layout.
    let [ct, _, _, l0, l1, rest @ ..] = bytes else {
        return None;
    };
    if *ct != TlsRecordType::Handshake.0 {
        return None;
    }
    parse_server_hello_handshake(rest.get(..usize::from(u16::from_be_bytes([*l0, *l1])))?)
}

/// Reads a ServerHello handshake message (type, 24-bit length, body) at the start of
/// `handshake`: the TLS record's fragment, or QUIC's CRYPTO stream.
pub fn parse_server_hello_handshake(handshake: &[u8]) -> Option<Negotiated> {
    let [2, h0, h1, h2, body @ ..] = handshake else {
        return None;
    };
    let body = body.get(..usize::try_from(u32::from_be_bytes([0, *h0, *h1, *h2])).ok()?)?;
    let (_, sh) = parse_tls_handshake_server_hello(body).ok()?;
    let mut out = Negotiated {
        version: version_name(sh.version.0),
        cipher: TlsCipherSuite::from_id(sh.cipher.0)
            .map_or_else(|| format!("0x{:04x}", sh.cipher.0), |c| c.name.to_owned()),
        group: None,
    };
    let (_, exts) = parse_tls_server_hello_extensions(sh.ext.unwrap_or_default()).ok()?;
    for ext in exts {
        match ext {
            TlsExtension::SupportedVersions(v) => {
                if let Some(name) = v.first().and_then(|v| version_name(v.0)) {
                    out.version = Some(name);
                }
            }
            // ServerHello: group (2) || key_exchange; HelloRetryRequest: group (2).
            TlsExtension::KeyShare(&[g0, g1, ..]) => out.group = Some(u16::from_be_bytes([g0, g1])),
            _ => {}
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ServerHello record: `version` in the legacy field, `cipher`, and extensions.
    fn server_hello(cipher: u16, exts: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend_from_slice(&[0x11; 32]); // random
        body.push(32);
        body.extend_from_slice(&[0x22; 32]); // session id echo
        body.extend_from_slice(&cipher.to_be_bytes());
        body.push(0); // compression
        let mut ext_bytes = Vec::new();
        for (ty, data) in exts {
            ext_bytes.extend_from_slice(&ty.to_be_bytes());
            ext_bytes.extend_from_slice(&u16::try_from(data.len()).expect("fits").to_be_bytes());
            ext_bytes.extend_from_slice(data);
        }
        body.extend_from_slice(&u16::try_from(ext_bytes.len()).expect("fits").to_be_bytes());
        body.extend_from_slice(&ext_bytes);
        let mut hs = vec![2];
        hs.extend_from_slice(&u32::try_from(body.len()).expect("fits").to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        let mut rec = vec![22, 3, 3];
        rec.extend_from_slice(&u16::try_from(hs.len()).expect("fits").to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    fn key_share(group: u16, len: usize) -> Vec<u8> {
        let mut v = group.to_be_bytes().to_vec();
        v.extend_from_slice(&u16::try_from(len).expect("fits").to_be_bytes());
        v.extend(std::iter::repeat_n(7, len));
        v
    }

    #[test]
    fn tls13_hybrid_post_quantum() {
        let mut bytes = server_hello(0x1301, &[(43, vec![3, 4]), (51, key_share(0x11ec, 1120))]);
        // The encrypted records that follow in the same segment do not matter.
        bytes.extend_from_slice(&[20, 3, 3, 0, 1, 1, 23, 3, 3, 0, 4, 9, 9, 9, 9]);
        let n = parse_server_hello(&bytes).expect("ServerHello");
        assert_eq!(n.version, Some("1.3"));
        assert_eq!(n.cipher, "TLS_AES_128_GCM_SHA256");
        assert_eq!(n.curve().as_deref(), Some("X25519MLKEM768"));
        assert!(n.post_quantum());
    }

    #[test]
    fn tls13_classic_and_tls12() {
        let n = parse_server_hello(&server_hello(
            0x1302,
            &[(43, vec![3, 4]), (51, key_share(0x001d, 32))],
        ))
        .expect("1.3");
        assert_eq!(
            (n.version, n.cipher.as_str(), n.curve().as_deref()),
            (Some("1.3"), "TLS_AES_256_GCM_SHA384", Some("x25519"))
        );
        assert!(!n.post_quantum());
        let n = parse_server_hello(&server_hello(0xc02f, &[(0xff01, vec![0])])).expect("1.2");
        assert_eq!(
            (n.version, n.cipher.as_str(), n.group),
            (Some("1.2"), "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256", None)
        );
        // A HelloRetryRequest's key_share is the chosen group alone.
        let n = parse_server_hello(&server_hello(
            0x1301,
            &[(43, vec![3, 4]), (51, 0x0017u16.to_be_bytes().to_vec())],
        ))
        .expect("HRR");
        assert_eq!(n.curve().as_deref(), Some("secp256r1"));
    }

    #[test]
    fn not_a_server_hello_or_cut_short() {
        let whole = server_hello(0x1301, &[(43, vec![3, 4]), (51, key_share(0x001d, 32))]);
        for cut in [0, 4, 5, 9, 40, whole.len() - 1] {
            assert_eq!(parse_server_hello(&whole[..cut]), None, "cut at {cut}");
        }
        let mut alert = whole.clone();
        alert[0] = 21;
        assert_eq!(parse_server_hello(&alert), None);
        let mut client = whole;
        client[5] = 1;
        assert_eq!(parse_server_hello(&client), None);
    }
}
