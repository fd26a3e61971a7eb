//! The resource configuration file (design.md §6).
//!
//! One TOML file describes a resource and is shared by its nodes; each node
//! finds its own `[[node]]` section by name (`--node`). Every field is
//! documented in `docs/config.md`, with its default and unit.
//!
//! Errors always name the file and the field and say what was expected:
//!
//! ```text
//! r0.toml: node[1].nbd: expected "host:port" or "unix:/path", got "10809"
//! r0.toml: size: "1 GB" is not a size (examples: "512MiB", "1GiB")
//! r0.toml: unknown field "sise" (line 2, column 1)
//! ```
//!
//! Parsing is done in two steps: serde (with `deny_unknown_fields`) reads the
//! file into loosely typed raw tables, so that unknown keys and TOML syntax
//! errors keep their line and column; then [`Config::from_toml`] checks each
//! field by name, so a wrong value is reported as `field: expected …, got …`
//! rather than as a serde type error.
//!
//! Relative paths (`control`, `dir`, `disk`, `nbd = "unix:…"`) are relative
//! to the directory holding the config file.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::failover::{Drift, FailoverTimings, NodeIndex};
use crate::io::EngineChoice;
use crate::model::{AfterSb0Pri, AfterSb1Pri, OnPeerLoss, Protocol, SplitBrainPolicy};
use crate::units;

// The volume owns its defaults and limits; the config file's defaults are
// the same constants.
pub use crate::volume::{
    DEFAULT_BITMAP_GRANULARITY, DEFAULT_BLOCK_SIZE, DEFAULT_CHECKPOINT_BYTES, DEFAULT_CHECKPOINT_INTERVAL,
    DEFAULT_WAL_RETAIN, DEFAULT_WAL_SEGMENT_SIZE, MAX_BITMAP_GRANULARITY, MAX_NAME_LEN, MIN_BITMAP_GRANULARITY,
};
/// Smallest `wal_segment_size` the config file accepts (1 MiB): a rule of
/// the file, stricter than the volume's own floor
/// ([`crate::volume::MIN_WAL_SEGMENT_SIZE`], 64 KiB, which tests use).
pub const MIN_WAL_SEGMENT_SIZE: u64 = 1 << 20;
const _: () = assert!(MIN_WAL_SEGMENT_SIZE >= crate::volume::MIN_WAL_SEGMENT_SIZE);
/// Default `ping_interval`.
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(1);
/// Default `ping_timeout`.
pub const DEFAULT_PING_TIMEOUT: Duration = Duration::from_millis(500);
/// Default `connect_retry` (first reconnect delay; doubles up to [`MAX_CONNECT_RETRY`]).
pub const DEFAULT_CONNECT_RETRY: Duration = Duration::from_millis(100);
/// Longest reconnect delay.
pub const MAX_CONNECT_RETRY: Duration = Duration::from_secs(5);
/// Default `max_buffer` (bytes of replication feed buffered for the peer).
pub const DEFAULT_MAX_BUFFER: u64 = 64 << 20;
/// Default `max_clients`.
pub const DEFAULT_MAX_CLIENTS: u32 = 256;
/// Largest accepted `max_clients`.
pub const MAX_MAX_CLIENTS: u32 = 65536;
/// Smallest accepted `wal_retain`.
pub const MIN_WAL_RETAIN: u64 = 64 << 20;

/// Configuration errors. Every message starts with the file name.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    /// TOML syntax or structure error (with line and column when known).
    #[error("{file}: {message}")]
    Toml { file: String, message: String },
    /// A field is missing or has a wrong value.
    #[error("{file}: {field}: {message}")]
    Field { file: String, field: String, message: String },
    /// A rule involving several fields or nodes.
    #[error("{file}: {message}")]
    Invalid { file: String, message: String },
    #[error("{file}: no node named {name:?} (nodes in this file: {present})")]
    NoSuchNode { file: String, name: String, present: String },
}

