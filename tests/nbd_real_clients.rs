//! Real NBD clients (libnbd's nbdinfo and nbdcopy, qemu-img) against the
//! in-process server on the memory backend: proves the protocol layer on its
//! own. These tools are test dependencies (libnbd-bin, qemu-utils); a missing
//! tool fails the test with a message saying which.

mod nbd_common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use nbd_common::*;
use rand::{Rng, SeedableRng};
use repblock::nbd::{ListenAddr, MemoryBackend, NbdHandle, NbdServer};
use tokio::process::Command;

const SIZE: u64 = 16 * 1024 * 1024;

fn uri(h: &NbdHandle) -> String {
    match h.listen_addr() {
        ListenAddr::Tcp(a) => format!("nbd://{a}/{EXPORT}"),
        ListenAddr::Unix(p) => format!("nbd+unix:///{EXPORT}?socket={}", p.display()),
    }
}

/// Runs a tool (with a time limit) and returns its stdout; panics with its
/// stderr if it fails.
async fn run(tool: &str, args: &[&str]) -> String {
    let fut = Command::new(tool).args(args).kill_on_drop(true).output();
    let out = match tokio::time::timeout(Duration::from_secs(120), fut).await {
        Err(_) => panic!("{tool} {args:?} did not finish in 120 s"),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("{tool} is not installed (apt install libnbd-bin qemu-utils)")
        }
        Ok(Err(e)) => panic!("cannot run {tool}: {e}"),
        Ok(Ok(o)) => o,
    };
    assert!(out.status.success(), "{tool} {args:?} failed ({}):\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn random_image(path: &Path, size: u64, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut data = vec![0u8; size as usize];
    rng.fill(&mut data[..]);
    // Some all-zero stretches so clients may use zero/trim paths.
    for z in data.chunks_mut(1024 * 1024).step_by(3) {
        z[..256 * 1024].fill(0);
    }
    std::fs::write(path, &data).unwrap();
    data
}

