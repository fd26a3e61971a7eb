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

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, broadcast, watch};

use super::decide::{Decision, SideView, Verdict};
use super::handshake::{HandshakeError, LocalHello, handshake, keep_connection};
use super::link::{FrameReader, FrameWriter, secure, split_link};
use super::proto::{GoodbyeReason, Message};
use super::proto::{SyncInfo, sync_flags};
use super::store::{ReplMeta, ReplStore};
use crate::event::{Event, EventLine, SyncRole};
use crate::model::{
    ConnState, DiskState, GenIds, Lsn, OnPeerLoss, Protocol, ReplState, ResyncKind, Role, SplitBrainPolicy,
};
use crate::volume::VolumeError;

pub mod gate;

use gate::Claims;
pub use gate::{Acks, Durability, Gate, Need, need_for};

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

/// Resync progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resync {
    pub kind: ResyncKind,
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub started: Instant,
    /// Measured over the last second or so.
    pub speed_bytes_per_sec: u64,
    /// Where the speed was last sampled: (when, done_bytes).
    pub sample: (Instant, u64),
}

impl Resync {
    pub fn new(kind: ResyncKind, total_bytes: u64) -> Resync {
        let now = Instant::now();
        Resync { kind, done_bytes: 0, total_bytes, started: now, speed_bytes_per_sec: 0, sample: (now, 0) }
    }

    /// Seconds left at the measured speed.
    pub fn eta_seconds(&self) -> Option<u64> {
        let left = self.total_bytes.saturating_sub(self.done_bytes);
        if left == 0 {
            return Some(0);
        }
        (self.speed_bytes_per_sec > 0).then(|| left.div_ceil(self.speed_bytes_per_sec))
    }
}

/// The last completed resync (`status.last_sync`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LastSync {
    pub kind: ResyncKind,
    pub bytes: u64,
    pub seconds: f64,
}

/// The decision of the last connect (`status.decision`, `connect --dry-run`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DecisionView {
    /// `no-sync`, `source-log`, `target-bitmap`, `split-brain`, ...
    pub result: String,
    pub rule: String,
    pub explanation: String,
}

impl DecisionView {
    pub fn from_verdict(v: &Verdict) -> DecisionView {
        DecisionView {
            result: v.decision.as_str().to_string(),
            rule: v.rule.to_string(),
            explanation: v.explanation.clone(),
        }
    }
}

/// What `repctl connect --dry-run` reports (the answer to
/// `{"cmd":"connect","dry_run":true}`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ProbeReport {
    /// The peer's node name.
    pub peer: String,
    pub decision: DecisionView,
    /// This node's SyncInfo.
    pub local: SideReport,
    /// The peer's SyncInfo.
    pub peer_view: SideReport,
}

/// One side's SyncInfo as the probe report shows it (generation ids as 16
/// upper-case hex digits).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SideReport {
    pub role: Role,
    pub disk: DiskState,
    pub gen_current: String,
    pub gen_bitmap: String,
    pub gen_history: Vec<String>,
    pub local_lsn: Lsn,
    pub out_of_sync_bytes: u64,
    pub bitmap_base_lsn: Lsn,
    pub log_first_lsn: Lsn,
    pub granularity: u32,
    pub discard_my_data: bool,
}

impl From<&SyncInfo> for SideReport {
    fn from(i: &SyncInfo) -> SideReport {
        SideReport {
            role: i.role,
            disk: i.disk,
            gen_current: format!("{:016X}", i.gen_ids.current),
            gen_bitmap: format!("{:016X}", i.gen_ids.bitmap),
            gen_history: i.gen_ids.history.iter().map(|g| format!("{g:016X}")).collect(),
            local_lsn: i.local_lsn,
            out_of_sync_bytes: i.dirty_bytes,
            bitmap_base_lsn: i.bitmap_base_lsn,
            log_first_lsn: i.log_first_lsn,
            granularity: i.granularity,
            discard_my_data: i.discard_my_data(),
        }
    }
}

