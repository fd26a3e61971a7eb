//! The async NBD client against scripted fake servers: reply reassembly the
//! real server never exercises (several chunks, holes, out of order), error
//! chunks, simple-reply servers, and servers that misbehave or die. A broken
//! server must give the caller an error, never a hang or wrong data.

use std::time::Duration;

use bytes::{BufMut, BytesMut};
use repblock::nbd::proto::*;
use repblock::nbd::{ClientError, ListenAddr, NbdClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const SIZE: u64 = 1 << 20;
const TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts one client and runs the server side of the handshake: answers
/// STRUCTURED_REPLY (ACK if `structured`, else ERR_UNSUP) and GO.
async fn fake_handshake(s: &mut TcpStream, structured: bool) {
    s.write_all(&encode_greeting(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES)).await.unwrap();
    let mut flags = [0u8; 4];
    s.read_exact(&mut flags).await.unwrap();
    loop {
        let mut hb = [0u8; OptionHeader::LEN];
        s.read_exact(&mut hb).await.unwrap();
        let h = OptionHeader::parse(&hb).unwrap();
        let mut data = vec![0u8; h.len as usize];
        s.read_exact(&mut data).await.unwrap();
        let mut out = BytesMut::new();
        match h.option {
            NBD_OPT_STRUCTURED_REPLY => {
                let rep = if structured { NBD_REP_ACK } else { NBD_REP_ERR_UNSUP };
                put_option_reply(&mut out, h.option, rep, &[]);
            }
            NBD_OPT_GO => {
                put_option_reply(&mut out, h.option, NBD_REP_INFO, &info_export(SIZE, NBD_FLAG_HAS_FLAGS));
                put_option_reply(&mut out, h.option, NBD_REP_ACK, &[]);
                s.write_all(&out).await.unwrap();
                return;
            }
            other => panic!("unexpected option {other}"),
        }
        s.write_all(&out).await.unwrap();
    }
}

async fn read_request(s: &mut TcpStream) -> RequestHeader {
    let mut b = [0u8; RequestHeader::LEN];
    s.read_exact(&mut b).await.unwrap();
    RequestHeader::parse(&b).unwrap()
}

/// Starts a fake server running `script` on its one connection; returns a
/// connected client.
async fn with_fake<F, Fut>(structured: bool, script: F) -> (NbdClient, tokio::task::JoinHandle<()>)
where
    F: FnOnce(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = ListenAddr::Tcp(l.local_addr().unwrap());
    let server = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        fake_handshake(&mut s, structured).await;
        script(s).await;
    });
    let client = tokio::time::timeout(TIMEOUT, NbdClient::connect(&addr, "x")).await.unwrap().unwrap();
    (client, server)
}

fn chunk(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
    let mut b = BytesMut::new();
    put_chunk_header(&mut b, flags, kind, cookie, payload.len() as u32);
    b.put_slice(payload);
    b.to_vec()
}

fn data_payload(offset: u64, data: &[u8]) -> Vec<u8> {
    let mut p = offset.to_be_bytes().to_vec();
    p.extend_from_slice(data);
    p
}

fn hole_payload(offset: u64, len: u32) -> Vec<u8> {
    let mut p = offset.to_be_bytes().to_vec();
    p.extend_from_slice(&len.to_be_bytes());
    p
}

#[tokio::test]
async fn reassembles_data_and_hole_chunks_out_of_order() {
    let (client, server) = with_fake(true, |mut s| async move {
        let r = read_request(&mut s).await;
        assert_eq!((r.kind, r.offset, r.len), (NBD_CMD_READ, 1000, 300));
        // [1000,1100) data "a", [1100,1200) hole, [1200,1300) data "c": sent
        // last-first, then NONE with DONE.
        let mut out = chunk(0, NBD_REPLY_TYPE_OFFSET_DATA, r.cookie, &data_payload(1200, &[b'c'; 100]));
        out.extend(chunk(0, NBD_REPLY_TYPE_OFFSET_HOLE, r.cookie, &hole_payload(1100, 100)));
        out.extend(chunk(0, NBD_REPLY_TYPE_OFFSET_DATA, r.cookie, &data_payload(1000, &[b'a'; 100])));
        out.extend(chunk(NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, r.cookie, &[]));
        s.write_all(&out).await.unwrap();
        // Keep the connection until the client is done.
        let mut sink = [0u8; 64];
        let _ = s.read(&mut sink).await;
    })
    .await;
    let data = tokio::time::timeout(TIMEOUT, client.read(1000, 300)).await.unwrap().unwrap();
    let mut want = vec![b'a'; 100];
    want.extend_from_slice(&[0; 100]);
    want.extend_from_slice(&[b'c'; 100]);
    assert_eq!(&data[..], &want[..]);
    drop(client);
    server.await.unwrap();
}

