//! Out-of-sync tracking: the dirty bitmap, the unacked ring, and their
//! persistence (design.md §4, docs/formats.md "Dirty bitmap").
//!
//! The log writer reports every committed local record (write, trim,
//! write-zeroes, in-place write) here, in LSN order, before the record's
//! LSN is published as applied:
//!
//! - while **tracking** (at open, and whenever no peer is receiving the
//!   records), its blocks' bits are set;
//! - otherwise `(lsn, offset, len)` goes into the **unacked ring**, which
//!   `set_peer_written(lsn)` prunes as the peer acknowledges records as
//!   written. `mark_unacked` (link lost) sets the bits of everything left
//!   in the ring and turns tracking on. The ring holds at most
//!   [`MAX_RING`] entries; older ones are moved to the bitmap (a stuck peer
//!   costs bits, never memory).
//!
//! Records a secondary applies from its primary (`Volume::apply`) and
//! full-sync data are never tracked: they came from the peer. Such a record
//! carries `FLAG_FROM_PEER` in the WAL (recovery does not mark it) and
//! moves the peer's written LSN and the bitmap base up to it.
//!
//! **Invariant** (what makes the bitmap survive a crash): every block that
//! may differ from the peer has its bit set in the *persisted* bitmap, or
//! is written by a WAL record with LSN > the *persisted* `peer_written_lsn`
//! that is still in the WAL. Recovery re-marks the records above
//! `peer_written_lsn` it finds (also in the retained segments older than
//! the replay start). Hence:
//!
//! - a checkpoint persists the dirty bitmap pages (written in place, then
//!   one fdatasync of `meta`) *before* its superblock write, and
//! - before the checkpoint drops a WAL segment, the ring entries of the
//!   records in it are moved into the bitmap, which is persisted before the
//!   segment is deleted ("mark before drop"); when tracking, their bits are
//!   already set.
//!
//! `bitmap_base_lsn`: the bitmap covers every block written by a record
//! with LSN > it. Tracking starts at the peer's written LSN, so that is the
//! base then; at open the base is the persisted `peer_written_lsn` (recovery
//! re-marked every record above it).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;

use super::bitmap::DirtyBitmap;
use super::meta::FLAG_FOREIGN_MARKS;
use super::segment::parking;
use super::{FailStop, Lsn, Shared, Volume, VolumeError};

/// Most entries the unacked ring holds; older ones go to the bitmap.
pub const MAX_RING: usize = 1 << 20;

/// A committed record the peer has not acknowledged as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Unacked {
    lsn: Lsn,
    offset: u64,
    len: u64,
}

/// The tracking state, behind one mutex (the writer takes it once per batch).
#[derive(Debug)]
pub(crate) struct Tracker {
    pub bitmap: DirtyBitmap,
    pub tracking: bool,
    ring: VecDeque<Unacked>,
    pub peer_written: Lsn,
    pub base_lsn: Lsn,
    /// The bitmap may hold bits that no record of this node's log explains
    /// (a peer's bitmap merged, a verify difference, a full sync or
    /// invalidate): a log catch-up cannot stand in for them. Cleared when
    /// the bitmap empties; persisted as the superblock's `FOREIGN_MARKS`.
    pub foreign: bool,
    /// Counts the bits set other than by a tracked record (ring spills,
    /// foreign marks): a log catch-up clears the bitmap at its end only if
    /// nothing was set this way while it ran.
    pub marks: u64,
}

impl Tracker {
    pub fn new(bitmap: DirtyBitmap, peer_written: Lsn, base_lsn: Lsn) -> Tracker {
        Tracker { bitmap, tracking: true, ring: VecDeque::new(), peer_written, base_lsn, foreign: false, marks: 0 }
    }

    /// Bits that no record of this node's log explains (see `foreign`).
    pub fn mark_foreign(&mut self, offset: u64, len: u64) {
        self.bitmap.set_range(offset, len);
        self.noted_foreign();
    }

    /// Foreign bits were just set (see `foreign` and `marks`).
    fn noted_foreign(&mut self) {
        self.foreign = true;
        self.marks += 1;
    }