async fn servers() -> (Vec<(NbdHandle, Arc<MemoryBackend>)>, tempfile::TempDir) {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let mut v = Vec::new();
    for addr in ["127.0.0.1:0".to_string(), format!("unix:{}", dir.path().join("nbd.sock").display())] {
        let backend = Arc::new(MemoryBackend::new(SIZE));
        let h = NbdServer::start(&addr.parse().unwrap(), backend.clone(), config()).await.unwrap();
        v.push((h, backend));
    }
    (v, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_json_reports_size_and_flags() {
    let (servers, _dir) = servers().await;
    for (h, _) in &servers {
        let out = run("nbdinfo", &["--json", &uri(h)]).await;
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
        let export = &v["exports"][0];
        assert_eq!(export["export-size"], SIZE, "{out}");
        assert_eq!(export["export-name"], EXPORT, "{out}");
        for flag in ["can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"] {
            assert_eq!(export[flag], true, "{flag} in {out}");
        }
        assert_eq!(export["is_read_only"], false, "{out}");
        assert_eq!(export["block_size_minimum"], 1, "{out}");
        assert_eq!(export["block_size_preferred"], 4096, "{out}");
        assert_eq!(export["block_size_maximum"], 32 * 1024 * 1024, "{out}");
        assert_eq!(v["protocol"], "newstyle-fixed", "{out}");
        // The description reaches the client.
        assert_eq!(export["description"], "test export", "{out}");
    }
    // NBD_OPT_LIST through a real client.
    let (h, _) = &servers[0];
    let addr = match h.listen_addr() {
        ListenAddr::Tcp(a) => a,
        ListenAddr::Unix(_) => unreachable!("the first server listens on TCP"),
    };
    let out = run("nbdinfo", &["--list", "--json", &format!("nbd://{addr}")]).await;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let exports = v["exports"].as_array().unwrap_or_else(|| panic!("{out}"));
    assert_eq!(exports.len(), 1, "{out}");
    assert_eq!(exports[0]["export-name"], EXPORT, "{out}");
    assert_eq!(exports[0]["export-size"], SIZE, "{out}");
    for (h, _) in servers {
        h.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_convert_in_and_compare() {
    let (servers, dir) = servers().await;
    let src = dir.path().join("src.img");
    let data = random_image(&src, SIZE, 1);
    let src = src.to_str().unwrap();
    for (h, backend) in &servers {
        let u = uri(h);
        run("qemu-img", &["convert", "-n", "-f", "raw", "-O", "raw", src, &u]).await;
        assert!(backend.snapshot(0, SIZE as usize) == data, "export content differs after qemu-img convert");
        let out = run("qemu-img", &["compare", "-f", "raw", "-F", "raw", src, &u]).await;
        assert!(out.contains("Images are identical"), "{out}");
        // And a difference is seen through the export.
        repblock::nbd::BlockBackend::write(&**backend, 12345, bytes::Bytes::from_static(b"X"), false).await.unwrap();
        let out = Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", src, &u]).output().await.unwrap();
        assert_eq!(out.status.code(), Some(1), "qemu-img compare must report the difference");
        assert!(String::from_utf8_lossy(&out.stdout).contains("offset 12288"));
    }
    for (h, _) in servers {
        h.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_round_trip() {
    let (servers, dir) = servers().await;
    let src = dir.path().join("src.img");
    let data = random_image(&src, SIZE, 2);
    for (i, (h, backend)) in servers.iter().enumerate() {
        let u = uri(h);
        let out = dir.path().join(format!("out{i}.img"));
        // Several connections and many requests in flight: multi-conn and
        // pipelining under a real client.
        run("nbdcopy", &["--connections=4", "--requests=32", src.to_str().unwrap(), &u]).await;
        assert!(backend.snapshot(0, SIZE as usize) == data, "export content differs after nbdcopy in");
        run("nbdcopy", &["--connections=4", "--requests=32", &u, out.to_str().unwrap()]).await;
        assert!(std::fs::read(&out).unwrap() == data, "nbdcopy out differs");
        wait_no_clients(h).await;
    }
    for (h, _) in servers {
        h.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fio_nbd_engine_verify() {
    let (servers, _dir) = servers().await;
    for (h, _) in &servers {
        let u = uri(h);
        // Two jobs on disjoint halves, random 4 KiB writes at QD16, each block
        // checked with crc32c after the write phase; then a mixed pass.
        let out = run(
            "fio",
            &[
                "--name=verify",
                "--ioengine=nbd",
                &format!("--uri={u}"),
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=16",
                "--numjobs=2",
                "--size=8M",
                "--offset_increment=8M",
                "--verify=crc32c",
                "--verify_fatal=1",
                // No verify state files left in the working directory.
                "--verify_state_save=0",
                "--group_reporting",
                "--output-format=json",
            ],
        )
        .await;
        // fio's nbd engine prints "fio: connected to NBD server" before the JSON.
        let json = &out[out.find('{').unwrap_or_else(|| panic!("no JSON in {out}"))..];
        let v: serde_json::Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {out}"));
        assert_eq!(v["jobs"][0]["error"], 0, "{out}");
        // 2 jobs × 8 MiB written.
        assert_eq!(v["jobs"][0]["write"]["io_bytes"], 16 * 1024 * 1024, "{out}");
    }
    for (h, _) in servers {
        h.shutdown().await;
    }
}

/// fio result: (IOPS, MiB/s) of the write or read side.
async fn fio_run(uri: &str, name: &str, rw: &str, bs: &str, iodepth: u32) -> (f64, f64) {
    let out = run(
        "fio",
        &[
            &format!("--name={name}"),
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            &format!("--rw={rw}"),
            &format!("--bs={bs}"),
            &format!("--iodepth={iodepth}"),
            "--size=256M",
            "--time_based",
            "--runtime=5",
            "--output-format=json",
        ],
    )
    .await;
    let json = &out[out.find('{').unwrap_or_else(|| panic!("no JSON in {out}"))..];
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    let side = if rw.contains("read") { "read" } else { "write" };
    let j = &v["jobs"][0][side];
    (j["iops"].as_f64().unwrap(), j["bw"].as_f64().unwrap() / 1024.0)
}

/// The protocol layer's overhead against a named peer, nbdkit's memory
/// plugin, in the same run (both over a Unix socket, both in memory). Run
/// with `cargo test --release --test nbd_real_clients -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run explicitly in release mode"]
async fn bench_against_nbdkit_memory() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let ours_sock = dir.path().join("ours.sock");
    let kit_sock = dir.path().join("nbdkit.sock");
    let backend = Arc::new(MemoryBackend::new(256 * 1024 * 1024));
    let h = NbdServer::start(&ListenAddr::Unix(ours_sock.clone()), backend, config()).await.unwrap();
    let mut kit = Command::new("nbdkit")
        .args(["--foreground", "--unix", kit_sock.to_str().unwrap(), "memory", "size=256M"])
        .kill_on_drop(true)
        .spawn()
        .expect("nbdkit is not installed");
    while !kit_sock.exists() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ours = format!("nbd+unix:///{EXPORT}?socket={}", ours_sock.display());
    let theirs = format!("nbd+unix:///?socket={}", kit_sock.display());
    println!("{:<28} {:>12} {:>12} {:>8}", "workload", "repblock", "nbdkit", "ratio");
    for (name, rw, bs, qd) in [
        ("4k randwrite QD1", "randwrite", "4k", 1),
        ("4k randwrite QD32", "randwrite", "4k", 32),
        ("1M write QD8", "write", "1M", 8),
        ("4k randread QD32", "randread", "4k", 32),
    ] {
        let a = fio_run(&ours, "ours", rw, bs, qd).await;
        let b = fio_run(&theirs, "nbdkit", rw, bs, qd).await;
        let (x, y, unit) = if bs == "1M" { (a.1, b.1, "MiB/s") } else { (a.0, b.0, "IOPS") };
        println!("{name:<28} {x:>12.0} {y:>12.0} {:>7.2}x  ({unit})", x / y);
    }
    let _ = kit.kill().await;
    h.shutdown().await;
}
