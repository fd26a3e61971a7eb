//! Both copies are byte-identical after real workloads (nbdcopy, fio's nbd
//! engine with fsyncs, trims and write-zeroes) under each protocol: the
//! volume is read through alpha, then alpha is demoted and beta promoted and
//! the volume is read through beta; the checksums of every 64 KiB must match.

mod common;

use std::process::Command;
use std::time::Duration;

use common::pair::{MIB, Pair, PairOpts, assert_same_checksums, checksums};
use common::{random_file, require_tool, run_ok};

const CHUNK: u32 = 64 * 1024;
const T: Duration = Duration::from_secs(120);

/// Demotes alpha, promotes beta (no --force: beta is uptodate), and returns
/// the checksums read through beta.
fn failover_read(pair: &Pair) -> Vec<u32> {
    // The clients are gone (the server may take a moment to notice).
    pair.alpha.wait_status("no NBD client", Duration::from_secs(10), |s| s["nbd"]["clients"] == 0);
    pair.alpha.repctl_ok(&["demote"]);
    pair.beta.wait_status("peer alpha secondary", Duration::from_secs(10), |s| s["peer"]["role"] == "secondary");
    pair.beta.repctl_ok(&["promote"]);
    let b = pair.beta.status();
    assert_eq!(b["role"], "primary", "{b:#}");
    assert_eq!(b["disk"], "uptodate", "{b:#}");
    pair.rt.block_on(async {
        let c = pair.beta.nbd().await;
        let sums = checksums(&c, pair.size, CHUNK).await;
        c.disconnect().await.expect("disconnect");
        sums
    })
}

fn fio_randwrite(uri: &str, dir: &std::path::Path) {
    require_tool("fio", "fio");
    let out = run_ok(
        Command::new("fio")
            .args([
                "--name=repl",
                "--ioengine=nbd",
                &format!("--uri={uri}"),
                "--rw=randwrite",
                "--bsrange=4k-128k",
                "--bs_unaligned=0",
                "--iodepth=16",
                "--numjobs=2",
                "--size=16m",
                "--offset_increment=24m",
                "--fsync=32",
                "--randrepeat=0",
                "--output-format=json",
            ])
            .current_dir(dir),
        T,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json_start = stdout.find('{').unwrap_or_else(|| panic!("fio printed no JSON:\n{stdout}"));
    let v: serde_json::Value = serde_json::from_str(&stdout[json_start..]).expect("fio JSON");
    for job in v["jobs"].as_array().expect("fio jobs") {
        assert_eq!(job["error"], 0, "fio job error: {job}");
        assert!(job["write"]["io_bytes"].as_u64().unwrap_or(0) >= 16 * MIB, "each fio job wrote its 16 MiB: {job}");
    }
}

fn identical_after_workload(protocol: &str) {
    require_tool("nbdcopy", "libnbd-bin");
    let pair = Pair::up(PairOpts::new(protocol));
    // Fill the whole volume with random data, then random writes with
    // fsyncs over it, then trims and write-zeroes.
    let img = random_file(pair.dir.path(), "fill.img", pair.size as usize, 0x5eed ^ protocol.as_bytes()[0] as u64);
    run_ok(Command::new("nbdcopy").arg(&img).arg(pair.alpha.uri()), T);
    std::fs::remove_file(&img).expect("remove image");
    fio_randwrite(&pair.alpha.uri(), pair.dir.path());
    let alpha_sums = pair.rt.block_on(async {
        let c = pair.alpha.nbd().await;
        for i in 0..16u64 {
            c.trim(50 * MIB + i * 256 * 1024, 64 * 1024, false).await.expect("trim");
            c.write_zeroes(54 * MIB + i * 256 * 1024, 128 * 1024, i % 2 == 0, false).await.expect("write zeroes");
        }
        // Unflushed writes at the end: demote must still carry them over.
        for i in 0..64u64 {
            c.write(60 * MIB + i * 8192, &[i as u8 + 1; 8192], false).await.expect("write");
        }
        let sums = checksums(&c, pair.size, CHUNK).await;
        c.disconnect().await.expect("disconnect");
        sums
    });
    let a = pair.alpha.status();
    assert_eq!(a["connection"], "connected", "the link stayed up during the workload\n{a:#}");
    assert_eq!(a["replication"], "established", "{a:#}");
    let beta_sums = failover_read(&pair);
    assert_same_checksums(&format!("protocol {protocol}: alpha's copy vs beta's copy"), &alpha_sums, &beta_sums, CHUNK);
}

#[test]
fn identical_after_workload_protocol_a() {
    identical_after_workload("A");
}

#[test]
fn identical_after_workload_protocol_b() {
    identical_after_workload("B");
}

#[test]
fn identical_after_workload_protocol_c() {
    identical_after_workload("C");
}

/// Application writes made during the initial full sync (slowed down by the
/// proxy's rate cap) end up on beta too: the newest content wins.
#[test]
fn writes_during_the_initial_sync_reach_the_peer() {
    let mut pair = Pair::new(PairOpts::new("C").proxied());
    pair.proxies().set_rate(Some(16 * MIB));
    pair.start_both();
    pair.alpha.repctl_ok(&["promote", "--force"]);
    pair.beta.wait_status("sync-target", Duration::from_secs(20), |s| s["replication"] == "sync-target");
    let alpha_sums = pair.rt.block_on(async {
        let c = pair.alpha.nbd().await;
        // Every 512 KiB, front to back and back to front, all in flight at
        // once while the sync runs.
        let t = std::time::Instant::now();
        let writes: Vec<_> = (0..64u64)
            .map(|i| {
                let c = c.clone();
                let off = if i % 2 == 0 { i * 512 * 1024 } else { pair.size - (i + 1) * 512 * 1024 };
                tokio::spawn(async move { c.write(off, &vec![(i as u8) | 0x80; 64 * 1024], false).await })
            })
            .collect();
        for w in writes {
            w.await.expect("task").expect("write during the sync");
        }
        c.flush().await.expect("flush");
        eprintln!("64 writes + flush during the sync took {:?}", t.elapsed());
        let sums = checksums(&c, pair.size, CHUNK).await;
        c.disconnect().await.expect("disconnect");
        sums
    });
    let b = pair.beta.status();
    assert_eq!(b["replication"], "sync-target", "the writes were meant to overlap the sync; it ended too early\n{b:#}");
    pair.proxies().set_rate(None);
    pair.beta.wait_sync(60);
    pair.assert_established();
    let beta_sums = failover_read(&pair);
    assert_same_checksums("writes during the initial sync: alpha vs beta", &alpha_sums, &beta_sums, CHUNK);
}
