//! `shop lab`: runs [`crate::lab`] and prints the trade-off table (pattern | latency |
//! throughput | coupling | consistency) measured on this machine, then one table per
//! scenario (the saturation steps for the saturation scenario); `--out DIR` writes
//! `results.json` (its schema: `docs/lab-results.schema.json`) and the charts. Progress
//! bars on stderr while it runs, when stderr is a terminal. Exits 5 when an invariant
//! failed.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use super::CliError;
use super::table::Table;
use crate::lab::{self, LabConfig, Live, RunResult, Scenario};
use crate::order::Pattern;

/// `shop lab`.
#[derive(Debug, Clone, Args)]
pub struct LabArgs {
    /// Short runs (1 s each, 0.5 s outages, 0.5 s breaker cool-off, 0.3 s saturation
    /// steps from 200 orders/s): the whole lab in under a minute.
    #[arg(long)]
    pub quick: bool,
    /// The seed of every random choice [default: random, printed].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Write results.json (every figure, the settings, the seed) and the charts (SVG and
    /// PNG) into this directory.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// The patterns, comma-separated [default: all].
    #[arg(long, value_delimiter = ',', value_parser = super::parse_pattern)]
    pub patterns: Vec<Pattern>,
    /// The scenarios, comma-separated [default: all].
    #[arg(long, value_delimiter = ',', value_enum)]
    pub scenarios: Vec<Scenario>,
    /// Seconds each run places orders [default: 15, or 1.5 with --quick].
    #[arg(long)]
    pub secs: Option<f64>,
    /// Closed-loop clients per run [default: 16, or 8 with --quick].
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// How long the Order service's circuit breakers stay open before a probe
    /// [default: 5s, or 0.5s with --quick].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub breaker_open_for: Option<Duration>,
    /// Saturation: the arrival rate of the first step, orders/s [default: 50, or 200
    /// with --quick].
    #[arg(long, value_name = "RATE")]
    pub saturation_from: Option<f64>,
    /// Saturation: the completion latency p99 a sustainable step keeps within.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
    pub p99_limit: Duration,
    /// The bus: embedded, or nats://host:4222 (each run in its own namespace there).
    #[arg(long, default_value = "embedded")]
    pub bus: String,
    /// The stores: embedded, or postgres://… (each run in a database of its own, created
    /// and dropped by the lab: the role needs CREATEDB).
    #[arg(long, default_value = "embedded")]
    pub store: String,
}

/// What `results.json` holds (see `docs/lab-results.schema.json`).
#[derive(Debug, Serialize)]
struct Results<'a> {
    /// The schema's version.
    schema_version: u32,
    /// The machine.
    machine: Machine,
    /// How long the whole lab took, s.
    wall_s: f64,
    /// The settings, seed included.
    settings: &'a LabConfig,
    /// One entry per (pattern, scenario).
    runs: &'a [RunResult],
}

#[derive(Debug, Serialize)]
struct Machine {
    cores: usize,
    os: &'static str,
    arch: &'static str,
}

