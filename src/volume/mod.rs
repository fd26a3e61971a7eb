//! The local volume: data file (or block device) + write-ahead log + metadata.
//!
//! API contract (the node, the NBD backend and replication rely on it; the
//! replication and resync parts are described below the list):
//!
//! - [`create_md`] initialises a node directory (superblock, WAL directory,
//!   data file unless `disk` is given). Refuses if metadata exists unless
//!   `force`, and always refuses a directory an open volume holds.
//! - [`Volume::open`] locks the directory (an exclusive `flock` on `meta`),
//!   validates the superblock against the config, runs crash recovery
//!   (replays the WAL from the last checkpoint into the data file, truncates
//!   a torn tail, refuses corruption of a durable record naming file and
//!   offset), checkpoints, and starts the log writer and checkpointer
//!   threads. It blocks: call it from a blocking context.
//! - `write` / `trim` / `write_zeroes` assign an LSN, append the record to the
//!   WAL and apply it to the data file, then complete; with `fua` they
//!   complete only once they are durable. Writes of 128 KiB or more go to the
//!   data file only, with a payload-less WAL record, when no replayable
//!   record overlaps them (docs/formats.md, `WriteInPlace`); a durability
//!   point then fdatasyncs the data file too.
//! - `flush` makes every write completed before it durable (group commit:
//!   concurrent flushes and FUA writes share one fdatasync).
//! - Reads go to the data file; a read sees every completed write.
//! - Any WAL write, data write or fdatasync failure is fail-stop: every later
//!   write, trim, write-zeroes and flush fails with [`VolumeError::Stopped`]
//!   carrying the reason (a [`FailStop`]: its kind, the operation and the
//!   errno), and `status().failed` says why.
//! - `close` drains the queue, checkpoints, marks the superblock clean, stops
//!   the threads and releases the lock. Dropping a `Volume` without `close`
//!   stops the threads but leaves the superblock unclean: the next open
//!   replays the WAL as after a crash.
//!
//! Memory: the writer's batch buffer holds at most 16 MiB of payload (plus
//! one record); recovery reads segments through a 4 MiB window and applies
//! at most 4 MiB of pending payload at a time.
//!
//! Replication ([`replica`] and [`feed`]): the log writer publishes
//! every committed record, flush barrier and full-sync read into one
//! bounded [`Feed`] for the primary's sender, in commit order; a secondary
//! applies the primary's records with their LSNs (`apply`), full-sync data
//! (`apply_sync_data`), and rebases its log when a full sync starts.
//!
//! Resync ([`bitmap`], [`tracking`], [`logread`]): a persistent
//! dirty bitmap (one bit per `bitmap_granularity` bytes, in `meta` after the
//! superblock slots), set by the log writer while tracking or from the
//! unacked ring when the link drops, re-marked by recovery from the WAL
//! records above the persisted `peer_written_lsn`; WAL retention for log
//! catch-up bounded by `wal_retain` (records are marked before they are
//! dropped); `log_reader` reads retained records back.
//!
//! Modules: [`wal`] (record and segment header codec), [`meta`]
//! (superblock), [`bitmap`] (the in-memory bitmap and its page codec),
//! [`tracking`] (tracking, the unacked ring, persistence), [`segment`]
//! (segment files, spares, recycling), [`recovery`], [`writer`] (log writer
//! thread, group commit), [`checkpoint`], [`logread`], [`feed`] and
//! [`replica`]. The byte formats are drawn in docs/formats.md.

use std::fmt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::io::{IoEngine, IoFile, OpenMode};
use crate::model::{DiskState, GenIds, unix_ms};

pub mod al;
pub mod bitmap;
pub mod checkpoint;
pub mod failstop;
pub mod feed;
pub mod logread;
pub mod meta;
pub mod recovery;
pub mod replica;
pub mod segment;
pub mod tracking;
pub mod wal;
pub mod writer;

pub use failstop::{FailStop, FailStopKind};
pub use feed::{Feed, FeedItem, FeedOp};
pub use logread::LogReader;
pub use meta::Superblock;
pub use recovery::{LogEnd, RecoveryReport};
pub use replica::MAX_SYNC_CHUNK;

use checkpoint::CkptCtl;
use meta::{FLAG_CLEAN_SHUTDOWN, MetaStore};
use segment::{WalFiles, parking};
use wal::{SEGMENT_HEADER_SIZE, SegmentHeader};
use writer::{Msg, Op, Request, Writer};

pub use crate::model::Lsn;

/// Default size of a WAL segment file (64 MiB).
pub const DEFAULT_WAL_SEGMENT_SIZE: u64 = 64 << 20;
/// Default WAL volume between checkpoints (256 MiB).
pub const DEFAULT_CHECKPOINT_BYTES: u64 = 256 << 20;
/// Default longest time between checkpoints while writes arrive (30 s).
pub const DEFAULT_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(30);
/// Smallest accepted WAL segment size (64 KiB).
pub const MIN_WAL_SEGMENT_SIZE: u64 = 64 << 10;
/// Largest payload of one WAL record; bigger writes are split.
pub const MAX_RECORD_PAYLOAD: usize = 8 << 20;
/// Default WAL bytes kept for a peer beyond the checkpoint (1 GiB).
pub const DEFAULT_WAL_RETAIN: u64 = 1 << 30;
pub use bitmap::DEFAULT_GRANULARITY as DEFAULT_BITMAP_GRANULARITY;
pub use bitmap::{MAX_GRANULARITY as MAX_BITMAP_GRANULARITY, MIN_GRANULARITY as MIN_BITMAP_GRANULARITY};
pub use meta::MAX_NAME_LEN;
/// Default block size (4 KiB).
pub const DEFAULT_BLOCK_SIZE: u32 = 4096;
/// Smallest block size (512 B).
pub const MIN_BLOCK_SIZE: u32 = 512;
/// Largest block size (1 MiB).
pub const MAX_BLOCK_SIZE: u32 = 1 << 20;

