//! The `saga` suite: durable 3-step sagas (local actions) over the embedded store in
//! `fsync` mode — sequential latency, throughput at 64 and 1024 in flight, the fsyncs
//! each saga costs, and the peak memory of 100,000 sagas in flight.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use switchyard::saga::{Orchestrator, Saga, SagaState, Step, StepContext, StepError};
use switchyard::store::Store;
use switchyard_embedded::{EmbeddedStore, StoreConfig};

use crate::Settings;
use crate::report::Figure;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Serialize, Deserialize)]
struct Order {
    id: u64,
    cents: u64,
}

fn progress(label: &str) {
    use std::io::Write;
    eprint!("\r\x1b[2K  {label}");
    let _ = std::io::stderr().flush();
}

/// Holds sagas inside their second step until opened; counts who entered.
#[derive(Clone)]
struct Gate {
    open: tokio::sync::watch::Receiver<bool>,
    entered: Arc<std::sync::atomic::AtomicU64>,
}

/// Three local steps (each returns a small output; the second reads the first's), with
/// compensations. `gate`, when set, holds every saga inside its second step.
fn order_saga(gate: Option<Gate>) -> Saga<Order> {
    Saga::new("order")
        .step(
            Step::new("reserve", |cx: StepContext<Order>| async move {
                Ok::<_, StepError>(format!("res-{}", cx.input().id))
            })
            .compensate(|_cx, _reservation: String| async { Ok(()) }),
        )
        .step(
            Step::new("charge", move |cx: StepContext<Order>| {
                let gate = gate.clone();
                async move {
                    if let Some(mut gate) = gate {
                        gate.entered.fetch_add(1, Ordering::SeqCst);
                        let _ = gate.open.wait_for(|open| *open).await;
                    }
                    let reservation: String = cx.output("reserve")?;
                    Ok::<_, StepError>((reservation.len() as u64, cx.input().cents))
                }
            })
            .compensate(|_cx, _charge: (u64, u64)| async { Ok(()) }),
        )
        .step(Step::new("ship", |cx: StepContext<Order>| async move {
            Ok::<_, StepError>(cx.input().id)
        }))
}

struct Rig {
    _dir: tempfile::TempDir,
    store: EmbeddedStore,
    orchestrator: Orchestrator,
    stop: tokio::sync::watch::Sender<bool>,
    run: tokio::task::JoinHandle<switchyard::Result<()>>,
}

impl Rig {
    fn start(max_active: usize) -> Result<Rig, BoxError> {
        let dir = tempfile::tempdir()?;
        let store = EmbeddedStore::open(dir.path(), StoreConfig::default())?;
        let dyn_store: Arc<dyn Store> = Arc::new(store.clone());
        let orchestrator = Orchestrator::builder("bench", dyn_store)
            .saga(order_saga(None))
            .max_active(max_active)
            .build()?;
        let (stop, mut rx) = tokio::sync::watch::channel(false);
        let run = tokio::spawn(orchestrator.clone().run(async move {
            let _ = rx.changed().await;
        }));
        Ok(Rig {
            _dir: dir,
            store,
            orchestrator,
            stop,
            run,
        })
    }

    async fn one(&self, id: u64) -> Result<(), BoxError> {
        let saga = self
            .orchestrator
            .start("order", &Order { id, cents: 990 })
            .await?;
        let rec = self.orchestrator.wait(&saga).await?;
        if rec.state != SagaState::Completed {
            return Err(format!("saga {saga} ended {}: {:?}", rec.state, rec.error).into());
        }
        Ok(())
    }

    async fn shutdown(self) -> Result<(), BoxError> {
        let _ = self.stop.send(true);
        self.run.await??;
        self.store.close().await?;
        Ok(())
    }
}

/// Sequential sagas for `secs`; returns p50 in ms.
async fn sequential(secs: f64) -> Result<f64, BoxError> {
    let rig = Rig::start(64)?;
    for i in 0..50 {
        rig.one(i).await?;
    }
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let start = Instant::now();
    let mut i = 1_000;
    while start.elapsed().as_secs_f64() < secs {
        let t = Instant::now();
        rig.one(i).await?;
        h.record(t.elapsed().as_micros().max(1) as u64)?;
        i += 1;
    }
    rig.shutdown().await?;
    Ok(h.value_at_quantile(0.5) as f64 / 1000.0)
}

struct Concurrent {
    per_sec: f64,
    p99_ms: f64,
    fsyncs_per_saga: f64,
}

