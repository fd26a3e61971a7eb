//! A data node's end of the witness link: dial, authenticate (version 3),
//! ping, and ask Claim / Solo / PeerUptodate / Release, one request at a
//! time (the witness answers in request order).
//!
//! The failover task of a data node (docs/failover.md) drives one of these;
//! tests use it to speak to a real witness process over the wire.

use std::time::Duration;

use tokio::net::TcpStream;

use crate::config::Config;
use crate::failover::RefuseReason;
use crate::model::{DiskState, GenIds, Role};
use crate::repl::handshake::{self, Expect, HandshakeError, LocalHello};
use crate::repl::link::{self, FrameReader, FrameWriter, LinkError, LinkRead, LinkWrite};
use crate::repl::proto::{Message, TermPong, WitnessView};

/// Errors of the witness link.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("This resource has no witness node")]
    NoWitness,
    #[error("{0:?} is not a data node of this resource")]
    NotADataNode(String),
    #[error("Witness {witness} at {addr}: {source}")]
    Connect {
        witness: String,
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    #[error("Witness link: {0}")]
    Link(#[from] LinkError),
    #[error("Witness link: the witness closed the connection")]
    Closed,
    #[error("Witness link: the witness said goodbye: {0}")]
    Goodbye(String),
    #[error("Witness link: unexpected {0} from the witness")]
    Unexpected(&'static str),
    #[error("Witness link: no answer within {0:?}")]
    Timeout(Duration),
    #[error("Witness link: refusal reason code {0} is unknown to this build")]
    UnknownReason(u8),
}

/// The witness's answer to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Granted; the witness's record is now `view` (durable).
    Granted(WitnessView),
    /// Refused; `view` is the witness's record (`None`: it has no state).
    Refused { reason: RefuseReason, view: Option<WitnessView> },
}

/// An authenticated witness link.
pub struct WitnessClient {
    reader: FrameReader<LinkRead>,
    writer: FrameWriter<LinkWrite>,
    node: u8,
    seq: u64,
    timeout: Duration,
}

impl std::fmt::Debug for WitnessClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WitnessClient").field("node", &self.node).field("seq", &self.seq).finish_non_exhaustive()
    }
}

impl WitnessClient {
    /// Dials the witness of `config` as data node `me`, at `addr` (the
    /// witness's `replication` unless given: a test may route it through
    /// a proxy). Every later call waits at most `timeout` for its answer.
    pub async fn connect(
        config: &Config,
        me: &str,
        addr: Option<&str>,
        timeout: Duration,
    ) -> Result<WitnessClient, ClientError> {
        let w = config.witness.as_ref().ok_or(ClientError::NoWitness)?;
        let node_cfg =
            config.nodes.iter().find(|n| n.name == me).ok_or_else(|| ClientError::NotADataNode(me.into()))?;
        let node = config.node_index(&node_cfg.name).ok_or_else(|| ClientError::NotADataNode(me.into()))?.0;
        let addr = addr.unwrap_or(&w.replication).to_string();
        let connect_err = |source| ClientError::Connect { witness: w.name.clone(), addr: addr.clone(), source };
        let mut stream = tokio::time::timeout(timeout, TcpStream::connect(&addr))
            .await
            .map_err(|_| connect_err(std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")))?
            .map_err(connect_err)?;
        let local = LocalHello {
            resource: config.name.clone(),
            node: me.to_string(),
            peer: w.name.clone(),
            size: config.size,
            block_size: config.block_size,
            gen_ids: GenIds::default(),
            role: Role::Secondary,
            disk: DiskState::Unknown,
            secret: config.secret.clone().unwrap_or_default().into_bytes(),
        };
        handshake::handshake_with(&mut stream, &local, &Expect::witness_link(), timeout).await?;
        let (reader, writer) = link::split_tcp(stream).map_err(connect_err)?;
        Ok(WitnessClient { reader, writer, node, seq: 0, timeout })
    }

    /// This node's index on the link.
    pub fn node(&self) -> u8 {
        self.node
    }

    async fn next(&mut self) -> Result<Message, ClientError> {
        match tokio::time::timeout(self.timeout, self.reader.read()).await {
            Err(_) => Err(ClientError::Timeout(self.timeout)),
            Ok(Err(e)) => Err(e.into()),
            Ok(Ok(None)) => Err(ClientError::Closed),
            Ok(Ok(Some(Message::Goodbye { message, .. }))) => Err(ClientError::Goodbye(message)),
            Ok(Ok(Some(m))) => Ok(m),
        }
    }

    /// Sends a Ping carrying `term` and `sent_ns`, and returns the Pong.
    pub async fn ping(&mut self, term: u64, sent_ns: u64) -> Result<TermPong, ClientError> {
        self.seq += 1;
        let seq = self.seq;
        self.writer.send(&Message::TermPing { seq, sent_ns, term }).await?;
        loop {
            match self.next().await? {
                Message::TermPong(p) if p.seq == seq => return Ok(p),
                // An older ping's late pong.
                Message::TermPong(_) => continue,
                other => return Err(ClientError::Unexpected(other.name())),
            }
        }
    }

    async fn ask(&mut self, req: Message) -> Result<Answer, ClientError> {
        self.writer.send(&req).await?;
        loop {
            match self.next().await? {
                Message::Grant { view, .. } => return Ok(Answer::Granted(view)),
                Message::Refused { reason, view, .. } => {
                    let reason = RefuseReason::from_code(reason).ok_or(ClientError::UnknownReason(reason))?;
                    return Ok(Answer::Refused { reason, view });
                }
                Message::TermPong(_) => continue,
                other => return Err(ClientError::Unexpected(other.name())),
            }
        }
    }

    /// "My primary of `term` is silent: make me primary of `term + 1`".
    pub async fn claim(&mut self, term: u64, forced: bool) -> Result<Answer, ClientError> {
        let m =
            Message::Claim { term, node: self.node, forced, gen_current: 0, lsn_local: 0, last_heard_primary_ms: 0 };
        self.ask(m).await
    }

    /// "I am primary of `term` and lost my peer: let me go on alone".
    pub async fn solo(&mut self, term: u64) -> Result<Answer, ClientError> {
        self.ask(Message::Solo { term, node: self.node }).await
    }

    /// "I am primary of `term`; `peer` finished its resync".
    pub async fn peer_uptodate(&mut self, term: u64, peer: u8) -> Result<Answer, ClientError> {
        self.ask(Message::PeerUptodate { term, node: self.node, peer }).await
    }

    /// "I am primary of `term` and stopped serving".
    pub async fn release(&mut self, term: u64) -> Result<Answer, ClientError> {
        self.ask(Message::Release { term, node: self.node }).await
    }

    /// Sends any message as it is (tests of the witness's refusals).
    pub async fn send_raw(&mut self, m: &Message) -> Result<(), ClientError> {
        Ok(self.writer.send(m).await?)
    }

    /// The next message from the witness (tests).
    pub async fn recv_raw(&mut self) -> Result<Message, ClientError> {
        self.next().await
    }
}
