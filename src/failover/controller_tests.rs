//! One test per row of the guard table (docs/failover.md), plus the
//! illegal moves, the budget, cold start and the reply-path check.

use super::*;
use crate::failover::witness::{NodeSet, Refusal};

const A: NodeIndex = NodeIndex(0);
const B: NodeIndex = NodeIndex(1);
const T: FailoverTimings = FailoverTimings::DEFAULT;

fn t(ms: u64) -> MonoTime {
    MonoTime(ms * 1_000_000)
}

fn wait() -> Duration {
    T.wait()
}

fn view(term: u64, primary: Option<NodeIndex>, uptodate: u8) -> Grant {
    Grant { term: Term(term), primary, uptodate: NodeSet(uptodate) }
}

fn claim(term: u64, node: NodeIndex) -> Request {
    Request::Claim { term: Term(term), node, forced: false }
}

fn step(c: &mut Controller, input: Input, now: MonoTime) -> Vec<Action> {
    c.step(input, now).unwrap_or_else(|e| panic!("{e}"))
}

fn asks(actions: &[Action]) -> Vec<Request> {
    actions.iter().filter_map(|a| if let Action::AskWitness(r) = a { Some(*r) } else { None }).collect()
}

/// Node B following primary A in term 5 since 0, both up to date, the
/// witness known, B's disk up to date; B last ponged A at 1000 ms.
fn follower() -> Controller {
    let mut c = Controller::new(B, A, T, Term(5), t(0));
    step(&mut c, Input::LocalDisk { uptodate: true }, t(0));
    step(&mut c, Input::WitnessView(Some(view(5, Some(A), 0b11))), t(0));
    step(&mut c, Input::PeerConnected { term: Term(5), primary: true }, t(0));
    let pong = step(&mut c, Input::Ping { term: Term(5) }, t(1000));
    assert_eq!(pong, vec![Action::Pong { term: Term(5), primary_ok: true }]);
    c
}

/// Node A primary of term 6, granted at 10 000 ms from a claim sent then.
fn primary() -> Controller {
    let mut c = Controller::new(A, B, T, Term(5), t(0));
    step(&mut c, Input::LocalDisk { uptodate: true }, t(0));
    step(&mut c, Input::WitnessView(Some(view(5, Some(A), 0b11))), t(0));
    // Cold start, A is the witness's last primary: claims after `wait`.
    assert_eq!(c.next_wakeup(t(0)), Some(t(0).plus(wait())));
    let out = step(&mut c, Input::Tick, t(10_000));
    assert_eq!(asks(&out), vec![claim(5, A)]);
    let out = step(&mut c, Input::WitnessReply { request: claim(5, A), reply: Ok(view(6, Some(A), 0b01)) }, t(10_000));
    assert_eq!(c.state(), State::Primary { term: Term(6) });
    assert!(out.contains(&Action::Promote { term: Term(6) }));
    step(&mut c, Input::PeerConnected { term: Term(6), primary: false }, t(10_000));
    // Renewed from a Ping sent at 10 000 ms.
    step(&mut c, Input::Pong { from: From::Peer, echo_sent: t(10_000), term: Term(6), primary_ok: true }, t(10_001));
    c
}

// --- Following → Candidate -------------------------------------------------

#[test]
fn following_to_candidate_at_once_on_eof_after_the_wait() {
    let mut c = follower();
    // EOF at 1500 ms: the wait since the last pong (1000 ms) is not over.
    let out = step(&mut c, Input::PeerSessionEnded { cause: EndCause::Eof, last_frame_at: t(1500) }, t(1500));
    assert!(asks(&out).is_empty());
    assert_eq!(c.state(), State::Following { term: Term(5) });
    assert_eq!(c.next_wakeup(t(1500)), Some(t(1000).plus(wait())));
    let just_before = t(1000).plus(wait()).0 - 1;
    assert!(asks(&step(&mut c, Input::Tick, MonoTime(just_before))).is_empty());
    let out = step(&mut c, Input::Tick, t(1000).plus(wait()));
    assert_eq!(asks(&out), vec![claim(5, B)]);
    assert!(matches!(c.state(), State::Candidate { term: Term(5), claim: ClaimState::InFlight { .. } }));
}

