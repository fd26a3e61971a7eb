//! The link: the listener and the dialer (with backoff), the handshake, the
//! SyncInfo exchange and the resync decision, adopting one connection, and
//! running a session on it (src/repl/session/) until it ends.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::{
    DUPLICATE_WINDOW, Engine, EngineError, HANDSHAKE_TIMEOUT, LOG_EVERY, LOSER_DIAL_DELAY, SessionSlot, StopReason,
};
use super::{DecisionView, ProbeReport, SideReport, side_view};
use crate::event::Event;
use crate::model::{ConnState, OnPeerLoss, Role, SplitBrainPolicy};
use crate::repl::decide::{Decision, SideView, Verdict};
use crate::repl::handshake::{HandshakeError, LocalHello, handshake, keep_connection};
use crate::repl::link::{FrameReader, FrameWriter, secure, split_link};
use crate::repl::proto::{GoodbyeReason, Message, SyncInfo, sync_flags};

/// Connects to the peer's replication address, refusing a connection to
/// ourselves: when nobody listens on a port inside the kernel's ephemeral
/// range, a dial can be given that very port as its source port and
/// connect to itself (TCP simultaneous open), which would also keep the
/// peer from binding it. Dropped at once, it frees the port again.
async fn dial(addr: &str) -> std::io::Result<TcpStream> {
    refuse_self_connection(TcpStream::connect(addr).await?)
}

fn refuse_self_connection(stream: TcpStream) -> std::io::Result<TcpStream> {
    if stream.local_addr()? == stream.peer_addr()? {
        // Closed with a reset rather than a FIN, so that the port does not
        // sit in TIME_WAIT for a minute, out of the peer's reach. (A zero
        // linger never blocks the drop, the reason tokio deprecates it.)
        #[allow(deprecated)]
        stream.set_linger(Some(Duration::ZERO))?;
        return Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "nobody listens there and the kernel gave the dial that port as its own source port \
             (a port inside net.ipv4.ip_local_port_range); the connection to ourselves was dropped",
        ));
    }
    Ok(stream)
}

impl Engine {
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
        let mut summaries = tokio::time::interval(crate::repl::unauth::SUMMARY_INTERVAL / 4);
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
        let loser_extra = if crate::repl::handshake::connection_winner(&self.cfg.node, &self.cfg.peer) == self.cfg.node
        {
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
            let ok = match tokio::time::timeout(HANDSHAKE_TIMEOUT, dial(&self.cfg.peer_addr)).await {
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
        // The marks our SyncInfo describes: a session that ended after it
        // was sent may still mark its unacknowledged records (see
        // `Engine::claim_session`).
        let marks = self.store.mark_count();
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
            let verdict = crate::repl::decide::decide(&side_view(&theirs), &side_view(&mine), &self.cfg.split_brain);
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
        // `--discard-my-data` is spent by the session (when the resync it
        // asked for starts, or by a decision it does not change), not here:
        // a session that ends first leaves it for the next one.
        {
            let mut v = self.view_mut();
            v.last_error = None;
            v.tls = tls_session;
        }
        let start = crate::repl::session::Start { reader, writer, peer, mine, marks, theirs };
        self.run_session(id, start, stop_rx, local.role).await;
        true
    }

    /// `repctl connect --dry-run`: dials the peer, exchanges SyncInfo with
    /// the DRY_RUN flag, computes the decision a connect would take, says
    /// Goodbye. Changes nothing on either node (works standalone too).
    pub async fn probe(&self, discard_my_data: bool) -> Result<ProbeReport, String> {
        let peer_name = &self.cfg.peer;
        let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, dial(&self.cfg.peer_addr))
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
        let v = crate::repl::decide::decide(&l, &p, &self.cfg.split_brain);
        if l.role == Role::Primary && p.role == Role::Primary {
            // Two primaries are refused whatever happened; when both also
            // wrote since their last common generation, say it is a split
            // brain (status, event), as it would be once one demotes.
            let as_secondaries = crate::repl::decide::decide(
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
        start: crate::repl::session::Start,
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
        let outcome = crate::repl::session::run(self, start, stop, hello_role).await;
        self.end_session(id, &outcome);
    }

    /// Bookkeeping after a session ended.
    fn end_session(&self, id: u64, outcome: &crate::repl::session::Outcome) {
        use crate::repl::session::Outcome;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_connection_to_ourselves_is_refused_and_frees_the_port() {
        // Force what the kernel does by chance: a socket bound to port P
        // connecting to P, with nobody listening there, connects to itself.
        let sock = tokio::net::TcpSocket::new_v4().expect("socket");
        sock.bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let addr = sock.local_addr().expect("addr");
        let stream = sock.connect(addr).await.expect("a simultaneous open to ourselves");
        assert_eq!(stream.local_addr().expect("local"), stream.peer_addr().expect("peer"));
        let err = refuse_self_connection(stream).expect_err("a self-connection is refused");
        assert!(err.to_string().contains("ip_local_port_range"), "{err}");
        let t0 = std::time::Instant::now();
        loop {
            match TcpListener::bind(addr).await {
                Ok(_) => break,
                Err(e) if t0.elapsed() > Duration::from_secs(5) => panic!("port {addr} still taken: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        eprintln!("the port was free again after {:?}", t0.elapsed());

        // A real peer passes.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let to = listener.local_addr().expect("addr").to_string();
        let (dialed, accepted) = tokio::join!(dial(&to), listener.accept());
        dialed.expect("a connection to a listener is kept");
        accepted.expect("accepted");
    }
}
