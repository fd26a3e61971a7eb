//! Crash recovery: replay the WAL from the last checkpoint into the data
//! file, tell a torn tail from corruption.
//!
//! The log is read from the superblock's `replay_seq` segment, record by
//! record, checking LSN continuity (within a segment, and across segments by
//! the next segment header's `first_lsn`). Records above the checkpoint LSN
//! are applied to the data file in LSN order.
//!
//! When the record expected at LSN `L` is bad (CRC, magic, layout, or not
//! LSN `L`) and the log does not continue in the next segment, recovery
//! looks for *later valid records of the same log*: the rest of the segment
//! at every 8-byte step, and every later segment. If one of them carries
//! `durable_lsn >= L`, record `L` had been made durable by an fdatasync and
//! is now damaged: recovery refuses to start, naming the file, the offset
//! and the LSNs. Otherwise the bad bytes are an unsynced torn tail (a page
//! cache may persist a later unsynced page and lose an earlier one, so a
//! valid record after a bad one is not proof of corruption on its own): the
//! log ends at `L - 1`.
//!
//! Out-of-sync marking: every valid local record (not applied from the
//! peer: `FLAG_FROM_PEER`) with LSN above the persisted
//! `peer_written_lsn` sets its blocks' bits (`Marks`), both in the log
//! read from `replay_seq` and in the retained segments older than it (kept
//! for a peer; they are fully synced, read until their first invalid
//! record). See `tracking.rs` for why this keeps the bitmap crash-safe.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::wal::{self, Record, RecordKind, SEGMENT_HEADER_SIZE, SegmentHeader};
use super::writer::RangeSet;
use super::{Lsn, VolumeError};
use crate::io::{IoEngine, IoFile, IoOp, OpenMode};

/// What recovery found and did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RecoveryReport {
    /// Checkpoint LSN recovery started from.
    pub checkpoint_lsn: Lsn,
    /// Records applied to the data file.
    pub replayed: u64,
    /// Last LSN of the recovered log (= `checkpoint_lsn` when nothing was
    /// replayed).
    pub last_lsn: Lsn,
    /// Segment files read.
    pub segments_read: u64,
    /// Where the log ended: the first bytes that are not the next record
    /// (stale bytes of a recycled file, zeroes, or an unsynced torn tail).
    /// `None` when the segment to read next does not exist.
    pub end: Option<LogEnd>,
    /// Highest segment sequence number present in `wal/`.
    pub max_seq: u64,
    /// Records whose blocks were marked out of sync (local records with an
    /// LSN above the persisted peer written LSN).
    pub marked: u64,
    /// Highest LSN of a replicated record (applied from the peer) found:
    /// the peer has written every record up to it.
    pub from_peer_lsn: Lsn,
}

/// Where recovery marks the records a peer may not have.
pub(crate) struct Marks<'a> {
    pub bitmap: &'a mut super::bitmap::DirtyBitmap,
    /// Records with a higher LSN are marked.
    pub after: Lsn,
}

impl Marks<'_> {
    /// Notes a record; local ones past `after` are candidates, marked by
    /// [`Marks::finish`] once the whole log was read.
    fn record(&mut self, h: &wal::RecordHeader, report: &mut RecoveryReport, local: &mut Vec<(Lsn, u64, u32)>) {
        if h.flags & wal::FLAG_FROM_PEER != 0 {
            report.from_peer_lsn = report.from_peer_lsn.max(h.lsn);
            return;
        }
        if h.lsn > self.after && h.kind != RecordKind::FlushBarrier {
            local.push((h.lsn, h.offset, h.length));
        }
    }

    /// Marks the local records the peer may lack: those past `after` and
    /// past the last record received *from* the peer. A node receives the
    /// peer's record `n` only when its own log up to `n - 1` is a prefix of
    /// the peer's (a live stream or a log catch-up starts at its LSN; a
    /// bitmap resync rebases its log first and merged its bits into the
    /// source's), so its own older records are the peer's too (without this
    /// rule a crashed secondary that had once been primary re-marked its
    /// whole WAL footprint and resynced up to 63 MB of 64 for nothing).
    fn finish(&mut self, report: &mut RecoveryReport, local: Vec<(Lsn, u64, u32)>) {
        for (lsn, offset, length) in local {
            if lsn > report.from_peer_lsn {
                self.bitmap.set_range(offset, u64::from(length));
                report.marked += 1;
            }
        }
    }
}

