//! Tests of the config file: every rule, every error message.

use super::parse::line_col;
use super::*;

const ONE: &str = r#"
name = "r0"
size = "64MiB"

[[node]]
name = "alpha"
nbd = "127.0.0.1:10809"
control = "/run/repblock/r0-alpha.sock"
dir = "/var/lib/repblock/r0-alpha"
"#;

const TWO: &str = r#"
name = "r0"
size = "1GiB"
protocol = "B"
secret = "change-me"
block_size = "8KiB"
io_engine = "sync"
wal_segment_size = "16MiB"
checkpoint_bytes = 134217728
checkpoint_interval = "5s"
max_clients = 8

[[node]]
name = "alpha"
replication = "10.0.0.1:7790"
replication_listen = "0.0.0.0:7790"
nbd = "127.0.0.1:10809"
control = "/run/repblock/r0-alpha.sock"
dir = "/var/lib/repblock/r0-alpha"

[[node]]
name = "beta"
replication = "10.0.0.2:7790"
nbd = "unix:/run/repblock/r0-beta.nbd"
control = "/run/repblock/r0-beta.sock"
dir = "/var/lib/repblock/r0-beta"
disk = "/dev/vg0/r0"
"#;

fn load(text: &str) -> Result<Config, ConfigError> {
    Config::from_toml(Path::new("r0.toml"), text)
}

fn err(text: &str) -> String {
    load(text).expect_err("config must be refused").to_string()
}

#[test]
fn single_node_gets_defaults() {
    let c = load(ONE).unwrap();
    assert_eq!(c.name, "r0");
    assert_eq!(c.size, 64 << 20);
    assert_eq!(c.protocol, Protocol::C);
    assert_eq!(c.secret, None);
    assert_eq!(c.block_size, 4096);
    assert_eq!(c.io_engine, EngineChoice::Auto);
    assert_eq!(c.wal_segment_size, 64 << 20);
    assert_eq!(c.checkpoint_bytes, 256 << 20);
    assert_eq!(c.checkpoint_interval, Duration::from_secs(30));
    assert_eq!(c.max_clients, 256);
    assert_eq!(c.nodes.len(), 1);
    let n = c.node("alpha").unwrap();
    assert_eq!(n.nbd, NbdAddress::Tcp { host: "127.0.0.1".into(), port: 10809 });
    assert_eq!(n.control, PathBuf::from("/run/repblock/r0-alpha.sock"));
    assert_eq!(n.replication, None);
    assert!(c.peer_of("alpha").is_none());
}

#[test]
fn two_nodes_with_every_field() {
    let c = load(TWO).unwrap();
    assert_eq!(c.protocol, Protocol::B);
    assert_eq!(c.block_size, 8192);
    assert_eq!(c.io_engine, EngineChoice::Sync);
    assert_eq!(c.wal_segment_size, 16 << 20);
    assert_eq!(c.checkpoint_bytes, 128 << 20);
    assert_eq!(c.checkpoint_interval, Duration::from_secs(5));
    assert_eq!(c.max_clients, 8);
    let b = c.node("beta").unwrap();
    assert_eq!(b.nbd, NbdAddress::Unix("/run/repblock/r0-beta.nbd".into()));
    assert_eq!(b.nbd.uri("r0"), "nbd+unix:///r0?socket=/run/repblock/r0-beta.nbd");
    assert_eq!(b.disk, Some(PathBuf::from("/dev/vg0/r0")));
    assert_eq!(c.peer_of("beta").unwrap().name, "alpha");
    assert_eq!(c.node("alpha").unwrap().replication_listen.as_deref(), Some("0.0.0.0:7790"));
}

#[test]
fn relative_paths_are_relative_to_the_config_file() {
    let text = ONE.replace("/run/repblock/r0-alpha.sock", "ctl.sock").replace("/var/lib/repblock/r0-alpha", "data");
    let c = Config::from_toml(Path::new("/etc/repblock/r0.toml"), &text).unwrap();
    assert_eq!(c.nodes[0].control, PathBuf::from("/etc/repblock/ctl.sock"));
    assert_eq!(c.nodes[0].dir, PathBuf::from("/etc/repblock/data"));
    // A config named relative to the working directory still yields
    // absolute paths.
    let c = Config::from_toml(Path::new("r0.toml"), &text).unwrap();
    assert!(c.nodes[0].dir.is_absolute(), "{}", c.nodes[0].dir.display());
    assert_eq!(c.nodes[0].dir, std::env::current_dir().unwrap().join("data"));
}

