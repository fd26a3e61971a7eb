//! The §2 reply rules, proven with the in-project proxy adding 10 ms each
//! way on the replication link (RTT 20 ms):
//!
//! | QD1 request        | A        | B         | C         |
//! | ---                | ---      | ---       | ---       |
//! | 4 KiB WRITE        | < 10 ms  | >= 20 ms  | >= 20 ms  |
//! | 4 KiB WRITE + FUA  | < 10 ms  | >= 20 ms  | >= 20 ms  |
//! | FLUSH after a write| < 10 ms  | (see below) | >= 20 ms  |
//!
//! Under B a FLUSH waits for the peer to have *received* up to its LSN; at
//! QD1 the write before it already waited for exactly that, so the FLUSH
//! needs no further round trip and is not bounded here. Under C the write
//! waited for *written* only; the FLUSH must wait for the peer's fdatasync.
//!
//! Medians over 21 requests each. The lower bounds are physical (nothing can
//! come back through the proxy faster than 20 ms); the upper bound for A
//! only needs local WAL writes and an fdatasync to be faster than half an
//! RTT. The three tests run one at a time (a shared lock) so they do not
//! steal each other's CPU.

mod common;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::pair::{Pair, PairOpts, median, ms_since};
use repblock_netproxy::Mode;

const ONE_WAY: Duration = Duration::from_millis(10);
const RTT_MS: f64 = 20.0;
const OPS: usize = 21;

static SERIAL: Mutex<()> = Mutex::new(());

struct Medians {
    write: f64,
    fua: f64,
    flush: f64,
    /// FLUSHes after which alpha's status showed the peer's durable LSN
    /// behind its local one (the FLUSH was answered before the peer had
    /// everything durable).
    flush_ahead_of_peer: usize,
}

fn measure(protocol: &str) -> (Pair, Medians) {
    let pair = Pair::up(PairOpts::new(protocol).proxied());
    let proxies = pair.proxies();
    assert!(proxies.connections() >= 1, "the replication link must go through the proxy (no proxied connection open)");
    proxies.set_delay_both(ONE_WAY);
    // Let pings see the new delay; the link must stay up (500 ms timeout).
    std::thread::sleep(Duration::from_millis(300));
    let bytes_before = proxies.bytes_total();
    let m = pair.rt.block_on(async {
        let c = pair.alpha.nbd().await;
        let block = vec![0xa5u8; 4096];
        // Warm-up (connection, first WAL writes).
        for i in 0..3u64 {
            c.write(i * 4096, &block, false).await.expect("warm-up write");
        }
        c.flush().await.expect("warm-up flush");
        let mut write = Vec::new();
        let mut fua = Vec::new();
        let mut flush = Vec::new();
        let mut flush_ahead_of_peer = 0;
        for i in 0..OPS as u64 {
            let t = Instant::now();
            c.write((16 + i) * 4096, &block, false).await.expect("write");
            write.push(ms_since(t));
            let t = Instant::now();
            c.write((64 + i) * 4096, &block, true).await.expect("FUA write");
            fua.push(ms_since(t));
            c.write((128 + i) * 4096, &block, false).await.expect("write before flush");
            let t = Instant::now();
            c.flush().await.expect("flush");
            flush.push(ms_since(t));
            let st = pair.alpha.status();
            if st["lsn"]["peer_durable"].as_u64() < st["lsn"]["local"].as_u64() {
                flush_ahead_of_peer += 1;
            }
        }
        c.disconnect().await.expect("disconnect");
        eprintln!("protocol {protocol}: write {write:.1?}\nFUA {fua:.1?}\nflush {flush:.1?}");
        Medians { write: median(&mut write), fua: median(&mut fua), flush: median(&mut flush), flush_ahead_of_peer }
    });
    eprintln!(
        "protocol {protocol} medians: write {:.2} ms, FUA write {:.2} ms, flush {:.2} ms",
        m.write, m.fua, m.flush
    );
    // Under A the last writes may still be on their way: let the peer catch
    // up before counting what went through the proxy.
    pair.alpha.wait_status("peer_written catches up", Duration::from_secs(10), |s| {
        s["lsn"]["peer_written"].as_u64() >= s["lsn"]["local"].as_u64()
    });
    let carried = proxies.bytes_total() - bytes_before;
    assert!(
        carried >= (3 * OPS * 4096) as u64,
        "the proxy carried only {carried} bytes during the measurement: the writes were not replicated through it"
    );
    let a = pair.alpha.status();
    assert_eq!(a["connection"], "connected", "the link must stay up under 10 ms delay\n{a:#}");
    (pair, m)
}