/// The decision inputs carried by a SyncInfo.
pub fn side_view(i: &SyncInfo) -> SideView {
    SideView {
        role: i.role,
        disk: i.disk,
        gen_ids: i.gen_ids,
        gen_created_ms: i.gen_created_ms,
        local_lsn: i.local_lsn,
        dirty_bytes: i.dirty_bytes,
        bitmap_base_lsn: i.bitmap_base_lsn,
        log_first_lsn: i.log_first_lsn,
        discard_my_data: i.discard_my_data(),
    }
}

/// What `status` shows about replication.
#[derive(Debug, Clone)]
pub struct LinkView {
    pub connection: ConnState,
    pub replication: Option<ReplState>,
    pub peer_role: Option<Role>,
    pub peer_disk: DiskState,
    pub resync: Option<Resync>,
    /// The last completed resync (kept across sessions).
    pub last_sync: Option<LastSync>,
    /// The decision of the last session start (kept across sessions).
    pub decision: Option<DecisionView>,
    /// The last connect found a split brain (cleared by the next decision
    /// that is not one).
    pub split_brain: bool,
    /// Out-of-sync bytes the peer announced at the session start (its
    /// bitmap), while connected.
    pub peer_out_of_sync: Option<u64>,
    pub acks: Acks,
    /// Writes are suspended (on_peer_loss = suspend, peer lost).
    pub suspended: bool,
    /// The last refusal or connection error, for humans.
    pub last_error: Option<String>,
    /// The TLS session of the last connection that became a session
    /// (`[tls] replication`): version, cipher, the peer's certificate.
    pub tls: Option<crate::tls::SessionInfo>,
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

