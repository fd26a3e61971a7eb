//! The source loop: this node sends (the primary, or a secondary with the
//! newer data). It attaches the volume's feed, runs the decided resync as a
//! [`ResyncJob`] (log catch-up, bitmap or full walk; src/repl/resync/), and
//! streams the feed; acks from the target move the reply gate
//! (src/repl/engine/gate.rs) and the job.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Outcome, Session, SessionIo, Side, Tick, item_to_message, job_failed, record_message};
use crate::event::SyncRole;
use crate::model::{DiskState, Lsn, ReplState, ResyncKind};
use crate::repl::engine::EngineConfig;
use crate::repl::proto::{Message, SyncInfo};
use crate::repl::resync::{Catchup, JobOp, ResyncJob, Step, Tail, Walk};
use crate::repl::store::{FeedItem, LogReadError};
use crate::repl::verify::ReadMode;

/// The source persists the bits it cleared this often during a resync.
const BITMAP_PERSIST_EVERY: Duration = Duration::from_secs(1);

/// How long the peer may leave records this node sent unacknowledged (no
/// progress of its `received` ack) while it is otherwise alive, before the
/// session is ended and renegotiated: ten times the silence timeout
/// (15 s with the defaults). A record lost between the two logs (issue 14:
/// a gap left `peer_written` stuck and C writes hung for minutes, until a
/// later record exposed it) then ends in a reconnect and a catch-up, not a
/// hang; a peer merely slow to read (back-pressure) reconnects harmlessly.
pub(crate) fn ack_stall(cfg: &EngineConfig) -> Duration {
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

impl Session {
    /// Receives the target's bitmap (BitmapChunk... BitmapEnd) and ORs it
    /// into ours.
    async fn receive_bitmap(&mut self, io: &mut SessionIo) -> Result<(), Outcome> {
        let store = Arc::clone(&self.engine.store);
        let ours = store.bitmap_words().len() as u64;
        let mut merged = 0u64;
        let my_role = io.role();
        loop {
            let tick = io.next(true, my_role).await;
            io.tick();
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

    pub(super) async fn source(&mut self, io: &mut SessionIo, theirs: &SyncInfo, plan: Option<ResyncKind>) -> Outcome {
        match self.source_inner(io, theirs, plan).await {
            Ok(o) | Err(o) => o,
        }
    }

    async fn source_inner(
        &mut self,
        io: &mut SessionIo,
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
        // A decided log catch-up runs even with nothing to replay (see
        // `Catchup::nothing_to_replay`); without a decision, only when the
        // peer lacks records.
        let wants_log = (matches!(plan, None | Some(ResyncKind::Log)) && peer_lsn < base)
            || (plan == Some(ResyncKind::Log) && peer_lsn == base);
        if plan.is_none() && peer_lsn > base {
            return Err(Outcome::Failed(format!(
                "the peer is at LSN {peer_lsn}, ahead of ours ({base}), without a resync decided"
            )));
        }
        let mut job = if wants_log {
            store.set_retain_after(Some(peer_lsn));
            // Marks no record explains (a verify difference, a merged
            // bitmap) would survive a replay of the records: resync them.
            let reader = if store.has_foreign_marks() {
                Err(LogReadError::NotInLog {
                    lsn: peer_lsn + 1,
                    why: "the bitmap holds marks that no record explains (verify, a merged bitmap, a full sync)".into(),
                })
            } else if peer_lsn == base {
                Ok(None)
            } else {
                store.log_reader(peer_lsn + 1, base).map(Some)
            };
            match reader {
                Ok(reader) => {
                    tracing::info!(peer = %self.peer_name, from = peer_lsn + 1, to = base, "log catch-up starts");
                    self.send(Message::SyncStart { kind: ResyncKind::Log, total_bytes: 0, start_lsn: peer_lsn })
                        .await?;
                    engine.set_replication(ReplState::SyncSource);
                    engine.sync_started(ResyncKind::Log, 0, SyncRole::Source);
                    ResyncJob::CatchingUp(match reader {
                        Some(reader) => Catchup::new(reader, peer_lsn, base, store.mark_count()),
                        None => Catchup::nothing_to_replay(base, store.mark_count()),
                    })
                }
                Err(e) => {
                    let kind = self.fallback_kind(peer_lsn, &e);
                    ResyncJob::Walking(self.start_walk(kind, base).await?)
                }
            }
        } else {
            store.set_retain_after(Some(base));
            match plan {
                Some(ResyncKind::Full) => {
                    store
                        .mark_all()
                        .map_err(|e| Outcome::Failed(format!("cannot mark every block for a full sync: {e}")))?;
                    ResyncJob::Walking(self.start_walk(ResyncKind::Full, base).await?)
                }
                Some(ResyncKind::Bitmap) => ResyncJob::Walking(self.start_walk(ResyncKind::Bitmap, base).await?),
                _ => {
                    tracing::info!(peer = %self.peer_name, lsn = base, "peer is up to date: no sync");
                    engine.set_replication(ReplState::Established);
                    ResyncJob::Done
                }
            }
        };
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
            io.tick();
            if let Some(o) = acks_watch.check(engine.gate().acks().received, self.queued.get()) {
                return Ok(o);
            }
            // The log catch-up comes before the feed (its records are older).
            if pending.is_none()
                && let ResyncJob::CatchingUp(c) = &mut job
            {
                match c.step().await {
                    Step::Record { rec, bytes, total } => {
                        engine.sync_progress_total(bytes, total);
                        pending = Some(record_message(rec.lsn, rec.op, rec.fua));
                    }
                    Step::End { bytes } => {
                        pending = Some(Message::SyncEnd { bytes });
                        job.exec(JobOp::EndQueued).map_err(job_failed)?;
                    }
                    Step::FallBack(e) => {
                        if let LogReadError::Volume(v) = &e
                            && let Some(f) = store.failed()
                        {
                            return Err(Outcome::Failed(format!("the local volume stopped: {f} ({v})")));
                        }
                        let kind = self.fallback_kind(peer_lsn, &e);
                        let walk = self.start_walk(kind, base).await?;
                        job.exec(JobOp::FallBack(walk)).map_err(job_failed)?;
                    }
                }
            }
            let mut rate_wake: Option<Instant> = None;
            if let ResyncJob::Walking(w) = &mut job {
                let app_waiting = last_record > engine.gate().acks().written;
                rate_wake = w
                    .queue_reads(&*store, app_waiting, self.queued.get() as u64, engine.cfg.resync_rate)
                    .map_err(|e| Outcome::Failed(e.to_string()))?;
                if w.all_seen() && pending.is_none() {
                    pending = Some(Message::SyncEnd { bytes: w.queued });
                    job.exec(JobOp::EndQueued).map_err(job_failed)?;
                }
            }
            // Online verify (src/repl/verify.rs): reads in the writer's order,
            // not during a resync; a write committed but not yet written by
            // the peer (even if still in the feed) has priority.
            let app_waiting =
                self.verify.is_source() && store.local_lsn().max(last_record) > engine.gate().acks().written;
            self.verify_source_tick(ReadMode::Feed, job.running(), app_waiting).await?;
            let feed_open = job.feed_open();
            // The walk waits for the writer: wake up when it sent something.
            let walk_waits_writer = pending.is_none()
                && rate_wake.is_none()
                && job.walk().is_some_and(|w| w.held_by_unsent())
                && self.queued.get() > 0;
            let verify_wake = self.verify.next_wake();
            tokio::select! {
                item = feed.recv(), if pending.is_none() && feed_open => match item {
                    Some(FeedItem::VerifyData { offset, data }) => pending = self.verify.digests_for(offset, &data),
                    Some(item) => {
                        if let (FeedItem::SyncData { data, .. }, Some(w)) = (&item, job.walk_mut()) {
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
                t = io.next(true, my_role) => match t {
                    Tick::Out(o) => return Ok(o),
                    Tick::Ping | Tick::Frame(Message::State { .. }) => {}
                    Tick::Frame(Message::Ack { received, written, durable }) => {
                        engine.gate().record_ack(received, written, durable);
                        let a = engine.gate().acks();
                        store.set_peer_written(a.written);
                        if !job.is_log() {
                            store.set_retain_after(Some(a.durable));
                        }
                    }
                    Tick::Frame(Message::SyncAck { done_bytes, written_bytes }) => {
                        self.sync_acked(&mut job, done_bytes, written_bytes, theirs)?;
                    }
                    Tick::Frame(m) if m.is_verify() => self.verify_message(m).await?,
                    Tick::Frame(m) => self.unexpected(Side::Source, m)?,
                },
                _ = engine.verify.wake.notified() => {}
                _ = sleep_until_some(verify_wake) => {}
                _ = sleep_until_some(rate_wake) => {}
            }
        }
    }

    /// The target's `SyncAck`: a walk clears the bits of what is durable
    /// (and persists them about once a second); an ending job whose bytes
    /// are all durable finishes.
    fn sync_acked(
        &mut self,
        job: &mut ResyncJob,
        done_bytes: u64,
        written_bytes: u64,
        theirs: &SyncInfo,
    ) -> Result<(), Outcome> {
        let store = Arc::clone(&self.engine.store);
        if let Some(w) = job.walk_mut() {
            w.acked(&*store, done_bytes, written_bytes);
            self.engine.sync_progress(w.done);
            // Cleared bits reach the disk about once a second, so a
            // restarted source resumes close to where it was (checkpoints
            // also persist them, but only while writes arrive).
            if w.persisted_at.elapsed() >= BITMAP_PERSIST_EVERY {
                w.persisted_at = Instant::now();
                store
                    .persist_bitmap()
                    .map_err(|e| Outcome::Failed(format!("cannot persist the bitmap during the resync: {e}")))?;
            }
        }
        match job {
            ResyncJob::Ending(Tail::Walk(w)) if w.all_done() => {
                self.walk_finished(w, theirs)?;
            }
            ResyncJob::Ending(Tail::Log(c)) if done_bytes >= c.bytes => {
                self.catchup_finished(c, theirs)?;
                store.set_retain_after(Some(self.engine.gate().acks().durable));
            }
            _ => return Ok(()),
        }
        job.exec(JobOp::Finished).map_err(job_failed)
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
    async fn start_walk(&mut self, kind: ResyncKind, base: Lsn) -> Result<Walk, Outcome> {
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
        self.send(Message::SyncStart { kind, total_bytes: total, start_lsn: base }).await?;
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
        tracing::info!(peer = %self.peer_name, records = c.base - c.from, bytes = c.bytes, "log catch-up done");
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
}

/// Sleeps until `at`; never resolves for `None`.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}