#[test]
fn following_to_candidate_after_detect_on_silence() {
    let mut c = follower();
    // Silence: the last frame came at 1000 ms; the session (with its own,
    // shorter timeout) ends at 2200.
    step(&mut c, Input::PeerSessionEnded { cause: EndCause::Silence, last_frame_at: t(1000) }, t(2200));
    // `wait` (≈1.06 s) passed, but not detect (1.5 s) since the last frame.
    assert_eq!(c.state(), State::Following { term: Term(5) });
    assert_eq!(c.next_wakeup(t(2200)), Some(t(2500)));
    assert!(asks(&step(&mut c, Input::Tick, t(2499))).is_empty());
    let out = step(&mut c, Input::Tick, t(2500));
    assert_eq!(asks(&out), vec![claim(5, B)]);
}

#[test]
fn no_claim_while_the_primary_is_connected() {
    let mut c = follower();
    assert!(asks(&step(&mut c, Input::Tick, t(60_000))).is_empty());
    assert_eq!(c.next_wakeup(t(60_000)), None);
}

#[test]
fn no_claim_outside_the_witness_uptodate_set() {
    let mut c = follower();
    step(&mut c, Input::WitnessView(Some(view(5, Some(A), 0b01))), t(1000));
    step(&mut c, Input::PeerSessionEnded { cause: EndCause::Eof, last_frame_at: t(1000) }, t(1000));
    assert!(asks(&step(&mut c, Input::Tick, t(10_000))).is_empty());
    assert_eq!(c.eligibility(), Err(Ineligible::Outdated { term: Term(5) }));
    assert_eq!(c.eligibility().unwrap_err().to_string(), "outdated in term 5");
}

#[test]
fn no_claim_with_a_local_disk_not_uptodate() {
    let mut c = follower();
    step(&mut c, Input::LocalDisk { uptodate: false }, t(1000));
    step(&mut c, Input::PeerSessionEnded { cause: EndCause::Eof, last_frame_at: t(1000) }, t(1000));
    assert!(asks(&step(&mut c, Input::Tick, t(10_000))).is_empty());
    assert_eq!(c.eligibility(), Err(Ineligible::LocalDisk));
}

#[test]
fn no_claim_without_the_witness() {
    let mut c = follower();
    step(&mut c, Input::WitnessLost, t(1000));
    step(&mut c, Input::PeerSessionEnded { cause: EndCause::Eof, last_frame_at: t(1000) }, t(1000));
    assert!(asks(&step(&mut c, Input::Tick, t(10_000))).is_empty());
    assert_eq!(c.eligibility(), Err(Ineligible::NoWitness));
    step(&mut c, Input::WitnessView(None), t(10_000));
    assert_eq!(c.eligibility(), Err(Ineligible::WitnessNoState));
}

#[test]
fn no_claim_while_disabled_by_the_operator() {
    let mut c = follower();
    let out = step(&mut c, Input::Disable, t(1000));
    assert_eq!(out, vec![Action::Emit(Event::FailoverDisabled { reason: DisableReason::Operator })]);
    step(&mut c, Input::PeerSessionEnded { cause: EndCause::Eof, last_frame_at: t(1000) }, t(1000));
    assert!(asks(&step(&mut c, Input::Tick, t(10_000))).is_empty());
    assert_eq!(c.eligibility().unwrap_err().to_string(), "automatic failover disabled by the operator");
    let out = step(&mut c, Input::Enable, t(10_000));
    assert_eq!(out[0], Action::Emit(Event::FailoverEnabled));
    assert_eq!(asks(&out), vec![claim(5, B)]);
}

