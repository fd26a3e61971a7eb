//! Online verify (`repctl verify`) and the pure parts it is made of.
//!
//! The **source** (the primary; with two secondaries, the node the operator
//! asked) walks the volume in [`VERIFY_CHUNK`] pieces. On a primary each
//! read is queued in the log writer's order (`queue_verify_read`), so its
//! data comes out of the replication feed between the records committed
//! before and after it; the source hashes it (one [`Digest`] per bitmap
//! block) and sends `VerifyDigests` in the same ordered stream as the
//! records. The **target** applies the stream in order; when the digests
//! reach the front of its apply queue (every earlier record written, no
//! later one queued yet: the reader waits while a verify read is pending),
//! it reads the same range, compares, marks the differing blocks out of
//! sync and answers `VerifyResult`. Both digests describe the same point of
//! the stream, so concurrent writes cause no false positive.
//!
//! ```text
//!  source (primary)                                   target (secondary)
//!  queue_verify_read(o, 1 MiB) ─► log writer ─► feed ─► VerifyDigests ─► after earlier applies:
//!                                  (between batches)                      read, compare, mark_range
//!  mark_range(mismatched) ◄──────────────────────────── VerifyResult ◄───┘
//!  ... last result: VerifyEnd, `verify-finished`; differences found → the
//!  session is renegotiated, and the bitmap resync moves the marked blocks.
//! ```
//!
//! Rate: at most [`VERIFY_WINDOW`] bytes of chunks are between "read queued"
//! and "result received"; while an application write the peer has not yet
//! written is in the stream, and for [`VERIFY_BUSY_HOLD`] after, only one
//! chunk of [`VERIFY_CHUNK_BUSY`] is, followed by a pause as long as it
//! took (application IO first; measured in docs/verify.md).
//!
//! With two secondaries nothing writes: the source reads directly
//! (`ReadMode::Direct`) and the target compares at once. Differences:
//! both nodes mark them (`mark_range`), and the source renegotiates the
//! connection so that the resync decision moves them (docs/verify.md).
//!
//! Digest: BLAKE3 cut to 128 bits ([`VERIFY_DIGEST_LEN`]). A verify is the
//! last line of defence against silent corruption, so the check must not be
//! fooled by structured differences the way a CRC can be (a 32-bit CRC
//! misses one random corruption in 4 billion, and linear codes miss whole
//! classes of them); BLAKE3 is a cryptographic hash that still runs at
//! several GB/s per core with SIMD, faster than the disk read it follows,
//! and 128 bits make an accidental match impossible in practice while
//! keeping the digests 1/256 of the data at 4 KiB blocks.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use super::engine::{Engine, StopReason};
use super::proto::Message;
pub use super::proto::VERIFY_DIGEST_LEN;
use super::session::Outcome;
use super::store::{BoxFut, ReplStore};
use crate::event::Event;
use crate::model::{ConnState, DiskState, ReplState, Role};
use crate::volume::VolumeError;

/// One block's digest.
pub type Digest = [u8; VERIFY_DIGEST_LEN];

/// Bytes read (and described by one VerifyDigests) at a time.
pub const VERIFY_CHUNK: u64 = 1 << 20;
/// Bytes of chunks in flight (read queued, result not yet received): what
/// the verify gets through in [`VERIFY_AHEAD`] at its measured speed,
/// within [`VERIFY_WINDOW_MIN`]..=[`VERIFY_WINDOW`]. A write that arrives
/// while the window is full waits behind it, so it is kept short.
pub const VERIFY_WINDOW: u64 = 8 * VERIFY_CHUNK;
pub const VERIFY_WINDOW_MIN: u64 = 2 * VERIFY_CHUNK;
pub const VERIFY_AHEAD: std::time::Duration = std::time::Duration::from_millis(20);
/// Chunk size while application writes wait (and for [`VERIFY_BUSY_HOLD`]
/// after the last one): one such chunk at most is in flight, so a write
/// waits behind a 128 KiB read and hash, not a window of 1 MiB chunks.
pub const VERIFY_CHUNK_BUSY: u64 = 128 << 10;
pub const VERIFY_BUSY_HOLD: std::time::Duration = std::time::Duration::from_millis(200);
/// Longest pause between two busy-mode chunks.
pub const VERIFY_BUSY_PAUSE_MAX: std::time::Duration = std::time::Duration::from_millis(50);
/// Smallest and largest digest block (the bitmap granularity's range, and
/// 512 for small test volumes).
pub const MIN_BLOCK: u32 = 512;
pub const MAX_BLOCK: u32 = 1 << 20;

