//! Resync after a split (issue 4), black-box: real repd processes, the
//! in-project proxy on the replication link (bytes counted, partitions,
//! rate caps), and the data files of both nodes compared byte for byte
//! after a clean stop.
//!
//! - The secondary is killed while the primary writes 8 MiB in scattered
//!   places of a 1 GiB volume: on its return the link carries less than
//!   twice the bytes written, and the copies are identical.
//! - A short outage is caught up from the primary's WAL (`log`), and the
//!   secondary is never `inconsistent` while it runs; a long one that
//!   overflows `wal_retain` is resynced from the bitmap (`bitmap`).
//! - The primary is killed mid-workload (protocol C), the secondary is
//!   promoted and written; the old primary, restarted, becomes the sync
//!   target on its own, ends identical, and no acknowledged write is lost.
//! - Either side SIGKILLed during a resync: it resumes (the remaining bytes
//!   do not start again from the whole volume) and ends identical.
//! - `invalidate` on the secondary takes a full copy (repairing a data file
//!   damaged behind repd's back).
//!
//! Seeded: REPBLOCK_RESYNC_SEED=N replays a run (the seed is printed).

mod common;

use std::time::{Duration, Instant};

use common::durable::{REGION_BLOCKS, Workload, acceptable, verify};
use common::pair::{MIB, Pair, PairOpts};
use common::resync::{
    Extents, StatusLog, assert_verify_clean, data_file, file_checksums, scattered_writes, seed, stop_and_compare, text,
    u,
};

/// Written while the secondary is away (the number).
const GAP: u64 = 8 * MIB;

/// The last finished sync's kind on a node (`last_sync.kind`).
fn last_kind(s: &serde_json::Value) -> String {
    s["last_sync"]["kind"].as_str().unwrap_or("").to_string()
}

/// Writes `total` bytes scattered over the whole volume through alpha.
fn write_scattered(pair: &Pair, total: u64, seed: u64) -> Extents {
    pair.rt.block_on(async {
        let c = pair.alpha.nbd().await;
        let ext = scattered_writes(&c, 0, pair.size, total, seed).await;
        c.disconnect().await.expect("disconnect");
        ext
    })
}

/// Both nodes report nothing out of sync and no running resync.
fn assert_in_sync(pair: &Pair, what: &str) {
    for p in [&pair.alpha, &pair.beta] {
        let s = p.wait_status("out_of_sync_bytes 0", Duration::from_secs(10), |s| u(&s["out_of_sync_bytes"]) == 0);
        assert_eq!(s["disk"], "uptodate", "{what}: {} after the sync\n{s:#}", p.name);
        assert_eq!(s["split_brain"], false, "{what}: {}\n{s:#}", p.name);
    }
}

/// The secondary is SIGKILLed, 8 MiB are written in 4..64 KiB pieces all
/// over a 1 GiB volume, the secondary comes back: the link carries less
/// than 2 x 8 MiB (not the volume), and the data files end identical.
#[test]
fn secondary_restart_moves_only_the_changed_blocks() {
    let test = "secondary restart";
    let seed = seed(test);
    let mut pair = Pair::up_blank(PairOpts::new("C").proxied().size("1GiB"));
    pair.beta.kill9();
    pair.alpha.wait_disconnected(Duration::from_secs(10));
    let ext = write_scattered(&pair, GAP, seed);
    let a = pair.alpha.status();
    assert!(
        u(&a["out_of_sync_bytes"]) >= ext.changed(),
        "{test}: alpha wrote {} bytes of distinct blocks without its peer; out_of_sync_bytes must count them\n{a:#}",
        ext.changed()
    );

    let before = pair.proxies().bytes_total();
    let t = Instant::now();
    pair.beta.start();
    pair.beta.wait_sync(60);
    pair.assert_established();
    let took = t.elapsed();
    let moved = pair.proxies().bytes_total() - before;
    let a = pair.alpha.status();
    let b = pair.beta.status();
    eprintln!(
        "{test}: {} bytes written ({} distinct), {moved} bytes on the wire, {took:?} to uptodate; \
         alpha last_sync {}, beta last_sync {}",
        ext.written(),
        ext.changed(),
        a["last_sync"],
        b["last_sync"]
    );
    assert!(
        moved < 2 * ext.written(),
        "{test}: the resync carried {moved} bytes for {} bytes written (limit 2x): more than the changed blocks",
        ext.written()
    );
    let before_loop = b["last_sync"].clone();
    for s in [&a, &b] {
        let kind = last_kind(s);
        assert!(kind == "log" || kind == "bitmap", "{test}: last_sync.kind must be log or bitmap\n{s:#}");
        assert!(u(&s["last_sync"]["bytes"]) > 0, "{test}: last_sync.bytes counts what moved\n{s:#}");
        assert!(
            u(&s["last_sync"]["bytes"]) < 2 * ext.written(),
            "{test}: last_sync.bytes is about the changed blocks\n{s:#}"
        );
    }
    assert_in_sync(&pair, test);
    // And it stays so: no further connection, no second sync (DRBD's
    // "resync loops" complaint).
    let accepted = pair.proxies().accepted();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(pair.proxies().accepted(), accepted, "{test}: the pair reconnected after the sync");
    let b = pair.beta.status();
    assert_eq!(b["last_sync"], before_loop, "{test}: another sync ran after the first\n{b:#}");
    assert_eq!(b["replication"], "established", "{test}: {b:#}");
    stop_and_compare(&mut pair, test);
}

