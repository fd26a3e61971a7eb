//! The model: a randomized simulation of two data nodes and a witness running
//! the real [`Controller`] and [`Witness`] (not a re-implementation), in
//! real time steps of 1 ms, with
//!
//! - a clock per node whose rate differs from real time by up to ρ (and an
//!   arbitrary offset);
//! - message delays (FIFO per direction, up to `max_delay`), and partitions
//!   of any subset of the six directed links, one-way too;
//! - kills (EOF to the peer, as a SIGKILL on a live host) and crashes
//!   (silence, as a power loss), restarts from what was persisted;
//! - pauses (SIGSTOP: the node's clock runs, it takes no step);
//! - client writes on whichever node serves, acknowledged under protocol C
//!   (the peer wrote it, or a solo grant is held) and only when the
//!   reply-path check passes;
//! - the witness's record on a store that persists before the answer.
//!
//! Checked at every step:
//! - **S1**: a node that promotes holds every write acknowledged so far;
//! - **S2**: no two nodes serve at one real time: every reply (a read served
//!   each millisecond by a node whose check passes, and every write
//!   acknowledgement) of term T precedes, in real time, the first reply of
//!   any later term, and one term has one serving node.
//!
//! Two deliberately broken wirings show that the model catches what it
//! claims to: anchoring the lease at the Pong's *receive* time (S2 fails
//! with delayed Pongs), and a witness whose store acknowledges before the
//! record is durable (a witness crash then grants one term twice).

use std::collections::{BTreeSet, VecDeque};
use std::time::Duration;

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};

use super::controller::{Action, Controller, EndCause, From, Input};
use super::lease::{FailoverTimings, MonoTime, Term};
use super::witness::{Decision, Grant, NodeIndex, NodeSet, Reply, Request, Witness, WitnessRecord, WitnessStore};

const TIMINGS: FailoverTimings = FailoverTimings::FAST;
const WITNESS: usize = 2;
/// A request unanswered this long (local time) is reported unreachable.
const REQUEST_TIMEOUT: Duration = Duration::from_millis(300);
const MS: u64 = 1_000_000;

/// How the wiring is (mis)built.
#[derive(Debug, Clone, Copy, Default)]
struct Wiring {
    /// BUG: renew the lease from the Pong's receive time.
    anchor_at_receive: bool,
    /// BUG: the witness's store says "durable" before it is; the record
    /// reaches the disk only `lag` ms later (lost if the witness dies first).
    witness_lag_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// Kill the node's process: the peer sees EOF (if the link is up).
    Kill {
        node: usize,
        down_ms: u64,
    },
    /// Power loss: silence.
    Crash {
        node: usize,
        down_ms: u64,
    },
    Pause {
        node: usize,
        ms: u64,
    },
    /// Cut the directed link `from → to`.
    Cut {
        from: usize,
        to: usize,
        ms: u64,
    },
    /// Cut every link of a node, both ways.
    Isolate {
        node: usize,
        ms: u64,
    },
}

#[derive(Debug, Clone)]
struct Plan {
    /// Clock rate deviation of each node, in ppm within ±ρ.
    drift_ppm: [i64; 3],
    offset_ms: [u64; 3],
    max_delay_ms: u64,
    seed: u64,
    faults: Vec<(u64, Fault)>,
    horizon_ms: u64,
}

#[derive(Debug, Clone, Copy)]
enum Msg {
    Ping {
        term: Term,
        sent: MonoTime,
    },
    /// From the witness, the Pong also carries its record (`Some(view)`).
    Pong {
        term: Term,
        echo: MonoTime,
        primary_ok: bool,
        view: Option<Option<Grant>>,
    },
    Write {
        term: Term,
        id: u32,
    },
    Ack {
        id: u32,
    },
    /// R5: "your term is lower than mine".
    Refuse {
        term: Term,
    },
    Eof,
    HandOver {
        term: Term,
    },
    Req(Request),
    Reply(Request, Reply),
}

/// splitmix64: a deterministic random source for delays and client load.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
}

/// What a data node keeps across a restart.
#[derive(Debug, Clone, Default)]
struct Disk {
    term: Term,
    /// Write ids, in log order (a resync target takes the source's).
    data: Vec<u32>,
    uptodate: bool,
}

