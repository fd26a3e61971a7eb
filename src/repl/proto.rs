//! Replication wire protocol: frames, messages and their codec.
//!
//! Every message travels in one frame. All integers are little-endian; every
//! layout is drawn above the code that writes it, and docs/replication-protocol.md
//! repeats them byte by byte.
//!
//! Nothing here does IO: [`decode`] takes the bytes received so far and
//! returns a whole message, `Ok(None)` ("not a whole frame yet"), or a
//! [`FrameError`] after which the connection must be dropped (a bad frame is
//! never applied). Data payloads are zero-copy: the `data` of
//! [`Message::Write`] and [`Message::SyncData`] is a slice of the receive
//! buffer. The async reader/writer pair built on this lives in
//! [`super::link`].

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::model::{DiskState, GenIds, Lsn, ResyncKind, Role};

// ---------------------------------------------------------------------------
// Versions.
// ---------------------------------------------------------------------------

/// Newest protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 2;
/// Oldest protocol version this build still speaks. Version 1 had no
/// SyncInfo exchange (every reconnect was a full sync); a version-1 peer is
/// refused with `incompatible-version`.
pub const MIN_PROTOCOL_VERSION: u16 = 2;
/// The version the witness link speaks (docs/replication-protocol.md,
/// "Version 3"): data nodes dial the witness with exactly this version. The
/// data link still speaks [`PROTOCOL_VERSION`] until the terms are wired
/// into the session.
pub const WITNESS_PROTOCOL_VERSION: u16 = 3;

// ---------------------------------------------------------------------------
// Frames.
// ---------------------------------------------------------------------------

/// `"RBRP"` as it appears on the wire (little-endian u32 of those 4 bytes).
pub const FRAME_MAGIC: u32 = u32::from_le_bytes(*b"RBRP");
/// Bytes of the frame header.
pub const FRAME_HEADER_LEN: usize = 16;
/// Largest `data` carried by one Write or SyncData message (32 MiB, the NBD
/// maximum request size).
pub const MAX_DATA_LEN: usize = 32 << 20;
/// Largest payload of any frame: the largest data plus room for the fixed
/// fields. A header announcing more is rejected before its payload arrives.
pub const MAX_PAYLOAD_LEN: usize = MAX_DATA_LEN + 4096;
/// Longest resource or node name in a Hello (the config allows 64).
pub const MAX_NAME_LEN: usize = 255;
/// Longest human-readable message (Refuse, Goodbye); longer ones are cut at
/// a character boundary when encoded.
pub const MAX_MESSAGE_LEN: usize = 1024;

/// Bytes of one verify digest (BLAKE3 output cut to 128 bits).
pub const VERIFY_DIGEST_LEN: usize = 16;
/// Most digest bytes in one VerifyDigests (an 8 MiB chunk of 512-byte
/// blocks).
pub const MAX_VERIFY_DIGEST_BYTES: usize = (8 << 20) / 512 * VERIFY_DIGEST_LEN;
/// Most mismatched runs in one VerifyResult (every other block of such a
/// chunk).
pub const MAX_VERIFY_RUNS: usize = (8 << 20) / 512 / 2 + 1;

/// Bits of the per-message `flags` byte of Write, Trim and Zeroes.
pub const OP_FLAG_FUA: u8 = 1 << 0;
/// Zeroes only: the range may be deallocated (NBD without NO_HOLE).
pub const OP_FLAG_PUNCH: u8 = 1 << 1;

/// Bits of [`SyncInfo::flags`].
pub mod sync_flags {
    /// A probe (`repctl connect --dry-run`): exchange SyncInfo, report the
    /// decision, say Goodbye; neither side changes anything.
    pub const DRY_RUN: u32 = 1 << 0;
    /// The sender's operator asked to discard its data (`repctl connect
    /// --discard-my-data`, one shot).
    pub const DISCARD_MY_DATA: u32 = 1 << 1;
    /// The sender is standalone (`repctl disconnect`, split brain): it
    /// answers probes only and closes any other connection.
    pub const STANDALONE: u32 = 1 << 2;
    /// Every flag this version knows.
    pub const KNOWN: u32 = DRY_RUN | DISCARD_MY_DATA | STANDALONE;
}

/// Most words one [`Message::BitmapChunk`] may carry (so that its payload
/// stays under [`MAX_PAYLOAD_LEN`]).
pub const MAX_BITMAP_WORDS: usize = MAX_DATA_LEN / 8;

/// Message type codes (the `type` field of the frame header). Gaps leave
/// room for related messages in later versions; 0x40..=0x4f is reserved
/// for online verify (src/repl/verify.rs).
pub mod msg_type {
    pub const HELLO: u16 = 1;
    pub const AUTH: u16 = 2;
    pub const WELCOME: u16 = 3;
    pub const REFUSE: u16 = 4;
    pub const STATE: u16 = 16;
    pub const WRITE: u16 = 32;
    pub const TRIM: u16 = 33;
    pub const ZEROES: u16 = 34;
    pub const BARRIER: u16 = 35;
    pub const ACK: u16 = 48;
    pub const PING: u16 = 80;
    pub const PONG: u16 = 81;
    pub const GOODBYE: u16 = 96;
    // Resync (version 2; version 1 had SyncStart..SyncAck at 64..67).
    pub const SYNC_INFO: u16 = 112;
    pub const BITMAP_CHUNK: u16 = 113;
    pub const BITMAP_END: u16 = 114;
    pub const SYNC_START: u16 = 116;
    pub const SYNC_DATA: u16 = 117;
    pub const SYNC_END: u16 = 118;
    pub const SYNC_ACK: u16 = 119;
    // Online verify (version 2; src/repl/verify.rs), 0x40..=0x4f.
    pub const VERIFY_REQUEST: u16 = 0x40;
    pub const VERIFY_START: u16 = 0x41;
    pub const VERIFY_DIGESTS: u16 = 0x42;
    pub const VERIFY_RESULT: u16 = 0x43;
    pub const VERIFY_END: u16 = 0x44;
    // Version 3: the witness link (128..=143 reserved).
    pub const CLAIM: u16 = 128;
    pub const SOLO: u16 = 129;
    pub const PEER_UPTODATE: u16 = 130;
    pub const RELEASE: u16 = 131;
    pub const GRANT: u16 = 132;
    pub const REFUSED: u16 = 133;
    pub const TERM_REFUSE: u16 = 134;
}

