//! NBD protocol constants and codec (fixed newstyle handshake, simple and
//! structured replies), shared by the server and the client.
//!
//! Every wire message is drawn above its codec. All integers are big-endian
//! (network byte order). The reference is the NBD protocol document
//! (`doc/proto.md` in the NetworkBlockDevice/nbd repository).
//!
//! Nothing here does IO: parsers take byte slices and return either a value
//! or a [`ProtoError`]; they never panic on arbitrary input (property-tested
//! below).

use bytes::{BufMut, BytesMut};

// ---------------------------------------------------------------------------
// Error values (the spec fixes the Linux numbers).
// ---------------------------------------------------------------------------

/// NBD error values (the spec fixes the Linux numbers).
pub const NBD_EPERM: u32 = 1;
pub const NBD_EIO: u32 = 5;
pub const NBD_ENOMEM: u32 = 12;
pub const NBD_EINVAL: u32 = 22;
pub const NBD_ENOSPC: u32 = 28;
pub const NBD_EOVERFLOW: u32 = 75;
pub const NBD_ENOTSUP: u32 = 95;
pub const NBD_ESHUTDOWN: u32 = 108;

// ---------------------------------------------------------------------------
// Magics.
// ---------------------------------------------------------------------------

/// `NBDMAGIC`, first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second server magic of the newstyle handshake, and the magic
/// of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply (fixed newstyle).
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// ---------------------------------------------------------------------------
// Handshake flags (server, 16 bits) and client flags (32 bits).
// ---------------------------------------------------------------------------

pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;

pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;
/// Every client flag this implementation knows; any other bit closes the
/// connection (the spec's MUST).
pub const KNOWN_CLIENT_FLAGS: u32 = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;

// ---------------------------------------------------------------------------
// Transmission flags (16 bits).
// ---------------------------------------------------------------------------

pub const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
pub const NBD_FLAG_ROTATIONAL: u16 = 1 << 4;
pub const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const NBD_FLAG_SEND_DF: u16 = 1 << 7;
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const NBD_FLAG_SEND_RESIZE: u16 = 1 << 9;
pub const NBD_FLAG_SEND_CACHE: u16 = 1 << 10;
pub const NBD_FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// ---------------------------------------------------------------------------
// Options and option replies.
// ---------------------------------------------------------------------------

pub const NBD_OPT_EXPORT_NAME: u32 = 1;
pub const NBD_OPT_ABORT: u32 = 2;
pub const NBD_OPT_LIST: u32 = 3;
pub const NBD_OPT_PEEK_EXPORT: u32 = 4;
pub const NBD_OPT_STARTTLS: u32 = 5;
pub const NBD_OPT_INFO: u32 = 6;
pub const NBD_OPT_GO: u32 = 7;
pub const NBD_OPT_STRUCTURED_REPLY: u32 = 8;
pub const NBD_OPT_LIST_META_CONTEXT: u32 = 9;
pub const NBD_OPT_SET_META_CONTEXT: u32 = 10;
pub const NBD_OPT_EXTENDED_HEADERS: u32 = 11;

pub const NBD_REP_ACK: u32 = 1;
pub const NBD_REP_SERVER: u32 = 2;
pub const NBD_REP_INFO: u32 = 3;
pub const NBD_REP_META_CONTEXT: u32 = 4;
/// Bit 31 marks every error reply.
pub const NBD_REP_FLAG_ERROR: u32 = 1 << 31;
pub const NBD_REP_ERR_UNSUP: u32 = NBD_REP_FLAG_ERROR | 1;
pub const NBD_REP_ERR_POLICY: u32 = NBD_REP_FLAG_ERROR | 2;
pub const NBD_REP_ERR_INVALID: u32 = NBD_REP_FLAG_ERROR | 3;
pub const NBD_REP_ERR_PLATFORM: u32 = NBD_REP_FLAG_ERROR | 4;
pub const NBD_REP_ERR_TLS_REQD: u32 = NBD_REP_FLAG_ERROR | 5;
pub const NBD_REP_ERR_UNKNOWN: u32 = NBD_REP_FLAG_ERROR | 6;
pub const NBD_REP_ERR_SHUTDOWN: u32 = NBD_REP_FLAG_ERROR | 7;
pub const NBD_REP_ERR_BLOCK_SIZE_REQD: u32 = NBD_REP_FLAG_ERROR | 8;
pub const NBD_REP_ERR_TOO_BIG: u32 = NBD_REP_FLAG_ERROR | 9;

