//! The dirty bitmap: one bit per `granularity` bytes of the volume, set
//! when the block may differ from the peer's copy (design.md §4).
//!
//! In memory it is a `Vec<u64>`: block `b` is bit `b % 64` (least
//! significant first) of word `b / 64`. The bits past the last block of the
//! last word are always zero. Every operation on a range works on whole
//! words (a mask for the first and last word, a plain store in between),
//! keeps the count of set bits up to date from the popcount of the words it
//! changes, and flags the persistence pages whose words changed, so that a
//! checkpoint writes only those.
//!
//! Persistence pages are [`PAGE_WORDS`] (511) words: a 4 KiB page of the
//! `meta` file holds those words and a CRC (see [`encode_page`] and
//! docs/formats.md). The bitmap knows which pages are dirty; the volume
//! writes them ([`super::tracking`]).
//!
//! Granularity: a power of two from 4 KiB to 1 MiB, fixed at `create-md`.
//! A write sets the bits of every block it touches; `clear_range` clears
//! only the blocks it covers entirely (a block's last partial piece at the
//! end of the volume counts as covered when the range reaches the end).

/// Smallest bitmap granularity (4 KiB).
pub const MIN_GRANULARITY: u32 = 4 << 10;
/// Largest bitmap granularity (1 MiB).
pub const MAX_GRANULARITY: u32 = 1 << 20;
/// Default bitmap granularity (4 KiB).
pub const DEFAULT_GRANULARITY: u32 = MIN_GRANULARITY;
/// Size of one persistence page in the `meta` file.
pub const PAGE_SIZE: usize = 4096;
/// Bitmap words per persistence page (4088 bytes; the last 8 hold the CRC).
pub const PAGE_WORDS: usize = 511;

/// Checks a granularity: a power of two from 4 KiB to 1 MiB.
pub fn validate_granularity(g: u32) -> Result<(), String> {
    if !g.is_power_of_two() || !(MIN_GRANULARITY..=MAX_GRANULARITY).contains(&g) {
        return Err(format!("{g} bytes; expected a power of two from 4 KiB (4096) to 1 MiB (1048576)"));
    }
    Ok(())
}

/// Number of bitmap words for a volume of `size` bytes.
pub fn words_for(size: u64, granularity: u32) -> usize {
    size.div_ceil(u64::from(granularity)).div_ceil(64) as usize
}

/// Most bytes the in-memory dirty bitmap may take (1 GiB): 32 TiB of volume
/// at the default 4 KiB granularity, 8 PiB at 1 MiB. The whole bitmap is
/// resident (32 MiB per TiB at 4 KiB, 128 KiB per TiB at 1 MiB); a volume
/// whose bitmap would be larger is refused at config check and at open,
/// rather than aborting on the allocation.
pub const MAX_RESIDENT_BYTES: u64 = 1 << 30;

/// Bytes of the in-memory bitmap of a volume of `size` bytes.
pub fn resident_bytes(size: u64, granularity: u32) -> u64 {
    size.div_ceil(u64::from(granularity)).div_ceil(64) * 8
}

/// Checks that the bitmap of `size` bytes at `granularity` fits in
/// [`MAX_RESIDENT_BYTES`]; the error says how much it would take and the
/// smallest granularity that fits (if any).
pub fn check_resident(size: u64, granularity: u32) -> Result<(), String> {
    let need = resident_bytes(size, granularity);
    if need <= MAX_RESIDENT_BYTES {
        return Ok(());
    }
    let per_tib = resident_bytes(1 << 40, granularity);
    let fits = (MIN_GRANULARITY.trailing_zeros()..=MAX_GRANULARITY.trailing_zeros())
        .map(|s| 1u32 << s)
        .find(|&g| resident_bytes(size, g) <= MAX_RESIDENT_BYTES);
    let fix = match fits {
        Some(g) => format!("set bitmap_granularity = \"{}\" or more", crate::units::format_size(g.into())),
        None => "no bitmap_granularity makes a volume this large fit".to_string(),
    };
    Err(format!(
        "{} needs a {} dirty bitmap in memory at bitmap_granularity {} ({} per TiB); at most {} is allowed: {fix}",
        crate::units::format_size_approx(size),
        crate::units::format_size_approx(need),
        crate::units::format_size(granularity.into()),
        crate::units::format_size_approx(per_tib),
        crate::units::format_size(MAX_RESIDENT_BYTES),
    ))
}

