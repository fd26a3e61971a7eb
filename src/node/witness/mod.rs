//! The witness daemon: `repd --node gamma` for a `[[node]] witness = true`
//! (docs/failover.md, "The witness").
//!
//! ```text
//!  alpha ──┐  Hello/Auth/Welcome (v3, either data node)      ┌── witness.state
//!          ├─► TermPing ─► Witness::on_ping ─► TermPong        │   (pwrite + fdatasync
//!  beta  ──┘   Claim/Solo/PeerUptodate/Release                 │    before each answer)
//!              ─► Witness::handle ─► persist ───────────────────┘ ─► Grant / Refused
//! ```
//!
//! One listener on the witness's `replication` address (the authenticated
//! framed link of `repl::link` and `repl::handshake`, version 3), one task
//! per data node connection, and the control socket (`status`, `events`).
//! The vote itself is [`crate::failover::witness`]; this module only carries
//! messages to it and answers from it. Decisions are taken one at a time
//! under one mutex, and a decision that changes the record is persisted
//! (fdatasync) under that mutex before it is answered: requests are rare
//! (a failover, a solo, a switchover), so the few milliseconds of a sync
//! inline on a runtime thread are the simple, obviously-ordered choice.
//!
//! A missing or unreadable state file is amnesia: the witness runs, answers
//! pings (without a view) and refuses every request with `no-state`; its
//! status says so and how to re-initialise it. A failed persist is
//! fail-stop: the request is not answered, the connection is closed, and
//! every later request goes unanswered until the witness is restarted.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

use crate::config::{Config, WitnessNodeConfig};
use crate::control::{self, ControlError, ControlHandler, ControlSocket, Request};
use crate::event::{Event, EventLine};
use crate::failover::state_file::{Loaded, StateFile, StateFileError};
use crate::failover::witness::{Decision, Reply, Request as VoteRequest};
use crate::failover::{BootClock, Clock, Grant, MonoTime, NodeIndex, NodeSet, Term, Witness, WitnessRecord};
use crate::model::{DiskState, GenIds, Role};
use crate::repl::handshake::{self, Expect, LocalHello};
use crate::repl::link::{self, FrameReader, FrameWriter};
use crate::repl::proto::{GoodbyeReason, Message, TermPong, WitnessView, msg_type};

pub mod client;

/// How long a connecting data node has to complete the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors starting the witness or initialising its state.
#[derive(Debug, thiserror::Error)]
pub enum WitnessError {
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    StateFile(#[from] StateFileError),
    #[error("Witness {node}: cannot listen on {addr}: {source}")]
    Listen {
        node: String,
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Witness {node}: cannot create {}: {source}", dir.display())]
    Dir {
        node: String,
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("node {node} is running (control socket {} answers); stop repd before create-md", path.display())]
    Running { node: String, path: PathBuf },
    #[error("--primary {0:?}: not a data node of this resource")]
    NoSuchPrimary(String),
    #[error("{0}")]
    Refused(String),
}

/// `repctl --node gamma create-md [--force] [--term T --primary NODE]`:
/// writes the witness's state file. Without `term` the bootstrap record
/// (term 0, no primary); with it, the record a re-initialised witness needs
/// after amnesia: the data nodes' highest term, and only the node serving
/// now as primary and up to date.
pub fn create_state(
    config: &Config,
    me: &WitnessNodeConfig,
    force: bool,
    term: Option<u64>,
    primary: Option<&str>,
) -> Result<WitnessRecord, WitnessError> {
    if control::daemon_answers(&me.control) {
        return Err(WitnessError::Running { node: me.name.clone(), path: me.control.clone() });
    }
    let primary = match primary {
        None => None,
        Some(name) => match config.node_index(name) {
            Some(i) if config.nodes.iter().any(|n| n.name == name) => Some(i),
            _ => return Err(WitnessError::NoSuchPrimary(name.to_string())),
        },
    };
    let record = match term {
        None if primary.is_some() => {
            return Err(WitnessError::Refused("--primary needs --term (the data nodes' current term)".into()));
        }
        None => WitnessRecord::BOOTSTRAP,
        Some(t) => WitnessRecord::reinitialised(Term(t), primary),
    };
    std::fs::create_dir_all(&me.dir).map_err(|source| WitnessError::Dir {
        node: me.name.clone(),
        dir: me.dir.clone(),
        source,
    })?;
    StateFile::create(&StateFile::path_in(&me.dir), record, force)?;
    tracing::info!(node = %me.name, term = record.term.0, dir = %me.dir.display(), "witness state created");
    Ok(record)
}

/// One connected data node, as status shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WitnessConnection {
    pub node: String,
    pub address: String,
    /// Milliseconds since the connection was accepted.
    pub connected_ms: u64,
    pub pings: u64,
    /// Pongs with PRIMARY_OK sent on this connection (lease renewals).
    pub renewals: u64,
}

/// The witness's state file as status shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WitnessStateFile {
    pub path: PathBuf,
    /// The file holds a record and the last update succeeded.
    pub ok: bool,
    /// Why not (missing, both slots invalid, a failed update).
    pub problem: Option<String>,
    /// What to do about it.
    pub hint: Option<String>,
}

