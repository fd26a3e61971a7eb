//! One test per row of the decision table and per policy, and the mirror
//! property over random views. The history simulation is in `sim.rs`.

use proptest::prelude::*;

use super::*;

const A: u64 = 0xA0;
const B: u64 = 0xB0;
const C: u64 = 0xC0;
const D: u64 = 0xD0;
const E: u64 = 0xE0;

/// An uptodate secondary in generation A at LSN 100, nothing marked, its WAL
/// reaching back to LSN 50.
fn view() -> SideView {
    SideView {
        role: Role::Secondary,
        disk: DiskState::UpToDate,
        gen_ids: GenIds { current: A, bitmap: 0, history: [0; 4] },
        gen_created_ms: 1_000,
        local_lsn: 100,
        dirty_bytes: 0,
        bitmap_base_lsn: 0,
        log_first_lsn: 50,
        discard_my_data: false,
    }
}

fn gens(current: u64, bitmap: u64, history: &[u64]) -> GenIds {
    let mut h = [0; 4];
    h[..history.len()].copy_from_slice(history);
    GenIds { current, bitmap, history: h }
}

fn primary(mut v: SideView) -> SideView {
    v.role = Role::Primary;
    v
}

const DEFAULT: SplitBrainPolicy =
    SplitBrainPolicy { after_sb_0pri: AfterSb0Pri::Disconnect, after_sb_1pri: AfterSb1Pri::Disconnect };

/// Decides both ways, checks the mirror property, returns the local verdict.
fn both(local: &SideView, peer: &SideView, policy: &SplitBrainPolicy) -> Verdict {
    let v = decide(local, peer, policy);
    let m = decide(peer, local, policy);
    assert_eq!(m.decision, v.decision.mirrored(), "mirror of {v:?} is {m:?}");
    assert_eq!(m.rule, v.rule, "both sides name the same rule");
    assert!(!v.explanation.is_empty());
    v
}

#[track_caller]
fn expect(local: &SideView, peer: &SideView, decision: Decision, rule: &str) -> Verdict {
    let v = both(local, peer, &DEFAULT);
    assert_eq!((&v.decision, v.rule), (&decision, rule), "{}", v.explanation);
    v
}

#[track_caller]
fn expect_refused(local: &SideView, peer: &SideView, rule: &str, words: &str) {
    let v = both(local, peer, &DEFAULT);
    match &v.decision {
        Decision::Refuse(why) => {
            let text = format!("{why} / {}", v.explanation);
            assert!(text.contains(words), "{text:?} should say {words:?}");
        }
        other => panic!("expected a refusal, got {other:?} ({})", v.explanation),
    }
    assert_eq!(v.rule, rule);
}

// --- Row 0: preconditions ---------------------------------------------------

#[test]
fn row0_a_side_without_disk_is_refused() {
    for disk in [DiskState::Diskless, DiskState::Unknown] {
        let peer = SideView { disk, ..view() };
        expect_refused(&view(), &peer, rule::NO_DISK, "the peer has no usable disk");
        expect_refused(&peer, &view(), rule::NO_DISK, "this node has no usable disk");
    }
}

#[test]
fn row0_two_primaries_are_refused_even_in_sync() {
    expect_refused(&primary(view()), &primary(view()), rule::TWO_PRIMARIES, "both nodes are primary");
}

// --- Row 1: nothing usable ---------------------------------------------------

fn blank(current: u64) -> SideView {
    SideView { disk: DiskState::Inconsistent, gen_ids: gens(current, 0, &[]), local_lsn: 0, log_first_lsn: 1, ..view() }
}

#[test]
fn row1_two_blank_secondaries_wait() {
    expect(&blank(A), &blank(B), Decision::NoSync, rule::FRESH);
}

#[test]
fn row1_the_primary_of_two_inconsistent_disks_sends_everything() {
    expect(&primary(blank(A)), &blank(B), Decision::Source(ResyncKind::Full), rule::FRESH);
    expect(&blank(A), &primary(blank(B)), Decision::Target(ResyncKind::Full), rule::FRESH);
}