    /// Clears the bits fully inside the range; an empty bitmap holds no
    /// foreign bits any more.
    pub fn clear_range(&mut self, offset: u64, len: u64) {
        self.bitmap.clear_range(offset, len);
        if self.foreign && self.bitmap.dirty_bytes() == 0 {
            self.foreign = false;
        }
    }

    /// A committed local record (the writer, in LSN order).
    pub fn record(&mut self, lsn: Lsn, offset: u64, len: u64) {
        if self.tracking {
            self.bitmap.set_range(offset, len);
            return;
        }
        if self.ring.len() >= MAX_RING
            && let Some(old) = self.ring.pop_front()
        {
            self.bitmap.set_range(old.offset, old.len);
            self.marks += 1;
        }
        self.ring.push_back(Unacked { lsn, offset, len });
    }

    /// Moves the ring entries with LSN <= `lsn` into the bitmap; returns
    /// how many.
    pub fn mark_ring_upto(&mut self, lsn: Lsn) -> usize {
        let mut n = 0;
        while let Some(e) = self.ring.front().copied().filter(|e| e.lsn <= lsn) {
            self.ring.pop_front();
            self.bitmap.set_range(e.offset, e.len);
            n += 1;
        }
        self.marks += n as u64;
        n
    }

    /// Records up to `lsn` were applied from the peer (a secondary): the
    /// peer wrote them, and they are not in the bitmap, so the base moves
    /// past them too.
    pub fn applied_from_peer(&mut self, lsn: Lsn) {
        self.set_peer_written(lsn);
        self.base_lsn = self.base_lsn.max(lsn);
    }

    pub fn set_peer_written(&mut self, lsn: Lsn) {
        self.peer_written = self.peer_written.max(lsn);
        while self.ring.front().is_some_and(|e| e.lsn <= self.peer_written) {
            self.ring.pop_front();
        }
    }

    /// Tracking on: the ring's records are marked, the bitmap covers
    /// everything above the peer's written LSN. Off: ring mode.
    pub fn set_tracking(&mut self, on: bool) {
        if on && !self.tracking {
            self.mark_ring_upto(Lsn::MAX);
            self.base_lsn = self.peer_written;
        }
        self.tracking = on;
    }

    pub fn ring_len(&self) -> usize {
        self.ring.len()
    }

    /// Log rebase (this node becomes a full-sync target at `last`): the
    /// old log's records are gone, the peer has everything up to `last`.
    pub fn rebase(&mut self, last: Lsn) {
        self.ring.clear();
        self.peer_written = last;
        self.base_lsn = last;
    }
}

/// Writes the dirty bitmap pages and fdatasyncs `meta`. Serialised (two
/// concurrent persists could write an older copy of a page last). A
/// failure stops the volume: the bitmap on disk is then unknown.
pub(crate) fn persist(s: &Shared) -> Result<(), VolumeError> {
    let _serial = parking::lock(&s.bitmap_io);
    if let Some(r) = s.failure() {
        return Err(VolumeError::Stopped(r));
    }
    let path = parking::lock(&s.meta).path().to_path_buf();
    let stop = |e: VolumeError| {
        VolumeError::Stopped(s.fail(FailStop::volume(format!("bitmap write to {}", path.display()), &e)))
    };
    // Batches: the tracker's lock is held only to encode one (the writer
    // takes it once per batch of records), the meta lock only to write it.
    let (mut n, mut from) = (0, 0);
    loop {
        let pages = parking::lock(&s.tracker).bitmap.take_dirty_pages(s.uuid, from, super::meta::PAGES_PER_IO);
        let Some(last) = pages.last() else { break };
        from = last.0 + 1;
        n += pages.len();
        parking::lock(&s.meta).write_bitmap_pages(&*s.io, &pages).map_err(stop)?;
        super::VolumeCounters::add(&s.counters.bitmap_writes, pages.len() as u64);
    }
    if n > 0 {
        parking::lock(&s.meta).sync(&*s.io).map_err(stop)?;
        tracing::debug!(pages = n, path = %path.display(), "bitmap pages persisted");
    }
    // Foreign bits on disk are flagged on disk (cleared only by a checkpoint,
    // once the bitmap is empty): a crash must not make them look as if the
    // WAL explained them.
    if parking::lock(&s.tracker).foreign {
        let mut meta = parking::lock(&s.meta);
        if meta.current().flags & FLAG_FOREIGN_MARKS == 0 {
            let mut sb = meta.current().clone();
            sb.flags |= FLAG_FOREIGN_MARKS;
            meta.write(&*s.io, sb).map_err(stop)?;
        }
    }
    Ok(())
}

