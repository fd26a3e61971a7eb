//! The property test of the issue: random histories (write, promote, demote,
//! link loss, crash, connect, resync progress, WAL recycling,
//! `--discard-my-data`) on two simulated nodes, with a model of what the
//! engine and the volume do around [`decide`]:
//!
//! - generations as in the design (new generation at the first write no peer
//!   receives and at promote without a peer; sync start and end), plus one
//!   rule the design lacked, see [`World::gen_on_release`];
//! - the dirty bitmap as the volume keeps it: bits of writes made while no
//!   peer receives the feed, the unacknowledged records marked at link loss
//!   or by crash recovery, `bitmap_base_lsn` = the peer's written LSN when
//!   tracking starts, the target's bits merged into the source's at a
//!   bitmap resync, every bit set for a full one, bits cleared as blocks
//!   reach the target;
//! - protocol C acknowledgements: a write is acknowledged once the peer has
//!   written it, or when it was made without a peer, or when the link is lost
//!   and the primary goes on alone (`on_peer_loss = "continue"`); never when
//!   the primary crashed first.
//!
//! Checked at every connect and every resync end:
//! - both nodes reach mirrored verdicts with the same rule;
//! - a node holding an acknowledged write the other lacks is never made the
//!   target (except by `--discard-my-data` or an opt-in policy that discards
//!   changes; `discard-zero-changes` is checked too, it must never lose one);
//! - `Log` only when the target's log is a prefix of the source's and the
//!   source's WAL holds every record after it; `Bitmap` only when the union
//!   of both bitmaps covers every block that differs; `NoSync` only when the
//!   data are the same;
//! - a finished resync leaves both copies identical.
//!
//! Crashes are process kills (what the page cache holds survives); power
//! loss is the documented known limit (docs/resync.md).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;

use super::*;

const BLOCKS: usize = 6;
const BLOCK_BYTES: u64 = 4096;

/// One WAL record: a write of block `block` with content `id` (ids are unique).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rec {
    lsn: Lsn,
    id: u32,
    block: usize,
}

#[derive(Debug, Clone)]
struct Node {
    role: Role,
    disk: DiskState,
    gen_ids: GenIds,
    gen_created_ms: u64,
    /// The node's lineage of records, in LSN order (a resync target takes the
    /// source's: it rebases its log at the source's LSN).
    log: Vec<Rec>,
    lsn: Lsn,
    /// Oldest record still in the WAL.
    log_first: Lsn,
    data: [u32; BLOCKS],
    /// Writes whose effect this copy holds (or, for a resync target, is
    /// committed to receive).
    applied: BTreeSet<u32>,
    bits: BTreeSet<usize>,
    base: Lsn,
    /// A new generation was started since the peer last received the feed.
    diverged: bool,
    discard: bool,
}

impl Node {
    fn fresh(current: u64) -> Node {
        Node {
            role: Role::Secondary,
            disk: DiskState::Inconsistent,
            gen_ids: GenIds { current, bitmap: 0, history: [0; 4] },
            gen_created_ms: 0,
            log: Vec::new(),
            lsn: 0,
            log_first: 1,
            data: [0; BLOCKS],
            applied: BTreeSet::new(),
            bits: BTreeSet::new(),
            base: 0,
            diverged: false,
            discard: false,
        }
    }

    fn view(&self) -> SideView {
        SideView {
            role: self.role,
            disk: self.disk,
            gen_ids: self.gen_ids,
            gen_created_ms: self.gen_created_ms,
            local_lsn: self.lsn,
            dirty_bytes: self.bits.len() as u64 * BLOCK_BYTES,
            bitmap_base_lsn: self.base,
            log_first_lsn: self.log_first,
            discard_my_data: self.discard,
        }
    }

    fn apply(&mut self, r: Rec) {
        self.log.push(r);
        self.lsn = r.lsn;
        self.data[r.block] = r.id;
        self.applied.insert(r.id);
    }

