//! The control socket: how `repctl` (and tests) talk to a running `repd`.
//!
//! A Unix stream socket at the node's `control` path, mode 0600. The protocol
//! is line-delimited JSON (documented for users in `docs/cli.md`):
//!
//! ```text
//! request  (one line):  {"cmd":"status"}
//!                       {"cmd":"promote","force":true}
//!                       {"cmd":"demote","force":false}
//!                       {"cmd":"connect","discard_my_data":false,"dry_run":false}
//!                       {"cmd":"disconnect"} {"cmd":"verify"} {"cmd":"invalidate"}
//!                       {"cmd":"wait-sync","timeout_secs":30}
//!                       {"cmd":"resume-io"}
//!                       {"cmd":"new-current-uuid","clear_bitmap":true}
//!                       {"cmd":"reload-tls"}
//!                       {"cmd":"events"}
//! response (one line):  {"ok":true,"result":<the command's answer>}
//!                       {"ok":false,"error":"<message for humans>"}
//! ```
//!
//! [`Request`] says when each request is allowed; [`reply`] has the typed
//! answer of each (firecracker's `rpc_interface.rs` shape: a request enum,
//! a typed answer per command, the refusal as an error).
//!
//! A connection may carry any number of requests, answered in order. `events`
//! turns the connection into a stream: one JSON object per line,
//! `{"time":"<RFC 3339, ms>","event":"role-changed","role":"primary",…}`,
//! starting with a `state` event that describes the node as it is, until the
//! client hangs up or the daemon stops.
//!
//! Versioning: this is version 1 of the protocol. Fields may be added to
//! requests (with defaults) and responses; none is renamed or removed.

use std::future::Future;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader as TokioBufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{broadcast, watch};

pub mod reply;

pub use reply::{
    CertStatus, Connecting, Demoted, Disconnected, InSync, Invalidated, IoResumed, NewGeneration, Promoted,
    TlsReloaded, VerifyStarted,
};

/// Longest request line the daemon reads.
pub const MAX_REQUEST_LINE: usize = 64 * 1024;

/// How long a client waits for a daemon to answer, by default.
pub const DEFAULT_CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Control-plane errors.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("repd for node {node} is not running (no control socket at {})", path.display())]
    NotRunning { node: String, path: PathBuf },
    #[error("node {node} already running (control socket {} answers)", path.display())]
    AlreadyRunning { node: String, path: PathBuf },
    #[error("Control socket {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("repd for node {node} did not answer within {}", humantime::format_duration(*after))]
    Timeout { node: String, after: Duration },
    #[error("Bad answer from repd on {}: {detail}", path.display())]
    Protocol { path: PathBuf, detail: String },
    /// The daemon understood the request and refused it; the message says why.
    #[error("{0}")]
    Refused(String),
}

