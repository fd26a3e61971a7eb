//! Engine tests: two engines over loopback TCP with in-memory stores (and a
//! scripted fake peer for the heartbeat), proving the §2 gate per
//! protocol, the full sync, peer loss handling and refusals.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::broadcast;

use super::engine::{Durability, Engine, EngineConfig, LastSync};
use super::store::ReplStore;
use super::testing::{MemStore, established, pattern, until};
use crate::model::{ConnState, DiskState, OnPeerLoss, Protocol, ReplState, ResyncKind, Role};

const SIZE: usize = 4 << 20;

fn free_port() -> u16 {
    crate::ports::unused_local_port().expect("a free port")
}

fn cfg(node: &str, peer: &str, listen: u16, peer_port: u16, protocol: Protocol) -> EngineConfig {
    EngineConfig {
        resource: "r0".into(),
        node: node.into(),
        peer: peer.into(),
        listen: format!("127.0.0.1:{listen}"),
        peer_addr: format!("127.0.0.1:{peer_port}"),
        secret: b"s3cret".to_vec(),
        protocol,
        block_size: 4096,
        ping_interval: Duration::from_millis(100),
        ping_timeout: Duration::from_millis(200),
        connect_retry: Duration::from_millis(20),
        max_connect_retry: Duration::from_millis(200),
        max_buffer: 64 << 20,
        on_peer_loss: OnPeerLoss::Continue,
        resync_rate: None,
        split_brain: Default::default(),
        tls: None,
        before_resync_target: None,
    }
}

struct Pair {
    alpha: Arc<Engine>,
    beta: Arc<Engine>,
    a: Arc<MemStore>,
    b: Arc<MemStore>,
}

/// alpha primary (uptodate, generation 7), beta secondary (fresh,
/// inconsistent); `tweak` adjusts both configs before the start.
async fn pair(protocol: Protocol, tweak: impl Fn(&mut EngineConfig)) -> Pair {
    pair_with(protocol, tweak, DiskState::UpToDate, Role::Primary).await
}

async fn pair_with(
    protocol: Protocol,
    tweak: impl Fn(&mut EngineConfig),
    alpha_disk: DiskState,
    alpha_role: Role,
) -> Pair {
    let (pa, pb) = (free_port(), free_port());
    let mut ca = cfg("alpha", "beta", pa, pb, protocol);
    let mut cb = cfg("beta", "alpha", pb, pa, protocol);
    tweak(&mut ca);
    tweak(&mut cb);
    let a = MemStore::new(SIZE, alpha_disk, 7);
    let b = MemStore::new(SIZE, DiskState::Inconsistent, 0);
    let alpha = Engine::new(ca, a.clone(), alpha_role, broadcast::channel(64).0);
    let beta = Engine::new(cb, b.clone(), Role::Secondary, broadcast::channel(64).0);
    alpha.start().await.expect("alpha starts");
    beta.start().await.expect("beta starts");
    Pair { alpha, beta, a, b }
}

