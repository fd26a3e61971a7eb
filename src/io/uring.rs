//! The io_uring engine.
//!
//! A batch handed to [`UringEngine::submit`] becomes one submission queue
//! entry per operation (`IORING_OP_WRITE`, `IORING_OP_READ`,
//! `IORING_OP_FSYNC` with `IORING_FSYNC_DATASYNC`, `IORING_OP_FALLOCATE`),
//! all pushed before a single `io_uring_enter` (one per ring-full for larger
//! batches), so that a whole group commit (WAL write + data writes) reaches
//! the kernel in one system call. Further `io_uring_enter` calls only wait
//! for completions not yet in (and resubmit the rest of short transfers).
//!
//! Rings are per thread: the volume calls the engine from several threads (the
//! log writer, the checkpointer, blocking read tasks); each lazily gets its own
//! 256-entry ring in a `thread_local!`, and no lock is taken on the IO path.
//!
//! # Guarantees of `submit`
//!
//! - Every operation of the batch has completed or failed when `submit`
//!   returns; the error returned is the one of the lowest-indexed failed
//!   operation. Buffers are borrowed for the duration of the call, and no
//!   submission queue entry referring to them outlives it.
//! - Batches larger than the ring are split; a full submission queue is
//!   back-pressure (submit, reap, push again), never an error.
//! - Short reads and writes are resubmitted for the remainder; a read that
//!   returns 0 before its buffer is full is [`io::ErrorKind::UnexpectedEof`],
//!   as with the sync engine.
//! - `EINTR`/`EAGAIN` from the kernel are retried (an `fdatasync` that failed
//!   with anything else is never retried: durability is the caller's business).
//! - A `fallocate` refused with `EOPNOTSUPP`, `EINVAL` or `ENODEV` (file
//!   systems or devices without hole punching or zero ranges, unaligned ranges
//!   on block devices) falls back to writing zeroes, as the sync engine does.
//!
//! # Availability
//!
//! [`probe`] decides once per process whether rings work here: it creates a
//! small ring, checks with `IORING_REGISTER_PROBE` that the four opcodes above
//! are supported, and round-trips a NOP. Rings are refused by the default
//! seccomp profiles of container runtimes (Docker, containerd), by
//! `sysctl kernel.io_uring_disabled=2` (or `=1` for processes outside
//! `kernel.io_uring_group`), and by kernels older than 5.6; in all those cases
//! the probe fails and `io_engine = "auto"` falls back to the sync engine with
//! a logged warning (see [`super::select_engine`]). Setting the environment
//! variable `REPBLOCK_DISABLE_IO_URING` to a non-empty value makes the probe
//! fail the same way, which is how tests exercise that fallback.
//!
//! Non-data calls (open, length, truncate, preallocate, rename, remove,
//! directory sync) are rare and use the same plain system calls as the sync
//! engine.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use io_uring::{IoUring, Probe, cqueue, opcode, squeue, types};

use super::{EngineKind, IoEngine, IoFile, IoOp, OpenMode, sync};

/// Environment variable that, when set to a non-empty value, makes [`probe`]
/// fail (and so `io_engine = "auto"` fall back to the sync engine).
pub const DISABLE_ENV: &str = "REPBLOCK_DISABLE_IO_URING";

/// Submission queue entries per thread ring.
const RING_ENTRIES: u32 = 256;

/// Largest transfer put in one SQE: Linux caps a single read or write at
/// `0x7fff_f000` bytes anyway; bigger buffers are completed as short transfers.
const MAX_RW: usize = 0x7fff_f000;

/// How long `EAGAIN`/`EBUSY` from `io_uring_enter` (kernel short of memory for
/// requests) is retried before the ring is given up.
const ENTER_RETRY_LIMIT: Duration = Duration::from_secs(10);

/// How many times one batch retries operations completed with `EAGAIN`.
const OP_RETRY_LIMIT: u32 = 100_000;

/// How long to wait for in-flight operations of a ring that `io_uring_enter`
/// no longer accepts before aborting the process (returning would let the
/// kernel write into buffers the caller has freed).
const ABANDON_WAIT: Duration = Duration::from_secs(60);

