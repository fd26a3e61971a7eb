//! The resync decision (design.md §4, docs/resync.md): given what each node
//! says about itself at connect, who sends what to whom.
//!
//! [`decide`] is a pure function of the two [`SideView`]s and the
//! [`SplitBrainPolicy`]. Both nodes send their view (the SyncInfo message)
//! right after the handshake and both call `decide(mine, theirs, policy)`;
//! the verdicts mirror each other (`Source(k)` here is `Target(k)` there)
//! and name the same [`rule`], so the two nodes never need a second round
//! to agree. The engine logs the verdict (info; warn for a split brain),
//! shows it in `status` (`decision`: result, rule, explanation) and emits a
//! `decision` event; `repctl connect --dry-run` prints it and stops there.
//!
//! Tested by one unit test per table row and per policy, a mirror property
//! over random views (`decide/tests.rs`), and a property test over random
//! two-node histories with a model of generations, bitmaps and
//! acknowledgements (`decide/sim.rs`): a node holding acknowledged writes
//! the other lacks is never made the target, except by `--discard-my-data`
//! or an opt-in policy, and every chosen kind of resync ends with identical
//! copies.

use std::fmt;

use crate::model::{AfterSb0Pri, AfterSb1Pri, DiskState, GenIds, Lsn, ResyncKind, Role, SplitBrainPolicy};

// ---------------------------------------------------------------------------
// The views and the verdict.
// ---------------------------------------------------------------------------

/// What one node says about itself at connect (the SyncInfo message carries
/// exactly these fields). Both nodes call [`decide`] with the same two views,
/// each with itself as `local`, and reach mirrored verdicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SideView {
    pub role: Role,
    pub disk: DiskState,
    pub gen_ids: GenIds,
    /// Unix milliseconds when `gen.current` was made (`discard-younger-primary`).
    pub gen_created_ms: u64,
    /// Last LSN in this node's log.
    pub local_lsn: Lsn,
    /// Bytes marked in this node's dirty bitmap.
    pub dirty_bytes: u64,
    /// The bitmap covers every block written by a record with LSN > this.
    pub bitmap_base_lsn: Lsn,
    /// Oldest LSN still in the WAL (a log catch-up can start here);
    /// `local_lsn + 1` when the WAL holds no record.
    pub log_first_lsn: Lsn,
    /// One-shot operator flag (`repctl connect --discard-my-data`).
    pub discard_my_data: bool,
}

/// What happens on this connection, seen from the local node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Both copies are the same: nothing to send.
    NoSync,
    /// We send.
    Source(ResyncKind),
    /// We receive.
    Target(ResyncKind),
    /// Both wrote since their last common generation: both go standalone,
    /// nothing moves until the operator (or an `after_sb_*` policy) decides.
    SplitBrain,
    /// No common generation: the two disks hold unrelated data; refused.
    Unrelated,
    /// Refused for the reason given (e.g. the target would be a primary).
    Refuse(String),
}

impl Decision {
    /// The same decision seen from the peer.
    pub fn mirrored(&self) -> Decision {
        match self {
            Decision::Source(k) => Decision::Target(*k),
            Decision::Target(k) => Decision::Source(*k),
            other => other.clone(),
        }
    }

    /// Short name for status, events and `connect --dry-run`: `no-sync`,
    /// `source-log`, `source-bitmap`, `source-full`, `target-log`,
    /// `target-bitmap`, `target-full`, `split-brain`, `unrelated`, `refuse`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Decision::NoSync => "no-sync",
            Decision::Source(ResyncKind::Log) => "source-log",
            Decision::Source(ResyncKind::Bitmap) => "source-bitmap",
            Decision::Source(ResyncKind::Full) => "source-full",
            Decision::Target(ResyncKind::Log) => "target-log",
            Decision::Target(ResyncKind::Bitmap) => "target-bitmap",
            Decision::Target(ResyncKind::Full) => "target-full",
            Decision::SplitBrain => "split-brain",
            Decision::Unrelated => "unrelated",
            Decision::Refuse(_) => "refuse",
        }
    }

    /// The sync kind, when data moves.
    pub fn kind(&self) -> Option<ResyncKind> {
        match self {
            Decision::Source(k) | Decision::Target(k) => Some(*k),
            _ => None,
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::Source(k) => write!(f, "source ({k} resync)"),
            Decision::Target(k) => write!(f, "target ({k} resync)"),
            Decision::Refuse(why) => write!(f, "refused: {why}"),
            other => f.write_str(other.as_str()),
        }
    }
}

