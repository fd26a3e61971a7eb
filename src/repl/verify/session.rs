//! The verify of one replication session: a sub-state machine that the
//! session loops (src/repl/session/) poll. At most one verify runs, with
//! this node as its source or its target; the state is [`VerifyState`],
//! moved only by [`SessionVerify::exec`], which refuses an illegal move
//! with a typed [`VerifyStateError`] (the same shape as the resync job,
//! src/repl/resync/job.rs).
//!
//! ```text
//!            StartSource              PeerYielded (its VerifyEnd)
//!   Idle ─────────────────► Source ◄──────────────┐
//!    │ ▲                     │  └─ PeerStartsToo ─► Source { peer_yielding } (we win the rule)
//!    │ │ SourceDone, Abort   │ Yield (the peer wins the rule)
//!    │ └─────────────────────┤
//!    │ PeerStarts            ▼
//!    └────────────────────► Target ── CompareQueued ─► Target { comparing } ── CompareDone ─┐
//!                             │ ▲                                                          │
//!                             │ └──────────────────────────────────────────────────────────┘
//!                             └─ TargetDone, Abort ─► Idle
//! ```

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;

use super::{
    VERIFY_BUSY_PAUSE_MAX, VERIFY_DIGEST_LEN, VERIFY_PACING, VerifyError, VerifySource, check_block, compare,
    digest_blocks, digests_len, run_bytes,
};
use crate::event::Event;
use crate::repl::engine::{Engine, StopReason};
use crate::repl::proto::Message;
use crate::repl::resync::{Pace, Pacing};
use crate::repl::session::Outcome;
use crate::repl::store::{BoxFut, ReplStore};
use crate::volume::VolumeError;

/// How the source reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReadMode {
    /// Primary: `queue_verify_read`, the data comes out of the feed in
    /// stream order.
    Feed,
    /// Both secondary (no writes anywhere): plain reads.
    Direct,
}

/// The source side of a running verify.
pub struct SourceRun {
    walk: VerifySource,
    mode: ReadMode,
    pacing: Pacing,
    /// Busy mode: when the chunk in flight was queued, and when the next
    /// one may be (after a pause as long as the last chunk took, so that
    /// the stream carries no verify work half of the time).
    chunk_queued: Option<Instant>,
    resume_at: Option<Instant>,
    /// Direct mode: reads in flight, oldest first.
    reads: VecDeque<(u64, BoxFut<'static, Result<Bytes, VolumeError>>)>,
}

/// The target side of a running verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetRun {
    total: u64,
    block: u32,
}

/// The verify state of one session.
pub enum VerifyState {
    Idle,
    /// This node reads and sends digests. `peer_yielding`: the peer started
    /// a verify at the same time and yields to ours; its digests sent before
    /// it learned are dropped until its VerifyEnd.
    Source {
        run: Box<SourceRun>,
        peer_yielding: bool,
    },
    /// The peer is the source. `comparing`: a compare waits in the apply
    /// queue; no frame is read until it ran, so the target's data is
    /// exactly the stream up to the digests.
    Target {
        run: TargetRun,
        comparing: bool,
    },
}

/// A move of the verify state.
pub enum VerifyOp {
    /// The operator's request starts a verify with this node as source.
    StartSource(Box<SourceRun>),
    /// The peer's VerifyStart: this node becomes its target.
    PeerStarts(TargetRun),
    /// The peer's VerifyStart while ours runs and we win the connection
    /// rule: ours goes on, the peer yields.
    PeerStartsToo,
    /// The peer's VerifyStart while ours runs and the peer wins: ours
    /// yields, this node becomes its target.
    Yield(TargetRun),
    /// The yielding peer's VerifyEnd arrived.
    PeerYielded,
    /// Target: digests queued a compare.
    CompareQueued,
    /// Target: the compare ran.
    CompareDone,
    /// Our run got its last result.
    SourceDone,
    /// The peer's VerifyEnd of the run we were target of.
    TargetDone,
    /// The session ends.
    Abort,
}

/// State names, for errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyStateName {
    Idle,
    Source,
    SourcePeerYielding,
    Target,
    TargetComparing,
}

/// Op names, for errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyOpName {
    StartSource,
    PeerStarts,
    PeerStartsToo,
    Yield,
    PeerYielded,
    CompareQueued,
    CompareDone,
    SourceDone,
    TargetDone,
    Abort,
}

