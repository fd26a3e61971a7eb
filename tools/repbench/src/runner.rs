//! `repbench run`: starts every target once, then runs the matrix
//! workload by workload; inside a workload, round by round; inside a round,
//! every (target, RTT) once, the order reversed on odd rounds (A B C, C B A,
//! …) so that the targets share the machine's drift. Each cell's value is
//! the median over its rounds.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use indicatif::{ProgressBar, ProgressStyle};
use tracing::warn;

use crate::loadgen::{self, Measurement, Plan};
use crate::results::{self, Cell, ProcUsage, Round, Run, RunConfig, Summary, TargetInfo};
use crate::sysinfo;
use crate::targets::{Deployment, Kind, Launcher, Tools, on_path};
use crate::workload::Workload;

/// Errors of a run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Target(#[from] crate::targets::TargetError),
    #[error("{workload} against {target}")]
    Load {
        workload: String,
        target: String,
        #[source]
        source: loadgen::LoadError,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Nothing to run: {0}")]
    Empty(String),
    #[error("Interrupted (Ctrl-C): the servers are stopped and the work directory removed; no results written")]
    Interrupted,
}

/// Set by Ctrl-C; the run stops at the next cell boundary.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

fn interrupted() -> Result<(), RunError> {
    if INTERRUPTED.load(Ordering::Relaxed) { Err(RunError::Interrupted) } else { Ok(()) }
}

/// What `repbench run` was asked.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub workloads: Vec<Workload>,
    pub rtts: Vec<Duration>,
    pub protocols: Vec<Kind>,
    /// Unreplicated targets: standalone repblock, qemu-nbd, nbdkit, file.
    pub peers: Vec<Kind>,
    pub warmup: Duration,
    pub duration: Duration,
    pub ops: Option<u64>,
    pub rounds: usize,
    pub region: u64,
    pub seed: u64,
    pub repd: Option<PathBuf>,
    pub repd_extra: String,
    /// Existing nodes (`NAME=URI`), measured as they are.
    pub nodes: Vec<String>,
    /// Directory the temporary work directory is made in.
    pub work_parent: PathBuf,
    pub out: PathBuf,
    pub progress: bool,
    pub args: Vec<String>,
}

/// One column of the matrix: a target at an RTT.
struct Column {
    target: usize,
    rtt: Option<Duration>,
}

