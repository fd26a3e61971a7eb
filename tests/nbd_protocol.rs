//! The NBD server speaking raw protocol bytes over loopback (TCP and a Unix
//! socket), on the in-memory backend: handshake, every option, transmission
//! errors, pipelining, disconnects, connection churn and cap, shutdown. Also
//! the async client against the same server.

mod nbd_common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nbd_common::*;
use repblock::nbd::proto::*;
use repblock::nbd::server::TRANSMISSION_FLAGS;
use repblock::nbd::{BlockError, ClientError, ListenAddr, MemoryBackend, NbdClient, NbdServer, ServerConfig};
use std::sync::Arc;

const MIB: u64 = 1024 * 1024;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

// ---------------------------------------------------------------------------
// Handshake.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn garbage_instead_of_client_flags_closes() {
    let (h, _) = start(MIB).await;
    let mut c = Raw::connect(&h).await;
    c.greeting().await;
    c.send(b"GET / HTTP/1.1\r\n\r\n").await;
    c.expect_closed().await;
    h.shutdown().await;
}

#[tokio::test]
async fn unknown_client_flags_close() {
    let (h, _) = start(MIB).await;
    for flags in [1u32 << 2, 1 << 31, NBD_FLAG_C_FIXED_NEWSTYLE | 1 << 5] {
        let mut c = Raw::connect(&h).await;
        c.hello(flags).await;
        c.expect_closed().await;
    }
    // Known flags (including none at all) are accepted.
    for flags in [0, NBD_FLAG_C_FIXED_NEWSTYLE, NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES] {
        let mut c = Raw::connect(&h).await;
        c.hello(flags).await;
        c.option(NBD_OPT_LIST, &[]).await;
        assert_eq!(c.option_reply().await.1, NBD_REP_SERVER);
        assert_eq!(c.option_reply().await.1, NBD_REP_ACK);
    }
    h.shutdown().await;
}

#[tokio::test]
async fn wrong_option_magic_closes() {
    let (h, _) = start(MIB).await;
    let mut c = Raw::connect(&h).await;
    c.hello(NBD_FLAG_C_FIXED_NEWSTYLE).await;
    let mut b = OptionHeader { option: NBD_OPT_LIST, len: 0 }.encode();
    b[0] ^= 0x01;
    c.send(&b).await;
    c.expect_closed().await;
    h.shutdown().await;
}

#[tokio::test]
async fn list_and_its_errors() {
    let (h, _) = start(MIB).await;
    let mut c = Raw::connect(&h).await;
    c.hello(NBD_FLAG_C_FIXED_NEWSTYLE).await;

    c.option(NBD_OPT_LIST, &[]).await;
    let (opt, rep, data) = c.option_reply().await;
    assert_eq!((opt, rep), (NBD_OPT_LIST, NBD_REP_SERVER));
    assert_eq!(&data[0..4], &2u32.to_be_bytes());
    assert_eq!(&data[4..6], b"r0");
    assert_eq!(&data[6..], b"test export");
    assert_eq!(c.option_reply().await, (NBD_OPT_LIST, NBD_REP_ACK, vec![]));

    c.option(NBD_OPT_LIST, b"x").await;
    let (opt, rep, _) = c.option_reply().await;
    assert_eq!((opt, rep), (NBD_OPT_LIST, NBD_REP_ERR_INVALID));

    // Still usable afterwards.
    c.option(NBD_OPT_STARTTLS, &[]).await;
    assert_eq!(c.option_reply().await.1, NBD_REP_ERR_UNSUP);
    h.shutdown().await;
}

#[tokio::test]
async fn unsupported_options_get_err_unsup_with_data_drained() {
    let (h, _) = start(MIB).await;
    let mut c = Raw::connect(&h).await;
    c.hello(NBD_FLAG_C_FIXED_NEWSTYLE).await;
    // Meta context data as a real client would send it.
    let mut meta = Vec::new();
    meta.extend_from_slice(&2u32.to_be_bytes());
    meta.extend_from_slice(b"r0");
    meta.extend_from_slice(&1u32.to_be_bytes());
    meta.extend_from_slice(&15u32.to_be_bytes());
    meta.extend_from_slice(b"base:allocation");
    let cases: Vec<(u32, Vec<u8>)> = vec![
        (NBD_OPT_LIST_META_CONTEXT, meta.clone()),
        (NBD_OPT_SET_META_CONTEXT, meta),
        (NBD_OPT_EXTENDED_HEADERS, vec![]),
        (NBD_OPT_PEEK_EXPORT, vec![1, 2, 3]),
        (12, vec![0; 100]),
        (0, vec![]),
        (0x7fff_ffff, vec![0xff; 4000]),
        (u32::MAX, vec![7; 65536]),
    ];
    for (opt, data) in cases {
        c.option(opt, &data).await;
        let (o, rep, _) = c.option_reply().await;
        assert_eq!((o, rep), (opt, NBD_REP_ERR_UNSUP), "option {opt}");
    }
    c.option(NBD_OPT_STARTTLS, &[]).await;
    assert_eq!(c.option_reply().await.1, NBD_REP_ERR_UNSUP);
    // The stream is still in sync: a GO works.
    let req = InfoRequest { name: b"r0".to_vec(), requests: vec![] };
    c.option(NBD_OPT_GO, &req.encode()).await;
    loop {
        let (_, rep, _) = c.option_reply().await;
        if rep == NBD_REP_ACK {
            break;
        }
        assert_eq!(rep, NBD_REP_INFO);
    }
    h.shutdown().await;
}