/// Whether `bs` is an accepted block size: a power of two from
/// [`MIN_BLOCK_SIZE`] to [`MAX_BLOCK_SIZE`].
pub fn valid_block_size(bs: u64) -> bool {
    bs.is_power_of_two() && (u64::from(MIN_BLOCK_SIZE)..=u64::from(MAX_BLOCK_SIZE)).contains(&bs)
}

/// Where and how a node keeps its volume.
#[derive(Debug, Clone)]
pub struct VolumeOptions {
    /// Node directory: superblock (`meta`), `wal/`, and `data` unless `disk`.
    pub dir: PathBuf,
    /// Optional block device (or file) holding the data instead of `dir/data`.
    pub disk: Option<PathBuf>,
    /// Size of one WAL segment file.
    pub wal_segment_size: u64,
    /// Checkpoint once this many WAL bytes were written since the last one.
    pub checkpoint_bytes: u64,
    /// Checkpoint at least this often while writes arrive.
    pub checkpoint_interval: Duration,
    /// Bytes per dirty-bitmap bit: written by create-md; `open` refuses a
    /// volume created with another value.
    pub bitmap_granularity: u32,
    /// WAL bytes kept beyond the checkpoint for a peer that has not made
    /// them durable (log catch-up); older records are marked in the bitmap
    /// and dropped.
    pub wal_retain: u64,
    /// Extents (4 MiB each) the activity log keeps hot (`al_extents`,
    /// src/volume/al.rs): a write to a cold one costs a log write first.
    pub al_extents: usize,
}

impl VolumeOptions {
    /// Options with the defaults for `dir` (data in `dir/data`).
    pub fn new(dir: impl Into<PathBuf>) -> VolumeOptions {
        VolumeOptions {
            dir: dir.into(),
            disk: None,
            wal_segment_size: DEFAULT_WAL_SEGMENT_SIZE,
            checkpoint_bytes: DEFAULT_CHECKPOINT_BYTES,
            checkpoint_interval: DEFAULT_CHECKPOINT_INTERVAL,
            bitmap_granularity: DEFAULT_BITMAP_GRANULARITY,
            wal_retain: DEFAULT_WAL_RETAIN,
            al_extents: al::DEFAULT_EXTENTS,
        }
    }

    /// `dir/meta`.
    pub fn meta_path(&self) -> PathBuf {
        self.dir.join("meta")
    }

    /// `dir/wal`.
    pub fn wal_dir(&self) -> PathBuf {
        self.dir.join("wal")
    }

    /// The data file or block device.
    pub fn data_path(&self) -> PathBuf {
        self.disk.clone().unwrap_or_else(|| self.dir.join("data"))
    }

    fn validate(&self) -> Result<(), VolumeError> {
        let bad = |what: &str, reason: String| Err(VolumeError::Invalid { what: what.into(), reason });
        if self.wal_segment_size < MIN_WAL_SEGMENT_SIZE || !self.wal_segment_size.is_multiple_of(4096) {
            return bad(
                "wal_segment_size",
                format!(
                    "{} bytes; expected a multiple of 4096, at least {MIN_WAL_SEGMENT_SIZE}",
                    self.wal_segment_size
                ),
            );
        }
        if self.checkpoint_bytes == 0 {
            return bad("checkpoint_bytes", "0; expected a positive size".into());
        }
        if self.checkpoint_interval.is_zero() {
            return bad("checkpoint_interval", "0; expected a positive duration".into());
        }
        bitmap::validate_granularity(self.bitmap_granularity).or_else(|r| bad("bitmap_granularity", r))?;
        Ok(())
    }
}

/// What `create-md` writes into a new superblock.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub resource: String,
    pub node: String,
    /// Volume size in bytes (a multiple of `block_size`).
    pub size: u64,
    /// Block size in bytes (4096 by default; the bitmap granularity later).
    pub block_size: u32,
    /// Overwrite existing metadata.
    pub force: bool,
}

/// What the config says this volume must be; `open` refuses a mismatch.
#[derive(Debug, Clone)]
pub struct Identity {
    pub resource: String,
    pub node: String,
    pub size: u64,
}

/// Volume errors.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// Fail-stop: the volume takes no more writes ([`FailStop::kind`] says
    /// why, e.g. a full filesystem).
    #[error("Volume stopped taking writes: {0}")]
    Stopped(FailStop),
    #[error("Request [{offset}, +{len}) is outside the volume of {size} bytes")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("IO error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("No metadata at {path}: run create-md first")]
    NoMetadata { path: PathBuf },
    #[error("Metadata already exists at {path}; use --force to overwrite it")]
    MetadataExists { path: PathBuf },
    #[error("Metadata {path} is in use by another open volume (is repd already running?)")]
    InUse { path: PathBuf },
    #[error(
        "Metadata {path} was created by an older repblock (format version {version}); run create-md --force \
         (keeps the data, starts a new log and bitmap)"
    )]
    OldFormat { path: PathBuf, version: u32 },
    #[error("Record LSN {lsn} is not in the WAL: {reason}")]
    NotInLog { lsn: Lsn, reason: String },
    #[error("Corrupt superblock in {path}: {reason}")]
    BadSuperblock { path: PathBuf, reason: String },
    #[error(
        "Metadata in {path} does not match the config: {field} is {metadata} in the metadata but {config} in the config"
    )]
    Mismatch { path: PathBuf, field: &'static str, config: String, metadata: String },
    #[error("Disk {path} is {len} bytes, smaller than the volume size of {size} bytes")]
    DiskTooSmall { path: PathBuf, len: u64, size: u64 },
    #[error("Invalid {what}: {reason}")]
    Invalid { what: String, reason: String },
    #[error("WAL corrupt in {path} at byte {offset} (LSN {lsn}): {reason}; refusing to start")]
    WalCorrupt { path: PathBuf, offset: u64, lsn: Lsn, reason: String },
    #[error(
        "Replicated record LSN {got} is out of sequence: the local log expects LSN {expected}; nothing was applied"
    )]
    LsnGap { expected: Lsn, got: Lsn },
}

