//! Tests shared by every engine, a differential property test (sync vs
//! io_uring), and engine selection.
//!
//! Run with `cargo test --lib io::`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use proptest::prelude::*;

use super::fault::FaultEngine;
use super::sync::SyncEngine;
use super::uring::{self, UringEngine};
use super::*;

// ---------------------------------------------------------------------------
// Engines under test.

fn sync_engine() -> Option<Arc<dyn IoEngine>> {
    Some(Arc::new(SyncEngine::new()))
}

/// The io_uring engine. A failing probe fails the test, unless io_uring was
/// explicitly disabled for the run (then the test says it is skipped).
fn uring_engine() -> Option<Arc<dyn IoEngine>> {
    match uring::probe() {
        Ok(()) => Some(Arc::new(UringEngine::new())),
        Err(e) if std::env::var_os(uring::DISABLE_ENV).is_some_and(|v| !v.is_empty()) => {
            eprintln!("skipped: {e}");
            None
        }
        Err(e) => panic!("io_uring unavailable on this host ({e}); set {} to skip", uring::DISABLE_ENV),
    }
}

/// io_uring with every transfer split into 1000-byte pieces: every
/// completion of a bigger read or write is a short one to resubmit.
fn uring_short_transfers() -> Option<Arc<dyn IoEngine>> {
    uring_engine()?;
    Some(Arc::new(UringEngine::with_max_transfer(1000)))
}

/// The fault engine with no fault armed must be transparent.
fn fault_over_uring() -> Option<Arc<dyn IoEngine>> {
    let inner = uring_engine()?;
    Some(FaultEngine::new(inner, 1))
}

/// Instantiates every shared test for one engine.
macro_rules! engine_suite {
    ($module:ident, $make:path; $($test:ident),* $(,)?) => {
        mod $module {
            $(
                #[test]
                fn $test() {
                    match $make() {
                        Some(engine) => super::$test(&*engine),
                        None => {}
                    }
                }
            )*
        }
    };
}

macro_rules! all_engines {
    ($($test:ident),* $(,)?) => {
        engine_suite!(sync, super::sync_engine; $($test),*);
        engine_suite!(io_uring, super::uring_engine; $($test),*);
        engine_suite!(io_uring_short_transfers, super::uring_short_transfers; $($test),*);
        engine_suite!(fault_over_uring, super::fault_over_uring; $($test),*);
    };
}

all_engines!(
    write_read_round_trip,
    batch_larger_than_ring,
    large_buffer_round_trip,
    read_past_eof_is_unexpected_eof,
    zero_and_punch_read_back_as_zeroes,
    zero_falls_back_on_tmpfs,
    sync_data_succeeds,
    allocate_set_len_len,
    failed_op_does_not_lose_the_rest_of_the_batch,
    open_modes,
    rename_remove_sync_dir,
    threads_share_the_engine,
    absurd_offsets_are_errors,
    block_device,
);

// ---------------------------------------------------------------------------
// Helpers.

fn tmpdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("create temp dir")
}

/// A deterministic, position-dependent pattern.
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u32).wrapping_mul(31).wrapping_add(seed as u32 * 7 + 1) as u8).collect()
}

fn read(e: &dyn IoEngine, f: &IoFile, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0xAAu8; len];
    e.read_exact_at(f, &mut buf, offset).expect("read");
    buf
}

// ---------------------------------------------------------------------------
// The shared suite.

