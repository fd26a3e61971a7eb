//! `repbench report RUN.json [--out DIR]`: the markdown table and SVG charts
//! of a run (plotters' SVG backend; text is emitted as SVG `<text>`, so no
//! system font is needed):
//!
//! - `cdf-<workload>-rtt<R>ms.svg`: latency CDF of every target at that RTT
//!   (unreplicated targets in every chart), for qd1-write-flush and
//!   qd32-randwrite;
//! - `p50-vs-rtt-<workload>.svg` / `p99-vs-rtt-<workload>.svg`: latency of each protocol
//!   against the RTT, with the floor (RTT + the local file's p50), RTT + the
//!   standalone repd's latency, and the unreplicated targets as references,
//!   for qd1-write and qd1-write-flush;
//! - `throughput.svg`: IOPS of every server per workload, at the lowest RTT
//!   (the local file is left out: it is in the table);
//! - `results.md`: the table `repbench run` printed;
//! - `run.json`: the run itself, so that the directory is self-contained.

use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::results::{Cell, Run};
use crate::targets::Kind;

/// Errors of `repbench report`.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("Reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a repbench result: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path} has format version {found}, this repbench reads {expected}")]
    Version { path: PathBuf, found: u32, expected: u32 },
    #[error("Writing {path}: {detail}")]
    Write { path: PathBuf, detail: String },
}

/// Reads a run's JSON file.
pub fn load(path: &Path) -> Result<Run, ReportError> {
    let text = std::fs::read_to_string(path).map_err(|source| ReportError::Read { path: path.into(), source })?;
    let run: Run = serde_json::from_str(&text).map_err(|source| ReportError::Parse { path: path.into(), source })?;
    if run.format_version != crate::results::FORMAT_VERSION {
        return Err(ReportError::Version {
            path: path.into(),
            found: run.format_version,
            expected: crate::results::FORMAT_VERSION,
        });
    }
    Ok(run)
}

/// Writes `run.json` (a copy of the run), `results.md` and every chart into
/// `out`; returns the files written.
pub fn write_all(run: &Run, out: &Path) -> Result<Vec<PathBuf>, ReportError> {
    std::fs::create_dir_all(out).map_err(|e| ReportError::Write { path: out.into(), detail: e.to_string() })?;
    let mut files = Vec::new();
    // Compact: the CDFs make a pretty-printed run tens of thousands of lines.
    let json = out.join("run.json");
    let text =
        serde_json::to_string(run).map_err(|e| ReportError::Write { path: json.clone(), detail: e.to_string() })?;
    std::fs::write(&json, text).map_err(|e| ReportError::Write { path: json.clone(), detail: e.to_string() })?;
    files.push(json);
    let md = out.join("results.md");
    std::fs::write(&md, run.markdown()).map_err(|e| ReportError::Write { path: md.clone(), detail: e.to_string() })?;
    files.push(md);
    let rtts = &run.config.rtts_ms;
    for wl in ["qd1-write-flush", "qd32-randwrite"] {
        let rtt_list: Vec<Option<f64>> =
            if rtts.is_empty() { vec![None] } else { rtts.iter().map(|&r| Some(r)).collect() };
        for rtt in rtt_list {
            let cells: Vec<&Cell> = run
                .cells
                .iter()
                .filter(|c| c.workload == wl && !c.cdf.is_empty())
                .filter(|c| match (c.rtt_ms, rtt) {
                    (Some(a), Some(b)) => (a - b).abs() < 1e-9,
                    (Some(_), None) => false,
                    (None, _) => true,
                })
                .collect();
            if cells.is_empty() {
                continue;
            }
            let name = match rtt {
                Some(r) => format!("cdf-{wl}-rtt{r}ms.svg"),
                None => format!("cdf-{wl}.svg"),
            };
            let path = out.join(name);
            let title =
                format!("{wl}: latency CDF{}", rtt.map(|r| format!(", replication RTT {r} ms")).unwrap_or_default());
            cdf_chart(&path, &title, &cells).map_err(|e| ReportError::Write { path: path.clone(), detail: e })?;
            files.push(path);
        }
    }
    if rtts.len() >= 2 {
        for wl in ["qd1-write", "qd1-write-flush"] {
            for (metric, pick) in
                [("p50", (|c: &Cell| c.median.p50_us) as fn(&Cell) -> f64), ("p99", |c: &Cell| c.median.p99_us)]
            {
                if !run.cells.iter().any(|c| c.workload == wl && c.kind.replicated()) {
                    continue;
                }
                let path = out.join(format!("{metric}-vs-rtt-{wl}.svg"));
                vs_rtt_chart(&path, run, wl, metric, pick)
                    .map_err(|e| ReportError::Write { path: path.clone(), detail: e })?;
                files.push(path);
            }
        }
    }
    let path = out.join("throughput.svg");
    throughput_chart(&path, run).map_err(|e| ReportError::Write { path: path.clone(), detail: e })?;
    files.push(path);
    Ok(files)
}

