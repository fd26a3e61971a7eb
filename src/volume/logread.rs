//! Reading the retained WAL back for log catch-up (design.md §5).
//!
//! [`Volume::log_reader`] returns a [`LogReader`]: an iterator over the
//! records `from ..= to` as `(lsn, FeedOp, fua)`, read from the live WAL
//! segments in LSN order. The reads are blocking file reads through a
//! window of at most 4 MiB (plus one record): drive the iterator inside
//! `tokio::task::spawn_blocking` (it is `Send`), or take batches with
//! [`LogReader::next_batch`] and move the reader in and out of the blocking
//! task.
//!
//! The WAL does not record which writes were FUA: `fua` is always false,
//! and the sender ends a catch-up with a flush barrier.
//!
//! A record the WAL cannot give back is [`VolumeError::NotInLog`] naming
//! its LSN: a `WriteInPlace` record (its data went to the data file only),
//! an LSN older than the oldest retained record, or a gap (a segment
//! recycled while being read, a rebased log). The caller falls back to a
//! bitmap or full resync. Reading is safe against concurrent recycling:
//! records are bound to their segment's sequence number by their CRC, so a
//! recycled file's new content never decodes as the old records.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;

use super::feed::FeedOp;
use super::recovery::SegmentReader;
use super::segment::parking;
use super::wal::{FLAG_MAY_PUNCH, RecordKind, SEGMENT_HEADER_SIZE};
use super::{Lsn, Volume, VolumeError};
use crate::io::{IoEngine, IoFile};

/// Reads records `from ..= to` from the retained WAL (see the module docs).
pub struct LogReader {
    io: Arc<dyn IoEngine>,
    uuid: u128,
    /// Live segments at creation: (seq, first LSN, file), ascending.
    segs: Vec<(u64, Lsn, Arc<IoFile>)>,
    /// Index in `segs` of the segment being read.
    idx: usize,
    cur: Option<Cursor>,
    /// Next LSN to yield.
    next: Lsn,
    to: Lsn,
    /// The LSN the next segment must start at (after a segment ended).
    carry: Option<Lsn>,
    failed: bool,
}

/// Position in the segment being read.
struct Cursor {
    reader: SegmentReader,
    seq: u64,
    pos: u64,
    /// LSN of the record at `pos`.
    lsn: Lsn,
}

impl std::fmt::Debug for LogReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogReader").field("next", &self.next).field("to", &self.to).finish_non_exhaustive()
    }
}

impl LogReader {
    /// The next LSN the reader yields.
    pub fn next_lsn(&self) -> Lsn {
        self.next
    }

    /// Up to `max_records` records or about `max_bytes` of write payload
    /// (at least one record), blocking. Empty at the end.
    pub fn next_batch(
        &mut self,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<(Lsn, FeedOp, bool)>, VolumeError> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        while out.len() < max_records.max(1) && bytes < max_bytes.max(1) {
            match self.next() {
                None => break,
                Some(Err(e)) => return Err(e),
                Some(Ok(item)) => {
                    if let FeedOp::Write { data, .. } = &item.1 {
                        bytes += data.len();
                    }
                    out.push(item);
                }
            }
        }
        Ok(out)
    }

    fn gap(&self, reason: String) -> VolumeError {
        VolumeError::NotInLog { lsn: self.next, reason }
    }

    /// Opens `segs[idx]`, which must continue the log at `expect`.
    fn open_segment(&mut self, expect: Lsn) -> Result<Cursor, VolumeError> {
        let Some((seq, first, file)) = self.segs.get(self.idx).cloned() else {
            return Err(self.gap(format!("the retained WAL ends before LSN {expect}")));
        };
        let mut reader = SegmentReader::from_file(&*self.io, file)?;
        let header = match reader.header(&*self.io)? {
            Ok(h) if h.uuid == self.uuid && h.seq == seq && h.first_lsn == first => h,
            Ok(h) => {
                return Err(self.gap(format!(
                    "WAL segment {} was recycled (header seq {}, first LSN {})",
                    reader.path().display(),
                    h.seq,
                    h.first_lsn
                )));
            }
            Err(e) => {
                return Err(self.gap(format!("WAL segment {} header: {e}", reader.path().display())));
            }
        };
        if header.first_lsn > expect {
            return Err(self.gap(format!(
                "the log has a gap: segment {} starts at LSN {}, LSN {expect} was expected",
                reader.path().display(),
                header.first_lsn
            )));
        }
        Ok(Cursor { reader, seq, pos: SEGMENT_HEADER_SIZE, lsn: header.first_lsn })
    }

