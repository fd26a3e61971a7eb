//! repblock: a replicated block device in userspace.
//!
//! Layout (one module per concern):
//! - [`io`]: the IO engine trait every file access goes through (io_uring,
//!   plain pwritev/fdatasync, and a fault-injecting wrapper for tests).
//! - [`volume`]: the local volume: data file, write-ahead log, metadata
//!   (superblock), crash recovery, group commit and checkpoints.
//! - [`nbd`]: the NBD front end (protocol codec, server) and a small async
//!   client used by tests and benchmarks.
//! - [`clidoc`]: man pages and shell completions of the binaries.
//! - [`config`]: the resource configuration file (TOML) and its validation.
//! - [`failover`]: automatic failover's pure core: terms, leases, the
//!   witness's vote and state file, the data node's failover controller.
//! - [`node`]: the node state machine (role, disk state, NBD export while
//!   primary).
//! - [`repl`]: the replication link: wire protocol (frames, messages,
//!   versions), framed async reader/writer, and the authenticated handshake.
//! - [`control`]: the control socket protocol spoken by `repctl`.
//! - [`stats`]: cheap operation counters behind `status` statistics and
//!   `/metrics`.
//! - [`units`]: human-readable sizes and durations.
//! - [`fuzzing`]: the fuzz targets' entry points (fuzz/, docs/reliability.md).

pub mod clidoc;
pub mod config;
pub mod control;
pub mod errors;
pub mod failover;
pub mod fuzzing;
pub mod io;
pub mod nbd;
pub mod node;
pub mod repl;
pub mod stats;
pub mod units;
pub mod volume;
