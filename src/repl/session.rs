//! One replication session on an authenticated connection.
//!
//! - **source** (we are primary): attaches the volume's feed, decides
//!   between "established" (the peer has our generation and exactly our log)
//!   and a full sync, then streams feed items as frames while reading acks.
//!   Sending and receiving never block each other: a frame waits for room in
//!   the writer channel inside `select!`, so acks keep being read.
//! - **target** (the peer is primary): applies records in order through the
//!   volume (queued at once, completions awaited in order), acks `received`
//!   on decode, `written` as applies complete and `durable` after a flush
//!   (one flush covers every barrier and FUA waiting), all coalesced; never
//!   blocks on sending (acks are cumulative, a skipped one is sent later).
//! - **idle** (both secondary): heartbeats only.
//!
//! Every session sends Ping every `ping_interval` and declares the peer lost
//! after `ping_interval + ping_timeout` without any frame; a role change
//! ends the session so that the link is renegotiated.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::sleep_until;

use super::engine::{Engine, ReplState, Resync, StopReason};
use super::handshake::PeerInfo;
use super::link::{FrameReader, LinkError, QueuedBytes, run_writer_counted, split_tcp};
use super::proto::{GoodbyeReason, Message, ResyncKind};
use super::store::{BoxFut, FeedItem, FeedOp};
use super::verify::{After, ReadMode, SessionVerify, TargetJob};
use crate::node::{DiskState, Role};
use crate::volume::{Lsn, VolumeError};

/// Messages queued for the writer task.
const WRITER_QUEUE: usize = 64;
/// Full-sync read size.
const SYNC_CHUNK: u64 = 256 << 10;
/// Full-sync bytes read but not yet acknowledged by the target are bounded:
/// an application write made during the sync waits (under B and C) behind
/// that much sync data. The bound is what the link moves in
/// [`SYNC_AHEAD`] at the sync's measured speed, within
/// [`SYNC_WINDOW_MIN`]..=[`SYNC_WINDOW`].
const SYNC_WINDOW: u64 = 8 << 20;
const SYNC_WINDOW_MIN: u64 = 2 * SYNC_CHUNK;
const SYNC_AHEAD: Duration = Duration::from_millis(20);
// Application writes have priority: while one the peer has not written yet
// is in the stream, at most one chunk of sync data is outstanding, so a
// write made during a sync waits behind one chunk, not a whole window.
/// Frames handled before acks are sent even if more are buffered.
const ACK_EVERY: usize = 256;

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

type Reader = FrameReader<tokio::net::tcp::OwnedReadHalf>;

