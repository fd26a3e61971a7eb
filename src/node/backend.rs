//! The NBD backend of a primary: the volume, with volume errors mapped to
//! NBD errors.
//!
//! Mapping (the errno each NBD client sees):
//!
//! | volume error | NBD error | why |
//! | --- | --- | --- |
//! | `Stopped` whose [`FailStopKind`] is `NoSpace` (the write, fdatasync or WAL segment that stopped the volume failed with `ENOSPC` or `EDQUOT`) | `ENOSPC` | the filesystem under the volume is full; the client learns so (a kernel client reports ENOSPC to the filesystem above it), not that the disk broke. Every later write and flush answers the same until repd is restarted. |
//! | `Stopped`, any other kind (fail-stop after a failed fdatasync or WAL write; the volume closed) | `EIO` | the disk failed; the kernel client reports EIO to the filesystem, which is what a failing disk does. `ESHUTDOWN` is kept for a server going away (demote, stop), which clients may treat as "retry elsewhere". |
//! | `OutOfRange` on a write | `ENOSPC` | as the NBD spec asks for writes past the end |
//! | `OutOfRange` otherwise | `EINVAL` | as the NBD spec asks for reads/trims past the end |
//! | anything else (IO errors) | `EIO` | |
//!
//! The server range-checks requests before they get here, so `OutOfRange`
//! is a second line of defence.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use crate::nbd::{BlockBackend, BlockError};
use crate::repl::engine::{Durability, Gate};
use crate::stats::{IoOp, IoStats};
use crate::volume::{FailStopKind, Lsn, Volume, VolumeError};

/// Serves a [`Volume`] over NBD. With replication, each write first passes
/// the [`Gate`] ([`Gate::before_write`]) and each reply waits after the
/// local completion for what the gate requires ([`Gate::wait`]: the peer's
/// acks under the protocol, design.md §2). The gate is all this path sees
/// of the replication engine.
#[derive(Debug, Clone)]
pub struct VolumeBackend {
    volume: Arc<Volume>,
    gate: Option<Gate>,
    /// Requests, bytes, pending/unacked, acknowledgement waits.
    stats: Arc<IoStats>,
}

impl VolumeBackend {
    pub fn new(volume: Arc<Volume>) -> VolumeBackend {
        VolumeBackend { volume, gate: None, stats: Arc::default() }
    }

    /// A backend whose replies wait for the peer through `gate`.
    pub fn with_gate(volume: Arc<Volume>, gate: Option<Gate>) -> VolumeBackend {
        VolumeBackend { volume, gate, stats: Arc::default() }
    }

    /// Counts into `stats` (the node's, which `status` reads).
    pub fn with_stats(mut self, stats: Arc<IoStats>) -> VolumeBackend {
        self.stats = stats;
        self
    }

    async fn before_write(&self) -> Result<(), BlockError> {
        match &self.gate {
            Some(g) => g.before_write().await.map_err(|e| BlockError::Io(e.to_string())),
            None => Ok(()),
        }
    }

    async fn after(&self, r: Result<Lsn, VolumeError>, d: Durability, op: Op) -> Result<(), BlockError> {
        let lsn = r.map_err(|e| map_error(op, e))?;
        if let Some(g) = &self.gate {
            // Timed only while a session streams to the peer: otherwise
            // nothing is waited for.
            let active = g.streaming();
            let _unacked = self.stats.begin_unacked();
            let start = Instant::now();
            g.wait(lsn, d).await;
            if active {
                self.stats.observe_ack_wait(d == Durability::Flush, start.elapsed());
            }
        }
        Ok(())
    }
}

fn durability(fua: bool) -> Durability {
    if fua { Durability::Flush } else { Durability::Write }
}

/// What the request was, for the errno choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Read,
    Write,
    Other,
}

fn map_error(op: Op, e: VolumeError) -> BlockError {
    match e {
        VolumeError::Stopped(reason) if reason.kind() == FailStopKind::NoSpace => {
            BlockError::NoSpace(format!("volume stopped taking writes: {reason}"))
        }
        VolumeError::Stopped(reason) => BlockError::Io(format!("volume stopped taking writes: {reason}")),
        e @ VolumeError::OutOfRange { .. } if op == Op::Write => BlockError::NoSpace(e.to_string()),
        e @ VolumeError::OutOfRange { .. } => BlockError::Invalid(e.to_string()),
        other => BlockError::Io(other.to_string()),
    }
}

