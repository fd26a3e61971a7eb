//! `netproxy`: the TCP fault-injection proxy as a process, for shell scripts
//! and the benchmark suite. See docs/netproxy.md.
//!
//! ```text
//! netproxy --listen 127.0.0.1:7791 --upstream 127.0.0.1:7790 [--delay 5ms | --delay-up 5ms --delay-down 5ms]
//!          [--rate 100MiB] [--control /path/ctl.sock]
//! netproxy ctl /path/ctl.sock <command...>      # send one control command, print the reply
//! ```
//!
//! Once listening, the proxy prints `listening <addr>` on stdout (useful
//! with port 0); logs go to stderr (`RUST_LOG`, default `info`).

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use repblock_netproxy::units::{parse_duration, parse_rate};
use repblock_netproxy::{Direction, Proxy, control};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tracing_subscriber::EnvFilter;

#[derive(Parser, Debug)]
#[command(
    name = "netproxy",
    version,
    about = "TCP fault-injection proxy: delay, bandwidth cap, blackhole, stall, refuse, cut",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    /// Address to listen on (port 0 picks a free port, printed on stdout).
    #[arg(long, required = true)]
    listen: Option<SocketAddr>,
    /// Address every connection is forwarded to.
    #[arg(long, required = true)]
    upstream: Option<SocketAddr>,
    /// One-way delay in both directions (RTT = 2 × delay), e.g. 5ms.
    #[arg(long, value_parser = parse_duration, conflicts_with_all = ["delay_up", "delay_down"])]
    delay: Option<Duration>,
    /// One-way delay client to server.
    #[arg(long, value_parser = parse_duration)]
    delay_up: Option<Duration>,
    /// One-way delay server to client.
    #[arg(long, value_parser = parse_duration)]
    delay_down: Option<Duration>,
    /// Bandwidth cap per connection and direction, bytes per second (e.g.
    /// 100MiB), or off.
    #[arg(long, value_parser = parse_rate_arg)]
    rate: Option<Rate>,
    /// Unix socket for control commands (delay, rate, mode, cut, stats,
    /// reset).
    #[arg(long)]
    control: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Sends one command to a running netproxy's control socket and prints
    /// the reply; exits 1 if the command was refused.
    Ctl {
        /// The control socket.
        socket: PathBuf,
        /// The command, e.g. `mode blackhole` or `stats`.
        #[arg(required = true, num_args = 1..)]
        command: Vec<String>,
    },
}

/// A parsed `--rate` (`None`: off). A newtype, because clap reads a bare
/// `Option<Option<_>>` as "flag with an optional value".
#[derive(Debug, Clone, Copy)]
struct Rate(Option<u64>);

fn parse_rate_arg(s: &str) -> Result<Rate, repblock_netproxy::units::UnitError> {
    parse_rate(s).map(Rate)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("netproxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.cmd {
            Some(Cmd::Ctl { ref socket, ref command }) => ctl(socket.clone(), command.join(" ")).await,
            None => run(cli).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("netproxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let (Some(listen), Some(upstream)) = (cli.listen, cli.upstream) else {
        bail!("--listen and --upstream are required");
    };
    // Bind the control socket first: a clash is reported before any traffic.
    let control_listener = match &cli.control {
        Some(path) => Some(control::bind(path).await?),
        None => None,
    };
    let proxy = Proxy::start(listen, upstream).await.with_context(|| format!("Cannot listen on {listen}"))?;
    if let Some(d) = cli.delay {
        proxy.set_delay_both(d);
    }
    if let Some(d) = cli.delay_up {
        proxy.set_delay(Direction::ClientToServer, d);
    }
    if let Some(d) = cli.delay_down {
        proxy.set_delay(Direction::ServerToClient, d);
    }
    if let Some(Rate(rate)) = cli.rate {
        for dir in Direction::BOTH {
            proxy.set_rate(dir, rate);
        }
    }
    let control_task = control_listener.map(|l| tokio::spawn(control::serve(l, proxy.clone())));

    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening {}", proxy.local_addr()).context("Cannot write to stdout")?;
        out.flush().context("Cannot write to stdout")?;
    }

    wait_for_signal().await?;
    tracing::info!("signal received, shutting down");
    if let Some(task) = control_task {
        task.abort();
    }
    proxy.shutdown().await;
    if let Some(path) = &cli.control {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("Cannot install the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("Cannot install the SIGINT handler"),
        _ = term.recv() => Ok(()),
    }
}

/// `netproxy ctl`: one command, one reply line on stdout.
async fn ctl(socket: PathBuf, command: String) -> anyhow::Result<()> {
    let stream = UnixStream::connect(&socket)
        .await
        .with_context(|| format!("Cannot connect to control socket {}", socket.display()))?;
    let (rd, mut wr) = stream.into_split();
    wr.write_all(format!("{command}\n").as_bytes()).await.context("Cannot send the command")?;
    let mut reply = String::new();
    let mut rd = BufReader::new(rd);
    match tokio::time::timeout(Duration::from_secs(10), rd.read_line(&mut reply)).await {
        Err(_) => bail!("No reply from {} within 10s", socket.display()),
        Ok(r) => r.context("Cannot read the reply")?,
    };
    let reply = reply.trim_end();
    if reply.is_empty() {
        bail!("The proxy closed the control connection without a reply");
    }
    if let Some(e) = reply.strip_prefix("error: ") {
        bail!("{e}");
    }
    println!("{reply}");
    Ok(())
}