/// The lab's settings from the flags.
pub fn config(a: &LabArgs) -> Result<LabConfig, CliError> {
    let seed = a.seed.unwrap_or_else(|| fastrand::u64(..));
    let mut c = if a.quick {
        LabConfig::quick(seed)
    } else {
        LabConfig::full(seed)
    };
    if !a.patterns.is_empty() {
        c.patterns = a.patterns.clone();
    }
    if !a.scenarios.is_empty() {
        c.scenarios = a.scenarios.clone();
    }
    if let Some(secs) = a.secs {
        if !(0.2..=3600.0).contains(&secs) {
            return Err(CliError::Usage(format!(
                "--secs {secs}: give 0.2 to 3600 seconds"
            )));
        }
        c.run_for = Duration::from_secs_f64(secs);
        c.outage = c.outage.min(c.run_for.mul_f64(0.6));
    }
    if let Some(n) = a.concurrency {
        if n == 0 || n > 1024 {
            return Err(CliError::Usage(format!(
                "--concurrency {n}: give 1 to 1024"
            )));
        }
        c.concurrency = n;
    }
    if a.p99_limit < Duration::from_millis(10) || a.p99_limit > Duration::from_secs(60) {
        return Err(CliError::Usage(format!(
            "--p99-limit {}: give 10ms to 60s",
            humantime::format_duration(a.p99_limit)
        )));
    }
    c.saturation.p99_limit = a.p99_limit;
    if let Some(r) = a.saturation_from {
        if !(1.0..=100_000.0).contains(&r) {
            return Err(CliError::Usage(format!(
                "--saturation-from {r}: give 1 to 100000 orders/s"
            )));
        }
        c.saturation.start_per_s = r;
    }
    if let Some(d) = a.breaker_open_for {
        if d > Duration::from_secs(600) {
            return Err(CliError::Usage(format!(
                "--breaker-open-for {}: give at most 10m",
                humantime::format_duration(d)
            )));
        }
        c.breaker_open_for = d;
    }
    c.bus = crate::app::BusBackend::parse(&a.bus).ok_or_else(|| {
        CliError::Usage(format!(
            "--bus {}: give embedded or nats://host:port",
            a.bus
        ))
    })?;
    c.store = crate::app::StoreBackend::parse(&a.store).ok_or_else(|| {
        CliError::Usage(format!(
            "--store {}: give embedded or postgres://user@host:port/db",
            a.store
        ))
    })?;
    Ok(c)
}

fn ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn pct(v: f64) -> String {
    format!("{:.0}%", v * 100.0)
}

/// The classic trade-off table, measured: latency and throughput from the baseline,
/// coupling as the success rate with Payment down, consistency as the baseline window
/// and the window after Payment's outage.
pub fn tradeoff_table(results: &[RunResult]) -> Table {
    let mut t = Table::new([
        "PATTERN",
        "LATENCY p50 (placed / done)",
        "THROUGHPUT",
        "MAX SUSTAINABLE",
        "COUPLING (ok while Payment down)",
        "CONSISTENCY p50 / p99 after outage",
        "CAUGHT UP after Payment outage",
    ]);
    let find = |p: Pattern, s: Scenario| results.iter().find(|r| r.pattern == p && r.scenario == s);
    let mut patterns: Vec<Pattern> = Vec::new();
    for r in results {
        if !patterns.contains(&r.pattern) {
            patterns.push(r.pattern);
        }
    }
    for p in patterns {
        let base = find(p, Scenario::Baseline);
        let down = find(p, Scenario::DependencyDown);
        let sat = find(p, Scenario::Saturation).and_then(|r| r.saturation.as_ref());
        t.row([
            p.as_str().to_string(),
            base.map_or("-".into(), |b| {
                format!(
                    "{} / {} ms",
                    ms(b.figures.placement_p50_ms),
                    ms(b.figures.completion_p50_ms)
                )
            }),
            base.map_or("-".into(), |b| {
                format!("{:.0}/s", b.figures.throughput_per_s)
            }),
            sat.map_or("-".into(), |s| format!("{:.0}/s", s.max_sustainable_per_s)),
            down.map_or("-".into(), |d| pct(d.figures.success_rate)),
            match (base, down) {
                (Some(b), Some(d)) => format!(
                    "{} ms / {} ms",
                    ms(b.figures.consistency_p50_ms),
                    ms(d.figures.consistency_p99_ms)
                ),
                (Some(b), None) => format!("{} ms / -", ms(b.figures.consistency_p50_ms)),
                _ => "-".into(),
            },
            down.map_or("-".into(), catch_up),
        ]);
    }
    t
}

/// A run's time until everything caught up after its outage: `2.1 s`, `never`, or `-`.
fn catch_up(r: &RunResult) -> String {
    match r.outage.as_ref().map(|o| o.catch_up_ms) {
        Some(Some(c)) if c >= 1000.0 => format!("{:.1} s", c / 1000.0),
        Some(Some(c)) => format!("{} ms", ms(c)),
        Some(None) => "never".into(),
        None => "-".into(),
    }
}

