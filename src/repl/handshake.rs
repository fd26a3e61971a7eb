//! The replication handshake: version negotiation, mutual HMAC-SHA256
//! authentication, identity checks, and refusals that say why.
//!
//! Both sides run the same code, whichever dialled:
//!
//! ```text
//!   alpha                                              beta
//!     │── Hello{versions, names, size, gen_ids, nonce_a} ──►│
//!     │◄── Hello{versions, names, size, gen_ids, nonce_b} ──│
//!     │   (no common version → Refuse{IncompatibleVersion})
//!     │── Auth{HMAC(secret, label‖nonce_b‖"alpha"‖res)} ►│
//!     │◄ Auth{HMAC(secret, label‖nonce_a‖"beta"‖res)} ──│
//!     │   verify (constant time) → Refuse{WrongSecret}
//!     │   resource, names, size, block size → Refuse{...}
//!     │── Welcome{version} ────────────────────────────►│
//!     │◄──────────────────────────── Welcome{version} ──│
//! ```
//!
//! Every step writes before it reads, so neither side waits on the other.
//! A side that refuses sends `Refuse{reason, message}`, shuts its write
//! side and waits briefly for the peer to close, so the peer reads the
//! reason before the connection goes away: both logs say why.
//!
//! The version is settled before authentication because it fixes the
//! meaning of everything after Hello; Hello and Refuse never change layout.
//! Identity checks come after authentication, so an unauthenticated peer
//! learns only that its secret is wrong.
//!
//! The secret itself never crosses the wire. The MAC binds the peer's fresh
//! nonce (no replay), the sender's node name (a node's own proof cannot be
//! reflected back at it) and the resource name. The link is not encrypted:
//! an active man in the middle can relay a whole session, as with DRBD's
//! `cram-hmac-alg`; run replication on a trusted network or a tunnel.
//!
//! The handshake reads exactly the frames it consumes (header, then
//! payload), so a [`super::FrameReader`] built on the same stream afterwards
//! loses nothing the peer sent right after its Welcome.

use std::io;
use std::time::Duration;

use bytes::BytesMut;
use hmac::{Hmac, KeyInit, Mac};
use rand::Rng;
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use super::proto::{
    FRAME_HEADER_LEN, FrameError, Hello, MAX_NAME_LEN, MIN_PROTOCOL_VERSION, Message, PROTOCOL_VERSION, RefuseReason,
    WITNESS_PROTOCOL_VERSION, check, decode, encode,
};
use crate::model::{DiskState, GenIds, Role};

/// Label that starts every MAC input (version 1).
pub const AUTH_LABEL: &[u8] = b"repblock-auth-v1";
/// Largest handshake frame payload accepted (a Hello with three 255-byte
/// names is 872 bytes).
pub const MAX_HANDSHAKE_PAYLOAD: usize = 2048;
/// How long a refusing side waits for the peer to read its Refuse and close.
pub const REFUSE_LINGER: Duration = Duration::from_millis(500);

type HmacSha256 = Hmac<Sha256>;

/// What this node says about itself.
#[derive(Clone)]
pub struct LocalHello {
    pub resource: String,
    /// This node's name.
    pub node: String,
    /// The name of the node we expect at the other end.
    pub peer: String,
    /// Volume size in bytes.
    pub size: u64,
    /// Block size in bytes (bitmap granularity); both sides must agree.
    pub block_size: u32,
    pub gen_ids: GenIds,
    pub role: Role,
    pub disk: DiskState,
    /// The resource's shared secret (config `secret`). Never sent.
    pub secret: Vec<u8>,
}

