//! Tests of the replication API: the feed's order, payloads, barriers and
//! back-pressure; LSN-preserving apply; a replica built from the feed
//! (records + full-sync reads under a concurrent workload) ending
//! byte-identical; rebase and finish_sync across crashes.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::io::sync::SyncEngine;
use crate::volume::tests::{create, engines, identity, small_opts};
use crate::volume::*;

const MIB: u64 = 1 << 20;

fn data(seed: u64, len: usize) -> Bytes {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    rng.fill(&mut v[..]);
    Bytes::from(v)
}

fn open_new(io: &Arc<dyn IoEngine>, dir: &Path, size: u64) -> Arc<Volume> {
    let opts = small_opts(dir);
    create(&**io, &opts, size);
    Volume::open(io.clone(), opts, &identity(size)).expect("open")
}

fn reopen(io: &Arc<dyn IoEngine>, dir: &Path, size: u64) -> Arc<Volume> {
    Volume::open(io.clone(), small_opts(dir), &identity(size)).expect("reopen")
}

/// Applies a feed record to an in-memory image.
fn apply_to_model(model: &mut [u8], op: &FeedOp) {
    match op {
        FeedOp::Write { offset, data } => model[*offset as usize..*offset as usize + data.len()].copy_from_slice(data),
        FeedOp::Trim { offset, len } | FeedOp::Zeroes { offset, len, .. } => {
            model[*offset as usize..(*offset + u64::from(*len)) as usize].fill(0)
        }
    }
}

async fn read_all(v: &Volume) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.size() as usize);
    let mut off = 0;
    while off < v.size() {
        let n = (v.size() - off).min(MIB) as u32;
        out.extend_from_slice(&v.read(off, n).await.expect("read"));
        off += u64::from(n);
    }
    out
}

fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feed_has_every_record_once_in_order_with_payloads_fua_and_barriers() {
    for io in engines() {
        let d = tempfile::tempdir().unwrap();
        let size = 4 * MIB;
        let v = open_new(&io, d.path(), size);
        // Written before the attach: not in the feed.
        v.write(0, data(1, 4096), false).await.unwrap();
        let (from, mut feed) = v.attach_feed(usize::MAX);
        assert_eq!(from, 1);

        let mut model = read_all(&v).await;
        let mut rng = StdRng::seed_from_u64(7);
        let mut fua_lsns = Vec::new();
        let mut flush_lsns = Vec::new();
        // 256 KiB segments: plenty of rollovers; 300 KiB writes split into
        // two records; 128..256 KiB writes go in place.
        for i in 0..200u64 {
            let fua = rng.random_range(0..8) == 0;
            let lsn = match rng.random_range(0..10) {
                0..=4 => {
                    let len = rng.random_range(1..=16) * 4096;
                    let off = rng.random_range(0..(size - len) / 4096) * 4096;
                    v.write(off, data(100 + i, len as usize), fua).await.unwrap()
                }
                5 => v.write(rng.random_range(0..size - 300_000), data(100 + i, 300_000), fua).await.unwrap(),
                6 => {
                    v.write(rng.random_range(0..size / 4096 - 64) * 4096, data(100 + i, 200 << 10), fua).await.unwrap()
                }
                7 => v.trim(rng.random_range(0..size - 70_000), rng.random_range(1..70_000), fua).await.unwrap(),
                8 => {
                    let punch = rng.random_bool(0.5);
                    v.write_zeroes(rng.random_range(0..size - 70_000), rng.random_range(1..70_000), punch, fua)
                        .await
                        .unwrap()
                }
                _ => {
                    let l = v.flush().await.unwrap();
                    flush_lsns.push(l);
                    continue;
                }
            };
            if fua {
                fua_lsns.push(lsn);
            }
        }
        let last = v.status().local_lsn;
        let mut next = from + 1;
        let mut barriers = Vec::new();
        let mut fua_seen = Vec::new();
        let mut split = 0;
        while let Some(item) = feed.try_recv() {
            match item {
                FeedItem::Record { lsn, op, fua } => {
                    assert_eq!(lsn, next, "records arrive once each, in LSN order");
                    next += 1;
                    if let FeedOp::Write { data, .. } = &op {
                        assert!(data.len() <= MAX_RECORD_PAYLOAD && !data.is_empty());
                        split += usize::from(data.len() < 300_000 && data.len() > (200 << 10));
                    }
                    if fua {
                        fua_seen.push(lsn);
                    }
                    apply_to_model(&mut model, &op);
                }
                FeedItem::Barrier { upto } => {
                    assert_eq!(upto, next - 1, "a barrier covers every record before it");
                    barriers.push(upto);
                }
                FeedItem::SyncData { .. } | FeedItem::VerifyData { .. } => panic!("no sync or verify read was queued"),
            }
        }
        assert_eq!(next - 1, last, "the feed holds every record up to local_lsn");
        assert_eq!(feed.buffered_bytes(), 0);
        assert_eq!(barriers, flush_lsns, "one barrier per flush, with the flush's LSN");
        assert_eq!(fua_seen, fua_lsns, "FUA is carried by the request's last record");
        assert!(split > 0, "some writes were split across records");
        let image = read_all(&v).await;
        assert_eq!(first_diff(&model, &image), None, "the feed's payloads rebuild the volume");
        v.close().await.unwrap();
    }
}

