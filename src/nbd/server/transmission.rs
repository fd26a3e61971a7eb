//! The transmission phase: a reader loop that parses requests and runs each
//! in its own task, and one writer task that writes every reply whole.

use std::fmt;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tracing::{debug, info, warn};

use super::{
    CONN_RESERVE_BYTES, MAX_INFLIGHT_BYTES, MAX_INFLIGHT_REQUESTS, READ_BUF_SIZE, SHUTDOWN_WRITE_GRACE, STALL_CHECK,
    Shared, WRITE_BUF_SIZE, WriteWatch, wait_shutdown,
};
use crate::nbd::proto::*;
use crate::nbd::wire::write_message;
use crate::nbd::{BlockBackend, BlockError};

/// Takes `cost` in-flight bytes: from the connection's own small reserve
/// when it has room (so that a client making small requests is served at
/// once whatever other clients hold), else from the global budget, evicting
/// stalled connections while it waits. `None` if a semaphore is closed.
async fn acquire_inflight<B>(
    shared: &Shared<B>,
    reserve: &Arc<Semaphore>,
    id: u64,
    cost: u32,
) -> Option<OwnedSemaphorePermit> {
    if let Ok(p) = reserve.clone().try_acquire_many_owned(cost) {
        return Some(p);
    }
    if let Ok(p) = shared.inflight.clone().try_acquire_many_owned(cost) {
        return Some(p);
    }
    // Pinned once: the semaphore is fair, the request keeps its place.
    let acquire = shared.inflight.clone().acquire_many_owned(cost);
    tokio::pin!(acquire);
    let mut check = tokio::time::interval(STALL_CHECK);
    loop {
        tokio::select! {
            p = &mut acquire => return p.ok(),
            _ = check.tick() => shared.evict_stalled(id),
        }
    }
}

/// A writer that stamps its [`WriteWatch`] whenever the socket takes bytes.
struct Watched<W> {
    inner: W,
    watch: Arc<WriteWatch>,
    epoch: Instant,
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Watched<W> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        let res = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(res, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.watch.progress_ms.store(self.epoch.elapsed().as_millis() as u64, Ordering::Release);
        }
        res
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

// ---------------------------------------------------------------------------
// Transmission phase.
// ---------------------------------------------------------------------------

/// Why the transmission phase ended.
#[derive(Debug)]
pub(super) enum End {
    /// Client closed the connection between requests.
    Eof,
    /// NBD_CMD_DISC.
    Disc,
    Shutdown,
    WriterFailed,
    Io(io::Error),
    /// Framing violation: the connection cannot continue.
    Protocol(String),
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            End::Eof => write!(f, "client closed the connection"),
            End::Disc => write!(f, "client sent NBD_CMD_DISC"),
            End::Shutdown => write!(f, "server shutting down"),
            End::WriterFailed => write!(f, "reply write failed"),
            End::Io(e) => write!(f, "IO error: {e}"),
            End::Protocol(m) => write!(f, "{m}"),
        }
    }
}

/// A request the backend serves.
#[derive(Debug, Clone, Copy)]
enum Op {
    Read { offset: u64, len: u32 },
    Write { offset: u64, len: u32, fua: bool },
    Flush,
    Trim { offset: u64, len: u32, fua: bool },
    WriteZeroes { offset: u64, len: u32, no_hole: bool, fua: bool },
}

/// What to do with a parsed request header.
#[derive(Debug)]
enum Decision {
    Serve(Serve),
    Disc,
    /// The stream cannot be kept in sync: close the connection.
    Close(String),
}

/// A request that gets a reply.
#[derive(Debug)]
enum Serve {
    Run(Op),
    /// Answer with `errno`; for a WRITE, first drain `drain` payload bytes.
    Reject {
        errno: u32,
        message: String,
        drain: u32,
    },
}

