//! Helpers shared by the NBD integration tests: an in-process server on the
//! memory backend, and a raw protocol speaker with timeouts on every read so
//! a test fails instead of hanging.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use repblock::nbd::proto::*;
use repblock::nbd::{ListenAddr, MemoryBackend, NbdHandle, NbdServer, ServerConfig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

pub const EXPORT: &str = "r0";
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Server logs in the test output (shown for failing tests); RUST_LOG
/// overrides the default level.
pub fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("repblock=info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
}

pub fn config() -> ServerConfig {
    ServerConfig {
        export_name: EXPORT.to_string(),
        description: Some("test export".to_string()),
        ..ServerConfig::default()
    }
}

pub async fn start_with(size: u64, cfg: ServerConfig) -> (NbdHandle, Arc<MemoryBackend>) {
    init_logs();
    let backend = Arc::new(MemoryBackend::new(size));
    let addr: ListenAddr = "127.0.0.1:0".parse().unwrap();
    let h = NbdServer::start(&addr, backend.clone(), cfg).await.unwrap();
    (h, backend)
}

pub async fn start(size: u64) -> (NbdHandle, Arc<MemoryBackend>) {
    start_with(size, config()).await
}

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A connection speaking raw protocol bytes.
pub struct Raw {
    pub s: Box<dyn Io>,
}

/// One decoded reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Simple { error: u32, cookie: u64, data: Vec<u8> },
    Chunk { flags: u16, kind: u16, cookie: u64, payload: Vec<u8> },
}

impl Raw {
    pub async fn connect(h: &NbdHandle) -> Raw {
        match h.listen_addr() {
            ListenAddr::Tcp(a) => Raw { s: Box::new(TcpStream::connect(a).await.unwrap()) },
            ListenAddr::Unix(p) => Raw { s: Box::new(UnixStream::connect(p).await.unwrap()) },
        }
    }

    pub async fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).await.unwrap();
    }

    /// Like `send` but tolerates the server having closed already.
    pub async fn try_send(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.s.write_all(b).await
    }

    pub async fn read_exact(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        tokio::time::timeout(IO_TIMEOUT, self.s.read_exact(&mut b)).await.expect("read timed out").unwrap();
        b
    }

    /// Asserts the server closes the connection (EOF or reset) without
    /// sending anything more.
    pub async fn expect_closed(&mut self) {
        let mut b = [0u8; 1];
        match tokio::time::timeout(IO_TIMEOUT, self.s.read(&mut b)).await.expect("server did not close") {
            Ok(0) | Err(_) => {}
            Ok(_) => panic!("expected the connection to close, got byte {:#x}", b[0]),
        }
    }

    /// Asserts nothing arrives for a moment (the connection stays open and quiet).
    pub async fn expect_quiet(&mut self, for_: Duration) {
        let mut b = [0u8; 1];
        if let Ok(r) = tokio::time::timeout(for_, self.s.read(&mut b)).await {
            panic!("expected silence, got {r:?}");
        }
    }

    /// Reads the greeting and checks it; returns the handshake flags.
    pub async fn greeting(&mut self) -> u16 {
        let g = self.read_exact(GREETING_LEN).await;
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        let flags = u16::from_be_bytes([g[16], g[17]]);
        assert_eq!(flags, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
        flags
    }

    /// Greeting + client flags.
    pub async fn hello(&mut self, client_flags: u32) {
        self.greeting().await;
        self.send(&client_flags.to_be_bytes()).await;
    }

    pub async fn option(&mut self, option: u32, data: &[u8]) {
        let mut b = OptionHeader { option, len: data.len() as u32 }.encode().to_vec();
        b.extend_from_slice(data);
        self.send(&b).await;
    }

    /// Reads one option reply: (option, reply type, data).
    pub async fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let h = OptionReplyHeader::parse(&self.read_exact(OptionReplyHeader::LEN).await).unwrap();
        let data = self.read_exact(h.len as usize).await;
        (h.option, h.reply, data)
    }

    /// Full handshake with NBD_OPT_GO; returns (size, transmission flags).
    pub async fn go(&mut self, structured: bool) -> (u64, u16) {
        self.hello(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES).await;
        if structured {
            self.option(NBD_OPT_STRUCTURED_REPLY, &[]).await;
            assert_eq!(self.option_reply().await, (NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK, vec![]));
        }
        let req = InfoRequest { name: EXPORT.as_bytes().to_vec(), requests: vec![] };
        self.option(NBD_OPT_GO, &req.encode()).await;
        let mut export = None;
        loop {
            let (opt, rep, data) = self.option_reply().await;
            assert_eq!(opt, NBD_OPT_GO);
            match rep {
                NBD_REP_INFO => {
                    if u16::from_be_bytes([data[0], data[1]]) == NBD_INFO_EXPORT {
                        let size = u64::from_be_bytes(data[2..10].try_into().unwrap());
                        export = Some((size, u16::from_be_bytes([data[10], data[11]])));
                    }
                }
                NBD_REP_ACK => break,
                other => panic!("unexpected GO reply {other:#x}"),
            }
        }
        export.expect("NBD_INFO_EXPORT")
    }

    pub async fn request(&mut self, kind: u16, flags: u16, cookie: u64, offset: u64, len: u32, payload: &[u8]) {
        let mut b = RequestHeader { flags, kind, cookie, offset, len }.encode().to_vec();
        b.extend_from_slice(payload);
        self.send(&b).await;
    }

    /// Reads one reply; `read_len(cookie)` gives the data length of a simple
    /// READ reply (None for other commands).
    pub async fn reply(&mut self, read_len: impl Fn(u64) -> Option<u32>) -> Reply {
        let magic = u32::from_be_bytes(self.read_exact(4).await.try_into().unwrap());
        match magic {
            SIMPLE_REPLY_MAGIC => {
                let rest = self.read_exact(12).await;
                let error = u32::from_be_bytes(rest[0..4].try_into().unwrap());
                let cookie = u64::from_be_bytes(rest[4..12].try_into().unwrap());
                let data = match (error, read_len(cookie)) {
                    (0, Some(n)) => self.read_exact(n as usize).await,
                    _ => vec![],
                };
                Reply::Simple { error, cookie, data }
            }
            STRUCTURED_REPLY_MAGIC => {
                let rest = self.read_exact(16).await;
                let flags = u16::from_be_bytes(rest[0..2].try_into().unwrap());
                let kind = u16::from_be_bytes(rest[2..4].try_into().unwrap());
                let cookie = u64::from_be_bytes(rest[4..12].try_into().unwrap());
                let len = u32::from_be_bytes(rest[12..16].try_into().unwrap());
                let payload = self.read_exact(len as usize).await;
                Reply::Chunk { flags, kind, cookie, payload }
            }
            other => panic!("bad reply magic {other:#x}"),
        }
    }

    /// Reads a simple reply to a non-READ request: (error, cookie).
    pub async fn simple(&mut self) -> (u32, u64) {
        match self.reply(|_| None).await {
            Reply::Simple { error, cookie, .. } => (error, cookie),
            other => panic!("expected a simple reply, got {other:?}"),
        }
    }
}

/// Waits until the server has `n` connections in the transmission phase
/// (a closed connection is uncounted just after its socket closes).
pub async fn wait_clients(h: &NbdHandle, n: usize) {
    let t = std::time::Instant::now();
    while h.client_count() != n {
        assert!(t.elapsed() < IO_TIMEOUT, "client_count stuck at {}, want {n}", h.client_count());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until the server has no connection in the transmission phase.
pub async fn wait_no_clients(h: &NbdHandle) {
    wait_clients(h, 0).await;
}
