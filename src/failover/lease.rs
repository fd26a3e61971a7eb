//! Terms, clocks and lease arithmetic (docs/failover.md, "Leases").
//!
//! A primary serves a request only while its lease is valid. The lease is
//! renewed by a Pong (from the peer or the witness) that echoes the *send*
//! time `t_send` of the Ping it answers, and ends at
//! `t_send + L·(1−ρ)` on the primary's own clock. A voter (the peer or the
//! witness) that renewed the lease at local time `r` takes part in a new term
//! only after `r + wait` on its own clock, with
//! `wait = L·(1+ρ)/(1−ρ) + δ`.
//!
//! Why this is enough with clocks that are never synchronised: let every
//! clock's rate be within `[1−ρ, 1+ρ]` of real time (offsets are arbitrary).
//! The primary's `L·(1−ρ)` local units last at most `L` real time from the
//! real send time `s`; the voter renewed at real time `≥ s` and its `wait`
//! lasts at least `L/(1−ρ) > L` real time. So the old lease has ended, in real
//! time, before any voter takes part in a new term. Anchoring at the Pong's
//! *receive* time instead would let a Pong delayed in the network stretch the
//! lease past the voters' wait (the simulation in `sim.rs` shows it).
//!
//! Rounding always favours safety: the primary's deadline rounds down, the
//! voters' wait rounds up. All durations are held in nanoseconds.

use std::fmt;
use std::time::Duration;

// ---------------------------------------------------------------------------
// Terms.
// ---------------------------------------------------------------------------

/// A failover term: the fencing token. The witness grants each successor term
/// at most once; every replication frame carries the sender's term and a
/// lower term is refused. Term 0 is the bootstrap term (no primary yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, serde::Serialize)]
#[serde(transparent)]
pub struct Term(pub u64);

impl Term {
    /// The bootstrap term of a freshly initialised witness.
    pub const ZERO: Term = Term(0);

    /// The successor term (saturating: 2^64 terms are never reached).
    pub fn next(self) -> Term {
        Term(self.0.saturating_add(1))
    }
}

impl fmt::Display for Term {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

// ---------------------------------------------------------------------------
// Clocks.
// ---------------------------------------------------------------------------

/// A point on one node's local clock, in nanoseconds since an arbitrary
/// origin. Values from different nodes are never compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct MonoTime(pub u64);

impl MonoTime {
    /// `self + d`, saturating.
    pub fn plus(self, d: Duration) -> MonoTime {
        MonoTime(self.0.saturating_add(nanos(d)))
    }

    /// `self − earlier`, zero if `earlier` is later.
    pub fn since(self, earlier: MonoTime) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

/// Nanoseconds of `d`, saturating at `u64::MAX` (584 years).
fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Where failover reads the time. Production uses [`BootClock`]; tests use
/// [`FakeClock`], and the simulation gives each node a clock of its own rate.
pub trait Clock {
    fn now(&self) -> MonoTime;
}

/// `CLOCK_BOOTTIME`: monotonic, and it keeps counting while the machine is
/// suspended. `CLOCK_MONOTONIC` stops during a suspend, so a primary resumed
/// after a long suspend would believe its lease still valid; with the boot
/// clock the lease has expired by then (docs/failover.md).
#[derive(Debug, Clone, Copy, Default)]
pub struct BootClock;

impl Clock for BootClock {
    fn now(&self) -> MonoTime {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: `ts` is a valid, writable timespec for the duration of the
        // call; CLOCK_BOOTTIME exists on every Linux this crate supports
        // (2.6.39+), and clock_gettime writes nothing else.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
        assert_eq!(rc, 0, "clock_gettime(CLOCK_BOOTTIME) failed");
        MonoTime((ts.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec as u64))
    }
}

/// A clock tests move by hand. Clones share the same time.
#[derive(Debug, Clone, Default)]
pub struct FakeClock(std::sync::Arc<std::sync::atomic::AtomicU64>);

impl FakeClock {
    pub fn at(t: MonoTime) -> FakeClock {
        FakeClock(std::sync::Arc::new(std::sync::atomic::AtomicU64::new(t.0)))
    }