    /// A snapshot for `status`.
    pub fn view(&self) -> LinkView {
        let mut v = self.view_mut().clone();
        v.acks = self.gate.acks();
        v.suspended = self.gate.suspended();
        v
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

    pub(crate) fn set_conn(&self, c: ConnState) {
        let changed = {
            let mut v = self.view_mut();
            let changed = v.connection != c;
            v.connection = c;
            if c != ConnState::Connected {
                v.replication = None;
                v.peer_role = None;
                v.peer_disk = DiskState::Unknown;
                v.resync = None;
                v.peer_out_of_sync = None;
            }
            changed
        };
        if changed {
            self.emit(Event::ConnectionChanged { connection: c, peer: self.cfg.peer.clone() });
        }
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

    // --- The link --------------------------------------------------------------

    /// Binds the replication address and starts the listener and the dialer.
    pub async fn start(self: &Arc<Self>) -> Result<(), EngineError> {
        let listener = TcpListener::bind(&self.cfg.listen)
            .await
            .map_err(|source| EngineError::Bind { addr: self.cfg.listen.clone(), source })?;
        tracing::info!(listen = %self.cfg.listen, peer = %self.cfg.peer, peer_addr = %self.cfg.peer_addr, "replication link up");
        tokio::spawn(Arc::clone(self).accept_loop(listener));
        tokio::spawn(Arc::clone(self).dial_loop());
        Ok(())
    }

    fn local_hello(&self) -> LocalHello {
        let meta = self.store.meta();
        LocalHello {
            resource: self.cfg.resource.clone(),
            node: self.cfg.node.clone(),
            peer: self.cfg.peer.clone(),
            size: self.store.size(),
            block_size: self.cfg.block_size,
            gen_ids: meta.gen_ids,
            role: self.role(),
            disk: meta.disk,
            secret: self.cfg.secret.clone(),
        }
    }

    async fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        let mut stop = self.shutdown.subscribe();
        let mut summaries = tokio::time::interval(super::unauth::SUMMARY_INTERVAL / 4);
        loop {
            let accepted = tokio::select! {
                r = listener.accept() => r,
                _ = summaries.tick() => {
                    self.unauth.flush(&self.cfg.peer);
                    continue;
                }
                _ = stop.wait_for(|s| *s) => return,
            };
            let (stream, from) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "replication accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Some(slot) = self.unauth.admit(&self.cfg.peer) else { continue };
            let me = Arc::clone(&self);
            // Even when standalone: a probe (`connect --dry-run` on the
            // peer) is answered; a real session is then declined.
            tokio::spawn(async move {
                let _slot = slot;
                me.handshake_and_adopt(stream, false, &from.to_string()).await;
            });
        }
    }

    async fn dial_loop(self: Arc<Self>) {
        let mut want = self.want_connect.subscribe();
        let mut connected = self.connected.subscribe();
        let mut stop = self.shutdown.subscribe();
        // The node that loses the connection rule dials a little later
        // (at start and after each session), so that both nodes dialing at
        // once rarely produces two connections (one of which is then closed).
        let loser_extra = if super::handshake::connection_winner(&self.cfg.node, &self.cfg.peer) == self.cfg.node {
            Duration::ZERO
        } else {
            LOSER_DIAL_DELAY
        };
        let mut delay = loser_extra;
        loop {
            if *stop.borrow() {
                return;
            }
            // Wait until a connection is wanted and none is up.
            tokio::select! {
                _ = async {
                    let _ = want.wait_for(|w| *w).await;
                    let _ = connected.wait_for(|c| !*c).await;
                } => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            if !delay.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = self.kick.notified() => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
            if !*want.borrow() || *connected.borrow() {
                continue;
            }
            let ok = match tokio::time::timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(&self.cfg.peer_addr)).await {
                Ok(Ok(stream)) => self.handshake_and_adopt(stream, true, &self.cfg.peer_addr).await,
                Ok(Err(e)) => {
                    self.note_failure(
                        format!("cannot connect to {} at {}: {e}", self.cfg.peer, self.cfg.peer_addr),
                        &self.cfg.peer_addr,
                    );
                    false
                }
                Err(_) => {
                    self.note_failure(
                        format!("cannot connect to {} at {}: timed out", self.cfg.peer, self.cfg.peer_addr),
                        &self.cfg.peer_addr,
                    );
                    false
                }
            };
            delay = if ok {
                // Wait for this session to end before dialing again.
                let _ = connected.wait_for(|c| !*c).await;
                self.cfg.connect_retry + loser_extra
            } else {
                (delay * 2).clamp(self.cfg.connect_retry, self.cfg.max_connect_retry)
            };
        }
    }

    /// Logs a link failure (`msg`, without addresses, so that repeats are
    /// recognised), rate limited per distinct message; `addr` is the remote
    /// end.
    fn note_failure(&self, msg: String, addr: &str) {
        self.view_mut().last_error = Some(msg.clone());
        let mut logged = self.logged.lock().unwrap_or_else(|p| p.into_inner());
        if logged.len() > 64 {
            logged.clear();
        }
        let due = logged.get(&msg).is_none_or(|t| t.elapsed() >= LOG_EVERY);
        if due {
            logged.insert(msg.clone(), Instant::now());
            tracing::warn!(peer = %self.cfg.peer, %addr, "{msg}");
        } else {
            tracing::debug!(peer = %self.cfg.peer, %addr, "{msg}");
        }
    }

    /// This node's SyncInfo: its view of the data for the resync decision.
    pub(crate) fn sync_info(&self, flags: u32) -> SyncInfo {
        let meta = self.store.meta();
        let local_lsn = self.store.local_lsn();
        SyncInfo {
            role: self.role(),
            disk: meta.disk,
            granularity: self.store.bitmap_granularity(),
            flags,
            gen_ids: meta.gen_ids,
            gen_created_ms: meta.gen_created_ms,
            local_lsn,
            dirty_bytes: self.store.dirty_bytes(),
            bitmap_base_lsn: self.store.bitmap_base_lsn(),
            log_first_lsn: self.store.log_first_lsn().min(local_lsn + 1),
        }
    }

    /// Runs the handshake and the SyncInfo exchange on a new connection and,
    /// if it becomes the session, the session. Returns whether a session ran.
    async fn handshake_and_adopt(self: &Arc<Self>, stream: TcpStream, dialled_by_us: bool, addr: &str) -> bool {
        let local = self.local_hello();
        let secured = secure(stream, self.cfg.tls.as_deref(), dialled_by_us, &self.cfg.peer, HANDSHAKE_TIMEOUT).await;
        let peer = match secured {
            Ok(mut stream) => handshake(&mut stream, &local, HANDSHAKE_TIMEOUT).await.map(|p| (p, stream)),
            Err(e) => Err(e),
        };
        let (peer, stream) = match peer {
            Ok(p) => p,
            Err(e) if !dialled_by_us && e.before_auth() => {
                // Anyone can cause this: summarised, not the link's error.
                self.unauth.failed(&e, &self.cfg.peer);
                return false;
            }
            Err(e) => {
                self.note_failure(describe_handshake_error(&e, &self.cfg.peer), addr);
                return false;
            }
        };
        let tls_session = stream.tls_session();
        let (mut reader, mut writer) = match split_link(stream) {
            Ok(x) => x,
            Err(e) => {
                self.note_failure(format!("socket setup with {} failed: {e}", self.cfg.peer), addr);
                return false;
            }
        };
        reader.count_into(self.link_stats.received_counter());
        writer.count_into(self.link_stats.sent_counter());
        let standalone = !*self.want_connect.borrow();
        let mut flags = if standalone { sync_flags::STANDALONE } else { 0 };
        if self.discard_my_data.load(Ordering::Acquire) {
            flags |= sync_flags::DISCARD_MY_DATA;
        }
        let mine = self.sync_info(flags);
        let theirs = match exchange_sync_info(&mut reader, &mut writer, &mine).await {
            Ok(t) => t,
            Err(why) => {
                self.note_failure(format!("session start with {} failed: {why}", self.cfg.peer), addr);
                return false;
            }
        };
        if theirs.dry_run() {
            // The peer probes (`connect --dry-run`): it computes the decision
            // from our SyncInfo and says Goodbye. Nothing changes here.
            let verdict = super::decide::decide(&side_view(&theirs), &side_view(&mine), &self.cfg.split_brain);
            tracing::info!(peer = %peer.node, result = verdict.decision.as_str(), rule = verdict.rule, "answered a dry-run probe from the peer");
            let _ =
                tokio::time::timeout(HANDSHAKE_TIMEOUT, async { while let Ok(Some(_)) = reader.read().await {} }).await;
            return false;
        }
        if standalone || !*self.want_connect.borrow() {
            tracing::debug!(peer = %peer.node, "standalone: authenticated connection declined");
            return false;
        }
        if theirs.flags & sync_flags::STANDALONE != 0 {
            // If the peer went standalone over what we would decide too
            // (split brain, two primaries...), so do we: the session that
            // told it so may have been a duplicate connection of ours.
            let verdict = self.verdict(&mine, &theirs);
            if matches!(verdict.decision, Decision::SplitBrain | Decision::Unrelated | Decision::Refuse(_)) {
                self.record_decision(&verdict, &mine, &theirs);
                let (_, why) = self.standalone_reason(&verdict, &mine, &theirs);
                self.go_standalone(&why);
            } else {
                self.note_failure(
                    format!("peer {} is standalone (it runs `repctl connect` to rejoin)", self.cfg.peer),
                    addr,
                );
            }
            return false;
        }
        let Some((id, stop_rx)) = self.adopt(dialled_by_us) else {
            tracing::debug!(peer = %peer.node, dialled_by_us, "duplicate replication connection closed");
            return false;
        };
        if mine.discard_my_data() {
            // One shot: used by this session's decision.
            self.discard_my_data.store(false, Ordering::Release);
        }
        {
            let mut v = self.view_mut();
            v.last_error = None;
            v.tls = tls_session;
        }
        let start = super::session::Start { reader, writer, peer, mine, theirs };
        self.run_session(id, start, stop_rx, local.role).await;
        true
    }

    /// `repctl connect --dry-run`: dials the peer, exchanges SyncInfo with
    /// the DRY_RUN flag, computes the decision a connect would take, says
    /// Goodbye. Changes nothing on either node (works standalone too).
    pub async fn probe(&self, discard_my_data: bool) -> Result<ProbeReport, String> {
        let peer_name = &self.cfg.peer;
        let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(&self.cfg.peer_addr))
            .await
            .map_err(|_| format!("cannot connect to {peer_name} at {}: timed out", self.cfg.peer_addr))?
            .map_err(|e| format!("cannot connect to {peer_name} at {}: {e}", self.cfg.peer_addr))?;
        let local = self.local_hello();
        let mut stream = secure(stream, self.cfg.tls.as_deref(), true, peer_name, HANDSHAKE_TIMEOUT)
            .await
            .map_err(|e| describe_handshake_error(&e, peer_name))?;
        handshake(&mut stream, &local, HANDSHAKE_TIMEOUT).await.map_err(|e| describe_handshake_error(&e, peer_name))?;
        let (mut reader, mut writer) = split_link(stream).map_err(|e| format!("socket setup failed: {e}"))?;
        let mut flags = sync_flags::DRY_RUN;
        if discard_my_data {
            flags |= sync_flags::DISCARD_MY_DATA;
        }
        let mine = self.sync_info(flags);
        let theirs = exchange_sync_info(&mut reader, &mut writer, &mine).await?;
        let _ = writer
            .send(&Message::Goodbye { reason: GoodbyeReason::Other, message: "dry run: nothing changes".into() })
            .await;
        let verdict = self.verdict(&mine, &theirs);
        tracing::info!(peer = %peer_name, result = verdict.decision.as_str(), rule = verdict.rule, explanation = %verdict.explanation, "connect --dry-run");
        Ok(ProbeReport {
            peer: peer_name.clone(),
            decision: DecisionView::from_verdict(&verdict),
            local: SideReport::from(&mine),
            peer_view: SideReport::from(&theirs),
        })
    }

