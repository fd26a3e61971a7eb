//! The Prometheus endpoint (`metrics = "host:port"`, docs/metrics.md)
//! against real processes: a replicating repd pair, nbdcopy writing
//! through NBD, `repctl status --json`, Debian's `promtool` (lint of real
//! scrapes, the alert rules and their unit tests) and a real `prometheus`
//! scraping repd and answering a query.
//!
//! promtool and prometheus are found on PATH or under
//! /opt/repblock-test/prometheus/usr/bin, where scripts/test.sh unpacks the
//! Debian package `prometheus` (not installed: no service starts). A
//! missing binary fails the test; it never skips.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::pair::{MIB, Pair, PairOpts, Peer};
use common::{ChildGuard, free_port, random_file, require_tool, run_ok, run_timeout};
use serde_json::Value;

const PROM_DIR: &str = "/opt/repblock-test/prometheus/usr/bin";

/// `tool` (promtool, prometheus) from PATH or [`PROM_DIR`]; panics if absent.
fn prom_bin(tool: &str) -> PathBuf {
    let on_path =
        std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join(tool)).find(|p| p.is_file()));
    let unpacked = Path::new(PROM_DIR).join(tool);
    on_path.or_else(|| unpacked.is_file().then_some(unpacked)).unwrap_or_else(|| {
        panic!(
            "{tool} is required by this test: scripts/test.sh unpacks the Debian package prometheus into \
             /opt/repblock-test/prometheus (or put {tool} on PATH)"
        )
    })
}

/// One HTTP/1.0 request on loopback (no chunked answer); returns the
/// status code, the headers and the body.
fn try_http(port: u16, method: &str, path: &str) -> std::io::Result<(u16, String, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(s, "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let raw = String::from_utf8(raw).expect("utf-8 response");
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no header end in {raw:?}"));
    let code = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("status line: {head}"));
    Ok((code, head.to_string(), body.to_string()))
}

fn http(port: u16, method: &str, path: &str) -> (u16, String, String) {
    try_http(port, method, path).unwrap_or_else(|e| panic!("{method} 127.0.0.1:{port}{path}: {e}"))
}

/// GET /metrics; panics unless 200.
fn scrape(p: &Peer) -> String {
    let port = p.metrics_port.expect("metrics port");
    let (code, head, body) = http(port, "GET", "/metrics");
    assert_eq!(code, 200, "{head}\n{body}");
    assert!(head.to_ascii_lowercase().contains("content-type: text/plain; version=0.0.4"), "{head}");
    body
}

/// Samples of a scrape: `name` -> [(labels, value)].
type Samples = BTreeMap<String, Vec<(BTreeMap<String, String>, f64)>>;

fn parse(text: &str) -> Samples {
    let mut out = Samples::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("sample line {line:?}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("value in {line:?}"));
        let (name, labels) = match series.split_once('{') {
            None => (series, BTreeMap::new()),
            Some((name, rest)) => {
                let inner = rest.strip_suffix('}').unwrap_or_else(|| panic!("labels in {line:?}"));
                let labels = inner
                    .split("\",")
                    .filter(|kv| !kv.is_empty())
                    .map(|kv| {
                        let (k, v) = kv.split_once("=\"").unwrap_or_else(|| panic!("label {kv:?} in {line:?}"));
                        (k.to_string(), v.trim_end_matches('"').to_string())
                    })
                    .collect();
                (name, labels)
            }
        };
        out.entry(name.to_string()).or_default().push((labels, value));
    }
    out
}

/// The one sample of `name` whose labels include `want`.
fn value(m: &Samples, name: &str, want: &[(&str, &str)]) -> f64 {
    let found: Vec<f64> = m
        .get(name)
        .unwrap_or_else(|| panic!("no metric {name} in the scrape"))
        .iter()
        .filter(|(l, _)| want.iter().all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v)))
        .map(|(_, v)| *v)
        .collect();
    assert_eq!(found.len(), 1, "{name}{want:?}: {} samples", found.len());
    found[0]
}

/// `repctl status --json` of the real binary.
fn status_json(p: &Peer) -> Value {
    serde_json::from_str(&p.repctl_ok(&["status", "--json"])).expect("status --json is JSON")
}

