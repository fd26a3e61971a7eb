//! The node state machine: role, disk state, and the NBD export while
//! primary.
//!
//! ```text
//!             promote (disk uptodate, or --force)
//!   secondary ───────────────────────────────────► primary ── NBD export up
//!       ▲                                             │
//!       └──────────── demote (no clients, or --force) ┘
//! ```
//!
//! - A node always starts **secondary**, whatever it was before it stopped
//!   (as DRBD: a restarted node never serves until promoted).
//! - The disk state lives in the superblock: `inconsistent` after
//!   `create-md`, `uptodate` once an operator forced a promote (single node:
//!   the data is then the truth). With a peer, the replication engine moves
//!   it through `inconsistent` (a sync target) and `consistent` back to
//!   `uptodate` (docs/resync.md); nothing sets `outdated` yet (there is no
//!   outdate-peer handshake, docs/replication.md "Not yet").
//! - Only a primary accepts NBD clients: the export is started by promote
//!   and stopped by demote and by shutdown.
//! - A two-node resource runs a replication engine ([`crate::repl::engine`]):
//!   the link to the peer, the log stream (primary) or its application
//!   (secondary), and the gate that holds NBD replies until the peer
//!   acknowledged what the protocol requires. The engine learns the role
//!   from here; the disk state lives in the superblock, where a full sync
//!   (secondary side) updates it.
//!
//! Transitions are serialised by one async mutex; `status` never waits for
//! one (it reads a snapshot under a short std mutex).

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::broadcast;

use crate::config::{Config, NodeConfig};
use crate::control::{Demoted, InSync, Promoted};
use crate::event::{Event, EventLine};
use crate::io::EngineKind;
use crate::model::{ConnState, DiskState, ReplState, Role};
use crate::repl::engine::Engine;
use crate::repl::store::ReplStore;
use crate::volume::{Volume, VolumeError};

pub mod backend;
mod commands;
pub mod daemon;
mod export;
pub mod failover;
pub mod handlers;
pub mod metrics;
pub mod status;
pub mod systemd;
pub mod witness;

pub use backend::VolumeBackend;
pub use commands::{Reply, probe_human};
pub use status::Status;

/// Why a node operation failed. The messages go to `repctl` users as they
/// are.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The operation was refused; the message says why and what to do.
    #[error("{0}")]
    Refused(String),
    #[error("{what}: {source}")]
    Volume {
        what: &'static str,
        #[source]
        source: VolumeError,
    },
    #[error("Cannot start the NBD export: {0}")]
    Export(String),
    #[error("{cmd}: not available: {why}")]
    NotAvailable { cmd: &'static str, why: &'static str },
    #[error("{0}")]
    Replication(String),
    /// A TLS reload failed; the message names the file.
    #[error("TLS reload failed (the previous certificates stay in use): {0}")]
    Tls(String),
}

/// The mutable part of the node.
#[derive(Debug)]
struct State {
    role: Role,
    export: Option<export::Export>,
    failed_reported: bool,
}

/// One node of a resource, running.
#[derive(Debug)]
pub struct Node {
    config: Config,
    me: NodeConfig,
    volume: Arc<Volume>,
    engine: EngineKind,
    state: Mutex<State>,
    transition: tokio::sync::Mutex<()>,
    events: broadcast::Sender<EventLine>,
    /// The replication engine (two-node resources).
    repl: Option<Arc<Engine>>,
    /// NBD request counters (status statistics, /metrics).
    io_stats: Arc<crate::stats::IoStats>,
    /// The witness link (automatic failover), as status shows it.
    witness_link: failover::LinkShared,
    /// TLS credentials (`[tls]`), if anything uses TLS.
    tls: Option<Arc<crate::tls::TlsContext>>,
}

impl Node {
    /// A secondary node over an open volume; the disk state comes from the
    /// superblock.
    pub fn new(config: Config, me: NodeConfig, volume: Arc<Volume>, engine: EngineKind) -> Arc<Node> {
        Node::with_store(config, me, volume, engine, None, None)
    }

