//! Frame codec: `u32 LE payload length | u32 LE crc32c | payload`, where the payload is
//! `u64 BE seq | prev_hash (32) | hash (32) | record bytes`. The CRC covers the four
//! length bytes and the payload, so a flipped length bit is caught too.
//! Layout: docs/spool-format.md.

/// Bytes before the payload: length and CRC.
pub const FRAME_HEADER_LEN: usize = 8;
/// Fixed part of the payload: seq, prev_hash, hash.
pub const PAYLOAD_FIXED_LEN: usize = 8 + 32 + 32;
/// Largest payload a reader accepts. Records are a few hundred bytes; anything bigger
/// than this is garbage (a torn or corrupted length), not a record.
pub const MAX_PAYLOAD_LEN: usize = 16 * 1024 * 1024;
/// Largest record a writer may frame: what a reader accepts, so no writer can emit an
/// unreadable frame.
pub const MAX_RECORD_LEN: usize = MAX_PAYLOAD_LEN - PAYLOAD_FIXED_LEN;

/// One stored frame, borrowed from a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameRef<'a> {
    pub seq: u64,
    pub prev_hash: [u8; 32],
    pub hash: [u8; 32],
    pub record: &'a [u8],
}

/// One stored frame, owned (what `Spool::read_from` yields).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredFrame {
    pub seq: u64,
    pub prev_hash: [u8; 32],
    pub hash: [u8; 32],
    pub record_bytes: Vec<u8>,
}

impl FrameRef<'_> {
    pub fn to_owned_frame(&self) -> StoredFrame {
        StoredFrame {
            seq: self.seq,
            prev_hash: self.prev_hash,
            hash: self.hash,
            record_bytes: self.record.to_vec(),
        }
    }
}

/// Encoded size of a frame carrying `record_len` record bytes.
pub const fn encoded_len(record_len: usize) -> usize {
    FRAME_HEADER_LEN + PAYLOAD_FIXED_LEN + record_len
}

/// Appends the encoded frame to `out`.
pub fn encode_into(frame: &FrameRef<'_>, out: &mut Vec<u8>) {
    let payload_len = PAYLOAD_FIXED_LEN + frame.record.len();
    let len_bytes = u32::try_from(payload_len).unwrap_or(u32::MAX).to_le_bytes();
    let start = out.len();
    out.reserve(FRAME_HEADER_LEN + payload_len);
    out.extend_from_slice(&len_bytes);
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&frame.seq.to_be_bytes());
    out.extend_from_slice(&frame.prev_hash);
    out.extend_from_slice(&frame.hash);
    out.extend_from_slice(frame.record);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&len_bytes), &out[start + FRAME_HEADER_LEN..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Why bytes at some offset are not a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("truncated frame: {available} bytes left, need {needed}")]
    Truncated { available: usize, needed: usize },
    #[error("frame length {0} out of range")]
    BadLength(u64),
    #[error("frame CRC mismatch (stored {stored:08x}, computed {computed:08x})")]
    BadCrc { stored: u32, computed: u32 },
}

/// Decodes the frame at the start of `buf`; returns it and its encoded length.
pub fn decode(buf: &[u8]) -> Result<(FrameRef<'_>, usize), FrameError> {
    let Some(header) = buf.get(..FRAME_HEADER_LEN) else {
        return Err(FrameError::Truncated {
            available: buf.len(),
            needed: FRAME_HEADER_LEN,
        });
    };
    let len_bytes: [u8; 4] = [header[0], header[1], header[2], header[3]];
    let payload_len = u32::from_le_bytes(len_bytes) as usize;
    if !(PAYLOAD_FIXED_LEN..=MAX_PAYLOAD_LEN).contains(&payload_len) {
        return Err(FrameError::BadLength(payload_len as u64));
    }
    let stored = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    let total = FRAME_HEADER_LEN + payload_len;
    let Some(payload) = buf.get(FRAME_HEADER_LEN..total) else {
        return Err(FrameError::Truncated {
            available: buf.len(),
            needed: total,
        });
    };
    let computed = crc32c::crc32c_append(crc32c::crc32c(&len_bytes), payload);
    if computed != stored {
        return Err(FrameError::BadCrc { stored, computed });
    }
    let mut seq = [0; 8];
    seq.copy_from_slice(&payload[..8]);
    let mut prev_hash = [0; 32];
    prev_hash.copy_from_slice(&payload[8..40]);
    let mut hash = [0; 32];
    hash.copy_from_slice(&payload[40..72]);
    Ok((
        FrameRef {
            seq: u64::from_be_bytes(seq),
            prev_hash,
            hash,
            record: &payload[PAYLOAD_FIXED_LEN..],
        },
        total,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(seq: u64, record: &[u8]) -> FrameRef<'_> {
        FrameRef {
            seq,
            prev_hash: [1; 32],
            hash: [2; 32],
            record,
        }
    }

    #[test]
    fn round_trip() {
        let mut buf = Vec::new();
        encode_into(&frame(7, b"hello"), &mut buf);
        assert_eq!(buf.len(), encoded_len(5));
        let (f, n) = decode(&buf).expect("decodes");
        assert_eq!(n, buf.len());
        assert_eq!(f, frame(7, b"hello"));
    }

    proptest! {
        #[test]
        fn prop_round_trip(seq in any::<u64>(), prev in any::<[u8; 32]>(), hash in any::<[u8; 32]>(),
                           record in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let f = FrameRef { seq, prev_hash: prev, hash, record: &record };
            let mut buf = Vec::new();
            encode_into(&f, &mut buf);
            let (g, n) = decode(&buf).expect("decodes");
            prop_assert_eq!(n, buf.len());
            prop_assert_eq!(g, f);
        }

        #[test]
        fn prop_every_prefix_is_truncated(record in proptest::collection::vec(any::<u8>(), 0..300), cut in any::<prop::sample::Index>()) {
            let mut buf = Vec::new();
            encode_into(&frame(1, &record), &mut buf);
            let cut = cut.index(buf.len());
            prop_assert!(decode(&buf[..cut]).is_err());
        }

        #[test]
        fn prop_bit_flip_detected(record in proptest::collection::vec(any::<u8>(), 0..300), bit in any::<prop::sample::Index>()) {
            let mut buf = Vec::new();
            encode_into(&frame(1, &record), &mut buf);
            let bit = bit.index(buf.len() * 8);
            buf[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(decode(&buf).is_err());
        }

        #[test]
        fn prop_sequence_of_frames(records in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 0..20)) {
            let mut buf = Vec::new();
            for (i, r) in records.iter().enumerate() {
                encode_into(&frame(i as u64 + 1, r), &mut buf);
            }
            let mut off = 0;
            for (i, r) in records.iter().enumerate() {
                let (f, n) = decode(&buf[off..]).expect("decodes");
                prop_assert_eq!(f.seq, i as u64 + 1);
                prop_assert_eq!(f.record, &r[..]);
                off += n;
            }
            prop_assert_eq!(off, buf.len());
        }
    }
}
