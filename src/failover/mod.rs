//! Automatic failover with a witness: the pure core (docs/failover.md).
//!
//! Nothing here does network IO or knows the replication engine: the wiring
//! (a later step) feeds typed inputs in and carries typed actions out.
//!
//! - [`lease`]: terms, clocks, the lease arithmetic with a clock-rate bound,
//!   the validated `[failover]` timings.
//!
//! Dependency rule: `failover` may import `model` and `units` only (never
//! `repl`, `node`, `config`, `control`).

pub mod lease;

pub use lease::{BootClock, Clock, Drift, FailoverTimings, FakeClock, Lease, LeaseParams, MonoTime, Term, TimingError};