/// The saturation table: per pattern, the maximum sustainable throughput and every
/// step (offered rate → achieved rate @ completion p99).
pub fn saturation_table(results: &[RunResult]) -> Table {
    let mut t = Table::new([
        "PATTERN",
        "MAX ORDERS/S",
        "STEPS offered → achieved/s @ p99 (✗: not sustained)",
        "LIMITED BY",
    ]);
    for r in results
        .iter()
        .filter(|r| r.scenario == Scenario::Saturation)
    {
        let Some(s) = &r.saturation else { continue };
        let steps: Vec<String> =
            s.steps
                .iter()
                .map(|st| {
                    format!(
                        "{:.0}→{:.0} @ {}{}",
                        st.offered_per_s,
                        st.achieved_per_s,
                        st.completion_p99_ms.map_or(
                            format!(">{:.0} ms", s.p99_limit_ms),
                            |p| format!("{} ms", ms(p))
                        ),
                        if st.sustainable { "" } else { " ✗" }
                    )
                })
                .collect();
        t.row([
            r.pattern.as_str().to_string(),
            format!("{:.0}", s.max_sustainable_per_s),
            steps.join(", "),
            s.steps
                .iter()
                .find_map(|st| st.limited_by.clone())
                .unwrap_or_else(|| "(the steps ran out)".into()),
        ]);
    }
    t
}

/// One scenario's table: every figure per pattern.
pub fn scenario_table(results: &[RunResult], scenario: Scenario) -> Table {
    let mut t = Table::new([
        "PATTERN",
        "ORDERS",
        "PLACED p50/p99 ms",
        "DONE p50/p99 ms",
        "ORDERS/S",
        "SUCCESS",
        "COUPLING",
        "CONSISTENT p50/p99 ms",
        "CAUGHT UP",
        "COMPENSATIONS",
        "REDELIVERED",
        "DLQ",
        "STUCK",
        "INVARIANTS",
    ]);
    for r in results.iter().filter(|r| r.scenario == scenario) {
        let f = &r.figures;
        t.row([
            r.pattern.as_str().to_string(),
            f.orders.to_string(),
            format!("{}/{}", ms(f.placement_p50_ms), ms(f.placement_p99_ms)),
            format!("{}/{}", ms(f.completion_p50_ms), ms(f.completion_p99_ms)),
            format!("{:.0}", f.throughput_per_s),
            pct(f.success_rate),
            pct(f.availability_coupling),
            format!("{}/{}", ms(f.consistency_p50_ms), ms(f.consistency_p99_ms)),
            catch_up(r),
            r.compensations.to_string(),
            r.redeliveries.to_string(),
            r.dead_letters.to_string(),
            r.stuck.to_string(),
            if r.invariants_hold {
                "ok".into()
            } else {
                format!("FAILED: {}", r.violations.join("; "))
            },
        ]);
    }
    t
}

/// The progress display: one bar over the runs and one for the run in progress, drawn
/// to stderr when it is a terminal (hidden otherwise, so logs and tests stay clean).
struct Progress {
    multi: MultiProgress,
    runs: ProgressBar,
    run: ProgressBar,
}