/// Errors of the verify exchange. Any of them is a protocol violation by
/// the peer: the session ends.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("Verify block size {block} is not a power of two from {MIN_BLOCK} to {MAX_BLOCK}")]
    BadBlock { block: u32 },
    #[error("Verify chunk [{offset}, +{len}) is outside the volume of {size} bytes")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("Verify digests at {offset}: {count} digests of {block}-byte blocks do not fit the volume of {size} bytes")]
    DigestCount { offset: u64, count: usize, block: u32, size: u64 },
    #[error("Verify result for [{offset}, +{len}) does not answer the oldest chunk in flight ({expected})")]
    UnexpectedResult { offset: u64, len: u32, expected: String },
    #[error("Verify result for [{offset}, +{len}) names [{run_offset}, +{run_len}), not ascending inside the chunk")]
    BadRun { offset: u64, len: u32, run_offset: u64, run_len: u32 },
    #[error("Verify message {msg} arrived with no verify running")]
    NotRunning { msg: &'static str },
}

/// The digest of one block.
pub fn digest(block: &[u8]) -> Digest {
    let h = blake3::hash(block);
    let mut d = [0u8; VERIFY_DIGEST_LEN];
    d.copy_from_slice(&h.as_bytes()[..VERIFY_DIGEST_LEN]);
    d
}

/// The concatenated digests of `data`, one per `block` bytes (the last one
/// covers the rest when `data.len()` is not a multiple of `block`).
pub fn digest_blocks(data: &[u8], block: u32) -> Bytes {
    let mut out = Vec::with_capacity(data.len().div_ceil(block as usize) * VERIFY_DIGEST_LEN);
    for b in data.chunks(block as usize) {
        out.extend_from_slice(&digest(b));
    }
    Bytes::from(out)
}

/// Checks a digest block size.
pub fn check_block(block: u32) -> Result<(), VerifyError> {
    if block.is_power_of_two() && (MIN_BLOCK..=MAX_BLOCK).contains(&block) {
        Ok(())
    } else {
        Err(VerifyError::BadBlock { block })
    }
}

/// The byte length `count` digests of `block` bytes cover at `offset` in a
/// volume of `size` bytes (the last block may be short), or an error when
/// they do not fit.
pub fn digests_len(offset: u64, count: usize, block: u32, size: u64) -> Result<u32, VerifyError> {
    check_block(block)?;
    let bad = || VerifyError::DigestCount { offset, count, block, size };
    if count == 0 || offset >= size {
        return Err(bad());
    }
    let full = (count as u64).checked_mul(u64::from(block)).ok_or_else(bad)?;
    let len = full.min(size - offset);
    // Every digest must cover at least one byte.
    if len <= full - u64::from(block) {
        return Err(bad());
    }
    u32::try_from(len).map_err(|_| bad())
}

/// Compares local data of the chunk at `offset` with the peer's digests
/// (`peer.len()` = `VERIFY_DIGEST_LEN` x one per `block` of `local`) and
/// returns the differing ranges, adjacent blocks coalesced.
pub fn compare(offset: u64, local: &[u8], block: u32, peer: &[u8]) -> Vec<(u64, u32)> {
    debug_assert_eq!(peer.len(), local.len().div_ceil(block as usize) * VERIFY_DIGEST_LEN);
    let mut runs: Vec<(u64, u32)> = Vec::new();
    let mut at = offset;
    for (b, theirs) in local.chunks(block as usize).zip(peer.chunks_exact(VERIFY_DIGEST_LEN)) {
        if digest(b)[..] != theirs[..] {
            match runs.last_mut() {
                Some((o, l)) if *o + u64::from(*l) == at && u64::from(*l) + b.len() as u64 <= u64::from(u32::MAX) => {
                    *l += b.len() as u32
                }
                _ => runs.push((at, b.len() as u32)),
            }
        }
        at += b.len() as u64;
    }
    runs
}

/// Total bytes of `runs`.
pub fn run_bytes(runs: &[(u64, u32)]) -> u64 {
    runs.iter().map(|(_, l)| u64::from(*l)).sum()
}

/// Checks that `runs` are ascending, non-overlapping and inside the chunk.
pub fn check_runs(offset: u64, len: u32, runs: &[(u64, u32)]) -> Result<(), VerifyError> {
    let end = offset + u64::from(len);
    let mut at = offset;
    for &(o, l) in runs {
        let run_end = o.checked_add(u64::from(l));
        if l == 0 || o < at || run_end.is_none_or(|e| e > end) {
            return Err(VerifyError::BadRun { offset, len, run_offset: o, run_len: l });
        }
        at = o + u64::from(l);
    }
    Ok(())
}

