//! Crash tests: repd is SIGKILLed in the middle of writes and flushes; after
//! each restart every block must hold its last write that was durable (it
//! completed before a completed FLUSH was issued, or it completed with FUA),
//! or a write to it issued after that one. Plus fail-stop under an injected
//! fdatasync error (`REPBLOCK_FAULTS`: a `fault-injection` build, which
//! Cargo.toml declares as this binary's `required-features`).
//!
//! Seeded: set REPBLOCK_CRASH_SEED to replay a run (the seed is printed).

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::durable::{
    BLOCK, FlushRec, History, REGION_BLOCKS, Workload, WriteRec, acceptable, check_region, content, identify,
};
use common::{NodeOpts, TestNode};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use repblock::nbd::{ClientError, ListenAddr, NbdClient};

const ROUNDS: u32 = 20;
const QUEUE_DEPTH: usize = 8;

fn addr(n: &TestNode) -> ListenAddr {
    format!("127.0.0.1:{}", n.port).parse().expect("listen addr")
}

fn kill_during_writes(engine: &str) {
    let seed: u64 =
        std::env::var("REPBLOCK_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| rand::rng().random());
    eprintln!("crash test ({engine}): seed {seed} (REPBLOCK_CRASH_SEED={seed} replays it)");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let mut n = TestNode::new(engine);
    n.create_md();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut allowed: Vec<HashSet<u64>> = vec![HashSet::from([0]); REGION_BLOCKS];
    let mut total_writes = 0usize;
    let mut total_constrained = 0usize;
    for round in 0..=ROUNDS {
        n.start();
        if round == 0 {
            n.promote_force();
        } else {
            n.promote();
        }
        let what = format!("seed {seed} round {round}");
        let client = rt.block_on(NbdClient::connect(&addr(&n), "r0")).expect("connect");
        let base = rt.block_on(check_region(&client, &allowed, &what));
        if round == ROUNDS {
            n.kill9();
            break;
        }
        let workload = Workload::start(&rt, client, QUEUE_DEPTH, rng.random(), (u64::from(round) + 1) << 32);
        std::thread::sleep(Duration::from_millis(rng.random_range(100..900)));
        n.kill9();
        let h = workload.finish(&rt);
        total_writes += h.writes.len();
        allowed = acceptable(&base, &h);
        // Blocks whose pre-round content is no longer acceptable: a durable
        // write must be found there after the restart.
        total_constrained += allowed.iter().zip(&base).filter(|(a, b)| !a.contains(b)).count();
    }
    eprintln!(
        "crash test ({engine}): {ROUNDS} kills, {total_writes} writes, {total_constrained} blocks that had to hold a durable write, seed {seed}"
    );
    assert!(total_constrained > 0, "no round made a write durable: the test checked nothing");
}

/// REPBLOCK_FAULTS makes fdatasync fail after N calls: a FLUSH then fails
/// with an NBD error, later writes fail too, status names the failure, and
/// repd keeps answering.
fn sync_error_is_fail_stop(engine: &str) {
    let mut opts = NodeOpts::new(engine);
    opts.env.push(("REPBLOCK_FAULTS".into(), "sync_error_after=40:EIO".into()));
    let n = TestNode::ready_with(opts);
    // Watch the event stream: the failure must be announced.
    let (tx, events) = std::sync::mpsc::channel::<serde_json::Value>();
    let events_client =
        repblock::control::ControlClient::connect(&n.control(), "alpha", Duration::from_secs(10)).expect("events");
    std::thread::spawn(move || {
        // Ends when repd goes away (the test's TestNode kills it on drop).
        let _ = events_client.events(|v| tx.send(v.clone()).is_ok());
    });
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        let client = NbdClient::connect(&addr(&n), "r0").await.expect("connect");
        let mut failed_at = None;
        for i in 0..500u64 {
            let block = (i % 256) as usize;
            client
                .write((block * BLOCK) as u64, &content(i + 1, block), false)
                .await
                .expect("write before the failure");
            if let Err(e) = client.flush().await {
                assert!(matches!(e, ClientError::Nbd { .. }), "a failed flush is an NBD error reply, got {e}");
                failed_at = Some(i);
                break;
            }
        }
        let i = failed_at.expect("an fdatasync failed within 500 flushes");
        eprintln!("flush #{i} failed as injected");
        // Fail-stop: later writes and flushes fail, the connection stays up.
        let e = client.write(0, &content(99_999, 0), false).await.expect_err("writes fail after a failed fdatasync");
        assert!(matches!(e, ClientError::Nbd { errno: 5 }), "EIO expected, got {e}");
        let e = client.flush().await.expect_err("flushes fail after a failed fdatasync");
        assert!(matches!(e, ClientError::Nbd { .. }), "{e}");
        // Reads still answer.
        client.read(0, BLOCK as u32).await.expect("reads go on");
    });
    let s = n.status();
    let reason = s["failed"].as_str().unwrap_or_else(|| panic!("status shows the failure: {s}"));
    assert!(!reason.is_empty());
    let failed_event = loop {
        let ev = events.recv_timeout(Duration::from_secs(10)).expect("a `failed` event within 10 s");
        if ev["event"] == "failed" {
            break ev;
        }
    };
    assert_eq!(failed_event["reason"], reason, "{failed_event}");
    let human = n.repctl_ok(&["status"]);
    assert!(human.contains("FAILED:"), "{human}");
    let out = n.repctl(&["demote"]);
    // Demote still works (the export goes down); its final flush reports the failure.
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(n.status()["role"], "secondary");
    let out = n.repctl(&["promote"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("stopped taking writes"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(n.log().contains("stopped taking writes") || n.log().contains("fdatasync"), "{}", n.log());
}

both_engines! {
    sigkill_during_writes_loses_no_durable_write => kill_during_writes;
    fdatasync_error_stops_writes => sync_error_is_fail_stop;
}

#[test]
fn acceptable_sets_follow_the_flush_rule() {
    let base = vec![0u64; 3];
    let h = History {
        writes: vec![
            // block 0: w1 completed at 2, flush issued at 3 → durable; w2 after.
            WriteRec { block: 0, id: 1, fua: false, issued: 1, completed: Some(2) },
            WriteRec { block: 0, id: 2, fua: false, issued: 5, completed: Some(6) },
            // block 1: FUA write durable on completion; nothing after it.
            WriteRec { block: 1, id: 3, fua: true, issued: 7, completed: Some(8) },
            // block 2: completed after the last flush was issued: not durable.
            WriteRec { block: 2, id: 4, fua: false, issued: 9, completed: Some(10) },
        ],
        flushes: vec![FlushRec { issued: 3, completed: Some(4) }, FlushRec { issued: 11, completed: None }],
    };
    let a = acceptable(&base, &h);
    assert_eq!(a[0], HashSet::from([1, 2]));
    assert_eq!(a[1], HashSet::from([3]));
    assert_eq!(a[2], HashSet::from([0, 4]));
    assert_eq!(identify(&content(7, 3), 3), Some(7));
    assert_eq!(identify(&content(7, 3), 4), None, "a block at the wrong place is detected");
    assert_eq!(identify(&[0u8; BLOCK], 3), Some(0));
}
