//! Prometheus metrics (`metrics = "host:port"` in a `[[node]]` section):
//! `GET /metrics` in the Prometheus text format 0.0.4, encoded by
//! `prometheus-client` from one [`Status`] snapshot per scrape, so that
//! `/metrics` and `repctl status --json` never disagree. Every name is
//! documented in docs/metrics.md.
//!
//! The HTTP server is hyper (HTTP/1.1) in repd's runtime: at most
//! [`MAX_CONNECTIONS`] connections at once (more wait in the kernel's
//! backlog), each closed after [`CONNECTION_TIMEOUT`].

use std::fmt::{self, Write as _};
use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::exemplar::Exemplar;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use super::{Node, Status};
use crate::model::ReplState;
use crate::stats::{IoOp, Statistics};

/// Concurrent scrape connections served.
pub const MAX_CONNECTIONS: usize = 8;
/// A connection (idle or not) is closed after this long.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of the metrics endpoint.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot bind the metrics address {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

type Labels = Vec<(&'static str, String)>;

/// Values of one state metric, one-hot over `states` (the label `key`
/// names the state).
const ROLES: [&str; 2] = ["primary", "secondary"];
const PEER_ROLES: [&str; 3] = ["primary", "secondary", "unknown"];
const DISKS: [&str; 6] = ["uptodate", "consistent", "outdated", "inconsistent", "diskless", "unknown"];
const CONNECTIONS: [&str; 3] = ["standalone", "connecting", "connected"];
const REPLICATIONS: [&str; 4] = ["off", "established", "sync-source", "sync-target"];

/// Builds the families of one scrape from a status snapshot (and the
/// node's histograms).
#[derive(Debug)]
struct NodeCollector {
    node: Weak<Node>,
}

impl Collector for NodeCollector {
    fn encode(&self, enc: DescriptorEncoder) -> fmt::Result {
        // repd stopping: an empty scrape.
        let Some(node) = self.node.upgrade() else { return Ok(()) };
        let status = node.status();
        encode_status(enc, &node, &status)
    }
}

impl Node {
    /// The `statistics` of the status.
    pub(super) fn statistics(&self, vs: &crate::volume::VolumeStatus) -> Statistics {
        let io = &self.io_stats;
        let link = self.repl.as_ref().map(|r| r.link_stats());
        let up = link.and_then(|l| l.up());
        let in_flight = link.map_or(0, |l| l.queued_bytes());
        let buffer = if self.repl.is_some() { self.config.max_buffer } else { 0 };
        let now_ms = crate::model::unix_ms();
        Statistics {
            sent_bytes: link.map_or(0, |l| l.sent_bytes()),
            received_bytes: link.map_or(0, |l| l.received_bytes()),
            read_bytes: io.read_bytes(),
            written_bytes: io.written_bytes(),
            read_requests: io.requests(IoOp::Read),
            write_requests: io.requests(IoOp::Write) + io.requests(IoOp::WriteZeroes),
            trim_requests: io.requests(IoOp::Trim),
            flush_requests: io.requests(IoOp::Flush),
            pending_requests: io.pending(),
            unacked_requests: io.unacked(),
            in_flight_bytes: in_flight,
            replication_buffer_bytes: buffer,
            replication_buffer_percent: if buffer == 0 { 0.0 } else { 100.0 * in_flight as f64 / buffer as f64 },
            wal_syncs: vs.counters.wal_syncs,
            checkpoints: vs.counters.checkpoints,
            bitmap_writes: vs.counters.bitmap_writes,
            peer_address: up.as_ref().map(|(a, _)| a.clone()),
            connected_since: up.as_ref().map(|(_, ms)| {
                humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(*ms)).to_string()
            }),
            connected_seconds: up.as_ref().map(|(_, ms)| now_ms.saturating_sub(*ms) as f64 / 1000.0),
        }
    }
}

/// Writes families of samples.
struct Out<'a> {
    enc: DescriptorEncoder<'a>,
    base: Labels,
    peer: Labels,
}

