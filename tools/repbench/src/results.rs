//! The results of a run: what `results/<timestamp>.json` holds, the
//! markdown table and the judged targets (ratios) computed from it.
//!
//! ```text
//! Run
//! ├── machine, git_commit, args, config (workloads in full, RTTs, timing)
//! ├── targets[]   label, kind, notes
//! └── cells[]     one per (workload, target, RTT)
//!     ├── rounds[]   summary of each round + CPU seconds / peak RSS of each server process
//!     ├── median     per field, the median over the rounds
//!     └── cdf[]      [percentile, µs] of all rounds' latencies merged
//! ```
//!
//! Latencies are in microseconds, IOPS per second, MB/s in 10^6 bytes.

use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::loadgen::Measurement;
use crate::sysinfo::Machine;
use crate::targets::Kind;
use crate::workload::Workload;

/// Version of the JSON layout.
pub const FORMAT_VERSION: u32 = 1;

/// Latency and throughput of one round (or the medians of several).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub ops: u64,
    pub window_s: f64,
    pub iops: f64,
    pub mb_per_s: f64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

impl Summary {
    pub fn of(m: &Measurement) -> Summary {
        let h = &m.hist;
        let q = |p: f64| if h.is_empty() { 0.0 } else { us(h.value_at_quantile(p)) };
        Summary {
            ops: m.ops,
            window_s: m.window.as_secs_f64(),
            iops: m.iops(),
            mb_per_s: m.mb_per_s(),
            mean_us: if h.is_empty() { 0.0 } else { h.mean() / 1000.0 },
            p50_us: q(0.50),
            p90_us: q(0.90),
            p99_us: q(0.99),
            p999_us: q(0.999),
            max_us: if h.is_empty() { 0.0 } else { us(h.max()) },
        }
    }

    /// Field by field median of `rounds`.
    pub fn median(rounds: &[Summary]) -> Summary {
        let m = |f: fn(&Summary) -> f64| median(rounds.iter().map(f).collect());
        Summary {
            ops: median(rounds.iter().map(|s| s.ops as f64).collect()) as u64,
            window_s: m(|s| s.window_s),
            iops: m(|s| s.iops),
            mb_per_s: m(|s| s.mb_per_s),
            mean_us: m(|s| s.mean_us),
            p50_us: m(|s| s.p50_us),
            p90_us: m(|s| s.p90_us),
            p99_us: m(|s| s.p99_us),
            p999_us: m(|s| s.p999_us),
            max_us: m(|s| s.max_us),
        }
    }
}

/// The median (mean of the middle two for an even count; 0 when empty).
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

/// Percentiles at which the CDF is sampled.
pub fn cdf_points() -> Vec<f64> {
    let mut p: Vec<f64> = (0..99).map(f64::from).collect();
    p.extend((990..1000).map(|x| f64::from(x) / 10.0));
    p.extend((9991..10000).map(|x| f64::from(x) / 100.0));
    p.push(100.0);
    p
}

/// `[percentile, µs]` pairs of `h`.
pub fn cdf(h: &Histogram<u64>) -> Vec<[f64; 2]> {
    if h.is_empty() {
        return Vec::new();
    }
    cdf_points().into_iter().map(|p| [p, us(h.value_at_quantile(p / 100.0))]).collect()
}

/// CPU time and peak memory of one server process during one round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcUsage {
    /// `primary`, `secondary` or `server`.
    pub role: String,
    pub cpu_s: f64,
    /// VmHWM at the end of the round (peak since the process started).
    pub peak_rss_kib: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Round {
    pub round: usize,
    pub summary: Summary,
    pub procs: Vec<ProcUsage>,
}

/// One (workload, target, RTT).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cell {
    pub workload: String,
    /// `repblock`, `A@1ms`, `qemu-nbd`, …
    pub target: String,
    pub kind: Kind,
    /// Replication RTT; none for unreplicated targets.
    pub rtt_ms: Option<f64>,
    pub rounds: Vec<Round>,
    pub median: Summary,
    /// Per process role, the median over rounds of its CPU seconds.
    pub cpu_s: Vec<(String, f64)>,
    /// Per process role, the largest peak RSS seen (KiB).
    pub peak_rss_kib: Vec<(String, u64)>,
    pub cdf: Vec<[f64; 2]>,
}

