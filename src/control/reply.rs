//! The typed answers to control requests: what `"result"` holds in
//! `{"ok":true,"result":…}`, one type per command, and the line `repctl`
//! prints for it (`human`).
//!
//! | request | answer |
//! | --- | --- |
//! | `status` | [`crate::node::Status`] (design.md §6) |
//! | `promote` | [`Promoted`] |
//! | `demote` | [`Demoted`] |
//! | `connect` | [`Connecting`] |
//! | `connect` with `dry_run` | [`crate::repl::engine::ProbeReport`] |
//! | `disconnect` | [`Disconnected`] |
//! | `resume-io` | [`IoResumed`] |
//! | `new-current-uuid` | [`NewGeneration`] |
//! | `verify` | [`VerifyStarted`] |
//! | `invalidate` | [`Invalidated`] |
//! | `wait-sync` | [`InSync`] |
//! | `reload-tls` | [`TlsReloaded`] |
//!
//! The daemon serialises an answer through `serde_json::Value`, so its keys
//! go out sorted, as they always did. An optional field that is absent is
//! left out (never `null`), as before these types existed.

use serde::{Deserialize, Serialize};

use crate::model::{ConnState, DiskState, Role};

/// The answer to `promote`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Promoted {
    /// Always `primary`.
    pub role: Role,
    /// `false` when the node was primary already.
    pub changed: bool,
    /// The NBD URI now exported (absent when nothing changed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd: Option<String>,
}

impl Promoted {
    /// `alpha: primary, exporting nbd://…` or `alpha: primary (already)`.
    pub fn human(&self, node: &str) -> String {
        let was = if self.changed { "" } else { " (already)" };
        let nbd = self.nbd.as_deref().map(|u| format!(", exporting {u}")).unwrap_or_default();
        format!("{node}: {}{was}{nbd}\n", self.role)
    }
}

/// The answer to `demote`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Demoted {
    /// Always `secondary`.
    pub role: Role,
    /// `false` when the node was secondary already.
    pub changed: bool,
    /// NBD clients `--force` disconnected (absent when nothing changed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disconnected_clients: Option<usize>,
}

impl Demoted {
    /// `alpha: secondary, disconnected 2 NBD client(s)`.
    pub fn human(&self, node: &str) -> String {
        let was = if self.changed { "" } else { " (already)" };
        let n = self.disconnected_clients.unwrap_or(0);
        let dropped = if n > 0 { format!(", disconnected {n} NBD client(s)") } else { String::new() };
        format!("{node}: {}{was}{dropped}\n", self.role)
    }
}

/// The answer to `connect` (without `dry_run`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connecting {
    /// The connection state right after the request (`connecting`, or
    /// `connected` when the link was up already).
    pub connection: ConnState,
}

impl Connecting {
    /// `alpha: connecting`, saying so when `--discard-my-data` was given.
    pub fn human(&self, node: &str, discard_my_data: bool) -> String {
        let discard = if discard_my_data { " (this node's changes will be discarded)" } else { "" };
        format!("{node}: {}{discard}\n", self.connection)
    }
}

/// The answer to `disconnect`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disconnected {
    /// Always `standalone`.
    pub connection: ConnState,
}

impl Disconnected {
    pub fn human(&self, node: &str) -> String {
        format!("{node}: {}\n", self.connection)
    }
}

/// The answer to `resume-io`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoResumed {
    /// Whether writes were suspended (and are released now).
    pub resumed: bool,
}

impl IoResumed {
    pub fn human(&self, node: &str) -> String {
        format!("{node}: {}\n", if self.resumed { "IO resumed" } else { "IO was not suspended" })
    }
}

/// The answer to `new-current-uuid` (with `clear_bitmap`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewGeneration {
    /// Always `uptodate`.
    pub disk: DiskState,
    /// Always `uptodate`.
    pub peer_disk: DiskState,
    /// The new current generation id, 16 upper-case hex digits.
    pub generation: String,
}

impl NewGeneration {
    /// `alpha: uptodate, peer uptodate, generation … (no initial sync)`.
    pub fn human(&self, node: &str) -> String {
        format!("{node}: {}, peer {}, generation {} (no initial sync)\n", self.disk, self.peer_disk, self.generation)
    }
}

/// The answer to `verify`: it was requested and starts in a moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyStarted {
    /// The node whose data is the reference (the primary, else the node
    /// asked).
    pub source: String,
    /// Bytes the verify compares.
    pub total_bytes: u64,
    /// Bytes per checksum.
    pub block: u32,
    /// `status.verify.runs_finished` when it was requested (it is over once
    /// that count grew).
    pub runs_finished: u64,
}

impl VerifyStarted {
    pub fn human(&self, node: &str) -> String {
        format!("{node}: verify started (source {}); `repctl status` shows progress\n", self.source)
    }
}

/// The answer to `invalidate`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invalidated {
    /// Always `inconsistent`.
    pub disk: DiskState,
    /// Bytes now marked out of sync (the whole volume).
    pub out_of_sync_bytes: u64,
    /// What happens next.
    pub message: String,
}

impl Invalidated {
    pub fn human(&self, node: &str) -> String {
        format!("{node}: {}\n", self.message)
    }
}

/// The answer to `wait-sync`: in sync now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InSync {
    pub disk: DiskState,
    /// The peer's disk (absent for a single-node resource).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_disk: Option<DiskState>,
    /// Always 0.
    pub out_of_sync_bytes: u64,
}

impl InSync {
    pub fn human(&self, node: &str) -> String {
        format!("{node}: in sync\n")
    }
}

/// One certificate in use: in `status.tls.certificates` and in the answer
/// to `reload-tls`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct CertStatus {
    pub file: String,
    /// The subject's distinguished name (`CN=alpha`).
    pub subject: String,
    /// Unix seconds.
    pub not_after: u64,
    pub expires_in_days: i64,
}

/// The answer to `reload-tls`: the certificate files were read again and
/// are now in use for new handshakes (established connections keep
/// theirs). A file that is missing or unusable is a refusal naming it, and
/// the previous certificates stay in use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsReloaded {
    /// The certificates now in use (CA, server, client), with their files.
    pub certificates: Vec<CertStatus>,
    /// Those expiring within 30 days (or expired).
    pub warnings: Vec<String>,
}

impl TlsReloaded {
    /// `alpha: TLS certificates reloaded`, then one line per certificate
    /// (file, subject, expiry) and one per warning.
    pub fn human(&self, node: &str) -> String {
        use std::fmt::Write as _;
        let mut s = format!("{node}: TLS certificates reloaded (new handshakes use them)\n");
        for c in &self.certificates {
            // Writes to a String cannot fail.
            let _ = writeln!(
                s,
                "  {} {} expires {} ({} days)",
                c.file,
                c.subject,
                expiry_date(c.not_after),
                c.expires_in_days
            );
        }
        for w in &self.warnings {
            let _ = writeln!(s, "  WARNING: {w}");
        }
        s
    }
}

/// A certificate's notAfter (Unix seconds) as an RFC 3339 date and time,
/// UTC, to the second (`2036-12-04T05:28:31Z`).
pub fn expiry_date(not_after: u64) -> String {
    let t = std::time::UNIX_EPOCH.checked_add(std::time::Duration::from_secs(not_after));
    t.map_or_else(|| format!("@{not_after}"), |t| humantime::format_rfc3339_seconds(t).to_string())
}
