//! The data node's failover controller: the state machine of brief §5.3
//! (docs/failover.md, "The data node's state machine").
//!
//! ```text
//!                   claim granted (R2)                         lease ok
//!  Following(T) ──────────────────────────► Primary(T+1) ◄──────────────┐
//!    │  ▲  session ended & no pong ≥ wait     │ lease expired, or a      │ renewed
//!    │  │  & eligible & budget & auto on      │ write found no peer      │
//!    │  │                                     ▼                          │
//!    │  │ claim refused ──► Candidate     Suspended(T) ──────────────────┘
//!    │  │  (backoff 250 ms..2 s)              │ solo granted (R3) → Primary-solo(T+1)
//!    │  │                                     │ higher term seen, or
//!    │  │                                     │ unrenewed ≥ fence_demote_after
//!    │  │                                     ▼
//!    │  └──── resync done (as target) ───── Fenced(T): demoted, REPLACED
//!    └─ (secondary, renewing the primary's lease through Pongs)
//!  Primary-solo(T') ── peer resynced → PeerUptodate granted → Primary(T')
//!  Primary(T) ── switchover → Releasing(T) ── Release granted → Following(T)
//! ```
//!
//! [`Controller::step`] is the one transition function: it takes a typed
//! [`Input`] and the node's clock reading, and returns the [`Action`]s the
//! wiring must carry out, in order, or a [`TransitionError`] for an input the
//! current state cannot take (the state is then unchanged). The controller
//! owns its deadlines (lease, fence, claim backoff, detect, wait): the wiring
//! calls `step(Input::Tick, now)` at [`Controller::next_wakeup`] and whenever
//! it likes; nothing is decided from a caller's claim that a timer "passed".
//!
//! The reply-path check is [`Controller::may_serve`]: a primary (or a
//! primary alone) whose lease is valid on its own clock.

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use super::lease::{CLAIM_BACKOFF_MAX, CLAIM_BACKOFF_MIN, FailoverTimings, Lease, LeaseParams, MonoTime, Term};
use super::witness::{Grant, NodeIndex, RefuseReason, Reply, Request};

// ---------------------------------------------------------------------------
// States, inputs, actions.
// ---------------------------------------------------------------------------

/// The controller's state (the sub-state under the node's role).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Secondary of `term`.
    Following { term: Term },
    /// Claiming `term + 1` from the witness.
    Candidate { term: Term, claim: ClaimState },
    /// Primary of `term`, with the peer (writes need its acknowledgement).
    Primary { term: Term },
    /// Primary of `term` whose IO is held.
    Suspended { term: Term, reason: SuspendReason, since: MonoTime, solo: bool },
    /// Primary of `term` alone: the witness outdated the peer (R3).
    PrimarySolo { term: Term },
    /// Planned switchover: IO held, Release sent to the witness.
    Releasing { term: Term },
    /// Demoted after losing `term`; rejoins as sync target.
    Fenced { term: Term },
}

impl State {
    pub fn name(&self) -> &'static str {
        match self {
            State::Following { .. } => "following",
            State::Candidate { .. } => "candidate",
            State::Primary { .. } => "primary",
            State::Suspended { .. } => "suspended",
            State::PrimarySolo { .. } => "primary-solo",
            State::Releasing { .. } => "releasing",
            State::Fenced { .. } => "fenced",
        }
    }

    pub fn term(&self) -> Term {
        match *self {
            State::Following { term }
            | State::Candidate { term, .. }
            | State::Primary { term }
            | State::Suspended { term, .. }
            | State::PrimarySolo { term, .. }
            | State::Releasing { term }
            | State::Fenced { term } => term,
        }
    }

    /// Primary of its term in some form (serving or holding IO).
    pub fn is_primary(&self) -> bool {
        matches!(
            self,
            State::Primary { .. } | State::Suspended { .. } | State::PrimarySolo { .. } | State::Releasing { .. }
        )
    }
}

/// A candidate's claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimState {
    /// Sent at this time, no answer yet; `delay` is the last backoff.
    InFlight { sent_at: MonoTime, delay: Option<Duration> },
    /// Refused (or unanswered); the next one goes at `at`.
    /// `sent_at` is the last claim's send time: a grant arriving late is
    /// still taken, with the lease from then.
    Backoff { at: MonoTime, delay: Duration, sent_at: MonoTime },
}

/// Why a primary holds its IO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SuspendReason {
    /// The lease expired.
    Lease,
    /// A write found no peer to acknowledge it; a solo grant was asked.
    AwaitingSolo,
    /// Planned switchover.
    Switchover,
}