impl VolumeError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> VolumeError {
        VolumeError::Io { path: path.to_path_buf(), source }
    }
}

/// A snapshot of the volume's state for `status`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct VolumeStatus {
    /// Highest LSN assigned and applied locally.
    pub local_lsn: Lsn,
    /// Highest LSN known durable in the local WAL.
    pub durable_lsn: Lsn,
    /// LSN of the last checkpoint (everything up to it is in the synced data file).
    pub checkpoint_lsn: Lsn,
    /// Bytes of WAL currently kept on disk.
    pub wal_bytes: u64,
    /// Why the volume stopped taking writes, if it did.
    pub failed: Option<String>,
    /// Counters since the volume was opened ([`VolumeCounters`]).
    pub counters: VolumeCounterValues,
}

/// Operation counters of a volume since it was opened (`status`
/// statistics and `/metrics`): relaxed atomics, one increment per event.
#[derive(Debug, Default)]
pub struct VolumeCounters {
    /// fdatasyncs of the WAL (a group commit, or a checkpoint's).
    pub wal_syncs: AtomicU64,
    /// Completed checkpoints.
    pub checkpoints: AtomicU64,
    /// Dirty bitmap pages written to the metadata file.
    pub bitmap_writes: AtomicU64,
}

/// A reading of [`VolumeCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct VolumeCounterValues {
    pub wal_syncs: u64,
    pub checkpoints: u64,
    pub bitmap_writes: u64,
}

impl VolumeCounters {
    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub fn values(&self) -> VolumeCounterValues {
        VolumeCounterValues {
            wal_syncs: self.wal_syncs.load(Ordering::Relaxed),
            checkpoints: self.checkpoints.load(Ordering::Relaxed),
            bitmap_writes: self.bitmap_writes.load(Ordering::Relaxed),
        }
    }
}

/// State shared by the API, the log writer and the checkpointer.
pub(crate) struct Shared {
    pub io: Arc<dyn IoEngine>,
    pub data: IoFile,
    pub meta: Mutex<MetaStore>,
    pub wal: Mutex<WalFiles>,
    /// Signalled when WAL space was freed (the writer waits on it, with `wal`).
    pub space: Condvar,
    pub wal_dir: PathBuf,
    pub uuid: u128,
    pub size: u64,
    pub segment_size: u64,
    pub max_record_payload: usize,
    /// WAL bytes beyond which the writer waits for a checkpoint.
    pub wal_limit: u64,
    pub checkpoint_bytes: u64,
    pub checkpoint_interval: Duration,
    pub applied_lsn: AtomicU64,
    pub durable_lsn: AtomicU64,
    pub checkpoint_lsn: AtomicU64,
    /// WAL bytes written since open, and its value at the last checkpoint.
    pub wal_written: AtomicU64,
    pub ckpt_wal_written: AtomicU64,
    /// Segments holding LSNs at or above it are not recycled (`u64::MAX`: none).
    pub min_retained_lsn: AtomicU64,
    /// Bytes of checkpointed segments a liftable hold may keep.
    pub wal_retain: AtomicU64,
    /// The dirty bitmap, the tracking mode and the unacked ring.
    pub tracker: Mutex<tracking::Tracker>,
    /// Serialises bitmap persistence.
    pub bitmap_io: Mutex<()>,
    /// Ranges replay would write (see [`writer::ReplayRanges`]).
    pub replay_ranges: Mutex<writer::ReplayRanges>,
    /// The activity log (src/volume/al.rs), written by the log writer.
    pub activity: Mutex<al::ActivityLog>,
    failed: Mutex<Option<FailStop>>,
    failed_flag: AtomicBool,
    stopping: AtomicBool,
    pub ckpt_ctl: Mutex<CkptCtl>,
    pub ckpt_cv: Condvar,
    /// Serialises checkpoints.
    pub ckpt_lock: Mutex<()>,
    /// The replication feed the writer publishes into.
    pub feed: feed::FeedHub,
    /// The peer's retention hold was lifted because the WAL filled up
    /// (see `Volume::set_retain_after`).
    pub retention_lifted: AtomicBool,
    /// The current hold came from `set_retain_after` and may be lifted
    /// when the WAL fills (a `set_min_retained_lsn` hold is never lifted).
    pub retention_liftable: AtomicBool,
    /// WAL syncs, checkpoints, bitmap writes (statistics).
    pub counters: VolumeCounters,
}

impl Shared {
    /// Why the volume stopped taking writes, if it did.
    pub(crate) fn failure(&self) -> Option<FailStop> {
        if !self.failed_flag.load(Ordering::Acquire) {
            return None;
        }
        parking::lock(&self.failed).clone()
    }

