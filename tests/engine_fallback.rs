//! IO engine selection as seen from outside: `auto` falls back to the sync
//! engine (and says so) when io_uring is unavailable; an explicit
//! `io_uring` refuses to start instead.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{NodeOpts, TestNode, random_file, require_tool, run_ok, run_timeout};

#[test]
fn auto_falls_back_to_sync_and_serves() {
    let mut opts = NodeOpts::new("auto");
    opts.env.push(("REPBLOCK_DISABLE_IO_URING".into(), "1".into()));
    let n = TestNode::ready_with(opts);
    let log = n.log();
    assert!(log.contains("falling back"), "the fallback is logged:\n{log}");
    assert!(log.contains("REPBLOCK_DISABLE_IO_URING"), "the log says why:\n{log}");
    assert_eq!(n.status()["io_engine"], "sync");
    require_tool("nbdcopy", "libnbd-bin");
    let img = random_file(n.path(), "in.img", 64 << 20, 99);
    run_ok(Command::new("nbdcopy").arg(&img).arg(n.uri()), Duration::from_secs(300));
    let out = n.path().join("out.img");
    run_ok(Command::new("nbdcopy").arg(n.uri()).arg(&out), Duration::from_secs(300));
    assert!(std::fs::read(&img).unwrap() == std::fs::read(&out).unwrap(), "round trip through the sync fallback");
}

#[test]
fn auto_uses_io_uring_when_available() {
    let n = TestNode::ready("auto");
    assert_eq!(n.status()["io_engine"], "io_uring", "this machine supports io_uring:\n{}", n.log());
}

#[test]
fn explicit_io_uring_refuses_to_start_when_unavailable() {
    let mut opts = NodeOpts::new("io_uring");
    opts.env.push(("REPBLOCK_DISABLE_IO_URING".into(), "1".into()));
    let mut n = TestNode::with(opts);
    // create-md honours the config's engine too, so run it without the
    // override.
    n.create_md();
    let err = n.try_start().expect_err("repd must refuse io_uring when it is unavailable");
    assert!(err.contains("io_engine = \"io_uring\" but io_uring is unavailable"), "{err}");
    assert!(err.contains("REPBLOCK_DISABLE_IO_URING"), "{err}");
    assert!(!n.control().exists(), "no control socket left behind");
    // The same through repctl create-md --force with the override set.
    let out = run_timeout(
        Command::new(common::REPCTL).env("REPBLOCK_DISABLE_IO_URING", "1").arg("--config").arg(&n.config).args([
            "--node",
            "alpha",
            "create-md",
            "--force",
        ]),
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("io_uring is unavailable"));
}