pub const NBD_INFO_EXPORT: u16 = 0;
pub const NBD_INFO_NAME: u16 = 1;
pub const NBD_INFO_DESCRIPTION: u16 = 2;
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;

// ---------------------------------------------------------------------------
// Commands, command flags, structured replies.
// ---------------------------------------------------------------------------

pub const NBD_CMD_READ: u16 = 0;
pub const NBD_CMD_WRITE: u16 = 1;
pub const NBD_CMD_DISC: u16 = 2;
pub const NBD_CMD_FLUSH: u16 = 3;
pub const NBD_CMD_TRIM: u16 = 4;
pub const NBD_CMD_CACHE: u16 = 5;
pub const NBD_CMD_WRITE_ZEROES: u16 = 6;
pub const NBD_CMD_BLOCK_STATUS: u16 = 7;

pub const NBD_CMD_FLAG_FUA: u16 = 1 << 0;
pub const NBD_CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const NBD_CMD_FLAG_DF: u16 = 1 << 2;
pub const NBD_CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const NBD_CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
pub const NBD_CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

pub const NBD_REPLY_FLAG_DONE: u16 = 1 << 0;

pub const NBD_REPLY_TYPE_NONE: u16 = 0;
pub const NBD_REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const NBD_REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const NBD_REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Bit 15 marks every error chunk type.
pub const NBD_REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;
pub const NBD_REPLY_TYPE_ERROR: u16 = NBD_REPLY_TYPE_ERROR_BIT | 1;
pub const NBD_REPLY_TYPE_ERROR_OFFSET: u16 = NBD_REPLY_TYPE_ERROR_BIT | 2;

// ---------------------------------------------------------------------------
// Limits.
// ---------------------------------------------------------------------------

/// Advertised minimum block size (any byte is addressable).
pub const MIN_BLOCK_SIZE: u32 = 1;
/// Advertised preferred block size.
pub const PREFERRED_BLOCK_SIZE: u32 = 4096;
/// Advertised maximum block size: the largest READ, WRITE or WRITE_ZEROES
/// served. It is also the spec's "never a denial of service" bound (2^25),
/// so a rejected WRITE up to this size is drained, and a larger one closes
/// the connection.
pub const MAX_BLOCK_SIZE: u32 = 32 * 1024 * 1024;
/// Longest option payload accepted during the handshake; a longer one closes
/// the connection (nothing legitimate comes close).
pub const MAX_OPTION_DATA: u32 = 64 * 1024;
/// Longest string (export name, message) the spec allows.
pub const MAX_STRING_LEN: usize = 4096;
/// Number of zero bytes after the NBD_OPT_EXPORT_NAME reply unless the client
/// negotiated NBD_FLAG_C_NO_ZEROES.
pub const EXPORT_NAME_ZEROES: usize = 124;