    /// The decision from both SyncInfos (granularity checked first).
    pub(crate) fn verdict(&self, mine: &SyncInfo, theirs: &SyncInfo) -> Verdict {
        if mine.granularity != theirs.granularity {
            let why = format!(
                "bitmap granularity differs: {} has {} bytes per bit, {} has {}",
                self.cfg.node, mine.granularity, self.cfg.peer, theirs.granularity
            );
            return Verdict { decision: Decision::Refuse(why.clone()), rule: "granularity", explanation: why };
        }
        let (l, p) = (side_view(mine), side_view(theirs));
        let v = super::decide::decide(&l, &p, &self.cfg.split_brain);
        if l.role == Role::Primary && p.role == Role::Primary {
            // Two primaries are refused whatever happened; when both also
            // wrote since their last common generation, say it is a split
            // brain (status, event), as it would be once one demotes.
            let as_secondaries = super::decide::decide(
                &SideView { role: Role::Secondary, discard_my_data: false, ..l },
                &SideView { role: Role::Secondary, discard_my_data: false, ..p },
                &SplitBrainPolicy::default(),
            );
            if as_secondaries.decision == Decision::SplitBrain {
                return Verdict {
                    decision: Decision::SplitBrain,
                    rule: as_secondaries.rule,
                    explanation: format!("both nodes are primary, and {}", as_secondaries.explanation),
                };
            }
        }
        v
    }