/// The source's walk over the volume: which chunk to read next, which are
/// in flight, what was found.
#[derive(Debug)]
pub struct VerifySource {
    total: u64,
    block: u32,
    /// Next offset to read.
    next: u64,
    /// Chunks read (or queued for reading) whose result has not arrived,
    /// oldest first (the target answers in stream order).
    in_flight: VecDeque<(u64, u32)>,
    in_flight_bytes: u64,
    /// Bytes whose result arrived.
    done: u64,
    out_of_sync: u64,
    started: Instant,
}

impl VerifySource {
    /// A verify of `[0, total)` with one digest per `block` bytes.
    pub fn new(total: u64, block: u32) -> Result<VerifySource, VerifyError> {
        check_block(block)?;
        Ok(VerifySource {
            total,
            block,
            next: 0,
            in_flight: VecDeque::new(),
            in_flight_bytes: 0,
            done: 0,
            out_of_sync: 0,
            started: Instant::now(),
        })
    }

    pub fn block(&self) -> u32 {
        self.block
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn done(&self) -> u64 {
        self.done
    }

    pub fn out_of_sync(&self) -> u64 {
        self.out_of_sync
    }

    pub fn started(&self) -> Instant {
        self.started
    }

    /// The next chunk to read, at most `chunk` bytes (rounded up to whole
    /// blocks), if fewer than `window` bytes are in flight (one chunk is
    /// always allowed); the caller queues the read.
    pub fn next_read(&mut self, window: u64, chunk: u64) -> Option<(u64, u32)> {
        if self.next >= self.total || (!self.in_flight.is_empty() && self.in_flight_bytes >= window) {
            return None;
        }
        let chunk = chunk.clamp(u64::from(self.block), crate::volume::MAX_SYNC_CHUNK as u64);
        let chunk = chunk.div_ceil(u64::from(self.block)) * u64::from(self.block);
        let len = (self.total - self.next).min(chunk) as u32;
        let c = (self.next, len);
        self.next += u64::from(len);
        self.in_flight.push_back(c);
        self.in_flight_bytes += u64::from(len);
        Some(c)
    }

    /// Whether `(offset, len)` is a chunk read for this verify (a stale read
    /// of an earlier verify is not).
    pub fn expects_data(&self, offset: u64, len: usize) -> bool {
        self.in_flight.iter().any(|&(o, l)| o == offset && l as usize == len)
    }

    /// The target's answer for the oldest chunk in flight; returns the
    /// mismatched bytes in it.
    pub fn on_result(&mut self, offset: u64, len: u32, runs: &[(u64, u32)]) -> Result<u64, VerifyError> {
        match self.in_flight.front() {
            Some(&(o, l)) if o == offset && l == len => {}
            front => {
                let expected = front.map_or("none".to_string(), |(o, l)| format!("[{o}, +{l})"));
                return Err(VerifyError::UnexpectedResult { offset, len, expected });
            }
        }
        check_runs(offset, len, runs)?;
        self.in_flight.pop_front();
        self.in_flight_bytes -= u64::from(len);
        self.done += u64::from(len);
        let bad = run_bytes(runs);
        self.out_of_sync += bad;
        Ok(bad)
    }

    /// Every chunk was read and answered.
    pub fn is_done(&self) -> bool {
        self.next >= self.total && self.in_flight.is_empty()
    }
}

/// The outcome of a finished (or aborted) verify.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerifyReport {
    /// Bytes compared.
    pub checked_bytes: u64,
    /// Bytes found different (marked out of sync on both nodes).
    pub out_of_sync_bytes: u64,
    pub seconds: f64,
    /// False when the verify was aborted (link lost, role change, ...).
    pub complete: bool,
    /// Why it was aborted, if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// `status.verify` (design.md §6 extension).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VerifyStatus {
    /// A verify runs now (this node is its source or its target).
    pub running: bool,
    /// `source` or `target` while running, else null.
    #[serde(default)]
    pub role: Option<String>,
    /// Bytes compared so far (of the running verify, else of the last one).
    pub done_bytes: u64,
    pub total_bytes: u64,
    /// Bytes found different so far (running) or in the last verify.
    pub out_of_sync_bytes: u64,
    /// Verifies that ended on this node since repd started (complete or
    /// not): `repctl verify --wait` waits for it to grow.
    #[serde(default)]
    pub runs_finished: u64,
    /// The last verify that ended, if any.
    #[serde(default)]
    pub last: Option<VerifyReport>,
}

/// What the engine keeps about verify: the status, the operator's request
/// waiting for the session to pick it up, and the session's wake-up.
#[derive(Debug, Default)]
pub struct VerifyCell {
    status: Mutex<VerifyStatus>,
    started: Mutex<Option<Instant>>,
    requested: AtomicBool,
    /// Wakes the session when a verify is requested.
    pub(crate) wake: Notify,
}

