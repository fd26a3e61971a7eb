//! repctl: talks to a node's control socket (and runs the offline
//! `create-md`).
//!
//! Exit codes (docs/cli.md): 0 success; 1 refused or failed, with the
//! reason on stderr; 2 usage error; 3 repd cannot be reached (not running,
//! control socket error, no answer within --timeout).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser, Subcommand};
use repblock::config::Config;
use repblock::control::{self, ControlClient, DEFAULT_CLIENT_TIMEOUT, Request};
use repblock::model::{ConnState, DiskState, ReplState};
use repblock::node::Status;
use repblock::node::daemon;
use repblock::repl::engine::ProbeReport;

#[derive(Debug, Parser)]
#[command(name = "repctl", version, about = "Control one node of a repblock resource")]
#[command(after_help = EXIT_CODES)]
struct Cli {
    /// Resource configuration file (TOML). Required, except for `man` and `completions`.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The node to talk to (a [[node]] section of the config). Required, except for `man` and `completions`.
    #[arg(long, value_name = "NAME")]
    node: Option<String>,
    /// How long to wait for repd to answer, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = DEFAULT_CLIENT_TIMEOUT.as_secs_f64())]
    timeout: f64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Initialise the node's metadata (offline; refuses if present unless --force).
    CreateMd {
        /// Overwrite existing metadata (the data is lost).
        #[arg(long)]
        force: bool,
        /// Witness only: re-initialise at this term (the highest `term` of the data nodes' status)
        /// instead of the bootstrap term 0.
        #[arg(long, value_name = "TERM")]
        term: Option<u64>,
        /// Witness only, with --term: the data node serving now (the only one up to date).
        #[arg(long, value_name = "NODE", requires = "term")]
        primary: Option<String>,
    },
    /// Role, disk, connection, peer, out-of-sync bytes, resync progress.
    Status {
        /// One JSON object (the public contract, design.md §6; it always has `statistics`).
        #[arg(long)]
        json: bool,
        /// Also show counters: bytes and requests, pending/unacked, link bytes, buffer fill, WAL syncs.
        #[arg(long)]
        statistics: bool,
    },
    /// Become primary and export the volume over NBD.
    Promote {
        /// Even if the disk is not uptodate: this node's data becomes the truth.
        #[arg(long)]
        force: bool,
    },
    /// Become secondary (refuses while NBD clients are attached).
    Demote {
        /// Disconnect attached NBD clients.
        #[arg(long)]
        force: bool,
    },
    /// Start connecting to the peer again (after `disconnect` or a split brain).
    Connect {
        /// Resolve a split brain by throwing away this node's changes (one shot).
        #[arg(long)]
        discard_my_data: bool,
        /// Only say what a connect would do (no sync / source / target / split brain ...); change nothing.
        #[arg(long)]
        dry_run: bool,
        /// With --dry-run: print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Drop the link to the peer and stop dialing (standalone).
    Disconnect,
    /// Release writes held by `on_peer_loss = "suspend"` (the peer is resynced when it is back).
    ResumeIo,
    /// With --clear-bitmap: two connected, blank, inconsistent nodes become uptodate without a sync.
    NewCurrentUuid {
        /// Skip the initial sync (both volumes must be blank: never written).
        #[arg(long)]
        clear_bitmap: bool,
    },
    /// Compare every block with the peer by checksums, online; differing blocks are marked
    /// out of sync and resynced (the primary is the reference).
    Verify {
        /// Wait for the end and print the result (progress on stderr).
        #[arg(long)]
        wait: bool,
        /// Print the result as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Throw away this node's data: mark every block out of sync and take a full copy from the
    /// peer (refused on a primary).
    Invalidate,
    /// Wait until connected, established, and both disks uptodate (progress on stderr).
    WaitSync {
        /// Give up after this many seconds.
        #[arg(long, value_name = "SECONDS")]
        timeout: Option<f64>,
    },
    #[command(flatten)]
    Doc(repblock::clidoc::DocCommand),
    /// Stream state changes, one JSON object per line.
    Events {
        /// Also emit a `statistics` event (status `statistics` and LSNs) every --interval.
        #[arg(long)]
        statistics: bool,
        /// Seconds between `statistics` events.
        #[arg(long, value_name = "SECONDS", default_value_t = 1.0, requires = "statistics")]
        interval: f64,
    },
}

const EXIT_CODES: &str = "Exit codes: 0 success; 1 refused or failed (reason on stderr); 2 usage error; \
3 repd cannot be reached (not running, control socket error, no answer within --timeout).";

/// Exit code 3: repd cannot be reached.
const EXIT_UNREACHABLE: u8 = 3;

fn main() -> ExitCode {
    let cli = Cli::parse();
    repblock::node::systemd::init_logging("warn");
    if let Command::Doc(doc) = &cli.command {
        return match doc.run(Cli::command()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("repctl: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let (Some(config), Some(node)) = (cli.config.clone(), cli.node.clone()) else {
        Cli::command()
            .error(clap::error::ErrorKind::MissingRequiredArgument, "--config FILE and --node NAME are required")
            .exit()
    };
    match run(cli, config, node) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("repctl: {}", repblock::errors::render_chain(e.as_ref()));
            ExitCode::from(exit_code(&e))
        }
    }
}

/// 3 when the error is that repd cannot be reached, 1 otherwise.
fn exit_code(e: &anyhow::Error) -> u8 {
    use repblock::control::ControlError;
    let unreachable = e.chain().any(|c| {
        matches!(
            c.downcast_ref::<ControlError>(),
            Some(ControlError::NotRunning { .. } | ControlError::Io { .. } | ControlError::Timeout { .. })
        )
    });
    if unreachable { EXIT_UNREACHABLE } else { 1 }
}

fn run(cli: Cli, config_path: PathBuf, node_name: String) -> Result<()> {
    let config = Config::load(&config_path)?;
    let timeout = Duration::try_from_secs_f64(cli.timeout)
        .ok()
        .filter(|t| !t.is_zero())
        .with_context(|| format!("--timeout: expected a positive number of seconds, got {}", cli.timeout))?;
    if let Some(w) = config.witness_node(&node_name).cloned() {
        return run_witness(cli.command, &config, &w, timeout);
    }
    let node = config.node(&node_name)?.clone();
    let connect = || ControlClient::connect(&node.control, &node.name, timeout);
    let mut stdout = std::io::stdout().lock();
    match cli.command {
        // Answered in main without a config.
        Command::Doc(_) => {}
        Command::CreateMd { force, term, primary } => {
            if term.is_some() || primary.is_some() {
                anyhow::bail!("create-md: --term and --primary are for the witness node; {} is a data node", node.name);
            }
            daemon::create_md(&config, &node, force)?;
            writeln!(
                stdout,
                "{}: metadata created in {} (disk inconsistent until `promote --force`)",
                node.name,
                node.dir.display()
            )?;
        }
        Command::Status { json: true, .. } => {
            // The daemon's object as it is (a newer repd's fields too).
            let v: serde_json::Value = connect()?.call(&Request::Status)?;
            writeln!(stdout, "{}", serde_json::to_string_pretty(&v)?)?;
        }
        Command::Status { json: false, statistics } => {
            let s: Status = connect()?.call(&Request::Status)?;
            write!(stdout, "{}", s.human())?;
            if statistics {
                write!(stdout, "{}", s.human_statistics())?;
            }
        }
        Command::Promote { force } => {
            let r: control::Promoted = connect()?.call(&Request::Promote { force })?;
            write!(stdout, "{}", r.human(&node.name))?;
        }
        Command::Demote { force } => {
            let r: control::Demoted = connect()?.call(&Request::Demote { force })?;
            write!(stdout, "{}", r.human(&node.name))?;
        }
        Command::Connect { discard_my_data, dry_run: true, json } => {
            let req = Request::Connect { discard_my_data, dry_run: true };
            let v: serde_json::Value = connect()?.call_with(&req, Duration::from_secs(15))?;
            if json {
                writeln!(stdout, "{}", serde_json::to_string_pretty(&v)?)?;
            } else {
                let r: ProbeReport =
                    serde_json::from_value(v).context("repd answered a report this repctl cannot read")?;
                write!(stdout, "{}", repblock::node::probe_human(&node.name, &r))?;
            }
        }
        Command::Connect { discard_my_data, dry_run: false, .. } => {
            let req = Request::Connect { discard_my_data, dry_run: false };
            let r: control::Connecting = connect()?.call_with(&req, Duration::from_secs(15))?;
            write!(stdout, "{}", r.human(&node.name, discard_my_data))?;
        }
        Command::Disconnect => {
            let r: control::Disconnected = connect()?.call(&Request::Disconnect)?;
            write!(stdout, "{}", r.human(&node.name))?;
        }
        Command::NewCurrentUuid { clear_bitmap } => {
            let req = Request::NewCurrentUuid { clear_bitmap };
            let r: control::NewGeneration = connect()?.call_with(&req, Duration::from_secs(15))?;
            write!(stdout, "{}", r.human(&node.name))?;
        }
        Command::ResumeIo => {
            let r: control::IoResumed = connect()?.call(&Request::ResumeIo)?;
            write!(stdout, "{}", r.human(&node.name))?;
        }
        Command::Verify { wait, json } => {
            let v: serde_json::Value = connect()?.call(&Request::Verify)?;
            let started: control::VerifyStarted =
                serde_json::from_value(v.clone()).context("repd answered a verify this repctl cannot read")?;
            if !wait {
                if json {
                    writeln!(stdout, "{v}")?;
                } else {
                    write!(stdout, "{}", started.human(&node.name))?;
                }
            } else {
                let last = wait_verify(&connect, started.runs_finished)?;
                if json {
                    writeln!(stdout, "{}", serde_json::to_string(&last)?)?;
                } else {
                    writeln!(
                        stdout,
                        "{}: verify {}: {} bytes checked, {} bytes out of sync, {:.1}s{}",
                        node.name,
                        if last.complete { "done" } else { "aborted" },
                        last.checked_bytes,
                        last.out_of_sync_bytes,
                        last.seconds,
                        last.message.as_deref().map(|m| format!(" ({m})")).unwrap_or_default()
                    )?;
                }
                if !last.complete {
                    anyhow::bail!("verify aborted: {}", last.message.as_deref().unwrap_or("no reason given"));
                }
            }
        }
        Command::Invalidate => {
            let r: control::Invalidated = connect()?.call(&Request::Invalidate)?;
            write!(stdout, "{}", r.human(&node.name))?;
        }
        Command::WaitSync { timeout: wait } => {
            if let Some(t) = wait {
                Duration::try_from_secs_f64(t)
                    .with_context(|| format!("wait-sync --timeout: expected a number of seconds, got {t}"))?;
            }
            if config.peer_of(&node.name).is_some() {
                wait_sync_with_progress(&connect, wait.map(Duration::from_secs_f64))?;
            } else {
                let extra = wait.map_or(Duration::from_secs(365 * 24 * 3600), Duration::from_secs_f64);
                let _: control::InSync = connect()?.call_with(&Request::WaitSync { timeout_secs: wait }, extra)?;
            }
            writeln!(stdout, "{}: in sync", node.name)?;
        }
        Command::Events { statistics, interval } => {
            let every = Duration::try_from_secs_f64(interval)
                .ok()
                .filter(|t| *t >= Duration::from_millis(10))
                .with_context(|| format!("--interval: expected at least 0.01 seconds, got {interval}"))?;
            drop(stdout);
            let out = std::sync::Arc::new(std::sync::Mutex::new(std::io::stdout()));
            let client = connect()?;
            if statistics {
                // A second connection polls `status`; its lines interleave
                // with the stream's under the stdout lock.
                let out = std::sync::Arc::clone(&out);
                let mut poll = connect()?;
                std::thread::spawn(move || {
                    loop {
                        std::thread::sleep(every);
                        let Ok(v) = poll.request(&Request::Status) else { break };
                        let line = statistics_event(&v);
                        let mut o = out.lock().unwrap_or_else(|p| p.into_inner());
                        if writeln!(o, "{line}").and_then(|()| o.flush()).is_err() {
                            break;
                        }
                    }
                });
            }
            print_events(client, |v| {
                let mut o = out.lock().unwrap_or_else(|p| p.into_inner());
                writeln!(o, "{v}").and_then(|()| o.flush())
            })?;
        }
    }
    Ok(())
}

/// The commands of a witness node (`[[node]] witness = true`): create-md
/// (its state file), status, events.
fn run_witness(
    command: Command,
    config: &Config,
    w: &repblock::config::WitnessNodeConfig,
    timeout: Duration,
) -> Result<()> {
    use repblock::node::witness::{self, WitnessStatus};
    let connect = || ControlClient::connect(&w.control, &w.name, timeout);
    let mut stdout = std::io::stdout().lock();
    match command {
        Command::Doc(_) => {}
        Command::CreateMd { force, term, primary } => {
            let r = witness::create_state(config, w, force, term, primary.as_deref())?;
            let primary = r.primary.and_then(|p| config.node_name(p)).unwrap_or("none");
            writeln!(
                stdout,
                "{}: witness state created in {} (term {}, primary {primary})",
                w.name,
                w.dir.display(),
                r.term
            )?;
        }
        Command::Status { json: true, .. } => {
            let v: serde_json::Value = connect()?.call(&Request::Status)?;
            writeln!(stdout, "{}", serde_json::to_string_pretty(&v)?)?;
        }
        Command::Status { json: false, .. } => {
            let s: WitnessStatus = connect()?.call(&Request::Status)?;
            write!(stdout, "{}", s.human())?;
        }
        Command::Events { .. } => {
            drop(stdout);
            print_events(connect()?, |v| {
                let mut o = std::io::stdout().lock();
                writeln!(o, "{v}").and_then(|()| o.flush())
            })?;
        }
        other => {
            let data: Vec<&str> = config.nodes.iter().map(|n| n.name.as_str()).collect();
            anyhow::bail!(
                "{} is the witness (no volume): `{}` applies to the data nodes ({}); the witness has create-md, status and events",
                w.name,
                command_name(&other),
                data.join(", ")
            );
        }
    }
    Ok(())
}

/// Streams `events` through `write_line` until repd stops or the output
/// goes away (a closed pipe, `repctl events | head`, ends it quietly).
fn print_events(
    client: ControlClient,
    mut write_line: impl FnMut(&serde_json::Value) -> std::io::Result<()>,
) -> Result<()> {
    let mut out_err = None;
    client.events(|v| match write_line(v) {
        Ok(()) => true,
        Err(e) => {
            out_err = Some(e);
            false
        }
    })?;
    if let Some(e) = out_err.filter(|e| e.kind() != std::io::ErrorKind::BrokenPipe) {
        return Err(e.into());
    }
    Ok(())
}

/// The subcommand's name as typed (`promote`, `wait-sync` …).
fn command_name(c: &Command) -> String {
    let debug = format!("{c:?}");
    let head = debug.split([' ', '{', '(']).next().unwrap_or("");
    let mut out = String::new();
    for (i, ch) in head.chars().enumerate() {
        if ch.is_ascii_uppercase() {
            if i > 0 {
                out.push('-');
            }
            out.push(ch.to_ascii_lowercase());
        } else {
            out.push(ch);
        }
    }
    out
}

/// The `statistics` event of `events --statistics`: the status'
/// `statistics` object and LSNs, stamped now.
fn statistics_event(status: &serde_json::Value) -> serde_json::Value {
    let mut fields = serde_json::Map::new();
    if let Some(serde_json::Value::Object(st)) = status.get("statistics") {
        fields.extend(st.clone());
    }
    for key in ["lsn", "out_of_sync_bytes"] {
        if let Some(v) = status.get(key) {
            fields.insert(key.to_string(), v.clone());
        }
    }
    let line = repblock::control::EventLine::now(repblock::control::Event::Statistics { fields });
    serde_json::to_value(line).unwrap_or_default()
}

/// `verify --wait`: polls `status` until a verify ended after the request
/// (`verify.runs_finished` grew past `before`), printing progress on
/// stderr; returns the report of that verify.
fn wait_verify(
    connect: &dyn Fn() -> Result<ControlClient, repblock::control::ControlError>,
    before: u64,
) -> Result<repblock::repl::verify::VerifyReport> {
    let mut last_print = std::time::Instant::now();
    loop {
        let s: Status = connect()?.call(&Request::Status)?;
        let vs = &s.verify;
        if vs.runs_finished > before
            && !vs.running
            && let Some(last) = vs.last.clone()
        {
            return Ok(last);
        }
        if s.connection != ConnState::Connected {
            anyhow::bail!("verify: the connection to the peer is {} and no verify result came", s.connection);
        }
        if vs.running && last_print.elapsed() >= Duration::from_secs(2) && vs.total_bytes > 0 {
            eprintln!(
                "{}: verify {:.1}% ({} of {} bytes, {} out of sync)",
                s.node,
                100.0 * vs.done_bytes as f64 / vs.total_bytes as f64,
                vs.done_bytes,
                vs.total_bytes,
                vs.out_of_sync_bytes
            );
            last_print = std::time::Instant::now();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `wait-sync` on a two-node resource: polls `status` until connected,
/// established and both disks uptodate, printing progress lines on stderr
/// when something changes (at most every second while a sync runs).
fn wait_sync_with_progress(
    connect: &dyn Fn() -> Result<ControlClient, repblock::control::ControlError>,
    timeout: Option<Duration>,
) -> Result<()> {
    let start = std::time::Instant::now();
    let mut last_line = String::new();
    let mut last_print = std::time::Instant::now();
    loop {
        let s: Status = connect()?.call(&Request::Status)?;
        if s.connection == ConnState::Connected
            && s.replication == Some(ReplState::Established)
            && s.disk == DiskState::UpToDate
            && s.peer.disk == Some(DiskState::UpToDate)
        {
            return Ok(());
        }
        let peer_disk = s.peer.disk.map_or("unknown".to_string(), |d| d.to_string());
        let replication = s.replication.map_or("none", ReplState::as_str);
        let mut line = format!(
            "{}: connection:{} replication:{replication} disk:{} peer-disk:{peer_disk}",
            s.node, s.connection, s.disk
        );
        if s.resync.total_bytes > 0 {
            let pct = 100.0 * s.resync.done_bytes as f64 / s.resync.total_bytes as f64;
            line.push_str(&format!(" sync:{pct:.1}%"));
            if let Some(eta) = s.resync.eta_seconds {
                line.push_str(&format!(" eta:{eta}s"));
            }
        }
        if line != last_line || last_print.elapsed() >= Duration::from_secs(5) {
            eprintln!("{line}");
            last_line = line;
            last_print = std::time::Instant::now();
        }
        if let Some(t) = timeout
            && start.elapsed() >= t
        {
            anyhow::bail!("wait-sync: timed out after {:.1}s: {last_line}", t.as_secs_f64());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
