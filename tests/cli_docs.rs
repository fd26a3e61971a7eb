//! Man pages and shell completions of repd and repctl (generated from the
//! clap definitions), and repctl's documented exit codes (docs/cli.md):
//! 0 ok, 1 refused, 2 usage, 3 repd cannot be reached.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{REPCTL, REPD, TestNode, run_ok, run_timeout};

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn man_pages_cover_every_subcommand() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (bin, name, subs) in [
        (REPCTL, "repctl", &["status", "promote", "demote", "events", "wait-sync", "man", "completions"][..]),
        (REPD, "repd", &["demo", "man", "completions"][..]),
    ] {
        let page = stdout(&run_ok(Command::new(bin).arg("man"), Duration::from_secs(30)));
        assert!(page.contains(&format!(".TH {name} 8")), "{name}: {page}");
        let listed =
            stdout(&run_ok(Command::new(bin).arg("man").arg("--dir").arg(dir.path()), Duration::from_secs(30)));
        for sub in subs {
            let file = dir.path().join(format!("{name}-{sub}.8"));
            assert!(listed.contains(&file.display().to_string()), "{name}: {sub} missing from\n{listed}");
            let text = std::fs::read_to_string(&file).expect("page");
            assert!(text.contains(&format!(".TH {name}-{sub} 8")), "{}", file.display());
        }
    }
    let status = std::fs::read_to_string(dir.path().join("repctl-status.8")).expect("page");
    assert!(status.contains("statistics"), "status --statistics is documented:\n{status}");
    let main = std::fs::read_to_string(dir.path().join("repctl.8")).expect("page");
    assert!(main.contains("3 repd cannot be reached"), "exit codes in repctl(8):\n{main}");
}

#[test]
fn bash_completions_parse_and_complete_subcommands() {
    for (bin, name, word) in [(REPCTL, "repctl", "wait-sync"), (REPD, "repd", "demo")] {
        let script = stdout(&run_ok(Command::new(bin).args(["completions", "bash"]), Duration::from_secs(30)));
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(name);
        std::fs::write(&path, &script).expect("write");
        // Load it in a real bash and ask it to complete `NAME <TAB>`.
        let probe = format!(
            "source {p}; COMP_WORDS=({name} ''); COMP_CWORD=1; COMP_LINE='{name} '; COMP_POINT=${{#COMP_LINE}}; \
             _{name} {name} '' {name}; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            p = path.display()
        );
        let out = run_ok(Command::new("bash").arg("-c").arg(&probe), Duration::from_secs(30));
        let words = stdout(&out);
        assert!(words.lines().any(|w| w == word), "{name}: completing the first word gave\n{words}");
    }
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        let out = run_ok(Command::new(REPCTL).args(["completions", shell]), Duration::from_secs(30));
        assert!(stdout(&out).contains("repctl"), "{shell}");
    }
}

#[test]
fn repctl_exit_codes_are_consistent() {
    // 2: usage (missing --config/--node, unknown flag).
    let out = run_timeout(Command::new(REPCTL).arg("status"), Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = run_timeout(
        Command::new(REPCTL).args(["--config", "x", "--node", "a", "status", "--nope"]),
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let mut n = TestNode::new("sync");
    n.create_md();
    // 3: repd is not running.
    assert_eq!(n.repctl(&["status"]).status.code(), Some(3));
    n.start();
    // 1: refused (an inconsistent disk without --force).
    let out = n.repctl(&["promote"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    // 0: ok.
    assert_eq!(n.repctl(&["status"]).status.code(), Some(0));
    // 3 again after a crash left a stale socket.
    n.kill9();
    assert_eq!(n.repctl(&["status", "--json"]).status.code(), Some(3));
}
