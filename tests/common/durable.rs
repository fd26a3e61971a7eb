//! A random write workload with a durability model, for the crash and
//! failover tests.
//!
//! Writers (QD tasks on one NBD connection) write 4 KiB blocks of a small
//! region (so blocks are overwritten often), some with FUA, and issue FLUSHes
//! now and then. Each write's content names the write (its id) and its block,
//! so a torn or misplaced block is detected. A logical clock stamps issue and
//! completion of every request.
//!
//! The rule (design.md §2): a write that completed before a completed FLUSH
//! was issued, or that completed with FUA, is durable; after failover a block
//! must hold its last durable write or one issued after it (or, with no
//! durable write, its previous content or any write to it).

#![allow(dead_code)]

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use repblock::nbd::NbdClient;

// The block pattern, shared with the fault campaign (`repbench chaos`).
#[path = "../../tools/repbench/src/chaos/pattern.rs"]
mod pattern;
pub use pattern::{BLOCK, content, identify};

/// Blocks written: 4 MiB at the start of the volume.
pub const REGION_BLOCKS: usize = 1024;

#[derive(Debug, Clone)]
pub struct WriteRec {
    pub block: usize,
    pub id: u64,
    pub fua: bool,
    pub issued: u64,
    pub completed: Option<u64>,
}

#[derive(Debug, Clone, Copy)]
pub struct FlushRec {
    pub issued: u64,
    pub completed: Option<u64>,
}

#[derive(Default, Debug)]
pub struct History {
    pub writes: Vec<WriteRec>,
    pub flushes: Vec<FlushRec>,
}

impl History {
    /// Writes that completed and are durable by the rule.
    pub fn durable_writes(&self) -> usize {
        let latest = self.flushes.iter().filter(|f| f.completed.is_some()).map(|f| f.issued).max();
        self.writes.iter().filter(|w| w.completed.is_some_and(|c| w.fua || latest.is_some_and(|f| f > c))).count()
    }
}

/// For every block, the write ids it may hold (`base`: ids before).
pub fn acceptable(base: &[u64], h: &History) -> Vec<HashSet<u64>> {
    let latest_flush_issue = h.flushes.iter().filter(|f| f.completed.is_some()).map(|f| f.issued).max();
    let durable = |w: &WriteRec| match w.completed {
        None => false,
        Some(c) => w.fua || latest_flush_issue.is_some_and(|f| f > c),
    };
    let mut per_block: Vec<Vec<&WriteRec>> = vec![Vec::new(); base.len()];
    for w in &h.writes {
        per_block[w.block].push(w);
    }
    per_block
        .iter()
        .enumerate()
        .map(|(b, ws)| {
            let mut ws = ws.clone();
            ws.sort_by_key(|w| w.issued);
            match ws.iter().rposition(|w| durable(w)) {
                Some(d) => ws[d..].iter().map(|w| w.id).collect(),
                None => std::iter::once(base[b]).chain(ws.iter().map(|w| w.id)).collect(),
            }
        })
        .collect()
}

/// Reads the region and checks every block against what it may hold;
/// returns the write id found in each block (the next round's base).
pub async fn check_region(client: &NbdClient, allowed: &[HashSet<u64>], what: &str) -> Vec<u64> {
    const CHUNK_BLOCKS: usize = 256;
    let mut found = Vec::with_capacity(REGION_BLOCKS);
    for first in (0..REGION_BLOCKS).step_by(CHUNK_BLOCKS) {
        let data = client
            .read((first * BLOCK) as u64, (CHUNK_BLOCKS * BLOCK) as u32)
            .await
            .unwrap_or_else(|e| panic!("{what}: read of the region failed: {e}"));
        for (i, buf) in data.chunks(BLOCK).enumerate() {
            let b = first + i;
            let id = identify(buf, b).unwrap_or_else(|| {
                panic!("{what}: block {b} holds bytes that are no write's content (torn or misplaced)")
            });
            assert!(
                allowed[b].contains(&id),
                "{what}: block {b} holds write {id:#x}, expected one of {:x?}: a write that was durable (FUA, or \
                 completed before a completed FLUSH) was lost",
                allowed[b]
            );
            found.push(id);
        }
    }
    found
}