    fn step(&mut self) -> Result<Option<(Lsn, FeedOp, bool)>, VolumeError> {
        loop {
            if self.next > self.to {
                return Ok(None);
            }
            let mut cur = match self.cur.take() {
                Some(c) => c,
                None => {
                    let expect = self.carry.take().unwrap_or(self.next);
                    self.open_segment(expect)?
                }
            };
            let rec = cur.reader.record(&*self.io, cur.pos, self.uuid, cur.seq)?;
            let rec = match rec {
                Ok(r) if r.header.lsn == cur.lsn => r,
                _ => {
                    // The segment ends here; the log continues in the next
                    // one, which must start at `cur.lsn`.
                    let expect = cur.lsn;
                    self.idx += 1;
                    if self.segs.get(self.idx).is_some_and(|s| s.1 != expect) {
                        return Err(self.gap(format!(
                            "the log has a gap: segment {} ends before LSN {expect}, the next one starts at LSN {}",
                            cur.reader.path().display(),
                            self.segs[self.idx].1
                        )));
                    }
                    self.carry = Some(expect);
                    continue;
                }
            };
            let h = rec.header;
            let op = if h.lsn < self.next {
                None
            } else {
                match h.kind {
                    RecordKind::Write => {
                        Some(FeedOp::Write { offset: h.offset, data: Bytes::copy_from_slice(rec.payload) })
                    }
                    RecordKind::Trim => Some(FeedOp::Trim { offset: h.offset, len: h.length }),
                    RecordKind::WriteZeroes => {
                        Some(FeedOp::Zeroes { offset: h.offset, len: h.length, punch: h.flags & FLAG_MAY_PUNCH != 0 })
                    }
                    RecordKind::FlushBarrier => None,
                    RecordKind::WriteInPlace => {
                        return Err(self.gap(format!(
                            "LSN {} is an in-place write of [{}, +{}): its data is in the data file only",
                            h.lsn, h.offset, h.length
                        )));
                    }
                }
            };
            cur.pos += rec.encoded_len() as u64;
            cur.lsn += 1;
            self.cur = Some(cur);
            if h.lsn >= self.next {
                self.next = h.lsn + 1;
                if let Some(op) = op {
                    return Ok(Some((h.lsn, op, false)));
                }
            }
        }
    }
}

