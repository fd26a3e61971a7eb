//! Replication between the two nodes of a resource: the engine that keeps
//! one link to the peer and runs a session on it (the primary's log stream
//! and the secondary's apply, resync, online verify), and the versioned
//! wire protocol and handshake underneath.
//!
//! - [`engine`]: one per node; listens and dials, keeps one authenticated
//!   connection, runs a session on it, gates the primary's NBD replies on
//!   the peer's acknowledgements (protocol A/B/C), and holds what `status`
//!   and `events` show. `session` (private): one connection's life, as
//!   sync source, sync target or idle (log catch-up, bitmap and full
//!   resync).
//!   The reply gate the NBD path holds is [`engine::Gate`]; the source's
//!   resync is a [`resync::ResyncJob`] (log catch-up, bitmap or full walk,
//!   one pacing mechanism); verify is a sub-state machine of the session
//!   ([`verify::VerifyState`]). docs/architecture.md has the files, the
//!   tasks and the way of a write and of a resync.
//! - [`decide`]: the pure resync decision at connect (who sends what), with
//!   its split-brain policies; [`verify`]: online verify and `invalidate`.
//! - [`resync_hook`]: the `before-resync-target` hook a sync target waits for
//!   (a trait object the node passes in [`engine::EngineConfig`]).
//! - [`store`]: what the engine needs from local storage, as a trait;
//!   [`volume_store`] implements it over the real volume.
//! - [`unauth`]: limits on connections that have not authenticated yet.
//! - [`proto`]: frames (`| magic "RBRP" | type | flags | len | crc32c |`),
//!   the [`Message`] enum with its version history, the pure codec
//!   ([`encode`], [`decode`]); data payloads decode without a copy.
//! - [`link`]: async [`FrameReader`] / [`FrameWriter`] over any byte stream,
//!   batching small frames into one write; [`run_writer`] as a task.
//! - [`handshake`](mod@handshake): the symmetric Hello / Auth / Welcome exchange with
//!   mutual HMAC-SHA256 authentication and [`RefuseReason`]s, and the rule
//!   that picks one connection when both nodes dialled.
//!
//! Typical use by the replication engine, on each new TCP connection:
//!
//! ```ignore
//! let peer = handshake(&mut stream, &local, Duration::from_secs(5)).await?;
//! let (mut rx, tx) = split_tcp(stream)?;          // TCP_NODELAY on
//! let (q, chan) = tokio::sync::mpsc::channel(1024);
//! tokio::spawn(run_writer(tx, chan));              // q.send(Message::Write { .. })
//! while let Some(msg) = rx.read().await? { /* apply, ack */ }
//! ```
//!
//! The full byte-level description is docs/replication-protocol.md.

pub mod decide;
pub mod engine;
#[cfg(test)]
mod engine_tests;
pub mod handshake;
pub mod link;
pub mod proto;
pub mod resync;
pub mod resync_hook;
mod session;
pub mod stats;
pub mod store;
#[cfg(test)]
pub mod testing;
pub mod unauth;
pub mod verify;
#[cfg(test)]
mod verify_engine_tests;
pub mod volume_store;

pub use handshake::{
    HandshakeError, LocalHello, PeerInfo, compute_auth, connection_winner, handshake, keep_connection,
    negotiate_version, refuse,
};
pub use link::{
    FrameReader, FrameWriter, LinkError, LinkRead, LinkStream, LinkWrite, QueuedBytes, run_writer, run_writer_counted,
    secure, split_link, split_tcp,
};
pub use proto::{
    FrameError, GoodbyeReason, Hello, MIN_PROTOCOL_VERSION, Message, PROTOCOL_VERSION, RefuseReason, decode, encode,
};
