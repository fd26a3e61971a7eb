//! The log writer: one thread owns the WAL tail and does group commit.
//!
//! Requests (write, trim, write-zeroes, flush; each with a oneshot for its
//! completion) arrive on a channel. The writer takes everything queued (up
//! to `MAX_BATCH_BYTES`, 16 MiB, of payload), assigns consecutive LSNs, encodes all
//! records into one buffer (rolling over to a new segment when one is
//! full), and submits the WAL write together with the data-file applies in
//! one `IoEngine::submit` batch. Neither is synced, so their order on disk
//! does not matter: recovery replays the WAL. If any request of the batch
//! needs durability (FUA or flush), one fdatasync of the WAL follows; the
//! requests arriving meanwhile form the next batch (group commit). Then the
//! batch's requests complete.
//!
//! Any error of the WAL write, the data apply or the fdatasync is fail-stop:
//! the volume stops taking writes and says why; an fdatasync is never
//! retried.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;

use super::feed::{FeedItem, FeedOp};
use super::segment::{self, LiveSegment, parking};
use super::wal::{self, FLAG_FROM_PEER, FLAG_MAY_PUNCH, RecordHeader, RecordKind, SEGMENT_HEADER_SIZE, SegmentHeader};
use super::{FailStop, Lsn, Shared, VolumeError};
use crate::io::{IoFile, IoOp};

/// Most payload bytes taken into one batch.
pub(crate) const MAX_BATCH_BYTES: usize = 16 << 20;

/// Writes at least this large go to the data file only, with a payload-less
/// `WriteInPlace` record, when no replayable record overlaps them.
pub(crate) const IN_PLACE_MIN_BYTES: usize = 128 << 10;

/// The ranges touched by replayable records (records recovery would apply:
/// writes carrying their data, trims, write-zeroes) since the durable
/// checkpoint, each with the highest LSN that touched it.
///
/// A large write may go in place only if no such range overlaps it:
/// otherwise recovery, replaying an older record, would overwrite the newer
/// data in place. Stored as disjoint intervals; touching or overlapping ones
/// merge (keeping the highest LSN), which only makes the set conservative.
/// Intervals whose LSN the checkpoint passed are pruned.
#[derive(Debug, Default)]
pub(crate) struct ReplayRanges {
    /// start -> (end, highest LSN)
    map: BTreeMap<u64, (u64, Lsn)>,
}

impl ReplayRanges {
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        matches!(self.map.range(..end).next_back(), Some((_, &(e, _))) if e > start)
    }

    pub fn insert(&mut self, mut start: u64, mut end: u64, mut lsn: Lsn) {
        if end <= start {
            return;
        }
        // Absorb every interval that overlaps or touches [start, end).
        while let Some((&s, &(e, l))) = self.map.range(..=end).next_back() {
            if e < start {
                break;
            }
            self.map.remove(&s);
            start = start.min(s);
            end = end.max(e);
            lsn = lsn.max(l);
        }
        self.map.insert(start, (end, lsn));
    }

    /// Forgets the intervals no record above `checkpoint_lsn` touched.
    pub fn prune(&mut self, checkpoint_lsn: Lsn) {
        self.map.retain(|_, &mut (_, lsn)| lsn > checkpoint_lsn);
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.len()
    }
}

/// A set of disjoint half-open ranges, to split a batch of data operations
/// into rounds whose operations do not overlap (an engine may run the
/// operations of one submission in any order).
#[derive(Debug, Default)]
pub(crate) struct RangeSet {
    ranges: BTreeMap<u64, u64>,
}

impl RangeSet {
    /// Inserts `[start, end)` unless it overlaps a range of the set.
    pub fn insert_if_disjoint(&mut self, start: u64, end: u64) -> bool {
        if end <= start {
            return true;
        }
        if let Some((_, &e)) = self.ranges.range(..=start).next_back()
            && e > start
        {
            return false;
        }
        if let Some((&s, _)) = self.ranges.range(start..).next()
            && s < end
        {
            return false;
        }
        self.ranges.insert(start, end);
        true
    }

    pub fn clear(&mut self) {
        self.ranges.clear();
    }
}

/// What a request asks for.
#[derive(Debug)]
pub(crate) enum Op {
    Write { offset: u64, data: Bytes },
    Trim { offset: u64, len: u32 },
    Zeroes { offset: u64, len: u32, punch: bool },
    Flush,
}

