//! The proxy library against real loopback sockets: the test holds both the
//! client socket and the upstream's accepted socket, so it sees exactly what
//! crosses the proxy in each direction.
//!
//! Timing assertions are lower bounds (a delay can only make things slower)
//! with generous upper bounds, so a loaded machine cannot make them flaky.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use repblock_netproxy::{Direction, Mode, Proxy, ProxyHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};

const UP: Direction = Direction::ClientToServer;
const DOWN: Direction = Direction::ServerToClient;
/// Upper bound for anything that should happen "at once".
const SOON: Duration = Duration::from_secs(5);
/// How long "nothing arrives" is watched for.
const QUIET: Duration = Duration::from_millis(200);

/// An upstream whose accepted sockets are handed to the test.
struct Upstream {
    addr: SocketAddr,
    conns: mpsc::UnboundedReceiver<TcpStream>,
}

impl Upstream {
    async fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind upstream");
        let addr = listener.local_addr().expect("upstream addr");
        let (tx, conns) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                if tx.send(s).is_err() {
                    return;
                }
            }
        });
        Upstream { addr, conns }
    }

    /// The upstream side of the next proxied connection.
    async fn accept(&mut self) -> TcpStream {
        timeout(SOON, self.conns.recv()).await.expect("upstream saw no connection").expect("upstream gone")
    }
}

/// An upstream that echoes every byte back and half-closes after EOF.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = listener.local_addr().expect("echo addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let (mut r, mut w) = s.split();
                if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                    let _ = w.shutdown().await;
                }
            });
        }
    });
    addr
}

async fn start(upstream: SocketAddr) -> ProxyHandle {
    Proxy::start("127.0.0.1:0".parse().expect("addr"), upstream).await.expect("start proxy")
}

async fn connect(proxy: &ProxyHandle) -> TcpStream {
    let s = TcpStream::connect(proxy.local_addr()).await.expect("connect to proxy");
    s.set_nodelay(true).expect("nodelay");
    s
}

/// Deterministic, non-repeating-looking test data (xorshift64, 8 bytes a
/// step, so tens of MiB stay cheap in debug builds).
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

async fn read_exact(s: &mut TcpStream, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    timeout(SOON, s.read_exact(&mut buf)).await.expect("read timed out").expect("read");
    buf
}

/// Asserts that nothing arrives on `s` for [`QUIET`] and the connection is
/// not closed either.
async fn assert_quiet(s: &mut TcpStream, what: &str) {
    let mut buf = [0u8; 64];
    match timeout(QUIET, s.read(&mut buf)).await {
        Err(_) => {}
        Ok(Ok(0)) => panic!("{what}: connection closed, expected it to stay open"),
        Ok(Ok(n)) => panic!("{what}: {n} bytes arrived, expected none"),
        Ok(Err(e)) => panic!("{what}: {e}, expected the connection to stay open"),
    }
}

/// Asserts that the peer closed `s` (EOF or reset), after draining anything
/// still buffered.
async fn assert_closed(s: &mut TcpStream, what: &str) {
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = Instant::now() + SOON;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => panic!("{what}: still open after {SOON:?}"),
            Ok(Ok(0)) => return,
            Ok(Ok(_)) => continue,
            Ok(Err(e)) if matches!(e.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe) => return,
            Ok(Err(e)) => panic!("{what}: unexpected error {e}"),
        }
    }
}

