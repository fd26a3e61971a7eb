//! Tests of the fault engine, its power-cut model and `REPBLOCK_FAULTS`.

use super::*;
use crate::io::sync::SyncEngine;

fn engine(seed: u64) -> Arc<FaultEngine> {
    FaultEngine::new(Arc::new(SyncEngine::new()), seed)
}

fn fill(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u32).wrapping_mul(131).wrapping_add(seed as u32 * 17 + 3) as u8).collect()
}

fn errno(r: io::Result<()>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

#[test]
fn sync_error_is_returned_and_keeps_failing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = engine(0);
    let f = e.open(&dir.path().join("f"), OpenMode::CREATE_NEW).expect("open");
    e.fail_sync_after(2, libc::EIO);
    for _ in 0..2 {
        e.write_all_at(&f, &fill(1, 4096), 0).expect("write");
        e.sync_data(&f).expect("sync before the fault");
    }
    assert_eq!(errno(e.sync_data(&f)), Some(libc::EIO));
    assert_eq!(errno(e.sync_data(&f)), Some(libc::EIO), "a failed sync keeps failing");
    // Writes still go through; a batch with a failing sync reports it
    // after running the rest.
    let data = fill(2, 4096);
    let r = e.submit(&mut [IoOp::Write { file: &f, offset: 4096, buf: &data }, IoOp::SyncData { file: &f }]);
    assert_eq!(errno(r), Some(libc::EIO));
    let mut back = vec![0; 4096];
    e.read_exact_at(&f, &mut back, 4096).expect("read");
    assert_eq!(back, data);
    e.clear_faults();
    e.sync_data(&f).expect("sync after clear_faults");
}

#[test]
fn write_error_injection_enospc() {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = engine(0);
    let f = e.open(&dir.path().join("f"), OpenMode::CREATE_NEW).expect("open");
    e.fail_writes_after(3, libc::ENOSPC);
    for i in 0..3u64 {
        e.write_all_at(&f, &fill(i as u8, 512), i * 512).expect("write before the fault");
    }
    assert_eq!(errno(e.write_all_at(&f, &fill(9, 512), 3 * 512)), Some(libc::ENOSPC));
    assert_eq!(errno(e.write_all_at(&f, &fill(9, 512), 0)), Some(libc::ENOSPC));
    // The failed writes changed nothing; other operations still work.
    assert_eq!(e.len(&f).expect("len"), 3 * 512);
    let mut back = vec![0; 512];
    e.read_exact_at(&f, &mut back, 0).expect("read");
    assert_eq!(back, fill(0, 512));
    e.sync_data(&f).expect("sync");
    e.zero(&f, 0, 512, false).expect("zero");
    // In a batch, the other operations run.
    let ok_then_fail = fill(5, 512);
    let mut back = vec![1; 512];
    let r = e.submit(&mut [
        IoOp::Write { file: &f, offset: 0, buf: &ok_then_fail },
        IoOp::Read { file: &f, offset: 512, buf: &mut back },
    ]);
    assert_eq!(errno(r), Some(libc::ENOSPC));
    assert_eq!(back, fill(1, 512));
}

/// Reference model of one file for the power-cut test.
struct Model {
    durable: Vec<u8>,
    /// Unsynced writes, oldest first: (offset, data).
    unsynced: Vec<(u64, Vec<u8>)>,
    current: Vec<u8>,
}

impl Model {
    fn write(&mut self, offset: u64, data: &[u8]) {
        let end = offset as usize + data.len();
        if self.current.len() < end {
            self.current.resize(end, 0);
        }
        self.current[offset as usize..end].copy_from_slice(data);
        self.unsynced.push((offset, data.to_vec()));
    }

    fn sync(&mut self) {
        self.durable = self.current.clone();
        self.unsynced.clear();
    }

