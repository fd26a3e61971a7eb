//! A small async NBD client, used by the crash tests and the benchmark load
//! generator.
//!
//! [`NbdClient`] is a cheap `Clone` handle; any number of tasks may issue
//! requests at once and they are pipelined on one connection:
//! - a writer task owns the socket's write half and writes each request whole
//!   (so a caller that gives up mid-request cannot tear the stream), flushing
//!   whenever its queue is empty;
//! - a reader task parses replies and completes the waiting request by cookie,
//!   reassembling structured READ replies (data and hole chunks) and turning
//!   error chunks into [`ClientError::Nbd`].
//!
//! The handshake is fixed newstyle: NBD_OPT_STRUCTURED_REPLY, then NBD_OPT_GO
//! (falling back to NBD_OPT_EXPORT_NAME if the server does not know GO).

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::debug;

use super::proto::*;
use super::server::ListenAddr;
use super::wire::write_message;

/// Largest structured reply chunk accepted from a server.
const MAX_CHUNK: u32 = MAX_BLOCK_SIZE + 64 * 1024;

/// Errors of the NBD client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered the request with this NBD error value.
    #[error("Server returned NBD error {errno} ({})", errno_name(*errno))]
    Nbd { errno: u32 },
    #[error("IO error")]
    Io(#[from] io::Error),
    /// The server broke the protocol (or refused the export).
    #[error("Protocol error: {0}")]
    Protocol(String),
    /// The connection is closed (disconnected, or failed earlier).
    #[error("Connection closed")]
    Closed,
}

impl ClientError {
    /// A copy for each request failed by the same connection error
    /// (`io::Error` is not `Clone`; kind and message are kept).
    fn duplicate(&self) -> ClientError {
        match self {
            ClientError::Nbd { errno } => ClientError::Nbd { errno: *errno },
            ClientError::Io(e) => ClientError::Io(io::Error::new(e.kind(), e.to_string())),
            ClientError::Protocol(m) => ClientError::Protocol(m.clone()),
            ClientError::Closed => ClientError::Closed,
        }
    }
}

/// Name of an NBD error value, for messages.
pub fn errno_name(errno: u32) -> &'static str {
    match errno {
        NBD_EPERM => "EPERM",
        NBD_EIO => "EIO",
        NBD_ENOMEM => "ENOMEM",
        NBD_EINVAL => "EINVAL",
        NBD_ENOSPC => "ENOSPC",
        NBD_EOVERFLOW => "EOVERFLOW",
        NBD_ENOTSUP => "ENOTSUP",
        NBD_ESHUTDOWN => "ESHUTDOWN",
        _ => "unknown",
    }
}

type Completion = oneshot::Sender<Result<Option<Bytes>, ClientError>>;

/// A request waiting for its reply.
struct Pending {
    done: Completion,
    /// For a READ: where the data goes.
    read: Option<ReadState>,
    /// The first error chunk of a structured reply, reported at DONE.
    error: Option<ClientError>,
}

struct ReadState {
    offset: u64,
    len: u32,
    /// The whole data, when one chunk carried all of it (no copy).
    whole: Option<Bytes>,
    /// Reassembly buffer, when several chunks make up the data.
    buf: Option<BytesMut>,
    /// Bytes described by content chunks so far.
    covered: u64,
}

#[derive(Default)]
struct State {
    pending: HashMap<u64, Pending>,
    closed: bool,
}

impl State {
    /// Marks the connection closed and fails every waiting request.
    fn close(&mut self, why: impl Fn() -> ClientError) {
        self.closed = true;
        for (_, p) in self.pending.drain() {
            let _ = p.done.send(Err(why()));
        }
    }
}

enum Outgoing {
    Request {
        header: [u8; RequestHeader::LEN],
        payload: Option<Bytes>,
    },
    /// Close the write half (after NBD_CMD_DISC).
    Shutdown,
}

struct Inner {
    size: u64,
    flags: u16,
    structured: bool,
    block_size: Option<(u32, u32, u32)>,
    state: Arc<Mutex<State>>,
    out: mpsc::UnboundedSender<Outgoing>,
    next_cookie: AtomicU64,
    reader: Mutex<Option<JoinHandle<()>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for h in [&self.reader, &self.writer] {
            if let Some(h) = h.lock().unwrap_or_else(|e| e.into_inner()).take() {
                h.abort();
            }
        }
    }
}

