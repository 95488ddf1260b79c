//! The lab (`shop lab`): each pattern against a fresh shop, through scenarios of load and
//! faults, measured — the classic trade-off table (latency, throughput, coupling,
//! consistency) with figures from this machine instead of adjectives.
//!
//! One run = one pattern × one scenario: a fresh [`ShopApp`] (embedded bus and stores
//! under a temporary directory, only that pattern), `concurrency` closed-loop clients
//! placing orders through the Order service's desk for `run_for`, the scenario's fault
//! injected through the services' fault settings (which gate their event handlers too),
//! then the faults cleared, the shop left to settle, and measured:
//! [`metrics::Figures`] per run, the completion latency CDF, redeliveries (the routers'
//! retried handler failures), dead letters, compensations (refunds, releases, cancelled
//! shipments on the orders' timelines), for an outage its [`metrics::OutageFigures`]
//! (success while down, time until everything caught up after it) and the `shop check`
//! invariants.
//!
//! | scenario | fault or load |
//! | --- | --- |
//! | `baseline` | none |
//! | `slow-dependency` | Payment +200 ms on every call and event |
//! | `dependency-down` | Payment down for `outage`, from a quarter into the run |
//! | `side-effect-down` | Notification down for `outage`, from a quarter into the run |
//! | `flaky-dependency` | Inventory fails 20 % of calls and events |
//! | `saturation` | no fault; open-loop arrivals at a fixed rate, raised step by step |
//!
//! The saturation scenario does not use closed-loop clients (whose rate drops as the
//! shop slows, hiding the overload): orders arrive at a fixed rate for `step_for`, then
//! the step is judged ([`metrics::assess_step`]: completion p99 within `p99_limit`, at
//! most 1 % failed, arrivals kept up); while it holds, the rate is multiplied by
//! `factor`. The largest completed-orders rate of a sustainable step is the pattern's
//! maximum sustainable throughput on this machine.

pub mod charts;
pub mod metrics;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use switchyard::Timestamp;

use crate::app::{AppConfig, AppError, BusBackend, ShopApp, StoreBackend};
use crate::check::check;
use crate::faults::FaultConfig;
use crate::model::{Item, TOPICS};
use crate::order::{NewOrder, Order, OrderStatus, Pattern};
use metrics::{Figures, OrderRecord, OutageFigures, Saturation};

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
    /// Open-loop arrivals, raised step by step until the shop cannot keep up.
    Saturation,
}

impl Scenario {
    /// Every scenario, in the order the lab runs them.
    pub const ALL: [Scenario; 6] = [
        Scenario::Baseline,
        Scenario::SlowDependency,
        Scenario::DependencyDown,
        Scenario::SideEffectDown,
        Scenario::FlakyDependency,
        Scenario::Saturation,
    ];

    /// The name on the command line and in results.
    pub fn as_str(self) -> &'static str {
        match self {
            Scenario::Baseline => "baseline",
            Scenario::SlowDependency => "slow-dependency",
            Scenario::DependencyDown => "dependency-down",
            Scenario::SideEffectDown => "side-effect-down",
            Scenario::FlakyDependency => "flaky-dependency",
            Scenario::Saturation => "saturation",
        }
    }

    /// Whether a dependency goes down for a while in this scenario.
    pub fn has_outage(self) -> bool {
        matches!(self, Scenario::DependencyDown | Scenario::SideEffectDown)
    }
}

/// Serializes a duration as seconds (a number), as results.json gives every duration.
fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// The saturation scenario's settings (see the [module docs](self)).
#[derive(Debug, Clone, Serialize)]
pub struct SaturationConfig {
    /// The arrival rate of the first step, orders/s.
    pub start_per_s: f64,
    /// What each next step multiplies the rate by.
    pub factor: f64,
    /// The most steps (the last one's rate is `start_per_s × factor^(max_steps − 1)`).
    pub max_steps: usize,
    /// How long each step's orders arrive.
    #[serde(serialize_with = "secs")]
    pub step_for: Duration,
    /// The completion latency p99 a sustainable step keeps within.
    #[serde(serialize_with = "secs")]
    pub p99_limit: Duration,
}

