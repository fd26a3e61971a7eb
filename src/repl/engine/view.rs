//! What `status` and `events` show of the link: [`LinkView`] (connection,
//! replication state, the peer, resync progress and speed, the decision),
//! and the engine's methods that move it.

use std::time::{Duration, Instant};

use super::{Acks, Engine};
use crate::event::{Event, SyncRole};
use crate::model::{ConnState, DiskState, Lsn, ReplState, ResyncKind, Role};
use crate::repl::decide::{SideView, Verdict};
use crate::repl::proto::SyncInfo;

/// Resync progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resync {
    pub kind: ResyncKind,
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub started: Instant,
    /// Measured over the last second or so.
    pub speed_bytes_per_sec: u64,
    /// Where the speed was last sampled: (when, done_bytes).
    pub sample: (Instant, u64),
}

impl Resync {
    pub fn new(kind: ResyncKind, total_bytes: u64) -> Resync {
        let now = Instant::now();
        Resync { kind, done_bytes: 0, total_bytes, started: now, speed_bytes_per_sec: 0, sample: (now, 0) }
    }

    /// Seconds left at the measured speed.
    pub fn eta_seconds(&self) -> Option<u64> {
        let left = self.total_bytes.saturating_sub(self.done_bytes);
        if left == 0 {
            return Some(0);
        }
        (self.speed_bytes_per_sec > 0).then(|| left.div_ceil(self.speed_bytes_per_sec))
    }
}

/// The last completed resync (`status.last_sync`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LastSync {
    pub kind: ResyncKind,
    pub bytes: u64,
    pub seconds: f64,
}

/// The decision of the last connect (`status.decision`, `connect --dry-run`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DecisionView {
    /// `no-sync`, `source-log`, `target-bitmap`, `split-brain`, ...
    pub result: String,
    pub rule: String,
    pub explanation: String,
}

impl DecisionView {
    pub fn from_verdict(v: &Verdict) -> DecisionView {
        DecisionView {
            result: v.decision.as_str().to_string(),
            rule: v.rule.to_string(),
            explanation: v.explanation.clone(),
        }
    }
}

/// What `repctl connect --dry-run` reports (the answer to
/// `{"cmd":"connect","dry_run":true}`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ProbeReport {
    /// The peer's node name.
    pub peer: String,
    pub decision: DecisionView,
    /// This node's SyncInfo.
    pub local: SideReport,
    /// The peer's SyncInfo.
    pub peer_view: SideReport,
}

/// One side's SyncInfo as the probe report shows it (generation ids as 16
/// upper-case hex digits).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SideReport {
    pub role: Role,
    pub disk: DiskState,
    pub gen_current: String,
    pub gen_bitmap: String,
    pub gen_history: Vec<String>,
    pub local_lsn: Lsn,
    pub out_of_sync_bytes: u64,
    pub bitmap_base_lsn: Lsn,
    pub log_first_lsn: Lsn,
    pub granularity: u32,
    pub discard_my_data: bool,
}

impl From<&SyncInfo> for SideReport {
    fn from(i: &SyncInfo) -> SideReport {
        SideReport {
            role: i.role,
            disk: i.disk,
            gen_current: format!("{:016X}", i.gen_ids.current),
            gen_bitmap: format!("{:016X}", i.gen_ids.bitmap),
            gen_history: i.gen_ids.history.iter().map(|g| format!("{g:016X}")).collect(),
            local_lsn: i.local_lsn,
            out_of_sync_bytes: i.dirty_bytes,
            bitmap_base_lsn: i.bitmap_base_lsn,
            log_first_lsn: i.log_first_lsn,
            granularity: i.granularity,
            discard_my_data: i.discard_my_data(),
        }
    }
}

/// The decision inputs carried by a SyncInfo.
pub fn side_view(i: &SyncInfo) -> SideView {
    SideView {
        role: i.role,
        disk: i.disk,
        gen_ids: i.gen_ids,
        gen_created_ms: i.gen_created_ms,
        local_lsn: i.local_lsn,
        dirty_bytes: i.dirty_bytes,
        bitmap_base_lsn: i.bitmap_base_lsn,
        log_first_lsn: i.log_first_lsn,
        discard_my_data: i.discard_my_data(),
    }
}

/// What `status` shows about replication.
#[derive(Debug, Clone)]
pub struct LinkView {
    pub connection: ConnState,
    pub replication: Option<ReplState>,
    pub peer_role: Option<Role>,
    pub peer_disk: DiskState,
    pub resync: Option<Resync>,
    /// The last completed resync (kept across sessions).
    pub last_sync: Option<LastSync>,
    /// The decision of the last session start (kept across sessions).
    pub decision: Option<DecisionView>,
    /// The last connect found a split brain (cleared by the next decision
    /// that is not one).
    pub split_brain: bool,
    /// Out-of-sync bytes the peer announced at the session start (its
    /// bitmap), while connected.
    pub peer_out_of_sync: Option<u64>,
    pub acks: Acks,
    /// Writes are suspended (on_peer_loss = suspend, peer lost).
    pub suspended: bool,
    /// The last refusal or connection error, for humans.
    pub last_error: Option<String>,
    /// The TLS session of the last connection that became a session
    /// (`[tls] replication`): version, cipher, the peer's certificate.
    pub tls: Option<crate::tls::SessionInfo>,
}