    /// Stops the volume (fail-stop) and logs why, once. Returns the reason
    /// in force (the first one).
    pub(crate) fn fail(&self, reason: FailStop) -> FailStop {
        let mut f = parking::lock(&self.failed);
        if let Some(first) = &*f {
            return first.clone();
        }
        tracing::error!(
            reason = %reason,
            kind = ?reason.kind(),
            wal = %self.wal_dir.display(),
            data = %self.data.path().display(),
            lsn = self.applied_lsn.load(Ordering::Acquire),
            durable_lsn = self.durable_lsn.load(Ordering::Acquire),
            "volume stopped taking writes"
        );
        *f = Some(reason.clone());
        self.failed_flag.store(true, Ordering::Release);
        drop(f);
        self.space.notify_all();
        reason
    }

    pub(crate) fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    pub(crate) fn request_checkpoint(&self) {
        parking::lock(&self.ckpt_ctl).requested = true;
        self.ckpt_cv.notify_one();
    }

    /// Wakes the checkpointer when enough WAL was written since the last
    /// checkpoint.
    pub(crate) fn maybe_request_checkpoint(&self) {
        let pending =
            self.wal_written.load(Ordering::Acquire).saturating_sub(self.ckpt_wal_written.load(Ordering::Acquire));
        if pending >= self.checkpoint_bytes {
            self.request_checkpoint();
        }
    }
}

/// The open volume.
pub struct Volume {
    shared: Arc<Shared>,
    tx: Sender<Msg>,
    writer: Mutex<Option<JoinHandle<()>>>,
    checkpointer: Mutex<Option<JoinHandle<()>>>,
    closed: AtomicBool,
    recovery: RecoveryReport,
}

impl fmt::Debug for Volume {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Volume")
            .field("wal_dir", &self.shared.wal_dir)
            .field("data", &self.shared.data.path())
            .field("size", &self.shared.size)
            .field("engine", &self.shared.io.kind())
            .finish_non_exhaustive()
    }
}

fn validate_names(resource: &str, node: &str) -> Result<(), VolumeError> {
    for (what, v) in [("resource name", resource), ("node name", node)] {
        if v.is_empty() || v.len() > MAX_NAME_LEN {
            return Err(VolumeError::Invalid {
                what: what.into(),
                reason: format!("{v:?} is {} bytes; expected 1 to {MAX_NAME_LEN}", v.len()),
            });
        }
    }
    Ok(())
}

/// Opens the data file (or disk) and checks it holds `size` bytes.
fn open_data(io: &dyn IoEngine, opts: &VolumeOptions, size: u64) -> Result<IoFile, VolumeError> {
    let path = opts.data_path();
    let file = io.open(&path, OpenMode::READ_WRITE).map_err(|e| VolumeError::io(&path, e))?;
    let len = io.len(&file).map_err(|e| VolumeError::io(&path, e))?;
    if len < size {
        return Err(VolumeError::DiskTooSmall { path, len, size });
    }
    Ok(file)
}

/// Takes (or releases) the exclusive advisory lock on the `meta` file that
/// keeps two processes (or two `Volume`s) from using one node directory.
pub(crate) fn flock(file: &IoFile, op: libc::c_int) -> Result<(), VolumeError> {
    loop {
        // SAFETY: flock(2) on a descriptor that `file` keeps open; no memory
        // is passed.
        let rc = unsafe { libc::flock(file.raw_fd(), op) };
        if rc == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) => return Err(VolumeError::InUse { path: file.path().to_path_buf() }),
            _ => return Err(VolumeError::io(file.path(), e)),
        }
    }
}

/// Syncs a directory's parent so that the directory's own creation is
/// durable; best effort (the parent may not be ours to open).
fn sync_parent(io: &dyn IoEngine, dir: &Path) {
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty())
        && let Err(e) = io.sync_dir(parent)
    {
        tracing::warn!(path = %parent.display(), error = %e, "could not sync the parent directory");
    }
}

/// Creates `dir` (and its parents) with mode 0700 if missing.
fn create_private_dir(dir: &std::path::Path) -> Result<(), VolumeError> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|e| VolumeError::io(dir, e))
}