/// Validates a request against the export size and the advertised features.
fn classify(h: &RequestHeader, size: u64) -> Decision {
    let in_range = |len: u32| h.offset.checked_add(u64::from(len)).is_some_and(|end| end <= size);
    let fua = h.flags & NBD_CMD_FLAG_FUA != 0;
    let bad_flags = |allowed: u16| -> Option<String> {
        let bad = h.flags & !allowed;
        (bad != 0).then(|| format!("Flags {bad:#06x} are not valid for NBD_CMD_{}", command_name(h.kind)))
    };
    let reject = |errno: u32, message: String| Decision::Serve(Serve::Reject { errno, message, drain: 0 });
    let beyond = || format!("Range {}+{} is beyond the end of the export ({size} bytes)", h.offset, h.len);
    let too_long = || format!("Length {} exceeds the maximum block size {MAX_BLOCK_SIZE}", h.len);
    match h.kind {
        NBD_CMD_DISC => Decision::Disc,
        NBD_CMD_WRITE => {
            if h.len > MAX_BLOCK_SIZE {
                return Decision::Close(format!(
                    "NBD_CMD_WRITE of {} bytes exceeds the maximum block size {MAX_BLOCK_SIZE}",
                    h.len
                ));
            }
            let drain = h.len;
            if let Some(m) = bad_flags(NBD_CMD_FLAG_FUA) {
                return Decision::Serve(Serve::Reject { errno: NBD_EINVAL, message: m, drain });
            }
            if !in_range(h.len) {
                return Decision::Serve(Serve::Reject { errno: NBD_ENOSPC, message: beyond(), drain });
            }
            Decision::Serve(Serve::Run(Op::Write { offset: h.offset, len: h.len, fua }))
        }
        NBD_CMD_READ => {
            if let Some(m) = bad_flags(NBD_CMD_FLAG_FUA) {
                return reject(NBD_EINVAL, m);
            }
            if h.len > MAX_BLOCK_SIZE {
                return reject(NBD_EINVAL, too_long());
            }
            if !in_range(h.len) {
                return reject(NBD_EINVAL, beyond());
            }
            Decision::Serve(Serve::Run(Op::Read { offset: h.offset, len: h.len }))
        }
        NBD_CMD_FLUSH => {
            if let Some(m) = bad_flags(NBD_CMD_FLAG_FUA) {
                return reject(NBD_EINVAL, m);
            }
            if h.offset != 0 || h.len != 0 {
                return reject(NBD_EINVAL, "NBD_CMD_FLUSH must have zero offset and length".to_string());
            }
            Decision::Serve(Serve::Run(Op::Flush))
        }
        NBD_CMD_TRIM => {
            if let Some(m) = bad_flags(NBD_CMD_FLAG_FUA) {
                return reject(NBD_EINVAL, m);
            }
            if !in_range(h.len) {
                return reject(NBD_EINVAL, beyond());
            }
            Decision::Serve(Serve::Run(Op::Trim { offset: h.offset, len: h.len, fua }))
        }
        NBD_CMD_WRITE_ZEROES => {
            if let Some(m) = bad_flags(NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE) {
                return reject(NBD_EINVAL, m);
            }
            // No maximum-size check: the request carries no payload, and
            // nbdkit, qemu-nbd and the Linux kernel client (which may send
            // zeroes of up to 4 GiB whatever the advertised maximum) all
            // treat it like TRIM. The spec's EINVAL here is only a SHOULD.
            if !in_range(h.len) {
                return reject(NBD_ENOSPC, beyond());
            }
            let no_hole = h.flags & NBD_CMD_FLAG_NO_HOLE != 0;
            Decision::Serve(Serve::Run(Op::WriteZeroes { offset: h.offset, len: h.len, no_hole, fua }))
        }
        other => reject(NBD_EINVAL, format!("Unknown command {other}")),
    }
}

/// One reply, written whole by the writer task. The permits it carries are
/// released once it is written (back-pressure on the reader).
struct Reply {
    head: BytesMut,
    data: Option<Bytes>,
    _permits: Permits,
}