impl Out<'_> {
    fn family(&mut self, name: &str, help: &str, ty: MetricType, samples: &[(Labels, f64)]) -> fmt::Result {
        let mut me = self.enc.encode_descriptor(name, help, None, ty)?;
        for (labels, v) in samples {
            let mut f = me.encode_family(labels)?;
            match ty {
                MetricType::Counter => {
                    f.encode_counter::<NoLabelSet, f64, f64>(v, None::<&Exemplar<NoLabelSet, f64>>)?
                }
                _ => f.encode_gauge(v)?,
            }
        }
        Ok(())
    }

    /// A gauge with the node's labels.
    fn gauge(&mut self, name: &str, help: &str, v: f64) -> fmt::Result {
        let l = self.base.clone();
        self.family(name, help, MetricType::Gauge, &[(l, v)])
    }

    /// A counter with the node's labels (`_total` is appended).
    fn counter(&mut self, name: &str, help: &str, v: u64) -> fmt::Result {
        let l = self.base.clone();
        self.family(name, help, MetricType::Counter, &[(l, v as f64)])
    }

    /// A gauge with the node's and the peer's labels (nothing on a single node).
    fn peer_gauge(&mut self, name: &str, help: &str, v: f64) -> fmt::Result {
        if self.peer.is_empty() {
            return Ok(());
        }
        let l = self.peer.clone();
        self.family(name, help, MetricType::Gauge, &[(l, v)])
    }

    fn peer_counter(&mut self, name: &str, help: &str, v: u64) -> fmt::Result {
        if self.peer.is_empty() {
            return Ok(());
        }
        let l = self.peer.clone();
        self.family(name, help, MetricType::Counter, &[(l, v as f64)])
    }

    /// One sample per state, 1 for `current`, labelled `key="state"`.
    fn one_hot(
        &mut self,
        name: &str,
        help: &str,
        key: &'static str,
        states: &[&str],
        current: &str,
        peer: bool,
    ) -> fmt::Result {
        let base = if peer { &self.peer } else { &self.base };
        if base.is_empty() {
            return Ok(());
        }
        let samples: Vec<(Labels, f64)> = states
            .iter()
            .map(|s| {
                let mut l = base.clone();
                l.push((key, (*s).to_string()));
                (l, f64::from(u8::from(*s == current)))
            })
            .collect();
        self.family(name, help, MetricType::Gauge, &samples)
    }
}

fn b(v: bool) -> f64 {
    f64::from(u8::from(v))
}