#[test]
fn the_budget_stops_the_next_claim_and_says_so() {
    let timings = FailoverTimings { max_auto_failovers: 1, ..T };
    let mut c = Controller::new(B, A, timings, Term(5), t(0));
    step(&mut c, Input::LocalDisk { uptodate: true }, t(0));
    step(&mut c, Input::WitnessView(Some(view(5, Some(A), 0b11))), t(0));
    step(&mut c, Input::PeerConnected { term: Term(5), primary: true }, t(0));
    step(&mut c, Input::PeerSessionEnded { cause: EndCause::Eof, last_frame_at: t(0) }, t(0));
    let out = step(&mut c, Input::Tick, t(0).plus(wait()));
    assert_eq!(asks(&out), vec![claim(5, B)]);
    let reply = Ok(view(6, Some(B), 0b10));
    step(&mut c, Input::WitnessReply { request: claim(5, B), reply }, t(2000));
    assert_eq!(c.failovers_in_window(t(2000)), 1);
    // Fenced by A's next term (A was granted solo meanwhile, say).
    let out = step(&mut c, Input::HigherTermSeen { term: Term(7) }, t(3000));
    assert!(out.contains(&Action::Demote { replaced: true }));
    assert_eq!(c.failovers_in_window(t(3000)), 2);
    step(&mut c, Input::ResyncDone, t(4000));
    step(&mut c, Input::WitnessView(Some(view(7, Some(A), 0b11))), t(4000));
    step(&mut c, Input::PeerSessionEnded { cause: EndCause::Eof, last_frame_at: t(5000) }, t(5000));
    let out = step(&mut c, Input::Tick, t(9000));
    assert_eq!(out, vec![Action::Emit(Event::FailoverDisabled { reason: DisableReason::Budget })]);
    assert_eq!(c.eligibility(), Err(Ineligible::Disabled(DisableReason::Budget)));
    assert!(asks(&step(&mut c, Input::Tick, t(10_000))).is_empty());
    // The window passes, but the budget stays used until the operator says.
    assert!(asks(&step(&mut c, Input::Tick, t(5_000_000))).is_empty());
    let out = step(&mut c, Input::Enable, t(5_000_000));
    assert_eq!(asks(&out), vec![claim(7, B)]);
}

// --- Candidate → Primary, refusals ---------------------------------------

#[test]
fn candidate_to_primary_on_grant_with_the_lease_from_the_claim() {
    let mut c = follower();
    step(&mut c, Input::PeerSessionEnded { cause: EndCause::Eof, last_frame_at: t(1500) }, t(1500));
    let sent = t(1000).plus(wait());
    step(&mut c, Input::Tick, sent);
    let granted = sent.plus(Duration::from_millis(3));
    let out = step(&mut c, Input::WitnessReply { request: claim(5, B), reply: Ok(view(6, Some(B), 0b10)) }, granted);
    assert_eq!(out[0], Action::PersistTerm(Term(6)), "the term is persisted before anything acts on it");
    let promote = out.iter().position(|a| *a == Action::Promote { term: Term(6) }).expect("promote");
    assert!(promote > 0);
    assert!(out.iter().any(|a| matches!(a, Action::Emit(Event::Promoted { term: Term(6), .. }))));
    assert_eq!(c.state(), State::Primary { term: Term(6) });
    assert_eq!(c.lease().deadline, Some(sent.plus(T.lease_params().holder_span())));
    assert!(c.may_serve(granted));
}

#[test]
fn a_refused_claim_backs_off_250ms_doubling_to_2s() {
    let mut c = follower();
    step(&mut c, Input::PeerSessionEnded { cause: EndCause::Eof, last_frame_at: t(1000) }, t(1000));
    let mut now = t(1000).plus(wait());
    step(&mut c, Input::Tick, now);
    let refused = Err(Refusal { reason: RefuseReason::PrimaryAlive, view: Some(view(5, Some(A), 0b11)) });
    let mut delays = Vec::new();
    for _ in 0..6 {
        step(&mut c, Input::WitnessReply { request: claim(5, B), reply: refused }, now);
        let State::Candidate { claim: ClaimState::Backoff { at, delay, .. }, .. } = c.state() else {
            panic!("{:?}", c.state())
        };
        delays.push(delay.as_millis());
        assert!(asks(&step(&mut c, Input::Tick, MonoTime(at.0 - 1))).is_empty());
        now = at;
        assert_eq!(asks(&step(&mut c, Input::Tick, now)), vec![claim(5, B)]);
    }
    assert_eq!(delays, vec![250, 500, 1000, 2000, 2000, 2000]);
    // The primary comes back during a backoff: follow it.
    step(&mut c, Input::WitnessReply { request: claim(5, B), reply: refused }, now);
    step(&mut c, Input::PeerConnected { term: Term(5), primary: true }, now);
    assert_eq!(c.state(), State::Following { term: Term(5) });
}

