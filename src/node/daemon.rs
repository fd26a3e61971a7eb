//! Running a node: what `repd` does between parsing its arguments and
//! exiting, and the offline `create-md`.
//!
//! Start order matters: the control socket is bound first, so that a second
//! `repd` for the same node is refused before it touches the volume; then the
//! IO engine is chosen, the volume opened (crash recovery runs here), and the
//! control server started.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{Node, NodeError};
use crate::config::{Config, ConfigError, NodeConfig};
use crate::control::{self, ControlError, ControlSocket};
use crate::io::{self, IoEngine};
use crate::repl::engine::EngineConfig;
use crate::tls::TlsContext;
use crate::volume::{self, Volume, VolumeError};

/// File name of the superblock inside a node directory.
pub const SUPERBLOCK_FILE: &str = "meta";

/// How often the daemon looks for a volume that failed on its own (to log
/// it and emit a `failed` event even when nobody asks for status).
const FAILURE_POLL: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("{0}")]
    Engine(String),
    #[error("no metadata in {}: run `repctl --config {} --node {node} create-md`", dir.display(), config.display())]
    NoMetadata { dir: PathBuf, config: PathBuf, node: String },
    #[error("node {node} is running (control socket {} answers); stop repd before create-md", path.display())]
    Running { node: String, path: PathBuf },
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error("{0}")]
    Task(String),
    #[error(transparent)]
    Metrics(#[from] super::metrics::MetricsError),
    /// A `[tls]` credential file is missing or unusable (the message names it).
    #[error("[tls]: {0}")]
    Tls(#[from] crate::tls::TlsError),
}

/// The replication engine's settings of node `me`; `None` for a
/// single-node resource (or a peer without a replication address).
pub fn engine_config(config: &Config, me: &NodeConfig, tls: Option<&Arc<TlsContext>>) -> Option<EngineConfig> {
    let peer = config.peer_of(&me.name)?;
    let peer_addr = peer.replication.clone()?;
    let listen = me.replication_listen.clone().or_else(|| me.replication.clone())?;
    Some(EngineConfig {
        resource: config.name.clone(),
        node: me.name.clone(),
        peer: peer.name.clone(),
        listen,
        peer_addr,
        secret: config.secret.clone().unwrap_or_default().into_bytes(),
        protocol: config.protocol,
        block_size: config.block_size,
        ping_interval: config.ping_interval,
        ping_timeout: config.ping_timeout,
        connect_retry: config.connect_retry,
        max_connect_retry: crate::config::MAX_CONNECT_RETRY,
        max_buffer: usize::try_from(config.max_buffer).unwrap_or(usize::MAX),
        on_peer_loss: config.on_peer_loss,
        resync_rate: config.resync_rate,
        split_brain: config.split_brain_policy(),
        tls: tls.filter(|t| t.settings().replication == crate::tls::ReplTlsMode::Require).cloned(),
        // Set by `Node::with_store`, which owns the event channel the
        // handler reports on.
        before_resync_target: None,
    })
}

/// Chooses the IO engine the config asks for; in a `fault-injection` build
/// only, wrapped by the fault injector when `REPBLOCK_FAULTS` is set.
pub fn engine_for(config: &Config) -> Result<Arc<dyn IoEngine>, DaemonError> {
    let engine = io::select_engine(config.io_engine)
        .map_err(|e| DaemonError::Engine(format!("{}: {e}", config.file.display())))?;
    #[cfg(feature = "fault-injection")]
    let engine = io::fault::wrap_from_env(engine).map_err(DaemonError::Engine)?;
    Ok(engine)
}

/// Initialises the metadata of `node` (offline: refused while its repd
/// answers on the control socket).
pub fn create_md(config: &Config, node: &NodeConfig, force: bool) -> Result<(), DaemonError> {
    if control::daemon_answers(&node.control) {
        return Err(DaemonError::Running { node: node.name.clone(), path: node.control.clone() });
    }
    let engine = engine_for(config)?;
    volume::create_md(&*engine, &config.volume_options(node), &config.create_options(node, force))?;
    tracing::info!(resource = %config.name, node = %node.name, dir = %node.dir.display(), force, "metadata created");
    Ok(())
}

/// Whether `create-md` was run for `node`.
pub fn has_metadata(node: &NodeConfig) -> bool {
    node.dir.join(SUPERBLOCK_FILE).exists()
}

/// A running node: its state machine and its control server.
#[derive(Debug)]
pub struct Daemon {
    node: Arc<Node>,
    stop: watch::Sender<bool>,
    control: JoinHandle<()>,
    watcher: JoinHandle<()>,
    /// The `/metrics` server, if configured.
    metrics: Option<JoinHandle<()>>,
    /// The `[handlers]` runner, if any handler is configured.
    handlers: Option<JoinHandle<()>>,
    /// The witness link (`[failover] mode = "witness"`).
    witness_link: Option<JoinHandle<()>>,
}

impl Daemon {
    /// Starts node `name` of `config` (secondary). Must run inside a
    /// multi-threaded tokio runtime.
    pub async fn start(config: Config, name: &str) -> Result<Daemon, DaemonError> {
        let me = config.node(name)?.clone();
        let socket = ControlSocket::bind(&me.control, &me.name)?;
        let metrics_listener = match &me.metrics {
            Some(addr) => Some(super::metrics::bind(addr).await?),
            None => None,
        };
        if !has_metadata(&me) {
            return Err(DaemonError::NoMetadata {
                dir: me.dir.clone(),
                config: config.file.clone(),
                node: me.name.clone(),
            });
        }
        let engine = engine_for(&config)?;
        let kind = engine.kind();
        let opts = config.volume_options(&me);
        let identity = config.identity(&me);
        let volume: Arc<Volume> = tokio::task::spawn_blocking(move || Volume::open(engine, opts, &identity))
            .await
            .map_err(|e| DaemonError::Task(format!("volume open task failed: {e}")))??;
        let tls = load_tls(&config, &me)?;
        let node = Node::with_store(config, me, Arc::clone(&volume), kind, replication_store(&volume), tls);
        // A node that cannot bind its replication address does not start
        // (as one that cannot bind its control socket).
        if let Err(e) = node.start_replication().await {
            let _ = node.shutdown().await;
            return Err(e.into());
        }
        let (stop, stop_rx) = watch::channel(false);
        let stop_rx_metrics = stop_rx.clone();
        let control = tokio::spawn(socket.serve(Arc::clone(&node), stop_rx.clone()));
        let watcher = {
            let node = Arc::clone(&node);
            let mut stop_rx = stop_rx;
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = control::stopped(&mut stop_rx) => break,
                        _ = tokio::time::sleep(FAILURE_POLL) => { node.check_failed(); }
                    }
                }
            })
        };
        let metrics = metrics_listener.map(|l| {
            if let Ok(addr) = l.local_addr() {
                tracing::info!(%addr, "metrics: serving GET /metrics");
            }
            tokio::spawn(super::metrics::serve(l, Arc::downgrade(&node), stop_rx_metrics))
        });
        let handlers = super::handlers::any(&node.config.handlers).then(|| super::handlers::spawn(&node));
        let witness_link = super::failover::spawn(&node, stop.subscribe());
        tracing::info!(control = %node.me.control.display(), "control socket ready");
        Ok(Daemon { node, stop, control, watcher, metrics, handlers, witness_link })
    }

    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    pub fn control_path(&self) -> &Path {
        &self.node.me.control
    }

    /// Graceful stop: the export goes down, the volume is closed (clean),
    /// the control socket removed.
    pub async fn stop(self) -> Result<(), DaemonError> {
        let res = self.node.shutdown().await;
        // The sender outlives the receivers' last check; ignore "no receiver".
        let _ = self.stop.send(true);
        let _ = self.control.await;
        let _ = self.watcher.await;
        if let Some(m) = self.metrics {
            let _ = m.await;
        }
        if let Some(w) = self.witness_link {
            let _ = w.await;
        }
        if let Some(mut h) = self.handlers {
            // The runner ends at the `stopping` event, after the handlers
            // of the events before it (each bounded by the timeout).
            let bound = self.node.config.handlers.timeout + Duration::from_secs(1);
            if tokio::time::timeout(bound, &mut h).await.is_err() {
                h.abort();
            }
        }
        res.map_err(DaemonError::from)
    }
}

