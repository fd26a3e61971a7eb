//! One pacing mechanism for the background streams a session mixes with
//! application writes: the resync walk (src/repl/resync/walk.rs) and online
//! verify (src/repl/verify.rs). Each keeps its own numbers (a
//! [`PacingParams`]); the mechanism is this one.
//!
//! Why: a background read queued in the log writer's order travels the
//! same stream as the application's records, so an application write made
//! during a resync or a verify waits (under protocols B and C) behind
//! whatever background data is ahead of it. Two rules keep that wait
//! short:
//!
//! - **Adaptive window.** Outside busy mode the background stream keeps
//!   ahead of the socket what the link moves in `ahead` at the stream's
//!   measured speed, within `window_min..=window_max`: enough to keep the
//!   link busy, not more.
//! - **Busy mode.** While an application write the peer has not written yet
//!   is in the stream, and for `hold` after (a QD1 writer waits again at
//!   once, and between two of its writes none waits), at most one
//!   `busy_chunk` of background data is in flight ahead of it.
//!
//! The callers' constants (one line each, unit in the name or the doc):
//! `resync::walk::RESYNC_PACING` and `verify::VERIFY_PACING`.

use std::time::{Duration, Instant};

/// The numbers of one paced stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacingParams {
    /// Bytes read at a time outside busy mode.
    pub chunk: u64,
    /// Bytes in flight at most in busy mode.
    pub busy_chunk: u64,
    /// Smallest and largest adaptive window, bytes.
    pub window_min: u64,
    pub window_max: u64,
    /// The window is what the stream moves in this long at its speed.
    pub ahead: Duration,
    /// Busy mode lasts this long after an application write last waited.
    pub hold: Duration,
}

/// How much background data may be ahead of the application now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pace {
    /// An application write waits (or did within `hold`): one
    /// `busy_chunk` at most.
    Busy { chunk: u64 },
    /// No application write waits: the adaptive window.
    Free { window: u64, chunk: u64 },
}

/// The pacing state of one stream.
#[derive(Debug, Clone)]
pub struct Pacing {
    params: PacingParams,
    /// When an application write was last seen waiting for the peer.
    app_waited_at: Option<Instant>,
}

impl Pacing {
    pub fn new(params: PacingParams) -> Pacing {
        Pacing { params, app_waited_at: None }
    }

    pub fn params(&self) -> &PacingParams {
        &self.params
    }

    /// Records whether an application write waits for the peer now, and
    /// says the pace. `done_bytes` since `started` give the measured speed.
    pub fn pace(&mut self, app_waiting: bool, done_bytes: u64, started: Instant) -> Pace {
        if app_waiting {
            self.app_waited_at = Some(Instant::now());
        }
        if self.busy() {
            return Pace::Busy { chunk: self.params.busy_chunk };
        }
        Pace::Free { window: self.window(done_bytes, started), chunk: self.params.chunk }
    }

    /// Busy mode: an application write waited within `hold`.
    pub fn busy(&self) -> bool {
        self.app_waited_at.is_some_and(|t| t.elapsed() < self.params.hold)
    }

    /// The adaptive window at the measured speed.
    fn window(&self, done_bytes: u64, started: Instant) -> u64 {
        let secs = started.elapsed().as_secs_f64();
        let speed = if secs > 0.0 { done_bytes as f64 / secs } else { 0.0 };
        ((speed * self.params.ahead.as_secs_f64()) as u64).clamp(self.params.window_min, self.params.window_max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: PacingParams = PacingParams {
        chunk: 1 << 20,
        busy_chunk: 128 << 10,
        window_min: 2 << 20,
        window_max: 8 << 20,
        ahead: Duration::from_millis(20),
        hold: Duration::from_millis(200),
    };

    #[test]
    fn the_window_follows_the_speed_within_its_bounds() {
        let mut p = Pacing::new(P);
        let now = Instant::now();
        // Nothing done yet: the smallest window.
        assert_eq!(p.pace(false, 0, now), Pace::Free { window: P.window_min, chunk: P.chunk });
        // 1 GB/s for one second: 20 MB in 20 ms, capped.
        let started = now - Duration::from_secs(1);
        assert_eq!(p.pace(false, 1 << 30, started), Pace::Free { window: P.window_max, chunk: P.chunk });
        // 200 MiB/s: 4 MiB in 20 ms.
        let Pace::Free { window, .. } = p.pace(false, 200 << 20, started) else { panic!("not busy") };
        assert!(((4 << 20) - (64 << 10)..=(4 << 20) + (64 << 10)).contains(&window), "{window}");
    }

    #[test]
    fn a_waiting_write_holds_the_stream_to_one_busy_chunk_for_the_hold() {
        let mut p = Pacing::new(P);
        let started = Instant::now() - Duration::from_secs(1);
        assert_eq!(p.pace(true, 1 << 30, started), Pace::Busy { chunk: P.busy_chunk });
        // The next look without a waiting write is still busy (QD1 writers).
        assert_eq!(p.pace(false, 1 << 30, started), Pace::Busy { chunk: P.busy_chunk });
        p.app_waited_at = Some(Instant::now() - P.hold);
        assert!(!p.busy());
        assert!(matches!(p.pace(false, 1 << 30, started), Pace::Free { .. }));
    }
}
