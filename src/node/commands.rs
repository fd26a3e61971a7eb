//! The node's side of the control socket: each [`Request`] carried out and
//! answered with its typed reply ([`crate::control::reply`]), and the
//! rendering of the answers that are not control types (the dry-run
//! report).

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::broadcast;

use super::{DiskState, Node, NodeError, Role, Status};
use crate::control::{
    Connecting, ControlHandler, Disconnected, Invalidated, IoResumed, NewGeneration, Request, VerifyStarted,
};
use crate::control::{Demoted, InSync, Promoted};
use crate::event::{Event, EventLine};
use crate::repl::engine::ProbeReport;

/// The answer to one request (firecracker's `VmmData`): serialised without
/// a tag, as the `result` of `{"ok":true,…}`, since the client knows what it
/// asked.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Reply {
    Status(Box<Status>),
    Promoted(Promoted),
    Demoted(Demoted),
    Connecting(Connecting),
    Probe(Box<ProbeReport>),
    Disconnected(Disconnected),
    IoResumed(IoResumed),
    NewGeneration(NewGeneration),
    VerifyStarted(VerifyStarted),
    Invalidated(Invalidated),
    InSync(InSync),
}

impl Node {
    /// Carries out one request (never `events`, which the control server
    /// streams itself).
    pub async fn command(&self, req: Request) -> Result<Reply, NodeError> {
        Ok(match req {
            Request::Status => Reply::Status(Box::new(self.status())),
            Request::Promote { force } => Reply::Promoted(self.promote(force).await?),
            Request::Demote { force } => Reply::Demoted(self.demote(force).await?),
            Request::WaitSync { timeout_secs } => {
                let timeout = timeout_secs.map(Duration::try_from_secs_f64).transpose().map_err(|_| {
                    NodeError::Refused(format!(
                        "wait-sync: timeout_secs must be a non-negative number of seconds, got {}",
                        timeout_secs.unwrap_or_default()
                    ))
                })?;
                Reply::InSync(self.wait_sync(timeout).await?)
            }
            Request::Connect { discard_my_data, dry_run: true } => {
                let report = self
                    .repl_or("connect --dry-run")?
                    .probe(discard_my_data)
                    .await
                    .map_err(|e| NodeError::Refused(format!("connect --dry-run: {e}")))?;
                Reply::Probe(Box::new(report))
            }
            Request::Connect { discard_my_data, dry_run: false } => Reply::Connecting(self.connect(discard_my_data)?),
            Request::Disconnect => {
                self.repl_or("disconnect")?.disconnect();
                Reply::Disconnected(Disconnected { connection: super::ConnState::Standalone })
            }
            Request::ResumeIo => Reply::IoResumed(IoResumed { resumed: self.repl_or("resume-io")?.gate().resume_io() }),
            Request::NewCurrentUuid { clear_bitmap } => {
                Reply::NewGeneration(self.new_current_uuid(clear_bitmap).await?)
            }
            Request::Verify => {
                let v = self.repl_or("verify")?.request_verify().map_err(NodeError::Refused)?;
                Reply::VerifyStarted(VerifyStarted {
                    source: v.source,
                    total_bytes: v.total_bytes,
                    block: v.block,
                    runs_finished: v.runs_finished,
                })
            }
            Request::Invalidate => Reply::Invalidated(self.invalidate().await?),
            Request::Events => return Err(NodeError::Refused("events: handled by the control server".into())),
        })
    }

    async fn new_current_uuid(&self, clear_bitmap: bool) -> Result<NewGeneration, NodeError> {
        let repl = self.repl_or("new-current-uuid")?;
        if !clear_bitmap {
            return Err(NodeError::NotAvailable {
                cmd: "new-current-uuid",
                why: "only `new-current-uuid --clear-bitmap` (skip the initial sync of two blank volumes) is supported",
            });
        }
        let _t = self.transition.lock().await;
        let generation = repl
            .new_current_uuid_clear_bitmap(Duration::from_secs(10))
            .await
            .map_err(|why| NodeError::Refused(format!("new-current-uuid --clear-bitmap: {why}")))?;
        Ok(NewGeneration {
            disk: DiskState::UpToDate,
            peer_disk: DiskState::UpToDate,
            generation: format!("{generation:016X}"),
        })
    }

    /// `repctl invalidate` (src/repl/verify.rs): under the role lock, so
    /// that a promote cannot slip in between the check and the marking.
    async fn invalidate(&self) -> Result<Invalidated, NodeError> {
        let repl = self.repl_or("invalidate")?;
        let _t = self.transition.lock().await;
        if self.role() == Role::Primary {
            return Err(NodeError::Refused(
                "invalidate: this node is primary: its data is what the peer syncs from; demote it first \
                 (`repctl demote`), then invalidate"
                    .into(),
            ));
        }
        let done = repl.invalidate().map_err(NodeError::Refused)?;
        Ok(Invalidated {
            disk: DiskState::Inconsistent,
            out_of_sync_bytes: done.out_of_sync_bytes,
            message: done.message,
        })
    }

