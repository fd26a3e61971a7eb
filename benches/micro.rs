//! Criterion micro-benchmarks of the hot pieces:
//!
//! - `wal_encode/<size>`: one WAL write record encoded with its CRC32C
//!   (header + payload copy + checksum + padding), per payload size;
//! - `wal_decode/<size>`: the same record validated and decoded (recovery and
//!   the log reader);
//! - `nbd_request_parse`: a pipelined batch of NBD request headers split out
//!   of one receive buffer, as the server's read loop does;
//! - `bitmap/*`: the dirty bitmap of a 1 GiB volume at 4 KiB granularity:
//!   marking scattered 4 KiB writes (the log writer's cost per write while
//!   tracking), walking the dirty runs of a scattered and of a full bitmap
//!   in resync chunks of <= 256 KiB (the sync source's scan), and merging the
//!   peer's bitmap words (connect).
//!
//! Run: `cargo bench --bench micro` (add `-- wal_encode` to filter). Each
//! group reports throughput, so results compare with the memory bandwidth of
//! the machine (`memcpy` of the same size is the floor for `wal_encode`; it
//! is measured alongside as `wal_encode/memcpy`).

use std::hint::black_box;

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use repblock::nbd::proto::RequestHeader;
use repblock::volume::bitmap::DirtyBitmap;
use repblock::volume::wal::{RecordHeader, RecordKind, decode_record, encode_record, encoded_len};

const SIZES: [(usize, &str); 3] = [(4 << 10, "4KiB"), (64 << 10, "64KiB"), (1 << 20, "1MiB")];
const UUID: u128 = 0x0123_4567_89ab_cdef_0123_4567_89ab_cdef;
const SEQ: u64 = 42;

fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(7)).collect()
}

fn header(len: usize) -> RecordHeader {
    RecordHeader {
        kind: RecordKind::Write,
        flags: 0,
        lsn: 123_456,
        offset: 1 << 30,
        length: len as u32,
        durable_lsn: 123_400,
    }
}

fn wal_encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("wal_encode");
    for (len, name) in SIZES {
        let data = payload(len);
        let h = header(len);
        let mut out = Vec::with_capacity(encoded_len(len));
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_with_input(BenchmarkId::new("record", name), &data, |b, data| {
            b.iter(|| {
                out.clear();
                encode_record(&mut out, UUID, SEQ, black_box(&h), black_box(data));
                black_box(out.len())
            })
        });
        group.bench_with_input(BenchmarkId::new("memcpy", name), &data, |b, data| {
            b.iter(|| {
                out.clear();
                out.extend_from_slice(black_box(data));
                black_box(out.len())
            })
        });
    }
    group.finish();
}

fn wal_decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("wal_decode");
    for (len, name) in SIZES {
        let mut buf = Vec::with_capacity(encoded_len(len));
        encode_record(&mut buf, UUID, SEQ, &header(len), &payload(len));
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_with_input(BenchmarkId::new("record", name), &buf, |b, buf| {
            b.iter(|| match decode_record(black_box(buf), UUID, SEQ) {
                Ok(r) => black_box(r.header.lsn),
                Err(e) => panic!("the encoded record must decode: {e:?}"),
            })
        });
    }
    group.finish();
}

