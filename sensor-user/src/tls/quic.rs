//! QUIC v1 (RFC 9000/9001) and v2 (RFC 9369) client Initial decryption and
//! CRYPTO stream reassembly up to the ClientHello.
//!
//! Initial packets are protected with keys derived from the client's first
//! Destination Connection ID, so a passive observer can read them: that is how
//! the SNI of a QUIC connection is found.

use std::hash::Hash;
use std::time::Instant;

use aes::Aes128;
use aes::cipher::{BlockEncrypt, KeyInit as _, generic_array::GenericArray};
use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes128Gcm, Nonce, Tag};
use hkdf::Hkdf;
use sha2::Sha256;

use super::client_hello::{ParseError, parse_handshake};
use super::reassembly::{BoundedTable, Buffered, Insert, Limits, Push, RangeBuf};

/// QUIC version 1.
pub const QUIC_V1: u32 = 0x0000_0001;
/// QUIC version 2.
pub const QUIC_V2: u32 = 0x6b33_43cf;

const SALT_V1: [u8; 20] = [
    0x38, 0x76, 0x2c, 0xf7, 0xf5, 0x59, 0x34, 0xb3, 0x4d, 0x17, 0x9a, 0xe6, 0xa4, 0xc8, 0x0c, 0xad,
    0xcc, 0xbb, 0x7f, 0x0a,
];
const SALT_V2: [u8; 20] = [
    0x0d, 0xed, 0xe3, 0xde, 0xf7, 0x00, 0xa6, 0xdb, 0x81, 0x93, 0x81, 0xbe, 0x6e, 0x26, 0x9d, 0xcb,
    0xf9, 0xbd, 0x2e, 0xd9,
];
/// RFC 9000 17.2: connection IDs are at most 20 bytes in v1 (and v2).
const MAX_CID_LEN: usize = 20;
const TAG_LEN: usize = 16;
/// CRYPTO bytes kept of a server's first datagram: its ServerHello (about 1.2 KiB
/// with a hybrid post-quantum key share) fits; one datagram holds no more anyway.
const MAX_SERVER_HELLO_CRYPTO: usize = 4096;

/// Why a datagram could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuicError {
    #[error("packet truncated")]
    Truncated,
    #[error("not a QUIC long header packet")]
    NotLongHeader,
    #[error("unsupported QUIC version {0:#010x}")]
    UnsupportedVersion(u32),
    #[error("not an Initial packet")]
    NotInitial,
    #[error("connection ID longer than 20 bytes")]
    BadConnectionId,
    #[error("Initial packet decryption failed")]
    Decrypt,
    #[error("malformed frame")]
    BadFrame,
}

/// Client Initial packet protection keys (AES-128-GCM + AES header protection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitialKeys {
    pub key: [u8; 16],
    pub iv: [u8; 12],
    pub hp: [u8; 16],
}

struct Labels {
    key: &'static [u8],
    iv: &'static [u8],
    hp: &'static [u8],
}

fn version_params(version: u32) -> Option<(&'static [u8; 20], Labels)> {
    match version {
        QUIC_V1 => Some((
            &SALT_V1,
            Labels {
                key: b"quic key",
                iv: b"quic iv",
                hp: b"quic hp",
            },
        )),
        QUIC_V2 => Some((
            &SALT_V2,
            Labels {
                key: b"quicv2 key",
                iv: b"quicv2 iv",
                hp: b"quicv2 hp",
            },
        )),
        _ => None,
    }
}

/// TLS 1.3 HKDF-Expand-Label with an empty context (RFC 8446 7.1).
fn expand_label(prk: &Hkdf<Sha256>, label: &[u8], out: &mut [u8]) -> Option<()> {
    let len = u16::try_from(out.len()).ok()?;
    let full_len = u8::try_from(6 + label.len()).ok()?;
    let mut info = Vec::with_capacity(4 + 6 + label.len());
    info.extend_from_slice(&len.to_be_bytes());
    info.push(full_len);
    info.extend_from_slice(b"tls13 ");
    info.extend_from_slice(label);
    info.push(0);
    prk.expand(&info, out).ok()
}

/// `client_initial_secret` for a version and client Destination Connection ID.
pub fn client_initial_secret(version: u32, dcid: &[u8]) -> Option<[u8; 32]> {
    initial_secret(version, dcid, b"client in")
}

/// The Initial secret of one side (`client in` / `server in`, RFC 9001 5.2); both
/// derive from the client's first Destination Connection ID.
fn initial_secret(version: u32, dcid: &[u8], label: &[u8]) -> Option<[u8; 32]> {
    let (salt, _) = version_params(version)?;
    let initial = Hkdf::<Sha256>::new(Some(salt), dcid);
    let mut secret = [0u8; 32];
    expand_label(&initial, label, &mut secret)?;
    Some(secret)
}