/// A short outage (a partition while alpha writes 8 MiB) is caught up from
/// alpha's WAL: `resync.kind` / `last_sync.kind` say `log`, and beta, polled
/// all along, is never `inconsistent` (it stays promotable).
#[test]
fn short_outage_is_caught_up_from_the_log_and_the_target_stays_consistent() {
    let test = "short outage";
    let seed = seed(test);
    let mut pair = Pair::up_blank(PairOpts::new("C").proxied().size("256MiB"));
    let poll = StatusLog::start(&pair.beta);
    let poll_alpha = StatusLog::start(&pair.alpha);
    pair.partition();
    let ext = write_scattered(&pair, GAP, seed);
    // Slow the link so that the catch-up lasts a few seconds of polling.
    pair.proxies().set_rate(Some(4 * MIB));
    let before = pair.proxies().bytes_total();
    pair.heal();
    pair.beta.wait_sync(90);
    pair.proxies().set_rate(None);
    pair.assert_established();
    let moved = pair.proxies().bytes_total() - before;
    let samples = poll.stop();
    let alpha_samples = poll_alpha.stop();

    let connected: Vec<_> = samples.iter().filter(|s| s["connection"] == "connected").collect();
    let catching_up: Vec<_> =
        connected.iter().filter(|s| s["replication"] != "established" && !s["replication"].is_null()).collect();
    eprintln!(
        "{test}: {} status samples, {} connected, {} during the catch-up; {moved} bytes on the wire for {} written",
        samples.len(),
        connected.len(),
        catching_up.len(),
        ext.written()
    );
    for s in &samples {
        assert_ne!(s["disk"], "inconsistent", "{test}: beta was inconsistent during a log catch-up\n{s:#}");
    }
    assert!(!catching_up.is_empty(), "{test}: the catch-up (4 MiB/s for 8 MiB) was never seen in beta's status");
    for s in &catching_up {
        assert!(
            s["disk"] == "consistent" || s["disk"] == "uptodate",
            "{test}: during a log catch-up the target must be consistent (promotable)\n{s:#}"
        );
        if !s["resync"]["kind"].is_null() {
            assert_eq!(s["resync"]["kind"], "log", "{test}: resync.kind during the catch-up\n{s:#}");
        }
    }
    assert!(
        catching_up.iter().any(|s| s["resync"]["kind"] == "log"),
        "{test}: no status sample showed resync.kind = log during the catch-up"
    );
    for p in [&pair.alpha, &pair.beta] {
        let s = p.status();
        assert_eq!(last_kind(&s), "log", "{test}: {} last_sync.kind after a short outage\n{s:#}", p.name);
    }
    // Progress (done of total) is visible on one side at least while the
    // catch-up runs.
    let progress = |s: &&serde_json::Value| {
        s["resync"]["kind"] == "log"
            && u(&s["resync"]["done_bytes"]) > 0
            && u(&s["resync"]["done_bytes"]) < u(&s["resync"]["total_bytes"])
    };
    let (pa, pb) = (alpha_samples.iter().filter(progress).count(), samples.iter().filter(progress).count());
    eprintln!("{test}: samples with catch-up progress: alpha {pa}, beta {pb}");
    assert!(pa + pb > 0, "{test}: neither node showed the catch-up's progress (0 < done_bytes < total_bytes)");
    assert!(moved < 2 * ext.written(), "{test}: {moved} bytes on the wire for {} bytes written", ext.written());
    assert_in_sync(&pair, test);
    stop_and_compare(&mut pair, test);
}

