//! Witness cosignatures, in the spirit of C2SP tlog-cosignature: the collector's
//! signed, timestamped statement that it has verified a sensor's chain up to a
//! checkpoint (seq and hash of the checkpoint record) and that this head extends every
//! head it witnessed before for that sensor. The sensor keeps the cosignatures it
//! receives beside its spool, the collector beside the stored chain; `verify-chain`
//! checks each against the chain, so a chain rewritten after a head was witnessed no
//! longer verifies, even when every record is re-signed with the sensor's own key.
//! Threat model: docs/witness.md; format: docs/spool-format.md.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use conduit_proto::v1;
use ed25519_dalek::{Signer as _, SigningKey};

use super::checkpoint::verify_signature;
use super::line_file;

pub const COSIGNATURE_DOMAIN: &[u8] = b"conduit-collector cosignature v1\0";
/// File of cosignatures in a spool or store chain directory, one per line.
pub const COSIG_FILE: &str = "witness.cosig";
/// First field of every line: the line format's version.
const LINE_VERSION: &str = "v1";

/// One witnessed head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cosignature {
    /// Seq of the checkpoint record witnessed.
    pub seq: u64,
    /// Its record hash: the chain head at that checkpoint.
    pub hash: [u8; 32],
    /// The witness's clock when it cosigned.
    pub time_unix_nano: i64,
    /// The witness's (collector's) ed25519 public key.
    pub witness_key: [u8; 32],
    pub signature: [u8; 64],
}

/// The byte string a cosignature signs:
/// `"conduit-collector cosignature v1\0" || u16 BE len(sensor_id) || sensor_id ||
/// u64 BE seq || hash (32) || witness public key (32) || i64 BE time_unix_nano`.
pub fn statement(
    sensor_id: &str,
    seq: u64,
    hash: &[u8; 32],
    witness_key: &[u8; 32],
    time_unix_nano: i64,
) -> Vec<u8> {
    let id = sensor_id.as_bytes();
    let mut out = Vec::with_capacity(COSIGNATURE_DOMAIN.len() + 2 + id.len() + 8 + 64 + 8);
    out.extend_from_slice(COSIGNATURE_DOMAIN);
    out.extend_from_slice(&u16::try_from(id.len()).unwrap_or(u16::MAX).to_be_bytes());
    out.extend_from_slice(id);
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(hash);
    out.extend_from_slice(witness_key);
    out.extend_from_slice(&time_unix_nano.to_be_bytes());
    out
}

fn array<const N: usize>(b: &[u8], what: &str) -> Result<[u8; N], String> {
    b.try_into()
        .map_err(|_| format!("{what} is {} bytes, not {N}", b.len()))
}

impl Cosignature {
    pub fn sign(
        key: &SigningKey,
        sensor_id: &str,
        seq: u64,
        hash: &[u8; 32],
        time_unix_nano: i64,
    ) -> Cosignature {
        let witness_key = key.verifying_key().to_bytes();
        let msg = statement(sensor_id, seq, hash, &witness_key, time_unix_nano);
        Cosignature {
            seq,
            hash: *hash,
            time_unix_nano,
            witness_key,
            signature: key.sign(&msg).to_bytes(),
        }
    }

    /// Checks the signature against the key the cosignature names. Whether that key
    /// is the witness one trusts is the caller's question.
    pub fn verify(&self, sensor_id: &str) -> Result<(), String> {
        let msg = statement(
            sensor_id,
            self.seq,
            &self.hash,
            &self.witness_key,
            self.time_unix_nano,
        );
        verify_signature(&self.witness_key, &msg, &self.signature)
    }

    /// `v1 <seq> <hash hex> <time_unix_nano> <witness key hex> <signature hex>\n`.
    pub fn to_line(&self) -> String {
        format!(
            "{LINE_VERSION} {} {} {} {} {}\n",
            self.seq,
            hex::encode(self.hash),
            self.time_unix_nano,
            hex::encode(self.witness_key),
            hex::encode(self.signature)
        )
    }

    pub fn parse_line(line: &str) -> Result<Cosignature, String> {
        let fields: Vec<&str> = line.split_ascii_whitespace().collect();
        let [version, seq, hash, time, key, sig] = fields[..] else {
            return Err(format!("expected 6 fields, found {}", fields.len()));
        };
        if version != LINE_VERSION {
            return Err(format!("unknown line version {version:?}"));
        }
        let hex_field =
            |s: &str, what: &str| hex::decode(s).map_err(|e| format!("{what}: not hex ({e})"));
        Ok(Cosignature {
            seq: seq.parse().map_err(|e| format!("seq: {e}"))?,
            hash: array(&hex_field(hash, "hash")?, "hash")?,
            time_unix_nano: time.parse().map_err(|e| format!("time: {e}"))?,
            witness_key: array(&hex_field(key, "witness key")?, "witness key")?,
            signature: array(&hex_field(sig, "signature")?, "signature")?,
        })
    }

