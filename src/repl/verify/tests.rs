use bytes::BytesMut;

use super::*;
use crate::repl::proto::{FrameError, Message, decode, encode};

fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed)).collect()
}

fn round_trip(m: &Message) -> Message {
    let mut b = BytesMut::new();
    encode(m, &mut b).expect("encodes");
    assert_eq!(b.len(), m.encoded_len(), "encoded_len of {m:?}");
    let got = decode(&mut b).expect("decodes").expect("a whole frame");
    assert!(b.is_empty(), "bytes left after {m:?}");
    got
}

#[test]
fn identical_data_compares_equal_and_each_changed_block_is_found() {
    let block = 4096u32;
    let local = data(64 * 1024 + 1000, 1); // the last block is short
    let digests = digest_blocks(&local, block);
    assert_eq!(digests.len(), 17 * VERIFY_DIGEST_LEN);
    assert!(compare(1 << 20, &local, block, &digests).is_empty());

    let mut other = local.clone();
    other[0] ^= 1; // block 0
    other[4096 * 3 + 17] ^= 0x80; // block 3
    other[4096 * 4] ^= 0x80; // block 4: coalesced with 3
    other[local.len() - 1] ^= 1; // the short last block
    let runs = compare(1 << 20, &other, block, &digests);
    assert_eq!(
        runs,
        vec![(1 << 20, 4096), ((1 << 20) + 3 * 4096, 2 * 4096), ((1 << 20) + 16 * 4096, 1000)],
        "runs are absolute, coalesced, and the short block counts its real length"
    );
    assert_eq!(run_bytes(&runs), 4096 + 8192 + 1000);
    check_runs(1 << 20, other.len() as u32, &runs).expect("runs of compare() are valid");
}

#[test]
fn digests_differ_for_blocks_that_crc_style_checks_confuse() {
    // Zero blocks of different lengths and swapped halves hash differently.
    let a = vec![0u8; 4096];
    let b = vec![0u8; 2048];
    assert_ne!(digest(&a), digest(&b));
    let mut c = vec![1u8; 4096];
    c[2048..].fill(2);
    let d = digest(&c);
    c.rotate_left(2048);
    assert_ne!(d, digest(&c));
}

#[test]
fn digest_lengths_must_fit_the_volume() {
    let size = 10 * 4096 + 100;
    assert_eq!(digests_len(0, 4, 4096, size), Ok(4 * 4096));
    assert_eq!(digests_len(8 * 4096, 3, 4096, size), Ok(2 * 4096 + 100), "the last digest covers the tail");
    assert!(digests_len(8 * 4096, 4, 4096, size).is_err(), "a digest past the end");
    assert!(digests_len(0, 0, 4096, size).is_err(), "no digests");
    assert!(digests_len(size, 1, 4096, size).is_err(), "offset at the end");
    assert_eq!(digests_len(0, 1, 4000, size), Err(VerifyError::BadBlock { block: 4000 }));
    assert_eq!(digests_len(0, 1, 256, size), Err(VerifyError::BadBlock { block: 256 }));
    assert!(digests_len(0, usize::MAX, 4096, size).is_err(), "overflow is an error, not a panic");
}

#[test]
fn bad_runs_are_refused() {
    let ok = [(100u64, 10u32), (120, 5)];
    check_runs(100, 100, &ok).expect("valid");
    for bad in [
        vec![(90u64, 20u32)],       // starts before the chunk
        vec![(150, 60)],            // ends after it
        vec![(120, 5), (100, 10)],  // not ascending
        vec![(100, 10), (105, 10)], // overlapping
        vec![(100, 0)],             // empty
        vec![(u64::MAX - 1, 10)],   // overflows
    ] {
        assert!(check_runs(100, 100, &bad).is_err(), "{bad:?} accepted");
    }
}

