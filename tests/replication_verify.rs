//! Online verify with real `repd` processes (issue 4): `repctl verify`
//! under a concurrent fio workload finds nothing on a healthy pair (no false
//! positive: the digests travel in the replication stream, ordered with the
//! writes), and finds blocks corrupted behind repd's back in the secondary's
//! data file, which the resync after it repairs.

mod common;

use std::io::{Seek, SeekFrom, Write};
use std::process::Command;
use std::time::Duration;

use common::pair::{MIB, Pair, PairOpts, assert_same_checksums, checksums};
use common::{random_file, require_tool, run_ok};

const CHUNK: u32 = 64 * 1024;
const T: Duration = Duration::from_secs(120);

/// A replicating pair: alpha promoted (--force) before beta starts, then
/// the initial full sync.
fn up() -> Pair {
    let mut pair = Pair::new(PairOpts::new("C"));
    pair.alpha.create_md();
    pair.beta.create_md();
    pair.alpha.start();
    pair.alpha.repctl_ok(&["promote", "--force"]);
    pair.beta.start();
    pair.beta.wait_sync(90);
    pair.assert_established();
    pair
}

/// fio's nbd engine writing random 4k-64k blocks to alpha at QD8 for
/// `runtime_s` seconds (an fsync every 64 writes); join for its output.
fn spawn_fio(pair: &Pair, name: &str, size: &str, runtime_s: u32) -> std::thread::JoinHandle<std::process::Output> {
    let mut cmd = Command::new("fio");
    cmd.args([
        &format!("--name={name}"),
        "--ioengine=nbd",
        &format!("--uri={}", pair.alpha.uri()),
        "--rw=randwrite",
        "--bsrange=4k-64k",
        "--iodepth=8",
        &format!("--size={size}"),
        "--time_based",
        &format!("--runtime={runtime_s}"),
        "--fsync=64",
        "--randrepeat=0",
        "--output-format=json",
    ])
    .current_dir(pair.dir.path());
    std::thread::spawn(move || run_ok(&mut cmd, T))
}

#[test]
fn verify_under_fio_finds_nothing_on_a_healthy_pair() {
    require_tool("fio", "fio");
    let pair = up();
    let fio = spawn_fio(&pair, "verify-load", "48m", 8);
    // Let the workload start, then verify twice while it runs.
    pair.alpha.wait_status("fio attached", Duration::from_secs(20), |s| s["nbd"]["clients"] != 0);
    let lsn_before = pair.alpha.status()["lsn"]["local"].as_u64().unwrap_or(0);
    let mut reports = Vec::new();
    for node in ["alpha", "beta"] {
        reports.push(pair.verify_wait(node));
    }
    let lsn_after = pair.alpha.status()["lsn"]["local"].as_u64().unwrap_or(0);
    let out = fio.join().expect("fio thread");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("\"error\" : 0"), "fio failed:\n{stdout}");
    assert!(lsn_after > lsn_before + 100, "the writes went on during the verifies (LSN {lsn_before} -> {lsn_after})");
    for r in &reports {
        assert_eq!(r["complete"], true, "{r}");
        assert_eq!(r["checked_bytes"].as_u64(), Some(pair.size), "{r}");
        assert_eq!(r["out_of_sync_bytes"], 0, "false positive under concurrent writes: {r}");
    }
    for p in [&pair.alpha, &pair.beta] {
        let s = p.status();
        assert_eq!(s["verify"]["running"], false, "{s:#}");
        let runs = s["verify"]["runs_finished"].as_u64().unwrap_or(0);
        assert!(runs >= 2, "{}: both verifies ended here too\n{s:#}", p.name);
        assert_eq!(s["verify"]["last"]["out_of_sync_bytes"], 0, "{s:#}");
    }
    pair.assert_established();
}