/// The lab's settings.
#[derive(Debug, Clone, Serialize)]
pub struct LabConfig {
    /// The patterns to measure.
    pub patterns: Vec<Pattern>,
    /// The scenarios to run each pattern through.
    pub scenarios: Vec<Scenario>,
    /// How long each run places orders.
    #[serde(serialize_with = "secs")]
    pub run_for: Duration,
    /// How long an outage lasts (dependency-down, side-effect-down).
    #[serde(serialize_with = "secs")]
    pub outage: Duration,
    /// Closed-loop clients per run.
    pub concurrency: usize,
    /// The seed of every random choice (SKUs, quantities); printed with the results.
    pub seed: u64,
    /// Where the runs' shops live (default: a temporary directory).
    pub data_dir: Option<PathBuf>,
    /// How long the Order service's circuit breakers stay open before a probe.
    #[serde(serialize_with = "secs")]
    pub breaker_open_for: Duration,
    /// The saturation scenario's steps.
    pub saturation: SaturationConfig,
    /// The bus every run's shop uses (`embedded`, or NATS: each run in its own
    /// namespace on the server). Recorded as its kind only.
    #[serde(serialize_with = "bus_kind")]
    pub bus: BusBackend,
    /// Where every run's stores live (`embedded`, or PostgreSQL: each run in a database
    /// of its own, created and dropped by the lab). Recorded as its kind only (no URL,
    /// no password in results.json).
    #[serde(serialize_with = "store_kind")]
    pub store: StoreBackend,
}

fn bus_kind<S: serde::Serializer>(b: &BusBackend, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(match b {
        BusBackend::Embedded => "embedded",
        BusBackend::Nats(_) => "nats",
    })
}

fn store_kind<S: serde::Serializer>(b: &StoreBackend, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(match b {
        StoreBackend::Embedded => "embedded",
        StoreBackend::Postgres(_) => "postgres",
    })
}

impl LabConfig {
    /// The default lab: every pattern and scenario, 15 s runs with a 10 s outage, 16
    /// clients, the client's default 5 s breaker cool-off; saturation from 50 orders/s,
    /// ×1.5 per 3 s step, up to 12 steps (about 4,300/s), p99 limit 1 s (about ten
    /// minutes in all).
    pub fn full(seed: u64) -> Self {
        LabConfig {
            patterns: Pattern::ALL.to_vec(),
            scenarios: Scenario::ALL.to_vec(),
            run_for: Duration::from_secs(15),
            outage: Duration::from_secs(10),
            concurrency: 16,
            seed,
            data_dir: None,
            breaker_open_for: switchyard_rpc::breaker::BreakerConfig::default().open_for,
            saturation: SaturationConfig {
                start_per_s: 50.0,
                factor: 1.5,
                max_steps: 12,
                step_for: Duration::from_secs(3),
                p99_limit: Duration::from_secs(1),
            },
            bus: BusBackend::Embedded,
            store: StoreBackend::Embedded,
        }
    }

    /// `--quick`: 1 s runs with a 0.5 s outage, 8 clients, a 0.5 s breaker cool-off
    /// (so a run does not wait out the 5 s one); saturation from 200 orders/s, ×2 per
    /// 0.3 s step, up to 6 steps (6,400/s). Under a minute in all on an idle machine.
    pub fn quick(seed: u64) -> Self {
        let full = LabConfig::full(seed);
        LabConfig {
            run_for: Duration::from_millis(1_000),
            outage: Duration::from_millis(500),
            concurrency: 8,
            breaker_open_for: Duration::from_millis(500),
            saturation: SaturationConfig {
                start_per_s: 200.0,
                factor: 2.0,
                max_steps: 6,
                step_for: Duration::from_millis(300),
                ..full.saturation.clone()
            },
            ..full
        }
    }
}

/// What the run in progress is doing, for a progress display (see [`run_with`]):
/// updated by the lab as it goes, read by anyone.
#[derive(Debug, Default)]
pub struct Live {
    placed: AtomicU64,
    ended: AtomicU64,
    step: AtomicU64,
    phase: Mutex<String>,
    placing_since: Mutex<Option<Instant>>,
}