#[tokio::test]
async fn oversized_option_data_closes() {
    let (h, _) = start(MIB).await;
    let mut c = Raw::connect(&h).await;
    c.hello(NBD_FLAG_C_FIXED_NEWSTYLE).await;
    c.send(&OptionHeader { option: 99, len: MAX_OPTION_DATA + 1 }.encode()).await;
    c.expect_closed().await;
    h.shutdown().await;
}

#[tokio::test]
async fn structured_reply_option() {
    let (h, _) = start(MIB).await;
    let mut c = Raw::connect(&h).await;
    c.hello(NBD_FLAG_C_FIXED_NEWSTYLE).await;
    c.option(NBD_OPT_STRUCTURED_REPLY, &[1]).await;
    assert_eq!(c.option_reply().await.1, NBD_REP_ERR_INVALID);
    c.option(NBD_OPT_STRUCTURED_REPLY, &[]).await;
    assert_eq!(c.option_reply().await, (NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK, vec![]));
    h.shutdown().await;
}

/// Collects the replies to an INFO/GO up to the final one.
async fn info_replies(c: &mut Raw, opt: u32) -> (Vec<Vec<u8>>, u32, Vec<u8>) {
    let mut infos = Vec::new();
    loop {
        let (o, rep, data) = c.option_reply().await;
        assert_eq!(o, opt);
        if rep == NBD_REP_INFO {
            infos.push(data);
        } else {
            return (infos, rep, data);
        }
    }
}

#[tokio::test]
async fn info_and_go_replies() {
    let size = 8 * MIB + 512;
    let (h, _) = start(size).await;
    let mut c = Raw::connect(&h).await;
    c.hello(NBD_FLAG_C_FIXED_NEWSTYLE).await;

    // INFO on the named export, asking for name and description.
    let req = InfoRequest { name: b"r0".to_vec(), requests: vec![NBD_INFO_NAME, NBD_INFO_DESCRIPTION, 0x7777] };
    c.option(NBD_OPT_INFO, &req.encode()).await;
    let (infos, last, _) = info_replies(&mut c, NBD_OPT_INFO).await;
    assert_eq!(last, NBD_REP_ACK);
    let mut want = vec![
        info_export(size, TRANSMISSION_FLAGS).to_vec(),
        info_block_size(1, 4096, 32 * 1024 * 1024).to_vec(),
        info_string(NBD_INFO_NAME, "r0"),
        info_string(NBD_INFO_DESCRIPTION, "test export"),
    ];
    let mut got = infos.clone();
    got.sort();
    want.sort();
    assert_eq!(got, want);
    // The flag bits, spelled out.
    let flags = u16::from_be_bytes([infos[0][10], infos[0][11]]);
    assert_eq!(
        flags,
        NBD_FLAG_HAS_FLAGS
            | NBD_FLAG_SEND_FLUSH
            | NBD_FLAG_SEND_FUA
            | NBD_FLAG_SEND_TRIM
            | NBD_FLAG_SEND_WRITE_ZEROES
            | NBD_FLAG_CAN_MULTI_CONN
    );

    // INFO on the default export, no requests: export + block size only.
    c.option(NBD_OPT_INFO, &InfoRequest { name: vec![], requests: vec![] }.encode()).await;
    let (infos, last, _) = info_replies(&mut c, NBD_OPT_INFO).await;
    assert_eq!(last, NBD_REP_ACK);
    assert_eq!(infos.len(), 2);

    // Unknown export.
    c.option(NBD_OPT_INFO, &InfoRequest { name: b"nope".to_vec(), requests: vec![] }.encode()).await;
    let (infos, last, _) = info_replies(&mut c, NBD_OPT_INFO).await;
    assert!(infos.is_empty());
    assert_eq!(last, NBD_REP_ERR_UNKNOWN);
    c.option(NBD_OPT_GO, &InfoRequest { name: b"nope".to_vec(), requests: vec![] }.encode()).await;
    assert_eq!(info_replies(&mut c, NBD_OPT_GO).await.1, NBD_REP_ERR_UNKNOWN);

    // Malformed lengths.
    let mut bad = req.encode();
    bad.push(0);
    // A name longer than the spec's 4096-byte string limit.
    let long = InfoRequest { name: vec![b'a'; 5000], requests: vec![] }.encode();
    for data in [vec![], vec![0, 0, 0, 0, 0], bad, vec![0, 0, 0, 50, 0, 0], long] {
        c.option(NBD_OPT_GO, &data).await;
        let (infos, last, _) = info_replies(&mut c, NBD_OPT_GO).await;
        assert!(infos.is_empty());
        assert_eq!(last, NBD_REP_ERR_INVALID, "data of {} bytes", data.len());
    }

    // Finally GO succeeds and the transmission phase works.
    c.option(NBD_OPT_GO, &req.encode()).await;
    assert_eq!(info_replies(&mut c, NBD_OPT_GO).await.1, NBD_REP_ACK);
    c.request(NBD_CMD_FLUSH, 0, 5, 0, 0, &[]).await;
    assert_eq!(c.simple().await, (0, 5));
    h.shutdown().await;
}

#[tokio::test]
async fn abort_is_acknowledged_then_closed() {
    let (h, _) = start(MIB).await;
    let mut c = Raw::connect(&h).await;
    c.hello(NBD_FLAG_C_FIXED_NEWSTYLE).await;
    c.option(NBD_OPT_ABORT, b"ignored").await;
    assert_eq!(c.option_reply().await, (NBD_OPT_ABORT, NBD_REP_ACK, vec![]));
    c.expect_closed().await;
    h.shutdown().await;
}