impl VerifyCell {
    fn lock(&self) -> std::sync::MutexGuard<'_, VerifyStatus> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn status(&self) -> VerifyStatus {
        self.lock().clone()
    }

    pub fn running(&self) -> bool {
        self.lock().running
    }

    /// Asks the session to start (or forward) a verify.
    pub(crate) fn request(&self) {
        self.requested.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    /// Whether a request waits for the session.
    pub(crate) fn requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    /// Takes the pending request, if any.
    pub(crate) fn take_request(&self) -> bool {
        self.requested.swap(false, Ordering::AcqRel)
    }

    /// A verify starts with this node as `role` (`source` / `target`).
    pub(crate) fn begin(&self, role: &str, total_bytes: u64) {
        let mut s = self.lock();
        s.running = true;
        s.role = Some(role.to_string());
        s.done_bytes = 0;
        s.total_bytes = total_bytes;
        s.out_of_sync_bytes = 0;
        *self.started.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }

    /// Progress of the running verify.
    pub(crate) fn progress(&self, done_bytes: u64, out_of_sync_bytes: u64) {
        let mut s = self.lock();
        if s.running {
            s.done_bytes = done_bytes;
            s.out_of_sync_bytes = out_of_sync_bytes;
        }
    }

    /// Adds to the running verify's counts (the target counts as it goes).
    pub(crate) fn add(&self, done_bytes: u64, out_of_sync_bytes: u64) {
        let mut s = self.lock();
        if s.running {
            s.done_bytes += done_bytes;
            s.out_of_sync_bytes += out_of_sync_bytes;
        }
    }

    /// The running verify ended; `None` if none was running.
    pub(crate) fn finish(&self, complete: bool, message: Option<String>) -> Option<VerifyReport> {
        let mut s = self.lock();
        if !s.running {
            return None;
        }
        let started = self.started.lock().unwrap_or_else(|p| p.into_inner()).take();
        let report = VerifyReport {
            checked_bytes: s.done_bytes,
            out_of_sync_bytes: s.out_of_sync_bytes,
            seconds: started.map_or(0.0, |t| t.elapsed().as_secs_f64()),
            complete,
            message,
        };
        s.running = false;
        s.role = None;
        s.runs_finished += 1;
        s.last = Some(report.clone());
        Some(report)
    }
}

// ---------------------------------------------------------------------------
// The operator's commands.
// ---------------------------------------------------------------------------

impl Engine {
    /// `repctl verify`: asks the running session to verify every block.
    /// The source is the primary (a secondary forwards the request to it),
    /// else this node. Refused, saying why, when the pair is not connected
    /// and in sync or a verify already runs. Returns at once; progress is
    /// in `status.verify`, the end is the `verify-finished` event.
    pub fn request_verify(&self) -> Result<VerifyRequested, String> {
        let v = self.view();
        if v.connection != ConnState::Connected {
            let why = v.last_error.map(|e| format!(" (last error: {e})")).unwrap_or_default();
            return Err(format!(
                "verify: peer {} is not connected (connection {}){why}; verify compares with the peer's copy",
                self.cfg.peer, v.connection
            ));
        }
        match v.replication {
            Some(ReplState::Established) => {}
            Some(r) => {
                return Err(format!(
                    "verify: a resync is running (this node is {}); verify once it finished (`repctl wait-sync`)",
                    r.as_str()
                ));
            }
            None => return Err("verify: the connection is not established yet; retry in a moment".into()),
        }
        let s = self.verify.status();
        if self.verify.requested() {
            return Err("verify: a verify was requested already and starts in a moment".into());
        }
        if s.running {
            return Err(format!(
                "verify: a verify is already running ({} of {} bytes checked, {} out of sync)",
                s.done_bytes, s.total_bytes, s.out_of_sync_bytes
            ));
        }
        let source = match (self.role(), v.peer_role) {
            (Role::Secondary, Some(Role::Primary)) => self.cfg.peer.clone(),
            _ => self.cfg.node.clone(),
        };
        tracing::info!(peer = %self.cfg.peer, %source, "online verify requested");
        self.verify.request();
        Ok(VerifyRequested {
            source,
            total_bytes: self.store.size(),
            block: self.store.bitmap_granularity(),
            runs_finished: s.runs_finished,
        })
    }

