//! Keeps `repbench run --quick` and `repbench report` working: a tiny matrix
//! (one workload, standalone repd, a protocol C pair at two RTTs behind the
//! proxy, the local file) must produce a complete, well-formed JSON file and
//! the charts. No timing assertion: the numbers of a loaded CI machine mean
//! nothing, only their presence and consistency are checked. The cells
//! measure a fixed number of operations, so a slow machine makes the test
//! slower, not flaky.
//!
//! `repd` and `repctl` are taken from the directory of the repbench binary
//! under test (`target/<profile>/`): `cargo test` of the workspace builds
//! every binary of the default members before it runs a test, and
//! scripts/test.sh builds the whole workspace.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

const REPBENCH: &str = env!("CARGO_BIN_EXE_repbench");

fn repd() -> PathBuf {
    let dir = Path::new(REPBENCH).parent().expect("repbench has a directory");
    let repd = dir.join("repd");
    assert!(
        repd.is_file() && dir.join("repctl").is_file(),
        "{} and repctl are missing: build the workspace first (`cargo build` at the root, as scripts/test.sh does)",
        repd.display()
    );
    repd
}

fn run(args: &[&str]) -> (String, String) {
    let out = Command::new(REPBENCH).args(args).output().expect("run repbench");
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    assert!(out.status.success(), "repbench {args:?} failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}", out.status);
    (stdout, stderr)
}

fn num(v: &Value, what: &str) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("{what} is not a number: {v}"))
}

#[test]
fn quick_run_writes_complete_results_and_report() {
    let repd = repd();
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("results");
    let charts = dir.path().join("charts");
    let (stdout, _) = run(&[
        "run",
        "--quick",
        "--no-progress",
        "--workloads",
        "qd1-write-flush",
        "--protocols",
        "C",
        "--rtt",
        "0,1ms",
        "--peers",
        "repblock,file",
        // A fixed operation count: the run is complete however slow the
        // machine is (no cell can end up with nothing measured).
        "--ops",
        "50",
        "--warmup",
        "20ms",
        "--repd",
        repd.to_str().expect("utf-8 path"),
        "--work-dir",
        dir.path().to_str().expect("utf-8 path"),
        "--out",
        out.to_str().expect("utf-8 path"),
    ]);

    let files: Vec<PathBuf> = std::fs::read_dir(&out).expect("results dir").map(|e| e.expect("entry").path()).collect();
    assert_eq!(files.len(), 1, "one results file: {files:?}");
    assert_eq!(files[0].extension().and_then(|e| e.to_str()), Some("json"));
    let run_json: Value =
        serde_json::from_str(&std::fs::read_to_string(&files[0]).expect("read results")).expect("results are JSON");

    // Provenance.
    assert_eq!(run_json["format_version"], 1);
    for key in ["started", "finished", "git_commit"] {
        assert!(run_json[key].as_str().is_some_and(|s| !s.is_empty()), "{key} missing");
    }
    let m = &run_json["machine"];
    assert!(num(&m["cores"], "cores") >= 1.0);
    for key in ["cpu_model", "kernel", "work_dir_fs"] {
        assert!(m[key].as_str().is_some_and(|s| !s.is_empty()), "machine.{key} missing");
    }
    assert!(run_json["args"].as_array().is_some_and(|a| a.iter().any(|x| x == "--quick")), "args recorded");
    assert_eq!(run_json["config"]["rtts_ms"], serde_json::json!([0.0, 1.0]));
    assert_eq!(run_json["config"]["workloads"][0]["name"], "qd1-write-flush");

    // Every cell of the matrix, each with its numbers.
    let cells = run_json["cells"].as_array().expect("cells");
    let mut targets: Vec<&str> = cells.iter().map(|c| c["target"].as_str().expect("target")).collect();
    targets.sort();
    assert_eq!(targets, ["C@0ms", "C@1ms", "file", "repblock"]);
    for c in cells {
        let t = c["target"].as_str().expect("target");
        let md = &c["median"];
        assert_eq!(num(&md["ops"], "ops"), 50.0, "{t}: every requested operation measured");
        assert!(num(&md["iops"], "iops") > 0.0, "{t}: iops");
        let p: Vec<f64> = ["p50_us", "p90_us", "p99_us", "p999_us", "max_us"].iter().map(|k| num(&md[k], k)).collect();
        assert!(p[0] > 0.0 && p.windows(2).all(|w| w[0] <= w[1]), "{t}: percentiles not ordered: {p:?}");
        assert_eq!(c["rounds"].as_array().map(Vec::len), Some(1), "{t}: one round in quick mode");
        let cdf = c["cdf"].as_array().expect("cdf");
        assert!(cdf.len() > 100, "{t}: cdf has {} points", cdf.len());
        let roles: Vec<&str> =
            c["cpu_s"].as_array().expect("cpu_s").iter().map(|r| r[0].as_str().expect("role")).collect();
        let rss = c["peak_rss_kib"].as_array().expect("rss");
        match t {
            "file" => assert!(roles.is_empty()),
            "repblock" => {
                assert_eq!(roles, ["primary"]);
                assert!(num(&rss[0][1], "rss") > 0.0, "{t}: peak RSS");
            }
            _ => {
                assert_eq!(roles, ["primary", "secondary"], "{t}");
                assert_eq!(c["kind"], "C");
                assert!(num(&rss[1][1], "rss") > 0.0, "{t}: secondary's peak RSS");
            }
        }
    }

    // The printed table and the report.
    assert!(stdout.contains("### qd1-write-flush") && stdout.contains("| C@1ms |"), "table:\n{stdout}");
    assert!(stdout.contains("C p50 / (RTT + local fdatasync p50)"), "checks:\n{stdout}");
    let (listing, _) = run(&["report", files[0].to_str().expect("utf-8"), "--out", charts.to_str().expect("utf-8")]);
    for name in ["results.md", "throughput.svg", "cdf-qd1-write-flush-rtt1ms.svg", "p99-vs-rtt-qd1-write-flush.svg"] {
        let p = charts.join(name);
        let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}\nlisting:\n{listing}", p.display()));
        if name.ends_with(".svg") {
            assert!(
                text.starts_with("<svg") && text.contains("<text") && text.trim_end().ends_with("</svg>"),
                "{name}"
            );
        }
    }
}

#[test]
fn bad_arguments_are_refused_with_a_clear_message() {
    for (args, expect) in [
        (vec!["run", "--workloads", "qd64"], "unknown workload"),
        (vec!["run", "--protocols", "D"], "is not A, B or C"),
        (vec!["run", "--rtt", "fast"], "is not a duration"),
        (vec!["run", "--region", "1000"], "multiple of 1 MiB"),
        (vec!["report", "/nonexistent/run.json"], "Reading /nonexistent/run.json"),
    ] {
        let out = Command::new(REPBENCH).args(&args).output().expect("run repbench");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} must fail");
        assert!(stderr.contains(expect), "{args:?}: expected {expect:?} in:\n{stderr}");
    }
}
