//! Volume-level tests: the async API against a reference model, reopen
//! after close and after a crash (drop without close), checkpoints and
//! segment recycling, recovery on every truncation point, torn tail versus
//! corruption, metadata errors.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::io::sync::SyncEngine;

const MIB: u64 = 1 << 20;

pub(crate) fn small_opts(dir: &Path) -> VolumeOptions {
    VolumeOptions {
        dir: dir.to_path_buf(),
        disk: None,
        wal_segment_size: 256 << 10,
        checkpoint_bytes: 64 * MIB,
        checkpoint_interval: Duration::from_secs(3600),
        bitmap_granularity: DEFAULT_BITMAP_GRANULARITY,
        wal_retain: DEFAULT_WAL_RETAIN,
        al_extents: crate::volume::al::DEFAULT_EXTENTS,
    }
}

pub(crate) fn identity(size: u64) -> Identity {
    Identity { resource: "r0".into(), node: "alpha".into(), size }
}

pub(crate) fn create(io: &dyn IoEngine, opts: &VolumeOptions, size: u64) {
    create_md(
        io,
        opts,
        &CreateOptions { resource: "r0".into(), node: "alpha".into(), size, block_size: 4096, force: false },
    )
    .expect("create_md");
}

fn engine() -> Arc<dyn IoEngine> {
    Arc::new(SyncEngine::new())
}

/// Every engine that runs here: sync, and io_uring when the probe allows it
/// (containers' seccomp profiles often forbid it; that is logged).
pub(crate) fn engines() -> Vec<Arc<dyn IoEngine>> {
    let mut v: Vec<Arc<dyn IoEngine>> = vec![Arc::new(SyncEngine::new())];
    match crate::io::uring::probe() {
        Ok(()) => v.push(Arc::new(crate::io::uring::UringEngine::new())),
        Err(e) => eprintln!("io_uring unavailable, its variant of this test is skipped: {e}"),
    }
    v
}

fn block(seed: u64, len: usize) -> Bytes {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    rng.fill(&mut v[..]);
    Bytes::from(v)
}

fn wal_files(dir: &Path) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let l = segment::list_dir(&dir.join("wal")).unwrap();
    (l.segments.into_values().collect(), l.spares)
}

#[tokio::test]
async fn create_open_write_read_flush_close_reopen() {
    let d = tempfile::tempdir().unwrap();
    let opts = small_opts(d.path());
    let io = engine();
    create(&*io, &opts, 8 * MIB);
    let v = Volume::open(io.clone(), opts.clone(), &identity(8 * MIB)).unwrap();
    assert_eq!(v.size(), 8 * MIB);
    assert_eq!(v.superblock().disk_state, DiskState::Inconsistent);
    assert!(!v.superblock().clean_shutdown());

    let a = block(1, 4096);
    let lsn1 = v.write(0, a.clone(), false).await.unwrap();
    let lsn2 = v.write(8192, block(2, 100), true).await.unwrap();
    assert_eq!((lsn1, lsn2), (1, 2));
    assert!(v.status().durable_lsn >= 2, "FUA write is durable on completion");
    assert_eq!(v.read(0, 4096).await.unwrap(), a);
    assert_eq!(v.read(8192, 100).await.unwrap(), block(2, 100));
    assert_eq!(v.read(4096, 4096).await.unwrap(), Bytes::from(vec![0u8; 4096]));
    let t = v.trim(0, 2048, false).await.unwrap();
    assert_eq!(t, 3);
    let z = v.write_zeroes(8192, 50, false, false).await.unwrap();
    assert_eq!(z, 4);
    assert_eq!(v.flush().await.unwrap(), 4);
    let st = v.status();
    assert_eq!((st.local_lsn, st.durable_lsn, st.failed), (4, 4, None));

    v.update_superblock(|sb| sb.disk_state = DiskState::UpToDate).unwrap();
    // One directory, one open volume.
    let busy = Volume::open(io.clone(), opts.clone(), &identity(8 * MIB)).unwrap_err();
    assert!(matches!(busy, VolumeError::InUse { .. }), "{busy}");
    let busy = create_md(
        &*io,
        &opts,
        &CreateOptions { resource: "r0".into(), node: "alpha".into(), size: MIB, block_size: 4096, force: true },
    )
    .unwrap_err();
    assert!(busy.to_string().contains("in use"), "{busy}");
    v.close().await.unwrap();
    assert!(matches!(v.write(0, a.clone(), false).await, Err(VolumeError::Stopped(_))));
    assert!(matches!(v.update_superblock(|_| {}), Err(VolumeError::Stopped(_))));
    // After close the directory may be opened again, before the drop.
    let again = Volume::open(io.clone(), opts.clone(), &identity(8 * MIB)).unwrap();
    again.close().await.unwrap();
    drop(again);
    drop(v);

    let v = Volume::open(io.clone(), opts.clone(), &identity(8 * MIB)).unwrap();
    assert_eq!(v.recovery().replayed, 0, "clean close leaves nothing to replay");
    assert_eq!(v.recovery().last_lsn, 4);
    assert_eq!(v.superblock().disk_state, DiskState::UpToDate);
    let mut expect = a.to_vec();
    expect[..2048].fill(0);
    assert_eq!(v.read(0, 4096).await.unwrap(), Bytes::from(expect));
    let mut expect = block(2, 100).to_vec();
    expect[..50].fill(0);
    assert_eq!(v.read(8192, 100).await.unwrap(), Bytes::from(expect));
    // LSNs continue after a reopen.
    assert_eq!(v.write(0, a.clone(), false).await.unwrap(), 5);
    v.close().await.unwrap();
}

#[tokio::test]
async fn out_of_range_requests_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let opts = small_opts(d.path());
    let io = engine();
    create(&*io, &opts, MIB);
    let v = Volume::open(io, opts, &identity(MIB)).unwrap();
    let e = v.write(MIB - 10, block(1, 11), false).await.unwrap_err();
    assert!(matches!(e, VolumeError::OutOfRange { offset, len: 11, size } if offset == MIB - 10 && size == MIB));
    assert!(matches!(v.read(u64::MAX - 1, 4).await, Err(VolumeError::OutOfRange { .. })));
    assert!(matches!(v.trim(MIB, 1, false).await, Err(VolumeError::OutOfRange { .. })));
    assert!(matches!(v.write_zeroes(0, (MIB + 1) as u32, true, false).await, Err(VolumeError::OutOfRange { .. })));
    v.write(MIB - 10, block(1, 10), false).await.unwrap();
    v.close().await.unwrap();
}

