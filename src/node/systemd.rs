//! systemd integration of repd (`contrib/systemd/repd@.service`,
//! `Type=notify`), over the `sd-notify` crate; every call is a no-op when
//! `NOTIFY_SOCKET` is not set (repd not started by systemd).
//!
//! - `READY=1` (with a first `STATUS=`) once the volume is open, crash
//!   recovery done, the control socket listening and the metrics endpoint
//!   bound: [`Notifier::start`], called by repd after `Daemon::start`.
//! - `STATUS=role:… disk:… connection:…` whenever that line changes (on
//!   every node event, and at least every [`STATUS_POLL`]): what
//!   `systemctl status repd@r0` shows.
//! - `WATCHDOG=1` every half `WATCHDOG_USEC` when the unit sets
//!   `WatchdogSec=`; each ping follows a status snapshot, so a node whose
//!   runtime or state lock hangs stops pinging and systemd restarts it.
//! - `STOPPING=1` when the clean stop begins: [`Notifier::stopping`].
//!
//! Logs: [`init_logging`] drops timestamps and colours when stderr is not a
//! terminal or `JOURNAL_STREAM` is set (journald stamps each line itself).

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::task::JoinHandle;

use super::{Node, Status};

/// The `STATUS=` line is rechecked at least this often.
pub const STATUS_POLL: Duration = Duration::from_secs(5);

/// The `STATUS=` text of a status: role, disk, connection (and the peer's
/// disk, a running resync, a fail-stop).
pub fn status_line(s: &Status) -> String {
    let mut line = format!("role:{} disk:{}", s.role, s.disk);
    if let Some(peer) = &s.peer.name {
        line.push_str(&format!(" connection:{} peer:{peer}", s.connection));
        if let Some(d) = s.peer.disk {
            line.push_str(&format!(" peer-disk:{d}"));
        }
        if let Some(r) = &s.replication {
            line.push_str(&format!(" replication:{r}"));
        }
        if s.resync.total_bytes > 0 {
            let pct = 100.0 * s.resync.done_bytes as f64 / s.resync.total_bytes as f64;
            line.push_str(&format!(" resync:{pct:.1}%"));
        }
        if s.split_brain {
            line.push_str(" SPLIT-BRAIN");
        }
    }
    if s.failed.is_some() {
        line.push_str(" FAILED");
    }
    line
}

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify systemd (NOTIFY_SOCKET)");
    }
}

/// The notification task of a running node.
#[derive(Debug)]
pub struct Notifier {
    task: JoinHandle<()>,
}

impl Notifier {
    /// Sends `READY=1` and the first `STATUS=`, then keeps the status line
    /// and the watchdog going.
    pub fn start(node: Arc<Node>) -> Notifier {
        Notifier::start_for(node, |n| status_line(&n.status()))
    }

    /// [`Notifier::start`] for any daemon with a control socket (the
    /// witness too): `line_of` makes its `STATUS=` line.
    pub fn start_for<H: crate::control::ControlHandler>(node: Arc<H>, line_of: fn(&H) -> String) -> Notifier {
        let mut line = line_of(&node);
        send(&[NotifyState::Ready, NotifyState::Status(&line)]);
        let watchdog = sd_notify::watchdog_enabled().filter(|d| !d.is_zero());
        if let Some(d) = watchdog {
            tracing::info!(interval = ?d, "systemd watchdog: pinging every half interval");
        }
        let mut events = crate::control::ControlHandler::subscribe(&*node);
        let task = tokio::spawn(async move {
            let ping = watchdog.map_or(STATUS_POLL, |d| (d / 2).min(STATUS_POLL));
            loop {
                tokio::select! {
                    r = events.recv() => {
                        if matches!(r, Err(tokio::sync::broadcast::error::RecvError::Closed)) {
                            return;
                        }
                    }
                    _ = tokio::time::sleep(ping) => {}
                }
                let now = line_of(&node);
                if now != line {
                    line = now;
                    send(&[NotifyState::Status(&line)]);
                }
                if watchdog.is_some() {
                    send(&[NotifyState::Watchdog]);
                }
            }
        });
        Notifier { task }
    }

    /// The clean stop begins: `STOPPING=1`; no more status or pings.
    pub fn stopping(self) {
        self.stopping_with("stopping: export down, closing the volume");
    }

    /// [`Notifier::stopping`] with another `STATUS=` text.
    pub fn stopping_with(self, status: &str) {
        self.task.abort();
        send(&[NotifyState::Stopping, NotifyState::Status(status)]);
    }
}

/// Logs to stderr with `tracing`, `RUST_LOG` overriding `level`. With a
/// terminal: timestamps and colours. Under journald (`JOURNAL_STREAM`) or
/// into a pipe or file: neither (journald stamps lines itself), unless
/// `REPBLOCK_LOG_TIMESTAMPS=1` asks for timestamps.
pub fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let (ansi, time) = log_style(
        std::io::stderr().is_terminal(),
        std::env::var_os("JOURNAL_STREAM").is_some(),
        std::env::var("REPBLOCK_LOG_TIMESTAMPS").is_ok_and(|v| v == "1"),
    );
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    if time {
        b.init();
    } else {
        b.without_time().init();
    }
}

/// `(colours, timestamps)` for a stderr that is (not) a terminal, (not)
/// journald's, with timestamps forced or not.
pub fn log_style(tty: bool, journald: bool, force_time: bool) -> (bool, bool) {
    let interactive = tty && !journald;
    (interactive, interactive || force_time)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journald_and_pipes_get_plain_lines() {
        assert_eq!(log_style(true, false, false), (true, true));
        assert_eq!(log_style(true, true, false), (false, false));
        assert_eq!(log_style(false, false, false), (false, false));
        assert_eq!(log_style(false, false, true), (false, true));
        assert_eq!(log_style(false, true, true), (false, true));
    }
}
