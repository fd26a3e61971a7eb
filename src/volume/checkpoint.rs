//! Checkpoints: make the data file durable up to an LSN, record it in the
//! superblock, and recycle the WAL segments below it.
//!
//! A checkpoint at LSN `A` (the highest applied LSN when it starts):
//! 1. fdatasyncs the live WAL segments, so every record `<= A` is durable
//!    in the log (recovery relies on it: a bad record at or below the
//!    checkpoint LSN is corruption, never a torn tail);
//! 2. fdatasyncs the data file (every write `<= A` was applied before `A`
//!    was published), which also makes in-place writes `<= A` durable;
//!    only now is `A` published as the durable LSN;
//! 3. writes the superblock: checkpoint LSN `A`, replay from the last
//!    segment whose first LSN is `<= A + 1`;
//! 4. recycles the segments entirely below that one (renamed to spares, at
//!    most `segment::MAX_SPARES` (2) kept, the rest removed), unless a segment
//!    holds LSNs at or above the minimum retained LSN (the hook a later
//!    issue uses to keep records a peer still needs), then syncs `wal/`;
//! 5. forgets the replayable ranges of records `<= A` (they are never
//!    replayed again), so later large writes there may go in place.
//!
//! The checkpointer thread runs one when `checkpoint_bytes` of WAL were
//! written since the last, when the writer is blocked on a full WAL, or
//! every `checkpoint_interval` if anything was written. It also keeps one
//! zero-filled spare segment ready so that rollovers are cheap.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::meta::FLAG_CLEAN_SHUTDOWN;
use super::segment::{self, parking};
use super::{Shared, VolumeError};
use crate::io::{IoOp, errno_of};

/// Control block of the checkpointer thread.
#[derive(Debug, Default)]
pub(crate) struct CkptCtl {
    pub stop: bool,
    pub requested: bool,
}

/// Runs one checkpoint. With `clean`, sets CLEAN_SHUTDOWN in the same
/// superblock write (used by `close`).
pub(crate) fn checkpoint(s: &Shared, clean: bool) -> Result<(), VolumeError> {
    let _serial = parking::lock(&s.ckpt_lock);
    checkpoint_locked(s, clean)
}

/// [`checkpoint`] for a caller that holds `ckpt_lock`.
pub(crate) fn checkpoint_locked(s: &Shared, clean: bool) -> Result<(), VolumeError> {
    if let Some(r) = s.failure() {
        return Err(VolumeError::Stopped(r));
    }
    let written = s.wal_written.load(Ordering::Acquire);
    let applied = s.applied_lsn.load(Ordering::Acquire);
    let segs: Vec<_> = parking::lock(&s.wal).live.iter().map(|l| (l.seq, l.first_lsn, l.file.clone())).collect();

    // The WAL first, then the data file; only then is `applied` durable
    // (in-place writes are durable once the data file is synced).
    let sync_wal = applied > s.durable_lsn.load(Ordering::Acquire);
    if sync_wal {
        let mut ops: Vec<IoOp<'_>> = segs.iter().map(|(_, _, f)| IoOp::SyncData { file: f }).collect();
        if let Err(e) = s.io.submit(&mut ops) {
            let reason = s.fail(format!(
                "fdatasync of WAL in {} failed during checkpoint: {e} (errno {})",
                s.wal_dir.display(),
                errno_of(&e)
            ));
            return Err(VolumeError::Stopped(reason));
        }
    }
    if let Err(e) = s.io.sync_data(&s.data) {
        let reason = s.fail(format!(
            "fdatasync of data {} failed during checkpoint: {e} (errno {})",
            s.data.path().display(),
            errno_of(&e)
        ));
        return Err(VolumeError::Stopped(reason));
    }
    if sync_wal {
        s.durable_lsn.fetch_max(applied, Ordering::AcqRel);
    }
    let replay_seq = segs
        .iter()
        .rev()
        .find(|(_, first, _)| *first <= applied + 1)
        .or(segs.first())
        .map(|(seq, _, _)| *seq)
        .unwrap_or(1);
    {
        let mut meta = parking::lock(&s.meta);
        let mut sb = meta.current().clone();
        sb.checkpoint_lsn = applied;
        sb.replay_seq = replay_seq;
        if clean {
            sb.flags |= FLAG_CLEAN_SHUTDOWN;
        } else {
            sb.flags &= !FLAG_CLEAN_SHUTDOWN;
        }
        if let Err(e) = meta.write(&*s.io, sb) {
            let reason = s.fail(format!("superblock write failed during checkpoint: {e}"));
            return Err(VolumeError::Stopped(reason));
        }
    }
    s.checkpoint_lsn.store(applied, Ordering::Release);
    s.ckpt_wal_written.store(written, Ordering::Release);
    // Records up to `applied` are never replayed again.
    parking::lock(&s.replay_ranges).prune(applied);
    tracing::debug!(lsn = applied, replay_seq, "checkpoint");
    recycle(s, replay_seq);
    s.space.notify_all();
    Ok(())
}

