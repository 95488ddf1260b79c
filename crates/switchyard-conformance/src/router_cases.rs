//! The router and outbox-relay cases: exactly-once effects, the DLQ paths, ordering with
//! a poison message, replay after a fix, and the crash cases (the relay and the router
//! killed with SIGKILL). Each opens the bus under `<dir>/bus` and the store under
//! `<dir>/store` of a fresh directory; none asserts on speed.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use switchyard::relay::OutboxRelay;
use switchyard::router::{Context, GateDecision, HandlerError, Router};
use switchyard::store::{OutboxEntry, RawRow, Store, Table, Txn, Write, WriteBatch};
use switchyard::{
    Bus, Envelope, Event, MessageId, RedeliveryPolicy, SubscribeOptions, Timestamp, codec,
};
use switchyard_testkit::Child;

use crate::child::DIR_VAR;
use crate::router_child::{
    APPLIED, Made, ROUTER_ARG_VAR, ROUTER_MODE_VAR, ROWS, close_both, open_bus, open_store,
};
use crate::{BusFactory, Settings, StoreFactory};

/// How long `eventually` waits for a condition (generous: a disk backend on a busy
/// machine; the cases pass as soon as the condition holds).
const EVENTUALLY: Duration = Duration::from_secs(30);

pub(crate) async fn dispatch<B: BusFactory, S: StoreFactory>(
    bf: &B,
    sf: &S,
    name: &str,
    dir: &Path,
    entry: &str,
) {
    match name {
        "effects_apply_once_even_when_a_message_is_delivered_twice" => {
            delivered_twice(bf, sf, dir).await
        }
        "outbox_relay_publishes_with_correlation_and_causation" => {
            relay_correlation(bf, sf, dir).await
        }
        "terminal_unknown_and_malformed_messages_go_to_the_dlq_at_once" => {
            terminal_to_dlq(bf, sf, dir).await
        }
        "a_poison_message_parks_only_its_subject_and_replay_succeeds_after_the_fix" => {
            poison_and_replay(bf, sf, dir).await
        }
        "a_lost_ack_after_the_commit_does_not_repeat_the_effect" => lost_ack(bf, sf, dir).await,
        "an_inbox_window_shorter_than_the_redelivery_horizon_is_refused" => {
            short_inbox_window(bf, sf, dir).await
        }
        "what_a_handler_holds_is_dropped_after_its_commit" => held_until_commit(bf, sf, dir).await,
        "a_closed_gate_defers_messages_until_it_opens" => gated(bf, sf, dir).await,
        "outbox_relay_loses_and_duplicates_nothing_across_sigkills" => {
            relay_across_sigkills(bf, sf, dir, entry).await
        }
        "router_killed_between_commit_and_ack_applies_the_effect_once" => {
            router_killed(bf, sf, dir, entry).await
        }
        other => panic!("no router conformance case `{other}`"),
    }
}

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

