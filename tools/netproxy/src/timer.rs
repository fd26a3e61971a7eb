//! Sleeps precise to well under a millisecond.
//!
//! tokio's timer wheel ticks in whole milliseconds and rounds every deadline
//! up to the next tick, which adds 0.5–1.5 ms to each sleep: a 0.5 ms
//! one-way delay (the benchmarks' 1 ms RTT) would come out near 3 ms of
//! RTT. This module keeps the deadlines in a heap served by one thread that
//! waits on a condition variable with the exact remaining time (Linux
//! futex timeouts are good to ~50–100 µs) and wakes the waiting tasks. No
//! task spins.
//!
//! If the thread cannot be started, sleeps fall back to tokio's timer.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::task::{Poll, Waker};
use std::time::Instant;

use tracing::warn;

/// A task to wake at `deadline`; `seq` breaks ties so the heap is a total
/// order. Ordered so that `BinaryHeap` (a max-heap) pops the earliest.
struct Entry {
    deadline: Instant,
    seq: u64,
    waker: Waker,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Entry {}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Entry {
    fn cmp(&self, other: &Self) -> Ordering {
        (other.deadline, other.seq).cmp(&(self.deadline, self.seq))
    }
}

#[derive(Default)]
struct State {
    heap: BinaryHeap<Entry>,
    seq: u64,
}

#[derive(Default)]
struct Timer {
    state: Mutex<State>,
    changed: Condvar,
}

impl Timer {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing can be left half-done under this lock (push/pop only), so
        // a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn register(&self, deadline: Instant, waker: Waker) {
        let mut st = self.lock();
        st.seq = st.seq.wrapping_add(1);
        let seq = st.seq;
        let earliest = st.heap.peek().is_none_or(|top| deadline < top.deadline);
        st.heap.push(Entry { deadline, seq, waker });
        drop(st);
        if earliest {
            self.changed.notify_one();
        }
    }

    fn run(&self) {
        // The default timer slack lets the kernel defer this thread's
        // wake-ups by 50 µs to batch them; this thread exists to be punctual.
        // SAFETY: PR_SET_TIMERSLACK takes a plain integer argument and only
        // affects the calling thread.
        // Best effort: on failure the wake-ups are just 50 µs coarser.
        let _ = unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
        let mut st = self.lock();
        loop {
            let now = Instant::now();
            while st.heap.peek().is_some_and(|top| top.deadline <= now) {
                if let Some(e) = st.heap.pop() {
                    e.waker.wake();
                }
            }
            st = match st.heap.peek().map(|top| top.deadline - now) {
                None => self.changed.wait(st).unwrap_or_else(|p| p.into_inner()),
                Some(wait) => self.changed.wait_timeout(st, wait).unwrap_or_else(|p| p.into_inner()).0,
            };
        }
    }
}

fn timer() -> Option<&'static Arc<Timer>> {
    static TIMER: OnceLock<Option<Arc<Timer>>> = OnceLock::new();
    TIMER
        .get_or_init(|| {
            let t = Arc::new(Timer::default());
            let thread_t = t.clone();
            match std::thread::Builder::new().name("netproxy-timer".into()).spawn(move || thread_t.run()) {
                Ok(_) => Some(t),
                Err(e) => {
                    warn!(error = %e, "cannot start the precise timer thread; delays are rounded up to 1 ms");
                    None
                }
            }
        })
        .as_ref()
}

/// Sleeps until `deadline`, to within about 0.1 ms.
pub(crate) async fn sleep_until(deadline: tokio::time::Instant) {
    let Some(t) = timer() else {
        tokio::time::sleep_until(deadline).await;
        return;
    };
    let deadline = deadline.into_std();
    // Each pending poll registers the current waker (a spurious poll adds an
    // entry that later wakes the task once more: harmless); a dropped sleep
    // leaves an entry that fires into a no-longer-waiting task, also
    // harmless.
    std::future::poll_fn(|cx| {
        if Instant::now() >= deadline {
            return Poll::Ready(());
        }
        t.register(deadline, cx.waker().clone());
        Poll::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn sleeps_at_least_the_duration_and_not_a_tick_more() {
        for us in [50u64, 300, 700, 2500] {
            let d = Duration::from_micros(us);
            let mut worst = Duration::ZERO;
            for _ in 0..5 {
                let start = tokio::time::Instant::now();
                sleep_until(start + d).await;
                let took = start.elapsed();
                assert!(took >= d, "slept {took:?} for {d:?}");
                worst = worst.max(took - d);
            }
            // Generous: a loaded machine may oversleep, but tokio's wheel
            // would add up to 1.5 ms every time.
            assert!(worst < Duration::from_millis(50), "overslept {worst:?} for {d:?}");
        }
    }

    #[tokio::test]
    async fn many_sleepers_wake_in_deadline_order() {
        let start = tokio::time::Instant::now();
        let mut tasks = Vec::new();
        for i in (0..20u64).rev() {
            tasks.push(tokio::spawn(async move {
                let deadline = start + Duration::from_micros(200 * i);
                sleep_until(deadline).await;
                assert!(tokio::time::Instant::now() >= deadline);
            }));
        }
        for t in tasks {
            t.await.expect("sleeper");
        }
        assert!(start.elapsed() >= Duration::from_micros(200 * 19));
    }
}