/// A long outage: alpha writes 192 MiB into the WAL (16 MiB of distinct
/// blocks written twelve times) with `wal_retain = 64MiB`; the WAL cannot
/// hold the gap, so the resync is a bitmap resync of the 16 MiB, not a log
/// replay of 192 MiB.
#[test]
fn long_outage_beyond_wal_retain_is_resynced_from_the_bitmap() {
    let test = "long outage";
    let seed = seed(test);
    let mut pair = Pair::up_blank(
        PairOpts::new("C")
            .proxied()
            .size("256MiB")
            .extra("wal_retain = \"64MiB\"")
            .extra("wal_segment_size = \"16MiB\""),
    );
    pair.partition();
    let ext = write_scattered(&pair, 16 * MIB, seed);
    pair.rt.block_on(async {
        let c = pair.alpha.nbd().await;
        for round in 0..11u8 {
            // The same extents again, each round other content.
            for &(off, len) in &ext.writes {
                let data = vec![0x10 + round; len as usize];
                c.write(off, &data, false).await.unwrap_or_else(|e| panic!("rewrite at {off}: {e}"));
            }
            c.flush().await.expect("flush");
        }
        c.disconnect().await.expect("disconnect");
    });
    let logged = 12 * ext.written();
    // Checkpoints (every 2 s) apply the retention bound: the WAL keeps
    // about wal_retain (+ a segment or two), not the 192 MiB written.
    let a = pair
        .alpha
        .wait_status("WAL within wal_retain", Duration::from_secs(20), |s| u(&s["wal"]["bytes"]) <= 128 * MIB);
    eprintln!("{test}: {logged} bytes logged over {} distinct; alpha: wal {:#}", ext.changed(), a["wal"]);

    let before = pair.proxies().bytes_total();
    pair.heal();
    pair.beta.wait_sync(90);
    pair.assert_established();
    let moved = pair.proxies().bytes_total() - before;
    eprintln!("{test}: {moved} bytes on the wire; beta last_sync {}", pair.beta.status()["last_sync"]);
    for p in [&pair.alpha, &pair.beta] {
        let s = p.status();
        assert_eq!(last_kind(&s), "bitmap", "{test}: {} last_sync.kind after overflowing wal_retain\n{s:#}", p.name);
    }
    assert!(
        moved < 2 * ext.changed() + MIB,
        "{test}: {moved} bytes on the wire for {} bytes of changed blocks ({logged} logged)",
        ext.changed()
    );
    assert_in_sync(&pair, test);
    stop_and_compare(&mut pair, test);
}

/// Protocol C: alpha is SIGKILLed under a random workload (FUA, FLUSH),
/// beta is promoted and writes elsewhere; alpha, restarted, comes back as
/// secondary, becomes the sync target on its own (its writes that never
/// reached beta are rolled back), and ends byte-identical with beta; every
/// write durable before the kill reads back from beta.
#[test]
fn old_primary_returns_as_sync_target() {
    old_primary_returns("C");
}

/// The same under protocol A: many of alpha's writes never reached beta
/// (A acknowledges before sending), so more is rolled back on alpha; the
/// copies still end identical (A promises no durability across a
/// failover, so the workload's durability is not checked).
#[test]
fn old_primary_returns_as_sync_target_protocol_a() {
    old_primary_returns("A");
}

