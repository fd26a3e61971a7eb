//! The data node's side of automatic failover (docs/failover.md), as far
//! as it is wired: the **witness link**.
//!
//! With `[failover] mode = "witness"` a task keeps a link to the witness
//! (redialled with backoff), pings it every `heartbeat` with this node's
//! term (from the superblock), and keeps the witness's view (term, primary,
//! up-to-date set) for `status` (`failover.witness`); `witness-connected`
//! and `witness-lost` events tell when the link comes and goes. A secondary
//! adopts a higher term the witness shows (persisted in the superblock
//! first, `term-changed`): terms only move forward.
//!
//! Not wired yet (issue 10, stages C-D): the controller
//! (`failover::controller`) deciding promotions, the lease check on the NBD
//! reply path, terms on the data link. Until then a node with failover on
//! behaves as with `mode = "off"`, and status says so
//! (`failover.enabled: false` and `eligible_reason`).

use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::Node;
use super::witness::client::{ClientError, WitnessClient};
use crate::control;
use crate::event::Event;
use crate::failover::{BootClock, Clock, NodeIndex, NodeSet};
use crate::model::Role;

/// Longest delay between two dials of an unreachable witness.
const MAX_REDIAL: Duration = Duration::from_secs(2);

/// Why automatic failover is not active although configured.
pub const NOT_WIRED: &str =
    "automatic failover is not active in this build: the witness link runs, the controller is not wired yet (issue 10)";

/// `failover.witness` in the status.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WitnessLinkStatus {
    pub name: String,
    pub connected: bool,
    /// The witness's record as its last Pong showed it (`term` 0 and no
    /// primary when it has no state).
    pub term: u64,
    pub primary: Option<String>,
    pub uptodate: Vec<String>,
    /// The witness has a state file (it votes).
    pub has_state: bool,
    /// Milliseconds since the last Pong.
    pub last_pong_ms_ago: Option<u64>,
    /// Why the link is down (the last dial or link error).
    pub last_error: Option<String>,
}

/// `failover.lease` in the status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseStatus {
    pub valid: bool,
    pub remaining_ms: u64,
}

/// `failover` in the status (design.md §8).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverStatus {
    /// `off` or `witness`.
    pub mode: String,
    /// Whether this node takes part in automatic failover now.
    pub enabled: bool,
    pub witness: Option<WitnessLinkStatus>,
    pub lease: LeaseStatus,
    /// Whether this node could be promoted automatically now.
    pub eligible: bool,
    pub eligible_reason: Option<String>,
    pub last_failover: Option<serde_json::Value>,
}

impl FailoverStatus {
    /// The one status line (none with mode `off`):
    /// `failover:witness term:1 witness:gamma(connected, term 1, primary alpha) eligible:no (…)`.
    pub fn human_line(&self, term: u64) -> Option<String> {
        if self.mode.is_empty() || self.mode == "off" {
            return None;
        }
        let witness = match &self.witness {
            Some(w) if w.connected => {
                format!("{}(connected, term {}, primary {})", w.name, w.term, w.primary.as_deref().unwrap_or("none"))
            }
            Some(w) => format!("{}(not connected)", w.name),
            None => "none".into(),
        };
        let eligible = match (&self.eligible, &self.eligible_reason) {
            (true, _) => "yes".to_string(),
            (false, Some(r)) => format!("no ({r})"),
            (false, None) => "no".to_string(),
        };
        Some(format!("failover:{} term:{term} witness:{witness} eligible:{eligible}", self.mode))
    }
}

/// What the link task shares with `status`.
#[derive(Debug, Default)]
pub struct LinkShared {
    inner: Mutex<WitnessLinkStatus>,
    last_pong: Mutex<Option<Instant>>,
}

impl LinkShared {
    fn lock(&self) -> MutexGuard<'_, WitnessLinkStatus> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The link as status shows it.
    pub fn status(&self) -> WitnessLinkStatus {
        let mut s = self.lock().clone();
        s.last_pong_ms_ago =
            self.last_pong.lock().unwrap_or_else(|p| p.into_inner()).map(|t| t.elapsed().as_millis() as u64);
        s
    }
}

/// The `failover` object of `node`'s status.
pub fn status(node: &Node) -> FailoverStatus {
    let cfg = &node.config.failover;
    if !cfg.enabled() {
        return FailoverStatus { mode: cfg.mode.as_str().into(), ..FailoverStatus::default() };
    }
    FailoverStatus {
        mode: cfg.mode.as_str().into(),
        enabled: false,
        witness: Some(node.witness_link.status()),
        lease: LeaseStatus::default(),
        eligible: false,
        eligible_reason: Some(NOT_WIRED.into()),
        last_failover: None,
    }
}

