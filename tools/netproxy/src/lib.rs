//! repblock-netproxy: the in-project TCP fault-injection proxy.
//!
//! The test machine has no `tc netem`, so latency, bandwidth caps and
//! partitions between two repblock nodes are injected by this proxy, placed
//! on the replication link (`alpha → proxy → beta`). The replication tests
//! drive it in-process through [`ProxyHandle`]; shell scripts and the
//! benchmark suite run the `netproxy` binary and steer it through its control
//! socket (see [`control`] and docs/netproxy.md).
//!
//! Every accepted connection is forwarded to one upstream address. Each
//! direction is a *delay line*: a chunk is timestamped when it is read and
//! written to the other side at `timestamp + delay`, so the order per
//! connection is kept and throughput is not limited to one chunk per delay.
//! An optional bandwidth cap paces the writes. Byte counters count what was
//! actually written to the other side, so they are exact.
//!
//! [`Mode`] selects a fault for every connection at once: pass, blackhole
//! (read and discard), stall (stop reading and writing: TCP back-pressure)
//! and refuse (close current and new connections). [`ProxyHandle::cut`]
//! closes the current connections once.
//!
//! ```no_run
//! use std::time::Duration;
//! use repblock_netproxy::{Direction, Mode, Proxy};
//!
//! # async fn demo(secondary: std::net::SocketAddr) -> std::io::Result<()> {
//! let proxy = Proxy::start("127.0.0.1:0".parse().unwrap(), secondary).await?;
//! // Point the primary at proxy.local_addr() instead of the secondary.
//! proxy.set_delay_both(Duration::from_millis(5)); // 10 ms round trip
//! proxy.reset_counters();
//! // ... replicate ...
//! let moved = proxy.bytes(Direction::ClientToServer);
//! proxy.set_mode(Mode::Blackhole); // silent link: heartbeats must notice
//! proxy.cut(); // or: the link breaks
//! proxy.shutdown().await;
//! # let _ = moved;
//! # Ok(())
//! # }
//! ```

mod conn;
pub mod control;
mod timer;
pub mod units;

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

/// One direction of a proxied connection. The client is whoever connected to
/// the proxy; the server is the upstream address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Bytes the client sends ("up").
    ClientToServer,
    /// Bytes the server sends back ("down").
    ServerToClient,
}

impl Direction {
    /// Both directions, up first.
    pub const BOTH: [Direction; 2] = [Direction::ClientToServer, Direction::ServerToClient];

    fn index(self) -> usize {
        match self {
            Direction::ClientToServer => 0,
            Direction::ServerToClient => 1,
        }
    }

    /// `"up"` (client to server) or `"down"` (server to client), as in the
    /// control commands and the stats.
    pub fn name(self) -> &'static str {
        match self {
            Direction::ClientToServer => "up",
            Direction::ServerToClient => "down",
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the proxy does with every connection, current and new.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Forward (with the configured delay and rate).
    #[default]
    Pass,
    /// Keep connections open and silently stop forwarding: data is read and
    /// discarded in both directions, including data already in the delay
    /// line. A peer's FIN or reset is held back until the mode is `Pass`
    /// again. New connections are accepted and blackholed too.
    Blackhole,
    /// Keep connections open and stop reading and writing, so TCP
    /// back-pressure builds up on both senders. Nothing is lost: on `Pass`
    /// everything read before resumes in order.
    Stall,
    /// Close current connections (abortively: the peers see a reset) and
    /// close every new one at once after the TCP handshake (`connect()`
    /// succeeds, the first read sees EOF); new connections never reach the
    /// upstream. A partition as seen by a dialing peer.
    Refuse,
}

impl Mode {
    /// The lowercase name used by the control commands and the stats.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Pass => "pass",
            Mode::Blackhole => "blackhole",
            Mode::Stall => "stall",
            Mode::Refuse => "refuse",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A mode name that is not one of `pass`, `blackhole`, `stall`, `refuse`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Unknown mode {0:?} (expected pass, blackhole, stall or refuse)")]
pub struct UnknownMode(pub String);

impl FromStr for Mode {
    type Err = UnknownMode;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "pass" => Ok(Mode::Pass),
            "blackhole" => Ok(Mode::Blackhole),
            "stall" => Ok(Mode::Stall),
            "refuse" => Ok(Mode::Refuse),
            _ => Err(UnknownMode(s.to_string())),
        }
    }
}

