//! An in-memory [`ReplStore`] for the engine's tests: a byte array with an
//! LSN counter, a feed published under the same lock as the writes (so the
//! feed order is the commit order), and configurable apply / flush delays
//! to tell `received`, `written` and `durable` apart.
//!
//! Resync: a dirty bitmap (plus the copy "on disk" that `persist_bitmap`
//! writes, for crash tests), tracking and the unacked ring as the volume
//! does them, a retained log of every record (droppable from the front to
//! simulate the retention bound), and a count of `sync_data_file` calls.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::store::{BoxFut, FeedItem, FeedOp, FeedSource, LogReadError, LogRecord, LogSource, ReplMeta, ReplStore};
use crate::model::{DiskState, GenIds, Lsn};
use crate::volume::VolumeError;

/// Bitmap granularity of the in-memory store.
pub const MEM_GRANULARITY: u64 = 4096;

#[derive(Debug)]
struct Inner {
    data: Vec<u8>,
    lsn: Lsn,
    feed: Option<mpsc::UnboundedSender<FeedItem>>,
    meta: ReplMeta,
    flushes: u64,
    bits: Vec<u64>,
    persisted_bits: Vec<u64>,
    tracking: bool,
    /// (lsn, offset, len) of records the peer has not written (tracking off).
    ring: Vec<(Lsn, u64, u64)>,
    peer_written: Lsn,
    base_lsn: Lsn,
    /// Bits no record explains (merged, verify, full sync); see ReplStore.
    foreign: bool,
    /// Bits set other than by a tracked record.
    marks: u64,
    /// Retained records, oldest first.
    log: std::collections::VecDeque<LogRecord>,
    data_syncs: u64,
    /// With `Some`, committed records wait here instead of going into the
    /// feed (the volume's window between the WAL commit, which moves
    /// `local_lsn`, and the publication into the feed).
    unpublished: Option<Vec<FeedItem>>,
}

impl Inner {
    fn set_bits(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset / MEM_GRANULARITY;
        let last = (offset + len - 1) / MEM_GRANULARITY;
        for b in first..=last {
            self.bits[(b / 64) as usize] |= 1 << (b % 64);
        }
    }

    /// A committed local record: tracked or remembered in the ring, logged.
    fn committed(&mut self, lsn: Lsn, op: &FeedOp, fua: bool) {
        let (off, len) = op_range(op);
        if self.tracking {
            self.set_bits(off, len);
        } else {
            self.ring.push((lsn, off, len));
        }
        self.log.push_back(LogRecord { lsn, op: op.clone(), fua });
    }

    fn bit(&self, b: u64) -> bool {
        self.bits[(b / 64) as usize] & (1 << (b % 64)) != 0
    }
}

fn op_range(op: &FeedOp) -> (u64, u64) {
    match op {
        FeedOp::Write { offset, data } => (*offset, data.len() as u64),
        FeedOp::Trim { offset, len } | FeedOp::Zeroes { offset, len, .. } => (*offset, u64::from(*len)),
    }
}

/// See the module doc.
#[derive(Debug)]
pub struct MemStore {
    inner: Mutex<Inner>,
    pub apply_delay: Mutex<Duration>,
    pub flush_delay: Mutex<Duration>,
    /// How long `sync_data_file` takes.
    pub data_sync_delay: Mutex<Duration>,
    /// How long `persist_bitmap` blocks its caller (a slow fsync on the
    /// session's own thread).
    pub persist_delay: Mutex<Duration>,
    persists_delayed: std::sync::atomic::AtomicU64,
}

struct MemFeed(mpsc::UnboundedReceiver<FeedItem>);

impl FeedSource for MemFeed {
    fn recv(&mut self) -> BoxFut<'_, Option<FeedItem>> {
        Box::pin(self.0.recv())
    }
}