    /// `repctl invalidate`: this node's data is to be replaced by a full
    /// copy from the peer. Refused on a primary. Every block is marked out
    /// of sync (persisted) and then the disk is recorded `inconsistent`
    /// (that order: a crash in between leaves an uptodate disk with all
    /// bits set, and a rerun finishes the job, never an inconsistent disk
    /// whose bits were not set). A connected session is renegotiated at
    /// once, so the decision makes this node the sync target; otherwise the
    /// resync runs at the next connect.
    pub fn invalidate(&self) -> Result<Invalidation, String> {
        if self.role() == Role::Primary {
            return Err("invalidate: this node is primary: its data is what the peer syncs from; \
                        demote it first (`repctl demote`), then invalidate"
                .into());
        }
        self.store.mark_all().map_err(|e| format!("invalidate: cannot mark every block out of sync: {e}"))?;
        self.store.persist_bitmap().map_err(|e| format!("invalidate: cannot persist the bitmap: {e}"))?;
        self.store_disk(DiskState::Inconsistent, None)
            .map_err(|e| format!("invalidate: cannot record the disk as inconsistent: {e}"))?;
        let connected = self.is_connected();
        let what = if connected {
            format!("a full resync from {} starts now (reconnecting)", self.cfg.peer)
        } else {
            format!("the full resync from {} runs at the next connect", self.cfg.peer)
        };
        tracing::warn!(peer = %self.cfg.peer, "invalidated: disk inconsistent, every block out of sync; {what}");
        self.emit(Event::Invalidated { connected, peer: self.cfg.peer.clone() });
        if connected {
            self.renegotiate();
        }
        Ok(Invalidation {
            out_of_sync_bytes: self.store.dirty_bytes(),
            message: format!("disk inconsistent, every block marked out of sync: {what}"),
        })
    }
}

/// A verify was requested ([`Engine::request_verify`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyRequested {
    /// The node whose data is the reference (the primary, else this node).
    pub source: String,
    /// Bytes the verify will compare.
    pub total_bytes: u64,
    /// Bytes per checksum (the bitmap granularity).
    pub block: u32,
    /// `status.verify.runs_finished` when it was requested: the verify is
    /// over once that count grew.
    pub runs_finished: u64,
}

/// This node was invalidated ([`Engine::invalidate`]): the disk is
/// `inconsistent` now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalidation {
    /// Bytes now marked out of sync (the whole volume).
    pub out_of_sync_bytes: u64,
    /// What happens next, for the operator.
    pub message: String,
}

// ---------------------------------------------------------------------------
// The verify of one replication session.
// ---------------------------------------------------------------------------

/// How the source reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReadMode {
    /// Primary: `queue_verify_read`, the data comes out of the feed in
    /// stream order.
    Feed,
    /// Both secondary (no writes anywhere): plain reads.
    Direct,
}

/// The source side of a running verify.
struct SourceRun {
    walk: VerifySource,
    mode: ReadMode,
    /// When an application write was last seen waiting for the peer.
    last_busy: Option<Instant>,
    /// Busy mode: when the chunk in flight was queued, and when the next
    /// one may be (after a pause as long as the last chunk took, so that
    /// the stream carries no verify work half of the time).
    chunk_queued: Option<Instant>,
    resume_at: Option<Instant>,
    /// Direct mode: reads in flight, oldest first.
    reads: VecDeque<(u64, BoxFut<'static, Result<Bytes, VolumeError>>)>,
}

/// The target side of a running verify.
#[derive(Debug, Clone, Copy)]
struct TargetRun {
    total: u64,
    block: u32,
}

/// Mismatched ranges `(offset, len)` of one chunk.
pub type Runs = Vec<(u64, u32)>;

/// The target's read-and-compare of one chunk, queued with the applies.
pub(crate) type CompareFut = BoxFut<'static, Result<(), VolumeError>>;

/// One chunk the target compares once the apply queue reaches it.
#[derive(Debug)]
pub(crate) struct TargetJob {
    offset: u64,
    len: u32,
    /// Filled by the compare future.
    result: Arc<Mutex<Option<Runs>>>,
}

/// What a session does next after a verify step.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum After {
    /// Carry on.
    Continue,
    /// The verify found differences (marked on both nodes): renegotiate
    /// the connection so that the resync decision moves them.
    Resync,
}

/// The verify state of one session: at most one verify runs, with this
/// node as source or as target.
#[derive(Default)]
pub(crate) struct SessionVerify {
    source: Option<SourceRun>,
    target: Option<TargetRun>,
    /// Target: a compare waits in the apply queue. No frame is read until
    /// it ran, so the target's data is exactly the stream up to the digests.
    pub(crate) gate: bool,
    /// Source: the peer started a verify at the same time and yields; its
    /// digests sent before it learned are dropped until its VerifyEnd.
    peer_yielding: bool,
}