/// An illegal move of the verify state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("verify: {op:?} is not allowed in state {state:?}")]
pub struct VerifyStateError {
    pub op: VerifyOpName,
    pub state: VerifyStateName,
}

impl VerifyOp {
    pub fn name(&self) -> VerifyOpName {
        match self {
            VerifyOp::StartSource(_) => VerifyOpName::StartSource,
            VerifyOp::PeerStarts(_) => VerifyOpName::PeerStarts,
            VerifyOp::PeerStartsToo => VerifyOpName::PeerStartsToo,
            VerifyOp::Yield(_) => VerifyOpName::Yield,
            VerifyOp::PeerYielded => VerifyOpName::PeerYielded,
            VerifyOp::CompareQueued => VerifyOpName::CompareQueued,
            VerifyOp::CompareDone => VerifyOpName::CompareDone,
            VerifyOp::SourceDone => VerifyOpName::SourceDone,
            VerifyOp::TargetDone => VerifyOpName::TargetDone,
            VerifyOp::Abort => VerifyOpName::Abort,
        }
    }
}

impl VerifyState {
    pub fn name(&self) -> VerifyStateName {
        match self {
            VerifyState::Idle => VerifyStateName::Idle,
            VerifyState::Source { peer_yielding: false, .. } => VerifyStateName::Source,
            VerifyState::Source { peer_yielding: true, .. } => VerifyStateName::SourcePeerYielding,
            VerifyState::Target { comparing: false, .. } => VerifyStateName::Target,
            VerifyState::Target { comparing: true, .. } => VerifyStateName::TargetComparing,
        }
    }
}

/// Mismatched ranges `(offset, len)` of one chunk.
pub type Runs = Vec<(u64, u32)>;

/// The target's read-and-compare of one chunk, queued with the applies.
pub(crate) type CompareFut = BoxFut<'static, Result<(), VolumeError>>;

/// One chunk the target compares once the apply queue reaches it.
#[derive(Debug)]
pub(crate) struct TargetJob {
    offset: u64,
    len: u32,
    /// Filled by the compare future.
    result: Arc<Mutex<Option<Runs>>>,
}

/// What a session does next after a verify step.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum After {
    /// Carry on.
    Continue,
    /// The verify found differences (marked on both nodes): renegotiate
    /// the connection so that the resync decision moves them.
    Resync,
}

/// The verify of one session.
pub(crate) struct SessionVerify {
    state: VerifyState,
}

impl Default for SessionVerify {
    fn default() -> SessionVerify {
        SessionVerify { state: VerifyState::Idle }
    }
}

impl SessionVerify {
    /// The one transition function. On an illegal move the state is left
    /// as it was and the error names the move and the state.
    pub(crate) fn exec(&mut self, op: VerifyOp) -> Result<(), VerifyStateError> {
        use VerifyState as S;
        let err = VerifyStateError { op: op.name(), state: self.state.name() };
        let old = std::mem::replace(&mut self.state, S::Idle);
        let (new, ok) = match (old, op) {
            (S::Idle, VerifyOp::StartSource(run)) => (S::Source { run, peer_yielding: false }, true),
            (S::Idle, VerifyOp::PeerStarts(run)) => (S::Target { run, comparing: false }, true),
            (S::Source { run, peer_yielding: false }, VerifyOp::PeerStartsToo) => {
                (S::Source { run, peer_yielding: true }, true)
            }
            (S::Source { peer_yielding: false, .. }, VerifyOp::Yield(run)) => {
                (S::Target { run, comparing: false }, true)
            }
            (S::Source { run, peer_yielding: true }, VerifyOp::PeerYielded) => {
                (S::Source { run, peer_yielding: false }, true)
            }
            (S::Source { .. }, VerifyOp::SourceDone) => (S::Idle, true),
            (S::Target { run, comparing: false }, VerifyOp::CompareQueued) => {
                (S::Target { run, comparing: true }, true)
            }
            (S::Target { run, comparing: true }, VerifyOp::CompareDone) => (S::Target { run, comparing: false }, true),
            (S::Target { comparing: false, .. }, VerifyOp::TargetDone) => (S::Idle, true),
            (_, VerifyOp::Abort) => (S::Idle, true),
            (old, _) => (old, false),
        };
        self.state = new;
        if ok { Ok(()) } else { Err(err) }
    }

    #[cfg(test)]
    pub(crate) fn state(&self) -> &VerifyState {
        &self.state
    }

