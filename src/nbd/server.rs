//! The NBD server: TCP and Unix socket listeners, the fixed newstyle
//! handshake, and the transmission phase with pipelined requests.
//!
//! Shape (after mini-redis):
//! - one accept task per listener: caps the number of live connections
//!   (a connection beyond `max_connections` is accepted and closed at once),
//!   and on shutdown stops accepting, waits for every connection to end and
//!   removes the Unix socket file;
//! - per connection, the handshake runs under `handshake_timeout`; then a
//!   reader loop parses requests (checking that a whole header is buffered
//!   before parsing), hands each to its own task, and one writer task writes
//!   every reply whole (header and data back to back, never interleaved with
//!   another reply);
//! - back-pressure: each connection holds at most [`MAX_INFLIGHT_REQUESTS`]
//!   requests and [`MAX_INFLIGHT_BYTES`] of READ/WRITE data between parsing a
//!   request and writing its reply, and all connections together at most
//!   `ServerConfig::max_inflight_bytes`; beyond that the reader stops reading.
//!   Clients that never read their replies would hold that global budget
//!   forever, so while a request waits for it, connections whose reply
//!   writes made no progress for `ServerConfig::stall_timeout` are
//!   disconnected (their queued replies freed). Each connection also has a
//!   small reserve ([`CONN_RESERVE_BYTES`]) outside the global budget, so a
//!   client making small requests is served at once whatever the others
//!   hold: memory stays bounded (`max_inflight_bytes + max_connections ×
//!   CONN_RESERVE_BYTES` of request data) and well-behaved clients go on.
//!
//! Error answers follow the NBD spec:
//! - read/trim out of range → EINVAL; write/write-zeroes out of range → ENOSPC;
//! - unknown command, or a flag not valid for the command (DF, REQ_ONE,
//!   FAST_ZERO are not advertised; NO_HOLE only on WRITE_ZEROES) → EINVAL;
//! - READ over the maximum block size (32 MiB) → EINVAL; the spec keeps
//!   EOVERFLOW for reads with the DF flag, which is not advertised;
//! - FLUSH with a nonzero offset or length → EINVAL;
//! - a rejected WRITE has its payload drained (it is at most
//!   [`MAX_BLOCK_SIZE`]) so the stream stays in sync; a WRITE longer than
//!   that, or a bad request magic, closes that one connection;
//! - WRITE_ZEROES and TRIM carry no payload and are served at any length
//!   within the export (as nbdkit and qemu-nbd do; the Linux client sends
//!   large ones);
//! - zero-length READ/WRITE/TRIM/WRITE_ZEROES within the export succeed
//!   without reaching the backend (the spec leaves them unspecified but asks
//!   the server not to disconnect).

use std::fmt;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpSocket, UnixListener};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::proto::*;
use super::wire::write_message;
use super::{BlockBackend, BlockError};

/// Most requests one connection may have between parsing and reply.
pub const MAX_INFLIGHT_REQUESTS: usize = 256;
/// Most READ/WRITE bytes one connection may have between parsing and reply
/// (at least one maximum-size request always fits).
pub const MAX_INFLIGHT_BYTES: usize = 2 * MAX_BLOCK_SIZE as usize;
/// In-flight bytes each connection may hold outside the global budget, so
/// that small requests are served whatever other clients hold. The memory
/// bound is `max_inflight_bytes + max_connections × CONN_RESERVE_BYTES`.
pub const CONN_RESERVE_BYTES: usize = 1 << 20;
/// Default of `ServerConfig::max_inflight_bytes` (256 MiB).
pub const DEFAULT_MAX_INFLIGHT_BYTES: usize = 256 << 20;
/// Default of `ServerConfig::stall_timeout` (30 s).
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a request waiting for the global in-flight budget looks for
/// stalled connections.
const STALL_CHECK: Duration = Duration::from_millis(250);
/// After shutdown starts, how long a reply write to a client that does not
/// read may block before the connection is dropped.
const SHUTDOWN_WRITE_GRACE: Duration = Duration::from_secs(5);
/// Minimum interval between two log lines of one rate-limited kind.
const LOG_INTERVAL: Duration = Duration::from_secs(5);
/// Listen backlog of the TCP listener.
const LISTEN_BACKLOG: u32 = 1024;
const READ_BUF_SIZE: usize = 128 * 1024;
const WRITE_BUF_SIZE: usize = 64 * 1024;