#[tokio::test]
async fn export_name_with_and_without_zeroes() {
    let size = 3 * MIB;
    let (h, _) = start(size).await;
    for (no_zeroes, name) in [(false, "r0"), (true, "r0"), (false, ""), (true, "")] {
        let mut c = Raw::connect(&h).await;
        let flags = NBD_FLAG_C_FIXED_NEWSTYLE | if no_zeroes { NBD_FLAG_C_NO_ZEROES } else { 0 };
        c.hello(flags).await;
        c.option(NBD_OPT_EXPORT_NAME, name.as_bytes()).await;
        let b = c.read_exact(10).await;
        assert_eq!(u64::from_be_bytes(b[0..8].try_into().unwrap()), size);
        assert_eq!(u16::from_be_bytes([b[8], b[9]]), TRANSMISSION_FLAGS);
        if !no_zeroes {
            assert_eq!(c.read_exact(124).await, vec![0u8; 124]);
        }
        // Nothing more than that: the next bytes are the reply to our request.
        c.request(NBD_CMD_READ, 0, 77, 0, 4, &[]).await;
        assert_eq!(c.reply(|_| Some(4)).await, Reply::Simple { error: 0, cookie: 77, data: vec![0; 4] });
    }
    // Unknown export: the server cannot answer, so it closes.
    let mut c = Raw::connect(&h).await;
    c.hello(NBD_FLAG_C_FIXED_NEWSTYLE).await;
    c.option(NBD_OPT_EXPORT_NAME, b"other").await;
    c.expect_closed().await;
    h.shutdown().await;
}

#[tokio::test]
async fn handshake_timeout_closes() {
    let cfg = ServerConfig { handshake_timeout: Duration::from_millis(300), ..config() };
    let (h, _) = start_with(MIB, cfg).await;
    let mut c = Raw::connect(&h).await;
    c.greeting().await;
    let t = Instant::now();
    c.expect_closed().await;
    assert!(t.elapsed() >= Duration::from_millis(250), "closed too early: {:?}", t.elapsed());
    // Half a handshake (flags, then silence) is cut too.
    let mut c = Raw::connect(&h).await;
    c.hello(NBD_FLAG_C_FIXED_NEWSTYLE).await;
    c.expect_closed().await;
    h.shutdown().await;
}

// ---------------------------------------------------------------------------
// Transmission.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn read_write_flush_trim_zeroes_simple_and_structured() {
    let size = 4 * MIB;
    let (h, backend) = start(size).await;
    for structured in [false, true] {
        let mut c = Raw::connect(&h).await;
        assert_eq!(c.go(structured).await, (size, TRANSMISSION_FLAGS));
        let data = pattern(10_000, structured as u8);
        c.request(NBD_CMD_WRITE, NBD_CMD_FLAG_FUA, 1, 4093, data.len() as u32, &data).await;
        assert_eq!(c.simple().await, (0, 1));
        c.request(NBD_CMD_READ, 0, 2, 4093, data.len() as u32, &[]).await;
        match c.reply(|_| Some(data.len() as u32)).await {
            Reply::Simple { error: 0, cookie: 2, data: got } if !structured => assert_eq!(got, data),
            Reply::Chunk { flags: NBD_REPLY_FLAG_DONE, kind: NBD_REPLY_TYPE_OFFSET_DATA, cookie: 2, payload }
                if structured =>
            {
                assert_eq!(&payload[..8], &4093u64.to_be_bytes());
                assert_eq!(&payload[8..], &data[..]);
            }
            other => panic!("unexpected {other:?}"),
        }
        c.request(NBD_CMD_FLUSH, NBD_CMD_FLAG_FUA, 3, 0, 0, &[]).await;
        assert_eq!(c.simple().await, (0, 3));
        c.request(NBD_CMD_TRIM, NBD_CMD_FLAG_FUA, 4, 4096, 4096, &[]).await;
        assert_eq!(c.simple().await, (0, 4));
        c.request(NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_NO_HOLE, 5, 8192, 100, &[]).await;
        assert_eq!(c.simple().await, (0, 5));
        let mut want = data.clone();
        want[3..3 + 4096].fill(0);
        want[8192 - 4093..8192 - 4093 + 100].fill(0);
        assert_eq!(backend.snapshot(4093, data.len()), want);
        // The export's last byte, and zero-length requests (success, no data).
        c.request(NBD_CMD_WRITE, 0, 6, size - 1, 1, &[0xaa]).await;
        assert_eq!(c.simple().await, (0, 6));
        for kind in [NBD_CMD_WRITE, NBD_CMD_TRIM, NBD_CMD_WRITE_ZEROES] {
            c.request(kind, 0, 7, size, 0, &[]).await;
            assert_eq!(c.simple().await, (0, 7));
        }
        c.request(NBD_CMD_READ, 0, 8, size, 0, &[]).await;
        let r = c.reply(|_| Some(0)).await;
        if structured {
            assert_eq!(
                r,
                Reply::Chunk { flags: NBD_REPLY_FLAG_DONE, kind: NBD_REPLY_TYPE_NONE, cookie: 8, payload: vec![] }
            );
        } else {
            assert_eq!(r, Reply::Simple { error: 0, cookie: 8, data: vec![] });
        }
    }
    let counters = backend.counters();
    assert_eq!(counters.fua.load(Ordering::Relaxed), 4); // FUA write + FUA trim, twice
    assert_eq!(counters.no_hole.load(Ordering::Relaxed), 2);
    assert_eq!(counters.flushes.load(Ordering::Relaxed), 2);
    h.shutdown().await;
}

