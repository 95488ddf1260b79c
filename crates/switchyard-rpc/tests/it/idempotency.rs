use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::{Next, from_fn, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};
use switchyard::store::{MemoryStore, Store};
use switchyard_rpc::http::Json;
use switchyard_rpc::idempotency::{self, Idempotency, Record};
use switchyard_rpc::problem::types;
use switchyard_rpc::registry::StaticRegistry;
use switchyard_rpc::{CallOptions, ClientConfig, ErrorKind, HttpClient};
use tokio::sync::{Notify, mpsc};

use crate::support::{Counter, spawn};

fn config() -> ClientConfig {
    ClientConfig {
        backoff_base: Duration::from_millis(5),
        backoff_max: Duration::from_millis(20),
        ..ClientConfig::default()
    }
}

/// A payment service whose handler counts effects; the first answer it gives is "lost"
/// (replaced by a 503 after the work was done and recorded).
fn payment(effects: Counter, seen: Counter, store: Arc<dyn Store>) -> Router {
    let idem = Idempotency::new(store, "payment.charge");
    let lose_first = move |req: Request, next: Next| {
        let seen = seen.clone();
        async move {
            let n = seen.inc();
            let res = next.run(req).await;
            if n == 1 {
                return StatusCode::SERVICE_UNAVAILABLE.into_response();
            }
            res
        }
    };
    Router::new().route(
        "/charge",
        post(move |Json(body): Json<Value>| {
            let n = effects.inc();
            async move { Json(json!({"charged": body["amount"], "effect": n})) }
        })
        .layer(from_fn_with_state(idem, idempotency::middleware))
        .layer(from_fn(lose_first)),
    )
}

#[tokio::test]
async fn retry_with_idempotency_key_applies_the_effect_once() {
    let (effects, seen) = (Counter::default(), Counter::default());
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let s = spawn(payment(effects.clone(), seen.clone(), store.clone())).await;
    let c = HttpClient::with_config(
        Arc::new(StaticRegistry::default().with("payment", &s.url)),
        config(),
    );
    let pay = c.service("payment");
    let opts = CallOptions::new().idempotency_key("order-1-charge");
    let v: Value = pay
        .post_json_with("/charge", &json!({"amount": 12}), &opts)
        .await
        .unwrap();
    assert_eq!(v, json!({"charged": 12, "effect": 1}));
    assert_eq!(seen.get(), 2, "the client retried once");
    assert_eq!(effects.get(), 1, "the effect happened once");
    let rec = Idempotency::new(store, "payment.charge")
        .record("order-1-charge")
        .await
        .unwrap();
    assert!(matches!(rec, Some(Record::Completed { status: 200, .. })));

    // Same key, same body again: the stored answer, no new effect.
    let v: Value = pay
        .post_json_with("/charge", &json!({"amount": 12}), &opts)
        .await
        .unwrap();
    assert_eq!(v["effect"], 1);
    assert_eq!(effects.get(), 1);

    // Same key, different body: 422.
    let e = pay
        .post_json_with::<_, Value>("/charge", &json!({"amount": 13}), &opts)
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::UNPROCESSABLE_ENTITY), "{e}");
    assert_eq!(e.problem().unwrap().type_uri, types::IDEMPOTENCY_MISMATCH);
    assert_eq!(effects.get(), 1);
}

#[tokio::test]
async fn concurrent_duplicate_gets_409() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let idem = Idempotency::new(store, "slow");
    let release = Arc::new(Notify::new());
    let (started_tx, mut started) = mpsc::unbounded_channel::<()>();
    let effects = Counter::default();
    let (r, e) = (release.clone(), effects.clone());
    let app = Router::new().route(
        "/op",
        post(move || {
            let (r, e, tx) = (r.clone(), e.clone(), started_tx.clone());
            async move {
                let _ = tx.send(());
                r.notified().await;
                e.inc();
                Json(json!({"ok": true}))
            }
        })
        .layer(from_fn_with_state(idem, idempotency::middleware)),
    );
    let s = spawn(app).await;
    let c = HttpClient::with_config(
        Arc::new(StaticRegistry::default().with("svc", &s.url)),
        config(),
    );
    let opts = CallOptions::new().idempotency_key("dup");
    let first = {
        let (c, opts) = (c.clone(), opts.clone());
        tokio::spawn(async move {
            c.service("svc")
                .post_json_with::<_, Value>("/op", &json!({}), &opts)
                .await
        })
    };
    started.recv().await.unwrap();
    let e = c
        .service("svc")
        .post_json_with::<_, Value>("/op", &json!({}), &opts)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
    assert_eq!(
        e.problem().unwrap().type_uri,
        types::IDEMPOTENCY_IN_PROGRESS
    );
    release.notify_one();
    assert_eq!(first.await.unwrap().unwrap(), json!({"ok": true}));
    assert_eq!(effects.get(), 1);
}

#[tokio::test]
async fn handler_5xx_releases_the_key_so_a_retry_runs_again() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let idem = Idempotency::new(store, "flaky");
    let calls = Counter::default();
    let c2 = calls.clone();
    let app = Router::new().route(
        "/op",
        post(move || {
            let n = c2.inc();
            async move {
                if n == 1 {
                    Response::builder().status(500).body("boom".into()).unwrap()
                } else {
                    Json(json!({"n": n})).into_response()
                }
            }
        })
        .layer(from_fn_with_state(idem, idempotency::middleware)),
    );
    let s = spawn(app).await;
    let c = HttpClient::with_config(
        Arc::new(StaticRegistry::default().with("svc", &s.url)),
        config(),
    );
    let opts = CallOptions::new().idempotency_key("k");
    let svc = c.service("svc");
    assert!(
        svc.post_json_with::<_, Value>("/op", &json!({}), &opts)
            .await
            .is_err()
    );
    let v: Value = svc.post_json_with("/op", &json!({}), &opts).await.unwrap();
    assert_eq!(v["n"], 2);
}
