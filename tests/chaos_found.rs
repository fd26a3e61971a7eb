//! Defects the fault campaign (`repbench chaos`, docs/reliability.md)
//! found, each minimised to a test that drives real repd processes.

mod common;

use std::time::Duration;

use common::pair::{Pair, PairOpts};

/// `repbench chaos --seed 1000`, cycle 596 (`kill-primary`): the restarted
/// primary was promoted before its peer reconnected (a new generation at
/// the promote, no write yet), so the decision at the connect was a log
/// catch-up "with nothing to replay" (both at the same LSN, rule
/// `newer-generation`). The source logged "peer is up to date: no sync" and
/// streamed its feed; the target waited for a catch-up that never came and
/// was never `established` (status `connection: connecting`, `replication`
/// null) while the source said connected and established; `wait-sync`
/// could not return. Here: the primary is stopped, restarted alone and
/// promoted, then the link comes back. Failed before the fix: the source
/// now runs the catch-up with nothing to replay (`SyncStart`, `SyncEnd`,
/// src/repl/resync/catchup.rs `Catchup::nothing_to_replay`), and the
/// target ends it like any other.
#[test]
fn a_log_catch_up_with_nothing_to_replay_establishes_the_pair() {
    let mut pair = Pair::up(PairOpts::new("C").proxied());
    let c = pair.rt.block_on(pair.alpha.nbd());
    pair.rt.block_on(async {
        c.write(0, &[7u8; 4096], true).await.expect("write");
    });
    drop(c);
    pair.alpha.wait_status("beta wrote everything", Duration::from_secs(10), |s| {
        s["lsn"]["peer_written"] == s["lsn"]["local"]
    });
    pair.partition();
    // A clean stop: nothing is marked at the restart (a SIGKILL would
    // re-mark the records past the persisted peer LSN: a bitmap resync).
    pair.alpha.term();
    pair.alpha.start();
    pair.alpha.repctl_ok(&["promote"]);
    pair.heal();
    // The same LSN on both, a newer generation on alpha: "log catch-up with
    // nothing to replay"; both must end established and uptodate.
    pair.assert_established();
    let b = pair.beta.status();
    assert_eq!(b["decision"]["result"], "target-log", "the case under test: {b:#}");
}
