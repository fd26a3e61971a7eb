//! The witness state file (`<dir>/witness.state`): the persisted
//! [`WitnessRecord`] in two alternating 4 KiB slots, like the superblock
//! (docs/formats.md, "Witness state file").
//!
//! An update writes the slot that does *not* hold the newest valid copy, with
//! the slot sequence + 1, by `pwrite` then `fdatasync`; only then does the
//! witness answer. A reader takes the valid slot (magic, CRC, version, zero
//! reserved bytes, field ranges) with the highest sequence, so a torn update
//! leaves the previous record readable in the other slot. A missing file, or
//! two invalid slots, is amnesia: the witness refuses to vote until
//! `repctl --node WITNESS create-md`. A failed write or sync is fail-stop: the file
//! refuses every later update (the witness must be restarted, and then reads
//! what is really on disk).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::lease::Term;
use super::witness::{NodeIndex, NodeSet, WitnessRecord, WitnessStore};

/// The state file's name inside the witness's `dir`.
pub const STATE_FILE: &str = "witness.state";
/// Bytes of one slot; the file is two slots.
pub const SLOT_SIZE: usize = 4096;
/// `"RBWT"` as a little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"RBWT");
/// Format version.
pub const VERSION: u16 = 1;
/// `primary` byte meaning "no primary".
pub const NO_PRIMARY: u8 = 0xff;

/// One slot's content.
//
// Format of one 4 KiB slot (little endian):
//
// | off  | size | field                                              |
// |    0 |    4 | magic "RBWT"                                       |
// |    4 |    2 | format version (1)                                 |
// |    6 |    2 | reserved (zero)                                    |
// |    8 |    8 | slot seq (the newest valid slot wins)              |
// |   16 |    8 | term                                               |
// |   24 |    1 | primary: node index 0..=7, 0xff none               |
// |   25 |    1 | uptodate mask: bit i = node index i                |
// |      |      |   (holds the primary, when there is one)           |
// |   26 |    6 | reserved (zero)                                    |
// |   32 |    8 | updated_unix_ms: when this slot was written        |
// |   40 | 4052 | reserved (zero)                                    |
// | 4092 |    4 | crc32c over bytes 0..4092                          |
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub seq: u64,
    pub record: WitnessRecord,
    pub updated_unix_ms: u64,
}

/// Why a slot was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlotError {
    #[error("{0} bytes, a slot is {SLOT_SIZE}")]
    Short(usize),
    #[error("bad magic {0:#010x}")]
    BadMagic(u32),
    #[error("bad CRC: stored {stored:#010x}, computed {computed:#010x}")]
    BadCrc { stored: u32, computed: u32 },
    #[error("format version {0}, this build reads {VERSION}")]
    Version(u16),
    #[error("reserved byte {0} is not zero")]
    Reserved(usize),
    #[error("primary {0:#04x} is neither a node index (0..=7) nor 0xff")]
    Primary(u8),
    #[error("primary {primary} is not in the uptodate mask {mask:#04x}")]
    PrimaryNotUptodate { primary: u8, mask: u8 },
    #[error("slot sequence 0 (never written)")]
    NeverWritten,
}

/// Errors of the state file.
#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{path}: exists (use --force to overwrite the witness's record)")]
    Exists { path: PathBuf },
    #[error("{path}: an earlier update failed; restart the witness")]
    Failed { path: PathBuf },
}

