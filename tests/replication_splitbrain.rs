//! Split brain (issue 4), black-box: the proxy partitions a replicating
//! pair, both nodes are promoted and write different data, the partition
//! heals.
//!
//! - Detected on heal: both nodes `standalone`, `split_brain: true`, a
//!   `split-brain` event with both sides' out-of-sync bytes, the decision
//!   names it; no data crosses the link (only handshake-size traffic), both
//!   keep their data, and the nodes do not keep redialing.
//!   `repctl connect --dry-run` reports the split brain and changes nothing.
//! - Recovery: `repctl connect --discard-my-data` on the victim (demoted
//!   first) and `repctl connect` on the survivor: the victim becomes
//!   identical to the survivor, the survivor keeps its data, and the link
//!   carries about the changed blocks of both sides, not the volume.
//!
//! Seeded: REPBLOCK_RESYNC_SEED=N replays a run (the seed is printed).

mod common;

use std::time::{Duration, Instant};

use common::pair::{MIB, Pair, PairOpts, Peer};
use common::resync::{
    EventLog, Extents, GRAIN, assert_verify_clean, data_file, file_read, fill_extents, plan_extents, seed,
    stop_and_compare, text, u,
};

/// What alpha and beta write while partitioned.
const ALPHA_BYTE: u8 = 0xa1;
const BETA_BYTE: u8 = 0xb2;

/// Traffic allowed on the link between the heal and the end of the checks
/// of a detected split brain: handshakes and sync info, no block data.
const HANDSHAKE_BYTES: u64 = 256 * 1024;

struct SplitBrain {
    pair: Pair,
    alpha_ext: Extents,
    beta_ext: Extents,
    alpha_events: EventLog,
    beta_events: EventLog,
    /// Proxy byte count when the partition healed.
    at_heal: u64,
}

/// Partition, promote beta (alpha stays primary), alpha writes 2 MiB and
/// beta 3 MiB in scattered places (half of alpha's extents among beta's),
/// demote beta unless `two_primaries`, heal, and wait until both nodes
/// report the split brain.
fn split_brain(test: &str, two_primaries: bool) -> SplitBrain {
    let seed = seed(test);
    let pair = Pair::up_blank(PairOpts::new("C").proxied().size("256MiB"));
    pair.partition();
    pair.beta.repctl_ok(&["promote"]);
    let alpha_ext = plan_extents(0, pair.size, 2 * MIB, seed);
    let shared = Extents {
        writes: alpha_ext.writes.iter().step_by(2).copied().collect(),
        blocks: alpha_ext.writes.iter().step_by(2).flat_map(|&(off, len)| (off / GRAIN)..(off + len) / GRAIN).collect(),
    };
    let beta_ext = plan_extents(0, pair.size, 3 * MIB, seed ^ 0xbe7a).union(&shared);
    fill_both(&pair, &alpha_ext, &beta_ext);
    if !two_primaries {
        pair.beta.repctl_ok(&["demote"]);
    }
    let alpha_events = EventLog::start(&pair.alpha);
    let beta_events = EventLog::start(&pair.beta);
    let at_heal = pair.proxies().bytes_total();
    pair.heal();
    for p in [&pair.alpha, &pair.beta] {
        p.wait_status("split brain detected, standalone", Duration::from_secs(30), |s| {
            s["split_brain"] == true && s["connection"] == "standalone"
        });
    }
    SplitBrain { pair, alpha_ext, beta_ext, alpha_events, beta_events, at_heal }
}

/// Alpha writes `alpha_ext` (ALPHA_BYTE) and beta `beta_ext` (BETA_BYTE)
/// over NBD, both primary; returns once neither has a client left.
fn fill_both(pair: &Pair, alpha_ext: &Extents, beta_ext: &Extents) {
    pair.rt.block_on(async {
        for (p, ext, byte) in [(&pair.alpha, alpha_ext, ALPHA_BYTE), (&pair.beta, beta_ext, BETA_BYTE)] {
            let c = p.nbd().await;
            fill_extents(&c, ext, byte).await;
            c.disconnect().await.expect("disconnect");
        }
    });
    for p in [&pair.alpha, &pair.beta] {
        p.wait_status("no NBD client", Duration::from_secs(10), |s| s["nbd"]["clients"] == 0);
    }
}

/// Every block of `ext` in `p`'s volume (read over NBD) holds `byte`.
fn assert_holds(pair: &Pair, p: &Peer, ext: &Extents, byte: u8, what: &str) {
    pair.rt.block_on(async {
        let c = p.nbd().await;
        for &(off, len) in &ext.writes {
            let data = c.read(off, len as u32).await.unwrap_or_else(|e| panic!("{what}: read at {off}: {e}"));
            assert!(
                data.iter().all(|&b| b == byte),
                "{what}: {} lost its own write at {off} (+{len}): expected {byte:#x} throughout",
                p.name
            );
        }
        c.disconnect().await.expect("disconnect");
    });
}