impl Op {
    fn payload_len(&self) -> usize {
        match self {
            Op::Write { data, .. } => data.len(),
            _ => 0,
        }
    }
}

#[derive(Debug)]
pub(crate) struct Request {
    pub op: Op,
    pub fua: bool,
    /// Replicated record (`Volume::apply`): it must get exactly this LSN
    /// (one record), else it is refused with `LsnGap` and nothing is done.
    pub lsn: Option<Lsn>,
    pub done: oneshot::Sender<Result<Lsn, VolumeError>>,
}

#[derive(Debug)]
pub(crate) enum Msg {
    Req(Request),
    /// Finish what is queued before this message, then exit.
    Stop,
    /// Replication: read a data range between batches and publish it in
    /// the feed as `SyncData`.
    SyncRead {
        offset: u64,
        len: u32,
        feed: u64,
        /// Published as `VerifyData` (online verify) instead.
        verify: bool,
    },
    /// Replication (secondary): write full-sync data to the data file, not
    /// logged, ordered with the records around it.
    SyncWrite {
        offset: u64,
        data: Bytes,
        done: oneshot::Sender<Result<(), VolumeError>>,
    },
    /// Replication (secondary): the log continues at `last + 1` (see
    /// `Writer::rebase`).
    Rebase {
        last: Lsn,
        done: oneshot::Sender<Result<(), VolumeError>>,
    },
    /// A checkpoint in the writer's order (after everything queued before).
    Checkpoint {
        done: oneshot::Sender<Result<(), VolumeError>>,
    },
}

impl Msg {
    fn payload_len(&self) -> usize {
        match self {
            Msg::Req(Request { op: Op::Write { data, .. }, .. }) => data.len(),
            _ => 0,
        }
    }
}

/// The segment the writer appends to.
struct Tail {
    seq: u64,
    file: Arc<IoFile>,
    len: u64,
    /// Next write position in the file.
    pos: u64,
}

/// One contiguous WAL write of the batch buffer into a segment file.
struct Chunk {
    file: Arc<IoFile>,
    offset: u64,
    range: std::ops::Range<usize>,
}

/// A data-file operation of the batch.
enum DataOp {
    Write { offset: u64, data: Bytes },
    Zero { offset: u64, len: u64, punch: bool },
}

impl DataOp {
    fn range(&self) -> (u64, u64) {
        match self {
            DataOp::Write { offset, data } => (*offset, *offset + data.len() as u64),
            DataOp::Zero { offset, len, .. } => (*offset, *offset + *len),
        }
    }
}

pub(crate) struct Writer {
    shared: Arc<Shared>,
    rx: Receiver<Msg>,
    tail: Tail,
    /// Earlier segments written since the last WAL fdatasync.
    unsynced: Vec<Arc<IoFile>>,
    /// In-place writes were applied since the writer last synced the data
    /// file: a durability point must fdatasync it too.
    in_place_unsynced: bool,
    next_lsn: Lsn,
    max_record_payload: usize,
    buf: Vec<u8>,
    chunks: Vec<Chunk>,
    chunk_start: usize,
    chunk_offset: u64,
    /// Feed items of the batch being committed (published after it).
    feed_items: Vec<FeedItem>,
    /// Local records of the batch for out-of-sync tracking:
    /// `(lsn, offset, len)` (reused, no allocation per batch).
    tracked: Vec<(Lsn, u64, u64)>,
}

impl Writer {
    /// A writer appending to `current` (just started by `open`, holding
    /// only its header) from LSN `next_lsn`.
    pub(crate) fn new(
        shared: Arc<Shared>,
        rx: Receiver<Msg>,
        current: (u64, Arc<IoFile>, u64),
        next_lsn: Lsn,
    ) -> Writer {
        let (seq, file, len) = current;
        let max_record_payload = shared.max_record_payload;
        Writer {
            shared,
            rx,
            tail: Tail { seq, file, len, pos: SEGMENT_HEADER_SIZE },
            unsynced: Vec::new(),
            in_place_unsynced: false,
            next_lsn,
            max_record_payload,
            buf: Vec::with_capacity(1 << 20),
            chunks: Vec::new(),
            chunk_start: 0,
            chunk_offset: SEGMENT_HEADER_SIZE,
            feed_items: Vec::new(),
            tracked: Vec::new(),
        }
    }

