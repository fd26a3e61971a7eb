//! Test harness for end-to-end tests: real `repd`/`repctl` processes on
//! loopback, one temporary directory per node.
//!
//! - [`TestNode::new`] writes a single-node config (engine, size, NBD on a
//!   free TCP port, or a Unix socket) into a fresh temp dir.
//! - `start` spawns `repd` with its stderr captured to a file (one per
//!   start), and waits until the control socket answers; a failed start
//!   panics with the log.
//! - `repctl` runs the real binary; `status` asks the control socket.
//! - `kill9`, `term`, `restart` for crash and shutdown tests.
//! - Drop kills a running repd; a panicking test prints every repd log.
//!
//! - [`pair`]: the two-node harness of the replication tests (two repd,
//!   optionally the in-project proxy on the link); [`durable`]: a random
//!   write workload and the flush/FUA durability model checked after a
//!   crash or failover.
//!
//! External tools (nbdinfo, qemu-img, fio …) are required: a missing one
//! fails the test with the package to install (`scripts/test.sh` installs
//! them), it never skips.

#![allow(dead_code)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use repblock::control::{ControlClient, Request};

pub const REPD: &str = env!("CARGO_BIN_EXE_repd");
pub const REPCTL: &str = env!("CARGO_BIN_EXE_repctl");

/// Generates `NAME_sync` and `NAME_io_uring` tests calling `BODY(engine)`.
#[macro_export]
macro_rules! both_engines {
    ($($name:ident => $body:ident;)*) => {
        $(
            mod $name {
                #[test]
                fn sync() {
                    super::$body("sync");
                }
                #[test]
                fn io_uring() {
                    super::$body("io_uring");
                }
            }
        )*
    };
}

/// A TCP port nobody listens on right now, outside the kernel's ephemeral
/// range (so that no dial can take it as its source port before the daemon
/// binds it; see `repblock::ports`).
pub fn free_port() -> u16 {
    repblock::ports::unused_local_port().expect("a free port")
}

/// `N` distinct TCP ports nobody listens on right now.
pub fn free_ports<const N: usize>() -> [u16; N] {
    std::array::from_fn(|_| free_port())
}

/// Panics with an install hint when `tool` is not on PATH.
pub fn require_tool(tool: &str, package: &str) {
    let found =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file())).unwrap_or(false);
    assert!(found, "{tool} is required by this test: install the Debian package {package} (scripts/test.sh does)");
}

/// Runs a command with a deadline, capturing stdout and stderr (through
/// files, so a chatty tool cannot block on a full pipe).
pub fn run_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    let out = tempfile::tempfile().expect("temp file");
    let err = tempfile::tempfile().expect("temp file");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("dup"))
        .stderr(err.try_clone().expect("dup"))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} did not finish within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                read_all(&out),
                read_all(&err)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output { status, stdout: read_all(&out).into_bytes(), stderr: read_all(&err).into_bytes() }
}

fn read_all(f: &File) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = f.try_clone().expect("dup");
    let mut s = String::new();
    let _ = f.seek(SeekFrom::Start(0));
    let _ = f.read_to_string(&mut s);
    s
}

/// Runs a command and panics (with its output) unless it exits 0.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> Output {
    let out = run_timeout(cmd, timeout);
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// How a test node is set up.
#[derive(Debug, Clone)]
pub struct NodeOpts {
    pub engine: String,
    pub size: String,
    /// Export on a Unix socket instead of TCP.
    pub unix: bool,
    /// Extra top-level config lines.
    pub extra: String,
    /// Extra environment for repd.
    pub env: Vec<(String, String)>,
    /// `disk = …` (data on a block device).
    pub disk: Option<String>,
}

impl NodeOpts {
    pub fn new(engine: &str) -> NodeOpts {
        NodeOpts {
            engine: engine.to_string(),
            size: "64MiB".into(),
            unix: false,
            extra: String::new(),
            env: Vec::new(),
            disk: None,
        }
    }
}

/// One single-node resource `r0`, node `alpha`, in a temp dir.
#[derive(Debug)]
pub struct TestNode {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub opts: NodeOpts,
    pub port: u16,
    pub child: Option<Child>,
    logs: Vec<PathBuf>,
}

impl TestNode {
    pub fn new(engine: &str) -> TestNode {
        TestNode::with(NodeOpts::new(engine))
    }