    pub fn to_proto(&self) -> v1::Cosignature {
        v1::Cosignature {
            seq: self.seq,
            hash: self.hash.to_vec(),
            time_unix_nano: self.time_unix_nano,
            witness_key: self.witness_key.to_vec(),
            signature: self.signature.to_vec(),
        }
    }

    pub fn from_proto(c: &v1::Cosignature) -> Result<Cosignature, String> {
        Ok(Cosignature {
            seq: c.seq,
            hash: array(&c.hash, "hash")?,
            time_unix_nano: c.time_unix_nano,
            witness_key: array(&c.witness_key, "witness key")?,
            signature: array(&c.signature, "signature")?,
        })
    }
}

/// The cosignatures of a chain directory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Witnessed {
    /// In file order (ascending seq, as written).
    pub cosignatures: Vec<Cosignature>,
    /// A last line without its newline: an append cut by a crash, not counted.
    pub torn_tail: bool,
}

impl Witnessed {
    pub fn last(&self) -> Option<&Cosignature> {
        self.cosignatures.iter().max_by_key(|c| c.seq)
    }
}

/// Reads `dir/witness.cosig` (none: empty). A complete line that does not parse is an
/// error naming the line: the file was changed.
pub fn read(dir: &Path) -> Result<Witnessed, String> {
    let (lines, torn_tail) = line_file::read(dir, COSIG_FILE)?;
    let mut out = Witnessed {
        torn_tail,
        ..Witnessed::default()
    };
    for (i, line) in lines.iter().enumerate() {
        let c = Cosignature::parse_line(line)
            .map_err(|e| format!("{} line {}: {e}", dir.join(COSIG_FILE).display(), i + 1))?;
        out.cosignatures.push(c);
    }
    Ok(out)
}

/// Appends one cosignature durably ([`line_file::append`]).
pub fn append(dir: &Path, c: &Cosignature) -> std::io::Result<()> {
    line_file::append(dir, COSIG_FILE, &c.to_line())
}

/// Keeps only the newest `keep` cosignatures once the file is larger than
/// `above_bytes`, replacing it atomically (temporary file, fsync, rename, directory
/// fsync). The newest witnessed head covers every record before it, so older lines
/// add nothing to what verify-chain can catch; the sensor's file stays bounded (the
/// collector keeps them all). Returns whether it rewrote the file.
pub fn compact(dir: &Path, above_bytes: u64, keep: usize) -> std::io::Result<bool> {
    let path = dir.join(COSIG_FILE);
    if fs::symlink_metadata(&path)?.len() <= above_bytes {
        return Ok(false);
    }
    let w = read(dir).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    if w.cosignatures.len() <= keep {
        return Ok(false);
    }
    let mut text = String::new();
    for c in &w.cosignatures[w.cosignatures.len() - keep..] {
        text.push_str(&c.to_line());
    }
    let tmp = dir.join(format!("{COSIG_FILE}.tmp"));
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    fs::rename(&tmp, &path)?;
    fs::File::open(dir)?.sync_all()?;
    Ok(true)
}

/// Whether a new head may be witnessed after the last one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Consistency {
    /// Newer, and the chain still holds the last witnessed head: cosign it.
    Extends,
    /// The same head again: nothing to cosign.
    AlreadyWitnessed,
    /// The chain contradicts what was witnessed: never cosign.
    Conflict(String),
}

