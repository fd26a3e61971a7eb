//! The operator's commands that act through the engine: `repctl promote`,
//! `new-current-uuid --clear-bitmap`, `verify` (src/repl/verify/) and
//! `invalidate`.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{Engine, SessionClaim, StopReason};
use crate::event::Event;
use crate::model::{ConnState, DiskState, GenIds, ReplState, ResyncKind, Role};
use crate::repl::decide::Decision;
use crate::repl::verify::{Invalidation, VerifyRequested};

/// What [`Engine::promote`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Promoted {
    /// The disk state before the promote.
    pub from: DiskState,
    /// A session was up: it is renegotiated (see [`Engine::settle_role`]).
    pub was_connected: bool,
    /// No session streamed to the peer: a new generation was started.
    pub new_generation: bool,
}

/// Why a disk may not be promoted without `--force`, and what to do.
/// `session`: a session with the peer is up (its resync may be running).
pub fn refuse_promote_message(disk: DiskState, session: bool, peer: &str) -> String {
    let why = match disk {
        DiskState::Inconsistent if session => {
            format!("a resync from peer {peer} is running; the disk is complete only when it ends (`repctl wait-sync`)")
        }
        DiskState::Inconsistent => format!(
            "it was never initialised, or a resync from peer {peer} was interrupted; `repctl connect` lets \
             the resync finish (`repctl wait-sync`)"
        ),
        DiskState::Outdated => "a newer copy of the data exists on the peer".into(),
        DiskState::Consistent => "it is crash-consistent but may miss the peer's latest writes".into(),
        DiskState::Diskless => "there is no local disk".into(),
        DiskState::Unknown => "its state is not known".into(),
        DiskState::UpToDate => String::new(),
    };
    format!("cannot promote: disk is {disk}: {why}; --force makes this node's data the truth")
}