/// Where a node exports its volume over NBD.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NbdAddress {
    /// `host:port` (IPv6 hosts in brackets: `[::1]:10809`).
    Tcp { host: String, port: u16 },
    /// `unix:/path/to/socket`.
    Unix(PathBuf),
}

impl fmt::Display for NbdAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NbdAddress::Tcp { host, port } => write!(f, "{host}:{port}"),
            NbdAddress::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl NbdAddress {
    /// The NBD URI a client uses for `export` on this address.
    pub fn uri(&self, export: &str) -> String {
        match self {
            NbdAddress::Tcp { host, port } => format!("nbd://{host}:{port}/{export}"),
            NbdAddress::Unix(path) => format!("nbd+unix:///{export}?socket={}", path.display()),
        }
    }
}

/// One `[[node]]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// Node name, unique in the file.
    pub name: String,
    /// `host:port` the peer connects to (required with two nodes).
    pub replication: Option<String>,
    /// `host:port` to bind for replication (defaults to `replication`).
    pub replication_listen: Option<String>,
    /// NBD export address (served only while primary).
    pub nbd: NbdAddress,
    /// Control socket path (`repctl` talks to it).
    pub control: PathBuf,
    /// Node directory: metadata, WAL, and the data file unless `disk`.
    pub dir: PathBuf,
    /// Optional block device (or file) holding the data.
    pub disk: Option<PathBuf>,
    /// Optional `host:port` serving Prometheus metrics (`GET /metrics`).
    pub metrics: Option<String>,
    /// This node's TLS certificate directory, overriding `[tls] dir`.
    pub tls_dir: Option<PathBuf>,
}

/// A `[[node]]` section with `witness = true`: the diskless third node of
/// automatic failover (docs/failover.md). It has no volume and no NBD
/// export; `dir` holds only `witness.state`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WitnessNodeConfig {
    /// Node name, unique in the file.
    pub name: String,
    /// Its node index: the position of its `[[node]]` section in the file.
    pub index: NodeIndex,
    /// `host:port` the data nodes connect to (required).
    pub replication: String,
    /// `host:port` to bind (defaults to `replication`).
    pub replication_listen: Option<String>,
    /// Control socket path.
    pub control: PathBuf,
    /// Directory holding `witness.state`.
    pub dir: PathBuf,
}

/// `[failover] mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailoverMode {
    /// Manual promote only (today's behaviour; the default).
    #[default]
    Off,
    /// Automatic failover arbitrated by the witness node.
    Witness,
}

impl FailoverMode {
    pub fn as_str(self) -> &'static str {
        match self {
            FailoverMode::Off => "off",
            FailoverMode::Witness => "witness",
        }
    }
}