struct Permits {
    _slot: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
    _global: Option<OwnedSemaphorePermit>,
}

/// Builds the reply to a request (`result` holds the READ data on success).
fn build_reply(
    cookie: u64,
    op_offset: u64,
    structured: bool,
    is_read: bool,
    result: Result<Option<Bytes>, (u32, String)>,
) -> (BytesMut, Option<Bytes>) {
    let mut head = BytesMut::with_capacity(32);
    match result {
        Ok(data) => match (structured, data) {
            (true, Some(d)) if !d.is_empty() => {
                put_offset_data_header(&mut head, cookie, op_offset, d.len() as u32);
                return (head, Some(d));
            }
            (true, _) if is_read => {
                // Zero-length read: an OFFSET_DATA chunk must carry a byte.
                put_chunk_header(&mut head, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, cookie, 0);
            }
            (_, data) => {
                put_simple_reply(&mut head, 0, cookie);
                return (head, data.filter(|d| !d.is_empty()));
            }
        },
        Err((errno, message)) => {
            if structured {
                put_error_chunk(&mut head, cookie, errno, &message);
            } else {
                put_simple_reply(&mut head, errno, cookie);
            }
        }
    }
    (head, None)
}

async fn run_op<B: BlockBackend>(backend: &B, op: Op, payload: Option<Bytes>) -> Result<Option<Bytes>, BlockError> {
    match op {
        Op::Read { len: 0, .. } => Ok(Some(Bytes::new())),
        Op::Read { offset, len } => {
            let data = backend.read(offset, len).await?;
            if data.len() != len as usize {
                return Err(BlockError::Io(format!(
                    "Backend returned {} bytes for a {len}-byte read at {offset}",
                    data.len()
                )));
            }
            Ok(Some(data))
        }
        Op::Write { len: 0, .. } | Op::Trim { len: 0, .. } | Op::WriteZeroes { len: 0, .. } => Ok(None),
        Op::Write { offset, fua, .. } => backend.write(offset, payload.unwrap_or_default(), fua).await.map(|()| None),
        Op::Flush => backend.flush().await.map(|()| None),
        Op::Trim { offset, len, fua } => backend.trim(offset, len, fua).await.map(|()| None),
        Op::WriteZeroes { offset, len, no_hole, fua } => {
            backend.write_zeroes(offset, len, no_hole, fua).await.map(|()| None)
        }
    }
}

fn op_offset(op: &Op) -> u64 {
    match *op {
        Op::Read { offset, .. }
        | Op::Write { offset, .. }
        | Op::Trim { offset, .. }
        | Op::WriteZeroes { offset, .. } => offset,
        Op::Flush => 0,
    }
}

pub(super) async fn transmission<B, R, W>(
    mut r: R,
    w: W,
    id: u64,
    peer: &str,
    structured: bool,
    shared: &Arc<Shared<B>>,
) -> End
where
    B: BlockBackend,
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel::<Reply>();
    let writer_dead = Arc::new(Notify::new());
    let watch = Arc::new(WriteWatch {
        peer: peer.to_string(),
        busy: AtomicBool::new(false),
        progress_ms: AtomicU64::new(shared.now_ms()),
        evicted: AtomicBool::new(false),
        evict: Notify::new(),
    });
    shared.watches.lock().unwrap_or_else(|e| e.into_inner()).insert(id, Arc::clone(&watch));
    let w = Watched { inner: w, watch: Arc::clone(&watch), epoch: shared.epoch };
    let writer = tokio::spawn(writer_loop(w, rx, shared.shutdown.clone(), writer_dead.clone(), watch));
    let end = reader_loop(&mut r, &tx, id, peer, structured, shared, &writer_dead).await;
    shared.watches.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
    // Every in-flight request task holds a sender: the writer ends once the
    // last reply is written.
    drop(tx);
    if let Err(e) = writer.await {
        warn!(conn = id, peer = %peer, error = %e, "NBD writer task failed");
    }
    end
}

