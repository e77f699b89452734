//! Declared gaps: the sensor's signed word that seqs `from..=to` are gone from its
//! spool (a deleted or cut segment) and will never be sent. The uplink sends one with
//! the first batch after the damage; the collector checks it against the pinned key,
//! keeps it beside the stored chain in `gaps.declared`, and from then on every reader
//! of that chain steps over exactly that range: the verifier reports the chain as
//! verified but incomplete there instead of broken, and nothing else may be missing.

use std::collections::BTreeMap;
use std::path::Path;

use conduit_proto::v1;
use ed25519_dalek::{Signer as _, SigningKey};
use serde_json::json;

use super::checkpoint::verify_signature;
use super::line_file;

pub const GAP_DOMAIN: &[u8] = b"conduit-sensor gap v1\0";
/// File of declarations in a store's chain directory, one JSON object per line.
pub const GAPS_FILE: &str = "gaps.declared";
/// Bytes of the reason kept (it names a file and an offset; nothing needs more).
pub const MAX_REASON_BYTES: usize = 512;

/// One declared gap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeclaredGap {
    pub from: u64,
    pub to: u64,
    /// The hash of `to`: what the first record after the gap links to.
    pub resume_prev_hash: [u8; 32],
    pub reason: String,
    pub signature: [u8; 64],
}

/// The byte string a declaration signs: `"conduit-sensor gap v1\0" || u16 BE
/// len(sensor_id) || sensor_id || u64 BE from || u64 BE to || resume_prev_hash (32)
/// || u16 BE len(reason) || reason`.
pub fn statement(sensor_id: &str, from: u64, to: u64, resume: &[u8; 32], reason: &str) -> Vec<u8> {
    let (id, why) = (sensor_id.as_bytes(), reason.as_bytes());
    let mut out = Vec::with_capacity(GAP_DOMAIN.len() + 2 + id.len() + 16 + 32 + 2 + why.len());
    out.extend_from_slice(GAP_DOMAIN);
    out.extend_from_slice(&u16::try_from(id.len()).unwrap_or(u16::MAX).to_be_bytes());
    out.extend_from_slice(id);
    out.extend_from_slice(&from.to_be_bytes());
    out.extend_from_slice(&to.to_be_bytes());
    out.extend_from_slice(resume);
    out.extend_from_slice(&u16::try_from(why.len()).unwrap_or(u16::MAX).to_be_bytes());
    out.extend_from_slice(why);
    out
}

/// `reason` cut to [`MAX_REASON_BYTES`] at a character boundary.
fn bounded(reason: &str) -> String {
    let mut end = reason.len().min(MAX_REASON_BYTES);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_owned()
}

fn array<const N: usize>(b: &[u8], what: &str) -> Result<[u8; N], String> {
    b.try_into()
        .map_err(|_| format!("{what} is {} bytes, not {N}", b.len()))
}

impl DeclaredGap {
    pub fn sign(
        key: &SigningKey,
        sensor_id: &str,
        from: u64,
        to: u64,
        resume_prev_hash: &[u8; 32],
        reason: &str,
    ) -> DeclaredGap {
        let reason = bounded(reason);
        let msg = statement(sensor_id, from, to, resume_prev_hash, &reason);
        DeclaredGap {
            from,
            to,
            resume_prev_hash: *resume_prev_hash,
            reason,
            signature: key.sign(&msg).to_bytes(),
        }
    }

    /// Checks the declaration's shape and its signature by the chain's key.
    pub fn verify(&self, key: &[u8; 32], sensor_id: &str) -> Result<(), String> {
        if self.from == 0 || self.to < self.from {
            return Err(format!(
                "declares the empty range {}..={}",
                self.from, self.to
            ));
        }
        if self.reason.len() > MAX_REASON_BYTES {
            return Err(format!("reason of {} bytes", self.reason.len()));
        }
        let msg = statement(
            sensor_id,
            self.from,
            self.to,
            &self.resume_prev_hash,
            &self.reason,
        );
        verify_signature(key, &msg, &self.signature)
            .map_err(|e| format!("gap {}..={}: {e}", self.from, self.to))
    }

    pub fn to_proto(&self) -> v1::GapDeclaration {
        v1::GapDeclaration {
            from_seq: self.from,
            to_seq: self.to,
            resume_prev_hash: self.resume_prev_hash.to_vec(),
            reason: self.reason.clone(),
            signature: self.signature.to_vec(),
        }
    }