impl Progress {
    fn new(total: usize) -> Self {
        let target = if std::io::stderr().is_terminal() {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        let multi = MultiProgress::with_draw_target(target);
        let runs = multi.add(ProgressBar::new(total as u64));
        runs.set_style(
            ProgressStyle::with_template("{prefix:>5} [{bar:30}] {pos}/{len} runs, {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        runs.set_prefix("lab");
        let run = multi.add(ProgressBar::new(1));
        Progress { multi, runs, run }
    }

    /// A run starts: its bar counts milliseconds of `run_for`, or saturation steps.
    fn start(&self, index: usize, pattern: Pattern, scenario: Scenario, config: &LabConfig) {
        self.runs.set_position(index as u64);
        let (len, template) = if scenario == Scenario::Saturation {
            (
                config.saturation.max_steps as u64,
                "{prefix:>5} [{bar:30}] step {pos}/{len} {msg}",
            )
        } else {
            (
                config.run_for.as_millis() as u64,
                "{prefix:>5} [{bar:30}] {msg}",
            )
        };
        self.run.reset();
        self.run.set_length(len);
        self.run.set_style(
            ProgressStyle::with_template(template)
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        self.run.set_prefix("run");
        self.run
            .set_message(format!("{} · {}", pattern.as_str(), scenario.as_str()));
    }

    /// Shows what `live` says about the run in progress.
    fn tick(&self, live: &Live, title: &str, saturation: bool) {
        let pos = if saturation {
            live.step()
        } else {
            live.placing_for().as_millis() as u64
        };
        self.run
            .set_position(pos.min(self.run.length().unwrap_or(pos)));
        self.run.set_message(format!(
            "{title} — {}: {} placed, {} ended",
            live.phase(),
            live.placed(),
            live.ended()
        ));
    }

    fn finish(&self) {
        self.run.finish_and_clear();
        self.runs.finish_and_clear();
        let _ = self.multi.clear();
    }
}

/// Runs `shop lab`.
pub async fn lab(a: LabArgs) -> Result<(), CliError> {
    let config = config(&a)?;
    eprintln!(
        "shop lab: {} patterns × {} scenarios, {:?} each, {} clients, seed {}",
        config.patterns.len(),
        config.scenarios.len(),
        config.run_for,
        config.concurrency,
        config.seed
    );
    let total = config.patterns.len() * config.scenarios.len();
    let progress = Arc::new(Progress::new(total));
    let live = Arc::new(Live::default());
    let current = Arc::new(std::sync::Mutex::new((String::new(), false)));
    let ticker = tokio::spawn({
        let (progress, live, current) = (progress.clone(), live.clone(), current.clone());
        async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let (title, saturation) = current.lock().map(|c| c.clone()).unwrap_or_default();
                progress.tick(&live, &title, saturation);
            }
        }
    });
    let started = std::time::Instant::now();
    let results = lab::run_with(
        &config,
        |i, _, p, s| {
            progress.start(i, p, s, &config);
            if let Ok(mut c) = current.lock() {
                *c = (
                    format!("{} · {}", p.as_str(), s.as_str()),
                    s == Scenario::Saturation,
                );
            }
        },
        &live,
    )
    .await;
    ticker.abort();
    progress.finish();
    let results = results.map_err(|e| CliError::Launch {
        what: "the lab".into(),
        cause: e.to_string(),
    })?;
    let wall_s = started.elapsed().as_secs_f64();
    println!("{}", tradeoff_table(&results));
    for s in &config.scenarios {
        println!("\n{}", s.as_str());
        if *s == Scenario::Saturation {
            println!("{}", saturation_table(&results));
        } else {
            println!("{}", scenario_table(&results, *s));
        }
    }
    println!("\nseed {}, {wall_s:.1} s", config.seed);
    if let Some(dir) = &a.out {
        let io = |e: std::io::Error| CliError::Usage(format!("--out {}: {e}", dir.display()));
        std::fs::create_dir_all(dir).map_err(io)?;
        let doc = Results {
            schema_version: 1,
            machine: Machine {
                cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
                os: std::env::consts::OS,
                arch: std::env::consts::ARCH,
            },
            wall_s,
            settings: &config,
            runs: &results,
        };
        let json = serde_json::to_vec_pretty(&doc)
            .map_err(|e| CliError::Usage(format!("encoding the results: {e}")))?;
        std::fs::write(dir.join("results.json"), json).map_err(io)?;
        println!("results: {}", dir.join("results.json").display());
        let charts = lab::charts::write(dir, &results)
            .map_err(|e| CliError::Usage(format!("--out {}: {e}", dir.display())))?;
        println!("charts: {} files in {}", charts.len(), dir.display());
    }
    let failed = results.iter().filter(|r| !r.invariants_hold).count();
    if failed > 0 {
        eprintln!("\x1b[31m{failed} run(s) broke an invariant (see INVARIANTS)\x1b[0m");
        return Err(CliError::CheckFailed(failed));
    }
    Ok(())
}
