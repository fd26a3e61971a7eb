//! A peer with the wrong secret, another resource's name, another size, or
//! garbage on the replication port is refused; alpha's log says which, and
//! alpha (primary) keeps serving NBD.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::pair::{Pair, PairOpts, Peer, Top};

/// Words of a log line that reports a refusal.
const REFUSAL_WORDS: [&str; 5] = ["refus", "reject", "wrong", "mismatch", "differ"];

/// Waits (at most 15 s) for a log line of `p` naming `what` as the reason of
/// a refusal.
fn assert_logged_refusal(p: &Peer, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if refusal_lines(p, what) > 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{}'s log has no line saying the peer was refused because of its {what} within 15s:\n{}",
            p.name,
            p.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Alpha is primary, alone, and serves NBD reads, writes and flushes.
fn assert_alpha_serves(pair: &Pair) {
    let a = pair.alpha.status();
    assert_eq!(a["role"], "primary", "{a:#}");
    assert_ne!(a["connection"], "connected", "alpha must not be connected to a refused peer\n{a:#}");
    let ok = pair.rt.block_on(async {
        let c = pair.alpha.nbd().await;
        let data = vec![0x3cu8; 65536];
        tokio::time::timeout(Duration::from_secs(10), async {
            c.write(1 << 20, &data, false).await.expect("write");
            c.flush().await.expect("flush");
            c.read(1 << 20, 65536).await.expect("read") == data
        })
        .await
    });
    assert_eq!(ok, Ok(true), "alpha must keep serving NBD (write, flush, read back) after refusing its peer");
}

/// Beta runs with `top` instead of the shared values; both start, alpha is
/// promoted; the link never comes up.
fn refused(top: impl FnOnce(Top) -> Top, what: &str) {
    let mut pair = Pair::new(PairOpts::new("C"));
    let t = top(pair.default_top());
    pair.override_config("beta", t);
    pair.start_both();
    pair.alpha.repctl_ok(&["promote", "--force"]);
    assert_logged_refusal(&pair.alpha, what);
    // Several dial attempts later it is still refused.
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        for p in [&pair.alpha, &pair.beta] {
            let s = p.status();
            assert_ne!(s["connection"], "connected", "{}: connected to a peer with another {what}\n{s:#}", p.name);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Alpha keeps trying (with backoff), and says so.
    let a = pair.alpha.status();
    assert_eq!(a["connection"], "connecting", "after a refusal alpha keeps dialing with backoff\n{a:#}");
    assert_alpha_serves(&pair);
    assert!(pair.alpha.status()["failed"].is_null(), "a refused peer is no failure of alpha's volume");
    // Backoff (100 ms doubling to 5 s) and a rate-limited log: a few
    // refusals in these seconds, not one per millisecond.
    let lines = refusal_lines(&pair.alpha, what);
    assert!(lines <= 60, "{lines} refusal lines in alpha's log within a few seconds: no backoff or no rate limit");
}

fn refusal_lines(p: &Peer, what: &str) -> usize {
    p.log_lines_lower().iter().filter(|l| l.contains(what) && REFUSAL_WORDS.iter().any(|w| l.contains(w))).count()
}

#[test]
fn wrong_secret_is_refused() {
    refused(|t| Top { secret: "not-the-secret".into(), ..t }, "secret");
}

#[test]
fn wrong_resource_is_refused() {
    refused(|t| Top { resource: "r1".into(), ..t }, "resource");
}

#[test]
fn wrong_size_is_refused() {
    refused(|t| Top { size: "32MiB".into(), ..t }, "size");
}

/// Lines of alpha's log that report a broken handshake or frame.
fn garbage_lines(p: &Peer) -> usize {
    p.log_lines_lower()
        .iter()
        .filter(|l| {
            ["handshake", "frame", "garbage", "magic", "crc", "version"].iter().any(|w| l.contains(w))
                && ["fail", "error", "bad", "refus", "reject", "drop", "clos", "invalid", "unexpected", "garbage"]
                    .iter()
                    .any(|w| l.contains(w))
        })
        .count()
}

/// Garbage sent to alpha's replication port: that connection is dropped and
/// logged, the established link to beta stays up, alpha keeps serving.
#[test]
fn garbage_on_the_replication_port_is_refused() {
    let pair = Pair::up(PairOpts::new("C"));
    let before = garbage_lines(&pair.alpha);
    let payloads: [&[u8]; 3] = [
        b"GET / HTTP/1.1\r\nHost: alpha\r\n\r\n",
        &[0xffu8; 4096],
        // The frame magic, then a header announcing an impossible frame.
        b"RBRP\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff garbage",
    ];
    for payload in payloads {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", pair.alpha.repl_listen_port))
            .expect("connect to alpha's replication port");
        s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
        // Alpha may close before everything is written: ignore write errors.
        let _ = s.write_all(payload);
        let mut buf = [0u8; 65536];
        let closed = loop {
            match s.read(&mut buf) {
                Ok(0) => break true,
                // Alpha may send its Hello or a Refuse first.
                Ok(_) => continue,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    break false;
                }
                Err(_) => break true,
            }
        };
        assert!(closed, "alpha must close a connection that sends garbage ({} bytes) within 20s", payload.len());
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while garbage_lines(&pair.alpha) <= before {
        assert!(
            Instant::now() < deadline,
            "alpha's log does not report the garbage connections:\n{}",
            pair.alpha.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let a = pair.alpha.status();
    assert_eq!(a["connection"], "connected", "the link to beta must survive garbage from a stranger\n{a:#}");
    assert_eq!(a["replication"], "established", "{a:#}");
    let ok = pair.rt.block_on(async {
        let c = pair.alpha.nbd().await;
        tokio::time::timeout(Duration::from_secs(10), async {
            c.write(0, &[9u8; 4096], true).await.is_ok() && c.flush().await.is_ok()
        })
        .await
    });
    assert_eq!(ok, Ok(true), "alpha keeps serving (FUA write + flush under C, beta connected)");
}