/// A "shipping" service on `store`: adds amounts per order, records the order of seqs,
/// publishes `shipment.created.v1` through the outbox; fails on purpose per `fail`.
fn start(
    bus: Arc<dyn Bus>,
    store: Arc<dyn Store>,
    fail: Arc<AtomicBool>,
    calls: Arc<AtomicU32>,
) -> World {
    let mut router = Router::new("shipping", bus, store.clone());
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
            let total = ctx.txn.get(&TOTALS, &ev.order).await?.unwrap_or(0);
            ctx.txn.put(&TOTALS, &ev.order, &(total + ev.cents))?;
            let mut seen = ctx.txn.get(&SEEN, &ev.order).await?.unwrap_or_default();
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

async fn eventually(what: &str, f: impl AsyncFn() -> bool) {
    let deadline = Instant::now() + EVENTUALLY;
    while Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if f().await {
        return;
    }
    panic!("timed out after {EVENTUALLY:?} waiting for: {what}");
}

async fn total(store: &Arc<dyn Store>, order: &str) -> u64 {
    Txn::new(store.clone())
        .get(&TOTALS, order)
        .await
        .unwrap()
        .unwrap_or(0)
}

async fn delivered_twice<B: BusFactory, S: StoreFactory>(bf: &B, sf: &S, dir: &Path) {
    // Dedup window 0: the bus stores the same id twice, the inbox must absorb it.
    let settings = Settings {
        dedup_window: Duration::ZERO,
        ..Default::default()
    };
    let raw_bus = open_bus(bf, dir, &settings);
    let raw_store = open_store(sf, dir);
    let bus: Arc<dyn Bus> = Arc::new(raw_bus.clone());
    let calls = Arc::new(AtomicU32::new(0));
    let w = start(
        bus.clone(),
        raw_store.clone(),
        Arc::new(AtomicBool::new(false)),
        calls.clone(),
    );
    let e = paid("o1", 1, 100);
    let first = bus.publish("payments", e.clone()).await.unwrap();
    let again = bus.publish("payments", e.clone()).await.unwrap();
    assert!(
        !first.duplicate && !again.duplicate && again.offset != first.offset,
        "with a dedup window of 0 the bus stores the same id twice (does the factory honour `Settings::dedup_window`?)"
    );
    bus.publish("payments", paid("o1", 2, 5)).await.unwrap();
    let store = w.store.clone();
    eventually("both distinct messages applied", async || {
        total(&store, "o1").await == 105
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        total(&store, "o1").await,
        105,
        "the duplicate was not applied again"
    );
    assert_eq!(
        store.outbox_len().await.unwrap(),
        2,
        "one outbox event per applied message"
    );
    w.stop().await;
    drop(store);
    close_both(&raw_bus, sf, &raw_store).await;
}

/// The order of commits and drops, as `committed:<order>` / `dropped:<order>` entries.
type Events = Arc<std::sync::Mutex<Vec<String>>>;

/// Held by a handler: records when it is dropped.
struct CommitProbe {
    order: String,
    events: Events,
}

impl Drop for CommitProbe {
    fn drop(&mut self) {
        self.events
            .lock()
            .unwrap()
            .push(format!("dropped:{}", self.order));
    }
}

/// The store under test, recording each commit of an order's row once it returned.
struct RecordingStore {
    inner: Arc<dyn Store>,
    events: Events,
}

#[async_trait::async_trait]
impl Store for RecordingStore {
    async fn get_raw(&self, table: &str, key: &str) -> switchyard::Result<Option<RawRow>> {
        self.inner.get_raw(table, key).await
    }
    async fn scan_raw(
        &self,
        table: &str,
        prefix: &str,
        limit: usize,
    ) -> switchyard::Result<Vec<RawRow>> {
        self.inner.scan_raw(table, prefix, limit).await
    }
    async fn commit(&self, batch: WriteBatch) -> switchyard::Result<()> {
        let orders: Vec<String> = batch
            .writes
            .iter()
            .filter_map(|w| match w {
                Write::Put { table, key, .. } if table == TOTALS.name() && key != "hot" => {
                    Some(key.clone())
                }
                _ => None,
            })
            .collect();
        self.inner.commit(batch).await?;
        let mut events = self.events.lock().unwrap();
        events.extend(orders.into_iter().map(|o| format!("committed:{o}")));
        Ok(())
    }
    async fn inbox_contains(&self, consumer: &str, id: MessageId) -> switchyard::Result<bool> {
        self.inner.inbox_contains(consumer, id).await
    }
    async fn expire_inbox(&self, before: Timestamp) -> switchyard::Result<u64> {
        self.inner.expire_inbox(before).await
    }
    async fn outbox_peek(&self, limit: usize) -> switchyard::Result<Vec<OutboxEntry>> {
        self.inner.outbox_peek(limit).await
    }
    async fn outbox_remove(&self, seqs: &[u64]) -> switchyard::Result<()> {
        self.inner.outbox_remove(seqs).await
    }
    async fn outbox_len(&self) -> switchyard::Result<u64> {
        self.inner.outbox_len().await
    }
    fn outbox_notify(&self) -> Arc<tokio::sync::Notify> {
        self.inner.outbox_notify()
    }
}

async fn held_until_commit<B: BusFactory, S: StoreFactory>(bf: &B, sf: &S, dir: &Path) {
    let raw_bus = open_bus(bf, dir, &Settings::default());
    let raw_store = open_store(sf, dir);
    let bus: Arc<dyn Bus> = Arc::new(raw_bus.clone());
    // One hot row and an in-process lock that every handler takes and hands to the
    // router: with the lock held through the commit, writers take turns and never
    // conflict, and every probe is dropped after its handler's commit returned.
    let events: Events = Arc::default();
    let store: Arc<dyn Store> = Arc::new(RecordingStore {
        inner: raw_store.clone(),
        events: events.clone(),
    });
    let lock = Arc::new(tokio::sync::Mutex::new(()));
    let mut router = Router::new("shipping", bus.clone(), store.clone());
    router.options("payments", "shipping", fast());
    {
        let (lock, events) = (lock.clone(), events.clone());
        router.on("payments", "shipping", move |ctx: Context, ev: Paid| {
            let (lock, events) = (lock.clone(), events.clone());
            async move {
                let guard = lock.lock_owned().await;
                let total = ctx.txn.get(&TOTALS, "hot").await?.unwrap_or(0);
                ctx.txn.put(&TOTALS, "hot", &(total + ev.cents))?;
                ctx.txn.put(&TOTALS, &ev.order, &ev.cents)?;
                ctx.hold(CommitProbe {
                    order: ev.order,
                    events,
                });
                ctx.hold(guard);
                Ok(())
            }
        });
    }
    let stats = router.stats();
    let (stop, mut rx) = tokio::sync::watch::channel(false);
    let running = tokio::spawn(router.run(async move {
        let _ = rx.changed().await;
    }));
    let n = 200u32;
    for i in 0..n {
        bus.publish("payments", paid(&format!("o{i}"), 1, 1))
            .await
            .unwrap();
    }
    eventually("every message applied", async || {
        total(&store, "hot").await == u64::from(n)
    })
    .await;
    let dropped = |events: &[String]| events.iter().filter(|e| e.starts_with("dropped:")).count();
    eventually("every probe dropped", async || {
        dropped(&events.lock().unwrap()) == n as usize
    })
    .await;
    let events = events.lock().unwrap().clone();
    let early: Vec<&str> = events
        .iter()
        .enumerate()
        .filter_map(|(at, e)| {
            let order = e.strip_prefix("dropped:")?;
            let committed = format!("committed:{order}");
            (!events[..at].contains(&committed)).then_some(order)
        })
        .collect();
    assert!(
        early.is_empty(),
        "{} of {n} held values were dropped before their commit returned: {early:?}",
        early.len()
    );
    assert_eq!(
        stats.retried.load(Ordering::Relaxed),
        0,
        "writers of the hot row took turns: no conflict, no redelivery"
    );
    stop.send(true).unwrap();
    running.await.unwrap().unwrap();
    drop(store);
    close_both(&raw_bus, sf, &raw_store).await;
}

async fn gated<B: BusFactory, S: StoreFactory>(bf: &B, sf: &S, dir: &Path) {
    let raw_bus = open_bus(bf, dir, &Settings::default());
    let raw_store = open_store(sf, dir);
    let bus: Arc<dyn Bus> = Arc::new(raw_bus.clone());
    let store: Arc<dyn Store> = raw_store.clone();
    // A paused service: its gate defers every message for 400 ms while closed.
    let open = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU32::new(0));
    let gate_open = open.clone();
    let mut router = Router::new("shipping", bus.clone(), store.clone()).gate(move |_env| {
        let open = gate_open.load(Ordering::SeqCst);
        async move {
            if open {
                GateDecision::Pass
            } else {
                GateDecision::Defer {
                    delay: Duration::from_millis(400),
                    reason: "paused".into(),
                }
            }
        }
    });
    router.options("payments", "shipping", fast());
    {
        let calls = calls.clone();
        router.on("payments", "shipping", move |ctx: Context, ev: Paid| {
            let calls = calls.clone();
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                let total = ctx.txn.get(&TOTALS, &ev.order).await?.unwrap_or(0);
                ctx.txn.put(&TOTALS, &ev.order, &(total + ev.cents))?;
                Ok(())
            }
        });
    }
    let stats = router.stats();
    let (stop, mut rx) = tokio::sync::watch::channel(false);
    let running = tokio::spawn(router.run(async move {
        let _ = rx.changed().await;
    }));
    for i in 0..5u32 {
        bus.publish("payments", paid(&format!("g{i}"), 1, 10))
            .await
            .unwrap();
    }
    eventually("every message deferred once", async || {
        stats.retried.load(Ordering::Relaxed) >= 5
    })
    .await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "no handler ran while closed"
    );
    open.store(true, Ordering::SeqCst);
    eventually("every message handled once the gate opened", async || {
        for i in 0..5 {
            if total(&store, &format!("g{i}")).await != 10 {
                return false;
            }
        }
        true
    })
    .await;
    assert_eq!(calls.load(Ordering::SeqCst), 5, "each handled once");
    assert!(
        bus.dead_letters("payments", 10).await.unwrap().is_empty(),
        "a deferral within the attempts does not dead-letter"
    );
    stop.send(true).unwrap();
    running.await.unwrap().unwrap();
    drop(store);
    close_both(&raw_bus, sf, &raw_store).await;
}