    fn connect(&self, discard_my_data: bool) -> Result<Connecting, NodeError> {
        let repl = self.repl_or("connect")?;
        if discard_my_data && self.state().role == Role::Primary {
            return Err(NodeError::Refused(
                "connect --discard-my-data: this node is primary; demote it first (a primary is never a sync target)"
                    .into(),
            ));
        }
        repl.connect(discard_my_data);
        Ok(Connecting { connection: repl.view().connection })
    }
}

impl ControlHandler for Node {
    type Reply = Reply;
    type Error = NodeError;

    async fn handle(&self, req: Request) -> Result<Reply, NodeError> {
        self.command(req).await
    }

    fn state_event(&self) -> EventLine {
        let s = self.status();
        EventLine::now(Event::State {
            connection: s.connection,
            disk: s.disk,
            failed: s.failed,
            nbd_clients: s.nbd.clients,
            role: s.role,
        })
    }

    fn subscribe(&self) -> broadcast::Receiver<EventLine> {
        self.events.subscribe()
    }
}

/// Renders the report of `connect --dry-run` (`repctl connect --dry-run`
/// prints it): the decision a connect would take, then both sides'
/// SyncInfo.
pub fn probe_human(node: &str, r: &ProbeReport) -> String {
    let mut s = String::new();
    let d = &r.decision;
    // Writes to a String cannot fail.
    let _ = writeln!(s, "{node}: a connect would do: {} (rule {})", d.result, d.rule);
    let _ = writeln!(s, "  {}", d.explanation);
    for (who, v) in [(node, &r.local), (r.peer.as_str(), &r.peer_view)] {
        let _ = writeln!(
            s,
            "  {who}: role:{} disk:{} lsn:{} out-of-sync:{} generation:{}",
            v.role, v.disk, v.local_lsn, v.out_of_sync_bytes, v.gen_current
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::Response;
    use crate::node::ConnState;
    use crate::repl::engine::{DecisionView, SideReport};

    /// The response line the daemon sends for `reply`.
    fn wire(reply: Reply) -> String {
        serde_json::to_string(&Response::answer(Ok::<_, NodeError>(reply))).unwrap()
    }

    /// Every answer goes out byte for byte as the `json!` objects that
    /// built them before they were typed (keys sorted, absent optional
    /// fields left out).
    #[test]
    fn replies_keep_their_wire_format() {
        let cases = [
            (
                Reply::Promoted(Promoted { role: Role::Primary, changed: false, nbd: None }),
                r#"{"changed":false,"role":"primary"}"#,
            ),
            (
                Reply::Promoted(Promoted {
                    role: Role::Primary,
                    changed: true,
                    nbd: Some("nbd://127.0.0.1:10809/r0".into()),
                }),
                r#"{"changed":true,"nbd":"nbd://127.0.0.1:10809/r0","role":"primary"}"#,
            ),
            (
                Reply::Demoted(Demoted { role: Role::Secondary, changed: false, disconnected_clients: None }),
                r#"{"changed":false,"role":"secondary"}"#,
            ),
            (
                Reply::Demoted(Demoted { role: Role::Secondary, changed: true, disconnected_clients: Some(2) }),
                r#"{"changed":true,"disconnected_clients":2,"role":"secondary"}"#,
            ),
            (Reply::Connecting(Connecting { connection: ConnState::Connecting }), r#"{"connection":"connecting"}"#),
            (Reply::Disconnected(Disconnected { connection: ConnState::Standalone }), r#"{"connection":"standalone"}"#),
            (Reply::IoResumed(IoResumed { resumed: true }), r#"{"resumed":true}"#),
            (
                Reply::NewGeneration(NewGeneration {
                    disk: DiskState::UpToDate,
                    peer_disk: DiskState::UpToDate,
                    generation: format!("{:016X}", 0xABu64),
                }),
                r#"{"disk":"uptodate","generation":"00000000000000AB","peer_disk":"uptodate"}"#,
            ),
            (
                Reply::VerifyStarted(VerifyStarted {
                    source: "alpha".into(),
                    total_bytes: 64 << 20,
                    block: 4096,
                    runs_finished: 3,
                }),
                r#"{"block":4096,"runs_finished":3,"source":"alpha","total_bytes":67108864}"#,
            ),
            (
                Reply::Invalidated(Invalidated {
                    disk: DiskState::Inconsistent,
                    out_of_sync_bytes: 5,
                    message: "disk inconsistent".into(),
                }),
                r#"{"disk":"inconsistent","message":"disk inconsistent","out_of_sync_bytes":5}"#,
            ),
            (
                Reply::InSync(InSync { disk: DiskState::UpToDate, peer_disk: None, out_of_sync_bytes: 0 }),
                r#"{"disk":"uptodate","out_of_sync_bytes":0}"#,
            ),
            (
                Reply::InSync(InSync {
                    disk: DiskState::UpToDate,
                    peer_disk: Some(DiskState::UpToDate),
                    out_of_sync_bytes: 0,
                }),
                r#"{"disk":"uptodate","out_of_sync_bytes":0,"peer_disk":"uptodate"}"#,
            ),
        ];
        for (reply, result) in cases {
            assert_eq!(wire(reply), format!(r#"{{"ok":true,"result":{result}}}"#));
        }
        let refused = Response::answer(Err::<Reply, _>(NodeError::Refused("cannot promote: no".into())));
        assert_eq!(serde_json::to_string(&refused).unwrap(), r#"{"ok":false,"error":"cannot promote: no"}"#);
    }

    fn side(role: Role, lsn: u64) -> SideReport {
        SideReport {
            role,
            disk: DiskState::UpToDate,
            gen_current: "00000000000000AB".into(),
            gen_bitmap: "0000000000000000".into(),
            gen_history: vec!["0000000000000001".into()],
            local_lsn: lsn,
            out_of_sync_bytes: 8192,
            bitmap_base_lsn: 3,
            log_first_lsn: 4,
            granularity: 4096,
            discard_my_data: false,
        }
    }

    fn probe() -> ProbeReport {
        ProbeReport {
            peer: "beta".into(),
            decision: DecisionView {
                result: "source-bitmap".into(),
                rule: "7".into(),
                explanation: "beta was away".into(),
            },
            local: side(Role::Primary, 42),
            peer_view: side(Role::Secondary, 40),
        }
    }

    #[test]
    fn the_dry_run_report_keeps_its_wire_format_and_reads_back() {
        let side = r#"{"bitmap_base_lsn":3,"discard_my_data":false,"disk":"uptodate","gen_bitmap":"0000000000000000","gen_current":"00000000000000AB","gen_history":["0000000000000001"],"granularity":4096,"local_lsn":LSN,"log_first_lsn":4,"out_of_sync_bytes":8192,"role":"ROLE"}"#;
        let want = format!(
            r#"{{"ok":true,"result":{{"decision":{{"explanation":"beta was away","result":"source-bitmap","rule":"7"}},"local":{},"peer":"beta","peer_view":{}}}}}"#,
            side.replace("LSN", "42").replace("ROLE", "primary"),
            side.replace("LSN", "40").replace("ROLE", "secondary"),
        );
        assert_eq!(wire(Reply::Probe(Box::new(probe()))), want);
        let v: serde_json::Value = serde_json::from_str(&want).unwrap();
        let back: ProbeReport = serde_json::from_value(v["result"].clone()).unwrap();
        assert_eq!(back, probe());
    }

    #[test]
    fn dry_run_and_command_output_read_as_before() {
        assert_eq!(
            probe_human("alpha", &probe()),
            "alpha: a connect would do: source-bitmap (rule 7)\n  beta was away\n  \
             alpha: role:primary disk:uptodate lsn:42 out-of-sync:8192 generation:00000000000000AB\n  \
             beta: role:secondary disk:uptodate lsn:40 out-of-sync:8192 generation:00000000000000AB\n"
        );
        let p = Promoted { role: Role::Primary, changed: true, nbd: Some("nbd://127.0.0.1:10809/r0".into()) };
        assert_eq!(p.human("alpha"), "alpha: primary, exporting nbd://127.0.0.1:10809/r0\n");
        let p = Promoted { role: Role::Primary, changed: false, nbd: None };
        assert_eq!(p.human("alpha"), "alpha: primary (already)\n");
        let d = Demoted { role: Role::Secondary, changed: true, disconnected_clients: Some(2) };
        assert_eq!(d.human("alpha"), "alpha: secondary, disconnected 2 NBD client(s)\n");
        let d = Demoted { role: Role::Secondary, changed: true, disconnected_clients: Some(0) };
        assert_eq!(d.human("alpha"), "alpha: secondary\n");
        let d = Demoted { role: Role::Secondary, changed: false, disconnected_clients: None };
        assert_eq!(d.human("alpha"), "alpha: secondary (already)\n");
        let c = Connecting { connection: ConnState::Connecting };
        assert_eq!(c.human("alpha", true), "alpha: connecting (this node's changes will be discarded)\n");
        assert_eq!(Disconnected { connection: ConnState::Standalone }.human("alpha"), "alpha: standalone\n");
        assert_eq!(IoResumed { resumed: false }.human("alpha"), "alpha: IO was not suspended\n");
        let g = NewGeneration { disk: DiskState::UpToDate, peer_disk: DiskState::UpToDate, generation: "0A".into() };
        assert_eq!(g.human("alpha"), "alpha: uptodate, peer uptodate, generation 0A (no initial sync)\n");
        let v = VerifyStarted { source: "beta".into(), total_bytes: 1, block: 1, runs_finished: 0 };
        assert_eq!(v.human("alpha"), "alpha: verify started (source beta); `repctl status` shows progress\n");
    }
}