/// Packet protection keys from a client Initial secret.
pub fn keys_from_secret(version: u32, secret: &[u8; 32]) -> Option<InitialKeys> {
    let (_, labels) = version_params(version)?;
    let prk = Hkdf::<Sha256>::from_prk(secret).ok()?;
    let mut keys = InitialKeys {
        key: [0; 16],
        iv: [0; 12],
        hp: [0; 16],
    };
    expand_label(&prk, labels.key, &mut keys.key)?;
    expand_label(&prk, labels.iv, &mut keys.iv)?;
    expand_label(&prk, labels.hp, &mut keys.hp)?;
    Some(keys)
}

/// Client Initial keys for a version and Destination Connection ID.
pub fn client_initial_keys(version: u32, dcid: &[u8]) -> Option<InitialKeys> {
    keys_from_secret(version, &client_initial_secret(version, dcid)?)
}

/// Server Initial keys for a version and the client's first Destination Connection ID.
pub fn server_initial_keys(version: u32, client_dcid: &[u8]) -> Option<InitialKeys> {
    keys_from_secret(
        version,
        &initial_secret(version, client_dcid, b"server in")?,
    )
}

/// The CRYPTO bytes from offset 0 of the server Initials in `datagram` (the server's
/// first datagram of a connection whose client's first Destination Connection ID was
/// `client_dcid`): there the ServerHello, a handshake message without a record
/// layer. Coalesced Handshake packets after them are not readable and end the walk.
pub fn server_initial_crypto(datagram: &[u8], version: u32, client_dcid: &[u8]) -> Option<Vec<u8>> {
    let keys = server_initial_keys(version, client_dcid)?;
    let mut crypto = RangeBuf::new(MAX_SERVER_HELLO_CRYPTO, 16);
    let mut pos = 0usize;
    while let Some(rest) = datagram.get(pos..).filter(|r| !r.is_empty()) {
        let Ok(hdr) = parse_long_header(rest) else {
            break;
        };
        if hdr.ty != LongType::Initial || hdr.version != version {
            break;
        }
        let p = decrypt_initial(rest.get(..hdr.end)?, hdr.pn_offset, &keys).ok()?;
        for_each_crypto_frame(&p.payload, |off, data| {
            let _ = crypto.insert(off, data);
        })
        .ok()?;
        pos += hdr.end;
    }
    let data = crypto.contiguous();
    (!data.is_empty()).then(|| data.to_vec())
}

/// QUIC variable-length integer (RFC 9000 16).
fn read_varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let first = *buf.get(*pos)?;
    let len = 1usize << (first >> 6);
    let bytes = buf.get(*pos..pos.checked_add(len)?)?;
    let mut v = u64::from(first & 0x3f);
    for b in bytes.iter().skip(1) {
        v = (v << 8) | u64::from(*b);
    }
    *pos += len;
    Some(v)
}

/// Long-header packet type, normalized across versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LongType {
    Initial,
    ZeroRtt,
    Handshake,
    Retry,
}

/// A parsed (still protected) long header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LongHeader<'a> {
    pub version: u32,
    pub ty: LongType,
    pub dcid: &'a [u8],
    pub scid: &'a [u8],
    pub token: &'a [u8],
    /// Offset of the packet number (after the Length field).
    pub pn_offset: usize,
    /// End of this packet within the datagram (coalesced packets follow).
    pub end: usize,
}

