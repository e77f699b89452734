//! Signed checkpoints and chain restarts, and the policy that decides when to write one.

use std::time::{Duration, SystemTime};

use conduit_proto::v1::{self, RecordKind, record::Body};
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};

use super::hashing::ZERO_HASH;

pub const CHECKPOINT_DOMAIN: &[u8] = b"conduit-sensor checkpoint v1\0";
pub const DEFAULT_EVERY_RECORDS: u64 = 1000;
pub const DEFAULT_EVERY: Duration = Duration::from_secs(10);

/// The byte string a checkpoint signs:
/// `"conduit-sensor checkpoint v1\0" || u16 BE len(sensor_id) || sensor_id ||
/// u64 BE seq || hash (32) || i64 BE time_unix_nano`.
/// A chain restart signs the same with seq 0 and an all-zero hash.
pub fn signing_bytes(sensor_id: &str, seq: u64, hash: &[u8; 32], time_unix_nano: i64) -> Vec<u8> {
    let id = sensor_id.as_bytes();
    let mut out = Vec::with_capacity(CHECKPOINT_DOMAIN.len() + 2 + id.len() + 8 + 32 + 8);
    out.extend_from_slice(CHECKPOINT_DOMAIN);
    out.extend_from_slice(&u16::try_from(id.len()).unwrap_or(u16::MAX).to_be_bytes());
    out.extend_from_slice(id);
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(hash);
    out.extend_from_slice(&time_unix_nano.to_be_bytes());
    out
}

pub const BATCH_DOMAIN: &[u8] = b"conduit-sensor batch v1\0";

/// The byte string a stream batch's signature signs: `"conduit-sensor batch v1\0" ||
/// u16 BE len(sensor_id) || sensor_id || u64 BE seq || hash (32)` of its last frame.
pub fn batch_signing_bytes(sensor_id: &str, seq: u64, hash: &[u8; 32]) -> Vec<u8> {
    let id = sensor_id.as_bytes();
    let mut out = Vec::with_capacity(BATCH_DOMAIN.len() + 2 + id.len() + 8 + 32);
    out.extend_from_slice(BATCH_DOMAIN);
    out.extend_from_slice(&u16::try_from(id.len()).unwrap_or(u16::MAX).to_be_bytes());
    out.extend_from_slice(id);
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(hash);
    out
}

/// Signs a batch ending at (seq, hash).
pub fn sign_batch(key: &SigningKey, sensor_id: &str, seq: u64, hash: &[u8; 32]) -> Vec<u8> {
    key.sign(&batch_signing_bytes(sensor_id, seq, hash))
        .to_bytes()
        .to_vec()
}

