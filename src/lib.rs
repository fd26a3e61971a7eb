//! repblock: a replicated block device in userspace.
//!
//! Layout (one module per concern; who may import whom is the dependency
//! rule of docs/architecture.md, checked by `layering_tests`):
//! - [`model`]: the shared vocabulary (roles, disk states and their byte
//!   code, connection/replication states, protocol, resync kinds,
//!   generation ids and their transitions, split-brain policies). A leaf.
//! - [`event`]: the typed events of `repctl events`.
//! - [`io`]: the IO engine trait every file access goes through (io_uring,
//!   plain pwritev/fdatasync; a fault-injecting wrapper for tests with the
//!   `fault-injection` feature).
//! - [`volume`]: the local volume: data file, write-ahead log, metadata
//!   (superblock, dirty bitmap), crash recovery, group commit, checkpoints,
//!   and its replication API (the ordered feed, apply with the peer's LSNs,
//!   WAL retention for log catch-up).
//! - [`nbd`]: the NBD front end (protocol codec, server) and a small async
//!   client used by tests and benchmarks (an in-memory backend with the
//!   `testkit` feature).
//! - [`repl`]: replication: the engine and its sessions (log stream, apply,
//!   resync, online verify), the resync decision, the wire protocol and the
//!   authenticated handshake.
//! - [`failover`]: automatic failover's pure core: terms, leases, the
//!   witness's vote and state file, the data node's failover controller.
//! - [`control`]: the control socket protocol spoken by `repctl`.
//! - [`config`]: the resource configuration file (TOML) and its validation.
//! - [`node`]: the composition root: one running node (role and disk state
//!   transitions, the NBD export while primary, the replication engine,
//!   status, metrics, handlers, systemd notification); `repd`'s daemon setup.
//! - [`stats`]: cheap operation counters behind `status` statistics and
//!   `/metrics` (the link's own are in `repl::stats`).
//! - [`units`]: human-readable sizes and durations.
//! - [`ports`]: loopback ports for the pairs tests and benchmarks start
//!   (outside the kernel's ephemeral range).
//! - [`errors`]: rendering error chains shared by the binaries.
//! - [`clidoc`]: man pages and shell completions of the binaries.
//! - `fuzzing` (feature `testkit`): the fuzz targets' entry points (fuzz/,
//!   docs/reliability.md).

pub mod clidoc;
pub mod config;
pub mod control;
pub mod errors;
pub mod event;
pub mod failover;
#[cfg(feature = "testkit")]
pub mod fuzzing;
pub mod io;
#[cfg(test)]
mod layering_tests;
pub mod model;
pub mod nbd;
pub mod node;
pub mod ports;
pub mod repl;
pub mod stats;
pub mod tls;
pub mod units;
pub mod volume;
