//! `repbench`: repblock's benchmark suite (see docs/benchmarks.md).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use repbench::chaos::{self, ChaosOptions};
use repbench::crosscheck::{CrossOptions, crosscheck};
use repbench::loadgen::Plan;
use repbench::runner::{RunOptions, run};
use repbench::targets::Kind;
use repbench::workload;

#[derive(Parser, Debug)]
#[command(
    name = "repbench",
    version,
    about = "Benchmark repblock's replication protocols against qemu-nbd, nbdkit and the local file"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Debug, Clone)]
struct Timing {
    /// Measured time per cell and round (e.g. 1s, 500ms).
    #[arg(long)]
    duration: Option<String>,
    /// Unmeasured time before each cell's window.
    #[arg(long)]
    warmup: Option<String>,
    /// Measure this many operations per cell and round instead of a duration.
    #[arg(long)]
    ops: Option<u64>,
    /// Offsets fall in the first SIZE bytes; also the size of every volume and file.
    #[arg(long)]
    region: Option<String>,
    /// Seed of the offset generators.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// The repd binary (repctl must be beside it). Default: next to repbench.
    #[arg(long)]
    repd: Option<PathBuf>,
    /// Where the temporary work directory (volumes, files, logs) is made.
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    work_dir: PathBuf,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the matrix and write results/<timestamp>.json.
    Run {
        /// Short smoke mode: 300 ms per cell, 1 round, 16 MiB region.
        #[arg(long)]
        quick: bool,
        /// Replication RTTs (comma-separated), e.g. 0,1ms,5ms.
        #[arg(long, default_value = "0,1ms,5ms")]
        rtt: String,
        /// Replication protocols to measure (A,B,C; "none" for none).
        #[arg(long, default_value = "A,B,C")]
        protocols: String,
        /// Unreplicated targets: repblock (standalone), qemu-nbd, nbdkit, file ("none" for none).
        #[arg(long, default_value = "repblock,qemu-nbd,nbdkit,file")]
        peers: String,
        /// Workloads (comma-separated) or "all".
        #[arg(long, default_value = "all")]
        workloads: String,
        /// Rounds per cell (targets alternate within each round).
        #[arg(long)]
        rounds: Option<usize>,
        /// Requests in flight per connection, overriding each workload's.
        #[arg(long)]
        queue_depth: Option<usize>,
        /// What follows each write, overriding each workload's: none,
        /// flush (a FLUSH after every write) or fua (every write with FUA).
        #[arg(long)]
        flush: Option<String>,
        /// NBD connections per cell, overriding each workload's (1).
        #[arg(long)]
        connections: Option<usize>,
        /// Extra top-level line(s) for every repd config, e.g. 'io_engine = "sync"'.
        #[arg(long, default_value = "")]
        repd_config: String,
        /// Existing NBD exports to measure as well, NAME=URI
        /// (nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH), comma-separated.
        /// They are written to: never point this at data you keep.
        #[arg(long, value_delimiter = ',')]
        nodes: Vec<String>,
        /// Directory for the JSON results.
        #[arg(long, default_value = "results")]
        out: PathBuf,
        /// No progress bar.
        #[arg(long)]
        no_progress: bool,
        #[command(flatten)]
        timing: Timing,
    },
    /// Markdown table and SVG charts of a run.
    Report {
        /// A results/<timestamp>.json file.
        run: PathBuf,
        /// Write results.md and the charts here (default: print the table only).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Fault campaign: N seeded cycles of faults on a real repd pair under a
    /// verifying workload (docs/reliability.md). Exit 1 on any violation.
    Chaos {
        /// Seed of the fault sequence: the same seed and cycles replay the same faults.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value_t = 20)]
        cycles: u64,
        /// Number of the first cycle (`--first-cycle K --cycles 1` replays cycle K's plan on a fresh pair).
        #[arg(long, default_value_t = 0)]
        first_cycle: u64,
        /// Replication protocol: A, B or C.
        #[arg(long, default_value = "C")]
        protocol: String,
        /// Fault kinds (comma-separated) or "all" (every kind but power-cut-primary).
        #[arg(long, default_value = "all")]
        faults: String,
        /// Also cut the primary's power. The known power-loss gap (issue 15 part 1) is not closed:
        /// a block that differs from the peer without a dirty bit is counted as "known gap" and
        /// repaired with `repctl verify`, not as a violation.
        #[arg(long)]
        power_cut_primary: bool,
        /// Run no disk faults (disk full, power cut): for a repd built without fault injection.
        #[arg(long)]
        no_disk_faults: bool,
        /// The pair must be back in sync within this after each fault.
        #[arg(long, default_value = "30s")]
        sync_bound: String,
        /// `repctl verify` every N cycles (0: only at the end).
        #[arg(long, default_value_t = 10)]
        verify_every: u64,
        /// Go on after a violation.
        #[arg(long)]
        keep_going: bool,
        /// Keep the work directory (logs, data) even when everything passed.
        #[arg(long)]
        keep: bool,
        /// Where to write the JSON summary.
        #[arg(long, default_value = "chaos-summary.json")]
        out: PathBuf,
        /// No line per cycle.
        #[arg(long)]
        quiet: bool,
        /// Self-test of the checks: damage the data on purpose in the first cycle (a durable
        /// write set back, a byte of the secondary's file changed); the run must fail.
        #[arg(long, hide = true)]
        sabotage: bool,
        /// The repd binary (repctl must be beside it). Default: next to repbench.
        #[arg(long)]
        repd: Option<PathBuf>,
        /// Where the temporary work directory is made.
        #[arg(long, default_value_os_t = std::env::temp_dir())]
        work_dir: PathBuf,
    },
    /// Compare the load generator with fio's nbd engine on one export.
    Crosscheck {
        /// Target: repblock, A, B, C, qemu-nbd or nbdkit.
        #[arg(long, default_value = "C")]
        target: String,
        #[arg(long, default_value = "qd32-randwrite")]
        workload: String,
        /// Replication RTT of a replicated target.
        #[arg(long, default_value = "0")]
        rtt: String,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        #[command(flatten)]
        timing: Timing,
    },
    /// The cost of TLS (docs/tls.md): one repd pair each plain, with TLS on the NBD export, on the
    /// replication link, and on both; QD1 write latency, QD32 random write and 1 MiB sequential
    /// throughput with fio's nbd engine, alternating rounds, in one run.
    Tls {
        /// Replication protocol of the pairs: A, B or C.
        #[arg(long, default_value = "C")]
        protocol: String,
        /// Replication RTT (the delay proxy).
        #[arg(long, default_value = "0")]
        rtt: String,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Where to write the JSON results.
        #[arg(long, default_value = "results/tls.json")]
        out: PathBuf,
        #[command(flatten)]
        timing: Timing,
    },
}

fn dur(s: &str) -> anyhow::Result<Duration> {
    repblock::units::parse_duration(s)
        .with_context(|| format!("--duration/--warmup/--rtt: {s:?} is not a duration (examples: 0, 500us, 1ms, 2s)"))
}

fn plan(t: &Timing, quick: bool) -> anyhow::Result<Plan> {
    let (d, w, r) = if quick { ("300ms", "100ms", "16MiB") } else { ("1s", "200ms", "256MiB") };
    let region = repblock::units::parse_size(t.region.as_deref().unwrap_or(r)).context("--region")?;
    if region < 1 << 20 || region % (1 << 20) != 0 {
        bail!("--region must be a non-zero multiple of 1 MiB (got {region} bytes)");
    }
    if t.ops == Some(0) {
        bail!("--ops must be at least 1");
    }
    let duration = dur(t.duration.as_deref().unwrap_or(d))?;
    if duration.is_zero() && t.ops.is_none() {
        bail!("--duration must be more than 0");
    }
    Ok(Plan { warmup: dur(t.warmup.as_deref().unwrap_or(w))?, duration, ops: t.ops, region, seed: t.seed })
}

fn list(s: &str) -> Vec<&str> {
    s.split(',').map(str::trim).filter(|x| !x.is_empty() && *x != "none").collect()
}

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("repbench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Run {
            quick,
            rtt,
            protocols,
            peers,
            workloads,
            rounds,
            queue_depth,
            flush,
            connections,
            repd_config,
            nodes,
            out,
            no_progress,
            timing,
        } => {
            let plan = plan(&timing, quick)?;
            let mut workloads = workload::parse_list(&workloads).map_err(anyhow::Error::msg).context("--workloads")?;
            let flush = flush
                .as_deref()
                .map(workload::FlushMode::parse)
                .transpose()
                .map_err(anyhow::Error::msg)
                .context("--flush")?;
            for w in &mut workloads {
                w.override_with(flush, queue_depth, connections);
            }
            let rtts = list(&rtt).into_iter().map(dur).collect::<anyhow::Result<Vec<_>>>()?;
            let protocols = list(&protocols)
                .into_iter()
                .map(|p| Kind::protocol(p).with_context(|| format!("--protocols: {p:?} is not A, B or C")))
                .collect::<anyhow::Result<Vec<_>>>()?;
            if !protocols.is_empty() && rtts.is_empty() {
                bail!("--rtt: give at least one RTT for the replicated targets");
            }
            let peers = list(&peers)
                .into_iter()
                .map(|p| {
                    Kind::peer(p).with_context(|| format!("--peers: {p:?} is not repblock, qemu-nbd, nbdkit or file"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let opts = RunOptions {
                workloads,
                rtts,
                protocols,
                peers,
                warmup: plan.warmup,
                duration: plan.duration,
                ops: plan.ops,
                rounds: rounds.unwrap_or(if quick { 1 } else { 3 }).max(1),
                region: plan.region,
                seed: plan.seed,
                repd: timing.repd.clone(),
                repd_extra: repd_config,
                nodes,
                work_parent: timing.work_dir.clone(),
                out,
                progress: !no_progress,
                args: std::env::args().collect(),
            };
            let (run, path) = run(&opts)?;
            println!("{}", run.markdown());
            println!("results: {}", path.display());
        }
        Cmd::Report { run, out } => {
            let r = repbench::report::load(&run)?;
            match out {
                Some(dir) => {
                    for f in repbench::report::write_all(&r, &dir)? {
                        println!("{}", f.display());
                    }
                }
                None => println!("{}", r.markdown()),
            }
        }
        Cmd::Chaos {
            seed,
            cycles,
            first_cycle,
            protocol,
            faults,
            power_cut_primary,
            no_disk_faults,
            sync_bound,
            verify_every,
            keep_going,
            keep,
            out,
            quiet,
            sabotage,
            repd,
            work_dir,
        } => {
            let mut opts = ChaosOptions::new(seed, cycles);
            opts.first_cycle = first_cycle;
            opts.protocol = Kind::protocol(&protocol)
                .with_context(|| format!("--protocol: {protocol:?} is not A, B or C"))?
                .name()
                .to_string();
            opts.disk_faults = !no_disk_faults;
            opts.faults = if faults.trim() == "all" {
                chaos::plan::default_faults(power_cut_primary, !no_disk_faults)
            } else {
                let mut v = list(&faults)
                    .into_iter()
                    .map(|f| chaos::plan::Fault::parse(f).with_context(|| format!("--faults: unknown fault {f:?}")))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                if power_cut_primary && !v.contains(&chaos::plan::Fault::PowerCutPrimary) {
                    v.push(chaos::plan::Fault::PowerCutPrimary);
                }
                v
            };
            opts.sync_bound = dur(&sync_bound)?;
            opts.verify_every = verify_every;
            opts.keep_going = keep_going;
            opts.keep = keep;
            opts.verbose = !quiet;
            opts.sabotage = sabotage;
            opts.repd = repd;
            opts.work_parent = work_dir;
            let summary = chaos::run(opts)?;
            std::fs::write(&out, serde_json::to_string_pretty(&summary)?)
                .with_context(|| format!("writing {}", out.display()))?;
            print!("{}", summary.text());
            println!("summary: {}", out.display());
            if let Some(dir) = &summary.work_dir {
                println!("work directory kept: {}", dir.display());
            }
            if !summary.passed() {
                bail!("the campaign found {} violation(s)", summary.violations.len());
            }
        }
        Cmd::Crosscheck { target, workload: wl, rtt, rounds, timing } => {
            let plan = plan(&timing, false)?;
            let kind = Kind::protocol(&target)
                .or_else(|| Kind::peer(&target).filter(|k| *k != Kind::File))
                .with_context(|| format!("--target: {target:?} is not repblock, A, B, C, qemu-nbd or nbdkit"))?;
            let workload = workload::builtin(&wl).with_context(|| format!("--workload: unknown workload {wl:?}"))?;
            let res = crosscheck(&CrossOptions {
                kind,
                rtt: dur(&rtt)?,
                workload,
                plan,
                rounds: rounds.max(1),
                repd: timing.repd.as_deref(),
                work_parent: &timing.work_dir,
            })?;
            println!("{}", res.report());
        }
        Cmd::Tls { protocol, rtt, rounds, out, timing } => {
            let plan = plan(&timing, false)?;
            let protocol =
                Kind::protocol(&protocol).with_context(|| format!("--protocol: {protocol:?} is not A, B or C"))?;
            let run = repbench::tls::run(&repbench::tls::TlsOptions {
                protocol,
                rtt: dur(&rtt)?,
                plan,
                rounds: rounds.max(1),
                repd: timing.repd.as_deref(),
                work_parent: &timing.work_dir,
            })?;
            if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            }
            std::fs::write(&out, serde_json::to_string_pretty(&run)?)
                .with_context(|| format!("writing {}", out.display()))?;
            println!("{}", run.markdown());
            println!("results: {}", out.display());
        }
    }
    Ok(())
}