/// Errors decoding NBD messages.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("Bad request magic {found:#010x}")]
    BadRequestMagic { found: u32 },
    #[error("Bad option magic {found:#018x}")]
    BadOptionMagic { found: u64 },
    #[error("Bad option reply magic {found:#018x}")]
    BadOptionReplyMagic { found: u64 },
    #[error("Bad reply magic {found:#010x}")]
    BadReplyMagic { found: u32 },
    #[error("Bad server magic {found:#018x}")]
    BadServerMagic { found: u64 },
    #[error("Truncated {what}: need {need} bytes, have {have}")]
    Truncated { what: &'static str, need: usize, have: usize },
    #[error("Malformed {what}: {detail}")]
    Malformed { what: &'static str, detail: String },
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

fn need(what: &'static str, b: &[u8], need: usize) -> Result<(), ProtoError> {
    if b.len() < need { Err(ProtoError::Truncated { what, need, have: b.len() }) } else { Ok(()) }
}

// ---------------------------------------------------------------------------
// Handshake.
// ---------------------------------------------------------------------------

/// Server greeting of the fixed newstyle handshake.
///
/// Format: | NBDMAGIC u64 | IHAVEOPT u64 | handshake flags u16 |  (18 bytes)
pub const GREETING_LEN: usize = 18;

pub fn encode_greeting(flags: u16) -> [u8; GREETING_LEN] {
    let mut b = [0u8; GREETING_LEN];
    b[0..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(&flags.to_be_bytes());
    b
}

/// Parses the server greeting; returns the handshake flags.
pub fn parse_greeting(b: &[u8]) -> Result<u16, ProtoError> {
    need("greeting", b, GREETING_LEN)?;
    let magic = be_u64(b, 0);
    if magic != NBD_MAGIC {
        return Err(ProtoError::BadServerMagic { found: magic });
    }
    let opt = be_u64(b, 8);
    if opt != IHAVEOPT {
        // An oldstyle server sends cliserv_magic here.
        return Err(ProtoError::BadServerMagic { found: opt });
    }
    Ok(be_u16(b, 16))
}

/// Option request header; `len` bytes of option data follow.
///
/// Format: | IHAVEOPT u64 | option u32 | length u32 |  (16 bytes)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

impl OptionHeader {
    pub const LEN: usize = 16;

    pub fn parse(b: &[u8]) -> Result<OptionHeader, ProtoError> {
        need("option header", b, Self::LEN)?;
        let magic = be_u64(b, 0);
        if magic != IHAVEOPT {
            return Err(ProtoError::BadOptionMagic { found: magic });
        }
        Ok(OptionHeader { option: be_u32(b, 8), len: be_u32(b, 12) })
    }

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[8..12].copy_from_slice(&self.option.to_be_bytes());
        b[12..16].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// Option reply header; `len` bytes of reply data follow.
///
/// Format: | 0x3e889045565a9 u64 | option u32 | reply type u32 | length u32 |  (20 bytes)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply: u32,
    pub len: u32,
}

impl OptionReplyHeader {
    pub const LEN: usize = 20;

    pub fn parse(b: &[u8]) -> Result<OptionReplyHeader, ProtoError> {
        need("option reply header", b, Self::LEN)?;
        let magic = be_u64(b, 0);
        if magic != OPTION_REPLY_MAGIC {
            return Err(ProtoError::BadOptionReplyMagic { found: magic });
        }
        Ok(OptionReplyHeader { option: be_u32(b, 8), reply: be_u32(b, 12), len: be_u32(b, 16) })
    }
}

/// Appends one option reply (header and data) to `buf`.
pub fn put_option_reply(buf: &mut BytesMut, option: u32, reply: u32, data: &[u8]) {
    buf.reserve(OptionReplyHeader::LEN + data.len());
    buf.put_u64(OPTION_REPLY_MAGIC);
    buf.put_u32(option);
    buf.put_u32(reply);
    buf.put_u32(data.len() as u32);
    buf.put_slice(data);
}

/// The data of NBD_OPT_INFO and NBD_OPT_GO.
///
/// Format: | name length u32 | name | n u16 | info type u16 × n |
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: Vec<u8>,
    pub requests: Vec<u16>,
}

impl InfoRequest {
    /// Parses the option data; the whole of it must be consumed exactly.
    pub fn parse(data: &[u8]) -> Result<InfoRequest, ProtoError> {
        const WHAT: &str = "NBD_OPT_INFO/GO data";
        if data.len() < 6 {
            return Err(ProtoError::Malformed { what: WHAT, detail: format!("{} bytes, need at least 6", data.len()) });
        }
        let name_len = be_u32(data, 0) as usize;
        if name_len > data.len() - 6 {
            return Err(ProtoError::Malformed {
                what: WHAT,
                detail: format!("name length {name_len} exceeds option length {}", data.len()),
            });
        }
        if name_len > MAX_STRING_LEN {
            return Err(ProtoError::Malformed {
                what: WHAT,
                detail: format!("name length {name_len} exceeds {MAX_STRING_LEN}"),
            });
        }
        let name = data[4..4 + name_len].to_vec();
        let rest = &data[4 + name_len..];
        let n = be_u16(rest, 0) as usize;
        let list = &rest[2..];
        if list.len() != n * 2 {
            return Err(ProtoError::Malformed {
                what: WHAT,
                detail: format!("{n} information requests but {} bytes of them", list.len()),
            });
        }
        let requests = list.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect();
        Ok(InfoRequest { name, requests })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(6 + self.name.len() + 2 * self.requests.len());
        b.extend_from_slice(&(self.name.len() as u32).to_be_bytes());
        b.extend_from_slice(&self.name);
        b.extend_from_slice(&(self.requests.len() as u16).to_be_bytes());
        for r in &self.requests {
            b.extend_from_slice(&r.to_be_bytes());
        }
        b
    }
}

/// NBD_REP_INFO / NBD_INFO_EXPORT payload.
///
/// Format: | NBD_INFO_EXPORT u16 | size u64 | transmission flags u16 |  (12 bytes)
pub fn info_export(size: u64, flags: u16) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[0..2].copy_from_slice(&NBD_INFO_EXPORT.to_be_bytes());
    b[2..10].copy_from_slice(&size.to_be_bytes());
    b[10..12].copy_from_slice(&flags.to_be_bytes());
    b
}

/// NBD_REP_INFO / NBD_INFO_BLOCK_SIZE payload.
///
/// Format: | NBD_INFO_BLOCK_SIZE u16 | minimum u32 | preferred u32 | maximum u32 |  (14 bytes)
pub fn info_block_size(min: u32, preferred: u32, max: u32) -> [u8; 14] {
    let mut b = [0u8; 14];
    b[0..2].copy_from_slice(&NBD_INFO_BLOCK_SIZE.to_be_bytes());
    b[2..6].copy_from_slice(&min.to_be_bytes());
    b[6..10].copy_from_slice(&preferred.to_be_bytes());
    b[10..14].copy_from_slice(&max.to_be_bytes());
    b
}

/// NBD_REP_INFO payload carrying a string (NBD_INFO_NAME, NBD_INFO_DESCRIPTION).
///
/// Format: | info type u16 | string |
pub fn info_string(kind: u16, s: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(2 + s.len());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(s.as_bytes());
    b
}

/// NBD_REP_SERVER payload.
///
/// Format: | name length u32 | name | description (rest, optional) |
pub fn rep_server(name: &str, description: Option<&str>) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + name.len() + description.map_or(0, str::len));
    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    if let Some(d) = description {
        b.extend_from_slice(d.as_bytes());
    }
    b
}