/// Both nodes wrote while partitioned, both still primary: on heal both go
/// standalone with `split_brain: true`, say so in an event with both sides'
/// out-of-sync bytes, move no data, keep their own writes and stop dialing;
/// a `connect --dry-run` reports the split brain and changes nothing.
#[test]
fn split_brain_of_two_primaries_is_detected_and_nothing_moves() {
    split_brain_is_detected_and_nothing_moves(true);
}

/// The same with the victim demoted before the heal (one primary).
#[test]
fn split_brain_of_one_primary_is_detected_and_nothing_moves() {
    split_brain_is_detected_and_nothing_moves(false);
}

fn split_brain_is_detected_and_nothing_moves(two_primaries: bool) {
    let test = &format!("split brain detected (two primaries: {two_primaries})");
    let sb = split_brain(test, two_primaries);
    let pair = &sb.pair;
    // Stays so: no reconnect loop, no data.
    let accepted = pair.proxies().accepted();
    std::thread::sleep(Duration::from_secs(2));
    let a = pair.alpha.status();
    let b = pair.beta.status();
    for (s, own) in [(&a, &sb.alpha_ext), (&b, &sb.beta_ext)] {
        let name = &s["node"];
        assert_eq!(s["connection"], "standalone", "{test}: {name}\n{s:#}");
        assert_eq!(s["split_brain"], true, "{test}: {name}\n{s:#}");
        let role = if two_primaries || *name == "alpha" { "primary" } else { "secondary" };
        assert_eq!(s["role"], role, "{test}: {name} keeps its role\n{s:#}");
        assert!(text(&s["decision"]).contains("split"), "{test}: {name}'s decision names the split brain\n{s:#}");
        assert!(
            u(&s["out_of_sync_bytes"]) >= own.changed(),
            "{test}: {name} wrote {} bytes of blocks alone; out_of_sync_bytes must count them\n{s:#}",
            own.changed()
        );
    }
    assert!(
        pair.proxies().accepted() <= accepted + 2,
        "{test}: the nodes keep redialing after a split brain ({} new connections in 2 s)",
        pair.proxies().accepted() - accepted
    );
    for (events, name, own, theirs) in [
        (&sb.alpha_events, "alpha", &sb.alpha_ext, &sb.beta_ext),
        (&sb.beta_events, "beta", &sb.beta_ext, &sb.alpha_ext),
    ] {
        let ev = events.wait_for("split-brain", Duration::from_secs(5), |_| true);
        assert!(
            u(&ev["local_out_of_sync_bytes"]) >= own.changed() && u(&ev["peer_out_of_sync_bytes"]) >= theirs.changed(),
            "{test}: {name}'s split-brain event must carry both sides' out-of-sync bytes (at least {} local, {} \
             peer): {ev}",
            own.changed(),
            theirs.changed()
        );
        let d = events.wait_for("decision", Duration::from_secs(5), |_| true);
        assert!(text(&d).contains("split"), "{test}: the decision event names the split brain: {d}");
    }

    // Dry run: reports, changes nothing.
    let out = pair.alpha.repctl(&["connect", "--dry-run"]);
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("{test}: connect --dry-run on alpha ({}): {said}", out.status);
    assert!(said.to_lowercase().contains("split"), "{test}: connect --dry-run must report the split brain: {said}");
    std::thread::sleep(Duration::from_millis(500));
    for p in [&pair.alpha, &pair.beta] {
        let s = p.status();
        assert_eq!(s["connection"], "standalone", "{test}: a dry run changes nothing ({})\n{s:#}", p.name);
        assert_eq!(s["split_brain"], true, "{test}: {}\n{s:#}", p.name);
    }

    let moved = pair.proxies().bytes_total() - sb.at_heal;
    eprintln!("{test}: {moved} bytes on the link since the heal (dry run included)");
    assert!(
        moved < HANDSHAKE_BYTES,
        "{test}: {moved} bytes crossed the link after a split brain was detected: data moved"
    );
    assert_holds(pair, &pair.alpha, &sb.alpha_ext, ALPHA_BYTE, test);
    if !two_primaries {
        // Only a primary serves NBD: the victim is read through a promote.
        pair.beta.repctl_ok(&["promote"]);
    }
    assert_holds(pair, &pair.beta, &sb.beta_ext, BETA_BYTE, test);
}

