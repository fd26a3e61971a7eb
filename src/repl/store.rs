//! What the replication engine needs from the local storage: the volume's
//! replication API (`volume::replica`), behind a trait so that the engine can be
//! tested against an in-memory store and so that it does not depend on the
//! volume's internals.
//!
//! Primary side: a *feed* of committed records (in LSN order, after the local
//! commit), barriers (a completed local FLUSH) and full-sync data (read by the
//! log writer itself, so ordered with the writes). Secondary side: records
//! applied with the primary's LSNs, full-sync data, log rebase and sync end.
//!
//! Resync: the persistent dirty bitmap (one bit per `granularity`
//! bytes, "this block may differ from the peer's copy"), tracking on/off
//! with the unacked ring, and a reader over the retained WAL for log
//! catch-up. See docs/resync.md.

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;

use crate::model::{DiskState, GenIds, Lsn};
use crate::volume::VolumeError;

/// A boxed, sendable future (the trait is used as `dyn`).
pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Runs a synchronous store call that waits for the disk (a bitmap persist,
/// a superblock write: an fdatasync each) from a session loop without
/// stalling the runtime worker it runs on: on the multi-threaded runtime
/// the worker's other tasks (the link writer, the heartbeat) move to
/// another thread meanwhile (`block_in_place`). Elsewhere it just runs.
/// Without it, an fsync slower than `ping_interval + ping_timeout` made the
/// peer see silence and drop the link.
pub fn blocking_io<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

pub use crate::volume::{FeedItem, FeedOp};

/// The receiving end of the feed.
pub trait FeedSource: Send {
    /// The next item; `None` once the feed was detached (or the volume
    /// stopped).
    fn recv(&mut self) -> BoxFut<'_, Option<FeedItem>>;
}

/// The persistent replication metadata of the local node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplMeta {
    pub disk: DiskState,
    pub gen_ids: GenIds,
    /// Unix milliseconds when `gen_ids.current` was made (0: unknown).
    pub gen_created_ms: u64,
}

/// A record read back from the retained WAL (log catch-up).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    pub lsn: Lsn,
    pub op: FeedOp,
    pub fua: bool,
}

/// Why a log catch-up cannot be served from the WAL.
#[derive(Debug, thiserror::Error)]
pub enum LogReadError {
    /// A record of the range is not (or no longer, or not with its data) in
    /// the WAL: fall back to a bitmap or full resync.
    #[error("LSN {lsn} cannot be read from the WAL: {why}")]
    NotInLog { lsn: Lsn, why: String },
    #[error(transparent)]
    Volume(#[from] VolumeError),
}

/// Reads retained WAL records in LSN order.
pub trait LogSource: Send {
    /// The next record; `None` after the last one of the range.
    fn next(&mut self) -> BoxFut<'_, Result<Option<LogRecord>, LogReadError>>;
}

/// The local storage, as the replication engine uses it.
pub trait ReplStore: Send + Sync + 'static {
    fn size(&self) -> u64;
    /// Highest LSN applied locally.
    fn local_lsn(&self) -> Lsn;
    /// Why the store stopped taking writes, if it did.
    fn failed(&self) -> Option<String>;

    /// Attaches the (single) feed; returns the highest LSN *not* published
    /// into it (the feed starts at that + 1). The log writer blocks while the
    /// feed holds more than `max_buffered_bytes`.
    fn attach_feed(&self, max_buffered_bytes: usize) -> (Lsn, Box<dyn FeedSource>);
    /// Stops publishing (a blocked writer is released).
    fn detach_feed(&self);
    /// Enqueues a full-sync read of `[offset, offset + len)`; the data
    /// appears in the feed as [`FeedItem::SyncData`].
    fn queue_sync_read(&self, offset: u64, len: u32) -> Result<(), VolumeError>;
    /// WAL retention: keep records `> lsn` (None: no peer constraint).
    fn set_retain_after(&self, lsn: Option<Lsn>);

