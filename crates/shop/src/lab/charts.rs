//! The lab's charts, drawn with plotters as SVG and PNG into a directory: the
//! baseline completion latency CDF per pattern, the maximum sustainable throughput per
//! pattern (saturation), the success rate during each outage per pattern, the baseline
//! consistency window per pattern and the time until everything caught up after each
//! outage. A chart is written only when its scenario ran.
//!
//! Text is drawn with a bundled font (a Latin-1 subset of DejaVu Sans, see
//! `font/LICENSE`), so no system font, fontconfig or font loader is needed.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{FontStyle, register_font};

use super::{RunResult, Scenario};
use crate::order::Pattern;

/// The family the bundled font is registered as.
const FONT: &str = "sans-serif";
/// The bundled font.
static FONT_BYTES: &[u8] = include_bytes!("font/DejaVuSans-subset.ttf");
/// Chart size in pixels (SVG and PNG).
const SIZE: (u32, u32) = (900, 540);
/// One color per series.
const COLORS: [RGBColor; 5] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
];

/// Why a chart could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ChartError {
    /// The directory could not be created.
    #[error("cannot create {path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The bundled font could not be loaded.
    #[error("the charts' bundled font is invalid")]
    Font,
    /// Drawing or writing a chart failed.
    #[error("drawing {path} failed: {cause}")]
    Draw {
        /// The chart's file.
        path: PathBuf,
        /// What plotters said.
        cause: String,
    },
}

/// Registers the bundled font once.
fn font() -> Result<(), ChartError> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| register_font(FONT, FontStyle::Normal, FONT_BYTES).is_ok());
    if ok { Ok(()) } else { Err(ChartError::Font) }
}

/// Grouped bars: one group per pattern, one bar per series.
struct Bars {
    title: String,
    y_desc: String,
    groups: Vec<String>,
    /// (series name, one value per group; `None`: no bar).
    series: Vec<(String, Vec<Option<f64>>)>,
    /// A fixed top of the y axis (e.g. 100 for percents); default: the data's.
    y_max: Option<f64>,
}

/// One chart's data.
enum Chart {
    /// Latency CDF lines: (pattern, percentiles 1..=100).
    Cdf(Vec<(String, Vec<f64>)>),
    /// Grouped bars.
    Bars(Bars),
}

type DrawResult<DB> = Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

impl Chart {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<DB> {
        root.fill(&WHITE)?;
        match self {
            Chart::Cdf(lines) => draw_cdf(root, lines),
            Chart::Bars(bars) => draw_bars(root, bars),
        }?;
        root.present()
    }
}

fn draw_cdf<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    lines: &[(String, Vec<f64>)],
) -> DrawResult<DB> {
    // Whole decades, so that every one is labelled.
    let all = lines.iter().flat_map(|(_, v)| v.iter().copied());
    let lo = 10f64.powf(
        all.clone()
            .fold(f64::INFINITY, f64::min)
            .max(0.01)
            .log10()
            .floor(),
    );
    let hi = 10f64.powf(all.fold(0.0, f64::max).max(lo * 10.0).log10().ceil());
    let mut chart = ChartBuilder::on(root)
        .caption("Completion latency CDF, baseline (log scale)", (FONT, 22))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d((lo..hi).log_scale(), 0f64..100f64)?;
    chart
        .configure_mesh()
        .x_desc("completion latency, ms")
        .y_desc("orders completed within, %")
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 15))
        .x_labels(12)
        .x_label_formatter(&|v| format_ms(*v))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()?;
    for (i, (name, p)) in lines.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(
                p.iter()
                    .enumerate()
                    .map(|(k, v)| (v.max(lo), (k + 1) as f64)),
                color.stroke_width(2),
            ))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
}

fn draw_bars<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, bars: &Bars) -> DrawResult<DB> {
    let n = bars.groups.len().max(1);
    let top = bars.y_max.unwrap_or_else(|| {
        bars.series
            .iter()
            .flat_map(|(_, v)| v.iter().flatten().copied())
            .fold(0.0, f64::max)
            * 1.3
    });
    let top = if top > 0.0 { top } else { 1.0 };
    let mut chart = ChartBuilder::on(root)
        .caption(&bars.title, (FONT, 22))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(72)
        .build_cartesian_2d(-0.5f64..n as f64 - 0.5, 0f64..top)?;
    let groups = &bars.groups;
    let name_at = |x: &f64| {
        let i = x.round();
        if (x - i).abs() < 1e-6 && i >= 0.0 {
            groups.get(i as usize).cloned().unwrap_or_default()
        } else {
            String::new()
        }
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .x_label_formatter(&name_at)
        .y_desc(bars.y_desc.as_str())
        .y_label_formatter(&|v| {
            if top >= 20.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.1}")
            }
        })
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 15))
        .draw()?;
    let k = bars.series.len().max(1) as f64;
    let width = 0.8 / k;
    for (s, (name, values)) in bars.series.iter().enumerate() {
        let color = COLORS[s % COLORS.len()];
        let x0 = |g: usize| g as f64 - 0.4 + s as f64 * width;
        chart
            .draw_series(values.iter().enumerate().filter_map(|(g, v)| {
                v.map(|v| Rectangle::new([(x0(g), 0.0), (x0(g) + width * 0.92, v)], color.filled()))
            }))?
            .label(name.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 12, y + 6)], color.filled()));
        chart.draw_series(values.iter().enumerate().filter_map(|(g, v)| {
            v.map(|v| {
                Text::new(
                    format_value(v),
                    (x0(g) + width * 0.46, v),
                    (FONT, 12)
                        .into_font()
                        .color(&BLACK)
                        .pos(Pos::new(HPos::Center, VPos::Bottom)),
                )
            })
        }))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
}