fn old_primary_returns(protocol: &str) {
    let test = &format!("old primary returns (protocol {protocol})");
    let seed = seed(test);
    let mut pair = Pair::up_blank(PairOpts::new(protocol));
    let client = pair.rt.block_on(pair.alpha.nbd());
    let work = Workload::start(&pair.rt, client, 8, seed, 1 << 32);
    std::thread::sleep(Duration::from_millis(800));
    pair.alpha.kill9();
    let history = work.finish(&pair.rt);
    let b = pair.beta.wait_disconnected(Duration::from_secs(10));
    assert_eq!(b["disk"], "uptodate", "{test}: {b:#}");
    pair.beta.repctl_ok(&["promote"]);

    // Beta writes after the failover, away from the workload's region.
    let region_end = (REGION_BLOCKS * common::durable::BLOCK) as u64;
    let beta_ext = pair.rt.block_on(async {
        let c = pair.beta.nbd().await;
        let ext = scattered_writes(&c, 2 * region_end, pair.size, 2 * MIB, seed ^ 1).await;
        c.disconnect().await.expect("disconnect");
        ext
    });

    pair.alpha.start();
    let a = pair.alpha.status();
    assert_eq!(a["role"], "secondary", "{test}: a restarted node is secondary\n{a:#}");
    pair.alpha.wait_sync(60);
    pair.assert_established_with_primary("beta");
    let a = pair.alpha.status();
    eprintln!(
        "{test}: {} writes ({} durable); beta wrote {} bytes; alpha decision {}, last_sync {}",
        history.writes.len(),
        history.durable_writes(),
        beta_ext.written(),
        a["decision"],
        a["last_sync"]
    );
    assert!(text(&a["decision"]).contains("target"), "{test}: alpha's decision must make it the sync target\n{a:#}");
    // No sync ran before (up_blank): this one is the return's.
    assert_ne!(last_kind(&a), "", "{test}: alpha ran a sync as target (last_sync)\n{a:#}");

    if protocol == "C" {
        let base = vec![0u64; REGION_BLOCKS];
        let allowed = acceptable(&base, &history);
        let constrained = pair.rt.block_on(async {
            let c = pair.beta.nbd().await;
            let n = verify(&c, &allowed, &base, &format!("{test}, seed {seed}, read from beta")).await;
            c.disconnect().await.expect("disconnect");
            n
        });
        assert!(constrained > 0, "{test}: no write was durable before the kill: the test checked nothing");
    }
    assert_in_sync(&pair, test);
    assert_verify_clean(&pair.beta, test);
    stop_and_compare(&mut pair, test);
}

/// Which node is SIGKILLed during the resync.
#[derive(Debug, Clone, Copy)]
enum Victim {
    Source,
    Target,
    /// Both at once (a power cut of a rack, as far as SIGKILL goes).
    Both,
}

/// A full sync of 64 MiB (alpha wrote 8 MiB alone, then beta connects
/// blank) through a 4 MiB/s link (slow enough whatever the engine's speed);
/// at half way one side is SIGKILLed and restarted. The sync resumes: what
/// remains is well below the volume (a restart from zero would leave all
/// of it), and the copies end identical.
fn resync_resumes_after_sigkill(victim: Victim) {
    let test = format!("resync resumes after SIGKILL ({victim:?})");
    let seed = seed(&test);
    let mut pair = Pair::new(PairOpts::new("C").proxied());
    pair.proxies().set_mode(repblock_netproxy::Mode::Refuse);
    pair.start_both();
    pair.alpha.repctl_ok(&["promote", "--force"]);
    let ext = write_scattered(&pair, GAP, seed);
    pair.proxies().set_rate(Some(4 * MIB));
    pair.heal();
    let s = pair.beta.wait_status("sync-target", Duration::from_secs(20), |s| s["replication"] == "sync-target");
    let total = u(&s["resync"]["total_bytes"]);
    assert!(total >= pair.size, "{test}: the initial sync covers the volume\n{s:#}");
    let s = pair.beta.wait_status("half synced", Duration::from_secs(30), |s| {
        u(&s["resync"]["done_bytes"]) * 2 >= u(&s["resync"]["total_bytes"]) && s["replication"] == "sync-target"
    });
    let done_before = u(&s["resync"]["done_bytes"]);
    match victim {
        Victim::Target => {
            pair.beta.kill9();
            pair.alpha.wait_disconnected(Duration::from_secs(10));
            pair.beta.start();
        }
        Victim::Source => {
            pair.alpha.kill9();
            let b = pair.beta.wait_disconnected(Duration::from_secs(10));
            assert_eq!(b["disk"], "inconsistent", "{test}: an interrupted sync target stays inconsistent\n{b:#}");
            let msg = pair.beta.repctl_refused(&["promote"]);
            assert!(
                msg.to_lowercase().contains("inconsistent"),
                "{test}: promote of an inconsistent target is refused, saying why: {msg}"
            );
            pair.alpha.start();
        }
        Victim::Both => {
            pair.alpha.kill9();
            pair.beta.kill9();
            pair.beta.start();
            let b = pair.beta.status();
            assert_eq!(b["disk"], "inconsistent", "{test}: an interrupted sync target stays inconsistent\n{b:#}");
            pair.alpha.start();
        }
    }
    // The resumed sync, still at 4 MiB/s, so that its start is seen.
    let s = pair.beta.wait_status("the resumed sync", Duration::from_secs(30), |s| {
        (s["replication"] == "sync-target" && u(&s["resync"]["total_bytes"]) > 0)
            || (s["replication"] == "established" && s["disk"] == "uptodate")
    });
    let remaining = u(&s["resync"]["total_bytes"]).saturating_sub(u(&s["resync"]["done_bytes"]));
    eprintln!(
        "{test}: {done_before} of {total} bytes done at the kill; {remaining} remaining after the restart \
         (kind {}); beta: {}",
        s["resync"]["kind"], s["replication"]
    );
    assert!(
        remaining < total - done_before / 3,
        "{test}: after the restart {remaining} bytes remain of {total}, with {done_before} done before the kill: \
         the sync started over instead of resuming\n{s:#}"
    );
    pair.proxies().set_rate(None);
    pair.beta.wait_sync(60);
    for p in [&pair.alpha, &pair.beta] {
        p.wait_status("established, both uptodate", Duration::from_secs(20), |s| {
            s["replication"] == "established" && s["disk"] == "uptodate" && s["peer"]["disk"] == "uptodate"
        });
    }
    assert!(ext.written() > 0);
    assert_in_sync(&pair, &test);
    stop_and_compare(&mut pair, &test);
}