#[test]
fn row1_two_written_inconsistent_secondaries_are_refused() {
    let written = SideView { local_lsn: 7, ..blank(A) };
    expect_refused(&written, &blank(B), rule::BOTH_INCONSISTENT, "promote --force");
    expect_refused(&written, &SideView { local_lsn: 9, ..blank(A) }, rule::BOTH_INCONSISTENT, "neither");
}

#[test]
fn row1_without_generations_the_usable_disk_sends() {
    let legacy = SideView { gen_ids: gens(0, 0, &[]), ..view() };
    let empty = SideView { disk: DiskState::Inconsistent, ..legacy };
    expect(&legacy, &empty, Decision::Source(ResyncKind::Full), rule::FRESH);
    expect_refused(&legacy, &SideView { local_lsn: 3, ..legacy }, rule::BOTH_INCONSISTENT, "neither");
}

// --- Row 2: one inconsistent ---------------------------------------------------

#[test]
fn row2_an_interrupted_resync_resumes_from_the_bitmap() {
    let source = SideView { dirty_bytes: 1 << 20, bitmap_base_lsn: 90, ..primary(view()) };
    let target = SideView { disk: DiskState::Inconsistent, local_lsn: 95, ..view() };
    expect(&source, &target, Decision::Source(ResyncKind::Bitmap), rule::RESUME);
    expect(&target, &source, Decision::Target(ResyncKind::Bitmap), rule::RESUME);
}

#[test]
fn row2_resume_is_full_when_the_bitmap_does_not_reach_back() {
    let source = SideView { dirty_bytes: 4096, bitmap_base_lsn: 96, ..view() };
    let target = SideView { disk: DiskState::Inconsistent, local_lsn: 95, ..view() };
    let v = expect(&source, &target, Decision::Source(ResyncKind::Full), rule::RESUME);
    assert!(v.explanation.contains("before the bitmap base 96"), "{}", v.explanation);
}

#[test]
fn row2_an_inconsistent_disk_of_another_generation_gets_everything() {
    let target = SideView { disk: DiskState::Inconsistent, gen_ids: gens(B, 0, &[]), ..view() };
    expect(&primary(view()), &target, Decision::Source(ResyncKind::Full), rule::INCONSISTENT);
    // Even a node that is further in the log: its disk is not usable.
    let further = SideView { local_lsn: 500, ..target };
    expect(&view(), &further, Decision::Source(ResyncKind::Full), rule::INCONSISTENT);
}

#[test]
fn row2_an_inconsistent_primary_is_never_the_target() {
    let target = SideView { disk: DiskState::Inconsistent, ..primary(view()) };
    expect_refused(&view(), &target, rule::PRIMARY_TARGET, "the peer is primary but would be the sync target");
}

// --- Row 3: same generation ------------------------------------------------------

#[test]
fn row3_same_generation_and_lsn_without_marks_is_in_sync() {
    expect(&primary(view()), &view(), Decision::NoSync, rule::IN_SYNC);
    let consistent = SideView { disk: DiskState::Consistent, ..view() };
    expect(&view(), &consistent, Decision::NoSync, rule::IN_SYNC);
}

#[test]
fn row3_the_node_further_in_the_log_catches_the_other_up_from_its_wal() {
    let source = SideView { local_lsn: 120, dirty_bytes: 8192, bitmap_base_lsn: 100, ..view() };
    let v = expect(&source, &view(), Decision::Source(ResyncKind::Log), rule::SAME_GENERATION);
    assert!(v.explanation.contains("LSN 101..=120"), "{}", v.explanation);
}

#[test]
fn row3_bitmap_when_the_target_has_marks_of_its_own() {
    let source = SideView { local_lsn: 120, dirty_bytes: 8192, bitmap_base_lsn: 100, ..view() };
    let target = SideView { dirty_bytes: 4096, ..view() };
    expect(&source, &target, Decision::Source(ResyncKind::Bitmap), rule::SAME_GENERATION);
}

