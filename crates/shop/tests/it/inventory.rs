//! Inventory over real HTTP: all or nothing, idempotency, conservation under
//! concurrency, bad input.

use std::sync::Arc;

use shop::model::{Catalog, Item, RARE_SKU, RARE_STOCK};
use shop::services::ErrorClass;
use shop::services::inventory::{
    self, Inventory, InventoryClient, InventoryError, RESERVATIONS, ReservationState,
};
use switchyard::store::{Store, Txn};
use switchyard_rpc::CallOptions;

use crate::support::{Harness, listener, raw};

async fn setup() -> (Harness, Arc<dyn Store>, InventoryClient, String) {
    let mut h = Harness::new();
    let store = h.store("inventory");
    let running = inventory::start(store.clone(), listener().await, h.shutdown())
        .await
        .unwrap();
    h.register(inventory::SERVICE, &running);
    let client = InventoryClient::new(&h.http);
    (h, store, client, running.url)
}

async fn reservations(store: &Arc<dyn Store>) -> usize {
    Txn::new(store.clone())
        .scan(&RESERVATIONS, "", usize::MAX)
        .await
        .unwrap()
        .len()
}

#[tokio::test]
async fn reserve_is_all_or_nothing_and_idempotent() {
    let (_h, store, client, _) = setup().await;
    let inv = Inventory::new(store.clone());
    let total = Catalog::standard().total_initial_units();
    assert_eq!(inv.total_units().await.unwrap(), total);
    let opts = CallOptions::new();

    // One line short: nothing reserved, stock unchanged.
    let err = client
        .reserve(
            "o-short",
            &[Item::new("sku-001", 2), Item::new(RARE_SKU, 6)],
            &opts,
        )
        .await
        .unwrap_err();
    assert_eq!(err.class(), ErrorClass::Refused);
    assert!(!err.is_retryable());
    match err {
        InventoryError::OutOfStock {
            sku,
            requested,
            available,
        } => assert_eq!(
            (sku.as_str(), requested, available),
            (RARE_SKU, 6, RARE_STOCK)
        ),
        other => panic!("expected OutOfStock, got {other:?}"),
    }
    assert_eq!(inv.available("sku-001").await.unwrap(), Some(10_000));
    assert_eq!(inv.available(RARE_SKU).await.unwrap(), Some(RARE_STOCK));
    assert_eq!(reservations(&store).await, 0);

    // Reserved once, however often asked.
    let items = [Item::new("sku-001", 2), Item::new(RARE_SKU, 1)];
    let first = client.reserve("o-1", &items, &opts).await.unwrap();
    let again = client
        .reserve(
            "o-1",
            &items,
            &CallOptions::new().idempotency_key("o-1:reserve"),
        )
        .await
        .unwrap();
    assert_eq!(first, again);
    let other = client
        .reserve("o-1", &[Item::new("sku-002", 1)], &opts)
        .await
        .unwrap_err();
    assert!(
        matches!(other, InventoryError::ReservedDifferently { ref order_id } if order_id == "o-1"),
        "{other:?}"
    );
    assert_eq!(inv.available("sku-001").await.unwrap(), Some(9_998));
    assert_eq!(inv.available(RARE_SKU).await.unwrap(), Some(RARE_STOCK - 1));

    // Release: idempotent, a no-op for an unknown order.
    let r = client.release("o-1", &opts).await.unwrap();
    assert!(r.released_now);
    let r = client.release("o-1", &opts).await.unwrap();
    assert!(!r.released_now);
    assert_eq!(r.state, Some(ReservationState::Released));
    let r = client.release("o-never", &opts).await.unwrap();
    assert_eq!((r.state, r.released_now), (None, false));
    assert_eq!(inv.available("sku-001").await.unwrap(), Some(10_000));
    // A released reservation cannot be committed.
    assert!(matches!(
        client.commit("o-1", &opts).await,
        Err(InventoryError::Released { .. })
    ));
    assert!(matches!(
        client.commit("o-never", &opts).await,
        Err(InventoryError::NoReservation { .. })
    ));

    // Commit: idempotent; release after commit changes nothing.
    client.reserve("o-2", &items, &opts).await.unwrap();
    let c1 = client.commit("o-2", &opts).await.unwrap();
    let c2 = client.commit("o-2", &opts).await.unwrap();
    assert_eq!(c1, c2);
    assert_eq!(c1.state, ReservationState::Committed);
    let r = client.release("o-2", &opts).await.unwrap();
    assert_eq!(
        (r.state, r.released_now),
        (Some(ReservationState::Committed), false)
    );
    let level = client.stock("sku-001", &opts).await.unwrap().unwrap();
    assert_eq!(
        (level.available, level.reserved, level.committed),
        (9_998, 0, 2)
    );
    assert!(client.stock("sku-nope", &opts).await.unwrap().is_none());
    assert_eq!(
        client
            .reservation("o-2", &opts)
            .await
            .unwrap()
            .map(|r| r.state),
        Some(ReservationState::Committed)
    );

    let report = client.all_stock(&opts).await.unwrap();
    assert_eq!(report.total_units, total);
    assert_eq!(inv.total_units().await.unwrap(), total);
}

