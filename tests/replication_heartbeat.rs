//! Heartbeats and peer loss: a link that goes silent without closing (the
//! proxy in Blackhole mode) is detected within ping_interval + ping_timeout;
//! with the link back, the pair reconnects. `on_peer_loss = "suspend"` holds
//! writes while the peer is away until it is back or `repctl resume-io`.

mod common;

use std::time::{Duration, Instant};

use common::pair::{Pair, PairOpts};
use repblock_netproxy::Mode;

const PING_INTERVAL: Duration = Duration::from_secs(1);
const PING_TIMEOUT: Duration = Duration::from_millis(500);
/// Status polling, scheduling and a loaded test machine.
const SLACK: Duration = Duration::from_millis(1000);

#[test]
fn silent_link_is_detected_within_interval_plus_timeout() {
    let pair = Pair::up(PairOpts::new("C").proxied().extra("ping_interval = \"1s\"\nping_timeout = \"500ms\""));
    let proxies = pair.proxies();
    // A write issued as the link goes silent: under C it waits for the peer,
    // and is released once the peer is declared lost (on_peer_loss =
    // continue, the default).
    let client = pair.rt.block_on(pair.alpha.nbd());
    proxies.set_mode(Mode::Blackhole);
    let t0 = Instant::now();
    let write = pair.rt.spawn({
        let c = client.clone();
        async move {
            let t = Instant::now();
            c.write(8192, &[0x42u8; 4096], false).await.map(|()| t.elapsed())
        }
    });
    let bound = PING_INTERVAL + PING_TIMEOUT + SLACK;
    let mut lost = [None, None];
    while lost.iter().any(Option::is_none) {
        for (i, p) in [&pair.alpha, &pair.beta].into_iter().enumerate() {
            if lost[i].is_none() && p.status()["connection"] != "connected" {
                lost[i] = Some(t0.elapsed());
            }
        }
        assert!(
            t0.elapsed() < bound + Duration::from_secs(2),
            "peer loss not detected within {:?} of the link going silent (alpha: {:?}, beta: {:?})\nalpha: {:#}\nbeta: {:#}",
            bound + Duration::from_secs(2),
            lost[0],
            lost[1],
            pair.alpha.status(),
            pair.beta.status()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("silent link detected after: alpha {:?}, beta {:?}", lost[0], lost[1]);
    for (i, name) in ["alpha", "beta"].into_iter().enumerate() {
        let at = lost[i].expect("set");
        assert!(
            at <= bound,
            "{name} declared the silent peer lost after {at:?}, expected within ping_interval + ping_timeout ({:?}) + {SLACK:?}",
            PING_INTERVAL + PING_TIMEOUT
        );
    }
    let a = pair.alpha.status();
    assert_eq!(a["role"], "primary", "{a:#}");
    assert_eq!(a["peer"]["disk"], "unknown", "the peer's disk is unknown when not connected\n{a:#}");
    let elapsed = pair
        .rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(10), write).await })
        .expect("the write held for the silent peer must complete once the peer is declared lost")
        .expect("write task")
        .expect("the write succeeds (alpha continues alone)");
    eprintln!("write released after {elapsed:?}");

    // Link back: the pair reconnects (through a fresh proxied connection)
    // and beta resyncs.
    proxies.set_mode(Mode::Pass);
    pair.alpha.wait_status("reconnected", Duration::from_secs(20), |s| s["connection"] == "connected");
    pair.beta.wait_sync(60);
    pair.assert_established();
    let ok = pair
        .rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(10), client.write(0, &[1u8; 4096], true)).await });
    assert!(matches!(ok, Ok(Ok(()))), "a FUA write after the reconnect completes: {ok:?}");
}

#[test]
fn suspend_holds_writes_until_the_peer_is_back_or_resume_io() {
    let mut pair = Pair::up(PairOpts::new("C").extra("on_peer_loss = \"suspend\""));
    let client = pair.rt.block_on(pair.alpha.nbd());
    let ok = pair
        .rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(10), client.write(0, &[1u8; 4096], false)).await });
    assert!(matches!(ok, Ok(Ok(()))), "a write with the peer connected completes: {ok:?}");

    // 1. Peer gone: a write blocks; the peer comes back: it completes.
    pair.beta.kill9();
    pair.alpha.wait_status("peer lost", Duration::from_secs(10), |s| s["connection"] != "connected");
    let write = pair.rt.spawn({
        let c = client.clone();
        async move { c.write(4096, &[2u8; 4096], false).await }
    });
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !write.is_finished(),
        "on_peer_loss = suspend: a write completed while the peer was away: {:?}",
        pair.rt.block_on(write)
    );
    pair.beta.start();
    let res = pair.rt.block_on(async { tokio::time::timeout(Duration::from_secs(60), write).await });
    assert!(matches!(res, Ok(Ok(Ok(())))), "the suspended write completes once the peer is back: {res:?}");
    pair.beta.wait_sync(60);

    // 2. Peer gone again: a write blocks; `repctl resume-io` releases it.
    pair.beta.kill9();
    pair.alpha.wait_status("peer lost", Duration::from_secs(10), |s| s["connection"] != "connected");
    let write = pair.rt.spawn({
        let c = client.clone();
        async move { c.write(8192, &[3u8; 4096], false).await }
    });
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !write.is_finished(),
        "on_peer_loss = suspend: a write completed while the peer was away: {:?}",
        pair.rt.block_on(write)
    );
    pair.alpha.repctl_ok(&["resume-io"]);
    let res = pair.rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), write).await });
    assert!(matches!(res, Ok(Ok(Ok(())))), "resume-io releases the suspended write: {res:?}");
    // And io stays resumed while the peer is away.
    let res = pair.rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(5), async {
            client.write(12288, &[4u8; 4096], false).await?;
            client.flush().await?;
            client.read(0, 16384).await
        })
        .await
    });
    let data = match res {
        Ok(Ok(d)) => d,
        other => panic!("after resume-io, writes and flushes complete without the peer: {other:?}"),
    };
    for (i, chunk) in data.chunks(4096).enumerate() {
        assert!(chunk.iter().all(|&b| b == i as u8 + 1), "block {i} reads back what was written");
    }
}
