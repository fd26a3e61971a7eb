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
//!
//! One file per layer (as mini-redis splits its server): `listen`
//! (addresses, binding, the accept loop), `negotiate` (one connection and
//! its handshake), `transmission` (requests and replies). This file holds
//! the configuration, the handle and the state they share.

use std::fmt;
use std::io;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::net::{TcpSocket, UnixListener};
use tokio::sync::{Notify, Semaphore, watch};
use tracing::{info, warn};

use super::BlockBackend;
use super::proto::*;

mod listen;
mod negotiate;
mod transmission;

pub use listen::{ListenAddr, ListenAddrError};
use listen::{Listener, accept_loop, remove_stale_socket};

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

/// TLS on the export (`[tls] nbd`, docs/tls.md).
#[derive(Debug, Clone)]
pub struct NbdTls {
    /// `On` or `Require` (`Off` is no `NbdTls` at all).
    pub mode: crate::tls::NbdTlsMode,
    /// The credentials; reloading them changes what new handshakes use.
    pub context: Arc<crate::tls::TlsContext>,
}

/// The NBD server.
pub struct NbdServer;

/// A running server. Dropping it starts a shutdown without waiting for it.
pub struct NbdHandle {
    local: String,
    listen: ListenAddr,
    clients: Arc<AtomicUsize>,
    tls_clients: Arc<AtomicUsize>,
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

    /// Connections that negotiated TLS and are still open.
    pub fn tls_client_count(&self) -> usize {
        self.tls_clients.load(Ordering::SeqCst)
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

impl NbdServer {
    /// Binds `addr` and serves `backend` until [`NbdHandle::shutdown`]
    /// (without TLS: STARTTLS is answered `NBD_REP_ERR_UNSUP`).
    pub async fn start<B: BlockBackend>(
        addr: &ListenAddr,
        backend: Arc<B>,
        cfg: ServerConfig,
    ) -> io::Result<NbdHandle> {
        NbdServer::start_with_tls(addr, backend, cfg, None).await
    }

    /// [`NbdServer::start`], offering or requiring TLS when `tls` is set.
    pub async fn start_with_tls<B: BlockBackend>(
        addr: &ListenAddr,
        backend: Arc<B>,
        cfg: ServerConfig,
        tls: Option<NbdTls>,
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
        let tls_mode = tls.as_ref().map_or("off", |t| t.mode.as_str());
        info!(addr = %listen, export = %cfg.export_name, size = backend.size(), tls = tls_mode, "NBD server listening");
        let mut shared = Shared::new(backend, cfg, clients.clone(), shutdown_rx);
        shared.tls = tls.filter(|t| t.mode != crate::tls::NbdTlsMode::Off);
        let tls_clients = shared.tls_clients.clone();
        let task = tokio::spawn(accept_loop(listener, Arc::new(shared)));
        Ok(NbdHandle { local, listen, clients, tls_clients, shutdown_tx, task: Some(task) })
    }
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
    /// TLS offered or required (`None`: STARTTLS is not supported).
    tls: Option<NbdTls>,
    /// Open connections that negotiated TLS.
    tls_clients: Arc<AtomicUsize>,
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
            tls: None,
            tls_clients: Arc::new(AtomicUsize::new(0)),
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

/// Fuzz entry points for the server's parsers (see `crate::fuzzing`): they
/// run the real handshake and transmission code on a client's bytes, with a
/// small in-memory backend and a sink for the replies.
#[cfg(feature = "testkit")]
pub(crate) mod fuzz {
    use super::negotiate::handshake;
    use super::transmission::transmission;
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
        let mut s = tokio::io::join(data, tokio::io::sink());
        let _ = handshake(&mut s, &shared).await;
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
