//! The named workloads (docs/benchmarks.md describes each).
//!
//! A workload is what one cell of the matrix runs against one target: block
//! size, queue depth, connections, read share, offset pattern and whether
//! every write is followed by a FLUSH (the pair is then one operation and
//! its latency is the pair's, what a database's commit sees).

use serde::{Deserialize, Serialize};

/// How offsets are chosen inside the region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pattern {
    /// Uniformly random, aligned to the block size (seeded per worker).
    Random,
    /// One shared cursor over the region, wrapping at its end.
    Sequential,
}

/// What follows a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FlushMode {
    /// Nothing: a write completes when the server replies.
    None,
    /// A FLUSH after every write; the operation (and its latency) is the
    /// write + flush pair.
    AfterEachWrite,
    /// Every write carries NBD_CMD_FLAG_FUA (durable when it completes);
    /// on the local file, `fdatasync` after each `pwrite`.
    Fua,
}

impl FlushMode {
    /// Whether a write completes only once durable.
    pub fn durable(self) -> bool {
        self != FlushMode::None
    }

    /// Parses `none`, `after-each-write` (or `flush`) and `fua`.
    pub fn parse(s: &str) -> Result<FlushMode, String> {
        match s.trim() {
            "none" => Ok(FlushMode::None),
            "after-each-write" | "flush" => Ok(FlushMode::AfterEachWrite),
            "fua" => Ok(FlushMode::Fua),
            other => Err(format!("{other:?} is not none, flush (after-each-write) or fua")),
        }
    }
}

/// One workload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    pub name: String,
    pub description: String,
    pub block_size: u32,
    /// Requests in flight per connection.
    pub queue_depth: usize,
    pub connections: usize,
    /// Percentage of operations that are reads (0–100).
    pub read_percent: u8,
    pub pattern: Pattern,
    pub flush: FlushMode,
}

const KIB: u32 = 1024;
const MIB: u32 = 1024 * 1024;

/// The names [`builtin`] knows, in the default order.
pub const NAMES: [&str; 6] =
    ["qd1-write", "qd1-write-flush", "qd32-randwrite", "qd32-randread", "seq1m-write", "mixed-70-30"];

/// The workload called `name`, if there is one.
pub fn builtin(name: &str) -> Option<Workload> {
    let w = |description: &str, block_size, queue_depth, read_percent, pattern, flush| Workload {
        name: name.to_string(),
        description: description.to_string(),
        block_size,
        queue_depth,
        connections: 1,
        read_percent,
        pattern,
        flush,
    };
    Some(match name {
        "qd1-write" => w("4 KiB random write, QD1", 4 * KIB, 1, 0, Pattern::Random, FlushMode::None),
        "qd1-write-flush" => w(
            "4 KiB random write + FLUSH, QD1 (latency of the pair: a database commit)",
            4 * KIB,
            1,
            0,
            Pattern::Random,
            FlushMode::AfterEachWrite,
        ),
        "qd32-randwrite" => w("4 KiB random write, QD32", 4 * KIB, 32, 0, Pattern::Random, FlushMode::None),
        "qd32-randread" => w("4 KiB random read, QD32", 4 * KIB, 32, 100, Pattern::Random, FlushMode::None),
        "seq1m-write" => w("1 MiB sequential write, QD8", MIB, 8, 0, Pattern::Sequential, FlushMode::None),
        "mixed-70-30" => {
            w("4 KiB random, 70% read / 30% write, QD16", 4 * KIB, 16, 70, Pattern::Random, FlushMode::None)
        }
        _ => return None,
    })
}

/// Parses a comma-separated list of workload names (`all` for every one).
pub fn parse_list(s: &str) -> Result<Vec<Workload>, String> {
    if s.trim() == "all" {
        return Ok(NAMES.iter().filter_map(|n| builtin(n)).collect());
    }
    let mut out = Vec::new();
    for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let w = builtin(name).ok_or_else(|| format!("unknown workload {name:?} (known: {})", NAMES.join(", ")))?;
        if !out.iter().any(|o: &Workload| o.name == w.name) {
            out.push(w);
        }
    }
    if out.is_empty() {
        return Err("no workload given".into());
    }
    Ok(out)
}

