//! One connection: the fixed newstyle handshake under `handshake_timeout`,
//! then the transmission phase, and what is logged when it ends.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::OwnedSemaphorePermit;
use tracing::{debug, info};

use super::transmission::{End, transmission};
use super::{BlockBackend, ServerConfig, Shared, TRANSMISSION_FLAGS, wait_shutdown};
use crate::nbd::proto::*;

// ---------------------------------------------------------------------------
// One connection.
// ---------------------------------------------------------------------------

/// Why a connection ended before or during the handshake.
#[derive(Debug, thiserror::Error)]
pub(super) enum HandshakeError {
    #[error("IO error")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Protocol(String),
    #[error("Handshake not finished within {0:?}")]
    Timeout(Duration),
    /// The TLS handshake after NBD_OPT_STARTTLS failed (a client without a
    /// certificate under `nbd_verify_client`, one that distrusts ours...).
    #[error("TLS handshake failed ({kind}): {source}")]
    Tls { kind: &'static str, source: io::Error },
}

pub(super) enum Negotiated {
    /// NBD_OPT_ABORT: acknowledged, close.
    Abort,
    /// Enter the transmission phase once `last` (the final handshake reply)
    /// is written: the caller counts the client first, so that a client
    /// seeing the reply also sees itself in [`NbdHandle::client_count`].
    Transmission { structured: bool, last: Vec<u8> },
}

/// Where option haggling stands with respect to TLS (the NBD spec's modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TlsPhase {
    /// NOTLS: STARTTLS is answered `NBD_REP_ERR_UNSUP`.
    NotOffered,
    /// Plain, STARTTLS offered, plain clients served (`nbd = "on"`).
    Offered,
    /// FORCEDTLS before STARTTLS (`nbd = "require"`): every option but
    /// STARTTLS and ABORT is answered `NBD_REP_ERR_TLS_REQD`.
    Required,
    /// TLS is up: a second STARTTLS is `NBD_REP_ERR_INVALID`.
    Up,
}

/// How option haggling ended.
enum Step {
    Done(Negotiated),
    /// STARTTLS was acknowledged: the TLS handshake comes next.
    StartTls,
}

/// The message of `NBD_REP_ERR_TLS_REQD`.
const TLS_REQUIRED: &str =
    "TLS is required by this server: send NBD_OPT_STARTTLS first (nbds:// URI with tls-certificates=DIR)";

/// Decrements the transmission-phase client count when dropped.
struct ClientGuard(Arc<AtomicUsize>);

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A connection's stream, and how it splits into the transmission phase's
/// reader and writer: TCP and Unix sockets into their owned halves, a TLS
/// stream with `tokio::io::split`. One generic transmission loop serves all.
pub(super) trait Halves: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    type R: AsyncRead + Unpin + Send + 'static;
    type W: AsyncWrite + Unpin + Send + 'static;
    fn halves(self) -> (Self::R, Self::W);
}

impl Halves for tokio::net::TcpStream {
    type R = tokio::net::tcp::OwnedReadHalf;
    type W = tokio::net::tcp::OwnedWriteHalf;
    fn halves(self) -> (Self::R, Self::W) {
        self.into_split()
    }
}

