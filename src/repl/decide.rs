//! The resync decision (design.md §4, docs/resync.md): given what each node
//! says about itself at connect, who sends what to whom.

use std::fmt;

/// `after_sb_0pri`: what to do with a split brain detected while neither node
/// is primary. Opt-in: the default keeps both nodes' data and disconnects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AfterSb0Pri {
    /// Both nodes go standalone and keep their data (the operator decides).
    #[default]
    Disconnect,
    /// The node whose current generation was created later becomes target.
    DiscardYoungerPrimary,
    /// The node with fewer out-of-sync bytes becomes target (a tie disconnects).
    DiscardLeastChanges,
    /// If exactly one node wrote nothing (0 out-of-sync bytes), it becomes target.
    DiscardZeroChanges,
}

impl AfterSb0Pri {
    /// The config spellings, in the order documented.
    pub const NAMES: [&'static str; 4] =
        ["disconnect", "discard-younger-primary", "discard-least-changes", "discard-zero-changes"];

    /// Parses a config value.
    pub fn parse(s: &str) -> Option<AfterSb0Pri> {
        Some(match s {
            "disconnect" => AfterSb0Pri::Disconnect,
            "discard-younger-primary" => AfterSb0Pri::DiscardYoungerPrimary,
            "discard-least-changes" => AfterSb0Pri::DiscardLeastChanges,
            "discard-zero-changes" => AfterSb0Pri::DiscardZeroChanges,
            _ => return None,
        })
    }

    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            AfterSb0Pri::Disconnect => "disconnect",
            AfterSb0Pri::DiscardYoungerPrimary => "discard-younger-primary",
            AfterSb0Pri::DiscardLeastChanges => "discard-least-changes",
            AfterSb0Pri::DiscardZeroChanges => "discard-zero-changes",
        }
    }
}

impl fmt::Display for AfterSb0Pri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `after_sb_1pri`: what to do with a split brain detected while one node is
/// primary. Opt-in: the default keeps both nodes' data and disconnects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AfterSb1Pri {
    /// Both nodes go standalone and keep their data (the operator decides).
    #[default]
    Disconnect,
    /// The secondary's changes are discarded: it becomes target of the primary.
    DiscardSecondary,
    /// If exactly one node wrote nothing (0 out-of-sync bytes) and it is the
    /// secondary, it becomes target.
    DiscardZeroChanges,
}

impl AfterSb1Pri {
    /// The config spellings, in the order documented.
    pub const NAMES: [&'static str; 3] = ["disconnect", "discard-secondary", "discard-zero-changes"];

    /// Parses a config value.
    pub fn parse(s: &str) -> Option<AfterSb1Pri> {
        Some(match s {
            "disconnect" => AfterSb1Pri::Disconnect,
            "discard-secondary" => AfterSb1Pri::DiscardSecondary,
            "discard-zero-changes" => AfterSb1Pri::DiscardZeroChanges,
            _ => return None,
        })
    }

    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            AfterSb1Pri::Disconnect => "disconnect",
            AfterSb1Pri::DiscardSecondary => "discard-secondary",
            AfterSb1Pri::DiscardZeroChanges => "discard-zero-changes",
        }
    }
}

impl fmt::Display for AfterSb1Pri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The automatic split-brain policies of a resource (config keys
/// `after_sb_0pri`, `after_sb_1pri`). Both default to `disconnect`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SplitBrainPolicy {
    pub after_sb_0pri: AfterSb0Pri,
    pub after_sb_1pri: AfterSb1Pri,
}

// ---------------------------------------------------------------------------
// INTERIM (branch `resync`): the decision's signatures from the shared design
// with a straightforward table, so that the engine builds and is tested
// before branch `decide` lands. On merge, branch `decide`'s version of
// everything below wins.
// ---------------------------------------------------------------------------

use super::proto::GenIds;
use crate::node::{DiskState, Role};
use crate::volume::Lsn;