impl Cell {
    /// Fills `median`, `cpu_s`, `peak_rss_kib` from the rounds.
    pub fn aggregate(&mut self) {
        self.median = Summary::median(&self.rounds.iter().map(|r| r.summary.clone()).collect::<Vec<_>>());
        let mut roles: Vec<String> = Vec::new();
        for r in &self.rounds {
            for p in &r.procs {
                if !roles.contains(&p.role) {
                    roles.push(p.role.clone());
                }
            }
        }
        let of = |role: &String| -> Vec<&ProcUsage> {
            self.rounds.iter().flat_map(|r| r.procs.iter()).filter(|p| &p.role == role).collect()
        };
        self.cpu_s =
            roles.iter().map(|role| (role.clone(), median(of(role).iter().map(|p| p.cpu_s).collect()))).collect();
        self.peak_rss_kib = roles
            .iter()
            .map(|role| (role.clone(), of(role).iter().map(|p| p.peak_rss_kib).max().unwrap_or(0)))
            .collect();
    }

    pub fn rtt_ms_or_zero(&self) -> f64 {
        self.rtt_ms.unwrap_or(0.0)
    }
}

/// A started target, as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetInfo {
    pub kind: Kind,
    /// `repblock`, `C`, `qemu-nbd`, or an external node's name.
    #[serde(default)]
    pub label: String,
    pub notes: String,
}

/// How the run was configured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    pub workloads: Vec<Workload>,
    pub rtts_ms: Vec<f64>,
    pub protocols: Vec<String>,
    pub peers: Vec<String>,
    pub warmup_s: f64,
    pub duration_s: f64,
    pub ops: Option<u64>,
    pub rounds: usize,
    pub region_bytes: u64,
    pub seed: u64,
    pub prefilled: bool,
    pub repd: String,
    pub repd_extra_config: String,
    /// Existing nodes measured (`NAME=URI`).
    #[serde(default)]
    pub nodes: Vec<String>,
}

/// A whole run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Run {
    pub format_version: u32,
    pub started: String,
    pub finished: String,
    pub args: Vec<String>,
    pub git_commit: String,
    pub machine: Machine,
    pub config: RunConfig,
    pub targets: Vec<TargetInfo>,
    /// Targets asked for but not run, and why.
    pub skipped: Vec<String>,
    pub cells: Vec<Cell>,
}

/// One of the benchmark targets (docs/benchmarks.md, "Judged targets"), judged from the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Check {
    pub what: String,
    pub value: Option<f64>,
    /// `>= 0.8`, `<= 1.3`, …
    pub goal: String,
    pub met: Option<bool>,
    pub detail: String,
}

impl Run {
    pub fn cell(&self, workload: &str, kind: Kind, rtt_ms: Option<f64>) -> Option<&Cell> {
        self.cells.iter().find(|c| {
            c.workload == workload
                && c.kind == kind
                && match (c.rtt_ms, rtt_ms) {
                    (Some(a), Some(b)) => (a - b).abs() < 1e-9,
                    (None, None) => true,
                    _ => false,
                }
        })
    }

    /// The physical floor of `workload` at `rtt_ms`: RTT + the local
    /// file's median p50, in µs.
    pub fn floor_us(&self, workload: &str, rtt_ms: f64) -> Option<f64> {
        self.cell(workload, Kind::File, None).map(|f| rtt_ms * 1000.0 + f.median.p50_us)
    }