impl Live {
    /// Orders placed so far in this run.
    pub fn placed(&self) -> u64 {
        self.placed.load(Ordering::Relaxed)
    }

    /// Orders of this run that ended (or whose placing failed) so far.
    pub fn ended(&self) -> u64 {
        self.ended.load(Ordering::Relaxed)
    }

    /// The saturation step under way (1-based; 0 outside the saturation scenario).
    pub fn step(&self) -> u64 {
        self.step.load(Ordering::Relaxed)
    }

    /// How long the run has been placing orders (zero before it started to).
    pub fn placing_for(&self) -> Duration {
        self.placing_since
            .lock()
            .ok()
            .and_then(|s| s.map(|t| t.elapsed()))
            .unwrap_or_default()
    }

    /// What the run is doing (placing orders, settling, measuring, a saturation step).
    pub fn phase(&self) -> String {
        self.phase.lock().map(|p| p.clone()).unwrap_or_default()
    }

    fn set_phase(&self, phase: impl Into<String>) {
        if let Ok(mut p) = self.phase.lock() {
            *p = phase.into();
        }
    }

    fn reset(&self) {
        self.placed.store(0, Ordering::Relaxed);
        self.ended.store(0, Ordering::Relaxed);
        self.step.store(0, Ordering::Relaxed);
        if let Ok(mut s) = self.placing_since.lock() {
            *s = None;
        }
        self.set_phase("starting the shop");
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
    /// The completion latency at each percentile 1..=100 (index `i` holds p`i + 1`),
    /// ms: the run's latency CDF ([`metrics::percentiles`]).
    pub completion_percentiles_ms: Vec<f64>,
    /// Handler failures retried by the shop's routers: events nacked for redelivery
    /// and requests retried in place by a responder (every router, summed).
    pub redeliveries: u64,
    /// Deliveries the routers skipped as duplicates (their inbox had them).
    pub duplicates: u64,
    /// What the outage did (dependency-down and side-effect-down only).
    pub outage: Option<OutageFigures>,
    /// The saturation steps and maximum (saturation only).
    pub saturation: Option<Saturation>,
    /// How long the run took on the wall clock, start, settling and shutdown included, s.
    pub wall_s: f64,
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
    /// A run's database could not be created on the PostgreSQL server.
    #[error("creating a run's database failed: {0}; the --store role needs CREATEDB")]
    Database(String),
}

/// Runs every (pattern, scenario) of `config` in turn; `progress` hears about each run
/// as it starts (index, total, pattern, scenario).
pub async fn run(
    config: &LabConfig,
    progress: impl FnMut(usize, usize, Pattern, Scenario),
) -> Result<Vec<RunResult>, LabError> {
    run_with(config, progress, &Arc::new(Live::default())).await
}

/// [`run`], keeping `live` up to date with the run in progress (for a progress bar).
pub async fn run_with(
    config: &LabConfig,
    mut progress: impl FnMut(usize, usize, Pattern, Scenario),
    live: &Arc<Live>,
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
    // The removal of the previous run's shop (temporary directory only): it runs while
    // the next shop starts and ends before that run places orders, so it never overlaps
    // a measurement (and the lab does not end with one long removal).
    let mut removing: Option<Removal> = None;
    for (i, (pattern, scenario)) in config
        .patterns
        .iter()
        .flat_map(|p| config.scenarios.iter().map(move |s| (*p, *s)))
        .enumerate()
    {
        live.reset();
        progress(i, total, pattern, scenario);
        let dir = root.join(format!("{}-{}", pattern.as_str(), scenario.as_str()));
        std::fs::create_dir_all(&dir).map_err(LabError::DataDir)?;
        let result = run_one(
            config,
            pattern,
            scenario,
            dir.clone(),
            i as u64,
            live,
            removing.take(),
        )
        .await?;
        if temporary.is_some() {
            removing = Some(tokio::task::spawn_blocking(move || {
                std::fs::remove_dir_all(&dir)
            }));
        }
        tracing::info!(
            pattern = pattern.as_str(),
            scenario = scenario.as_str(),
            orders = result.figures.orders,
            wall_s = result.wall_s,
            "lab run done"
        );
        results.push(result);
    }
    finish_removal(removing).await;
    if let Some(t) = temporary {
        let removing = Instant::now();
        if let Err(e) = t.close() {
            tracing::warn!(error = %e, "could not remove the lab's data directory");
        }
        tracing::debug!(
            secs = removing.elapsed().as_secs_f64(),
            "removed the lab's data directory"
        );
    }
    Ok(results)
}

/// The removal of a finished run's directory, in a blocking task.
type Removal = tokio::task::JoinHandle<std::io::Result<()>>;

/// Waits for `removal`, if any; a failure is logged (the directory goes with the
/// temporary root anyway).
async fn finish_removal(removal: Option<Removal>) {
    if let Some(r) = removal {
        match r.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "could not remove a lab run's directory"),
            Err(e) => tracing::warn!(error = %e, "removing a lab run's directory failed"),
        }
    }
}