/// Errors of the frame codec. Any of them ends the connection: the stream
/// cannot be resynchronised after a bad frame, and nothing of it is applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("Bad frame magic {found:#010x} (expected {FRAME_MAGIC:#010x} \"RBRP\")")]
    BadMagic { found: u32 },
    #[error("Frame of type {msg_type} announces {len} payload bytes, more than the maximum {max}")]
    TooLarge { msg_type: u16, len: u32, max: usize },
    #[error(
        "Bad frame CRC (type {msg_type}, {len} payload bytes): header says {expected:#010x}, computed {computed:#010x}"
    )]
    BadCrc { msg_type: u16, len: u32, expected: u32, computed: u32 },
    #[error("Unknown message type {msg_type} ({len} payload bytes)")]
    UnknownType { msg_type: u16, len: u32 },
    #[error("{msg}: unknown frame flags {flags:#06x} (none are defined in protocol version {PROTOCOL_VERSION})")]
    UnknownFrameFlags { msg: &'static str, flags: u16 },
    #[error("Malformed {msg}: {detail}")]
    Malformed { msg: &'static str, detail: String },
    #[error("Cannot encode {msg}: {detail}")]
    Unencodable { msg: &'static str, detail: String },
}

// ---------------------------------------------------------------------------
// Vocabulary carried by messages.
// ---------------------------------------------------------------------------

// Role, DiskState, ResyncKind and GenIds, with their byte codes, are
// defined once in `crate::model` (the superblock stores the same disk state
// byte). Codes: role | primary 1 | secondary 2 |; disk state | unknown 0 |
// uptodate 1 | consistent 2 | outdated 3 | inconsistent 4 | diskless 5 |;
// resync kind | log 1 | bitmap 2 | full 3 |; GenIds (48 bytes) | current u64 |
// bitmap u64 | history 4 x u64 |.

/// What each side sends first after the handshake: its view of the data
/// (the inputs of the resync decision, src/repl/decide.rs) plus the bitmap
/// granularity and the session flags.
///
/// Format (SyncInfo, 100 bytes):
/// | role u8 | disk u8 | reserved u16 = 0 | granularity u32 | flags u32 |
/// | gen.current u64 | gen.bitmap u64 | gen.history 4 x u64 | gen_created_ms u64 |
/// | local_lsn u64 | dirty_bytes u64 | bitmap_base_lsn u64 | log_first_lsn u64 |
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncInfo {
    pub role: Role,
    pub disk: DiskState,
    /// Bytes per dirty-bitmap bit (power of two).
    pub granularity: u32,
    /// [`sync_flags`] bits; unknown bits are refused.
    pub flags: u32,
    pub gen_ids: GenIds,
    /// Unix milliseconds when `gen_ids.current` was made.
    pub gen_created_ms: u64,
    /// Highest LSN applied locally.
    pub local_lsn: Lsn,
    /// Bytes covered by set bits of the sender's bitmap.
    pub dirty_bytes: u64,
    /// The bitmap covers every block written by a record with LSN > this.
    pub bitmap_base_lsn: Lsn,
    /// Oldest LSN still in the sender's WAL (`local_lsn + 1` if none).
    pub log_first_lsn: Lsn,
}

impl SyncInfo {
    pub fn dry_run(&self) -> bool {
        self.flags & sync_flags::DRY_RUN != 0
    }

    pub fn discard_my_data(&self) -> bool {
        self.flags & sync_flags::DISCARD_MY_DATA != 0
    }
}

const SYNC_INFO_LEN: usize = 1 + 1 + 2 + 4 + 4 + 6 * 8 + 5 * 8;

/// Why a handshake was refused. Wire codes are given per variant; an unknown code is
/// read as [`RefuseReason::Other`] (a newer peer may know more reasons).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefuseReason {
    /// Code 1: The peer's Auth does not match the shared secret.
    WrongSecret,
    /// Code 2: The peer serves another resource.
    WrongResource,
    /// Code 3: The peer is not the node our config names (or does not expect us).
    WrongPeer,
    /// Code 4: The volumes differ in size.
    SizeMismatch,
    /// Code 5: The volumes differ in block size.
    BlockSizeMismatch,
    /// Code 6: No protocol version both sides speak.
    IncompatibleVersion,
    /// Code 7: A connection with this peer is already established.
    AlreadyConnected,
    /// Code 255: Anything else; the message says what.
    Other,
}

impl RefuseReason {
    pub fn code(self) -> u16 {
        match self {
            RefuseReason::WrongSecret => 1,
            RefuseReason::WrongResource => 2,
            RefuseReason::WrongPeer => 3,
            RefuseReason::SizeMismatch => 4,
            RefuseReason::BlockSizeMismatch => 5,
            RefuseReason::IncompatibleVersion => 6,
            RefuseReason::AlreadyConnected => 7,
            RefuseReason::Other => 255,
        }
    }

    pub fn from_code(code: u16) -> RefuseReason {
        match code {
            1 => RefuseReason::WrongSecret,
            2 => RefuseReason::WrongResource,
            3 => RefuseReason::WrongPeer,
            4 => RefuseReason::SizeMismatch,
            5 => RefuseReason::BlockSizeMismatch,
            6 => RefuseReason::IncompatibleVersion,
            7 => RefuseReason::AlreadyConnected,
            _ => RefuseReason::Other,
        }
    }

    /// Short name for logs (`wrong-secret`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            RefuseReason::WrongSecret => "wrong-secret",
            RefuseReason::WrongResource => "wrong-resource",
            RefuseReason::WrongPeer => "wrong-peer",
            RefuseReason::SizeMismatch => "size-mismatch",
            RefuseReason::BlockSizeMismatch => "block-size-mismatch",
            RefuseReason::IncompatibleVersion => "incompatible-version",
            RefuseReason::AlreadyConnected => "already-connected",
            RefuseReason::Other => "other",
        }
    }
}

impl std::fmt::Display for RefuseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a peer closes an established connection. Wire codes are given per variant; an
/// unknown code is read as [`GoodbyeReason::Other`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GoodbyeReason {
    /// Code 1: The daemon is stopping; reconnect when it is back.
    Shutdown,
    /// Code 2: An operator ran `disconnect`: do not reconnect until told to.
    Disconnect,
    /// Code 3: Both sides wrote since their last common generation.
    SplitBrain,
    /// Code 4: The generation ids share no history: the data is unrelated.
    UnrelatedData,
    /// Code 5: The peer broke the protocol (unexpected message, LSN gap...).
    ProtocolError,
    /// Code 255: Anything else; the message says what.
    Other,
}

impl GoodbyeReason {
    pub fn code(self) -> u16 {
        match self {
            GoodbyeReason::Shutdown => 1,
            GoodbyeReason::Disconnect => 2,
            GoodbyeReason::SplitBrain => 3,
            GoodbyeReason::UnrelatedData => 4,
            GoodbyeReason::ProtocolError => 5,
            GoodbyeReason::Other => 255,
        }
    }

    pub fn from_code(code: u16) -> GoodbyeReason {
        match code {
            1 => GoodbyeReason::Shutdown,
            2 => GoodbyeReason::Disconnect,
            3 => GoodbyeReason::SplitBrain,
            4 => GoodbyeReason::UnrelatedData,
            5 => GoodbyeReason::ProtocolError,
            _ => GoodbyeReason::Other,
        }
    }

    /// Short name for logs (`shutdown`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            GoodbyeReason::Shutdown => "shutdown",
            GoodbyeReason::Disconnect => "disconnect",
            GoodbyeReason::SplitBrain => "split-brain",
            GoodbyeReason::UnrelatedData => "unrelated-data",
            GoodbyeReason::ProtocolError => "protocol-error",
            GoodbyeReason::Other => "other",
        }
    }
}

impl std::fmt::Display for GoodbyeReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

// ---------------------------------------------------------------------------
// Messages.
// ---------------------------------------------------------------------------

/// The Hello each side sends first (see [`Message::Hello`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Oldest protocol version the sender speaks.
    pub min_version: u16,
    /// Newest protocol version the sender speaks.
    pub max_version: u16,
    /// Feature bits. None are defined in version 1: send 0, ignore unknown
    /// bits (a feature is used only when both sides set it).
    pub flags: u32,
    /// Resource name.
    pub resource: String,
    /// The sender's node name.
    pub node: String,
    /// The node name the sender expects to talk to.
    pub peer: String,
    /// Volume size in bytes.
    pub size: u64,
    /// Block size in bytes (the dirty bitmap's granularity).
    pub block_size: u32,
    pub gen_ids: GenIds,
    pub role: Role,
    pub disk: DiskState,
    /// Fresh random challenge; the peer's Auth is a MAC over it.
    pub nonce: [u8; 32],
}

/// Node index meaning "none" on the witness link.
pub const NO_NODE: u8 = 0xff;

/// Pong flag bits (version 3).
pub mod pong_flags {
    /// The answerer follows the pinger as primary of `term`: the pinger's
    /// lease is renewed from the echoed send time.
    pub const PRIMARY_OK: u8 = 1 << 0;
    /// `primary` and `uptodate` hold the witness's record.
    pub const VIEW: u8 = 1 << 1;
    pub const KNOWN: u8 = PRIMARY_OK | VIEW;
}

/// The witness's record as a Pong, Grant or Refused carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WitnessView {
    pub term: u64,
    /// Node index of the primary, `None` for 0xff.
    pub primary: Option<u8>,
    /// Bit `i`: node `i` is up to date.
    pub uptodate: u8,
}

/// A version-3 Pong (32 bytes).
///
/// Format (Pong v3): | seq u64 | echo_sent_ns u64 | term u64 | flags u8 |
/// | primary u8 | uptodate u8 | reserved 5 |
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TermPong {
    pub seq: u64,
    /// The Ping's `sent_ns`, echoed unchanged.
    pub echo_sent_ns: u64,
    /// The answering node's term.
    pub term: u64,
    /// [`pong_flags::PRIMARY_OK`].
    pub primary_ok: bool,
    /// The witness's primary and uptodate mask ([`pong_flags::VIEW`]); the
    /// view's term is `term`.
    pub view: Option<(Option<u8>, u8)>,
}

