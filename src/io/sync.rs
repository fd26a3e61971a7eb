//! The plain engine: `pread`, `pwrite`, `fdatasync`, `fallocate`.
//!
//! Always available; chosen when io_uring is not (see [`super::select_engine`]).

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;

use super::{EngineKind, IoEngine, IoFile, IoOp, OpenMode};

/// Plain blocking syscalls.
#[derive(Debug, Default)]
pub struct SyncEngine;

impl SyncEngine {
    pub fn new() -> SyncEngine {
        SyncEngine
    }
}

/// Opens a file the same way for every engine.
pub(crate) fn open_file(path: &Path, mode: OpenMode) -> io::Result<IoFile> {
    let mut o = OpenOptions::new();
    o.read(true)
        .write(mode.write || mode.create || mode.create_new)
        .create(mode.create && !mode.create_new)
        .create_new(mode.create_new)
        .custom_flags(libc::O_CLOEXEC);
    let f = o.open(path)?;
    Ok(IoFile::new(f, path))
}

pub(crate) fn file_len(file: &IoFile) -> io::Result<u64> {
    let md = file.std().metadata()?;
    if md.file_type().is_block_device() {
        let mut size: u64 = 0;
        // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which
        // points at a live, properly aligned u64; the fd is open.
        let rc = unsafe { libc::ioctl(file.raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(size)
    } else {
        Ok(md.len())
    }
}

/// `_IOR(0x12, 114, size_t)`
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

pub(crate) fn fallocate(file: &IoFile, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    loop {
        // SAFETY: plain syscall on an open fd; no memory is passed.
        let rc = unsafe { libc::fallocate(file.raw_fd(), mode, offset as libc::off_t, len as libc::off_t) };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Zeroes a range: `fallocate` first, writing zero buffers when the file
/// system or device does not support it.
pub(crate) fn zero_range(file: &IoFile, offset: u64, len: u64, punch: bool) -> io::Result<()> {
    let mode = if punch {
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
    } else {
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
    };
    match fallocate(file, mode, offset, len) {
        Ok(()) => Ok(()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) | Some(libc::ENODEV)) => {
            // As FALLOC_FL_KEEP_SIZE: nothing at or beyond the end of the
            // file (or device) is written, so the size never changes.
            let len = len.min(file_len(file)?.saturating_sub(offset));
            write_zeroes(file, offset, len)
        }
        Err(e) => Err(e),
    }
}

fn write_zeroes(file: &IoFile, mut offset: u64, len: u64) -> io::Result<()> {
    const CHUNK: usize = 1 << 20;
    let zeroes = vec![0u8; CHUNK.min(len as usize)];
    let end = offset + len;
    while offset < end {
        let n = ((end - offset) as usize).min(CHUNK);
        file.std().write_all_at(&zeroes[..n], offset)?;
        offset += n as u64;
    }
    Ok(())
}

pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Reads exactly `buf.len()` bytes; a short read is `UnexpectedEof`.
pub(crate) fn read_exact_at(file: &IoFile, buf: &mut [u8], offset: u64) -> io::Result<()> {
    file.std().read_exact_at(buf, offset)
}

pub(crate) fn fdatasync(file: &IoFile) -> io::Result<()> {
    file.std().sync_data()
}

impl IoEngine for SyncEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Sync
    }

    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<IoFile> {
        open_file(path, mode)
    }

    fn submit(&self, ops: &mut [IoOp<'_>]) -> io::Result<()> {
        let mut first_err = None;
        for op in ops.iter_mut() {
            let r = match op {
                IoOp::Write { file, offset, buf } => file.std().write_all_at(buf, *offset),
                IoOp::Read { file, offset, buf } => read_exact_at(file, buf, *offset),
                IoOp::SyncData { file } => fdatasync(file),
                IoOp::Zero { file, offset, len, punch } => zero_range(file, *offset, *len, *punch),
            };
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn len(&self, file: &IoFile) -> io::Result<u64> {
        file_len(file)
    }

    fn set_len(&self, file: &IoFile, len: u64) -> io::Result<()> {
        file.std().set_len(len)
    }

    fn allocate(&self, file: &IoFile, len: u64) -> io::Result<()> {
        fallocate(file, 0, 0, len)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        sync_dir(dir)
    }
}