/// The first bytes after the end of the recovered log.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LogEnd {
    pub path: PathBuf,
    pub offset: u64,
    /// The LSN that was expected there.
    pub lsn: Lsn,
    pub reason: String,
}

/// Inputs of [`recover`].
pub(crate) struct RecoverArgs<'a> {
    pub io: &'a dyn IoEngine,
    pub wal_dir: &'a Path,
    pub segments: &'a BTreeMap<u64, PathBuf>,
    pub data: &'a IoFile,
    pub uuid: u128,
    pub size: u64,
    pub checkpoint_lsn: Lsn,
    pub replay_seq: u64,
}

/// Bytes of a segment read at once; records larger than this get a window
/// of their own size. Tiny in unit tests, so that every recovery test
/// crosses window boundaries.
const WINDOW: usize = if cfg!(test) { 4 << 10 } else { 4 << 20 };

/// Reads a segment file through a window, so that recovery (and the log
/// reader) never holds a whole segment in memory.
pub(crate) struct SegmentReader {
    file: std::sync::Arc<IoFile>,
    len: u64,
    buf: Vec<u8>,
    /// File offset of `buf[0]`.
    start: u64,
}

impl SegmentReader {
    pub(crate) fn open(io: &dyn IoEngine, path: &Path) -> Result<SegmentReader, VolumeError> {
        let file = io.open(path, OpenMode::READ).map_err(|e| VolumeError::io(path, e))?;
        SegmentReader::from_file(io, std::sync::Arc::new(file))
    }

    /// A reader of an open segment file (a live segment of the writer).
    pub(crate) fn from_file(io: &dyn IoEngine, file: std::sync::Arc<IoFile>) -> Result<SegmentReader, VolumeError> {
        let len = io.len(&file).map_err(|e| VolumeError::io(file.path(), e))?;
        Ok(SegmentReader { file, len, buf: Vec::new(), start: 0 })
    }

    pub(crate) fn path(&self) -> &Path {
        self.file.path()
    }

    /// `[off, off+n)`, clipped to the end of the file.
    fn bytes(&mut self, io: &dyn IoEngine, off: u64, n: usize) -> Result<&[u8], VolumeError> {
        let end = off.saturating_add(n as u64).min(self.len);
        if off >= end {
            return Ok(&[]);
        }
        if off < self.start || end > self.start + self.buf.len() as u64 {
            let want = ((end - off) as usize).max(WINDOW).min((self.len - off) as usize);
            self.buf.resize(want, 0);
            io.read_exact_at(&self.file, &mut self.buf, off).map_err(|e| VolumeError::io(self.file.path(), e))?;
            self.start = off;
        }
        let s = (off - self.start) as usize;
        Ok(&self.buf[s..s + (end - off) as usize])
    }

    /// Decodes the record at `off` (segment `seq`).
    pub(crate) fn record(
        &mut self,
        io: &dyn IoEngine,
        off: u64,
        uuid: u128,
        seq: u64,
    ) -> Result<Result<Record<'_>, wal::DecodeError>, VolumeError> {
        let head = self.bytes(io, off, wal::RECORD_HEADER_SIZE)?;
        if head.len() < wal::RECORD_HEADER_SIZE {
            return Ok(Err(wal::DecodeError::Short));
        }
        // The decoder validates everything; this only sizes the read. The
        // writer never makes a larger record: do not read megabytes for a
        // garbage length.
        let payload_len = u32::from_le_bytes([head[28], head[29], head[30], head[31]]) as usize;
        if payload_len > super::MAX_RECORD_PAYLOAD {
            return Ok(Err(wal::DecodeError::BadLayout));
        }
        let whole = self.bytes(io, off, wal::RECORD_HEADER_SIZE.saturating_add(payload_len))?;
        Ok(wal::decode_record(whole, uuid, seq))
    }

    /// The segment header, if it decodes.
    pub(crate) fn header(&mut self, io: &dyn IoEngine) -> Result<Result<SegmentHeader, wal::DecodeError>, VolumeError> {
        Ok(SegmentHeader::decode(self.bytes(io, 0, 64)?))
    }
}

/// Applies records to the data file in batches of non-overlapping ranges
/// (the engine may reorder the operations of one batch).
struct Applier<'d> {
    io: &'d dyn IoEngine,
    data: &'d IoFile,
}

enum Apply {
    Write { offset: u64, buf: Vec<u8> },
    Zero { offset: u64, len: u64, punch: bool },
}

/// Records are applied once this many payload bytes are pending.
const APPLY_BYTES: usize = if cfg!(test) { 16 << 10 } else { 4 << 20 };