impl Iterator for LogReader {
    type Item = Result<(Lsn, FeedOp, bool), VolumeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        match self.step() {
            Ok(Some(item)) => Some(Ok(item)),
            Ok(None) => None,
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

impl Volume {
    /// The oldest LSN still in the WAL (log catch-up is possible from
    /// there); `local_lsn + 1` when the WAL holds no record.
    pub fn log_first_lsn(&self) -> Lsn {
        let files = parking::lock(&self.shared.wal);
        let applied = self.shared.applied_lsn.load(Ordering::Acquire);
        files.live.front().map_or(applied + 1, |s| s.first_lsn.min(applied + 1))
    }

    /// A reader of the records `from ..= to` (`to <= local_lsn`; `from >
    /// to` reads nothing) from the retained WAL. Errors with `NotInLog` when
    /// `from` is older than [`Volume::log_first_lsn`]; later problems come
    /// from the iterator.
    pub fn log_reader(&self, from: Lsn, to: Lsn) -> Result<LogReader, VolumeError> {
        self.check_open()?;
        let s = &self.shared;
        let applied = s.applied_lsn.load(Ordering::Acquire);
        if from == 0 || to > applied {
            return Err(VolumeError::Invalid {
                what: "log read range".into(),
                reason: format!("LSNs {from} to {to}; expected 1 <= from and to <= the local LSN {applied}"),
            });
        }
        let segs: Vec<_> = parking::lock(&s.wal).live.iter().map(|l| (l.seq, l.first_lsn, l.file.clone())).collect();
        let first = segs.first().map_or(applied + 1, |x| x.1);
        if from <= to && from < first {
            return Err(VolumeError::NotInLog { lsn: from, reason: format!("the retained WAL starts at LSN {first}") });
        }
        // The last segment starting at or before `from`.
        let idx = segs.iter().rposition(|x| x.1 <= from).unwrap_or(0);
        Ok(LogReader {
            io: s.io.clone(),
            uuid: s.uuid,
            segs,
            idx,
            cur: None,
            next: from,
            to,
            carry: None,
            failed: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;

    use crate::io::sync::SyncEngine;
    use crate::volume::tests::{create, identity, small_opts};
    use crate::volume::*;

    const MIB: u64 = 1 << 20;

    fn data(seed: u64, len: usize) -> Bytes {
        Bytes::from((0..len).map(|i| (i as u64 * 31 + seed) as u8).collect::<Vec<u8>>())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_back_exactly_the_records_across_segments_and_checkpoints() {
        let d = tempfile::tempdir().unwrap();
        let size = 16 * MIB;
        let mut opts = small_opts(d.path());
        opts.wal_segment_size = 64 << 10;
        create(&SyncEngine::new(), &opts, size);
        let v = Volume::open(Arc::new(SyncEngine::new()), opts, &identity(size)).unwrap();
        assert_eq!(v.log_first_lsn(), 1, "an empty log: local LSN + 1");
        v.set_retain_after(Some(0));
        let mut want = Vec::new();
        for i in 0..30u64 {
            let op = match i % 3 {
                0 => FeedOp::Write { offset: i * 32768, data: data(i, 24576) },
                1 => FeedOp::Trim { offset: i * 32768, len: 4096 },
                _ => FeedOp::Zeroes { offset: i * 32768, len: 512, punch: i % 2 == 0 },
            };
            let lsn = match &op {
                FeedOp::Write { offset, data } => v.write(*offset, data.clone(), false).await,
                FeedOp::Trim { offset, len } => v.trim(*offset, *len, false).await,
                FeedOp::Zeroes { offset, len, punch } => v.write_zeroes(*offset, *len, *punch, false).await,
            }
            .unwrap();
            want.push((lsn, op, false));
            if i == 15 {
                v.finish_sync().await.unwrap(); // a checkpoint: held segments stay
            }
        }
        assert!(v.status().wal_bytes >= 4 * (64 << 10), "the records span several segments");
        let all: Vec<_> = v.log_reader(1, 30).unwrap().collect::<Result<_, _>>().unwrap();
        assert_eq!(all, want);
        let mid: Vec<_> = v.log_reader(7, 19).unwrap().collect::<Result<_, _>>().unwrap();
        assert_eq!(mid, want[6..19].to_vec());
        assert_eq!(v.log_reader(31, 30).unwrap().count(), 0, "from > to reads nothing");
        assert!(matches!(v.log_reader(1, 31), Err(VolumeError::Invalid { .. })));
        assert!(matches!(v.log_reader(0, 3), Err(VolumeError::Invalid { .. })));

        // From async code: batches inside spawn_blocking.
        let mut reader = v.log_reader(2, 30).unwrap();
        let mut got = Vec::new();
        loop {
            let (r, batch) = tokio::task::spawn_blocking(move || {
                let b = reader.next_batch(4, 1 << 20);
                (reader, b)
            })
            .await
            .unwrap();
            reader = r;
            let batch = batch.unwrap();
            if batch.is_empty() {
                break;
            }
            assert!(batch.len() <= 4);
            got.extend(batch);
        }
        assert_eq!(got, want[1..].to_vec());

        // Without the hold a checkpoint drops the old segments.
        v.set_retain_after(None);
        v.finish_sync().await.unwrap();
        let first = v.log_first_lsn();
        assert!(first > 1 && first <= 31, "{first}");
        let err = v.log_reader(1, 30).unwrap_err();
        assert!(matches!(err, VolumeError::NotInLog { lsn: 1, .. }), "{err:?}");
        if first <= 30 {
            let tail: Vec<_> = v.log_reader(first, 30).unwrap().collect::<Result<_, _>>().unwrap();
            assert_eq!(tail, want[(first - 1) as usize..].to_vec());
        }
        v.close().await.unwrap();
    }

    #[tokio::test]
    async fn an_in_place_record_is_an_error_naming_its_lsn() {
        let d = tempfile::tempdir().unwrap();
        let size = 16 * MIB;
        let opts = small_opts(d.path());
        create(&SyncEngine::new(), &opts, size);
        let v = Volume::open(Arc::new(SyncEngine::new()), opts, &identity(size)).unwrap();
        v.write(0, data(1, 4096), false).await.unwrap();
        let big = v.write(MIB, data(2, 128 << 10), false).await.unwrap(); // in place
        v.write(0, data(3, 4096), false).await.unwrap();
        let mut r = v.log_reader(1, 3).unwrap();
        assert_eq!(r.next().unwrap().unwrap(), (1, FeedOp::Write { offset: 0, data: data(1, 4096) }, false));
        let err = r.next().unwrap().unwrap_err();
        assert!(matches!(err, VolumeError::NotInLog { lsn, .. } if lsn == big), "{err:?}");
        assert!(err.to_string().contains("in-place"), "{err}");
        assert!(r.next().is_none(), "the reader stops after an error");
        let rest: Vec<_> = v.log_reader(3, 3).unwrap().collect::<Result<_, _>>().unwrap();
        assert_eq!(rest, vec![(3, FeedOp::Write { offset: 0, data: data(3, 4096) }, false)]);
        v.close().await.unwrap();
    }
}
