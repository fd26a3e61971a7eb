//! The `netproxy` control socket: line commands over a Unix stream socket.
//!
//! ```text
//! request (one line)            reply (one line)
//! delay 5ms                     ok            one-way delay, both directions
//! delay up 2ms | delay down 2ms ok            one direction (up = client to server)
//! rate 10MiB | rate off         ok            bandwidth cap (bytes/s), both directions
//! rate up 1MiB | rate down off  ok            one direction
//! mode pass|blackhole|stall|refuse  ok
//! cut                           ok            close every current connection
//! reset                         ok            zero the byte counters
//! stats                         {"bytes_up":…,"bytes_down":…,"connections":…,"accepted":…,
//!                                "mode":"pass","delay_up_us":…,"delay_down_us":…,
//!                                "rate_up":null|bytes/s,"rate_down":…}
//! anything else                 error: <message>
//! ```
//!
//! A connection may carry any number of commands, answered in order; empty
//! lines are ignored. Lines longer than [`MAX_LINE`] bytes close the
//! connection with an error.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, info, warn};

use crate::units::{UnitError, parse_duration, parse_rate};
use crate::{Direction, Mode, ProxyHandle, Stats, UnknownMode};

/// Longest command line accepted.
pub const MAX_LINE: usize = 4096;

/// A parsed control command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// One-way delay for one direction, or both when `dir` is `None`.
    Delay {
        dir: Option<Direction>,
        delay: Duration,
    },
    /// Bandwidth cap (`None`: off) for one direction, or both.
    Rate {
        dir: Option<Direction>,
        rate: Option<u64>,
    },
    Mode(Mode),
    Cut,
    Stats,
    Reset,
}

/// Why a command line was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("Empty command")]
    Empty,
    #[error("Unknown command {0:?} (expected delay, rate, mode, cut, stats or reset)")]
    Unknown(String),
    #[error("Usage: {0}")]
    Usage(&'static str),
    #[error(transparent)]
    Unit(#[from] UnitError),
    #[error(transparent)]
    Mode(#[from] UnknownMode),
}

const DELAY_USAGE: &str = "delay [up|down] <duration>, e.g. \"delay 5ms\", \"delay up 2ms\"";
const RATE_USAGE: &str = "rate [up|down] <size per second>|off, e.g. \"rate 10MiB\", \"rate down off\"";
const MODE_USAGE: &str = "mode pass|blackhole|stall|refuse";

fn parse_dir(s: &str) -> Option<Direction> {
    match s.to_ascii_lowercase().as_str() {
        "up" => Some(Direction::ClientToServer),
        "down" => Some(Direction::ServerToClient),
        _ => None,
    }
}

/// `[up|down] <value>`: the optional direction and the value.
fn dir_and_value<'a>(args: &[&'a str], usage: &'static str) -> Result<(Option<Direction>, &'a str), CommandError> {
    match args {
        [value] => Ok((None, value)),
        [dir, value] => Ok((Some(parse_dir(dir).ok_or(CommandError::Usage(usage))?), value)),
        _ => Err(CommandError::Usage(usage)),
    }
}

impl FromStr for Command {
    type Err = CommandError;

    fn from_str(line: &str) -> Result<Self, Self::Err> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some((&cmd, args)) = words.split_first() else {
            return Err(CommandError::Empty);
        };
        let no_args = |c: Command, usage: &'static str| {
            if args.is_empty() { Ok(c) } else { Err(CommandError::Usage(usage)) }
        };
        match cmd.to_ascii_lowercase().as_str() {
            "delay" => {
                let (dir, value) = dir_and_value(args, DELAY_USAGE)?;
                Ok(Command::Delay { dir, delay: parse_duration(value)? })
            }
            "rate" => {
                let (dir, value) = dir_and_value(args, RATE_USAGE)?;
                Ok(Command::Rate { dir, rate: parse_rate(value)? })
            }
            "mode" => match args {
                [m] => Ok(Command::Mode(m.parse()?)),
                _ => Err(CommandError::Usage(MODE_USAGE)),
            },
            "cut" => no_args(Command::Cut, "cut"),
            "stats" => no_args(Command::Stats, "stats"),
            "reset" => no_args(Command::Reset, "reset"),
            _ => Err(CommandError::Unknown(cmd.to_string())),
        }
    }
}