fn encode_status(enc: DescriptorEncoder, node: &Node, s: &Status) -> fmt::Result {
    let base: Labels = vec![("resource", s.resource.clone()), ("node", s.node.clone())];
    let peer: Labels = match &s.peer.name {
        Some(p) => {
            let mut l = base.clone();
            l.push(("peer", p.clone()));
            l
        }
        None => Vec::new(),
    };
    let mut o = Out { enc, base, peer };
    let st = &s.statistics;

    let mut info = o.base.clone();
    info.push(("version", env!("CARGO_PKG_VERSION").to_string()));
    info.push(("protocol", s.protocol.to_string()));
    info.push(("io_engine", s.io_engine.to_string()));
    o.family(
        "repblock_info",
        "Constant 1; labels: repblock version, replication protocol, IO engine",
        MetricType::Gauge,
        &[(info, 1.0)],
    )?;
    o.gauge("repblock_up", "1 while repd answers (a scrape that fails means repd is down)", 1.0)?;

    // State.
    o.one_hot("repblock_role", "Role of this node (one-hot)", "role", &ROLES, &s.role.to_string(), false)?;
    o.one_hot("repblock_disk_state", "Disk state of this node (one-hot)", "disk", &DISKS, &s.disk.to_string(), false)?;
    o.one_hot(
        "repblock_connection_state",
        "Connection to the peer (one-hot)",
        "connection",
        &CONNECTIONS,
        &s.connection.to_string(),
        true,
    )?;
    let repl = s.replication.map_or("off", ReplState::as_str);
    o.one_hot(
        "repblock_replication_state",
        "Replication state; off when not connected (one-hot)",
        "replication",
        &REPLICATIONS,
        repl,
        true,
    )?;
    let peer_role = s.peer.role.map_or("unknown".to_string(), |r| r.to_string());
    o.one_hot(
        "repblock_peer_role",
        "Role of the peer as last seen; unknown when not connected (one-hot)",
        "role",
        &PEER_ROLES,
        &peer_role,
        true,
    )?;
    let peer_disk = s.peer.disk.map_or("unknown".to_string(), |d| d.to_string());
    o.one_hot(
        "repblock_peer_disk_state",
        "Disk state of the peer; unknown when not connected (one-hot)",
        "disk",
        &DISKS,
        &peer_disk,
        true,
    )?;
    o.peer_gauge(
        "repblock_peer_connected",
        "1 while connected to the peer",
        b(s.connection.to_string() == "connected"),
    )?;
    o.peer_gauge(
        "repblock_split_brain",
        "1 when the last connect found a split brain (both nodes standalone)",
        b(s.split_brain),
    )?;
    o.gauge(
        "repblock_io_suspended",
        "1 while writes are held: peer lost with on_peer_loss = suspend",
        b(s.io_suspended),
    )?;
    o.gauge(
        "repblock_failed",
        "1 after a fail-stop: the volume stopped taking writes (reason in status)",
        b(s.failed.is_some()),
    )?;

    // Sync and LSNs: (name, help, value).
    let peer_gauges: [(&str, &str, f64); 9] = [
        (
            "repblock_out_of_sync_bytes",
            "Bytes the peer may lack or hold differently (running resync: what it has left)",
            s.out_of_sync_bytes as f64,
        ),
        ("repblock_resync_running", "1 while a resync runs", b(s.resync.total_bytes > 0)),
        (
            "repblock_resync_done_bytes",
            "Bytes the running resync has moved (0 when none runs)",
            s.resync.done_bytes as f64,
        ),
        (
            "repblock_resync_total_bytes",
            "Bytes the running resync moves in all (0 when none runs)",
            s.resync.total_bytes as f64,
        ),
        (
            "repblock_resync_speed_bytes_per_second",
            "Average speed of the running resync since it started",
            s.resync.speed_bytes_per_sec as f64,
        ),
        ("repblock_verify_running", "1 while an online verify runs", b(s.verify.running)),
        (
            "repblock_peer_received_lsn",
            "Highest LSN the peer acknowledged as received (this session)",
            s.lsn.peer_received as f64,
        ),
        ("repblock_peer_written_lsn", "Highest LSN the peer acknowledged as written", s.lsn.peer_written as f64),
        ("repblock_peer_durable_lsn", "Highest LSN the peer acknowledged as durable", s.lsn.peer_durable as f64),
    ];
    for (name, help, v) in peer_gauges {
        o.peer_gauge(name, help, v)?;
    }
    o.gauge("repblock_local_lsn", "Highest LSN written locally", s.lsn.local as f64)?;
    o.gauge("repblock_durable_lsn", "Highest LSN durable in the local WAL", s.wal.durable_lsn as f64)?;
    o.gauge("repblock_checkpoint_lsn", "LSN of the last checkpoint", s.wal.checkpoint_lsn as f64)?;

    // Local IO.
    o.counter("repblock_read_bytes", "Bytes NBD clients read", st.read_bytes)?;
    o.counter("repblock_written_bytes", "Bytes NBD clients wrote (WRITE and WRITE_ZEROES)", st.written_bytes)?;
    let stats = &node.io_stats;
    let samples: Vec<(Labels, f64)> = IoOp::ALL
        .iter()
        .map(|op| {
            let mut l = o.base.clone();
            l.push(("op", op.as_str().to_string()));
            (l, stats.requests(*op) as f64)
        })
        .collect();
    o.family("repblock_requests", "NBD requests by operation", MetricType::Counter, &samples)?;
    o.gauge("repblock_pending_requests", "NBD requests in the backend now", st.pending_requests as f64)?;
    o.gauge(
        "repblock_unacked_requests",
        "NBD requests done locally, waiting for the peer's acknowledgement",
        st.unacked_requests as f64,
    )?;
    o.gauge("repblock_nbd_clients", "Attached NBD clients", s.nbd.clients as f64)?;
    o.gauge("repblock_nbd_serving", "1 while the NBD export is up (primary)", b(s.nbd.serving))?;
    o.gauge("repblock_size_bytes", "Volume size", s.size as f64)?;

    // Volume.
    o.counter("repblock_wal_syncs", "fdatasyncs of the WAL (group commits and checkpoints)", st.wal_syncs)?;
    o.counter("repblock_checkpoints", "Checkpoints completed", st.checkpoints)?;
    o.counter("repblock_bitmap_writes", "Dirty bitmap pages written to the metadata file", st.bitmap_writes)?;
    o.gauge("repblock_wal_bytes", "Bytes of WAL kept on disk", s.wal.bytes as f64)?;

    // Replication link.
    o.peer_counter("repblock_replication_sent_bytes", "Bytes sent to the peer on the replication link", st.sent_bytes)?;
    o.peer_counter(
        "repblock_replication_received_bytes",
        "Bytes received from the peer on the replication link",
        st.received_bytes,
    )?;
    o.peer_gauge(
        "repblock_replication_buffer_bytes",
        "Replicated data handed to the link and not yet on the socket",
        st.in_flight_bytes as f64,
    )?;
    o.peer_gauge(
        "repblock_replication_buffer_limit_bytes",
        "max_buffer: the budget of repblock_replication_buffer_bytes",
        st.replication_buffer_bytes as f64,
    )?;
    if let Some(secs) = st.connected_seconds {
        let start = crate::model::unix_ms() as f64 / 1000.0 - secs;
        o.peer_gauge(
            "repblock_connection_start_time_seconds",
            "Unix time the current connection came up (absent when not connected)",
            start,
        )?;
    }
    if !o.peer.is_empty() {
        let mut me = o.enc.encode_descriptor(
            "repblock_ack_wait_seconds",
            "Time a reply waited for the peer's acknowledgement after the local write (protocol A: none; B: received; C: written, durable for FLUSH/FUA)",
            None,
            MetricType::Histogram,
        )?;
        for flush in [false, true] {
            let mut l = o.peer.clone();
            l.push(("protocol", s.protocol.to_string()));
            l.push(("durability", if flush { "flush" } else { "write" }.to_string()));
            stats.ack_wait(flush).encode(me.encode_family(&l)?)?;
        }
    }
    Ok(())
}

