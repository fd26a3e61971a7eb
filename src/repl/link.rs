//! Async framed reader and writer over any byte stream (a TCP connection's
//! halves in production, `tokio::io::duplex` in tests).
//!
//! - [`FrameReader::read`] returns one message at a time; data payloads are
//!   slices of its receive buffer (no copy). It is cancel-safe: dropping a
//!   pending `read` (e.g. in `select!` against a heartbeat timer) loses no
//!   bytes.
//! - [`FrameWriter`] accumulates frames and writes them with as few
//!   syscalls as possible: small frames are encoded into one buffer, large
//!   data (Write, SyncData of [`ZERO_COPY_MIN`] bytes or more) is sent from
//!   the caller's `Bytes` with vectored writes, not copied.
//! - [`run_writer`] is the writer task: it drains a channel, batching every
//!   message already queued into one write, and flushes whenever the channel
//!   is empty, so a lone message goes out at once (use TCP_NODELAY) and a
//!   burst goes out in one syscall.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::os::fd::AsRawFd;

use bytes::{Buf, Bytes, BytesMut};
use std::os::fd::RawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use tokio::io::ReadBuf;
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use super::handshake::HandshakeError;
use crate::tls::{SessionInfo, TlsContext};

use tokio::sync::{Notify, mpsc};

use super::proto::{FrameError, Message, check, decode, encode, encode_head};

/// Data at least this large is written from the caller's buffer.
pub const ZERO_COPY_MIN: usize = 64 << 10;
/// Receive buffer growth step.
const READ_CHUNK: usize = 256 << 10;
/// [`run_writer`] stops batching and writes once this much is queued.
pub const BATCH_MAX: usize = 1 << 20;
/// Most buffers handed to one vectored write.
const MAX_IOVECS: usize = 64;

/// Errors on an established replication link. Any of them ends the
/// connection.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("Replication link IO: {0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("Peer closed the connection in the middle of a frame ({buffered} bytes of it received)")]
    Truncated { buffered: usize },
}

/// Reads messages off a byte stream.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    buf: BytesMut,
    /// Adds every byte read (statistics), if set.
    counter: Option<Arc<AtomicU64>>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        FrameReader { inner, buf: BytesMut::with_capacity(READ_CHUNK), counter: None }
    }

    /// Adds every byte read from now on to `counter`.
    pub fn count_into(&mut self, counter: Arc<AtomicU64>) {
        self.counter = Some(counter);
    }

    /// The next message; `Ok(None)` when the peer closed the connection at a
    /// frame boundary. Cancel-safe.
    pub async fn read(&mut self) -> Result<Option<Message>, LinkError> {
        loop {
            if let Some(m) = decode(&mut self.buf)? {
                return Ok(Some(m));
            }
            if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
                self.buf.reserve(READ_CHUNK);
            }
            let n = self.inner.read_buf(&mut self.buf).await?;
            if let Some(c) = &self.counter {
                c.fetch_add(n as u64, Ordering::Relaxed);
            }
            if n == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(LinkError::Truncated { buffered: self.buf.len() });
            }
        }
    }

    /// Bytes received but not yet returned as a message.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    pub fn into_inner(self) -> R {
        self.inner
    }
}