impl fmt::Display for FailoverMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `[failover]`, validated (docs/config.md, docs/failover.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FailoverConfig {
    pub mode: FailoverMode,
    /// The timings (the `profile`, then each key that overrides it),
    /// validated by [`FailoverTimings::validate`].
    pub timings: FailoverTimings,
    /// Automatic failover with protocol B (acknowledged writes are received,
    /// not yet written, by the secondary).
    pub allow_protocol_b: bool,
}

impl FailoverConfig {
    /// Whether automatic failover is configured (`mode` is not `off`).
    pub fn enabled(&self) -> bool {
        self.mode != FailoverMode::Off
    }
}

/// A validated resource configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file it was read from (as given), for messages.
    pub file: PathBuf,
    /// Resource name; also the NBD export name.
    pub name: String,
    /// Volume size in bytes (a multiple of `block_size`).
    pub size: u64,
    /// Replication protocol, `C` by default.
    pub protocol: Protocol,
    /// Shared secret authenticating the replication link.
    pub secret: Option<String>,
    /// Block size in bytes: a power of two in 512..=1MiB, 4KiB by default.
    pub block_size: u32,
    /// IO engine (`auto` by default).
    pub io_engine: EngineChoice,
    /// WAL segment file size in bytes (64MiB by default).
    pub wal_segment_size: u64,
    /// Checkpoint after this many WAL bytes (256MiB by default).
    pub checkpoint_bytes: u64,
    /// Checkpoint at least this often while writes arrive (30s by default).
    pub checkpoint_interval: Duration,
    /// Maximum concurrent NBD connections (256 by default).
    pub max_clients: u32,
    /// READ/WRITE bytes all NBD connections together may hold between
    /// request and reply (256MiB by default, at least 32MiB).
    pub nbd_max_inflight: u64,
    /// While a request waits for `nbd_max_inflight`, a client whose replies
    /// made no progress for this long is disconnected (30s by default).
    pub nbd_stall_timeout: Duration,
    /// Heartbeat period on the replication link.
    pub ping_interval: Duration,
    /// A peer silent for `ping_interval + ping_timeout` is declared lost.
    pub ping_timeout: Duration,
    /// What a primary does with writes while its peer is lost.
    pub on_peer_loss: OnPeerLoss,
    /// First reconnect delay (doubling up to 5s).
    pub connect_retry: Duration,
    /// Bytes of replication feed buffered for the peer before writes wait.
    pub max_buffer: u64,
    /// Bytes covered by one bit of the dirty bitmap: a power of two in
    /// 4KiB..=1MiB, 4KiB by default. Fixed at create-md.
    pub bitmap_granularity: u32,
    /// WAL bytes kept for a lagging peer's log catch-up (1GiB by default,
    /// at least 64MiB). Beyond it the peer gets a bitmap resync instead.
    pub wal_retain: u64,
    /// Activity-log extents (4 MiB each) kept hot (1237 by default, 7 to
    /// 65534, DRBD's `al-extents`); src/volume/al.rs.
    pub al_extents: usize,
    /// Resync rate cap in bytes per second; `None` = unlimited (the default).
    pub resync_rate: Option<u64>,
    /// Split-brain policy with no primary at connect (`disconnect` by default).
    pub after_sb_0pri: AfterSb0Pri,
    /// Split-brain policy with one primary at connect (`disconnect` by default).
    pub after_sb_1pri: AfterSb1Pri,
    /// `[handlers]`: commands run on events (src/node/handlers.rs).
    pub handlers: Handlers,
    /// `[tls]` (docs/tls.md); all off by default.
    pub tls: TlsConfig,
    /// The data nodes (one or two), in file order.
    pub nodes: Vec<NodeConfig>,
    /// `[failover]` (mode `off` when absent).
    pub failover: FailoverConfig,
    /// The witness node (`[[node]] witness = true`), if any.
    pub witness: Option<WitnessNodeConfig>,
    /// Every `[[node]]` name in file order (data nodes and the witness): a
    /// node's index on the witness link is its position here.
    pub node_order: Vec<String>,
}

/// Default `[handlers] timeout`.
pub const DEFAULT_HANDLER_TIMEOUT: Duration = Duration::from_secs(30);

/// `[handlers]`: each an argv list (no shell), run when its event happens.
#[derive(Debug, Clone, PartialEq)]
pub struct Handlers {
    /// A handler still running after this is killed (30s by default).
    pub timeout: Duration,
    /// Blocking: a bitmap or full resync to this node waits for it; a
    /// failure stops the resync and leaves the node standalone.
    pub before_resync_target: Option<Vec<String>>,
    pub after_resync_target: Option<Vec<String>>,
    /// Called on a primary that lost its peer; with `on_peer_loss =
    /// "suspend"` its exit code decides whether writes resume.
    pub fence_peer: Option<Vec<String>>,
    pub split_brain: Option<Vec<String>>,
    pub peer_lost: Option<Vec<String>>,
    pub on_promote: Option<Vec<String>>,
    pub on_demote: Option<Vec<String>>,
}