impl Engine {
    /// A snapshot for `status`.
    pub fn view(&self) -> LinkView {
        let mut v = self.view_mut().clone();
        v.acks = self.gate.acks();
        v.suspended = self.gate.suspended();
        v
    }

    pub(crate) fn set_conn(&self, c: ConnState) {
        let changed = {
            let mut v = self.view_mut();
            let changed = v.connection != c;
            v.connection = c;
            if c != ConnState::Connected {
                v.replication = None;
                v.peer_role = None;
                v.peer_disk = DiskState::Unknown;
                v.resync = None;
                v.peer_out_of_sync = None;
            }
            changed
        };
        if changed {
            self.emit(Event::ConnectionChanged { connection: c, peer: self.cfg.peer.clone() });
        }
    }

    pub(crate) fn set_peer(&self, role: Role, disk: DiskState) {
        let changed = {
            let mut v = self.view_mut();
            let changed = v.peer_role != Some(role) || v.peer_disk != disk;
            v.peer_role = Some(role);
            v.peer_disk = disk;
            changed
        };
        if changed {
            self.emit(Event::PeerChanged { disk, peer: self.cfg.peer.clone(), role });
        }
    }

    pub(crate) fn set_replication(&self, r: ReplState) {
        let changed = {
            let mut v = self.view_mut();
            let changed = v.replication != Some(r) || v.connection != ConnState::Connected;
            v.replication = Some(r);
            v.connection = ConnState::Connected;
            changed
        };
        if changed {
            self.emit(Event::ReplicationChanged {
                connection: ConnState::Connected,
                peer: self.cfg.peer.clone(),
                replication: r,
            });
            if r == ReplState::Established && self.role() == Role::Primary {
                // Back in sync: suspended writes go on.
                self.gate.set_suspended(false);
            }
        }
    }

    /// A resync starts (`sync-started` event, `status.resync`).
    pub(crate) fn sync_started(&self, kind: ResyncKind, total_bytes: u64, role: SyncRole) {
        self.view_mut().resync = Some(Resync::new(kind, total_bytes));
        self.emit(Event::SyncStarted { kind, peer: self.cfg.peer.clone(), role, total_bytes });
    }

    /// Resync progress: `done_bytes` durable on the target. Samples the
    /// speed and emits `sync-progress` about once a second.
    pub(crate) fn sync_progress(&self, done_bytes: u64) {
        let event = {
            let mut v = self.view_mut();
            let Some(r) = v.resync.as_mut() else { return };
            r.done_bytes = done_bytes.min(r.total_bytes.max(done_bytes));
            let (at, was) = r.sample;
            let dt = at.elapsed();
            if dt < Duration::from_secs(1) {
                if r.speed_bytes_per_sec == 0 {
                    // No full sample yet: the average so far.
                    let secs = r.started.elapsed().as_secs_f64();
                    if secs > 0.0 {
                        r.speed_bytes_per_sec = (r.done_bytes as f64 / secs) as u64;
                    }
                }
                None
            } else {
                r.speed_bytes_per_sec = (r.done_bytes.saturating_sub(was) as f64 / dt.as_secs_f64()) as u64;
                r.sample = (Instant::now(), r.done_bytes);
                Some(*r)
            }
        };
        if let Some(r) = event {
            self.emit(Event::SyncProgress {
                done_bytes: r.done_bytes,
                eta_seconds: r.eta_seconds(),
                kind: r.kind,
                peer: self.cfg.peer.clone(),
                speed_bytes_per_sec: r.speed_bytes_per_sec,
                total_bytes: r.total_bytes,
            });
        }
    }

    /// Progress of a resync whose total is an estimate (log catch-up).
    pub(crate) fn sync_progress_total(&self, done_bytes: u64, total_bytes: u64) {
        if let Some(r) = self.view_mut().resync.as_mut() {
            r.total_bytes = total_bytes.max(done_bytes);
        }
        self.sync_progress(done_bytes);
    }

    /// A resync completed (`sync-finished` event, `status.last_sync`).
    pub(crate) fn sync_finished(&self, kind: ResyncKind, bytes: u64, role: SyncRole) {
        let seconds = {
            let mut v = self.view_mut();
            let seconds = v.resync.take().map_or(0.0, |r| r.started.elapsed().as_secs_f64());
            v.last_sync = Some(LastSync { kind, bytes, seconds });
            seconds
        };
        self.emit(Event::SyncFinished { bytes, kind, peer: self.cfg.peer.clone(), role, seconds });
    }
}
