//! Bad input against a real repd (design.md §7): garbage handshakes, unknown
//! options, out-of-range, oversized and unknown requests, and hundreds of
//! connections opened and dropped. Every answer must match the NBD spec, the
//! daemon must survive, and the data written before the barrage must be
//! intact afterwards. (The protocol layer's exhaustive cases live in
//! tests/nbd_protocol.rs against an in-process server; this proves the same
//! on the daemon users run.)

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{RawNbdClient, TestNode};
use repblock::nbd::{ListenAddr, NbdClient};

const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const NBD_REP_ERR_UNSUP: u32 = 0x8000_0001;
const NBD_REP_ACK: u32 = 1;
const NBD_REP_SERVER: u32 = 2;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const MIB: u64 = 1 << 20;

fn request(flags: u16, kind: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(28);
    b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b
}

/// Reads one simple reply; returns (error, cookie).
fn simple_reply(s: &mut TcpStream) -> (u32, u64) {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).expect("a simple reply");
    assert_eq!(u32::from_be_bytes(h[0..4].try_into().unwrap()), SIMPLE_REPLY_MAGIC, "reply magic");
    (u32::from_be_bytes(h[4..8].try_into().unwrap()), u64::from_be_bytes(h[8..16].try_into().unwrap()))
}

fn closed_within(s: &mut TcpStream, wait: Duration) -> bool {
    s.set_read_timeout(Some(wait)).expect("timeout");
    let mut b = [0u8; 64];
    let deadline = Instant::now() + wait;
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            // Whatever the server still sends before closing is fine.
            Ok(_) if Instant::now() < deadline => continue,
            Ok(_) => return false,
            Err(e) => return !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
        }
    }
}

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    s
}

/// Reads the greeting and sends fixed-newstyle client flags.
fn hello(s: &mut TcpStream) {
    let mut g = [0u8; 18];
    s.read_exact(&mut g).expect("greeting");
    assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
    s.write_all(&1u32.to_be_bytes()).expect("client flags");
}

fn option(s: &mut TcpStream, opt: u32, data: &[u8]) {
    let mut b = Vec::new();
    b.extend_from_slice(b"IHAVEOPT");
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).expect("option");
}

/// Reads one option reply: (option, reply type, data).
fn option_reply(s: &mut TcpStream) -> (u32, u32, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).expect("option reply");
    assert_eq!(u64::from_be_bytes(h[0..8].try_into().unwrap()), OPTION_REPLY_MAGIC);
    let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
    let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
    let mut data = vec![0u8; len];
    s.read_exact(&mut data).expect("option reply data");
    (opt, kind, data)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

