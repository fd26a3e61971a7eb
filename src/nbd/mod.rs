//! The NBD front end: protocol codec ([`proto`]), server ([`server`]), and a
//! small async client ([`client`]) used by tests and benchmarks.
//!
//! The server is generic over a [`BlockBackend`]; the node provides one on
//! top of the volume and the replication engine's reply gate
//! (`node::backend`). `memory::MemoryBackend` (feature `testkit`) is an
//! in-memory one for tests and benchmarks.

use std::future::Future;

use bytes::Bytes;

pub mod client;
#[cfg(any(test, feature = "testkit"))]
pub mod memory;
pub mod proto;
pub mod server;
mod wire;

pub use client::{ClientError, NbdClient};
#[cfg(any(test, feature = "testkit"))]
pub use memory::MemoryBackend;
pub use server::{ListenAddr, ListenAddrError, NbdHandle, NbdServer, NbdTls, ServerConfig};

/// Errors a backend returns; mapped to NBD errno values in one place
/// ([`BlockError::nbd_errno`]).
#[derive(Debug, Clone, thiserror::Error)]
pub enum BlockError {
    /// The backing store failed (EIO).
    #[error("IO error: {0}")]
    Io(String),
    /// No space left (ENOSPC).
    #[error("No space left: {0}")]
    NoSpace(String),
    /// Invalid request (EINVAL).
    #[error("Invalid request: {0}")]
    Invalid(String),
    /// The volume stopped taking writes, or the node is shutting down or
    /// demoting (ESHUTDOWN).
    #[error("Shutting down: {0}")]
    Shutdown(String),
}

impl BlockError {
    /// The NBD error value for this error (the Linux errno values the NBD
    /// spec fixes).
    pub fn nbd_errno(&self) -> u32 {
        match self {
            BlockError::Io(_) => proto::NBD_EIO,
            BlockError::NoSpace(_) => proto::NBD_ENOSPC,
            BlockError::Invalid(_) => proto::NBD_EINVAL,
            BlockError::Shutdown(_) => proto::NBD_ESHUTDOWN,
        }
    }
}

/// What the NBD server serves. Offsets and lengths reaching a backend have
/// been range-checked by the server already.
pub trait BlockBackend: Send + Sync + 'static {
    /// Export size in bytes.
    fn size(&self) -> u64;
    fn read(&self, offset: u64, len: u32) -> impl Future<Output = Result<Bytes, BlockError>> + Send;
    /// Completes per the write semantics (design.md §2); with `fua`, only once
    /// durable.
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> impl Future<Output = Result<(), BlockError>> + Send;
    /// Makes every write completed before it (on any connection) durable.
    fn flush(&self) -> impl Future<Output = Result<(), BlockError>> + Send;
    fn trim(&self, offset: u64, len: u32, fua: bool) -> impl Future<Output = Result<(), BlockError>> + Send;
    /// `no_hole`: the client asked that the range stays allocated.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        no_hole: bool,
        fua: bool,
    ) -> impl Future<Output = Result<(), BlockError>> + Send;
}