impl std::fmt::Debug for LocalHello {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalHello")
            .field("resource", &self.resource)
            .field("node", &self.node)
            .field("peer", &self.peer)
            .field("size", &self.size)
            .field("block_size", &self.block_size)
            .field("gen_ids", &self.gen_ids)
            .field("role", &self.role)
            .field("disk", &self.disk)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// What the handshake learnt about an accepted peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// The peer's node name (equal to [`LocalHello::peer`]).
    pub node: String,
    /// The protocol version both sides now speak.
    pub version: u16,
    pub size: u64,
    pub block_size: u32,
    pub gen_ids: GenIds,
    pub role: Role,
    pub disk: DiskState,
    /// The peer's Hello feature bits (none defined in version 1).
    pub flags: u32,
}

/// Why a handshake failed. `peer` is the name the other side gave in its
/// Hello, or the expected name before that. The caller logs the error and
/// drops the connection.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("Handshake with {peer}: nothing within {after:?} while {stage}")]
    Timeout { peer: String, stage: &'static str, after: Duration },
    #[error("Handshake with {peer}: IO error while {stage}: {source}")]
    Io {
        peer: String,
        stage: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("Handshake with {peer}: connection closed while {stage}")]
    Closed { peer: String, stage: &'static str },
    #[error("Handshake with {peer}: bad frame while {stage}: {source}")]
    Frame {
        peer: String,
        stage: &'static str,
        #[source]
        source: FrameError,
    },
    #[error("Handshake with {peer}: unexpected {got} message while {stage}")]
    Unexpected { peer: String, stage: &'static str, got: &'static str },
    /// We refused the peer (and told it why).
    #[error("Refused peer {peer} ({reason}): {message}")]
    Refused { peer: String, reason: RefuseReason, message: String },
    /// The peer refused us.
    #[error("Refused by peer {peer} ({reason}): {message}")]
    PeerRefused { peer: String, reason: RefuseReason, message: String },
    /// Our own parameters cannot be sent (a bad name, an empty secret).
    #[error("Cannot start a handshake: {0}")]
    Local(String),
    /// The TLS handshake before ours failed (`[tls] replication`): `kind`
    /// says why in a word (`unknown-ca`, `expired`, `wrong-name`,
    /// `no-certificate`, `not-tls`...), `message` in a sentence.
    #[error("TLS with {peer} failed ({kind}): {message}")]
    Tls { peer: String, kind: &'static str, message: String },
}

/// Handshake stages that come before the peer proved it knows the secret.
const STAGES_BEFORE_AUTH: [&str; 4] =
    ["sending our hello", "reading the peer's hello", "sending our auth", "reading the peer's auth"];

impl HandshakeError {
    /// Whether the failure came before the other end authenticated: anyone
    /// who can reach the port can cause it, so it is summarised rather than
    /// logged one line each. A refusal by the other end counts too (its
    /// Refuse may come before its Auth, and says whatever it likes).
    pub fn before_auth(&self) -> bool {
        match self {
            HandshakeError::Timeout { stage, .. }
            | HandshakeError::Io { stage, .. }
            | HandshakeError::Closed { stage, .. }
            | HandshakeError::Frame { stage, .. }
            | HandshakeError::Unexpected { stage, .. } => STAGES_BEFORE_AUTH.contains(stage),
            HandshakeError::Refused { reason, .. } => {
                matches!(reason, RefuseReason::WrongSecret | RefuseReason::IncompatibleVersion)
            }
            HandshakeError::PeerRefused { .. } => true,
            HandshakeError::Local(_) => false,
            // Anyone can reach the port and fail TLS.
            HandshakeError::Tls { kind, .. } => *kind != "local",
        }
    }

    /// A short, bounded key for the kind of failure (what happened, and the
    /// stage or refusal reason), for summaries: never text the other end
    /// chose.
    pub fn kind(&self) -> (&'static str, &'static str) {
        match self {
            HandshakeError::Timeout { stage, .. } => ("timeout", stage),
            HandshakeError::Io { stage, .. } => ("io-error", stage),
            HandshakeError::Closed { stage, .. } => ("closed", stage),
            HandshakeError::Frame { stage, .. } => ("bad-frame", stage),
            HandshakeError::Unexpected { stage, .. } => ("unexpected-message", stage),
            HandshakeError::Refused { reason, .. } => ("refused", reason.as_str()),
            HandshakeError::PeerRefused { reason, .. } => ("refused-by-peer", reason.as_str()),
            HandshakeError::Local(_) => ("local", ""),
            HandshakeError::Tls { kind, .. } => ("tls", kind),
        }
    }

    /// The refusal reason, if either side refused.
    pub fn refuse_reason(&self) -> Option<RefuseReason> {
        match self {
            HandshakeError::Refused { reason, .. } | HandshakeError::PeerRefused { reason, .. } => Some(*reason),
            _ => None,
        }
    }
}

/// Where the exchange is, for errors.
struct Progress {
    stage: &'static str,
    peer: String,
}

impl Progress {
    fn refuse(&self, reason: RefuseReason, message: String) -> HandshakeError {
        HandshakeError::Refused { peer: self.peer.clone(), reason, message }
    }

    fn unexpected(&self, m: &Message) -> HandshakeError {
        match m {
            Message::Refuse { reason, message } => {
                HandshakeError::PeerRefused { peer: self.peer.clone(), reason: *reason, message: message.clone() }
            }
            other => HandshakeError::Unexpected { peer: self.peer.clone(), stage: self.stage, got: other.name() },
        }
    }

    fn io(&self, e: io::Error) -> HandshakeError {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            HandshakeError::Closed { peer: self.peer.clone(), stage: self.stage }
        } else {
            HandshakeError::Io { peer: self.peer.clone(), stage: self.stage, source: e }
        }
    }

    fn frame(&self, e: FrameError) -> HandshakeError {
        HandshakeError::Frame { peer: self.peer.clone(), stage: self.stage, source: e }
    }
}

/// Runs the handshake on a fresh connection (either side may have dialled)
/// and returns the accepted peer. Everything, refusal included, completes
/// within `timeout` (plus at most [`REFUSE_LINGER`] to deliver a Refuse).
///
/// On success the stream is positioned right after the peer's Welcome.
pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    local: &LocalHello,
    timeout: Duration,
) -> Result<PeerInfo, HandshakeError> {
    handshake_with(stream, local, &Expect::data_link(), timeout).await
}