impl FrameReader<LinkRead> {
    /// Whether the next `read` has something to work on without waiting:
    /// a whole frame buffered, or bytes (or the end of the stream, or an
    /// error) waiting in the socket. Asks the kernel (`MSG_PEEK`), not the
    /// runtime's readiness, which a loop busy past its deadline has not
    /// seen updated yet. A silence check asks this before declaring the
    /// peer lost: a loop held up in a slow fsync may have the peer's frames
    /// waiting unread.
    pub fn has_input(&self) -> bool {
        if !matches!(check(&self.buf), Ok(None)) {
            return true;
        }
        // With TLS, records rustls already decrypted but nobody read yet
        // are input, and no longer in the socket.
        if let LinkRead::Tls(_, _, _, probe) = &self.inner
            && probe.load(Ordering::Acquire)
        {
            return true;
        }
        // With TLS this peeks at the encrypted bytes: a record on its way
        // is input too.
        let fd = self.inner.raw_fd();
        let mut byte = 0u8;
        // SAFETY: `fd` is the socket `self.inner` owns for the whole call;
        // the one-byte buffer is valid for writes; MSG_PEEK leaves the
        // stream as it is and MSG_DONTWAIT never blocks.
        let n = unsafe { libc::recv(fd, (&raw mut byte).cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
        // > 0: bytes; 0: the end of the stream; < 0: nothing yet, or an
        // error the next read reports.
        n >= 0 || io::Error::last_os_error().kind() != io::ErrorKind::WouldBlock
    }
}

/// Writes messages to a byte stream, batching them.
#[derive(Debug)]
pub struct FrameWriter<W> {
    inner: W,
    /// Encoded frames not yet moved to `chunks`.
    buf: BytesMut,
    /// Buffers to write, in order.
    chunks: VecDeque<Bytes>,
    /// Bytes in `chunks` and `buf`.
    queued: usize,
    /// Adds every byte written (statistics), if set.
    counter: Option<Arc<AtomicU64>>,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub fn new(inner: W) -> Self {
        FrameWriter { inner, buf: BytesMut::with_capacity(64 << 10), chunks: VecDeque::new(), queued: 0, counter: None }
    }

    /// Adds every byte written from now on to `counter`.
    pub fn count_into(&mut self, counter: Arc<AtomicU64>) {
        self.counter = Some(counter);
    }

    /// Encodes `msg` after what is queued; no IO. Fails only for a message
    /// that cannot be encoded (nothing is queued then).
    pub fn queue(&mut self, msg: &Message) -> Result<(), FrameError> {
        let before = self.buf.len();
        match msg.data() {
            Some(d) if d.len() >= ZERO_COPY_MIN => {
                let data = encode_head(msg, &mut self.buf)?;
                self.queued += self.buf.len() - before;
                self.chunks.push_back(self.buf.split().freeze());
                if let Some(data) = data {
                    self.queued += data.len();
                    self.chunks.push_back(data);
                }
            }
            _ => {
                encode(msg, &mut self.buf)?;
                self.queued += self.buf.len() - before;
            }
        }
        Ok(())
    }

    /// Bytes queued and not yet written.
    pub fn queued_bytes(&self) -> usize {
        self.queued
    }

    /// Writes everything queued (vectored, as few syscalls as the kernel
    /// allows) and flushes the stream. If cancelled, what was not written
    /// stays queued, nothing is written twice.
    pub async fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.chunks.push_back(self.buf.split().freeze());
        }
        while !self.chunks.is_empty() {
            let slices: Vec<IoSlice<'_>> = self.chunks.iter().take(MAX_IOVECS).map(|c| IoSlice::new(c)).collect();
            let mut n = self.inner.write_vectored(&slices).await?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::WriteZero, "replication peer accepts no more bytes"));
            }
            self.queued -= n;
            if let Some(c) = &self.counter {
                c.fetch_add(n as u64, Ordering::Relaxed);
            }
            while n > 0 {
                let Some(front) = self.chunks.front_mut() else { break };
                if n >= front.len() {
                    n -= front.len();
                    self.chunks.pop_front();
                } else {
                    front.advance(n);
                    n = 0;
                }
            }
        }
        self.inner.flush().await
    }

    /// Queues `msg` and flushes.
    pub async fn send(&mut self, msg: &Message) -> Result<(), LinkError> {
        self.queue(msg)?;
        self.flush().await?;
        Ok(())
    }

    /// Flushes, then shuts the stream down for writing (the peer reads
    /// end-of-stream).
    pub async fn shutdown(&mut self) -> io::Result<()> {
        self.flush().await?;
        self.inner.shutdown().await
    }

    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    pub fn into_inner(self) -> W {
        self.inner
    }
}

/// The writer task: sends every message received on `rx`, batching those
/// already waiting into one write (up to [`BATCH_MAX`] bytes) and flushing
/// when the channel is empty. Returns after the last sender is dropped and
/// everything is written (the stream is then shut down for writing), or at
/// the first error.
pub async fn run_writer<W: AsyncWrite + Unpin>(
    w: FrameWriter<W>,
    rx: mpsc::Receiver<Message>,
) -> Result<(), LinkError> {
    run_writer_counted(w, rx, None).await
}