    /// Checks a file after a power cut, sector by sector.
    fn check(&self, after: &[u8]) {
        let max_end = self.unsynced.iter().map(|(o, d)| *o as usize + d.len()).max().unwrap_or(0);
        assert!(after.len() >= self.durable.len(), "synced length lost");
        assert!(after.len() <= self.durable.len().max(max_end), "file longer than anything written");
        let sector = SECTOR as usize;
        let span = after.len().max(self.durable.len());
        let at = |v: &[u8], i: usize| v.get(i).copied().unwrap_or(0);
        for s in (0..span).step_by(sector) {
            let got: Vec<u8> = (s..s + sector).map(|i| at(after, i)).collect();
            let durable: Vec<u8> = (s..s + sector).map(|i| at(&self.durable, i)).collect();
            let mut candidates = vec![durable];
            for (o, d) in &self.unsynced {
                let (o, e) = (*o as usize, *o as usize + d.len());
                if o <= s && s + sector <= e {
                    candidates.push(d[s - o..s - o + sector].to_vec());
                }
            }
            assert!(
                candidates.contains(&got),
                "sector {} holds content no write ever gave it ({} candidates)",
                s / sector,
                candidates.len()
            );
        }
    }
}

#[test]
fn power_cut_keeps_synced_data_and_reverts_at_sector_granularity() {
    use rand::Rng;
    let mut totals = PowerCutReport::default();
    for seed in 0..24u64 {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = engine(seed);
        let mut rng = StdRng::seed_from_u64(1000 + seed);
        let files: Vec<IoFile> =
            (0..2).map(|i| e.open(&dir.path().join(format!("f{i}")), OpenMode::CREATE_NEW).expect("open")).collect();
        let mut models: Vec<Model> =
            (0..2).map(|_| Model { durable: Vec::new(), unsynced: Vec::new(), current: Vec::new() }).collect();
        let mut unsynced_ops = 0u64;
        let mut unsynced_sectors = 0u64;
        for step in 0..60 {
            let k = rng.random_range(0..2usize);
            if rng.random_range(0..6) == 0 {
                e.sync_data(&files[k]).expect("sync");
                models[k].sync();
            } else {
                let offset = rng.random_range(0..64u64) * SECTOR;
                let len = rng.random_range(1..16usize) * SECTOR as usize;
                let data = fill((step + seed as usize) as u8, len);
                e.write_all_at(&files[k], &data, offset).expect("write");
                models[k].write(offset, &data);
            }
        }
        for m in &models {
            unsynced_ops += m.unsynced.len() as u64;
            unsynced_sectors += m.unsynced.iter().map(|(_, d)| d.len() as u64 / SECTOR).sum::<u64>();
        }
        let report = e.power_cut();
        assert_eq!(report.writes_kept + report.writes_reverted + report.writes_torn, unsynced_ops);
        assert_eq!(report.sectors_kept + report.sectors_reverted, unsynced_sectors);
        for (i, m) in models.iter().enumerate() {
            let after = std::fs::read(dir.path().join(format!("f{i}"))).expect("read after cut");
            m.check(&after);
        }
        // Powered off: everything fails with EIO.
        let mut b = [0u8; 1];
        assert_eq!(errno(e.read_exact_at(&files[0], &mut b, 0)), Some(libc::EIO));
        assert_eq!(errno(e.write_all_at(&files[0], &b, 0)), Some(libc::EIO));
        assert_eq!(errno(e.sync_data(&files[0])), Some(libc::EIO));
        assert_eq!(e.len(&files[0]).map_err(|e| e.raw_os_error()), Err(Some(libc::EIO)));
        assert_eq!(
            e.open(&dir.path().join("f0"), OpenMode::READ).map(|_| ()).map_err(|e| e.raw_os_error()),
            Err(Some(libc::EIO))
        );
        e.clear_faults();
        e.len(&files[0]).expect("len after clear_faults");
        totals.writes_kept += report.writes_kept;
        totals.writes_reverted += report.writes_reverted;
        totals.writes_torn += report.writes_torn;
    }
    assert!(totals.writes_kept > 0 && totals.writes_reverted > 0 && totals.writes_torn > 0, "{totals:?}");
}