fn format_ms(v: f64) -> String {
    if v >= 1000.0 {
        format!("{:.0} s", v / 1000.0)
    } else if v >= 1.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn format_value(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// The patterns of `results`, in the order they first appear.
fn patterns(results: &[RunResult]) -> Vec<Pattern> {
    let mut ps: Vec<Pattern> = Vec::new();
    for r in results {
        if !ps.contains(&r.pattern) {
            ps.push(r.pattern);
        }
    }
    ps
}

fn find(results: &[RunResult], p: Pattern, s: Scenario) -> Option<&RunResult> {
    results.iter().find(|r| r.pattern == p && r.scenario == s)
}

/// The charts `results` allow, by file stem.
fn charts(results: &[RunResult]) -> Vec<(&'static str, Chart)> {
    let ps = patterns(results);
    let names: Vec<String> = ps.iter().map(|p| p.as_str().to_string()).collect();
    let has = |s: Scenario| results.iter().any(|r| r.scenario == s);
    let per_pattern = |s: Scenario, f: &dyn Fn(&RunResult) -> Option<f64>| -> Vec<Option<f64>> {
        ps.iter()
            .map(|p| find(results, *p, s).and_then(f))
            .collect()
    };
    let mut out = Vec::new();
    if has(Scenario::Baseline) {
        let lines: Vec<(String, Vec<f64>)> = ps
            .iter()
            .filter_map(|p| find(results, *p, Scenario::Baseline))
            .filter(|r| !r.completion_percentiles_ms.is_empty())
            .map(|r| {
                (
                    r.pattern.as_str().to_string(),
                    r.completion_percentiles_ms.clone(),
                )
            })
            .collect();
        if !lines.is_empty() {
            out.push(("latency-cdf", Chart::Cdf(lines)));
        }
        out.push((
            "consistency",
            Chart::Bars(Bars {
                title: "Consistency window, baseline (placed until every service agreed)".into(),
                y_desc: "ms".into(),
                groups: names.clone(),
                series: vec![
                    (
                        "p50".into(),
                        per_pattern(Scenario::Baseline, &|r| Some(r.figures.consistency_p50_ms)),
                    ),
                    (
                        "p99".into(),
                        per_pattern(Scenario::Baseline, &|r| Some(r.figures.consistency_p99_ms)),
                    ),
                ],
                y_max: None,
            }),
        ));
    }
    if has(Scenario::Saturation) {
        out.push((
            "saturation",
            Chart::Bars(Bars {
                title:
                    "Maximum sustainable throughput (open-loop, completion p99 within the limit)"
                        .into(),
                y_desc: "completed orders/s".into(),
                groups: names.clone(),
                series: vec![(
                    "max orders/s".into(),
                    per_pattern(Scenario::Saturation, &|r| {
                        r.saturation.as_ref().map(|s| s.max_sustainable_per_s)
                    }),
                )],
                y_max: None,
            }),
        ));
    }
    let outages: Vec<(Scenario, &str)> = [
        (Scenario::DependencyDown, "Payment down"),
        (Scenario::SideEffectDown, "Notification down"),
    ]
    .into_iter()
    .filter(|(s, _)| has(*s))
    .collect();
    if !outages.is_empty() {
        out.push((
            "outage-success",
            Chart::Bars(Bars {
                title: "Success rate of the orders placed during the outage".into(),
                y_desc: "completed, %".into(),
                groups: names.clone(),
                series: outages
                    .iter()
                    .map(|(s, label)| {
                        (
                            label.to_string(),
                            per_pattern(*s, &|r| {
                                r.outage.as_ref().map(|o| o.success_rate_during * 100.0)
                            }),
                        )
                    })
                    .collect(),
                y_max: Some(135.0),
            }),
        ));
        out.push((
            "catch-up",
            Chart::Bars(Bars {
                title: "Time until everything caught up after the outage".into(),
                y_desc: "ms after the dependency came back".into(),
                groups: names,
                series: outages
                    .iter()
                    .map(|(s, label)| {
                        (
                            label.to_string(),
                            per_pattern(*s, &|r| r.outage.as_ref().and_then(|o| o.catch_up_ms)),
                        )
                    })
                    .collect(),
                y_max: None,
            }),
        ));
    }
    out
}

/// Draws every chart `results` allow into `dir` as `<name>.svg` and `<name>.png`
/// (names: `latency-cdf`, `consistency`, `saturation`, `outage-success`, `catch-up`);
/// returns the files written.
pub fn write(dir: &Path, results: &[RunResult]) -> Result<Vec<PathBuf>, ChartError> {
    font()?;
    std::fs::create_dir_all(dir).map_err(|source| ChartError::Dir {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut written = Vec::new();
    for (name, chart) in charts(results) {
        let svg = dir.join(format!("{name}.svg"));
        let fail = |path: &Path, e: &dyn std::fmt::Display| ChartError::Draw {
            path: path.to_path_buf(),
            cause: e.to_string(),
        };
        chart
            .draw(&SVGBackend::new(&svg, SIZE).into_drawing_area())
            .map_err(|e| fail(&svg, &e))?;
        let png = dir.join(format!("{name}.png"));
        chart
            .draw(&BitMapBackend::new(&png, SIZE).into_drawing_area())
            .map_err(|e| fail(&png, &e))?;
        tracing::debug!(chart = name, "chart written");
        written.push(svg);
        written.push(png);
    }
    Ok(written)
}