    /// Target: a compare waits in the apply queue; the reader waits for it.
    pub(crate) fn gate(&self) -> bool {
        matches!(self.state, VerifyState::Target { comparing: true, .. })
    }

    fn source_mut(&mut self) -> Option<&mut SourceRun> {
        match &mut self.state {
            VerifyState::Source { run, .. } => Some(run),
            _ => None,
        }
    }

    fn peer_yielding(&self) -> bool {
        matches!(self.state, VerifyState::Source { peer_yielding: true, .. })
    }

    /// Source: starts the verify the operator asked for (locally or through
    /// the peer's VerifyRequest), unless one runs or `busy` (a resync runs:
    /// the request waits for its end). Returns the VerifyStart to send.
    pub(crate) fn start_if_requested(&mut self, engine: &Engine, mode: ReadMode, busy: bool) -> Option<Message> {
        if busy || !matches!(self.state, VerifyState::Idle) || !engine.verify.requested() {
            return None;
        }
        let total = engine.store.size();
        let block = engine.store.bitmap_granularity();
        let walk = match VerifySource::new(total, block) {
            Ok(w) => w,
            Err(e) => {
                engine.verify.take_request();
                tracing::error!(peer = %engine.cfg.peer, "verify not started: {e}");
                return None;
            }
        };
        tracing::info!(peer = %engine.cfg.peer, bytes = total, block, ?mode, "online verify starts (this node is the source)");
        // Running before the request is taken: a second request in between
        // is refused, not queued.
        engine.verify.begin("source", total);
        engine.verify.take_request();
        let run = SourceRun {
            walk,
            mode,
            pacing: Pacing::new(VERIFY_PACING),
            chunk_queued: None,
            resume_at: None,
            reads: VecDeque::new(),
        };
        // Idle was checked above.
        self.exec(VerifyOp::StartSource(Box::new(run))).ok()?;
        Some(Message::VerifyStart { total_bytes: total, block })
    }

    /// Busy mode: when the next chunk may be queued (the session wakes up
    /// then).
    pub(crate) fn next_wake(&self) -> Option<Instant> {
        match &self.state {
            VerifyState::Source { run, .. } => run.resume_at.filter(|t| *t > Instant::now()),
            _ => None,
        }
    }

    /// This node is the source of a running verify.
    pub(crate) fn is_source(&self) -> bool {
        matches!(self.state, VerifyState::Source { .. })
    }

    /// Source: queues reads while the window allows (one chunk while an
    /// application write the peer has not written is in the stream).
    pub(crate) fn queue_reads(&mut self, store: &Arc<dyn ReplStore>, app_waiting: bool) -> Result<(), VolumeError> {
        let Some(run) = self.source_mut() else { return Ok(()) };
        // Writes come one after the other (QD1): between two of them none
        // waits, but the next one would find a full window ahead of it. So
        // the verify stays in its busy mode for a while after the last one.
        let pace = run.pacing.pace(app_waiting, run.walk.done(), run.walk.started());
        let busy = matches!(pace, Pace::Busy { .. });
        if busy && run.resume_at.is_some_and(|t| Instant::now() < t) {
            return Ok(());
        }
        let (window, chunk) = match pace {
            Pace::Busy { chunk } => (0, chunk),
            Pace::Free { window, chunk } => (window, chunk),
        };
        while let Some((offset, len)) = run.walk.next_read(window, chunk) {
            run.chunk_queued = busy.then(Instant::now);
            match run.mode {
                ReadMode::Feed => store.queue_verify_read(offset, len)?,
                ReadMode::Direct => run.reads.push_back((offset, store.read_data(offset, len))),
            }
        }
        Ok(())
    }

    /// Source, direct mode: the oldest read in flight (pending forever
    /// when there is none, for `select!`).
    pub(crate) async fn next_direct(&mut self) -> Result<(u64, Bytes), VolumeError> {
        match self.source_mut().and_then(|r| r.reads.front_mut()) {
            Some((offset, f)) => {
                let offset = *offset;
                let data = f.await;
                if let Some(r) = self.source_mut() {
                    r.reads.pop_front();
                }
                data.map(|d| (offset, d))
            }
            None => std::future::pending().await,
        }
    }