/// One replication message.
///
/// Version history (bump [`PROTOCOL_VERSION`] and add a line for every change
/// to a message layout, a type code or a rule of the exchange; Hello, Refuse
/// and the frame header are frozen forever, since they negotiate the
/// version):
///
/// - **1** (repblock 0.1): frame `| magic "RBRP" | type u16 | flags u16 | len u32 | crc32c u32 |`;
///   handshake Hello / Auth (HMAC-SHA256, label `repblock-auth-v1`) /
///   Welcome / Refuse; State; log stream Write / Trim / Zeroes / Barrier;
///   cumulative Ack (received, written, durable); full sync SyncStart /
///   SyncData / SyncEnd / SyncAck; Ping / Pong; Goodbye.
/// - **2** (resync): SyncInfo exchanged first after Welcome (the
///   decision inputs, bitmap granularity, DRY_RUN / DISCARD_MY_DATA flags);
///   BitmapChunk / BitmapEnd; SyncStart carries `kind` (log, bitmap, full);
///   SyncAck counts *durable* bytes; resync messages moved to 112..=119
///   (0x40..=0x4f reserved for verify). Version 1 is no longer spoken.
///   Later, still as version 2 (an exception to the rule above, not a
///   precedent): online verify, VerifyRequest / VerifyStart / VerifyDigests /
///   VerifyResult / VerifyEnd at 0x40..=0x44 (src/repl/verify.rs). They use
///   the range version 2 reserved and are sent only when an operator runs
///   `verify`; a version-2 node built before them fails to decode one
///   (`FrameError::UnknownType`) and the session ends. The next change to
///   the exchange bumps to 3.
/// - **3** (failover, docs/replication-protocol.md "Version 3"): Ping and
///   Pong with the term (24 and 32 bytes; the 16-byte forms stay version
///   2's), Claim / Solo / PeerUptodate / Release, Grant / Refused,
///   TermRefuse at 128..=134. Spoken on the witness link
///   ([`WITNESS_PROTOCOL_VERSION`]); the data link still negotiates 2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    // --- Handshake -------------------------------------------------------
    //
    // Format (Hello, payload):
    // | min_version u16 | max_version u16 | flags u32 | size u64 | block_size u32 |
    // | role u8 | disk u8 | reserved u16 = 0 |
    // | gen.current u64 | gen.bitmap u64 | gen.history 4 x u64 | nonce [32] |
    // | resource_len u8 | resource | node_len u8 | node | peer_len u8 | peer |
    // 104 fixed bytes, then three UTF-8 names of 1..=255 bytes.
    Hello(Box<Hello>),
    // Format (Auth): | mac [32] |
    /// HMAC-SHA256 proving knowledge of the shared secret (see handshake.rs).
    Auth {
        mac: [u8; 32],
    },
    // Format (Welcome): | version u16 |
    /// The sender accepted the peer; `version` is the one both will speak.
    Welcome {
        version: u16,
    },
    // Format (Refuse): | reason u16 | message_len u16 | message (UTF-8) |
    /// The sender refuses the connection and closes it.
    Refuse {
        reason: RefuseReason,
        message: String,
    },

    // --- State -----------------------------------------------------------
    //
    // Format (State): | role u8 | disk u8 | reserved u16 = 0 | out_of_sync_bytes u64 |
    /// The sender's role or disk state changed.
    State {
        role: Role,
        disk: DiskState,
        out_of_sync_bytes: u64,
    },

    // --- Log stream, primary -> secondary, in LSN order --------------------
    //
    // Format (Write): | lsn u64 | offset u64 | flags u8 (bit 0 FUA) | data (rest of the payload) |
    Write {
        lsn: Lsn,
        offset: u64,
        fua: bool,
        data: Bytes,
    },
    // Format (Trim): | lsn u64 | offset u64 | len u32 | flags u8 (bit 0 FUA) |
    Trim {
        lsn: Lsn,
        offset: u64,
        len: u32,
        fua: bool,
    },
    // Format (Zeroes): | lsn u64 | offset u64 | len u32 | flags u8 (bit 0 FUA, bit 1 PUNCH) |
    Zeroes {
        lsn: Lsn,
        offset: u64,
        len: u32,
        punch: bool,
        fua: bool,
    },
    // Format (Barrier): | upto_lsn u64 |
    /// The receiver makes everything up to `upto_lsn` durable and acks it.
    Barrier {
        upto_lsn: Lsn,
    },

    // --- Acks, secondary -> primary, cumulative ---------------------------
    //
    // Format (Ack): | received u64 | written u64 | durable u64 |
    /// Everything up to `received` arrived, up to `written` is in the
    /// receiver's WAL and data file, up to `durable` is fdatasync'ed.
    Ack {
        received: Lsn,
        written: Lsn,
        durable: Lsn,
    },

    // --- Resync, in the same ordered stream as the log (version 2) ---------
    //
    // Format (SyncInfo): see [`SyncInfo`] (100 bytes).
    /// Both sides send it first after Welcome; both compute the decision
    /// from the two views.
    SyncInfo(Box<SyncInfo>),
    // Format (BitmapChunk): | first_word u64 | count u32 | words count x u64 |
    /// Sync target -> source when the decision is Bitmap: a run of the
    /// target's bitmap words starting at word `first_word` (bit `i` of word
    /// `w` covers block `64 w + i`); all-zero words are skipped.
    BitmapChunk {
        first_word: u64,
        words: Vec<u64>,
    },
    // Format (BitmapEnd): | total_words u64 |
    /// The target's bitmap has been sent; `total_words` is its length (the
    /// source checks it against its own).
    BitmapEnd {
        total_words: u64,
    },
    // Format (SyncStart): | kind u8 | reserved [3] = 0 | total_bytes u64 | start_lsn u64 |
    /// A resync begins. Bitmap / full: the log continues at `start_lsn + 1`
    /// after it. Log: the records `start_lsn + 1 ..` follow.
    SyncStart {
        kind: ResyncKind,
        total_bytes: u64,
        start_lsn: Lsn,
    },
    // Format (SyncData): | offset u64 | data (rest of the payload) |
    SyncData {
        offset: u64,
        data: Bytes,
    },
    // Format (SyncEnd): | bytes u64 |
    /// The resync is complete; `bytes` were sent.
    SyncEnd {
        bytes: u64,
    },
    // Format (SyncAck): | done_bytes u64 | written_bytes u64 |
    /// Target -> source: cumulative resync bytes the target has *durable*
    /// (data file fdatasync'ed) and *written* (applied), both counted in the
    /// order SyncData was sent. The source bounds the resync data in flight
    /// ahead of application writes with `written_bytes`.
    SyncAck {
        done_bytes: u64,
        written_bytes: u64,
    },

    // --- Heartbeat ---------------------------------------------------------
    //
    // Format (Ping, Pong): | seq u64 | sent_ns u64 |
    Ping {
        seq: u64,
        sent_ns: u64,
    },
    /// Echoes the Ping's fields.
    Pong {
        seq: u64,
        sent_ns: u64,
    },

    // Format (Goodbye): | reason u16 | message_len u16 | message (UTF-8) |
    /// Orderly disconnect.
    Goodbye {
        reason: GoodbyeReason,
        message: String,
    },

    // --- Online verify (src/repl/verify.rs, docs/verify.md) ---------------
    //
    // The verify source is the primary (or, with two secondaries, the node
    // the operator asked); its digests travel in the ordered stream, after
    // every record committed before the read they describe.
    //
    // Format (VerifyRequest): | reserved u32 = 0 |
    /// Secondary -> primary: the operator ran `verify` on the secondary; the
    /// primary runs it (its data and its stream order are the reference).
    VerifyRequest,
    // Format (VerifyStart): | total_bytes u64 | block u32 | reserved u32 = 0 |
    /// Source -> target: a verify of `[0, total_bytes)` starts, with one
    /// digest per `block` bytes.
    VerifyStart {
        total_bytes: u64,
        block: u32,
    },
    // Format (VerifyDigests): | offset u64 | block u32 | count u32 |
    //                         | digests: count x 16 bytes (BLAKE3, first 16 bytes) |
    /// Source -> target: the digests of `[offset, offset + len)` read in
    /// stream order, one per `block` bytes (the last one may cover less, at
    /// the end of the volume). `len` is not sent: the target compares
    /// `min(count * block, size - offset)` bytes.
    VerifyDigests {
        offset: u64,
        block: u32,
        digests: Bytes,
    },
    // Format (VerifyResult): | offset u64 | len u32 | count u32 |
    //                        | runs: count x (offset u64 | len u32) |
    /// Target -> source: the chunk `[offset, offset + len)` was compared;
    /// `mismatched` lists the differing ranges (ascending, inside the chunk,
    /// whole blocks).
    VerifyResult {
        offset: u64,
        len: u32,
        mismatched: Vec<(u64, u32)>,
    },
    // Format (VerifyEnd): | checked_bytes u64 | out_of_sync_bytes u64 |
    //                     | status u16 | message_len u16 | message (UTF-8) |
    /// Source -> target (or to the secondary that asked): the verify ended;
    /// status 0 = complete, 1 = aborted or refused (the message says why).
    VerifyEnd {
        checked_bytes: u64,
        out_of_sync_bytes: u64,
        complete: bool,
        message: String,
    },

    // --- Version 3: terms and the witness link ------------------------------
    //
    // Format (Ping v3): | seq u64 | sent_ns u64 | term u64 | (24 bytes; a
    // 16-byte Ping is version 2's [`Message::Ping`])
    /// A heartbeat carrying the sender's term; `sent_ns` is its
    /// `CLOCK_BOOTTIME`.
    TermPing {
        seq: u64,
        sent_ns: u64,
        term: u64,
    },
    // Format (Pong v3): see [`TermPong`] (32 bytes).
    TermPong(TermPong),
    // Format (Claim): | term u64 | node u8 | forced u8 | reserved 6 |
    //                 | gen_current u64 | lsn_local u64 | last_heard_primary_ms u64 |
    /// Data node -> witness: make `node` primary of `term + 1`.
    Claim {
        term: u64,
        node: u8,
        forced: bool,
        gen_current: u64,
        lsn_local: u64,
        last_heard_primary_ms: u64,
    },
    // Format (Solo, Release): | term u64 | node u8 | reserved 7 |
    /// Data node -> witness: the primary of `term` goes on without its peer.
    Solo {
        term: u64,
        node: u8,
    },
    // Format (PeerUptodate): | term u64 | node u8 | peer u8 | reserved 6 |
    /// Data node -> witness: the primary's peer finished its resync.
    PeerUptodate {
        term: u64,
        node: u8,
        peer: u8,
    },
    /// Data node -> witness: the primary of `term` stopped serving.
    Release {
        term: u64,
        node: u8,
    },
    // Format (Grant): | request u16 | reserved 6 | request_term u64 | term u64 |
    //                 | primary u8 | uptodate u8 | reserved 6 |
    /// Witness -> data node: the request (its type code and term) was
    /// granted; the witness's record is now `view` (durable).
    Grant {
        request: u16,
        request_term: u64,
        view: WitnessView,
    },
    // Format (Refused): | request u16 | reason u8 | flags u8 (bit 0 VIEW) | reserved 4 |
    //                   | request_term u64 | term u64 | primary u8 | uptodate u8 | reserved 6 |
    /// Witness -> data node: the request was refused for `reason`
    /// (`failover::RefuseReason::code`); `view` is the witness's record
    /// (`None`: it has no state).
    Refused {
        request: u16,
        reason: u8,
        request_term: u64,
        view: Option<WitnessView>,
    },
    // Format (TermRefuse): | higher_term u64 |
    /// The sender's term is higher than the one the receiver's session or
    /// frame carries; the connection is closed after it.
    TermRefuse {
        higher_term: u64,
    },
}

