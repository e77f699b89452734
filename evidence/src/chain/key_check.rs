//! On start: is this signing key the one the spool's chain is signed with?
//!
//! Every checkpoint and `chain_restart` carries the signer's public key; the last one
//! in the spool names the chain's key. A different key (a swapped or recreated
//! `signing.key`) cannot continue that chain: its records would be signed by a key
//! the chain never named. So the old chain is moved aside, whole and still
//! verifiable (`retired-<unix seconds>/`, with its `signing.pub`), and a new chain
//! starts with a signed `chain_restart` (reason `key_mismatch`) that names both keys
//! and where the old chain went.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use conduit_proto::v1::{self, record::Body};
use prost::Message as _;

use crate::spool::SpoolReader;

/// Names that stay when a chain is retired: the key itself, the writers' lock and
/// the spool's reserve.
const KEEP: [&str; 3] = [super::keys::KEY_FILE, ".lock", ".reserve"];
/// Prefix of the directories retired chains are moved to.
pub const RETIRED_PREFIX: &str = "retired-";

/// The public key of the last checkpoint or chain_restart stored in `dir`, with the
/// seq of the last frame read. A read error ends the scan: what was read counts.
pub fn chain_key(dir: &Path) -> Option<([u8; 32], u64)> {
    let mut reader = SpoolReader::all(dir);
    let mut found = None;
    let mut last_seq = 0;
    while let Ok(Some(frame)) = reader.next_frame() {
        last_seq = frame.seq;
        let Ok(record) = v1::Record::decode(frame.record_bytes.as_slice()) else {
            continue;
        };
        let key = match &record.body {
            Some(Body::Checkpoint(cp)) => &cp.public_key,
            Some(Body::ChainRestart(cr)) => &cr.public_key,
            _ => continue,
        };
        if let Ok(key) = <[u8; 32]>::try_from(key.as_slice()) {
            found = Some(key);
        }
    }
    found.map(|k| (k, last_seq))
}

/// A chain signed by another key, moved aside.
#[derive(Debug, Clone)]
pub struct Retired {
    pub chain_key: [u8; 32],
    pub head_seq: u64,
    pub moved_to: PathBuf,
}

/// If the chain in `dir` is signed by a key other than `key`, moves it (segments,
/// torn tails, `signing.pub`, the uplink's `acked`) into `dir/retired-<time>/`.
pub fn retire_if_foreign(dir: &Path, key: &[u8; 32]) -> std::io::Result<Option<Retired>> {
    let Some((chain_key, head_seq)) = chain_key(dir) else {
        return Ok(None);
    };
    if &chain_key == key {
        return Ok(None);
    }
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut moved_to = dir.join(format!("{RETIRED_PREFIX}{secs}"));
    let mut n = 1;
    while moved_to.exists() {
        moved_to = dir.join(format!("{RETIRED_PREFIX}{secs}-{n}"));
        n += 1;
    }
    fs::create_dir(&moved_to)?;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if KEEP.contains(&name.as_ref()) || entry.file_type()?.is_dir() {
            continue;
        }
        fs::rename(entry.path(), moved_to.join(name.as_ref()))?;
    }
    fs::File::open(dir)?.sync_all()?;
    Ok(Some(Retired {
        chain_key,
        head_seq,
        moved_to,
    }))
}