impl SessionVerify {
    /// Source: starts the verify the operator asked for (locally or through
    /// the peer's VerifyRequest), unless one runs or `busy` (a resync runs:
    /// the request waits for its end). Returns the VerifyStart to send.
    pub(crate) fn start_if_requested(&mut self, engine: &Engine, mode: ReadMode, busy: bool) -> Option<Message> {
        if busy || self.source.is_some() || self.target.is_some() || !engine.verify.requested() {
            return None;
        }
        let total = engine.store.size();
        let block = engine.store.bitmap_granularity();
        let walk = match VerifySource::new(total, block) {
            Ok(w) => w,
            Err(e) => {
                engine.verify.take_request();
                tracing::error!(peer = %engine.cfg.peer, "verify not started: {e}");
                return None;
            }
        };
        tracing::info!(peer = %engine.cfg.peer, bytes = total, block, ?mode, "online verify starts (this node is the source)");
        // Running before the request is taken: a second request in between
        // is refused, not queued.
        engine.verify.begin("source", total);
        engine.verify.take_request();
        self.source = Some(SourceRun {
            walk,
            mode,
            last_busy: None,
            chunk_queued: None,
            resume_at: None,
            reads: VecDeque::new(),
        });
        Some(Message::VerifyStart { total_bytes: total, block })
    }

    /// Busy mode: when the next chunk may be queued (the session wakes up
    /// then).
    pub(crate) fn next_wake(&self) -> Option<Instant> {
        self.source.as_ref().and_then(|r| r.resume_at).filter(|t| *t > Instant::now())
    }

    /// This node is the source of a running verify.
    pub(crate) fn is_source(&self) -> bool {
        self.source.is_some()
    }

    /// Source: queues reads while the window allows (one chunk while an
    /// application write the peer has not written is in the stream).
    pub(crate) fn queue_reads(&mut self, store: &Arc<dyn ReplStore>, app_waiting: bool) -> Result<(), VolumeError> {
        let Some(run) = self.source.as_mut() else { return Ok(()) };
        if app_waiting {
            run.last_busy = Some(Instant::now());
        }
        // Writes come one after the other (QD1): between two of them none
        // waits, but the next one would find a full window ahead of it. So
        // the verify stays in its busy mode for a while after the last one.
        let busy = run.last_busy.is_some_and(|t| t.elapsed() < VERIFY_BUSY_HOLD);
        if busy && run.resume_at.is_some_and(|t| Instant::now() < t) {
            return Ok(());
        }
        let (window, chunk) = if busy {
            (0, VERIFY_CHUNK_BUSY)
        } else {
            let secs = run.walk.started().elapsed().as_secs_f64();
            let speed = if secs > 0.0 { run.walk.done() as f64 / secs } else { 0.0 };
            let w = ((speed * VERIFY_AHEAD.as_secs_f64()) as u64).clamp(VERIFY_WINDOW_MIN, VERIFY_WINDOW);
            (w, VERIFY_CHUNK)
        };
        while let Some((offset, len)) = run.walk.next_read(window, chunk) {
            run.chunk_queued = busy.then(Instant::now);
            match run.mode {
                ReadMode::Feed => store.queue_verify_read(offset, len)?,
                ReadMode::Direct => run.reads.push_back((offset, store.read_data(offset, len))),
            }
        }
        Ok(())
    }

    /// Source, direct mode: the oldest read in flight (pending forever
    /// when there is none, for `select!`).
    pub(crate) async fn next_direct(&mut self) -> Result<(u64, Bytes), VolumeError> {
        match self.source.as_mut().and_then(|r| r.reads.front_mut()) {
            Some((offset, f)) => {
                let offset = *offset;
                let data = f.await;
                if let Some(r) = self.source.as_mut() {
                    r.reads.pop_front();
                }
                data.map(|d| (offset, d))
            }
            None => std::future::pending().await,
        }
    }

    /// Source: the data of a verify read (from the feed or a direct read)
    /// becomes the VerifyDigests to send; `None` for a read of no running
    /// verify (an aborted one).
    pub(crate) fn digests_for(&mut self, offset: u64, data: &Bytes) -> Option<Message> {
        let run = self.source.as_ref()?;
        if !run.walk.expects_data(offset, data.len()) {
            return None;
        }
        let block = run.walk.block();
        Some(Message::VerifyDigests { offset, block, digests: digest_blocks(data, block) })
    }