impl Stats {
    /// The one-line JSON object of the `stats` command.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "connections": self.connections,
            "accepted": self.accepted,
            "mode": self.mode.name(),
            "delay_up_us": u64::try_from(self.delay_up.as_micros()).unwrap_or(u64::MAX),
            "delay_down_us": u64::try_from(self.delay_down.as_micros()).unwrap_or(u64::MAX),
            "rate_up": self.rate_up,
            "rate_down": self.rate_down,
        })
    }
}

/// Applies `cmd` to the proxy and returns the reply line (without newline).
pub fn execute(handle: &ProxyHandle, cmd: &Command) -> String {
    let dirs = |dir: Option<Direction>| match dir {
        Some(d) => vec![d],
        None => Direction::BOTH.to_vec(),
    };
    match *cmd {
        Command::Delay { dir, delay } => dirs(dir).into_iter().for_each(|d| handle.set_delay(d, delay)),
        Command::Rate { dir, rate } => dirs(dir).into_iter().for_each(|d| handle.set_rate(d, rate)),
        Command::Mode(m) => handle.set_mode(m),
        Command::Cut => handle.cut(),
        Command::Reset => handle.reset_counters(),
        Command::Stats => return handle.stats().to_json().to_string(),
    }
    "ok".to_string()
}

/// Parses and executes one line; errors become `error: …` replies.
pub fn handle_line(handle: &ProxyHandle, line: &str) -> String {
    match line.parse::<Command>() {
        Ok(cmd) => {
            debug!(command = line.trim(), "control command");
            execute(handle, &cmd)
        }
        Err(e) => format!("error: {e}"),
    }
}

/// Errors of the control socket itself.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("Control socket {}: another netproxy answers there", path.display())]
    InUse { path: PathBuf },
    #[error("Control socket {}: exists and is not a socket", path.display())]
    NotASocket { path: PathBuf },
    #[error("Control socket {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Binds the control socket at `path`. A stale socket file left by a dead
/// netproxy is replaced; a live one, or any other file, is an error.
pub async fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    let io_err = |source| ControlError::Io { path: path.to_path_buf(), source };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if UnixStream::connect(path).await.is_ok() {
                return Err(ControlError::InUse { path: path.to_path_buf() });
            }
            std::fs::remove_file(path).map_err(io_err)?;
        }
        Ok(_) => return Err(ControlError::NotASocket { path: path.to_path_buf() }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(e)),
    }
    UnixListener::bind(path).map_err(io_err)
}