    /// Source: the data of a verify read (from the feed or a direct read)
    /// becomes the VerifyDigests to send; `None` for a read of no running
    /// verify (an aborted one).
    pub(crate) fn digests_for(&mut self, offset: u64, data: &Bytes) -> Option<Message> {
        let run = self.source_mut()?;
        if !run.walk.expects_data(offset, data.len()) {
            return None;
        }
        let block = run.walk.block();
        Some(Message::VerifyDigests { offset, block, digests: digest_blocks(data, block) })
    }

    /// A verify message from the peer, on either side. `Ok(Some(m))`: send
    /// `m`; `Err`: a protocol violation (the session ends).
    pub(crate) fn on_message(&mut self, engine: &Engine, msg: Message) -> Result<(Option<Message>, After), String> {
        match msg {
            Message::VerifyRequest => {
                if matches!(self.state, VerifyState::Idle) {
                    tracing::info!(peer = %engine.cfg.peer, "the peer asks for an online verify");
                    engine.verify.request();
                } else {
                    // A repeated ask (the peer forwarded twice before our
                    // VerifyStart reached it): the running verify answers it.
                    tracing::info!(peer = %engine.cfg.peer, "the peer asks for an online verify: one is running");
                }
                Ok((None, After::Continue))
            }
            Message::VerifyStart { total_bytes, block } => self.peer_starts(engine, total_bytes, block),
            Message::VerifyResult { offset, len, mismatched } => {
                let Some(run) = self.source_mut() else {
                    return Err(VerifyError::NotRunning { msg: "verify-result" }.to_string());
                };
                let bad = run.walk.on_result(offset, len, &mismatched).map_err(|e| e.to_string())?;
                if let Some(t) = run.chunk_queued.take() {
                    let now = Instant::now();
                    run.resume_at = Some(now + (now - t).min(VERIFY_BUSY_PAUSE_MAX));
                }
                if bad > 0 {
                    for &(o, l) in &mismatched {
                        engine.store.mark_range(o, u64::from(l));
                    }
                    tracing::warn!(peer = %engine.cfg.peer, offset, bytes = bad, runs = mismatched.len(), "verify: blocks differ from the peer's; marked out of sync");
                }
                engine.verify.progress(run.walk.done(), run.walk.out_of_sync());
                if !run.walk.is_done() {
                    return Ok((None, After::Continue));
                }
                let (checked, oos) = (run.walk.done(), run.walk.out_of_sync());
                self.exec(VerifyOp::SourceDone).map_err(|e| e.to_string())?;
                let end = Message::VerifyEnd {
                    checked_bytes: checked,
                    out_of_sync_bytes: oos,
                    complete: true,
                    message: String::new(),
                };
                let after = finished(engine, true, None);
                Ok((Some(end), after))
            }
            Message::VerifyEnd { checked_bytes, out_of_sync_bytes, complete, message } => {
                if self.peer_yielding() {
                    // The peer gave up the verify it started at the same
                    // time as ours (see VerifyStart).
                    self.exec(VerifyOp::PeerYielded).map_err(|e| e.to_string())?;
                    return Ok((None, After::Continue));
                }
                if !matches!(self.state, VerifyState::Target { .. }) {
                    // The end of a verify this node never saw start (it
                    // was refused or aborted before): nothing to close.
                    tracing::info!(peer = %engine.cfg.peer, complete, "verify ended on the peer: {message}");
                    return Ok((None, After::Continue));
                }
                // A VerifyEnd while a compare waits: the reader is stopped
                // then, so this is a protocol error (refused by exec).
                self.exec(VerifyOp::TargetDone).map_err(|e| e.to_string())?;
                engine.verify.progress(checked_bytes, out_of_sync_bytes);
                let why = (!message.is_empty()).then_some(message);
                // The source renegotiates when differences were found.
                finished(engine, complete, why);
                Ok((None, After::Continue))
            }
            other => Err(format!("{} is not a verify message", other.name())),
        }
    }

