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

use crate::io::EngineChoice;
use crate::repl::decide::{AfterSb0Pri, AfterSb1Pri, SplitBrainPolicy};
use crate::units;

/// Longest accepted resource or node name.
pub const MAX_NAME_LEN: usize = 64;
/// Default `block_size`.
pub const DEFAULT_BLOCK_SIZE: u32 = 4096;
/// Default `wal_segment_size`.
pub const DEFAULT_WAL_SEGMENT_SIZE: u64 = 64 << 20;
/// Smallest accepted `wal_segment_size`.
pub const MIN_WAL_SEGMENT_SIZE: u64 = 1 << 20;
/// Default `checkpoint_bytes`.
pub const DEFAULT_CHECKPOINT_BYTES: u64 = 256 << 20;
/// Default `checkpoint_interval`.
pub const DEFAULT_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(30);
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
/// Default `bitmap_granularity` (bytes covered by one bit of the dirty bitmap).
pub const DEFAULT_BITMAP_GRANULARITY: u32 = 4 << 10;
/// Smallest accepted `bitmap_granularity`.
pub const MIN_BITMAP_GRANULARITY: u32 = 4 << 10;
/// Largest accepted `bitmap_granularity`.
pub const MAX_BITMAP_GRANULARITY: u32 = 1 << 20;
/// Default `wal_retain` (WAL kept for log catch-up of a lagging peer).
pub const DEFAULT_WAL_RETAIN: u64 = 1 << 30;
/// Smallest accepted `wal_retain`.
pub const MIN_WAL_RETAIN: u64 = 64 << 20;

/// `on_peer_loss`: what a primary does with writes while its peer is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnPeerLoss {
    /// Keep serving alone (the next connect resyncs the peer).
    Continue,
    /// Block writes until the peer is back and in sync, or `repctl resume-io`.
    Suspend,
}

impl fmt::Display for OnPeerLoss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OnPeerLoss::Continue => "continue",
            OnPeerLoss::Suspend => "suspend",
        })
    }
}

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

/// Replication protocol (design.md §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum Protocol {
    /// Asynchronous: a write completes once local.
    A,
    /// Semi-synchronous: … and once the peer received it.
    B,
    /// Synchronous: … and once the peer wrote it.
    #[default]
    C,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::A => "A",
            Protocol::B => "B",
            Protocol::C => "C",
        })
    }
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
    /// Resync rate cap in bytes per second; `None` = unlimited (the default).
    pub resync_rate: Option<u64>,
    /// Split-brain policy with no primary at connect (`disconnect` by default).
    pub after_sb_0pri: AfterSb0Pri,
    /// Split-brain policy with one primary at connect (`disconnect` by default).
    pub after_sb_1pri: AfterSb1Pri,
    /// `[handlers]`: commands run on events (src/node/handlers.rs).
    pub handlers: Handlers,
    /// The nodes (one or two).
    pub nodes: Vec<NodeConfig>,
}

// Raw forms: exactly the keys the file may hold, values still untyped so
// that the per-field checks below can name the field in their errors.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    name: Option<toml::Value>,
    size: Option<toml::Value>,
    protocol: Option<toml::Value>,
    secret: Option<toml::Value>,
    block_size: Option<toml::Value>,
    io_engine: Option<toml::Value>,
    wal_segment_size: Option<toml::Value>,
    checkpoint_bytes: Option<toml::Value>,
    checkpoint_interval: Option<toml::Value>,
    max_clients: Option<toml::Value>,
    nbd_max_inflight: Option<toml::Value>,
    nbd_stall_timeout: Option<toml::Value>,
    ping_interval: Option<toml::Value>,
    ping_timeout: Option<toml::Value>,
    on_peer_loss: Option<toml::Value>,
    connect_retry: Option<toml::Value>,
    max_buffer: Option<toml::Value>,
    bitmap_granularity: Option<toml::Value>,
    wal_retain: Option<toml::Value>,
    resync_rate: Option<toml::Value>,
    after_sb_0pri: Option<toml::Value>,
    after_sb_1pri: Option<toml::Value>,
    handlers: Option<RawHandlers>,
    node: Option<Vec<RawNode>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHandlers {
    timeout: Option<toml::Value>,
    after_resync_target: Option<toml::Value>,
    split_brain: Option<toml::Value>,
    peer_lost: Option<toml::Value>,
    on_promote: Option<toml::Value>,
    on_demote: Option<toml::Value>,
}

/// Default `[handlers] timeout`.
pub const DEFAULT_HANDLER_TIMEOUT: Duration = Duration::from_secs(30);

/// `[handlers]`: each an argv list (no shell), run when its event happens.
#[derive(Debug, Clone, PartialEq)]
pub struct Handlers {
    /// A handler still running after this is killed (30s by default).
    pub timeout: Duration,
    pub after_resync_target: Option<Vec<String>>,
    pub split_brain: Option<Vec<String>>,
    pub peer_lost: Option<Vec<String>>,
    pub on_promote: Option<Vec<String>>,
    pub on_demote: Option<Vec<String>>,
}

impl Default for Handlers {
    fn default() -> Handlers {
        Handlers {
            timeout: DEFAULT_HANDLER_TIMEOUT,
            after_resync_target: None,
            split_brain: None,
            peer_lost: None,
            on_promote: None,
            on_demote: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: Option<toml::Value>,
    replication: Option<toml::Value>,
    replication_listen: Option<toml::Value>,
    nbd: Option<toml::Value>,
    control: Option<toml::Value>,
    dir: Option<toml::Value>,
    disk: Option<toml::Value>,
    metrics: Option<toml::Value>,
}

/// Field checker bound to one file (keeps messages uniform).
struct Checker<'a> {
    file: &'a str,
    base: &'a Path,
}

impl Checker<'_> {
    fn err(&self, field: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Field { file: self.file.to_string(), field: field.to_string(), message: message.into() }
    }