    /// A verify message from the peer, on either side. `Ok(Some(m))`: send
    /// `m`; `Err`: a protocol violation (the session ends).
    pub(crate) fn on_message(&mut self, engine: &Engine, msg: Message) -> Result<(Option<Message>, After), String> {
        match msg {
            Message::VerifyRequest => {
                if self.source.is_some() || self.target.is_some() {
                    // A repeated ask (the peer forwarded twice before our
                    // VerifyStart reached it): the running verify answers it.
                    tracing::info!(peer = %engine.cfg.peer, "the peer asks for an online verify: one is running");
                } else {
                    tracing::info!(peer = %engine.cfg.peer, "the peer asks for an online verify");
                    engine.verify.request();
                }
                Ok((None, After::Continue))
            }
            Message::VerifyStart { total_bytes, block } => {
                check_block(block).map_err(|e| e.to_string())?;
                if total_bytes != engine.store.size() {
                    return Err(format!(
                        "verify of {total_bytes} bytes, but this volume has {} bytes",
                        engine.store.size()
                    ));
                }
                if self.target.is_some() || self.peer_yielding {
                    return Err("verify-start while a verify is running".into());
                }
                let mut reply = None;
                if self.source.is_some() {
                    // Two secondaries started a verify each at the same
                    // moment: the node that wins the connection rule keeps
                    // its own; the other yields and becomes its target.
                    if super::handshake::connection_winner(&engine.cfg.node, &engine.cfg.peer) == engine.cfg.node {
                        tracing::info!(peer = %engine.cfg.peer, "both nodes started a verify: ours runs, the peer's yields");
                        self.peer_yielding = true;
                        return Ok((None, After::Continue));
                    }
                    tracing::info!(peer = %engine.cfg.peer, "both nodes started a verify: the peer's runs, ours yields");
                    self.source = None;
                    reply = Some(Message::VerifyEnd {
                        checked_bytes: 0,
                        out_of_sync_bytes: 0,
                        complete: false,
                        message: format!("yielded to the verify started by {} at the same time", engine.cfg.peer),
                    });
                }
                tracing::info!(peer = %engine.cfg.peer, bytes = total_bytes, block, "online verify starts (the peer is the source)");
                engine.verify.begin("target", total_bytes);
                self.target = Some(TargetRun { total: total_bytes, block });
                Ok((reply, After::Continue))
            }
            Message::VerifyResult { offset, len, mismatched } => {
                let Some(run) = self.source.as_mut() else {
                    return Err(VerifyError::NotRunning { msg: "verify-result" }.to_string());
                };
                let bad = run.walk.on_result(offset, len, &mismatched).map_err(|e| e.to_string())?;
                if let Some(t) = run.chunk_queued.take() {
                    let now = Instant::now();
                    run.resume_at = Some(now + (now - t).min(VERIFY_BUSY_PAUSE_MAX));
                }
                if bad > 0 {
                    for &(o, l) in &mismatched {
                        engine.store.mark_range(o, u64::from(l));
                    }
                    tracing::warn!(peer = %engine.cfg.peer, offset, bytes = bad, runs = mismatched.len(), "verify: blocks differ from the peer's; marked out of sync");
                }
                engine.verify.progress(run.walk.done(), run.walk.out_of_sync());
                if !run.walk.is_done() {
                    return Ok((None, After::Continue));
                }
                let (checked, oos) = (run.walk.done(), run.walk.out_of_sync());
                self.source = None;
                let end = Message::VerifyEnd {
                    checked_bytes: checked,
                    out_of_sync_bytes: oos,
                    complete: true,
                    message: String::new(),
                };
                let after = self.finished(engine, true, None);
                Ok((Some(end), after))
            }
            Message::VerifyEnd { checked_bytes, out_of_sync_bytes, complete, message } => {
                if self.peer_yielding {
                    // The peer gave up the verify it started at the same
                    // time as ours (see VerifyStart).
                    self.peer_yielding = false;
                    return Ok((None, After::Continue));
                }
                if self.target.take().is_none() {
                    // The end of a verify this node never saw start (it
                    // was refused or aborted before): nothing to close.
                    tracing::info!(peer = %engine.cfg.peer, complete, "verify ended on the peer: {message}");
                    return Ok((None, After::Continue));
                }
                engine.verify.progress(checked_bytes, out_of_sync_bytes);
                let why = (!message.is_empty()).then_some(message);
                // The source renegotiates when differences were found.
                self.finished(engine, complete, why);
                Ok((None, After::Continue))
            }
            other => Err(format!("{} is not a verify message", other.name())),
        }
    }