/// The node's TLS credentials, if `[tls]` turns anything on: every file it
/// needs is read and checked now, and certificates expiring within 30 days
/// are warned about.
pub fn load_tls(config: &Config, me: &NodeConfig) -> Result<Option<Arc<TlsContext>>, DaemonError> {
    let Some(settings) = config.tls_settings(me) else { return Ok(None) };
    let ctx = TlsContext::load(settings)?;
    let s = ctx.settings();
    tracing::info!(dir = %s.dir.display(), nbd = s.nbd.as_str(), replication = s.replication.as_str(), nbd_verify_client = s.nbd_verify_client, "TLS credentials loaded");
    for w in ctx.expiry_warnings(std::time::SystemTime::now()) {
        tracing::warn!("TLS: {w}");
    }
    Ok(Some(Arc::new(ctx)))
}

/// The replication engine's view of the volume.
fn replication_store(volume: &Arc<Volume>) -> Option<Arc<dyn crate::repl::store::ReplStore>> {
    Some(Arc::new(crate::repl::volume_store::VolumeStore(Arc::clone(volume))))
}

/// Waits for SIGTERM or SIGINT; returns the signal's name.
pub async fn wait_for_signal() -> std::io::Result<&'static str> {
    Ok(StopSignals::install()?.recv().await)
}

/// SIGTERM and SIGINT handlers, installed at once (a signal that arrives
/// before [`StopSignals::recv`] is kept, not the default action).
#[derive(Debug)]
pub struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    pub fn install() -> std::io::Result<StopSignals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(StopSignals { term: signal(SignalKind::terminate())?, int: signal(SignalKind::interrupt())? })
    }

    /// The next SIGTERM or SIGINT; returns its name.
    pub async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}