#[tokio::test]
async fn metadata_errors_name_what_is_wrong() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("node");
    let opts = small_opts(&dir);
    let io = engine();
    let e = Volume::open(io.clone(), opts.clone(), &identity(MIB)).unwrap_err();
    assert!(matches!(e, VolumeError::NoMetadata { .. }), "{e}");
    create(&*io, &opts, MIB);
    assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
    let again = create_md(
        &*io,
        &opts,
        &CreateOptions { resource: "r0".into(), node: "alpha".into(), size: MIB, block_size: 4096, force: false },
    )
    .unwrap_err();
    assert!(again.to_string().contains(&opts.meta_path().display().to_string()), "{again}");
    assert!(again.to_string().contains("--force"), "{again}");

    let e =
        Volume::open(io.clone(), opts.clone(), &Identity { resource: "r1".into(), node: "alpha".into(), size: MIB })
            .unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("resource is r0 in the metadata but r1 in the config"), "{msg}");
    let e = Volume::open(io.clone(), opts.clone(), &Identity { resource: "r0".into(), node: "beta".into(), size: MIB })
        .unwrap_err();
    assert!(e.to_string().contains("node is alpha in the metadata but beta in the config"), "{e}");
    let e = Volume::open(io.clone(), opts.clone(), &identity(2 * MIB)).unwrap_err();
    assert!(e.to_string().contains("size is 1048576 in the metadata but 2097152 in the config"), "{e}");

    // force re-creates (new uuid), and the data file keeps its size.
    let old_uuid = {
        let v = Volume::open(io.clone(), opts.clone(), &identity(MIB)).unwrap();
        v.write(0, block(3, 4096), true).await.unwrap();
        let u = v.superblock().uuid;
        v.close().await.unwrap();
        u
    };
    create_md(
        &*io,
        &opts,
        &CreateOptions { resource: "r0".into(), node: "alpha".into(), size: MIB, block_size: 4096, force: true },
    )
    .unwrap();
    let v = Volume::open(io.clone(), opts.clone(), &identity(MIB)).unwrap();
    assert_ne!(v.superblock().uuid, old_uuid);
    assert_eq!(v.recovery().last_lsn, 0);
    v.close().await.unwrap();

    // A disk smaller than the volume.
    let disk = d.path().join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(MIB / 2).unwrap();
    let mut o2 = small_opts(&d.path().join("node2"));
    o2.disk = Some(disk.clone());
    let e = create_md(
        &*io,
        &o2,
        &CreateOptions { resource: "r0".into(), node: "alpha".into(), size: MIB, block_size: 4096, force: false },
    )
    .unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("disk.img") && msg.contains("524288") && msg.contains("1048576"), "{msg}");

    // Bad sizes and names.
    let bad = |size, block_size, node: &str| {
        create_md(
            &*io,
            &small_opts(&d.path().join("node3")),
            &CreateOptions { resource: "r0".into(), node: node.into(), size, block_size, force: false },
        )
        .unwrap_err()
        .to_string()
    };
    assert!(bad(1000, 4096, "a").contains("size"));
    assert!(bad(MIB, 1000, "a").contains("block_size"));
    assert!(bad(MIB, 4096, &"n".repeat(65)).contains("node name"));
}

use std::os::unix::fs::PermissionsExt;

#[tokio::test]
async fn disk_option_keeps_data_on_the_given_file() {
    let d = tempfile::tempdir().unwrap();
    let disk = d.path().join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(2 * MIB).unwrap();
    let mut opts = small_opts(&d.path().join("node"));
    opts.disk = Some(disk.clone());
    let io = engine();
    create(&*io, &opts, MIB);
    assert!(!opts.dir.join("data").exists());
    let v = Volume::open(io, opts, &identity(MIB)).unwrap();
    v.write(4096, block(9, 4096), true).await.unwrap();
    v.close().await.unwrap();
    let raw = std::fs::read(&disk).unwrap();
    assert_eq!(&raw[4096..8192], &block(9, 4096)[..]);
}

/// A deterministic reference model: each task owns the blocks `b` with
/// `b % TASKS == task`, so the final content does not depend on the
/// interleaving.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_and_flushes_match_a_model_and_survive_reopen() {
    for io in engines() {
        concurrent_model(io).await;
    }
}

