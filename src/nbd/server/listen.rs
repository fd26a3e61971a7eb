//! Listen addresses, binding and the accept loop: caps live connections
//! and, on shutdown, waits for every connection and removes the Unix socket.

use std::fmt;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::negotiate::serve_connection;
use super::{BlockBackend, Shared, wait_shutdown};

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

pub(super) enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

/// Removes a socket file left by a dead server. Refuses to remove anything
/// that is not a socket, or a socket a live server still accepts on.
pub(super) fn remove_stale_socket(path: &Path) -> io::Result<()> {
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
// Accepting.
// ---------------------------------------------------------------------------

pub(super) async fn accept_loop<B: BlockBackend>(listener: Listener, shared: Arc<Shared<B>>) {
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
            Stream::Tcp(s) => conns.spawn(serve_connection(s, conn.id, conn.peer, shared, permit)),
            Stream::Unix(s) => conns.spawn(serve_connection(s, conn.id, conn.peer, shared, permit)),
        };
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
