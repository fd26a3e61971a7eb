//! Real NBD clients against a real repd, for both IO engines: nbdinfo,
//! qemu-img, nbdcopy, fio's nbd engine, the Unix socket export, and ext4
//! through nbdfuse + a loop device.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{NodeOpts, TestNode, random_file, require_tool, run_ok, run_timeout};

const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(300);

fn nbdinfo_json(uri: &str) -> serde_json::Value {
    require_tool("nbdinfo", "libnbd-bin");
    let out = run_ok(Command::new("nbdinfo").args(["--json", uri]), T);
    serde_json::from_slice(&out.stdout).expect("nbdinfo --json prints JSON")
}

fn check_export_flags(info: &serde_json::Value, size: u64) {
    let export = &info["exports"][0];
    assert_eq!(export["export-size"], size, "{info}");
    for flag in ["can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"] {
        assert_eq!(export[flag], true, "{flag}: {info}");
    }
    assert_eq!(export["is_read_only"], false, "{info}");
}

fn nbdinfo_flags_and_size(engine: &str) {
    let n = TestNode::ready(engine);
    let info = nbdinfo_json(&n.uri());
    check_export_flags(&info, 64 * MIB);
    assert_eq!(info["exports"][0]["export-name"], "r0", "{info}");
    // The default export (empty name) is the same volume.
    let info = nbdinfo_json(&format!("nbd://127.0.0.1:{}", n.port));
    check_export_flags(&info, 64 * MIB);
}

fn unix_socket_export(engine: &str) {
    let mut opts = NodeOpts::new(engine);
    opts.unix = true;
    let n = TestNode::ready_with(opts);
    assert!(n.uri().starts_with("nbd+unix:///r0?socket="), "{}", n.uri());
    let info = nbdinfo_json(&n.uri());
    check_export_flags(&info, 64 * MIB);
    // Data goes through the Unix socket too.
    let img = random_file(n.path(), "in.img", 4 * MIB as usize, 7);
    require_tool("nbdcopy", "libnbd-bin");
    run_ok(Command::new("nbdcopy").arg(&img).arg(n.uri()), T);
    let out = n.path().join("out.img");
    run_ok(Command::new("nbdcopy").arg(n.uri()).arg(&out), T);
    let got = std::fs::read(&out).expect("read out.img");
    assert_eq!(got.len() as u64, 64 * MIB);
    assert!(got[..4 * MIB as usize] == std::fs::read(&img).expect("read in.img")[..], "data differs");
    assert!(got[4 * MIB as usize..].iter().all(|&b| b == 0), "the rest of the volume reads as zeroes");
    // SIGKILL leaves the socket file behind; the next promote replaces it.
    let mut n = n;
    n.kill9();
    assert!(n.nbd_socket().exists(), "a killed repd leaves its NBD socket file");
    n.restart_primary();
    check_export_flags(&nbdinfo_json(&n.uri()), 64 * MIB);
    // A clean stop removes it.
    assert!(n.term().success());
    assert!(!n.nbd_socket().exists(), "a clean stop removes the NBD socket file");
}

fn qemu_img_convert_and_compare(engine: &str) {
    require_tool("qemu-img", "qemu-utils");
    let n = TestNode::ready(engine);
    let img = random_file(n.path(), "random.img", 16 * MIB as usize, 42);
    run_ok(Command::new("qemu-img").args(["convert", "-n", "-f", "raw", "-O", "raw"]).arg(&img).arg(n.uri()), T);
    // compare: the first 16 MiB match, the rest of the export reads as zeroes.
    let out = run_ok(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&img).arg(n.uri()), T);
    assert!(String::from_utf8_lossy(&out.stdout).contains("Images are identical"), "{out:?}");
    let info = run_ok(Command::new("qemu-img").args(["info", "--output=json"]).arg(n.uri()), T);
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).expect("json");
    assert_eq!(info["virtual-size"], 64 * MIB);
    // And the data survives a clean restart.
    let mut n = n;
    let status = n.term();
    assert!(status.success(), "repd exit status after SIGTERM: {status}");
    n.restart_primary();
    let out = run_ok(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&img).arg(n.uri()), T);
    assert!(String::from_utf8_lossy(&out.stdout).contains("Images are identical"), "{out:?}");
}

fn nbdcopy_round_trip(engine: &str) {
    require_tool("nbdcopy", "libnbd-bin");
    let n = TestNode::ready(engine);
    let input = random_file(n.path(), "in.img", 64 * MIB as usize, 1234);
    run_ok(Command::new("nbdcopy").arg(&input).arg(n.uri()), T);
    let output = n.path().join("out.img");
    run_ok(Command::new("nbdcopy").arg(n.uri()).arg(&output), T);
    let out = run_timeout(Command::new("cmp").arg(&input).arg(&output), T);
    assert!(out.status.success(), "cmp: {}", String::from_utf8_lossy(&out.stdout));
    // Several connections at once (nbdcopy uses multi-conn when offered).
    let output2 = n.path().join("out2.img");
    run_ok(Command::new("nbdcopy").args(["--connections=4", "--requests=16"]).arg(n.uri()).arg(&output2), T);
    assert!(run_timeout(Command::new("cmp").arg(&input).arg(&output2), T).status.success());
}