/// Parse the long header at the start of `buf`.
pub fn parse_long_header(buf: &[u8]) -> Result<LongHeader<'_>, QuicError> {
    let first = *buf.first().ok_or(QuicError::Truncated)?;
    if first & 0x80 == 0 {
        return Err(QuicError::NotLongHeader);
    }
    let v = buf.get(1..5).ok_or(QuicError::Truncated)?;
    let version = u32::from_be_bytes([
        *v.first().ok_or(QuicError::Truncated)?,
        *v.get(1).ok_or(QuicError::Truncated)?,
        *v.get(2).ok_or(QuicError::Truncated)?,
        *v.get(3).ok_or(QuicError::Truncated)?,
    ]);
    let bits = (first >> 4) & 0x03;
    let ty = match (version, bits) {
        (QUIC_V1, 0) | (QUIC_V2, 1) => LongType::Initial,
        (QUIC_V1, 1) | (QUIC_V2, 2) => LongType::ZeroRtt,
        (QUIC_V1, 2) | (QUIC_V2, 3) => LongType::Handshake,
        (QUIC_V1, 3) | (QUIC_V2, 0) => LongType::Retry,
        _ => return Err(QuicError::UnsupportedVersion(version)),
    };
    let mut pos = 5;
    let cid = |pos: &mut usize| -> Result<&[u8], QuicError> {
        let len = usize::from(*buf.get(*pos).ok_or(QuicError::Truncated)?);
        if len > MAX_CID_LEN {
            return Err(QuicError::BadConnectionId);
        }
        let c = buf
            .get(*pos + 1..*pos + 1 + len)
            .ok_or(QuicError::Truncated)?;
        *pos += 1 + len;
        Ok(c)
    };
    let dcid = cid(&mut pos)?;
    let scid = cid(&mut pos)?;
    if ty == LongType::Retry {
        // No Length field: a Retry runs to the end of the datagram.
        return Ok(LongHeader {
            version,
            ty,
            dcid,
            scid,
            token: &[],
            pn_offset: buf.len(),
            end: buf.len(),
        });
    }
    let mut token: &[u8] = &[];
    if ty == LongType::Initial {
        let tlen = read_varint(buf, &mut pos).ok_or(QuicError::Truncated)?;
        let tlen = usize::try_from(tlen).map_err(|_| QuicError::Truncated)?;
        let end = pos.checked_add(tlen).ok_or(QuicError::Truncated)?;
        token = buf.get(pos..end).ok_or(QuicError::Truncated)?;
        pos = end;
    }
    let length = read_varint(buf, &mut pos).ok_or(QuicError::Truncated)?;
    let length = usize::try_from(length).map_err(|_| QuicError::Truncated)?;
    let end = pos.checked_add(length).ok_or(QuicError::Truncated)?;
    if end > buf.len() {
        return Err(QuicError::Truncated);
    }
    Ok(LongHeader {
        version,
        ty,
        dcid,
        scid,
        token,
        pn_offset: pos,
        end,
    })
}

/// A decrypted Initial packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitialPacket {
    pub packet_number: u64,
    /// Unprotected header bytes.
    pub header: Vec<u8>,
    /// Decrypted frames.
    pub payload: Vec<u8>,
}

/// Remove header protection from and decrypt the Initial packet `pkt`
/// (`pkt` ends at the packet's end; `pn_offset` from [`parse_long_header`]).
pub fn decrypt_initial(
    pkt: &[u8],
    pn_offset: usize,
    keys: &InitialKeys,
) -> Result<InitialPacket, QuicError> {
    // RFC 9001 5.4.2: the sample starts 4 bytes after the packet number start.
    let sample_at = pn_offset.checked_add(4).ok_or(QuicError::Truncated)?;
    let sample: [u8; 16] = pkt
        .get(sample_at..sample_at + 16)
        .and_then(|s| s.try_into().ok())
        .ok_or(QuicError::Truncated)?;
    let hp = Aes128::new(GenericArray::from_slice(&keys.hp));
    let mut mask = GenericArray::from(sample);
    hp.encrypt_block(&mut mask);

    let first = *pkt.first().ok_or(QuicError::Truncated)?;
    let first = first ^ (mask.first().copied().unwrap_or(0) & 0x0f);
    let pn_len = usize::from(first & 0x03) + 1;
    let hdr_len = pn_offset + pn_len;
    let mut header = pkt.get(..hdr_len).ok_or(QuicError::Truncated)?.to_vec();
    if let Some(b) = header.first_mut() {
        *b = first;
    }
    let mut pn = 0u64;
    for (i, b) in header.iter_mut().skip(pn_offset).enumerate() {
        *b ^= mask.get(i + 1).copied().unwrap_or(0);
        pn = (pn << 8) | u64::from(*b);
    }

    let body = pkt.get(hdr_len..).ok_or(QuicError::Truncated)?;
    if body.len() < TAG_LEN {
        return Err(QuicError::Truncated);
    }
    let (ct, tag) = body.split_at(body.len() - TAG_LEN);
    // Initial packet numbers start at 0 and stay small, so the truncated
    // number is the full one for every packet that can carry the ClientHello.
    let mut nonce = keys.iv;
    for (n, p) in nonce.iter_mut().skip(4).zip(pn.to_be_bytes()) {
        *n ^= p;
    }
    let aead = Aes128Gcm::new(GenericArray::from_slice(&keys.key));
    let mut payload = ct.to_vec();
    aead.decrypt_in_place_detached(
        Nonce::from_slice(&nonce),
        &header,
        &mut payload,
        Tag::from_slice(tag),
    )
    .map_err(|_| QuicError::Decrypt)?;
    Ok(InitialPacket {
        packet_number: pn,
        header,
        payload,
    })
}

/// Build a protected client Initial packet (4-byte packet number) around
/// `payload` (frames). The inverse of [`decrypt_initial`], for tests,
/// benchmarks and fuzz seeds; `None` for an unknown version or oversize input.
pub fn protect_client_initial(
    version: u32,
    dcid: &[u8],
    scid: &[u8],
    packet_number: u32,
    payload: &[u8],
) -> Option<Vec<u8>> {
    let keys = client_initial_keys(version, dcid)?;
    protect_initial(&keys, version, dcid, scid, packet_number, payload)
}

