//! A witness node (`repd --node gamma`, `witness = true`) for the failover
//! tests: its config, its process, its control socket, and the test client
//! of the witness link.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use repblock::config::Config;
use repblock::node::witness::client::WitnessClient;
use serde_json::Value;

use super::{ChildGuard, REPCTL, REPD};

/// lease 3 s: the witness's wait (and startup holdoff) is ≈ 3.08 s, long
/// enough that "refused during the holdoff" is not a race on a busy host.
pub const FAILOVER: &str = "mode = \"witness\"\nlease = \"3s\"\ndetect = \"5s\"\nfence_demote_after = \"3s\"";

pub struct Witness {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    repd: ChildGuard,
    starts: usize,
}

pub fn config_text(dir: &Path, failover: &str, protocol: &str, witness_extra: &str, ports: [u16; 3]) -> String {
    let d = dir.display();
    format!(
        "name = \"r0\"\nsize = \"64MiB\"\nprotocol = \"{protocol}\"\nsecret = \"s3cret\"\n\n[failover]\n{failover}\n\n\
         [[node]]\nname = \"alpha\"\nreplication = \"127.0.0.1:{a}\"\nnbd = \"unix:{d}/alpha.nbd\"\n\
         control = \"{d}/alpha.sock\"\ndir = \"{d}/alpha\"\n\n\
         [[node]]\nname = \"beta\"\nreplication = \"127.0.0.1:{b}\"\nnbd = \"unix:{d}/beta.nbd\"\n\
         control = \"{d}/beta.sock\"\ndir = \"{d}/beta\"\n\n\
         [[node]]\nname = \"gamma\"\nwitness = true\nreplication = \"127.0.0.1:{g}\"\n\
         control = \"{d}/gamma.sock\"\ndir = \"{d}/gamma\"\n{witness_extra}",
        a = ports[0],
        b = ports[1],
        g = ports[2],
    )
}

impl Witness {
    pub fn new() -> Witness {
        let dir = tempfile::tempdir().expect("temp dir");
        let ports = super::free_ports::<3>();
        let config = dir.path().join("r0.toml");
        std::fs::write(&config, config_text(dir.path(), FAILOVER, "C", "", ports)).expect("write config");
        Witness { dir, config, repd: ChildGuard(None), starts: 0 }
    }

    /// The witness of an existing config file (which has a `gamma`
    /// witness node); its logs go to a directory of its own.
    pub fn with_config(config: PathBuf) -> Witness {
        let dir = tempfile::tempdir().expect("temp dir");
        Witness { dir, config, repd: ChildGuard(None), starts: 0 }
    }

    pub fn cfg(&self) -> Config {
        Config::load(&self.config).expect("config")
    }

    pub fn state_file(&self) -> PathBuf {
        self.cfg().witness.expect("a witness node").dir.join("witness.state")
    }

    pub fn repctl(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = Command::new(REPCTL);
        cmd.arg("--config").arg(&self.config).args(["--node", "gamma"]).args(args);
        super::run_timeout(&mut cmd, Duration::from_secs(20))
    }

    pub fn repctl_ok(&self, args: &[&str]) -> String {
        let out = self.repctl(args);
        assert!(
            out.status.success(),
            "repctl {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8(out.stdout).expect("utf-8")
    }

    pub fn log_path(&self, n: usize) -> PathBuf {
        self.dir.path().join(format!("gamma-{n}.log"))
    }

    pub fn log(&self) -> String {
        (1..=self.starts)
            .map(|n| {
                format!("--- gamma start {n} ---\n{}", std::fs::read_to_string(self.log_path(n)).unwrap_or_default())
            })
            .collect()
    }

    /// Starts `repd --node gamma` and waits until its control socket answers.
    pub fn start(&mut self) {
        self.start_env(&[]);
    }

    /// [`Witness::start`] with extra environment variables.
    pub fn start_env(&mut self, env: &[(&str, &str)]) {
        self.starts += 1;
        let log = std::fs::File::create(self.log_path(self.starts)).expect("log file");
        let child = Command::new(REPD)
            .arg("--config")
            .arg(&self.config)
            .args(["--node", "gamma"])
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn repd");
        self.repd = ChildGuard(Some(child));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = self.repd.child().try_wait().expect("try_wait") {
                panic!("repd --node gamma exited with {s}:\n{}", self.log());
            }
            let out = self.repctl(&["status", "--json"]);
            if out.status.success() {
                return;
            }
            assert!(Instant::now() < deadline, "the witness did not answer within 20s:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM; the exit status.
    pub fn term(&mut self) -> std::process::ExitStatus {
        let c = self.repd.take();
        super::term_child(c, "repd --node gamma", String::new)
    }

    pub fn kill9(&mut self) {
        let mut c = self.repd.take();
        c.kill().expect("SIGKILL");
        c.wait().expect("wait");
    }

    pub fn status(&self) -> Value {
        serde_json::from_str(&self.repctl_ok(&["status", "--json"])).expect("status JSON")
    }

    /// Polls status until the startup holdoff is over.
    pub fn wait_holdoff_over(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let s = self.status();
            if s["holdoff_remaining_ms"] == 0 {
                return;
            }
            assert!(Instant::now() < deadline, "holdoff never ended: {s:#}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn client(&self, rt: &tokio::runtime::Runtime, node: &str) -> WitnessClient {
        let cfg = self.cfg();
        rt.block_on(WitnessClient::connect(&cfg, node, None, Duration::from_secs(5)))
            .unwrap_or_else(|e| panic!("{node} cannot reach the witness: {e}\n{}", self.log()))
    }
}