struct DataNode {
    ctrl: Option<Controller>,
    disk: Disk,
    /// The data session, as this node sees it: `Some(last frame time)`.
    session: Option<MonoTime>,
    /// Which connection the session is (frames of an older one are not
    /// delivered into it, as with a new TCP connection).
    epoch: u64,
    last_ping: MonoTime,
    /// Writes waiting for the peer's ack (ids).
    pending: Vec<u32>,
    /// Writes acked by the peer or local-alone, waiting for the reply check.
    ready: Vec<u32>,
    requests: Vec<(Request, MonoTime)>,
    resync_done_at: Option<u64>,
    down_until: Option<u64>,
}

/// The witness's disk: what `persist` made durable (and, in the broken
/// wiring, what is still in flight to it).
#[derive(Default)]
struct WitnessDisk {
    durable: Option<WitnessRecord>,
    lag_ms: Option<u64>,
    in_flight: Vec<(u64, WitnessRecord)>,
    now_ms: u64,
}

impl WitnessStore for WitnessDisk {
    type Error = ();
    fn persist(&mut self, r: &WitnessRecord) -> Result<(), ()> {
        match self.lag_ms {
            None => self.durable = Some(*r),
            Some(lag) => self.in_flight.push((self.now_ms + lag, *r)),
        }
        Ok(())
    }
}

struct World {
    wiring: Wiring,
    plan: Plan,
    rng: Rng,
    real_ms: u64,
    nodes: [DataNode; 2],
    witness: Option<Witness>,
    witness_disk: WitnessDisk,
    witness_down_until: Option<u64>,
    paused_until: [u64; 3],
    /// Directed link cut until (real ms).
    cut_until: [[u64; 3]; 3],
    /// In-flight messages per directed link: (deliver at real ms, msg).
    wires: [[VecDeque<(u64, u64, Msg)>; 3]; 3],
    epochs: u64,
    next_id: u32,
    acked: BTreeSet<u32>,
    /// Per term: (serving node, first reply, last reply), real ms.
    served: Vec<(Term, usize, u64, u64)>,
    trace: Vec<String>,
    promotions: usize,
    stats_solo: usize,
    /// The first property violation found.
    violation: Option<String>,
}

fn local(plan: &Plan, node: usize, real_ms: u64) -> MonoTime {
    let real_ns = i128::from(real_ms) * i128::from(MS);
    let skew = real_ns * i128::from(plan.drift_ppm[node]) / 1_000_000;
    MonoTime((i128::from(plan.offset_ms[node]) * i128::from(MS) + real_ns + skew) as u64)
}

impl World {
    fn new(plan: Plan, wiring: Wiring) -> World {
        let rec = WitnessRecord { term: Term(1), primary: Some(NodeIndex(0)), uptodate: NodeSet(0b11) };
        let mk = |_| DataNode {
            ctrl: None,
            disk: Disk { term: Term(1), data: Vec::new(), uptodate: true },
            session: None,
            epoch: 0,
            last_ping: MonoTime(0),
            pending: Vec::new(),
            ready: Vec::new(),
            requests: Vec::new(),
            resync_done_at: None,
            down_until: None,
        };
        let mut w = World {
            wiring,
            rng: Rng(plan.seed),
            plan,
            real_ms: 0,
            nodes: [mk(0), mk(1)],
            witness: None,
            witness_disk: WitnessDisk { durable: Some(rec), lag_ms: wiring.witness_lag_ms, ..WitnessDisk::default() },
            witness_down_until: None,
            paused_until: [0; 3],
            cut_until: [[0; 3]; 3],
            wires: Default::default(),
            epochs: 0,
            next_id: 1,
            acked: BTreeSet::new(),
            served: Vec::new(),
            trace: Vec::new(),
            promotions: 0,
            stats_solo: 0,
            violation: None,
        };
        w.start_witness();
        w.start_node(0);
        w.start_node(1);
        w
    }

    fn now(&self, node: usize) -> MonoTime {
        local(&self.plan, node, self.real_ms)
    }