/// Waits until `f` holds (counters are updated by the proxy's tasks just
/// after the bytes reach the socket, so the test may see the bytes first).
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + SOON;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test]
async fn pass_through_is_byte_exact_with_exact_counters() {
    let mut up = Upstream::start().await;
    let proxy = start(up.addr).await;
    let mut client = connect(&proxy).await;
    let mut server = up.accept().await;

    let request = pattern(1 << 20, 1);
    let reply = pattern(300_001, 2);
    let (got_request, ()) = tokio::join!(read_exact(&mut server, request.len()), async {
        client.write_all(&request).await.expect("client write");
    });
    assert!(got_request == request, "request corrupted on the way up");
    let (got_reply, ()) = tokio::join!(read_exact(&mut client, reply.len()), async {
        server.write_all(&reply).await.expect("server write");
    });
    assert!(got_reply == reply, "reply corrupted on the way down");

    eventually("exact counters", || proxy.bytes(UP) == 1 << 20 && proxy.bytes(DOWN) == 300_001).await;
    assert_eq!(proxy.connections(), 1);
    assert_eq!(proxy.accepted(), 1);

    // Half-closes travel through: the client's FIN reaches the server, which
    // can still answer, then its own FIN reaches the client.
    client.shutdown().await.expect("client shutdown");
    let mut buf = [0u8; 16];
    assert_eq!(timeout(SOON, server.read(&mut buf)).await.expect("server EOF").expect("server read"), 0);
    server.write_all(b"after fin").await.expect("server writes after the client's FIN");
    assert_eq!(read_exact(&mut client, 9).await, b"after fin");
    server.shutdown().await.expect("server shutdown");
    assert_eq!(timeout(SOON, client.read(&mut buf)).await.expect("client EOF").expect("client read"), 0);

    eventually("connection closed", || proxy.connections() == 0).await;
    assert_eq!(proxy.bytes(UP), 1 << 20);
    assert_eq!(proxy.bytes(DOWN), 300_010);

    proxy.reset_counters();
    assert_eq!((proxy.bytes(UP), proxy.bytes(DOWN)), (0, 0));
    assert_eq!(proxy.accepted(), 1, "reset keeps the connection counters");
}

#[tokio::test]
async fn delay_applies_per_direction_and_pipelines() {
    let proxy = start(echo_server().await).await;
    proxy.set_delay_both(Duration::from_millis(10));
    assert_eq!(proxy.delay(UP), Duration::from_millis(10));
    let mut client = connect(&proxy).await;

    // One round trip crosses the delay twice.
    for _ in 0..3 {
        let t = Instant::now();
        client.write_all(b"ping").await.expect("write");
        assert_eq!(read_exact(&mut client, 4).await, b"ping");
        let rtt = t.elapsed();
        assert!(rtt >= Duration::from_millis(20), "round trip {rtt:?} < 20 ms");
        assert!(rtt < SOON, "round trip {rtt:?}");
    }

    // A burst of 1000 messages is delayed once, not 1000 times: the writer
    // runs ahead of the delay, and the echo comes back in order.
    const N: usize = 1000;
    let (mut rd, mut wr) = client.split();
    let t = Instant::now();
    let send = async {
        for i in 0..N as u32 {
            wr.write_all(&i.to_be_bytes()).await.expect("burst write");
        }
    };
    let recv = async {
        let mut buf = vec![0u8; N * 4];
        timeout(SOON, rd.read_exact(&mut buf)).await.expect("burst timed out").expect("burst read");
        buf
    };
    let ((), echoed) = tokio::join!(send, recv);
    let took = t.elapsed();
    let expected: Vec<u8> = (0..N as u32).flat_map(|i| i.to_be_bytes()).collect();
    assert!(echoed == expected, "burst reordered or corrupted");
    assert!(took >= Duration::from_millis(20), "burst took {took:?}, less than one round trip");
    // Serialised on the delay it would take 1000 × 20 ms = 20 s.
    assert!(took < Duration::from_secs(2), "burst took {took:?}: serialised on the delay?");
    eventually("counters", || proxy.bytes(UP) == 12 + 4 * N as u64 && proxy.bytes(DOWN) == 12 + 4 * N as u64).await;
}

