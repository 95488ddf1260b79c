//! Fault injection: error rate, downtime, latency — on REST and gRPC services.

use std::sync::Arc;
use std::time::{Duration, Instant};

use shop::faults::FaultStatus;
use shop::model::ChargeRequest;
use shop::services::ErrorClass;
use shop::services::inventory::{self, InventoryClient, InventoryError};
use shop::services::payment::{self, PaymentClient, PaymentError};
use switchyard_rpc::grpc::GrpcClient;
use switchyard_rpc::{CallOptions, ErrorKind, HttpClient};

use crate::support::{Harness, client_config, listener, raw};

async fn set(url: &str, body: &str) -> FaultStatus {
    let r = raw(
        url,
        "POST",
        "/admin/fault",
        Some("application/json"),
        body.as_bytes(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    serde_json::from_str(&r.body).unwrap()
}

#[tokio::test]
async fn rest_error_rate_down_and_latency() {
    let mut h = Harness::new();
    let running = inventory::start(h.store("inventory"), listener().await, h.shutdown())
        .await
        .unwrap();
    h.register(inventory::SERVICE, &running);
    let url = running.url.clone();
    // A fresh client per phase: breakers opened by one phase don't leak into the next.
    let client = || {
        InventoryClient::new(&HttpClient::with_config(
            Arc::new(h.registry.clone()),
            client_config(),
        ))
    };

    // Error rate 1.0: every call is a 503 problem; health and admin still answer.
    set(&url, r#"{"error_rate": 1.0}"#).await;
    let r = raw(&url, "GET", "/stock/sku-001", None, b"").await;
    assert_eq!(r.status, 503);
    assert!(r.content_type.starts_with("application/problem+json"));
    assert_eq!(r.json()["type"], shop::faults::UNAVAILABLE);
    assert_eq!(raw(&url, "GET", "/healthz", None, b"").await.status, 200);
    assert_eq!(raw(&url, "GET", "/readyz", None, b"").await.status, 200);
    match client().stock("sku-001", &CallOptions::new()).await {
        Err(e @ InventoryError::Call(_)) => {
            assert_eq!(e.class(), ErrorClass::Unavailable, "{e}");
            let InventoryError::Call(e) = e else {
                unreachable!()
            };
            assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
            assert_eq!(e.status(), Some(http::StatusCode::SERVICE_UNAVAILABLE));
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    let r = raw(&url, "DELETE", "/admin/fault", None, b"").await;
    assert_eq!(r.status, 200);
    assert!(
        client()
            .stock("sku-001", &CallOptions::new())
            .await
            .unwrap()
            .is_some()
    );

    // Down for 300 ms, then up again.
    let status = set(&url, r#"{"down_ms": 300}"#).await;
    assert!(status.down_remaining_ms > 0 && status.down_remaining_ms <= 300);
    assert_eq!(
        raw(&url, "GET", "/stock/sku-001", None, b"").await.status,
        503
    );
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(
        raw(&url, "GET", "/stock/sku-001", None, b"").await.status,
        200
    );
    assert!(
        client()
            .stock("sku-001", &CallOptions::new())
            .await
            .unwrap()
            .is_some()
    );

    // Latency.
    set(&url, r#"{"latency_ms": 200}"#).await;
    let t = Instant::now();
    client()
        .stock("sku-001", &CallOptions::new())
        .await
        .unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(200),
        "{:?}",
        t.elapsed()
    );
    let r = raw(&url, "GET", "/admin/fault", None, b"").await;
    assert_eq!(r.json()["latency_ms"], 200);

    // Bad settings.
    let r = raw(
        &url,
        "POST",
        "/admin/fault",
        Some("application/json"),
        br#"{"error_rate": 2}"#,
    )
    .await;
    assert_eq!(
        (r.status, r.json()["field"].as_str()),
        (422, Some("error_rate"))
    );
}

#[tokio::test]
async fn grpc_error_rate_and_down() {
    let mut h = Harness::new();
    let running = payment::start(h.store("payment"), listener().await, h.shutdown())
        .await
        .unwrap();
    h.register(payment::SERVICE, &running);
    let url = running.url.clone();
    let client = || {
        PaymentClient::new(&GrpcClient::with_config(
            Arc::new(h.registry.clone()),
            client_config(),
        ))
    };
    let req = ChargeRequest {
        order_id: "o-1".into(),
        customer: "ann".into(),
        amount_cents: 100,
        payment_token: "tok".into(),
    };
    let opts = CallOptions::new().idempotency_key("o-1:charge");

    // The admin routes answer HTTP/1.1 on the gRPC port.
    set(&url, r#"{"error_rate": 1.0}"#).await;
    match client().charge(&req, &opts).await {
        Err(PaymentError::Call(e)) => {
            assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
            assert_eq!(
                e.grpc_status().map(|s| s.code()),
                Some(tonic::Code::Unavailable)
            );
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    set(&url, r#"{"down_ms": 300}"#).await;
    assert!(matches!(
        client().charge(&req, &opts).await,
        Err(PaymentError::Call(_))
    ));
    tokio::time::sleep(Duration::from_millis(350)).await;
    let ok = client().charge(&req, &opts).await.unwrap();
    assert_eq!(ok.amount_cents, 100);

    set(&url, r#"{"latency_ms": 150}"#).await;
    let t = Instant::now();
    assert_eq!(
        client().charge(&req, &opts).await.unwrap().charge_id,
        ok.charge_id
    );
    assert!(t.elapsed() >= Duration::from_millis(150));
}