/// Checks once per process whether io_uring is usable here.
///
/// The result of the real probe is cached; [`DISABLE_ENV`] is looked at on
/// every call.
pub fn probe() -> io::Result<()> {
    if let Some(v) = std::env::var_os(DISABLE_ENV)
        && !v.is_empty()
    {
        return Err(io::Error::new(io::ErrorKind::Unsupported, format!("io_uring disabled by {DISABLE_ENV}")));
    }
    static PROBE: OnceLock<Result<(), (io::ErrorKind, String)>> = OnceLock::new();
    match PROBE.get_or_init(|| probe_uncached().map_err(|e| (e.kind(), e.to_string()))) {
        Ok(()) => Ok(()),
        Err((kind, msg)) => Err(io::Error::new(*kind, msg.clone())),
    }
}

fn probe_uncached() -> io::Result<()> {
    let mut ring: IoUring = IoUring::new(8).map_err(|e| ctx(e, "cannot create an io_uring"))?;
    let mut p = Probe::new();
    ring.submitter().register_probe(&mut p).map_err(|e| ctx(e, "IORING_REGISTER_PROBE failed"))?;
    for (code, name) in [
        (opcode::Read::CODE, "READ"),
        (opcode::Write::CODE, "WRITE"),
        (opcode::Fsync::CODE, "FSYNC"),
        (opcode::Fallocate::CODE, "FALLOCATE"),
    ] {
        if !p.is_supported(code) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("io_uring opcode IORING_OP_{name} not supported by this kernel"),
            ));
        }
    }
    let nop = opcode::Nop::new().build().user_data(0x4e4f50);
    // SAFETY: a NOP references no memory.
    unsafe { ring.submission().push(&nop) }.map_err(|_| io::Error::other("io_uring probe: submission queue full"))?;
    loop {
        match ring.submit_and_wait(1) {
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ctx(e, "io_uring_enter failed")),
        }
    }
    let cqe =
        ring.completion().next().ok_or_else(|| io::Error::other("io_uring probe: NOP submitted but no completion"))?;
    if cqe.result() < 0 {
        return Err(ctx(io::Error::from_raw_os_error(-cqe.result()), "io_uring NOP failed"));
    }
    Ok(())
}

fn ctx(e: io::Error, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

thread_local! {
    /// This thread's ring, created on first use.
    static RING: RefCell<Option<IoUring>> = const { RefCell::new(None) };
}

fn new_ring() -> io::Result<IoUring> {
    // A thread ring has one issuer, which also reaps: no need for the kernel
    // to interrupt it when completions arrive (COOP_TASKRUN, 5.19+;
    // SINGLE_ISSUER, 6.0+). Older kernels refuse the flags: plain ring then.
    match IoUring::builder().setup_coop_taskrun().setup_single_issuer().build(RING_ENTRIES) {
        Ok(ring) => Ok(ring),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            IoUring::new(RING_ENTRIES).map_err(|e| ctx(e, "cannot create this thread's io_uring"))
        }
        Err(e) => Err(ctx(e, "cannot create this thread's io_uring")),
    }
}

/// The io_uring engine (see the module documentation).
#[derive(Debug)]
pub struct UringEngine {
    /// Largest transfer per SQE; smaller in tests, to drive the
    /// short-transfer path with ordinary buffers.
    max_transfer: usize,
}

impl Default for UringEngine {
    fn default() -> UringEngine {
        UringEngine::new()
    }
}

impl UringEngine {
    /// Creates the engine. Rings are created lazily per thread; call
    /// [`probe`] first to know whether they can be.
    pub fn new() -> UringEngine {
        UringEngine { max_transfer: MAX_RW }
    }

    /// An engine that splits every read and write into transfers of at most
    /// `max` bytes, each completion looking like a short transfer.
    #[cfg(test)]
    pub(crate) fn with_max_transfer(max: usize) -> UringEngine {
        UringEngine { max_transfer: max.clamp(1, MAX_RW) }
    }
}

/// What happened to a ring during a batch.
enum RingState {
    /// The ring can be used again.
    Healthy,
    /// `io_uring_enter` failed persistently; entries may still sit in the
    /// submission queue with pointers to the caller's buffers. The ring must
    /// never be entered again: it is leaked.
    Broken,
}

