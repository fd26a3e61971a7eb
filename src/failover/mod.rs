//! Automatic failover with a witness: the pure core (docs/failover.md).
//!
//! Nothing here does network IO or knows the replication engine: the wiring
//! (a later step) feeds typed inputs in and carries typed actions out.
//!
//! - [`lease`]: terms, clocks, the lease arithmetic with a clock-rate bound,
//!   the validated `[failover]` timings.
//! - [`witness`]: the witness's vote (rules R1-R3), persist-before-answer
//!   enforced by the API.
//! - [`state_file`]: the witness's record on disk (two alternating 4 KiB
//!   slots, pwrite + fdatasync).
//! - [`controller`]: the data node's failover state machine (following,
//!   candidate, primary, suspended, primary-solo, releasing, fenced).
//!
//! Dependency rule: `failover` may import `model` and `units` only (never
//! `repl`, `node`, `config`, `control`).

pub mod controller;
pub mod lease;
#[cfg(test)]
mod sim;
pub mod state_file;
pub mod witness;

pub use lease::{BootClock, Clock, Drift, FailoverTimings, FakeClock, Lease, LeaseParams, MonoTime, Term, TimingError};
pub use witness::{Grant, NodeIndex, NodeSet, Refusal, RefuseReason, Witness, WitnessRecord, WitnessStore};