/// The transmission flags every export advertises.
pub const TRANSMISSION_FLAGS: u16 = NBD_FLAG_HAS_FLAGS
    | NBD_FLAG_SEND_FLUSH
    | NBD_FLAG_SEND_FUA
    | NBD_FLAG_SEND_TRIM
    | NBD_FLAG_SEND_WRITE_ZEROES
    | NBD_FLAG_CAN_MULTI_CONN;

// ---------------------------------------------------------------------------
// Listen addresses.
// ---------------------------------------------------------------------------

/// Where the server listens (and the client connects): `"host:port"` (a
/// hostname is resolved) or `"unix:/path/to/socket"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// A listen address that does not parse or resolve.
#[derive(Debug, thiserror::Error)]
pub enum ListenAddrError {
    #[error("Invalid NBD address {input:?}: expected \"host:port\" or \"unix:/path\"")]
    Invalid { input: String },
    #[error("Invalid NBD address {input:?}: empty socket path after \"unix:\"")]
    EmptyUnixPath { input: String },
    #[error("Cannot resolve NBD address {input:?}")]
    Resolve {
        input: String,
        #[source]
        source: io::Error,
    },
}

impl FromStr for ListenAddr {
    type Err = ListenAddrError;

    fn from_str(s: &str) -> Result<ListenAddr, ListenAddrError> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(ListenAddrError::EmptyUnixPath { input: s.to_string() });
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(ListenAddr::Tcp(addr));
        }
        // "host:port" with a name: needs a port after the last colon.
        match s.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {}
            _ => {
                return Err(ListenAddrError::Invalid { input: s.to_string() });
            }
        }
        let addrs: Vec<SocketAddr> =
            s.to_socket_addrs().map_err(|source| ListenAddrError::Resolve { input: s.to_string(), source })?.collect();
        // Prefer IPv4, as "localhost" often lists ::1 first and IPv6 may be
        // disabled; server and client parse the same way, so they agree.
        addrs.iter().find(|a| a.is_ipv4()).or_else(|| addrs.first()).map(|a| ListenAddr::Tcp(*a)).ok_or_else(|| {
            ListenAddrError::Resolve {
                input: s.to_string(),
                source: io::Error::new(io::ErrorKind::NotFound, "no addresses"),
            }
        })
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

// ---------------------------------------------------------------------------
// Configuration and handle.
// ---------------------------------------------------------------------------

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The export's name (the resource name). The empty default export is
    /// served too.
    pub export_name: String,
    /// Shown by NBD_INFO_DESCRIPTION and NBD_OPT_LIST.
    pub description: Option<String>,
    /// Most simultaneous connections (handshaking or transmitting); more are
    /// accepted and closed at once. Default 256.
    pub max_connections: usize,
    /// A handshake not finished within this closes the connection. Default 10 s.
    pub handshake_timeout: Duration,
    /// Most READ/WRITE bytes all connections together may hold between
    /// parsing a request and writing its reply. At least
    /// [`MAX_BLOCK_SIZE`] (one maximum request must fit). Default 256 MiB.
    pub max_inflight_bytes: usize,
    /// While a request waits for the global in-flight budget, a connection
    /// whose reply write made no progress for this long (its client does not
    /// read) is disconnected. Default 30 s.
    pub stall_timeout: Duration,
}

impl ServerConfig {
    pub fn new(export_name: impl Into<String>) -> ServerConfig {
        ServerConfig { export_name: export_name.into(), ..ServerConfig::default() }
    }
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            export_name: String::new(),
            description: None,
            max_connections: 256,
            handshake_timeout: Duration::from_secs(10),
            max_inflight_bytes: DEFAULT_MAX_INFLIGHT_BYTES,
            stall_timeout: DEFAULT_STALL_TIMEOUT,
        }
    }
}

