//! The block content of the durability workloads: a write's 4 KiB name the
//! write (its id) and the block, then bytes derived from both, so a block
//! read back tells which write it holds, or that it holds bytes no write
//! put there (torn, misplaced). One definition for the fault campaign and
//! for the crash and failover tests (tests/common/durable.rs includes this
//! file), so both read the same pattern.

/// Bytes of one block.
pub const BLOCK: usize = 4096;

/// Content of write `id` to `block`: the id, the block, then xorshift bytes
/// seeded by both.
pub fn content(id: u64, block: usize) -> Vec<u8> {
    let mut buf = vec![0u8; BLOCK];
    buf[..8].copy_from_slice(&id.to_le_bytes());
    buf[8..16].copy_from_slice(&(block as u64).to_le_bytes());
    let mut x = id ^ ((block as u64) << 32) ^ 0x9e37_79b9_7f4a_7c15;
    for chunk in buf[16..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    buf
}

/// Which write a block holds: `Some(0)` for zeroes, `None` for anything that
/// is not exactly one write's content.
pub fn identify(buf: &[u8], block: usize) -> Option<u64> {
    if buf.iter().all(|&b| b == 0) {
        return Some(0);
    }
    let id = u64::from_le_bytes(buf[..8].try_into().ok()?);
    (content(id, block) == buf).then_some(id)
}