impl Volume {
    /// Bytes per bitmap bit (fixed at create-md).
    pub fn bitmap_granularity(&self) -> u32 {
        parking::lock(&self.shared.tracker).bitmap.granularity()
    }

    /// Bytes of the volume whose bits are set (may differ from the peer).
    pub fn dirty_bytes(&self) -> u64 {
        parking::lock(&self.shared.tracker).bitmap.dirty_bytes()
    }

    /// Whether every committed write sets its bits (true at open). Off:
    /// committed writes go to the unacked ring until the peer acknowledges
    /// them (`set_peer_written`). Turning it on marks the ring's records
    /// (as `mark_unacked`) and makes the peer's written LSN the bitmap base.
    pub fn set_tracking(&self, on: bool) {
        let mut t = parking::lock(&self.shared.tracker);
        let was = t.tracking;
        t.set_tracking(on);
        if was != on {
            tracing::info!(tracking = on, peer_written_lsn = t.peer_written, "out-of-sync tracking changed");
        }
    }

    pub fn tracking(&self) -> bool {
        parking::lock(&self.shared.tracker).tracking
    }

    /// The peer has written every record <= `lsn` (monotone: a lower value
    /// is ignored; clamped to the local LSN, the peer cannot have more).
    /// Prunes the unacked ring; persisted at checkpoints and at close.
    pub fn set_peer_written(&self, lsn: Lsn) {
        let mut t = parking::lock(&self.shared.tracker);
        // Read under the lock: the writer publishes LSNs after recording them.
        let local = self.shared.applied_lsn.load(Ordering::Acquire);
        t.set_peer_written(lsn.min(local));
    }

    /// The peer's written LSN as this node knows it.
    pub fn peer_written_lsn(&self) -> Lsn {
        parking::lock(&self.shared.tracker).peer_written
    }

    /// The link was lost: sets the bits of every record the peer had not
    /// acknowledged as written, and turns tracking on. No IO: those records
    /// are above the persisted `peer_written_lsn` and in the WAL, so a crash
    /// before the next checkpoint re-marks them.
    pub fn mark_unacked(&self) -> Result<(), VolumeError> {
        let mut t = parking::lock(&self.shared.tracker);
        let n = t.ring_len();
        t.set_tracking(true);
        tracing::info!(records = n, dirty_bytes = t.bitmap.dirty_bytes(), "unacknowledged records marked out of sync");
        Ok(())
    }

    /// Sets every bit (full sync, invalidate) and persists the bitmap
    /// (blocks on IO: call it from a blocking context).
    pub fn mark_all(&self) -> Result<(), VolumeError> {
        {
            let mut t = parking::lock(&self.shared.tracker);
            t.bitmap.set_all();
            t.noted_foreign();
        }
        self.persist_bitmap()
    }

    /// Sets the bits of every block `[offset, offset+len)` touches (verify
    /// found a difference). Persisted at the next checkpoint.
    pub fn mark_range(&self, offset: u64, len: u64) {
        parking::lock(&self.shared.tracker).mark_foreign(offset, len);
    }

    /// Whether the bitmap may hold bits that no record of this node's log
    /// explains (a peer's bitmap merged, a verify difference, a full sync,
    /// invalidate). A log catch-up replays records only, so the source
    /// resyncs from the bitmap instead while this holds.
    pub fn has_foreign_marks(&self) -> bool {
        parking::lock(&self.shared.tracker).foreign
    }

    /// Grows whenever a bit is set other than by a tracked record (a ring
    /// spill, a foreign mark): equal before and after means no such bit
    /// was set in between.
    pub fn mark_count(&self) -> u64 {
        parking::lock(&self.shared.tracker).marks
    }