/// The NBD server.
pub struct NbdServer;

/// A running server. Dropping it starts a shutdown without waiting for it.
pub struct NbdHandle {
    local: String,
    listen: ListenAddr,
    clients: Arc<AtomicUsize>,
    shutdown_tx: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl NbdHandle {
    /// The bound address ("ip:port", with port 0 resolved) or the socket path.
    pub fn local_addr(&self) -> String {
        self.local.clone()
    }

    /// The bound address as a [`ListenAddr`] (for clients).
    pub fn listen_addr(&self) -> ListenAddr {
        self.listen.clone()
    }

    /// Connections in the transmission phase.
    pub fn client_count(&self) -> usize {
        self.clients.load(Ordering::SeqCst)
    }

    /// Stops accepting, lets in-flight requests finish and their replies go
    /// out, closes every connection, and returns once all are gone (and the
    /// Unix socket file is removed).
    ///
    /// Requests the server has not started yet get no reply (rather than the
    /// ESHUTDOWN the spec suggests): a client that reconnects, possibly to
    /// the new primary after a failover, resubmits unanswered requests, while
    /// an error reply would reach its filesystem as an IO error. Handshakes
    /// in progress are closed. A client that does not read its replies gets
    /// a few seconds before its connection is dropped.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown_tx.send(true);
        if let Some(task) = self.task.take()
            && let Err(e) = task.await
        {
            warn!(error = %e, "NBD accept task failed");
        }
    }
}

impl fmt::Debug for NbdHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NbdHandle").field("local_addr", &self.local).field("clients", &self.client_count()).finish()
    }
}

impl Drop for NbdHandle {
    fn drop(&mut self) {
        let _ = self.shutdown_tx.send(true);
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl NbdServer {
    /// Binds `addr` and serves `backend` until [`NbdHandle::shutdown`].
    pub async fn start<B: BlockBackend>(
        addr: &ListenAddr,
        backend: Arc<B>,
        cfg: ServerConfig,
    ) -> io::Result<NbdHandle> {
        if cfg.max_connections == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "max_connections must be at least 1"));
        }
        if cfg.max_inflight_bytes < MAX_BLOCK_SIZE as usize || cfg.max_inflight_bytes > Semaphore::MAX_PERMITS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("max_inflight_bytes must be at least {MAX_BLOCK_SIZE} (one maximum request)"),
            ));
        }
        let (listener, local, listen) = match addr {
            ListenAddr::Tcp(a) => {
                // tokio's bind() listens with a backlog of 128: a burst of
                // connects beyond that waits for SYN retransmissions.
                let socket = if a.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
                socket.set_reuseaddr(true)?;
                socket.bind(*a)?;
                let l = socket.listen(LISTEN_BACKLOG)?;
                let bound = l.local_addr()?;
                (Listener::Tcp(l), bound.to_string(), ListenAddr::Tcp(bound))
            }
            ListenAddr::Unix(path) => {
                remove_stale_socket(path)?;
                let l = UnixListener::bind(path)?;
                (Listener::Unix(l, path.clone()), path.display().to_string(), ListenAddr::Unix(path.clone()))
            }
        };
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let clients = Arc::new(AtomicUsize::new(0));
        info!(addr = %listen, export = %cfg.export_name, size = backend.size(), "NBD server listening");
        let shared = Arc::new(Shared::new(backend, cfg, clients.clone(), shutdown_rx));
        let task = tokio::spawn(accept_loop(listener, shared));
        Ok(NbdHandle { local, listen, clients, shutdown_tx, task: Some(task) })
    }
}

/// Removes a socket file left by a dead server. Refuses to remove anything
/// that is not a socket, or a socket a live server still accepts on.
fn remove_stale_socket(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        ));
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{}: another server is listening there", path.display()),
        ));
    }
    debug!(path = %path.display(), "removing stale NBD socket");
    std::fs::remove_file(path)
}

