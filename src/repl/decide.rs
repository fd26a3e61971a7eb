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