impl<'d> Applier<'d> {
    fn apply_all(&self, ops: &[Apply]) -> Result<(), VolumeError> {
        const MAX_OPS: usize = 256;
        let mut ranges = RangeSet::default();
        let mut start = 0;
        for (i, op) in ops.iter().enumerate() {
            let (off, len) = match op {
                Apply::Write { offset, buf } => (*offset, buf.len() as u64),
                Apply::Zero { offset, len, .. } => (*offset, *len),
            };
            if i - start >= MAX_OPS || !ranges.insert_if_disjoint(off, off + len) {
                self.submit(&ops[start..i])?;
                start = i;
                ranges.clear();
                ranges.insert_if_disjoint(off, off + len);
            }
        }
        self.submit(&ops[start..])
    }

    fn submit(&self, ops: &[Apply]) -> Result<(), VolumeError> {
        if ops.is_empty() {
            return Ok(());
        }
        let mut io_ops: Vec<IoOp<'_>> = ops
            .iter()
            .map(|op| match op {
                Apply::Write { offset, buf } => IoOp::Write { file: self.data, offset: *offset, buf },
                Apply::Zero { offset, len, punch } => {
                    IoOp::Zero { file: self.data, offset: *offset, len: *len, punch: *punch }
                }
            })
            .collect();
        self.io.submit(&mut io_ops).map_err(|e| VolumeError::io(self.data.path(), e))
    }
}

/// A valid record of the log written after the bad one, claiming the bad
/// one was durable.
struct Witness {
    path: PathBuf,
    offset: u64,
    lsn: Lsn,
    durable_lsn: Lsn,
}

/// Scans segment `seq` from `from` at 8-byte steps for a valid record with
/// `durable_lsn >= lsn`.
fn scan_for_witness(
    io: &dyn IoEngine,
    r: &mut SegmentReader,
    uuid: u128,
    seq: u64,
    from: u64,
    lsn: Lsn,
) -> Result<Option<Witness>, VolumeError> {
    let magic = wal::RECORD_MAGIC.to_le_bytes();
    let mut off = from.next_multiple_of(wal::RECORD_ALIGN as u64);
    while off + wal::RECORD_HEADER_SIZE as u64 <= r.len {
        if r.bytes(io, off, 4)? == magic
            && let Ok(rec) = r.record(io, off, uuid, seq)?
            && rec.header.durable_lsn >= lsn
        {
            let (l, d) = (rec.header.lsn, rec.header.durable_lsn);
            return Ok(Some(Witness { path: r.path().to_path_buf(), offset: off, lsn: l, durable_lsn: d }));
        }
        off += wal::RECORD_ALIGN as u64;
    }
    Ok(None)
}