fn write_read_round_trip(e: &dyn IoEngine) {
    let dir = tmpdir();
    let f = e.open(&dir.path().join("data"), OpenMode::CREATE_NEW).expect("open");
    let a = pattern(1, 4096);
    let b = pattern(2, 1000);
    let c = pattern(3, 513);
    e.submit(&mut [
        IoOp::Write { file: &f, offset: 0, buf: &a },
        IoOp::Write { file: &f, offset: 10_000, buf: &b },
        IoOp::Write { file: &f, offset: 7, buf: &c[..0] },
        IoOp::Write { file: &f, offset: 20_001, buf: &c },
    ])
    .expect("write batch");
    assert_eq!(e.len(&f).expect("len"), 20_001 + 513);

    let (mut ra, mut rb, mut rc, mut hole) = (vec![0; 4096], vec![0; 1000], vec![0; 513], vec![0xFF; 5904]);
    e.submit(&mut [
        IoOp::Read { file: &f, offset: 0, buf: &mut ra },
        IoOp::Read { file: &f, offset: 10_000, buf: &mut rb },
        IoOp::Read { file: &f, offset: 20_001, buf: &mut rc },
        IoOp::Read { file: &f, offset: 4096, buf: &mut hole },
    ])
    .expect("read batch");
    assert_eq!(ra, a);
    assert_eq!(rb, b);
    assert_eq!(rc, c);
    assert!(hole.iter().all(|&x| x == 0), "unwritten range reads as zeroes");

    // Overwrite in the middle, unaligned.
    let d = pattern(4, 300);
    e.write_all_at(&f, &d, 100).expect("overwrite");
    let got = read(e, &f, 0, 4096);
    assert_eq!(&got[..100], &a[..100]);
    assert_eq!(&got[100..400], &d[..]);
    assert_eq!(&got[400..], &a[400..]);
    // What the kernel sees matches.
    let on_disk = std::fs::read(dir.path().join("data")).expect("std read");
    assert_eq!(&on_disk[..4096], &got[..]);
}

fn batch_larger_than_ring(e: &dyn IoEngine) {
    const N: usize = 1000;
    let dir = tmpdir();
    let f = e.open(&dir.path().join("data"), OpenMode::CREATE_NEW).expect("open");
    let bufs: Vec<Vec<u8>> = (0..N).map(|i| pattern(i as u8, 4096 - (i % 7))).collect();
    let mut ops: Vec<IoOp<'_>> =
        bufs.iter().enumerate().map(|(i, b)| IoOp::Write { file: &f, offset: i as u64 * 4096, buf: b }).collect();
    e.submit(&mut ops).expect("1000 writes");
    drop(ops);
    e.sync_data(&f).expect("sync");

    let mut out: Vec<Vec<u8>> = bufs.iter().map(|b| vec![0; b.len()]).collect();
    let mut ops: Vec<IoOp<'_>> =
        out.iter_mut().enumerate().map(|(i, b)| IoOp::Read { file: &f, offset: i as u64 * 4096, buf: b }).collect();
    e.submit(&mut ops).expect("1000 reads");
    drop(ops);
    for (i, (w, r)) in bufs.iter().zip(&out).enumerate() {
        assert_eq!(w, r, "op {i}");
    }
}

fn large_buffer_round_trip(e: &dyn IoEngine) {
    let dir = tmpdir();
    let f = e.open(&dir.path().join("data"), OpenMode::CREATE_NEW).expect("open");
    let big = pattern(9, 8 << 20);
    e.write_all_at(&f, &big, 12_345).expect("write 8 MiB");
    assert_eq!(read(e, &f, 12_345, big.len()), big);
}

fn read_past_eof_is_unexpected_eof(e: &dyn IoEngine) {
    let dir = tmpdir();
    let f = e.open(&dir.path().join("data"), OpenMode::CREATE_NEW).expect("open");
    e.write_all_at(&f, &pattern(1, 1000), 0).expect("write");

    let mut buf = vec![0; 100];
    let err = e.read_exact_at(&f, &mut buf, 950).expect_err("read across EOF");
    assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    let err = e.read_exact_at(&f, &mut buf, 5000).expect_err("read beyond EOF");
    assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);

    // The good read of a batch is served although another one fails.
    let (mut good, mut bad) = (vec![0; 500], vec![0; 10]);
    let err = e
        .submit(&mut [
            IoOp::Read { file: &f, offset: 995, buf: &mut bad },
            IoOp::Read { file: &f, offset: 0, buf: &mut good },
        ])
        .expect_err("batch with a read past EOF");
    assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    assert_eq!(good, pattern(1, 1000)[..500]);
}

/// Zero and punch ranges with odd sizes, inside and at the end of a file.
fn check_zeroing(e: &dyn IoEngine, dir: &Path) {
    let f = e.open(&dir.join("data"), OpenMode::CREATE_NEW).expect("open");
    let len = 64 * 1024 + 333;
    let data = pattern(5, len);
    e.write_all_at(&f, &data, 0).expect("write");
    let mut expect = data.clone();
    for (offset, zlen, punch) in [
        (1000u64, 5000u64, false),
        (10_000, 7_000, true),
        (16_384, 4096, true),
        (20_480, 8192, false),
        (40_000, 1, true),
        (41_000, 0, false),
        (len as u64 - 100, 100, true),
        (len as u64 - 300, 10_000, false), // beyond EOF: size is kept
    ] {
        e.zero(&f, offset, zlen, punch).expect("zero");
        let end = (offset + zlen).min(len as u64);
        expect[offset as usize..end as usize].fill(0);
    }
    assert_eq!(e.len(&f).expect("len"), len as u64, "zeroing keeps the size");
    assert_eq!(read(e, &f, 0, len), expect);
}