// ---------------------------------------------------------------------------
// Shared state, logging.
// ---------------------------------------------------------------------------

struct Shared<B> {
    backend: Arc<B>,
    cfg: ServerConfig,
    conn_limit: Arc<Semaphore>,
    /// READ/WRITE bytes in flight over all connections.
    inflight: Arc<Semaphore>,
    /// Reply-write progress of every connection in transmission.
    watches: Mutex<std::collections::HashMap<u64, Arc<WriteWatch>>>,
    /// Time base of [`WriteWatch`] stamps.
    epoch: Instant,
    clients: Arc<AtomicUsize>,
    shutdown: watch::Receiver<bool>,
    next_conn: AtomicU64,
    /// Connections refused by the cap.
    log_cap: RateLimit,
    /// Protocol violations and handshake failures (client-triggered).
    log_client: RateLimit,
    /// Backend errors answered to clients.
    log_backend: RateLimit,
    /// accept() failures.
    log_accept: RateLimit,
    /// Connections dropped for not reading their replies.
    log_stall: RateLimit,
}

/// Whether a connection's writer is stuck on a client that does not read.
struct WriteWatch {
    peer: String,
    /// The writer is writing a reply now.
    busy: AtomicBool,
    /// Milliseconds after [`Shared::epoch`] of the last progress: a write
    /// that started, or bytes the socket took.
    progress_ms: AtomicU64,
    /// Set (and `evict` notified) when the connection is to be dropped.
    evicted: AtomicBool,
    evict: Notify,
}

impl WriteWatch {
    fn stalled_for(&self, now_ms: u64) -> Option<u64> {
        let busy = self.busy.load(Ordering::Acquire) && !self.evicted.load(Ordering::Acquire);
        busy.then(|| now_ms.saturating_sub(self.progress_ms.load(Ordering::Acquire)))
    }
}

