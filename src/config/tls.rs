//! The `[tls]` section (issue 13, docs/tls.md) and the nodes' `tls_dir`.
//!
//! The file is shared by the nodes, so only what the file itself says is
//! checked here (modes, paths, node names usable as certificate names); the
//! certificate files are read by the node that uses them when it starts
//! ([`crate::tls::TlsContext::load`]), which names a missing or unusable
//! file.

use super::parse::{Checker, describe};
use super::*;
use crate::tls::{NbdTlsMode, ReplTlsMode, TlsSettings};

/// `[tls]`, as in the file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    dir: Option<toml::Value>,
    nbd: Option<toml::Value>,
    replication: Option<toml::Value>,
    nbd_verify_client: Option<toml::Value>,
}

/// The validated `[tls]` section. All modes `off` (the default, and what a
/// file without the section gets) means no TLS anywhere.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsConfig {
    /// `dir`: the certificate directory of every node without a `tls_dir`.
    pub dir: Option<PathBuf>,
    /// `nbd`: `off` (default), `on`, `require`.
    pub nbd: NbdTlsMode,
    /// `replication`: `off` (default), `require`.
    pub replication: ReplTlsMode,
    /// `nbd_verify_client`: NBD clients must present a certificate signed
    /// by the CA (default false).
    pub nbd_verify_client: bool,
}

impl TlsConfig {
    /// Whether anything uses TLS.
    pub fn enabled(&self) -> bool {
        self.nbd != NbdTlsMode::Off || self.replication != ReplTlsMode::Off
    }
}

impl Config {
    /// What node `node` needs of TLS; `None` when nothing uses it.
    pub fn tls_settings(&self, node: &NodeConfig) -> Option<TlsSettings> {
        if !self.tls.enabled() {
            return None;
        }
        let dir = node.tls_dir.clone().or_else(|| self.tls.dir.clone())?;
        Some(TlsSettings {
            dir,
            nbd: self.tls.nbd,
            replication: self.tls.replication,
            nbd_verify_client: self.tls.nbd_verify_client,
        })
    }
}

pub(super) fn parse(c: &Checker<'_>, raw: Option<&RawTls>, nodes: &[NodeConfig]) -> Result<TlsConfig, ConfigError> {
    let Some(raw) = raw else { return Ok(TlsConfig::default()) };
    let mode = |field: &str, v: &Option<toml::Value>, names: &[&str]| -> Result<usize, ConfigError> {
        let expected = names.iter().map(|n| format!("{n:?}")).collect::<Vec<_>>().join(" or ");
        match v {
            None => Ok(0),
            Some(toml::Value::String(s)) => {
                names.iter().position(|n| n == s).ok_or_else(|| c.err(field, format!("expected {expected}, got {s:?}")))
            }
            Some(other) => Err(c.err(field, format!("expected {expected}, got {}", describe(other)))),
        }
    };
    let nbd =
        [NbdTlsMode::Off, NbdTlsMode::On, NbdTlsMode::Require][mode("tls.nbd", &raw.nbd, &["off", "on", "require"])?];
    let replication =
        [ReplTlsMode::Off, ReplTlsMode::Require][mode("tls.replication", &raw.replication, &["off", "require"])?];
    let nbd_verify_client = match &raw.nbd_verify_client {
        None => false,
        Some(toml::Value::Boolean(b)) => *b,
        Some(other) => {
            return Err(c.err("tls.nbd_verify_client", format!("expected true or false, got {}", describe(other))));
        }
    };
    let dir = match &raw.dir {
        Some(v) => Some(c.path("tls.dir", v)?),
        None => None,
    };
    let tls = TlsConfig { dir, nbd, replication, nbd_verify_client };
    if nbd_verify_client && nbd == NbdTlsMode::Off {
        return Err(c.err("tls.nbd_verify_client", "needs tls.nbd = \"on\" or \"require\" (NBD TLS is off)"));
    }
    if tls.enabled()
        && tls.dir.is_none()
        && let Some((i, n)) = nodes.iter().enumerate().find(|(_, n)| n.tls_dir.is_none())
    {
        return Err(c.err(
            "tls.dir",
            format!(
                "missing (TLS is on and node[{i}] ({}) has no tls_dir; expected e.g. dir = \"/etc/repblock/pki\")",
                n.name
            ),
        ));
    }
    if replication == ReplTlsMode::Require {
        for (i, n) in nodes.iter().enumerate() {
            if !crate::tls::valid_peer_name(&n.name) {
                return Err(c.err(
                    &format!("node[{i}].name"),
                    format!(
                        "{:?} cannot be checked against a certificate (tls.replication = \"require\" needs node names that are DNS names, e.g. \"alpha\" or \"node-1\")",
                        n.name
                    ),
                ));
            }
        }
    }
    Ok(tls)
}
