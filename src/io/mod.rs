//! The IO engine: every file access of the volume goes through [`IoEngine`].
//!
//! Two real engines implement it:
//! - [`sync::SyncEngine`]: plain `pread`/`pwritev`/`fdatasync`/`fallocate`.
//!   Always available; the fallback.
//! - [`uring::UringEngine`]: io_uring (the `io-uring` crate), batching a whole
//!   group commit (WAL write + data writes) into one submission.
//!
//! and one wrapper for tests, `fault::FaultEngine`, which injects EIO,
//! ENOSPC, torn writes and the loss of unsynced data (a simulated power cut).
//! It is compiled only for unit tests and with the `fault-injection` feature,
//! so a release `repd` has no fault hook.
//!
//! The engine is chosen at start by [`select_engine`]: `auto` probes io_uring
//! once (rings are refused by containers' default seccomp profiles and by
//! hardened kernels) and falls back to the sync engine, logging which one runs
//! and why.
//!
//! The trait is synchronous on purpose: the volume drives it from its own
//! threads (the log writer, the checkpointer, blocking read tasks), where a
//! blocking call is the natural completion path for both engines.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

#[cfg(any(test, feature = "fault-injection"))]
pub mod fault;
pub mod sync;
pub mod uring;

/// An open file (or block device) handed out by an [`IoEngine`].
///
/// The `id` is unique per process and lets wrappers such as the fault engine
/// keep per-file state without comparing paths.
#[derive(Debug)]
pub struct IoFile {
    file: File,
    path: PathBuf,
    id: u64,
}

static NEXT_FILE_ID: AtomicU64 = AtomicU64::new(1);

impl IoFile {
    /// Wraps an already open file.
    pub fn new(file: File, path: impl Into<PathBuf>) -> IoFile {
        IoFile { file, path: path.into(), id: NEXT_FILE_ID.fetch_add(1, Ordering::Relaxed) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    pub fn std(&self) -> &File {
        &self.file
    }
}

/// How to open a file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpenMode {
    /// Open for writing as well as reading.
    pub write: bool,
    /// Create the file if it does not exist.
    pub create: bool,
    /// Fail if the file already exists (implies `create`).
    pub create_new: bool,
}

impl OpenMode {
    pub const READ: OpenMode = OpenMode { write: false, create: false, create_new: false };
    pub const READ_WRITE: OpenMode = OpenMode { write: true, create: false, create_new: false };
    pub const CREATE: OpenMode = OpenMode { write: true, create: true, create_new: false };
    pub const CREATE_NEW: OpenMode = OpenMode { write: true, create: true, create_new: true };
}

/// One operation of a batch submitted with [`IoEngine::submit`].
#[derive(Debug)]
pub enum IoOp<'a> {
    /// Write all of `buf` at `offset`.
    Write { file: &'a IoFile, offset: u64, buf: &'a [u8] },
    /// Fill all of `buf` from `offset` (a short read is `UnexpectedEof`).
    Read { file: &'a IoFile, offset: u64, buf: &'a mut [u8] },
    /// `fdatasync` the file.
    SyncData { file: &'a IoFile },
    /// Make `[offset, offset+len)` read as zeroes: punch a hole when
    /// `punch` is set (deallocate), otherwise keep the blocks allocated.
    Zero { file: &'a IoFile, offset: u64, len: u64, punch: bool },
}

/// Which engine runs; serialised as it is displayed (`status.io_engine`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum EngineKind {
    #[serde(rename = "sync")]
    Sync,
    #[serde(rename = "io_uring")]
    IoUring,
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EngineKind::Sync => "sync",
            EngineKind::IoUring => "io_uring",
        })
    }
}

/// The engine asked for in the config (`io_engine`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EngineChoice {
    /// Probe io_uring; fall back to `sync` when it is unavailable.
    #[default]
    Auto,
    /// io_uring, or refuse to start.
    IoUring,
    /// Plain pread/pwritev/fdatasync.
    Sync,
}

/// File IO. Every file access of the volume goes through this trait, so that
/// tests can inject faults.
///
/// All methods are blocking. Implementations are shared between threads.
/// Durability is the caller's business: a failed [`IoEngine::sync_data`] must
/// never be retried and forgotten (the volume fails stop).
pub trait IoEngine: Send + Sync + fmt::Debug + 'static {
    fn kind(&self) -> EngineKind;

    /// Opens (or creates) a file or block device.
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<IoFile>;

    /// Runs a batch of operations; returns the first error, after every
    /// operation of the batch has completed or failed. The order in which the
    /// operations reach the disk is unspecified: a caller that needs one
    /// operation to be durable before another starts submits two batches.
    fn submit(&self, ops: &mut [IoOp<'_>]) -> io::Result<()>;

    /// Length of a file, or size of a block device, in bytes.
    fn len(&self, file: &IoFile) -> io::Result<u64>;

    /// Sets the length of a regular file (sparse).
    fn set_len(&self, file: &IoFile, len: u64) -> io::Result<()>;

    /// Preallocates `[0, len)` (`fallocate`; the file grows to `len`).
    fn allocate(&self, file: &IoFile, len: u64) -> io::Result<()>;

    /// Renames a file; the caller syncs the directory.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;

    /// Removes a file; the caller syncs the directory.
    fn remove(&self, path: &Path) -> io::Result<()>;

    /// `fsync`s a directory so that creations, renames and removals in it
    /// are durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;

    // Convenience wrappers over `submit`.

    fn read_exact_at(&self, file: &IoFile, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.submit(&mut [IoOp::Read { file, offset, buf }])
    }

    fn write_all_at(&self, file: &IoFile, buf: &[u8], offset: u64) -> io::Result<()> {
        self.submit(&mut [IoOp::Write { file, offset, buf }])
    }

    fn sync_data(&self, file: &IoFile) -> io::Result<()> {
        self.submit(&mut [IoOp::SyncData { file }])
    }

    fn zero(&self, file: &IoFile, offset: u64, len: u64, punch: bool) -> io::Result<()> {
        self.submit(&mut [IoOp::Zero { file, offset, len, punch }])
    }
}

/// Errors from choosing an engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("io_engine = \"io_uring\" but io_uring is unavailable: {0}")]
    UringUnavailable(io::Error),
}

/// Chooses the engine for `choice`, probing io_uring when asked to, and logs
/// the outcome.
pub fn select_engine(choice: EngineChoice) -> Result<Arc<dyn IoEngine>, EngineError> {
    match choice {
        EngineChoice::Sync => {
            tracing::info!(engine = "sync", "IO engine selected by config");
            Ok(Arc::new(sync::SyncEngine::new()))
        }
        EngineChoice::IoUring => match uring::probe() {
            Ok(()) => {
                tracing::info!(engine = "io_uring", "IO engine selected by config");
                Ok(Arc::new(uring::UringEngine::new()))
            }
            Err(e) => Err(EngineError::UringUnavailable(e)),
        },
        EngineChoice::Auto => match uring::probe() {
            Ok(()) => {
                tracing::info!(engine = "io_uring", "IO engine selected: io_uring probe succeeded");
                Ok(Arc::new(uring::UringEngine::new()))
            }
            Err(e) => {
                tracing::warn!(engine = "sync", error = %e, "io_uring unavailable, falling back to pwritev/fdatasync");
                Ok(Arc::new(sync::SyncEngine::new()))
            }
        },
    }
}

/// Maps an IO error to the raw errno it carries, EIO when it carries none.
pub fn errno_of(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

#[cfg(test)]
mod tests;