fn nbd_request_parse(c: &mut Criterion) {
    // 64 pipelined requests in one receive buffer: 4 KiB WRITEs (header and
    // payload, which the parser skips) alternating with READs and a FLUSH.
    const REQUESTS: usize = 64;
    let mut buf = Vec::new();
    for i in 0..REQUESTS {
        let (kind, len) = match i % 4 {
            0 | 2 => (1u16, 4096u32), // NBD_CMD_WRITE
            1 => (0, 4096),           // NBD_CMD_READ
            _ => (3, 0),              // NBD_CMD_FLUSH
        };
        let h = RequestHeader { flags: 0, kind, cookie: i as u64, offset: (i as u64) << 12, len };
        buf.extend_from_slice(&h.encode());
        if kind == 1 {
            buf.resize(buf.len() + len as usize, 0xab);
        }
    }
    let mut group = c.benchmark_group("nbd_request_parse");
    group.throughput(Throughput::Elements(REQUESTS as u64));
    group.bench_function("pipelined_64", |b| {
        b.iter(|| {
            let mut rest = black_box(&buf[..]);
            let mut cookies = 0u64;
            while RequestHeader::is_complete(rest) {
                let h = match RequestHeader::parse(rest) {
                    Ok(h) => h,
                    Err(e) => panic!("the encoded header must parse: {e:?}"),
                };
                cookies = cookies.wrapping_add(h.cookie);
                let payload = if h.kind == 1 { h.len as usize } else { 0 };
                rest = &rest[RequestHeader::LEN + payload..];
            }
            black_box(cookies)
        })
    });
    group.finish();
}

const VOLUME: u64 = 1 << 30;
const GRANULARITY: u32 = 4096;
/// Resync chunk (the engine coalesces dirty runs up to this size).
const CHUNK: u64 = 256 << 10;

/// `n` distinct pseudo-random 4 KiB-aligned offsets in the volume
/// (deterministic: an LCG, so runs compare).
fn scattered(n: usize) -> Vec<u64> {
    let blocks = VOLUME / u64::from(GRANULARITY);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < n {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        seen.insert((x >> 20) % blocks);
    }
    let mut v: Vec<u64> = seen.into_iter().map(|b| b * u64::from(GRANULARITY)).collect();
    // Shuffle back into a write order (deterministic).
    for i in (1..v.len()).rev() {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        v.swap(i, (x >> 33) as usize % (i + 1));
    }
    v
}

fn new_bitmap() -> DirtyBitmap {
    match DirtyBitmap::new(VOLUME, GRANULARITY) {
        Ok(b) => b,
        Err(e) => panic!("a 1 GiB bitmap at 4 KiB: {e}"),
    }
}

/// Walks every dirty run from offset 0, in chunks of at most [`CHUNK`].
fn walk(bm: &DirtyBitmap) -> (u64, u64) {
    let (mut from, mut runs, mut bytes) = (0u64, 0u64, 0u64);
    while let Some((offset, len)) = bm.next_run(from, CHUNK) {
        runs += 1;
        bytes += len;
        from = offset + len;
    }
    (runs, bytes)
}

fn bitmap(c: &mut Criterion) {
    let mut group = c.benchmark_group("bitmap");
    // 8 MiB of scattered 4 KiB writes on 1 GiB (the bitmap-resync test).
    let writes = scattered(2048);
    group.throughput(Throughput::Elements(writes.len() as u64));
    let empty = new_bitmap();
    group.bench_function("set_range_4k_x2048", |b| {
        b.iter_batched_ref(
            || empty.clone(),
            |bm| {
                let mut added = 0;
                for &off in &writes {
                    added += bm.set_range(black_box(off), 4096);
                }
                black_box(added)
            },
            BatchSize::SmallInput,
        )
    });

    let mut sparse = new_bitmap();
    for &off in &writes {
        sparse.set_range(off, 4096);
    }
    let mut full = new_bitmap();
    full.set_all();
    group.throughput(Throughput::Bytes(VOLUME));
    group.bench_function("scan_1GiB_2048_scattered", |b| b.iter(|| black_box(walk(black_box(&sparse)))));
    group.bench_function("scan_1GiB_full_256KiB_chunks", |b| b.iter(|| black_box(walk(black_box(&full)))));

    let words: Vec<u64> = sparse.words().to_vec();
    group.throughput(Throughput::Bytes(words.len() as u64 * 8));
    group.bench_function("merge_peer_words_1GiB", |b| {
        b.iter_batched_ref(
            || empty.clone(),
            |bm| match bm.merge(0, black_box(&words)) {
                Ok(n) => black_box(n),
                Err(e) => panic!("merge: {e}"),
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, wal_encode, wal_decode, nbd_request_parse, bitmap);
criterion_main!(benches);
