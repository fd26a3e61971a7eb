//! The load generator against an in-process NBD server on repblock's
//! in-memory backend: what it sends (writes, flushes, FUA, reads, offsets
//! inside the region), what it records, that requests are pipelined, and
//! that a server error fails the run with a message naming the request.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use repbench::loadgen::{LoadError, Plan, run_nbd};
use repbench::workload::{FlushMode, builtin};
use repblock::nbd::memory::Op;
use repblock::nbd::{BlockError, ListenAddr, MemoryBackend, NbdHandle, NbdServer, ServerConfig};

const MIB: u64 = 1 << 20;

async fn server(size: u64) -> (Arc<MemoryBackend>, NbdHandle) {
    let backend = Arc::new(MemoryBackend::new(size));
    let any = ListenAddr::Tcp(([127, 0, 0, 1], 0).into());
    let h = NbdServer::start(&any, backend.clone(), ServerConfig::new("r0")).await.expect("start NBD server");
    (backend, h)
}

fn ops_plan(ops: u64, region: u64) -> Plan {
    Plan { warmup: Duration::ZERO, duration: Duration::ZERO, ops: Some(ops), region, seed: 3 }
}

#[tokio::test]
async fn writes_with_flush_land_inside_the_region_and_every_op_is_recorded() {
    let (backend, h) = server(4 * MIB).await;
    let wl = builtin("qd1-write-flush").expect("workload");
    let m = run_nbd(&h.listen_addr(), "r0", &wl, &ops_plan(200, MIB)).await.expect("run");
    assert_eq!(m.ops, 200);
    assert_eq!(m.hist.len(), 200, "one latency per operation");
    assert_eq!(m.bytes, 200 * 4096);
    let c = backend.counters();
    assert_eq!(c.writes.load(Ordering::Relaxed), 200, "QD1: exactly the requested writes");
    assert_eq!(c.flushes.load(Ordering::Relaxed), 200, "a FLUSH after every write");
    assert_eq!(c.reads.load(Ordering::Relaxed), 0);
    assert_eq!(c.fua.load(Ordering::Relaxed), 0);
    assert!(backend.snapshot(0, MIB as usize).iter().any(|&b| b != 0), "data written in the region");
    assert!(backend.snapshot(MIB, 3 * MIB as usize).iter().all(|&b| b == 0), "nothing written beyond the region");
    h.shutdown().await;
}

#[tokio::test]
async fn fua_writes_carry_the_flag_and_mixed_reads_are_sent() {
    let (backend, h) = server(MIB).await;
    let mut wl = builtin("qd1-write").expect("workload");
    wl.flush = FlushMode::Fua;
    run_nbd(&h.listen_addr(), "r0", &wl, &ops_plan(50, MIB)).await.expect("fua run");
    let c = backend.counters();
    assert_eq!((c.writes.load(Ordering::Relaxed), c.fua.load(Ordering::Relaxed)), (50, 50));
    assert_eq!(c.flushes.load(Ordering::Relaxed), 0);

    let mixed = builtin("mixed-70-30").expect("workload");
    let m = run_nbd(&h.listen_addr(), "r0", &mixed, &ops_plan(1000, MIB)).await.expect("mixed run");
    assert_eq!(m.ops, 1000);
    let reads = c.reads.load(Ordering::Relaxed);
    let writes = c.writes.load(Ordering::Relaxed) - 50;
    // 70% reads, seeded: far from both 0% and 100% whatever the seed.
    assert!(reads > 500 && writes > 150, "{reads} reads, {writes} writes");
    h.shutdown().await;
}

#[tokio::test]
async fn requests_are_pipelined_and_latency_includes_the_server_time() {
    let (backend, h) = server(MIB).await;
    backend.set_delay(Duration::from_millis(20));
    let wl = builtin("qd32-randwrite").expect("workload");
    let m = run_nbd(&h.listen_addr(), "r0", &wl, &ops_plan(320, MIB)).await.expect("run");
    assert_eq!(m.ops, 320);
    // Every request waited at least the backend's 20 ms.
    assert!(m.hist.min() >= 20_000_000, "min latency {} ns", m.hist.min());
    // 320 requests one at a time would take 6.4 s; 32 in flight take ~0.2 s.
    assert!(m.window < Duration::from_millis(3200), "not pipelined: {:?}", m.window);
    h.shutdown().await;
}

#[tokio::test]
async fn a_server_error_fails_the_run_naming_the_request() {
    let (backend, h) = server(MIB).await;
    backend.fail_with(Op::Flush, BlockError::Io("disk on fire".into()));
    let wl = builtin("qd1-write-flush").expect("workload");
    let e = run_nbd(&h.listen_addr(), "r0", &wl, &ops_plan(10, MIB)).await.expect_err("must fail");
    assert!(matches!(e, LoadError::Nbd { op: "FLUSH", .. }), "{e}");
    let region = run_nbd(&h.listen_addr(), "r0", &wl, &ops_plan(10, 2 * MIB)).await.expect_err("region too big");
    assert!(matches!(region, LoadError::Region { .. }), "{region}");
    let unknown = run_nbd(&h.listen_addr(), "nope", &wl, &ops_plan(10, MIB)).await.expect_err("unknown export");
    assert!(matches!(unknown, LoadError::Connect { .. }), "{unknown}");
    h.shutdown().await;
}
