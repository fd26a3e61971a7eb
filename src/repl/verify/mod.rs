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
//! Rate: [`VERIFY_PACING`], through the one pacing mechanism of
//! src/repl/resync/pacing.rs: at most a window of 2 to 8 chunks is between
//! "read queued" and "result received"; while an application write the
//! peer has not yet written is in the stream, and for 200 ms after, only
//! one chunk of 128 KiB is, followed by a pause as long as it took (at most
//! [`VERIFY_BUSY_PAUSE_MAX`]; application IO first; measured in
//! docs/verify.md).
//!
//! With two secondaries nothing writes: the source reads directly
//! (`ReadMode::Direct`) and the target compares at once. Differences:
//! both nodes mark them (`mark_range`), and the source renegotiates the
//! connection so that the resync decision moves them (docs/verify.md).
//!
//! Files: this one holds the pure parts (digests, compare, the source's
//! walk over the volume [`VerifySource`]) and the numbers; `status.rs` what
//! the engine keeps ([`VerifyCell`]: status, request, wake-up); `session.rs`
//! the verify of one session, a sub-state machine the session loops poll
//! (`SessionVerify`, state [`VerifyState`]). The operator's commands
//! (`request_verify`, `invalidate`) are the engine's
//! (src/repl/engine/commands.rs).
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
use std::time::Instant;

use bytes::Bytes;

pub use super::proto::VERIFY_DIGEST_LEN;
use super::resync::PacingParams;

mod session;
mod status;

pub(crate) use session::{After, ReadMode, SessionVerify, TargetJob};
pub use session::{VerifyOp, VerifyState, VerifyStateError};
pub use status::{VerifyCell, VerifyReport, VerifyStatus};

/// One block's digest.
pub type Digest = [u8; VERIFY_DIGEST_LEN];

/// Bytes read (and described by one VerifyDigests) at a time.
pub const VERIFY_CHUNK: u64 = 1 << 20;
/// The verify's pacing (src/repl/resync/pacing.rs): chunks of 1 MiB in a
/// window of 2 to 8 MiB (what it gets through in 20 ms; a write that
/// arrives while the window is full waits behind it, so it is kept short);
/// one chunk of 128 KiB for 200 ms after an application write waited, so a
/// write waits behind a 128 KiB read and hash, not a window of 1 MiB chunks.
pub const VERIFY_PACING: PacingParams = PacingParams {
    chunk: VERIFY_CHUNK,
    busy_chunk: 128 << 10,
    window_min: 2 * VERIFY_CHUNK,
    window_max: 8 * VERIFY_CHUNK,
    ahead: std::time::Duration::from_millis(20),
    hold: std::time::Duration::from_millis(200),
};
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

/// A verify was requested ([`crate::repl::engine::Engine::request_verify`]).
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

/// This node was invalidated ([`crate::repl::engine::Engine::invalidate`]): the disk is
/// `inconsistent` now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalidation {
    /// Bytes now marked out of sync (the whole volume).
    pub out_of_sync_bytes: u64,
    /// What happens next, for the operator.
    pub message: String,
}

#[cfg(test)]
mod tests;
