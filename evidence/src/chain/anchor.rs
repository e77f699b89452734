//! The retention anchor: what a collector leaves in a chain directory when it prunes
//! the oldest segments, so that the rest still verifies from there. It names the
//! last pruned record (seq and hash: the next stored record must link to it), what
//! was pruned and under which policy, and carries the sensor's last signed
//! checkpoint of the pruned part, which the verifier checks against the pinned key.
//! The collector also records every pruning in its own signed alarm chain.

use std::fs;
use std::io::Write as _;
use std::path::Path;

use serde_json::{Value, json};

/// File name inside the chain directory.
pub const ANCHOR_FILE: &str = "retention.anchor";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anchor {
    /// The last pruned record.
    pub seq: u64,
    pub hash: [u8; 32],
    /// The first seq the store ever pruned (the chain's oldest).
    pub pruned_from: u64,
    pub segments: u64,
    pub retention_days: u64,
    /// RFC 3339 time of the pruning.
    pub time: String,
    /// Record time (Unix nanoseconds) of the newest pruned record: records of any
    /// earlier time may be gone.
    pub pruned_until: i64,
    /// The sensor's last checkpoint record in the pruned part: seq, hash of its
    /// frame and the record bytes (hex), if the pruned part held one.
    pub checkpoint: Option<(u64, [u8; 32], Vec<u8>)>,
}

fn hash32(v: &Value) -> Option<[u8; 32]> {
    hex::decode(v.as_str()?).ok()?.try_into().ok()
}

impl Anchor {
    fn to_json(&self) -> Value {
        json!({
            "seq": self.seq,
            "hash": hex::encode(self.hash),
            "pruned_from": self.pruned_from,
            "segments": self.segments,
            "retention_days": self.retention_days,
            "time": self.time,
            "pruned_until_unix_nano": self.pruned_until,
            "checkpoint": self.checkpoint.as_ref().map(|(seq, hash, record)| json!({
                "seq": seq, "hash": hex::encode(hash), "record": hex::encode(record),
            })),
        })
    }

    fn from_json(v: &Value) -> Option<Anchor> {
        let checkpoint = match &v["checkpoint"] {
            Value::Null => None,
            c => Some((
                c["seq"].as_u64()?,
                hash32(&c["hash"])?,
                hex::decode(c["record"].as_str()?).ok()?,
            )),
        };
        Some(Anchor {
            seq: v["seq"].as_u64()?,
            hash: hash32(&v["hash"])?,
            pruned_from: v["pruned_from"].as_u64()?,
            segments: v["segments"].as_u64()?,
            retention_days: v["retention_days"].as_u64()?,
            time: v["time"].as_str()?.to_owned(),
            pruned_until: v["pruned_until_unix_nano"].as_i64()?,
            checkpoint,
        })
    }
}

/// The anchor of a chain directory, if it has one.
pub fn read(dir: &Path) -> Result<Option<Anchor>, String> {
    let path = dir.join(ANCHOR_FILE);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    serde_json::from_slice::<Value>(&bytes)
        .ok()
        .and_then(|v| Anchor::from_json(&v))
        .map(Some)
        .ok_or_else(|| format!("{}: not a retention anchor", path.display()))
}

/// Writes the anchor atomically and durably (before any segment is deleted).
pub fn write(dir: &Path, anchor: &Anchor) -> std::io::Result<()> {
    let tmp = dir.join(format!("{ANCHOR_FILE}.tmp"));
    let mut f = fs::File::create(&tmp)?;
    f.write_all(anchor.to_json().to_string().as_bytes())?;
    f.sync_all()?;
    fs::rename(&tmp, dir.join(ANCHOR_FILE))?;
    fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(read(dir.path()), Ok(None));
        let a = Anchor {
            seq: 41,
            hash: [7; 32],
            pruned_from: 1,
            segments: 2,
            retention_days: 30,
            time: "2026-12-01T00:00:00.000Z".into(),
            pruned_until: 1_764_000_000_000_000_000,
            checkpoint: Some((40, [1; 32], vec![1, 2, 3])),
        };
        write(dir.path(), &a).expect("write");
        assert_eq!(read(dir.path()), Ok(Some(a)));
        fs::write(dir.path().join(ANCHOR_FILE), "{}").expect("write");
        assert!(read(dir.path()).is_err());
    }
}