async fn relay_correlation<B: BusFactory, S: StoreFactory>(bf: &B, sf: &S, dir: &Path) {
    let raw_bus = open_bus(bf, dir, &Settings::default());
    let raw_store = open_store(sf, dir);
    let bus: Arc<dyn Bus> = Arc::new(raw_bus.clone());
    let w = start(
        bus.clone(),
        raw_store.clone(),
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU32::new(0)),
    );
    let relay = OutboxRelay::new(w.store.clone(), bus.clone());
    let (stop_relay, mut relay_rx) = tokio::sync::watch::channel(false);
    let relay_task = tokio::spawn(relay.run(async move {
        let _ = relay_rx.changed().await;
    }));
    let cause = paid("o7", 1, 10).with_correlation("flow-o7");
    bus.publish("payments", cause.clone()).await.unwrap();
    let mut sub = bus
        .subscribe("shipments", "audit", SubscribeOptions::default())
        .await
        .unwrap();
    let d = tokio::time::timeout(EVENTUALLY, sub.next())
        .await
        .expect("the relayed event arrives")
        .unwrap();
    let shipped: Shipped = codec::decode(d.envelope()).unwrap();
    assert_eq!(shipped.order, "o7");
    assert_eq!(d.envelope().correlationid.as_deref(), Some("flow-o7"));
    assert_eq!(d.envelope().causationid, Some(cause.id.to_string()));
    assert_eq!(d.envelope().source, "/shipping");
    d.ack().await.unwrap();
    let store = w.store.clone();
    eventually("outbox drained", async || {
        store.outbox_len().await.unwrap() == 0
    })
    .await;
    stop_relay.send(true).unwrap();
    relay_task.await.unwrap();
    w.stop().await;
    drop((sub, store));
    close_both(&raw_bus, sf, &raw_store).await;
}

