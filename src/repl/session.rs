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

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::link::LinkWrite;
use tokio::sync::{mpsc, watch};
use tokio::time::sleep_until;

use super::decide::Decision;
use super::engine::{Engine, StopReason};
use super::handshake::PeerInfo;
use super::link::{FrameReader, FrameWriter, LinkError, QueuedBytes, run_writer_counted};
use super::proto::{GoodbyeReason, MAX_BITMAP_WORDS, Message, SyncInfo};
use super::store::{BoxFut, FeedItem, FeedOp, LogReadError, LogSource};
use super::verify::{After, ReadMode, SessionVerify, TargetJob};
use crate::event::{Event, SyncRole};
use crate::model::{DiskState, Lsn, Protocol, ReplState, ResyncKind, Role, unix_ms};
use crate::volume::VolumeError;

/// Messages queued for the writer task.
const WRITER_QUEUE: usize = 64;
/// Resync read size (the longest run of set bits read at once).
const SYNC_CHUNK: u64 = 256 << 10;
/// Resync bytes not yet on the socket (read by the log writer, or waiting
/// in the writer's queue) are bounded: an application write made during the
/// resync waits (under B and C) behind that much resync data. The bound is
/// what the link moves in [`SYNC_AHEAD`] at the resync's measured speed,
/// within [`SYNC_WINDOW_MIN`]..=[`SYNC_WINDOW`].
const SYNC_WINDOW: u64 = 8 << 20;
const SYNC_WINDOW_MIN: u64 = 2 * SYNC_CHUNK;
const SYNC_AHEAD: Duration = Duration::from_millis(20);
// Application writes have priority: while one the peer has not written yet
// is in the stream, at most one chunk of resync data is unsent, so a write
// made during a resync waits behind one chunk, not a whole window.
/// Resync bytes sent but not yet *durable* on the target (it syncs its data
/// file about every [`SYNC_DURABLE_EVERY`]) are bounded separately and
/// generously: they are past the socket and delay no application write;
/// the bound keeps the bits a crash would resend, and the ack delay (a
/// checkpoint on the target), from throttling the link.
const SYNC_DURABLE_WINDOW: u64 = 64 << 20;
/// Resync data sent but not yet applied by the target (it is ahead of any
/// application write in the stream), when no application write waited
/// recently.
const SYNC_FLIGHT: u64 = 16 << 20;
/// How long after an application write waited for the peer the resync keeps
/// to one chunk in flight.
const APP_HOLD: Duration = Duration::from_millis(200);
/// Frames handled before acks are sent even if more are buffered.
const ACK_EVERY: usize = 256;
/// The target makes resync data durable (and acks it) after this many
/// bytes or this long, whichever comes first.
const SYNC_DURABLE_BYTES: u64 = 8 << 20;
const SYNC_DURABLE_EVERY: Duration = Duration::from_millis(100);
/// The source persists the bits it cleared this often during a resync.
const BITMAP_PERSIST_EVERY: Duration = Duration::from_secs(1);
/// Bitmap words per BitmapChunk (64 KiB of payload).
const BITMAP_CHUNK_WORDS: usize = 8192;
const _: () = assert!(BITMAP_CHUNK_WORDS <= MAX_BITMAP_WORDS);

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
    let Start { reader, writer, peer, mine, theirs } = start;
    let (tx, rx) = mpsc::channel(WRITER_QUEUE);
    let queued = Arc::new(QueuedBytes::default());
    let peer_address = reader.get_ref().peer_addr().map_or_else(|e| format!("unknown ({e})"), |a| a.to_string());
    engine.link_stats.session_up(&queued, peer_address, unix_ms());
    let writer_task = tokio::spawn(run_writer_counted(writer, rx, Some(Arc::clone(&queued))));
    let heartbeat = AbortOnDrop(tokio::spawn(heartbeat(tx.clone(), engine.cfg.ping_interval)));
    engine.set_peer(theirs.role, theirs.disk);
    let mut io = Io { reader, stop, role_rx: engine.role_rx(), verify: SessionVerify::default() };
    let mut s = Session {
        engine: Arc::clone(engine),
        tx,
        queued,
        last_rx: Instant::now(),
        next_tick: Instant::now(),
        peer_name: peer.node.clone(),
    };
    let local_role = engine.role();
    if local_role != hello_role || local_role != mine.role {
        let _ = s
            .tx
            .try_send(Message::Goodbye { reason: GoodbyeReason::Other, message: "role change: reconnecting".into() });
        drop(s);
        drop(heartbeat);
        let _ = tokio::time::timeout(Duration::from_secs(1), writer_task).await;
        return Outcome::Stopped(StopReason::RoleChange);
    }
    tracing::info!(peer = %peer.node, local_role = %local_role, peer_role = %theirs.role, peer_disk = %theirs.disk, "replication connected");
    let verdict = engine.verdict(&mine, &theirs);
    super::engine::test_hold(super::engine::HoldPoint::Decision).await;
    // Our SyncInfo must still be true when we act on the decision (the
    // peer decided on it too): else renegotiate at once.
    if let Err(stale) = engine.claim_session(&mine, &verdict) {
        tracing::info!(peer = %peer.node, "renegotiating: {}", stale.0);
        let message = format!("renegotiating: {}", stale.0);
        let _ = s.tx.try_send(Message::Goodbye { reason: GoodbyeReason::Other, message });
        drop(s);
        drop(heartbeat);
        let _ = tokio::time::timeout(Duration::from_secs(1), writer_task).await;
        return Outcome::Stopped(StopReason::Renegotiate);
    }
    engine.record_decision(&verdict, &mine, &theirs);
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
    io.verify.end(engine, &outcome);
    drop(s);
    drop(heartbeat);
    // Let the writer drain (Goodbye included), but not forever.
    let _ = tokio::time::timeout(Duration::from_secs(1), writer_task).await;
    outcome
}

/// How long the peer may leave records this node sent unacknowledged (no
/// progress of its `received` ack) while it is otherwise alive, before the
/// session is ended and renegotiated: ten times the silence timeout
/// (15 s with the defaults). A record lost between the two logs (issue 14:
/// a gap left `peer_written` stuck and C writes hung for minutes, until a
/// later record exposed it) then ends in a reconnect and a catch-up, not a
/// hang; a peer merely slow to read (back-pressure) reconnects harmlessly.
pub(crate) fn ack_stall(cfg: &super::engine::EngineConfig) -> Duration {
    (cfg.ping_interval + cfg.ping_timeout) * 10
}

/// Watches the peer's `received` ack against what the source put on the
/// socket (see [`ack_stall`]).
struct AckWatch {
    /// The last record handed to the writer.
    sent: Lsn,
    /// The peer's `received` when it last moved, and when.
    seen: Lsn,
    since: Instant,
    limit: Duration,
}

impl AckWatch {
    fn new(base: Lsn, limit: Duration) -> AckWatch {
        AckWatch { sent: base, seen: base, since: Instant::now(), limit }
    }

    fn sent(&mut self, lsn: Lsn) {
        self.sent = self.sent.max(lsn);
    }