impl<B> Shared<B> {
    fn new(backend: Arc<B>, cfg: ServerConfig, clients: Arc<AtomicUsize>, shutdown: watch::Receiver<bool>) -> Self {
        Shared {
            backend,
            conn_limit: Arc::new(Semaphore::new(cfg.max_connections)),
            inflight: Arc::new(Semaphore::new(cfg.max_inflight_bytes)),
            watches: Mutex::new(std::collections::HashMap::new()),
            epoch: Instant::now(),
            cfg,
            clients,
            shutdown,
            next_conn: AtomicU64::new(1),
            log_cap: RateLimit::new(),
            log_client: RateLimit::new(),
            log_backend: RateLimit::new(),
            log_accept: RateLimit::new(),
            log_stall: RateLimit::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Disconnects every connection (but `waiting`) whose reply writes made
    /// no progress for `stall_timeout`: the global in-flight budget is
    /// exhausted and they hold part of it without ever giving it back.
    fn evict_stalled(&self, waiting: u64) {
        let now = self.now_ms();
        let limit = self.cfg.stall_timeout.as_millis() as u64;
        let watches = self.watches.lock().unwrap_or_else(|e| e.into_inner());
        for (&id, w) in watches.iter() {
            if id == waiting {
                continue;
            }
            if let Some(ms) = w.stalled_for(now).filter(|&ms| ms >= limit) {
                w.evicted.store(true, Ordering::Release);
                w.evict.notify_one();
                if let Some(suppressed) = self.log_stall.allow() {
                    warn!(
                        conn = id, peer = %w.peer, stalled_ms = ms, suppressed,
                        "NBD client does not read its replies while others wait for in-flight memory; disconnected"
                    );
                }
            }
        }
    }
}

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

/// One log line per [`LOG_INTERVAL`] for a kind of event a client can
/// trigger; counts what it suppressed in between.
struct RateLimit {
    state: Mutex<(Option<Instant>, u64)>,
}

impl RateLimit {
    fn new() -> RateLimit {
        RateLimit { state: Mutex::new((None, 0)) }
    }

    /// `Some(suppressed since the last line)` when a line may be logged now.
    fn allow(&self) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        match s.0 {
            Some(last) if now.duration_since(last) < LOG_INTERVAL => {
                s.1 += 1;
                None
            }
            _ => {
                let suppressed = s.1;
                *s = (Some(now), 0);
                Some(suppressed)
            }
        }
    }
}

/// Resolves once shutdown was requested (or the handle is gone).
async fn wait_shutdown(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

// ---------------------------------------------------------------------------
// Accepting.
// ---------------------------------------------------------------------------

async fn accept_loop<B: BlockBackend>(listener: Listener, shared: Arc<Shared<B>>) {
    let mut shutdown = shared.shutdown.clone();
    let mut conns = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = wait_shutdown(&mut shutdown) => break,
            Some(res) = conns.join_next(), if !conns.is_empty() => {
                if let Err(e) = res {
                    warn!(error = %e, "NBD connection task failed");
                }
                continue;
            }
            a = accept(&listener, &shared) => a,
        };
        let conn = match accepted {
            Ok(c) => c,
            Err(e) => {
                if let Some(suppressed) = shared.log_accept.allow() {
                    warn!(error = %e, suppressed, "NBD accept failed");
                }
                // EMFILE and friends: do not spin.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = shared.conn_limit.clone().try_acquire_owned() else {
            if let Some(suppressed) = shared.log_cap.allow() {
                warn!(
                    peer = %conn.peer,
                    max_connections = shared.cfg.max_connections,
                    suppressed,
                    "NBD connection refused: too many connections"
                );
            }
            drop(conn);
            continue;
        };
        let shared = shared.clone();
        match conn.stream {
            Stream::Tcp(s) => {
                let (r, w) = s.into_split();
                conns.spawn(serve_connection(r, w, conn.id, conn.peer, shared, permit));
            }
            Stream::Unix(s) => {
                let (r, w) = s.into_split();
                conns.spawn(serve_connection(r, w, conn.id, conn.peer, shared, permit));
            }
        }
    }
    if let Listener::Unix(_, path) = &listener
        && let Err(e) = std::fs::remove_file(path)
    {
        warn!(path = %path.display(), error = %e, "cannot remove NBD socket");
    }
    drop(listener);
    debug!(connections = conns.len(), "NBD server stopping; waiting for connections");
    while let Some(res) = conns.join_next().await {
        if let Err(e) = res {
            warn!(error = %e, "NBD connection task failed");
        }
    }
    info!("NBD server stopped");
}

enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

struct Accepted {
    stream: Stream,
    id: u64,
    peer: String,
}

async fn accept<B>(listener: &Listener, shared: &Shared<B>) -> io::Result<Accepted> {
    let (stream, peer) = match listener {
        Listener::Tcp(l) => {
            let (s, peer) = l.accept().await?;
            // Small replies must not wait for Nagle.
            let _ = s.set_nodelay(true);
            (Stream::Tcp(s), peer.to_string())
        }
        Listener::Unix(l, path) => {
            let (s, _) = l.accept().await?;
            (Stream::Unix(s), format!("unix:{}", path.display()))
        }
    };
    Ok(Accepted { stream, id: shared.next_conn.fetch_add(1, Ordering::Relaxed), peer })
}

// ---------------------------------------------------------------------------
// One connection.
// ---------------------------------------------------------------------------

/// Why a connection ended before or during the handshake.
#[derive(Debug, thiserror::Error)]
enum HandshakeError {
    #[error("IO error")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Protocol(String),
    #[error("Handshake not finished within {0:?}")]
    Timeout(Duration),
}

enum Negotiated {
    /// NBD_OPT_ABORT: acknowledged, close.
    Abort,
    /// Enter the transmission phase once `last` (the final handshake reply)
    /// is written: the caller counts the client first, so that a client
    /// seeing the reply also sees itself in [`NbdHandle::client_count`].
    Transmission { structured: bool, last: Vec<u8> },
}

/// Decrements the transmission-phase client count when dropped.
struct ClientGuard(Arc<AtomicUsize>);

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn serve_connection<B, R, W>(
    mut r: R,
    mut w: W,
    id: u64,
    peer: String,
    shared: Arc<Shared<B>>,
    _permit: OwnedSemaphorePermit,
) where
    B: BlockBackend,
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    debug!(conn = id, peer = %peer, "NBD client connected");
    let mut shutdown = shared.shutdown.clone();
    let timeout = shared.cfg.handshake_timeout;
    let negotiated = tokio::select! {
        res = tokio::time::timeout(timeout, handshake(&mut r, &mut w, &shared)) => {
            res.unwrap_or(Err(HandshakeError::Timeout(timeout)))
        }
        _ = wait_shutdown(&mut shutdown) => {
            debug!(conn = id, peer = %peer, "NBD handshake cut short by shutdown");
            return;
        }
    };
    match negotiated {
        Ok(Negotiated::Abort) => {
            debug!(conn = id, peer = %peer, "NBD client aborted the handshake");
            let _ = w.shutdown().await;
        }
        Ok(Negotiated::Transmission { structured, last }) => {
            shared.clients.fetch_add(1, Ordering::SeqCst);
            let _guard = ClientGuard(shared.clients.clone());
            let sent = async {
                w.write_all(&last).await?;
                w.flush().await
            };
            match tokio::time::timeout(timeout, sent).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    debug!(conn = id, peer = %peer, error = %e, "NBD client left at the end of the handshake");
                    return;
                }
                Err(_) => {
                    debug!(conn = id, peer = %peer, "NBD client does not read the end of the handshake");
                    return;
                }
            }
            debug!(conn = id, peer = %peer, structured, "NBD transmission phase");
            let end = transmission(r, w, id, &peer, structured, &shared).await;
            match end {
                End::Eof | End::Disc | End::Shutdown => {
                    debug!(conn = id, peer = %peer, reason = ?end, "NBD client disconnected")
                }
                End::Io(ref e) if is_disconnect(e) => {
                    debug!(conn = id, peer = %peer, error = %e, "NBD client disconnected")
                }
                End::WriterFailed => {
                    debug!(conn = id, peer = %peer, "NBD reply write failed; closing")
                }
                _ => {
                    if let Some(suppressed) = shared.log_client.allow() {
                        info!(conn = id, peer = %peer, reason = %end, suppressed, "NBD connection closed");
                    }
                }
            }
        }
        Err(HandshakeError::Io(e)) if is_disconnect(&e) => {
            debug!(conn = id, peer = %peer, error = %e, "NBD client left during the handshake");
        }
        Err(e) => {
            if let Some(suppressed) = shared.log_client.allow() {
                info!(conn = id, peer = %peer, error = %e, suppressed, "NBD handshake failed");
            }
        }
    }
}

fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
    )
}

/// A client-supplied name for messages and logs: lossy UTF-8, cut to 64
/// characters (error strings must stay within the spec's 4096 bytes).
fn shown_name(name: &[u8]) -> String {
    let s = String::from_utf8_lossy(name);
    match s.char_indices().nth(64) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.into_owned(),
    }
}

fn export_matches(cfg: &ServerConfig, name: &[u8]) -> bool {
    name.is_empty() || name == cfg.export_name.as_bytes()
}

/// The fixed newstyle handshake, up to the transmission phase (or abort).
async fn handshake<B, R, W>(r: &mut R, w: &mut W, shared: &Shared<B>) -> Result<Negotiated, HandshakeError>
where
    B: BlockBackend,
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let cfg = &shared.cfg;
    let size = shared.backend.size();
    w.write_all(&encode_greeting(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES)).await?;
    let mut cf = [0u8; 4];
    r.read_exact(&mut cf).await?;
    let client_flags = u32::from_be_bytes(cf);
    if client_flags & !KNOWN_CLIENT_FLAGS != 0 {
        return Err(HandshakeError::Protocol(format!("Unknown client flags {client_flags:#010x}")));
    }
    let no_zeroes = client_flags & NBD_FLAG_C_NO_ZEROES != 0;
    let mut structured = false;
    loop {
        let mut hb = [0u8; OptionHeader::LEN];
        r.read_exact(&mut hb).await?;
        let h = OptionHeader::parse(&hb).map_err(|e| HandshakeError::Protocol(e.to_string()))?;
        if h.len > MAX_OPTION_DATA {
            return Err(HandshakeError::Protocol(format!(
                "Option {} ({}) carries {} bytes, more than {MAX_OPTION_DATA}",
                h.option,
                option_name(h.option),
                h.len
            )));
        }
        let mut data = vec![0u8; h.len as usize];
        r.read_exact(&mut data).await?;
        let mut out = BytesMut::new();
        let opt = h.option;
        match opt {
            NBD_OPT_EXPORT_NAME => {
                if !export_matches(cfg, &data) {
                    // No way to answer with an error: the spec says close.
                    return Err(HandshakeError::Protocol(format!(
                        "Unknown export {:?} requested by NBD_OPT_EXPORT_NAME",
                        shown_name(&data)
                    )));
                }
                let last = export_name_reply(size, TRANSMISSION_FLAGS, no_zeroes);
                return Ok(Negotiated::Transmission { structured, last });
            }
            NBD_OPT_ABORT => {
                // The spec asks to ignore any data sent with ABORT.
                put_option_reply(&mut out, opt, NBD_REP_ACK, &[]);
                // The client may already be gone; that is fine.
                let _ = w.write_all(&out).await;
                return Ok(Negotiated::Abort);
            }
            NBD_OPT_LIST => {
                if !data.is_empty() {
                    put_option_reply(&mut out, opt, NBD_REP_ERR_INVALID, b"NBD_OPT_LIST takes no data");
                } else {
                    let server = rep_server(&cfg.export_name, cfg.description.as_deref());
                    put_option_reply(&mut out, opt, NBD_REP_SERVER, &server);
                    put_option_reply(&mut out, opt, NBD_REP_ACK, &[]);
                }
            }
            NBD_OPT_STARTTLS => {
                put_option_reply(&mut out, opt, NBD_REP_ERR_UNSUP, b"TLS is not supported by this server");
            }
            NBD_OPT_INFO | NBD_OPT_GO => match InfoRequest::parse(&data) {
                Err(e) => put_option_reply(&mut out, opt, NBD_REP_ERR_INVALID, e.to_string().as_bytes()),
                Ok(req) if !export_matches(cfg, &req.name) => {
                    let msg = format!("Unknown export {:?}", shown_name(&req.name));
                    put_option_reply(&mut out, opt, NBD_REP_ERR_UNKNOWN, msg.as_bytes());
                }
                Ok(req) => {
                    put_option_reply(&mut out, opt, NBD_REP_INFO, &info_export(size, TRANSMISSION_FLAGS));
                    let bs = info_block_size(MIN_BLOCK_SIZE, PREFERRED_BLOCK_SIZE, MAX_BLOCK_SIZE);
                    put_option_reply(&mut out, opt, NBD_REP_INFO, &bs);
                    if req.requests.contains(&NBD_INFO_NAME) {
                        put_option_reply(&mut out, opt, NBD_REP_INFO, &info_string(NBD_INFO_NAME, &cfg.export_name));
                    }
                    if let (true, Some(d)) = (req.requests.contains(&NBD_INFO_DESCRIPTION), &cfg.description) {
                        put_option_reply(&mut out, opt, NBD_REP_INFO, &info_string(NBD_INFO_DESCRIPTION, d));
                    }
                    put_option_reply(&mut out, opt, NBD_REP_ACK, &[]);
                    if opt == NBD_OPT_GO {
                        let last = out.to_vec();
                        return Ok(Negotiated::Transmission { structured, last });
                    }
                }
            },
            NBD_OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    put_option_reply(&mut out, opt, NBD_REP_ERR_INVALID, b"NBD_OPT_STRUCTURED_REPLY takes no data");
                } else {
                    structured = true;
                    put_option_reply(&mut out, opt, NBD_REP_ACK, &[]);
                }
            }
            _ => {
                let msg = format!("Option {opt} ({}) is not supported", option_name(opt));
                put_option_reply(&mut out, opt, NBD_REP_ERR_UNSUP, msg.as_bytes());
            }
        }
        w.write_all(&out).await?;
        w.flush().await?;
    }
}