/// Reply to NBD_OPT_EXPORT_NAME (no option reply header).
///
/// Format: | size u64 | transmission flags u16 | 124 zero bytes unless NO_ZEROES |
pub fn export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut b = Vec::with_capacity(10 + EXPORT_NAME_ZEROES);
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        b.resize(10 + EXPORT_NAME_ZEROES, 0);
    }
    b
}

// ---------------------------------------------------------------------------
// Transmission.
// ---------------------------------------------------------------------------

/// A request header; a WRITE is followed by `len` bytes of payload.
///
/// Format: | 0x25609513 u32 | command flags u16 | type u16 | cookie u64 | offset u64 | length u32 |  (28 bytes)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    /// The raw command type: unknown values are answered with EINVAL, so the
    /// parser keeps them.
    pub kind: u16,
    /// The client's opaque handle ("cookie"), echoed in the reply.
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

impl RequestHeader {
    pub const LEN: usize = 28;

    /// Whether `buf` starts with a whole request header (cheap; call before
    /// [`RequestHeader::parse`]).
    pub fn is_complete(buf: &[u8]) -> bool {
        buf.len() >= Self::LEN
    }

    pub fn parse(b: &[u8]) -> Result<RequestHeader, ProtoError> {
        need("request header", b, Self::LEN)?;
        let magic = be_u32(b, 0);
        if magic != REQUEST_MAGIC {
            return Err(ProtoError::BadRequestMagic { found: magic });
        }
        Ok(RequestHeader {
            flags: be_u16(b, 4),
            kind: be_u16(b, 6),
            cookie: be_u64(b, 8),
            offset: be_u64(b, 16),
            len: be_u32(b, 24),
        })
    }

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// Simple reply header; a successful READ is followed by its data.
///
/// Format: | 0x67446698 u32 | error u32 | cookie u64 |  (16 bytes)
pub const SIMPLE_REPLY_LEN: usize = 16;

pub fn put_simple_reply(buf: &mut BytesMut, error: u32, cookie: u64) {
    buf.reserve(SIMPLE_REPLY_LEN);
    buf.put_u32(SIMPLE_REPLY_MAGIC);
    buf.put_u32(error);
    buf.put_u64(cookie);
}

/// Structured reply chunk header; `len` bytes of payload follow.
///
/// Format: | 0x668e33ef u32 | flags u16 | type u16 | cookie u64 | length u32 |  (20 bytes)
pub const STRUCTURED_REPLY_LEN: usize = 20;

pub fn put_chunk_header(buf: &mut BytesMut, flags: u16, kind: u16, cookie: u64, len: u32) {
    buf.reserve(STRUCTURED_REPLY_LEN);
    buf.put_u32(STRUCTURED_REPLY_MAGIC);
    buf.put_u16(flags);
    buf.put_u16(kind);
    buf.put_u64(cookie);
    buf.put_u32(len);
}

/// Header of an NBD_REPLY_TYPE_OFFSET_DATA chunk with DONE set; the
/// `data_len` bytes of data follow it.
///
/// Format: | chunk header (len = 8 + data_len) | offset u64 | data |
pub fn put_offset_data_header(buf: &mut BytesMut, cookie: u64, offset: u64, data_len: u32) {
    put_chunk_header(buf, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, cookie, 8 + data_len);
    buf.put_u64(offset);
}

/// A whole NBD_REPLY_TYPE_ERROR chunk with DONE set. The message is cut to
/// the spec's string limit (at a character boundary).
///
/// Format: | chunk header (len = 6 + msg len) | error u32 | message length u16 | message |
pub fn put_error_chunk(buf: &mut BytesMut, cookie: u64, error: u32, message: &str) {
    let mut end = message.len().min(MAX_STRING_LEN);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let msg = &message.as_bytes()[..end];
    put_chunk_header(buf, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, cookie, 6 + msg.len() as u32);
    buf.put_u32(error);
    buf.put_u16(msg.len() as u16);
    buf.put_slice(msg);
}

/// A reply header as the client sees it (before any payload).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    Simple { error: u32, cookie: u64 },
    Chunk { flags: u16, kind: u16, cookie: u64, len: u32 },
}