/// Retires live segments below `replay_seq` that hold no retained LSN.
/// A failure here loses nothing (the files stay and are retried), so it is
/// logged, not fatal.
fn recycle(s: &Shared, replay_seq: u64) {
    let mut min_retained = s.min_retained_lsn.load(Ordering::Acquire);
    let mut files = parking::lock(&s.wal);
    let mut changed = false;
    while files.live.len() > 1 && files.live[0].seq < replay_seq {
        let last_lsn = files.live[1].first_lsn.saturating_sub(1);
        if last_lsn >= min_retained {
            if files.live_bytes() <= s.wal_limit || !s.retention_liftable.load(Ordering::Acquire) {
                break;
            }
            // The peer fell too far behind: keeping its records would stop
            // local writes. Lift the hold (the peer needs a full sync).
            s.min_retained_lsn.store(u64::MAX, Ordering::Release);
            s.retention_lifted.store(true, Ordering::Release);
            tracing::warn!(
                retained_from_lsn = min_retained,
                wal_bytes = files.live_bytes(),
                limit = s.wal_limit,
                "WAL full: no longer keeping the records the peer has not made durable; it needs a full sync"
            );
            min_retained = u64::MAX;
        }
        let Some(seg) = files.live.pop_front() else { break };
        let path = seg.file.path().to_path_buf();
        if let Err(e) = segment::retire(&*s.io, &mut files, &path) {
            tracing::warn!(path = %path.display(), error = %e, "could not recycle WAL segment; it is retried at the next open");
            break;
        }
        tracing::debug!(seq = seg.seq, path = %path.display(), "WAL segment recycled");
        changed = true;
    }
    if changed {
        let dir = files.dir.clone();
        if let Err(e) = s.io.sync_dir(&dir) {
            tracing::warn!(path = %dir.display(), error = %e, "sync of the WAL directory after recycling failed");
        }
    }
}

/// Keeps one zero-filled spare segment ready.
pub(crate) fn ensure_spare(s: &Shared) {
    let dir = {
        let files = parking::lock(&s.wal);
        if !files.spares.is_empty() {
            return;
        }
        files.dir.clone()
    };
    match segment::create_spare(&*s.io, &dir, s.segment_size, true) {
        Ok(p) => parking::lock(&s.wal).spares.push(p),
        Err(e) => tracing::warn!(path = %dir.display(), error = %e, "could not prepare a spare WAL segment"),
    }
}

/// The checkpointer thread body.
pub(crate) fn run(s: Arc<Shared>) {
    ensure_spare(&s);
    let mut last = Instant::now();
    loop {
        {
            let mut ctl = parking::lock(&s.ckpt_ctl);
            let deadline = last + s.checkpoint_interval;
            while !ctl.stop && !ctl.requested {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                ctl = s.ckpt_cv.wait_timeout(ctl, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
            }
            if ctl.stop {
                return;
            }
            ctl.requested = false;
        }
        if s.failure().is_some() {
            last = Instant::now();
            continue;
        }
        let pending = s.wal_written.load(Ordering::Acquire).saturating_sub(s.ckpt_wal_written.load(Ordering::Acquire));
        let full = parking::lock(&s.wal).live_bytes() > s.wal_limit;
        let due = pending >= s.checkpoint_bytes || full || (pending > 0 && last.elapsed() >= s.checkpoint_interval);
        if due {
            // A failure already stopped the volume and was logged.
            let _ = checkpoint(&s, false);
            last = Instant::now();
        } else if last.elapsed() >= s.checkpoint_interval {
            last = Instant::now();
        }
        ensure_spare(&s);
    }
}