/// Bytes of message data (Write and SyncData payloads) handed to
/// [`run_writer_counted`] and not yet written to the socket. A channel bounds
/// what waits for the writer in messages; this bounds it in bytes, so a
/// sender can stop at a byte budget (the primary's `max_buffer`) whatever the
/// size of its writes.
#[derive(Debug, Default)]
pub struct QueuedBytes {
    bytes: AtomicUsize,
    drained: Notify,
}

impl QueuedBytes {
    /// Counts `n` more bytes handed to the writer.
    pub fn add(&self, n: usize) {
        self.bytes.fetch_add(n, Ordering::AcqRel);
    }

    /// Bytes handed to the writer and not yet written.
    pub fn get(&self) -> usize {
        self.bytes.load(Ordering::Acquire)
    }

    /// Resolves after the writer wrote something out (one waiter: the
    /// sender; a wake-up that comes before the wait is kept).
    pub async fn drained(&self) {
        self.drained.notified().await
    }

    fn written(&self, n: usize) {
        self.bytes.fetch_sub(n, Ordering::AcqRel);
        self.drained.notify_one();
    }
}

/// [`run_writer`], also counting the data bytes it has written out of
/// `counted` (which the sender added them to).
pub async fn run_writer_counted<W: AsyncWrite + Unpin>(
    mut w: FrameWriter<W>,
    mut rx: mpsc::Receiver<Message>,
    counted: Option<Arc<QueuedBytes>>,
) -> Result<(), LinkError> {
    let data_len = |m: &Message| m.data().map_or(0, |d| d.len());
    while let Some(m) = rx.recv().await {
        let mut data = data_len(&m);
        w.queue(&m)?;
        while w.queued_bytes() < BATCH_MAX {
            match rx.try_recv() {
                Ok(m) => {
                    data += data_len(&m);
                    w.queue(&m)?
                }
                Err(_) => break,
            }
        }
        w.flush().await?;
        if let Some(c) = &counted {
            c.written(data);
        }
    }
    w.shutdown().await?;
    Ok(())
}

/// A replication connection: plain TCP, or TCP inside mutual TLS
/// (`[tls] replication = "require"`, docs/tls.md).
pub enum LinkStream {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::TlsStream<TcpStream>>),
}

impl LinkStream {
    /// The TLS session (version, cipher, the peer's certificate), if any.
    pub fn tls_session(&self) -> Option<SessionInfo> {
        match self {
            LinkStream::Tcp(_) => None,
            LinkStream::Tls(t) => Some(match &**t {
                tokio_rustls::TlsStream::Client(c) => SessionInfo::of(c.get_ref().1),
                tokio_rustls::TlsStream::Server(c) => SessionInfo::of(c.get_ref().1),
            }),
        }
    }

    fn tcp(&self) -> &TcpStream {
        match self {
            LinkStream::Tcp(s) => s,
            LinkStream::Tls(t) => t.get_ref().0,
        }
    }
}

/// `AsyncRead` for an enum whose variants each hold a reader first.
macro_rules! delegate_read {
    ($ty:ident, $($variant:ident),+) => {
        impl AsyncRead for $ty {
            fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $($ty::$variant(s, ..) => Pin::new(s).poll_read(cx, buf),)+
                }
            }
        }
    };
}

/// `AsyncWrite` (vectored writes included) for an enum whose variants each
/// hold a writer.
macro_rules! delegate_write {
    ($ty:ident, $($variant:ident),+) => {
        impl AsyncWrite for $ty {
            fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    $($ty::$variant(s) => Pin::new(s).poll_write(cx, buf),)+
                }
            }
            fn poll_write_vectored(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                bufs: &[IoSlice<'_>],
            ) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    $($ty::$variant(s) => Pin::new(s).poll_write_vectored(cx, bufs),)+
                }
            }
            fn is_write_vectored(&self) -> bool {
                match self {
                    $($ty::$variant(s) => s.is_write_vectored(),)+
                }
            }
            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $($ty::$variant(s) => Pin::new(s).poll_flush(cx),)+
                }
            }
            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $($ty::$variant(s) => Pin::new(s).poll_shutdown(cx),)+
                }
            }
        }
    };
}

