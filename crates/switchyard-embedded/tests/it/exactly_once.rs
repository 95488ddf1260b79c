//! Exactly-once effects across real crashes: the outbox relay and the router, in a child
//! process killed with SIGKILL (by pid), over the embedded bus and store.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use switchyard::relay::OutboxRelay;
use switchyard::router::{Context, HandlerError, Router};
use switchyard::store::{Store, Table, Txn, transact};
use switchyard::{Bus, Event, SubscribeOptions, codec};
use switchyard_embedded::{EmbeddedBus, EmbeddedStore, StoreConfig};
use switchyard_testkit::Child;

const MODE: &str = "SWITCHYARD_EXACTLY_ONCE_CHILD";
const DIR: &str = "SWITCHYARD_EXACTLY_ONCE_DIR";
const ARG: &str = "SWITCHYARD_EXACTLY_ONCE_ARG";

#[derive(Serialize, Deserialize, Clone, Debug)]
struct Made {
    key: String,
}
impl Event for Made {
    const TYPE: &'static str = "test.made.v1";
    fn subject(&self) -> Option<String> {
        Some(self.key.clone())
    }
}

const ROWS: Table<u64> = Table::new("rows");
const APPLIED: Table<u32> = Table::new("applied");

fn open(dir: &Path) -> (EmbeddedBus, EmbeddedStore) {
    let bus = EmbeddedBus::open(dir.join("bus")).unwrap();
    let store = EmbeddedStore::open(dir.join("store"), StoreConfig::default()).unwrap();
    (bus, store)
}

fn spawn(mode: &str, dir: &Path, arg: &str) -> Child {
    Child::spawn_test_entry(
        "exactly_once_child",
        &[
            (MODE, mode.to_string()),
            (DIR, dir.display().to_string()),
            (ARG, arg.to_string()),
        ],
    )
    .unwrap()
}

/// Child entry: does nothing unless the parent set the mode.
#[test]
fn exactly_once_child() {
    let Ok(mode) = std::env::var(MODE) else {
        return;
    };
    println!();
    let dir = std::path::PathBuf::from(std::env::var(DIR).unwrap());
    let arg = std::env::var(ARG).unwrap_or_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        match mode.as_str() {
            "commit-and-relay" => commit_and_relay(&dir, &arg).await,
            "relay-drain" => relay_drain(&dir).await,
            "route" => route(&dir, arg.parse().unwrap_or(0)).await,
            other => panic!("unknown mode {other}"),
        }
    });
    std::process::exit(0);
}

/// Commits rows with an outbox event each, while the relay publishes; runs until killed.
async fn commit_and_relay(dir: &Path, prefix: &str) {
    let (bus, store) = open(dir);
    let db: Arc<dyn Store> = Arc::new(store);
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
    for t in tasks {
        t.await.unwrap();
    }
}

/// Relays until the outbox is empty, then says so.
async fn relay_drain(dir: &Path) {
    let (bus, store) = open(dir);
    let db: Arc<dyn Store> = Arc::new(store.clone());
    let relay = OutboxRelay::new(db.clone(), Arc::new(bus.clone()));
    while db.outbox_len().unwrap() > 0 {
        relay.relay_once().await.unwrap();
    }
    println!("DRAINED");
    bus.close().await.unwrap();
    store.close().await.unwrap();
}

