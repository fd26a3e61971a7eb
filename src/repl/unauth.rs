//! Connections to the replication port that have not authenticated yet.
//!
//! Anyone who can reach the port can open them, so what they cost is
//! bounded:
//! - at most [`MAX_PENDING_HANDSHAKES`] handshakes of accepted connections
//!   run at once; a connection beyond that is closed at once (and counted);
//! - their failures are not logged one line each (each message differs, it
//!   may quote the bad magic or a text the other end chose, so a per-message
//!   rate limit lets every one through): [`FailureSummary`] keys them by
//!   kind (what failed and at which stage, never by text), logs the first of
//!   a kind at once, then at most one line per kind per
//!   [`SUMMARY_INTERVAL`] with the count and one example.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::HandshakeError;

/// Most handshakes of accepted (not yet authenticated) connections at once.
pub const MAX_PENDING_HANDSHAKES: usize = 32;
/// At most one summary line per kind of failure per interval.
pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(10);
/// Example messages are cut to this many characters.
const EXAMPLE_CHARS: usize = 160;
/// Kinds are few (a handful of failures times the handshake stages or
/// refusal reasons); more than this means something is wrong: start over.
const MAX_KINDS: usize = 64;

/// A key for one kind of failure: what failed, and the stage or reason.
pub type Kind = (&'static str, &'static str);

#[derive(Debug)]
struct Pending {
    /// When a line for this kind was last written.
    logged: Instant,
    /// Failures since that line.
    count: u64,
    /// The latest failure's message (cut), for the next line.
    example: String,
}

/// Failures of unauthenticated connections, summarised per kind.
#[derive(Debug, Default)]
pub struct FailureSummary {
    kinds: Mutex<HashMap<Kind, Pending>>,
}

/// One line to log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SummaryLine {
    pub kind: Kind,
    pub count: u64,
    pub example: String,
}

impl FailureSummary {
    pub fn new() -> FailureSummary {
        FailureSummary::default()
    }

    /// Records one failure; returns the line to log now, if one is due (the
    /// first of its kind, or the first after the interval).
    pub fn record(&self, kind: Kind, message: &str, now: Instant) -> Option<SummaryLine> {
        let mut kinds = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        if kinds.len() >= MAX_KINDS && !kinds.contains_key(&kind) {
            kinds.clear();
        }
        let example: String = message.chars().take(EXAMPLE_CHARS).collect();
        match kinds.get_mut(&kind) {
            Some(p) if now.saturating_duration_since(p.logged) < SUMMARY_INTERVAL => {
                p.count += 1;
                p.example = example;
                None
            }
            Some(p) => {
                let line = SummaryLine { kind, count: p.count + 1, example };
                *p = Pending { logged: now, count: 0, example: String::new() };
                Some(line)
            }
            None => {
                kinds.insert(kind, Pending { logged: now, count: 0, example: String::new() });
                Some(SummaryLine { kind, count: 1, example })
            }
        }
    }

    /// The lines due now for kinds with failures not logged yet (called
    /// periodically, so that the count of a burst is reported even when no
    /// failure follows it).
    pub fn due(&self, now: Instant) -> Vec<SummaryLine> {
        let mut kinds = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        kinds.retain(|&kind, p| {
            let quiet = now.saturating_duration_since(p.logged) >= SUMMARY_INTERVAL;
            if quiet && p.count > 0 {
                out.push(SummaryLine { kind, count: p.count, example: std::mem::take(&mut p.example) });
                p.logged = now;
                p.count = 0;
            }
            // A kind quiet for two intervals is forgotten.
            !(quiet && now.saturating_duration_since(p.logged) >= 2 * SUMMARY_INTERVAL)
        });
        out
    }
}

impl SummaryLine {
    /// Writes the line (WARN).
    pub fn log(&self, peer: &str) {
        tracing::warn!(
            peer,
            kind = self.kind.0,
            at = self.kind.1,
            count = self.count,
            example = ?self.example,
            "unauthenticated replication connections failed (handshake before authentication; one line per kind per {}s)",
            SUMMARY_INTERVAL.as_secs()
        );
    }
}

/// The accept side's gate: the handshake cap and the failure summary.
#[derive(Debug)]
pub struct Gate {
    pending: Arc<Semaphore>,
    summary: FailureSummary,
}

impl Default for Gate {
    fn default() -> Gate {
        Gate { pending: Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES)), summary: FailureSummary::new() }
    }
}

impl Gate {
    /// A slot for one accepted connection's handshake (held by its task);
    /// `None` when [`MAX_PENDING_HANDSHAKES`] run already: close the
    /// connection at once (the refusal is counted).
    pub fn admit(&self, peer: &str) -> Option<OwnedSemaphorePermit> {
        let permit = Arc::clone(&self.pending).try_acquire_owned().ok();
        if permit.is_none() {
            let kind = ("too-many-handshakes", "accepting");
            let msg = format!("{MAX_PENDING_HANDSHAKES} handshakes already running; connection closed");
            if let Some(line) = self.summary.record(kind, &msg, Instant::now()) {
                line.log(peer);
            }
        }
        permit
    }

    /// Records a failed handshake of an accepted connection before it
    /// authenticated (see [`HandshakeError::before_auth`]).
    pub fn failed(&self, e: &HandshakeError, peer: &str) {
        if let Some(line) = self.summary.record(e.kind(), &e.to_string(), Instant::now()) {
            line.log(peer);
        }
    }

    /// Logs the summaries that are due (call every few seconds).
    pub fn flush(&self, peer: &str) {
        for line in self.summary.due(Instant::now()) {
            line.log(peer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_kind_per_interval_with_the_count() {
        let s = FailureSummary::new();
        let t0 = Instant::now();
        let frame: Kind = ("bad-frame", "reading the peer's hello");
        let closed: Kind = ("closed", "reading the peer's hello");
        let first = s.record(frame, "bad magic 0xdead0000", t0).expect("the first of a kind is logged");
        assert_eq!((first.count, first.example.as_str()), (1, "bad magic 0xdead0000"));
        for i in 1..1000u32 {
            assert_eq!(s.record(frame, &format!("bad magic {:#x}", 0xdead_0000u32 + i), t0), None);
        }
        assert!(s.record(closed, "closed", t0).is_some(), "another kind has its own line");
        assert!(s.due(t0 + Duration::from_secs(1)).is_empty(), "nothing due within the interval");
        let due = s.due(t0 + SUMMARY_INTERVAL);
        assert_eq!(due.len(), 1, "{due:?}");
        assert_eq!((due[0].kind, due[0].count), (frame, 999));
        assert_eq!(due[0].example, "bad magic 0xdead03e7");
        // Reported: nothing more is due; a new failure after the interval
        // is logged at once with its own count.
        assert!(s.due(t0 + SUMMARY_INTERVAL).is_empty());
        let later = s.record(frame, &"x".repeat(1000), t0 + 2 * SUMMARY_INTERVAL).expect("due again");
        assert_eq!((later.count, later.example.len()), (1, EXAMPLE_CHARS));
    }

    #[test]
    fn kinds_stay_bounded() {
        let s = FailureSummary::new();
        let t0 = Instant::now();
        let names: Vec<&'static str> = (0..200).map(|i| &*Box::leak(format!("k{i}").into_boxed_str())).collect();
        for n in &names {
            s.record((n, ""), "m", t0);
        }
        assert!(s.kinds.lock().unwrap().len() <= MAX_KINDS);
    }
}
