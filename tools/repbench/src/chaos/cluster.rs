//! The pair under test: two real `repd` processes (`alpha`, `beta`) on
//! loopback with the in-project proxy on the replication link, steered the
//! way an operator or a cluster manager would: signals, `repctl`, the
//! control socket's JSON (status and the event stream), and, for disk
//! faults, the `REPBLOCK_FAULTS` trigger file (src/io/fault/env.rs) that every
//! start arms when the campaign runs disk faults.
//!
//! Topology (both nodes dial, the engine keeps one connection; each dialing
//! direction has its own proxy, and every link fault goes to both):
//!
//! ```text
//!   beta  --dials--> proxy_to_alpha --> alpha.replication_listen
//!   alpha --dials--> proxy_to_beta  --> beta.replication_listen
//! ```

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use repblock_netproxy::{Direction, Mode, Proxy, ProxyHandle};
use serde_json::Value;

use super::model::Clock;
use crate::targets::{Tools, own_group_dies_with_parent};

/// Node names; index 0 and 1 everywhere.
pub const NAMES: [&str; 2] = ["alpha", "beta"];

/// An event from a node's stream, with the campaign clock at its arrival.
#[derive(Debug, Clone)]
pub struct Event {
    pub at: u64,
    pub value: Value,
}

/// One node: its paths and its current repd process.
pub struct Node {
    pub name: &'static str,
    pub control: PathBuf,
    pub data: PathBuf,
    pub nbd: SocketAddr,
    trigger: PathBuf,
    child: Option<Child>,
    /// One log file per start.
    pub logs: Vec<PathBuf>,
    events: Arc<Mutex<Vec<Event>>>,
    stopped: bool,
    /// Power cuts so far: each one is a reboot, and repd learns of it by
    /// its boot id (`REPBLOCK_BOOT_ID`, read by its activity log).
    power_cuts: AtomicU64,
}

