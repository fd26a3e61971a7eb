//! repctl: talks to a node's control socket (and runs the offline
//! `create-md`).
//!
//! Exit codes: 0 success; 1 refused or failed, with the reason on stderr;
//! 2 usage error.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use repblock::config::Config;
use repblock::control::{ControlClient, DEFAULT_CLIENT_TIMEOUT, Request};
use repblock::node::Status;
use repblock::node::daemon;

#[derive(Debug, Parser)]
#[command(name = "repctl", version, about = "Control one node of a repblock resource")]
struct Cli {
    /// Resource configuration file (TOML).
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// The node to talk to (a [[node]] section of the config).
    #[arg(long, value_name = "NAME")]
    node: String,
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
    },
    /// Role, disk, connection, peer, out-of-sync bytes, resync progress.
    Status {
        /// One JSON object (the public contract, design.md §6).
        #[arg(long)]
        json: bool,
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
    /// Connect to the peer (needs replication).
    Connect {
        /// Resolve a split brain by throwing away this node's changes.
        #[arg(long)]
        discard_my_data: bool,
    },
    /// Disconnect from the peer (needs replication).
    Disconnect,
    /// Compare every block with the peer (needs replication).
    Verify,
    /// Mark the whole local disk out of sync (needs replication).
    Invalidate,
    /// Wait until the disk is uptodate and nothing is out of sync.
    WaitSync {
        /// Give up after this many seconds.
        #[arg(long, value_name = "SECONDS")]
        timeout: Option<f64>,
    },
    /// Stream state changes, one JSON object per line.
    Events,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("repctl: {}", render(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, skipping causes already spelled out.
fn render(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let msg = cause.to_string();
        if !out.contains(&msg) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&msg);
        }
    }
    out
}

fn run(cli: Cli) -> Result<()> {
    let config = Config::load(&cli.config)?;
    let node = config.node(&cli.node)?.clone();
    let timeout = Duration::try_from_secs_f64(cli.timeout)
        .ok()
        .filter(|t| !t.is_zero())
        .with_context(|| format!("--timeout: expected a positive number of seconds, got {}", cli.timeout))?;
    let connect = || ControlClient::connect(&node.control, &node.name, timeout);
    let mut stdout = std::io::stdout().lock();
    match cli.command {
        Command::CreateMd { force } => {
            daemon::create_md(&config, &node, force)?;
            writeln!(stdout, "{}: metadata created in {} (disk inconsistent until `promote --force`)", node.name, node.dir.display())?;
        }
        Command::Status { json } => {
            let v = connect()?.request(&Request::Status)?;
            if json {
                writeln!(stdout, "{}", serde_json::to_string_pretty(&v)?)?;
            } else {
                let s: Status = serde_json::from_value(v).context("repd answered a status this repctl cannot read")?;
                write!(stdout, "{}", s.human())?;
            }
        }
        Command::Promote { force } => {
            let v = connect()?.request(&Request::Promote { force })?;
            let nbd = v.get("nbd").and_then(|n| n.as_str()).map(|u| format!(", exporting {u}")).unwrap_or_default();
            let was = if v.get("changed") == Some(&serde_json::Value::Bool(false)) { " (already)" } else { "" };
            writeln!(stdout, "{}: primary{was}{nbd}", node.name)?;
        }
        Command::Demote { force } => {
            let v = connect()?.request(&Request::Demote { force })?;
            let was = if v.get("changed") == Some(&serde_json::Value::Bool(false)) { " (already)" } else { "" };
            let n = v.get("disconnected_clients").and_then(|n| n.as_u64()).unwrap_or(0);
            let dropped = if n > 0 { format!(", disconnected {n} NBD client(s)") } else { String::new() };
            writeln!(stdout, "{}: secondary{was}{dropped}", node.name)?;
        }
        Command::Connect { discard_my_data } => {
            connect()?.request(&Request::Connect { discard_my_data })?;
        }
        Command::Disconnect => {
            connect()?.request(&Request::Disconnect)?;
        }
        Command::Verify => {
            connect()?.request(&Request::Verify)?;
        }
        Command::Invalidate => {
            connect()?.request(&Request::Invalidate)?;
        }
        Command::WaitSync { timeout: wait } => {
            let extra = match wait {
                None => Duration::from_secs(365 * 24 * 3600),
                Some(t) => Duration::try_from_secs_f64(t)
                    .with_context(|| format!("wait-sync --timeout: expected a number of seconds, got {t}"))?,
            };
            connect()?.request_with(&Request::WaitSync { timeout_secs: wait }, extra)?;
            writeln!(stdout, "{}: in sync", node.name)?;
        }
        Command::Events => {
            let mut out_err = None;
            connect()?.events(|v| match writeln!(stdout, "{v}").and_then(|()| stdout.flush()) {
                Ok(()) => true,
                Err(e) => {
                    // A closed pipe (`repctl events | head`) ends the stream.
                    out_err = Some(e);
                    false
                }
            })?;
            if let Some(e) = out_err.filter(|e| e.kind() != std::io::ErrorKind::BrokenPipe) {
                return Err(e.into());
            }
        }
    }
    Ok(())
}
