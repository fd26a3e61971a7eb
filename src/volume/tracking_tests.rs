//! Volume-level tests of out-of-sync tracking: local writes set bits, the
//! unacked ring, persistence at checkpoints and close, recovery re-marking
//! after a crash (drop without close, power cut), torn bitmap pages,
//! granularity mismatch, and mark-before-drop under the retention bound.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;

use crate::io::fault::FaultEngine;
use crate::io::sync::SyncEngine;
use crate::volume::tests::{create, identity, small_opts};
use crate::volume::*;

const MIB: u64 = 1 << 20;
const G: u64 = 4096;

fn data(seed: u8, len: usize) -> Bytes {
    Bytes::from(vec![seed; len])
}

fn open(io: Arc<dyn IoEngine>, dir: &Path, size: u64) -> Arc<Volume> {
    Volume::open(io, small_opts(dir), &identity(size)).expect("open")
}

/// A new volume of `size` in a temporary directory, opened through a
/// fault-injecting engine (seeded) for power cuts.
fn fresh_with_faults(size: u64, seed: u64) -> (tempfile::TempDir, Arc<FaultEngine>, Arc<Volume>) {
    let d = tempfile::tempdir().unwrap();
    create(&SyncEngine::new(), &small_opts(d.path()), size);
    let fault = FaultEngine::new(Arc::new(SyncEngine::new()), seed);
    let v = open(fault.clone(), d.path(), size);
    (d, fault, v)
}

/// The block indexes whose bits are set.
fn set_blocks(v: &Volume) -> Vec<u64> {
    let mut out = Vec::new();
    for (i, w) in v.bitmap_words().iter().enumerate() {
        for b in 0..64 {
            if w & (1 << b) != 0 {
                out.push(i as u64 * 64 + b);
            }
        }
    }
    out
}

#[tokio::test]
async fn tracking_marks_every_kind_of_local_write_and_persists_at_close() {
    let d = tempfile::tempdir().unwrap();
    let io: Arc<dyn IoEngine> = Arc::new(SyncEngine::new());
    let size = 16 * MIB;
    create(&*io, &small_opts(d.path()), size);
    let v = open(io.clone(), d.path(), size);
    assert!(v.tracking(), "tracking is on at open");
    assert_eq!((v.dirty_bytes(), v.bitmap_granularity()), (0, 4096));
    v.write(100, data(1, 10), false).await.unwrap(); // block 0
    v.trim(MIB, 8192, false).await.unwrap(); // blocks 256, 257
    v.write_zeroes(2 * MIB + 1, 4096, false, false).await.unwrap(); // 512, 513
    v.write(4 * MIB, data(2, 256 << 10), false).await.unwrap(); // in place: 1024..1088
    let mut want = vec![0, 256, 257, 512, 513];
    want.extend(1024..1088);
    assert_eq!(set_blocks(&v), want);
    assert_eq!(v.dirty_bytes(), want.len() as u64 * G);
    assert_eq!(v.dirty_runs(0, MIB), Some((0, G)));
    assert_eq!(v.dirty_runs(G, MIB), Some((MIB, 2 * G)));
    assert_eq!(v.dirty_runs(4 * MIB, 64 << 10), Some((4 * MIB, 64 << 10)));
    v.close().await.unwrap();
    drop(v);

    let v = open(io.clone(), d.path(), size);
    // Recovery re-marks the records of the replay segment (their bits are
    // set already): nothing changes.
    assert_eq!(set_blocks(&v), want, "persisted at close");
    // Clearing is persisted too (at the next checkpoint or close).
    v.clear_range(0, 4 * MIB);
    v.close().await.unwrap();
    drop(v);
    let v = open(io, d.path(), size);
    assert_eq!(set_blocks(&v), (1024..1088).collect::<Vec<_>>());
    v.close().await.unwrap();
}

