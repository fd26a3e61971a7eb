//! An in-memory [`BlockBackend`] for tests and benchmarks.
//!
//! Storage is sparse: 64 KiB chunks allocated on first write, each behind its
//! own lock, so concurrent requests to different regions do not contend and a
//! large export costs only what is written. Unwritten (or trimmed) bytes read
//! as zeroes.
//!
//! Test hooks: an injected error for every later request of a kind
//! ([`MemoryBackend::fail_with`]), an artificial delay before each request
//! completes ([`MemoryBackend::set_delay`]), and counters of what the server
//! passed through (flushes, FUA writes, NO_HOLE zeroes, …).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};

use super::{BlockBackend, BlockError};

const CHUNK: usize = 64 * 1024;

/// Which requests an injected error applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
}

/// Counters of the requests the backend saw.
#[derive(Debug, Default)]
pub struct Counters {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    pub trims: AtomicU64,
    pub write_zeroes: AtomicU64,
    /// Requests (write, trim, write_zeroes) that arrived with `fua`.
    pub fua: AtomicU64,
    /// write_zeroes requests that arrived with `no_hole`.
    pub no_hole: AtomicU64,
}

/// A sparse in-memory block device.
#[derive(Debug)]
pub struct MemoryBackend {
    size: u64,
    chunks: Vec<RwLock<Option<Box<[u8]>>>>,
    delay: Mutex<Duration>,
    failures: Mutex<Vec<(Op, BlockError)>>,
    counters: Counters,
}

impl MemoryBackend {
    pub fn new(size: u64) -> MemoryBackend {
        let n = size.div_ceil(CHUNK as u64) as usize;
        MemoryBackend {
            size,
            chunks: (0..n).map(|_| RwLock::new(None)).collect(),
            delay: Mutex::new(Duration::ZERO),
            failures: Mutex::new(Vec::new()),
            counters: Counters::default(),
        }
    }

    /// Every later request completes only after `delay`.
    pub fn set_delay(&self, delay: Duration) {
        *self.delay.lock().unwrap_or_else(|e| e.into_inner()) = delay;
    }

    /// Every later request of kind `op` fails with `err` (until
    /// [`MemoryBackend::clear_failures`]).
    pub fn fail_with(&self, op: Op, err: BlockError) {
        self.failures.lock().unwrap_or_else(|e| e.into_inner()).push((op, err));
    }