    pub fn with(opts: NodeOpts) -> TestNode {
        let dir = tempfile::Builder::new().prefix("repblock-test-").tempdir().expect("temp dir");
        let port = free_port();
        let config = dir.path().join("r0.toml");
        let node = TestNode { dir, config, opts, port, child: None, logs: Vec::new() };
        node.write_config();
        node
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn control(&self) -> PathBuf {
        self.path().join("run/alpha.sock")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.path().join("alpha")
    }

    pub fn nbd_socket(&self) -> PathBuf {
        self.path().join("run/alpha.nbd")
    }

    /// The `nbd` config value.
    pub fn nbd_addr(&self) -> String {
        if self.opts.unix {
            format!("unix:{}", self.nbd_socket().display())
        } else {
            format!("127.0.0.1:{}", self.port)
        }
    }

    /// The NBD URI of the export.
    pub fn uri(&self) -> String {
        if self.opts.unix {
            format!("nbd+unix:///r0?socket={}", self.nbd_socket().display())
        } else {
            format!("nbd://127.0.0.1:{}/r0", self.port)
        }
    }

    pub fn write_config(&self) {
        let disk = self.opts.disk.as_ref().map(|d| format!("disk = \"{d}\"\n")).unwrap_or_default();
        let text = format!(
            "name = \"r0\"\nsize = \"{size}\"\nio_engine = \"{engine}\"\ncheckpoint_interval = \"2s\"\n{extra}\n\
             [[node]]\nname = \"alpha\"\nnbd = \"{nbd}\"\ncontrol = \"{control}\"\ndir = \"{dir}\"\n{disk}",
            size = self.opts.size,
            engine = self.opts.engine,
            extra = self.opts.extra,
            nbd = self.nbd_addr(),
            control = self.control().display(),
            dir = self.data_dir().display(),
        );
        std::fs::write(&self.config, text).expect("write config");
    }

    /// `repctl --config … --node alpha ARGS`.
    pub fn repctl(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(REPCTL);
        cmd.arg("--config").arg(&self.config).arg("--node").arg("alpha").args(args);
        run_timeout(&mut cmd, Duration::from_secs(60))
    }

    /// Runs repctl and panics unless it succeeds; returns stdout.
    pub fn repctl_ok(&self, args: &[&str]) -> String {
        let out = self.repctl(args);
        assert!(
            out.status.success(),
            "repctl {args:?} failed ({}): {}{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.logs_text()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn create_md(&self) {
        self.repctl_ok(&["create-md"]);
    }

    /// Spawns repd; does not wait.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "repd already running");
        let log = self.path().join(format!("repd-{}.log", self.logs.len()));
        let file = File::create(&log).expect("create log");
        let mut cmd = Command::new(REPD);
        cmd.arg("--config").arg(&self.config).arg("--node").arg("alpha");
        cmd.env("RUST_LOG", "info");
        // Logs go to a file: keep the timestamps for debugging.
        cmd.env("REPBLOCK_LOG_TIMESTAMPS", "1");
        cmd.env_remove("REPBLOCK_FAULTS");
        cmd.env_remove("REPBLOCK_DISABLE_IO_URING");
        for (k, v) in &self.opts.env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(file);
        self.child = Some(cmd.spawn().expect("spawn repd"));
        self.logs.push(log);
    }

    /// Spawns repd and waits until its control socket answers; `Err` holds
    /// the log if repd exited first.
    pub fn try_start(&mut self) -> Result<(), String> {
        self.spawn();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let exited = self.child.as_mut().and_then(|c| c.try_wait().expect("try_wait"));
            if let Some(status) = exited {
                self.child = None;
                return Err(format!("repd exited with {status}:\n{}", self.log()));
            }
            let answers = ControlClient::connect(&self.control(), "alpha", Duration::from_secs(5))
                .and_then(|mut c| c.request(&Request::Status))
                .is_ok();
            if answers {
                return Ok(());
            }
            assert!(Instant::now() < deadline, "repd did not answer on its control socket within 60s:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(30));
        }
    }

    pub fn start(&mut self) {
        if let Err(log) = self.try_start() {
            panic!("repd failed to start: {log}");
        }
    }

    pub fn promote_force(&self) {
        self.repctl_ok(&["promote", "--force"]);
    }

    pub fn promote(&self) {
        self.repctl_ok(&["promote"]);
    }

    pub fn demote(&self) {
        self.repctl_ok(&["demote"]);
    }

    /// create-md, start, promote --force: a primary ready for clients.
    pub fn ready(engine: &str) -> TestNode {
        TestNode::ready_with(NodeOpts::new(engine))
    }

    pub fn ready_with(opts: NodeOpts) -> TestNode {
        let mut n = TestNode::with(opts);
        n.create_md();
        n.start();
        n.promote_force();
        n
    }

    /// `status --json` through the control socket.
    pub fn status(&self) -> serde_json::Value {
        let mut c = ControlClient::connect(&self.control(), "alpha", Duration::from_secs(10)).expect("control connect");
        c.request(&Request::Status).expect("status")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("repd running").id()
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait (at most 60 s) for the exit status.
    pub fn term(&mut self) -> ExitStatus {
        let child = self.child.take().expect("repd running");
        term_child(child, "repd", || self.log())
    }

    /// Starts repd again (after kill9 or term) and promotes it (no force:
    /// the disk is uptodate once it was forced).
    pub fn restart_primary(&mut self) {
        self.start();
        self.promote();
    }

    /// The log of the latest start.
    pub fn log(&self) -> String {
        self.logs.last().map(|p| std::fs::read_to_string(p).unwrap_or_default()).unwrap_or_default()
    }

    /// Every log of this node, labelled.
    pub fn logs_text(&self) -> String {
        let mut s = String::new();
        for (i, p) in self.logs.iter().enumerate() {
            s.push_str(&format!("----- repd log #{i} ({}) -----\n", p.display()));
            s.push_str(&std::fs::read_to_string(p).unwrap_or_default());
        }
        s
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("{}", self.logs_text());
        }
    }
}

/// A random file of `len` bytes in `dir`.
pub fn random_file(dir: &Path, name: &str, len: usize, seed: u64) -> PathBuf {
    use rand::{RngCore, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut buf = vec![0u8; len];
    rng.fill_bytes(&mut buf);
    let p = dir.join(name);
    std::fs::write(&p, &buf).expect("write random file");
    p
}

/// A bare NBD client that completes the fixed-newstyle handshake
/// (NBD_OPT_EXPORT_NAME with NO_ZEROES) and then just holds the connection:
/// enough to count as an attached client.
pub struct RawNbdClient {
    pub stream: std::net::TcpStream,
    pub size: u64,
}

impl RawNbdClient {
    pub fn connect(port: u16, export: &str) -> std::io::Result<RawNbdClient> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        // Server greeting: NBDMAGIC, IHAVEOPT, handshake flags (u16).
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting)?;
        assert_eq!(&greeting[..8], b"NBDMAGIC", "server greeting");
        assert_eq!(&greeting[8..16], b"IHAVEOPT", "fixed newstyle");
        // Client flags: FIXED_NEWSTYLE | NO_ZEROES.
        s.write_all(&3u32.to_be_bytes())?;
        // NBD_OPT_EXPORT_NAME (1) with the export name.
        let mut opt = Vec::new();
        opt.extend_from_slice(b"IHAVEOPT");
        opt.extend_from_slice(&1u32.to_be_bytes());
        opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
        opt.extend_from_slice(export.as_bytes());
        s.write_all(&opt)?;
        // Export size (u64) and transmission flags (u16); no zero padding.
        let mut reply = [0u8; 10];
        s.read_exact(&mut reply)?;
        let size = u64::from_be_bytes(reply[..8].try_into().expect("8 bytes"));
        Ok(RawNbdClient { stream: s, size })
    }