#[tokio::test]
async fn ring_keeps_unacked_records_until_the_peer_acks_or_the_link_drops() {
    let d = tempfile::tempdir().unwrap();
    let io: Arc<dyn IoEngine> = Arc::new(SyncEngine::new());
    let size = 8 * MIB;
    create(&*io, &small_opts(d.path()), size);
    let v = open(io, d.path(), size);
    v.set_tracking(false);
    let mut lsns = Vec::new();
    for i in 0..6u64 {
        lsns.push(v.write(i * G * 10, data(i as u8, 4096), false).await.unwrap());
    }
    assert_eq!(v.dirty_bytes(), 0, "a connected peer receives them: no bits");
    assert_eq!(v.unacked_records(), 6);
    v.set_peer_written(lsns[2]);
    assert_eq!(v.unacked_records(), 3);
    v.set_peer_written(lsns[0]);
    assert_eq!((v.unacked_records(), v.peer_written_lsn()), (3, lsns[2]), "monotone");
    v.mark_unacked().unwrap();
    assert!(v.tracking());
    assert_eq!(set_blocks(&v), vec![30, 40, 50], "only what the peer had not written");
    assert_eq!(v.bitmap_base_lsn(), lsns[2]);
    // Tracking again: new writes set bits directly.
    v.write(G, data(9, 1), false).await.unwrap();
    assert_eq!(set_blocks(&v), vec![1, 30, 40, 50]);
    // Records applied from the peer are never tracked.
    v.clear_range(0, size);
    let next = v.status().local_lsn + 1;
    v.apply(next, FeedOp::Write { offset: 0, data: data(3, 4096) }, false).await.unwrap();
    assert_eq!(v.dirty_bytes(), 0);
    // Whole-volume operations.
    v.mark_all().unwrap();
    assert_eq!(v.dirty_bytes(), size);
    let words = v.bitmap_words();
    v.clear_range(0, size);
    v.merge_bitmap_words(1, &words[1..2]).unwrap();
    assert_eq!(v.dirty_bytes(), 64 * G);
    assert!(v.merge_bitmap_words(words.len() as u64, &[1]).is_err());
    v.mark_range(size - 1, 1);
    assert_eq!(v.dirty_runs(64 * 2 * G, MIB), Some((size - G, G)));
    v.close().await.unwrap();
}

/// Writes with the link up (ring mode), a checkpoint that persists the
/// peer's written LSN, more writes, then a crash: recovery re-marks exactly
/// the records above the persisted peer written LSN.
async fn crash_then_recovery_remarks(power_cut: bool) {
    let size = 8 * MIB;
    let (d, fault, v) = fresh_with_faults(size, 11);
    v.set_tracking(false);
    let mut lsns = Vec::new();
    for i in 0..8u64 {
        // FUA: durable in the WAL, so a power cut keeps them too.
        lsns.push(v.write(i * G, data(i as u8 + 1, 4096), true).await.unwrap());
    }
    v.set_peer_written(lsns[2]);
    v.finish_sync().await.unwrap(); // a checkpoint: peer_written = lsns[2] persisted
    assert_eq!(v.superblock().peer_written_lsn, lsns[2]);
    v.set_peer_written(lsns[5]); // not persisted before the crash
    v.write(20 * G, data(50, 4096), true).await.unwrap();
    assert_eq!(v.dirty_bytes(), 0);
    if power_cut {
        fault.power_cut();
    }
    drop(v);

    let v = open(Arc::new(SyncEngine::new()), d.path(), size);
    assert!(v.tracking());
    assert_eq!(set_blocks(&v), vec![3, 4, 5, 6, 7, 20], "records above the persisted peer written LSN");
    assert_eq!(v.recovery().marked, 6);
    assert_eq!(v.bitmap_base_lsn(), lsns[2]);
    for i in 0..8u64 {
        assert_eq!(v.read(i * G, 4096).await.unwrap(), data(i as u8 + 1, 4096));
    }
    v.close().await.unwrap();
    drop(v);
    // The re-marked bits were persisted: a second open finds them without
    // the WAL (the old segments are gone).
    let v = open(Arc::new(SyncEngine::new()), d.path(), size);
    assert_eq!(v.recovery().marked, 0);
    assert_eq!(set_blocks(&v), vec![3, 4, 5, 6, 7, 20]);
    v.close().await.unwrap();
}

#[tokio::test]
async fn crash_without_close_remarks_records_past_peer_written() {
    crash_then_recovery_remarks(false).await;
}

