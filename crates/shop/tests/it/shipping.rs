//! Shipping over real HTTP; labels written by the router handler, once.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use shop::model::{Item, SHIPPING, ShipmentCreated};
use shop::services::shipping::{self, Shipping, ShippingClient};
use switchyard::router::Router;
use switchyard::{Bus, Envelope, SubscribeOptions, codec};
use switchyard_rpc::{CallContext, CallOptions};

use crate::support::{Harness, eventually, listener};

/// Collects the events published on `topic` (a group of its own).
pub async fn watch(bus: &Arc<dyn Bus>, topic: &str) -> Arc<Mutex<Vec<Envelope>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut sub = bus
        .subscribe(topic, "test-watch", SubscribeOptions::default())
        .await
        .unwrap();
    let s = seen.clone();
    tokio::spawn(async move {
        while let Ok(d) = sub.next().await {
            s.lock().unwrap().push(d.envelope().clone());
            let _ = d.ack().await;
        }
    });
    seen
}

fn count(seen: &Mutex<Vec<Envelope>>, ty: &str) -> usize {
    seen.lock()
        .unwrap()
        .iter()
        .filter(|e| e.event_type == ty)
        .count()
}

/// Serves shipping (REST + its outbox relay) on a fresh bus and store, registered in
/// `h`; returns the bus, the store and a watch on the shipping topic.
async fn serve_shipping(
    h: &mut Harness,
) -> (
    Arc<dyn Bus>,
    Arc<dyn switchyard::store::Store>,
    Arc<Mutex<Vec<Envelope>>>,
) {
    let bus = h.bus(true);
    let store = h.store("shipping");
    let seen = watch(&bus, SHIPPING).await;
    let running = shipping::start(store.clone(), bus.clone(), listener().await, h.shutdown())
        .await
        .unwrap();
    h.register(shipping::SERVICE, &running);
    (bus, store, seen)
}

#[tokio::test]
async fn tracking_is_idempotent_and_the_label_is_written_once() {
    let mut h = Harness::new();
    let (bus, store, seen) = serve_shipping(&mut h).await;
    let mut router = Router::new(shipping::SERVICE, bus.clone(), store.clone());
    shipping::subscribe(&mut router, h.data_dir());
    let _router = h.run_router(router).await;

    let client = ShippingClient::new(&h.http);
    let items = [Item::new("sku-001", 1)];
    // The call's correlation id carries over to the events.
    let flow = CallContext {
        correlation_id: Some("flow-o-1".into()),
        ..CallContext::default()
    };
    let a = client
        .create("o-1", &items, &CallOptions::new().context(flow))
        .await
        .unwrap();
    let b = client
        .create("o-1", &items, &CallOptions::new())
        .await
        .unwrap();
    assert_eq!(a.tracking, b.tracking);
    assert!(a.tracking.starts_with("TRK-"));

    let label = h.data_dir().join(shipping::label_path(&a.tracking));
    let core = Shipping::new(store.clone());
    eventually("the label", async || {
        label.exists()
            && core
                .get("o-1")
                .await
                .unwrap()
                .and_then(|s| s.label)
                .is_some()
    })
    .await;
    let text = std::fs::read_to_string(&label).unwrap();
    assert!(text.contains(&a.tracking) && text.contains("o-1"), "{text}");
    eventually("LabelGenerated", async || {
        count(&seen, "shop.shipping.label_generated.v1") == 1
    })
    .await;
    for e in seen.lock().unwrap().iter() {
        assert_eq!(
            e.correlationid.as_deref(),
            Some("flow-o-1"),
            "{}",
            e.event_type
        );
        assert_eq!(e.subject.as_deref(), Some("o-1"));
    }
    let got = client
        .get("o-1", &CallOptions::new())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        got.label.as_deref(),
        Some(shipping::label_path(&a.tracking).as_str())
    );
    assert!(
        client
            .get("o-none", &CallOptions::new())
            .await
            .unwrap()
            .is_none()
    );

    // A copy of the event (another id): no second label.
    let modified = std::fs::metadata(&label).unwrap().modified().unwrap();
    let copy = codec::encode(
        &ShipmentCreated {
            order_id: "o-1".into(),
            tracking: a.tracking.clone(),
        },
        "/test",
    )
    .unwrap();
    bus.publish(SHIPPING, copy).await.unwrap();
    eventually("the copy", async || {
        count(&seen, "shop.shipping.shipment_created.v1") == 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(count(&seen, "shop.shipping.shipment_created.v1"), 2);
    assert_eq!(count(&seen, "shop.shipping.label_generated.v1"), 1);
    assert_eq!(
        std::fs::metadata(&label).unwrap().modified().unwrap(),
        modified
    );
    let labels = std::fs::read_dir(h.data_dir().join("labels"))
        .unwrap()
        .count();
    assert_eq!(labels, 1);
}

#[tokio::test]
async fn a_cancel_marks_a_shipment_cancelled_once_and_blocks_a_later_create() {
    let mut h = Harness::new();
    let (_bus, _store, seen) = serve_shipping(&mut h).await;
    let client = ShippingClient::new(&h.http);
    let items = [Item::new("sku-001", 1)];

    // A created shipment: cancelled once, with one ShipmentCancelled.
    let created = client
        .create("c-1", &items, &CallOptions::new())
        .await
        .unwrap();
    let first = client.cancel("c-1", &CallOptions::new()).await.unwrap();
    assert!(first.cancelled_now);
    assert_eq!(first.tracking.as_deref(), Some(created.tracking.as_str()));
    let again = client.cancel("c-1", &CallOptions::new()).await.unwrap();
    assert!(!again.cancelled_now, "a repeat changes nothing");
    eventually("ShipmentCancelled", async || {
        count(&seen, "shop.shipping.shipment_cancelled.v1") == 1
    })
    .await;

    // No shipment yet: the cancel blocks a create still on its way (409).
    let blocked = client.cancel("c-2", &CallOptions::new()).await.unwrap();
    assert!(blocked.cancelled_now && blocked.tracking.is_none());
    let late = client
        .create("c-2", &items, &CallOptions::new())
        .await
        .unwrap_err();
    assert!(
        matches!(late, shipping::ShippingError::Cancelled { ref order_id } if order_id == "c-2"),
        "{late:?}"
    );
    assert_eq!(late.class(), shop::services::ErrorClass::Refused);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        count(&seen, "shop.shipping.shipment_cancelled.v1"),
        1,
        "nothing shipped for c-2, so nothing to announce"
    );
}