#[test]
fn a_claim_refused_for_good_returns_to_following() {
    for reason in [RefuseReason::NotEligible, RefuseReason::AlreadyGranted, RefuseReason::StaleTerm] {
        let mut c = follower();
        step(&mut c, Input::PeerSessionEnded { cause: EndCause::Eof, last_frame_at: t(1000) }, t(1000));
        step(&mut c, Input::Tick, t(1000).plus(wait()));
        let w = if reason == RefuseReason::NotEligible { view(5, Some(A), 0b01) } else { view(6, Some(A), 0b01) };
        let out = step(
            &mut c,
            Input::WitnessReply { request: claim(5, B), reply: Err(Refusal { reason, view: Some(w) }) },
            t(3000),
        );
        assert_eq!(c.state(), State::Following { term: w.term }, "{reason}");
        assert!(out.contains(&Action::Emit(Event::Claim { term: Term(6), refused: Some(reason) })));
        assert_eq!(out.contains(&Action::PersistTerm(Term(6))), w.term == Term(6));
        assert!(c.eligibility().is_err(), "{reason}: outdated now");
    }
}

#[test]
fn a_candidate_never_renews_the_old_primary() {
    let mut c = follower();
    step(&mut c, Input::PeerSessionEnded { cause: EndCause::Eof, last_frame_at: t(1000) }, t(1000));
    step(&mut c, Input::Tick, t(1000).plus(wait()));
    // The old primary reconnects while the claim is in flight.
    step(&mut c, Input::PeerConnected { term: Term(5), primary: true }, t(2100));
    assert!(matches!(c.state(), State::Candidate { .. }));
    let out = step(&mut c, Input::Ping { term: Term(5) }, t(2101));
    assert_eq!(out, vec![Action::Pong { term: Term(5), primary_ok: false }]);
}

// --- Primary ↔ Suspended -------------------------------------------------

#[test]
fn primary_to_suspended_when_the_lease_expires_and_back_when_renewed() {
    let mut c = primary();
    let deadline = c.lease().deadline.unwrap();
    assert_eq!(deadline, t(10_000).plus(T.lease_params().holder_span()));
    assert!(c.may_serve(MonoTime(deadline.0 - 1)));
    assert!(!c.may_serve(deadline), "the reply-path check fails at the deadline, even before a Tick");
    let out = step(&mut c, Input::Tick, deadline);
    assert_eq!(out[0], Action::SuspendIo(SuspendReason::Lease));
    assert!(matches!(out[1], Action::Emit(Event::LeaseLost { term: Term(6), .. })));
    assert!(matches!(c.state(), State::Suspended { reason: SuspendReason::Lease, .. }));
    // A Pong for a Ping sent before the deadline, arriving late, renews
    // from its send time only.
    let late = deadline.plus(Duration::from_millis(100));
    let out =
        step(&mut c, Input::Pong { from: From::Witness, echo_sent: t(10_500), term: Term(6), primary_ok: true }, late);
    assert!(out.contains(&Action::ResumeIo));
    assert_eq!(c.state(), State::Primary { term: Term(6) });
    assert_eq!(c.lease().deadline, Some(t(10_500).plus(T.lease_params().holder_span())));
}

#[test]
fn a_pong_without_primary_ok_renews_nothing() {
    let mut c = primary();
    let before = c.lease();
    step(
        &mut c,
        Input::Pong { from: From::Witness, echo_sent: t(10_500), term: Term(6), primary_ok: false },
        t(10_600),
    );
    assert_eq!(c.lease(), before);
}

#[test]
fn a_lost_peer_keeps_the_primary_serving_until_a_write_needs_solo() {
    let mut c = primary();
    step(&mut c, Input::PeerSessionEnded { cause: EndCause::Eof, last_frame_at: t(10_100) }, t(10_100));
    assert_eq!(c.state(), State::Primary { term: Term(6) });
    assert!(c.may_serve(t(10_100)));
    let out = step(&mut c, Input::WriteNeedsSolo, t(10_200));
    assert_eq!(
        out,
        vec![
            Action::SuspendIo(SuspendReason::AwaitingSolo),
            Action::AskWitness(Request::Solo { term: Term(6), node: A })
        ]
    );
    assert!(!c.may_serve(t(10_200)));
    // Granted: primary alone in term 7.
    let solo = Request::Solo { term: Term(6), node: A };
    let out = step(&mut c, Input::WitnessReply { request: solo, reply: Ok(view(7, Some(A), 0b01)) }, t(10_210));
    assert_eq!(out[0], Action::PersistTerm(Term(7)));
    assert!(out.contains(&Action::Emit(Event::SoloGranted { term: Term(7) })));
    assert!(out.contains(&Action::ResumeIo));
    assert_eq!(c.state(), State::PrimarySolo { term: Term(7) });
    assert!(c.alone() && c.may_serve(t(10_210)));
}