    /// Whether the server closed the connection (reads EOF or an error
    /// within `wait`).
    pub fn closed_within(&mut self, wait: Duration) -> bool {
        use std::io::Read;
        self.stream.set_read_timeout(Some(wait)).expect("timeout");
        let mut b = [0u8; 1];
        match self.stream.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
        }
    }
}

/// Kills (SIGKILL) and reaps a child process when dropped, so a failing
/// test leaves no daemon behind.
pub struct ChildGuard(pub Option<Child>);

impl ChildGuard {
    pub fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("child")
    }

    /// Takes the child out (the caller waits for it).
    pub fn take(&mut self) -> Child {
        self.0.take().expect("child")
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `repctl --config CONFIG --node NODE events ARGS…` running; its output
/// lines arrive on the channel (which closes when it exits).
pub fn spawn_events(config: &Path, node: &str, args: &[&str]) -> (ChildGuard, std::sync::mpsc::Receiver<String>) {
    use std::io::BufRead;
    let mut guard = ChildGuard(Some(
        Command::new(REPCTL)
            .arg("--config")
            .arg(config)
            .args(["--node", node, "events"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn repctl events"),
    ));
    let out = guard.child().stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (guard, rx)
}

pub mod durable;
pub mod pair;
pub mod resync;
pub mod witness;

/// Sends SIGTERM to a repd we spawned and waits (at most 60 s) for its exit
/// status; past that it is killed and the test fails with `log()`.
pub fn term_child(mut child: Child, what: &str, log: impl Fn() -> String) -> ExitStatus {
    // SAFETY: kill(2) on a pid we spawned and have not reaped yet, so it
    // cannot name another process.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0, "kill(SIGTERM) of {what} failed");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not stop within 60s of SIGTERM:\n{}", log());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
