//! TLS (issue 13, docs/tls.md) with real repd processes and real clients:
//! libnbd's nbdinfo and nbdcopy with `nbds://` URIs, qemu-img with
//! `tls-creds-x509`, fio's nbd engine; the replication link in mutual TLS.
//! Certificates are made here with certtool (gnutls-bin).

mod common;
mod tls_common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use tls_common::*;

/// A single-node primary with `[tls]`, and the directories clients use.
struct TlsNode {
    node: TestNode,
    /// ca-cert.pem + client-cert.pem + client-key.pem.
    client: PathBuf,
    /// ca-cert.pem only (a client without a certificate).
    ca_only: PathBuf,
    /// The node's own directory (server-cert.pem ...).
    server: PathBuf,
    ca: Ca,
    _pki: tempfile::TempDir,
}

impl TlsNode {
    fn start(nbd: &str, verify_client: bool, unix: bool) -> TlsNode {
        require_tool("certtool", "gnutls-bin");
        let pki = tempfile::Builder::new().prefix("repblock-pki-").tempdir().expect("temp dir");
        let ca = Ca::new(pki.path(), "ca");
        let server = pki.path().join("alpha");
        ca.node_dir(&server, "alpha");
        let client = pki.path().join("client");
        ca.client_dir(&client, "client1");
        let ca_only = pki.path().join("caonly");
        ca.ca_only_dir(&ca_only);
        let mut opts = NodeOpts::new("sync");
        opts.size = "32MiB".into();
        opts.unix = unix;
        opts.extra =
            format!("[tls]\ndir = \"{}\"\nnbd = \"{nbd}\"\nnbd_verify_client = {verify_client}\n", server.display());
        let node = TestNode::ready_with(opts);
        TlsNode { node, client, ca_only, server, ca, _pki: pki }
    }

    /// The export's `nbds://` URI with `tls-certificates=dir`.
    fn nbds(&self, dir: &Path) -> String {
        if self.node.opts.unix {
            format!("nbds+unix:///r0?socket={}&tls-certificates={}", self.node.nbd_socket().display(), dir.display())
        } else {
            format!("nbds://127.0.0.1:{}/r0?tls-certificates={}", self.node.port, dir.display())
        }
    }
}

fn tool(name: &str) -> Command {
    let c = Command::new(name);
    if name == "qemu-img" {
        require_tool(name, "qemu-utils");
    } else {
        require_tool(name, "libnbd-bin");
    }
    c
}

const T: Duration = Duration::from_secs(120);