    pub fn advance(&self, d: Duration) {
        self.0.fetch_add(nanos(d), std::sync::atomic::Ordering::SeqCst);
    }

    pub fn set(&self, t: MonoTime) {
        self.0.store(t.0, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Clock for FakeClock {
    fn now(&self) -> MonoTime {
        MonoTime(self.0.load(std::sync::atomic::Ordering::SeqCst))
    }
}

// ---------------------------------------------------------------------------
// Clock-rate bound and lease arithmetic.
// ---------------------------------------------------------------------------

/// A clock-rate bound ρ in parts per million: every clock involved runs at a
/// rate within `[1−ρ, 1+ρ]` of real time (config `max_clock_drift`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Drift {
    ppm: u32,
}

impl Drift {
    /// Smallest accepted bound: 0.01 %.
    pub const MIN: Drift = Drift { ppm: 100 };
    /// Largest accepted bound: 10 %.
    pub const MAX: Drift = Drift { ppm: 100_000 };

    /// A bound of `ppm` parts per million (validated by [`FailoverTimings`]).
    pub const fn ppm(ppm: u32) -> Drift {
        Drift { ppm }
    }

    pub fn as_ppm(self) -> u32 {
        self.ppm
    }

    /// Parses `"1%"`, `"0.05%"` or `"500ppm"`.
    pub fn parse(s: &str) -> Option<Drift> {
        let s = s.trim();
        if let Some(n) = s.strip_suffix("ppm") {
            return n.trim().parse().ok().map(Drift::ppm);
        }
        let pct = s.strip_suffix('%')?.trim();
        let (int, frac) = pct.split_once('.').unwrap_or((pct, ""));
        if int.is_empty() || frac.len() > 4 || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
            return None;
        }
        let int: u32 = int.parse().ok()?;
        let frac_ppm: u32 = if frac.is_empty() { 0 } else { format!("{frac:0<4}").parse().ok()? };
        int.checked_mul(10_000)?.checked_add(frac_ppm).map(Drift::ppm)
    }
}

impl fmt::Display for Drift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let whole = self.ppm / 10_000;
        let frac = self.ppm % 10_000;
        if frac == 0 {
            write!(f, "{whole}%")
        } else {
            let digits = format!("{frac:04}");
            write!(f, "{whole}.{}%", digits.trim_end_matches('0'))
        }
    }
}

const MILLION: u128 = 1_000_000;

/// The lease parameters every node of a resource shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseParams {
    /// L: the lease length.
    pub lease: Duration,
    /// ρ: the clock-rate bound.
    pub drift: Drift,
    /// δ: added to the voters' wait (scheduling slack).
    pub slack: Duration,
}

impl LeaseParams {
    /// `L·(1−ρ)`, rounded down: how long a renewal keeps the primary's lease
    /// valid on its own clock.
    pub fn holder_span(&self) -> Duration {
        let l = self.lease.as_nanos();
        let ppm = u128::from(self.drift.ppm.min(999_999));
        Duration::from_nanos(u64::try_from(l * (MILLION - ppm) / MILLION).unwrap_or(u64::MAX))
    }

    /// The primary's deadline after a Pong echoing `t_send`:
    /// `t_send + L·(1−ρ)`.
    pub fn deadline(&self, t_send: MonoTime) -> MonoTime {
        t_send.plus(self.holder_span())
    }

    /// `wait = L·(1+ρ)/(1−ρ) + δ`, rounded up: how long a voter that renewed
    /// the lease stays out of any new term, on its own clock.
    pub fn wait(&self) -> Duration {
        let l = self.lease.as_nanos();
        let ppm = u128::from(self.drift.ppm.min(999_999));
        let num = l * (MILLION + ppm);
        let den = MILLION - ppm;
        let w = num.div_ceil(den);
        Duration::from_nanos(u64::try_from(w).unwrap_or(u64::MAX)).saturating_add(self.slack)
    }
}