    /// The peer's VerifyStart: this node becomes its target, unless both
    /// started at once and we win the connection rule.
    fn peer_starts(
        &mut self,
        engine: &Engine,
        total_bytes: u64,
        block: u32,
    ) -> Result<(Option<Message>, After), String> {
        check_block(block).map_err(|e| e.to_string())?;
        if total_bytes != engine.store.size() {
            return Err(format!("verify of {total_bytes} bytes, but this volume has {} bytes", engine.store.size()));
        }
        let target = TargetRun { total: total_bytes, block };
        let mut reply = None;
        match self.state {
            VerifyState::Target { .. } | VerifyState::Source { peer_yielding: true, .. } => {
                return Err("verify-start while a verify is running".into());
            }
            VerifyState::Source { .. } => {
                // Two nodes started a verify each at the same moment: the
                // node that wins the connection rule keeps its own; the
                // other yields and becomes its target.
                let winner = crate::repl::handshake::connection_winner(&engine.cfg.node, &engine.cfg.peer);
                if winner == engine.cfg.node {
                    tracing::info!(peer = %engine.cfg.peer, "both nodes started a verify: ours runs, the peer's yields");
                    self.exec(VerifyOp::PeerStartsToo).map_err(|e| e.to_string())?;
                    return Ok((None, After::Continue));
                }
                tracing::info!(peer = %engine.cfg.peer, "both nodes started a verify: the peer's runs, ours yields");
                self.exec(VerifyOp::Yield(target)).map_err(|e| e.to_string())?;
                reply = Some(Message::VerifyEnd {
                    checked_bytes: 0,
                    out_of_sync_bytes: 0,
                    complete: false,
                    message: format!("yielded to the verify started by {} at the same time", engine.cfg.peer),
                });
            }
            VerifyState::Idle => {
                self.exec(VerifyOp::PeerStarts(target)).map_err(|e| e.to_string())?;
                // Our own request, not picked up yet, is answered by the
                // peer's verify (it compares the same blocks of the same
                // two copies): taken now, so that it does not start a
                // second verify after this one, which the renegotiation of
                // a verify that found differences would abort (the flake of
                // `verify_started_on_both_secondaries_at_once_runs_one`).
                if engine.verify.take_request() {
                    tracing::info!(peer = %engine.cfg.peer, "our verify request is answered by the peer's verify");
                }
            }
        }
        tracing::info!(peer = %engine.cfg.peer, bytes = total_bytes, block, "online verify starts (the peer is the source)");
        engine.verify.begin("target", total_bytes);
        Ok((reply, After::Continue))
    }

    /// Target: the digests of one chunk. Returns the job and the future to
    /// queue behind the records received before it (it reads the local
    /// range and compares); the reader stops until it ran ([`Self::gate`]).
    /// `None`: digests of a verify the peer gave up (dropped).
    pub(crate) fn target_digests(
        &mut self,
        engine: &Engine,
        offset: u64,
        block: u32,
        digests: Bytes,
    ) -> Result<Option<(TargetJob, CompareFut)>, String> {
        if self.peer_yielding() {
            return Ok(None);
        }
        let VerifyState::Target { run, .. } = self.state else {
            return Err(VerifyError::NotRunning { msg: "verify-digests" }.to_string());
        };
        if block != run.block {
            return Err(format!("verify digests of {block}-byte blocks in a verify of {}-byte blocks", run.block));
        }
        let count = digests.len() / VERIFY_DIGEST_LEN;
        let len = digests_len(offset, count, block, run.total).map_err(|e| e.to_string())?;
        self.exec(VerifyOp::CompareQueued).map_err(|e| e.to_string())?;
        let result = Arc::new(Mutex::new(None));
        let slot = Arc::clone(&result);
        let read = engine.store.read_data(offset, len);
        let fut: CompareFut = Box::pin(async move {
            let local = read.await?;
            let runs = compare(offset, &local, block, &digests);
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(runs);
            Ok(())
        });
        Ok(Some((TargetJob { offset, len, result }, fut)))
    }

    /// Target: the job's compare ran; marks the differing blocks and
    /// returns the VerifyResult to send.
    pub(crate) fn target_done(&mut self, engine: &Engine, job: TargetJob) -> Message {
        // The compare ran: only a Target { comparing } moves (an aborted
        // verify is Idle already, and stays so).
        let _ = self.exec(VerifyOp::CompareDone);
        let runs = job.result.lock().unwrap_or_else(|p| p.into_inner()).take().unwrap_or_default();
        let bad = run_bytes(&runs);
        if bad > 0 {
            for &(o, l) in &runs {
                engine.store.mark_range(o, u64::from(l));
            }
            tracing::warn!(peer = %engine.cfg.peer, offset = job.offset, bytes = bad, runs = runs.len(), "verify: blocks differ from the peer's; marked out of sync");
        }
        engine.verify.add(u64::from(job.len), bad);
        Message::VerifyResult { offset: job.offset, len: job.len, mismatched: runs }
    }