#[test]
fn resync_resumes_after_sigkill_of_the_target() {
    resync_resumes_after_sigkill(Victim::Target);
}

#[test]
fn resync_resumes_after_sigkill_of_the_source() {
    resync_resumes_after_sigkill(Victim::Source);
}

#[test]
fn resync_resumes_after_sigkill_of_both() {
    resync_resumes_after_sigkill(Victim::Both);
}

/// Beta's data file is damaged while beta is stopped (16 blocks
/// overwritten behind repd's back); beta rejoins without noticing (same
/// generation, nothing to sync). `repctl invalidate` on beta takes a full
/// copy from alpha: `last_sync.kind` is `full` and the files end identical.
#[test]
fn invalidate_on_the_secondary_takes_a_full_copy() {
    let test = "invalidate";
    let seed = seed(test);
    // No initial sync (up_blank): the copy under test is invalidate's.
    let mut pair = Pair::up_blank(PairOpts::new("C"));
    let ext = write_scattered(&pair, GAP, seed);
    let local = u(&pair.alpha.status()["lsn"]["local"]);
    pair.beta.wait_status("beta caught up", Duration::from_secs(10), |s| u(&s["lsn"]["local"]) >= local);
    let st = pair.beta.term();
    assert!(st.success(), "{test}: beta stops cleanly ({st})");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(data_file(&pair.beta)).expect("open beta's data file");
        for (i, &(off, _)) in ext.writes.iter().step_by(ext.writes.len() / 16 + 1).enumerate() {
            f.write_all_at(&[0xee ^ i as u8; 4096], off).expect("damage beta's data file");
        }
        f.sync_all().expect("fsync");
    }
    assert_ne!(
        file_checksums(&data_file(&pair.alpha), pair.size, 1 << 20),
        file_checksums(&data_file(&pair.beta), pair.size, 1 << 20),
        "{test}: the damage must make the files differ"
    );
    pair.beta.start();
    pair.assert_established();
    let last_before = pair.beta.status()["last_sync"].clone();
    pair.beta.repctl_ok(&["invalidate"]);
    let s = pair.beta.wait_status("sync-target or done", Duration::from_secs(20), |s| {
        s["replication"] == "sync-target" || s["last_sync"] != last_before
    });
    if s["replication"] == "sync-target" {
        assert_eq!(s["disk"], "inconsistent", "{test}: an invalidated target is inconsistent until done\n{s:#}");
    }
    pair.beta.wait_sync(60);
    pair.assert_established();
    let b = pair.beta.status();
    assert!(u(&b["last_sync"]["bytes"]) >= pair.size, "{test}: a full sync moves the whole volume\n{b:#}");
    assert_in_sync(&pair, test);
    stop_and_compare(&mut pair, test);
    // Last, so that the data checks above run whatever the label.
    assert_eq!(last_kind(&b), "full", "{test}: the status calls the copy invalidate takes a full sync\n{b:#}");
}

