//! The servers a run measures, started by repbench itself in its work
//! directory, all on loopback:
//!
//! - `repblock`: one `repd` with a single-node config (no peer);
//! - `A`, `B`, `C`: a `repd` pair (`alpha` primary, `beta` secondary) under
//!   that protocol, with the in-project delay proxy on the replication link;
//!   the RTT of a cell is set on the proxies before it runs;
//! - `qemu-nbd` and `nbdkit` (file plugin) serving a plain file (written in full first);
//! - `file`: the local file itself, driven with pwrite/pread/fdatasync.
//!
//! Replication topology (both nodes dial, one connection survives; each
//! direction of dialing has its own proxy, and both get the same delay):
//!
//! ```text
//!   beta  --dials--> proxy_to_alpha --> alpha.replication_listen
//!   alpha --dials--> proxy_to_beta  --> beta.replication_listen
//! ```
//!
//! The proxy delays each direction by RTT/2, so a round trip over the link
//! costs the RTT.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use repblock::control::{ControlClient, Request};
use repblock::nbd::{ListenAddr, NbdClient};
use repblock_netproxy::{Proxy, ProxyHandle};
use serde::{Deserialize, Serialize};

/// Errors while starting or steering a target.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("No repd binary at {0} (build the workspace: `cargo build --release`, or give --repd PATH)")]
    NoRepd(PathBuf),
    #[error("No repctl next to repd at {0}")]
    NoRepctl(PathBuf),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{cmd} failed ({status}): {output}")]
    Command { cmd: String, status: String, output: String },
    #[error("{name} did not come up within {secs}s: {detail}")]
    Timeout { name: String, secs: u64, detail: String },
    #[error("{name} exited at start ({status}); log {log}:\n{tail}")]
    Exited { name: String, status: String, log: PathBuf, tail: String },
    #[error("Starting the replication proxy: {0}")]
    Proxy(#[source] std::io::Error),
    #[error("Invalid node {uri:?}: {why}")]
    Uri { uri: String, why: String },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> TargetError {
    let what = what.into();
    move |source| TargetError::Io { what, source }
}

/// What a target is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// repd with no peer.
    Standalone,
    /// repd pair, protocol A.
    #[serde(rename = "A")]
    A,
    /// repd pair, protocol B.
    #[serde(rename = "B")]
    B,
    /// repd pair, protocol C.
    #[serde(rename = "C")]
    C,
    QemuNbd,
    Nbdkit,
    /// The local file (pwrite/pread/fdatasync).
    File,
    /// An NBD export repbench did not start (`--nodes NAME=URI`).
    External,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Standalone => "repblock",
            Kind::A => "A",
            Kind::B => "B",
            Kind::C => "C",
            Kind::QemuNbd => "qemu-nbd",
            Kind::Nbdkit => "nbdkit",
            Kind::File => "file",
            Kind::External => "external",
        }
    }

    pub fn replicated(self) -> bool {
        matches!(self, Kind::A | Kind::B | Kind::C)
    }

    pub fn protocol(s: &str) -> Option<Kind> {
        match s.trim() {
            "A" | "a" => Some(Kind::A),
            "B" | "b" => Some(Kind::B),
            "C" | "c" => Some(Kind::C),
            _ => None,
        }
    }

    pub fn peer(s: &str) -> Option<Kind> {
        match s.trim() {
            "qemu-nbd" => Some(Kind::QemuNbd),
            "nbdkit" => Some(Kind::Nbdkit),
            "file" => Some(Kind::File),
            "repblock" | "standalone" => Some(Kind::Standalone),
            _ => None,
        }
    }
}

/// The repd and repctl binaries.
#[derive(Debug, Clone)]
pub struct Tools {
    pub repd: PathBuf,
    pub repctl: PathBuf,
}