#[test]
fn row3_bitmap_when_the_wal_no_longer_reaches_back() {
    let source = SideView { local_lsn: 120, dirty_bytes: 8192, bitmap_base_lsn: 100, log_first_lsn: 102, ..view() };
    let v = expect(&source, &view(), Decision::Source(ResyncKind::Bitmap), rule::SAME_GENERATION);
    assert!(v.explanation.contains("WAL starts at LSN 102"), "{}", v.explanation);
    // Exactly the next record is still a catch-up.
    let source = SideView { log_first_lsn: 101, ..source };
    expect(&source, &view(), Decision::Source(ResyncKind::Log), rule::SAME_GENERATION);
}

#[test]
fn row3_full_when_the_bitmap_base_is_past_the_targets_log() {
    let source = SideView { local_lsn: 120, dirty_bytes: 8192, bitmap_base_lsn: 101, ..view() };
    expect(&source, &view(), Decision::Source(ResyncKind::Full), rule::SAME_GENERATION);
}

#[test]
fn row3_same_lsn_the_node_with_marks_sends_a_bitmap() {
    // Its in-flight records reached the peer but were never acknowledged: the
    // marks cover them. Nothing to replay, so not a log catch-up.
    let marked = SideView { dirty_bytes: 4096, bitmap_base_lsn: 98, ..view() };
    expect(&marked, &view(), Decision::Source(ResyncKind::Bitmap), rule::SAME_GENERATION);
    let more = SideView { dirty_bytes: 8192, ..marked };
    expect(&more, &marked, Decision::Source(ResyncKind::Bitmap), rule::SAME_GENERATION);
}

#[test]
fn row3_ties_go_to_the_primary_then_the_better_disk() {
    let marked = SideView { dirty_bytes: 4096, bitmap_base_lsn: 98, ..view() };
    expect(&primary(marked), &marked, Decision::Source(ResyncKind::Bitmap), rule::SAME_GENERATION);
    let outdated = SideView { disk: DiskState::Outdated, ..marked };
    expect(&marked, &outdated, Decision::Source(ResyncKind::Bitmap), rule::SAME_GENERATION);
}

#[test]
fn row3_same_lsn_the_primary_sends_even_to_a_node_with_marks() {
    // A secondary restarted after a crash re-marks records it got from the
    // primary: it must not become the source of (hence refuse) the primary.
    let remarked = SideView { dirty_bytes: 8192, ..view() };
    expect(&primary(view()), &remarked, Decision::Source(ResyncKind::Bitmap), rule::SAME_GENERATION);
}

#[test]
fn row3_identical_views_with_marks_are_refused() {
    // Verify marked the same blocks on both nodes: they may differ and
    // nothing says which copy is right.
    let marked = SideView { dirty_bytes: 4096, ..view() };
    expect_refused(&marked, &marked, rule::SAME_GENERATION, "promote the node whose data is to be kept");
    // A primary settles it.
    expect(&primary(marked), &marked, Decision::Source(ResyncKind::Bitmap), rule::SAME_GENERATION);
}

#[test]
fn row3_a_primary_behind_in_the_log_is_refused() {
    let further = SideView { local_lsn: 120, ..view() };
    expect_refused(&primary(view()), &further, rule::PRIMARY_TARGET, "this node is primary");
}

// --- Row 4: one node wrote since the other's generation ----------------------------

/// A node that wrote since generation A (now B), from LSN 100 to 150.
fn ahead() -> SideView {
    SideView {
        gen_ids: gens(B, A, &[]),
        gen_created_ms: 2_000,
        local_lsn: 150,
        dirty_bytes: 50 * 4096,
        bitmap_base_lsn: 100,
        ..view()
    }
}

#[test]
fn row4_the_node_that_wrote_catches_the_other_up() {
    expect(&primary(ahead()), &view(), Decision::Source(ResyncKind::Log), rule::NEWER_GENERATION);
    expect(&view(), &ahead(), Decision::Target(ResyncKind::Log), rule::NEWER_GENERATION);
}

