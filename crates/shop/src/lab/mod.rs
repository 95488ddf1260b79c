//! The lab (`shop lab`): each pattern against a fresh shop, through scenarios of load and
//! faults, measured — the classic trade-off table (latency, throughput, coupling,
//! consistency) with figures from this machine instead of adjectives.
//!
//! One run = one pattern × one scenario: a fresh [`ShopApp`] (embedded bus and stores
//! under a temporary directory, only that pattern), `concurrency` closed-loop clients
//! placing orders through the Order service's desk for `run_for`, the scenario's fault
//! injected through the services' fault settings (which gate their event handlers too),
//! then the faults cleared, the shop left to settle, and measured:
//! [`metrics::Figures`] per run, dead letters, compensations (refunds, releases,
//! cancelled shipments on the orders' timelines) and the `shop check` invariants.
//!
//! | scenario | fault |
//! | --- | --- |
//! | `baseline` | none |
//! | `slow-dependency` | Payment +200 ms on every call and event |
//! | `dependency-down` | Payment down for `outage`, from a quarter into the run |
//! | `side-effect-down` | Notification down for `outage`, from a quarter into the run |
//! | `flaky-dependency` | Inventory fails 20 % of calls and events |

pub mod metrics;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use switchyard::Timestamp;

use crate::app::{AppConfig, AppError, ShopApp};
use crate::check::check;
use crate::faults::FaultConfig;
use crate::model::{Item, TOPICS};
use crate::order::{NewOrder, Order, OrderStatus, Pattern};
use metrics::{Figures, OrderRecord};

/// A lab scenario (see the [module docs](self)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// No fault.
    Baseline,
    /// Payment answers (and handles events) 200 ms late.
    SlowDependency,
    /// Payment down for the outage.
    DependencyDown,
    /// Notification down for the outage.
    SideEffectDown,
    /// Inventory fails 20 % of calls and events.
    FlakyDependency,
}

impl Scenario {
    /// Every scenario, in the order the lab runs them.
    pub const ALL: [Scenario; 5] = [
        Scenario::Baseline,
        Scenario::SlowDependency,
        Scenario::DependencyDown,
        Scenario::SideEffectDown,
        Scenario::FlakyDependency,
    ];

    /// The name on the command line and in results.
    pub fn as_str(self) -> &'static str {
        match self {
            Scenario::Baseline => "baseline",
            Scenario::SlowDependency => "slow-dependency",
            Scenario::DependencyDown => "dependency-down",
            Scenario::SideEffectDown => "side-effect-down",
            Scenario::FlakyDependency => "flaky-dependency",
        }
    }
}

/// The lab's settings.
#[derive(Debug, Clone, Serialize)]
pub struct LabConfig {
    /// The patterns to measure.
    pub patterns: Vec<Pattern>,
    /// The scenarios to run each pattern through.
    pub scenarios: Vec<Scenario>,
    /// How long each run places orders.
    pub run_for: Duration,
    /// How long an outage lasts (dependency-down, side-effect-down).
    pub outage: Duration,
    /// Closed-loop clients per run.
    pub concurrency: usize,
    /// The seed of every random choice (SKUs, quantities); printed with the results.
    pub seed: u64,
    /// Where the runs' shops live (default: a temporary directory).
    pub data_dir: Option<PathBuf>,
}

impl LabConfig {
    /// The default lab: every pattern and scenario, 15 s runs with a 10 s outage, 16
    /// clients (about seven minutes in all).
    pub fn full(seed: u64) -> Self {
        LabConfig {
            patterns: Pattern::ALL.to_vec(),
            scenarios: Scenario::ALL.to_vec(),
            run_for: Duration::from_secs(15),
            outage: Duration::from_secs(10),
            concurrency: 16,
            seed,
            data_dir: None,
        }
    }

    /// `--quick`: 1.5 s runs with a 0.8 s outage, 8 clients (under a minute in all).
    pub fn quick(seed: u64) -> Self {
        LabConfig {
            run_for: Duration::from_millis(1_500),
            outage: Duration::from_millis(800),
            concurrency: 8,
            ..LabConfig::full(seed)
        }
    }
}

/// One run's results.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunResult {
    /// The pattern.
    pub pattern: Pattern,
    /// The scenario.
    pub scenario: Scenario,
    /// The measured figures.
    pub figures: Figures,
    /// Compensations run (refunds, releases, cancelled shipments).
    pub compensations: usize,
    /// Dead letters left on every topic.
    pub dead_letters: usize,
    /// Orders still in flight when the run gave up waiting (2 minutes after it ended):
    /// stalled, typically on a dead-lettered message (replay it to finish them).
    pub stuck: usize,
    /// Whether every invariant of `shop check` held after the run.
    pub invariants_hold: bool,
    /// The invariant violations, if any.
    pub violations: Vec<String>,
}