/// Serves control connections on `listener` forever (run it as a task, or
/// select it against a shutdown signal).
pub async fn serve(listener: UnixListener, handle: ProxyHandle) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve_connection(stream, handle.clone()));
            }
            Err(e) => {
                warn!(error = %e, "control accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

async fn serve_connection(stream: UnixStream, handle: ProxyHandle) {
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    let mut line = String::new();
    loop {
        line.clear();
        // Read at most MAX_LINE + 1 bytes, so an endless line cannot grow
        // memory; a line that long is refused.
        let n = match (&mut rd).take(MAX_LINE as u64 + 1).read_line(&mut line).await {
            Ok(n) => n,
            Err(e) => {
                // Includes invalid UTF-8.
                let _ = wr.write_all(format!("error: {e}\n").as_bytes()).await;
                return;
            }
        };
        if n == 0 {
            return;
        }
        if n > MAX_LINE {
            let _ = wr.write_all(format!("error: Command longer than {MAX_LINE} bytes\n").as_bytes()).await;
            return;
        }
        if line.trim().is_empty() {
            continue;
        }
        let reply = handle_line(&handle, &line);
        if reply.starts_with("error") {
            info!(command = line.trim(), reply, "control command refused");
        }
        if wr.write_all(format!("{reply}\n").as_bytes()).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commands() {
        let ms = Duration::from_millis;
        assert_eq!("delay 5ms".parse(), Ok(Command::Delay { dir: None, delay: ms(5) }));
        assert_eq!("delay up 2ms".parse(), Ok(Command::Delay { dir: Some(Direction::ClientToServer), delay: ms(2) }));
        assert_eq!(
            " DELAY Down 0 \n".parse(),
            Ok(Command::Delay { dir: Some(Direction::ServerToClient), delay: ms(0) })
        );
        assert_eq!("rate 10MiB".parse(), Ok(Command::Rate { dir: None, rate: Some(10 << 20) }));
        assert_eq!("rate off".parse(), Ok(Command::Rate { dir: None, rate: None }));
        assert_eq!(
            "rate down 1KiB/s".parse(),
            Ok(Command::Rate { dir: Some(Direction::ServerToClient), rate: Some(1024) })
        );
        assert_eq!("mode blackhole".parse(), Ok(Command::Mode(Mode::Blackhole)));
        assert_eq!("mode Stall".parse(), Ok(Command::Mode(Mode::Stall)));
        assert_eq!("cut".parse(), Ok(Command::Cut));
        assert_eq!("stats".parse(), Ok(Command::Stats));
        assert_eq!("reset".parse(), Ok(Command::Reset));
    }

    #[test]
    fn refuses_bad_commands() {
        assert_eq!("".parse::<Command>(), Err(CommandError::Empty));
        assert_eq!("   ".parse::<Command>(), Err(CommandError::Empty));
        assert_eq!("jump".parse::<Command>(), Err(CommandError::Unknown("jump".into())));
        assert_eq!("delay".parse::<Command>(), Err(CommandError::Usage(DELAY_USAGE)));
        assert_eq!("delay sideways 5ms".parse::<Command>(), Err(CommandError::Usage(DELAY_USAGE)));
        assert_eq!("delay up 5ms extra".parse::<Command>(), Err(CommandError::Usage(DELAY_USAGE)));
        assert!(matches!("delay 5".parse::<Command>(), Err(CommandError::Unit(UnitError::NotADuration(_)))));
        assert!(matches!("rate fast".parse::<Command>(), Err(CommandError::Unit(UnitError::NotASize(_)))));
        assert_eq!("mode".parse::<Command>(), Err(CommandError::Usage(MODE_USAGE)));
        assert_eq!("mode off".parse::<Command>(), Err(CommandError::Mode(UnknownMode("off".into()))));
        assert_eq!("cut now".parse::<Command>(), Err(CommandError::Usage("cut")));
    }

    #[test]
    fn error_messages_name_the_problem() {
        let e = "mode sideways".parse::<Command>().unwrap_err().to_string();
        assert!(e.contains("sideways") && e.contains("blackhole"), "{e}");
        let e = "rate 5 parsecs".parse::<Command>().unwrap_err().to_string();
        assert!(e.starts_with("Usage: rate"), "{e}");
    }

    #[test]
    fn stats_json_shape() {
        let stats = Stats {
            bytes_up: 10,
            bytes_down: 20,
            connections: 1,
            accepted: 3,
            mode: Mode::Stall,
            delay_up: Duration::from_millis(5),
            delay_down: Duration::from_micros(250),
            rate_up: Some(1024),
            rate_down: None,
        };
        assert_eq!(
            stats.to_json(),
            serde_json::json!({
                "bytes_up": 10, "bytes_down": 20, "connections": 1, "accepted": 3,
                "mode": "stall", "delay_up_us": 5000, "delay_down_us": 250,
                "rate_up": 1024, "rate_down": null,
            })
        );
    }
}