#[tokio::test]
async fn power_cut_remarks_records_past_peer_written() {
    crash_then_recovery_remarks(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_marks_records_in_retained_segments_older_than_the_replay_start() {
    let d = tempfile::tempdir().unwrap();
    let size = 8 * MIB;
    let mut opts = small_opts(d.path());
    opts.wal_segment_size = 64 << 10;
    create(&SyncEngine::new(), &opts, size);
    let io: Arc<dyn IoEngine> = Arc::new(SyncEngine::new());
    let v = Volume::open(io.clone(), opts.clone(), &identity(size)).unwrap();
    v.set_tracking(false);
    v.set_retain_after(Some(0)); // the peer made nothing durable
    let mut lsns = Vec::new();
    for i in 0..40u64 {
        lsns.push(v.write(i * G, data(i as u8, 8192), false).await.unwrap());
    }
    v.set_peer_written(lsns[9]);
    v.finish_sync().await.unwrap();
    let segs = std::fs::read_dir(opts.wal_dir())
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_str().unwrap().chars().next().unwrap().is_ascii_digit());
    assert!(segs.count() >= 4, "the hold keeps the old segments");
    assert!(v.superblock().replay_seq > 2);
    drop(v); // crash: records 11..=40 are only in the WAL, most before replay_seq

    let v = Volume::open(io, opts, &identity(size)).unwrap();
    assert_eq!(v.recovery().marked, 30);
    // Each 8 KiB write touches blocks i and i + 1.
    assert_eq!(set_blocks(&v), (10..41).collect::<Vec<_>>());
    v.close().await.unwrap();
}

#[tokio::test]
async fn torn_bitmap_page_reads_as_all_ones_and_is_rewritten() {
    let d = tempfile::tempdir().unwrap();
    let io: Arc<dyn IoEngine> = Arc::new(SyncEngine::new());
    let size = 8 * MIB + 4096; // 1025 blocks of 8 KiB: one page, the last block short
    let mut opts = small_opts(d.path());
    opts.bitmap_granularity = 8192;
    create(&*io, &opts, size);
    let v = Volume::open(io.clone(), opts.clone(), &identity(size)).unwrap();
    v.write(0, data(1, 4096), false).await.unwrap();
    v.close().await.unwrap();
    drop(v);
    let meta = io.open(&opts.meta_path(), crate::io::OpenMode::READ_WRITE).unwrap();
    io.write_all_at(&meta, &[0x5a; 100], meta::BITMAP_OFFSET + 8).unwrap();
    let v = Volume::open(io.clone(), opts.clone(), &identity(size)).unwrap();
    assert_eq!(v.dirty_bytes(), size, "every block the page covers may differ");
    v.close().await.unwrap();
    drop(v);
    let v = Volume::open(io.clone(), opts.clone(), &identity(size)).unwrap();
    assert_eq!(v.dirty_bytes(), size, "rewritten with a valid CRC, still all ones");
    v.close().await.unwrap();
    drop(v);
    // Another granularity in the config than at create-md is refused.
    opts.bitmap_granularity = 4096;
    let err = Volume::open(io, opts, &identity(size)).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, VolumeError::Mismatch { field: "bitmap_granularity", .. }), "{err:?}");
    assert!(msg.contains("8192") && msg.contains("4096"), "{msg}");
}