async fn in_sync(p: &Pair) {
    until("alpha established with an uptodate peer", Duration::from_secs(10), || established(&p.alpha)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_sync_then_streaming_make_identical_copies() {
    let p = pair(Protocol::C, |_| {}).await;
    // Written before the peer connects: reaches it through the full sync.
    for i in 0..16 {
        p.a.write(i * 64 * 1024, &pattern(i as u8, 8192), false);
    }
    in_sync(&p).await;
    assert_eq!(p.b.meta().disk, DiskState::UpToDate);
    assert_eq!(p.b.meta().gen_ids.current, p.a.meta().gen_ids.current, "the target takes the source's generation");
    // Streamed after the sync.
    let mut last = 0;
    for i in 0..64usize {
        let lsn = p.a.write((i * 12_288) % (SIZE - 8192), &pattern(100 + i as u8, 8192), i % 7 == 1);
        p.alpha.gate().wait(lsn, Durability::Write).await;
        last = lsn;
    }
    let upto = p.a.flush_primary();
    assert_eq!(upto, last);
    p.alpha.gate().wait(upto, Durability::Flush).await;
    let acks = p.alpha.view().acks;
    assert!(acks.durable >= upto, "{acks:?}");
    assert!(p.b.data() == p.a.data(), "secondary copy differs from the primary's");
    assert!(p.b.flushes() >= 1, "the barrier made the secondary flush");
}

async fn timed_wait(p: &Pair, lsn: u64, d: Durability) -> Duration {
    let t = Instant::now();
    p.alpha.gate().wait(lsn, d).await;
    t.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_c_waits_for_written_and_durable() {
    let p = pair(Protocol::C, |_| {}).await;
    in_sync(&p).await;
    p.b.set_apply_delay(Duration::from_millis(300));
    let lsn = p.a.write(0, &pattern(1, 4096), false);
    assert!(
        timed_wait(&p, lsn, Durability::Write).await >= Duration::from_millis(250),
        "C: a write waits for the peer's apply"
    );
    p.b.set_apply_delay(Duration::ZERO);
    p.b.set_flush_delay(Duration::from_millis(300));
    let lsn = p.a.write(4096, &pattern(2, 4096), false);
    let w = timed_wait(&p, lsn, Durability::Write).await;
    assert!(w < Duration::from_millis(250), "C: a plain write does not wait for the peer's fdatasync ({w:?})");
    let upto = p.a.flush_primary();
    assert!(
        timed_wait(&p, upto, Durability::Flush).await >= Duration::from_millis(250),
        "C: a FLUSH waits for the peer's fdatasync"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_b_waits_for_received_only() {
    let p = pair(Protocol::B, |_| {}).await;
    in_sync(&p).await;
    p.b.set_apply_delay(Duration::from_millis(400));
    p.b.set_flush_delay(Duration::from_millis(400));
    let lsn = p.a.write(0, &pattern(1, 4096), false);
    let w = timed_wait(&p, lsn, Durability::Write).await;
    assert!(w < Duration::from_millis(300), "B: a write waits for receipt, not for the apply ({w:?})");
    assert!(p.alpha.view().acks.received >= lsn);
    let upto = p.a.flush_primary();
    let f = timed_wait(&p, upto, Durability::Flush).await;
    assert!(f < Duration::from_millis(300), "B: a FLUSH waits for receipt only ({f:?})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_a_never_waits_for_the_peer() {
    let p = pair(Protocol::A, |_| {}).await;
    in_sync(&p).await;
    p.beta.disconnect();
    until("alpha connecting", Duration::from_secs(5), || p.alpha.view().connection != ConnState::Connected).await;
    // Even with the peer connected but slow, nothing waits.
    p.beta.connect(false);
    in_sync(&p).await;
    p.b.set_apply_delay(Duration::from_secs(5));
    let lsn = p.a.write(0, &pattern(1, 4096), true);
    assert!(timed_wait(&p, lsn, Durability::Flush).await < Duration::from_millis(50));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_loss_releases_waiting_replies_and_reconnect_resyncs() {
    let p = pair(Protocol::C, |_| {}).await;
    in_sync(&p).await;
    p.b.set_apply_delay(Duration::from_secs(30));
    let lsn = p.a.write(0, &pattern(9, 4096), false);
    let alpha = p.alpha.clone();
    let waiter = tokio::spawn(async move { alpha.gate().wait(lsn, Durability::Write).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!waiter.is_finished(), "the write waits for the slow peer");
    p.beta.disconnect();
    tokio::time::timeout(Duration::from_secs(2), waiter).await.expect("released at peer loss").expect("waiter task");
    // The write the peer never wrote started a new generation at the peer
    // loss, before its reply was released (issue 4; issue 3 waited for the
    // next write): the old current became the bitmap generation.
    assert!(p.alpha.diverged());
    let meta = p.a.meta();
    assert_eq!(meta.gen_ids.bitmap, 7, "{meta:?}");
    assert_ne!(meta.gen_ids.current, 7);
    assert!(p.a.is_dirty(0), "the unacked write is marked");
    p.alpha.gate().before_write().await.expect("before_write");
    assert_eq!(p.a.meta(), meta, "once per divergence");
    p.a.write(8192, &pattern(10, 4096), false);
    p.b.set_apply_delay(Duration::ZERO);
    // The waiter is released before alpha's view leaves the old session
    // (acks off, then `connecting`): without this wait, `in_sync` could
    // see the old session's state and return before the resync.
    until("alpha saw the session end", Duration::from_secs(5), || !established(&p.alpha)).await;
    p.beta.connect(false);
    in_sync(&p).await;
    let upto = p.a.flush_primary();
    p.alpha.gate().wait(upto, Durability::Flush).await;
    assert!(p.b.data() == p.a.data(), "resynced copy differs");
    assert_eq!(p.b.meta().gen_ids.current, p.a.meta().gen_ids.current);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspend_holds_writes_until_resume_io() {
    let p = pair(Protocol::C, |c| c.on_peer_loss = OnPeerLoss::Suspend).await;
    in_sync(&p).await;
    p.beta.disconnect();
    until("alpha suspended", Duration::from_secs(5), || p.alpha.view().suspended).await;
    let alpha = p.alpha.clone();
    let w = tokio::spawn(async move { alpha.gate().before_write().await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!w.is_finished(), "writes are held while suspended");
    assert!(p.alpha.gate().resume_io());
    tokio::time::timeout(Duration::from_secs(2), w).await.expect("released by resume-io").expect("task").expect("ok");
    assert!(!p.alpha.view().suspended);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspended_writes_resume_when_the_peer_is_back_in_sync() {
    let p = pair(Protocol::C, |c| c.on_peer_loss = OnPeerLoss::Suspend).await;
    in_sync(&p).await;
    p.beta.disconnect();
    until("alpha suspended", Duration::from_secs(5), || p.alpha.view().suspended).await;
    let alpha = p.alpha.clone();
    let w = tokio::spawn(async move { alpha.gate().before_write().await });
    p.beta.connect(false);
    tokio::time::timeout(Duration::from_secs(5), w)
        .await
        .expect("released once the peer is back")
        .expect("task")
        .expect("ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_secret_is_refused_with_the_reason() {
    let p = pair(Protocol::C, |c| {
        if c.node == "beta" {
            c.secret = b"other".to_vec();
        }
    })
    .await;
    until("a refusal is recorded", Duration::from_secs(5), || {
        p.alpha.view().last_error.is_some_and(|e| e.contains("wrong secret"))
    })
    .await;
    assert_eq!(p.alpha.view().connection, ConnState::Connecting);
    // The primary keeps working alone.
    let lsn = p.a.write(0, &pattern(3, 4096), false);
    assert!(timed_wait(&p, lsn, Durability::Flush).await < Duration::from_millis(50));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_primaries_go_standalone() {
    let _ = tracing_subscriber::fmt().with_test_writer().with_env_filter("repblock=debug").try_init();
    let p = pair(Protocol::C, |_| {}).await;
    in_sync(&p).await;
    p.beta.set_role(Role::Primary, Duration::ZERO).await;
    until("both standalone", Duration::from_secs(5), || {
        p.alpha.view().connection == ConnState::Standalone && p.beta.view().connection == ConnState::Standalone
    })
    .await;
    assert!(p.alpha.view().last_error.is_some_and(|e| e.contains("split brain")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_is_declared_lost_within_interval_plus_timeout() {
    use super::handshake::{LocalHello, handshake};
    use super::proto::Message;
    use crate::model::GenIds;
    let fake_port = free_port();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", fake_port)).await.expect("bind");
    let (pa, _) = (free_port(), ());
    let ca = cfg("alpha", "beta", pa, fake_port, Protocol::C);
    let a = MemStore::new(SIZE, DiskState::UpToDate, 7);
    let alpha = Engine::new(ca, a.clone(), Role::Primary, broadcast::channel(64).0);
    alpha.start().await.expect("alpha starts");
    // The fake beta: handshake, SyncInfo (same generation, nothing to sync), then silence (the socket stays open).
    let (mut sock, _) = listener.accept().await.expect("alpha dials");
    let hello = LocalHello {
        resource: "r0".into(),
        node: "beta".into(),
        peer: "alpha".into(),
        size: SIZE as u64,
        block_size: 4096,
        gen_ids: GenIds { current: 7, ..GenIds::default() },
        role: Role::Secondary,
        disk: DiskState::UpToDate,
        secret: b"s3cret".to_vec(),
    };
    handshake(&mut sock, &hello, Duration::from_secs(5)).await.expect("handshake");
    let mut buf = bytes::BytesMut::new();
    let info = super::proto::SyncInfo {
        role: Role::Secondary,
        disk: DiskState::UpToDate,
        granularity: a.bitmap_granularity(),
        flags: 0,
        gen_ids: GenIds { current: 7, ..GenIds::default() },
        gen_created_ms: 0,
        local_lsn: 0,
        dirty_bytes: 0,
        bitmap_base_lsn: 0,
        log_first_lsn: 1,
    };
    super::proto::encode(&Message::SyncInfo(Box::new(info)), &mut buf).expect("encode");
    tokio::io::AsyncWriteExt::write_all(&mut sock, &buf).await.expect("send ack");
    let silent_since = Instant::now();
    until("connected", Duration::from_secs(2), || alpha.view().connection == ConnState::Connected).await;
    until("peer declared lost", Duration::from_secs(3), || alpha.view().connection != ConnState::Connected).await;
    let took = silent_since.elapsed();
    assert!(took >= Duration::from_millis(250), "not before interval + timeout ({took:?})");
    assert!(took < Duration::from_millis(800), "within interval + timeout plus scheduling slack ({took:?})");
    drop(sock);
}

/// Issue 14: a peer that stays alive (it pings) but never acknowledges the
/// records it was sent (a record lost between the two logs) used to hang C
/// writes until a later record exposed the gap. The source ends the session
/// after `ack_stall` (10 x (interval + timeout): 3 s here), which releases
/// the waiting write and redials.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_the_peer_never_acknowledges_end_the_session() {
    use super::handshake::{LocalHello, handshake};
    use super::proto::Message;
    use crate::model::GenIds;
    let fake_port = free_port();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", fake_port)).await.expect("bind");
    let ca = cfg("alpha", "beta", free_port(), fake_port, Protocol::C);
    let stall = super::session::ack_stall(&ca);
    let a = MemStore::new(SIZE, DiskState::UpToDate, 7);
    let alpha = Engine::new(ca, a.clone(), Role::Primary, broadcast::channel(64).0);
    alpha.start().await.expect("alpha starts");
    let (mut sock, _) = listener.accept().await.expect("alpha dials");
    let hello = LocalHello {
        resource: "r0".into(),
        node: "beta".into(),
        peer: "alpha".into(),
        size: SIZE as u64,
        block_size: 4096,
        gen_ids: GenIds { current: 7, ..GenIds::default() },
        role: Role::Secondary,
        disk: DiskState::UpToDate,
        secret: b"s3cret".to_vec(),
    };
    handshake(&mut sock, &hello, Duration::from_secs(5)).await.expect("handshake");
    let info = super::proto::SyncInfo {
        role: Role::Secondary,
        disk: DiskState::UpToDate,
        granularity: a.bitmap_granularity(),
        flags: 0,
        gen_ids: GenIds { current: 7, ..GenIds::default() },
        gen_created_ms: 0,
        local_lsn: 0,
        dirty_bytes: 0,
        bitmap_base_lsn: 0,
        log_first_lsn: 1,
    };
    let mut buf = bytes::BytesMut::new();
    super::proto::encode(&Message::SyncInfo(Box::new(info)), &mut buf).expect("encode");
    // The fake beta pings every 50 ms (alive) and reads everything, but
    // never acknowledges a record.
    let fake = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        sock.write_all(&buf).await.expect("send SyncInfo");
        let (mut r, mut w) = sock.into_split();
        tokio::spawn(async move {
            let mut sink = vec![0u8; 1 << 16];
            while matches!(r.read(&mut sink).await, Ok(n) if n > 0) {}
        });
        for seq in 0u64.. {
            let mut ping = bytes::BytesMut::new();
            super::proto::encode(&Message::Ping { seq, sent_ns: 0 }, &mut ping).expect("encode ping");
            if w.write_all(&ping).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    until("connected", Duration::from_secs(3), || established(&alpha)).await;
    let lsn = a.write(0, &pattern(3, 4096), false);
    let sent_at = Instant::now();
    let waiter = {
        let alpha = alpha.clone();
        tokio::spawn(async move { alpha.gate().wait(lsn, Durability::Write).await })
    };
    tokio::time::sleep(stall / 2).await;
    assert!(!waiter.is_finished(), "the C write waits for the peer's ack");
    assert_eq!(alpha.view().connection, ConnState::Connected, "alive peer: not lost by silence");
    tokio::time::timeout(stall * 3, waiter).await.expect("released once the stall is detected").expect("waiter");
    let took = sent_at.elapsed();
    eprintln!("unacknowledged record detected after {took:?} (limit {stall:?})");
    assert!(took >= stall, "not before the limit ({took:?} < {stall:?})");
    assert!(a.is_dirty(0), "the unacknowledged write is marked for the next resync");
    fake.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn role_swap_while_connected_needs_no_sync() {
    let p = pair(Protocol::C, |_| {}).await;
    in_sync(&p).await;
    let lsn = p.a.write(0, &pattern(5, 4096), true);
    p.alpha.gate().wait(lsn, Durability::Flush).await;
    // alpha demotes, beta promotes: same generation, same log, no sync.
    p.alpha.set_role(Role::Secondary, Duration::from_secs(2)).await;
    assert!(!p.beta.peer_is_primary(Duration::from_secs(2)).await, "beta sees alpha demoted");
    p.beta.set_role(Role::Primary, Duration::from_secs(2)).await;
    until("beta established as source", Duration::from_secs(5), || established(&p.beta)).await;
    assert!(p.beta.view().resync.is_none());
    assert!(!p.beta.diverged(), "a promote with the peer connected starts no new generation");
    assert_eq!(p.a.meta().gen_ids.current, p.b.meta().gen_ids.current);
    let lsn = p.b.write(4096, &pattern(6, 4096), false);
    p.beta.gate().wait(lsn, Durability::Write).await;
    assert!(p.a.data() == p.b.data());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_bitmap_skips_the_initial_sync_of_blank_volumes_only() {
    let p = pair_with(Protocol::C, |_| {}, DiskState::Inconsistent, Role::Secondary).await;
    until("connected", Duration::from_secs(5), || p.alpha.view().peer_disk == DiskState::Inconsistent).await;
    let failed = (p.alpha.failed_sessions(), p.beta.failed_sessions());
    let g = p.alpha.new_current_uuid_clear_bitmap(Duration::from_secs(5)).await.expect("clear-bitmap on blank volumes");
    assert_eq!(p.a.meta().disk, DiskState::UpToDate);
    until("beta uptodate", Duration::from_secs(5), || p.b.meta().disk == DiskState::UpToDate).await;
    // Beta may take the empty sync as a sync target and acknowledge it:
    // that is no protocol error for alpha (CI logged one).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        (p.alpha.failed_sessions(), p.beta.failed_sessions()),
        failed,
        "no session failed: {:?}",
        p.alpha.view().last_error
    );
    assert_eq!(p.b.meta().gen_ids.current, g, "both sides share the new generation");
    // alpha promoted: same generation, same (empty) log: no sync.
    p.alpha.set_role(Role::Primary, Duration::from_secs(2)).await;
    until("established", Duration::from_secs(5), || established(&p.alpha)).await;
    assert!(p.alpha.view().resync.is_none(), "no sync after clear-bitmap");
    // Refused once there is data (and not both secondary).
    p.a.write(0, &pattern(1, 4096), false);
    let why = p.alpha.new_current_uuid_clear_bitmap(Duration::from_secs(1)).await.expect_err("refused");
    assert!(why.contains("secondary"), "{why}");
}

// --- Resync (issue 4) -----------------------------------------------------------

/// In sync, then beta disconnects and alpha writes `blocks` scattered 4 KiB
/// blocks alone (a new generation, tracked in the bitmap). Returns the
/// offsets written.
async fn diverge_alone(p: &Pair, blocks: usize) -> Vec<usize> {
    in_sync(p).await;
    p.beta.disconnect();
    until("alpha lost beta", Duration::from_secs(5), || p.alpha.view().connection != ConnState::Connected).await;
    p.alpha.gate().before_write().await.expect("new generation");
    let offsets: Vec<usize> = (0..blocks).map(|i| (i * 37 % 256) * 16384).collect();
    for (i, off) in offsets.iter().enumerate() {
        p.a.write(*off, &pattern(50 + i as u8, 4096), false);
    }
    offsets
}

/// Waits for a resync to complete on `e` after `before` (the `last_sync`
/// seen before it started).
async fn next_sync(e: &Engine, before: Option<LastSync>, timeout: Duration) -> LastSync {
    until("the resync to finish", timeout, || e.view().last_sync != before).await;
    e.view().last_sync.expect("last sync")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bitmap_resync_moves_the_marked_blocks_and_clears_bits_only_once_durable() {
    let p = pair(Protocol::C, |_| {}).await;
    let offsets = diverge_alone(&p, 12).await;
    assert_eq!(p.a.dirty_bytes(), 12 * 4096, "the bitmap holds exactly the blocks written alone");
    // The WAL no longer has them: a bitmap resync, not a log catch-up.
    p.a.drop_log_upto(p.a.local_lsn());
    p.b.set_data_sync_delay(Duration::from_millis(700));
    let (before, syncs) = (p.alpha.view().last_sync, p.b.data_syncs());
    p.beta.connect(false);
    // The data arrives on beta well before it is durable there.
    let (a, b) = (p.a.clone(), p.b.clone());
    let off = offsets[11];
    until("beta has the last block's data", Duration::from_secs(5), move || {
        b.data()[off..off + 4096] == a.data()[off..off + 4096]
    })
    .await;
    assert!(p.a.is_dirty(off as u64), "a bit is cleared only once the target has the block durable");
    assert_eq!(p.b.data_syncs(), syncs, "no data-file sync completed yet");
    let last = next_sync(&p.alpha, before, Duration::from_secs(10)).await;
    assert_eq!(last.kind, ResyncKind::Bitmap);
    assert_eq!(last.bytes, 12 * 4096, "only the marked blocks moved");
    assert_eq!(p.a.dirty_bytes(), 0);
    assert!(p.b.data_syncs() > syncs);
    in_sync(&p).await;
    assert!(p.b.data() == p.a.data(), "copies differ after the bitmap resync");
    assert_eq!(p.b.meta().gen_ids.current, p.a.meta().gen_ids.current);
    assert_eq!(p.b.meta().disk, DiskState::UpToDate);
    assert_eq!(p.a.meta().gen_ids.bitmap, 0, "source: bitmap generation retired once the bitmap is empty");
    let d = p.alpha.view().decision.expect("decision recorded");
    assert_eq!(d.result, "source-bitmap", "{d:?}");
    assert_eq!(p.beta.view().decision.expect("decision").result, "target-bitmap");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_catch_up_replays_the_wal_and_keeps_the_target_promotable() {
    let p = pair(Protocol::C, |_| {}).await;
    diverge_alone(&p, 8).await;
    let (before_a, before_b) = (p.alpha.view().last_sync, p.beta.view().last_sync);
    p.beta.connect(false);
    assert_eq!(next_sync(&p.alpha, before_a, Duration::from_secs(10)).await.kind, ResyncKind::Log);
    assert_eq!(next_sync(&p.beta, before_b, Duration::from_secs(10)).await.kind, ResyncKind::Log);
    in_sync(&p).await;
    assert!(p.b.data() == p.a.data(), "copies differ after the log catch-up");
    assert_eq!(p.b.local_lsn(), p.a.local_lsn(), "the target has the same records with the same LSNs");
    assert_eq!(p.b.meta().disk, DiskState::UpToDate);
    assert_eq!(p.b.meta().gen_ids.current, p.a.meta().gen_ids.current);
    assert_eq!(p.a.dirty_bytes(), 0, "every mark came from a record the peer now has");
}

/// The link dropped before beta's `written` acks of its last records reached
/// alpha: alpha marked those records too, and its bitmap base is below
/// beta's LSN. The log catch-up from beta's LSN still leaves nothing marked
/// (CI saw `out_of_sync_bytes` stay up after such a catch-up).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_catch_up_clears_the_marks_of_records_whose_acks_were_lost() {
    let p = pair(Protocol::C, |_| {}).await;
    in_sync(&p).await;
    p.a.write(0, &pattern(3, 4096), false);
    let acked_lost = p.a.write(65536, &pattern(4, 4096), false);
    until("beta has both records", Duration::from_secs(5), || p.b.local_lsn() == acked_lost).await;
    p.beta.disconnect();
    until("alpha lost beta", Duration::from_secs(5), || p.alpha.view().connection != ConnState::Connected).await;
    p.alpha.gate().before_write().await.expect("new generation");
    // As if the acks of the two records had been lost with the link.
    p.a.set_bitmap_base_lsn(acked_lost - 2);
    p.a.mark(0, 4096);
    p.a.mark(65536, 4096);
    for i in 0..6 {
        p.a.write(131072 + i * 16384, &pattern(60 + i as u8, 4096), false);
    }
    assert_eq!(p.a.dirty_bytes(), 8 * 4096);
    let before = p.alpha.view().last_sync;
    p.beta.connect(false);
    let last = next_sync(&p.alpha, before, Duration::from_secs(10)).await;
    assert_eq!(last.kind, ResyncKind::Log, "beta has every record up to its LSN: a log catch-up");
    assert_eq!(last.bytes, 6 * 4096, "only the records beta lacked were replayed");
    in_sync(&p).await;
    assert!(p.b.data() == p.a.data(), "copies differ after the log catch-up");
    assert_eq!(p.a.dirty_bytes(), 0, "marks of records beta had before the catch-up stayed set");
}

/// A mark no record explains (online verify found the block different)
/// is not covered by replaying records: the source resyncs from the bitmap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marks_no_record_explains_turn_a_log_catch_up_into_a_bitmap_resync() {
    let p = pair(Protocol::C, |_| {}).await;
    diverge_alone(&p, 4).await;
    // A block beta holds wrongly, found by a verify whose mark beta lost.
    let bad = 3 * 1024 * 1024;
    p.b.corrupt(bad, &[0xEE; 4096]);
    ReplStore::mark_range(&*p.a, bad as u64, 4096);
    let before = p.alpha.view().last_sync;
    p.beta.connect(false);
    let last = next_sync(&p.alpha, before, Duration::from_secs(10)).await;
    assert_eq!(
        p.alpha.view().decision.expect("decision").result,
        "source-log",
        "the SyncInfo views allow a log catch-up"
    );
    assert_eq!(last.kind, ResyncKind::Bitmap, "the foreign mark makes it a bitmap resync");
    in_sync(&p).await;
    assert!(p.b.data() == p.a.data(), "the block marked by verify was not repaired");
    assert_eq!(p.a.dirty_bytes(), 0);
    assert!(!p.a.has_foreign_marks(), "an empty bitmap holds no foreign marks");
}

/// A source whose loop is stuck past the silence deadline (a bitmap
/// persist blocking in a slow fsync, during a resync) keeps the link: its
/// heartbeat runs on a task of its own and the blocking call does not hold
/// the runtime worker, so the peer keeps hearing from it; and the peer's
/// frames waiting unread when it comes back are not silence. CI saw a
/// resync's peer "lost" under load before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_stalled_past_the_ping_deadline_does_not_call_the_peer_lost() {
    let p = pair(Protocol::C, |_| {}).await;
    diverge_alone(&p, 8).await;
    p.a.drop_log_upto(p.a.local_lsn());
    // The resync lasts a few seconds (beta's data syncs are slow), so that
    // alpha persists its bitmap during it (once a second) and at its end.
    p.b.set_data_sync_delay(Duration::from_millis(1500));
    let before = p.alpha.view().last_sync;
    p.beta.connect(false);
    until("alpha is the sync source", Duration::from_secs(10), || {
        p.alpha.view().replication == Some(ReplState::SyncSource)
    })
    .await;
    let mut events = p.alpha.subscribe();
    let mut beta_events = p.beta.subscribe();
    // From here, every bitmap persist blocks for longer than
    // ping_interval + ping_timeout (300 ms).
    *p.a.persist_delay.lock().unwrap() = Duration::from_millis(500);
    let last = next_sync(&p.alpha, before, Duration::from_secs(20)).await;
    assert_eq!(last.kind, ResyncKind::Bitmap);
    assert!(p.a.persists_delayed() >= 2, "alpha stalled during and at the end of the resync");
    *p.a.persist_delay.lock().unwrap() = Duration::ZERO;
    in_sync(&p).await;
    assert!(p.b.data() == p.a.data());
    for (who, rx) in [("alpha", &mut events), ("beta", &mut beta_events)] {
        while let Ok(e) = rx.try_recv() {
            assert!(
                e.event.name() != "peer-lost",
                "{who}: a stalled loop is not a silent peer: {} {:?}",
                e.event.name(),
                e.event
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_missing_from_the_wal_falls_back_to_a_bitmap_resync() {
    let p = pair(Protocol::C, |_| {}).await;
    diverge_alone(&p, 8).await;
    // One record of the range is not readable (in place): the reader stops there.
    let lsn = p.a.local_lsn();
    p.a.forget_log_record(lsn - 3);
    let before = p.alpha.view().last_sync;
    p.beta.connect(false);
    let last = next_sync(&p.alpha, before, Duration::from_secs(10)).await;
    assert_eq!(p.alpha.view().decision.expect("decision").result, "source-log", "decided on the log first");
    assert_eq!(last.kind, ResyncKind::Bitmap, "fell back to the bitmap");
    in_sync(&p).await;
    assert!(p.b.data() == p.a.data(), "copies differ after the fallback");
    assert_eq!(p.a.dirty_bytes(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_target_resumes_the_resync_where_it_stopped() {
    // 4 MiB at 1 MiB/s: about four seconds of full sync.
    let p = pair(Protocol::C, |c| c.resync_rate = Some(1 << 20)).await;
    until("full sync under way", Duration::from_secs(5), || {
        p.alpha.view().resync.is_some_and(|r| r.done_bytes >= 1 << 20)
    })
    .await;
    p.beta.shutdown().await;
    until("alpha lost beta", Duration::from_secs(5), || p.alpha.view().connection != ConnState::Connected).await;
    let left = p.a.dirty_bytes();
    assert!(left > 0 && left < SIZE as u64, "acked chunks were cleared, the rest kept ({left} bytes marked)");
    assert_eq!(p.b.meta().disk, DiskState::Inconsistent);
    assert_eq!(p.b.meta().gen_ids.current, p.a.meta().gen_ids.current, "the target is in the source's generation");
    // beta comes back with the same store.
    let cb = p.beta.config().clone();
    let beta = Engine::new(cb, p.b.clone(), Role::Secondary, broadcast::channel(64).0);
    // The old engine's listener task may still hold the port for a moment.
    let start = Instant::now();
    while let Err(e) = beta.start().await {
        assert!(start.elapsed() < Duration::from_secs(3), "beta restarts: {e}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let last = next_sync(&p.alpha, None, Duration::from_secs(15)).await;
    assert_eq!(last.kind, ResyncKind::Bitmap, "a resume, not a new full sync");
    assert!(last.bytes <= left, "only what was left moved ({} > {left})", last.bytes);
    until("established", Duration::from_secs(5), || established(&p.alpha)).await;
    assert!(p.b.data() == p.a.data());
    assert_eq!(p.b.meta().disk, DiskState::UpToDate);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_brain_moves_nothing_until_discard_my_data() {
    let p = pair(Protocol::C, |_| {}).await;
    in_sync(&p).await;
    p.alpha.disconnect();
    p.beta.disconnect();
    until("sessions ended", Duration::from_secs(5), || !p.alpha.is_connected() && !p.beta.is_connected()).await;
    // Both become primary and write on their own.
    p.beta.set_role(Role::Primary, Duration::ZERO).await;
    p.alpha.gate().before_write().await.expect("alpha new generation");
    p.beta.gate().before_write().await.expect("beta new generation");
    p.a.write(0, &pattern(1, 4096), false);
    p.b.write(65536, &pattern(2, 8192), false);
    p.beta.set_role(Role::Secondary, Duration::ZERO).await;
    let (a_before, b_before) = (p.a.data(), p.b.data());
    p.alpha.connect(false);
    p.beta.connect(false);
    until("split brain on both", Duration::from_secs(5), || p.alpha.view().split_brain && p.beta.view().split_brain)
        .await;
    until("both standalone", Duration::from_secs(5), || {
        p.alpha.view().connection == ConnState::Standalone && p.beta.view().connection == ConnState::Standalone
    })
    .await;
    assert!(p.a.data() == a_before && p.b.data() == b_before, "nothing moved");
    assert_eq!(p.alpha.view().decision.expect("decision").result, "split-brain");
    // The operator discards beta's changes.
    let before = p.beta.view().last_sync;
    p.beta.connect(true);
    p.alpha.connect(false);
    let last = next_sync(&p.beta, before, Duration::from_secs(10)).await;
    until("established", Duration::from_secs(5), || established(&p.alpha)).await;
    assert!(p.b.data() == p.a.data(), "beta ends identical to alpha");
    assert!(!p.beta.view().split_brain);
    assert_eq!(last.kind, ResyncKind::Bitmap, "only the changed blocks");
    assert_eq!(last.bytes, 3 * 4096, "alpha's block and beta's two blocks");
    // beta took alpha's generation: if it is promoted alone later, its
    // writes must start a generation of their own (else they would be
    // written under alpha's and rolled back by alpha at the next connect).
    assert!(!p.beta.diverged(), "the sync target took the source's generation");
    let taken = p.b.meta().gen_ids.current;
    assert_eq!(taken, p.a.meta().gen_ids.current);
    p.alpha.disconnect();
    p.beta.disconnect();
    until("sessions ended", Duration::from_secs(5), || !p.alpha.is_connected() && !p.beta.is_connected()).await;
    p.alpha.set_role(Role::Secondary, Duration::ZERO).await;
    p.beta.set_role(Role::Primary, Duration::ZERO).await;
    p.beta.gate().before_write().await.expect("beta new generation");
    let g = p.b.meta().gen_ids;
    assert_ne!(g.current, taken, "beta writes under a generation of its own");
    assert_eq!(g.bitmap, taken);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_reports_the_decision_and_changes_nothing() {
    let p = pair(Protocol::C, |_| {}).await;
    diverge_alone(&p, 3).await;
    p.a.drop_log_upto(p.a.local_lsn());
    let (ma, mb) = (p.a.meta(), p.b.meta());
    let (la, lb) = (p.alpha.view().last_sync, p.beta.view().last_sync);
    // beta is standalone (disconnected) and still answers the probe.
    let report = p.alpha.probe(false).await.expect("probe");
    assert_eq!(report.decision.result, "source-bitmap", "{report:?}");
    assert_eq!(report.peer_view.role.to_string(), "secondary");
    let report = p.beta.probe(false).await.expect("probe from beta");
    assert_eq!(report.decision.result, "target-bitmap");
    assert_eq!((p.a.meta(), p.b.meta()), (ma, mb), "a probe changes nothing");
    assert_eq!(p.beta.view().connection, ConnState::Standalone);
    assert!(p.alpha.view().last_sync == la && p.beta.view().last_sync == lb, "no resync ran");
}

/// Chaos seed 1000 cycle 31: a session whose SyncInfo was sent before the
/// previous session's end marked its unacknowledged records must not act
/// on it (the marks would stay on an in-sync pair): its claim is stale.
#[tokio::test]
async fn a_claim_made_on_a_sync_info_older_than_new_marks_is_stale() {
    use super::decide::{Decision, Verdict};
    let store = MemStore::new(SIZE, DiskState::UpToDate, 7);
    let e =
        Engine::new(cfg("alpha", "beta", 1, 2, Protocol::C), store.clone(), Role::Primary, broadcast::channel(16).0);
    let verdict = Verdict { decision: Decision::NoSync, rule: "in-sync", explanation: String::new() };
    let marks = store.mark_count();
    let mine = e.sync_info(0);
    e.claim_session(&mine, marks, &verdict).expect("nothing changed since the SyncInfo");
    // The old session's end marks what the peer had not acknowledged (a
    // record written while it streamed: in the unacked ring).
    store.set_tracking(false);
    store.write(0, &pattern(3, 4096), false);
    store.mark_unacked().expect("mark");
    let marks_now = store.mark_count();
    assert!(marks_now > marks, "marking counts");
    let stale = e.claim_session(&mine, marks, &verdict).expect_err("marks since the SyncInfo");
    assert!(stale.0.contains("marked out of sync since the session start"), "{}", stale.0);
    e.claim_session(&mine, marks_now, &verdict).expect("a SyncInfo made after the marks");
}
