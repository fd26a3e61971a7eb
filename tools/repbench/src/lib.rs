//! repbench: repblock's benchmark suite.
//!
//! It answers "what does protocol A/B/C cost me, at my network's latency,
//! compared with no replication at all?": it starts its own `repd` nodes on
//! loopback (a standalone node and one pair per protocol, with the
//! in-project delay proxy on the replication link), qemu-nbd and nbdkit
//! serving a plain file, and drives the local file itself as the physical
//! floor; it runs named workloads ([`workload`]) against all of them in
//! alternating rounds with its own pipelined load generator ([`loadgen`]),
//! and writes the results as JSON and markdown ([`results`]) and SVG charts
//! ([`report`]). docs/benchmarks.md explains how to run and read it.

pub mod chaos;
pub mod crosscheck;
pub mod loadgen;
pub mod report;
pub mod results;
pub mod runner;
pub mod sysinfo;
pub mod targets;
pub mod tls;
pub mod workload;
