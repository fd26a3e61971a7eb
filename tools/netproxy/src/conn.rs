//! One proxied connection: dial the upstream, then run two delay lines (one
//! per direction) until both sides have closed, or until a cut, `Refuse` or
//! shutdown closes both sockets abortively.
//!
//! A direction is a reader and a writer joined in the connection's task,
//! linked by a queue of timestamped chunks:
//!
//! ```text
//!  src ──read──▶ [chunk, release = read time + delay] ──▶ queue ──▶ wait until release
//!                                                                  ──▶ pace (rate cap)
//!                                                                  ──▶ write to dst, count
//! ```
//!
//! The queue holds at most [`MAX_IN_FLIGHT`] bytes (a semaphore counts
//! them), after which the reader stops reading and TCP back-pressure reaches
//! the sender, like a link whose bandwidth-delay product is full.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::timer::sleep_until;
use crate::{Direction, Mode, Shared, abort_close, wait_until};

/// Largest chunk read at once.
const CHUNK: usize = 256 * 1024;

/// Bytes a direction may hold between read and write: 16 MiB is a 3 GiB/s
/// link with 5 ms of one-way delay, more than loopback moves on the test
/// machines, so the delay line never throttles below the configured rate.
const MAX_IN_FLIGHT: usize = 16 << 20;

/// Pacing granularity under a rate cap: a write is at most this fraction of
/// a second's worth of bytes, so the cap holds over short windows too.
const PACE_DIVISOR: u64 = 100;

/// Why a connection was closed from the proxy's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Abort {
    Cut,
    Refuse,
    Shutdown,
}

/// The signals that close every connection at once. Each future resolves
/// when its signal fires (a dropped sender counts as shutdown).
struct Signals {
    mode: watch::Receiver<Mode>,
    cut: watch::Receiver<u64>,
    shutdown: watch::Receiver<bool>,
}

impl Signals {
    fn new(shared: &Shared) -> Self {
        Signals { mode: shared.mode_rx(), cut: shared.cut_rx(), shutdown: shared.shutdown_rx() }
    }

    async fn fired(&mut self) -> Abort {
        tokio::select! {
            ok = wait_until(&mut self.mode, |m| *m == Mode::Refuse) => {
                if ok { Abort::Refuse } else { Abort::Shutdown }
            }
            r = self.cut.changed() => if r.is_ok() { Abort::Cut } else { Abort::Shutdown },
            _ = wait_until(&mut self.shutdown, |s| *s) => Abort::Shutdown,
        }
    }
}

/// Decrements the open-connection count however the task ends.
struct Live<'a>(&'a Shared);

impl<'a> Live<'a> {
    fn new(shared: &'a Shared) -> Self {
        shared.connection_opened();
        Live(shared)
    }
}

impl Drop for Live<'_> {
    fn drop(&mut self) {
        self.0.connection_closed();
    }
}

/// The receivers of the signals that close a connection, subscribed by the
/// accept loop as soon as a connection is accepted, so that a cut issued
/// after `accept()` returned is never missed.
pub(crate) struct Watch(Signals);

impl Watch {
    pub(crate) fn new(shared: &Shared) -> Self {
        Watch(Signals::new(shared))
    }
}

pub(crate) async fn run(shared: Arc<Shared>, mut client: TcpStream, peer: SocketAddr, id: u64, watch: Watch) {
    let _live = Live::new(&shared);
    let mut signals = watch.0;
    let upstream = shared.upstream();

    let mut server = tokio::select! {
        r = TcpStream::connect(upstream) => match r {
            Ok(s) => s,
            Err(e) => {
                if let Some(failures) = shared.connect_failed() {
                    warn!(conn = id, %peer, %upstream, error = %e, failures, "upstream connect failed, closing client");
                } else {
                    debug!(conn = id, %peer, %upstream, error = %e, "upstream connect failed, closing client");
                }
                abort_close(client);
                return;
            }
        },
        why = signals.fired() => {
            debug!(conn = id, %peer, ?why, "closed while dialing upstream");
            abort_close(client);
            return;
        }
    };
    // Replication links run with TCP_NODELAY; the proxy must not add
    // Nagle delays of its own. Failure only costs latency.
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    debug!(conn = id, %peer, %upstream, "connection open");

    let outcome = {
        let (client_rd, client_wr) = client.split();
        let (server_rd, server_wr) = server.split();
        let up = pump(&shared, Direction::ClientToServer, client_rd, server_wr);
        let down = pump(&shared, Direction::ServerToClient, server_rd, client_wr);
        tokio::select! {
            r = async { tokio::try_join!(up, down) } => r.map(|_| ()).map_err(Err),
            why = signals.fired() => Err(Ok(why)),
        }
    };
    match outcome {
        Ok(()) => debug!(conn = id, %peer, "connection closed by the peers"),
        Err(why) => {
            match why {
                Ok(why) => debug!(conn = id, %peer, ?why, "connection closed by the proxy"),
                // A reset or broken pipe on one side: pass it on as a reset.
                Err(e) => debug!(conn = id, %peer, error = %e, "connection failed"),
            }
            abort_close(client);
            abort_close(server);
        }
    }
}

