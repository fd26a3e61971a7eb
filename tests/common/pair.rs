//! Two-node harness for the replication tests: a resource `r0` with nodes
//! `alpha` and `beta`, two real `repd` processes on loopback, optionally the
//! in-project TCP proxy (`repblock-netproxy`) on the replication link.
//!
//! Topology with the proxy (both nodes dial, the engine keeps one
//! connection, so each dialing direction goes through its own proxy):
//!
//! ```text
//!   beta  --dials--> proxy_to_alpha (alpha.replication) --> alpha.replication_listen
//!   alpha --dials--> proxy_to_beta  (beta.replication)  --> beta.replication_listen
//! ```
//!
//! [`Proxies`] applies every setting (delay, rate, mode, cut) to both
//! proxies, so whichever connection wins, it is the one the test steers.
//!
//! - [`Pair::new`] writes one shared config file (`r0.toml`), as a user
//!   would; [`Pair::override_config`] gives one node its own file with other
//!   top-level values (wrong secret, resource, size) for refusal tests.
//! - [`Pair::up`]: create-md on both, start both, `promote --force` alpha,
//!   `wait-sync` on beta.
//! - [`Peer`] is one node: `repctl`, `status` (control socket), start, kill,
//!   logs, NBD client. A panicking test prints both nodes' logs.
//! - The pair owns a tokio runtime (proxies, NBD clients).

#![allow(dead_code)]

use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use repblock::control::{ControlClient, Request};
use repblock::nbd::{ListenAddr, NbdClient};
use repblock_netproxy::{Mode, Proxy, ProxyHandle};
use serde_json::Value;

use super::{REPCTL, REPD, free_ports, run_timeout};

pub const MIB: u64 = 1 << 20;

/// How a pair is set up.
#[derive(Debug, Clone)]
pub struct PairOpts {
    /// `A`, `B` or `C`.
    pub protocol: String,
    pub size: String,
    /// Put the in-project proxy on the replication link.
    pub proxy: bool,
    /// Extra top-level config lines (e.g. `ping_interval = "1s"`).
    pub extra: String,
    /// Give each node a `metrics` address (Prometheus endpoint).
    pub metrics: bool,
}

impl PairOpts {
    pub fn new(protocol: &str) -> PairOpts {
        PairOpts { protocol: protocol.into(), size: "64MiB".into(), proxy: false, extra: String::new(), metrics: false }
    }

    /// Each node serves `GET /metrics` on a free port (`Peer::metrics_port`).
    pub fn metrics(mut self) -> PairOpts {
        self.metrics = true;
        self
    }

    pub fn proxied(mut self) -> PairOpts {
        self.proxy = true;
        self
    }

    pub fn size(mut self, size: &str) -> PairOpts {
        self.size = size.into();
        self
    }

    pub fn extra(mut self, line: &str) -> PairOpts {
        self.extra.push_str(line);
        self.extra.push('\n');
        self
    }
}

/// Top-level values a node's config may differ in (refusal tests).
#[derive(Debug, Clone)]
pub struct Top {
    pub resource: String,
    pub size: String,
    pub secret: String,
}

/// One node of the pair.
#[derive(Debug)]
pub struct Peer {
    pub name: &'static str,
    /// The config file this node runs with.
    pub config: PathBuf,
    root: PathBuf,
    pub nbd_port: u16,
    /// Port the node binds for replication.
    pub repl_listen_port: u16,
    /// Port the other node dials (the proxy's when proxied).
    pub repl_advertised_port: u16,
    /// `metrics` port (with `PairOpts::metrics`).
    pub metrics_port: Option<u16>,
    child: Option<Child>,
    logs: Vec<PathBuf>,
}

impl Peer {
    pub fn control(&self) -> PathBuf {
        self.root.join(format!("run/{}.sock", self.name))
    }

    pub fn data_dir(&self) -> PathBuf {
        self.root.join(self.name)
    }

    pub fn nbd_addr(&self) -> ListenAddr {
        ListenAddr::Tcp(([127, 0, 0, 1], self.nbd_port).into())
    }