#[tokio::test]
async fn error_chunks_and_incomplete_reads_fail_the_request() {
    let (client, server) = with_fake(true, |mut s| async move {
        // 1: a write answered by an error chunk with a message.
        let r = read_request(&mut s).await;
        let mut skip = vec![0u8; r.len as usize];
        s.read_exact(&mut skip).await.unwrap();
        let mut b = BytesMut::new();
        put_error_chunk(&mut b, r.cookie, NBD_ENOSPC, "full");
        s.write_all(&b).await.unwrap();
        // 2: a read answered with half its data and DONE: not a success.
        let r = read_request(&mut s).await;
        let out = chunk(NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, r.cookie, &data_payload(0, &[1; 50]));
        s.write_all(&out).await.unwrap();
        // 3: a read with a data chunk, then an error chunk.
        let r = read_request(&mut s).await;
        let mut out = chunk(0, NBD_REPLY_TYPE_OFFSET_DATA, r.cookie, &data_payload(0, &[1; 100]));
        let mut b = BytesMut::new();
        put_error_chunk(&mut b, r.cookie, NBD_EIO, "");
        out.extend_from_slice(&b);
        s.write_all(&out).await.unwrap();
        // 4: a flush answered by a simple error reply.
        let r = read_request(&mut s).await;
        let mut b = BytesMut::new();
        put_simple_reply(&mut b, NBD_ESHUTDOWN, r.cookie);
        s.write_all(&b).await.unwrap();
        let mut sink = [0u8; 64];
        let _ = s.read(&mut sink).await;
    })
    .await;
    assert!(matches!(
        tokio::time::timeout(TIMEOUT, client.write(0, b"abc", false)).await.unwrap(),
        Err(ClientError::Nbd { errno: NBD_ENOSPC })
    ));
    assert!(matches!(tokio::time::timeout(TIMEOUT, client.read(0, 100)).await.unwrap(), Err(ClientError::Protocol(_))));
    assert!(matches!(
        tokio::time::timeout(TIMEOUT, client.read(0, 100)).await.unwrap(),
        Err(ClientError::Nbd { errno: NBD_EIO })
    ));
    assert!(matches!(
        tokio::time::timeout(TIMEOUT, client.flush()).await.unwrap(),
        Err(ClientError::Nbd { errno: NBD_ESHUTDOWN })
    ));
    drop(client);
    server.await.unwrap();
}

#[tokio::test]
async fn simple_replies_when_the_server_has_no_structured_replies() {
    let (client, server) = with_fake(false, |mut s| async move {
        for _ in 0..2 {
            let r = read_request(&mut s).await;
            let mut b = BytesMut::new();
            put_simple_reply(&mut b, 0, r.cookie);
            s.write_all(&b).await.unwrap();
            s.write_all(&vec![7u8; r.len as usize]).await.unwrap();
        }
        let mut sink = [0u8; 64];
        let _ = s.read(&mut sink).await;
    })
    .await;
    assert!(!client.structured_replies());
    let (a, b) = tokio::join!(client.read(0, 10), client.read(10, 20));
    assert_eq!(&a.unwrap()[..], &[7u8; 10]);
    assert_eq!(&b.unwrap()[..], &[7u8; 20]);
    drop(client);
    server.await.unwrap();
}

#[tokio::test]
async fn unknown_cookie_or_bad_magic_fails_everything_in_flight() {
    for bad in [0u8, 1] {
        let (client, server) = with_fake(true, move |mut s| async move {
            let _ = read_request(&mut s).await;
            let _ = read_request(&mut s).await;
            if bad == 0 {
                let mut b = BytesMut::new();
                put_simple_reply(&mut b, 0, 0xdead_beef);
                s.write_all(&b).await.unwrap();
            } else {
                s.write_all(&[0x55; 16]).await.unwrap();
            }
            let mut sink = [0u8; 64];
            let _ = s.read(&mut sink).await;
        })
        .await;
        let (a, b) =
            tokio::time::timeout(TIMEOUT, async { tokio::join!(client.flush(), client.read(0, 4)) }).await.unwrap();
        assert!(matches!(a, Err(ClientError::Protocol(_))), "{a:?}");
        assert!(matches!(b, Err(ClientError::Protocol(_))), "{b:?}");
        assert!(matches!(client.flush().await, Err(ClientError::Closed)));
        drop(client);
        server.await.unwrap();
    }
}

#[tokio::test]
async fn server_dying_mid_reply_fails_the_request() {
    let (client, server) = with_fake(true, |mut s| async move {
        let r = read_request(&mut s).await;
        let mut b = BytesMut::new();
        put_offset_data_header(&mut b, r.cookie, 0, 4096);
        b.put_slice(&[1; 100]);
        s.write_all(&b).await.unwrap();
        // Dropping the stream: the server "crashes" mid-reply.
    })
    .await;
    let r = tokio::time::timeout(TIMEOUT, client.read(0, 4096)).await.unwrap();
    assert!(matches!(r, Err(ClientError::Protocol(_))), "{r:?}");
    assert!(matches!(client.read(0, 1).await, Err(ClientError::Closed)));
    server.await.unwrap();
}

#[tokio::test]
async fn refused_handshakes_are_errors() {
    // An oldstyle server.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = ListenAddr::Tcp(l.local_addr().unwrap());
    let server = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut b = NBD_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&0x0000_4202_8186_1253u64.to_be_bytes());
        b.extend_from_slice(&[0; 16]);
        let _ = s.write_all(&b).await;
    });
    let r = tokio::time::timeout(TIMEOUT, NbdClient::connect(&addr, "x")).await.unwrap();
    assert!(matches!(r, Err(ClientError::Protocol(_))), "{r:?}");
    server.await.unwrap();
    // Nobody listening.
    let r = NbdClient::connect(&addr, "x").await;
    assert!(matches!(r, Err(ClientError::Io(_))), "{r:?}");
}
