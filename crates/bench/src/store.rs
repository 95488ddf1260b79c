//! The `store` suite and the router figures: durable commits of the embedded store (and,
//! when PostgreSQL is installed, of the PostgreSQL store on a server the suite starts),
//! and messages through the router with and without a store effect.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use switchyard::router::{Context, HandlerError, Router};
use switchyard::store::{Store, Table, Txn};
use switchyard::{Bus, Event, codec};
use switchyard_embedded::{EmbeddedBus, EmbeddedStore, StoreConfig};
use switchyard_postgres::{PgStore, PgStoreConfig};

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

/// Closed-loop committers for `secs` on a fresh embedded store; returns (commits/s, p99 ms).
async fn commits(concurrency: usize, secs: f64) -> Result<(f64, f64), BoxError> {
    let dir = tempfile::tempdir()?;
    let store = EmbeddedStore::open(dir.path(), StoreConfig::default())?;
    let result = commits_on(Arc::new(store.clone()), concurrency, secs).await;
    store.close().await?;
    result
}

/// `concurrency` closed-loop committers on `store` for `secs`; returns (commits/s, p99 ms).
async fn commits_on(
    dyn_store: Arc<dyn Store>,
    concurrency: usize,
    secs: f64,
) -> Result<(f64, f64), BoxError> {
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
    if s.selected("store.postgres") {
        postgres(s, &mut figures).await?;
    }
    eprint!("\r\x1b[2K");
    Ok(figures)
}

/// The same commits on the PostgreSQL store, on a server the suite starts (skipped, said
/// on stderr, when PostgreSQL is not installed), plus the round trips a read and a
/// commit cost, counted by a proxy between the store and the server.
async fn postgres(s: &Settings, figures: &mut Vec<Figure>) -> Result<(), BoxError> {
    let Some(server) = switchyard_testkit::servers::Postgres::start()? else {
        return Ok(());
    };
    let mut schemas = 0;
    let mut open = |url: &str| {
        schemas += 1;
        PgStore::connect(PgStoreConfig::new(url, format!("bench{schemas}")))
    };
    for (name, concurrency) in [
        ("store.postgres.commit.c1", 1),
        ("store.postgres.commit.c64", 64),
    ] {
        if !s.selected(name) {
            continue;
        }
        progress(name);
        let (mut v, mut p99) = (Vec::new(), Vec::new());
        for _ in 0..s.runs {
            let store = open(&server.url()).await?;
            let result = commits_on(Arc::new(store.clone()), concurrency, s.secs).await;
            store.close().await;
            let (a, b) = result?;
            v.push(a);
            p99.push(b);
        }
        let note = if concurrency == 1 {
            "1 committer: row read-modify-write + outbox + inbox, synchronous_commit on".to_string()
        } else {
            format!("{concurrency} committers on their own rows, the default pool (8 connections)")
        };
        figures.push(Figure::from_runs(name, "commits/s", v).with_note(note));
        if concurrency > 1 {
            figures.push(Figure::from_runs(&format!("{name}.p99"), "ms", p99));
        }
    }
    if s.selected("store.postgres.round_trips") {
        progress("store.postgres.round_trips");
        let proxy = CountingProxy::start(server.port()).await?;
        let url = format!(
            "postgres://{}@127.0.0.1:{}/postgres",
            switchyard_testkit::servers::POSTGRES_USER,
            proxy.port
        );
        let store = open(&url).await?;
        let dyn_store: Arc<dyn Store> = Arc::new(store.clone());
        const N: u64 = 200;
        // Warm up: the pool's connection and its prepared statements.
        for i in 0..20 {
            one_commit(&dyn_store, "rt", i).await?;
        }
        let reads = proxy
            .count_during(Box::pin(async {
                for _ in 0..N {
                    dyn_store.get_raw("counters", "rt").await?;
                }
                Ok(())
            }))
            .await?;
        let transactions = proxy
            .count_during(Box::pin(async {
                for i in 0..N {
                    one_commit(&dyn_store, "rt", i).await?;
                }
                Ok(())
            }))
            .await?;
        store.close().await;
        let per = |n: u64| n as f64 / N as f64;
        figures.push(
            Figure::from_runs(
                "store.postgres.round_trips.read",
                "round trips",
                vec![per(reads)],
            )
            .with_note("one get_raw, pool checkout and return included"),
        );
        figures.push(
            Figure::from_runs(
                "store.postgres.round_trips.commit",
                "round trips",
                vec![per(transactions.saturating_sub(reads))],
            )
            .with_note("one commit (row + expectation + outbox + inbox), pool checkout and return included"),
        );
    }
    Ok(())
}

type Counted<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = switchyard::Result<()>> + Send + 'a>>;

/// A TCP proxy in front of the PostgreSQL server that counts round trips: each time a
/// client sends after the server has answered (or first) is one.
struct CountingProxy {
    port: u16,
    turns: Arc<AtomicU64>,
}

impl CountingProxy {
    async fn start(upstream: u16) -> Result<CountingProxy, BoxError> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let turns = Arc::new(AtomicU64::new(0));
        let counter = turns.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let answered = Arc::new(AtomicBool::new(true));
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                let turns = counter.clone();
                let spoke = answered.clone();
                tokio::spawn(pump(cr, sw, move || {
                    if spoke.swap(false, Ordering::AcqRel) {
                        turns.fetch_add(1, Ordering::Relaxed);
                    }
                }));
                tokio::spawn(pump(sr, cw, move || {
                    answered.store(true, Ordering::Release)
                }));
            }
        });
        Ok(CountingProxy { port, turns })
    }

    /// The round trips during `work` (and the returns to the pool it started).
    async fn count_during(&self, work: Counted<'_>) -> switchyard::Result<u64> {
        let before = self.turns.load(Ordering::Relaxed);
        work.await?;
        // A connection goes back to the pool in a task of its own: let it finish.
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok(self.turns.load(Ordering::Relaxed) - before)
    }
}

/// Copies `from` to `to`, calling `seen` before each chunk is forwarded.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    seen: impl Fn(),
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                seen();
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
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