    fn push_history(&mut self, g: u64) {
        self.gen_ids.history = [g, self.gen_ids.history[0], self.gen_ids.history[1], self.gen_ids.history[2]];
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Resync {
    kind: ResyncKind,
    source: usize,
    /// Log catch-up: the last replayed LSN.
    log_end: Lsn,
    /// The source's current generation as its SyncInfo announced it: the
    /// target takes this one (as the engine takes it from the SyncInfo).
    source_gen: u64,
}

#[derive(Debug, Clone)]
struct Link {
    /// The node sending records (the primary, or the resync source).
    from: Option<usize>,
    /// Records sent and not yet written by the peer; `true` = a live write
    /// (in the volume's unacknowledged ring), `false` = a log catch-up
    /// replay from the WAL.
    pending: VecDeque<(Rec, bool)>,
    resync: Option<Resync>,
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Write {
        node: usize,
        block: usize,
    },
    Promote {
        node: usize,
        force: bool,
    },
    Demote {
        node: usize,
    },
    /// Resync progress and replication: `n` blocks copied or records written.
    Step {
        n: usize,
    },
    /// The link breaks: the peer wrote `received` more pending records, the
    /// sender saw acks for `acked` of them.
    LinkLoss {
        received: usize,
        acked: usize,
    },
    Crash {
        node: usize,
        received: usize,
        acked: usize,
    },
    Connect,
    /// A connect during which, after both SyncInfos were exchanged and
    /// before the session acts on the decision, `node` is promoted (issue
    /// 14, defect 1) ...
    PromoteDuringConnect {
        node: usize,
    },
    /// ... or writes `block` without the peer, starting a generation the
    /// SyncInfo did not announce (defect 3; in the field, the session a
    /// duplicate connection replaced released its unacknowledged writes).
    WriteDuringConnect {
        node: usize,
        block: usize,
    },
    DiscardMyData {
        node: usize,
    },
    /// WAL recycling keeps only the last `keep` records.
    Recycle {
        node: usize,
        keep: u64,
    },
    /// A block of the receiving node's data file is corrupted behind repd's
    /// back, and an online verify finds it and marks it.
    CorruptAndVerify {
        block: usize,
    },
    /// `repctl invalidate`: this node's data is thrown away and taken from
    /// the peer (every bit set, disk inconsistent; refused on a primary).
    Invalidate {
        node: usize,
    },
}

#[derive(Debug, Default)]
struct Stats {
    verdicts: BTreeMap<String, usize>,
    finished: BTreeMap<ResyncKind, usize>,
}

struct World {
    n: [Node; 2],
    link: Option<Link>,
    /// Writes acknowledged to a client.
    acked: BTreeSet<u32>,
    next_id: u32,
    next_gen: u64,
    clock: u64,
    policy: SplitBrainPolicy,
    /// A primary that loses its link while records it sent are not yet
    /// acknowledged starts a new generation *before* releasing their replies
    /// (as it does at its first write without a peer). The design only had
    /// the latter: then the released writes are acknowledged, exist on this
    /// node only, and yet its generation is still the peer's. If the peer is
    /// promoted and writes, the next connect sees "the peer wrote since my
    /// generation, I did not" and makes this node the target: acknowledged
    /// writes silently lost (see `released_writes_need_a_new_generation`).
    gen_on_release: bool,
    /// Online verify marks a difference on both nodes (not only on the one
    /// that sends): then a later log catch-up is never chosen while it is
    /// unsent (the target has marks), and a source clearing its whole bitmap
    /// after a catch-up cannot drop it. See `verify_marks_both_nodes`.
    verify_marks_both: bool,
    /// Promote without the peer starts a new generation at once (issue 14,
    /// defect 2). Without it (the code before the fix: the generation came
    /// with the first write), a failover whose old primary comes back
    /// before the new one writes is refused as `primary-target`.
    promote_rotates: bool,
    /// The session checks, under the claim lock, that its SyncInfo is still
    /// true before it acts on the decision, and renegotiates if not (issue
    /// 14, defects 1 and 3). Without it, a promote or a write landing
    /// between the SyncInfo exchange and the session start is decided on a
    /// stale view.
    claims_checked: bool,
    /// Nodes promoted (plainly, without the peer) since the last connect:
    /// that connect must not refuse the failover.
    failover: [bool; 2],
    trace: Vec<String>,
    stats: Stats,
}

impl World {
    fn new(policy: SplitBrainPolicy, gen_on_release: bool) -> World {
        World {
            n: [Node::fresh(0x1000), Node::fresh(0x2000)],
            link: None,
            acked: BTreeSet::new(),
            next_id: 1,
            next_gen: 0x3000,
            clock: 1,
            policy,
            gen_on_release,
            verify_marks_both: true,
            promote_rotates: true,
            claims_checked: true,
            failover: [false; 2],
            trace: Vec::new(),
            stats: Stats::default(),
        }
    }

    fn fail(&self, what: String) -> Result<(), String> {
        Err(format!("{what}\nhistory:\n  {}\nnodes: {:#?}", self.trace.join("\n  "), self.n))
    }

    fn new_generation(&mut self, i: usize) {
        let node = &mut self.n[i];
        if node.gen_ids.bitmap == 0 {
            node.gen_ids.bitmap = node.gen_ids.current;
        } else {
            let old = node.gen_ids.current;
            node.push_history(old);
        }
        node.gen_ids.current = self.next_gen;
        node.gen_created_ms = self.clock;
        node.diverged = true;
        self.next_gen += 0x1000;
    }

    fn apply(&mut self, op: Op) -> Result<(), String> {
        self.clock += 1;
        self.trace.push(format!("{op:?}"));
        match op {
            Op::Write { node, block } => self.write(node, block),
            Op::Promote { node, force } => self.promote(node, force),
            Op::Demote { node } => self.demote(node),
            Op::Step { n } => self.step(n),
            Op::LinkLoss { received, acked } => {
                self.break_link(None, received, acked);
                Ok(())
            }
            Op::Crash { node, received, acked } => {
                self.break_link(Some(node), received, acked);
                let n = &mut self.n[node];
                n.role = Role::Secondary;
                n.diverged = false;
                n.discard = false;
                Ok(())
            }
            Op::Connect => self.connect(),
            Op::PromoteDuringConnect { node } => self.connect_racing(node, |w| w.promote(node, false)),
            Op::WriteDuringConnect { node, block } => self.connect_racing(node, |w| w.write(node, block)),
            Op::DiscardMyData { node } => {
                self.n[node].discard = true;
                Ok(())
            }
            Op::Recycle { node, keep } => {
                self.recycle(node, keep);
                Ok(())
            }
            Op::CorruptAndVerify { block } => {
                self.corrupt_and_verify(block);
                Ok(())
            }
            Op::Invalidate { node } => self.invalidate(node),
        }
    }

    fn invalidate(&mut self, i: usize) -> Result<(), String> {
        // Refused on a primary, and unless the peer is connected with an
        // uptodate disk (else this copy may be the only usable one).
        if self.n[i].role == Role::Primary || self.link.is_none() || self.n[1 - i].disk != DiskState::UpToDate {
            return Ok(());
        }
        self.break_link(None, usize::MAX, usize::MAX);
        let node = &mut self.n[i];
        node.bits = (0..BLOCKS).collect();
        node.disk = DiskState::Inconsistent;
        // The operator discarded this copy: it holds nothing any more.
        node.applied.clear();
        self.connect()
    }

    fn corrupt_and_verify(&mut self, block: usize) {
        // Verify runs on an established connection, no resync running.
        let Some(link) = &self.link else { return };
        if link.resync.is_some() || !link.pending.is_empty() {
            return;
        }
        let victim = link.from.map_or(1, |f| 1 - f);
        let garbage = self.next_id;
        self.next_id += 1;
        self.n[victim].data[block] = garbage;
        self.n[1 - victim].bits.insert(block);
        if self.verify_marks_both {
            self.n[victim].bits.insert(block);
        }
    }

    fn write(&mut self, i: usize, block: usize) -> Result<(), String> {
        if self.n[i].role != Role::Primary {
            return Ok(());
        }
        let streaming = self.link.as_ref().is_some_and(|l| l.from == Some(i));
        if self.link.is_some() && !streaming {
            return self.fail(format!("node {i} is primary on a link where it does not send"));
        }
        if !streaming && !self.n[i].diverged {
            self.new_generation(i);
        }
        let id = self.next_id;
        self.next_id += 1;
        let rec = Rec { lsn: self.n[i].lsn + 1, id, block };
        self.n[i].apply(rec);
        match &mut self.link {
            Some(link) if streaming => link.pending.push_back((rec, true)),
            _ => {
                // Alone: tracked in the bitmap, acknowledged at once.
                self.n[i].bits.insert(block);
                self.acked.insert(id);
            }
        }
        Ok(())
    }

    fn promote(&mut self, i: usize, force: bool) -> Result<(), String> {
        let other = 1 - i;
        if self.n[i].role == Role::Primary || (self.link.is_some() && self.n[other].role == Role::Primary) {
            return Ok(());
        }
        match self.n[i].disk {
            DiskState::UpToDate | DiskState::Consistent => {}
            _ if force => {}
            _ => return Ok(()),
        }
        self.n[i].disk = DiskState::UpToDate;
        self.n[i].role = Role::Primary;
        if self.link.is_some() {
            // A role change renegotiates the connection.
            self.break_link(None, usize::MAX, usize::MAX);
            self.connect()
        } else {
            if self.promote_rotates && !self.n[i].diverged {
                self.new_generation(i);
            }
            self.failover[i] = !force;
            Ok(())
        }
    }

    fn demote(&mut self, i: usize) -> Result<(), String> {
        if self.n[i].role != Role::Primary {
            return Ok(());
        }
        self.n[i].role = Role::Secondary;
        if self.link.is_some() {
            // Demote waits until the peer has every completed write, then
            // the connection is renegotiated.
            self.break_link(None, usize::MAX, usize::MAX);
            return self.connect();
        }
        Ok(())
    }

    /// The peer writes the first pending record.
    fn deliver_one(&mut self, acked_by_sender: bool) -> Option<Rec> {
        let link = self.link.as_mut()?;
        let from = link.from?;
        let (rec, live) = link.pending.pop_front()?;
        self.n[1 - from].apply(rec);
        if live && acked_by_sender {
            self.acked.insert(rec.id);
        }
        Some(rec)
    }

    fn step(&mut self, n: usize) -> Result<(), String> {
        let Some(link) = &self.link else { return Ok(()) };
        match link.resync {
            Some(Resync { kind: ResyncKind::Bitmap | ResyncKind::Full, source, .. }) => {
                for _ in 0..n {
                    let Some(&b) = self.n[source].bits.first() else { break };
                    // Newest content: the log writer orders resync reads with
                    // application writes.
                    let content = self.n[source].data[b];
                    self.n[1 - source].data[b] = content;
                    self.n[source].bits.remove(&b);
                }
                // Live writes go on during the resync.
                for _ in 0..n {
                    self.deliver_one(true);
                }
                if self.n[source].bits.is_empty() {
                    return self.finish_resync();
                }
            }
            Some(Resync { kind: ResyncKind::Log, source, log_end, .. }) => {
                for _ in 0..n {
                    self.deliver_one(true);
                }
                if self.n[1 - source].lsn >= log_end {
                    return self.finish_resync();
                }
            }
            None => {
                for _ in 0..n {
                    self.deliver_one(true);
                }
            }
        }
        Ok(())
    }

    fn finish_resync(&mut self) -> Result<(), String> {
        let Some(link) = &mut self.link else { return Ok(()) };
        let Some(r) = link.resync.take() else { return Ok(()) };
        let (s, t) = (r.source, 1 - r.source);
        // The target's copy plus what is still in flight is the source's.
        let mut copy = self.n[t].data;
        for (rec, _) in &link.pending {
            copy[rec.block] = rec.id;
        }
        if copy != self.n[s].data {
            return self.fail(format!(
                "{} resync from node {s} ended with different data: target {copy:?}, source {:?}",
                r.kind, self.n[s].data
            ));
        }
        *self.stats.finished.entry(r.kind).or_default() += 1;
        let source_gen = r.source_gen;
        if source_gen != self.n[s].gen_ids.current {
            return self.fail(format!(
                "{} resync from node {s} ends with the target in generation {source_gen:X}, the source in {:X}: \
                 \"in sync\" but the next connect disagrees",
                r.kind, self.n[s].gen_ids.current
            ));
        }
        let target = &mut self.n[t];
        if target.gen_ids.current != source_gen {
            let old = target.gen_ids.current;
            target.push_history(old);
            target.gen_ids.current = source_gen;
        }
        target.gen_ids.bitmap = 0;
        target.diverged = false;
        target.disk = DiskState::UpToDate;
        target.bits.clear();
        let source = &mut self.n[s];
        // Log catch-up: the bits of the replayed records are on the target now.
        source.bits.clear();
        if source.gen_ids.bitmap != 0 {
            let old = source.gen_ids.bitmap;
            source.push_history(old);
            source.gen_ids.bitmap = 0;
        }
        Ok(())
    }

    /// The link goes down (`crashed`: that node was killed). The peer wrote
    /// `received` more pending records, and the sender saw acks for `acked`
    /// of those.
    fn break_link(&mut self, crashed: Option<usize>, received: usize, acked: usize) {
        let Some(link) = &self.link else { return };
        let from = link.from;
        let received = received.min(link.pending.len());
        let acked = acked.min(received);
        for _ in 0..acked {
            self.deliver_one(true);
        }
        // What the sender knows the peer has written.
        let peer_written = from.map(|f| self.n[1 - f].lsn);
        for _ in acked..received {
            self.deliver_one(false);
        }
        let Some(link) = self.link.take() else { return };
        let Some(f) = from else { return };
        let j = peer_written.unwrap_or(0);
        let unacked: Vec<(Rec, bool)> = link.pending.into_iter().collect();
        // The receiver: tracking from what it has. Killed, its recovery may
        // re-mark the last records it received (its persisted peer-written
        // LSN lags): harmless extra marks of records the sender has.
        let r = 1 - f;
        self.n[r].base = self.n[r].lsn;
        if crashed == Some(r) {
            let lag = acked as u64 + 1;
            let receiver = &mut self.n[r];
            let from = receiver.lsn.saturating_sub(lag);
            let marks: Vec<usize> = receiver.log.iter().filter(|rec| rec.lsn > from).map(|rec| rec.block).collect();
            receiver.bits.extend(marks);
        }
        let sender = &mut self.n[f];
        if crashed == Some(f) {
            // Recovery marks every WAL record after the persisted
            // peer-written LSN (at best `j`).
            for rec in sender.log.iter().filter(|rec| rec.lsn > j) {
                sender.bits.insert(rec.block);
            }
        } else {
            // mark_unacked: the ring's records past the peer's written LSN.
            for (rec, live) in &unacked {
                if *live {
                    sender.bits.insert(rec.block);
                }
            }
        }
        sender.base = j;
        let released: Vec<u32> = unacked.iter().filter(|(_, live)| *live).map(|(rec, _)| rec.id).collect();
        if crashed != Some(f) && self.n[f].role == Role::Primary && !released.is_empty() {
            // on_peer_loss = "continue": the waiting replies are released.
            if self.gen_on_release && !self.n[f].diverged {
                self.new_generation(f);
            }
            self.acked.extend(released);
        }
    }

    fn recycle(&mut self, i: usize, keep: u64) {
        let node = &self.n[i];
        let first = node.lsn.saturating_sub(keep).saturating_add(1).max(node.log_first);
        // Records the peer has not written yet are marked before they go.
        let streaming = self.link.as_ref().is_some_and(|l| l.from == Some(i));
        if streaming {
            let written = self.n[1 - i].lsn;
            let marks: Vec<usize> =
                self.n[i].log.iter().filter(|r| r.lsn < first && r.lsn > written).map(|r| r.block).collect();
            self.n[i].bits.extend(marks);
        }
        self.n[i].log_first = first;
    }

    fn connect(&mut self) -> Result<(), String> {
        if self.link.is_some() {
            return Ok(());
        }
        let (a, b) = (self.n[0].view(), self.n[1].view());
        self.decide_and_start(a, b)
    }

    /// A connect with `race` landing on `node` after the SyncInfo exchange:
    /// with `claims_checked` the session sees its view is stale and
    /// renegotiates (a fresh connect), else it acts on the stale views.
    fn connect_racing(
        &mut self,
        node: usize,
        race: impl FnOnce(&mut World) -> Result<(), String>,
    ) -> Result<(), String> {
        if self.link.is_some() {
            return Ok(());
        }
        let _ = node;
        let (a, b) = (self.n[0].view(), self.n[1].view());
        race(self)?;
        if self.link.is_some() {
            return Ok(());
        }
        let fresh = (self.n[0].view(), self.n[1].view());
        if self.claims_checked && fresh != (a, b) {
            self.trace.push("  -> stale SyncInfo: renegotiated".into());
            return self.connect();
        }
        self.decide_and_start(a, b)
    }

    fn decide_and_start(&mut self, a: SideView, b: SideView) -> Result<(), String> {
        let v = decide(&a, &b, &self.policy);
        let m = decide(&b, &a, &self.policy);
        if m.decision != v.decision.mirrored() || m.rule != v.rule {
            return self.fail(format!("not mirrored: node 0 {v:?}, node 1 {m:?}"));
        }
        self.trace.push(format!("  -> node 0: {} [{}] {}", v.decision, v.rule, v.explanation));
        *self.stats.verdicts.entry(format!("{} {}", v.rule, v.decision)).or_default() += 1;
        // The flag is one-shot.
        self.n[0].discard = false;
        self.n[1].discard = false;
        let failover = std::mem::take(&mut self.failover);
        let same_generation = v.explanation.contains(&format!("[{}:", rule::SAME_GENERATION));
        if v.rule == rule::PRIMARY_TARGET
            && same_generation
            && (0..2).any(|i| failover[i] && self.n[i].role == Role::Primary)
        {
            return self
                .fail(format!("a plain failover is refused when the old primary comes back: {}", v.explanation));
        }
        let primary = (0..2).find(|&i| self.n[i].role == Role::Primary);
        match v.decision {
            Decision::NoSync => {
                if self.n[0].data != self.n[1].data {
                    return self.fail(format!("no sync between different data ({})", v.explanation));
                }
                if v.rule == rule::IN_SYNC {
                    for node in &mut self.n {
                        node.disk = DiskState::UpToDate;
                    }
                }
                self.attach(primary, None);
                Ok(())
            }
            Decision::Source(kind) => self.start_resync(0, kind, v.rule, a.gen_ids.current),
            Decision::Target(kind) => self.start_resync(1, kind, v.rule, b.gen_ids.current),
            Decision::SplitBrain | Decision::Unrelated | Decision::Refuse(_) => Ok(()),
        }
    }

    fn attach(&mut self, from: Option<usize>, resync: Option<Resync>) {
        if let Some(f) = from {
            self.n[f].diverged = false;
        }
        self.link = Some(Link { from, pending: VecDeque::new(), resync });
    }

    fn start_resync(&mut self, s: usize, kind: ResyncKind, rule: &'static str, source_gen: u64) -> Result<(), String> {
        let t = 1 - s;
        let exempt = matches!(
            rule,
            rule::SB_DISCARD_MY_DATA
                | rule::SB_DISCARD_YOUNGER_PRIMARY
                | rule::SB_DISCARD_LEAST_CHANGES
                | rule::SB_DISCARD_SECONDARY
        );
        if !exempt {
            let lost: Vec<u32> = self.n[t]
                .applied
                .iter()
                .filter(|id| self.acked.contains(id) && !self.n[s].applied.contains(id))
                .copied()
                .collect();
            if !lost.is_empty() {
                return self.fail(format!(
                    "node {t} holds acknowledged writes {lost:?} that node {s} lacks, yet is made the {kind} target \
                     by rule {rule}"
                ));
            }
        }
        if self.n[t].role == Role::Primary {
            return self.fail(format!("primary node {t} made the target by rule {rule}"));
        }
        match kind {
            ResyncKind::Log => {
                if !self.n[s].log.starts_with(&self.n[t].log) {
                    return self.fail(format!("log catch-up of node {t}, whose log is not a prefix of node {s}'s"));
                }
                if self.n[s].log_first > self.n[t].lsn + 1 {
                    return self.fail(format!("log catch-up of node {t} from a WAL that no longer reaches back"));
                }
                let replay: VecDeque<(Rec, bool)> =
                    self.n[s].log.iter().filter(|r| r.lsn > self.n[t].lsn).map(|r| (*r, false)).collect();
                self.n[t].disk = DiskState::Consistent;
                let log_end = self.n[s].lsn;
                self.attach(Some(s), Some(Resync { kind, source: s, log_end, source_gen }));
                if let Some(link) = &mut self.link {
                    link.pending = replay;
                }
            }
            ResyncKind::Bitmap | ResyncKind::Full => {
                if kind == ResyncKind::Bitmap {
                    let union: BTreeSet<usize> = self.n[s].bits.union(&self.n[t].bits).copied().collect();
                    let uncovered: Vec<usize> = (0..BLOCKS)
                        .filter(|&b| self.n[s].data[b] != self.n[t].data[b] && !union.contains(&b))
                        .collect();
                    if !uncovered.is_empty() {
                        return self.fail(format!(
                            "bitmap resync by rule {rule}: blocks {uncovered:?} differ and neither bitmap has them"
                        ));
                    }
                    let theirs = self.n[t].bits.clone();
                    self.n[s].bits.extend(theirs);
                } else {
                    self.n[s].bits = (0..BLOCKS).collect();
                }
                let source = self.n[s].clone();
                let target = &mut self.n[t];
                target.disk = DiskState::Inconsistent;
                if target.gen_ids.current != source_gen {
                    let old = target.gen_ids.current;
                    target.push_history(old);
                    target.gen_ids.current = source_gen;
                }
                target.gen_ids.bitmap = 0;
                // Its generation is the source's now: a later write without
                // the peer must start a new one (the engine's "diverged"
                // flag is reset with it).
                target.diverged = false;
                target.log = source.log.clone();
                target.lsn = source.lsn;
                target.log_first = source.lsn + 1;
                target.applied = source.applied.clone();
                self.attach(Some(s), Some(Resync { kind, source: s, log_end: 0, source_gen }));
            }
        }
        Ok(())
    }
}

// --- Histories ------------------------------------------------------------------

fn op() -> impl Strategy<Value = Op> {
    let node = 0..2usize;
    prop_oneof![
        8 => (0..2usize, 0..BLOCKS).prop_map(|(node, block)| Op::Write { node, block }),
        2 => (node.clone(), proptest::bool::weighted(0.3)).prop_map(|(node, force)| Op::Promote { node, force }),
        2 => node.clone().prop_map(|node| Op::Demote { node }),
        5 => (1..4usize).prop_map(|n| Op::Step { n }),
        2 => (0..3usize, 0..3usize).prop_map(|(received, acked)| Op::LinkLoss { received, acked }),
        1 => (node.clone(), 0..3usize, 0..3usize).prop_map(|(node, received, acked)| Op::Crash { node, received, acked }),
        4 => Just(Op::Connect),
        1 => node.clone().prop_map(|node| Op::PromoteDuringConnect { node }),
        1 => (node.clone(), 0..BLOCKS).prop_map(|(node, block)| Op::WriteDuringConnect { node, block }),
        1 => node.clone().prop_map(|node| Op::DiscardMyData { node }),
        1 => (node, 0..4u64).prop_map(|(node, keep)| Op::Recycle { node, keep }),
        1 => (0..BLOCKS).prop_map(|block| Op::CorruptAndVerify { block }),
        1 => (0..2usize).prop_map(|node| Op::Invalidate { node }),
    ]
}

fn policy() -> impl Strategy<Value = SplitBrainPolicy> {
    prop_oneof![
        6 => Just(SplitBrainPolicy::default()),
        1 => (0..4usize, 0..3usize).prop_map(|(a, b)| SplitBrainPolicy {
            after_sb_0pri: AfterSb0Pri::parse(AfterSb0Pri::NAMES[a]).unwrap_or_default(),
            after_sb_1pri: AfterSb1Pri::parse(AfterSb1Pri::NAMES[b]).unwrap_or_default(),
        }),
    ]
}

fn history() -> impl Strategy<Value = (SplitBrainPolicy, Vec<Op>)> {
    (policy(), proptest::collection::vec(op(), 1..60))
}

fn run(policy: SplitBrainPolicy, ops: &[Op], gen_on_release: bool) -> (World, Result<(), String>) {
    run_with(World::new(policy, gen_on_release), ops)
}

fn run_with(mut w: World, ops: &[Op]) -> (World, Result<(), String>) {
    // Start the way an operator does: one node's data is the truth, declared
    // before or after the two blank nodes first meet.
    let promote = Op::Promote { node: 0, force: true };
    let setup = if ops.len().is_multiple_of(2) { [promote, Op::Connect] } else { [Op::Connect, promote] };
    for &op in setup.iter().chain(ops) {
        if let Err(e) = w.apply(op) {
            return (w, Err(e));
        }
    }
    (w, Ok(()))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3_000))]

    #[test]
    fn random_histories_never_lose_acknowledged_writes((policy, ops) in history()) {
        let (_, result) = run(policy, &ops, true);
        if let Err(e) = result {
            return Err(TestCaseError::fail(e));
        }
    }
}