/// What each side sends in SyncInfo at session start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SideView {
    pub role: Role,
    pub disk: DiskState,
    pub gen_ids: GenIds,
    pub gen_created_ms: u64,
    pub local_lsn: Lsn,
    pub dirty_bytes: u64,
    pub bitmap_base_lsn: Lsn,
    pub log_first_lsn: Lsn,
    pub discard_my_data: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncKind {
    Log,
    Bitmap,
    Full,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    NoSync,
    Source(SyncKind),
    Target(SyncKind),
    SplitBrain,
    Unrelated,
    Refuse(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub decision: Decision,
    pub rule: &'static str,
    pub explanation: String,
}

fn kind_for(src: &SideView, tgt: &SideView) -> SyncKind {
    if src.log_first_lsn <= tgt.local_lsn + 1 && tgt.dirty_bytes == 0 && tgt.local_lsn <= src.local_lsn {
        SyncKind::Log
    } else if tgt.local_lsn >= src.bitmap_base_lsn {
        SyncKind::Bitmap
    } else {
        SyncKind::Full
    }
}

fn v(decision: Decision, rule: &'static str, explanation: impl Into<String>) -> Verdict {
    Verdict { decision, rule, explanation: explanation.into() }
}

/// See the shared design's table.
pub fn decide(l: &SideView, p: &SideView, _policy: &SplitBrainPolicy) -> Verdict {
    use Decision::*;
    if l.role == Role::Primary && p.role == Role::Primary {
        return v(Refuse("both nodes are primary: demote one".into()), "two-primaries", "both nodes are primary");
    }
    let out = decide_table(l, p);
    let primary_target = match out.decision {
        Target(_) => l.role == Role::Primary,
        Source(_) => p.role == Role::Primary,
        _ => false,
    };
    if primary_target {
        return v(
            Refuse("primary would be sync target: demote it or use --discard-my-data on it after demoting".into()),
            "primary-target",
            format!("{} (rule {}) would make a primary the sync target", out.explanation, out.rule),
        );
    }
    out
}

fn decide_table(l: &SideView, p: &SideView) -> Verdict {
    use Decision::*;
    let (lg, pg) = (l.gen_ids, p.gen_ids);
    let both_inconsistent = l.disk == DiskState::Inconsistent && p.disk == DiskState::Inconsistent;
    if (lg.current == 0 && pg.current == 0) || (both_inconsistent && lg.current != pg.current) {
        return if l.role == Role::Primary || (l.disk == DiskState::UpToDate && p.disk != DiskState::UpToDate) {
            v(Source(SyncKind::Full), "fresh", "both fresh: this side is primary or uptodate")
        } else if p.role == Role::Primary || (p.disk == DiskState::UpToDate && l.disk != DiskState::UpToDate) {
            v(Target(SyncKind::Full), "fresh", "both fresh: the peer is primary or uptodate")
        } else {
            v(NoSync, "fresh", "both fresh secondaries: nothing to sync until one is promoted")
        };
    }
    let (li, pi) = (l.disk == DiskState::Inconsistent, p.disk == DiskState::Inconsistent);
    if li && pi {
        return if lg.current == pg.current {
            v(NoSync, "both-inconsistent", "both inconsistent in the same generation")
        } else {
            v(Refuse("both disks are inconsistent".into()), "both-inconsistent", "no side has usable data")
        };
    }
    if li || pi {
        let (src_is_local, inc, other) = if li { (false, l, p) } else { (true, p, l) };
        let kind = if inc.gen_ids.current == other.gen_ids.current { SyncKind::Bitmap } else { SyncKind::Full };
        let d = if src_is_local { Source(kind) } else { Target(kind) };
        return v(d, "inconsistent", "one side is inconsistent: resync from the other");
    }
    if lg.current == pg.current {
        if l.local_lsn == p.local_lsn && l.dirty_bytes == 0 && p.dirty_bytes == 0 {
            return v(NoSync, "same-generation", "same generation, same LSN, no bits");
        }
        let local_src = l.local_lsn > p.local_lsn
            || (l.local_lsn == p.local_lsn
                && (l.dirty_bytes > p.dirty_bytes || (l.dirty_bytes == p.dirty_bytes && l.role == Role::Primary)));
        return if local_src {
            v(Source(kind_for(l, p)), "same-generation", "same generation, this side is ahead")
        } else {
            v(Target(kind_for(p, l)), "same-generation", "same generation, the peer is ahead")
        };
    }
    if lg.bitmap != 0 && lg.bitmap == pg.current {
        return v(Source(kind_for(l, p)), "wrote-since-peer", "this side wrote since the peer's generation");
    }
    if pg.bitmap != 0 && pg.bitmap == lg.current {
        return v(Target(kind_for(p, l)), "wrote-since-peer", "the peer wrote since this side's generation");
    }
    let in_hist = |g: u64, ids: &GenIds| g != 0 && (ids.bitmap == g || ids.history.contains(&g));
    if (lg.bitmap != 0 && lg.bitmap == pg.bitmap) || in_hist(lg.bitmap, &pg) || in_hist(pg.bitmap, &lg) {
        let kind = if lg.bitmap == pg.bitmap { SyncKind::Bitmap } else { SyncKind::Full };
        if l.discard_my_data && !p.discard_my_data {
            return v(Target(kind), "split-brain", "split brain resolved: this side discards its data");
        }
        if p.discard_my_data && !l.discard_my_data {
            return v(Source(kind), "split-brain", "split brain resolved: the peer discards its data");
        }
        return v(SplitBrain, "split-brain", "both sides wrote since their last common generation");
    }
    if lg.history.contains(&pg.current) {
        return v(Source(SyncKind::Full), "peer-behind", "the peer's generation is in this side's history");
    }
    if pg.history.contains(&lg.current) {
        return v(Target(SyncKind::Full), "local-behind", "this side's generation is in the peer's history");
    }
    v(Unrelated, "unrelated", "the generations share no history")
}