/// Places orders for one run and measures them; `removal` (the previous run's
/// directory) is waited for after the shop started, before the first order.
async fn run_one(
    config: &LabConfig,
    pattern: Pattern,
    scenario: Scenario,
    dir: PathBuf,
    index: u64,
    live: &Arc<Live>,
    removal: Option<Removal>,
) -> Result<RunResult, LabError> {
    let wall = Instant::now();
    let mut app_config = AppConfig::new(&dir).with_patterns(&[pattern]);
    app_config.client.breaker.open_for = config.breaker_open_for;
    // Distributed: a fresh namespace on NATS and a fresh database for this run, so no
    // run sees another's streams, consumers or rows.
    let fresh = format!("lab{}x{index}", Timestamp::now().unix_micros());
    if let BusBackend::Nats(url) = &config.bus {
        let mut bus = switchyard_nats::NatsConfig::new(url.clone());
        bus.namespace = Some(fresh.clone());
        app_config = app_config.with_bus(Arc::new(switchyard_nats::NatsBus::new(bus)));
    }
    let database = match &config.store {
        StoreBackend::Postgres(url) => {
            let db = crate::wiring::create_database(url, &fresh)
                .await
                .map_err(|e| LabError::Database(e.to_string()))?;
            app_config = app_config.with_store(StoreBackend::Postgres(db));
            Some(url.clone())
        }
        StoreBackend::Embedded => None,
    };
    let app = Arc::new(ShopApp::start(app_config).await?);
    finish_removal(removal).await;
    let started = Instant::now();
    let start_s = wall.elapsed().as_secs_f64();
    let wall_start_ms = Timestamp::now().unix_micros() / 1000;
    let load = if scenario == Scenario::Saturation {
        saturate(config, &app, pattern, started, index, live).await?
    } else {
        closed_loop(config, &app, pattern, scenario, started, index, live).await?
    };
    let load_s = started.elapsed().as_secs_f64();
    let Load {
        mut records,
        ids,
        run_s,
        outage,
        saturation,
    } = load;
    app.faults().payment.clear();
    app.faults().notification.clear();
    app.faults().inventory.clear();

    // Let the asynchronous parts finish, then read what every service recorded.
    live.set_phase("settling");
    let settling = Instant::now();
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
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    live.set_phase("measuring");
    let settle_s = settling.elapsed().as_secs_f64();
    let measuring = Instant::now();
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
    let routers = app.router_stats();
    let violations: Vec<String> = report.violations.iter().map(|v| format!("{v:?}")).collect();
    let figures = metrics::figures(&records, run_s);
    let outage = outage.map(|(start_s, end_s)| metrics::outage_figures(&records, start_s, end_s));
    live.set_phase("stopping the shop");
    let measure_s = measuring.elapsed().as_secs_f64();
    let stopping = Instant::now();
    match Arc::try_unwrap(app) {
        Ok(app) => app.shutdown().await?,
        Err(_) => {
            return Err(LabError::Read(
                "the shop is still in use after the run".into(),
            ));
        }
    }
    if let Some(url) = database
        && let Err(e) = crate::wiring::drop_database(&url, &fresh).await
    {
        tracing::warn!(database = %fresh, error = %e, "could not drop a lab run's database");
    }
    // Where a run's time goes (RUST_LOG=shop::lab=debug).
    tracing::debug!(
        pattern = pattern.as_str(),
        scenario = scenario.as_str(),
        start_s,
        load_s,
        settle_s,
        measure_s,
        stop_s = stopping.elapsed().as_secs_f64(),
        "lab run phases"
    );
    Ok(RunResult {
        pattern,
        scenario,
        figures,
        completion_percentiles_ms: metrics::percentiles(&records),
        redeliveries: routers.retried,
        duplicates: routers.duplicates,
        outage,
        saturation,
        wall_s: wall.elapsed().as_secs_f64(),
        compensations,
        dead_letters,
        stuck: report.in_flight.len(),
        invariants_hold: violations.is_empty(),
        violations,
    })
}