/// One request. Serialized as `{"cmd":"<kebab-case name>", …fields}`.
///
/// Each variant says when the daemon carries it out; otherwise it answers
/// `{"ok":false,"error":…}` saying why and what to do. The answer of each is
/// in [`reply`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Always. Answer: the status object (design.md §6).
    Status,
    /// Become primary and start the NBD export. Refused after a fail-stop,
    /// while the peer is primary, and (without `force`) unless the disk is
    /// uptodate or a resync from the peer was decided. On a primary:
    /// nothing changes. Answer: [`Promoted`].
    Promote {
        #[serde(default)]
        force: bool,
    },
    /// Become secondary. Refused while NBD clients are attached unless
    /// `force` (which disconnects them). On a secondary: nothing changes.
    /// Answer: [`Demoted`].
    Demote {
        #[serde(default)]
        force: bool,
    },
    /// Two-node resources: start connecting to the peer. `discard_my_data`
    /// is refused on a primary. With `dry_run`, dials the peer and reports
    /// the decision a connect would take, changing nothing. Answer:
    /// [`Connecting`], or with `dry_run` the probe report.
    Connect {
        #[serde(default)]
        discard_my_data: bool,
        /// Probe the peer and report what a connect would do; change nothing.
        #[serde(default)]
        dry_run: bool,
    },
    /// Two-node resources: drop the link and stop dialing. Answer:
    /// [`Disconnected`].
    Disconnect,
    /// Two-node resources, connected and established, no verify running.
    /// Answer: [`VerifyStarted`].
    Verify,
    /// Two-node resources, on a secondary. Answer: [`Invalidated`].
    Invalidate,
    /// Wait until in sync (two nodes: connected, established, both disks
    /// uptodate; one node: uptodate, refused when it is not). Answer:
    /// [`InSync`].
    WaitSync {
        /// Give up after this many seconds (none: wait forever).
        #[serde(default)]
        timeout_secs: Option<f64>,
    },
    /// Always: turns the connection into the event stream.
    Events,
    /// Two-node resources: release writes suspended by
    /// `on_peer_loss = "suspend"`. Answer: [`IoResumed`].
    ResumeIo,
    /// Two-node resources, only with `clear_bitmap`: a new generation that
    /// skips the initial sync of two blank volumes (both connected,
    /// secondary and inconsistent). Answer: [`NewGeneration`].
    NewCurrentUuid {
        #[serde(default)]
        clear_bitmap: bool,
    },
    /// Automatic failover (`[failover] mode = "witness"`): turn it on or
    /// off on this node, or show it. Answer: the status' `failover` object.
    Failover { action: FailoverAction },
    /// With `[tls]`: read the certificate files again, as SIGHUP does (new
    /// handshakes use them; established connections keep theirs). Refused,
    /// naming the file, when one is missing or unusable; the previous
    /// certificates stay in use. Answer: [`TlsReloaded`].
    ReloadTls,
}

/// `repctl failover enable|disable|status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailoverAction {
    /// Automatic promotion allowed again (also after the budget stopped it).
    Enable,
    /// No automatic promotion of this node (a primary's lease and fencing
    /// work the same).
    Disable,
    /// Show the `failover` object.
    Status,
}

/// A request line that is not a valid [`Request`]; answered with
/// `{"ok":false,"error":"bad request: …"}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad request: {0}")]
pub struct BadRequest(pub String);

/// Parses one request line (the daemon's only way to read requests; a fuzz
/// target too).
///
/// Stricter than `serde_json::from_slice::<Request>`: serde accepts an
/// internally tagged enum written as a JSON array (`["demote", true]`) and
/// ignores unknown fields of variants without fields even under
/// `deny_unknown_fields` (`{"cmd":"disconnect","dry_run":true}`). Neither is
/// the documented protocol, so both are refused: the line must be an object,
/// and every key it holds must be one the parsed request serializes.
pub fn parse_request(line: &[u8]) -> Result<Request, BadRequest> {
    let value: serde_json::Value = serde_json::from_slice(line).map_err(|e| BadRequest(e.to_string()))?;
    let serde_json::Value::Object(fields) = &value else {
        return Err(BadRequest(format!(
            "expected a JSON object such as {{\"cmd\":\"status\"}}, got {}",
            json_kind(&value)
        )));
    };
    let req = Request::deserialize(&value).map_err(|e| BadRequest(e.to_string()))?;
    // Every field a request has is serialized (none is skipped), so the
    // canonical form names every key the request may carry.
    let canonical = serde_json::to_value(&req).map_err(|e| BadRequest(e.to_string()))?;
    if let Some(key) = fields.keys().find(|k| canonical.get(k.as_str()).is_none()) {
        let cmd = fields.get("cmd").and_then(|c| c.as_str()).unwrap_or_default();
        let mut known: Vec<&str> =
            canonical.as_object().map(|o| o.keys().map(|k| k.as_str()).collect()).unwrap_or_default();
        known.sort_unstable();
        return Err(BadRequest(format!("unknown field `{key}` for {cmd:?}, expected one of {}", known.join(", "))));
    }
    Ok(req)
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// One response line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    pub fn ok(result: serde_json::Value) -> Response {
        Response { ok: true, result: Some(result), error: None }
    }

    pub fn err(error: impl Into<String>) -> Response {
        Response { ok: false, result: None, error: Some(error.into()) }
    }

    /// The response line for what a [`ControlHandler`] answered. The reply
    /// goes through a `serde_json::Value`, whose keys are sorted: the bytes
    /// on the socket do not depend on the order of a reply type's fields.
    pub fn answer<R: Serialize, E: std::fmt::Display>(r: Result<R, E>) -> Response {
        match r.map(|r| serde_json::to_value(r)) {
            Ok(Ok(v)) => Response::ok(v),
            Ok(Err(e)) => Response::err(format!("cannot encode the answer: {e}")),
            Err(e) => Response::err(e.to_string()),
        }
    }
}

