//! Parsing and checking the file: serde reads it into the raw forms below
//! (unknown keys and syntax errors keep their line and column), then
//! [`Config::from_toml`] checks each field by name.

use super::*;

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
    al_extents: Option<toml::Value>,
    resync_rate: Option<toml::Value>,
    after_sb_0pri: Option<toml::Value>,
    after_sb_1pri: Option<toml::Value>,
    handlers: Option<RawHandlers>,
    failover: Option<RawFailover>,
    tls: Option<super::tls::RawTls>,
    node: Option<Vec<RawNode>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFailover {
    mode: Option<toml::Value>,
    profile: Option<toml::Value>,
    heartbeat: Option<toml::Value>,
    lease: Option<toml::Value>,
    detect: Option<toml::Value>,
    fence_demote_after: Option<toml::Value>,
    max_clock_drift: Option<toml::Value>,
    max_auto_failovers: Option<toml::Value>,
    failover_window: Option<toml::Value>,
    allow_protocol_b: Option<toml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHandlers {
    timeout: Option<toml::Value>,
    before_resync_target: Option<toml::Value>,
    after_resync_target: Option<toml::Value>,
    fence_peer: Option<toml::Value>,
    split_brain: Option<toml::Value>,
    peer_lost: Option<toml::Value>,
    on_promote: Option<toml::Value>,
    on_demote: Option<toml::Value>,
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
    witness: Option<toml::Value>,
    tls_dir: Option<toml::Value>,
}

/// Field checker bound to one file (keeps messages uniform).
pub(super) struct Checker<'a> {
    file: &'a str,
    base: &'a Path,
}

