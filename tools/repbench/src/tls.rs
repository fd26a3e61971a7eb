//! `repbench tls`: what TLS costs (issue 13). Four repd pairs of one
//! protocol run side by side: plain, TLS on the NBD export, TLS on the
//! replication link, and both. Each workload runs round by round on all
//! four (in reverse order on odd rounds, as `repbench run` alternates), and
//! the table puts every TLS variant next to plain, in the same run.
//!
//! The client is fio's nbd engine (libnbd) for every variant, plain
//! included: repbench's own load generator speaks no TLS, and one client
//! for all four keeps the comparison fair. `nbds://` URIs, with the client
//! certificates in libnbd's default directory (`$HOME/.pki/libnbd`, `HOME`
//! set for fio to a directory of the run; libnbd refuses
//! `tls-certificates=` in fio's URI). The certificates are made with
//! certtool (gnutls-bin).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde::Serialize;

use crate::crosscheck::{CrossError, Side, check_fio, fio_job_args, run_fio};
use crate::loadgen::Plan;
use crate::results::median;
use crate::targets::{Kind, Launcher, Tools, on_path};
use crate::workload::{Workload, builtin};

/// The workloads of the TLS table: QD1 write latency, QD32 random write
/// and 1 MiB sequential throughput.
pub const WORKLOADS: [&str; 3] = ["qd1-write", "qd32-randwrite", "seq1m-write"];

/// Where TLS is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Variant {
    Plain,
    Nbd,
    Replication,
    Both,
}

impl Variant {
    pub const ALL: [Variant; 4] = [Variant::Plain, Variant::Nbd, Variant::Replication, Variant::Both];

    pub fn name(self) -> &'static str {
        match self {
            Variant::Plain => "plain",
            Variant::Nbd => "TLS on NBD",
            Variant::Replication => "TLS on replication",
            Variant::Both => "TLS on both",
        }
    }

    fn nbd(self) -> bool {
        matches!(self, Variant::Nbd | Variant::Both)
    }

    fn replication(self) -> bool {
        matches!(self, Variant::Replication | Variant::Both)
    }

    /// The `[tls]` section of this variant's config (none for plain).
    pub fn config(self, pki: &Path) -> String {
        if self == Variant::Plain {
            return String::new();
        }
        let on = |b: bool| if b { "require" } else { "off" };
        format!(
            "[tls]\ndir = \"{}\"\nnbd = \"{}\"\nreplication = \"{}\"\n",
            pki.display(),
            on(self.nbd()),
            on(self.replication())
        )
    }
}

/// Options of `repbench tls`.
pub struct TlsOptions<'a> {
    pub protocol: Kind,
    pub rtt: Duration,
    pub plan: Plan,
    pub rounds: usize,
    pub repd: Option<&'a Path>,
    pub work_parent: &'a Path,
}

/// One workload on one variant: every round's fio numbers.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    pub workload: String,
    pub variant: Variant,
    /// Per round: IOPS, p50 and p99 of the total latency (µs).
    pub rounds: Vec<(f64, f64, f64)>,
    /// Bytes per operation (for MB/s).
    pub block_size: u32,
}

impl Cell {
    fn med(&self, f: fn(&(f64, f64, f64)) -> f64) -> f64 {
        median(self.rounds.iter().map(f).collect())
    }

    pub fn iops(&self) -> f64 {
        self.med(|r| r.0)
    }

    pub fn p50_us(&self) -> f64 {
        self.med(|r| r.1)
    }

    pub fn p99_us(&self) -> f64 {
        self.med(|r| r.2)
    }

    pub fn mb_per_s(&self) -> f64 {
        self.iops() * f64::from(self.block_size) / 1e6
    }
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct TlsRun {
    pub protocol: String,
    pub rtt_ms: f64,
    pub rounds: usize,
    pub duration_ms: u128,
    pub region: u64,
    pub cells: Vec<Cell>,
}

impl TlsRun {
    fn cell(&self, workload: &str, v: Variant) -> Option<&Cell> {
        self.cells.iter().find(|c| c.workload == workload && c.variant == v)
    }

