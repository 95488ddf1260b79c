//! `shop lab`: runs [`crate::lab`] and prints the trade-off table (pattern | latency |
//! throughput | coupling | consistency) measured on this machine, then one table per
//! scenario; `--out DIR` writes `results.json`. Exits 5 when an invariant failed.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use serde::Serialize;

use super::CliError;
use super::table::Table;
use crate::lab::{self, LabConfig, RunResult, Scenario};
use crate::order::Pattern;

/// `shop lab`.
#[derive(Debug, Clone, Args)]
pub struct LabArgs {
    /// Short runs (1.5 s each, 0.8 s outages): the whole lab in under a minute.
    #[arg(long)]
    pub quick: bool,
    /// The seed of every random choice [default: random, printed].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Write results.json (every figure, the settings, the seed) into this directory.
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
}

/// What `results.json` holds.
#[derive(Debug, Serialize)]
struct Results<'a> {
    /// The machine.
    machine: Machine,
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
        "COUPLING (ok while Payment down)",
        "CONSISTENCY p50 / p99 after outage",
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
        "COMPENSATIONS",
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
            r.compensations.to_string(),
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
    let results = lab::run(&config, |i, n, p, s| {
        eprint!("\r\x1b[2K  [{}/{n}] {} · {}", i + 1, p.as_str(), s.as_str());
        let _ = std::io::stderr().flush();
    })
    .await
    .map_err(|e| CliError::Launch {
        what: "the lab".into(),
        cause: e.to_string(),
    })?;
    eprint!("\r\x1b[2K");
    println!("{}", tradeoff_table(&results));
    for s in &config.scenarios {
        println!("\n{}", s.as_str());
        println!("{}", scenario_table(&results, *s));
    }
    println!("\nseed {}", config.seed);
    if let Some(dir) = &a.out {
        let io = |e: std::io::Error| CliError::Usage(format!("--out {}: {e}", dir.display()));
        std::fs::create_dir_all(dir).map_err(io)?;
        let doc = Results {
            machine: Machine {
                cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
                os: std::env::consts::OS,
                arch: std::env::consts::ARCH,
            },
            settings: &config,
            runs: &results,
        };
        let json = serde_json::to_vec_pretty(&doc)
            .map_err(|e| CliError::Usage(format!("encoding the results: {e}")))?;
        std::fs::write(dir.join("results.json"), json).map_err(io)?;
        println!("results: {}", dir.join("results.json").display());
    }
    let failed = results.iter().filter(|r| !r.invariants_hold).count();
    if failed > 0 {
        eprintln!("\x1b[31m{failed} run(s) broke an invariant (see INVARIANTS)\x1b[0m");
        return Err(CliError::CheckFailed(failed));
    }
    Ok(())
}