fn zero_and_punch_read_back_as_zeroes(e: &dyn IoEngine) {
    let dir = tmpdir();
    check_zeroing(e, dir.path());
}

/// tmpfs has no FALLOC_FL_ZERO_RANGE: the engines must write zeroes instead.
fn zero_falls_back_on_tmpfs(e: &dyn IoEngine) {
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() {
        eprintln!("skipped: no /dev/shm");
        return;
    }
    let dir = tempfile::tempdir_in(shm).expect("temp dir in /dev/shm");
    check_zeroing(e, dir.path());
}

fn sync_data_succeeds(e: &dyn IoEngine) {
    let dir = tmpdir();
    let f = e.open(&dir.path().join("data"), OpenMode::CREATE_NEW).expect("open");
    let g = e.open(&dir.path().join("other"), OpenMode::CREATE_NEW).expect("open");
    let a = pattern(1, 8192);
    e.submit(&mut [IoOp::Write { file: &f, offset: 0, buf: &a }, IoOp::Write { file: &g, offset: 0, buf: &a }])
        .expect("writes");
    e.submit(&mut [IoOp::SyncData { file: &f }, IoOp::SyncData { file: &g }]).expect("syncs");
    e.sync_data(&f).expect("sync again");
    assert_eq!(read(e, &g, 0, 8192), a);
}

fn allocate_set_len_len(e: &dyn IoEngine) {
    let dir = tmpdir();
    let f = e.open(&dir.path().join("data"), OpenMode::CREATE_NEW).expect("open");
    assert_eq!(e.len(&f).expect("len"), 0);
    e.set_len(&f, 1 << 20).expect("set_len");
    assert_eq!(e.len(&f).expect("len"), 1 << 20);
    assert!(read(e, &f, (1 << 20) - 4096, 4096).iter().all(|&b| b == 0));
    e.allocate(&f, 3 << 20).expect("allocate");
    assert_eq!(e.len(&f).expect("len"), 3 << 20);
    let blocks = std::os::unix::fs::MetadataExt::blocks(&f.std().metadata().expect("metadata"));
    assert!(blocks * 512 >= 3 << 20, "allocate reserves the blocks ({blocks} blocks)");
    e.set_len(&f, 4096).expect("shrink");
    assert_eq!(e.len(&f).expect("len"), 4096);
    let mut buf = [0u8; 1];
    let err = e.read_exact_at(&f, &mut buf, 4096).expect_err("past the new end");
    assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
}

fn failed_op_does_not_lose_the_rest_of_the_batch(e: &dyn IoEngine) {
    let dir = tmpdir();
    let path = dir.path().join("data");
    let rw = e.open(&path, OpenMode::CREATE_NEW).expect("open rw");
    let ro = e.open(&path, OpenMode::READ).expect("open ro");
    let a = pattern(1, 4096);
    let b = pattern(2, 4096);
    let err = e
        .submit(&mut [
            IoOp::Write { file: &rw, offset: 0, buf: &a },
            IoOp::Write { file: &ro, offset: 4096, buf: &b },
            IoOp::Write { file: &rw, offset: 8192, buf: &b },
        ])
        .expect_err("write through a read-only descriptor");
    assert_eq!(err.raw_os_error(), Some(libc::EBADF), "{err}");
    assert_eq!(read(e, &rw, 0, 4096), a);
    assert_eq!(read(e, &rw, 8192, 4096), b);
    assert!(read(e, &rw, 4096, 4096).iter().all(|&x| x == 0));
}

