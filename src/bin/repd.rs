//! repd: runs one node of a resource in the foreground.
//!
//! ```text
//! repd --config FILE --node NAME [--log-level info]   (a data node, or the witness)
//! repd demo [--dir ./repblock-demo] [--size 1GiB] [--nbd 127.0.0.1:10809]
//! ```
//!
//! Logs go to stderr (`RUST_LOG` overrides `--log-level`). SIGTERM/SIGINT
//! stop the node cleanly (export down, volume closed, exit 0).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{CommandFactory, Parser, Subcommand};
use repblock::config::{self, Config, NbdAddress};
use repblock::model::DiskState;
use repblock::node::daemon::{self, Daemon};
use repblock::node::systemd::Notifier;
use repblock::units;

#[derive(Debug, Parser)]
#[command(name = "repd", version, about = "Run one node of a repblock resource in the foreground")]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct Cli {
    /// Resource configuration file (TOML).
    #[arg(long, value_name = "FILE", required = true)]
    config: Option<PathBuf>,
    /// This node's name (a [[node]] section of the config).
    #[arg(long, value_name = "NAME", required = true)]
    node: Option<String>,
    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it.
    #[arg(long, value_name = "LEVEL", default_value = "info", global = true)]
    log_level: String,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a ready-to-use single-node resource under a local directory and
    /// print how to attach it.
    Demo {
        /// Directory holding the config, the control socket and the data.
        #[arg(long, default_value = "./repblock-demo")]
        dir: PathBuf,
        /// Volume size (used when the demo config is first written).
        #[arg(long, default_value = "1GiB", value_parser = parse_size)]
        size: u64,
        /// NBD listen address (used when the demo config is first written).
        #[arg(long, default_value = "127.0.0.1:10809")]
        nbd: String,
    },
    #[command(flatten)]
    Doc(repblock::clidoc::DocCommand),
}

fn parse_size(s: &str) -> Result<u64, String> {
    units::parse_size(s).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Doc(doc)) = &cli.command {
        return match doc.run(Cli::command()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("repd: {e}");
                ExitCode::FAILURE
            }
        };
    }
    repblock::node::systemd::init_logging(&cli.log_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("repd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let res = runtime.block_on(async {
        match cli.command {
            Some(Command::Demo { dir, size, nbd }) => demo(&dir, size, &nbd).await,
            Some(Command::Doc(_)) => Ok(()),
            None => {
                // clap enforces both without a subcommand.
                let (Some(config), Some(node)) = (cli.config, cli.node) else {
                    bail!("--config and --node are required");
                };
                run(&config, &node).await
            }
        }
    });
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("repd: {}", repblock::errors::render_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

async fn run(config_path: &Path, node: &str) -> Result<()> {
    let config = Config::load(config_path)?;
    if let Some(me) = config.witness_node(node).cloned() {
        // `[[node]] witness = true`: the diskless voter of automatic failover.
        return Ok(repblock::node::witness::run(config, me).await?);
    }
    let daemon = Daemon::start(config, node).await?;
    tracing::info!(node, "running as secondary; `repctl promote` exports the volume");
    serve_until_signal(daemon).await
}

async fn serve_until_signal(daemon: Daemon) -> Result<()> {
    // Installed before READY=1: a stop right after it is a clean stop.
    let mut signals = daemon::StopSignals::install().context("cannot install signal handlers")?;
    // SIGHUP reloads the TLS certificates (docs/tls.md).
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("cannot install the SIGHUP handler")?;
    let node = Arc::downgrade(daemon.node());
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            let Some(node) = node.upgrade() else { break };
            // Failures are logged by reload_tls (the old certificates stay).
            match node.reload_tls() {
                Ok(_) | Err(repblock::node::NodeError::Tls(_)) => {}
                Err(e) => tracing::info!("SIGHUP: {e}"),
            }
        }
    });
    let notifier = Notifier::start(Arc::clone(daemon.node()));
    let signal = signals.recv().await;
    notifier.stopping();
    tracing::info!(signal, "stopping (a second signal exits at once; the WAL makes that safe)");
    tokio::spawn(async move {
        let second = signals.recv().await;
        eprintln!("repd: {second} during the clean stop: exiting now; the next start replays the WAL");
        std::process::exit(130);
    });
    daemon.stop().await?;
    tracing::info!("stopped cleanly");
    Ok(())
}