    /// `unsent`: bytes still queued for the writer (not yet on the socket).
    fn check(&mut self, received: Lsn, unsent: usize) -> Option<Outcome> {
        if received != self.seen || received >= self.sent || unsent > 0 {
            self.seen = received;
            self.since = Instant::now();
            return None;
        }
        let waited = self.since.elapsed();
        (waited >= self.limit).then(|| {
            Outcome::PeerGone(format!(
                "the peer has acknowledged LSN {received} but not the records up to {} sent {waited:.1?} ago \
                 (limit {:?}): reconnecting to catch up",
                self.sent, self.limit
            ))
        })
    }
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

/// The receiving side of a session, kept apart from [`Session`] so that
/// `select!` branches can borrow it while the handlers use the session.
struct Io {
    reader: Reader,
    stop: watch::Receiver<Option<StopReason>>,
    role_rx: watch::Receiver<Role>,
    /// Online verify of this session (src/repl/verify.rs).
    verify: SessionVerify,
}

impl Io {
    fn stop_reason(&self) -> Option<StopReason> {
        *self.stop.borrow()
    }
}

struct Session {
    engine: Arc<Engine>,
    tx: mpsc::Sender<Message>,
    /// Data bytes in the writer's queue, not yet on the socket: the primary
    /// takes nothing more from the feed while `max_buffer` bytes wait there,
    /// so the feed fills and back-pressure reaches the log writer.
    queued: Arc<QueuedBytes>,
    last_rx: Instant,
    /// The loops re-check their conditions at least this often (every
    /// `ping_interval`), as they did when they sent the pings themselves:
    /// a safety net under any wake-up a branch might miss.
    next_tick: Instant,
    peer_name: String,
}

/// What the common part of the loop saw.
enum Tick {
    Frame(Message),
    Out(Outcome),
    Ping,
}

/// Which loop a frame arrived in (for [`Session::extra_frame`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Source,
    Target,
    Idle,
}

impl Session {
    /// Dead hook: hands every frame back, so `unexpected` always ends the
    /// session. It was meant for online verify, which the loops now route
    /// themselves (`m.is_verify()` arms to `verify_message`); remove it when
    /// the session is next restructured.
    fn extra_frame(&mut self, side: Side, m: Message) -> Result<Option<Message>, Outcome> {
        let _ = side;
        Ok(Some(m))
    }

    fn unexpected(&mut self, side: Side, m: Message) -> Result<(), Outcome> {
        match self.extra_frame(side, m)? {
            None => Ok(()),
            Some(m) => {
                let from = match side {
                    Side::Source => "the sync target",
                    Side::Target => "the sync source",
                    Side::Idle => "an idle peer",
                };
                let why = format!("unexpected {} from {from}", m.name());
                let _ =
                    self.tx.try_send(Message::Goodbye { reason: GoodbyeReason::ProtocolError, message: why.clone() });
                Err(Outcome::Failed(why))
            }
        }
    }

    fn silence_deadline(&self) -> Instant {
        self.last_rx + self.engine.cfg.ping_interval + self.engine.cfg.ping_timeout
    }