/// A stable color per target.
fn color(kind: Kind, rtt_ms: Option<f64>, rtts: &[f64]) -> RGBColor {
    let base = match kind {
        Kind::Standalone => RGBColor(0x33, 0x33, 0x33),
        Kind::A => RGBColor(0x1f, 0x77, 0xb4),
        Kind::B => RGBColor(0x2c, 0xa0, 0x2c),
        Kind::C => RGBColor(0xd6, 0x27, 0x28),
        Kind::QemuNbd => RGBColor(0x94, 0x67, 0xbd),
        Kind::Nbdkit => RGBColor(0xff, 0x7f, 0x0e),
        Kind::File => RGBColor(0x8c, 0x56, 0x4b),
        Kind::External => RGBColor(0x17, 0xbe, 0xcf),
    };
    // Higher RTTs of one protocol: lighter shades.
    let idx = rtt_ms.and_then(|r| rtts.iter().position(|x| (x - r).abs() < 1e-9)).unwrap_or(0);
    let mix = |c: u8| (f64::from(c) + (255.0 - f64::from(c)) * (idx as f64 * 0.25).min(0.6)) as u8;
    RGBColor(mix(base.0), mix(base.1), mix(base.2))
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

fn cdf_chart(path: &Path, title: &str, cells: &[&Cell]) -> Result<(), String> {
    let lo = cells.iter().flat_map(|c| c.cdf.iter().map(|p| p[1])).fold(f64::INFINITY, f64::min).max(1.0);
    let hi = cells.iter().flat_map(|c| c.cdf.iter().map(|p| p[1])).fold(0.0, f64::max).max(lo * 10.0);
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(56)
        .build_cartesian_2d((lo * 0.8..hi * 1.2).log_scale(), 0.0..100.0)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("latency (µs, log scale)")
        .y_desc("percentile")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(err)?;
    let rtts: Vec<f64> = cells.iter().filter_map(|c| c.rtt_ms).collect();
    for c in cells {
        let col = color(c.kind, c.rtt_ms, &rtts);
        chart
            .draw_series(LineSeries::new(c.cdf.iter().map(|p| (p[1].max(lo), p[0])), col.stroke_width(2)))
            .map_err(err)?
            .label(format!("{} (p50 {:.0} µs)", c.target, c.median.p50_us))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], col.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)
}

/// A labelled, colored polyline of a chart.
type Line = (String, RGBColor, Vec<(f64, f64)>);