#[test]
fn the_peer_back_before_the_solo_answer_resumes_with_it() {
    let mut c = primary();
    step(&mut c, Input::PeerSessionEnded { cause: EndCause::Eof, last_frame_at: t(10_100) }, t(10_100));
    step(&mut c, Input::WriteNeedsSolo, t(10_200));
    let out = step(&mut c, Input::PeerConnected { term: Term(6), primary: false }, t(10_300));
    assert_eq!(out, vec![Action::ResumeIo]);
    assert_eq!(c.state(), State::Primary { term: Term(6) });
    // The late grant still outdates the peer (it arrives in Primary: only
    // its term counts, and it names us).
    let solo = Request::Solo { term: Term(6), node: A };
    let out = step(&mut c, Input::WitnessReply { request: solo, reply: Ok(view(7, Some(A), 0b01)) }, t(10_400));
    assert!(out.contains(&Action::Demote { replaced: true }), "a higher term always fences a primary: {out:?}");
}

#[test]
fn a_solo_refused_because_the_peer_claimed_fences() {
    let mut c = primary();
    step(&mut c, Input::PeerSessionEnded { cause: EndCause::Eof, last_frame_at: t(10_100) }, t(10_100));
    step(&mut c, Input::WriteNeedsSolo, t(10_200));
    let solo = Request::Solo { term: Term(6), node: A };
    let refused = Err(Refusal { reason: RefuseReason::AlreadyGranted, view: Some(view(7, Some(B), 0b10)) });
    let out = step(&mut c, Input::WitnessReply { request: solo, reply: refused }, t(10_300));
    assert_eq!(out[0], Action::PersistTerm(Term(7)));
    assert!(out.contains(&Action::Demote { replaced: true }));
    assert!(out.contains(&Action::Emit(Event::Fenced { term: Term(7), reason: FenceReason::HigherTerm })));
    assert_eq!(c.state(), State::Fenced { term: Term(7) });
}

#[test]
fn an_unanswered_solo_is_retried() {
    let mut c = primary();
    step(&mut c, Input::PeerSessionEnded { cause: EndCause::Eof, last_frame_at: t(10_100) }, t(10_100));
    step(&mut c, Input::WriteNeedsSolo, t(10_200));
    let solo = Request::Solo { term: Term(6), node: A };
    step(&mut c, Input::WitnessUnreachable { request: solo }, t(10_300));
    assert!(asks(&step(&mut c, Input::Tick, t(10_400))).is_empty());
    assert_eq!(asks(&step(&mut c, Input::Tick, t(10_550))), vec![solo]);
}

// --- Suspended → Fenced → Following --------------------------------------

#[test]
fn suspended_to_fenced_on_a_higher_term() {
    let mut c = primary();
    step(&mut c, Input::Tick, t(11_000));
    assert!(matches!(c.state(), State::Suspended { .. }));
    let out = step(&mut c, Input::HigherTermSeen { term: Term(7) }, t(11_100));
    assert_eq!(
        out,
        vec![
            Action::PersistTerm(Term(7)),
            Action::Emit(Event::TermChanged { term: Term(7) }),
            Action::Demote { replaced: true },
            Action::Emit(Event::Fenced { term: Term(7), reason: FenceReason::HigherTerm }),
        ]
    );
}

#[test]
fn a_serving_primary_seeing_a_higher_term_stops_at_once() {
    let mut c = primary();
    let out = step(
        &mut c,
        Input::Pong { from: From::Witness, echo_sent: t(10_100), term: Term(7), primary_ok: false },
        t(10_101),
    );
    assert_eq!(out[0], Action::PersistTerm(Term(7)));
    assert!(out.contains(&Action::SuspendIo(SuspendReason::Lease)));
    assert_eq!(c.state(), State::Fenced { term: Term(7) });
    assert!(!c.may_serve(t(10_102)));
}

