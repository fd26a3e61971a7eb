//! The volume's replication API: the feed for the primary, and
//! LSN-preserving apply, full-sync writes, log rebase and sync finish for
//! the secondary.
//!
//! The secondary's log is a prefix of the primary's with the same LSNs:
//! every replicated record goes through the normal write path (WAL record,
//! data apply, in-place writes, group commit for FUA) with its LSN checked
//! against the writer's next LSN. Full-sync data goes straight to the data
//! file, in the writer's order. The on-disk effects of a rebase and of the
//! end of a sync are described in docs/formats.md ("Replication").

use std::future::Future;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use tokio::sync::oneshot;

use super::feed::{Feed, FeedOp};
use super::writer::{Msg, Op, Request};
use super::{FailStop, Lsn, Volume, VolumeError};

/// Largest full-sync read (`queue_sync_read`) or write (`apply_sync_data`).
pub const MAX_SYNC_CHUNK: u32 = 8 << 20;

fn closed() -> VolumeError {
    VolumeError::Stopped(FailStop::closed("the volume is closed"))
}

impl Volume {
    /// Refuses when the volume failed or is closed.
    pub(crate) fn check_open(&self) -> Result<(), VolumeError> {
        if let Some(r) = self.shared.failure() {
            return Err(VolumeError::Stopped(r));
        }
        if self.closed.load(Ordering::Acquire) {
            return Err(closed());
        }
        Ok(())
    }

    /// Attaches the single replication feed (replacing any previous one).
    /// Returns the highest LSN NOT published into it (the feed starts at
    /// that + 1). While the feed holds more than `max_buffered_bytes` of
    /// payload, the log writer blocks (back-pressure).
    pub fn attach_feed(&self, max_buffered_bytes: usize) -> (Lsn, Feed) {
        self.shared.feed.attach(max_buffered_bytes)
    }

    /// Stops publishing (a blocked writer is released). Dropping the Feed
    /// does the same.
    pub fn detach_feed(&self) {
        self.shared.feed.detach();
    }

    /// Enqueues a full-sync read of `[offset, offset+len)` (`len <= 8 MiB`)
    /// in the log writer's order; the data appears in the feed as
    /// `SyncData`, if the feed attached now is still attached when the
    /// writer gets to it (never in a later feed; without a feed the call
    /// does nothing). Returns once enqueued; a read error stops the volume
    /// (fail-stop).
    pub fn queue_sync_read(&self, offset: u64, len: u32) -> Result<(), VolumeError> {
        self.check_range(offset, u64::from(len))?;
        if len == 0 || len > MAX_SYNC_CHUNK {
            return Err(VolumeError::Invalid {
                what: "full-sync read length".into(),
                reason: format!("{len} bytes; expected 1 to {MAX_SYNC_CHUNK}"),
            });
        }
        self.check_open()?;
        let Some(feed) = self.shared.feed.attached() else { return Ok(()) };
        self.tx.send(Msg::SyncRead { offset, len, feed, verify: false }).map_err(|_| closed())
    }

    /// Enqueues an online-verify read of `[offset, offset+len)` (`len <=
    /// 8 MiB`), exactly like [`Volume::queue_sync_read`] but published as
    /// `FeedItem::VerifyData`.
    pub fn queue_verify_read(&self, offset: u64, len: u32) -> Result<(), VolumeError> {
        self.check_range(offset, u64::from(len))?;
        if len == 0 || len > MAX_SYNC_CHUNK {
            return Err(VolumeError::Invalid {
                what: "verify read length".into(),
                reason: format!("{len} bytes; expected 1 to {MAX_SYNC_CHUNK}"),
            });
        }
        self.check_open()?;
        let Some(feed) = self.shared.feed.attached() else { return Ok(()) };
        self.tx.send(Msg::SyncRead { offset, len, feed, verify: true }).map_err(|_| closed())
    }