/// A one-hot state metric: 1 for `current`, 0 for every other state.
fn assert_one_hot(m: &Samples, name: &str, key: &str, current: &str, node: &str) {
    let samples = m.get(name).unwrap_or_else(|| panic!("no metric {name}"));
    let mut ones = 0;
    for (labels, v) in samples.iter().filter(|(l, _)| l.get("node").map(String::as_str) == Some(node)) {
        let state = labels.get(key).unwrap_or_else(|| panic!("{name} without label {key}"));
        let want = if state == current { 1.0 } else { 0.0 };
        assert_eq!(*v, want, "{name}{{{key}={state:?}}} on {node} (status says {current:?})");
        ones += (*v == 1.0) as usize;
    }
    assert_eq!(ones, 1, "{name} on {node}: exactly one state is 1 (status says {current:?})");
}

fn promtool_check_metrics(text: &str, what: &str) {
    let mut child = Command::new(prom_bin("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn promtool");
    child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("feed promtool");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics on {what} failed ({}):\n{}{}\n--- scrape ---\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Counters of the scrape lie between two `status --json` taken before and
/// after it (they only grow; the link's pings keep some moving).
fn assert_between(m: &Samples, before: &Value, after: &Value, node: &str) {
    let base = [("node", node)];
    for (metric, field) in [
        ("repblock_written_bytes_total", "written_bytes"),
        ("repblock_read_bytes_total", "read_bytes"),
        ("repblock_wal_syncs_total", "wal_syncs"),
        ("repblock_checkpoints_total", "checkpoints"),
        ("repblock_bitmap_writes_total", "bitmap_writes"),
        ("repblock_replication_sent_bytes_total", "sent_bytes"),
        ("repblock_replication_received_bytes_total", "received_bytes"),
    ] {
        let v = value(m, metric, &base);
        let lo = before["statistics"][field].as_f64().unwrap_or_else(|| panic!("statistics.{field}: {before:#}"));
        let hi = after["statistics"][field].as_f64().expect("after");
        assert!(lo <= v && v <= hi, "{node}: {metric} = {v}, status statistics.{field} went {lo} -> {hi}");
    }
    for (metric, lsn) in [
        ("repblock_local_lsn", "local"),
        ("repblock_peer_received_lsn", "peer_received"),
        ("repblock_peer_written_lsn", "peer_written"),
        ("repblock_peer_durable_lsn", "peer_durable"),
    ] {
        let v = value(m, metric, &base);
        let (lo, hi) = (before["lsn"][lsn].as_f64().expect("lsn"), after["lsn"][lsn].as_f64().expect("lsn"));
        assert!(lo <= v && v <= hi, "{node}: {metric} = {v}, status lsn.{lsn} went {lo} -> {hi}");
    }
}

/// Writes `len` random bytes at offset 0 of alpha's export with nbdcopy.
fn nbdcopy_to(pair: &Pair, len: usize) {
    require_tool("nbdcopy", "libnbd-bin");
    let file = random_file(pair.dir.path(), "payload", len, 12);
    run_ok(Command::new("nbdcopy").arg("--flush").arg(&file).arg(pair.alpha.uri()), Duration::from_secs(120));
}

#[test]
fn scrape_matches_status_and_passes_promtool() {
    let pair = Pair::up(PairOpts::new("C").metrics());
    const PAYLOAD: usize = 4 << 20;
    let before_alpha = status_json(&pair.alpha);
    let written_before = before_alpha["statistics"]["written_bytes"].as_u64().expect("written_bytes");
    nbdcopy_to(&pair, PAYLOAD);
    // Reads too: a real client reading back what it wrote.
    let back = pair.dir.path().join("back");
    let out = run_timeout(Command::new("nbdcopy").arg(pair.alpha.uri()).arg(&back), Duration::from_secs(120));
    assert!(out.status.success(), "nbdcopy read back: {}", String::from_utf8_lossy(&out.stderr));
    let local = status_json(&pair.alpha)["lsn"]["local"].as_u64().expect("lsn");
    pair.beta.wait_status("beta wrote alpha's log", Duration::from_secs(30), |s| {
        s["lsn"]["local"].as_u64().is_some_and(|l| l >= local)
    });

    for (p, role, peer) in [(&pair.alpha, "primary", "beta"), (&pair.beta, "secondary", "alpha")] {
        let node = p.name;
        let before = status_json(p);
        let t = Instant::now();
        let text = scrape(p);
        let scrape_ms = t.elapsed().as_secs_f64() * 1000.0;
        let after = status_json(p);
        let m = parse(&text);
        eprintln!(
            "{node}: scrape of {} bytes, {} families, {} samples in {scrape_ms:.1} ms",
            text.len(),
            text.lines().filter(|l| l.starts_with("# TYPE")).count(),
            m.values().map(Vec::len).sum::<usize>()
        );
        promtool_check_metrics(&text, node);

        // Nothing changes state while nobody writes: these equal the status.
        assert_eq!(after["role"], role, "{after:#}");
        assert_one_hot(&m, "repblock_role", "role", role, node);
        assert_one_hot(&m, "repblock_disk_state", "disk", after["disk"].as_str().expect("disk"), node);
        assert_one_hot(&m, "repblock_connection_state", "connection", after["connection"].as_str().expect("c"), node);
        let repl = after["replication"].as_str().unwrap_or("off");
        assert_one_hot(&m, "repblock_replication_state", "replication", repl, node);
        assert_one_hot(
            &m,
            "repblock_peer_disk_state",
            "disk",
            after["peer"]["disk"].as_str().expect("peer disk"),
            node,
        );
        assert_one_hot(&m, "repblock_peer_role", "role", after["peer"]["role"].as_str().expect("peer role"), node);
        let labels = [("resource", "r0"), ("node", node), ("peer", peer)];
        assert_eq!(value(&m, "repblock_peer_connected", &labels), 1.0);
        assert_eq!(value(&m, "repblock_split_brain", &labels), 0.0);
        assert_eq!(value(&m, "repblock_failed", &[("node", node)]), 0.0);
        assert_eq!(value(&m, "repblock_io_suspended", &[("node", node)]), 0.0);
        assert_eq!(value(&m, "repblock_out_of_sync_bytes", &labels), after["out_of_sync_bytes"].as_f64().expect("oos"));
        assert_eq!(
            value(&m, "repblock_resync_total_bytes", &labels),
            after["resync"]["total_bytes"].as_f64().expect("t")
        );
        assert_eq!(value(&m, "repblock_nbd_clients", &[("node", node)]), after["nbd"]["clients"].as_f64().expect("c"));
        assert_eq!(value(&m, "repblock_size_bytes", &[("node", node)]), 64.0 * MIB as f64);
        assert_eq!(
            value(&m, "repblock_replication_buffer_limit_bytes", &labels),
            after["statistics"]["replication_buffer_bytes"].as_f64().expect("buffer")
        );
        assert_between(&m, &before, &after, node);

        // The statistics themselves say what happened.
        let st = &after["statistics"];
        assert!(
            st["peer_address"].as_str().is_some_and(|a| a.starts_with("127.0.0.1:")),
            "{node}: peer_address {st:#}"
        );
        assert!(st["connected_seconds"].as_f64().is_some_and(|s| s > 0.0), "{node}: connected_seconds {st:#}");
        assert!(st["connected_since"].as_str().is_some(), "{node}: connected_since {st:#}");
        assert_eq!(st["replication_buffer_bytes"], 64 * MIB, "{node}: default max_buffer");
        assert_eq!(st["pending_requests"], 0, "{node}: nothing in flight");
        assert_eq!(st["unacked_requests"], 0, "{node}: nothing in flight");
        let human = p.repctl_ok(&["status", "--statistics"]);
        assert!(human.contains(&format!("  {peer} sent:")), "{node}: {human}");
        assert!(human.contains(" address:127.0.0.1:"), "{node}: {human}");
    }

    let a = parse(&scrape(&pair.alpha));
    let b = parse(&scrape(&pair.beta));
    let alpha = [("node", "alpha")];
    // nbdcopy wrote PAYLOAD bytes of random data (no zero runs): exactly that.
    let written = value(&a, "repblock_written_bytes_total", &alpha);
    assert_eq!(written - written_before as f64, PAYLOAD as f64, "alpha written bytes");
    assert!(value(&a, "repblock_read_bytes_total", &alpha) >= PAYLOAD as f64, "alpha read bytes");
    assert_eq!(value(&b, "repblock_written_bytes_total", &[("node", "beta")]), 0.0, "beta has no NBD clients");
    // The data went over the link (frames add headers).
    let sent = value(&a, "repblock_replication_sent_bytes_total", &alpha);
    let received = value(&b, "repblock_replication_received_bytes_total", &[("node", "beta")]);
    assert!(sent >= PAYLOAD as f64, "alpha sent {sent}");
    assert!(received >= PAYLOAD as f64, "beta received {received}");
    assert!(value(&a, "repblock_wal_syncs_total", &alpha) >= 1.0, "nbdcopy flushes: a WAL sync");
    // Every replicated request of alpha (all but reads) waited for beta,
    // as protocol C wants: one histogram observation each.
    let req = |op: &str| value(&a, "repblock_requests_total", &[("node", "alpha"), ("op", op)]);
    let replicated = req("write") + req("flush") + req("trim") + req("write_zeroes");
    let observed =
        value(&a, "repblock_ack_wait_seconds_count", &[("node", "alpha"), ("durability", "write"), ("protocol", "C")])
            + value(
                &a,
                "repblock_ack_wait_seconds_count",
                &[("node", "alpha"), ("durability", "flush"), ("protocol", "C")],
            );
    assert!(req("write") > 0.0, "nbdcopy wrote");
    assert_eq!(observed, replicated, "ack-wait observations vs replicated requests");
    let inf =
        value(&a, "repblock_ack_wait_seconds_bucket", &[("node", "alpha"), ("durability", "write"), ("le", "+Inf")]);
    assert_eq!(inf, value(&a, "repblock_ack_wait_seconds_count", &[("node", "alpha"), ("durability", "write")]));

    // docs/metrics.md documents every family a pair node emits, and no
    // name that none emits.
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/metrics.md")).expect("docs");
    let documented: std::collections::BTreeSet<&str> =
        doc.lines().filter_map(|l| l.strip_prefix("| `repblock_")).filter_map(|l| l.split('`').next()).collect();
    let mut emitted = std::collections::BTreeSet::new();
    for text in [scrape(&pair.alpha), scrape(&pair.beta)] {
        for l in text.lines().filter_map(|l| l.strip_prefix("# TYPE repblock_")) {
            emitted.insert(l.split(' ').next().expect("name").to_string());
        }
    }
    let emitted: std::collections::BTreeSet<&str> = emitted.iter().map(String::as_str).collect();
    assert_eq!(emitted, documented, "families emitted vs documented in docs/metrics.md");

    // The HTTP side: other paths and methods get their own answers.
    let port = pair.alpha.metrics_port.expect("port");
    assert_eq!(http(port, "GET", "/nope").0, 404);
    assert_eq!(http(port, "POST", "/metrics").0, 405);
    assert_eq!(http(port, "GET", "/").0, 200);
}

#[test]
fn prometheus_scrapes_repd_and_answers_a_query() {
    let prometheus = prom_bin("prometheus");
    let pair = Pair::up(PairOpts::new("C").metrics());
    let dir = pair.dir.path().join("prometheus");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let targets: Vec<String> =
        [&pair.alpha, &pair.beta].iter().map(|p| format!("'127.0.0.1:{}'", p.metrics_port.expect("port"))).collect();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
             rule_files: ['{rules}']\n\
             scrape_configs: [{{job_name: repd, static_configs: [{{targets: [{targets}]}}]}}]\n",
            rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/prometheus/alerts.yml").display(),
            targets = targets.join(", ")
        ),
    )
    .expect("write prometheus.yml");
    run_ok(Command::new(prom_bin("promtool")).arg("check").arg("config").arg(&config), Duration::from_secs(60));
    let web = free_port();
    let log = std::fs::File::create(dir.join("prometheus.log")).expect("log");
    let mut prom = ChildGuard(Some(
        Command::new(&prometheus)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{web}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("spawn prometheus"),
    ));
    let prom_log = || std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default();
    let query = |q: &str| -> Option<Value> {
        let enc: String = q
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        // Not listening yet: None, as a query with no answer yet.
        let (code, _, body) = try_http(web, "GET", &format!("/api/v1/query?query={enc}")).ok()?;
        (code == 200).then(|| serde_json::from_str(&body).expect("API answers JSON"))
    };
    // Written bytes as repd counts them, then as Prometheus scraped them.
    let start = Instant::now();
    let want = status_json(&pair.alpha)["statistics"]["written_bytes"].as_f64().expect("written");
    // Wait until Prometheus scraped both targets successfully.
    let sample = |r: &Value| r["data"]["result"][0]["value"][1].as_str().map(str::to_string);
    loop {
        if let Some(exited) = prom.child().try_wait().expect("try_wait") {
            panic!("prometheus exited with {exited}:\n{}", prom_log());
        }
        if query("count(up{job=\"repd\"} == 1)").as_ref().and_then(sample).as_deref() == Some("2") {
            break;
        }
        let targets = try_http(web, "GET", "/api/v1/targets").map(|r| r.2).unwrap_or_default();
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "prometheus did not scrape both repd up within 90s:\n{targets}\n{}",
            prom_log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let result = query("repblock_role{node=\"alpha\",role=\"primary\"}").expect("query");
    let result = result["data"]["result"].as_array().cloned().expect("result");
    eprintln!("prometheus had both targets up {:.1}s after start", start.elapsed().as_secs_f64());
    assert_eq!(result.len(), 1, "{result:#?}");
    assert_eq!(result[0]["metric"]["resource"], "r0");
    assert_eq!(result[0]["metric"]["job"], "repd");
    assert_eq!(result[0]["value"][1], "1", "alpha is primary: {result:#?}");
    let written = query("repblock_written_bytes_total{node=\"alpha\"}").expect("query");
    let got: f64 = written["data"]["result"][0]["value"][1].as_str().and_then(|v| v.parse().ok()).expect("value");
    assert_eq!(got, want, "Prometheus scraped what status says (nobody writes)");
    // The peer link seen from both sides.
    let connected = query("sum(repblock_peer_connected)").expect("query");
    assert_eq!(connected["data"]["result"][0]["value"][1], "2", "{connected:#}");
    // The alert rules loaded and none fires on a healthy pair.
    let (code, _, rules) = http(web, "GET", "/api/v1/rules");
    assert_eq!(code, 200);
    let rules: Value = serde_json::from_str(&rules).expect("json");
    let loaded: usize = rules["data"]["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .map(|g| g["rules"].as_array().map_or(0, Vec::len))
        .sum();
    assert_eq!(loaded, 6, "{rules:#}");
    let (_, _, alerts) = http(web, "GET", "/api/v1/alerts");
    let alerts: Value = serde_json::from_str(&alerts).expect("json");
    assert_eq!(alerts["data"]["alerts"].as_array().map(Vec::len), Some(0), "{alerts:#}");
}

#[test]
fn alert_rules_pass_promtool() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/prometheus");
    let promtool = prom_bin("promtool");
    let out =
        run_ok(Command::new(&promtool).arg("check").arg("rules").arg(dir.join("alerts.yml")), Duration::from_secs(60));
    assert!(String::from_utf8_lossy(&out.stdout).contains("SUCCESS: 6 rules found"), "{out:?}");
    // Unit tests: an expected resync fires nothing, a stalled one does.
    run_ok(
        Command::new(&promtool).current_dir(&dir).args(["test", "rules", "alerts_test.yml"]),
        Duration::from_secs(60),
    );
}

#[test]
fn metrics_port_taken_stops_repd_with_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let mut pair = Pair::new(PairOpts::new("C").metrics());
    pair.alpha.metrics_port = Some(port);
    let text = pair.config_text(&pair.default_top());
    std::fs::write(&pair.alpha.config, text).expect("config");
    pair.alpha.create_md();
    let out = run_timeout(
        Command::new(common::REPD).arg("--config").arg(&pair.alpha.config).arg("--node").arg("alpha"),
        Duration::from_secs(60),
    );
    assert!(!out.status.success(), "repd started on a taken metrics port");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("cannot bind the metrics address 127.0.0.1:{port}")), "{err}");
}