/// What placing a run's orders produced, before settling and measuring.
struct Load {
    /// One record per order…
    records: Vec<OrderRecord>,
    /// …and its id, in the same order.
    ids: Vec<String>,
    /// How long orders were placed, s.
    run_s: f64,
    /// The outage, when there was one: (start, end), seconds since the run started.
    outage: Option<(f64, f64)>,
    /// The saturation steps (the saturation scenario).
    saturation: Option<Saturation>,
}

/// A random order of `pattern` with id `id`.
fn new_order(rng: &mut fastrand::Rng, id: String, pattern: Pattern) -> NewOrder {
    NewOrder {
        order_id: Some(id),
        customer: format!("c-{}", rng.u32(0..50)),
        items: vec![Item::new(
            format!("sku-{:03}", rng.u32(1..=20)),
            rng.u32(1..=3),
        )],
        payment_token: "tok_ok".into(),
        pattern,
    }
}

/// `concurrency` closed-loop clients placing orders for `run_for`, with the scenario's
/// fault injected.
async fn closed_loop(
    config: &LabConfig,
    app: &Arc<ShopApp>,
    pattern: Pattern,
    scenario: Scenario,
    started: Instant,
    index: u64,
    live: &Arc<Live>,
) -> Result<Load, LabError> {
    live.set_phase("placing orders");
    if let Ok(mut s) = live.placing_since.lock() {
        *s = Some(Instant::now());
    }
    let faults = app.faults().clone();
    let outage = config.outage;
    let quarter = config.run_for / 4;
    // Returns the outage's (start, end) in seconds since the run started.
    let injector = tokio::spawn(async move {
        match scenario {
            Scenario::Baseline | Scenario::Saturation => None,
            Scenario::SlowDependency => {
                faults.payment.set(FaultConfig {
                    latency_ms: 200,
                    ..FaultConfig::default()
                });
                None
            }
            Scenario::FlakyDependency => {
                faults.inventory.set(FaultConfig {
                    error_rate: 0.2,
                    ..FaultConfig::default()
                });
                None
            }
            Scenario::DependencyDown | Scenario::SideEffectDown => {
                tokio::time::sleep(quarter).await;
                let target = if scenario == Scenario::DependencyDown {
                    &faults.payment
                } else {
                    &faults.notification
                };
                let start_s = started.elapsed().as_secs_f64();
                target.set(FaultConfig {
                    down_ms: u64::try_from(outage.as_millis()).unwrap_or(u64::MAX),
                    ..FaultConfig::default()
                });
                Some((start_s, start_s + outage.as_secs_f64()))
            }
        }
    });
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..config.concurrency as u64 {
        let (app, stop, live) = (app.clone(), stop.clone(), live.clone());
        let mut rng = fastrand::Rng::with_seed(config.seed ^ (index << 32) ^ c);
        clients.push(tokio::spawn(async move {
            let mut records = Vec::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let req = new_order(&mut rng, format!("lab-{c}-{n}"), pattern);
                n += 1;
                live.placed.fetch_add(1, Ordering::Relaxed);
                records.push(place_one(&app, &req, started).await);
                live.ended.fetch_add(1, Ordering::Relaxed);
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
    let outage = injector.await.unwrap_or_default();
    Ok(Load {
        records,
        ids,
        run_s,
        outage,
        saturation: None,
    })
}

/// The saturation scenario: steps of open-loop arrivals at a rising rate, each judged
/// when its orders ended (or the latency limit passed after its last arrival); stops
/// after the first step the shop did not sustain.
async fn saturate(
    config: &LabConfig,
    app: &Arc<ShopApp>,
    pattern: Pattern,
    started: Instant,
    index: u64,
    live: &Arc<Live>,
) -> Result<Load, LabError> {
    type Placing = tokio::task::JoinHandle<(OrderRecord, String)>;
    let sat = &config.saturation;
    let limit_ms = sat.p99_limit.as_secs_f64() * 1000.0;
    let mut rng = fastrand::Rng::with_seed(config.seed ^ (index << 32));
    let (mut records, mut ids) = (Vec::new(), Vec::new());
    // Orders that had not ended when their step was judged: collected at the end.
    let mut late: Vec<Placing> = Vec::new();
    let mut steps = Vec::new();
    let mut rate = sat.start_per_s;
    let mut run_s = 0.0;
    for k in 0..sat.max_steps {
        live.step.store(k as u64 + 1, Ordering::Relaxed);
        live.set_phase(format!("step {}: {rate:.0} orders/s", k + 1));
        let step_start = Instant::now();
        let mut placing: Vec<Placing> = Vec::new();
        // The step's arrivals: one every 1/rate s; a late wake-up places the ones due
        // meanwhile at once, and the step ends when the last one is placed.
        let planned = ((sat.step_for.as_secs_f64() * rate).round() as usize).max(1);
        loop {
            let elapsed = step_start.elapsed();
            let due = if elapsed >= sat.step_for {
                planned
            } else {
                ((elapsed.as_secs_f64() * rate).floor() as usize + 1).min(planned)
            };
            while placing.len() < due {
                let req = new_order(&mut rng, format!("lab-s{k}-{}", placing.len()), pattern);
                let (app, live) = (app.clone(), live.clone());
                live.placed.fetch_add(1, Ordering::Relaxed);
                placing.push(tokio::spawn(async move {
                    let placed = place_one(&app, &req, started).await;
                    live.ended.fetch_add(1, Ordering::Relaxed);
                    placed
                }));
            }
            if elapsed >= sat.step_for {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // How long the arrivals took: the step, or longer when the generator fell
        // behind (its rate is judged against the offered one).
        let step_s = step_start.elapsed().as_secs_f64();
        run_s += step_s;
        let patience = Instant::now() + sat.p99_limit;
        while Instant::now() < patience && !placing.iter().all(|h| h.is_finished()) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut judged = Vec::with_capacity(placing.len());
        for handle in placing {
            if handle.is_finished() {
                let (record, id) = handle.await.map_err(|e| LabError::Read(e.to_string()))?;
                judged.push(record.clone());
                records.push(record);
                ids.push(id);
            } else {
                // Not ended within the limit after the step's last arrival.
                judged.push(OrderRecord {
                    placed_at_s: 0.0,
                    placement_ms: 0.0,
                    completion_ms: None,
                    completed: false,
                    reason: None,
                    consistent_ms: None,
                });
                late.push(handle);
            }
        }
        let step = metrics::assess_step(&judged, rate, step_s, limit_ms);
        tracing::debug!(pattern = pattern.as_str(), ?step, "saturation step");
        let sustained = step.sustainable;
        steps.push(step);
        if !sustained {
            break;
        }
        rate *= sat.factor;
    }
    live.set_phase("waiting for the last orders");
    for handle in late {
        let (record, id) = handle.await.map_err(|e| LabError::Read(e.to_string()))?;
        records.push(record);
        ids.push(id);
    }
    Ok(Load {
        records,
        ids,
        run_s,
        outage: None,
        saturation: Some(Saturation {
            p99_limit_ms: limit_ms,
            max_sustainable_per_s: metrics::max_sustainable(&steps),
            steps,
        }),
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
