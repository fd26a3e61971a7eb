//! The failover controller in the data node (docs/failover.md, "Wiring the
//! controller"): [`FailoverCtl`] owns `failover::controller::Controller`,
//! feeds it its inputs and carries out its actions.
//!
//! ```text
//!  session (repl)  ──FailoverHooks──►┐                      ┌─► PersistTerm: superblock (here, first)
//!  witness link (node/failover.rs) ──►│ FailoverCtl::step ──┤─► AskWitness: the witness link's queue
//!  ticker (every 20 ms): Tick,        │   (one mutex)        ├─► Promote / Demote / ResumeIo: the worker
//!   LocalDisk, ResyncDone ───────────►┘                      └─► Emit: events
//!  NBD reply path ── Gate::may_reply ── FailoverHooks::may_serve (the lease, on the boot clock)
//! ```
//!
//! Inputs come from three places: the replication session through the
//! [`FailoverHooks`] this type implements (repl never imports node), the
//! witness link task (`node/failover.rs`: Pongs, views, answers), and a
//! ticker that steps `Tick` and reports the local disk and a finished
//! resync. Actions that need the node (promote, demote, resume IO) go to
//! one worker task, in order; a term is persisted before `step` returns,
//! so before anything acts on it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;

use super::Node;
use crate::config::Config;
use crate::control;
use crate::event::{Event, EventLine};
use crate::failover::controller::{self, Action, Controller, EndCause, Input, State};
use crate::failover::witness::Request;
use crate::failover::{BootClock, Clock, FailoverTimings, Grant, MonoTime, NodeIndex, Term};
use crate::model::{ConnState, DiskState, ReplState, Role};
use crate::repl::engine::{FailoverHooks, Serve};
use crate::volume::Volume;

/// How often the ticker steps the controller.
const TICK: Duration = Duration::from_millis(20);

/// What the worker does for the controller (needs the node, may wait).
#[derive(Debug, Clone, Copy)]
enum Work {
    Promote { term: u64 },
    Demote { replaced: bool },
    ResumeIo,
}

/// The data node's failover controller and its wiring.
pub struct FailoverCtl {
    ctl: Mutex<Controller>,
    volume: Arc<Volume>,
    /// The persisted term, as last written (read on hot paths: the
    /// superblock's lock is held across its fdatasync).
    term: AtomicU64,
    /// Moves at every session start and end: the ticker's reading of the
    /// link view counts only if no session started or ended meanwhile.
    session_epoch: AtomicU64,
    events: broadcast::Sender<EventLine>,
    config: Config,
    timings: FailoverTimings,
    work: mpsc::UnboundedSender<Work>,
    work_rx: Mutex<Option<mpsc::UnboundedReceiver<Work>>>,
    witness_tx: mpsc::UnboundedSender<Request>,
    witness_rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<Request>>,
    shared: Mutex<Shared>,
}

/// What status and the promote command read.
#[derive(Debug, Default)]
struct Shared {
    /// `failover.last_failover` in the status.
    last_failover: Option<serde_json::Value>,
    /// The last claim's answer: granted, or the refusal reason.
    last_claim: Option<Result<u64, String>>,
    /// The operator's claim (`promote`) is forced.
    manual_force: bool,
    /// What the ticker last fed.
    disk_uptodate: Option<bool>,
    resync_done_fed: bool,
}