    /// Checks a replicated record before it is queued.
    fn check_apply(&self, lsn: Lsn, op: &FeedOp) -> Result<(), VolumeError> {
        let (offset, len) = op.range();
        self.check_range(offset, len)?;
        if lsn == 0 {
            return Err(VolumeError::Invalid {
                what: "replicated record LSN".into(),
                reason: "0; LSNs start at 1".into(),
            });
        }
        if len == 0 {
            return Err(VolumeError::Invalid {
                what: format!("replicated record LSN {lsn}"),
                reason: "empty range; the primary never logs one".into(),
            });
        }
        let max = self.shared.max_record_payload;
        if matches!(op, FeedOp::Write { .. }) && len > max as u64 {
            return Err(VolumeError::Invalid {
                what: format!("replicated record LSN {lsn}"),
                reason: format!(
                    "{len} bytes of data, more than the {max} bytes one WAL record of this volume holds \
                     (its wal_segment_size is smaller than the primary's)"
                ),
            });
        }
        self.check_open()
    }

    /// Enqueues a record received from the primary. `lsn` must be exactly
    /// `local_lsn + 1` when the writer processes it (else
    /// `VolumeError::LsnGap`, nothing applied). The request is queued during
    /// this call (order of calls = order of application); the future
    /// resolves when it is written (WAL + data, not synced), or durable if
    /// `fua`.
    pub fn apply(
        &self,
        lsn: Lsn,
        op: FeedOp,
        fua: bool,
    ) -> impl Future<Output = Result<(), VolumeError>> + Send + 'static {
        let queued = self.check_apply(lsn, &op).and_then(|()| {
            let op = match op {
                FeedOp::Write { offset, data } => Op::Write { offset, data },
                FeedOp::Trim { offset, len } => Op::Trim { offset, len },
                FeedOp::Zeroes { offset, len, punch } => Op::Zeroes { offset, len, punch },
            };
            let (done, rx) = oneshot::channel();
            self.tx.send(Msg::Req(Request { op, fua, lsn: Some(lsn), done })).map_err(|_| closed())?;
            Ok(rx)
        });
        async move {
            match queued?.await {
                Ok(r) => r.map(|_| ()),
                Err(_) => Err(closed()),
            }
        }
    }

    /// Enqueues full-sync data, written straight to the data file (not
    /// logged, not synced until `finish_sync`), ordered with `apply`.
    pub fn apply_sync_data(
        &self,
        offset: u64,
        data: Bytes,
    ) -> impl Future<Output = Result<(), VolumeError>> + Send + 'static {
        let queued = self
            .check_range(offset, data.len() as u64)
            .and_then(|()| {
                if data.is_empty() || data.len() > MAX_SYNC_CHUNK as usize {
                    return Err(VolumeError::Invalid {
                        what: "full-sync data".into(),
                        reason: format!("{} bytes; expected 1 to {MAX_SYNC_CHUNK}", data.len()),
                    });
                }
                self.check_open()
            })
            .and_then(|()| {
                let (done, rx) = oneshot::channel();
                self.tx.send(Msg::SyncWrite { offset, data, done }).map_err(|_| closed())?;
                Ok(rx)
            });
        async move { queued?.await.unwrap_or_else(|_| Err(closed())) }
    }

    /// Full sync starts: the next record expected is `last_lsn + 1`. Starts
    /// a new WAL segment whose first LSN is `last_lsn + 1` and checkpoints,
    /// so recovery never replays older records across the gap. `local_lsn`
    /// reads `last_lsn` afterwards. The old log is recycled: any retention
    /// hold (`set_retain_after`, `set_min_retained_lsn`) ends.
    pub async fn rebase_log(&self, last_lsn: Lsn) -> Result<(), VolumeError> {
        if last_lsn == u64::MAX {
            return Err(VolumeError::Invalid {
                what: "rebase LSN".into(),
                reason: format!("{last_lsn} leaves no next LSN"),
            });
        }
        self.check_open()?;
        let (done, rx) = oneshot::channel();
        self.tx.send(Msg::Rebase { last: last_lsn, done }).map_err(|_| closed())?;
        rx.await.unwrap_or_else(|_| Err(closed()))
    }

    /// Full sync done: syncs the data file and checkpoints at the current
    /// LSN (after everything queued before), so no record older than the
    /// sync data can be replayed over it after a crash.
    pub async fn finish_sync(&self) -> Result<(), VolumeError> {
        self.check_open()?;
        let (done, rx) = oneshot::channel();
        self.tx.send(Msg::Checkpoint { done }).map_err(|_| closed())?;
        rx.await.unwrap_or_else(|_| Err(closed()))
    }

    /// WAL retention: keep records `> lsn` (what the peer has not made
    /// durable) from being recycled; `None` = no peer constraint.
    ///
    /// Bounded by the WAL limit: when the WAL fills up and the hold is what
    /// keeps the checkpointer from recycling, the hold is lifted (local
    /// writes go on; the peer can no longer be caught up from the log) and
    /// [`Volume::retention_lifted`] turns true. Later `Some` calls are then
    /// ignored until `set_retain_after(None)` (the engine detaches and does
    /// a full sync on the next connection).
    pub fn set_retain_after(&self, lsn: Option<Lsn>) {
        let s = &self.shared;
        match lsn {
            None => {
                s.retention_liftable.store(false, Ordering::Release);
                self.set_min_retained_lsn(None);
                s.retention_lifted.store(false, Ordering::Release);
            }
            Some(_) if s.retention_lifted.load(Ordering::Acquire) => {}
            Some(l) => {
                s.retention_liftable.store(true, Ordering::Release);
                self.set_min_retained_lsn(Some(l.saturating_add(1)));
            }
        }
    }

    /// Whether the WAL filled up while keeping records for the peer and the
    /// hold was lifted (see [`Volume::set_retain_after`]).
    pub fn retention_lifted(&self) -> bool {
        self.shared.retention_lifted.load(Ordering::Acquire)
    }

    /// Resync target: makes the resync data written so far durable and
    /// safe from replay. Covers every `apply_sync_data` whose future
    /// resolved before this call: runs a checkpoint (WAL and data file
    /// fdatasynced, then the superblock), so recovery after a crash never
    /// replays a record older than that data over it (only newer records
    /// are replayed). Without a record since the last checkpoint it only
    /// fdatasyncs the data file. The resync target calls it before acknowledging sync
    /// bytes as durable; the source then clears their bits.
    pub async fn sync_data_file(&self) -> Result<(), VolumeError> {
        self.check_open()?;
        let shared = self.shared.clone();
        let task = tokio::task::spawn_blocking(move || {
            let _serial = super::segment::parking::lock(&shared.ckpt_lock);
            // `close` sets `stopping` before its final checkpoint, which must
            // stay the last one (it marks the superblock clean).
            if shared.stopping() {
                return Err(closed());
            }
            // No record since the last checkpoint: nothing can be replayed
            // over the data, an fdatasync of the data file is enough.
            let applied = shared.applied_lsn.load(Ordering::Acquire);
            if applied == shared.checkpoint_lsn.load(Ordering::Acquire) {
                if let Some(r) = shared.failure() {
                    return Err(VolumeError::Stopped(r));
                }
                return shared.io.sync_data(&shared.data).map_err(|e| {
                    let op = format!("fdatasync of data {}", shared.data.path().display());
                    VolumeError::Stopped(shared.fail(FailStop::io(op, &e)))
                });
            }
            super::checkpoint::checkpoint_locked(&shared, false)
        });
        task.await.unwrap_or_else(|e| Err(VolumeError::Stopped(FailStop::internal("data file sync task", e))))
    }
}

#[cfg(test)]
#[path = "replica_tests.rs"]
mod tests;
