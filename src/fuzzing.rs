//! Fuzz entry points: one function per decoder that untrusted bytes reach.
//!
//! Each takes arbitrary bytes and must return (never panic, never allocate
//! without bound) whatever they hold. The libFuzzer targets in `fuzz/` call
//! them, and `tests/fuzz_corpora.rs` replays the in-tree seed corpora
//! (`fuzz/corpus/<target>/`) through the same functions in the normal test
//! suite, so a crash found once stays fixed. How to run them:
//! docs/reliability.md.
//!
//! | target | what the bytes are |
//! | --- | --- |
//! | `nbd_options` | an NBD client's handshake: client flags, then options (the server's option haggling) |
//! | `nbd_requests` | an NBD client's transmission phase: request headers and payloads (first byte: structured replies) |
//! | `wal_record` | one WAL record as recovery decodes it |
//! | `wal_segment` | a whole WAL segment file: header, then records until the first bad one |
//! | `repl_frames` | a replication stream: frames decoded until the first error |
//! | `repl_handshake` | what the other end of a replication connection sends during the handshake |
//! | `superblock` | one superblock slot of the `meta` file |
//! | `bitmap_page` | one bitmap page of the `meta` file (the first 2 bytes pick the word count) |
//! | `control_request` | one control socket request line |
//! | `config` | a resource config file |

use std::cell::RefCell;
use std::time::Duration;

use bytes::BytesMut;

/// The volume uuid and segment sequence the WAL targets decode under (seed
/// corpora are encoded with them, so mutations reach past the CRC).
pub const WAL_UUID: u128 = 0x5eed_0000_0000_0000_0000_0000_0000_0001;
pub const WAL_SEQ: u64 = 7;
/// The shared secret of the replication handshake target.
pub const REPL_SECRET: &[u8] = b"fuzz-secret";

/// A fuzz target's entry point: any bytes in, a panic only on a defect.
pub type Target = fn(&[u8]);

/// Every target, by name (the file name of its libFuzzer binary and of its
/// corpus directory).
pub const TARGETS: &[(&str, Target)] = &[
    ("nbd_options", nbd_options),
    ("nbd_requests", nbd_requests),
    ("wal_record", wal_record),
    ("wal_segment", wal_segment),
    ("repl_frames", repl_frames),
    ("repl_handshake", repl_handshake),
    ("superblock", superblock),
    ("bitmap_page", bitmap_page),
    ("control_request", control_request),
    ("config", config),
];

/// The target called `name`.
pub fn target(name: &str) -> Option<fn(&[u8])> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
}

thread_local! {
    /// One runtime per thread, reused across inputs (building one per input
    /// would dominate the run time).
    static RUNTIME: RefCell<Option<tokio::runtime::Runtime>> = const { RefCell::new(None) };
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    RUNTIME.with(|rt| {
        let mut rt = rt.borrow_mut();
        let rt = rt.get_or_insert_with(|| {
            tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a current-thread runtime")
        });
        rt.block_on(f)
    })
}

pub fn nbd_options(data: &[u8]) {
    block_on(crate::nbd::server::fuzz::option_haggling(data));
}

pub fn nbd_requests(data: &[u8]) {
    block_on(crate::nbd::server::fuzz::requests(data));
}

pub fn wal_record(data: &[u8]) {
    use crate::volume::wal;
    if let Ok(rec) = wal::decode_record(data, WAL_UUID, WAL_SEQ) {
        assert!(rec.payload.len() < data.len(), "a payload longer than the record's bytes");
    }
}

pub fn wal_segment(data: &[u8]) {
    use crate::volume::wal;
    let Ok(h) = wal::SegmentHeader::decode(data) else { return };
    let mut pos = wal::SEGMENT_HEADER_SIZE as usize;
    let mut lsn = h.first_lsn;
    while pos < data.len() {
        let Ok(rec) = wal::decode_record(&data[pos..], h.uuid, h.seq) else { break };
        if rec.header.lsn != lsn {
            break;
        }
        pos += rec.encoded_len();
        lsn = lsn.wrapping_add(1);
    }
}

pub fn repl_frames(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(_msg)) = crate::repl::decode(&mut buf) {}
}

pub fn repl_handshake(data: &[u8]) {
    use crate::model::{DiskState, GenIds, Role};
    let local = crate::repl::LocalHello {
        resource: "r0".into(),
        node: "alpha".into(),
        peer: "beta".into(),
        size: 64 << 20,
        block_size: 4096,
        gen_ids: GenIds::default(),
        role: Role::Secondary,
        disk: DiskState::UpToDate,
        secret: REPL_SECRET.to_vec(),
    };
    let mut stream = tokio::io::join(std::io::Cursor::new(data.to_vec()), tokio::io::sink());
    let _ = block_on(crate::repl::handshake(&mut stream, &local, Duration::from_secs(5)));
}

pub fn superblock(data: &[u8]) {
    use crate::volume::meta::Superblock;
    if let Ok(sb) = Superblock::decode(data) {
        // What decodes encodes again to the same slot.
        let again = sb.encode().expect("a decoded superblock encodes");
        assert_eq!(Superblock::decode(&again).expect("re-decode"), sb);
    }
}

pub fn bitmap_page(data: &[u8]) {
    let (n, page) = match data {
        [a, b, rest @ ..] => (usize::from(u16::from_le_bytes([*a, *b])), rest),
        _ => return,
    };
    let _ = crate::volume::bitmap::decode_page(page, 3, WAL_UUID, n);
}

pub fn control_request(data: &[u8]) {
    if let Ok(req) = crate::control::parse_request(data) {
        // What parses serializes and parses back to the same request.
        let line = serde_json::to_vec(&req).expect("a request serializes");
        assert_eq!(crate::control::parse_request(&line).expect("re-parse"), req);
    }
}

pub fn config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crate::config::Config::from_toml(std::path::Path::new("/fuzz/r0.toml"), text);
    }
}