/// The random histories reach every kind of verdict and finish every kind of
/// resync (otherwise the property above would prove little).
#[test]
fn random_histories_cover_the_table() {
    let mut runner = TestRunner::deterministic();
    let strategy = history();
    let mut verdicts: BTreeMap<String, usize> = BTreeMap::new();
    let mut finished: BTreeMap<ResyncKind, usize> = BTreeMap::new();
    for _ in 0..1_500 {
        let Ok(tree) = strategy.new_tree(&mut runner) else { continue };
        let (policy, ops) = tree.current();
        let (w, result) = run(policy, &ops, true);
        assert!(result.is_ok(), "{result:?}");
        for (k, n) in w.stats.verdicts {
            *verdicts.entry(k).or_default() += n;
        }
        for (k, n) in w.stats.finished {
            *finished.entry(k).or_default() += n;
        }
    }
    for kind in [ResyncKind::Log, ResyncKind::Bitmap, ResyncKind::Full] {
        assert!(finished.get(&kind).copied().unwrap_or(0) > 0, "no {kind} resync finished: {finished:?}");
    }
    let seen = |rule: &str| verdicts.keys().any(|k| k.starts_with(&format!("{rule} ")));
    for rule in [
        rule::FRESH,
        rule::RESUME,
        rule::INCONSISTENT,
        rule::IN_SYNC,
        rule::SAME_GENERATION,
        rule::NEWER_GENERATION,
        rule::SPLIT_BRAIN,
        rule::SB_DISCARD_MY_DATA,
        rule::TWO_PRIMARIES,
        rule::PRIMARY_TARGET,
    ] {
        assert!(seen(rule), "rule {rule} never decided: {verdicts:#?}");
    }
}