    fn required<'v>(
        &self,
        field: &str,
        v: &'v Option<toml::Value>,
        example: &str,
    ) -> Result<&'v toml::Value, ConfigError> {
        v.as_ref().ok_or_else(|| self.err(field, format!("missing (expected e.g. {field} = {example})")))
    }

    fn string(&self, field: &str, v: &toml::Value, what: &str) -> Result<String, ConfigError> {
        match v {
            toml::Value::String(s) => Ok(s.clone()),
            other => Err(self.err(field, format!("expected {what}, got {}", describe(other)))),
        }
    }

    fn name(&self, field: &str, v: &toml::Value) -> Result<String, ConfigError> {
        let s = self.string(field, v, "a name string")?;
        let ok_chars = s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if s.is_empty() || s.len() > MAX_NAME_LEN || !ok_chars || s == "." || s == ".." {
            return Err(
                self.err(field, format!("expected 1 to {MAX_NAME_LEN} characters from [A-Za-z0-9_.-], got {s:?}"))
            );
        }
        Ok(s)
    }

    fn size(&self, field: &str, v: &toml::Value) -> Result<u64, ConfigError> {
        match v {
            toml::Value::String(s) => units::parse_size(s).map_err(|e| self.err(field, e.to_string())),
            toml::Value::Integer(i) => {
                u64::try_from(*i).map_err(|_| self.err(field, format!("expected a size, got the negative number {i}")))
            }
            other => Err(self.err(field, format!("expected a size such as \"1GiB\", got {}", describe(other)))),
        }
    }

    /// A rate in bytes per second: `"100MiB/s"` (or `"100MiB"`), or an
    /// integer number of bytes per second. Zero is refused (a resync that
    /// never moves would never end; say "unlimited" or a real rate).
    fn rate(&self, field: &str, v: &toml::Value) -> Result<u64, ConfigError> {
        let expected = "expected a rate such as \"100MiB/s\" or \"unlimited\"";
        let bytes = match v {
            toml::Value::String(s) => {
                let size = s.strip_suffix("/s").unwrap_or(s);
                units::parse_size(size).map_err(|_| self.err(field, format!("{expected}, got {s:?}")))?
            }
            toml::Value::Integer(i) => {
                u64::try_from(*i).map_err(|_| self.err(field, format!("{expected}, got {i}")))?
            }
            other => return Err(self.err(field, format!("{expected}, got {}", describe(other)))),
        };
        if bytes == 0 {
            return Err(self.err(field, format!("{expected}, got 0 (a resync would never finish)")));
        }
        Ok(bytes)
    }

    fn duration(&self, field: &str, v: &toml::Value) -> Result<Duration, ConfigError> {
        match v {
            toml::Value::String(s) => units::parse_duration(s).map_err(|e| self.err(field, e.to_string())),
            other => Err(self.err(field, format!("expected a duration such as \"30s\", got {}", describe(other)))),
        }
    }

    fn host_port(&self, field: &str, v: &toml::Value) -> Result<String, ConfigError> {
        let s = self.string(field, v, "\"host:port\"")?;
        parse_host_port(&s).ok_or_else(|| self.err(field, format!("expected \"host:port\", got {s:?}")))?;
        Ok(s)
    }

    fn path(&self, field: &str, v: &toml::Value) -> Result<PathBuf, ConfigError> {
        let s = self.string(field, v, "a path")?;
        if s.is_empty() {
            return Err(self.err(field, "expected a path, got \"\""));
        }
        Ok(self.base.join(s))
    }

    fn nbd(&self, field: &str, v: &toml::Value) -> Result<NbdAddress, ConfigError> {
        let expected = "expected \"host:port\" or \"unix:/path\"";
        let s = match v {
            toml::Value::String(s) => s.clone(),
            other => return Err(self.err(field, format!("{expected}, got {}", describe(other)))),
        };
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(self.err(field, format!("{expected}, got {s:?}")));
            }
            return Ok(NbdAddress::Unix(self.base.join(path)));
        }
        match parse_host_port(&s) {
            Some((host, port)) => Ok(NbdAddress::Tcp { host: host.to_string(), port }),
            None => Err(self.err(field, format!("{expected}, got {s:?}"))),
        }
    }
}

/// Splits `host:port` (`[v6]:port` for IPv6); `None` when malformed.
pub fn parse_host_port(s: &str) -> Option<(&str, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    if port == 0 {
        return None;
    }
    let host_ok = if let Some(inner) = host.strip_prefix('[') {
        inner.strip_suffix(']').is_some_and(|h| h.parse::<std::net::Ipv6Addr>().is_ok())
    } else {
        !host.is_empty()
            && !host.contains(':')
            && host.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
    };
    host_ok.then_some((host, port))
}

/// `"a", "b" or "c"` for an error message.
fn one_of(names: &[&str]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("{n:?}")).collect();
    match quoted.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    }
}

fn describe(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => format!("{s:?}"),
        toml::Value::Integer(i) => format!("the number {i}"),
        toml::Value::Float(x) => format!("the number {x}"),
        toml::Value::Boolean(b) => format!("{b}"),
        toml::Value::Datetime(d) => format!("the date {d}"),
        toml::Value::Array(_) => "an array".to_string(),
        toml::Value::Table(_) => "a table".to_string(),
    }
}