#[test]
fn verify_finds_blocks_corrupted_on_the_secondary_and_the_resync_repairs_them() {
    require_tool("nbdcopy", "libnbd-bin");
    let pair = up();
    let img = random_file(pair.dir.path(), "fill.img", pair.size as usize, 0xC0FFEE);
    run_ok(Command::new("nbdcopy").arg(&img).arg(pair.alpha.uri()), T);
    std::fs::remove_file(&img).expect("remove image");
    pair.beta.wait_status("beta caught up", Duration::from_secs(30), |s| {
        s["lsn"]["local"] == pair.alpha.status()["lsn"]["local"]
    });
    let clean = pair.verify_wait("alpha");
    assert_eq!(clean["out_of_sync_bytes"], 0, "{clean}");
    let human = pair.beta.repctl_ok(&["status"]);
    assert!(human.contains("last-verify:done"), "the human status shows the last verify:\n{human}");
    let refused = pair.alpha.repctl_refused(&["invalidate"]);
    assert!(refused.contains("demote"), "invalidate on the primary says what to do: {refused}");

    // Corrupt beta's data file behind repd's back: 3 scattered 4 KiB blocks
    // (one of them two blocks wide).
    let data = pair.beta.data_dir().join("data");
    let mut f = std::fs::OpenOptions::new().write(true).open(&data).expect("open beta's data file");
    for (off, len) in [(5 * MIB + 4096, 8192usize), (20 * MIB, 100), (pair.size - 4096, 4096)] {
        f.seek(SeekFrom::Start(off)).expect("seek");
        f.write_all(&vec![0xA5; len]).expect("corrupt");
    }
    f.sync_all().expect("sync");
    drop(f);

    // Asked on the secondary: the primary runs it.
    let found = pair.verify_wait("beta");
    assert_eq!(found["complete"], true, "{found}");
    assert_eq!(found["out_of_sync_bytes"].as_u64(), Some(4 * 4096), "two + one + one blocks differ: {found}");
    let a = pair.alpha.status();
    assert_eq!(a["verify"]["last"]["out_of_sync_bytes"].as_u64(), Some(4 * 4096), "{a:#}");

    // The link is renegotiated and a bitmap resync moves the marked blocks
    // (and nothing else).
    pair.beta.wait_sync(90);
    pair.assert_established();
    let b = pair.beta.wait_status("the resync recorded", Duration::from_secs(10), |s| s["last_sync"].is_object());
    assert_eq!(b["last_sync"]["kind"], "bitmap", "{b:#}");
    assert!(b["last_sync"]["bytes"].as_u64().is_some_and(|n| (4 * 4096..=MIB).contains(&n)), "{b:#}");
    let again = pair.verify_wait("alpha");
    assert_eq!(again["out_of_sync_bytes"], 0, "the resync repaired the blocks: {again}");
    // And independently of verify: beta's data file holds alpha's data.
    let a_sums = pair.rt.block_on(async {
        let c = pair.alpha.nbd().await;
        let a = checksums(&c, pair.size, CHUNK).await;
        c.disconnect().await.expect("disconnect");
        a
    });
    let beta_data = std::fs::read(&data).expect("read beta's data file");
    let b_sums: Vec<u32> = beta_data[..pair.size as usize].chunks(CHUNK as usize).map(crc32c::crc32c).collect();
    assert_same_checksums("alpha's copy vs beta's data file after the resync", &a_sums, &b_sums, CHUNK);
}

/// (T) Detection and no false positive at once: 5 blocks of beta's data
/// file are damaged behind repd's back in the upper quarter of the volume
/// while fio writes the lower half; a verify run during the load reports
/// exactly those 5 blocks, the resync after it repairs them, and the data
/// files end identical (compared after a clean stop).
#[test]
fn verify_under_fio_finds_exactly_the_corrupted_blocks_t() {
    use common::resync::{data_file, stop_and_compare};
    use std::os::unix::fs::FileExt;
    require_tool("fio", "fio");
    let mut pair = Pair::up_blank(PairOpts::new("C"));
    let upper = 48 * MIB;
    pair.rt.block_on(async {
        let c = pair.alpha.nbd().await;
        for i in 0..16u64 {
            let data: Vec<u8> = (0..MIB).map(|j| (j.wrapping_mul(31) ^ i.wrapping_mul(7)) as u8 | 1).collect();
            c.write(upper + i * MIB, &data, false).await.expect("fill the upper quarter");
        }
        c.flush().await.expect("flush");
        c.disconnect().await.expect("disconnect");
    });
    let local = pair.alpha.status()["lsn"]["local"].as_u64().unwrap_or(0);
    pair.beta.wait_status("beta caught up", Duration::from_secs(30), |s| s["lsn"]["local"].as_u64() >= Some(local));
    let damaged: Vec<u64> = (0..5u64).map(|i| upper + i * 3 * MIB + 4096 * (i + 1)).collect();
    {
        let f = std::fs::OpenOptions::new().write(true).open(data_file(&pair.beta)).expect("open beta's data file");
        for &off in &damaged {
            f.write_all_at(&[0x5a; 4096], off).expect("damage beta's data file");
        }
        f.sync_all().expect("fsync");
    }
    let fio = spawn_fio(&pair, "verify-load-t", "32m", 6);
    pair.alpha.wait_status("fio attached", Duration::from_secs(20), |s| s["nbd"]["clients"] != 0);
    let lsn_before = pair.alpha.status()["lsn"]["local"].as_u64().unwrap_or(0);
    let report = pair.verify_wait("alpha");
    let lsn_after = pair.alpha.status()["lsn"]["local"].as_u64().unwrap_or(0);
    let out = fio.join().expect("fio thread");
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"error\" : 0"), "fio failed");
    eprintln!("verify under fio with 5 damaged blocks: {report}; LSN {lsn_before} -> {lsn_after} during it");
    assert!(lsn_after > lsn_before + 50, "the writes went on during the verify (LSN {lsn_before} -> {lsn_after})");
    assert_eq!(report["complete"], true, "{report}");
    assert_eq!(
        report["out_of_sync_bytes"].as_u64(),
        Some(damaged.len() as u64 * 4096),
        "the verify must find exactly the 5 damaged blocks, no false positive from fio's writes: {report}"
    );
    pair.alpha.wait_status("no NBD client", Duration::from_secs(10), |s| s["nbd"]["clients"] == 0);
    pair.beta.wait_sync(60);
    pair.assert_established();
    stop_and_compare(&mut pair, "verify under fio, after the repair");
}
