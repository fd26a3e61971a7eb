//! The witness daemon of automatic failover (issue 10, stage B): a real
//! `repd --node gamma` process, `repctl` against it, and a test client
//! speaking the version-3 witness link over loopback
//! (`repblock::node::witness::client`, what a data node's failover task
//! uses).
//!
//! - create-md, status (JSON and human), events, data-node commands refused;
//! - claim / solo / peer-uptodate / release over the wire, each answer
//!   checked against the vote rules and against the state file on disk;
//! - SIGKILL and restart keep the term, and the startup holdoff refuses
//!   claims for `wait`;
//! - amnesia (missing file, both slots corrupt): no vote until
//!   `create-md --force --term T --primary NODE`;
//! - bad configs refused by repd and repctl, naming the field.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::witness::{Witness, config_text};
use common::{REPCTL, REPD};
use repblock::failover::RefuseReason;
use repblock::node::witness::client::Answer;
use repblock::repl::proto::{Message, WitnessView};
use serde_json::Value;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
}

fn refused(a: Answer) -> RefuseReason {
    match a {
        Answer::Refused { reason, .. } => reason,
        Answer::Granted(v) => panic!("expected a refusal, got a grant {v:?}"),
    }
}

fn granted(a: Answer) -> WitnessView {
    match a {
        Answer::Granted(v) => v,
        Answer::Refused { reason, view } => panic!("expected a grant, got {reason} ({view:?})"),
    }
}

/// The record on disk (after the answer: persisted before it).
fn on_disk(w: &Witness) -> (u64, Option<u8>, u8) {
    let cfg = w.cfg();
    let r = repblock::node::witness::read_record(cfg.witness.as_ref().expect("witness"))
        .expect("read the state file")
        .expect("a record");
    (r.term.0, r.primary.map(|p| p.0), r.uptodate.0)
}

const ALPHA: u8 = 0;
const BETA: u8 = 1;