    /// A node whose replication (two-node resources) runs over `store`.
    /// Call [`Node::start_replication`] to bring the link up.
    pub fn with_store(
        config: Config,
        me: NodeConfig,
        volume: Arc<Volume>,
        engine: EngineKind,
        store: Option<Arc<dyn ReplStore>>,
        tls: Option<Arc<crate::tls::TlsContext>>,
    ) -> Arc<Node> {
        let disk = volume.superblock().disk_state;
        let (events, _) = broadcast::channel(256);
        let repl = match (daemon::engine_config(&config, &me, tls.as_ref()), store) {
            (Some(mut cfg), Some(store)) => {
                cfg.before_resync_target = handlers::resync_gate(&config, &me, &events);
                Some(Engine::new(cfg, store, Role::Secondary, events.clone()))
            }
            _ => None,
        };
        tracing::info!(resource = %config.name, node = %me.name, role = "secondary", %disk, "node started");
        Arc::new(Node {
            config,
            me,
            volume,
            engine,
            state: Mutex::new(State { role: Role::Secondary, export: None, failed_reported: false }),
            transition: tokio::sync::Mutex::new(()),
            events,
            repl,
            io_stats: Arc::default(),
            witness_link: failover::LinkShared::default(),
            tls,
        })
    }

    /// Binds the replication address and starts connecting to the peer.
    pub async fn start_replication(&self) -> Result<(), NodeError> {
        match &self.repl {
            Some(e) => e.start().await.map_err(|e| NodeError::Replication(e.to_string())),
            None => Ok(()),
        }
    }

    /// The replication engine, if this is a two-node resource.
    pub fn replication(&self) -> Option<&Arc<Engine>> {
        self.repl.as_ref()
    }

    /// The disk state (from the superblock, which a full sync updates).
    fn disk(&self) -> DiskState {
        self.volume.superblock().disk_state
    }

