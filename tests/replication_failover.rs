//! Failover under protocol C (and B, primary only): random writes (some FUA) and FLUSHes on alpha,
//! SIGKILL of alpha, `promote` on beta without `--force`, and every write
//! that was durable on alpha (FUA, or completed before a completed FLUSH was
//! issued) reads back from beta over NBD. Variants: the proxy cuts the link
//! mid-stream (the pair reconnects and resyncs while the writes go on) before
//! the kill; beta is SIGKILLed and restarted during the workload.
//!
//! Seeded: REPBLOCK_FAILOVER_SEED=N replays a run (the seed is printed).

mod common;

use std::time::Duration;

use common::durable::{REGION_BLOCKS, Workload, acceptable, verify};
use common::pair::{Pair, PairOpts};
use rand::{Rng, SeedableRng};

const QD: usize = 8;

fn seed(test: &str) -> u64 {
    let seed = std::env::var("REPBLOCK_FAILOVER_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("{test}: seed {seed} (REPBLOCK_FAILOVER_SEED={seed} replays it)");
    seed
}

/// What happens to the pair while the workload runs, before alpha is killed.
#[derive(Debug, Clone, Copy)]
enum Disturbance {
    None,
    /// The proxy cuts the replication link; the pair must reconnect and
    /// resync while the writes go on.
    CutLink,
    /// Beta is SIGKILLed, restarted, reconnects and resyncs.
    RestartBeta,
    /// With `on_peer_loss = "suspend"`, the proxy cuts the link and refuses
    /// new connections; alpha is killed while its writes are suspended.
    CutSuspended,
}

fn failover(d: Disturbance) {
    failover_with("C", d);
}

fn failover_with(protocol: &str, d: Disturbance) {
    let test = format!("failover (protocol {protocol}, {d:?})");
    let seed = seed(&test);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let opts = PairOpts::new(protocol);
    let opts = match d {
        Disturbance::None | Disturbance::RestartBeta => opts,
        Disturbance::CutLink => opts.proxied(),
        Disturbance::CutSuspended => opts.proxied().extra("on_peer_loss = \"suspend\""),
    };
    let mut pair = Pair::up(opts);

    let client = pair.rt.block_on(pair.alpha.nbd());
    let work = Workload::start(&pair.rt, client, QD, seed, 1 << 32);
    std::thread::sleep(Duration::from_millis(rng.random_range(300..800)));
    match d {
        Disturbance::None => {}
        Disturbance::CutLink => {
            let accepted = pair.proxies().accepted();
            pair.proxies().cut();
            // The link comes back through the proxy and beta resyncs, while
            // the writers keep going.
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while pair.proxies().accepted() == accepted {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{test}: no new connection through the proxy within 20s of the cut"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            pair.beta.wait_sync(60);
        }
        Disturbance::RestartBeta => {
            pair.beta.kill9();
            std::thread::sleep(Duration::from_millis(rng.random_range(200..600)));
            let a = pair.alpha.status();
            assert_eq!(a["role"], "primary", "{a:#}");
            pair.beta.start();
            pair.beta.wait_sync(60);
        }
        Disturbance::CutSuspended => {
            pair.proxies().set_mode(repblock_netproxy::Mode::Refuse);
            pair.alpha.wait_status("peer lost", Duration::from_secs(10), |s| s["connection"] != "connected");
            // Writes the peer acknowledged before the cut may still be
            // answered after the status changed; let those settle (at most
            // the queue depth), then nothing more may complete.
            let at_loss = work.completed_writes();
            std::thread::sleep(Duration::from_millis(300));
            let held = work.completed_writes();
            assert!(
                held - at_loss <= QD,
                "{test}: {} writes completed after the peer was lost, more than the {QD} that can be in flight",
                held - at_loss
            );
            std::thread::sleep(Duration::from_secs(1));
            assert_eq!(
                work.completed_writes(),
                held,
                "{test}: writes completed on alpha while its peer was away under on_peer_loss = suspend"
            );
        }
    }
    let before_kill = work.completed_writes();
    std::thread::sleep(Duration::from_millis(rng.random_range(300..800)));
    let b = pair.beta.status();
    assert_eq!(b["disk"], "uptodate", "{test}: beta must be uptodate before alpha is killed\n{b:#}");
    pair.alpha.kill9();
    let history = work.finish(&pair.rt);
    let completed = history.writes.iter().filter(|w| w.completed.is_some()).count();
    let after_disturbance = completed.saturating_sub(before_kill);
    eprintln!(
        "{test}: {} writes ({} completed after the disturbance), {} flushes, {} durable writes",
        history.writes.len(),
        after_disturbance,
        history.flushes.len(),
        history.durable_writes()
    );

    if !matches!(d, Disturbance::CutSuspended) {
        assert!(after_disturbance > 0, "{test}: no write completed in the last stretch before the kill");
    }

    // Beta notices, stays uptodate, and is promoted without --force.
    let b = pair.beta.wait_status("peer lost", Duration::from_secs(10), |s| s["connection"] != "connected");
    assert_eq!(b["disk"], "uptodate", "{test}: a secondary whose primary vanished stays uptodate\n{b:#}");
    pair.beta.repctl_ok(&["promote"]);
    let base = vec![0u64; REGION_BLOCKS];
    let allowed = acceptable(&base, &history);
    let constrained = pair.rt.block_on(async {
        let c = pair.beta.nbd().await;
        verify(&c, &allowed, &base, &format!("{test}, seed {seed}, read from beta")).await
    });
    assert!(constrained > 0, "{test}: no write was durable before the kill: the test checked nothing");
}

#[test]
fn failover_after_sigkill_loses_no_durable_write() {
    failover(Disturbance::None);
}

#[test]
fn failover_after_link_cut_and_resync() {
    failover(Disturbance::CutLink);
}

#[test]
fn failover_after_secondary_restart_and_resync() {
    failover(Disturbance::RestartBeta);
}

#[test]
fn failover_while_writes_are_suspended_after_a_cut() {
    failover(Disturbance::CutSuspended);
}

/// Protocol B keeps every durable write when only the primary fails: beta
/// had received it, and must apply it before it serves as primary.
#[test]
fn failover_protocol_b_after_sigkill_loses_no_durable_write() {
    failover_with("B", Disturbance::None);
}
