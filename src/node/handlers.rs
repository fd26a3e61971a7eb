//! Handlers (`[handlers]` in the config, docs/config.md): DRBD-style
//! commands run when something happens to the node.
//!
//! | handler | runs after the event |
//! | --- | --- |
//! | `on-promote` | `role-changed` to primary |
//! | `on-demote` | `role-changed` to secondary |
//! | `after-resync-target` | `sync-finished` on the target (this node's disk is uptodate again) |
//! | `split-brain` | `split-brain` (both nodes stay standalone) |
//! | `peer-lost` | `peer-lost` |
//!
//! Each handler is an argv list, run without a shell, stdin from /dev/null,
//! stdout and stderr into repd's stderr (the journal under systemd). The
//! environment says what happened: `REPBLOCK_HANDLER`, `REPBLOCK_RESOURCE`,
//! `REPBLOCK_NODE`, `REPBLOCK_PEER` (empty on a single node), `REPBLOCK_ROLE`
//! (this node's role now) and `REPBLOCK_EVENT` (the event's JSON line).
//!
//! They run one at a time, in event order, in a task of their own: they
//! notify, they never hold the node up (a blocking `before-resync-target`
//! or `fence-peer` needs the engine to pause a session, which it cannot
//! yet). A handler still running after `timeout` is killed (SIGKILL).
//! Events `handler-called` (`handler`, `argv`) and `handler-finished`
//! (`handler`, `exit_code` or null, `signal` or null, `duration_ms`,
//! `timed_out`, `error` or null) report each run.

use std::process::Stdio;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinHandle;

use super::Node;
use crate::config::Handlers;
use crate::event::{Event, EventLine, SyncRole};
use crate::model::Role;

/// The handler an event calls, if configured.
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

/// Whether any handler is configured.
pub fn any(h: &Handlers) -> bool {
    [&h.after_resync_target, &h.split_brain, &h.peer_lost, &h.on_promote, &h.on_demote].iter().any(|a| a.is_some())
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
            let Some((name, argv)) = handler_for(&node.config.handlers, &e.event) else { continue };
            let argv = argv.clone();
            run(&node, name, &argv, &e).await;
        }
    })
}

/// Runs one handler to its end (or its timeout) and reports it.
async fn run(node: &Node, name: &'static str, argv: &[String], e: &EventLine) {
    let timeout = node.config.handlers.timeout;
    node.emit(Event::HandlerCalled { argv: argv.to_vec(), handler: name.to_string() });
    tracing::info!(handler = name, argv = ?argv, "running handler");
    let start = Instant::now();
    let mut cmd = tokio::process::Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .env("REPBLOCK_HANDLER", name)
        .env("REPBLOCK_RESOURCE", &node.config.name)
        .env("REPBLOCK_NODE", &node.me.name)
        .env("REPBLOCK_PEER", node.config.peer_of(&node.me.name).map_or("", |p| p.name.as_str()))
        .env("REPBLOCK_ROLE", node.role().to_string())
        .env("REPBLOCK_EVENT", serde_json::to_string(e).unwrap_or_default());
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
    node.emit(Event::HandlerFinished { duration_ms, error, exit_code, handler: name.to_string(), signal, timed_out });
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
    }
}
