//! The replication feed: what the log writer publishes for the peer.
//!
//! One bounded queue between the log writer thread (producer) and an async
//! consumer (the replication engine's sender task):
//!
//! ```text
//!   log writer thread                          engine task
//!   commit batch (WAL written + applied)
//!     -> publish Record.. [Barrier]   ──────►  Feed::recv / try_recv
//!     -> complete the batch's requests          (pops, frees payload bytes,
//!   before the next batch / sync read:           wakes the writer)
//!     wait while buffered > max_buffered_bytes
//!     (released by consumption, detach, close, failure)
//! ```
//!
//! Items are published in commit order, after the local commit of their
//! batch and before its requests complete, so a reply gated on a peer
//! acknowledgement never waits for an LSN that was not queued yet.
//!
//! - `Record`: one WAL record per item, with the record's own LSN. A write
//!   larger than the volume's largest record payload becomes several
//!   records (consecutive LSNs); `fua` is set on the last one only (the
//!   peer's durable acknowledgement is cumulative).
//! - `Barrier { upto }`: a FLUSH completed locally (after its fdatasync);
//!   `upto` is the LSN the flush returned.
//! - `SyncData`: a full-sync read done by the log writer between batches:
//!   every record committed before the read precedes it, every later one
//!   follows.
//! - `VerifyData`: the same for an online-verify read (`queue_verify_read`).
//!
//! Back-pressure: the bound counts payload bytes (write data, sync data).
//! The writer checks it before each batch and each sync read, so the feed
//! may exceed the bound by at most one batch (16 MiB) or one sync read
//! (8 MiB); while it is over the bound the writer does not take new
//! requests, and writes slow to the consumer's pace.
//!
//! Attaching replaces the previous feed (its receiver sees the end). The
//! LSN returned by attach is read under the same lock the writer publishes
//! under, so the new feed holds exactly the records above it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;

use super::Lsn;
use super::segment::parking;

/// What the log writer publishes for the peer, in commit order, after local
/// commit (WAL written + applied).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedItem {
    Record {
        lsn: Lsn,
        op: FeedOp,
        fua: bool,
    },
    /// A FLUSH completed locally: everything <= upto must become durable on
    /// the peer.
    Barrier {
        upto: Lsn,
    },
    /// A full-sync block, read from the data file by the log writer itself,
    /// so it is ordered with the writes.
    SyncData {
        offset: u64,
        data: Bytes,
    },
    /// An online-verify read, done by the log writer like `SyncData` (so
    /// it describes the data at its place in the stream).
    VerifyData {
        offset: u64,
        data: Bytes,
    },
}

impl FeedItem {
    /// Payload bytes the item holds (what the bound counts).
    pub fn payload_len(&self) -> usize {
        match self {
            FeedItem::Record { op: FeedOp::Write { data, .. }, .. }
            | FeedItem::SyncData { data, .. }
            | FeedItem::VerifyData { data, .. } => data.len(),
            _ => 0,
        }
    }
}

/// The operation of one replicated record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedOp {
    Write { offset: u64, data: Bytes },
    Trim { offset: u64, len: u32 },
    Zeroes { offset: u64, len: u32, punch: bool },
}

impl FeedOp {
    /// `(offset, length)` of the range the operation touches.
    pub fn range(&self) -> (u64, u64) {
        match self {
            FeedOp::Write { offset, data } => (*offset, data.len() as u64),
            FeedOp::Trim { offset, len } | FeedOp::Zeroes { offset, len, .. } => (*offset, u64::from(*len)),
        }
    }
}

#[derive(Debug, Default)]
struct Queue {
    items: VecDeque<FeedItem>,
    bytes: usize,
}

/// The channel shared by one `Feed` and the writer.
#[derive(Debug)]
pub(crate) struct FeedChannel {
    queue: Mutex<Queue>,
    max_bytes: usize,
    closed: AtomicBool,
    /// The consumer waits on it (a permit is stored when nobody waits).
    ready: Notify,
    /// The writer waits on it (with `queue`) while over the bound.
    space: Condvar,
}

