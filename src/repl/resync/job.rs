//! The source's resync job: which part of a resync runs, held in the enum,
//! with one transition function ([`ResyncJob::exec`]) that refuses an
//! illegal move with a typed error ([`JobError`]), after mayastor's
//! `rebuild_state.rs` (`exec_op`).
//!
//! ```text
//!                    ┌──── FallBack(walk) ────┐
//!                    │                        ▼
//!   start ─► CatchingUp ── EndQueued ─►  Ending ── Finished ─► Done
//!     │                                    ▲                    ▲
//!     └────────► Walking ─── EndQueued ────┘                    │
//!     └──────────────────────────────────────── (no sync) ──────┘
//! ```
//!
//! - `CatchingUp`: the log catch-up reads retained WAL records; the feed
//!   waits (its records are newer).
//! - `Walking`: the bitmap or full walk queues sync reads; the feed flows.
//! - `Ending`: the `SyncEnd` is queued; the job waits for the target to
//!   have everything durable (its last `SyncAck`). A walk still clears bits
//!   as acks arrive.
//! - `Done`: no resync (none was decided, or it finished): streaming only.

use super::catchup::Catchup;
use super::walk::Walk;
use crate::model::ResyncKind;

/// The part of a resync that runs on the source.
pub enum ResyncJob {
    CatchingUp(Catchup),
    Walking(Walk),
    Ending(Tail),
    Done,
}

/// What an ending job still holds: the acks of the last bytes go to it.
pub enum Tail {
    Log(Catchup),
    Walk(Walk),
}

/// A move of the job.
pub enum JobOp {
    /// The log catch-up cannot go on: a walk replaces it.
    FallBack(Walk),
    /// The `SyncEnd` was queued.
    EndQueued,
    /// The target has everything durable.
    Finished,
}

/// The state names, for errors and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    CatchingUp,
    Walking,
    Ending,
    Done,
}

/// The op names, for errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobOpName {
    FallBack,
    EndQueued,
    Finished,
}

/// An illegal move.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("resync job: {op:?} is not allowed in state {state:?}")]
pub struct JobError {
    pub op: JobOpName,
    pub state: JobState,
}

impl JobOp {
    pub fn name(&self) -> JobOpName {
        match self {
            JobOp::FallBack(_) => JobOpName::FallBack,
            JobOp::EndQueued => JobOpName::EndQueued,
            JobOp::Finished => JobOpName::Finished,
        }
    }
}

impl ResyncJob {
    pub fn state(&self) -> JobState {
        match self {
            ResyncJob::CatchingUp(_) => JobState::CatchingUp,
            ResyncJob::Walking(_) => JobState::Walking,
            ResyncJob::Ending(_) => JobState::Ending,
            ResyncJob::Done => JobState::Done,
        }
    }

    /// The one transition function. On an illegal move the job is left as
    /// it was and the error names the move and the state.
    pub fn exec(&mut self, op: JobOp) -> Result<(), JobError> {
        let state = self.state();
        let name = op.name();
        let old = std::mem::replace(self, ResyncJob::Done);
        let (new, result) = match (old, op) {
            (ResyncJob::CatchingUp(_), JobOp::FallBack(w)) => (ResyncJob::Walking(w), Ok(())),
            (ResyncJob::CatchingUp(c), JobOp::EndQueued) => (ResyncJob::Ending(Tail::Log(c)), Ok(())),
            (ResyncJob::Walking(w), JobOp::EndQueued) => (ResyncJob::Ending(Tail::Walk(w)), Ok(())),
            (ResyncJob::Ending(_), JobOp::Finished) => (ResyncJob::Done, Ok(())),
            (old, _) => (old, Err(JobError { op: name, state })),
        };
        *self = new;
        result
    }

    /// A resync is running (not `Done`): verify waits for its end.
    pub fn running(&self) -> bool {
        !matches!(self, ResyncJob::Done)
    }

    /// The feed flows (not during the log catch-up, whose records are
    /// older than the feed's).
    pub fn feed_open(&self) -> bool {
        !matches!(self, ResyncJob::CatchingUp(_))
    }

