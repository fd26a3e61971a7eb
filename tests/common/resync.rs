//! Helpers of the resync tests (issue 4): scattered writes with a record of
//! what changed, the data files of both nodes compared after a clean stop,
//! a status poller that records every state a node went through, an event
//! collector, and the accessors of the status fields the tests read.
//!
//! The resync contract these helpers read (status `--json`):
//!
//! ```text
//! out_of_sync_bytes          u64
//! resync { done_bytes, total_bytes, speed_bytes_per_sec, eta_seconds, kind }   kind: log | bitmap | full
//! last_sync { kind, bytes, seconds }                                             the last finished sync
//! decision { result, rule, explanation }                                         the last connect's decision
//! split_brain                bool
//! ```

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use repblock::control::{ControlClient, Request};
use repblock::nbd::NbdClient;
use serde_json::Value;

use super::pair::{Pair, Peer};

/// The bitmap granularity the tests assume (the default, 4 KiB).
pub const GRAIN: u64 = 4096;

/// A status field as u64 (0 when absent or null), for byte counters.
pub fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// Lowercased JSON text of a value, to look for words in fields whose exact
/// shape (string or object) the contract leaves open.
pub fn text(v: &Value) -> String {
    v.to_string().to_lowercase()
}

/// A seed from `REPBLOCK_RESYNC_SEED` or a random one, printed so that a
/// failing run can be replayed.
pub fn seed(test: &str) -> u64 {
    let seed =
        std::env::var("REPBLOCK_RESYNC_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| rand::rng().random());
    eprintln!("{test}: seed {seed} (REPBLOCK_RESYNC_SEED={seed} replays it)");
    seed
}

/// Writes made by [`scattered_writes`]: every `(offset, len)` and the
/// 4 KiB blocks they touched.
#[derive(Debug, Default, Clone)]
pub struct Extents {
    pub writes: Vec<(u64, u64)>,
    pub blocks: BTreeSet<u64>,
}

impl Extents {
    /// Bytes written (overlaps counted twice).
    pub fn written(&self) -> u64 {
        self.writes.iter().map(|(_, l)| l).sum()
    }

    /// Bytes of distinct blocks touched: what a bitmap resync must move.
    pub fn changed(&self) -> u64 {
        self.blocks.len() as u64 * GRAIN
    }

    pub fn union(&self, other: &Extents) -> Extents {
        let mut writes = self.writes.clone();
        writes.extend_from_slice(&other.writes);
        Extents { writes, blocks: self.blocks.union(&other.blocks).copied().collect() }
    }
}

/// Where [`scattered_writes`] writes: pieces of 4..=64 KiB (4 KiB aligned)
/// at random 4 KiB-aligned offsets within `[lo, hi)`, `total` bytes.
pub fn plan_extents(lo: u64, hi: u64, total: u64, seed: u64) -> Extents {
    assert!(hi - lo >= 64 * 1024 && lo.is_multiple_of(GRAIN) && hi.is_multiple_of(GRAIN), "bad range {lo}..{hi}");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut ext = Extents::default();
    let mut done = 0;
    while done < total {
        let len = (rng.random_range(1..=16u64) * GRAIN).min(total - done).max(GRAIN);
        let off = lo + rng.random_range(0..(hi - lo - len) / GRAIN + 1) * GRAIN;
        ext.writes.push((off, len));
        ext.blocks.extend((off / GRAIN)..(off + len) / GRAIN);
        done += len;
    }
    ext
}

/// Writes random content (from `seed`; never all zeroes) at every extent
/// of [`plan_extents`]`(lo, hi, total, seed)`, 16 in flight, then a FLUSH.
pub async fn scattered_writes(client: &NbdClient, lo: u64, hi: u64, total: u64, seed: u64) -> Extents {
    let ext = plan_extents(lo, hi, total, seed);
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5ca7_7e4e_d000_0000);
    let mut window = std::collections::VecDeque::new();
    for &(off, len) in &ext.writes {
        let mut data = vec![0u8; len as usize];
        rng.fill_bytes(&mut data);
        data[0] |= 1;
        let c = client.clone();
        window.push_back(tokio::spawn(async move {
            c.write(off, &data, false).await.unwrap_or_else(|e| panic!("write of {} bytes at {off}: {e}", data.len()))
        }));
        if window.len() >= 16 {
            window.pop_front().expect("non-empty").await.expect("write task");
        }
    }
    while let Some(h) = window.pop_front() {
        h.await.expect("write task");
    }
    client.flush().await.expect("flush after the scattered writes");
    ext
}

/// One byte value written over whole extents (`fill`), for tests that must
/// tell whose data a block holds.
pub async fn fill_extents(client: &NbdClient, ext: &Extents, byte: u8) {
    for &(off, len) in &ext.writes {
        client.write(off, &vec![byte; len as usize], false).await.unwrap_or_else(|e| panic!("write at {off}: {e}"));
    }
    client.flush().await.expect("flush");
}

/// The data file of a node (`dir/data`; the tests never set `disk`).
pub fn data_file(p: &Peer) -> PathBuf {
    p.data_dir().join("data")
}

/// CRC32C of every `chunk` bytes of the first `size` bytes of `path` (a
/// short file reads as zeroes past its end, as a sparse tail would).
pub fn file_checksums(path: &Path, size: u64, chunk: usize) -> Vec<u32> {
    let mut f = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut buf = vec![0u8; chunk];
    let mut sums = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let want = chunk.min((size - pos) as usize);
        let mut got = 0;
        while got < want {
            let n = f.read(&mut buf[got..want]).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
            if n == 0 {
                break;
            }
            got += n;
        }
        buf[got..want].fill(0);
        sums.push(crc32c::crc32c(&buf[..want]));
        pos += want as u64;
    }
    sums
}