fn open_modes(e: &dyn IoEngine) {
    let dir = tmpdir();
    let path = dir.path().join("data");
    let err = e.open(&path, OpenMode::READ).expect_err("missing file");
    assert_eq!(err.kind(), io::ErrorKind::NotFound);
    let f = e.open(&path, OpenMode::CREATE_NEW).expect("create");
    e.write_all_at(&f, b"hello", 0).expect("write");
    let err = e.open(&path, OpenMode::CREATE_NEW).expect_err("exists");
    assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
    let g = e.open(&path, OpenMode::CREATE).expect("create existing");
    assert_eq!(read(e, &g, 0, 5), b"hello");
    assert_ne!(f.id(), g.id());
    assert_eq!(g.path(), path);
}

fn rename_remove_sync_dir(e: &dyn IoEngine) {
    let dir = tmpdir();
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    let f = e.open(&a, OpenMode::CREATE_NEW).expect("create");
    e.write_all_at(&f, b"x", 0).expect("write");
    e.rename(&a, &b).expect("rename");
    e.sync_dir(dir.path()).expect("sync_dir");
    assert!(!a.exists() && b.exists());
    e.remove(&b).expect("remove");
    e.sync_dir(dir.path()).expect("sync_dir");
    assert!(!b.exists());
    assert_eq!(e.remove(&b).expect_err("already gone").kind(), io::ErrorKind::NotFound);
}

fn threads_share_the_engine(e: &dyn IoEngine) {
    let dir = tmpdir();
    let f = e.open(&dir.path().join("data"), OpenMode::CREATE_NEW).expect("open");
    std::thread::scope(|s| {
        for t in 0..4u8 {
            let f = &f;
            s.spawn(move || {
                for round in 0..20u64 {
                    let bufs: Vec<Vec<u8>> = (0..8).map(|i| pattern(t * 16 + i, 4096)).collect();
                    let base = (t as u64 * 20 + round) * 8 * 4096;
                    let mut ops: Vec<IoOp<'_>> = bufs
                        .iter()
                        .enumerate()
                        .map(|(i, b)| IoOp::Write { file: f, offset: base + i as u64 * 4096, buf: b })
                        .collect();
                    ops.push(IoOp::SyncData { file: f });
                    e.submit(&mut ops).expect("batch");
                    drop(ops);
                    for (i, b) in bufs.iter().enumerate() {
                        assert_eq!(&read(e, f, base + i as u64 * 4096, 4096), b);
                    }
                }
            });
        }
    });
}

/// Offsets past what the kernel takes (`loff_t` is signed) are errors, not
/// panics or wrap-arounds.
fn absurd_offsets_are_errors(e: &dyn IoEngine) {
    let dir = tmpdir();
    let f = e.open(&dir.path().join("data"), OpenMode::CREATE_NEW).expect("open");
    for offset in [u64::MAX - 3, i64::MAX as u64 + 1] {
        let err = e.write_all_at(&f, &[1u8; 8], offset).expect_err("write");
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "write at {offset}: {err}");
        let mut buf = [0u8; 8];
        let err = e.read_exact_at(&f, &mut buf, offset).expect_err("read");
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "read at {offset}: {err}");
    }
    assert_eq!(e.len(&f).expect("len"), 0, "nothing was written");
}

/// A loop device over a temp file, detached on drop.
struct LoopDevice {
    dev: PathBuf,
}

impl LoopDevice {
    fn attach(backing: &Path) -> Option<LoopDevice> {
        let out = match Command::new("losetup").args(["-f", "--show"]).arg(backing).output() {
            Ok(out) => out,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                eprintln!("skipped: losetup not installed");
                return None;
            }
            Err(e) => panic!("cannot run losetup: {e}"),
        };
        assert!(out.status.success(), "losetup -f --show failed: {}", String::from_utf8_lossy(&out.stderr));
        let dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        Some(LoopDevice { dev })
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        match Command::new("losetup").arg("-d").arg(&self.dev).status() {
            Ok(s) if s.success() => {}
            other => eprintln!("warning: losetup -d {} failed: {other:?}", self.dev.display()),
        }
    }
}