/// A connection to an NBD export. Clone it to share the connection.
#[derive(Clone)]
pub struct NbdClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdClient")
            .field("size", &self.inner.size)
            .field("flags", &format_args!("{:#06x}", self.inner.flags))
            .field("structured", &self.inner.structured)
            .finish()
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

impl NbdClient {
    /// Connects and negotiates `export` (fixed newstyle, structured replies,
    /// NBD_OPT_GO).
    pub async fn connect(addr: &ListenAddr, export: &str) -> Result<NbdClient, ClientError> {
        match addr {
            ListenAddr::Tcp(a) => {
                let s = TcpStream::connect(a).await?;
                s.set_nodelay(true)?;
                let (r, w) = s.into_split();
                Self::negotiate(r, w, export).await
            }
            ListenAddr::Unix(p) => {
                let s = UnixStream::connect(p).await?;
                let (r, w) = s.into_split();
                Self::negotiate(r, w, export).await
            }
        }
    }

    async fn negotiate<R, W>(mut r: R, mut w: W, export: &str) -> Result<NbdClient, ClientError>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let mut g = [0u8; GREETING_LEN];
        r.read_exact(&mut g).await?;
        let hflags = parse_greeting(&g).map_err(|e| ClientError::Protocol(e.to_string()))?;
        if hflags & NBD_FLAG_FIXED_NEWSTYLE == 0 {
            return Err(ClientError::Protocol("Server does not offer fixed newstyle negotiation".into()));
        }
        let no_zeroes = hflags & NBD_FLAG_NO_ZEROES != 0;
        let cflags = NBD_FLAG_C_FIXED_NEWSTYLE | if no_zeroes { NBD_FLAG_C_NO_ZEROES } else { 0 };
        w.write_all(&cflags.to_be_bytes()).await?;

        // Structured replies, if the server has them.
        send_option(&mut w, NBD_OPT_STRUCTURED_REPLY, &[]).await?;
        let (reply, _) = read_option_reply(&mut r, NBD_OPT_STRUCTURED_REPLY).await?;
        let structured = reply == NBD_REP_ACK;