/// Number of persistence pages for a volume of `size` bytes.
pub fn pages_for(size: u64, granularity: u32) -> usize {
    words_for(size, granularity).div_ceil(PAGE_WORDS)
}

/// The in-memory dirty bitmap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    size: u64,
    granularity: u32,
    shift: u32,
    /// Number of blocks (bits that exist).
    nbits: u64,
    words: Vec<u64>,
    /// Set bits.
    count: u64,
    /// One bit per persistence page: its words changed since it was last
    /// taken by [`DirtyBitmap::take_dirty_pages`].
    dirty_pages: Vec<u64>,
}

impl DirtyBitmap {
    /// An empty bitmap for `size` bytes at `granularity`.
    pub fn new(size: u64, granularity: u32) -> Result<DirtyBitmap, String> {
        validate_granularity(granularity)?;
        check_resident(size, granularity)?;
        let nbits = size.div_ceil(u64::from(granularity));
        let words = words_for(size, granularity);
        let pages = words.div_ceil(PAGE_WORDS);
        Ok(DirtyBitmap {
            size,
            granularity,
            shift: granularity.trailing_zeros(),
            nbits,
            words: vec![0; words],
            count: 0,
            dirty_pages: vec![0; pages.div_ceil(64)],
        })
    }

    pub fn granularity(&self) -> u32 {
        self.granularity
    }

    /// Volume size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Number of blocks.
    pub fn bits(&self) -> u64 {
        self.nbits
    }