async fn concurrent_model(io: Arc<dyn IoEngine>) {
    const TASKS: u64 = 8;
    const BLOCKS: u64 = 256;
    const BS: u64 = 4096;
    let d = tempfile::tempdir().unwrap();
    let mut opts = small_opts(d.path());
    opts.checkpoint_bytes = 512 << 10; // several checkpoints during the run
    let size = BLOCKS * BS;
    create(&*io, &opts, size);
    let v = Volume::open(io.clone(), opts.clone(), &identity(size)).unwrap();

    let mut handles = Vec::new();
    for t in 0..TASKS {
        let v = v.clone();
        handles.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(1000 + t);
            let mut model = vec![vec![0u8; BS as usize]; BLOCKS as usize];
            let mut last_lsn = 0;
            for i in 0..150u64 {
                let b = loop {
                    let b = rng.random_range(0..BLOCKS);
                    if b % TASKS == t {
                        break b;
                    }
                };
                match rng.random_range(0..10) {
                    0 => {
                        let durable = v.flush().await.unwrap();
                        assert!(durable >= last_lsn, "flush covers this task's completed writes");
                    }
                    1 => {
                        last_lsn = v.trim(b * BS, BS as u32, false).await.unwrap();
                        model[b as usize].fill(0);
                    }
                    2 => {
                        let punch = rng.random();
                        last_lsn = v.write_zeroes(b * BS, BS as u32, punch, rng.random()).await.unwrap();
                        model[b as usize].fill(0);
                    }
                    _ => {
                        let data = block(t * 1_000_000 + i, BS as usize);
                        let fua = rng.random_range(0..4) == 0;
                        last_lsn = v.write(b * BS, data.clone(), fua).await.unwrap();
                        if fua {
                            assert!(v.status().durable_lsn >= last_lsn);
                        }
                        model[b as usize].copy_from_slice(&data);
                    }
                }
                let got = v.read(b * BS, BS as u32).await.unwrap();
                assert_eq!(&got[..], &model[b as usize][..], "read sees the latest completed write");
            }
            model
        }));
    }
    let mut model = vec![vec![0u8; BS as usize]; BLOCKS as usize];
    for (t, h) in handles.into_iter().enumerate() {
        let m = h.await.unwrap();
        for b in 0..BLOCKS {
            if b % TASKS == t as u64 {
                model[b as usize] = m[b as usize].clone();
            }
        }
    }
    let expected: Vec<u8> = model.concat();
    assert_eq!(&v.read(0, size as u32).await.unwrap()[..], &expected[..]);
    assert!(v.status().checkpoint_lsn > 0, "checkpoints ran");
    v.close().await.unwrap();
    drop(v);

    let v = Volume::open(io.clone(), opts.clone(), &identity(size)).unwrap();
    assert_eq!(&v.read(0, size as u32).await.unwrap()[..], &expected[..]);
    // Crash: drop without close, then wipe the data file so that only the
    // WAL can bring the writes back.
    let first_new = v.write(0, block(77, 8192), false).await.unwrap();
    v.write(BS * 10, block(78, 4096), true).await.unwrap();
    drop(v);
    let data = std::fs::OpenOptions::new().write(true).open(opts.dir.join("data")).unwrap();
    data.set_len(0).unwrap();
    data.set_len(size).unwrap();
    drop(data);
    // Without the checkpointed content the older blocks read as zero; the
    // WAL holds everything since the last checkpoint (the open).
    let v = Volume::open(io.clone(), opts.clone(), &identity(size)).unwrap();
    assert_eq!(v.recovery().replayed, 2);
    assert_eq!(v.recovery().last_lsn, first_new + 1);
    assert_eq!(v.read(0, 8192).await.unwrap(), block(77, 8192));
    assert_eq!(v.read(BS * 10, 4096).await.unwrap(), block(78, 4096));
    v.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_recycle_segments() {
    let d = tempfile::tempdir().unwrap();
    let mut opts = small_opts(d.path());
    opts.wal_segment_size = 128 << 10;
    opts.checkpoint_bytes = 256 << 10;
    let io = engine();
    let size = 4 * MIB;
    create(&*io, &opts, size);
    let v = Volume::open(io.clone(), opts.clone(), &identity(size)).unwrap();
    let mut max_segments = 0;
    let mut total = 0u64;
    for i in 0..400u64 {
        // 400 x 16 KiB = 6.4 MiB of WAL through 128 KiB segments.
        let off = (i * 16384) % size;
        v.write(off, block(i, 16384), i % 7 == 0).await.unwrap();
        total += 16384;
        let (segs, spares) = wal_files(d.path());
        max_segments = max_segments.max(segs.len());
        assert!(spares.len() <= segment::MAX_SPARES, "{spares:?}");
    }
    let st = v.status();
    assert!(st.checkpoint_lsn > 0);
    // The WAL stays bounded: the limit is max(4 x checkpoint_bytes, 3 segments) = 1 MiB.
    assert!(max_segments <= 1 + (4 * opts.checkpoint_bytes / opts.wal_segment_size) as usize + 1, "{max_segments}");
    assert!(total > 40 * opts.wal_segment_size);
    // Every block reads back.
    for i in 380..400u64 {
        let off = (i * 16384) % size;
        assert_eq!(v.read(off, 16384).await.unwrap(), block(i, 16384));
    }
    v.close().await.unwrap();
    drop(v);
    let (segs, _) = wal_files(d.path());
    assert_eq!(segs.len(), 1, "after close the checkpoint leaves only the current segment");
    let v = Volume::open(io.clone(), opts.clone(), &identity(size)).unwrap();
    for i in 380..400u64 {
        let off = (i * 16384) % size;
        assert_eq!(v.read(off, 16384).await.unwrap(), block(i, 16384));
    }
    v.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_writes_split_into_records_and_replay_across_segments() {
    let d = tempfile::tempdir().unwrap();
    let opts = small_opts(d.path()); // 256 KiB segments
    let io = engine();
    let size = 8 * MIB;
    create(&*io, &opts, size);
    let v = Volume::open(io.clone(), opts.clone(), &identity(size)).unwrap();
    let big = block(5, 3 * MIB as usize);
    // A replayable record in the range keeps the large write in the WAL.
    v.write(2 * MIB, block(6, 512), false).await.unwrap();
    v.write(MIB, big.clone(), true).await.unwrap();
    assert_eq!(v.read(MIB, 3 * MIB as u32).await.unwrap(), big);
    drop(v); // crash
    std::fs::write(opts.dir.join("data"), vec![0u8; size as usize]).unwrap();
    let v = Volume::open(io.clone(), opts.clone(), &identity(size)).unwrap();
    assert!(v.recovery().replayed >= 12, "{:?}", v.recovery());
    assert!(v.recovery().segments_read >= 12, "{:?}", v.recovery());
    assert_eq!(v.read(MIB, 3 * MIB as u32).await.unwrap(), big);
    v.close().await.unwrap();
}

/// Writes `n` records into a fresh volume (FUA on the first `synced`), then
/// drops it (crash). Returns the options, the size and the payloads.
async fn build_log(dir: &Path, n: u64, synced: u64, payload: usize) -> (VolumeOptions, u64, Vec<Bytes>) {
    let opts = small_opts(dir);
    let io = engine();
    let size = MIB;
    create(&*io, &opts, size);
    let v = Volume::open(io, opts.clone(), &identity(size)).unwrap();
    let mut payloads = Vec::new();
    for i in 0..n {
        let p = block(500 + i, payload);
        let lsn = v.write(i * 4096, p.clone(), i < synced).await.unwrap();
        assert_eq!(lsn, i + 1);
        payloads.push(p);
    }
    drop(v);
    (opts, size, payloads)
}

/// (offset, encoded length) of each record of segment `seq` in `buf`.
fn record_positions(buf: &[u8], uuid: u128, seq: u64) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut pos = wal::SEGMENT_HEADER_SIZE as usize;
    while let Ok(r) = wal::decode_record(&buf[pos..], uuid, seq) {
        out.push((pos, r.encoded_len()));
        pos += r.encoded_len();
    }
    out
}

fn uuid_of(opts: &VolumeOptions) -> u128 {
    let io = SyncEngine::new();
    let f = io.open(&opts.meta_path(), OpenMode::READ).unwrap();
    MetaStore::open(&io, f).unwrap().current().uuid
}