    fn log(&mut self, s: String) {
        self.trace.push(format!("{:>5} {s}", self.real_ms));
    }

    fn start_witness(&mut self) {
        let now = self.now(WITNESS);
        self.witness = Some(Witness::start(self.witness_disk.durable, TIMINGS.wait(), now));
        self.log(format!("witness starts with {:?}", self.witness_disk.durable));
    }

    fn start_node(&mut self, i: usize) {
        let now = self.now(i);
        let n = &mut self.nodes[i];
        let mut c = Controller::new(NodeIndex(i as u8), NodeIndex(1 - i as u8), TIMINGS, n.disk.term, now);
        let up = n.disk.uptodate;
        n.ctrl = None;
        n.session = None;
        n.pending.clear();
        n.ready.clear();
        n.requests.clear();
        n.resync_done_at = None;
        n.last_ping = now;
        let out = c.step(Input::LocalDisk { uptodate: up }, now).expect("local disk");
        self.nodes[i].ctrl = Some(c);
        self.apply(i, out);
        self.log(format!("node {i} starts, term {}", self.nodes[i].disk.term));
    }

    fn alive(&self, i: usize) -> bool {
        let up = if i == WITNESS { self.witness.is_some() } else { self.nodes[i].ctrl.is_some() };
        up && self.paused_until[i] <= self.real_ms
    }

    fn link_up(&self, from: usize, to: usize) -> bool {
        self.cut_until[from][to] <= self.real_ms
    }

    fn send(&mut self, from: usize, to: usize, msg: Msg) {
        if !self.link_up(from, to) {
            return;
        }
        let delay = self.rng.below(self.plan.max_delay_ms + 1);
        let last = self.wires[from][to].back().map_or(0, |&(at, ..)| at);
        let at = (self.real_ms + delay).max(last);
        let epoch = if from == WITNESS { 0 } else { self.nodes[from].epoch };
        self.wires[from][to].push_back((at, epoch, msg));
    }

    fn input(&mut self, i: usize, input: Input) {
        let now = self.now(i);
        let Some(c) = self.nodes[i].ctrl.as_mut() else { return };
        match c.step(input, now) {
            Ok(out) => self.apply(i, out),
            // The wiring may race the state (a late input): refused inputs
            // change nothing, which is what the wiring relies on.
            Err(e) => self.log(format!("node {i}: {e}")),
        }
    }

    fn ctrl(&self, i: usize) -> &Controller {
        self.nodes[i].ctrl.as_ref().expect("alive")
    }

    fn apply(&mut self, i: usize, actions: Vec<Action>) {
        let peer = 1 - i;
        for a in actions {
            match a {
                Action::PersistTerm(t) => self.nodes[i].disk.term = t,
                Action::Pong { .. } => unreachable!("pongs are answered where the ping arrives"),
                Action::AskWitness(req) => {
                    let deadline = self.now(i).plus(REQUEST_TIMEOUT);
                    self.nodes[i].requests.push((req, deadline));
                    self.send(i, WITNESS, Msg::Req(req));
                }
                Action::SuspendIo(_) | Action::ResumeIo | Action::Emit(_) => {}
                Action::Promote { term } => {
                    self.promotions += 1;
                    self.log(format!("node {i} promoted, term {term}"));
                    let have: BTreeSet<u32> = self.nodes[i].disk.data.iter().copied().collect();
                    let lost: Vec<u32> = self.acked.difference(&have).copied().collect();
                    if !lost.is_empty() && self.violation.is_none() {
                        self.violation =
                            Some(format!("S1: node {i} promoted in term {term} without acknowledged writes {lost:?}"));
                    }
                    self.nodes[i].disk.uptodate = true;
                    if self.nodes[i].session.is_some() && self.nodes[peer].session.is_some() {
                        self.resync(i, peer);
                    }
                }
                Action::Demote { replaced } => {
                    self.log(format!("node {i} demoted (replaced: {replaced})"));
                    let n = &mut self.nodes[i];
                    n.pending.clear();
                    n.ready.clear();
                    if replaced {
                        n.disk.uptodate = false;
                        let now = self.now(i);
                        if let Some(c) = self.nodes[i].ctrl.as_mut() {
                            let out = c.step(Input::LocalDisk { uptodate: false }, now).expect("local disk");
                            assert!(out.is_empty());
                        }
                        if self.nodes[i].session.is_some() && self.nodes[peer].session.is_some() {
                            self.resync(peer, i);
                        }
                    }
                }
                Action::HandOverToPeer { term } => self.send(i, peer, Msg::HandOver { term }),
            }
        }
    }

