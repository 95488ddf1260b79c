//! The child side of the router crash cases: the test binary re-run with an environment
//! variable naming what to do, so the parent can SIGKILL it at any moment (or it kills
//! itself, by pid, right after a commit).
//!
//! Also what the router cases and their children share: how a case opens and closes the
//! two backends (the bus under `<dir>/bus`, the store under `<dir>/store`), the event and
//! the tables of the crash cases.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use switchyard::relay::OutboxRelay;
use switchyard::router::{Context, HandlerError, Router};
use switchyard::store::{Store, Table, Txn, transact};
use switchyard::{Bus, Event, RedeliveryPolicy, SubscribeOptions};

use crate::child::DIR_VAR;
use crate::{BusFactory, Settings, StoreFactory};

/// The child's mode (its own variable, so the bus and store child entries ignore it).
pub(crate) const ROUTER_MODE_VAR: &str = "SWITCHYARD_ROUTER_CONFORMANCE_CHILD";
/// The mode's argument (a key prefix, or after which commit to die).
pub(crate) const ROUTER_ARG_VAR: &str = "SWITCHYARD_ROUTER_CONFORMANCE_ARG";

/// The event of the crash cases: one per committed row (relay) or routed message (router).
#[derive(Serialize, Deserialize, Clone, Debug)]
pub(crate) struct Made {
    pub(crate) key: String,
}

impl Event for Made {
    const TYPE: &'static str = "test.made.v1";
    fn subject(&self) -> Option<String> {
        Some(self.key.clone())
    }
}

/// Rows committed with an outbox event each (relay case); the running total (router case).
pub(crate) const ROWS: Table<u64> = Table::new("rows");
/// How many times the router applied each message id (router case).
pub(crate) const APPLIED: Table<u32> = Table::new("applied");

/// Opens the bus of a router case under `<dir>/bus`.
pub(crate) fn open_bus<B: BusFactory>(f: &B, dir: &Path, settings: &Settings) -> B::Bus {
    f.open(&dir.join("bus"), settings).expect("open the bus")
}

/// Opens the store of a router case under `<dir>/store`.
pub(crate) fn open_store<S: StoreFactory>(f: &S, dir: &Path) -> Arc<S::Store> {
    f.open(&dir.join("store")).expect("open the store")
}

/// Closes both backends (the bus by its `close`, the store through its factory).
pub(crate) async fn close_both<B: Bus, S: StoreFactory>(bus: &B, sf: &S, store: &S::Store) {
    bus.close().await.expect("close the bus");
    sf.close(store).await.expect("close the store");
}

/// Entry point of the `router_conformance_child` test: does nothing unless the parent
/// set the mode variable, otherwise runs that mode and exits the process.
pub fn router_child_entry<B: BusFactory, S: StoreFactory>(bus: &B, store: &S) {
    let Ok(mode) = std::env::var(ROUTER_MODE_VAR) else {
        return;
    };
    // The harness printed a status line without a newline; start markers on a fresh line.
    println!();
    let dir = PathBuf::from(std::env::var(DIR_VAR).expect("child needs a directory"));
    let arg = std::env::var(ROUTER_ARG_VAR).unwrap_or_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        match mode.as_str() {
            "commit-and-relay" => commit_and_relay(bus, store, &dir, &arg).await,
            "relay-drain" => relay_drain(bus, store, &dir).await,
            "route" => route(bus, store, &dir, arg.parse().unwrap_or(0)).await,
            other => panic!("unknown router child mode {other}"),
        }
    });
    std::process::exit(0);
}