    /// Number of set bits.
    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes of the volume covered by set bits (the last block may be
    /// shorter than the granularity).
    pub fn dirty_bytes(&self) -> u64 {
        let mut bytes = self.count << self.shift;
        if self.nbits > 0 && self.get(self.nbits - 1) {
            bytes -= (self.nbits << self.shift) - self.size;
        }
        bytes
    }

    /// Whether block `bit` is set.
    pub fn get(&self, bit: u64) -> bool {
        bit < self.nbits && self.words[(bit / 64) as usize] & (1 << (bit % 64)) != 0
    }

    /// The words (block `b` is bit `b % 64` of word `b / 64`).
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Number of persistence pages.
    pub fn pages(&self) -> usize {
        self.words.len().div_ceil(PAGE_WORDS)
    }

    /// Sets the bits of every block `[offset, offset+len)` touches (clipped
    /// to the volume). Returns how many bits were newly set.
    pub fn set_range(&mut self, offset: u64, len: u64) -> u64 {
        if len == 0 || offset >= self.size {
            return 0;
        }
        let end = offset.saturating_add(len).min(self.size);
        let first = offset >> self.shift;
        let last = (end - 1) >> self.shift; // inclusive
        self.set_bits(first, last + 1)
    }

    /// Clears the bits of the blocks `[offset, offset+len)` covers entirely.
    /// Returns how many bits were cleared.
    pub fn clear_range(&mut self, offset: u64, len: u64) -> u64 {
        if len == 0 || offset >= self.size {
            return 0;
        }
        let end = offset.saturating_add(len).min(self.size);
        let g = u64::from(self.granularity);
        let first = offset.div_ceil(g);
        let stop = if end == self.size { self.nbits } else { end >> self.shift };
        if stop <= first {
            return 0;
        }
        self.clear_bits(first, stop)
    }

    /// Sets every bit.
    pub fn set_all(&mut self) -> u64 {
        self.set_bits(0, self.nbits)
    }

    /// Clears every bit.
    pub fn clear_all(&mut self) -> u64 {
        self.clear_bits(0, self.nbits)
    }

    /// ORs `words` into the bitmap from word `first_word`. Refuses words
    /// past the end of the bitmap (bits past the last block included).
    pub fn merge(&mut self, first_word: u64, words: &[u64]) -> Result<u64, String> {
        let n = self.words.len() as u64;
        let end = first_word
            .checked_add(words.len() as u64)
            .filter(|&e| e <= n)
            .ok_or_else(|| format!("words [{first_word}, +{}) are past the bitmap's {n} words", words.len()))?;
        if end == n && end > first_word {
            let tail = self.tail_mask();
            if words[words.len() - 1] & !tail != 0 {
                return Err(format!("bits set past the last block ({} blocks)", self.nbits));
            }
        }
        let mut added = 0;
        for (i, &w) in words.iter().enumerate() {
            let idx = first_word as usize + i;
            let old = self.words[idx];
            let new = old | w;
            if new != old {
                added += u64::from((new ^ old).count_ones());
                self.words[idx] = new;
                self.mark_page(idx);
            }
        }
        self.count += added;
        Ok(added)
    }

    /// The next run of set bits at or after the block holding `from`, at
    /// most `max_len` bytes long (at least one block): `(offset, len)` in
    /// bytes, `offset` block aligned, `len` clipped to the volume size.
    pub fn next_run(&self, from: u64, max_len: u64) -> Option<(u64, u64)> {
        if from >= self.size || self.count == 0 {
            return None;
        }
        let start = self.find(from >> self.shift, true)?;
        let max_bits = (max_len >> self.shift).max(1);
        let limit = start.saturating_add(max_bits).min(self.nbits);
        // The search for the run's end stops at `limit`: walking a dense
        // bitmap in chunks stays linear.
        let stop = self.find_before(start, false, limit).unwrap_or(limit);
        let offset = start << self.shift;
        let len = ((stop - start) << self.shift).min(self.size - offset);
        Some((offset, len))
    }

    /// The first bit `>= from` whose value is `value`.
    fn find(&self, from: u64, value: bool) -> Option<u64> {
        self.find_before(from, value, self.nbits)
    }

    /// The first bit in `from..limit` whose value is `value`.
    fn find_before(&self, from: u64, value: bool, limit: u64) -> Option<u64> {
        let limit = limit.min(self.nbits);
        if from >= limit {
            return None;
        }
        let mut wi = (from / 64) as usize;
        let flip = if value { 0 } else { !0u64 };
        let mut w = (self.words[wi] ^ flip) & (!0u64 << (from % 64));
        loop {
            if w != 0 {
                let bit = wi as u64 * 64 + u64::from(w.trailing_zeros());
                return (bit < limit).then_some(bit);
            }
            wi += 1;
            if wi as u64 * 64 >= limit {
                return None;
            }
            w = self.words[wi] ^ flip;
        }
    }

    /// Valid bits of the last word.
    fn tail_mask(&self) -> u64 {
        match self.nbits % 64 {
            0 => !0,
            r => (1u64 << r) - 1,
        }
    }

    fn mark_page(&mut self, word: usize) {
        let p = word / PAGE_WORDS;
        self.dirty_pages[p / 64] |= 1 << (p % 64);
    }

    /// Applies `f` to the masked words of bits `[a, b)`; returns the
    /// popcount change (added, removed).
    fn update_bits(&mut self, a: u64, b: u64, set: bool) -> u64 {
        let b = b.min(self.nbits);
        if a >= b {
            return 0;
        }
        let (fw, lw) = ((a / 64) as usize, ((b - 1) / 64) as usize);
        let mut changed = 0u64;
        for wi in fw..=lw {
            let lo = if wi == fw { a % 64 } else { 0 };
            let hi = if wi == lw { (b - 1) % 64 + 1 } else { 64 };
            let mask = if hi - lo == 64 { !0u64 } else { ((1u64 << (hi - lo)) - 1) << lo };
            let old = self.words[wi];
            let new = if set { old | mask } else { old & !mask };
            if new != old {
                changed += u64::from((new ^ old).count_ones());
                self.words[wi] = new;
                self.mark_page(wi);
            }
        }
        changed
    }

    fn set_bits(&mut self, a: u64, b: u64) -> u64 {
        let n = self.update_bits(a, b, true);
        self.count += n;
        n
    }

    fn clear_bits(&mut self, a: u64, b: u64) -> u64 {
        let n = self.update_bits(a, b, false);
        self.count -= n;
        n
    }

    /// Whether any page changed since the last `take_dirty_pages`.
    pub fn has_dirty_pages(&self) -> bool {
        self.dirty_pages.iter().any(|&w| w != 0)
    }

    /// Flags every page dirty (a fresh bitmap file must be written whole).
    pub fn mark_all_pages_dirty(&mut self) {
        for p in 0..self.pages() {
            self.dirty_pages[p / 64] |= 1 << (p % 64);
        }
    }

    /// Encodes up to `max` dirty pages with index `>= from` (ascending)
    /// and clears their flags. A caller persisting everything calls it
    /// again from the last page + 1 until it returns nothing: one pass,
    /// which ends even while writes keep dirtying pages behind it.
    pub fn take_dirty_pages(&mut self, uuid: u128, from: usize, max: usize) -> Vec<(usize, Vec<u8>)> {
        let mut out = Vec::new();
        let mut i = from / 64;
        let mut mask = !0u64 << (from % 64);
        while i < self.dirty_pages.len() {
            let mut w = self.dirty_pages[i] & mask;
            while w != 0 {
                if out.len() >= max {
                    return out;
                }
                let bit = w.trailing_zeros();
                w &= w - 1;
                self.dirty_pages[i] &= !(1u64 << bit);
                let p = i * 64 + bit as usize;
                out.push((p, self.encode_page(p, uuid)));
            }
            i += 1;
            mask = !0;
        }
        out
    }

    /// Encodes page `p` (see [`encode_page`]).
    pub fn encode_page(&self, p: usize, uuid: u128) -> Vec<u8> {
        let from = p * PAGE_WORDS;
        let to = (from + PAGE_WORDS).min(self.words.len());
        encode_page(&self.words[from.min(to)..to], p as u64, uuid)
    }

    /// Loads page `p` from its on-disk bytes. A page that fails its check
    /// reads as all ones (every block it covers may differ) and is flagged
    /// dirty so that the next persist rewrites it; the error says why.
    pub fn load_page(&mut self, p: usize, bytes: &[u8], uuid: u128) -> Result<(), String> {
        let from = p * PAGE_WORDS;
        if from >= self.words.len() {
            return Err(format!("page {p} is past the bitmap's {} pages", self.pages()));
        }
        let to = (from + PAGE_WORDS).min(self.words.len());
        let n = to - from;
        match decode_page(bytes, p as u64, uuid, n) {
            Ok(words) => {
                let tail = if to == self.words.len() { self.tail_mask() } else { !0 };
                for (i, w) in words.into_iter().enumerate() {
                    let idx = from + i;
                    let w = if idx == self.words.len() - 1 { w & tail } else { w };
                    let old = self.words[idx];
                    self.count = self.count - u64::from(old.count_ones()) + u64::from(w.count_ones());
                    self.words[idx] = w;
                }
                Ok(())
            }
            Err(e) => {
                let first = from as u64 * 64;
                let last = (to as u64 * 64).min(self.nbits);
                self.set_bits(first, last);
                self.dirty_pages[p / 64] |= 1 << (p % 64);
                Err(e)
            }
        }
    }
}

/// Encodes one persistence page holding `words` (at most [`PAGE_WORDS`];
/// the rest of the page is zero).
//
// Format (4096 bytes, little endian):
//
// | off  | size | field                                                  |
// |    0 | 4088 | 511 bitmap words u64: word w is bitmap word            |
// |      |      |   page * 511 + w; block b is bit b % 64 of word b / 64 |
// | 4088 |    4 | crc32c over uuid u128 | page index u64 | bytes 0..4088  |
// | 4092 |    4 | zero                                                   |
pub fn encode_page(words: &[u64], page: u64, uuid: u128) -> Vec<u8> {
    debug_assert!(words.len() <= PAGE_WORDS);
    let mut b = vec![0u8; PAGE_SIZE];
    for (i, w) in words.iter().enumerate() {
        b[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
    }
    let crc = page_crc(&b, page, uuid);
    b[PAGE_WORDS * 8..PAGE_WORDS * 8 + 4].copy_from_slice(&crc.to_le_bytes());
    b
}

fn page_crc(b: &[u8], page: u64, uuid: u128) -> u32 {
    let mut seed = [0u8; 24];
    seed[..16].copy_from_slice(&uuid.to_le_bytes());
    seed[16..].copy_from_slice(&page.to_le_bytes());
    crc32c::crc32c_append(crc32c::crc32c(&seed), &b[..PAGE_WORDS * 8])
}

/// Decodes the first `n` words of a page, checking its CRC (bound to the
/// volume uuid and the page index) and that the unused words are zero.
pub fn decode_page(b: &[u8], page: u64, uuid: u128, n: usize) -> Result<Vec<u64>, String> {
    let n = n.min(PAGE_WORDS);
    if b.len() < PAGE_SIZE {
        return Err(format!("page {page}: short ({} bytes)", b.len()));
    }
    let off = PAGE_WORDS * 8;
    let stored = u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]]);
    let computed = page_crc(b, page, uuid);
    if stored != computed {
        return Err(format!("page {page}: CRC mismatch (stored {stored:#010x}, computed {computed:#010x})"));
    }
    if b[off + 4..PAGE_SIZE].iter().any(|&x| x != 0) || b[n * 8..off].iter().any(|&x| x != 0) {
        return Err(format!("page {page}: bits set past the end of the bitmap"));
    }
    Ok((0..n)
        .map(|i| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i * 8..i * 8 + 8]);
            u64::from_le_bytes(a)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const G: u32 = 4096;

    #[test]
    fn granularity_is_checked() {
        for g in [4096, 8192, 65536, 1 << 20] {
            assert!(validate_granularity(g).is_ok());
            assert!(DirtyBitmap::new(1 << 30, g).is_ok());
        }
        for g in [0, 512, 2048, 4097, 12288, 2 << 20] {
            let e = validate_granularity(g).unwrap_err();
            assert!(e.contains("power of two"), "{e}");
        }
    }

    #[test]
    fn set_clear_count_and_partial_last_block() {
        // 10 blocks of 4 KiB + 512 bytes: 11 blocks, the last one short.
        let size = 10 * 4096 + 512;
        let mut b = DirtyBitmap::new(size, G).unwrap();
        assert_eq!((b.bits(), b.count(), b.dirty_bytes()), (11, 0, 0));
        assert_eq!(b.set_range(100, 1), 1);
        assert_eq!(b.set_range(4095, 2), 1, "touches blocks 0 and 1; 0 already set");
        assert_eq!(b.count(), 2);
        assert_eq!(b.set_range(size - 1, 100), 1, "clipped to the volume");
        assert_eq!(b.dirty_bytes(), 2 * 4096 + 512);
        assert_eq!(b.set_range(size, 4096), 0);
        // Clear only fully covered blocks.
        assert_eq!(b.clear_range(1, 8190), 0, "neither block 0 nor 1 is covered");
        assert_eq!(b.clear_range(0, 8192), 2);
        assert_eq!(b.clear_range(10 * 4096, 512), 1, "the short last block is covered to the end");
        assert!(b.is_empty());
        assert_eq!(b.set_all(), 11);
        assert_eq!(b.dirty_bytes(), size);
        assert_eq!(b.words()[0], (1 << 11) - 1, "no bit past the last block");
        assert_eq!(b.clear_all(), 11);
    }

    #[test]
    fn next_run_walks_runs_and_caps_length() {
        let mut b = DirtyBitmap::new(1 << 30, G).unwrap();
        assert_eq!(b.next_run(0, 1 << 20), None);
        b.set_range(0, 3 * 4096);
        b.set_range(63 * 4096, 4096 * 3); // crosses a word boundary
        b.set_range((1 << 30) - 4096, 4096);
        assert_eq!(b.next_run(0, 1 << 20), Some((0, 3 * 4096)));
        assert_eq!(b.next_run(0, 8192), Some((0, 8192)), "capped");
        assert_eq!(b.next_run(0, 1), Some((0, 4096)), "at least one block");
        assert_eq!(b.next_run(8192, 1 << 20), Some((8192, 4096)));
        assert_eq!(b.next_run(3 * 4096, 1 << 20), Some((63 * 4096, 3 * 4096)));
        assert_eq!(b.next_run(66 * 4096, 1 << 20), Some(((1 << 30) - 4096, 4096)));
        assert_eq!(b.next_run(1 << 30, 1 << 20), None);
    }

    #[test]
    fn merge_ors_and_refuses_out_of_range() {
        let mut a = DirtyBitmap::new(100 * 4096, G).unwrap(); // 2 words, 36 bits in the last
        a.set_range(0, 4096);
        assert_eq!(a.merge(0, &[0b11, 1 << 35]).unwrap(), 2);
        assert_eq!(a.count(), 3);
        assert!(a.merge(1, &[1 << 36]).unwrap_err().contains("past the last block"));
        assert!(a.merge(2, &[1]).is_err());
        assert!(a.merge(u64::MAX, &[1]).is_err());
        assert_eq!(a.merge(2, &[]).unwrap(), 0);
    }

    #[test]
    fn pages_round_trip_and_torn_page_reads_as_ones() {
        let size = 3 * PAGE_WORDS as u64 * 64 * 4096 + 4096 * 7; // 4 pages, the last short
        let mut b = DirtyBitmap::new(size, G).unwrap();
        assert_eq!(b.pages(), 4);
        b.set_range(0, 4096);
        b.set_range(PAGE_WORDS as u64 * 64 * 4096 * 2 + 4096 * 5, 4096 * 3);
        b.set_range(size - 1, 1);
        let pages = b.take_dirty_pages(9, 0, usize::MAX);
        assert_eq!(pages.iter().map(|p| p.0).collect::<Vec<_>>(), vec![0, 2, 3]);
        assert!(!b.has_dirty_pages());
        // Batches from a cursor.
        b.mark_all_pages_dirty();
        assert_eq!(b.take_dirty_pages(9, 1, 2).iter().map(|p| p.0).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(b.take_dirty_pages(9, 3, 2).iter().map(|p| p.0).collect::<Vec<_>>(), vec![3]);
        assert_eq!(b.take_dirty_pages(9, 4, 2).len(), 0);
        assert_eq!(b.take_dirty_pages(9, 0, 9).iter().map(|p| p.0).collect::<Vec<_>>(), vec![0]);
        let mut all: Vec<Vec<u8>> = (0..4).map(|p| b.encode_page(p, 9)).collect();
        let mut c = DirtyBitmap::new(size, G).unwrap();
        for (p, bytes) in all.iter().enumerate() {
            c.load_page(p, bytes, 9).unwrap();
        }
        assert_eq!(c.words(), b.words());
        assert_eq!(c.count(), b.count());
        // Another volume's page, or another page's bytes, fail the CRC.
        let mut d = DirtyBitmap::new(size, G).unwrap();
        assert!(d.load_page(0, &all[0], 10).unwrap_err().contains("CRC"));
        assert!(d.load_page(1, &all[0], 9).is_err());
        // A torn page: its blocks read as ones, the others are kept.
        all[2][100] ^= 0xff;
        let mut e = DirtyBitmap::new(size, G).unwrap();
        for (p, bytes) in all.iter().enumerate() {
            let r = e.load_page(p, bytes, 9);
            assert_eq!(r.is_err(), p == 2);
        }
        assert_eq!(e.count(), PAGE_WORDS as u64 * 64 + 2);
        assert_eq!(e.take_dirty_pages(9, 0, 1).iter().map(|p| p.0).collect::<Vec<_>>(), vec![2]);
    }

    /// The reference model: one bool per block.
    #[derive(Debug, Clone)]
    enum Act {
        Set(u64, u64),
        Clear(u64, u64),
        SetAll,
        Merge(u64, Vec<u64>),
    }

    fn act(size: u64) -> impl Strategy<Value = Act> {
        let r = (0..size + 8192, 0..size / 2 + 1);
        prop_oneof![
            6 => r.clone().prop_map(|(o, l)| Act::Set(o, l)),
            4 => r.prop_map(|(o, l)| Act::Clear(o, l)),
            1 => Just(Act::SetAll),
            1 => (0u64..8, proptest::collection::vec(any::<u64>(), 0..3)).prop_map(|(f, w)| Act::Merge(f, w)),
        ]
    }

    proptest! {
        #[test]
        fn decode_page_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..4200), n in 0usize..1000, page in any::<u64>()) {
            let _ = decode_page(&bytes, page, 1, n);
        }

        #[test]
        fn matches_a_vec_of_bool(
            shift in 12u32..15,
            blocks in 1u64..400,
            tail in 0u64..4096,
            acts in proptest::collection::vec(act(400 * 16384), 1..40),
            probes in proptest::collection::vec((0u64..400 * 16384, 0u64..200_000), 1..10),
        ) {
            let g = 1u64 << shift;
            let size = blocks * g - tail;
            let mut b = DirtyBitmap::new(size, g as u32).unwrap();
            let n = b.bits() as usize;
            prop_assert_eq!(n as u64, size.div_ceil(g));
            let mut m = vec![false; n];
            for a in acts {
                match a {
                    Act::Set(o, l) => {
                        b.set_range(o, l);
                        if l > 0 && o < size {
                            let e = (o + l).min(size);
                            for x in &mut m[(o / g) as usize..=((e - 1) / g) as usize] { *x = true; }
                        }
                    }
                    Act::Clear(o, l) => {
                        b.clear_range(o, l);
                        if l > 0 && o < size {
                            let e = (o + l).min(size);
                            for (i, x) in m.iter_mut().enumerate() {
                                let (bs, be) = (i as u64 * g, ((i as u64 + 1) * g).min(size));
                                if bs >= o && be <= e { *x = false; }
                            }
                        }
                    }
                    Act::SetAll => { b.set_all(); m.iter_mut().for_each(|x| *x = true); }
                    Act::Merge(f, w) => {
                        let ok = b.merge(f, &w).is_ok();
                        if ok {
                            for (i, word) in w.iter().enumerate() {
                                for bit in 0..64 {
                                    if word & (1 << bit) != 0 { m[(f as usize + i) * 64 + bit] = true; }
                                }
                            }
                        }
                    }
                }
                for (i, &x) in m.iter().enumerate() {
                    prop_assert_eq!(b.get(i as u64), x, "bit {}", i);
                }
                prop_assert_eq!(b.count(), m.iter().filter(|&&x| x).count() as u64);
                let bytes: u64 = m.iter().enumerate().filter(|&(_, &x)| x)
                    .map(|(i, _)| ((i as u64 + 1) * g).min(size) - i as u64 * g).sum();
                prop_assert_eq!(b.dirty_bytes(), bytes);
            }
            for (from, max) in probes {
                let got = b.next_run(from, max);
                let start = (from / g) as usize;
                let want = if from >= size { None } else {
                    m.iter().skip(start).position(|&x| x).map(|p| {
                        let s = start + p;
                        let cap = (max / g).max(1) as usize;
                        let mut e = s;
                        while e < n && m[e] && e - s < cap { e += 1; }
                        let off = s as u64 * g;
                        (off, ((e - s) as u64 * g).min(size - off))
                    })
                };
                prop_assert_eq!(got, want);
            }
            // Pages carry exactly the words.
            let mut c = DirtyBitmap::new(size, g as u32).unwrap();
            for p in 0..b.pages() {
                c.load_page(p, &b.encode_page(p, 77), 77).unwrap();
            }
            prop_assert_eq!(c.words(), b.words());
            prop_assert_eq!(c.count(), b.count());
        }
    }

    /// The log writer's hot path: 1M single-block sets at random places on
    /// a 1 TiB volume, then a full scan of the runs. Run with
    /// `cargo test --release --lib bitmap::tests::hot_path -- --ignored --nocapture`.
    #[test]
    #[ignore = "timing; run in release"]
    fn hot_path_timing() {
        use rand::{Rng, SeedableRng};
        let mut b = DirtyBitmap::new(1 << 40, G).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let offs: Vec<u64> = (0..1_000_000).map(|_| rng.random_range(0..(1u64 << 40) / 4096) * 4096).collect();
        let t = std::time::Instant::now();
        for &o in &offs {
            b.set_range(o, 4096);
        }
        let set = t.elapsed();
        let t = std::time::Instant::now();
        let (mut from, mut runs) = (0, 0u64);
        while let Some((o, l)) = b.next_run(from, 256 << 10) {
            from = o + l;
            runs += 1;
        }
        let scan = t.elapsed();
        eprintln!(
            "1M set_range(4 KiB): {:?} ({} ns/op); scan of {runs} runs over 1 TiB: {scan:?}",
            set,
            set.as_nanos() / 1_000_000
        );
        assert!(runs > 900_000 && runs <= b.count(), "{runs} runs, {} bits", b.count());
    }

    /// Large ranges cost word operations, not bit loops: setting and
    /// clearing a 1 TiB volume's bitmap (256 Mi bits) a few times takes
    /// well under a second even in a debug build.
    #[test]
    fn large_ranges_are_word_operations() {
        let mut b = DirtyBitmap::new(1 << 40, G).unwrap();
        let t = std::time::Instant::now();
        for _ in 0..3 {
            assert_eq!(b.set_range(4096 * 3, (1 << 40) - 8192 * 3), (1 << 28) - 6);
            assert_eq!(b.clear_range(0, 1 << 40), (1 << 28) - 6);
        }
        assert!(t.elapsed() < std::time::Duration::from_secs(20), "{:?}", t.elapsed());
        assert!(b.is_empty());
    }

    #[test]
    fn resident_size_is_bounded_and_the_refusal_says_what_fits() {
        const TIB: u64 = 1 << 40;
        assert_eq!(resident_bytes(TIB, 4096), 32 << 20);
        assert_eq!(resident_bytes(TIB, 1 << 20), 128 << 10);
        assert!(check_resident(32 * TIB, 4096).is_ok());
        assert_eq!(
            check_resident(1024 * TIB, 4096).unwrap_err(),
            "1024TiB needs a 32GiB dirty bitmap in memory at bitmap_granularity 4KiB (32MiB per TiB); \
             at most 1GiB is allowed: set bitmap_granularity = \"128KiB\" or more"
        );
        assert!(check_resident(u64::MAX, 1 << 20).unwrap_err().contains("no bitmap_granularity"));
        assert!(DirtyBitmap::new(1024 * TIB, 4096).is_err(), "no 32 GiB allocation");
    }
}