    /// The issue's targets, as ratios.
    pub fn checks(&self) -> Vec<Check> {
        let mut out = Vec::new();
        let lowest =
            self.config.rtts_ms.iter().copied().fold(None, |m: Option<f64>, r| Some(m.map_or(r, |m| m.min(r))));
        for wl in ["qd1-write-flush", "qd32-randwrite"] {
            let (c, q) = (lowest.and_then(|r| self.cell(wl, Kind::C, Some(r))), self.cell(wl, Kind::QemuNbd, None));
            let value = match (c, q) {
                (Some(c), Some(q)) if q.median.iops > 0.0 => Some(c.median.iops / q.median.iops),
                _ => None,
            };
            out.push(Check {
                what: format!("C IOPS / qemu-nbd IOPS, {wl}, RTT {}", fmt_rtt(lowest)),
                value,
                goal: ">= 0.8".into(),
                met: value.map(|v| v >= 0.8),
                detail: match (c, q) {
                    (Some(c), Some(q)) => format!("{:.0} vs {:.0} IOPS", c.median.iops, q.median.iops),
                    _ => "not measured (needs protocol C and qemu-nbd in the run)".into(),
                },
            });
        }
        for rtt in [1.0, 5.0] {
            let c = self.cell("qd1-write-flush", Kind::C, Some(rtt));
            let floor = self.floor_us("qd1-write-flush", rtt);
            let value = match (c, floor) {
                (Some(c), Some(f)) if f > 0.0 => Some(c.median.p50_us / f),
                _ => None,
            };
            out.push(Check {
                what: format!("C p50 / (RTT + local fdatasync p50), qd1-write-flush, RTT {rtt} ms"),
                value,
                goal: "<= 1.3".into(),
                met: value.map(|v| v <= 1.3),
                detail: match (c, floor) {
                    (Some(c), Some(f)) => format!("{:.0} µs vs floor {:.0} µs", c.median.p50_us, f),
                    _ => format!("not measured (needs C at {rtt} ms and the file target)"),
                },
            });
        }
        let a: Vec<&Cell> = self.cells.iter().filter(|c| c.workload == "qd1-write" && c.kind == Kind::A).collect();
        let lo = a.iter().min_by(|x, y| x.rtt_ms_or_zero().total_cmp(&y.rtt_ms_or_zero()));
        let hi = a.iter().max_by(|x, y| x.rtt_ms_or_zero().total_cmp(&y.rtt_ms_or_zero()));
        let value = match (lo, hi) {
            (Some(lo), Some(hi)) if lo.target != hi.target && lo.median.p50_us > 0.0 => {
                Some(hi.median.p50_us / lo.median.p50_us)
            }
            _ => None,
        };
        out.push(Check {
            what: "A qd1-write p50 at the highest RTT / at the lowest (independent of RTT)".into(),
            value,
            goal: "~1 (<= 1.3)".into(),
            met: value.map(|v| v <= 1.3),
            detail: match (lo, hi) {
                (Some(lo), Some(hi)) if lo.target != hi.target => format!(
                    "{:.0} µs at {} vs {:.0} µs at {}",
                    hi.median.p50_us, hi.target, lo.median.p50_us, lo.target
                ),
                _ => "not measured (needs protocol A at two RTTs)".into(),
            },
        });
        out
    }

    /// One line per workload with its headline number (p50 for QD1, IOPS
    /// for QD32 and mixed, MB/s for sequential) for every target, the RTTs
    /// of a protocol side by side: the table docs/benchmarks.md quotes.
    pub fn overview(&self) -> String {
        let rtts = &self.config.rtts_ms;
        let mut columns: Vec<(String, Kind)> = Vec::new();
        for k in [Kind::Standalone, Kind::QemuNbd, Kind::Nbdkit, Kind::File, Kind::External, Kind::A, Kind::B, Kind::C]
        {
            for c in self.cells.iter().filter(|c| c.kind == k) {
                let name = if k.replicated() {
                    format!("{} @ {} ms", k.name(), rtts.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(" / "))
                } else {
                    c.target.clone()
                };
                if !columns.iter().any(|(n, _)| *n == name) {
                    columns.push((name, k));
                }
            }
        }
        if columns.is_empty() {
            return String::new();
        }
        let mut s = String::from("### Overview (medians)\n\n| workload |");
        for (name, _) in &columns {
            let _ = write!(s, " {name} |");
        }
        s.push_str("\n|---|");
        s.push_str(&"---:|".repeat(columns.len()));
        s.push('\n');
        for wl in &self.config.workloads {
            let (what, value): (&str, fn(&Summary) -> f64) = if wl.pattern == crate::workload::Pattern::Sequential {
                ("MB/s", |m| m.mb_per_s)
            } else if wl.total_depth() == 1 {
                ("p50 µs", |m| m.p50_us)
            } else {
                ("IOPS", |m| m.iops)
            };
            let _ = write!(s, "| {} {what} |", wl.name);
            for (name, k) in &columns {
                let cells: Vec<&Cell> = self
                    .cells
                    .iter()
                    .filter(|c| c.workload == wl.name && c.kind == *k && (k.replicated() || c.target == *name))
                    .collect();
                let mut v: Vec<String> = Vec::new();
                if k.replicated() {
                    for r in rtts {
                        let c = cells.iter().find(|c| c.rtt_ms.is_some_and(|x| (x - r).abs() < 1e-9));
                        v.push(c.map(|c| format!("{:.0}", value(&c.median))).unwrap_or_else(|| "—".into()));
                    }
                } else {
                    v.extend(cells.first().map(|c| format!("{:.0}", value(&c.median))));
                }
                let _ = write!(s, " {} |", if v.is_empty() { "—".to_string() } else { v.join(" / ") });
            }
            s.push('\n');
        }
        s.push('\n');
        s
    }

