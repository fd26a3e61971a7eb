//! The gate: the only part of the replication engine that the NBD path
//! sees (`node/backend.rs` holds a [`Gate`], not the engine).
//!
//! ```text
//!   NBD request ─► Gate::before_write ─► local commit (LSN l) ─► Gate::wait(l, level) ─► reply
//!                    │ suspended? wait          ▲                      │ acks cover l? (watch)
//!                    │ no peer receives the     │ session: feed_attached, record_ack,
//!                    │ feed? new generation     │ session_ended, set_suspended
//! ```
//!
//! design.md §2: after the local completion of a request with LSN `l`, the
//! reply waits under protocol A for nothing, under B for the peer's
//! `received >= l`, under C for `written >= l` (`durable >= l` for FLUSH and
//! FUA). Acks are cumulative. Waiters are released when the peer is lost
//! (the primary goes on alone; the next connect resyncs), unless
//! `on_peer_loss = "suspend"`: then they, and new writes, wait for the peer
//! to be back and in sync, or for `resume-io`.
//!
//! The session side (acks, the feed's attachment, suspension) is
//! `pub(in crate::repl)`: only the engine and its sessions move the gate.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{broadcast, watch};

use super::{EngineError, SessionClaim};
use crate::event::{Event, EventLine};
use crate::model::{GenIds, Lsn, Protocol, unix_ms};
use crate::repl::store::ReplStore;

/// What a reply waits for (design.md §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// WRITE / TRIM / WRITE_ZEROES without FUA.
    Write,
    /// FLUSH, or any request with FUA.
    Flush,
}

/// Cumulative peer acknowledgements of the current session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Acks {
    /// A session is streaming the feed to the peer: replies wait for acks.
    pub active: bool,
    /// The feed of the session starts after this LSN (older ones are not
    /// the peer's to acknowledge: they reach it through the full sync, or
    /// it has them already).
    pub base: Lsn,
    pub received: Lsn,
    pub written: Lsn,
    pub durable: Lsn,
}

impl Acks {
    pub(crate) fn covers(&self, lsn: Lsn, need: Need) -> bool {
        if !self.active || lsn <= self.base {
            return true;
        }
        match need {
            Need::Nothing => true,
            Need::Received => self.received >= lsn,
            Need::Written => self.written >= lsn,
            Need::Durable => self.durable >= lsn,
        }
    }
}

/// The peer acknowledgement a reply needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    Nothing,
    Received,
    Written,
    Durable,
}

/// The §2 table.
pub fn need_for(protocol: Protocol, d: Durability) -> Need {
    match (protocol, d) {
        (Protocol::A, _) => Need::Nothing,
        (Protocol::B, _) => Need::Received,
        (Protocol::C, Durability::Write) => Need::Written,
        (Protocol::C, Durability::Flush) => Need::Durable,
    }
}

/// The claim lock and the generation it guards, shared by the engine
/// (sessions, promote, role changes) and the gate (a write without the
/// peer starts a new generation under it).
///
/// Role changes (promote), generation changes (writing without the peer)
/// and the target's switch to `inconsistent` take this lock, and so does a
/// session when it claims its decision ([`SessionClaim`]): a decision and a
/// promote are never both acted on.
pub(crate) struct Claims {
    store: Arc<dyn ReplStore>,
    /// The running session's claim.
    lock: Mutex<Option<SessionClaim>>,
    /// A new generation was started since the peer last received our feed.
    diverged: AtomicBool,
}

impl Claims {
    pub(crate) fn new(store: Arc<dyn ReplStore>) -> Claims {
        Claims { store, lock: Mutex::new(None), diverged: AtomicBool::new(false) }
    }

    /// Takes the claim lock.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Option<SessionClaim>> {
        self.lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn diverged(&self) -> bool {
        self.diverged.load(Ordering::Acquire)
    }

    /// The peer receives our feed (or took our generation): the next write
    /// without it starts a new generation again.
    pub(crate) fn clear_diverged(&self) {
        self.diverged.store(false, Ordering::Release);
    }

