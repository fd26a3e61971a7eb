use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};

use super::*;
use crate::repl::link::{FrameReader, FrameWriter};
use crate::repl::proto::{MAX_PAYLOAD_LEN, msg_type};

const T: Duration = Duration::from_secs(5);

fn local(node: &str, peer: &str) -> LocalHello {
    LocalHello {
        resource: "r0".into(),
        node: node.into(),
        peer: peer.into(),
        size: 1 << 30,
        block_size: 4096,
        gen_ids: GenIds { current: 0x1111, bitmap: 0, history: [0x0a, 0, 0, 0] },
        role: Role::Secondary,
        disk: DiskState::UpToDate,
        secret: b"change-me".to_vec(),
    }
}

/// Runs the same handshake code on both ends of an in-memory connection.
async fn pair(
    a: &LocalHello,
    b: &LocalHello,
) -> (Result<PeerInfo, HandshakeError>, Result<PeerInfo, HandshakeError>, DuplexStream, DuplexStream) {
    let (mut sa, mut sb) = duplex(64 << 10);
    let (ra, rb) = tokio::join!(handshake(&mut sa, a, T), handshake(&mut sb, b, T));
    (ra, rb, sa, sb)
}

fn refused(r: &Result<PeerInfo, HandshakeError>) -> (RefuseReason, String) {
    match r {
        Err(HandshakeError::Refused { reason, message, .. }) => (*reason, message.clone()),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn both_sides_accept_and_learn_the_peer() {
    let alpha = LocalHello { role: Role::Primary, ..local("alpha", "beta") };
    let beta = LocalHello { disk: DiskState::Inconsistent, ..local("beta", "alpha") };
    let (ra, rb, mut sa, sb) = pair(&alpha, &beta).await;
    let pa = ra.expect("alpha accepts beta");
    let pb = rb.expect("beta accepts alpha");
    assert_eq!(pa.node, "beta");
    assert_eq!(pb.node, "alpha");
    assert_eq!((pa.version, pb.version), (PROTOCOL_VERSION, PROTOCOL_VERSION));
    assert_eq!((pa.role, pa.disk), (Role::Secondary, DiskState::Inconsistent));
    assert_eq!((pb.role, pb.disk), (Role::Primary, DiskState::UpToDate));
    assert_eq!((pa.size, pa.block_size, pa.gen_ids), (beta.size, beta.block_size, beta.gen_ids));
    assert_eq!(pb.flags, 0);

    // The streams carry on with framed traffic; nothing was over-read.
    let mut w = FrameWriter::new(&mut sa);
    w.send(&Message::Ping { seq: 1, sent_ns: 2 }).await.expect("send");
    let mut r = FrameReader::new(sb);
    assert_eq!(r.read().await.expect("read"), Some(Message::Ping { seq: 1, sent_ns: 2 }));
}

#[tokio::test]
async fn a_frame_right_after_the_welcome_is_not_swallowed() {
    // The peer's Welcome and its first stream message arrive together.
    let alpha = local("alpha", "beta");
    let (mut sa, sb) = duplex(64 << 10);
    let fake = tokio::spawn(async move {
        let mut r = FrameReader::new(sb);
        let Some(Message::Hello(h)) = r.read().await.expect("hello") else { panic!("no hello") };
        let mut nonce = [9u8; 32];
        nonce[0] = 1;
        let mut w = BytesMut::new();
        let mine = Hello {
            min_version: PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            flags: 0,
            resource: "r0".into(),
            node: "beta".into(),
            peer: "alpha".into(),
            size: 1 << 30,
            block_size: 4096,
            gen_ids: GenIds::default(),
            role: Role::Primary,
            disk: DiskState::UpToDate,
            nonce,
        };
        encode(&Message::Hello(Box::new(mine)), &mut w).expect("encode");
        let mac = compute_auth(b"change-me", &h.nonce, "beta", "r0").expect("mac");
        encode(&Message::Auth { mac }, &mut w).expect("encode");
        encode(&Message::Welcome { version: PROTOCOL_VERSION }, &mut w).expect("encode");
        encode(&Message::Barrier { upto_lsn: 42 }, &mut w).expect("encode");
        let mut s = r.into_inner();
        s.write_all(&w).await.expect("write all at once");
        // Read alpha's Auth and Welcome so alpha's writes never block.
        let mut sink = vec![0u8; 4096];
        let _ = s.read(&mut sink).await;
        s
    });
    let peer = handshake(&mut sa, &alpha, T).await.expect("accepted");
    assert_eq!(peer.node, "beta");
    let mut r = FrameReader::new(sa);
    assert_eq!(r.read().await.expect("read"), Some(Message::Barrier { upto_lsn: 42 }));
    drop(fake.await.expect("fake peer"));
}

#[tokio::test]
async fn wrong_secret_is_refused_on_both_sides() {
    let alpha = local("alpha", "beta");
    let beta = LocalHello { secret: b"another".to_vec(), ..local("beta", "alpha") };
    let (ra, rb, _, _) = pair(&alpha, &beta).await;
    let (reason, message) = refused(&ra);
    assert_eq!(reason, RefuseReason::WrongSecret);
    assert!(message.contains("shared secret"), "{message}");
    assert_eq!(refused(&rb).0, RefuseReason::WrongSecret);
    let text = ra.unwrap_err().to_string();
    assert!(text.starts_with("Refused peer beta (wrong-secret)"), "{text}");
}

#[tokio::test]
async fn wrong_resource_is_refused_with_both_names() {
    let alpha = local("alpha", "beta");
    let beta = LocalHello { resource: "r1".into(), ..local("beta", "alpha") };
    let (ra, rb, _, _) = pair(&alpha, &beta).await;
    let (reason, message) = refused(&ra);
    assert_eq!(reason, RefuseReason::WrongResource);
    assert!(message.contains("\"r0\"") && message.contains("\"r1\""), "{message}");
    assert_eq!(refused(&rb).0, RefuseReason::WrongResource);
}

#[tokio::test]
async fn size_mismatch_names_both_sizes() {
    let alpha = local("alpha", "beta");
    let beta = LocalHello { size: 2 << 30, ..local("beta", "alpha") };
    let (ra, rb, _, _) = pair(&alpha, &beta).await;
    let (reason, message) = refused(&ra);
    assert_eq!(reason, RefuseReason::SizeMismatch);
    assert_eq!(message, "volume size mismatch (alpha 1073741824 bytes, beta 2147483648 bytes)");
    let (reason, message) = refused(&rb);
    assert_eq!(reason, RefuseReason::SizeMismatch);
    assert_eq!(message, "volume size mismatch (beta 2147483648 bytes, alpha 1073741824 bytes)");
}

#[tokio::test]
async fn block_size_mismatch_is_refused() {
    let alpha = local("alpha", "beta");
    let beta = LocalHello { block_size: 512, ..local("beta", "alpha") };
    let (ra, rb, _, _) = pair(&alpha, &beta).await;
    assert_eq!(refused(&ra).0, RefuseReason::BlockSizeMismatch);
    assert_eq!(refused(&rb).0, RefuseReason::BlockSizeMismatch);
}

#[tokio::test]
async fn wrong_peer_name_is_refused() {
    // alpha expects beta, but gamma answers (and gamma expects alpha).
    let alpha = local("alpha", "beta");
    let gamma = local("gamma", "alpha");
    let (ra, rb, _, _) = pair(&alpha, &gamma).await;
    let (reason, message) = refused(&ra);
    assert_eq!(reason, RefuseReason::WrongPeer);
    assert_eq!(message, "alpha expects its peer to be \"beta\", the peer is \"gamma\"");
    let (reason, message) = refused(&rb);
    assert_eq!(reason, RefuseReason::WrongPeer);
    assert_eq!(message, "alpha expects its peer to be \"beta\", not \"gamma\"");

    // Two nodes with the same name.
    let (ra, rb, _, _) = pair(&local("alpha", "alpha"), &local("alpha", "alpha")).await;
    assert_eq!(refused(&ra).0, RefuseReason::WrongPeer);
    assert_eq!(refused(&rb).0, RefuseReason::WrongPeer);
}

/// A hand-written peer that sends `hello` and reports what it then reads.
async fn fake_peer_with(mut s: DuplexStream, hello: Hello) -> Vec<Message> {
    let mut out = BytesMut::new();
    encode(&Message::Hello(Box::new(hello)), &mut out).expect("encode");
    s.write_all(&out).await.expect("write");
    let mut r = FrameReader::new(s);
    let mut seen = Vec::new();
    while let Ok(Some(m)) = r.read().await {
        seen.push(m);
    }
    seen
}

fn hello_from(node: &str, peer: &str) -> Hello {
    let l = local(node, peer);
    Hello {
        min_version: MIN_PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
        flags: 0,
        resource: l.resource,
        node: l.node,
        peer: l.peer,
        size: l.size,
        block_size: l.block_size,
        gen_ids: l.gen_ids,
        role: l.role,
        disk: l.disk,
        nonce: [3; 32],
    }
}

#[tokio::test]
async fn no_common_version_is_refused_before_authentication() {
    let (mut sa, sb) = duplex(64 << 10);
    let future =
        Hello { min_version: PROTOCOL_VERSION + 1, max_version: PROTOCOL_VERSION + 3, ..hello_from("beta", "alpha") };
    let fake = tokio::spawn(fake_peer_with(sb, future));
    let r = handshake(&mut sa, &local("alpha", "beta"), T).await;
    let (reason, message) = refused(&r);
    assert_eq!(reason, RefuseReason::IncompatibleVersion);
    assert_eq!(message, "no common protocol version (alpha speaks 2 to 2, beta speaks 3 to 5)");
    drop(sa);
    let seen = fake.await.expect("fake peer");
    // Our Hello, then the Refuse; no Auth was sent.
    assert!(
        matches!(
            seen.as_slice(),
            [Message::Hello(_), Message::Refuse { reason: RefuseReason::IncompatibleVersion, .. }]
        ),
        "{seen:?}"
    );
}

#[tokio::test]
async fn the_secret_never_crosses_the_wire() {
    let (mut sa, mut sb) = duplex(64 << 10);
    let secret = b"a-very-distinctive-secret".to_vec();
    let alpha = LocalHello { secret: secret.clone(), ..local("alpha", "beta") };
    let beta = LocalHello { secret: secret.clone(), ..local("beta", "alpha") };
    // Record what alpha sends by running beta on a tee'd copy.
    let (mut beta_side, mut tap) = duplex(64 << 10);
    let relay = tokio::spawn(async move {
        let mut seen = Vec::new();
        let mut a_buf = vec![0u8; 4096];
        let mut b_buf = vec![0u8; 4096];
        loop {
            tokio::select! {
                n = sb.read(&mut a_buf) => {
                    let n = n.unwrap_or(0);
                    if n == 0 { break; }
                    seen.extend_from_slice(&a_buf[..n]);
                    if tap.write_all(&a_buf[..n]).await.is_err() { break; }
                }
                n = tap.read(&mut b_buf) => {
                    let n = n.unwrap_or(0);
                    if n == 0 { break; }
                    if sb.write_all(&b_buf[..n]).await.is_err() { break; }
                }
            }
        }
        seen
    });
    let (ra, rb) = tokio::join!(handshake(&mut sa, &alpha, T), handshake(&mut beta_side, &beta, T));
    ra.expect("alpha");
    rb.expect("beta");
    drop(sa);
    drop(beta_side);
    let seen = relay.await.expect("relay");
    assert!(seen.len() > 100, "alpha's hello and auth were recorded");
    assert!(!seen.windows(secret.len()).any(|w| w == secret.as_slice()));
}

#[tokio::test]
async fn a_peer_that_refuses_outright_is_reported() {
    let (mut sa, mut sb) = duplex(64 << 10);
    let alpha = local("alpha", "beta");
    let (ra, rb) = tokio::join!(
        handshake(&mut sa, &alpha, T),
        refuse(&mut sb, RefuseReason::AlreadyConnected, "beta already has a connection with alpha"),
    );
    rb.expect("refusal delivered");
    match ra {
        Err(HandshakeError::PeerRefused { peer, reason, message }) => {
            assert_eq!(peer, "beta");
            assert_eq!(reason, RefuseReason::AlreadyConnected);
            assert_eq!(message, "beta already has a connection with alpha");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn garbage_from_the_peer_is_a_frame_error() {
    let (mut sa, mut sb) = duplex(64 << 10);
    sb.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
    let r = handshake(&mut sa, &local("alpha", "beta"), T).await;
    assert!(
        matches!(
            &r,
            Err(HandshakeError::Frame { source: FrameError::BadMagic { .. }, stage: "reading the peer's hello", .. })
        ),
        "{r:?}"
    );

    // Right magic, absurd length: refused from the header, nothing allocated.
    let (mut sa, mut sb) = duplex(64 << 10);
    let mut junk = BytesMut::new();
    junk.extend_from_slice(b"RBRP");
    junk.extend_from_slice(&msg_type::HELLO.to_le_bytes());
    junk.extend_from_slice(&0u16.to_le_bytes());
    junk.extend_from_slice(&(MAX_PAYLOAD_LEN as u32).to_le_bytes());
    junk.extend_from_slice(&0u32.to_le_bytes());
    sb.write_all(&junk).await.expect("write");
    let r = handshake(&mut sa, &local("alpha", "beta"), T).await;
    assert!(matches!(&r, Err(HandshakeError::Frame { source: FrameError::TooLarge { .. }, .. })), "{r:?}");
}

#[tokio::test]
async fn an_unexpected_message_is_reported() {
    let (mut sa, mut sb) = duplex(64 << 10);
    let mut b = BytesMut::new();
    encode(&Message::Ping { seq: 1, sent_ns: 1 }, &mut b).expect("encode");
    sb.write_all(&b).await.expect("write");
    let r = handshake(&mut sa, &local("alpha", "beta"), T).await;
    assert!(matches!(&r, Err(HandshakeError::Unexpected { got: "ping", .. })), "{r:?}");
}

#[tokio::test]
async fn a_silent_peer_times_out() {
    let (mut sa, _sb) = duplex(64 << 10);
    let started = Instant::now();
    let r = handshake(&mut sa, &local("alpha", "beta"), Duration::from_millis(200)).await;
    match r {
        Err(HandshakeError::Timeout { peer, stage, after }) => {
            assert_eq!(peer, "beta");
            assert_eq!(stage, "reading the peer's hello");
            assert_eq!(after, Duration::from_millis(200));
        }
        other => panic!("{other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
}

#[tokio::test]
async fn a_peer_that_hangs_up_is_closed() {
    let (mut sa, sb) = duplex(64 << 10);
    drop(sb);
    let r = handshake(&mut sa, &local("alpha", "beta"), T).await;
    // Writing our Hello or reading theirs fails: either way, a clear
    // "closed"/IO error, not a hang.
    assert!(matches!(&r, Err(HandshakeError::Closed { .. } | HandshakeError::Io { .. })), "{r:?}");
}

#[tokio::test]
async fn bad_local_parameters_are_refused_locally() {
    let (mut sa, _sb) = duplex(64 << 10);
    let l = LocalHello { secret: Vec::new(), ..local("alpha", "beta") };
    assert!(matches!(handshake(&mut sa, &l, T).await, Err(HandshakeError::Local(_))));
    let l = LocalHello { node: "x".repeat(300), ..local("alpha", "beta") };
    assert!(matches!(handshake(&mut sa, &l, T).await, Err(HandshakeError::Local(_))));
}

#[test]
fn the_mac_binds_nonce_node_and_resource() {
    let n1 = [1u8; 32];
    let n2 = [2u8; 32];
    let base = compute_auth(b"s", &n1, "alpha", "r0").expect("mac");
    assert_eq!(base, compute_auth(b"s", &n1, "alpha", "r0").expect("mac"));
    assert_ne!(base, compute_auth(b"t", &n1, "alpha", "r0").expect("mac"));
    assert_ne!(base, compute_auth(b"s", &n2, "alpha", "r0").expect("mac"));
    assert_ne!(base, compute_auth(b"s", &n1, "beta", "r0").expect("mac"));
    assert_ne!(base, compute_auth(b"s", &n1, "alpha", "r1").expect("mac"));
    // Length prefixes: moving a byte between names changes the MAC.
    assert_ne!(compute_auth(b"s", &n1, "ab", "c").expect("mac"), compute_auth(b"s", &n1, "a", "bc").expect("mac"));
}

#[test]
fn exactly_one_of_two_crossed_connections_is_kept() {
    for (a, b) in [("alpha", "beta"), ("beta", "alpha"), ("node-2", "node-10")] {
        let winner = connection_winner(a, b);
        assert_eq!(winner, connection_winner(b, a), "both sides agree");
        // a's dialled connection (= b's accepted one) and b's dialled one.
        let keep_a_dialled = (keep_connection(a, b, true), keep_connection(b, a, false));
        let keep_b_dialled = (keep_connection(b, a, true), keep_connection(a, b, false));
        assert_eq!(keep_a_dialled.0, keep_a_dialled.1, "both ends agree on a's connection");
        assert_eq!(keep_b_dialled.0, keep_b_dialled.1, "both ends agree on b's connection");
        assert_ne!(keep_a_dialled.0, keep_b_dialled.0, "exactly one survives");
        assert_eq!(keep_a_dialled.0, winner == a);
    }
}

#[test]
fn version_negotiation_picks_the_newest_common() {
    assert_eq!(negotiate_version((1, 1), (1, 1)), Some(1));
    assert_eq!(negotiate_version((1, 3), (2, 5)), Some(3));
    assert_eq!(negotiate_version((1, 1), (2, 4)), None);
    assert_eq!(negotiate_version((3, 2), (1, 5)), None, "an empty range shares nothing");
}

#[test]
fn the_secret_is_redacted_in_debug_output() {
    let l = local("alpha", "beta");
    let text = format!("{l:?}");
    assert!(!text.contains("change-me"), "{text}");
    assert!(text.contains("<redacted>"));
}

#[tokio::test]
async fn the_witness_accepts_either_data_node_at_version_3() {
    let names = vec!["alpha".to_string(), "beta".to_string()];
    // `peer` of the witness's LocalHello is replaced by whoever dials.
    let gamma = local("gamma", "-");
    for dialler in ["alpha", "beta"] {
        let (mut sa, mut sg) = duplex(64 << 10);
        let me = local(dialler, "gamma");
        let (data_side, witness_side) = (Expect::witness_link(), Expect::witness_accepting(names.clone()));
        let (rd, rw) = tokio::join!(
            handshake_with(&mut sa, &me, &data_side, T),
            handshake_with(&mut sg, &gamma, &witness_side, T)
        );
        let (pd, pw) = (rd.expect("the data node accepts the witness"), rw.expect("the witness accepts"));
        assert_eq!((pd.node.as_str(), pw.node.as_str()), ("gamma", dialler));
        assert_eq!((pd.version, pw.version), (WITNESS_PROTOCOL_VERSION, WITNESS_PROTOCOL_VERSION));
    }
    // A stranger is refused after authentication, naming whom it serves.
    let (mut sa, mut sg) = duplex(64 << 10);
    let (delta, data_side, witness_side) =
        (local("delta", "gamma"), Expect::witness_link(), Expect::witness_accepting(names.clone()));
    let (rd, rw) =
        tokio::join!(handshake_with(&mut sa, &delta, &data_side, T), handshake_with(&mut sg, &gamma, &witness_side, T));
    let (reason, message) = refused(&rw);
    assert_eq!(reason, RefuseReason::WrongPeer);
    assert!(message.contains("\"alpha or beta\""), "{message}");
    assert!(rd.is_err());
    // A version-2 data link dialling the witness finds no common version.
    let (mut sa, mut sg) = duplex(64 << 10);
    let (alpha, witness_side) = (local("alpha", "gamma"), Expect::witness_accepting(names));
    let (_, rw) = tokio::join!(handshake(&mut sa, &alpha, T), handshake_with(&mut sg, &gamma, &witness_side, T));
    assert_eq!(refused(&rw).0, RefuseReason::IncompatibleVersion);
}