/// Decides whether `new` (seq, hash) extends `last`, the last witnessed head, given
/// the chain's hash at `last.seq` (None: not in the chain's readable part) and the
/// chain's head seq.
pub fn check_extends(
    last: Option<(u64, [u8; 32])>,
    new: (u64, [u8; 32]),
    hash_at_last: Option<[u8; 32]>,
    head_seq: u64,
) -> Consistency {
    let Some((lseq, lhash)) = last else {
        return Consistency::Extends;
    };
    if new == (lseq, lhash) {
        return Consistency::AlreadyWitnessed;
    }
    if new.0 <= lseq {
        return Consistency::Conflict(format!(
            "seq {} is not after the last witnessed head, seq {lseq}",
            new.0
        ));
    }
    match hash_at_last {
        Some(h) if h == lhash => Consistency::Extends,
        Some(h) => Consistency::Conflict(format!(
            "the chain's seq {lseq} has hash {}, but seq {lseq} was witnessed with hash {}",
            hex::encode(h),
            hex::encode(lhash)
        )),
        // Pruned by retention: the store never rewrites what it kept.
        None if lseq <= head_seq => Consistency::Extends,
        None => Consistency::Conflict(format!(
            "the chain ends at seq {head_seq}, but seq {lseq} was witnessed"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[7; 32])
    }

    #[test]
    fn statement_layout() {
        let b = statement("gw", 0x0102, &[9; 32], &[4; 32], -1);
        let mut want = b"conduit-collector cosignature v1\0".to_vec();
        want.extend_from_slice(&[0, 2]);
        want.extend_from_slice(b"gw");
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 1, 2]);
        want.extend_from_slice(&[9; 32]);
        want.extend_from_slice(&[4; 32]);
        want.extend_from_slice(&[0xff; 8]);
        assert_eq!(b, want);
    }

    #[test]
    fn signature_binds_every_field() {
        let c = Cosignature::sign(&key(), "gw", 5, &[1; 32], 1_000);
        assert_eq!(c.verify("gw"), Ok(()));
        assert!(c.verify("gw2").is_err(), "sensor id is bound");
        for changed in [
            Cosignature { seq: 6, ..c },
            Cosignature { hash: [2; 32], ..c },
            Cosignature {
                time_unix_nano: 1_001,
                ..c
            },
            Cosignature {
                witness_key: SigningKey::from_bytes(&[8; 32]).verifying_key().to_bytes(),
                ..c
            },
        ] {
            assert!(changed.verify("gw").is_err(), "{changed:?}");
        }
        // A checkpoint signature over the same head is not a cosignature.
        let cp = super::super::checkpoint::signing_bytes("gw", 5, &[1; 32], 1_000);
        let sig = key().sign(&cp).to_bytes();
        assert!(
            Cosignature {
                signature: sig,
                ..c
            }
            .verify("gw")
            .is_err()
        );
    }

    #[test]
    fn line_and_proto_round_trip() {
        let c = Cosignature::sign(&key(), "gw", 42, &[3; 32], -5);
        assert_eq!(Cosignature::parse_line(&c.to_line()), Ok(c));
        assert_eq!(Cosignature::from_proto(&c.to_proto()), Ok(c));
        assert!(Cosignature::parse_line("v2 1 2 3 4 5").is_err());
        assert!(Cosignature::parse_line("v1 1 zz 3 4 5").is_err());
        let mut p = c.to_proto();
        p.hash.pop();
        assert!(Cosignature::from_proto(&p).is_err());
    }

    #[test]
    fn append_cuts_a_torn_line_and_read_names_a_bad_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(read(dir.path()), Ok(Witnessed::default()));
        let a = Cosignature::sign(&key(), "gw", 2, &[1; 32], 10);
        let b = Cosignature::sign(&key(), "gw", 4, &[2; 32], 20);
        append(dir.path(), &a).expect("append");
        // A crash in the middle of the next append.
        let path = dir.path().join(COSIG_FILE);
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("open");
        f.write_all(&b.to_line().as_bytes()[..20]).expect("torn");
        let torn = read(dir.path()).expect("read");
        assert!(torn.torn_tail);
        assert_eq!(torn.cosignatures, vec![a]);
        append(dir.path(), &b).expect("append");
        let w = read(dir.path()).expect("read");
        assert_eq!(w.cosignatures, vec![a, b]);
        assert!(!w.torn_tail);
        assert_eq!(w.last(), Some(&b));
        fs::write(&path, format!("{}garbage\n", a.to_line())).expect("write");
        let err = read(dir.path()).expect_err("a bad line");
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn compact_keeps_the_newest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let all: Vec<_> = (1..=10)
            .map(|i| Cosignature::sign(&key(), "gw", i * 10, &[i as u8; 32], i as i64))
            .collect();
        for c in &all {
            append(dir.path(), c).expect("append");
        }
        assert!(!compact(dir.path(), 1 << 20, 3).expect("small file"));
        assert!(compact(dir.path(), 100, 3).expect("compact"));
        assert_eq!(
            read(dir.path()).expect("read").cosignatures,
            all[7..].to_vec()
        );
        assert!(!compact(dir.path(), 100, 3).expect("nothing more"));
        // Appends go on after a compaction.
        let next = Cosignature::sign(&key(), "gw", 110, &[11; 32], 11);
        append(dir.path(), &next).expect("append");
        assert_eq!(read(dir.path()).expect("read").last(), Some(&next));
    }

    #[test]
    fn consistency() {
        let h = |b| [b; 32];
        assert_eq!(
            check_extends(None, (5, h(1)), None, 5),
            Consistency::Extends
        );
        assert_eq!(
            check_extends(Some((5, h(1))), (9, h(2)), Some(h(1)), 9),
            Consistency::Extends
        );
        assert_eq!(
            check_extends(Some((5, h(1))), (5, h(1)), Some(h(1)), 9),
            Consistency::AlreadyWitnessed
        );
        // The chain under the witness changed at the witnessed seq.
        assert!(matches!(
            check_extends(Some((5, h(1))), (9, h(2)), Some(h(3)), 9),
            Consistency::Conflict(_)
        ));
        // An older or same-seq head with another hash.
        assert!(matches!(
            check_extends(Some((5, h(1))), (5, h(2)), Some(h(2)), 9),
            Consistency::Conflict(_)
        ));
        assert!(matches!(
            check_extends(Some((5, h(1))), (4, h(2)), Some(h(1)), 9),
            Consistency::Conflict(_)
        ));
        // The witnessed head is past the chain's end: records were lost.
        assert!(matches!(
            check_extends(Some((12, h(1))), (13, h(2)), None, 11),
            Consistency::Conflict(_)
        ));
        // Pruned by retention, but within the chain.
        assert_eq!(
            check_extends(Some((5, h(1))), (9, h(2)), None, 9),
            Consistency::Extends
        );
    }
}