    /// Starts a new generation (once per divergence): if the bitmap has no
    /// generation yet it takes the current one (the bits count from there),
    /// else the current one goes into the history; a new random current.
    /// The caller holds the claim lock (`_held`): a session that announced
    /// the old generation and has not claimed yet sees the change and
    /// renegotiates.
    pub(crate) fn new_generation_locked(
        &self,
        _held: &MutexGuard<'_, Option<SessionClaim>>,
        why: &'static str,
    ) -> Result<(), EngineError> {
        if self.diverged.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let mut meta = self.store.meta();
        let old = meta.gen_ids.current;
        meta.gen_ids.diverge(GenIds::new_id());
        meta.gen_created_ms = unix_ms();
        if let Err(source) = self.store.store_meta(meta) {
            self.diverged.store(false, Ordering::Release);
            return Err(EngineError::Volume { what: "cannot record a new generation", source });
        }
        tracing::info!(
            old = format_args!("{old:016X}"),
            new = format_args!("{:016X}", meta.gen_ids.current),
            bitmap = format_args!("{:016X}", meta.gen_ids.bitmap),
            "{why}: new generation"
        );
        Ok(())
    }
}

/// The NBD path's handle on replication: before-write, wait-for-
/// durability, suspend/resume. Cheap to clone.
#[derive(Clone)]
pub struct Gate {
    inner: Arc<GateInner>,
}

struct GateInner {
    protocol: Protocol,
    peer: String,
    acks: watch::Sender<Acks>,
    /// Writes wait while true.
    suspended: watch::Sender<bool>,
    /// A session claimed the feed (we are its source) but has not attached
    /// it yet: writes wait, so that they reach the peer through the feed
    /// rather than start a generation the session did not announce.
    feed_pending: watch::Sender<bool>,
    claims: Arc<Claims>,
    events: broadcast::Sender<EventLine>,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("protocol", &self.inner.protocol)
            .field("acks", &*self.inner.acks.borrow())
            .field("suspended", &*self.inner.suspended.borrow())
            .finish()
    }
}

impl Gate {
    pub(crate) fn new(
        protocol: Protocol,
        peer: String,
        claims: Arc<Claims>,
        events: broadcast::Sender<EventLine>,
    ) -> Gate {
        Gate {
            inner: Arc::new(GateInner {
                protocol,
                peer,
                acks: watch::Sender::new(Acks::default()),
                suspended: watch::Sender::new(false),
                feed_pending: watch::Sender::new(false),
                claims,
                events,
            }),
        }
    }

    // --- The NBD side ----------------------------------------------------------

    /// Called before a write is submitted on the primary: waits while IO is
    /// suspended; starts a new generation at the first write no peer
    /// receives.
    pub async fn before_write(&self) -> Result<(), EngineError> {
        let g = &*self.inner;
        let mut rx = g.suspended.subscribe();
        // The sender lives as long as self.
        let _ = rx.wait_for(|s| !*s).await;
        if g.acks.borrow().active {
            return Ok(());
        }
        // A session that claimed the feed attaches it within a round trip
        // (the target's bitmap): the write goes through it.
        let mut pending = g.feed_pending.subscribe();
        let _ = pending.wait_for(|p| !*p).await;
        let claim = g.claims.lock();
        if !g.acks.borrow().active && !*g.feed_pending.borrow() {
            g.claims.new_generation_locked(&claim, "writing without the peer")?;
        }
        Ok(())
    }

    /// Waits until the peer acknowledged `lsn` as the protocol requires for
    /// `d` (returns at once under protocol A, without a peer, or once the
    /// peer is lost, unless IO is suspended).
    ///
    /// This is the reply path's one wait: every condition a reply must meet
    /// after the local commit (today the peer's acks and suspension)
    /// belongs here, so that `node/backend.rs` stays one call.
    pub async fn wait(&self, lsn: Lsn, d: Durability) {
        let need = need_for(self.inner.protocol, d);
        if need == Need::Nothing {
            return;
        }
        let mut acks = self.inner.acks.subscribe();
        let mut suspended = self.inner.suspended.subscribe();
        loop {
            let _ = acks.wait_for(|a| a.covers(lsn, need)).await;
            if !*suspended.borrow_and_update() {
                return;
            }
            // Suspended: wait for the peer to be back and synced, or resume-io.
            tokio::select! {
                _ = suspended.wait_for(|s| !*s) => {}
                _ = acks.changed() => {}
            }
            if acks.borrow().covers(lsn, need) && !*suspended.borrow() {
                return;
            }
        }
    }

