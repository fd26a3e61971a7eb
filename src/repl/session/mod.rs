//! One replication session on an authenticated connection.
//!
//! Both nodes sent their [`SyncInfo`] right after the handshake (see
//! [`super::engine`]); the session starts by computing the resync decision
//! (src/repl/decide.rs) from the two, logging it and recording it for
//! `status`. Then, by the decision and the roles:
//!
//! - **source** (we send: primary, or a secondary with the newer data):
//!   attaches the volume's feed (tracking off: the volume remembers what the
//!   peer has not written in its unacked ring), then
//!   - *no sync*: streams the feed;
//!   - *log catch-up*: first the WAL records the peer lacks, read back from
//!     the WAL, as ordinary records, then the feed; the peer stays
//!     `consistent`. A record that cannot be read from the WAL falls back
//!     to a bitmap (or full) resync;
//!   - *bitmap*: ORs the target's bitmap into ours (persisted before the
//!     start), walks the set bits in offset order through
//!     `queue_sync_read` (the log writer reads them in its order, so a
//!     newer application write always follows the sync data of its block in
//!     the stream), and clears the bits of every chunk the target acked as
//!     *durable*;
//!   - *full*: every bit set, then the same walk (so a full sync resumes
//!     after a restart of either side, like a bitmap resync).
//!
//!   Sending and receiving never block each other: a frame waits for room
//!   in the writer channel inside `select!`, so acks keep being read.
//! - **target** (the peer sends): applies records in order through the
//!   volume (queued at once, completions awaited in order), acks `received`
//!   on decode, `written` as applies complete and `durable` after a flush
//!   (one flush covers every barrier and FUA waiting), all coalesced; resync
//!   data is made durable with `sync_data_file` (every ~8 MiB or 100 ms, and
//!   before the last ack) before it is acknowledged in `SyncAck`.
//! - **idle** (both secondary, nothing to sync): heartbeats only.
//! - split brain, unrelated data, refusals: Goodbye, both nodes standalone.
//!
//! Every session sends Ping every `ping_interval` (from a task of its own, so a
//! loop held up in a slow fsync still pings) and declares the peer lost
//! after `ping_interval + ping_timeout` without any frame; a role change
//! ends the session so that the link is renegotiated.
//!
//! Online verify frames reach `verify_message` from each loop's
//! `m.is_verify()` arm; any other frame a loop does not expect ends the
//! session with a protocol error (`Session::unexpected`).
//!
//! Files: this one starts a session ([`run`]: decide, dispatch, Goodbye)
//! and holds what the three loops share: [`SessionIo`] (the link's input,
//! the silence deadline, the periodic tick, stop and role change as one
//! `select!` arm, [`SessionIo::next`]) and the verify hooks. The loops:
//! `source.rs` (streaming, driving a [`super::resync::ResyncJob`]),
//! `target.rs` (the apply queue, acks, resync durability), `idle.rs` (both
//! secondary).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio::time::sleep_until;

use super::decide::Decision;
use super::engine::{Engine, StopReason};
use super::handshake::PeerInfo;
use super::link::{FrameReader, FrameWriter, LinkError, LinkWrite, QueuedBytes, run_writer_counted};
use super::proto::{GoodbyeReason, Message, SyncInfo};
use super::resync::JobError;
use super::store::{FeedItem, FeedOp};
use super::verify::{After, ReadMode, SessionVerify, TargetJob};
use crate::model::{Lsn, ReplState, Role, unix_ms};

mod idle;
mod source;
mod target;

#[cfg(test)]
pub(crate) use source::ack_stall;

/// Messages queued for the writer task.
const WRITER_QUEUE: usize = 64;

/// How a session ended.
#[derive(Debug)]
pub enum Outcome {
    /// We ended it.
    Stopped(StopReason),
    /// The peer said goodbye (orderly: shutdown, role change, disconnect).
    PeerLeft(String),
    /// The peer closed, went silent, or the connection broke.
    PeerGone(String),
    /// A local error or a protocol violation.
    Failed(String),
}

type Reader = FrameReader<super::link::LinkRead>;