    /// Why a decision leaves both nodes standalone, for the Goodbye, the
    /// log and `status.link_error`.
    pub(crate) fn standalone_reason(&self, v: &Verdict, mine: &SyncInfo, theirs: &SyncInfo) -> (GoodbyeReason, String) {
        let size = crate::units::format_size_approx;
        match &v.decision {
            Decision::SplitBrain => (
                GoodbyeReason::SplitBrain,
                format!(
                    "split brain: {} ({} has {} out of sync, {} has {}); nothing moves. On the node whose changes are \
                     to be discarded: `repctl connect --discard-my-data`; on the other: `repctl connect`",
                    v.explanation,
                    self.cfg.node,
                    size(mine.dirty_bytes),
                    self.cfg.peer,
                    size(theirs.dirty_bytes)
                ),
            ),
            Decision::Unrelated => (
                GoodbyeReason::UnrelatedData,
                format!("unrelated data: {}; going standalone", v.explanation),
            ),
            _ if mine.role == Role::Primary && theirs.role == Role::Primary => (
                GoodbyeReason::SplitBrain,
                "both nodes are primary (split brain): going standalone; demote one node, then `repctl connect` on both"
                    .to_string(),
            ),
            Decision::Refuse(why) => (GoodbyeReason::Other, format!("connection refused: {why}; going standalone")),
            _ => (GoodbyeReason::Other, v.explanation.clone()),
        }
    }