#[test]
fn suspended_to_fenced_after_fence_demote_after_unrenewed() {
    let mut c = primary();
    step(&mut c, Input::Tick, t(11_000));
    let fence_at = t(10_000).plus(T.fence_demote_after);
    assert_eq!(c.next_wakeup(t(11_000)), Some(fence_at));
    assert!(step(&mut c, Input::Tick, MonoTime(fence_at.0 - 1)).is_empty());
    let out = step(&mut c, Input::Tick, fence_at);
    assert!(out.contains(&Action::Demote { replaced: true }));
    assert!(out.contains(&Action::Emit(Event::Fenced { term: Term(6), reason: FenceReason::Unrenewed })));
    assert_eq!(c.state(), State::Fenced { term: Term(6) });
}

#[test]
fn fenced_to_following_when_the_resync_is_done() {
    let mut c = primary();
    step(&mut c, Input::HigherTermSeen { term: Term(7) }, t(10_100));
    assert_eq!(step(&mut c, Input::ResyncDone, t(12_000)), vec![]);
    assert_eq!(c.state(), State::Following { term: Term(7) });
    let out = step(&mut c, Input::Ping { term: Term(7) }, t(12_100));
    assert_eq!(out, vec![Action::Pong { term: Term(7), primary_ok: true }]);
}

// --- Primary-solo → Primary ---------------------------------------------

#[test]
fn primary_solo_to_primary_after_peer_uptodate() {
    let mut c = primary();
    step(&mut c, Input::PeerSessionEnded { cause: EndCause::Eof, last_frame_at: t(10_100) }, t(10_100));
    step(&mut c, Input::WriteNeedsSolo, t(10_200));
    let solo = Request::Solo { term: Term(6), node: A };
    step(&mut c, Input::WitnessReply { request: solo, reply: Ok(view(7, Some(A), 0b01)) }, t(10_210));
    step(&mut c, Input::PeerConnected { term: Term(6), primary: false }, t(10_300));
    let out = step(&mut c, Input::ResyncDone, t(10_400));
    let up = Request::PeerUptodate { term: Term(7), node: A, peer: B };
    assert_eq!(asks(&out), vec![up]);
    // No longer alone from the moment the request leaves.
    assert_eq!(c.state(), State::Primary { term: Term(7) });
    assert!(!c.alone());
    step(&mut c, Input::WitnessReply { request: up, reply: Ok(view(7, Some(A), 0b11)) }, t(10_410));
    assert_eq!(c.state(), State::Primary { term: Term(7) });
    assert_eq!(c.eligibility(), Err(Ineligible::Primary));
}

// --- Switchover -----------------------------------------------------------

#[test]
fn switchover_releases_and_hands_over() {
    let mut c = primary();
    let out = step(&mut c, Input::SwitchoverRequested, t(10_100));
    let release = Request::Release { term: Term(6), node: A };
    assert_eq!(out, vec![Action::SuspendIo(SuspendReason::Switchover), Action::AskWitness(release)]);
    assert!(!c.may_serve(t(10_100)));
    let out = step(&mut c, Input::WitnessReply { request: release, reply: Ok(view(6, None, 0b11)) }, t(10_110));
    assert_eq!(out, vec![Action::Demote { replaced: false }, Action::HandOverToPeer { term: Term(6) }]);
    assert_eq!(c.state(), State::Following { term: Term(6) });

    // The successor claims at once, without the wait, and it is not counted
    // against the budget.
    let mut b = follower();
    step(&mut b, Input::WitnessView(Some(view(5, None, 0b11))), t(1100));
    let out = step(&mut b, Input::HandOver { term: Term(5) }, t(1100));
    assert_eq!(asks(&out), vec![claim(5, B)]);
    step(&mut b, Input::WitnessReply { request: claim(5, B), reply: Ok(view(6, Some(B), 0b10)) }, t(1102));
    assert_eq!(b.state(), State::Primary { term: Term(6) });
    assert_eq!(b.failovers_in_window(t(1102)), 0);
}

#[test]
fn a_switchover_that_cannot_release_serves_again() {
    let mut c = primary();
    step(&mut c, Input::SwitchoverRequested, t(10_100));
    let release = Request::Release { term: Term(6), node: A };
    let out = step(&mut c, Input::WitnessUnreachable { request: release }, t(10_200));
    assert_eq!(out, vec![Action::ResumeIo]);
    assert_eq!(c.state(), State::Primary { term: Term(6) });
    step(&mut c, Input::SwitchoverRequested, t(10_300));
    assert_eq!(step(&mut c, Input::SwitchoverCancelled, t(10_400)), vec![Action::ResumeIo]);
}