/// The server's Initial answering a client whose first Destination Connection ID was
/// `client_dcid`, sent to the client's `client_scid` from `server_scid`. For tests.
pub fn protect_server_initial(
    version: u32,
    client_dcid: &[u8],
    client_scid: &[u8],
    server_scid: &[u8],
    packet_number: u32,
    payload: &[u8],
) -> Option<Vec<u8>> {
    let keys = server_initial_keys(version, client_dcid)?;
    protect_initial(
        &keys,
        version,
        client_scid,
        server_scid,
        packet_number,
        payload,
    )
}

fn protect_initial(
    keys: &InitialKeys,
    version: u32,
    dcid: &[u8],
    scid: &[u8],
    packet_number: u32,
    payload: &[u8],
) -> Option<Vec<u8>> {
    let type_bits: u8 = if version == QUIC_V2 { 1 } else { 0 };
    let mut pkt = vec![0xc0 | (type_bits << 4) | 0x03];
    pkt.extend_from_slice(&version.to_be_bytes());
    pkt.push(u8::try_from(dcid.len()).ok()?);
    pkt.extend_from_slice(dcid);
    pkt.push(u8::try_from(scid.len()).ok()?);
    pkt.extend_from_slice(scid);
    pkt.push(0); // token length
    // Two-byte varint length: packet number + payload + tag.
    let length = u16::try_from(4 + payload.len() + TAG_LEN).ok()?;
    if length > 0x3fff {
        return None;
    }
    pkt.extend_from_slice(&(0x4000 | length).to_be_bytes());
    let pn_offset = pkt.len();
    pkt.extend_from_slice(&packet_number.to_be_bytes());

    let mut nonce = keys.iv;
    for (n, p) in nonce
        .iter_mut()
        .skip(4)
        .zip(u64::from(packet_number).to_be_bytes())
    {
        *n ^= p;
    }
    let aead = Aes128Gcm::new(GenericArray::from_slice(&keys.key));
    let mut body = payload.to_vec();
    let tag = aead
        .encrypt_in_place_detached(Nonce::from_slice(&nonce), &pkt, &mut body)
        .ok()?;
    body.extend_from_slice(&tag);
    // With a 4-byte packet number the sample is the first 16 ciphertext bytes.
    let sample: [u8; 16] = body.get(..16)?.try_into().ok()?;
    let hp = Aes128::new(GenericArray::from_slice(&keys.hp));
    let mut mask = GenericArray::from(sample);
    hp.encrypt_block(&mut mask);
    if let Some(b) = pkt.first_mut() {
        *b ^= mask.first().copied().unwrap_or(0) & 0x0f;
    }
    for (i, b) in pkt.iter_mut().skip(pn_offset).enumerate() {
        *b ^= mask.get(i + 1).copied().unwrap_or(0);
    }
    pkt.extend_from_slice(&body);
    Some(pkt)
}

/// Walk the frames of a decrypted Initial payload, calling `crypto(offset,
/// data)` for each CRYPTO frame. Frames not allowed in Initial packets stop
/// the walk (their length cannot be known); what was found so far is kept.
pub fn for_each_crypto_frame(
    payload: &[u8],
    mut crypto: impl FnMut(u64, &[u8]),
) -> Result<(), QuicError> {
    let mut pos = 0usize;
    let bad = QuicError::BadFrame;
    while pos < payload.len() {
        let ty = read_varint(payload, &mut pos).ok_or(bad.clone())?;
        match ty {
            0x00 | 0x01 => {} // PADDING, PING
            0x02 | 0x03 => {
                // ACK: largest, delay, range count, first range, ranges, [ECN].
                for _ in 0..2 {
                    read_varint(payload, &mut pos).ok_or(bad.clone())?;
                }
                let count = read_varint(payload, &mut pos).ok_or(bad.clone())?;
                read_varint(payload, &mut pos).ok_or(bad.clone())?;
                // Each range takes at least 2 bytes: bound the loop by the input.
                if count > (payload.len() as u64) {
                    return Err(bad);
                }
                for _ in 0..count * 2 {
                    read_varint(payload, &mut pos).ok_or(bad.clone())?;
                }
                if ty == 0x03 {
                    for _ in 0..3 {
                        read_varint(payload, &mut pos).ok_or(bad.clone())?;
                    }
                }
            }
            0x06 => {
                let offset = read_varint(payload, &mut pos).ok_or(bad.clone())?;
                let len = read_varint(payload, &mut pos).ok_or(bad.clone())?;
                let len = usize::try_from(len).map_err(|_| bad.clone())?;
                let end = pos.checked_add(len).ok_or(bad.clone())?;
                let data = payload.get(pos..end).ok_or(bad.clone())?;
                crypto(offset, data);
                pos = end;
            }
            0x1c | 0x1d => {
                read_varint(payload, &mut pos).ok_or(bad.clone())?; // error code
                if ty == 0x1c {
                    read_varint(payload, &mut pos).ok_or(bad.clone())?; // frame type
                }
                let len = read_varint(payload, &mut pos).ok_or(bad.clone())?;
                let len = usize::try_from(len).map_err(|_| bad.clone())?;
                pos = pos.checked_add(len).ok_or(bad.clone())?;
                if pos > payload.len() {
                    return Err(bad);
                }
            }
            _ => return Ok(()),
        }
    }
    Ok(())
}

