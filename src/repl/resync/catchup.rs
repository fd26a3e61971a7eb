//! A log catch-up on the source: the WAL records the peer lacks
//! (`peer_lsn + 1 ..= base`), read back from the retained WAL and sent as
//! ordinary records before the feed (whose first record is `base + 1`).
//! The peer stays `consistent` throughout. A record that cannot be read
//! falls back to a bitmap (or full) walk.

use crate::model::Lsn;
use crate::repl::store::{BoxFut, FeedOp, LogReadError, LogRecord, LogSource};

/// A log catch-up on the source.
pub struct Catchup {
    reader: Box<dyn LogSource>,
    /// The peer's LSN when it started.
    pub from: Lsn,
    /// The next LSN to send.
    next: Lsn,
    /// The last LSN of the catch-up (the feed starts after it).
    pub base: Lsn,
    /// Bytes of the records sent.
    pub bytes: u64,
    /// `mark_count` when it started (see `catchup_finished`).
    pub marks_at_start: u64,
}

/// What the next step of the catch-up gives.
pub enum Step {
    /// The next record to send, with the bytes sent so far and the estimated
    /// total.
    Record { rec: LogRecord, bytes: u64, total: u64 },
    /// Every record was read: the `SyncEnd` follows.
    End { bytes: u64 },
    /// The WAL cannot serve the range: fall back to a walk.
    FallBack(LogReadError),
}

/// The WAL range of a catch-up with nothing to replay.
struct NoRecords;

impl LogSource for NoRecords {
    fn next(&mut self) -> BoxFut<'_, Result<Option<LogRecord>, LogReadError>> {
        Box::pin(async { Ok(None) })
    }
}

impl Catchup {
    /// A catch-up with nothing to replay (the peer is at `base` already,
    /// but the decision, e.g. a newer generation, asks for a log
    /// catch-up): it still runs, `SyncStart` then `SyncEnd` with no record
    /// between, so that the target ends it (takes our generation, becomes
    /// `established`) as it ends any other. Before, the source said "no
    /// sync" and the target waited for a catch-up that never began (chaos
    /// seed 1000 cycle 596, `tests/chaos_found.rs`).
    pub fn nothing_to_replay(base: Lsn, marks_at_start: u64) -> Catchup {
        Catchup::new(Box::new(NoRecords), base, base, marks_at_start)
    }

    pub fn new(reader: Box<dyn LogSource>, peer_lsn: Lsn, base: Lsn, marks_at_start: u64) -> Catchup {
        Catchup { reader, from: peer_lsn, next: peer_lsn + 1, base, bytes: 0, marks_at_start }
    }

    /// Reads the next record.
    pub async fn step(&mut self) -> Step {
        match self.reader.next().await {
            Ok(Some(rec)) if rec.lsn == self.next && rec.lsn <= self.base => {
                self.next += 1;
                self.bytes += op_bytes(&rec.op);
                let total = self.bytes * (self.base - self.from) / (self.next - 1 - self.from);
                Step::Record { rec, bytes: self.bytes, total }
            }
            Ok(Some(rec)) => Step::FallBack(LogReadError::NotInLog {
                lsn: self.next,
                why: format!("the WAL reader returned LSN {} instead", rec.lsn),
            }),
            Ok(None) if self.next > self.base => Step::End { bytes: self.bytes },
            Ok(None) => Step::FallBack(LogReadError::NotInLog { lsn: self.next, why: "the WAL ends before it".into() }),
            Err(e) => Step::FallBack(e),
        }
    }
}

pub(crate) fn op_bytes(op: &FeedOp) -> u64 {
    match op {
        FeedOp::Write { data, .. } => data.len() as u64,
        FeedOp::Trim { len, .. } | FeedOp::Zeroes { len, .. } => u64::from(*len),
    }
}