    /// The results as markdown: one table per workload, then the checks.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let m = &self.machine;
        let _ = writeln!(
            s,
            "repbench run of {} (commit {}), {} × {} cores, kernel {}, work dir on {} ({})\n",
            self.started,
            short(&self.git_commit),
            m.cpu_model,
            m.cores,
            m.kernel,
            m.work_dir_fs,
            m.work_dir_device
        );
        let c = &self.config;
        let _ = writeln!(
            s,
            "{} round(s) per cell, {} s warm-up + {} per round, region {} MiB, seed {}; every value is the median over the rounds.\n",
            c.rounds,
            c.warmup_s,
            c.ops.map(|o| format!("{o} ops")).unwrap_or_else(|| format!("{} s", c.duration_s)),
            c.region_bytes >> 20,
            c.seed
        );
        s.push_str(&self.overview());
        for wl in &c.workloads {
            let cells: Vec<&Cell> = self.cells.iter().filter(|x| x.workload == wl.name).collect();
            if cells.is_empty() {
                continue;
            }
            let qemu = self.cell(&wl.name, Kind::QemuNbd, None).map(|q| q.median.iops);
            let _ = writeln!(s, "### {} — {}\n", wl.name, wl.description);
            s.push_str(
                "| target | IOPS | MB/s | p50 µs | p90 µs | p99 µs | p99.9 µs | max µs | CPU s (repd / server) | peak RSS MiB | IOPS vs qemu-nbd | p50 vs RTT + file p50 |\n",
            );
            s.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
            for x in cells {
                let md = &x.median;
                let cpu = x.cpu_s.iter().map(|(r, v)| format!("{}{v:.2}", role_tag(r))).collect::<Vec<_>>().join(" / ");
                let rss = x
                    .peak_rss_kib
                    .iter()
                    .map(|(r, v)| format!("{}{:.0}", role_tag(r), *v as f64 / 1024.0))
                    .collect::<Vec<_>>()
                    .join(" / ");
                let vs_qemu = match qemu {
                    Some(q) if q > 0.0 && x.kind != Kind::QemuNbd => format!("{:.2}×", md.iops / q),
                    _ => "—".into(),
                };
                // The floor is defined for a durable write: RTT + the
                // local file's write + fdatasync.
                let floor = wl.flush.durable().then(|| self.floor_us(&wl.name, x.rtt_ms_or_zero())).flatten();
                let vs_floor = match floor {
                    Some(f) if f > 0.0 && x.kind != Kind::File => format!("{:.2}×", md.p50_us / f),
                    _ => "—".into(),
                };
                let _ = writeln!(
                    s,
                    "| {} | {:.0} | {:.1} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {} | {} | {} |",
                    x.target,
                    md.iops,
                    md.mb_per_s,
                    md.p50_us,
                    md.p90_us,
                    md.p99_us,
                    md.p999_us,
                    md.max_us,
                    if cpu.is_empty() { "—".into() } else { cpu },
                    if rss.is_empty() { "—".into() } else { rss },
                    vs_qemu,
                    vs_floor
                );
            }
            s.push('\n');
        }
        s.push_str("### Targets (issue 5)\n\n| check | value | goal | met | detail |\n|---|---:|---|---|---|\n");
        for ch in self.checks() {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} |",
                ch.what,
                ch.value.map(|v| format!("{v:.2}")).unwrap_or_else(|| "—".into()),
                ch.goal,
                match ch.met {
                    Some(true) => "yes",
                    Some(false) => "**no**",
                    None => "—",
                },
                ch.detail
            );
        }
        if !self.skipped.is_empty() {
            let _ = writeln!(s, "\nNot run: {}", self.skipped.join("; "));
        }
        s
    }
}

fn role_tag(role: &str) -> &'static str {
    match role {
        "primary" => "P ",
        "secondary" => "S ",
        _ => "",
    }
}

fn short(commit: &str) -> &str {
    commit.get(..12).unwrap_or(commit)
}

/// `0 ms`, `1 ms`, `0.5 ms`, or `—`.
pub fn fmt_rtt(rtt_ms: Option<f64>) -> String {
    match rtt_ms {
        Some(r) => format!("{r} ms"),
        None => "—".into(),
    }
}

