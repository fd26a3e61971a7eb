//! The load generator: runs one [`Workload`] against an NBD export (through
//! the project's pipelined [`NbdClient`]) or against a local file (pwrite /
//! pread / fdatasync, the physical floor), and records every operation's
//! latency in nanoseconds in an HDR histogram.
//!
//! Timing of one run:
//!
//! ```text
//!   start ── warm-up ──> measure_from ───── measured window ─────> measure_until
//! ```
//!
//! - Operations are issued from the start; those *started* before
//!   `measure_from` are not recorded (warm-up).
//! - The latency of an operation is recorded when it started at or after
//!   `measure_from` and completed by `measure_until`.
//! - Throughput counts operations *completed* inside the window, divided by
//!   the window's length.
//! - With an operation count instead of a duration, the window ends when
//!   that many operations were recorded.
//!
//! Every worker (one per request in flight) draws its offsets from its own
//! RNG seeded with `seed + worker index`, so a run is reproducible; the
//! sequential pattern shares one cursor. Any IO error fails the run.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use repblock::nbd::{ClientError, ListenAddr, NbdClient};

use crate::workload::{FlushMode, Pattern, Workload};

/// Highest latency the histograms hold (longer ones are clamped to it).
pub const MAX_LATENCY_NS: u64 = 120_000_000_000;

/// Errors of a load-generator run.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("Connecting to NBD export {export:?} at {addr}")]
    Connect {
        addr: String,
        export: String,
        #[source]
        source: ClientError,
    },
    #[error("NBD {op} of {len} bytes at offset {offset} failed")]
    Nbd {
        op: &'static str,
        offset: u64,
        len: u32,
        #[source]
        source: ClientError,
    },
    #[error("{op} of {len} bytes at offset {offset} of {path} failed")]
    File {
        op: &'static str,
        path: PathBuf,
        offset: u64,
        len: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("Opening {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "The region ({region} bytes) must hold at least one {block_size}-byte block and fit the export ({size} bytes)"
    )]
    Region { region: u64, block_size: u32, size: u64 },
    #[error("Workload {0:?}: queue depth and connections must be at least 1")]
    Depth(String),
    #[error("A load worker failed: {0}")]
    Worker(String),
}

/// How long (or how many operations) to run, and where.
#[derive(Debug, Clone)]
pub struct Plan {
    pub warmup: Duration,
    /// The measured window (ignored when `ops` is set).
    pub duration: Duration,
    /// Measure this many operations instead of a duration.
    pub ops: Option<u64>,
    /// Offsets fall in `[0, region)`.
    pub region: u64,
    pub seed: u64,
}

/// What one run measured.
#[derive(Debug, Clone)]
pub struct Measurement {
    /// Latency of each recorded operation, in nanoseconds.
    pub hist: Histogram<u64>,
    /// Operations completed inside the window.
    pub ops: u64,
    /// Bytes read and written by those operations.
    pub bytes: u64,
    /// Length of the measured window.
    pub window: Duration,
}

impl Measurement {
    pub fn iops(&self) -> f64 {
        self.ops as f64 / self.window.as_secs_f64().max(1e-9)
    }

    /// Megabytes (10^6 bytes) per second.
    pub fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.window.as_secs_f64().max(1e-9)
    }
}

/// An empty latency histogram (1 ns to [`MAX_LATENCY_NS`], 3 significant
/// digits).
pub fn new_histogram() -> Histogram<u64> {
    // Constant bounds that hdrhistogram accepts (low >= 1, high >= 2 * low,
    // sigfig <= 5): this cannot fail at run time.
    Histogram::new_with_bounds(1, MAX_LATENCY_NS, 3).expect("constant histogram bounds are valid")
}

/// The shared clock of a run.
struct Window {
    start: Instant,
    from: Instant,
    until: Instant,
    /// With an operation count: operations recorded so far.
    recorded: AtomicU64,
    target_ops: Option<u64>,
    /// Completion time of the last recorded operation (ns after `start`),
    /// which ends the window of an operation-count run.
    last_ns: AtomicU64,
    cursor: AtomicU64,
}

