//! Criterion micro-benchmarks of the hot pieces (issue 5, part 5):
//!
//! - `wal_encode/<size>`: one WAL write record encoded with its CRC32C
//!   (header + payload copy + checksum + padding), per payload size;
//! - `wal_decode/<size>`: the same record validated and decoded (recovery and
//!   the log reader);
//! - `nbd_request_parse`: a pipelined batch of NBD request headers split out
//!   of one receive buffer, as the server's read loop does;
//! - `bitmap/*`: the dirty bitmap (see the group for what exists).
//!
//! Run: `cargo bench --bench micro` (add `-- wal_encode` to filter). Each
//! group reports throughput, so results compare with the memory bandwidth of
//! the machine (`memcpy` of the same size is the floor for `wal_encode`; it
//! is measured alongside as `wal_encode/memcpy`).

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use repblock::nbd::proto::RequestHeader;
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

criterion_group!(benches, wal_encode, wal_decode, nbd_request_parse);
criterion_main!(benches);
