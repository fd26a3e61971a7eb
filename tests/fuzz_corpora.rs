//! The fuzz targets without libFuzzer (issue 15 part 3): every file of the
//! in-tree corpora (`fuzz/corpus/<target>/*`: seeds, and inputs that once
//! crashed) goes through the same entry function as the libFuzzer target
//! (`repblock::fuzzing`), then a few thousand deterministic mutations of
//! each (bit flips, byte stores, truncations, splices), so that CI runs every
//! target briefly. A panic fails the test and prints the input.
//!
//! The seeds are written by `seeds()` below:
//! `cargo test --test fuzz_corpora -- --ignored write_seed_corpora`
//! (re)writes `fuzz/corpus/<target>/seed-*`.

use std::path::{Path, PathBuf};

use bytes::{Bytes, BytesMut};
use repblock::fuzzing::{self, REPL_SECRET, TARGETS, WAL_SEQ, WAL_UUID};
use repblock::model::{DiskState, GenIds, Role};
use repblock::repl::{Hello, Message, RefuseReason};
use repblock::volume::meta::Superblock;
use repblock::volume::wal::{self, RecordHeader, RecordKind, SegmentHeader};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target)
}

/// Mutations per corpus file (deterministic: the same inputs every run).
const MUTATIONS: usize = 300;

/// A small deterministic PRNG (xorshift64*), so that a failure replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 { 0 } else { (self.next() % n as u64) as usize }
    }
}

fn mutate(rng: &mut Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..=rng.below(4) {
        match rng.below(6) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = [0, 0xff, 0x7f, 0x80, 1][rng.below(5)];
            }
            2 => v.truncate(rng.below(v.len() + 1)),
            3 if !v.is_empty() => {
                // A big-endian or little-endian u32 extreme somewhere.
                let i = rng.below(v.len());
                let x = [u32::MAX, 0x8000_0000, 0x7fff_ffff, 0][rng.below(4)].to_be_bytes();
                for (k, b) in x.iter().enumerate() {
                    if let Some(slot) = v.get_mut(i + k) {
                        *slot = *b;
                    }
                }
            }
            4 if !other.is_empty() => {
                let at = rng.below(v.len() + 1);
                let from = rng.below(other.len());
                let n = rng.below(other.len() - from + 1);
                v.splice(at..at, other[from..from + n].iter().copied());
            }
            _ => v.extend((0..rng.below(16)).map(|_| rng.next() as u8)),
        }
    }
    v
}

/// Panics anywhere (also in tasks a target spawns, which the runtime would
/// swallow), counted by a hook installed once.
static PANICS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn count_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            default(info);
        }));
    });
}

fn run_one(target: &str, f: fn(&[u8]), input: &[u8], what: &str) {
    count_panics();
    let before = PANICS.load(std::sync::atomic::Ordering::SeqCst);
    let r = std::panic::catch_unwind(|| f(input));
    if r.is_err() || PANICS.load(std::sync::atomic::Ordering::SeqCst) != before {
        let shown: String = input.iter().take(256).map(|b| format!("{b:02x}")).collect();
        panic!(
            "fuzz target {target} panicked on {what} ({} bytes; save it as fuzz/corpus/{target}/crash-… to keep it): {shown}",
            input.len()
        );
    }
}

/// Every corpus file of every target, and mutations of each.
#[test]
fn every_corpus_input_and_its_mutations_pass_every_target() {
    let mut total = 0usize;
    for (target, f) in TARGETS {
        let dir = corpus_dir(target);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
            .map(|e| e.expect("dir entry").path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "no corpus for fuzz target {target} in {}", dir.display());
        let inputs: Vec<Vec<u8>> = files.iter().map(|p| std::fs::read(p).expect("read corpus file")).collect();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ target.len() as u64);
        for (i, (path, input)) in files.iter().zip(&inputs).enumerate() {
            run_one(target, *f, input, &path.display().to_string());
            let other = &inputs[(i + 1) % inputs.len()];
            for m in 0..MUTATIONS {
                let mutated = mutate(&mut rng, input, other);
                run_one(target, *f, &mutated, &format!("mutation {m} of {}", path.display()));
            }
            total += 1 + MUTATIONS;
        }
    }
    println!("{total} inputs through {} fuzz targets", TARGETS.len());
}