/// Nanoseconds since the Unix epoch (0 before it, saturating far in the future).
pub fn unix_nanos(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// A checkpoint record covering (seq, hash), the record just before it; `interval`
/// is the heartbeat the sensor promises (the next checkpoint comes within it).
pub fn checkpoint_record(
    key: &SigningKey,
    sensor_id: &str,
    seq: u64,
    hash: &[u8; 32],
    now: SystemTime,
    records_since_last: u64,
    interval: Duration,
) -> v1::Record {
    let time = unix_nanos(now);
    let sig = key.sign(&signing_bytes(sensor_id, seq, hash, time));
    v1::Record {
        software_version: String::new(),
        kind: RecordKind::Checkpoint as i32,
        time_unix_nano: time,
        sensor_id: sensor_id.to_owned(),
        site: String::new(),
        body: Some(Body::Checkpoint(v1::Checkpoint {
            seq,
            hash: hash.to_vec(),
            time_unix_nano: time,
            public_key: key.verifying_key().to_bytes().to_vec(),
            signature: sig.to_bytes().to_vec(),
            records_since_last,
            interval_ms: u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
        })),
    }
}

/// The first record of a new chain: why there is no earlier chain to continue.
pub fn chain_restart_record(
    key: &SigningKey,
    sensor_id: &str,
    reason: &str,
    detail: &str,
    now: SystemTime,
) -> v1::Record {
    let time = unix_nanos(now);
    let sig = key.sign(&signing_bytes(sensor_id, 0, &ZERO_HASH, time));
    v1::Record {
        software_version: String::new(),
        kind: RecordKind::ChainRestart as i32,
        time_unix_nano: time,
        sensor_id: sensor_id.to_owned(),
        site: String::new(),
        body: Some(Body::ChainRestart(v1::ChainRestart {
            reason: reason.to_owned(),
            detail: detail.to_owned(),
            public_key: key.verifying_key().to_bytes().to_vec(),
            signature: sig.to_bytes().to_vec(),
        })),
    }
}

/// Checks an ed25519 signature (strict: rejects malleable and small-order forms).
pub fn verify_signature(public_key: &[u8], message: &[u8], signature: &[u8]) -> Result<(), String> {
    let pk: [u8; 32] = public_key
        .try_into()
        .map_err(|_| format!("public key is {} bytes, not 32", public_key.len()))?;
    let sig: [u8; 64] = signature
        .try_into()
        .map_err(|_| format!("signature is {} bytes, not 64", signature.len()))?;
    let vk = VerifyingKey::from_bytes(&pk).map_err(|e| format!("bad public key: {e}"))?;
    vk.verify_strict(message, &Signature::from_bytes(&sig))
        .map_err(|_| "signature does not verify".to_owned())
}

/// When to write the next checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointPolicy {
    /// At most this many records between checkpoints.
    pub every_records: u64,
    /// At most this long between checkpoints, records or not.
    pub every: Duration,
}

impl Default for CheckpointPolicy {
    fn default() -> Self {
        CheckpointPolicy {
            every_records: DEFAULT_EVERY_RECORDS,
            every: DEFAULT_EVERY,
        }
    }
}

impl CheckpointPolicy {
    pub fn due_by_count(&self, records_since: u64) -> bool {
        records_since >= self.every_records.max(1)
    }

    /// Due when `every` has passed since `last`, or the clock went backwards.
    pub fn due_by_time(&self, last: SystemTime, now: SystemTime) -> bool {
        now.duration_since(last).map_or(true, |d| d >= self.every)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signing_bytes_layout() {
        let b = signing_bytes("gw", 0x0102, &[9; 32], -1);
        let mut want = b"conduit-sensor checkpoint v1\0".to_vec();
        want.extend_from_slice(&[0, 2]);
        want.extend_from_slice(b"gw");
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 1, 2]);
        want.extend_from_slice(&[9; 32]);
        want.extend_from_slice(&[0xff; 8]);
        assert_eq!(b, want);
    }

    #[test]
    fn checkpoint_signature_verifies_and_binds_fields() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let now = SystemTime::now();
        let rec = checkpoint_record(&key, "gw", 5, &[1; 32], now, 5, DEFAULT_EVERY);
        let Some(Body::Checkpoint(cp)) = rec.body else {
            panic!("not a checkpoint")
        };
        let msg = signing_bytes("gw", 5, &[1; 32], cp.time_unix_nano);
        assert_eq!(
            verify_signature(&cp.public_key, &msg, &cp.signature),
            Ok(())
        );
        let other = signing_bytes("gw", 6, &[1; 32], cp.time_unix_nano);
        assert!(verify_signature(&cp.public_key, &other, &cp.signature).is_err());
    }

    #[test]
    fn policy() {
        let p = CheckpointPolicy::default();
        assert!(!p.due_by_count(999));
        assert!(p.due_by_count(1000));
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(100);
        assert!(!p.due_by_time(t, t + Duration::from_secs(9)));
        assert!(p.due_by_time(t, t + Duration::from_secs(10)));
        assert!(p.due_by_time(t, t - Duration::from_secs(1)));
    }
}
