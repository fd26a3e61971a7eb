//! The replication engine of one node: the link to the peer (listen, dial
//! with backoff, handshake, one connection kept), the session that runs on
//! it (primary streaming or secondary apply, see `repl::session`), the
//! reply gate of the primary, and the state that `status` and `events`
//! show.
//!
//! ```text
//!            listener ──┐                    ┌─► source session (we are primary)
//!   dialer (backoff) ───┴─► handshake ─► adopt ─► target session (peer is primary)
//!                                             └─► idle session (both secondary)
//!   NBD request ─► local commit ─► Gate::wait(lsn, level) ◄── acks (watch) ◄── session
//! ```
//!
//! The reply gate (design.md §2) is [`Gate`] ([`gate`]): the one handle the
//! NBD path holds. The engine and its sessions move it (acks, suspension,
//! the feed's attachment); the claim lock that serialises role,
//! generation and session decisions is `gate::Claims`.
//!
//! Generations: a primary that writes while no peer receives its feed starts
//! a new generation once (new random `current`, the old one into the
//! history), so that a peer with the old generation is resynced on connect.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, broadcast, watch};

use super::decide::{Decision, Verdict};
use super::proto::SyncInfo;
use super::store::{ReplMeta, ReplStore};
use crate::event::{Event, EventLine};
use crate::model::{ConnState, DiskState, GenIds, OnPeerLoss, Protocol, Role, SplitBrainPolicy};
use crate::volume::VolumeError;

mod commands;
mod connect;
pub mod gate;
mod view;

pub use commands::{Promoted, refuse_promote_message};
pub use connect::describe_handshake_error;
use gate::Claims;
pub use gate::{Acks, Durability, Gate, Need, need_for};
pub use view::{DecisionView, LastSync, LinkView, ProbeReport, Resync, SideReport, side_view};

/// How long a handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection that lost the winner rule is still replaced by a later one
/// from the peer when the kept one is older than this (the peer restarted
/// and dialled again before our heartbeat noticed).
const DUPLICATE_WINDOW: Duration = Duration::from_secs(2);
/// How much later than the peer the node that loses the connection rule
/// dials.
const LOSER_DIAL_DELAY: Duration = Duration::from_millis(300);
/// Repeated connect failures with the same message are logged at most this
/// often.
const LOG_EVERY: Duration = Duration::from_secs(30);

/// The engine's settings (plain data: the composition root,
/// `node::daemon::engine_config`, builds them from the config file).
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub resource: String,
    pub node: String,
    pub peer: String,
    /// Where we listen.
    pub listen: String,
    /// Where the peer listens.
    pub peer_addr: String,
    pub secret: Vec<u8>,
    pub protocol: Protocol,
    pub block_size: u32,
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
    pub connect_retry: Duration,
    pub max_connect_retry: Duration,
    pub max_buffer: usize,
    pub on_peer_loss: OnPeerLoss,
    /// Resync rate cap in bytes per second (None: adaptive only).
    pub resync_rate: Option<u64>,
    /// Automatic split-brain resolution (opt-in).
    pub split_brain: SplitBrainPolicy,
    /// Mutual TLS on the link (`[tls] replication = "require"`), docs/tls.md.
    pub tls: Option<Arc<crate::tls::TlsContext>>,
    /// What a sync target waits for before a bitmap or full resync writes
    /// to it (`[handlers] before_resync_target`; src/repl/resync_hook.rs).
    pub before_resync_target: Option<super::resync_hook::ResyncHook>,
}

/// Control of the running session.
struct SessionSlot {
    id: u64,
    started: Instant,
    dialled_by_us: bool,
    stop: watch::Sender<Option<StopReason>>,
}

/// Why the engine ends a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// `repctl disconnect`.
    Disconnect,
    /// A newer connection replaces it.
    Replaced,
    /// Our role changed: reconnect to renegotiate.
    RoleChange,
    /// Online verify found differences, or `invalidate`: reconnect so that
    /// the resync decision moves the marked blocks.
    Renegotiate,
    /// The daemon stops.
    Shutdown,
}