/// What a side of a handshake accepts, beyond [`LocalHello`]: the versions
/// it speaks, and whether it takes any of several peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expect {
    /// Oldest and newest version this side speaks.
    pub versions: (u16, u16),
    /// `None`: the peer must be [`LocalHello::peer`]. `Some(names)` (the
    /// witness, which serves both data nodes): the peer may be any of
    /// `names`; this side reads the peer's Hello first and names that node
    /// as its peer in its own (the dialling side always writes first, so
    /// nobody waits for the other).
    pub any_of: Option<Vec<String>>,
}

impl Expect {
    /// The data link: [`MIN_PROTOCOL_VERSION`]..=[`PROTOCOL_VERSION`], the
    /// configured peer.
    pub fn data_link() -> Expect {
        Expect { versions: (MIN_PROTOCOL_VERSION, PROTOCOL_VERSION), any_of: None }
    }

    /// A data node dialling the witness: [`WITNESS_PROTOCOL_VERSION`] only.
    pub fn witness_link() -> Expect {
        Expect { versions: (WITNESS_PROTOCOL_VERSION, WITNESS_PROTOCOL_VERSION), any_of: None }
    }

    /// The witness accepting any of the data nodes `names`.
    pub fn witness_accepting(names: Vec<String>) -> Expect {
        Expect { versions: (WITNESS_PROTOCOL_VERSION, WITNESS_PROTOCOL_VERSION), any_of: Some(names) }
    }
}