    /// Records the decision of a session start: log, event, status.
    pub(crate) fn record_decision(&self, v: &Verdict, mine: &SyncInfo, theirs: &SyncInfo) {
        let view = DecisionView::from_verdict(v);
        let split = matches!(v.decision, Decision::SplitBrain);
        {
            let mut lv = self.view_mut();
            lv.decision = Some(view.clone());
            lv.split_brain = split;
            lv.peer_out_of_sync = Some(theirs.dirty_bytes);
        }
        if split {
            tracing::warn!(peer = %self.cfg.peer, rule = v.rule, local_out_of_sync = mine.dirty_bytes, peer_out_of_sync = theirs.dirty_bytes, "split brain: {}", v.explanation);
            self.emit(Event::SplitBrain {
                explanation: v.explanation.clone(),
                local_out_of_sync_bytes: mine.dirty_bytes,
                peer: self.cfg.peer.clone(),
                peer_out_of_sync_bytes: theirs.dirty_bytes,
                rule: v.rule.to_string(),
            });
        } else {
            tracing::info!(peer = %self.cfg.peer, result = %view.result, rule = v.rule, "resync decision: {}", v.explanation);
        }
        self.emit(Event::Decision {
            explanation: view.explanation,
            peer: self.cfg.peer.clone(),
            result: view.result,
            rule: view.rule,
        });
    }

    /// Decides whether a freshly authenticated connection becomes the
    /// session (replacing the running one when the connection rule says so).
    fn adopt(&self, dialled_by_us: bool) -> Option<(u64, watch::Receiver<Option<StopReason>>)> {
        let mut slot = self.slot();
        if let Some(cur) = slot.as_ref() {
            let new_wins = keep_connection(&self.cfg.node, &self.cfg.peer, dialled_by_us);
            let cur_wins = keep_connection(&self.cfg.node, &self.cfg.peer, cur.dialled_by_us);
            let keep_current = !new_wins && (cur_wins || cur.started.elapsed() < DUPLICATE_WINDOW);
            if keep_current {
                return None;
            }
            cur.stop.send_replace(Some(StopReason::Replaced));
        }
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        let (stop, stop_rx) = watch::channel(None);
        *slot = Some(SessionSlot { id, started: Instant::now(), dialled_by_us, stop });
        Some((id, stop_rx))
    }

    async fn run_session(
        self: &Arc<Self>,
        id: u64,
        start: super::session::Start,
        stop: watch::Receiver<Option<StopReason>>,
        hello_role: Role,
    ) {
        // A replaced session may still be winding down: wait for it.
        let mut connected = self.connected.subscribe();
        let _ = tokio::time::timeout(Duration::from_secs(3), connected.wait_for(|c| !*c)).await;
        if self.slot().as_ref().is_none_or(|s| s.id != id) {
            return;
        }
        self.connected.send_replace(true);
        let outcome = super::session::run(self, start, stop, hello_role).await;
        self.end_session(id, &outcome);
    }

