//! The events a node announces: one variant per event name of the
//! `repctl events` stream (docs/cli.md), emitted by the replication engine
//! and the node, streamed by the control server.
//!
//! Imports only [`crate::model`], so that `repl` (which emits most events)
//! and `control` (which streams them) both may use it without importing
//! each other (docs/architecture.md).
//!
//! The JSON is a public contract, read by scripts and by handlers
//! (`REPBLOCK_EVENT`): `{"time": …, "event": "<name>", <fields>}`. Names and
//! fields may be added, never changed. Within each variant the fields are
//! declared in alphabetical order: that is the order the stream has always
//! printed them in (the fields were a sorted JSON map before this enum), so
//! the lines stay byte-for-byte the same. A field marked "absent unless …"
//! is left out of the object, not sent as `null`; every other `Option`
//! field is sent as `null` when empty.

use serde::Serialize;

use crate::model::{ConnState, DiskState, ReplState, ResyncKind, Role};

/// Which side of a resync a node is (`role` of `sync-started` and
/// `sync-finished`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncRole {
    Source,
    Target,
}

/// One event (the `event` field names the variant, in kebab case).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    /// First line of every stream: the node now.
    State {
        connection: ConnState,
        disk: DiskState,
        failed: Option<String>,
        nbd_clients: usize,
        role: Role,
    },
    /// Promote (`forced` present) or demote (`disconnected_clients` present).
    RoleChanged {
        #[serde(skip_serializing_if = "Option::is_none")]
        disconnected_clients: Option<usize>,
        #[serde(skip_serializing_if = "Option::is_none")]
        forced: Option<bool>,
        role: Role,
    },
    /// The local disk state changed (promote --force, a resync, invalidate,
    /// `new-current-uuid --clear-bitmap`).
    DiskChanged {
        /// Absent unless `new-current-uuid --clear-bitmap` made it.
        #[serde(skip_serializing_if = "Option::is_none")]
        clear_bitmap: Option<bool>,
        disk: DiskState,
        /// Absent unless a promote made it.
        #[serde(skip_serializing_if = "Option::is_none")]
        forced: Option<bool>,
        from: DiskState,
    },
    NbdStarted {
        address: String,
        uri: String,
    },
    NbdStopped {
        address: String,
    },
    /// The volume stopped taking writes (fail-stop).
    Failed {
        reason: String,
    },
    /// repd stops.
    Stopping,
    ConnectionChanged {
        connection: ConnState,
        peer: String,
    },
    /// A session is up: `connection` is always `connected`.
    ReplicationChanged {
        connection: ConnState,
        peer: String,
        replication: ReplState,
    },
    PeerChanged {
        disk: DiskState,
        peer: String,
        role: Role,
    },
    /// The peer ended the session (Goodbye, closed connection).
    PeerDisconnected {
        peer: String,
        reason: String,
    },
    /// The peer went silent or the link broke.
    PeerLost {
        peer: String,
        reason: String,
    },
    SyncStarted {
        kind: ResyncKind,
        peer: String,
        role: SyncRole,
        total_bytes: u64,
    },
    /// About once a second while a resync runs.
    SyncProgress {
        done_bytes: u64,
        eta_seconds: Option<u64>,
        kind: ResyncKind,
        peer: String,
        speed_bytes_per_sec: u64,
        total_bytes: u64,
    },
    SyncFinished {
        bytes: u64,
        kind: ResyncKind,
        peer: String,
        role: SyncRole,
        seconds: f64,
    },
    /// The sync target's `before-resync-target` handler failed: the resync
    /// of `kind` from `peer` did not start and this node went standalone.
    /// `reason`: `exit code N`, `killed by signal N`, `killed after the
    /// timeout of …`, `cannot run …`.
    SyncRefused {
        handler: String,
        kind: ResyncKind,
        peer: String,
        reason: String,
    },
    /// The resync decision of every connect (`result`: `no-sync`,
    /// `source-log`, …; `rule`: docs/resync.md).
    Decision {
        explanation: String,
        peer: String,
        result: String,
        rule: String,
    },
    SplitBrain {
        explanation: String,
        local_out_of_sync_bytes: u64,
        peer: String,
        peer_out_of_sync_bytes: u64,
        rule: String,
    },
    /// `on_peer_loss = "suspend"` and the peer was lost.
    IoSuspended,
    IoResumed,
    /// The primary's `fence-peer` handler returned (docs/config.md):
    /// `fenced` when its exit code says the peer cannot become primary with
    /// stale data (3, 4, 5, 7), `meaning` says what the code means, and
    /// `io_resumed` whether suspended writes were released because of it.
    PeerFencing {
        exit_code: Option<i32>,
        fenced: bool,
        io_resumed: bool,
        meaning: String,
        peer: String,
    },
    /// `repctl invalidate`.
    Invalidated {
        connected: bool,
        peer: String,
    },
    /// An online verify ended (`complete` false: aborted, `message` says why).
    VerifyFinished {
        checked_bytes: u64,
        complete: bool,
        message: Option<String>,
        out_of_sync_bytes: u64,
        peer: String,
        seconds: f64,
    },
    /// A handler (docs/config.md) started.
    HandlerCalled {
        argv: Vec<String>,
        handler: String,
    },
    HandlerFinished {
        duration_ms: u64,
        error: Option<String>,
        exit_code: Option<i32>,
        handler: String,
        signal: Option<i32>,
        timed_out: bool,
    },
    /// The reader was too slow: `count` events were dropped for it.
    EventsLost {
        count: u64,
    },
    /// The witness (automatic failover): first line of its stream.
    WitnessState {
        /// Data nodes connected to the witness now.
        connected: Vec<String>,
        primary: Option<String>,
        term: u64,
        uptodate: Vec<String>,
        /// False while the witness has no state (amnesia) or its state file
        /// failed: it refuses every request.
        voting: bool,
    },
    /// The witness's record changed (persisted before this is sent).
    TermChanged {
        primary: Option<String>,
        term: u64,
        uptodate: Vec<String>,
    },
    /// The witness answered a request: `granted`, or refused for `reason`.
    Vote {
        granted: bool,
        node: String,
        reason: Option<String>,
        /// `claim`, `solo`, `peer-uptodate` or `release`.
        request: String,
        /// The term the request named.
        request_term: u64,
        /// The witness's term after the answer.
        term: u64,
    },
    /// A data node: its witness link is up.
    WitnessConnected {
        witness: String,
    },
    /// A data node: its witness link ended.
    WitnessLost {
        reason: String,
        witness: String,
    },
    /// A data node connected to the witness (authenticated).
    NodeConnected {
        address: String,
        node: String,
    },
    /// A data node's witness link ended.
    NodeDisconnected {
        node: String,
        reason: String,
    },
    /// `repctl events --statistics`: the status' `statistics` fields plus
    /// `lsn` and `out_of_sync_bytes` (made by repctl, never by repd).
    Statistics {
        #[serde(flatten)]
        fields: serde_json::Map<String, serde_json::Value>,
    },
}

