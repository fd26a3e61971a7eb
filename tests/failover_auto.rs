//! Automatic failover with real processes (issue 10, stage E): `repd` for
//! alpha, beta and the witness gamma on loopback; NBD clients writing and
//! reading through the real export.
//!
//! - SIGKILL of the primary under a flushing writer: the secondary is
//!   granted the next term by the witness and promotes itself; its first
//!   accepted write is timed from the kill; every write acknowledged
//!   (write + flush) before the kill is read back from it.
//! - The primary partitioned from both peer and witness (the in-project
//!   proxy on both links): its last acknowledgement precedes the new
//!   primary's first (one monotonic clock: this process's); a read through
//!   its still-open connection returns no data; it fences itself and,
//!   healed, rejoins as sync target of the new primary.
//! - SIGSTOP of the primary for longer than `detect`, then SIGCONT: no
//!   reply leaves it after it wakes; fenced; rejoins.
//! - Only the data link partitioned: the primary goes on alone after the
//!   witness's solo grant; the secondary is outdated and not promotable;
//!   healed, it resyncs and is eligible again.
//! - The witness down: nothing changes while both data nodes are up.
//! - `repctl demote` of the primary with failover on releases its term at
//!   the witness; the secondary takes over by itself, nothing acknowledged
//!   is lost (a switchover without the hand-over message: the IO pause is
//!   about `wait`).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::pair::{Pair, PairOpts};
use common::witness::{Witness, pair_with_witness, wait_event};
use repblock::nbd::NbdClient;
use repblock_netproxy::{Mode, Proxy, ProxyHandle};
use serde_json::Value;

const BLOCK: usize = 4096;
/// Blocks the writer cycles through (16 MiB of the 64 MiB volume).
const SLOTS: u64 = 4096;
/// Where tests write on the new primary (after the writer's slots).
const NEW_PRIMARY_AT: u64 = (SLOTS + 16) * BLOCK as u64;
const FAILOVER: &str = "mode = \"witness\"";

/// Witness up, the pair up (alpha promoted through the witness: term 1),
/// beta resynced and eligible (the witness has it up to date).
fn up(failover: &str) -> (Pair, Witness) {
    let (mut pair, mut w) = pair_with_witness(failover);
    w.repctl_ok(&["create-md"]);
    w.start();
    pair.bring_up();
    let s = pair.alpha.status();
    assert_eq!((s["term"].clone(), s["failover"]["state"].clone()), (1.into(), "primary".into()), "{s:#}");
    pair.beta.wait_status("beta eligible", Duration::from_secs(20), |s| s["failover"]["eligible"] == true);
    let ws = w.status();
    assert_eq!(ws["uptodate"], serde_json::json!(["alpha", "beta"]), "{ws:#}");
    (pair, w)
}

/// Block `i`'s contents: its number in every 8 bytes.
fn block(i: u64) -> Vec<u8> {
    (0..BLOCK / 8).flat_map(|k| i.wrapping_mul(1_000_003).wrapping_add(k as u64).to_le_bytes()).collect()
}

fn offset(i: u64) -> u64 {
    (i % SLOTS) * BLOCK as u64
}

/// What a flushing writer acknowledged so far.
#[derive(Default)]
struct Progress {
    /// Write + flush pairs answered with success.
    acked: AtomicU64,
    /// When the last one was answered (this process's monotonic clock).
    last: std::sync::Mutex<Option<Instant>>,
}

impl Progress {
    fn acked(&self) -> u64 {
        self.acked.load(Ordering::SeqCst)
    }

    fn last(&self) -> Option<Instant> {
        *self.last.lock().unwrap()
    }