/// Reads into `buf` until it holds at least `want` bytes. `Ok(false)` on EOF.
async fn fill<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    want: usize,
    shutdown: &mut watch::Receiver<bool>,
    writer_dead: &Notify,
) -> Result<bool, End> {
    while buf.len() < want {
        let free = buf.capacity() - buf.len();
        if free < (want - buf.len()).min(READ_BUF_SIZE) {
            buf.reserve((want - buf.len()).max(READ_BUF_SIZE));
        }
        tokio::select! {
            biased;
            _ = wait_shutdown(shutdown) => return Err(End::Shutdown),
            _ = writer_dead.notified() => return Err(End::WriterFailed),
            res = r.read_buf(buf) => match res {
                Ok(0) => return Ok(false),
                Ok(_) => {}
                Err(e) => return Err(End::Io(e)),
            },
        }
    }
    Ok(true)
}

async fn reader_loop<B, R>(
    r: &mut R,
    tx: &mpsc::UnboundedSender<Reply>,
    id: u64,
    peer: &str,
    structured: bool,
    shared: &Arc<Shared<B>>,
    writer_dead: &Notify,
) -> End
where
    B: BlockBackend,
    R: AsyncRead + Unpin,
{
    let mut shutdown = shared.shutdown.clone();
    let slots = Arc::new(Semaphore::new(MAX_INFLIGHT_REQUESTS));
    let bytes = Arc::new(Semaphore::new(MAX_INFLIGHT_BYTES));
    let reserve = Arc::new(Semaphore::new(CONN_RESERVE_BYTES));
    let size = shared.backend.size();
    let mut buf = BytesMut::with_capacity(READ_BUF_SIZE);
    loop {
        if *shutdown.borrow() {
            return End::Shutdown;
        }
        // Cheap check first: is a whole header here?
        if !RequestHeader::is_complete(&buf) {
            match fill(r, &mut buf, RequestHeader::LEN, &mut shutdown, writer_dead).await {
                Ok(true) => {}
                Ok(false) if buf.is_empty() => return End::Eof,
                Ok(false) => {
                    return End::Protocol("Connection closed in the middle of a request header".into());
                }
                Err(end) => return end,
            }
        }
        let h = match RequestHeader::parse(&buf[..RequestHeader::LEN]) {
            Ok(h) => h,
            Err(e) => return End::Protocol(e.to_string()),
        };
        buf.advance(RequestHeader::LEN);
        let decision = match classify(&h, size) {
            Decision::Disc => {
                if !buf.is_empty() {
                    debug!(conn = id, peer = %peer, bytes = buf.len(), "NBD data after NBD_CMD_DISC ignored");
                }
                return End::Disc;
            }
            Decision::Close(reason) => return End::Protocol(reason),
            Decision::Serve(s) => s,
        };
        let cost = match decision {
            Serve::Run(Op::Read { len, .. } | Op::Write { len, .. }) => len,
            _ => 0,
        };
        // Back-pressure: wait for room before reading a payload.
        let acquire = async {
            let slot = slots.clone().acquire_owned().await.ok()?;
            let b = if cost > 0 { Some(bytes.clone().acquire_many_owned(cost).await.ok()?) } else { None };
            let g = if cost > 0 { Some(acquire_inflight(shared, &reserve, id, cost).await?) } else { None };
            Some(Permits { _slot: slot, _bytes: b, _global: g })
        };
        let permits = tokio::select! {
            p = acquire => match p {
                Some(p) => p,
                None => return End::Protocol("Internal error: request semaphore closed".into()),
            },
            _ = wait_shutdown(&mut shutdown) => return End::Shutdown,
            _ = writer_dead.notified() => return End::WriterFailed,
        };
        match decision {
            Serve::Reject { errno, message, drain } => {
                if let Err(end) = skip(r, &mut buf, drain as usize, &mut shutdown, writer_dead).await {
                    return end;
                }
                if let Some(suppressed) = shared.log_client.allow() {
                    info!(
                        conn = id, peer = %peer, handle = h.cookie, command = command_name(h.kind),
                        offset = h.offset, len = h.len, errno, reason = %message, suppressed, "NBD request rejected"
                    );
                }
                let (head, data) =
                    build_reply(h.cookie, h.offset, structured, h.kind == NBD_CMD_READ, Err((errno, message)));
                if tx.send(Reply { head, data, _permits: permits }).is_err() {
                    return End::WriterFailed;
                }
            }
            Serve::Run(op) => {
                let payload = if let Op::Write { len, .. } = op {
                    match fill(r, &mut buf, len as usize, &mut shutdown, writer_dead).await {
                        Ok(true) => Some(buf.split_to(len as usize).freeze()),
                        Ok(false) => {
                            return End::Protocol("Connection closed in the middle of a WRITE payload".into());
                        }
                        Err(end) => return end,
                    }
                } else {
                    None
                };
                let tx = tx.clone();
                let shared = shared.clone();
                let peer = peer.to_string();
                tokio::spawn(async move {
                    let result = run_op(&*shared.backend, op, payload).await.map_err(|e| {
                        if let Some(suppressed) = shared.log_backend.allow() {
                            warn!(
                                conn = id, peer = %peer, handle = h.cookie, command = command_name(h.kind),
                                offset = h.offset, len = h.len, error = %e, suppressed, "NBD request failed"
                            );
                        }
                        (e.nbd_errno(), e.to_string())
                    });
                    let (head, data) =
                        build_reply(h.cookie, op_offset(&op), structured, matches!(op, Op::Read { .. }), result);
                    // The writer outlives every sender; a send error only
                    // means the connection is being torn down.
                    let _ = tx.send(Reply { head, data, _permits: permits });
                });
            }
        }
    }
}