/// The counter-example that made [`World::gen_on_release`] part of the
/// model: with the design's generation rule alone, writes acknowledged after
/// the link was lost are silently overwritten.
#[test]
fn released_writes_need_a_new_generation() {
    let ops = [
        Op::Step { n: BLOCKS }, // the initial full sync ends
        Op::Write { node: 0, block: 1 },
        Op::Step { n: 1 },                      // in sync, streaming
        Op::Write { node: 0, block: 2 },        // in flight ...
        Op::LinkLoss { received: 0, acked: 0 }, // ... released: acknowledged, on node 0 only
        Op::Demote { node: 0 },
        Op::Promote { node: 1, force: false }, // failover
        Op::Write { node: 1, block: 3 },
        Op::Demote { node: 1 },
        Op::Connect,
    ];
    let (_, without) = run(SplitBrainPolicy::default(), &ops, false);
    let e = without.expect_err("the design's rule alone loses the released write");
    assert!(e.contains("holds acknowledged writes"), "{e}");
    let (w, with) = run(SplitBrainPolicy::default(), &ops, true);
    assert!(with.is_ok(), "{with:?}");
    assert!(w.trace.iter().any(|t| t.contains("[split-brain]")), "{:#?}", w.trace);
}

/// Why verify marks both nodes: marked only on the sending node, the
/// difference it found looks like an ordinary record's mark; after the next
/// link loss and a few writes the nodes choose a log catch-up (the target has
/// no marks), which replays records and clears the source's bitmap: the
/// corrupted block is never resent.
#[test]
fn verify_marks_both_nodes() {
    let ops = [
        Op::Step { n: BLOCKS }, // the initial full sync ends
        Op::CorruptAndVerify { block: 4 },
        Op::LinkLoss { received: 0, acked: 0 },
        Op::Write { node: 0, block: 1 },
        Op::Connect,
        Op::Step { n: 3 },
    ];
    let mut one_side = World::new(SplitBrainPolicy::default(), true);
    one_side.verify_marks_both = false;
    let (_, result) = run_with(one_side, &ops);
    let e = result.expect_err("marked on the source only, the difference is never resent");
    assert!(e.contains("log resync from node 0 ended with different data"), "{e}");
    let (w, result) = run(SplitBrainPolicy::default(), &ops, true);
    assert!(result.is_ok(), "{result:?}");
    assert!(w.trace.iter().any(|t| t.contains("(bitmap resync)")), "{:#?}", w.trace);
    assert_eq!(w.n[0].data, w.n[1].data);
}

