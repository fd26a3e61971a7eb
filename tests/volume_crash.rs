//! Crash test at the volume level: a child process writes through the
//! volume (small and large writes, FUA, flushes) and reports each
//! completion on stdout; the parent SIGKILLs it at a random moment (mid
//! batch, mid rollover, mid checkpoint...), reopens the volume and checks
//! that every write completed before a completed flush, or with FUA, reads
//! back (a later write to the same block may appear instead).
//!
//! The child is this test binary run again with `REPBLOCK_CRASH_CHILD` set
//! (only `crash_child` acts on it). Its writes come from a seeded RNG, so
//! the parent knows every write the child would issue, in flight or not.
//!
//! `REPBLOCK_CRASH_ROUNDS` sets the number of kills (default 16).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use repblock::io::IoEngine;
use repblock::io::sync::SyncEngine;
use repblock::volume::{CreateOptions, Identity, Volume, VolumeOptions, create_md};

const BS: usize = 4096;
const BLOCKS: u64 = 512;
const BIG: u64 = 64; // blocks of a large (in-place eligible) write
const SIZE: u64 = BLOCKS * BS as u64;
const CHILD_ENV: &str = "REPBLOCK_CRASH_CHILD";

fn opts(dir: &Path) -> VolumeOptions {
    let mut o = VolumeOptions::new(dir);
    o.wal_segment_size = 256 << 10;
    o.checkpoint_bytes = 1 << 20;
    o.checkpoint_interval = Duration::from_millis(100);
    o
}

fn identity() -> Identity {
    Identity { resource: "r0".into(), node: "alpha".into(), size: SIZE }
}

/// The i-th operation of a child seeded with `seed`: (first block, blocks,
/// fua, flush after).
fn op(rng: &mut StdRng) -> (u64, u64, bool, bool) {
    let big = rng.random_range(0..6) == 0;
    let n = if big { BIG } else { 1 };
    let block = rng.random_range(0..=BLOCKS - n);
    (block, n, rng.random_range(0..5) == 0, rng.random_range(0..8) == 0)
}

/// Block `k` of write `i` of child `seed`.
fn block_content(seed: u64, i: u64, k: u64) -> [u8; BS] {
    let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(0x9e37_79b9).wrapping_add(i << 8).wrapping_add(k));
    let mut v = [0u8; BS];
    rng.fill(&mut v[..]);
    v
}

fn content(seed: u64, i: u64, blocks: u64) -> Bytes {
    let mut v = Vec::with_capacity(blocks as usize * BS);
    for k in 0..blocks {
        v.extend_from_slice(&block_content(seed, i, k));
    }
    Bytes::from(v)
}

/// Child: write forever, reporting "W i" when write i completed and "F i"
/// when a flush issued after write i completed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else { return };
    let (dir, seed) = spec.split_once(':').expect("dir:seed");
    let seed: u64 = seed.parse().expect("seed");
    let io: Arc<dyn IoEngine> = Arc::new(SyncEngine::new());
    let v = Volume::open(io, opts(Path::new(dir)), &identity()).expect("child open");
    let mut rng = StdRng::seed_from_u64(seed);
    for i in 0.. {
        let (block, n, fua, flush) = op(&mut rng);
        v.write(block * BS as u64, content(seed, i, n), fua).await.expect("write");
        println!("W {i}");
        if flush {
            v.flush().await.expect("flush");
            println!("F {i}");
        }
    }
}

/// A write of a child: (seed, index, first block, blocks).
type WriteId = (u64, u64, u64, u64);

/// Block `b` as written by `w`.
fn slice_of(w: WriteId, b: u64) -> [u8; BS] {
    let (seed, i, first, _) = w;
    block_content(seed, i, b - first)
}