impl Tools {
    /// `repd` (given, or next to the running executable) and `repctl`
    /// beside it.
    pub fn locate(repd: Option<&Path>) -> Result<Tools, TargetError> {
        let repd = match repd {
            Some(p) => p.to_path_buf(),
            None => std::env::current_exe()
                .ok()
                .and_then(|e| e.parent().map(|d| d.join("repd")))
                .unwrap_or_else(|| PathBuf::from("repd")),
        };
        if !repd.is_file() {
            return Err(TargetError::NoRepd(repd));
        }
        let repctl = repd.with_file_name("repctl");
        if !repctl.is_file() {
            return Err(TargetError::NoRepctl(repctl));
        }
        Ok(Tools { repd, repctl })
    }
}

/// Whether `tool` is an executable on PATH.
pub fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

/// A port that was free a moment ago, outside the ephemeral range (see
/// `repblock::ports`).
fn free_port() -> Result<u16, TargetError> {
    repblock::ports::unused_local_port().map_err(io_err("choosing a free port"))
}

/// Puts the command's process in its own process group, so that a Ctrl-C
/// in the terminal reaches repbench only (which then stops the servers
/// itself), and has the kernel kill it if repbench dies without cleaning up
/// (SIGKILL), so that no server outlives the run.
pub fn own_group_dies_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    cmd.process_group(0);
    // SAFETY: the closure runs in the child between fork and exec; it only
    // calls prctl(2), which is async-signal-safe, and touches no memory
    // shared with the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A child process killed (SIGKILL) and reaped on drop.
#[derive(Debug)]
pub struct Process {
    pub name: String,
    child: Child,
    pub log: PathBuf,
}

impl Process {
    fn spawn(name: &str, cmd: &mut Command, log: PathBuf) -> Result<Process, TargetError> {
        let file = File::create(&log).map_err(io_err(format!("creating {}", log.display())))?;
        let file2 = file.try_clone().map_err(io_err(format!("duplicating {}", log.display())))?;
        cmd.stdin(Stdio::null()).stdout(file).stderr(file2);
        own_group_dies_with_parent(cmd);
        let child = cmd.spawn().map_err(io_err(format!("starting {name} ({cmd:?})")))?;
        Ok(Process { name: name.to_string(), child, log })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails with the log's tail if the process has exited.
    fn check_running(&mut self) -> Result<(), TargetError> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(TargetError::Exited {
                name: self.name.clone(),
                status: status.to_string(),
                log: self.log.clone(),
                tail: tail(&self.log),
            }),
            Err(e) => Err(io_err(format!("waiting for {}", self.name))(e)),
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// A server process measured by a cell (CPU seconds, peak RSS).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measured {
    /// `primary`, `secondary` or `server`.
    pub role: String,
    pub pid: u32,
}

/// One started target.
pub struct Deployment {
    pub kind: Kind,
    /// The name of an external node (its cells' target label).
    pub label: Option<String>,
    /// Where the NBD export is (none for the local file).
    pub nbd: Option<ListenAddr>,
    pub export: String,
    /// The file the `file` target drives.
    pub file: Option<PathBuf>,
    pub processes: Vec<(String, Process)>,
    proxies: Vec<ProxyHandle>,
    /// Extra facts for the results (engine, options).
    pub notes: String,
}

impl Deployment {
    /// Sets the replication link's round-trip time (no-op without a peer).
    pub fn set_rtt(&self, rtt: Duration) {
        for p in &self.proxies {
            p.set_delay_both(rtt / 2);
        }
    }

    pub fn measured(&self) -> Vec<Measured> {
        self.processes.iter().map(|(role, p)| Measured { role: role.clone(), pid: p.pid() }).collect()
    }

    /// Fails if one of the processes has exited.
    pub fn check_running(&mut self) -> Result<(), TargetError> {
        self.processes.iter_mut().try_for_each(|(_, p)| p.check_running())
    }
}

/// Creates `path` of `size` bytes, every block written (zeros) and synced,
/// so that no target pays for block allocation or for converting unwritten
/// extents during the measurement (a `fallocate`d file would: on ext4 the
/// first write to each block makes `fdatasync` commit the journal).
pub fn preallocated_file(path: &Path, size: u64) -> Result<(), TargetError> {
    use std::io::Write;
    let mut f = File::create(path).map_err(io_err(format!("creating {}", path.display())))?;
    let chunk = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..n]).map_err(io_err(format!("writing {}", path.display())))?;
        left -= n as u64;
    }
    f.sync_all().map_err(io_err(format!("syncing {}", path.display())))?;
    Ok(())
}

