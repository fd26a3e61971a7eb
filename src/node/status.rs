//! `status`: the JSON object of design.md §6 and its human rendering.
//!
//! JSON (names may be added, never changed):
//!
//! ```json
//! {
//!   "resource": "r0", "node": "alpha",
//!   "role": "primary", "disk": "uptodate",
//!   "connection": "standalone", "replication": null, "protocol": "C",
//!   "peer": { "name": null, "role": null, "disk": null },
//!   "out_of_sync_bytes": 0,
//!   "resync": { "done_bytes": 0, "total_bytes": 0 },
//!   "lsn": { "local": 42, "peer_received": 0, "peer_written": 0, "peer_durable": 0 },
//!   "size": 67108864, "block_size": 4096, "io_engine": "io_uring",
//!   "nbd": { "address": "127.0.0.1:10809", "uri": "nbd://127.0.0.1:10809/r0",
//!            "serving": true, "clients": 1 },
//!   "wal": { "bytes": 1048576, "checkpoint_lsn": 40, "durable_lsn": 42 },
//!   "failed": null,
//!   "pid": 1234
//! }
//! ```

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::{ConnState, DiskState, Role};
use crate::io::EngineKind;
use crate::model::{Protocol, ReplState};
use crate::units::format_size_approx;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub resource: String,
    pub node: String,
    pub role: Role,
    pub disk: DiskState,
    pub connection: ConnState,
    /// Replication state when connected (`established`, `sync-source`,
    /// `sync-target`), null otherwise.
    pub replication: Option<ReplState>,
    /// `A`, `B` or `C`.
    pub protocol: Protocol,
    pub peer: PeerStatus,
    pub out_of_sync_bytes: u64,
    pub resync: ResyncStatus,
    pub lsn: LsnStatus,
    /// Volume size in bytes.
    pub size: u64,
    pub block_size: u32,
    /// `io_uring` or `sync`: the engine actually running.
    pub io_engine: EngineKind,
    pub nbd: NbdStatus,
    pub wal: WalStatus,
    /// Why the volume stopped taking writes (fail-stop), or null.
    pub failed: Option<String>,
    /// Process id of repd.
    pub pid: u32,
    /// Writes are held because the peer was lost and `on_peer_loss` is
    /// `suspend` (`repctl resume-io` releases them).
    #[serde(default)]
    pub io_suspended: bool,
    /// The last replication link failure (refusal, connect error), if any.
    #[serde(default)]
    pub link_error: Option<String>,
    /// Bytes per bit of the dirty bitmap.
    #[serde(default)]
    pub bitmap_granularity: u32,
    /// The resync decision of the last connect.
    #[serde(default)]
    pub decision: Option<DecisionStatus>,
    /// The last connect found a split brain (both nodes standalone).
    #[serde(default)]
    pub split_brain: bool,
    /// The last completed resync.
    #[serde(default)]
    pub last_sync: Option<LastSyncStatus>,
    /// Online verify: `running`, `role`, `done_bytes`, `total_bytes`,
    /// `out_of_sync_bytes`, `runs_finished`, `last` (src/repl/verify.rs).
    #[serde(default)]
    pub verify: crate::repl::verify::VerifyStatus,
    /// Counters and gauges like `drbdsetup status --statistics` (bytes,
    /// requests, pending, buffer fill, WAL syncs; src/stats.rs).
    #[serde(default)]
    pub statistics: crate::stats::Statistics,
    /// The node's failover term (superblock; 0 without failover).
    #[serde(default)]
    pub term: u64,
    /// Automatic failover (docs/failover.md): mode, the witness link.
    #[serde(default)]
    pub failover: super::failover::FailoverStatus,
    /// `[tls]`: modes, the encrypted link's peer certificate, the
    /// certificates in use and their expiry warnings (docs/tls.md); null
    /// when TLS is off.
    #[serde(default)]
    pub tls: Option<TlsStatus>,
}

/// `decision` in the status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionStatus {
    /// `no-sync`, `source-log`, `source-bitmap`, `source-full`, `target-...`,
    /// `split-brain`, `unrelated`, `refuse`.
    pub result: String,
    pub rule: String,
    pub explanation: String,
}