    /// Waits until `n` more pairs are acknowledged.
    fn wait_more(&self, n: u64, within: Duration, what: &str) {
        let start = self.acked();
        let deadline = Instant::now() + within;
        while self.acked() < start + n {
            assert!(
                Instant::now() < deadline,
                "{what}: only {} of {n} writes acknowledged in {within:?}",
                self.acked() - start
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Writes block after block to `client`, each followed by a flush, and
/// counts those acknowledged (write and flush answered) in `p`, until an
/// error.
async fn flushing_writer(client: NbdClient, p: Arc<Progress>) -> String {
    for i in 0u64.. {
        if let Err(e) = client.write(offset(i), &block(i), false).await {
            return format!("write {i}: {e}");
        }
        if let Err(e) = client.flush().await {
            return format!("flush after write {i}: {e}");
        }
        *p.last.lock().unwrap() = Some(Instant::now());
        p.acked.store(i + 1, Ordering::SeqCst);
    }
    unreachable!()
}

/// The first write + flush `node` accepts (retrying connect and write
/// until `within`), at [`NEW_PRIMARY_AT`]: when its answer arrived, and the
/// client.
async fn first_write(node: &common::pair::Peer, within: Duration) -> (Instant, NbdClient) {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(c) = NbdClient::connect(&node.nbd_addr(), "r0").await
            && c.write(NEW_PRIMARY_AT, &block(u64::MAX), false).await.is_ok()
            && c.flush().await.is_ok()
        {
            return (Instant::now(), c);
        }
        assert!(Instant::now() < deadline, "{} accepted no write within {within:?}:\n{}", node.name, node.log());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn sig(node: &common::pair::Peer, signal: &str) {
    let pid = node.pid().expect("running").to_string();
    let st = std::process::Command::new("kill").args([signal, &pid]).status().expect("kill");
    assert!(st.success(), "kill {signal} {pid}");
}

/// A proxied pair (both data-link directions through the proxy) with the
/// witness; alpha reaches the witness through a proxy of its own (returned),
/// beta directly. Up as in [`up`].
fn up_proxied() -> (Pair, Witness, ProxyHandle) {
    let mut pair = Pair::new(PairOpts::new("C").proxied().extra(&format!("[failover]\n{FAILOVER}\n")));
    let [port] = common::free_ports::<1>();
    let d = pair.dir.path().display().to_string();
    let shared = std::fs::read_to_string(&pair.alpha.config).expect("config");
    let gamma = |port: u16| {
        format!(
            "[[node]]\nname = \"gamma\"\nwitness = true\nreplication = \"127.0.0.1:{port}\"\n\
             control = \"{d}/run/gamma.sock\"\ndir = \"{d}/gamma\"\n"
        )
    };
    let wproxy = pair
        .rt
        .block_on(Proxy::start("127.0.0.1:0".parse().unwrap(), ([127, 0, 0, 1], port).into()))
        .expect("witness proxy");
    std::fs::write(&pair.beta.config, format!("{shared}{}", gamma(port))).expect("write config");
    let alpha_cfg = pair.dir.path().join("alpha.toml");
    std::fs::write(&alpha_cfg, format!("{shared}{}", gamma(wproxy.local_addr().port()))).expect("write config");
    pair.alpha.config = alpha_cfg;
    let mut w = Witness::with_config(pair.beta.config.clone());
    w.repctl_ok(&["create-md"]);
    w.start();
    pair.bring_up();
    pair.beta.wait_status("beta eligible", Duration::from_secs(20), |s| s["failover"]["eligible"] == true);
    (pair, w, wproxy)
}

/// The fenced old primary `node` rejoined: secondary of `term`, following,
/// connected, established, up to date.
fn wait_rejoined(node: &common::pair::Peer, term: u64) -> Value {
    node.wait_status("rejoined as secondary", Duration::from_secs(60), |s| {
        s["role"] == "secondary"
            && s["term"] == term
            && s["failover"]["state"] == "following"
            && s["connection"] == "connected"
            && s["replication"] == "established"
            && s["disk"] == "uptodate"
    })
}

/// Every block acknowledged (the first `acked`) holds what was written
/// (the newest write of each slot).
async fn check_acknowledged(client: &repblock::nbd::NbdClient, acked: u64) {
    let first = acked.saturating_sub(SLOTS);
    for i in first..acked {
        let got = client.read(offset(i), BLOCK as u32).await.expect("read back");
        assert!(got[..] == block(i)[..], "acknowledged write {i} (of {acked}) is not on the new primary");
    }
}

#[test]
fn sigkill_of_the_primary_under_a_flushing_writer_promotes_the_secondary() {
    let (mut pair, _w) = up("mode = \"witness\"");
    let (_eb, beta_events) = common::spawn_events(&pair.beta.config, "beta", &[]);
    std::thread::sleep(Duration::from_millis(300));

    let p = Arc::new(Progress::default());
    let client = pair.rt.block_on(pair.alpha.nbd());
    let writer = pair.rt.spawn(flushing_writer(client, Arc::clone(&p)));
    p.wait_more(200, Duration::from_secs(20), "before the kill");
    let killed = Instant::now();
    pair.alpha.kill9();
    let why = pair.rt.block_on(writer).expect("writer task");
    let acked = p.acked();
    println!("alpha SIGKILLed after {acked} acknowledged write+flush pairs; the writer stopped: {why}");

    // Beta takes over by itself: the first write it accepts, timed from the kill.
    let (at, client) = pair.rt.block_on(first_write(&pair.beta, Duration::from_secs(30)));
    let takeover = at - killed;
    println!("takeover: SIGKILL of alpha -> first write accepted on beta: {} ms", takeover.as_millis());
    assert!(takeover < Duration::from_secs(15), "takeover took {takeover:?}");

    // Not one acknowledged write lost.
    pair.rt.block_on(check_acknowledged(&client, acked));
    println!("all {acked} acknowledged writes read back from beta");

    let ev = wait_event(&beta_events, "promoted", Duration::from_secs(5), |v| v["event"] == "promoted");
    println!("beta's promoted event: {ev}");
    assert_eq!((ev["auto"].clone(), ev["term"].clone()), (true.into(), 2.into()), "{ev}");
    let s = pair.beta.status();
    assert_eq!((s["role"].clone(), s["term"].clone()), ("primary".into(), 2.into()), "{s:#}");
    assert_eq!(s["failover"]["state"], "primary", "{s:#}");
    let last = &s["failover"]["last_failover"];
    assert_eq!((last["to"].clone(), last["term"].clone()), ("beta".into(), 2.into()), "{s:#}");
    println!(
        "beta's own measure: detect {} ms, wait {} ms, total {} ms",
        last["detect_ms"], last["waited_ms"], last["total_ms"]
    );
}

#[test]
fn the_primary_cut_off_from_peer_and_witness_stops_before_the_new_one_starts_and_rejoins() {
    partition_from_both(false);
}

/// The partition heals as soon as beta serves, before alpha's
/// `fence_demote_after` is over (alpha is then still a suspended primary,
/// unless the host is slow): alpha meets the newer term on the link, is
/// fenced, and rejoins — no split brain, no standalone.
#[test]
fn a_partition_healed_before_the_old_primary_fenced_itself_ends_the_same() {
    partition_from_both(true);
}

fn partition_from_both(heal_early: bool) {
    let (pair, _w, wproxy) = up_proxied();
    let p = Arc::new(Progress::default());
    let client = pair.rt.block_on(pair.alpha.nbd());
    let reader = pair.rt.block_on(pair.alpha.nbd());
    let writer = pair.rt.spawn(flushing_writer(client, Arc::clone(&p)));
    p.wait_more(100, Duration::from_secs(20), "before the partition");

    let cut = Instant::now();
    pair.proxies().set_mode(Mode::Blackhole);
    wproxy.set_mode(Mode::Blackhole);
    let (b_first, b_client) = pair.rt.block_on(first_write(&pair.beta, Duration::from_secs(30)));
    println!("partition -> first write accepted on beta: {} ms", (b_first - cut).as_millis());
    let read = pair.rt.spawn(async move {
        tokio::time::timeout(Duration::from_secs(10), reader.read(NEW_PRIMARY_AT, BLOCK as u32)).await
    });
    if heal_early {
        pair.proxies().set_mode(Mode::Pass);
        wproxy.set_mode(Mode::Pass);
        println!(
            "healed {} ms after the cut: alpha is {}",
            cut.elapsed().as_millis(),
            pair.alpha.status()["failover"]["state"]
        );
    }
    // Alpha fences itself (its control socket is not partitioned).
    let s = pair.alpha.wait_status("alpha fenced", Duration::from_secs(20), |s| {
        s["role"] == "secondary" && (s["failover"]["state"] == "fenced" || heal_early)
    });
    println!("alpha fenced: {}", s["failover"]);
    let why = pair.rt.block_on(writer).expect("writer task");
    let a_last = p.last().expect("alpha acknowledged writes");
    println!(
        "alpha's last acknowledgement {} ms after the cut, beta's first {} ms after it (writer: {why})",
        a_last.saturating_duration_since(cut).as_millis(),
        (b_first - cut).as_millis()
    );
    assert!(a_last < b_first, "alpha acknowledged a write after beta's first");
    // The read sent through alpha's connection after beta's first write:
    // no data (old data would be a stale read).
    let r = pair.rt.block_on(read).expect("read task");
    assert!(!matches!(r, Ok(Ok(_))), "alpha answered a read after beta's first write: {r:?}");
    println!("read on alpha's old connection after beta's first write: {r:?}");

    // Healed: alpha rejoins as sync target of beta (term 2).
    pair.proxies().set_mode(Mode::Pass);
    wproxy.set_mode(Mode::Pass);
    let s = wait_rejoined(&pair.alpha, 2);
    assert_eq!(s["peer"]["role"], "primary", "{s:#}");
    let acked = p.acked();
    pair.rt.block_on(check_acknowledged(&b_client, acked));
    println!("all {acked} writes alpha acknowledged are on beta; alpha rejoined as secondary of term 2");
}

#[test]
fn sigstop_of_the_primary_longer_than_detect_then_sigcont_fences_it() {
    let (mut pair, _w) = up(FAILOVER);
    let p = Arc::new(Progress::default());
    let client = pair.rt.block_on(pair.alpha.nbd());
    let writer = pair.rt.spawn(flushing_writer(client, Arc::clone(&p)));
    p.wait_more(100, Duration::from_secs(20), "before SIGSTOP");
    let stopped = Instant::now();
    sig(&pair.alpha, "-STOP");
    let (b_first, b_client) = pair.rt.block_on(first_write(&pair.beta, Duration::from_secs(30)));
    println!("SIGSTOP -> first write accepted on beta: {} ms", (b_first - stopped).as_millis());
    // Well past detect (1.5 s) and fence_demote_after (2 s).
    std::thread::sleep(Duration::from_secs(4).saturating_sub(stopped.elapsed()));
    let acked_before = p.acked();
    let resumed = Instant::now();
    sig(&pair.alpha, "-CONT");
    let s = pair.alpha.wait_status("alpha fenced and demoted", Duration::from_secs(20), |s| s["role"] == "secondary");
    println!("alpha after SIGCONT: {}", s["failover"]);
    let why = pair.rt.block_on(writer).expect("writer task");
    println!("alpha's writer after SIGCONT: {why}; acknowledged {acked_before} before SIGSTOP");
    assert_eq!(p.acked(), acked_before, "alpha acknowledged a write after SIGCONT");
    let a_last = p.last().expect("acks");
    assert!(a_last < stopped.max(b_first) && a_last < resumed, "an acknowledgement arrived after the SIGSTOP");
    let s = wait_rejoined(&pair.alpha, 2);
    assert_eq!(s["peer"]["role"], "primary", "{s:#}");
    pair.rt.block_on(check_acknowledged(&b_client, acked_before));
    println!("all {acked_before} acknowledged writes are on beta; alpha rejoined");
    let _ = &mut pair;
}

#[test]
fn a_data_link_partition_lets_the_primary_go_on_alone_and_outdates_the_secondary() {
    let (pair, w, _wproxy) = up_proxied();
    let (_eb, beta_events) = common::spawn_events(&pair.beta.config, "beta", &[]);
    let p = Arc::new(Progress::default());
    let client = pair.rt.block_on(pair.alpha.nbd());
    let writer = pair.rt.spawn(flushing_writer(client, Arc::clone(&p)));
    p.wait_more(100, Duration::from_secs(20), "before the partition");
    let cut = Instant::now();
    let before = p.acked();
    pair.proxies().set_mode(Mode::Blackhole);
    // Alpha goes on after the solo grant.
    p.wait_more(100, Duration::from_secs(20), "after the data-link partition");
    println!(
        "data link cut: alpha acknowledged {} more writes; the longest pause ended {} ms after the cut",
        p.acked() - before,
        p.last().unwrap().saturating_duration_since(cut).as_millis()
    );
    let s =
        pair.alpha.wait_status("alpha alone", Duration::from_secs(10), |s| s["failover"]["state"] == "primary-solo");
    assert_eq!((s["role"].clone(), s["term"].clone()), ("primary".into(), 2.into()), "{s:#}");
    let s = pair.beta.wait_status("beta outdated", Duration::from_secs(20), |s| {
        s["term"] == 2 && s["failover"]["eligible"] == false
    });
    let reason = s["failover"]["eligible_reason"].as_str().unwrap_or_default().to_string();
    println!("beta: {reason}");
    assert!(reason.contains("outdated in term 2"), "{s:#}");
    assert_eq!(s["role"], "secondary", "{s:#}");
    assert_eq!(w.status()["uptodate"], serde_json::json!(["alpha"]));
    // Beta stays secondary well past detect + wait.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(pair.beta.status()["role"], "secondary");
    while let Ok(line) = beta_events.try_recv() {
        assert!(!line.contains("\"promoted\""), "beta promoted: {line}");
    }

    // Healed: beta resyncs and is eligible again.
    pair.proxies().set_mode(Mode::Pass);
    let s = pair.beta.wait_status("beta eligible again", Duration::from_secs(60), |s| {
        s["failover"]["eligible"] == true && s["disk"] == "uptodate"
    });
    println!("beta healed: {}", s["failover"]);
    assert_eq!(w.status()["uptodate"], serde_json::json!(["alpha", "beta"]));
    p.wait_more(50, Duration::from_secs(20), "after healing");
    writer.abort();
}

#[test]
fn the_witness_down_changes_nothing_while_both_data_nodes_are_up() {
    let (pair, mut w) = up(FAILOVER);
    let p = Arc::new(Progress::default());
    let client = pair.rt.block_on(pair.alpha.nbd());
    let writer = pair.rt.spawn(flushing_writer(client, Arc::clone(&p)));
    p.wait_more(50, Duration::from_secs(20), "before the witness goes");
    w.kill9();
    let killed = Instant::now();
    // Longer than lease, detect and fence_demote_after: the peer's Pongs
    // keep the lease.
    while killed.elapsed() < Duration::from_secs(4) {
        let before = p.acked();
        p.wait_more(1, Duration::from_secs(1), "with the witness down");
        assert!(p.acked() > before);
    }
    for (node, role) in [(&pair.alpha, "primary"), (&pair.beta, "secondary")] {
        let s = node.status();
        assert_eq!((s["role"].clone(), s["term"].clone()), (role.into(), 1.into()), "{s:#}");
        assert_eq!(s["failover"]["witness"]["connected"], false, "{s:#}");
    }
    let s = pair.alpha.status();
    assert_eq!(
        (s["failover"]["state"].clone(), s["failover"]["lease"]["valid"].clone()),
        ("primary".into(), true.into())
    );
    println!("witness down for 4 s: alpha acknowledged {} writes in all, no role or term change", p.acked());
    // Held writes are failover's to release (a solo grant), not resume-io's.
    let refused = pair.alpha.repctl_refused(&["resume-io"]);
    assert!(refused.contains("automatic failover"), "{refused}");
    writer.abort();
}

#[test]
fn demote_with_failover_on_releases_the_term_and_the_peer_takes_over() {
    let (pair, w) = up(FAILOVER);
    let p = Arc::new(Progress::default());
    let client = pair.rt.block_on(pair.alpha.nbd());
    let writer = pair.rt.spawn(flushing_writer(client, Arc::clone(&p)));
    p.wait_more(100, Duration::from_secs(20), "before the demote");
    let t0 = Instant::now();
    let out = pair.alpha.repctl_ok(&["demote", "--force"]);
    println!("demote: {} ms: {}", t0.elapsed().as_millis(), out.trim());
    let why = pair.rt.block_on(writer).expect("writer task");
    let acked = p.acked();
    let (b_first, b_client) = pair.rt.block_on(first_write(&pair.beta, Duration::from_secs(30)));
    println!(
        "demote of alpha -> first write accepted on beta: {} ms (alpha's writer: {why})",
        (b_first - t0).as_millis()
    );
    assert!(p.last().unwrap() < b_first);
    let s = pair.beta.status();
    assert_eq!((s["role"].clone(), s["term"].clone()), ("primary".into(), 2.into()), "{s:#}");
    let ws = w.status();
    assert_eq!((ws["term"].clone(), ws["primary"].clone()), (2.into(), "beta".into()), "{ws:#}");
    pair.rt.block_on(check_acknowledged(&b_client, acked));
    let s = wait_rejoined(&pair.alpha, 2);
    assert_eq!(s["peer"]["role"], "primary", "{s:#}");
    println!("all {acked} acknowledged writes are on beta; alpha follows it in term 2");
}

#[test]
fn failover_disable_keeps_the_secondary_from_promoting_and_enable_lets_it() {
    let (mut pair, _w) = up(FAILOVER);
    let out = pair.beta.repctl_ok(&["failover", "disable"]);
    println!("{}", out.trim());
    assert!(out.contains("enabled:no") && out.contains("disabled by the operator"), "{out}");
    let v: Value = serde_json::from_str(&pair.beta.repctl_ok(&["failover", "status", "--json"])).expect("JSON");
    assert_eq!((v["enabled"].clone(), v["eligible"].clone()), (false.into(), false.into()), "{v:#}");
    pair.alpha.kill9();
    std::thread::sleep(Duration::from_secs(4));
    let s = pair.beta.status();
    assert_eq!((s["role"].clone(), s["failover"]["state"].clone()), ("secondary".into(), "following".into()), "{s:#}");
    let t = Instant::now();
    let out = pair.beta.repctl_ok(&["failover", "enable"]);
    assert!(out.contains("enabled:yes"), "{out}");
    pair.beta.wait_status("beta promoted after enable", Duration::from_secs(15), |s| s["role"] == "primary");
    println!("failover enable on beta -> primary: {} ms", t.elapsed().as_millis());
    // Not on a node without failover.
    let (pair2, _) = (Pair::up(PairOpts::new("C")), ());
    let refused = pair2.alpha.repctl_refused(&["failover", "status"]);
    assert!(refused.contains("automatic failover is off"), "{refused}");
}