impl FeedChannel {
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let mut q = parking::lock(&self.queue);
        q.items.clear();
        q.bytes = 0;
        drop(q);
        self.space.notify_all();
        self.ready.notify_one();
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

/// The writer's side: the attached feed (if any) and the highest LSN the
/// writer has published (or would have, had a feed been attached).
#[derive(Debug)]
pub(crate) struct FeedSlot {
    channel: Option<Arc<FeedChannel>>,
    published_lsn: Lsn,
    /// Incremented at each attach: work queued for one feed (a sync read)
    /// never lands in a later one.
    generation: u64,
}

#[derive(Debug)]
pub(crate) struct FeedHub {
    slot: Mutex<FeedSlot>,
}

impl FeedHub {
    pub fn new(last_lsn: Lsn) -> FeedHub {
        FeedHub { slot: Mutex::new(FeedSlot { channel: None, published_lsn: last_lsn, generation: 0 }) }
    }

    /// Attaches a new feed, closing the previous one. Returns the highest
    /// LSN not published into it.
    pub fn attach(&self, max_buffered_bytes: usize) -> (Lsn, Feed) {
        let ch = Arc::new(FeedChannel {
            queue: Mutex::new(Queue::default()),
            max_bytes: max_buffered_bytes,
            closed: AtomicBool::new(false),
            ready: Notify::new(),
            space: Condvar::new(),
        });
        let mut slot = parking::lock(&self.slot);
        if let Some(old) = slot.channel.replace(ch.clone()) {
            old.close();
        }
        let from = slot.published_lsn;
        slot.generation += 1;
        drop(slot);
        tracing::info!(after_lsn = from, max_buffered_bytes, "replication feed attached");
        (from, Feed { ch })
    }

    pub fn detach(&self) {
        if let Some(old) = parking::lock(&self.slot).channel.take() {
            old.close();
            tracing::info!("replication feed detached");
        }
    }

    /// The generation of the attached feed (`None` when none is attached
    /// or its receiver is gone).
    pub fn attached(&self) -> Option<u64> {
        let slot = parking::lock(&self.slot);
        slot.channel.as_ref().filter(|c| !c.is_closed()).map(|_| slot.generation)
    }

    /// Publishes `items` (drained) and records `last_lsn` as published.
    /// With `only_for`, the items go only into the feed of that generation.
    /// Called by the writer only, in commit order.
    pub fn publish(&self, items: &mut Vec<FeedItem>, last_lsn: Lsn, only_for: Option<u64>) {
        let mut slot = parking::lock(&self.slot);
        slot.published_lsn = last_lsn;
        if slot.channel.as_ref().is_some_and(|c| c.is_closed()) {
            slot.channel = None;
        }
        let wrong_feed = only_for.is_some_and(|g| g != slot.generation);
        let Some(ch) = slot.channel.as_ref().filter(|_| !wrong_feed) else {
            items.clear();
            return;
        };
        if items.is_empty() {
            return;
        }
        let mut q = parking::lock(&ch.queue);
        for item in items.drain(..) {
            q.bytes += item.payload_len();
            q.items.push_back(item);
        }
        drop(q);
        ch.ready.notify_one();
    }

    /// Sets the published LSN without publishing (log rebase).
    pub fn reset_lsn(&self, last_lsn: Lsn) {
        parking::lock(&self.slot).published_lsn = last_lsn;
    }