#[tokio::test]
async fn recovery_at_every_truncation_point() {
    let d = tempfile::tempdir().unwrap();
    let (opts, size, payloads) = build_log(d.path(), 12, 12, 100).await;
    let io = SyncEngine::new();
    let uuid = uuid_of(&opts);
    let seg_path = wal::segment_path(&opts.wal_dir(), 1);
    let full = std::fs::read(&seg_path).unwrap();
    let positions = record_positions(&full, uuid, 1);
    assert_eq!(positions.len(), 12);
    let end = positions.last().map(|(p, l)| p + l).unwrap();

    let work = tempfile::tempdir().unwrap();
    let wal_dir = work.path().join("wal");
    std::fs::create_dir(&wal_dir).unwrap();
    let cut_path = wal::segment_path(&wal_dir, 1);
    let data_path = work.path().join("data");
    for cut in wal::SEGMENT_HEADER_SIZE as usize..=end {
        std::fs::write(&cut_path, &full[..cut]).unwrap();
        std::fs::write(&data_path, vec![0u8; size as usize]).unwrap();
        let data = io.open(&data_path, OpenMode::READ_WRITE).unwrap();
        let segments = segment::list_dir(&wal_dir).unwrap().segments;
        let mut marks = bitmap::DirtyBitmap::new(size, 4096).unwrap();
        let report = recovery::recover(
            &recovery::RecoverArgs {
                io: &io,
                wal_dir: &wal_dir,
                segments: &segments,
                data: &data,
                uuid,
                size,
                checkpoint_lsn: 0,
                replay_seq: 1,
            },
            &mut recovery::Marks { bitmap: &mut marks, after: 0 },
        )
        .unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
        // A record is complete once its header and payload are (the
        // padding carries nothing).
        let complete = positions.iter().filter(|(p, _)| p + wal::RECORD_HEADER_SIZE + 100 <= cut).count();
        assert_eq!(report.last_lsn, complete as u64, "cut at {cut}");
        assert_eq!(report.replayed, complete as u64, "cut at {cut}");
        assert_eq!(report.marked, complete as u64, "cut at {cut}: every recovered record is marked");
        let mut want = bitmap::DirtyBitmap::new(size, 4096).unwrap();
        for (p, _) in &positions[..complete] {
            let h = wal::decode_record(&full[*p..], uuid, 1).unwrap().header;
            want.set_range(h.offset, u64::from(h.length));
        }
        assert_eq!(marks.words(), want.words(), "cut at {cut}");
        let content = std::fs::read(&data_path).unwrap();
        for (i, p) in payloads.iter().enumerate() {
            let got = &content[i * 4096..i * 4096 + p.len()];
            if i < complete {
                assert_eq!(got, &p[..], "cut at {cut}: record {} replayed", i + 1);
            } else {
                assert!(got.iter().all(|&b| b == 0), "cut at {cut}: record {} not replayed", i + 1);
            }
        }
    }
}

#[tokio::test]
async fn damaged_durable_record_refuses_to_open_and_torn_tail_is_truncated() {
    // Records 1..=5 with FUA (record k carries durable_lsn k-1), 6..=8 without
    // (durable_lsn 5).
    let d = tempfile::tempdir().unwrap();
    let (opts, size, payloads) = build_log(d.path(), 8, 5, 200).await;
    let uuid = uuid_of(&opts);
    let seg_path = wal::segment_path(&opts.wal_dir(), 1);
    let pristine = std::fs::read(&seg_path).unwrap();
    let pos = record_positions(&pristine, uuid, 1);
    assert_eq!(pos.len(), 8);
    let backup = tempfile::tempdir().unwrap();
    copy_dir(&opts.dir, backup.path());

    let io = engine();
    for (victim, durable) in [(3usize, true), (5, true), (7, false), (8, false)] {
        // Fresh copy of the crashed node directory.
        let _ = std::fs::remove_dir_all(&opts.dir);
        copy_dir(backup.path(), &opts.dir);
        let mut bytes = pristine.clone();
        let (off, _) = pos[victim - 1];
        bytes[off + 60] ^= 0x40; // in the payload
        std::fs::write(&seg_path, &bytes).unwrap();
        let r = Volume::open(io.clone(), opts.clone(), &identity(size));
        if durable {
            let e = r.unwrap_err();
            let msg = e.to_string();
            assert!(
                matches!(e, VolumeError::WalCorrupt { lsn, offset, .. } if lsn == victim as u64 && offset == off as u64),
                "{msg}"
            );
            assert!(msg.contains(&seg_path.display().to_string()), "{msg}");
            assert!(msg.contains(&format!("at byte {off}")), "{msg}");
            assert!(msg.contains(&format!("LSN {victim}")), "{msg}");
        } else {
            let v = r.unwrap_or_else(|e| panic!("record {victim}: {e}"));
            let rep = v.recovery().clone();
            assert_eq!(rep.last_lsn, victim as u64 - 1);
            let end = rep.end.expect("log end reported");
            assert_eq!((end.offset, end.lsn), (off as u64, victim as u64));
            assert_eq!(end.path, seg_path);
            // Records before the victim read back; the log continues at the victim's LSN.
            for (i, p) in payloads.iter().enumerate().take(victim - 1) {
                assert_eq!(v.read(i as u64 * 4096, p.len() as u32).await.unwrap(), *p);
            }
            assert_eq!(v.write(0, block(1, 10), false).await.unwrap(), victim as u64);
            v.close().await.unwrap();
        }
    }
}

#[tokio::test]
async fn stale_bytes_after_reopen_never_replay() {
    // After a crash the new log starts in a new segment: writing fewer
    // records than before and crashing again must not resurrect old ones.
    let d = tempfile::tempdir().unwrap();
    let (opts, size, _) = build_log(d.path(), 6, 6, 300).await;
    let io = engine();
    let v = Volume::open(io.clone(), opts.clone(), &identity(size)).unwrap();
    assert_eq!(v.recovery().last_lsn, 6);
    v.write(0, block(1, 300), true).await.unwrap();
    drop(v);
    let v = Volume::open(io.clone(), opts.clone(), &identity(size)).unwrap();
    assert_eq!(v.recovery().last_lsn, 7);
    assert_eq!(v.recovery().replayed, 1);
    assert_eq!(v.read(0, 300).await.unwrap(), block(1, 300));
    v.close().await.unwrap();
}

/// A fresh 4 MiB volume with 64 KiB WAL segments (a few writes span several).
fn small_segments_volume() -> (tempfile::TempDir, VolumeOptions, Arc<dyn IoEngine>, u64, Arc<Volume>) {
    let d = tempfile::tempdir().unwrap();
    let mut opts = small_opts(d.path());
    opts.wal_segment_size = 64 << 10;
    let io = engine();
    let size = 4 * MIB;
    create(&*io, &opts, size);
    let v = Volume::open(io.clone(), opts.clone(), &identity(size)).unwrap();
    (d, opts, io, size, v)
}

#[tokio::test]
async fn missing_segment_in_the_middle_is_corruption() {
    // Three segments of durable records; remove the middle one.
    let (d, opts, io, size, v) = small_segments_volume();
    for i in 0..40u64 {
        v.write(i * 4096, block(i, 4096), true).await.unwrap();
    }
    drop(v);
    let (segs, _) = wal_files(d.path());
    assert!(segs.len() >= 3, "{segs:?}");
    std::fs::remove_file(&segs[1]).unwrap();
    let e = Volume::open(io.clone(), opts.clone(), &identity(size)).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, VolumeError::WalCorrupt { .. }), "{msg}");
    assert!(msg.contains(&segs[1].display().to_string()) || msg.contains(&segs[0].display().to_string()), "{msg}");
}