impl SuspendReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SuspendReason::Lease => "lease",
            SuspendReason::AwaitingSolo => "awaiting-solo",
            SuspendReason::Switchover => "switchover",
        }
    }
}

/// How the session with the peer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndCause {
    /// EOF or reset: the peer's process is gone, at once.
    Eof,
    /// No frame for `detect`.
    Silence,
}

/// Who sent a Pong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum From {
    Peer,
    Witness,
}

/// What happened (the wiring's typed inputs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// Re-evaluate the timers (lease, fence, detect, wait, backoff).
    Tick,
    /// The session with the peer is up; the peer is primary of `term` or not.
    PeerConnected {
        term: Term,
        primary: bool,
    },
    /// The session with the peer ended; `last_frame_at` is when its last
    /// frame arrived.
    PeerSessionEnded {
        cause: EndCause,
        last_frame_at: MonoTime,
    },
    /// A Ping from the peer carrying its term: answered by [`Action::Pong`].
    Ping {
        term: Term,
    },
    /// A Pong answering our Ping sent at `echo_sent`.
    Pong {
        from: From,
        echo_sent: MonoTime,
        term: Term,
        primary_ok: bool,
    },
    /// The witness's record, as its latest Pong or greeting showed it
    /// (`None`: the witness has no state).
    WitnessView(Option<Grant>),
    /// The witness link is down.
    WitnessLost,
    /// The witness answered our request.
    WitnessReply {
        request: Request,
        reply: Reply,
    },
    /// Our request got no answer (link down, timeout).
    WitnessUnreachable {
        request: Request,
    },
    /// A frame or refusal carrying a higher term (R5).
    HigherTermSeen {
        term: Term,
    },
    /// The first write that cannot get the peer's acknowledgement (lazy solo).
    WriteNeedsSolo,
    /// A resync finished: as target (a fenced node rejoined), or as source
    /// (the peer is up to date again).
    ResyncDone,
    /// The local disk's state changed.
    LocalDisk {
        uptodate: bool,
    },
    /// `repctl switchover` on this primary (the wiring drains in-flight
    /// writes between SuspendIo and the Release).
    SwitchoverRequested,
    /// The switchover could not finish (timeout): serve again.
    SwitchoverCancelled,
    /// The peer released `term` for us: claim at once, no wait.
    HandOver {
        term: Term,
    },
    /// `repctl failover enable|disable`.
    Enable,
    Disable,
}

impl Input {
    pub fn name(&self) -> &'static str {
        match self {
            Input::Tick => "tick",
            Input::PeerConnected { .. } => "peer-connected",
            Input::PeerSessionEnded { .. } => "peer-session-ended",
            Input::Ping { .. } => "ping",
            Input::Pong { .. } => "pong",
            Input::WitnessView(_) => "witness-view",
            Input::WitnessLost => "witness-lost",
            Input::WitnessReply { .. } => "witness-reply",
            Input::WitnessUnreachable { .. } => "witness-unreachable",
            Input::HigherTermSeen { .. } => "higher-term-seen",
            Input::WriteNeedsSolo => "write-needs-solo",
            Input::ResyncDone => "resync-done",
            Input::LocalDisk { .. } => "local-disk",
            Input::SwitchoverRequested => "switchover-requested",
            Input::SwitchoverCancelled => "switchover-cancelled",
            Input::HandOver { .. } => "hand-over",
            Input::Enable => "enable",
            Input::Disable => "disable",
        }
    }
}

/// What the wiring must do, in the order given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Persist the node's term (superblock) before acting on it.
    PersistTerm(Term),
    /// Answer the peer's Ping.
    Pong {
        term: Term,
        primary_ok: bool,
    },
    /// Send this request to the witness.
    AskWitness(Request),
    /// Hold IO (no reply leaves); drop the floating address first.
    SuspendIo(SuspendReason),
    /// Serve again.
    ResumeIo,
    /// Become primary of `term`: drain and apply received records, start
    /// the generation, the NBD listener, the address, the handlers.
    Promote {
        term: Term,
    },
    /// Become secondary: close NBD, drop the address; `replaced`: mark the
    /// node REPLACED so it rejoins as sync target of the new primary.
    Demote {
        replaced: bool,
    },
    /// Tell the peer it may claim `term` at once (switchover).
    HandOverToPeer {
        term: Term,
    },
    Emit(Event),
}

