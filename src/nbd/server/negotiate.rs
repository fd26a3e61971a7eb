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
}

pub(super) enum Negotiated {
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

pub(super) async fn serve_connection<B, R, W>(
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

/// The fixed newstyle handshake, up to the transmission phase (or abort).
pub(super) async fn handshake<B, R, W>(r: &mut R, w: &mut W, shared: &Shared<B>) -> Result<Negotiated, HandshakeError>
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