    pub fn uri(&self) -> String {
        format!("nbd://127.0.0.1:{}/r0", self.nbd_port)
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// `repctl --config … --node NAME ARGS`.
    pub fn repctl(&self, args: &[&str]) -> Output {
        self.repctl_timeout(args, Duration::from_secs(90))
    }

    pub fn repctl_timeout(&self, args: &[&str], timeout: Duration) -> Output {
        let mut cmd = Command::new(REPCTL);
        cmd.arg("--config").arg(&self.config).arg("--node").arg(self.name).args(args);
        run_timeout(&mut cmd, timeout)
    }

    /// Runs repctl, panics unless it succeeds; returns stdout.
    pub fn repctl_ok(&self, args: &[&str]) -> String {
        let out = self.repctl(args);
        assert!(
            out.status.success(),
            "repctl --node {} {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs repctl, panics if it succeeds; returns stdout + stderr (the
    /// refusal message).
    pub fn repctl_refused(&self, args: &[&str]) -> String {
        let out = self.repctl(args);
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(!out.status.success(), "repctl --node {} {args:?} must be refused, it succeeded:\n{text}", self.name);
        text
    }

    pub fn create_md(&self) {
        self.repctl_ok(&["create-md"]);
    }

    /// Spawns repd (stderr to a fresh log file) and waits until its control
    /// socket answers; panics with the log if it exits first.
    pub fn start(&mut self) {
        self.start_env(&[]);
    }

    /// [`Peer::start`] with extra environment variables (test hooks).
    pub fn start_env(&mut self, env: &[(&str, &str)]) {
        assert!(self.child.is_none(), "repd {} already running", self.name);
        let log = self.root.join(format!("repd-{}-{}.log", self.name, self.logs.len()));
        let file = File::create(&log).expect("create log");
        let mut cmd = Command::new(REPD);
        cmd.arg("--config").arg(&self.config).arg("--node").arg(self.name);
        cmd.env("RUST_LOG", "info");
        cmd.env("REPBLOCK_LOG_TIMESTAMPS", "1");
        cmd.env_remove("REPBLOCK_FAULTS");
        cmd.env_remove("REPBLOCK_TEST_HOLD");
        cmd.envs(env.iter().copied());
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(file);
        self.child = Some(cmd.spawn().expect("spawn repd"));
        self.logs.push(log);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().expect("try_wait")) {
                self.child = None;
                panic!("repd {} exited with {status} at start:\n{}", self.name, self.log());
            }
            let answers = ControlClient::connect(&self.control(), self.name, Duration::from_secs(5))
                .and_then(|mut c| c.request(&Request::Status))
                .is_ok();
            if answers {
                return;
            }
            assert!(Instant::now() < deadline, "repd {} did not answer within 60s:\n{}", self.name, self.log());
            std::thread::sleep(Duration::from_millis(30));
        }
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether repd is still running (it may have exited on its own).
    pub fn alive(&mut self) -> bool {
        match self.child.as_mut() {
            None => false,
            Some(c) => c.try_wait().expect("try_wait").is_none(),
        }
    }

    /// `status --json` through the control socket.
    pub fn status(&self) -> Value {
        let mut c = ControlClient::connect(&self.control(), self.name, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("control socket of {}: {e}\n{}", self.name, self.log()));
        c.request(&Request::Status).unwrap_or_else(|e| panic!("status of {}: {e}", self.name))
    }

    /// Polls `status` until `pred` holds; panics after `timeout` with what
    /// was waited for and the last status.
    pub fn wait_status(&self, what: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.status();
            if pred(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "{}: {what} not reached within {timeout:?}; last status:\n{s:#}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// `repctl wait-sync --timeout SECS`, must succeed.
    pub fn wait_sync(&self, secs: u32) -> Output {
        let out = self
            .repctl_timeout(&["wait-sync", "--timeout", &secs.to_string()], Duration::from_secs(u64::from(secs) + 30));
        assert!(
            out.status.success(),
            "repctl --node {} wait-sync --timeout {secs} failed ({}):\nstdout: {}\nstderr: {}\nstatus: {:#}",
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.status()
        );
        out
    }

    /// The log of the latest start.
    pub fn log(&self) -> String {
        self.logs.last().map(|p| std::fs::read_to_string(p).unwrap_or_default()).unwrap_or_default()
    }

    /// Every log of this node, labelled.
    pub fn logs_text(&self) -> String {
        let mut s = String::new();
        for (i, p) in self.logs.iter().enumerate() {
            s.push_str(&format!("----- {} repd log #{i} ({}) -----\n", self.name, p.display()));
            s.push_str(&std::fs::read_to_string(p).unwrap_or_default());
        }
        s
    }

    /// Every log line of every start, lowercased.
    pub fn log_lines_lower(&self) -> Vec<String> {
        self.logs_text().lines().map(|l| l.to_lowercase()).collect()
    }

    /// Connects an NBD client (the export is the resource name).
    pub async fn nbd(&self) -> NbdClient {
        NbdClient::connect(&self.nbd_addr(), "r0")
            .await
            .unwrap_or_else(|e| panic!("NBD connect to {} ({}): {e}", self.name, self.uri()))
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The two proxies of a proxied pair; every setting goes to both.
#[derive(Debug, Clone)]
pub struct Proxies {
    /// Beta dials this one to reach alpha.
    pub to_alpha: ProxyHandle,
    /// Alpha dials this one to reach beta.
    pub to_beta: ProxyHandle,
}

impl Proxies {
    pub fn both(&self) -> [&ProxyHandle; 2] {
        [&self.to_alpha, &self.to_beta]
    }

    pub fn set_delay_both(&self, d: Duration) {
        self.both().iter().for_each(|p| p.set_delay_both(d));
    }

    pub fn set_rate(&self, bytes_per_sec: Option<u64>) {
        for p in self.both() {
            for dir in repblock_netproxy::Direction::BOTH {
                p.set_rate(dir, bytes_per_sec);
            }
        }
    }

    pub fn set_mode(&self, m: Mode) {
        self.both().iter().for_each(|p| p.set_mode(m));
    }

    pub fn cut(&self) {
        self.both().iter().for_each(|p| p.cut());
    }

    /// Proxied connections open now, over both proxies.
    pub fn connections(&self) -> usize {
        self.both().iter().map(|p| p.connections()).sum()
    }

    /// Connections accepted since start, over both proxies.
    pub fn accepted(&self) -> u64 {
        self.both().iter().map(|p| p.accepted()).sum()
    }

    /// Bytes forwarded in both directions over both proxies.
    pub fn bytes_total(&self) -> u64 {
        self.both().iter().map(|p| repblock_netproxy::Direction::BOTH.iter().map(|d| p.bytes(*d)).sum::<u64>()).sum()
    }
}

/// A two-node resource. Field order is drop order: the nodes die first.
pub struct Pair {
    pub alpha: Peer,
    pub beta: Peer,
    pub proxies: Option<Proxies>,
    pub opts: PairOpts,
    pub size: u64,
    pub rt: tokio::runtime::Runtime,
    pub dir: tempfile::TempDir,
}

impl Pair {
    pub fn new(opts: PairOpts) -> Pair {
        let dir = tempfile::Builder::new().prefix("repblock-pair-").tempdir().expect("temp dir");
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        let size = repblock::units::parse_size(&opts.size).unwrap_or_else(|e| panic!("size {:?}: {e}", opts.size));
        // Distinct at once: one port chosen twice made a node refuse the
        // config (two nodes with one nbd address) now and then.
        let [listen_a, listen_b, nbd_a, nbd_b] = free_ports::<4>();
        let proxies = opts.proxy.then(|| {
            rt.block_on(async {
                let any: std::net::SocketAddr = "127.0.0.1:0".parse().expect("addr");
                let to_alpha =
                    Proxy::start(any, ([127, 0, 0, 1], listen_a).into()).await.expect("start proxy to alpha");
                let to_beta = Proxy::start(any, ([127, 0, 0, 1], listen_b).into()).await.expect("start proxy to beta");
                Proxies { to_alpha, to_beta }
            })
        });
        let (adv_a, adv_b) = match &proxies {
            Some(p) => (p.to_alpha.local_addr().port(), p.to_beta.local_addr().port()),
            None => (listen_a, listen_b),
        };
        let config = dir.path().join("r0.toml");
        let [metrics_a, metrics_b] = if opts.metrics { free_ports::<2>().map(Some) } else { [None, None] };
        let peer = |name: &'static str, listen: u16, adv: u16, nbd_port: u16, metrics_port: Option<u16>| Peer {
            name,
            config: config.clone(),
            root: dir.path().to_path_buf(),
            nbd_port,
            repl_listen_port: listen,
            repl_advertised_port: adv,
            metrics_port,
            child: None,
            logs: Vec::new(),
        };
        let alpha = peer("alpha", listen_a, adv_a, nbd_a, metrics_a);
        let beta = peer("beta", listen_b, adv_b, nbd_b, metrics_b);
        let pair = Pair { alpha, beta, proxies, size, opts, rt, dir };
        let top = pair.default_top();
        std::fs::write(&config, pair.config_text(&top)).expect("write config");
        pair
    }

    pub fn default_top(&self) -> Top {
        Top { resource: "r0".into(), size: self.opts.size.clone(), secret: "s3cret-r0".into() }
    }

    /// The shared config, with `top` for the top-level values.
    pub fn config_text(&self, top: &Top) -> String {
        let mut s = format!(
            "name = \"{}\"\nsize = \"{}\"\nprotocol = \"{}\"\nsecret = \"{}\"\ncheckpoint_interval = \"2s\"\n{}\n",
            top.resource, top.size, self.opts.protocol, top.secret, self.opts.extra
        );
        for p in [&self.alpha, &self.beta] {
            s.push_str(&format!(
                "[[node]]\nname = \"{name}\"\nreplication = \"127.0.0.1:{adv}\"\n{listen}nbd = \"127.0.0.1:{nbd}\"\n\
                 control = \"{control}\"\ndir = \"{dir}\"\n{metrics}\n",
                name = p.name,
                adv = p.repl_advertised_port,
                listen = if p.repl_listen_port != p.repl_advertised_port {
                    format!("replication_listen = \"127.0.0.1:{}\"\n", p.repl_listen_port)
                } else {
                    String::new()
                },
                nbd = p.nbd_port,
                control = p.control().display(),
                dir = p.data_dir().display(),
                metrics = p.metrics_port.map(|m| format!("metrics = \"127.0.0.1:{m}\"\n")).unwrap_or_default(),
            ));
        }
        s
    }

    /// Gives `node` its own config file with other top-level values (the
    /// other node keeps the shared one). Call before `create_md`.
    pub fn override_config(&mut self, node: &str, top: Top) {
        let path = self.dir.path().join(format!("{node}.toml"));
        std::fs::write(&path, self.config_text(&top)).expect("write config");
        self.peer_mut(node).config = path;
    }

    pub fn peer_mut(&mut self, node: &str) -> &mut Peer {
        match node {
            "alpha" => &mut self.alpha,
            "beta" => &mut self.beta,
            other => panic!("no node {other}"),
        }
    }

    pub fn proxies(&self) -> &Proxies {
        self.proxies.as_ref().expect("this pair has no proxy (PairOpts::proxied)")
    }

    /// create-md and start on both nodes.
    pub fn start_both(&mut self) {
        self.alpha.create_md();
        self.beta.create_md();
        self.alpha.start();
        self.beta.start();
    }

    /// A replicating pair: both started and connected, alpha `promote
    /// --force`, the initial full sync done (`wait-sync` on beta).
    ///
    /// The promote waits for the link first: a promote that races with the
    /// handshake is tested on its own (replication_setup.rs), so that every
    /// other test checks its own property.
    pub fn up(opts: PairOpts) -> Pair {
        let mut pair = Pair::new(opts);
        pair.bring_up();
        pair
    }

    /// What [`Pair::up`] does after `new`: for a pair whose config a test
    /// changed first.
    pub fn bring_up(&mut self) {
        self.start_both();
        for p in [&self.alpha, &self.beta] {
            p.wait_status("connected", Duration::from_secs(20), |s| s["connection"] == "connected");
        }
        self.alpha.repctl_ok(&["promote", "--force"]);
        self.beta.wait_sync(90);
        self.assert_established();
    }

    /// Both sides connected, established, uptodate, roles primary/secondary.
    pub fn assert_established(&self) {
        for (me, peer, role, peer_role) in
            [(&self.alpha, &self.beta, "primary", "secondary"), (&self.beta, &self.alpha, "secondary", "primary")]
        {
            let s = me.wait_status("connected + established + both uptodate", Duration::from_secs(20), |s| {
                s["connection"] == "connected"
                    && s["replication"] == "established"
                    && s["disk"] == "uptodate"
                    && s["peer"]["disk"] == "uptodate"
            });
            assert_eq!(s["role"], role, "{}: role\n{s:#}", me.name);
            assert_eq!(s["peer"]["name"], peer.name, "{}: peer name\n{s:#}", me.name);
            assert_eq!(s["peer"]["role"], peer_role, "{}: peer role\n{s:#}", me.name);
        }
    }

    /// `repctl verify --wait --json` on `node`: the report of the verify.
    ///
    /// Right after a connect the engine may replace the session by the peer's
    /// duplicate connection, which aborts a running verify (exit 1, "replaced"):
    /// then it is run again, up to 3 times.
    pub fn verify_wait(&self, node: &str) -> Value {
        let peer = if node == "alpha" { &self.alpha } else { &self.beta };
        for _ in 0..3 {
            let out = peer.repctl(&["verify", "--wait", "--json"]);
            let stdout = String::from_utf8_lossy(&out.stdout);
            let stderr = String::from_utf8_lossy(&out.stderr);
            if !out.status.success() && stderr.contains("replaced") {
                self.assert_established();
                continue;
            }
            assert!(out.status.success(), "verify --wait on {node} failed:\n{stdout}\n{stderr}");
            return serde_json::from_str(stdout.trim())
                .unwrap_or_else(|e| panic!("verify --json printed {stdout:?}: {e}"));
        }
        panic!("verify on {node} was aborted by connection replacements 3 times");
    }

    /// Every log of both nodes.
    pub fn logs_text(&self) -> String {
        format!("{}{}", self.alpha.logs_text(), self.beta.logs_text())
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        self.alpha.kill9();
        self.beta.kill9();
        if std::thread::panicking() {
            eprintln!("{}", self.logs_text());
        }
    }
}

/// CRC32C of every `chunk` bytes of the volume, read over NBD (8 reads in
/// flight).
pub async fn checksums(client: &NbdClient, size: u64, chunk: u32) -> Vec<u32> {
    use futures_lite_free::ordered;
    let offsets: Vec<u64> = (0..size).step_by(chunk as usize).collect();
    ordered(offsets, 8, |off| {
        let c = client.clone();
        let len = chunk.min((size - off) as u32);
        async move {
            let data = c.read(off, len).await.unwrap_or_else(|e| panic!("read {len} bytes at {off}: {e}"));
            crc32c::crc32c(&data)
        }
    })
    .await
}

/// Panics naming the first differing chunk and how many differ.
pub fn assert_same_checksums(what: &str, a: &[u32], b: &[u32], chunk: u32) {
    assert_eq!(a.len(), b.len(), "{what}: chunk counts differ");
    let diff: Vec<usize> = a.iter().zip(b).enumerate().filter(|(_, (x, y))| x != y).map(|(i, _)| i).collect();
    assert!(
        diff.is_empty(),
        "{what}: {} of {} chunks of {chunk} bytes differ, first at byte offset {}",
        diff.len(),
        a.len(),
        diff[0] as u64 * u64::from(chunk)
    );
}

/// A tiny ordered, bounded-concurrency map (no extra dependency).
mod futures_lite_free {
    use std::future::Future;

    pub async fn ordered<T, F, Fut, R>(items: Vec<T>, depth: usize, f: F) -> Vec<R>
    where
        F: Fn(T) -> Fut,
        Fut: Future<Output = R> + Send + 'static,
        R: Send + 'static,
    {
        let mut out = Vec::with_capacity(items.len());
        let mut window = std::collections::VecDeque::new();
        for item in items {
            window.push_back(tokio::spawn(f(item)));
            if window.len() >= depth {
                let h = window.pop_front().expect("non-empty");
                out.push(h.await.expect("task"));
            }
        }
        while let Some(h) = window.pop_front() {
            out.push(h.await.expect("task"));
        }
        out
    }
}

/// Milliseconds since `t`.
pub fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

/// The median of `v` (sorts it).
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v[v.len() / 2]
}

// ---- Additions for the resync tests (issue 4: replication_resync.rs,
// replication_splitbrain.rs). Kept in their own impl blocks.

impl Peer {
    /// SIGTERM and wait (at most 60 s) for the exit status: a clean stop
    /// (the volume is checkpointed and closed).
    pub fn term(&mut self) -> std::process::ExitStatus {
        let child = self.child.take().unwrap_or_else(|| panic!("repd {} is not running", self.name));
        super::term_child(child, &format!("repd {}", self.name), || self.log())
    }

    /// Waits until this node sees its peer as not connected.
    pub fn wait_disconnected(&self, timeout: Duration) -> Value {
        self.wait_status("peer not connected", timeout, |s| s["connection"] != "connected")
    }
}

impl Pair {
    /// A replicating pair without the initial full sync: both blank nodes
    /// connect, `new-current-uuid --clear-bitmap` makes both `uptodate` in
    /// one new generation, alpha is promoted. For large volumes whose
    /// initial content does not matter (all zeroes on both).
    pub fn up_blank(opts: PairOpts) -> Pair {
        let mut pair = Pair::new(opts);
        pair.start_both();
        for p in [&pair.alpha, &pair.beta] {
            p.wait_status("connected", Duration::from_secs(20), |s| s["connection"] == "connected");
        }
        pair.alpha.repctl_ok(&["new-current-uuid", "--clear-bitmap"]);
        for p in [&pair.alpha, &pair.beta] {
            p.wait_status("uptodate after new-current-uuid", Duration::from_secs(20), |s| s["disk"] == "uptodate");
        }
        pair.alpha.repctl_ok(&["promote"]);
        pair.assert_established();
        pair
    }

    /// Partitions the pair: the proxies close every connection and refuse
    /// new ones; returns once both nodes see the peer gone.
    pub fn partition(&self) {
        self.proxies().set_mode(Mode::Refuse);
        for p in [&self.alpha, &self.beta] {
            p.wait_disconnected(Duration::from_secs(20));
        }
    }

    /// Ends a partition: the proxies pass traffic again.
    pub fn heal(&self) {
        self.proxies().set_mode(Mode::Pass);
    }
}

impl Pair {
    /// Both sides connected, established, uptodate, with `primary` (alpha
    /// or beta) the primary and the other secondary.
    pub fn assert_established_with_primary(&self, primary: &str) {
        for me in [&self.alpha, &self.beta] {
            let s = me.wait_status("connected + established + both uptodate", Duration::from_secs(20), |s| {
                s["connection"] == "connected"
                    && s["replication"] == "established"
                    && s["disk"] == "uptodate"
                    && s["peer"]["disk"] == "uptodate"
            });
            let (role, peer_role) =
                if me.name == primary { ("primary", "secondary") } else { ("secondary", "primary") };
            assert_eq!(s["role"], role, "{}: role\n{s:#}", me.name);
            assert_eq!(s["peer"]["role"], peer_role, "{}: peer role\n{s:#}", me.name);
        }
    }
}