    /// `target` takes `source`'s data at once (log catch-up at connect) and
    /// is told the resync is done a little later.
    fn resync(&mut self, source: usize, target: usize) {
        if self.ctrl(target).state().is_primary() {
            return;
        }
        self.nodes[target].disk.data = self.nodes[source].disk.data.clone();
        self.nodes[target].disk.uptodate = false;
        self.input(target, Input::LocalDisk { uptodate: false });
        let at = self.real_ms + 1 + self.rng.below(50);
        self.nodes[target].resync_done_at = Some(at);
        self.nodes[source].resync_done_at = Some(at);
    }

    fn end_session(&mut self, i: usize, cause: EndCause) {
        let Some(last) = self.nodes[i].session.take() else { return };
        self.log(format!("node {i}: session ends ({cause:?})"));
        self.nodes[i].resync_done_at = None;
        self.send(i, 1 - i, Msg::Eof);
        self.input(i, Input::PeerSessionEnded { cause, last_frame_at: last });
    }

    fn deliver(&mut self, from: usize, to: usize, msg: Msg) {
        let now = self.now(to);
        if to == WITNESS {
            let w = self.witness.as_mut().expect("alive");
            match msg {
                Msg::Ping { term, sent } => {
                    let p = w.on_ping(NodeIndex(from as u8), term, now);
                    let term = p.view.map_or(Term::ZERO, |v| v.term);
                    let pong = Msg::Pong { term, echo: sent, primary_ok: p.primary_ok, view: Some(p.view) };
                    self.send(WITNESS, from, pong);
                }
                Msg::Req(req) => {
                    self.witness_disk.now_ms = self.real_ms;
                    let reply = match w.handle(req, now) {
                        Decision::Answer(r) => r,
                        Decision::Persist(p) => p.persist(&mut self.witness_disk, now).expect("witness store"),
                    };
                    if reply.is_ok() && matches!(req, Request::Claim { .. } | Request::Solo { .. }) {
                        let rec = self.witness.as_ref().and_then(|w| w.record().copied());
                        self.log(format!("witness grants {req:?}: {rec:?}"));
                    }
                    self.send(WITNESS, from, Msg::Reply(req, reply));
                }
                _ => {}
            }
            return;
        }
        let peer = 1 - to;
        if from != WITNESS {
            if matches!(msg, Msg::Eof) {
                if self.nodes[to].session.is_some() {
                    self.end_session(to, EndCause::Eof);
                }
                return;
            }
            if matches!(msg, Msg::HandOver { .. }) {
                if let Msg::HandOver { term } = msg {
                    self.input(to, Input::HandOver { term });
                }
                return;
            }
            // Data-link frames count only inside a session.
            let Some(last) = self.nodes[to].session.as_mut() else { return };
            *last = now;
        }
        let term = self.ctrl(to).term();
        match msg {
            Msg::Ping { term: t, sent } => {
                let now = self.now(to);
                let out =
                    self.nodes[to].ctrl.as_mut().expect("alive").step(Input::Ping { term: t }, now).expect("ping");
                let mut rest = Vec::new();
                for a in out {
                    if let Action::Pong { term, primary_ok } = a {
                        self.send(to, peer, Msg::Pong { term, echo: sent, primary_ok, view: None });
                    } else {
                        rest.push(a);
                    }
                }
                self.apply(to, rest);
            }
            Msg::Pong { term: t, echo, primary_ok, view } => {
                let src = if from == WITNESS { From::Witness } else { From::Peer };
                let echo_sent = if self.wiring.anchor_at_receive { now } else { echo };
                self.input(to, Input::Pong { from: src, echo_sent, term: t, primary_ok });
                if let Some(v) = view {
                    self.input(to, Input::WitnessView(v));
                }
            }
            Msg::Write { term: t, id } => {
                if t < term {
                    self.send(to, peer, Msg::Refuse { term });
                    return;
                }
                if t > term {
                    self.input(to, Input::HigherTermSeen { term: t });
                }
                let c = self.ctrl(to);
                if !c.state().is_primary() {
                    self.nodes[to].disk.data.push(id);
                    self.send(to, peer, Msg::Ack { id });
                }
            }
            Msg::Ack { id } => {
                let n = &mut self.nodes[to];
                if let Some(p) = n.pending.iter().position(|&x| x == id) {
                    n.pending.remove(p);
                    n.ready.push(id);
                }
            }
            Msg::Refuse { term: t } => {
                if t > term {
                    self.input(to, Input::HigherTermSeen { term: t });
                }
            }
            Msg::Reply(req, reply) => {
                let n = &mut self.nodes[to];
                let Some(p) = n.requests.iter().position(|(r, _)| *r == req) else { return };
                n.requests.remove(p);
                self.input(to, Input::WitnessReply { request: req, reply });
            }
            Msg::Eof | Msg::HandOver { .. } | Msg::Req(_) => {}
        }
    }
}

