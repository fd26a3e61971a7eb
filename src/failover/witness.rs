//! The witness's vote: a pure state machine over its persisted record
//! `{term, primary, uptodate}` (docs/failover.md, "The witness").
//!
//! Rules (brief §2.5, numbered as there):
//! - **R1.** Every decision that changes the record is persisted before it is
//!   answered, and each term's successor is granted at most once: a grant
//!   moves the record to the next term, so a second claim on the same term is
//!   refused (`already-granted`).
//! - **R2 (claim).** A claim on term T is granted (term T+1, the claimant
//!   primary, `uptodate = {claimant}`) only if T is the witness's term, the
//!   claimant is in `uptodate`, the witness has not renewed the primary's
//!   lease for `wait` (`primary-alive` otherwise), and the witness has been up
//!   at least `wait` (`startup-holdoff`: after a restart it does not remember
//!   whom it renewed).
//! - **R3 (solo).** The primary of T may continue alone: term T+1,
//!   `uptodate = {primary}`; refused once a claim was granted (the term moved
//!   on), or when the requester is not the primary.
//! - `PeerUptodate`: the primary reports its peer resynced; the peer joins
//!   `uptodate` (eligible again).
//! - `Release` (planned switchover): the primary gave up its lease; the record
//!   keeps the term with no primary, so the successor's claim needs no wait.
//! - Bootstrap: a fresh witness is at term 0 with no primary; the first
//!   forced promote claims term 1. Amnesia: a witness without a readable
//!   record refuses everything (`no-state`) until re-initialised.
//!
//! The API makes "answer before persisting" impossible: [`Witness::handle`]
//! returns [`Decision::Persist`] holding the witness mutably borrowed, and
//! only [`PendingAnswer::persist`] — after the store said the record is
//! durable — applies the new record and releases the reply. Dropping a
//! pending answer changes nothing and answers nothing.

use std::fmt;
use std::time::Duration;

use super::lease::{MonoTime, Term};

// ---------------------------------------------------------------------------
// Nodes and node sets.
// ---------------------------------------------------------------------------

/// A node's index in the resource's `[[node]]` list (0..=7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(transparent)]
pub struct NodeIndex(pub u8);

impl NodeIndex {
    /// Largest index a [`NodeSet`] (and the state file's mask) can hold.
    pub const MAX: u8 = 7;
}

impl fmt::Display for NodeIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node {}", self.0)
    }
}

/// A set of node indices, as the state file's one-byte mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct NodeSet(pub u8);

impl NodeSet {
    pub const EMPTY: NodeSet = NodeSet(0);

    pub fn only(n: NodeIndex) -> NodeSet {
        NodeSet::EMPTY.with(n)
    }

    pub fn with(self, n: NodeIndex) -> NodeSet {
        debug_assert!(n.0 <= NodeIndex::MAX);
        NodeSet(self.0 | 1u8.checked_shl(u32::from(n.0)).unwrap_or(0))
    }

    pub fn contains(self, n: NodeIndex) -> bool {
        n.0 <= NodeIndex::MAX && self.0 & (1 << n.0) != 0
    }

    pub fn iter(self) -> impl Iterator<Item = NodeIndex> {
        (0..=NodeIndex::MAX).filter(move |i| self.0 & (1 << i) != 0).map(NodeIndex)
    }
}

// ---------------------------------------------------------------------------
// The record, requests and replies.
// ---------------------------------------------------------------------------

/// What the witness persists (src/failover/state_file.rs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WitnessRecord {
    pub term: Term,
    /// The primary of `term`; `None` at bootstrap and after a Release.
    pub primary: Option<NodeIndex>,
    /// The nodes that hold every write acknowledged in `term`: the only ones
    /// that may claim the next term.
    pub uptodate: NodeSet,
}

impl WitnessRecord {
    /// A fresh witness (`repctl --node WITNESS create-md`): term 0, no primary, nobody
    /// up to date (the first claim must be forced).
    pub const BOOTSTRAP: WitnessRecord = WitnessRecord { term: Term::ZERO, primary: None, uptodate: NodeSet::EMPTY };

    /// A witness re-initialised after amnesia at `term` (the highest term
    /// the data nodes report), with `primary` (if one is serving) the only
    /// node up to date.
    pub fn reinitialised(term: Term, primary: Option<NodeIndex>) -> WitnessRecord {
        WitnessRecord { term, primary, uptodate: primary.map_or(NodeSet::EMPTY, NodeSet::only) }
    }
}