// The `events` stream carries `crate::event::EventLine`s (one typed
// `Event` each, stamped); the names and fields are listed in docs/cli.md.
pub use crate::event::{Event, EventLine};

/// What the control server serves: the node implements it.
pub trait ControlHandler: Send + Sync + 'static {
    /// The answer to a request (one type per command, see [`reply`]); sent
    /// as the `result` of an ok response.
    type Reply: Serialize + Send;
    /// A refusal or failure; its message is sent as the `error`.
    type Error: std::fmt::Display + Send;
    /// Answers one request (never `Events`, which the server streams itself).
    fn handle(&self, req: Request) -> impl Future<Output = Result<Self::Reply, Self::Error>> + Send;
    /// The `state` event that starts an `events` stream.
    fn state_event(&self) -> EventLine;
    /// A receiver of every later event.
    fn subscribe(&self) -> broadcast::Receiver<EventLine>;
}

/// A bound control socket, removed again when dropped.
#[derive(Debug)]
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ControlSocket {
    /// Binds the control socket of `node` at `path`: creates the parent
    /// directory, refuses when a live daemon answers there, removes a stale
    /// socket, and restricts the socket to its owner (mode 0600).
    ///
    /// Must be called inside a tokio runtime.
    pub fn bind(path: &Path, node: &str) -> Result<ControlSocket, ControlError> {
        let io_err = |source| ControlError::Io { path: path.to_path_buf(), source };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(io_err)?;
        }
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => match StdUnixStream::connect(path) {
                Ok(_) => return Err(ControlError::AlreadyRunning { node: node.to_string(), path: path.to_path_buf() }),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused || e.kind() == io::ErrorKind::NotFound => {
                    tracing::info!(path = %path.display(), "removing stale control socket");
                    std::fs::remove_file(path).map_err(io_err)?;
                }
                Err(e) => return Err(io_err(e)),
            },
            Ok(_) => {
                return Err(io_err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "a file that is not a socket is in the way",
                )));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(e)),
        }
        let listener = UnixListener::bind(path).map_err(io_err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io_err)?;
        Ok(ControlSocket { listener, path: path.to_path_buf() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves connections until `stop` turns true; each connection runs in
    /// its own task. Returns once the listener is closed (in-flight requests
    /// of open connections may still complete).
    pub async fn serve<H: ControlHandler>(self, handler: Arc<H>, stop: watch::Receiver<bool>) {
        let mut stopping = stop.clone();
        loop {
            tokio::select! {
                _ = stopped(&mut stopping) => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let handler = Arc::clone(&handler);
                        let stop = stop.clone();
                        tokio::spawn(async move {
                            if let Err(e) = serve_connection(stream, handler, stop).await {
                                tracing::debug!(error = %e, "control connection ended with an error");
                            }
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "control socket accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                tracing::warn!(path = %self.path.display(), error = %e, "could not remove the control socket");
            }
            _ => {}
        }
    }
}

/// Resolves once `stop` turns true (or its sender is gone).
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

async fn write_line<T: Serialize>(w: &mut tokio::net::unix::OwnedWriteHalf, v: &T) -> io::Result<()> {
    let mut line = serde_json::to_vec(v).map_err(io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line).await
}

async fn serve_connection<H: ControlHandler>(
    stream: UnixStream,
    handler: Arc<H>,
    mut stop: watch::Receiver<bool>,
) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = TokioBufReader::new(read);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let mut limited = (&mut lines).take(MAX_REQUEST_LINE as u64 + 1);
        let n = tokio::select! {
            _ = stopped(&mut stop) => return Ok(()),
            n = limited.read_until(b'\n', &mut buf) => n?,
        };
        if n == 0 {
            return Ok(());
        }
        if buf.last() != Some(&b'\n') {
            let why =
                if buf.len() > MAX_REQUEST_LINE { "request line too long" } else { "request line not terminated" };
            write_line(&mut write, &Response::err(why)).await?;
            return Ok(());
        }
        let req = match parse_request(&buf) {
            Ok(r) => r,
            Err(e) => {
                write_line(&mut write, &Response::err(e.to_string())).await?;
                continue;
            }
        };
        tracing::debug!(?req, "control request");
        if req == Request::Events {
            return stream_events(&mut write, &*handler, stop).await;
        }
        let resp = Response::answer(handler.handle(req).await);
        write_line(&mut write, &resp).await?;
    }
}

async fn stream_events<H: ControlHandler>(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    handler: &H,
    mut stop: watch::Receiver<bool>,
) -> io::Result<()> {
    let mut rx = handler.subscribe();
    write_line(write, &handler.state_event()).await?;
    loop {
        let ev = tokio::select! {
            _ = stopped(&mut stop) => return Ok(()),
            ev = rx.recv() => ev,
        };
        match ev {
            Ok(ev) => write_line(write, &ev).await?,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                let lost = EventLine::now(Event::EventsLost { count: n });
                write_line(write, &lost).await?;
            }
            Err(broadcast::error::RecvError::Closed) => return Ok(()),
        }
    }
}