#[test]
fn row4_bitmap_after_a_failover_when_the_old_primary_has_unacknowledged_writes() {
    // The old primary (now restarted as secondary) had records 101..=110 in
    // flight; recovery marked them. The promoted node wrote 101..=150.
    let old_primary = SideView { local_lsn: 110, dirty_bytes: 10 * 4096, bitmap_base_lsn: 100, ..view() };
    expect(&ahead(), &old_primary, Decision::Source(ResyncKind::Bitmap), rule::NEWER_GENERATION);
}

#[test]
fn row4_bitmap_when_the_wal_was_recycled_and_full_when_the_bitmap_is_younger() {
    let recycled = SideView { log_first_lsn: 140, ..ahead() };
    expect(&recycled, &view(), Decision::Source(ResyncKind::Bitmap), rule::NEWER_GENERATION);
    let behind = SideView { local_lsn: 90, ..view() };
    expect(&ahead(), &behind, Decision::Source(ResyncKind::Full), rule::NEWER_GENERATION);
}

#[test]
fn row4_the_node_that_wrote_is_never_overwritten_by_a_primary() {
    // The old generation's node was promoted while still disconnected, then
    // demoted... no: it is primary right now and would be the target.
    expect_refused(&ahead(), &primary(view()), rule::PRIMARY_TARGET, "the peer is primary");
}

#[test]
fn row4_contradicting_generations_are_unrelated() {
    let x = SideView { gen_ids: gens(A, B, &[]), ..view() };
    let y = SideView { gen_ids: gens(B, A, &[]), ..view() };
    expect(&x, &y, Decision::Unrelated, rule::UNRELATED);
}

// --- Row 5: split brain --------------------------------------------------------------

/// Both wrote since generation A: this node is in B, the peer in C.
fn split() -> (SideView, SideView) {
    let me = SideView { dirty_bytes: 3 * 4096, ..ahead() };
    let peer =
        SideView { gen_ids: gens(C, A, &[]), gen_created_ms: 3_000, local_lsn: 130, dirty_bytes: 8 * 4096, ..ahead() };
    (me, peer)
}

#[test]
fn row5_both_wrote_since_the_same_generation_is_a_split_brain() {
    let (me, peer) = split();
    let v = expect(&me, &peer, Decision::SplitBrain, rule::SPLIT_BRAIN);
    assert!(v.explanation.contains("this node: 12288 bytes marked, the peer: 32768"), "{}", v.explanation);
    assert!(v.explanation.contains("--discard-my-data"), "{}", v.explanation);
    // The same with one primary: nothing is automatic by default.
    expect(&primary(me), &peer, Decision::SplitBrain, rule::SPLIT_BRAIN);
}

#[test]
fn row5_discard_my_data_makes_that_node_the_bitmap_target() {
    let (me, peer) = split();
    let victim = SideView { discard_my_data: true, ..me };
    let v = expect(&victim, &peer, Decision::Target(ResyncKind::Bitmap), rule::SB_DISCARD_MY_DATA);
    assert!(v.explanation.contains("this node is the target"), "{}", v.explanation);
    let victim = SideView { discard_my_data: true, ..peer };
    expect(&me, &victim, Decision::Source(ResyncKind::Bitmap), rule::SB_DISCARD_MY_DATA);
    // A survivor that is primary is fine.
    expect(&primary(me), &victim, Decision::Source(ResyncKind::Bitmap), rule::SB_DISCARD_MY_DATA);
}

#[test]
fn row5_discard_my_data_on_a_primary_or_on_both_is_refused() {
    let (me, peer) = split();
    let victim = SideView { discard_my_data: true, ..primary(me) };
    expect_refused(&victim, &peer, rule::PRIMARY_TARGET, "`repctl demote` it");
    let other = SideView { discard_my_data: true, ..peer };
    expect_refused(&SideView { discard_my_data: true, ..me }, &other, rule::SB_BOTH_DISCARD, "both nodes asked");
}

#[test]
fn row5_discard_my_data_is_full_when_the_survivors_bitmap_does_not_reach_back() {
    let (me, peer) = split();
    let victim = SideView { discard_my_data: true, local_lsn: 90, ..me };
    expect(&victim, &peer, Decision::Target(ResyncKind::Full), rule::SB_DISCARD_MY_DATA);
}