/// A request from a data node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// "My primary of `term` is silent: make me primary of `term + 1`".
    /// `forced` (`promote --force`, bootstrap) skips the uptodate check only.
    Claim { term: Term, node: NodeIndex, forced: bool },
    /// "I am primary of `term` and lost my peer: let me go on alone".
    Solo { term: Term, node: NodeIndex },
    /// "I am primary of `term`; `peer` finished its resync".
    PeerUptodate { term: Term, node: NodeIndex, peer: NodeIndex },
    /// "I am primary of `term` and stopped serving (planned switchover)".
    Release { term: Term, node: NodeIndex },
}

impl Request {
    pub fn name(&self) -> &'static str {
        match self {
            Request::Claim { .. } => "claim",
            Request::Solo { .. } => "solo",
            Request::PeerUptodate { .. } => "peer-uptodate",
            Request::Release { .. } => "release",
        }
    }

    fn parts(&self) -> (Term, NodeIndex) {
        match *self {
            Request::Claim { term, node, .. }
            | Request::Solo { term, node }
            | Request::PeerUptodate { term, node, .. }
            | Request::Release { term, node } => (term, node),
        }
    }
}

/// The witness's record as a reply carries it: after a grant, the new term.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub term: Term,
    pub primary: Option<NodeIndex>,
    pub uptodate: NodeSet,
}

impl From<WitnessRecord> for Grant {
    fn from(r: WitnessRecord) -> Grant {
        Grant { term: r.term, primary: r.primary, uptodate: r.uptodate }
    }
}

/// Why a request was refused (the wire's reason codes, in this order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefuseReason {
    /// The witness renewed the primary's lease less than `wait` ago.
    PrimaryAlive,
    /// The requester is not in `uptodate` (claim), or not the primary (solo,
    /// peer-uptodate, release).
    NotEligible,
    /// The request names a term older than the one just before the witness's.
    StaleTerm,
    /// The witness has been up less than `wait`.
    StartupHoldoff,
    /// The successor of the requested term was granted already (to another
    /// node, or to this node for another request).
    AlreadyGranted,
    /// The witness lost its state: it votes again only after
    /// `repctl --node WITNESS create-md`.
    NoState,
    /// The request names a term newer than the witness's: the witness was
    /// re-initialised with too low a term.
    WitnessBehind,
}

impl RefuseReason {
    pub const ALL: [RefuseReason; 7] = [
        RefuseReason::PrimaryAlive,
        RefuseReason::NotEligible,
        RefuseReason::StaleTerm,
        RefuseReason::StartupHoldoff,
        RefuseReason::AlreadyGranted,
        RefuseReason::NoState,
        RefuseReason::WitnessBehind,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RefuseReason::PrimaryAlive => "primary-alive",
            RefuseReason::NotEligible => "not-eligible",
            RefuseReason::StaleTerm => "stale-term",
            RefuseReason::StartupHoldoff => "startup-holdoff",
            RefuseReason::AlreadyGranted => "already-granted",
            RefuseReason::NoState => "no-state",
            RefuseReason::WitnessBehind => "witness-behind",
        }
    }

    /// The wire code (docs/replication-protocol.md).
    pub fn code(self) -> u8 {
        match self {
            RefuseReason::PrimaryAlive => 1,
            RefuseReason::NotEligible => 2,
            RefuseReason::StaleTerm => 3,
            RefuseReason::StartupHoldoff => 4,
            RefuseReason::AlreadyGranted => 5,
            RefuseReason::NoState => 6,
            RefuseReason::WitnessBehind => 7,
        }
    }

    pub fn from_code(c: u8) -> Option<RefuseReason> {
        RefuseReason::ALL.into_iter().find(|r| r.code() == c)
    }
}

impl fmt::Display for RefuseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refusal, with the witness's record so the requester learns the term
/// (`None` when the witness has no state).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub reason: RefuseReason,
    pub view: Option<Grant>,
}

/// The answer to a request.
pub type Reply = Result<Grant, Refusal>;

/// What the witness tells a node that pinged it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PongView {
    /// The witness's record (`None`: no state).
    pub view: Option<Grant>,
    /// The pinger is the primary of the witness's term: this Pong renews its
    /// lease.
    pub primary_ok: bool,
}