#[test]
fn witness_create_md_status_votes_over_the_wire_and_restart() {
    let mut w = Witness::new();
    let out = w.repctl_ok(&["create-md"]);
    assert!(out.contains("gamma: witness state created") && out.contains("term 0, primary none"), "{out}");
    // A second create-md would throw the record away: refused without --force.
    let again = w.repctl(&["create-md"]);
    assert_eq!(again.status.code(), Some(1));
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("exists (use --force"), "{err}");

    w.start();
    let (mut events, rx) = common::spawn_events(&w.config, "gamma", &[]);
    let s = w.status();
    assert_eq!(s["role"], "witness", "{s:#}");
    assert_eq!((s["term"].clone(), s["primary"].clone(), s["voting"].clone()), (0.into(), Value::Null, true.into()));
    assert_eq!(s["connected"], serde_json::json!([]));
    let holdoff = s["holdoff_remaining_ms"].as_u64().expect("holdoff");
    println!("startup holdoff left at the first status: {holdoff} ms (wait ≈ 3080 ms)");
    let human = w.repctl_ok(&["status"]);
    assert!(human.starts_with("gamma: role:witness term:0 primary:none uptodate:none"), "{human}");
    assert!(human.contains("voting: yes"), "{human}");

    // Data-node commands are refused, naming the data nodes.
    let p = w.repctl(&["promote"]);
    assert_eq!(p.status.code(), Some(1));
    let err = String::from_utf8_lossy(&p.stderr);
    assert!(err.contains("gamma is the witness") && err.contains("(alpha, beta)"), "{err}");

    let rt = rt();
    let mut alpha = w.client(&rt, "alpha");
    assert_eq!(alpha.node(), ALPHA);
    // Within the startup holdoff even a forced claim is refused.
    if holdoff > 1000 {
        assert_eq!(refused(rt.block_on(alpha.claim(0, true)).unwrap()), RefuseReason::StartupHoldoff);
    }
    w.wait_holdoff_over();
    let s = w.status();
    assert_eq!(s["connected"][0]["node"], "alpha", "{s:#}");

    // Bootstrap: nobody is up to date, so only a forced claim gets term 1.
    assert_eq!(refused(rt.block_on(alpha.claim(0, false)).unwrap()), RefuseReason::NotEligible);
    let v = granted(rt.block_on(alpha.claim(0, true)).unwrap());
    assert_eq!((v.term, v.primary, v.uptodate), (1, Some(ALPHA), 0b01));
    assert_eq!(on_disk(&w), (1, Some(ALPHA), 0b01));
    // A retried claim whose grant was lost is answered again, unchanged.
    assert_eq!(granted(rt.block_on(alpha.claim(0, true)).unwrap()), v);

    // The primary's ping is renewed; the view comes with it.
    let pong = rt.block_on(alpha.ping(1, 12345)).unwrap();
    assert!(pong.primary_ok && pong.term == 1 && pong.echo_sent_ns == 12345, "{pong:?}");
    assert_eq!(pong.view, Some((Some(ALPHA), 0b01)));

    let mut beta = w.client(&rt, "beta");
    let pong = rt.block_on(beta.ping(1, 1)).unwrap();
    assert!(!pong.primary_ok, "only the primary's lease is renewed: {pong:?}");
    assert_eq!(refused(rt.block_on(beta.claim(1, false)).unwrap()), RefuseReason::NotEligible);
    // Only the primary reports its peer up to date.
    assert_eq!(refused(rt.block_on(beta.peer_uptodate(1, BETA)).unwrap()), RefuseReason::NotEligible);
    let v = granted(rt.block_on(alpha.peer_uptodate(1, BETA)).unwrap());
    assert_eq!((v.term, v.uptodate), (1, 0b11));
    assert_eq!(on_disk(&w), (1, Some(ALPHA), 0b11));
    // Beta is eligible now, but alpha's lease was renewed within wait.
    rt.block_on(alpha.ping(1, 2)).unwrap();
    assert_eq!(refused(rt.block_on(beta.claim(1, false)).unwrap()), RefuseReason::PrimaryAlive);
    // Alpha loses its peer and goes on alone: term 2, beta outdated.
    let v = granted(rt.block_on(alpha.solo(1)).unwrap());
    assert_eq!((v.term, v.primary, v.uptodate), (2, Some(ALPHA), 0b01));
    assert_eq!(on_disk(&w), (2, Some(ALPHA), 0b01));
    assert_eq!(refused(rt.block_on(beta.claim(1, false)).unwrap()), RefuseReason::AlreadyGranted);
    assert_eq!(refused(rt.block_on(beta.claim(2, false)).unwrap()), RefuseReason::NotEligible);
    assert_eq!(refused(rt.block_on(beta.claim(5, false)).unwrap()), RefuseReason::WitnessBehind);
    // A planned switchover: alpha releases, keeps the term, nobody primary.
    let v = granted(rt.block_on(alpha.release(2)).unwrap());
    assert_eq!((v.term, v.primary), (2, None));
    assert_eq!(on_disk(&w), (2, None, 0b01));
    // The only up-to-date node claims at once (no lease to wait out).
    let v = granted(rt.block_on(alpha.claim(2, false)).unwrap());
    assert_eq!((v.term, v.primary, v.uptodate), (3, Some(ALPHA), 0b01));

    // A request in another node's name closes the link with a reason.
    rt.block_on(beta.send_raw(&Message::Solo { term: 3, node: ALPHA })).unwrap();
    let e = rt.block_on(beta.recv_raw()).unwrap_err().to_string();
    assert!(e.contains("names another node index"), "{e}");

    let s = w.status();
    assert_eq!((s["term"].clone(), s["primary"].clone()), (3.into(), "alpha".into()), "{s:#}");
    assert_eq!(s["uptodate"], serde_json::json!(["alpha"]));
    assert!(s["lease_renewals"].as_u64().unwrap() >= 2, "{s:#}");
    assert_eq!(s["granted"], 6, "{s:#}");
    assert!(s["refused"].as_u64().unwrap() >= 7, "{s:#}");

    // The events stream: the state first, then connections, votes and
    // term changes in order.
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let Ok(l) = rx.recv_timeout(Duration::from_millis(200)) else { continue };
        let v: Value = serde_json::from_str(&l).expect("event JSON");
        let done = v["event"] == "term-changed" && v["term"] == 3;
        lines.push(v);
        if done {
            break;
        }
    }
    drop(events.take());
    let names: Vec<&str> = lines.iter().map(|v| v["event"].as_str().unwrap_or("?")).collect();
    assert_eq!(names.first(), Some(&"witness-state"), "{names:?}");
    assert!(names.contains(&"node-connected"), "{names:?}");
    let grants: Vec<&Value> = lines.iter().filter(|v| v["event"] == "vote" && v["granted"] == true).collect();
    assert_eq!(grants.len(), 5, "five grants before term 3's change: {lines:#?}");
    assert_eq!(grants[0]["request"], "claim");
    let changes: Vec<u64> =
        lines.iter().filter(|v| v["event"] == "term-changed").map(|v| v["term"].as_u64().unwrap()).collect();
    assert_eq!(changes, [1, 1, 2, 2, 3], "{lines:#?}");

    // SIGKILL and restart: the term survives, and for `wait` after the
    // start no claim is granted (it does not know whom it renewed).
    w.kill9();
    w.start();
    let s = w.status();
    assert_eq!((s["term"].clone(), s["primary"].clone()), (3.into(), "alpha".into()), "{s:#}");
    let holdoff = s["holdoff_remaining_ms"].as_u64().unwrap();
    println!("after the restart: term 3 kept, holdoff left {holdoff} ms");
    let mut alpha = w.client(&rt, "alpha");
    if holdoff > 1000 {
        assert_eq!(refused(rt.block_on(alpha.claim(3, false)).unwrap()), RefuseReason::StartupHoldoff);
    }
    w.wait_holdoff_over();
    let v = granted(rt.block_on(alpha.claim(3, false)).unwrap());
    assert_eq!(v.term, 4, "the witness's last primary claims after a restart");
}

