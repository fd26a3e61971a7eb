//! [`ReplStore`] over the real [`Volume`]: its replication API
//! (src/volume/feed.rs) and the superblock's disk state and generations.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;

use super::store::{
    BoxFut, FeedItem, FeedOp, FeedSource, LogReadError, LogRecord, LogSource, ReplMeta, ReplStore, blocking_io,
};
use crate::model::{GenIds, Lsn};
use crate::volume::{self, Feed, Volume, VolumeError};

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
            disk: sb.disk_state,
            gen_ids: GenIds { current: sb.gen_current, bitmap: sb.gen_bitmap, history: sb.gen_history },
            gen_created_ms: sb.gen_created_ms,
        }
    }

    fn store_meta(&self, meta: ReplMeta) -> Result<(), VolumeError> {
        blocking_io(|| {
            self.0.update_superblock(|sb| {
                sb.disk_state = meta.disk;
                sb.gen_current = meta.gen_ids.current;
                sb.gen_bitmap = meta.gen_ids.bitmap;
                sb.gen_history = meta.gen_ids.history;
                sb.gen_created_ms = meta.gen_created_ms;
            })
        })
    }

    fn bitmap_granularity(&self) -> u32 {
        self.0.bitmap_granularity()
    }

    fn dirty_bytes(&self) -> u64 {
        self.0.dirty_bytes()
    }

    fn set_tracking(&self, on: bool) {
        self.0.set_tracking(on);
    }

    fn set_peer_written(&self, lsn: Lsn) {
        self.0.set_peer_written(lsn);
    }

    fn mark_unacked(&self) -> Result<(), VolumeError> {
        self.0.mark_unacked()
    }

    fn mark_all(&self) -> Result<(), VolumeError> {
        blocking_io(|| self.0.mark_all())
    }

    fn clear_range(&self, offset: u64, len: u64) {
        self.0.clear_range(offset, len);
    }

    fn dirty_run(&self, from: u64, max_len: u64) -> Option<(u64, u64)> {
        self.0.dirty_runs(from, max_len)
    }

    fn bitmap_words(&self) -> Vec<u64> {
        self.0.bitmap_words()
    }

    fn merge_bitmap_words(&self, first: u64, words: &[u64]) {
        if let Err(e) = self.0.merge_bitmap_words(first, words) {
            // The session checked the range against our bitmap's length.
            tracing::warn!(first, words = words.len(), error = %e, "peer bitmap words ignored");
        }
    }

    fn persist_bitmap(&self) -> Result<(), VolumeError> {
        blocking_io(|| self.0.persist_bitmap())
    }

    fn bitmap_base_lsn(&self) -> Lsn {
        self.0.bitmap_base_lsn()
    }

    fn has_foreign_marks(&self) -> bool {
        self.0.has_foreign_marks()
    }

    fn mark_count(&self) -> u64 {
        self.0.mark_count()
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
        self.0.log_first_lsn()
    }

    fn log_reader(&self, from: Lsn, to: Lsn) -> Result<Box<dyn LogSource>, LogReadError> {
        let reader = self.0.log_reader(from, to).map_err(log_error)?;
        Ok(Box::new(VolumeLog { reader: Some(reader), buffered: VecDeque::new() }))
    }

    fn sync_data_file(&self) -> BoxFut<'_, Result<(), VolumeError>> {
        Box::pin(self.0.sync_data_file())
    }
}

fn log_error(e: VolumeError) -> LogReadError {
    match e {
        VolumeError::NotInLog { lsn, reason } => LogReadError::NotInLog { lsn, why: reason },
        other => LogReadError::Volume(other),
    }
}

/// Records read from the WAL in batches on a blocking thread.
struct VolumeLog {
    /// `None` while a batch is being read (or after an error).
    reader: Option<volume::LogReader>,
    buffered: VecDeque<LogRecord>,
}

/// Records per blocking read (and about this much write payload).
const LOG_BATCH_RECORDS: usize = 256;
const LOG_BATCH_BYTES: usize = 4 << 20;

impl LogSource for VolumeLog {
    fn next(&mut self) -> BoxFut<'_, Result<Option<LogRecord>, LogReadError>> {
        Box::pin(async move {
            if let Some(r) = self.buffered.pop_front() {
                return Ok(Some(r));
            }
            let Some(mut reader) = self.reader.take() else { return Ok(None) };
            let (reader, batch) = tokio::task::spawn_blocking(move || {
                let batch = reader.next_batch(LOG_BATCH_RECORDS, LOG_BATCH_BYTES);
                (reader, batch)
            })
            .await
            .map_err(|e| LogReadError::NotInLog { lsn: 0, why: format!("the WAL reader task failed: {e}") })?;
            let batch = batch.map_err(log_error)?;
            if batch.is_empty() {
                return Ok(None);
            }
            self.reader = Some(reader);
            self.buffered.extend(batch.into_iter().map(|(lsn, op, fua)| LogRecord { lsn, op, fua }));
            Ok(self.buffered.pop_front())
        })
    }
}