#[tokio::test]
async fn delay_in_one_direction_only() {
    let mut up = Upstream::start().await;
    let proxy = start(up.addr).await;
    proxy.set_delay(DOWN, Duration::from_millis(50));
    let mut client = connect(&proxy).await;
    let mut server = up.accept().await;

    // Up is not delayed (not asserted: an upper bound on a loaded machine
    // would be flaky); down takes at least its 50 ms.
    client.write_all(b"up").await.expect("write");
    assert_eq!(read_exact(&mut server, 2).await, b"up");
    let t = Instant::now();
    server.write_all(b"down").await.expect("write");
    assert_eq!(read_exact(&mut client, 4).await, b"down");
    assert!(t.elapsed() >= Duration::from_millis(50), "down took {:?}", t.elapsed());
}

#[tokio::test]
async fn order_kept_when_the_delay_shrinks() {
    let mut up = Upstream::start().await;
    let proxy = start(up.addr).await;
    let mut client = connect(&proxy).await;
    let mut server = up.accept().await;

    proxy.set_delay(UP, Duration::from_millis(100));
    client.write_all(b"first;").await.expect("write");
    // Let the proxy read (and timestamp) the first message under 100 ms.
    tokio::time::sleep(Duration::from_millis(20)).await;
    proxy.set_delay(UP, Duration::ZERO);
    client.write_all(b"second").await.expect("write");
    // "second" is due at once but must not overtake "first".
    assert_eq!(read_exact(&mut server, 12).await, b"first;second");
}

#[tokio::test]
async fn rate_cap_is_respected() {
    let mut up = Upstream::start().await;
    let proxy = start(up.addr).await;
    proxy.set_rate(UP, Some(4 << 20));
    assert_eq!(proxy.rate(UP), Some(4 << 20));
    assert_eq!(proxy.rate(DOWN), None);
    let mut client = connect(&proxy).await;
    let mut server = up.accept().await;

    let data = pattern(1 << 20, 3);
    let t = Instant::now();
    let (got, ()) = tokio::join!(read_exact(&mut server, data.len()), async {
        client.write_all(&data).await.expect("write");
    });
    let took = t.elapsed();
    assert!(got == data);
    // 1 MiB at 4 MiB/s is 250 ms; the first pacing slice goes out at once.
    assert!(took >= Duration::from_millis(200), "1 MiB at 4 MiB/s took {took:?}");
    assert!(took < SOON, "1 MiB at 4 MiB/s took {took:?}");
    eventually("counter", || proxy.bytes(UP) == 1 << 20).await;

    // Lifting the cap: 2 MiB, which the cap would hold for ≥ 450 ms, now
    // take a few milliseconds (the bound leaves a wide margin for load).
    proxy.set_rate(UP, None);
    let data = pattern(2 << 20, 5);
    let t = Instant::now();
    let (got, ()) = tokio::join!(read_exact(&mut server, data.len()), async {
        client.write_all(&data).await.expect("write");
    });
    assert!(got == data);
    assert!(t.elapsed() < Duration::from_millis(450), "uncapped 2 MiB took {:?}", t.elapsed());
}

#[tokio::test]
async fn blackhole_keeps_connections_open_and_drops_data() {
    let mut up = Upstream::start().await;
    let proxy = start(up.addr).await;
    let mut client = connect(&proxy).await;
    let mut server = up.accept().await;
    client.write_all(b"hello").await.expect("write");
    assert_eq!(read_exact(&mut server, 5).await, b"hello");

    proxy.set_mode(Mode::Blackhole);
    assert_eq!(proxy.mode(), Mode::Blackhole);
    client.write_all(b"lost up").await.expect("a blackhole still accepts writes");
    server.write_all(b"lost down").await.expect("a blackhole still accepts writes");
    assert_quiet(&mut server, "server during blackhole").await;
    assert_quiet(&mut client, "client during blackhole").await;
    assert_eq!(proxy.connections(), 1);

    // A half-close does not get through either.
    client.shutdown().await.expect("shutdown");
    assert_quiet(&mut server, "server after client FIN in blackhole").await;

    // Back to pass: new data flows, the dropped bytes are gone for good, and
    // the held FIN is delivered.
    proxy.set_mode(Mode::Pass);
    server.write_all(b"back").await.expect("write");
    assert_eq!(read_exact(&mut client, 4).await, b"back");
    let mut buf = [0u8; 16];
    assert_eq!(timeout(SOON, server.read(&mut buf)).await.expect("FIN").expect("read"), 0);
    eventually("counters without dropped bytes", || proxy.bytes(UP) == 5 && proxy.bytes(DOWN) == 4).await;
}

