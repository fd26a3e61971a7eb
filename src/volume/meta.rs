//! The superblock: the node's metadata, kept in `dir/meta`.
//!
//! The file holds two 4 KiB superblock slots at offsets 0 and 4096, then
//! the persistent dirty bitmap: [`bitmap::pages_for`] 4 KiB pages from
//! offset 8192 ([`meta_file_size`]). An update writes the slot *not*
//! holding the newest valid copy and fdatasyncs it; a read takes the valid
//! slot with the highest update counter. A torn superblock write therefore
//! never loses the previous state. Bitmap pages are written in place, each
//! with its own CRC; a torn page reads as all ones (see `tracking.rs`).

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{Lsn, VolumeError, bitmap};
use crate::io::{IoEngine, IoFile, IoOp};
use crate::model::DiskState;

/// Size of one superblock slot.
pub const SLOT_SIZE: usize = 4096;
/// Bitmap pages written per batch (4 MiB).
pub(crate) const PAGES_PER_IO: usize = 1024;
/// Offset of the first bitmap page in the `meta` file.
pub const BITMAP_OFFSET: u64 = 2 * SLOT_SIZE as u64;
pub const SUPERBLOCK_MAGIC: u64 = u64::from_le_bytes(*b"RBLKMETA");
/// Format version: 1 (repblock 0.1, no bitmap), 2 (resync: bitmap
/// granularity, bitmap pages after the slots, bitmap_base_lsn,
/// peer_written_lsn, gen_created_ms), 3 (automatic failover: the term at
/// byte 288). Version 1 is refused (run `create-md --force`); version 2 is
/// read as term 0 and written back as version 3 at the next superblock
/// update (opening the volume does one).
pub const SUPERBLOCK_VERSION: u32 = 3;
/// Oldest format version this build reads.
pub const SUPERBLOCK_MIN_VERSION: u32 = 2;

/// Size of the `meta` file of a volume of `size` bytes at `granularity`:
/// the two slots and the bitmap pages.
pub fn meta_file_size(size: u64, granularity: u32) -> u64 {
    BITMAP_OFFSET + (bitmap::pages_for(size, granularity) * bitmap::PAGE_SIZE) as u64
}
/// Longest resource or node name, in bytes.
pub const MAX_NAME_LEN: usize = 64;

/// Superblock flag: the volume was closed cleanly (cleared while open).
pub const FLAG_CLEAN_SHUTDOWN: u32 = 1;
/// Superblock flag: the dirty bitmap may hold bits that no record of this
/// node's WAL explains (a peer's bitmap merged, a verify difference, a full
/// sync or invalidate), so a log catch-up cannot replace a bitmap resync.
pub const FLAG_FOREIGN_MARKS: u32 = 2;

