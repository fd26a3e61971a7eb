//! The `netproxy` binary: command line, control socket commands, the `ctl`
//! client, and a clean stop on SIGTERM.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader as AsyncBufReader};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::time::{Instant, timeout};

const BIN: &str = env!("CARGO_BIN_EXE_netproxy");
const SOON: Duration = Duration::from_secs(5);

/// A running `netproxy`, killed if the test fails before stopping it.
struct NetProxy {
    child: Child,
    addr: SocketAddr,
    control: PathBuf,
    _dir: tempfile::TempDir,
}

impl NetProxy {
    /// Starts the binary on a free port in front of `upstream`, with a
    /// control socket and `extra` arguments; waits for its `listening` line.
    fn spawn(upstream: SocketAddr, extra: &[&str]) -> NetProxy {
        let dir = tempfile::tempdir().expect("tempdir");
        let control = dir.path().join("ctl.sock");
        let mut child = Command::new(BIN)
            .args(["--listen", "127.0.0.1:0", "--upstream", &upstream.to_string(), "--control"])
            .arg(&control)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn netproxy");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).expect("read the listening line");
        let addr = line
            .trim()
            .strip_prefix("listening ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .expect("listening address");
        NetProxy { child, addr, control, _dir: dir }
    }

    /// Sends `command` over a fresh control connection; returns the reply.
    async fn control(&self, command: &str) -> String {
        let mut conn = Control::connect(&self.control).await;
        conn.send(command).await
    }
}

impl Drop for NetProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One control connection (it may carry many commands).
struct Control {
    rd: AsyncBufReader<tokio::net::unix::OwnedReadHalf>,
    wr: tokio::net::unix::OwnedWriteHalf,
}

impl Control {
    async fn connect(path: &Path) -> Control {
        let (rd, wr) = UnixStream::connect(path).await.expect("connect control socket").into_split();
        Control { rd: AsyncBufReader::new(rd), wr }
    }

    /// Polls `stats` until `ready` holds: the proxy counts a write right
    /// after it returns, so the peer may read the bytes a moment before the
    /// counter moves.
    async fn stats_when(&mut self, what: &str, ready: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let deadline = Instant::now() + SOON;
        loop {
            let stats = stats_of(&self.send("stats").await);
            if ready(&stats) {
                return stats;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}: last stats {stats}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    async fn send(&mut self, command: &str) -> String {
        self.wr.write_all(format!("{command}\n").as_bytes()).await.expect("send command");
        let mut reply = String::new();
        timeout(SOON, self.rd.read_line(&mut reply)).await.expect("reply timed out").expect("read reply");
        reply.trim_end().to_string()
    }
}

async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let (mut r, mut w) = s.split();
                if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                    let _ = w.shutdown().await;
                }
            });
        }
    });
    addr
}

async fn round_trip(s: &mut TcpStream, msg: &[u8]) -> Duration {
    let t = Instant::now();
    s.write_all(msg).await.expect("write");
    let mut buf = vec![0; msg.len()];
    timeout(SOON, s.read_exact(&mut buf)).await.expect("echo timed out").expect("read");
    assert_eq!(buf, msg);
    t.elapsed()
}

fn stats_of(reply: &str) -> serde_json::Value {
    serde_json::from_str(reply).unwrap_or_else(|e| panic!("stats reply {reply:?} is not JSON: {e}"))
}