/// A snapshot of the proxy's settings and counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stats {
    /// Bytes written to the server (client to server) since start or reset.
    pub bytes_up: u64,
    /// Bytes written to the client (server to client) since start or reset.
    pub bytes_down: u64,
    /// Proxied connections open now.
    pub connections: usize,
    /// Connections accepted since start (refused ones included).
    pub accepted: u64,
    pub mode: Mode,
    pub delay_up: Duration,
    pub delay_down: Duration,
    /// Bandwidth cap client to server, bytes per second (`None`: no cap).
    pub rate_up: Option<u64>,
    /// Bandwidth cap server to client, bytes per second (`None`: no cap).
    pub rate_down: Option<u64>,
}

/// State shared by the handle, the accept loop and every connection.
pub(crate) struct Shared {
    upstream: SocketAddr,
    /// One-way delay per direction, in nanoseconds.
    delay_ns: [AtomicU64; 2],
    /// Bandwidth cap per direction in bytes per second; 0 means no cap.
    rate: [AtomicU64; 2],
    /// Bytes written to the other side, per direction.
    bytes: [AtomicU64; 2],
    connections: AtomicUsize,
    /// Upstream connect failures not logged yet, and when the last warning
    /// was logged: a client in a reconnect loop must not flood the log.
    connect_failures: std::sync::Mutex<(u64, Option<std::time::Instant>)>,
    accepted: AtomicU64,
    mode: watch::Sender<Mode>,
    /// Bumped by every [`ProxyHandle::cut`]; connections watch for a change.
    cut: watch::Sender<u64>,
    shutdown: watch::Sender<bool>,
    /// Set once the accept loop and every connection have ended.
    stopped: watch::Sender<bool>,
}

impl Shared {
    pub(crate) fn delay(&self, dir: Direction) -> Duration {
        Duration::from_nanos(self.delay_ns[dir.index()].load(Ordering::Relaxed))
    }

    pub(crate) fn rate(&self, dir: Direction) -> Option<u64> {
        match self.rate[dir.index()].load(Ordering::Relaxed) {
            0 => None,
            r => Some(r),
        }
    }