    fn repl_or(&self, cmd: &'static str) -> Result<&Arc<Engine>, NodeError> {
        self.repl
            .as_ref()
            .ok_or(NodeError::NotAvailable { cmd, why: "this resource has a single node (no peer to replicate to)" })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding this short lock leaves plain data behind;
        // keep serving status rather than propagating the poison.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn emit(&self, event: Event) {
        // No subscriber is not an error.
        let _ = self.events.send(EventLine::now(event));
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn volume(&self) -> &Arc<Volume> {
        &self.volume
    }

    pub fn role(&self) -> Role {
        self.state().role
    }

    /// The volume's fail-stop reason, emitting a `failed` event the first
    /// time it is seen.
    fn check_failed(&self) -> Option<String> {
        let failed = self.volume.status().failed;
        if let Some(reason) = &failed {
            let mut st = self.state();
            if !st.failed_reported {
                st.failed_reported = true;
                drop(st);
                tracing::error!(reason = %reason, "volume stopped taking writes");
                self.emit(Event::Failed { reason: reason.clone() });
            }
        }
        failed
    }

    /// Becomes primary and starts the NBD export.
    pub async fn promote(&self, force: bool) -> Result<Promoted, NodeError> {
        let _t = self.transition.lock().await;
        if self.state().role == Role::Primary {
            return Ok(Promoted { role: Role::Primary, changed: false, nbd: None });
        }
        if let Some(reason) = self.check_failed() {
            return Err(NodeError::Refused(format!(
                "cannot promote: the volume stopped taking writes ({reason}); restart repd once the disk is fixed"
            )));
        }
        if let Some(repl) = &self.repl {
            if repl.peer_is_primary(ROLE_SETTLE).await {
                return Err(NodeError::Refused(format!(
                    "cannot promote: peer {} is primary; demote it first (two primaries would be a split brain)",
                    repl.config().peer
                )));
            }
            // Checked and changed atomically with the session's decision.
            let promoted = repl.promote(force).map_err(NodeError::Refused)?;
            if promoted.new_generation {
                tracing::info!(node = %self.me.name, "promoted without the peer: a new generation; the peer resyncs from this node when it is back");
            }
            repl.settle_role(promoted.was_connected, ROLE_SETTLE).await;
        } else {
            let disk = self.disk();
            if disk != DiskState::UpToDate {
                if !force {
                    return Err(NodeError::Refused(refuse_promote_message(disk)));
                }
                tracing::warn!(node = %self.me.name, from = %disk, "promote --force: this node's data becomes the truth");
                // A durable superblock write: off the async workers.
                let volume = Arc::clone(&self.volume);
                tokio::task::spawn_blocking(move || volume.update_superblock(|sb| sb.disk_state = DiskState::UpToDate))
                    .await
                    .map_err(|e| NodeError::Refused(format!("cannot record the disk as uptodate: task failed: {e}")))?
                    .map_err(|source| NodeError::Volume { what: "cannot record the disk as uptodate", source })?;
                self.emit(Event::DiskChanged {
                    clear_bitmap: None,
                    disk: DiskState::UpToDate,
                    forced: Some(force),
                    from: disk,
                });
            }
        }
        let backend = Arc::new(
            VolumeBackend::with_gate(Arc::clone(&self.volume), self.repl.as_ref().map(|r| r.gate().clone()))
                .with_stats(Arc::clone(&self.io_stats)),
        );
        let cfg = export::ExportConfig {
            export_name: self.config.name.clone(),
            description: format!("repblock resource {} on node {}", self.config.name, self.me.name),
            max_connections: self.config.max_clients as usize,
            max_inflight_bytes: usize::try_from(self.config.nbd_max_inflight).unwrap_or(usize::MAX),
            stall_timeout: self.config.nbd_stall_timeout,
            tls: self
                .tls
                .as_ref()
                .filter(|t| t.settings().nbd != crate::tls::NbdTlsMode::Off)
                .map(|t| crate::nbd::NbdTls { mode: t.settings().nbd, context: Arc::clone(t) }),
        };
        let export = match export::start(&self.me.nbd, backend, cfg).await {
            Ok(e) => e,
            Err(e) => {
                if let Some(repl) = &self.repl {
                    repl.set_role(Role::Secondary, Duration::ZERO).await;
                }
                return Err(NodeError::Export(e));
            }
        };
        {
            let mut st = self.state();
            st.export = Some(export);
            st.role = Role::Primary;
        }
        let uri = self.me.nbd.uri(&self.config.name);
        tracing::info!(node = %self.me.name, role = "primary", nbd = %uri, forced = force, "promoted");
        self.emit(Event::RoleChanged { disconnected_clients: None, forced: Some(force), role: Role::Primary });
        self.emit(Event::NbdStarted { address: self.me.nbd.to_string(), uri: uri.clone() });
        Ok(Promoted { role: Role::Primary, changed: true, nbd: Some(uri) })
    }

    /// Becomes secondary: stops the export (refused while clients are
    /// attached unless `force`, which disconnects them) and flushes.
    pub async fn demote(&self, force: bool) -> Result<Demoted, NodeError> {
        let _t = self.transition.lock().await;
        let clients = {
            let st = self.state();
            if st.role == Role::Secondary {
                return Ok(Demoted { role: Role::Secondary, changed: false, disconnected_clients: None });
            }
            st.export.as_ref().map_or(0, |e| e.client_count())
        };
        if clients > 0 && !force {
            return Err(NodeError::Refused(format!(
                "cannot demote: {clients} NBD client{} attached; disconnect {} first, or use --force, which disconnects {}",
                if clients == 1 { " is" } else { "s are" },
                if clients == 1 { "it" } else { "them" },
                if clients == 1 { "it" } else { "them" },
            )));
        }
        self.stop_export().await;
        if let Some(repl) = &self.repl {
            // Every completed write must have reached the peer before it
            // may become primary.
            let lsn = self.volume.status().local_lsn;
            if repl.is_connected() && !repl.gate().wait_received(lsn, DEMOTE_WAIT).await {
                tracing::warn!(lsn, "demote: the peer did not receive every completed write within {DEMOTE_WAIT:?}");
            }
            repl.set_role(Role::Secondary, ROLE_SETTLE).await;
        }
        self.state().role = Role::Secondary;
        tracing::info!(node = %self.me.name, role = "secondary", disconnected = clients, "demoted");
        self.emit(Event::RoleChanged { disconnected_clients: Some(clients), forced: None, role: Role::Secondary });
        // Every write completed before the export stopped is now durable.
        self.volume
            .flush()
            .await
            .map_err(|source| NodeError::Volume { what: "demoted, but the final flush failed", source })?;
        Ok(Demoted { role: Role::Secondary, changed: true, disconnected_clients: Some(clients) })
    }

    /// Shuts the export down (if up) and waits for in-flight requests.
    async fn stop_export(&self) {
        let export = self.state().export.take();
        if let Some(export) = export {
            export.shutdown().await;
            self.emit(Event::NbdStopped { address: self.me.nbd.to_string() });
        }
    }

    /// `status.tls`, if TLS is configured.
    fn tls_status(
        &self,
        view: Option<&crate::repl::engine::LinkView>,
        nbd_tls_clients: usize,
    ) -> Option<status::TlsStatus> {
        let tls = self.tls.as_ref()?;
        let now = std::time::SystemTime::now();
        let days = |c: &crate::tls::CertInfo| c.expires_in(now) / 86400;
        let s = tls.settings();
        let connected = view.is_some_and(|v| v.connection == ConnState::Connected);
        let session = view.and_then(|v| v.tls.as_ref()).filter(|_| connected);
        let peer = session.and_then(|t| t.peer_cert.as_ref());
        let certs = tls.certificates();
        let mut warnings: Vec<String> = certs.iter().filter_map(|c| c.expiry_warning(now)).collect();
        warnings.extend(peer.and_then(|c| c.expiry_warning(now)).map(|w| format!("peer {w}")));
        Some(status::TlsStatus {
            dir: s.dir.display().to_string(),
            nbd: s.nbd.as_str().into(),
            nbd_verify_client: s.nbd_verify_client,
            nbd_tls_clients,
            replication: status::TlsLinkStatus {
                mode: s.replication.as_str().into(),
                encrypted: session.is_some(),
                version: session.map(|t| t.version.clone()),
                cipher: session.map(|t| t.cipher.clone()),
                peer_subject: peer.map(|c| c.subject.clone()),
                peer_not_after: peer.map(|c| c.not_after),
                peer_expires_in_days: peer.map(days),
            },
            certificates: certs
                .iter()
                .map(|c| status::CertStatus {
                    file: c.file.display().to_string(),
                    subject: c.subject.clone(),
                    not_after: c.not_after,
                    expires_in_days: days(c),
                })
                .collect(),
            warnings,
        })
    }

    /// Reads the TLS certificate files again (SIGHUP, `repctl reload-tls`):
    /// new handshakes use them, established connections keep theirs; on an
    /// error the old credentials stay in use. Returns what is now in use.
    pub fn reload_tls(&self) -> Result<String, NodeError> {
        let tls = self
            .tls
            .as_ref()
            .ok_or(NodeError::NotAvailable { cmd: "reload-tls", why: "TLS is off ([tls] in the config)" })?;
        match tls.reload() {
            Ok(report) => {
                let now = std::time::SystemTime::now();
                for w in report.certs.iter().filter_map(|c| c.expiry_warning(now)) {
                    tracing::warn!("TLS: {w}");
                }
                let list: Vec<String> = report
                    .certs
                    .iter()
                    .map(|c| format!("{} ({}, {} days left)", c.file.display(), c.subject, c.expires_in(now) / 86400))
                    .collect();
                tracing::info!(certificates = %list.join("; "), "TLS certificates reloaded");
                Ok(format!("reloaded {}", list.join("; ")))
            }
            Err(e) => {
                tracing::error!(error = %e, "TLS reload failed; the previous certificates stay in use");
                Err(NodeError::Tls(e.to_string()))
            }
        }
    }

    /// The status object (design.md §6).
    pub fn status(&self) -> Status {
        let failed = self.check_failed();
        let vs = self.volume.status();
        let disk = self.disk();
        let (role, clients, serving, tls_clients) = {
            let st = self.state();
            let e = st.export.as_ref();
            (st.role, e.map_or(0, |e| e.client_count()), e.is_some(), e.map_or(0, |e| e.tls_client_count()))
        };
        let peer = self.config.peer_of(&self.me.name);
        let view = self.repl.as_ref().map(|r| r.view());
        let resync = match view.as_ref().and_then(|v| v.resync) {
            Some(r) => status::ResyncStatus {
                done_bytes: r.done_bytes,
                total_bytes: r.total_bytes,
                speed_bytes_per_sec: r.speed_bytes_per_sec,
                eta_seconds: r.eta_seconds(),
                kind: Some(r.kind.as_str().into()),
            },
            None => status::ResyncStatus::default(),
        };
        // What the running resync has left to move, else the bitmap's
        // dirty bytes (what the peer may lack or have differently).
        let out_of_sync = match (&self.repl, view.as_ref().and_then(|v| v.resync)) {
            (_, Some(r)) => r.total_bytes.saturating_sub(r.done_bytes),
            (Some(repl), None) => repl.dirty_bytes(),
            (None, None) => 0,
        };
        let acks = view.as_ref().map(|v| v.acks).unwrap_or_default();
        Status {
            resource: self.config.name.clone(),
            node: self.me.name.clone(),
            role,
            disk,
            connection: match &view {
                Some(v) => v.connection,
                None if peer.is_some() => ConnState::Connecting,
                None => ConnState::Standalone,
            },
            replication: view.as_ref().and_then(|v| v.replication),
            protocol: self.config.protocol,
            peer: status::PeerStatus {
                name: peer.map(|p| p.name.clone()),
                role: view.as_ref().and_then(|v| v.peer_role),
                disk: peer.map(|_| view.as_ref().map_or(DiskState::Unknown, |v| v.peer_disk)),
            },
            out_of_sync_bytes: out_of_sync,
            resync,
            lsn: status::LsnStatus {
                local: vs.local_lsn,
                peer_received: acks.received,
                peer_written: acks.written,
                peer_durable: acks.durable,
            },
            tls: self.tls_status(view.as_ref(), tls_clients),
            io_suspended: view.as_ref().is_some_and(|v| v.suspended),
            link_error: view.as_ref().and_then(|v| v.last_error.clone()),
            bitmap_granularity: self.repl.as_ref().map_or(self.config.bitmap_granularity, |r| r.bitmap_granularity()),
            decision: view.as_ref().and_then(|v| v.decision.as_ref()).map(|d| status::DecisionStatus {
                result: d.result.clone(),
                rule: d.rule.clone(),
                explanation: d.explanation.clone(),
            }),
            split_brain: view.as_ref().is_some_and(|v| v.split_brain),
            last_sync: view.as_ref().and_then(|v| v.last_sync).map(|l| status::LastSyncStatus {
                kind: l.kind.as_str().into(),
                bytes: l.bytes,
                seconds: l.seconds,
            }),
            verify: self.repl.as_ref().map(|r| r.verify.status()).unwrap_or_default(),
            size: self.config.size,
            block_size: self.config.block_size,
            io_engine: self.engine,
            nbd: status::NbdStatus {
                address: self.me.nbd.to_string(),
                uri: self.me.nbd.uri(&self.config.name),
                serving,
                clients,
            },
            wal: status::WalStatus {
                bytes: vs.wal_bytes,
                checkpoint_lsn: vs.checkpoint_lsn,
                durable_lsn: vs.durable_lsn,
            },
            statistics: self.statistics(&vs),
            failed,
            pid: std::process::id(),
            term: self.volume.term(),
            failover: failover::status(self),
        }
    }

    /// Returns once the disk is uptodate and nothing is out of sync: for a
    /// two-node resource, connected, `established`, and both disks
    /// uptodate.
    ///
    /// A single node returns at once when healthy; one that needs a sync
    /// source is an error rather than a wait that cannot end.
    pub async fn wait_sync(&self, timeout: Option<Duration>) -> Result<InSync, NodeError> {
        let Some(repl) = &self.repl else {
            let disk = self.disk();
            if let Some(peer) = self.config.peer_of(&self.me.name) {
                return Err(NodeError::Refused(format!(
                    "wait-sync: peer {} is not connected (replication is not running); disk is {disk}",
                    peer.name
                )));
            }
            if disk != DiskState::UpToDate {
                return Err(NodeError::Refused(format!(
                    "wait-sync: disk is {disk} and no sync source is connected (single-node resource: \
                     `promote --force` makes this node's data the truth)"
                )));
            }
            return Ok(InSync { disk, peer_disk: None, out_of_sync_bytes: 0 });
        };
        // A timeout beyond what the clock can represent (`timeout_secs`
        // 1.8e19) means "no deadline"; `Instant + Duration` would panic.
        let deadline = timeout.and_then(|t| tokio::time::Instant::now().checked_add(t));
        loop {
            let v = repl.view();
            let disk = self.disk();
            if v.connection == ConnState::Connected
                && v.replication == Some(ReplState::Established)
                && disk == DiskState::UpToDate
                && v.peer_disk == DiskState::UpToDate
            {
                return Ok(InSync { disk, peer_disk: Some(v.peer_disk), out_of_sync_bytes: 0 });
            }
            if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                return Err(NodeError::Refused(format!(
                    "wait-sync: timed out: connection {}, replication {}, disk {disk}, peer disk {}",
                    v.connection,
                    v.replication.map_or("none", |r| r.as_str()),
                    v.peer_disk
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Graceful stop: export down, volume closed (clean flag set).
    pub async fn shutdown(&self) -> Result<(), NodeError> {
        let _t = self.transition.lock().await;
        self.emit(Event::Stopping);
        self.stop_export().await;
        if let Some(repl) = &self.repl {
            repl.shutdown().await;
        }
        self.state().role = Role::Secondary;
        self.volume.close().await.map_err(|source| NodeError::Volume { what: "clean shutdown failed", source })?;
        tracing::info!(node = %self.me.name, "volume closed cleanly");
        Ok(())
    }
}

/// How long a role change waits for the link to be renegotiated (and
/// promote for a demoting peer to say so).
const ROLE_SETTLE: Duration = Duration::from_secs(2);

/// How long `demote` waits for the peer to receive every completed write.
const DEMOTE_WAIT: Duration = Duration::from_secs(30);

fn refuse_promote_message(disk: DiskState) -> String {
    let why = match disk {
        DiskState::Inconsistent => "its content was never initialised or synced",
        DiskState::Outdated => "a newer copy of the data exists on the peer",
        DiskState::Consistent => "it is crash-consistent but may miss the peer's latest writes",
        DiskState::Diskless => "there is no local disk",
        DiskState::Unknown => "its state is not known",
        DiskState::UpToDate => "",
    };
    format!("cannot promote: disk is {disk}: {why}; --force makes this node's data the truth")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vocabulary_is_spelled_as_designed() {
        assert_eq!(DiskState::UpToDate.to_string(), "uptodate");
        assert_eq!(DiskState::Inconsistent.to_string(), "inconsistent");
        assert_eq!(Role::Primary.to_string(), "primary");
        assert_eq!(ConnState::Standalone.to_string(), "standalone");
        assert_eq!(serde_json::to_string(&DiskState::UpToDate).unwrap(), "\"uptodate\"");
        let d: DiskState = serde_json::from_str("\"outdated\"").unwrap();
        assert_eq!(d, DiskState::Outdated);
    }

    #[test]
    fn promote_refusal_explains_the_risk() {
        let m = refuse_promote_message(DiskState::Inconsistent);
        assert_eq!(
            m,
            "cannot promote: disk is inconsistent: its content was never initialised or synced; \
             --force makes this node's data the truth"
        );
        assert!(refuse_promote_message(DiskState::Outdated).contains("newer copy"));
    }
}