/// The node's metadata.
//
// Format of one 4 KiB slot (little endian):
//
// | off  | size | field                                             |
// |    0 |    8 | magic "RBLKMETA"                                  |
// |    8 |    4 | format version (3; 2 is read, as term 0)          |
// |   12 |    4 | flags (bit 0: CLEAN_SHUTDOWN, 1: FOREIGN_MARKS)   |
// |   16 |    8 | update counter (the newest valid slot wins)       |
// |   24 |   16 | volume uuid (random, made by create-md)           |
// |   40 |    8 | size in bytes                                     |
// |   48 |    4 | block size in bytes                               |
// |   52 |    1 | disk state (0 unknown, 1 uptodate, 2 consistent,  |
// |      |      |   3 outdated, 4 inconsistent, 5 diskless)         |
// |   53 |    3 | reserved (zero)                                   |
// |   56 |    8 | checkpoint LSN (all records <= it are in the data)|
// |   64 |    8 | replay seq (first WAL segment recovery reads)     |
// |   72 |    8 | generation id: current                            |
// |   80 |    8 | generation id: bitmap                             |
// |   88 |   32 | generation id: history [u64; 4]                   |
// |  120 |    1 | resource name length (<= 64)                      |
// |  121 |   64 | resource name (UTF-8, zero padded)                |
// |  185 |    1 | node name length (<= 64)                          |
// |  186 |   64 | node name (UTF-8, zero padded)                    |
// |  250 |    6 | reserved (zero)                                   |
// |  256 |    4 | bitmap granularity in bytes (power of two,        |
// |      |      |   4 KiB..1 MiB, fixed at create-md)               |
// |  260 |    4 | reserved (zero)                                   |
// |  264 |    8 | bitmap_base_lsn: the bitmap covers every block    |
// |      |      |   written by a record with LSN > it               |
// |  272 |    8 | peer_written_lsn: the peer had written every      |
// |      |      |   record <= it (recovery re-marks the records     |
// |      |      |   above it found in the retained WAL)             |
// |  280 |    8 | gen_created_ms: unix ms when gen_current was made |
// |  288 |    8 | term: the node's failover term (version 3; 0 in a |
// |      |      |   version-2 superblock)                           |
// |  296 | 3796 | reserved (zero)                                   |
// | 4092 |    4 | crc32c over bytes 0..4092                         |
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Superblock {
    pub flags: u32,
    pub counter: u64,
    pub uuid: u128,
    pub size: u64,
    pub block_size: u32,
    pub disk_state: DiskState,
    pub checkpoint_lsn: Lsn,
    pub replay_seq: u64,
    pub gen_current: u64,
    pub gen_bitmap: u64,
    pub gen_history: [u64; 4],
    pub resource: String,
    pub node: String,
    /// Bytes per bitmap bit.
    pub bitmap_granularity: u32,
    /// The bitmap covers every block written by a record with LSN > it.
    pub bitmap_base_lsn: Lsn,
    /// The peer had written every record <= it (as of the last checkpoint).
    pub peer_written_lsn: Lsn,
    /// Unix milliseconds when `gen_current` was made (0: unknown).
    pub gen_created_ms: u64,
    /// The node's failover term (docs/failover.md): persisted before the
    /// node acts on it; never lowered. 0 without failover.
    pub term: u64,
}

impl Superblock {
    pub fn clean_shutdown(&self) -> bool {
        self.flags & FLAG_CLEAN_SHUTDOWN != 0
    }

    /// Encodes one slot. Fails only on names longer than [`MAX_NAME_LEN`].
    pub fn encode(&self) -> Result<Vec<u8>, String> {
        for (what, name) in [("resource", &self.resource), ("node", &self.node)] {
            if name.len() > MAX_NAME_LEN {
                return Err(format!("{what} name is {} bytes, at most {MAX_NAME_LEN} fit", name.len()));
            }
        }
        let mut b = vec![0u8; SLOT_SIZE];
        b[0..8].copy_from_slice(&SUPERBLOCK_MAGIC.to_le_bytes());
        b[8..12].copy_from_slice(&SUPERBLOCK_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.flags.to_le_bytes());
        b[16..24].copy_from_slice(&self.counter.to_le_bytes());
        b[24..40].copy_from_slice(&self.uuid.to_le_bytes());
        b[40..48].copy_from_slice(&self.size.to_le_bytes());
        b[48..52].copy_from_slice(&self.block_size.to_le_bytes());
        b[52] = self.disk_state.code();
        b[56..64].copy_from_slice(&self.checkpoint_lsn.to_le_bytes());
        b[64..72].copy_from_slice(&self.replay_seq.to_le_bytes());
        b[72..80].copy_from_slice(&self.gen_current.to_le_bytes());
        b[80..88].copy_from_slice(&self.gen_bitmap.to_le_bytes());
        for (i, g) in self.gen_history.iter().enumerate() {
            b[88 + 8 * i..96 + 8 * i].copy_from_slice(&g.to_le_bytes());
        }
        b[120] = self.resource.len() as u8;
        b[121..121 + self.resource.len()].copy_from_slice(self.resource.as_bytes());
        b[185] = self.node.len() as u8;
        b[186..186 + self.node.len()].copy_from_slice(self.node.as_bytes());
        b[256..260].copy_from_slice(&self.bitmap_granularity.to_le_bytes());
        b[264..272].copy_from_slice(&self.bitmap_base_lsn.to_le_bytes());
        b[272..280].copy_from_slice(&self.peer_written_lsn.to_le_bytes());
        b[280..288].copy_from_slice(&self.gen_created_ms.to_le_bytes());
        b[288..296].copy_from_slice(&self.term.to_le_bytes());
        let crc = crc32c::crc32c(&b[..SLOT_SIZE - 4]);
        b[SLOT_SIZE - 4..].copy_from_slice(&crc.to_le_bytes());
        Ok(b)
    }

