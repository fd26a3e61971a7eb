//! Pair setup, the initial full sync and its progress, the status fields on
//! both sides, role rules, and skipping the initial sync on blank volumes.
//! Real repd processes on loopback (issue 3).

mod common;

use std::time::{Duration, Instant};

use common::pair::{MIB, Pair, PairOpts, Peer};
use serde_json::Value;

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("expected an unsigned integer, got {v}"))
}

/// create-md on both, start both, `promote --force` alpha, initial full sync
/// to beta with progress visible in status while application writes go on,
/// `wait-sync`, then every status field of design.md §6 on both sides, and
/// the LSN fields following writes and a FLUSH under protocol C.
#[test]
fn pair_setup_initial_sync_and_status() {
    let mut pair = Pair::new(PairOpts::new("C").size("128MiB").proxied());
    let size = pair.size;
    // 32 MiB/s on the link: the 128 MiB sync takes ~4 s, long enough to see
    // its progress.
    pair.proxies().set_rate(Some(32 * MIB));
    pair.start_both();

    // Both secondary, fresh metadata: connected, nobody serves NBD.
    for (me, peer) in [(&pair.alpha, "beta"), (&pair.beta, "alpha")] {
        let s = me.wait_status("connected to the peer", Duration::from_secs(20), |s| s["connection"] == "connected");
        assert_eq!(s["role"], "secondary", "{}: a fresh node is secondary\n{s:#}", me.name);
        assert_eq!(s["peer"]["name"], peer, "{s:#}");
        assert_eq!(s["peer"]["role"], "secondary", "{s:#}");
        assert_eq!(s["nbd"]["serving"], false, "{}: a secondary never serves NBD\n{s:#}", me.name);
    }
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", pair.beta.nbd_port)).is_err(),
        "beta (secondary) must not accept NBD connections"
    );

    // `repctl events` on alpha streams what follows.
    let events_path = pair.dir.path().join("alpha-events.jsonl");
    let mut events = common::ChildGuard(Some(
        std::process::Command::new(common::REPCTL)
            .arg("--config")
            .arg(&pair.alpha.config)
            .args(["--node", "alpha", "events"])
            .stdin(std::process::Stdio::null())
            .stdout(std::fs::File::create(&events_path).expect("events file"))
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn repctl events"),
    ));
    std::thread::sleep(Duration::from_millis(300));
    pair.alpha.repctl_ok(&["promote", "--force"]);

    // Progress: beta is sync-target and inconsistent, done_bytes grows
    // towards total_bytes = the volume size; alpha is sync-source.
    let s = pair.beta.wait_status("sync-target", Duration::from_secs(20), |s| s["replication"] == "sync-target");
    assert_eq!(s["disk"], "inconsistent", "beta mid-sync must be inconsistent\n{s:#}");
    assert_eq!(u(&s["resync"]["total_bytes"]), size, "a full sync covers the whole volume\n{s:#}");
    let a = pair.alpha.status();
    assert_eq!(a["replication"], "sync-source", "alpha during the initial sync\n{a:#}");
    assert_eq!(a["role"], "primary", "{a:#}");
    assert_eq!(a["peer"]["disk"], "inconsistent", "alpha sees beta's disk\n{a:#}");
    assert!(u(&a["out_of_sync_bytes"]) > 0, "alpha mid-sync has out-of-sync bytes\n{a:#}");

    let mut last_done = 0u64;
    let mut seen_partial = false;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = pair.beta.status();
        if s["replication"] != "sync-target" {
            break;
        }
        let done = u(&s["resync"]["done_bytes"]);
        let total = u(&s["resync"]["total_bytes"]);
        assert!(done >= last_done, "resync done_bytes went backwards: {last_done} -> {done}\n{s:#}");
        assert!(done <= total, "done_bytes > total_bytes\n{s:#}");
        if done > 0 && done < total {
            seen_partial = true;
            assert_eq!(s["resync"]["kind"], "full", "resync.kind of the initial sync\n{s:#}");
            assert!(
                s["resync"]["speed_bytes_per_sec"].as_u64().is_some_and(|v| v > 0),
                "resync.speed_bytes_per_sec once bytes were synced\n{s:#}"
            );
        }
        last_done = done;
        if seen_partial {
            break;
        }
        assert!(Instant::now() < deadline, "no sync progress within 30s\n{s:#}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(seen_partial, "the sync progress (0 < done_bytes < total_bytes) was never visible in beta's status");
    // Application writes go on during the sync.
    let pattern: Vec<u8> = (0..MIB as usize).map(|i| (i % 251) as u8).collect();
    pair.rt.block_on(async {
        let c = pair.alpha.nbd().await;
        for i in 0..8u64 {
            c.write(i * 16 * MIB, &pattern, false).await.expect("write during the initial sync");
        }
        c.flush().await.expect("flush during the initial sync");
    });

    let human = pair.alpha.repctl_ok(&["status"]);
    assert!(human.contains("beta"), "human status names the peer:\n{human}");
    assert!(human.contains("sync"), "human status shows the sync:\n{human}");

    pair.proxies().set_rate(None);
    pair.beta.wait_sync(60);
    pair.assert_established();
    std::thread::sleep(Duration::from_millis(300));
    let mut ev = events.take();
    let _ = ev.kill();
    let _ = ev.wait();
    check_events(&std::fs::read_to_string(&events_path).expect("events file"));

    let a = pair.alpha.status();
    let b = pair.beta.status();
    for s in [&a, &b] {
        assert_eq!(s["resource"], "r0", "{s:#}");
        assert_eq!(s["protocol"], "C", "{s:#}");
        assert_eq!(u(&s["out_of_sync_bytes"]), 0, "in sync: no out-of-sync bytes\n{s:#}");
    }
    assert_eq!(a["node"], "alpha");
    assert_eq!(b["node"], "beta");
    assert_eq!(b["nbd"]["serving"], false, "secondary beta serves no NBD\n{b:#}");

    // LSNs: writes then a FLUSH under C; once the FLUSH has completed the
    // peer has received, written and made durable everything.
    let before = u(&a["lsn"]["local"]);
    pair.rt.block_on(async {
        let c = pair.alpha.nbd().await;
        for i in 0..10u64 {
            c.write(i * 4096, &pattern[..4096], false).await.expect("write");
        }
        c.flush().await.expect("flush");
        c.disconnect().await.expect("disconnect");
    });
    let a = pair.alpha.status();
    let local = u(&a["lsn"]["local"]);
    assert!(local >= before + 10, "10 writes must advance lsn.local by at least 10: {before} -> {local}\n{a:#}");
    for f in ["peer_received", "peer_written", "peer_durable"] {
        assert!(
            u(&a["lsn"][f]) >= local,
            "after a completed FLUSH under C, lsn.{f} must reach lsn.local ({local})\n{a:#}"
        );
    }
    let b = pair.beta.wait_status("beta's lsn.local reaches alpha's", Duration::from_secs(10), |s| {
        s["lsn"]["local"].as_u64() == Some(local)
    });
    assert_eq!(b["disk"], "uptodate", "{b:#}");
    let human = pair.beta.repctl_ok(&["status"]);
    for word in ["r0", "secondary", "uptodate", "alpha", "primary", "established"] {
        assert!(human.contains(word), "beta's human status must show {word:?}:\n{human}");
    }
}

