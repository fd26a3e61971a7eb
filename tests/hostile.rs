//! Defects found by hostile input (issue 15 part 4), each driven as a user
//! or an attacker would: a real repd, its real sockets, its real files.
//!
//! - a control request whose timeout overflows the clock;
//! - control requests the protocol does not define (unknown fields on
//!   commands without arguments, JSON arrays);
//! - a flood of junk connections on the replication port (the log);
//! - `create-md` of a volume whose dirty bitmap cannot fit in memory;
//! - a WAL segment missing in the middle of the log;
//! - NBD clients that never read their READ replies (memory).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::TestNode;
use common::pair::{Pair, PairOpts};

/// One raw control connection, as `socat` would use it.
struct RawControl {
    reader: BufReader<UnixStream>,
}

impl RawControl {
    fn connect(path: &std::path::Path) -> RawControl {
        let s = UnixStream::connect(path).unwrap_or_else(|e| panic!("connect {}: {e}", path.display()));
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        RawControl { reader: BufReader::new(s) }
    }

    fn send(&mut self, line: &str) {
        self.reader.get_mut().write_all(format!("{line}\n").as_bytes()).expect("send a request");
    }

    /// The next response line; `None` when the daemon closed the connection.
    fn answer(&mut self) -> Option<serde_json::Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => Some(serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad answer {line:?}: {e}"))),
            Err(e) => panic!("no answer within 10s: {e}"),
        }
    }

    fn ask(&mut self, line: &str) -> serde_json::Value {
        self.send(line);
        self.answer().unwrap_or_else(|| panic!("repd closed the connection instead of answering {line}"))
    }
}

/// Alpha of a two-node resource, running alone (its peer never starts): the
/// replication engine runs, the connection stays `connecting`.
fn lone_alpha() -> Pair {
    let mut pair = Pair::new(PairOpts::new("C"));
    pair.alpha.create_md();
    pair.alpha.start();
    pair
}

/// `{"cmd":"disconnect","dry_run":true}` disconnected and `["demote", true]`
/// was served, though docs/cli.md says unknown fields get "bad request".
#[test]
fn malformed_control_requests_get_bad_request_and_change_nothing() {
    let pair = lone_alpha();
    let mut c = RawControl::connect(&pair.alpha.control());
    let connection = |c: &mut RawControl| c.ask(r#"{"cmd":"status"}"#)["result"]["connection"].clone();
    assert_eq!(connection(&mut c), "connecting");
    for line in [
        r#"{"cmd":"disconnect","dry_run":true}"#,
        r#"{"cmd":"disconnect","force":false}"#,
        r#"["disconnect"]"#,
        r#"["demote", true]"#,
        r#"{"cmd":"status","verbose":true}"#,
        r#""disconnect""#,
        r#"{"cmd":"promote","force":true,"forse":true}"#,
    ] {
        let a = c.ask(line);
        assert_eq!(a["ok"], false, "{line} must be refused: {a}");
        let e = a["error"].as_str().unwrap_or_default();
        assert!(e.starts_with("bad request: "), "{line}: {e}");
    }
    // None of them did anything: still connecting, still secondary.
    assert_eq!(connection(&mut c), "connecting", "a refused request changed the connection");
    assert_eq!(c.ask(r#"{"cmd":"status"}"#)["result"]["role"], "secondary");
    // The documented forms still work.
    assert_eq!(c.ask(r#"{"cmd":"disconnect"}"#)["ok"], true);
    assert_eq!(connection(&mut c), "standalone");
}
