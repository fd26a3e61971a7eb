//! `repctl status --statistics` and `repctl events --statistics` against a
//! real repd, with nbdcopy (a real NBD client) making the IO they count.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{TestNode, random_file, require_tool, run_ok};
use serde_json::Value;

#[test]
fn status_and_events_show_the_counters() {
    require_tool("nbdcopy", "libnbd-bin");
    let node = TestNode::ready("sync");
    let file = random_file(node.path(), "payload", 2 << 20, 7);
    run_ok(Command::new("nbdcopy").arg("--flush").arg(&file).arg(node.uri()), Duration::from_secs(120));

    let s: Value = serde_json::from_str(&node.repctl_ok(&["status", "--json"])).expect("json");
    let st = &s["statistics"];
    assert_eq!(st["written_bytes"], 2 << 20, "{st:#}");
    assert!(st["write_requests"].as_u64().is_some_and(|n| n >= 1), "{st:#}");
    assert!(st["flush_requests"].as_u64().is_some_and(|n| n >= 1), "nbdcopy --flush: {st:#}");
    assert!(st["wal_syncs"].as_u64().is_some_and(|n| n >= 1), "a flush syncs the WAL: {st:#}");
    assert_eq!(st["pending_requests"], 0);
    // Single node: no link.
    assert_eq!(st["sent_bytes"], 0);
    assert_eq!(st["peer_address"], Value::Null);
    assert_eq!(st["replication_buffer_bytes"], 0);

    let human = node.repctl_ok(&["status", "--statistics"]);
    assert!(human.starts_with("r0 role:primary\n"), "{human}");
    assert!(human.contains("  local: read:0B written:2MiB read-requests:0 write-requests:"), "{human}");
    assert!(human.contains(&format!("  volume: wal-syncs:{} ", st["wal_syncs"])), "{human}");
    let plain = node.repctl_ok(&["status"]);
    assert!(!plain.contains("local: read:"), "statistics only with --statistics: {plain}");

    // events --statistics: the stream's state event, then statistics events.
    let (_events, rx) = common::spawn_events(&node.config, "alpha", &["--statistics", "--interval", "0.2"]);
    let start = Instant::now();
    let mut state = false;
    let mut stats = Vec::new();
    while stats.len() < 3 {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("no event line after {:?} ({e})", start.elapsed()));
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
        match v["event"].as_str() {
            Some("state") => state = true,
            Some("statistics") => stats.push(v),
            _ => {}
        }
    }
    let took = start.elapsed();
    assert!(state, "the stream starts with a state event");
    for v in &stats {
        assert_eq!(v["written_bytes"], 2 << 20, "{v}");
        assert_eq!(v["lsn"]["local"], s["lsn"]["local"], "{v}");
        assert!(v["time"].as_str().is_some_and(|t| t.ends_with('Z')), "{v}");
    }
    // Three events at 0.2 s: a generous bound, printed.
    eprintln!("3 statistics events in {took:?}");
    assert!(took < Duration::from_secs(20), "3 statistics events at --interval 0.2 took {took:?}");

    let out = node.repctl(&["events", "--interval", "1"]);
    assert_eq!(out.status.code(), Some(2), "--interval needs --statistics: {out:?}");
}