fn barrage(engine: &str) {
    let node = TestNode::ready(engine);
    let port: u16 = node.nbd_addr().rsplit(':').next().and_then(|p| p.parse().ok()).expect("TCP nbd address");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let addr: ListenAddr = node.nbd_addr().parse().expect("nbd address");

    // Data written and flushed before the barrage.
    let before = pattern(MIB as usize, 7);
    rt.block_on(async {
        let c = NbdClient::connect(&addr, "r0").await.expect("client");
        c.write(4 * MIB, &before, false).await.expect("write");
        c.flush().await.expect("flush");
        c.disconnect().await.expect("disconnect");
    });

    // 1. Garbage instead of client flags, and unknown client flags: closed.
    for i in 0..20u32 {
        let mut s = connect(port);
        let mut g = [0u8; 18];
        s.read_exact(&mut g).expect("greeting");
        let junk = if i % 2 == 0 { 0xdead_beef_u32.to_be_bytes() } else { 0xffff_fff0_u32.to_be_bytes() };
        s.write_all(&junk).expect("junk flags");
        assert!(closed_within(&mut s, Duration::from_secs(5)), "bad client flags must close the connection");
    }

    // 2. Option phase: an unknown option gets NBD_REP_ERR_UNSUP (its data
    // drained), LIST names the export, a wrong option magic closes.
    {
        let mut s = connect(port);
        hello(&mut s);
        option(&mut s, 0x4242, &[0xaa; 300]);
        let (opt, kind, _) = option_reply(&mut s);
        assert_eq!((opt, kind), (0x4242, NBD_REP_ERR_UNSUP));
        option(&mut s, 3, &[]); // NBD_OPT_LIST
        let (_, kind, data) = option_reply(&mut s);
        assert_eq!(kind, NBD_REP_SERVER);
        // u32 name length, the name, then an optional description.
        let name_len = u32::from_be_bytes(data[0..4].try_into().unwrap()) as usize;
        assert_eq!(&data[4..4 + name_len], b"r0", "LIST names the export");
        let (_, kind, _) = option_reply(&mut s);
        assert_eq!(kind, NBD_REP_ACK);
        s.write_all(b"NOTMAGIC\0\0\0\x07\0\0\0\0").expect("bad option magic");
        assert!(closed_within(&mut s, Duration::from_secs(5)), "wrong option magic must close");
    }

    // 3. Transmission: every error per the spec, and the connection stays
    // usable after each recoverable one.
    {
        let mut c = RawNbdClient::connect(port, "r0").expect("raw client");
        let size = c.size;
        let s = &mut c.stream;
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        // Read past the end → EINVAL.
        s.write_all(&request(0, 0, 1, size - 512, 4096)).expect("send");
        assert_eq!(simple_reply(s), (EINVAL, 1), "out-of-range read");
        // Trim past the end → EINVAL.
        s.write_all(&request(0, 4, 2, size, 4096)).expect("send");
        assert_eq!(simple_reply(s), (EINVAL, 2), "out-of-range trim");
        // Write past the end → ENOSPC, its payload drained.
        let mut w = request(0, 1, 3, size - 4096, 8192);
        w.extend_from_slice(&[0x55; 8192]);
        s.write_all(&w).expect("send");
        assert_eq!(simple_reply(s), (ENOSPC, 3), "out-of-range write");
        // Unknown command → EINVAL.
        s.write_all(&request(0, 99, 4, 0, 4096)).expect("send");
        assert_eq!(simple_reply(s), (EINVAL, 4), "unknown command");
        // Unknown flag on a read → EINVAL.
        s.write_all(&request(1 << 12, 0, 5, 0, 4096)).expect("send");
        assert_eq!(simple_reply(s), (EINVAL, 5), "unknown flag");
        // Read larger than the advertised 32 MiB maximum → EINVAL.
        s.write_all(&request(0, 0, 6, 0, 64 << 20)).expect("send");
        assert_eq!(simple_reply(s), (EINVAL, 6), "oversized read");
        // After all that, a valid read is answered with the flushed data.
        s.write_all(&request(0, 0, 7, 4 * MIB, 4096)).expect("send");
        assert_eq!(simple_reply(s), (0, 7), "valid read after errors");
        let mut data = vec![0u8; 4096];
        s.read_exact(&mut data).expect("read data");
        assert_eq!(data, before[..4096], "the connection stayed in sync");
        // A write longer than anything drainable closes this one connection.
        s.write_all(&request(0, 1, 8, 0, 64 << 20)).expect("send");
        assert!(c.closed_within(Duration::from_secs(5)), "an impossible write length closes the connection");
    }

    // 4. Hundreds of connections opened and dropped at every stage.
    for i in 0..300u32 {
        let mut s = connect(port);
        match i % 4 {
            0 => {} // dropped before reading the greeting
            1 => {
                let mut g = [0u8; 10];
                let _ = s.read_exact(&mut g); // mid-greeting
            }
            2 => {
                hello(&mut s);
                option(&mut s, 7, &[0, 0]); // truncated NBD_OPT_GO data, then drop
            }
            _ => {
                drop(s);
                let mut c = RawNbdClient::connect(port, "r0").expect("raw client");
                // Half a request header, then drop.
                c.stream.write_all(&request(0, 1, 9, 0, 4096)[..13]).expect("send");
                continue;
            }
        }
    }

    // The daemon survived: status answers, the volume is healthy, every
    // dropped connection is gone, the flushed data is intact.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let st = node.status();
        assert_eq!(st["role"], "primary");
        assert_eq!(st["failed"], serde_json::Value::Null, "{st}");
        if st["nbd"]["clients"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "dropped connections are still counted: {st}");
        std::thread::sleep(Duration::from_millis(100));
    }
    rt.block_on(async {
        let c = NbdClient::connect(&addr, "r0").await.expect("client after the barrage");
        let got = c.read(4 * MIB, MIB as u32).await.expect("read");
        assert_eq!(&got[..], &before[..], "data written before the barrage is intact");
        c.disconnect().await.expect("disconnect");
    });
    assert!(!node.logs_text().contains("panicked"), "repd panicked:\n{}", node.logs_text());
}

both_engines! {
    bad_input_barrage => barrage;
}
