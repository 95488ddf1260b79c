use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use switchyard_rpc::http::{Json, ServerOptions};
use switchyard_rpc::problem::{PROBLEM_JSON, types};

use crate::support::{raw, raw_chunked, spawn, spawn_with};

#[derive(Debug, Deserialize, Serialize)]
struct Charge {
    order: u64,
    amount: u64,
}

fn app() -> Router {
    Router::new().route(
        "/charge",
        post(|Json(c): Json<Charge>| async move { Json(c) }),
    )
}

const JSON: (&str, &str) = ("content-type", "application/json");

#[tokio::test]
async fn bad_json_is_400_problem_with_position() {
    let s = spawn(app()).await;
    let r = raw(
        s.addr,
        "POST",
        "/charge",
        &[JSON],
        b"{\"order\": 1,\n \"amount\": }",
    )
    .await;
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.content_type().starts_with(PROBLEM_JSON));
    let p = r.json();
    assert_eq!(p["type"], types::MALFORMED);
    assert_eq!(p["line"], 2);
    assert!(p["column"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn missing_and_invalid_fields_are_422_naming_the_field() {
    let s = spawn(app()).await;
    let r = raw(s.addr, "POST", "/charge", &[JSON], br#"{"order": 1}"#).await;
    assert_eq!(r.status, 422, "{r:?}");
    assert!(r.content_type().starts_with(PROBLEM_JSON));
    assert_eq!(r.json()["field"], "amount");
    assert_eq!(r.json()["type"], types::VALIDATION);
    let r = raw(
        s.addr,
        "POST",
        "/charge",
        &[JSON],
        br#"{"order": 1, "amount": "ten"}"#,
    )
    .await;
    assert_eq!(
        (r.status, r.json()["field"].as_str()),
        (422, Some("amount"))
    );
}

#[tokio::test]
async fn oversize_body_is_413_problem_and_wrong_media_type_415() {
    let mut opts = ServerOptions::new("test");
    opts.body_limit = 1024;
    let s = spawn_with(app(), &opts).await;
    let big = format!(
        r#"{{"order": 1, "amount": 2, "pad": "{}"}}"#,
        "x".repeat(4096)
    );
    let r = raw(s.addr, "POST", "/charge", &[JSON], big.as_bytes()).await;
    assert_eq!(r.status, 413, "{r:?}");
    assert!(r.content_type().starts_with(PROBLEM_JSON));
    assert_eq!(r.json()["type"], types::TOO_LARGE);
    let r = raw(
        s.addr,
        "POST",
        "/charge",
        &[("content-type", "text/plain")],
        b"{}",
    )
    .await;
    assert_eq!(r.status, 415);
    assert!(r.content_type().starts_with(PROBLEM_JSON));
    // Unknown route and wrong method: problem+json too, never a 500.
    let r = raw(s.addr, "GET", "/nope", &[], b"").await;
    assert_eq!(r.status, 404);
    assert!(r.content_type().starts_with(PROBLEM_JSON));
    let r = raw(s.addr, "GET", "/charge", &[], b"").await;
    assert_eq!(r.status, 405);
    assert!(r.content_type().starts_with(PROBLEM_JSON));
}

/// A body sent without a length (chunked) is counted as it is read: over the limit it is
/// a 413 problem too, through `Json` and through a handler taking plain `Bytes`; one under
/// the limit is served.
#[tokio::test]
async fn oversize_chunked_body_is_413_problem_and_a_small_one_is_served() {
    let mut opts = ServerOptions::new("test");
    opts.body_limit = 1024;
    let app = app().route(
        "/bytes",
        post(|b: axum::body::Bytes| async move { b.len().to_string() }),
    );
    let s = spawn_with(app, &opts).await;
    let big = format!(
        r#"{{"order": 1, "amount": 2, "pad": "{}"}}"#,
        "x".repeat(4096)
    );
    for path in ["/charge", "/bytes"] {
        let r = raw_chunked(s.addr, path, &[JSON], big.as_bytes()).await;
        assert_eq!(r.status, 413, "{path}: {r:?}");
        assert!(r.content_type().starts_with(PROBLEM_JSON), "{path}: {r:?}");
        assert_eq!(r.json()["type"], types::TOO_LARGE, "{path}");
    }
    let r = raw_chunked(s.addr, "/charge", &[JSON], br#"{"order": 1, "amount": 2}"#).await;
    assert_eq!(
        (r.status, r.json()["amount"].as_u64()),
        (200, Some(2)),
        "{r:?}"
    );
    let r = raw_chunked(s.addr, "/bytes", &[], &[b'x'; 1000]).await;
    assert_eq!((r.status, r.body.as_str()), (200, "1000"), "{r:?}");
}

#[tokio::test]
async fn healthz_and_readyz() {
    let opts = ServerOptions::new("test");
    let s = spawn_with(Router::new(), &opts).await;
    assert_eq!(raw(s.addr, "GET", "/healthz", &[], b"").await.status, 200);
    let r = raw(s.addr, "GET", "/readyz", &[], b"").await;
    assert_eq!(r.status, 503);
    assert!(r.content_type().starts_with(PROBLEM_JSON));
    opts.health.set_ready(true);
    assert_eq!(raw(s.addr, "GET", "/readyz", &[], b"").await.status, 200);
}

#[tokio::test]
async fn server_cancels_the_handler_at_the_propagated_deadline() {
    let done = crate::support::Counter::default();
    let d = done.clone();
    let app = Router::new().route(
        "/slow",
        get(move || {
            let d = d.clone();
            async move {
                tokio::time::sleep(Duration::from_secs(30)).await;
                d.inc();
                "late"
            }
        }),
    );
    let s = spawn(app).await;
    let deadline = switchyard_rpc::context::unix_millis(std::time::SystemTime::now()) + 200;
    let r = raw(
        s.addr,
        "GET",
        "/slow",
        &[("x-switchyard-deadline", &deadline.to_string())],
        b"",
    )
    .await;
    assert_eq!(r.status, 504, "{r:?}");
    assert_eq!(r.json()["type"], types::DEADLINE_EXCEEDED);
    assert_eq!(done.get(), 0);
    // A deadline already passed: not run at all.
    let r = raw(
        s.addr,
        "GET",
        "/slow",
        &[("x-switchyard-deadline", "1000")],
        b"",
    )
    .await;
    assert_eq!(r.status, 504);
}