#[test]
fn witness_amnesia_refuses_until_reinitialised() {
    let mut w = Witness::new();
    // No create-md: the file is missing.
    w.start();
    let s = w.status();
    assert_eq!((s["voting"].clone(), s["term"].clone()), (false.into(), 0.into()), "{s:#}");
    let problem = s["state_file"]["problem"].as_str().unwrap_or_default();
    assert!(problem.contains("witness.state: missing"), "{s:#}");
    let hint = s["state_file"]["hint"].as_str().unwrap_or_default();
    assert!(hint.contains("create-md --force --term T --primary NODE"), "{s:#}");
    let human = w.repctl_ok(&["status"]);
    assert!(human.contains("voting: NO: ") && human.contains("create-md --force --term"), "{human}");

    let rt = rt();
    let mut alpha = w.client(&rt, "alpha");
    std::thread::sleep(Duration::from_millis(3200));
    // Even after the holdoff, even forced: no state, no vote.
    match rt.block_on(alpha.claim(0, true)).unwrap() {
        Answer::Refused { reason, view } => {
            assert_eq!(reason, RefuseReason::NoState);
            assert_eq!(view, None, "no record to show");
        }
        a => panic!("a witness without state granted {a:?}"),
    }
    let pong = rt.block_on(alpha.ping(4, 1)).unwrap();
    assert!(!pong.primary_ok && pong.view.is_none() && pong.term == 0, "{pong:?}");
    drop(alpha);

    // Re-initialised from the data nodes' status: term 7, alpha serving.
    w.kill9();
    let out = w.repctl_ok(&["create-md", "--force", "--term", "7", "--primary", "alpha"]);
    assert!(out.contains("term 7, primary alpha"), "{out}");
    let bad = w.repctl(&["create-md", "--force", "--term", "7", "--primary", "gamma"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not a data node"), "{bad:?}");
    w.start();
    let s = w.status();
    assert_eq!((s["voting"].clone(), s["term"].clone(), s["primary"].clone()), (true.into(), 7.into(), "alpha".into()));
    assert_eq!(s["uptodate"], serde_json::json!(["alpha"]));
    w.wait_holdoff_over();
    let mut beta = w.client(&rt, "beta");
    assert_eq!(refused(rt.block_on(beta.claim(7, false)).unwrap()), RefuseReason::NotEligible);
    let mut alpha = w.client(&rt, "alpha");
    assert_eq!(granted(rt.block_on(alpha.claim(7, false)).unwrap()).term, 8);

    // Both slots corrupt: amnesia again, saying why.
    w.kill9();
    std::fs::write(w.state_file(), vec![0x5a; 8192]).expect("corrupt");
    w.start();
    let s = w.status();
    assert_eq!(s["voting"], false, "{s:#}");
    let problem = s["state_file"]["problem"].as_str().unwrap_or_default();
    assert!(problem.contains("no valid slot") && problem.contains("bad magic"), "{s:#}");
}

#[test]
fn bad_failover_configs_are_refused_by_repd_and_repctl() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ports = common::free_ports::<3>();
    let cases = [
        (
            config_text(dir.path(), "mode = \"witness\"", "A", "", ports),
            "protocol: automatic failover needs protocol \"C\"",
        ),
        (
            config_text(dir.path(), "mode = \"witness\"", "C", "nbd = \"127.0.0.1:1\"\n", ports),
            "node[2].nbd: a witness node (witness = true) has no volume",
        ),
        (
            config_text(dir.path(), "mode = \"witness\"\nlease = \"100ms\"", "C", "", ports),
            "failover.lease: must be at least 4 x heartbeat",
        ),
        (
            config_text(dir.path(), "mode = \"quorum\"", "C", "", ports),
            "failover.mode: expected \"off\" or \"witness\"",
        ),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad{i}.toml"));
        std::fs::write(&path, text).expect("write");
        for (bin, args) in [(REPD, vec!["--node", "gamma"]), (REPCTL, vec!["--node", "gamma", "create-md"])] {
            let mut cmd = Command::new(bin);
            cmd.arg("--config").arg(&path).args(&args);
            let out = common::run_timeout(&mut cmd, Duration::from_secs(20));
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{bin} accepted {path:?}");
            assert!(err.contains(want), "{bin}: want {want:?} in:\n{err}");
        }
    }
    assert!(!dir.path().join("gamma").exists(), "nothing was created from a refused config");
}

/// Under a `Type=notify` unit with `WatchdogSec=` (contrib/systemd) the
/// witness says READY=1 once its control socket answers, keeps a STATUS=
/// line, pings the watchdog, and says STOPPING=1 on SIGTERM.
#[test]
fn witness_notifies_systemd() {
    use std::os::unix::net::UnixDatagram;
    let mut w = Witness::new();
    w.repctl_ok(&["create-md"]);
    let path = w.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).expect("bind NOTIFY_SOCKET");
    sock.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
    let notify = path.display().to_string();
    w.start_env(&[("NOTIFY_SOCKET", notify.as_str()), ("WATCHDOG_USEC", "200000")]);
    let mut got = Vec::new();
    let mut buf = vec![0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    let ready = got.iter().find(|m| m.lines().any(|l| l == "READY=1")).unwrap_or_else(|| panic!("{got:?}"));
    assert!(ready.contains("STATUS=role:witness term:0 primary:none voting:yes connected:none"), "{ready}");
    let pings = got.iter().filter(|m| m.lines().any(|l| l == "WATCHDOG=1")).count();
    println!("{pings} watchdog pings in about 3 s (WATCHDOG_USEC=200000)");
    assert!(pings >= 4, "{got:?}");
    assert!(w.term().success(), "clean stop:\n{}", w.log());
    let mut stopping = false;
    while let Ok(n) = sock.recv(&mut buf) {
        stopping |= String::from_utf8_lossy(&buf[..n]).lines().any(|l| l == "STOPPING=1");
    }
    assert!(stopping, "no STOPPING=1:\n{}", w.log());
}