    /// Decodes one slot; the error says why it is not valid.
    pub fn decode(b: &[u8]) -> Result<Superblock, String> {
        if b.len() < SLOT_SIZE {
            return Err("short".into());
        }
        let b = &b[..SLOT_SIZE];
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        if u64_at(0) != SUPERBLOCK_MAGIC {
            return Err(if b.iter().all(|&x| x == 0) { "empty".into() } else { "bad magic".into() });
        }
        let stored = u32_at(SLOT_SIZE - 4);
        let computed = crc32c::crc32c(&b[..SLOT_SIZE - 4]);
        if stored != computed {
            return Err(format!("CRC mismatch (stored {stored:#010x}, computed {computed:#010x})"));
        }
        let version = u32_at(8);
        if !(SUPERBLOCK_MIN_VERSION..=SUPERBLOCK_VERSION).contains(&version) {
            return Err(format!(
                "{OLD_VERSION_PREFIX}{version} (this build reads {SUPERBLOCK_MIN_VERSION} to {SUPERBLOCK_VERSION})"
            ));
        }
        let bitmap_granularity = u32_at(256);
        bitmap::validate_granularity(bitmap_granularity).map_err(|e| format!("bitmap granularity {e}"))?;
        let disk_state = DiskState::from_code(b[52]).ok_or_else(|| format!("unknown disk state {}", b[52]))?;
        let name = |off: usize, what: &str| -> Result<String, String> {
            let len = b[off] as usize;
            if len > MAX_NAME_LEN {
                return Err(format!("{what} name length {len} exceeds {MAX_NAME_LEN}"));
            }
            String::from_utf8(b[off + 1..off + 1 + len].to_vec()).map_err(|_| format!("{what} name is not UTF-8"))
        };
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[24..40]);
        let mut gen_history = [0u64; 4];
        for (i, g) in gen_history.iter_mut().enumerate() {
            *g = u64_at(88 + 8 * i);
        }
        Ok(Superblock {
            flags: u32_at(12),
            counter: u64_at(16),
            uuid: u128::from_le_bytes(uuid),
            size: u64_at(40),
            block_size: u32_at(48),
            disk_state,
            checkpoint_lsn: u64_at(56),
            replay_seq: u64_at(64),
            gen_current: u64_at(72),
            gen_bitmap: u64_at(80),
            gen_history,
            resource: name(120, "resource")?,
            node: name(185, "node")?,
            bitmap_granularity,
            bitmap_base_lsn: u64_at(264),
            peer_written_lsn: u64_at(272),
            gen_created_ms: u64_at(280),
            // Version 2 had no term; its byte 288 was reserved.
            term: if version >= 3 { u64_at(288) } else { 0 },
        })
    }
}

/// How [`Superblock::decode`] reports another format version.
const OLD_VERSION_PREFIX: &str = "unsupported format version ";

/// The version a slot's decode error names, if it is a version error.
fn version_of(err: &str) -> Option<u32> {
    err.strip_prefix(OLD_VERSION_PREFIX)?.split(' ').next()?.parse().ok()
}