/// The decision, the table rule that made it (a stable name, see [`rule`]),
/// and a sentence for logs, status and `repctl connect --dry-run`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub decision: Decision,
    pub rule: &'static str,
    pub explanation: String,
}

impl Verdict {
    /// The `decision` object of `status --json` and of the `decision` event:
    /// `{"result": "target-bitmap", "rule": "newer-generation",
    /// "explanation": "…"}` (a refusal's reason is in the explanation).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "result": self.decision.as_str(),
            "rule": self.rule,
            "explanation": self.explanation,
        })
    }
}

/// The rule names a [`Verdict`] can carry (documented in docs/resync.md).
/// Both nodes always report the same rule.
pub mod rule {
    /// A side has no disk (diskless or unknown): refused.
    pub const NO_DISK: &str = "no-disk";
    /// Both nodes are primary: refused.
    pub const TWO_PRIMARIES: &str = "two-primaries";
    /// Both disks blank or inconsistent: the primary (if any) sends all.
    pub const FRESH: &str = "fresh";
    /// Both disks inconsistent, no primary, not blank: refused.
    pub const BOTH_INCONSISTENT: &str = "both-inconsistent";
    /// An interrupted bitmap/full resync resumes (same current generation).
    pub const RESUME: &str = "resume";
    /// One disk inconsistent without the other's generation: full resync.
    pub const INCONSISTENT: &str = "inconsistent";
    /// Same generation, same LSN, no marked blocks: nothing to do.
    pub const IN_SYNC: &str = "in-sync";
    /// Same generation, one node further: it is the source.
    pub const SAME_GENERATION: &str = "same-generation";
    /// One node wrote since the other's generation: it is the source.
    pub const NEWER_GENERATION: &str = "newer-generation";
    /// One node's generation is in the other's history: full resync.
    pub const OLDER_GENERATION: &str = "older-generation";
    /// Both wrote since their last common generation.
    pub const SPLIT_BRAIN: &str = "split-brain";
    /// Split brain resolved by `--discard-my-data` on one node.
    pub const SB_DISCARD_MY_DATA: &str = "split-brain-discard-my-data";
    /// Both nodes asked to discard their data: refused.
    pub const SB_BOTH_DISCARD: &str = "split-brain-both-discard";
    /// Split brain resolved by `after_sb_0pri = "discard-younger-primary"`.
    pub const SB_DISCARD_YOUNGER_PRIMARY: &str = "split-brain-discard-younger-primary";
    /// Split brain resolved by `after_sb_0pri = "discard-least-changes"`.
    pub const SB_DISCARD_LEAST_CHANGES: &str = "split-brain-discard-least-changes";
    /// Split brain resolved by `discard-zero-changes` (0pri or 1pri).
    pub const SB_DISCARD_ZERO_CHANGES: &str = "split-brain-discard-zero-changes";
    /// Split brain resolved by `after_sb_1pri = "discard-secondary"`.
    pub const SB_DISCARD_SECONDARY: &str = "split-brain-discard-secondary";
    /// No common generation at all.
    pub const UNRELATED: &str = "unrelated";
    /// The table chose a primary as the target: refused.
    pub const PRIMARY_TARGET: &str = "primary-target";
}

// ---------------------------------------------------------------------------
// The decision table.
// ---------------------------------------------------------------------------

