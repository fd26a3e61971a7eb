//! `[handlers]` against real repd processes: a script records its calls
//! (name, environment, event); exit codes, timeouts and durations come back
//! in `handler-finished` events of `repctl events`.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::pair::{Pair, PairOpts};
use common::{NodeOpts, TestNode};
use serde_json::Value;

/// A handler script appending one line per call to DIR/calls-NODE.log and
/// exiting with its first argument.
fn recorder(dir: &Path) -> PathBuf {
    let path = dir.join("record.sh");
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\n\
             printf '%s node=%s peer=%s role=%s resource=%s event=%s\\n' \"$REPBLOCK_HANDLER\" \"$REPBLOCK_NODE\" \
             \"$REPBLOCK_PEER\" \"$REPBLOCK_ROLE\" \"$REPBLOCK_RESOURCE\" \"$REPBLOCK_EVENT\" >> {}/calls-$REPBLOCK_NODE.log\n\
             exit \"${{1:-0}}\"\n",
            dir.display()
        ),
    )
    .expect("write script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

/// Lines of DIR/calls-NODE.log once `pred` holds for them (30 s at most).
fn wait_calls(dir: &Path, node: &str, what: &str, pred: impl Fn(&[String]) -> bool) -> Vec<String> {
    let path = dir.join(format!("calls-{node}.log"));
    let start = Instant::now();
    loop {
        let lines: Vec<String> =
            std::fs::read_to_string(&path).unwrap_or_default().lines().map(str::to_string).collect();
        if pred(&lines) {
            return lines;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{node}: {what} not recorded within 30s: {lines:#?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn pair_handlers_run_with_the_event_in_their_environment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let script = recorder(dir.path());
    let s = script.display();
    let opts = PairOpts::new("C").extra(&format!(
        "[handlers]\ntimeout = \"10s\"\non_promote = [\"{s}\"]\nafter_resync_target = [\"{s}\"]\npeer_lost = [\"{s}\"]"
    ));
    let mut pair = Pair::up(opts);
    let alpha = wait_calls(dir.path(), "alpha", "on-promote", |l| !l.is_empty());
    assert!(alpha[0].starts_with("on-promote node=alpha peer=beta role=primary resource=r0 event={"), "{alpha:#?}");
    assert!(alpha[0].contains("\"event\":\"role-changed\""), "{alpha:#?}");
    let beta = wait_calls(dir.path(), "beta", "after-resync-target", |l| !l.is_empty());
    assert!(beta[0].starts_with("after-resync-target node=beta peer=alpha role=secondary resource=r0"), "{beta:#?}");
    assert!(beta[0].contains("\"event\":\"sync-finished\"") && beta[0].contains("\"role\":\"target\""), "{beta:#?}");

    pair.beta.kill9();
    let alpha = wait_calls(dir.path(), "alpha", "peer-lost", |l| l.iter().any(|x| x.starts_with("peer-lost ")));
    let lost = alpha.iter().find(|x| x.starts_with("peer-lost ")).expect("peer-lost");
    assert!(lost.contains("node=alpha peer=beta role=primary"), "{lost}");
    // No handler ran that the config does not name (alpha is the source).
    assert!(!alpha.iter().any(|x| x.starts_with("after-resync-target")), "{alpha:#?}");
}

#[test]
fn exit_codes_and_timeouts_are_reported_in_events() {
    let dir = tempfile::tempdir().expect("tempdir");
    let script = recorder(dir.path());
    let mut opts = NodeOpts::new("sync");
    opts.extra = format!(
        "[handlers]\ntimeout = \"500ms\"\non_promote = [\"sleep\", \"10\"]\non_demote = [\"{}\", \"3\"]",
        script.display()
    );
    let mut node = TestNode::with(opts);
    node.create_md();
    node.start();
    let (_events, rx) = common::spawn_events(&node.config, "alpha", &[]);
    let next_finished = |what: &str| -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx.recv_timeout(left).unwrap_or_else(|_| panic!("no handler-finished for {what} within 30s"));
            let v: Value = serde_json::from_str(&line).expect("event JSON");
            if v["event"] == "handler-finished" {
                return v;
            }
        }
    };
    // The state event first: the stream is attached before the promote.
    let first: Value = serde_json::from_str(&rx.recv_timeout(Duration::from_secs(30)).expect("state")).expect("json");
    assert_eq!(first["event"], "state");

    let t = Instant::now();
    node.promote_force();
    let v = next_finished("on-promote");
    assert_eq!(v["handler"], "on-promote", "{v}");
    assert_eq!(v["timed_out"], true, "{v}");
    assert_eq!(v["exit_code"], Value::Null, "{v}");
    let ms = v["duration_ms"].as_u64().expect("duration");
    eprintln!("a sleep 10 handler was killed after {ms} ms (timeout 500 ms)");
    assert!((500..5000).contains(&ms), "killed after {ms} ms with a 500 ms timeout");
    // The promote did not wait for the handler.
    assert!(t.elapsed() < Duration::from_secs(9), "promote + handler took {:?}", t.elapsed());

    node.demote();
    let v = next_finished("on-demote");
    assert_eq!(v["handler"], "on-demote", "{v}");
    assert_eq!(v["exit_code"], 3, "{v}");
    assert_eq!(v["timed_out"], false, "{v}");
    let recorded = wait_calls(dir.path(), "alpha", "on-demote", |l| !l.is_empty()).join("\n");
    assert!(recorded.starts_with("on-demote node=alpha peer= role=secondary resource=r0"), "{recorded}");

    // A clean stop does not wait for anything.
    let code = node.term();
    assert!(code.success());
}

/// A handler script for the blocking handlers: appends one line per call
/// (handler, environment) to DIR/calls-NODE.log, sleeps the seconds in
/// DIR/sleep (if any) and exits with the code in DIR/exit (0 if none). The
/// test changes its behaviour between calls by rewriting those files.
fn controlled(dir: &Path) -> PathBuf {
    let path = dir.join("controlled.sh");
    let d = dir.display();
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\n\
             printf '%s node=%s peer=%s role=%s resource=%s term=%s kind=%s bytes=%s event=%s\\n' \"$REPBLOCK_HANDLER\" \
             \"$REPBLOCK_NODE\" \"$REPBLOCK_PEER\" \"$REPBLOCK_ROLE\" \"$REPBLOCK_RESOURCE\" \"$REPBLOCK_TERM\" \
             \"$REPBLOCK_RESYNC_KIND\" \"$REPBLOCK_RESYNC_BYTES\" \"$REPBLOCK_EVENT\" >> {d}/calls-$REPBLOCK_NODE.log\n\
             [ -f {d}/sleep ] && sleep \"$(cat {d}/sleep)\"\n\
             [ -f {d}/exit ] && exit \"$(cat {d}/exit)\"\n\
             exit 0\n"
        ),
    )
    .expect("write script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

fn set(dir: &Path, file: &str, value: &str) {
    std::fs::write(dir.join(file), value).expect("write control file");
}

fn lines_of(dir: &Path, node: &str) -> Vec<String> {
    std::fs::read_to_string(dir.join(format!("calls-{node}.log")))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Position of the first event named `name` matching `pred` in `events`.
fn position(events: &[Value], name: &str, pred: impl Fn(&Value) -> bool) -> usize {
    events
        .iter()
        .position(|e| e["event"] == name && pred(e))
        .unwrap_or_else(|| panic!("no {name} event: {}", events.iter().map(|e| format!("{e}\n")).collect::<String>()))
}

#[test]
fn before_resync_target_holds_the_resync_and_its_failure_leaves_the_target_standalone() {
    use common::resync::EventLog;
    let dir = tempfile::tempdir().expect("tempdir");
    let script = controlled(dir.path());
    set(dir.path(), "sleep", "1");
    let opts = PairOpts::new("C")
        .size("64MiB")
        .extra(&format!("[handlers]\ntimeout = \"3s\"\nbefore_resync_target = [\"{}\"]", script.display()));
    let mut pair = common::pair::Pair::new(opts);
    pair.start_both();
    for p in [&pair.alpha, &pair.beta] {
        p.wait_status("connected", Duration::from_secs(20), |s| s["connection"] == "connected");
    }
    let events = EventLog::start(&pair.beta);
    // The initial full sync: beta's handler runs first, the resync waits.
    pair.alpha.repctl_ok(&["promote", "--force"]);
    pair.beta.wait_sync(60);
    let all = events.all();
    let called = position(&all, "handler-called", |e| e["handler"] == "before-resync-target");
    let finished = position(&all, "handler-finished", |e| e["handler"] == "before-resync-target");
    let started = position(&all, "sync-started", |e| e["role"] == "target");
    assert!(called < finished && finished < started, "handler before the resync: {}", events.dump());
    assert_eq!(all[finished]["exit_code"], 0, "{}", all[finished]);
    assert_eq!(all[started]["kind"], "full", "{}", all[started]);
    let waited = all[finished]["duration_ms"].as_u64().expect("duration");
    eprintln!("the full sync waited {waited} ms for a before-resync-target sleeping 1 s");
    assert!(waited >= 1000, "the resync started before the handler returned ({waited} ms)");
    let calls = lines_of(dir.path(), "beta");
    assert_eq!(calls.len(), 1, "{calls:#?}");
    assert_eq!(
        calls[0],
        "before-resync-target node=beta peer=alpha role=secondary resource=r0 term= kind=full bytes=67108864 event=",
        "{calls:#?}"
    );
    assert!(lines_of(dir.path(), "alpha").is_empty(), "the source runs no before-resync-target");

    // A short outage: a log catch-up keeps beta consistent and does not
    // call the handler; if the WAL could not serve it (a bitmap resync),
    // the handler runs once more.
    pair.beta.kill9();
    pair.rt.block_on(async {
        let c = pair.alpha.nbd().await;
        c.write(4 << 20, &vec![0x5A; 1 << 20], false).await.expect("write");
        c.flush().await.expect("flush");
        c.disconnect().await.expect("disconnect");
    });
    set(dir.path(), "sleep", "0");
    pair.beta.start();
    pair.beta.wait_sync(60);
    let b = pair.beta.wait_status("the resync recorded", Duration::from_secs(10), |s| s["last_sync"].is_object());
    let kind = b["last_sync"]["kind"].as_str().expect("kind").to_string();
    let expected = if kind == "log" { 1 } else { 2 };
    eprintln!("after the outage: a {kind} resync, {expected} before-resync-target call(s)");
    assert_eq!(lines_of(dir.path(), "beta").len(), expected, "{kind} resync: {:#?}", lines_of(dir.path(), "beta"));
    let events = EventLog::start(&pair.beta);

    // A failing handler: verify finds a corrupted block, the bitmap resync
    // that would repair it asks the handler, which exits 3.
    set(dir.path(), "exit", "3");
    let corrupt = |pair: &common::pair::Pair, off: u64| {
        use std::io::{Seek, SeekFrom, Write};
        let data = pair.beta.data_dir().join("data");
        let mut f = std::fs::OpenOptions::new().write(true).open(&data).expect("open beta's data file");
        f.seek(SeekFrom::Start(off)).expect("seek");
        f.write_all(&[0xA5; 4096]).expect("corrupt");
        f.sync_all().expect("sync");
    };
    corrupt(&pair, 8 << 20);
    let found = pair.verify_wait("alpha");
    assert_eq!(found["out_of_sync_bytes"], 4096, "{found}");
    let b = pair.beta.wait_status("standalone", Duration::from_secs(30), |s| s["connection"] == "standalone");
    let why = b["link_error"].as_str().unwrap_or_default().to_string();
    eprintln!("beta's status after the refusal: {why}");
    assert!(why.contains("before-resync-target handler failed (exit code 3)"), "{b:#}");
    assert!(why.contains("bitmap resync from alpha did not start"), "{b:#}");
    assert_eq!(b["disk"], "uptodate", "nothing was written to beta: {b:#}");
    let refused = events.wait_for("sync-refused", Duration::from_secs(10), |_| true);
    assert_eq!(refused["handler"], "before-resync-target", "{refused}");
    assert_eq!(refused["reason"], "exit code 3", "{refused}");
    assert_eq!(refused["kind"], "bitmap", "{refused}");
    let done = events.wait_for("handler-finished", Duration::from_secs(10), |e| e["exit_code"] == 3);
    assert_eq!(done["handler"], "before-resync-target", "{done}");
    assert!(events.named("sync-started").is_empty(), "no resync started: {}", events.dump());
    assert!(pair.beta.log().contains("before-resync-target handler failed (exit code 3)"), "{}", pair.beta.log());
    // Standalone: beta does not come back on its own.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(pair.beta.status()["connection"], "standalone");
    assert_eq!(pair.alpha.status()["connection"], "connecting");

    // A handler that hangs is killed at the timeout, with the same effect.
    std::fs::remove_file(dir.path().join("exit")).expect("rm exit");
    set(dir.path(), "sleep", "30");
    let t = Instant::now();
    pair.beta.repctl_ok(&["connect"]);
    let b = pair.beta.wait_status("standalone again", Duration::from_secs(30), |s| {
        s["connection"] == "standalone" && s["link_error"].as_str().is_some_and(|e| e.contains("timeout"))
    });
    eprintln!("a hanging handler refused the resync after {:?}: {}", t.elapsed(), b["link_error"]);
    assert!(b["link_error"].as_str().unwrap_or_default().contains("killed after the timeout of 3s"), "{b:#}");
    assert!(t.elapsed() >= Duration::from_secs(3), "{:?}", t.elapsed());

    // The operator fixes the handler and connects: the resync runs.
    set(dir.path(), "sleep", "0");
    let before = lines_of(dir.path(), "beta").len();
    pair.beta.repctl_ok(&["connect"]);
    pair.beta.wait_sync(60);
    pair.assert_established();
    assert_eq!(lines_of(dir.path(), "beta").len(), before + 1, "{:#?}", lines_of(dir.path(), "beta"));
    let last = lines_of(dir.path(), "beta").pop().expect("call");
    assert!(last.contains("kind=bitmap bytes=4096"), "{last}");
    common::resync::assert_verify_clean(&pair.alpha, "after the repaired resync");
}

#[test]
fn fence_peer_decides_whether_suspended_writes_resume() {
    use common::resync::EventLog;
    let dir = tempfile::tempdir().expect("tempdir");
    let script = controlled(dir.path());
    let opts = PairOpts::new("C").size("64MiB").extra(&format!(
        "on_peer_loss = \"suspend\"\n[handlers]\ntimeout = \"10s\"\nfence_peer = [\"{}\"]",
        script.display()
    ));
    let mut pair = Pair::up(opts);
    let events = EventLog::start(&pair.alpha);
    let client = std::sync::Arc::new(pair.rt.block_on(pair.alpha.nbd()));
    // A FUA write in a task of its own (a write left waiting is never
    // abandoned: the client keeps its reply).
    let write = |pair: &Pair, off: u64| {
        let c = std::sync::Arc::clone(&client);
        pair.rt.spawn(async move { c.write(off, &[0x77; 4096], true).await })
    };
    let done_within =
        |pair: &Pair, w: tokio::task::JoinHandle<Result<(), repblock::nbd::client::ClientError>>, d: Duration| {
            pair.rt.block_on(async { tokio::time::timeout(d, w).await }).map(|r| r.expect("task").expect("write"))
        };
    done_within(&pair, write(&pair, 0), Duration::from_secs(10)).expect("a write with the peer connected");

    // Round 1: the handler says the peer is primary (6): writes stay
    // suspended.
    set(dir.path(), "exit", "6");
    pair.beta.kill9();
    let fencing = events.wait_for("peer-fencing", Duration::from_secs(30), |_| true);
    assert_eq!(fencing["exit_code"], 6, "{fencing}");
    assert_eq!(fencing["fenced"], false, "{fencing}");
    assert_eq!(fencing["io_resumed"], false, "{fencing}");
    assert_eq!(fencing["meaning"], "peer is primary", "{fencing}");
    assert_eq!(pair.alpha.status()["io_suspended"], true);
    let blocked = write(&pair, 4096);
    std::thread::sleep(Duration::from_secs(2));
    assert!(!blocked.is_finished(), "a write went through a refused fence");
    let calls = lines_of(dir.path(), "alpha");
    assert_eq!(calls.len(), 1, "{calls:#?}");
    assert!(calls[0].starts_with("fence-peer node=alpha peer=beta role=primary resource=r0 term="), "{calls:#?}");
    assert!(calls[0].contains("\"event\":\"io-suspended\""), "{calls:#?}");
    assert!(pair.alpha.log().contains("fence-peer: peer is primary: writes stay suspended"), "{}", pair.alpha.log());
    // The peer comes back: the resync releases the writes (the blocked one
    // included).
    pair.beta.start();
    pair.beta.wait_sync(60);
    done_within(&pair, blocked, Duration::from_secs(20)).expect("the blocked write completes once the peer is back");
    done_within(&pair, write(&pair, 8192), Duration::from_secs(10)).expect("writes after the peer is back");

    // Round 2: the handler outdated the peer (4): writes resume alone.
    set(dir.path(), "exit", "4");
    let t = Instant::now();
    pair.beta.kill9();
    let fencing = events.wait_for("peer-fencing", Duration::from_secs(30), |e| e["exit_code"] == 4);
    eprintln!("peer killed -> fence-peer exit 4 -> writes resumed after {:?}", t.elapsed());
    assert_eq!(fencing["fenced"], true, "{fencing}");
    assert_eq!(fencing["io_resumed"], true, "{fencing}");
    assert_eq!(fencing["meaning"], "peer outdated", "{fencing}");
    assert_eq!(pair.alpha.status()["io_suspended"], false);
    done_within(&pair, write(&pair, 12288), Duration::from_secs(10)).expect("writes resume after a fenced peer");
    events.wait_for("io-resumed", Duration::from_secs(5), |_| true);
    assert_eq!(lines_of(dir.path(), "alpha").len(), 2);
    pair.rt.block_on(async { client.flush().await.expect("flush") });

    // Beta returns and is resynced; both copies are equal.
    pair.beta.start();
    pair.beta.wait_sync(60);
    common::resync::assert_verify_clean(&pair.alpha, "after fencing");
}