// ---------------------------------------------------------------------------
// Transmission phase.
// ---------------------------------------------------------------------------

/// Why the transmission phase ended.
#[derive(Debug)]
enum End {
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

async fn transmission<B, R, W>(mut r: R, w: W, id: u64, peer: &str, structured: bool, shared: &Arc<Shared<B>>) -> End
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

/// Fuzz entry points for the server's parsers (see `crate::fuzzing`): they
/// run the real handshake and transmission code on a client's bytes, with a
/// small in-memory backend and a sink for the replies.
#[cfg(feature = "testkit")]
pub(crate) mod fuzz {
    use super::*;
    use crate::nbd::MemoryBackend;

    fn shared(shutdown: watch::Receiver<bool>) -> Arc<Shared<MemoryBackend>> {
        let backend = Arc::new(MemoryBackend::new(1 << 20));
        Arc::new(Shared::new(backend, ServerConfig::new("r0"), Arc::new(AtomicUsize::new(0)), shutdown))
    }

    /// `data` is everything a client sends from the start of the handshake
    /// (client flags, then options).
    pub(crate) async fn option_haggling(data: &[u8]) {
        let (_keep, rx) = watch::channel(false);
        let shared = shared(rx);
        let mut r = data;
        let mut w = tokio::io::sink();
        let _ = handshake(&mut r, &mut w, &shared).await;
    }