/// Reads an error reply in either mode and returns the errno.
async fn error_of(c: &mut Raw, structured: bool, cookie: u64) -> u32 {
    match c.reply(|_| None).await {
        Reply::Simple { error, cookie: got, data } if !structured => {
            assert_eq!(got, cookie);
            assert!(data.is_empty());
            error
        }
        Reply::Chunk { flags, kind, cookie: got, payload } => {
            assert_eq!(got, cookie);
            assert_eq!(flags, NBD_REPLY_FLAG_DONE);
            assert_eq!(kind, NBD_REPLY_TYPE_ERROR);
            let (errno, msg) = parse_error_chunk(&payload).unwrap();
            assert!(!msg.is_empty());
            errno
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn errors_per_spec() {
    let size = MIB;
    let (h, backend) = start(size).await;
    for structured in [false, true] {
        let mut c = Raw::connect(&h).await;
        c.go(structured).await;
        // Out of range.
        c.request(NBD_CMD_READ, 0, 1, size - 10, 11, &[]).await;
        assert_eq!(error_of(&mut c, structured, 1).await, NBD_EINVAL);
        c.request(NBD_CMD_READ, 0, 1, u64::MAX - 1, 4, &[]).await;
        assert_eq!(error_of(&mut c, structured, 1).await, NBD_EINVAL);
        c.request(NBD_CMD_TRIM, 0, 2, size, 1, &[]).await;
        assert_eq!(error_of(&mut c, structured, 2).await, NBD_EINVAL);
        c.request(NBD_CMD_WRITE_ZEROES, 0, 3, size - 1, 2, &[]).await;
        assert_eq!(error_of(&mut c, structured, 3).await, NBD_ENOSPC);
        // Out-of-range write: ENOSPC, payload drained, the next request on the
        // same connection is answered.
        let payload = pattern(70_000, 9);
        c.request(NBD_CMD_WRITE, 0, 4, size - 100, payload.len() as u32, &payload).await;
        c.request(NBD_CMD_READ, 0, 5, 0, 8, &[]).await;
        assert_eq!(error_of(&mut c, structured, 4).await, NBD_ENOSPC);
        assert!(matches!(
            c.reply(|_| Some(8)).await,
            Reply::Simple { error: 0, cookie: 5, .. }
                | Reply::Chunk { cookie: 5, kind: NBD_REPLY_TYPE_OFFSET_DATA, .. }
        ));
        // A write with an invalid flag: EINVAL, drained too.
        c.request(NBD_CMD_WRITE, NBD_CMD_FLAG_NO_HOLE, 6, 0, 5000, &pattern(5000, 1)).await;
        assert_eq!(error_of(&mut c, structured, 6).await, NBD_EINVAL);
        // Oversized read (above the 32 MiB maximum): EINVAL.
        c.request(NBD_CMD_READ, 0, 7, 0, MAX_BLOCK_SIZE + 1, &[]).await;
        assert_eq!(error_of(&mut c, structured, 7).await, NBD_EINVAL);
        // Unknown commands and unknown or unadvertised flags.
        for (kind, flags) in [
            (NBD_CMD_CACHE, 0),
            (NBD_CMD_BLOCK_STATUS, 0),
            (8, 0),
            (0x4242, 0),
            (NBD_CMD_READ, NBD_CMD_FLAG_DF),
            (NBD_CMD_READ, NBD_CMD_FLAG_NO_HOLE),
            (NBD_CMD_TRIM, NBD_CMD_FLAG_REQ_ONE),
            (NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_FAST_ZERO),
            (NBD_CMD_FLUSH, NBD_CMD_FLAG_NO_HOLE),
            (NBD_CMD_READ, 0x8000),
        ] {
            c.request(kind, flags, 8, 0, 512, &[]).await;
            assert_eq!(error_of(&mut c, structured, 8).await, NBD_EINVAL, "kind {kind} flags {flags:#x}");
        }
        // FLUSH with a nonzero offset/length.
        c.request(NBD_CMD_FLUSH, 0, 9, 512, 0, &[]).await;
        assert_eq!(error_of(&mut c, structured, 9).await, NBD_EINVAL);
        // Backend errors map through BlockError::nbd_errno.
        backend.fail_with(repblock::nbd::memory::Op::Flush, BlockError::Shutdown("demoting".into()));
        backend.fail_with(repblock::nbd::memory::Op::Read, BlockError::Io("bad sector".into()));
        c.request(NBD_CMD_FLUSH, 0, 10, 0, 0, &[]).await;
        assert_eq!(error_of(&mut c, structured, 10).await, NBD_ESHUTDOWN);
        c.request(NBD_CMD_READ, 0, 11, 0, 4096, &[]).await;
        assert_eq!(error_of(&mut c, structured, 11).await, NBD_EIO);
        backend.clear_failures();
        // Still in sync after all that.
        c.request(NBD_CMD_WRITE, 0, 12, 0, 3, b"abc").await;
        assert_eq!(c.simple().await, (0, 12));
    }
    assert_eq!(backend.snapshot(size - 100, 100), vec![0u8; 100], "rejected write must not land");
    h.shutdown().await;
}

#[tokio::test]
async fn oversized_write_closes_only_that_connection() {
    let (h, _) = start(64 * MIB).await;
    let mut other = Raw::connect(&h).await;
    other.go(true).await;
    let mut c = Raw::connect(&h).await;
    c.go(false).await;
    c.request(NBD_CMD_WRITE, 0, 1, 0, MAX_BLOCK_SIZE + 1, &[]).await;
    // Some payload follows; the server must close rather than read 32 MiB+.
    let _ = c.try_send(&[0u8; 4096]).await;
    c.expect_closed().await;
    // Bad request magic closes too.
    let mut c = Raw::connect(&h).await;
    c.go(false).await;
    let mut b = RequestHeader { flags: 0, kind: NBD_CMD_READ, cookie: 1, offset: 0, len: 1 }.encode();
    b[3] ^= 0xff;
    c.send(&b).await;
    c.expect_closed().await;
    // The other connection is unaffected. WRITE_ZEROES carries no payload:
    // above the maximum block size it is served (as nbdkit and qemu do).
    other.request(NBD_CMD_WRITE, 0, 9, 0, 2, b"ok").await;
    assert_eq!(other.simple().await, (0, 9));
    other.request(NBD_CMD_WRITE_ZEROES, 0, 10, MIB, MAX_BLOCK_SIZE + 4096, &[]).await;
    assert_eq!(other.simple().await, (0, 10));
    wait_clients(&h, 1).await;
    h.shutdown().await;
}

#[tokio::test]
async fn sixty_four_pipelined_requests() {
    let (h, backend) = start(MIB).await;
    for structured in [false, true] {
        let mut c = Raw::connect(&h).await;
        c.go(structured).await;
        // 32 writes of distinct 8 KiB blocks, then 32 reads of them, all sent
        // before reading any reply (writes and reads may complete in any
        // order: reads target blocks written by an earlier connection pass).
        let seed = structured as u8 * 100;
        let mut batch = Vec::new();
        for i in 0..32u64 {
            let d = pattern(8192, seed + i as u8);
            batch.extend_from_slice(
                &RequestHeader { flags: 0, kind: NBD_CMD_WRITE, cookie: 1000 + i, offset: i * 8192, len: 8192 }
                    .encode(),
            );
            batch.extend_from_slice(&d);
        }
        for i in 0..32u64 {
            batch.extend_from_slice(
                &RequestHeader {
                    flags: 0,
                    kind: NBD_CMD_READ,
                    cookie: 2000 + i,
                    offset: 512 * 1024 + i * 4096,
                    len: 4096,
                }
                .encode(),
            );
        }
        // Readable content for the reads.
        for i in 0..32u64 {
            let off = 512 * 1024 + i * 4096;
            repblock::nbd::BlockBackend::write(&*backend, off, pattern(4096, i as u8 + 7).into(), false).await.unwrap();
        }
        c.send(&batch).await;
        let mut seen = std::collections::HashSet::new();
        for _ in 0..64 {
            let r = c.reply(|cookie| (cookie >= 2000).then_some(4096)).await;
            let cookie = match r {
                Reply::Simple { error: 0, cookie, data } => {
                    if cookie >= 2000 {
                        assert_eq!(data, pattern(4096, (cookie - 2000) as u8 + 7));
                    }
                    cookie
                }
                Reply::Chunk { flags: NBD_REPLY_FLAG_DONE, kind: NBD_REPLY_TYPE_OFFSET_DATA, cookie, payload } => {
                    let i = cookie - 2000;
                    assert_eq!(&payload[..8], &(512 * 1024 + i * 4096).to_be_bytes());
                    assert_eq!(&payload[8..], &pattern(4096, i as u8 + 7)[..]);
                    cookie
                }
                other => panic!("unexpected {other:?}"),
            };
            assert!(seen.insert(cookie), "duplicate reply for {cookie}");
        }
        for i in 0..32u64 {
            assert_eq!(backend.snapshot(i * 8192, 8192), pattern(8192, seed + i as u8));
        }
        c.expect_quiet(Duration::from_millis(50)).await;
    }
    h.shutdown().await;
}

#[tokio::test]
async fn disc_finishes_in_flight_then_closes() {
    let (h, backend) = start(MIB).await;
    let mut c = Raw::connect(&h).await;
    c.go(false).await;
    backend.set_delay(Duration::from_millis(200));
    c.request(NBD_CMD_WRITE, 0, 1, 0, 4, b"data").await;
    c.request(NBD_CMD_DISC, 0, 2, 0, 0, &[]).await;
    assert_eq!(c.simple().await, (0, 1));
    c.expect_closed().await;
    assert_eq!(backend.snapshot(0, 4), b"data");
    // client_count drops back once the connection is gone.
    wait_no_clients(&h).await;
    h.shutdown().await;
}

#[tokio::test]
async fn five_hundred_connections_churn() {
    init_logs();
    let (h, _) = start(MIB).await;
    let addr = match h.listen_addr() {
        ListenAddr::Tcp(a) => a,
        ListenAddr::Unix(_) => unreachable!(),
    };
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..500u32 {
        tasks.spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let mut g = [0u8; GREETING_LEN];
            match i % 5 {
                0 => {} // drop at once
                1 => {
                    // mid-handshake: flags, then half an option header
                    let _ = s.read_exact(&mut g).await;
                    let _ = s.write_all(&NBD_FLAG_C_FIXED_NEWSTYLE.to_be_bytes()).await;
                    let _ = s.write_all(&IHAVEOPT.to_be_bytes()).await;
                }
                2 => {
                    // garbage
                    let _ = s.write_all(&[0xde; 100]).await;
                }
                3 | 4 => {
                    // into transmission, then drop mid-request (half a header,
                    // or a WRITE header without all its payload)
                    let _ = s.read_exact(&mut g).await;
                    let mut b = NBD_FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
                    let go = InfoRequest { name: vec![], requests: vec![] }.encode();
                    b.extend_from_slice(&OptionHeader { option: NBD_OPT_GO, len: go.len() as u32 }.encode());
                    b.extend_from_slice(&go);
                    let req = RequestHeader { flags: 0, kind: NBD_CMD_WRITE, cookie: 1, offset: 0, len: 4096 };
                    if i % 5 == 3 {
                        b.extend_from_slice(&req.encode()[..10]);
                    } else {
                        b.extend_from_slice(&req.encode());
                        b.extend_from_slice(&[1u8; 100]);
                    }
                    let _ = s.write_all(&b).await;
                    // Wait for the GO replies so the server is in transmission.
                    let mut sink = [0u8; 256];
                    let _ = tokio::time::timeout(Duration::from_millis(200), s.read(&mut sink)).await;
                }
                _ => unreachable!(),
            }
        });
    }
    // Every client step ends: the server answers or closes each connection
    // (a listen backlog too small for the burst would leave some hanging).
    let all = async {
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(30), all).await.expect("churn clients hung");
    // A normal client works.
    let client = NbdClient::connect(&h.listen_addr(), EXPORT).await.unwrap();
    client.write(0, b"alive", true).await.unwrap();
    assert_eq!(&client.read(0, 5).await.unwrap()[..], b"alive");
    client.disconnect().await.unwrap();
    wait_no_clients(&h).await;
    h.shutdown().await;
}

#[tokio::test]
async fn connection_cap_enforced() {
    let cfg = ServerConfig { max_connections: 3, ..config() };
    let (h, _) = start_with(MIB, cfg).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut c = Raw::connect(&h).await;
        c.go(false).await;
        held.push(c);
    }
    assert_eq!(h.client_count(), 3);
    // The fourth is accepted and closed without a greeting.
    let mut c = Raw::connect(&h).await;
    c.expect_closed().await;
    // Closing one frees a slot.
    drop(held.pop());
    let t = Instant::now();
    loop {
        let mut c = Raw::connect(&h).await;
        let mut b = [0u8; 1];
        use tokio::io::AsyncReadExt;
        if let Ok(Ok(1)) = tokio::time::timeout(Duration::from_secs(1), c.s.read(&mut b)).await {
            break;
        }
        assert!(t.elapsed() < IO_TIMEOUT, "slot never freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    h.shutdown().await;
}

#[tokio::test]
async fn shutdown_lets_in_flight_request_finish() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    let backend = Arc::new(MemoryBackend::new(MIB));
    let h = NbdServer::start(&ListenAddr::Unix(path.clone()), backend.clone(), config()).await.unwrap();
    assert_eq!(h.local_addr(), path.display().to_string());
    let mut c = Raw::connect(&h).await;
    c.go(true).await;
    let mut idle = Raw::connect(&h).await;
    idle.go(false).await;
    let mut handshaking = Raw::connect(&h).await;
    handshaking.greeting().await;

    backend.set_delay(Duration::from_millis(300));
    c.request(NBD_CMD_WRITE, NBD_CMD_FLAG_FUA, 1, 0, 5, b"hello").await;
    c.request(NBD_CMD_READ, 0, 2, 0, 5, &[]).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let t = Instant::now();
    h.shutdown().await;
    assert!(t.elapsed() >= Duration::from_millis(200), "shutdown did not wait: {:?}", t.elapsed());
    // Both replies went out before the close.
    let mut cookies = vec![];
    for _ in 0..2 {
        match c.reply(|_| None).await {
            Reply::Simple { error: 0, cookie, .. } => cookies.push(cookie),
            Reply::Chunk { flags: NBD_REPLY_FLAG_DONE, kind: NBD_REPLY_TYPE_OFFSET_DATA, cookie, .. } => {
                cookies.push(cookie)
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    cookies.sort();
    assert_eq!(cookies, vec![1, 2]);
    c.expect_closed().await;
    idle.expect_closed().await;
    handshaking.expect_closed().await;
    assert_eq!(backend.snapshot(0, 5), b"hello");
    assert!(!path.exists(), "socket file must be removed on shutdown");
}

#[tokio::test]
async fn unix_socket_stale_file_and_live_server() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    // A stale socket (bound, listener gone) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let addr = ListenAddr::Unix(path.clone());
    let h = NbdServer::start(&addr, Arc::new(MemoryBackend::new(MIB)), config()).await.unwrap();
    // A second server on the same live socket is refused.
    let err = NbdServer::start(&addr, Arc::new(MemoryBackend::new(MIB)), config()).await.err().unwrap();
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
    // A regular file is never removed.
    let file = dir.path().join("file");
    std::fs::write(&file, b"keep").unwrap();
    assert!(
        NbdServer::start(&ListenAddr::Unix(file.clone()), Arc::new(MemoryBackend::new(MIB)), config()).await.is_err()
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"keep");

    let client = NbdClient::connect(&addr, "").await.unwrap();
    assert_eq!(client.size(), MIB);
    client.write(100, b"unix", false).await.unwrap();
    assert_eq!(&client.read(100, 4).await.unwrap()[..], b"unix");
    client.disconnect().await.unwrap();
    h.shutdown().await;
    assert!(!path.exists());
}

// ---------------------------------------------------------------------------
// The async client.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn client_round_trip_and_errors() {
    let size = 48 * MIB;
    let (h, backend) = start(size).await;
    let client = NbdClient::connect(&h.listen_addr(), EXPORT).await.unwrap();
    assert_eq!(client.size(), size);
    assert_eq!(client.flags(), TRANSMISSION_FLAGS);
    assert!(client.structured_replies());
    assert_eq!(client.block_size(), Some((1, 4096, MAX_BLOCK_SIZE)));
    assert_eq!(h.client_count(), 1);

    // Many concurrent requests from many tasks on one connection.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..64u64 {
        let c = client.clone();
        tasks.spawn(async move {
            let d = pattern(65536, i as u8);
            c.write(i * 65536, &d, i % 2 == 0).await.unwrap();
            assert_eq!(&c.read(i * 65536, 65536).await.unwrap()[..], &d[..]);
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    client.flush().await.unwrap();
    // A maximum-size read and write.
    let big = pattern(MAX_BLOCK_SIZE as usize, 3);
    client.write(MIB, &big, false).await.unwrap();
    assert!(client.read(MIB, MAX_BLOCK_SIZE).await.unwrap() == big[..]);
    drop(big);
    client.trim(0, 4096, true).await.unwrap();
    client.write_zeroes(4096, 4096, true, false).await.unwrap();
    assert_eq!(&client.read(0, 8192).await.unwrap()[..], &[0u8; 8192][..]);

    assert!(matches!(client.read(size, 1).await, Err(ClientError::Nbd { errno: NBD_EINVAL })));
    assert!(matches!(client.write(size - 1, b"xy", false).await, Err(ClientError::Nbd { errno: NBD_ENOSPC })));
    assert!(matches!(client.trim(size, 1, false).await, Err(ClientError::Nbd { errno: NBD_EINVAL })));
    assert!(matches!(client.write_zeroes(size, 1, false, false).await, Err(ClientError::Nbd { errno: NBD_ENOSPC })));
    backend.fail_with(repblock::nbd::memory::Op::Write, BlockError::Io("x".into()));
    assert!(matches!(client.write(0, b"a", false).await, Err(ClientError::Nbd { errno: NBD_EIO })));
    backend.clear_failures();

    let c2 = client.clone();
    client.disconnect().await.unwrap();
    assert!(matches!(c2.read(0, 1).await, Err(ClientError::Closed)));
    h.shutdown().await;
}

#[tokio::test]
async fn client_refused_export_and_server_gone() {
    let (h, _) = start(MIB).await;
    let err = NbdClient::connect(&h.listen_addr(), "nope").await.unwrap_err();
    match err {
        ClientError::Protocol(m) => assert!(m.contains("NBD_REP_ERR_UNKNOWN"), "{m}"),
        other => panic!("unexpected {other:?}"),
    }
    let client = NbdClient::connect(&h.listen_addr(), "").await.unwrap();
    h.shutdown().await;
    // The server closed the connection: requests fail, they do not hang.
    let r = tokio::time::timeout(IO_TIMEOUT, client.read(0, 1)).await.unwrap();
    assert!(matches!(r, Err(ClientError::Closed | ClientError::Io(_))), "{r:?}");
}

// ---------------------------------------------------------------------------
// Back-pressure.
// ---------------------------------------------------------------------------

/// Sends `n` 1 MiB READs without reading any reply.
async fn flood_reads(c: &mut Raw, n: u64) {
    let mut batch = Vec::new();
    for i in 0..n {
        let req = RequestHeader { flags: 0, kind: NBD_CMD_READ, cookie: i, offset: (i % 32) * MIB, len: MIB as u32 };
        batch.extend_from_slice(&req.encode());
    }
    c.send(&batch).await;
}

#[tokio::test]
async fn back_pressure_bounds_in_flight_requests() {
    let (h, backend) = start(32 * MIB).await;
    let mut c = Raw::connect(&h).await;
    c.go(false).await;
    let n = 400;
    flood_reads(&mut c, n).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The server stops reading requests once its in-flight budget (64 MiB of
    // READ data) plus what the socket buffers hold is used up.
    let served = backend.counters().reads.load(Ordering::Relaxed);
    eprintln!("served {served} of {n} while the client read nothing");
    assert!(served >= 32, "server served only {served} reads");
    assert!(served <= 128, "server kept reading while the client read nothing: {served} of {n} served");
    // Reading the replies lets everything through, each reply whole.
    let mut seen = std::collections::HashSet::new();
    for _ in 0..n {
        match c.reply(|_| Some(MIB as u32)).await {
            Reply::Simple { error: 0, cookie, data } => {
                assert_eq!(data.len(), MIB as usize);
                assert!(seen.insert(cookie));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(backend.counters().reads.load(Ordering::Relaxed), n);
    h.shutdown().await;
}

#[tokio::test]
async fn shutdown_does_not_wait_forever_for_a_client_that_does_not_read() {
    let (h, backend) = start(32 * MIB).await;
    let mut c = Raw::connect(&h).await;
    c.go(true).await;
    flood_reads(&mut c, 400).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = Instant::now();
    tokio::time::timeout(Duration::from_secs(20), h.shutdown()).await.expect("shutdown hung");
    // Every request the server took was served before shutdown returned.
    let served = backend.counters().reads.load(Ordering::Relaxed);
    assert!(served < 400);
    assert!(t.elapsed() < Duration::from_secs(20));
}

#[tokio::test]
async fn dropping_the_handle_stops_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    let h =
        NbdServer::start(&ListenAddr::Unix(path.clone()), Arc::new(MemoryBackend::new(MIB)), config()).await.unwrap();
    let client = NbdClient::connect(&h.listen_addr(), EXPORT).await.unwrap();
    drop(h);
    // The connection is closed and the socket file goes away.
    let r = tokio::time::timeout(IO_TIMEOUT, client.read(0, 1)).await.unwrap();
    assert!(matches!(r, Err(ClientError::Closed | ClientError::Io(_))), "{r:?}");
    let t = Instant::now();
    while path.exists() {
        assert!(t.elapsed() < IO_TIMEOUT, "socket file not removed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------------------
// Every answer against a model of the spec.
// ---------------------------------------------------------------------------

/// The errno the spec asks for, computed independently of the server.
fn model_errno(kind: u16, flags: u16, offset: u64, len: u32, size: u64) -> u32 {
    let in_range = offset.checked_add(u64::from(len)).is_some_and(|e| e <= size);
    let allowed = match kind {
        NBD_CMD_WRITE_ZEROES => NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE,
        _ => NBD_CMD_FLAG_FUA,
    };
    match kind {
        NBD_CMD_READ | NBD_CMD_WRITE | NBD_CMD_FLUSH | NBD_CMD_TRIM | NBD_CMD_WRITE_ZEROES if flags & !allowed != 0 => {
            NBD_EINVAL
        }
        NBD_CMD_READ if len > MAX_BLOCK_SIZE || !in_range => NBD_EINVAL,
        NBD_CMD_WRITE | NBD_CMD_WRITE_ZEROES if !in_range => NBD_ENOSPC,
        NBD_CMD_TRIM if !in_range => NBD_EINVAL,
        NBD_CMD_FLUSH if offset != 0 || len != 0 => NBD_EINVAL,
        NBD_CMD_READ | NBD_CMD_WRITE | NBD_CMD_FLUSH | NBD_CMD_TRIM | NBD_CMD_WRITE_ZEROES => 0,
        _ => NBD_EINVAL,
    }
}

#[tokio::test]
async fn random_requests_match_the_model() {
    use rand::{Rng, SeedableRng};
    let size = MIB + 123;
    let (h, _) = start(size).await;
    for seed in 0..4u64 {
        let structured = seed % 2 == 1;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut c = Raw::connect(&h).await;
        c.go(structured).await;
        // The model starts from the content the previous connections left.
        let mut model = {
            let client = NbdClient::connect(&h.listen_addr(), EXPORT).await.unwrap();
            let d = client.read(0, size as u32).await.unwrap().to_vec();
            client.disconnect().await.unwrap();
            d
        };
        for i in 0..400u64 {
            let kind = match rng.random_range(0..20) {
                0..=5 => NBD_CMD_READ,
                6..=11 => NBD_CMD_WRITE,
                12..=13 => NBD_CMD_FLUSH,
                14..=15 => NBD_CMD_TRIM,
                16..=17 => NBD_CMD_WRITE_ZEROES,
                18 => rng.random_range(5..=20),
                _ => rng.random(),
            };
            let flags = match rng.random_range(0..10) {
                0..=5 => 0,
                6..=7 => NBD_CMD_FLAG_FUA,
                8 => NBD_CMD_FLAG_NO_HOLE,
                _ => 1 << rng.random_range(0..16),
            };
            let mut offset = match rng.random_range(0..10) {
                0..=7 => rng.random_range(0..size),
                8 => size - rng.random_range(0..100),
                _ => rng.random(),
            };
            let mut len: u32 = match rng.random_range(0..10) {
                0..=7 => rng.random_range(1..=65536),
                8 => 0,
                _ if kind == NBD_CMD_WRITE => rng.random_range(1..=300_000),
                _ => rng.random(),
            };
            if kind == NBD_CMD_FLUSH && rng.random_range(0..4) != 0 {
                (offset, len) = (0, 0);
            }
            let payload: Vec<u8> =
                if kind == NBD_CMD_WRITE { (0..len).map(|_| rng.random()).collect() } else { vec![] };
            c.request(kind, flags, i, offset, len, &payload).await;
            let want = model_errno(kind, flags, offset, len, size);
            let reply = c.reply(|_| (kind == NBD_CMD_READ).then_some(len)).await;
            let what = format!("seed {seed} #{i}: kind {kind} flags {flags:#x} offset {offset} len {len}");
            let (errno, data) = match reply {
                Reply::Simple { error, cookie, data } => {
                    assert_eq!(cookie, i, "{what}");
                    assert!(!(structured && kind == NBD_CMD_READ), "simple reply to a structured READ: {what}");
                    (error, data)
                }
                Reply::Chunk { flags: rf, kind: rk, cookie, payload } => {
                    assert_eq!(cookie, i, "{what}");
                    assert!(structured, "chunk without negotiation: {what}");
                    assert_eq!(rf, NBD_REPLY_FLAG_DONE, "{what}");
                    match rk {
                        NBD_REPLY_TYPE_OFFSET_DATA => {
                            assert_eq!(&payload[..8], &offset.to_be_bytes(), "{what}");
                            (0, payload[8..].to_vec())
                        }
                        NBD_REPLY_TYPE_NONE => (0, vec![]),
                        NBD_REPLY_TYPE_ERROR => (parse_error_chunk(&payload).unwrap().0, vec![]),
                        other => panic!("chunk type {other}: {what}"),
                    }
                }
            };
            assert_eq!(errno, want, "{what}");
            if want != 0 {
                continue;
            }
            let range = offset as usize..(offset + u64::from(len)) as usize;
            match kind {
                NBD_CMD_READ => assert!(data == model[range], "READ content differs: {what}"),
                NBD_CMD_WRITE => model[range].copy_from_slice(&payload),
                NBD_CMD_TRIM | NBD_CMD_WRITE_ZEROES => model[range].fill(0),
                _ => {}
            }
        }
        // The stream is still in sync and the export holds the model.
        c.request(NBD_CMD_DISC, 0, 0, 0, 0, &[]).await;
        c.expect_closed().await;
        let client = NbdClient::connect(&h.listen_addr(), EXPORT).await.unwrap();
        assert!(client.read(0, size as u32).await.unwrap() == model[..], "seed {seed}: final content differs");
        client.disconnect().await.unwrap();
    }
    h.shutdown().await;
}