async fn demo(dir: &Path, size: u64, nbd: &str) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let dir = dir.canonicalize().with_context(|| format!("cannot resolve {}", dir.display()))?;
    let config_path = dir.join("r0.toml");
    if !config_path.exists() {
        if config::parse_host_port(nbd).is_none() && !nbd.starts_with("unix:") {
            bail!("--nbd: expected \"host:port\" or \"unix:/path\", got {nbd:?}");
        }
        std::fs::write(&config_path, config::demo_toml(size, nbd))
            .with_context(|| format!("cannot write {}", config_path.display()))?;
        tracing::info!(config = %config_path.display(), "wrote the demo config");
    } else {
        tracing::info!(config = %config_path.display(), "using the existing demo config (--size/--nbd apply to a new one)");
    }
    let config = Config::load(&config_path)?;
    let me = config.nodes.first().context("the demo config has no node")?.clone();
    if !daemon::has_metadata(&me) {
        daemon::create_md(&config, &me, false)?;
    }
    let resource = config.name.clone();
    let daemon = Daemon::start(config, &me.name).await?;
    let force = daemon.node().status().disk != DiskState::UpToDate;
    if let Err(e) = daemon.node().promote(force).await {
        let stop = daemon.stop().await;
        if let Err(s) = stop {
            tracing::error!("{s}");
        }
        return Err(e.into());
    }
    print_demo_help(&config_path, &me.name, &resource, &me.nbd);
    serve_until_signal(daemon).await
}

fn print_demo_help(config_path: &Path, node: &str, export: &str, nbd: &NbdAddress) {
    let uri = nbd.uri(export);
    let cfg = config_path.display();
    // Name repctl by its path when it sits next to this repd (a cargo build
    // does not put it on PATH).
    let repctl_bin = std::env::current_exe()
        .ok()
        .map(|exe| exe.with_file_name("repctl"))
        .filter(|p| p.is_file())
        .map_or_else(|| "repctl".to_string(), |p| p.display().to_string());
    let repctl = format!("{repctl_bin} --config {cfg} --node {node}");
    let (host, port) = match nbd {
        NbdAddress::Tcp { host, port } => (host.clone(), port.to_string()),
        NbdAddress::Unix(_) => ("HOST".to_string(), "PORT".to_string()),
    };
    println!(
        "\
repblock demo is running: resource {export}, node {node}, primary.

  NBD URI:  {uri}

Attach it:
  nbdinfo {uri}
  qemu-img info {uri}
  qemu-img convert -p -n -O raw disk.img {uri}     # copy an image in
  qemu-system-x86_64 -m 1G -drive file={uri},format=raw,cache=none

  # kernel client (hosts with the nbd module):
  modprobe nbd && nbd-client {host} {port} /dev/nbd0 -N {export}
  mkfs.ext4 /dev/nbd0 && mount /dev/nbd0 /mnt

  # no nbd module: FUSE + loop device
  mkdir -p /tmp/nbdfuse && nbdfuse /tmp/nbdfuse/disk {uri} &
  losetup -f --show /tmp/nbdfuse/disk               # prints /dev/loopN
  mkfs.ext4 /dev/loopN && mount /dev/loopN /mnt

Control it:
  {repctl} status
  {repctl} status --json
  {repctl} events
  {repctl} demote

Config: {cfg} (see docs/config.md). Ctrl-C stops the node cleanly; run
`repd demo` again to restart it with the same data."
    );
}