fn block_device(e: &dyn IoEngine) {
    const SIZE: u64 = 16 << 20;
    let dir = tmpdir();
    let backing = dir.path().join("backing");
    std::fs::File::create(&backing).and_then(|f| f.set_len(SIZE)).expect("backing file");
    let Some(lo) = LoopDevice::attach(&backing) else { return };
    let f = e.open(&lo.dev, OpenMode::READ_WRITE).expect("open loop device");
    assert_eq!(e.len(&f).expect("BLKGETSIZE64"), SIZE);

    let a = pattern(1, 64 * 1024);
    let b = pattern(2, 1000);
    e.submit(&mut [
        IoOp::Write { file: &f, offset: 0, buf: &a },
        IoOp::Write { file: &f, offset: 1 << 20, buf: &a },
        IoOp::Write { file: &f, offset: SIZE - 1000, buf: &b },
    ])
    .expect("writes");
    e.sync_data(&f).expect("sync");
    assert_eq!(read(e, &f, 0, a.len()), a);
    assert_eq!(read(e, &f, SIZE - 1000, 1000), b);
    let mut past = [0u8; 2];
    let err = e.read_exact_at(&f, &mut past, SIZE - 1).expect_err("past the device end");
    assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    // A write across the device end: the part inside lands, then ENOSPC.
    let err = e.write_all_at(&f, &[0x5A; 1024], SIZE - 512).expect_err("write past the device end");
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    assert_eq!(read(e, &f, SIZE - 512, 512), vec![0x5A; 512]);
    e.write_all_at(&f, &b, SIZE - 1000).expect("restore the tail");

    // Aligned zero / punch go to the device; unaligned ones are refused by
    // the kernel (EINVAL) and written as zeroes.
    e.zero(&f, 4096, 8192, false).expect("zero aligned");
    e.zero(&f, 20_000, 3_000, true).expect("punch unaligned");
    e.zero(&f, (1 << 20) + 512, 4096 * 4, true).expect("punch sector-aligned");
    e.sync_data(&f).expect("sync");
    let mut expect = a.clone();
    expect[4096..4096 + 8192].fill(0);
    expect[20_000..23_000].fill(0);
    assert_eq!(read(e, &f, 0, a.len()), expect);
    let mut expect = a.clone();
    expect[512..512 + 4096 * 4].fill(0);
    assert_eq!(read(e, &f, 1 << 20, a.len()), expect);
    drop(f);
    drop(lo);
    // The data reached the backing file through the device.
    let backing_data = std::fs::read(&backing).expect("read backing");
    assert_eq!(&backing_data[SIZE as usize - 1000..], &b[..]);
}

// ---------------------------------------------------------------------------
// Engine selection.

#[test]
fn probe_succeeds_and_auto_picks_io_uring() {
    if std::env::var_os(uring::DISABLE_ENV).is_some_and(|v| !v.is_empty()) {
        eprintln!("skipped: {} is set", uring::DISABLE_ENV);
        return;
    }
    uring::probe().expect("io_uring probe");
    assert_eq!(select_engine(EngineChoice::Auto).expect("auto").kind(), EngineKind::IoUring);
    assert_eq!(select_engine(EngineChoice::IoUring).expect("io_uring").kind(), EngineKind::IoUring);
    assert_eq!(select_engine(EngineChoice::Sync).expect("sync").kind(), EngineKind::Sync);
}

#[test]
fn engine_choice_parses_from_the_config_spelling() {
    #[derive(serde::Deserialize)]
    struct Cfg {
        io_engine: EngineChoice,
    }
    for (text, want) in
        [("auto", EngineChoice::Auto), ("io_uring", EngineChoice::IoUring), ("sync", EngineChoice::Sync)]
    {
        let cfg: Cfg = toml::from_str(&format!("io_engine = \"{text}\"")).expect(text);
        assert_eq!(cfg.io_engine, want);
    }
    assert!(toml::from_str::<Cfg>("io_engine = \"uring\"").is_err());
    assert_eq!(EngineChoice::default(), EngineChoice::Auto);
}

/// Runs [`fallback_child`] in a child process with io_uring disabled by the
/// environment (tests must not mutate this process' environment).
#[test]
fn auto_falls_back_to_sync_when_io_uring_is_disabled() {
    let exe = std::env::current_exe().expect("current exe");
    let out = Command::new(exe)
        .args(["--exact", "io::tests::fallback_child", "--ignored", "--nocapture", "--test-threads=1"])
        .env(uring::DISABLE_ENV, "1")
        .output()
        .expect("run child test");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("1 passed"), "child test did not run:\n{stdout}");
}

#[derive(Clone, Default)]
struct LogBuf(Arc<std::sync::Mutex<Vec<u8>>>);