impl Event {
    /// The `event` name (`role-changed`, …).
    pub fn name(&self) -> &'static str {
        match self {
            Event::State { .. } => "state",
            Event::RoleChanged { .. } => "role-changed",
            Event::DiskChanged { .. } => "disk-changed",
            Event::NbdStarted { .. } => "nbd-started",
            Event::NbdStopped { .. } => "nbd-stopped",
            Event::Failed { .. } => "failed",
            Event::Stopping => "stopping",
            Event::ConnectionChanged { .. } => "connection-changed",
            Event::ReplicationChanged { .. } => "replication-changed",
            Event::PeerChanged { .. } => "peer-changed",
            Event::PeerDisconnected { .. } => "peer-disconnected",
            Event::PeerLost { .. } => "peer-lost",
            Event::SyncStarted { .. } => "sync-started",
            Event::SyncProgress { .. } => "sync-progress",
            Event::SyncFinished { .. } => "sync-finished",
            Event::SyncRefused { .. } => "sync-refused",
            Event::Decision { .. } => "decision",
            Event::SplitBrain { .. } => "split-brain",
            Event::IoSuspended => "io-suspended",
            Event::IoResumed => "io-resumed",
            Event::PeerFencing { .. } => "peer-fencing",
            Event::Invalidated { .. } => "invalidated",
            Event::VerifyFinished { .. } => "verify-finished",
            Event::HandlerCalled { .. } => "handler-called",
            Event::HandlerFinished { .. } => "handler-finished",
            Event::EventsLost { .. } => "events-lost",
            Event::Statistics { .. } => "statistics",
            Event::WitnessState { .. } => "witness-state",
            Event::TermChanged { .. } => "term-changed",
            Event::Vote { .. } => "vote",
            Event::WitnessConnected { .. } => "witness-connected",
            Event::WitnessLost { .. } => "witness-lost",
            Event::NodeConnected { .. } => "node-connected",
            Event::NodeDisconnected { .. } => "node-disconnected",
        }
    }
}

