//! The shared vocabulary of repblock (design.md §1, §2, §4), defined once.
//!
//! A **leaf**: this module imports nothing from the crate, and every other
//! module may import it (the dependency rule is in docs/architecture.md and
//! checked by `src/layering_tests.rs`). What lives here is the vocabulary
//! that crosses layers: the superblock (`volume::meta`) and the wire
//! (`repl::proto`) store the same [`DiskState`] byte; `status --json`,
//! events and the CLI print the same names; the config file, the resync
//! decision and the engine share the policies.
//!
//! - [`Lsn`]: log sequence numbers.
//! - [`Role`], [`DiskState`], [`ConnState`], [`ReplState`]: the states of
//!   design.md §1, with their user-visible names and byte codes.
//! - [`Protocol`], [`OnPeerLoss`]: the replication settings.
//! - [`ResyncKind`]: what a resync moves (decision, wire, status).
//! - [`GenIds`]: data generations and their transitions.
//! - [`AfterSb0Pri`], [`AfterSb1Pri`], [`SplitBrainPolicy`]: the automatic
//!   split-brain policies.
//! - [`unix_ms`]: wall-clock milliseconds (superblock, status, statistics).

use std::fmt;

use serde::{Deserialize, Serialize};

/// Log sequence number: 1 for the first record ever written; 0 means "none".
pub type Lsn = u64;

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

// ---------------------------------------------------------------------------
// States (design.md §1).
// ---------------------------------------------------------------------------

/// Role of a node. Wire code (Hello, State, SyncInfo): | primary 1 | secondary 2 |.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Primary,
    Secondary,
}

impl Role {
    /// The wire code.
    pub fn code(self) -> u8 {
        match self {
            Role::Primary => 1,
            Role::Secondary => 2,
        }
    }

    pub fn from_code(code: u8) -> Option<Role> {
        match code {
            1 => Some(Role::Primary),
            2 => Some(Role::Secondary),
            _ => None,
        }
    }

    /// `primary` or `secondary` (status, events, CLI).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Secondary => "secondary",
        }
    }
}

/// Disk state (design.md §1).
///
/// One byte code, stored in the superblock and sent on the wire (Hello,
/// State, SyncInfo): | unknown 0 | uptodate 1 | consistent 2 | outdated 3 |
/// inconsistent 4 | diskless 5 |.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskState {
    /// The newest data.
    #[serde(rename = "uptodate")]
    UpToDate,
    /// Crash-consistent, maybe stale.
    Consistent,
    /// Known stale.
    Outdated,
    /// Mid-resync or never initialised: not usable.
    Inconsistent,
    /// No local disk.
    Diskless,
    /// Not known (the peer's, when not connected).
    Unknown,
}

impl DiskState {
    /// Every state, in code order.
    pub const ALL: [DiskState; 6] = [
        DiskState::Unknown,
        DiskState::UpToDate,
        DiskState::Consistent,
        DiskState::Outdated,
        DiskState::Inconsistent,
        DiskState::Diskless,
    ];

    /// The superblock and wire byte.
    pub fn code(self) -> u8 {
        match self {
            DiskState::Unknown => 0,
            DiskState::UpToDate => 1,
            DiskState::Consistent => 2,
            DiskState::Outdated => 3,
            DiskState::Inconsistent => 4,
            DiskState::Diskless => 5,
        }
    }

    pub fn from_code(code: u8) -> Option<DiskState> {
        Some(match code {
            0 => DiskState::Unknown,
            1 => DiskState::UpToDate,
            2 => DiskState::Consistent,
            3 => DiskState::Outdated,
            4 => DiskState::Inconsistent,
            5 => DiskState::Diskless,
            _ => return None,
        })
    }

    /// The name shown to users (`uptodate`, `inconsistent`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            DiskState::UpToDate => "uptodate",
            DiskState::Consistent => "consistent",
            DiskState::Outdated => "outdated",
            DiskState::Inconsistent => "inconsistent",
            DiskState::Diskless => "diskless",
            DiskState::Unknown => "unknown",
        }
    }
}

