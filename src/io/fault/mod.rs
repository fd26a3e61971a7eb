//! Fault-injecting wrapper engine, for tests.
//!
//! [`FaultEngine`] wraps any [`IoEngine`] and can:
//! - fail every `SyncData` from the (n+1)-th on with an errno
//!   ([`FaultEngine::fail_sync_after`]), as a disk that reports a write-back
//!   error does;
//! - fail every `Write` from the (n+1)-th on ([`FaultEngine::fail_writes_after`]),
//!   e.g. with `ENOSPC` or `EIO`;
//! - simulate a power cut ([`FaultEngine::power_cut`]): unsynced writes are lost
//!   or kept, per 512-byte sector, at random (seeded).
//!
//! # How the power cut is modelled
//!
//! For every file written through the engine (per inode, whichever
//! descriptor writes or syncs it, as the page cache is), an undo log records each write
//! and zero range not yet covered by a successful `SyncData` of that file: the
//! offset and the bytes it overwrote (read through the inner engine just
//! before the write; bytes beyond end of file count as zeroes), and the
//! file's length before the first of them. A `SyncData` that succeeds covers
//! the operations of *earlier* batches only (the order of operations inside
//! one batch is unspecified by [`IoEngine::submit`], so a sync never covers a
//! write submitted in the same batch); an injected or real sync failure covers
//! nothing.
//!
//! At the cut, for every recorded operation (newest first) and every 512-byte
//! sector it touches, a seeded coin decides whether that part reached the disk.
//! A sector's final content is the one written by the newest operation whose
//! part was kept, or, if none was, the content it had at the last sync. So a
//! multi-sector write can be torn, and a later write can survive while an
//! earlier one does not, as with a page cache written back in any order.
//! Synced data is never touched. A file that grew through unsynced writes is
//! truncated back to the largest of its synced length and the end of the
//! furthest kept part.
//!
//! From the cut on, every operation fails with `EIO` until
//! [`FaultEngine::clear_faults`].
//!
//! # Limits
//!
//! - Files created (or renamed, or removed) since the last `sync_dir` of their
//!   directory do not vanish (or come back) at a power cut.
//! - `set_len` and `allocate` take effect at once and are treated as durable.
//! - The bytes overwritten by a zero range are read into memory; zeroing huge
//!   ranges of non-zero data through this engine costs that much memory (runs of
//!   zeroes are stored compactly).
//!
//! # From the environment
//!
//! [`wrap_from_env`] wraps an engine according to the test-only variable
//! `REPBLOCK_FAULTS`, so integration tests can inject faults into a real
//! `repd` process.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{EngineKind, IoEngine, IoFile, IoOp, OpenMode};

mod env;

pub use env::{FaultSpec, parse_fault_spec, wrap_from_env, wrap_with_spec};

/// Granularity at which a power cut keeps or loses unsynced data.
pub const SECTOR: u64 = 512;

/// Environment variable read by [`wrap_from_env`].
pub const FAULTS_ENV: &str = "REPBLOCK_FAULTS";

/// What a [`FaultEngine::power_cut`] did to unsynced operations (writes and
/// zero ranges).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PowerCutReport {
    /// Operations whose every sector was reverted.
    pub writes_reverted: u64,
    /// Operations whose every sector was kept.
    pub writes_kept: u64,
    /// Operations with some sectors kept and some reverted.
    pub writes_torn: u64,
    /// Sector-sized parts of operations reverted.
    pub sectors_reverted: u64,
    /// Sector-sized parts of operations kept.
    pub sectors_kept: u64,
}

/// An injected failure: operations numbered `after` and later (0-based,
/// counted from when it was set) fail with `errno`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fault {
    after: u64,
    errno: i32,
}

/// Bytes an operation overwrote, stored sparsely: only the non-zero chunks.
#[derive(Debug)]
struct Undo {
    offset: u64,
    len: u64,
    /// (offset relative to `offset`, bytes); everything else was zero.
    chunks: Vec<(u64, Vec<u8>)>,
}