    pub fn clear_failures(&self) {
        self.failures.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Synchronous read of the current content (for test assertions).
    pub fn snapshot(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        self.copy_out(offset, &mut out);
        out
    }

    async fn prologue(&self, op: Op) -> Result<(), BlockError> {
        let delay = *self.delay.lock().unwrap_or_else(|e| e.into_inner());
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        match failures.iter().find(|(o, _)| *o == op) {
            Some((_, e)) => Err(e.clone()),
            None => Ok(()),
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => {
                Err(BlockError::Invalid(format!("range {offset}+{len} beyond the end of a {}-byte device", self.size)))
            }
        }
    }

    /// Calls `f(chunk index, offset in chunk, position in request, length)`
    /// for each chunk piece of `[offset, offset + len)`.
    fn for_each_piece(offset: u64, len: usize, mut f: impl FnMut(usize, usize, usize, usize)) {
        let mut done = 0usize;
        while done < len {
            let pos = offset + done as u64;
            let idx = (pos / CHUNK as u64) as usize;
            let within = (pos % CHUNK as u64) as usize;
            let n = (CHUNK - within).min(len - done);
            f(idx, within, done, n);
            done += n;
        }
    }

    fn copy_out(&self, offset: u64, out: &mut [u8]) {
        Self::for_each_piece(offset, out.len(), |idx, within, at, n| {
            let chunk = self.chunks[idx].read().unwrap_or_else(|e| e.into_inner());
            match chunk.as_ref() {
                Some(c) => out[at..at + n].copy_from_slice(&c[within..within + n]),
                None => out[at..at + n].fill(0),
            }
        });
    }

    /// Writes `data` (or zeroes when `None`) at `offset`. Zeroing a whole
    /// chunk without `keep_allocated` frees it.
    fn copy_in(&self, offset: u64, len: usize, data: Option<&[u8]>, keep_allocated: bool) {
        Self::for_each_piece(offset, len, |idx, within, at, n| {
            let mut chunk = self.chunks[idx].write().unwrap_or_else(|e| e.into_inner());
            match data {
                Some(d) => {
                    let c = chunk.get_or_insert_with(|| vec![0u8; CHUNK].into_boxed_slice());
                    c[within..within + n].copy_from_slice(&d[at..at + n]);
                }
                None if n == CHUNK && !keep_allocated => *chunk = None,
                None => {
                    if let Some(c) = chunk.as_mut() {
                        c[within..within + n].fill(0);
                    } else if keep_allocated {
                        *chunk = Some(vec![0u8; CHUNK].into_boxed_slice());
                    }
                }
            }
        });
    }
}

impl BlockBackend for MemoryBackend {
    fn size(&self) -> u64 {
        self.size
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, BlockError> {
        self.counters.reads.fetch_add(1, Ordering::Relaxed);
        self.prologue(Op::Read).await?;
        self.check_range(offset, u64::from(len))?;
        let mut buf = BytesMut::zeroed(len as usize);
        self.copy_out(offset, &mut buf);
        Ok(buf.freeze())
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), BlockError> {
        self.counters.writes.fetch_add(1, Ordering::Relaxed);
        if fua {
            self.counters.fua.fetch_add(1, Ordering::Relaxed);
        }
        self.prologue(Op::Write).await?;
        self.check_range(offset, data.len() as u64).map_err(|e| BlockError::NoSpace(e.to_string()))?;
        self.copy_in(offset, data.len(), Some(&data), true);
        Ok(())
    }

    async fn flush(&self) -> Result<(), BlockError> {
        self.counters.flushes.fetch_add(1, Ordering::Relaxed);
        self.prologue(Op::Flush).await
    }

    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), BlockError> {
        self.counters.trims.fetch_add(1, Ordering::Relaxed);
        if fua {
            self.counters.fua.fetch_add(1, Ordering::Relaxed);
        }
        self.prologue(Op::Trim).await?;
        self.check_range(offset, u64::from(len))?;
        self.copy_in(offset, len as usize, None, false);
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u32, no_hole: bool, fua: bool) -> Result<(), BlockError> {
        self.counters.write_zeroes.fetch_add(1, Ordering::Relaxed);
        if fua {
            self.counters.fua.fetch_add(1, Ordering::Relaxed);
        }
        if no_hole {
            self.counters.no_hole.fetch_add(1, Ordering::Relaxed);
        }
        self.prologue(Op::WriteZeroes).await?;
        self.check_range(offset, u64::from(len)).map_err(|e| BlockError::NoSpace(e.to_string()))?;
        self.copy_in(offset, len as usize, None, no_hole);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn write_read_trim_zero_across_chunks() {
        let size = 3 * CHUNK as u64 + 100;
        let m = MemoryBackend::new(size);
        let data: Vec<u8> = (0..2 * CHUNK + 10).map(|i| (i % 251) as u8 + 1).collect();
        let off = CHUNK as u64 - 5;
        m.write(off, Bytes::from(data.clone()), false).await.unwrap();
        assert_eq!(&m.read(off, data.len() as u32).await.unwrap()[..], &data[..]);
        assert_eq!(&m.read(0, 10).await.unwrap()[..], &[0u8; 10]);

        // Trim the middle chunk entirely (it is freed) and part of the others.
        m.trim(off + 3, (CHUNK + 10) as u32, false).await.unwrap();
        let got = m.read(off, data.len() as u32).await.unwrap();
        assert_eq!(&got[..3], &data[..3]);
        assert!(got[3..CHUNK + 13].iter().all(|&b| b == 0));
        assert_eq!(&got[CHUNK + 13..], &data[CHUNK + 13..]);
        assert!(m.chunks[1].read().unwrap().is_none());

        m.write_zeroes(0, size as u32, true, true).await.unwrap();
        assert!(m.read(0, size as u32).await.unwrap().iter().all(|&b| b == 0));
        assert_eq!(m.counters().fua.load(Ordering::Relaxed), 1);
        assert_eq!(m.counters().no_hole.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn out_of_range_and_injected_errors() {
        let m = MemoryBackend::new(4096);
        assert!(matches!(m.read(4000, 200).await, Err(BlockError::Invalid(_))));
        assert!(matches!(m.write(4000, Bytes::from(vec![1; 200]), false).await, Err(BlockError::NoSpace(_))));
        assert!(matches!(m.read(u64::MAX, 2).await, Err(BlockError::Invalid(_))));
        m.fail_with(Op::Flush, BlockError::Io("disk on fire".into()));
        assert!(matches!(m.flush().await, Err(BlockError::Io(_))));
        assert!(m.read(0, 1).await.is_ok());
        m.clear_failures();
        assert!(m.flush().await.is_ok());
    }
}