impl Message {
    /// The frame type code.
    pub fn msg_type(&self) -> u16 {
        use msg_type::*;
        match self {
            Message::Hello(_) => HELLO,
            Message::Auth { .. } => AUTH,
            Message::Welcome { .. } => WELCOME,
            Message::Refuse { .. } => REFUSE,
            Message::State { .. } => STATE,
            Message::Write { .. } => WRITE,
            Message::Trim { .. } => TRIM,
            Message::Zeroes { .. } => ZEROES,
            Message::Barrier { .. } => BARRIER,
            Message::Ack { .. } => ACK,
            Message::SyncInfo(_) => SYNC_INFO,
            Message::BitmapChunk { .. } => BITMAP_CHUNK,
            Message::BitmapEnd { .. } => BITMAP_END,
            Message::SyncStart { .. } => SYNC_START,
            Message::SyncData { .. } => SYNC_DATA,
            Message::SyncEnd { .. } => SYNC_END,
            Message::SyncAck { .. } => SYNC_ACK,
            Message::Ping { .. } => PING,
            Message::Pong { .. } => PONG,
            Message::Goodbye { .. } => GOODBYE,
            Message::VerifyRequest => VERIFY_REQUEST,
            Message::VerifyStart { .. } => VERIFY_START,
            Message::VerifyDigests { .. } => VERIFY_DIGESTS,
            Message::VerifyResult { .. } => VERIFY_RESULT,
            Message::VerifyEnd { .. } => VERIFY_END,
            Message::TermPing { .. } => PING,
            Message::TermPong(_) => PONG,
            Message::Claim { .. } => CLAIM,
            Message::Solo { .. } => SOLO,
            Message::PeerUptodate { .. } => PEER_UPTODATE,
            Message::Release { .. } => RELEASE,
            Message::Grant { .. } => GRANT,
            Message::Refused { .. } => REFUSED,
            Message::TermRefuse { .. } => TERM_REFUSE,
        }
    }

    /// Whether this is an online-verify message (src/repl/verify.rs).
    pub fn is_verify(&self) -> bool {
        matches!(
            self,
            Message::VerifyRequest
                | Message::VerifyStart { .. }
                | Message::VerifyDigests { .. }
                | Message::VerifyResult { .. }
                | Message::VerifyEnd { .. }
        )
    }