/// Issue 14, defect 2: the primary dies with records the secondary never
/// received, the secondary is promoted and the old primary comes back before
/// the new one writes. With the generation started at the first write (the
/// code before the fix), the old primary is "further in the same
/// generation" and the failover is refused; promote starting the generation
/// makes the old primary the target, and its unacknowledged records are
/// rolled back.
#[test]
fn a_failover_before_the_first_write_needs_the_generation_at_promote() {
    let ops = [
        Op::Step { n: BLOCKS }, // the initial full sync ends
        Op::Write { node: 0, block: 1 },
        Op::Step { n: 1 },
        Op::Write { node: 0, block: 2 },
        Op::Write { node: 0, block: 3 },
        Op::Crash { node: 0, received: 0, acked: 0 }, // node 0 is ahead
        Op::Promote { node: 1, force: false },
        Op::Connect,
    ];
    let mut old = World::new(SplitBrainPolicy::default(), true);
    old.promote_rotates = false;
    let (_, result) = run_with(old, &ops);
    let e = result.expect_err("without the generation at promote the failover is refused");
    assert!(e.contains("plain failover is refused"), "{e}");
    let (w, result) = run(SplitBrainPolicy::default(), &ops, true);
    assert!(result.is_ok(), "{result:?}");
    assert!(w.trace.iter().any(|t| t.contains("[newer-generation]")), "{:#?}", w.trace);
    let (w, result) = run_with(w, &[Op::Step { n: BLOCKS }, Op::Step { n: BLOCKS }]);
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(w.n[0].data, w.n[1].data);
}