/// Every line of `repctl events` is a JSON object with an RFC 3339 `time`
/// and an `event` name; the stream covered the role change, the sync and
/// the peer's disk becoming uptodate.
fn check_events(text: &str) {
    let events: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("events line is not JSON ({e}): {l}")))
        .collect();
    assert!(!events.is_empty(), "repctl events printed nothing");
    for e in &events {
        let time = e["time"].as_str().unwrap_or_else(|| panic!("event without a time: {e}"));
        assert!(humantime::parse_rfc3339(time).is_ok(), "event time is not RFC 3339: {e}");
        assert!(e["event"].is_string(), "event without a name: {e}");
    }
    // The first line is the `state` snapshot the stream starts with.
    let mentions =
        |words: &[&str]| events.iter().skip(1).any(|e| words.iter().all(|w| e.to_string().to_lowercase().contains(w)));
    assert!(mentions(&["primary"]), "no event reports alpha becoming primary:\n{text}");
    assert!(mentions(&["sync"]), "no event reports the sync:\n{text}");
    assert!(mentions(&["uptodate"]), "no event reports the peer's disk becoming uptodate:\n{text}");
}

/// `promote` on beta is refused while alpha is its connected primary;
/// `demote` on alpha is refused while an NBD client is attached, `--force`
/// disconnects it; then beta may be promoted and serves NBD.
#[test]
fn role_rules() {
    let pair = Pair::up(PairOpts::new("C"));

    let msg = pair.beta.repctl_refused(&["promote"]);
    assert!(msg.to_lowercase().contains("primary"), "the refusal says the peer is primary: {msg}");
    let b = pair.beta.status();
    assert_eq!(b["role"], "secondary", "a refused promote changes nothing\n{b:#}");

    let mut client = common::RawNbdClient::connect(pair.alpha.nbd_port, "r0").expect("NBD client on alpha");
    pair.alpha.wait_status("one NBD client", Duration::from_secs(5), |s| s["nbd"]["clients"] == 1);
    let msg = pair.alpha.repctl_refused(&["demote"]);
    assert!(msg.to_lowercase().contains("client"), "the refusal names the attached clients: {msg}");
    let a = pair.alpha.status();
    assert_eq!(a["role"], "primary", "a refused demote changes nothing\n{a:#}");
    assert!(!client.closed_within(Duration::from_millis(200)), "a refused demote must not drop the client");

    pair.alpha.repctl_ok(&["demote", "--force"]);
    assert!(client.closed_within(Duration::from_secs(5)), "demote --force disconnects the NBD clients");
    let a = pair.alpha.wait_status("secondary", Duration::from_secs(5), |s| s["role"] == "secondary");
    assert_eq!(a["nbd"]["serving"], false, "{a:#}");

    // Now nobody is primary: beta may be promoted without --force.
    pair.beta.wait_status("peer alpha secondary", Duration::from_secs(10), |s| s["peer"]["role"] == "secondary");
    pair.beta.repctl_ok(&["promote"]);
    pair.alpha.wait_status("peer beta primary", Duration::from_secs(10), |s| s["peer"]["role"] == "primary");
    let ok = pair.rt.block_on(async {
        let c = pair.beta.nbd().await;
        c.write(0, &[7u8; 4096], true).await.is_ok()
            && c.read(0, 4096).await.map(|d| d.iter().all(|&x| x == 7)).unwrap_or(false)
    });
    assert!(ok, "beta, promoted, serves reads and writes");
    let msg = pair.alpha.repctl_refused(&["promote"]);
    assert!(msg.to_lowercase().contains("primary"), "alpha may not be promoted while beta is primary: {msg}");
}