impl World {
    /// One real millisecond.
    fn step(&mut self) -> Result<(), String> {
        let r = self.real_ms;
        // Faults due now.
        let due: Vec<Fault> = self.plan.faults.iter().filter(|(at, _)| *at == r).map(|&(_, f)| f).collect();
        for f in due {
            self.fault(f);
        }
        // Restarts.
        for i in 0..2 {
            if self.nodes[i].down_until.is_some_and(|u| u <= r) {
                self.nodes[i].down_until = None;
                self.start_node(i);
            }
        }
        if self.witness_down_until.is_some_and(|u| u <= r) {
            self.witness_down_until = None;
            self.start_witness();
        }
        // The broken store's writes reach the disk.
        let disk = &mut self.witness_disk;
        while disk.in_flight.first().is_some_and(|&(at, _)| at <= r) {
            disk.durable = Some(disk.in_flight.remove(0).1);
        }
        // Deliveries.
        for from in 0..3 {
            for to in 0..3 {
                while let Some(&(at, epoch, msg)) = self.wires[from][to].front() {
                    if at > r || (self.alive_process(to) && self.paused_until[to] > r) {
                        break;
                    }
                    self.wires[from][to].pop_front();
                    let data_link = from != WITNESS && to != WITNESS;
                    if self.alive(to) && self.link_up(from, to) && (!data_link || epoch == self.nodes[to].epoch) {
                        self.deliver(from, to, msg);
                    }
                }
            }
        }
        // Sessions form when both nodes run and both directions are up.
        if (0..2).all(|i| self.alive(i) && self.nodes[i].session.is_none()) && self.link_up(0, 1) && self.link_up(1, 0)
        {
            self.connect();
        }
        for i in 0..2 {
            if self.alive(i) {
                self.node_step(i)?;
            }
        }
        self.real_ms += 1;
        self.violation.take().map_or(Ok(()), Err)
    }

    fn alive_process(&self, i: usize) -> bool {
        if i == WITNESS { self.witness.is_some() } else { self.nodes[i].ctrl.is_some() }
    }

    fn fault(&mut self, f: Fault) {
        self.log(format!("fault {f:?}"));
        let r = self.real_ms;
        match f {
            Fault::Kill { node, down_ms } | Fault::Crash { node, down_ms } => {
                if !self.alive_process(node) {
                    return;
                }
                if node == WITNESS {
                    self.witness = None;
                    self.witness_disk.in_flight.clear();
                    self.witness_down_until = Some(r + down_ms);
                    return;
                }
                if matches!(f, Fault::Kill { .. }) && self.nodes[node].session.is_some() {
                    self.send(node, 1 - node, Msg::Eof);
                }
                self.nodes[node].ctrl = None;
                self.nodes[node].session = None;
                self.nodes[node].down_until = Some(r + down_ms);
                self.paused_until[node] = 0;
            }
            Fault::Pause { node, ms } => self.paused_until[node] = self.paused_until[node].max(r + ms),
            Fault::Cut { from, to, ms } => self.cut_until[from][to] = self.cut_until[from][to].max(r + ms),
            Fault::Isolate { node, ms } => {
                for other in 0..3 {
                    if other != node {
                        self.cut_until[node][other] = self.cut_until[node][other].max(r + ms);
                        self.cut_until[other][node] = self.cut_until[other][node].max(r + ms);
                    }
                }
            }
        }
    }