impl IoEngine for UringEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::IoUring
    }

    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<IoFile> {
        sync::open_file(path, mode)
    }

    fn submit(&self, ops: &mut [IoOp<'_>]) -> io::Result<()> {
        if ops.is_empty() {
            return Ok(());
        }
        let on_thread_ring = RING.try_with(|cell| match cell.try_borrow_mut() {
            Ok(mut slot) => {
                let ring = match slot.as_mut() {
                    Some(r) => r,
                    None => slot.insert(new_ring()?),
                };
                let (state, res) = run_batch(ring, ops, self.max_transfer);
                if let RingState::Broken = state {
                    std::mem::forget(slot.take());
                }
                res
            }
            // Re-entered on this thread (e.g. from a tracing layer): use a
            // private ring for this call.
            Err(_) => run_on_temporary_ring(ops, self.max_transfer),
        });
        match on_thread_ring {
            Ok(res) => res,
            // Thread-local storage is being torn down (thread exit).
            Err(_) => run_on_temporary_ring(ops, self.max_transfer),
        }
    }

    fn len(&self, file: &IoFile) -> io::Result<u64> {
        sync::file_len(file)
    }

    fn set_len(&self, file: &IoFile, len: u64) -> io::Result<()> {
        file.std().set_len(len)
    }

    fn allocate(&self, file: &IoFile, len: u64) -> io::Result<()> {
        sync::fallocate(file, 0, 0, len)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        sync::sync_dir(dir)
    }
}