async fn terminal_to_dlq<B: BusFactory, S: StoreFactory>(bf: &B, sf: &S, dir: &Path) {
    let raw_bus = open_bus(bf, dir, &Settings::default());
    let raw_store = open_store(sf, dir);
    let bus: Arc<dyn Bus> = Arc::new(raw_bus.clone());
    let calls = Arc::new(AtomicU32::new(0));
    let w = start(
        bus.clone(),
        raw_store.clone(),
        Arc::new(AtomicBool::new(false)),
        calls.clone(),
    );
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
    let deadline = Instant::now() + EVENTUALLY;
    while Instant::now() < deadline {
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
    close_both(&raw_bus, sf, &raw_store).await;
}

async fn poison_and_replay<B: BusFactory, S: StoreFactory>(bf: &B, sf: &S, dir: &Path) {
    let raw_bus = open_bus(bf, dir, &Settings::default());
    let raw_store = open_store(sf, dir);
    let bus: Arc<dyn Bus> = Arc::new(raw_bus.clone());
    let fail = Arc::new(AtomicBool::new(true));
    let calls = Arc::new(AtomicU32::new(0));
    let w = start(bus.clone(), raw_store.clone(), fail.clone(), calls.clone());
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
    eventually("B flows while A is parked", async || {
        total(&store, "B").await == 4
    })
    .await;
    eventually(
        "A resumes in order once the poison is in the DLQ",
        async || total(&store, "A").await == 3,
    )
    .await;
    let seen_a = Txn::new(store.clone())
        .get(&SEEN, "A")
        .await
        .unwrap()
        .unwrap();
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
    eventually("replayed message applied", async || {
        total(&store, "A").await == 16
    })
    .await;
    let seen_a = Txn::new(store.clone())
        .get(&SEEN, "A")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seen_a, vec![1, 3, 4, 2]);
    assert!(bus.dead_letters("payments", 10).await.unwrap().is_empty());
    w.stop().await;
    drop(store);
    close_both(&raw_bus, sf, &raw_store).await;
}