/// The text before byte `offset`, cut at a character boundary.
fn before(text: &str, offset: usize) -> &str {
    let mut end = offset.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = before(text, offset);
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// Turns a toml/serde error into one line: `unknown field "sise" (line 2, column 1)`,
/// prefixed with `node[i]: ` when it falls inside the i-th `[[node]]` table.
fn toml_message(text: &str, e: &toml::de::Error) -> String {
    let mut msg = e.message().trim().replace('\n', "; ");
    // serde says "unknown field `sise`, expected one of `name`, …".
    if let Some((field, tail)) = msg.strip_prefix("unknown field `").and_then(|rest| rest.split_once('`')) {
        let expected = tail.trim_start_matches(", ").replace('`', "");
        msg = format!("unknown field {field:?} ({expected})");
    }
    let Some(span) = e.span() else { return msg };
    let (line, col) = line_col(text, span.start);
    let node_headers = before(text, span.start).lines().filter(|l| l.trim_start().starts_with("[[node]]")).count();
    // Top-level keys come before the first [[node]]; after it, a key belongs
    // to the latest node table.
    let prefix = if node_headers > 0 { format!("node[{}]: ", node_headers - 1) } else { String::new() };
    format!("{prefix}{msg} (line {line}, column {col})")
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { file: path.display().to_string(), source })?;
        Config::from_toml(path, &text)
    }

    /// Validates config text; `path` names it in errors and anchors relative
    /// paths.
    pub fn from_toml(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        // Relative paths in the file are anchored at its directory, made
        // absolute so logs and the daemon do not depend on the working
        // directory.
        let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let base = absolute.parent().map(Path::to_path_buf).unwrap_or_default();
        let raw: RawConfig = toml::from_str(text)
            .map_err(|e| ConfigError::Toml { file: file.clone(), message: toml_message(text, &e) })?;
        let c = Checker { file: &file, base: &base };

        let name = c.name("name", c.required("name", &raw.name, "\"r0\"")?)?;
        let size = c.size("size", c.required("size", &raw.size, "\"1GiB\"")?)?;
        let protocol = match &raw.protocol {
            None => Protocol::default(),
            Some(v) => match c.string("protocol", v, "\"A\", \"B\" or \"C\"")?.as_str() {
                "A" => Protocol::A,
                "B" => Protocol::B,
                "C" => Protocol::C,
                other => return Err(c.err("protocol", format!("expected \"A\", \"B\" or \"C\", got {other:?}"))),
            },
        };
        let secret = match &raw.secret {
            None => None,
            Some(v) => {
                let s = c.string("secret", v, "a string")?;
                if s.is_empty() {
                    return Err(c.err("secret", "expected a non-empty string, got \"\""));
                }
                Some(s)
            }
        };
        let block_size = match &raw.block_size {
            None => DEFAULT_BLOCK_SIZE,
            Some(v) => {
                let b = c.size("block_size", v)?;
                if !b.is_power_of_two() || !(512..=(1 << 20)).contains(&b) {
                    return Err(c.err(
                        "block_size",
                        format!("expected a power of two from 512B to 1MiB, got {}", units::format_size(b)),
                    ));
                }
                b as u32
            }
        };
        if size == 0 || size % u64::from(block_size) != 0 {
            return Err(c.err(
                "size",
                format!(
                    "expected a non-zero multiple of block_size ({}), got {} ({size} bytes)",
                    units::format_size(block_size.into()),
                    units::format_size(size)
                ),
            ));
        }
        let io_engine = match &raw.io_engine {
            None => EngineChoice::Auto,
            Some(v) => match c.string("io_engine", v, "\"auto\", \"io_uring\" or \"sync\"")?.as_str() {
                "auto" => EngineChoice::Auto,
                "io_uring" => EngineChoice::IoUring,
                "sync" => EngineChoice::Sync,
                other => {
                    return Err(
                        c.err("io_engine", format!("expected \"auto\", \"io_uring\" or \"sync\", got {other:?}"))
                    );
                }
            },
        };
        let wal_segment_size = match &raw.wal_segment_size {
            None => DEFAULT_WAL_SEGMENT_SIZE,
            Some(v) => {
                let s = c.size("wal_segment_size", v)?;
                if s < MIN_WAL_SEGMENT_SIZE || s % 4096 != 0 {
                    return Err(c.err(
                        "wal_segment_size",
                        format!("expected at least 1MiB and a multiple of 4KiB, got {}", units::format_size(s)),
                    ));
                }
                s
            }
        };
        let checkpoint_bytes = match &raw.checkpoint_bytes {
            None => DEFAULT_CHECKPOINT_BYTES,
            Some(v) => {
                let s = c.size("checkpoint_bytes", v)?;
                if s == 0 {
                    return Err(c.err("checkpoint_bytes", "expected a non-zero size, got 0"));
                }
                s
            }
        };
        let checkpoint_interval = match &raw.checkpoint_interval {
            None => DEFAULT_CHECKPOINT_INTERVAL,
            Some(v) => {
                let d = c.duration("checkpoint_interval", v)?;
                if d.is_zero() {
                    return Err(c.err("checkpoint_interval", "expected a non-zero duration, got 0s"));
                }
                d
            }
        };
        let max_clients = match &raw.max_clients {
            None => DEFAULT_MAX_CLIENTS,
            Some(toml::Value::Integer(n)) if (1..=i64::from(MAX_MAX_CLIENTS)).contains(n) => *n as u32,
            Some(other) => {
                return Err(c.err(
                    "max_clients",
                    format!("expected a number from 1 to {MAX_MAX_CLIENTS}, got {}", describe(other)),
                ));
            }
        };
        let nbd_max_inflight = match &raw.nbd_max_inflight {
            None => crate::nbd::server::DEFAULT_MAX_INFLIGHT_BYTES as u64,
            Some(v) => {
                let s = c.size("nbd_max_inflight", v)?;
                let max_request = u64::from(crate::nbd::proto::MAX_BLOCK_SIZE);
                if !(max_request..=1 << 40).contains(&s) {
                    return Err(c.err(
                        "nbd_max_inflight",
                        format!(
                            "expected {} (one maximum NBD request) to 1TiB, got {}",
                            units::format_size(max_request),
                            units::format_size(s)
                        ),
                    ));
                }
                s
            }
        };
        let nbd_stall_timeout = match &raw.nbd_stall_timeout {
            None => crate::nbd::server::DEFAULT_STALL_TIMEOUT,
            Some(v) => {
                let d = c.duration("nbd_stall_timeout", v)?;
                if d < Duration::from_secs(1) || d > Duration::from_secs(24 * 3600) {
                    return Err(
                        c.err("nbd_stall_timeout", format!("expected 1s to 24h, got {}", units::format_duration(d)))
                    );
                }
                d
            }
        };

        let raw_nodes = raw.node.unwrap_or_default();
        if raw_nodes.is_empty() || raw_nodes.len() > 2 {
            return Err(c.err("node", format!("expected one or two [[node]] sections, got {}", raw_nodes.len())));
        }
        let two = raw_nodes.len() == 2;
        let mut nodes = Vec::with_capacity(raw_nodes.len());
        for (i, n) in raw_nodes.iter().enumerate() {
            let f = |key: &str| format!("node[{i}].{key}");
            let name = c.name(&f("name"), c.required(&f("name"), &n.name, "\"alpha\"")?)?;
            let replication = match &n.replication {
                Some(v) => Some(c.host_port(&f("replication"), v)?),
                None if two => {
                    return Err(c.err(
                        &f("replication"),
                        "missing (required with two nodes; expected e.g. replication = \"10.0.0.1:7790\")",
                    ));
                }
                None => None,
            };
            let replication_listen = match &n.replication_listen {
                Some(v) => Some(c.host_port(&f("replication_listen"), v)?),
                None => None,
            };
            let nbd = c.nbd(&f("nbd"), c.required(&f("nbd"), &n.nbd, "\"127.0.0.1:10809\"")?)?;
            let control = c.path(&f("control"), c.required(&f("control"), &n.control, "\"/run/repblock/r0.sock\"")?)?;
            let dir = c.path(&f("dir"), c.required(&f("dir"), &n.dir, "\"/var/lib/repblock/r0\"")?)?;
            let disk = match &n.disk {
                Some(v) => Some(c.path(&f("disk"), v)?),
                None => None,
            };
            let metrics = match &n.metrics {
                Some(v) => Some(c.host_port(&f("metrics"), v)?),
                None => None,
            };
            nodes.push(NodeConfig { name, replication, replication_listen, nbd, control, dir, disk, metrics });
        }
        if two && secret.is_none() {
            return Err(c.err("secret", "missing (required with two nodes: it authenticates the replication link)"));
        }
        let invalid = |message: String| ConfigError::Invalid { file: file.clone(), message };
        let mut seen = HashSet::new();
        for (i, n) in nodes.iter().enumerate() {
            if !seen.insert(&n.name) {
                return Err(invalid(format!("node[{i}].name: {:?} is used by two nodes", n.name)));
            }
        }
        // Two nodes on one host (their replication addresses share a host,
        // as in a loopback test pair) cannot share ports or paths. Two nodes
        // on two hosts usually do: one shared file, the same layout on both.
        let host =
            |n: &NodeConfig| n.replication.as_deref().and_then(parse_host_port).map(|(h, _)| h.to_ascii_lowercase());
        if two && host(&nodes[0]) == host(&nodes[1]) {
            let (a, b) = (&nodes[0], &nodes[1]);
            let clash = if a.replication == b.replication {
                Some(("replication", a.replication.clone().unwrap_or_default()))
            } else if a.nbd == b.nbd {
                Some(("nbd", a.nbd.to_string()))
            } else if a.control == b.control {
                Some(("control", a.control.display().to_string()))
            } else if a.dir == b.dir {
                Some(("dir", a.dir.display().to_string()))
            } else if a.disk.is_some() && a.disk == b.disk {
                Some(("disk", a.disk.as_ref().map(|d| d.display().to_string()).unwrap_or_default()))
            } else if a.metrics.is_some() && a.metrics == b.metrics {
                Some(("metrics", a.metrics.clone().unwrap_or_default()))
            } else {
                None
            };
            if let Some((field, value)) = clash {
                return Err(invalid(format!(
                    "node[1].{field}: {value:?} is also node[0].{field}; two nodes on one host each need their own"
                )));
            }
        }

        let nonzero_duration =
            |field: &str, v: &Option<toml::Value>, default: Duration| -> Result<Duration, ConfigError> {
                match v {
                    None => Ok(default),
                    Some(v) => {
                        let d = c.duration(field, v)?;
                        if d.is_zero() {
                            return Err(c.err(field, "expected a non-zero duration, got 0s"));
                        }
                        Ok(d)
                    }
                }
            };
        let ping_interval = nonzero_duration("ping_interval", &raw.ping_interval, DEFAULT_PING_INTERVAL)?;
        let ping_timeout = nonzero_duration("ping_timeout", &raw.ping_timeout, DEFAULT_PING_TIMEOUT)?;
        let connect_retry = nonzero_duration("connect_retry", &raw.connect_retry, DEFAULT_CONNECT_RETRY)?;
        let on_peer_loss = match &raw.on_peer_loss {
            None => OnPeerLoss::Continue,
            Some(v) => match c.string("on_peer_loss", v, "\"continue\" or \"suspend\"")?.as_str() {
                "continue" => OnPeerLoss::Continue,
                "suspend" => OnPeerLoss::Suspend,
                other => {
                    return Err(c.err("on_peer_loss", format!("expected \"continue\" or \"suspend\", got {other:?}")));
                }
            },
        };
        let max_buffer = match &raw.max_buffer {
            None => DEFAULT_MAX_BUFFER,
            Some(v) => {
                let s = c.size("max_buffer", v)?;
                if s < (1 << 20) {
                    return Err(c.err("max_buffer", format!("expected at least 1MiB, got {}", units::format_size(s))));
                }
                s
            }
        };
        let bitmap_granularity = match &raw.bitmap_granularity {
            None => DEFAULT_BITMAP_GRANULARITY,
            Some(v) => {
                let g = c.size("bitmap_granularity", v)?;
                if !g.is_power_of_two()
                    || !(u64::from(MIN_BITMAP_GRANULARITY)..=u64::from(MAX_BITMAP_GRANULARITY)).contains(&g)
                {
                    return Err(c.err(
                        "bitmap_granularity",
                        format!("expected a power of two from 4KiB to 1MiB, got {}", units::format_size(g)),
                    ));
                }
                g as u32
            }
        };
        crate::volume::bitmap::check_resident(size, bitmap_granularity).map_err(|e| c.err("size", e))?;
        let wal_retain = match &raw.wal_retain {
            None => DEFAULT_WAL_RETAIN,
            Some(v) => {
                let s = c.size("wal_retain", v)?;
                if s < MIN_WAL_RETAIN {
                    return Err(c.err("wal_retain", format!("expected at least 64MiB, got {}", units::format_size(s))));
                }
                s
            }
        };
        let resync_rate = match &raw.resync_rate {
            None => None,
            Some(toml::Value::String(s)) if s == "unlimited" => None,
            Some(v) => Some(c.rate("resync_rate", v)?),
        };
        let after_sb_0pri = match &raw.after_sb_0pri {
            None => AfterSb0Pri::default(),
            Some(v) => {
                let expected = one_of(&AfterSb0Pri::NAMES);
                let s = c.string("after_sb_0pri", v, &expected)?;
                AfterSb0Pri::parse(&s)
                    .ok_or_else(|| c.err("after_sb_0pri", format!("expected {expected}, got {s:?}")))?
            }
        };
        let after_sb_1pri = match &raw.after_sb_1pri {
            None => AfterSb1Pri::default(),
            Some(v) => {
                let expected = one_of(&AfterSb1Pri::NAMES);
                let s = c.string("after_sb_1pri", v, &expected)?;
                AfterSb1Pri::parse(&s)
                    .ok_or_else(|| c.err("after_sb_1pri", format!("expected {expected}, got {s:?}")))?
            }
        };

        let handlers = match &raw.handlers {
            None => Handlers::default(),
            Some(h) => {
                let argv = |key: &str, v: &Option<toml::Value>| -> Result<Option<Vec<String>>, ConfigError> {
                    let field = format!("handlers.{key}");
                    let expected = "expected an argv list such as [\"/usr/local/bin/notify\", \"--resource\", \"r0\"]";
                    match v {
                        None => Ok(None),
                        Some(toml::Value::Array(items)) => {
                            let argv: Vec<String> = items
                                .iter()
                                .map(|i| match i {
                                    toml::Value::String(s) => Ok(s.clone()),
                                    other => Err(c.err(&field, format!("{expected}, got {} in it", describe(other)))),
                                })
                                .collect::<Result<_, _>>()?;
                            match argv.first() {
                                Some(cmd) if !cmd.is_empty() => Ok(Some(argv)),
                                _ => Err(c.err(&field, format!("{expected}, got an empty command"))),
                            }
                        }
                        Some(other) => Err(c.err(&field, format!("{expected}, got {}", describe(other)))),
                    }
                };
                Handlers {
                    timeout: nonzero_duration("handlers.timeout", &h.timeout, DEFAULT_HANDLER_TIMEOUT)?,
                    after_resync_target: argv("after_resync_target", &h.after_resync_target)?,
                    split_brain: argv("split_brain", &h.split_brain)?,
                    peer_lost: argv("peer_lost", &h.peer_lost)?,
                    on_promote: argv("on_promote", &h.on_promote)?,
                    on_demote: argv("on_demote", &h.on_demote)?,
                }
            }
        };
        Ok(Config {
            file: path.to_path_buf(),
            name,
            size,
            protocol,
            secret,
            block_size,
            io_engine,
            wal_segment_size,
            checkpoint_bytes,
            checkpoint_interval,
            max_clients,
            nbd_max_inflight,
            nbd_stall_timeout,
            ping_interval,
            ping_timeout,
            on_peer_loss,
            connect_retry,
            max_buffer,
            bitmap_granularity,
            wal_retain,
            resync_rate,
            after_sb_0pri,
            after_sb_1pri,
            handlers,
            nodes,
        })
    }

    /// The automatic split-brain policies (`after_sb_0pri`, `after_sb_1pri`).
    pub fn split_brain_policy(&self) -> SplitBrainPolicy {
        SplitBrainPolicy { after_sb_0pri: self.after_sb_0pri, after_sb_1pri: self.after_sb_1pri }
    }

    /// The section of node `name`, or an error listing the nodes present.
    pub fn node(&self, name: &str) -> Result<&NodeConfig, ConfigError> {
        self.nodes.iter().find(|n| n.name == name).ok_or_else(|| ConfigError::NoSuchNode {
            file: self.file.display().to_string(),
            name: name.to_string(),
            present: self.nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>().join(", "),
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    const ONE: &str = r#"
name = "r0"
size = "64MiB"

[[node]]
name = "alpha"
nbd = "127.0.0.1:10809"
control = "/run/repblock/r0-alpha.sock"
dir = "/var/lib/repblock/r0-alpha"
"#;

    const TWO: &str = r#"
name = "r0"
size = "1GiB"
protocol = "B"
secret = "change-me"
block_size = "8KiB"
io_engine = "sync"
wal_segment_size = "16MiB"
checkpoint_bytes = 134217728
checkpoint_interval = "5s"
max_clients = 8

[[node]]
name = "alpha"
replication = "10.0.0.1:7790"
replication_listen = "0.0.0.0:7790"
nbd = "127.0.0.1:10809"
control = "/run/repblock/r0-alpha.sock"
dir = "/var/lib/repblock/r0-alpha"

[[node]]
name = "beta"
replication = "10.0.0.2:7790"
nbd = "unix:/run/repblock/r0-beta.nbd"
control = "/run/repblock/r0-beta.sock"
dir = "/var/lib/repblock/r0-beta"
disk = "/dev/vg0/r0"
"#;

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(Path::new("r0.toml"), text)
    }

    fn err(text: &str) -> String {
        load(text).expect_err("config must be refused").to_string()
    }

    #[test]
    fn single_node_gets_defaults() {
        let c = load(ONE).unwrap();
        assert_eq!(c.name, "r0");
        assert_eq!(c.size, 64 << 20);
        assert_eq!(c.protocol, Protocol::C);
        assert_eq!(c.secret, None);
        assert_eq!(c.block_size, 4096);
        assert_eq!(c.io_engine, EngineChoice::Auto);
        assert_eq!(c.wal_segment_size, 64 << 20);
        assert_eq!(c.checkpoint_bytes, 256 << 20);
        assert_eq!(c.checkpoint_interval, Duration::from_secs(30));
        assert_eq!(c.max_clients, 256);
        assert_eq!(c.nodes.len(), 1);
        let n = c.node("alpha").unwrap();
        assert_eq!(n.nbd, NbdAddress::Tcp { host: "127.0.0.1".into(), port: 10809 });
        assert_eq!(n.control, PathBuf::from("/run/repblock/r0-alpha.sock"));
        assert_eq!(n.replication, None);
        assert!(c.peer_of("alpha").is_none());
    }

    #[test]
    fn two_nodes_with_every_field() {
        let c = load(TWO).unwrap();
        assert_eq!(c.protocol, Protocol::B);
        assert_eq!(c.block_size, 8192);
        assert_eq!(c.io_engine, EngineChoice::Sync);
        assert_eq!(c.wal_segment_size, 16 << 20);
        assert_eq!(c.checkpoint_bytes, 128 << 20);
        assert_eq!(c.checkpoint_interval, Duration::from_secs(5));
        assert_eq!(c.max_clients, 8);
        let b = c.node("beta").unwrap();
        assert_eq!(b.nbd, NbdAddress::Unix("/run/repblock/r0-beta.nbd".into()));
        assert_eq!(b.nbd.uri("r0"), "nbd+unix:///r0?socket=/run/repblock/r0-beta.nbd");
        assert_eq!(b.disk, Some(PathBuf::from("/dev/vg0/r0")));
        assert_eq!(c.peer_of("beta").unwrap().name, "alpha");
        assert_eq!(c.node("alpha").unwrap().replication_listen.as_deref(), Some("0.0.0.0:7790"));
    }

    #[test]
    fn relative_paths_are_relative_to_the_config_file() {
        let text = ONE.replace("/run/repblock/r0-alpha.sock", "ctl.sock").replace("/var/lib/repblock/r0-alpha", "data");
        let c = Config::from_toml(Path::new("/etc/repblock/r0.toml"), &text).unwrap();
        assert_eq!(c.nodes[0].control, PathBuf::from("/etc/repblock/ctl.sock"));
        assert_eq!(c.nodes[0].dir, PathBuf::from("/etc/repblock/data"));
        // A config named relative to the working directory still yields
        // absolute paths.
        let c = Config::from_toml(Path::new("r0.toml"), &text).unwrap();
        assert!(c.nodes[0].dir.is_absolute(), "{}", c.nodes[0].dir.display());
        assert_eq!(c.nodes[0].dir, std::env::current_dir().unwrap().join("data"));
    }

    #[test]
    fn bad_nbd_address_names_node_and_field() {
        let text = TWO.replace("nbd = \"unix:/run/repblock/r0-beta.nbd\"", "nbd = \"10809\"");
        assert_eq!(err(&text), r#"r0.toml: node[1].nbd: expected "host:port" or "unix:/path", got "10809""#);
        let text = ONE.replace("127.0.0.1:10809", "unix:");
        assert!(err(&text).contains("node[0].nbd: expected"), "{}", err(&text));
        let text = ONE.replace("\"127.0.0.1:10809\"", "10809");
        assert_eq!(err(&text), r#"r0.toml: node[0].nbd: expected "host:port" or "unix:/path", got the number 10809"#);
    }

    #[test]
    fn bad_size_shows_examples() {
        let text = ONE.replace("\"64MiB\"", "\"1 GB\"");
        assert_eq!(err(&text), r#"r0.toml: size: "1 GB" is not a size (examples: "512MiB", "1GiB")"#);
        let text = ONE.replace("\"64MiB\"", "-5");
        assert_eq!(err(&text), "r0.toml: size: expected a size, got the negative number -5");
        let text = ONE.replace("\"64MiB\"", "\"1000\"");
        assert!(err(&text).starts_with("r0.toml: size: expected a non-zero multiple of block_size (4KiB)"));
        let text = ONE.replace("\"64MiB\"", "0");
        assert!(err(&text).starts_with("r0.toml: size: expected a non-zero multiple"));
    }

    #[test]
    fn unknown_field_keeps_line_and_names_node() {
        let text = ONE.replace("size = ", "sise = ");
        let e = err(&text);
        assert!(e.starts_with(r#"r0.toml: unknown field "sise""#), "{e}");
        assert!(e.contains("(line 3, column 1)"), "{e}");
        let text = ONE.replace("dir = ", "dirr = ");
        let e = err(&text);
        assert!(e.starts_with(r#"r0.toml: node[0]: unknown field "dirr""#), "{e}");
        assert!(e.contains("line 9"), "{e}");
    }

    proptest::proptest! {
        /// Whatever the file holds, loading it answers (Ok or Err), never
        /// panics; damaged versions of a valid file included.
        #[test]
        fn never_panics(text in "\\PC{0,200}", cut in 0usize..400, junk in "\\PC{0,8}") {
            let _ = load(&text);
            let mut damaged = ONE.to_string();
            let at = (0..=cut.min(damaged.len())).rev().find(|i| damaged.is_char_boundary(*i)).unwrap_or(0);
            damaged.insert_str(at, &junk);
            let _ = load(&damaged);
            let _ = load(&ONE[..(0..=cut.min(ONE.len())).rev().find(|i| ONE.is_char_boundary(*i)).unwrap_or(0)]);
        }
    }

    #[test]
    fn positions_survive_multibyte_text() {
        let text = "# é\nnamé = 1\n";
        assert_eq!(line_col(text, 5), (2, 1));
        assert_eq!(line_col(text, 3), (1, 3), "inside a character: cut before it");
        assert_eq!(line_col(text, 999), (3, 1));
        let e = err(&format!("# ünïcödé ✓\n{ONE}\n\"nöde\" = 1\n"));
        assert!(e.contains("unknown field \"nöde\""), "{e}");
        let e = err(&format!("# ünïcödé ✓\n{ONE}\nnöde = 1\n"));
        assert!(e.contains("invalid unquoted key") && e.contains("line 12, column 2"), "{e}");
    }

    #[test]
    fn toml_syntax_error_has_line() {
        let e = err("name = \"r0\"\nsize = \n");
        assert!(e.starts_with("r0.toml: "), "{e}");
        assert!(e.contains("line 2"), "{e}");
    }

    #[test]
    fn missing_fields_are_named() {
        assert!(err(&ONE.replace("name = \"r0\"", "")).starts_with("r0.toml: name: missing"));
        assert!(err(&ONE.replace("size = \"64MiB\"", "")).starts_with("r0.toml: size: missing"));
        assert!(err(&ONE.replace("nbd = \"127.0.0.1:10809\"", "")).starts_with("r0.toml: node[0].nbd: missing"));
        assert!(err(&ONE.replace("control = ", "#")).starts_with("r0.toml: node[0].control: missing"));
        assert!(err(&ONE.replace("dir = ", "#")).starts_with("r0.toml: node[0].dir: missing"));
        assert_eq!(
            err("name = \"r0\"\nsize = \"1GiB\"\n"),
            "r0.toml: node: expected one or two [[node]] sections, got 0"
        );
    }

    #[test]
    fn bad_names() {
        let e = err(&ONE.replace("name = \"r0\"", "name = \"r 0\""));
        assert_eq!(e, r#"r0.toml: name: expected 1 to 64 characters from [A-Za-z0-9_.-], got "r 0""#);
        let long = "a".repeat(65);
        assert!(
            err(&ONE.replace("\"alpha\"", &format!("\"{long}\"")))
                .starts_with("r0.toml: node[0].name: expected 1 to 64")
        );
        assert!(err(&ONE.replace("name = \"r0\"", "name = \"\"")).starts_with("r0.toml: name: expected"));
        assert!(err(&ONE.replace("name = \"r0\"", "name = 7")).contains("got the number 7"));
    }

    #[test]
    fn enums_and_ranges() {
        assert_eq!(
            err(&ONE.replace("size = \"64MiB\"", "size = \"64MiB\"\nprotocol = \"D\"")),
            r#"r0.toml: protocol: expected "A", "B" or "C", got "D""#
        );
        assert_eq!(
            err(&ONE.replace("size = \"64MiB\"", "size = \"64MiB\"\nio_engine = \"aio\"")),
            r#"r0.toml: io_engine: expected "auto", "io_uring" or "sync", got "aio""#
        );
        assert_eq!(
            err(&ONE.replace("size = \"64MiB\"", "size = \"64MiB\"\nblock_size = \"3KiB\"")),
            "r0.toml: block_size: expected a power of two from 512B to 1MiB, got 3KiB"
        );
        assert!(
            err(&ONE.replace("size = \"64MiB\"", "size = \"64MiB\"\nblock_size = \"2MiB\"")).contains("block_size")
        );
        assert!(
            err(&ONE.replace("size = \"64MiB\"", "size = \"64MiB\"\nmax_clients = 0"))
                .starts_with("r0.toml: max_clients: expected a number from 1 to 65536, got the number 0")
        );
        assert!(
            err(&ONE.replace("size = \"64MiB\"", "size = \"64MiB\"\nmax_clients = \"8\""))
                .starts_with("r0.toml: max_clients:")
        );
        assert!(
            err(&ONE.replace("size = \"64MiB\"", "size = \"64MiB\"\ncheckpoint_interval = \"soon\""))
                .starts_with(r#"r0.toml: checkpoint_interval: "soon" is not a duration"#)
        );
        assert!(
            err(&ONE.replace("size = \"64MiB\"", "size = \"64MiB\"\ncheckpoint_interval = 30"))
                .starts_with("r0.toml: checkpoint_interval: expected a duration")
        );
        assert!(
            err(&ONE.replace("size = \"64MiB\"", "size = \"64MiB\"\nwal_segment_size = \"4KiB\""))
                .starts_with("r0.toml: wal_segment_size: expected at least 1MiB")
        );
        assert!(
            err(&ONE.replace("size = \"64MiB\"", "size = \"64MiB\"\ncheckpoint_bytes = 0"))
                .starts_with("r0.toml: checkpoint_bytes:")
        );
    }

    #[test]
    fn two_nodes_need_secret_and_replication() {
        assert_eq!(
            err(&TWO.replace("secret = \"change-me\"", "")),
            "r0.toml: secret: missing (required with two nodes: it authenticates the replication link)"
        );
        assert!(
            err(&TWO.replace("replication = \"10.0.0.2:7790\"", ""))
                .starts_with("r0.toml: node[1].replication: missing")
        );
        assert_eq!(
            err(&TWO.replace("\"10.0.0.2:7790\"", "\"10.0.0.2\"")),
            r#"r0.toml: node[1].replication: expected "host:port", got "10.0.0.2""#
        );
        assert!(
            err(&TWO.replace("\"0.0.0.0:7790\"", "\"0.0.0.0:99999\""))
                .starts_with("r0.toml: node[0].replication_listen:")
        );
    }

    #[test]
    fn two_hosts_may_use_the_same_paths_and_ports() {
        let same_layout = TWO
            .replace("unix:/run/repblock/r0-beta.nbd", "127.0.0.1:10809")
            .replace("r0-beta.sock", "r0-alpha.sock")
            .replace("/var/lib/repblock/r0-beta", "/var/lib/repblock/r0-alpha");
        let c = load(&same_layout).expect("one file for two hosts with the same layout");
        assert_eq!(c.node("alpha").expect("alpha").dir, c.node("beta").expect("beta").dir);
    }

    #[test]
    fn duplicates_are_refused() {
        assert_eq!(
            err(&TWO.replace("\"beta\"", "\"alpha\"")),
            r#"r0.toml: node[1].name: "alpha" is used by two nodes"#
        );
        // Both nodes on one host: ports and paths must differ.
        let one_host = TWO.replace("10.0.0.1:7790", "127.0.0.1:7790").replace("10.0.0.2:7790", "127.0.0.1:7791");
        assert!(
            err(&one_host.replace("unix:/run/repblock/r0-beta.nbd", "127.0.0.1:10809"))
                .starts_with("r0.toml: node[1].nbd: \"127.0.0.1:10809\" is also node[0].nbd")
        );
        assert!(err(&one_host.replace("r0-beta.sock", "r0-alpha.sock")).starts_with("r0.toml: node[1].control:"));
        assert!(
            err(&one_host.replace("/var/lib/repblock/r0-beta", "/var/lib/repblock/r0-alpha"))
                .starts_with("r0.toml: node[1].dir:")
        );
        assert!(
            err(&one_host.replace("127.0.0.1:7791", "127.0.0.1:7790")).starts_with("r0.toml: node[1].replication:")
        );
        let three = format!("{TWO}\n[[node]]\nname = \"gamma\"\n");
        assert!(err(&three).starts_with("r0.toml: node: expected one or two [[node]] sections, got 3"));
    }

    #[test]
    fn unknown_node_lists_present_ones() {
        let c = load(TWO).unwrap();
        assert_eq!(
            c.node("gamma").unwrap_err().to_string(),
            r#"r0.toml: no node named "gamma" (nodes in this file: alpha, beta)"#
        );
    }

    #[test]
    fn nbd_inflight_bound_and_stall_timeout() {
        let with = |extra: &str| ONE.replace("size = \"64MiB\"", &format!("size = \"64MiB\"\n{extra}"));
        let c = load(ONE).unwrap();
        assert_eq!(c.nbd_max_inflight, 256 << 20);
        assert_eq!(c.nbd_stall_timeout, Duration::from_secs(30));
        let c = load(&with("nbd_max_inflight = \"1GiB\"\nnbd_stall_timeout = \"5s\"")).unwrap();
        assert_eq!((c.nbd_max_inflight, c.nbd_stall_timeout), (1 << 30, Duration::from_secs(5)));
        assert_eq!(
            err(&with("nbd_max_inflight = \"1MiB\"")),
            "r0.toml: nbd_max_inflight: expected 32MiB (one maximum NBD request) to 1TiB, got 1MiB"
        );
        assert_eq!(err(&with("nbd_stall_timeout = \"0s\"")), "r0.toml: nbd_stall_timeout: expected 1s to 24h, got 0s");
    }

    #[test]
    fn host_port_forms() {
        assert_eq!(parse_host_port("127.0.0.1:10809"), Some(("127.0.0.1", 10809)));
        assert_eq!(parse_host_port("[::1]:10809"), Some(("[::1]", 10809)));
        assert_eq!(parse_host_port("node-a.example:7790"), Some(("node-a.example", 7790)));
        for bad in ["10809", ":10809", "host:", "host:0", "host:65536", "::1:80", "[zz]:80", "a b:1"] {
            assert_eq!(parse_host_port(bad), None, "{bad}");
        }
    }

    #[test]
    fn demo_config_is_valid() {
        let text = demo_toml(1 << 30, "127.0.0.1:10809");
        let c = Config::from_toml(Path::new("/tmp/demo/r0.toml"), &text).unwrap();
        assert_eq!(c.size, 1 << 30);
        assert_eq!(c.nodes[0].control, PathBuf::from("/tmp/demo/control.sock"));
        assert_eq!(c.nodes[0].dir, PathBuf::from("/tmp/demo/data"));
    }

    #[test]
    fn handlers_are_argv_lists_with_a_timeout() {
        let c = load(TWO).unwrap();
        assert_eq!(c.handlers, Handlers::default());
        let with = |extra: &str| TWO.replacen("max_clients = 8", &format!("max_clients = 8\n{extra}"), 1);
        let c =
            load(&with("[handlers]\ntimeout = \"5s\"\npeer_lost = [\"/bin/logger\", \"-t\", \"repblock\"]")).unwrap();
        assert_eq!(c.handlers.timeout, Duration::from_secs(5));
        assert_eq!(c.handlers.peer_lost, Some(vec!["/bin/logger".into(), "-t".into(), "repblock".into()]));
        assert_eq!(c.handlers.on_promote, None);
        for (bad, want) in [
            ("[handlers]\npeer_lost = \"/bin/logger\"", "handlers.peer_lost: expected an argv list"),
            ("[handlers]\npeer_lost = []", "handlers.peer_lost: expected an argv list"),
            ("[handlers]\npeer_lost = [\"\"]", "handlers.peer_lost: expected an argv list"),
            ("[handlers]\npeer_lost = [\"/x\", 3]", "handlers.peer_lost: expected an argv list"),
            ("[handlers]\ntimeout = \"0s\"", "handlers.timeout"),
            ("[handlers]\nbefore_resync_targetx = [\"/x\"]", "before_resync_targetx"),
        ] {
            let e = load(&with(bad)).unwrap_err().to_string();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn metrics_address_is_optional_and_checked() {
        let c = load(TWO).unwrap();
        assert_eq!(c.node("alpha").unwrap().metrics, None);
        let with = TWO.replacen(
            "dir = \"/var/lib/repblock/r0-alpha\"",
            "dir = \"/var/lib/repblock/r0-alpha\"\nmetrics = \"127.0.0.1:9942\"",
            1,
        );
        let c = load(&with).unwrap();
        assert_eq!(c.node("alpha").unwrap().metrics.as_deref(), Some("127.0.0.1:9942"));
        assert_eq!(c.node("beta").unwrap().metrics, None);
        let bad = TWO.replacen(
            "dir = \"/var/lib/repblock/r0-alpha\"",
            "dir = \"/var/lib/repblock/r0-alpha\"\nmetrics = \"9942\"",
            1,
        );
        let e = load(&bad).unwrap_err().to_string();
        assert!(e.contains("node[0].metrics") && e.contains("host:port"), "{e}");
    }

    #[test]
    fn replication_keys_have_defaults_and_are_checked() {
        let c = load(TWO).unwrap();
        assert_eq!(c.ping_interval, Duration::from_secs(1));
        assert_eq!(c.ping_timeout, Duration::from_millis(500));
        assert_eq!(c.on_peer_loss, OnPeerLoss::Continue);
        assert_eq!(c.connect_retry, Duration::from_millis(100));
        assert_eq!(c.max_buffer, 64 << 20);
        let with = |extra: &str| TWO.replacen("protocol = \"B\"", &format!("protocol = \"B\"\n{extra}"), 1);
        let c = load(&with("ping_interval = \"250ms\"\nping_timeout = \"2s\"\non_peer_loss = \"suspend\"\nconnect_retry = \"1s\"\nmax_buffer = \"8MiB\"")).unwrap();
        assert_eq!(c.ping_interval, Duration::from_millis(250));
        assert_eq!(c.ping_timeout, Duration::from_secs(2));
        assert_eq!(c.on_peer_loss, OnPeerLoss::Suspend);
        assert_eq!(c.connect_retry, Duration::from_secs(1));
        assert_eq!(c.max_buffer, 8 << 20);
        assert_eq!(
            err(&with("on_peer_loss = \"panic\"")),
            "r0.toml: on_peer_loss: expected \"continue\" or \"suspend\", got \"panic\""
        );
        assert_eq!(err(&with("ping_timeout = \"0s\"")), "r0.toml: ping_timeout: expected a non-zero duration, got 0s");
        assert!(err(&with("max_buffer = \"4KiB\"")).starts_with("r0.toml: max_buffer: expected at least 1MiB"));
    }

    #[test]
    fn resync_keys_have_defaults() {
        let c = load(ONE).unwrap();
        assert_eq!(c.bitmap_granularity, 4096);
        assert_eq!(c.wal_retain, 1 << 30);
        assert_eq!(c.resync_rate, None);
        assert_eq!(c.after_sb_0pri, AfterSb0Pri::Disconnect);
        assert_eq!(c.after_sb_1pri, AfterSb1Pri::Disconnect);
        assert_eq!(c.split_brain_policy(), SplitBrainPolicy::default());
    }

    fn with_key(line: &str) -> String {
        ONE.replacen("size = \"64MiB\"", &format!("size = \"64MiB\"\n{line}"), 1)
    }

    #[test]
    fn bitmap_granularity_is_a_power_of_two_from_4k_to_1m() {
        for (text, want) in [("\"4KiB\"", 4096), ("\"64KiB\"", 65536), ("\"1MiB\"", 1 << 20), ("8192", 8192)] {
            let c = load(&with_key(&format!("bitmap_granularity = {text}"))).unwrap();
            assert_eq!(c.bitmap_granularity, want, "{text}");
        }
        for (text, got) in [("\"2KiB\"", "2KiB"), ("\"2MiB\"", "2MiB"), ("\"12KiB\"", "12KiB"), ("0", "0B")] {
            assert_eq!(
                err(&with_key(&format!("bitmap_granularity = {text}"))),
                format!("r0.toml: bitmap_granularity: expected a power of two from 4KiB to 1MiB, got {got}")
            );
        }
        assert_eq!(
            err(&with_key("bitmap_granularity = \"big\"")),
            r#"r0.toml: bitmap_granularity: "big" is not a size (examples: "512MiB", "1GiB")"#
        );
        assert!(
            err(&with_key("bitmap_granularity = true")).starts_with("r0.toml: bitmap_granularity: expected a size")
        );
    }

    #[test]
    fn resync_keys_reach_the_volume() {
        // The defaults here and the volume's are the same numbers.
        assert_eq!(DEFAULT_BITMAP_GRANULARITY, crate::volume::DEFAULT_BITMAP_GRANULARITY);
        assert_eq!(DEFAULT_WAL_RETAIN, crate::volume::DEFAULT_WAL_RETAIN);
        let c = load(&with_key("bitmap_granularity = \"64KiB\"\nwal_retain = \"256MiB\"")).unwrap();
        let opts = c.volume_options(&c.nodes[0]);
        assert_eq!((opts.bitmap_granularity, opts.wal_retain), (64 << 10, 256 << 20));
        // Whatever the config accepts, the volume accepts.
        for g in [4u32 << 10, 8 << 10, 1 << 20] {
            let c = load(&with_key(&format!("bitmap_granularity = {g}"))).unwrap();
            assert!(crate::volume::bitmap::validate_granularity(c.bitmap_granularity).is_ok());
        }
    }

    #[test]
    fn wal_retain_is_at_least_64m() {
        assert_eq!(load(&with_key("wal_retain = \"64MiB\"")).unwrap().wal_retain, 64 << 20);
        assert_eq!(load(&with_key("wal_retain = \"10GiB\"")).unwrap().wal_retain, 10 << 30);
        assert_eq!(err(&with_key("wal_retain = \"63MiB\"")), "r0.toml: wal_retain: expected at least 64MiB, got 63MiB");
        assert!(
            err(&with_key("wal_retain = -1")).starts_with("r0.toml: wal_retain: expected a size, got the negative")
        );
        assert!(err(&with_key("wal_retain = \"1 GiB\"")).starts_with("r0.toml: wal_retain: \"1 GiB\" is not a size"));
    }

    #[test]
    fn resync_rate_is_a_rate_or_unlimited() {
        assert_eq!(load(&with_key("resync_rate = \"unlimited\"")).unwrap().resync_rate, None);
        assert_eq!(load(&with_key("resync_rate = \"100MiB/s\"")).unwrap().resync_rate, Some(100 << 20));
        assert_eq!(load(&with_key("resync_rate = \"20M\"")).unwrap().resync_rate, Some(20 << 20));
        assert_eq!(load(&with_key("resync_rate = 1048576")).unwrap().resync_rate, Some(1 << 20));
        let expected = r#"r0.toml: resync_rate: expected a rate such as "100MiB/s" or "unlimited""#;
        assert_eq!(err(&with_key("resync_rate = \"fast\"")), format!("{expected}, got \"fast\""));
        assert_eq!(err(&with_key("resync_rate = \"10MiB/h\"")), format!("{expected}, got \"10MiB/h\""));
        assert_eq!(err(&with_key("resync_rate = \"Unlimited\"")), format!("{expected}, got \"Unlimited\""));
        assert_eq!(err(&with_key("resync_rate = -5")), format!("{expected}, got -5"));
        assert_eq!(err(&with_key("resync_rate = 1.5")), format!("{expected}, got the number 1.5"));
        assert_eq!(err(&with_key("resync_rate = \"0/s\"")), format!("{expected}, got 0 (a resync would never finish)"));
    }

    #[test]
    fn split_brain_policies_are_named_values() {
        for name in AfterSb0Pri::NAMES {
            let c = load(&with_key(&format!("after_sb_0pri = \"{name}\""))).unwrap();
            assert_eq!(c.after_sb_0pri.as_str(), name);
            assert_eq!(c.split_brain_policy().after_sb_0pri, c.after_sb_0pri);
        }
        for name in AfterSb1Pri::NAMES {
            let c = load(&with_key(&format!("after_sb_1pri = \"{name}\""))).unwrap();
            assert_eq!(c.after_sb_1pri.as_str(), name);
            assert_eq!(c.split_brain_policy().after_sb_1pri, c.after_sb_1pri);
        }
        let c = load(&with_key("after_sb_0pri = \"discard-least-changes\"\nafter_sb_1pri = \"discard-secondary\""))
            .unwrap();
        assert_eq!(
            c.split_brain_policy(),
            SplitBrainPolicy {
                after_sb_0pri: AfterSb0Pri::DiscardLeastChanges,
                after_sb_1pri: AfterSb1Pri::DiscardSecondary
            }
        );
        assert_eq!(
            err(&with_key("after_sb_0pri = \"discard-secondary\"")),
            r#"r0.toml: after_sb_0pri: expected "disconnect", "discard-younger-primary", "discard-least-changes" or "discard-zero-changes", got "discard-secondary""#
        );
        assert_eq!(
            err(&with_key("after_sb_1pri = \"discard-least-changes\"")),
            r#"r0.toml: after_sb_1pri: expected "disconnect", "discard-secondary" or "discard-zero-changes", got "discard-least-changes""#
        );
        assert_eq!(
            err(&with_key("after_sb_1pri = 1")),
            r#"r0.toml: after_sb_1pri: expected "disconnect", "discard-secondary" or "discard-zero-changes", got the number 1"#
        );
    }
}