#[tokio::test]
async fn missing_segment_without_a_witness_is_refused_naming_it() {
    // Plain writes, one flush at the end: no record after the hole says the
    // records in it were durable. Only the gap in the sequence shows it.
    let (d, opts, io, size, v) = small_segments_volume();
    for i in 0..60u64 {
        v.write(i * 4096, block(i, 4096), false).await.unwrap();
    }
    v.flush().await.unwrap();
    drop(v);
    let (segs, _) = wal_files(d.path());
    assert!(segs.len() >= 4, "{segs:?}");
    let victim = &segs[segs.len() / 2];
    std::fs::remove_file(victim).unwrap();
    let e = Volume::open(io.clone(), opts.clone(), &identity(size)).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, VolumeError::WalCorrupt { .. }), "{msg}");
    assert!(msg.contains(&format!("WAL corrupt in {} at byte 0", victim.display())), "{msg}");
    assert!(msg.contains("WAL segment file missing"), "{msg}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), &dst).unwrap();
        }
    }
}

// ---------------------------------------------------------------------------
// Fault injection: power cuts and IO errors (crate::io::fault::FaultEngine).

mod faults {
    use std::collections::HashSet;

    use super::*;
    use crate::io::fault::{FaultEngine, SECTOR};

    const BS: usize = 4096;
    const BLOCKS: u64 = 128;
    /// Large writes (in place when nothing replayable overlaps them).
    const BIG_BLOCKS: u64 = (writer::IN_PLACE_MIN_BYTES / BS) as u64;

    /// What a block may hold after a power cut: per sector, the content of
    /// the last durable write or of any later write.
    #[derive(Clone)]
    struct BlockModel {
        stable: Vec<u8>,
        later: Vec<Vec<u8>>,
    }

    impl BlockModel {
        fn allows(&self, got: &[u8]) -> Result<(), usize> {
            for s in 0..BS / SECTOR as usize {
                let r = s * SECTOR as usize..(s + 1) * SECTOR as usize;
                let ok = self.stable[r.clone()] == got[r.clone()]
                    || self.later.iter().any(|v| v[r.clone()] == got[r.clone()]);
                if !ok {
                    return Err(s);
                }
            }
            Ok(())
        }
    }

    enum Step {
        /// `data` covers `data.len() / BS` blocks from `block`.
        Write {
            block: u64,
            data: Bytes,
            fua: bool,
        },
        Trim {
            block: u64,
            fua: bool,
        },
        Flush,
    }

    /// One round: random waves of concurrent writes/trims (distinct blocks
    /// per wave), FUA and flushes, while another thread cuts the power at a
    /// random moment. Then reopen with a plain engine and check every block.
    #[derive(Default, Debug)]
    struct Stats {
        in_place: u64,
        waves: u64,
        flushes: u64,
        cut_mid_run: bool,
        replayed: u64,
    }

    async fn power_cut_round(inner: Arc<dyn IoEngine>, seed: u64) -> Stats {
        let mut stats = Stats::default();
        let d = tempfile::tempdir().unwrap();
        let mut opts = small_opts(d.path());
        opts.wal_segment_size = 64 << 10; // rollovers during the round
        opts.checkpoint_bytes = 128 << 10; // and checkpoints
        let size = BLOCKS * BS as u64;
        create(&SyncEngine::new(), &opts, size);
        let fault = FaultEngine::new(inner, seed);
        let io: Arc<dyn IoEngine> = fault.clone();
        let v = Volume::open(io, opts.clone(), &identity(size)).unwrap();

        let mut rng = StdRng::seed_from_u64(seed);
        let cut_after = Duration::from_micros(rng.random_range(0..120_000));
        let cutter = {
            let fault = fault.clone();
            std::thread::spawn(move || {
                std::thread::sleep(cut_after);
                fault.power_cut()
            })
        };

        let zero = vec![0u8; BS];
        let mut model: Vec<BlockModel> =
            (0..BLOCKS).map(|_| BlockModel { stable: zero.clone(), later: vec![] }).collect();
        let mut stopped = false;
        let mut n = 0u64;
        while !stopped && n < 2000 {
            // Build a wave.
            let mut steps = Vec::new();
            if rng.random_range(0..6) == 0 {
                steps.push(Step::Flush);
            } else {
                let mut used = HashSet::new();
                for _ in 0..rng.random_range(1..8) {
                    let big = rng.random_range(0..4) == 0;
                    let count = if big { BIG_BLOCKS } else { 1 };
                    let block = rng.random_range(0..=BLOCKS - count);
                    if !(block..block + count).all(|b| !used.contains(&b)) {
                        continue;
                    }
                    used.extend(block..block + count);
                    let fua = rng.random_range(0..5) == 0;
                    if !big && rng.random_range(0..10) == 0 {
                        steps.push(Step::Trim { block, fua });
                    } else {
                        let mut data = Vec::with_capacity(count as usize * BS);
                        for _ in 0..count {
                            n += 1;
                            data.extend_from_slice(&block_data(seed, n));
                        }
                        steps.push(Step::Write { block, data: Bytes::from(data), fua });
                    }
                }
            }
            let futs = steps.iter().map(|s| {
                let v = v.clone();
                async move {
                    match s {
                        Step::Write { block, data, fua } => v.write(block * BS as u64, data.clone(), *fua).await,
                        Step::Trim { block, fua } => v.trim(block * BS as u64, BS as u32, *fua).await,
                        Step::Flush => v.flush().await,
                    }
                }
            });
            let results = futures_join_all(futs).await;
            let mut flushed = false;
            for (s, r) in steps.iter().zip(results) {
                let ok = match r {
                    Ok(_) => true,
                    Err(VolumeError::Stopped(_)) => {
                        stopped = true;
                        false
                    }
                    Err(e) => panic!("seed {seed}: unexpected error {e}"),
                };
                let (block, content, fua) = match s {
                    Step::Flush => {
                        flushed = ok;
                        continue;
                    }
                    Step::Write { block, data, fua } => (*block, data.to_vec(), *fua),
                    Step::Trim { block, fua } => (*block, zero.clone(), *fua),
                };
                for (i, chunk) in content.chunks(BS).enumerate() {
                    let m = &mut model[block as usize + i];
                    if ok && fua {
                        m.stable = chunk.to_vec();
                        m.later.clear();
                    } else {
                        // Completed without FUA, failed, or cut mid-flight:
                        // may or may not be on disk.
                        m.later.push(chunk.to_vec());
                    }
                }
            }
            if flushed {
                // Every write completed before the flush is durable (a
                // flush only succeeds if nothing failed before it).
                for m in &mut model {
                    if let Some(last) = m.later.pop() {
                        m.stable = last;
                        m.later.clear();
                    }
                }
                stats.flushes += 1;
            }
            stats.waves += 1;
        }
        let report = cutter.join().unwrap();
        stats.cut_mid_run = stopped;
        stats.in_place = count_in_place(&opts);
        assert_eq!(v.status().failed.is_some(), stopped, "seed {seed}");
        drop(v);

        // The machine is back: reopen with a plain engine.
        let v = Volume::open(Arc::new(SyncEngine::new()), opts.clone(), &identity(size))
            .unwrap_or_else(|e| panic!("seed {seed}: reopen after power cut failed: {e} ({report:?})"));
        let all = v.read(0, size as u32).await.unwrap();
        for b in 0..BLOCKS as usize {
            if let Err(sector) = model[b].allows(&all[b * BS..(b + 1) * BS]) {
                panic!(
                    "seed {seed}: block {b} sector {sector} holds data that was neither durable nor written later \
                     ({} later candidates; recovery {:?}; cut {report:?})",
                    model[b].later.len(),
                    v.recovery()
                );
            }
        }
        stats.replayed = v.recovery().replayed;
        v.close().await.unwrap();
        stats
    }