/// Routes `made` events into the store; SIGKILLs itself right after the `kill_after`-th
/// commit (before its ack) when `kill_after` > 0.
async fn route(dir: &Path, kill_after: u64) {
    let (bus, store) = open(dir);
    let db: Arc<dyn Store> = Arc::new(store.clone());
    let commits = Arc::new(AtomicU64::new(0));
    let mut router = Router::new("counter", Arc::new(bus.clone()), db.clone()).on_committed(
        move |_consumer, env| {
            let n = commits.fetch_add(1, Ordering::SeqCst) + 1;
            println!("APPLIED {}", env.id);
            if n == kill_after {
                // Committed, not yet acknowledged: die the hard way, by pid.
                let _ = std::process::Command::new("kill")
                    .args(["-9", &std::process::id().to_string()])
                    .status();
                std::thread::sleep(Duration::from_secs(10));
            }
        },
    );
    router.on("made", "counter", |ctx: Context, ev: Made| async move {
        let id = ctx.envelope.id.to_string();
        let n = ctx.txn.get(&APPLIED, &id)?.unwrap_or(0);
        ctx.txn.put(&APPLIED, &id, &(n + 1))?;
        let total = ctx.txn.get(&ROWS, "total")?.unwrap_or(0);
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
    bus.close().await.unwrap();
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_relay_loses_and_duplicates_nothing_across_sigkills() {
    let dir = tempfile::tempdir().unwrap();
    let mut committed = Vec::new();
    for cycle in 0..4 {
        let mut child = spawn("commit-and-relay", dir.path(), &format!("c{cycle}"));
        let mut got = 0;
        while got < 150 + cycle * 100 {
            let line = child
                .wait_for("COMMIT ", Duration::from_secs(60))
                .expect("the child commits");
            committed.push(line);
            got += 1;
        }
        child.kill().unwrap();
        for line in child.drain(Duration::from_millis(100)) {
            if let Some(at) = line.find("COMMIT ") {
                committed.push(line[at + 7..].to_string());
            }
        }
    }
    let mut drain = spawn("relay-drain", dir.path(), "");
    drain
        .wait_for("DRAINED", Duration::from_secs(60))
        .expect("the relay drains the outbox");
    drain.wait().unwrap();

    let (bus, store) = open(dir.path());
    let mut sub = bus
        .subscribe("made", "verify", SubscribeOptions::default())
        .await
        .unwrap();
    let mut seen: HashMap<String, u32> = HashMap::new();
    while let Ok(batch) = tokio::time::timeout(Duration::from_secs(2), sub.next_batch(1024)).await {
        for d in batch.unwrap() {
            let m: Made = codec::decode(d.envelope()).unwrap();
            *seen.entry(m.key).or_default() += 1;
            d.ack().await.unwrap();
        }
    }
    let db: Arc<dyn Store> = Arc::new(store.clone());
    let txn = Txn::new(db.clone());
    let rows = txn.scan(&ROWS, "c", usize::MAX).unwrap();
    let lost: Vec<_> = committed
        .iter()
        .filter(|k| !seen.contains_key(*k))
        .collect();
    let dup: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    let orphan: Vec<_> = seen
        .keys()
        .filter(|k| !rows.iter().any(|(r, _)| r == *k))
        .collect();
    println!(
        "{} commits acknowledged, {} rows, {} events published; lost {}, duplicated {}, without a row {}",
        committed.len(),
        rows.len(),
        seen.len(),
        lost.len(),
        dup.len(),
        orphan.len()
    );
    assert!(lost.is_empty(), "committed but never published: {lost:?}");
    assert!(dup.is_empty(), "published twice: {dup:?}");
    assert!(orphan.is_empty(), "an event without its row: {orphan:?}");
    assert_eq!(
        rows.len(),
        seen.len(),
        "every committed row has exactly its event"
    );
    assert_eq!(db.outbox_len().unwrap(), 0);
    bus.close().await.unwrap();
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_killed_between_commit_and_ack_applies_the_effect_once() {
    let dir = tempfile::tempdir().unwrap();
    const N: u64 = 300;
    {
        let (bus, store) = open(dir.path());
        let events: Vec<_> = (0..N)
            .map(|i| {
                codec::encode(
                    &Made {
                        key: format!("k{}", i % 7),
                    },
                    "/test",
                )
                .unwrap()
            })
            .collect();
        bus.publish_batch("made", events).await.unwrap();
        bus.close().await.unwrap();
        store.close().await.unwrap();
    }
    // Three crashes right after a commit, before its ack; then a clean run to the end.
    for kill_after in [1u64, 40, 90] {
        let mut child = spawn("route", dir.path(), &kill_after.to_string());
        let status = child.wait().unwrap();
        assert!(
            !status.success(),
            "the child killed itself after commit {kill_after}"
        );
    }
    let mut child = spawn("route", dir.path(), "0");
    child
        .wait_for("IDLE", Duration::from_secs(120))
        .expect("the last run finishes");
    assert!(child.wait().unwrap().success());

    let (bus, store) = open(dir.path());
    let db: Arc<dyn Store> = Arc::new(store.clone());
    let txn = Txn::new(db.clone());
    let applied = txn.scan(&APPLIED, "", usize::MAX).unwrap();
    let twice: Vec<_> = applied.iter().filter(|(_, n)| *n != 1).collect();
    assert_eq!(applied.len() as u64, N, "every message applied");
    assert!(twice.is_empty(), "applied more than once: {twice:?}");
    assert_eq!(txn.get(&ROWS, "total").unwrap(), Some(N));
    bus.close().await.unwrap();
    store.close().await.unwrap();
}