    /// `data[0]` bit 0 chooses structured replies; the rest is what a client
    /// sends in the transmission phase (request headers and payloads).
    pub(crate) async fn requests(data: &[u8]) {
        let Some((&first, rest)) = data.split_first() else { return };
        let (_keep, rx) = watch::channel(false);
        let shared = shared(rx);
        let r = std::io::Cursor::new(rest.to_vec());
        let _ = transmission(r, tokio::io::sink(), 1, "fuzz", first & 1 == 1, &shared).await;
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
    fn listen_addr_parsing() {
        assert_eq!(
            "127.0.0.1:10809".parse::<ListenAddr>().unwrap(),
            ListenAddr::Tcp("127.0.0.1:10809".parse().unwrap())
        );
        assert_eq!("[::1]:5".parse::<ListenAddr>().unwrap(), ListenAddr::Tcp("[::1]:5".parse().unwrap()));
        assert_eq!("unix:/run/x.sock".parse::<ListenAddr>().unwrap(), ListenAddr::Unix("/run/x.sock".into()));
        match "localhost:10809".parse::<ListenAddr>().unwrap() {
            ListenAddr::Tcp(a) => {
                assert!(a.ip().is_loopback());
                assert_eq!(a.port(), 10809);
            }
            other => panic!("unexpected {other:?}"),
        }
        for bad in ["", "unix:", "localhost", "host:port", ":80", "1.2.3.4:99999", "/path/only"] {
            assert!(bad.parse::<ListenAddr>().is_err(), "{bad:?} should not parse");
        }
        let a: ListenAddr = "unix:/tmp/a b".parse().unwrap();
        assert_eq!(a.to_string().parse::<ListenAddr>().unwrap(), a);
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

    #[test]
    fn rate_limit_suppresses_and_counts() {
        let r = RateLimit::new();
        assert_eq!(r.allow(), Some(0));
        assert_eq!(r.allow(), None);
        assert_eq!(r.allow(), None);
        r.state.lock().unwrap().0 = Some(Instant::now() - LOG_INTERVAL);
        assert_eq!(r.allow(), Some(2));
    }
}