/// The primary's lease: valid until `deadline` on its own clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Lease {
    /// The send time of the newest Ping whose renewal came back.
    pub renewed_at: Option<MonoTime>,
    pub deadline: Option<MonoTime>,
}

impl Lease {
    /// A renewal by a Pong (or a grant) answering a Ping (or a request) sent
    /// at `t_send`. Returns whether the deadline moved. A `t_send` later than
    /// `now` cannot be ours (a confused or hostile peer) and is ignored.
    pub fn renew(&mut self, p: &LeaseParams, t_send: MonoTime, now: MonoTime) -> bool {
        if t_send > now {
            return false;
        }
        let d = p.deadline(t_send);
        if self.deadline.is_some_and(|old| old >= d) {
            return false;
        }
        self.deadline = Some(d);
        self.renewed_at = Some(t_send);
        true
    }

    /// The reply-path check: `now < t_send + L·(1−ρ)`.
    pub fn valid(&self, now: MonoTime) -> bool {
        self.deadline.is_some_and(|d| now < d)
    }

    /// Time left, zero when expired or never renewed.
    pub fn remaining(&self, now: MonoTime) -> Duration {
        self.deadline.map_or(Duration::ZERO, |d| d.since(now))
    }
}

// ---------------------------------------------------------------------------
// Timings (config [failover]).
// ---------------------------------------------------------------------------

/// The timing section of `[failover]`, validated (brief §5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailoverTimings {
    /// Pings on the data link and to the witness, every `heartbeat`.
    pub heartbeat: Duration,
    /// L.
    pub lease: Duration,
    /// Silence after which a session is declared ended.
    pub detect: Duration,
    /// A primary suspended and unrenewed this long demotes itself (fenced).
    pub fence_demote_after: Duration,
    /// ρ (`max_clock_drift`).
    pub max_clock_drift: Drift,
    /// Automatic promotions this node may take part in per `failover_window`.
    pub max_auto_failovers: u32,
    pub failover_window: Duration,
}

/// The voters' scheduling slack δ.
pub const WAIT_SLACK: Duration = Duration::from_millis(20);
/// First and largest delay between two refused claims.
pub const CLAIM_BACKOFF_MIN: Duration = Duration::from_millis(250);
pub const CLAIM_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// A refused `[failover]` timing, naming the field as the config file spells it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct TimingError {
    pub field: &'static str,
    pub message: String,
}

impl FailoverTimings {
    /// The default profile: heartbeat 200 ms, lease 1 s, detect 1.5 s,
    /// fence after 2 s, ρ 1 %, 3 automatic failovers per hour.
    pub const DEFAULT: FailoverTimings = FailoverTimings {
        heartbeat: Duration::from_millis(200),
        lease: Duration::from_secs(1),
        detect: Duration::from_millis(1500),
        fence_demote_after: Duration::from_secs(2),
        max_clock_drift: Drift::ppm(10_000),
        max_auto_failovers: 3,
        failover_window: Duration::from_secs(3600),
    };

    /// The fast profile (a quiet LAN): heartbeat 50 ms, lease 250 ms, detect
    /// 400 ms, fence after 500 ms.
    pub const FAST: FailoverTimings = FailoverTimings {
        heartbeat: Duration::from_millis(50),
        lease: Duration::from_millis(250),
        detect: Duration::from_millis(400),
        fence_demote_after: Duration::from_millis(500),
        max_clock_drift: Drift::ppm(10_000),
        max_auto_failovers: 3,
        failover_window: Duration::from_secs(3600),
    };