/// `repctl --node gamma status --json` on a witness.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WitnessStatus {
    pub resource: String,
    pub node: String,
    /// Always `"witness"`.
    pub role: String,
    /// The witness's term (0 without state).
    pub term: u64,
    pub primary: Option<String>,
    pub uptodate: Vec<String>,
    /// Whether it answers requests (false: amnesia or a failed state file).
    pub voting: bool,
    pub state_file: WitnessStateFile,
    /// Milliseconds left of the startup holdoff (claims refused meanwhile).
    pub holdoff_remaining_ms: u64,
    /// Lease renewals (Pongs with PRIMARY_OK) since start.
    pub lease_renewals: u64,
    /// Milliseconds since the primary's lease was last renewed here.
    pub last_renewal_ms_ago: Option<u64>,
    pub connected: Vec<WitnessConnection>,
    pub granted: u64,
    pub refused: u64,
}

impl WitnessStatus {
    /// The human `status`.
    pub fn human(&self) -> String {
        let mut s = format!(
            "{}: role:witness term:{} primary:{} uptodate:{}\n",
            self.node,
            self.term,
            self.primary.as_deref().unwrap_or("none"),
            if self.uptodate.is_empty() { "none".to_string() } else { self.uptodate.join(",") },
        );
        if self.voting {
            s.push_str(&format!("  voting: yes (state {})\n", self.state_file.path.display()));
        } else {
            s.push_str(&format!(
                "  voting: NO: {}\n",
                self.state_file.problem.as_deref().unwrap_or("the state file is not usable")
            ));
            if let Some(h) = &self.state_file.hint {
                s.push_str(&format!("  {h}\n"));
            }
        }
        if self.holdoff_remaining_ms > 0 {
            s.push_str(&format!("  startup holdoff: {} ms left (claims refused)\n", self.holdoff_remaining_ms));
        }
        let connected: Vec<String> =
            self.connected.iter().map(|c| format!("{} ({}, {} renewals)", c.node, c.address, c.renewals)).collect();
        s.push_str(&format!(
            "  connected: {}\n",
            if connected.is_empty() { "none".to_string() } else { connected.join(", ") }
        ));
        s.push_str(&format!(
            "  lease renewals: {}{}  requests: {} granted, {} refused\n",
            self.lease_renewals,
            self.last_renewal_ms_ago.map(|ms| format!(" (last {ms} ms ago)")).unwrap_or_default(),
            self.granted,
            self.refused
        ));
        s
    }
}

#[derive(Debug)]
struct Conn {
    /// Distinguishes a reconnection from the connection it replaced.
    id: u64,
    address: String,
    since: Instant,
    pings: u64,
    renewals: u64,
}

#[derive(Debug)]
struct Inner {
    witness: Witness,
    store: Option<StateFile>,
    /// Why there is no usable state (amnesia), if so.
    amnesia: Option<String>,
    /// A persist failed (fail-stop until restart).
    failed: Option<String>,
    conns: BTreeMap<String, Conn>,
    next_conn: u64,
    renewals: u64,
    last_renewal: Option<Instant>,
    granted: u64,
    refused: u64,
}

/// The witness: its vote, its connections, its events.
#[derive(Debug)]
pub struct WitnessNode {
    config: Config,
    me: WitnessNodeConfig,
    clock: BootClock,
    started: Instant,
    wait: Duration,
    inner: Mutex<Inner>,
    events: broadcast::Sender<EventLine>,
}

