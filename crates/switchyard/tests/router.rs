//! The router and the outbox relay over the in-memory bus and store: exactly-once
//! effects, the DLQ paths, ordering with a poison message, replay after a fix.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use switchyard::logbus::{LogBus, LogBusConfig};
use switchyard::memory::MemoryStorage;
use switchyard::relay::OutboxRelay;
use switchyard::router::{Context, HandlerError, Router};
use switchyard::store::{MemoryStore, Store, Table, Txn};
use switchyard::{Bus, Envelope, Event, MemoryBus, RedeliveryPolicy, SubscribeOptions, codec};

#[derive(Serialize, Deserialize, Clone, Debug)]
struct Paid {
    order: String,
    seq: u32,
    cents: u64,
}
impl Event for Paid {
    const TYPE: &'static str = "payment.completed.v1";
    fn subject(&self) -> Option<String> {
        Some(self.order.clone())
    }
}

#[derive(Serialize, Deserialize, Clone, Debug)]
struct Shipped {
    order: String,
}
impl Event for Shipped {
    const TYPE: &'static str = "shipment.created.v1";
}

const TOTALS: Table<u64> = Table::new("totals");
const SEEN: Table<Vec<u32>> = Table::new("seen");

fn fast() -> SubscribeOptions {
    SubscribeOptions {
        redelivery: RedeliveryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(20),
            multiplier: 2.0,
            jitter: 0.1,
        },
        ..Default::default()
    }
}

fn paid(order: &str, seq: u32, cents: u64) -> Envelope {
    codec::encode(
        &Paid {
            order: order.into(),
            seq,
            cents,
        },
        "/test",
    )
    .unwrap()
}

struct World {
    store: Arc<dyn Store>,
    stop: tokio::sync::watch::Sender<bool>,
    router: tokio::task::JoinHandle<switchyard::Result<()>>,
}

impl World {
    async fn stop(self) {
        self.stop.send(true).unwrap();
        self.router.await.unwrap().unwrap();
    }
}

/// A "shipping" service: adds amounts per order, records the order of seqs, publishes
/// `shipment.created.v1` through the outbox; fails on purpose per `fail`.
fn start(bus: Arc<dyn Bus>, fail: Arc<AtomicBool>, calls: Arc<AtomicU32>) -> World {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let mut router = Router::new("shipping", bus.clone(), store.clone());
    router.options("payments", "shipping", fast());
    router.on("payments", "shipping", move |ctx: Context, ev: Paid| {
        let fail = fail.clone();
        let calls = calls.clone();
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            if ev.cents == 666 {
                return Err(HandlerError::dead_letter("amount 666 is refused"));
            }
            if ev.cents == 13 && fail.load(Ordering::SeqCst) {
                return Err(HandlerError::retryable("bank down"));
            }
            let total = ctx.txn.get(&TOTALS, &ev.order)?.unwrap_or(0);
            ctx.txn.put(&TOTALS, &ev.order, &(total + ev.cents))?;
            let mut seen = ctx.txn.get(&SEEN, &ev.order)?.unwrap_or_default();
            seen.push(ev.seq);
            ctx.txn.put(&SEEN, &ev.order, &seen)?;
            ctx.publish("shipments", &Shipped { order: ev.order })?;
            Ok(())
        }
    });
    let (stop, mut rx) = tokio::sync::watch::channel(false);
    let router = tokio::spawn(router.run(async move {
        let _ = rx.changed().await;
    }));
    World {
        store,
        stop,
        router,
    }
}

async fn eventually(what: &str, f: impl Fn() -> bool) {
    for _ in 0..500 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for: {what}");
}