/// `n` closed-loop starters for `secs`.
async fn concurrent(n: usize, secs: f64) -> Result<Concurrent, BoxError> {
    let rig = Arc::new(Rig::start(n.max(64))?);
    let stop = Arc::new(AtomicBool::new(false));
    let groups_before = rig.store.stats().groups.load(Ordering::Relaxed);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..n as u64 {
        let rig = rig.clone();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                rig.one(t * 10_000_000 + i).await?;
                h.record(t0.elapsed().as_micros().max(1) as u64)?;
                i += 1;
            }
            Ok::<_, BoxError>(h)
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for t in tasks {
        all.add(t.await??)?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let groups = rig.store.stats().groups.load(Ordering::Relaxed) - groups_before;
    let rig = Arc::into_inner(rig).ok_or("bench saga: a starter kept the rig")?;
    rig.shutdown().await?;
    Ok(Concurrent {
        per_sec: all.len() as f64 / elapsed,
        p99_ms: all.value_at_quantile(0.99) as f64 / 1000.0,
        fsyncs_per_saga: groups as f64 / all.len().max(1) as f64,
    })
}

/// Runs the `saga` suite.
pub async fn run(s: &Settings) -> Result<Vec<Figure>, BoxError> {
    let mut figures = Vec::new();
    if s.selected("saga.c1.p50") {
        let mut v = Vec::new();
        for i in 0..s.runs {
            progress(&format!("saga.c1 run {}/{}", i + 1, s.runs));
            v.push(sequential(s.secs).await?);
        }
        figures.push(
            Figure::from_runs("saga.c1.p50", "ms", v)
                .with_note("one saga at a time: 3 local steps, 4 fsynced commits"),
        );
    }
    if s.selected("saga.c64") {
        let (mut v, mut p99, mut fsyncs) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..s.runs {
            progress(&format!("saga.c64 run {}/{}", i + 1, s.runs));
            let c = concurrent(64, s.secs).await?;
            v.push(c.per_sec);
            p99.push(c.p99_ms);
            fsyncs.push(c.fsyncs_per_saga);
        }
        figures.push(
            Figure::from_runs("saga.c64", "sagas/s", v)
                .with_note("64 sagas in flight (closed loop: start, wait, repeat)"),
        );
        figures.push(Figure::from_runs("saga.c64.p99", "ms", p99));
        figures.push(
            Figure::from_runs("saga.fsyncs_per_saga", "fsyncs", fsyncs)
                .with_note("store syncs per saga at c64 (group commit shares them)"),
        );
    }
    if s.selected("saga.c1024") {
        let mut v = Vec::new();
        for i in 0..s.runs {
            progress(&format!("saga.c1024 run {}/{}", i + 1, s.runs));
            v.push(concurrent(1024, s.secs).await?.per_sec);
        }
        figures.push(Figure::from_runs("saga.c1024", "sagas/s", v).with_note("1024 in flight"));
    }
    if s.selected("saga.inflight_100k.peak_rss_mb") {
        let mut v = Vec::new();
        for i in 0..s.backlog_runs {
            progress(&format!(
                "saga.inflight_100k run {}/{}",
                i + 1,
                s.backlog_runs
            ));
            v.push(inflight_peak_rss(100_000).await?);
        }
        figures.push(
            Figure::from_runs("saga.inflight_100k.peak_rss_mb", "MiB", v).with_note(
                "fresh process: 100,000 sagas started and all held inside step 2, then released",
            ),
        );
    }
    if s.selected("bus.floor.fdatasync") {
        let mut v = Vec::new();
        for _ in 0..s.runs {
            v.push(crate::bus::fdatasync_floor(s.secs.min(1.0))?);
        }
        figures.push(
            Figure::from_runs("bus.floor.fdatasync", "ops/s", v)
                .with_note("raw peer: one writer, 200-byte appends, fdatasync each"),
        );
    }
    eprint!("\r\x1b[2K");
    Ok(figures)
}

/// Runs [`inflight_child`] in a fresh process; returns its peak RSS in MiB.
async fn inflight_peak_rss(n: u64) -> Result<f64, BoxError> {
    let dir = tempfile::tempdir()?;
    let kb = crate::report::child_peak_rss_kb(&[
        "saga-inflight-child".as_ref(),
        dir.path().as_os_str(),
        n.to_string().as_ref(),
    ])
    .await?;
    Ok(kb / 1024.0)
}

/// The child side of the in-flight figure: start `n` sagas (256 starters), wait until
/// every one is held inside step 2 (all `n` driven at once), release them, wait for all
/// to complete, print the peak RSS.
pub async fn inflight_child(dir: &Path, n: u64) -> Result<(), BoxError> {
    let (open, open_rx) = tokio::sync::watch::channel(false);
    let gate = Gate {
        open: open_rx,
        entered: Arc::new(std::sync::atomic::AtomicU64::new(0)),
    };
    let store = EmbeddedStore::open(dir, StoreConfig::default())?;
    let dyn_store: Arc<dyn Store> = Arc::new(store.clone());
    let orchestrator = Orchestrator::builder("bench", dyn_store)
        .saga(order_saga(Some(gate.clone())))
        .max_active(
            std::env::var("XMA")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(n as usize),
        )
        .build()?;
    let (stop, mut rx) = tokio::sync::watch::channel(false);
    let run = tokio::spawn(orchestrator.clone().run(async move {
        let _ = rx.changed().await;
    }));
    let starters = 256u64;
    let mut tasks = Vec::new();
    for t in 0..starters {
        let orchestrator = orchestrator.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            let mut i = t;
            while i < n {
                ids.push(
                    orchestrator
                        .start("order", &Order { id: i, cents: 1 })
                        .await?,
                );
                i += starters;
            }
            Ok::<_, BoxError>(ids)
        }));
    }
    let mut ids = Vec::with_capacity(n as usize);
    for t in tasks {
        ids.extend(t.await??);
    }
    // Every saga is in flight once the only completed step is the first one everywhere.
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if std::env::var("XMA").is_ok() {
            tokio::time::sleep(Duration::from_secs(3)).await;
            break;
        }
        if gate.entered.load(Ordering::SeqCst) == n && orchestrator.counts().await?.running == n {
            break;
        }
        if Instant::now() > deadline {
            return Err("sagas never all reached step 2".into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let in_flight_kb = switchyard_testkit::current_rss_kb().unwrap_or(0);
    eprintln!("XIN {in_flight_kb}");
    if std::env::var("XMA").is_ok() {
        std::process::exit(0);
    }
    open.send(true)?;
    for id in &ids {
        let rec = orchestrator.wait(id).await?;
        if rec.state != SagaState::Completed {
            return Err(format!("saga {id} ended {}", rec.state).into());
        }
    }
    let _ = stop.send(true);
    run.await??;
    store.close().await?;
    println!("IN_FLIGHT_RSS_KB {in_flight_kb}");
    println!(
        "RSS_KB {}",
        switchyard_testkit::peak_rss_kb().ok_or("cannot read /proc/self/status")?
    );
    Ok(())
}