#[tokio::test]
async fn apply_out_of_sequence_is_refused_and_applies_nothing() {
    let io: Arc<dyn IoEngine> = Arc::new(SyncEngine::new());
    let d = tempfile::tempdir().unwrap();
    let v = open_new(&io, d.path(), MIB);
    let w = |off: u64, seed: u64| FeedOp::Write { offset: off, data: data(seed, 4096) };
    let e = v.apply(2, w(0, 1), false).await.unwrap_err();
    assert!(matches!(e, VolumeError::LsnGap { expected: 1, got: 2 }), "{e}");
    assert_eq!(v.status().local_lsn, 0);
    assert_eq!(v.read(0, 4096).await.unwrap(), Bytes::from(vec![0u8; 4096]));

    // Queued in call order: 1, 2 then a duplicate 2 and 3 in one batch.
    let f1 = v.apply(1, w(0, 1), false);
    let f2 = v.apply(2, w(4096, 2), true);
    let f2b = v.apply(2, w(0, 9), false);
    let f3 = v.apply(3, FeedOp::Trim { offset: 4096, len: 100 }, false);
    f1.await.unwrap();
    f2.await.unwrap();
    assert!(v.status().durable_lsn >= 2, "a FUA record is durable on completion");
    assert!(matches!(f2b.await, Err(VolumeError::LsnGap { expected: 3, got: 2 })));
    f3.await.unwrap();
    assert_eq!(v.status().local_lsn, 3);
    assert_eq!(v.read(0, 4096).await.unwrap(), data(1, 4096), "the refused record wrote nothing");
    let mut second = data(2, 4096).to_vec();
    second[..100].fill(0);
    assert_eq!(v.read(4096, 4096).await.unwrap(), Bytes::from(second));

    // Bad input: clear errors, nothing queued.
    assert!(matches!(v.apply(4, w(MIB, 1), false).await, Err(VolumeError::OutOfRange { .. })));
    assert!(matches!(v.apply(4, FeedOp::Trim { offset: 0, len: 0 }, false).await, Err(VolumeError::Invalid { .. })));
    assert!(matches!(v.apply(0, w(0, 1), false).await, Err(VolumeError::Invalid { .. })));
    let huge = FeedOp::Write { offset: 0, data: Bytes::from(vec![1u8; 512 << 10]) };
    let e = v.apply(4, huge, false).await.unwrap_err();
    assert!(e.to_string().contains("wal_segment_size"), "{e}");
    assert!(matches!(v.queue_sync_read(0, 0), Err(VolumeError::Invalid { .. })));
    assert!(matches!(v.queue_sync_read(MIB - 4096, 8192), Err(VolumeError::OutOfRange { .. })));
    assert!(matches!(v.apply_sync_data(0, Bytes::new()).await, Err(VolumeError::Invalid { .. })));
    assert_eq!(v.status().local_lsn, 3);

    // Replayed after a crash with the same LSNs.
    drop(v);
    let v = reopen(&io, d.path(), MIB);
    assert_eq!(v.status().local_lsn, 3);
    assert_eq!(v.read(0, 4096).await.unwrap(), data(1, 4096));
    v.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_feed_blocks_the_writer_until_consumed_or_detached() {
    let io: Arc<dyn IoEngine> = Arc::new(SyncEngine::new());
    let d = tempfile::tempdir().unwrap();
    let v = open_new(&io, d.path(), 4 * MIB);
    let (_, mut feed) = v.attach_feed(64 << 10);
    // 100 KiB published: over the 64 KiB bound, the next write waits.
    v.write(0, data(1, 100 << 10), false).await.unwrap();
    assert_eq!(feed.buffered_bytes(), 100 << 10);
    let v2 = v.clone();
    let blocked = tokio::spawn(async move { v2.write(MIB, data(2, 4096), false).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!blocked.is_finished(), "the writer must wait while the feed is over its bound");
    assert!(matches!(feed.recv().await, Some(FeedItem::Record { lsn: 1, .. })));
    let lsn =
        tokio::time::timeout(Duration::from_secs(5), blocked).await.expect("consuming releases").unwrap().unwrap();
    assert_eq!(lsn, 2);

    // Fill again, then detach: the writer is released and publishes no more.
    v.write(0, data(3, 100 << 10), false).await.unwrap();
    let v2 = v.clone();
    let blocked = tokio::spawn(async move { v2.write(MIB, data(4, 4096), false).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!blocked.is_finished());
    v.detach_feed();
    tokio::time::timeout(Duration::from_secs(5), blocked).await.expect("detach releases").unwrap().unwrap();
    assert_eq!(feed.recv().await, None, "a detached feed ends");

    // Dropping the receiver detaches too; a new feed starts after the last LSN.
    let (from, feed) = v.attach_feed(1);
    assert_eq!(from, 4);
    v.write(0, data(5, 8192), false).await.unwrap();
    drop(feed);
    tokio::time::timeout(Duration::from_secs(5), v.write(0, data(6, 8192), false)).await.expect("not blocked").unwrap();
    let (from, mut feed) = v.attach_feed(1 << 20);
    assert_eq!(from, 6);
    v.close().await.unwrap();
    assert_eq!(feed.recv().await, None, "nothing published after close");
}

/// Applies a primary's feed to a secondary until `done` is set and the
/// secondary holds `target` LSN and `sync_chunks` sync blocks.
async fn replicate(
    mut feed: Feed,
    dst: Arc<Volume>,
    done: Arc<AtomicBool>,
    target: Arc<AtomicU64>,
    sync_chunks: u64,
) -> (u64, u64) {
    type Pending = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), VolumeError>> + Send>>;
    let mut pending: VecDeque<Pending> = VecDeque::new();
    let (mut applied, mut synced, mut barriers) = (0u64, 0u64, 0u64);
    loop {
        let item = match tokio::time::timeout(Duration::from_millis(50), feed.recv()).await {
            Ok(Some(item)) => item,
            Ok(None) => panic!("feed ended early"),
            Err(_) => {
                if done.load(Ordering::Acquire) && applied == target.load(Ordering::Acquire) && synced == sync_chunks {
                    break;
                }
                continue;
            }
        };
        match item {
            FeedItem::Record { lsn, op, fua } => {
                pending.push_back(Box::pin(dst.apply(lsn, op, fua)));
                applied = lsn;
            }
            FeedItem::Barrier { .. } => {
                while let Some(f) = pending.pop_front() {
                    f.await.expect("apply");
                }
                dst.flush().await.expect("flush");
                barriers += 1;
            }
            FeedItem::SyncData { offset, data } => {
                pending.push_back(Box::pin(dst.apply_sync_data(offset, data)));
                synced += 1;
            }
            FeedItem::VerifyData { .. } => panic!("no verify read was queued"),
        }
        if pending.len() > 64
            && let Some(f) = pending.pop_front()
        {
            f.await.expect("apply");
        }
    }
    for f in pending {
        f.await.expect("apply");
    }
    (synced, barriers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replica_from_feed_and_sync_reads_under_load_is_identical_and_survives_a_crash() {
    for io in engines() {
        replica_scenario(io).await;
    }
}

async fn replica_scenario(io: Arc<dyn IoEngine>) {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let size = 4 * MIB;
    let a = open_new(&io, da.path(), size);
    let b = open_new(&io, db.path(), size);
    // History before the sync: A has 30 records, B 50 unrelated ones (B
    // is ahead: the rebase goes down).
    for i in 0..30u64 {
        a.write(i * 4096 * 7 % (size - 8192), data(i, 8192), false).await.unwrap();
    }
    for i in 0..50u64 {
        b.write(i * 4096 * 5 % (size - 4096), data(1000 + i, 4096), i % 10 == 0).await.unwrap();
    }
    let (from, feed) = a.attach_feed(1 << 20);
    assert_eq!(from, 30);
    b.rebase_log(from).await.unwrap();
    assert_eq!(b.status().local_lsn, 30);
    assert_eq!(b.status().checkpoint_lsn, 30);

    const CHUNK: u32 = 64 << 10;
    let chunks = size / u64::from(CHUNK);
    let done = Arc::new(AtomicBool::new(false));
    let target = Arc::new(AtomicU64::new(0));
    let consumer = tokio::spawn(replicate(feed, b.clone(), done.clone(), target.clone(), chunks));

    // Writers and the sync reader run concurrently.
    let mut tasks = Vec::new();
    for t in 0..3u64 {
        let a = a.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(t);
            for i in 0..150u64 {
                let off = rng.random_range(0..size / 4096 - 64) * 4096;
                let r = match rng.random_range(0..12) {
                    0..=6 => a.write(off, data(t << 32 | i, rng.random_range(1..=8) * 4096), false).await,
                    7 => a.write(off, data(t << 32 | i, 160 << 10), rng.random_bool(0.5)).await,
                    8 => a.trim(off, rng.random_range(1..=16) * 4096, false).await,
                    9 => a.write_zeroes(off, 5000, true, false).await,
                    10 => a.write(off + 3, data(t << 32 | i, 777), true).await,
                    _ => a.flush().await,
                };
                r.expect("primary op");
            }
        }));
    }
    let a2 = a.clone();
    tasks.push(tokio::spawn(async move {
        for c in 0..chunks {
            a2.queue_sync_read(c * u64::from(CHUNK), CHUNK).expect("queue sync read");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }));
    for t in tasks {
        t.await.unwrap();
    }
    a.flush().await.unwrap();
    target.store(a.status().local_lsn, Ordering::Release);
    done.store(true, Ordering::Release);
    let (synced, barriers) =
        tokio::time::timeout(Duration::from_secs(60), consumer).await.expect("replica caught up").unwrap();
    assert_eq!(synced, chunks);
    assert!(barriers > 0);
    b.finish_sync().await.unwrap();
    assert_eq!(b.status().local_lsn, a.status().local_lsn, "same LSNs on both sides");
    assert_eq!(b.status().checkpoint_lsn, b.status().local_lsn, "finish_sync checkpoints at the current LSN");
    let (ia, ib) = (read_all(&a).await, read_all(&b).await);
    assert_eq!(first_diff(&ia, &ib), None, "replica identical to the source");

    // Crash the secondary after finish_sync: nothing older is replayed over
    // the sync data.
    drop(b);
    let b = reopen(&io, db.path(), size);
    assert_eq!(b.status().local_lsn, a.status().local_lsn);
    assert_eq!(b.recovery().replayed, 0);
    assert_eq!(first_diff(&ia, &read_all(&b).await), None, "identical after the crash");
    a.close().await.unwrap();
    b.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebase_then_crash_replays_only_after_the_rebase_point() {
    for io in engines() {
        let d = tempfile::tempdir().unwrap();
        let size = 2 * MIB;
        let v = open_new(&io, d.path(), size);
        // Old log: 40 records over several segments, never checkpointed,
        // all at offset 0..64 KiB.
        for i in 0..40u64 {
            v.write((i % 16) * 4096, data(i, 16 << 10), false).await.unwrap();
        }
        v.rebase_log(100).await.unwrap();
        let st = v.status();
        assert_eq!((st.local_lsn, st.durable_lsn, st.checkpoint_lsn), (100, 100, 100));
        // Full-sync data over the range the old records wrote, then new
        // records elsewhere and one overlapping.
        let sync = data(9, 64 << 10);
        v.apply_sync_data(0, sync.clone()).await.unwrap();
        for l in 101..=110u64 {
            v.apply(l, FeedOp::Write { offset: MIB + l * 4096, data: data(l, 4096) }, false).await.unwrap();
        }
        v.apply(111, FeedOp::Zeroes { offset: 4096, len: 4096, punch: false }, false).await.unwrap();
        let e = v.apply(113, FeedOp::Trim { offset: 0, len: 1 }, false).await.unwrap_err();
        assert!(matches!(e, VolumeError::LsnGap { expected: 112, got: 113 }), "{e}");
        let before = read_all(&v).await;
        let mut expect_sync = sync.to_vec();
        expect_sync[4096..8192].fill(0);
        assert_eq!(&before[..64 << 10], &expect_sync[..]);
        drop(v); // crash: no close

        let v = reopen(&io, d.path(), size);
        assert_eq!(v.status().local_lsn, 111, "LSNs continue after the rebase point");
        assert_eq!(v.recovery().checkpoint_lsn, 100);
        assert_eq!(v.recovery().replayed, 11, "only the records after the rebase are replayed");
        assert_eq!(
            first_diff(&before, &read_all(&v).await),
            None,
            "no record before the rebase replayed over the sync data"
        );
        // The log continues with the primary's LSNs.
        v.apply(112, FeedOp::Write { offset: 0, data: data(5, 4096) }, true).await.unwrap();
        v.close().await.unwrap();
        drop(v);
        let v = reopen(&io, d.path(), size);
        assert_eq!(v.status().local_lsn, 112);
        assert_eq!(v.read(0, 4096).await.unwrap(), data(5, 4096));
        v.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_read_is_ordered_with_the_writes_around_it() {
    let io: Arc<dyn IoEngine> = Arc::new(SyncEngine::new());
    let d = tempfile::tempdir().unwrap();
    let v = open_new(&io, d.path(), MIB);
    // Without a feed a sync read is a no-op (the flush after it makes sure
    // the writer got to it before the attach).
    v.queue_sync_read(0, 4096).unwrap();
    v.flush().await.unwrap();
    let (from, mut feed) = v.attach_feed(1 << 20);
    assert_eq!(from, 0);
    let (x, y) = (data(1, 4096), data(2, 4096));
    v.write(0, x.clone(), false).await.unwrap();
    v.queue_sync_read(0, 8192).unwrap();
    v.write(0, y.clone(), false).await.unwrap();
    v.queue_sync_read(0, 4096).unwrap();
    v.queue_verify_read(0, 4096).unwrap();
    assert!(v.queue_verify_read(MIB - 4096, 8192).is_err(), "a verify read past the end is refused");
    assert!(v.queue_verify_read(0, 0).is_err(), "an empty verify read is refused");
    v.flush().await.unwrap();
    let items: Vec<_> = std::iter::from_fn(|| feed.try_recv()).collect();
    let mut x_then_zero = x.to_vec();
    x_then_zero.resize(8192, 0);
    let rec =
        |lsn, data: &Bytes| FeedItem::Record { lsn, op: FeedOp::Write { offset: 0, data: data.clone() }, fua: false };
    let brief = |items: &[FeedItem]| -> Vec<String> {
        items
            .iter()
            .map(|i| match i {
                FeedItem::Record { lsn, op, fua } => {
                    format!("record {lsn} {:?} fua={fua} crc={:08x}", op.range(), op_crc(op))
                }
                FeedItem::Barrier { upto } => format!("barrier {upto}"),
                FeedItem::SyncData { offset, data } => {
                    format!("sync {offset}+{} crc={:08x}", data.len(), crc32c::crc32c(data))
                }
                FeedItem::VerifyData { offset, data } => {
                    format!("verify {offset}+{} crc={:08x}", data.len(), crc32c::crc32c(data))
                }
            })
            .collect()
    };
    fn op_crc(op: &FeedOp) -> u32 {
        match op {
            FeedOp::Write { data, .. } => crc32c::crc32c(data),
            _ => 0,
        }
    }
    assert_eq!(
        brief(&items),
        brief(&[
            rec(1, &x),
            FeedItem::SyncData { offset: 0, data: Bytes::from(x_then_zero) },
            rec(2, &y),
            FeedItem::SyncData { offset: 0, data: y.clone() },
            FeedItem::VerifyData { offset: 0, data: y.clone() },
            FeedItem::Barrier { upto: 2 },
        ]),
        "a sync (or verify) read sees every earlier write and precedes every later one"
    );
    v.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attaching_under_load_yields_exactly_the_records_after_the_returned_lsn() {
    let io: Arc<dyn IoEngine> = Arc::new(SyncEngine::new());
    let d = tempfile::tempdir().unwrap();
    let v = open_new(&io, d.path(), 4 * MIB);
    let mut writers = Vec::new();
    for t in 0..4u64 {
        let v = v.clone();
        writers.push(tokio::spawn(async move {
            for i in 0..300u64 {
                v.write((t * 300 + i) * 4096 % (4 * MIB), data(i, 4096), i % 50 == 0).await.unwrap();
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (from, mut feed) = v.attach_feed(usize::MAX);
    for w in writers {
        w.await.unwrap();
    }
    let last = v.status().local_lsn;
    assert_eq!(last, 1200);
    let mut next = from + 1;
    while let Some(item) = feed.try_recv() {
        if let FeedItem::Record { lsn, .. } = item {
            assert_eq!(lsn, next, "attached at LSN {from}");
            next += 1;
        }
    }
    assert_eq!(next - 1, last, "no record lost or duplicated around the attach (from {from})");
    v.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finish_sync_then_crash_never_replays_an_older_record_over_sync_data() {
    let io: Arc<dyn IoEngine> = Arc::new(SyncEngine::new());
    let size = MIB;
    let (old, sync) = (data(1, 8192), data(2, 8192));
    for finish in [false, true] {
        let d = tempfile::tempdir().unwrap();
        let v = open_new(&io, d.path(), size);
        v.rebase_log(10).await.unwrap();
        // A record the sync data supersedes (read on the primary after it).
        v.apply(11, FeedOp::Write { offset: 0, data: old.clone() }, false).await.unwrap();
        v.apply_sync_data(0, sync.clone()).await.unwrap();
        if finish {
            v.finish_sync().await.unwrap();
            assert_eq!(v.status().checkpoint_lsn, 11);
        }
        assert_eq!(v.read(0, 8192).await.unwrap(), sync);
        drop(v); // crash
        let v = reopen(&io, d.path(), size);
        assert_eq!(v.status().local_lsn, 11);
        let got = v.read(0, 8192).await.unwrap();
        if finish {
            assert_eq!(v.recovery().replayed, 0);
            assert_eq!(got, sync, "after finish_sync the sync data stays");
        } else {
            // Before the sync finished the disk is inconsistent: replay may
            // put the older record back (the sync restarts). This is what
            // finish_sync's checkpoint prevents.
            assert_eq!(v.recovery().replayed, 1);
            assert_eq!(got, old);
        }
        v.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_segments_and_is_lifted_beyond_wal_retain() {
    let io: Arc<dyn IoEngine> = Arc::new(SyncEngine::new());
    let d = tempfile::tempdir().unwrap();
    let mut opts = small_opts(d.path());
    opts.wal_segment_size = 64 << 10;
    opts.checkpoint_bytes = 64 << 10; // WAL limit: 256 KiB
    opts.wal_retain = 128 << 10;
    let size = 4 * MIB;
    create(&*io, &opts, size);
    let v = Volume::open(io.clone(), opts, &identity(size)).unwrap();

    // Below the limit the hold keeps the segments the peer needs.
    v.set_retain_after(Some(0));
    for i in 0..12u64 {
        v.write(i * 8192, data(i, 8192), false).await.unwrap();
    }
    v.finish_sync().await.unwrap(); // a checkpoint at the current LSN
    assert!(v.status().wal_bytes >= 128 << 10, "held segments stay: {:?}", v.status());
    assert!(!v.retention_lifted());

    // A peer far behind: the kept WAL exceeds wal_retain, the hold is
    // lifted, writes go on.
    let writer = {
        let v = v.clone();
        tokio::spawn(async move {
            for i in 0..96u64 {
                v.write(i * 8192, data(100 + i, 8192), false).await.unwrap();
            }
        })
    };
    tokio::time::timeout(Duration::from_secs(20), writer)
        .await
        .expect("writes never stall on the peer's hold")
        .unwrap();
    assert!(v.retention_lifted());
    v.set_retain_after(Some(5));
    v.finish_sync().await.unwrap();
    assert!(v.status().wal_bytes <= 128 << 10, "a lifted hold is not re-imposed: {:?}", v.status());
    v.set_retain_after(None);
    assert!(!v.retention_lifted());
    for i in 0..96u64 {
        assert_eq!(v.read(i * 8192, 8192).await.unwrap(), data(100 + i, 8192));
    }
    v.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_read_queued_for_one_feed_never_lands_in_the_next() {
    let io: Arc<dyn IoEngine> = Arc::new(SyncEngine::new());
    let d = tempfile::tempdir().unwrap();
    let v = open_new(&io, d.path(), MIB);
    let (_, feed1) = v.attach_feed(1);
    v.write(0, data(1, 8192), false).await.unwrap(); // over the bound: the writer waits
    v.queue_sync_read(0, 4096).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(feed1.buffered_bytes(), 8192, "the sync read waits for room");
    drop(feed1);
    let (from, mut feed2) = v.attach_feed(1 << 20);
    assert_eq!(from, 1);
    v.write(4096, data(2, 4096), false).await.unwrap();
    v.flush().await.unwrap();
    let items: Vec<_> = std::iter::from_fn(|| feed2.try_recv()).collect();
    assert!(matches!(items[..], [FeedItem::Record { lsn: 2, .. }, FeedItem::Barrier { upto: 2 }]), "{:?}", items.len());
    v.close().await.unwrap();
}

/// The engine boxes these futures as `Send` (it runs them on tokio tasks).
#[tokio::test]
async fn replication_futures_are_send() {
    fn is_send<T: Send>(t: T) -> T {
        t
    }
    let io: Arc<dyn IoEngine> = Arc::new(SyncEngine::new());
    let d = tempfile::tempdir().unwrap();
    let v = open_new(&io, d.path(), MIB);
    let (_, mut feed) = v.attach_feed(1 << 20);
    is_send(v.apply(1, FeedOp::Zeroes { offset: 0, len: 512, punch: false }, true)).await.unwrap();
    is_send(v.apply_sync_data(4096, data(1, 4096))).await.unwrap();
    assert!(matches!(is_send(feed.recv()).await, Some(FeedItem::Record { lsn: 1, fua: true, .. })));
    is_send(v.finish_sync()).await.unwrap();
    is_send(v.rebase_log(7)).await.unwrap();
    assert_eq!(v.status().local_lsn, 7);
    v.close().await.unwrap();
}