    /// The thread body.
    ///
    /// Requests are batched; any other message ends the batch and runs
    /// between batches, so it is ordered with the requests around it.
    pub(crate) fn run(mut self) {
        let mut pending: Option<Msg> = None;
        loop {
            let first = match pending.take() {
                Some(m) => m,
                None => match self.rx.recv() {
                    Ok(m) => m,
                    Err(_) => return,
                },
            };
            let mut bytes = first.payload_len();
            let mut batch = Vec::new();
            match first {
                Msg::Req(r) => batch.push(r),
                Msg::Stop => return,
                other => {
                    self.special(other);
                    continue;
                }
            }
            while bytes < MAX_BATCH_BYTES {
                match self.rx.try_recv() {
                    Ok(Msg::Req(r)) => {
                        bytes += r.op.payload_len();
                        batch.push(r);
                    }
                    Ok(other) => {
                        pending = Some(other);
                        break;
                    }
                    Err(_) => break,
                }
            }
            self.process(batch);
        }
    }

    fn process(&mut self, batch: Vec<Request>) {
        if let Some(reason) = self.shared.failure() {
            for r in batch {
                let _ = r.done.send(Err(VolumeError::Stopped(reason.clone())));
            }
            return;
        }
        self.wait_for_feed_room();
        self.wait_for_space();
        self.feed_items.clear();
        match self.commit(&batch) {
            Ok(lsns) => {
                // Published before the requests complete: a reply gated on
                // the peer never waits for an LSN not yet in the feed.
                self.shared.feed.publish(&mut self.feed_items, self.next_lsn - 1, None);
                for (r, lsn) in batch.into_iter().zip(lsns) {
                    let _ = r.done.send(lsn);
                }
            }
            Err(reason) => {
                let reason = self.shared.fail(reason);
                for r in batch {
                    let _ = r.done.send(Err(VolumeError::Stopped(reason.clone())));
                }
            }
        }
    }

    /// Replication back-pressure: while the attached feed holds more than
    /// its bound, do not take new work.
    fn wait_for_feed_room(&self) {
        let s = &self.shared;
        s.feed.wait_for_room(|| s.stopping() || s.failure().is_some());
    }

    /// Runs a non-request message, between batches.
    fn special(&mut self, msg: Msg) {
        match msg {
            Msg::Req(_) | Msg::Stop => {}
            Msg::SyncRead { offset, len, feed, verify } => {
                // Only for the feed it was queued for (not a later one).
                self.wait_for_feed_room();
                if self.shared.failure().is_some() || self.shared.feed.attached() != Some(feed) {
                    return;
                }
                let mut buf = vec![0u8; len as usize];
                let data = &self.shared.data;
                if let Err(e) = self.shared.io.read_exact_at(data, &mut buf, offset) {
                    let op = format!("full-sync read of [{offset}, +{len}) from {}", data.path().display());
                    self.shared.fail(FailStop::io(op, &e));
                    return;
                }
                self.feed_items.clear();
                let data = Bytes::from(buf);
                self.feed_items.push(if verify {
                    FeedItem::VerifyData { offset, data }
                } else {
                    FeedItem::SyncData { offset, data }
                });
                self.shared.feed.publish(&mut self.feed_items, self.next_lsn - 1, Some(feed));
            }
            Msg::SyncWrite { offset, data, done } => {
                let r = match self.shared.failure() {
                    Some(reason) => Err(VolumeError::Stopped(reason)),
                    None => {
                        let file = &self.shared.data;
                        self.shared.io.write_all_at(file, &data, offset).map_err(|e| {
                            let op =
                                format!("full-sync write of [{offset}, +{}) to {}", data.len(), file.path().display());
                            VolumeError::Stopped(self.shared.fail(FailStop::io(op, &e)))
                        })
                    }
                };
                let _ = done.send(r);
            }
            Msg::Rebase { last, done } => {
                let r = match self.shared.failure() {
                    Some(reason) => Err(VolumeError::Stopped(reason)),
                    None => self.rebase(last),
                };
                let _ = done.send(r);
            }
            Msg::Checkpoint { done } => {
                let _ = done.send(super::checkpoint::checkpoint(&self.shared, false));
            }
        }
    }