fn text(o: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// nbdcopy a random image into the export over TLS and back; every byte
/// compared.
fn copy_round_trip(n: &TlsNode, uri: &str, len: usize, seed: u64) {
    let src = random_file(n.node.path(), &format!("src-{seed}.img"), len, seed);
    let t = Instant::now();
    run_ok(tool("nbdcopy").arg(&src).arg(uri), T);
    let back = n.node.path().join(format!("back-{seed}.img"));
    run_ok(tool("nbdcopy").arg(uri).arg(&back), T);
    println!("nbdcopy {} MiB there and back over TLS: {:?}", len >> 20, t.elapsed());
    let want = std::fs::read(&src).expect("read src");
    let got = std::fs::read(&back).expect("read back");
    assert_eq!(got.len() as u64, 32 << 20, "the whole export came back");
    assert!(got[..len] == want[..], "bytes read back over TLS differ from those written");
}

#[test]
fn require_serves_libnbd_and_qemu_over_tls_and_refuses_plain_clients() {
    let n = TlsNode::start("require", false, false);
    let uri = n.nbds(&n.client);
    let out = run_ok(tool("nbdinfo").arg("--json").arg(&uri), T);
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("nbdinfo --json");
    assert_eq!(info["TLS"], true, "{info:#}");
    assert_eq!(info["exports"][0]["export-size"], 32u64 << 20, "{info:#}");
    let is_tls = run_timeout(tool("nbdinfo").arg("--is").arg("tls").arg(&uri), T);
    assert_eq!(is_tls.status.code(), Some(0), "nbdinfo --is tls: {}", text(&is_tls));

    copy_round_trip(&n, &uri, 8 << 20, 1);

    // qemu-img writes through tls-creds-x509, then nbdcopy reads it back.
    let src = random_file(n.node.path(), "qemu-src.img", 4 << 20, 2);
    let creds = format!("tls-creds-x509,id=tls0,dir={},endpoint=client", n.client.display());
    let target = format!("driver=nbd,host=127.0.0.1,port={},export=r0,tls-creds=tls0", n.node.port);
    run_ok(
        tool("qemu-img")
            .args(["convert", "-n", "-f", "raw", "--object", &creds])
            .arg(&src)
            .args(["--target-image-opts", &target]),
        T,
    );
    let info = run_ok(
        tool("qemu-img").args(["info", "--object", &creds, "--image-opts"]).arg(format!(
            "file.driver=nbd,file.host=127.0.0.1,file.port={},file.export=r0,file.tls-creds=tls0",
            n.node.port
        )),
        T,
    );
    assert!(text(&info).contains("32 MiB"), "qemu-img info over TLS: {}", text(&info));
    let back = n.node.path().join("qemu-back.img");
    run_ok(tool("nbdcopy").arg(&uri).arg(&back), T);
    let want = std::fs::read(&src).expect("read");
    assert!(std::fs::read(&back).expect("read")[..want.len()] == want[..], "qemu-img's bytes differ");

    // A plain client: NBD_REP_ERR_TLS_REQD to its options (libnbd reports
    // the refused NBD_OPT_GO), then it gives up.
    let plain = run_timeout(tool("nbdinfo").arg(n.node.uri()), T);
    assert!(!plain.status.success(), "a plain client must be refused under require: {}", text(&plain));
    println!("plain nbdinfo under require: {}", text(&plain).trim());
    let plain_qemu = run_timeout(tool("qemu-img").args(["info", "-f", "raw"]).arg(n.node.uri()), T);
    assert!(!plain_qemu.status.success(), "plain qemu-img must be refused: {}", text(&plain_qemu));
    // nbdinfo --is tls on a plain URI: not TLS (exit 2) or refused (1).
    assert_eq!(n.node.status()["role"], "primary", "the primary keeps serving");
    // A TLS client still works after the refusals.
    run_ok(tool("nbdinfo").arg(&uri), T);
}

#[test]
fn require_refuses_the_options_of_a_plain_client_with_tls_reqd() {
    // The raw protocol: after the greeting, NBD_OPT_LIST before STARTTLS is
    // answered NBD_REP_ERR_TLS_REQD with a message; NBD_OPT_EXPORT_NAME
    // closes the connection, as the spec says.
    use std::io::{Read, Write};
    let n = TlsNode::start("require", false, false);
    let mut s = std::net::TcpStream::connect(("127.0.0.1", n.node.port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).expect("greeting");
    s.write_all(&3u32.to_be_bytes()).expect("client flags");
    let option = |opt: u32, data: &[u8]| {
        let mut m = Vec::new();
        m.extend_from_slice(&0x4948_4156_454F_5054u64.to_be_bytes());
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        m
    };
    s.write_all(&option(3, &[])).expect("NBD_OPT_LIST");
    let mut head = [0u8; 20];
    s.read_exact(&mut head).expect("reply");
    let rep = u32::from_be_bytes(head[12..16].try_into().expect("4"));
    assert_eq!(rep, (1 << 31) | 5, "NBD_REP_ERR_TLS_REQD");
    let len = u32::from_be_bytes(head[16..20].try_into().expect("4")) as usize;
    let mut msg = vec![0u8; len];
    s.read_exact(&mut msg).expect("message");
    let msg = String::from_utf8_lossy(&msg);
    assert!(msg.contains("TLS is required") && msg.contains("STARTTLS"), "{msg}");
    s.write_all(&option(1, b"r0")).expect("NBD_OPT_EXPORT_NAME");
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty(), "EXPORT_NAME before TLS under require: closed without an answer, got {rest:?}");
}

#[test]
fn on_serves_tls_and_plain_clients_alike() {
    let n = TlsNode::start("on", false, false);
    let tls = run_timeout(tool("nbdinfo").args(["--is", "tls"]).arg(n.nbds(&n.client)), T);
    assert_eq!(tls.status.code(), Some(0), "{}", text(&tls));
    let plain = run_timeout(tool("nbdinfo").args(["--is", "tls"]).arg(n.node.uri()), T);
    assert_eq!(plain.status.code(), Some(2), "a plain client is served, without TLS: {}", text(&plain));
    copy_round_trip(&n, &n.node.uri(), 2 << 20, 3);
    copy_round_trip(&n, &n.nbds(&n.client), 2 << 20, 4);
}

#[test]
fn unix_socket_export_over_tls() {
    let n = TlsNode::start("require", false, true);
    let uri = n.nbds(&n.client);
    let tls = run_timeout(tool("nbdinfo").args(["--is", "tls"]).arg(&uri), T);
    assert_eq!(tls.status.code(), Some(0), "{}", text(&tls));
    copy_round_trip(&n, &uri, 4 << 20, 5);
    let plain = run_timeout(tool("nbdinfo").arg(n.node.uri()), T);
    assert!(!plain.status.success(), "plain client on the Unix socket under require: {}", text(&plain));
}

#[test]
fn verify_client_refuses_a_client_without_a_certificate() {
    let n = TlsNode::start("require", true, false);
    let no_cert = run_timeout(tool("nbdinfo").arg(n.nbds(&n.ca_only)), T);
    assert!(!no_cert.status.success(), "no client certificate under nbd_verify_client: {}", text(&no_cert));
    // Client-triggered handshake failures are logged at most once per 5 s.
    std::thread::sleep(Duration::from_millis(5500));
    // A client certificate from another CA.
    let other = Ca::new(n.node.path(), "other-ca");
    let foreign = n.node.path().join("foreign");
    other.client_dir(&foreign, "intruder");
    std::fs::copy(&n.ca.cert, foreign.join("ca-cert.pem")).expect("trust the server's CA");
    let wrong_ca = run_timeout(tool("nbdinfo").arg(n.nbds(&foreign)), T);
    assert!(!wrong_ca.status.success(), "client certificate from another CA: {}", text(&wrong_ca));
    run_ok(tool("nbdinfo").arg(n.nbds(&n.client)), T);
    let log = n.node.logs_text();
    assert!(log.contains("TLS handshake failed (no-certificate)"), "the log says why:\n{log}");
    // GnuTLS presents no certificate whose issuer the server did not list
    // (rustls lists its CA): refused as no-certificate, or unknown-ca.
    assert_eq!(log.matches("TLS handshake failed (").count(), 2, "both refusals logged:\n{log}");
    let _ = &n.server;
}

#[test]
fn fio_nbd_engine_over_tls() {
    // fio's nbd engine passes its URI to libnbd, which refuses
    // `tls-certificates=` in a URI unless the program allows local files
    // (fio does not); it reads libnbd's default directory,
    // $HOME/.pki/libnbd, instead. From there libnbd 1.14 takes the CA but
    // presents no client certificate, so the export does not ask for one.
    require_tool("fio", "fio");
    let n = TlsNode::start("require", false, false);
    let home = n.node.path().join("home");
    let pki = home.join(".pki/libnbd");
    std::fs::create_dir_all(&pki).expect("mkdir");
    for f in ["ca-cert.pem", "client-cert.pem", "client-key.pem"] {
        std::fs::copy(n.client.join(f), pki.join(f)).expect("copy");
    }
    let uri = format!("nbds://127.0.0.1:{}/r0", n.node.port);
    let out = run_ok(
        Command::new("fio")
            .env("HOME", &home)
            .args(["--name=tls", "--ioengine=nbd", "--rw=randwrite", "--bs=4k", "--size=8M", "--iodepth=16"])
            .args(["--verify=crc32c", "--do_verify=1", "--output-format=json"])
            .arg(format!("--uri={uri}")),
        T,
    );
    let json = String::from_utf8_lossy(&out.stdout);
    let start = json.find('{').expect("fio JSON");
    let v: serde_json::Value = serde_json::from_str(&json[start..]).expect("fio JSON");
    let job = &v["jobs"][0];
    assert_eq!(job["error"], 0, "{job:#}");
    assert_eq!(job["write"]["io_bytes"], 8u64 << 20, "{job:#}");
    assert_eq!(job["read"]["io_bytes"], 8u64 << 20, "fio verified every block it wrote: {job:#}");
    println!("fio over TLS: write {} IOPS, verify read {} IOPS", job["write"]["iops"], job["read"]["iops"]);
}

// ---------------------------------------------------------------------------
// The replication link in mutual TLS.
// ---------------------------------------------------------------------------

use common::pair::{MIB, Pair, PairOpts, assert_same_checksums, checksums};

/// A pair with `[tls] replication = "require"`, each node with its own
/// certificate directory (`tls_dir`) made by `ca`.
struct TlsPair {
    pair: Pair,
    ca: Ca,
    dirs: [PathBuf; 2],
}

impl TlsPair {
    fn new(nbd: &str) -> TlsPair {
        require_tool("certtool", "gnutls-bin");
        let tls = format!("[tls]\nreplication = \"require\"\nnbd = \"{nbd}\"\n");
        let pair = Pair::new(PairOpts::new("C").size("32MiB").extra(&tls));
        let pki = pair.dir.path().join("pki");
        let ca = Ca::new(&pki, "ca");
        let dirs = [pki.join("alpha"), pki.join("beta")];
        ca.node_dir(&dirs[0], "alpha");
        ca.node_dir(&dirs[1], "beta");
        let mut text = pair.config_text(&pair.default_top());
        for (name, dir) in ["alpha", "beta"].iter().zip(&dirs) {
            let at = format!("name = \"{name}\"\n");
            text = text.replace(&at, &format!("{at}tls_dir = \"{}\"\n", dir.display()));
        }
        std::fs::write(&pair.alpha.config, text).expect("write config");
        TlsPair { pair, ca, dirs }
    }

    fn up(nbd: &str) -> TlsPair {
        let mut t = TlsPair::new(nbd);
        t.pair.start_both();
        for p in [&t.pair.alpha, &t.pair.beta] {
            p.wait_status("connected", Duration::from_secs(30), |s| s["connection"] == "connected");
        }
        t.pair.alpha.repctl_ok(&["promote", "--force"]);
        t.pair.beta.wait_sync(90);
        t.pair.assert_established();
        t
    }
}

#[test]
fn replication_in_mutual_tls_is_byte_identical_under_c() {
    require_tool("nbdcopy", "libnbd-bin");
    let t = TlsPair::up("off");
    let pair = &t.pair;
    for (me, peer) in [(&pair.alpha, "beta"), (&pair.beta, "alpha")] {
        let s = me.status();
        let link = &s["tls"]["replication"];
        assert_eq!(link["encrypted"], true, "{}: {s:#}", me.name);
        assert_eq!(link["peer_subject"], format!("CN={peer}"), "{}: {s:#}", me.name);
        assert!(link["peer_expires_in_days"].as_i64().is_some_and(|d| d > 3000), "{}: {s:#}", me.name);
    }
    let img = random_file(pair.dir.path(), "fill.img", pair.size as usize, 0x715);
    let start = Instant::now();
    run_ok(Command::new("nbdcopy").arg(&img).arg(pair.alpha.uri()), T);
    println!("nbdcopy 32 MiB into alpha, replicated under C in TLS: {:?}", start.elapsed());
    let alpha_sums = pair.rt.block_on(async {
        let c = pair.alpha.nbd().await;
        let sums = checksums(&c, pair.size, 64 * 1024).await;
        c.disconnect().await.expect("disconnect");
        sums
    });
    let want: Vec<u32> = std::fs::read(&img).expect("read").chunks(64 * 1024).map(crc32).collect();
    assert_same_checksums("alpha vs the image written", &alpha_sums, &want, 64 * 1024);
    pair.alpha.wait_status("no NBD client", Duration::from_secs(10), |s| s["nbd"]["clients"] == 0);
    pair.alpha.repctl_ok(&["demote"]);
    pair.beta.wait_status("peer alpha secondary", Duration::from_secs(10), |s| s["peer"]["role"] == "secondary");
    pair.beta.repctl_ok(&["promote"]);
    let beta_sums = pair.rt.block_on(async {
        let c = pair.beta.nbd().await;
        let sums = checksums(&c, pair.size, 64 * 1024).await;
        c.disconnect().await.expect("disconnect");
        sums
    });
    assert_same_checksums("alpha's copy vs beta's copy (TLS link)", &alpha_sums, &beta_sums, 64 * 1024);
}

fn crc32(b: &[u8]) -> u32 {
    crc32c::crc32c(b)
}

/// Alpha, primary, keeps serving NBD while beta (restarted with `setup`
/// applied to its certificate directory) is refused; alpha's log says
/// `why`.
fn refused(t: &mut TlsPair, case: &str, why: &str, setup: impl FnOnce(&Ca, &Path)) {
    t.pair.beta.kill9();
    setup(&t.ca, &t.dirs[1]);
    t.pair.beta.start();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !t.pair.alpha.logs_text().contains(why) {
        assert!(Instant::now() < deadline, "{case}: alpha's log never said {why:?}:\n{}", t.pair.logs_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    let a = t.pair.alpha.status();
    assert_ne!(a["connection"], "connected", "{case}: the bad peer must not connect\n{a:#}");
    assert_eq!(a["role"], "primary", "{case}: {a:#}");
    // The primary keeps serving: a write and its read-back.
    t.pair.rt.block_on(async {
        let c = t.pair.alpha.nbd().await;
        let data = vec![case.len() as u8; 64 * 1024];
        c.write(MIB, &data, true).await.expect("write while the bad peer is refused");
        assert_eq!(c.read(MIB, 64 * 1024).await.expect("read"), data);
        c.disconnect().await.expect("disconnect");
    });
    println!("{case}: refused, alpha's log says {why:?}");
}

#[test]
fn bad_replication_peers_are_refused_and_logged() {
    let mut t = TlsPair::up("off");
    let other = Ca::new(t.pair.dir.path(), "other-ca");
    refused(&mut t, "certificate from another CA", "unknown-ca", |_, dir| {
        other.node_dir(dir, "beta");
    });
    refused(&mut t, "expired certificate", "expired", |ca, dir| {
        let dns = ["beta", "localhost"];
        let leaf = Leaf { dns: &dns, expired: true, ..Leaf::new("beta") };
        ca.issue(dir, "server", &leaf);
        ca.issue(dir, "client", &leaf);
    });
    refused(&mut t, "certificate naming another node", "wrong-name", |ca, dir| {
        ca.node_dir(dir, "gamma");
    });
    // Garbage before the TLS handshake, from anyone who reaches the port.
    t.pair.beta.kill9();
    {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", t.pair.alpha.repl_listen_port)).expect("connect");
        s.write_all(b"GET / HTTP/1.0\r\n\r\nthis is not TLS at all, nor a repblock hello\r\n").expect("write");
        let mut sink = Vec::new();
        use std::io::Read;
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let _ = s.read_to_end(&mut sink);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !t.pair.alpha.logs_text().contains("not-tls") {
        assert!(Instant::now() < deadline, "garbage: alpha's log never said not-tls:\n{}", t.pair.alpha.logs_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(t.pair.alpha.status()["role"], "primary");
    // Good certificates again: beta reconnects and resyncs.
    t.ca.node_dir(&t.dirs[1], "beta");
    t.pair.beta.start();
    t.pair.beta.wait_sync(90);
    t.pair.assert_established();
}

#[test]
fn sighup_reloads_certificates_under_load_without_dropping_connections() {
    require_tool("fio", "fio");
    let t = TlsPair::up("require");
    let pair = &t.pair;
    // fio over TLS to alpha (libnbd's default certificate directory, see
    // fio_nbd_engine_over_tls), replicated to beta over the TLS link.
    let home = pair.dir.path().join("home");
    let client = pair.dir.path().join("pki/client");
    t.ca.client_dir(&client, "client1");
    std::fs::create_dir_all(home.join(".pki")).expect("mkdir");
    std::fs::rename(&client, home.join(".pki/libnbd")).expect("move");
    let uri = format!("nbds://127.0.0.1:{}/r0", pair.alpha.nbd_port);
    let fio = Command::new("fio")
        .env("HOME", &home)
        .args(["--name=reload", "--ioengine=nbd", "--rw=randwrite", "--bs=4k", "--size=16M", "--iodepth=8"])
        .args(["--time_based", "--runtime=6", "--verify=crc32c", "--verify_backlog=64", "--output-format=json"])
        .arg(format!("--uri={uri}"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn fio");
    std::thread::sleep(Duration::from_secs(2));
    // New certificates that expire in 10 days (warned about), then SIGHUP.
    for (name, dir) in ["alpha", "beta"].iter().zip(&t.dirs) {
        let dns = [*name, "localhost"];
        let leaf = Leaf { dns: &dns, ip: Some("127.0.0.1"), days: Some(10), ..Leaf::new(name) };
        t.ca.issue(dir, "server", &leaf);
        t.ca.issue(dir, "client", &leaf);
    }
    for p in [&pair.alpha, &pair.beta] {
        let pid = p.status()["pid"].as_u64().expect("pid").to_string();
        run_ok(Command::new("kill").args(["-HUP", &pid]), T);
    }
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let a = pair.alpha.status();
        assert_eq!(a["connection"], "connected", "the link must stay up across the reload\n{a:#}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = fio.wait_with_output().expect("fio");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "fio across the reload: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(&stdout[stdout.find('{').expect("JSON")..]).expect("fio JSON");
    assert_eq!(v["jobs"][0]["error"], 0, "{v:#}");
    println!("fio across the reload: {} write IOPS over TLS", v["jobs"][0]["write"]["iops"]);
    let a = pair.alpha.status();
    let tls = &a["tls"];
    let warnings = tls["warnings"].as_array().expect("warnings");
    assert!(
        warnings
            .iter()
            .any(|w| w.as_str().is_some_and(|w| w.contains("server-cert.pem") && w.contains("expires in 9 days"))),
        "{a:#}"
    );
    assert!(pair.alpha.logs_text().contains("TLS certificates reloaded"), "{}", pair.alpha.logs_text());
    // New handshakes get the new certificate: reconnect the link.
    pair.beta.repctl_ok(&["disconnect"]);
    pair.beta.repctl_ok(&["connect"]);
    let a = pair.alpha.wait_status("reconnected", Duration::from_secs(30), |s| {
        s["connection"] == "connected" && s["tls"]["replication"]["encrypted"] == true
    });
    let days = a["tls"]["replication"]["peer_expires_in_days"].as_i64().expect("days");
    assert!((8..=10).contains(&days), "beta's new certificate expires in 10 days: {a:#}");
    assert!(
        a["tls"]["warnings"].as_array().expect("w").iter().any(|w| w.as_str().is_some_and(|w| w.starts_with("peer "))),
        "{a:#}"
    );
}

/// `FrameReader::has_input` over a real TLS link: frames rustls already
/// decrypted but nobody read yet are no longer in the socket, and are
/// input all the same (a node held up in a long fsync must not declare its
/// peer lost while the peer's pings sit decrypted in its TLS buffer).
#[test]
fn has_input_sees_plaintext_rustls_decrypted_but_not_yet_read() {
    use repblock::repl::{FrameWriter, Message, encode, secure, split_link};
    use repblock::tls::{NbdTlsMode, ReplTlsMode, TlsContext, TlsSettings};
    use tokio::io::AsyncReadExt;

    require_tool("certtool", "gnutls-bin");
    let pki = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new(pki.path(), "ca");
    let ctx = |node: &str| {
        let dir = pki.path().join(node);
        ca.node_dir(&dir, node);
        let settings =
            TlsSettings { dir, nbd: NbdTlsMode::Off, replication: ReplTlsMode::Require, nbd_verify_client: false };
        TlsContext::load(settings).expect("credentials")
    };
    let (alpha, beta) = (ctx("alpha"), ctx("beta"));
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async move {
        let timeout = Duration::from_secs(10);
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let dial = tokio::spawn(async move {
            let s = tokio::net::TcpStream::connect(addr).await.expect("connect");
            secure(s, Some(&alpha), true, "beta", timeout).await.expect("alpha's TLS")
        });
        let (s, _) = l.accept().await.expect("accept");
        let mut b = secure(s, Some(&beta), false, "alpha", timeout).await.expect("beta's TLS");
        let mut w = FrameWriter::new(dial.await.expect("dial task"));
        // Two pings in one write: one TLS record.
        let (first, second) = (Message::Ping { seq: 1, sent_ns: 1 }, Message::Ping { seq: 2, sent_ns: 2 });
        w.queue(&first).expect("encode");
        w.queue(&second).expect("encode");
        w.flush().await.expect("send");
        // Read exactly the first frame off the TLS stream, as the HMAC
        // handshake reads exactly its own frames: rustls decrypted the whole
        // record, so the second ping waits in its buffer, not in the socket.
        let mut one = bytes::BytesMut::new();
        encode(&first, &mut one).expect("encode");
        let mut got = vec![0u8; one.len()];
        b.read_exact(&mut got).await.expect("first frame");
        assert_eq!(got, one.to_vec());
        let (mut r, _bw) = split_link(b).expect("split");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(r.has_input(), "the second ping, decrypted by rustls but not read, is input");
        assert!(matches!(r.read().await.expect("read"), Some(Message::Ping { seq: 2, .. })));
        assert!(!r.has_input(), "everything read");
        // The peer's close_notify: the end of the stream is input too.
        w.shutdown().await.expect("close_notify");
        let t = Instant::now();
        while !r.has_input() {
            assert!(t.elapsed() < Duration::from_secs(5), "the end of the stream never showed");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(r.read().await.expect("clean end").is_none());
    });
}