    fn connect(&mut self) {
        let terms = [self.ctrl(0).term(), self.ctrl(1).term()];
        self.log(format!("session up (terms {} {})", terms[0], terms[1]));
        // R5 at the handshake: the lower term learns the higher one.
        for i in 0..2 {
            if terms[i] < terms[1 - i] {
                self.input(i, Input::HigherTermSeen { term: terms[1 - i] });
            }
        }
        self.epochs += 1;
        for i in 0..2 {
            self.nodes[i].session = Some(self.now(i));
            self.nodes[i].epoch = self.epochs;
        }
        let primary = [self.ctrl(0).state().is_primary(), self.ctrl(1).state().is_primary()];
        if primary[0] && primary[1] && self.violation.is_none() {
            self.violation = Some(format!("S2: two primaries of term {} connect", terms[0]));
        }
        for i in 0..2 {
            let term = self.ctrl(1 - i).term();
            self.input(i, Input::PeerConnected { term, primary: primary[1 - i] });
        }
        if let Some(source) = primary.iter().position(|&p| p) {
            self.resync(source, 1 - source);
        }
    }

    fn node_step(&mut self, i: usize) -> Result<(), String> {
        let now = self.now(i);
        let peer = 1 - i;
        // Request timeouts.
        let expired: Vec<Request> = self.nodes[i].requests.iter().filter(|(_, d)| now >= *d).map(|(r, _)| *r).collect();
        self.nodes[i].requests.retain(|(_, d)| now < *d);
        for request in expired {
            self.input(i, Input::WitnessUnreachable { request });
        }
        // Silence.
        if let Some(last) = self.nodes[i].session
            && now.since(last) >= TIMINGS.detect
        {
            self.end_session(i, EndCause::Silence);
        }
        // Heartbeats.
        if now.since(self.nodes[i].last_ping) >= TIMINGS.heartbeat {
            self.nodes[i].last_ping = now;
            let term = self.ctrl(i).term();
            self.send(i, WITNESS, Msg::Ping { term, sent: now });
            if self.nodes[i].session.is_some() {
                self.send(i, peer, Msg::Ping { term, sent: now });
            }
        }
        // Resync end.
        if self.nodes[i].resync_done_at.is_some_and(|at| at <= self.real_ms) {
            self.nodes[i].resync_done_at = None;
            if !self.ctrl(i).state().is_primary() {
                if self.nodes[i].session.is_some() && self.nodes[peer].session.is_some() {
                    // The resync ends with identical copies.
                    self.nodes[i].disk.data = self.nodes[peer].disk.data.clone();
                }
                self.nodes[i].disk.uptodate = true;
                self.input(i, Input::ResyncDone);
                self.input(i, Input::LocalDisk { uptodate: true });
            } else {
                self.input(i, Input::ResyncDone);
            }
        }
        self.input(i, Input::Tick);
        let Some(c) = self.nodes[i].ctrl.as_ref() else { return Ok(()) };
        let term = c.term();
        let serving = c.may_serve(now);
        let alone = c.alone();
        // Client writes.
        if serving && self.rng.below(8) == 0 {
            let id = self.next_id;
            self.next_id += 1;
            self.nodes[i].disk.data.push(id);
            if alone {
                self.nodes[i].ready.push(id);
                if self.nodes[i].session.is_some() {
                    // Still replicated (the resync catches the peer up too).
                    self.send(i, peer, Msg::Write { term, id });
                }
            } else {
                self.nodes[i].pending.push(id);
                if self.nodes[i].session.is_some() {
                    self.send(i, peer, Msg::Write { term, id });
                }
            }
        }
        if !self.nodes[i].pending.is_empty() {
            if alone {
                let p = std::mem::take(&mut self.nodes[i].pending);
                self.nodes[i].ready.extend(p);
            } else if self.nodes[i].session.is_none() && self.ctrl(i).state().is_primary() {
                // Lazy solo: a write cannot get the peer's ack.
                let state = self.ctrl(i).state();
                if matches!(state, super::controller::State::Primary { .. }) {
                    self.stats_solo += 1;
                    self.input(i, Input::WriteNeedsSolo);
                }
            }
        }
        // Replies: the reply-path check.
        let Some(c) = self.nodes[i].ctrl.as_ref() else { return Ok(()) };
        if c.may_serve(now) {
            let term = c.term();
            let ready = std::mem::take(&mut self.nodes[i].ready);
            self.acked.extend(ready);
            self.serve(i, term)?;
        }
        Ok(())
    }