/// Replays the log into the data file. Refuses (with an error naming the
/// file and offset) when a durable record is damaged.
pub(crate) fn recover(a: &RecoverArgs<'_>, marks: &mut Marks<'_>) -> Result<RecoveryReport, VolumeError> {
    let ckpt = a.checkpoint_lsn;
    let applier = Applier { io: a.io, data: a.data };
    let mut report = RecoveryReport {
        checkpoint_lsn: ckpt,
        last_lsn: ckpt,
        max_seq: a.segments.keys().next_back().copied().unwrap_or(0),
        ..Default::default()
    };
    check_no_gap(a)?;
    let mut local = Vec::new();
    mark_retained(a, marks, &mut report, &mut local)?;
    // Expected LSN of the next record; known once the first header is read.
    let mut cursor: Option<Lsn> = None;
    let mut seq = a.replay_seq;
    // The next segment, opened to look ahead at its header.
    let mut next_reader: Option<SegmentReader> = None;

    loop {
        let expect = cursor.unwrap_or(ckpt + 1);
        let Some(path) = a.segments.get(&seq) else {
            // No such segment: the log ends here unless a later segment
            // holds a record that says `expect` was durable.
            let at = wal::segment_path(a.wal_dir, seq);
            end_of_log(a, &mut report, expect, &at, 0, seq, None, "segment file missing")?;
            break;
        };
        let mut reader = match next_reader.take() {
            Some(r) => r,
            None => SegmentReader::open(a.io, path)?,
        };
        report.segments_read += 1;
        let header = match reader.header(a.io)? {
            Err(e) => Err(format!("segment header: {e}")),
            Ok(h) if h.uuid != a.uuid => {
                Err(format!("segment header: volume uuid {:032x}, expected {:032x}", h.uuid, a.uuid))
            }
            Ok(h) if h.seq != seq => Err(format!("segment header: seq {}, expected {seq}", h.seq)),
            Ok(h) if cursor.is_none() && (h.first_lsn == 0 || h.first_lsn > expect) => {
                Err(format!("segment header: first LSN {} is past the checkpoint LSN {ckpt} + 1", h.first_lsn))
            }
            Ok(h) if cursor.is_some() && h.first_lsn != expect => {
                Err(format!("segment header: first LSN {}, expected {expect}", h.first_lsn))
            }
            Ok(h) => Ok(h),
        };
        let header = match header {
            Ok(h) => h,
            Err(reason) => {
                end_of_log(a, &mut report, expect, path, 0, seq, Some((&mut reader, SEGMENT_HEADER_SIZE)), &reason)?;
                break;
            }
        };

        let mut lsn = header.first_lsn;
        let mut pos = SEGMENT_HEADER_SIZE;
        let mut ops = Vec::new();
        let mut pending_bytes = 0usize;
        let bad_reason = loop {
            let rec = match reader.record(a.io, pos, a.uuid, seq)? {
                Ok(rec) => rec,
                Err(e) => break format!("record: {e}"),
            };
            if rec.header.lsn != lsn {
                break format!("record has LSN {}, expected {lsn}", rec.header.lsn);
            }
            check_range(&rec, a.size, path, pos)?;
            let (h, encoded_len) = (rec.header, rec.encoded_len());
            marks.record(&h, &mut report, &mut local);
            if lsn > ckpt {
                match h.kind {
                    RecordKind::Write => {
                        pending_bytes += rec.payload.len();
                        ops.push(Apply::Write { offset: h.offset, buf: rec.payload.to_vec() });
                    }
                    RecordKind::Trim => {
                        ops.push(Apply::Zero { offset: h.offset, len: u64::from(h.length), punch: true })
                    }
                    RecordKind::WriteZeroes => ops.push(Apply::Zero {
                        offset: h.offset,
                        len: u64::from(h.length),
                        punch: h.flags & wal::FLAG_MAY_PUNCH != 0,
                    }),
                    // The data went to the data file directly; nothing to redo.
                    RecordKind::FlushBarrier | RecordKind::WriteInPlace => {}
                }
                report.replayed += 1;
                report.last_lsn = lsn;
                if pending_bytes >= APPLY_BYTES {
                    applier.apply_all(&ops)?;
                    ops.clear();
                    pending_bytes = 0;
                }
            }
            lsn += 1;
            pos += encoded_len as u64;
        };
        applier.apply_all(&ops)?;
        drop(ops);
        cursor = Some(lsn);

        // Does the log continue in the next segment?
        if let Some(next_path) = a.segments.get(&(seq + 1)) {
            let mut nr = SegmentReader::open(a.io, next_path)?;
            let continues = matches!(nr.header(a.io)?,
                Ok(h) if h.uuid == a.uuid && h.seq == seq + 1 && h.first_lsn == lsn);
            if continues {
                next_reader = Some(nr);
                seq += 1;
                continue;
            }
        }
        end_of_log(a, &mut report, lsn, path, pos, seq, Some((&mut reader, pos + 8)), &bad_reason)?;
        break;
    }
    marks.finish(&mut report, local);
    Ok(report)
}

/// Refuses a hole in the segment sequence at or after `replay_seq`: a
/// segment is activated only after the one before it (and the directory
/// synced), and recycling removes segments from the front, so every
/// sequence number from `replay_seq` to the highest one present must have
/// its file. A missing one held records of the log; replaying around it
/// would serve stale data where flushed writes were.
///
/// (A missing `replay_seq` segment with nothing after it is legitimate: a
/// crash between the superblock write that starts a new log and the
/// activation of its first segment.)
fn check_no_gap(a: &RecoverArgs<'_>) -> Result<(), VolumeError> {
    let Some(&max_seq) = a.segments.keys().next_back() else { return Ok(()) };
    let Some(missing) = (a.replay_seq..max_seq).find(|seq| !a.segments.contains_key(seq)) else { return Ok(()) };
    let next = a.segments.range(missing..).next().map_or(max_seq, |(&s, _)| s);
    Err(VolumeError::WalCorrupt {
        path: wal::segment_path(a.wal_dir, missing),
        offset: 0,
        lsn: a.checkpoint_lsn + 1,
        reason: format!(
            "WAL segment file missing: the log after the checkpoint (LSN {}) runs from segment {} to {max_seq}, \
             segment {missing} is not there but {next} is; its records cannot be replayed (restore the file, or \
             recreate this node's metadata and resync it from its peer)",
            a.checkpoint_lsn, a.replay_seq
        ),
    })
}