#[test]
fn discard_my_data_without_split_brain_changes_nothing_and_says_so() {
    let me = SideView { discard_my_data: true, ..ahead() };
    let v = expect(&me, &view(), Decision::Source(ResyncKind::Log), rule::NEWER_GENERATION);
    assert!(v.explanation.contains("--discard-my-data has no effect"), "{}", v.explanation);
}

// --- Split-brain policies ------------------------------------------------------------

fn policy0(p: AfterSb0Pri) -> SplitBrainPolicy {
    SplitBrainPolicy { after_sb_0pri: p, ..DEFAULT }
}

fn policy1(p: AfterSb1Pri) -> SplitBrainPolicy {
    SplitBrainPolicy { after_sb_1pri: p, ..DEFAULT }
}

#[track_caller]
fn expect_policy(me: &SideView, peer: &SideView, policy: SplitBrainPolicy, decision: Decision, rule: &str) {
    let v = both(me, peer, &policy);
    assert_eq!((&v.decision, v.rule), (&decision, rule), "{}", v.explanation);
}

#[test]
fn policy_0pri_discard_younger_primary() {
    let (me, peer) = split(); // the peer's generation is younger (3000 > 2000)
    let p = policy0(AfterSb0Pri::DiscardYoungerPrimary);
    expect_policy(&me, &peer, p, Decision::Source(ResyncKind::Bitmap), rule::SB_DISCARD_YOUNGER_PRIMARY);
    let same_age = SideView { gen_created_ms: me.gen_created_ms, ..peer };
    expect_policy(&me, &same_age, p, Decision::SplitBrain, rule::SPLIT_BRAIN);
    // Only with no primary.
    expect_policy(&primary(me), &peer, p, Decision::SplitBrain, rule::SPLIT_BRAIN);
}

#[test]
fn policy_0pri_discard_least_changes() {
    let (me, peer) = split(); // this node changed less
    let p = policy0(AfterSb0Pri::DiscardLeastChanges);
    expect_policy(&me, &peer, p, Decision::Target(ResyncKind::Bitmap), rule::SB_DISCARD_LEAST_CHANGES);
    let same = SideView { dirty_bytes: me.dirty_bytes, ..peer };
    expect_policy(&me, &same, p, Decision::SplitBrain, rule::SPLIT_BRAIN);
}

#[test]
fn policy_0pri_discard_zero_changes() {
    let (me, peer) = split();
    let p = policy0(AfterSb0Pri::DiscardZeroChanges);
    expect_policy(&me, &peer, p, Decision::SplitBrain, rule::SPLIT_BRAIN);
    let idle = SideView { dirty_bytes: 0, ..peer };
    expect_policy(&me, &idle, p, Decision::Source(ResyncKind::Bitmap), rule::SB_DISCARD_ZERO_CHANGES);
    // Neither wrote: the younger generation gives way; same age: stay.
    let me_idle = SideView { dirty_bytes: 0, ..me };
    expect_policy(&me_idle, &idle, p, Decision::Source(ResyncKind::Bitmap), rule::SB_DISCARD_ZERO_CHANGES);
    let same_age = SideView { gen_created_ms: me.gen_created_ms, ..idle };
    expect_policy(&me_idle, &same_age, p, Decision::SplitBrain, rule::SPLIT_BRAIN);
}

#[test]
fn policy_0pri_disconnect_is_the_default() {
    let (me, peer) = split();
    expect_policy(&me, &peer, SplitBrainPolicy::default(), Decision::SplitBrain, rule::SPLIT_BRAIN);
}

#[test]
fn policy_1pri_discard_secondary() {
    let (me, peer) = split();
    let p = policy1(AfterSb1Pri::DiscardSecondary);
    expect_policy(&primary(me), &peer, p, Decision::Source(ResyncKind::Bitmap), rule::SB_DISCARD_SECONDARY);
    expect_policy(&me, &primary(peer), p, Decision::Target(ResyncKind::Bitmap), rule::SB_DISCARD_SECONDARY);
    // Only with one primary.
    expect_policy(&me, &peer, p, Decision::SplitBrain, rule::SPLIT_BRAIN);
}

