//! Handlers (`[handlers]` in the config, docs/config.md): DRBD-style
//! commands run when something happens to the node.
//!
//! | handler | runs | holds up |
//! | --- | --- | --- |
//! | `on-promote` | after `role-changed` to primary | nothing |
//! | `on-demote` | after `role-changed` to secondary | nothing |
//! | `before-resync-target` | on the sync target, when a bitmap or full resync is about to write to it | the resync (src/repl/resync_hook.rs) |
//! | `after-resync-target` | after `sync-finished` on the target (this node's disk is uptodate again) | nothing |
//! | `fence-peer` | on a primary, after `io-suspended` (`on_peer_loss = "suspend"`) or `peer-lost` (`"continue"`) | with `suspend`, the writes: its exit code decides whether they resume |
//! | `split-brain` | after `split-brain` (both nodes stay standalone) | nothing |
//! | `peer-lost` | after `peer-lost` | nothing |
//!
//! Each handler is an argv list, run without a shell, stdin from /dev/null,
//! stdout and stderr into repd's stderr (the journal under systemd). The
//! environment says what happened: `REPBLOCK_HANDLER`, `REPBLOCK_RESOURCE`,
//! `REPBLOCK_NODE`, `REPBLOCK_PEER` (empty on a single node), `REPBLOCK_ROLE`
//! (this node's role now), `REPBLOCK_TERM` (empty: no failover term is
//! kept by a running node yet, docs/failover.md) and `REPBLOCK_EVENT` (the
//! event's JSON line; for `before-resync-target`, which runs before any
//! event, empty, with `REPBLOCK_RESYNC_KIND` and `REPBLOCK_RESYNC_BYTES`
//! instead).
//!
//! The event-driven ones run one at a time, in event order, in a task of
//! their own. `before-resync-target` runs in the replication session that
//! waits for it. A handler still running after `timeout` is killed
//! (SIGKILL). Events `handler-called` (`handler`, `argv`) and
//! `handler-finished` (`handler`, `exit_code` or null, `signal` or null,
//! `duration_ms`, `timed_out`, `error` or null) report each run;
//! `sync-refused` and `peer-fencing` what the blocking ones decided.

use std::process::Stdio;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinHandle;

use super::Node;
use crate::config::{Config, Handlers, NodeConfig};
use crate::event::{Event, EventLine, SyncRole};
use crate::model::{OnPeerLoss, Role};
use crate::repl::resync_hook::{Refusal, ResyncGate, ResyncHook, ResyncRequest};
use crate::repl::store::BoxFut;

/// The handler an event calls, if configured (`fence-peer` is decided by
/// [`fence_trigger`], which needs the node's role and policy).
fn handler_for<'h>(h: &'h Handlers, e: &Event) -> Option<(&'static str, &'h Vec<String>)> {
    let (name, argv) = match e {
        Event::RoleChanged { role: Role::Primary, .. } => ("on-promote", &h.on_promote),
        Event::RoleChanged { role: Role::Secondary, .. } => ("on-demote", &h.on_demote),
        Event::SyncFinished { role: SyncRole::Target, .. } => ("after-resync-target", &h.after_resync_target),
        Event::SplitBrain { .. } => ("split-brain", &h.split_brain),
        Event::PeerLost { .. } => ("peer-lost", &h.peer_lost),
        _ => return None,
    };
    argv.as_ref().map(|a| (name, a))
}

/// Whether `e` calls `fence-peer` on a node of `role` under `policy`: a
/// primary that lost its peer. Under `suspend` the trigger is
/// `io-suspended` (any end of the session that suspended the writes);
/// under `continue`, `peer-lost` (the link failed; a peer that said
/// goodbye is not fenced).
fn fence_trigger(policy: OnPeerLoss, role: Role, e: &Event) -> bool {
    role == Role::Primary
        && match policy {
            OnPeerLoss::Suspend => *e == Event::IoSuspended,
            OnPeerLoss::Continue => matches!(e, Event::PeerLost { .. }),
        }
}