/// Marks the records above `marks.after` in the segments older than
/// `replay_seq` (kept for a peer). They were synced by the checkpoint that
/// passed them; each is read from its header to its first invalid record.
/// A segment that is not of this volume or whose header is bad is skipped
/// (logged): it holds nothing recovery can trust.
fn mark_retained(
    a: &RecoverArgs<'_>,
    marks: &mut Marks<'_>,
    report: &mut RecoveryReport,
    local: &mut Vec<(Lsn, u64, u32)>,
) -> Result<(), VolumeError> {
    for (&seq, path) in a.segments.range(..a.replay_seq) {
        let mut r = SegmentReader::open(a.io, path)?;
        let header = match r.header(a.io)? {
            Ok(h) if h.uuid == a.uuid && h.seq == seq => h,
            Ok(_) => {
                tracing::warn!(path = %path.display(), seq, "retained WAL segment of another volume or seq, skipped");
                continue;
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), seq, error = %e, "retained WAL segment header invalid, skipped");
                continue;
            }
        };
        let (mut pos, mut lsn) = (SEGMENT_HEADER_SIZE, header.first_lsn);
        while let Ok(rec) = r.record(a.io, pos, a.uuid, seq)? {
            if rec.header.lsn != lsn {
                break;
            }
            let h = rec.header;
            pos += rec.encoded_len() as u64;
            let in_volume = u64::from(h.length).checked_add(h.offset).is_some_and(|e| e <= a.size);
            if in_volume {
                marks.record(&h, report, local);
            }
            lsn += 1;
        }
    }
    Ok(())
}

fn check_range(rec: &Record<'_>, size: u64, path: &Path, offset: u64) -> Result<(), VolumeError> {
    if rec.header.kind == RecordKind::FlushBarrier {
        return Ok(());
    }
    let end = rec.header.offset.checked_add(u64::from(rec.header.length));
    if end.is_none_or(|e| e > size) {
        return Err(VolumeError::WalCorrupt {
            path: path.to_path_buf(),
            offset,
            lsn: rec.header.lsn,
            reason: format!(
                "record LSN {} targets [{}, +{}) beyond the volume size {size}",
                rec.header.lsn, rec.header.offset, rec.header.length
            ),
        });
    }
    Ok(())
}

/// The log ends before LSN `lsn`, at `path`/`offset`. Decides between a torn
/// tail (fine) and corruption (error), see the module docs.
#[allow(clippy::too_many_arguments)]
fn end_of_log(
    a: &RecoverArgs<'_>,
    report: &mut RecoveryReport,
    lsn: Lsn,
    path: &Path,
    offset: u64,
    seq: u64,
    current: Option<(&mut SegmentReader, u64)>,
    reason: &str,
) -> Result<(), VolumeError> {
    let corrupt = |why: String| VolumeError::WalCorrupt { path: path.to_path_buf(), offset, lsn, reason: why };
    if lsn <= a.checkpoint_lsn {
        return Err(corrupt(format!(
            "{reason}; the log ends at LSN {} but the checkpoint LSN {} says it was durable",
            lsn - 1,
            a.checkpoint_lsn
        )));
    }
    let current_present = current.is_some();
    let mut witness = None;
    if let Some((reader, from)) = current {
        witness = scan_for_witness(a.io, reader, a.uuid, seq, from, lsn)?;
    }
    if witness.is_none() {
        for (&later_seq, later_path) in a.segments.range(seq + 1..) {
            let mut reader = SegmentReader::open(a.io, later_path)?;
            witness = scan_for_witness(a.io, &mut reader, a.uuid, later_seq, SEGMENT_HEADER_SIZE, lsn)?;
            if witness.is_some() {
                break;
            }
        }
    }
    if let Some(w) = witness {
        return Err(corrupt(format!(
            "{reason} at LSN {lsn}, but record LSN {} at {}:{} was written after LSN {} was durable",
            w.lsn,
            w.path.display(),
            w.offset,
            w.durable_lsn
        )));
    }
    if current_present || a.segments.range(seq + 1..).next().is_some() {
        tracing::info!(
            path = %path.display(),
            offset,
            next_lsn = lsn,
            reason,
            "end of the recovered WAL: the bytes there were never synced or are stale; the log is truncated there"
        );
        report.end = Some(LogEnd { path: path.to_path_buf(), offset, lsn, reason: reason.to_string() });
    }
    Ok(())
}