// ---------------------------------------------------------------------------
// The state machine.
// ---------------------------------------------------------------------------

/// Where the witness persists its record (the state file; a fake in tests).
/// `persist` returns only once the record is durable (pwrite + fdatasync).
pub trait WitnessStore {
    type Error;
    fn persist(&mut self, record: &WitnessRecord) -> Result<(), Self::Error>;
}

/// The witness.
#[derive(Debug, Clone)]
pub struct Witness {
    record: Option<WitnessRecord>,
    wait: Duration,
    started_at: MonoTime,
    /// When this witness last renewed the lease of `record.primary`.
    last_renewed: Option<MonoTime>,
}

/// The outcome of a request.
#[must_use = "a Persist decision answers nothing until it is persisted"]
#[derive(Debug)]
pub enum Decision<'w> {
    /// Nothing changes: answer at once.
    Answer(Reply),
    /// The record changes: persist it, then answer.
    Persist(PendingAnswer<'w>),
}

/// A decision waiting for its record to be durable. It holds the witness
/// mutably borrowed, so no other request can be decided on the old record
/// meanwhile.
#[must_use = "persist it, or drop it to answer nothing"]
#[derive(Debug)]
pub struct PendingAnswer<'w> {
    witness: &'w mut Witness,
    next: WitnessRecord,
    reply: Reply,
    renew: Renewal,
}

/// What a persisted decision does to the witness's last renewal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Renewal {
    /// A grant: the new primary's lease is renewed by it.
    Now,
    Keep,
    /// A release: nobody holds a lease any more.
    Clear,
}

impl PendingAnswer<'_> {
    /// The record to persist.
    pub fn record(&self) -> &WitnessRecord {
        &self.next
    }

    /// Persists the record, then applies it and releases the reply. On a
    /// store error nothing changes and nothing may be answered.
    pub fn persist<S: WitnessStore>(self, store: &mut S, now: MonoTime) -> Result<Reply, S::Error> {
        store.persist(&self.next)?;
        self.witness.record = Some(self.next);
        match self.renew {
            Renewal::Now => self.witness.last_renewed = Some(now),
            Renewal::Keep => {}
            Renewal::Clear => self.witness.last_renewed = None,
        }
        Ok(self.reply)
    }
}

impl Witness {
    /// A witness starting at `now` with the record read from its state file
    /// (`None`: missing or unreadable, amnesia).
    pub fn start(record: Option<WitnessRecord>, wait: Duration, now: MonoTime) -> Witness {
        Witness { record, wait, started_at: now, last_renewed: None }
    }

    pub fn record(&self) -> Option<&WitnessRecord> {
        self.record.as_ref()
    }

    fn view(&self) -> Option<Grant> {
        self.record.map(Grant::from)
    }