/// Decides what a connection does, from both nodes' views (design.md §4).
/// Pure: both nodes call it with the same two views (each as `local`) and
/// reach mirrored verdicts with the same rule. The table, first match wins
/// (docs/resync.md says it in words):
///
/// 0. A side without a disk, or two primaries → refused.
/// 1. Both disks inconsistent (or both without a generation): the primary,
///    if any, sends everything (`fresh`); two blank secondaries wait
///    (no sync); otherwise refused.
/// 2. One disk inconsistent: it is the target. Same current generation →
///    the interrupted resync resumes from the bitmap (`resume`), else full
///    (`inconsistent`).
/// 3. Same current generation: same LSN and no marked blocks → no sync
///    (`in-sync`); else the node with the higher LSN (then: the primary,
///    more marked bytes, better disk) sends (`same-generation`); if nothing
///    tells them apart, refused (the marked blocks may differ).
/// 4. One node's bitmap generation is the other's current: it wrote since
///    the other's generation and sends (`newer-generation`).
/// 5. Both bitmap generations equal: **split brain**.
/// 6. One node's current generation is in the other's history: the other
///    sends everything (`older-generation`).
/// 7. The generations meet further back in the histories: **split brain**
///    (only a full resync can resolve it).
/// 8. Otherwise: unrelated data.
///
/// A split brain is resolved only by `--discard-my-data` on one node or by
/// an opt-in `after_sb_*` policy. Whatever the table says, a primary is
/// never made the target (`primary-target`, refused).
///
/// The kind of a resync (rows 3 and 4), with S the source and T the target:
/// `Full` if T's log ends before S's bitmap base (S's bitmap does not cover
/// every block T may lack); else `Log` if T has no marked blocks and S's WAL
/// still holds every record after T's last LSN; else `Bitmap` (the union of
/// both bitmaps). `Log` is chosen only where `Bitmap` would also be valid, so
/// that a log catch-up cut short leaves a state a bitmap resync can finish.
pub fn decide(local: &SideView, peer: &SideView, policy: &SplitBrainPolicy) -> Verdict {
    let pair = Pair { local, peer };
    let Row { outcome, rule, mut explanation } = table(&pair, policy);
    // Always: a primary is never the target.
    if let Outcome::Send { from, .. } = outcome {
        let to = from.other();
        if pair.get(to).role == Role::Primary {
            // The reason is the same on both nodes; the explanation says which.
            // Every way out named here keeps what the operator chooses to
            // keep, and says what the other choice throws away (issue 14:
            // "demote it first" alone made a crashed node's unacknowledged
            // writes overwrite what the new primary had served).
            let message = "the primary would be the sync target: the other node holds data it lacks; nothing \
                           moves. To keep the other node's data, stop this primary's clients, `repctl demote` it \
                           and `repctl connect` both nodes (writes made on this primary since are discarded); to \
                           keep this primary's data, run `repctl invalidate` on the other node and `repctl \
                           connect` both (the other node's newer writes are discarded)"
                .to_string();
            explanation = format!("{} is primary but would be the sync target [{rule}: {explanation}]", to.who());
            return Verdict { decision: Decision::Refuse(message), rule: rule::PRIMARY_TARGET, explanation };
        }
    }
    let split_brain_rule = rule.starts_with("split-brain");
    if (local.discard_my_data || peer.discard_my_data) && !split_brain_rule {
        explanation.push_str(" (--discard-my-data has no effect: it only resolves a split brain)");
    }
    let decision = match outcome {
        Outcome::NoSync => Decision::NoSync,
        Outcome::Send { from: Side::Local, kind } => Decision::Source(kind),
        Outcome::Send { from: Side::Peer, kind } => Decision::Target(kind),
        Outcome::SplitBrain => Decision::SplitBrain,
        Outcome::Unrelated => Decision::Unrelated,
        Outcome::Refuse(why) => Decision::Refuse(why),
    };
    Verdict { decision, rule, explanation }
}

/// One side of the pair, relative to the node computing the decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Local,
    Peer,
}

impl Side {
    fn other(self) -> Side {
        match self {
            Side::Local => Side::Peer,
            Side::Peer => Side::Local,
        }
    }

    fn who(self) -> &'static str {
        match self {
            Side::Local => "this node",
            Side::Peer => "the peer",
        }
    }
}

/// The table's answer before the primary-target check, in sides.
enum Outcome {
    NoSync,
    Send { from: Side, kind: ResyncKind },
    SplitBrain,
    Unrelated,
    Refuse(String),
}

struct Row {
    outcome: Outcome,
    rule: &'static str,
    explanation: String,
}

fn row(outcome: Outcome, rule: &'static str, explanation: String) -> Row {
    Row { outcome, rule, explanation }
}

struct Pair<'a> {
    local: &'a SideView,
    peer: &'a SideView,
}

impl Pair<'_> {
    fn get(&self, side: Side) -> &SideView {
        match side {
            Side::Local => self.local,
            Side::Peer => self.peer,
        }
    }
}

