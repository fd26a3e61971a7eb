//! The `before-resync-target` hook: the one point where the replication
//! core waits for something outside it before a resync writes to this
//! node's disk.
//!
//! The core knows nothing of handlers or of the config (docs/architecture.md):
//! the composition root (`node`) hands it a [`ResyncGate`] in
//! [`EngineConfig::before_resync_target`](super::engine::EngineConfig), and
//! the sync target calls `before_resync_target` when the source's
//! `SyncStart` of a bitmap or full resync arrives, before the disk is marked
//! inconsistent and before any resync data is applied. A log catch-up does
//! not call it: the target stays `consistent` through one (docs/resync.md).
//!
//! While the gate runs the session reads no frame: the source's data waits
//! in the socket (TCP back-pressure), and this node's heartbeat task keeps
//! pinging, so neither side declares the other lost.
//!
//! A refusal ends the session: the target says Goodbye with the reason and
//! goes standalone (it does not redial: a retry would run the handler again
//! at every attempt, and the operator's handler said no); `repctl connect`
//! tries again. A success is remembered for the data it covered (the
//! generations and LSN of both sides, this disk's state): if the session
//! ends before the resync writes anything (the source reconnects, the link
//! drops) and the next session resyncs the same data, the gate is not
//! called twice for it.

use std::fmt;
use std::sync::{Arc, Mutex};

use super::engine::Engine;
use super::store::BoxFut;
use crate::event::Event;
use crate::model::{DiskState, Lsn, ResyncKind, Role};

/// What the gate is asked about: a resync about to write to this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResyncRequest {
    pub kind: ResyncKind,
    /// The sync source.
    pub peer: String,
    /// This node's role (a target is always secondary today).
    pub role: Role,
    /// Bytes the source announced.
    pub total_bytes: u64,
}

/// Why the gate refused, as the handler runner saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The handler's name (`before-resync-target`).
    pub handler: String,
    /// What went wrong: `exit code 3`, `killed by signal 9`,
    /// `killed after the timeout of 30s`, `cannot run /x: …`.
    pub reason: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} handler failed ({})", self.handler, self.reason)
    }
}

/// Something that must agree before a resync writes to this node.
pub trait ResyncGate: Send + Sync {
    /// Resolves when the resync may start (`Ok`) or must not (`Err`).
    /// Bounded by the implementation (the handler timeout).
    fn before_resync_target(&self, req: ResyncRequest) -> BoxFut<'static, Result<(), Refusal>>;
}

/// The gate in [`EngineConfig`](super::engine::EngineConfig), with what its
/// last success covered.
#[derive(Clone)]
pub struct ResyncHook {
    gate: Arc<dyn ResyncGate>,
    passed: Arc<Mutex<Option<Covered>>>,
}

impl ResyncHook {
    pub fn new(gate: Arc<dyn ResyncGate>) -> ResyncHook {
        ResyncHook { gate, passed: Arc::new(Mutex::new(None)) }
    }
}

impl fmt::Debug for ResyncHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ResyncHook")
    }
}

/// The data a gate success was for: while all of it is unchanged, this
/// node's disk is the one the handler saw (nothing was written to it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Covered {
    source_generation: u64,
    generation: u64,
    disk: DiskState,
    local_lsn: Lsn,
}

/// Runs the gate, if one is configured, for a resync of `kind` from
/// `peer` (whose current generation is `source_generation`). `Err` holds
/// the message for the log, `status` (`link_error`) and the Goodbye; the
/// caller ends the session and goes standalone.
pub(crate) async fn before_resync_target(
    engine: &Arc<Engine>,
    kind: ResyncKind,
    total_bytes: u64,
    source_generation: u64,
) -> Result<(), String> {
    let Some(gate) = engine.cfg.before_resync_target.clone() else { return Ok(()) };
    let meta = engine.meta();
    let covered = Covered {
        source_generation,
        generation: meta.gen_ids.current,
        disk: meta.disk,
        local_lsn: engine.store.local_lsn(),
    };
    if *gate.passed.lock().unwrap_or_else(|p| p.into_inner()) == Some(covered) {
        tracing::info!(peer = %engine.cfg.peer, %kind, "before-resync-target already ran for this data: not called again");
        return Ok(());
    }
    let req = ResyncRequest { kind, peer: engine.cfg.peer.clone(), role: engine.role(), total_bytes };
    tracing::info!(peer = %engine.cfg.peer, %kind, bytes = total_bytes, "waiting for before-resync-target");
    match gate.gate.before_resync_target(req).await {
        Ok(()) => {
            *gate.passed.lock().unwrap_or_else(|p| p.into_inner()) = Some(covered);
            Ok(())
        }
        Err(refusal) => {
            *gate.passed.lock().unwrap_or_else(|p| p.into_inner()) = None;
            let why = format!(
                "{refusal}: the {kind} resync from {} did not start; standalone until `repctl connect`",
                engine.cfg.peer
            );
            tracing::error!(peer = %engine.cfg.peer, handler = %refusal.handler, "{why}");
            engine.emit(Event::SyncRefused {
                handler: refusal.handler,
                kind,
                peer: engine.cfg.peer.clone(),
                reason: refusal.reason,
            });
            Err(why)
        }
    }
}