/// [`handshake`] with explicit versions and peers (the witness link).
pub async fn handshake_with<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    local: &LocalHello,
    expect: &Expect,
    timeout: Duration,
) -> Result<PeerInfo, HandshakeError> {
    let deadline = Instant::now() + timeout;
    let mut progress = Progress { stage: "sending our hello", peer: local.peer.clone() };
    let err = match tokio::time::timeout_at(deadline, exchange(stream, local, expect, &mut progress)).await {
        Ok(Ok(info)) => {
            tracing::debug!(peer = %info.node, version = info.version, "replication handshake done");
            return Ok(info);
        }
        Ok(Err(e)) => e,
        Err(_) => HandshakeError::Timeout { peer: progress.peer, stage: progress.stage, after: timeout },
    };
    match &err {
        HandshakeError::Refused { reason, message, .. } => {
            let _ = tokio::time::timeout(REFUSE_LINGER, refuse_and_linger(stream, *reason, message)).await;
        }
        _ => {
            // Let the peer see end-of-stream at once rather than time out.
            let _ = tokio::time::timeout(REFUSE_LINGER, stream.shutdown()).await;
        }
    }
    Err(err)
}

/// Refuses a connection without a handshake (e.g. [`RefuseReason::AlreadyConnected`]
/// for a second connection from a peer that is already connected): sends
/// `Refuse`, shuts the write side and waits up to [`REFUSE_LINGER`] for the
/// peer to close. The peer's [`handshake`] fails with
/// [`HandshakeError::PeerRefused`].
pub async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    reason: RefuseReason,
    message: &str,
) -> io::Result<()> {
    match tokio::time::timeout(REFUSE_LINGER, refuse_and_linger(stream, reason, message)).await {
        Ok(r) => r,
        Err(_) => Ok(()),
    }
}

async fn refuse_and_linger<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    reason: RefuseReason,
    message: &str,
) -> io::Result<()> {
    let mut buf = BytesMut::new();
    encode(&Message::Refuse { reason, message: message.to_owned() }, &mut buf).map_err(io::Error::other)?;
    stream.write_all(&buf).await?;
    stream.flush().await?;
    stream.shutdown().await?;
    // Drain until the peer closes: closing with unread data could reset the
    // connection and lose the Refuse on its way.
    let mut sink = [0u8; 1024];
    while stream.read(&mut sink).await? > 0 {}
    Ok(())
}

/// The deterministic rule for "both sides dialled, two connections are up":
/// keep the connection dialled by the node whose name sorts lower (byte
/// order), close the other. Returns that node's name. Both nodes compute the
/// same answer without talking (names differ: the handshake refuses twins).
pub fn connection_winner<'a>(a_node: &'a str, b_node: &'a str) -> &'a str {
    if a_node.as_bytes() <= b_node.as_bytes() { a_node } else { b_node }
}

/// [`connection_winner`] from one node's point of view: should this node
/// keep a connection that it dialled (`dialled_by_us`) or accepted?
pub fn keep_connection(local_node: &str, peer_node: &str, dialled_by_us: bool) -> bool {
    let we_win = connection_winner(local_node, peer_node) == local_node;
    dialled_by_us == we_win
}

/// The version both sides speak: the newest in both ranges.
pub fn negotiate_version(ours: (u16, u16), theirs: (u16, u16)) -> Option<u16> {
    let lo = ours.0.max(theirs.0);
    let hi = ours.1.min(theirs.1);
    (lo <= hi).then_some(hi)
}

/// The MAC a node named `node` sends to prove it knows `secret`, over the
/// `challenge` (nonce) its peer sent:
/// HMAC-SHA256(secret, "repblock-auth-v1" ‖ challenge[32] ‖ u8 len ‖ node ‖ u8 len ‖ resource).
fn auth_mac(secret: &[u8], challenge: &[u8; 32], node: &str, resource: &str) -> Result<HmacSha256, HandshakeError> {
    let mut m = HmacSha256::new_from_slice(secret).map_err(|e| HandshakeError::Local(format!("HMAC key: {e}")))?;
    m.update(AUTH_LABEL);
    m.update(challenge);
    for s in [node, resource] {
        // Length-prefixed so ("ab", "c") and ("a", "bc") differ; names are
        // at most MAX_NAME_LEN (255) bytes, checked before.
        m.update(&[s.len() as u8]);
        m.update(s.as_bytes());
    }
    Ok(m)
}