/// What the engine hands a new session: the connection after the handshake
/// and the SyncInfo exchange.
pub struct Start {
    pub reader: Reader,
    pub writer: FrameWriter<LinkWrite>,
    pub peer: PeerInfo,
    pub mine: SyncInfo,
    /// The local bitmap's `mark_count` when `mine` was made.
    pub marks: u64,
    pub theirs: SyncInfo,
}

/// Runs a session to its end.
/// `hello_role` is the role our Hello announced: if ours changed since, the
/// peer decided on a stale role and the session is renegotiated at once.
pub async fn run(
    engine: &Arc<Engine>,
    start: Start,
    stop: watch::Receiver<Option<StopReason>>,
    hello_role: Role,
) -> Outcome {
    let Start { reader, writer, peer, mine, marks, theirs } = start;
    let (tx, rx) = mpsc::channel(WRITER_QUEUE);
    let queued = Arc::new(QueuedBytes::default());
    let peer_address = reader.get_ref().peer_addr().map_or_else(|e| format!("unknown ({e})"), |a| a.to_string());
    engine.link_stats.session_up(&queued, peer_address, unix_ms());
    let writer_task = tokio::spawn(run_writer_counted(writer, rx, Some(Arc::clone(&queued))));
    let heartbeat = AbortOnDrop(tokio::spawn(heartbeat(tx.clone(), engine.cfg.ping_interval)));
    engine.set_peer(theirs.role, theirs.disk);
    let mut io = SessionIo {
        reader,
        stop,
        role_rx: engine.role_rx(),
        tx: tx.clone(),
        engine: Arc::clone(engine),
        last_rx: Instant::now(),
        next_tick: Instant::now(),
        peer_name: peer.node.clone(),
    };
    let mut s = Session {
        engine: Arc::clone(engine),
        tx,
        queued,
        peer_name: peer.node.clone(),
        verify: SessionVerify::default(),
        discard_my_data: false,
    };
    let local_role = engine.role();
    if local_role != hello_role || local_role != mine.role {
        let _ = s
            .tx
            .try_send(Message::Goodbye { reason: GoodbyeReason::Other, message: "role change: reconnecting".into() });
        drop(s);
        drop(io);
        drop(heartbeat);
        let _ = tokio::time::timeout(Duration::from_secs(1), writer_task).await;
        return Outcome::Stopped(StopReason::RoleChange);
    }
    tracing::info!(peer = %peer.node, local_role = %local_role, peer_role = %theirs.role, peer_disk = %theirs.disk, "replication connected");
    let verdict = engine.verdict(&mine, &theirs);
    super::engine::test_hold(super::engine::HoldPoint::Decision).await;
    // Our SyncInfo must still be true when we act on the decision (the
    // peer decided on it too): else renegotiate at once.
    if let Err(stale) = engine.claim_session(&mine, marks, &verdict) {
        tracing::info!(peer = %peer.node, "renegotiating: {}", stale.0);
        let message = format!("renegotiating: {}", stale.0);
        let _ = s.tx.try_send(Message::Goodbye { reason: GoodbyeReason::Other, message });
        drop(s);
        drop(io);
        drop(heartbeat);
        let _ = tokio::time::timeout(Duration::from_secs(1), writer_task).await;
        return Outcome::Stopped(StopReason::Renegotiate);
    }
    engine.record_decision(&verdict, &mine, &theirs);
    // Our `--discard-my-data` waits for the resync it decided to start
    // (target.rs, SyncStart); any other decision uses it up now.
    s.discard_my_data = mine.discard_my_data()
        && verdict.rule == super::decide::rule::SB_DISCARD_MY_DATA
        && matches!(verdict.decision, Decision::Target(_));
    if mine.discard_my_data() && !s.discard_my_data {
        engine.spend_discard_my_data();
    }
    // `new-current-uuid --clear-bitmap` on this node: both secondary, our
    // Hello and SyncInfo carry the new generation; an empty resync (idle
    // below) tells the peer to take it.
    let clear_bitmap =
        local_role == Role::Secondary && theirs.role == Role::Secondary && engine.take_clear_bitmap_offer();
    let outcome = match verdict.decision {
        _ if clear_bitmap => {
            engine.set_replication(ReplState::Established);
            s.idle(&mut io, &peer, true).await
        }
        Decision::SplitBrain | Decision::Unrelated | Decision::Refuse(_) => {
            let (reason, why) = engine.standalone_reason(&verdict, &mine, &theirs);
            if !matches!(verdict.decision, Decision::SplitBrain) {
                tracing::error!(peer = %peer.node, rule = verdict.rule, "{why}");
            }
            let _ = s.tx.try_send(Message::Goodbye { reason, message: why.clone() });
            engine.go_standalone(&why);
            Outcome::Failed(why)
        }
        Decision::NoSync => match (local_role, theirs.role) {
            (Role::Primary, _) => s.source(&mut io, &theirs, None).await,
            (Role::Secondary, Role::Primary) => s.target(&mut io, &theirs, None).await,
            (Role::Secondary, Role::Secondary) => {
                engine.set_replication(ReplState::Established);
                s.idle(&mut io, &peer, false).await
            }
        },
        Decision::Source(kind) => s.source(&mut io, &theirs, Some(kind)).await,
        Decision::Target(kind) => s.target(&mut io, &theirs, Some(kind)).await,
    };
    if let Outcome::Stopped(r) = &outcome {
        let (reason, message) = match r {
            StopReason::Shutdown => (GoodbyeReason::Shutdown, "node shutting down"),
            StopReason::Disconnect => (GoodbyeReason::Disconnect, "disconnected by the operator"),
            StopReason::Replaced => (GoodbyeReason::Other, "replaced by a newer connection"),
            StopReason::RoleChange => (GoodbyeReason::Other, "role change: reconnecting"),
            StopReason::Renegotiate => (GoodbyeReason::Other, "renegotiating: blocks marked out of sync"),
        };
        let _ = s.tx.try_send(Message::Goodbye { reason, message: message.into() });
    }
    s.verify.end(engine, &outcome);
    // Every sender (the session, the input side for Pong, the heartbeat)
    // goes, so that the writer drains and ends.
    drop(s);
    drop(io);
    drop(heartbeat);
    // Let the writer drain (Goodbye included), but not forever.
    let _ = tokio::time::timeout(Duration::from_secs(1), writer_task).await;
    outcome
}