impl Halves for tokio::net::UnixStream {
    type R = tokio::net::unix::OwnedReadHalf;
    type W = tokio::net::unix::OwnedWriteHalf;
    fn halves(self) -> (Self::R, Self::W) {
        self.into_split()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Halves for tokio_rustls::server::TlsStream<S> {
    type R = tokio::io::ReadHalf<Self>;
    type W = tokio::io::WriteHalf<Self>;
    fn halves(self) -> (Self::R, Self::W) {
        tokio::io::split(self)
    }
}

/// The stream after negotiation: as accepted, or inside TLS.
enum Conn<S> {
    Plain(S),
    Tls(Box<tokio_rustls::server::TlsStream<S>>),
}

pub(super) async fn serve_connection<B, S>(
    stream: S,
    id: u64,
    peer: String,
    shared: Arc<Shared<B>>,
    _permit: OwnedSemaphorePermit,
) where
    B: BlockBackend,
    S: Halves,
{
    debug!(conn = id, peer = %peer, "NBD client connected");
    let mut shutdown = shared.shutdown.clone();
    let timeout = shared.cfg.handshake_timeout;
    let negotiated = tokio::select! {
        res = tokio::time::timeout(timeout, negotiate(stream, &shared)) => {
            res.unwrap_or(Err(HandshakeError::Timeout(timeout)))
        }
        _ = wait_shutdown(&mut shutdown) => {
            debug!(conn = id, peer = %peer, "NBD handshake cut short by shutdown");
            return;
        }
    };
    match negotiated {
        Ok((n, Conn::Plain(s))) => serve_negotiated(s, n, id, &peer, &shared).await,
        Ok((n, Conn::Tls(s))) => {
            shared.tls_clients.fetch_add(1, Ordering::SeqCst);
            let _guard = ClientGuard(shared.tls_clients.clone());
            serve_negotiated(*s, n, id, &peer, &shared).await
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

/// The greeting, option haggling and, after STARTTLS, the TLS handshake and
/// option haggling again inside TLS (nothing negotiated before STARTTLS
/// carries over, as the spec asks).
async fn negotiate<B, S>(mut s: S, shared: &Shared<B>) -> Result<(Negotiated, Conn<S>), HandshakeError>
where
    B: BlockBackend,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let no_zeroes = greet(&mut s).await?;
    let phase = match &shared.tls {
        None => TlsPhase::NotOffered,
        Some(t) if t.mode == crate::tls::NbdTlsMode::Require => TlsPhase::Required,
        Some(_) => TlsPhase::Offered,
    };
    match options(&mut s, shared, no_zeroes, phase).await? {
        Step::Done(n) => Ok((n, Conn::Plain(s))),
        Step::StartTls => {
            let acceptor = shared
                .tls
                .as_ref()
                .and_then(|t| t.context.nbd_acceptor())
                .ok_or_else(|| HandshakeError::Protocol("STARTTLS acknowledged without TLS credentials".into()))?;
            let mut t = acceptor
                .accept(s)
                .await
                .map_err(|source| HandshakeError::Tls { kind: crate::tls::failure_kind(&source), source })?;
            match options(&mut t, shared, no_zeroes, TlsPhase::Up).await? {
                Step::Done(n) => Ok((n, Conn::Tls(Box::new(t)))),
                Step::StartTls => Err(HandshakeError::Protocol("STARTTLS inside TLS".into())),
            }
        }
    }
}

/// After the handshake: the transmission phase (or the end of an aborted
/// handshake), and what is logged when it ends.
async fn serve_negotiated<B: BlockBackend, S: Halves>(
    s: S,
    negotiated: Negotiated,
    id: u64,
    peer: &str,
    shared: &Arc<Shared<B>>,
) {
    let (r, mut w) = s.halves();
    match negotiated {
        Negotiated::Abort => {
            debug!(conn = id, peer = %peer, "NBD client aborted the handshake");
            let _ = w.shutdown().await;
        }
        Negotiated::Transmission { structured, last } => {
            shared.clients.fetch_add(1, Ordering::SeqCst);
            let _guard = ClientGuard(shared.clients.clone());
            let timeout = shared.cfg.handshake_timeout;
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
            let end = transmission(r, w, id, peer, structured, shared).await;
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
    }
}

pub(super) fn is_disconnect(e: &io::Error) -> bool {
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

/// The fixed newstyle handshake without TLS, up to the transmission phase
/// (or abort): what the fuzz target drives.
#[cfg(feature = "testkit")]
pub(super) async fn handshake<B, S>(s: &mut S, shared: &Shared<B>) -> Result<Negotiated, HandshakeError>
where
    B: BlockBackend,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let no_zeroes = greet(s).await?;
    match options(s, shared, no_zeroes, TlsPhase::NotOffered).await? {
        Step::Done(n) => Ok(n),
        Step::StartTls => Err(HandshakeError::Protocol("STARTTLS without TLS".into())),
    }
}

/// Sends the greeting and reads the client flags; whether the client asked
/// for no zeroes.
async fn greet<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> Result<bool, HandshakeError> {
    s.write_all(&encode_greeting(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES)).await?;
    let mut cf = [0u8; 4];
    s.read_exact(&mut cf).await?;
    let client_flags = u32::from_be_bytes(cf);
    if client_flags & !KNOWN_CLIENT_FLAGS != 0 {
        return Err(HandshakeError::Protocol(format!("Unknown client flags {client_flags:#010x}")));
    }
    Ok(client_flags & NBD_FLAG_C_NO_ZEROES != 0)
}

/// Option haggling, up to the transmission phase, an abort, or an
/// acknowledged STARTTLS. Starts with nothing negotiated (after STARTTLS,
/// nothing from before it is honoured).
async fn options<B, S>(s: &mut S, shared: &Shared<B>, no_zeroes: bool, phase: TlsPhase) -> Result<Step, HandshakeError>
where
    B: BlockBackend,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let cfg = &shared.cfg;
    let size = shared.backend.size();
    let mut structured = false;
    loop {
        let mut hb = [0u8; OptionHeader::LEN];
        s.read_exact(&mut hb).await?;
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
        s.read_exact(&mut data).await?;
        let mut out = BytesMut::new();
        let opt = h.option;
        if phase == TlsPhase::Required && !matches!(opt, NBD_OPT_STARTTLS | NBD_OPT_ABORT) {
            if opt == NBD_OPT_EXPORT_NAME {
                // It cannot be answered with an error: the spec says close.
                return Err(HandshakeError::Protocol(
                    "NBD_OPT_EXPORT_NAME before NBD_OPT_STARTTLS, and TLS is required".into(),
                ));
            }
            put_option_reply(&mut out, opt, NBD_REP_ERR_TLS_REQD, TLS_REQUIRED.as_bytes());
            s.write_all(&out).await?;
            s.flush().await?;
            continue;
        }
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
                return Ok(Step::Done(Negotiated::Transmission { structured, last }));
            }
            NBD_OPT_ABORT => {
                // The spec asks to ignore any data sent with ABORT.
                put_option_reply(&mut out, opt, NBD_REP_ACK, &[]);
                // The client may already be gone; that is fine.
                let _ = s.write_all(&out).await;
                return Ok(Step::Done(Negotiated::Abort));
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
            NBD_OPT_STARTTLS => match phase {
                TlsPhase::NotOffered => {
                    put_option_reply(&mut out, opt, NBD_REP_ERR_UNSUP, b"TLS is not supported by this server");
                }
                TlsPhase::Up => {
                    put_option_reply(&mut out, opt, NBD_REP_ERR_INVALID, b"TLS is already negotiated");
                }
                TlsPhase::Offered | TlsPhase::Required if !data.is_empty() => {
                    put_option_reply(&mut out, opt, NBD_REP_ERR_INVALID, b"NBD_OPT_STARTTLS takes no data");
                }
                TlsPhase::Offered | TlsPhase::Required => {
                    put_option_reply(&mut out, opt, NBD_REP_ACK, &[]);
                    s.write_all(&out).await?;
                    s.flush().await?;
                    return Ok(Step::StartTls);
                }
            },
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
                        return Ok(Step::Done(Negotiated::Transmission { structured, last }));
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
        s.write_all(&out).await?;
        s.flush().await?;
    }
}
