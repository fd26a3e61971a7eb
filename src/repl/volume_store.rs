//! [`ReplStore`] over the real [`Volume`]: its replication API
//! (src/volume/feed.rs) and the superblock's disk state and generations.

use std::sync::Arc;

use bytes::Bytes;

use super::proto::GenIds;
use super::store::{BoxFut, FeedItem, FeedOp, FeedSource, ReplMeta, ReplStore};
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
}