        // GO, asking for the block size constraints.
        let go = InfoRequest { name: export.as_bytes().to_vec(), requests: vec![NBD_INFO_BLOCK_SIZE] };
        send_option(&mut w, NBD_OPT_GO, &go.encode()).await?;
        let mut export_info = None;
        let mut block_size = None;
        loop {
            let (reply, data) = read_option_reply(&mut r, NBD_OPT_GO).await?;
            match reply {
                NBD_REP_INFO if data.len() >= 2 => match u16::from_be_bytes([data[0], data[1]]) {
                    NBD_INFO_EXPORT if data.len() == 12 => {
                        let size = u64::from_be_bytes(data[2..10].try_into().unwrap_or_default());
                        export_info = Some((size, u16::from_be_bytes([data[10], data[11]])));
                    }
                    NBD_INFO_BLOCK_SIZE if data.len() == 14 => {
                        let v = |at: usize| u32::from_be_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]);
                        block_size = Some((v(2), v(6), v(10)));
                    }
                    NBD_INFO_EXPORT | NBD_INFO_BLOCK_SIZE => {
                        return Err(ClientError::Protocol(format!("Malformed NBD_REP_INFO of {} bytes", data.len())));
                    }
                    _ => {} // Unknown information: ignore, as the spec asks.
                },
                NBD_REP_INFO => {
                    return Err(ClientError::Protocol("NBD_REP_INFO shorter than 2 bytes".into()));
                }
                NBD_REP_ACK => break,
                NBD_REP_ERR_UNSUP => {
                    // An old server: NBD_OPT_EXPORT_NAME cannot report errors,
                    // an unknown export just closes the connection.
                    send_option(&mut w, NBD_OPT_EXPORT_NAME, export.as_bytes()).await?;
                    let mut b = vec![0u8; 10 + if no_zeroes { 0 } else { EXPORT_NAME_ZEROES }];
                    r.read_exact(&mut b).await.map_err(|e| match e.kind() {
                        io::ErrorKind::UnexpectedEof => {
                            ClientError::Protocol(format!("Server refused export {export:?}"))
                        }
                        _ => ClientError::Io(e),
                    })?;
                    let size = u64::from_be_bytes(b[0..8].try_into().unwrap_or_default());
                    export_info = Some((size, u16::from_be_bytes([b[8], b[9]])));
                    break;
                }
                err if err & NBD_REP_FLAG_ERROR != 0 => {
                    return Err(ClientError::Protocol(format!(
                        "Server refused export {export:?}: {} {}",
                        rep_name(err),
                        String::from_utf8_lossy(&data)
                    )));
                }
                other => {
                    return Err(ClientError::Protocol(format!("Unexpected option reply {other:#x} to NBD_OPT_GO")));
                }
            }
        }
        let Some((size, flags)) = export_info else {
            return Err(ClientError::Protocol("NBD_OPT_GO succeeded without NBD_INFO_EXPORT".into()));
        };
        debug!(export, size, flags, structured, "NBD client connected");

        let state = Arc::new(Mutex::new(State::default()));
        let (out, out_rx) = mpsc::unbounded_channel();
        let reader = tokio::spawn(reader_loop(r, state.clone(), structured));
        let writer = tokio::spawn(writer_loop(w, out_rx, state.clone()));
        Ok(NbdClient {
            inner: Arc::new(Inner {
                size,
                flags,
                structured,
                block_size,
                state,
                out,
                next_cookie: AtomicU64::new(1),
                reader: Mutex::new(Some(reader)),
                writer: Mutex::new(Some(writer)),
            }),
        })
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.inner.size
    }

    /// Transmission flags the server advertised.
    pub fn flags(&self) -> u16 {
        self.inner.flags
    }

    /// Whether structured replies were negotiated.
    pub fn structured_replies(&self) -> bool {
        self.inner.structured
    }

    /// (minimum, preferred, maximum) block size, if the server sent them.
    pub fn block_size(&self) -> Option<(u32, u32, u32)> {
        self.inner.block_size
    }

    /// Sends one request (header plus optional payload) and waits for its
    /// reply: the READ data, or `None`. Nothing is validated, so tests can
    /// send what the typed methods below would not (unknown commands, odd
    /// flags).
    pub async fn request(
        &self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: Option<Bytes>,
    ) -> Result<Option<Bytes>, ClientError> {
        let cookie = self.inner.next_cookie.fetch_add(1, Ordering::Relaxed);
        let (done, rx) = oneshot::channel();
        {
            let mut st = lock(&self.inner.state);
            if st.closed {
                return Err(ClientError::Closed);
            }
            let read = (kind == NBD_CMD_READ).then_some(ReadState { offset, len, whole: None, buf: None, covered: 0 });
            st.pending.insert(cookie, Pending { done, read, error: None });
        }
        let header = RequestHeader { flags, kind, cookie, offset, len }.encode();
        if self.inner.out.send(Outgoing::Request { header, payload }).is_err() {
            lock(&self.inner.state).pending.remove(&cookie);
            return Err(ClientError::Closed);
        }
        rx.await.map_err(|_| ClientError::Closed)?
    }

    /// Reads `len` bytes at `offset`.
    pub async fn read(&self, offset: u64, len: u32) -> Result<Bytes, ClientError> {
        let data = self.request(NBD_CMD_READ, 0, offset, len, None).await?;
        Ok(data.unwrap_or_default())
    }

    /// Writes `data` at `offset`; with `fua`, completes only once durable.
    pub async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), ClientError> {
        self.write_bytes(offset, Bytes::copy_from_slice(data), fua).await
    }

    /// [`NbdClient::write`] without copying the data.
    pub async fn write_bytes(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), ClientError> {
        let len = u32::try_from(data.len())
            .map_err(|_| ClientError::Protocol(format!("Write of {} bytes does not fit a request", data.len())))?;
        let flags = if fua { NBD_CMD_FLAG_FUA } else { 0 };
        self.request(NBD_CMD_WRITE, flags, offset, len, Some(data)).await.map(drop)
    }

    /// Makes every write completed before it durable (on every connection,
    /// when the server advertises CAN_MULTI_CONN).
    pub async fn flush(&self) -> Result<(), ClientError> {
        self.request(NBD_CMD_FLUSH, 0, 0, 0, None).await.map(drop)
    }

    /// Discards a range (NBD_CMD_TRIM).
    pub async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), ClientError> {
        let flags = if fua { NBD_CMD_FLAG_FUA } else { 0 };
        self.request(NBD_CMD_TRIM, flags, offset, len, None).await.map(drop)
    }

    /// Zeroes a range; `no_hole` asks the server to keep it allocated.
    pub async fn write_zeroes(&self, offset: u64, len: u32, no_hole: bool, fua: bool) -> Result<(), ClientError> {
        let flags = if fua { NBD_CMD_FLAG_FUA } else { 0 } | if no_hole { NBD_CMD_FLAG_NO_HOLE } else { 0 };
        self.request(NBD_CMD_WRITE_ZEROES, flags, offset, len, None).await.map(drop)
    }

    /// Sends NBD_CMD_DISC and waits until the server closed the connection
    /// (it answers every request still in flight first).
    pub async fn disconnect(self) -> Result<(), ClientError> {
        if lock(&self.inner.state).closed {
            return Err(ClientError::Closed);
        }
        let header = RequestHeader { flags: 0, kind: NBD_CMD_DISC, cookie: 0, offset: 0, len: 0 }.encode();
        self.inner.out.send(Outgoing::Request { header, payload: None }).map_err(|_| ClientError::Closed)?;
        let _ = self.inner.out.send(Outgoing::Shutdown);
        let reader = self.inner.reader.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(reader) = reader {
            reader.await.map_err(|e| ClientError::Io(io::Error::other(e)))?;
        }
        Ok(())
    }
}