impl Default for Handlers {
    fn default() -> Handlers {
        Handlers {
            timeout: DEFAULT_HANDLER_TIMEOUT,
            before_resync_target: None,
            after_resync_target: None,
            fence_peer: None,
            split_brain: None,
            peer_lost: None,
            on_promote: None,
            on_demote: None,
        }
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { file: path.display().to_string(), source })?;
        Config::from_toml(path, &text)
    }

    /// The automatic split-brain policies (`after_sb_0pri`, `after_sb_1pri`).
    pub fn split_brain_policy(&self) -> SplitBrainPolicy {
        SplitBrainPolicy { after_sb_0pri: self.after_sb_0pri, after_sb_1pri: self.after_sb_1pri }
    }

    /// The section of data node `name`, or an error listing the nodes
    /// present (a witness node is named as such: it has no volume).
    pub fn node(&self, name: &str) -> Result<&NodeConfig, ConfigError> {
        self.nodes.iter().find(|n| n.name == name).ok_or_else(|| match &self.witness {
            Some(w) if w.name == name => ConfigError::Invalid {
                file: self.file.display().to_string(),
                message: format!("node {name:?} is the witness (witness = true): it has no volume"),
            },
            _ => ConfigError::NoSuchNode {
                file: self.file.display().to_string(),
                name: name.to_string(),
                present: self.node_order.join(", "),
            },
        })
    }

    /// The witness node if it is called `name`.
    pub fn witness_node(&self, name: &str) -> Option<&WitnessNodeConfig> {
        self.witness.as_ref().filter(|w| w.name == name)
    }

    /// The node index of `name` (its `[[node]]` position), data node or
    /// witness.
    pub fn node_index(&self, name: &str) -> Option<NodeIndex> {
        self.node_order.iter().position(|n| n == name).map(|i| NodeIndex(i as u8))
    }

    /// The name of the node with index `i`.
    pub fn node_name(&self, i: NodeIndex) -> Option<&str> {
        self.node_order.get(usize::from(i.0)).map(String::as_str)
    }

    /// The other node of a two-node resource.
    pub fn peer_of(&self, name: &str) -> Option<&NodeConfig> {
        if self.nodes.len() == 2 { self.nodes.iter().find(|n| n.name != name) } else { None }
    }

    /// Volume options for `node`.
    pub fn volume_options(&self, node: &NodeConfig) -> crate::volume::VolumeOptions {
        crate::volume::VolumeOptions {
            dir: node.dir.clone(),
            disk: node.disk.clone(),
            wal_segment_size: self.wal_segment_size,
            checkpoint_bytes: self.checkpoint_bytes,
            checkpoint_interval: self.checkpoint_interval,
            bitmap_granularity: self.bitmap_granularity,
            wal_retain: self.wal_retain,
            al_extents: self.al_extents,
        }
    }

    /// What the volume of `node` must be.
    pub fn identity(&self, node: &NodeConfig) -> crate::volume::Identity {
        crate::volume::Identity { resource: self.name.clone(), node: node.name.clone(), size: self.size }
    }

    /// What `create-md` writes for `node`.
    pub fn create_options(&self, node: &NodeConfig, force: bool) -> crate::volume::CreateOptions {
        crate::volume::CreateOptions {
            resource: self.name.clone(),
            node: node.name.clone(),
            size: self.size,
            block_size: self.block_size,
            force,
        }
    }
}

/// The single-node config `repd demo` writes: resource `r0`, node `demo`,
/// everything under `dir` (paths relative to the config file).
pub fn demo_toml(size: u64, nbd: &str) -> String {
    format!(
        "# Written by `repd demo`: a single-node resource; see docs/config.md.\n\
         name = \"r0\"\n\
         size = \"{size}\"\n\
         \n\
         [[node]]\n\
         name = \"demo\"\n\
         nbd = \"{nbd}\"\n\
         control = \"control.sock\"\n\
         dir = \"data\"\n",
        size = units::format_size(size),
    )
}

mod parse;
mod tls;

pub use parse::parse_host_port;
pub use tls::TlsConfig;

#[cfg(test)]
mod tests;
