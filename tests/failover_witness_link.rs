//! The data nodes' witness link (issue 10): real `repd` processes for
//! alpha, beta and the witness gamma on loopback.
//!
//! - With `[failover] mode = "witness"` both data nodes keep a link to the
//!   witness: `status.failover.witness.connected`, `witness-connected` /
//!   `witness-lost` events, the witness's view of term and primary.
//! - Losing the witness changes nothing while both data nodes are up:
//!   writes are acknowledged and replicated, no role or term change
//!   (brief §5.7 test 7, first part), and the links come back when it does.
//! - The term the witness granted (alpha's promote goes through it) is
//!   adopted by the secondary, persisted in the superblock (it survives
//!   SIGKILL).
//! - A version-2 superblock (before the term) opens as term 0 and is
//!   written back as version 3.
//!
//! Automatic promotion, fencing and solo grants: tests/failover_auto.rs.

mod common;

use std::time::{Duration, Instant};

use common::witness::{pair_with_witness, wait_event};
use serde_json::Value;

fn witness_connected(s: &Value) -> bool {
    s["failover"]["witness"]["connected"] == true
}

#[test]
fn data_nodes_keep_a_witness_link_and_losing_the_witness_changes_nothing() {
    let (mut pair, mut w) = pair_with_witness("mode = \"witness\"");
    w.repctl_ok(&["create-md"]);
    w.start();
    pair.bring_up();

    for p in [&pair.alpha, &pair.beta] {
        let s = p.wait_status("witness link up", Duration::from_secs(10), witness_connected);
        let f = &s["failover"];
        assert_eq!(f["mode"], "witness", "{s:#}");
        assert_eq!((f["witness"]["name"].clone(), f["witness"]["has_state"].clone()), ("gamma".into(), true.into()));
        assert_eq!(f["enabled"], true, "{s:#}");
        // alpha's promote claimed term 1 through the witness.
        assert_eq!(s["term"], 1, "{s:#}");
    }
    let s = pair.alpha.status();
    assert_eq!(s["failover"]["eligible_reason"], "this node is the primary", "{s:#}");
    // beta is eligible once alpha told the witness it is up to date.
    pair.beta.wait_status("beta eligible", Duration::from_secs(10), |s| s["failover"]["eligible"] == true);
    let human = pair.beta.repctl_ok(&["status"]);
    assert!(
        human.contains("  failover:witness term:1 witness:gamma(connected, term 1, primary alpha) eligible:yes"),
        "{human}"
    );
    let ws = w.status();
    let connected: Vec<&str> = ws["connected"].as_array().unwrap().iter().filter_map(|c| c["node"].as_str()).collect();
    assert_eq!(connected, ["alpha", "beta"], "{ws:#}");

    // The witness goes away (SIGKILL): both data nodes notice at once (EOF)
    // and go on as before.
    let (_ea, alpha_events) = common::spawn_events(&pair.alpha.config, "alpha", &[]);
    std::thread::sleep(Duration::from_millis(300));
    let killed = Instant::now();
    w.kill9();
    let lost = wait_event(&alpha_events, "witness-lost", Duration::from_secs(5), |v| v["event"] == "witness-lost");
    println!("alpha saw witness-lost {} ms after the SIGKILL: {lost}", killed.elapsed().as_millis());
    let s = pair.alpha.wait_status("witness link down", Duration::from_secs(5), |s| !witness_connected(s));
    assert!(s["failover"]["witness"]["last_error"].is_string(), "{s:#}");

    // Writes while the witness is down: acknowledged, flushed, replicated.
    let data: Vec<u8> = (0..(4 << 20)).map(|i: usize| (i.wrapping_mul(31) >> 3) as u8).collect();
    let t = Instant::now();
    pair.rt.block_on(async {
        let c = pair.alpha.nbd().await;
        c.write(0, &data, false).await.expect("write with the witness down");
        c.flush().await.expect("flush with the witness down");
    });
    println!("4 MiB written and flushed on alpha with the witness down in {} ms", t.elapsed().as_millis());
    for (p, role) in [(&pair.alpha, "primary"), (&pair.beta, "secondary")] {
        let s = p.status();
        assert_eq!((s["role"].clone(), s["connection"].clone()), (role.into(), "connected".into()), "{s:#}");
        assert_eq!(s["term"], 1, "no term change without the witness: {s:#}");
    }
    let s = pair.alpha.status();
    assert_eq!(s["lsn"]["peer_durable"], s["lsn"]["local"], "beta holds every flushed write: {s:#}");

    // The witness is back: both links come back by themselves.
    w.start();
    for p in [&pair.alpha, &pair.beta] {
        p.wait_status("witness link up again", Duration::from_secs(10), witness_connected);
    }
    wait_event(&alpha_events, "witness-connected", Duration::from_secs(5), |v| v["event"] == "witness-connected");

    // Nothing moved while the witness was away: term 1, alpha primary.
    let ws = w.status();
    assert_eq!((ws["term"].clone(), ws["primary"].clone()), (1.into(), "alpha".into()), "{ws:#}");
    // Persisted before it was acted on: it survives SIGKILL.
    pair.beta.kill9();
    pair.beta.start();
    let s = pair.beta.status();
    assert_eq!(s["term"], 1, "the term is in beta's superblock: {s:#}");
}

#[test]
fn a_version_2_superblock_opens_as_term_0_and_is_written_back_as_version_3() {
    const SLOT: usize = 4096;
    let mut node = common::TestNode::new("sync");
    node.create_md();
    let meta = node.data_dir().join("meta");
    let mut raw = std::fs::read(&meta).expect("read meta");
    // Turn every valid slot into a version-2 one (byte 288 was reserved).
    for slot in 0..2 {
        let b = &mut raw[slot * SLOT..(slot + 1) * SLOT];
        if &b[0..8] != b"RBLKMETA" {
            continue;
        }
        assert_eq!(u32::from_le_bytes(b[8..12].try_into().unwrap()), 3, "create-md writes version 3");
        b[8..12].copy_from_slice(&2u32.to_le_bytes());
        b[288..296].fill(0);
        let crc = crc32c::crc32c(&b[..SLOT - 4]);
        b[SLOT - 4..].copy_from_slice(&crc.to_le_bytes());
    }
    std::fs::write(&meta, &raw).expect("write meta");
    node.start();
    assert_eq!(node.status()["term"], 0);
    assert!(node.term().success(), "clean stop:\n{}", node.log());
    let raw = std::fs::read(&meta).expect("read meta");
    let versions: Vec<(u64, u32)> = (0..2)
        .filter(|s| &raw[s * SLOT..s * SLOT + 8] == b"RBLKMETA")
        .map(|s| {
            let b = &raw[s * SLOT..(s + 1) * SLOT];
            (u64::from_le_bytes(b[16..24].try_into().unwrap()), u32::from_le_bytes(b[8..12].try_into().unwrap()))
        })
        .collect();
    let newest = versions.iter().max().expect("a valid slot");
    assert_eq!(newest.1, 3, "the newest slot after a run is version 3: {versions:?}");
}