/// `repctl connect --dry-run` on a disconnected secondary that missed
/// writes says it would be the sync target, and changes nothing (still
/// standalone, nothing synced); the real `connect` then syncs.
#[test]
fn connect_dry_run_says_what_a_connect_would_do() {
    let test = "connect --dry-run";
    let seed = seed(test);
    let mut pair = Pair::up_blank(PairOpts::new("C").proxied());
    pair.beta.repctl_ok(&["disconnect"]);
    pair.alpha.wait_disconnected(Duration::from_secs(10));
    let ext = write_scattered(&pair, MIB, seed);
    let before = pair.proxies().bytes_total();
    let last_before = pair.beta.status()["last_sync"].clone();
    let out = pair.beta.repctl_ok(&["connect", "--dry-run"]);
    eprintln!("{test}: beta says: {out}");
    assert!(out.to_lowercase().contains("target"), "{test}: beta would be the sync target: {out}");
    std::thread::sleep(Duration::from_millis(500));
    let b = pair.beta.status();
    assert_eq!(b["connection"], "standalone", "{test}: a dry run does not connect\n{b:#}");
    assert_eq!(b["last_sync"], last_before, "{test}: a dry run syncs nothing\n{b:#}");
    let moved = pair.proxies().bytes_total() - before;
    assert!(moved < 64 * 1024, "{test}: the dry run moved {moved} bytes: data crossed the link");
    pair.beta.repctl_ok(&["connect"]);
    pair.beta.wait_sync(60);
    pair.assert_established();
    assert!(ext.written() > 0);
    assert_in_sync(&pair, test);
    stop_and_compare(&mut pair, test);
}

/// The bitmap granularity is fixed at create-md: a node whose config later
/// says otherwise refuses to start, naming the field.
#[test]
fn bitmap_granularity_change_is_refused_naming_the_field() {
    let mut opts = common::NodeOpts::new("sync");
    opts.extra = "bitmap_granularity = \"4KiB\"".into();
    let mut n = common::TestNode::with(opts);
    n.create_md();
    n.opts.extra = "bitmap_granularity = \"64KiB\"".into();
    n.write_config();
    let err = n.try_start().expect_err("repd must refuse a bitmap_granularity other than create-md's");
    assert!(err.contains("bitmap_granularity"), "the refusal names the field:\n{err}");
    n.opts.extra = "bitmap_granularity = \"4KiB\"".into();
    n.write_config();
    n.start();
    let s = n.status();
    assert_eq!(s["bitmap_granularity"], 4096, "status shows the granularity\n{s:#}");
}

/// How the gap of [`writes_during_the_sync_win`] is written.
#[derive(Debug, Clone, Copy)]
enum Gap {
    /// 4..64 KiB writes: their data is in the WAL, a log catch-up.
    Small,
    /// 256 KiB writes, which go to the data file in place (the WAL holds
    /// no data for them): the log cannot replay them, a bitmap resync.
    InPlace,
}

