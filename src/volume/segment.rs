//! WAL segment files: the live set, spares, activation and recycling.
//!
//! Live segments are `wal/<seq>.wal`. Spares are `wal/spare-<hex>.wal`:
//! either recycled segments (renamed after a checkpoint made them useless)
//! or fresh files preallocated and zero-filled in advance. Reusing written
//! files means an fdatasync of the WAL never has to journal block allocation
//! or unwritten-extent conversion, which keeps FUA/flush latency low.
//!
//! Activating a segment renames a spare (or a new file) to its sequence
//! name and syncs the directory before any record is written to it.

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::Lsn;
use super::wal;
use crate::io::{IoEngine, IoFile, OpenMode};

/// Spares kept for reuse; more are removed.
pub(crate) const MAX_SPARES: usize = 2;

/// A segment of the current log.
#[derive(Debug)]
pub(crate) struct LiveSegment {
    pub seq: u64,
    pub first_lsn: Lsn,
    pub file: Arc<IoFile>,
    pub len: u64,
}

/// The WAL directory's files, shared by the writer (appends) and the
/// checkpointer (recycles).
#[derive(Debug)]
pub(crate) struct WalFiles {
    pub dir: PathBuf,
    /// Ordered by `seq`; the last one is the writer's current segment.
    pub live: VecDeque<LiveSegment>,
    pub spares: Vec<PathBuf>,
    /// The superblock's replay segment: the live segments below it are
    /// checkpointed and kept only for a peer.
    pub replay_seq: u64,
}

impl WalFiles {
    pub fn live_bytes(&self) -> u64 {
        self.live.iter().map(|s| s.len).sum()
    }

    /// Bytes of the segments not yet checkpointed (`seq >= replay_seq`).
    pub fn unchecked_bytes(&self) -> u64 {
        self.live.iter().filter(|s| s.seq >= self.replay_seq).map(|s| s.len).sum()
    }
}

fn spare_path(dir: &Path) -> PathBuf {
    loop {
        let p = dir.join(format!("spare-{:016x}.wal", rand::random::<u64>()));
        if !p.exists() {
            return p;
        }
    }
}

/// Creates a fresh spare: preallocated and, when `fill` is set, written with
/// zeroes so that its extents are initialised (an fdatasync after writing
/// into unwritten extents must journal their conversion).
pub(crate) fn create_spare(io: &dyn IoEngine, dir: &Path, size: u64, fill: bool) -> io::Result<PathBuf> {
    let final_path = spare_path(dir);
    let tmp = final_path.with_extension("tmp");
    let file = io.open(&tmp, OpenMode::CREATE_NEW)?;
    io.allocate(&file, size)?;
    if fill {
        const CHUNK: usize = 1 << 20;
        let zeroes = vec![0u8; CHUNK];
        let mut off = 0u64;
        while off < size {
            let n = (size - off).min(CHUNK as u64) as usize;
            io.write_all_at(&file, &zeroes[..n], off)?;
            off += n as u64;
        }
    }
    io.sync_data(&file)?;
    io.rename(&tmp, &final_path)?;
    Ok(final_path)
}

/// Makes `wal/<seq>.wal` from a spare (or a new preallocated file), syncs
/// the directory, and opens it. The caller writes the segment header.
pub(crate) fn activate(
    io: &dyn IoEngine,
    files: &parking::Mutex<WalFiles>,
    seq: u64,
    first_lsn: Lsn,
    size: u64,
) -> io::Result<LiveSegment> {
    let (dir, spare) = {
        let mut f = parking::lock(files);
        (f.dir.clone(), f.spares.pop())
    };
    let path = wal::segment_path(&dir, seq);
    let source = match spare {
        Some(p) => p,
        None => create_spare(io, &dir, size, false)?,
    };
    io.rename(&source, &path)?;
    io.sync_dir(&dir)?;
    let file = io.open(&path, OpenMode::READ_WRITE)?;
    // A spare made under another `wal_segment_size` may be smaller: grow it
    // so that every segment holds a record of the largest size.
    let mut len = io.len(&file)?;
    if len < size {
        io.allocate(&file, size)?;
        io.sync_data(&file)?;
        len = size;
    }
    Ok(LiveSegment { seq, first_lsn, file: Arc::new(file), len })
}

/// Turns a no longer needed segment into a spare (or removes it when enough
/// spares exist). The caller syncs the directory.
pub(crate) fn retire(io: &dyn IoEngine, files: &mut WalFiles, path: &Path) -> io::Result<()> {
    if files.spares.len() < MAX_SPARES {
        let spare = spare_path(&files.dir);
        io.rename(path, &spare)?;
        files.spares.push(spare);
    } else {
        io.remove(path)?;
    }
    Ok(())
}

/// Lists `wal/`: segment files by sequence number, spares, and leftover
/// temporary files.
pub(crate) struct DirListing {
    pub segments: std::collections::BTreeMap<u64, PathBuf>,
    pub spares: Vec<PathBuf>,
    pub temporary: Vec<PathBuf>,
}

pub(crate) fn list_dir(dir: &Path) -> io::Result<DirListing> {
    let mut out = DirListing { segments: Default::default(), spares: Vec::new(), temporary: Vec::new() };
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(seq) = wal::parse_segment_name(name) {
            out.segments.insert(seq, entry.path());
        } else if wal::is_spare_name(name) {
            out.spares.push(entry.path());
        } else if name.starts_with("spare-") && name.ends_with(".tmp") {
            out.temporary.push(entry.path());
        }
    }
    Ok(out)
}

/// `std::sync::Mutex` helpers that treat poisoning as "the holder panicked
/// mid-update": the data is still the best we have, so take it.
pub(crate) mod parking {
    pub use std::sync::Mutex;
    use std::sync::MutexGuard;

    pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }
}