#[test]
fn policy_1pri_discard_zero_changes() {
    let (me, peer) = split();
    let p = policy1(AfterSb1Pri::DiscardZeroChanges);
    expect_policy(&primary(me), &peer, p, Decision::SplitBrain, rule::SPLIT_BRAIN);
    let idle = SideView { dirty_bytes: 0, ..peer };
    expect_policy(&primary(me), &idle, p, Decision::Source(ResyncKind::Bitmap), rule::SB_DISCARD_ZERO_CHANGES);
    // The primary wrote nothing: it still cannot be the target.
    let v = both(&idle, &primary(me), &p);
    assert_eq!(v.decision, Decision::Target(ResyncKind::Bitmap));
    let v = both(&primary(idle), &me, &p);
    assert_eq!((v.decision, v.rule), (Decision::SplitBrain, rule::SPLIT_BRAIN));
    assert!(v.explanation.contains("a primary is never the target"), "{}", v.explanation);
}

#[test]
fn policies_never_override_discard_my_data() {
    let (me, peer) = split();
    let victim = SideView { discard_my_data: true, ..peer };
    let p = policy0(AfterSb0Pri::DiscardLeastChanges); // would discard this node's changes
    expect_policy(&me, &victim, p, Decision::Source(ResyncKind::Bitmap), rule::SB_DISCARD_MY_DATA);
}

// --- Row 6: generations behind ----------------------------------------------------------

#[test]
fn row6_a_node_generations_behind_gets_everything() {
    // This node went A -> B -> C (B and A in its history); the peer is in A.
    let me = SideView { gen_ids: gens(C, 0, &[B, A]), local_lsn: 300, ..view() };
    let old = SideView { gen_ids: gens(A, 0, &[]), ..view() };
    expect(&me, &old, Decision::Source(ResyncKind::Full), rule::OLDER_GENERATION);
    expect(&old, &me, Decision::Target(ResyncKind::Full), rule::OLDER_GENERATION);
}

#[test]
fn row6_comes_before_the_history_split_brain() {
    // The design listed "the histories meet" (split brain) before "the peer's
    // current is in my history". Here both histories hold A, yet the peer
    // simply stayed in B while this node moved on to C: not a split brain.
    let me = SideView { gen_ids: gens(C, 0, &[B, A]), local_lsn: 300, ..view() };
    let peer = SideView { gen_ids: gens(B, 0, &[A]), ..view() };
    expect(&me, &peer, Decision::Source(ResyncKind::Full), rule::OLDER_GENERATION);
}

// --- Row 7: split brain further back ------------------------------------------------------

#[test]
fn row7_generations_meeting_in_the_histories_are_a_split_brain_resolved_in_full() {
    let me = SideView { gen_ids: gens(C, B, &[A]), ..view() };
    let peer = SideView { gen_ids: gens(E, D, &[A]), ..view() };
    expect(&me, &peer, Decision::SplitBrain, rule::SPLIT_BRAIN);
    let victim = SideView { discard_my_data: true, ..peer };
    expect(&me, &victim, Decision::Source(ResyncKind::Full), rule::SB_DISCARD_MY_DATA);
    // A bitmap generation found in the other's history counts too.
    let peer = SideView { gen_ids: gens(E, 0, &[B]), ..view() };
    expect(&me, &peer, Decision::SplitBrain, rule::SPLIT_BRAIN);
}

// --- Row 8: unrelated ---------------------------------------------------------------------

#[test]
fn row8_no_common_generation_is_unrelated() {
    let me = SideView { gen_ids: gens(A, B, &[C]), ..view() };
    let peer = SideView { gen_ids: gens(D, E, &[]), ..view() };
    let v = expect(&me, &peer, Decision::Unrelated, rule::UNRELATED);
    assert!(v.explanation.contains("create-md --force"), "{}", v.explanation);
    // Even with --discard-my-data.
    expect(&me, &SideView { discard_my_data: true, ..peer }, Decision::Unrelated, rule::UNRELATED);
}