/// Errors of the engine's operations.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot bind the replication address {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Volume {
        what: &'static str,
        #[source]
        source: VolumeError,
    },
}

/// The replication engine of one node.
pub struct Engine {
    pub(crate) cfg: EngineConfig,
    pub(crate) store: Arc<dyn ReplStore>,
    role: watch::Sender<Role>,
    /// What the NBD path sees: before-write, wait, suspend.
    gate: Gate,
    /// The claim lock and the generation it guards (shared with the gate).
    claims: Arc<Claims>,
    /// The operator wants a connection (false after `disconnect` or split brain).
    want_connect: watch::Sender<bool>,
    /// Whether a session is up.
    connected: watch::Sender<bool>,
    view: Mutex<LinkView>,
    slot: Mutex<Option<SessionSlot>>,
    next_session: AtomicU64,
    /// Redial now (role change).
    kick: Notify,
    /// Sessions that ended in `Outcome::Failed` (a protocol error, a
    /// refusal): for tests that a flow ends no session by mistake.
    failed_sessions: AtomicU64,
    events: broadcast::Sender<EventLine>,
    shutdown: watch::Sender<bool>,
    /// `new-current-uuid --clear-bitmap` waits for the next idle session.
    clear_bitmap_offer: AtomicBool,
    /// `connect --discard-my-data`: one shot, sent in the next session's
    /// SyncInfo.
    discard_my_data: AtomicBool,
    /// Online verify: status, the operator's request (src/repl/verify.rs).
    pub(crate) verify: super::verify::VerifyCell,
    /// When each distinct link failure was last logged (rate limit).
    logged: Mutex<std::collections::HashMap<String, Instant>>,
    /// Bytes on the link, writer queue, peer address (statistics).
    pub(crate) link_stats: super::stats::LinkStats,
    /// Accepted connections before they authenticate: a cap on concurrent
    /// handshakes, their failures summarised per kind (src/repl/unauth.rs).
    unauth: super::unauth::Gate,
}

/// What the running session decided, recorded once it checked, under the
/// engine's claim lock, that the SyncInfo it announced is still true.
///
/// Role changes (promote), generation changes (writing without the peer)
/// and the target's switch to `inconsistent` take the same lock, so a
/// decision and a promote are never both acted on: whichever comes second
/// sees the first (issue 14: a promote racing a bitmap-target decision made
/// a primary with an inconsistent disk; a generation started between the
/// SyncInfo exchange and the session start left the pair in different
/// generations after a resync that said "in sync").
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SessionClaim {
    pub decision: Decision,
    pub rule: &'static str,
}

/// Why a session's SyncInfo no longer describes this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Stale(pub String);

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("node", &self.cfg.node).field("peer", &self.cfg.peer).finish()
    }
}

impl Engine {
    pub fn new(
        cfg: EngineConfig,
        store: Arc<dyn ReplStore>,
        role: Role,
        events: broadcast::Sender<EventLine>,
    ) -> Arc<Engine> {
        let claims = Arc::new(Claims::new(Arc::clone(&store)));
        let gate = Gate::new(cfg.protocol, cfg.peer.clone(), Arc::clone(&claims), events.clone());
        Arc::new(Engine {
            cfg,
            store,
            role: watch::Sender::new(role),
            gate,
            claims,
            want_connect: watch::Sender::new(true),
            connected: watch::Sender::new(false),
            view: Mutex::new(LinkView {
                connection: ConnState::Connecting,
                replication: None,
                peer_role: None,
                peer_disk: DiskState::Unknown,
                resync: None,
                last_sync: None,
                decision: None,
                split_brain: false,
                peer_out_of_sync: None,
                acks: Acks::default(),
                suspended: false,
                last_error: None,
                tls: None,
            }),
            slot: Mutex::new(None),
            next_session: AtomicU64::new(1),
            kick: Notify::new(),
            failed_sessions: AtomicU64::new(0),
            events,
            shutdown: watch::Sender::new(false),
            logged: Mutex::new(std::collections::HashMap::new()),
            unauth: super::unauth::Gate::default(),
            clear_bitmap_offer: AtomicBool::new(false),
            discard_my_data: AtomicBool::new(false),
            verify: super::verify::VerifyCell::default(),
            link_stats: super::stats::LinkStats::default(),
        })
    }