impl Undo {
    /// The old bytes of `[from, to)` (absolute offsets inside the operation).
    fn old_bytes(&self, from: u64, to: u64) -> Vec<u8> {
        let mut out = vec![0u8; (to - from) as usize];
        for (rel, bytes) in &self.chunks {
            let start = self.offset + rel;
            let end = start + bytes.len() as u64;
            let (a, b) = (start.max(from), end.min(to));
            if a < b {
                out[(a - from) as usize..(b - from) as usize]
                    .copy_from_slice(&bytes[(a - start) as usize..(b - start) as usize]);
            }
        }
        out
    }
}

/// Unsynced state of one file.
#[derive(Debug)]
struct Unsynced {
    /// A duplicate of the caller's descriptor, used to revert at a power cut.
    file: IoFile,
    /// Length of the file as of its last sync (or `set_len`/`allocate`).
    durable_len: u64,
    /// Unsynced operations, oldest first.
    undo: Vec<Undo>,
}

#[derive(Debug)]
struct State {
    rng: StdRng,
    syncs: u64,
    writes: u64,
    sync_fault: Option<Fault>,
    write_fault: Option<Fault>,
    powered_off: bool,
    /// Per file (the id of the first descriptor seen for its inode); a
    /// BTreeMap so that a power cut draws its random numbers in a
    /// deterministic order.
    files: BTreeMap<u64, Unsynced>,
    /// Inode (device, number) to the id its unsynced state is kept under:
    /// an fdatasync through any descriptor makes the writes of every
    /// descriptor of the file durable (the page cache is per inode).
    inodes: std::collections::HashMap<(u64, u64), u64>,
}

impl State {
    /// The key of `file` in `files`.
    fn key(&mut self, file: &IoFile) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        let m = file.std().metadata()?;
        Ok(*self.inodes.entry((m.dev(), m.ino())).or_insert(file.id()))
    }
}

/// The fault-injecting engine (see the module documentation).
pub struct FaultEngine {
    inner: Arc<dyn IoEngine>,
    /// Every operation runs under this lock, so a power cut is atomic with
    /// respect to in-flight operations.
    state: Mutex<State>,
}

impl fmt::Debug for FaultEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultEngine").field("inner", &self.inner).finish_non_exhaustive()
    }
}

fn eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