    /// Checks the rules of brief §5.1; the error names the first field that
    /// breaks one.
    pub fn validate(self) -> Result<FailoverTimings, TimingError> {
        let err = |field, message: String| Err(TimingError { field, message });
        let ms = |d: Duration| crate::units::format_duration(d);
        if self.heartbeat.is_zero() {
            return err("heartbeat", "must be greater than 0".into());
        }
        if self.lease < self.heartbeat * 4 {
            return err(
                "lease",
                format!(
                    "must be at least 4 x heartbeat ({}), is {} (a lease must survive three lost pings)",
                    ms(self.heartbeat * 4),
                    ms(self.lease)
                ),
            );
        }
        if self.detect < self.heartbeat * 3 {
            return err(
                "detect",
                format!("must be at least 3 x heartbeat ({}), is {}", ms(self.heartbeat * 3), ms(self.detect)),
            );
        }
        if self.fence_demote_after < self.lease {
            return err(
                "fence_demote_after",
                format!("must be at least lease ({}), is {}", ms(self.lease), ms(self.fence_demote_after)),
            );
        }
        if self.max_clock_drift < Drift::MIN || self.max_clock_drift > Drift::MAX {
            return err(
                "max_clock_drift",
                format!("must be between {} and {}, is {}", Drift::MIN, Drift::MAX, self.max_clock_drift),
            );
        }
        if self.failover_window.is_zero() {
            return err("failover_window", "must be greater than 0".into());
        }
        Ok(self)
    }

    /// The lease parameters these timings give.
    pub fn lease_params(&self) -> LeaseParams {
        LeaseParams { lease: self.lease, drift: self.max_clock_drift, slack: WAIT_SLACK }
    }

    /// The voters' wait (`L·(1+ρ)/(1−ρ) + δ`).
    pub fn wait(&self) -> Duration {
        self.lease_params().wait()
    }
}

