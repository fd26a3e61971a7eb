//! The CLI and control contract (design.md §6) against real repd/repctl
//! processes.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{REPCTL, REPD, RawNbdClient, TestNode, run_timeout};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn create_md_twice_is_refused_unless_forced() {
    let n = TestNode::new("sync");
    n.create_md();
    let again = n.repctl(&["create-md"]);
    assert_eq!(again.status.code(), Some(1), "second create-md must be refused: {}", stderr(&again));
    assert!(!stderr(&again).trim().is_empty(), "refusal says why");
    n.repctl_ok(&["create-md", "--force"]);
}

#[test]
fn create_md_is_refused_while_repd_runs() {
    let mut n = TestNode::new("sync");
    n.create_md();
    n.start();
    let out = n.repctl(&["create-md", "--force"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("node alpha is running"), "{}", stderr(&out));
}

fn status_contract(engine: &str) {
    let mut n = TestNode::new(engine);
    n.create_md();
    n.start();
    let s = n.status();
    for key in [
        "resource",
        "node",
        "role",
        "disk",
        "connection",
        "replication",
        "protocol",
        "peer",
        "out_of_sync_bytes",
        "resync",
        "lsn",
        "size",
        "io_engine",
        "nbd",
        "wal",
        "failed",
    ] {
        assert!(s.get(key).is_some(), "status lacks {key}: {s}");
    }
    assert_eq!(s["resource"], "r0");
    assert_eq!(s["node"], "alpha");
    assert_eq!(s["role"], "secondary");
    assert_eq!(s["disk"], "inconsistent");
    assert_eq!(s["connection"], "standalone");
    assert_eq!(s["replication"], serde_json::Value::Null);
    assert_eq!(s["protocol"], "C");
    assert_eq!(s["peer"], serde_json::json!({"name": null, "role": null, "disk": null}));
    assert_eq!(s["out_of_sync_bytes"], 0);
    assert_eq!(s["resync"]["done_bytes"], 0);
    assert_eq!(s["resync"]["total_bytes"], 0);
    assert_eq!(s["resync"]["kind"], serde_json::Value::Null, "no sync running");
    for k in ["local", "peer_received", "peer_written", "peer_durable"] {
        assert!(s["lsn"][k].is_u64(), "lsn.{k}: {s}");
    }
    assert_eq!(s["lsn"]["peer_received"], 0);
    assert_eq!(s["size"], 64u64 << 20);
    assert_eq!(s["io_engine"], engine);
    assert_eq!(s["nbd"]["serving"], false);
    assert_eq!(s["nbd"]["clients"], 0);
    assert_eq!(s["nbd"]["address"], n.nbd_addr());
    for k in ["bytes", "checkpoint_lsn", "durable_lsn"] {
        assert!(s["wal"][k].is_u64(), "wal.{k}: {s}");
    }
    assert_eq!(s["failed"], serde_json::Value::Null);

    // `repctl status --json` prints the same object.
    let printed: serde_json::Value = serde_json::from_str(&n.repctl_ok(&["status", "--json"])).expect("json");
    assert_eq!(printed["role"], "secondary");
    assert_eq!(printed["resource"], "r0");

    n.promote_force();
    let s = n.status();
    assert_eq!(s["role"], "primary");
    assert_eq!(s["disk"], "uptodate");
    assert_eq!(s["nbd"]["serving"], true);
    assert_eq!(s["nbd"]["uri"], n.uri());
    assert_eq!(s["connection"], "standalone");

    let human = n.repctl_ok(&["status"]);
    assert!(human.starts_with("r0 role:primary\n  disk:uptodate\n  connection:standalone\n"), "{human}");
    assert!(human.contains(&n.uri()), "{human}");
}

both_engines! {
    status_json_has_every_field => status_contract;
}

#[test]
fn nbd_is_refused_while_secondary_and_after_demote() {
    let mut n = TestNode::new("sync");
    n.create_md();
    n.start();
    assert!(RawNbdClient::connect(n.port, "r0").is_err(), "a secondary must not accept NBD clients");
    n.promote_force();
    let c = RawNbdClient::connect(n.port, "r0").expect("primary accepts clients");
    assert_eq!(c.size, 64 << 20);
    drop(c);
    // Wait for the server to notice the disconnect before demoting.
    let deadline = Instant::now() + Duration::from_secs(10);
    while n.status()["nbd"]["clients"] != 0 {
        assert!(Instant::now() < deadline, "client count never dropped to 0");
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = n.repctl_ok(&["demote"]);
    assert!(out.contains("secondary"), "{out}");
    assert!(RawNbdClient::connect(n.port, "r0").is_err(), "a demoted node must not accept NBD clients");
    assert_eq!(n.status()["role"], "secondary");
    assert_eq!(n.status()["disk"], "uptodate", "demote keeps the disk uptodate");
    // Promote again without --force: the disk is uptodate now.
    n.promote();
    assert!(RawNbdClient::connect(n.port, "r0").is_ok());
}

#[test]
fn promote_of_an_inconsistent_disk_needs_force() {
    let mut n = TestNode::new("sync");
    n.create_md();
    n.start();
    let out = n.repctl(&["promote"]);
    assert_eq!(out.status.code(), Some(1));
    let e = stderr(&out);
    assert!(e.contains("disk is inconsistent"), "{e}");
    assert!(e.contains("never initialised or synced"), "{e}");
    assert!(e.contains("--force makes this node's data the truth"), "{e}");
    assert_eq!(n.status()["role"], "secondary");
    // Promote twice: the second is a no-op success.
    n.promote_force();
    let again = n.repctl_ok(&["promote"]);
    assert!(again.contains("already"), "{again}");
}

#[test]
fn demote_is_refused_while_a_client_is_attached_and_force_disconnects_it() {
    let n = TestNode::ready("sync");
    let mut client = RawNbdClient::connect(n.port, "r0").expect("attach");
    let deadline = Instant::now() + Duration::from_secs(10);
    while n.status()["nbd"]["clients"] != 1 {
        assert!(Instant::now() < deadline, "client never counted: {}", n.status());
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = n.repctl(&["demote"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("1 NBD client is attached"), "{}", stderr(&out));
    assert!(stderr(&out).contains("--force"), "{}", stderr(&out));
    assert_eq!(n.status()["role"], "primary");
    assert!(!client.closed_within(Duration::from_millis(200)), "refused demote must not drop the client");

    let out = n.repctl_ok(&["demote", "--force"]);
    assert!(out.contains("disconnected 1"), "{out}");
    assert!(client.closed_within(Duration::from_secs(10)), "demote --force must disconnect the client");
    assert_eq!(n.status()["role"], "secondary");
}

#[test]
fn the_default_export_name_is_accepted() {
    let n = TestNode::ready("sync");
    let c = RawNbdClient::connect(n.port, "").expect("empty export name");
    assert_eq!(c.size, 64 << 20);
}

fn write_file(dir: &std::path::Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write");
    p
}

#[test]
fn config_errors_name_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let good = "name = \"r0\"\nsize = \"64MiB\"\n[[node]]\nname = \"alpha\"\nnbd = \"127.0.0.1:10809\"\ncontrol = \"ctl.sock\"\ndir = \"d\"\n";
    let cases: &[(&str, String, &str)] = &[
        (
            "bad-nbd.toml",
            good.replace("127.0.0.1:10809", "10809"),
            r#"bad-nbd.toml: node[0].nbd: expected "host:port" or "unix:/path", got "10809""#,
        ),
        (
            "bad-size.toml",
            good.replace("\"64MiB\"", "\"1 GB\""),
            r#"bad-size.toml: size: "1 GB" is not a size (examples: "512MiB", "1GiB")"#,
        ),
        ("unknown.toml", good.replace("size =", "sise ="), r#"unknown.toml: unknown field "sise""#),
        (
            "engine.toml",
            format!("io_engine = \"aio\"\n{good}"),
            r#"engine.toml: io_engine: expected "auto", "io_uring" or "sync", got "aio""#,
        ),
    ];
    for (file, text, expected) in cases {
        let path = write_file(dir.path(), file, text);
        for (bin, extra) in [(REPD, &[][..]), (REPCTL, &["status"][..])] {
            let out = run_timeout(
                Command::new(bin).arg("--config").arg(&path).arg("--node").arg("alpha").args(extra),
                Duration::from_secs(30),
            );
            assert_eq!(out.status.code(), Some(1), "{bin} {file}: {}", stderr(&out));
            let e = stderr(&out);
            assert!(e.contains(&format!("{}", dir.path().join(expected).display())), "{bin} {file}: {e}");
        }
    }
    // A node missing from the file: the error lists the nodes present.
    let path = write_file(dir.path(), "good.toml", good);
    let out = run_timeout(
        Command::new(REPCTL).arg("--config").arg(&path).args(["--node", "beta", "status"]),
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains(r#"no node named "beta" (nodes in this file: alpha)"#), "{}", stderr(&out));
    // Usage errors exit 2.
    let out = run_timeout(
        Command::new(REPCTL).arg("--config").arg(&path).args(["--node", "alpha", "frobnicate"]),
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(2));
    let out = run_timeout(Command::new(REPD).arg("--config").arg(&path), Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn repctl_against_a_stopped_node_says_so() {
    let mut n = TestNode::new("sync");
    for args in [&["status"][..], &["promote"], &["events"]] {
        let out = n.repctl(args);
        // Exit 3: repd cannot be reached (docs/cli.md).
        assert_eq!(out.status.code(), Some(3));
        let expected = format!("repd for node alpha is not running (no control socket at {})", n.control().display());
        assert!(stderr(&out).contains(&expected), "{}", stderr(&out));
    }
    // Also after a SIGKILL left a stale socket behind.
    n.create_md();
    n.start();
    n.kill9();
    let out = n.repctl(&["status"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(stderr(&out).contains("repd for node alpha is not running"), "{}", stderr(&out));
    // And repd starts again over the stale socket.
    n.start();
}

#[test]
fn repd_without_metadata_says_how_to_create_it() {
    let mut n = TestNode::new("sync");
    let err = n.try_start().expect_err("repd must refuse to start without metadata");
    let expected = format!(
        "no metadata in {}: run `repctl --config {} --node alpha create-md`",
        n.data_dir().display(),
        n.config.display()
    );
    assert!(err.contains(&expected), "{err}");
    assert!(!n.control().exists(), "the control socket is removed on a failed start");
}

#[test]
fn a_second_repd_for_the_same_node_is_refused() {
    let mut n = TestNode::new("sync");
    n.create_md();
    n.start();
    let out = run_timeout(
        Command::new(REPD).arg("--config").arg(&n.config).args(["--node", "alpha"]),
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("node alpha already running (control socket"), "{}", stderr(&out));
    // The first one is unharmed.
    assert_eq!(n.status()["role"], "secondary");
}

#[test]
fn replication_commands_on_a_single_node_say_why_they_are_not_available() {
    let mut n = TestNode::new("sync");
    n.create_md();
    n.start();
    for (args, cmd) in [
        (&["connect"][..], "connect"),
        (&["connect", "--discard-my-data"], "connect"),
        (&["disconnect"], "disconnect"),
        (&["verify"], "verify"),
        (&["invalidate"], "invalidate"),
    ] {
        let out = n.repctl(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(stderr(&out).contains(&format!("{cmd}: not available: ")), "{}", stderr(&out));
    }
}

#[test]
fn wait_sync_on_a_single_node() {
    let mut n = TestNode::new("sync");
    n.create_md();
    n.start();
    let out = n.repctl(&["wait-sync", "--timeout", "5"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("disk is inconsistent and no sync source is connected"), "{}", stderr(&out));
    n.promote_force();
    let t = Instant::now();
    let out = n.repctl_ok(&["wait-sync", "--timeout", "5"]);
    assert!(out.contains("in sync"), "{out}");
    assert!(t.elapsed() < Duration::from_secs(3), "a healthy single node is in sync at once");
}

#[test]
fn events_stream_role_changes() {
    let mut n = TestNode::new("sync");
    n.create_md();
    n.start();
    let mut ev_guard = common::ChildGuard(Some(
        Command::new(REPCTL)
            .arg("--config")
            .arg(&n.config)
            .args(["--node", "alpha", "events"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("repctl events"),
    ));
    let mut lines = BufReader::new(ev_guard.child().stdout.take().expect("stdout")).lines();
    let first: serde_json::Value = serde_json::from_str(&lines.next().expect("a line").expect("read")).expect("json");
    assert_eq!(first["event"], "state");
    assert_eq!(first["role"], "secondary");
    assert!(humantime::parse_rfc3339(first["time"].as_str().expect("time")).is_ok(), "{first}");
    n.promote_force();
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let v: serde_json::Value = serde_json::from_str(&line.expect("read")).expect("json");
        seen.push(v["event"].as_str().unwrap_or_default().to_string());
        if v["event"] == "role-changed" {
            assert_eq!(v["role"], "primary");
            break;
        }
    }
    assert!(seen.contains(&"disk-changed".to_string()), "{seen:?}");
    // The stream ends when repd stops.
    assert!(n.term().success());
    let rest: Vec<_> = lines.collect();
    let status = ev_guard.take().wait().expect("wait");
    assert!(status.success(), "repctl events exits 0 when repd stops ({status}); trailing: {rest:?}");
}

#[test]
fn two_node_config_runs_with_its_peer_connecting() {
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let text = format!(
        "name = \"r0\"\nsize = \"64MiB\"\nsecret = \"s3cret\"\nio_engine = \"sync\"\n\
         [[node]]\nname = \"alpha\"\nreplication = \"127.0.0.1:7790\"\nnbd = \"127.0.0.1:{port}\"\ncontrol = \"a.sock\"\ndir = \"a\"\n\
         [[node]]\nname = \"beta\"\nreplication = \"127.0.0.1:7791\"\nnbd = \"127.0.0.1:1\"\ncontrol = \"b.sock\"\ndir = \"b\"\n"
    );
    let cfg = write_file(dir.path(), "r0.toml", &text);
    let repctl = |args: &[&str]| {
        run_timeout(
            Command::new(REPCTL).arg("--config").arg(&cfg).args(["--node", "alpha"]).args(args),
            Duration::from_secs(30),
        )
    };
    assert!(repctl(&["create-md"]).status.success());
    let log = std::fs::File::create(dir.path().join("repd.log")).unwrap();
    let mut guard = common::ChildGuard(Some(
        Command::new(REPD).arg("--config").arg(&cfg).args(["--node", "alpha"]).stderr(log).spawn().expect("repd"),
    ));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = repctl(&["status", "--json"]);
        if out.status.success() {
            let s: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
            assert_eq!(s["connection"], "connecting");
            assert_eq!(s["peer"]["name"], "beta");
            assert_eq!(s["peer"]["disk"], "unknown");
            assert_eq!(s["peer"]["role"], serde_json::Value::Null);
            assert_eq!(s["replication"], serde_json::Value::Null);
            break;
        }
        if let Some(st) = guard.child().try_wait().unwrap() {
            panic!("repd exited {st}: {}", std::fs::read_to_string(dir.path().join("repd.log")).unwrap());
        }
        assert!(Instant::now() < deadline, "repd never answered");
        std::thread::sleep(Duration::from_millis(50));
    }
    // wait-sync waits for the peer; with none it times out, saying so.
    let out = repctl(&["wait-sync", "--timeout", "1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("timed out") && stderr(&out).contains("connection:connecting"), "{}", stderr(&out));
    let human = stdout(&repctl(&["status"]));
    assert!(human.contains("beta connection:connecting"), "{human}");
    assert!(human.contains("peer-disk:unknown"), "{human}");
}

#[test]
fn sigterm_stops_cleanly_and_the_restart_replays_nothing() {
    common::require_tool("nbdcopy", "libnbd-bin");
    let mut n = TestNode::ready("sync");
    let img = common::random_file(n.path(), "in.img", 4 << 20, 5);
    common::run_ok(Command::new("nbdcopy").arg(&img).arg(n.uri()), Duration::from_secs(120));
    let status = n.term();
    assert!(status.success(), "SIGTERM exit status: {status}\n{}", n.log());
    assert!(!n.control().exists(), "control socket removed on a clean stop");
    let log = n.log();
    assert!(log.contains("volume closed cleanly"), "{log}");
    assert!(log.contains("stopped cleanly"), "{log}");

    n.start();
    let log = n.log();
    let line =
        log.lines().find(|l| l.contains("volume recovered")).unwrap_or_else(|| panic!("no recovery line:\n{log}"));
    assert!(line.contains("clean=true") && line.contains("replayed=0"), "no replay after a clean stop: {line}");
    // Still secondary after the restart, and the disk stayed uptodate.
    assert_eq!(n.status()["role"], "secondary");
    assert_eq!(n.status()["disk"], "uptodate");
    n.promote();
    let out = n.path().join("out.img");
    common::run_ok(Command::new("nbdcopy").arg(n.uri()).arg(&out), Duration::from_secs(120));
    let (a, b) = (std::fs::read(&img).unwrap(), std::fs::read(&out).unwrap());
    assert!(a[..] == b[..a.len()], "data survives the clean restart");

    // After SIGKILL the restart is not clean.
    common::run_ok(Command::new("nbdcopy").arg(&img).arg(n.uri()), Duration::from_secs(120));
    n.kill9();
    n.start();
    let log = n.log();
    let line =
        log.lines().find(|l| l.contains("volume recovered")).unwrap_or_else(|| panic!("no recovery line:\n{log}"));
    assert!(line.contains("clean=false"), "{line}");
}

#[test]
fn repd_demo_runs_and_restarts_with_the_same_data() {
    common::require_tool("nbdinfo", "libnbd-bin");
    let dir = tempfile::tempdir().unwrap();
    let demo_dir = dir.path().join("demo");
    let port = common::free_port();
    let run_demo = |log_name: &str| {
        let log = std::fs::File::create(dir.path().join(log_name)).unwrap();
        Command::new(REPD)
            .args(["demo", "--size", "64MiB", "--nbd", &format!("127.0.0.1:{port}"), "--dir"])
            .arg(&demo_dir)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("repd demo")
    };
    for round in 0..2 {
        let mut guard = common::ChildGuard(Some(run_demo(&format!("demo-{round}.log"))));
        let mut out = BufReader::new(guard.child().stdout.take().unwrap());
        let mut printed = String::new();
        let uri = format!("nbd://127.0.0.1:{port}/r0");
        // Read the help text until the repctl lines (printed once serving).
        let deadline = Instant::now() + Duration::from_secs(60);
        while !printed.contains("Ctrl-C") {
            let mut line = String::new();
            let n = out.read_line(&mut line).unwrap();
            if n == 0 {
                panic!(
                    "repd demo exited early: {}\n{}",
                    printed,
                    std::fs::read_to_string(dir.path().join(format!("demo-{round}.log"))).unwrap()
                );
            }
            printed.push_str(&line);
            assert!(Instant::now() < deadline);
        }
        for hint in [
            format!("NBD URI:  {uri}"),
            format!("nbdinfo {uri}"),
            format!("nbd-client 127.0.0.1 {port} /dev/nbd0 -N r0"),
            "nbdfuse".to_string(),
            "losetup".to_string(),
            format!("qemu-img info {uri}"),
            "qemu-system-x86_64".to_string(),
            "repctl --config".to_string(),
        ] {
            assert!(printed.contains(&hint), "demo help lacks {hint:?}:\n{printed}");
        }
        let info = common::run_ok(Command::new("nbdinfo").arg("--size").arg(&uri), Duration::from_secs(60));
        assert_eq!(String::from_utf8_lossy(&info.stdout).trim(), (64u64 << 20).to_string());
        let log = std::fs::read_to_string(dir.path().join(format!("demo-{round}.log"))).unwrap();
        if round == 0 {
            assert!(log.contains("promote --force"), "first run forces the fresh disk:\n{log}");
        } else {
            assert!(!log.contains("promote --force"), "second run needs no force:\n{log}");
        }
        // Ctrl-C stops it cleanly.
        let mut child = guard.take();
        // SAFETY: kill(2) on our own, not yet reaped child.
        assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) }, 0);
        let status = child.wait().unwrap();
        assert!(status.success(), "repd demo exit after SIGINT: {status}");
    }
    assert!(demo_dir.join("r0.toml").exists());
}

#[test]
fn promote_reports_a_busy_nbd_port_and_can_be_retried() {
    let mut n = TestNode::new("sync");
    n.create_md();
    n.start();
    let squatter = std::net::TcpListener::bind(("127.0.0.1", n.port)).expect("occupy the NBD port");
    let out = n.repctl(&["promote", "--force"]);
    assert_eq!(out.status.code(), Some(1));
    let e = stderr(&out);
    assert!(e.contains("Cannot start the NBD export") && e.contains(&format!("127.0.0.1:{}", n.port)), "{e}");
    assert_eq!(n.status()["role"], "secondary");
    drop(squatter);
    // The forced promote already made the data the truth: no --force now.
    assert_eq!(n.status()["disk"], "uptodate");
    n.promote();
    assert!(RawNbdClient::connect(n.port, "r0").is_ok());
}

#[test]
fn max_clients_caps_nbd_connections() {
    let mut opts = common::NodeOpts::new("sync");
    opts.extra = "max_clients = 2".into();
    let n = TestNode::ready_with(opts);
    let a = RawNbdClient::connect(n.port, "r0").expect("first client");
    let b = RawNbdClient::connect(n.port, "r0").expect("second client");
    assert!(RawNbdClient::connect(n.port, "r0").is_err(), "a third connection is refused");
    assert_eq!(n.status()["nbd"]["clients"], 2);
    drop((a, b));
    let deadline = Instant::now() + Duration::from_secs(10);
    while RawNbdClient::connect(n.port, "r0").is_err() {
        assert!(Instant::now() < deadline, "slots are freed when clients leave");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_control_socket_answers_bad_requests_and_survives() {
    use std::io::{BufRead, Write};
    use std::os::unix::fs::PermissionsExt;
    let mut n = TestNode::new("sync");
    n.create_md();
    n.start();
    let mode = std::fs::metadata(n.control()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "control socket is owner-only");
    let stream = std::os::unix::net::UnixStream::connect(n.control()).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut w = stream.try_clone().unwrap();
    let mut r = BufReader::new(stream);
    let mut ask = |line: &str| -> serde_json::Value {
        w.write_all(line.as_bytes()).unwrap();
        w.write_all(b"\n").unwrap();
        let mut answer = String::new();
        r.read_line(&mut answer).unwrap();
        serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{e}: {answer:?}"))
    };
    for (req, expect) in [
        ("hello", "bad request"),
        ("{\"cmd\":\"explode\"}", "bad request"),
        ("{\"cmd\":\"promote\",\"force\":\"yes\"}", "bad request"),
        ("{\"cmd\":\"wait-sync\",\"timeout_secs\":1e300}", "timeout_secs must be"),
        ("{\"cmd\":\"wait-sync\",\"timeout_secs\":-1}", "timeout_secs must be"),
    ] {
        let v = ask(req);
        assert_eq!(v["ok"], false, "{req}: {v}");
        assert!(v["error"].as_str().unwrap_or_default().contains(expect), "{req}: {v}");
    }
    // The same connection still works.
    assert_eq!(ask("{\"cmd\":\"status\"}")["result"]["role"], "secondary");
    // An over-long line closes only that connection.
    let mut long = std::os::unix::net::UnixStream::connect(n.control()).unwrap();
    // The daemon may close before all of it is written.
    let _ = long.write_all(&vec![b'x'; 100 * 1024]);
    drop(long);
    assert_eq!(n.status()["role"], "secondary");
    // And repctl rejects bad numbers before asking.
    let out = n.repctl(&["--timeout", "0", "status"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("--timeout: expected a positive number"), "{}", stderr(&out));
    let out = n.repctl(&["wait-sync", "--timeout", "1e300"]);
    assert_eq!(out.status.code(), Some(1));
}