#[test]
fn sigkill_at_random_moments_loses_no_durable_write() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let rounds: u64 = std::env::var("REPBLOCK_CRASH_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(16);
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("node");
    let o = opts(&dir);
    let io = SyncEngine::new();
    create_md(
        &io,
        &o,
        &CreateOptions { resource: "r0".into(), node: "alpha".into(), size: SIZE, block_size: 4096, force: false },
    )
    .unwrap();
    let exe = std::env::current_exe().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    // The last durable write of every block, carried across rounds (None:
    // never written, zeroes).
    let mut expected: Vec<Option<WriteId>> = vec![None; BLOCKS as usize];
    let mut total_completed = 0;
    for round in 0..rounds {
        let seed = 1000 + round;
        let spawned = Instant::now();
        let mut child = Command::new(&exe)
            .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, format!("{}:{seed}", dir.display()))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let kill_after = Duration::from_millis(StdRng::seed_from_u64(seed).random_range(50..600));
        let deadline = Instant::now() + kill_after;
        let pid = child.id() as libc::pid_t;
        let killer = std::thread::spawn(move || {
            let now = Instant::now();
            if deadline > now {
                std::thread::sleep(deadline - now);
            }
            // SAFETY: plain kill(2) of our own child, which has not been
            // reaped yet (the parent waits for it after this thread ends).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        });
        let mut completed: Option<u64> = None;
        let mut flushed: Option<u64> = None;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let mut parts = line.split_whitespace();
            match (parts.next(), parts.next().and_then(|x| x.parse::<u64>().ok())) {
                (Some("W"), Some(i)) => completed = Some(i),
                (Some("F"), Some(i)) => flushed = Some(i),
                _ => {}
            }
        }
        killer.join().unwrap();
        let status = child.wait().unwrap();
        assert!(!status.success(), "round {round}: the child should have been killed");
        total_completed += completed.map_or(0, |c| c + 1);

        // Replay the child's sequence: durable = FUA writes completed, and
        // every write at or before the last completed flush.
        let mut rng = StdRng::seed_from_u64(seed);
        let mut may_appear: Vec<Vec<WriteId>> = vec![Vec::new(); BLOCKS as usize];
        let limit = completed.map_or(0, |c| c + 1) + 1; // plus the one in flight
        for i in 0..limit {
            let (block, n, fua, _) = op(&mut rng);
            let done = completed.is_some_and(|c| i <= c);
            let durable = done && (fua || flushed.is_some_and(|f| i <= f));
            for b in block..block + n {
                if durable {
                    expected[b as usize] = Some((seed, i, block, n));
                    may_appear[b as usize].clear();
                } else {
                    may_appear[b as usize].push((seed, i, block, n));
                }
            }
        }

        let got = rt.block_on(async {
            let v = Volume::open(Arc::new(SyncEngine::new()), o.clone(), &identity())
                .unwrap_or_else(|e| panic!("round {round}: reopen after SIGKILL failed: {e}"));
            let data = v.read(0, SIZE as u32).await.unwrap();
            v.close().await.unwrap();
            data
        });
        let mut in_flight_seen = 0;
        for b in 0..BLOCKS {
            let actual = &got[b as usize * BS..(b as usize + 1) * BS];
            let durable_ok = match expected[b as usize] {
                Some(w) => actual == &slice_of(w, b)[..],
                None => actual.iter().all(|&x| x == 0),
            };
            if durable_ok {
                continue;
            }
            // Not the durable content: must be a later write's, which then
            // is the base for the next round (this open closed cleanly).
            let later = may_appear[b as usize].iter().find(|&&w| actual == &slice_of(w, b)[..]);
            match later {
                Some(&w) => {
                    expected[b as usize] = Some(w);
                    in_flight_seen += 1;
                }
                None => panic!("round {round}: block {b} lost a durable write (expected {:?})", expected[b as usize]),
            }
        }
        eprintln!(
            "round {round} ({:?} since spawn): {} writes completed, last flush after {flushed:?}, {in_flight_seen} blocks hold non-durable writes",
            spawned.elapsed(),
            completed.map_or(0, |c| c + 1)
        );
    }
    assert!(total_completed > 50, "the children completed only {total_completed} writes");
}