/// Computes the Auth MAC (public for tests and tools).
pub fn compute_auth(
    secret: &[u8],
    challenge: &[u8; 32],
    node: &str,
    resource: &str,
) -> Result<[u8; 32], HandshakeError> {
    let tag = auth_mac(secret, challenge, node, resource)?.finalize().into_bytes();
    let mut out = [0u8; 32];
    out.copy_from_slice(&tag);
    Ok(out)
}

fn check_local(local: &LocalHello) -> Result<(), HandshakeError> {
    if local.secret.is_empty() {
        return Err(HandshakeError::Local("the shared secret is empty".into()));
    }
    for (field, name) in [("resource", &local.resource), ("node", &local.node), ("peer", &local.peer)] {
        if name.is_empty() || name.len() > MAX_NAME_LEN {
            return Err(HandshakeError::Local(format!("{field} name {name:?} must be 1 to {MAX_NAME_LEN} bytes")));
        }
    }
    Ok(())
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    local: &LocalHello,
    expect: &Expect,
    p: &mut Progress,
) -> Result<PeerInfo, HandshakeError> {
    check_local(local)?;
    let mut nonce = [0u8; 32];
    rand::rng().fill(&mut nonce);
    let me = &local.node;
    let (min_version, max_version) = expect.versions;
    let mut local_peer = local.peer.clone();

    let hello = |peer: &str| Hello {
        min_version,
        max_version,
        flags: 0,
        resource: local.resource.clone(),
        node: local.node.clone(),
        peer: peer.to_owned(),
        size: local.size,
        block_size: local.block_size,
        gen_ids: local.gen_ids,
        role: local.role,
        disk: local.disk,
        nonce,
    };
    if expect.any_of.is_none() {
        p.stage = "sending our hello";
        send(s, &Message::Hello(Box::new(hello(&local_peer))), p).await?;
    }

    p.stage = "reading the peer's hello";
    let theirs = match recv(s, p).await? {
        Message::Hello(h) => h,
        other => return Err(p.unexpected(&other)),
    };
    p.peer = theirs.node.clone();
    let them = &theirs.node;
    if let Some(names) = &expect.any_of {
        // Name the dialler as our peer if it is one we serve; otherwise the
        // identity check after authentication refuses it.
        if names.contains(them) {
            local_peer = them.clone();
        } else {
            local_peer = names.join(" or ");
        }
        p.stage = "sending our hello";
        send(s, &Message::Hello(Box::new(hello(&local_peer))), p).await?;
    }

    let Some(version) = negotiate_version((min_version, max_version), (theirs.min_version, theirs.max_version)) else {
        return Err(p.refuse(
            RefuseReason::IncompatibleVersion,
            format!(
                "no common protocol version ({me} speaks {min_version} to {max_version}, {them} speaks {} to {})",
                theirs.min_version, theirs.max_version
            ),
        ));
    };

    p.stage = "sending our auth";
    let mac = compute_auth(&local.secret, &theirs.nonce, &local.node, &local.resource)?;
    send(s, &Message::Auth { mac }, p).await?;

    p.stage = "reading the peer's auth";
    let their_mac = match recv(s, p).await? {
        Message::Auth { mac } => mac,
        other => return Err(p.unexpected(&other)),
    };
    // What the peer must have computed over OUR nonce, verified in constant
    // time.
    if auth_mac(&local.secret, &nonce, &theirs.node, &theirs.resource)?.verify_slice(&their_mac).is_err() {
        return Err(p.refuse(
            RefuseReason::WrongSecret,
            format!("authentication failed: {me} and {them} do not have the same shared secret"),
        ));
    }

    if theirs.resource != local.resource {
        return Err(p.refuse(
            RefuseReason::WrongResource,
            format!("resource mismatch ({me} serves {:?}, {them} serves {:?})", local.resource, theirs.resource),
        ));
    }
    if theirs.node == local.node {
        return Err(p.refuse(RefuseReason::WrongPeer, format!("both nodes are called {me:?}; node names must differ")));
    }
    if theirs.node != local_peer {
        return Err(p.refuse(
            RefuseReason::WrongPeer,
            format!("{me} expects its peer to be {local_peer:?}, the peer is {them:?}"),
        ));
    }
    if theirs.peer != local.node {
        return Err(
            p.refuse(RefuseReason::WrongPeer, format!("{them} expects its peer to be {:?}, not {me:?}", theirs.peer))
        );
    }
    if theirs.size != local.size {
        return Err(p.refuse(
            RefuseReason::SizeMismatch,
            format!("volume size mismatch ({me} {} bytes, {them} {} bytes)", local.size, theirs.size),
        ));
    }
    if theirs.block_size != local.block_size {
        return Err(p.refuse(
            RefuseReason::BlockSizeMismatch,
            format!("block size mismatch ({me} {} bytes, {them} {} bytes)", local.block_size, theirs.block_size),
        ));
    }

    p.stage = "sending our welcome";
    send(s, &Message::Welcome { version }, p).await?;

    p.stage = "reading the peer's welcome";
    match recv(s, p).await? {
        Message::Welcome { version: v } if v == version => {}
        Message::Welcome { version: v } => {
            return Err(p.refuse(
                RefuseReason::IncompatibleVersion,
                format!("{them} welcomed version {v}, {me} computed version {version} from the same hellos"),
            ));
        }
        other => return Err(p.unexpected(&other)),
    }

    Ok(PeerInfo {
        node: theirs.node,
        version,
        size: theirs.size,
        block_size: theirs.block_size,
        gen_ids: theirs.gen_ids,
        role: theirs.role,
        disk: theirs.disk,
        flags: theirs.flags,
    })
}