impl WitnessNode {
    /// Opens the state file (amnesia if missing or unreadable).
    pub fn open(config: Config, me: WitnessNodeConfig) -> Result<WitnessNode, WitnessError> {
        let path = StateFile::path_in(&me.dir);
        let (record, store, amnesia) = match StateFile::open(&path)? {
            Loaded::Record { file, slot } => (Some(slot.record), Some(file), None),
            Loaded::Amnesia { why } => {
                tracing::error!(node = %me.name, "{why}: the witness refuses to vote until re-initialised");
                (None, None, Some(why))
            }
        };
        let clock = BootClock;
        let wait = config.failover.timings.wait();
        let witness = Witness::start(record, wait, clock.now());
        let (events, _) = broadcast::channel(1024);
        Ok(WitnessNode {
            config,
            me,
            clock,
            started: Instant::now(),
            wait,
            inner: Mutex::new(Inner {
                witness,
                store,
                amnesia,
                failed: None,
                conns: BTreeMap::new(),
                next_conn: 0,
                renewals: 0,
                last_renewal: None,
                granted: 0,
                refused: 0,
            }),
            events,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn emit(&self, e: Event) {
        let _ = self.events.send(EventLine::now(e));
    }

    fn name_of(&self, i: Option<NodeIndex>) -> Option<String> {
        i.and_then(|i| self.config.node_name(i)).map(str::to_string)
    }

    fn names_in(&self, set: NodeSet) -> Vec<String> {
        set.iter().filter_map(|i| self.config.node_name(i)).map(str::to_string).collect()
    }

    fn data_node_names(&self) -> Vec<String> {
        self.config.nodes.iter().map(|n| n.name.clone()).collect()
    }

    /// The systemd `STATUS=` line: `role:witness term:3 primary:alpha
    /// voting:yes connected:alpha,beta`.
    pub fn status_line(&self) -> String {
        let s = self.status();
        let connected: Vec<String> = s.connected.into_iter().map(|c| c.node).collect();
        format!(
            "role:witness term:{} primary:{} voting:{} connected:{}",
            s.term,
            s.primary.as_deref().unwrap_or("none"),
            if s.voting { "yes" } else { "no" },
            if connected.is_empty() { "none".to_string() } else { connected.join(",") }
        )
    }

    /// The status object.
    pub fn status(&self) -> WitnessStatus {
        let inner = self.lock();
        let record = inner.witness.record().copied();
        let path = StateFile::path_in(&self.me.dir);
        let problem = inner.failed.clone().or_else(|| inner.amnesia.clone());
        let hint = if inner.failed.is_some() {
            Some(format!("restart the witness (repd --config {} --node {})", self.config.file.display(), self.me.name))
        } else if inner.amnesia.is_some() {
            Some(format!(
                "re-initialise it: stop this repd, run `repctl --config {} --node {} create-md --force --term T \
                 --primary NODE` with T the highest `term` of the data nodes' status and NODE the primary serving \
                 now (none: leave out --primary), then start it again",
                self.config.file.display(),
                self.me.name
            ))
        } else {
            None
        };
        let holdoff = self.wait.saturating_sub(self.started.elapsed());
        WitnessStatus {
            resource: self.config.name.clone(),
            node: self.me.name.clone(),
            role: "witness".into(),
            term: record.map_or(0, |r| r.term.0),
            primary: record.and_then(|r| self.name_of(r.primary)),
            uptodate: record.map_or_else(Vec::new, |r| self.names_in(r.uptodate)),
            voting: problem.is_none(),
            state_file: WitnessStateFile { path, ok: problem.is_none(), problem, hint },
            holdoff_remaining_ms: if record.is_some() { holdoff.as_millis() as u64 } else { 0 },
            lease_renewals: inner.renewals,
            last_renewal_ms_ago: inner.last_renewal.map(|t| t.elapsed().as_millis() as u64),
            connected: inner
                .conns
                .iter()
                .map(|(node, c)| WitnessConnection {
                    node: node.clone(),
                    address: c.address.clone(),
                    connected_ms: c.since.elapsed().as_millis() as u64,
                    pings: c.pings,
                    renewals: c.renewals,
                })
                .collect(),
            granted: inner.granted,
            refused: inner.refused,
        }
    }

    /// A Ping from `node`: the Pong (renewing its lease if it is the
    /// primary of the witness's term).
    fn on_ping(&self, node: &str, index: NodeIndex, seq: u64, sent_ns: u64, term: u64) -> TermPong {
        let mut inner = self.lock();
        let now = self.clock.now();
        let voting = inner.failed.is_none();
        let pv = inner.witness.on_ping(index, Term(term), now);
        // A failed witness renews nobody: it can no longer record a grant.
        let primary_ok = pv.primary_ok && voting;
        if primary_ok {
            inner.renewals += 1;
            inner.last_renewal = Some(Instant::now());
        }
        if let Some(c) = inner.conns.get_mut(node) {
            c.pings += 1;
            c.renewals += u64::from(primary_ok);
        }
        TermPong {
            seq,
            echo_sent_ns: sent_ns,
            term: pv.view.map_or(0, |v| v.term.0),
            primary_ok,
            view: pv.view.map(|v| (v.primary.map(|p| p.0), v.uptodate.0)),
        }
    }

    /// Decides a request, persisting before answering. `None`: nothing may
    /// be answered (the state file failed).
    fn decide(&self, node: &str, req: VoteRequest, request_term: u64, code: u16) -> Option<Message> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        if inner.failed.is_some() {
            return None;
        }
        let before = inner.witness.record().copied();
        let now = self.clock.now();
        let reply: Reply = match inner.witness.handle(req, now) {
            Decision::Answer(r) => r,
            Decision::Persist(pending) => {
                let Some(store) = inner.store.as_mut() else {
                    // A record exists only if a state file was read.
                    inner.failed = Some("no state file to persist to".into());
                    return None;
                };
                match pending.persist(store, now) {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!(node = %self.me.name, error = %e, "witness state file failed: voting stops");
                        inner.failed = Some(e.to_string());
                        drop(guard);
                        self.emit(Event::Failed { reason: format!("witness state file: {e}") });
                        return None;
                    }
                }
            }
        };
        let after = inner.witness.record().copied();
        let (msg, granted, reason) = match reply {
            Ok(g) => {
                inner.granted += 1;
                (Message::Grant { request: code, request_term, view: grant_view(g) }, true, None)
            }
            Err(r) => {
                inner.refused += 1;
                let view = r.view.map(grant_view);
                let m = Message::Refused { request: code, reason: r.reason.code(), request_term, view };
                (m, false, Some(r.reason.as_str().to_string()))
            }
        };
        drop(guard);
        tracing::info!(from = node, request = req.name(), request_term, granted, reason = ?reason, "witness vote");
        if after != before
            && let Some(r) = after
        {
            self.emit(Event::TermChanged {
                primary: self.name_of(r.primary),
                term: r.term.0,
                uptodate: self.names_in(r.uptodate),
            });
        }
        self.emit(Event::Vote {
            granted,
            node: node.to_string(),
            reason,
            request: req.name().to_string(),
            request_term,
            term: after.map_or(0, |r| r.term.0),
        });
        Some(msg)
    }
}

fn grant_view(g: Grant) -> WitnessView {
    WitnessView { term: g.term.0, primary: g.primary.map(|p| p.0), uptodate: g.uptodate.0 }
}

impl ControlHandler for WitnessNode {
    type Reply = serde_json::Value;
    type Error = String;