#[test]
fn protocol_a_replies_without_waiting_for_the_peer() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (pair, m) = measure("A");
    let half = RTT_MS / 2.0;
    assert!(m.write < half, "protocol A: QD1 write median {:.2} ms, expected < {half} ms (local only)", m.write);
    assert!(m.fua < half, "protocol A: FUA write median {:.2} ms, expected < {half} ms (local fdatasync only)", m.fua);
    assert!(
        m.flush < half,
        "protocol A: FLUSH median {:.2} ms, expected < {half} ms (must not wait for the peer)",
        m.flush
    );
    let a = pair.alpha.status();
    assert_eq!(a["replication"], "established", "everything still reached beta and the link stayed up\n{a:#}");
}

#[test]
fn protocol_b_waits_for_the_peer_to_receive() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (_pair, m) = measure("B");
    let min = RTT_MS - 1.0;
    assert!(
        m.write >= min,
        "protocol B: QD1 write median {:.2} ms, expected >= RTT {RTT_MS} ms (peer received)",
        m.write
    );
    assert!(m.fua >= min, "protocol B: FUA write median {:.2} ms, expected >= RTT {RTT_MS} ms", m.fua);
}

#[test]
fn protocol_c_waits_for_the_peer_to_write_and_sync() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (_pair, m) = measure("C");
    let min = RTT_MS - 1.0;
    assert!(
        m.write >= min,
        "protocol C: QD1 write median {:.2} ms, expected >= RTT {RTT_MS} ms (peer written)",
        m.write
    );
    assert!(m.fua >= min, "protocol C: FUA write median {:.2} ms, expected >= RTT {RTT_MS} ms (peer durable)", m.fua);
    // The FLUSH's own latency is no longer a round trip: under C the peer
    // makes each write durable as soon as its stream pauses, so the durable
    // ack usually arrives while the local fdatasync runs. What must hold is
    // that no FLUSH is answered before the peer has everything durable.
    assert_eq!(
        m.flush_ahead_of_peer, 0,
        "protocol C: a FLUSH was answered while the peer's durable LSN was behind (flush median {:.2} ms)",
        m.flush
    );
}

/// Protocol A is bounded by `max_buffer`: with the link stalled (the proxy
/// stops reading: TCP back-pressure, no close), writes on alpha must stop
/// completing once the feed (`max_buffer = 1MiB`) and the kernel's socket
/// buffers (at most tcp_rmem max + tcp_wmem max, read from /proc) are full,
/// plus 4 MiB of slack for batching, instead of buffering in memory; with
/// the link back, they all complete. A long ping timeout keeps the stalled
/// link from being declared lost (which would release the writes).
#[test]
fn protocol_a_stops_at_max_buffer_when_the_link_stalls() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    const MIB: u64 = 1 << 20;
    const TOTAL_MIB: u64 = 112;
    let pair = Pair::up(
        PairOpts::new("A")
            .size("128MiB")
            .proxied()
            .extra("max_buffer = \"1MiB\"\nping_interval = \"1s\"\nping_timeout = \"60s\""),
    );
    pair.proxies().set_mode(Mode::Stall);
    let client = pair.rt.block_on(pair.alpha.nbd());
    let done = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let writer = pair.rt.spawn({
        let c = client.clone();
        let done = done.clone();
        async move {
            let chunk = vec![0x77u8; MIB as usize];
            for i in 0..TOTAL_MIB {
                c.write(i * MIB, &chunk, false).await?;
                done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Ok::<(), repblock::nbd::ClientError>(())
        }
    });
    std::thread::sleep(Duration::from_secs(8));
    let completed = done.load(std::sync::atomic::Ordering::Relaxed);
    let bound = 1 + kernel_tcp_max("tcp_rmem") / MIB + kernel_tcp_max("tcp_wmem") / MIB + 4;
    assert!(bound < TOTAL_MIB, "this machine's socket buffers ({bound} MiB) are too large for this test");
    eprintln!("protocol A, stalled link: {completed} of {TOTAL_MIB} MiB written after 8 s (bound {bound} MiB)");
    let a = pair.alpha.status();
    assert_eq!(a["connection"], "connected", "the stalled link must not be declared lost (ping_timeout 60s)\n{a:#}");
    assert!(
        completed <= bound,
        "protocol A completed {completed} MiB of writes while the link was stalled, more than max_buffer (1 MiB) + the \
         kernel's socket buffers + 4 MiB = {bound} MiB: the primary buffers beyond max_buffer"
    );
    pair.proxies().set_mode(Mode::Pass);
    let res = pair.rt.block_on(async { tokio::time::timeout(Duration::from_secs(60), writer).await });
    assert!(matches!(res, Ok(Ok(Ok(())))), "with the link back every write completes: {res:?}");
    pair.alpha.wait_status("peer_written catches up", Duration::from_secs(30), |s| {
        s["lsn"]["peer_written"].as_u64() >= s["lsn"]["local"].as_u64()
    });
}

/// The max of /proc/sys/net/ipv4/NAME ("min default max"), in bytes.
fn kernel_tcp_max(name: &str) -> u64 {
    let path = format!("/proc/sys/net/ipv4/{name}");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    text.split_whitespace().nth(2).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{path}: unexpected {text:?}"))
}