/// Events (control socket names in brackets, brief §5.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// `lease-lost`
    LeaseLost { term: Term, last_renewed_ms_ago: u64 },
    /// `lease-regained`
    LeaseRegained { term: Term, suspended_ms: u64 },
    /// `solo-granted`
    SoloGranted { term: Term },
    /// `claim`: `refused` is `None` when granted.
    Claim { term: Term, refused: Option<RefuseReason> },
    /// `promoted` with `auto: true`.
    Promoted { term: Term, detect_ms: u64, waited_ms: u64, total_ms: u64 },
    /// `fenced`
    Fenced { term: Term, reason: FenceReason },
    /// `term-changed`
    TermChanged { term: Term },
    /// `failover-disabled`
    FailoverDisabled { reason: DisableReason },
    /// `failover-enabled`
    FailoverEnabled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FenceReason {
    HigherTerm,
    Unrenewed,
}

impl FenceReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FenceReason::HigherTerm => "higher-term",
            FenceReason::Unrenewed => "unrenewed",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisableReason {
    Budget,
    Operator,
}

impl DisableReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DisableReason::Budget => "budget",
            DisableReason::Operator => "operator",
        }
    }
}

/// An input the current state cannot take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Failover: {input} refused in state {state}{}", if detail.is_empty() { String::new() } else { format!(": {detail}") })]
pub struct TransitionError {
    pub input: &'static str,
    pub state: &'static str,
    pub detail: String,
}

/// Why this node may not claim (status `eligible_reason`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ineligible {
    Primary,
    Disabled(DisableReason),
    LocalDisk,
    NoWitness,
    WitnessNoState,
    Outdated { term: Term },
}

impl fmt::Display for Ineligible {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ineligible::Primary => f.write_str("this node is the primary"),
            Ineligible::Disabled(DisableReason::Operator) => f.write_str("automatic failover disabled by the operator"),
            Ineligible::Disabled(DisableReason::Budget) => {
                f.write_str("automatic failover disabled: failover budget used up (repctl failover enable)")
            }
            Ineligible::LocalDisk => f.write_str("local disk is not uptodate"),
            Ineligible::NoWitness => f.write_str("witness not reachable"),
            Ineligible::WitnessNoState => f.write_str("witness has no state (repctl --node WITNESS create-md)"),
            Ineligible::Outdated { term } => write!(f, "outdated in term {term}"),
        }
    }
}

// ---------------------------------------------------------------------------
// The controller.
// ---------------------------------------------------------------------------

/// The state of the data link as the controller sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Up { peer_primary: bool },
    Down { since: MonoTime, cause: LinkDown },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LinkDown {
    /// Since this process started.
    Boot,
    Ended {
        cause: EndCause,
        last_frame_at: MonoTime,
    },
}