/// Initialises metadata for a new volume.
///
/// Creates `dir` (mode 0700) if needed, the `wal/` directory, and the data
/// file (sparse, `size` bytes) unless `disk` names one, which must hold at
/// least `size` bytes. The superblock is written last: a `meta` file means
/// create-md completed. Refuses when `dir/meta` exists unless `force`
/// (which also removes old WAL segments; the data is kept).
pub fn create_md(io: &dyn IoEngine, opts: &VolumeOptions, create: &CreateOptions) -> Result<(), VolumeError> {
    opts.validate()?;
    validate_names(&create.resource, &create.node)?;
    let bs = create.block_size;
    if !valid_block_size(bs.into()) {
        return Err(VolumeError::Invalid {
            what: "block_size".into(),
            reason: format!("{bs}; expected a power of two from 512 to 1 MiB"),
        });
    }
    if create.size == 0 || !create.size.is_multiple_of(u64::from(bs)) {
        return Err(VolumeError::Invalid {
            what: "size".into(),
            reason: format!("{} bytes; expected a positive multiple of the block size {bs}", create.size),
        });
    }
    let meta_path = opts.meta_path();
    if meta_path.exists() && !create.force {
        return Err(VolumeError::MetadataExists { path: meta_path });
    }
    // Even with force, never re-create under an open volume.
    let _held = match io.open(&meta_path, OpenMode::READ_WRITE) {
        Ok(f) => {
            flock(&f, libc::LOCK_EX | libc::LOCK_NB)?;
            Some(f)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(VolumeError::io(&meta_path, e)),
    };
    create_private_dir(&opts.dir)?;
    let wal_dir = opts.wal_dir();
    create_private_dir(&wal_dir)?;
    // Old segments (force): another volume's log must not linger.
    let listing = segment::list_dir(&wal_dir).map_err(|e| VolumeError::io(&wal_dir, e))?;
    for p in listing.segments.values().chain(&listing.spares).chain(&listing.temporary) {
        io.remove(p).map_err(|e| VolumeError::io(p, e))?;
    }
    // An old activity log belongs to the old volume (another uuid).
    let al_path = opts.dir.join(al::AL_FILE);
    if al_path.exists() {
        io.remove(&al_path).map_err(|e| VolumeError::io(&al_path, e))?;
    }
    io.sync_dir(&wal_dir).map_err(|e| VolumeError::io(&wal_dir, e))?;

    let data_path = opts.data_path();
    if opts.disk.is_some() {
        open_data(io, opts, create.size)?;
    } else {
        let file = io.open(&data_path, OpenMode::CREATE).map_err(|e| VolumeError::io(&data_path, e))?;
        let len = io.len(&file).map_err(|e| VolumeError::io(&data_path, e))?;
        if len != create.size {
            io.set_len(&file, create.size).map_err(|e| VolumeError::io(&data_path, e))?;
        }
        io.sync_data(&file).map_err(|e| VolumeError::io(&data_path, e))?;
    }

    let generation = GenIds::fresh();
    let sb = Superblock {
        flags: FLAG_CLEAN_SHUTDOWN,
        counter: 1,
        uuid: rand::random::<u128>(),
        size: create.size,
        block_size: bs,
        disk_state: DiskState::Inconsistent,
        checkpoint_lsn: 0,
        replay_seq: 1,
        gen_current: generation.current,
        gen_bitmap: generation.bitmap,
        gen_history: generation.history,
        resource: create.resource.clone(),
        node: create.node.clone(),
        bitmap_granularity: opts.bitmap_granularity,
        bitmap_base_lsn: 0,
        peer_written_lsn: 0,
        gen_created_ms: unix_ms(),
        term: 0,
    };
    let file = io.open(&meta_path, OpenMode::CREATE).map_err(|e| VolumeError::io(&meta_path, e))?;
    MetaStore::create(io, file, sb.clone())?;
    io.sync_dir(&opts.dir).map_err(|e| VolumeError::io(&opts.dir, e))?;
    sync_parent(io, &opts.dir);
    tracing::info!(
        path = %opts.dir.display(),
        resource = %sb.resource,
        node = %sb.node,
        size = sb.size,
        uuid = %format!("{:032x}", sb.uuid),
        bitmap_granularity = sb.bitmap_granularity,
        "metadata created"
    );
    Ok(())
}

impl Volume {
    /// Opens the volume, running crash recovery.
    pub fn open(io: Arc<dyn IoEngine>, opts: VolumeOptions, expect: &Identity) -> Result<Arc<Volume>, VolumeError> {
        opts.validate()?;
        let meta_path = opts.meta_path();
        let meta_file = match io.open(&meta_path, OpenMode::READ_WRITE) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(VolumeError::NoMetadata { path: meta_path });
            }
            Err(e) => return Err(VolumeError::io(&meta_path, e)),
        };
        flock(&meta_file, libc::LOCK_EX | libc::LOCK_NB)?;
        let mut meta = MetaStore::open(&*io, meta_file)?;
        let sb = meta.current().clone();
        let mismatch = |field, config: String, metadata: String| {
            Err(VolumeError::Mismatch { path: meta_path.clone(), field, config, metadata })
        };
        if sb.resource != expect.resource {
            return mismatch("resource", expect.resource.clone(), sb.resource.clone());
        }
        if sb.node != expect.node {
            return mismatch("node", expect.node.clone(), sb.node.clone());
        }
        if sb.size != expect.size {
            return mismatch("size", expect.size.to_string(), sb.size.to_string());
        }
        if sb.bitmap_granularity != opts.bitmap_granularity {
            return mismatch(
                "bitmap_granularity",
                opts.bitmap_granularity.to_string(),
                sb.bitmap_granularity.to_string(),
            );
        }
        let mut bm = bitmap::DirtyBitmap::new(sb.size, sb.bitmap_granularity)
            .map_err(|reason| VolumeError::BadSuperblock { path: meta_path.clone(), reason })?;
        meta.read_bitmap(&*io, &mut bm)?;
        let data = open_data(&*io, &opts, sb.size)?;
        let wal_dir = opts.wal_dir();
        create_private_dir(&wal_dir)?;
        let listing = segment::list_dir(&wal_dir).map_err(|e| VolumeError::io(&wal_dir, e))?;
        for p in &listing.temporary {
            io.remove(p).map_err(|e| VolumeError::io(p, e))?;
        }

        // Recovery: replay from the checkpoint into the data file.
        let report = recovery::recover(
            &recovery::RecoverArgs {
                io: &*io,
                wal_dir: &wal_dir,
                segments: &listing.segments,
                data: &data,
                uuid: sb.uuid,
                size: sb.size,
                checkpoint_lsn: sb.checkpoint_lsn,
                replay_seq: sb.replay_seq,
            },
            &mut recovery::Marks { bitmap: &mut bm, after: sb.peer_written_lsn },
        )?;
        io.sync_data(&data).map_err(|e| VolumeError::io(data.path(), e))?;
        // After a power loss, the extents of the activity log may hold data
        // writes whose records the torn tail lost (src/volume/al.rs).
        let al_path = opts.dir.join(al::AL_FILE);
        let (activity, al_open) =
            al::ActivityLog::open(&*io, &opts.dir, sb.uuid, sb.size, sb.clean_shutdown(), opts.al_extents)
                .map_err(|e| VolumeError::io(&al_path, e))?;
        for &(off, len) in &al_open.marks {
            bm.set_range(off, len);
        }
        let al_marked = !al_open.marks.is_empty();
        if al_marked {
            tracing::warn!(path = %al_path.display(), extents = al_open.marks.len(), "activity log: {}", al_open.why);
        } else {
            tracing::info!(path = %al_path.display(), "activity log: {}", al_open.why);
        }
        // The re-marked bits are durable before the old segments go.
        meta.write_bitmap(&*io, |from| bm.take_dirty_pages(sb.uuid, from, meta::PAGES_PER_IO))?;
        let last = report.last_lsn;
        tracing::info!(
            path = %opts.dir.display(),
            checkpoint_lsn = sb.checkpoint_lsn,
            replayed = report.replayed,
            last_lsn = last,
            segments = report.segments_read,
            clean = sb.clean_shutdown(),
            marked = report.marked,
            dirty_bytes = bm.dirty_bytes(),
            "volume recovered"
        );

        // Checkpoint: the log is replayed and the data synced; the new log
        // starts in a fresh segment (never append after a tail that may be
        // followed by stale or torn bytes).
        let new_seq = report.max_seq.max(sb.replay_seq.saturating_sub(1)) + 1;
        let mut nsb = sb.clone();
        nsb.checkpoint_lsn = last;
        nsb.replay_seq = new_seq;
        nsb.flags &= !FLAG_CLEAN_SHUTDOWN;
        if al_marked {
            nsb.flags |= meta::FLAG_FOREIGN_MARKS;
        }
        // Recovery re-marked every local record above the peer's written
        // LSN; replicated records were written by the peer first. The
        // bitmap covers every record above the base.
        let peer_written = sb.peer_written_lsn.max(report.from_peer_lsn);
        let base_lsn = sb.bitmap_base_lsn.max(peer_written);
        nsb.peer_written_lsn = peer_written;
        nsb.bitmap_base_lsn = base_lsn;
        meta.write(&*io, nsb)?;
        // The marks are persisted: the log may start empty.
        let mut activity = activity;
        activity.persist(&*io).map_err(|e| VolumeError::io(&al_path, e))?;

        let mut files = WalFiles {
            dir: wal_dir.clone(),
            live: Default::default(),
            spares: listing.spares.clone(),
            replay_seq: new_seq,
        };
        for path in listing.segments.values() {
            segment::retire(&*io, &mut files, path).map_err(|e| VolumeError::io(path, e))?;
        }
        if files.spares.is_empty() {
            // A zero-filled file, so that the fdatasyncs of the first
            // segment never journal extent conversions (see segment.rs).
            let p = segment::create_spare(&*io, &wal_dir, opts.wal_segment_size, true)
                .map_err(|e| VolumeError::io(&wal_dir, e))?;
            files.spares.push(p);
        }
        let files = Mutex::new(files);
        let seg = segment::activate(&*io, &files, new_seq, last + 1, opts.wal_segment_size)
            .map_err(|e| VolumeError::io(&wal::segment_path(&wal_dir, new_seq), e))?;
        let header = SegmentHeader { seq: new_seq, first_lsn: last + 1, uuid: sb.uuid, segment_size: seg.len }.encode();
        io.write_all_at(&seg.file, &header, 0).map_err(|e| VolumeError::io(seg.file.path(), e))?;
        io.sync_data(&seg.file).map_err(|e| VolumeError::io(seg.file.path(), e))?;
        let current = (seg.seq, seg.file.clone(), seg.len);
        parking::lock(&files).live.push_back(seg);

        // Every segment is at least `wal_segment_size` long (see activate).
        let capacity = (opts.wal_segment_size - SEGMENT_HEADER_SIZE) as usize - wal::RECORD_HEADER_SIZE;
        let max_record_payload = (capacity / 4096 * 4096).min(MAX_RECORD_PAYLOAD);
        let shared = Arc::new(Shared {
            io,
            data,
            meta: Mutex::new(meta),
            wal: files,
            space: Condvar::new(),
            wal_dir,
            uuid: sb.uuid,
            size: sb.size,
            segment_size: opts.wal_segment_size,
            max_record_payload,
            wal_limit: (4 * opts.checkpoint_bytes).max(3 * opts.wal_segment_size),
            checkpoint_bytes: opts.checkpoint_bytes,
            checkpoint_interval: opts.checkpoint_interval,
            applied_lsn: AtomicU64::new(last),
            durable_lsn: AtomicU64::new(last),
            checkpoint_lsn: AtomicU64::new(last),
            wal_written: AtomicU64::new(0),
            ckpt_wal_written: AtomicU64::new(0),
            min_retained_lsn: AtomicU64::new(u64::MAX),
            wal_retain: AtomicU64::new(opts.wal_retain),
            tracker: Mutex::new({
                let mut t = tracking::Tracker::new(bm, peer_written, base_lsn);
                t.foreign = (sb.flags & meta::FLAG_FOREIGN_MARKS != 0 || al_marked) && t.bitmap.dirty_bytes() > 0;
                t
            }),
            bitmap_io: Mutex::new(()),
            replay_ranges: Mutex::new(writer::ReplayRanges::default()),
            activity: Mutex::new(activity),
            failed: Mutex::new(None),
            failed_flag: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            ckpt_ctl: Mutex::new(CkptCtl::default()),
            ckpt_cv: Condvar::new(),
            ckpt_lock: Mutex::new(()),
            feed: feed::FeedHub::new(last),
            retention_lifted: AtomicBool::new(false),
            retention_liftable: AtomicBool::new(false),
            counters: VolumeCounters::default(),
        });

        let (tx, rx) = mpsc::channel();
        let w = Writer::new(shared.clone(), rx, current, last + 1);
        let writer = std::thread::Builder::new()
            .name("repblock-wal".into())
            .spawn(move || w.run())
            .map_err(|e| VolumeError::Invalid { what: "log writer thread".into(), reason: e.to_string() })?;
        let s2 = shared.clone();
        let checkpointer =
            match std::thread::Builder::new().name("repblock-ckpt".into()).spawn(move || checkpoint::run(s2)) {
                Ok(h) => h,
                Err(e) => {
                    let _ = tx.send(Msg::Stop);
                    let _ = writer.join();
                    return Err(VolumeError::Invalid { what: "checkpointer thread".into(), reason: e.to_string() });
                }
            };
        Ok(Arc::new(Volume {
            shared,
            tx,
            writer: Mutex::new(Some(writer)),
            checkpointer: Mutex::new(Some(checkpointer)),
            closed: AtomicBool::new(false),
            recovery: report,
        }))
    }

    pub fn size(&self) -> u64 {
        self.shared.size
    }

    /// What recovery found when this volume was opened.
    pub fn recovery(&self) -> &RecoveryReport {
        &self.recovery
    }

    /// Benchmark switch (feature `testkit`): stops adding extents to the
    /// activity log, so that its cost on the write path can be measured
    /// (tests/volume_bench.rs). A power loss afterwards can leave blocks
    /// differing from the peer unmarked: never for real use.
    #[cfg(feature = "testkit")]
    pub fn disable_activity_log_for_bench(&self) {
        parking::lock(&self.shared.activity).disable();
    }

    /// Activity-log writes (one write and one fdatasync each) since the
    /// volume was opened.
    pub fn activity_log_writes(&self) -> u64 {
        parking::lock(&self.shared.activity).writes
    }

    /// Write batches that touched more cold extents than the activity log
    /// holds (each persisted the log as "every block", src/volume/al.rs).
    pub fn activity_log_overflows(&self) -> u64 {
        parking::lock(&self.shared.activity).overflows
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.shared.size => Ok(()),
            _ => Err(VolumeError::OutOfRange { offset, len, size: self.shared.size }),
        }
    }

    pub async fn read(&self, offset: u64, len: u32) -> Result<Bytes, VolumeError> {
        self.check_range(offset, u64::from(len))?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        let shared = self.shared.clone();
        let task = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; len as usize];
            shared
                .io
                .read_exact_at(&shared.data, &mut buf, offset)
                .map(|()| Bytes::from(buf))
                .map_err(|e| VolumeError::io(shared.data.path(), e))
        });
        match task.await {
            Ok(r) => r,
            Err(e) => {
                Err(VolumeError::Io { path: self.shared.data.path().to_path_buf(), source: std::io::Error::other(e) })
            }
        }
    }

    async fn submit(&self, op: Op, fua: bool) -> Result<Lsn, VolumeError> {
        if let Some(r) = self.shared.failure() {
            return Err(VolumeError::Stopped(r));
        }
        let closed = || VolumeError::Stopped(FailStop::closed("the volume is closed"));
        if self.closed.load(Ordering::Acquire) {
            return Err(closed());
        }
        let (done, rx) = oneshot::channel();
        self.tx.send(Msg::Req(Request { op, fua, lsn: None, done })).map_err(|_| closed())?;
        rx.await.unwrap_or_else(|_| Err(closed()))
    }

    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<Lsn, VolumeError> {
        self.check_range(offset, data.len() as u64)?;
        if data.is_empty() {
            return if fua { self.flush().await } else { Ok(self.shared.applied_lsn.load(Ordering::Acquire)) };
        }
        self.submit(Op::Write { offset, data }, fua).await
    }

    /// Discards a range; it reads back as zeroes afterwards.
    pub async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<Lsn, VolumeError> {
        self.check_range(offset, u64::from(len))?;
        if len == 0 {
            return if fua { self.flush().await } else { Ok(self.shared.applied_lsn.load(Ordering::Acquire)) };
        }
        self.submit(Op::Trim { offset, len }, fua).await
    }

    /// Zeroes a range; `punch` allows deallocating it.
    pub async fn write_zeroes(&self, offset: u64, len: u32, punch: bool, fua: bool) -> Result<Lsn, VolumeError> {
        self.check_range(offset, u64::from(len))?;
        if len == 0 {
            return if fua { self.flush().await } else { Ok(self.shared.applied_lsn.load(Ordering::Acquire)) };
        }
        self.submit(Op::Zeroes { offset, len, punch }, fua).await
    }

    /// Makes every write completed before this call durable; returns the
    /// durable LSN.
    pub async fn flush(&self) -> Result<Lsn, VolumeError> {
        self.submit(Op::Flush, false).await
    }

    pub fn status(&self) -> VolumeStatus {
        let s = &self.shared;
        VolumeStatus {
            local_lsn: s.applied_lsn.load(Ordering::Acquire),
            durable_lsn: s.durable_lsn.load(Ordering::Acquire),
            checkpoint_lsn: s.checkpoint_lsn.load(Ordering::Acquire),
            wal_bytes: parking::lock(&s.wal).live_bytes(),
            failed: s.failure().map(|f| f.to_string()),
            counters: s.counters.values(),
        }
    }

    /// The current superblock.
    pub fn superblock(&self) -> Superblock {
        parking::lock(&self.shared.meta).current().clone()
    }

    /// The node's failover term (superblock; 0 without failover).
    pub fn term(&self) -> u64 {
        parking::lock(&self.shared.meta).current().term
    }

    /// Durably raises the failover term to `term` (superblock written and
    /// fdatasync'ed before this returns; docs/failover.md: a term is
    /// persisted before it is acted on). A term at or below the stored one
    /// changes nothing: terms never go back. Returns the stored term.
    pub fn persist_term(&self, term: u64) -> Result<u64, VolumeError> {
        if term <= self.term() {
            return Ok(self.term());
        }
        self.update_superblock(|sb| sb.term = sb.term.max(term))?;
        Ok(self.term())
    }

    /// Durably updates the superblock (written and fdatasync'ed before this
    /// returns). `f` may change the disk state, the generation ids, the term and the
    /// flags other than CLEAN_SHUTDOWN and `gen_created_ms`; the fields the
    /// volume owns (names, size, uuid, checkpoint, counter, bitmap
    /// granularity, bitmap base, peer written LSN) are kept as they are. A failed write
    /// stops the volume (the metadata file's state is unknown).
    pub fn update_superblock(&self, f: impl FnOnce(&mut Superblock)) -> Result<(), VolumeError> {
        let s = &self.shared;
        if let Some(r) = s.failure() {
            return Err(VolumeError::Stopped(r));
        }
        if self.closed.load(Ordering::Acquire) {
            return Err(VolumeError::Stopped(FailStop::closed("the volume is closed")));
        }
        let mut meta = parking::lock(&s.meta);
        let cur = meta.current().clone();
        let mut sb = cur.clone();
        f(&mut sb);
        sb.counter = cur.counter;
        sb.uuid = cur.uuid;
        sb.size = cur.size;
        sb.block_size = cur.block_size;
        sb.checkpoint_lsn = cur.checkpoint_lsn;
        sb.replay_seq = cur.replay_seq;
        sb.resource = cur.resource;
        sb.node = cur.node;
        sb.bitmap_granularity = cur.bitmap_granularity;
        sb.bitmap_base_lsn = cur.bitmap_base_lsn;
        sb.peer_written_lsn = cur.peer_written_lsn;
        sb.flags = (sb.flags & !FLAG_CLEAN_SHUTDOWN) | (cur.flags & FLAG_CLEAN_SHUTDOWN);
        let path = meta.path().to_path_buf();
        meta.write(&*s.io, sb).map_err(|e| {
            VolumeError::Stopped(s.fail(FailStop::volume(format!("superblock write to {}", path.display()), &e)))
        })
    }

    /// Keeps WAL segments holding LSNs `>= lsn` (records a peer still
    /// needs) from being recycled; `None` lifts the hold. While held, the
    /// WAL may grow to its limit and then the writer waits: the caller must
    /// lift the hold (and fall back to a bitmap resync) before that.
    pub fn set_min_retained_lsn(&self, lsn: Option<Lsn>) {
        self.shared.min_retained_lsn.store(lsn.unwrap_or(u64::MAX), Ordering::Release);
    }

    /// Tells both threads to stop (the writer finishes what was queued
    /// before) and takes their handles.
    fn signal_stop(&self) -> (Option<JoinHandle<()>>, Option<JoinHandle<()>>) {
        self.shared.stopping.store(true, Ordering::Release);
        let _ = self.tx.send(Msg::Stop);
        (parking::lock(&self.writer).take(), parking::lock(&self.checkpointer).take())
    }

    /// Clean shutdown: checkpoint, mark the superblock clean, stop threads.
    /// Requests queued before complete; later ones fail with `Stopped`.
    pub async fn close(&self) -> Result<(), VolumeError> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let (writer, ckpt) = self.signal_stop();
        let shared = self.shared.clone();
        let (tx, rx) = oneshot::channel();
        // Joining and the final checkpoint block: keep them off the runtime.
        let spawned = std::thread::Builder::new().name("repblock-close".into()).spawn(move || {
            join_threads(&shared, writer, ckpt);
            let r = match shared.failure() {
                Some(r) => Err(VolumeError::Stopped(r)),
                None => checkpoint::checkpoint(&shared, true),
            };
            // The directory may be opened again (even before this `Volume`
            // is dropped): nothing writes the metadata after this point.
            if let Err(e) = parking::lock(&shared.meta).unlock() {
                tracing::warn!(error = %e, "could not release the metadata lock");
            }
            if r.is_ok() {
                tracing::info!(
                    path = %shared.wal_dir.display(),
                    lsn = shared.applied_lsn.load(Ordering::Acquire),
                    "volume closed cleanly"
                );
            }
            let _ = tx.send(r);
        });
        if let Err(e) = spawned {
            return Err(VolumeError::Invalid { what: "close thread".into(), reason: e.to_string() });
        }
        rx.await.unwrap_or_else(|_| {
            Err(VolumeError::Stopped(FailStop::internal("close", "its thread ended without an answer")))
        })
    }
}

fn join_threads(shared: &Shared, writer: Option<JoinHandle<()>>, ckpt: Option<JoinHandle<()>>) {
    if let Some(h) = writer {
        let _ = h.join();
    }
    // Nothing is published any more: the feed's receiver sees the end.
    shared.feed.detach();
    parking::lock(&shared.ckpt_ctl).stop = true;
    shared.ckpt_cv.notify_all();
    if let Some(h) = ckpt {
        let _ = h.join();
    }
}

impl Drop for Volume {
    /// Without `close`, stop the threads (queued requests complete) but
    /// leave the superblock unclean: the next open replays the WAL, as after
    /// a crash.
    fn drop(&mut self) {
        if !self.closed.swap(true, Ordering::AcqRel) {
            let (writer, ckpt) = self.signal_stop();
            join_threads(&self.shared, writer, ckpt);
        }
    }
}

#[cfg(test)]
mod tests;