#[tokio::test]
async fn a_reset_is_held_by_a_blackhole_until_pass() {
    let mut up = Upstream::start().await;
    let proxy = start(up.addr).await;
    let client = connect(&proxy).await;
    let mut server = up.accept().await;
    proxy.set_mode(Mode::Blackhole);
    client.set_zero_linger().expect("linger");
    drop(client);
    assert_quiet(&mut server, "server after a client reset in blackhole").await;
    proxy.set_mode(Mode::Pass);
    assert_closed(&mut server, "server after pass").await;
    eventually("no connection left", || proxy.connections() == 0).await;
}

#[tokio::test]
async fn new_connections_are_blackholed_too() {
    let mut up = Upstream::start().await;
    let proxy = start(up.addr).await;
    proxy.set_mode(Mode::Blackhole);
    // A peer reconnecting into a silent link: TCP connects end to end, the
    // handshake bytes vanish.
    let mut client = connect(&proxy).await;
    let mut server = up.accept().await;
    client.write_all(b"hello?").await.expect("write");
    server.write_all(b"anyone?").await.expect("write");
    assert_quiet(&mut server, "server of a blackholed new connection").await;
    assert_quiet(&mut client, "client of a blackholed new connection").await;
    assert_eq!((proxy.connections(), proxy.accepted()), (1, 1));
    assert_eq!((proxy.bytes(UP), proxy.bytes(DOWN)), (0, 0));
}

#[tokio::test]
async fn blackhole_drops_data_already_in_the_delay_line() {
    let mut up = Upstream::start().await;
    let proxy = start(up.addr).await;
    let mut client = connect(&proxy).await;
    let mut server = up.accept().await;
    proxy.set_delay(UP, Duration::from_millis(100));
    client.write_all(b"in flight").await.expect("write");
    tokio::time::sleep(Duration::from_millis(20)).await;
    proxy.set_mode(Mode::Blackhole);
    tokio::time::sleep(Duration::from_millis(150)).await;
    proxy.set_mode(Mode::Pass);
    client.write_all(b"next").await.expect("write");
    assert_eq!(read_exact(&mut server, 4).await, b"next");
    eventually("only the 4 new bytes counted", || proxy.bytes(UP) == 4).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(proxy.bytes(UP), 4, "dropped bytes counted late");
}

#[tokio::test]
async fn stall_builds_back_pressure_and_loses_nothing() {
    let mut up = Upstream::start().await;
    let proxy = start(up.addr).await;
    let mut client = connect(&proxy).await;
    let mut server = up.accept().await;
    client.write_all(b"before").await.expect("write");
    assert_eq!(read_exact(&mut server, 6).await, b"before");

    proxy.set_mode(Mode::Stall);
    // Let the reader see the mode before data arrives.
    tokio::time::sleep(Duration::from_millis(20)).await;
    // More than the kernel can buffer between the client and the stalled
    // proxy: tcp_wmem max (4 MiB here) + tcp_rmem max (32 MiB here).
    const LEN: usize = 64 << 20;
    let data = pattern(LEN, 4);
    let (mut rd, mut wr) = client.into_split();
    let writer = tokio::spawn({
        let data = data.clone();
        async move { wr.write_all(&data).await.map(|()| wr) }
    });
    assert_quiet(&mut server, "server during stall").await;
    assert!(!writer.is_finished(), "64 MiB fitted into socket buffers: no back-pressure");
    assert_eq!(proxy.connections(), 1);
    assert_eq!(proxy.bytes(UP), 6);

    // Nothing is lost or reordered once the link thaws.
    proxy.set_mode(Mode::Pass);
    let got = read_exact(&mut server, data.len()).await;
    assert!(got == data, "stalled data corrupted");
    let _wr = timeout(SOON, writer).await.expect("writer finished").expect("writer task").expect("write");
    server.write_all(b"reply").await.expect("write");
    let mut buf = [0u8; 5];
    timeout(SOON, rd.read_exact(&mut buf)).await.expect("reply").expect("read");
    assert_eq!(&buf, b"reply");
    eventually("counters", || proxy.bytes(UP) == 6 + LEN as u64 && proxy.bytes(DOWN) == 5).await;
}