/// Alpha writes 8 MiB during a partition; the heal starts the sync through
/// a 4 MiB/s link, and while it runs alpha rewrites the same extents (new
/// content) and writes new places: the newest content wins on beta (files
/// identical after a clean stop), and the kind is `log` for small writes,
/// `bitmap` for in-place ones.
fn writes_during_the_sync_win(gap: Gap) {
    use rand::{RngCore, SeedableRng};
    let test = format!("writes during the sync ({gap:?} gap)");
    let seed = seed(&test);
    let mut pair = Pair::up_blank(PairOpts::new("C").proxied().size("256MiB"));
    pair.partition();
    let ext = match gap {
        Gap::Small => write_scattered(&pair, GAP, seed),
        Gap::InPlace => pair.rt.block_on(async {
            let c = pair.alpha.nbd().await;
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut ext = Extents::default();
            let piece = 256 * 1024u64;
            for _ in 0..GAP / piece {
                let off = (rng.next_u64() % (pair.size / piece)) * piece;
                let mut data = vec![0u8; piece as usize];
                rng.fill_bytes(&mut data);
                c.write(off, &data, false).await.expect("in-place write");
                ext.writes.push((off, piece));
                ext.blocks.extend((off / 4096)..(off + piece) / 4096);
            }
            c.flush().await.expect("flush");
            c.disconnect().await.expect("disconnect");
            ext
        }),
    };
    pair.proxies().set_rate(Some(4 * MIB));
    pair.heal();
    pair.beta.wait_status("the sync runs", Duration::from_secs(30), |s| {
        s["connection"] == "connected" && s["replication"] != "established" && !s["replication"].is_null()
    });
    // Back to front, so that some rewrites land before the sync reaches
    // their blocks and some after; all issued at once while the sync runs
    // (under C their replies may wait for the catch-up ahead of them in the
    // stream), then 1 MiB elsewhere.
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x00de_ad00);
    let rewrites: Vec<(u64, Vec<u8>)> = ext
        .writes
        .iter()
        .rev()
        .step_by(2)
        .map(|&(off, len)| {
            let mut data = vec![0u8; len as usize];
            rng.fill_bytes(&mut data);
            (off, data)
        })
        .collect();
    let client = pair.rt.block_on(pair.alpha.nbd());
    let b = pair.beta.status();
    assert!(b["replication"] != "established", "{test}: the sync ended before the rewrites: nothing overlaps\n{b:#}");
    let t = Instant::now();
    pair.rt.block_on(async {
        let tasks: Vec<_> = rewrites
            .into_iter()
            .map(|(off, data)| {
                let c = client.clone();
                tokio::spawn(async move { c.write(off, &data, false).await })
            })
            .collect();
        for t in tasks {
            t.await.expect("task").expect("rewrite during the sync");
        }
        scattered_writes(&client, 0, pair.size, MIB, seed ^ 0x0e_e000).await;
    });
    eprintln!("{test}: the rewrites issued during the sync completed in {:?}", t.elapsed());
    let still_syncing = pair.beta.status()["replication"] != "established";
    pair.rt.block_on(client.disconnect()).expect("disconnect");
    pair.proxies().set_rate(None);
    pair.beta.wait_sync(60);
    pair.assert_established();
    let b = pair.beta.status();
    eprintln!(
        "{test}: beta last_sync {} (the sync was still running after the writes: {still_syncing})",
        b["last_sync"]
    );
    let want = match gap {
        Gap::Small => "log",
        Gap::InPlace => "bitmap",
    };
    assert_in_sync(&pair, &test);
    stop_and_compare(&mut pair, &test);
    assert_eq!(last_kind(&b), want, "{test}: last_sync.kind\n{b:#}");
}

#[test]
fn writes_during_a_log_catch_up_win() {
    writes_during_the_sync_win(Gap::Small);
}

#[test]
fn writes_during_a_bitmap_resync_win() {
    writes_during_the_sync_win(Gap::InPlace);
}

/// A log catch-up is cut short by the primary's death: the secondary,
/// `consistent` (a prefix of the primary's log), is promoted without
/// `--force`, and every block of the workload's region holds a whole write
/// that was made to it (or its old zeroes), never torn or foreign bytes.
#[test]
fn a_log_catch_up_cut_by_the_primary_death_leaves_a_promotable_secondary() {
    let test = "catch-up cut by the primary's death";
    let seed = seed(test);
    let mut pair = Pair::up_blank(PairOpts::new("C").proxied());
    pair.partition();
    let client = pair.rt.block_on(pair.alpha.nbd());
    let work = Workload::start(&pair.rt, client, 8, seed, 1 << 32);
    std::thread::sleep(Duration::from_millis(1500));
    let history = work.finish(&pair.rt);
    let completed = history.writes.iter().filter(|w| w.completed.is_some()).count();
    pair.proxies().set_rate(Some(MIB));
    pair.heal();
    let at_start = pair.beta.wait_status("the catch-up runs", Duration::from_secs(30), |s| {
        s["replication"] != "established" && !s["replication"].is_null() && s["resync"]["kind"] == "log"
    });
    // A second of it (1 MiB of the log), then the primary dies.
    std::thread::sleep(Duration::from_secs(1));
    pair.alpha.kill9();
    let b = pair.beta.wait_disconnected(Duration::from_secs(10));
    eprintln!(
        "{test}: {completed} writes completed alone; beta at the catch-up's start: {}; at the kill: {}",
        at_start["resync"], b["resync"]
    );
    assert_eq!(b["disk"], "consistent", "{test}: an interrupted log catch-up leaves the target consistent\n{b:#}");
    pair.beta.repctl_ok(&["promote"]);
    let mut allowed = vec![std::collections::HashSet::from([0u64]); REGION_BLOCKS];
    for w in &history.writes {
        allowed[w.block].insert(w.id);
    }
    pair.rt.block_on(async {
        let c = pair.beta.nbd().await;
        common::durable::check_region(&c, &allowed, &format!("{test}, seed {seed}, read from beta")).await;
        c.disconnect().await.expect("disconnect");
    });
}