fn fio_verify(engine: &str) {
    require_tool("fio", "fio");
    let n = TestNode::ready(engine);
    let out = run_timeout(
        Command::new("fio")
            .args([
                "--name=verify",
                "--ioengine=nbd",
                &format!("--uri={}", n.uri()),
                "--rw=randwrite",
                "--bsrange=4k-64k",
                "--bs_unaligned=0",
                "--iodepth=16",
                "--numjobs=4",
                "--size=8m",
                "--offset_increment=8m",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                "--output-format=json",
            ])
            .current_dir(n.path()),
        T,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "fio failed ({}):\n{stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    // fio may print notes before the JSON object.
    let json_start = stdout.find('{').expect("fio printed JSON");
    let v: serde_json::Value = serde_json::from_str(&stdout[json_start..]).expect("fio JSON");
    let jobs = v["jobs"].as_array().expect("jobs");
    assert_eq!(jobs.len(), 4, "{v}");
    for job in jobs {
        assert_eq!(job["error"], 0, "job error: {job}");
        assert!(job["write"]["io_bytes"].as_u64().unwrap_or(0) >= 8 * MIB, "each job wrote its 8 MiB: {job}");
        assert!(job["read"]["io_bytes"].as_u64().unwrap_or(0) >= 8 * MIB, "each job verified its 8 MiB: {job}");
    }
    assert_eq!(n.status()["failed"], serde_json::Value::Null);
}

/// nbdfuse + loop device + mount, torn down in reverse order on drop (also
/// when the test fails half-way).
struct Attached {
    fuse_dir: PathBuf,
    nbdfuse: Option<Child>,
    loop_dev: Option<String>,
    mount: Option<PathBuf>,
}

impl Attached {
    fn new(uri: &str, dir: &Path) -> Attached {
        for (tool, pkg) in [
            ("nbdfuse", "fuse3 libnbd-bin (nbdfuse)"),
            ("losetup", "util-linux"),
            ("mkfs.ext4", "e2fsprogs"),
            ("fusermount3", "fuse3"),
        ] {
            require_tool(tool, pkg);
        }
        let fuse_dir = dir.join("fuse");
        std::fs::create_dir_all(&fuse_dir).expect("mkdir fuse");
        let pidfile = dir.join("nbdfuse.pid");
        let _ = std::fs::remove_file(&pidfile);
        let child = Command::new("nbdfuse")
            .arg("-P")
            .arg(&pidfile)
            .arg(fuse_dir.join("disk"))
            .arg(uri)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn nbdfuse");
        let mut a = Attached { fuse_dir, nbdfuse: Some(child), loop_dev: None, mount: None };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !pidfile.exists() {
            if let Some(st) = a.nbdfuse.as_mut().and_then(|c| c.try_wait().expect("try_wait")) {
                a.nbdfuse = None;
                panic!("nbdfuse exited early: {st}");
            }
            assert!(Instant::now() < deadline, "nbdfuse not ready within 30s");
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = run_ok(
            Command::new("losetup").args(["-f", "--show"]).arg(a.fuse_dir.join("disk")),
            Duration::from_secs(60),
        );
        a.loop_dev = Some(String::from_utf8_lossy(&out.stdout).trim().to_string());
        a
    }

    fn dev(&self) -> &str {
        self.loop_dev.as_deref().expect("loop device")
    }

    fn mount(&mut self, at: &Path) {
        std::fs::create_dir_all(at).expect("mkdir mnt");
        run_ok(Command::new("mount").arg(self.dev()).arg(at), Duration::from_secs(60));
        self.mount = Some(at.to_path_buf());
    }

    /// Orderly teardown; panics on failure (Drop only tries its best).
    fn detach(mut self) {
        if let Some(m) = self.mount.take() {
            run_ok(Command::new("umount").arg(&m), Duration::from_secs(120));
        }
        if let Some(d) = self.loop_dev.take() {
            run_ok(Command::new("losetup").arg("-d").arg(&d), Duration::from_secs(60));
        }
        self.stop_fuse();
    }

    fn stop_fuse(&mut self) {
        if let Some(mut child) = self.nbdfuse.take() {
            let _ = run_timeout(Command::new("fusermount3").arg("-u").arg(&self.fuse_dir), Duration::from_secs(30));
            let deadline = Instant::now() + Duration::from_secs(30);
            while child.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    let _ = run_timeout(Command::new("umount").arg("-l").arg(&self.fuse_dir), Duration::from_secs(30));
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        if let Some(m) = self.mount.take() {
            let out = run_timeout(Command::new("umount").arg(&m), Duration::from_secs(60));
            if !out.status.success() {
                let _ = run_timeout(Command::new("umount").arg("-l").arg(&m), Duration::from_secs(60));
            }
        }
        if let Some(d) = self.loop_dev.take() {
            let _ = run_timeout(Command::new("losetup").arg("-d").arg(&d), Duration::from_secs(60));
        }
        self.stop_fuse();
    }
}

fn ext4_over_nbdfuse_survives_restart(engine: &str) {
    use rand::{Rng, RngCore, SeedableRng};
    let mut opts = NodeOpts::new(engine);
    opts.size = "128MiB".into();
    let mut n = TestNode::ready_with(opts);
    let work = tempfile::Builder::new().prefix("repblock-ext4-").tempdir().expect("tmp");
    let mnt = work.path().join("mnt");
    let seed: u64 = rand::rng().random();
    eprintln!("ext4 test seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut files = Vec::new();
    {
        let mut a = Attached::new(&n.uri(), work.path());
        run_ok(Command::new("mkfs.ext4").args(["-F", "-q"]).arg(a.dev()), T);
        a.mount(&mnt);
        std::fs::create_dir_all(mnt.join("dir/sub")).expect("mkdir");
        for i in 0..24 {
            let len = rng.random_range(1..2 * MIB as usize);
            let mut data = vec![0u8; len];
            rng.fill_bytes(&mut data);
            let rel = if i % 3 == 0 { format!("dir/sub/f{i}") } else { format!("f{i}") };
            std::fs::write(mnt.join(&rel), &data).expect("write file");
            files.push((rel, crc32c::crc32c(&data), len));
        }
        run_ok(Command::new("sync").arg("-f").arg(&mnt), T);
        a.detach();
    }
    let status = n.term();
    assert!(status.success(), "clean stop: {status}");
    n.restart_primary();
    {
        let mut a = Attached::new(&n.uri(), work.path());
        let fsck = run_timeout(Command::new("e2fsck").args(["-f", "-n"]).arg(a.dev()), T);
        assert!(
            fsck.status.success(),
            "e2fsck found problems:\n{}{}",
            String::from_utf8_lossy(&fsck.stdout),
            String::from_utf8_lossy(&fsck.stderr)
        );
        a.mount(&mnt);
        for (rel, crc, len) in &files {
            let data = std::fs::read(mnt.join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"));
            assert_eq!(data.len(), *len, "{rel} length");
            assert_eq!(crc32c::crc32c(&data), *crc, "{rel} content");
        }
        a.detach();
    }
}

/// `disk = "/dev/loopN"`: the data lives on a block device (as an LVM
/// volume or a partition would hold it), the WAL and metadata in `dir`.
fn data_on_a_block_device(engine: &str) {
    require_tool("losetup", "util-linux");
    require_tool("nbdcopy", "libnbd-bin");
    let work = tempfile::Builder::new().prefix("repblock-disk-").tempdir().expect("tmp");
    let backing = work.path().join("backing.img");
    std::fs::File::create(&backing).and_then(|f| f.set_len(64 * MIB)).expect("backing file");
    let out = run_ok(Command::new("losetup").args(["-f", "--show"]).arg(&backing), Duration::from_secs(60));
    let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
    struct Loop(String);
    impl Drop for Loop {
        fn drop(&mut self) {
            let _ = run_timeout(Command::new("losetup").arg("-d").arg(&self.0), Duration::from_secs(60));
        }
    }
    let _loop = Loop(dev.clone());
    let mut opts = NodeOpts::new(engine);
    opts.disk = Some(dev.clone());
    let mut n = TestNode::ready_with(opts);
    assert!(!n.data_dir().join("data").exists(), "no data file when `disk` is set");
    let img = random_file(n.path(), "in.img", 64 * MIB as usize, 77);
    run_ok(Command::new("nbdcopy").arg(&img).arg(n.uri()), T);
    assert!(n.term().success());
    // After a clean stop the block device itself holds the data.
    let on_dev = std::fs::read(&dev).expect("read the block device");
    assert!(on_dev == std::fs::read(&img).expect("read in.img"), "the block device holds the volume's data");
    n.restart_primary();
    let out = n.path().join("out.img");
    run_ok(Command::new("nbdcopy").arg(n.uri()).arg(&out), T);
    assert!(std::fs::read(&out).expect("out") == std::fs::read(&img).expect("in"), "round trip through the device");
}

both_engines! {
    data_on_a_loop_block_device => data_on_a_block_device;
    nbdinfo_reports_flags_and_size => nbdinfo_flags_and_size;
    unix_socket_export_works => unix_socket_export;
    qemu_img_convert_then_compare => qemu_img_convert_and_compare;
    nbdcopy_in_and_out => nbdcopy_round_trip;
    fio_nbd_engine_verify_crc32c => fio_verify;
    ext4_on_nbdfuse_loop_survives_restart => ext4_over_nbdfuse_survives_restart;
}