    /// In-place records left in the WAL files (any segment, any validity
    /// of the rest).
    fn count_in_place(opts: &VolumeOptions) -> u64 {
        let uuid = uuid_of(opts);
        let mut n = 0;
        for (seq, path) in segment::list_dir(&opts.wal_dir()).unwrap().segments {
            let buf = std::fs::read(&path).unwrap();
            let mut off = wal::SEGMENT_HEADER_SIZE as usize;
            while off + wal::RECORD_HEADER_SIZE <= buf.len() {
                if let Ok(r) = wal::decode_record(&buf[off..], uuid, seq) {
                    n += u64::from(r.header.kind == wal::RecordKind::WriteInPlace);
                }
                off += 8;
            }
        }
        n
    }

    fn block_data(seed: u64, n: u64) -> Bytes {
        block(seed.wrapping_mul(1_000_003).wrapping_add(n), BS)
    }

    async fn futures_join_all<F: std::future::Future<Output = T>, T>(futs: impl Iterator<Item = F>) -> Vec<T> {
        let handles: Vec<_> = futs.collect();
        let mut out = Vec::with_capacity(handles.len());
        // Poll all concurrently through a JoinSet-free select: pin them in a
        // Vec and drive with tokio::join-like polling.
        let mut pinned: Vec<_> = handles.into_iter().map(Box::pin).collect();
        let mut results: Vec<Option<T>> = (0..pinned.len()).map(|_| None).collect();
        std::future::poll_fn(|cx| {
            let mut pending = false;
            for (i, f) in pinned.iter_mut().enumerate() {
                if results[i].is_none() {
                    match f.as_mut().poll(cx) {
                        std::task::Poll::Ready(v) => results[i] = Some(v),
                        std::task::Poll::Pending => pending = true,
                    }
                }
            }
            if pending { std::task::Poll::Pending } else { std::task::Poll::Ready(()) }
        })
        .await;
        for r in results {
            out.extend(r);
        }
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn power_cut_at_random_moments_keeps_every_durable_write() {
        let rounds: u64 = std::env::var("REPBLOCK_POWER_CUT_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(40);
        let mut mid_run = 0;
        let mut replayed = 0;
        let mut in_place = 0;
        let engines = engines();
        let rounds = rounds.max(engines.len() as u64);
        for seed in 0..rounds {
            // Alternate the engine under the fault engine.
            let inner = engines[seed as usize % engines.len()].clone();
            let st = power_cut_round(inner, seed).await;
            mid_run += u64::from(st.cut_mid_run);
            replayed += st.replayed;
            in_place += st.in_place;
            eprintln!("power cut seed {seed}: {st:?}");
        }
        assert!(in_place > 0, "no round exercised in-place writes");
        // Most cuts land while requests are in flight, and recovery replays.
        assert!(mid_run * 2 >= rounds, "only {mid_run} of {rounds} cuts hit a running workload");
        assert!(replayed > 0);
    }

    #[tokio::test]
    async fn power_cut_when_idle_keeps_everything_flushed() {
        let d = tempfile::tempdir().unwrap();
        let opts = small_opts(d.path());
        let size = 64 * BS as u64;
        create(&SyncEngine::new(), &opts, size);
        let fault = FaultEngine::new(Arc::new(SyncEngine::new()), 7);
        let v = Volume::open(fault.clone(), opts.clone(), &identity(size)).unwrap();
        for i in 0..64u64 {
            v.write(i * BS as u64, block(i, BS), false).await.unwrap();
        }
        v.flush().await.unwrap();
        // Unflushed: may or may not survive, but must not break recovery.
        v.write(0, block(999, BS), false).await.unwrap();
        let rep = fault.power_cut();
        assert!(rep.sectors_kept + rep.sectors_reverted > 0, "{rep:?}");
        drop(v);
        let v = Volume::open(Arc::new(SyncEngine::new()), opts.clone(), &identity(size)).unwrap();
        for i in 1..64u64 {
            assert_eq!(v.read(i * BS as u64, BS as u32).await.unwrap(), block(i, BS));
        }
        v.close().await.unwrap();
    }

    #[tokio::test]
    async fn fdatasync_error_stops_writes_with_a_clear_reason() {
        let d = tempfile::tempdir().unwrap();
        let opts = small_opts(d.path());
        let size = MIB;
        create(&SyncEngine::new(), &opts, size);
        let fault = FaultEngine::new(Arc::new(SyncEngine::new()), 1);
        let v = Volume::open(fault.clone(), opts.clone(), &identity(size)).unwrap();
        v.write(0, block(1, 4096), false).await.unwrap();
        fault.fail_sync_after(0, libc::EIO);
        let e = v.write(4096, block(2, 4096), true).await.unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, VolumeError::Stopped(_)), "{msg}");
        assert!(matches!(&e, VolumeError::Stopped(f) if f.kind() == crate::volume::FailStopKind::Io), "{e:?}");
        assert!(msg.contains("fdatasync of WAL") && msg.contains("errno 5"), "{msg}");
        assert!(msg.contains(&opts.wal_dir().display().to_string()), "{msg}");
        // Fail-stop: even after the fault is gone, nothing is retried.
        fault.clear_faults();
        for r in [v.write(0, block(3, 10), false).await, v.flush().await, v.trim(0, 10, false).await] {
            assert!(
                matches!(&r, Err(VolumeError::Stopped(m)) if m.to_string() == msg["Volume stopped taking writes: ".len()..]),
                "{r:?}"
            );
        }
        assert_eq!(v.status().failed.as_deref(), Some(&msg["Volume stopped taking writes: ".len()..]));
        // Reads still work.
        assert_eq!(v.read(0, 4096).await.unwrap(), block(1, 4096));
        assert!(matches!(v.close().await, Err(VolumeError::Stopped(_))));
        drop(v);
        // The FUA write never completed; everything else is recoverable.
        let v = Volume::open(Arc::new(SyncEngine::new()), opts.clone(), &identity(size)).unwrap();
        assert_eq!(v.read(0, 4096).await.unwrap(), block(1, 4096));
        v.close().await.unwrap();
    }