// --- Cold start ------------------------------------------------------------

#[test]
fn cold_start_the_last_primary_claims_first() {
    let mut a = Controller::new(A, B, T, Term(5), t(0));
    let mut b = Controller::new(B, A, T, Term(5), t(0));
    for c in [&mut a, &mut b] {
        step(c, Input::LocalDisk { uptodate: true }, t(0));
        step(c, Input::WitnessView(Some(view(5, Some(A), 0b11))), t(0));
        step(c, Input::PeerConnected { term: Term(5), primary: false }, t(0));
    }
    assert_eq!(a.next_wakeup(t(0)), Some(t(0).plus(wait())));
    assert_eq!(b.next_wakeup(t(0)), Some(t(0).plus(wait() * 2)));
    assert_eq!(asks(&step(&mut a, Input::Tick, t(0).plus(wait()))), vec![claim(5, A)]);
    assert!(asks(&step(&mut b, Input::Tick, t(0).plus(wait()))).is_empty());
    // Without the witness nobody promotes.
    let mut c = Controller::new(B, A, T, Term(5), t(0));
    step(&mut c, Input::LocalDisk { uptodate: true }, t(0));
    assert!(asks(&step(&mut c, Input::Tick, t(100_000))).is_empty());
}

// --- Ping answers, illegal moves -----------------------------------------

#[test]
fn pings_are_answered_with_our_term() {
    let mut c = follower();
    // A lower term: refused with ours (R5), never renewed.
    assert_eq!(
        step(&mut c, Input::Ping { term: Term(4) }, t(1100)),
        vec![Action::Pong { term: Term(5), primary_ok: false }]
    );
    // A higher term is adopted (persisted first) and renewed.
    let out = step(&mut c, Input::Ping { term: Term(6) }, t(1200));
    assert_eq!(out[0], Action::PersistTerm(Term(6)));
    assert_eq!(*out.last().unwrap(), Action::Pong { term: Term(6), primary_ok: true });
    // A primary never says "you are primary" to its secondary.
    let mut p = primary();
    assert_eq!(
        step(&mut p, Input::Ping { term: Term(6) }, t(10_100)),
        vec![Action::Pong { term: Term(6), primary_ok: false }]
    );
}

#[test]
fn illegal_moves_are_refused_and_change_nothing() {
    let mut c = follower();
    let before = c.state();
    for input in [
        Input::WriteNeedsSolo,
        Input::SwitchoverRequested,
        Input::SwitchoverCancelled,
        Input::HandOver { term: Term(4) },
        Input::HigherTermSeen { term: Term(5) },
    ] {
        let e = c.step(input, t(2000)).unwrap_err();
        assert_eq!((e.input, e.state), (input.name(), "following"));
        assert_eq!(c.state(), before);
    }
    let e = c.step(Input::WriteNeedsSolo, t(2000)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Failover: write-needs-solo refused in state following: only a primary without a solo grant asks for one"
    );
    step(&mut c, Input::PeerSessionEnded { cause: EndCause::Eof, last_frame_at: t(1000) }, t(1000));
    step(&mut c, Input::Tick, t(1000).plus(wait()));
    assert_eq!(c.step(Input::ResyncDone, t(3000)).unwrap_err().state, "candidate");
    // A grant that does not name us is refused, not acted on.
    let e = c.step(Input::WitnessReply { request: claim(5, B), reply: Ok(view(6, Some(A), 1)) }, t(3000)).unwrap_err();
    assert!(e.detail.contains("answers no claim of ours"), "{e}");
    assert!(matches!(c.state(), State::Candidate { .. }));
    // Switchover without a connected peer.
    let mut p = primary();
    step(&mut p, Input::PeerSessionEnded { cause: EndCause::Eof, last_frame_at: t(10_100) }, t(10_100));
    assert!(p.step(Input::SwitchoverRequested, t(10_200)).unwrap_err().detail.contains("peer is not connected"));
}

// --- Operator's claim (`repctl promote` with failover on) -------------------

