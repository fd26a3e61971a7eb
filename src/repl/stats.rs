//! Counters of the replication link, read by `status` (its `statistics`
//! object) and by `/metrics`. The NBD-side counters live in `crate::stats`.
//!
//! Relaxed atomics and two short mutexes, as in `crate::stats`: each
//! counter on its own only grows.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use super::link::QueuedBytes;

/// Counters of the replication link.
#[derive(Debug, Default)]
pub struct LinkStats {
    sent_bytes: Arc<AtomicU64>,
    received_bytes: Arc<AtomicU64>,
    /// The running session's writer queue (data bytes not yet written).
    queue: Mutex<Weak<QueuedBytes>>,
    /// Peer address and connection start (Unix ms) while a session runs.
    up: Mutex<Option<(String, u64)>>,
}

impl LinkStats {
    /// The counter a link's socket writes add to.
    pub fn sent_counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.sent_bytes)
    }

    /// The counter a link's socket reads add to.
    pub fn received_counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.received_bytes)
    }

    /// A session started: its writer queue, the peer's address, now.
    pub fn session_up(&self, queue: &Arc<QueuedBytes>, peer_address: String, now_unix_ms: u64) {
        *lock(&self.queue) = Arc::downgrade(queue);
        *lock(&self.up) = Some((peer_address, now_unix_ms));
    }

    /// The session ended.
    pub fn session_down(&self) {
        *lock(&self.queue) = Weak::new();
        *lock(&self.up) = None;
    }

    pub fn sent_bytes(&self) -> u64 {
        self.sent_bytes.load(Ordering::Relaxed)
    }

    pub fn received_bytes(&self) -> u64 {
        self.received_bytes.load(Ordering::Relaxed)
    }

    /// Data bytes handed to the link's writer and not yet on the socket.
    pub fn queued_bytes(&self) -> u64 {
        lock(&self.queue).upgrade().map_or(0, |q| q.get() as u64)
    }

    /// The peer's address and the connection start (Unix ms), if up.
    pub fn up(&self) -> Option<(String, u64)> {
        lock(&self.up).clone()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain data: a panic elsewhere leaves it usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}