/// One line of the `events` stream: an event and when it happened.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventLine {
    /// RFC 3339 with milliseconds, UTC.
    pub time: String,
    #[serde(flatten)]
    pub event: Event,
}

impl EventLine {
    /// `event`, stamped now.
    pub fn now(event: Event) -> EventLine {
        EventLine { time: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(), event }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn line(e: Event) -> String {
        serde_json::to_string(&EventLine { time: "T".into(), event: e }).unwrap()
    }

    /// The lines the stream printed before this enum existed (a sorted map
    /// of `json!` fields after `time` and `event`), byte for byte.
    #[test]
    fn lines_are_the_json_of_before() {
        let peer = || "beta".to_string();
        let cases: Vec<(Event, &str)> = vec![
            (
                Event::State {
                    connection: ConnState::Standalone,
                    disk: DiskState::Inconsistent,
                    failed: None,
                    nbd_clients: 0,
                    role: Role::Secondary,
                },
                r#"{"time":"T","event":"state","connection":"standalone","disk":"inconsistent","failed":null,"nbd_clients":0,"role":"secondary"}"#,
            ),
            (
                Event::RoleChanged { disconnected_clients: None, forced: Some(true), role: Role::Primary },
                r#"{"time":"T","event":"role-changed","forced":true,"role":"primary"}"#,
            ),
            (
                Event::RoleChanged { disconnected_clients: Some(2), forced: None, role: Role::Secondary },
                r#"{"time":"T","event":"role-changed","disconnected_clients":2,"role":"secondary"}"#,
            ),
            (
                Event::DiskChanged {
                    clear_bitmap: None,
                    disk: DiskState::UpToDate,
                    forced: Some(false),
                    from: DiskState::Outdated,
                },
                r#"{"time":"T","event":"disk-changed","disk":"uptodate","forced":false,"from":"outdated"}"#,
            ),
            (
                Event::DiskChanged {
                    clear_bitmap: Some(true),
                    disk: DiskState::UpToDate,
                    forced: None,
                    from: DiskState::Inconsistent,
                },
                r#"{"time":"T","event":"disk-changed","clear_bitmap":true,"disk":"uptodate","from":"inconsistent"}"#,
            ),
            (Event::Stopping, r#"{"time":"T","event":"stopping"}"#),
            (Event::IoSuspended, r#"{"time":"T","event":"io-suspended"}"#),
            (
                Event::ReplicationChanged {
                    connection: ConnState::Connected,
                    peer: peer(),
                    replication: ReplState::SyncSource,
                },
                r#"{"time":"T","event":"replication-changed","connection":"connected","peer":"beta","replication":"sync-source"}"#,
            ),
            (
                Event::SyncProgress {
                    done_bytes: 1,
                    eta_seconds: None,
                    kind: ResyncKind::Bitmap,
                    peer: peer(),
                    speed_bytes_per_sec: 0,
                    total_bytes: 2,
                },
                r#"{"time":"T","event":"sync-progress","done_bytes":1,"eta_seconds":null,"kind":"bitmap","peer":"beta","speed_bytes_per_sec":0,"total_bytes":2}"#,
            ),
            (
                Event::SyncFinished {
                    bytes: 4096,
                    kind: ResyncKind::Full,
                    peer: peer(),
                    role: SyncRole::Target,
                    seconds: 1.5,
                },
                r#"{"time":"T","event":"sync-finished","bytes":4096,"kind":"full","peer":"beta","role":"target","seconds":1.5}"#,
            ),
            (
                Event::VerifyFinished {
                    checked_bytes: 8,
                    complete: true,
                    message: None,
                    out_of_sync_bytes: 0,
                    peer: peer(),
                    seconds: 0.25,
                },
                r#"{"time":"T","event":"verify-finished","checked_bytes":8,"complete":true,"message":null,"out_of_sync_bytes":0,"peer":"beta","seconds":0.25}"#,
            ),
            (
                Event::HandlerFinished {
                    duration_ms: 3,
                    error: None,
                    exit_code: Some(0),
                    handler: "on-promote".into(),
                    signal: None,
                    timed_out: false,
                },
                r#"{"time":"T","event":"handler-finished","duration_ms":3,"error":null,"exit_code":0,"handler":"on-promote","signal":null,"timed_out":false}"#,
            ),
            (
                Event::SyncRefused {
                    handler: "before-resync-target".into(),
                    kind: ResyncKind::Bitmap,
                    peer: peer(),
                    reason: "exit code 3".into(),
                },
                r#"{"time":"T","event":"sync-refused","handler":"before-resync-target","kind":"bitmap","peer":"beta","reason":"exit code 3"}"#,
            ),
            (
                Event::PeerFencing {
                    exit_code: Some(4),
                    fenced: true,
                    io_resumed: true,
                    meaning: "peer outdated".into(),
                    peer: peer(),
                },
                r#"{"time":"T","event":"peer-fencing","exit_code":4,"fenced":true,"io_resumed":true,"meaning":"peer outdated","peer":"beta"}"#,
            ),
            (Event::EventsLost { count: 7 }, r#"{"time":"T","event":"events-lost","count":7}"#),
        ];
        for (e, want) in cases {
            let name = e.name();
            let got = line(e);
            assert_eq!(got, want);
            assert_eq!(serde_json::from_str::<serde_json::Value>(&got).unwrap()["event"], name);
        }
    }

    #[test]
    fn failover_events_name_themselves_and_sort_their_fields() {
        let cases: Vec<(Event, &str)> = vec![
            (
                Event::Vote {
                    granted: false,
                    node: "beta".into(),
                    reason: Some("primary-alive".into()),
                    request: "claim".into(),
                    request_term: 4,
                    term: 4,
                },
                r#"{"time":"T","event":"vote","granted":false,"node":"beta","reason":"primary-alive","request":"claim","request_term":4,"term":4}"#,
            ),
            (
                Event::TermChanged { primary: Some("alpha".into()), term: 5, uptodate: vec!["alpha".into()] },
                r#"{"time":"T","event":"term-changed","primary":"alpha","term":5,"uptodate":["alpha"]}"#,
            ),
            (
                Event::WitnessLost { reason: "closed".into(), witness: "gamma".into() },
                r#"{"time":"T","event":"witness-lost","reason":"closed","witness":"gamma"}"#,
            ),
            (
                Event::WitnessConnected { witness: "gamma".into() },
                r#"{"time":"T","event":"witness-connected","witness":"gamma"}"#,
            ),
            (
                Event::NodeConnected { address: "127.0.0.1:5".into(), node: "alpha".into() },
                r#"{"time":"T","event":"node-connected","address":"127.0.0.1:5","node":"alpha"}"#,
            ),
            (
                Event::NodeDisconnected { node: "alpha".into(), reason: "closed".into() },
                r#"{"time":"T","event":"node-disconnected","node":"alpha","reason":"closed"}"#,
            ),
            (
                Event::WitnessState { connected: vec![], primary: None, term: 0, uptodate: vec![], voting: true },
                r#"{"time":"T","event":"witness-state","connected":[],"primary":null,"term":0,"uptodate":[],"voting":true}"#,
            ),
        ];
        for (e, want) in cases {
            let name = e.name();
            let got = line(e);
            assert_eq!(got, want);
            assert_eq!(serde_json::from_str::<serde_json::Value>(&got).unwrap()["event"], name);
        }
    }

    #[test]
    fn statistics_fields_are_flattened() {
        let fields = match json!({"sent_bytes": 1, "lsn": 9}) {
            serde_json::Value::Object(m) => m,
            _ => unreachable!(),
        };
        assert_eq!(line(Event::Statistics { fields }), r#"{"time":"T","event":"statistics","lsn":9,"sent_bytes":1}"#);
    }

    #[test]
    fn time_is_rfc3339_utc_with_milliseconds() {
        let v = serde_json::to_value(EventLine::now(Event::IoResumed)).unwrap();
        let t = v["time"].as_str().unwrap();
        assert!(humantime::parse_rfc3339(t).is_ok(), "{t}");
        assert!(t.ends_with('Z') && t.contains('.'), "{t}");
        assert_eq!(v["event"], "io-resumed");
    }
}