#[tokio::test]
async fn create_md_takes_the_granularity_and_sizes_the_meta_file() {
    let d = tempfile::tempdir().unwrap();
    let io: Arc<dyn IoEngine> = Arc::new(SyncEngine::new());
    let size = 1 << 30;
    let mut opts = small_opts(d.path());
    opts.bitmap_granularity = 64 << 10;
    create(&*io, &opts, size);
    let len = std::fs::metadata(opts.meta_path()).unwrap().len();
    assert_eq!(len, meta::meta_file_size(size, 64 << 10));
    assert_eq!(len, 8192 + 4096, "16384 bits fit one page");
    let v = Volume::open(io, opts.clone(), &identity(size)).unwrap();
    assert_eq!(v.bitmap_granularity(), 64 << 10);
    assert!(v.superblock().gen_created_ms > 1_600_000_000_000);
    v.write(100 << 10, data(1, 1), false).await.unwrap();
    assert_eq!(v.dirty_runs(0, u64::MAX), Some((64 << 10, 64 << 10)));
    v.close().await.unwrap();
    opts.bitmap_granularity = 3000;
    let err = create_md(
        &SyncEngine::new(),
        &opts,
        &CreateOptions { resource: "r0".into(), node: "alpha".into(), size, block_size: 4096, force: true },
    )
    .unwrap_err();
    assert!(err.to_string().contains("bitmap_granularity"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_bound_marks_records_before_dropping_them() {
    let d = tempfile::tempdir().unwrap();
    let size = 8 * MIB;
    let mut opts = small_opts(d.path());
    opts.wal_segment_size = 64 << 10;
    opts.wal_retain = 128 << 10;
    create(&SyncEngine::new(), &opts, size);
    let io: Arc<dyn IoEngine> = Arc::new(SyncEngine::new());
    let v = Volume::open(io.clone(), opts.clone(), &identity(size)).unwrap();
    v.set_tracking(false); // a peer is connected, acks nothing
    v.set_retain_after(Some(0));
    for i in 0..100u64 {
        v.write(i * 2 * G, data(i as u8, 4096), false).await.unwrap();
    }
    v.finish_sync().await.unwrap();
    assert!(v.retention_lifted(), "100 records of 4 KiB exceed 128 KiB");
    let first = v.log_first_lsn();
    assert!(first > 1, "the oldest records were dropped (log starts at {first})");
    // Every dropped record has its bit, before anything else happened.
    let marked = set_blocks(&v);
    assert_eq!(marked, (0..first - 1).map(|i| i * 2).collect::<Vec<_>>());
    assert_eq!(v.unacked_records() as u64, 100 - (first - 1));
    drop(v); // crash: the dropped records' bits must come from the persisted bitmap

    let v = Volume::open(io, opts, &identity(size)).unwrap();
    assert_eq!(set_blocks(&v), (0..100).map(|i| i * 2).collect::<Vec<_>>());
    v.close().await.unwrap();
}

#[tokio::test]
async fn sync_data_file_makes_resync_data_durable_and_safe_from_replay() {
    for sync in [false, true] {
        let size = 4 * MIB;
        let (d, fault, v) = fresh_with_faults(size, 5);
        // An older record, then resync data over it (a bitmap resync target).
        v.apply(1, FeedOp::Write { offset: 0, data: data(1, 8192) }, true).await.unwrap();
        v.apply_sync_data(0, data(2, 8192)).await.unwrap();
        if sync {
            v.sync_data_file().await.unwrap();
        }
        fault.power_cut();
        drop(v);
        let v = open(Arc::new(SyncEngine::new()), d.path(), size);
        let got = v.read(0, 8192).await.unwrap();
        if sync {
            assert_eq!(got, data(2, 8192), "durable and never overwritten by the older record");
            assert_eq!(v.recovery().replayed, 0);
        } else {
            assert_eq!(got, data(1, 8192), "without it, replay puts the older record back");
        }
        v.close().await.unwrap();
        assert!(matches!(v.sync_data_file().await, Err(VolumeError::Stopped(_))));
    }
}

/// Issue 14: a node that wrote as primary and then received the peer's
/// records (a switchover) does not re-mark its own older records after a
/// crash: the peer had them when it streamed its later ones. Its own
/// records after the peer's are still marked.
#[tokio::test]
async fn own_records_older_than_the_peers_are_not_re_marked_after_a_crash() {
    let d = tempfile::tempdir().unwrap();
    let size = 4 * MIB;
    create(&SyncEngine::new(), &small_opts(d.path()), size);
    let io: Arc<dyn IoEngine> = Arc::new(SyncEngine::new());
    let v = open(io.clone(), d.path(), size);
    for lsn in 1..=3u64 {
        v.write(lsn * G, data(lsn as u8, 4096), false).await.unwrap();
    }
    for lsn in 4..=6u64 {
        v.apply(lsn, FeedOp::Write { offset: lsn * G, data: data(lsn as u8, 4096) }, false).await.unwrap();
    }
    drop(v); // crash
    let v = open(io.clone(), d.path(), size);
    assert_eq!((v.recovery().marked, v.recovery().from_peer_lsn), (0, 6), "{:?}", v.recovery());
    assert_eq!(set_blocks(&v), Vec::<u64>::new(), "nothing the peer lacks");
    // Promoted again, it writes: that record is after the peer's and is marked.
    v.write(9 * G, data(9, 4096), false).await.unwrap();
    drop(v);
    let v = open(io, d.path(), size);
    assert_eq!(v.recovery().marked, 1, "{:?}", v.recovery());
    assert_eq!(set_blocks(&v), vec![9]);
}

#[tokio::test]
async fn replicated_records_are_never_marked_and_move_the_base() {
    let d = tempfile::tempdir().unwrap();
    let size = 4 * MIB;
    create(&SyncEngine::new(), &small_opts(d.path()), size);
    let io: Arc<dyn IoEngine> = Arc::new(SyncEngine::new());
    let v = open(io.clone(), d.path(), size);
    // A secondary: every record comes from the primary.
    for lsn in 1..=5u64 {
        v.apply(lsn, FeedOp::Write { offset: lsn * G, data: data(lsn as u8, 4096) }, false).await.unwrap();
    }
    v.apply(6, FeedOp::Trim { offset: 0, len: 4096 }, true).await.unwrap();
    assert_eq!(v.dirty_bytes(), 0);
    assert_eq!((v.peer_written_lsn(), v.bitmap_base_lsn()), (6, 6));
    drop(v); // crash: recovery finds them in the WAL, flagged as the peer's

    let v = open(io.clone(), d.path(), size);
    assert_eq!((v.recovery().marked, v.recovery().from_peer_lsn), (0, 6));
    assert_eq!(v.dirty_bytes(), 0, "a restarted secondary has nothing out of sync");
    assert_eq!((v.peer_written_lsn(), v.bitmap_base_lsn()), (6, 6));
    // Promoted: its own writes are tracked; the bitmap covers LSNs > 6, so
    // an old primary whose log ends below 6 needs a full sync.
    v.write(10 * G, data(9, 4096), false).await.unwrap();
    assert_eq!(set_blocks(&v), vec![10]);
    assert_eq!(v.bitmap_base_lsn(), 6);
    drop(v);
    let v = open(io, d.path(), size);
    assert_eq!(set_blocks(&v), vec![10], "the local record is re-marked, the replicated ones are not");
    assert_eq!(v.superblock().peer_written_lsn, 6);
    v.close().await.unwrap();
}

/// Random workloads with the link going up and down (tracking off/on,
/// acknowledgements, link loss), checkpoints, a small retention bound that
/// drops held segments, then a power cut. After recovery, every block
/// written by a durable local record the "peer" had not acknowledged as
/// written must be marked: the bitmap's crash-safety invariant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cut_after_random_link_history_never_loses_a_mark() {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    for seed in 0..12u64 {
        let d = tempfile::tempdir().unwrap();
        let size = 4 * MIB;
        let mut opts = small_opts(d.path());
        opts.wal_segment_size = 64 << 10;
        opts.wal_retain = [0, 64 << 10, 256 << 10][seed as usize % 3];
        create(&SyncEngine::new(), &opts, size);
        let fault = FaultEngine::new(Arc::new(SyncEngine::new()), seed);
        let v = Volume::open(fault.clone(), opts.clone(), &identity(size)).unwrap();
        let mut rng = StdRng::seed_from_u64(seed);
        // (lsn, offset, len) of every local record.
        let mut records: Vec<(u64, u64, u64)> = Vec::new();
        let mut acked = 0u64;
        for _ in 0..300 {
            match rng.random_range(0..100) {
                0..70 => {
                    let off = rng.random_range(0..size / 512) * 512;
                    let len = rng.random_range(1..=16u64).min((size - off) / 512) * 512;
                    let fua = rng.random_bool(0.3);
                    let lsn = if rng.random_bool(0.8) {
                        v.write(off, data(7, len as usize), fua).await.unwrap()
                    } else {
                        v.trim(off, len as u32, fua).await.unwrap()
                    };
                    records.push((lsn, off, len));
                }
                70..78 if v.tracking() => {
                    // Link up: the peer has everything so far (a resync
                    // ended), records go to the ring.
                    let local = v.status().local_lsn;
                    v.set_peer_written(local);
                    acked = acked.max(local);
                    v.set_retain_after(Some(acked));
                    v.set_tracking(false);
                }
                78..88 if !v.tracking() => {
                    let local = v.status().local_lsn;
                    let upto = rng.random_range(acked..=local);
                    v.set_peer_written(upto);
                    acked = upto;
                    v.set_retain_after(Some(upto));
                }
                88..92 if !v.tracking() => {
                    v.mark_unacked().unwrap();
                    v.set_retain_after(None);
                }
                92..97 => v.finish_sync().await.unwrap(),
                _ => {}
            }
        }
        // End with the link up and a peer that acknowledges nothing more:
        // the checkpoint drops held segments (beyond wal_retain) whose
        // records only the ring knew about.
        if v.tracking() {
            let local = v.status().local_lsn;
            v.set_peer_written(local);
            acked = acked.max(local);
            v.set_retain_after(Some(acked));
            v.set_tracking(false);
        }
        for i in 0..40u64 {
            let off = (i * 37 % 1000) * G;
            records.push((v.write(off, data(8, 8192), false).await.unwrap(), off, 8192));
        }
        v.finish_sync().await.unwrap();
        let durable = v.flush().await.unwrap();
        fault.power_cut();
        drop(v);
        let v = Volume::open(Arc::new(SyncEngine::new()), opts, &identity(size)).unwrap();
        let words = v.bitmap_words();
        let bit = |b: u64| words[(b / 64) as usize] & (1 << (b % 64)) != 0;
        for &(lsn, off, len) in records.iter().filter(|r| r.0 > acked && r.0 <= durable) {
            for b in off / G..=(off + len - 1) / G {
                assert!(bit(b), "seed {seed}: block {b} of record LSN {lsn} (acked {acked}) is not marked");
            }
        }
        v.close().await.unwrap();
    }
}

#[tokio::test]
async fn sync_data_file_without_new_records_only_syncs_the_data() {
    let size = 4 * MIB;
    let (d, fault, v) = fresh_with_faults(size, 3);
    v.apply(1, FeedOp::Write { offset: 0, data: data(1, 8192) }, true).await.unwrap();
    v.sync_data_file().await.unwrap(); // a checkpoint at LSN 1
    let counter = v.superblock().counter;
    v.apply_sync_data(0, data(2, 8192)).await.unwrap();
    v.sync_data_file().await.unwrap();
    assert_eq!(v.superblock().counter, counter, "no superblock write without a new record");
    fault.power_cut();
    drop(v);
    let v = open(Arc::new(SyncEngine::new()), d.path(), size);
    assert_eq!(v.read(0, 8192).await.unwrap(), data(2, 8192), "the sync data is durable");
    v.close().await.unwrap();
}

/// Marks no record explains (verify, a merged bitmap, a full sync) are
/// flagged in the superblock as soon as the bits are on disk, survive a
/// power cut, and the flag goes once the bitmap is empty.
#[tokio::test]
async fn foreign_marks_are_flagged_on_disk_until_the_bitmap_empties() {
    let size = 8 * MIB;
    let (d, fault, v) = fresh_with_faults(size, 12);
    v.write(0, data(1, 4096), true).await.unwrap();
    let n = v.mark_count();
    assert!(!v.has_foreign_marks(), "a tracked write is explained by its record");
    assert_eq!(v.mark_count(), n, "a tracked write is not counted");
    v.mark_range(5 * G, G);
    assert!(v.has_foreign_marks());
    assert!(v.mark_count() > n);
    v.persist_bitmap().unwrap();
    assert_ne!(v.superblock().flags & meta::FLAG_FOREIGN_MARKS, 0, "flagged with the bits, not at the next checkpoint");
    fault.power_cut();
    drop(v);

    let v = open(Arc::new(SyncEngine::new()), d.path(), size);
    assert!(v.has_foreign_marks(), "the flag survives a power cut");
    assert_eq!(set_blocks(&v), vec![0, 5]);
    v.clear_range(0, G);
    assert!(v.has_foreign_marks(), "a bit is still set");
    v.clear_range(5 * G, G);
    assert!(!v.has_foreign_marks(), "an empty bitmap holds no foreign marks");
    v.close().await.unwrap();
    drop(v);
    let v = open(Arc::new(SyncEngine::new()), d.path(), size);
    assert_eq!(v.superblock().flags & meta::FLAG_FOREIGN_MARKS, 0, "cleared on disk by the checkpoint at close");
    assert!(!v.has_foreign_marks());
    v.close().await.unwrap();
}
