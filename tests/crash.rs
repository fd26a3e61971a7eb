//! Crash tests: repd is SIGKILLed in the middle of writes and flushes; after
//! each restart every block must hold its last write that was durable (it
//! completed before a completed FLUSH was issued, or it completed with FUA),
//! or a write to it issued after that one. Plus fail-stop under an injected
//! fdatasync error.
//!
//! Seeded: set REPBLOCK_CRASH_SEED to replay a run (the seed is printed).

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{NodeOpts, TestNode};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use repblock::nbd::{ClientError, ListenAddr, NbdClient};

const BLOCK: usize = 4096;
/// Blocks written: a small region, so blocks are overwritten often.
const REGION_BLOCKS: usize = 1024;
const ROUNDS: u32 = 20;
const QUEUE_DEPTH: usize = 8;

/// Content of write `id` to `block`: the id, the block, then bytes derived
/// from both (so a torn or misplaced block is detected).
fn content(id: u64, block: usize) -> Vec<u8> {
    let mut buf = vec![0u8; BLOCK];
    buf[..8].copy_from_slice(&id.to_le_bytes());
    buf[8..16].copy_from_slice(&(block as u64).to_le_bytes());
    let mut x = id ^ ((block as u64) << 32) ^ 0x9e37_79b9_7f4a_7c15;
    for chunk in buf[16..].chunks_mut(8) {
        // xorshift64
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    buf
}

/// Which write a block read back holds: `Some(0)` for zeroes, `None` for
/// anything that is not exactly one write's content.
fn identify(buf: &[u8], block: usize) -> Option<u64> {
    if buf.iter().all(|&b| b == 0) {
        return Some(0);
    }
    let id = u64::from_le_bytes(buf[..8].try_into().ok()?);
    (content(id, block) == buf).then_some(id)
}

#[derive(Debug, Clone)]
struct WriteRec {
    block: usize,
    id: u64,
    fua: bool,
    issued: u64,
    completed: Option<u64>,
}

#[derive(Debug, Clone, Copy)]
struct FlushRec {
    issued: u64,
    completed: Option<u64>,
}

#[derive(Default)]
struct History {
    writes: Vec<WriteRec>,
    flushes: Vec<FlushRec>,
}

/// For every block, the write ids it may hold after the crash.
fn acceptable(base: &[u64], h: &History) -> Vec<HashSet<u64>> {
    // Latest flush issue time among completed flushes is all that matters:
    // a completed write is durable if any completed flush was issued after
    // it completed.
    let completed_flush_issues: Vec<u64> =
        h.flushes.iter().filter(|f| f.completed.is_some()).map(|f| f.issued).collect();
    let latest_flush_issue = completed_flush_issues.iter().copied().max();
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
            // Writes to one block never overlap in flight: issue order is
            // their order.
            let mut ws = ws.clone();
            ws.sort_by_key(|w| w.issued);
            match ws.iter().rposition(|w| durable(w)) {
                Some(d) => ws[d..].iter().map(|w| w.id).collect(),
                None => std::iter::once(base[b]).chain(ws.iter().map(|w| w.id)).collect(),
            }
        })
        .collect()
}

fn addr(n: &TestNode) -> ListenAddr {
    format!("127.0.0.1:{}", n.port).parse().expect("listen addr")
}