    #[tokio::test]
    async fn write_error_stops_writes() {
        let d = tempfile::tempdir().unwrap();
        let opts = small_opts(d.path());
        create(&SyncEngine::new(), &opts, MIB);
        let fault = FaultEngine::new(Arc::new(SyncEngine::new()), 2);
        let v = Volume::open(fault.clone(), opts.clone(), &identity(MIB)).unwrap();
        fault.fail_writes_after(0, libc::ENOSPC);
        let e = v.write(0, block(1, 4096), false).await.unwrap_err();
        assert!(e.to_string().contains("errno 28"), "{e}");
        assert!(matches!(v.flush().await, Err(VolumeError::Stopped(_))));
        assert!(v.status().failed.unwrap().contains("write batch"));
    }

    /// A full filesystem is a fail-stop of kind `NoSpace`, kept by every
    /// later refusal (NBD answers ENOSPC from it); other errnos are `Io`.
    #[tokio::test]
    async fn enospc_is_a_no_space_fail_stop() {
        use crate::volume::FailStopKind;
        let kind = |r: Result<Lsn, VolumeError>| match r {
            Err(VolumeError::Stopped(f)) => (f.kind(), f.errno()),
            other => panic!("a fail-stop expected, got {other:?}"),
        };
        for (errno, want) in [(libc::ENOSPC, FailStopKind::NoSpace), (libc::EROFS, FailStopKind::Io)] {
            let d = tempfile::tempdir().unwrap();
            let opts = small_opts(d.path());
            create(&SyncEngine::new(), &opts, MIB);
            let fault = FaultEngine::new(Arc::new(SyncEngine::new()), 2);
            let v = Volume::open(fault.clone(), opts.clone(), &identity(MIB)).unwrap();
            v.write(0, block(1, 4096), true).await.unwrap();
            fault.fail_writes_after(0, errno);
            assert_eq!(kind(v.write(4096, block(2, 4096), false).await), (want, Some(errno)));
            fault.clear_faults();
            assert_eq!(kind(v.write(8192, block(3, 4096), false).await), (want, Some(errno)), "the first reason stays");
            assert_eq!(kind(v.flush().await), (want, Some(errno)));
            assert_eq!(v.read(0, 4096).await.unwrap(), block(1, 4096), "reads go on");
        }
    }

    #[tokio::test]
    async fn checkpoint_data_sync_error_stops_the_volume() {
        let d = tempfile::tempdir().unwrap();
        let mut opts = small_opts(d.path());
        opts.checkpoint_interval = Duration::from_millis(50);
        create(&SyncEngine::new(), &opts, MIB);
        let fault = FaultEngine::new(Arc::new(SyncEngine::new()), 3);
        let v = Volume::open(fault.clone(), opts.clone(), &identity(MIB)).unwrap();
        v.write(0, block(1, 4096), true).await.unwrap();
        fault.fail_sync_after(0, libc::EIO);
        // The checkpointer runs within the interval and hits the failing sync.
        let mut failed = None;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if let Some(f) = v.status().failed {
                failed = Some(f);
                break;
            }
        }
        let f = failed.expect("checkpoint failure stops the volume");
        assert!(f.contains("fdatasync of data") && f.contains("errno 5"), "{f}");
        assert!(matches!(v.write(0, block(2, 10), false).await, Err(VolumeError::Stopped(_))));
    }
}

/// Kinds of the valid records of segment `seq`, in order.
fn record_kinds(opts: &VolumeOptions, seq: u64) -> Vec<wal::RecordKind> {
    let buf = std::fs::read(wal::segment_path(&opts.wal_dir(), seq)).unwrap();
    let uuid = uuid_of(opts);
    let mut pos = wal::SEGMENT_HEADER_SIZE as usize;
    let mut out = Vec::new();
    while let Ok(r) = wal::decode_record(&buf[pos..], uuid, seq) {
        out.push(r.header.kind);
        pos += r.encoded_len();
    }
    out
}

#[tokio::test]
async fn large_writes_go_in_place_only_when_no_replayable_record_overlaps() {
    use wal::RecordKind::{Write, WriteInPlace};
    let d = tempfile::tempdir().unwrap();
    let mut opts = small_opts(d.path());
    opts.wal_segment_size = 4 * MIB; // one segment holds the whole test
    let io = engine();
    let size = 4 * MIB;
    create(&*io, &opts, size);
    let v = Volume::open(io.clone(), opts.clone(), &identity(size)).unwrap();
    let big = writer::IN_PLACE_MIN_BYTES;
    v.write(4096, block(1, 4096), true).await.unwrap(); // replayable
    v.write(0, block(2, big), true).await.unwrap(); // overlaps it: carries its data
    v.write(MIB, block(3, big), true).await.unwrap(); // nothing there: in place
    v.trim(2 * MIB, 4096, false).await.unwrap(); // replayable
    v.write(2 * MIB, block(4, big), false).await.unwrap(); // overlaps the trim
    v.write(3 * MIB, block(5, big - 4096), true).await.unwrap(); // too small
    assert_eq!(record_kinds(&opts, 1), [Write, Write, WriteInPlace, wal::RecordKind::Trim, Write, Write]);
    drop(v); // crash

    let v = Volume::open(io.clone(), opts.clone(), &identity(size)).unwrap();
    assert_eq!(v.recovery().replayed, 6);
    assert_eq!(v.read(0, big as u32).await.unwrap(), block(2, big));
    assert_eq!(v.read(MIB, big as u32).await.unwrap(), block(3, big));
    assert_eq!(v.read(2 * MIB, big as u32).await.unwrap(), block(4, big));
    assert_eq!(v.read(3 * MIB, (big - 4096) as u32).await.unwrap(), block(5, big - 4096));
    // After the open's checkpoint nothing is replayable: in place again.
    v.write(0, block(6, big), true).await.unwrap();
    v.close().await.unwrap();
    assert_eq!(record_kinds(&opts, 2), [WriteInPlace]);
    let v = Volume::open(io.clone(), opts.clone(), &identity(size)).unwrap();
    assert_eq!(v.read(0, big as u32).await.unwrap(), block(6, big));
    v.close().await.unwrap();
}

