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
//! 3. chooses the segments entirely below the new replay segment (the
//!    last one whose first LSN is `<= A + 1`) to recycle: all of them but
//!    those holding LSNs at or above the minimum retained LSN (records a
//!    peer still needs), and a liftable hold keeps at most `wal_retain`
//!    bytes of them (beyond it the oldest go and the hold is lifted);
//! 4. moves the unacked-ring entries of the records in those segments into
//!    the bitmap ("mark before drop", see tracking.rs) and persists the
//!    dirty bitmap pages (written, then one fdatasync of `meta`);
//! 5. writes the superblock: checkpoint LSN `A`, the replay segment, the
//!    peer's written LSN and the bitmap base;
//! 6. recycles the chosen segments (renamed to spares, at most
//!    `segment::MAX_SPARES` (2) kept, the rest removed), then syncs `wal/`;
//! 7. forgets the replayable ranges of records `<= A` (they are never
//!    replayed again), so later large writes there may go in place.
//!
//! The checkpointer thread runs one when `checkpoint_bytes` of WAL were
//! written since the last, when the writer is blocked on a full WAL, or
//! every `checkpoint_interval` if anything was written. It also keeps one
//! zero-filled spare segment ready so that rollovers are cheap.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::meta::{FLAG_CLEAN_SHUTDOWN, FLAG_FOREIGN_MARKS};
use super::segment::{self, parking};
use super::{FailStop, Shared, VolumeError};
use crate::io::IoOp;

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
            let op = format!("fdatasync of WAL in {} during a checkpoint", s.wal_dir.display());
            return Err(VolumeError::Stopped(s.fail(FailStop::io(op, &e))));
        }
        super::VolumeCounters::add(&s.counters.wal_syncs, 1);
    }
    if let Err(e) = s.io.sync_data(&s.data) {
        let op = format!("fdatasync of data {} during a checkpoint", s.data.path().display());
        return Err(VolumeError::Stopped(s.fail(FailStop::io(op, &e))));
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
    // Mark before drop: the records of the segments to recycle that the
    // peer may lack get their bits, persisted before the superblock.
    let plan = plan_recycle(s, replay_seq);
    let (peer_written, base_lsn) = {
        let mut t = parking::lock(&s.tracker);
        if let Some(last) = plan.last_lsn {
            let n = t.mark_ring_upto(last);
            if n > 0 {
                tracing::info!(
                    records = n,
                    upto_lsn = last,
                    "WAL records the peer has not acknowledged are dropped: marked out of sync"
                );
            }
        }
        (t.peer_written, t.base_lsn)
    };
    super::tracking::persist(s)?;
    // Read after the pages are on disk: a foreign mark made meanwhile must
    // not lose the flag that `persist` may just have written.
    let foreign = parking::lock(&s.tracker).foreign;
    {
        let mut meta = parking::lock(&s.meta);
        let mut sb = meta.current().clone();
        sb.checkpoint_lsn = applied;
        sb.replay_seq = replay_seq;
        sb.peer_written_lsn = peer_written;
        sb.bitmap_base_lsn = base_lsn;
        if foreign {
            sb.flags |= FLAG_FOREIGN_MARKS;
        } else {
            sb.flags &= !FLAG_FOREIGN_MARKS;
        }
        if clean {
            sb.flags |= FLAG_CLEAN_SHUTDOWN;
        } else {
            sb.flags &= !FLAG_CLEAN_SHUTDOWN;
        }
        if let Err(e) = meta.write(&*s.io, sb) {
            return Err(VolumeError::Stopped(s.fail(FailStop::volume("superblock write during a checkpoint", &e))));
        }
    }
    s.checkpoint_lsn.store(applied, Ordering::Release);
    s.ckpt_wal_written.store(written, Ordering::Release);
    // Records up to `applied` are never replayed again.
    parking::lock(&s.replay_ranges).prune(applied);
    tracing::debug!(lsn = applied, replay_seq, peer_written, "checkpoint");
    parking::lock(&s.wal).replay_seq = replay_seq;
    recycle(s, plan.count);
    s.space.notify_all();
    super::VolumeCounters::add(&s.counters.checkpoints, 1);
    Ok(())
}

/// The segments a checkpoint recycles: the first `count` live ones, whose
/// last record is `last_lsn`.
#[derive(Debug, Default)]
struct RecyclePlan {
    count: usize,
    last_lsn: Option<super::Lsn>,
}

/// Chooses the live segments below `replay_seq` to recycle: those holding
/// no retained LSN, and, under a liftable hold (`set_retain_after`), the
/// oldest held ones beyond `wal_retain` bytes (the hold is then lifted:
/// the peer can no longer be caught up from the log). Only the
/// checkpointer (under `ckpt_lock`) removes segments, so the plan stays
/// valid until [`recycle`] runs it.
fn plan_recycle(s: &Shared, replay_seq: u64) -> RecyclePlan {
    let mut min_retained = s.min_retained_lsn.load(Ordering::Acquire);
    let files = parking::lock(&s.wal);
    let retain = s.wal_retain.load(Ordering::Acquire);
    let mut plan = RecyclePlan::default();
    let mut i = 0;
    while i + 1 < files.live.len() && files.live[i].seq < replay_seq {
        let last_lsn = files.live[i + 1].first_lsn.saturating_sub(1);
        if last_lsn >= min_retained {
            let held: u64 = files.live.iter().skip(i).filter(|l| l.seq < replay_seq).map(|l| l.len).sum();
            if held <= retain || !s.retention_liftable.load(Ordering::Acquire) {
                break;
            }
            s.min_retained_lsn.store(u64::MAX, Ordering::Release);
            s.retention_lifted.store(true, Ordering::Release);
            tracing::warn!(
                retained_from_lsn = min_retained,
                retained_bytes = held,
                wal_retain = retain,
                "WAL kept for the peer exceeds wal_retain: its records are marked out of sync and dropped; \
                 the peer can no longer be caught up from the log"
            );
            min_retained = u64::MAX;
        }
        plan.count = i + 1;
        plan.last_lsn = Some(last_lsn);
        i += 1;
    }
    plan
}

/// Retires the first `count` live segments (see [`plan_recycle`]).
/// A failure here loses nothing (the files stay and are retried), so it is
/// logged, not fatal.
fn recycle(s: &Shared, count: usize) {
    let mut files = parking::lock(&s.wal);
    let mut changed = false;
    for _ in 0..count {
        let Some(seg) = files.live.pop_front() else { break };
        let path = seg.file.path().to_path_buf();
        if let Err(e) = segment::retire(&*s.io, &mut files, &path) {
            tracing::warn!(path = %path.display(), error = %e, "could not recycle WAL segment; it is retried at the next open");
            files.live.push_front(seg);
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
        let full = {
            let w = parking::lock(&s.wal);
            let total = s.wal_limit.saturating_add(s.wal_retain.load(Ordering::Acquire));
            w.unchecked_bytes() > s.wal_limit || w.live_bytes() > total
        };
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
