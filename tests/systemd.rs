//! systemd integration against a real repd: the notifications it sends to a
//! `NOTIFY_SOCKET` this test binds (READY=1 only once the control socket
//! answers, STATUS= lines following the state, WATCHDOG=1 pings,
//! STOPPING=1), journald-friendly logs, and `systemd-analyze verify` of
//! contrib/systemd/repd@.service (works without systemd as PID 1).

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{NodeOpts, TestNode, require_tool, run_timeout};
use repblock::control::{ControlClient, Request};

/// Datagrams received within `wait`, or until `until` matches one.
fn receive(sock: &UnixDatagram, wait: Duration, until: impl Fn(&str) -> bool) -> Vec<String> {
    let deadline = Instant::now() + wait;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 4096];
    while let Some(left) = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) {
        sock.set_read_timeout(Some(left)).expect("timeout");
        match sock.recv(&mut buf) {
            Ok(n) => {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                let done = until(&msg);
                got.push(msg);
                if done {
                    break;
                }
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => break,
            Err(e) => panic!("recv on NOTIFY_SOCKET: {e}"),
        }
    }
    got
}

#[test]
fn repd_notifies_ready_status_watchdog_and_stopping() {
    let mut opts = NodeOpts::new("sync");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).expect("bind NOTIFY_SOCKET");
    opts.env.push(("NOTIFY_SOCKET".into(), path.display().to_string()));
    opts.env.push(("WATCHDOG_USEC".into(), "200000".into()));
    // As journald runs it: no timestamps, no colours.
    opts.env.push(("JOURNAL_STREAM".into(), "8:12345".into()));
    opts.env.push(("REPBLOCK_LOG_TIMESTAMPS".into(), "0".into()));
    let mut node = TestNode::with(opts);
    node.create_md();
    node.spawn();

    // READY=1 comes once the control socket answers: asked right after
    // the datagram, status must succeed at the first try.
    let start = Instant::now();
    let first = receive(&sock, Duration::from_secs(60), |m| m.contains("READY=1"));
    let ready = first.last().unwrap_or_else(|| panic!("no notification within 60s:\n{}", node.log()));
    assert!(ready.lines().any(|l| l == "READY=1"), "{first:?}\n{}", node.log());
    let status = ControlClient::connect(&node.control(), "alpha", Duration::from_secs(5))
        .and_then(|mut c| c.request(&Request::Status))
        .unwrap_or_else(|e| panic!("control socket not answering at READY=1: {e}"));
    eprintln!("READY=1 {:?} after spawn", start.elapsed());
    assert!(ready.lines().any(|l| l == "STATUS=role:secondary disk:inconsistent"), "{ready:?}");
    assert_eq!(status["role"], "secondary");

    // The status line follows the state.
    node.promote_force();
    let got = receive(&sock, Duration::from_secs(30), |m| m.contains("STATUS=role:primary disk:uptodate"));
    assert!(got.iter().any(|m| m.contains("STATUS=role:primary disk:uptodate")), "{got:?}");

    // Watchdog pings at half of WATCHDOG_USEC (100 ms): many in 2 s.
    let got = receive(&sock, Duration::from_secs(2), |_| false);
    let pings = got.iter().filter(|m| m.lines().any(|l| l == "WATCHDOG=1")).count();
    eprintln!("{pings} watchdog pings in 2 s (WATCHDOG_USEC=200000)");
    assert!(pings >= 4, "{pings} WATCHDOG=1 in 2 s: {got:?}");

    // SIGTERM: STOPPING=1, then a clean exit.
    let child = node.child.take().expect("running");
    let code = common::term_child(child, "repd", String::new);
    assert!(code.success(), "repd exit {code}:\n{}", node.log());
    let got = receive(&sock, Duration::from_secs(5), |m| m.contains("STOPPING=1"));
    assert!(got.iter().any(|m| m.lines().any(|l| l == "STOPPING=1")), "{got:?}");

    // Journald-friendly: no ANSI escapes, lines start with the level.
    let log = node.log();
    assert!(!log.contains('\x1b'), "colours in the log:\n{log}");
    let first_line = log.lines().next().expect("a log line");
    assert!(first_line.trim_start().starts_with("INFO"), "timestamp or other prefix: {first_line:?}");
}

#[test]
fn without_notify_socket_repd_runs_as_before() {
    // No NOTIFY_SOCKET: nothing is sent, nothing fails; a file gets plain lines.
    let mut node = TestNode::with(NodeOpts::new("sync"));
    node.create_md();
    node.start();
    node.promote_force();
    let status = node.status();
    assert_eq!(status["role"], "primary");
    let code = node.term();
    assert!(code.success());
    assert!(!node.log().contains("cannot notify systemd"), "{}", node.log());
}

#[test]
fn unit_file_passes_systemd_analyze_verify() {
    require_tool("systemd-analyze", "systemd");
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/systemd/repd@.service");
    let text = std::fs::read_to_string(&unit).expect("read unit");
    assert!(text.contains("\nType=notify\n"), "Type=notify");
    assert!(text.contains("--config /etc/repblock/%i.toml"), "config per instance");
    // verify checks that ExecStart is executable: point it at this build.
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("repd@.service"), text.replace("/usr/bin/repd", common::REPD)).expect("write");
    let out = run_timeout(
        Command::new("systemd-analyze").current_dir(dir.path()).args(["verify", "./repd@r0.service"]),
        Duration::from_secs(60),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    // It warns (exit 0) on keys it ignores: any output is a failure.
    assert!(out.status.success() && err.trim().is_empty(), "systemd-analyze verify: {}\n{err}", out.status);
}