/// Connection state (design.md §1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConnState {
    Standalone,
    Connecting,
    Connected,
}

impl ConnState {
    /// `standalone`, `connecting` or `connected`.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnState::Standalone => "standalone",
            ConnState::Connecting => "connecting",
            ConnState::Connected => "connected",
        }
    }
}

/// Replication state when connected (design.md §1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReplState {
    Established,
    SyncSource,
    SyncTarget,
}

impl ReplState {
    /// `established`, `sync-source` or `sync-target`.
    pub fn as_str(self) -> &'static str {
        match self {
            ReplState::Established => "established",
            ReplState::SyncSource => "sync-source",
            ReplState::SyncTarget => "sync-target",
        }
    }
}

macro_rules! display_as_str {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    )*};
}

// ---------------------------------------------------------------------------
// Replication settings.
// ---------------------------------------------------------------------------

/// Replication protocol (design.md §2): what an NBD reply waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum Protocol {
    /// Asynchronous: a write completes once local.
    A,
    /// Semi-synchronous: … and once the peer received it.
    B,
    /// Synchronous: … and once the peer wrote it.
    #[default]
    C,
}

impl Protocol {
    /// `A`, `B` or `C` (the config spelling).
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::A => "A",
            Protocol::B => "B",
            Protocol::C => "C",
        }
    }
}

/// `on_peer_loss`: what a primary does with writes while its peer is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum OnPeerLoss {
    /// Keep serving alone (the next connect resyncs the peer).
    #[default]
    Continue,
    /// Block writes until the peer is back and in sync, or `repctl resume-io`.
    Suspend,
}

impl OnPeerLoss {
    /// `continue` or `suspend` (the config spelling).
    pub fn as_str(self) -> &'static str {
        match self {
            OnPeerLoss::Continue => "continue",
            OnPeerLoss::Suspend => "suspend",
        }
    }
}

/// How a resync target is brought up to date: the resync decision's kind,
/// `SyncStart.kind` on the wire, `kind` in status and events.
///
/// Wire codes: | log 1 | bitmap 2 | full 3 |.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ResyncKind {
    /// Replay the source's WAL records past the target's last LSN, in order
    /// (as ordinary Write / Trim / Zeroes frames); the target stays
    /// consistent throughout.
    Log,
    /// Send the blocks marked in the union of both bitmaps; the target is
    /// inconsistent until done.
    Bitmap,
    /// Send every block (the bitmap with every bit set); the target is
    /// inconsistent until done.
    Full,
}

impl ResyncKind {
    /// The wire code.
    pub fn code(self) -> u8 {
        match self {
            ResyncKind::Log => 1,
            ResyncKind::Bitmap => 2,
            ResyncKind::Full => 3,
        }
    }

    pub fn from_code(code: u8) -> Option<ResyncKind> {
        match code {
            1 => Some(ResyncKind::Log),
            2 => Some(ResyncKind::Bitmap),
            3 => Some(ResyncKind::Full),
            _ => None,
        }
    }

    /// `log`, `bitmap` or `full` (status, events).
    pub fn as_str(self) -> &'static str {
        match self {
            ResyncKind::Log => "log",
            ResyncKind::Bitmap => "bitmap",
            ResyncKind::Full => "full",
        }
    }
}

display_as_str!(Role, DiskState, ConnState, ReplState, Protocol, OnPeerLoss, ResyncKind);

// ---------------------------------------------------------------------------
// Generations (design.md §4).
// ---------------------------------------------------------------------------