/// A blocking client for one node's control socket (used by `repctl` and
/// tests).
#[derive(Debug)]
pub struct ControlClient {
    node: String,
    path: PathBuf,
    reader: BufReader<StdUnixStream>,
    timeout: Duration,
}

impl ControlClient {
    /// Connects; a missing socket or one nobody listens on is
    /// [`ControlError::NotRunning`].
    pub fn connect(path: &Path, node: &str, timeout: Duration) -> Result<ControlClient, ControlError> {
        let stream = match StdUnixStream::connect(path) {
            Ok(s) => s,
            Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused) => {
                return Err(ControlError::NotRunning { node: node.to_string(), path: path.to_path_buf() });
            }
            Err(source) => return Err(ControlError::Io { path: path.to_path_buf(), source }),
        };
        let client =
            ControlClient { node: node.to_string(), path: path.to_path_buf(), reader: BufReader::new(stream), timeout };
        client.set_timeout(Some(timeout))?;
        Ok(client)
    }

    fn set_timeout(&self, t: Option<Duration>) -> Result<(), ControlError> {
        let s = self.reader.get_ref();
        s.set_read_timeout(t)
            .and_then(|()| s.set_write_timeout(t))
            .map_err(|source| ControlError::Io { path: self.path.clone(), source })
    }

    fn read_line(&mut self) -> Result<Option<String>, ControlError> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Ok(None),
            Ok(_) => Ok(Some(line)),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                Err(ControlError::Timeout { node: self.node.clone(), after: self.timeout })
            }
            Err(source) => Err(ControlError::Io { path: self.path.clone(), source }),
        }
    }

    fn send(&mut self, req: &Request) -> Result<(), ControlError> {
        let mut line = serde_json::to_vec(req)
            .map_err(|e| ControlError::Protocol { path: self.path.clone(), detail: e.to_string() })?;
        line.push(b'\n');
        self.reader.get_mut().write_all(&line).map_err(|source| ControlError::Io { path: self.path.clone(), source })
    }

    /// Sends one request and waits for its answer. `extra` lengthens the
    /// timeout for requests that wait on purpose (`wait-sync`).
    pub fn request_with(&mut self, req: &Request, extra: Duration) -> Result<serde_json::Value, ControlError> {
        let saved = self.timeout;
        self.timeout = saved.saturating_add(extra);
        self.set_timeout(Some(self.timeout))?;
        let res = self.send(req).and_then(|()| self.read_line());
        self.timeout = saved;
        self.set_timeout(Some(saved))?;
        let Some(line) = res? else {
            return Err(ControlError::Protocol {
                path: self.path.clone(),
                detail: "connection closed before the answer".into(),
            });
        };
        let resp: Response = serde_json::from_str(&line).map_err(|e| ControlError::Protocol {
            path: self.path.clone(),
            detail: format!("{e}: {}", line.trim_end()),
        })?;
        if resp.ok {
            Ok(resp.result.unwrap_or(serde_json::Value::Null))
        } else {
            Err(ControlError::Refused(resp.error.unwrap_or_else(|| "refused without a reason".into())))
        }
    }

    /// Sends one request and waits for its answer.
    pub fn request(&mut self, req: &Request) -> Result<serde_json::Value, ControlError> {
        self.request_with(req, Duration::ZERO)
    }

    /// Sends one request and reads its answer as `T` (the request's type in
    /// [`reply`], or `serde_json::Value` to pass it on as it is). An answer of
    /// another shape is [`ControlError::Protocol`].
    pub fn call<T: DeserializeOwned>(&mut self, req: &Request) -> Result<T, ControlError> {
        self.call_with(req, Duration::ZERO)
    }

    /// [`ControlClient::call`] with the timeout lengthened by `extra`.
    pub fn call_with<T: DeserializeOwned>(&mut self, req: &Request, extra: Duration) -> Result<T, ControlError> {
        let v = self.request_with(req, extra)?;
        decode(&self.path, req, v)
    }

    /// Subscribes to events; calls `on_event` with each line (a JSON object)
    /// until it returns `false` or the daemon goes away.
    pub fn events(mut self, mut on_event: impl FnMut(&serde_json::Value) -> bool) -> Result<(), ControlError> {
        self.send(&Request::Events)?;
        self.set_timeout(None)?;
        while let Some(line) = self.read_line()? {
            let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| ControlError::Protocol {
                path: self.path.clone(),
                detail: format!("{e}: {}", line.trim_end()),
            })?;
            if v.get("ok") == Some(&serde_json::Value::Bool(false)) {
                let msg = v.get("error").and_then(|e| e.as_str()).unwrap_or("refused").to_string();
                return Err(ControlError::Refused(msg));
            }
            if !on_event(&v) {
                break;
            }
        }
        Ok(())
    }
}

