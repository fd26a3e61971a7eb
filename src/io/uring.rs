//! The io_uring engine. (Helper A: implement.)

use std::io;
use std::path::Path;

use super::{EngineKind, IoEngine, IoFile, IoOp, OpenMode};

/// Checks once whether this process may use io_uring.
pub fn probe() -> io::Result<()> {
    Err(io::Error::new(io::ErrorKind::Unsupported, "io_uring engine not built yet"))
}

#[derive(Debug, Default)]
pub struct UringEngine;

impl UringEngine {
    pub fn new() -> UringEngine {
        UringEngine
    }
}

impl IoEngine for UringEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::IoUring
    }
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<IoFile> {
        super::sync::open_file(path, mode)
    }
    fn submit(&self, ops: &mut [IoOp<'_>]) -> io::Result<()> {
        super::sync::SyncEngine.submit(ops)
    }
    fn len(&self, file: &IoFile) -> io::Result<u64> {
        super::sync::file_len(file)
    }
    fn set_len(&self, file: &IoFile, len: u64) -> io::Result<()> {
        file.std().set_len(len)
    }
    fn allocate(&self, file: &IoFile, len: u64) -> io::Result<()> {
        super::sync::fallocate(file, 0, 0, len)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        super::sync::sync_dir(dir)
    }
}