#[test]
fn bad_nbd_address_names_node_and_field() {
    let text = TWO.replace("nbd = \"unix:/run/repblock/r0-beta.nbd\"", "nbd = \"10809\"");
    assert_eq!(err(&text), r#"r0.toml: node[1].nbd: expected "host:port" or "unix:/path", got "10809""#);
    let text = ONE.replace("127.0.0.1:10809", "unix:");
    assert!(err(&text).contains("node[0].nbd: expected"), "{}", err(&text));
    let text = ONE.replace("\"127.0.0.1:10809\"", "10809");
    assert_eq!(err(&text), r#"r0.toml: node[0].nbd: expected "host:port" or "unix:/path", got the number 10809"#);
}

#[test]
fn bad_size_shows_examples() {
    let text = ONE.replace("\"64MiB\"", "\"1 GB\"");
    assert_eq!(err(&text), r#"r0.toml: size: "1 GB" is not a size (examples: "512MiB", "1GiB")"#);
    let text = ONE.replace("\"64MiB\"", "-5");
    assert_eq!(err(&text), "r0.toml: size: expected a size, got the negative number -5");
    let text = ONE.replace("\"64MiB\"", "\"1000\"");
    assert!(err(&text).starts_with("r0.toml: size: expected a non-zero multiple of block_size (4KiB)"));
    let text = ONE.replace("\"64MiB\"", "0");
    assert!(err(&text).starts_with("r0.toml: size: expected a non-zero multiple"));
}

#[test]
fn unknown_field_keeps_line_and_names_node() {
    let text = ONE.replace("size = ", "sise = ");
    let e = err(&text);
    assert!(e.starts_with(r#"r0.toml: unknown field "sise""#), "{e}");
    assert!(e.contains("(line 3, column 1)"), "{e}");
    let text = ONE.replace("dir = ", "dirr = ");
    let e = err(&text);
    assert!(e.starts_with(r#"r0.toml: node[0]: unknown field "dirr""#), "{e}");
    assert!(e.contains("line 9"), "{e}");
}

proptest::proptest! {
    /// Whatever the file holds, loading it answers (Ok or Err), never
    /// panics; damaged versions of a valid file included.
    #[test]
    fn never_panics(text in "\\PC{0,200}", cut in 0usize..400, junk in "\\PC{0,8}") {
        let _ = load(&text);
        let mut damaged = ONE.to_string();
        let at = (0..=cut.min(damaged.len())).rev().find(|i| damaged.is_char_boundary(*i)).unwrap_or(0);
        damaged.insert_str(at, &junk);
        let _ = load(&damaged);
        let _ = load(&ONE[..(0..=cut.min(ONE.len())).rev().find(|i| ONE.is_char_boundary(*i)).unwrap_or(0)]);
    }
}

#[test]
fn positions_survive_multibyte_text() {
    let text = "# é\nnamé = 1\n";
    assert_eq!(line_col(text, 5), (2, 1));
    assert_eq!(line_col(text, 3), (1, 3), "inside a character: cut before it");
    assert_eq!(line_col(text, 999), (3, 1));
    let e = err(&format!("# ünïcödé ✓\n{ONE}\n\"nöde\" = 1\n"));
    assert!(e.contains("unknown field \"nöde\""), "{e}");
    let e = err(&format!("# ünïcödé ✓\n{ONE}\nnöde = 1\n"));
    assert!(e.contains("invalid unquoted key") && e.contains("line 12, column 2"), "{e}");
}

#[test]
fn toml_syntax_error_has_line() {
    let e = err("name = \"r0\"\nsize = \n");
    assert!(e.starts_with("r0.toml: "), "{e}");
    assert!(e.contains("line 2"), "{e}");
}

#[test]
fn missing_fields_are_named() {
    assert!(err(&ONE.replace("name = \"r0\"", "")).starts_with("r0.toml: name: missing"));
    assert!(err(&ONE.replace("size = \"64MiB\"", "")).starts_with("r0.toml: size: missing"));
    assert!(err(&ONE.replace("nbd = \"127.0.0.1:10809\"", "")).starts_with("r0.toml: node[0].nbd: missing"));
    assert!(err(&ONE.replace("control = ", "#")).starts_with("r0.toml: node[0].control: missing"));
    assert!(err(&ONE.replace("dir = ", "#")).starts_with("r0.toml: node[0].dir: missing"));
    assert_eq!(err("name = \"r0\"\nsize = \"1GiB\"\n"), "r0.toml: node: expected one or two [[node]] sections, got 0");
}

#[test]
fn bad_names() {
    let e = err(&ONE.replace("name = \"r0\"", "name = \"r 0\""));
    assert_eq!(e, r#"r0.toml: name: expected 1 to 64 characters from [A-Za-z0-9_.-], got "r 0""#);
    let long = "a".repeat(65);
    assert!(
        err(&ONE.replace("\"alpha\"", &format!("\"{long}\""))).starts_with("r0.toml: node[0].name: expected 1 to 64")
    );
    assert!(err(&ONE.replace("name = \"r0\"", "name = \"\"")).starts_with("r0.toml: name: expected"));
    assert!(err(&ONE.replace("name = \"r0\"", "name = 7")).contains("got the number 7"));
}

#[test]
fn enums_and_ranges() {
    assert_eq!(
        err(&ONE.replace("size = \"64MiB\"", "size = \"64MiB\"\nprotocol = \"D\"")),
        r#"r0.toml: protocol: expected "A", "B" or "C", got "D""#
    );
    assert_eq!(
        err(&ONE.replace("size = \"64MiB\"", "size = \"64MiB\"\nio_engine = \"aio\"")),
        r#"r0.toml: io_engine: expected "auto", "io_uring" or "sync", got "aio""#
    );
    assert_eq!(
        err(&ONE.replace("size = \"64MiB\"", "size = \"64MiB\"\nblock_size = \"3KiB\"")),
        "r0.toml: block_size: expected a power of two from 512B to 1MiB, got 3KiB"
    );
    assert!(err(&ONE.replace("size = \"64MiB\"", "size = \"64MiB\"\nblock_size = \"2MiB\"")).contains("block_size"));
    assert!(
        err(&ONE.replace("size = \"64MiB\"", "size = \"64MiB\"\nmax_clients = 0"))
            .starts_with("r0.toml: max_clients: expected a number from 1 to 65536, got the number 0")
    );
    assert!(
        err(&ONE.replace("size = \"64MiB\"", "size = \"64MiB\"\nmax_clients = \"8\""))
            .starts_with("r0.toml: max_clients:")
    );
    assert!(
        err(&ONE.replace("size = \"64MiB\"", "size = \"64MiB\"\ncheckpoint_interval = \"soon\""))
            .starts_with(r#"r0.toml: checkpoint_interval: "soon" is not a duration"#)
    );
    assert!(
        err(&ONE.replace("size = \"64MiB\"", "size = \"64MiB\"\ncheckpoint_interval = 30"))
            .starts_with("r0.toml: checkpoint_interval: expected a duration")
    );
    assert!(
        err(&ONE.replace("size = \"64MiB\"", "size = \"64MiB\"\nwal_segment_size = \"4KiB\""))
            .starts_with("r0.toml: wal_segment_size: expected at least 1MiB")
    );
    assert!(
        err(&ONE.replace("size = \"64MiB\"", "size = \"64MiB\"\ncheckpoint_bytes = 0"))
            .starts_with("r0.toml: checkpoint_bytes:")
    );
}

#[test]
fn two_nodes_need_secret_and_replication() {
    assert_eq!(
        err(&TWO.replace("secret = \"change-me\"", "")),
        "r0.toml: secret: missing (required with two nodes: it authenticates the replication link)"
    );
    assert!(
        err(&TWO.replace("replication = \"10.0.0.2:7790\"", "")).starts_with("r0.toml: node[1].replication: missing")
    );
    assert_eq!(
        err(&TWO.replace("\"10.0.0.2:7790\"", "\"10.0.0.2\"")),
        r#"r0.toml: node[1].replication: expected "host:port", got "10.0.0.2""#
    );
    assert!(
        err(&TWO.replace("\"0.0.0.0:7790\"", "\"0.0.0.0:99999\"")).starts_with("r0.toml: node[0].replication_listen:")
    );
}

#[test]
fn two_hosts_may_use_the_same_paths_and_ports() {
    let same_layout = TWO
        .replace("unix:/run/repblock/r0-beta.nbd", "127.0.0.1:10809")
        .replace("r0-beta.sock", "r0-alpha.sock")
        .replace("/var/lib/repblock/r0-beta", "/var/lib/repblock/r0-alpha");
    let c = load(&same_layout).expect("one file for two hosts with the same layout");
    assert_eq!(c.node("alpha").expect("alpha").dir, c.node("beta").expect("beta").dir);
}

#[test]
fn duplicates_are_refused() {
    assert_eq!(err(&TWO.replace("\"beta\"", "\"alpha\"")), r#"r0.toml: node[1].name: "alpha" is used by two nodes"#);
    // Both nodes on one host: ports and paths must differ.
    let one_host = TWO.replace("10.0.0.1:7790", "127.0.0.1:7790").replace("10.0.0.2:7790", "127.0.0.1:7791");
    assert!(
        err(&one_host.replace("unix:/run/repblock/r0-beta.nbd", "127.0.0.1:10809"))
            .starts_with("r0.toml: node[1].nbd: \"127.0.0.1:10809\" is also node[0].nbd")
    );
    assert!(err(&one_host.replace("r0-beta.sock", "r0-alpha.sock")).starts_with("r0.toml: node[1].control:"));
    assert!(
        err(&one_host.replace("/var/lib/repblock/r0-beta", "/var/lib/repblock/r0-alpha"))
            .starts_with("r0.toml: node[1].dir:")
    );
    assert!(err(&one_host.replace("127.0.0.1:7791", "127.0.0.1:7790")).starts_with("r0.toml: node[1].replication:"));
    let three = format!("{TWO}\n[[node]]\nname = \"gamma\"\n");
    assert!(err(&three).starts_with("r0.toml: node: expected one or two [[node]] sections, got 3"));
}

#[test]
fn unknown_node_lists_present_ones() {
    let c = load(TWO).unwrap();
    assert_eq!(
        c.node("gamma").unwrap_err().to_string(),
        r#"r0.toml: no node named "gamma" (nodes in this file: alpha, beta)"#
    );
}

#[test]
fn nbd_inflight_bound_and_stall_timeout() {
    let with = |extra: &str| ONE.replace("size = \"64MiB\"", &format!("size = \"64MiB\"\n{extra}"));
    let c = load(ONE).unwrap();
    assert_eq!(c.nbd_max_inflight, 256 << 20);
    assert_eq!(c.nbd_stall_timeout, Duration::from_secs(30));
    let c = load(&with("nbd_max_inflight = \"1GiB\"\nnbd_stall_timeout = \"5s\"")).unwrap();
    assert_eq!((c.nbd_max_inflight, c.nbd_stall_timeout), (1 << 30, Duration::from_secs(5)));
    assert_eq!(
        err(&with("nbd_max_inflight = \"1MiB\"")),
        "r0.toml: nbd_max_inflight: expected 32MiB (one maximum NBD request) to 1TiB, got 1MiB"
    );
    assert_eq!(err(&with("nbd_stall_timeout = \"0s\"")), "r0.toml: nbd_stall_timeout: expected 1s to 24h, got 0s");
}

#[test]
fn host_port_forms() {
    assert_eq!(parse_host_port("127.0.0.1:10809"), Some(("127.0.0.1", 10809)));
    assert_eq!(parse_host_port("[::1]:10809"), Some(("[::1]", 10809)));
    assert_eq!(parse_host_port("node-a.example:7790"), Some(("node-a.example", 7790)));
    for bad in ["10809", ":10809", "host:", "host:0", "host:65536", "::1:80", "[zz]:80", "a b:1"] {
        assert_eq!(parse_host_port(bad), None, "{bad}");
    }
}

#[test]
fn demo_config_is_valid() {
    let text = demo_toml(1 << 30, "127.0.0.1:10809");
    let c = Config::from_toml(Path::new("/tmp/demo/r0.toml"), &text).unwrap();
    assert_eq!(c.size, 1 << 30);
    assert_eq!(c.nodes[0].control, PathBuf::from("/tmp/demo/control.sock"));
    assert_eq!(c.nodes[0].dir, PathBuf::from("/tmp/demo/data"));
}

#[test]
fn handlers_are_argv_lists_with_a_timeout() {
    let c = load(TWO).unwrap();
    assert_eq!(c.handlers, Handlers::default());
    let with = |extra: &str| TWO.replacen("max_clients = 8", &format!("max_clients = 8\n{extra}"), 1);
    let c = load(&with("[handlers]\ntimeout = \"5s\"\npeer_lost = [\"/bin/logger\", \"-t\", \"repblock\"]")).unwrap();
    assert_eq!(c.handlers.timeout, Duration::from_secs(5));
    assert_eq!(c.handlers.peer_lost, Some(vec!["/bin/logger".into(), "-t".into(), "repblock".into()]));
    assert_eq!(c.handlers.on_promote, None);
    let c = load(&with("[handlers]\nbefore_resync_target = [\"/snap\", \"r0\"]\nfence_peer = [\"/fence\"]")).unwrap();
    assert_eq!(c.handlers.before_resync_target, Some(vec!["/snap".into(), "r0".into()]));
    assert_eq!(c.handlers.fence_peer, Some(vec!["/fence".into()]));
    for (bad, want) in [
        ("[handlers]\nfence_peer = \"/fence\"", "handlers.fence_peer: expected an argv list"),
        ("[handlers]\nbefore_resync_target = []", "handlers.before_resync_target: expected an argv list"),
        ("[handlers]\npeer_lost = \"/bin/logger\"", "handlers.peer_lost: expected an argv list"),
        ("[handlers]\npeer_lost = []", "handlers.peer_lost: expected an argv list"),
        ("[handlers]\npeer_lost = [\"\"]", "handlers.peer_lost: expected an argv list"),
        ("[handlers]\npeer_lost = [\"/x\", 3]", "handlers.peer_lost: expected an argv list"),
        ("[handlers]\ntimeout = \"0s\"", "handlers.timeout"),
        ("[handlers]\nbefore_resync_targetx = [\"/x\"]", "before_resync_targetx"),
    ] {
        let e = load(&with(bad)).unwrap_err().to_string();
        assert!(e.contains(want), "{bad}: {e}");
    }
}

#[test]
fn metrics_address_is_optional_and_checked() {
    let c = load(TWO).unwrap();
    assert_eq!(c.node("alpha").unwrap().metrics, None);
    let with = TWO.replacen(
        "dir = \"/var/lib/repblock/r0-alpha\"",
        "dir = \"/var/lib/repblock/r0-alpha\"\nmetrics = \"127.0.0.1:9942\"",
        1,
    );
    let c = load(&with).unwrap();
    assert_eq!(c.node("alpha").unwrap().metrics.as_deref(), Some("127.0.0.1:9942"));
    assert_eq!(c.node("beta").unwrap().metrics, None);
    let bad = TWO.replacen(
        "dir = \"/var/lib/repblock/r0-alpha\"",
        "dir = \"/var/lib/repblock/r0-alpha\"\nmetrics = \"9942\"",
        1,
    );
    let e = load(&bad).unwrap_err().to_string();
    assert!(e.contains("node[0].metrics") && e.contains("host:port"), "{e}");
}

#[test]
fn replication_keys_have_defaults_and_are_checked() {
    let c = load(TWO).unwrap();
    assert_eq!(c.ping_interval, Duration::from_secs(1));
    assert_eq!(c.ping_timeout, Duration::from_millis(500));
    assert_eq!(c.on_peer_loss, OnPeerLoss::Continue);
    assert_eq!(c.connect_retry, Duration::from_millis(100));
    assert_eq!(c.max_buffer, 64 << 20);
    let with = |extra: &str| TWO.replacen("protocol = \"B\"", &format!("protocol = \"B\"\n{extra}"), 1);
    let c = load(&with("ping_interval = \"250ms\"\nping_timeout = \"2s\"\non_peer_loss = \"suspend\"\nconnect_retry = \"1s\"\nmax_buffer = \"8MiB\"")).unwrap();
    assert_eq!(c.ping_interval, Duration::from_millis(250));
    assert_eq!(c.ping_timeout, Duration::from_secs(2));
    assert_eq!(c.on_peer_loss, OnPeerLoss::Suspend);
    assert_eq!(c.connect_retry, Duration::from_secs(1));
    assert_eq!(c.max_buffer, 8 << 20);
    assert_eq!(
        err(&with("on_peer_loss = \"panic\"")),
        "r0.toml: on_peer_loss: expected \"continue\" or \"suspend\", got \"panic\""
    );
    assert_eq!(err(&with("ping_timeout = \"0s\"")), "r0.toml: ping_timeout: expected a non-zero duration, got 0s");
    assert!(err(&with("max_buffer = \"4KiB\"")).starts_with("r0.toml: max_buffer: expected at least 1MiB"));
}

#[test]
fn resync_keys_have_defaults() {
    let c = load(ONE).unwrap();
    assert_eq!(c.bitmap_granularity, 4096);
    assert_eq!(c.wal_retain, 1 << 30);
    assert_eq!(c.resync_rate, None);
    assert_eq!(c.after_sb_0pri, AfterSb0Pri::Disconnect);
    assert_eq!(c.after_sb_1pri, AfterSb1Pri::Disconnect);
    assert_eq!(c.split_brain_policy(), SplitBrainPolicy::default());
}

fn with_key(line: &str) -> String {
    ONE.replacen("size = \"64MiB\"", &format!("size = \"64MiB\"\n{line}"), 1)
}

#[test]
fn bitmap_granularity_is_a_power_of_two_from_4k_to_1m() {
    for (text, want) in [("\"4KiB\"", 4096), ("\"64KiB\"", 65536), ("\"1MiB\"", 1 << 20), ("8192", 8192)] {
        let c = load(&with_key(&format!("bitmap_granularity = {text}"))).unwrap();
        assert_eq!(c.bitmap_granularity, want, "{text}");
    }
    for (text, got) in [("\"2KiB\"", "2KiB"), ("\"2MiB\"", "2MiB"), ("\"12KiB\"", "12KiB"), ("0", "0B")] {
        assert_eq!(
            err(&with_key(&format!("bitmap_granularity = {text}"))),
            format!("r0.toml: bitmap_granularity: expected a power of two from 4KiB to 1MiB, got {got}")
        );
    }
    assert_eq!(
        err(&with_key("bitmap_granularity = \"big\"")),
        r#"r0.toml: bitmap_granularity: "big" is not a size (examples: "512MiB", "1GiB")"#
    );
    assert!(err(&with_key("bitmap_granularity = true")).starts_with("r0.toml: bitmap_granularity: expected a size"));
}

#[test]
fn resync_keys_reach_the_volume() {
    let c = load(&with_key("bitmap_granularity = \"64KiB\"\nwal_retain = \"256MiB\"")).unwrap();
    let opts = c.volume_options(&c.nodes[0]);
    assert_eq!((opts.bitmap_granularity, opts.wal_retain), (64 << 10, 256 << 20));
    // Whatever the config accepts, the volume accepts.
    for g in [4u32 << 10, 8 << 10, 1 << 20] {
        let c = load(&with_key(&format!("bitmap_granularity = {g}"))).unwrap();
        assert!(crate::volume::bitmap::validate_granularity(c.bitmap_granularity).is_ok());
    }
}

#[test]
fn al_extents_is_drbds_range() {
    let c = load(&with_key("")).unwrap();
    assert_eq!(c.al_extents, crate::volume::al::DEFAULT_EXTENTS);
    assert_eq!(c.volume_options(&c.nodes[0]).al_extents, 1237);
    let c = load(&with_key("al_extents = 7")).unwrap();
    assert_eq!(c.volume_options(&c.nodes[0]).al_extents, 7);
    assert_eq!(load(&with_key("al_extents = 65534")).unwrap().al_extents, 65534);
    assert_eq!(
        err(&with_key("al_extents = 6")),
        "r0.toml: al_extents: expected a number from 7 to 65534, got the number 6"
    );
    assert!(err(&with_key("al_extents = 65535")).starts_with("r0.toml: al_extents: expected a number from 7 to 65534"));
    assert!(err(&with_key("al_extents = \"1237\"")).starts_with("r0.toml: al_extents: expected a number"));
}

#[test]
fn wal_retain_is_at_least_64m() {
    assert_eq!(load(&with_key("wal_retain = \"64MiB\"")).unwrap().wal_retain, 64 << 20);
    assert_eq!(load(&with_key("wal_retain = \"10GiB\"")).unwrap().wal_retain, 10 << 30);
    assert_eq!(err(&with_key("wal_retain = \"63MiB\"")), "r0.toml: wal_retain: expected at least 64MiB, got 63MiB");
    assert!(err(&with_key("wal_retain = -1")).starts_with("r0.toml: wal_retain: expected a size, got the negative"));
    assert!(err(&with_key("wal_retain = \"1 GiB\"")).starts_with("r0.toml: wal_retain: \"1 GiB\" is not a size"));
}

#[test]
fn resync_rate_is_a_rate_or_unlimited() {
    assert_eq!(load(&with_key("resync_rate = \"unlimited\"")).unwrap().resync_rate, None);
    assert_eq!(load(&with_key("resync_rate = \"100MiB/s\"")).unwrap().resync_rate, Some(100 << 20));
    assert_eq!(load(&with_key("resync_rate = \"20M\"")).unwrap().resync_rate, Some(20 << 20));
    assert_eq!(load(&with_key("resync_rate = 1048576")).unwrap().resync_rate, Some(1 << 20));
    let expected = r#"r0.toml: resync_rate: expected a rate such as "100MiB/s" or "unlimited""#;
    assert_eq!(err(&with_key("resync_rate = \"fast\"")), format!("{expected}, got \"fast\""));
    assert_eq!(err(&with_key("resync_rate = \"10MiB/h\"")), format!("{expected}, got \"10MiB/h\""));
    assert_eq!(err(&with_key("resync_rate = \"Unlimited\"")), format!("{expected}, got \"Unlimited\""));
    assert_eq!(err(&with_key("resync_rate = -5")), format!("{expected}, got -5"));
    assert_eq!(err(&with_key("resync_rate = 1.5")), format!("{expected}, got the number 1.5"));
    assert_eq!(err(&with_key("resync_rate = \"0/s\"")), format!("{expected}, got 0 (a resync would never finish)"));
}

#[test]
fn split_brain_policies_are_named_values() {
    for name in AfterSb0Pri::NAMES {
        let c = load(&with_key(&format!("after_sb_0pri = \"{name}\""))).unwrap();
        assert_eq!(c.after_sb_0pri.as_str(), name);
        assert_eq!(c.split_brain_policy().after_sb_0pri, c.after_sb_0pri);
    }
    for name in AfterSb1Pri::NAMES {
        let c = load(&with_key(&format!("after_sb_1pri = \"{name}\""))).unwrap();
        assert_eq!(c.after_sb_1pri.as_str(), name);
        assert_eq!(c.split_brain_policy().after_sb_1pri, c.after_sb_1pri);
    }
    let c =
        load(&with_key("after_sb_0pri = \"discard-least-changes\"\nafter_sb_1pri = \"discard-secondary\"")).unwrap();
    assert_eq!(
        c.split_brain_policy(),
        SplitBrainPolicy {
            after_sb_0pri: AfterSb0Pri::DiscardLeastChanges,
            after_sb_1pri: AfterSb1Pri::DiscardSecondary
        }
    );
    assert_eq!(
        err(&with_key("after_sb_0pri = \"discard-secondary\"")),
        r#"r0.toml: after_sb_0pri: expected "disconnect", "discard-younger-primary", "discard-least-changes" or "discard-zero-changes", got "discard-secondary""#
    );
    assert_eq!(
        err(&with_key("after_sb_1pri = \"discard-least-changes\"")),
        r#"r0.toml: after_sb_1pri: expected "disconnect", "discard-secondary" or "discard-zero-changes", got "discard-least-changes""#
    );
    assert_eq!(
        err(&with_key("after_sb_1pri = 1")),
        r#"r0.toml: after_sb_1pri: expected "disconnect", "discard-secondary" or "discard-zero-changes", got the number 1"#
    );
}

// ---------------------------------------------------------------------------
// [failover] and the witness node (issue 10).
// ---------------------------------------------------------------------------

const WITNESS_NODE: &str = r#"
[[node]]
name = "gamma"
witness = true
replication = "10.0.0.3:7790"
control = "/run/repblock/r0-gamma.sock"
dir = "/var/lib/repblock/r0-gamma"
"#;

/// TWO (protocol B in it) with protocol C, `extra` top-level lines, a
/// `[failover]` body, and the witness node.
fn with_failover(failover: &str, witness: &str) -> String {
    let two = TWO.replace("protocol = \"B\"", "protocol = \"C\"");
    let (top, nodes) = two.split_once("[[node]]").unwrap();
    format!("{top}[failover]\n{failover}\n\n[[node]]{nodes}{witness}")
}

#[test]
fn failover_is_off_by_default_and_existing_files_load_unchanged() {
    for text in [ONE, TWO] {
        let c = load(text).unwrap();
        assert_eq!(c.failover, FailoverConfig::default());
        assert_eq!(c.failover.mode, FailoverMode::Off);
        assert_eq!(c.failover.timings, FailoverTimings::DEFAULT);
        assert!(c.witness.is_none());
    }
    let c = load(TWO).unwrap();
    assert_eq!(c.node_order, ["alpha", "beta"]);
    assert_eq!(c.node_index("beta"), Some(NodeIndex(1)));
}

#[test]
fn witness_mode_with_a_witness_node() {
    let c = load(&with_failover("mode = \"witness\"", WITNESS_NODE)).unwrap();
    assert_eq!(c.failover.mode, FailoverMode::Witness);
    assert!(c.failover.enabled());
    assert_eq!(c.failover.timings, FailoverTimings::DEFAULT);
    assert_eq!(c.nodes.len(), 2, "the witness is not a data node");
    let w = c.witness.as_ref().unwrap();
    assert_eq!((w.name.as_str(), w.index, w.replication.as_str()), ("gamma", NodeIndex(2), "10.0.0.3:7790"));
    assert_eq!(w.dir, PathBuf::from("/var/lib/repblock/r0-gamma"));
    assert_eq!(c.node_order, ["alpha", "beta", "gamma"]);
    assert_eq!(c.node_name(NodeIndex(2)), Some("gamma"));
    assert!(c.witness_node("gamma").is_some() && c.witness_node("alpha").is_none());
    assert_eq!(c.peer_of("alpha").unwrap().name, "beta", "the witness is nobody's peer");
    let e = c.node("gamma").unwrap_err().to_string();
    assert!(e.contains("is the witness"), "{e}");
    // A witness node with failover off is accepted (it may be set up first).
    let c = load(&with_failover("mode = \"off\"", WITNESS_NODE)).unwrap();
    assert!(!c.failover.enabled() && c.witness.is_some());
}

#[test]
fn failover_timings_profile_and_overrides() {
    let c = load(&with_failover("mode = \"witness\"\nprofile = \"fast\"", WITNESS_NODE)).unwrap();
    assert_eq!(c.failover.timings, FailoverTimings::FAST);
    let body = "mode = \"witness\"\nheartbeat = \"100ms\"\nlease = \"2s\"\ndetect = \"3s\"\nfence_demote_after = \"4s\"\n\
                max_clock_drift = \"0.5%\"\nmax_auto_failovers = 5\nfailover_window = \"30m\"";
    let t = load(&with_failover(body, WITNESS_NODE)).unwrap().failover.timings;
    assert_eq!(t.heartbeat, Duration::from_millis(100));
    assert_eq!(t.lease, Duration::from_secs(2));
    assert_eq!(t.detect, Duration::from_secs(3));
    assert_eq!(t.fence_demote_after, Duration::from_secs(4));
    assert_eq!(t.max_clock_drift, Drift::ppm(5000));
    assert_eq!((t.max_auto_failovers, t.failover_window), (5, Duration::from_secs(1800)));
}

#[test]
fn failover_refusals_name_the_field() {
    let cases: &[(&str, &str, &str)] = &[
        ("mode = \"etcd\"", WITNESS_NODE, "failover.mode: expected \"off\" or \"witness\", got \"etcd\""),
        ("mode = \"witness\"", "", "failover.mode: \"witness\" needs a witness node"),
        ("profile = \"turbo\"", WITNESS_NODE, "failover.profile: expected \"default\" or \"fast\""),
        ("lease = \"500ms\"", WITNESS_NODE, "failover.lease: must be at least 4 x heartbeat (800ms)"),
        ("detect = \"100ms\"", WITNESS_NODE, "failover.detect: must be at least 3 x heartbeat"),
        ("fence_demote_after = \"500ms\"", WITNESS_NODE, "failover.fence_demote_after: must be at least lease"),
        ("max_clock_drift = \"20%\"", WITNESS_NODE, "failover.max_clock_drift: must be between"),
        ("max_clock_drift = \"lots\"", WITNESS_NODE, "failover.max_clock_drift: expected a percentage"),
        ("max_auto_failovers = -1", WITNESS_NODE, "failover.max_auto_failovers: expected a number"),
        ("allow_protocol_b = \"yes\"", WITNESS_NODE, "failover.allow_protocol_b: expected true or false"),
        ("heartbeat = \"1 fortnight\"", WITNESS_NODE, "failover.heartbeat:"),
        ("quorum = 2", WITNESS_NODE, "unknown field \"quorum\""),
    ];
    for (body, witness, want) in cases {
        let e = err(&with_failover(body, witness));
        assert!(e.contains(want), "{body}: {e}");
    }
}

#[test]
fn failover_needs_protocol_c_or_the_b_opt_in() {
    let on = "mode = \"witness\"";
    let a = with_failover(on, WITNESS_NODE).replace("protocol = \"C\"", "protocol = \"A\"");
    let e = err(&a);
    assert!(e.starts_with("r0.toml: protocol: automatic failover needs protocol \"C\""), "{e}");
    let b = with_failover(on, WITNESS_NODE).replace("protocol = \"C\"", "protocol = \"B\"");
    let e = err(&b);
    assert!(e.contains("protocol:") && e.contains("allow_protocol_b"), "{e}");
    let b_ok = with_failover("mode = \"witness\"\nallow_protocol_b = true", WITNESS_NODE)
        .replace("protocol = \"C\"", "protocol = \"B\"");
    let c = load(&b_ok).unwrap();
    assert!(c.failover.allow_protocol_b && c.protocol == Protocol::B);
    // Protocol A is fine while failover is off, witness node or not.
    let off = with_failover("mode = \"off\"", WITNESS_NODE).replace("protocol = \"C\"", "protocol = \"A\"");
    load(&off).unwrap();
    // on_peer_loss is the witness's decision with failover on.
    let opl = with_failover(on, WITNESS_NODE).replace("secret =", "on_peer_loss = \"suspend\"\nsecret =");
    let e = err(&opl);
    assert!(e.contains("on_peer_loss: not used with automatic failover"), "{e}");
}

#[test]
fn witness_node_rules() {
    let on = "mode = \"witness\"";
    let e = err(&with_failover(on, &format!("{WITNESS_NODE}nbd = \"127.0.0.1:10811\"\n")));
    assert!(e.contains("node[2].nbd: a witness node (witness = true) has no volume"), "{e}");
    let e = err(&with_failover(on, &format!("{WITNESS_NODE}disk = \"/dev/sdz\"\n")));
    assert!(e.contains("node[2].disk: a witness node"), "{e}");
    let e = err(&with_failover(on, &format!("{WITNESS_NODE}tls_dir = \"/pki\"\n")));
    assert!(e.contains("node[2].tls_dir: a witness node"), "{e}");
    let e = err(&with_failover(on, &WITNESS_NODE.replace("replication = \"10.0.0.3:7790\"\n", "")));
    assert!(e.contains("node[2].replication: missing"), "{e}");
    let e = err(&with_failover(on, &WITNESS_NODE.replace("witness = true", "witness = \"yes\"")));
    assert!(e.contains("node[2].witness: expected true or false"), "{e}");
    let second = WITNESS_NODE.replace("gamma", "delta");
    let e = err(&with_failover(on, &format!("{WITNESS_NODE}{second}")));
    assert!(e.contains("node[3].witness: a resource has at most one witness node"), "{e}");
    // Only one data node beside the witness.
    let e = err(&format!("{ONE}{WITNESS_NODE}"));
    assert!(e.contains("node[1].witness: a witness node needs two data nodes"), "{e}");
    // A witness on a data node's host needs its own port and paths.
    let same_host = WITNESS_NODE.replace("10.0.0.3:7790", "10.0.0.1:7790");
    let e = err(&with_failover(on, &same_host));
    assert!(e.contains("node[2].replication: \"10.0.0.1:7790\" is also node[0].replication"), "{e}");
    let ok = WITNESS_NODE.replace("10.0.0.3:7790", "10.0.0.1:7791");
    load(&with_failover(on, &ok)).unwrap();
    let e = err(&with_failover(on, &ok.replace("r0-gamma.sock", "r0-alpha.sock")));
    assert!(e.contains("node[2].control:") && e.contains("the witness needs its own"), "{e}");
    // Names are unique across data nodes and the witness.
    let e = err(&with_failover(on, &WITNESS_NODE.replace("gamma", "alpha")));
    assert!(e.contains("node[2].name: \"alpha\" is used by two nodes"), "{e}");
    let e = load(&with_failover(on, WITNESS_NODE)).unwrap().node("omega").unwrap_err().to_string();
    assert!(e.contains("alpha, beta, gamma"), "{e}");
}

#[test]
fn tls_section_is_off_by_default_and_checked_by_field() {
    use crate::tls::{NbdTlsMode, ReplTlsMode};
    let c = load(ONE).unwrap();
    assert!(!c.tls.enabled());
    assert_eq!(c.tls_settings(c.node("alpha").unwrap()), None);
    let with = |tls: &str| ONE.replace("[[node]]", &format!("[tls]\n{tls}\n[[node]]"));
    let c = load(&with("dir = \"/etc/pki\"\nnbd = \"require\"\nnbd_verify_client = true")).unwrap();
    assert_eq!(c.tls.nbd, NbdTlsMode::Require);
    assert_eq!(c.tls.replication, ReplTlsMode::Off);
    let s = c.tls_settings(c.node("alpha").unwrap()).unwrap();
    assert_eq!(s.dir, PathBuf::from("/etc/pki"));
    assert!(s.nbd_verify_client);
    assert_eq!(
        err(&with("dir = \"/p\"\nnbd = \"yes\"")),
        "r0.toml: tls.nbd: expected \"off\" or \"on\" or \"require\", got \"yes\""
    );
    assert!(
        err(&with("nbd = \"on\""))
            .starts_with("r0.toml: tls.dir: missing (TLS is on and node[0] (alpha) has no tls_dir")
    );
    assert!(err(&with("dir = \"/p\"\nnbd_verify_client = true")).contains("needs tls.nbd"));
    assert!(err(&with("dir = \"/p\"\nreplication = 1")).contains("tls.replication: expected \"off\" or \"require\""));
    // A node's tls_dir overrides dir, and stands in for it.
    let c =
        load(&with("replication = \"require\"").replace("dir = \"/var", "tls_dir = \"/pki/a\"\ndir = \"/var")).unwrap();
    assert_eq!(c.tls_settings(c.node("alpha").unwrap()).unwrap().dir, PathBuf::from("/pki/a"));
    let bad = with("dir = \"/p\"\nreplication = \"require\"").replace("name = \"alpha\"", "name = \"10.0.0.1\"");
    assert!(err(&bad).contains("node[0].name: \"10.0.0.1\" cannot be checked against a certificate"), "{}", err(&bad));
}
