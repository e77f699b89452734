//! Retention: `--retention DAYS` prunes a chain's oldest whole segments once every
//! record in them is older than the policy and every configured export has passed
//! them. The newest segment is never pruned. Before a segment goes, the chain
//! directory gets its retention anchor ([`conduit_evidence::chain::anchor`]: the
//! last pruned seq and hash, and the sensor's last signed checkpoint among them), so
//! the rest still verifies from there, and the collector records the pruning in its
//! own signed chain (alarm chain, kind `retention`).

use std::path::Path;
use std::time::{Duration, SystemTime};

use conduit_evidence::chain::anchor::{self, Anchor};
use conduit_evidence::chain::checkpoint::unix_nanos;
use conduit_evidence::ecs::rfc3339;
use conduit_proto::v1::RecordKind;

use crate::export::Cursor;
use crate::server::Shared;
use crate::store::{chain_dirs, is_alarm_dir};
use crate::time_index;

/// How often the collector looks for segments to prune.
pub const PRUNE_EVERY: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub days: u64,
    /// The exports whose cursors bound what may go (records not yet exported stay).
    pub exports: Vec<String>,
}

/// What one pruning of one chain removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pruned {
    pub chain: String,
    pub segments: u64,
    pub through_seq: u64,
}

/// Prunes every sensor chain of the store; errors are logged per chain.
pub fn prune_store(shared: &Shared, policy: &Policy, now: SystemTime) -> Vec<Pruned> {
    let store = shared.opts.store.clone();
    let Ok(chains) = chain_dirs(&store) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (chain, dir) in chains.into_iter().filter(|(c, _)| !is_alarm_dir(c)) {
        match prune_chain(shared, &store, &chain, &dir, policy, now) {
            Ok(Some(p)) => out.push(p),
            Ok(None) => {}
            Err(e) => {
                tracing::error!(sensor = %chain, error = %e, "retention: pruning failed; nothing was deleted after the error")
            }
        }
    }
    out
}

fn prune_chain(
    shared: &Shared,
    store: &Path,
    chain: &str,
    dir: &Path,
    policy: &Policy,
    now: SystemTime,
) -> anyhow::Result<Option<Pruned>> {
    let segs = time_index::chain_index(store, chain, dir)?;
    // Nothing past what every export has sent.
    let mut exported = u64::MAX;
    for name in &policy.exports {
        let cursor = Cursor::load(store, name)?;
        exported = exported.min(cursor.seqs.get(chain).copied().unwrap_or(0));
    }
    let cutoff = unix_nanos(now)
        - i64::try_from(Duration::from_secs(policy.days * 86_400).as_nanos()).unwrap_or(i64::MAX);
    let mut prunable = 0;
    let mut newest_time = i64::MIN;
    for i in 0..segs.len().saturating_sub(1) {
        let last_seq = segs[i + 1].first_seq - 1;
        let max_time = segs[i]
            .blocks
            .iter()
            .map(|b| b.max_time)
            .max()
            .unwrap_or(i64::MIN);
        if max_time >= cutoff || last_seq > exported || segs[i].bad_offset.is_some() {
            break;
        }
        prunable = i + 1;
        newest_time = newest_time.max(max_time);
    }
    if prunable == 0 {
        return Ok(None);
    }
    let through = segs[prunable].first_seq - 1;
    // The last pruned frame's hash, and the sensor's last checkpoint among them.
    let mut hash = None;
    let mut checkpoint = None;
    'search: for seg in segs[..prunable].iter().rev() {
        for block in seg.blocks.iter().rev() {
            for f in time_index::read_block(seg, block)?.into_iter().rev() {
                if f.seq == through {
                    hash = Some(f.hash);
                }
                let (kind, _) = time_index::kind_and_time(&f.record_bytes);
                if kind == RecordKind::Checkpoint as i32 && checkpoint.is_none() {
                    checkpoint = Some((f.seq, f.hash, f.record_bytes));
                }
                if hash.is_some() && checkpoint.is_some() {
                    break 'search;
                }
            }
        }
    }
    let hash =
        hash.ok_or_else(|| anyhow::anyhow!("seq {through} is not in the segments to prune"))?;
    let previous = anchor::read(dir).map_err(anyhow::Error::msg)?;
    let new = Anchor {
        seq: through,
        hash,
        pruned_from: previous
            .as_ref()
            .map_or(segs[0].first_seq, |a| a.pruned_from),
        segments: previous.as_ref().map_or(0, |a| a.segments) + prunable as u64,
        retention_days: policy.days,
        time: rfc3339(unix_nanos(now)),
        pruned_until: newest_time.max(previous.as_ref().map_or(i64::MIN, |a| a.pruned_until)),
        checkpoint: checkpoint.or(previous.and_then(|a| a.checkpoint)),
    };
    // The anchor first: a crash after it and before the deletion leaves a chain that
    // still verifies (the anchored frame is then checked by hash).
    anchor::write(dir, &new)?;
    let deleted = shared.with_store(chain, |open| -> anyhow::Result<u64> {
        Ok(match open {
            Some(s) => s.delete_through(through)?,
            None => {
                for seg in &segs[..prunable] {
                    std::fs::remove_file(&seg.path)?;
                }
                prunable as u64
            }
        })
    })?;
    let detail = format!(
        "pruned seq {}..{through} ({deleted} segments, every record older than {} days and exported); anchor hash {}",
        segs[0].first_seq,
        policy.days,
        hex::encode(hash)
    );
    tracing::info!(sensor = chain, "retention: {detail}");
    shared.alarms.note("retention", chain, through, &detail);
    Ok(Some(Pruned {
        chain: chain.to_owned(),
        segments: deleted,
        through_seq: through,
    }))
}