/// The open `meta` file and the newest superblock in it.
#[derive(Debug)]
pub(crate) struct MetaStore {
    file: IoFile,
    path: PathBuf,
    current: Superblock,
    /// Slot holding `current`.
    slot: usize,
}

impl MetaStore {
    /// Reads both slots and keeps the valid one with the highest counter.
    pub(crate) fn open(io: &dyn IoEngine, file: IoFile) -> Result<MetaStore, VolumeError> {
        let path = file.path().to_path_buf();
        let mut buf = vec![0u8; 2 * SLOT_SIZE];
        let len = io.len(&file).map_err(|e| VolumeError::io(&path, e))?;
        let avail = len.min(buf.len() as u64) as usize;
        io.read_exact_at(&file, &mut buf[..avail], 0).map_err(|e| VolumeError::io(&path, e))?;
        let a = Superblock::decode(&buf[..SLOT_SIZE]);
        let b = Superblock::decode(&buf[SLOT_SIZE..]);
        let (current, slot) = match (a, b) {
            (Ok(a), Ok(b)) => {
                if b.counter > a.counter {
                    (b, 1)
                } else {
                    (a, 0)
                }
            }
            (Ok(a), Err(e)) => {
                if e != "empty" {
                    tracing::warn!(path = %path.display(), slot = 1, reason = %e, "superblock slot invalid, using slot 0");
                }
                (a, 0)
            }
            (Err(e), Ok(b)) => {
                if e != "empty" {
                    tracing::warn!(path = %path.display(), slot = 0, reason = %e, "superblock slot invalid, using slot 1");
                }
                (b, 1)
            }
            (Err(ea), Err(eb)) => {
                if let Some(version) = version_of(&ea).or_else(|| version_of(&eb)) {
                    return Err(VolumeError::OldFormat { path, version });
                }
                return Err(VolumeError::BadSuperblock { path, reason: format!("slot 0: {ea}; slot 1: {eb}") });
            }
        };
        Ok(MetaStore { file, path, current, slot })
    }

    /// Writes a fresh superblock into slot 0, clears slot 1 and writes an
    /// empty bitmap (every page with its CRC) (create-md). The bitmap goes
    /// first: the superblock makes the file valid.
    pub(crate) fn create(io: &dyn IoEngine, file: IoFile, sb: Superblock) -> Result<MetaStore, VolumeError> {
        let path = file.path().to_path_buf();
        let enc = sb.encode().map_err(|reason| VolumeError::Invalid { what: "superblock".into(), reason })?;
        let mut both = enc;
        both.resize(2 * SLOT_SIZE, 0);
        let len = meta_file_size(sb.size, sb.bitmap_granularity);
        io.set_len(&file, 0).and_then(|()| io.set_len(&file, len)).map_err(|e| VolumeError::io(&path, e))?;
        let mut empty = bitmap::DirtyBitmap::new(sb.size, sb.bitmap_granularity)
            .map_err(|reason| VolumeError::Invalid { what: "bitmap_granularity".into(), reason })?;
        empty.mark_all_pages_dirty();
        let mut store = MetaStore { file, path, current: sb, slot: 0 };
        let uuid = store.current.uuid;
        store.write_bitmap(io, |from| empty.take_dirty_pages(uuid, from, PAGES_PER_IO))?;
        io.submit(&mut [IoOp::Write { file: &store.file, offset: 0, buf: &both }])
            .and_then(|()| io.sync_data(&store.file))
            .map_err(|e| VolumeError::io(&store.path, e))?;
        Ok(store)
    }