fn run_on_temporary_ring(ops: &mut [IoOp<'_>], max_transfer: usize) -> io::Result<()> {
    let mut ring = new_ring()?;
    let (state, res) = run_batch(&mut ring, ops, max_transfer);
    if let RingState::Broken = state {
        std::mem::forget(ring);
    }
    res
}

/// Length in bytes of the transfer an op still has to do (0 for non-transfers).
fn transfer_len(op: &IoOp<'_>) -> usize {
    match op {
        IoOp::Write { buf, .. } => buf.len(),
        IoOp::Read { buf, .. } => buf.len(),
        IoOp::SyncData { .. } | IoOp::Zero { .. } => 0,
    }
}

/// Builds the SQE for `op`, `done` bytes of which are already transferred.
fn build_sqe(op: &mut IoOp<'_>, done: usize, index: usize, max_transfer: usize) -> io::Result<squeue::Entry> {
    let entry = match op {
        IoOp::Write { file, offset, buf } => {
            let rest = &buf[done..];
            let n = rest.len().min(max_transfer);
            let off = file_offset(*offset, done)?;
            opcode::Write::new(types::Fd(file.raw_fd()), rest.as_ptr(), n as u32).offset(off).build()
        }
        IoOp::Read { file, offset, buf } => {
            let off = file_offset(*offset, done)?;
            let rest = &mut buf[done..];
            let n = rest.len().min(max_transfer);
            opcode::Read::new(types::Fd(file.raw_fd()), rest.as_mut_ptr(), n as u32).offset(off).build()
        }
        IoOp::SyncData { file } => {
            opcode::Fsync::new(types::Fd(file.raw_fd())).flags(types::FsyncFlags::DATASYNC).build()
        }
        IoOp::Zero { file, offset, len, punch } => {
            let mode = if *punch {
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
            } else {
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
            };
            opcode::Fallocate::new(types::Fd(file.raw_fd()), *len).offset(*offset).mode(mode).build()
        }
    };
    Ok(entry.user_data(index as u64))
}

fn file_offset(offset: u64, done: usize) -> io::Result<u64> {
    offset
        .checked_add(done as u64)
        .filter(|o| *o <= i64::MAX as u64)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Per-batch bookkeeping.
struct Batch {
    /// Bytes transferred so far, per op.
    done: Vec<usize>,
    /// Ops waiting for an SQE (new, or to be resubmitted).
    queue: VecDeque<usize>,
    /// Ops pushed to the submission queue but not yet consumed by the kernel,
    /// in push order (the kernel consumes in order).
    unsubmitted: VecDeque<usize>,
    /// Ops consumed by the kernel whose completion is not reaped yet.
    in_flight: usize,
    /// Lowest-indexed failure.
    first_err: Option<(usize, io::Error)>,
    eagain_retries: u32,
}

impl Batch {
    fn fail(&mut self, index: usize, e: io::Error) {
        match &self.first_err {
            Some((i, _)) if *i <= index => {}
            _ => self.first_err = Some((index, e)),
        }
    }
}

/// Aborts the process if a panic unwinds out of [`run_batch`] (a bug: nothing
/// in it is expected to panic): the kernel may still hold pointers into the
/// caller's buffers, which unwinding would free.
struct AbortOnUnwind {
    was_panicking: bool,
}

impl Drop for AbortOnUnwind {
    fn drop(&mut self) {
        if std::thread::panicking() && !self.was_panicking {
            eprintln!("repblock: panic during an io_uring batch with operations in flight; aborting");
            std::process::abort();
        }
    }
}

/// Runs `ops` to completion on `ring`. Never returns while the kernel may
/// still access a buffer of `ops`.
fn run_batch(ring: &mut IoUring, ops: &mut [IoOp<'_>], max_transfer: usize) -> (RingState, io::Result<()>) {
    let _abort_on_unwind = AbortOnUnwind { was_panicking: std::thread::panicking() };
    let cap = ring.params().sq_entries() as usize;
    let mut b = Batch {
        done: vec![0; ops.len()],
        queue: VecDeque::with_capacity(ops.len()),
        unsubmitted: VecDeque::new(),
        in_flight: 0,
        first_err: None,
        eagain_retries: 0,
    };
    for (i, op) in ops.iter().enumerate() {
        // Empty transfers complete at once, as with pread/pwrite.
        let empty = matches!(op, IoOp::Write { .. } | IoOp::Read { .. }) && transfer_len(op) == 0;
        if !empty {
            b.queue.push_back(i);
        }
    }

    let mut enter_busy_since: Option<Instant> = None;
    loop {
        // Push as many SQEs as the ring takes. Outstanding entries (pushed or
        // in flight) are kept at most `cap`, so the completion queue (twice
        // as large) can never overflow.
        {
            let mut sq = ring.submission();
            while b.unsubmitted.len() + b.in_flight < cap {
                let Some(&i) = b.queue.front() else { break };
                let Some(op) = ops.get_mut(i) else {
                    b.queue.pop_front();
                    continue;
                };
                let sqe = match build_sqe(op, b.done[i], i, max_transfer) {
                    Ok(sqe) => sqe,
                    Err(e) => {
                        b.queue.pop_front();
                        b.fail(i, e);
                        continue;
                    }
                };
                // SAFETY: the SQE points into a buffer of `ops`, borrowed
                // (mutably for reads) for the whole of `submit`; `run_batch`
                // does not return before the completion of every SQE the
                // kernel consumed, and a ring left with unconsumed entries is
                // leaked, never entered again (`RingState::Broken`). Each op
                // has at most one SQE outstanding, so no two in-flight SQEs
                // alias one buffer.
                if unsafe { sq.push(&sqe) }.is_err() {
                    break;
                }
                b.queue.pop_front();
                b.unsubmitted.push_back(i);
            }
        }
        if b.unsubmitted.is_empty() && b.in_flight == 0 {
            if b.queue.is_empty() {
                break;
            }
            // Cannot happen (cap > 0 and nothing outstanding), but never spin.
            let e = io::Error::other("io_uring submission queue refused an entry with nothing outstanding");
            return abandon(ring, ops, &mut b, e);
        }

        match ring.submit_and_wait(1) {
            Ok(_) => enter_busy_since = None,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EBUSY)) => {
                let since = *enter_busy_since.get_or_insert_with(Instant::now);
                if since.elapsed() > ENTER_RETRY_LIMIT {
                    return abandon(ring, ops, &mut b, ctx(e, "io_uring_enter kept failing"));
                }
                // Completions below may free kernel resources; if there
                // are none yet, give the kernel a moment.
                if ring.completion().is_empty() {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            Err(e) => return abandon(ring, ops, &mut b, ctx(e, "io_uring_enter failed")),
        }

        account_consumed(ring, &mut b);
        for cqe in &mut ring.completion() {
            b.in_flight = b.in_flight.saturating_sub(1);
            complete(ops, &mut b, cqe);
        }
    }
    (RingState::Healthy, b.first_err.map_or(Ok(()), |(_, e)| Err(e)))
}

/// Moves the ops the kernel consumed from `unsubmitted` to in flight.
fn account_consumed(ring: &mut IoUring, b: &mut Batch) {
    let still_queued = ring.submission().len();
    while b.unsubmitted.len() > still_queued {
        b.unsubmitted.pop_front();
        b.in_flight += 1;
    }
}

/// Handles one completion.
fn complete(ops: &mut [IoOp<'_>], b: &mut Batch, cqe: cqueue::Entry) {
    let i = cqe.user_data() as usize;
    let res = cqe.result();
    let Some(op) = ops.get(i) else {
        tracing::error!(user_data = i, "io_uring completion for an unknown operation");
        return;
    };
    if res < 0 {
        let errno = -res;
        if errno == libc::EINTR || errno == libc::EAGAIN {
            b.eagain_retries += 1;
            if b.eagain_retries <= OP_RETRY_LIMIT {
                b.queue.push_back(i);
                return;
            }
        }
        if let IoOp::Zero { file, offset, len, punch } = op
            && matches!(errno, libc::EOPNOTSUPP | libc::EINVAL | libc::ENODEV)
        {
            // No hole punching / zero ranges here (or an unaligned range on
            // a block device): write zeroes, as the sync engine does.
            if let Err(e) = sync::zero_range(file, *offset, *len, *punch) {
                b.fail(i, e);
            }
            return;
        }
        b.fail(i, io::Error::from_raw_os_error(errno));
        return;
    }
    let total = transfer_len(op);
    match op {
        IoOp::Write { .. } | IoOp::Read { .. } => {
            let n = res as usize;
            if n == 0 {
                let e = if matches!(op, IoOp::Read { .. }) {
                    io::Error::new(io::ErrorKind::UnexpectedEof, "failed to fill whole buffer")
                } else {
                    io::Error::new(io::ErrorKind::WriteZero, "failed to write whole buffer")
                };
                b.fail(i, e);
                return;
            }
            b.done[i] = (b.done[i] + n).min(total);
            if b.done[i] < total {
                b.queue.push_back(i);
            }
        }
        IoOp::SyncData { .. } | IoOp::Zero { .. } => {}
    }
}

/// `io_uring_enter` no longer works on `ring`: fail everything not done,
/// wait for what the kernel already holds, and mark the ring broken.
fn abandon(ring: &mut IoUring, ops: &mut [IoOp<'_>], b: &mut Batch, e: io::Error) -> (RingState, io::Result<()>) {
    tracing::error!(error = %e, in_flight = b.in_flight, "io_uring ring abandoned");
    account_consumed(ring, b);
    let started = Instant::now();
    while b.in_flight > 0 {
        let cqes: Vec<cqueue::Entry> = ring.completion().collect();
        if cqes.is_empty() {
            if started.elapsed() > ABANDON_WAIT {
                tracing::error!(in_flight = b.in_flight, "io_uring operations never completed; aborting");
                // Returning would let the kernel write into freed buffers.
                std::process::abort();
            }
            // Sleeping returns to user space, which runs pending task work
            // (how many completions are posted).
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        for cqe in cqes {
            b.in_flight -= 1;
            let i = cqe.user_data() as usize;
            if cqe.result() < 0 {
                b.fail(i, io::Error::from_raw_os_error(-cqe.result()));
            } else if let Some(op) = ops.get(i) {
                let total = transfer_len(op);
                b.done[i] += cqe.result() as usize;
                if b.done[i] < total {
                    b.fail(i, io::Error::new(e.kind(), e.to_string()));
                }
            }
        }
    }
    let not_done: Vec<usize> = b.queue.drain(..).chain(b.unsubmitted.drain(..)).collect();
    for i in not_done {
        b.fail(i, io::Error::new(e.kind(), e.to_string()));
    }
    let res = match b.first_err.take() {
        Some((_, err)) => Err(err),
        None => Err(e),
    };
    (RingState::Broken, res)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The private-ring path (re-entrance, thread teardown) runs batches
    /// like the thread ring does.
    #[test]
    fn temporary_ring_runs_a_batch() {
        if let Err(e) = probe() {
            if std::env::var_os(DISABLE_ENV).is_some_and(|v| !v.is_empty()) {
                eprintln!("skipped: {e}");
                return;
            }
            panic!("io_uring unavailable: {e}");
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let f = sync::open_file(&dir.path().join("f"), OpenMode::CREATE_NEW).expect("open");
        let data: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        let bufs: Vec<&[u8]> = data.chunks(7).collect();
        let mut ops: Vec<IoOp<'_>> =
            bufs.iter().enumerate().map(|(i, b)| IoOp::Write { file: &f, offset: i as u64 * 7, buf: b }).collect();
        ops.push(IoOp::SyncData { file: &f });
        run_on_temporary_ring(&mut ops, 3).expect("batch of 430 ops on a private ring");
        drop(ops);
        let mut back = vec![0u8; data.len()];
        run_on_temporary_ring(&mut [IoOp::Read { file: &f, offset: 0, buf: &mut back }], MAX_RW).expect("read");
        assert_eq!(back, data);
    }

    #[test]
    fn offsets_beyond_the_kernel_range_are_einval() {
        assert_eq!(file_offset(u64::MAX, 1).map_err(|e| e.raw_os_error()), Err(Some(libc::EINVAL)));
        assert_eq!(file_offset(i64::MAX as u64 + 1, 0).map_err(|e| e.raw_os_error()), Err(Some(libc::EINVAL)));
        assert_eq!(file_offset(10, 5).ok(), Some(15));
    }
}