#[test]
fn unaligned_write_is_torn_only_at_sector_boundaries() {
    for seed in 0..32 {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = engine(seed);
        let f = e.open(&dir.path().join("f"), OpenMode::CREATE_NEW).expect("open");
        let old = fill(1, 4096);
        e.write_all_at(&f, &old, 0).expect("write");
        e.sync_data(&f).expect("sync");
        let new = fill(2, 100);
        e.write_all_at(&f, &new, 1000).expect("unsynced write");
        e.power_cut();
        let after = std::fs::read(dir.path().join("f")).expect("read");
        assert_eq!(after.len(), 4096);
        assert_eq!(&after[..1000], &old[..1000]);
        assert_eq!(&after[1100..], &old[1100..]);
        // [1000, 1024) and [1024, 1100) are each all old or all new.
        for (a, b) in [(1000usize, 1024usize), (1024, 1100)] {
            let part = &after[a..b];
            assert!(part == &old[a..b] || part == &new[a - 1000..b - 1000], "seed {seed}: part {a}..{b} mixed");
        }
    }
}

#[test]
fn newer_write_can_survive_an_older_lost_one() {
    use std::collections::BTreeSet;
    let mut outcomes = BTreeSet::new();
    let (v0, v1, v2) = (fill(0, 512), fill(1, 512), fill(2, 512));
    for seed in 0..64 {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = engine(seed);
        let f = e.open(&dir.path().join("f"), OpenMode::CREATE_NEW).expect("open");
        e.write_all_at(&f, &v0, 0).expect("write");
        e.sync_data(&f).expect("sync");
        e.write_all_at(&f, &v1, 0).expect("write 1");
        e.write_all_at(&f, &v2, 0).expect("write 2");
        e.power_cut();
        let after = std::fs::read(dir.path().join("f")).expect("read");
        let which = [&v0, &v1, &v2].iter().position(|v| after == **v).expect("one of the versions");
        outcomes.insert(which);
    }
    assert_eq!(outcomes.into_iter().collect::<Vec<_>>(), vec![0, 1, 2]);
}

fn cut_64_sectors(seed: u64) -> (PowerCutReport, Vec<u8>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = engine(seed);
    let f = e.open(&dir.path().join("f"), OpenMode::CREATE_NEW).expect("open");
    e.write_all_at(&f, &fill(1, 64 * 512), 0).expect("write");
    e.sync_data(&f).expect("sync");
    e.write_all_at(&f, &fill(2, 64 * 512), 0).expect("unsynced write");
    let report = e.power_cut();
    (report, std::fs::read(dir.path().join("f")).expect("read"))
}

#[test]
fn seeds_decide_the_survivors() {
    let (r1, a) = cut_64_sectors(1);
    let (_, a_again) = cut_64_sectors(1);
    let (_, b) = cut_64_sectors(2);
    assert_eq!(r1.writes_torn, 1, "a 64-sector write is torn: {r1:?}");
    assert_eq!(a, a_again, "same seed, same survivors");
    assert_ne!(a, b, "different seeds, different survivors");
}

#[test]
fn growth_is_undone_with_the_write() {
    // All reverted for some seed, all kept for another: check the length.
    let mut lens = std::collections::BTreeSet::new();
    for seed in 0..32 {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = engine(seed);
        let f = e.open(&dir.path().join("f"), OpenMode::CREATE_NEW).expect("open");
        e.write_all_at(&f, &fill(1, 1024), 0).expect("write");
        e.sync_data(&f).expect("sync");
        e.write_all_at(&f, &fill(2, 1024), 1024).expect("growing write");
        e.power_cut();
        let after = std::fs::read(dir.path().join("f")).expect("read");
        assert_eq!(&after[..1024], &fill(1, 1024)[..]);
        let new = fill(2, 1024);
        match after.len() {
            1024 => {}
            1536 => assert_eq!(&after[1024..], &new[..512]),
            2048 => assert!(
                after[1536..] == new[512..]
                    && (after[1024..1536] == new[..512] || after[1024..1536].iter().all(|&x| x == 0))
            ),
            n => panic!("unexpected length {n}"),
        }
        lens.insert(after.len());
    }
    assert!(lens.contains(&1024) && lens.contains(&2048), "{lens:?}");
}