/// `0123456789ABCDEF`, as the logs print generation ids.
struct G(u64);

impl fmt::Display for G {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016X}", self.0)
    }
}

fn table(v: &Pair, policy: &SplitBrainPolicy) -> Row {
    use Side::{Local, Peer};
    let (l, p) = (v.local, v.peer);

    // 0. Preconditions.
    for side in [Local, Peer] {
        let disk = v.get(side).disk;
        if matches!(disk, DiskState::Diskless | DiskState::Unknown) {
            let why = format!("{} has no usable disk ({disk})", side.who());
            return row(Outcome::Refuse("a node has no usable disk".into()), rule::NO_DISK, why);
        }
    }
    if l.role == Role::Primary && p.role == Role::Primary {
        let why = "both nodes are primary; demote one (two primaries would be a split brain)".to_string();
        return row(Outcome::Refuse(why.clone()), rule::TWO_PRIMARIES, why);
    }

    // 1. Nothing usable on either side.
    let (li, pi) = (l.disk == DiskState::Inconsistent, p.disk == DiskState::Inconsistent);
    if (li && pi) || (l.gen_ids.current == 0 && p.gen_ids.current == 0) {
        let usable = |s: &SideView| s.role == Role::Primary || s.disk != DiskState::Inconsistent;
        let from = match (usable(l), usable(p)) {
            (true, false) => Some(Local),
            (false, true) => Some(Peer),
            _ if l.role == Role::Primary => Some(Local),
            _ if p.role == Role::Primary => Some(Peer),
            _ => None,
        };
        if let Some(from) = from {
            let why = format!(
                "{} is the only node with usable data (the other disk is {}): full resync",
                from.who(),
                v.get(from.other()).disk
            );
            return row(Outcome::Send { from, kind: ResyncKind::Full }, rule::FRESH, why);
        }
        let blank = |s: &SideView| s.local_lsn == 0 && s.dirty_bytes == 0;
        if blank(l) && blank(p) {
            return row(
                Outcome::NoSync,
                rule::FRESH,
                "both disks are blank and neither node is primary: nothing to send until one is promoted \
                 (promote --force) or both are declared identical (new-current-uuid --clear-bitmap)"
                    .into(),
            );
        }
        let why = "both disks are inconsistent and neither node is primary: neither holds a complete copy; \
                   promote --force the node whose data is to be kept"
            .to_string();
        return row(Outcome::Refuse(why.clone()), rule::BOTH_INCONSISTENT, why);
    }

    // 2. One disk inconsistent: it is the target.
    if li != pi {
        let (to, from) = if li { (Local, Peer) } else { (Peer, Local) };
        let (t, s) = (v.get(to), v.get(from));
        if t.gen_ids.current == s.gen_ids.current {
            let (kind, how) = if t.local_lsn >= s.bitmap_base_lsn {
                (ResyncKind::Bitmap, "the interrupted resync resumes from the bitmap".to_string())
            } else {
                (
                    ResyncKind::Full,
                    format!(
                        "its log ends at LSN {} before the bitmap base {} of {}: full resync",
                        t.local_lsn,
                        s.bitmap_base_lsn,
                        from.who()
                    ),
                )
            };
            let why =
                format!("{} is inconsistent in generation {} of {}: {how}", to.who(), G(t.gen_ids.current), from.who());
            return row(Outcome::Send { from, kind }, rule::RESUME, why);
        }
        let why =
            format!("{} is inconsistent and not in the current generation of {}: full resync", to.who(), from.who());
        return row(Outcome::Send { from, kind: ResyncKind::Full }, rule::INCONSISTENT, why);
    }

    // 3. Same generation.
    if l.gen_ids.current == p.gen_ids.current {
        if l.local_lsn == p.local_lsn && l.dirty_bytes == 0 && p.dirty_bytes == 0 {
            let why = format!("same generation {} and LSN {}, nothing marked", G(l.gen_ids.current), l.local_lsn);
            return row(Outcome::NoSync, rule::IN_SYNC, why);
        }
        // Same LSN: the primary first (it is never the target; the union of
        // the bitmaps covers the other's marks, e.g. a secondary's records
        // re-marked by recovery after a crash), then the marks.
        let key = |s: &SideView| (s.local_lsn, s.role == Role::Primary, s.dirty_bytes, disk_rank(s.disk));
        let from = match key(l).cmp(&key(p)) {
            std::cmp::Ordering::Greater => Local,
            std::cmp::Ordering::Less => Peer,
            std::cmp::Ordering::Equal => {
                // Same records, but blocks marked on both sides (online
                // verify marks both nodes): they may differ, and nothing
                // says which copy is right. Claiming "in sync" would leave
                // them different.
                let why = format!(
                    "same generation {} and LSN {} on both nodes, both with {} bytes marked as possibly \
                     different, and nothing tells which copy is right: promote the node whose data is to be \
                     kept (or run invalidate on the other)",
                    G(l.gen_ids.current),
                    l.local_lsn,
                    l.dirty_bytes
                );
                return row(
                    Outcome::Refuse("marked blocks on both nodes and no node to prefer".into()),
                    rule::SAME_GENERATION,
                    why,
                );
            }
        };
        let (kind, how) = sync_kind(v.get(from), v.get(from.other()));
        let (s, t) = (v.get(from), v.get(from.other()));
        let why = if s.local_lsn != t.local_lsn {
            format!(
                "same generation {}; {} is further (LSN {} vs {}): {how}",
                G(l.gen_ids.current),
                from.who(),
                s.local_lsn,
                t.local_lsn
            )
        } else {
            let tie = if s.role != t.role {
                "it is primary".to_string()
            } else if s.dirty_bytes != t.dirty_bytes {
                format!("it has more bytes marked ({} vs {})", s.dirty_bytes, t.dirty_bytes)
            } else {
                format!("its disk is {}, the other's {}", s.disk, t.disk)
            };
            format!(
                "same generation {} and LSN {}; {} sends: {tie}: {how}",
                G(l.gen_ids.current),
                s.local_lsn,
                from.who()
            )
        };
        return row(Outcome::Send { from, kind }, rule::SAME_GENERATION, why);
    }

    // 4. One node wrote since the other's generation.
    let l_ahead = l.gen_ids.bitmap != 0 && l.gen_ids.bitmap == p.gen_ids.current;
    let p_ahead = p.gen_ids.bitmap != 0 && p.gen_ids.bitmap == l.gen_ids.current;
    if l_ahead && p_ahead {
        return row(
            Outcome::Unrelated,
            rule::UNRELATED,
            "the generation ids contradict each other (each node's bitmap generation is the other's current)".into(),
        );
    }
    if l_ahead || p_ahead {
        let from = if l_ahead { Local } else { Peer };
        let (s, t) = (v.get(from), v.get(from.other()));
        let (kind, how) = sync_kind(s, t);
        let why = format!(
            "{} wrote since generation {}, which {} still has and did not write in: {how}",
            from.who(),
            G(t.gen_ids.current),
            from.other().who()
        );
        return row(Outcome::Send { from, kind }, rule::NEWER_GENERATION, why);
    }

    // 5. Split brain from the same generation.
    if l.gen_ids.bitmap != 0 && l.gen_ids.bitmap == p.gen_ids.bitmap {
        return split_brain(v, policy, l.gen_ids.bitmap, true);
    }

    // 6. One node is generations behind.
    let l_has_p = p.gen_ids.current != 0 && l.gen_ids.history.contains(&p.gen_ids.current);
    let p_has_l = l.gen_ids.current != 0 && p.gen_ids.history.contains(&l.gen_ids.current);
    if l_has_p && p_has_l {
        return row(
            Outcome::Unrelated,
            rule::UNRELATED,
            "the generation ids contradict each other (each node's current generation is in the other's history)"
                .into(),
        );
    }
    if l_has_p || p_has_l {
        let from = if l_has_p { Local } else { Peer };
        let why = format!(
            "generation {} of {} is in the history of {}: it is several generations behind, full resync",
            G(v.get(from.other()).gen_ids.current),
            from.other().who(),
            from.who()
        );
        return row(Outcome::Send { from, kind: ResyncKind::Full }, rule::OLDER_GENERATION, why);
    }

    // 7. Split brain further back.
    let ancestors = |s: &SideView| {
        let mut a = vec![s.gen_ids.bitmap];
        a.extend(s.gen_ids.history);
        a.retain(|&g| g != 0);
        a
    };
    let (la, pa) = (ancestors(l), ancestors(p));
    if let Some(&common) = la.iter().find(|g| pa.contains(g)) {
        return split_brain(v, policy, common, false);
    }

    // 8.
    row(
        Outcome::Unrelated,
        rule::UNRELATED,
        format!(
            "no common generation (this node: {}, the peer: {}): the disks hold unrelated data; \
             recreate the metadata of the node to be overwritten (create-md --force) to sync it in full",
            G(l.gen_ids.current),
            G(p.gen_ids.current)
        ),
    )
}