/// DRBD's fence-peer exit codes: whether the peer is fenced (it cannot
/// become primary with stale data) and what the code means.
pub fn fence_meaning(exit_code: Option<i32>) -> (bool, &'static str) {
    match exit_code {
        Some(3) => (true, "peer is inconsistent"),
        Some(4) => (true, "peer outdated"),
        Some(5) => (true, "peer down or unreachable"),
        Some(6) => (false, "peer is primary"),
        Some(7) => (true, "peer stonithed"),
        Some(_) => (false, "fence-peer handler failed (exit codes 3, 4, 5 and 7 mean fenced)"),
        None => (false, "fence-peer handler did not exit (signal, timeout or not started)"),
    }
}

/// Whether any event-driven handler is configured (the task of [`spawn`]
/// is needed).
pub fn any(h: &Handlers) -> bool {
    [&h.after_resync_target, &h.fence_peer, &h.split_brain, &h.peer_lost, &h.on_promote, &h.on_demote]
        .iter()
        .any(|a| a.is_some())
}

/// Starts the handler task of `node` (call once the node runs). It ends
/// at the `stopping` event (repd stops), when the node's event channel
/// closes, or when the node is dropped.
pub fn spawn(node: &Arc<Node>) -> JoinHandle<()> {
    let mut events = crate::control::ControlHandler::subscribe(&**node);
    let weak: Weak<Node> = Arc::downgrade(node);
    tokio::spawn(async move {
        loop {
            let e = match events.recv().await {
                Ok(e) => e,
                Err(RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "handlers: events were lost; their handlers did not run");
                    continue;
                }
                Err(RecvError::Closed) => return,
            };
            if e.event == Event::Stopping {
                return;
            }
            let Some(node) = weak.upgrade() else { return };
            let runner = Runner::of(&node.config, &node.me, node.events.clone());
            if let Some(argv) = &node.config.handlers.fence_peer
                && fence_trigger(node.config.on_peer_loss, node.role(), &e.event)
            {
                fence_peer(&node, &runner, argv, &e).await;
            }
            let Some((name, argv)) = handler_for(&node.config.handlers, &e.event) else { continue };
            let event = serde_json::to_string(&e).unwrap_or_default();
            runner.run(name, argv, node.role(), &[("REPBLOCK_EVENT", event)]).await;
        }
    })
}

/// Runs `fence-peer` and acts on its exit code: under `suspend`, a fenced
/// peer releases the suspended writes (unless the peer is back already).
async fn fence_peer(node: &Node, runner: &Runner, argv: &[String], e: &EventLine) {
    let event = serde_json::to_string(e).unwrap_or_default();
    let done = runner.run("fence-peer", argv, node.role(), &[("REPBLOCK_EVENT", event)]).await;
    let (fenced, meaning) = fence_meaning(done.exit_code);
    let peer = runner.peer.clone();
    let mut io_resumed = false;
    if node.config.on_peer_loss == OnPeerLoss::Suspend
        && let Some(engine) = node.replication()
    {
        if !fenced {
            tracing::error!(%peer, exit_code = ?done.exit_code, "fence-peer: {meaning}: writes stay suspended until the peer is back or `repctl resume-io`");
        } else if engine.is_connected() {
            tracing::info!(%peer, exit_code = ?done.exit_code, "fence-peer: {meaning}, but the peer is connected again: nothing to resume");
        } else if node.role() != Role::Primary {
            tracing::info!(%peer, exit_code = ?done.exit_code, "fence-peer: {meaning}, but this node is no longer primary");
        } else {
            tracing::warn!(%peer, exit_code = ?done.exit_code, "fence-peer: {meaning}: resuming writes without the peer");
            io_resumed = engine.gate().resume_io();
        }
    } else {
        tracing::info!(%peer, exit_code = ?done.exit_code, fenced, "fence-peer: {meaning}");
    }
    node.emit(Event::PeerFencing { exit_code: done.exit_code, fenced, io_resumed, meaning: meaning.to_string(), peer });
}

/// The `before-resync-target` gate of `me`, if configured, for the
/// replication engine's config (src/repl/resync_hook.rs).
pub fn resync_gate(config: &Config, me: &NodeConfig, events: &broadcast::Sender<EventLine>) -> Option<ResyncHook> {
    let argv = config.handlers.before_resync_target.clone()?;
    let runner = Runner::of(config, me, events.clone());
    Some(ResyncHook::new(Arc::new(BeforeResyncTarget { runner, argv })))
}