#[test]
fn zero_ranges_are_undone_too() {
    let mut reverted = false;
    for seed in 0..16 {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = engine(seed);
        let f = e.open(&dir.path().join("f"), OpenMode::CREATE_NEW).expect("open");
        let old = fill(3, 4096);
        e.write_all_at(&f, &old, 0).expect("write");
        e.sync_data(&f).expect("sync");
        e.zero(&f, 512, 1024, true).expect("punch");
        let report = e.power_cut();
        let after = std::fs::read(dir.path().join("f")).expect("read");
        assert_eq!(after.len(), 4096);
        for (a, b) in [(512usize, 1024usize), (1024, 1536)] {
            assert!(after[a..b] == old[a..b] || after[a..b].iter().all(|&x| x == 0));
        }
        assert_eq!(&after[..512], &old[..512]);
        assert_eq!(&after[1536..], &old[1536..]);
        reverted |= report.sectors_reverted > 0 && after[512..1536] != [0u8; 1024][..];
    }
    assert!(reverted);
}

#[test]
fn only_successful_syncs_of_earlier_batches_make_data_durable() {
    let mut lost = [false; 2];
    for seed in 0..32 {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = engine(seed);
        let f = e.open(&dir.path().join("f"), OpenMode::CREATE_NEW).expect("open");
        let g = e.open(&dir.path().join("g"), OpenMode::CREATE_NEW).expect("open");
        let data = fill(4, 2048);
        // A sync in the same batch does not cover the write.
        e.submit(&mut [IoOp::Write { file: &f, offset: 0, buf: &data }, IoOp::SyncData { file: &f }]).expect("batch");
        // A failed sync covers nothing.
        e.write_all_at(&g, &data, 0).expect("write");
        e.fail_sync_after(0, libc::EIO);
        assert_eq!(errno(e.sync_data(&g)), Some(libc::EIO));
        e.power_cut();
        for (i, name) in ["f", "g"].iter().enumerate() {
            let after = std::fs::read(dir.path().join(name)).expect("read");
            lost[i] |= after != data;
        }
        // A sync in a later batch does: nothing is lost then.
        e.clear_faults();
        let h = e.open(&dir.path().join("h"), OpenMode::CREATE_NEW).expect("open");
        e.write_all_at(&h, &data, 0).expect("write");
        e.sync_data(&h).expect("sync");
        assert_eq!(e.power_cut(), PowerCutReport::default());
        assert_eq!(std::fs::read(dir.path().join("h")).expect("read"), data);
    }
    assert_eq!(lost, [true, true]);
}