/// Recovery: beta (the victim) is demoted and runs `connect
/// --discard-my-data`, alpha runs `connect`; beta resyncs from alpha and
/// ends identical to it, alpha keeps every write of its own and none of
/// beta's, and the link carries about the changed blocks, not the volume.
#[test]
fn discard_my_data_on_the_victim_resyncs_only_the_changed_blocks() {
    let test = "split brain recovery";
    let sb = split_brain(test, false);
    let mut pair = sb.pair;
    let before = pair.proxies().bytes_total();
    let t = Instant::now();
    pair.beta.repctl_ok(&["connect", "--discard-my-data"]);
    pair.alpha.repctl_ok(&["connect"]);
    pair.beta.wait_sync(60);
    pair.assert_established();
    let took = t.elapsed();
    let moved = pair.proxies().bytes_total() - before;
    let union = sb.alpha_ext.union(&sb.beta_ext);
    let b = pair.beta.status();
    eprintln!(
        "{test}: {moved} bytes on the link in {took:?} for {} bytes of blocks changed on either side; beta: \
         decision {}, last_sync {}",
        union.changed(),
        b["decision"],
        b["last_sync"]
    );
    assert!(text(&b["decision"]).contains("target"), "{test}: the victim is the sync target\n{b:#}");
    assert_ne!(b["last_sync"]["kind"], "full", "{test}: only the changed blocks move, not a full sync\n{b:#}");
    assert!(!b["last_sync"]["kind"].is_null(), "{test}: beta ran a sync\n{b:#}");
    assert!(
        moved < 2 * union.changed() + MIB,
        "{test}: {moved} bytes on the link for {} bytes of changed blocks (limit 2x + 1 MiB)",
        union.changed()
    );
    for p in [&pair.alpha, &pair.beta] {
        let s = p.wait_status("in sync", Duration::from_secs(10), |s| u(&s["out_of_sync_bytes"]) == 0);
        assert_eq!(s["split_brain"], false, "{test}: resolved\n{s:#}");
    }
    assert_verify_clean(&pair.alpha, test);
    let ev = sb.beta_events.wait_for("sync-finished", Duration::from_secs(5), |_| true);
    assert!(ev["kind"].is_string() && ev["kind"] != "full", "{test}: beta's sync-finished event: {ev}");
    let ev = sb.beta_events.wait_for("decision", Duration::from_secs(5), |e| text(e).contains("target"));
    eprintln!("{test}: beta's decision event after --discard-my-data: {ev}");
    assert_holds(&pair, &pair.alpha, &sb.alpha_ext, ALPHA_BYTE, test);
    stop_and_compare(&mut pair, test);
    // The survivor kept none of the victim's writes: beta-only blocks are
    // zeroes again on both (the volume was blank before the partition).
    let f = data_file(&pair.alpha);
    let mut checked = 0;
    for &(off, len) in &sb.beta_ext.writes {
        for blk in (off / GRAIN)..(off + len) / GRAIN {
            if sb.alpha_ext.blocks.contains(&blk) {
                continue;
            }
            let data = file_read(&f, blk * GRAIN, GRAIN as usize);
            assert!(
                data.iter().all(|&x| x == 0),
                "{test}: block {blk} holds the victim's data on the survivor (byte {:#x})",
                data[0]
            );
            checked += 1;
        }
    }
    assert!(checked > 0, "{test}: beta wrote no block of its own: the test checked nothing");
}

/// Opt-in policy `after_sb_0pri = "discard-least-changes"`: both wrote
/// while partitioned, both are demoted before the heal; the node with fewer
/// out-of-sync bytes (alpha, 1 MiB against beta's 3 MiB) is resynced from
/// the other automatically, the decision names the rule, and the copies
/// end identical, holding beta's writes.
#[test]
fn policy_discard_least_changes_resolves_a_split_brain_without_primary() {
    let test = "after_sb_0pri = discard-least-changes";
    let seed = seed(test);
    let mut pair = Pair::up_blank(PairOpts::new("C").proxied().extra("after_sb_0pri = \"discard-least-changes\""));
    pair.partition();
    pair.beta.repctl_ok(&["promote"]);
    let alpha_ext = plan_extents(0, pair.size, MIB, seed);
    let beta_ext = plan_extents(0, pair.size, 3 * MIB, seed ^ 0xbe7a);
    fill_both(&pair, &alpha_ext, &beta_ext);
    for p in [&pair.alpha, &pair.beta] {
        p.repctl_ok(&["demote"]);
    }
    let before = pair.proxies().bytes_total();
    pair.heal();
    pair.alpha.wait_sync(60);
    for p in [&pair.alpha, &pair.beta] {
        p.wait_status("established, both uptodate", Duration::from_secs(20), |s| {
            s["replication"] == "established" && s["disk"] == "uptodate" && s["peer"]["disk"] == "uptodate"
        });
    }
    let moved = pair.proxies().bytes_total() - before;
    let a = pair.alpha.status();
    eprintln!("{test}: {moved} bytes on the link; alpha decision {}", a["decision"]);
    assert!(text(&a["decision"]).contains("target"), "{test}: alpha (fewer changes) is the target\n{a:#}");
    assert!(text(&a["decision"]).contains("least"), "{test}: the decision names the policy's rule\n{a:#}");
    let union = alpha_ext.union(&beta_ext);
    assert!(moved < 2 * union.changed() + MIB, "{test}: {moved} bytes on the link for {} changed", union.changed());
    stop_and_compare(&mut pair, test);
    let f = data_file(&pair.alpha);
    for &(off, len) in &beta_ext.writes {
        let data = file_read(&f, off, len as usize);
        assert!(data.iter().all(|&x| x == BETA_BYTE), "{test}: beta's write at {off} is not on alpha after the sync");
    }
}