impl Default for FailoverTimings {
    fn default() -> FailoverTimings {
        FailoverTimings::DEFAULT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn terms_order_and_succeed() {
        assert!(Term(3) < Term(4));
        assert_eq!(Term(3).next(), Term(4));
        assert_eq!(Term(u64::MAX).next(), Term(u64::MAX));
        assert_eq!(Term::ZERO.to_string(), "0");
        assert_eq!(serde_json::to_string(&Term(7)).unwrap(), "7");
    }

    #[test]
    fn default_profile_numbers() {
        let p = FailoverTimings::DEFAULT.lease_params();
        // L·(1−ρ) = 990 ms.
        assert_eq!(p.holder_span(), ms(990));
        // L·(1+ρ)/(1−ρ) = 1020.2020… ms, rounded up, + 20 ms.
        assert_eq!(p.wait(), Duration::from_nanos(1_020_202_021) + ms(20));
        let fast = FailoverTimings::FAST.lease_params();
        assert_eq!(fast.holder_span(), Duration::from_micros(247_500));
        assert!(fast.wait() > ms(275) && fast.wait() < ms(276), "{:?}", fast.wait());
    }

    #[test]
    fn deadline_is_anchored_at_the_send_time() {
        let p = FailoverTimings::DEFAULT.lease_params();
        let mut lease = Lease::default();
        assert!(!lease.valid(MonoTime(0)));
        let sent = MonoTime(1_000_000_000);
        let now = sent.plus(ms(300)); // the Pong came back 300 ms later
        assert!(lease.renew(&p, sent, now));
        assert_eq!(lease.deadline, Some(sent.plus(ms(990))));
        assert!(lease.valid(sent.plus(ms(989))));
        assert!(!lease.valid(sent.plus(ms(990))));
        assert_eq!(lease.remaining(now), ms(690));
        // An older Pong arriving late never moves the deadline back.
        assert!(!lease.renew(&p, sent, now));
        assert!(!lease.renew(&p, MonoTime(500_000_000), now));
        assert_eq!(lease.deadline, Some(sent.plus(ms(990))));
        // A send time in the future is not ours.
        assert!(!lease.renew(&p, now.plus(ms(1)), now));
        assert!(lease.renew(&p, now, now));
        assert_eq!(lease.renewed_at, Some(now));
    }

    /// The safety inequality of the module doc, over the whole accepted ρ
    /// range: the primary's span at the slowest rate lasts no longer in real
    /// time than the voters' wait at the fastest rate.
    #[test]
    fn the_wait_outlasts_the_lease_at_every_accepted_drift() {
        for ppm in [100, 1_000, 10_000, 50_000, 100_000] {
            for lease in [ms(200), ms(250), ms(1000), ms(60_000)] {
                let p = LeaseParams { lease, drift: Drift::ppm(ppm), slack: Duration::ZERO };
                let rho = ppm as f64 / 1e6;
                let holder_real = p.holder_span().as_secs_f64() / (1.0 - rho);
                let voter_real = p.wait().as_secs_f64() / (1.0 + rho);
                assert!(holder_real <= voter_real, "ρ {ppm} ppm, L {lease:?}: {holder_real} > {voter_real}");
            }
        }
    }

    #[test]
    fn drift_parses_and_prints() {
        assert_eq!(Drift::parse("1%"), Some(Drift::ppm(10_000)));
        assert_eq!(Drift::parse("0.01%"), Some(Drift::MIN));
        assert_eq!(Drift::parse("10%"), Some(Drift::MAX));
        assert_eq!(Drift::parse("0.5%"), Some(Drift::ppm(5_000)));
        assert_eq!(Drift::parse("250ppm"), Some(Drift::ppm(250)));
        for bad in ["", "%", "1", "-1%", "0.00001%", "1.%x", "a%", "1e3%"] {
            assert_eq!(Drift::parse(bad), None, "{bad:?}");
        }
        assert_eq!(Drift::ppm(10_000).to_string(), "1%");
        assert_eq!(Drift::ppm(5_500).to_string(), "0.55%");
        assert_eq!(Drift::MIN.to_string(), "0.01%");
    }

    #[test]
    fn both_profiles_validate() {
        assert_eq!(FailoverTimings::DEFAULT.validate(), Ok(FailoverTimings::DEFAULT));
        assert_eq!(FailoverTimings::FAST.validate(), Ok(FailoverTimings::FAST));
    }

    #[test]
    fn each_rule_names_its_field() {
        let d = FailoverTimings::DEFAULT;
        let cases = [
            (FailoverTimings { heartbeat: Duration::ZERO, ..d }, "heartbeat"),
            (FailoverTimings { lease: ms(799), ..d }, "lease"),
            (FailoverTimings { detect: ms(599), ..d }, "detect"),
            (FailoverTimings { fence_demote_after: ms(999), ..d }, "fence_demote_after"),
            (FailoverTimings { max_clock_drift: Drift::ppm(99), ..d }, "max_clock_drift"),
            (FailoverTimings { max_clock_drift: Drift::ppm(100_001), ..d }, "max_clock_drift"),
            (FailoverTimings { failover_window: Duration::ZERO, ..d }, "failover_window"),
        ];
        for (t, field) in cases {
            let e = t.validate().expect_err(field);
            assert_eq!(e.field, field);
            assert!(e.to_string().starts_with(&format!("{field}: must be")), "{e}");
        }
        // The bounds themselves are accepted.
        let edge = FailoverTimings { lease: ms(800), detect: ms(600), fence_demote_after: ms(800), ..d };
        assert!(edge.validate().is_ok());
        let e = FailoverTimings { lease: ms(500), ..d }.validate().unwrap_err();
        assert_eq!(
            e.to_string(),
            "lease: must be at least 4 x heartbeat (800ms), is 500ms (a lease must survive three lost pings)"
        );
    }

    #[test]
    fn clocks() {
        let c = BootClock;
        let a = c.now();
        let b = c.now();
        assert!(b >= a);
        let f = FakeClock::at(MonoTime(5));
        let g = f.clone();
        f.advance(ms(1));
        assert_eq!(g.now(), MonoTime(1_000_005));
        g.set(MonoTime(2));
        assert_eq!(f.now(), MonoTime(2));
        assert_eq!(MonoTime(10).since(MonoTime(20)), Duration::ZERO);
    }
}
