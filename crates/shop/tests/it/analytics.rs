//! Analytics: every event counted once, duplicates included.

use std::time::Duration;

use shop::model::{
    INVENTORY, InventoryReserved, LabelGenerated, ORDERS, OrderCompleted, OrderCreated, SHIPPING,
};
use shop::services::analytics::{self, Analytics, AnalyticsClient, AnalyticsError};
use switchyard::codec;
use switchyard::router::Router;
use switchyard_rpc::CallOptions;

use crate::support::{Harness, eventually, listener};

#[tokio::test]
async fn events_are_counted_once_even_when_delivered_twice() {
    let mut h = Harness::new();
    // No publisher dedup: a re-published message reaches the consumer again.
    let bus = h.bus(false);
    let store = h.store("analytics");
    let mut router = Router::new(analytics::SERVICE, bus.clone(), store.clone());
    analytics::subscribe(&mut router);
    let stats = router.stats();
    let _router = h.run_router(router).await;
    let running = analytics::start(store.clone(), listener().await, h.shutdown())
        .await
        .unwrap();
    h.register(analytics::SERVICE, &running);

    let created = codec::encode(
        &OrderCreated {
            order_id: "o-1".into(),
            customer: "ann".into(),
            items: vec![],
            amount_cents: 1,
            payment_token: "t".into(),
        },
        "/test",
    )
    .unwrap();
    bus.publish(ORDERS, created.clone()).await.unwrap();
    bus.publish(ORDERS, created).await.unwrap(); // the same message twice
    let completed = codec::encode(
        &OrderCompleted {
            order_id: "o-1".into(),
        },
        "/test",
    )
    .unwrap();
    bus.publish(ORDERS, completed).await.unwrap();
    let reserved = codec::encode(
        &InventoryReserved {
            order_id: "o-1".into(),
            items: vec![],
        },
        "/test",
    )
    .unwrap();
    bus.publish(INVENTORY, reserved.clone()).await.unwrap();
    bus.publish(INVENTORY, reserved).await.unwrap();
    let label = LabelGenerated {
        order_id: "o-1".into(),
        tracking: "TRK-1".into(),
        path: "labels/TRK-1.txt".into(),
    };
    bus.publish(SHIPPING, codec::encode(&label, "/test").unwrap())
        .await
        .unwrap();

    let core = Analytics::new(store.clone());
    eventually(
        "3 + 1 + 1 events counted and 2 duplicates skipped",
        async || {
            core.stats().await.unwrap().total == 4
                && stats.duplicates.load(std::sync::atomic::Ordering::Relaxed) == 2
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let client = AnalyticsClient::new(&h.http);
    let s = client.stats(&CallOptions::new()).await.unwrap();
    assert_eq!(s.total, 4);
    assert_eq!(s.totals.get("shop.order.created.v1"), Some(&1));
    assert_eq!(s.totals.get("shop.order.completed.v1"), Some(&1));
    assert_eq!(s.totals.get("shop.inventory.reserved.v1"), Some(&1));
    assert_eq!(s.totals.get("shop.shipping.label_generated.v1"), Some(&1));
    let per_minute: u64 = s.per_minute.iter().flat_map(|m| m.counts.values()).sum();
    assert_eq!(per_minute, 4);

    // The sync path: once per (order, type).
    assert!(
        client
            .record("shop.order.created.v1", "o-2", &CallOptions::new())
            .await
            .unwrap()
    );
    assert!(
        !client
            .record("shop.order.created.v1", "o-2", &CallOptions::new())
            .await
            .unwrap()
    );
    let err = client
        .record("bad type", "o-2", &CallOptions::new())
        .await
        .unwrap_err();
    assert!(
        matches!(err, AnalyticsError::Invalid(ref i) if i.field == "type"),
        "{err:?}"
    );
    let s = client.stats(&CallOptions::new()).await.unwrap();
    assert_eq!(s.totals.get("shop.order.created.v1"), Some(&2));
    assert_eq!(s.total, 5);
}

#[tokio::test]
async fn concurrent_counts_of_one_type_are_exact_before_and_after_folding() {
    let h = Harness::new();
    let store = h.store("analytics");
    let core = Analytics::new(store.clone());
    // 800 concurrent counts of one type (one hot counter): 400 orders, each twice.
    let mut tasks = Vec::new();
    for n in 0..800 {
        let core = core.clone();
        tasks.push(tokio::spawn(async move {
            core.record("shop.order.completed.v1", &format!("o-{}", n % 400))
                .await
                .unwrap()
        }));
    }
    let mut counted = 0;
    for t in tasks {
        counted += u64::from(t.await.unwrap());
    }
    assert_eq!(counted, 400, "each (order, type) counted once");
    let before = core.stats().await.unwrap();
    assert_eq!(before.totals.get("shop.order.completed.v1"), Some(&400));
    assert_eq!(before.total, 400);

    // Folding moves the pending rows into the counters; the answer does not change.
    let folded = analytics::fold(&store).await.unwrap();
    assert_eq!(folded, 400);
    assert_eq!(analytics::fold(&store).await.unwrap(), 0, "nothing left");
    let pending = switchyard::store::Txn::new(store.clone())
        .scan(&analytics::PENDING, "", usize::MAX)
        .await
        .unwrap();
    assert!(pending.is_empty(), "{} rows left pending", pending.len());
    let after = core.stats().await.unwrap();
    assert_eq!(after, before);
    let per_minute: u64 = after
        .per_minute
        .iter()
        .flat_map(|m| m.counts.values())
        .sum();
    assert_eq!(per_minute, 400);

    // Counts after a fold add to the folded ones.
    assert!(
        core.record("shop.order.completed.v1", "o-new")
            .await
            .unwrap()
    );
    assert_eq!(core.stats().await.unwrap().total, 401);
    analytics::fold(&store).await.unwrap();
    assert_eq!(core.stats().await.unwrap().total, 401);
}