/// Issue 14, defect 1: a promote landing between the decision (this node is
/// the target) and the session start. Acting on the stale decision makes a
/// primary the sync target; the claim check renegotiates instead.
#[test]
fn a_promote_racing_the_decision_is_renegotiated() {
    let ops = [
        Op::Step { n: BLOCKS },
        Op::Write { node: 0, block: 1 },
        Op::Step { n: 1 },
        Op::Write { node: 0, block: 2 },
        Op::Crash { node: 0, received: 0, acked: 0 },
        Op::Promote { node: 1, force: false },
        Op::Write { node: 1, block: 4 },
        Op::Demote { node: 1 },
        // Node 0 comes back and is the target of node 1; a promote on node 0
        // lands in the middle.
        Op::PromoteDuringConnect { node: 0 },
    ];
    let mut old = World::new(SplitBrainPolicy::default(), true);
    old.claims_checked = false;
    let (_, result) = run_with(old, &ops);
    let e = result.expect_err("acting on the stale decision");
    assert!(e.contains("primary node 0 made the target"), "{e}");
    let (w, result) = run(SplitBrainPolicy::default(), &ops, true);
    assert!(result.is_ok(), "{result:?}");
    assert!(w.trace.iter().any(|t| t.contains("stale SyncInfo: renegotiated")), "{:#?}", w.trace);
}

