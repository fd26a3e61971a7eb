//! The bitmap or full resync on the source: the walk over the set bits of
//! the dirty bitmap, in offset order, queued as sync reads in the log
//! writer's order (so a newer application write always follows the sync
//! data of its block in the stream, without a range lock), and the bits of
//! every chunk the target acknowledged as *durable* cleared.
//!
//! Windows, all in bytes of sync data:
//! - *unsent* (read queued or waiting in the writer's queue, not yet on
//!   the socket): the pacing window ([`RESYNC_PACING`], src/repl/resync/pacing.rs);
//! - *in flight* (sent, not yet applied by the target): [`SYNC_FLIGHT`],
//!   one chunk in busy mode;
//! - *not yet durable* on the target: [`SYNC_DURABLE_WINDOW`] (the target
//!   syncs its data file about every 100 ms: the bound keeps the bits a
//!   crash would resend, and the ack delay, from throttling the link);
//! - the operator's rate cap (`resync_rate`), if any.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::pacing::{Pace, Pacing, PacingParams};
use crate::model::ResyncKind;
use crate::repl::store::ReplStore;
use crate::volume::VolumeError;

/// Resync read size (the longest run of set bits read at once).
pub const SYNC_CHUNK: u64 = 256 << 10;
/// The resync's pacing: a window of 2 chunks to 8 MiB, what the link moves
/// in 20 ms; one chunk for 200 ms after an application write waited.
pub const RESYNC_PACING: PacingParams = PacingParams {
    chunk: SYNC_CHUNK,
    busy_chunk: SYNC_CHUNK,
    window_min: 2 * SYNC_CHUNK,
    window_max: 8 << 20,
    ahead: Duration::from_millis(20),
    hold: Duration::from_millis(200),
};
/// Bytes sent but not yet durable on the target.
pub const SYNC_DURABLE_WINDOW: u64 = 64 << 20;
/// Bytes sent but not yet applied by the target, outside busy mode.
pub const SYNC_FLIGHT: u64 = 16 << 20;

/// Why the walk cannot go on (the session ends failed).
#[derive(Debug, thiserror::Error)]
pub enum WalkError {
    #[error("the bitmap returned an empty or backward run ({offset}, {len}) at {cursor}")]
    BadRun { offset: u64, len: u64, cursor: u64 },
    #[error("resync read at {offset}: {source}")]
    Read {
        offset: u64,
        #[source]
        source: VolumeError,
    },
}

/// A bitmap or full resync on the source.
pub struct Walk {
    pub kind: ResyncKind,
    /// Next offset to look for set bits at.
    cursor: u64,
    /// No set bit is left past `cursor`: every read is queued.
    scan_done: bool,
    /// Bytes of sync reads queued.
    pub queued: u64,
    /// Bytes of sync data seen in the feed.
    pub seen: u64,
    /// Bytes the target has durable (cumulative, in queue order).
    pub done: u64,
    /// Bytes the target has written (applied; cumulative, in queue order).
    applied: u64,
    pacing: Pacing,
    /// Queued chunks not yet durable: (cumulative end, offset, len).
    chunks: VecDeque<(u64, u64, u64)>,
    pub started: Instant,
    /// When the bitmap was last persisted.
    pub persisted_at: Instant,
}

impl Walk {
    pub fn new(kind: ResyncKind) -> Walk {
        Walk {
            kind,
            cursor: 0,
            scan_done: false,
            queued: 0,
            seen: 0,
            done: 0,
            applied: 0,
            pacing: Pacing::new(RESYNC_PACING),
            chunks: VecDeque::new(),
            started: Instant::now(),
            persisted_at: Instant::now(),
        }
    }

    /// Every read is queued and its data came out of the feed: the
    /// `SyncEnd` may follow.
    pub fn all_seen(&self) -> bool {
        self.scan_done && self.seen >= self.queued
    }

    /// The target has every queued byte durable.
    pub fn all_done(&self) -> bool {
        self.done >= self.queued
    }

    /// Queues sync reads of the next set runs while the unsent window
    /// (adaptive, one chunk while an application write waits), the durable
    /// window and the rate cap allow. `unsent` is the data waiting in the
    /// writer's queue. Returns when to look again if the rate cap holds the
    /// walk back.
    pub fn queue_reads(
        &mut self,
        store: &dyn ReplStore,
        app_waiting: bool,
        unsent: u64,
        rate: Option<u64>,
    ) -> Result<Option<Instant>, WalkError> {
        let (window, in_flight_limit) = match self.pacing.pace(app_waiting, self.done, self.started) {
            // Application writes keep priority: at most one chunk of resync
            // data is in flight ahead of them (queued, sent, or not yet
            // applied by the target).
            Pace::Busy { chunk } => (chunk, chunk),
            Pace::Free { window, .. } => (window, SYNC_FLIGHT),
        };
        while !self.scan_done
            && (self.queued - self.seen) + unsent < window
            && self.queued - self.applied.max(self.done) < in_flight_limit
            && self.queued - self.done < SYNC_DURABLE_WINDOW
        {
            if let Some(r) = rate {
                // Allowed so far: rate x elapsed, plus one chunk to start.
                let allowed = (r as f64 * self.started.elapsed().as_secs_f64()) as u64 + SYNC_CHUNK;
                if self.queued >= allowed {
                    let at = Duration::from_secs_f64((self.queued - SYNC_CHUNK) as f64 / r as f64);
                    return Ok(Some(self.started + at));
                }
            }
            match store.dirty_run(self.cursor, SYNC_CHUNK) {
                None => self.scan_done = true,
                Some((offset, len)) => {
                    let len = len.min(SYNC_CHUNK);
                    if len == 0 || offset < self.cursor {
                        return Err(WalkError::BadRun { offset, len, cursor: self.cursor });
                    }
                    store.queue_sync_read(offset, len as u32).map_err(|source| WalkError::Read { offset, source })?;
                    self.queued += len;
                    self.chunks.push_back((self.queued, offset, len));
                    self.cursor = offset + len;
                }
            }
        }
        Ok(None)
    }

    /// Whether the walk waits for the writer to send what it has.
    pub fn held_by_unsent(&self) -> bool {
        !self.scan_done && self.queued - self.done < SYNC_DURABLE_WINDOW
    }

    /// The target acknowledged `written` bytes applied and `done` durable:
    /// clear the bits of every chunk wholly inside `done`.
    pub fn acked(&mut self, store: &dyn ReplStore, done: u64, written: u64) {
        self.applied = self.applied.max(written.min(self.queued));
        self.done = self.done.max(done.min(self.queued));
        while let Some(&(end, off, len)) = self.chunks.front() {
            if end > self.done {
                break;
            }
            store.clear_range(off, len);
            self.chunks.pop_front();
        }
    }
}