    pub(crate) fn count(&self, dir: Direction, n: usize) {
        self.bytes[dir.index()].fetch_add(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    pub(crate) fn mode_rx(&self) -> watch::Receiver<Mode> {
        self.mode.subscribe()
    }

    pub(crate) fn cut_rx(&self) -> watch::Receiver<u64> {
        self.cut.subscribe()
    }

    pub(crate) fn shutdown_rx(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    pub(crate) fn connection_opened(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an upstream connect failure; returns how many to report now
    /// (this one and those suppressed since the last report), or `None` when
    /// a warning went out less than a second ago.
    pub(crate) fn connect_failed(&self) -> Option<u64> {
        let mut g = self.connect_failures.lock().unwrap_or_else(|p| p.into_inner());
        g.0 += 1;
        let now = std::time::Instant::now();
        if g.1.is_some_and(|last| now.duration_since(last) < Duration::from_secs(1)) {
            return None;
        }
        let n = g.0;
        *g = (0, Some(now));
        Some(n)
    }

    pub(crate) fn connection_closed(&self) {
        self.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The proxy. See [`Proxy::start`].
pub struct Proxy;

impl Proxy {
    /// Listens on `listen` (`127.0.0.1:0` picks a free port; see
    /// [`ProxyHandle::local_addr`]) and forwards every accepted connection to
    /// `upstream`, starting in [`Mode::Pass`] with no delay and no rate cap.
    ///
    /// Must be called inside a tokio runtime; the proxy runs on spawned
    /// tasks until [`ProxyHandle::shutdown`] or until the last handle clone
    /// is dropped.
    pub async fn start(listen: SocketAddr, upstream: SocketAddr) -> io::Result<ProxyHandle> {
        let listener = TcpListener::bind(listen).await?;
        let local_addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            upstream,
            delay_ns: [AtomicU64::new(0), AtomicU64::new(0)],
            rate: [AtomicU64::new(0), AtomicU64::new(0)],
            bytes: [AtomicU64::new(0), AtomicU64::new(0)],
            connections: AtomicUsize::new(0),
            connect_failures: std::sync::Mutex::new((0, None)),
            accepted: AtomicU64::new(0),
            mode: watch::Sender::new(Mode::Pass),
            cut: watch::Sender::new(0),
            shutdown: watch::Sender::new(false),
            stopped: watch::Sender::new(false),
        });
        info!(listen = %local_addr, %upstream, "netproxy started");
        tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(ProxyHandle { inner: Arc::new(HandleInner { shared, local_addr }) })
    }
}

/// Controls a running proxy. Cheap to clone; every method takes `&self` and
/// may be called from any task or thread. Settings apply to every connection,
/// current and future.
#[derive(Clone)]
pub struct ProxyHandle {
    inner: Arc<HandleInner>,
}

struct HandleInner {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
}

impl Drop for HandleInner {
    /// The last handle gone, nobody can steer or stop the proxy any more:
    /// stop it rather than leak a listening socket.
    fn drop(&mut self) {
        self.shared.shutdown.send_replace(true);
    }
}

impl fmt::Debug for ProxyHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxyHandle")
            .field("local_addr", &self.inner.local_addr)
            .field("upstream", &self.inner.shared.upstream)
            .finish_non_exhaustive()
    }
}

impl ProxyHandle {
    fn shared(&self) -> &Shared {
        &self.inner.shared
    }

    /// The address the proxy listens on (clients connect here).
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// The address every connection is forwarded to.
    pub fn upstream(&self) -> SocketAddr {
        self.shared().upstream
    }

    /// Sets the one-way latency added to every byte in `dir`. It applies to
    /// data read after the call; data already in the delay line keeps its
    /// release time (order is always kept). An RTT of 10 ms is 5 ms each way.
    pub fn set_delay(&self, dir: Direction, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.shared().delay_ns[dir.index()].store(ns, Ordering::Relaxed);
        debug!(%dir, delay = ?d, "delay set");
    }

    /// Sets the same one-way latency in both directions.
    pub fn set_delay_both(&self, d: Duration) {
        for dir in Direction::BOTH {
            self.set_delay(dir, d);
        }
    }

    /// The one-way latency currently set for `dir`.
    pub fn delay(&self, dir: Direction) -> Duration {
        self.shared().delay(dir)
    }

    /// Caps the bandwidth of `dir` at `bytes_per_sec` per connection
    /// (`None` or `Some(0)`: no cap). Applies at once, to data in flight too.
    pub fn set_rate(&self, dir: Direction, bytes_per_sec: Option<u64>) {
        self.shared().rate[dir.index()].store(bytes_per_sec.unwrap_or(0), Ordering::Relaxed);
        debug!(%dir, rate = ?bytes_per_sec, "rate set");
    }

    /// The bandwidth cap of `dir` in bytes per second, if any.
    pub fn rate(&self, dir: Direction) -> Option<u64> {
        self.shared().rate(dir)
    }

    /// Switches every connection, current and new, to `m` (see [`Mode`]).
    pub fn set_mode(&self, m: Mode) {
        let old = self.shared().mode.send_replace(m);
        if old != m {
            info!(from = %old, to = %m, "mode changed");
        }
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        *self.shared().mode.borrow()
    }

    /// Bytes written to the other side in `dir` since start or the last
    /// [`reset_counters`](Self::reset_counters): counted as each write to the
    /// destination socket returns. Discarded (blackholed) bytes and bytes
    /// still in the delay line are not counted. (A [`cut`](Self::cut) resets
    /// the sockets, which may discard bytes already counted but not yet read
    /// by the peer.)
    pub fn bytes(&self, dir: Direction) -> u64 {
        self.shared().bytes[dir.index()].load(Ordering::Relaxed)
    }

    /// Sets both byte counters to zero (connection counters are kept).
    pub fn reset_counters(&self) {
        for b in &self.shared().bytes {
            b.store(0, Ordering::Relaxed);
        }
    }

    /// Proxied connections open now (from accept until both sides are
    /// closed).
    pub fn connections(&self) -> usize {
        self.shared().connections.load(Ordering::Relaxed)
    }

    /// Connections accepted since start, refused ones included.
    pub fn accepted(&self) -> u64 {
        self.shared().accepted.load(Ordering::Relaxed)
    }

    /// Closes every current connection abortively (both peers see a reset,
    /// data in the delay line is lost). New connections are still accepted.
    pub fn cut(&self) {
        self.shared().cut.send_modify(|epoch| *epoch = epoch.wrapping_add(1));
        info!(connections = self.connections(), "cut");
    }

    /// A snapshot of settings and counters.
    pub fn stats(&self) -> Stats {
        Stats {
            bytes_up: self.bytes(Direction::ClientToServer),
            bytes_down: self.bytes(Direction::ServerToClient),
            connections: self.connections(),
            accepted: self.accepted(),
            mode: self.mode(),
            delay_up: self.delay(Direction::ClientToServer),
            delay_down: self.delay(Direction::ServerToClient),
            rate_up: self.rate(Direction::ClientToServer),
            rate_down: self.rate(Direction::ServerToClient),
        }
    }

    /// Stops listening, closes every connection abortively and returns once
    /// all of them are closed. Other clones of the handle then see a stopped
    /// proxy (counters stay readable).
    pub async fn shutdown(self) {
        let mut stopped = self.shared().stopped.subscribe();
        self.shared().shutdown.send_replace(true);
        // The accept loop sets `stopped` (also if it panicked, through a drop
        // guard), and keeps the sender alive through `shared` we hold.
        wait_until(&mut stopped, |s| *s).await;
    }
}

/// Sets `stopped` when the accept loop ends, however it ends.
struct StoppedGuard(Arc<Shared>);

impl Drop for StoppedGuard {
    fn drop(&mut self) {
        self.0.stopped.send_replace(true);
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let _stopped = StoppedGuard(shared.clone());
    let mut shutdown = shared.shutdown_rx();
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            _ = wait_until(&mut shutdown, |s| *s) => break,
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(e) = done {
                    warn!(error = %e, "connection task failed");
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((client, peer)) => {
                    let watch = conn::Watch::new(&shared);
                    let id = shared.accepted.fetch_add(1, Ordering::Relaxed) + 1;
                    if *shared.mode.borrow() == Mode::Refuse {
                        debug!(conn = id, %peer, "refused");
                        // A plain close (FIN), not a reset: a reset can reach
                        // the client before its connect() returns and fail
                        // it, and Refuse promises a connect that succeeds.
                        drop(client);
                        continue;
                    }
                    tasks.spawn(conn::run(shared.clone(), client, peer, id, watch));
                }
                Err(e) => {
                    // EMFILE and friends: do not spin; the connection stays
                    // in the backlog and is retried.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
        }
    }
    drop(listener);
    // Every connection watches `shutdown` too and closes itself.
    while tasks.join_next().await.is_some() {}
    info!(upstream = %shared.upstream, "netproxy stopped");
}

/// Waits until the watched value satisfies `f`; `false` if the sender is
/// gone. Unlike `Receiver::wait_for` it holds no lock guard in its output, so
/// it can sit in a `select!` of a `Send` future.
pub(crate) async fn wait_until<T>(rx: &mut watch::Receiver<T>, f: impl FnMut(&T) -> bool) -> bool {
    rx.wait_for(f).await.is_ok()
}

/// Closes a socket with a reset instead of a FIN: the way a cut link or a
/// connection closed by `Refuse` looks to the peer; data not yet delivered
/// is lost.
pub(crate) fn abort_close(s: TcpStream) {
    // A zero linger makes close() send RST; it never blocks the thread.
    let _ = s.set_zero_linger();
    drop(s);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connect_failure_warnings_are_rate_limited() {
        let proxy = Proxy::start("127.0.0.1:0".parse().expect("addr"), "127.0.0.1:9".parse().expect("addr"))
            .await
            .expect("start");
        let shared = proxy.shared();
        assert_eq!(shared.connect_failed(), Some(1), "the first failure is reported");
        assert_eq!(shared.connect_failed(), None, "a second one within a second is not");
        assert_eq!(shared.connect_failed(), None);
        // A second later the suppressed ones are reported with the next.
        shared.connect_failures.lock().expect("lock").1 = Some(std::time::Instant::now() - Duration::from_secs(2));
        assert_eq!(shared.connect_failed(), Some(3));
    }

    #[test]
    fn mode_names_round_trip() {
        for m in [Mode::Pass, Mode::Blackhole, Mode::Stall, Mode::Refuse] {
            assert_eq!(m.name().parse::<Mode>(), Ok(m));
            assert_eq!(m.to_string(), m.name());
        }
        assert_eq!("BLACKHOLE".parse::<Mode>(), Ok(Mode::Blackhole));
        assert_eq!("drop".parse::<Mode>(), Err(UnknownMode("drop".into())));
        assert_eq!(Direction::ClientToServer.to_string(), "up");
        assert_eq!(Direction::ServerToClient.to_string(), "down");
    }
}