fn total(store: &Arc<dyn Store>, order: &str) -> u64 {
    Txn::new(store.clone())
        .get(&TOTALS, order)
        .unwrap()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn effects_apply_once_even_when_a_message_is_delivered_twice() {
    // Dedup window 0: the bus stores the same id twice, the inbox must absorb it.
    let bus: Arc<dyn Bus> = Arc::new(LogBus::new(
        MemoryStorage::new(Duration::ZERO),
        LogBusConfig::default(),
    ));
    let calls = Arc::new(AtomicU32::new(0));
    let w = start(bus.clone(), Arc::new(AtomicBool::new(false)), calls.clone());
    let e = paid("o1", 1, 100);
    bus.publish("payments", e.clone()).await.unwrap();
    bus.publish("payments", e.clone()).await.unwrap();
    bus.publish("payments", paid("o1", 2, 5)).await.unwrap();
    let store = w.store.clone();
    eventually("both distinct messages applied", || {
        total(&store, "o1") == 105
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        total(&store, "o1"),
        105,
        "the duplicate was not applied again"
    );
    assert_eq!(
        store.outbox_len().unwrap(),
        2,
        "one outbox event per applied message"
    );
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_relay_publishes_with_correlation_and_causation() {
    let bus: Arc<dyn Bus> = Arc::new(MemoryBus::in_memory());
    let w = start(
        bus.clone(),
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU32::new(0)),
    );
    let relay = OutboxRelay::new(w.store.clone(), bus.clone());
    let relay_task = tokio::spawn(relay.run(std::future::pending()));
    let cause = paid("o7", 1, 10).with_correlation("flow-o7");
    bus.publish("payments", cause.clone()).await.unwrap();
    let mut sub = bus
        .subscribe("shipments", "audit", SubscribeOptions::default())
        .await
        .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .unwrap()
        .unwrap();
    let shipped: Shipped = codec::decode(d.envelope()).unwrap();
    assert_eq!(shipped.order, "o7");
    assert_eq!(d.envelope().correlationid.as_deref(), Some("flow-o7"));
    assert_eq!(d.envelope().causationid, Some(cause.id.to_string()));
    assert_eq!(d.envelope().source, "/shipping");
    d.ack().await.unwrap();
    let store = w.store.clone();
    eventually("outbox drained", || store.outbox_len().unwrap() == 0).await;
    relay_task.abort();
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminal_unknown_and_malformed_messages_go_to_the_dlq_at_once() {
    let bus: Arc<dyn Bus> = Arc::new(MemoryBus::in_memory());
    let calls = Arc::new(AtomicU32::new(0));
    let w = start(bus.clone(), Arc::new(AtomicBool::new(false)), calls.clone());
    bus.publish("payments", paid("a", 1, 666)).await.unwrap();
    bus.publish(
        "payments",
        Envelope::new("payment.refunded.v9", "/x", "application/json", "{}"),
    )
    .await
    .unwrap();
    let mut bad = paid("c", 1, 1);
    bad.data = bytes::Bytes::from_static(b"{\"order\": 42}");
    bus.publish("payments", bad).await.unwrap();
    let mut dl = Vec::new();
    for _ in 0..500 {
        dl = bus.dead_letters("payments", 10).await.unwrap();
        if dl.len() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(dl.len(), 3, "{dl:?}");
    assert!(dl.iter().all(|d| d.attempts == 1), "no retries: {dl:?}");
    let reasons: Vec<_> = dl.iter().map(|d| d.reason.clone()).collect();
    assert!(
        reasons.iter().any(|r| r.contains("amount 666 is refused")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("unknown event type `payment.refunded.v9`")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("malformed payload")),
        "{reasons:?}"
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "only the decodable one reached the handler"
    );
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_parks_only_its_subject_and_replay_succeeds_after_the_fix() {
    let bus: Arc<dyn Bus> = Arc::new(MemoryBus::in_memory());
    let fail = Arc::new(AtomicBool::new(true));
    let calls = Arc::new(AtomicU32::new(0));
    let w = start(bus.clone(), fail.clone(), calls.clone());
    // Subject A: 1, poison (13), 3, 4. Subject B: 1..=4.
    let a = [(1, 1), (2, 13), (3, 1), (4, 1)];
    for (seq, cents) in a {
        bus.publish("payments", paid("A", seq, cents))
            .await
            .unwrap();
    }
    for seq in 1..=4 {
        bus.publish("payments", paid("B", seq, 1)).await.unwrap();
    }
    let store = w.store.clone();
    eventually("B flows while A is parked", || total(&store, "B") == 4).await;
    eventually("A resumes in order once the poison is in the DLQ", || {
        total(&store, "A") == 3
    })
    .await;
    let seen_a = Txn::new(store.clone()).get(&SEEN, "A").unwrap().unwrap();
    assert_eq!(
        seen_a,
        vec![1, 3, 4],
        "order kept around the poison message"
    );
    let dl = bus.dead_letters("payments", 10).await.unwrap();
    assert_eq!(dl.len(), 1);
    assert_eq!(dl[0].attempts, 3);
    assert_eq!(dl[0].reason, "bank down");
    // Fix the cause, replay: the handler runs again and succeeds, once.
    fail.store(false, Ordering::SeqCst);
    assert_eq!(
        bus.replay_dead_letters("payments", Default::default())
            .await
            .unwrap(),
        1
    );
    eventually("replayed message applied", || total(&store, "A") == 16).await;
    let seen_a = Txn::new(store.clone()).get(&SEEN, "A").unwrap().unwrap();
    assert_eq!(seen_a, vec![1, 3, 4, 2]);
    assert!(bus.dead_letters("payments", 10).await.unwrap().is_empty());
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_ack_after_the_commit_does_not_repeat_the_effect() {
    let bus: Arc<dyn Bus> = Arc::new(MemoryBus::in_memory());
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let mut router = Router::new("slow", bus.clone(), store.clone());
    let opts = SubscribeOptions {
        ack_wait: Duration::from_millis(150),
        ..fast()
    };
    router.options("payments", "slow", opts);
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    router.on("payments", "slow", move |ctx: Context, ev: Paid| {
        let c = c.clone();
        async move {
            let n = c.fetch_add(1, Ordering::SeqCst);
            let total = ctx.txn.get(&TOTALS, &ev.order)?.unwrap_or(0);
            ctx.txn.put(&TOTALS, &ev.order, &(total + ev.cents))?;
            if n == 0 {
                // Outlive the lease: the commit lands, the ack is refused as stale, and
                // the message is redelivered.
                tokio::time::sleep(Duration::from_millis(400)).await;
            }
            Ok(())
        }
    });
    let (stop, mut rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(router.run(async move {
        let _ = rx.changed().await;
    }));
    bus.publish("payments", paid("z", 1, 7)).await.unwrap();
    eventually("redelivered and settled", || {
        calls.load(Ordering::SeqCst) >= 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(total(&store, "z"), 7, "applied exactly once");
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbox_window_shorter_than_the_redelivery_horizon_is_refused() {
    let bus: Arc<dyn Bus> = Arc::new(MemoryBus::in_memory());
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let mut router = Router::new("x", bus, store).inbox_window(Duration::from_secs(1));
    router.on("t", "g", |_ctx: Context, _ev: Shipped| async { Ok(()) });
    let err = router.run(std::future::pending()).await.unwrap_err();
    assert!(err.to_string().contains("inbox window"), "{err}");
}