    /// S2 bookkeeping: node `i` replied at this real time in `term`.
    fn serve(&mut self, i: usize, term: Term) -> Result<(), String> {
        let r = self.real_ms;
        match self.served.iter_mut().find(|(t, ..)| *t == term) {
            Some((_, node, _, last)) => {
                if *node != i {
                    return Err(format!("S2: nodes {node} and {i} both serve in term {term}"));
                }
                *last = r;
            }
            None => self.served.push((term, i, r, r)),
        }
        for &(t1, n1, _, last1) in &self.served {
            for &(t2, n2, first2, _) in &self.served {
                if t1 < t2 && last1 >= first2 {
                    return Err(format!(
                        "S2: node {n1} served term {t1} until {last1} ms, node {n2} served term {t2} from {first2} ms"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Runs a plan; `Err` names the violated property, with the trace's tail.
fn run(plan: &Plan, wiring: Wiring) -> (World, Result<(), String>) {
    let mut w = World::new(plan.clone(), wiring);
    let mut result = Ok(());
    while w.real_ms < plan.horizon_ms {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| w.step()));
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                result = Err(e);
                break;
            }
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                result = Err(msg);
                break;
            }
        }
    }
    if let Err(e) = &mut result {
        let tail: Vec<&String> = w.trace.iter().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().map(String::as_str).collect();
        *e = format!("{e}\n--- trace tail ---\n{}", tail.join("\n"));
    }
    (w, result)
}

fn fault(horizon: u64) -> impl Strategy<Value = (u64, Fault)> {
    let kind = prop_oneof![
        (0usize..3, 50u64..1500).prop_map(|(node, down_ms)| Fault::Kill { node, down_ms }),
        (0usize..3, 50u64..1500).prop_map(|(node, down_ms)| Fault::Crash { node, down_ms }),
        (0usize..3, 20u64..900).prop_map(|(node, ms)| Fault::Pause { node, ms }),
        (0usize..3, 0usize..3, 20u64..1500)
            .prop_filter("a link joins two nodes", |(a, b, _)| a != b)
            .prop_map(|(from, to, ms)| Fault::Cut { from, to, ms }),
        (0usize..3, 20u64..1500).prop_map(|(node, ms)| Fault::Isolate { node, ms }),
    ];
    (300..horizon, kind)
}

fn plan(max_delay: u64, faults: usize) -> impl Strategy<Value = Plan> {
    plan_with(0..=max_delay, proptest::collection::vec(fault(HORIZON), 0..=faults))
}

const HORIZON: u64 = 3000;

fn plan_with(
    delay: std::ops::RangeInclusive<u64>,
    faults: impl Strategy<Value = Vec<(u64, Fault)>>,
) -> impl Strategy<Value = Plan> {
    let rho = i64::from(TIMINGS.max_clock_drift.as_ppm());
    (
        [-rho..=rho, -rho..=rho, -rho..=rho],
        [0u64..1_000_000, 0u64..1_000_000, 0u64..1_000_000],
        delay,
        any::<u64>(),
        faults,
    )
        .prop_map(move |(drift_ppm, offset_ms, max_delay_ms, seed, faults)| Plan {
            drift_ppm,
            offset_ms,
            max_delay_ms,
            seed,
            faults,
            horizon_ms: HORIZON,
        })
}

/// Random histories per run of the suite (≈0.3 s each in a debug build);
/// `PROPTEST_CASES=N` asks for more.
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(40)
}

/// The real controller and witness keep S1 and S2 under random kills,
/// crashes, pauses, partitions, delays and clock rates.
#[test]
fn no_acked_write_lost_and_no_two_servers() {
    let config = Config { cases: cases(), failure_persistence: None, ..Config::default() };
    let mut runner = TestRunner::new(config);
    let result = runner.run(&plan(40, 8), |p| match run(&p, Wiring::default()).1 {
        Ok(()) => Ok(()),
        Err(e) => Err(TestCaseError::fail(e)),
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// Searches for a plan that breaks `wiring`; returns the shrunk failure.
fn find_failure(wiring: Wiring, strategy: impl Strategy<Value = Plan>, cases: u32) -> String {
    let config = Config { cases, failure_persistence: None, max_shrink_iters: 300, ..Config::default() };
    let rng = proptest::test_runner::TestRng::deterministic_rng(config.rng_algorithm);
    let mut runner = TestRunner::new_with_rng(config, rng);
    match runner.run(&strategy, |p| match run(&p, wiring).1 {
        Ok(()) => Ok(()),
        Err(e) => Err(TestCaseError::fail(e)),
    }) {
        Ok(()) => panic!("no plan in {cases} broke {wiring:?}"),
        Err(TestError::Fail(reason, minimal)) => {
            format!("{reason}\nminimal plan: {minimal:#?}")
        }
        Err(e) => panic!("{e}"),
    }
}

/// The model is not vacuous: the real code fails over (promotions happen
/// beyond the first), solo grants are asked, writes are acknowledged.
#[test]
fn the_histories_fail_over_and_acknowledge() {
    let mut runner = TestRunner::deterministic();
    let strategy = plan(40, 8);
    let (mut promotions, mut acked, mut solos) = (0, 0, 0);
    for _ in 0..20 {
        let p = strategy.new_tree(&mut runner).unwrap().current();
        let (w, result) = run(&p, Wiring::default());
        assert!(result.is_ok(), "{result:?}");
        promotions += w.promotions.saturating_sub(1);
        acked += w.acked.len();
        solos += w.stats_solo;
    }
    assert!(promotions > 3, "only {promotions} failovers");
    assert!(acked > 500, "only {acked} acknowledged writes");
    assert!(solos > 0, "no solo asked");
}

/// Anchoring the lease at the Pong's receive time lets a delayed Pong
/// stretch the old primary's lease past the voters' wait: S2 fails.
#[test]
fn anchoring_at_receive_time_breaks_s2() {
    let wiring = Wiring { anchor_at_receive: true, ..Wiring::default() };
    // Long delays and a stopped primary make the stretched lease show.
    let faults = (400u64..1500, 300u64..900).prop_map(|(at, ms)| vec![(at, Fault::Pause { node: 0, ms })]);
    let e = find_failure(wiring, plan_with(60..=120, faults), 500);
    assert!(e.contains("S2"), "{e}");
    eprintln!("{e}");
}

/// A witness that answers before its record is durable grants one term
/// twice after a crash: an acknowledged write is lost, or two nodes serve.
#[test]
fn answering_before_persisting_breaks_s1_or_s2() {
    let wiring = Wiring { witness_lag_ms: Some(10_000), ..Wiring::default() };
    // The secondary isolated: the primary gets a solo grant (the peer
    // outdated), the witness crashes before that grant is durable; back
    // with the old record, it lets the secondary, which never saw the new
    // term (the data link still cut), claim it.
    let faults = (400u64..800, 300u64..600, 420u64..700, 20u64..200).prop_map(|(at, ms, after, down_ms)| {
        vec![
            (at, Fault::Isolate { node: 1, ms }),
            (at, Fault::Cut { from: 0, to: 1, ms: 2000 }),
            (at, Fault::Cut { from: 1, to: 0, ms: 2000 }),
            (at + after, Fault::Crash { node: WITNESS, down_ms }),
        ]
    });
    let e = find_failure(wiring, plan_with(0..=20, faults), 500);
    assert!(e.contains("S1") || e.contains("S2") || e.contains("two primaries"), "{e}");
    eprintln!("{e}");
}