impl ReplyHeader {
    /// Parses a reply header from the start of `b`. Returns `Ok(None)` when
    /// more bytes are needed, or the header and its length.
    pub fn parse(b: &[u8]) -> Result<Option<(ReplyHeader, usize)>, ProtoError> {
        if b.len() < 4 {
            return Ok(None);
        }
        match be_u32(b, 0) {
            SIMPLE_REPLY_MAGIC => {
                if b.len() < SIMPLE_REPLY_LEN {
                    return Ok(None);
                }
                Ok(Some((ReplyHeader::Simple { error: be_u32(b, 4), cookie: be_u64(b, 8) }, SIMPLE_REPLY_LEN)))
            }
            STRUCTURED_REPLY_MAGIC => {
                if b.len() < STRUCTURED_REPLY_LEN {
                    return Ok(None);
                }
                Ok(Some((
                    ReplyHeader::Chunk {
                        flags: be_u16(b, 4),
                        kind: be_u16(b, 6),
                        cookie: be_u64(b, 8),
                        len: be_u32(b, 16),
                    },
                    STRUCTURED_REPLY_LEN,
                )))
            }
            found => Err(ProtoError::BadReplyMagic { found }),
        }
    }
}

/// Decodes the payload of an error chunk: (error, message).
pub fn parse_error_chunk(payload: &[u8]) -> Result<(u32, String), ProtoError> {
    need("error chunk", payload, 6)?;
    let error = be_u32(payload, 0);
    let msg_len = be_u16(payload, 4) as usize;
    if msg_len > payload.len() - 6 {
        return Err(ProtoError::Malformed {
            what: "error chunk",
            detail: format!("message length {msg_len} exceeds chunk length {}", payload.len()),
        });
    }
    Ok((error, String::from_utf8_lossy(&payload[6..6 + msg_len]).into_owned()))
}

