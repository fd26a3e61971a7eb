//! [`ReplStore`] over the real [`Volume`]: its replication API
//! (src/volume/feed.rs) and the superblock's disk state and generations.

use std::sync::Arc;

use bytes::Bytes;

use super::proto::GenIds;
use super::store::{BoxFut, FeedItem, FeedOp, FeedSource, LogReadError, LogSource, ReplMeta, ReplStore};
use crate::node::DiskState;
use crate::volume::{self, Feed, Lsn, Volume, VolumeError};

/// The volume, as the replication engine sees it.
#[derive(Debug, Clone)]
pub struct VolumeStore(pub Arc<Volume>);

struct VolumeFeed(Feed);

impl FeedSource for VolumeFeed {
    fn recv(&mut self) -> BoxFut<'_, Option<FeedItem>> {
        Box::pin(self.0.recv())
    }
}

impl ReplStore for VolumeStore {
    fn size(&self) -> u64 {
        self.0.size()
    }

    fn local_lsn(&self) -> Lsn {
        self.0.status().local_lsn
    }

    fn failed(&self) -> Option<String> {
        self.0.status().failed
    }

    fn attach_feed(&self, max_buffered_bytes: usize) -> (Lsn, Box<dyn FeedSource>) {
        let (lsn, feed) = self.0.attach_feed(max_buffered_bytes);
        (lsn, Box::new(VolumeFeed(feed)))
    }

    fn detach_feed(&self) {
        self.0.detach_feed();
    }

    fn queue_sync_read(&self, offset: u64, len: u32) -> Result<(), VolumeError> {
        self.0.queue_sync_read(offset, len)
    }

    fn set_retain_after(&self, lsn: Option<Lsn>) {
        self.0.set_retain_after(lsn);
    }

    fn apply(&self, lsn: Lsn, op: FeedOp, fua: bool) -> BoxFut<'static, Result<(), VolumeError>> {
        Box::pin(self.0.apply(lsn, op, fua))
    }

    fn apply_sync_data(&self, offset: u64, data: Bytes) -> BoxFut<'static, Result<(), VolumeError>> {
        Box::pin(self.0.apply_sync_data(offset, data))
    }

    fn rebase_log(&self, last_lsn: Lsn) -> BoxFut<'_, Result<(), VolumeError>> {
        Box::pin(self.0.rebase_log(last_lsn))
    }

    fn finish_sync(&self) -> BoxFut<'_, Result<(), VolumeError>> {
        Box::pin(self.0.finish_sync())
    }

    fn flush(&self) -> BoxFut<'_, Result<Lsn, VolumeError>> {
        Box::pin(self.0.flush())
    }

    fn meta(&self) -> ReplMeta {
        let sb = self.0.superblock();
        ReplMeta {
            disk: DiskState::from(sb.disk_state),
            gen_ids: GenIds { current: sb.gen_current, bitmap: sb.gen_bitmap, history: sb.gen_history },
            gen_created_ms: 0,
        }
    }

    fn store_meta(&self, meta: ReplMeta) -> Result<(), VolumeError> {
        self.0.update_superblock(|sb| {
            sb.disk_state = volume::DiskState::from(meta.disk);
            sb.gen_current = meta.gen_ids.current;
            sb.gen_bitmap = meta.gen_ids.bitmap;
            sb.gen_history = meta.gen_ids.history;
        })
    }

    // INTERIM until the volume's bitmap (branch `bitmap`) is merged: the
    // volume has no dirty bitmap yet, so every block counts as dirty and
    // every resync is a full one (the issue-3 behaviour).

    fn bitmap_granularity(&self) -> u32 {
        crate::config::DEFAULT_BITMAP_GRANULARITY
    }

    fn dirty_bytes(&self) -> u64 {
        self.0.size()
    }

    fn set_tracking(&self, _on: bool) {}

    fn set_peer_written(&self, _lsn: Lsn) {}

    fn mark_unacked(&self) -> Result<(), VolumeError> {
        Ok(())
    }

    fn mark_all(&self) -> Result<(), VolumeError> {
        Ok(())
    }

    fn clear_range(&self, _offset: u64, _len: u64) {}

    fn dirty_run(&self, from: u64, max_len: u64) -> Option<(u64, u64)> {
        (from < self.0.size()).then(|| (from, max_len.min(self.0.size() - from)))
    }

    fn bitmap_words(&self) -> Vec<u64> {
        Vec::new()
    }

    fn merge_bitmap_words(&self, _first: u64, _words: &[u64]) {}

    fn persist_bitmap(&self) -> Result<(), VolumeError> {
        Ok(())
    }

    fn bitmap_base_lsn(&self) -> Lsn {
        0
    }

    // --- Online verify ---------------------------------------------------------

    fn queue_verify_read(&self, offset: u64, len: u32) -> Result<(), VolumeError> {
        self.0.queue_verify_read(offset, len)
    }

    fn read_data(&self, offset: u64, len: u32) -> BoxFut<'static, Result<Bytes, VolumeError>> {
        let v = std::sync::Arc::clone(&self.0);
        Box::pin(async move { v.read(offset, len).await })
    }

    fn mark_range(&self, offset: u64, len: u64) {
        self.0.mark_range(offset, len);
    }

    fn log_first_lsn(&self) -> Lsn {
        self.0.status().local_lsn + 1
    }

    fn log_reader(&self, from: Lsn, _to: Lsn) -> Result<Box<dyn LogSource>, LogReadError> {
        Err(LogReadError::NotInLog { lsn: from, why: "this volume keeps no WAL for catch-up".into() })
    }

    fn sync_data_file(&self) -> BoxFut<'_, Result<(), VolumeError>> {
        Box::pin(async { Ok(()) })
    }
}
