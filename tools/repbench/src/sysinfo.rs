//! What the results record about the machine and the server processes:
//! CPU model, cores, kernel, the file system under the work directory, the
//! git commit; per process CPU seconds (`/proc/PID/stat`) and peak RSS
//! (`VmHWM` in `/proc/PID/status`).

use std::path::Path;
use std::process::Command;

use serde::{Deserialize, Serialize};

/// The machine a run was made on.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    pub cpu_model: String,
    pub cores: usize,
    pub kernel: String,
    pub hostname: String,
    pub memory_kib: u64,
    /// File system type and source device of the work directory.
    pub work_dir: String,
    pub work_dir_fs: String,
    pub work_dir_device: String,
}

/// Collects [`Machine`] for a run whose files live in `work_dir`.
pub fn machine(work_dir: &Path) -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, v)| v.trim().to_string()))
        .unwrap_or_else(|| "unknown".into());
    let memory_kib = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:").and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()))
        .unwrap_or(0);
    let (fs, device) = mount_of(work_dir).unwrap_or_else(|| ("unknown".into(), "unknown".into()));
    Machine {
        cpu_model,
        cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        kernel: read_trim("/proc/sys/kernel/osrelease"),
        hostname: read_trim("/proc/sys/kernel/hostname"),
        memory_kib,
        work_dir: work_dir.display().to_string(),
        work_dir_fs: fs,
        work_dir_device: device,
    }
}

fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path).map(|s| s.trim().to_string()).unwrap_or_else(|_| "unknown".into())
}

/// (fs type, source) of the mount holding `path`, from /proc/self/mountinfo
/// (the longest mount point that is a prefix of the canonical path).
fn mount_of(path: &Path) -> Option<(String, String)> {
    let path = path.canonicalize().ok()?;
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mut best: Option<(usize, String, String)> = None;
    for line in info.lines() {
        // id parent major:minor root mount-point options [optional...] - fstype source super-options
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(mount_point) = fields.get(4) else { continue };
        let Some(dash) = fields.iter().position(|f| *f == "-") else { continue };
        let (Some(fs), Some(src)) = (fields.get(dash + 1), fields.get(dash + 2)) else { continue };
        let mp = mount_point.replace("\\040", " ");
        if path.starts_with(&mp) && best.as_ref().is_none_or(|(len, _, _)| mp.len() >= *len) {
            best = Some((mp.len(), fs.to_string(), src.to_string()));
        }
    }
    best.map(|(_, fs, src)| (fs, src))
}

/// `git describe`-like identity of the source tree: the commit, with
/// `-dirty` when the tree has uncommitted changes. Looked up in the current
/// directory, then in the tree repbench was built from.
pub fn git_commit() -> String {
    for dir in
        [std::env::current_dir().ok(), Some(Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf())].into_iter().flatten()
    {
        let git = |args: &[&str]| {
            Command::new("git")
                .arg("-C")
                .arg(&dir)
                .args(args)
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        };
        if let Some(commit) = git(&["rev-parse", "HEAD"]) {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
            return if dirty { format!("{commit}-dirty") } else { commit };
        }
    }
    "unknown".into()
}

/// CPU seconds (user + system) a process used so far, its threads included.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_cpu_ticks(&stat).map(|ticks| ticks as f64 / clock_ticks() as f64)
}

/// utime + stime from a /proc/PID/stat line (fields 14 and 15; the command
/// name in parentheses may hold spaces, so count after the last `)`).
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14 → index 11.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn clock_ticks() -> i64 {
    // SAFETY: sysconf only reads a configuration value; no pointers involved.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t } else { 100 }
}

/// Peak resident set size of a process in KiB (`VmHWM`).
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("VmHWM:")?.trim().trim_end_matches("kB").trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_parsed_after_a_command_with_spaces() {
        let line = "123 (a (b) c) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 1 0 100 200 300";
        assert_eq!(parse_cpu_ticks(line), Some(300));
        assert_eq!(parse_cpu_ticks("garbage"), None);
    }

    #[test]
    fn own_process_has_cpu_time_and_rss_and_the_machine_is_described() {
        let me = std::process::id();
        assert!(cpu_seconds(me).is_some());
        assert!(peak_rss_kib(me).is_some_and(|k| k > 0));
        let m = machine(Path::new("/"));
        assert!(m.cores >= 1);
        assert_ne!(m.work_dir_fs, "unknown", "/ is a mount point");
    }
}