    /// Link statistics (bytes, writer queue, peer address).
    pub fn link_stats(&self) -> &super::stats::LinkStats {
        &self.link_stats
    }

    pub(crate) fn view_mut(&self) -> MutexGuard<'_, LinkView> {
        self.view.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn slot(&self) -> MutexGuard<'_, Option<SessionSlot>> {
        self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn claim(&self) -> MutexGuard<'_, Option<SessionClaim>> {
        self.claims.lock()
    }

    /// The reply gate: the only part of the engine the NBD path sees.
    pub fn gate(&self) -> &Gate {
        &self.gate
    }

    /// How many sessions ended failed (see `failed_sessions`).
    #[cfg(test)]
    pub(crate) fn failed_sessions(&self) -> u64 {
        self.failed_sessions.load(Ordering::Relaxed)
    }

    /// The engine's events from now on (tests; the daemon hands the sender in).
    #[cfg(test)]
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<EventLine> {
        self.events.subscribe()
    }

    pub(crate) fn emit(&self, event: Event) {
        let _ = self.events.send(EventLine::now(event));
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    pub fn role(&self) -> Role {
        *self.role.borrow()
    }

    /// Bytes covered by set bits of the local bitmap.
    pub fn dirty_bytes(&self) -> u64 {
        self.store.dirty_bytes()
    }

    pub fn bitmap_granularity(&self) -> u32 {
        self.store.bitmap_granularity()
    }

    pub(crate) fn role_rx(&self) -> watch::Receiver<Role> {
        self.role.subscribe()
    }

    /// Whether this node wrote (or was promoted) without its peer
    /// receiving the stream since the last session: the peer then needs a
    /// full sync.
    pub fn diverged(&self) -> bool {
        self.claims.diverged()
    }

    /// Whether a session is up.
    pub fn is_connected(&self) -> bool {
        *self.connected.borrow()
    }

    // --- Roles --------------------------------------------------------------

    /// The node changed role. A running session ends and the link is
    /// renegotiated at once (the handshake carries roles and generations).
    /// Waits (up to `settle`) for the renegotiated session when there was
    /// one, so that a new primary's first writes already stream to the
    /// peer. A primary without a peer receiving its feed starts a new
    /// generation at its first write ([`Gate::before_write`]).
    pub async fn set_role(&self, role: Role, settle: Duration) {
        let old = {
            let _claim = self.claim();
            self.role.send_replace(role)
        };
        if old == role {
            return;
        }
        let was_connected = self.is_connected();
        self.stop_session(StopReason::RoleChange);
        self.kick.notify_waiters();
        self.settle_role(was_connected, settle).await;
    }

    /// After a role change: waits (up to `settle`) for the renegotiated
    /// session when a connection is wanted and one was up.
    pub async fn settle_role(&self, was_connected: bool, settle: Duration) {
        if was_connected && *self.want_connect.borrow() {
            let wait = async {
                let mut c = self.connected.subscribe();
                let _ = c.wait_for(|c| !*c).await;
                loop {
                    let v = self.view();
                    if v.connection == ConnState::Connected && v.replication.is_some() && v.peer_role.is_some() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            };
            if tokio::time::timeout(settle, wait).await.is_err() {
                tracing::info!(peer = %self.cfg.peer, "role changed; the peer has not reconnected yet");
            }
        }
    }

    pub(crate) fn take_clear_bitmap_offer(&self) -> bool {
        self.clear_bitmap_offer.swap(false, Ordering::AcqRel)
    }

    /// Waits (up to `timeout`) until the peer is not known as primary (it
    /// may be demoting right now); returns whether it is still primary.
    pub async fn peer_is_primary(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.view();
            let primary = v.connection == ConnState::Connected && v.peer_role == Some(Role::Primary);
            if !primary || Instant::now() >= deadline {
                return primary;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Starts a new generation under the claim lock (see
    /// [`Claims::new_generation_locked`]).
    fn new_generation(&self, why: &'static str) -> Result<(), EngineError> {
        let claim = self.claim();
        self.claims.new_generation_locked(&claim, why)
    }

    // --- Connect / disconnect ------------------------------------------------

    /// `repctl connect` (`--discard-my-data`: this node offers to become
    /// the sync target of a split brain, once).
    pub fn connect(&self, discard_my_data: bool) {
        if discard_my_data {
            tracing::warn!(peer = %self.cfg.peer, "connect --discard-my-data: this node's changes since the split will be overwritten");
            self.discard_my_data.store(true, Ordering::Release);
        }
        // `connecting` before the wish is published: a session started by
        // it may go standalone at once (split brain), and its state must
        // be the last word, not this one.
        if !*self.want_connect.borrow() {
            self.set_conn(ConnState::Connecting);
            tracing::info!(peer = %self.cfg.peer, "connecting");
        }
        self.want_connect.send_replace(true);
        self.kick.notify_waiters();
    }

    /// The one-shot `connect --discard-my-data` was used: by the start of
    /// the resync it asked for (this node's data is being replaced: it is
    /// `inconsistent` in the peer's generation, and the next session
    /// resumes that resync without the flag), or by a decision it did not
    /// change. A session that ends before either leaves it set for the
    /// next one (chaos seed 1000 cycle 790, the engine test
    /// `split_brain_moves_nothing_until_discard_my_data`).
    pub(crate) fn spend_discard_my_data(&self) {
        if self.discard_my_data.swap(false, Ordering::AcqRel) {
            tracing::info!(peer = %self.cfg.peer, "connect --discard-my-data: used");
        }
    }

    /// `repctl disconnect`: stop dialing, drop the link.
    pub fn disconnect(&self) {
        self.want_connect.send_replace(false);
        self.stop_session(StopReason::Disconnect);
        self.set_conn(ConnState::Standalone);
    }

    /// Goes standalone on its own (split brain, unrelated data).
    pub(crate) fn go_standalone(&self, why: &str) {
        self.want_connect.send_replace(false);
        self.view_mut().last_error = Some(why.to_string());
        self.set_conn(ConnState::Standalone);
    }

    /// Ends the running session so that the link is renegotiated at once
    /// (online verify found differences; `invalidate`).
    pub(crate) fn renegotiate(&self) {
        self.stop_session(StopReason::Renegotiate);
        self.kick.notify_waiters();
    }

    fn stop_session(&self, why: StopReason) {
        if let Some(slot) = self.slot().as_ref() {
            slot.stop.send_replace(Some(why));
        }
    }

    /// Stops the link for good (daemon shutdown).
    pub async fn shutdown(&self) {
        self.shutdown.send_replace(true);
        self.want_connect.send_replace(false);
        self.stop_session(StopReason::Shutdown);
        let mut rx = self.connected.subscribe();
        let _ = tokio::time::timeout(Duration::from_secs(2), rx.wait_for(|c| !*c)).await;
    }

    // --- Called by sessions ----------------------------------------------------

    /// The session commits to its decision: under the claim lock, checks
    /// that what our SyncInfo announced (role, disk, generation ids) is
    /// still true, and records the decision. A stale SyncInfo (a promote,
    /// or a generation started by the session this one replaced, came in
    /// between) means the peer decided on a view that is no longer ours:
    /// the caller renegotiates. A source claims the feed: writes wait for
    /// it instead of starting a generation the peer does not know.
    ///
    /// `marks` is the bitmap's `mark_count` when `mine` was made: blocks
    /// marked since (the previous session's end marking the records the
    /// peer had not acknowledged, after this session's SyncInfo was sent:
    /// a primary resumed from SIGSTOP, chaos seed 1000 cycle 31) are not in
    /// the out-of-sync count the peer decided on; acting on it would leave
    /// the marks standing on an in-sync pair.
    pub(crate) fn claim_session(&self, mine: &SyncInfo, marks: u64, verdict: &Verdict) -> Result<(), Stale> {
        let mut claim = self.claim();
        let meta = self.store.meta();
        let now = self.store.mark_count();
        if now != marks {
            return Err(Stale(format!(
                "blocks were marked out of sync since the session start (marks {marks} -> {now})"
            )));
        }
        let role = self.role();
        if role != mine.role {
            return Err(Stale(format!("our role changed to {role} since the session start")));
        }
        if meta.disk != mine.disk {
            return Err(Stale(format!("our disk changed from {} to {} since the session start", mine.disk, meta.disk)));
        }
        if meta.gen_ids != mine.gen_ids {
            return Err(Stale(format!(
                "our generation changed from {:016X} to {:016X} since the session start",
                mine.gen_ids.current, meta.gen_ids.current
            )));
        }
        let feeds = match verdict.decision {
            Decision::Source(_) => true,
            Decision::NoSync => role == Role::Primary,
            _ => false,
        };
        if feeds {
            self.gate.claim_feed();
        }
        *claim = Some(SessionClaim { decision: verdict.decision.clone(), rule: verdict.rule });
        Ok(())
    }

    /// The target's resync finished: the session's decision no longer
    /// stands in the way of a promote.
    pub(crate) fn claim_resync_done(&self) {
        if let Some(c) = self.claim().as_mut() {
            c.decision = Decision::NoSync;
        }
    }

    /// The sync target records its disk `inconsistent` for a bitmap or full
    /// resync (`change` stores it), only while it is still secondary:
    /// a primary never serves an inconsistent disk.
    pub(crate) fn target_goes_inconsistent(
        &self,
        change: impl FnOnce() -> Result<(), VolumeError>,
    ) -> Result<(), String> {
        let _claim = self.claim();
        if self.role() != Role::Secondary {
            return Err("this node was promoted: it does not become a sync target".into());
        }
        change().map_err(|e| format!("cannot record the disk as inconsistent: {e}"))
    }

    /// Persists the local disk state (and optionally generations).
    pub(crate) fn store_disk(&self, disk: DiskState, gen_ids: Option<GenIds>) -> Result<(), VolumeError> {
        let mut meta = self.store.meta();
        let from = meta.disk;
        meta.disk = disk;
        if let Some(g) = gen_ids {
            meta.gen_ids = g;
        }
        self.store.store_meta(meta)?;
        if from != disk {
            self.emit(Event::DiskChanged { clear_bitmap: None, disk, forced: None, from });
        }
        Ok(())
    }

    pub(crate) fn meta(&self) -> ReplMeta {
        self.store.meta()
    }

    /// This node (the sync target) took the peer's generation: a later write
    /// without the peer must start a generation of its own again.
    pub(crate) fn took_peer_generation(&self) {
        self.claims.clear_diverged();
    }
}

/// Where [`test_hold`] can pause a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HoldPoint {
    /// After the decision is computed, before the session claims it.
    Decision,
    /// On the sync target, after SyncStart, before the disk goes inconsistent.
    SyncStart,
}

/// Test hook, **`fault-injection` builds only** (any other `repd` does not
/// contain it): `REPBLOCK_TEST_HOLD=decision:MS` or `sync-start:MS` pauses
/// every session at that point, so that tests/replication_recovery.rs can
/// land a promote or a write in a window that is otherwise a fraction of a
/// millisecond wide.
#[cfg(not(feature = "fault-injection"))]
pub(crate) async fn test_hold(_: HoldPoint) {}

/// See the other `test_hold`.
#[cfg(feature = "fault-injection")]
pub(crate) async fn test_hold(point: HoldPoint) {
    let Ok(spec) = std::env::var("REPBLOCK_TEST_HOLD") else { return };
    let Some((name, ms)) = spec.split_once(':') else { return };
    let at = match name {
        "decision" => HoldPoint::Decision,
        "sync-start" => HoldPoint::SyncStart,
        _ => return,
    };
    let Ok(ms) = ms.parse::<u64>() else { return };
    if at == point {
        tracing::warn!(point = name, ms, "test hook: holding the session");
        tokio::time::sleep(Duration::from_millis(ms)).await;
        tracing::warn!(point = name, "test hook: session released");
    }
}