/// `last_sync` in the status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastSyncStatus {
    /// `log`, `bitmap` or `full`.
    pub kind: String,
    pub bytes: u64,
    pub seconds: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub name: Option<String>,
    pub role: Option<Role>,
    pub disk: Option<DiskState>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ResyncStatus {
    pub done_bytes: u64,
    pub total_bytes: u64,
    /// Over the last second (the average so far until a second has passed).
    #[serde(default)]
    pub speed_bytes_per_sec: u64,
    /// Estimated seconds left (null when not known).
    #[serde(default)]
    pub eta_seconds: Option<u64>,
    /// `log`, `bitmap` or `full` while a resync runs, null otherwise.
    #[serde(default)]
    pub kind: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LsnStatus {
    pub local: u64,
    pub peer_received: u64,
    pub peer_written: u64,
    pub peer_durable: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NbdStatus {
    /// Configured address (`host:port` or `unix:/path`).
    pub address: String,
    /// NBD URI of the export.
    pub uri: String,
    /// Whether the export is up (only while primary).
    pub serving: bool,
    /// Attached NBD connections.
    pub clients: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WalStatus {
    /// Bytes of WAL kept on disk.
    pub bytes: u64,
    pub checkpoint_lsn: u64,
    pub durable_lsn: u64,
}

impl Status {
    /// Renders the status like `drbdadm status`: resource and role, then
    /// disk and connection, then details. A fail-stop reason comes right
    /// after the first line.
    pub fn human(&self) -> String {
        let mut s = String::new();
        // Writes to a String cannot fail.
        let _ = writeln!(s, "{} role:{}", self.resource, self.role);
        if let Some(reason) = &self.failed {
            let _ = writeln!(s, "  FAILED: {reason}");
            let _ = writeln!(s, "          (writes and flushes fail; restart repd once the disk is fixed)");
        }
        let _ = writeln!(s, "  disk:{}", self.disk);
        match &self.peer.name {
            None => {
                let _ = writeln!(s, "  connection:{}", self.connection);
            }
            Some(peer) => {
                let role = self.peer.role.map_or("unknown".to_string(), |r| r.to_string());
                let disk = self.peer.disk.map_or("unknown".to_string(), |d| d.to_string());
                let _ = writeln!(s, "  {peer} connection:{} role:{role}", self.connection);
                match &self.replication {
                    Some(r) => {
                        let _ = writeln!(s, "    replication:{r} peer-disk:{disk}");
                    }
                    None => {
                        let _ = writeln!(s, "    peer-disk:{disk}");
                    }
                }
                if self.out_of_sync_bytes > 0 {
                    let _ = writeln!(s, "    out-of-sync:{}", format_size_approx(self.out_of_sync_bytes));
                }
                if self.resync.total_bytes > 0 {
                    let pct = 100.0 * self.resync.done_bytes as f64 / self.resync.total_bytes as f64;
                    let kind = self.resync.kind.as_deref().unwrap_or("full");
                    let _ = write!(
                        s,
                        "    resync:{kind} {pct:.1}% ({} of {}",
                        format_size_approx(self.resync.done_bytes),
                        format_size_approx(self.resync.total_bytes)
                    );
                    if self.resync.speed_bytes_per_sec > 0 {
                        let _ = write!(s, ", {}/s", format_size_approx(self.resync.speed_bytes_per_sec));
                    }
                    if let Some(eta) = self.resync.eta_seconds {
                        let _ = write!(s, ", eta {eta}s");
                    }
                    let _ = writeln!(s, ")");
                }
                if self.split_brain {
                    let _ = writeln!(
                        s,
                        "    SPLIT BRAIN: both nodes wrote; nothing moved. `repctl connect --discard-my-data` on the node to overwrite, `repctl connect` on the other"
                    );
                }
                if let Some(d) = &self.decision {
                    let _ = writeln!(s, "    decision:{} (rule {}): {}", d.result, d.rule, d.explanation);
                }
                if let Some(l) = &self.last_sync {
                    let _ =
                        writeln!(s, "    last-sync:{} {} in {:.1}s", l.kind, format_size_approx(l.bytes), l.seconds);
                }
                if self.io_suspended {
                    let _ = writeln!(s, "    io:suspended (peer lost; `repctl resume-io` releases writes)");
                }
                let v = &self.verify;
                if v.running && v.total_bytes > 0 {
                    let pct = 100.0 * v.done_bytes as f64 / v.total_bytes as f64;
                    let _ = writeln!(
                        s,
                        "    verify:{pct:.1}% ({} of {}, {} out of sync, this node is the {})",
                        format_size_approx(v.done_bytes),
                        format_size_approx(v.total_bytes),
                        format_size_approx(v.out_of_sync_bytes),
                        v.role.as_deref().unwrap_or("?")
                    );
                } else if let Some(last) = &v.last {
                    let how = if last.complete { "done" } else { "aborted" };
                    let _ = writeln!(
                        s,
                        "    last-verify:{how} ({} checked, {} out of sync, {:.1}s)",
                        format_size_approx(last.checked_bytes),
                        format_size_approx(last.out_of_sync_bytes),
                        last.seconds
                    );
                }
                if let Some(e) = &self.link_error {
                    let _ = writeln!(s, "    last-error:{e}");
                }
            }
        }
        if let Some(line) = self.failover.human_line(self.term) {
            let _ = writeln!(s, "  {line}");
        }
        let _ = writeln!(
            s,
            "  node:{} protocol:{} size:{} io-engine:{}",
            self.node,
            self.protocol,
            format_size_approx(self.size),
            self.io_engine
        );
        if self.nbd.serving {
            let n = self.nbd.clients;
            let _ = writeln!(s, "  nbd:{} ({n} client{})", self.nbd.uri, if n == 1 { "" } else { "s" });
        } else {
            let _ = writeln!(s, "  nbd:not serving (only a primary exports {})", self.nbd.address);
        }
        let _ = writeln!(
            s,
            "  lsn:{} durable:{} checkpoint:{} wal:{}",
            self.lsn.local,
            self.wal.durable_lsn,
            self.wal.checkpoint_lsn,
            format_size_approx(self.wal.bytes)
        );
        s
    }
}

impl Status {
    /// The `--statistics` lines (after [`Status::human`]), like
    /// `drbdsetup status --verbose --statistics`: local IO, the volume's
    /// syncs, and the link to the peer.
    pub fn human_statistics(&self) -> String {
        let st = &self.statistics;
        let z = format_size_approx;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "  local: read:{} written:{} read-requests:{} write-requests:{} trim-requests:{} flush-requests:{} \
             pending:{} unacked:{}",
            z(st.read_bytes),
            z(st.written_bytes),
            st.read_requests,
            st.write_requests,
            st.trim_requests,
            st.flush_requests,
            st.pending_requests,
            st.unacked_requests
        );
        let _ = writeln!(
            s,
            "  volume: wal-syncs:{} checkpoints:{} bitmap-writes:{}",
            st.wal_syncs, st.checkpoints, st.bitmap_writes
        );
        if let Some(peer) = &self.peer.name {
            let _ = write!(
                s,
                "  {peer} sent:{} received:{} in-flight:{} buffer:{:.1}% of {}",
                z(st.sent_bytes),
                z(st.received_bytes),
                z(st.in_flight_bytes),
                st.replication_buffer_percent,
                z(st.replication_buffer_bytes)
            );
            match (&st.peer_address, &st.connected_since) {
                (Some(addr), Some(since)) => {
                    let _ = writeln!(s, " address:{addr} connected-since:{since}");
                }
                _ => {
                    let _ = writeln!(s, " (not connected)");
                }
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> Status {
        Status {
            resource: "r0".into(),
            node: "alpha".into(),
            role: Role::Primary,
            disk: DiskState::UpToDate,
            connection: ConnState::Standalone,
            replication: None,
            protocol: Protocol::C,
            peer: PeerStatus { name: None, role: None, disk: None },
            out_of_sync_bytes: 0,
            resync: ResyncStatus::default(),
            lsn: LsnStatus { local: 12, peer_received: 0, peer_written: 0, peer_durable: 0 },
            size: 1 << 30,
            block_size: 4096,
            io_engine: EngineKind::IoUring,
            nbd: NbdStatus {
                address: "127.0.0.1:10809".into(),
                uri: "nbd://127.0.0.1:10809/r0".into(),
                serving: true,
                clients: 1,
            },
            wal: WalStatus { bytes: 64 << 20, checkpoint_lsn: 10, durable_lsn: 12 },
            failed: None,
            pid: 1,
            tls: None,
            io_suspended: false,
            link_error: None,
            bitmap_granularity: 4096,
            decision: None,
            split_brain: false,
            last_sync: None,
            verify: Default::default(),
            statistics: Default::default(),
            term: 0,
            failover: Default::default(),
        }
    }

    #[test]
    fn human_reads_like_drbdadm_status() {
        let h = sample().human();
        assert_eq!(
            h,
            "r0 role:primary\n  disk:uptodate\n  connection:standalone\n  \
             node:alpha protocol:C size:1GiB io-engine:io_uring\n  \
             nbd:nbd://127.0.0.1:10809/r0 (1 client)\n  lsn:12 durable:12 checkpoint:10 wal:64MiB\n"
        );
    }

    #[test]
    fn statistics_read_like_drbdsetup_statistics() {
        let mut s = sample();
        s.statistics.read_bytes = 4 << 20;
        s.statistics.written_bytes = 1 << 30;
        s.statistics.write_requests = 7;
        s.statistics.wal_syncs = 3;
        assert_eq!(
            s.human_statistics(),
            "  local: read:4MiB written:1GiB read-requests:0 write-requests:7 trim-requests:0 flush-requests:0 \
             pending:0 unacked:0\n  volume: wal-syncs:3 checkpoints:0 bitmap-writes:0\n"
        );
        s.peer.name = Some("beta".into());
        s.statistics.replication_buffer_bytes = 64 << 20;
        s.statistics.in_flight_bytes = 16 << 20;
        s.statistics.replication_buffer_percent = 25.0;
        let h = s.human_statistics();
        assert!(
            h.ends_with("  beta sent:0B received:0B in-flight:16MiB buffer:25.0% of 64MiB (not connected)\n"),
            "{h}"
        );
        s.statistics.peer_address = Some("10.0.0.2:7790".into());
        s.statistics.connected_since = Some("2026-12-05T13:00:00.000Z".into());
        let h = s.human_statistics();
        assert!(h.ends_with("address:10.0.0.2:7790 connected-since:2026-12-05T13:00:00.000Z\n"), "{h}");
    }

    #[test]
    fn failure_comes_right_after_the_role() {
        let mut s = sample();
        s.failed = Some("fdatasync of WAL failed: EIO".into());
        let h = s.human();
        let mut lines = h.lines();
        assert_eq!(lines.next(), Some("r0 role:primary"));
        assert_eq!(lines.next(), Some("  FAILED: fdatasync of WAL failed: EIO"));
    }

    #[test]
    fn typed_fields_serialise_to_the_documented_strings() {
        let mut s = sample();
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(
            (&v["replication"], &v["protocol"], &v["io_engine"]),
            (&json!(null), &json!("C"), &json!("io_uring"))
        );
        for (r, name) in [
            (ReplState::Established, "established"),
            (ReplState::SyncSource, "sync-source"),
            (ReplState::SyncTarget, "sync-target"),
        ] {
            s.replication = Some(r);
            assert_eq!(serde_json::to_value(&s).unwrap()["replication"], name);
            assert_eq!(r.to_string(), name);
        }
        for (p, name) in [(Protocol::A, "A"), (Protocol::B, "B"), (Protocol::C, "C")] {
            s.protocol = p;
            assert_eq!(serde_json::to_value(&s).unwrap()["protocol"], name);
        }
        for (e, name) in [(EngineKind::Sync, "sync"), (EngineKind::IoUring, "io_uring")] {
            s.io_engine = e;
            assert_eq!(serde_json::to_value(&s).unwrap()["io_engine"], name);
            assert_eq!(e.to_string(), name);
        }
        // And back: what repctl reads is what repd wrote.
        let back: Status = serde_json::from_value(serde_json::to_value(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn two_nodes_show_the_peer() {
        let mut s = sample();
        s.role = Role::Secondary;
        s.connection = ConnState::Connecting;
        s.peer = PeerStatus { name: Some("beta".into()), role: None, disk: Some(DiskState::Unknown) };
        s.nbd.serving = false;
        let h = s.human();
        assert!(h.contains("  beta connection:connecting role:unknown\n    peer-disk:unknown\n"), "{h}");
        assert!(h.contains("nbd:not serving"), "{h}");
        // JSON keeps null for the unknown peer role.
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["peer"], serde_json::json!({"name": "beta", "role": null, "disk": "unknown"}));
    }
}

/// `status.tls`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct TlsStatus {
    /// The certificate directory.
    pub dir: String,
    /// `off`, `on` or `require`.
    pub nbd: String,
    pub nbd_verify_client: bool,
    /// Open NBD connections that negotiated TLS.
    pub nbd_tls_clients: usize,
    pub replication: TlsLinkStatus,
    /// The certificates in use (CA, server, client).
    pub certificates: Vec<CertStatus>,
    /// Certificates (ours or the peer's) expiring within 30 days.
    pub warnings: Vec<String>,
}

/// `status.tls.replication`: the link.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct TlsLinkStatus {
    /// `off` or `require`.
    pub mode: String,
    /// The link is up and inside TLS.
    pub encrypted: bool,
    pub version: Option<String>,
    pub cipher: Option<String>,
    /// The peer certificate's subject (`CN=beta`) and expiry (Unix seconds).
    pub peer_subject: Option<String>,
    pub peer_not_after: Option<u64>,
    pub peer_expires_in_days: Option<i64>,
}

/// One certificate in use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct CertStatus {
    pub file: String,
    pub subject: String,
    /// Unix seconds.
    pub not_after: u64,
    pub expires_in_days: i64,
}