delegate_read!(LinkStream, Tcp, Tls);
delegate_write!(LinkStream, Tcp, Tls);
delegate_read!(LinkRead, Tcp, Tls);
delegate_write!(LinkWrite, Tcp, Tls);

/// The read half of a [`LinkStream`].
pub enum LinkRead {
    Tcp(OwnedReadHalf),
    /// With the socket's descriptor and [`TlsProbe`]'s flag, for
    /// [`FrameReader::has_input`], and the peer's address.
    Tls(tokio::io::ReadHalf<TlsProbe>, RawFd, Option<std::net::SocketAddr>, Arc<AtomicBool>),
}

/// The write half of a [`LinkStream`].
pub enum LinkWrite {
    Tcp(OwnedWriteHalf),
    Tls(tokio::io::WriteHalf<TlsProbe>),
}

/// A TLS connection that notes, after every read, whether rustls holds
/// plaintext it decrypted but nobody read yet: such bytes are no longer in
/// the socket, so [`FrameReader::has_input`] cannot see them there (the
/// reader half cannot reach the connection through `tokio::io::split`'s
/// lock, hence the shared flag).
pub struct TlsProbe {
    stream: Box<tokio_rustls::TlsStream<TcpStream>>,
    pending: Arc<AtomicBool>,
}

impl TlsProbe {
    fn new(stream: Box<tokio_rustls::TlsStream<TcpStream>>) -> TlsProbe {
        let probe = TlsProbe { stream, pending: Arc::default() };
        probe.note();
        probe
    }

    /// Plaintext buffered (or the peer's close_notify, which the next read
    /// reports as the end of the stream): rustls wants no more input then.
    fn note(&self) {
        let wants_read = match &*self.stream {
            tokio_rustls::TlsStream::Client(c) => c.get_ref().1.wants_read(),
            tokio_rustls::TlsStream::Server(c) => c.get_ref().1.wants_read(),
        };
        self.pending.store(!wants_read, Ordering::Release);
    }
}

impl AsyncRead for TlsProbe {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        let r = Pin::new(&mut *me.stream).poll_read(cx, buf);
        me.note();
        r
    }
}

impl AsyncWrite for TlsProbe {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.get_mut().stream).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.get_mut().stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().stream).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().stream).poll_shutdown(cx)
    }
}