impl Checker<'_> {
    pub(super) fn err(&self, field: &str, message: impl Into<String>) -> ConfigError {
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

    pub(super) fn path(&self, field: &str, v: &toml::Value) -> Result<PathBuf, ConfigError> {
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

pub(super) fn describe(v: &toml::Value) -> String {
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
pub(super) fn line_col(text: &str, offset: usize) -> (usize, usize) {
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
                if !crate::volume::valid_block_size(b) {
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
        let mut is_witness = Vec::with_capacity(raw_nodes.len());
        for (i, n) in raw_nodes.iter().enumerate() {
            is_witness.push(match &n.witness {
                None => false,
                Some(toml::Value::Boolean(b)) => *b,
                Some(other) => {
                    return Err(c.err(
                        &format!("node[{i}].witness"),
                        format!("expected true or false, got {}", describe(other)),
                    ));
                }
            });
        }
        let witnesses: Vec<usize> = (0..raw_nodes.len()).filter(|i| is_witness[*i]).collect();
        if let [_, second, ..] = witnesses[..] {
            return Err(c.err(
                &format!("node[{second}].witness"),
                format!("a resource has at most one witness node, node[{}] is one already", witnesses[0]),
            ));
        }
        let data_count = raw_nodes.len() - witnesses.len();
        if data_count == 0 || data_count > 2 {
            let message = if witnesses.is_empty() {
                format!("expected one or two [[node]] sections, got {data_count}")
            } else {
                format!("expected one or two data [[node]] sections (without witness = true), got {data_count}")
            };
            return Err(c.err("node", message));
        }
        if let Some(&w) = witnesses.first()
            && data_count != 2
        {
            return Err(c.err(&format!("node[{w}].witness"), "a witness node needs two data nodes, this file has one"));
        }
        let two = data_count == 2;
        let mut nodes = Vec::with_capacity(data_count);
        let mut witness = None;
        let mut node_order = Vec::with_capacity(raw_nodes.len());
        for (i, n) in raw_nodes.iter().enumerate() {
            let f = |key: &str| format!("node[{i}].{key}");
            let name = c.name(&f("name"), c.required(&f("name"), &n.name, "\"alpha\"")?)?;
            node_order.push(name.clone());
            if is_witness[i] {
                for (key, v) in [("nbd", &n.nbd), ("disk", &n.disk), ("metrics", &n.metrics), ("tls_dir", &n.tls_dir)] {
                    if v.is_some() {
                        return Err(c.err(
                            &f(key),
                            "a witness node (witness = true) has no volume and no export: remove this key",
                        ));
                    }
                }
                let replication = c.host_port(
                    &f("replication"),
                    c.required(&f("replication"), &n.replication, "\"10.0.0.3:7790\"")?,
                )?;
                let replication_listen = match &n.replication_listen {
                    Some(v) => Some(c.host_port(&f("replication_listen"), v)?),
                    None => None,
                };
                let control =
                    c.path(&f("control"), c.required(&f("control"), &n.control, "\"/run/repblock/r0-gamma.sock\"")?)?;
                let dir = c.path(&f("dir"), c.required(&f("dir"), &n.dir, "\"/var/lib/repblock/r0-gamma\"")?)?;
                witness = Some(WitnessNodeConfig {
                    name,
                    index: NodeIndex(i as u8),
                    replication,
                    replication_listen,
                    control,
                    dir,
                });
                continue;
            }
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
            let tls_dir = match &n.tls_dir {
                Some(v) => Some(c.path(&f("tls_dir"), v)?),
                None => None,
            };
            nodes.push(NodeConfig { name, replication, replication_listen, nbd, control, dir, disk, metrics, tls_dir });
        }
        if (two || witness.is_some()) && secret.is_none() {
            return Err(c.err("secret", "missing (required with two nodes: it authenticates the replication link)"));
        }
        let invalid = |message: String| ConfigError::Invalid { file: file.clone(), message };
        let mut seen = HashSet::new();
        for (i, name) in node_order.iter().enumerate() {
            if !seen.insert(name) {
                return Err(invalid(format!("node[{i}].name: {name:?} is used by two nodes")));
            }
        }
        if let Some(w) = &witness {
            // The witness shares a host with a data node (a test setup, a
            // demo): it needs its own port and paths.
            let w_host = parse_host_port(&w.replication).map(|(h, _)| h.to_ascii_lowercase());
            for (i, n) in nodes.iter().enumerate() {
                let n_host = n.replication.as_deref().and_then(parse_host_port).map(|(h, _)| h.to_ascii_lowercase());
                if n_host != w_host {
                    continue;
                }
                let clash = if n.replication.as_deref() == Some(w.replication.as_str()) {
                    Some(("replication", w.replication.clone()))
                } else if n.control == w.control {
                    Some(("control", w.control.display().to_string()))
                } else if n.dir == w.dir {
                    Some(("dir", w.dir.display().to_string()))
                } else {
                    None
                };
                if let Some((field, value)) = clash {
                    let data_index = node_order.iter().position(|x| *x == n.name).unwrap_or(i);
                    return Err(invalid(format!(
                        "node[{}].{field}: {value:?} is also node[{data_index}].{field}; the witness needs its own",
                        w.index.0
                    )));
                }
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
        let al_extents = match &raw.al_extents {
            None => crate::volume::al::DEFAULT_EXTENTS,
            Some(toml::Value::Integer(n))
                if (crate::volume::al::MIN_EXTENTS as i64..=crate::volume::al::MAX_EXTENTS as i64).contains(n) =>
            {
                *n as usize
            }
            Some(other) => {
                return Err(c.err(
                    "al_extents",
                    format!(
                        "expected a number from {} to {}, got {}",
                        crate::volume::al::MIN_EXTENTS,
                        crate::volume::al::MAX_EXTENTS,
                        describe(other)
                    ),
                ));
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
                    before_resync_target: argv("before_resync_target", &h.before_resync_target)?,
                    after_resync_target: argv("after_resync_target", &h.after_resync_target)?,
                    fence_peer: argv("fence_peer", &h.fence_peer)?,
                    split_brain: argv("split_brain", &h.split_brain)?,
                    peer_lost: argv("peer_lost", &h.peer_lost)?,
                    on_promote: argv("on_promote", &h.on_promote)?,
                    on_demote: argv("on_demote", &h.on_demote)?,
                }
            }
        };
        let failover = failover_section(&c, raw.failover.as_ref())?;
        if failover.enabled() {
            if witness.is_none() {
                return Err(c.err(
                    "failover.mode",
                    "\"witness\" needs a witness node: add a [[node]] with witness = true (docs/failover.md)",
                ));
            }
            match protocol {
                Protocol::C => {}
                Protocol::B if failover.allow_protocol_b => {}
                Protocol::B => {
                    return Err(c.err(
                        "protocol",
                        "automatic failover needs protocol \"C\"; with \"B\" a write acknowledged only as received by \
                         the secondary is lost if both nodes fail at once: set failover.allow_protocol_b = true to accept that",
                    ));
                }
                Protocol::A => {
                    return Err(c.err(
                        "protocol",
                        "automatic failover needs protocol \"C\" (with \"A\" acknowledged writes are lost at a failover)",
                    ));
                }
            }
            if raw.on_peer_loss.is_some() {
                return Err(c.err(
                    "on_peer_loss",
                    "not used with automatic failover: the witness decides (solo grant); remove on_peer_loss",
                ));
            }
        }
        let tls = super::tls::parse(&c, raw.tls.as_ref(), &nodes)?;
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
            al_extents,
            resync_rate,
            after_sb_0pri,
            after_sb_1pri,
            handlers,
            tls,
            nodes,
            failover,
            witness,
            node_order,
        })
    }
}

/// `[failover]`: the mode, the timings (the profile's, then each key given),
/// validated by [`FailoverTimings::validate`] (errors name `failover.KEY`).
fn failover_section(c: &Checker<'_>, raw: Option<&RawFailover>) -> Result<FailoverConfig, ConfigError> {
    let Some(f) = raw else { return Ok(FailoverConfig::default()) };
    let field = |key: &str| format!("failover.{key}");
    let mode = match &f.mode {
        None => FailoverMode::Off,
        Some(v) => match c.string(&field("mode"), v, "\"off\" or \"witness\"")?.as_str() {
            "off" => FailoverMode::Off,
            "witness" => FailoverMode::Witness,
            other => return Err(c.err(&field("mode"), format!("expected \"off\" or \"witness\", got {other:?}"))),
        },
    };
    let mut t = match &f.profile {
        None => FailoverTimings::DEFAULT,
        Some(v) => match c.string(&field("profile"), v, "\"default\" or \"fast\"")?.as_str() {
            "default" => FailoverTimings::DEFAULT,
            "fast" => FailoverTimings::FAST,
            other => {
                return Err(c.err(&field("profile"), format!("expected \"default\" or \"fast\", got {other:?}")));
            }
        },
    };
    for (key, raw, slot) in [
        ("heartbeat", &f.heartbeat, &mut t.heartbeat),
        ("lease", &f.lease, &mut t.lease),
        ("detect", &f.detect, &mut t.detect),
        ("fence_demote_after", &f.fence_demote_after, &mut t.fence_demote_after),
        ("failover_window", &f.failover_window, &mut t.failover_window),
    ] {
        if let Some(v) = raw {
            *slot = c.duration(&field(key), v)?;
        }
    }
    if let Some(v) = &f.max_clock_drift {
        let s = c.string(&field("max_clock_drift"), v, "a percentage such as \"1%\"")?;
        t.max_clock_drift = Drift::parse(&s).ok_or_else(|| {
            c.err(&field("max_clock_drift"), format!("expected a percentage such as \"1%\" or \"500ppm\", got {s:?}"))
        })?;
    }
    match &f.max_auto_failovers {
        None => {}
        Some(toml::Value::Integer(n)) if (0..=i64::from(u32::MAX)).contains(n) => t.max_auto_failovers = *n as u32,
        Some(other) => {
            return Err(
                c.err(&field("max_auto_failovers"), format!("expected a number from 0, got {}", describe(other)))
            );
        }
    }
    let allow_protocol_b = match &f.allow_protocol_b {
        None => false,
        Some(toml::Value::Boolean(b)) => *b,
        Some(other) => {
            return Err(c.err(&field("allow_protocol_b"), format!("expected true or false, got {}", describe(other))));
        }
    };
    let timings = t.validate().map_err(|e| c.err(&field(e.field), e.message))?;
    Ok(FailoverConfig { mode, timings, allow_protocol_b })
}