/// Pings the peer every `interval` from a task of its own, so that a
/// session loop held up in a slow fsync (a bitmap persist, a superblock
/// write) never looks silent to the peer. A full writer queue skips a
/// ping: frames are flowing then. Pongs are answered by the session loop.
async fn heartbeat(tx: mpsc::Sender<Message>, interval: Duration) {
    let started = Instant::now();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for seq in 1u64.. {
        tick.tick().await;
        let sent_ns = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(Message::Ping { seq, sent_ns }) {
            return;
        }
    }
}

/// Aborts the task when dropped (the heartbeat holds a sender: the writer
/// drains and ends only once it is gone).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The link's input and the wake-ups every loop shares: frames (pings
/// answered, Goodbye and State handled here), the silence deadline, the
/// periodic tick, stop and role change. Kept apart from [`Session`] so that
/// a loop's `select!` can wait on [`SessionIo::next`] beside its own arms
/// while the handlers use the session.
pub(super) struct SessionIo {
    reader: Reader,
    stop: watch::Receiver<Option<StopReason>>,
    role_rx: watch::Receiver<Role>,
    /// For Pong.
    tx: mpsc::Sender<Message>,
    engine: Arc<Engine>,
    last_rx: Instant,
    /// The loops re-check their conditions at least this often (every
    /// `ping_interval`), as they did when they sent the pings themselves:
    /// a safety net under any wake-up a branch might miss.
    next_tick: Instant,
    peer_name: String,
}

impl SessionIo {
    pub(super) fn stop_reason(&self) -> Option<StopReason> {
        *self.stop.borrow()
    }

    /// The role this node has now.
    pub(super) fn role(&self) -> Role {
        *self.role_rx.borrow()
    }

