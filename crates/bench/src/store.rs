//! The `store` suite and the router figures: durable commits of the embedded store, and
//! messages through the router with and without a store effect.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use switchyard::router::{Context, HandlerError, Router};
use switchyard::store::{Store, Table, Txn};
use switchyard::{Bus, Event, codec};
use switchyard_embedded::{EmbeddedBus, EmbeddedStore, StoreConfig};

use crate::Settings;
use crate::report::Figure;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const COUNTERS: Table<Counter> = Table::new("counters");

#[derive(Serialize, Deserialize, Default)]
struct Counter {
    n: u64,
    note: String,
}

#[derive(Serialize, Deserialize)]
struct Tick {
    key: String,
    i: u64,
}

impl Event for Tick {
    const TYPE: &'static str = "bench.tick.v1";
    fn subject(&self) -> Option<String> {
        Some(self.key.clone())
    }
}

fn progress(label: &str) {
    use std::io::Write;
    eprint!("\r\x1b[2K  {label}");
    let _ = std::io::stderr().flush();
}

/// One commit as a service handler makes it: read-modify-write of one row, one outbox
/// event, one inbox mark.
async fn one_commit(store: &Arc<dyn Store>, key: &str, i: u64) -> switchyard::Result<()> {
    let txn = Txn::new(store.clone());
    let mut c = txn.get(&COUNTERS, key).await?.unwrap_or_default();
    c.n += 1;
    c.note = format!("commit {i}");
    txn.put(&COUNTERS, key, &c)?;
    txn.publish(
        "ticks",
        &Tick {
            key: key.to_string(),
            i,
        },
        "/bench",
    )?;
    txn.mark_processed("bench/commits", switchyard::MessageId::new());
    txn.commit().await
}

/// Closed-loop committers for `secs`; returns (commits/s, p99 ms).
async fn commits(concurrency: usize, secs: f64) -> Result<(f64, f64), BoxError> {
    let dir = tempfile::tempdir()?;
    let store = EmbeddedStore::open(dir.path(), StoreConfig::default())?;
    let dyn_store: Arc<dyn Store> = Arc::new(store.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    let start = Instant::now();
    for t in 0..concurrency {
        let store = dyn_store.clone();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
            let key = format!("k{t}");
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                one_commit(&store, &key, i).await?;
                h.record((t0.elapsed().as_micros() as u64).max(1))?;
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
    store.close().await?;
    Ok((
        all.len() as f64 / elapsed,
        all.value_at_quantile(0.99) as f64 / 1000.0,
    ))
}

/// Runs the `store` suite.
pub async fn run(s: &Settings) -> Result<Vec<Figure>, BoxError> {
    let mut figures = Vec::new();
    if s.selected("store.commit.c1") {
        progress("store.commit.c1");
        let mut v = Vec::new();
        for _ in 0..s.runs {
            v.push(commits(1, s.secs).await?.0);
        }
        figures.push(
            Figure::from_runs("store.commit.c1", "commits/s", v)
                .with_note("1 committer: row read-modify-write + outbox + inbox, fsync"),
        );
    }
    if s.selected("store.commit.c64") {
        progress("store.commit.c64");
        let (mut v, mut p99) = (Vec::new(), Vec::new());
        for _ in 0..s.runs {
            let (a, b) = commits(64, s.secs).await?;
            v.push(a);
            p99.push(b);
        }
        figures.push(
            Figure::from_runs("store.commit.c64", "commits/s", v)
                .with_note("64 concurrent committers, group commit"),
        );
        figures.push(Figure::from_runs("store.commit.c64.p99", "ms", p99));
    }
    eprint!("\r\x1b[2K");
    Ok(figures)
}

/// Messages through the router, draining a backlog of `n`; returns msg/s.
pub async fn router_drain(n: u64, with_store: bool) -> Result<f64, BoxError> {
    let dir = tempfile::tempdir()?;
    let bus = EmbeddedBus::open(dir.path().join("bus"))?;
    let store = EmbeddedStore::open(dir.path().join("store"), StoreConfig::default())?;
    let mut i = 0;
    while i < n {
        let envs = (i..(i + 1000).min(n))
            .map(|j| {
                codec::encode(
                    &Tick {
                        key: format!("k{}", j % 256),
                        i: j,
                    },
                    "/bench",
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        i += envs.len() as u64;
        bus.publish_batch("in", envs).await?;
    }
    let dyn_bus: Arc<dyn Bus> = Arc::new(bus.clone());
    let dyn_store: Arc<dyn Store> = Arc::new(store.clone());
    let mut router = Router::new("bench", dyn_bus, dyn_store);
    router.concurrency("in", "bench", 256);
    router.on("in", "bench", move |ctx: Context, ev: Tick| async move {
        if with_store {
            let mut c = ctx.txn.get(&COUNTERS, &ev.key).await?.unwrap_or_default();
            c.n += 1;
            ctx.txn.put(&COUNTERS, &ev.key, &c)?;
            ctx.publish("out", &ev)?;
        }
        Ok::<(), HandlerError>(())
    });
    let stats = router.stats();
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let start = Instant::now();
    let task = tokio::spawn(router.run(async move {
        let _ = stop_rx.changed().await;
    }));
    let processed = |s: &switchyard::router::RouterStats| s.processed.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(300);
    while processed(&stats) < n {
        if Instant::now() > deadline {
            return Err(format!("router processed only {} of {n}", processed(&stats)).into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let _ = stop_tx.send(true);
    task.await??;
    bus.close().await?;
    store.close().await?;
    Ok(n as f64 / elapsed)
}
