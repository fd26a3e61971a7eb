//! The proxy's own cost, measured against a direct loopback connection in the
//! same run (a ratio, since absolute numbers mean little on a shared
//! machine). Ignored by default; run with
//! `cargo test --release -p repblock-netproxy --test netproxy_throughput -- --ignored --nocapture`.

use std::net::SocketAddr;
use std::time::Duration;

use repblock_netproxy::Proxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// A sink that reads everything and answers one byte at EOF.
async fn sink() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 1 << 20];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        let _ = s.write_all(b"!").await;
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Streams `total` bytes to `addr` and returns MiB/s (until the sink's ack).
async fn stream(addr: SocketAddr, total: usize) -> f64 {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let buf = vec![0x5au8; 1 << 20];
    let t = Instant::now();
    let mut sent = 0;
    while sent < total {
        s.write_all(&buf).await.expect("write");
        sent += buf.len();
    }
    s.shutdown().await.expect("shutdown");
    let mut ack = [0u8; 1];
    s.read_exact(&mut ack).await.expect("ack");
    sent as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64()
}

/// QD1 ping-pong round trips per second over `addr` (an echo of 4 bytes).
async fn ping_pong(addr: SocketAddr, n: usize) -> Duration {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.set_nodelay(true).expect("nodelay");
    let t = Instant::now();
    let mut buf = [0u8; 4];
    for _ in 0..n {
        s.write_all(b"ping").await.expect("write");
        s.read_exact(&mut buf).await.expect("read");
    }
    t.elapsed() / n as u32
}

async fn echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, not a check: run explicitly in release mode"]
async fn proxy_cost_against_direct_loopback() {
    const TOTAL: usize = 1 << 30;
    let sink = sink().await;
    let proxy = Proxy::start("127.0.0.1:0".parse().expect("addr"), sink).await.expect("start");
    let direct = stream(sink, TOTAL).await;
    let proxied = stream(proxy.local_addr(), TOTAL).await;
    println!("stream 1 GiB: direct {direct:.0} MiB/s, proxied {proxied:.0} MiB/s, ratio {:.2}", proxied / direct);

    let echo = echo().await;
    let proxy = Proxy::start("127.0.0.1:0".parse().expect("addr"), echo).await.expect("start");
    let direct = ping_pong(echo, 5000).await;
    let proxied = ping_pong(proxy.local_addr(), 5000).await;
    println!("QD1 round trip: direct {direct:?}, proxied {proxied:?}, added {:?}", proxied.saturating_sub(direct));
    assert!(proxy.bytes(repblock_netproxy::Direction::ClientToServer) == 5000 * 4);

    // How precisely a delay is honoured: the benchmarks use 0.5 ms and
    // 2.5 ms each way for 1 ms and 5 ms RTT.
    for each_way_us in [100u64, 500, 2500] {
        proxy.set_delay_both(Duration::from_micros(each_way_us));
        let rtt = ping_pong(proxy.local_addr(), 500).await;
        println!("delay {each_way_us} us each way: mean RTT {rtt:?} (nominal {} us)", 2 * each_way_us);
    }
}