struct BeforeResyncTarget {
    runner: Runner,
    argv: Vec<String>,
}

impl ResyncGate for BeforeResyncTarget {
    fn before_resync_target(&self, req: ResyncRequest) -> BoxFut<'static, Result<(), Refusal>> {
        let runner = self.runner.clone();
        let argv = self.argv.clone();
        Box::pin(async move {
            let env = [
                ("REPBLOCK_EVENT", String::new()),
                ("REPBLOCK_RESYNC_KIND", req.kind.to_string()),
                ("REPBLOCK_RESYNC_BYTES", req.total_bytes.to_string()),
            ];
            let done = runner.run("before-resync-target", &argv, req.role, &env).await;
            match (done.exit_code, done.signal) {
                (Some(0), _) => Ok(()),
                (Some(code), _) => Err(format!("exit code {code}")),
                (None, _) if done.timed_out => Err(done.error.unwrap_or_else(|| "timed out".into())),
                (None, Some(sig)) => Err(format!("killed by signal {sig}")),
                (None, None) => Err(done.error.unwrap_or_else(|| "did not run".into())),
            }
            .map_err(|reason| Refusal { handler: "before-resync-target".into(), reason })
        })
    }
}

/// How a handler run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Finished {
    exit_code: Option<i32>,
    signal: Option<i32>,
    timed_out: bool,
    error: Option<String>,
}

/// What running a handler needs of a node (so that the replication core's
/// gate can run one without the node).
#[derive(Clone)]
struct Runner {
    timeout: Duration,
    resource: String,
    node: String,
    peer: String,
    events: broadcast::Sender<EventLine>,
}

impl Runner {
    fn of(config: &Config, me: &NodeConfig, events: broadcast::Sender<EventLine>) -> Runner {
        Runner {
            timeout: config.handlers.timeout,
            resource: config.name.clone(),
            node: me.name.clone(),
            peer: config.peer_of(&me.name).map_or_else(String::new, |p| p.name.clone()),
            events,
        }
    }

    fn emit(&self, event: Event) {
        let _ = self.events.send(EventLine::now(event));
    }