    /// Secondary: enqueues a record (queued during the call, so the order
    /// of calls is the order of application); resolves once written, or
    /// durable if `fua`.
    fn apply(&self, lsn: Lsn, op: FeedOp, fua: bool) -> BoxFut<'static, Result<(), VolumeError>>;
    /// Secondary: enqueues full-sync data, ordered with [`ReplStore::apply`].
    fn apply_sync_data(&self, offset: u64, data: Bytes) -> BoxFut<'static, Result<(), VolumeError>>;
    /// Secondary: a full sync starts; the next record is `last_lsn + 1`.
    fn rebase_log(&self, last_lsn: Lsn) -> BoxFut<'_, Result<(), VolumeError>>;
    /// Secondary: the full sync is complete (data file synced, checkpoint).
    fn finish_sync(&self) -> BoxFut<'_, Result<(), VolumeError>>;
    /// Makes everything applied durable; returns the durable LSN.
    fn flush(&self) -> BoxFut<'_, Result<Lsn, VolumeError>>;

    /// The persisted disk state and generation ids.
    fn meta(&self) -> ReplMeta;
    /// Persists them (durable before this returns).
    fn store_meta(&self, meta: ReplMeta) -> Result<(), VolumeError>;

    // --- Dirty bitmap and tracking (resync) ----------------------------------

    /// Bytes covered by one bit.
    fn bitmap_granularity(&self) -> u32;
    /// Bytes covered by set bits.
    fn dirty_bytes(&self) -> u64;
    /// Tracking on: every committed write sets its bits. Off: the volume
    /// remembers the records the peer has not acknowledged as written (the
    /// unacked ring) instead.
    fn set_tracking(&self, on: bool);
    /// The peer has written every record `<= lsn`: prunes the ring; the
    /// volume persists it (monotone) at checkpoints.
    fn set_peer_written(&self, lsn: Lsn);
    /// The link dropped: the bits of every record in the ring are set and
    /// tracking is on again. Called before waiting writes are released.
    fn mark_unacked(&self) -> Result<(), VolumeError>;
    /// Sets every bit (full sync, invalidate).
    fn mark_all(&self) -> Result<(), VolumeError>;
    /// Clears the bits fully inside `[offset, offset + len)`.
    fn clear_range(&self, offset: u64, len: u64);
    /// The first run of set bits at or after `from`, as `(offset, len)` in
    /// bytes, `len <= max_len`; `None` when no bit is set past `from`.
    fn dirty_run(&self, from: u64, max_len: u64) -> Option<(u64, u64)>;
    /// The whole bitmap as 64-bit words (bit `i` of word `w` = block `64 w + i`).
    fn bitmap_words(&self) -> Vec<u64>;
    /// ORs `words` into the bitmap starting at word `first`.
    fn merge_bitmap_words(&self, first: u64, words: &[u64]);
    /// Writes the bitmap's changed pages and makes them durable.
    fn persist_bitmap(&self) -> Result<(), VolumeError>;
    /// The bitmap covers every block written by a record with LSN > this.
    fn bitmap_base_lsn(&self) -> Lsn;
    /// The bitmap may hold bits that no record of this node's log explains
    /// (a peer's bitmap merged, a verify difference, a full sync,
    /// invalidate): a log catch-up cannot stand in for a bitmap resync.
    fn has_foreign_marks(&self) -> bool;
    /// Grows whenever a bit is set other than by a tracked record (a ring
    /// spill, a foreign mark).
    fn mark_count(&self) -> u64;
    /// Oldest LSN still in the WAL (`local_lsn + 1` when none).
    fn log_first_lsn(&self) -> Lsn;
    /// Reads the retained records `from ..= to`.
    fn log_reader(&self, from: Lsn, to: Lsn) -> Result<Box<dyn LogSource>, LogReadError>;
    /// Sync target: makes the resync data written so far durable.
    fn sync_data_file(&self) -> BoxFut<'_, Result<(), VolumeError>>;

    // --- Online verify (src/repl/verify.rs) -----------------------------------

    /// Primary: enqueues a verify read of `[offset, offset + len)` in the
    /// log writer's order; the data appears in the feed as
    /// [`FeedItem::VerifyData`] (nothing happens without a feed).
    fn queue_verify_read(&self, offset: u64, len: u32) -> Result<(), VolumeError>;
    /// Reads `[offset, offset + len)` as the data file holds it when the
    /// future first runs (the verify target runs it once every earlier
    /// record is written and before any later one is queued).
    fn read_data(&self, offset: u64, len: u32) -> BoxFut<'static, Result<Bytes, VolumeError>>;
    /// Sets the bits of every block touching `[offset, offset + len)` (verify
    /// found it different from the peer's copy).
    fn mark_range(&self, offset: u64, len: u64);
}