#[test]
fn decision_names_and_mirror() {
    assert_eq!(Decision::Source(ResyncKind::Log).mirrored(), Decision::Target(ResyncKind::Log));
    assert_eq!(Decision::SplitBrain.mirrored(), Decision::SplitBrain);
    assert_eq!(Decision::Target(ResyncKind::Full).to_string(), "target (full resync)");
    assert_eq!(Decision::Refuse("x".into()).as_str(), "refuse");
    assert_eq!(Decision::Source(ResyncKind::Log).as_str(), "source-log");
    assert_eq!(Decision::Target(ResyncKind::Full).as_str(), "target-full");
    assert_eq!(Decision::Source(ResyncKind::Bitmap).kind(), Some(ResyncKind::Bitmap));
    assert_eq!(serde_json::to_value(ResyncKind::Bitmap).ok(), Some(serde_json::json!("bitmap")));
    let v = decide(&view(), &ahead(), &DEFAULT);
    assert_eq!(
        v.to_json(),
        serde_json::json!({
            "result": "target-log", "rule": "newer-generation", "explanation": v.explanation
        })
    );
    let v = decide(&primary(view()), &primary(view()), &DEFAULT);
    assert_eq!(v.to_json()["result"], "refuse");
}

// --- Mirror property over random views ------------------------------------------------------

fn small_gen() -> impl Strategy<Value = u64> {
    prop_oneof![Just(0u64), Just(A), Just(B), Just(C), Just(D)]
}

fn any_view() -> impl Strategy<Value = SideView> {
    (
        (any::<bool>(), 0..6u8, small_gen(), small_gen(), proptest::array::uniform4(small_gen())),
        (0..3u64, 0..4u64, prop_oneof![Just(0u64), Just(4096), Just(8192)], 0..4u64, 0..5u64, any::<bool>()),
    )
        .prop_map(|((pri, disk, current, bitmap, history), (ms, lsn, dirty, base, first, discard))| SideView {
            role: if pri { Role::Primary } else { Role::Secondary },
            disk: [
                DiskState::UpToDate,
                DiskState::Consistent,
                DiskState::Outdated,
                DiskState::Inconsistent,
                DiskState::Inconsistent,
                DiskState::Diskless,
            ][disk as usize],
            gen_ids: GenIds { current, bitmap, history },
            gen_created_ms: ms,
            local_lsn: lsn,
            dirty_bytes: dirty,
            bitmap_base_lsn: base,
            log_first_lsn: first,
            discard_my_data: discard && lsn % 2 == 0,
        })
}

fn any_policy() -> impl Strategy<Value = SplitBrainPolicy> {
    (0..4usize, 0..3usize).prop_map(|(a, b)| SplitBrainPolicy {
        after_sb_0pri: AfterSb0Pri::parse(AfterSb0Pri::NAMES[a]).unwrap_or_default(),
        after_sb_1pri: AfterSb1Pri::parse(AfterSb1Pri::NAMES[b]).unwrap_or_default(),
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4_000))]

    /// decide(a, b) mirrors decide(b, a), with the same rule; a primary is
    /// never the target; a log catch-up never goes to a node with marks.
    #[test]
    fn decide_mirrors_and_never_targets_a_primary(a in any_view(), b in any_view(), policy in any_policy()) {
        let v = decide(&a, &b, &policy);
        let m = decide(&b, &a, &policy);
        prop_assert_eq!(&m.decision, &v.decision.mirrored());
        prop_assert_eq!(m.rule, v.rule);
        match v.decision {
            Decision::Target(k) => {
                prop_assert_eq!(a.role, Role::Secondary);
                prop_assert!(k != ResyncKind::Log || a.dirty_bytes == 0);
            }
            Decision::Source(k) => {
                prop_assert_eq!(b.role, Role::Secondary);
                prop_assert!(k != ResyncKind::Log || b.dirty_bytes == 0);
            }
            _ => {}
        }
    }
}