    /// Frames the reader holds, decoded or not.
    pub(super) fn buffered(&self) -> usize {
        self.reader.buffered()
    }

    /// A long local step (a rebase, the end of a resync) ran: the peer's
    /// silence counts from now.
    pub(super) fn touch(&mut self) {
        self.last_rx = Instant::now();
    }

    /// Moves the next periodic wake-up on once it has passed.
    pub(super) fn tick(&mut self) {
        let now = Instant::now();
        if now >= self.next_tick {
            self.next_tick = now + self.engine.cfg.ping_interval;
        }
    }

    fn silence_deadline(&self) -> Instant {
        self.last_rx + self.engine.cfg.ping_interval + self.engine.cfg.ping_timeout
    }

    /// The shared arms of every loop's `select!`, as one future: the next
    /// frame (only while `reading`; the silence deadline likewise), the
    /// periodic tick, a stop request (the loop reads [`Self::stop_reason`]),
    /// or the role leaving `my_role` (the session ends for renegotiation).
    /// Cancel safe: a frame is never half read (src/repl/link.rs).
    pub(super) async fn next(&mut self, reading: bool, my_role: Role) -> Tick {
        let deadline = self.silence_deadline();
        tokio::select! {
            r = self.reader.read(), if reading => self.frame_result(r),
            _ = sleep_until(self.next_tick.into()) => Tick::Ping,
            _ = sleep_until(deadline.into()), if reading => self.silence_or_input().map_or(Tick::Ping, Tick::Out),
            _ = self.stop.changed() => Tick::Ping,
            _ = role_changed(&mut self.role_rx, my_role) => Tick::Out(Outcome::Stopped(StopReason::RoleChange)),
        }
    }

    fn frame_result(&mut self, r: Result<Option<Message>, LinkError>) -> Tick {
        match r {
            Ok(Some(m)) => {
                self.last_rx = Instant::now();
                match m {
                    Message::Ping { seq, sent_ns } => {
                        let _ = self.tx.try_send(Message::Pong { seq, sent_ns });
                        Tick::Ping
                    }
                    Message::Pong { .. } => Tick::Ping,
                    Message::Goodbye { reason, message } => {
                        Tick::Out(Outcome::PeerLeft(format!("{} ({message})", reason.as_str())))
                    }
                    Message::State { role, disk, .. } => {
                        self.engine.set_peer(role, disk);
                        Tick::Frame(Message::State { role, disk, out_of_sync_bytes: 0 })
                    }
                    other => Tick::Frame(other),
                }
            }
            Ok(None) => Tick::Out(Outcome::PeerGone("connection closed by the peer".into())),
            Err(e) => Tick::Out(Outcome::PeerGone(format!("link error: {e}"))),
        }
    }

    /// The silence deadline passed: the peer is lost unless its frames are
    /// waiting unread (this loop was busy elsewhere, e.g. in a slow fsync,
    /// and `select!` picked the deadline first). Then the silence ends now.
    fn silence_or_input(&mut self) -> Option<Outcome> {
        if self.reader.has_input() {
            tracing::debug!(peer = %self.peer_name, late = ?self.last_rx.elapsed(), "silence deadline passed with the peer's frames unread");
            self.last_rx = Instant::now();
            None
        } else {
            Some(self.silent())
        }
    }

    fn silent(&self) -> Outcome {
        let cfg = &self.engine.cfg;
        Outcome::PeerGone(format!(
            "no frame from {} for {:?} (ping_interval {:?} + ping_timeout {:?})",
            self.peer_name,
            self.last_rx.elapsed(),
            cfg.ping_interval,
            cfg.ping_timeout
        ))
    }
}

struct Session {
    engine: Arc<Engine>,
    tx: mpsc::Sender<Message>,
    /// Data bytes in the writer's queue, not yet on the socket: the primary
    /// takes nothing more from the feed while `max_buffer` bytes wait there,
    /// so the feed fills and back-pressure reaches the log writer.
    queued: Arc<QueuedBytes>,
    peer_name: String,
    /// Online verify of this session (src/repl/verify/).
    verify: SessionVerify,
    /// This session carries our `--discard-my-data` and decided the resync
    /// it asks for: the one-shot is spent when that resync starts.
    discard_my_data: bool,
}