    /// The message's name, for logs and errors.
    pub fn name(&self) -> &'static str {
        type_name(self.msg_type()).unwrap_or("unknown")
    }

    /// The trailing data of Write and SyncData (sent without a copy by
    /// [`super::link::FrameWriter`]).
    pub fn data(&self) -> Option<&Bytes> {
        match self {
            Message::Write { data, .. } | Message::SyncData { data, .. } => Some(data),
            _ => None,
        }
    }

    /// The LSN of a log record (Write, Trim, Zeroes), if this is one.
    pub fn lsn(&self) -> Option<Lsn> {
        match self {
            Message::Write { lsn, .. } | Message::Trim { lsn, .. } | Message::Zeroes { lsn, .. } => Some(*lsn),
            _ => None,
        }
    }

    /// Size of the encoded frame, header included.
    pub fn encoded_len(&self) -> usize {
        FRAME_HEADER_LEN + self.fixed_len() + self.data().map_or(0, |d| d.len())
    }

    /// Bytes of the payload before the trailing data.
    fn fixed_len(&self) -> usize {
        match self {
            Message::Hello(h) => HELLO_FIXED_LEN + 3 + h.resource.len() + h.node.len() + h.peer.len(),
            Message::Auth { .. } => 32,
            Message::Welcome { .. } => 2,
            Message::Refuse { message, .. } | Message::Goodbye { message, .. } => 4 + cut(message).len(),
            Message::State { .. } => 12,
            Message::Write { .. } => 17,
            Message::Trim { .. } => 21,
            Message::Zeroes { .. } => 21,
            Message::Barrier { .. } => 8,
            Message::Ack { .. } => 24,
            Message::SyncInfo(_) => SYNC_INFO_LEN,
            Message::BitmapChunk { words, .. } => 12 + 8 * words.len(),
            Message::BitmapEnd { .. } => 8,
            Message::SyncStart { .. } => 20,
            Message::SyncData { .. } => 8,
            Message::SyncEnd { .. } => 8,
            Message::SyncAck { .. } => 16,
            Message::Ping { .. } | Message::Pong { .. } => 16,
            Message::VerifyRequest => 4,
            Message::VerifyStart { .. } => 16,
            Message::VerifyDigests { digests, .. } => 16 + digests.len(),
            Message::VerifyResult { mismatched, .. } => 16 + 12 * mismatched.len(),
            Message::VerifyEnd { message, .. } => 20 + cut(message).len(),
            Message::TermPing { .. } => 24,
            Message::TermPong(_) => 32,
            Message::Claim { .. } => 40,
            Message::Solo { .. } | Message::PeerUptodate { .. } | Message::Release { .. } => 16,
            Message::Grant { .. } | Message::Refused { .. } => 32,
            Message::TermRefuse { .. } => 8,
        }
    }

    /// Writes the payload except the trailing data.
    fn put_fixed(&self, b: &mut BytesMut) -> Result<(), FrameError> {
        match self {
            Message::Hello(h) => {
                b.put_u16_le(h.min_version);
                b.put_u16_le(h.max_version);
                b.put_u32_le(h.flags);
                b.put_u64_le(h.size);
                b.put_u32_le(h.block_size);
                b.put_u8(Role::code(h.role));
                b.put_u8(DiskState::code(h.disk));
                b.put_u16_le(0);
                b.put_u64_le(h.gen_ids.current);
                b.put_u64_le(h.gen_ids.bitmap);
                for g in h.gen_ids.history {
                    b.put_u64_le(g);
                }
                b.put_slice(&h.nonce);
                for (field, name) in [("resource", &h.resource), ("node", &h.node), ("peer", &h.peer)] {
                    if name.is_empty() || name.len() > MAX_NAME_LEN {
                        return Err(FrameError::Unencodable {
                            msg: "hello",
                            detail: format!("{field} name must be 1 to {MAX_NAME_LEN} bytes, got {}", name.len()),
                        });
                    }
                    b.put_u8(name.len() as u8);
                    b.put_slice(name.as_bytes());
                }
            }
            Message::Auth { mac } => b.put_slice(mac),
            Message::Welcome { version } => b.put_u16_le(*version),
            Message::Refuse { reason, message } => put_text(b, reason.code(), message),
            Message::Goodbye { reason, message } => put_text(b, reason.code(), message),
            Message::State { role, disk, out_of_sync_bytes } => {
                b.put_u8(Role::code(*role));
                b.put_u8(DiskState::code(*disk));
                b.put_u16_le(0);
                b.put_u64_le(*out_of_sync_bytes);
            }
            Message::Write { lsn, offset, fua, data } => {
                check_data("write", data)?;
                b.put_u64_le(*lsn);
                b.put_u64_le(*offset);
                b.put_u8(if *fua { OP_FLAG_FUA } else { 0 });
            }
            Message::Trim { lsn, offset, len, fua } => {
                b.put_u64_le(*lsn);
                b.put_u64_le(*offset);
                b.put_u32_le(*len);
                b.put_u8(if *fua { OP_FLAG_FUA } else { 0 });
            }
            Message::Zeroes { lsn, offset, len, punch, fua } => {
                b.put_u64_le(*lsn);
                b.put_u64_le(*offset);
                b.put_u32_le(*len);
                let mut flags = 0;
                if *fua {
                    flags |= OP_FLAG_FUA;
                }
                if *punch {
                    flags |= OP_FLAG_PUNCH;
                }
                b.put_u8(flags);
            }
            Message::Barrier { upto_lsn } => b.put_u64_le(*upto_lsn),
            Message::Ack { received, written, durable } => {
                b.put_u64_le(*received);
                b.put_u64_le(*written);
                b.put_u64_le(*durable);
            }
            Message::SyncInfo(i) => {
                b.put_u8(Role::code(i.role));
                b.put_u8(DiskState::code(i.disk));
                b.put_u16_le(0);
                b.put_u32_le(i.granularity);
                b.put_u32_le(i.flags);
                b.put_u64_le(i.gen_ids.current);
                b.put_u64_le(i.gen_ids.bitmap);
                for g in i.gen_ids.history {
                    b.put_u64_le(g);
                }
                b.put_u64_le(i.gen_created_ms);
                b.put_u64_le(i.local_lsn);
                b.put_u64_le(i.dirty_bytes);
                b.put_u64_le(i.bitmap_base_lsn);
                b.put_u64_le(i.log_first_lsn);
            }
            Message::BitmapChunk { first_word, words } => {
                if words.len() > MAX_BITMAP_WORDS {
                    return Err(FrameError::Unencodable {
                        msg: "bitmap-chunk",
                        detail: format!("{} words, more than the maximum {MAX_BITMAP_WORDS}", words.len()),
                    });
                }
                b.put_u64_le(*first_word);
                b.put_u32_le(words.len() as u32);
                for w in words {
                    b.put_u64_le(*w);
                }
            }
            Message::BitmapEnd { total_words } => b.put_u64_le(*total_words),
            Message::SyncStart { kind, total_bytes, start_lsn } => {
                b.put_u8(kind.code());
                b.put_slice(&[0; 3]);
                b.put_u64_le(*total_bytes);
                b.put_u64_le(*start_lsn);
            }
            Message::SyncData { offset, data } => {
                check_data("sync-data", data)?;
                b.put_u64_le(*offset);
            }
            Message::SyncEnd { bytes } => b.put_u64_le(*bytes),
            Message::SyncAck { done_bytes, written_bytes } => {
                b.put_u64_le(*done_bytes);
                b.put_u64_le(*written_bytes);
            }
            Message::Ping { seq, sent_ns } | Message::Pong { seq, sent_ns } => {
                b.put_u64_le(*seq);
                b.put_u64_le(*sent_ns);
            }
            Message::VerifyRequest => b.put_u32_le(0),
            Message::VerifyStart { total_bytes, block } => {
                b.put_u64_le(*total_bytes);
                b.put_u32_le(*block);
                b.put_u32_le(0);
            }
            Message::VerifyDigests { offset, block, digests } => {
                if digests.len() % VERIFY_DIGEST_LEN != 0 || digests.len() > MAX_VERIFY_DIGEST_BYTES {
                    return Err(FrameError::Unencodable {
                        msg: "verify-digests",
                        detail: format!(
                            "{} digest bytes; expected a multiple of {VERIFY_DIGEST_LEN} up to {MAX_VERIFY_DIGEST_BYTES}",
                            digests.len()
                        ),
                    });
                }
                b.put_u64_le(*offset);
                b.put_u32_le(*block);
                b.put_u32_le((digests.len() / VERIFY_DIGEST_LEN) as u32);
                b.put_slice(digests);
            }
            Message::VerifyResult { offset, len, mismatched } => {
                if mismatched.len() > MAX_VERIFY_RUNS {
                    return Err(FrameError::Unencodable {
                        msg: "verify-result",
                        detail: format!("{} mismatched runs, more than {MAX_VERIFY_RUNS}", mismatched.len()),
                    });
                }
                b.put_u64_le(*offset);
                b.put_u32_le(*len);
                b.put_u32_le(mismatched.len() as u32);
                for (o, l) in mismatched {
                    b.put_u64_le(*o);
                    b.put_u32_le(*l);
                }
            }
            Message::VerifyEnd { checked_bytes, out_of_sync_bytes, complete, message } => {
                b.put_u64_le(*checked_bytes);
                b.put_u64_le(*out_of_sync_bytes);
                put_text(b, if *complete { 0 } else { 1 }, message);
            }
            Message::TermPing { seq, sent_ns, term } => {
                b.put_u64_le(*seq);
                b.put_u64_le(*sent_ns);
                b.put_u64_le(*term);
            }
            Message::TermPong(p) => {
                b.put_u64_le(p.seq);
                b.put_u64_le(p.echo_sent_ns);
                b.put_u64_le(p.term);
                let mut flags = 0;
                if p.primary_ok {
                    flags |= pong_flags::PRIMARY_OK;
                }
                if p.view.is_some() {
                    flags |= pong_flags::VIEW;
                }
                b.put_u8(flags);
                let (primary, uptodate) = p.view.unwrap_or((None, 0));
                b.put_u8(primary.unwrap_or(NO_NODE));
                b.put_u8(uptodate);
                b.put_slice(&[0; 5]);
            }
            Message::Claim { term, node, forced, gen_current, lsn_local, last_heard_primary_ms } => {
                b.put_u64_le(*term);
                b.put_u8(*node);
                b.put_u8(u8::from(*forced));
                b.put_slice(&[0; 6]);
                b.put_u64_le(*gen_current);
                b.put_u64_le(*lsn_local);
                b.put_u64_le(*last_heard_primary_ms);
            }
            Message::Solo { term, node } | Message::Release { term, node } => {
                b.put_u64_le(*term);
                b.put_u8(*node);
                b.put_slice(&[0; 7]);
            }
            Message::PeerUptodate { term, node, peer } => {
                b.put_u64_le(*term);
                b.put_u8(*node);
                b.put_u8(*peer);
                b.put_slice(&[0; 6]);
            }
            Message::Grant { request, request_term, view } => {
                b.put_u16_le(*request);
                b.put_slice(&[0; 6]);
                b.put_u64_le(*request_term);
                put_view(b, Some(*view));
            }
            Message::Refused { request, reason, request_term, view } => {
                b.put_u16_le(*request);
                b.put_u8(*reason);
                b.put_u8(u8::from(view.is_some()));
                b.put_slice(&[0; 4]);
                b.put_u64_le(*request_term);
                put_view(b, *view);
            }
            Message::TermRefuse { higher_term } => b.put_u64_le(*higher_term),
        }
        Ok(())
    }
}

