//! Starting and stopping the NBD export of a primary (adapter over
//! [`crate::nbd::server`]).

use std::sync::Arc;
use std::time::Duration;

use super::backend::VolumeBackend;
use crate::config::NbdAddress;

/// How long a client may take over the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the export is started with.
#[derive(Debug, Clone)]
pub struct ExportConfig {
    pub export_name: String,
    pub description: String,
    pub max_connections: usize,
}

/// A running export.
#[derive(Debug)]
pub struct Export {
    _private: (),
}

/// Starts serving `backend` on `addr`.
pub async fn start(addr: &NbdAddress, backend: Arc<VolumeBackend>, cfg: ExportConfig) -> Result<Export, String> {
    // MERGE: replaced by NbdServer::start once the NBD server lands on main.
    let _ = (backend, cfg);
    Err(format!("cannot export on {addr}: the NBD server is not part of this build yet"))
}

impl Export {
    pub fn client_count(&self) -> usize {
        0
    }

    /// Stops accepting, disconnects every client, waits for in-flight
    /// requests.
    pub async fn shutdown(self) {}
}