/// When data read now leaves the delay line (a delay too large to add is
/// treated as "a year from now": never, for a test).
fn release_time(delay: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(delay).unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600))
}

/// What travels through a delay line.
enum Item {
    Data {
        bytes: Vec<u8>,
        release: Instant,
    },
    /// The source half-closed; pass the FIN on after the data before it.
    Eof {
        release: Instant,
    },
}

/// Forwards `src` to `dst` until `src` reaches EOF and that EOF was passed
/// on (`Ok`), or until either side fails (`Err`).
async fn pump(shared: &Shared, dir: Direction, mut src: ReadHalf<'_>, mut dst: WriteHalf<'_>) -> io::Result<()> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Item>();
    let budget = Semaphore::new(MAX_IN_FLIGHT);

    let reader = async {
        let mut mode = shared.mode_rx();
        let mut buf = vec![0u8; CHUNK];
        loop {
            // Stall: leave the data in the kernel, so back-pressure builds.
            if !wait_until(&mut mode, |m| *m != Mode::Stall).await {
                return Ok(());
            }
            let n = tokio::select! {
                r = src.read(&mut buf) => match r {
                    Ok(n) => n,
                    Err(e) => {
                        // A reset is news from the far side like a FIN:
                        // it does not cross a blackhole either.
                        wait_until(&mut mode, |m| *m == Mode::Pass).await;
                        return Err(e);
                    }
                },
                // Re-check the mode (a read is cancel-safe: nothing is lost).
                _ = mode.changed() => continue,
            };
            let release = release_time(shared.delay(dir));
            if n == 0 {
                // The writer may be gone already if it failed; its error wins.
                let _ = tx.send(Item::Eof { release });
                return Ok(());
            }
            if *mode.borrow() == Mode::Blackhole {
                continue;
            }
            // n <= CHUNK, far below u32::MAX; the semaphore is never closed.
            let Ok(permit) = budget.acquire_many(n as u32).await else { return Ok(()) };
            permit.forget();
            // A full-ish buffer is handed over as is (no copy); a small
            // read is copied out, so a queue of small messages does not pin
            // a whole buffer each.
            let bytes = if n >= CHUNK / 4 {
                let mut full = std::mem::replace(&mut buf, vec![0u8; CHUNK]);
                full.truncate(n);
                full
            } else {
                buf[..n].to_vec()
            };
            if tx.send(Item::Data { bytes, release }).is_err() {
                return Ok(());
            }
        }
    };

    let writer = async {
        let mut mode = shared.mode_rx();
        // Rate pacing: the earliest instant the next write may start.
        let mut next_free = Instant::now();
        while let Some(item) = rx.recv().await {
            match item {
                Item::Data { bytes, release } => {
                    if release > Instant::now() {
                        sleep_until(release).await;
                    }
                    let result = write_paced(shared, dir, &mut dst, &mut mode, &bytes, &mut next_free).await;
                    budget.add_permits(bytes.len());
                    result?;
                }
                Item::Eof { release } => {
                    if release > Instant::now() {
                        sleep_until(release).await;
                    }
                    // No FIN gets through a blackhole or a stalled link.
                    if !wait_until(&mut mode, |m| *m == Mode::Pass).await {
                        return Ok(());
                    }
                    dst.shutdown().await?;
                    return Ok(());
                }
            }
        }
        Ok(())
    };

    tokio::try_join!(reader, writer).map(|_| ())
}

/// Writes `bytes` to `dst`, honouring the mode (stall waits, blackhole drops
/// the rest) and the rate cap, and counts every byte written.
async fn write_paced(
    shared: &Shared,
    dir: Direction,
    dst: &mut WriteHalf<'_>,
    mode: &mut watch::Receiver<Mode>,
    bytes: &[u8],
    next_free: &mut Instant,
) -> io::Result<()> {
    let mut off = 0;
    while off < bytes.len() {
        if !wait_until(mode, |m| *m != Mode::Stall).await {
            return Ok(());
        }
        if *mode.borrow() == Mode::Blackhole {
            return Ok(());
        }
        let end = match shared.rate(dir) {
            None => bytes.len(),
            Some(rate) => {
                let now = Instant::now();
                if *next_free > now {
                    sleep_until(*next_free).await;
                }
                let piece = (rate / PACE_DIVISOR).clamp(1, CHUNK as u64) as usize;
                bytes.len().min(off + piece)
            }
        };
        let start = Instant::now();
        let n = dst.write(&bytes[off..end]).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        shared.count(dir, n);
        off += n;
        if let Some(rate) = shared.rate(dir) {
            let cost = Duration::from_secs_f64(n as f64 / rate as f64);
            *next_free = (*next_free).max(start) + cost;
        }
    }
    Ok(())
}
