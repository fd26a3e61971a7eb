//! The idle loop: both nodes secondary, nothing to stream. Heartbeats, the
//! `new-current-uuid --clear-bitmap` offer, and online verify between two
//! secondaries (direct reads, see src/repl/verify.rs).

use super::{Outcome, Session, SessionIo, Side, Tick};
use crate::model::{DiskState, ResyncKind, Role};
use crate::repl::handshake::PeerInfo;
use crate::repl::proto::{GoodbyeReason, Message};
use crate::repl::verify::ReadMode;

impl Session {
    pub(super) async fn idle(&mut self, io: &mut SessionIo, peer: &PeerInfo, clear_bitmap: bool) -> Outcome {
        let my_role = io.role();
        if clear_bitmap {
            // `new-current-uuid --clear-bitmap`: our Hello carried the new
            // generation; an empty sync tells the peer to take it.
            let _ = self.tx.try_send(Message::SyncStart { kind: ResyncKind::Full, total_bytes: 0, start_lsn: 0 });
            let _ = self.tx.try_send(Message::SyncEnd { bytes: 0 });
        }
        let mut empty_sync = false;
        loop {
            if let Some(r) = io.stop_reason() {
                return Outcome::Stopped(r);
            }
            io.tick();
            // Online verify with two secondaries: nothing writes, this node
            // reads directly (see verify.rs).
            if let Err(o) = self.verify_source_tick(ReadMode::Direct, false, false).await {
                return o;
            }
            let tick = tokio::select! {
                t = io.next(true, my_role) => t,
                r = self.verify.next_direct() => match r {
                    // Our own digests: to the peer.
                    Ok((offset, data)) => match self.verify.digests_for(offset, &data) {
                        Some(m) => match self.tx.send(m).await {
                            Ok(()) => Tick::Ping,
                            Err(_) => Tick::Out(Outcome::PeerGone("connection closed (writer stopped)".into())),
                        },
                        None => Tick::Ping,
                    },
                    Err(e) => Tick::Out(Outcome::Failed(format!("verify read: {e}"))),
                },
                _ = self.engine.verify.wake.notified() => Tick::Ping,
            };
            match tick {
                Tick::Out(o) => return o,
                Tick::Ping => {}
                Tick::Frame(Message::State { role: Role::Primary, .. }) => {
                    // The peer was promoted; it reconnects to renegotiate.
                }
                Tick::Frame(Message::State { .. }) | Tick::Frame(Message::Ack { .. }) => {}
                // Our `--clear-bitmap` offer: a blank peer whose decision saw
                // our new generation takes the empty sync as its target and
                // acknowledges it. Nothing to answer (the next session finds
                // both in the same generation).
                Tick::Frame(Message::SyncAck { .. }) if clear_bitmap => {}
                Tick::Frame(Message::SyncStart { kind: ResyncKind::Full, total_bytes: 0, start_lsn: 0 }) => {
                    empty_sync = true
                }
                Tick::Frame(Message::SyncEnd { bytes: 0 }) if empty_sync => {
                    empty_sync = false;
                    if let Err(why) = self.take_peer_generation(peer) {
                        tracing::warn!(peer = %peer.node, "new-current-uuid --clear-bitmap from the peer refused: {why}");
                        let _ = self.tx.try_send(Message::Goodbye {
                            reason: GoodbyeReason::Other,
                            message: format!(
                                "new-current-uuid --clear-bitmap refused by {}: {why}",
                                self.engine.cfg.node
                            ),
                        });
                        return Outcome::Failed(format!("refused the peer's new-current-uuid --clear-bitmap: {why}"));
                    }
                }
                Tick::Frame(Message::VerifyDigests { offset, block, digests }) => {
                    // Nothing is applied between two secondaries: compare now.
                    let (job, compare) = match self.verify.target_digests(&self.engine, offset, block, digests) {
                        Ok(Some(x)) => x,
                        Ok(None) => continue,
                        Err(e) => return Outcome::Failed(format!("verify: {e}")),
                    };
                    if let Err(e) = compare.await {
                        return Outcome::Failed(format!("verify read: {e}"));
                    }
                    if let Err(o) = self.verify_target_done(job).await {
                        return o;
                    }
                }
                Tick::Frame(m) if m.is_verify() => {
                    if let Err(o) = self.verify_message(m).await {
                        return o;
                    }
                }
                Tick::Frame(m) => {
                    if let Err(o) = self.unexpected(Side::Idle, m) {
                        return o;
                    }
                }
            }
        }
    }

    /// The peer (both secondary, both blank) declared a new generation
    /// with both disks uptodate and no sync: take it, if we are blank too.
    fn take_peer_generation(&mut self, peer: &PeerInfo) -> Result<(), String> {
        let engine = &self.engine;
        let meta = engine.meta();
        let lsn = engine.store.local_lsn();
        if meta.disk != DiskState::Inconsistent {
            return Err(format!("our disk is {}, not inconsistent", meta.disk));
        }
        if lsn != 0 {
            return Err(format!("our volume was written (local LSN {lsn})"));
        }
        if peer.disk != DiskState::UpToDate || peer.gen_ids.current == 0 {
            return Err("the peer did not announce an uptodate generation".into());
        }
        engine
            .store_disk(DiskState::UpToDate, Some(peer.gen_ids))
            .map_err(|e| format!("cannot record the disk: {e}"))?;
        engine.took_peer_generation();
        tracing::info!(peer = %peer.node, "new-current-uuid --clear-bitmap: both disks uptodate without a sync");
        let _ =
            self.tx.try_send(Message::State { role: Role::Secondary, disk: DiskState::UpToDate, out_of_sync_bytes: 0 });
        engine.set_peer(peer.role, DiskState::UpToDate);
        Ok(())
    }
}