impl LinkRead {
    fn raw_fd(&self) -> RawFd {
        match self {
            LinkRead::Tcp(r) => r.as_ref().as_raw_fd(),
            LinkRead::Tls(_, fd, ..) => *fd,
        }
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> io::Result<std::net::SocketAddr> {
        match self {
            LinkRead::Tcp(r) => r.peer_addr(),
            LinkRead::Tls(_, _, addr, _) => addr.ok_or_else(|| io::Error::other("peer address unknown")),
        }
    }
}

/// Brings a fresh replication connection into TLS when `tls` is set (the
/// dialler as TLS client, expecting the peer's certificate to name `peer`;
/// the acceptor as TLS server, requiring a CA-signed client certificate
/// that names `peer`); plain TCP otherwise. The HMAC handshake runs next,
/// inside. Errors say what was wrong with the peer's certificate.
pub async fn secure(
    stream: TcpStream,
    tls: Option<&TlsContext>,
    dialled_by_us: bool,
    peer: &str,
    timeout: Duration,
) -> Result<LinkStream, HandshakeError> {
    let Some(tls) = tls else { return Ok(LinkStream::Tcp(stream)) };
    let fail = |kind: &'static str, message: String| HandshakeError::Tls { peer: peer.to_string(), kind, message };
    let tls_err = |e: io::Error| fail(crate::tls::failure_kind(&e), e.to_string());
    let run = async {
        if dialled_by_us {
            let connector = tls.repl_connector().ok_or_else(|| fail("local", "no client credentials".into()))?;
            let name = crate::tls::server_name(peer).map_err(|m| fail("local", m))?;
            let t = connector.connect(name, stream).await.map_err(tls_err)?;
            Ok(LinkStream::Tls(Box::new(tokio_rustls::TlsStream::Client(t))))
        } else {
            let acceptor = tls.repl_acceptor().ok_or_else(|| fail("local", "no server credentials".into()))?;
            let t = acceptor.accept(stream).await.map_err(tls_err)?;
            let cert = t.get_ref().1.peer_certificates().and_then(|c| c.first()).cloned();
            let cert = cert.ok_or_else(|| fail("no-certificate", "the peer presented no certificate".into()))?;
            crate::tls::check_peer_name(&cert, peer).map_err(|m| fail("wrong-name", m))?;
            Ok(LinkStream::Tls(Box::new(tokio_rustls::TlsStream::Server(t))))
        }
    };
    match tokio::time::timeout(timeout, run).await {
        Ok(r) => r,
        Err(_) => Err(fail("timeout", format!("TLS handshake not finished within {timeout:?}"))),
    }
}

/// Splits a connection into a framed reader and writer, with TCP_NODELAY
/// set (frames are batched by [`FrameWriter`], not by Nagle). Call after
/// [`super::handshake::handshake`] on the same stream: the handshake reads
/// exactly its own frames, so nothing is lost.
pub fn split_link(stream: LinkStream) -> io::Result<(FrameReader<LinkRead>, FrameWriter<LinkWrite>)> {
    stream.tcp().set_nodelay(true)?;
    let (r, w) = match stream {
        LinkStream::Tcp(s) => {
            let (r, w) = s.into_split();
            (LinkRead::Tcp(r), LinkWrite::Tcp(w))
        }
        LinkStream::Tls(tls) => {
            let fd = tls.get_ref().0.as_raw_fd();
            let addr = tls.get_ref().0.peer_addr().ok();
            let probe = TlsProbe::new(tls);
            let pending = Arc::clone(&probe.pending);
            let (r, w) = tokio::io::split(probe);
            (LinkRead::Tls(r, fd, addr, pending), LinkWrite::Tls(w))
        }
    };
    Ok((FrameReader::new(r), FrameWriter::new(w)))
}

/// [`split_link`] of a plain TCP connection.
pub fn split_tcp(stream: TcpStream) -> io::Result<(FrameReader<LinkRead>, FrameWriter<LinkWrite>)> {
    split_link(LinkStream::Tcp(stream))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repl::proto::GoodbyeReason;

    fn write(lsn: u64, len: usize) -> Message {
        Message::Write {
            lsn,
            offset: lsn * 4096,
            fua: lsn.is_multiple_of(3),
            data: Bytes::from((0..len).map(|i| (i as u8).wrapping_add(lsn as u8)).collect::<Vec<u8>>()),
        }
    }

    #[tokio::test]
    async fn counted_writer_releases_data_bytes_once_written() {
        // A 64 KiB pipe that nobody reads yet: the writer blocks with data queued.
        let (a, b) = tokio::io::duplex(64 << 10);
        let (tx, rx) = mpsc::channel(16);
        let queued = Arc::new(QueuedBytes::default());
        let writer = tokio::spawn(run_writer_counted(FrameWriter::new(a), rx, Some(Arc::clone(&queued))));
        for lsn in 1..=4u64 {
            let m = write(lsn, 256 << 10);
            queued.add(m.data().map_or(0, |d| d.len()));
            tx.send(m).await.expect("queued");
        }
        tx.send(Message::Barrier { upto_lsn: 4 }).await.expect("queued");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(queued.get() > 0, "nothing was read, so data must still count as queued");
        drop(tx);
        let mut r = FrameReader::new(b);
        let mut n = 0;
        while let Some(m) = r.read().await.expect("read") {
            n += 1;
            if let Message::Barrier { .. } = m {
                break;
            }
        }
        assert_eq!(n, 5);
        writer.await.expect("writer task").expect("writer");
        assert_eq!(queued.get(), 0, "every data byte is released once written");
    }

    /// `has_input` never waits, sees frames that arrived while nobody read
    /// (before the runtime noticed), keeps them for `read`, and sees the
    /// end of the stream.
    #[tokio::test]
    async fn has_input_sees_waiting_frames_without_consuming_them() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let a = TcpStream::connect(l.local_addr().expect("addr")).await.expect("connect");
        let (b, _) = l.accept().await.expect("accept");
        let (mut r, _bw) = split_tcp(b).expect("split");
        let (_ar, mut w) = split_tcp(a).expect("split");
        assert!(!r.has_input(), "nothing sent yet");
        w.send(&Message::Ping { seq: 7, sent_ns: 1 }).await.expect("send");
        w.send(&Message::Ping { seq: 8, sent_ns: 2 }).await.expect("send");
        let t = std::time::Instant::now();
        while !r.has_input() {
            assert!(t.elapsed() < std::time::Duration::from_secs(5), "the pings never showed");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(matches!(r.read().await.expect("read"), Some(Message::Ping { seq: 7, .. })));
        assert!(r.has_input(), "the second ping, whole in the buffer or in the socket");
        assert!(matches!(r.read().await.expect("read"), Some(Message::Ping { seq: 8, .. })));
        assert!(!r.has_input(), "everything read");
        drop((w, _ar));
        let t = std::time::Instant::now();
        while !r.has_input() {
            assert!(t.elapsed() < std::time::Duration::from_secs(5), "the end of the stream never showed");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(r.read().await.expect("read").is_none());
    }

    #[tokio::test]
    async fn small_and_large_frames_arrive_in_order() {
        let (a, b) = tokio::io::duplex(8 << 10);
        let mut w = FrameWriter::new(a);
        let mut r = FrameReader::new(b);
        let msgs: Vec<Message> = (1..=40u64)
            .map(|i| match i % 4 {
                0 => write(i, 300 << 10), // zero-copy path, spans many duplex writes
                1 => write(i, 512),
                2 => Message::Barrier { upto_lsn: i },
                _ => Message::Ack { received: i, written: i - 1, durable: i - 2 },
            })
            .collect();
        let expect = msgs.clone();
        let sender = tokio::spawn(async move {
            for m in &msgs {
                w.queue(m).expect("encodable");
            }
            w.shutdown().await.expect("write");
        });
        for m in &expect {
            assert_eq!(r.read().await.expect("read").as_ref(), Some(m));
        }
        assert_eq!(r.read().await.expect("clean end").as_ref(), None);
        sender.await.expect("sender task");
    }

    #[tokio::test]
    async fn writer_task_batches_and_ends_cleanly() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let (tx, rx) = mpsc::channel(1024);
        for i in 1..=500u64 {
            tx.send(write(i, 100)).await.expect("queue");
        }
        tx.send(Message::Goodbye { reason: GoodbyeReason::Shutdown, message: "bye".into() }).await.expect("queue");
        drop(tx);
        run_writer(FrameWriter::new(a), rx).await.expect("writer");
        let mut r = FrameReader::new(b);
        for i in 1..=500u64 {
            assert_eq!(r.read().await.expect("read").and_then(|m| m.lsn()), Some(i));
        }
        assert!(matches!(r.read().await.expect("read"), Some(Message::Goodbye { .. })));
        assert!(r.read().await.expect("eof").is_none());
    }

    #[tokio::test]
    async fn handshake_then_stream_over_loopback_tcp() {
        use crate::model::{DiskState, GenIds, Role};
        use crate::repl::{LocalHello, handshake};
        use std::time::Duration;

        let local = |node: &str, peer: &str| LocalHello {
            resource: "r0".into(),
            node: node.into(),
            peer: peer.into(),
            size: 1 << 20,
            block_size: 4096,
            gen_ids: GenIds::default(),
            role: Role::Secondary,
            disk: DiskState::Consistent,
            secret: b"s3cret".to_vec(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let beta = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let peer = handshake(&mut s, &local("beta", "alpha"), Duration::from_secs(5)).await.expect("beta");
            assert_eq!(peer.node, "alpha");
            let (mut r, w) = split_tcp(s).expect("split");
            let (tx, rx) = mpsc::channel(64);
            let writer = tokio::spawn(run_writer(w, rx));
            let mut last = 0;
            while let Some(m) = r.read().await.expect("read") {
                let lsn = m.lsn().expect("a log record");
                assert_eq!(lsn, last + 1, "in LSN order");
                last = lsn;
                tx.send(Message::Ack { received: lsn, written: lsn, durable: 0 }).await.expect("ack");
            }
            drop(tx);
            writer.await.expect("writer task").expect("writer");
            last
        });
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let peer = handshake(&mut s, &local("alpha", "beta"), Duration::from_secs(5)).await.expect("alpha");
        assert_eq!(peer.node, "beta");
        let (mut r, w) = split_tcp(s).expect("split");
        let (tx, rx) = mpsc::channel(64);
        let writer = tokio::spawn(run_writer(w, rx));
        let n = 2000u64;
        for i in 1..=n {
            let len = if i % 100 == 0 { 128 << 10 } else { 4096 };
            tx.send(write(i, len)).await.expect("queue");
        }
        drop(tx);
        writer.await.expect("writer task").expect("writer");
        let mut acked = 0;
        while let Some(m) = r.read().await.expect("read") {
            if let Message::Ack { received, .. } = m {
                assert!(received > acked, "cumulative acks grow");
                acked = received;
            }
        }
        assert_eq!(acked, n);
        assert_eq!(beta.await.expect("beta task"), n);
    }

    #[tokio::test]
    async fn cancelled_reads_lose_nothing() {
        use rand::{Rng, SeedableRng, rngs::StdRng};
        use std::time::Duration;

        // Encoded messages trickle in, cut at random points, while the
        // reader keeps abandoning `read` on a short timer, as an engine does
        // in `select!` against its heartbeat.
        let msgs: Vec<Message> = (1..=300u64).map(|i| write(i, (i as usize * 37) % 9000)).collect();
        let mut wire = BytesMut::new();
        for m in &msgs {
            encode(m, &mut wire).expect("encode");
        }
        let (mut a, b) = tokio::io::duplex(4096);
        let trickle = tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(7);
            let mut rest = wire.freeze();
            while !rest.is_empty() {
                let n = rng.random_range(1..=rest.len().min(5000));
                a.write_all(&rest.split_to(n)).await.expect("write");
                if rng.random_range(0..4) == 0 {
                    tokio::time::sleep(Duration::from_micros(200)).await;
                }
            }
        });
        let mut r = FrameReader::new(b);
        let mut got = Vec::new();
        let mut abandoned = 0;
        while got.len() < msgs.len() {
            match tokio::time::timeout(Duration::from_micros(100), r.read()).await {
                Ok(m) => got.push(m.expect("read").expect("not yet closed")),
                Err(_) => abandoned += 1,
            }
        }
        trickle.await.expect("trickle");
        assert_eq!(got, msgs);
        assert!(r.read().await.expect("clean end").is_none());
        assert!(abandoned > 0, "the test did cancel some reads");
    }

    #[tokio::test]
    async fn eof_inside_a_frame_is_truncation() {
        let (mut a, b) = tokio::io::duplex(1 << 16);
        let mut buf = BytesMut::new();
        encode(&write(7, 1000), &mut buf).expect("encode");
        a.write_all(&buf[..buf.len() - 10]).await.expect("write");
        drop(a);
        let mut r = FrameReader::new(b);
        match r.read().await {
            Err(LinkError::Truncated { buffered }) => assert_eq!(buffered, buf.len() - 10),
            other => panic!("expected truncation, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn data_is_a_slice_of_the_receive_buffer() {
        let (mut a, b) = tokio::io::duplex(1 << 20);
        let mut buf = BytesMut::new();
        encode(&write(1, 4096), &mut buf).expect("encode");
        encode(&write(2, 4096), &mut buf).expect("encode");
        a.write_all(&buf).await.expect("write");
        let mut r = FrameReader::new(b);
        let (Some(Message::Write { data: d1, .. }), Some(Message::Write { data: d2, .. })) =
            (r.read().await.expect("read"), r.read().await.expect("read"))
        else {
            panic!("expected two writes");
        };
        // Both payloads point into the one receive buffer: no copy was made.
        let gap = d2.as_ptr() as usize - d1.as_ptr() as usize;
        assert_eq!(gap, 4096 + crate::repl::proto::FRAME_HEADER_LEN + 17);
    }
}
