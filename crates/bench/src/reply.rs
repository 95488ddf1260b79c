//! The `reply` suite: request/reply round trips over the embedded bus's transient
//! channel, answered by a `Router::respond` handler — one that changes nothing (the
//! reply is sent without a commit) and one that writes a row per request (effect, inbox
//! mark and stored reply in one durable commit before the reply).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use switchyard::reply::Requester;
use switchyard::router::{Context, HandlerError, Router};
use switchyard::store::{Store, Table};
use switchyard::{Bus, Event};
use switchyard_embedded::{EmbeddedBus, EmbeddedStore, StoreConfig};

use crate::Settings;
use crate::report::Figure;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Rows the effectful responder writes, one per request.
const DOUBLED: Table<u64> = Table::new("doubled");

/// Requests in flight for `reply.c64`.
pub const IN_FLIGHT: usize = 64;
const REQUESTS: &str = "bench.double";
const TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Serialize, Deserialize)]
struct Double {
    n: u64,
}
impl Event for Double {
    const TYPE: &'static str = "bench.double.v1";
}

#[derive(Serialize, Deserialize)]
struct Doubled {
    n: u64,
}
impl Event for Doubled {
    const TYPE: &'static str = "bench.doubled.v1";
}

fn progress(label: &str) {
    use std::io::Write;
    eprint!("\r\x1b[2K  {label}");
    let _ = std::io::stderr().flush();
}

/// A responder (router) and a requester over a fresh embedded bus and store.
struct Rig {
    _dir: tempfile::TempDir,
    bus: EmbeddedBus,
    store: EmbeddedStore,
    requester: Arc<Requester>,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Rig {
    /// With `effect`, the responder writes one row per request (a durable commit).
    async fn start(effect: bool) -> Result<Rig, BoxError> {
        let dir = tempfile::tempdir()?;
        let bus = EmbeddedBus::open(dir.path().join("bus"))?;
        let store = EmbeddedStore::open(dir.path().join("store"), StoreConfig::default())?;
        let dyn_bus: Arc<dyn Bus> = Arc::new(bus.clone());
        let dyn_store: Arc<dyn Store> = Arc::new(store.clone());
        let mut router = Router::new("doubler", dyn_bus.clone(), dyn_store.clone());
        router.concurrency(REQUESTS, "doubler", 256);
        router.respond(
            REQUESTS,
            "doubler",
            move |ctx: Context, d: Double| async move {
                if effect {
                    ctx.txn.put(&DOUBLED, &d.n.to_string(), &(d.n * 2))?;
                }
                Ok::<_, HandlerError>(Doubled { n: d.n * 2 })
            },
        );
        // Subscribed before the first request (no "no responders" race).
        let router = router.bind().await?;
        let (stop, mut rx) = tokio::sync::watch::channel(false);
        let tasks = vec![tokio::spawn(async move {
            if let Err(e) = router
                .run(async move {
                    let _ = rx.changed().await;
                })
                .await
            {
                eprintln!("bench reply: responder stopped: {e}");
            }
        })];
        let requester = Arc::new(Requester::new("bench", dyn_bus).await?);
        Ok(Rig {
            _dir: dir,
            bus,
            store,
            requester,
            stop,
            tasks,
        })
    }

    async fn ask(&self, n: u64) -> Result<(), BoxError> {
        let r: Doubled = self
            .requester
            .request(REQUESTS, &Double { n }, TIMEOUT)
            .await?;
        if r.n != n * 2 {
            return Err(format!("wrong reply: {} for {n}", r.n).into());
        }
        Ok(())
    }

    async fn shutdown(self) -> Result<(), BoxError> {
        let _ = self.stop.send(true);
        for t in self.tasks {
            t.await?;
        }
        drop(self.requester);
        self.bus.close().await?;
        self.store.close().await?;
        Ok(())
    }
}

/// Sequential round trips for `secs`; returns (p50 µs, p99 µs).
async fn sequential(secs: f64, effect: bool) -> Result<(f64, f64), BoxError> {
    let rig = Rig::start(effect).await?;
    for i in 0..200 {
        rig.ask(i).await?;
    }
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let start = Instant::now();
    let mut i = 0;
    while start.elapsed().as_secs_f64() < secs {
        let t = Instant::now();
        rig.ask(i).await?;
        h.record(t.elapsed().as_micros().max(1) as u64)?;
        i += 1;
    }
    rig.shutdown().await?;
    Ok((
        h.value_at_quantile(0.5) as f64,
        h.value_at_quantile(0.99) as f64,
    ))
}

/// `IN_FLIGHT` closed-loop requesters for `secs`; returns requests/s.
async fn concurrent(secs: f64, effect: bool) -> Result<f64, BoxError> {
    let rig = Arc::new(Rig::start(effect).await?);
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    let start = Instant::now();
    for t in 0..IN_FLIGHT as u64 {
        let rig = rig.clone();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut done = 0u64;
            while !stop.load(Ordering::Relaxed) {
                rig.ask(t * 1_000_000 + done).await?;
                done += 1;
            }
            Ok::<u64, BoxError>(done)
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let rig = Arc::into_inner(rig).ok_or("bench reply: a requester task kept the rig")?;
    rig.shutdown().await?;
    Ok(total as f64 / elapsed)
}

/// Runs the `reply` suite.
pub async fn run(s: &Settings) -> Result<Vec<Figure>, BoxError> {
    let mut figures = Vec::new();
    for (prefix, effect, what) in [
        ("reply", false, "responder without effects (no commit)"),
        (
            "reply.effect",
            true,
            "responder writes one row per request (durable commit, fsync)",
        ),
    ] {
        let rtt = format!("{prefix}.rtt");
        if s.selected(&rtt) {
            let (mut p50, mut p99) = (Vec::new(), Vec::new());
            for i in 0..s.runs {
                progress(&format!("{rtt} run {}/{}", i + 1, s.runs));
                let (a, b) = sequential(s.secs, effect).await?;
                p50.push(a);
                p99.push(b);
            }
            figures.push(
                Figure::from_runs(&format!("{rtt}.p50"), "µs", p50)
                    .with_note(format!("sequential, one requester, embedded bus; {what}")),
            );
            figures.push(Figure::from_runs(&format!("{rtt}.p99"), "µs", p99));
        }
        let c64 = format!("{prefix}.c64");
        if s.selected(&c64) {
            let mut v = Vec::new();
            for i in 0..s.runs {
                progress(&format!("{c64} run {}/{}", i + 1, s.runs));
                v.push(concurrent(s.secs, effect).await?);
            }
            figures.push(
                Figure::from_runs(&c64, "req/s", v)
                    .with_note(format!("64 requests in flight from one requester; {what}")),
            );
        }
    }
    eprint!("\r\x1b[2K");
    Ok(figures)
}