    /// Whether a session streams the feed to the peer (replies wait for
    /// its acks).
    pub fn streaming(&self) -> bool {
        self.inner.acks.borrow().active
    }

    /// The peer's cumulative acks of the current session.
    pub fn acks(&self) -> Acks {
        *self.inner.acks.borrow()
    }

    /// Whether writes are suspended (`on_peer_loss = "suspend"`).
    pub fn suspended(&self) -> bool {
        *self.inner.suspended.borrow()
    }

    /// `repctl resume-io`: releases suspended writes (the peer will be
    /// resynced when it is back).
    pub fn resume_io(&self) -> bool {
        let was = self.inner.suspended.send_replace(false);
        if was {
            tracing::warn!("IO resumed without the peer (`repctl resume-io`, or a fence-peer handler)");
            self.emit(Event::IoResumed);
        }
        was
    }

    /// Waits until the peer received every LSN up to `lsn` (demote), or the
    /// session ends, or `timeout`.
    pub async fn wait_received(&self, lsn: Lsn, timeout: std::time::Duration) -> bool {
        let mut rx = self.inner.acks.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|a| a.covers(lsn, Need::Received))).await.is_ok()
    }

    // --- The session side --------------------------------------------------------

    fn emit(&self, event: Event) {
        let _ = self.inner.events.send(EventLine::now(event));
    }

    pub(in crate::repl) fn set_suspended(&self, on: bool) {
        if self.inner.suspended.send_replace(on) != on {
            self.emit(if on { Event::IoSuspended } else { Event::IoResumed });
            if on {
                tracing::warn!(peer = %self.inner.peer, "peer lost: writes suspended until it is back or `repctl resume-io`");
            }
        }
    }

    /// A source session claimed the feed: writes wait for its attachment.
    pub(in crate::repl) fn claim_feed(&self) {
        self.inner.feed_pending.send_replace(true);
    }

    /// The peer now receives the feed, starting after `base`: replies wait
    /// for its acks, and no new generation is needed.
    pub(in crate::repl) fn feed_attached(&self, base: Lsn) {
        self.inner.claims.clear_diverged();
        self.inner.acks.send_replace(Acks { active: true, base, received: base, written: base, durable: base });
        self.inner.feed_pending.send_replace(false);
    }

    /// Records the peer's cumulative acks (never moving backwards).
    pub(in crate::repl) fn record_ack(&self, received: Lsn, written: Lsn, durable: Lsn) {
        self.inner.acks.send_if_modified(|a| {
            let before = *a;
            a.received = a.received.max(received);
            a.written = a.written.max(written).min(a.received);
            a.durable = a.durable.max(durable).min(a.written);
            *a != before
        });
    }

    /// The session stopped streaming: waiters are released (unless
    /// suspended first).
    pub(in crate::repl) fn stop_streaming(&self) {
        self.inner.acks.send_modify(|a| a.active = false);
    }

    /// The session's claim on the feed ended with it.
    pub(in crate::repl) fn release_feed_claim(&self) {
        self.inner.feed_pending.send_replace(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reply_table_of_design_section_2() {
        use Durability::*;
        assert_eq!(need_for(Protocol::A, Write), Need::Nothing);
        assert_eq!(need_for(Protocol::A, Flush), Need::Nothing);
        assert_eq!(need_for(Protocol::B, Write), Need::Received);
        assert_eq!(need_for(Protocol::B, Flush), Need::Received);
        assert_eq!(need_for(Protocol::C, Write), Need::Written);
        assert_eq!(need_for(Protocol::C, Flush), Need::Durable);
    }

    #[test]
    fn acks_cover_only_what_the_peer_acknowledged_in_this_session() {
        let a = Acks { active: true, base: 10, received: 15, written: 12, durable: 11 };
        assert!(a.covers(9, Need::Durable), "older than the session: not the peer's");
        assert!(a.covers(15, Need::Received));
        assert!(!a.covers(16, Need::Received));
        assert!(a.covers(12, Need::Written));
        assert!(!a.covers(13, Need::Written));
        assert!(a.covers(11, Need::Durable));
        assert!(!a.covers(12, Need::Durable));
        let gone = Acks { active: false, ..a };
        assert!(gone.covers(100, Need::Durable), "no peer: nothing to wait for");
    }
}