impl Slot {
    /// Encodes one slot.
    pub fn encode(&self) -> [u8; SLOT_SIZE] {
        let mut b = [0u8; SLOT_SIZE];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&VERSION.to_le_bytes());
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.record.term.0.to_le_bytes());
        b[24] = self.record.primary.map_or(NO_PRIMARY, |p| p.0);
        b[25] = self.record.uptodate.0;
        b[32..40].copy_from_slice(&self.updated_unix_ms.to_le_bytes());
        let crc = crc32c::crc32c(&b[..SLOT_SIZE - 4]);
        b[SLOT_SIZE - 4..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and checks one slot (never panics, whatever the bytes).
    pub fn decode(b: &[u8]) -> Result<Slot, SlotError> {
        if b.len() < SLOT_SIZE {
            return Err(SlotError::Short(b.len()));
        }
        let b = &b[..SLOT_SIZE];
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(x)
        };
        let magic = u32_at(0);
        if magic != MAGIC {
            return Err(SlotError::BadMagic(magic));
        }
        let stored = u32_at(SLOT_SIZE - 4);
        let computed = crc32c::crc32c(&b[..SLOT_SIZE - 4]);
        if stored != computed {
            return Err(SlotError::BadCrc { stored, computed });
        }
        let version = u16_at(4);
        if version != VERSION {
            return Err(SlotError::Version(version));
        }
        let reserved = (6..8).chain(26..32).chain(40..SLOT_SIZE - 4);
        if let Some(i) = reserved.into_iter().find(|&i| b[i] != 0) {
            return Err(SlotError::Reserved(i));
        }
        let seq = u64_at(8);
        if seq == 0 {
            return Err(SlotError::NeverWritten);
        }
        let primary = match b[24] {
            NO_PRIMARY => None,
            p if p <= NodeIndex::MAX => Some(NodeIndex(p)),
            p => return Err(SlotError::Primary(p)),
        };
        let uptodate = NodeSet(b[25]);
        if let Some(p) = primary
            && !uptodate.contains(p)
        {
            return Err(SlotError::PrimaryNotUptodate { primary: p.0, mask: uptodate.0 });
        }
        Ok(Slot {
            seq,
            record: WitnessRecord { term: Term(u64_at(16)), primary, uptodate },
            updated_unix_ms: u64_at(32),
        })
    }
}

/// What two slots hold: the newest valid one, and why each refused slot was
/// refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pick {
    /// The winning slot's index (0 or 1) and content.
    pub newest: Option<(usize, Slot)>,
    pub refused: [Option<SlotError>; 2],
}

/// Chooses between the two slots of `file` (the whole file's bytes; a file
/// shorter than two slots refuses the missing part). Never panics.
pub fn pick(file: &[u8]) -> Pick {
    let mut refused = [None, None];
    let mut newest: Option<(usize, Slot)> = None;
    for (i, r) in refused.iter_mut().enumerate() {
        let bytes = file.get(i * SLOT_SIZE..).unwrap_or(&[]);
        match Slot::decode(bytes) {
            Ok(s) => {
                if newest.is_none_or(|(_, n)| s.seq > n.seq) {
                    newest = Some((i, s));
                }
            }
            Err(e) => *r = Some(e),
        }
    }
    Pick { newest, refused }
}

/// What [`StateFile::open`] found.
#[derive(Debug)]
pub enum Loaded {
    /// A valid record: the witness votes (after its startup holdoff).
    Record { file: StateFile, slot: Slot },
    /// No usable record: the witness refuses to vote until re-initialised.
    Amnesia { why: String },
}

/// The open state file; implements [`WitnessStore`].
#[derive(Debug)]
pub struct StateFile {
    file: File,
    path: PathBuf,
    /// The slot holding the newest valid copy, and its sequence.
    newest: usize,
    seq: u64,
    failed: bool,
}

fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl StateFile {
    /// The path of the state file in a witness's `dir`.
    pub fn path_in(dir: &Path) -> PathBuf {
        dir.join(STATE_FILE)
    }

    /// `repctl --node WITNESS create-md`: writes a new file holding `record` (slot 0,
    /// sequence 1; slot 1 zeroed), syncs it and its directory. An existing
    /// file is refused unless `force`.
    pub fn create(path: &Path, record: WitnessRecord, force: bool) -> Result<StateFile, StateFileError> {
        let io = |op, source| StateFileError::Io { path: path.to_path_buf(), op, source };
        let mut opts = OpenOptions::new();
        opts.read(true).write(true).mode(0o600);
        if force {
            opts.create(true).truncate(true);
        } else {
            opts.create_new(true);
        }
        let file = match opts.open(path) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(StateFileError::Exists { path: path.to_path_buf() });
            }
            r => r.map_err(|e| io("open", e))?,
        };
        let slot = Slot { seq: 1, record, updated_unix_ms: unix_ms_now() };
        let mut bytes = vec![0u8; 2 * SLOT_SIZE];
        bytes[..SLOT_SIZE].copy_from_slice(&slot.encode());
        file.write_all_at(&bytes, 0).map_err(|e| io("write", e))?;
        file.sync_all().map_err(|e| io("fsync", e))?;
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io("fsync directory", e))?;
        Ok(StateFile { file, path: path.to_path_buf(), newest: 0, seq: 1, failed: false })
    }

    /// Opens the state file at witness start.
    pub fn open(path: &Path) -> Result<Loaded, StateFileError> {
        let io = |op, source| StateFileError::Io { path: path.to_path_buf(), op, source };
        let file = match OpenOptions::new().read(true).write(true).open(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok(Loaded::Amnesia { why: format!("{}: missing", path.display()) });
            }
            r => r.map_err(|e| io("open", e))?,
        };
        let mut bytes = vec![0u8; 2 * SLOT_SIZE];
        let mut got = 0;
        while got < bytes.len() {
            match file.read_at(&mut bytes[got..], got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io("read", e)),
            }
        }
        bytes.truncate(got);
        let p = pick(&bytes);
        match p.newest {
            Some((newest, slot)) => Ok(Loaded::Record {
                file: StateFile { file, path: path.to_path_buf(), newest, seq: slot.seq, failed: false },
                slot,
            }),
            None => {
                let why = |r: &Option<SlotError>| r.as_ref().map_or_else(String::new, ToString::to_string);
                Ok(Loaded::Amnesia {
                    why: format!(
                        "{}: no valid slot (slot 0: {}; slot 1: {})",
                        path.display(),
                        why(&p.refused[0]),
                        why(&p.refused[1])
                    ),
                })
            }
        }
    }

    /// The sequence of the newest slot.
    pub fn seq(&self) -> u64 {
        self.seq
    }
}

impl WitnessStore for StateFile {
    type Error = StateFileError;

