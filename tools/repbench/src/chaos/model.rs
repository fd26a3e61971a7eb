//! The verifying workload and its durability model.
//!
//! Writers (a few tasks on one NBD connection) write 4 KiB blocks of a small
//! region, some with FUA, and send FLUSHes now and then. Every write has a
//! run-wide id, and its content names the id and the block
//! ([`content`]), so a block read back tells which write it holds, or that
//! it holds bytes no write ever put there ([`FOREIGN`]). A block is never
//! written by two requests at once, so the writes of one block are totally
//! ordered by their issue times. Times are nanoseconds of one monotonic
//! clock ([`Clock`]), shared with the campaign's fault log.
//!
//! What a write guarantees (design.md §2, docs/replication.md): a write that
//! completed before a completed FLUSH of the same connection was issued, or
//! that completed with FUA, is *durable* from that FLUSH's (or its own)
//! completion on: on the node that served it under every protocol, and on
//! the peer as well under C (`durable` ack) and B (`received`: the peer
//! writes it unless it dies too). The campaign decides which durable writes
//! the final state must keep ([`Exempt`]): all of them, except where the
//! protocol allows a loss (protocol A after a failover: what was not sent)
//! or where the operator threw one node's changes away to resolve a split
//! brain.
//!
//! After a cycle each block must hold its last *required* write or one
//! issued after it; with no required write, the value it had before the
//! cycle or any write of the cycle. Anything else is a lost write (it holds
//! an older write) or corruption (a value never written to this block).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use repblock::nbd::NbdClient;
use serde::Serialize;

pub use super::pattern::{BLOCK, content};

/// The value of a block that is no write's content.
pub const FOREIGN: u64 = u64::MAX;

/// Which write `buf` (block `block`) holds: 0 for zeroes (never written),
/// [`FOREIGN`] for anything that is not exactly one write's content.
pub fn identify(buf: &[u8], block: usize) -> u64 {
    super::pattern::identify(buf, block).filter(|&id| id != FOREIGN).unwrap_or(FOREIGN)
}

/// Monotonic nanoseconds since the campaign started.
#[derive(Debug, Clone, Copy)]
pub struct Clock(Instant);

impl Clock {
    pub fn new() -> Clock {
        Clock(Instant::now())
    }