impl Node {
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn signal(&self, sig: libc::c_int) -> anyhow::Result<()> {
        let pid = self.pid().with_context(|| format!("{} is not running", self.name))?;
        // SAFETY: kill(2) on a child we spawned and have not reaped, so the
        // pid cannot name another process.
        if unsafe { libc::kill(pid as libc::pid_t, sig) } != 0 {
            bail!("kill({pid}, {sig}) of {}: {}", self.name, std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// A request on a control socket: one JSON line out, one back.
pub fn control_request(path: &Path, req: &Value, timeout: Duration) -> anyhow::Result<Value> {
    let mut s = UnixStream::connect(path).with_context(|| format!("control socket {}", path.display()))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(format!("{req}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    let v: Value = serde_json::from_str(&line).with_context(|| format!("answer {line:?}"))?;
    if v["ok"] == true { Ok(v["result"].clone()) } else { bail!("{}", v["error"].as_str().unwrap_or("refused")) }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(repblock::ports::unused_local_port()?)
}

/// Settings of the pair's config file.
#[derive(Debug, Clone)]
pub struct PairConfig {
    pub protocol: String,
    pub size: u64,
    /// Extra top-level config lines.
    pub extra: String,
}

/// The pair.
pub struct Cluster {
    pub nodes: [Node; 2],
    /// `proxies[i]` carries the connections dialled *to* node i.
    proxies: [ProxyHandle; 2],
    tools: Tools,
    config: PathBuf,
    dir: PathBuf,
    /// Every start arms the fault trigger (`REPBLOCK_FAULTS=trigger=…`).
    pub disk_faults: bool,
    clock: Clock,
    fault_seed: u64,
}

impl Cluster {
    /// Writes the config into `dir`, starts the proxies and runs
    /// `create-md` on both nodes (nothing runs yet).
    pub fn create(
        dir: &Path,
        tools: Tools,
        cfg: &PairConfig,
        rt: &tokio::runtime::Handle,
        clock: Clock,
        disk_faults: bool,
    ) -> anyhow::Result<Cluster> {
        let (listen, nbd) = ([free_port()?, free_port()?], [free_port()?, free_port()?]);
        let any: SocketAddr = ([127, 0, 0, 1], 0).into();
        let proxies = rt.block_on(async {
            let a = Proxy::start(any, ([127, 0, 0, 1], listen[0]).into()).await?;
            let b = Proxy::start(any, ([127, 0, 0, 1], listen[1]).into()).await?;
            Ok::<_, std::io::Error>([a, b])
        })?;
        let config = dir.join("r0.toml");
        let mut text = format!(
            "name = \"r0\"\nsize = {}\nprotocol = \"{}\"\nsecret = \"chaos\"\n{}\n",
            cfg.size, cfg.protocol, cfg.extra
        );
        let nodes = [0, 1].map(|i| {
            let name = NAMES[i];
            text.push_str(&format!(
                "[[node]]\nname = \"{name}\"\nreplication = \"127.0.0.1:{adv}\"\nreplication_listen = \"127.0.0.1:{l}\"\n\
                 nbd = \"127.0.0.1:{n}\"\ncontrol = \"{ctl}\"\ndir = \"{d}\"\n\n",
                adv = proxies[i].local_addr().port(),
                l = listen[i],
                n = nbd[i],
                ctl = dir.join(format!("{name}.sock")).display(),
                d = dir.join(name).display(),
            ));
            Node {
                name,
                control: dir.join(format!("{name}.sock")),
                data: dir.join(name).join("data"),
                nbd: ([127, 0, 0, 1], nbd[i]).into(),
                trigger: dir.join(format!("{name}.fault-trigger")),
                child: None,
                logs: Vec::new(),
                events: Arc::new(Mutex::new(Vec::new())),
                stopped: false,
                power_cuts: AtomicU64::new(0),
            }
        });
        std::fs::write(&config, text).with_context(|| format!("writing {}", config.display()))?;
        let c = Cluster { nodes, proxies, tools, config, dir: dir.to_path_buf(), disk_faults, clock, fault_seed: 0 };
        for i in 0..2 {
            c.repctl_ok(i, &["create-md"])?;
        }
        Ok(c)
    }

    /// `repctl --node NAME ARGS` (bounded by `timeout`): success and the
    /// text it printed (stdout and stderr).
    pub fn repctl(&self, i: usize, args: &[&str], timeout: Duration) -> anyhow::Result<(bool, String)> {
        let out_path = self.dir.join(format!("repctl-{}.out", NAMES[i]));
        let out = File::create(&out_path)?;
        let mut child = Command::new(&self.tools.repctl)
            .arg("--config")
            .arg(&self.config)
            .args(["--node", NAMES[i]])
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("running {}", self.tools.repctl.display()))?;
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("repctl --node {} {} did not finish within {timeout:?}", NAMES[i], args.join(" "));
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        Ok((status.success(), std::fs::read_to_string(&out_path).unwrap_or_default()))
    }

    pub fn repctl_ok(&self, i: usize, args: &[&str]) -> anyhow::Result<String> {
        let (ok, text) = self.repctl(i, args, Duration::from_secs(60))?;
        if !ok {
            bail!("repctl --node {} {} failed: {}", NAMES[i], args.join(" "), text.trim());
        }
        Ok(text)
    }

    /// Starts node `i` and waits (at most 60 s) until its control socket
    /// answers; then follows its event stream.
    pub fn start(&mut self, i: usize) -> anyhow::Result<()> {
        self.fault_seed += 1;
        let node = &mut self.nodes[i];
        anyhow::ensure!(node.child.is_none(), "{} already runs", node.name);
        let log = self.dir.join(format!("repd-{}-{}.log", node.name, node.logs.len()));
        let file = File::create(&log)?;
        let mut cmd = Command::new(&self.tools.repd);
        cmd.arg("--config").arg(&self.config).args(["--node", node.name]);
        cmd.env("RUST_LOG", "info").env("REPBLOCK_LOG_TIMESTAMPS", "1").env_remove("REPBLOCK_TEST_HOLD");
        let _ = std::fs::remove_file(&node.trigger);
        if self.disk_faults {
            cmd.env("REPBLOCK_FAULTS", format!("seed={},trigger={}", self.fault_seed, node.trigger.display()));
            // A simulated machine of its own per node, rebooted by each power cut.
            let boot = ((i as u128 + 1) << 64) | u128::from(node.power_cuts.load(Ordering::Relaxed) + 1);
            cmd.env("REPBLOCK_BOOT_ID", format!("{boot:032x}"));
        } else {
            cmd.env_remove("REPBLOCK_FAULTS");
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(file);
        own_group_dies_with_parent(&mut cmd);
        node.child = Some(cmd.spawn().with_context(|| format!("starting {}", self.tools.repd.display()))?);
        node.logs.push(log);
        node.stopped = false;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = node.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                node.child = None;
                bail!("repd {} exited at start ({st}):\n{}", node.name, tail(node.logs.last()));
            }
            if control_request(&node.control, &serde_json::json!({"cmd":"status"}), Duration::from_secs(5)).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                bail!("repd {} did not answer within 60s:\n{}", node.name, tail(node.logs.last()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        follow_events(&node.control, Arc::clone(&node.events), self.clock)?;
        Ok(())
    }

    /// SIGKILL and reap (a no-op if not running).
    pub fn kill(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        if let Some(mut c) = node.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        node.stopped = false;
    }

    pub fn sigstop(&mut self, i: usize) -> anyhow::Result<()> {
        self.nodes[i].signal(libc::SIGSTOP)?;
        self.nodes[i].stopped = true;
        Ok(())
    }

    pub fn sigcont(&mut self, i: usize) -> anyhow::Result<()> {
        self.nodes[i].signal(libc::SIGCONT)?;
        self.nodes[i].stopped = false;
        Ok(())
    }

    /// SIGTERM, and SIGKILL if it has not exited within `timeout`; the exit
    /// status, `None` if it had to be killed.
    pub fn term(&mut self, i: usize, timeout: Duration) -> anyhow::Result<Option<ExitStatus>> {
        self.nodes[i].signal(libc::SIGTERM)?;
        match self.wait_exit(i, timeout)? {
            Some(st) => Ok(Some(st)),
            None => {
                self.kill(i);
                Ok(None)
            }
        }
    }

    /// Waits for node `i` to exit by itself (e.g. after a power cut).
    pub fn wait_exit(&mut self, i: usize, timeout: Duration) -> anyhow::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        let node = &mut self.nodes[i];
        loop {
            let Some(c) = node.child.as_mut() else { return Ok(None) };
            if let Some(st) = c.try_wait()? {
                node.child = None;
                return Ok(Some(st));
            }
            if Instant::now() > deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The exit status of a node that was running and exited by itself.
    pub fn exited(&mut self, i: usize) -> Option<ExitStatus> {
        let node = &mut self.nodes[i];
        let st = node.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
        if st.is_some() {
            node.child = None;
        }
        st
    }

    /// `status` of node `i`.
    pub fn status(&self, i: usize) -> anyhow::Result<Value> {
        control_request(&self.nodes[i].control, &serde_json::json!({"cmd":"status"}), Duration::from_secs(10))
            .with_context(|| format!("status of {}", NAMES[i]))
    }

    /// Hands a command to node `i`'s fault trigger (see src/io/fault/env.rs).
    pub fn trigger(&self, i: usize, cmd: &str) -> anyhow::Result<()> {
        anyhow::ensure!(self.disk_faults, "disk faults are off");
        let path = &self.nodes[i].trigger;
        if cmd.trim() == "power-cut" {
            self.nodes[i].power_cuts.fetch_add(1, Ordering::Relaxed);
        }
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, cmd)?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }

    pub fn link_mode(&self, m: Mode) {
        self.proxies.iter().for_each(|p| p.set_mode(m));
    }

    pub fn link_cut(&self) {
        self.proxies.iter().for_each(|p| p.cut());
    }

    pub fn link_delay(&self, one_way: Duration) {
        self.proxies.iter().for_each(|p| p.set_delay_both(one_way));
    }

    pub fn link_rate(&self, bytes_per_sec: Option<u64>) {
        for p in &self.proxies {
            for d in Direction::BOTH {
                p.set_rate(d, bytes_per_sec);
            }
        }
    }

    /// The link back to normal: pass, no delay, no cap.
    pub fn link_heal(&self) {
        self.link_mode(Mode::Pass);
        self.link_delay(Duration::ZERO);
        self.link_rate(None);
    }

    /// Events of node `i` that arrived at or after `since`.
    pub fn events_since(&self, i: usize, since: u64) -> Vec<Event> {
        self.nodes[i].events.lock().expect("events").iter().filter(|e| e.at >= since).cloned().collect()
    }

    /// Node `i`'s whole data file.
    pub fn read_data(&self, i: usize) -> anyhow::Result<Vec<u8>> {
        std::fs::read(&self.nodes[i].data).with_context(|| format!("reading {}", self.nodes[i].data.display()))
    }

    /// Every log line of node `i` (all starts) that reports a panic.
    pub fn panics(&self, i: usize) -> Vec<String> {
        self.nodes[i]
            .logs
            .iter()
            .flat_map(|p| std::fs::read_to_string(p).unwrap_or_default().lines().map(String::from).collect::<Vec<_>>())
            .filter(|l| l.contains("panicked at") || l.contains("RUST_BACKTRACE"))
            .collect()
    }

    /// The last lines of node `i`'s current log.
    pub fn log_tail(&self, i: usize) -> String {
        tail(self.nodes[i].logs.last())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..2 {
            if self.nodes[i].stopped {
                let _ = self.sigcont(i);
            }
            self.kill(i);
        }
    }
}

fn tail(log: Option<&PathBuf>) -> String {
    let text = log.map(|p| std::fs::read_to_string(p).unwrap_or_default()).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Follows a node's event stream on a thread until the node goes away.
fn follow_events(control: &Path, sink: Arc<Mutex<Vec<Event>>>, clock: Clock) -> anyhow::Result<()> {
    let mut s = UnixStream::connect(control)?;
    s.write_all(b"{\"cmd\":\"events\"}\n")?;
    std::thread::Builder::new().name("chaos-events".into()).spawn(move || {
        for line in BufReader::new(s).lines().map_while(Result::ok) {
            if let Ok(value) = serde_json::from_str::<Value>(&line) {
                sink.lock().expect("events").push(Event { at: clock.now(), value });
            }
        }
    })?;
    Ok(())
}