/// The in-tree seeds are what `seeds()` makes (run the ignored writer after
/// changing a format).
#[test]
fn seeds_in_tree_are_current() {
    for (target, name, bytes) in seeds() {
        assert!(fuzzing::target(target).is_some(), "seed for unknown target {target}");
        let path = corpus_dir(target).join(format!("seed-{name}"));
        let have = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e} (write the seeds)", path.display()));
        assert_eq!(
            have,
            bytes,
            "{} is stale: cargo test --test fuzz_corpora -- --ignored write_seed_corpora",
            path.display()
        );
    }
}

#[test]
#[ignore = "writes fuzz/corpus/*/seed-*"]
fn write_seed_corpora() {
    for (target, name, bytes) in seeds() {
        let dir = corpus_dir(target);
        std::fs::create_dir_all(&dir).expect("corpus dir");
        std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("write seed");
    }
}

// ---------------------------------------------------------------------------
// Seeds: valid inputs of each format, made with the project's own encoders.

fn nbd_option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut b = b"IHAVEOPT".to_vec();
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

fn nbd_request(flags: u16, kind: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut b = 0x2560_9513u32.to_be_bytes().to_vec();
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b
}

fn frames(msgs: &[Message]) -> Vec<u8> {
    let mut buf = BytesMut::new();
    for m in msgs {
        repblock::repl::encode(m, &mut buf).expect("encode");
    }
    buf.to_vec()
}

fn hello(node: &str, peer: &str) -> Message {
    Message::Hello(Box::new(Hello {
        min_version: repblock::repl::MIN_PROTOCOL_VERSION,
        max_version: repblock::repl::PROTOCOL_VERSION,
        flags: 0,
        resource: "r0".into(),
        node: node.into(),
        peer: peer.into(),
        size: 64 << 20,
        block_size: 4096,
        gen_ids: GenIds { current: 0x1234_5679, bitmap: 0, history: [0; 4] },
        role: Role::Primary,
        disk: DiskState::UpToDate,
        nonce: [7; 32],
    }))
}

fn record(kind: RecordKind, lsn: u64, offset: u64, payload: &[u8], length: u32) -> Vec<u8> {
    let h = RecordHeader { kind, flags: 0, lsn, offset, length, durable_lsn: lsn.saturating_sub(1) };
    let mut out = Vec::new();
    wal::encode_record(&mut out, WAL_UUID, WAL_SEQ, &h, payload);
    out
}

fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let mut s: Vec<(&'static str, &'static str, Vec<u8>)> = Vec::new();

    // NBD handshake: flags, then options.
    let flags = 3u32.to_be_bytes().to_vec();
    let mut info = Vec::new();
    info.extend_from_slice(&2u32.to_be_bytes());
    info.extend_from_slice(b"r0");
    info.extend_from_slice(&2u16.to_be_bytes());
    info.extend_from_slice(&3u16.to_be_bytes());
    info.extend_from_slice(&2u16.to_be_bytes());
    let go =
        [flags.clone(), nbd_option(8, &[]), nbd_option(3, &[]), nbd_option(6, &info), nbd_option(7, &info)].concat();
    s.push(("nbd_options", "go-structured", go));
    s.push(("nbd_options", "export-name", [flags.clone(), nbd_option(1, b"r0")].concat()));
    s.push((
        "nbd_options",
        "unknown-then-abort",
        [flags.clone(), nbd_option(0x4242, &[1, 2, 3]), nbd_option(2, &[])].concat(),
    ));

    // NBD transmission: a write, reads, flush, trim, zeroes, then DISC.
    let mut reqs = nbd_request(0, 1, 1, 4096, 512);
    reqs.extend_from_slice(&[0xab; 512]);
    reqs.extend(nbd_request(0, 0, 2, 4096, 512));
    reqs.extend(nbd_request(1, 3, 3, 0, 0));
    reqs.extend(nbd_request(0, 4, 4, 0, 8192));
    reqs.extend(nbd_request(2, 6, 5, 8192, 4096));
    reqs.extend(nbd_request(0, 0, 6, (1 << 20) - 512, 4096));
    reqs.extend(nbd_request(0, 2, 7, 0, 0));
    s.push(("nbd_requests", "simple", [&[0u8][..], &reqs].concat()));
    s.push(("nbd_requests", "structured", [&[1u8][..], &reqs].concat()));

    // WAL.
    let write = record(RecordKind::Write, 11, 8192, &[0x5a; 100], 100);
    let trim = record(RecordKind::Trim, 12, 0, &[], 4096);
    s.push(("wal_record", "write", write.clone()));
    s.push(("wal_record", "trim", trim.clone()));
    let mut seg = SegmentHeader { seq: WAL_SEQ, first_lsn: 11, uuid: WAL_UUID, segment_size: 1 << 20 }.encode();
    seg.resize(wal::SEGMENT_HEADER_SIZE as usize, 0);
    seg.extend(&write);
    seg.extend(&trim);
    seg.extend(record(RecordKind::WriteZeroes, 13, 4096, &[], 4096));
    s.push(("wal_segment", "three-records", seg));

    // Replication.
    let stream = frames(&[
        hello("beta", "alpha"),
        Message::Auth { mac: [9; 32] },
        Message::Welcome { version: repblock::repl::PROTOCOL_VERSION },
        Message::State { role: Role::Secondary, disk: DiskState::Consistent, out_of_sync_bytes: 4096 },
        Message::Write { lsn: 5, offset: 4096, fua: true, data: Bytes::from_static(&[1; 64]) },
        Message::Trim { lsn: 6, offset: 0, len: 4096, fua: false },
        Message::Ack { received: 6, written: 5, durable: 4 },
        Message::Refuse { reason: RefuseReason::SizeMismatch, message: "size".into() },
    ]);
    s.push(("repl_frames", "session", stream));
    // The peer's side of a handshake with alpha: its Hello, then an Auth
    // (which cannot match: alpha's nonce is random).
    let mac = repblock::repl::compute_auth(REPL_SECRET, &[0; 32], "beta", "r0").expect("mac");
    s.push(("repl_handshake", "hello-auth", frames(&[hello("beta", "alpha"), Message::Auth { mac }])));
    s.push((
        "repl_handshake",
        "refuse",
        frames(&[Message::Refuse { reason: RefuseReason::WrongSecret, message: "no".into() }]),
    ));

    // Metadata.
    let sb = Superblock {
        flags: 1,
        counter: 3,
        uuid: WAL_UUID,
        size: 64 << 20,
        block_size: 4096,
        disk_state: repblock::model::DiskState::UpToDate,
        checkpoint_lsn: 10,
        replay_seq: WAL_SEQ,
        gen_current: 0x1234_5679,
        gen_bitmap: 0,
        gen_history: [0; 4],
        resource: "r0".into(),
        node: "alpha".into(),
        bitmap_granularity: 4096,
        bitmap_base_lsn: 0,
        peer_written_lsn: 9,
        gen_created_ms: 1_700_000_000_000,
        term: 3,
    };
    s.push(("superblock", "uptodate", sb.encode().expect("superblock")));
    let words: Vec<u64> = (0..511u64).map(|i| if i % 3 == 0 { i.wrapping_mul(0x9e37_79b9) } else { 0 }).collect();
    let page = repblock::volume::bitmap::encode_page(&words, 3, WAL_UUID);
    s.push(("bitmap_page", "full", [&511u16.to_le_bytes()[..], &page].concat()));
    s.push(("bitmap_page", "short-count", [&17u16.to_le_bytes()[..], &page].concat()));

    // Control requests.
    for (name, line) in [
        ("status", r#"{"cmd":"status"}"#),
        ("promote", r#"{"cmd":"promote","force":true}"#),
        ("connect", r#"{"cmd":"connect","discard_my_data":false,"dry_run":true}"#),
        ("wait-sync", r#"{"cmd":"wait-sync","timeout_secs":1.8e19}"#),
        ("array", r#"["demote", true]"#),
    ] {
        s.push(("control_request", name, format!("{line}\n").into_bytes()));
    }

    // Config files.
    s.push((
        "config",
        "single",
        b"name = \"r0\"\nsize = \"64MiB\"\nio_engine = \"sync\"\nnbd_max_inflight = \"64MiB\"\n\n[[node]]\nname = \"alpha\"\nnbd = \"127.0.0.1:10809\"\ncontrol = \"run/alpha.sock\"\ndir = \"alpha\"\n"
            .to_vec(),
    ));
    s.push((
        "config",
        "pair",
        b"name = \"r0\"\nsize = \"1GiB\"\nprotocol = \"C\"\nsecret = \"s\"\nbitmap_granularity = \"64KiB\"\nresync_rate = \"100MiB/s\"\n\n[[node]]\nname = \"alpha\"\nreplication = \"127.0.0.1:7790\"\nnbd = \"127.0.0.1:10809\"\ncontrol = \"/run/a.sock\"\ndir = \"/var/lib/a\"\n\n[[node]]\nname = \"beta\"\nreplication = \"127.0.0.1:7791\"\nnbd = \"unix:/run/b.nbd\"\ncontrol = \"/run/b.sock\"\ndir = \"/var/lib/b\"\n"
            .to_vec(),
    ));
    s
}