/// Reads the answer `v` to `req` as `T`.
fn decode<T: DeserializeOwned>(path: &Path, req: &Request, v: serde_json::Value) -> Result<T, ControlError> {
    let what = serde_json::to_value(req).ok().and_then(|r| r.get("cmd").and_then(|c| c.as_str()).map(String::from));
    T::deserialize(&v).map_err(|e| ControlError::Protocol {
        path: path.to_path_buf(),
        detail: format!("unexpected answer to {}: {e}", what.as_deref().unwrap_or("the request")),
    })
}

/// Whether a daemon answers on `path` (used by offline commands such as
/// `create-md`, which refuse while the node runs).
pub fn daemon_answers(path: &Path) -> bool {
    StdUnixStream::connect(path).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ConnState, DiskState, Role};
    use std::sync::Mutex;

    #[test]
    fn request_wire_format() {
        let j = |r: &Request| serde_json::to_string(r).unwrap();
        assert_eq!(j(&Request::Status), r#"{"cmd":"status"}"#);
        assert_eq!(j(&Request::Promote { force: true }), r#"{"cmd":"promote","force":true}"#);
        assert_eq!(j(&Request::WaitSync { timeout_secs: Some(3.0) }), r#"{"cmd":"wait-sync","timeout_secs":3.0}"#);
        assert_eq!(j(&Request::ReloadTls), r#"{"cmd":"reload-tls"}"#);
        let r: Request = serde_json::from_str(r#"{"cmd":"demote"}"#).unwrap();
        assert_eq!(r, Request::Demote { force: false });
        let r: Request = serde_json::from_str(r#"{"cmd":"connect","discard_my_data":true}"#).unwrap();
        assert_eq!(r, Request::Connect { discard_my_data: true, dry_run: false });
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"explode"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"promote","forse":true}"#).is_err());
    }

    #[test]
    fn parse_request_refuses_what_serde_alone_lets_through() {
        let ok = |s: &str| parse_request(s.as_bytes()).unwrap();
        let bad = |s: &str| parse_request(s.as_bytes()).unwrap_err().to_string();
        assert_eq!(ok(r#"{"cmd":"disconnect"}"#), Request::Disconnect);
        assert_eq!(ok("{\"cmd\":\"promote\"}\n"), Request::Promote { force: false });
        assert_eq!(ok(r#"{"cmd":"wait-sync"}"#), Request::WaitSync { timeout_secs: None });
        assert_eq!(ok(r#"{"cmd":"wait-sync","timeout_secs":null}"#), Request::WaitSync { timeout_secs: None });
        assert_eq!(
            ok(r#"{"cmd":"connect","dry_run":true}"#),
            Request::Connect { discard_my_data: false, dry_run: true }
        );
        // Serde accepts these two; the protocol does not.
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"disconnect","dry_run":true}"#).is_ok());
        assert!(serde_json::from_str::<Request>(r#"["demote", true]"#).is_ok());
        assert_eq!(
            bad(r#"{"cmd":"disconnect","dry_run":true}"#),
            r#"bad request: unknown field `dry_run` for "disconnect", expected one of cmd"#
        );
        assert_eq!(
            bad(r#"["demote", true]"#),
            r#"bad request: expected a JSON object such as {"cmd":"status"}, got an array"#
        );
        assert!(bad(r#"{"cmd":"status","verbose":1}"#).contains("unknown field `verbose`"));
        assert!(bad(r#"{"cmd":"promote","forse":true}"#).contains("forse"));
        assert!(bad(r#""status""#).contains("got a string"));
        assert!(bad("not json").starts_with("bad request: "));
        assert!(bad(r#"{"cmd":"explode"}"#).contains("explode"));
    }

    #[test]
    fn response_and_event_wire_format() {
        assert_eq!(serde_json::to_string(&Response::ok(serde_json::json!(1))).unwrap(), r#"{"ok":true,"result":1}"#);
        assert_eq!(serde_json::to_string(&Response::err("no")).unwrap(), r#"{"ok":false,"error":"no"}"#);
        let ev = EventLine::now(Event::RoleChanged { disconnected_clients: None, forced: None, role: Role::Primary });
        let v = serde_json::to_value(&ev).unwrap();
        assert_eq!(v["event"], "role-changed");
        assert_eq!(v["role"], "primary");
        let t = v["time"].as_str().unwrap();
        assert!(humantime::parse_rfc3339(t).is_ok(), "{t}");
        assert!(t.ends_with('Z') && t.contains('.'), "{t}");
    }

    #[test]
    fn an_answer_of_another_shape_is_a_protocol_error() {
        let path = Path::new("/run/ctl.sock");
        let status = serde_json::json!({"role": "secondary"});
        let e = decode::<Promoted>(path, &Request::Promote { force: false }, status).unwrap_err();
        assert!(matches!(e, ControlError::Protocol { .. }), "{e}");
        assert_eq!(
            e.to_string(),
            "Bad answer from repd on /run/ctl.sock: unexpected answer to promote: missing field `changed`"
        );
        let v = serde_json::json!({"role": "primary", "changed": false});
        let p: Promoted = decode(path, &Request::Promote { force: false }, v).unwrap();
        assert_eq!(p, Promoted { role: crate::model::Role::Primary, changed: false, nbd: None });
    }

    /// A handler that records requests and refuses `demote`.
    struct Fake {
        seen: Mutex<Vec<Request>>,
        events: broadcast::Sender<EventLine>,
    }

    impl ControlHandler for Fake {
        type Reply = serde_json::Value;
        type Error = String;
        async fn handle(&self, req: Request) -> Result<serde_json::Value, String> {
            self.seen.lock().unwrap().push(req.clone());
            match req {
                Request::Demote { .. } => Err("refused: clients attached".into()),
                Request::Promote { .. } => {
                    let _ = self.events.send(EventLine::now(Event::RoleChanged {
                        disconnected_clients: None,
                        forced: None,
                        role: Role::Primary,
                    }));
                    Ok(serde_json::json!({"role": "primary"}))
                }
                _ => Ok(serde_json::json!({"role": "secondary"})),
            }
        }
        fn state_event(&self) -> EventLine {
            EventLine::now(Event::State {
                connection: ConnState::Standalone,
                disk: DiskState::Unknown,
                failed: None,
                nbd_clients: 0,
                role: Role::Secondary,
            })
        }
        fn subscribe(&self) -> broadcast::Receiver<EventLine> {
            self.events.subscribe()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn serves_requests_events_and_refuses_a_second_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/ctl.sock");
        let sock = ControlSocket::bind(&path, "alpha").unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (tx, _) = broadcast::channel(16);
        let fake = Arc::new(Fake { seen: Mutex::new(Vec::new()), events: tx });
        let (stop_tx, stop_rx) = watch::channel(false);
        let server = tokio::spawn(sock.serve(Arc::clone(&fake), stop_rx));

        // A second daemon on the same socket is refused.
        let e = ControlSocket::bind(&path, "alpha").unwrap_err().to_string();
        assert!(e.starts_with("node alpha already running (control socket"), "{e}");

        let p = path.clone();
        let (status, refused, events) = tokio::task::spawn_blocking(move || {
            let mut c = ControlClient::connect(&p, "alpha", Duration::from_secs(5)).unwrap();
            let status = c.request(&Request::Status).unwrap();
            let refused = c.request(&Request::Demote { force: false }).unwrap_err().to_string();
            // Raw bad lines get an error and the connection stays usable.
            let raw = c.reader.get_mut();
            raw.write_all(b"not json\n").unwrap();
            let bad = c.read_line().unwrap().unwrap();
            assert!(bad.contains("\"ok\":false") && bad.contains("bad request"), "{bad}");

            let ev_client = ControlClient::connect(&p, "alpha", Duration::from_secs(5)).unwrap();
            let p2 = p.clone();
            let promoter = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(200));
                let mut c = ControlClient::connect(&p2, "alpha", Duration::from_secs(5)).unwrap();
                c.request(&Request::Promote { force: true }).unwrap()
            });
            let mut events = Vec::new();
            ev_client
                .events(|v| {
                    events.push(v["event"].as_str().unwrap_or_default().to_string());
                    events.len() < 2
                })
                .unwrap();
            promoter.join().unwrap();
            (status, refused, events)
        })
        .await
        .unwrap();
        assert_eq!(status["role"], "secondary");
        assert_eq!(refused, "refused: clients attached");
        assert_eq!(events, vec!["state", "role-changed"]);
        assert_eq!(fake.seen.lock().unwrap().len(), 3);

        stop_tx.send(true).unwrap();
        server.await.unwrap();
        assert!(!path.exists(), "socket removed on stop");
        let e = ControlClient::connect(&path, "alpha", Duration::from_secs(1)).unwrap_err().to_string();
        assert_eq!(e, format!("repd for node alpha is not running (no control socket at {})", path.display()));
    }

    #[test]
    fn a_daemon_that_never_answers_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        // Accepts connections (the kernel does) but never reads or answers.
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let mut c = ControlClient::connect(&path, "alpha", Duration::from_millis(200)).unwrap();
        let t = std::time::Instant::now();
        let e = c.request(&Request::Status).unwrap_err();
        assert!(matches!(e, ControlError::Timeout { .. }), "{e}");
        assert_eq!(e.to_string(), "repd for node alpha did not answer within 200ms");
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn stale_socket_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        // A socket file nobody listens on, as left by a killed daemon.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let e = ControlClient::connect(&path, "alpha", Duration::from_secs(1)).unwrap_err();
        assert!(matches!(e, ControlError::NotRunning { .. }), "{e}");
        let sock = ControlSocket::bind(&path, "alpha").unwrap();
        assert!(daemon_answers(&path));
        drop(sock);
        assert!(!daemon_answers(&path));
    }
}