    /// The session ends: a running verify is aborted (reported as such).
    /// A request not picked up yet is dropped too, unless the link is
    /// renegotiated at once (role change, renegotiation, a newer duplicate
    /// connection): then the next session runs it.
    pub(crate) fn end(&mut self, engine: &Engine, outcome: &Outcome) {
        if !matches!(outcome, Outcome::Stopped(StopReason::RoleChange | StopReason::Renegotiate | StopReason::Replaced))
            && engine.verify.take_request()
        {
            tracing::info!(peer = %engine.cfg.peer, "verify request dropped: the session ended before it started");
        }
        let running = !matches!(self.state, VerifyState::Idle);
        // Abort is legal in every state.
        let _ = self.exec(VerifyOp::Abort);
        if running {
            finished(engine, false, Some(describe_end(outcome)));
        }
    }
}

/// Records the end, logs it, emits `verify-finished`; differences found by
/// a complete verify ask for a resync.
fn finished(engine: &Engine, complete: bool, message: Option<String>) -> After {
    let Some(r) = engine.verify.finish(complete, message) else { return After::Continue };
    if r.out_of_sync_bytes > 0
        && let Err(e) = engine.store.persist_bitmap()
    {
        tracing::error!(peer = %engine.cfg.peer, "verify: cannot persist the marked blocks: {e}");
    }
    if complete {
        tracing::info!(
            peer = %engine.cfg.peer, checked_bytes = r.checked_bytes, out_of_sync_bytes = r.out_of_sync_bytes,
            seconds = r.seconds, "online verify finished"
        );
    } else {
        tracing::warn!(
            peer = %engine.cfg.peer, checked_bytes = r.checked_bytes, out_of_sync_bytes = r.out_of_sync_bytes,
            "online verify aborted: {}", r.message.as_deref().unwrap_or("")
        );
    }
    engine.emit(Event::VerifyFinished {
        checked_bytes: r.checked_bytes,
        complete: r.complete,
        message: r.message.clone(),
        out_of_sync_bytes: r.out_of_sync_bytes,
        peer: engine.cfg.peer.clone(),
        seconds: r.seconds,
    });
    if complete && r.out_of_sync_bytes > 0 { After::Resync } else { After::Continue }
}

/// Why a session ended, for an aborted verify's report.
fn describe_end(o: &Outcome) -> String {
    match o {
        Outcome::Stopped(r) => match r {
            StopReason::Disconnect => "disconnected by the operator".into(),
            StopReason::Replaced => "the connection was replaced by a newer one".into(),
            StopReason::RoleChange => "a role change renegotiated the connection".into(),
            StopReason::Renegotiate => "the connection was renegotiated".into(),
            StopReason::Shutdown => "the node is shutting down".into(),
        },
        Outcome::PeerLeft(why) => format!("the peer disconnected: {why}"),
        Outcome::PeerGone(why) => format!("the peer was lost: {why}"),
        Outcome::Failed(why) => format!("the session failed: {why}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn illegal_verify_moves_are_refused_and_leave_the_state_as_it_was() {
        let mut v = SessionVerify::default();
        let t = TargetRun { total: 1 << 20, block: 4096 };
        for op in [
            VerifyOp::PeerYielded,
            VerifyOp::CompareQueued,
            VerifyOp::CompareDone,
            VerifyOp::SourceDone,
            VerifyOp::TargetDone,
            VerifyOp::PeerStartsToo,
            VerifyOp::Yield(t),
        ] {
            let name = op.name();
            assert_eq!(v.exec(op), Err(VerifyStateError { op: name, state: VerifyStateName::Idle }));
        }
        v.exec(VerifyOp::PeerStarts(t)).unwrap();
        assert_eq!(v.exec(VerifyOp::PeerStarts(t)).unwrap_err().state, VerifyStateName::Target, "a second start");
        v.exec(VerifyOp::CompareQueued).unwrap();
        assert!(v.gate());
        assert_eq!(
            v.exec(VerifyOp::TargetDone),
            Err(VerifyStateError { op: VerifyOpName::TargetDone, state: VerifyStateName::TargetComparing }),
            "the end cannot overtake a compare"
        );
        v.exec(VerifyOp::CompareDone).unwrap();
        assert!(!v.gate());
        v.exec(VerifyOp::TargetDone).unwrap();
        assert_eq!(v.state().name(), VerifyStateName::Idle);
        v.exec(VerifyOp::Abort).unwrap();
        assert_eq!(v.state().name(), VerifyStateName::Idle, "abort is legal everywhere");
    }
}