    /// Moves the next periodic wake-up on once it has passed.
    fn tick(&mut self) {
        let now = Instant::now();
        if now >= self.next_tick {
            self.next_tick = now + self.engine.cfg.ping_interval;
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
    fn silence_or_input(&mut self, reader: &Reader) -> Option<Outcome> {
        if reader.has_input() {
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

    // --- Idle -----------------------------------------------------------------

    async fn idle(&mut self, io: &mut Io, peer: &PeerInfo, clear_bitmap: bool) -> Outcome {
        let my_role = *io.role_rx.borrow();
        if clear_bitmap {
            // `new-current-uuid --clear-bitmap`: our Hello carried the new
            // generation; an empty sync tells the peer to take it.
            let _ = self.tx.try_send(Message::SyncStart { kind: ResyncKind::Full, total_bytes: 0, start_lsn: 0 });
            let _ = self.tx.try_send(Message::SyncEnd { bytes: 0 });
        }
        let mut empty_sync = false;
        loop {
            if let Some(r) = io.stop_reason() {
                return Outcome::Stopped(r);
            }
            self.tick();
            // Online verify with two secondaries: nothing writes, this node
            // reads directly (see verify.rs).
            if let Err(o) = self.verify_source_tick(io, ReadMode::Direct, false, false).await {
                return o;
            }
            let deadline = self.silence_deadline();
            let tick = tokio::select! {
                r = io.reader.read() => self.frame_result(r),
                r = io.verify.next_direct() => match r {
                    // Our own digests: to the peer.
                    Ok((offset, data)) => match io.verify.digests_for(offset, &data) {
                        Some(m) => match self.tx.send(m).await {
                            Ok(()) => Tick::Ping,
                            Err(_) => Tick::Out(Outcome::PeerGone("connection closed (writer stopped)".into())),
                        },
                        None => Tick::Ping,
                    },
                    Err(e) => Tick::Out(Outcome::Failed(format!("verify read: {e}"))),
                },
                _ = self.engine.verify.wake.notified() => Tick::Ping,
                _ = sleep_until(self.next_tick.into()) => Tick::Ping,
                _ = sleep_until(deadline.into()) => self.silence_or_input(&io.reader).map_or(Tick::Ping, Tick::Out),
                _ = io.stop.changed() => Tick::Ping,
                _ = role_changed(&mut io.role_rx, my_role) => Tick::Out(Outcome::Stopped(StopReason::RoleChange)),
            };
            match tick {
                Tick::Out(o) => return o,
                Tick::Ping => {}
                Tick::Frame(Message::State { role: Role::Primary, .. }) => {
                    // The peer was promoted; it reconnects to renegotiate.
                }
                Tick::Frame(Message::State { .. }) | Tick::Frame(Message::Ack { .. }) => {}
                // Our `--clear-bitmap` offer: a blank peer whose decision saw
                // our new generation takes the empty sync as its target and
                // acknowledges it. Nothing to answer (the next session finds
                // both in the same generation).
                Tick::Frame(Message::SyncAck { .. }) if clear_bitmap => {}
                Tick::Frame(Message::SyncStart { kind: ResyncKind::Full, total_bytes: 0, start_lsn: 0 }) => {
                    empty_sync = true
                }
                Tick::Frame(Message::SyncEnd { bytes: 0 }) if empty_sync => {
                    empty_sync = false;
                    if let Err(why) = self.take_peer_generation(peer) {
                        tracing::warn!(peer = %peer.node, "new-current-uuid --clear-bitmap from the peer refused: {why}");
                        let _ = self.tx.try_send(Message::Goodbye {
                            reason: GoodbyeReason::Other,
                            message: format!(
                                "new-current-uuid --clear-bitmap refused by {}: {why}",
                                self.engine.cfg.node
                            ),
                        });
                        return Outcome::Failed(format!("refused the peer's new-current-uuid --clear-bitmap: {why}"));
                    }
                }
                Tick::Frame(Message::VerifyDigests { offset, block, digests }) => {
                    // Nothing is applied between two secondaries: compare now.
                    let (job, compare) = match io.verify.target_digests(&self.engine, offset, block, digests) {
                        Ok(Some(x)) => x,
                        Ok(None) => continue,
                        Err(e) => return Outcome::Failed(format!("verify: {e}")),
                    };
                    if let Err(e) = compare.await {
                        return Outcome::Failed(format!("verify read: {e}"));
                    }
                    if let Err(o) = self.verify_target_done(io, job).await {
                        return o;
                    }
                }
                Tick::Frame(m) if m.is_verify() => {
                    if let Err(o) = self.verify_message(io, m).await {
                        return o;
                    }
                }
                Tick::Frame(m) => {
                    if let Err(o) = self.unexpected(Side::Idle, m) {
                        return o;
                    }
                }
            }
        }
    }

    /// The peer (both secondary, both blank) declared a new generation
    /// with both disks uptodate and no sync: take it, if we are blank too.
    fn take_peer_generation(&mut self, peer: &PeerInfo) -> Result<(), String> {
        let engine = &self.engine;
        let meta = engine.meta();
        let lsn = engine.store.local_lsn();
        if meta.disk != DiskState::Inconsistent {
            return Err(format!("our disk is {}, not inconsistent", meta.disk));
        }
        if lsn != 0 {
            return Err(format!("our volume was written (local LSN {lsn})"));
        }
        if peer.disk != DiskState::UpToDate || peer.gen_ids.current == 0 {
            return Err("the peer did not announce an uptodate generation".into());
        }
        engine
            .store_disk(DiskState::UpToDate, Some(peer.gen_ids))
            .map_err(|e| format!("cannot record the disk: {e}"))?;
        engine.took_peer_generation();
        tracing::info!(peer = %peer.node, "new-current-uuid --clear-bitmap: both disks uptodate without a sync");
        let _ =
            self.tx.try_send(Message::State { role: Role::Secondary, disk: DiskState::UpToDate, out_of_sync_bytes: 0 });
        engine.set_peer(peer.role, DiskState::UpToDate);
        Ok(())
    }

    // --- Source ---------------------------------------------------------------

    /// Receives the target's bitmap (BitmapChunk... BitmapEnd) and ORs it
    /// into ours.
    async fn receive_bitmap(&mut self, io: &mut Io) -> Result<(), Outcome> {
        let store = Arc::clone(&self.engine.store);
        let ours = store.bitmap_words().len() as u64;
        let mut merged = 0u64;
        loop {
            let deadline = self.silence_deadline();
            let tick = tokio::select! {
                r = io.reader.read() => self.frame_result(r),
                _ = sleep_until(self.next_tick.into()) => Tick::Ping,
                _ = sleep_until(deadline.into()) => self.silence_or_input(&io.reader).map_or(Tick::Ping, Tick::Out),
            };
            self.tick();
            match tick {
                Tick::Out(o) => return Err(o),
                Tick::Ping | Tick::Frame(Message::State { .. } | Message::Ack { .. }) => {}
                Tick::Frame(Message::BitmapChunk { first_word, words }) => {
                    if first_word.saturating_add(words.len() as u64) > ours {
                        return Err(Outcome::Failed(format!(
                            "the peer's bitmap chunk at word {first_word} (+{}) exceeds our {ours} words",
                            words.len()
                        )));
                    }
                    merged += words.iter().map(|w| u64::from(w.count_ones())).sum::<u64>();
                    store.merge_bitmap_words(first_word, &words);
                }
                Tick::Frame(Message::BitmapEnd { total_words }) => {
                    if total_words != ours {
                        return Err(Outcome::Failed(format!(
                            "the peer's bitmap has {total_words} words, ours {ours} (different size or granularity)"
                        )));
                    }
                    tracing::info!(peer = %self.peer_name, peer_bits = merged, "merged the peer's bitmap");
                    return Ok(());
                }
                Tick::Frame(m) => self.unexpected(Side::Source, m)?,
            }
        }
    }

    async fn source(&mut self, io: &mut Io, theirs: &SyncInfo, plan: Option<ResyncKind>) -> Outcome {
        match self.source_inner(io, theirs, plan).await {
            Ok(o) | Err(o) => o,
        }
    }

    async fn source_inner(
        &mut self,
        io: &mut Io,
        theirs: &SyncInfo,
        plan: Option<ResyncKind>,
    ) -> Result<Outcome, Outcome> {
        let engine = Arc::clone(&self.engine);
        let store = Arc::clone(&engine.store);
        let peer_lsn = theirs.local_lsn;
        if plan == Some(ResyncKind::Bitmap) {
            self.receive_bitmap(io).await?;
        }
        // Feed first, then tracking off: every record up to `base` was
        // committed while tracking was on (bits) or is in the feed.
        let (base, mut feed) = store.attach_feed(engine.cfg.max_buffer);
        store.set_tracking(false);
        engine.gate().feed_attached(base);
        let mut catchup: Option<Catchup> = None;
        let mut walk: Option<Walk> = None;
        let wants_log = matches!(plan, None | Some(ResyncKind::Log)) && peer_lsn < base;
        if plan.is_none() && peer_lsn > base {
            return Err(Outcome::Failed(format!(
                "the peer is at LSN {peer_lsn}, ahead of ours ({base}), without a resync decided"
            )));
        }
        if wants_log {
            store.set_retain_after(Some(peer_lsn));
            // Marks no record explains (a verify difference, a merged
            // bitmap) would survive a replay of the records: resync them.
            let reader = if store.has_foreign_marks() {
                Err(LogReadError::NotInLog {
                    lsn: peer_lsn + 1,
                    why: "the bitmap holds marks that no record explains (verify, a merged bitmap, a full sync)".into(),
                })
            } else {
                store.log_reader(peer_lsn + 1, base)
            };
            match reader {
                Ok(reader) => {
                    tracing::info!(peer = %self.peer_name, from = peer_lsn + 1, to = base, "log catch-up starts");
                    self.send(Message::SyncStart { kind: ResyncKind::Log, total_bytes: 0, start_lsn: peer_lsn }, io)
                        .await?;
                    engine.set_replication(ReplState::SyncSource);
                    engine.sync_started(ResyncKind::Log, 0, SyncRole::Source);
                    catchup = Some(Catchup {
                        reader,
                        next: peer_lsn + 1,
                        base,
                        bytes: 0,
                        end_sent: false,
                        marks_at_start: store.mark_count(),
                    });
                }
                Err(e) => {
                    let kind = self.fallback_kind(peer_lsn, &e);
                    walk = Some(self.start_walk(io, kind, base).await?);
                }
            }
        } else {
            store.set_retain_after(Some(base));
            match plan {
                Some(ResyncKind::Full) => {
                    store
                        .mark_all()
                        .map_err(|e| Outcome::Failed(format!("cannot mark every block for a full sync: {e}")))?;
                    walk = Some(self.start_walk(io, ResyncKind::Full, base).await?);
                }
                Some(ResyncKind::Bitmap) => walk = Some(self.start_walk(io, ResyncKind::Bitmap, base).await?),
                _ => {
                    tracing::info!(peer = %self.peer_name, lsn = base, "peer is up to date: no sync");
                    engine.set_replication(ReplState::Established);
                }
            }
        }
        let my_role = engine.role();
        let mut pending: Option<Message> = None;
        let mut pending_lsn: Option<Lsn> = None;
        let mut last_record: Lsn = base;
        let mut acks_watch = AckWatch::new(base, ack_stall(&engine.cfg));
        let tx = self.tx.clone();
        loop {
            if let Some(r) = io.stop_reason() {
                return Ok(Outcome::Stopped(r));
            }
            self.tick();
            if let Some(o) = acks_watch.check(engine.gate().acks().received, self.queued.get()) {
                return Ok(o);
            }
            // The log catch-up comes before the feed (its records are older).
            if pending.is_none()
                && let Some(c) = catchup.as_mut()
                && !c.end_sent
            {
                match c.reader.next().await {
                    Ok(Some(rec)) if rec.lsn == c.next && rec.lsn <= c.base => {
                        c.next += 1;
                        c.bytes += op_bytes(&rec.op);
                        engine.sync_progress_total(c.bytes, c.bytes * (c.base - peer_lsn) / (c.next - 1 - peer_lsn));
                        pending = Some(record_message(rec.lsn, rec.op, rec.fua));
                    }
                    Ok(Some(rec)) => {
                        let e = LogReadError::NotInLog {
                            lsn: c.next,
                            why: format!("the WAL reader returned LSN {} instead", rec.lsn),
                        };
                        let kind = self.fallback_kind(peer_lsn, &e);
                        catchup = None;
                        walk = Some(self.start_walk(io, kind, base).await?);
                    }
                    Ok(None) if c.next > c.base => {
                        pending = Some(Message::SyncEnd { bytes: c.bytes });
                        c.end_sent = true;
                    }
                    Ok(None) => {
                        let e = LogReadError::NotInLog { lsn: c.next, why: "the WAL ends before it".into() };
                        let kind = self.fallback_kind(peer_lsn, &e);
                        catchup = None;
                        walk = Some(self.start_walk(io, kind, base).await?);
                    }
                    Err(e) => {
                        if let LogReadError::Volume(v) = &e
                            && let Some(f) = store.failed()
                        {
                            return Err(Outcome::Failed(format!("the local volume stopped: {f} ({v})")));
                        }
                        let kind = self.fallback_kind(peer_lsn, &e);
                        catchup = None;
                        walk = Some(self.start_walk(io, kind, base).await?);
                    }
                }
            }
            let mut rate_wake: Option<Instant> = None;
            if let Some(w) = walk.as_mut() {
                let app_waiting = last_record > engine.gate().acks().written;
                rate_wake = w.queue_reads(&*store, app_waiting, self.queued.get() as u64, engine.cfg.resync_rate)?;
                if w.scan_done && !w.end_sent && w.seen >= w.queued && pending.is_none() {
                    pending = Some(Message::SyncEnd { bytes: w.queued });
                    w.end_sent = true;
                }
            }
            // Online verify (src/repl/verify.rs): reads in the writer's order,
            // not during a resync; a write committed but not yet written by
            // the peer (even if still in the feed) has priority.
            let app_waiting =
                io.verify.is_source() && store.local_lsn().max(last_record) > engine.gate().acks().written;
            self.verify_source_tick(io, ReadMode::Feed, walk.is_some() || catchup.is_some(), app_waiting).await?;
            let feed_open = catchup.as_ref().is_none_or(|c| c.end_sent);
            // The walk waits for the writer: wake up when it sent something.
            let walk_waits_writer = pending.is_none()
                && rate_wake.is_none()
                && walk.as_ref().is_some_and(|w| w.held_by_unsent())
                && self.queued.get() > 0;
            let deadline = self.silence_deadline();
            tokio::select! {
                item = feed.recv(), if pending.is_none() && feed_open => match item {
                    Some(FeedItem::VerifyData { offset, data }) => pending = io.verify.digests_for(offset, &data),
                    Some(item) => {
                        if let (FeedItem::SyncData { data, .. }, Some(w)) = (&item, walk.as_mut()) {
                            w.seen += data.len() as u64;
                        }
                        if let FeedItem::Record { lsn, .. } = &item {
                            last_record = *lsn;
                            pending_lsn = Some(*lsn);
                        }
                        pending = item_to_message(item);
                    }
                    None => {
                        if let Some(f) = store.failed() {
                            return Err(Outcome::Failed(format!("the local volume stopped: {f}")));
                        }
                        return Err(Outcome::Failed("the replication feed was closed".into()));
                    }
                },
                permit = tx.reserve(), if pending.is_some() && self.queued.get() < engine.cfg.max_buffer => match permit {
                    Ok(p) => {
                        if let Some(m) = pending.take() {
                            self.queued.add(m.data().map_or(0, |d| d.len()));
                            p.send(m);
                            if let Some(lsn) = pending_lsn.take() {
                                acks_watch.sent(lsn);
                            }
                        }
                    }
                    Err(_) => return Err(Outcome::PeerGone("connection closed (writer stopped)".into())),
                },
                _ = self.queued.drained(), if (pending.is_some() && self.queued.get() >= engine.cfg.max_buffer) || walk_waits_writer => {}
                r = io.reader.read() => match self.frame_result(r) {
                    Tick::Out(o) => return Ok(o),
                    Tick::Ping | Tick::Frame(Message::State { .. }) => {}
                    Tick::Frame(Message::Ack { received, written, durable }) => {
                        engine.gate().record_ack(received, written, durable);
                        let a = engine.gate().acks();
                        store.set_peer_written(a.written);
                        if catchup.is_none() {
                            store.set_retain_after(Some(a.durable));
                        }
                    }
                    Tick::Frame(Message::SyncAck { done_bytes, written_bytes }) => {
                        if let Some(w) = walk.as_mut() {
                            w.applied = w.applied.max(written_bytes.min(w.queued));
                            w.acked(&*store, done_bytes);
                            engine.sync_progress(w.done);
                            // Cleared bits reach the disk about once a second, so
                            // a restarted source resumes close to where it was
                            // (checkpoints also persist them, but only while
                            // writes arrive).
                            if w.persisted_at.elapsed() >= BITMAP_PERSIST_EVERY {
                                w.persisted_at = Instant::now();
                                store.persist_bitmap().map_err(|e| {
                                    Outcome::Failed(format!("cannot persist the bitmap during the resync: {e}"))
                                })?;
                            }
                            if w.end_sent && w.done >= w.queued {
                                self.walk_finished(w, theirs)?;
                                walk = None;
                            }
                        } else if let Some(c) = catchup.as_ref()
                            && c.end_sent
                            && done_bytes >= c.bytes
                        {
                            self.catchup_finished(c, theirs)?;
                            catchup = None;
                            let a = engine.gate().acks();
                            store.set_retain_after(Some(a.durable));
                        }
                    }
                    Tick::Frame(m) if m.is_verify() => self.verify_message(io, m).await?,
                    Tick::Frame(m) => self.unexpected(Side::Source, m)?,
                },
                _ = engine.verify.wake.notified() => {}
                _ = sleep_until(io.verify.next_wake().unwrap_or(deadline).into()), if io.verify.next_wake().is_some() => {}
                _ = sleep_until(self.next_tick.into()) => {}
                _ = sleep_until(rate_wake.unwrap_or(deadline).into()), if rate_wake.is_some() => {}
                _ = sleep_until(deadline.into()) => if let Some(o) = self.silence_or_input(&io.reader) {
                    return Ok(o);
                },
                _ = io.stop.changed() => {}
                _ = role_changed(&mut io.role_rx, my_role) => return Ok(Outcome::Stopped(StopReason::RoleChange)),
            }
        }
    }

    /// Sends a message, waiting for room in the writer's queue.
    async fn send(&mut self, m: Message, io: &mut Io) -> Result<(), Outcome> {
        let _ = io;
        self.tx.send(m).await.map_err(|_| Outcome::PeerGone("connection closed (writer stopped)".into()))
    }

    /// A log catch-up is impossible: bitmap when our bits cover everything
    /// the peer lacks, else full.
    fn fallback_kind(&self, peer_lsn: Lsn, e: &LogReadError) -> ResyncKind {
        let base = self.engine.store.bitmap_base_lsn();
        let kind = if peer_lsn >= base { ResyncKind::Bitmap } else { ResyncKind::Full };
        tracing::warn!(peer = %self.peer_name, peer_lsn, bitmap_base_lsn = base, error = %e, "log catch-up impossible: {kind} resync instead");
        kind
    }

    /// Starts a bitmap or full walk (the bits are final: merged and, for a
    /// full sync, all set).
    async fn start_walk(&mut self, io: &mut Io, kind: ResyncKind, base: Lsn) -> Result<Walk, Outcome> {
        let engine = Arc::clone(&self.engine);
        let store = &engine.store;
        if kind == ResyncKind::Full {
            store.mark_all().map_err(|e| Outcome::Failed(format!("cannot mark every block for a full sync: {e}")))?;
        }
        store
            .persist_bitmap()
            .map_err(|e| Outcome::Failed(format!("cannot persist the bitmap before the resync: {e}")))?;
        store.set_retain_after(Some(base));
        let total = store.dirty_bytes();
        // A bitmap with every block set (an invalidated target, a full sync
        // resumed from its start) moves the whole volume: say so.
        let kind = if kind == ResyncKind::Bitmap && total >= store.size() { ResyncKind::Full } else { kind };
        tracing::info!(peer = %self.peer_name, %kind, bytes = total, start_lsn = base, "resync to the peer starts");
        self.send(Message::SyncStart { kind, total_bytes: total, start_lsn: base }, io).await?;
        engine.set_replication(ReplState::SyncSource);
        engine.sync_started(kind, total, SyncRole::Source);
        Ok(Walk::new(kind))
    }

    /// The target has every block of the walk durable.
    fn walk_finished(&mut self, w: &Walk, theirs: &SyncInfo) -> Result<(), Outcome> {
        self.source_done(w.kind, w.queued, theirs)?;
        tracing::info!(peer = %self.peer_name, kind = %w.kind, bytes = w.queued, took = ?w.started.elapsed(), "resync done");
        self.engine.set_replication(ReplState::Established);
        Ok(())
    }

    fn catchup_finished(&mut self, c: &Catchup, theirs: &SyncInfo) -> Result<(), Outcome> {
        let store = &self.engine.store;
        // Every bit came from a record of this lineage with LSN <= `base`
        // (tracked, or marked when a link dropped): the peer had every
        // record <= its LSN and now has the rest durable. A bit set since
        // the start other than by tracking (a ring spill) may be a record
        // after `base` still in flight: keep them all then, for a bitmap
        // resync at the next connect.
        if store.mark_count() == c.marks_at_start {
            store.clear_range(0, store.size());
        } else if store.dirty_bytes() > 0 {
            tracing::warn!(
                peer = %self.peer_name,
                dirty_bytes = store.dirty_bytes(),
                "blocks were marked while the log catch-up ran: they stay marked for a bitmap resync at the next connect"
            );
        }
        self.source_done(ResyncKind::Log, c.bytes, theirs)?;
        tracing::info!(peer = %self.peer_name, records = c.base - theirs.local_lsn, bytes = c.bytes, "log catch-up done");
        self.engine.set_replication(ReplState::Established);
        Ok(())
    }

    /// Source side of a finished resync: generations, bitmap, status.
    fn source_done(&mut self, kind: ResyncKind, bytes: u64, theirs: &SyncInfo) -> Result<(), Outcome> {
        let engine = Arc::clone(&self.engine);
        let store = &engine.store;
        if store.dirty_bytes() == 0 {
            let mut meta = store.meta();
            if meta.gen_ids.retire_bitmap() {
                store.store_meta(meta).map_err(|e| Outcome::Failed(format!("cannot record the generations: {e}")))?;
            }
        }
        store.persist_bitmap().map_err(|e| Outcome::Failed(format!("cannot persist the bitmap: {e}")))?;
        let mine = store.meta().disk;
        let peer_disk = if mine == DiskState::UpToDate { DiskState::UpToDate } else { DiskState::Consistent };
        engine.sync_finished(kind, bytes, SyncRole::Source);
        engine.set_peer(theirs.role, peer_disk);
        Ok(())
    }

    // --- Target -----------------------------------------------------------------

    /// Sends our bitmap to the source (non-zero runs of words).
    async fn send_bitmap(&mut self, io: &mut Io) -> Result<(), Outcome> {
        let words = self.engine.store.bitmap_words();
        let mut i = 0;
        while i < words.len() {
            if words[i] == 0 {
                i += 1;
                continue;
            }
            let start = i;
            while i < words.len() && words[i] != 0 && i - start < BITMAP_CHUNK_WORDS {
                i += 1;
            }
            let chunk = Message::BitmapChunk { first_word: start as u64, words: words[start..i].to_vec() };
            self.send(chunk, io).await?;
        }
        self.send(Message::BitmapEnd { total_words: words.len() as u64 }, io).await
    }

    async fn target(&mut self, io: &mut Io, theirs: &SyncInfo, plan: Option<ResyncKind>) -> Outcome {
        match self.target_inner(io, theirs, plan).await {
            Ok(o) | Err(o) => o,
        }
    }

    async fn target_inner(
        &mut self,
        io: &mut Io,
        theirs: &SyncInfo,
        plan: Option<ResyncKind>,
    ) -> Result<Outcome, Outcome> {
        let engine = Arc::clone(&self.engine);
        let store = Arc::clone(&engine.store);
        // What we apply comes from the peer: no bits for it (the ring is
        // pruned as records are written, see set_peer_written below).
        store.set_tracking(false);
        let local = store.local_lsn();
        let mut t = Target { received: local, written: local, durable: local, acked: None, ..Target::default() };
        let _ = self.tx.try_send(Message::State {
            role: engine.role(),
            disk: engine.meta().disk,
            out_of_sync_bytes: store.dirty_bytes(),
        });
        let _ = self.tx.try_send(Message::Ack { received: local, written: local, durable: local });
        t.acked = Some((local, local, local));
        if plan == Some(ResyncKind::Bitmap) {
            self.send_bitmap(io).await?;
        }
        if plan.is_none() {
            engine.set_replication(ReplState::Established);
        }
        let my_role = engine.role();
        let mut pending: VecDeque<(Pending, BoxFut<'static, Result<(), VolumeError>>)> = VecDeque::new();
        let mut flushing: Option<(Lsn, BoxFut<'_, Result<Lsn, VolumeError>>)> = None;
        let mut syncing: Option<(u64, BoxFut<'_, Result<(), VolumeError>>)> = None;
        let mut since_ack = 0usize;
        let mut last_data_sync = Instant::now();
        loop {
            if let Some(r) = io.stop_reason() {
                return Ok(Outcome::Stopped(r));
            }
            self.tick();
            // A barrier (or the sync end) needs everything written first.
            let log_end = t.sync_end.is_some() && t.kind == Some(ResyncKind::Log);
            // Under protocol C, when the stream pauses (every record applied,
            // nothing more buffered: a QD1 commit's write), the target makes
            // what it wrote durable at once, so the primary's FLUSH usually
            // finds the peer's durable ack already there and a commit costs
            // one round trip, not two. A busy stream keeps flushing on
            // barriers only (group commit).
            let eager = engine.cfg.protocol == Protocol::C && pending.is_empty() && io.reader.buffered() == 0;
            let want_durable = if log_end || eager { t.written } else { t.barrier };
            if flushing.is_none() && want_durable > t.durable && t.written >= want_durable {
                flushing = Some((t.written, store.flush()));
            }
            // Resync data becomes durable in batches, and all of it before
            // the last ack.
            let ending = t.sync_end.is_some() && pending.is_empty();
            if syncing.is_none()
                && t.sync_written > t.sync_durable
                && (ending
                    || t.sync_written - t.sync_durable >= SYNC_DURABLE_BYTES
                    || last_data_sync.elapsed() >= SYNC_DURABLE_EVERY)
            {
                syncing = Some((t.sync_written, store.sync_data_file()));
                last_data_sync = Instant::now();
            }
            if ending && flushing.is_none() && syncing.is_none() && t.sync_durable >= t.sync_written {
                let bytes = t.sync_end.take().unwrap_or(0);
                self.finish_sync(&mut t, theirs, bytes).await?;
            }
            // A full writer queue keeps `since_ack`: the next wake-up (at
            // the latest the periodic tick) retries.
            if (since_ack >= ACK_EVERY || (since_ack > 0 && io.reader.buffered() == 0) || t.sync_dirty)
                && self.send_acks(&mut t)
            {
                since_ack = 0;
            }
            // `repctl verify` here: the source runs it (src/repl/verify.rs).
            if engine.verify.take_request() {
                self.send(Message::VerifyRequest, io).await?;
            }
            // While a verify compare waits in `pending`, no frame is read:
            // the compare sees exactly the stream up to its digests.
            let reading = t.sync_end.is_none() && !io.verify.gate;
            let deadline = self.silence_deadline();
            let data_sync_due = last_data_sync + SYNC_DURABLE_EVERY;
            tokio::select! {
                biased;
                done = async {
                    match pending.front_mut() {
                        Some((_, f)) => f.await,
                        None => std::future::pending().await,
                    }
                } => {
                    let Some((what, _)) = pending.pop_front() else { continue };
                    if let Err(e) = done {
                        return Err(Outcome::Failed(format!("applying the peer's stream: {e}")));
                    }
                    match what {
                        Pending::Record { lsn, fua } => {
                            t.written = t.written.max(lsn);
                            store.set_peer_written(t.written);
                            if fua {
                                t.durable = t.durable.max(lsn);
                            }
                        }
                        Pending::Sync { len } => {
                            t.sync_written += len;
                            t.sync_dirty = true;
                        }
                        Pending::Verify(job) => self.verify_target_done(io, job).await?,
                    }
                    since_ack += 1;
                }
                r = async {
                    match flushing.as_mut() {
                        Some((_, f)) => f.await,
                        None => std::future::pending().await,
                    }
                } => {
                    let upto = flushing.take().map_or(0, |(w, _)| w);
                    if let Err(e) = r {
                        return Err(Outcome::Failed(format!("flush on the sync target: {e}")));
                    }
                    t.durable = t.durable.max(upto);
                    since_ack += 1;
                }
                r = async {
                    match syncing.as_mut() {
                        Some((_, f)) => f.await,
                        None => std::future::pending().await,
                    }
                } => {
                    let upto = syncing.take().map_or(0, |(w, _)| w);
                    if let Err(e) = r {
                        return Err(Outcome::Failed(format!("syncing the resync data: {e}")));
                    }
                    t.sync_durable = t.sync_durable.max(upto);
                    t.sync_dirty = true;
                }
                r = io.reader.read(), if reading => match self.frame_result(r) {
                    Tick::Out(o) => return Ok(o),
                    Tick::Ping | Tick::Frame(Message::State { .. }) => {}
                    Tick::Frame(Message::VerifyDigests { offset, block, digests }) => {
                        let job = io
                            .verify
                            .target_digests(&engine, offset, block, digests)
                            .map_err(|e| Outcome::Failed(format!("verify: {e}")))?;
                        if let Some((job, compare)) = job {
                            pending.push_back((Pending::Verify(job), compare));
                        }
                    }
                    Tick::Frame(m) if m.is_verify() => self.verify_message(io, m).await?,
                    Tick::Frame(m) => {
                        since_ack += 1;
                        self.target_frame(&mut t, &mut pending, m, theirs).await?;
                    }
                },
                _ = sleep_until(data_sync_due.into()), if syncing.is_none() && t.sync_written > t.sync_durable => {}
                _ = sleep_until(self.next_tick.into()) => {}
                _ = sleep_until(deadline.into()), if reading => if let Some(o) = self.silence_or_input(&io.reader) {
                    return Ok(o);
                },
                _ = engine.verify.wake.notified() => {}
                _ = io.stop.changed() => {}
                _ = role_changed(&mut io.role_rx, my_role) => return Ok(Outcome::Stopped(StopReason::RoleChange)),
            }
        }
    }

    async fn target_frame(
        &mut self,
        t: &mut Target,
        pending: &mut VecDeque<(Pending, BoxFut<'static, Result<(), VolumeError>>)>,
        m: Message,
        theirs: &SyncInfo,
    ) -> Result<(), Outcome> {
        let engine = Arc::clone(&self.engine);
        let store = &engine.store;
        let record = |lsn: Lsn, op: FeedOp, fua: bool, t: &mut Target, pending: &mut VecDeque<_>| {
            t.received = t.received.max(lsn);
            pending.push_back((Pending::Record { lsn, fua }, store.apply(lsn, op, fua)));
        };
        match m {
            Message::Write { lsn, offset, fua, data } => record(lsn, FeedOp::Write { offset, data }, fua, t, pending),
            Message::Trim { lsn, offset, len, fua } => record(lsn, FeedOp::Trim { offset, len }, fua, t, pending),
            Message::Zeroes { lsn, offset, len, punch, fua } => {
                record(lsn, FeedOp::Zeroes { offset, len, punch }, fua, t, pending)
            }
            Message::Barrier { upto_lsn } => t.barrier = t.barrier.max(upto_lsn),
            Message::SyncStart { kind: ResyncKind::Log, total_bytes, start_lsn } => {
                if start_lsn != t.received {
                    return Err(Outcome::Failed(format!(
                        "log catch-up from LSN {start_lsn}, but this node is at {}",
                        t.received
                    )));
                }
                let meta = engine.meta();
                if meta.disk == DiskState::UpToDate {
                    // Promotable throughout, but not the newest data.
                    engine
                        .store_disk(DiskState::Consistent, None)
                        .map_err(|e| Outcome::Failed(format!("cannot record the disk as consistent: {e}")))?;
                }
                tracing::info!(peer = %self.peer_name, from = start_lsn + 1, "log catch-up from the peer starts: disk consistent until done");
                t.kind = Some(ResyncKind::Log);
                t.sync_total = total_bytes;
                let _ = self.tx.try_send(Message::State {
                    role: engine.role(),
                    disk: engine.meta().disk,
                    out_of_sync_bytes: 0,
                });
                engine.set_replication(ReplState::SyncTarget);
                engine.sync_started(ResyncKind::Log, total_bytes, SyncRole::Target);
            }
            Message::SyncStart { kind: ResyncKind::Full, total_bytes: 0, start_lsn: 0 }
                if theirs.role == Role::Secondary && !self.clear_bitmap_acceptable(t) =>
            {
                // An empty full sync from a secondary is the peer's
                // `new-current-uuid --clear-bitmap`: only for a blank volume.
                let why = format!(
                    "new-current-uuid --clear-bitmap refused by {}: this volume is not blank (disk {}, local LSN {})",
                    engine.cfg.node,
                    engine.meta().disk,
                    t.received
                );
                tracing::warn!(peer = %self.peer_name, "{why}");
                let _ = self.tx.try_send(Message::Goodbye { reason: GoodbyeReason::Other, message: why.clone() });
                return Err(Outcome::Failed(why));
            }
            Message::SyncStart { kind, total_bytes, start_lsn } => {
                // Records before the resync (a log catch-up that fell back)
                // are applied first.
                while let Some((_, f)) = pending.pop_front() {
                    f.await.map_err(|e| Outcome::Failed(format!("applying before the resync: {e}")))?;
                }
                if total_bytes > 0
                    && let Err(why) =
                        super::resync_hook::before_resync_target(&engine, kind, total_bytes, theirs.gen_ids.current)
                            .await
                {
                    let _ = self.tx.try_send(Message::Goodbye { reason: GoodbyeReason::Other, message: why.clone() });
                    engine.go_standalone(&why);
                    return Err(Outcome::Failed(why));
                }
                super::engine::test_hold(super::engine::HoldPoint::SyncStart).await;
                tracing::info!(peer = %self.peer_name, %kind, bytes = total_bytes, start_lsn, "resync from the peer starts: disk inconsistent until done");
                // Inconsistent, in the source's generation: a restart of
                // either side resumes this resync (the source keeps its bits
                // until we ack the data durable).
                let mut meta = engine.meta();
                meta.gen_ids.adopt(theirs.gen_ids.current);
                meta.gen_ids.bitmap = 0;
                meta.gen_created_ms = theirs.gen_created_ms;
                meta.disk = DiskState::Inconsistent;
                let from = engine.meta().disk;
                // Not if a promote came first (it ends this session).
                engine.target_goes_inconsistent(|| store.store_meta(meta)).map_err(Outcome::Failed)?;
                engine.took_peer_generation();
                if from != DiskState::Inconsistent {
                    engine.emit(Event::DiskChanged {
                        clear_bitmap: None,
                        disk: DiskState::Inconsistent,
                        forced: None,
                        from,
                    });
                }
                store
                    .rebase_log(start_lsn)
                    .await
                    .map_err(|e| Outcome::Failed(format!("cannot rebase the log at {start_lsn}: {e}")))?;
                store.set_peer_written(start_lsn);
                t.received = start_lsn;
                t.written = start_lsn;
                t.durable = start_lsn;
                t.barrier = 0;
                t.kind = Some(kind);
                t.sync_total = total_bytes;
                t.sync_written = 0;
                t.sync_durable = 0;
                t.acked = None;
                self.last_rx = Instant::now();
                let _ = self.tx.try_send(Message::State {
                    role: engine.role(),
                    disk: DiskState::Inconsistent,
                    out_of_sync_bytes: total_bytes,
                });
                engine.set_replication(ReplState::SyncTarget);
                engine.sync_started(kind, total_bytes, SyncRole::Target);
            }
            Message::SyncData { offset, data } => {
                if !matches!(t.kind, Some(ResyncKind::Bitmap | ResyncKind::Full)) {
                    return self.unexpected(Side::Target, Message::SyncData { offset, data });
                }
                let len = data.len() as u64;
                pending.push_back((Pending::Sync { len }, store.apply_sync_data(offset, data)));
            }
            Message::SyncEnd { bytes } if t.kind.is_some() => t.sync_end = Some(bytes),
            other => self.unexpected(Side::Target, other)?,
        }
        Ok(())
    }

    /// Whether this node may take the peer's generation without data
    /// (`new-current-uuid --clear-bitmap`): never written, inconsistent.
    fn clear_bitmap_acceptable(&self, t: &Target) -> bool {
        t.received == 0 && self.engine.meta().disk == DiskState::Inconsistent
    }

    /// Everything of the resync is applied and durable: record the disk as
    /// uptodate (consistent if the source is not uptodate) in the source's
    /// generation, clear our bits, tell the source.
    async fn finish_sync(&mut self, t: &mut Target, theirs: &SyncInfo, bytes: u64) -> Result<(), Outcome> {
        let engine = Arc::clone(&self.engine);
        let store = &engine.store;
        let kind = t.kind.take().unwrap_or(ResyncKind::Full);
        if kind != ResyncKind::Log {
            store.finish_sync().await.map_err(|e| Outcome::Failed(format!("finishing the resync: {e}")))?;
            // The source's data replaced every block we had marked.
            store.clear_range(0, store.size());
            store.persist_bitmap().map_err(|e| Outcome::Failed(format!("cannot persist the bitmap: {e}")))?;
        }
        let disk = if theirs.disk == DiskState::UpToDate { DiskState::UpToDate } else { DiskState::Consistent };
        let mut meta = engine.meta();
        let from = meta.disk;
        meta.gen_ids.adopt(theirs.gen_ids.current);
        if store.dirty_bytes() == 0 {
            meta.gen_ids.bitmap = 0;
        }
        meta.gen_created_ms = theirs.gen_created_ms;
        meta.disk = disk;
        store.store_meta(meta).map_err(|e| Outcome::Failed(format!("cannot record the disk as {disk}: {e}")))?;
        engine.took_peer_generation();
        engine.claim_resync_done();
        if from != disk {
            engine.emit(Event::DiskChanged { clear_bitmap: None, disk, forced: None, from });
        }
        // finish_sync / the flush made everything applied durable.
        t.durable = t.durable.max(t.written);
        t.sync_durable = bytes.max(t.sync_durable);
        t.sync_written = t.sync_durable;
        self.last_rx = Instant::now();
        tracing::info!(peer = %self.peer_name, %kind, bytes, "resync done: disk {disk}");
        engine.sync_finished(kind, bytes, SyncRole::Target);
        engine.set_replication(ReplState::Established);
        let _ = self.tx.try_send(Message::State { role: engine.role(), disk, out_of_sync_bytes: 0 });
        t.sync_dirty = true;
        t.sync_total = t.sync_total.max(1);
        // A full writer queue leaves `sync_dirty` set: the loop retries.
        let _ = self.send_acks(t);
        Ok(())
    }

    // --- Online verify hooks (src/repl/verify.rs) -------------------------------

    /// Source: starts a requested verify (not while `syncing`) and queues
    /// its reads.
    async fn verify_source_tick(
        &mut self,
        io: &mut Io,
        mode: ReadMode,
        syncing: bool,
        app_waiting: bool,
    ) -> Result<(), Outcome> {
        if let Some(start) = io.verify.start_if_requested(&self.engine, mode, syncing) {
            self.send(start, io).await?;
        }
        io.verify.queue_reads(&self.engine.store, app_waiting).map_err(|e| Outcome::Failed(format!("verify read: {e}")))
    }

    /// A verify message other than VerifyDigests, on either side.
    async fn verify_message(&mut self, io: &mut Io, m: Message) -> Result<(), Outcome> {
        let (reply, after) =
            io.verify.on_message(&self.engine, m).map_err(|e| Outcome::Failed(format!("verify: {e}")))?;
        if let Some(r) = reply {
            self.send(r, io).await?;
        }
        match after {
            After::Continue => Ok(()),
            After::Resync => Err(Outcome::Stopped(StopReason::Renegotiate)),
        }
    }

    /// Target: a compare ran; its result goes to the source.
    async fn verify_target_done(&mut self, io: &mut Io, job: TargetJob) -> Result<(), Outcome> {
        let result = io.verify.target_done(&self.engine, job);
        self.send(result, io).await
    }

    /// Sends what changed since the last acks; false when the writer's
    /// queue was full and something is still to send (the caller retries:
    /// acks are cumulative, but one that is never retried leaves the
    /// primary waiting on a stream that has ended).
    fn send_acks(&mut self, t: &mut Target) -> bool {
        let now = (t.received, t.written.min(t.received), t.durable.min(t.written));
        if t.acked != Some(now) {
            match self.tx.try_send(Message::Ack { received: now.0, written: now.1, durable: now.2 }) {
                Ok(()) => t.acked = Some(now),
                Err(_) => return false,
            }
        }
        if t.sync_dirty {
            if self.tx.try_send(Message::SyncAck { done_bytes: t.sync_durable, written_bytes: t.sync_written }).is_err()
            {
                return false;
            }
            t.sync_dirty = false;
            self.engine.sync_progress(t.sync_durable);
        }
        true
    }
}

/// A bitmap or full resync on the source: the walk over the set bits.
struct Walk {
    kind: ResyncKind,
    /// Next offset to look for set bits at.
    cursor: u64,
    scan_done: bool,
    /// Bytes of sync reads queued.
    queued: u64,
    /// Bytes of sync data seen in the feed.
    seen: u64,
    /// Bytes the target has durable (cumulative, in queue order).
    done: u64,
    /// Bytes the target has written (applied; cumulative, in queue order).
    applied: u64,
    /// When an application write last waited for the peer.
    app_waited_at: Option<Instant>,
    /// Queued chunks not yet durable: (cumulative end, offset, len).
    chunks: VecDeque<(u64, u64, u64)>,
    end_sent: bool,
    started: Instant,
    /// When the bitmap was last persisted.
    persisted_at: Instant,
}

impl Walk {
    fn new(kind: ResyncKind) -> Walk {
        Walk {
            kind,
            cursor: 0,
            scan_done: false,
            queued: 0,
            seen: 0,
            done: 0,
            applied: 0,
            app_waited_at: None,
            chunks: VecDeque::new(),
            end_sent: false,
            started: Instant::now(),
            persisted_at: Instant::now(),
        }
    }

    /// Queues sync reads of the next set runs while the unsent window
    /// (adaptive, one chunk while an application write waits), the durable
    /// window and the rate cap allow. `unsent` is the data waiting in the
    /// writer's queue. Returns when to look again if the rate cap holds the
    /// walk back.
    fn queue_reads(
        &mut self,
        store: &dyn super::store::ReplStore,
        app_waiting: bool,
        unsent: u64,
        rate: Option<u64>,
    ) -> Result<Option<Instant>, Outcome> {
        let secs = self.started.elapsed().as_secs_f64();
        let speed = if secs > 0.0 { self.done as f64 / secs } else { 0.0 };
        if app_waiting {
            self.app_waited_at = Some(Instant::now());
        }
        // Application writes keep priority: while one waits for the peer,
        // and for APP_HOLD after (a QD1 writer waits again at once), at most
        // one chunk of resync data is in flight ahead of it (queued, sent,
        // or not yet applied by the target), so it waits behind one chunk,
        // not behind what the socket buffers and the target's queue hold.
        let app_active = self.app_waited_at.is_some_and(|t| t.elapsed() < APP_HOLD);
        let window = if app_active {
            SYNC_CHUNK
        } else {
            ((speed * SYNC_AHEAD.as_secs_f64()) as u64).clamp(SYNC_WINDOW_MIN, SYNC_WINDOW)
        };
        let in_flight_limit = if app_active { SYNC_CHUNK } else { SYNC_FLIGHT };
        while !self.scan_done
            && (self.queued - self.seen) + unsent < window
            && self.queued - self.applied.max(self.done) < in_flight_limit
            && self.queued - self.done < SYNC_DURABLE_WINDOW
        {
            if let Some(r) = rate {
                // Allowed so far: rate x elapsed, plus one chunk to start.
                let allowed = (r as f64 * self.started.elapsed().as_secs_f64()) as u64 + SYNC_CHUNK;
                if self.queued >= allowed {
                    let at = Duration::from_secs_f64((self.queued - SYNC_CHUNK) as f64 / r as f64);
                    return Ok(Some(self.started + at));
                }
            }
            match store.dirty_run(self.cursor, SYNC_CHUNK) {
                None => self.scan_done = true,
                Some((off, len)) => {
                    let len = len.min(SYNC_CHUNK);
                    if len == 0 || off < self.cursor {
                        return Err(Outcome::Failed(format!(
                            "the bitmap returned an empty or backward run ({off}, {len}) at {}",
                            self.cursor
                        )));
                    }
                    store
                        .queue_sync_read(off, len as u32)
                        .map_err(|e| Outcome::Failed(format!("resync read at {off}: {e}")))?;
                    self.queued += len;
                    self.chunks.push_back((self.queued, off, len));
                    self.cursor = off + len;
                }
            }
        }
        Ok(None)
    }

    /// Whether the walk waits for the writer to send what it has.
    fn held_by_unsent(&self) -> bool {
        !self.scan_done && self.queued - self.done < SYNC_DURABLE_WINDOW
    }

    /// The target has `done` bytes durable: clear the bits of every chunk
    /// wholly inside.
    fn acked(&mut self, store: &dyn super::store::ReplStore, done: u64) {
        self.done = self.done.max(done.min(self.queued));
        while let Some(&(end, off, len)) = self.chunks.front() {
            if end > self.done {
                break;
            }
            store.clear_range(off, len);
            self.chunks.pop_front();
        }
    }
}

/// A log catch-up on the source.
struct Catchup {
    reader: Box<dyn LogSource>,
    /// The next LSN to send.
    next: Lsn,
    /// The last LSN of the catch-up (the feed starts after it).
    base: Lsn,
    bytes: u64,
    end_sent: bool,
    /// `mark_count` when it started (see `catchup_finished`).
    marks_at_start: u64,
}

#[derive(Default)]
struct Target {
    received: Lsn,
    written: Lsn,
    durable: Lsn,
    /// Highest barrier asked for.
    barrier: Lsn,
    acked: Option<(Lsn, Lsn, Lsn)>,
    /// The resync in progress.
    kind: Option<ResyncKind>,
    sync_total: u64,
    /// Resync bytes written (not yet durable).
    sync_written: u64,
    /// Resync bytes durable (what SyncAck reports).
    sync_durable: u64,
    sync_dirty: bool,
    /// SyncEnd received: finish once everything before it is applied.
    sync_end: Option<u64>,
}

// `Verify`: an online-verify compare (src/repl/verify.rs).
enum Pending {
    Record { lsn: Lsn, fua: bool },
    Sync { len: u64 },
    Verify(TargetJob),
}

/// Resolves once the role differs from `from` (no guard kept across awaits).
async fn role_changed(rx: &mut watch::Receiver<Role>, from: Role) {
    let changed = rx.wait_for(|r| *r != from).await.is_ok();
    if !changed {
        // The engine (sender) is gone: never resolve.
        std::future::pending::<()>().await;
    }
}

fn op_bytes(op: &FeedOp) -> u64 {
    match op {
        FeedOp::Write { data, .. } => data.len() as u64,
        FeedOp::Trim { len, .. } | FeedOp::Zeroes { len, .. } => u64::from(*len),
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