/// Commits rows with an outbox event each, while the relay publishes; runs until killed.
async fn commit_and_relay<B: BusFactory, S: StoreFactory>(
    bf: &B,
    sf: &S,
    dir: &Path,
    prefix: &str,
) {
    let bus = open_bus(bf, dir, &Settings::default());
    let store = open_store(sf, dir);
    let db: Arc<dyn Store> = store;
    let dyn_bus: Arc<dyn Bus> = Arc::new(bus);
    tokio::spawn(
        OutboxRelay::new(db.clone(), dyn_bus)
            .batch(7)
            .run(std::future::pending()),
    );
    let mut tasks = Vec::new();
    for t in 0..4 {
        let db = db.clone();
        let prefix = prefix.to_string();
        tasks.push(tokio::spawn(async move {
            for n in 0.. {
                let key = format!("{prefix}-{t}-{n}");
                let k = key.clone();
                transact(&db, |txn: Txn| {
                    let k = k.clone();
                    async move {
                        txn.put(&ROWS, &k, &1)?;
                        txn.publish("made", &Made { key: k.clone() }, "/test")?;
                        Ok(())
                    }
                })
                .await
                .unwrap();
                println!("COMMIT {key}");
            }
        }));
    }
    // The committers run until the parent kills this process.
    for t in tasks {
        t.await.unwrap();
    }
}

/// Relays until the outbox is empty, then says so.
async fn relay_drain<B: BusFactory, S: StoreFactory>(bf: &B, sf: &S, dir: &Path) {
    let bus = open_bus(bf, dir, &Settings::default());
    let store = open_store(sf, dir);
    {
        let db: Arc<dyn Store> = store.clone();
        let relay = OutboxRelay::new(db.clone(), Arc::new(bus.clone()));
        while db.outbox_len().await.unwrap() > 0 {
            relay.relay_once().await.unwrap();
        }
    }
    println!("DRAINED");
    close_both(&bus, sf, &store).await;
}

/// Routes `made` events into the store; SIGKILLs itself right after the `kill_after`-th
/// commit (before its ack) when `kill_after` > 0.
async fn route<B: BusFactory, S: StoreFactory>(bf: &B, sf: &S, dir: &Path, kill_after: u64) {
    let bus = open_bus(bf, dir, &Settings::default());
    let store = open_store(sf, dir);
    let db: Arc<dyn Store> = store.clone();
    let commits = Arc::new(AtomicU64::new(0));
    let mut router =
        Router::new("counter", Arc::new(bus.clone()), db).on_committed(move |_consumer, env| {
            let n = commits.fetch_add(1, Ordering::SeqCst) + 1;
            println!("APPLIED {}", env.id);
            if n == kill_after {
                // Committed, not yet acknowledged: die the hard way, by pid.
                let _ = std::process::Command::new("kill")
                    .args(["-9", &std::process::id().to_string()])
                    .status();
                std::thread::sleep(Duration::from_secs(10));
            }
        });
    // Every message writes the one `total` row, so concurrent handlers conflict and retry:
    // short backoffs and attempts enough that a retried message is back well within the
    // idle window below (the default backoff, ~800 ms, could outlast it).
    router.options(
        "made",
        "counter",
        SubscribeOptions {
            redelivery: RedeliveryPolicy {
                max_attempts: 50,
                initial_backoff: Duration::from_millis(5),
                max_backoff: Duration::from_millis(50),
                multiplier: 2.0,
                jitter: 0.2,
            },
            ..Default::default()
        },
    );
    router.on("made", "counter", |ctx: Context, ev: Made| async move {
        let id = ctx.envelope.id.to_string();
        let n = ctx.txn.get(&APPLIED, &id).await?.unwrap_or(0);
        ctx.txn.put(&APPLIED, &id, &(n + 1))?;
        let total = ctx.txn.get(&ROWS, "total").await?.unwrap_or(0);
        ctx.txn.put(&ROWS, "total", &(total + 1))?;
        let _ = ev;
        Ok::<(), HandlerError>(())
    });
    let stats = router.stats();
    let (stop, mut rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(router.run(async move {
        let _ = rx.changed().await;
    }));
    // Run until nothing new arrives for a while.
    let mut last = u64::MAX;
    loop {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let now = stats.processed.load(Ordering::SeqCst) + stats.duplicates.load(Ordering::SeqCst);
        if now == last {
            break;
        }
        last = now;
    }
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
    println!("IDLE");
    close_both(&bus, sf, &store).await;
}
