//! An in-memory [`ReplStore`] for the engine's tests: a byte array with an
//! LSN counter, a feed published under the same lock as the writes (so the
//! feed order is the commit order), and configurable apply / flush delays
//! to tell `received`, `written` and `durable` apart.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::proto::GenIds;
use super::store::{BoxFut, FeedItem, FeedOp, FeedSource, ReplMeta, ReplStore};
use crate::node::DiskState;
use crate::volume::{Lsn, VolumeError};

#[derive(Debug)]
struct Inner {
    data: Vec<u8>,
    lsn: Lsn,
    feed: Option<mpsc::UnboundedSender<FeedItem>>,
    meta: ReplMeta,
    flushes: u64,
}

/// See the module doc.
#[derive(Debug)]
pub struct MemStore {
    inner: Mutex<Inner>,
    pub apply_delay: Mutex<Duration>,
    pub flush_delay: Mutex<Duration>,
}

struct MemFeed(mpsc::UnboundedReceiver<FeedItem>);

impl FeedSource for MemFeed {
    fn recv(&mut self) -> BoxFut<'_, Option<FeedItem>> {
        Box::pin(self.0.recv())
    }
}

impl MemStore {
    pub fn new(size: usize, disk: DiskState, current_gen: u64) -> Arc<MemStore> {
        Arc::new(MemStore {
            inner: Mutex::new(Inner {
                data: vec![0; size],
                lsn: 0,
                feed: None,
                meta: ReplMeta { disk, gen_ids: GenIds { current: current_gen, ..GenIds::default() } },
                flushes: 0,
            }),
            apply_delay: Mutex::new(Duration::ZERO),
            flush_delay: Mutex::new(Duration::ZERO),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_apply_delay(&self, d: Duration) {
        *self.apply_delay.lock().unwrap_or_else(|p| p.into_inner()) = d;
    }

    pub fn set_flush_delay(&self, d: Duration) {
        *self.flush_delay.lock().unwrap_or_else(|p| p.into_inner()) = d;
    }

    /// A primary-side write: applied, logged with the next LSN, published.
    pub fn write(&self, offset: usize, data: &[u8], fua: bool) -> Lsn {
        let mut g = self.lock();
        g.data[offset..offset + data.len()].copy_from_slice(data);
        g.lsn += 1;
        let lsn = g.lsn;
        let item = FeedItem::Record {
            lsn,
            op: FeedOp::Write { offset: offset as u64, data: Bytes::copy_from_slice(data) },
            fua,
        };
        if let Some(f) = &g.feed {
            let _ = f.send(item);
        }
        lsn
    }

    /// A primary-side FLUSH: publishes a barrier; returns its LSN.
    pub fn flush_primary(&self) -> Lsn {
        let g = self.lock();
        if let Some(f) = &g.feed {
            let _ = f.send(FeedItem::Barrier { upto: g.lsn });
        }
        g.lsn
    }

    pub fn data(&self) -> Vec<u8> {
        self.lock().data.clone()
    }

    pub fn flushes(&self) -> u64 {
        self.lock().flushes
    }
}

fn apply_op(data: &mut [u8], op: &FeedOp) -> Result<(), VolumeError> {
    let (off, len) = match op {
        FeedOp::Write { offset, data } => (*offset as usize, data.len()),
        FeedOp::Trim { offset, len } | FeedOp::Zeroes { offset, len, .. } => (*offset as usize, *len as usize),
    };
    if off + len > data.len() {
        return Err(VolumeError::OutOfRange { offset: off as u64, len: len as u64, size: data.len() as u64 });
    }
    match op {
        FeedOp::Write { data: d, .. } => data[off..off + len].copy_from_slice(d),
        _ => data[off..off + len].fill(0),
    }
    Ok(())
}

impl ReplStore for MemStore {
    fn size(&self) -> u64 {
        self.lock().data.len() as u64
    }

    fn local_lsn(&self) -> Lsn {
        self.lock().lsn
    }

    fn failed(&self) -> Option<String> {
        None
    }

    fn attach_feed(&self, _max_buffered_bytes: usize) -> (Lsn, Box<dyn FeedSource>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut g = self.lock();
        g.feed = Some(tx);
        (g.lsn, Box::new(MemFeed(rx)))
    }

    fn detach_feed(&self) {
        self.lock().feed = None;
    }

    fn queue_sync_read(&self, offset: u64, len: u32) -> Result<(), VolumeError> {
        let g = self.lock();
        let (o, l) = (offset as usize, len as usize);
        if o + l > g.data.len() {
            return Err(VolumeError::OutOfRange { offset, len: len.into(), size: g.data.len() as u64 });
        }
        if let Some(f) = &g.feed {
            let _ = f.send(FeedItem::SyncData { offset, data: Bytes::copy_from_slice(&g.data[o..o + l]) });
        }
        Ok(())
    }

    fn set_retain_after(&self, _lsn: Option<Lsn>) {}

    fn apply(&self, lsn: Lsn, op: FeedOp, fua: bool) -> BoxFut<'static, Result<(), VolumeError>> {
        let res = {
            let mut g = self.lock();
            if lsn != g.lsn + 1 {
                Err(VolumeError::Invalid { what: "LSN".into(), reason: format!("expected {}, got {lsn}", g.lsn + 1) })
            } else {
                apply_op(&mut g.data, &op).map(|()| g.lsn = lsn)
            }
        };
        let delay = *self.apply_delay.lock().unwrap_or_else(|p| p.into_inner())
            + if fua { *self.flush_delay.lock().unwrap_or_else(|p| p.into_inner()) } else { Duration::ZERO };
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            res
        })
    }

    fn apply_sync_data(&self, offset: u64, data: Bytes) -> BoxFut<'static, Result<(), VolumeError>> {
        let res = apply_op(&mut self.lock().data, &FeedOp::Write { offset, data });
        Box::pin(async move { res })
    }

    fn rebase_log(&self, last_lsn: Lsn) -> BoxFut<'_, Result<(), VolumeError>> {
        self.lock().lsn = last_lsn;
        Box::pin(async { Ok(()) })
    }

    fn finish_sync(&self) -> BoxFut<'_, Result<(), VolumeError>> {
        Box::pin(async { Ok(()) })
    }

    fn flush(&self) -> BoxFut<'_, Result<Lsn, VolumeError>> {
        let delay = *self.flush_delay.lock().unwrap_or_else(|p| p.into_inner());
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            let mut g = self.lock();
            g.flushes += 1;
            Ok(g.lsn)
        })
    }

    fn meta(&self) -> ReplMeta {
        self.lock().meta
    }

    fn store_meta(&self, meta: ReplMeta) -> Result<(), VolumeError> {
        self.lock().meta = meta;
        Ok(())
    }
}