    /// The table: one row per variant, each workload's headline number
    /// (p50/p99 at QD1, IOPS at QD32, MB/s sequential) and its ratio to
    /// plain.
    pub fn markdown(&self) -> String {
        let mut s = format!(
            "TLS cost, protocol {} at RTT {} ms, fio nbd engine (libnbd), median of {} rounds of {} ms\n\n",
            self.protocol, self.rtt_ms, self.rounds, self.duration_ms
        );
        s.push_str(
            "| variant | qd1-write p50 µs | qd1-write p99 µs | qd32-randwrite IOPS | seq1m-write MB/s |\n\
             |---|---:|---:|---:|---:|\n",
        );
        let plain = |w: &str| self.cell(w, Variant::Plain);
        for v in Variant::ALL {
            let col = |w: &str, f: fn(&Cell) -> f64, higher_is_worse: bool| {
                let Some(c) = self.cell(w, v) else { return "—".to_string() };
                let x = f(c);
                match plain(w).map(f).filter(|p| *p > 0.0 && v != Variant::Plain) {
                    Some(p) => {
                        let cost = if higher_is_worse { x / p - 1.0 } else { 1.0 - x / p };
                        format!("{x:.0} ({:+.0}%)", cost * 100.0)
                    }
                    None => format!("{x:.0}"),
                }
            };
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} |\n",
                v.name(),
                col("qd1-write", Cell::p50_us, true),
                col("qd1-write", Cell::p99_us, true),
                col("qd32-randwrite", Cell::iops, false),
                col("seq1m-write", Cell::mb_per_s, false),
            ));
        }
        s.push_str("\n(in parentheses: the cost against plain, + is worse: more latency, less throughput)\n");
        s
    }
}

/// Makes a CA and one certificate (server and client) naming both nodes,
/// localhost and 127.0.0.1 in `dir` (the node directory), and the client
/// directory libnbd reads under `home`.
pub fn make_pki(dir: &Path, home: &Path) -> Result<(), CrossError> {
    if !on_path("certtool") {
        return Err(CrossError::Certtool("not installed (Debian package gnutls-bin)".into()));
    }
    let io = |what: &str| {
        let what = what.to_string();
        move |source| CrossError::Io { what, source }
    };
    std::fs::create_dir_all(dir).map_err(io("creating the certificate directory"))?;
    let p = |f: &str| dir.join(f).display().to_string();
    let certtool = |args: &[&str]| -> Result<(), CrossError> {
        let out = Command::new("certtool").args(args).output().map_err(io("running certtool"))?;
        if !out.status.success() {
            return Err(CrossError::Certtool(format!("{args:?}: {}", String::from_utf8_lossy(&out.stderr))));
        }
        Ok(())
    };
    std::fs::write(dir.join("ca.info"), "cn = repbench CA\nca\ncert_signing_key\nexpiration_days = 30\n")
        .map_err(io("writing ca.info"))?;
    std::fs::write(
        dir.join("node.info"),
        "cn = repbench\ndns_name = alpha\ndns_name = beta\ndns_name = localhost\nip_address = 127.0.0.1\n\
         tls_www_server\ntls_www_client\nencryption_key\nsigning_key\nexpiration_days = 30\n",
    )
    .map_err(io("writing node.info"))?;
    certtool(&["--generate-privkey", "--outfile", &p("ca-key.pem")])?;
    certtool(&[
        "--generate-self-signed",
        "--load-privkey",
        &p("ca-key.pem"),
        "--template",
        &p("ca.info"),
        "--outfile",
        &p("ca-cert.pem"),
    ])?;
    certtool(&["--generate-privkey", "--outfile", &p("server-key.pem")])?;
    certtool(&[
        "--generate-certificate",
        "--load-ca-certificate",
        &p("ca-cert.pem"),
        "--load-ca-privkey",
        &p("ca-key.pem"),
        "--load-privkey",
        &p("server-key.pem"),
        "--template",
        &p("node.info"),
        "--outfile",
        &p("server-cert.pem"),
    ])?;
    let libnbd = home.join(".pki/libnbd");
    std::fs::create_dir_all(&libnbd).map_err(io("creating $HOME/.pki/libnbd"))?;
    for (from, to) in [("server-cert.pem", "client-cert.pem"), ("server-key.pem", "client-key.pem")] {
        std::fs::copy(dir.join(from), dir.join(to)).map_err(io("copying the client certificate"))?;
        std::fs::copy(dir.join(from), libnbd.join(to)).map_err(io("copying the client certificate"))?;
    }
    std::fs::copy(dir.join("ca-cert.pem"), libnbd.join("ca-cert.pem")).map_err(io("copying the CA"))?;
    Ok(())
}

