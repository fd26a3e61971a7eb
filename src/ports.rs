//! Loopback ports for the pairs that tests and `repbench` start.
//!
//! A port obtained by binding port 0 comes from the kernel's ephemeral
//! range (`net.ipv4.ip_local_port_range`, 32768–60999 by default), the
//! same range the kernel draws the *source* port of every outgoing
//! connection from. Handing such a port to a daemon that binds it a moment
//! later races every dial on the machine: a node dialing its peer before
//! the peer listens can be given that very port as its source port and
//! connect to itself (TCP simultaneous open), and then the peer's bind
//! fails with "Address already in use". Ports below the ephemeral range are
//! never chosen as source ports, so [`unused_local_port`] picks there.

use std::collections::HashSet;
use std::net::TcpListener;
use std::sync::Mutex;

/// The lowest port handed out: above the ports services usually use.
const FLOOR: u16 = 10_000;

/// Ports this process already handed out (never returned twice, so that
/// two calls in a row give two ports even before either is bound).
static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// The kernel's ephemeral port range (the default when it cannot be read).
pub fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|p| p.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32_768, 60_999))
}

/// A TCP port on 127.0.0.1 that nobody listens on now, outside the
/// ephemeral range, and not handed out before by this process. Random, so
/// that test processes running at once rarely try the same one; checked
/// by binding it.
pub fn unused_local_port() -> std::io::Result<u16> {
    let (lo, hi) = ephemeral_range();
    // The candidates: below the ephemeral range, or above it when it
    // starts too low to leave room.
    let (first, last) = if lo > FLOOR + 1_000 { (FLOOR, lo - 1) } else { (hi.saturating_add(1).max(FLOOR), u16::MAX) };
    let span = u32::from(last - first) + 1;
    let mut handed = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
    let handed = handed.get_or_insert_with(HashSet::new);
    for _ in 0..1_000 {
        let port = first + (rand::random::<u32>() % span) as u16;
        if handed.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            handed.insert(port);
            return Ok(port);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrNotAvailable,
        format!("no free TCP port on 127.0.0.1 between {first} and {last} after 1000 tries"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_outside_the_ephemeral_range_distinct_and_free() {
        let (lo, hi) = ephemeral_range();
        let ports: Vec<u16> = (0..50).map(|_| unused_local_port().expect("a port")).collect();
        let distinct: HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len(), "a port was handed out twice: {ports:?}");
        for p in &ports {
            assert!(*p < lo || *p > hi, "port {p} lies in the ephemeral range {lo}-{hi}");
            TcpListener::bind(("127.0.0.1", *p)).expect("the port is free to bind");
        }
    }
}