/// Reads the region and checks it against what may be there; returns the
/// ids found (the next round's base).
async fn verify(client: &NbdClient, allowed: &[HashSet<u64>], round: u32, seed: u64) -> Vec<u64> {
    const CHUNK_BLOCKS: usize = 256;
    let mut found = Vec::with_capacity(REGION_BLOCKS);
    for first in (0..REGION_BLOCKS).step_by(CHUNK_BLOCKS) {
        let data =
            client.read((first * BLOCK) as u64, (CHUNK_BLOCKS * BLOCK) as u32).await.expect("read after restart");
        for (i, buf) in data.chunks(BLOCK).enumerate() {
            let b = first + i;
            let id = identify(buf, b).unwrap_or_else(|| {
                panic!(
                    "seed {seed} round {round}: block {b} holds bytes that are no write's content (torn or misplaced)"
                )
            });
            assert!(
                allowed[b].contains(&id),
                "seed {seed} round {round}: block {b} holds write {id:#x}, expected one of {:x?} (a durable write was lost)",
                allowed[b]
            );
            found.push(id);
        }
    }
    found
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

fn kill_during_writes(engine: &str) {
    let seed: u64 =
        std::env::var("REPBLOCK_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| rand::rng().random());
    eprintln!("crash test ({engine}): seed {seed} (REPBLOCK_CRASH_SEED={seed} replays it)");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let mut n = TestNode::new(engine);
    n.create_md();
    let rng = Arc::new(Mutex::new(StdRng::seed_from_u64(seed)));
    let mut allowed: Vec<HashSet<u64>> = vec![HashSet::from([0]); REGION_BLOCKS];
    let mut total_writes = 0usize;
    let mut total_constrained = 0usize;
    for round in 0..=ROUNDS {
        n.start();
        if round == 0 {
            n.promote_force();
        } else {
            n.promote();
        }
        let last = round == ROUNDS;
        let writes = rt.block_on(async {
            let client = NbdClient::connect(&addr(&n), "r0").await.expect("connect");
            let base = verify(&client, &allowed, round, seed).await;
            if last {
                return (0, 0);
            }
            let history = Arc::new(Mutex::new(History::default()));
            let busy = Arc::new(Mutex::new(HashSet::new()));
            let clock = Arc::new(AtomicU64::new(1));
            let next_id = Arc::new(AtomicU64::new((u64::from(round) + 1) << 32));
            let stop = Arc::new(AtomicBool::new(false));
            let tasks: Vec<_> = (0..QUEUE_DEPTH)
                .map(|_| {
                    tokio::spawn(writer(
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
            let delay = rng.lock().expect("rng").random_range(100..900);
            tokio::time::sleep(Duration::from_millis(delay)).await;
            n.kill9();
            stop.store(true, Ordering::Relaxed);
            for t in tasks {
                tokio::time::timeout(Duration::from_secs(30), t)
                    .await
                    .expect("writer ends once repd is gone")
                    .expect("writer task");
            }
            let h = std::mem::take(&mut *history.lock().expect("history"));
            let writes = h.writes.len();
            allowed = acceptable(&base, &h);
            // Blocks whose pre-round content is no longer acceptable: a
            // durable write must be found there after the restart.
            let constrained = allowed.iter().zip(&base).filter(|(a, b)| !a.contains(b)).count();
            (writes, constrained)
        });
        total_writes += writes.0;
        total_constrained += writes.1;
        if last {
            n.kill9();
        }
    }
    eprintln!(
        "crash test ({engine}): {ROUNDS} kills, {total_writes} writes, {total_constrained} blocks that had to hold a durable write, seed {seed}"
    );
    assert!(total_constrained > 0, "no round made a write durable: the test checked nothing");
}

/// REPBLOCK_FAULTS makes fdatasync fail after N calls: a FLUSH then fails
/// with an NBD error, later writes fail too, status names the failure, and
/// repd keeps answering.
fn sync_error_is_fail_stop(engine: &str) {
    let mut opts = NodeOpts::new(engine);
    opts.env.push(("REPBLOCK_FAULTS".into(), "sync_error_after=40:EIO".into()));
    let n = TestNode::ready_with(opts);
    // Watch the event stream: the failure must be announced.
    let (tx, events) = std::sync::mpsc::channel::<serde_json::Value>();
    let events_client =
        repblock::control::ControlClient::connect(&n.control(), "alpha", Duration::from_secs(10)).expect("events");
    std::thread::spawn(move || {
        // Ends when repd goes away (the test's TestNode kills it on drop).
        let _ = events_client.events(|v| tx.send(v.clone()).is_ok());
    });
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        let client = NbdClient::connect(&addr(&n), "r0").await.expect("connect");
        let mut failed_at = None;
        for i in 0..500u64 {
            let block = (i % 256) as usize;
            client
                .write((block * BLOCK) as u64, &content(i + 1, block), false)
                .await
                .expect("write before the failure");
            if let Err(e) = client.flush().await {
                assert!(matches!(e, ClientError::Nbd { .. }), "a failed flush is an NBD error reply, got {e}");
                failed_at = Some(i);
                break;
            }
        }
        let i = failed_at.expect("an fdatasync failed within 500 flushes");
        eprintln!("flush #{i} failed as injected");
        // Fail-stop: later writes and flushes fail, the connection stays up.
        let e = client.write(0, &content(99_999, 0), false).await.expect_err("writes fail after a failed fdatasync");
        assert!(matches!(e, ClientError::Nbd { errno: 5 }), "EIO expected, got {e}");
        let e = client.flush().await.expect_err("flushes fail after a failed fdatasync");
        assert!(matches!(e, ClientError::Nbd { .. }), "{e}");
        // Reads still answer.
        client.read(0, BLOCK as u32).await.expect("reads go on");
    });
    let s = n.status();
    let reason = s["failed"].as_str().unwrap_or_else(|| panic!("status shows the failure: {s}"));
    assert!(!reason.is_empty());
    let failed_event = loop {
        let ev = events.recv_timeout(Duration::from_secs(10)).expect("a `failed` event within 10 s");
        if ev["event"] == "failed" {
            break ev;
        }
    };
    assert_eq!(failed_event["reason"], reason, "{failed_event}");
    let human = n.repctl_ok(&["status"]);
    assert!(human.contains("FAILED:"), "{human}");
    let out = n.repctl(&["demote"]);
    // Demote still works (the export goes down); its final flush reports the failure.
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(n.status()["role"], "secondary");
    let out = n.repctl(&["promote"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("stopped taking writes"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(n.log().contains("stopped taking writes") || n.log().contains("fdatasync"), "{}", n.log());
}

both_engines! {
    sigkill_during_writes_loses_no_durable_write => kill_during_writes;
    fdatasync_error_stops_writes => sync_error_is_fail_stop;
}

#[test]
fn acceptable_sets_follow_the_flush_rule() {
    let base = vec![0u64; 3];
    let h = History {
        writes: vec![
            // block 0: w1 completed at 2, flush issued at 3 → durable; w2 after.
            WriteRec { block: 0, id: 1, fua: false, issued: 1, completed: Some(2) },
            WriteRec { block: 0, id: 2, fua: false, issued: 5, completed: Some(6) },
            // block 1: FUA write durable on completion; nothing after it.
            WriteRec { block: 1, id: 3, fua: true, issued: 7, completed: Some(8) },
            // block 2: completed after the last flush was issued: not durable.
            WriteRec { block: 2, id: 4, fua: false, issued: 9, completed: Some(10) },
        ],
        flushes: vec![FlushRec { issued: 3, completed: Some(4) }, FlushRec { issued: 11, completed: None }],
    };
    let a = acceptable(&base, &h);
    assert_eq!(a[0], HashSet::from([1, 2]));
    assert_eq!(a[1], HashSet::from([3]));
    assert_eq!(a[2], HashSet::from([0, 4]));
    assert_eq!(identify(&content(7, 3), 3), Some(7));
    assert_eq!(identify(&content(7, 3), 4), None, "a block at the wrong place is detected");
    assert_eq!(identify(&[0u8; BLOCK], 3), Some(0));
}