impl Window {
    fn new(plan: &Plan) -> Window {
        let start = Instant::now();
        let from = start + plan.warmup;
        let until = if plan.ops.is_some() { start + Duration::from_secs(365 * 86400) } else { from + plan.duration };
        Window {
            start,
            from,
            until,
            recorded: AtomicU64::new(0),
            target_ops: plan.ops,
            last_ns: AtomicU64::new(0),
            cursor: AtomicU64::new(0),
        }
    }

    /// Whether a worker should issue another operation.
    fn open(&self, now: Instant) -> bool {
        if now >= self.until {
            return false;
        }
        match self.target_ops {
            Some(n) => self.recorded.load(Ordering::Relaxed) < n,
            None => true,
        }
    }

    fn window(&self) -> Duration {
        match self.target_ops {
            Some(_) => {
                let last = self.start + Duration::from_nanos(self.last_ns.load(Ordering::Relaxed));
                last.saturating_duration_since(self.from)
            }
            None => self.until - self.from,
        }
    }
}

/// One worker's part of the measurement.
struct Recorder {
    hist: Histogram<u64>,
    ops: u64,
    bytes: u64,
}

impl Recorder {
    fn new() -> Recorder {
        Recorder { hist: new_histogram(), ops: 0, bytes: 0 }
    }

    fn done(&mut self, w: &Window, t0: Instant, t1: Instant, bytes: u64) {
        if t1 < w.from || t1 > w.until {
            return;
        }
        if let Some(n) = w.target_ops {
            if t0 < w.from || w.recorded.fetch_add(1, Ordering::Relaxed) >= n {
                return;
            }
            let ns = u64::try_from(t1.duration_since(w.start).as_nanos()).unwrap_or(u64::MAX);
            w.last_ns.fetch_max(ns, Ordering::Relaxed);
        }
        self.ops += 1;
        self.bytes += bytes;
        if t0 >= w.from {
            let ns = u64::try_from(t1.duration_since(t0).as_nanos()).unwrap_or(u64::MAX);
            self.hist.saturating_record(ns.clamp(1, MAX_LATENCY_NS));
        }
    }
}

/// What a worker does next.
#[derive(Debug, Clone, Copy)]
enum Op {
    Read(u64),
    Write(u64),
}

/// Chooses operations and offsets for one worker.
struct Chooser {
    rng: StdRng,
    blocks: u64,
    block_size: u64,
    read_percent: u8,
    pattern: Pattern,
}

impl Chooser {
    fn new(wl: &Workload, plan: &Plan, worker: u64) -> Chooser {
        let block_size = u64::from(wl.block_size);
        Chooser {
            rng: StdRng::seed_from_u64(plan.seed.wrapping_add(worker)),
            blocks: plan.region / block_size,
            block_size,
            read_percent: wl.read_percent,
            pattern: wl.pattern,
        }
    }

    fn next(&mut self, w: &Window) -> Op {
        let block = match self.pattern {
            Pattern::Random => self.rng.random_range(0..self.blocks),
            Pattern::Sequential => w.cursor.fetch_add(1, Ordering::Relaxed) % self.blocks,
        };
        let offset = block * self.block_size;
        let read =
            self.read_percent >= 100 || (self.read_percent > 0 && self.rng.random_range(0..100u8) < self.read_percent);
        if read { Op::Read(offset) } else { Op::Write(offset) }
    }
}

fn check(wl: &Workload, plan: &Plan, size: u64) -> Result<(), LoadError> {
    if wl.queue_depth == 0 || wl.connections == 0 {
        return Err(LoadError::Depth(wl.name.clone()));
    }
    if plan.region < u64::from(wl.block_size) || plan.region > size {
        return Err(LoadError::Region { region: plan.region, block_size: wl.block_size, size });
    }
    Ok(())
}

/// A block of incompressible data for one worker's writes.
fn payload(len: u32, seed: u64) -> Bytes {
    let mut b = vec![0u8; len as usize];
    StdRng::seed_from_u64(seed ^ 0x5eed_da7a).fill_bytes(&mut b);
    Bytes::from(b)
}