impl Engine {
    /// `new-current-uuid --clear-bitmap` (DRBD's name): both nodes
    /// connected, secondary, `inconsistent` and never written get the same
    /// new generation and become `uptodate` without a sync. Refused
    /// otherwise, saying why.
    pub async fn new_current_uuid_clear_bitmap(&self, timeout: Duration) -> Result<u64, String> {
        let v = self.view();
        if v.connection != ConnState::Connected {
            return Err(format!("peer {} is not connected; both nodes must be connected", self.cfg.peer));
        }
        if self.role() != Role::Secondary || v.peer_role != Some(Role::Secondary) {
            return Err("both nodes must be secondary (a primary has already started syncing its data)".into());
        }
        let meta = self.store.meta();
        if meta.disk != DiskState::Inconsistent || v.peer_disk != DiskState::Inconsistent {
            return Err(format!(
                "both disks must be inconsistent (fresh create-md); this disk is {}, the peer's is {}",
                meta.disk, v.peer_disk
            ));
        }
        let lsn = self.store.local_lsn();
        if lsn != 0 {
            return Err(format!("this volume was written (local LSN {lsn}): its data would not match the peer's"));
        }
        let mut new = meta;
        new.disk = DiskState::UpToDate;
        new.gen_ids.rotate(GenIds::new_id());
        self.store.store_meta(new).map_err(|e| format!("cannot record the new generation: {e}"))?;
        // Renegotiate: the next Hello carries the generation, the idle
        // session then tells the peer to take it.
        self.clear_bitmap_offer.store(true, Ordering::Release);
        self.stop_session(StopReason::RoleChange);
        self.kick.notify_waiters();
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.view();
            if v.connection == ConnState::Connected && v.peer_disk == DiskState::UpToDate {
                tracing::info!(
                    generation = format_args!("{:016X}", new.gen_ids.current),
                    "new-current-uuid --clear-bitmap: both disks uptodate without a sync"
                );
                self.emit(Event::DiskChanged {
                    clear_bitmap: Some(true),
                    disk: DiskState::UpToDate,
                    forced: None,
                    from: DiskState::Inconsistent,
                });
                return Ok(new.gen_ids.current);
            }
            let refused =
                v.last_error.as_deref().is_some_and(|e| e.contains("new-current-uuid --clear-bitmap refused"));
            if refused || Instant::now() >= deadline {
                self.clear_bitmap_offer.store(false, Ordering::Release);
                let why = v.last_error.unwrap_or_else(|| "the peer did not confirm in time".into());
                if let Err(e) = self.store.store_meta(meta) {
                    return Err(format!("{why}; and restoring this disk's state failed: {e}"));
                }
                return Err(why);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `repctl promote` on a node with a peer: decided atomically with the
    /// session's decision (under the claim lock). Refused while a bitmap or
    /// full resync from the peer is decided or running, or while the disk is
    /// not usable, unless `force`; records the disk `uptodate`; sets the
    /// role; and, when no session streams to the peer, starts a new
    /// generation at once (not at the first write): the peer that comes
    /// back with the old generation then knows this node is newer and
    /// becomes its sync target (issue 14).
    pub fn promote(&self, force: bool) -> Result<Promoted, String> {
        let claim = self.claim();
        if self.role() == Role::Primary {
            return Ok(Promoted { from: self.store.meta().disk, was_connected: false, new_generation: false });
        }
        let meta = self.store.meta();
        let disk = meta.disk;
        if let Some(SessionClaim { decision: Decision::Target(kind), rule }) = claim.as_ref()
            && *kind != ResyncKind::Log
            && !force
        {
            return Err(format!(
                "cannot promote: a {kind} resync from peer {} was decided (rule {rule}); this disk is \
                 inconsistent until it ends (`repctl wait-sync`); --force makes this node's partial data the \
                 truth and discards the peer's newer writes",
                self.cfg.peer
            ));
        }
        if !force && !matches!(disk, DiskState::UpToDate | DiskState::Consistent) {
            return Err(refuse_promote_message(disk, claim.is_some(), &self.cfg.peer));
        }
        if disk != DiskState::UpToDate {
            if force {
                tracing::warn!(node = %self.cfg.node, from = %disk, "promote --force: this node's data becomes the truth");
            } else {
                tracing::warn!(node = %self.cfg.node, from = %disk, "promote of a consistent disk (log catch-up not finished): it has the old primary's log up to its local LSN; this node's data becomes the truth");
            }
            let mut new = meta;
            new.disk = DiskState::UpToDate;
            // A durable superblock write: let the worker's other tasks run.
            tokio::task::block_in_place(|| self.store.store_meta(new))
                .map_err(|e| format!("cannot record the disk as uptodate: {e}"))?;
            self.emit(Event::DiskChanged {
                clear_bitmap: None,
                disk: DiskState::UpToDate,
                forced: Some(force),
                from: disk,
            });
        }
        self.role.send_replace(Role::Primary);
        let was_connected = self.is_connected();
        self.stop_session(StopReason::RoleChange);
        let new_generation = !was_connected && !self.gate.streaming();
        if new_generation {
            tokio::task::block_in_place(|| self.claims.new_generation_locked(&claim, "promoted without the peer"))
                .map_err(|e| format!("promoted, but {e}"))?;
        }
        drop(claim);
        self.kick.notify_waiters();
        Ok(Promoted { from: disk, was_connected, new_generation })
    }
}

impl Engine {
    /// `repctl verify`: asks the running session to verify every block.
    /// The source is the primary (a secondary forwards the request to it),
    /// else this node. Refused, saying why, when the pair is not connected
    /// and in sync or a verify already runs. Returns at once; progress is
    /// in `status.verify`, the end is the `verify-finished` event.
    pub fn request_verify(&self) -> Result<VerifyRequested, String> {
        let v = self.view();
        if v.connection != ConnState::Connected {
            let why = v.last_error.map(|e| format!(" (last error: {e})")).unwrap_or_default();
            return Err(format!(
                "verify: peer {} is not connected (connection {}){why}; verify compares with the peer's copy",
                self.cfg.peer, v.connection
            ));
        }
        match v.replication {
            Some(ReplState::Established) => {}
            Some(r) => {
                return Err(format!(
                    "verify: a resync is running (this node is {}); verify once it finished (`repctl wait-sync`)",
                    r.as_str()
                ));
            }
            None => return Err("verify: the connection is not established yet; retry in a moment".into()),
        }
        let s = self.verify.status();
        if self.verify.requested() {
            return Err("verify: a verify was requested already and starts in a moment".into());
        }
        if s.running {
            return Err(format!(
                "verify: a verify is already running ({} of {} bytes checked, {} out of sync)",
                s.done_bytes, s.total_bytes, s.out_of_sync_bytes
            ));
        }
        let source = match (self.role(), v.peer_role) {
            (Role::Secondary, Some(Role::Primary)) => self.cfg.peer.clone(),
            _ => self.cfg.node.clone(),
        };
        tracing::info!(peer = %self.cfg.peer, %source, "online verify requested");
        self.verify.request();
        Ok(VerifyRequested {
            source,
            total_bytes: self.store.size(),
            block: self.store.bitmap_granularity(),
            runs_finished: s.runs_finished,
        })
    }

    /// `repctl invalidate`: this node's data is to be replaced by a full
    /// copy from the peer. Refused on a primary. Every block is marked out
    /// of sync (persisted) and then the disk is recorded `inconsistent`
    /// (that order: a crash in between leaves an uptodate disk with all
    /// bits set, and a rerun finishes the job, never an inconsistent disk
    /// whose bits were not set). A connected session is renegotiated at
    /// once, so the decision makes this node the sync target; otherwise the
    /// resync runs at the next connect.
    pub fn invalidate(&self) -> Result<Invalidation, String> {
        if self.role() == Role::Primary {
            return Err("invalidate: this node is primary: its data is what the peer syncs from; \
                        demote it first (`repctl demote`), then invalidate"
                .into());
        }
        self.store.mark_all().map_err(|e| format!("invalidate: cannot mark every block out of sync: {e}"))?;
        self.store.persist_bitmap().map_err(|e| format!("invalidate: cannot persist the bitmap: {e}"))?;
        self.store_disk(DiskState::Inconsistent, None)
            .map_err(|e| format!("invalidate: cannot record the disk as inconsistent: {e}"))?;
        let connected = self.is_connected();
        let what = if connected {
            format!("a full resync from {} starts now (reconnecting)", self.cfg.peer)
        } else {
            format!("the full resync from {} runs at the next connect", self.cfg.peer)
        };
        tracing::warn!(peer = %self.cfg.peer, "invalidated: disk inconsistent, every block out of sync; {what}");
        self.emit(Event::Invalidated { connected, peer: self.cfg.peer.clone() });
        if connected {
            self.renegotiate();
        }
        Ok(Invalidation {
            out_of_sync_bytes: self.store.dirty_bytes(),
            message: format!("disk inconsistent, every block marked out of sync: {what}"),
        })
    }
}