/// Name of a command type, for logs.
pub fn command_name(kind: u16) -> &'static str {
    match kind {
        NBD_CMD_READ => "READ",
        NBD_CMD_WRITE => "WRITE",
        NBD_CMD_DISC => "DISC",
        NBD_CMD_FLUSH => "FLUSH",
        NBD_CMD_TRIM => "TRIM",
        NBD_CMD_CACHE => "CACHE",
        NBD_CMD_WRITE_ZEROES => "WRITE_ZEROES",
        NBD_CMD_BLOCK_STATUS => "BLOCK_STATUS",
        _ => "unknown",
    }
}

/// Name of an option, for logs.
pub fn option_name(option: u32) -> &'static str {
    match option {
        NBD_OPT_EXPORT_NAME => "EXPORT_NAME",
        NBD_OPT_ABORT => "ABORT",
        NBD_OPT_LIST => "LIST",
        NBD_OPT_PEEK_EXPORT => "PEEK_EXPORT",
        NBD_OPT_STARTTLS => "STARTTLS",
        NBD_OPT_INFO => "INFO",
        NBD_OPT_GO => "GO",
        NBD_OPT_STRUCTURED_REPLY => "STRUCTURED_REPLY",
        NBD_OPT_LIST_META_CONTEXT => "LIST_META_CONTEXT",
        NBD_OPT_SET_META_CONTEXT => "SET_META_CONTEXT",
        NBD_OPT_EXTENDED_HEADERS => "EXTENDED_HEADERS",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn request_header_layout() {
        let h = RequestHeader { flags: 0x0102, kind: 0x0304, cookie: 0x0506, offset: 0x0708, len: 0x090a };
        let b = h.encode();
        assert_eq!(&b[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&b[4..8], &[0x01, 0x02, 0x03, 0x04]);
        assert_eq!(be_u64(&b, 8), 0x0506);
        assert_eq!(be_u64(&b, 16), 0x0708);
        assert_eq!(be_u32(&b, 24), 0x090a);
    }

    #[test]
    fn bad_request_magic_is_an_error() {
        let mut b = RequestHeader { flags: 0, kind: 0, cookie: 1, offset: 0, len: 1 }.encode();
        b[0] ^= 0xff;
        assert!(matches!(RequestHeader::parse(&b), Err(ProtoError::BadRequestMagic { .. })));
        assert!(matches!(RequestHeader::parse(&b[..27]), Err(ProtoError::Truncated { .. })));
    }

    #[test]
    fn info_request_rejects_inconsistent_lengths() {
        // Name length beyond the data.
        let mut d = InfoRequest { name: b"r0".to_vec(), requests: vec![3] }.encode();
        d[3] = 200;
        assert!(InfoRequest::parse(&d).is_err());
        // Count says 2 requests, only one present.
        let mut d = InfoRequest { name: b"r0".to_vec(), requests: vec![3] }.encode();
        d[7] = 2;
        assert!(InfoRequest::parse(&d).is_err());
        // Trailing garbage.
        let mut d = InfoRequest { name: vec![], requests: vec![] }.encode();
        d.push(0);
        assert!(InfoRequest::parse(&d).is_err());
        assert!(InfoRequest::parse(&[0, 0, 0, 0, 0]).is_err());
        assert_eq!(InfoRequest::parse(&[0, 0, 0, 0, 0, 0]).unwrap(), InfoRequest { name: vec![], requests: vec![] });
    }

    #[test]
    fn export_name_reply_zeroes() {
        assert_eq!(export_name_reply(1, 2, false).len(), 134);
        assert_eq!(export_name_reply(1, 2, true).len(), 10);
    }

    #[test]
    fn error_chunk_round_trip_and_truncation() {
        let mut b = BytesMut::new();
        put_error_chunk(&mut b, 7, NBD_EINVAL, "bad");
        let (h, n) = ReplyHeader::parse(&b).unwrap().unwrap();
        assert_eq!(h, ReplyHeader::Chunk { flags: NBD_REPLY_FLAG_DONE, kind: NBD_REPLY_TYPE_ERROR, cookie: 7, len: 9 });
        assert_eq!(parse_error_chunk(&b[n..]).unwrap(), (NBD_EINVAL, "bad".to_string()));

        let long = "é".repeat(3000); // 6000 bytes, cut at a char boundary
        let mut b = BytesMut::new();
        put_error_chunk(&mut b, 1, NBD_EIO, &long);
        let (_, n) = ReplyHeader::parse(&b).unwrap().unwrap();
        let (_, msg) = parse_error_chunk(&b[n..]).unwrap();
        assert!(msg.len() <= MAX_STRING_LEN && msg.chars().all(|c| c == 'é'));
    }

    proptest! {
        #[test]
        fn request_header_round_trip(flags: u16, kind: u16, cookie: u64, offset: u64, len: u32) {
            let h = RequestHeader { flags, kind, cookie, offset, len };
            prop_assert_eq!(RequestHeader::parse(&h.encode()), Ok(h));
        }

        #[test]
        fn request_parser_never_panics(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            let r = RequestHeader::parse(&b);
            if b.len() >= RequestHeader::LEN && b[0..4] == REQUEST_MAGIC.to_be_bytes() {
                prop_assert!(r.is_ok());
            } else {
                prop_assert!(r.is_err());
            }
        }

        #[test]
        fn option_header_round_trip(option: u32, len: u32) {
            let h = OptionHeader { option, len };
            prop_assert_eq!(OptionHeader::parse(&h.encode()), Ok(h));
        }

        #[test]
        fn option_parsers_never_panic(b in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = OptionHeader::parse(&b);
            let _ = OptionReplyHeader::parse(&b);
            let _ = InfoRequest::parse(&b);
            let _ = ReplyHeader::parse(&b);
            let _ = parse_error_chunk(&b);
            let _ = parse_greeting(&b);
        }

        #[test]
        fn info_request_round_trip(
            name in proptest::collection::vec(any::<u8>(), 0..300),
            requests in proptest::collection::vec(any::<u16>(), 0..20),
        ) {
            let r = InfoRequest { name, requests };
            prop_assert_eq!(InfoRequest::parse(&r.encode()), Ok(r));
        }

        #[test]
        fn reply_header_round_trip(error: u32, cookie: u64, flags: u16, kind: u16, len: u32, structured: bool) {
            let mut b = BytesMut::new();
            let want = if structured {
                put_chunk_header(&mut b, flags, kind, cookie, len);
                ReplyHeader::Chunk { flags, kind, cookie, len }
            } else {
                put_simple_reply(&mut b, error, cookie);
                ReplyHeader::Simple { error, cookie }
            };
            prop_assert_eq!(ReplyHeader::parse(&b), Ok(Some((want, b.len()))));
            // Any strict prefix asks for more bytes.
            for cut in 0..b.len() {
                prop_assert_eq!(ReplyHeader::parse(&b[..cut]), Ok(None));
            }
        }
    }
}
