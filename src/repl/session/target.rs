//! The target loop: the peer sends. Records are applied in order through
//! the volume (queued at once, completions awaited in order); acks go back
//! as `received` on decode, `written` as applies complete and `durable`
//! after a flush, all coalesced. Resync data is made durable with
//! `sync_data_file` (every [`SYNC_DURABLE_BYTES`] or [`SYNC_DURABLE_EVERY`],
//! and before the last ack) before `SyncAck` reports it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::time::sleep_until;

use super::{Outcome, Session, SessionIo, Side, Tick};
use crate::event::{Event, SyncRole};
use crate::model::{DiskState, Lsn, Protocol, ReplState, ResyncKind, Role};
use crate::repl::engine::{HoldPoint, test_hold};
use crate::repl::proto::{GoodbyeReason, MAX_BITMAP_WORDS, Message, SyncInfo};
use crate::repl::store::{BoxFut, FeedOp};
use crate::repl::verify::TargetJob;
use crate::volume::VolumeError;

/// Frames handled before acks are sent even if more are buffered.
const ACK_EVERY: usize = 256;
/// The target makes resync data durable (and acks it) after this many
/// bytes or this long, whichever comes first.
const SYNC_DURABLE_BYTES: u64 = 8 << 20;
const SYNC_DURABLE_EVERY: Duration = Duration::from_millis(100);
/// Bitmap words per BitmapChunk (64 KiB of payload).
const BITMAP_CHUNK_WORDS: usize = 8192;
const _: () = assert!(BITMAP_CHUNK_WORDS <= MAX_BITMAP_WORDS);

impl Session {
    /// Sends our bitmap to the source (non-zero runs of words).
    async fn send_bitmap(&mut self) -> Result<(), Outcome> {
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
            self.send(chunk).await?;
        }
        self.send(Message::BitmapEnd { total_words: words.len() as u64 }).await
    }

    pub(super) async fn target(&mut self, io: &mut SessionIo, theirs: &SyncInfo, plan: Option<ResyncKind>) -> Outcome {
        match self.target_inner(io, theirs, plan).await {
            Ok(o) | Err(o) => o,
        }
    }

    async fn target_inner(
        &mut self,
        io: &mut SessionIo,
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
            self.send_bitmap().await?;
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
            io.tick();
            // A barrier (or the sync end) needs everything written first.
            let log_end = t.sync_end.is_some() && t.kind == Some(ResyncKind::Log);
            // Under protocol C, when the stream pauses (every record applied,
            // nothing more buffered: a QD1 commit's write), the target makes
            // what it wrote durable at once, so the primary's FLUSH usually
            // finds the peer's durable ack already there and a commit costs
            // one round trip, not two. A busy stream keeps flushing on
            // barriers only (group commit).
            let eager = engine.cfg.protocol == Protocol::C && pending.is_empty() && io.buffered() == 0;
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
                self.finish_sync(io, &mut t, theirs, bytes).await?;
            }
            // A full writer queue keeps `since_ack`: the next wake-up (at
            // the latest the periodic tick) retries.
            if (since_ack >= ACK_EVERY || (since_ack > 0 && io.buffered() == 0) || t.sync_dirty)
                && self.send_acks(&mut t)
            {
                since_ack = 0;
            }
            // `repctl verify` here: the source runs it (src/repl/verify.rs).
            if engine.verify.take_request() {
                self.send(Message::VerifyRequest).await?;
            }
            // While a verify compare waits in `pending`, no frame is read:
            // the compare sees exactly the stream up to its digests.
            let reading = t.sync_end.is_none() && !self.verify.gate();
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
                        Pending::Verify(job) => self.verify_target_done(job).await?,
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
                tick = io.next(reading, my_role) => match tick {
                    Tick::Out(o) => return Ok(o),
                    Tick::Ping | Tick::Frame(Message::State { .. }) => {}
                    Tick::Frame(Message::VerifyDigests { offset, block, digests }) => {
                        let job = self
                            .verify
                            .target_digests(&engine, offset, block, digests)
                            .map_err(|e| Outcome::Failed(format!("verify: {e}")))?;
                        if let Some((job, compare)) = job {
                            pending.push_back((Pending::Verify(job), compare));
                        }
                    }
                    Tick::Frame(m) if m.is_verify() => self.verify_message(m).await?,
                    Tick::Frame(m) => {
                        since_ack += 1;
                        self.target_frame(io, &mut t, &mut pending, m, theirs).await?;
                    }
                },
                _ = sleep_until(data_sync_due.into()), if syncing.is_none() && t.sync_written > t.sync_durable => {}
                _ = engine.verify.wake.notified() => {}
            }
        }
    }

    async fn target_frame(
        &mut self,
        io: &mut SessionIo,
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
                    && let Err(why) = crate::repl::resync_hook::before_resync_target(
                        &engine,
                        kind,
                        total_bytes,
                        theirs.gen_ids.current,
                    )
                    .await
                {
                    let _ = self.tx.try_send(Message::Goodbye { reason: GoodbyeReason::Other, message: why.clone() });
                    engine.go_standalone(&why);
                    return Err(Outcome::Failed(why));
                }
                test_hold(HoldPoint::SyncStart).await;
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
                if std::mem::take(&mut self.discard_my_data) {
                    engine.spend_discard_my_data();
                }
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
                io.touch();
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
    async fn finish_sync(
        &mut self,
        io: &mut SessionIo,
        t: &mut Target,
        theirs: &SyncInfo,
        bytes: u64,
    ) -> Result<(), Outcome> {
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
        io.touch();
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