/// Runs the TLS comparison.
pub fn run(o: &TlsOptions) -> Result<TlsRun, CrossError> {
    check_fio()?;
    let io = |what: &'static str| move |source| CrossError::Io { what: what.into(), source };
    let work = tempfile::Builder::new().prefix("repbench-tls-").tempdir_in(o.work_parent).map_err(io("work dir"))?;
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().map_err(io("runtime"))?;
    let tools = Tools::locate(o.repd)?;
    let (pki, home) = (work.path().join("pki"), work.path().join("home"));
    make_pki(&pki, &home)?;
    let mut deployments = Vec::new();
    for v in Variant::ALL {
        let dir = work.path().join(v.name().replace(' ', "-"));
        std::fs::create_dir_all(&dir).map_err(io("variant directory"))?;
        let extra = v.config(&pki);
        let launcher =
            Launcher { tools: Some(&tools), dir: &dir, size: o.plan.region, rt: rt.handle(), repd_extra: &extra };
        let d = launcher.start(o.protocol)?;
        d.set_rtt(o.rtt);
        let Some(repblock::nbd::ListenAddr::Tcp(addr)) = d.nbd.clone() else {
            return Err(CrossError::Fio("the pair has no TCP NBD export".into()));
        };
        let scheme = if v.nbd() { "nbds" } else { "nbd" };
        deployments.push((v, format!("{scheme}://{addr}/{}", d.export), d));
    }
    let workloads: Vec<Workload> = WORKLOADS.iter().filter_map(|w| builtin(w)).collect();
    let mut cells = Vec::new();
    for wl in &workloads {
        let mut rounds: Vec<Vec<(f64, f64, f64)>> = vec![Vec::new(); deployments.len()];
        for round in 0..o.rounds {
            let mut order: Vec<usize> = (0..deployments.len()).collect();
            if round % 2 == 1 {
                order.reverse();
            }
            for i in order {
                let (v, uri, d) = &mut deployments[i];
                d.check_running()?;
                let args = fio_job_args(wl, uri, &o.plan);
                let Side { iops, p50_us, p99_us } = run_fio("tls", &args, Some(&home), wl)?;
                eprintln!("{} {} round {}: {iops:.0} IOPS, p50 {p50_us:.0} µs", wl.name, v.name(), round + 1);
                rounds[i].push((iops, p50_us, p99_us));
            }
        }
        for ((v, _, _), r) in deployments.iter().zip(rounds) {
            cells.push(Cell { workload: wl.name.clone(), variant: *v, rounds: r, block_size: wl.block_size });
        }
    }
    Ok(TlsRun {
        protocol: o.protocol.name().to_string(),
        rtt_ms: o.rtt.as_secs_f64() * 1000.0,
        rounds: o.rounds,
        duration_ms: o.plan.duration.as_millis(),
        region: o.plan.region,
        cells,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_variant_turns_on_its_links() {
        let pki = Path::new("/pki");
        assert_eq!(Variant::Plain.config(pki), "");
        assert!(Variant::Nbd.config(pki).contains("nbd = \"require\"\nreplication = \"off\""));
        assert!(Variant::Replication.config(pki).contains("nbd = \"off\"\nreplication = \"require\""));
        assert!(Variant::Both.config(pki).contains("nbd = \"require\"\nreplication = \"require\""));
        assert!(Variant::Both.config(pki).starts_with("[tls]\ndir = \"/pki\"\n"));
    }

    #[test]
    fn the_table_puts_each_variant_next_to_plain() {
        let cell = |workload: &str, variant, r: (f64, f64, f64), block_size| Cell {
            workload: workload.into(),
            variant,
            rounds: vec![r],
            block_size,
        };
        let run = TlsRun {
            protocol: "C".into(),
            rtt_ms: 0.0,
            rounds: 1,
            duration_ms: 1000,
            region: 1 << 20,
            cells: vec![
                cell("qd1-write", Variant::Plain, (1000.0, 100.0, 200.0), 4096),
                cell("qd1-write", Variant::Both, (800.0, 125.0, 300.0), 4096),
                cell("qd32-randwrite", Variant::Plain, (10000.0, 0.0, 0.0), 4096),
                cell("qd32-randwrite", Variant::Both, (7500.0, 0.0, 0.0), 4096),
                cell("seq1m-write", Variant::Plain, (500.0, 0.0, 0.0), 1 << 20),
            ],
        };
        let t = run.markdown();
        assert!(t.contains("| plain | 100 | 200 | 10000 | 524 |\n"), "{t}");
        assert!(t.contains("| TLS on both | 125 (+25%) | 300 (+50%) | 7500 (+25%) | — |\n"), "{t}");
        assert!(t.contains("| TLS on NBD | — | — | — | — |\n"), "{t}");
    }
}