/// Data generation identifiers (design.md §4), compared on connect by the
/// resync decision and kept in the superblock.
///
/// A generation id is a random non-zero u64 ([`GenIds::new_id`]); 0 means
/// "none" in every slot. The transitions below are the only ways the
/// engine and the session change them.
///
/// Format (48 bytes, inside Hello and SyncInfo): | current u64 | bitmap u64 | history 4 x u64 |
/// (the superblock stores the same three fields, see `volume::meta`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct GenIds {
    /// The generation the data is in now.
    pub current: u64,
    /// The generation the bitmap started tracking from, or 0.
    pub bitmap: u64,
    /// Older generations, newest first; 0 for unused slots.
    pub history: [u64; 4],
}

impl GenIds {
    /// A new random generation id (never 0, which means "none").
    pub fn new_id() -> u64 {
        loop {
            let g: u64 = rand::random();
            if g != 0 {
                return g;
            }
        }
    }

    /// The generations of a freshly created volume: a new current, no
    /// bitmap generation, no history.
    pub fn fresh() -> GenIds {
        GenIds { current: GenIds::new_id(), bitmap: 0, history: [0; 4] }
    }

    /// Pushes `g` onto the history (newest first); the oldest falls off.
    fn push_history(&mut self, g: u64) {
        self.history = [g, self.history[0], self.history[1], self.history[2]];
    }

    /// A primary diverges from its peer (writes nobody receives, a promote
    /// without the peer): the bitmap starts counting from the current
    /// generation if it has none yet (else the current one goes into the
    /// history), and `new_current` becomes current.
    pub fn diverge(&mut self, new_current: u64) {
        if self.bitmap == 0 {
            self.bitmap = self.current;
        } else {
            self.push_history(self.current);
        }
        self.current = new_current;
    }

    /// A new current generation, the old one into the history; the bitmap
    /// generation is kept (`new-current-uuid --clear-bitmap`).
    pub fn rotate(&mut self, new_current: u64) {
        self.push_history(self.current);
        self.current = new_current;
    }

    /// A resync source whose bitmap is clean: the bitmap generation goes
    /// into the history (nothing counts from it any more). Returns whether
    /// anything changed.
    pub fn retire_bitmap(&mut self) -> bool {
        if self.bitmap == 0 {
            return false;
        }
        self.push_history(self.bitmap);
        self.bitmap = 0;
        true
    }

    /// A resync target takes the source's current generation `peer_current`:
    /// its own current one (if any, and if different) goes into the history.
    pub fn adopt(&mut self, peer_current: u64) {
        if self.current != peer_current {
            if self.current != 0 {
                self.push_history(self.current);
            }
            self.current = peer_current;
        }
    }
}

// ---------------------------------------------------------------------------
// Split-brain policies (design.md §4, docs/resync.md).
// ---------------------------------------------------------------------------

/// `after_sb_0pri`: what to do with a split brain detected while neither node
/// is primary. Opt-in: the default keeps both nodes' data and disconnects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
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

/// `after_sb_1pri`: what to do with a split brain detected while one node is
/// primary. Opt-in: the default keeps both nodes' data and disconnects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
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

display_as_str!(AfterSb0Pri, AfterSb1Pri);