#[tokio::test]
async fn refuse_closes_current_and_new_connections() {
    let mut up = Upstream::start().await;
    let proxy = start(up.addr).await;
    let mut client = connect(&proxy).await;
    let mut server = up.accept().await;

    proxy.set_mode(Mode::Refuse);
    assert_closed(&mut client, "client of a refused connection").await;
    assert_closed(&mut server, "server of a refused connection").await;
    eventually("no connection left", || proxy.connections() == 0).await;

    // connect() succeeds at TCP level, then the connection is closed at once
    // and never reaches the upstream.
    let mut refused = connect(&proxy).await;
    assert_closed(&mut refused, "new connection while refusing").await;
    assert_eq!(proxy.accepted(), 2);
    assert!(up.conns.try_recv().is_err(), "a refused connection reached the upstream");

    proxy.set_mode(Mode::Pass);
    let mut client = connect(&proxy).await;
    let mut server = up.accept().await;
    client.write_all(b"again").await.expect("write");
    assert_eq!(read_exact(&mut server, 5).await, b"again");
    assert_eq!(proxy.accepted(), 3);
}

#[tokio::test]
async fn cut_closes_current_connections_only() {
    let mut up = Upstream::start().await;
    let proxy = start(up.addr).await;
    let mut pairs = Vec::new();
    for _ in 0..3 {
        let client = connect(&proxy).await;
        let server = up.accept().await;
        pairs.push((client, server));
    }
    eventually("three connections", || proxy.connections() == 3).await;
    // Data sitting in the delay line is lost with the link.
    proxy.set_delay(UP, Duration::from_millis(200));
    pairs[0].0.write_all(b"never delivered").await.expect("write");

    proxy.cut();
    for (client, server) in &mut pairs {
        assert_closed(client, "client after cut").await;
        assert_closed(server, "server after cut").await;
    }
    eventually("no connection left", || proxy.connections() == 0).await;
    assert_eq!(proxy.bytes(UP), 0);

    proxy.set_delay(UP, Duration::ZERO);
    let mut client = connect(&proxy).await;
    let mut server = up.accept().await;
    client.write_all(b"new").await.expect("write");
    assert_eq!(read_exact(&mut server, 3).await, b"new");
    assert_eq!(proxy.accepted(), 4);
}

#[tokio::test]
async fn many_connections_with_exact_totals() {
    let proxy = start(echo_server().await).await;
    proxy.set_delay_both(Duration::from_millis(1));
    const CONNS: usize = 50;
    const LEN: usize = 10_000;
    let mut tasks = Vec::new();
    for i in 0..CONNS {
        let addr = proxy.local_addr();
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            let data = pattern(LEN, i as u64 + 10);
            let (mut rd, mut wr) = s.split();
            let (echoed, ()) = tokio::join!(
                async {
                    let mut buf = Vec::new();
                    rd.read_to_end(&mut buf).await.expect("read to end");
                    buf
                },
                async {
                    wr.write_all(&data).await.expect("write");
                    wr.shutdown().await.expect("shutdown");
                }
            );
            assert!(echoed == data, "connection {i}: echo differs");
        }));
    }
    for t in tasks {
        timeout(SOON, t).await.expect("client timed out").expect("client failed");
    }
    let total = (CONNS * LEN) as u64;
    eventually("exact totals", || proxy.bytes(UP) == total && proxy.bytes(DOWN) == total).await;
    eventually("all closed", || proxy.connections() == 0).await;
    assert_eq!(proxy.accepted(), CONNS as u64);
}