    async fn handle(&self, req: Request) -> Result<serde_json::Value, String> {
        match req {
            Request::Status => serde_json::to_value(self.status()).map_err(|e| e.to_string()),
            other => Err(format!(
                "node {} is the witness: it has no volume; `{}` applies to the data nodes ({})",
                self.me.name,
                request_name(&other),
                self.data_node_names().join(", ")
            )),
        }
    }

    fn state_event(&self) -> EventLine {
        let s = self.status();
        EventLine::now(Event::WitnessState {
            connected: s.connected.into_iter().map(|c| c.node).collect(),
            primary: s.primary,
            term: s.term,
            uptodate: s.uptodate,
            voting: s.voting,
        })
    }

    fn subscribe(&self) -> broadcast::Receiver<EventLine> {
        self.events.subscribe()
    }
}

/// The `cmd` of a request, for messages.
fn request_name(req: &Request) -> String {
    serde_json::to_value(req)
        .ok()
        .and_then(|v| v.get("cmd").and_then(|c| c.as_str()).map(str::to_string))
        .unwrap_or_else(|| "this command".into())
}

/// A running witness.
#[derive(Debug)]
pub struct WitnessDaemon {
    node: Arc<WitnessNode>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    addr: std::net::SocketAddr,
}

impl WitnessDaemon {
    /// Starts witness `me`: control socket first (a second repd is refused
    /// before anything else), the state file, then the listener.
    pub async fn start(config: Config, me: WitnessNodeConfig) -> Result<WitnessDaemon, WitnessError> {
        let socket = ControlSocket::bind(&me.control, &me.name)?;
        let listen = me.replication_listen.clone().unwrap_or_else(|| me.replication.clone());
        let node = Arc::new(WitnessNode::open(config, me.clone())?);
        let listener = TcpListener::bind(&listen).await.map_err(|source| WitnessError::Listen {
            node: me.name.clone(),
            addr: listen.clone(),
            source,
        })?;
        let addr = listener.local_addr().map_err(|source| WitnessError::Listen {
            node: me.name.clone(),
            addr: listen.clone(),
            source,
        })?;
        let (stop, stop_rx) = watch::channel(false);
        let control = tokio::spawn(socket.serve(Arc::clone(&node), stop_rx.clone()));
        let accept = tokio::spawn(accept_loop(Arc::clone(&node), listener, stop_rx));
        let s = node.status();
        tracing::info!(
            node = %me.name, %addr, term = s.term, voting = s.voting,
            control = %me.control.display(), "witness running"
        );
        Ok(WitnessDaemon { node, stop, tasks: vec![control, accept], addr })
    }