#[test]
fn the_source_bounds_its_window_and_takes_results_in_order() {
    let total = 3 * VERIFY_CHUNK + 4096;
    let mut v = VerifySource::new(total, 4096).expect("valid block");
    let a = v.next_read(2 * VERIFY_CHUNK, VERIFY_CHUNK).expect("first chunk");
    let b = v.next_read(2 * VERIFY_CHUNK, VERIFY_CHUNK).expect("second chunk");
    assert_eq!(a, (0, VERIFY_CHUNK as u32));
    assert_eq!(b, (VERIFY_CHUNK, VERIFY_CHUNK as u32));
    assert_eq!(v.next_read(2 * VERIFY_CHUNK, VERIFY_CHUNK), None, "window full");
    assert!(v.expects_data(b.0, b.1 as usize));
    assert!(!v.expects_data(b.0, 4096), "a stale read of another size is not ours");
    // Out of order: refused.
    assert!(matches!(v.on_result(b.0, b.1, &[]), Err(VerifyError::UnexpectedResult { .. })));
    assert_eq!(v.on_result(a.0, a.1, &[(4096, 8192)]), Ok(8192));
    let c = v.next_read(2 * VERIFY_CHUNK, VERIFY_CHUNK).expect("room again");
    assert_eq!(c.0, 2 * VERIFY_CHUNK);
    // A window of 0 still lets one chunk through when nothing is in flight.
    assert_eq!(v.on_result(b.0, b.1, &[]), Ok(0));
    assert_eq!(v.on_result(c.0, c.1, &[]), Ok(0));
    let d = v.next_read(0, VERIFY_CHUNK).expect("one chunk always allowed");
    assert_eq!(d, (3 * VERIFY_CHUNK, 4096), "the last chunk is short");
    assert!(!v.is_done());
    assert!(matches!(v.on_result(d.0, d.1, &[(d.0, 8192)]), Err(VerifyError::BadRun { .. })), "run past the chunk");
    assert_eq!(v.on_result(d.0, d.1, &[(d.0, 4096)]), Ok(4096));
    assert!(v.is_done());
    assert_eq!(v.next_read(u64::MAX, VERIFY_CHUNK), None);
    assert_eq!((v.done(), v.out_of_sync()), (total, 8192 + 4096));
    assert!(matches!(v.on_result(0, 1, &[]), Err(VerifyError::UnexpectedResult { .. })), "nothing in flight");

    // Chunks are whole blocks, within 1 block ..= 8 MiB.
    let mut v = VerifySource::new(64 << 20, 4096).expect("valid block");
    assert_eq!(v.next_read(0, 1000), Some((0, 4096)));
    assert_eq!(v.next_read(u64::MAX, 5000), Some((4096, 8192)));
    assert_eq!(v.next_read(u64::MAX, 1 << 40), Some((12288, 8 << 20)));
}

#[test]
fn the_cell_reports_progress_and_the_last_run() {
    let c = VerifyCell::default();
    assert!(c.finish(true, None).is_none(), "nothing running");
    assert!(!c.take_request());
    c.request();
    assert!(c.take_request());
    assert!(!c.take_request(), "taken once");
    c.begin("target", 100);
    c.add(10, 4);
    c.add(10, 0);
    let s = c.status();
    assert!(s.running);
    assert_eq!((s.role.as_deref(), s.done_bytes, s.total_bytes, s.out_of_sync_bytes), (Some("target"), 20, 100, 4));
    let r = c.finish(false, Some("link lost".into())).expect("was running");
    assert_eq!((r.checked_bytes, r.out_of_sync_bytes, r.complete), (20, 4, false));
    let s = c.status();
    assert!(!s.running && s.role.is_none());
    assert_eq!(s.runs_finished, 1);
    assert_eq!(s.last, Some(r));
    c.progress(99, 99);
    assert_eq!(c.status().done_bytes, 20, "no progress without a running verify");
    let json = serde_json::to_value(c.status()).expect("serializes");
    assert_eq!(json["last"]["message"], "link lost");
}