#[tokio::test]
async fn concurrent_reserves_of_a_rare_sku_never_oversell() {
    let (_h, store, client, _) = setup().await;
    let inv = Inventory::new(store.clone());
    let total = inv.total_units().await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..200 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            client
                .reserve(
                    &format!("o-{i}"),
                    &[Item::new(RARE_SKU, 1)],
                    &CallOptions::new(),
                )
                .await
        }));
    }
    let (mut ok, mut out) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(InventoryError::OutOfStock { available, .. }) => {
                assert!(available < RARE_STOCK);
                out += 1
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert_eq!((ok, out), (RARE_STOCK, 200 - RARE_STOCK));
    let level = inv.stock(RARE_SKU).await.unwrap().unwrap();
    assert_eq!((level.available, level.reserved), (0, RARE_STOCK));
    assert_eq!(inv.total_units().await.unwrap(), total);
    assert_eq!(reservations(&store).await, RARE_STOCK as usize);
}

#[tokio::test]
async fn bad_input_is_a_problem_and_records_nothing() {
    let (_h, store, _client, url) = setup().await;
    let inv = Inventory::new(store.clone());
    let total = inv.total_units().await.unwrap();
    let json = Some("application/json");
    // (what, content type, body, status, field named)
    type Case<'a> = (&'a str, Option<&'a str>, Vec<u8>, u16, Option<&'a str>);
    let cases: Vec<Case> = vec![
        (
            "malformed JSON",
            json,
            br#"{"order_id": "o-1", "items": ["#.to_vec(),
            400,
            None,
        ),
        (
            "unknown SKU",
            json,
            br#"{"order_id":"o-1","items":[{"sku":"sku-001","qty":1},{"sku":"sku-nope","qty":1}]}"#
                .to_vec(),
            422,
            Some("items[1].sku"),
        ),
        (
            "qty 0",
            json,
            br#"{"order_id":"o-1","items":[{"sku":"sku-001","qty":0}]}"#.to_vec(),
            422,
            Some("items[0].qty"),
        ),
        (
            "huge qty",
            json,
            br#"{"order_id":"o-1","items":[{"sku":"sku-001","qty":1000000000000}]}"#.to_vec(),
            422,
            Some("items[0].qty"),
        ),
        (
            "qty over the limit",
            json,
            br#"{"order_id":"o-1","items":[{"sku":"sku-001","qty":1000001}]}"#.to_vec(),
            422,
            Some("items[0].qty"),
        ),
        (
            "missing items",
            json,
            br#"{"order_id":"o-1"}"#.to_vec(),
            422,
            Some("items"),
        ),
        (
            "missing order id",
            json,
            br#"{"items":[{"sku":"sku-001","qty":1}]}"#.to_vec(),
            422,
            Some("order_id"),
        ),
        (
            "empty items",
            json,
            br#"{"order_id":"o-1","items":[]}"#.to_vec(),
            422,
            Some("items"),
        ),
        (
            "bad order id",
            json,
            br#"{"order_id":"../etc","items":[{"sku":"sku-001","qty":1}]}"#.to_vec(),
            422,
            Some("order_id"),
        ),
        (
            "wrong content type",
            Some("text/plain"),
            br#"{"order_id":"o-1","items":[{"sku":"sku-001","qty":1}]}"#.to_vec(),
            415,
            None,
        ),
        (
            "no content type",
            None,
            br#"{"order_id":"o-1","items":[{"sku":"sku-001","qty":1}]}"#.to_vec(),
            415,
            None,
        ),
    ];
    for (what, ct, body, status, field) in cases {
        let r = raw(&url, "POST", "/reservations", ct, &body).await;
        assert_eq!(r.status, status, "{what}: {}", r.body);
        assert!(
            r.content_type.starts_with("application/problem+json"),
            "{what}: {}",
            r.content_type
        );
        if let Some(field) = field {
            assert_eq!(r.json()["field"], field, "{what}: {}", r.body);
        }
    }
    // Oversize body.
    let mut big = br#"{"order_id":"o-1","items":[{"sku":"sku-001","qty":1}],"pad":""#.to_vec();
    big.extend(std::iter::repeat_n(b'x', inventory::BODY_LIMIT + 10));
    big.extend(b"\"}");
    let r = raw(&url, "POST", "/reservations", json, &big).await;
    assert_eq!(r.status, 413, "{}", r.body);
    // Bad path parameters.
    let r = raw(&url, "POST", "/reservations/bad%20id/release", json, b"{}").await;
    assert_eq!(
        (r.status, r.json()["field"].as_str()),
        (422, Some("order_id"))
    );
    assert_eq!(
        raw(&url, "GET", "/stock/sku-nope", None, b"").await.status,
        404
    );

    assert_eq!(reservations(&store).await, 0);
    assert_eq!(inv.total_units().await.unwrap(), total);
    assert_eq!(inv.available("sku-001").await.unwrap(), Some(10_000));
}