/// Wait until both nodes, fresh and started, see each other.
fn wait_connected(p: &Peer) -> Value {
    p.wait_status("connected", Duration::from_secs(20), |s| s["connection"] == "connected")
}

/// `new-current-uuid --clear-bitmap` on two blank, connected nodes makes
/// both uptodate without a sync; it is refused once the volume has data.
#[test]
fn skip_initial_sync_on_blank_volumes() {
    let mut pair = Pair::new(PairOpts::new("C"));
    pair.start_both();
    for p in [&pair.alpha, &pair.beta] {
        let s = wait_connected(p);
        assert_eq!(s["disk"], "inconsistent", "fresh metadata: disk inconsistent\n{s:#}");
    }
    pair.alpha.repctl_ok(&["new-current-uuid", "--clear-bitmap"]);
    for p in [&pair.alpha, &pair.beta] {
        p.wait_status("uptodate without a sync", Duration::from_secs(10), |s| {
            s["disk"] == "uptodate" && s["peer"]["disk"] == "uptodate"
        });
    }
    pair.alpha.repctl_ok(&["promote"]);
    let b = pair.beta.wait_status("peer primary", Duration::from_secs(10), |s| s["peer"]["role"] == "primary");
    assert_ne!(b["replication"], "sync-target", "no sync after new-current-uuid --clear-bitmap\n{b:#}");
    pair.assert_established();
    let b = pair.beta.status();
    assert_eq!(b["resync"]["total_bytes"].as_u64().unwrap_or(0), 0, "no sync ran\n{b:#}");

    pair.rt.block_on(async {
        let c = pair.alpha.nbd().await;
        c.write(0, &[1u8; 4096], true).await.expect("write");
        c.disconnect().await.expect("disconnect");
    });
    let msg = pair.alpha.repctl_refused(&["new-current-uuid", "--clear-bitmap"]);
    assert!(!msg.trim().is_empty(), "the refusal says why");
}