    /// Bookkeeping after a session ended.
    fn end_session(&self, id: u64, outcome: &super::session::Outcome) {
        use super::session::Outcome;
        self.link_stats.session_down();
        let was_feeding = self.gate.streaming();
        if was_feeding {
            self.store.detach_feed();
            self.store.set_retain_after(None);
        }
        // Every record the peer has not written gets its bit (tracking is
        // on again after this), before a waiting write is released.
        if let Err(e) = self.store.mark_unacked() {
            tracing::error!(peer = %self.cfg.peer, error = %e, "cannot mark the records the peer lacks in the bitmap");
        }
        if was_feeding {
            // Records the peer never wrote are writes no peer received: a
            // new generation, before their replies are released (the next
            // connect must see that this node wrote alone).
            let acks = self.gate.acks();
            if self.role() == Role::Primary
                && self.store.local_lsn() > acks.written
                && let Err(e) = self.new_generation("records the peer never wrote")
            {
                tracing::error!(peer = %self.cfg.peer, error = %e, "cannot start a new generation at peer loss");
            }
            if self.cfg.on_peer_loss == OnPeerLoss::Suspend
                && !matches!(outcome, Outcome::Stopped(StopReason::RoleChange | StopReason::Renegotiate))
            {
                // Suspend before releasing the waiters, so none slips through.
                self.gate.set_suspended(true);
            }
            self.gate.stop_streaming();
        }
        // The session's claim ends with it (after `active` is off, so that
        // a write released here starts the generation it must).
        *self.claim() = None;
        self.gate.release_feed_claim();
        {
            let mut slot = self.slot();
            if slot.as_ref().is_some_and(|s| s.id == id) {
                *slot = None;
            }
        }
        let standalone = !*self.want_connect.borrow();
        self.set_conn(if standalone { ConnState::Standalone } else { ConnState::Connecting });
        match outcome {
            Outcome::Stopped(r) => tracing::info!(peer = %self.cfg.peer, reason = ?r, "replication session ended"),
            Outcome::PeerLeft(why) => {
                tracing::info!(peer = %self.cfg.peer, "peer disconnected: {why}");
                self.view_mut().last_error = Some(format!("peer disconnected: {why}"));
                self.emit(Event::PeerDisconnected { peer: self.cfg.peer.clone(), reason: why.clone() });
            }
            Outcome::PeerGone(why) => {
                tracing::warn!(peer = %self.cfg.peer, "peer lost: {why}");
                self.emit(Event::PeerLost { peer: self.cfg.peer.clone(), reason: why.clone() });
            }
            Outcome::Failed(why) => {
                self.failed_sessions.fetch_add(1, Ordering::Relaxed);
                tracing::error!(peer = %self.cfg.peer, "replication session failed: {why}");
                self.view_mut().last_error = Some(why.clone());
            }
        }
        self.connected.send_replace(false);
    }

    // --- Called by sessions ----------------------------------------------------

