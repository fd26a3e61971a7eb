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