async fn lost_ack<B: BusFactory, S: StoreFactory>(bf: &B, sf: &S, dir: &Path) {
    let raw_bus = open_bus(bf, dir, &Settings::default());
    let raw_store = open_store(sf, dir);
    let bus: Arc<dyn Bus> = Arc::new(raw_bus.clone());
    let store: Arc<dyn Store> = raw_store.clone();
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
            let total = ctx.txn.get(&TOTALS, &ev.order).await?.unwrap_or(0);
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
    eventually("redelivered and settled", async || {
        calls.load(Ordering::SeqCst) >= 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(total(&store, "z").await, 7, "applied exactly once");
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
    drop(store);
    close_both(&raw_bus, sf, &raw_store).await;
}

async fn short_inbox_window<B: BusFactory, S: StoreFactory>(bf: &B, sf: &S, dir: &Path) {
    let raw_bus = open_bus(bf, dir, &Settings::default());
    let raw_store = open_store(sf, dir);
    let bus: Arc<dyn Bus> = Arc::new(raw_bus.clone());
    let store: Arc<dyn Store> = raw_store.clone();
    let mut router = Router::new("x", bus, store).inbox_window(Duration::from_secs(1));
    router.on("t", "g", |_ctx: Context, _ev: Shipped| async { Ok(()) });
    let err = router.run(std::future::pending()).await.unwrap_err();
    assert!(err.to_string().contains("inbox window"), "{err}");
    close_both(&raw_bus, sf, &raw_store).await;
}

fn spawn(entry: &str, mode: &str, dir: &Path, arg: &str) -> Child {
    Child::spawn_test_entry(
        entry,
        &[
            (ROUTER_MODE_VAR, mode.to_string()),
            (DIR_VAR, dir.display().to_string()),
            (ROUTER_ARG_VAR, arg.to_string()),
        ],
    )
    .unwrap()
}

async fn relay_across_sigkills<B: BusFactory, S: StoreFactory>(
    bf: &B,
    sf: &S,
    dir: &Path,
    entry: &str,
) {
    let mut committed = Vec::new();
    for cycle in 0..4 {
        let mut child = spawn(entry, "commit-and-relay", dir, &format!("c{cycle}"));
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
    let mut drain = spawn(entry, "relay-drain", dir, "");
    drain
        .wait_for("DRAINED", Duration::from_secs(60))
        .expect("the relay drains the outbox");
    drain.wait().unwrap();

    let bus = open_bus(bf, dir, &Settings::default());
    let store = open_store(sf, dir);
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
    let db: Arc<dyn Store> = store.clone();
    let txn = Txn::new(db.clone());
    let rows = txn.scan(&ROWS, "c", usize::MAX).await.unwrap();
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
    assert_eq!(db.outbox_len().await.unwrap(), 0);
    drop((txn, db, sub));
    close_both(&bus, sf, &store).await;
}

async fn router_killed<B: BusFactory, S: StoreFactory>(bf: &B, sf: &S, dir: &Path, entry: &str) {
    const N: u64 = 300;
    {
        let bus = open_bus(bf, dir, &Settings::default());
        let store = open_store(sf, dir);
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
        close_both(&bus, sf, &store).await;
    }
    // Three crashes right after a commit, before its ack; then a clean run to the end.
    for kill_after in [1u64, 40, 90] {
        let mut child = spawn(entry, "route", dir, &kill_after.to_string());
        let status = child.wait().unwrap();
        assert!(
            !status.success(),
            "the child killed itself after commit {kill_after}"
        );
    }
    let mut child = spawn(entry, "route", dir, "0");
    child
        .wait_for("IDLE", Duration::from_secs(120))
        .expect("the last run finishes");
    assert!(child.wait().unwrap().success());

    let bus = open_bus(bf, dir, &Settings::default());
    let store = open_store(sf, dir);
    let db: Arc<dyn Store> = store.clone();
    let txn = Txn::new(db.clone());
    let applied = txn.scan(&APPLIED, "", usize::MAX).await.unwrap();
    let twice: Vec<_> = applied.iter().filter(|(_, n)| *n != 1).collect();
    assert_eq!(applied.len() as u64, N, "every message applied");
    assert!(
        twice.is_empty(),
        "{} messages applied more than once: {:?}",
        twice.len(),
        &twice[..twice.len().min(10)]
    );
    assert_eq!(txn.get(&ROWS, "total").await.unwrap(), Some(N));
    drop((txn, db));
    close_both(&bus, sf, &store).await;
}
