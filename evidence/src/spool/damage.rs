//! Reading past damage: a spool whose middle lost a segment (deleted) or part of
//! one (truncated, overwritten). [`SpoolReader`] stops at the first break, as a
//! verifier must; the agent's start-up must not: it reads every frame it still can,
//! segment after segment, and learns which seqs are gone and why.

use std::path::Path;

use super::{ReadError, SpoolReader, StoredFrame, segment};

/// Seqs `from..=to` are not in the spool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gap {
    pub from: u64,
    pub to: u64,
    pub why: String,
}

/// Calls `each` with every readable frame of `dir` in seq order, and returns the gaps
/// between them. Damage in the newest segment is the writer's recovery's business
/// (a torn tail); what follows the last readable frame there is not a gap.
pub fn read_past_damage(
    dir: &Path,
    mut each: impl FnMut(&StoredFrame),
) -> Result<Vec<Gap>, ReadError> {
    let segments = segment::list(dir).map_err(|source| ReadError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let Some(&(mut start, _)) = segments.first() else {
        return Ok(Vec::new());
    };
    let mut expected = start;
    let mut gaps = Vec::new();
    loop {
        let mut reader = SpoolReader::new(dir, start);
        let error = loop {
            match reader.next_frame() {
                Ok(Some(f)) => {
                    expected = f.seq + 1;
                    each(&f);
                }
                Ok(None) => return Ok(gaps),
                Err(e) => break e,
            }
        };
        // Go on with the first segment after the damage; `start` grows every time.
        let Some(&(next, _)) = segments
            .iter()
            .find(|(first, _)| *first >= expected && *first > start)
        else {
            return Ok(gaps);
        };
        if next > expected {
            gaps.push(Gap {
                from: expected,
                to: next - 1,
                why: error.to_string(),
            });
        }
        expected = next;
        start = next;
    }
}
