//! repblock: a replicated block device in userspace.
//!
//! Layout (one module per concern; who may import whom is the dependency
//! rule of docs/architecture.md, checked by `layering_tests`):
//! - [`model`]: the shared vocabulary (roles, disk states and their byte
//!   code, connection/replication states, protocol, resync kinds,
//!   generation ids and their transitions, split-brain policies). A leaf.
//! - [`event`]: the typed events of `repctl events`.
//! - [`io`]: the IO engine trait every file access goes through (io_uring,
//!   plain pwritev/fdatasync, and a fault-injecting wrapper for tests).
//! - [`volume`]: the local volume: data file, write-ahead log, metadata
//!   (superblock), crash recovery, group commit and checkpoints.
//! - [`nbd`]: the NBD front end (protocol codec, server) and a small async
//!   client used by tests and benchmarks.
//! - [`repl`]: replication: wire protocol (frames, messages, versions),
//!   framed async reader/writer, the authenticated handshake, the resync
//!   decision, the engine and its sessions, online verify.
//! - [`control`]: the control socket protocol spoken by `repctl`.
//! - [`config`]: the resource configuration file (TOML) and its validation.
//! - [`node`]: the composition root: the node state machine (role, disk
//!   state, NBD export while primary), the daemon, status, metrics,
//!   handlers.
//! - [`stats`]: cheap operation counters behind `status` statistics and
//!   `/metrics` (the link's own are in `repl::stats`).
//! - [`units`]: human-readable sizes and durations.
//! - [`errors`]: rendering error chains.
//! - [`clidoc`]: man pages and shell completions of the binaries.
//! - [`fuzzing`]: the fuzz targets' entry points (fuzz/, docs/reliability.md).

pub mod clidoc;
pub mod config;
pub mod control;
pub mod errors;
pub mod event;
pub mod fuzzing;
pub mod io;
#[cfg(test)]
mod layering_tests;
pub mod model;
pub mod nbd;
pub mod node;
pub mod repl;
pub mod stats;
pub mod units;
pub mod volume;