/// Starts targets in `dir`.
pub struct Launcher<'a> {
    pub tools: Option<&'a Tools>,
    pub dir: &'a Path,
    pub size: u64,
    pub rt: &'a tokio::runtime::Handle,
    /// Extra top-level lines for every repd config (e.g. `io_engine = "sync"`).
    pub repd_extra: &'a str,
}

impl Launcher<'_> {
    pub fn start(&self, kind: Kind) -> Result<Deployment, TargetError> {
        match kind {
            Kind::Standalone => self.standalone(),
            Kind::A | Kind::B | Kind::C => self.pair(kind),
            Kind::QemuNbd => self.qemu_nbd(),
            Kind::External => Err(TargetError::Uri {
                uri: String::new(),
                why: "an external node is given by --nodes NAME=URI".into(),
            }),
            Kind::Nbdkit => self.nbdkit(),
            Kind::File => {
                let path = self.dir.join("local.img");
                preallocated_file(&path, self.size)?;
                Ok(Deployment {
                    label: None,
                    kind,
                    nbd: None,
                    export: String::new(),
                    file: Some(path),
                    processes: Vec::new(),
                    proxies: Vec::new(),
                    notes: "pwrite/pread/fdatasync on a written (allocated) file, page cache on".into(),
                })
            }
        }
    }

    fn tools(&self) -> Result<&Tools, TargetError> {
        self.tools.ok_or_else(|| TargetError::NoRepd(PathBuf::from("repd")))
    }

    fn repctl(&self, config: &Path, node: &str, args: &[&str]) -> Result<String, TargetError> {
        let tools = self.tools()?;
        let out = Command::new(&tools.repctl)
            .arg("--config")
            .arg(config)
            .arg("--node")
            .arg(node)
            .args(args)
            .output()
            .map_err(io_err(format!("running {}", tools.repctl.display())))?;
        if !out.status.success() {
            return Err(TargetError::Command {
                cmd: format!("repctl --node {node} {}", args.join(" ")),
                status: out.status.to_string(),
                output: format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn start_repd(&self, config: &Path, node: &str, control: &Path, tag: &str) -> Result<Process, TargetError> {
        let tools = self.tools()?;
        let mut cmd = Command::new(&tools.repd);
        cmd.arg("--config").arg(config).arg("--node").arg(node).env("RUST_LOG", "warn").env_remove("REPBLOCK_FAULTS");
        let mut p =
            Process::spawn(&format!("repd {tag}/{node}"), &mut cmd, self.dir.join(format!("{tag}-{node}.log")))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            p.check_running()?;
            if status(control, node).is_ok() {
                return Ok(p);
            }
            if Instant::now() > deadline {
                return Err(TargetError::Timeout { name: p.name.clone(), secs: 60, detail: tail(&p.log) });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn node_section(&self, tag: &str, name: &str, nbd: u16, repl: Option<(u16, u16)>) -> String {
        let d = self.dir.join(tag);
        let repl = match repl {
            Some((adv, listen)) => {
                format!("replication = \"127.0.0.1:{adv}\"\nreplication_listen = \"127.0.0.1:{listen}\"\n")
            }
            None => String::new(),
        };
        format!(
            "[[node]]\nname = \"{name}\"\n{repl}nbd = \"127.0.0.1:{nbd}\"\ncontrol = \"{ctl}\"\ndir = \"{dir}\"\n\n",
            ctl = d.join(format!("{name}.sock")).display(),
            dir = d.join(name).display(),
        )
    }

    fn standalone(&self) -> Result<Deployment, TargetError> {
        let tag = "standalone";
        std::fs::create_dir_all(self.dir.join(tag)).map_err(io_err("creating the standalone directory"))?;
        let nbd = free_port()?;
        let config = self.dir.join(format!("{tag}.toml"));
        let text = format!(
            "name = \"r0\"\nsize = {}\n{}\n{}",
            self.size,
            self.repd_extra,
            self.node_section(tag, "alpha", nbd, None)
        );
        std::fs::write(&config, text).map_err(io_err(format!("writing {}", config.display())))?;
        self.repctl(&config, "alpha", &["create-md"])?;
        let control = self.dir.join(tag).join("alpha.sock");
        let p = self.start_repd(&config, "alpha", &control, tag)?;
        self.repctl(&config, "alpha", &["promote", "--force"])?;
        let engine = status(&control, "alpha").ok().and_then(|s| s["io_engine"].as_str().map(String::from));
        Ok(Deployment {
            label: None,
            kind: Kind::Standalone,
            nbd: Some(ListenAddr::Tcp(([127, 0, 0, 1], nbd).into())),
            export: "r0".into(),
            file: None,
            processes: vec![("primary".into(), p)],
            proxies: Vec::new(),
            notes: format!("single-node repd, io_engine {}", engine.as_deref().unwrap_or("?")),
        })
    }

    fn pair(&self, kind: Kind) -> Result<Deployment, TargetError> {
        let tag = format!("proto-{}", kind.name());
        std::fs::create_dir_all(self.dir.join(&tag)).map_err(io_err("creating the pair directory"))?;
        let (listen_a, listen_b, nbd_a, nbd_b) = (free_port()?, free_port()?, free_port()?, free_port()?);
        let any: SocketAddr = ([127, 0, 0, 1], 0).into();
        let (to_alpha, to_beta) = self
            .rt
            .block_on(async {
                let a = Proxy::start(any, ([127, 0, 0, 1], listen_a).into()).await?;
                let b = Proxy::start(any, ([127, 0, 0, 1], listen_b).into()).await?;
                Ok::<_, std::io::Error>((a, b))
            })
            .map_err(TargetError::Proxy)?;
        let config = self.dir.join(format!("{tag}.toml"));
        let text = format!(
            "name = \"r0\"\nsize = {}\nprotocol = \"{}\"\nsecret = \"repbench\"\n{}\n{}{}",
            self.size,
            kind.name(),
            self.repd_extra,
            self.node_section(&tag, "alpha", nbd_a, Some((to_alpha.local_addr().port(), listen_a))),
            self.node_section(&tag, "beta", nbd_b, Some((to_beta.local_addr().port(), listen_b))),
        );
        std::fs::write(&config, text).map_err(io_err(format!("writing {}", config.display())))?;
        for node in ["alpha", "beta"] {
            self.repctl(&config, node, &["create-md"])?;
        }
        let ctl_a = self.dir.join(&tag).join("alpha.sock");
        let ctl_b = self.dir.join(&tag).join("beta.sock");
        let mut alpha = self.start_repd(&config, "alpha", &ctl_a, &tag)?;
        let mut beta = self.start_repd(&config, "beta", &ctl_b, &tag)?;
        // Both volumes are new and blank: skip the initial full sync (DRBD's
        // new-current-uuid --clear-bitmap) once the link is up.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            alpha.check_running()?;
            beta.check_running()?;
            let connected = status(&ctl_a, "alpha").is_ok_and(|s| s["connection"] == "connected");
            if connected && self.repctl(&config, "alpha", &["new-current-uuid", "--clear-bitmap"]).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                return Err(TargetError::Timeout {
                    name: format!("protocol {} pair link", kind.name()),
                    secs: 30,
                    detail: format!("{:?}", status(&ctl_a, "alpha").ok()),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.repctl(&config, "alpha", &["promote"])?;
        self.repctl(&config, "beta", &["wait-sync", "--timeout", "60"])?;
        let s = status(&ctl_a, "alpha")?;
        if s["replication"] != "established" || s["role"] != "primary" {
            return Err(TargetError::Timeout {
                name: format!("protocol {} pair", kind.name()),
                secs: 60,
                detail: format!("alpha is not an established primary: {s}"),
            });
        }
        Ok(Deployment {
            label: None,
            kind,
            nbd: Some(ListenAddr::Tcp(([127, 0, 0, 1], nbd_a).into())),
            export: "r0".into(),
            file: None,
            processes: vec![("primary".into(), alpha), ("secondary".into(), beta)],
            proxies: vec![to_alpha, to_beta],
            notes: format!(
                "repd pair, protocol {}, io_engine {}, delay proxy on the replication link",
                kind.name(),
                s["io_engine"].as_str().unwrap_or("?")
            ),
        })
    }

    /// Waits until an NBD client can negotiate `export` at `port`.
    fn wait_nbd(&self, p: &mut Process, port: u16, export: &str) -> Result<(), TargetError> {
        let addr = ListenAddr::Tcp(([127, 0, 0, 1], port).into());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            p.check_running()?;
            let ok = self.rt.block_on(async {
                match NbdClient::connect(&addr, export).await {
                    Ok(c) => {
                        let _ = c.disconnect().await;
                        true
                    }
                    Err(_) => false,
                }
            });
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(TargetError::Timeout { name: p.name.clone(), secs: 20, detail: tail(&p.log) });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn qemu_nbd(&self) -> Result<Deployment, TargetError> {
        let path = self.dir.join("qemu-nbd.img");
        preallocated_file(&path, self.size)?;
        // O_DIRECT with io_uring, as scripts/bench.sh always ran it; thread
        // pool AIO when this kernel or build has no io_uring.
        let mut last = None;
        for aio in ["io_uring", "threads"] {
            let port = free_port()?;
            let mut cmd = Command::new("qemu-nbd");
            cmd.args(["-f", "raw", "-t", "--cache=none", &format!("--aio={aio}"), "-b", "127.0.0.1"])
                .args(["-p", &port.to_string(), "-x", "r0"])
                .arg(&path);
            let mut p = Process::spawn("qemu-nbd", &mut cmd, self.dir.join(format!("qemu-nbd-{aio}.log")))?;
            match self.wait_nbd(&mut p, port, "r0") {
                Ok(()) => {
                    return Ok(Deployment {
                        label: None,
                        kind: Kind::QemuNbd,
                        nbd: Some(ListenAddr::Tcp(([127, 0, 0, 1], port).into())),
                        export: "r0".into(),
                        file: None,
                        processes: vec![("server".into(), p)],
                        proxies: Vec::new(),
                        notes: format!("qemu-nbd -f raw --cache=none --aio={aio}, written (allocated) file"),
                    });
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| TargetError::NoRepctl(PathBuf::from("qemu-nbd"))))
    }

    fn nbdkit(&self) -> Result<Deployment, TargetError> {
        let path = self.dir.join("nbdkit.img");
        preallocated_file(&path, self.size)?;
        let port = free_port()?;
        let mut cmd = Command::new("nbdkit");
        cmd.args(["-f", "--exit-with-parent", "-i", "127.0.0.1", "-p", &port.to_string(), "file"])
            .arg(format!("file={}", path.display()));
        let mut p = Process::spawn("nbdkit", &mut cmd, self.dir.join("nbdkit.log"))?;
        self.wait_nbd(&mut p, port, "")?;
        Ok(Deployment {
            label: None,
            kind: Kind::Nbdkit,
            nbd: Some(ListenAddr::Tcp(([127, 0, 0, 1], port).into())),
            export: String::new(),
            file: None,
            processes: vec![("server".into(), p)],
            proxies: Vec::new(),
            notes: "nbdkit file plugin (page cache, fdatasync on FLUSH), written (allocated) file".into(),
        })
    }
}

/// `status` of a node through its control socket.
pub fn status(control: &Path, node: &str) -> Result<serde_json::Value, TargetError> {
    let mut c = ControlClient::connect(control, node, Duration::from_secs(5)).map_err(|e| TargetError::Command {
        cmd: format!("status of {node}"),
        status: "no answer".into(),
        output: e.to_string(),
    })?;
    c.request(&Request::Status).map_err(|e| TargetError::Command {
        cmd: format!("status of {node}"),
        status: "error".into(),
        output: e.to_string(),
    })
}

/// An existing node given as `NAME=URI` (`--nodes`): `nbd://HOST[:PORT]/EXPORT`
/// (port 10809 by default) or `nbd+unix:///EXPORT?socket=PATH`. Nothing is
/// started or stopped, and no process is measured.
pub fn external(spec: &str) -> Result<Deployment, TargetError> {
    let bad = |why: &str| TargetError::Uri { uri: spec.to_string(), why: why.to_string() };
    let (name, uri) = spec.split_once('=').ok_or_else(|| bad("expected NAME=URI"))?;
    if name.is_empty() || name.contains(['|', ' ']) {
        return Err(bad("the name must be non-empty, without spaces or '|'"));
    }
    let (nbd, export) = if let Some(rest) = uri.strip_prefix("nbd+unix://") {
        let (path_part, query) = rest.split_once('?').ok_or_else(|| bad("nbd+unix:// needs ?socket=PATH"))?;
        let export = path_part.strip_prefix('/').unwrap_or(path_part);
        let socket = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("socket="))
            .filter(|p| !p.is_empty())
            .ok_or_else(|| bad("nbd+unix:// needs ?socket=PATH"))?;
        (ListenAddr::Unix(PathBuf::from(socket)), export.to_string())
    } else if let Some(rest) = uri.strip_prefix("nbd://") {
        let (hostport, export) = rest.split_once('/').unwrap_or((rest, ""));
        // "[v6]:port", "[v6]", "host:port", "host".
        let has_port = if hostport.starts_with('[') { hostport.contains("]:") } else { hostport.contains(':') };
        let hostport = if has_port { hostport.to_string() } else { format!("{hostport}:10809") };
        use std::net::ToSocketAddrs;
        let addr = hostport
            .to_socket_addrs()
            .map_err(|e| bad(&format!("cannot resolve {hostport}: {e}")))?
            .next()
            .ok_or_else(|| bad(&format!("{hostport} resolves to no address")))?;
        (ListenAddr::Tcp(addr), export.to_string())
    } else {
        return Err(bad("expected nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH"));
    };
    Ok(Deployment {
        kind: Kind::External,
        label: Some(name.to_string()),
        nbd: Some(nbd),
        export,
        file: None,
        processes: Vec::new(),
        proxies: Vec::new(),
        notes: format!("existing node {uri}, not started by repbench"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn external_node_uris() {
        let d = external("prod=nbd://127.0.0.1:10810/r0").expect("tcp");
        assert_eq!((d.label.as_deref(), d.export.as_str()), (Some("prod"), "r0"));
        assert_eq!(d.nbd.as_ref().map(ToString::to_string).as_deref(), Some("127.0.0.1:10810"));
        let d = external("x=nbd://127.0.0.1").expect("default port");
        assert_eq!(d.nbd.as_ref().map(ToString::to_string).as_deref(), Some("127.0.0.1:10809"));
        assert_eq!(d.export, "");
        let d = external("u=nbd+unix:///r0?socket=/run/r0.nbd").expect("unix");
        assert_eq!(d.nbd.as_ref().map(ToString::to_string).as_deref(), Some("unix:/run/r0.nbd"));
        assert_eq!(d.export, "r0");
        for bad in ["nbd://127.0.0.1/r0", "y=http://host/", "u=nbd+unix:///r0", "=nbd://127.0.0.1/"] {
            assert!(matches!(external(bad), Err(TargetError::Uri { .. })), "{bad} must be refused");
        }
    }
}