/// Reads `len` bytes at `off` of a file.
pub fn file_read(path: &Path, off: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, off).unwrap_or_else(|e| panic!("read {len} bytes at {off} of {}: {e}", path.display()));
    buf
}

/// Stops both nodes cleanly (SIGTERM: the volume is checkpointed and every
/// applied write is in the data file) and asserts that the two data files
/// are byte-identical, naming the first differing 4 KiB block.
pub fn stop_and_compare(pair: &mut Pair, what: &str) {
    for p in [&mut pair.alpha, &mut pair.beta] {
        let st = p.term();
        assert!(st.success(), "{what}: repd {} exited with {st} on SIGTERM:\n{}", p.name, p.log());
    }
    assert_same_files(what, &data_file(&pair.alpha), &data_file(&pair.beta), pair.size);
}

/// Panics unless the first `size` bytes of `a` and `b` are equal; the
/// message counts the differing MiB and names the first differing block.
pub fn assert_same_files(what: &str, a: &Path, b: &Path, size: u64) {
    const CHUNK: usize = 1 << 20;
    let sa = file_checksums(a, size, CHUNK);
    let sb = file_checksums(b, size, CHUNK);
    let diff: Vec<usize> = sa.iter().zip(&sb).enumerate().filter(|(_, (x, y))| x != y).map(|(i, _)| i).collect();
    if diff.is_empty() {
        return;
    }
    let first = diff[0] as u64 * CHUNK as u64;
    let len = CHUNK.min((size - first) as usize);
    let (da, db) = (file_read(a, first, len), file_read(b, first, len));
    let block = da.chunks(GRAIN as usize).zip(db.chunks(GRAIN as usize)).position(|(x, y)| x != y).unwrap_or(0);
    panic!(
        "{what}: the data files differ in {} of {} MiB; first differing 4 KiB block at byte offset {} \
         ({} vs {})",
        diff.len(),
        sa.len(),
        first + block as u64 * GRAIN,
        a.display(),
        b.display()
    );
}

/// A thread polling a node's status every 20 ms and recording each answer
/// (a node being down or restarting is skipped), until [`StatusLog::stop`].
pub struct StatusLog {
    samples: Arc<Mutex<Vec<(Instant, Value)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StatusLog {
    pub fn start(p: &Peer) -> StatusLog {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (path, name) = (p.control(), p.name);
        let thread = {
            let samples = Arc::clone(&samples);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut client: Option<ControlClient> = None;
                while !stop.load(Ordering::Relaxed) {
                    if client.is_none() {
                        client = ControlClient::connect(&path, name, Duration::from_secs(2)).ok();
                    }
                    if let Some(c) = client.as_mut() {
                        match c.request(&Request::Status) {
                            Ok(v) => samples.lock().expect("samples").push((Instant::now(), v)),
                            Err(_) => client = None,
                        }
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        };
        StatusLog { samples, stop, thread: Some(thread) }
    }

    /// Stops polling and returns every sample.
    pub fn stop(mut self) -> Vec<Value> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("status poller");
        }
        std::mem::take(&mut *self.samples.lock().expect("samples")).into_iter().map(|(_, v)| v).collect()
    }
}

impl Drop for StatusLog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The events of a node (`{"cmd":"events"}`), collected by a thread until
/// repd stops.
pub struct EventLog {
    events: Arc<Mutex<Vec<Value>>>,
    node: &'static str,
}

impl EventLog {
    /// Subscribes now; the first event is the `state` snapshot.
    pub fn start(p: &Peer) -> EventLog {
        let events = Arc::new(Mutex::new(Vec::new()));
        let client = ControlClient::connect(&p.control(), p.name, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("events of {}: {e}", p.name));
        {
            let events = Arc::clone(&events);
            std::thread::spawn(move || {
                let _ = client.events(|v| {
                    events.lock().expect("events").push(v.clone());
                    true
                });
            });
        }
        let log = EventLog { events, node: p.name };
        log.wait_for("state", Duration::from_secs(10), |_| true);
        log
    }

    pub fn all(&self) -> Vec<Value> {
        self.events.lock().expect("events").clone()
    }

    /// Events named `name` so far.
    pub fn named(&self, name: &str) -> Vec<Value> {
        self.all().into_iter().filter(|e| e["event"] == name).collect()
    }

    /// Waits for an event named `name` that satisfies `pred`.
    pub fn wait_for(&self, name: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.named(name).into_iter().find(|e| pred(e)) {
                return e;
            }
            assert!(
                Instant::now() < deadline,
                "{}: no `{name}` event (matching the test's condition) within {timeout:?}; events so far:\n{}",
                self.node,
                self.dump()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    pub fn dump(&self) -> String {
        self.all().iter().map(|e| format!("{e}\n")).collect()
    }
}

/// `repctl verify --wait --json` on `p`; asserts the verify completed and
/// found nothing out of sync (the copies are identical, checked online).
pub fn assert_verify_clean(p: &Peer, what: &str) {
    let out = p.repctl_ok(&["verify", "--wait", "--json"]);
    let v: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("verify --json printed {out:?}: {e}"));
    assert_eq!(v["complete"], true, "{what}: the verify on {} did not complete: {v}", p.name);
    assert_eq!(u(&v["out_of_sync_bytes"]), 0, "{what}: online verify on {} found differences: {v}", p.name);
}