fn rep_name(reply: u32) -> &'static str {
    match reply {
        NBD_REP_ERR_UNSUP => "NBD_REP_ERR_UNSUP",
        NBD_REP_ERR_POLICY => "NBD_REP_ERR_POLICY",
        NBD_REP_ERR_INVALID => "NBD_REP_ERR_INVALID",
        NBD_REP_ERR_PLATFORM => "NBD_REP_ERR_PLATFORM",
        NBD_REP_ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD",
        NBD_REP_ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN",
        NBD_REP_ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN",
        NBD_REP_ERR_BLOCK_SIZE_REQD => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        NBD_REP_ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG",
        _ => "unknown error",
    }
}

async fn send_option<W: AsyncWrite + Unpin>(w: &mut W, option: u32, data: &[u8]) -> Result<(), ClientError> {
    let len = u32::try_from(data.len()).map_err(|_| ClientError::Protocol("Option data too long".into()))?;
    let mut b = OptionHeader { option, len }.encode().to_vec();
    b.extend_from_slice(data);
    w.write_all(&b).await?;
    w.flush().await?;
    Ok(())
}

/// Reads one option reply to `option`: (reply type, data).
async fn read_option_reply<R: AsyncRead + Unpin>(r: &mut R, option: u32) -> Result<(u32, Vec<u8>), ClientError> {
    let mut hb = [0u8; OptionReplyHeader::LEN];
    r.read_exact(&mut hb).await?;
    let h = OptionReplyHeader::parse(&hb).map_err(|e| ClientError::Protocol(e.to_string()))?;
    if h.option != option {
        return Err(ClientError::Protocol(format!("Reply to option {} while waiting for {option}", h.option)));
    }
    if h.len > MAX_OPTION_DATA {
        return Err(ClientError::Protocol(format!("Option reply of {} bytes", h.len)));
    }
    let mut data = vec![0u8; h.len as usize];
    r.read_exact(&mut data).await?;
    Ok((h.reply, data))
}