/// Two nodes that were each forced primary before they ever met hold
/// unrelated data: on connect the decision says so, no data moves, neither
/// copy is touched.
#[test]
fn unrelated_data_is_refused() {
    let test = "unrelated data";
    let seed = seed(test);
    let mut pair = Pair::new(PairOpts::new("C").proxied());
    pair.proxies().set_mode(repblock_netproxy::Mode::Refuse);
    pair.start_both();
    let exts = [plan_extents(0, pair.size, MIB, seed), plan_extents(0, pair.size, MIB, seed ^ 1)];
    for p in [&pair.alpha, &pair.beta] {
        p.repctl_ok(&["promote", "--force"]);
    }
    fill_both(&pair, &exts[0], &exts[1]);
    for p in [&pair.alpha, &pair.beta] {
        p.repctl_ok(&["demote"]);
    }
    let before = pair.proxies().bytes_total();
    pair.heal();
    for p in [&pair.alpha, &pair.beta] {
        let s = p.wait_status("decision: unrelated", Duration::from_secs(30), |s| {
            text(&s["decision"]).contains("unrelated")
        });
        assert_ne!(s["replication"], "sync-target", "{test}: {}\n{s:#}", p.name);
    }
    std::thread::sleep(Duration::from_secs(1));
    for p in [&pair.alpha, &pair.beta] {
        let s = p.status();
        assert_ne!(s["connection"], "connected", "{test}: {} connected to unrelated data\n{s:#}", p.name);
        assert_eq!(s["disk"], "uptodate", "{test}: {} keeps its data\n{s:#}", p.name);
    }
    let moved = pair.proxies().bytes_total() - before;
    assert!(moved < HANDSHAKE_BYTES, "{test}: {moved} bytes crossed the link between unrelated nodes");
    for (p, ext, byte) in [(&pair.alpha, &exts[0], ALPHA_BYTE), (&pair.beta, &exts[1], BETA_BYTE)] {
        let f = data_file(p);
        for &(off, len) in &ext.writes {
            assert!(
                file_read(&f, off, len as usize).iter().all(|&x| x == byte),
                "{test}: {}'s own write at {off} was overwritten",
                p.name
            );
        }
    }
}

/// Opt-in policy `after_sb_1pri = "discard-secondary"`: both wrote while
/// partitioned, beta is demoted before the heal; beta (the secondary) is
/// resynced from alpha automatically, the decision names the rule, alpha
/// keeps its data and the copies end identical.
#[test]
fn policy_discard_secondary_resolves_a_split_brain_with_one_primary() {
    let test = "after_sb_1pri = discard-secondary";
    let seed = seed(test);
    let mut pair = Pair::up_blank(PairOpts::new("C").proxied().extra("after_sb_1pri = \"discard-secondary\""));
    pair.partition();
    pair.beta.repctl_ok(&["promote"]);
    let alpha_ext = plan_extents(0, pair.size, MIB, seed);
    let beta_ext = plan_extents(0, pair.size, 2 * MIB, seed ^ 0xbe7a);
    fill_both(&pair, &alpha_ext, &beta_ext);
    pair.beta.repctl_ok(&["demote"]);
    pair.heal();
    pair.beta.wait_sync(60);
    pair.assert_established();
    let b = pair.beta.status();
    eprintln!("{test}: beta decision {}", b["decision"]);
    assert!(text(&b["decision"]).contains("target"), "{test}: beta (the secondary) is the target\n{b:#}");
    assert!(text(&b["decision"]).contains("discard-secondary"), "{test}: the decision names the rule\n{b:#}");
    assert_eq!(b["split_brain"], false, "{test}: resolved by the policy\n{b:#}");
    assert_holds(&pair, &pair.alpha, &alpha_ext, ALPHA_BYTE, test);
    stop_and_compare(&mut pair, test);
}