/// Issue 14, defect 3: a write without the peer (a new generation) between
/// the SyncInfo exchange and the session start. Acting on the stale views
/// claims "no sync" while the data differ; the claim check renegotiates and
/// the write reaches the peer.
#[test]
fn a_generation_started_during_the_session_start_is_renegotiated() {
    let ops = [
        Op::Step { n: BLOCKS },
        Op::Write { node: 0, block: 1 },
        Op::Step { n: 1 },
        Op::LinkLoss { received: 0, acked: 0 },
        Op::WriteDuringConnect { node: 0, block: 5 },
        Op::Step { n: 2 },
    ];
    let mut old = World::new(SplitBrainPolicy::default(), true);
    old.claims_checked = false;
    let (_, result) = run_with(old, &ops);
    let e = result.expect_err("acting on the stale views");
    assert!(e.contains("no sync between different data"), "{e}");
    let (w, result) = run(SplitBrainPolicy::default(), &ops, true);
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(w.n[0].data, w.n[1].data);
    assert_eq!(w.n[0].gen_ids.current, w.n[1].gen_ids.current, "one generation after the resync");
}

/// Issue 14: both nodes SIGKILLed (the secondary first, the primary with
/// records in flight), both restarted, and the old primary promoted: the
/// old secondary becomes its target, and nothing acknowledged is lost.
#[test]
fn a_double_crash_and_restart_resyncs_from_the_promoted_node() {
    let ops = [
        Op::Step { n: BLOCKS },
        Op::Write { node: 0, block: 1 },
        Op::Step { n: 1 },
        Op::Write { node: 0, block: 2 },
        Op::Write { node: 0, block: 3 },
        Op::Crash { node: 1, received: 1, acked: 0 },
        Op::Crash { node: 0, received: 0, acked: 0 },
        Op::PromoteDuringConnect { node: 0 },
        Op::Step { n: BLOCKS },
        Op::Step { n: BLOCKS },
    ];
    let (w, result) = run(SplitBrainPolicy::default(), &ops, true);
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(w.n[0].role, Role::Primary);
    assert_eq!(w.n[0].data, w.n[1].data, "{:#?}", w.trace);
}