/// What [`SessionIo::next`] saw.
pub(super) enum Tick {
    Frame(Message),
    Out(Outcome),
    /// Nothing for the loop (a ping, a pong, a wake-up): it re-checks its
    /// conditions.
    Ping,
}

/// Which loop a frame arrived in (for [`Session::unexpected`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Source,
    Target,
    Idle,
}

impl Session {
    /// A frame the loop does not expect: a protocol error, the session ends.
    fn unexpected(&mut self, side: Side, m: Message) -> Result<(), Outcome> {
        let from = match side {
            Side::Source => "the sync target",
            Side::Target => "the sync source",
            Side::Idle => "an idle peer",
        };
        let why = format!("unexpected {} from {from}", m.name());
        let _ = self.tx.try_send(Message::Goodbye { reason: GoodbyeReason::ProtocolError, message: why.clone() });
        Err(Outcome::Failed(why))
    }

    /// Sends a message, waiting for room in the writer's queue.
    async fn send(&mut self, m: Message) -> Result<(), Outcome> {
        self.tx.send(m).await.map_err(|_| Outcome::PeerGone("connection closed (writer stopped)".into()))
    }

    // --- Online verify hooks (src/repl/verify.rs) -------------------------------

    /// Source: starts a requested verify (not while `syncing`) and queues
    /// its reads.
    async fn verify_source_tick(&mut self, mode: ReadMode, syncing: bool, app_waiting: bool) -> Result<(), Outcome> {
        if let Some(start) = self.verify.start_if_requested(&self.engine, mode, syncing) {
            self.send(start).await?;
        }
        self.verify
            .queue_reads(&self.engine.store, app_waiting)
            .map_err(|e| Outcome::Failed(format!("verify read: {e}")))
    }

    /// A verify message other than VerifyDigests, on either side.
    async fn verify_message(&mut self, m: Message) -> Result<(), Outcome> {
        let (reply, after) =
            self.verify.on_message(&self.engine, m).map_err(|e| Outcome::Failed(format!("verify: {e}")))?;
        if let Some(r) = reply {
            self.send(r).await?;
        }
        match after {
            After::Continue => Ok(()),
            After::Resync => Err(Outcome::Stopped(StopReason::Renegotiate)),
        }
    }

    /// Target: a compare ran; its result goes to the source.
    async fn verify_target_done(&mut self, job: TargetJob) -> Result<(), Outcome> {
        let result = self.verify.target_done(&self.engine, job);
        self.send(result).await
    }
}

/// An illegal move of the resync job: a defect of the session loop.
fn job_failed(e: JobError) -> Outcome {
    Outcome::Failed(e.to_string())
}

/// Resolves once the role differs from `from` (no guard kept across awaits).
async fn role_changed(rx: &mut watch::Receiver<Role>, from: Role) {
    let changed = rx.wait_for(|r| *r != from).await.is_ok();
    if !changed {
        // The engine (sender) is gone: never resolve.
        std::future::pending::<()>().await;
    }
}

fn record_message(lsn: Lsn, op: FeedOp, fua: bool) -> Message {
    match op {
        FeedOp::Write { offset, data } => Message::Write { lsn, offset, fua, data },
        FeedOp::Trim { offset, len } => Message::Trim { lsn, offset, len, fua },
        FeedOp::Zeroes { offset, len, punch } => Message::Zeroes { lsn, offset, len, punch, fua },
    }
}

/// The frame of a feed item; `None` for verify data, which the session
/// turns into digests (src/repl/verify.rs).
fn item_to_message(item: FeedItem) -> Option<Message> {
    Some(match item {
        FeedItem::Record { lsn, op, fua } => record_message(lsn, op, fua),
        FeedItem::Barrier { upto } => Message::Barrier { upto_lsn: upto },
        FeedItem::SyncData { offset, data } => Message::SyncData { offset, data },
        FeedItem::VerifyData { .. } => return None,
    })
}