/// Runs `wl` against the NBD export `export` at `addr`: `connections`
/// clients, `queue_depth` tasks on each, every task one request in flight.
pub async fn run_nbd(addr: &ListenAddr, export: &str, wl: &Workload, plan: &Plan) -> Result<Measurement, LoadError> {
    let mut clients = Vec::with_capacity(wl.connections);
    for _ in 0..wl.connections.max(1) {
        let c = NbdClient::connect(addr, export).await.map_err(|source| LoadError::Connect {
            addr: addr.to_string(),
            export: export.to_string(),
            source,
        })?;
        clients.push(c);
    }
    check(wl, plan, clients.first().map(NbdClient::size).unwrap_or(0))?;
    let window = Arc::new(Window::new(plan));
    let mut tasks = tokio::task::JoinSet::new();
    for (ci, client) in clients.iter().enumerate() {
        for q in 0..wl.queue_depth {
            let worker = (ci * wl.queue_depth + q) as u64;
            let (client, window, wl) = (client.clone(), window.clone(), wl.clone());
            let mut chooser = Chooser::new(&wl, plan, worker);
            let data = payload(wl.block_size, plan.seed.wrapping_add(worker));
            tasks.spawn(async move {
                let mut rec = Recorder::new();
                let len = wl.block_size;
                while window.open(Instant::now()) {
                    let op = chooser.next(&window);
                    let t0 = Instant::now();
                    match op {
                        Op::Read(offset) => {
                            client.read(offset, len).await.map_err(|source| LoadError::Nbd {
                                op: "READ",
                                offset,
                                len,
                                source,
                            })?;
                        }
                        Op::Write(offset) => {
                            let fua = wl.flush == FlushMode::Fua;
                            client.write_bytes(offset, data.clone(), fua).await.map_err(|source| LoadError::Nbd {
                                op: "WRITE",
                                offset,
                                len,
                                source,
                            })?;
                            if wl.flush == FlushMode::AfterEachWrite {
                                client.flush().await.map_err(|source| LoadError::Nbd {
                                    op: "FLUSH",
                                    offset: 0,
                                    len: 0,
                                    source,
                                })?;
                            }
                        }
                    }
                    rec.done(&window, t0, Instant::now(), u64::from(len));
                }
                Ok::<Recorder, LoadError>(rec)
            });
        }
    }
    let mut recs = Vec::new();
    let mut first_err = None;
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok(rec)) => recs.push(rec),
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
                tasks.abort_all();
            }
            Err(e) if e.is_cancelled() => {}
            Err(e) => {
                first_err.get_or_insert(LoadError::Worker(e.to_string()));
                tasks.abort_all();
            }
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    for c in clients {
        // A polite NBD_CMD_DISC; the measurement is complete either way.
        let _ = c.disconnect().await;
    }
    Ok(merge(recs, &window))
}

/// Runs `wl` against the local file `path` (at least `plan.region` bytes):
/// one thread per request in flight, `pwrite` / `pread`, `fdatasync` for the
/// flush. Blocking: call it from a thread that may block.
pub fn run_file(path: &std::path::Path, wl: &Workload, plan: &Plan) -> Result<Measurement, LoadError> {
    let file = File::options()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|source| LoadError::Open { path: path.to_path_buf(), source })?;
    let size = file.metadata().map_err(|source| LoadError::Open { path: path.to_path_buf(), source })?.len();
    check(wl, plan, size)?;
    let file = Arc::new(file);
    let window = Arc::new(Window::new(plan));
    let workers = wl.total_depth();
    let results: Vec<Result<Recorder, LoadError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|worker| {
                let (file, window) = (file.clone(), window.clone());
                let mut chooser = Chooser::new(wl, plan, worker as u64);
                let data = payload(wl.block_size, plan.seed.wrapping_add(worker as u64));
                s.spawn(move || {
                    let mut rec = Recorder::new();
                    let mut buf = vec![0u8; wl.block_size as usize];
                    let len = wl.block_size;
                    let fail =
                        |op, offset, source| LoadError::File { op, path: path.to_path_buf(), offset, len, source };
                    while window.open(Instant::now()) {
                        let op = chooser.next(&window);
                        let t0 = Instant::now();
                        match op {
                            Op::Read(offset) => {
                                file.read_exact_at(&mut buf, offset).map_err(|e| fail("pread", offset, e))?;
                            }
                            Op::Write(offset) => {
                                file.write_all_at(&data, offset).map_err(|e| fail("pwrite", offset, e))?;
                                if wl.flush.durable() {
                                    file.sync_data().map_err(|e| fail("fdatasync", 0, e))?;
                                }
                            }
                        }
                        rec.done(&window, t0, Instant::now(), u64::from(len));
                    }
                    Ok(rec)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(LoadError::Worker("a file worker panicked".into()))))
            .collect()
    });
    let recs = results.into_iter().collect::<Result<Vec<_>, _>>()?;
    Ok(merge(recs, &window))
}