    fn refuse(&self, reason: RefuseReason) -> Decision<'static> {
        Decision::Answer(Err(Refusal { reason, view: self.view() }))
    }

    /// Re-initialising a running witness (unused: `repctl --node WITNESS create-md`
    /// is offline, and a restart reads the new file): persist `record` (after
    /// amnesia, or `--force`), then vote again after a fresh holdoff.
    pub fn reinitialise(&mut self, record: WitnessRecord, now: MonoTime) -> PendingAnswer<'_> {
        self.started_at = now;
        PendingAnswer { witness: self, next: record, reply: Ok(Grant::from(record)), renew: Renewal::Clear }
    }

    /// A Ping from `from` carrying its term: the Pong's content. A Pong
    /// with `primary_ok` renews the pinger's lease, so it is recorded.
    pub fn on_ping(&mut self, from: NodeIndex, term: Term, now: MonoTime) -> PongView {
        let primary_ok = self.record.is_some_and(|r| r.term == term && r.primary == Some(from));
        if primary_ok {
            self.last_renewed = Some(now);
        }
        PongView { view: self.view(), primary_ok }
    }

    /// Decides a request received at `now`.
    pub fn handle(&mut self, req: Request, now: MonoTime) -> Decision<'_> {
        let Some(w) = self.record else {
            return self.refuse(RefuseReason::NoState);
        };
        let (term, node) = req.parts();
        if term > w.term {
            return self.refuse(RefuseReason::WitnessBehind);
        }
        if term < w.term {
            // A retry whose grant was lost: the requester is already the
            // primary of the next term; answer it again (nothing changes).
            let retry = term.next() == w.term
                && w.primary == Some(node)
                && match req {
                    Request::Claim { .. } => true,
                    Request::Solo { .. } => w.uptodate == NodeSet::only(node),
                    _ => false,
                };
            if retry {
                return Decision::Answer(Ok(Grant::from(w)));
            }
            let reason = if term.next() == w.term { RefuseReason::AlreadyGranted } else { RefuseReason::StaleTerm };
            return self.refuse(reason);
        }
        match req {
            Request::Claim { forced, .. } => {
                if !forced && !w.uptodate.contains(node) {
                    return self.refuse(RefuseReason::NotEligible);
                }
                if now.since(self.started_at) < self.wait {
                    return self.refuse(RefuseReason::StartupHoldoff);
                }
                let renewed_recently = self.last_renewed.is_some_and(|r| now.since(r) < self.wait);
                if w.primary.is_some_and(|p| p != node) && renewed_recently {
                    return self.refuse(RefuseReason::PrimaryAlive);
                }
                let next = WitnessRecord { term: term.next(), primary: Some(node), uptodate: NodeSet::only(node) };
                self.pending(next, Renewal::Now)
            }
            Request::Solo { .. } => {
                if w.primary != Some(node) {
                    return self.refuse(RefuseReason::NotEligible);
                }
                if w.uptodate == NodeSet::only(node) {
                    // Already alone: the peer is outdated in this term.
                    return Decision::Answer(Ok(Grant::from(w)));
                }
                let next = WitnessRecord { term: term.next(), primary: Some(node), uptodate: NodeSet::only(node) };
                self.pending(next, Renewal::Now)
            }
            Request::PeerUptodate { peer, .. } => {
                if w.primary != Some(node) || peer == node || peer.0 > NodeIndex::MAX {
                    return self.refuse(RefuseReason::NotEligible);
                }
                if w.uptodate.contains(peer) {
                    return Decision::Answer(Ok(Grant::from(w)));
                }
                self.pending(WitnessRecord { uptodate: w.uptodate.with(peer), ..w }, Renewal::Keep)
            }
            Request::Release { .. } => {
                if w.primary != Some(node) {
                    return self.refuse(RefuseReason::NotEligible);
                }
                self.pending(WitnessRecord { primary: None, ..w }, Renewal::Clear)
            }
        }
    }

    fn pending(&mut self, next: WitnessRecord, renew: Renewal) -> Decision<'_> {
        Decision::Persist(PendingAnswer { witness: self, next, reply: Ok(Grant::from(next)), renew })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT: Duration = Duration::from_millis(1040);
    const A: NodeIndex = NodeIndex(0);
    const B: NodeIndex = NodeIndex(1);

    fn t(ms: u64) -> MonoTime {
        MonoTime(ms * 1_000_000)
    }

    /// A store that records what it was asked to persist, and can fail.
    #[derive(Default)]
    struct Mem {
        persisted: Vec<WitnessRecord>,
        fail: bool,
    }

    impl WitnessStore for Mem {
        type Error = &'static str;
        fn persist(&mut self, r: &WitnessRecord) -> Result<(), &'static str> {
            if self.fail {
                return Err("EIO");
            }
            self.persisted.push(*r);
            Ok(())
        }
    }

    /// A witness at term 5, `a` primary, both up to date, up since 0.
    fn steady() -> Witness {
        let rec = WitnessRecord { term: Term(5), primary: Some(A), uptodate: NodeSet::only(A).with(B) };
        Witness::start(Some(rec), WAIT, t(0))
    }

    fn decide(w: &mut Witness, req: Request, now: MonoTime, store: &mut Mem) -> Reply {
        match w.handle(req, now) {
            Decision::Answer(r) => r,
            Decision::Persist(p) => p.persist(store, now).expect("persist"),
        }
    }

    fn reason(r: Reply) -> RefuseReason {
        r.expect_err("refused").reason
    }

    fn claim(term: u64, node: NodeIndex) -> Request {
        Request::Claim { term: Term(term), node, forced: false }
    }

    #[test]
    fn node_sets() {
        let s = NodeSet::only(A).with(NodeIndex(7));
        assert!(s.contains(A) && s.contains(NodeIndex(7)) && !s.contains(B));
        assert!(!s.contains(NodeIndex(9)));
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![A, NodeIndex(7)]);
        assert_eq!(s.0, 0b1000_0001);
    }

    #[test]
    fn r2_a_claim_is_granted_after_the_wait_and_persisted_first() {
        let mut w = steady();
        let mut store = Mem::default();
        assert!(w.on_ping(A, Term(5), t(2000)).primary_ok);
        // Within `wait` of the last renewal: the primary is alive.
        assert_eq!(reason(decide(&mut w, claim(5, B), t(3000), &mut store)), RefuseReason::PrimaryAlive);
        assert!(store.persisted.is_empty());
        // After it: granted, persisted before the reply is released.
        let Decision::Persist(p) = w.handle(claim(5, B), t(3040)) else { panic!("must persist") };
        let next = WitnessRecord { term: Term(6), primary: Some(B), uptodate: NodeSet::only(B) };
        assert_eq!(*p.record(), next);
        let reply = p.persist(&mut store, t(3040)).unwrap();
        assert_eq!(reply, Ok(Grant::from(next)));
        assert_eq!(store.persisted, vec![next]);
        assert_eq!(w.record(), Some(&next));
        // The old primary is no longer renewed, and learns the new term.
        let pong = w.on_ping(A, Term(5), t(3050));
        assert!(!pong.primary_ok);
        assert_eq!(pong.view.map(|v| v.term), Some(Term(6)));
        assert!(w.on_ping(B, Term(6), t(3050)).primary_ok);
    }

    #[test]
    fn r1_each_term_is_granted_once() {
        let mut w = steady();
        let mut store = Mem::default();
        assert!(decide(&mut w, claim(5, B), t(2000), &mut store).is_ok());
        // A second claim on term 5, by the other node: already granted.
        let r = decide(&mut w, claim(5, A), t(5000), &mut store);
        assert_eq!(reason(r), RefuseReason::AlreadyGranted);
        assert_eq!(r.unwrap_err().view.unwrap().term, Term(6));
        // A solo on term 5 by the old primary: already granted too.
        let r = decide(&mut w, Request::Solo { term: Term(5), node: A }, t(5000), &mut store);
        assert_eq!(reason(r), RefuseReason::AlreadyGranted);
        // The winner's retry (its grant was lost) gets the same grant, and
        // nothing is persisted again.
        let r = decide(&mut w, claim(5, B), t(5000), &mut store);
        assert_eq!(r.unwrap().term, Term(6));
        assert_eq!(store.persisted.len(), 1);
    }

    #[test]
    fn r2_a_claimant_outside_uptodate_is_not_eligible() {
        let rec = WitnessRecord { term: Term(5), primary: Some(A), uptodate: NodeSet::only(A) };
        let mut w = Witness::start(Some(rec), WAIT, t(0));
        let mut store = Mem::default();
        assert_eq!(reason(decide(&mut w, claim(5, B), t(9000), &mut store)), RefuseReason::NotEligible);
        // Forced (promote --force) skips this check only.
        let forced = Request::Claim { term: Term(5), node: B, forced: true };
        assert_eq!(decide(&mut w, forced, t(9000), &mut store).unwrap().primary, Some(B));
    }

    #[test]
    fn r2_startup_holdoff() {
        let mut w = steady();
        let mut store = Mem::default();
        assert_eq!(reason(decide(&mut w, claim(5, B), t(1039), &mut store)), RefuseReason::StartupHoldoff);
        assert!(decide(&mut w, claim(5, B), t(1040), &mut store).is_ok());
    }

    #[test]
    fn stale_and_future_terms() {
        let mut w = steady();
        let mut store = Mem::default();
        assert_eq!(reason(decide(&mut w, claim(3, B), t(9000), &mut store)), RefuseReason::StaleTerm);
        assert_eq!(reason(decide(&mut w, claim(4, B), t(9000), &mut store)), RefuseReason::AlreadyGranted);
        assert_eq!(reason(decide(&mut w, claim(6, B), t(9000), &mut store)), RefuseReason::WitnessBehind);
        let stale_solo = Request::Solo { term: Term(2), node: A };
        assert_eq!(reason(decide(&mut w, stale_solo, t(9000), &mut store)), RefuseReason::StaleTerm);
    }

    #[test]
    fn r3_solo_goes_to_the_primary_and_outdates_the_peer() {
        let mut w = steady();
        let mut store = Mem::default();
        // Not the primary.
        let r = decide(&mut w, Request::Solo { term: Term(5), node: B }, t(10), &mut store);
        assert_eq!(reason(r), RefuseReason::NotEligible);
        // The primary, even during the startup holdoff (nobody else serves).
        let r = decide(&mut w, Request::Solo { term: Term(5), node: A }, t(10), &mut store);
        let g = r.unwrap();
        assert_eq!((g.term, g.primary, g.uptodate), (Term(6), Some(A), NodeSet::only(A)));
        assert_eq!(store.persisted.len(), 1);
        // B can no longer claim, whatever the timing.
        assert_eq!(reason(decide(&mut w, claim(6, B), t(90_000), &mut store)), RefuseReason::NotEligible);
        // A second solo while already alone: no new term, nothing persisted.
        let r = decide(&mut w, Request::Solo { term: Term(6), node: A }, t(90_000), &mut store);
        assert_eq!(r.unwrap().term, Term(6));
        // The retry of the first solo (its grant was lost) too.
        let r = decide(&mut w, Request::Solo { term: Term(5), node: A }, t(90_000), &mut store);
        assert_eq!(r.unwrap().term, Term(6));
        assert_eq!(store.persisted.len(), 1);
    }

    #[test]
    fn r3_solo_after_a_granted_claim_is_refused() {
        let mut w = steady();
        let mut store = Mem::default();
        assert!(decide(&mut w, claim(5, B), t(2000), &mut store).is_ok());
        let r = decide(&mut w, Request::Solo { term: Term(5), node: A }, t(2001), &mut store);
        assert_eq!(reason(r), RefuseReason::AlreadyGranted);
        let r = decide(&mut w, Request::Solo { term: Term(6), node: A }, t(2001), &mut store);
        assert_eq!(reason(r), RefuseReason::NotEligible);
    }

    #[test]
    fn peer_uptodate_makes_the_peer_eligible_again() {
        let rec = WitnessRecord { term: Term(6), primary: Some(A), uptodate: NodeSet::only(A) };
        let mut w = Witness::start(Some(rec), WAIT, t(0));
        let mut store = Mem::default();
        // Only the primary may say so, and not about itself.
        let by_b = Request::PeerUptodate { term: Term(6), node: B, peer: B };
        assert_eq!(reason(decide(&mut w, by_b, t(1), &mut store)), RefuseReason::NotEligible);
        let itself = Request::PeerUptodate { term: Term(6), node: A, peer: A };
        assert_eq!(reason(decide(&mut w, itself, t(1), &mut store)), RefuseReason::NotEligible);
        let ok = Request::PeerUptodate { term: Term(6), node: A, peer: B };
        let g = decide(&mut w, ok, t(1), &mut store).unwrap();
        assert_eq!((g.term, g.uptodate), (Term(6), NodeSet::only(A).with(B)));
        assert_eq!(store.persisted.len(), 1);
        // Idempotent.
        assert!(decide(&mut w, ok, t(2), &mut store).is_ok());
        assert_eq!(store.persisted.len(), 1);
    }

    #[test]
    fn release_lets_the_successor_claim_without_the_wait() {
        let mut w = steady();
        let mut store = Mem::default();
        assert!(w.on_ping(A, Term(5), t(5000)).primary_ok);
        assert_eq!(reason(decide(&mut w, claim(5, B), t(5001), &mut store)), RefuseReason::PrimaryAlive);
        let rel = Request::Release { term: Term(5), node: B };
        assert_eq!(reason(decide(&mut w, rel, t(5002), &mut store)), RefuseReason::NotEligible);
        let g = decide(&mut w, Request::Release { term: Term(5), node: A }, t(5002), &mut store).unwrap();
        assert_eq!((g.term, g.primary), (Term(5), None));
        // No longer renewed, no solo.
        assert!(!w.on_ping(A, Term(5), t(5003)).primary_ok);
        let solo = Request::Solo { term: Term(5), node: A };
        assert_eq!(reason(decide(&mut w, solo, t(5003), &mut store)), RefuseReason::NotEligible);
        let g = decide(&mut w, claim(5, B), t(5004), &mut store).unwrap();
        assert_eq!((g.term, g.primary), (Term(6), Some(B)));
    }

    #[test]
    fn bootstrap_first_forced_claim_takes_term_1() {
        let mut w = Witness::start(Some(WitnessRecord::BOOTSTRAP), WAIT, t(0));
        let mut store = Mem::default();
        assert!(!w.on_ping(A, Term(0), t(1)).primary_ok);
        assert_eq!(reason(decide(&mut w, claim(0, A), t(2000), &mut store)), RefuseReason::NotEligible);
        let forced = Request::Claim { term: Term(0), node: A, forced: true };
        let g = decide(&mut w, forced, t(2000), &mut store).unwrap();
        assert_eq!((g.term, g.primary, g.uptodate), (Term(1), Some(A), NodeSet::only(A)));
        // The peer joins when its initial sync completes.
        let up = Request::PeerUptodate { term: Term(1), node: A, peer: B };
        assert_eq!(decide(&mut w, up, t(2001), &mut store).unwrap().uptodate, NodeSet(0b11));
    }

    #[test]
    fn amnesia_refuses_everything_until_reinitialised() {
        let mut w = Witness::start(None, WAIT, t(0));
        let mut store = Mem::default();
        for req in [
            claim(5, B),
            Request::Claim { term: Term(5), node: B, forced: true },
            Request::Solo { term: Term(5), node: A },
            Request::PeerUptodate { term: Term(5), node: A, peer: B },
            Request::Release { term: Term(5), node: A },
        ] {
            let r = decide(&mut w, req, t(90_000), &mut store).unwrap_err();
            assert_eq!((r.reason, r.view), (RefuseReason::NoState, None), "{req:?}");
        }
        let pong = w.on_ping(A, Term(5), t(90_000));
        assert_eq!((pong.view, pong.primary_ok), (None, false));
        // Re-initialised at the data nodes' term with their primary: votes
        // again after a fresh holdoff.
        let rec = WitnessRecord::reinitialised(Term(5), Some(A));
        let r = w.reinitialise(rec, t(100_000)).persist(&mut store, t(100_000)).unwrap();
        assert_eq!(r.map(|g| g.term), Ok(Term(5)));
        assert_eq!(store.persisted, vec![rec]);
        assert!(w.on_ping(A, Term(5), t(100_001)).primary_ok);
        assert_eq!(reason(decide(&mut w, claim(5, B), t(100_002), &mut store)), RefuseReason::NotEligible);
        let solo = Request::Solo { term: Term(5), node: A };
        assert_eq!(decide(&mut w, solo, t(100_003), &mut store).unwrap().uptodate, NodeSet::only(A));
    }

    #[test]
    fn a_failed_persist_changes_nothing_and_answers_nothing() {
        let mut w = steady();
        let mut store = Mem { fail: true, ..Mem::default() };
        let Decision::Persist(p) = w.handle(claim(5, B), t(2000)) else { panic!() };
        assert_eq!(p.persist(&mut store, t(2000)), Err("EIO"));
        assert_eq!(w.record().unwrap().term, Term(5));
        // A dropped pending answer changes nothing either.
        let Decision::Persist(p) = w.handle(claim(5, B), t(2000)) else { panic!() };
        drop(p);
        assert_eq!(w.record().unwrap().primary, Some(A));
        store.fail = false;
        assert!(decide(&mut w, claim(5, B), t(2000), &mut store).is_ok());
    }

    #[test]
    fn a_restarted_primary_may_reclaim_its_own_term_at_cold_start() {
        let mut w = steady();
        let mut store = Mem::default();
        // A was renewed a moment ago; its own claim is not held up by that.
        assert!(w.on_ping(A, Term(5), t(2000)).primary_ok);
        let g = decide(&mut w, claim(5, A), t(2001), &mut store).unwrap();
        assert_eq!((g.term, g.primary, g.uptodate), (Term(6), Some(A), NodeSet::only(A)));
    }

    #[test]
    fn refuse_reason_codes_round_trip() {
        for r in RefuseReason::ALL {
            assert_eq!(RefuseReason::from_code(r.code()), Some(r));
        }
        assert_eq!(RefuseReason::from_code(0), None);
        assert_eq!(RefuseReason::PrimaryAlive.to_string(), "primary-alive");
    }
}