async fn writer_loop<W: AsyncWrite + Unpin>(w: W, mut rx: mpsc::UnboundedReceiver<Outgoing>, state: Arc<Mutex<State>>) {
    let mut w = BufWriter::with_capacity(256 * 1024, w);
    while let Some(out) = rx.recv().await {
        let res = match out {
            Outgoing::Request { header, payload } => {
                async {
                    let data = payload.as_deref().unwrap_or_default();
                    write_message(&mut w, &header, data).await?;
                    if rx.is_empty() {
                        w.flush().await?;
                    }
                    Ok::<(), io::Error>(())
                }
                .await
            }
            Outgoing::Shutdown => {
                let _ = w.flush().await;
                let _ = w.shutdown().await;
                return;
            }
        };
        if let Err(e) = res {
            debug!(error = %e, "NBD client write failed");
            let e = ClientError::Io(e);
            lock(&state).close(|| e.duplicate());
            return;
        }
    }
}

async fn reader_loop<R: AsyncRead + Unpin>(mut r: R, state: Arc<Mutex<State>>, structured: bool) {
    let mut buf = BytesMut::with_capacity(256 * 1024);
    let err = loop {
        match read_reply(&mut r, &mut buf, &state, structured).await {
            Ok(true) => {}
            Ok(false) => break None,
            Err(e) => break Some(e),
        }
    };
    if let Some(e) = &err {
        debug!(error = %e, "NBD client connection failed");
    }
    // Every waiting request gets its own copy of the reason.
    lock(&state).close(|| match &err {
        None => ClientError::Closed,
        Some(e) => e.duplicate(),
    });
}