    /// The session commits to its decision: under the claim lock, checks
    /// that what our SyncInfo announced (role, disk, generation ids) is
    /// still true, and records the decision. A stale SyncInfo (a promote,
    /// or a generation started by the session this one replaced, came in
    /// between) means the peer decided on a view that is no longer ours:
    /// the caller renegotiates. A source claims the feed: writes wait for
    /// it instead of starting a generation the peer does not know.
    pub(crate) fn claim_session(&self, mine: &SyncInfo, verdict: &Verdict) -> Result<(), Stale> {
        let mut claim = self.claim();
        let meta = self.store.meta();
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

    pub(crate) fn set_peer(&self, role: Role, disk: DiskState) {
        let changed = {
            let mut v = self.view_mut();
            let changed = v.peer_role != Some(role) || v.peer_disk != disk;
            v.peer_role = Some(role);
            v.peer_disk = disk;
            changed
        };
        if changed {
            self.emit(Event::PeerChanged { disk, peer: self.cfg.peer.clone(), role });
        }
    }

    pub(crate) fn set_replication(&self, r: ReplState) {
        let changed = {
            let mut v = self.view_mut();
            let changed = v.replication != Some(r) || v.connection != ConnState::Connected;
            v.replication = Some(r);
            v.connection = ConnState::Connected;
            changed
        };
        if changed {
            self.emit(Event::ReplicationChanged {
                connection: ConnState::Connected,
                peer: self.cfg.peer.clone(),
                replication: r,
            });
            if r == ReplState::Established && self.role() == Role::Primary {
                // Back in sync: suspended writes go on.
                self.gate.set_suspended(false);
            }
        }
    }

    /// A resync starts (`sync-started` event, `status.resync`).
    pub(crate) fn sync_started(&self, kind: ResyncKind, total_bytes: u64, role: SyncRole) {
        self.view_mut().resync = Some(Resync::new(kind, total_bytes));
        self.emit(Event::SyncStarted { kind, peer: self.cfg.peer.clone(), role, total_bytes });
    }

    /// Resync progress: `done_bytes` durable on the target. Samples the
    /// speed and emits `sync-progress` about once a second.
    pub(crate) fn sync_progress(&self, done_bytes: u64) {
        let event = {
            let mut v = self.view_mut();
            let Some(r) = v.resync.as_mut() else { return };
            r.done_bytes = done_bytes.min(r.total_bytes.max(done_bytes));
            let (at, was) = r.sample;
            let dt = at.elapsed();
            if dt < Duration::from_secs(1) {
                if r.speed_bytes_per_sec == 0 {
                    // No full sample yet: the average so far.
                    let secs = r.started.elapsed().as_secs_f64();
                    if secs > 0.0 {
                        r.speed_bytes_per_sec = (r.done_bytes as f64 / secs) as u64;
                    }
                }
                None
            } else {
                r.speed_bytes_per_sec = (r.done_bytes.saturating_sub(was) as f64 / dt.as_secs_f64()) as u64;
                r.sample = (Instant::now(), r.done_bytes);
                Some(*r)
            }
        };
        if let Some(r) = event {
            self.emit(Event::SyncProgress {
                done_bytes: r.done_bytes,
                eta_seconds: r.eta_seconds(),
                kind: r.kind,
                peer: self.cfg.peer.clone(),
                speed_bytes_per_sec: r.speed_bytes_per_sec,
                total_bytes: r.total_bytes,
            });
        }
    }

    /// Progress of a resync whose total is an estimate (log catch-up).
    pub(crate) fn sync_progress_total(&self, done_bytes: u64, total_bytes: u64) {
        if let Some(r) = self.view_mut().resync.as_mut() {
            r.total_bytes = total_bytes.max(done_bytes);
        }
        self.sync_progress(done_bytes);
    }

    /// A resync completed (`sync-finished` event, `status.last_sync`).
    pub(crate) fn sync_finished(&self, kind: ResyncKind, bytes: u64, role: SyncRole) {
        let seconds = {
            let mut v = self.view_mut();
            let seconds = v.resync.take().map_or(0.0, |r| r.started.elapsed().as_secs_f64());
            v.last_sync = Some(LastSync { kind, bytes, seconds });
            seconds
        };
        self.emit(Event::SyncFinished { bytes, kind, peer: self.cfg.peer.clone(), role, seconds });
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

/// Sends our SyncInfo and reads the peer's (the first frame after the
/// handshake on both sides; pings may come first).
pub(crate) async fn exchange_sync_info<R, W>(
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
    mine: &SyncInfo,
) -> Result<SyncInfo, String>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    writer.send(&Message::SyncInfo(Box::new(*mine))).await.map_err(|e| format!("sending SyncInfo: {e}"))?;
    let read = async {
        loop {
            match reader.read().await {
                Ok(Some(Message::SyncInfo(i))) => return Ok(*i),
                Ok(Some(Message::Ping { .. } | Message::Pong { .. })) => {}
                Ok(Some(Message::Goodbye { reason, message })) => {
                    return Err(format!("the peer said goodbye ({reason}: {message})"));
                }
                Ok(Some(m)) => return Err(format!("expected the peer's SyncInfo, got {}", m.name())),
                Ok(None) => return Err("connection closed before the peer's SyncInfo".to_string()),
                Err(e) => return Err(format!("link error: {e}")),
            }
        }
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, read).await.map_err(|_| "no SyncInfo from the peer in time".to_string())?
}

/// A log line for a failed handshake that names what mismatched.
pub fn describe_handshake_error(e: &HandshakeError, peer: &str) -> String {
    match e {
        HandshakeError::Refused { reason, message, .. } => {
            format!("peer {peer} refused by us: {}: {message}", reason.as_str().replace('-', " "))
        }
        HandshakeError::PeerRefused { reason, message, .. } => {
            format!("peer {peer} refused: {}: {message}", reason.as_str().replace('-', " "))
        }
        other => format!("handshake with {peer} failed: {other}"),
    }
}