async fn send<S: AsyncWrite + Unpin>(s: &mut S, m: &Message, p: &Progress) -> Result<(), HandshakeError> {
    let mut buf = BytesMut::new();
    encode(m, &mut buf).map_err(|e| HandshakeError::Local(e.to_string()))?;
    s.write_all(&buf).await.map_err(|e| p.io(e))?;
    s.flush().await.map_err(|e| p.io(e))
}

/// Reads exactly one frame: the magic first (garbage is refused after 4
/// bytes), then the rest of the header, then the payload.
async fn recv<S: AsyncRead + Unpin>(s: &mut S, p: &Progress) -> Result<Message, HandshakeError> {
    let mut buf = BytesMut::new();
    read_more(s, &mut buf, 4, p).await?;
    check(&buf).map_err(|e| p.frame(e))?;
    read_more(s, &mut buf, FRAME_HEADER_LEN - 4, p).await?;
    let len = match check(&buf).map_err(|e| p.frame(e))? {
        // A whole frame with an empty payload.
        Some((h, _)) => h.len as usize,
        None => u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]) as usize,
    };
    if len > MAX_HANDSHAKE_PAYLOAD {
        return Err(p.frame(FrameError::TooLarge {
            msg_type: u16::from_le_bytes([buf[4], buf[5]]),
            len: len as u32,
            max: MAX_HANDSHAKE_PAYLOAD,
        }));
    }
    read_more(s, &mut buf, len, p).await?;
    match decode(&mut buf).map_err(|e| p.frame(e))? {
        Some(m) => Ok(m),
        None => Err(p.frame(FrameError::Malformed {
            msg: "handshake frame",
            detail: "incomplete after reading its announced length".into(),
        })),
    }
}

async fn read_more<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut BytesMut,
    n: usize,
    p: &Progress,
) -> Result<(), HandshakeError> {
    let at = buf.len();
    buf.resize(at + n, 0);
    s.read_exact(&mut buf[at..]).await.map_err(|e| p.io(e))?;
    Ok(())
}

#[cfg(test)]
#[path = "handshake_tests.rs"]
mod tests;