/// Reads into `buf` until it holds `want` bytes; `Ok(false)` on EOF.
async fn fill<R: AsyncRead + Unpin>(r: &mut R, buf: &mut BytesMut, want: usize) -> Result<bool, ClientError> {
    while buf.len() < want {
        buf.reserve(want - buf.len());
        if r.read_buf(buf).await? == 0 {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Handles one reply (or chunk). `Ok(false)`: clean EOF between replies.
async fn read_reply<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    state: &Mutex<State>,
    structured: bool,
) -> Result<bool, ClientError> {
    let (header, hlen) = loop {
        match ReplyHeader::parse(buf).map_err(|e| ClientError::Protocol(e.to_string()))? {
            Some(h) => break h,
            None => {
                if !fill(r, buf, buf.len() + 1).await? {
                    return if buf.is_empty() {
                        Ok(false)
                    } else {
                        Err(ClientError::Protocol("Connection closed in the middle of a reply".into()))
                    };
                }
            }
        }
    };
    buf.advance(hlen);
    let truncated = || ClientError::Protocol("Connection closed in the middle of a reply".into());
    match header {
        ReplyHeader::Simple { error, cookie } => {
            let read_len = {
                let st = lock(state);
                let p = st
                    .pending
                    .get(&cookie)
                    .ok_or_else(|| ClientError::Protocol(format!("Reply for unknown cookie {cookie}")))?;
                p.read.as_ref().map(|rs| rs.len)
            };
            let result = match (error, read_len) {
                (0, Some(len)) => {
                    if !fill(r, buf, len as usize).await? {
                        return Err(truncated());
                    }
                    Ok(Some(buf.split_to(len as usize).freeze()))
                }
                (0, None) => Ok(None),
                (errno, _) => Err(ClientError::Nbd { errno }),
            };
            if let Some(p) = lock(state).pending.remove(&cookie) {
                let _ = p.done.send(result);
            }
        }
        ReplyHeader::Chunk { flags, kind, cookie, len } => {
            if !structured {
                return Err(ClientError::Protocol("Structured reply without negotiation".into()));
            }
            if len > MAX_CHUNK {
                return Err(ClientError::Protocol(format!("Reply chunk of {len} bytes")));
            }
            if !fill(r, buf, len as usize).await? {
                return Err(truncated());
            }
            let payload = buf.split_to(len as usize).freeze();
            let mut st = lock(state);
            let p = st
                .pending
                .get_mut(&cookie)
                .ok_or_else(|| ClientError::Protocol(format!("Reply chunk for unknown cookie {cookie}")))?;
            match kind {
                NBD_REPLY_TYPE_NONE => {
                    if len != 0 || flags & NBD_REPLY_FLAG_DONE == 0 {
                        return Err(ClientError::Protocol("Malformed NBD_REPLY_TYPE_NONE chunk".into()));
                    }
                }
                NBD_REPLY_TYPE_OFFSET_DATA | NBD_REPLY_TYPE_OFFSET_HOLE => {
                    let rs = p
                        .read
                        .as_mut()
                        .ok_or_else(|| ClientError::Protocol("Content chunk in reply to a non-READ".into()))?;
                    let (offset, n) = if kind == NBD_REPLY_TYPE_OFFSET_DATA {
                        if len < 9 {
                            return Err(ClientError::Protocol(
                                "NBD_REPLY_TYPE_OFFSET_DATA shorter than 9 bytes".into(),
                            ));
                        }
                        (u64::from_be_bytes(payload[0..8].try_into().unwrap_or_default()), u64::from(len - 8))
                    } else {
                        if len != 12 {
                            return Err(ClientError::Protocol("NBD_REPLY_TYPE_OFFSET_HOLE not 12 bytes".into()));
                        }
                        let hole = u32::from_be_bytes(payload[8..12].try_into().unwrap_or_default());
                        (u64::from_be_bytes(payload[0..8].try_into().unwrap_or_default()), u64::from(hole))
                    };
                    let start = offset.checked_sub(rs.offset);
                    let within = start.filter(|s| s.checked_add(n).is_some_and(|e| e <= u64::from(rs.len)));
                    let Some(start) = within else {
                        return Err(ClientError::Protocol(format!(
                            "Content chunk {offset}+{n} outside the request {}+{}",
                            rs.offset, rs.len
                        )));
                    };
                    let whole =
                        kind == NBD_REPLY_TYPE_OFFSET_DATA && rs.covered == 0 && start == 0 && n == u64::from(rs.len);
                    if whole {
                        rs.whole = Some(payload.slice(8..));
                    } else {
                        let len = rs.len as usize;
                        let prev = rs.whole.take();
                        let b = rs.buf.get_or_insert_with(|| {
                            let mut b = BytesMut::zeroed(len);
                            if let Some(w) = prev {
                                b.copy_from_slice(&w);
                            }
                            b
                        });
                        let range = start as usize..(start + n) as usize;
                        if kind == NBD_REPLY_TYPE_OFFSET_DATA {
                            b[range].copy_from_slice(&payload[8..]);
                        } else {
                            b[range].fill(0);
                        }
                    }
                    rs.covered += n;
                    if rs.covered > u64::from(rs.len) {
                        return Err(ClientError::Protocol(format!(
                            "Overlapping content chunks for a {}-byte READ",
                            rs.len
                        )));
                    }
                }
                k if k & NBD_REPLY_TYPE_ERROR_BIT != 0 => {
                    let (errno, message) =
                        parse_error_chunk(&payload).map_err(|e| ClientError::Protocol(e.to_string()))?;
                    debug!(cookie, errno, message = %message, "NBD error chunk");
                    // A zero error value is a server bug; treat it as EINVAL
                    // rather than success.
                    p.error.get_or_insert(ClientError::Nbd { errno: if errno == 0 { NBD_EINVAL } else { errno } });
                }
                other => {
                    return Err(ClientError::Protocol(format!("Unknown reply chunk type {other}")));
                }
            }
            if flags & NBD_REPLY_FLAG_DONE != 0 {
                let p = st.pending.remove(&cookie).ok_or_else(|| ClientError::Protocol("Lost request".into()))?;
                let result = match (p.error, p.read) {
                    (Some(e), _) => Err(e),
                    (None, Some(rs)) if rs.covered != u64::from(rs.len) => {
                        Err(ClientError::Protocol(format!("READ reply covers {} of {} bytes", rs.covered, rs.len)))
                    }
                    (None, Some(rs)) => Ok(Some(match (rs.whole, rs.buf) {
                        (Some(w), _) => w,
                        (None, Some(b)) => b.freeze(),
                        (None, None) => Bytes::new(),
                    })),
                    (None, None) => Ok(None),
                };
                let _ = p.done.send(result);
            }
        }
    }
    Ok(true)
}
