//! Record hash: blake3 in derive_key mode with context [`HASH_CONTEXT`] over
//! `seq (u64 BE) || prev_hash (32) || record bytes` (the exact stored bytes).

use std::sync::OnceLock;

pub const HASH_CONTEXT: &str = "conduit-sensor record v1";
/// prev_hash of the first record of a chain.
pub const ZERO_HASH: [u8; 32] = [0; 32];

/// The derive_key hasher with its context key already computed; cloning it is much
/// cheaper than deriving the context key per record.
fn base() -> &'static blake3::Hasher {
    static BASE: OnceLock<blake3::Hasher> = OnceLock::new();
    BASE.get_or_init(|| blake3::Hasher::new_derive_key(HASH_CONTEXT))
}

/// Hash of the record with this seq, predecessor hash and stored bytes.
pub fn record_hash(seq: u64, prev_hash: &[u8; 32], record_bytes: &[u8]) -> [u8; 32] {
    let mut h = base().clone();
    h.update(&seq.to_be_bytes());
    h.update(prev_hash);
    h.update(record_bytes);
    *h.finalize().as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_plain_derive_key() {
        let mut input = Vec::new();
        input.extend_from_slice(&5u64.to_be_bytes());
        input.extend_from_slice(&[7; 32]);
        input.extend_from_slice(b"record");
        assert_eq!(
            record_hash(5, &[7; 32], b"record"),
            blake3::derive_key(HASH_CONTEXT, &input)
        );
    }

    #[test]
    fn every_input_matters() {
        let h = record_hash(1, &ZERO_HASH, b"x");
        assert_ne!(h, record_hash(2, &ZERO_HASH, b"x"));
        assert_ne!(h, record_hash(1, &[1; 32], b"x"));
        assert_ne!(h, record_hash(1, &ZERO_HASH, b"y"));
    }
}
