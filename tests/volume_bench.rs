//! In-process volume benchmark against a named peer in the same run.
//!
//! Run: `cargo test --release --test volume_bench -- --ignored --nocapture`
//! (`REPBLOCK_BENCH_DIR` picks the directory, default the system temp dir;
//! `REPBLOCK_BENCH_SECS` the seconds per case, default 3;
//! `REPBLOCK_BENCH_ENGINE=sync|io_uring` runs only that engine;
//! `REPBLOCK_BENCH_CASES=QD1,QD32` only the cases whose name contains one of
//! the words).
//!
//! The peer is what `qemu-nbd --cache=none` does for the same workload on a
//! raw file: `O_DIRECT` pwrite (+ `fdatasync` for the durable case) from the
//! same number of threads. Each line prints the volume's rate, the peer's
//! and their ratio.

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use repblock::io::{EngineChoice, IoEngine, select_engine};
use repblock::volume::{CreateOptions, Identity, Volume, VolumeOptions, create_md};

const SIZE: u64 = 1 << 30;

fn secs() -> Duration {
    Duration::from_secs_f64(std::env::var("REPBLOCK_BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(3.0))
}

fn bench_dir() -> tempfile::TempDir {
    match std::env::var("REPBLOCK_BENCH_DIR") {
        Ok(d) => tempfile::tempdir_in(d).expect("bench dir"),
        Err(_) => tempfile::tempdir().expect("temp dir"),
    }
}

#[derive(Clone, Copy)]
enum Case {
    /// 4 KiB random writes, each followed by a flush (fio fsync=1), QD1.
    RandWriteFsyncQd1,
    /// 4 KiB random writes with FUA, QD1.
    RandWriteFuaQd1,
    /// 4 KiB random writes, QD1, no flush (only `activity_log_cost`).
    RandWriteQd1,
    /// 4 KiB random writes, QD32, no flush.
    RandWriteQd32,
    /// 1 MiB sequential writes, QD8, no flush.
    SeqWrite1mQd8,
}

impl Case {
    fn name(self) -> &'static str {
        match self {
            Case::RandWriteFsyncQd1 => "4k randwrite QD1 fsync=1",
            Case::RandWriteFuaQd1 => "4k randwrite QD1 FUA",
            Case::RandWriteQd1 => "4k randwrite QD1",
            Case::RandWriteQd32 => "4k randwrite QD32",
            Case::SeqWrite1mQd8 => "1M seqwrite QD8",
        }
    }
    fn params(self) -> (usize, usize, bool) {
        // (block size, queue depth, durable per write)
        match self {
            Case::RandWriteFsyncQd1 | Case::RandWriteFuaQd1 => (4096, 1, true),
            Case::RandWriteQd1 => (4096, 1, false),
            Case::RandWriteQd32 => (4096, 32, false),
            Case::SeqWrite1mQd8 => (1 << 20, 8, false),
        }
    }
}

/// Returns operations per second.
async fn run_volume(v: Arc<Volume>, case: Case, size: u64) -> f64 {
    let (bs, qd, _) = case.params();
    let deadline = Instant::now() + secs();
    let ops = Arc::new(AtomicU64::new(0));
    let seq_next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..qd {
        let v = v.clone();
        let ops = ops.clone();
        let seq_next = seq_next.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(t as u64);
            let mut buf = vec![0u8; bs];
            rng.fill(&mut buf[..]);
            let data = Bytes::from(buf);
            while Instant::now() < deadline {
                let off = match case {
                    Case::SeqWrite1mQd8 => (seq_next.fetch_add(1, Ordering::Relaxed) * bs as u64) % size,
                    _ => rng.random_range(0..size / bs as u64) * bs as u64,
                };
                match case {
                    Case::RandWriteFsyncQd1 => {
                        v.write(off, data.clone(), false).await.expect("write");
                        v.flush().await.expect("flush");
                    }
                    Case::RandWriteFuaQd1 => {
                        v.write(off, data.clone(), true).await.expect("write");
                    }
                    _ => {
                        v.write(off, data.clone(), false).await.expect("write");
                    }
                }
                ops.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    ops.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// The peer: O_DIRECT pwrite (+ fdatasync) on a raw preallocated file.
fn run_peer(path: &Path, case: Case) -> f64 {
    let (bs, qd, durable) = case.params();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .expect("peer file");
    f.set_len(SIZE).expect("set_len");
    let f = Arc::new(f);
    let deadline = Instant::now() + secs();
    let ops = Arc::new(AtomicU64::new(0));
    let seq_next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let threads: Vec<_> = (0..qd)
        .map(|t| {
            let f = f.clone();
            let ops = ops.clone();
            let seq_next = seq_next.clone();
            std::thread::spawn(move || {
                let mut rng = StdRng::seed_from_u64(t as u64);
                // O_DIRECT needs an aligned buffer.
                let layout = std::alloc::Layout::from_size_align(bs, 4096).expect("layout");
                // SAFETY: layout has a non-zero size; the pointer is freed below
                // with the same layout and only used as a `bs`-byte slice.
                let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
                assert!(!ptr.is_null());
                // SAFETY: `ptr` points at `bs` initialised (zeroed) bytes we own.
                let buf = unsafe { std::slice::from_raw_parts_mut(ptr, bs) };
                rng.fill(&mut buf[..]);
                while Instant::now() < deadline {
                    let off = match case {
                        Case::SeqWrite1mQd8 => (seq_next.fetch_add(1, Ordering::Relaxed) * bs as u64) % SIZE,
                        _ => rng.random_range(0..SIZE / bs as u64) * bs as u64,
                    };
                    f.write_all_at(buf, off).expect("pwrite");
                    if durable {
                        f.sync_data().expect("fdatasync");
                    }
                    ops.fetch_add(1, Ordering::Relaxed);
                }
                // SAFETY: allocated above with this layout, not used after.
                unsafe { std::alloc::dealloc(ptr, layout) };
            })
        })
        .collect();
    for t in threads {
        t.join().expect("peer thread");
    }
    ops.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

async fn bench_engine(choice: EngineChoice) {
    let io: Arc<dyn IoEngine> = match select_engine(choice) {
        Ok(io) => io,
        Err(e) => {
            eprintln!("engine {choice:?} unavailable: {e}");
            return;
        }
    };
    let dir = bench_dir();
    let opts = VolumeOptions::new(dir.path().join("node"));
    create_md(
        &*io,
        &opts,
        &CreateOptions { resource: "bench".into(), node: "a".into(), size: SIZE, block_size: 4096, force: false },
    )
    .expect("create_md");
    let v = Volume::open(io.clone(), opts, &Identity { resource: "bench".into(), node: "a".into(), size: SIZE })
        .expect("open");
    let peer_path = dir.path().join("peer.raw");
    println!("engine {}:", io.kind());
    let only = std::env::var("REPBLOCK_BENCH_CASES").unwrap_or_default();
    for case in [Case::RandWriteFsyncQd1, Case::RandWriteFuaQd1, Case::RandWriteQd32, Case::SeqWrite1mQd8] {
        if !only.is_empty() && !only.split(',').any(|c| case.name().contains(c.trim())) {
            continue;
        }
        let ours = run_volume(v.clone(), case, SIZE).await;
        let peer = tokio::task::spawn_blocking({
            let p = peer_path.clone();
            move || run_peer(&p, case)
        })
        .await
        .expect("peer");
        let (bs, _, _) = case.params();
        let unit = |ops: f64| {
            if bs >= 1 << 20 { format!("{:8.1} MB/s", ops * bs as f64 / 1e6) } else { format!("{ops:8.0} IOPS") }
        };
        println!(
            "  {:26} volume {}   O_DIRECT peer {}   ratio {:.2}",
            case.name(),
            unit(ours),
            unit(peer),
            ours / peer
        );
    }
    let st = v.status();
    println!(
        "  status: lsn {} durable {} checkpoint {} wal_bytes {}",
        st.local_lsn, st.durable_lsn, st.checkpoint_lsn, st.wal_bytes
    );
    v.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "benchmark; run with --ignored --nocapture"]
async fn volume_vs_odirect_peer() {
    let which = std::env::var("REPBLOCK_BENCH_ENGINE").unwrap_or_default();
    if which != "io_uring" {
        bench_engine(EngineChoice::Sync).await;
    }
    if which != "sync" {
        bench_engine(EngineChoice::IoUring).await;
    }
}

/// One volume of `size` bytes, opened on the sync engine in `dir`.
#[cfg(feature = "testkit")]
fn bench_volume(io: &Arc<dyn IoEngine>, dir: &Path, size: u64, al_extents: usize) -> Arc<Volume> {
    let mut opts = VolumeOptions::new(dir.to_path_buf());
    opts.al_extents = al_extents;
    let id = Identity { resource: "bench".into(), node: "a".into(), size };
    create_md(
        &**io,
        &opts,
        &CreateOptions { resource: "bench".into(), node: "a".into(), size, block_size: 4096, force: false },
    )
    .expect("create_md");
    Volume::open(io.clone(), opts, &id).expect("open")
}

/// The activity log's cost on the write path, with and without it, same
/// run: a working set that fits the default `al_extents` (1 GiB = 256
/// extents) and one that does not (8 GiB = 2048 > 1237), the latter also
/// with `al_extents` raised to hold it. Run in a release build:
/// `cargo test --release --features testkit --test volume_bench activity_log_cost -- --ignored --nocapture`.
#[cfg(feature = "testkit")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "benchmark; run with --ignored --nocapture"]
async fn activity_log_cost() {
    use repblock::volume::al::DEFAULT_EXTENTS;
    let io: Arc<dyn IoEngine> = select_engine(EngineChoice::Sync).expect("sync engine");
    let dir = bench_dir();
    println!("activity log cost ({}s per case, engine {}):", secs().as_secs_f64(), io.kind());
    let runs: [(u64, Option<usize>); 5] = [
        (SIZE, Some(DEFAULT_EXTENTS)),
        (SIZE, None),
        (8 * SIZE, Some(DEFAULT_EXTENTS)),
        (8 * SIZE, Some(2100)),
        (8 * SIZE, None),
    ];
    for (size, al) in runs {
        let node = dir.path().join(format!("n{}-{al:?}", size >> 30));
        let v = bench_volume(&io, &node, size, al.unwrap_or(DEFAULT_EXTENTS));
        if al.is_none() {
            v.disable_activity_log_for_bench();
        }
        let mut line =
            format!("  {:>2} GiB  activity log {:>4}:", size >> 30, al.map_or("off".to_string(), |n| n.to_string()));
        for case in [Case::RandWriteQd1, Case::RandWriteFsyncQd1, Case::RandWriteFuaQd1, Case::RandWriteQd32] {
            let before = v.activity_log_writes();
            let rate = run_volume(v.clone(), case, size).await;
            let logged = v.activity_log_writes() - before;
            if case.params().1 == 1 {
                line += &format!("  {}: {:6.1} us ({logged} log writes)", case.name(), 1e6 / rate);
            } else {
                line += &format!("  {}: {:6.0} IOPS ({logged} log writes)", case.name(), rate);
            }
        }
        println!("{line}");
        v.close().await.expect("close");
        std::fs::remove_dir_all(&node).expect("remove the bench volume");
    }
}