async fn ctl(socket: &Path, command: &[&str]) -> Output {
    let out = tokio::process::Command::new(BIN).arg("ctl").arg(socket).args(command).output();
    timeout(SOON, out).await.expect("netproxy ctl hung").expect("run netproxy ctl")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_commands_steer_a_running_proxy() {
    let proxy = NetProxy::spawn(echo_server().await, &["--delay", "5ms"]);
    let mut client = TcpStream::connect(proxy.addr).await.expect("connect");
    client.set_nodelay(true).expect("nodelay");

    let rtt = round_trip(&mut client, b"hello").await;
    assert!(rtt >= Duration::from_millis(10), "--delay 5ms gave a round trip of {rtt:?}");

    let mut ctl = Control::connect(&proxy.control).await;
    let stats = ctl.stats_when("5 bytes each way", |s| s["bytes_up"] == 5 && s["bytes_down"] == 5).await;
    assert_eq!(stats["connections"], 1);
    assert_eq!(stats["accepted"], 1);
    assert_eq!(stats["mode"], "pass");
    assert_eq!(stats["delay_up_us"], 5000);
    assert_eq!(stats["delay_down_us"], 5000);
    assert_eq!(stats["rate_up"], serde_json::Value::Null);

    // Several commands on one connection, answered in order.
    assert_eq!(ctl.send("delay up 20ms").await, "ok");
    assert_eq!(ctl.send("delay down 0").await, "ok");
    assert_eq!(ctl.send("rate 10MiB").await, "ok");
    assert_eq!(ctl.send("rate down off").await, "ok");
    // Empty lines get no reply: the next reply is the stats.
    ctl.wr.write_all(b"\n  \n").await.expect("send empty lines");
    let stats = stats_of(&ctl.send("stats").await);
    assert_eq!(stats["delay_up_us"], 20_000);
    assert_eq!(stats["delay_down_us"], 0);
    assert_eq!(stats["rate_up"], 10 << 20);
    assert_eq!(stats["rate_down"], serde_json::Value::Null);
    let rtt = round_trip(&mut client, b"again").await;
    assert!(rtt >= Duration::from_millis(20), "delay up 20ms gave a round trip of {rtt:?}");

    // Errors are replies, not disconnections.
    assert!(ctl.send("mode sideways").await.starts_with("error: Unknown mode"));
    assert!(ctl.send("delay 5").await.starts_with("error: "));
    assert!(ctl.send("fly").await.starts_with("error: Unknown command"));

    // Blackhole: nothing comes back, the connection stays; pass resumes.
    assert_eq!(ctl.send("mode blackhole").await, "ok");
    client.write_all(b"void").await.expect("write");
    let mut buf = [0u8; 4];
    assert!(timeout(Duration::from_millis(200), client.read(&mut buf)).await.is_err(), "data crossed a blackhole");
    assert_eq!(stats_of(&ctl.send("stats").await)["mode"], "blackhole");
    assert_eq!(ctl.send("mode pass").await, "ok");
    round_trip(&mut client, b"back").await;

    // hello, again, back: 14 bytes each way; the blackholed 4 are not counted.
    ctl.stats_when("14 bytes each way", |s| s["bytes_up"] == 14 && s["bytes_down"] == 14).await;
    assert_eq!(ctl.send("reset").await, "ok");
    let stats = stats_of(&ctl.send("stats").await);
    assert_eq!((stats["bytes_up"].as_u64(), stats["bytes_down"].as_u64()), (Some(0), Some(0)));

    // Cut: the client sees the connection closed; a new one works.
    assert_eq!(ctl.send("cut").await, "ok");
    let closed = timeout(SOON, client.read(&mut buf)).await.expect("cut did not close the connection");
    assert!(matches!(closed, Ok(0) | Err(_)), "after cut: {closed:?}");
    let mut client = TcpStream::connect(proxy.addr).await.expect("connect after cut");
    round_trip(&mut client, b"new").await;
    assert_eq!(stats_of(&ctl.send("stats").await)["accepted"], 2);

    // Refuse: new connections are closed at once.
    assert_eq!(proxy.control("mode refuse").await, "ok");
    let mut refused = TcpStream::connect(proxy.addr).await.expect("TCP connect succeeds while refusing");
    let r = timeout(SOON, refused.read(&mut buf)).await.expect("refused connection left open");
    assert!(matches!(r, Ok(0) | Err(_)), "refused connection read {r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_subcommand_and_clean_stop() {
    let mut proxy = NetProxy::spawn(echo_server().await, &["--delay-up", "1ms", "--rate", "1GiB"]);
    let out = ctl(&proxy.control, &["stats"]).await;
    assert!(out.status.success(), "ctl stats failed: {}", String::from_utf8_lossy(&out.stderr));
    let stats = stats_of(String::from_utf8_lossy(&out.stdout).trim());
    assert_eq!(stats["delay_up_us"], 1000);
    assert_eq!(stats["delay_down_us"], 0);
    assert_eq!(stats["rate_up"], 1 << 30);
    assert_eq!(stats["rate_down"], 1 << 30);

    let out = ctl(&proxy.control, &["mode", "stall"]).await;
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");

    let out = ctl(&proxy.control, &["mode", "sideways"]).await;
    assert_eq!(out.status.code(), Some(1), "a refused command exits 1");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Unknown mode"));

    // A second proxy on the same control socket is refused, clearly.
    let second = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9", "--control"])
        .arg(&proxy.control)
        .output()
        .expect("run a second netproxy");
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("another netproxy answers there"));

    // SIGTERM: exit 0, control socket removed.
    let pid = proxy.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().expect("kill").success());
    let deadline = Instant::now() + SOON;
    let status = loop {
        if let Some(status) = proxy.child.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "netproxy ignored SIGTERM");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(status.success(), "netproxy exited with {status}");
    assert!(!proxy.control.exists(), "control socket left behind");
}

#[test]
fn bad_arguments_are_clear_errors() {
    let run = |args: &[&str]| Command::new(BIN).args(args).output().expect("run netproxy");
    let out = run(&["--listen", "127.0.0.1:0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--upstream"));

    let out = run(&["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9", "--delay", "5"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a duration"));

    let out = run(&["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9", "--rate", "fast"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a size"));

    let out = run(&["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9", "--delay", "1ms", "--delay-up", "2ms"]);
    assert_eq!(out.status.code(), Some(2), "--delay and --delay-up conflict");

    let out = run(&["--listen", "nowhere", "--upstream", "127.0.0.1:9"]);
    assert_eq!(out.status.code(), Some(2));

    let out = run(&["ctl", "/nonexistent/netproxy.sock", "stats"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Cannot connect to control socket"));
}