    /// The log continues at `last + 1` (full sync of a secondary): starts a
    /// new segment whose first LSN is `last + 1`, syncs its header, and
    /// checkpoints at `last` (data file synced, superblock: checkpoint LSN
    /// `last`, replay from the new segment), so recovery never replays the
    /// records before the gap. The older segments are recycled.
    fn rebase(&mut self, last: Lsn) -> Result<(), VolumeError> {
        let s = self.shared.clone();
        // No checkpoint may run between the LSN reset and the superblock
        // write with a mix of old and new state.
        let _serial = parking::lock(&s.ckpt_lock);
        let seq = self.tail.seq + 1;
        let first_lsn = last + 1;
        let stop = |reason: FailStop| VolumeError::Stopped(s.fail(reason));
        let seg = segment::activate(&*s.io, &s.wal, seq, first_lsn, s.segment_size)
            .map_err(|e| stop(FailStop::io(format!("creating WAL segment {seq} in {}", s.wal_dir.display()), &e)))?;
        let header = SegmentHeader { seq, first_lsn, uuid: s.uuid, segment_size: seg.len }.encode();
        s.io.write_all_at(&seg.file, &header, 0).and_then(|()| s.io.sync_data(&seg.file)).map_err(|e| {
            stop(FailStop::io(format!("writing the header of WAL segment {}", seg.file.path().display()), &e))
        })?;
        let old_lsn = self.next_lsn - 1;
        self.tail = Tail { seq, file: seg.file.clone(), len: seg.len, pos: SEGMENT_HEADER_SIZE };
        self.unsynced.clear();
        self.next_lsn = first_lsn;
        parking::lock(&s.wal).live.push_back(seg);
        // Nothing before the gap is ever replayed again, nor sent to a peer:
        // a retention hold on the old log ends.
        *parking::lock(&s.replay_ranges) = ReplayRanges::default();
        s.min_retained_lsn.store(u64::MAX, Ordering::Release);
        s.retention_liftable.store(false, Ordering::Release);
        parking::lock(&s.tracker).rebase(last);
        s.applied_lsn.store(last, Ordering::Release);
        s.durable_lsn.store(last, Ordering::Release);
        s.feed.reset_lsn(last);
        super::checkpoint::checkpoint_locked(&s, false)?;
        self.in_place_unsynced = false;
        tracing::info!(old_lsn, last_lsn = last, seq, "WAL rebased: the log continues at the peer's LSN");
        Ok(())
    }

