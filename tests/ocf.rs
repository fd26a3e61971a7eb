//! The Pacemaker agent contrib/ocf/repblock against real repd processes:
//! `ocf-tester` (Debian resource-agents) runs its whole sequence on a
//! single node, and the agent's monitor exit codes and promotion scores
//! are checked on a replicating pair. The cluster commands
//! (`crm_attribute`, `crm_master`) are stubs that record their arguments.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::pair::{Pair, PairOpts, Peer};
use common::{NodeOpts, REPCTL, REPD, TestNode, run_timeout};

fn agent() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/ocf/repblock")
}

fn sbin_tool(tool: &str, package: &str) -> PathBuf {
    let p = Path::new("/usr/sbin").join(tool);
    let on_path =
        std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join(tool)).find(|p| p.is_file()));
    on_path.or_else(|| p.is_file().then_some(p)).unwrap_or_else(|| {
        panic!("{tool} is required by this test: install the Debian package {package} (scripts/test.sh does)")
    })
}

/// `crm_attribute` and `crm_master` stubs appending their arguments to
/// DIR/scores.log.
fn stubs(dir: &Path) -> PathBuf {
    let bin = dir.join("stubs");
    std::fs::create_dir_all(&bin).expect("mkdir");
    for cmd in ["crm_attribute", "crm_master"] {
        let p = bin.join(cmd);
        std::fs::write(&p, format!("#!/bin/sh\necho \"{cmd} $*\" >> {}/scores.log\n", dir.display())).expect("stub");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    bin
}

/// Runs its closure when dropped: stops a repd the agent started, so a
/// failing test leaves no daemon behind.
struct OnDrop<F: FnMut()>(F);

impl<F: FnMut()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        (self.0)();
    }
}

/// SIGTERM to the repd answering on `config`/`node`, if any.
fn stop_repd(config: &Path, node: &str) {
    let out = Command::new(REPCTL).arg("--config").arg(config).args(["--node", node, "status", "--json"]).output();
    let pid = out
        .ok()
        .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
        .and_then(|v| v["pid"].as_i64());
    if let Some(pid) = pid {
        // SAFETY: kill(2) with a pid repd reported for itself.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    }
}

fn scores(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("scores.log")).unwrap_or_default().lines().map(str::to_string).collect()
}

#[test]
fn ocf_tester_passes_against_a_real_repd() {
    let tester = sbin_tool("ocf-tester", "resource-agents");
    sbin_tool("xmllint", "libxml2-utils");
    // A node whose disk is uptodate (promoted once), stopped: the agent
    // starts, promotes, demotes and stops it.
    let mut node = TestNode::with(NodeOpts::new("sync"));
    node.create_md();
    node.start();
    node.promote_force();
    node.demote();
    assert!(node.term().success());
    let dir = tempfile::tempdir().expect("tempdir");
    let stub_dir = stubs(dir.path());
    let log = dir.path().join("repd.log");
    let config = node.config.clone();
    let _cleanup = OnDrop(move || stop_repd(&config, "alpha"));
    let out = run_timeout(
        Command::new(&tester)
            .env("HA_SBIN_DIR", &stub_dir)
            .env("OCF_ROOT", "/usr/lib/ocf")
            .args(["-n", "r0"])
            .arg("-o")
            .arg(format!("config={}", node.config.display()))
            .args(["-o", "node=alpha"])
            .arg("-o")
            .arg(format!("repd={REPD}"))
            .arg("-o")
            .arg(format!("repctl={REPCTL}"))
            .arg("-o")
            .arg(format!("log={}", log.display()))
            .arg(agent()),
        Duration::from_secs(600),
    );
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success() && text.contains("passed all tests"),
        "ocf-tester: {}\n{text}\n--- repd log ---\n{}",
        out.status,
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    // A single uptodate node may always be promoted; a stop removes the score.
    let s = scores(dir.path());
    assert!(s.iter().any(|l| l == "crm_attribute -p -v 10000"), "{s:#?}");
    assert!(s.iter().any(|l| l == "crm_attribute -p -D"), "{s:#?}");
    // Nothing left running.
    let status = node.repctl(&["status"]);
    assert_eq!(status.status.code(), Some(3), "repd still running after the agent's stop");
}

/// Runs one agent action for `p` (as Pacemaker's recurring monitor:
/// interval set, so scores are updated).
fn action(p: &Peer, dir: &Path, stub_dir: &Path, act: &str) -> Output {
    run_timeout(
        Command::new(agent())
            .arg(act)
            .env("OCF_ROOT", "/usr/lib/ocf")
            .env("HA_SBIN_DIR", stub_dir)
            .env("OCF_RESOURCE_INSTANCE", "r0")
            .env("OCF_RESKEY_CRM_meta_interval", "10000")
            .env("OCF_RESKEY_config", &p.config)
            .env("OCF_RESKEY_node", p.name)
            .env("OCF_RESKEY_repd", REPD)
            .env("OCF_RESKEY_repctl", REPCTL)
            .env("OCF_RESKEY_log", dir.join(format!("{}.log", p.name))),
        Duration::from_secs(120),
    )
}

fn last_score(dir: &Path) -> String {
    scores(dir).pop().unwrap_or_default()
}

#[test]
fn monitor_codes_and_promotion_scores_follow_the_pair() {
    sbin_tool("ocf-tester", "resource-agents");
    let mut pair = Pair::up(PairOpts::new("C"));
    let dir = tempfile::tempdir().expect("tempdir");
    let stub_dir = stubs(dir.path());
    let code = |p: &Peer, act: &str| action(p, dir.path(), &stub_dir, act).status.code();
    let config = pair.alpha.config.clone();
    let _cleanup = OnDrop(move || stop_repd(&config, "alpha"));

    // Primary: 8 and "promote me" (10000); connected uptodate secondary: 0, 10000.
    assert_eq!(code(&pair.alpha, "monitor"), Some(8));
    assert_eq!(last_score(dir.path()), "crm_attribute -p -v 10000");
    assert_eq!(code(&pair.beta, "monitor"), Some(0));
    assert_eq!(last_score(dir.path()), "crm_attribute -p -v 10000");

    // Beta alone, peer unknown: uptodate but may be stale, 1000.
    pair.alpha.kill9();
    pair.beta.wait_status("alpha lost", Duration::from_secs(30), |s| s["connection"] != "connected");
    assert_eq!(code(&pair.beta, "monitor"), Some(0));
    assert_eq!(last_score(dir.path()), "crm_attribute -p -v 1000");
    // Alpha is not running: 7; the agent starts it (secondary) and stops it.
    assert_eq!(code(&pair.alpha, "monitor"), Some(7));
    assert_eq!(code(&pair.alpha, "start"), Some(0));
    pair.alpha.wait_status("alpha reconnected", Duration::from_secs(30), |s| s["connection"] == "connected");
    assert_eq!(code(&pair.alpha, "monitor"), Some(0));
    // Demote of a secondary succeeds; promote while the peer... beta is
    // not primary, alpha is uptodate: promote works, monitor says 8.
    assert_eq!(code(&pair.alpha, "demote"), Some(0));
    assert_eq!(code(&pair.alpha, "promote"), Some(0));
    assert_eq!(code(&pair.alpha, "monitor"), Some(8));
    // Stop demotes and stops repd; a second stop succeeds too.
    assert_eq!(code(&pair.alpha, "stop"), Some(0));
    assert_eq!(code(&pair.alpha, "monitor"), Some(7));
    assert_eq!(last_score(dir.path()), "crm_attribute -p -D");
    assert_eq!(code(&pair.alpha, "stop"), Some(0));
}