/// Log-style writers on several threads, cut at a random moment: every
/// record whose sync succeeded survives; the others are whole or absent.
#[test]
fn power_cut_under_concurrent_writers() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = tempfile::tempdir().expect("tempdir");
    let inner = crate::io::select_engine(crate::io::EngineChoice::Auto).expect("engine");
    let e = FaultEngine::new(inner, 5);
    let started = AtomicBool::new(false);
    // Every writer opens its file before the cut can happen (an open
    // after the cut fails with EIO, like any other operation).
    let opened = std::sync::Barrier::new(5);
    let results: Vec<(u64, u64)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4u8)
            .map(|t| {
                let (e, dir, started, opened) = (&e, dir.path(), &started, &opened);
                s.spawn(move || {
                    let f = e.open(&dir.join(format!("log{t}")), OpenMode::CREATE_NEW).expect("open");
                    opened.wait();
                    let (mut written, mut durable) = (0u64, 0u64);
                    loop {
                        let rec = fill(t.wrapping_mul(50).wrapping_add(written as u8), SECTOR as usize);
                        if e.write_all_at(&f, &rec, written * SECTOR).is_err() {
                            break;
                        }
                        written += 1;
                        started.store(true, Ordering::Release);
                        if written % 3 == 0 {
                            if e.sync_data(&f).is_err() {
                                break;
                            }
                            durable = written;
                        }
                    }
                    (written, durable)
                })
            })
            .collect();
        opened.wait();
        while !started.load(Ordering::Acquire) {
            std::thread::yield_now();
        }
        std::thread::sleep(std::time::Duration::from_millis(30));
        e.power_cut();
        handles.into_iter().map(|h| h.join().expect("writer")).collect()
    });
    for (t, (written, durable)) in results.into_iter().enumerate() {
        let after = std::fs::read(dir.path().join(format!("log{t}"))).expect("read");
        assert!(after.len() as u64 >= durable * SECTOR, "thread {t}: synced records lost");
        assert!(after.len() as u64 <= written * SECTOR, "thread {t}: file too long");
        for (i, got) in after.chunks(SECTOR as usize).enumerate() {
            let rec = fill((t as u8).wrapping_mul(50).wrapping_add(i as u8), SECTOR as usize);
            if (i as u64) < durable {
                assert_eq!(got, &rec[..], "thread {t}: synced record {i} changed");
            } else {
                assert!(got == &rec[..] || got.iter().all(|&b| b == 0), "thread {t}: record {i} mixed");
            }
        }
    }
}

#[test]
fn parse_fault_spec_accepts_good_strings() {
    assert_eq!(parse_fault_spec(""), Ok(FaultSpec::default()));
    assert_eq!(
        parse_fault_spec("sync_error_after=3:EIO,write_error_after=100:ENOSPC"),
        Ok(FaultSpec { sync_error_after: Some((3, libc::EIO)), write_error_after: Some((100, libc::ENOSPC)), seed: 0 })
    );
    assert_eq!(
        parse_fault_spec(" seed = 7 , write_error_after=0:eio, sync_error_after=1:28 "),
        Ok(FaultSpec { sync_error_after: Some((1, 28)), write_error_after: Some((0, libc::EIO)), seed: 7 })
    );
}

#[test]
fn parse_fault_spec_names_the_bad_key() {
    for (spec, needle) in [
        ("sync_eror_after=3:EIO", "sync_eror_after"),
        ("sync_error_after=3", "sync_error_after"),
        ("sync_error_after=x:EIO", "sync_error_after"),
        ("write_error_after=1:EBOGUS", "write_error_after"),
        ("write_error_after=-1:EIO", "write_error_after"),
        ("seed=abc", "seed"),
        ("sync_error_after", "sync_error_after"),
    ] {
        let err = parse_fault_spec(spec).expect_err(spec);
        assert!(err.contains(needle) && err.contains(FAULTS_ENV), "{spec}: {err}");
    }
}

#[test]
fn wrap_with_spec_injects() {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = wrap_with_spec(Arc::new(SyncEngine::new()), "sync_error_after=1:EROFS").expect("wrap");
    let f = e.open(&dir.path().join("f"), OpenMode::CREATE_NEW).expect("open");
    e.sync_data(&f).expect("first sync");
    assert_eq!(errno(e.sync_data(&f)), Some(libc::EROFS));
    assert!(wrap_with_spec(Arc::new(SyncEngine::new()), "bogus=1").is_err());
}

