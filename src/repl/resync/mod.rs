//! The source side of a resync, apart from the session loop that drives it
//! (src/repl/session.rs):
//!
//! - [`job`]: [`ResyncJob`] `{ CatchingUp, Walking, Ending, Done }`, its
//!   one transition function and typed [`JobError`];
//! - [`catchup`]: the log catch-up ([`Catchup`]), records read back from the
//!   retained WAL;
//! - [`walk`]: the bitmap or full walk ([`Walk`]) over the dirty bitmap;
//! - [`pacing`]: the one pacing mechanism of background streams (the walk
//!   and online verify), each with its own numbers.
//!
//! docs/resync.md describes the protocol; docs/architecture.md the way of
//! one resync through the code.

pub mod catchup;
pub mod job;
pub mod pacing;
pub mod walk;

pub use catchup::{Catchup, Step};
pub use job::{JobError, JobOp, JobState, ResyncJob, Tail};
pub use pacing::{Pace, Pacing, PacingParams};
pub use walk::{Walk, WalkError};