    /// Target: the digests of one chunk. Returns the job and the future to
    /// queue behind the records received before it (it reads the local
    /// range and compares); the reader stops until it ran ([`Self::gate`]).
    /// `None`: digests of a verify the peer gave up (dropped).
    pub(crate) fn target_digests(
        &mut self,
        engine: &Engine,
        offset: u64,
        block: u32,
        digests: Bytes,
    ) -> Result<Option<(TargetJob, CompareFut)>, String> {
        if self.peer_yielding {
            return Ok(None);
        }
        let Some(run) = self.target else {
            return Err(VerifyError::NotRunning { msg: "verify-digests" }.to_string());
        };
        if block != run.block {
            return Err(format!("verify digests of {block}-byte blocks in a verify of {}-byte blocks", run.block));
        }
        let count = digests.len() / VERIFY_DIGEST_LEN;
        let len = digests_len(offset, count, block, run.total).map_err(|e| e.to_string())?;
        let result = Arc::new(Mutex::new(None));
        let slot = Arc::clone(&result);
        let read = engine.store.read_data(offset, len);
        let fut: CompareFut = Box::pin(async move {
            let local = read.await?;
            let runs = compare(offset, &local, block, &digests);
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(runs);
            Ok(())
        });
        self.gate = true;
        Ok(Some((TargetJob { offset, len, result }, fut)))
    }

    /// Target: the job's compare ran; marks the differing blocks and
    /// returns the VerifyResult to send.
    pub(crate) fn target_done(&mut self, engine: &Engine, job: TargetJob) -> Message {
        self.gate = false;
        let runs = job.result.lock().unwrap_or_else(|p| p.into_inner()).take().unwrap_or_default();
        let bad = run_bytes(&runs);
        if bad > 0 {
            for &(o, l) in &runs {
                engine.store.mark_range(o, u64::from(l));
            }
            tracing::warn!(peer = %engine.cfg.peer, offset = job.offset, bytes = bad, runs = runs.len(), "verify: blocks differ from the peer's; marked out of sync");
        }
        engine.verify.add(u64::from(job.len), bad);
        Message::VerifyResult { offset: job.offset, len: job.len, mismatched: runs }
    }

    /// The session ends: a running verify is aborted (reported as such).
    /// A request not picked up yet is dropped too, unless the link is
    /// renegotiated at once (role change, renegotiation, a newer duplicate
    /// connection): then the next session runs it.
    pub(crate) fn end(&mut self, engine: &Engine, outcome: &Outcome) {
        if !matches!(outcome, Outcome::Stopped(StopReason::RoleChange | StopReason::Renegotiate | StopReason::Replaced))
            && engine.verify.take_request()
        {
            tracing::info!(peer = %engine.cfg.peer, "verify request dropped: the session ended before it started");
        }
        if self.source.take().is_some() || self.target.take().is_some() {
            self.gate = false;
            self.finished(engine, false, Some(describe_end(outcome)));
        }
    }

    /// Records the end, logs it, emits `verify-finished`; differences
    /// found by a complete verify ask for a resync.
    fn finished(&mut self, engine: &Engine, complete: bool, message: Option<String>) -> After {
        let Some(r) = engine.verify.finish(complete, message) else { return After::Continue };
        if r.out_of_sync_bytes > 0
            && let Err(e) = engine.store.persist_bitmap()
        {
            tracing::error!(peer = %engine.cfg.peer, "verify: cannot persist the marked blocks: {e}");
        }
        if complete {
            tracing::info!(
                peer = %engine.cfg.peer, checked_bytes = r.checked_bytes, out_of_sync_bytes = r.out_of_sync_bytes,
                seconds = r.seconds, "online verify finished"
            );
        } else {
            tracing::warn!(
                peer = %engine.cfg.peer, checked_bytes = r.checked_bytes, out_of_sync_bytes = r.out_of_sync_bytes,
                "online verify aborted: {}", r.message.as_deref().unwrap_or("")
            );
        }
        engine.emit(Event::VerifyFinished {
            checked_bytes: r.checked_bytes,
            complete: r.complete,
            message: r.message.clone(),
            out_of_sync_bytes: r.out_of_sync_bytes,
            peer: engine.cfg.peer.clone(),
            seconds: r.seconds,
        });
        if complete && r.out_of_sync_bytes > 0 { After::Resync } else { After::Continue }
    }
}

/// Why a session ended, for an aborted verify's report.
fn describe_end(o: &Outcome) -> String {
    match o {
        Outcome::Stopped(r) => match r {
            StopReason::Disconnect => "disconnected by the operator".into(),
            StopReason::Replaced => "the connection was replaced by a newer one".into(),
            StopReason::RoleChange => "a role change renegotiated the connection".into(),
            StopReason::Renegotiate => "the connection was renegotiated".into(),
            StopReason::Shutdown => "the node is shutting down".into(),
        },
        Outcome::PeerLeft(why) => format!("the peer disconnected: {why}"),
        Outcome::PeerGone(why) => format!("the peer was lost: {why}"),
        Outcome::Failed(why) => format!("the session failed: {why}"),
    }
}

#[cfg(test)]
#[path = "verify_tests.rs"]
mod tests;