/// Orders disk states for the same-generation tie-break (better is greater).
fn disk_rank(d: DiskState) -> u8 {
    match d {
        DiskState::UpToDate => 3,
        DiskState::Consistent => 2,
        DiskState::Outdated => 1,
        DiskState::Inconsistent | DiskState::Diskless | DiskState::Unknown => 0,
    }
}

/// The kind of resync from `s` to `t` when `t`'s log is (as far as the
/// generations tell) a prefix of `s`'s lineage, and why.
fn sync_kind(s: &SideView, t: &SideView) -> (ResyncKind, String) {
    if t.local_lsn < s.bitmap_base_lsn {
        return (
            ResyncKind::Full,
            format!(
                "the target's log ends at LSN {}, before the source's bitmap base {}: full resync",
                t.local_lsn, s.bitmap_base_lsn
            ),
        );
    }
    let log_ok = t.dirty_bytes == 0
        && s.log_first_lsn <= t.local_lsn.saturating_add(1)
        && (s.local_lsn > t.local_lsn || (s.local_lsn == t.local_lsn && s.dirty_bytes == 0));
    if log_ok {
        let what = if s.local_lsn > t.local_lsn {
            format!("log catch-up of LSN {}..={}", t.local_lsn.saturating_add(1), s.local_lsn)
        } else {
            format!("log catch-up with nothing to replay (both at LSN {})", s.local_lsn)
        };
        return (ResyncKind::Log, format!("{what} (the target stays consistent)"));
    }
    let why = if t.dirty_bytes != 0 {
        format!("the target has {} bytes marked of its own: bitmap resync", t.dirty_bytes)
    } else if s.log_first_lsn > t.local_lsn.saturating_add(1) {
        format!(
            "the source's WAL starts at LSN {}, after the target's LSN {}: bitmap resync",
            s.log_first_lsn, t.local_lsn
        )
    } else {
        format!(
            "the target's log reaches LSN {} and the source ({}) has {} bytes marked: bitmap resync",
            t.local_lsn, s.local_lsn, s.dirty_bytes
        )
    };
    (ResyncKind::Bitmap, why)
}