/// Starts the witness link of `node` (failover mode `witness`); it ends
/// when `stop` turns true.
pub fn spawn(node: &Arc<Node>, stop: watch::Receiver<bool>) -> Option<JoinHandle<()>> {
    let w = node.config.witness.as_ref()?;
    if !node.config.failover.enabled() {
        return None;
    }
    node.witness_link.lock().name = w.name.clone();
    Some(tokio::spawn(run(Arc::downgrade(node), stop)))
}

async fn run(node: Weak<Node>, mut stop: watch::Receiver<bool>) {
    let mut delay = Duration::from_millis(100);
    loop {
        let Some(n) = node.upgrade() else { return };
        let heartbeat = n.config.failover.timings.heartbeat;
        let detect = n.config.failover.timings.detect;
        let client = tokio::select! {
            _ = control::stopped(&mut stop) => return,
            c = WitnessClient::connect(&n.config, &n.me.name, None, detect) => c,
        };
        drop(n);
        let why = match client {
            Ok(client) => {
                delay = Duration::from_millis(100);
                let Some(n) = node.upgrade() else { return };
                let witness = n.witness_link.lock().name.clone();
                n.witness_link.lock().connected = true;
                n.witness_link.lock().last_error = None;
                tracing::info!(%witness, "witness link up");
                n.emit(Event::WitnessConnected { witness: witness.clone() });
                drop(n);
                let why = tokio::select! {
                    _ = control::stopped(&mut stop) => return,
                    e = ping_loop(&node, client, heartbeat) => e,
                };
                let Some(n) = node.upgrade() else { return };
                n.witness_link.lock().connected = false;
                tracing::warn!(%witness, reason = %why, "witness link lost");
                n.emit(Event::WitnessLost { reason: why.to_string(), witness });
                why
            }
            Err(e) => e,
        };
        if let Some(n) = node.upgrade() {
            n.witness_link.lock().last_error = Some(why.to_string());
        }
        tokio::select! {
            _ = control::stopped(&mut stop) => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(MAX_REDIAL);
    }
}

/// Pings every `heartbeat` until the link fails; keeps the view.
async fn ping_loop(node: &Weak<Node>, mut client: WitnessClient, heartbeat: Duration) -> ClientError {
    let clock = BootClock;
    let mut tick = tokio::time::interval(heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(n) = node.upgrade() else { return ClientError::Closed };
        let term = n.volume.term();
        drop(n);
        let pong = match client.ping(term, clock.now().0).await {
            Ok(p) => p,
            Err(e) => return e,
        };
        let Some(n) = node.upgrade() else { return ClientError::Closed };
        *n.witness_link.last_pong.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        {
            let mut s = n.witness_link.lock();
            s.has_state = pong.view.is_some();
            s.term = pong.term;
            let (primary, mask) = pong.view.unwrap_or((None, 0));
            s.primary = primary.and_then(|p| n.config.node_name(NodeIndex(p))).map(str::to_string);
            s.uptodate = NodeSet(mask).iter().filter_map(|i| n.config.node_name(i)).map(str::to_string).collect();
        }
        if pong.view.is_some() && pong.term > term {
            adopt_term(&n, pong.term);
        }
    }
}

/// A secondary adopts the witness's higher term (persisted first). A
/// primary that sees one is a node another has replaced: fencing it is the
/// controller's job (not wired yet), so it is only logged.
fn adopt_term(node: &Node, term: u64) {
    if node.state().role == Role::Primary {
        tracing::warn!(term, ours = node.volume.term(), "the witness shows a higher term while this node is primary");
        return;
    }
    match node.volume.persist_term(term) {
        Ok(t) => {
            tracing::info!(term = t, "adopted the witness's term");
            let s = node.witness_link.status();
            node.emit(Event::TermChanged { primary: s.primary, term: t, uptodate: s.uptodate });
        }
        Err(e) => tracing::error!(term, error = %e, "cannot persist the term"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_human_line_shows_mode_term_witness_and_eligibility() {
        assert_eq!(FailoverStatus::default().human_line(0), None);
        let off = FailoverStatus { mode: "off".into(), ..FailoverStatus::default() };
        assert_eq!(off.human_line(0), None, "mode off adds no line");
        let mut f = FailoverStatus {
            mode: "witness".into(),
            witness: Some(WitnessLinkStatus {
                name: "gamma".into(),
                connected: true,
                term: 3,
                primary: Some("alpha".into()),
                ..WitnessLinkStatus::default()
            }),
            eligible_reason: Some("why".into()),
            ..FailoverStatus::default()
        };
        assert_eq!(
            f.human_line(3).unwrap(),
            "failover:witness term:3 witness:gamma(connected, term 3, primary alpha) eligible:no (why)"
        );
        f.witness.as_mut().unwrap().connected = false;
        assert_eq!(f.human_line(0).unwrap(), "failover:witness term:0 witness:gamma(not connected) eligible:no (why)");
    }
}