fn merge(recs: Vec<Recorder>, window: &Window) -> Measurement {
    let mut m = Measurement { hist: new_histogram(), ops: 0, bytes: 0, window: window.window() };
    for r in recs {
        // Same bounds everywhere: `add` cannot fail.
        let _ = m.hist.add(&r.hist);
        m.ops += r.ops;
        m.bytes += r.bytes;
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::builtin;

    fn plan(ops: Option<u64>) -> Plan {
        Plan { warmup: Duration::from_millis(20), duration: Duration::from_millis(150), ops, region: 1 << 20, seed: 7 }
    }

    #[test]
    fn file_run_records_every_measured_op_and_writes_inside_the_region() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        std::fs::write(&path, vec![0u8; 2 << 20]).expect("file");
        let wl = builtin("qd32-randwrite").expect("wl");
        let m = run_file(&path, &wl, &plan(Some(500))).expect("run");
        assert_eq!(m.ops, 500);
        assert_eq!(m.hist.len(), 500, "every counted op started after the warm-up");
        assert_eq!(m.bytes, 500 * 4096);
        assert!(m.window > Duration::ZERO);
        // Nothing was written beyond the 1 MiB region.
        let data = std::fs::read(&path).expect("read back");
        assert!(data[1 << 20..].iter().all(|&b| b == 0), "write outside the region");
        assert!(data[..1 << 20].iter().any(|&b| b != 0), "no write at all");
    }

    #[test]
    fn file_run_by_duration_has_the_window_length() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        std::fs::write(&path, vec![0u8; 1 << 20]).expect("file");
        let wl = builtin("mixed-70-30").expect("wl");
        let m = run_file(&path, &wl, &plan(None)).expect("run");
        assert_eq!(m.window, Duration::from_millis(150));
        assert!(m.ops > 0 && m.hist.len() <= m.ops + 16);
    }

    #[test]
    fn a_region_larger_than_the_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        std::fs::write(&path, vec![0u8; 4096]).expect("file");
        let wl = builtin("qd1-write").expect("wl");
        let e = run_file(&path, &wl, &plan(Some(1))).expect_err("too small");
        assert!(matches!(e, LoadError::Region { .. }), "{e}");
    }

    #[test]
    fn offsets_are_aligned_seeded_and_sequential_wraps() {
        let w = Window::new(&plan(None));
        let wl = builtin("qd1-write").expect("wl");
        let a: Vec<_> = (0..50).map(|_| ()).scan(Chooser::new(&wl, &plan(None), 3), |c, _| Some(c.next(&w))).collect();
        let b: Vec<_> = (0..50).map(|_| ()).scan(Chooser::new(&wl, &plan(None), 3), |c, _| Some(c.next(&w))).collect();
        assert_eq!(format!("{a:?}"), format!("{b:?}"), "same seed, same offsets");
        for op in a {
            let Op::Write(off) = op else { panic!("qd1-write reads") };
            assert!(off % 4096 == 0 && off < 1 << 20);
        }
        let seq = builtin("seq1m-write").expect("wl");
        let mut c = Chooser::new(&seq, &plan(None), 0);
        let offs: Vec<_> = (0..3).map(|_| c.next(&w)).map(|o| format!("{o:?}")).collect();
        assert_eq!(offs, ["Write(0)", "Write(0)", "Write(0)"], "a 1 MiB region holds one 1 MiB block");
    }
}