    /// Runs one handler to its end (or its timeout) and reports it.
    async fn run(&self, name: &'static str, argv: &[String], role: Role, env: &[(&str, String)]) -> Finished {
        let timeout = self.timeout;
        self.emit(Event::HandlerCalled { argv: argv.to_vec(), handler: name.to_string() });
        tracing::info!(handler = name, argv = ?argv, "running handler");
        let start = Instant::now();
        let mut cmd = tokio::process::Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .env("REPBLOCK_HANDLER", name)
            .env("REPBLOCK_RESOURCE", &self.resource)
            .env("REPBLOCK_NODE", &self.node)
            .env("REPBLOCK_PEER", &self.peer)
            .env("REPBLOCK_ROLE", role.to_string())
            .env("REPBLOCK_TERM", "");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let (exit_code, signal, timed_out, error) = match cmd.spawn() {
            Err(err) => (None, None, false, Some(format!("cannot run {}: {err}", argv[0]))),
            Ok(mut child) => match tokio::time::timeout(timeout, child.wait()).await {
                Ok(Ok(status)) => {
                    use std::os::unix::process::ExitStatusExt;
                    (status.code(), status.signal(), false, None)
                }
                Ok(Err(err)) => (None, None, false, Some(format!("waiting for {} failed: {err}", argv[0]))),
                Err(_) => {
                    let _ = child.kill().await;
                    (None, Some(libc::SIGKILL), true, Some(format!("killed after the timeout of {timeout:?}")))
                }
            },
        };
        let duration_ms = duration_ms(start.elapsed());
        if exit_code == Some(0) {
            tracing::info!(handler = name, duration_ms, "handler done");
        } else {
            tracing::warn!(
                handler = name,
                ?exit_code,
                ?signal,
                duration_ms,
                error = error.as_deref().unwrap_or(""),
                "handler failed"
            );
        }
        self.emit(Event::HandlerFinished {
            duration_ms,
            error: error.clone(),
            exit_code,
            handler: name.to_string(),
            signal,
            timed_out,
        });
        Finished { exit_code, signal, timed_out, error }
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_map_to_their_handlers() {
        let h = Handlers {
            on_promote: Some(vec!["p".into()]),
            on_demote: Some(vec!["d".into()]),
            after_resync_target: Some(vec!["a".into()]),
            split_brain: Some(vec!["s".into()]),
            peer_lost: None,
            ..Handlers::default()
        };
        let pick = |e: &Event| handler_for(&h, e).map(|(n, a)| (n, a[0].clone()));
        let role_changed = |role| Event::RoleChanged { disconnected_clients: None, forced: None, role };
        let sync_finished = |role| Event::SyncFinished {
            bytes: 0,
            kind: crate::model::ResyncKind::Full,
            peer: "beta".into(),
            role,
            seconds: 0.0,
        };
        let split_brain = Event::SplitBrain {
            explanation: String::new(),
            local_out_of_sync_bytes: 0,
            peer: "beta".into(),
            peer_out_of_sync_bytes: 0,
            rule: String::new(),
        };
        let peer_lost = Event::PeerLost { peer: "beta".into(), reason: String::new() };
        let disk_changed = Event::DiskChanged {
            clear_bitmap: None,
            disk: crate::model::DiskState::UpToDate,
            forced: None,
            from: crate::model::DiskState::Outdated,
        };
        assert_eq!(pick(&role_changed(Role::Primary)), Some(("on-promote", "p".into())));
        assert_eq!(pick(&role_changed(Role::Secondary)), Some(("on-demote", "d".into())));
        assert_eq!(pick(&sync_finished(SyncRole::Target)), Some(("after-resync-target", "a".into())));
        assert_eq!(pick(&sync_finished(SyncRole::Source)), None);
        assert_eq!(pick(&split_brain), Some(("split-brain", "s".into())));
        assert_eq!(pick(&peer_lost), None, "not configured");
        assert_eq!(pick(&disk_changed), None);
        assert!(any(&h));
        assert!(!any(&Handlers::default()));
        // The blocking ones are not called from the event map.
        let h = Handlers {
            before_resync_target: Some(vec!["b".into()]),
            fence_peer: Some(vec!["f".into()]),
            ..Handlers::default()
        };
        assert_eq!(handler_for(&h, &peer_lost), None);
        assert!(any(&h), "fence-peer runs in the event task");
        let gate_only = Handlers { before_resync_target: Some(vec!["b".into()]), ..Handlers::default() };
        assert!(!any(&gate_only), "before-resync-target runs in the session, not in the event task");
    }

    #[test]
    fn fence_peer_runs_on_a_primary_that_lost_its_peer() {
        let lost = Event::PeerLost { peer: "beta".into(), reason: String::new() };
        let left = Event::PeerDisconnected { peer: "beta".into(), reason: String::new() };
        assert!(fence_trigger(OnPeerLoss::Suspend, Role::Primary, &Event::IoSuspended));
        assert!(!fence_trigger(OnPeerLoss::Suspend, Role::Primary, &lost), "suspend: once, at io-suspended");
        assert!(!fence_trigger(OnPeerLoss::Suspend, Role::Secondary, &Event::IoSuspended));
        assert!(fence_trigger(OnPeerLoss::Continue, Role::Primary, &lost));
        assert!(!fence_trigger(OnPeerLoss::Continue, Role::Primary, &left), "a peer that said goodbye");
        assert!(!fence_trigger(OnPeerLoss::Continue, Role::Secondary, &lost));
    }

    #[test]
    fn fence_peer_exit_codes_follow_drbd() {
        let fenced: Vec<i32> = (0..=255).filter(|c| fence_meaning(Some(*c)).0).collect();
        assert_eq!(fenced, vec![3, 4, 5, 7]);
        assert_eq!(fence_meaning(Some(6)), (false, "peer is primary"));
        assert!(!fence_meaning(None).0);
    }
}