/// The `/metrics` text of `node` now.
pub fn render(node: &Arc<Node>) -> Result<String, fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(NodeCollector { node: Arc::downgrade(node) }));
    let mut out = String::with_capacity(16 << 10);
    prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)?;
    Ok(out)
}

/// Binds the metrics address (before the daemon reports ready: a taken
/// port stops repd with a clear error).
pub async fn bind(addr: &str) -> Result<TcpListener, MetricsError> {
    TcpListener::bind(addr).await.map_err(|source| MetricsError::Bind { addr: addr.to_string(), source })
}

/// Serves `GET /metrics` until `stop` turns true.
pub async fn serve(listener: TcpListener, node: Weak<Node>, mut stop: watch::Receiver<bool>) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            _ = crate::control::stopped(&mut stop) => return,
            p = Arc::clone(&limit).acquire_owned() => match p { Ok(p) => p, Err(_) => return },
        };
        let (stream, peer) = tokio::select! {
            _ = crate::control::stopped(&mut stop) => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let node = node.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let io = hyper_util::rt::TokioIo::new(stream);
            let service = hyper::service::service_fn(move |req| {
                let node = node.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(&req, &node, peer)) }
            });
            let conn = hyper::server::conn::http1::Builder::new().keep_alive(true).serve_connection(io, service);
            match tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "metrics connection ended"),
                Err(_) => tracing::debug!(%peer, "metrics connection closed after {CONNECTION_TIMEOUT:?}"),
                Ok(Ok(())) => {}
            }
        });
    }
}

fn answer<B>(req: &Request<B>, node: &Weak<Node>, peer: SocketAddr) -> Response<Full<Bytes>> {
    let text = |code: StatusCode, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = code;
        r.headers_mut()
            .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"));
        r
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into());
        r.headers_mut().insert(hyper::header::ALLOW, hyper::header::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match req.uri().path() {
        "/metrics" => {
            let Some(node) = node.upgrade() else {
                return text(StatusCode::SERVICE_UNAVAILABLE, "repd is stopping\n".into());
            };
            match render(&node) {
                Ok(body) => {
                    let mut r = text(StatusCode::OK, body);
                    r.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static(
                            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                        ),
                    );
                    r
                }
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "metrics: encoding failed");
                    text(StatusCode::INTERNAL_SERVER_ERROR, format!("encoding failed: {e}\n"))
                }
            }
        }
        "/" => {
            let mut body = String::new();
            let _ = writeln!(body, "repblock metrics: GET /metrics (Prometheus text format; docs/metrics.md)");
            text(StatusCode::OK, body)
        }
        other => text(StatusCode::NOT_FOUND, format!("no {other}: GET /metrics\n")),
    }
}