/// Row 5/7: both nodes wrote since generation `common`. `same_base`: both
/// bitmaps started at `common`, so their union covers every difference and a
/// resolved split brain needs only a bitmap resync.
fn split_brain(v: &Pair, policy: &SplitBrainPolicy, common: u64, same_base: bool) -> Row {
    use Side::{Local, Peer};
    let (l, p) = (v.local, v.peer);
    let what = format!(
        "split brain: both nodes wrote since generation {} (this node: {} bytes marked, the peer: {})",
        G(common),
        l.dirty_bytes,
        p.dirty_bytes
    );
    let resolve = |to: Side, rule: &'static str, how: String| -> Row {
        let (s, t) = (v.get(to.other()), v.get(to));
        let kind = if same_base && t.local_lsn >= s.bitmap_base_lsn { ResyncKind::Bitmap } else { ResyncKind::Full };
        let why = format!("{what}; {how}: {} is the target of a {kind} resync, its changes are discarded", to.who());
        row(Outcome::Send { from: to.other(), kind }, rule, why)
    };
    let stay = |why: String| row(Outcome::SplitBrain, rule::SPLIT_BRAIN, format!("{what}; {why}"));
    let manual = "both stay standalone; run `repctl connect --discard-my-data` on the node whose changes are to be \
                  thrown away and `repctl connect` on the other";

    match (l.discard_my_data, p.discard_my_data) {
        (true, true) => {
            let reason = "split brain, and both nodes asked to discard their data: connect one of them without \
                          --discard-my-data";
            return row(Outcome::Refuse(reason.into()), rule::SB_BOTH_DISCARD, format!("{what}; {reason}"));
        }
        (true, false) => return resolve(Local, rule::SB_DISCARD_MY_DATA, "--discard-my-data".into()),
        (false, true) => return resolve(Peer, rule::SB_DISCARD_MY_DATA, "--discard-my-data".into()),
        (false, false) => {}
    }
    let primaries = [l, p].iter().filter(|s| s.role == Role::Primary).count();
    let younger = || match l.gen_created_ms.cmp(&p.gen_created_ms) {
        std::cmp::Ordering::Greater => Some(Local),
        std::cmp::Ordering::Less => Some(Peer),
        std::cmp::Ordering::Equal => None,
    };
    if primaries == 0 {
        let name = policy.after_sb_0pri.as_str();
        match policy.after_sb_0pri {
            AfterSb0Pri::Disconnect => stay(manual.into()),
            AfterSb0Pri::DiscardYoungerPrimary => match younger() {
                Some(to) => resolve(
                    to,
                    rule::SB_DISCARD_YOUNGER_PRIMARY,
                    format!("after_sb_0pri = {name}: its generation is the younger one"),
                ),
                None => {
                    stay(format!("after_sb_0pri = {name} cannot choose: both generations have the same age; {manual}"))
                }
            },
            AfterSb0Pri::DiscardLeastChanges => match l.dirty_bytes.cmp(&p.dirty_bytes) {
                std::cmp::Ordering::Less => {
                    resolve(Local, rule::SB_DISCARD_LEAST_CHANGES, format!("after_sb_0pri = {name}: it changed less"))
                }
                std::cmp::Ordering::Greater => {
                    resolve(Peer, rule::SB_DISCARD_LEAST_CHANGES, format!("after_sb_0pri = {name}: it changed less"))
                }
                std::cmp::Ordering::Equal => {
                    stay(format!("after_sb_0pri = {name} cannot choose: both changed as much; {manual}"))
                }
            },
            AfterSb0Pri::DiscardZeroChanges => match (l.dirty_bytes == 0, p.dirty_bytes == 0) {
                (true, false) => {
                    resolve(Local, rule::SB_DISCARD_ZERO_CHANGES, format!("after_sb_0pri = {name}: it wrote nothing"))
                }
                (false, true) => {
                    resolve(Peer, rule::SB_DISCARD_ZERO_CHANGES, format!("after_sb_0pri = {name}: it wrote nothing"))
                }
                // Neither wrote: nothing is lost either way; the younger
                // generation gives way.
                (true, true) => match younger() {
                    Some(to) => resolve(
                        to,
                        rule::SB_DISCARD_ZERO_CHANGES,
                        format!("after_sb_0pri = {name}: neither wrote, its generation is the younger one"),
                    ),
                    None => stay(format!(
                        "after_sb_0pri = {name} cannot choose: neither wrote and both generations have the same age; {manual}"
                    )),
                },
                (false, false) => stay(format!("after_sb_0pri = {name} does not apply: both wrote; {manual}")),
            },
        }
    } else {
        let name = policy.after_sb_1pri.as_str();
        let secondary = if l.role == Role::Primary { Peer } else { Local };
        match policy.after_sb_1pri {
            AfterSb1Pri::Disconnect => stay(manual.into()),
            AfterSb1Pri::DiscardSecondary => {
                resolve(secondary, rule::SB_DISCARD_SECONDARY, format!("after_sb_1pri = {name}"))
            }
            AfterSb1Pri::DiscardZeroChanges => {
                if v.get(secondary).dirty_bytes == 0 {
                    resolve(
                        secondary,
                        rule::SB_DISCARD_ZERO_CHANGES,
                        format!("after_sb_1pri = {name}: the secondary wrote nothing"),
                    )
                } else if v.get(secondary.other()).dirty_bytes == 0 {
                    stay(format!(
                        "after_sb_1pri = {name} does not apply: the primary wrote nothing but a primary is never \
                         the target (demote it to let after_sb_0pri decide); {manual}"
                    ))
                } else {
                    stay(format!("after_sb_1pri = {name} does not apply: both wrote; {manual}"))
                }
            }
        }
    }
}

#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;