    /// Reads the bitmap pages into `bm` (which must be empty). A page that
    /// fails its check reads as all ones and is logged; the file being too
    /// short for the bitmap is an error.
    pub(crate) fn read_bitmap(&self, io: &dyn IoEngine, bm: &mut bitmap::DirtyBitmap) -> Result<(), VolumeError> {
        let want = meta_file_size(bm.size(), bm.granularity());
        let len = io.len(&self.file).map_err(|e| VolumeError::io(&self.path, e))?;
        if len < want {
            return Err(VolumeError::BadSuperblock {
                path: self.path.clone(),
                reason: format!("the file is {len} bytes; its bitmap needs {want}"),
            });
        }
        const PAGES_PER_READ: usize = 256;
        let mut buf = vec![0u8; PAGES_PER_READ * bitmap::PAGE_SIZE];
        let pages = bm.pages();
        let mut bad = 0usize;
        let mut p = 0;
        while p < pages {
            let n = (pages - p).min(PAGES_PER_READ);
            let chunk = &mut buf[..n * bitmap::PAGE_SIZE];
            let off = BITMAP_OFFSET + (p * bitmap::PAGE_SIZE) as u64;
            io.read_exact_at(&self.file, chunk, off).map_err(|e| VolumeError::io(&self.path, e))?;
            for i in 0..n {
                let page = &chunk[i * bitmap::PAGE_SIZE..(i + 1) * bitmap::PAGE_SIZE];
                if let Err(reason) = bm.load_page(p + i, page, self.current.uuid) {
                    bad += 1;
                    tracing::warn!(
                        path = %self.path.display(),
                        page = p + i,
                        offset = off + (i * bitmap::PAGE_SIZE) as u64,
                        reason = %reason,
                        "bitmap page invalid: every block it covers is marked out of sync"
                    );
                }
            }
            p += n;
        }
        if bad > 0 {
            tracing::warn!(path = %self.path.display(), bad_pages = bad, pages, "bitmap pages were invalid");
        }
        Ok(())
    }

    /// Writes the batches of encoded pages `take(from_page)` returns until
    /// it returns none, then fdatasyncs the file (if anything was written).
    /// Memory: one batch at a time.
    pub(crate) fn write_bitmap(
        &mut self,
        io: &dyn IoEngine,
        mut take: impl FnMut(usize) -> Vec<(usize, Vec<u8>)>,
    ) -> Result<usize, VolumeError> {
        let mut n = 0;
        let mut from = 0;
        loop {
            let pages = take(from);
            let Some(last) = pages.last() else { break };
            from = last.0 + 1;
            n += pages.len();
            self.write_bitmap_pages(io, &pages)?;
        }
        if n > 0 {
            self.sync(io)?;
        }
        Ok(n)
    }

    /// fdatasyncs the file.
    pub(crate) fn sync(&self, io: &dyn IoEngine) -> Result<(), VolumeError> {
        io.sync_data(&self.file).map_err(|e| VolumeError::io(&self.path, e))
    }

    /// Writes encoded bitmap pages (ascending index) in place, coalescing
    /// neighbours; not synced.
    pub(crate) fn write_bitmap_pages(
        &mut self,
        io: &dyn IoEngine,
        pages: &[(usize, Vec<u8>)],
    ) -> Result<(), VolumeError> {
        if pages.is_empty() {
            return Ok(());
        }
        const MAX_RUN: usize = 256;
        let mut run: Vec<u8> = Vec::new();
        let mut run_start = 0usize;
        let mut run_len = 0usize;
        let flush = |run: &[u8], start: usize| -> Result<(), VolumeError> {
            let off = BITMAP_OFFSET + (start * bitmap::PAGE_SIZE) as u64;
            io.write_all_at(&self.file, run, off).map_err(|e| VolumeError::io(&self.path, e))
        };
        for (p, bytes) in pages {
            if run_len > 0 && (*p != run_start + run_len || run_len == MAX_RUN) {
                flush(&run, run_start)?;
                run.clear();
                run_len = 0;
            }
            if run_len == 0 {
                run_start = *p;
            }
            run.extend_from_slice(bytes);
            run_len += 1;
        }
        flush(&run, run_start)
    }