/// `promote --force` while the link is still in its handshake (50 ms each
/// way on the link, so the handshake takes a few hundred ms): the promotion
/// must still reach the peer and the initial sync must run. Five rounds.
#[test]
fn promote_during_the_handshake_still_syncs() {
    for round in 0..5 {
        let mut pair = Pair::new(PairOpts::new("C").proxied());
        pair.proxies().set_delay_both(Duration::from_millis(50));
        pair.alpha.create_md();
        pair.beta.create_md();
        pair.beta.start();
        let accepted = pair.proxies().accepted();
        pair.alpha.start();
        // Alpha dials beta at once: promote while that handshake runs.
        let deadline = Instant::now() + Duration::from_secs(10);
        while pair.proxies().accepted() == accepted {
            assert!(Instant::now() < deadline, "round {round}: alpha did not dial beta within 10s");
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(round * 40));
        pair.alpha.repctl_ok(&["promote", "--force"]);
        // The race is over; a fast link keeps the sync short.
        pair.proxies().set_delay_both(Duration::ZERO);
        let out = pair.beta.repctl_timeout(&["wait-sync", "--timeout", "20"], Duration::from_secs(60));
        assert!(
            out.status.success(),
            "round {round}: promote during the handshake: beta never synced (wait-sync: {}){}\nalpha: {:#}\nbeta: {:#}",
            out.status,
            String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or(""),
            pair.alpha.status(),
            pair.beta.status()
        );
        pair.assert_established();
    }
}

/// `repctl disconnect` makes alpha standalone (the link drops, nobody
/// redials, writes go on alone); `repctl connect` brings the link back and
/// beta is resynced.
#[test]
fn disconnect_and_connect() {
    let pair = Pair::up(PairOpts::new("C"));
    pair.alpha.repctl_ok(&["disconnect"]);
    let a = pair.alpha.wait_status("standalone", Duration::from_secs(10), |s| s["connection"] == "standalone");
    assert!(a["replication"].is_null(), "no replication state when not connected\n{a:#}");
    pair.beta.wait_status("peer gone", Duration::from_secs(10), |s| s["connection"] != "connected");
    let data = vec![0x5au8; 65536];
    pair.rt.block_on(async {
        let c = pair.alpha.nbd().await;
        tokio::time::timeout(Duration::from_secs(10), async {
            c.write(0, &data, false).await.expect("write while standalone");
            c.flush().await.expect("flush while standalone");
        })
        .await
        .expect("writes go on while standalone");
        c.disconnect().await.expect("disconnect");
    });
    // Beta keeps dialing; standalone alpha must not take the link back.
    std::thread::sleep(Duration::from_secs(2));
    for p in [&pair.alpha, &pair.beta] {
        let s = p.status();
        assert_ne!(s["connection"], "connected", "{}: connected although alpha is standalone\n{s:#}", p.name);
    }
    assert_eq!(pair.alpha.status()["connection"], "standalone");
    pair.alpha.repctl_ok(&["connect"]);
    pair.beta.wait_sync(60);
    pair.assert_established();
    // What was written while standalone is on beta: swap roles and read.
    pair.alpha.wait_status("no NBD client", Duration::from_secs(10), |s| s["nbd"]["clients"] == 0);
    pair.alpha.repctl_ok(&["demote"]);
    pair.beta.wait_status("peer alpha secondary", Duration::from_secs(10), |s| s["peer"]["role"] == "secondary");
    pair.beta.repctl_ok(&["promote"]);
    let read = pair.rt.block_on(async { pair.beta.nbd().await.read(0, 65536).await.expect("read from beta") });
    assert!(read[..] == data[..], "beta must hold the data alpha wrote while standalone, after connect + resync");
}

/// Two primaries meeting is refused (split-brain handling is issue 4): both
/// go standalone, log it, and keep serving their own data.
#[test]
fn two_primaries_are_refused() {
    let pair = Pair::up(PairOpts::new("C"));
    pair.alpha.repctl_ok(&["disconnect"]);
    pair.beta.wait_status("peer gone", Duration::from_secs(10), |s| s["connection"] != "connected");
    pair.beta.repctl_ok(&["promote"]);
    pair.alpha.repctl_ok(&["connect"]);
    for p in [&pair.alpha, &pair.beta] {
        let s = p.wait_status("standalone after meeting another primary", Duration::from_secs(20), |s| {
            s["connection"] == "standalone"
        });
        assert_eq!(s["role"], "primary", "{}: keeps its role\n{s:#}", p.name);
        assert_eq!(s["nbd"]["serving"], true, "{}: keeps serving\n{s:#}", p.name);
    }
    // They stay apart.
    std::thread::sleep(Duration::from_secs(2));
    for p in [&pair.alpha, &pair.beta] {
        let s = p.status();
        assert_eq!(s["connection"], "standalone", "{}: two primaries must not reconnect on their own\n{s:#}", p.name);
        let logged = p
            .log_lines_lower()
            .iter()
            .any(|l| l.contains("split") || (l.contains("primar") && (l.contains("both") || l.contains("two"))));
        assert!(
            logged,
            "{}'s log does not say why it went standalone (two primaries / split brain):\n{}",
            p.name,
            p.log()
        );
    }
}
