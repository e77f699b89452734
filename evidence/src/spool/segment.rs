//! Segment files: `seg-<first seq, 20 digits>.cspool`, a header naming the sensor,
//! then frames. Layout: docs/spool-format.md.

use std::path::{Path, PathBuf};

use super::frame::{self, FrameError, FrameRef};

/// First bytes of every segment file.
pub const MAGIC: [u8; 8] = *b"CSPOOL\r\n";
/// Segment format version written by this code.
pub const VERSION: u16 = 1;
/// Longest sensor id a header may carry.
pub const MAX_SENSOR_ID_LEN: usize = 1024;
const SUFFIX: &str = ".cspool";
const PREFIX: &str = "seg-";

/// `seg-00000000000000000001.cspool` for first seq 1.
pub fn file_name(first_seq: u64) -> String {
    format!("{PREFIX}{first_seq:020}{SUFFIX}")
}

/// The first seq a segment file name announces, or None if it is not a segment name.
pub fn parse_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(PREFIX)?.strip_suffix(SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Segment files in `dir`, sorted by first seq.
pub fn list(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(first) = entry.file_name().to_str().and_then(parse_file_name) {
            out.push((first, entry.path()));
        }
    }
    out.sort_by_key(|(first, _)| *first);
    Ok(out)
}

/// Encodes a segment header: magic, u16 LE version, u16 LE sensor id length,
/// sensor id, u32 LE crc32c of everything before it.
pub fn encode_header(sensor_id: &str) -> Vec<u8> {
    let id = sensor_id.as_bytes();
    let mut out = Vec::with_capacity(16 + id.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&u16::try_from(id.len()).unwrap_or(u16::MAX).to_le_bytes());
    out.extend_from_slice(id);
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("segment header truncated ({0} bytes)")]
    Truncated(usize),
    #[error("not a spool segment (bad magic)")]
    BadMagic,
    #[error("unsupported segment version {0}")]
    BadVersion(u16),
    #[error("segment header sensor id length {0} out of range")]
    BadIdLength(usize),
    #[error("segment header CRC mismatch")]
    BadCrc,
    #[error("segment header sensor id is not UTF-8")]
    BadUtf8,
}

/// Decodes a header; returns the sensor id and the header length.
pub fn decode_header(buf: &[u8]) -> Result<(String, usize), HeaderError> {
    if buf.len() < 12 {
        if !MAGIC.starts_with(&buf[..buf.len().min(8)]) {
            return Err(HeaderError::BadMagic);
        }
        return Err(HeaderError::Truncated(buf.len()));
    }
    if buf[..8] != MAGIC {
        return Err(HeaderError::BadMagic);
    }
    let version = u16::from_le_bytes([buf[8], buf[9]]);
    if version != VERSION {
        return Err(HeaderError::BadVersion(version));
    }
    let id_len = u16::from_le_bytes([buf[10], buf[11]]) as usize;
    if id_len > MAX_SENSOR_ID_LEN {
        return Err(HeaderError::BadIdLength(id_len));
    }
    let total = 12 + id_len + 4;
    if buf.len() < total {
        return Err(HeaderError::Truncated(buf.len()));
    }
    let stored = u32::from_le_bytes([
        buf[total - 4],
        buf[total - 3],
        buf[total - 2],
        buf[total - 1],
    ]);
    if crc32c::crc32c(&buf[..total - 4]) != stored {
        return Err(HeaderError::BadCrc);
    }
    let id = std::str::from_utf8(&buf[12..12 + id_len]).map_err(|_| HeaderError::BadUtf8)?;
    Ok((id.to_owned(), total))
}

/// Result of scanning a whole segment held in memory.
#[derive(Debug)]
pub struct Scan<'a> {
    pub sensor_id: String,
    pub header_len: usize,
    /// Good frames, each with its offset in the file.
    pub frames: Vec<(u64, FrameRef<'a>)>,
    /// File length up to the end of the last good frame.
    pub good_len: u64,
    /// The first bad frame, if the file does not end cleanly: offset and why.
    pub bad: Option<(u64, FrameError)>,
}

/// Scans `buf` (a whole segment file): header, then frames up to the first bad one.
pub fn scan(buf: &[u8]) -> Result<Scan<'_>, HeaderError> {
    let (sensor_id, header_len) = decode_header(buf)?;
    let mut frames = Vec::new();
    let mut off = header_len;
    let mut bad = None;
    while off < buf.len() {
        match frame::decode(&buf[off..]) {
            Ok((f, n)) => {
                frames.push((off as u64, f));
                off += n;
            }
            Err(e) => {
                bad = Some((off as u64, e));
                break;
            }
        }
    }
    Ok(Scan {
        sensor_id,
        header_len,
        frames,
        good_len: off as u64,
        bad,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(file_name(1), "seg-00000000000000000001.cspool");
        assert_eq!(parse_file_name(&file_name(u64::MAX)), Some(u64::MAX));
        assert_eq!(parse_file_name("seg-1.cspool"), None);
        assert_eq!(
            parse_file_name("seg-00000000000000000001.cspool.torn"),
            None
        );
    }

    #[test]
    fn header_round_trip_and_prefixes() {
        let h = encode_header("gw-01");
        assert_eq!(decode_header(&h), Ok(("gw-01".to_owned(), h.len())));
        for cut in 0..h.len() {
            assert_eq!(
                decode_header(&h[..cut]),
                Err(HeaderError::Truncated(cut)),
                "cut {cut}"
            );
        }
        let mut bad = h.clone();
        bad[13] ^= 1;
        assert_eq!(decode_header(&bad), Err(HeaderError::BadCrc));
    }
}