/// The label of a target at an RTT: `repblock`, `C@1ms`, `qemu-nbd`.
pub fn label(kind: Kind, rtt_ms: Option<f64>) -> String {
    match rtt_ms {
        Some(r) if kind.replicated() => format!("{}@{}ms", kind.name(), r),
        _ => kind.name().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(vec![]), 0.0);
    }

    #[test]
    fn cdf_points_are_increasing_and_end_at_100() {
        let p = cdf_points();
        assert!(p.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(p.last(), Some(&100.0));
        let mut h = crate::loadgen::new_histogram();
        for v in 1..=1000u64 {
            h.record(v * 1000).expect("record");
        }
        let c = cdf(&h);
        assert!(c.windows(2).all(|w| w[0][1] <= w[1][1]), "CDF must not decrease");
        assert!((c.last().expect("points")[1] - 1000.0).abs() < 1.0);
    }

    fn cell(workload: &str, kind: Kind, rtt_ms: Option<f64>, iops: f64, p50_us: f64) -> Cell {
        let mut c = Cell {
            workload: workload.into(),
            target: label(kind, rtt_ms),
            kind,
            rtt_ms,
            rounds: vec![Round {
                round: 0,
                summary: Summary { ops: 10, iops, p50_us, ..Summary::default() },
                procs: vec![ProcUsage { role: "primary".into(), cpu_s: 0.5, peak_rss_kib: 2048 }],
            }],
            median: Summary::default(),
            cpu_s: Vec::new(),
            peak_rss_kib: Vec::new(),
            cdf: Vec::new(),
        };
        c.aggregate();
        c
    }

    fn run(cells: Vec<Cell>) -> Run {
        Run {
            format_version: FORMAT_VERSION,
            started: "2026-01-01T00:00:00Z".into(),
            finished: "2026-01-01T00:05:00Z".into(),
            args: Vec::new(),
            git_commit: "abc".into(),
            machine: Machine::default(),
            config: RunConfig {
                workloads: ["qd1-write", "qd1-write-flush", "qd32-randwrite"]
                    .iter()
                    .filter_map(|n| crate::workload::builtin(n))
                    .collect(),
                rtts_ms: vec![0.0, 1.0, 5.0],
                protocols: vec!["A".into(), "C".into()],
                peers: vec![],
                warmup_s: 0.2,
                duration_s: 1.0,
                ops: None,
                rounds: 1,
                region_bytes: 1 << 28,
                seed: 1,
                prefilled: false,
                repd: String::new(),
                repd_extra_config: String::new(),
                nodes: Vec::new(),
            },
            targets: Vec::new(),
            skipped: Vec::new(),
            cells,
        }
    }

    #[test]
    fn checks_are_the_issue_targets_as_ratios() {
        let w = "qd1-write-flush";
        let r = run(vec![
            cell(w, Kind::QemuNbd, None, 1000.0, 100.0),
            cell(w, Kind::File, None, 5000.0, 200.0),
            cell(w, Kind::C, Some(0.0), 850.0, 300.0),
            cell(w, Kind::C, Some(1.0), 400.0, 1440.0),
            cell(w, Kind::C, Some(5.0), 100.0, 7000.0),
            cell("qd32-randwrite", Kind::C, Some(0.0), 7000.0, 1.0),
            cell("qd32-randwrite", Kind::QemuNbd, None, 10000.0, 1.0),
            cell("qd1-write", Kind::A, Some(0.0), 1.0, 100.0),
            cell("qd1-write", Kind::A, Some(5.0), 1.0, 110.0),
        ]);
        let c = r.checks();
        let v: Vec<(Option<f64>, Option<bool>)> =
            c.iter().map(|c| (c.value.map(|v| (v * 1000.0).round() / 1000.0), c.met)).collect();
        assert_eq!(
            v,
            [
                (Some(0.85), Some(true)),   // 850 / 1000 IOPS
                (Some(0.7), Some(false)),   // 7000 / 10000 IOPS
                (Some(1.2), Some(true)),    // 1440 / (1000 + 200)
                (Some(1.346), Some(false)), // 7000 / (5000 + 200)
                (Some(1.1), Some(true)),    // A: 110 / 100
            ]
        );
        let md = r.markdown();
        assert!(md.contains("| C@1ms | 400 |"), "{md}");
        assert!(
            md.contains("| qd1-write-flush p50 µs | 100 | 200 | — / — / — | 300 / 1440 / 7000 |"),
            "overview:\n{md}"
        );
        assert!(md.contains("| qd32-randwrite IOPS | 10000 | — | — / — / — | 7000 / — / — |"), "overview:\n{md}");
        assert!(md.contains("1.20×"), "p50 vs floor column:\n{md}");
        assert!(md.contains("| P 0.50 | P 2 |"), "CPU and RSS columns:\n{md}");
    }

    #[test]
    fn checks_without_the_cells_say_what_is_missing() {
        let c = run(Vec::new()).checks();
        assert_eq!(c.len(), 5);
        assert!(c.iter().all(|c| c.value.is_none() && c.met.is_none() && c.detail.contains("not measured")));
    }

    #[test]
    fn labels() {
        assert_eq!(label(Kind::C, Some(1.0)), "C@1ms");
        assert_eq!(label(Kind::A, Some(0.5)), "A@0.5ms");
        assert_eq!(label(Kind::QemuNbd, None), "qemu-nbd");
    }
}