    pub fn from_proto(g: &v1::GapDeclaration) -> Result<DeclaredGap, String> {
        Ok(DeclaredGap {
            from: g.from_seq,
            to: g.to_seq,
            resume_prev_hash: array(&g.resume_prev_hash, "resume_prev_hash")?,
            reason: g.reason.clone(),
            signature: array(&g.signature, "signature")?,
        })
    }

    fn to_line(&self) -> String {
        let mut line = json!({
            "from": self.from,
            "to": self.to,
            "resume_prev_hash": hex::encode(self.resume_prev_hash),
            "reason": self.reason,
            "signature": hex::encode(self.signature),
        })
        .to_string();
        line.push('\n');
        line
    }

    fn parse_line(line: &str) -> Result<DeclaredGap, String> {
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
        let hex_field = |name: &str| {
            v[name]
                .as_str()
                .ok_or_else(|| format!("{name} missing"))
                .and_then(|s| hex::decode(s).map_err(|e| format!("{name}: not hex ({e})")))
        };
        Ok(DeclaredGap {
            from: v["from"].as_u64().ok_or("from missing")?,
            to: v["to"].as_u64().ok_or("to missing")?,
            resume_prev_hash: array(&hex_field("resume_prev_hash")?, "resume_prev_hash")?,
            reason: v["reason"].as_str().ok_or("reason missing")?.to_owned(),
            signature: array(&hex_field("signature")?, "signature")?,
        })
    }
}

/// The declarations in `dir` (none: empty), by first missing seq. A complete line that
/// does not parse is an error naming it: the file was changed.
pub fn read(dir: &Path) -> Result<BTreeMap<u64, DeclaredGap>, String> {
    let (lines, _torn) = line_file::read(dir, GAPS_FILE)?;
    let mut out = BTreeMap::new();
    for (i, line) in lines.iter().enumerate() {
        let g = DeclaredGap::parse_line(line)
            .map_err(|e| format!("{} line {}: {e}", dir.join(GAPS_FILE).display(), i + 1))?;
        out.insert(g.from, g);
    }
    Ok(out)
}

/// The ranges readers step over: first missing seq to last missing seq. Unreadable
/// declarations give none (the verifier names the file's problem).
pub fn ranges(dir: &Path) -> BTreeMap<u64, u64> {
    read(dir)
        .map(|m| m.into_values().map(|g| (g.from, g.to)).collect())
        .unwrap_or_default()
}

/// Appends a declaration durably, unless the same one is there already (a sensor
/// that re-sends after a collector crash declares it again).
pub fn append(dir: &Path, g: &DeclaredGap) -> Result<(), String> {
    if read(dir)?.get(&g.from) == Some(g) {
        return Ok(());
    }
    line_file::append(dir, GAPS_FILE, &g.to_line())
        .map_err(|e| format!("{}: {e}", dir.join(GAPS_FILE).display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[9; 32])
    }

    #[test]
    fn signed_declarations_verify_and_round_trip() {
        let k = key();
        let public = k.verifying_key().to_bytes();
        let g = DeclaredGap::sign(&k, "gw-1", 5, 9, &[1; 32], "segment deleted");
        g.verify(&public, "gw-1").expect("verifies");
        assert!(g.verify(&public, "gw-2").is_err(), "another sensor's");
        let other = SigningKey::from_bytes(&[8; 32]).verifying_key().to_bytes();
        assert!(g.verify(&other, "gw-1").is_err(), "another key");
        let mut moved = g.clone();
        moved.to = 10;
        assert!(moved.verify(&public, "gw-1").is_err(), "a wider range");
        assert_eq!(DeclaredGap::from_proto(&g.to_proto()), Ok(g.clone()));

        let dir = tempfile::tempdir().expect("tempdir");
        append(dir.path(), &g).expect("append");
        append(dir.path(), &g).expect("append again");
        let read_back = read(dir.path()).expect("read");
        assert_eq!(
            read_back.len(),
            1,
            "the same declaration twice is kept once"
        );
        assert_eq!(read_back.get(&5), Some(&g));
        assert_eq!(ranges(dir.path()).get(&5), Some(&9));
    }

    #[test]
    fn reasons_are_bounded_and_empty_ranges_refused() {
        let k = key();
        let g = DeclaredGap::sign(&k, "gw-1", 3, 3, &[0; 32], &"é".repeat(1000));
        assert!(g.reason.len() <= MAX_REASON_BYTES);
        g.verify(&k.verifying_key().to_bytes(), "gw-1")
            .expect("verifies");
        let g = DeclaredGap::sign(&k, "gw-1", 4, 3, &[0; 32], "x");
        assert!(g.verify(&k.verifying_key().to_bytes(), "gw-1").is_err());
    }
}