#[tokio::test]
async fn shutdown_closes_everything() {
    let mut up = Upstream::start().await;
    let proxy = start(up.addr).await;
    let addr = proxy.local_addr();
    let mut client = connect(&proxy).await;
    let mut server = up.accept().await;
    let observer = proxy.clone();

    timeout(SOON, proxy.shutdown()).await.expect("shutdown hung");
    assert_eq!(observer.connections(), 0, "shutdown returned with connections open");
    assert_closed(&mut client, "client after shutdown").await;
    assert_closed(&mut server, "server after shutdown").await;
    let err = TcpStream::connect(addr).await.expect_err("the proxy still listens");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
}

#[tokio::test]
async fn dropping_the_last_handle_stops_the_proxy() {
    let proxy = start(echo_server().await).await;
    let addr = proxy.local_addr();
    let clone = proxy.clone();
    drop(proxy);
    // A clone keeps it alive.
    let mut s = TcpStream::connect(addr).await.expect("connect while a clone lives");
    s.write_all(b"x").await.expect("write");
    let mut b = [0u8; 1];
    timeout(SOON, s.read_exact(&mut b)).await.expect("echo").expect("read");
    drop(clone);
    assert_closed(&mut s, "connection after the last handle dropped").await;
    eventually("listener closed", || std::net::TcpStream::connect(addr).is_err()).await;
}

#[tokio::test]
async fn unreachable_upstream_closes_the_client() {
    // A port nobody listens on: bind, learn the port, close.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let proxy = start(dead).await;
    let mut client = connect(&proxy).await;
    assert_closed(&mut client, "client of an unreachable upstream").await;
    eventually("no connection left", || proxy.connections() == 0).await;
    assert_eq!(proxy.accepted(), 1);
}

#[tokio::test]
async fn a_reset_on_one_side_resets_the_other() {
    let mut up = Upstream::start().await;
    let proxy = start(up.addr).await;
    let client = connect(&proxy).await;
    let mut server = up.accept().await;
    client.set_zero_linger().expect("linger");
    drop(client);
    assert_closed(&mut server, "server after the client reset").await;
    eventually("no connection left", || proxy.connections() == 0).await;
}

#[tokio::test]
async fn lossless_faults_never_lose_or_reorder_data() {
    // Stall, delay and rate changes are the lossless faults: flipping them
    // at random while data streams both ways must not cost a byte.
    let proxy = start(echo_server().await).await;
    let mut client = connect(&proxy).await;
    let data = pattern(8 << 20, 6);
    let flipper = {
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let mut x: u64 = 0x2545_F491_4F6C_DD1D;
            loop {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                match x % 5 {
                    0 => proxy.set_mode(Mode::Stall),
                    1 => proxy.set_mode(Mode::Pass),
                    2 => proxy.set_delay(if x & 8 == 0 { UP } else { DOWN }, Duration::from_micros(x % 3000)),
                    3 => proxy.set_rate(if x & 8 == 0 { UP } else { DOWN }, Some(64 << 20)),
                    _ => proxy.set_rate(if x & 8 == 0 { UP } else { DOWN }, None),
                }
                tokio::time::sleep(Duration::from_micros(500 + x % 3000)).await;
            }
        })
    };
    let (mut rd, mut wr) = client.split();
    let (echoed, ()) = tokio::join!(
        async {
            let mut buf = vec![0u8; data.len()];
            timeout(Duration::from_secs(20), rd.read_exact(&mut buf)).await.expect("echo timed out").expect("read");
            buf
        },
        async {
            wr.write_all(&data).await.expect("write");
        }
    );
    flipper.abort();
    proxy.set_mode(Mode::Pass);
    assert!(echoed == data, "data lost or reordered by lossless faults");
    let len = data.len() as u64;
    eventually("exact counters", || proxy.bytes(UP) == len && proxy.bytes(DOWN) == len).await;
}