impl FaultEngine {
    /// Wraps `inner`; `seed` drives the power cut's choices.
    pub fn new(inner: Arc<dyn IoEngine>, seed: u64) -> Arc<FaultEngine> {
        Arc::new(FaultEngine {
            inner,
            state: Mutex::new(State {
                rng: StdRng::seed_from_u64(seed),
                syncs: 0,
                writes: 0,
                sync_fault: None,
                write_fault: None,
                powered_off: false,
                files: BTreeMap::new(),
                inodes: std::collections::HashMap::new(),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; if something did, the state
        // is still consistent enough for a test double.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fail the (n+1)-th and every later `SyncData` with `errno` (0-based
    /// count of syncs from now).
    pub fn fail_sync_after(&self, n: u64, errno: i32) {
        let mut st = self.lock();
        st.syncs = 0;
        st.sync_fault = Some(Fault { after: n, errno });
        tracing::warn!(after = n, errno, "fault injection: SyncData will fail");
    }

    /// Fail the (n+1)-th and every later `Write` with `errno` (e.g. ENOSPC, EIO).
    pub fn fail_writes_after(&self, n: u64, errno: i32) {
        let mut st = self.lock();
        st.writes = 0;
        st.write_fault = Some(Fault { after: n, errno });
        tracing::warn!(after = n, errno, "fault injection: Write will fail");
    }

    /// Simulated power cut: from now on every operation fails with EIO; every
    /// write not yet covered by a successful SyncData of its file is, chosen
    /// at random (seeded) per 512-byte sector: kept, or reverted to the
    /// content it overwrote (so a multi-sector write can be torn, and later
    /// writes may survive while earlier unsynced ones do not — as a real page
    /// cache does). Synced data is never touched. Returns a summary (writes
    /// reverted / kept / torn).
    pub fn power_cut(&self) -> PowerCutReport {
        let mut st = self.lock();
        st.powered_off = true;
        let files = std::mem::take(&mut st.files);
        let mut report = PowerCutReport::default();
        for (_, u) in files {
            self.cut_file(&mut st.rng, u, &mut report);
        }
        tracing::warn!(
            reverted = report.writes_reverted,
            kept = report.writes_kept,
            torn = report.writes_torn,
            "fault injection: power cut"
        );
        report
    }

    fn cut_file(&self, rng: &mut StdRng, u: Unsynced, report: &mut PowerCutReport) {
        // Byte ranges whose final content is decided (a newer kept part).
        let mut resolved = RangeSet::default();
        let mut keep_len = u.durable_len;
        for undo in u.undo.iter().rev() {
            let (mut kept, mut reverted) = (0u64, 0u64);
            for (a, b) in sector_parts(undo.offset, undo.len) {
                let open = resolved.gaps(a, b);
                if rng.random_bool(0.5) {
                    kept += 1;
                    // Where no newer part was kept, every newer operation has
                    // been reverted: the file holds this operation's data.
                    if let Some(&(_, end)) = open.last() {
                        keep_len = keep_len.max(end);
                    }
                    resolved.insert(a, b);
                } else {
                    reverted += 1;
                    for (x, y) in open {
                        let old = undo.old_bytes(x, y);
                        if let Err(e) = self.inner.write_all_at(&u.file, &old, x) {
                            tracing::error!(path = %u.file.path().display(), offset = x, error = %e,
                                "power cut: cannot revert unsynced data");
                        }
                    }
                }
            }
            report.sectors_kept += kept;
            report.sectors_reverted += reverted;
            match (kept, reverted) {
                (_, 0) => report.writes_kept += 1,
                (0, _) => report.writes_reverted += 1,
                _ => report.writes_torn += 1,
            }
        }
        match self.inner.len(&u.file) {
            Ok(len) if len > keep_len => {
                if let Err(e) = self.inner.set_len(&u.file, keep_len) {
                    tracing::error!(path = %u.file.path().display(), len = keep_len, error = %e,
                        "power cut: cannot restore file length");
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(path = %u.file.path().display(), error = %e, "power cut: cannot read file length")
            }
        }
    }

    /// Clears injected faults and the powered-off state (the "machine" is back).
    pub fn clear_faults(&self) {
        let mut st = self.lock();
        st.sync_fault = None;
        st.write_fault = None;
        st.syncs = 0;
        st.writes = 0;
        st.powered_off = false;
    }

    /// Reads the bytes `[offset, offset+len)` of `file` as they are now,
    /// clipped to the file's length (the rest counts as zeroes).
    fn capture(&self, file: &IoFile, file_len: u64, offset: u64, len: u64) -> io::Result<Undo> {
        const CHUNK: u64 = 1 << 20;
        let mut chunks = Vec::new();
        let end = offset.saturating_add(len).min(file_len);
        let mut pos = offset;
        while pos < end {
            let n = (end - pos).min(CHUNK);
            let mut buf = vec![0u8; n as usize];
            self.inner.read_exact_at(file, &mut buf, pos)?;
            if buf.iter().any(|&b| b != 0) {
                chunks.push((pos - offset, buf));
            }
            pos += n;
        }
        Ok(Undo { offset, len, chunks })
    }
}

/// Splits `[offset, offset+len)` at 512-byte sector boundaries.
fn sector_parts(offset: u64, len: u64) -> impl Iterator<Item = (u64, u64)> {
    let end = offset.saturating_add(len);
    let mut pos = offset;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let next = ((pos / SECTOR + 1) * SECTOR).min(end);
        let part = (pos, next);
        pos = next;
        Some(part)
    })
}

/// A set of disjoint half-open byte ranges.
#[derive(Debug, Default)]
struct RangeSet {
    /// start -> end, disjoint and non-adjacent.
    ranges: BTreeMap<u64, u64>,
}

impl RangeSet {
    fn insert(&mut self, mut a: u64, mut b: u64) {
        // Merge with every range that overlaps or touches [a, b).
        let touching: Vec<(u64, u64)> =
            self.ranges.range(..=b).rev().take_while(|&(_, &e)| e >= a).map(|(&s, &e)| (s, e)).collect();
        for (s, e) in touching {
            self.ranges.remove(&s);
            a = a.min(s);
            b = b.max(e);
        }
        self.ranges.insert(a, b);
    }

    /// The parts of `[a, b)` not in the set, in order.
    fn gaps(&self, a: u64, b: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut pos = a;
        // The range starting at or before `a` may cover its beginning.
        let first = self.ranges.range(..=a).next_back().map(|(&s, &e)| (s, e));
        let rest = self.ranges.range(a.saturating_add(1)..b).map(|(&s, &e)| (s, e));
        for (s, e) in first.into_iter().chain(rest) {
            if e <= pos {
                continue;
            }
            if s > pos {
                out.push((pos, s.min(b)));
            }
            pos = pos.max(e);
            if pos >= b {
                break;
            }
        }
        if pos < b {
            out.push((pos, b));
        }
        out
    }
}

impl IoEngine for FaultEngine {
    fn kind(&self) -> EngineKind {
        self.inner.kind()
    }

    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<IoFile> {
        let st = self.lock();
        if st.powered_off {
            return Err(eio());
        }
        self.inner.open(path, mode)
    }

    fn submit(&self, ops: &mut [IoOp<'_>]) -> io::Result<()> {
        let mut st = self.lock();
        if st.powered_off {
            return Err(eio());
        }

        // Decide injected failures.
        let mut injected: Vec<Option<i32>> = Vec::with_capacity(ops.len());
        for op in ops.iter() {
            let fail = match op {
                IoOp::Write { .. } => {
                    let n = st.writes;
                    st.writes += 1;
                    st.write_fault.filter(|f| n >= f.after).map(|f| f.errno)
                }
                IoOp::SyncData { .. } => {
                    let n = st.syncs;
                    st.syncs += 1;
                    st.sync_fault.filter(|f| n >= f.after).map(|f| f.errno)
                }
                IoOp::Read { .. } | IoOp::Zero { .. } => None,
            };
            injected.push(fail);
        }

        // Unsynced operations per file before this batch: what a sync in
        // this batch covers.
        let before: BTreeMap<u64, usize> = st.files.iter().map(|(&id, u)| (id, u.undo.len())).collect();

        // Capture what the batch's writes and zero ranges will overwrite.
        let mut undos: Vec<(u64, Undo)> = Vec::new();
        for (op, fail) in ops.iter().zip(&injected) {
            if fail.is_some() {
                continue;
            }
            let (file, offset, len) = match op {
                IoOp::Write { file, offset, buf } => (*file, *offset, buf.len() as u64),
                IoOp::Zero { file, offset, len, .. } => (*file, *offset, *len),
                IoOp::Read { .. } | IoOp::SyncData { .. } => continue,
            };
            if offset.checked_add(len).is_none_or(|end| end > i64::MAX as u64) {
                // Beyond what the kernel accepts: the operation fails and
                // changes nothing.
                continue;
            }
            let file_len = self.inner.len(file)?;
            let key = st.key(file)?;
            if let std::collections::btree_map::Entry::Vacant(v) = st.files.entry(key) {
                let dup = IoFile::new(file.std().try_clone()?, file.path());
                v.insert(Unsynced { file: dup, durable_len: file_len, undo: Vec::new() });
            }
            // A zero range keeps the size: nothing beyond end of file changes.
            let len = if matches!(op, IoOp::Zero { .. }) { len.min(file_len.saturating_sub(offset)) } else { len };
            if len > 0 {
                undos.push((key, self.capture(file, file_len, offset, len)?));
            }
        }

        // The files this batch syncs (if it succeeds).
        let mut synced = Vec::new();
        for (op, fail) in ops.iter().zip(&injected) {
            if let (IoOp::SyncData { file }, None) = (op, fail) {
                synced.push(st.key(file)?);
            }
        }

        // Run what is not failed by injection.
        let mut pass: Vec<IoOp<'_>> = ops
            .iter_mut()
            .zip(&injected)
            .filter(|(_, fail)| fail.is_none())
            .map(|(op, _)| match op {
                IoOp::Write { file, offset, buf } => IoOp::Write { file, offset: *offset, buf },
                IoOp::Read { file, offset, buf } => IoOp::Read { file, offset: *offset, buf },
                IoOp::SyncData { file } => IoOp::SyncData { file },
                IoOp::Zero { file, offset, len, punch } => {
                    IoOp::Zero { file, offset: *offset, len: *len, punch: *punch }
                }
            })
            .collect();
        let res = if pass.is_empty() { Ok(()) } else { self.inner.submit(&mut pass) };
        drop(pass);

        // Record the batch's operations (even if the batch failed: reverting
        // to the old content is a possible outcome either way).
        for (id, undo) in undos {
            if let Some(u) = st.files.get_mut(&id) {
                u.undo.push(undo);
            }
        }

        // A successful batch makes the earlier operations of its synced files
        // durable. A failed one may have failed on the sync: nothing is.
        if res.is_ok() {
            for id in synced {
                let covered = before.get(&id).copied().unwrap_or(0);
                let Some(u) = st.files.get_mut(&id) else { continue };
                let covered = covered.min(u.undo.len());
                for undo in u.undo.drain(..covered) {
                    // A zero range's length was clipped to the file: only
                    // writes can extend it.
                    u.durable_len = u.durable_len.max(undo.offset.saturating_add(undo.len));
                }
                if u.undo.is_empty() {
                    st.files.remove(&id);
                }
            }
        }

        let first_injected = injected.iter().flatten().next().copied();
        match (first_injected, res) {
            (Some(errno), _) => Err(io::Error::from_raw_os_error(errno)),
            (None, res) => res,
        }
    }

    fn len(&self, file: &IoFile) -> io::Result<u64> {
        let st = self.lock();
        if st.powered_off {
            return Err(eio());
        }
        self.inner.len(file)
    }

    fn set_len(&self, file: &IoFile, len: u64) -> io::Result<()> {
        let mut st = self.lock();
        if st.powered_off {
            return Err(eio());
        }
        self.inner.set_len(file, len)?;
        let key = st.key(file)?;
        if let Some(u) = st.files.get_mut(&key) {
            u.durable_len = len;
        }
        Ok(())
    }

    fn allocate(&self, file: &IoFile, len: u64) -> io::Result<()> {
        let mut st = self.lock();
        if st.powered_off {
            return Err(eio());
        }
        self.inner.allocate(file, len)?;
        let key = st.key(file)?;
        if let Some(u) = st.files.get_mut(&key) {
            u.durable_len = u.durable_len.max(len);
        }
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let st = self.lock();
        if st.powered_off {
            return Err(eio());
        }
        self.inner.rename(from, to)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let st = self.lock();
        if st.powered_off {
            return Err(eio());
        }
        self.inner.remove(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let st = self.lock();
        if st.powered_off {
            return Err(eio());
        }
        self.inner.sync_dir(dir)
    }
}

#[cfg(test)]
mod tests;