/// The data node's failover controller.
#[derive(Debug, Clone)]
pub struct Controller {
    me: NodeIndex,
    peer: NodeIndex,
    timings: FailoverTimings,
    params: LeaseParams,
    state: State,
    lease: Lease,
    link: Link,
    /// When this node last renewed the peer's lease (a Pong with
    /// `primary_ok`), or started: it takes part in no new term before
    /// `last_renewal + wait`.
    last_renewal: MonoTime,
    booted_at: MonoTime,
    /// A primary was connected since this process started.
    seen_primary: bool,
    witness: WitnessKnown,
    disk_uptodate: bool,
    disabled: Option<DisableReason>,
    /// Failovers this node took part in (own automatic promotions, being
    /// fenced), within the window.
    failovers: VecDeque<MonoTime>,
    /// The peer released its term for us.
    handover: bool,
    /// A solo request in flight or due.
    solo_retry_at: Option<MonoTime>,
    /// The claim in flight answers a hand-over (not counted in the budget).
    claim_for_handover: bool,
    /// As primary: the peer finished a resync in this session.
    peer_resynced: bool,
    /// A PeerUptodate is in flight.
    peer_uptodate_asked: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WitnessKnown {
    Unknown,
    NoState,
    View(Grant),
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Controller {
    /// A controller for node `me` (peer `peer`) started at `now` with the
    /// node's persisted `term`, as a secondary (repd always starts
    /// secondary; promotion goes through the witness).
    pub fn new(me: NodeIndex, peer: NodeIndex, timings: FailoverTimings, term: Term, now: MonoTime) -> Controller {
        Controller {
            me,
            peer,
            params: timings.lease_params(),
            timings,
            state: State::Following { term },
            lease: Lease::default(),
            link: Link::Down { since: now, cause: LinkDown::Boot },
            last_renewal: now,
            booted_at: now,
            seen_primary: false,
            witness: WitnessKnown::Unknown,
            disk_uptodate: false,
            disabled: None,
            failovers: VecDeque::new(),
            handover: false,
            solo_retry_at: None,
            claim_for_handover: false,
            peer_resynced: false,
            peer_uptodate_asked: false,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn term(&self) -> Term {
        self.state.term()
    }

    pub fn lease(&self) -> Lease {
        self.lease
    }

    /// The reply-path check: this node may send a reply (read data, write
    /// acknowledgement) at `now`.
    pub fn may_serve(&self, now: MonoTime) -> bool {
        matches!(self.state, State::Primary { .. } | State::PrimarySolo { .. }) && self.lease.valid(now)
    }

    /// Whether a write may be acknowledged without the peer (solo held).
    pub fn alone(&self) -> bool {
        matches!(self.state, State::PrimarySolo { .. } | State::Suspended { solo: true, .. })
    }

    /// Failovers counted against the budget at `now`.
    pub fn failovers_in_window(&self, now: MonoTime) -> usize {
        self.failovers.iter().filter(|&&t| now.since(t) < self.timings.failover_window).count()
    }

    /// Whether this node could claim if its primary went silent, and why
    /// not (status `eligible`, `eligible_reason`).
    pub fn eligibility(&self) -> Result<(), Ineligible> {
        if self.state.is_primary() {
            return Err(Ineligible::Primary);
        }
        if let Some(r) = self.disabled {
            return Err(Ineligible::Disabled(r));
        }
        if !self.disk_uptodate {
            return Err(Ineligible::LocalDisk);
        }
        match self.witness {
            WitnessKnown::Unknown => Err(Ineligible::NoWitness),
            WitnessKnown::NoState => Err(Ineligible::WitnessNoState),
            WitnessKnown::View(v) if !v.uptodate.contains(self.me) => Err(Ineligible::Outdated { term: v.term }),
            WitnessKnown::View(_) => Ok(()),
        }
    }

    /// The latest time at which [`Input::Tick`] must be stepped.
    pub fn next_wakeup(&self, now: MonoTime) -> Option<MonoTime> {
        let mut at: Option<MonoTime> = None;
        let mut at_least = |t: MonoTime| at = Some(at.map_or(t, |a| a.min(t)));
        match self.state {
            State::Primary { .. } | State::PrimarySolo { .. } => {
                if let Some(d) = self.lease.deadline {
                    at_least(d);
                }
            }
            State::Suspended { .. } => {
                at_least(self.fence_at());
                if let Some(t) = self.solo_retry_at {
                    at_least(t);
                }
            }
            State::Candidate { claim: ClaimState::Backoff { at, .. }, .. } => at_least(at),
            State::Following { .. } => {
                if let Some(t) = self.claim_not_before() {
                    at_least(t.max(now));
                }
            }
            _ => {}
        }
        at
    }

    fn fence_at(&self) -> MonoTime {
        let since = match self.state {
            State::Suspended { since, .. } => since,
            _ => self.booted_at,
        };
        let renewed = self.lease.renewed_at.unwrap_or(since);
        renewed.plus(self.timings.fence_demote_after)
    }

    /// When the claim guard's timers allow a claim (ignoring eligibility),
    /// or `None` while a primary is connected.
    fn claim_not_before(&self) -> Option<MonoTime> {
        let wait = self.params.wait();
        if self.handover {
            return Some(MonoTime(0));
        }
        let Link::Down { since, cause } = self.link else {
            return match self.link {
                Link::Up { peer_primary: true } => None,
                // Both secondary: a cold start.
                _ => Some(self.cold_start_at(wait)),
            };
        };
        let detected = match cause {
            LinkDown::Boot => return Some(self.cold_start_at(wait).max(since)),
            LinkDown::Ended { cause: EndCause::Eof, .. } => since,
            LinkDown::Ended { cause: EndCause::Silence, last_frame_at } => {
                since.max(last_frame_at.plus(self.timings.detect))
            }
        };
        Some(detected.max(self.last_renewal.plus(wait)))
    }

    /// Cold start (no primary seen since this process started): the
    /// witness's last primary claims after `wait`, the other node after
    /// one more `wait`, so the last primary wins when both are up.
    fn cold_start_at(&self, wait: Duration) -> MonoTime {
        let base = self.last_renewal.max(self.booted_at).plus(wait);
        let last_primary = match self.witness {
            WitnessKnown::View(v) => v.primary == Some(self.me) || v.primary.is_none(),
            _ => false,
        };
        if self.seen_primary || last_primary { base } else { base.plus(wait) }
    }

    /// The one transition function.
    pub fn step(&mut self, input: Input, now: MonoTime) -> Result<Vec<Action>, TransitionError> {
        let before = self.clone();
        let mut out = Vec::new();
        let r = self.step_inner(input, now, &mut out);
        if let Err(detail) = r {
            *self = before;
            return Err(TransitionError { input: input.name(), state: self.state.name(), detail });
        }
        Ok(out)
    }

    fn step_inner(&mut self, input: Input, now: MonoTime, out: &mut Vec<Action>) -> Result<(), String> {
        let state = self.state;
        match input {
            Input::Tick => self.tick(now, out),
            Input::PeerConnected { term, primary } => {
                self.link = Link::Up { peer_primary: primary };
                if primary {
                    self.seen_primary = true;
                }
                self.observe_term(term, now, out);
                if primary
                    && !self.handover
                    && let State::Candidate { term, claim: ClaimState::Backoff { .. } } = self.state
                {
                    // The primary is back: follow it again.
                    self.state = State::Following { term };
                }
                if let State::Suspended { term, reason: SuspendReason::AwaitingSolo, solo: false, .. } = self.state
                    && self.lease.valid(now)
                {
                    // The peer is back before the solo answer: its acks serve.
                    self.state = State::Primary { term };
                    self.solo_retry_at = None;
                    out.push(Action::ResumeIo);
                }
            }
            Input::PeerSessionEnded { cause, last_frame_at } => {
                self.peer_resynced = false;
                self.link = Link::Down { since: now, cause: LinkDown::Ended { cause, last_frame_at } };
                self.tick(now, out);
            }
            Input::Ping { term } => {
                self.observe_term(term, now, out);
                let mine = self.term();
                let primary_ok = matches!(self.state, State::Following { .. })
                    && term == mine
                    && self.link == (Link::Up { peer_primary: true });
                if primary_ok {
                    self.last_renewal = now;
                }
                out.push(Action::Pong { term: mine, primary_ok });
            }
            Input::Pong { from: _, echo_sent, term, primary_ok } => {
                self.observe_term(term, now, out);
                if self.state.is_primary() && primary_ok && term == self.term() {
                    self.lease.renew(&self.params, echo_sent, now);
                    self.tick(now, out);
                }
            }
            Input::WitnessView(view) => {
                self.witness = match view {
                    None => WitnessKnown::NoState,
                    Some(v) => WitnessKnown::View(v),
                };
                if let Some(v) = view {
                    // A view naming us primary of a newer term is a grant
                    // whose answer we are still waiting for (or lost): the
                    // claim's reply or its retry settles it.
                    let ours = v.primary == Some(self.me);
                    if !(ours && matches!(self.state, State::Candidate { .. })) {
                        self.observe_term(v.term, now, out);
                    }
                }
            }
            Input::WitnessLost => self.witness = WitnessKnown::Unknown,
            Input::WitnessReply { request, reply } => self.witness_reply(request, reply, now, out)?,
            Input::WitnessUnreachable { request } => self.witness_unreachable(request, now, out)?,
            Input::HigherTermSeen { term } => {
                if term <= self.term() {
                    return Err(format!("term {term} is not higher than {}", self.term()));
                }
                self.observe_term(term, now, out);
            }
            Input::WriteNeedsSolo => match state {
                State::Primary { term } => {
                    self.state =
                        State::Suspended { term, reason: SuspendReason::AwaitingSolo, since: now, solo: false };
                    out.push(Action::SuspendIo(SuspendReason::AwaitingSolo));
                    out.push(Action::AskWitness(Request::Solo { term, node: self.me }));
                    self.solo_retry_at = None;
                }
                State::Suspended { reason: SuspendReason::Lease, solo: false, term, since } => {
                    // Already held; ask now so the answer is there when the
                    // lease comes back.
                    self.state = State::Suspended { term, reason: SuspendReason::AwaitingSolo, since, solo: false };
                    out.push(Action::AskWitness(Request::Solo { term, node: self.me }));
                }
                State::Suspended { reason: SuspendReason::AwaitingSolo, .. } => {}
                _ => return Err("only a primary without a solo grant asks for one".into()),
            },
            Input::ResyncDone => match state {
                State::Fenced { term } => {
                    self.state = State::Following { term };
                    self.link = Link::Up { peer_primary: true };
                    self.seen_primary = true;
                    self.last_renewal = now;
                }
                State::PrimarySolo { .. } | State::Primary { .. } => {
                    // The peer holds every write now: make it eligible again
                    // if the witness has it outdated.
                    self.peer_resynced = true;
                    self.tick(now, out);
                }
                State::Following { .. } | State::Suspended { .. } => {}
                _ => return Err("no resync of this node's".into()),
            },
            Input::LocalDisk { uptodate } => {
                self.disk_uptodate = uptodate;
                self.tick(now, out);
            }
            Input::SwitchoverRequested => match state {
                State::Primary { term } => {
                    if self.link != (Link::Up { peer_primary: false }) {
                        return Err("the peer is not connected".into());
                    }
                    self.state = State::Releasing { term };
                    out.push(Action::SuspendIo(SuspendReason::Switchover));
                    out.push(Action::AskWitness(Request::Release { term, node: self.me }));
                }
                _ => return Err("only a primary with its peer connected hands over".into()),
            },
            Input::SwitchoverCancelled => match state {
                State::Releasing { term } => {
                    self.state = State::Primary { term };
                    self.tick(now, out);
                    if matches!(self.state, State::Primary { .. }) {
                        out.push(Action::ResumeIo);
                    }
                }
                _ => return Err("no switchover in progress".into()),
            },
            Input::HandOver { term } => match state {
                State::Following { term: mine } if term == mine => {
                    self.handover = true;
                    self.link = Link::Up { peer_primary: false };
                    self.tick(now, out);
                }
                _ => return Err(format!("a hand-over of term {term} needs a follower of that term")),
            },
            Input::Enable => {
                self.disabled = None;
                self.failovers.clear();
                out.push(Action::Emit(Event::FailoverEnabled));
                self.tick(now, out);
            }
            Input::Disable => {
                if self.disabled.is_none() {
                    self.disabled = Some(DisableReason::Operator);
                    out.push(Action::Emit(Event::FailoverDisabled { reason: DisableReason::Operator }));
                }
                if let State::Candidate { term, claim: ClaimState::Backoff { .. } } = self.state {
                    self.state = State::Following { term };
                }
            }
        }
        Ok(())
    }

    /// A term seen anywhere: a higher one is persisted first; a primary
    /// that sees one is fenced (R5).
    fn observe_term(&mut self, term: Term, now: MonoTime, out: &mut Vec<Action>) {
        if term <= self.term() {
            return;
        }
        out.push(Action::PersistTerm(term));
        out.push(Action::Emit(Event::TermChanged { term }));
        match self.state {
            s if s.is_primary() => self.fence(term, FenceReason::HigherTerm, now, out),
            State::Fenced { .. } => self.state = State::Fenced { term },
            _ => {
                self.state = State::Following { term };
                self.handover = false;
            }
        }
    }

    fn fence(&mut self, term: Term, reason: FenceReason, now: MonoTime, out: &mut Vec<Action>) {
        if !matches!(self.state, State::Suspended { .. } | State::Releasing { .. }) {
            out.push(Action::SuspendIo(SuspendReason::Lease));
        }
        self.state = State::Fenced { term };
        self.lease = Lease::default();
        self.solo_retry_at = None;
        self.failovers.push_back(now);
        out.push(Action::Demote { replaced: true });
        out.push(Action::Emit(Event::Fenced { term, reason }));
    }

    fn tick(&mut self, now: MonoTime, out: &mut Vec<Action>) {
        let window = self.timings.failover_window;
        while self.failovers.front().is_some_and(|&t| now.since(t) >= window) {
            self.failovers.pop_front();
        }
        match self.state {
            State::Primary { term } | State::PrimarySolo { term, .. } if !self.lease.valid(now) => {
                let solo = matches!(self.state, State::PrimarySolo { .. });
                self.state = State::Suspended { term, reason: SuspendReason::Lease, since: now, solo };
                out.push(Action::SuspendIo(SuspendReason::Lease));
                let ago = self.lease.renewed_at.map_or(0, |r| ms(now.since(r)));
                out.push(Action::Emit(Event::LeaseLost { term, last_renewed_ms_ago: ago }));
            }
            State::Primary { term } | State::PrimarySolo { term } => {
                let outdated =
                    matches!(self.witness, WitnessKnown::View(v) if v.term == term && !v.uptodate.contains(self.peer));
                if self.peer_resynced && outdated && !self.peer_uptodate_asked {
                    self.peer_uptodate_asked = true;
                    // From the moment the witness may count the peer up to
                    // date, no write is acknowledged without it: a solo
                    // write acknowledged after this request and missing on
                    // the peer would be lost if the peer were promoted.
                    // (Found by the simulation.)
                    self.state = State::Primary { term };
                    out.push(Action::AskWitness(Request::PeerUptodate { term, node: self.me, peer: self.peer }));
                }
            }
            State::Suspended { term, reason, since, solo } => {
                if now >= self.fence_at() {
                    self.fence(term, FenceReason::Unrenewed, now, out);
                    return;
                }
                if self.solo_retry_at.is_some_and(|t| now >= t) {
                    self.solo_retry_at = None;
                    out.push(Action::AskWitness(Request::Solo { term, node: self.me }));
                }
                if reason == SuspendReason::Lease && self.lease.valid(now) {
                    self.state = if solo { State::PrimarySolo { term } } else { State::Primary { term } };
                    out.push(Action::ResumeIo);
                    out.push(Action::Emit(Event::LeaseRegained { term, suspended_ms: ms(now.since(since)) }));
                }
            }
            State::Following { term } => {
                let Some(at) = self.claim_not_before() else { return };
                if now < at || self.eligibility().is_err() {
                    return;
                }
                let handover = std::mem::take(&mut self.handover);
                if !handover && self.failovers_in_window(now) >= self.timings.max_auto_failovers as usize {
                    self.disabled = Some(DisableReason::Budget);
                    out.push(Action::Emit(Event::FailoverDisabled { reason: DisableReason::Budget }));
                    return;
                }
                self.claim_for_handover = handover;
                self.send_claim(term, now, None, out);
            }
            State::Candidate { term, claim: ClaimState::Backoff { at, delay, .. } } => {
                if now < at {
                    return;
                }
                if self.eligibility().is_err() || self.link == (Link::Up { peer_primary: true }) {
                    self.state = State::Following { term };
                    return;
                }
                self.send_claim(term, now, Some(delay), out);
            }
            _ => {}
        }
    }

    fn send_claim(&mut self, term: Term, now: MonoTime, delay: Option<Duration>, out: &mut Vec<Action>) {
        self.state = State::Candidate { term, claim: ClaimState::InFlight { sent_at: now, delay } };
        out.push(Action::AskWitness(Request::Claim { term, node: self.me, forced: false }));
    }

    fn backoff(&self, now: MonoTime, previous: Option<Duration>, sent_at: MonoTime) -> ClaimState {
        let delay = previous.map_or(CLAIM_BACKOFF_MIN, |d| (d * 2).min(CLAIM_BACKOFF_MAX));
        ClaimState::Backoff { at: now.plus(delay), delay, sent_at }
    }

    fn witness_reply(
        &mut self,
        request: Request,
        reply: Reply,
        now: MonoTime,
        out: &mut Vec<Action>,
    ) -> Result<(), String> {
        let view = match reply {
            Ok(g) => Some(g),
            Err(r) => r.view,
        };
        match (self.state, request) {
            (State::Candidate { term, claim }, Request::Claim { term: asked, .. }) if asked == term => {
                let (sent_at, delay, in_flight) = match claim {
                    ClaimState::InFlight { sent_at, delay } => (sent_at, delay, true),
                    ClaimState::Backoff { sent_at, delay, .. } => (sent_at, Some(delay), false),
                };
                match reply {
                    Ok(g) if g.primary == Some(self.me) && g.term > term => {
                        self.witness = WitnessKnown::View(g);
                        out.push(Action::PersistTerm(g.term));
                        out.push(Action::Emit(Event::Claim { term: g.term, refused: None }));
                        self.state = State::Primary { term: g.term };
                        self.lease = Lease::default();
                        // The grant renews the new primary's lease from the
                        // claim's send time.
                        self.lease.renew(&self.params, sent_at, now);
                        self.peer_resynced = false;
                        self.peer_uptodate_asked = false;
                        if !std::mem::take(&mut self.claim_for_handover) {
                            self.failovers.push_back(now);
                        }
                        out.push(Action::Promote { term: g.term });
                        let (detect, waited) = match self.link {
                            Link::Down { since, cause: LinkDown::Ended { last_frame_at, .. } } => {
                                (since.since(last_frame_at), now.since(since))
                            }
                            Link::Down { since, .. } => (Duration::ZERO, now.since(since)),
                            Link::Up { .. } => (Duration::ZERO, Duration::ZERO),
                        };
                        out.push(Action::Emit(Event::Promoted {
                            term: g.term,
                            detect_ms: ms(detect),
                            waited_ms: ms(waited),
                            total_ms: ms(detect + waited),
                        }));
                        self.tick(now, out);
                    }
                    Ok(g) => {
                        return Err(format!("a grant of term {} to {:?} answers no claim of ours", g.term, g.primary));
                    }
                    Err(r) if !in_flight => {
                        // A late refusal of a claim already given up on.
                        if let Some(v) = r.view {
                            self.witness = WitnessKnown::View(v);
                            self.observe_term(v.term, now, out);
                        }
                    }
                    Err(r) => {
                        out.push(Action::Emit(Event::Claim { term: term.next(), refused: Some(r.reason) }));
                        if let Some(v) = r.view {
                            self.witness = WitnessKnown::View(v);
                        } else if r.reason == RefuseReason::NoState {
                            self.witness = WitnessKnown::NoState;
                        }
                        match r.reason {
                            RefuseReason::PrimaryAlive
                            | RefuseReason::StartupHoldoff
                            | RefuseReason::NoState
                            | RefuseReason::WitnessBehind => {
                                self.state = State::Candidate { term, claim: self.backoff(now, delay, sent_at) };
                            }
                            RefuseReason::NotEligible | RefuseReason::AlreadyGranted | RefuseReason::StaleTerm => {
                                self.state = State::Following { term };
                            }
                        }
                        if let Some(v) = view {
                            self.observe_term(v.term, now, out);
                        }
                    }
                }
            }
            (State::Suspended { term, since, solo: false, .. }, Request::Solo { term: asked, .. }) if asked == term => {
                match reply {
                    Ok(g) if g.primary == Some(self.me) && g.term >= term => {
                        self.witness = WitnessKnown::View(g);
                        if g.term > term {
                            out.push(Action::PersistTerm(g.term));
                        }
                        out.push(Action::Emit(Event::SoloGranted { term: g.term }));
                        self.solo_retry_at = None;
                        self.state = State::Suspended { term: g.term, reason: SuspendReason::Lease, since, solo: true };
                        // A grant renews the lease as a Pong would; the
                        // request was sent no later than `since`.
                        self.lease.renew(&self.params, since, now);
                        self.tick(now, out);
                    }
                    Ok(g) => return Err(format!("a solo grant of term {} to {:?} is not ours", g.term, g.primary)),
                    Err(r) => match r.reason {
                        RefuseReason::AlreadyGranted | RefuseReason::StaleTerm | RefuseReason::NotEligible => {
                            let higher = view.map_or(term.next(), |v| v.term.max(term.next()));
                            out.push(Action::PersistTerm(higher));
                            self.fence(higher, FenceReason::HigherTerm, now, out);
                        }
                        _ => self.solo_retry_at = Some(now.plus(CLAIM_BACKOFF_MIN)),
                    },
                }
            }
            (State::PrimarySolo { term } | State::Primary { term }, Request::PeerUptodate { term: asked, .. })
                if asked == term && self.peer_uptodate_asked =>
            {
                self.peer_uptodate_asked = false;
                match reply {
                    Ok(g) if g.uptodate.contains(self.peer) => {
                        self.witness = WitnessKnown::View(g);
                        self.state = State::Primary { term };
                    }
                    _ => {
                        if let Some(v) = view {
                            self.witness = WitnessKnown::View(v);
                            self.observe_term(v.term, now, out);
                        }
                    }
                }
            }
            (State::Releasing { term }, Request::Release { term: asked, .. }) if asked == term => match reply {
                Ok(g) if g.primary.is_none() => {
                    self.witness = WitnessKnown::View(g);
                    self.state = State::Following { term };
                    self.lease = Lease::default();
                    self.link = Link::Up { peer_primary: false };
                    self.last_renewal = now;
                    out.push(Action::Demote { replaced: false });
                    out.push(Action::HandOverToPeer { term });
                }
                _ => {
                    let higher = view.map_or(term, |v| v.term);
                    if higher > term {
                        self.observe_term(higher, now, out);
                    } else {
                        self.state = State::Primary { term };
                        self.tick(now, out);
                        if matches!(self.state, State::Primary { .. }) {
                            out.push(Action::ResumeIo);
                        }
                    }
                }
            },
            _ => {
                // An answer to a request this state no longer waits for (a
                // late reply after a timeout): only its term counts.
                if let Some(v) = view {
                    if v.primary == Some(self.me) && v.term > self.term() && !self.state.is_primary() {
                        // A grant we stopped waiting for: the witness now
                        // names us primary. Claim again (its retry answers
                        // the same grant) rather than leave the term without
                        // a serving primary.
                        self.witness = WitnessKnown::View(v);
                    }
                    self.observe_term(v.term, now, out);
                }
            }
        }
        Ok(())
    }

    fn witness_unreachable(&mut self, request: Request, now: MonoTime, out: &mut Vec<Action>) -> Result<(), String> {
        match (self.state, request) {
            (State::Candidate { term, claim: ClaimState::InFlight { delay, sent_at } }, Request::Claim { .. }) => {
                self.state = State::Candidate { term, claim: self.backoff(now, delay, sent_at) };
            }
            (State::Suspended { solo: false, .. }, Request::Solo { .. }) => {
                self.solo_retry_at = Some(now.plus(CLAIM_BACKOFF_MIN));
            }
            (State::PrimarySolo { .. } | State::Primary { .. }, Request::PeerUptodate { .. }) => {
                self.peer_uptodate_asked = false;
            }
            (State::Releasing { term }, Request::Release { .. }) => {
                self.state = State::Primary { term };
                self.tick(now, out);
                if matches!(self.state, State::Primary { .. }) {
                    out.push(Action::ResumeIo);
                }
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "controller_tests.rs"]
mod tests;