    /// Back-pressure: blocks while the attached feed holds more than its
    /// bound, until it is drained below it, closed, or `give_up` says so
    /// (checked every 50 ms: the volume stops or fails).
    pub fn wait_for_room(&self, give_up: impl Fn() -> bool) {
        let Some(ch) = parking::lock(&self.slot).channel.clone() else { return };
        let mut q = parking::lock(&ch.queue);
        let mut warned = false;
        while q.bytes > ch.max_bytes && !ch.is_closed() && !give_up() {
            if !warned {
                tracing::debug!(
                    buffered = q.bytes,
                    bound = ch.max_bytes,
                    "replication feed full, writes wait for the peer"
                );
                warned = true;
            }
            q = ch.space.wait_timeout(q, Duration::from_millis(50)).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

/// The receiving end of the replication feed. Dropping it detaches it.
#[derive(Debug)]
pub struct Feed {
    ch: Arc<FeedChannel>,
}

impl Feed {
    /// The next item; `None` once the feed is detached (or replaced, or the
    /// volume closed): buffered items are discarded then. Cancel-safe (an
    /// item is taken only when the future completes), so it may be used in
    /// `select!`.
    pub async fn recv(&mut self) -> Option<FeedItem> {
        loop {
            if self.ch.is_closed() {
                return None;
            }
            if let Some(item) = self.pop() {
                return Some(item);
            }
            self.ch.ready.notified().await;
        }
    }

    /// The next item if one is buffered.
    pub fn try_recv(&mut self) -> Option<FeedItem> {
        if self.ch.is_closed() {
            return None;
        }
        self.pop()
    }

    /// Payload bytes buffered.
    pub fn buffered_bytes(&self) -> usize {
        parking::lock(&self.ch.queue).bytes
    }

    /// Whether the volume ended this feed (detached or replaced).
    pub fn is_closed(&self) -> bool {
        self.ch.is_closed()
    }

    fn pop(&self) -> Option<FeedItem> {
        let mut q = parking::lock(&self.ch.queue);
        let item = q.items.pop_front()?;
        let was_over = q.bytes > self.ch.max_bytes;
        q.bytes -= item.payload_len();
        let now_under = q.bytes <= self.ch.max_bytes;
        drop(q);
        if was_over && now_under {
            self.ch.space.notify_all();
        }
        Some(item)
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        self.ch.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(lsn: Lsn, n: usize) -> FeedItem {
        FeedItem::Record { lsn, op: FeedOp::Write { offset: 0, data: Bytes::from(vec![7u8; n]) }, fua: false }
    }

    #[tokio::test]
    async fn publish_attach_replace_and_drop() {
        let hub = FeedHub::new(5);
        // Nothing attached: items are dropped, the LSN advances.
        hub.publish(&mut vec![rec(6, 10)], 6, None);
        let (from, mut feed) = hub.attach(1 << 20);
        assert_eq!(from, 6);
        hub.publish(&mut vec![rec(7, 10), FeedItem::Barrier { upto: 7 }], 7, None);
        assert_eq!(feed.buffered_bytes(), 10);
        assert_eq!(feed.recv().await, Some(rec(7, 10)));
        assert_eq!(feed.try_recv(), Some(FeedItem::Barrier { upto: 7 }));
        assert_eq!(feed.try_recv(), None);
        assert_eq!(feed.buffered_bytes(), 0);

        hub.publish(&mut vec![rec(8, 1)], 8, None);
        let (from2, mut feed2) = hub.attach(1 << 20);
        assert_eq!(from2, 8);
        assert!(feed.is_closed());
        assert_eq!(feed.recv().await, None, "a replaced feed ends, its buffer discarded");
        drop(feed2.try_recv());
        drop(feed2);
        assert_eq!(hub.attached(), None, "dropping the receiver detaches it");
        let mut items = vec![rec(9, 1)];
        hub.publish(&mut items, 9, None);
        assert!(items.is_empty());
    }

    #[tokio::test]
    async fn recv_wakes_on_publish_and_on_detach() {
        let hub = Arc::new(FeedHub::new(0));
        let (_, mut feed) = hub.attach(1 << 20);
        let h2 = hub.clone();
        let t = tokio::spawn(async move {
            let first = feed.recv().await;
            let second = feed.recv().await;
            (first, second)
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        h2.publish(&mut vec![rec(1, 3)], 1, None);
        tokio::time::sleep(Duration::from_millis(20)).await;
        h2.detach();
        let (a, b) = tokio::time::timeout(Duration::from_secs(5), t).await.expect("recv woke").expect("task");
        assert_eq!(a, Some(rec(1, 3)));
        assert_eq!(b, None);
    }

    #[test]
    fn writer_waits_over_the_bound_until_drained_or_detached() {
        let hub = Arc::new(FeedHub::new(0));
        let (_, mut feed) = hub.attach(100);
        hub.publish(&mut vec![rec(1, 80), rec(2, 80)], 2, None);
        let h = hub.clone();
        let waiter = std::thread::spawn(move || {
            let t = std::time::Instant::now();
            h.wait_for_room(|| false);
            t.elapsed()
        });
        std::thread::sleep(Duration::from_millis(150));
        assert!(!waiter.is_finished(), "the writer must wait while 160 > 100 bytes are buffered");
        assert!(feed.try_recv().is_some());
        let waited = waiter.join().expect("waiter");
        assert!(waited >= Duration::from_millis(100));

        hub.publish(&mut vec![rec(3, 200)], 3, None);
        let h = hub.clone();
        let waiter = std::thread::spawn(move || h.wait_for_room(|| false));
        std::thread::sleep(Duration::from_millis(100));
        assert!(!waiter.is_finished());
        hub.detach();
        waiter.join().expect("detach releases the writer");
        assert_eq!(feed.buffered_bytes(), 0);
    }
}