/// Runs a session to its end.
/// `hello_role` is the role our Hello announced: if ours changed since, the
/// peer decided on a stale role and the session is renegotiated at once.
pub async fn run(
    engine: &Arc<Engine>,
    stream: TcpStream,
    peer: &PeerInfo,
    stop: watch::Receiver<Option<StopReason>>,
    hello_role: Role,
) -> Outcome {
    let (reader, writer) = match split_tcp(stream) {
        Ok(x) => x,
        Err(e) => return Outcome::PeerGone(format!("socket setup failed: {e}")),
    };
    let (tx, rx) = mpsc::channel(WRITER_QUEUE);
    let queued = Arc::new(QueuedBytes::default());
    let writer_task = tokio::spawn(run_writer_counted(writer, rx, Some(Arc::clone(&queued))));
    engine.set_peer(peer.role, peer.disk);
    let mut io = Io { reader, stop, role_rx: engine.role_rx(), verify: SessionVerify::default() };
    let mut s = Session {
        engine: Arc::clone(engine),
        tx,
        queued,
        last_rx: Instant::now(),
        next_ping: Instant::now(),
        ping_seq: 0,
        peer_name: peer.node.clone(),
        started: Instant::now(),
    };
    let local_role = engine.role();
    if local_role != hello_role {
        let _ = s
            .tx
            .try_send(Message::Goodbye { reason: GoodbyeReason::Other, message: "role change: reconnecting".into() });
        drop(s);
        let _ = tokio::time::timeout(Duration::from_secs(1), writer_task).await;
        return Outcome::Stopped(StopReason::RoleChange);
    }
    tracing::info!(peer = %peer.node, local_role = %local_role, peer_role = %peer.role, peer_disk = %peer.disk, "replication connected");
    let outcome = match (local_role, peer.role) {
        (Role::Primary, Role::Primary) => {
            let why = "both nodes are primary (split brain): going standalone; demote one node, then `repctl connect` on both";
            tracing::error!(peer = %peer.node, "{why}");
            let _ = s.tx.try_send(Message::Goodbye { reason: GoodbyeReason::SplitBrain, message: why.into() });
            engine.go_standalone(why);
            Outcome::Failed(why.into())
        }
        (Role::Primary, Role::Secondary) => s.source(&mut io, peer).await,
        (Role::Secondary, Role::Primary) => s.target(&mut io, peer).await,
        (Role::Secondary, Role::Secondary) => {
            engine.set_replication(ReplState::Established);
            s.idle(&mut io, peer).await
        }
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
    io.verify.abort(engine, &describe_end(&outcome));
    drop(s);
    // Let the writer drain (Goodbye included), but not forever.
    let _ = tokio::time::timeout(Duration::from_secs(1), writer_task).await;
    outcome
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
    next_ping: Instant,
    ping_seq: u64,
    peer_name: String,
    started: Instant,
}

/// What the common part of the loop saw.
enum Tick {
    Frame(Message),
    Out(Outcome),
    Ping,
}

impl Session {
    fn silence_deadline(&self) -> Instant {
        self.last_rx + self.engine.cfg.ping_interval + self.engine.cfg.ping_timeout
    }

    /// Sends a ping if due (never blocks: a full queue means frames are
    /// flowing anyway).
    fn ping(&mut self) {
        let now = Instant::now();
        if now >= self.next_ping {
            self.ping_seq += 1;
            let sent_ns = u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX);
            let _ = self.tx.try_send(Message::Ping { seq: self.ping_seq, sent_ns });
            self.next_ping = now + self.engine.cfg.ping_interval;
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

    async fn idle(&mut self, io: &mut Io, peer: &PeerInfo) -> Outcome {
        let my_role = *io.role_rx.borrow();
        if self.engine.take_clear_bitmap_offer() {
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
            self.ping();
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
                _ = sleep_until(self.next_ping.into()) => Tick::Ping,
                _ = sleep_until(deadline.into()) => Tick::Out(self.silent()),
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
                Tick::Frame(Message::SyncStart { kind: ResyncKind::Full, total_bytes: 0, start_lsn: 0 }) => empty_sync = true,
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
                        Ok(x) => x,
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
                Tick::Frame(m) => return Outcome::Failed(format!("unexpected {} from a secondary peer", m.name())),
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
        tracing::info!(peer = %peer.node, "new-current-uuid --clear-bitmap: both disks uptodate without a sync");
        let _ =
            self.tx.try_send(Message::State { role: Role::Secondary, disk: DiskState::UpToDate, out_of_sync_bytes: 0 });
        engine.set_peer(peer.role, DiskState::UpToDate);
        Ok(())
    }

    // --- Source (primary) -------------------------------------------------------

    async fn source(&mut self, io: &mut Io, peer: &PeerInfo) -> Outcome {
        let engine = Arc::clone(&self.engine);
        // The target starts with an Ack carrying its local LSN.
        let give_up = Instant::now() + super::engine::HANDSHAKE_TIMEOUT;
        let peer_lsn = loop {
            let deadline = self.silence_deadline();
            let tick = tokio::select! {
                r = io.reader.read() => self.frame_result(r),
                _ = sleep_until(deadline.into()) => Tick::Out(self.silent()),
                _ = sleep_until(give_up.into()) => Tick::Out(Outcome::Failed("the secondary did not start its session (no initial Ack)".into())),
            };
            match tick {
                Tick::Out(o) => return o,
                Tick::Ping | Tick::Frame(Message::State { .. }) => {}
                Tick::Frame(Message::Ack { received, .. }) => break received,
                Tick::Frame(m) => return Outcome::Failed(format!("expected the peer's initial Ack, got {}", m.name())),
            }
        };
        let store = Arc::clone(&engine.store);
        let (base, mut feed) = store.attach_feed(engine.cfg.max_buffer);
        engine.feed_attached(base);
        store.set_retain_after(Some(base));
        let meta = engine.meta();
        let in_sync =
            peer.disk == DiskState::UpToDate && peer.gen_ids.current == meta.gen_ids.current && peer_lsn == base;
        let size = store.size();
        let mut sync = if in_sync {
            tracing::info!(peer = %peer.node, lsn = base, "peer is up to date: no sync");
            engine.set_replication(ReplState::Established);
            None
        } else {
            tracing::info!(
                peer = %peer.node, peer_disk = %peer.disk, peer_lsn, local_lsn = base,
                same_generation = peer.gen_ids.current == meta.gen_ids.current,
                bytes = size, "full sync to the peer starts"
            );
            if self.tx.send(Message::SyncStart { kind: ResyncKind::Full, total_bytes: size, start_lsn: base }).await.is_err() {
                return Outcome::PeerGone("connection closed".into());
            }
            engine.set_replication(ReplState::SyncSource);
            engine.set_resync(Some(Resync { done_bytes: 0, total_bytes: size, started: Instant::now() }));
            engine.emit(
                "sync-started",
                serde_json::json!({ "peer": peer.node, "role": "source", "total_bytes": size, "kind": "full" }),
            );
            Some(SyncSource { total: size, queued: 0, seen: 0, end_sent: false, done: 0, started: Instant::now() })
        };
        let my_role = Role::Primary;
        let mut pending: Option<Message> = None;
        let mut last_record: Lsn = base;
        let tx = self.tx.clone();
        loop {
            if let Some(r) = io.stop_reason() {
                return Outcome::Stopped(r);
            }
            self.ping();
            if let Some(s) = sync.as_mut() {
                let app_waiting = last_record > engine.acks.borrow().written;
                let secs = s.started.elapsed().as_secs_f64();
                let speed = if secs > 0.0 { s.done as f64 / secs } else { 0.0 };
                let window = if app_waiting {
                    SYNC_CHUNK
                } else {
                    ((speed * SYNC_AHEAD.as_secs_f64()) as u64).clamp(SYNC_WINDOW_MIN, SYNC_WINDOW)
                };
                while s.queued < s.total && s.queued - s.done < window {
                    let len = (s.total - s.queued).min(SYNC_CHUNK);
                    if let Err(e) = store.queue_sync_read(s.queued, len as u32) {
                        return Outcome::Failed(format!("full sync read at {}: {e}", s.queued));
                    }
                    s.queued += len;
                }
                if !s.end_sent && s.seen >= s.total && pending.is_none() {
                    pending = Some(Message::SyncEnd { bytes: s.total });
                    s.end_sent = true;
                }
            }
            // Online verify (src/repl/verify.rs): reads in the writer's order;
            // a write committed but not yet written by the peer (even if
            // still in the feed) has priority.
            let app_waiting = store.local_lsn().max(last_record) > engine.acks.borrow().written;
            if let Err(o) = self.verify_source_tick(io, ReadMode::Feed, sync.is_some(), app_waiting).await {
                return o;
            }
            let deadline = self.silence_deadline();
            tokio::select! {
                item = feed.recv(), if pending.is_none() => match item {
                    Some(FeedItem::VerifyData { offset, data }) => pending = io.verify.digests_for(offset, &data),
                    Some(item) => {
                        if let (FeedItem::SyncData { data, .. }, Some(s)) = (&item, sync.as_mut()) {
                            s.seen += data.len() as u64;
                        }
                        if let FeedItem::Record { lsn, .. } = &item {
                            last_record = *lsn;
                        }
                        pending = item_to_message(item);
                    }
                    None => {
                        if let Some(f) = store.failed() {
                            return Outcome::Failed(format!("the local volume stopped: {f}"));
                        }
                        return Outcome::Failed("the replication feed was closed".into());
                    }
                },
                permit = tx.reserve(), if pending.is_some() && self.queued.get() < engine.cfg.max_buffer => match permit {
                    Ok(p) => {
                        if let Some(m) = pending.take() {
                            self.queued.add(m.data().map_or(0, |d| d.len()));
                            p.send(m);
                        }
                    }
                    Err(_) => return Outcome::PeerGone("connection closed (writer stopped)".into()),
                },
                _ = self.queued.drained(), if pending.is_some() && self.queued.get() >= engine.cfg.max_buffer => {}
                r = io.reader.read() => match self.frame_result(r) {
                    Tick::Out(o) => return o,
                    Tick::Ping | Tick::Frame(Message::State { .. }) => {}
                    Tick::Frame(Message::Ack { received, written, durable }) => {
                        engine.record_ack(received, written, durable);
                        let a = *engine.acks.borrow();
                        store.set_retain_after(Some(a.durable));
                    }
                    Tick::Frame(Message::SyncAck { done_bytes }) => {
                        if let Some(s) = sync.as_mut() {
                            s.done = done_bytes.min(s.total);
                            if let Some(r) = engine.view_mut().resync.as_mut() {
                                r.done_bytes = s.done;
                            }
                            if s.end_sent && s.done >= s.total {
                                let took = engine.view_mut().resync.map(|r| r.started.elapsed());
                                tracing::info!(peer = %peer.node, bytes = s.total, took = ?took, "full sync done");
                                engine.emit("sync-finished", serde_json::json!({ "peer": peer.node, "role": "source", "bytes": s.total }));
                                engine.set_resync(None);
                                engine.set_peer(Role::Secondary, DiskState::UpToDate);
                                engine.set_replication(ReplState::Established);
                                sync = None;
                            }
                        }
                    }
                    Tick::Frame(m) if m.is_verify() => {
                        if let Err(o) = self.verify_message(io, m).await {
                            return o;
                        }
                    }
                    Tick::Frame(m) => return Outcome::Failed(format!("unexpected {} from the secondary", m.name())),
                },
                _ = engine.verify.wake.notified() => {}
                _ = sleep_until(self.next_ping.into()) => {}
                _ = sleep_until(deadline.into()) => return self.silent(),
                _ = io.stop.changed() => {}
                _ = role_changed(&mut io.role_rx, my_role) => return Outcome::Stopped(StopReason::RoleChange),
            }
        }
    }

    // --- Target (secondary) -----------------------------------------------------

    async fn target(&mut self, io: &mut Io, peer: &PeerInfo) -> Outcome {
        let engine = Arc::clone(&self.engine);
        let store = Arc::clone(&engine.store);
        let local = store.local_lsn();
        let mut t = Target { received: local, written: local, durable: local, acked: None, ..Target::default() };
        let _ =
            self.tx.try_send(Message::State { role: Role::Secondary, disk: engine.meta().disk, out_of_sync_bytes: 0 });
        let _ = self.tx.try_send(Message::Ack { received: local, written: local, durable: local });
        t.acked = Some((local, local, local));
        engine.set_replication(ReplState::Established);
        let my_role = Role::Secondary;
        let mut pending: VecDeque<(Pending, BoxFut<'static, Result<(), VolumeError>>)> = VecDeque::new();
        let mut flushing: Option<(Lsn, BoxFut<'_, Result<Lsn, VolumeError>>)> = None;
        let mut since_ack = 0usize;
        loop {
            if let Some(r) = io.stop_reason() {
                return Outcome::Stopped(r);
            }
            self.ping();
            // A barrier (or the sync end) needs everything written first.
            if flushing.is_none() && t.barrier > t.durable && t.written >= t.barrier {
                flushing = Some((t.written, store.flush()));
            }
            if pending.is_empty() && t.sync_end.is_some() && flushing.is_none() {
                let bytes = t.sync_end.take().unwrap_or(0);
                if let Err(o) = self.finish_sync(&mut t, peer, bytes).await {
                    return o;
                }
            }
            if since_ack >= ACK_EVERY || (since_ack > 0 && io.reader.buffered() == 0) || t.sync_dirty {
                self.send_acks(&mut t);
                since_ack = 0;
            }
            // `repctl verify` here: the primary runs it.
            if self.engine.verify.take_request() && self.tx.send(Message::VerifyRequest).await.is_err() {
                return Outcome::PeerGone("connection closed (writer stopped)".into());
            }
            // While a verify compare waits in `pending`, no frame is read (see verify.rs).
            let reading = t.sync_end.is_none() && !io.verify.gate;
            let deadline = self.silence_deadline();
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
                        return Outcome::Failed(format!("applying the primary's stream: {e}"));
                    }
                    match what {
                        Pending::Record { lsn, fua } => {
                            t.written = t.written.max(lsn);
                            if fua {
                                t.durable = t.durable.max(lsn);
                            }
                        }
                        Pending::Sync { len } => {
                            t.sync_done += len;
                            t.sync_dirty = true;
                        }
                        Pending::Verify(job) => {
                            if let Err(o) = self.verify_target_done(io, job).await {
                                return o;
                            }
                        }
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
                        return Outcome::Failed(format!("flush on the secondary: {e}"));
                    }
                    t.durable = t.durable.max(upto);
                    since_ack += 1;
                }
                r = io.reader.read(), if reading => match self.frame_result(r) {
                    Tick::Out(o) => return o,
                    Tick::Ping | Tick::Frame(Message::State { .. }) => {}
                    Tick::Frame(Message::VerifyDigests { offset, block, digests }) => {
                        match io.verify.target_digests(&engine, offset, block, digests) {
                            Ok((job, compare)) => pending.push_back((Pending::Verify(job), compare)),
                            Err(e) => return Outcome::Failed(format!("verify: {e}")),
                        }
                    }
                    Tick::Frame(m) if m.is_verify() => {
                        if let Err(o) = self.verify_message(io, m).await {
                            return o;
                        }
                    }
                    Tick::Frame(m) => {
                        since_ack += 1;
                        if let Err(o) = self.target_frame(&mut t, &mut pending, m, peer).await {
                            return o;
                        }
                    }
                },
                _ = sleep_until(self.next_ping.into()) => {}
                _ = sleep_until(deadline.into()), if reading => return self.silent(),
                _ = engine.verify.wake.notified() => {}
                _ = io.stop.changed() => {}
                _ = role_changed(&mut io.role_rx, my_role) => return Outcome::Stopped(StopReason::RoleChange),
            }
        }
    }

    async fn target_frame(
        &mut self,
        t: &mut Target,
        pending: &mut VecDeque<(Pending, BoxFut<'static, Result<(), VolumeError>>)>,
        m: Message,
        peer: &PeerInfo,
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
            Message::SyncStart { total_bytes, start_lsn, .. } => {
                // Nothing is in flight at the start of a session; drain anyway.
                while let Some((_, f)) = pending.pop_front() {
                    f.await.map_err(|e| Outcome::Failed(format!("applying before the sync: {e}")))?;
                }
                tracing::info!(peer = %peer.node, bytes = total_bytes, start_lsn, "full sync from the peer starts: disk inconsistent until done");
                engine
                    .store_disk(DiskState::Inconsistent, None)
                    .map_err(|e| Outcome::Failed(format!("cannot record the disk as inconsistent: {e}")))?;
                store
                    .rebase_log(start_lsn)
                    .await
                    .map_err(|e| Outcome::Failed(format!("cannot rebase the log at {start_lsn}: {e}")))?;
                t.received = start_lsn;
                t.written = start_lsn;
                t.durable = start_lsn;
                t.barrier = 0;
                t.sync_total = total_bytes;
                t.sync_done = 0;
                t.acked = None;
                self.last_rx = Instant::now();
                let _ = self.tx.try_send(Message::State {
                    role: Role::Secondary,
                    disk: DiskState::Inconsistent,
                    out_of_sync_bytes: total_bytes,
                });
                engine.set_replication(ReplState::SyncTarget);
                engine.set_resync(Some(Resync { done_bytes: 0, total_bytes, started: Instant::now() }));
                engine.emit("sync-started", serde_json::json!({ "peer": peer.node, "role": "target", "total_bytes": total_bytes, "kind": "full" }));
            }
            Message::SyncData { offset, data } => {
                let len = data.len() as u64;
                pending.push_back((Pending::Sync { len }, store.apply_sync_data(offset, data)));
            }
            Message::SyncEnd { bytes } => t.sync_end = Some(bytes),
            other => return Err(Outcome::Failed(format!("unexpected {} from the primary", other.name()))),
        }
        Ok(())
    }

    /// Everything of the sync is applied: sync the data file, record the
    /// disk as uptodate with the primary's generation, tell the primary.
    async fn finish_sync(&mut self, t: &mut Target, peer: &PeerInfo, bytes: u64) -> Result<(), Outcome> {
        let engine = Arc::clone(&self.engine);
        engine.store.finish_sync().await.map_err(|e| Outcome::Failed(format!("finishing the full sync: {e}")))?;
        engine
            .store_disk(DiskState::UpToDate, Some(peer.gen_ids))
            .map_err(|e| Outcome::Failed(format!("cannot record the disk as uptodate: {e}")))?;
        // finish_sync made everything applied durable.
        t.durable = t.durable.max(t.written);
        t.sync_done = bytes.max(t.sync_done);
        self.last_rx = Instant::now();
        tracing::info!(peer = %peer.node, bytes, "full sync done: disk uptodate");
        engine.emit("sync-finished", serde_json::json!({ "peer": peer.node, "role": "target", "bytes": bytes }));
        engine.set_resync(None);
        engine.set_replication(ReplState::Established);
        let _ =
            self.tx.try_send(Message::State { role: Role::Secondary, disk: DiskState::UpToDate, out_of_sync_bytes: 0 });
        t.sync_dirty = true;
        self.send_acks(t);
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
            self.tx.send(start).await.map_err(|_| Outcome::PeerGone("connection closed (writer stopped)".into()))?;
        }
        io.verify.queue_reads(&self.engine.store, app_waiting).map_err(|e| Outcome::Failed(format!("verify read: {e}")))
    }

    /// A verify message other than VerifyDigests, on either side.
    async fn verify_message(&mut self, io: &mut Io, m: Message) -> Result<(), Outcome> {
        let (reply, after) = io.verify.on_message(&self.engine, m).map_err(|e| Outcome::Failed(format!("verify: {e}")))?;
        if let Some(r) = reply {
            self.tx.send(r).await.map_err(|_| Outcome::PeerGone("connection closed (writer stopped)".into()))?;
        }
        match after {
            After::Continue => Ok(()),
            After::Resync => Err(Outcome::Stopped(StopReason::Renegotiate)),
        }
    }

    /// Target: a compare ran; its result goes to the source.
    async fn verify_target_done(&mut self, io: &mut Io, job: TargetJob) -> Result<(), Outcome> {
        let result = io.verify.target_done(&self.engine, job);
        self.tx.send(result).await.map_err(|_| Outcome::PeerGone("connection closed (writer stopped)".into()))
    }

    fn send_acks(&mut self, t: &mut Target) {
        let now = (t.received, t.written.min(t.received), t.durable.min(t.written));
        if t.acked != Some(now) {
            match self.tx.try_send(Message::Ack { received: now.0, written: now.1, durable: now.2 }) {
                Ok(()) => t.acked = Some(now),
                Err(_) => return, // queue full: cumulative, sent later
            }
        }
        if t.sync_dirty && t.sync_total > 0 {
            if self.tx.try_send(Message::SyncAck { done_bytes: t.sync_done }).is_ok() {
                t.sync_dirty = false;
                if let Some(r) = self.engine.view_mut().resync.as_mut() {
                    r.done_bytes = t.sync_done;
                }
            }
        } else {
            t.sync_dirty = false;
        }
    }
}

struct SyncSource {
    total: u64,
    /// Bytes of sync reads queued.
    queued: u64,
    /// Bytes of sync data seen in the feed.
    seen: u64,
    end_sent: bool,
    /// Bytes the peer acknowledged.
    done: u64,
    started: Instant,
}

#[derive(Default)]
struct Target {
    received: Lsn,
    written: Lsn,
    durable: Lsn,
    /// Highest barrier asked for.
    barrier: Lsn,
    acked: Option<(Lsn, Lsn, Lsn)>,
    sync_total: u64,
    sync_done: u64,
    sync_dirty: bool,
    /// SyncEnd received: finish once everything before it is applied.
    sync_end: Option<u64>,
}

enum Pending {
    Record { lsn: Lsn, fua: bool },
    Sync { len: u64 },
    /// An online-verify compare (src/repl/verify.rs).
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

/// The frame of a feed item; `None` for verify data, which the session
/// turns into digests (src/repl/verify.rs).
fn item_to_message(item: FeedItem) -> Option<Message> {
    Some(match item {
        FeedItem::Record { lsn, op, fua } => match op {
            FeedOp::Write { offset, data } => Message::Write { lsn, offset, fua, data },
            FeedOp::Trim { offset, len } => Message::Trim { lsn, offset, len, fua },
            FeedOp::Zeroes { offset, len, punch } => Message::Zeroes { lsn, offset, len, punch, fua },
        },
        FeedItem::Barrier { upto } => Message::Barrier { upto_lsn: upto },
        FeedItem::SyncData { offset, data } => Message::SyncData { offset, data },
        FeedItem::VerifyData { .. } => return None,
    })
}

/// Why a session ended, for an aborted verify's report.
fn describe_end(o: &Outcome) -> String {
    match o {
        Outcome::Stopped(r) => format!("the session was stopped ({r:?})"),
        Outcome::PeerLeft(why) => format!("the peer disconnected: {why}"),
        Outcome::PeerGone(why) => format!("the peer was lost: {why}"),
        Outcome::Failed(why) => format!("the session failed: {why}"),
    }
}