fn vs_rtt_chart(path: &Path, run: &Run, wl: &str, metric: &str, pick: fn(&Cell) -> f64) -> Result<(), String> {
    let rtts = &run.config.rtts_ms;
    let max_rtt = rtts.iter().copied().fold(0.0, f64::max).max(0.1);
    let mut lines: Vec<Line> = Vec::new();
    for k in [Kind::A, Kind::B, Kind::C] {
        let mut pts: Vec<(f64, f64)> = run
            .cells
            .iter()
            .filter(|c| c.workload == wl && c.kind == k)
            .map(|c| (c.rtt_ms_or_zero(), pick(c)))
            .collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        if !pts.is_empty() {
            lines.push((format!("protocol {}", k.name()), color(k, None, &[]), pts));
        }
    }
    if let Some(f) = run.cell(wl, Kind::File, None) {
        let base = f.median.p50_us;
        lines.push((
            format!("floor: RTT + local file p50 ({base:.0} µs)"),
            BLACK,
            vec![(0.0, base), (max_rtt, max_rtt * 1000.0 + base)],
        ));
    }
    if let Some(c) = run.cell(wl, Kind::Standalone, None) {
        let base = pick(c);
        lines.push((
            format!("RTT + standalone repblock {metric} ({base:.0} µs)"),
            color(Kind::Standalone, None, &[]),
            vec![(0.0, base), (max_rtt, max_rtt * 1000.0 + base)],
        ));
    }
    for k in [Kind::Standalone, Kind::QemuNbd] {
        if let Some(c) = run.cell(wl, k, None) {
            let v = pick(c);
            lines.push((format!("{} (no replication)", k.name()), color(k, None, &[]), vec![(0.0, v), (max_rtt, v)]));
        }
    }
    let hi = lines.iter().flat_map(|l| l.2.iter().map(|p| p.1)).fold(0.0, f64::max).max(1.0) * 1.1;
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{wl}: {metric} latency vs replication RTT"), ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..max_rtt * 1.05, 0.0..hi)
        .map_err(err)?;
    chart.configure_mesh().x_desc("replication RTT (ms)").y_desc(format!("{metric} (µs)")).draw().map_err(err)?;
    for (name, col, pts) in lines {
        let dashed = name.starts_with("floor") || name.starts_with("RTT +") || name.contains("no replication");
        let style = col.stroke_width(if dashed { 1 } else { 2 });
        chart
            .draw_series(LineSeries::new(pts.clone(), style))
            .map_err(err)?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
        if !dashed {
            chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, col.filled()))).map_err(err)?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)
}

fn throughput_chart(path: &Path, run: &Run) -> Result<(), String> {
    let lowest = run.config.rtts_ms.iter().copied().fold(f64::INFINITY, f64::min);
    let wls: Vec<&str> = run.config.workloads.iter().map(|w| w.name.as_str()).collect();
    let rows = wls.len().div_ceil(2).max(1);
    let root = SVGBackend::new(path, (1000, 300 * rows as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let panels = root.split_evenly((rows, 2));
    for (panel, wl) in panels.iter().zip(&wls) {
        let cells: Vec<&Cell> = run
            .cells
            .iter()
            .filter(|c| c.workload == *wl && c.rtt_ms.is_none_or(|r| (r - lowest).abs() < 1e-9))
            // The local file (page cache) would dwarf every server's bar;
            // it is in the table.
            .filter(|c| c.kind != Kind::File)
            .collect();
        if cells.is_empty() {
            continue;
        }
        let hi = cells.iter().map(|c| c.median.iops).fold(0.0, f64::max).max(1.0) * 1.15;
        let n = cells.len();
        let names: Vec<String> = cells.iter().map(|c| c.target.clone()).collect();
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("{wl}: IOPS (RTT {lowest} ms)"), ("sans-serif", 16))
            .margin(8)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .build_cartesian_2d((0..n).into_segmented(), 0.0..hi)
            .map_err(err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n)
            .x_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) => names.get(*i).cloned().unwrap_or_default(),
                _ => String::new(),
            })
            .y_label_formatter(&|v| format!("{v:.0}"))
            .draw()
            .map_err(err)?;
        chart
            .draw_series(cells.iter().enumerate().map(|(i, c)| {
                let col = color(c.kind, None, &[]);
                let mut r = Rectangle::new(
                    [(SegmentValue::Exact(i), 0.0), (SegmentValue::Exact(i + 1), c.median.iops)],
                    col.filled(),
                );
                r.set_margin(0, 0, 8, 8);
                r
            }))
            .map_err(err)?;
        chart
            .draw_series(cells.iter().enumerate().map(|(i, c)| {
                Text::new(
                    format!("{:.0}", c.median.iops),
                    (SegmentValue::CenterOf(i), c.median.iops + hi * 0.02),
                    ("sans-serif", 11),
                )
            }))
            .map_err(err)?;
    }
    root.present().map_err(err)
}