/// Per-flow QUIC state: CRYPTO stream bytes and the keys in use.
#[derive(Debug, Clone)]
pub struct QuicInitialAssembler {
    crypto: RangeBuf,
    /// (version, DCID, keys) of the first decrypted Initial: later client
    /// Initials keep these keys even if the DCID changes.
    keys: Option<(u32, Vec<u8>, InitialKeys)>,
    parsed_len: usize,
    decrypted: usize,
}

impl QuicInitialAssembler {
    pub fn new(limits: &Limits) -> Self {
        QuicInitialAssembler {
            crypto: RangeBuf::new(limits.max_bytes_per_flow, limits.max_fragments),
            keys: None,
            parsed_len: 0,
            decrypted: 0,
        }
    }

    /// Number of Initial packets decrypted so far.
    pub fn decrypted_packets(&self) -> usize {
        self.decrypted
    }

    fn decrypt(&mut self, pkt: &[u8], hdr: &LongHeader<'_>) -> Result<InitialPacket, QuicError> {
        if let Some((v, dcid, keys)) = &self.keys {
            if *v == hdr.version
                && let Ok(p) = decrypt_initial(pkt, hdr.pn_offset, keys)
            {
                return Ok(p);
            }
            if *v == hdr.version && dcid.as_slice() == hdr.dcid {
                return Err(QuicError::Decrypt);
            }
        }
        let keys = client_initial_keys(hdr.version, hdr.dcid)
            .ok_or(QuicError::UnsupportedVersion(hdr.version))?;
        let p = decrypt_initial(pkt, hdr.pn_offset, &keys)?;
        if self.keys.is_none() {
            self.keys = Some((hdr.version, hdr.dcid.to_vec(), keys));
        }
        Ok(p)
    }

    /// Feed one UDP datagram (client to server).
    pub fn push(&mut self, datagram: &[u8]) -> Push {
        let mut pos = 0usize;
        let mut limit = false;
        let mut first_err: Option<QuicError> = None;
        while let Some(rest) = datagram.get(pos..).filter(|r| !r.is_empty()) {
            let hdr = match parse_long_header(rest) {
                Ok(h) => h,
                Err(e) => {
                    // A short-header packet or padding ends the coalesced run.
                    if pos == 0 {
                        first_err = Some(e);
                    }
                    break;
                }
            };
            let end = hdr.end;
            if hdr.ty == LongType::Initial {
                let pkt = rest.get(..end).unwrap_or(&[]);
                match self.decrypt(pkt, &hdr) {
                    Ok(p) => {
                        self.decrypted += 1;
                        let crypto = &mut self.crypto;
                        let r = for_each_crypto_frame(&p.payload, |off, data| {
                            if crypto.insert(off, data) == Insert::Limit {
                                limit = true;
                            }
                        });
                        if let Err(e) = r {
                            first_err.get_or_insert(e);
                        }
                    }
                    Err(e) => {
                        first_err.get_or_insert(e);
                    }
                }
            } else if pos == 0 && self.decrypted == 0 {
                first_err = Some(QuicError::NotInitial);
            }
            if hdr.ty == LongType::Retry || end == 0 {
                break;
            }
            pos += end;
        }

        let data = self.crypto.contiguous();
        if data.len() > self.parsed_len {
            self.parsed_len = data.len();
            match parse_handshake(data) {
                Ok(mut info) => {
                    info.quic_initial = self.keys.as_ref().map(|(v, dcid, _)| (*v, dcid.clone()));
                    return Push::Done(Box::new(info));
                }
                Err(ParseError::Incomplete { .. }) => {}
                Err(ParseError::TooLarge(_)) => return Push::Limit,
                Err(e) => return Push::Failed(e),
            }
        }
        if limit || self.crypto.is_full() {
            return Push::Limit;
        }
        if self.decrypted == 0 {
            return match first_err {
                Some(QuicError::Decrypt) => Push::Failed(ParseError::Quic(QuicError::Decrypt)),
                Some(QuicError::Truncated) | None => Push::NeedMore,
                Some(_) => Push::NotTls,
            };
        }
        Push::NeedMore
    }
}