/// [`check_region`], returning how many blocks had to hold a durable write
/// (blocks whose content before the workload, `base`, is no longer allowed).
pub async fn verify(client: &NbdClient, allowed: &[HashSet<u64>], base: &[u64], what: &str) -> usize {
    check_region(client, allowed, what).await;
    allowed.iter().zip(base).filter(|(a, b)| !a.contains(b)).count()
}

/// A running workload: `qd` writer tasks on `client`.
pub struct Workload {
    pub history: Arc<Mutex<History>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Workload {
    /// Starts `qd` writers on the runtime; write ids start at `first_id`.
    pub fn start(rt: &tokio::runtime::Runtime, client: NbdClient, qd: usize, seed: u64, first_id: u64) -> Workload {
        let rng = Arc::new(Mutex::new(StdRng::seed_from_u64(seed)));
        let busy = Arc::new(Mutex::new(HashSet::new()));
        let clock = Arc::new(AtomicU64::new(1));
        let next_id = Arc::new(AtomicU64::new(first_id));
        let history = Arc::new(Mutex::new(History::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..qd)
            .map(|_| {
                rt.spawn(writer(
                    client.clone(),
                    Arc::clone(&rng),
                    Arc::clone(&busy),
                    Arc::clone(&clock),
                    Arc::clone(&next_id),
                    Arc::clone(&history),
                    Arc::clone(&stop),
                ))
            })
            .collect();
        Workload { history, stop, tasks }
    }

    /// Completed writes so far.
    pub fn completed_writes(&self) -> usize {
        self.history.lock().expect("history").writes.iter().filter(|w| w.completed.is_some()).count()
    }

    /// Stops the writers (waiting at most 30 s each: a writer blocked on a
    /// dead server ends when the connection fails) and returns the history.
    pub fn finish(self, rt: &tokio::runtime::Runtime) -> History {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            rt.block_on(async {
                tokio::time::timeout(std::time::Duration::from_secs(30), t)
                    .await
                    .expect("a writer did not end within 30s of the stop")
                    .expect("writer task");
            });
        }
        std::mem::take(&mut *self.history.lock().expect("history"))
    }
}

async fn writer(
    client: NbdClient,
    rng: Arc<Mutex<StdRng>>,
    busy: Arc<Mutex<HashSet<usize>>>,
    clock: Arc<AtomicU64>,
    next_id: Arc<AtomicU64>,
    history: Arc<Mutex<History>>,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::Relaxed) {
        let (is_flush, fua, block) = {
            let mut rng = rng.lock().expect("rng");
            let is_flush = rng.random_range(0..12) == 0;
            let fua = rng.random_range(0..8) == 0;
            let mut busy = busy.lock().expect("busy");
            let block = loop {
                let b = rng.random_range(0..REGION_BLOCKS);
                if busy.insert(b) {
                    break b;
                }
            };
            if is_flush {
                busy.remove(&block);
            }
            (is_flush, fua, block)
        };
        if is_flush {
            let issued = clock.fetch_add(1, Ordering::SeqCst);
            let res = client.flush().await;
            let completed = res.is_ok().then(|| clock.fetch_add(1, Ordering::SeqCst));
            history.lock().expect("history").flushes.push(FlushRec { issued, completed });
            if res.is_err() {
                return;
            }
            continue;
        }
        let id = next_id.fetch_add(1, Ordering::SeqCst);
        let data = content(id, block);
        let issued = clock.fetch_add(1, Ordering::SeqCst);
        let res = client.write((block * BLOCK) as u64, &data, fua).await;
        let completed = res.is_ok().then(|| clock.fetch_add(1, Ordering::SeqCst));
        history.lock().expect("history").writes.push(WriteRec { block, id, fua, issued, completed });
        busy.lock().expect("busy").remove(&block);
        if res.is_err() {
            return;
        }
    }
}