#[test]
fn verify_messages_round_trip() {
    let digests = digest_blocks(&data(3 * 4096, 5), 4096);
    for m in [
        Message::VerifyRequest,
        Message::VerifyStart { total_bytes: 1 << 30, block: 4096 },
        Message::VerifyDigests { offset: 1 << 20, block: 4096, digests },
        Message::VerifyResult { offset: 1 << 20, len: 1 << 20, mismatched: vec![] },
        Message::VerifyResult { offset: 0, len: 1 << 20, mismatched: vec![(4096, 8192), (65536, 4096)] },
        Message::VerifyEnd { checked_bytes: 1 << 30, out_of_sync_bytes: 12288, complete: true, message: String::new() },
        Message::VerifyEnd { checked_bytes: 5, out_of_sync_bytes: 0, complete: false, message: "aborted: ü".into() },
    ] {
        assert_eq!(round_trip(&m), m);
    }
}

#[test]
fn malformed_verify_messages_are_refused_not_panicked_on() {
    // A digest payload that is not a multiple of the digest size cannot be encoded.
    let m = Message::VerifyDigests { offset: 0, block: 4096, digests: Bytes::from(vec![0u8; 17]) };
    assert!(matches!(encode(&m, &mut BytesMut::new()), Err(FrameError::Unencodable { .. })));

    // Hand-made frames: (type, payload) that must be refused.
    let frame = |t: u16, payload: &[u8]| {
        let mut b = BytesMut::new();
        b.extend_from_slice(b"RBRP");
        b.extend_from_slice(&t.to_le_bytes());
        b.extend_from_slice(&0u16.to_le_bytes());
        b.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        let mut crc = crc32c::crc32c(&b[4..12]);
        crc = crc32c::crc32c_append(crc, payload);
        b.extend_from_slice(&crc.to_le_bytes());
        b.extend_from_slice(payload);
        b
    };
    let mut digests_short = Vec::new();
    digests_short.extend_from_slice(&0u64.to_le_bytes());
    digests_short.extend_from_slice(&4096u32.to_le_bytes());
    digests_short.extend_from_slice(&2u32.to_le_bytes()); // 2 digests announced
    digests_short.extend_from_slice(&[0u8; 16]); // 1 present
    let mut digests_huge = digests_short.clone();
    digests_huge[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    let mut result_runs = Vec::new();
    result_runs.extend_from_slice(&0u64.to_le_bytes());
    result_runs.extend_from_slice(&4096u32.to_le_bytes());
    result_runs.extend_from_slice(&u32::MAX.to_le_bytes()); // absurd run count
    let mut end_status = Vec::new();
    end_status.extend_from_slice(&[0u8; 16]);
    end_status.extend_from_slice(&7u16.to_le_bytes()); // unknown status
    end_status.extend_from_slice(&0u16.to_le_bytes());
    for (t, p, what) in [
        (0x40u16, &[1u8, 0, 0, 0][..], "reserved request bits"),
        (0x40, &[][..], "empty request"),
        (0x41, &[0u8; 12][..], "short start"),
        (0x42, &digests_short[..], "digests cut short"),
        (0x42, &digests_huge[..], "digest count over the maximum"),
        (0x43, &result_runs[..], "run count over the maximum"),
        (0x44, &end_status[..], "unknown end status"),
    ] {
        let mut b = frame(t, p);
        match decode(&mut b) {
            Err(FrameError::Malformed { .. }) => {}
            other => panic!("{what}: expected Malformed, got {other:?}"),
        }
    }
    // Trailing bytes after a whole digest list are refused too.
    let mut extra = digests_short.clone();
    extra[12..16].copy_from_slice(&1u32.to_le_bytes());
    extra.push(0);
    assert!(matches!(decode(&mut frame(0x42, &extra)), Err(FrameError::Malformed { .. })));
}