impl Buffered for QuicInitialAssembler {
    fn buffered(&self) -> usize {
        self.crypto.buffered()
    }
}

/// Per-flow QUIC Initial reassembly with the same bounds as the TCP table.
#[derive(Debug)]
pub struct QuicInitialTable<K> {
    table: BoundedTable<K, QuicInitialAssembler>,
}

impl<K: Hash + Eq + Clone> QuicInitialTable<K> {
    pub fn new(limits: Limits) -> Self {
        QuicInitialTable {
            table: BoundedTable::new(limits),
        }
    }

    /// Feed a client-to-server UDP payload. Any result other than
    /// [`Push::NeedMore`] releases the entry.
    pub fn push(&mut self, key: K, datagram: &[u8], now: Instant) -> Push {
        let limits = self.table.limits;
        self.table.with_entry(
            key,
            now,
            || QuicInitialAssembler::new(&limits),
            |a| a.push(datagram),
        )
    }

    /// Drop entries older than the timeout; returns how many were dropped
    /// (including ones dropped to make room since the last call).
    /// The flows whose Initials gave up (past the timeout) since the last call.
    pub fn expire(&mut self, now: Instant) -> Vec<K> {
        self.table.expire(now)
    }

    pub fn remove(&mut self, key: &K) -> bool {
        self.table.remove(key)
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.len() == 0
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::tls::client_hello::tests::rfc_client_hello;

    pub(crate) fn hexfile(s: &str) -> Vec<u8> {
        hex::decode(s.split_whitespace().collect::<String>()).unwrap_or_default()
    }

    pub(crate) fn rfc9001_packet() -> Vec<u8> {
        hexfile(include_str!("testdata/rfc9001_a2_client_initial.hex"))
    }

    pub(crate) fn rfc9369_packet() -> Vec<u8> {
        hexfile(include_str!("testdata/rfc9369_a2_client_initial.hex"))
    }

    const DCID: [u8; 8] = [0x83, 0x94, 0xc8, 0xf0, 0x3e, 0x51, 0x57, 0x08];

    fn h(s: &str) -> Vec<u8> {
        hex::decode(s).unwrap_or_default()
    }

    #[test]
    fn rfc9001_a1_keys() {
        let secret = client_initial_secret(QUIC_V1, &DCID).expect("secret");
        assert_eq!(
            secret.to_vec(),
            h("c00cf151ca5be075ed0ebfb5c80323c42d6b7db67881289af4008f1f6c357aea")
        );
        let k = client_initial_keys(QUIC_V1, &DCID).expect("keys");
        assert_eq!(k.key.to_vec(), h("1f369613dd76d5467730efcbe3b1a22d"));
        assert_eq!(k.iv.to_vec(), h("fa044b2f42a3fd3b46fb255c"));
        assert_eq!(k.hp.to_vec(), h("9f50449e04a0e810283a1e9933adedd2"));
    }

    /// A server Initial made and encrypted by aioquic (1.2, `CryptoPair.setup_initial`
    /// with is_client=False) for the RFC 9001 client's DCID: an ACK and a CRYPTO frame
    /// with a TLS 1.3 ServerHello (TLS_AES_128_GCM_SHA256, x25519). Our server keys
    /// read it; a client's keys or another DCID do not.
    #[test]
    fn aioquic_server_initial_gives_the_server_hello() {
        let pkt = hexfile(include_str!("testdata/aioquic_server_initial.hex"));
        let hs = server_initial_crypto(&pkt, QUIC_V1, &DCID).expect("decrypts");
        let n = crate::tls::parse_server_hello_handshake(&hs).expect("ServerHello");
        assert_eq!(n.version, Some("1.3"));
        assert_eq!(n.cipher, "TLS_AES_128_GCM_SHA256");
        assert_eq!(n.curve().as_deref(), Some("x25519"));
        assert_eq!(server_initial_crypto(&pkt, QUIC_V1, &[1, 2, 3, 4]), None);
        // The same ServerHello through our own protection, for QUIC v2 too.
        for version in [QUIC_V1, QUIC_V2] {
            let frame = crypto_frame(0, &hs);
            let ours = protect_server_initial(version, &DCID, &[9; 8], &[5; 4], 0, &frame)
                .expect("protect");
            assert_eq!(
                server_initial_crypto(&ours, version, &DCID),
                Some(hs.clone())
            );
        }
    }

    #[test]
    fn rfc9369_a1_keys() {
        let secret = client_initial_secret(QUIC_V2, &DCID).expect("secret");
        assert_eq!(
            secret.to_vec(),
            h("14ec9d6eb9fd7af83bf5a668bc17a7e283766aade7ecd0891f70f9ff7f4bf47b")
        );
        let k = client_initial_keys(QUIC_V2, &DCID).expect("keys");
        assert_eq!(k.key.to_vec(), h("8b1a0bc121284290a29e0971b5cd045d"));
        assert_eq!(k.iv.to_vec(), h("91f73e2351d8fa91660e909f"));
        assert_eq!(k.hp.to_vec(), h("45b95e15235d6f45a6b19cbcb0294ba9"));
    }

    fn check_decrypt(pkt: &[u8], version: u32, unprotected_header: &str) {
        assert_eq!(pkt.len(), 1200);
        let hdr = parse_long_header(pkt).expect("header");
        assert_eq!(hdr.version, version);
        assert_eq!(hdr.ty, LongType::Initial);
        assert_eq!(hdr.dcid, DCID);
        assert_eq!(hdr.end, 1200);
        let keys = client_initial_keys(version, hdr.dcid).expect("keys");
        let p = decrypt_initial(pkt, hdr.pn_offset, &keys).expect("decrypt");
        assert_eq!(p.packet_number, 2);
        assert_eq!(p.header, h(unprotected_header));
        // A.2: CRYPTO frame (offset 0, length 241) then PADDING to 1162 bytes.
        assert_eq!(p.payload.len(), 1162);
        assert_eq!(p.payload.get(..4), Some(&[0x06, 0x00, 0x40, 0xf1][..]));
        let mut frames = Vec::new();
        for_each_crypto_frame(&p.payload, |off, d| frames.push((off, d.to_vec()))).expect("frames");
        assert_eq!(frames, vec![(0, rfc_client_hello())]);
    }

    #[test]
    fn rfc9001_a2_decrypt() {
        check_decrypt(
            &rfc9001_packet(),
            QUIC_V1,
            "c300000001088394c8f03e5157080000449e00000002",
        );
    }

    #[test]
    fn rfc9369_a2_decrypt() {
        check_decrypt(
            &rfc9369_packet(),
            QUIC_V2,
            "d36b3343cf088394c8f03e5157080000449e00000002",
        );
    }

    #[test]
    fn table_rfc_packets_give_sni() {
        let mut t = QuicInitialTable::new(Limits::default());
        let now = Instant::now();
        for (k, pkt) in [(1u8, rfc9001_packet()), (2u8, rfc9369_packet())] {
            match t.push(k, &pkt, now) {
                Push::Done(info) => {
                    assert_eq!(info.sni.as_deref(), Some("example.com"));
                    assert_eq!(info.tls_version, "1.3");
                    assert!(info.ja4.starts_with("q13d0211an_"), "{}", info.ja4);
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(t.is_empty());
    }

    #[test]
    fn tampered_packet_fails_decrypt() {
        let mut pkt = rfc9001_packet();
        if let Some(b) = pkt.get_mut(600) {
            *b ^= 1;
        }
        let mut t = QuicInitialTable::new(Limits::default());
        assert_eq!(
            t.push(1u8, &pkt, Instant::now()),
            Push::Failed(ParseError::Quic(QuicError::Decrypt))
        );
    }

    #[test]
    fn not_quic() {
        let mut t = QuicInitialTable::new(Limits::default());
        let now = Instant::now();
        assert_eq!(t.push(1u8, &[0x40, 1, 2, 3], now), Push::NotTls);
        assert_eq!(
            t.push(2u8, &[0xc0, 0xfa, 0xce, 0xb0, 0x0c, 0, 0], now),
            Push::NotTls
        );
        assert!(t.is_empty());
    }

    #[test]
    fn every_prefix_and_corruption_never_panics() {
        for pkt in [rfc9001_packet(), rfc9369_packet()] {
            for n in 0..pkt.len() {
                let mut a = QuicInitialAssembler::new(&Limits::default());
                let r = a.push(&pkt[..n]);
                assert!(!matches!(r, Push::Done(_)), "prefix {n}");
            }
            let mut state = 0xdead_beef_u32;
            for _ in 0..300 {
                let mut b = pkt.clone();
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                let pos = state as usize % 64;
                if let Some(x) = b.get_mut(pos) {
                    *x = (state >> 8) as u8;
                }
                let mut a = QuicInitialAssembler::new(&Limits::default());
                let _ = a.push(&b);
            }
        }
    }

    /// CRYPTO frame with 2-byte varint offset and length.
    pub(crate) fn crypto_frame(offset: usize, data: &[u8]) -> Vec<u8> {
        let mut f = vec![0x06];
        f.extend_from_slice(&(0x4000 | offset as u16).to_be_bytes());
        f.extend_from_slice(&(0x4000 | data.len() as u16).to_be_bytes());
        f.extend_from_slice(data);
        f
    }

    #[test]
    fn protect_reproduces_rfc_packets() {
        let hello = rfc_client_hello();
        // The RFC frame uses a 1-byte offset varint: rebuild it exactly.
        let mut rfc_payload = vec![0x06, 0x00, 0x40, 0xf1];
        rfc_payload.extend_from_slice(&hello);
        rfc_payload.resize(1162, 0);
        let v1 = protect_client_initial(QUIC_V1, &DCID, &[], 2, &rfc_payload).expect("v1");
        assert_eq!(v1, rfc9001_packet());
        let v2 = protect_client_initial(QUIC_V2, &DCID, &[], 2, &rfc_payload).expect("v2");
        assert_eq!(v2, rfc9369_packet());
    }

    fn split_packets(version: u32) -> (Vec<u8>, Vec<u8>) {
        let hello = rfc_client_hello();
        // Packet A: PING, end of the hello, ACK, start of the hello, PADDING.
        let mut a = vec![0x01];
        a.extend(crypto_frame(100, &hello[100..]));
        a.extend_from_slice(&[0x02, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00]);
        a.extend(crypto_frame(0, &hello[..50]));
        a.resize(400, 0);
        // Packet B: the middle, then padding.
        let mut b = crypto_frame(50, &hello[50..100]);
        b.resize(300, 0);
        let scid = [1u8, 2, 3, 4];
        (
            protect_client_initial(version, &DCID, &scid, 0, &a).expect("a"),
            protect_client_initial(version, &DCID, &scid, 1, &b).expect("b"),
        )
    }

    #[test]
    fn crypto_split_across_packets_and_datagrams() {
        for version in [QUIC_V1, QUIC_V2] {
            let (a, b) = split_packets(version);
            let now = Instant::now();
            let mut t = QuicInitialTable::new(Limits::default());
            // Separate datagrams, out of order.
            assert_eq!(t.push(1u8, &b, now), Push::NeedMore);
            assert_eq!(t.push(1u8, &b, now), Push::NeedMore); // retransmission
            match t.push(1u8, &a, now) {
                Push::Done(info) => assert_eq!(info.sni.as_deref(), Some("example.com")),
                other => panic!("{other:?}"),
            }
            // Coalesced in one datagram, followed by a short-header packet.
            let mut d = b.clone();
            d.extend_from_slice(&a);
            d.extend_from_slice(&[0x40, 0xaa, 0xbb, 0xcc]);
            match t.push(2u8, &d, now) {
                Push::Done(info) => assert_eq!(info.sni.as_deref(), Some("example.com")),
                other => panic!("{other:?}"),
            }
            assert!(t.is_empty());
        }
    }

    #[test]
    fn quic_table_limits() {
        let limits = Limits {
            max_flows: 1,
            max_bytes_per_flow: 120,
            ..Limits::default()
        };
        let (a, b) = split_packets(QUIC_V1);
        let now = Instant::now();
        let mut t = QuicInitialTable::new(limits);
        assert_eq!(t.push(1u8, &b, now), Push::NeedMore);
        assert_eq!(t.push(2u8, &b, now), Push::Limit);
        // CRYPTO data up to offset 241 does not fit in 120 bytes.
        assert_eq!(t.push(1u8, &a, now), Push::Limit);
        assert_eq!(t.push(3u8, &b, now), Push::NeedMore);
        assert_eq!(t.expire(now + limits.timeout), vec![3u8]);
    }

    #[test]
    fn pending_initials_share_one_memory_bound() {
        let (_, b) = split_packets(QUIC_V1);
        let now = Instant::now();
        let mut probe = QuicInitialTable::new(Limits::default());
        assert_eq!(probe.push(1u8, &b, now), Push::NeedMore);
        let one = probe.table.bytes();
        assert!(one > 0);
        // Room for one flow's CRYPTO bytes, not two: the second flow gives up.
        let mut t = QuicInitialTable::new(Limits {
            max_total_bytes: one,
            ..Limits::default()
        });
        assert_eq!(t.push(1u8, &b, now), Push::NeedMore);
        assert_eq!(t.push(2u8, &b, now), Push::Limit);
        assert_eq!((t.len(), t.table.bytes()), (1, one));
        assert!(t.remove(&1));
        assert_eq!(t.table.bytes(), 0);
        assert_eq!(t.push(2u8, &b, now), Push::NeedMore);
    }

    #[test]
    fn varint() {
        let mut p = 0;
        assert_eq!(
            read_varint(&h("c2197c5eff14e88c"), &mut p),
            Some(151_288_809_941_952_652)
        );
        p = 0;
        assert_eq!(read_varint(&h("9d7f3e7d"), &mut p), Some(494_878_333));
        p = 0;
        assert_eq!(read_varint(&h("7bbd"), &mut p), Some(15_293));
        p = 0;
        assert_eq!(read_varint(&h("25"), &mut p), Some(37));
        p = 0;
        assert_eq!(read_varint(&h("7b"), &mut p), None);
    }
}