#[tokio::test]
async fn segment_size_can_change_between_opens() {
    let (_d, mut opts, io, size, v) = small_segments_volume();
    for i in 0..40u64 {
        v.write(i * 4096, block(i, 4096), false).await.unwrap();
    }
    v.close().await.unwrap();
    drop(v);
    // Larger segments now: the small spares left behind are grown on use,
    // and a 300 KiB record fits.
    opts.wal_segment_size = 512 << 10;
    let v = Volume::open(io.clone(), opts.clone(), &identity(size)).unwrap();
    // A replayable write in the range keeps the big one in the WAL.
    v.write(MIB, block(1, 512), false).await.unwrap();
    for i in 0..6u64 {
        v.write(MIB, block(100 + i, 300 << 10), true).await.unwrap();
    }
    drop(v);
    let v = Volume::open(io.clone(), opts.clone(), &identity(size)).unwrap();
    assert_eq!(v.read(MIB, 300 << 10).await.unwrap(), block(105, 300 << 10));
    for i in 0..40u64 {
        assert_eq!(v.read(i * 4096, 4096).await.unwrap(), block(i, 4096));
    }
    for (seq, path) in segment::list_dir(&opts.wal_dir()).unwrap().segments {
        assert!(std::fs::metadata(&path).unwrap().len() >= 512 << 10, "segment {seq} too small");
    }
    v.close().await.unwrap();
}

#[tokio::test]
async fn damaged_segment_header_before_durable_records_is_corruption() {
    let d = tempfile::tempdir().unwrap();
    let (opts, size, _) = build_log(d.path(), 4, 4, 100).await;
    let seg_path = wal::segment_path(&opts.wal_dir(), 1);
    let mut bytes = std::fs::read(&seg_path).unwrap();
    bytes[20] ^= 1; // the seq field: CRC mismatch
    std::fs::write(&seg_path, &bytes).unwrap();
    let e = Volume::open(engine(), opts.clone(), &identity(size)).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, VolumeError::WalCorrupt { offset: 0, lsn: 1, .. }), "{msg}");
    assert!(msg.contains("segment header") && msg.contains(&seg_path.display().to_string()), "{msg}");

    // Without durable records behind it, a bad header is just an empty log
    // (a segment started but never synced).
    let d2 = tempfile::tempdir().unwrap();
    let (opts2, size2, _) = build_log(d2.path(), 3, 0, 100).await;
    let seg2 = wal::segment_path(&opts2.wal_dir(), 1);
    let mut bytes = std::fs::read(&seg2).unwrap();
    bytes[0] ^= 1;
    std::fs::write(&seg2, &bytes).unwrap();
    let v = Volume::open(engine(), opts2, &identity(size2)).unwrap();
    assert_eq!(v.recovery().last_lsn, 0);
    assert_eq!(v.recovery().end.as_ref().map(|e| e.offset), Some(0));
    v.close().await.unwrap();
}

#[tokio::test]
async fn update_superblock_keeps_the_fields_the_volume_owns() {
    let d = tempfile::tempdir().unwrap();
    let opts = small_opts(d.path());
    let io = engine();
    create(&*io, &opts, MIB);
    let v = Volume::open(io.clone(), opts.clone(), &identity(MIB)).unwrap();
    v.write(0, block(1, 4096), true).await.unwrap();
    let before = v.superblock();
    assert_ne!(before.gen_current, 0, "create-md picks a random current generation");
    v.update_superblock(|sb| {
        sb.disk_state = DiskState::Outdated;
        sb.gen_bitmap = 7;
        sb.gen_history = [1, 2, 3, 4];
        // Not the caller's to change:
        sb.uuid = 1;
        sb.size = 2;
        sb.checkpoint_lsn = 999;
        sb.replay_seq = 999;
        sb.resource = "other".into();
        sb.flags |= meta::FLAG_CLEAN_SHUTDOWN;
    })
    .unwrap();
    let after = v.superblock();
    assert_eq!(after.disk_state, DiskState::Outdated);
    assert_eq!((after.gen_bitmap, after.gen_history), (7, [1, 2, 3, 4]));
    assert_eq!((after.uuid, after.size, after.resource.as_str()), (before.uuid, before.size, "r0"));
    assert_eq!((after.checkpoint_lsn, after.replay_seq), (before.checkpoint_lsn, before.replay_seq));
    assert!(!after.clean_shutdown());
    assert_eq!(after.counter, before.counter + 1);
    drop(v);
    // Durable: a crash right after keeps it.
    let v = Volume::open(io, opts, &identity(MIB)).unwrap();
    assert_eq!(v.superblock().disk_state, DiskState::Outdated);
    assert_eq!(v.superblock().gen_bitmap, 7);
    v.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interval_checkpoint_runs_when_writes_arrived() {
    let d = tempfile::tempdir().unwrap();
    let mut opts = small_opts(d.path());
    opts.checkpoint_interval = Duration::from_millis(50);
    let io = engine();
    create(&*io, &opts, MIB);
    let v = Volume::open(io, opts, &identity(MIB)).unwrap();
    let lsn = v.write(0, block(1, 4096), false).await.unwrap();
    let start = std::time::Instant::now();
    while v.status().checkpoint_lsn < lsn {
        assert!(start.elapsed() < Duration::from_secs(10), "no checkpoint within 10 s: {:?}", v.status());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A checkpoint makes the WAL durable too.
    assert!(v.status().durable_lsn >= lsn);
    v.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_lsn_holds_segments_and_back_pressure_waits() {
    let d = tempfile::tempdir().unwrap();
    let mut opts = small_opts(d.path());
    opts.wal_segment_size = 64 << 10;
    opts.checkpoint_bytes = 64 << 10; // WAL limit: max(4 x 64 KiB, 3 segments) = 256 KiB
    opts.wal_retain = 0; // the writer waits at the limit itself
    let io = engine();
    let size = 4 * MIB;
    create(&*io, &opts, size);
    let v = Volume::open(io, opts.clone(), &identity(size)).unwrap();
    v.set_min_retained_lsn(Some(1)); // a "peer" still needs everything
    let writer = {
        let v = v.clone();
        tokio::spawn(async move {
            for i in 0..64u64 {
                // 8 KiB writes stay in the WAL (below the in-place size).
                v.write(i * 8192, block(i, 8192), false).await.unwrap();
            }
        })
    };
    // The WAL fills up to its limit and the writes stall.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!writer.is_finished(), "writes should wait while the WAL is full and retained");
    let st = v.status();
    assert!(st.wal_bytes > 256 << 10, "{st:?}");
    assert!(st.local_lsn < 64, "{st:?}");
    // Lifting the hold lets checkpoints recycle and the writes finish.
    v.set_min_retained_lsn(None);
    tokio::time::timeout(Duration::from_secs(20), writer).await.expect("writes resume").unwrap();
    for i in 0..64u64 {
        assert_eq!(v.read(i * 8192, 8192).await.unwrap(), block(i, 8192));
    }
    v.close().await.unwrap();
    let (segs, _) = wal_files(d.path());
    assert_eq!(segs.len(), 1);
}