    /// Back-pressure: while the WAL holds more than the limit (not yet
    /// checkpointed: `wal_limit`; in all: `wal_limit + wal_retain`), wait
    /// for the checkpointer to recycle segments.
    fn wait_for_space(&self) {
        let s = &self.shared;
        let limit = s.wal_limit;
        let total_limit = limit.saturating_add(s.wal_retain.load(Ordering::Acquire));
        let mut files = parking::lock(&self.shared.wal);
        let mut warned = false;
        while (files.unchecked_bytes() > limit || files.live_bytes() > total_limit)
            && !self.shared.stopping()
            && self.shared.failure().is_none()
        {
            if !warned {
                // Once per stall: only a checkpoint (or a lifted retention)
                // ends it.
                tracing::info!(wal_bytes = files.live_bytes(), limit, "WAL full, writes wait for a checkpoint");
                warned = true;
            }
            self.shared.request_checkpoint();
            files =
                self.shared.space.wait_timeout(files, Duration::from_millis(50)).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// Encodes, writes, applies and (if needed) syncs one batch. Returns the
    /// result each request completes with (the LSN, or `LsnGap` for a
    /// replicated record out of sequence), or the fail-stop reason. Fills
    /// `feed_items` with the batch's records (and a barrier if it flushed).
    fn commit(&mut self, batch: &[Request]) -> Result<Vec<Result<Lsn, VolumeError>>, FailStop> {
        self.buf.clear();
        self.chunks.clear();
        self.tracked.clear();
        self.chunk_start = 0;
        self.chunk_offset = self.tail.pos;
        let durable = self.shared.durable_lsn.load(Ordering::Acquire);
        let mut need_sync = false;
        let mut lsns = Vec::with_capacity(batch.len());
        let mut data_ops = Vec::with_capacity(batch.len());

        let shared = self.shared.clone();
        let mut replay = parking::lock(&shared.replay_ranges);
        let mut refused: Vec<Option<VolumeError>> = Vec::new();
        let mut flushed = false;
        for (i, r) in batch.iter().enumerate() {
            if let Some(want) = r.lsn
                && want != self.next_lsn
            {
                refused.resize_with(batch.len(), || None);
                refused[i] = Some(VolumeError::LsnGap { expected: self.next_lsn, got: want });
                lsns.push(0);
                continue;
            }
            need_sync |= r.fua;
            // A replicated record: marked in the WAL, never tracked, and
            // the peer has written it (it sent it).
            let peer = if r.lsn.is_some() { FLAG_FROM_PEER } else { 0 };
            let lsn = match &r.op {
                Op::Flush => {
                    need_sync = true;
                    flushed = true;
                    0 // replaced by the durable LSN below
                }
                Op::Write { offset, data } => {
                    let end = offset + data.len() as u64;
                    let in_place = data.len() >= IN_PLACE_MIN_BYTES && !replay.overlaps(*offset, end);
                    // A large write becomes several records; `Volume::write`
                    // never sends an empty one.
                    let mut last = 0;
                    let mut done = 0usize;
                    while done < data.len() {
                        let n = (data.len() - done).min(self.max_record_payload);
                        let off = offset + done as u64;
                        let piece = data.slice(done..done + n);
                        last = if in_place {
                            self.append(RecordKind::WriteInPlace, peer, off, n as u32, &[], durable)?
                        } else {
                            self.append(RecordKind::Write, peer, off, n as u32, &piece, durable)?
                        };
                        if r.lsn.is_none() {
                            self.tracked.push((last, off, n as u64));
                        }
                        let fua = r.fua && done + n == data.len();
                        self.feed_items.push(FeedItem::Record {
                            lsn: last,
                            op: FeedOp::Write { offset: off, data: piece.clone() },
                            fua,
                        });
                        data_ops.push(DataOp::Write { offset: off, data: piece });
                        done += n;
                    }
                    if in_place {
                        self.in_place_unsynced = true;
                    } else {
                        replay.insert(*offset, end, last);
                    }
                    last
                }
                Op::Trim { offset, len } => {
                    let lsn = self.append(RecordKind::Trim, peer, *offset, *len, &[], durable)?;
                    if r.lsn.is_none() {
                        self.tracked.push((lsn, *offset, u64::from(*len)));
                    }
                    data_ops.push(DataOp::Zero { offset: *offset, len: u64::from(*len), punch: true });
                    replay.insert(*offset, offset + u64::from(*len), lsn);
                    let op = FeedOp::Trim { offset: *offset, len: *len };
                    self.feed_items.push(FeedItem::Record { lsn, op, fua: r.fua });
                    lsn
                }
                Op::Zeroes { offset, len, punch } => {
                    let flags = peer | if *punch { FLAG_MAY_PUNCH } else { 0 };
                    let lsn = self.append(RecordKind::WriteZeroes, flags, *offset, *len, &[], durable)?;
                    if r.lsn.is_none() {
                        self.tracked.push((lsn, *offset, u64::from(*len)));
                    }
                    data_ops.push(DataOp::Zero { offset: *offset, len: u64::from(*len), punch: *punch });
                    replay.insert(*offset, offset + u64::from(*len), lsn);
                    let op = FeedOp::Zeroes { offset: *offset, len: *len, punch: *punch };
                    self.feed_items.push(FeedItem::Record { lsn, op, fua: r.fua });
                    lsn
                }
            };
            lsns.push(lsn);
        }
        drop(replay);
        // The activity log lists every extent this batch writes locally
        // before anything is submitted (src/volume/al.rs).
        if !self.tracked.is_empty() {
            self.admit_activity()?;
        }
        // Bits (or ring entries) exist before the LSNs are published as
        // applied: a checkpoint that sees LSN `A` persists their bits.
        let from_peer = batch.iter().zip(&lsns).filter(|(r, _)| r.lsn.is_some()).map(|(_, &l)| l).max();
        if !self.tracked.is_empty() || from_peer.is_some_and(|l| l > 0) {
            let mut t = parking::lock(&shared.tracker);
            for &(lsn, off, len) in &self.tracked {
                t.record(lsn, off, len);
            }
            if let Some(l) = from_peer {
                t.applied_from_peer(l);
            }
            drop(t);
            self.tracked.clear();
        }
        self.finish_chunk();
        let last = self.next_lsn - 1;

        // One submission: the WAL chunks and the first round of data ops;
        // further rounds only when data ops of the batch overlap.
        let data = &self.shared.data;
        let mut ops: Vec<IoOp<'_>> = self
            .chunks
            .iter()
            .map(|c| IoOp::Write { file: &c.file, offset: c.offset, buf: &self.buf[c.range.clone()] })
            .collect();
        let mut ranges = RangeSet::default();
        for d in &data_ops {
            let (s, e) = d.range();
            if !ranges.insert_if_disjoint(s, e) {
                self.submit(&mut ops)?;
                ops.clear();
                ranges.clear();
                ranges.insert_if_disjoint(s, e);
            }
            ops.push(match d {
                DataOp::Write { offset, data: b } => IoOp::Write { file: data, offset: *offset, buf: b },
                DataOp::Zero { offset, len, punch } => {
                    IoOp::Zero { file: data, offset: *offset, len: *len, punch: *punch }
                }
            });
        }
        self.submit(&mut ops)?;
        drop(ops);
        self.shared.applied_lsn.store(last, Ordering::Release);
        self.shared.wal_written.fetch_add(self.buf.len() as u64, Ordering::AcqRel);

        if need_sync && last > self.shared.durable_lsn.load(Ordering::Acquire) {
            self.sync_upto(last, false)?;
        }
        let durable_now = self.shared.durable_lsn.load(Ordering::Acquire);
        for (r, lsn) in batch.iter().zip(lsns.iter_mut()) {
            if matches!(r.op, Op::Flush) {
                *lsn = durable_now;
            }
        }
        if flushed {
            self.feed_items.push(FeedItem::Barrier { upto: durable_now });
        }
        self.shared.maybe_request_checkpoint();
        let mut refused = refused.into_iter();
        Ok(lsns.into_iter().map(|lsn| refused.next().flatten().map_or(Ok(lsn), Err)).collect())
    }

    /// Adds the extents of `self.tracked` (this batch's local writes) to
    /// the activity log, persisting it if one was new. A log full of
    /// extents with writes not yet durable is emptied by a WAL sync first.
    fn admit_activity(&mut self) -> Result<(), FailStop> {
        let shared = self.shared.clone();
        let mut al = parking::lock(&shared.activity);
        if !al.admit(&self.tracked, shared.durable_lsn.load(Ordering::Acquire), false) {
            let applied = shared.applied_lsn.load(Ordering::Acquire);
            if applied > shared.durable_lsn.load(Ordering::Acquire) {
                // Mid-batch: a segment this batch rolled over from, and its
                // in-place writes, still need the batch's own sync.
                self.sync_upto(applied, true)?;
            }
            // Every earlier write is durable now: every extent but this
            // batch's can leave; a batch wider than the log overflows it
            // (persisted as "every block").
            let admitted = al.admit(&self.tracked, shared.durable_lsn.load(Ordering::Acquire), true);
            debug_assert!(admitted, "a forced admit always succeeds");
        }
        if al.dirty() {
            al.persist(&*shared.io)
                .map_err(|e| FailStop::io(format!("write batch: activity log write {}", al.path().display()), &e))?;
        }
        Ok(())
    }

    /// fdatasyncs the WAL (and the data file after in-place writes): every
    /// record up to `last`, all submitted, becomes durable. `mid_batch`:
    /// the files stay listed as unsynced (the batch writes more to them).
    fn sync_upto(&mut self, last: Lsn, mid_batch: bool) -> Result<(), FailStop> {
        {
            let mut sync_ops: Vec<IoOp<'_>> = Vec::with_capacity(1 + self.unsynced.len());
            for f in &self.unsynced {
                sync_ops.push(IoOp::SyncData { file: f });
            }
            sync_ops.push(IoOp::SyncData { file: &self.tail.file });
            let with_data = self.in_place_unsynced;
            if with_data {
                sync_ops.push(IoOp::SyncData { file: &self.shared.data });
            }
            if let Err(e) = self.shared.io.submit(&mut sync_ops) {
                let op = if with_data {
                    format!(
                        "fdatasync of WAL {} and data {}",
                        self.tail.file.path().display(),
                        self.shared.data.path().display()
                    )
                } else {
                    format!("fdatasync of WAL {}", self.tail.file.path().display())
                };
                return Err(FailStop::io(op, &e));
            }
            drop(sync_ops);
            if !mid_batch {
                self.unsynced.clear();
                self.in_place_unsynced = false;
            }
            self.shared.durable_lsn.fetch_max(last, Ordering::AcqRel);
            super::VolumeCounters::add(&self.shared.counters.wal_syncs, 1);
        }
        Ok(())
    }

    fn submit(&self, ops: &mut [IoOp<'_>]) -> Result<(), FailStop> {
        if ops.is_empty() {
            return Ok(());
        }
        self.shared.io.submit(ops).map_err(|e| {
            let op = format!(
                "write batch (WAL {}, data {})",
                self.tail.file.path().display(),
                self.shared.data.path().display()
            );
            FailStop::io(op, &e)
        })
    }

    /// Appends one record to the batch buffer, rolling over to a new
    /// segment when it does not fit. Returns its LSN.
    fn append(
        &mut self,
        kind: RecordKind,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
        durable_lsn: Lsn,
    ) -> Result<Lsn, FailStop> {
        let lsn = self.next_lsn;
        let need = wal::encoded_len(payload.len()) as u64;
        if self.tail.pos + need > self.tail.len {
            self.rollover(lsn)?;
        }
        let header = RecordHeader { kind, flags, lsn, offset, length, durable_lsn };
        wal::encode_record(&mut self.buf, self.shared.uuid, self.tail.seq, &header, payload);
        self.tail.pos += need;
        self.next_lsn += 1;
        Ok(lsn)
    }

    fn finish_chunk(&mut self) {
        if self.buf.len() > self.chunk_start {
            self.chunks.push(Chunk {
                file: self.tail.file.clone(),
                offset: self.chunk_offset,
                range: self.chunk_start..self.buf.len(),
            });
        }
        self.chunk_start = self.buf.len();
    }

    /// Starts segment `seq + 1` whose first record is `first_lsn`.
    fn rollover(&mut self, first_lsn: Lsn) -> Result<(), FailStop> {
        self.finish_chunk();
        let seq = self.tail.seq + 1;
        let seg: LiveSegment =
            segment::activate(&*self.shared.io, &self.shared.wal, seq, first_lsn, self.shared.segment_size).map_err(
                |e| FailStop::io(format!("creating WAL segment {seq} in {}", self.shared.wal_dir.display()), &e),
            )?;
        tracing::debug!(seq, first_lsn, path = %seg.file.path().display(), "WAL segment started");
        let header = SegmentHeader { seq, first_lsn, uuid: self.shared.uuid, segment_size: seg.len }.encode();
        let old = std::mem::replace(
            &mut self.tail,
            Tail { seq, file: seg.file.clone(), len: seg.len, pos: SEGMENT_HEADER_SIZE },
        );
        self.unsynced.push(old.file);
        parking::lock(&self.shared.wal).live.push_back(seg);
        self.buf.extend_from_slice(&header);
        self.chunk_offset = 0;
        // The header goes out with this segment's first chunk.
        self.chunk_start = self.buf.len() - header.len();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{RangeSet, ReplayRanges};

    #[test]
    fn replay_ranges_merge_query_and_prune() {
        let mut r = ReplayRanges::default();
        r.insert(0, 4096, 1);
        r.insert(8192, 12288, 2);
        assert!(r.overlaps(0, 1));
        assert!(r.overlaps(4095, 8193));
        assert!(!r.overlaps(4096, 8192));
        assert!(!r.overlaps(12288, 1 << 20));
        assert_eq!(r.len(), 2);
        r.insert(4096, 8192, 3); // touches both: one interval, LSN 3
        assert_eq!(r.len(), 1);
        assert!(r.overlaps(5000, 5001));
        r.prune(2);
        assert!(r.overlaps(0, 1), "merged interval keeps the highest LSN");
        r.prune(3);
        assert!(!r.overlaps(0, 1 << 30));
        r.insert(1 << 20, 2 << 20, 10);
        r.insert(100, 200, 11);
        r.prune(10);
        assert!(!r.overlaps(1 << 20, 2 << 20));
        assert!(r.overlaps(150, 151));
    }

    #[test]
    fn range_set_detects_overlaps() {
        let mut r = RangeSet::default();
        assert!(r.insert_if_disjoint(0, 4096));
        assert!(r.insert_if_disjoint(8192, 12288));
        assert!(r.insert_if_disjoint(4096, 8192)); // touching is fine
        assert!(!r.insert_if_disjoint(4095, 4097));
        assert!(!r.insert_if_disjoint(100, 200));
        assert!(!r.insert_if_disjoint(0, 1 << 20));
        assert!(r.insert_if_disjoint(5, 5)); // empty
        r.clear();
        assert!(r.insert_if_disjoint(100, 200));
    }
}