/// `| term u64 | primary u8 | uptodate u8 | reserved 6 |` (term 0, no
/// primary, empty mask for `None`).
fn put_view(b: &mut BytesMut, view: Option<WitnessView>) {
    let v = view.unwrap_or(WitnessView { term: 0, primary: None, uptodate: 0 });
    b.put_u64_le(v.term);
    b.put_u8(v.primary.unwrap_or(NO_NODE));
    b.put_u8(v.uptodate);
    b.put_slice(&[0; 6]);
}

/// Bytes of the Hello payload before the names.
const HELLO_FIXED_LEN: usize = 2 + 2 + 4 + 8 + 4 + 1 + 1 + 2 + 8 + 8 + 4 * 8 + 32;

/// Name of a known message type.
pub fn type_name(t: u16) -> Option<&'static str> {
    use msg_type::*;
    Some(match t {
        HELLO => "hello",
        AUTH => "auth",
        WELCOME => "welcome",
        REFUSE => "refuse",
        STATE => "state",
        WRITE => "write",
        TRIM => "trim",
        ZEROES => "zeroes",
        BARRIER => "barrier",
        ACK => "ack",
        SYNC_INFO => "sync-info",
        BITMAP_CHUNK => "bitmap-chunk",
        BITMAP_END => "bitmap-end",
        SYNC_START => "sync-start",
        SYNC_DATA => "sync-data",
        SYNC_END => "sync-end",
        SYNC_ACK => "sync-ack",
        PING => "ping",
        PONG => "pong",
        GOODBYE => "goodbye",
        VERIFY_REQUEST => "verify-request",
        VERIFY_START => "verify-start",
        VERIFY_DIGESTS => "verify-digests",
        VERIFY_RESULT => "verify-result",
        VERIFY_END => "verify-end",
        CLAIM => "claim",
        SOLO => "solo",
        PEER_UPTODATE => "peer-uptodate",
        RELEASE => "release",
        GRANT => "grant",
        REFUSED => "refused",
        TERM_REFUSE => "term-refuse",
        _ => return None,
    })
}

fn check_data(msg: &'static str, data: &Bytes) -> Result<(), FrameError> {
    if data.len() > MAX_DATA_LEN {
        return Err(FrameError::Unencodable {
            msg,
            detail: format!("{} data bytes, more than the maximum {MAX_DATA_LEN}", data.len()),
        });
    }
    Ok(())
}

/// `s` cut to at most [`MAX_MESSAGE_LEN`] bytes at a character boundary.
fn cut(s: &str) -> &str {
    if s.len() <= MAX_MESSAGE_LEN {
        return s;
    }
    let mut end = MAX_MESSAGE_LEN;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn put_text(b: &mut BytesMut, code: u16, message: &str) {
    let m = cut(message);
    b.put_u16_le(code);
    b.put_u16_le(m.len() as u16);
    b.put_slice(m.as_bytes());
}

// ---------------------------------------------------------------------------
// Encoding.
// ---------------------------------------------------------------------------

/// Appends the frame of `msg` to `dst`.
///
/// Fails only for a message that cannot be represented (data over
/// [`MAX_DATA_LEN`], an empty or over-long name in a Hello); `dst` is then
/// left as it was.
pub fn encode(msg: &Message, dst: &mut BytesMut) -> Result<(), FrameError> {
    let data = encode_head(msg, dst)?;
    if let Some(d) = data {
        dst.extend_from_slice(&d);
    }
    Ok(())
}

/// Appends the header and the fixed part of the payload of `msg` to `dst`
/// and returns the trailing data the caller must send right after it (the
/// CRC in the header already covers it). This lets a writer send large data
/// from the caller's buffer without copying it.
pub fn encode_head(msg: &Message, dst: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
    let start = dst.len();
    dst.reserve(FRAME_HEADER_LEN + msg.fixed_len());
    // Format (frame header):
    // | magic u32 "RBRP" | type u16 | flags u16 = 0 | len u32 | crc u32 |
    // crc = crc32c(type ‖ flags ‖ len ‖ payload)
    dst.put_u32_le(FRAME_MAGIC);
    dst.put_u16_le(msg.msg_type());
    dst.put_u16_le(0);
    dst.put_u32_le(0); // len, patched below
    dst.put_u32_le(0); // crc, patched below
    if let Err(e) = msg.put_fixed(dst) {
        dst.truncate(start);
        return Err(e);
    }
    let data = msg.data();
    let len = dst.len() - start - FRAME_HEADER_LEN + data.map_or(0, |d| d.len());
    debug_assert!(len <= MAX_PAYLOAD_LEN);
    dst[start + 8..start + 12].copy_from_slice(&(len as u32).to_le_bytes());
    let mut crc = crc32c::crc32c(&dst[start + 4..start + 12]);
    crc = crc32c::crc32c_append(crc, &dst[start + FRAME_HEADER_LEN..]);
    if let Some(d) = data {
        crc = crc32c::crc32c_append(crc, d);
    }
    dst[start + 12..start + 16].copy_from_slice(&crc.to_le_bytes());
    Ok(data.cloned())
}

// ---------------------------------------------------------------------------
// Decoding.
// ---------------------------------------------------------------------------

/// Header fields of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub msg_type: u16,
    pub flags: u16,
    pub len: u32,
    pub crc: u32,
}

/// The cheap check: is a whole frame at the front of `src`?
///
/// Returns the frame's total length once it is all there, `Ok(None)` while
/// more bytes are needed, and an error as soon as the bytes seen cannot
/// start a valid frame (bad magic, even a partial one; a length over the
/// maximum), so garbage is refused without waiting for more of it.
pub fn check(src: &[u8]) -> Result<Option<(FrameHeader, usize)>, FrameError> {
    let magic = FRAME_MAGIC.to_le_bytes();
    let seen = src.len().min(4);
    if src[..seen] != magic[..seen] {
        let mut found = [0u8; 4];
        found[..seen].copy_from_slice(&src[..seen]);
        return Err(FrameError::BadMagic { found: u32::from_le_bytes(found) });
    }
    if src.len() < FRAME_HEADER_LEN {
        return Ok(None);
    }
    let h = FrameHeader {
        msg_type: u16::from_le_bytes([src[4], src[5]]),
        flags: u16::from_le_bytes([src[6], src[7]]),
        len: u32::from_le_bytes([src[8], src[9], src[10], src[11]]),
        crc: u32::from_le_bytes([src[12], src[13], src[14], src[15]]),
    };
    if h.len as usize > MAX_PAYLOAD_LEN {
        return Err(FrameError::TooLarge { msg_type: h.msg_type, len: h.len, max: MAX_PAYLOAD_LEN });
    }
    let total = FRAME_HEADER_LEN + h.len as usize;
    if src.len() < total {
        return Ok(None);
    }
    Ok(Some((h, total)))
}

/// Takes one whole frame off the front of `src` and decodes it.
///
/// `Ok(None)`: not a whole frame yet, `src` untouched (room for the rest of
/// the frame is reserved). On error the connection must be dropped; `src` is
/// then in an unspecified state.
pub fn decode(src: &mut BytesMut) -> Result<Option<Message>, FrameError> {
    let (h, total) = match check(src)? {
        Some(x) => x,
        None => {
            if src.len() >= FRAME_HEADER_LEN {
                let len = u32::from_le_bytes([src[8], src[9], src[10], src[11]]) as usize;
                src.reserve(FRAME_HEADER_LEN + len - src.len());
            }
            return Ok(None);
        }
    };
    let computed = crc32c::crc32c_append(crc32c::crc32c(&src[4..12]), &src[FRAME_HEADER_LEN..total]);
    if computed != h.crc {
        return Err(FrameError::BadCrc { msg_type: h.msg_type, len: h.len, expected: h.crc, computed });
    }
    let Some(name) = type_name(h.msg_type) else {
        return Err(FrameError::UnknownType { msg_type: h.msg_type, len: h.len });
    };
    if h.flags != 0 {
        return Err(FrameError::UnknownFrameFlags { msg: name, flags: h.flags });
    }
    let mut frame = src.split_to(total).freeze();
    frame.advance(FRAME_HEADER_LEN);
    decode_payload(h.msg_type, name, frame).map(Some)
}