    pub fn now(&self) -> u64 {
        self.0.elapsed().as_nanos() as u64
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

/// One write of the workload.
#[derive(Debug, Clone)]
pub struct WriteRec {
    pub block: usize,
    pub id: u64,
    pub fua: bool,
    /// The phase (one NBD connection to one node) it was sent in.
    pub phase: usize,
    pub issued: u64,
    /// Completion time; `None` if it failed or never completed.
    pub completed: Option<u64>,
}

#[derive(Debug, Clone, Copy)]
pub struct FlushRec {
    pub phase: usize,
    pub issued: u64,
    pub completed: Option<u64>,
}

/// A cycle's requests.
#[derive(Debug, Default)]
pub struct History {
    pub writes: Vec<WriteRec>,
    pub flushes: Vec<FlushRec>,
}

impl History {
    /// When `w` became durable (FUA completion, or the completion of the
    /// first FLUSH of its phase issued after it completed).
    pub fn durable_at(&self, w: &WriteRec) -> Option<u64> {
        let c = w.completed?;
        if w.fua {
            return Some(c);
        }
        self.flushes.iter().filter(|f| f.phase == w.phase && f.issued > c).filter_map(|f| f.completed).min()
    }

    pub fn completed_writes(&self) -> usize {
        self.writes.iter().filter(|w| w.completed.is_some()).count()
    }
}

/// Durable writes the final state need not keep: those of `phases` that
/// became durable at or after `after` (a failover under protocol A, or the
/// victim's changes discarded to resolve a split brain).
#[derive(Debug, Clone, Default)]
pub struct Exempt {
    pub rules: Vec<(HashSet<usize>, u64)>,
}

impl Exempt {
    pub fn add(&mut self, phases: impl IntoIterator<Item = usize>, after: u64) {
        self.rules.push((phases.into_iter().collect(), after));
    }

    fn covers(&self, w: &WriteRec, durable_at: u64) -> bool {
        self.rules.iter().any(|(phases, after)| phases.contains(&w.phase) && durable_at >= *after)
    }
}

/// What a block may hold after a cycle.
#[derive(Debug, Clone)]
pub struct Allowed {
    pub values: HashSet<u64>,
    /// The last write the block must hold (or a later one), if any.
    pub required: Option<u64>,
}

/// Per block, the values allowed after the cycle whose writes are `h` and
/// whose blocks held `base` before.
pub fn allowed(base: &[u64], h: &History, exempt: &Exempt) -> Vec<Allowed> {
    let mut per_block: Vec<Vec<&WriteRec>> = vec![Vec::new(); base.len()];
    for w in &h.writes {
        per_block[w.block].push(w);
    }
    per_block
        .iter_mut()
        .enumerate()
        .map(|(b, ws)| {
            ws.sort_by_key(|w| w.issued);
            let required = |w: &&WriteRec| h.durable_at(w).is_some_and(|d| !exempt.covers(w, d));
            match ws.iter().rposition(required) {
                Some(d) => Allowed { values: ws[d..].iter().map(|w| w.id).collect(), required: Some(ws[d].id) },
                None => Allowed {
                    values: std::iter::once(base[b]).chain(ws.iter().map(|w| w.id)).collect(),
                    required: None,
                },
            }
        })
        .collect()
}

/// A block that holds what the model does not allow.
#[derive(Debug, Clone, Serialize)]
pub struct Violation {
    pub block: usize,
    /// `lost` (an acknowledged-durable write was replaced by an older value)
    /// or `corrupt` (a value never written to this block, or torn).
    pub kind: &'static str,
    pub found: u64,
    pub required: Option<u64>,
    pub detail: String,
}

/// Checks the values `found` against `allowed`; `writes` are the cycle's
/// writes (to tell a lost write from corruption).
pub fn check(found: &[u64], allowed: &[Allowed], base: &[u64], h: &History) -> Vec<Violation> {
    let mut out = Vec::new();
    for (b, (&v, a)) in found.iter().zip(allowed).enumerate() {
        if a.values.contains(&v) {
            continue;
        }
        let known = v == base[b] || h.writes.iter().any(|w| w.block == b && w.id == v);
        let kind = if v != FOREIGN && known { "lost" } else { "corrupt" };
        let detail = match (kind, a.required) {
            ("lost", Some(r)) => format!("holds write {v:#x}, older than the durable write {r:#x} it must keep"),
            ("lost", None) => format!("holds write {v:#x}, which the model does not allow"),
            _ if v == FOREIGN => "holds bytes that are no write's content (torn or misplaced)".to_string(),
            _ => format!("holds write {v:#x}, never written to this block"),
        };
        out.push(Violation { block: b, kind, found: v, required: a.required, detail });
    }
    out
}

/// Shared counters of a running campaign: next write id, and the clock.
#[derive(Debug)]
pub struct Ids {
    next: AtomicU64,
}

impl Ids {
    pub fn new() -> Ids {
        Ids { next: AtomicU64::new(1) }
    }

    fn take(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }
}

impl Default for Ids {
    fn default() -> Self {
        Ids::new()
    }
}

/// A running workload phase: `qd` writers on one NBD connection.
pub struct Workload {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Parameters of a phase.
#[derive(Debug, Clone, Copy)]
pub struct PhaseSpec {
    pub phase: usize,
    pub qd: usize,
    pub seed: u64,
    pub region_blocks: usize,
}

impl Workload {
    pub fn start(
        rt: &tokio::runtime::Handle,
        client: NbdClient,
        spec: PhaseSpec,
        clock: Clock,
        ids: Arc<Ids>,
        history: Arc<Mutex<History>>,
    ) -> Workload {
        let rng = Arc::new(Mutex::new(StdRng::seed_from_u64(spec.seed)));
        let busy = Arc::new(Mutex::new(HashSet::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..spec.qd)
            .map(|_| {
                let w = Writer {
                    client: client.clone(),
                    rng: Arc::clone(&rng),
                    busy: Arc::clone(&busy),
                    clock,
                    ids: Arc::clone(&ids),
                    history: Arc::clone(&history),
                    stop: Arc::clone(&stop),
                    spec,
                };
                rt.spawn(w.run())
            })
            .collect();
        Workload { stop, tasks }
    }

    /// Asks the writers to stop after their current request.
    pub fn signal_stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Stops the writers and waits for them; `false` if one did not end
    /// within `timeout` (a request that never got an answer: a hang).
    pub fn stop(self, rt: &tokio::runtime::Handle, timeout: Duration) -> bool {
        self.signal_stop();
        let deadline = tokio::time::Instant::now() + timeout;
        let mut all = true;
        for t in self.tasks {
            let ended = rt.block_on(async { tokio::time::timeout_at(deadline, t).await.is_ok() });
            all &= ended;
        }
        all
    }

    /// Whether every writer has ended (its connection failed).
    pub fn ended(&self) -> bool {
        self.tasks.iter().all(|t| t.is_finished())
    }
}

struct Writer {
    client: NbdClient,
    rng: Arc<Mutex<StdRng>>,
    busy: Arc<Mutex<HashSet<usize>>>,
    clock: Clock,
    ids: Arc<Ids>,
    history: Arc<Mutex<History>>,
    stop: Arc<AtomicBool>,
    spec: PhaseSpec,
}

impl Writer {
    async fn run(self) {
        while !self.stop.load(Ordering::Relaxed) {
            let (is_flush, fua, block) = {
                let mut rng = self.rng.lock().expect("rng");
                let is_flush = rng.random_range(0..10) == 0;
                let fua = rng.random_range(0..8) == 0;
                let mut busy = self.busy.lock().expect("busy");
                let block = loop {
                    let b = rng.random_range(0..self.spec.region_blocks);
                    if is_flush || busy.insert(b) {
                        break b;
                    }
                };
                (is_flush, fua, block)
            };
            if is_flush {
                let issued = self.clock.now();
                let res = self.client.flush().await;
                let completed = res.is_ok().then(|| self.clock.now());
                self.history.lock().expect("history").flushes.push(FlushRec {
                    phase: self.spec.phase,
                    issued,
                    completed,
                });
                if res.is_err() {
                    return;
                }
                continue;
            }
            let id = self.ids.take();
            let data = content(id, block);
            // Recorded when issued: a write that never gets an answer (a
            // hang) may still reach the disk, and the check must know it.
            let issued = self.clock.now();
            let index = {
                let mut h = self.history.lock().expect("history");
                h.writes.push(WriteRec { block, id, fua, phase: self.spec.phase, issued, completed: None });
                h.writes.len() - 1
            };
            let res = self.client.write((block * BLOCK) as u64, &data, fua).await;
            if res.is_ok() {
                let now = self.clock.now();
                self.history.lock().expect("history").writes[index].completed = Some(now);
            }
            self.busy.lock().expect("busy").remove(&block);
            if res.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(block: usize, id: u64, phase: usize, issued: u64, completed: Option<u64>, fua: bool) -> WriteRec {
        WriteRec { block, id, fua, phase, issued, completed }
    }

    #[test]
    fn content_identifies_its_write_and_block() {
        let c = content(7, 3);
        assert_eq!(identify(&c, 3), 7);
        assert_eq!(identify(&c, 4), FOREIGN, "misplaced");
        let mut torn = c.clone();
        torn[600..].copy_from_slice(&content(8, 3)[600..]);
        assert_eq!(identify(&torn, 3), FOREIGN, "torn");
        assert_eq!(identify(&[0u8; BLOCK], 9), 0);
    }

    #[test]
    fn durable_by_flush_of_the_same_phase_or_fua() {
        let mut h = History::default();
        h.writes.push(w(0, 1, 0, 10, Some(20), false));
        h.writes.push(w(1, 2, 0, 10, Some(40), false));
        h.writes.push(w(2, 3, 1, 10, Some(20), false));
        h.writes.push(w(3, 4, 0, 50, Some(60), true));
        h.flushes.push(FlushRec { phase: 0, issued: 30, completed: Some(35) });
        assert_eq!(h.durable_at(&h.writes[0]), Some(35));
        assert_eq!(h.durable_at(&h.writes[1]), None, "completed after the flush was issued");
        assert_eq!(h.durable_at(&h.writes[2]), None, "a flush of another phase (node) does not cover it");
        assert_eq!(h.durable_at(&h.writes[3]), Some(60));
    }

    #[test]
    fn a_lost_durable_write_and_corruption_are_told_apart() {
        let base = vec![5, 6, 0];
        let mut h = History::default();
        h.writes.push(w(0, 10, 0, 1, Some(2), true)); // durable
        h.writes.push(w(0, 11, 0, 3, None, false)); // failed: may or may not be there
        h.writes.push(w(1, 12, 0, 1, Some(2), false)); // not durable
        let a = allowed(&base, &h, &Exempt::default());
        assert_eq!(a[0].values, HashSet::from([10, 11]));
        assert_eq!(a[1].values, HashSet::from([6, 12]));
        assert_eq!(a[2].values, HashSet::from([0]));
        assert!(check(&[11, 6, 0], &a, &base, &h).is_empty());
        let v = check(&[5, 12, 12], &a, &base, &h);
        assert_eq!(v.iter().map(|v| (v.block, v.kind)).collect::<Vec<_>>(), vec![(0, "lost"), (2, "corrupt")]);
        let v = check(&[FOREIGN, 6, 0], &a, &base, &h);
        assert_eq!(v[0].kind, "corrupt");
    }

    #[test]
    fn exempt_writes_are_allowed_but_not_required() {
        let base = vec![5];
        let mut h = History::default();
        h.writes.push(w(0, 10, 0, 1, Some(2), true)); // durable at 2, phase 0
        h.writes.push(w(0, 11, 0, 3, Some(9), true)); // durable at 9, phase 0
        let mut ex = Exempt::default();
        ex.add([0], 5);
        let a = allowed(&base, &h, &ex);
        assert_eq!(a[0].required, Some(10));
        assert_eq!(a[0].values, HashSet::from([10, 11]));
        let mut ex = Exempt::default();
        ex.add([0], 0);
        let a = allowed(&base, &h, &ex);
        assert_eq!(a[0].required, None);
        assert_eq!(a[0].values, HashSet::from([5, 10, 11]));
    }
}