impl MemStore {
    pub fn new(size: usize, disk: DiskState, current_gen: u64) -> Arc<MemStore> {
        let words = (size as u64).div_ceil(MEM_GRANULARITY).div_ceil(64) as usize;
        Arc::new(MemStore {
            inner: Mutex::new(Inner {
                data: vec![0; size],
                lsn: 0,
                feed: None,
                meta: ReplMeta {
                    disk,
                    gen_ids: GenIds { current: current_gen, ..GenIds::default() },
                    gen_created_ms: 0,
                },
                flushes: 0,
                bits: vec![0; words],
                persisted_bits: vec![0; words],
                tracking: true,
                ring: Vec::new(),
                peer_written: 0,
                base_lsn: 0,
                foreign: false,
                marks: 0,
                log: std::collections::VecDeque::new(),
                data_syncs: 0,
                unpublished: None,
            }),
            apply_delay: Mutex::new(Duration::ZERO),
            flush_delay: Mutex::new(Duration::ZERO),
            data_sync_delay: Mutex::new(Duration::ZERO),
            persist_delay: Mutex::new(Duration::ZERO),
            persists_delayed: Default::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many `persist_bitmap` calls blocked for `persist_delay`.
    pub fn persists_delayed(&self) -> u64 {
        self.persists_delayed.load(std::sync::atomic::Ordering::Relaxed)
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
        let op = FeedOp::Write { offset: offset as u64, data: Bytes::copy_from_slice(data) };
        g.committed(lsn, &op, fua);
        let item = FeedItem::Record { lsn, op, fua };
        if let Some(held) = &mut g.unpublished {
            held.push(item);
        } else if let Some(f) = &g.feed {
            let _ = f.send(item);
        }
        lsn
    }

    /// From now on, records written are committed (`local_lsn` moves) but
    /// not published into the feed until [`MemStore::publish_held`]: a
    /// feed attached meanwhile starts before them.
    pub fn hold_publication(&self) {
        self.lock().unpublished.get_or_insert_with(Vec::new);
    }

    /// Publishes the held records into the feed attached now, and stops
    /// holding.
    pub fn publish_held(&self) {
        let mut g = self.lock();
        for item in g.unpublished.take().unwrap_or_default() {
            if let Some(f) = &g.feed {
                let _ = f.send(item);
            }
        }
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

    /// Sets the meta (generations, disk) directly.
    pub fn set_meta(&self, meta: ReplMeta) {
        self.lock().meta = meta;
    }

    pub fn set_lsn(&self, lsn: Lsn) {
        self.lock().lsn = lsn;
    }

    /// Whether the bit of the block at `offset` is set (in memory).
    pub fn is_dirty(&self, offset: u64) -> bool {
        self.lock().bit(offset / MEM_GRANULARITY)
    }

    /// The bitmap as last persisted.
    pub fn persisted_dirty_bytes(&self) -> u64 {
        self.lock().persisted_bits.iter().map(|w| u64::from(w.count_ones())).sum::<u64>() * MEM_GRANULARITY
    }

    pub fn mark(&self, offset: u64, len: u64) {
        self.lock().set_bits(offset, len);
    }

    pub fn tracking(&self) -> bool {
        self.lock().tracking
    }

    pub fn peer_written(&self) -> Lsn {
        self.lock().peer_written
    }

    pub fn set_bitmap_base_lsn(&self, lsn: Lsn) {
        self.lock().base_lsn = lsn;
    }

    /// Drops retained records `<= lsn` (the retention bound).
    pub fn drop_log_upto(&self, lsn: Lsn) {
        let mut g = self.lock();
        while g.log.front().is_some_and(|r| r.lsn <= lsn) {
            g.log.pop_front();
        }
    }

    pub fn data_syncs(&self) -> u64 {
        self.lock().data_syncs
    }

    pub fn set_data_sync_delay(&self, d: Duration) {
        *self.data_sync_delay.lock().unwrap_or_else(|p| p.into_inner()) = d;
    }

    /// Removes one retained record (as if it had been written in place:
    /// its data is not in the WAL).
    pub fn forget_log_record(&self, lsn: Lsn) {
        self.lock().log.retain(|r| r.lsn != lsn);
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
        let held = g.unpublished.as_ref().map_or(0, |h| h.len() as Lsn);
        (g.lsn - held, Box::new(MemFeed(rx)))
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
                let r = apply_op(&mut g.data, &op);
                if r.is_ok() {
                    g.lsn = lsn;
                    g.committed(lsn, &op, fua);
                }
                r
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

    fn bitmap_granularity(&self) -> u32 {
        MEM_GRANULARITY as u32
    }

    fn dirty_bytes(&self) -> u64 {
        let g = self.lock();
        let blocks: u64 = g.bits.iter().map(|w| u64::from(w.count_ones())).sum();
        (blocks * MEM_GRANULARITY).min(g.data.len() as u64)
    }

    fn set_tracking(&self, on: bool) {
        let mut g = self.lock();
        if on && !g.tracking {
            g.base_lsn = g.peer_written;
        }
        g.tracking = on;
    }

    fn set_peer_written(&self, lsn: Lsn) {
        let mut g = self.lock();
        g.peer_written = g.peer_written.max(lsn);
        let pw = g.peer_written;
        g.ring.retain(|(l, _, _)| *l > pw);
    }

    fn mark_unacked(&self) -> Result<(), VolumeError> {
        let mut g = self.lock();
        for (_, off, len) in std::mem::take(&mut g.ring) {
            g.set_bits(off, len);
            g.marks += 1;
        }
        if !g.tracking {
            g.base_lsn = g.peer_written;
        }
        g.tracking = true;
        g.persisted_bits = g.bits.clone();
        Ok(())
    }

    fn mark_all(&self) -> Result<(), VolumeError> {
        let mut g = self.lock();
        let size = g.data.len() as u64;
        g.set_bits(0, size);
        g.foreign = true;
        g.marks += 1;
        g.persisted_bits = g.bits.clone();
        Ok(())
    }

    fn clear_range(&self, offset: u64, len: u64) {
        let mut g = self.lock();
        let size = g.data.len() as u64;
        let first = offset.div_ceil(MEM_GRANULARITY);
        // A partial last block is cleared when the range reaches the end.
        let end = if offset + len >= size { size.div_ceil(MEM_GRANULARITY) } else { (offset + len) / MEM_GRANULARITY };
        for b in first..end {
            g.bits[(b / 64) as usize] &= !(1 << (b % 64));
        }
        if g.bits.iter().all(|w| *w == 0) {
            g.foreign = false;
        }
    }

    fn dirty_run(&self, from: u64, max_len: u64) -> Option<(u64, u64)> {
        let g = self.lock();
        let size = g.data.len() as u64;
        let blocks = size.div_ceil(MEM_GRANULARITY);
        let mut b = from / MEM_GRANULARITY;
        while b < blocks && !g.bit(b) {
            b += 1;
        }
        if b >= blocks {
            return None;
        }
        let start = b * MEM_GRANULARITY;
        let mut end = b;
        while end < blocks && g.bit(end) && (end + 1 - b) * MEM_GRANULARITY <= max_len {
            end += 1;
        }
        Some((start, (end * MEM_GRANULARITY).min(size) - start))
    }

    fn bitmap_words(&self) -> Vec<u64> {
        self.lock().bits.clone()
    }

    fn merge_bitmap_words(&self, first: u64, words: &[u64]) {
        let mut g = self.lock();
        for (i, w) in words.iter().enumerate() {
            if let Some(slot) = g.bits.get_mut(first as usize + i) {
                *slot |= w;
            }
        }
        if words.iter().any(|w| *w != 0) {
            g.foreign = true;
            g.marks += 1;
        }
    }

    fn persist_bitmap(&self) -> Result<(), VolumeError> {
        let d = *self.persist_delay.lock().unwrap_or_else(|p| p.into_inner());
        if !d.is_zero() {
            super::store::blocking_io(|| std::thread::sleep(d));
            self.persists_delayed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let mut g = self.lock();
        g.persisted_bits = g.bits.clone();
        Ok(())
    }

    fn bitmap_base_lsn(&self) -> Lsn {
        self.lock().base_lsn
    }

    fn has_foreign_marks(&self) -> bool {
        self.lock().foreign
    }

    fn mark_count(&self) -> u64 {
        self.lock().marks
    }

    fn log_first_lsn(&self) -> Lsn {
        let g = self.lock();
        g.log.front().map_or(g.lsn + 1, |r| r.lsn)
    }

    fn log_reader(&self, from: Lsn, to: Lsn) -> Result<Box<dyn LogSource>, LogReadError> {
        let g = self.lock();
        let first = g.log.front().map_or(g.lsn + 1, |r| r.lsn);
        if from < first {
            return Err(LogReadError::NotInLog { lsn: from, why: format!("the WAL starts at {first}") });
        }
        let records: Vec<LogRecord> = g.log.iter().filter(|r| r.lsn >= from && r.lsn <= to).cloned().collect();
        Ok(Box::new(MemLog(records.into_iter())))
    }

    fn sync_data_file(&self) -> BoxFut<'_, Result<(), VolumeError>> {
        let delay = *self.data_sync_delay.lock().unwrap_or_else(|p| p.into_inner());
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            let mut g = self.lock();
            g.data_syncs += 1;
            Ok(())
        })
    }

    // --- Online verify (src/repl/verify.rs) ---------------------------------

    fn queue_verify_read(&self, offset: u64, len: u32) -> Result<(), VolumeError> {
        let g = self.lock();
        let (o, l) = (offset as usize, len as usize);
        if o + l > g.data.len() {
            return Err(VolumeError::OutOfRange { offset, len: len.into(), size: g.data.len() as u64 });
        }
        if let Some(f) = &g.feed {
            let _ = f.send(FeedItem::VerifyData { offset, data: Bytes::copy_from_slice(&g.data[o..o + l]) });
        }
        Ok(())
    }

    fn read_data(&self, offset: u64, len: u32) -> BoxFut<'static, Result<Bytes, VolumeError>> {
        let g = self.lock();
        let (o, l) = (offset as usize, len as usize);
        let r = if o + l > g.data.len() {
            Err(VolumeError::OutOfRange { offset, len: len.into(), size: g.data.len() as u64 })
        } else {
            Ok(Bytes::copy_from_slice(&g.data[o..o + l]))
        };
        Box::pin(async move { r })
    }

    fn mark_range(&self, offset: u64, len: u64) {
        let mut g = self.lock();
        g.set_bits(offset, len);
        g.foreign = true;
        g.marks += 1;
    }
}

impl MemStore {
    /// Changes bytes behind the engine's back (no LSN, no feed, no bit): a
    /// corruption for online verify to find.
    pub fn corrupt(&self, offset: usize, bytes: &[u8]) {
        self.lock().data[offset..offset + bytes.len()].copy_from_slice(bytes);
    }
}

struct MemLog(std::vec::IntoIter<LogRecord>);

impl LogSource for MemLog {
    fn next(&mut self) -> BoxFut<'_, Result<Option<LogRecord>, LogReadError>> {
        let r = self.0.next();
        Box::pin(async move { Ok(r) })
    }
}

// --- Helpers shared by the engine tests -------------------------------------

/// Polls `f` every 5 ms until it holds; panics after `timeout`, naming `what`.
pub async fn until(what: &str, timeout: std::time::Duration, f: impl Fn() -> bool) {
    let start = std::time::Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// Connected, established, with an uptodate peer.
pub fn established(e: &super::engine::Engine) -> bool {
    let v = e.view();
    v.connection == crate::model::ConnState::Connected
        && v.replication == Some(crate::model::ReplState::Established)
        && v.peer_disk == DiskState::UpToDate
}

/// A recognisable block of `len` bytes for `seed`.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}