/// Reads fixed fields off a payload, failing with a `Malformed` error that
/// names the message and the field.
struct Payload {
    msg: &'static str,
    b: Bytes,
}

impl Payload {
    fn need(&self, field: &'static str, n: usize) -> Result<(), FrameError> {
        if self.b.remaining() < n {
            return Err(FrameError::Malformed {
                msg: self.msg,
                detail: format!("payload ends inside {field} (need {n} more bytes, have {})", self.b.remaining()),
            });
        }
        Ok(())
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, FrameError> {
        self.need(field, 1)?;
        Ok(self.b.get_u8())
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, FrameError> {
        self.need(field, 2)?;
        Ok(self.b.get_u16_le())
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, FrameError> {
        self.need(field, 4)?;
        Ok(self.b.get_u32_le())
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, FrameError> {
        self.need(field, 8)?;
        Ok(self.b.get_u64_le())
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], FrameError> {
        self.need(field, N)?;
        let mut a = [0u8; N];
        self.b.copy_to_slice(&mut a);
        Ok(a)
    }

    fn string(&mut self, field: &'static str, len: usize) -> Result<String, FrameError> {
        self.need(field, len)?;
        let raw = self.b.split_to(len);
        String::from_utf8(raw.to_vec()).map_err(|_| self.bad(format!("{field} is not UTF-8")))
    }

    fn name(&mut self, field: &'static str) -> Result<String, FrameError> {
        let len = self.u8(field)? as usize;
        if len == 0 {
            return Err(self.bad(format!("empty {field} name")));
        }
        self.string(field, len)
    }

    fn text(&mut self) -> Result<String, FrameError> {
        let len = self.u16("message length")? as usize;
        if len > MAX_MESSAGE_LEN {
            return Err(self.bad(format!("message of {len} bytes, more than the maximum {MAX_MESSAGE_LEN}")));
        }
        self.string("message", len)
    }

    fn role(&mut self) -> Result<Role, FrameError> {
        let c = self.u8("role")?;
        Role::from_code(c).ok_or_else(|| self.bad(format!("unknown role code {c}")))
    }

    fn disk(&mut self) -> Result<DiskState, FrameError> {
        let c = self.u8("disk")?;
        DiskState::from_code(c).ok_or_else(|| self.bad(format!("unknown disk state code {c}")))
    }

    fn reserved16(&mut self) -> Result<(), FrameError> {
        let r = self.u16("reserved")?;
        if r != 0 {
            return Err(self.bad(format!("reserved field is {r:#06x}, must be 0")));
        }
        Ok(())
    }

    /// A node index (0..=7).
    fn node(&mut self, field: &'static str) -> Result<u8, FrameError> {
        let n = self.u8(field)?;
        if n > 7 {
            return Err(self.bad(format!("{field} {n} is not a node index (0..=7)")));
        }
        Ok(n)
    }

    /// A node index, or 0xff for none.
    fn node_or_none(&mut self, field: &'static str) -> Result<Option<u8>, FrameError> {
        let n = self.u8(field)?;
        match n {
            NO_NODE => Ok(None),
            0..=7 => Ok(Some(n)),
            _ => Err(self.bad(format!("{field} {n:#04x} is neither a node index (0..=7) nor 0xff"))),
        }
    }

    fn reserved_bytes<const N: usize>(&mut self) -> Result<(), FrameError> {
        if self.array::<N>("reserved")? != [0; N] {
            return Err(self.bad("reserved bytes must be 0".into()));
        }
        Ok(())
    }

    /// `| term u64 | primary u8 | uptodate u8 | reserved 6 |`.
    fn view(&mut self) -> Result<WitnessView, FrameError> {
        let term = self.u64("term")?;
        let primary = self.node_or_none("primary")?;
        let uptodate = self.u8("uptodate")?;
        self.reserved_bytes::<6>()?;
        Ok(WitnessView { term, primary, uptodate })
    }

    fn op_flags(&mut self, known: u8) -> Result<u8, FrameError> {
        let f = self.u8("flags")?;
        if f & !known != 0 {
            return Err(self.bad(format!("unknown flags {f:#04x}")));
        }
        Ok(f)
    }

    /// The rest of the payload, without a copy.
    fn rest(&mut self) -> Bytes {
        self.b.split_off(0)
    }

    /// Fails if bytes are left over.
    fn end(&self) -> Result<(), FrameError> {
        if self.b.has_remaining() {
            return Err(self.bad(format!("{} unexpected bytes after the last field", self.b.remaining())));
        }
        Ok(())
    }

    fn bad(&self, detail: String) -> FrameError {
        FrameError::Malformed { msg: self.msg, detail }
    }
}

fn decode_payload(t: u16, name: &'static str, payload: Bytes) -> Result<Message, FrameError> {
    use msg_type::*;
    let mut p = Payload { msg: name, b: payload };
    let m = match t {
        HELLO => {
            let min_version = p.u16("min_version")?;
            let max_version = p.u16("max_version")?;
            let flags = p.u32("flags")?;
            let size = p.u64("size")?;
            let block_size = p.u32("block_size")?;
            let role = p.role()?;
            let disk = p.disk()?;
            p.reserved16()?;
            let current = p.u64("gen.current")?;
            let bitmap = p.u64("gen.bitmap")?;
            let mut history = [0u64; 4];
            for h in &mut history {
                *h = p.u64("gen.history")?;
            }
            let nonce = p.array::<32>("nonce")?;
            let resource = p.name("resource")?;
            let node = p.name("node")?;
            let peer = p.name("peer")?;
            Message::Hello(Box::new(Hello {
                min_version,
                max_version,
                flags,
                resource,
                node,
                peer,
                size,
                block_size,
                gen_ids: GenIds { current, bitmap, history },
                role,
                disk,
                nonce,
            }))
        }
        AUTH => Message::Auth { mac: p.array::<32>("mac")? },
        WELCOME => Message::Welcome { version: p.u16("version")? },
        REFUSE => {
            let reason = RefuseReason::from_code(p.u16("reason")?);
            Message::Refuse { reason, message: p.text()? }
        }
        STATE => {
            let role = p.role()?;
            let disk = p.disk()?;
            p.reserved16()?;
            Message::State { role, disk, out_of_sync_bytes: p.u64("out_of_sync_bytes")? }
        }
        WRITE => {
            let lsn = p.u64("lsn")?;
            let offset = p.u64("offset")?;
            let flags = p.op_flags(OP_FLAG_FUA)?;
            let data = p.rest();
            if data.len() > MAX_DATA_LEN {
                return Err(p.bad(format!("{} data bytes, more than the maximum {MAX_DATA_LEN}", data.len())));
            }
            Message::Write { lsn, offset, fua: flags & OP_FLAG_FUA != 0, data }
        }
        TRIM => {
            let lsn = p.u64("lsn")?;
            let offset = p.u64("offset")?;
            let len = p.u32("len")?;
            let flags = p.op_flags(OP_FLAG_FUA)?;
            Message::Trim { lsn, offset, len, fua: flags & OP_FLAG_FUA != 0 }
        }
        ZEROES => {
            let lsn = p.u64("lsn")?;
            let offset = p.u64("offset")?;
            let len = p.u32("len")?;
            let flags = p.op_flags(OP_FLAG_FUA | OP_FLAG_PUNCH)?;
            Message::Zeroes { lsn, offset, len, punch: flags & OP_FLAG_PUNCH != 0, fua: flags & OP_FLAG_FUA != 0 }
        }
        BARRIER => Message::Barrier { upto_lsn: p.u64("upto_lsn")? },
        ACK => Message::Ack { received: p.u64("received")?, written: p.u64("written")?, durable: p.u64("durable")? },
        SYNC_INFO => {
            let role = p.role()?;
            let disk = p.disk()?;
            p.reserved16()?;
            let granularity = p.u32("granularity")?;
            if !granularity.is_power_of_two() {
                return Err(p.bad(format!("granularity {granularity} is not a power of two")));
            }
            let flags = p.u32("flags")?;
            if flags & !sync_flags::KNOWN != 0 {
                return Err(p.bad(format!("unknown flags {flags:#010x}")));
            }
            let current = p.u64("gen.current")?;
            let bitmap = p.u64("gen.bitmap")?;
            let mut history = [0u64; 4];
            for h in &mut history {
                *h = p.u64("gen.history")?;
            }
            Message::SyncInfo(Box::new(SyncInfo {
                role,
                disk,
                granularity,
                flags,
                gen_ids: GenIds { current, bitmap, history },
                gen_created_ms: p.u64("gen_created_ms")?,
                local_lsn: p.u64("local_lsn")?,
                dirty_bytes: p.u64("dirty_bytes")?,
                bitmap_base_lsn: p.u64("bitmap_base_lsn")?,
                log_first_lsn: p.u64("log_first_lsn")?,
            }))
        }
        BITMAP_CHUNK => {
            let first_word = p.u64("first_word")?;
            let count = p.u32("count")? as usize;
            if count > MAX_BITMAP_WORDS {
                return Err(p.bad(format!("{count} words, more than the maximum {MAX_BITMAP_WORDS}")));
            }
            if p.b.remaining() != count * 8 {
                return Err(p.bad(format!("count says {count} words, the payload holds {} bytes", p.b.remaining())));
            }
            if first_word.checked_add(count as u64).is_none() {
                return Err(p.bad(format!("first_word {first_word} + {count} words overflows")));
            }
            let words = (0..count).map(|_| p.b.get_u64_le()).collect();
            Message::BitmapChunk { first_word, words }
        }
        BITMAP_END => Message::BitmapEnd { total_words: p.u64("total_words")? },
        SYNC_START => {
            let code = p.u8("kind")?;
            let kind = ResyncKind::from_code(code).ok_or_else(|| p.bad(format!("unknown resync kind {code}")))?;
            let reserved = p.array::<3>("reserved")?;
            if reserved != [0; 3] {
                return Err(p.bad("reserved bytes must be 0".into()));
            }
            Message::SyncStart { kind, total_bytes: p.u64("total_bytes")?, start_lsn: p.u64("start_lsn")? }
        }
        SYNC_DATA => {
            let offset = p.u64("offset")?;
            let data = p.rest();
            if data.len() > MAX_DATA_LEN {
                return Err(p.bad(format!("{} data bytes, more than the maximum {MAX_DATA_LEN}", data.len())));
            }
            Message::SyncData { offset, data }
        }
        SYNC_END => Message::SyncEnd { bytes: p.u64("bytes")? },
        SYNC_ACK => Message::SyncAck { done_bytes: p.u64("done_bytes")?, written_bytes: p.u64("written_bytes")? },
        PING if p.b.remaining() == 24 => {
            Message::TermPing { seq: p.u64("seq")?, sent_ns: p.u64("sent_ns")?, term: p.u64("term")? }
        }
        PING => Message::Ping { seq: p.u64("seq")?, sent_ns: p.u64("sent_ns")? },
        PONG if p.b.remaining() == 32 => {
            let seq = p.u64("seq")?;
            let echo_sent_ns = p.u64("echo_sent_ns")?;
            let term = p.u64("term")?;
            let flags = p.u8("flags")?;
            if flags & !pong_flags::KNOWN != 0 {
                return Err(p.bad(format!("unknown flags {flags:#04x}")));
            }
            let primary = p.node_or_none("primary")?;
            let uptodate = p.u8("uptodate")?;
            p.reserved_bytes::<5>()?;
            let view = if flags & pong_flags::VIEW != 0 {
                Some((primary, uptodate))
            } else if primary.is_some() || uptodate != 0 {
                return Err(p.bad("primary/uptodate set without the VIEW flag".into()));
            } else {
                None
            };
            Message::TermPong(TermPong {
                seq,
                echo_sent_ns,
                term,
                primary_ok: flags & pong_flags::PRIMARY_OK != 0,
                view,
            })
        }
        PONG => Message::Pong { seq: p.u64("seq")?, sent_ns: p.u64("sent_ns")? },
        CLAIM => {
            let term = p.u64("term")?;
            let node = p.node("node")?;
            let forced = match p.u8("forced")? {
                0 => false,
                1 => true,
                other => return Err(p.bad(format!("forced is {other}, must be 0 or 1"))),
            };
            p.reserved_bytes::<6>()?;
            Message::Claim {
                term,
                node,
                forced,
                gen_current: p.u64("gen_current")?,
                lsn_local: p.u64("lsn_local")?,
                last_heard_primary_ms: p.u64("last_heard_primary_ms")?,
            }
        }
        SOLO | RELEASE => {
            let term = p.u64("term")?;
            let node = p.node("node")?;
            p.reserved_bytes::<7>()?;
            if t == SOLO { Message::Solo { term, node } } else { Message::Release { term, node } }
        }
        PEER_UPTODATE => {
            let term = p.u64("term")?;
            let node = p.node("node")?;
            let peer = p.node("peer")?;
            p.reserved_bytes::<6>()?;
            Message::PeerUptodate { term, node, peer }
        }
        GRANT => {
            let request = p.u16("request")?;
            p.reserved_bytes::<6>()?;
            let request_term = p.u64("request_term")?;
            let view = p.view()?;
            Message::Grant { request, request_term, view }
        }
        REFUSED => {
            let request = p.u16("request")?;
            let reason = p.u8("reason")?;
            let flags = p.u8("flags")?;
            if flags > 1 {
                return Err(p.bad(format!("unknown flags {flags:#04x}")));
            }
            p.reserved_bytes::<4>()?;
            let request_term = p.u64("request_term")?;
            let view = p.view()?;
            let view = if flags & 1 != 0 {
                Some(view)
            } else if view != (WitnessView { term: 0, primary: None, uptodate: 0 }) {
                return Err(p.bad("a record without the VIEW flag".into()));
            } else {
                None
            };
            Message::Refused { request, reason, request_term, view }
        }
        TERM_REFUSE => Message::TermRefuse { higher_term: p.u64("higher_term")? },
        GOODBYE => {
            let reason = GoodbyeReason::from_code(p.u16("reason")?);
            Message::Goodbye { reason, message: p.text()? }
        }
        VERIFY_REQUEST => {
            let r = p.u32("reserved")?;
            if r != 0 {
                return Err(p.bad(format!("reserved field is {r:#010x}, must be 0")));
            }
            Message::VerifyRequest
        }
        VERIFY_START => {
            let total_bytes = p.u64("total_bytes")?;
            let block = p.u32("block")?;
            let r = p.u32("reserved")?;
            if r != 0 {
                return Err(p.bad(format!("reserved field is {r:#010x}, must be 0")));
            }
            Message::VerifyStart { total_bytes, block }
        }
        VERIFY_DIGESTS => {
            let offset = p.u64("offset")?;
            let block = p.u32("block")?;
            let count = p.u32("count")? as usize;
            let bytes = count.checked_mul(VERIFY_DIGEST_LEN).filter(|n| *n <= MAX_VERIFY_DIGEST_BYTES);
            let Some(bytes) = bytes else {
                let max = MAX_VERIFY_DIGEST_BYTES / VERIFY_DIGEST_LEN;
                return Err(p.bad(format!("{count} digests, more than {max}")));
            };
            p.need("digests", bytes)?;
            let digests = p.b.split_to(bytes);
            Message::VerifyDigests { offset, block, digests }
        }
        VERIFY_RESULT => {
            let offset = p.u64("offset")?;
            let len = p.u32("len")?;
            let count = p.u32("count")? as usize;
            if count > MAX_VERIFY_RUNS {
                return Err(p.bad(format!("{count} mismatched runs, more than {MAX_VERIFY_RUNS}")));
            }
            p.need("runs", count * 12)?;
            let mut mismatched = Vec::with_capacity(count);
            for _ in 0..count {
                mismatched.push((p.u64("run offset")?, p.u32("run len")?));
            }
            Message::VerifyResult { offset, len, mismatched }
        }
        VERIFY_END => {
            let checked_bytes = p.u64("checked_bytes")?;
            let out_of_sync_bytes = p.u64("out_of_sync_bytes")?;
            let status = p.u16("status")?;
            if status > 1 {
                return Err(p.bad(format!("unknown status {status}")));
            }
            Message::VerifyEnd { checked_bytes, out_of_sync_bytes, complete: status == 0, message: p.text()? }
        }
        _ => {
            // type_name() accepted the code, so this is a missing arm.
            return Err(p.bad(format!("type {t} has no decoder")));
        }
    };
    p.end()?;
    Ok(m)
}

#[cfg(test)]
#[path = "proto_tests.rs"]
mod tests;