    /// A log catch-up runs or ends: WAL retention stays where it started.
    pub fn is_log(&self) -> bool {
        matches!(self, ResyncJob::CatchingUp(_) | ResyncJob::Ending(Tail::Log(_)))
    }

    /// The walk, walking or ending.
    pub fn walk_mut(&mut self) -> Option<&mut Walk> {
        match self {
            ResyncJob::Walking(w) | ResyncJob::Ending(Tail::Walk(w)) => Some(w),
            _ => None,
        }
    }

    /// The walk, walking or ending.
    pub fn walk(&self) -> Option<&Walk> {
        match self {
            ResyncJob::Walking(w) | ResyncJob::Ending(Tail::Walk(w)) => Some(w),
            _ => None,
        }
    }

    /// The kind of the running resync.
    pub fn kind(&self) -> Option<ResyncKind> {
        match self {
            ResyncJob::CatchingUp(_) | ResyncJob::Ending(Tail::Log(_)) => Some(ResyncKind::Log),
            ResyncJob::Walking(w) | ResyncJob::Ending(Tail::Walk(w)) => Some(w.kind),
            ResyncJob::Done => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Lsn;
    use crate::repl::store::{BoxFut, LogReadError, LogRecord, LogSource};

    struct NoLog;
    impl LogSource for NoLog {
        fn next(&mut self) -> BoxFut<'_, Result<Option<LogRecord>, LogReadError>> {
            Box::pin(async { Ok(None) })
        }
    }

    fn catching_up() -> ResyncJob {
        ResyncJob::CatchingUp(Catchup::new(Box::new(NoLog), 5 as Lsn, 9, 0))
    }

    #[test]
    fn the_legal_moves() {
        let mut j = catching_up();
        assert!(!j.feed_open() && j.is_log() && j.running());
        j.exec(JobOp::EndQueued).unwrap();
        assert_eq!(j.state(), JobState::Ending);
        assert!(j.feed_open() && j.is_log() && j.running());
        j.exec(JobOp::Finished).unwrap();
        assert_eq!(j.state(), JobState::Done);
        assert!(!j.running() && j.feed_open() && !j.is_log());

        let mut j = catching_up();
        j.exec(JobOp::FallBack(Walk::new(ResyncKind::Bitmap))).unwrap();
        assert_eq!(j.state(), JobState::Walking);
        assert_eq!(j.kind(), Some(ResyncKind::Bitmap));
        assert!(j.walk().is_some() && !j.is_log());
        j.exec(JobOp::EndQueued).unwrap();
        assert!(j.walk_mut().is_some(), "an ending walk still takes acks");
        j.exec(JobOp::Finished).unwrap();
        assert_eq!(j.kind(), None);
    }

    #[test]
    fn illegal_moves_are_refused_and_leave_the_job_as_it_was() {
        let mut j = ResyncJob::Walking(Walk::new(ResyncKind::Full));
        assert_eq!(
            j.exec(JobOp::Finished),
            Err(JobError { op: JobOpName::Finished, state: JobState::Walking }),
            "a walk finishes only after its SyncEnd"
        );
        assert_eq!(j.exec(JobOp::FallBack(Walk::new(ResyncKind::Bitmap))).unwrap_err().state, JobState::Walking);
        assert_eq!(j.kind(), Some(ResyncKind::Full));
        j.exec(JobOp::EndQueued).unwrap();
        assert_eq!(
            j.exec(JobOp::EndQueued).unwrap_err(),
            JobError { op: JobOpName::EndQueued, state: JobState::Ending }
        );
        j.exec(JobOp::Finished).unwrap();
        for op in [JobOp::EndQueued, JobOp::Finished, JobOp::FallBack(Walk::new(ResyncKind::Full))] {
            let name = op.name();
            assert_eq!(j.exec(op), Err(JobError { op: name, state: JobState::Done }));
        }
        let e = JobError { op: JobOpName::Finished, state: JobState::Walking };
        assert_eq!(e.to_string(), "resync job: Finished is not allowed in state Walking");
    }
}
