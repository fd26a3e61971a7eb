//! What the engine keeps about online verify: the status `repctl status`
//! shows, the operator's request waiting for the session to pick it up,
//! and the session's wake-up.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

/// The outcome of a finished (or aborted) verify.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerifyReport {
    /// Bytes compared.
    pub checked_bytes: u64,
    /// Bytes found different (marked out of sync on both nodes).
    pub out_of_sync_bytes: u64,
    pub seconds: f64,
    /// False when the verify was aborted (link lost, role change, ...).
    pub complete: bool,
    /// Why it was aborted, if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// `status.verify` (design.md §6 extension).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VerifyStatus {
    /// A verify runs now (this node is its source or its target).
    pub running: bool,
    /// `source` or `target` while running, else null.
    #[serde(default)]
    pub role: Option<String>,
    /// Bytes compared so far (of the running verify, else of the last one).
    pub done_bytes: u64,
    pub total_bytes: u64,
    /// Bytes found different so far (running) or in the last verify.
    pub out_of_sync_bytes: u64,
    /// Verifies that ended on this node since repd started (complete or
    /// not): `repctl verify --wait` waits for it to grow.
    #[serde(default)]
    pub runs_finished: u64,
    /// The last verify that ended, if any.
    #[serde(default)]
    pub last: Option<VerifyReport>,
}

/// What the engine keeps about verify: the status, the operator's request
/// waiting for the session to pick it up, and the session's wake-up.
#[derive(Debug, Default)]
pub struct VerifyCell {
    status: Mutex<VerifyStatus>,
    started: Mutex<Option<Instant>>,
    requested: AtomicBool,
    /// Wakes the session when a verify is requested.
    pub(crate) wake: Notify,
}

impl VerifyCell {
    fn lock(&self) -> std::sync::MutexGuard<'_, VerifyStatus> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn status(&self) -> VerifyStatus {
        self.lock().clone()
    }

    pub fn running(&self) -> bool {
        self.lock().running
    }

    /// Asks the session to start (or forward) a verify.
    pub(crate) fn request(&self) {
        self.requested.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    /// Whether a request waits for the session.
    pub(crate) fn requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    /// Takes the pending request, if any.
    pub(crate) fn take_request(&self) -> bool {
        self.requested.swap(false, Ordering::AcqRel)
    }

    /// A verify starts with this node as `role` (`source` / `target`).
    pub(crate) fn begin(&self, role: &str, total_bytes: u64) {
        let mut s = self.lock();
        s.running = true;
        s.role = Some(role.to_string());
        s.done_bytes = 0;
        s.total_bytes = total_bytes;
        s.out_of_sync_bytes = 0;
        *self.started.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }

    /// Progress of the running verify.
    pub(crate) fn progress(&self, done_bytes: u64, out_of_sync_bytes: u64) {
        let mut s = self.lock();
        if s.running {
            s.done_bytes = done_bytes;
            s.out_of_sync_bytes = out_of_sync_bytes;
        }
    }

    /// Adds to the running verify's counts (the target counts as it goes).
    pub(crate) fn add(&self, done_bytes: u64, out_of_sync_bytes: u64) {
        let mut s = self.lock();
        if s.running {
            s.done_bytes += done_bytes;
            s.out_of_sync_bytes += out_of_sync_bytes;
        }
    }

    /// The running verify ended; `None` if none was running.
    pub(crate) fn finish(&self, complete: bool, message: Option<String>) -> Option<VerifyReport> {
        let mut s = self.lock();
        if !s.running {
            return None;
        }
        let started = self.started.lock().unwrap_or_else(|p| p.into_inner()).take();
        let report = VerifyReport {
            checked_bytes: s.done_bytes,
            out_of_sync_bytes: s.out_of_sync_bytes,
            seconds: started.map_or(0.0, |t| t.elapsed().as_secs_f64()),
            complete,
            message,
        };
        s.running = false;
        s.role = None;
        s.runs_finished += 1;
        s.last = Some(report.clone());
        Some(report)
    }
}