fn rtt_ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Runs the matrix; returns the run and the path of its JSON file.
pub fn run(opts: &RunOptions) -> Result<(Run, PathBuf), RunError> {
    let started = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let io = |what: &str| {
        let what = what.to_string();
        move |source| RunError::Io { what, source }
    };
    std::fs::create_dir_all(&opts.work_parent).map_err(io("creating the work directory's parent"))?;
    let work = tempfile::Builder::new()
        .prefix("repbench-")
        .tempdir_in(&opts.work_parent)
        .map_err(io("creating the work directory"))?;
    let machine = sysinfo::machine(work.path());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(io("starting the async runtime"))?;
    rt.spawn(async {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("repbench: interrupted, stopping after the current cell");
            INTERRUPTED.store(true, Ordering::Relaxed);
        }
    });

    let needs_repd = !opts.protocols.is_empty() || opts.peers.contains(&Kind::Standalone);
    let tools = if needs_repd { Some(Tools::locate(opts.repd.as_deref())?) } else { None };
    let launcher = Launcher {
        tools: tools.as_ref(),
        dir: work.path(),
        size: opts.region,
        rt: rt.handle(),
        repd_extra: &opts.repd_extra,
    };

    // Start every target once.
    let mut skipped = Vec::new();
    let mut kinds: Vec<Kind> = Vec::new();
    for &k in opts.peers.iter().chain(&opts.protocols) {
        let tool = match k {
            Kind::QemuNbd => Some("qemu-nbd"),
            Kind::Nbdkit => Some("nbdkit"),
            _ => None,
        };
        if let Some(t) = tool.filter(|t| !on_path(t)) {
            skipped.push(format!("{t}: not installed"));
            continue;
        }
        if !kinds.contains(&k) {
            kinds.push(k);
        }
    }
    if (kinds.is_empty() && opts.nodes.is_empty()) || opts.workloads.is_empty() {
        return Err(RunError::Empty("no target or no workload".into()));
    }
    let spinner = |msg: String| {
        let pb = if opts.progress { ProgressBar::new_spinner() } else { ProgressBar::hidden() };
        pb.set_message(msg);
        pb.enable_steady_tick(Duration::from_millis(120));
        pb
    };
    let mut deployments: Vec<Deployment> = Vec::new();
    for k in kinds {
        interrupted()?;
        let pb = spinner(format!("starting {}", k.name()));
        match launcher.start(k) {
            Ok(d) => deployments.push(d),
            // A peer that does not start (an old qemu-nbd, a missing nbdkit
            // plugin) is left out, and the results say why; repblock's own
            // targets must start.
            Err(e) if matches!(k, Kind::QemuNbd | Kind::Nbdkit) => {
                warn!(target = k.name(), error = %e, "peer left out");
                eprintln!("repbench: {} left out: {e}", k.name());
                skipped.push(format!("{}: {e}", k.name()));
            }
            Err(e) => return Err(e.into()),
        }
        pb.finish_and_clear();
    }
    for spec in &opts.nodes {
        deployments.push(crate::targets::external(spec)?);
    }
    if deployments.is_empty() {
        return Err(RunError::Empty("no target started".into()));
    }

    // Prefill the region once when a workload reads, so that reads hit
    // written blocks everywhere (a fresh repd volume or a fresh file would
    // otherwise answer reads of holes).
    let prefill = opts.workloads.iter().any(Workload::reads);
    if prefill {
        let seq = crate::workload::builtin("seq1m-write").ok_or_else(|| RunError::Empty("seq1m-write".into()))?;
        let block = u64::from(seq.block_size).min(opts.region);
        let fill = Workload { block_size: block as u32, ..seq };
        let plan = Plan {
            warmup: Duration::ZERO,
            duration: Duration::ZERO,
            ops: Some(opts.region / block),
            region: opts.region,
            seed: opts.seed,
        };
        for d in &deployments {
            interrupted()?;
            let pb = spinner(format!("prefilling {}", d.kind.name()));
            d.set_rtt(Duration::ZERO);
            measure(&rt, d, &fill, &plan).map_err(|source| RunError::Load {
                workload: "prefill".into(),
                target: d.kind.name().into(),
                source,
            })?;
            pb.finish_and_clear();
        }
    }

    let mut columns = Vec::new();
    for (i, d) in deployments.iter().enumerate() {
        if d.kind.replicated() {
            columns.extend(opts.rtts.iter().map(|&r| Column { target: i, rtt: Some(r) }));
        } else {
            columns.push(Column { target: i, rtt: None });
        }
    }
    let plan =
        Plan { warmup: opts.warmup, duration: opts.duration, ops: opts.ops, region: opts.region, seed: opts.seed };
    let total = (opts.workloads.len() * opts.rounds * columns.len()) as u64;
    let pb = if opts.progress { ProgressBar::new(total) } else { ProgressBar::hidden() };
    pb.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} cells, ETA {eta} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );

    let mut cells = Vec::new();
    for wl in &opts.workloads {
        let mut wl_cells: Vec<Cell> = columns
            .iter()
            .map(|c| {
                let d = &deployments[c.target];
                let (kind, r) = (d.kind, c.rtt.map(rtt_ms));
                Cell {
                    workload: wl.name.clone(),
                    target: d.label.clone().unwrap_or_else(|| results::label(kind, r)),
                    kind,
                    rtt_ms: r,
                    rounds: Vec::new(),
                    median: Summary::default(),
                    cpu_s: Vec::new(),
                    peak_rss_kib: Vec::new(),
                    cdf: Vec::new(),
                }
            })
            .collect();
        let mut merged: Vec<_> = columns.iter().map(|_| loadgen::new_histogram()).collect();
        for round in 0..opts.rounds {
            let order: Vec<usize> =
                if round % 2 == 0 { (0..columns.len()).collect() } else { (0..columns.len()).rev().collect() };
            for ci in order {
                interrupted()?;
                let col = &columns[ci];
                let d = &mut deployments[col.target];
                pb.set_message(format!("{} on {}", wl.name, wl_cells[ci].target));
                d.set_rtt(col.rtt.unwrap_or(Duration::ZERO));
                let procs = d.measured();
                let before: Vec<Option<f64>> = procs.iter().map(|p| sysinfo::cpu_seconds(p.pid)).collect();
                let round_plan = Plan { seed: plan.seed.wrapping_add(round as u64 * 7919), ..plan.clone() };
                let m = measure(&rt, d, wl, &round_plan).map_err(|source| RunError::Load {
                    workload: wl.name.clone(),
                    target: wl_cells[ci].target.clone(),
                    source,
                })?;
                let usage = procs
                    .iter()
                    .zip(before)
                    .map(|(p, b)| ProcUsage {
                        role: p.role.clone(),
                        cpu_s: match (b, sysinfo::cpu_seconds(p.pid)) {
                            (Some(b), Some(a)) => a - b,
                            _ => 0.0,
                        },
                        peak_rss_kib: sysinfo::peak_rss_kib(p.pid).unwrap_or(0),
                    })
                    .collect();
                d.check_running()?;
                if merged[ci].add(&m.hist).is_err() {
                    warn!("histograms of one cell have different bounds");
                }
                wl_cells[ci].rounds.push(Round { round, summary: Summary::of(&m), procs: usage });
                pb.inc(1);
            }
        }
        for (cell, h) in wl_cells.iter_mut().zip(&merged) {
            cell.aggregate();
            cell.cdf = results::cdf(h);
        }
        cells.extend(wl_cells);
    }
    pb.finish_and_clear();

    let config = RunConfig {
        workloads: opts.workloads.clone(),
        rtts_ms: opts.rtts.iter().map(|&r| rtt_ms(r)).collect(),
        protocols: opts.protocols.iter().map(|k| k.name().to_string()).collect(),
        peers: opts.peers.iter().map(|k| k.name().to_string()).collect(),
        warmup_s: opts.warmup.as_secs_f64(),
        duration_s: opts.duration.as_secs_f64(),
        ops: opts.ops,
        rounds: opts.rounds,
        region_bytes: opts.region,
        seed: opts.seed,
        prefilled: prefill,
        repd: tools.as_ref().map(|t| t.repd.display().to_string()).unwrap_or_default(),
        repd_extra_config: opts.repd_extra.clone(),
        nodes: opts.nodes.clone(),
    };
    let run = Run {
        format_version: results::FORMAT_VERSION,
        started: started.clone(),
        finished: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        args: opts.args.clone(),
        git_commit: sysinfo::git_commit(),
        machine,
        config,
        targets: deployments
            .iter()
            .map(|d| TargetInfo {
                kind: d.kind,
                label: d.label.clone().unwrap_or_else(|| d.kind.name().to_string()),
                notes: d.notes.clone(),
            })
            .collect(),
        skipped,
        cells,
    };
    drop(deployments);
    std::fs::create_dir_all(&opts.out).map_err(io("creating the results directory"))?;
    let path = opts.out.join(format!("{}.json", started.replace(':', "-")));
    let json = serde_json::to_string_pretty(&run)
        .map_err(|e| RunError::Io { what: "encoding the results".into(), source: std::io::Error::other(e) })?;
    std::fs::write(&path, json).map_err(io("writing the results"))?;
    Ok((run, path))
}

/// Runs one workload against one deployment.
pub fn measure(
    rt: &tokio::runtime::Runtime,
    d: &Deployment,
    wl: &Workload,
    plan: &Plan,
) -> Result<Measurement, loadgen::LoadError> {
    match (&d.nbd, &d.file) {
        (Some(addr), _) => rt.block_on(loadgen::run_nbd(addr, &d.export, wl, plan)),
        (None, Some(path)) => loadgen::run_file(path, wl, plan),
        (None, None) => {
            Err(loadgen::LoadError::Worker(format!("target {} has no NBD export and no file", d.kind.name())))
        }
    }
}
