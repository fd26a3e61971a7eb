//! What the replication engine needs from the local storage: the volume's
//! replication API (repl-design.md), behind a trait so that the engine can be
//! tested against an in-memory store and so that it does not depend on the
//! volume's internals.
//!
//! Primary side: a *feed* of committed records (in LSN order, after the local
//! commit), barriers (a completed local FLUSH) and full-sync data (read by the
//! log writer itself, so ordered with the writes). Secondary side: records
//! applied with the primary's LSNs, full-sync data, log rebase and sync end.

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;

use super::proto::GenIds;
use crate::node::DiskState;
use crate::volume::{Lsn, VolumeError};

/// A boxed, sendable future (the trait is used as `dyn`).
pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

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
}