/// An fdatasync makes every write of the file durable, whichever
/// descriptor wrote it (the page cache is per inode). A WAL segment
/// abandoned unsynced (a log rebase) and then recycled under a new
/// descriptor is written and synced through that one: a power cut must
/// not bring the abandoned writes' old bytes back over synced data. Found
/// by the fault campaign (seed 1000, cycle 357: a secondary refused to
/// start after a power cut, a synced WAL record reverted).
#[test]
fn a_sync_covers_writes_made_through_another_descriptor_of_the_file() {
    for seed in 0..16 {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = engine(seed);
        let path = dir.path().join("seg");
        let old = e.open(&path, OpenMode::CREATE_NEW).expect("open");
        e.write_all_at(&old, &fill(1, 4096), 0).expect("first write");
        e.sync_data(&old).expect("sync");
        e.write_all_at(&old, &fill(2, 4096), 0).expect("abandoned, never synced through this descriptor");
        let new = e.open(&path, OpenMode::READ_WRITE).expect("reopen");
        e.write_all_at(&new, &fill(3, 4096), 0).expect("write through the new descriptor");
        e.sync_data(&new).expect("sync through the new descriptor");
        e.power_cut();
        let after = std::fs::read(&path).expect("read");
        assert_eq!(after, fill(3, 4096), "seed {seed}: synced data changed by the power cut");
    }
}

#[test]
fn a_trigger_file_arms_a_fault_while_running() {
    let dir = tempfile::tempdir().expect("tempdir");
    let trigger = dir.path().join("trigger");
    let spec = format!("seed=3,trigger={}", trigger.display());
    let e = wrap_with_spec(Arc::new(SyncEngine::new()), &spec).expect("wrap");
    let f = e.open(&dir.path().join("f"), OpenMode::CREATE_NEW).expect("open");
    e.write_all_at(&f, &fill(1, 512), 0).expect("write before the trigger");
    std::fs::write(&trigger, "write_error_after=1:ENOSPC\n").expect("trigger");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while trigger.exists() {
        assert!(std::time::Instant::now() < deadline, "the trigger file was never taken");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // The file is removed just before the fault is armed.
    std::thread::sleep(std::time::Duration::from_millis(50));
    e.write_all_at(&f, &fill(2, 512), 0).expect("the one write still allowed");
    assert_eq!(errno(e.write_all_at(&f, &fill(3, 512), 0)), Some(libc::ENOSPC));
    assert!(wrap_with_spec(Arc::new(SyncEngine::new()), "trigger=").is_err());
}

#[test]
fn wrap_from_env_unset_returns_the_engine() {
    if std::env::var_os(FAULTS_ENV).is_some() {
        eprintln!("skipped: {FAULTS_ENV} is set for this run");
        return;
    }
    let inner: Arc<dyn IoEngine> = Arc::new(SyncEngine::new());
    let wrapped = wrap_from_env(inner.clone()).expect("no spec");
    assert!(Arc::ptr_eq(&inner, &wrapped));
}

#[test]
fn range_set_gaps() {
    let mut r = RangeSet::default();
    assert_eq!(r.gaps(0, 10), vec![(0, 10)]);
    r.insert(2, 4);
    r.insert(6, 8);
    assert_eq!(r.gaps(0, 10), vec![(0, 2), (4, 6), (8, 10)]);
    assert_eq!(r.gaps(3, 7), vec![(4, 6)]);
    r.insert(4, 6);
    assert_eq!(r.gaps(0, 10), vec![(0, 2), (8, 10)]);
    assert_eq!(r.ranges.len(), 1, "adjacent ranges merge");
    assert_eq!(r.gaps(2, 8), vec![]);
    r.insert(0, 100);
    assert_eq!(r.gaps(50, 60), vec![]);
    assert_eq!(r.gaps(90, 110), vec![(100, 110)]);
}

#[test]
fn sector_parts_split_at_boundaries() {
    assert_eq!(sector_parts(1000, 100).collect::<Vec<_>>(), vec![(1000, 1024), (1024, 1100)]);
    assert_eq!(sector_parts(0, 1024).collect::<Vec<_>>(), vec![(0, 512), (512, 1024)]);
    assert_eq!(sector_parts(5, 0).count(), 0);
}