/// Why the lab could not run.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// A shop could not start or stop.
    #[error(transparent)]
    App(#[from] AppError),
    /// The data directory could not be made.
    #[error("cannot create the lab's data directory: {0}")]
    DataDir(#[source] std::io::Error),
    /// Reading a service's records failed.
    #[error("reading the shop's records failed: {0}")]
    Read(String),
}

/// Runs every (pattern, scenario) of `config` in turn; `progress` hears about each run
/// as it starts (index, total, pattern, scenario).
pub async fn run(
    config: &LabConfig,
    mut progress: impl FnMut(usize, usize, Pattern, Scenario),
) -> Result<Vec<RunResult>, LabError> {
    let temporary = match &config.data_dir {
        Some(_) => None,
        None => Some(tempfile::tempdir().map_err(LabError::DataDir)?),
    };
    let root = match (&config.data_dir, &temporary) {
        (Some(d), _) => d.clone(),
        (None, Some(t)) => t.path().to_path_buf(),
        (None, None) => return Err(LabError::DataDir(std::io::Error::other("no directory"))),
    };
    let total = config.patterns.len() * config.scenarios.len();
    let mut results = Vec::with_capacity(total);
    for (i, (pattern, scenario)) in config
        .patterns
        .iter()
        .flat_map(|p| config.scenarios.iter().map(move |s| (*p, *s)))
        .enumerate()
    {
        progress(i, total, pattern, scenario);
        let dir = root.join(format!("{}-{}", pattern.as_str(), scenario.as_str()));
        std::fs::create_dir_all(&dir).map_err(LabError::DataDir)?;
        results.push(run_one(config, pattern, scenario, dir, i as u64).await?);
    }
    Ok(results)
}

/// Places orders for one run and measures them.
async fn run_one(
    config: &LabConfig,
    pattern: Pattern,
    scenario: Scenario,
    dir: PathBuf,
    index: u64,
) -> Result<RunResult, LabError> {
    let app = Arc::new(ShopApp::start(AppConfig::new(&dir).with_patterns(&[pattern])).await?);
    let started = Instant::now();
    let wall_start_ms = Timestamp::now().unix_micros() / 1000;
    let faults = app.faults().clone();
    let outage = config.outage;
    let quarter = config.run_for / 4;
    let injector = tokio::spawn(async move {
        match scenario {
            Scenario::Baseline => {}
            Scenario::SlowDependency => faults.payment.set(FaultConfig {
                latency_ms: 200,
                ..FaultConfig::default()
            }),
            Scenario::FlakyDependency => faults.inventory.set(FaultConfig {
                error_rate: 0.2,
                ..FaultConfig::default()
            }),
            Scenario::DependencyDown | Scenario::SideEffectDown => {
                tokio::time::sleep(quarter).await;
                let target = if scenario == Scenario::DependencyDown {
                    &faults.payment
                } else {
                    &faults.notification
                };
                target.set(FaultConfig {
                    down_ms: u64::try_from(outage.as_millis()).unwrap_or(u64::MAX),
                    ..FaultConfig::default()
                });
            }
        }
    });
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..config.concurrency as u64 {
        let (app, stop) = (app.clone(), stop.clone());
        let mut rng = fastrand::Rng::with_seed(config.seed ^ (index << 32) ^ c);
        clients.push(tokio::spawn(async move {
            let mut records = Vec::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let id = format!("lab-{c}-{n}");
                n += 1;
                let req = NewOrder {
                    order_id: Some(id.clone()),
                    customer: format!("c-{}", rng.u32(0..50)),
                    items: vec![Item::new(
                        format!("sku-{:03}", rng.u32(1..=20)),
                        rng.u32(1..=3),
                    )],
                    payment_token: "tok_ok".into(),
                    pattern,
                };
                records.push(place_one(&app, &req, started).await);
            }
            records
        }));
    }
    tokio::time::sleep(config.run_for).await;
    stop.store(true, Ordering::Relaxed);
    let mut records = Vec::new();
    let mut ids = Vec::new();
    for client in clients {
        let (r, i): (Vec<_>, Vec<_>) = client
            .await
            .map_err(|e| LabError::Read(e.to_string()))?
            .into_iter()
            .unzip();
        records.extend(r);
        ids.extend(i);
    }
    let run_s = started.elapsed().as_secs_f64();
    let _ = injector.await;
    app.faults().payment.clear();
    app.faults().notification.clear();
    app.faults().inventory.clear();

    // Let the asynchronous parts finish, then read what every service recorded.
    let deadline = Instant::now() + Duration::from_secs(120);
    let completed = records.iter().filter(|r| r.completed).count();
    let report = loop {
        let report = check(&app)
            .await
            .map_err(|e| LabError::Read(e.to_string()))?;
        // Every order ended and every completed one shipped (the asynchronous parts of
        // hybrid and choreography included).
        let done = report.in_flight.is_empty() && report.shipments >= completed;
        if done || Instant::now() > deadline {
            break report;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut compensations = 0;
    for (record, id) in records.iter_mut().zip(&ids) {
        let Some(order) = app
            .book()
            .get(id)
            .await
            .map_err(|e| LabError::Read(e.to_string()))?
        else {
            continue;
        };
        compensations += order
            .history
            .iter()
            .filter(|e| {
                matches!(
                    e.what.as_str(),
                    "refunded" | "released" | "shipment_cancelled"
                )
            })
            .count();
        if record.completed {
            record.consistent_ms = agreed_at_ms(&app, &order)
                .await?
                .map(|at| at.saturating_sub(wall_start_ms) as f64 - record.placed_at_s * 1000.0);
        }
    }
    let mut dead_letters = 0;
    for topic in TOPICS {
        dead_letters += app
            .bus()
            .dead_letters(topic, 100_000)
            .await
            .map_err(|e| LabError::Read(e.to_string()))?
            .len();
    }
    let violations: Vec<String> = report.violations.iter().map(|v| format!("{v:?}")).collect();
    let figures = metrics::figures(&records, run_s);
    match Arc::try_unwrap(app) {
        Ok(app) => app.shutdown().await?,
        Err(_) => {
            return Err(LabError::Read(
                "the shop is still in use after the run".into(),
            ));
        }
    }
    Ok(RunResult {
        pattern,
        scenario,
        figures,
        compensations,
        dead_letters,
        stuck: report.in_flight.len(),
        invariants_hold: violations.is_empty(),
        violations,
    })
}

/// Places `req`, waits for its end (at most 60 s), and records it with its id.
async fn place_one(app: &ShopApp, req: &NewOrder, started: Instant) -> (OrderRecord, String) {
    let id = req.order_id.clone().unwrap_or_default();
    let placed_at_s = started.elapsed().as_secs_f64();
    let t0 = Instant::now();
    let placed = app.desk().place(req).await;
    let placement_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let ended: Option<Order> = match placed {
        Ok(o) if o.status.is_terminal() => Some(o),
        Ok(o) => app
            .book()
            .wait(&o.id, Duration::from_secs(60))
            .await
            .ok()
            .filter(|o| o.status.is_terminal()),
        Err(e) => {
            return (
                OrderRecord {
                    placed_at_s,
                    placement_ms,
                    completion_ms: None,
                    completed: false,
                    reason: Some(e.to_string()),
                    consistent_ms: None,
                },
                id,
            );
        }
    };
    let completion_ms = ended.as_ref().map(|_| t0.elapsed().as_secs_f64() * 1000.0);
    let completed = ended
        .as_ref()
        .is_some_and(|o| o.status == OrderStatus::Completed);
    (
        OrderRecord {
            placed_at_s,
            placement_ms,
            completion_ms,
            completed,
            reason: ended.and_then(|o| o.reason),
            consistent_ms: None,
        },
        id,
    )
}

/// When every service had done its part for a completed `order` (Unix ms): the latest
/// of the order's end, its reservation's last change, its shipment and its e-mails.
async fn agreed_at_ms(app: &ShopApp, order: &Order) -> Result<Option<u64>, LabError> {
    let read = |e: &dyn std::fmt::Display| LabError::Read(e.to_string());
    let services = app.services();
    let mut latest = order.updated_at.unix_micros() / 1000;
    if let Some(r) = services
        .inventory
        .reservation(&order.id)
        .await
        .map_err(|e| read(&e))?
    {
        latest = latest.max(r.updated_ms);
    }
    match services
        .shipping
        .get(&order.id)
        .await
        .map_err(|e| read(&e))?
    {
        Some(s) => latest = latest.max(s.created_ms),
        None => return Ok(None),
    }
    for mail in services
        .notifier
        .sent(&order.id)
        .await
        .map_err(|e| read(&e))?
    {
        latest = latest.max(mail.at_ms);
    }
    Ok(Some(latest))
}