impl Workload {
    /// Whether any operation writes.
    pub fn writes(&self) -> bool {
        self.read_percent < 100
    }

    /// Whether any operation reads.
    pub fn reads(&self) -> bool {
        self.read_percent > 0
    }

    /// Applies the command line's overrides. A changed workload is renamed
    /// (`qd1-write+fua`, `qd32-randwrite+qd8`, `…+c4`) so that it is never
    /// taken for the named workload (the judged targets use the names).
    pub fn override_with(&mut self, flush: Option<FlushMode>, queue_depth: Option<usize>, connections: Option<usize>) {
        let mut tags = Vec::new();
        if let Some(f) = flush.filter(|f| *f != self.flush) {
            self.flush = f;
            tags.push(match f {
                FlushMode::None => "noflush".to_string(),
                FlushMode::AfterEachWrite => "flush".into(),
                FlushMode::Fua => "fua".into(),
            });
        }
        if let Some(q) = queue_depth.map(|q| q.max(1)).filter(|q| *q != self.queue_depth) {
            self.queue_depth = q;
            tags.push(format!("qd{q}"));
        }
        if let Some(c) = connections.map(|c| c.max(1)).filter(|c| *c != self.connections) {
            self.connections = c;
            tags.push(format!("c{c}"));
        }
        if !tags.is_empty() {
            self.name = format!("{}+{}", self.name, tags.join("+"));
            self.description = format!(
                "{} [overridden: flush {:?}, QD {}, {} connection(s)]",
                self.description, self.flush, self.queue_depth, self.connections
            );
        }
    }

    /// Requests in flight in total.
    pub fn total_depth(&self) -> usize {
        self.queue_depth * self.connections
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_is_a_workload_with_that_name() {
        for n in NAMES {
            let w = builtin(n).expect("builtin");
            assert_eq!(w.name, n);
            assert!(w.block_size.is_power_of_two() && w.queue_depth >= 1 && w.read_percent <= 100);
        }
        assert_eq!(builtin("qd1-write-flush").map(|w| w.flush), Some(FlushMode::AfterEachWrite));
        assert_eq!(builtin("seq1m-write").map(|w| (w.block_size, w.queue_depth)), Some((MIB, 8)));
    }

    #[test]
    fn overrides_rename_the_workload() {
        let mut w = builtin("qd1-write").expect("wl");
        w.override_with(Some(FlushMode::None), Some(1), None);
        assert_eq!(w.name, "qd1-write", "no change, no rename");
        w.override_with(Some(FlushMode::Fua), Some(4), Some(2));
        assert_eq!(w.name, "qd1-write+fua+qd4+c2");
        assert_eq!((w.flush, w.queue_depth, w.connections), (FlushMode::Fua, 4, 2));
        assert!(w.description.contains("overridden"));
        assert_eq!(FlushMode::parse("flush"), Ok(FlushMode::AfterEachWrite));
        assert!(FlushMode::parse("always").is_err());
        assert!(FlushMode::Fua.durable() && !FlushMode::None.durable());
    }

    #[test]
    fn lists_parse_dedup_and_refuse_unknown_names() {
        let l = parse_list("qd1-write, qd32-randread,qd1-write").expect("list");
        assert_eq!(l.iter().map(|w| w.name.as_str()).collect::<Vec<_>>(), ["qd1-write", "qd32-randread"]);
        assert_eq!(parse_list("all").expect("all").len(), NAMES.len());
        let e = parse_list("qd1-write,qd64").expect_err("unknown");
        assert!(e.contains("qd64") && e.contains("qd1-write-flush"), "{e}");
        assert!(parse_list(" , ").is_err());
    }
}
