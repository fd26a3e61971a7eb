//! Operation counters of a running node, read by `status` (its
//! `statistics` object) and by `/metrics` (`node::metrics`).
//!
//! Everything here is a relaxed atomic bumped once per event (a request,
//! a socket read or write), or a histogram observed once per replicated
//! request: cheap enough for the IO path. The values are read without a
//! lock, so a reading is not one instant across counters; each counter on
//! its own only grows.
//!
//! - [`IoStats`]: the NBD backend of a primary: requests and bytes per
//!   operation, requests in the backend now (`pending`), requests waiting
//!   for the peer's acknowledgement (`unacked`), and the time replies
//!   waited for that acknowledgement (histogram by durability).
//! - `repl::stats::LinkStats` (in the replication layer, which owns the
//!   link): bytes sent and received, how much data waits for the socket
//!   (the `max_buffer` budget), the peer's address and when the current
//!   connection came up.
//! - Volume counters (WAL syncs, checkpoints, bitmap writes) live in the
//!   volume: `volume::VolumeCounters`.
//!
//! A leaf (imports nothing from the crate): the NBD backend, the node and
//! `/metrics` use it; see docs/architecture.md.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::metrics::histogram::Histogram;
use serde::{Deserialize, Serialize};

/// Buckets (seconds) of the acknowledgement wait histogram: 50 µs to 10 s.
pub const ACK_LATENCY_BUCKETS: [f64; 15] =
    [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 10.0];

/// NBD request kinds counted by [`IoStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOp {
    Read = 0,
    Write = 1,
    Trim = 2,
    WriteZeroes = 3,
    Flush = 4,
}

impl IoOp {
    pub const ALL: [IoOp; 5] = [IoOp::Read, IoOp::Write, IoOp::Trim, IoOp::WriteZeroes, IoOp::Flush];

    /// The `op` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            IoOp::Read => "read",
            IoOp::Write => "write",
            IoOp::Trim => "trim",
            IoOp::WriteZeroes => "write_zeroes",
            IoOp::Flush => "flush",
        }
    }
}

/// Counters of the NBD backend (see the module doc).
#[derive(Debug)]
pub struct IoStats {
    requests: [AtomicU64; 5],
    /// Bytes read from the volume for clients.
    read_bytes: AtomicU64,
    /// Bytes clients wrote (WRITE payloads and WRITE_ZEROES lengths).
    written_bytes: AtomicU64,
    pending: AtomicU64,
    unacked: AtomicU64,
    /// Wait for the peer's acknowledgement: `[write, flush]` (a FLUSH or
    /// a FUA request waits for `durable` under protocol C).
    ack_wait: [Histogram; 2],
}

impl Default for IoStats {
    fn default() -> IoStats {
        IoStats {
            requests: Default::default(),
            read_bytes: AtomicU64::new(0),
            written_bytes: AtomicU64::new(0),
            pending: AtomicU64::new(0),
            unacked: AtomicU64::new(0),
            ack_wait: [Histogram::new(ACK_LATENCY_BUCKETS), Histogram::new(ACK_LATENCY_BUCKETS)],
        }
    }
}

/// Decrements a gauge when dropped (a request that ends, by success,
/// error or cancellation).
#[derive(Debug)]
pub struct GaugeGuard<'a>(&'a AtomicU64);

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl IoStats {
    /// A request of kind `op` moving `bytes` entered the backend; it counts
    /// as pending until the guard is dropped.
    pub fn begin(&self, op: IoOp, bytes: u64) -> GaugeGuard<'_> {
        self.requests[op as usize].fetch_add(1, Ordering::Relaxed);
        match op {
            IoOp::Read => self.read_bytes.fetch_add(bytes, Ordering::Relaxed),
            IoOp::Write | IoOp::WriteZeroes => self.written_bytes.fetch_add(bytes, Ordering::Relaxed),
            IoOp::Trim | IoOp::Flush => 0,
        };
        self.pending.fetch_add(1, Ordering::Relaxed);
        GaugeGuard(&self.pending)
    }

    /// A request completed locally and now waits for the peer.
    pub fn begin_unacked(&self) -> GaugeGuard<'_> {
        self.unacked.fetch_add(1, Ordering::Relaxed);
        GaugeGuard(&self.unacked)
    }

    /// How long a reply waited for the peer (`flush`: a FLUSH or FUA).
    pub fn observe_ack_wait(&self, flush: bool, waited: Duration) {
        self.ack_wait[usize::from(flush)].observe(waited.as_secs_f64());
    }

    /// The acknowledgement wait histogram (`flush` as above).
    pub fn ack_wait(&self, flush: bool) -> &Histogram {
        &self.ack_wait[usize::from(flush)]
    }

    pub fn requests(&self, op: IoOp) -> u64 {
        self.requests[op as usize].load(Ordering::Relaxed)
    }

    pub fn read_bytes(&self) -> u64 {
        self.read_bytes.load(Ordering::Relaxed)
    }

    pub fn written_bytes(&self) -> u64 {
        self.written_bytes.load(Ordering::Relaxed)
    }

    pub fn pending(&self) -> u64 {
        self.pending.load(Ordering::Relaxed)
    }

    pub fn unacked(&self) -> u64 {
        self.unacked.load(Ordering::Relaxed)
    }
}

/// `statistics` in `status --json` (names may be added, never changed).
/// Byte and request counts are totals since repd started.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Statistics {
    /// Bytes sent on the replication link (frames, all sessions).
    pub sent_bytes: u64,
    /// Bytes received on the replication link.
    pub received_bytes: u64,
    /// Bytes NBD clients read.
    pub read_bytes: u64,
    /// Bytes NBD clients wrote (WRITE and WRITE_ZEROES).
    pub written_bytes: u64,
    pub read_requests: u64,
    /// WRITE and WRITE_ZEROES requests.
    pub write_requests: u64,
    pub trim_requests: u64,
    pub flush_requests: u64,
    /// NBD requests in the backend now.
    pub pending_requests: u64,
    /// Of those, requests done locally that wait for the peer's
    /// acknowledgement.
    pub unacked_requests: u64,
    /// Replicated data handed to the link and not yet on the socket.
    pub in_flight_bytes: u64,
    /// `max_buffer`: the budget `in_flight_bytes` is held under.
    pub replication_buffer_bytes: u64,
    /// `in_flight_bytes / replication_buffer_bytes` in percent.
    pub replication_buffer_percent: f64,
    /// fdatasyncs of the WAL.
    pub wal_syncs: u64,
    pub checkpoints: u64,
    /// Bitmap pages written to the metadata file.
    pub bitmap_writes: u64,
    /// The peer's address on the current connection, or null.
    pub peer_address: Option<String>,
    /// When the current connection came up (RFC 3339, UTC), or null.
    pub connected_since: Option<String>,
    /// Seconds the current connection has been up, or null.
    pub connected_seconds: Option<f64>,
}
