//! Starting and stopping the NBD export of a primary (adapter over
//! [`crate::nbd::NbdServer`]).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use super::backend::VolumeBackend;
use crate::config::NbdAddress;
use crate::nbd::{ListenAddr, NbdHandle, NbdServer, NbdTls, ServerConfig};

/// How long a client may take over the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the export is started with.
#[derive(Debug, Clone)]
pub struct ExportConfig {
    pub export_name: String,
    pub description: String,
    pub max_connections: usize,
    /// `nbd_max_inflight`, `nbd_stall_timeout` (config).
    pub max_inflight_bytes: usize,
    pub stall_timeout: Duration,
    /// `[tls] nbd` on or require.
    pub tls: Option<NbdTls>,
}

/// A running export.
pub struct Export {
    handle: NbdHandle,
}

impl fmt::Debug for Export {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Export").field("local_addr", &self.handle.local_addr()).finish()
    }
}

/// Starts serving `backend` on `addr` (creating the directory of a Unix
/// socket).
pub async fn start(addr: &NbdAddress, backend: Arc<VolumeBackend>, cfg: ExportConfig) -> Result<Export, String> {
    let listen: ListenAddr = addr.to_string().parse().map_err(|e| format!("{e}"))?;
    if let NbdAddress::Unix(path) = addr
        && let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty())
    {
        std::fs::create_dir_all(parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    }
    let server_cfg = ServerConfig {
        export_name: cfg.export_name,
        description: Some(cfg.description),
        max_connections: cfg.max_connections,
        handshake_timeout: HANDSHAKE_TIMEOUT,
        max_inflight_bytes: cfg.max_inflight_bytes,
        stall_timeout: cfg.stall_timeout,
    };
    let handle =
        NbdServer::start_with_tls(&listen, backend, server_cfg, cfg.tls).await.map_err(|e| format!("{addr}: {e}"))?;
    Ok(Export { handle })
}

impl Export {
    /// Attached NBD connections.
    pub fn client_count(&self) -> usize {
        self.handle.client_count()
    }

    /// Open NBD connections that negotiated TLS.
    pub fn tls_client_count(&self) -> usize {
        self.handle.tls_client_count()
    }

    /// Stops accepting, lets in-flight requests finish, disconnects every
    /// client, and returns once all are gone.
    pub async fn shutdown(self) {
        self.handle.shutdown().await;
    }
}
