//! The chain head, witnessed outside the spool: deleting the newest segment (or
//! truncating it at a frame boundary) leaves a spool that recovers cleanly, one whose
//! seqs the next records would reuse. The recorder writes the durable head (seq and
//! hash, after an fsync of the spool) to a small file beside the spool directory, at
//! every checkpoint, and compares on open: a spool that ends before the witnessed
//! head, or at the witnessed seq with another hash, lost records, and says so in a
//! signed `loss` record.
//!
//! Limit: someone who can delete segments can usually rewrite this file too, and the
//! records since the last checkpoint are not witnessed. The collector's stored chain
//! (equivocation) is the defence that does not share the sensor's disk.

use std::fs;
use std::io::Write as _;
use std::path::Path;

/// A witnessed head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub seq: u64,
    pub hash: [u8; 32],
}

/// The witness of `spool_dir`: `<spool_dir>.head` beside it (outside the spool, in
/// the same state directory: `/var/lib/conduit-sensor/spool.head`).
pub fn beside(spool_dir: &Path) -> Option<std::path::PathBuf> {
    let name = spool_dir.file_name()?;
    let mut file = name.to_os_string();
    file.push(".head");
    Some(spool_dir.with_file_name(file))
}

/// One line: `seq hex(hash)`.
pub fn read(path: &Path) -> Option<Head> {
    let text = fs::read_to_string(path).ok()?;
    let (seq, hash) = text.trim().split_once(' ')?;
    let hash = hex::decode(hash).ok()?.try_into().ok()?;
    Some(Head {
        seq: seq.parse().ok()?,
        hash,
    })
}

/// Replaces the file atomically (temporary name, fsync, rename).
pub fn write(path: &Path, head: Head) -> std::io::Result<()> {
    let tmp = path.with_extension("head.tmp");
    let mut f = fs::File::create(&tmp)?;
    writeln!(f, "{} {}", head.seq, hex::encode(head.hash))?;
    f.sync_all()?;
    fs::rename(&tmp, path)
}

/// What the spool's recovered head says against the witness: None if consistent.
pub fn compare(witness: Head, spool_seq: u64, spool_hash: &[u8; 32]) -> Option<String> {
    if witness.seq > spool_seq {
        Some(format!(
            "the spool ends at seq {spool_seq}, but the chain had reached seq {} (hash {}) before: records {}..={} were deleted (newest segment removed or cut); the chain continues from seq {spool_seq}, so seqs from {} are used again",
            witness.seq,
            hex::encode(witness.hash),
            spool_seq + 1,
            witness.seq,
            spool_seq + 1
        ))
    } else if witness.seq == spool_seq && &witness.hash != spool_hash {
        Some(format!(
            "the spool's head seq {spool_seq} has hash {}, but the witnessed head had hash {}: the newest records were replaced",
            hex::encode(spool_hash),
            hex::encode(witness.hash)
        ))
    } else {
        None
    }
}
