//! `repbench crosscheck`: the load generator against fio's nbd engine
//! (libnbd), same export, same workload, alternating rounds (repbench, fio,
//! repbench, fio, …). If both measure the same server the same way, their
//! IOPS and latency percentiles agree within the round-to-round noise.
//!
//! fio is run with `--lat_percentiles=1` so that its percentiles are of the
//! total latency (submission to completion), as repbench's are. For a
//! workload with a FLUSH after every write, fio (`--fsync=1`) reports the
//! write and the flush separately: its IOPS (writes per second) are
//! comparable, its latency is shown as write p50 + flush p50.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::loadgen::Plan;
use crate::results::{Summary, median};
use crate::runner::measure;
use crate::targets::{Kind, Launcher, TargetError, Tools, on_path};
use crate::workload::{FlushMode, Pattern, Workload};

#[derive(Debug, thiserror::Error)]
pub enum CrossError {
    #[error("fio is not installed (Debian package fio)")]
    NoFio,
    #[error("This fio has no nbd engine")]
    NoNbdEngine,
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error("repbench's run failed")]
    Load(#[from] crate::loadgen::LoadError),
    #[error("fio's nbd engine cannot send FUA writes: cross-check a flush or plain workload")]
    Fua,
    #[error("fio failed: {0}")]
    Fio(String),
    #[error("certtool: {0}")]
    Certtool(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// One side's numbers for one round.
#[derive(Debug, Clone, Default)]
pub struct Side {
    pub iops: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// The rounds of both tools.
#[derive(Debug, Clone, Default)]
pub struct CrossResult {
    pub repbench: Vec<Side>,
    pub fio: Vec<Side>,
    pub target: String,
    pub workload: String,
    pub fio_args: Vec<String>,
}

impl CrossResult {
    pub fn report(&self) -> String {
        let mut s = format!(
            "crosscheck: {} against {} ({} rounds each, alternating)\nfio {}\n\n",
            self.workload,
            self.target,
            self.repbench.len(),
            self.fio_args.join(" ")
        );
        s.push_str("| tool | round | IOPS | p50 µs | p99 µs |\n|---|---:|---:|---:|---:|\n");
        for (name, v) in [("repbench", &self.repbench), ("fio", &self.fio)] {
            for (i, r) in v.iter().enumerate() {
                s.push_str(&format!("| {name} | {} | {:.0} | {:.1} | {:.1} |\n", i + 1, r.iops, r.p50_us, r.p99_us));
            }
        }
        let med = |v: &Vec<Side>, f: fn(&Side) -> f64| median(v.iter().map(f).collect());
        let spread = |v: &Vec<Side>| {
            let (lo, hi) = v.iter().fold((f64::INFINITY, 0.0f64), |(l, h), r| (l.min(r.iops), h.max(r.iops)));
            if lo.is_finite() && lo > 0.0 { (hi - lo) / lo * 100.0 } else { 0.0 }
        };
        s.push_str("\n| median | IOPS | p50 µs | p99 µs | IOPS spread over rounds |\n|---|---:|---:|---:|---:|\n");
        for (name, v) in [("repbench", &self.repbench), ("fio", &self.fio)] {
            s.push_str(&format!(
                "| {name} | {:.0} | {:.1} | {:.1} | {:.1}% |\n",
                med(v, |r| r.iops),
                med(v, |r| r.p50_us),
                med(v, |r| r.p99_us),
                spread(v)
            ));
        }
        let ratio = |f: fn(&Side) -> f64| {
            let (a, b) = (med(&self.repbench, f), med(&self.fio, f));
            if b > 0.0 { a / b } else { f64::NAN }
        };
        s.push_str(&format!(
            "\nrepbench / fio: IOPS {:.3}, p50 {:.3}, p99 {:.3}\n",
            ratio(|r| r.iops),
            ratio(|r| r.p50_us),
            ratio(|r| r.p99_us)
        ));
        s
    }
}

/// fio arguments for `wl` (without the target and timing).
pub fn fio_args(wl: &Workload) -> Vec<String> {
    let rw = match (wl.read_percent, wl.pattern) {
        (0, Pattern::Random) => "randwrite".to_string(),
        (0, Pattern::Sequential) => "write".into(),
        (100, Pattern::Random) => "randread".into(),
        (100, Pattern::Sequential) => "read".into(),
        (_, Pattern::Random) => "randrw".into(),
        (_, Pattern::Sequential) => "rw".into(),
    };
    let mut a = vec![
        format!("--rw={rw}"),
        format!("--bs={}", wl.block_size),
        format!("--iodepth={}", wl.queue_depth),
        format!("--numjobs={}", wl.connections),
    ];
    if wl.read_percent > 0 && wl.read_percent < 100 {
        a.push(format!("--rwmixread={}", wl.read_percent));
    }
    if wl.flush == FlushMode::AfterEachWrite {
        a.push("--fsync=1".into());
    }
    a
}

/// Every fio argument of one measurement of `wl` on the NBD export at
/// `uri` (fio's nbd engine), timed and sized by `plan`, JSON output.
pub(crate) fn fio_job_args(wl: &Workload, uri: &str, plan: &Plan) -> Vec<String> {
    let mut args = fio_args(wl);
    args.extend([
        "--ioengine=nbd".to_string(),
        format!("--uri={uri}"),
        format!("--size={}", plan.region),
        "--time_based".into(),
        format!("--runtime={}ms", plan.duration.as_millis().max(1)),
        format!("--ramp_time={}ms", plan.warmup.as_millis()),
        "--lat_percentiles=1".into(),
        "--group_reporting".into(),
        "--output-format=json".into(),
    ]);
    args
}

/// Options of a crosscheck.
pub struct CrossOptions<'a> {
    pub kind: Kind,
    pub rtt: Duration,
    pub workload: Workload,
    pub plan: Plan,
    pub rounds: usize,
    pub repd: Option<&'a Path>,
    pub work_parent: &'a Path,
}

pub fn crosscheck(o: &CrossOptions) -> Result<CrossResult, CrossError> {
    if o.workload.flush == FlushMode::Fua {
        return Err(CrossError::Fua);
    }
    check_fio()?;
    let io = |what: &'static str| move |source| CrossError::Io { what: what.into(), source };
    let work =
        tempfile::Builder::new().prefix("repbench-cross-").tempdir_in(o.work_parent).map_err(io("work directory"))?;
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().map_err(io("runtime"))?;
    let tools = match o.kind {
        Kind::Standalone | Kind::A | Kind::B | Kind::C => Some(Tools::locate(o.repd)?),
        _ => None,
    };
    let launcher =
        Launcher { tools: tools.as_ref(), dir: work.path(), size: o.plan.region, rt: rt.handle(), repd_extra: "" };
    let d = launcher.start(o.kind)?;
    d.set_rtt(o.rtt);
    let Some(repblock::nbd::ListenAddr::Tcp(addr)) = d.nbd.clone() else {
        return Err(CrossError::Fio(format!("{} has no TCP NBD export for fio", o.kind.name())));
    };
    let uri = format!("nbd://{addr}/{}", d.export);
    let args = fio_job_args(&o.workload, &uri, &o.plan);
    let mut res = CrossResult {
        target: crate::results::label(o.kind, o.kind.replicated().then_some(o.rtt.as_secs_f64() * 1000.0)),
        workload: o.workload.name.clone(),
        fio_args: args.clone(),
        ..Default::default()
    };
    for round in 0..o.rounds {
        let plan = Plan { seed: o.plan.seed.wrapping_add(round as u64), ..o.plan.clone() };
        let m = measure(&rt, &d, &o.workload, &plan)?;
        let s = Summary::of(&m);
        res.repbench.push(Side { iops: s.iops, p50_us: s.p50_us, p99_us: s.p99_us });
        res.fio.push(run_fio("crosscheck", &args, None, &o.workload)?);
    }
    Ok(res)
}

/// Fails unless fio with its nbd engine is installed.
pub(crate) fn check_fio() -> Result<(), CrossError> {
    if !on_path("fio") {
        return Err(CrossError::NoFio);
    }
    let help = Command::new("fio")
        .arg("--enghelp")
        .output()
        .map_err(|source| CrossError::Io { what: "running fio".into(), source })?;
    if !String::from_utf8_lossy(&help.stdout).split_whitespace().any(|w| w == "nbd") {
        return Err(CrossError::NoNbdEngine);
    }
    Ok(())
}

/// Runs fio job `name` with `args` (`HOME` set to `home` if given: libnbd
/// reads TLS certificates from `$HOME/.pki/libnbd`) and reads its numbers.
pub(crate) fn run_fio(name: &str, args: &[String], home: Option<&Path>, wl: &Workload) -> Result<Side, CrossError> {
    let mut cmd = Command::new("fio");
    cmd.arg(format!("--name={name}")).args(args);
    if let Some(home) = home {
        cmd.env("HOME", home);
    }
    let out = cmd.output().map_err(|source| CrossError::Io { what: "running fio".into(), source })?;
    if !out.status.success() {
        return Err(CrossError::Fio(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    parse_fio(&String::from_utf8_lossy(&out.stdout), wl)
}

/// IOPS and total-latency percentiles from fio's JSON output.
fn parse_fio(text: &str, wl: &Workload) -> Result<Side, CrossError> {
    // fio may print warnings before the JSON object.
    let start = text.find('{').ok_or_else(|| CrossError::Fio(format!("no JSON in fio's output: {text}")))?;
    let v: Value = serde_json::from_str(&text[start..]).map_err(|e| CrossError::Fio(format!("fio JSON: {e}")))?;
    let job = &v["jobs"][0];
    let pct = |lat: &Value, p: &str| lat["percentile"][p].as_f64().unwrap_or(0.0) / 1000.0;
    let (read, write) = (&job["read"], &job["write"]);
    let iops = read["iops"].as_f64().unwrap_or(0.0) + write["iops"].as_f64().unwrap_or(0.0);
    let main = if wl.read_percent >= 50 { read } else { write };
    let mut p50 = pct(&main["lat_ns"], "50.000000");
    let mut p99 = pct(&main["lat_ns"], "99.000000");
    if wl.flush == FlushMode::AfterEachWrite {
        p50 += pct(&job["sync"]["lat_ns"], "50.000000");
        p99 += pct(&job["sync"]["lat_ns"], "99.000000");
    }
    if iops <= 0.0 {
        return Err(CrossError::Fio(format!("fio reported no IO: {}", &text[start..text.len().min(start + 400)])));
    }
    Ok(Side { iops, p50_us: p50, p99_us: p99 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::builtin;

    #[test]
    fn fio_arguments_match_the_workloads() {
        let a = fio_args(&builtin("qd1-write-flush").expect("wl"));
        assert!(
            a.contains(&"--rw=randwrite".into())
                && a.contains(&"--fsync=1".into())
                && a.contains(&"--iodepth=1".into())
        );
        let m = fio_args(&builtin("mixed-70-30").expect("wl"));
        assert!(m.contains(&"--rw=randrw".into()) && m.contains(&"--rwmixread=70".into()));
        assert!(fio_args(&builtin("seq1m-write").expect("wl")).contains(&"--bs=1048576".into()));
    }

    #[test]
    fn fio_json_with_a_warning_line_is_parsed() {
        let text = r#"note: a warning
{"jobs":[{"read":{"iops":0.0,"lat_ns":{"percentile":{}}},
"write":{"iops":1000.5,"lat_ns":{"percentile":{"50.000000":30000,"99.000000":90000}}},
"sync":{"lat_ns":{"percentile":{"50.000000":1000,"99.000000":2000}}}}]}"#;
        let s = parse_fio(text, &builtin("qd32-randwrite").expect("wl")).expect("parse");
        assert_eq!((s.iops, s.p50_us, s.p99_us), (1000.5, 30.0, 90.0));
        let f = parse_fio(text, &builtin("qd1-write-flush").expect("wl")).expect("parse");
        assert_eq!((f.p50_us, f.p99_us), (31.0, 92.0));
        assert!(parse_fio("no json", &builtin("qd1-write").expect("wl")).is_err());
    }
}