impl std::fmt::Debug for FailoverCtl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FailoverCtl").field("state", &self.lock().state()).finish_non_exhaustive()
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl FailoverCtl {
    /// The controller of data node `me` (failover mode `witness`), started
    /// now as a secondary with the volume's persisted term.
    pub fn new(
        config: &Config,
        me: &str,
        volume: Arc<Volume>,
        events: broadcast::Sender<EventLine>,
    ) -> Option<Arc<FailoverCtl>> {
        if !config.failover.enabled() || config.witness.is_none() {
            return None;
        }
        let me_i = config.node_index(me)?;
        let peer = config.peer_of(me)?;
        let peer_i = config.node_index(&peer.name)?;
        let timings = config.failover.timings;
        let ctl = Controller::new(me_i, peer_i, timings, Term(volume.term()), BootClock.now());
        let (work, work_rx) = mpsc::unbounded_channel();
        let (witness_tx, witness_rx) = mpsc::unbounded_channel();
        Some(Arc::new(FailoverCtl {
            ctl: Mutex::new(ctl),
            term: AtomicU64::new(volume.term()),
            session_epoch: AtomicU64::new(0),
            volume,
            events,
            config: config.clone(),
            timings,
            work,
            work_rx: Mutex::new(Some(work_rx)),
            witness_tx,
            witness_rx: tokio::sync::Mutex::new(witness_rx),
            shared: Mutex::new(Shared::default()),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Controller> {
        self.ctl.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn shared(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn emit(&self, event: Event) {
        let _ = self.events.send(EventLine::now(event));
    }

    fn name(&self, i: NodeIndex) -> String {
        self.config.node_name(i).unwrap_or("?").to_string()
    }

    /// The controller's state now.
    pub fn state(&self) -> State {
        self.lock().state()
    }

    /// Steps the controller with `input` at the boot clock's now and
    /// carries out the actions; returns the Pong to send, if any.
    pub fn step(&self, input: Input) -> Option<(Term, bool)> {
        let now = BootClock.now();
        let (actions, manual) = {
            let mut c = self.lock();
            let manual = c.manual_claim();
            match c.step(input, now) {
                Ok(a) => (a, manual),
                Err(e) => {
                    tracing::debug!(error = %e, "failover input not taken");
                    return None;
                }
            }
        };
        self.carry_out(actions, manual, now)
    }

    fn carry_out(&self, actions: Vec<Action>, manual: bool, now: MonoTime) -> Option<(Term, bool)> {
        let mut pong = None;
        for a in actions {
            match a {
                Action::PersistTerm(t) => match self.volume.persist_term(t.0) {
                    Ok(stored) => {
                        self.term.fetch_max(stored, Ordering::AcqRel);
                        tracing::info!(term = stored, "failover term persisted");
                    }
                    Err(e) => {
                        // The term is not durable: nothing may act on it.
                        // The volume is fail-stop after a failed superblock
                        // write; stop here.
                        tracing::error!(term = t.0, error = %e, "cannot persist the failover term");
                        return pong;
                    }
                },
                Action::Pong { term, primary_ok } => pong = Some((term, primary_ok)),
                Action::AskWitness(r) => {
                    tracing::info!(request = ?r, "asking the witness");
                    let _ = self.witness_tx.send(r);
                }
                Action::SuspendIo(reason) => {
                    tracing::warn!(reason = reason.as_str(), "failover: replies held");
                }
                Action::ResumeIo => {
                    tracing::info!("failover: replies flow again");
                    let _ = self.work.send(Work::ResumeIo);
                }
                Action::Promote { term } => {
                    let _ = self.work.send(Work::Promote { term: term.0 });
                }
                Action::Demote { replaced } => {
                    let _ = self.work.send(Work::Demote { replaced });
                }
                Action::HandOverToPeer { term } => {
                    // No hand-over message on the data link yet: the peer
                    // claims by itself `wait` after it last renewed our
                    // lease (the witness has no primary to protect now).
                    tracing::info!(term = term.0, "released the term: the peer claims the next one by itself");
                }
                Action::Emit(e) => self.emit_controller_event(e, manual, now),
            }
        }
        pong
    }

    fn emit_controller_event(&self, e: controller::Event, manual: bool, _now: MonoTime) {
        use controller::Event as C;
        let event = match e {
            C::LeaseLost { term, last_renewed_ms_ago } => {
                tracing::warn!(term = term.0, last_renewed_ms_ago, "lease lost: replies held");
                Event::LeaseLost { last_renewed_ms_ago, term: term.0 }
            }
            C::LeaseRegained { term, suspended_ms } => Event::LeaseRegained { suspended_ms, term: term.0 },
            C::SoloGranted { term } => {
                tracing::warn!(term = term.0, "solo granted: the peer is outdated, this primary goes on alone");
                Event::SoloGranted { term: term.0 }
            }
            C::Claim { term, refused } => {
                self.shared().last_claim = Some(match refused {
                    None => Ok(term.0),
                    Some(r) => Err(r.as_str().to_string()),
                });
                tracing::info!(term = term.0, refused = ?refused.map(|r| r.as_str()), "claim answered");
                Event::Claim {
                    granted: refused.is_none(),
                    reason: refused.map(|r| r.as_str().to_string()),
                    term: term.0,
                }
            }
            C::Promoted { term, detect_ms, waited_ms, total_ms } => {
                let auto = !manual;
                tracing::warn!(term = term.0, auto, detect_ms, waited_ms, total_ms, "granted the term: promoting");
                let from = self.config.peer_of(&self.me_name()).map(|p| p.name.clone());
                self.shared().last_failover = Some(serde_json::json!({
                    "from": from,
                    "to": self.me_name(),
                    "term": term.0,
                    "auto": auto,
                    "detect_ms": detect_ms,
                    "waited_ms": waited_ms,
                    "total_ms": total_ms,
                    "time": crate::model::unix_ms(),
                }));
                Event::Promoted { auto, detect_ms, term: term.0, total_ms, waited_ms }
            }
            C::Fenced { term, reason } => {
                tracing::error!(term = term.0, reason = reason.as_str(), "fenced: this node lost its term; demoting");
                Event::Fenced { reason: reason.as_str().into(), term: term.0 }
            }
            C::TermChanged { term } => {
                let view = self.lock().witness_view();
                Event::TermChanged {
                    primary: view.and_then(|v| v.primary).map(|p| self.name(p)),
                    term: term.0,
                    uptodate: view.map(|v| v.uptodate.iter().map(|i| self.name(i)).collect()).unwrap_or_default(),
                }
            }
            C::FailoverDisabled { reason } => {
                tracing::warn!(reason = reason.as_str(), "automatic failover disabled");
                Event::FailoverDisabled { reason: reason.as_str().into() }
            }
            C::FailoverEnabled => Event::FailoverEnabled,
        };
        self.emit(event);
    }

    fn me_name(&self) -> String {
        let me = self.lock().me();
        self.name(me)
    }

    /// The witness's answer or Pong, as the controller takes it.
    pub(super) fn witness_rx(&self) -> &tokio::sync::Mutex<mpsc::UnboundedReceiver<Request>> {
        &self.witness_rx
    }

    /// Status: enabled, lease, eligibility, last failover, state.
    pub(super) fn status(&self) -> CtlStatus {
        let now = BootClock.now();
        let c = self.lock();
        let lease = c.lease();
        let valid = c.may_serve(now);
        let remaining_ms = match lease.deadline {
            Some(d) if valid => ms(Duration::from_nanos(d.0.saturating_sub(now.0))),
            _ => 0,
        };
        let eligible = c.eligibility();
        CtlStatus {
            state: c.state().name(),
            enabled: !c.disabled(),
            lease_valid: valid,
            lease_remaining_ms: remaining_ms,
            eligible: eligible.is_ok(),
            eligible_reason: eligible.err().map(|e| e.to_string()),
            last_failover: self.shared().last_failover.clone(),
        }
    }

    /// `repctl promote` while failover is on: claims the next term through
    /// the witness (forced with `--force`, or when the witness has nobody
    /// up to date yet: the bootstrap). Returns the refusal if the claim
    /// ends without this node being primary.
    pub(super) async fn claim_now(&self, force: bool, bootstrap: bool) -> Result<u64, String> {
        self.shared().last_claim = None;
        self.shared().manual_force = force;
        let forced = force || bootstrap;
        if let State::Fenced { .. } | State::Primary { .. } = self.state() {
            return Err(format!("the failover controller is {}", self.state().name()));
        }
        self.step(Input::ClaimNow { forced });
        let deadline = tokio::time::Instant::now() + controller::MANUAL_CLAIM_FOR + Duration::from_secs(2);
        loop {
            let (state, manual) = {
                let c = self.lock();
                (c.state(), c.manual_claim())
            };
            if state.is_primary() {
                return Ok(state.term().0);
            }
            if !manual {
                let why = match self.shared().last_claim.clone() {
                    Some(Err(r)) => r,
                    _ => "no answer from the witness".into(),
                };
                return Err(why);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err("no grant from the witness in time".into());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// `repctl demote` of a primary with failover on: releases the term at
    /// the witness (IO held until then; `Release` granted → the worker
    /// demotes, and the peer claims the next term by itself). Refused while
    /// the peer is not connected (nobody would take over) and when the
    /// witness cannot be reached (IO resumes).
    pub(super) async fn release(&self) -> Result<(), String> {
        if !matches!(self.state(), State::Primary { .. }) {
            return Err(format!(
                "the failover controller is {} (a primary serving with its peer releases its term)",
                self.state().name()
            ));
        }
        if self.step_checked(Input::SwitchoverRequested).is_err() {
            return Err("the peer is not connected: nobody would take over (automatic failover is on; \
                        `repctl disconnect` first and set [failover] mode = \"off\" to stop serving anyway)"
                .into());
        }
        let deadline = tokio::time::Instant::now() + self.timings.detect * 2;
        loop {
            match self.state() {
                State::Releasing { .. } => {}
                State::Following { .. } => return Ok(()),
                other => return Err(format!("the witness did not release the term (now {})", other.name())),
            }
            if tokio::time::Instant::now() >= deadline {
                self.step(Input::SwitchoverCancelled);
                return Err("no answer from the witness in time; serving again".into());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// `repctl failover enable|disable`.
    pub(super) fn set_enabled(&self, on: bool) {
        let disabled = self.lock().disabled();
        if on {
            // Also clears the budget's count.
            self.step(Input::Enable);
        } else if !disabled {
            self.step(Input::Disable);
        }
    }

    /// [`FailoverCtl::step`], telling whether the controller took the input.
    fn step_checked(&self, input: Input) -> Result<(), ()> {
        let now = BootClock.now();
        let (actions, manual) = {
            let mut c = self.lock();
            let manual = c.manual_claim();
            (c.step(input, now).map_err(|_| ())?, manual)
        };
        self.carry_out(actions, manual, now);
        Ok(())
    }

    /// One ticker round: the timers, the local disk, a finished resync.
    fn periodic(&self, node: &Node) {
        self.step(Input::Tick);
        let uptodate = self.volume.superblock().disk_state == DiskState::UpToDate;
        let changed = self.shared().disk_uptodate != Some(uptodate);
        if changed {
            self.shared().disk_uptodate = Some(uptodate);
            self.step(Input::LocalDisk { uptodate });
        }
        // A finished resync (either side): connected, established, both
        // up to date, once per session.
        let Some(repl) = node.replication() else { return };
        let epoch = self.session_epoch.load(Ordering::Acquire);
        let v = repl.view();
        let in_sync = v.connection == ConnState::Connected
            && v.replication == Some(ReplState::Established)
            && v.peer_disk == DiskState::UpToDate
            && uptodate;
        let fed = self.shared().resync_done_fed;
        if in_sync && !fed {
            self.shared().resync_done_fed = true;
            // Decided under the controller's lock: a session that started
            // or ended since the view was read makes the reading stale.
            let now = BootClock.now();
            let actions = {
                let mut c = self.lock();
                if self.session_epoch.load(Ordering::Acquire) != epoch {
                    self.shared().resync_done_fed = false;
                    return;
                }
                c.step(Input::ResyncDone, now).unwrap_or_default()
            };
            self.carry_out(actions, false, now);
        } else if v.connection != ConnState::Connected && fed {
            self.shared().resync_done_fed = false;
        }
    }
}

/// The controller's part of `status.failover`.
#[derive(Debug, Clone)]
pub(super) struct CtlStatus {
    pub state: &'static str,
    pub enabled: bool,
    pub lease_valid: bool,
    pub lease_remaining_ms: u64,
    pub eligible: bool,
    pub eligible_reason: Option<String>,
    pub last_failover: Option<serde_json::Value>,
}

impl FailoverHooks for FailoverCtl {
    fn term(&self) -> u64 {
        self.term.load(Ordering::Acquire)
    }

    fn heartbeat(&self) -> Duration {
        self.timings.heartbeat
    }

    fn detect(&self) -> Duration {
        self.timings.detect
    }

    fn peer_connected(&self, term: u64, primary: bool) {
        self.session_epoch.fetch_add(1, Ordering::AcqRel);
        self.shared().resync_done_fed = false;
        self.step(Input::PeerConnected { term: Term(term), primary });
    }

    fn session_ended(&self, cause: EndCause, last_frame_at: MonoTime) {
        self.session_epoch.fetch_add(1, Ordering::AcqRel);
        self.shared().resync_done_fed = false;
        self.step(Input::PeerSessionEnded { cause, last_frame_at });
    }

    fn ping(&self, term: u64) -> (u64, bool) {
        match self.step(Input::Ping { term: Term(term) }) {
            Some((t, ok)) => (t.0, ok),
            None => (self.term.load(Ordering::Acquire), false),
        }
    }

    fn pong(&self, echo_sent: MonoTime, term: u64, primary_ok: bool) {
        self.step(Input::Pong { from: controller::From::Peer, echo_sent, term: Term(term), primary_ok });
    }

    fn higher_term(&self, term: u64) {
        if Term(term) > self.lock().term() {
            self.step(Input::HigherTermSeen { term: Term(term) });
        }
    }

    fn may_serve(&self) -> Serve {
        let c = self.lock();
        if c.may_serve(BootClock.now()) {
            Serve::Yes
        } else if c.state().is_primary() {
            Serve::Hold
        } else {
            Serve::Never
        }
    }

    fn write_needs_solo(&self) {
        let asks = matches!(
            self.lock().state(),
            State::Primary { .. } | State::Suspended { reason: controller::SuspendReason::Lease, solo: false, .. }
        );
        if asks {
            self.step(Input::WriteNeedsSolo);
        }
    }
}

/// The witness's record from a Pong's or answer's fields.
pub(super) fn grant(term: u64, primary: Option<u8>, uptodate: u8) -> Grant {
    Grant { term: Term(term), primary: primary.map(NodeIndex), uptodate: crate::failover::NodeSet(uptodate) }
}

/// Starts the ticker and the worker of `node`'s controller; they end when
/// `stop` turns true.
pub(super) fn spawn(node: &Arc<Node>, ctl: &Arc<FailoverCtl>, stop: &watch::Receiver<bool>) -> Vec<JoinHandle<()>> {
    let Some(work_rx) = ctl.work_rx.lock().unwrap_or_else(|p| p.into_inner()).take() else { return Vec::new() };
    let (weak, c, st) = (Arc::downgrade(node), Arc::clone(ctl), stop.clone());
    // A thread of its own: it reads the superblock (whose lock is held
    // across a fdatasync) and may persist a term; the runtime's workers
    // never wait for either.
    let ticker = std::thread::Builder::new().name("failover-tick".into()).spawn(move || ticker(weak, c, st));
    if let Err(e) = ticker {
        tracing::error!(error = %e, "cannot start the failover ticker thread");
    }
    vec![tokio::spawn(worker(Arc::downgrade(node), Arc::clone(ctl), work_rx, stop.clone()))]
}

fn ticker(node: Weak<Node>, ctl: Arc<FailoverCtl>, stop: watch::Receiver<bool>) {
    loop {
        std::thread::sleep(TICK);
        if *stop.borrow() {
            return;
        }
        let Some(n) = node.upgrade() else { return };
        ctl.periodic(&n);
    }
}

async fn worker(
    node: Weak<Node>,
    ctl: Arc<FailoverCtl>,
    mut rx: mpsc::UnboundedReceiver<Work>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let w = tokio::select! {
            _ = control::stopped(&mut stop) => return,
            w = rx.recv() => match w { Some(w) => w, None => return },
        };
        let Some(n) = node.upgrade() else { return };
        match w {
            Work::Promote { term } => {
                let force = std::mem::take(&mut ctl.shared().manual_force);
                match n.promote_local(force).await {
                    Ok(p) => tracing::info!(term, nbd = ?p.nbd, "promoted by the failover controller"),
                    Err(e) => tracing::error!(term, error = %e, "granted the term, but the promote failed"),
                }
            }
            Work::Demote { replaced } => {
                if replaced && let Some(repl) = n.replication() {
                    // Rejoin as sync target of the new primary: this node's
                    // unacknowledged tail is discarded (the REPLACED rule,
                    // carried by the one-shot discard-my-data). Set before
                    // the demote: the role change reconnects at once.
                    repl.connect(true);
                }
                if n.role() == Role::Primary {
                    match n.demote_local(true).await {
                        Ok(_) => tracing::warn!(replaced, "demoted by the failover controller"),
                        Err(e) => tracing::error!(error = %e, "fenced, but the demote failed"),
                    }
                }
            }
            Work::ResumeIo => {
                if ctl.lock().alone()
                    && let Some(repl) = n.replication()
                {
                    repl.gate().resume_io();
                }
            }
        }
    }
}