impl BlockBackend for VolumeBackend {
    fn size(&self) -> u64 {
        self.volume.size()
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, BlockError> {
        let _pending = self.stats.begin(IoOp::Read, u64::from(len));
        self.volume.read(offset, len).await.map_err(|e| map_error(Op::Read, e))
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), BlockError> {
        let _pending = self.stats.begin(IoOp::Write, data.len() as u64);
        self.before_write().await?;
        let r = self.volume.write(offset, data, fua).await;
        self.after(r, durability(fua), Op::Write).await
    }

    async fn flush(&self) -> Result<(), BlockError> {
        let _pending = self.stats.begin(IoOp::Flush, 0);
        let r = self.volume.flush().await;
        self.after(r, Durability::Flush, Op::Other).await
    }

    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), BlockError> {
        let _pending = self.stats.begin(IoOp::Trim, u64::from(len));
        self.before_write().await?;
        let r = self.volume.trim(offset, len, fua).await;
        self.after(r, durability(fua), Op::Other).await
    }

    async fn write_zeroes(&self, offset: u64, len: u32, no_hole: bool, fua: bool) -> Result<(), BlockError> {
        let _pending = self.stats.begin(IoOp::WriteZeroes, u64::from(len));
        self.before_write().await?;
        // NO_HOLE means "keep it allocated": do not punch.
        let r = self.volume.write_zeroes(offset, len, !no_hole, fua).await;
        self.after(r, durability(fua), Op::Write).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::proto;
    use crate::volume::FailStop;

    #[test]
    fn errors_map_to_the_documented_errno() {
        let eio = std::io::Error::from_raw_os_error(libc::EIO);
        let stopped = || VolumeError::Stopped(FailStop::io("fdatasync of WAL /x/wal/1.wal", &eio));
        let range = || VolumeError::OutOfRange { offset: 10, len: 4096, size: 8192 };
        assert_eq!(map_error(Op::Write, stopped()).nbd_errno(), proto::NBD_EIO);
        assert_eq!(map_error(Op::Other, stopped()).nbd_errno(), proto::NBD_EIO);
        // A fail-stop caused by a full filesystem says so, to writes and
        // flushes alike; a closed volume is no full disk.
        let enospc = std::io::Error::from_raw_os_error(libc::ENOSPC);
        let full = || VolumeError::Stopped(FailStop::io("write batch (WAL /x/wal/1.wal, data /x/data)", &enospc));
        assert_eq!(map_error(Op::Write, full()).nbd_errno(), proto::NBD_ENOSPC);
        assert_eq!(map_error(Op::Other, full()).nbd_errno(), proto::NBD_ENOSPC);
        let mapped = map_error(Op::Write, full());
        assert!(mapped.to_string().contains("No space left on device (os error 28) (errno 28)"), "{mapped}");
        let e = VolumeError::Io { path: "/x/meta".into(), source: enospc };
        let full_meta = VolumeError::Stopped(FailStop::volume("bitmap write to /x/meta", &e));
        assert_eq!(map_error(Op::Write, full_meta).nbd_errno(), proto::NBD_ENOSPC);
        let closed = VolumeError::Stopped(FailStop::closed("the volume is closed"));
        assert_eq!(map_error(Op::Write, closed).nbd_errno(), proto::NBD_EIO);
        assert_eq!(map_error(Op::Write, range()).nbd_errno(), proto::NBD_ENOSPC);
        assert_eq!(map_error(Op::Read, range()).nbd_errno(), proto::NBD_EINVAL);
        assert_eq!(map_error(Op::Other, range()).nbd_errno(), proto::NBD_EINVAL);
        let io = VolumeError::Io { path: "/x/data".into(), source: std::io::Error::from_raw_os_error(libc::EIO) };
        let mapped = map_error(Op::Read, io);
        assert_eq!(mapped.nbd_errno(), proto::NBD_EIO);
        assert!(mapped.to_string().contains("/x/data"), "{mapped}");
    }
}