/// The automatic split-brain policies of a resource (config keys
/// `after_sb_0pri`, `after_sb_1pri`). Both default to `disconnect`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SplitBrainPolicy {
    pub after_sb_0pri: AfterSb0Pri,
    pub after_sb_1pri: AfterSb1Pri,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_state_codes_round_trip_and_are_the_superblock_and_wire_bytes() {
        for d in DiskState::ALL {
            assert_eq!(DiskState::from_code(d.code()), Some(d));
        }
        let codes: Vec<u8> = DiskState::ALL.iter().map(|d| d.code()).collect();
        assert_eq!(codes, [0, 1, 2, 3, 4, 5], "on-disk and on-wire bytes never change");
        assert_eq!(DiskState::from_code(6), None);
    }

    #[test]
    fn names_are_what_status_events_and_the_cli_print() {
        for d in DiskState::ALL {
            assert_eq!(serde_json::to_value(d).unwrap(), d.as_str());
            assert_eq!(d.to_string(), d.as_str());
        }
        assert_eq!(DiskState::UpToDate.to_string(), "uptodate");
        for r in [Role::Primary, Role::Secondary] {
            assert_eq!(serde_json::to_value(r).unwrap(), r.as_str());
            assert_eq!(Role::from_code(r.code()), Some(r));
        }
        for c in [ConnState::Standalone, ConnState::Connecting, ConnState::Connected] {
            assert_eq!(serde_json::to_value(c).unwrap(), c.to_string());
        }
        for s in [ReplState::Established, ReplState::SyncSource, ReplState::SyncTarget] {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        for k in [ResyncKind::Log, ResyncKind::Bitmap, ResyncKind::Full] {
            assert_eq!(serde_json::to_value(k).unwrap(), k.as_str());
            assert_eq!(ResyncKind::from_code(k.code()), Some(k));
        }
        assert_eq!([ResyncKind::Log.code(), ResyncKind::Bitmap.code(), ResyncKind::Full.code()], [1, 2, 3]);
        assert_eq!(Protocol::default().to_string(), "C");
        assert_eq!(OnPeerLoss::Suspend.to_string(), "suspend");
    }

    #[test]
    fn policy_names_parse_back() {
        for n in AfterSb0Pri::NAMES {
            assert_eq!(AfterSb0Pri::parse(n).map(AfterSb0Pri::as_str), Some(n));
        }
        for n in AfterSb1Pri::NAMES {
            assert_eq!(AfterSb1Pri::parse(n).map(AfterSb1Pri::as_str), Some(n));
        }
        assert_eq!(AfterSb0Pri::parse("discard-secondary"), None);
    }

    const G: GenIds = GenIds { current: 0xC, bitmap: 0, history: [0xA, 0x9, 0x8, 0x7] };

    #[test]
    fn new_ids_are_never_zero() {
        for _ in 0..1000 {
            assert_ne!(GenIds::new_id(), 0);
        }
        let f = GenIds::fresh();
        assert_ne!(f.current, 0);
        assert_eq!((f.bitmap, f.history), (0, [0; 4]));
    }

    #[test]
    fn diverge_starts_the_bitmap_generation_once_then_pushes_history() {
        let mut g = G;
        g.diverge(0xD);
        assert_eq!(g, GenIds { current: 0xD, bitmap: 0xC, history: [0xA, 0x9, 0x8, 0x7] });
        g.diverge(0xE);
        assert_eq!(g, GenIds { current: 0xE, bitmap: 0xC, history: [0xD, 0xA, 0x9, 0x8] }, "oldest falls off");
    }

    #[test]
    fn rotate_keeps_the_bitmap_generation() {
        let mut g = GenIds { bitmap: 0xB, ..G };
        g.rotate(0xD);
        assert_eq!(g, GenIds { current: 0xD, bitmap: 0xB, history: [0xC, 0xA, 0x9, 0x8] });
    }

    #[test]
    fn retire_bitmap_moves_it_into_the_history_once() {
        let mut g = G;
        assert!(!g.retire_bitmap(), "no bitmap generation: nothing to do");
        assert_eq!(g, G);
        let mut g = GenIds { bitmap: 0xB, ..G };
        assert!(g.retire_bitmap());
        assert_eq!(g, GenIds { current: 0xC, bitmap: 0, history: [0xB, 0xA, 0x9, 0x8] });
        assert!(!g.retire_bitmap());
    }

    #[test]
    fn adopt_takes_the_peer_generation_keeping_ours_in_the_history() {
        let mut g = GenIds { bitmap: 0xB, ..G };
        g.adopt(0xF);
        assert_eq!(g, GenIds { current: 0xF, bitmap: 0xB, history: [0xC, 0xA, 0x9, 0x8] });
        let before = g;
        g.adopt(0xF);
        assert_eq!(g, before, "same generation: nothing changes");
        let mut blank = GenIds::default();
        blank.adopt(0xF);
        assert_eq!(blank, GenIds { current: 0xF, bitmap: 0, history: [0; 4] }, "no generation: none pushed");
    }
}