#[test]
fn an_operators_claim_goes_at_once_is_retried_through_the_backoff_and_not_counted() {
    // A fresh witness: nobody up to date, B is not eligible.
    let mut c = Controller::new(B, A, T, Term(0), t(0));
    step(&mut c, Input::LocalDisk { uptodate: true }, t(0));
    step(&mut c, Input::WitnessView(Some(view(0, None, 0))), t(0));
    assert!(c.eligibility().is_err());
    let forced = Request::Claim { term: Term(0), node: B, forced: true };
    let out = step(&mut c, Input::ClaimNow { forced: true }, t(10));
    assert_eq!(asks(&out), vec![forced], "at once, forced, without the wait");
    assert!(c.manual_claim());
    // The witness is in its startup holdoff: backoff, and retried although
    // this node is not eligible.
    let refusal = Refusal { reason: RefuseReason::StartupHoldoff, view: Some(view(0, None, 0)) };
    step(&mut c, Input::WitnessReply { request: forced, reply: Err(refusal) }, t(20));
    let at = t(20).plus(CLAIM_BACKOFF_MIN);
    assert_eq!(asks(&step(&mut c, Input::Tick, at)), vec![forced]);
    let out = step(&mut c, Input::WitnessReply { request: forced, reply: Ok(view(1, Some(B), 0b10)) }, at);
    assert!(out.contains(&Action::Promote { term: Term(1) }));
    assert!(!c.manual_claim());
    assert_eq!(c.failovers_in_window(at), 0, "an operator's promote is not an automatic failover");
}

#[test]
fn an_operators_claim_gives_up_after_its_deadline() {
    let mut c = Controller::new(B, A, T, Term(0), t(0));
    step(&mut c, Input::WitnessView(Some(view(0, None, 0))), t(0));
    let req = Request::Claim { term: Term(0), node: B, forced: false };
    step(&mut c, Input::ClaimNow { forced: false }, t(0));
    step(&mut c, Input::WitnessUnreachable { request: req }, t(1));
    let late = t(1).plus(MANUAL_CLAIM_FOR);
    assert!(asks(&step(&mut c, Input::Tick, late)).is_empty());
    assert_eq!(c.state(), State::Following { term: Term(0) });
    assert!(!c.manual_claim());
    // Refused outright (not eligible) ends it at once.
    step(&mut c, Input::ClaimNow { forced: false }, late);
    let refusal = Refusal { reason: RefuseReason::NotEligible, view: Some(view(0, None, 0)) };
    step(&mut c, Input::WitnessReply { request: req, reply: Err(refusal) }, late);
    assert_eq!((c.state(), c.manual_claim()), (State::Following { term: Term(0) }, false));
    // Only a secondary claims.
    assert!(primary().step(Input::ClaimNow { forced: false }, t(10_002)).is_err());
}

#[test]
fn a_node_that_released_its_term_claims_a_wait_after_its_peer() {
    // Without a hand-over message the peer claims by itself; the releaser
    // waits one more `wait`, so that the peer takes over.
    let mut c = primary();
    let release = Request::Release { term: Term(6), node: A };
    step(&mut c, Input::SwitchoverRequested, t(10_100));
    step(&mut c, Input::WitnessReply { request: release, reply: Ok(view(6, None, 0b11)) }, t(10_110));
    step(&mut c, Input::PeerConnected { term: Term(6), primary: false }, t(10_120));
    let peer_claims = t(10_110).plus(wait());
    assert!(asks(&step(&mut c, Input::Tick, peer_claims)).is_empty(), "the releaser lets the peer claim first");
    assert_eq!(asks(&step(&mut c, Input::Tick, peer_claims.plus(wait()))), vec![claim(6, A)]);
}

#[test]
fn a_resync_reported_after_the_session_ended_readmits_nobody() {
    // A stale "peer in sync" reading must not make the witness count a peer
    // up to date that misses the writes since its session ended.
    let mut c = primary();
    step(&mut c, Input::WitnessView(Some(view(6, Some(A), 0b01))), t(10_002));
    step(&mut c, Input::PeerSessionEnded { cause: EndCause::Silence, last_frame_at: t(10_002) }, t(10_003));
    let out = step(&mut c, Input::ResyncDone, t(10_004));
    assert!(asks(&out).is_empty(), "{out:?}");
    // The same report while the session is up asks PeerUptodate.
    step(&mut c, Input::PeerConnected { term: Term(6), primary: false }, t(10_005));
    let out = step(&mut c, Input::ResyncDone, t(10_006));
    assert_eq!(asks(&out), vec![Request::PeerUptodate { term: Term(6), node: A, peer: B }]);
}
