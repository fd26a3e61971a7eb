//! Criterion micro-benchmarks of repblock's hot pieces, through its public
//! API (`cargo bench -p repbench`, or `cargo bench` at the workspace root):
//!
//! - `wal/encode/<size>`: appending one WAL write record (header, CRC32C over
//!   header and payload, padding) to a segment buffer, per payload size;
//! - `wal/decode/<size>`: decoding and CRC-checking it back;
//! - `crc32c/<size>`: the checksum alone, the floor of the two above;
//! - `nbd/request-header/parse` and `/encode`: one 28-byte NBD request header.
//!
//! The dirty bitmap (set / scan) belongs to the resync work of issue 4 and
//! has no public API in this tree yet; its benchmark belongs beside it.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use repblock::nbd::proto::{NBD_CMD_WRITE, RequestHeader};
use repblock::volume::wal::{RecordHeader, RecordKind, decode_record, encode_record, encoded_len};

const SIZES: [usize; 4] = [512, 4096, 64 << 10, 1 << 20];
const UUID: u128 = 0x0123_4567_89ab_cdef_0123_4567_89ab_cdef;

fn header(len: usize) -> RecordHeader {
    RecordHeader {
        kind: RecordKind::Write,
        flags: 0,
        lsn: 42,
        offset: 1 << 30,
        length: u32::try_from(len).unwrap_or(u32::MAX),
        durable_lsn: 41,
    }
}

fn wal(c: &mut Criterion) {
    let mut g = c.benchmark_group("wal");
    for size in SIZES {
        let payload: Vec<u8> = (0..size).map(|i| (i * 31 + 7) as u8).collect();
        let h = header(size);
        g.throughput(Throughput::Bytes(size as u64));
        let mut out = Vec::with_capacity(encoded_len(size));
        g.bench_with_input(BenchmarkId::new("encode", size), &size, |b, _| {
            b.iter(|| {
                out.clear();
                encode_record(&mut out, UUID, 7, black_box(&h), black_box(&payload));
                black_box(out.len())
            })
        });
        let mut encoded = Vec::new();
        encode_record(&mut encoded, UUID, 7, &h, &payload);
        g.bench_with_input(BenchmarkId::new("decode", size), &size, |b, _| {
            b.iter(|| {
                let r = decode_record(black_box(&encoded), UUID, 7);
                black_box(r.map(|r| r.payload.len()).unwrap_or(0))
            })
        });
    }
    g.finish();
    let mut g = c.benchmark_group("crc32c");
    for size in SIZES {
        let data = vec![0x5au8; size];
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::from_parameter(size), &size, |b, _| {
            b.iter(|| crc32c::crc32c(black_box(&data)))
        });
    }
    g.finish();
}

fn nbd(c: &mut Criterion) {
    let h = RequestHeader { flags: 0, kind: NBD_CMD_WRITE, cookie: 99, offset: 1 << 20, len: 4096 };
    let bytes = h.encode();
    let mut g = c.benchmark_group("nbd/request-header");
    g.bench_function("parse", |b| b.iter(|| RequestHeader::parse(black_box(&bytes)).map(|h| h.len)));
    g.bench_function("encode", |b| b.iter(|| black_box(&h).encode()));
    g.finish();
}

criterion_group!(benches, wal, nbd);
criterion_main!(benches);