    pub fn node(&self) -> &Arc<WitnessNode> {
        &self.node
    }

    /// The bound witness-link address.
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    pub async fn stop(self) {
        self.node.emit(Event::Stopping);
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

async fn accept_loop(node: Arc<WitnessNode>, listener: TcpListener, stop: watch::Receiver<bool>) {
    let mut stopping = stop.clone();
    loop {
        tokio::select! {
            _ = control::stopped(&mut stopping) => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let node = Arc::clone(&node);
                    let stop = stop.clone();
                    tokio::spawn(async move {
                        serve_data_node(node, stream, peer.to_string(), stop).await;
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "witness: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

async fn serve_data_node(
    node: Arc<WitnessNode>,
    mut stream: TcpStream,
    address: String,
    mut stop: watch::Receiver<bool>,
) {
    let local = LocalHello {
        resource: node.config.name.clone(),
        node: node.me.name.clone(),
        // Replaced by the dialling data node's name (Expect::any_of).
        peer: node.data_node_names().join(" or "),
        size: node.config.size,
        block_size: node.config.block_size,
        gen_ids: GenIds::default(),
        role: Role::Secondary,
        disk: DiskState::Diskless,
        secret: node.config.secret.clone().unwrap_or_default().into_bytes(),
    };
    let expect = Expect::witness_accepting(node.data_node_names());
    let peer = match handshake::handshake_with(&mut stream, &local, &expect, HANDSHAKE_TIMEOUT).await {
        Ok(p) => p,
        Err(e) => {
            if e.before_auth() {
                tracing::debug!(%address, error = %e, "witness: handshake failed");
            } else {
                tracing::warn!(%address, error = %e, "witness: handshake failed");
            }
            return;
        }
    };
    let name = peer.node;
    let Some(index) = node.config.node_index(&name) else { return };
    let Ok((mut reader, mut writer)) = link::split_tcp(stream) else { return };
    let id = {
        let mut inner = node.lock();
        inner.next_conn += 1;
        let id = inner.next_conn;
        let replaced = inner
            .conns
            .insert(name.clone(), Conn { id, address: address.clone(), since: Instant::now(), pings: 0, renewals: 0 });
        if replaced.is_some() {
            tracing::info!(node = %name, "witness: a new connection replaces the old one");
        }
        id
    };
    tracing::info!(node = %name, %address, "witness: data node connected");
    node.emit(Event::NodeConnected { address, node: name.clone() });
    let detect = node.config.failover.timings.detect;
    let reason = tokio::select! {
        r = serve_messages(&node, &name, index, &mut reader, &mut writer, detect) => r,
        _ = control::stopped(&mut stop) => {
            let _ = writer.send(&Message::Goodbye { reason: GoodbyeReason::Shutdown, message: "witness stopping".into() }).await;
            "witness stopping".to_string()
        }
    };
    let _ = writer.shutdown().await;
    let still_ours = {
        let mut inner = node.lock();
        if inner.conns.get(&name).is_some_and(|c| c.id == id) {
            inner.conns.remove(&name);
            true
        } else {
            false
        }
    };
    tracing::info!(node = %name, %reason, "witness: data node disconnected");
    if still_ours {
        node.emit(Event::NodeDisconnected { node: name, reason });
    }
}

/// Answers one data node until its link ends; returns why it ended.
async fn serve_messages(
    node: &WitnessNode,
    name: &str,
    index: NodeIndex,
    reader: &mut FrameReader<link::LinkRead>,
    writer: &mut FrameWriter<link::LinkWrite>,
    detect: Duration,
) -> String {
    loop {
        let msg = match tokio::time::timeout(detect, reader.read()).await {
            Err(_) => return format!("silent for {}", crate::units::format_duration(detect)),
            Ok(Err(e)) => return format!("link error: {e}"),
            Ok(Ok(None)) => return "closed by the node".into(),
            Ok(Ok(Some(m))) => m,
        };
        let mine = |n: u8| n == index.0;
        let (req, code, request_term) = match msg {
            Message::TermPing { seq, sent_ns, term } => {
                let pong = node.on_ping(name, index, seq, sent_ns, term);
                if let Err(e) = writer.send(&Message::TermPong(pong)).await {
                    return format!("link error: {e}");
                }
                continue;
            }
            Message::Goodbye { message, .. } => return format!("goodbye: {message}"),
            Message::Claim { term, node: n, forced, .. } if mine(n) => {
                (VoteRequest::Claim { term: Term(term), node: index, forced }, msg_type::CLAIM, term)
            }
            Message::Solo { term, node: n } if mine(n) => {
                (VoteRequest::Solo { term: Term(term), node: index }, msg_type::SOLO, term)
            }
            Message::PeerUptodate { term, node: n, peer } if mine(n) => (
                VoteRequest::PeerUptodate { term: Term(term), node: index, peer: NodeIndex(peer) },
                msg_type::PEER_UPTODATE,
                term,
            ),
            Message::Release { term, node: n } if mine(n) => {
                (VoteRequest::Release { term: Term(term), node: index }, msg_type::RELEASE, term)
            }
            m @ (Message::Claim { .. }
            | Message::Solo { .. }
            | Message::PeerUptodate { .. }
            | Message::Release { .. }) => {
                let why = format!(
                    "{} names another node index than {name}'s ({}): the [[node]] order differs between the hosts' config files",
                    m.name(),
                    index.0
                );
                let _ =
                    writer.send(&Message::Goodbye { reason: GoodbyeReason::ProtocolError, message: why.clone() }).await;
                return why;
            }
            other => {
                let why = format!("unexpected {} on the witness link", other.name());
                let _ =
                    writer.send(&Message::Goodbye { reason: GoodbyeReason::ProtocolError, message: why.clone() }).await;
                return why;
            }
        };
        let Some(answer) = node.decide(name, req, request_term, code) else {
            return "the witness state file failed: no answer".into();
        };
        if let Err(e) = writer.send(&answer).await {
            return format!("link error: {e}");
        }
    }
}

/// Runs the witness until SIGTERM/SIGINT (what `repd --node gamma` does).
pub async fn run(config: Config, me: WitnessNodeConfig) -> Result<(), WitnessError> {
    let mut signals =
        super::daemon::StopSignals::install().map_err(|e| WitnessError::Refused(format!("signal handlers: {e}")))?;
    let daemon = WitnessDaemon::start(config, me).await?;
    // Type=notify units (contrib/systemd): READY=1, STATUS=, the watchdog.
    let notifier = super::systemd::Notifier::start_for(Arc::clone(daemon.node()), WitnessNode::status_line);
    let signal = signals.recv().await;
    tracing::info!(signal, "witness stopping");
    notifier.stopping_with("stopping: closing the witness links");
    daemon.stop().await;
    Ok(())
}

/// The witness's record as the state file holds it, for tools and tests:
/// `None` on amnesia.
pub fn read_record(me: &WitnessNodeConfig) -> Result<Option<WitnessRecord>, WitnessError> {
    Ok(match StateFile::open(&StateFile::path_in(&me.dir))? {
        Loaded::Record { slot, .. } => Some(slot.record),
        Loaded::Amnesia { .. } => None,
    })
}

/// Clock reading for callers outside (the client's Ping `sent_ns`).
pub fn boot_now() -> MonoTime {
    BootClock.now()
}