    /// Clears the bits of the blocks `[offset, offset+len)` covers entirely
    /// (the range is in sync with the peer and durable on both sides).
    /// Persisted at the next checkpoint; until then a crash keeps them set.
    pub fn clear_range(&self, offset: u64, len: u64) {
        parking::lock(&self.shared.tracker).clear_range(offset, len);
    }

    /// The next run of set bits at or after the block holding `from`, at
    /// most `max_len` bytes (at least one block): `(offset, len)`.
    pub fn dirty_runs(&self, from: u64, max_len: u64) -> Option<(u64, u64)> {
        parking::lock(&self.shared.tracker).bitmap.next_run(from, max_len)
    }

    /// A copy of the bitmap's words (block `b` = bit `b % 64` of word `b / 64`).
    pub fn bitmap_words(&self) -> Vec<u64> {
        parking::lock(&self.shared.tracker).bitmap.words().to_vec()
    }

    /// ORs the peer's bits into the bitmap from word `first`. Refuses
    /// words past the bitmap. Call `persist_bitmap` before relying on them.
    pub fn merge_bitmap_words(&self, first: u64, words: &[u64]) -> Result<(), VolumeError> {
        let mut t = parking::lock(&self.shared.tracker);
        t.bitmap.merge(first, words).map_err(|reason| VolumeError::Invalid { what: "peer bitmap".into(), reason })?;
        // Even bits this node had set already: the peer's copy of such a
        // block differs in ways no record of ours may cover.
        if words.iter().any(|w| *w != 0) {
            t.noted_foreign();
        }
        Ok(())
    }

    /// Writes the changed bitmap pages and fdatasyncs them (blocks on IO).
    pub fn persist_bitmap(&self) -> Result<(), VolumeError> {
        self.check_open()?;
        persist(&self.shared)
    }

    /// The bitmap covers every block written by a record with LSN > it.
    pub fn bitmap_base_lsn(&self) -> Lsn {
        parking::lock(&self.shared.tracker).base_lsn
    }

    /// Sets the bitmap base (e.g. a sync target that cleared its bits at
    /// the end of a resync: its bitmap covers everything after `lsn`).
    /// Persisted at the next checkpoint.
    pub fn set_bitmap_base_lsn(&self, lsn: Lsn) {
        parking::lock(&self.shared.tracker).base_lsn = lsn;
    }

    /// Records in the unacked ring (for tests and status).
    pub fn unacked_records(&self) -> usize {
        parking::lock(&self.shared.tracker).ring_len()
    }

    /// WAL bytes kept for a peer beyond the checkpoint (`wal_retain`);
    /// applies from the next checkpoint.
    pub fn set_wal_retain(&self, bytes: u64) {
        self.shared.wal_retain.store(bytes, Ordering::Release);
    }
}

#[cfg(test)]
#[path = "tracking_tests.rs"]
mod volume_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_prunes_marks_and_caps() {
        let bm = DirtyBitmap::new(1 << 30, 4096).unwrap();
        let mut t = Tracker::new(bm, 0, 0);
        t.record(1, 0, 4096);
        assert_eq!((t.bitmap.count(), t.ring_len()), (1, 0), "tracking at start");
        t.set_tracking(false);
        for lsn in 2..=10 {
            t.record(lsn, lsn * 4096, 4096);
        }
        assert_eq!((t.bitmap.count(), t.ring_len()), (1, 9));
        t.set_peer_written(5);
        assert_eq!(t.ring_len(), 5, "records 6..=10 are left");
        t.set_peer_written(3);
        assert_eq!(t.peer_written, 5, "monotone");
        assert_eq!(t.mark_ring_upto(7), 2);
        assert!(t.bitmap.get(6) && t.bitmap.get(7) && !t.bitmap.get(8));
        t.set_tracking(true);
        assert_eq!(t.ring_len(), 0);
        assert_eq!(t.bitmap.count(), 1 + 5);
        assert_eq!(t.base_lsn, 5);
        // The cap moves the oldest entries into the bitmap.
        t.set_tracking(false);
        for i in 0..(MAX_RING as u64 + 3) {
            t.record(100 + i, (i % 1000) * 4096 + (1 << 29), 1);
        }
        assert_eq!(t.ring_len(), MAX_RING);
        assert_eq!(t.bitmap.count(), 6 + 3);
    }
}