impl io::Write for LogBuf {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().map_err(|_| io::Error::other("poisoned"))?.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
#[ignore = "run by auto_falls_back_to_sync_when_io_uring_is_disabled in a child process"]
fn fallback_child() {
    assert!(std::env::var_os(uring::DISABLE_ENV).is_some(), "must run with {} set", uring::DISABLE_ENV);
    let logs = LogBuf::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt().with_writer(move || writer.clone()).with_ansi(false).finish();
    tracing::subscriber::with_default(subscriber, || {
        let err = uring::probe().expect_err("probe must fail");
        assert!(err.to_string().contains("io_uring disabled by REPBLOCK_DISABLE_IO_URING"), "{err}");

        let engine = select_engine(EngineChoice::Auto).expect("auto falls back");
        assert_eq!(engine.kind(), EngineKind::Sync);

        let err = select_engine(EngineChoice::IoUring).expect_err("forced io_uring must refuse");
        assert!(err.to_string().contains("REPBLOCK_DISABLE_IO_URING"), "{err}");
    });
    let logs = String::from_utf8_lossy(&logs.0.lock().expect("log buffer")).into_owned();
    assert!(logs.contains("WARN") && logs.contains("falling back"), "fallback not logged: {logs}");
    assert!(logs.contains("engine=\"sync\""), "engine not logged: {logs}");
}

// ---------------------------------------------------------------------------
// Differential property test: sync engine vs io_uring engine.

#[derive(Debug, Clone)]
enum DiffOp {
    Write { offset: u64, len: usize, seed: u8 },
    Zero { offset: u64, len: u64, punch: bool },
    Sync,
    Read { offset: u64, len: usize },
}

fn diff_op() -> impl Strategy<Value = DiffOp> {
    const SPAN: u64 = 256 * 1024;
    prop_oneof![
        4 => (0..SPAN, 0..20_000usize, any::<u8>()).prop_map(|(offset, len, seed)| DiffOp::Write { offset, len, seed }),
        1 => (0..SPAN / 4096, 1..8usize, any::<u8>())
            .prop_map(|(block, n, seed)| DiffOp::Write { offset: block * 4096, len: n * 4096, seed }),
        2 => (0..SPAN, 0..40_000u64, any::<bool>()).prop_map(|(offset, len, punch)| DiffOp::Zero { offset, len, punch }),
        1 => Just(DiffOp::Sync),
        3 => (0..SPAN + 8192, 0..16_000usize).prop_map(|(offset, len)| DiffOp::Read { offset, len }),
    ]
}

fn range_of(op: &DiffOp) -> Option<(u64, u64)> {
    match *op {
        DiffOp::Write { offset, len, .. } => Some((offset, offset + len as u64)),
        DiffOp::Zero { offset, len, .. } => Some((offset, offset + len)),
        DiffOp::Read { offset, len } => Some((offset, offset + len as u64)),
        DiffOp::Sync => None,
    }
}

/// Groups ops into batches whose outcome does not depend on the order the
/// engine runs them in: no op overlaps a write or zero range of its batch,
/// and reads never share a batch with a write that extends the file.
fn batches(ops: &[DiffOp], max_batch: &[usize]) -> Vec<Vec<DiffOp>> {
    let mut out: Vec<Vec<DiffOp>> = Vec::new();
    let mut cur: Vec<DiffOp> = Vec::new();
    let mut len_at_start = 0u64;
    let mut len = 0u64;
    let mut limits = max_batch.iter().cycle();
    let mut limit = limits.next().copied().unwrap_or(1);
    for op in ops {
        let conflicts = cur.iter().any(|other| {
            let mutating = |o: &DiffOp| matches!(o, DiffOp::Write { .. } | DiffOp::Zero { .. });
            let overlap = match (range_of(op), range_of(other)) {
                (Some((a, b)), Some((c, d))) => a < d && c < b,
                _ => false,
            };
            let extends =
                |o: &DiffOp| matches!(o, DiffOp::Write { offset, len, .. } if offset + *len as u64 > len_at_start);
            (overlap && (mutating(op) || mutating(other)))
                || (matches!(op, DiffOp::Read { .. }) && extends(other))
                || (matches!(other, DiffOp::Read { .. }) && extends(op))
        });
        if conflicts || cur.len() >= limit {
            out.push(std::mem::take(&mut cur));
            len_at_start = len;
            limit = limits.next().copied().unwrap_or(1);
        }
        if let DiffOp::Write { offset, len: n, .. } = op {
            len = len.max(offset + *n as u64);
        }
        cur.push(op.clone());
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Runs one batch; returns the error kind (if any) and the read buffers.
fn run_diff_batch(e: &dyn IoEngine, f: &IoFile, batch: &[DiffOp]) -> (Option<io::ErrorKind>, Vec<Vec<u8>>) {
    let payloads: Vec<Vec<u8>> = batch
        .iter()
        .map(|op| match *op {
            DiffOp::Write { len, seed, .. } => pattern(seed, len),
            _ => Vec::new(),
        })
        .collect();
    let mut reads: Vec<Vec<u8>> = batch
        .iter()
        .map(|op| match *op {
            DiffOp::Read { len, .. } => vec![0u8; len],
            _ => Vec::new(),
        })
        .collect();
    let mut ops: Vec<IoOp<'_>> = batch
        .iter()
        .zip(&payloads)
        .zip(reads.iter_mut())
        .map(|((op, payload), rbuf)| match *op {
            DiffOp::Write { offset, .. } => IoOp::Write { file: f, offset, buf: payload },
            DiffOp::Zero { offset, len, punch } => IoOp::Zero { file: f, offset, len, punch },
            DiffOp::Sync => IoOp::SyncData { file: f },
            DiffOp::Read { offset, .. } => IoOp::Read { file: f, offset, buf: rbuf },
        })
        .collect();
    let res = e.submit(&mut ops);
    drop(ops);
    (res.err().map(|e| e.kind()), reads)
}

/// Runs `ops` on both engines, in a temp dir under `base` (the file system
/// decides which fallocate modes exist), and compares every outcome.
fn differential(base: &Path, ops: &[DiffOp], max_batch: &[usize]) -> Result<(), TestCaseError> {
    if uring_engine().is_none() {
        return Ok(());
    }
    // The reference first, then io_uring as configured, then io_uring with
    // odd-sized partial transfers.
    let engines: [(&str, Arc<dyn IoEngine>); 3] = [
        ("sync", Arc::new(SyncEngine::new())),
        ("uring", Arc::new(UringEngine::new())),
        ("uring-short", Arc::new(UringEngine::with_max_transfer(4097))),
    ];
    let dir = tempfile::tempdir_in(base).expect("temp dir");
    let files: Vec<IoFile> =
        engines.iter().map(|(name, e)| e.open(&dir.path().join(name), OpenMode::CREATE_NEW).expect("open")).collect();
    let mut file_len = 0u64;
    for batch in batches(ops, max_batch) {
        let (ref_err, ref_reads) = run_diff_batch(&*engines[0].1, &files[0], &batch);
        for ((name, e), f) in engines.iter().zip(&files).skip(1) {
            let (err, reads) = run_diff_batch(&**e, f, &batch);
            prop_assert_eq!(ref_err, err, "{}: batch {:?}", name, batch);
            for (op, (a, b)) in batch.iter().zip(ref_reads.iter().zip(&reads)) {
                // Reads that fail (past EOF) leave unspecified buffers.
                if let DiffOp::Read { offset, len } = *op
                    && offset + len as u64 <= file_len
                {
                    prop_assert!(a == b, "{}: read {:?} differs", name, op);
                }
            }
        }
        for op in &batch {
            if let DiffOp::Write { offset, len, .. } = *op {
                file_len = file_len.max(offset + len as u64);
            }
        }
    }
    let reference = std::fs::read(dir.path().join(engines[0].0)).expect("read reference file");
    for (name, _) in &engines[1..] {
        let other = std::fs::read(dir.path().join(name)).expect("read file");
        prop_assert_eq!(reference.len(), other.len(), "{}: file length", name);
        prop_assert!(reference == other, "{}: file contents differ", name);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn sync_and_io_uring_agree(
        ops in proptest::collection::vec(diff_op(), 1..120),
        max_batch in proptest::collection::vec(1..40usize, 1..8),
    ) {
        differential(&std::env::temp_dir(), &ops, &max_batch)?;
    }

    /// tmpfs has no FALLOC_FL_ZERO_RANGE: exercises the zero-writing fallback.
    #[test]
    fn sync_and_io_uring_agree_on_tmpfs(
        ops in proptest::collection::vec(diff_op(), 1..120),
        max_batch in proptest::collection::vec(1..40usize, 1..8),
    ) {
        let shm = Path::new("/dev/shm");
        if shm.is_dir() {
            differential(shm, &ops, &max_batch)?;
        }
    }
}

// ---------------------------------------------------------------------------
// Benchmark (not part of the suite): sync vs io_uring, same run, ratios.
// Run: cargo test --release --lib io::tests::bench_engines -- --ignored --nocapture

fn bench_workload(
    e: &dyn IoEngine,
    dir: &Path,
    name: &str,
    rounds: usize,
    batch: usize,
    size: usize,
    sync: bool,
) -> f64 {
    use rand::{Rng, SeedableRng};
    const SPAN: u64 = 256 << 20;
    let f = e.open(&dir.join(format!("{name}-{}", e.kind())), OpenMode::CREATE_NEW).expect("open");
    e.allocate(&f, SPAN).expect("allocate");
    if name.contains("cached") {
        // Fill the file so every page is in the page cache.
        let chunk = pattern(3, 1 << 20);
        for i in 0..SPAN >> 20 {
            e.write_all_at(&f, &chunk, i << 20).expect("fill");
        }
    }
    e.sync_data(&f).expect("sync");
    let buf = pattern(7, size);
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let slots = SPAN / size as u64;
    let start = std::time::Instant::now();
    let mut seq = 0u64;
    for _ in 0..rounds {
        let offsets: Vec<u64> = (0..batch)
            .map(|_| {
                let slot = if size >= 1 << 20 {
                    seq += 1;
                    seq % slots
                } else {
                    rng.random_range(0..slots)
                };
                slot * size as u64
            })
            .collect();
        if name.contains("read") {
            let mut bufs: Vec<Vec<u8>> = offsets.iter().map(|_| vec![0u8; size]).collect();
            let mut ops: Vec<IoOp<'_>> = offsets
                .iter()
                .zip(bufs.iter_mut())
                .map(|(&offset, b)| IoOp::Read { file: &f, offset, buf: b })
                .collect();
            e.submit(&mut ops).expect("reads");
        } else {
            let mut ops: Vec<IoOp<'_>> =
                offsets.iter().map(|&offset| IoOp::Write { file: &f, offset, buf: &buf }).collect();
            e.submit(&mut ops).expect("writes");
        }
        if sync {
            e.sync_data(&f).expect("sync");
        }
    }
    let secs = start.elapsed().as_secs_f64();
    (rounds * batch) as f64 / secs
}

#[test]
#[ignore = "benchmark; run explicitly with --ignored --nocapture"]
fn bench_engines() {
    let Some(uring) = uring_engine() else { return };
    let sync: Arc<dyn IoEngine> = Arc::new(SyncEngine::new());
    let dir = tmpdir();
    for (name, rounds, batch, size, do_sync) in [
        ("4k-qd1-fdatasync", 2000, 1, 4096, true),
        ("4k-batch32-fdatasync", 500, 32, 4096, true),
        ("4k-batch32", 2000, 32, 4096, false),
        ("1m-batch8", 64, 8, 1 << 20, false),
        ("4k-batch32-cached", 2000, 32, 4096, false),
        ("4k-read-batch32-cached", 2000, 32, 4096, false),
    ] {
        if std::env::var("REPBLOCK_BENCH").is_ok_and(|only| !only.split(',').any(|n| n == name)) {
            continue;
        }
        // Alternate the order over three rounds and keep each engine's best,
        // so that neither profits from running second (warm caches, a quiet
        // neighbour) more than the other.
        let (mut s, mut u) = (0f64, 0f64);
        for round in 0..3 {
            let sub = dir.path().join(format!("{name}-{round}"));
            std::fs::create_dir(&sub).expect("mkdir");
            let run = |e: &dyn IoEngine| bench_workload(e, &sub, name, rounds, batch, size, do_sync);
            if round % 2 == 0 {
                s = s.max(run(&*sync));
                u = u.max(run(&*uring));
            } else {
                u = u.max(run(&*uring));
                s = s.max(run(&*sync));
            }
            std::fs::remove_dir_all(&sub).expect("cleanup");
        }
        println!("{name:>22}: sync {s:>10.0} ops/s  io_uring {u:>10.0} ops/s  ratio io_uring/sync {:.2}", u / s);
    }
}