    pub(crate) fn current(&self) -> &Superblock {
        &self.current
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Releases the lock `open` took on the file.
    pub(crate) fn unlock(&self) -> Result<(), VolumeError> {
        super::flock(&self.file, libc::LOCK_UN)
    }

    /// Durably replaces the superblock: writes the other slot with the next
    /// counter, then fdatasyncs. On error the in-memory copy is unchanged.
    pub(crate) fn write(&mut self, io: &dyn IoEngine, mut sb: Superblock) -> Result<(), VolumeError> {
        sb.counter = self.current.counter + 1;
        let enc = sb.encode().map_err(|reason| VolumeError::Invalid { what: "superblock".into(), reason })?;
        let slot = 1 - self.slot;
        let off = (slot * SLOT_SIZE) as u64;
        io.write_all_at(&self.file, &enc, off).map_err(|e| VolumeError::io(&self.path, e))?;
        io.sync_data(&self.file).map_err(|e| VolumeError::io(&self.path, e))?;
        self.current = sb;
        self.slot = slot;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::OpenMode;
    use crate::io::sync::SyncEngine;

    fn sample() -> Superblock {
        Superblock {
            flags: FLAG_CLEAN_SHUTDOWN,
            counter: 1,
            uuid: 0x0123_4567_89ab_cdef_0011_2233_4455_6677,
            size: 1 << 30,
            block_size: 4096,
            disk_state: DiskState::Inconsistent,
            checkpoint_lsn: 17,
            replay_seq: 3,
            gen_current: 99,
            gen_bitmap: 0,
            gen_history: [1, 2, 3, 4],
            resource: "r0".into(),
            node: "alpha".into(),
            bitmap_granularity: 8192,
            bitmap_base_lsn: 11,
            peer_written_lsn: 15,
            gen_created_ms: 1_700_000_000_000,
            term: 5,
        }
    }

    /// A version-2 slot: the same layout with byte 288 reserved (zero).
    fn version_2(sb: &Superblock) -> Vec<u8> {
        let mut raw = sb.encode().unwrap();
        raw[8..12].copy_from_slice(&2u32.to_le_bytes());
        raw[288..296].fill(0);
        let crc = crc32c::crc32c(&raw[..SLOT_SIZE - 4]);
        raw[SLOT_SIZE - 4..].copy_from_slice(&crc.to_le_bytes());
        raw
    }

    #[test]
    fn version_3_carries_the_term_and_version_2_reads_as_term_0() {
        let sb = sample();
        let enc = sb.encode().unwrap();
        assert_eq!(u32::from_le_bytes(enc[8..12].try_into().unwrap()), 3);
        assert_eq!(u64::from_le_bytes(enc[288..296].try_into().unwrap()), 5);
        assert_eq!(Superblock::decode(&enc).unwrap().term, 5);
        let old = Superblock::decode(&version_2(&sb)).unwrap();
        assert_eq!(old, Superblock { term: 0, ..sb }, "a version-2 superblock is the same but for the term");
        // Migration: the next write of a version-2 store is version 3.
        let d = tempfile::tempdir().unwrap();
        let (io, _st) = store(d.path());
        let f = io.open(&d.path().join("meta"), OpenMode::READ_WRITE).unwrap();
        io.write_all_at(&f, &version_2(&sample()), 0).unwrap();
        let mut st = reopen(&io, d.path()).unwrap();
        assert_eq!(st.current().term, 0);
        let next = Superblock { term: 9, ..st.current().clone() };
        st.write(&io, next).unwrap();
        let st = reopen(&io, d.path()).unwrap();
        assert_eq!(st.current().term, 9);
        let mut raw = vec![0u8; 2 * SLOT_SIZE];
        io.read_exact_at(&f, &mut raw, 0).unwrap();
        assert_eq!(u32::from_le_bytes(raw[SLOT_SIZE + 8..SLOT_SIZE + 12].try_into().unwrap()), 3);
        // A newer format than this build reads is refused, naming it.
        let mut v4 = sample().encode().unwrap();
        v4[8..12].copy_from_slice(&4u32.to_le_bytes());
        let crc = crc32c::crc32c(&v4[..SLOT_SIZE - 4]);
        v4[SLOT_SIZE - 4..].copy_from_slice(&crc.to_le_bytes());
        let e = Superblock::decode(&v4).unwrap_err();
        assert!(e.contains("version 4 (this build reads 2 to 3)"), "{e}");
    }

    #[test]
    fn version_1_is_refused_with_a_clear_message() {
        let d = tempfile::tempdir().unwrap();
        let (io, _st) = store(d.path());
        let f = io.open(&d.path().join("meta"), OpenMode::READ_WRITE).unwrap();
        // A version 1 slot: the same layout, version 1, a valid CRC.
        let mut raw = sample().encode().unwrap();
        raw[8..12].copy_from_slice(&1u32.to_le_bytes());
        let crc = crc32c::crc32c(&raw[..SLOT_SIZE - 4]);
        raw[SLOT_SIZE - 4..].copy_from_slice(&crc.to_le_bytes());
        io.write_all_at(&f, &raw, 0).unwrap();
        let err = reopen(&io, d.path()).unwrap_err();
        assert!(matches!(err, VolumeError::OldFormat { version: 1, .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("older repblock") && msg.contains("create-md --force") && msg.contains("meta"), "{msg}");
    }

    #[test]
    fn bitmap_pages_persist_and_a_torn_page_reads_as_ones() {
        let d = tempfile::tempdir().unwrap();
        let (io, mut st) = store(d.path());
        let sb = sample();
        let f = io.open(&d.path().join("meta"), OpenMode::READ_WRITE).unwrap();
        assert_eq!(io.len(&f).unwrap(), meta_file_size(sb.size, sb.bitmap_granularity));
        let mut bm = bitmap::DirtyBitmap::new(sb.size, sb.bitmap_granularity).unwrap();
        st.read_bitmap(&io, &mut bm).unwrap();
        assert!(bm.is_empty(), "create-md writes an empty bitmap");
        bm.set_range(0, 1);
        bm.set_range(sb.size - 1, 1);
        let pages = bm.take_dirty_pages(sb.uuid, 0, usize::MAX);
        assert_eq!(pages.len(), 2);
        st.write_bitmap_pages(&io, &pages).unwrap();
        st.sync(&io).unwrap();
        let back = reopen(&io, d.path()).unwrap();
        let mut again = bitmap::DirtyBitmap::new(sb.size, sb.bitmap_granularity).unwrap();
        back.read_bitmap(&io, &mut again).unwrap();
        assert_eq!(again.words(), bm.words());
        // Tear page 1 (offset 8192 + 4096): its blocks read as ones.
        io.write_all_at(&f, &[0xAB; 512], BITMAP_OFFSET + 4096 + 1024).unwrap();
        let mut torn = bitmap::DirtyBitmap::new(sb.size, sb.bitmap_granularity).unwrap();
        back.read_bitmap(&io, &mut torn).unwrap();
        assert_eq!(torn.count(), 2 + bitmap::PAGE_WORDS as u64 * 64);
        assert!(torn.get(bitmap::PAGE_WORDS as u64 * 64) && torn.get(2 * bitmap::PAGE_WORDS as u64 * 64 - 1));
        // A file too short for its bitmap is an error, not ones.
        io.set_len(&f, BITMAP_OFFSET + 4096).unwrap();
        let err = back.read_bitmap(&io, &mut torn).unwrap_err();
        assert!(err.to_string().contains("bitmap needs"), "{err}");
    }

    #[test]
    fn round_trip() {
        let sb = sample();
        let enc = sb.encode().unwrap();
        assert_eq!(Superblock::decode(&enc).unwrap(), sb);
    }

    #[test]
    fn long_names_are_refused() {
        let mut sb = sample();
        sb.node = "x".repeat(65);
        assert!(sb.encode().unwrap_err().contains("node name"));
        sb.node = "x".repeat(64);
        assert_eq!(Superblock::decode(&sb.encode().unwrap()).unwrap().node.len(), 64);
    }

    #[test]
    fn disk_state_names() {
        assert_eq!(serde_json::to_string(&DiskState::UpToDate).unwrap(), "\"uptodate\"");
        assert_eq!(serde_json::to_string(&DiskState::Inconsistent).unwrap(), "\"inconsistent\"");
        for s in [
            DiskState::UpToDate,
            DiskState::Consistent,
            DiskState::Outdated,
            DiskState::Inconsistent,
            DiskState::Diskless,
            DiskState::Unknown,
        ] {
            assert_eq!(DiskState::from_code(s.code()), Some(s));
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{s}\""));
        }
    }

    fn store(dir: &Path) -> (SyncEngine, MetaStore) {
        let io = SyncEngine::new();
        let f = io.open(&dir.join("meta"), OpenMode::CREATE).unwrap();
        let st = MetaStore::create(&io, f, sample()).unwrap();
        (io, st)
    }

    fn reopen(io: &SyncEngine, dir: &Path) -> Result<MetaStore, VolumeError> {
        let f = io.open(&dir.join("meta"), OpenMode::READ_WRITE).unwrap();
        MetaStore::open(io, f)
    }

    #[test]
    fn updates_alternate_slots_and_newest_wins() {
        let d = tempfile::tempdir().unwrap();
        let (io, mut st) = store(d.path());
        for i in 0..5u64 {
            let mut sb = st.current().clone();
            sb.checkpoint_lsn = 100 + i;
            st.write(&io, sb).unwrap();
            let back = reopen(&io, d.path()).unwrap();
            assert_eq!(back.current().checkpoint_lsn, 100 + i);
            assert_eq!(back.current().counter, 2 + i);
        }
    }

    #[test]
    fn torn_newest_slot_falls_back_to_older() {
        let d = tempfile::tempdir().unwrap();
        let (io, mut st) = store(d.path());
        let mut sb = st.current().clone();
        sb.checkpoint_lsn = 500;
        st.write(&io, sb).unwrap(); // slot 1, counter 2
        // Tear slot 1: its second half never reached the disk.
        let f = io.open(&d.path().join("meta"), OpenMode::READ_WRITE).unwrap();
        io.write_all_at(&f, &[0u8; 2048], (SLOT_SIZE + 2048) as u64).unwrap();
        let back = reopen(&io, d.path()).unwrap();
        assert_eq!(back.current().checkpoint_lsn, 17);
        assert_eq!(back.current().counter, 1);
        // The next write goes to the torn slot, not over the good one.
        let mut back = back;
        let mut sb = back.current().clone();
        sb.checkpoint_lsn = 600;
        back.write(&io, sb).unwrap();
        let again = reopen(&io, d.path()).unwrap();
        assert_eq!(again.current().checkpoint_lsn, 600);
        let mut raw = vec![0u8; SLOT_SIZE];
        io.read_exact_at(&f, &mut raw, 0).unwrap();
        assert_eq!(Superblock::decode(&raw).unwrap().checkpoint_lsn, 17);
    }

    #[test]
    fn both_slots_bad_is_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        let (io, mut st) = store(d.path());
        st.write(&io, st.current().clone()).unwrap();
        let f = io.open(&d.path().join("meta"), OpenMode::READ_WRITE).unwrap();
        io.write_all_at(&f, &[0xff], 100).unwrap();
        io.write_all_at(&f, &[0xff], (SLOT_SIZE + 100) as u64).unwrap();
        let err = reopen(&io, d.path()).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, VolumeError::BadSuperblock { .. }));
        assert!(
            msg.contains("meta") && msg.contains("slot 0: CRC mismatch") && msg.contains("slot 1: CRC mismatch"),
            "{msg}"
        );
    }
}