    /// Writes the record into the older slot, then fdatasyncs. Returns only
    /// once it is durable; a failure is fail-stop.
    fn persist(&mut self, record: &WitnessRecord) -> Result<(), StateFileError> {
        if self.failed {
            return Err(StateFileError::Failed { path: self.path.clone() });
        }
        let target = 1 - self.newest;
        let slot = Slot { seq: self.seq + 1, record: *record, updated_unix_ms: unix_ms_now() };
        let offset = (target * SLOT_SIZE) as u64;
        let io = |op, source| StateFileError::Io { path: self.path.clone(), op, source };
        let result = self
            .file
            .write_all_at(&slot.encode(), offset)
            .map_err(|e| io("pwrite", e))
            .and_then(|()| self.file.sync_data().map_err(|e| io("fdatasync", e)));
        if let Err(e) = result {
            self.failed = true;
            return Err(e);
        }
        self.newest = target;
        self.seq = slot.seq;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rec(term: u64, primary: Option<u8>, mask: u8) -> WitnessRecord {
        WitnessRecord { term: Term(term), primary: primary.map(NodeIndex), uptodate: NodeSet(mask) }
    }

    fn open_record(path: &Path) -> (StateFile, WitnessRecord) {
        match StateFile::open(path).unwrap() {
            Loaded::Record { file, slot } => (file, slot.record),
            Loaded::Amnesia { why } => panic!("amnesia: {why}"),
        }
    }

    fn amnesia(path: &Path) -> String {
        match StateFile::open(path).unwrap() {
            Loaded::Amnesia { why } => why,
            Loaded::Record { slot, .. } => panic!("read {slot:?}"),
        }
    }

    #[test]
    fn slot_round_trip_and_layout() {
        let s = Slot { seq: 7, record: rec(42, Some(1), 0b11), updated_unix_ms: 1_700_000_000_123 };
        let b = s.encode();
        assert_eq!(&b[0..4], b"RBWT");
        assert_eq!(&b[4..6], &[1, 0]);
        assert_eq!(b[8], 7);
        assert_eq!(b[16], 42);
        assert_eq!((b[24], b[25]), (1, 0b11));
        assert_eq!(Slot::decode(&b), Ok(s));
        let none = Slot { seq: 1, record: WitnessRecord::BOOTSTRAP, updated_unix_ms: 0 };
        assert_eq!(none.encode()[24], 0xff);
        assert_eq!(Slot::decode(&none.encode()), Ok(none));
    }

    #[test]
    fn decode_refuses_each_bad_field() {
        let good = Slot { seq: 3, record: rec(5, Some(0), 0b01), updated_unix_ms: 9 }.encode();
        let with = |i: usize, v: u8| {
            let mut b = good;
            b[i] = v;
            let crc = crc32c::crc32c(&b[..SLOT_SIZE - 4]);
            b[SLOT_SIZE - 4..].copy_from_slice(&crc.to_le_bytes());
            Slot::decode(&b)
        };
        assert_eq!(Slot::decode(&good[..100]), Err(SlotError::Short(100)));
        assert!(matches!(with(0, b'X'), Err(SlotError::BadMagic(_))));
        let mut flipped = good;
        flipped[17] ^= 4;
        assert!(matches!(Slot::decode(&flipped), Err(SlotError::BadCrc { .. })));
        assert_eq!(with(4, 2), Err(SlotError::Version(2)));
        assert_eq!(with(7, 1), Err(SlotError::Reserved(7)));
        assert_eq!(with(30, 1), Err(SlotError::Reserved(30)));
        assert_eq!(with(4000, 1), Err(SlotError::Reserved(4000)));
        assert_eq!(with(24, 8), Err(SlotError::Primary(8)));
        assert_eq!(with(25, 0b10), Err(SlotError::PrimaryNotUptodate { primary: 0, mask: 0b10 }));
        assert_eq!(with(8, 0), Err(SlotError::NeverWritten));
    }

    #[test]
    fn create_open_persist_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = StateFile::path_in(dir.path());
        let mut f = StateFile::create(&path, WitnessRecord::BOOTSTRAP, false).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 2 * SLOT_SIZE as u64);
        assert!(matches!(
            StateFile::create(&path, WitnessRecord::BOOTSTRAP, false),
            Err(StateFileError::Exists { .. })
        ));
        for term in 1..=5u64 {
            f.persist(&rec(term, Some((term % 2) as u8), 0b11)).unwrap();
            let (g, r) = open_record(&path);
            assert_eq!(r, rec(term, Some((term % 2) as u8), 0b11));
            assert_eq!(g.seq(), term + 1);
            assert_eq!(g.newest, (term % 2) as usize, "the slots alternate");
        }
        // --force starts over.
        let f = StateFile::create(&path, rec(9, None, 0), true).unwrap();
        assert_eq!(f.seq(), 1);
        assert_eq!(open_record(&path).1, rec(9, None, 0));
    }

    /// A torn or lost update of either slot leaves the other one readable.
    #[test]
    fn a_torn_slot_falls_back_to_the_other() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.state");
        let mut f = StateFile::create(&path, rec(1, Some(0), 0b01), false).unwrap(); // slot 0, seq 1
        f.persist(&rec(2, Some(1), 0b10)).unwrap(); // slot 1, seq 2
        let before = std::fs::read(&path).unwrap();
        // The update to slot 1 torn halfway (its first 2 KiB old bytes are
        // gone, the rest stale): slot 0 wins.
        let mut torn = before.clone();
        torn[SLOT_SIZE..SLOT_SIZE + 2048].fill(0);
        std::fs::write(&path, &torn).unwrap();
        assert_eq!(open_record(&path).1, rec(1, Some(0), 0b01));
        // Torn only in its last sector (the CRC): the same.
        let mut torn = before.clone();
        torn[2 * SLOT_SIZE - 512..].copy_from_slice(&[0xaa; 512]);
        std::fs::write(&path, &torn).unwrap();
        assert_eq!(open_record(&path).1, rec(1, Some(0), 0b01));
        // Slot 0 damaged instead: slot 1, the newest, is read.
        let mut torn = before.clone();
        torn[100] ^= 1;
        std::fs::write(&path, &torn).unwrap();
        let (mut g, r) = open_record(&path);
        assert_eq!(r, rec(2, Some(1), 0b10));
        // The next update overwrites the damaged slot, never the good one.
        g.persist(&rec(3, Some(1), 0b11)).unwrap();
        let after = std::fs::read(&path).unwrap();
        assert_eq!(after[SLOT_SIZE..], before[SLOT_SIZE..]);
        assert_eq!(open_record(&path).1, rec(3, Some(1), 0b11));
        // A file cut short (power loss while creating): the whole slot 0 is
        // there, slot 1 missing.
        std::fs::write(&path, &after[..SLOT_SIZE + 10]).unwrap();
        assert_eq!(open_record(&path).1, rec(3, Some(1), 0b11));
    }

    #[test]
    fn both_slots_invalid_or_a_missing_file_is_amnesia() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.state");
        let why = amnesia(&path);
        assert!(why.ends_with("missing"), "{why}");
        let mut f = StateFile::create(&path, rec(1, Some(0), 1), false).unwrap();
        f.persist(&rec(2, Some(0), 1)).unwrap();
        let mut b = std::fs::read(&path).unwrap();
        b[0] = 0;
        b[SLOT_SIZE + 20] ^= 0x10;
        std::fs::write(&path, &b).unwrap();
        let why = amnesia(&path);
        assert!(why.contains("slot 0: bad magic") && why.contains("slot 1: bad CRC"), "{why}");
        std::fs::write(&path, b"").unwrap();
        let why = amnesia(&path);
        assert!(why.contains("slot 0: 0 bytes"), "{why}");
    }

    #[test]
    fn a_failed_update_is_fail_stop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.state");
        let f = StateFile::create(&path, WitnessRecord::BOOTSTRAP, false).unwrap();
        // A read-only descriptor makes pwrite fail with EBADF.
        let mut ro = StateFile { file: File::open(&path).unwrap(), ..f };
        let e = ro.persist(&rec(1, Some(0), 1)).unwrap_err();
        assert!(matches!(e, StateFileError::Io { op: "pwrite", .. }), "{e}");
        assert!(matches!(ro.persist(&rec(1, Some(0), 1)), Err(StateFileError::Failed { .. })));
        assert_eq!(open_record(&path).1, WitnessRecord::BOOTSTRAP);
    }

    /// The witness on a real state file: a grant survives a restart.
    #[test]
    fn the_witness_persists_through_the_file() {
        use crate::failover::lease::MonoTime;
        use crate::failover::witness::{Decision, Request, Witness};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.state");
        let mut f = StateFile::create(&path, rec(4, Some(0), 0b11), false).unwrap();
        let wait = std::time::Duration::from_secs(1);
        let mut w = Witness::start(Some(rec(4, Some(0), 0b11)), wait, MonoTime(0));
        let now = MonoTime(2_000_000_000);
        let Decision::Persist(p) = w.handle(Request::Claim { term: Term(4), node: NodeIndex(1), forced: false }, now)
        else {
            panic!("a grant persists");
        };
        let g = p.persist(&mut f, now).unwrap().unwrap();
        assert_eq!(g.term, Term(5));
        assert_eq!(open_record(&path).1, rec(5, Some(1), 0b10));
    }

    proptest! {
        #[test]
        fn the_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2 * SLOT_SIZE + 64)) {
            let _ = Slot::decode(&bytes);
            let _ = pick(&bytes);
        }

        #[test]
        fn one_flipped_bit_is_always_refused(seq in 1u64.., term: u64, p in 0u8..2, bit in 0usize..SLOT_SIZE * 8) {
            let s = Slot { seq, record: rec(term, Some(p), 0b11), updated_unix_ms: 77 };
            let mut b = s.encode();
            prop_assert_eq!(Slot::decode(&b), Ok(s));
            b[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(Slot::decode(&b).is_err());
        }

        #[test]
        fn pick_takes_the_newest_valid(a in 1u64..100, b in 1u64..100, bad in 0usize..3) {
            let s0 = Slot { seq: a, record: rec(a, None, 0), updated_unix_ms: 0 };
            let s1 = Slot { seq: b, record: rec(b, None, 0), updated_unix_ms: 0 };
            let mut file = [s0.encode(), s1.encode()].concat();
            if bad < 2 {
                file[bad * SLOT_SIZE + 50] ^= 1;
            }
            let got = pick(&file).newest.map(|(i, s)| (i, s.seq));
            let want = match bad {
                0 => Some((1, b)),
                1 => Some((0, a)),
                _ if b > a => Some((1, b)),
                _ => Some((0, a)),
            };
            prop_assert_eq!(got, want);
        }
    }
}
