//! A volume whose filesystem fills up: a real repd with its node directory
//! on a small tmpfs, real NBD clients (nbdcopy, then the crate's own client)
//! writing more than fits. The clients see ENOSPC, not EIO (the fail-stop
//! carries its kind), and `repctl status` names the failure as for any
//! other fail-stop. Needs root (mount); `scripts/test.sh` runs as root.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{NodeOpts, TestNode, require_tool, run_timeout};
use repblock::nbd::proto::NBD_ENOSPC;
use repblock::nbd::{ClientError, ListenAddr, NbdClient};

/// A tmpfs of `size` mounted at `at` for the test's length; lazily
/// unmounted on drop (repd may still hold files there until it is killed).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).expect("mount point");
        let out = run_timeout(
            Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(at),
            Duration::from_secs(30),
        );
        assert!(
            out.status.success(),
            "mount -t tmpfs (this test needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = run_timeout(Command::new("umount").arg("-l").arg(&self.0), Duration::from_secs(30));
    }
}

fn full_filesystem_answers_enospc(engine: &str) {
    require_tool("nbdcopy", "libnbd-bin");
    let mut opts = NodeOpts::new(engine);
    // A 64MiB volume (sparse data file) over 16MiB of tmpfs: the metadata
    // and a few 1MiB WAL segments fit, the data does not.
    opts.size = "64MiB".into();
    opts.extra = "wal_segment_size = \"1MiB\"\ncheckpoint_bytes = \"4MiB\"\n".into();
    let mut n = TestNode::with(opts);
    // Dropped before `n` (reverse order): the tmpfs is detached first
    // (lazily: repd still holds files there), then repd is killed and the
    // temporary directory, its mount point empty again, removed.
    let _tmpfs = Tmpfs::mount(&n.data_dir(), "16m");
    n.create_md();
    n.start();
    n.promote_force();

    // A user copies 32MiB onto the export: nbdcopy fails, saying why.
    let src = common::random_file(n.path(), "src.img", 32 << 20, 7);
    let out = run_timeout(Command::new("nbdcopy").arg(&src).arg(n.uri()), Duration::from_secs(120));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "32MiB fit in 16MiB? {stderr}");
    assert!(stderr.contains("No space left on device"), "nbdcopy: {stderr}\n{}", n.logs_text());

    // The volume stopped (fail-stop) for lack of space; every later write
    // and flush says so to the client: ENOSPC, not EIO.
    let s = n.status();
    let reason = s["failed"].as_str().unwrap_or_else(|| panic!("status shows the failure: {s}")).to_string();
    assert!(reason.contains("No space left on device") && reason.contains("(errno 28)"), "{reason}");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        let addr: ListenAddr = format!("127.0.0.1:{}", n.port).parse().expect("listen addr");
        let client = NbdClient::connect(&addr, "r0").await.expect("connect");
        let e = client.write(0, &[0x5a; 4096], false).await.expect_err("writes fail after the fail-stop");
        assert!(matches!(e, ClientError::Nbd { errno: NBD_ENOSPC }), "ENOSPC expected, got {e}");
        let e = client.flush().await.expect_err("flushes fail after the fail-stop");
        assert!(matches!(e, ClientError::Nbd { errno: NBD_ENOSPC }), "ENOSPC expected, got {e}");
        client.read(0, 4096).await.expect("reads go on");
    });

    // repctl shows the reason as for any fail-stop.
    let human = n.repctl_ok(&["status"]);
    assert!(human.contains(&format!("FAILED: {reason}")), "{human}");
    let json: serde_json::Value = serde_json::from_str(&n.repctl_ok(&["status", "--json"])).expect("status --json");
    assert_eq!(json["failed"], reason);
}

both_engines! {
    a_full_filesystem_answers_enospc_and_status_says_why => full_filesystem_answers_enospc;
}