/// `bitmap_granularity = "64KiB"`: a bitmap resync (forced by
/// overflowing `wal_retain`) moves whole 64 KiB grains: at least the
/// changed 4 KiB blocks, at most the grains they touch; the status shows
/// the granularity; the copies end identical.
#[test]
fn bitmap_resync_at_64k_granularity_moves_whole_grains() {
    let test = "64 KiB granularity";
    let seed = seed(test);
    const GRAIN64: u64 = 64 * 1024;
    let mut pair = Pair::up_blank(
        PairOpts::new("C")
            .proxied()
            .size("256MiB")
            .extra("bitmap_granularity = \"64KiB\"")
            .extra("wal_retain = \"64MiB\"")
            .extra("wal_segment_size = \"16MiB\""),
    );
    let a = pair.alpha.status();
    assert_eq!(u(&a["bitmap_granularity"]), GRAIN64, "{test}: status shows the granularity\n{a:#}");
    pair.partition();
    let ext = write_scattered(&pair, 4 * MIB, seed);
    pair.rt.block_on(async {
        let c = pair.alpha.nbd().await;
        for round in 0..24u8 {
            for &(off, len) in &ext.writes {
                c.write(off, &vec![0x20 + round; len as usize], false).await.unwrap_or_else(|e| panic!("rewrite: {e}"));
            }
        }
        c.flush().await.expect("flush");
        c.disconnect().await.expect("disconnect");
    });
    let grains: std::collections::BTreeSet<u64> = ext.blocks.iter().map(|b| b * 4096 / GRAIN64).collect();
    let grain_bytes = grains.len() as u64 * GRAIN64;
    pair.alpha.wait_status("WAL within wal_retain", Duration::from_secs(20), |s| u(&s["wal"]["bytes"]) <= 128 * MIB);
    pair.heal();
    pair.beta.wait_sync(60);
    pair.assert_established();
    let b = pair.beta.status();
    eprintln!(
        "{test}: {} bytes of 4 KiB blocks changed in {} grains ({grain_bytes} bytes); beta last_sync {}",
        ext.changed(),
        grains.len(),
        b["last_sync"]
    );
    assert_eq!(last_kind(&b), "bitmap", "{test}: {b:#}");
    let moved = u(&b["last_sync"]["bytes"]);
    assert!(
        moved >= ext.changed() && moved <= grain_bytes,
        "{test}: a 64 KiB-grain resync moves between the changed blocks ({}) and their grains ({grain_bytes}): {moved}",
        ext.changed()
    );
    assert_in_sync(&pair, test);
    stop_and_compare(&mut pair, test);
}

/// `resync_rate = "8MiB/s"` caps a 32 MiB full sync: it takes about 4 s,
/// not the fraction of a second loopback allows; the speed is reported
/// while it runs, and the average of `last_sync` is within the cap.
#[test]
fn resync_rate_caps_the_sync() {
    let test = "resync_rate";
    let mut pair = Pair::new(PairOpts::new("C").size("32MiB").extra("resync_rate = \"8MiB/s\""));
    pair.start_both();
    for p in [&pair.alpha, &pair.beta] {
        p.wait_status("connected", Duration::from_secs(20), |s| s["connection"] == "connected");
    }
    let t = Instant::now();
    pair.alpha.repctl_ok(&["promote", "--force"]);
    let poll = StatusLog::start(&pair.beta);
    pair.beta.wait_sync(60);
    let took = t.elapsed();
    let samples = poll.stop();
    let max_speed = samples.iter().map(|s| u(&s["resync"]["speed_bytes_per_sec"])).max().unwrap_or(0);
    let b = pair.beta.status();
    eprintln!(
        "{test}: 32 MiB full sync at an 8 MiB/s cap took {took:?}; highest reported speed {max_speed} B/s; {}",
        b["last_sync"]
    );
    assert_eq!(last_kind(&b), "full", "{test}: {b:#}");
    assert!(
        took >= Duration::from_millis(3200),
        "{test}: 32 MiB at 8 MiB/s took only {took:?}: the cap is not applied"
    );
    assert!(max_speed > 0, "{test}: no status sample reported the sync's speed");
    let avg = u(&b["last_sync"]["bytes"]) as f64 / b["last_sync"]["seconds"].as_f64().unwrap_or(f64::NAN);
    assert!(avg <= 8.8 * MIB as f64, "{test}: average {avg:.0} B/s above the 8 MiB/s cap\n{b:#}");
    pair.assert_established();
    stop_and_compare(&mut pair, test);
}