/// Discards `n` bytes of the stream (a rejected WRITE's payload).
async fn skip<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    mut n: usize,
    shutdown: &mut watch::Receiver<bool>,
    writer_dead: &Notify,
) -> Result<(), End> {
    loop {
        let take = n.min(buf.len());
        buf.advance(take);
        n -= take;
        if n == 0 {
            return Ok(());
        }
        match fill(r, buf, n.min(READ_BUF_SIZE), shutdown, writer_dead).await {
            Ok(true) => {}
            Ok(false) => {
                return Err(End::Protocol("Connection closed in the middle of a WRITE payload".into()));
            }
            Err(end) => return Err(end),
        }
    }
}

/// Writes replies in the order they complete, each whole; coalesces small
/// replies and flushes whenever no more are queued.
async fn writer_loop<W: AsyncWrite + Unpin>(
    w: Watched<W>,
    mut rx: mpsc::UnboundedReceiver<Reply>,
    shutdown: watch::Receiver<bool>,
    dead: Arc<Notify>,
    stall: Arc<WriteWatch>,
) {
    let mut w = BufWriter::with_capacity(WRITE_BUF_SIZE, w);
    let mut broken = false;
    while let Some(reply) = rx.recv().await {
        if broken {
            // Keep receiving so every request task can finish and release
            // its permits; nothing more goes out.
            continue;
        }
        stall.progress_ms.store(w.get_ref().epoch.elapsed().as_millis() as u64, Ordering::Release);
        stall.busy.store(true, Ordering::Release);
        let io = async {
            let data = reply.data.as_deref().unwrap_or_default();
            write_message(&mut w, &reply.head, data).await?;
            if rx.is_empty() {
                w.flush().await?;
            }
            Ok::<(), io::Error>(())
        };
        let mut sd = shutdown.clone();
        let deadline = async move {
            wait_shutdown(&mut sd).await;
            tokio::time::sleep(SHUTDOWN_WRITE_GRACE).await;
        };
        let res = tokio::select! {
            r = io => r,
            _ = deadline => Err(io::Error::new(io::ErrorKind::TimedOut, "client does not read its replies")),
            _ = stall.evict.notified() => {
                Err(io::Error::new(io::ErrorKind::TimedOut, "client does not read its replies; evicted"))
            }
        };
        stall.busy.store(false, Ordering::Release);
        if let Err(e) = res {
            debug!(error = %e, "NBD reply write failed");
            broken = true;
            dead.notify_one();
        }
    }
    if !broken {
        let _ = w.flush().await;
        let _ = w.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(kind: u16, flags: u16, offset: u64, len: u32) -> RequestHeader {
        RequestHeader { flags, kind, cookie: 1, offset, len }
    }

    fn errno(d: Decision) -> Option<(u32, u32)> {
        match d {
            Decision::Serve(Serve::Reject { errno, drain, .. }) => Some((errno, drain)),
            _ => None,
        }
    }

    #[test]
    fn classify_follows_the_spec() {
        let size = 1 << 20;
        // Reads and trims beyond the end: EINVAL; writes: ENOSPC, drained.
        assert_eq!(errno(classify(&req(NBD_CMD_READ, 0, size - 1, 2), size)), Some((NBD_EINVAL, 0)));
        assert_eq!(errno(classify(&req(NBD_CMD_TRIM, 0, size, 1), size)), Some((NBD_EINVAL, 0)));
        assert_eq!(errno(classify(&req(NBD_CMD_WRITE, 0, size, 10), size)), Some((NBD_ENOSPC, 10)));
        assert_eq!(errno(classify(&req(NBD_CMD_WRITE_ZEROES, 0, size, 1), size)), Some((NBD_ENOSPC, 0)));
        // Offset + length overflowing u64 is out of range, not a panic.
        assert_eq!(errno(classify(&req(NBD_CMD_READ, 0, u64::MAX, 2), size)), Some((NBD_EINVAL, 0)));
        assert_eq!(errno(classify(&req(NBD_CMD_WRITE, 0, u64::MAX, 2), size)), Some((NBD_ENOSPC, 2)));
        // Bad flags, even on a write: EINVAL, drained.
        assert_eq!(errno(classify(&req(NBD_CMD_WRITE, NBD_CMD_FLAG_NO_HOLE, 0, 8), size)), Some((NBD_EINVAL, 8)));
        assert_eq!(errno(classify(&req(NBD_CMD_READ, NBD_CMD_FLAG_DF, 0, 8), size)), Some((NBD_EINVAL, 0)));
        assert_eq!(errno(classify(&req(NBD_CMD_TRIM, NBD_CMD_FLAG_REQ_ONE, 0, 8), size)), Some((NBD_EINVAL, 0)));
        assert_eq!(
            errno(classify(&req(NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_FAST_ZERO, 0, 8), size)),
            Some((NBD_EINVAL, 0))
        );
        assert_eq!(errno(classify(&req(NBD_CMD_FLUSH, 0x8000, 0, 0), size)), Some((NBD_EINVAL, 0)));
        assert_eq!(errno(classify(&req(NBD_CMD_FLUSH, 0, 0, 1), size)), Some((NBD_EINVAL, 0)));
        // Unknown commands.
        for kind in [NBD_CMD_CACHE, NBD_CMD_BLOCK_STATUS, 8, 0xffff] {
            assert_eq!(errno(classify(&req(kind, 0, 0, 1), size)), Some((NBD_EINVAL, 0)));
        }
        // Oversized: READ → EINVAL, WRITE → close.
        assert_eq!(errno(classify(&req(NBD_CMD_READ, 0, 0, MAX_BLOCK_SIZE + 1), u64::MAX)), Some((NBD_EINVAL, 0)));
        assert!(matches!(classify(&req(NBD_CMD_WRITE, 0, 0, MAX_BLOCK_SIZE + 1), u64::MAX), Decision::Close(_)));
        // No-payload commands are served above the maximum block size.
        for kind in [NBD_CMD_TRIM, NBD_CMD_WRITE_ZEROES] {
            assert!(matches!(classify(&req(kind, 0, 0, u32::MAX), u64::MAX), Decision::Serve(Serve::Run(_))));
        }
        // FUA is accepted everywhere; NO_HOLE on WRITE_ZEROES.
        for kind in [NBD_CMD_READ, NBD_CMD_WRITE, NBD_CMD_TRIM, NBD_CMD_WRITE_ZEROES] {
            assert!(matches!(classify(&req(kind, NBD_CMD_FLAG_FUA, 0, 512), size), Decision::Serve(Serve::Run(_))));
        }
        assert!(matches!(
            classify(&req(NBD_CMD_FLUSH, NBD_CMD_FLAG_FUA, 0, 0), size),
            Decision::Serve(Serve::Run(Op::Flush))
        ));
        assert!(matches!(
            classify(&req(NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FUA, 0, 512), size),
            Decision::Serve(Serve::Run(Op::WriteZeroes { no_hole: true, fua: true, .. }))
        ));
        // Exactly up to the end is fine, zero-length too.
        assert!(matches!(classify(&req(NBD_CMD_READ, 0, size - 512, 512), size), Decision::Serve(Serve::Run(_))));
        assert!(matches!(classify(&req(NBD_CMD_READ, 0, size, 0), size), Decision::Serve(Serve::Run(_))));
        assert!(matches!(classify(&req(NBD_CMD_DISC, 0xffff, 5, 5), size), Decision::Disc));
    }

    #[test]
    fn replies_are_shaped_per_negotiation() {
        let data = Bytes::from_static(b"abc");
        let (h, d) = build_reply(9, 100, false, true, Ok(Some(data.clone())));
        assert_eq!(ReplyHeader::parse(&h).unwrap().unwrap().0, ReplyHeader::Simple { error: 0, cookie: 9 });
        assert_eq!(d.as_deref(), Some(&b"abc"[..]));

        let (h, d) = build_reply(9, 100, true, true, Ok(Some(data)));
        let (hdr, n) = ReplyHeader::parse(&h).unwrap().unwrap();
        assert_eq!(
            hdr,
            ReplyHeader::Chunk { flags: NBD_REPLY_FLAG_DONE, kind: NBD_REPLY_TYPE_OFFSET_DATA, cookie: 9, len: 11 }
        );
        assert_eq!(&h[n..], &100u64.to_be_bytes());
        assert!(d.is_some());

        let (h, d) = build_reply(9, 0, true, true, Ok(Some(Bytes::new())));
        assert_eq!(
            ReplyHeader::parse(&h).unwrap().unwrap().0,
            ReplyHeader::Chunk { flags: NBD_REPLY_FLAG_DONE, kind: NBD_REPLY_TYPE_NONE, cookie: 9, len: 0 }
        );
        assert!(d.is_none());

        let (h, d) = build_reply(9, 0, true, false, Ok(None));
        assert_eq!(ReplyHeader::parse(&h).unwrap().unwrap().0, ReplyHeader::Simple { error: 0, cookie: 9 });
        assert!(d.is_none());

        let (h, _) = build_reply(9, 0, false, true, Err((NBD_EIO, "x".into())));
        assert_eq!(h.len(), SIMPLE_REPLY_LEN);
        assert_eq!(ReplyHeader::parse(&h).unwrap().unwrap().0, ReplyHeader::Simple { error: NBD_EIO, cookie: 9 });

        let (h, _) = build_reply(9, 0, true, true, Err((NBD_EIO, "x".into())));
        let (hdr, n) = ReplyHeader::parse(&h).unwrap().unwrap();
        assert!(matches!(hdr, ReplyHeader::Chunk { kind: NBD_REPLY_TYPE_ERROR, .. }));
        assert_eq!(parse_error_chunk(&h[n..]).unwrap(), (NBD_EIO, "x".to_string()));
    }
}
