//! Two services on loopback: "order" calls "payment" **by name** with every layer on.
//!
//! Run with:
//!
//! ```text
//! cargo run --release -p switchyard-rpc --example payment_call
//! ```
//!
//! Expected output (ports and ids vary):
//!
//! ```text
//! payment listening on http://127.0.0.1:41235, registered as "payment"
//! payment: charged order 7 (effect #1) -- answer lost on the way back (503)
//! order: charge succeeded after a retry: {"charged":1200,"effect":1,"order":7}
//! order: same key again -> stored answer, effect #1 (no second charge)
//! payment stopped
//! order: call 1 failed: CircuitOpen
//! order: call 2 failed: CircuitOpen
//! order: call 3 failed: CircuitOpen
//! order: breaker of http://127.0.0.1:41235 is Open
//! ```
//!
//! Call 1 makes up to three attempts (connect errors are retried); the third failure
//! opens the breaker, so call 1 may also end as `Unavailable`. Calls 2 and 3 send
//! nothing. It exits by itself.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::{Next, from_fn, from_fn_with_state};
use axum::response::IntoResponse;
use axum::routing::post;
use serde_json::{Value, json};
use switchyard::store::{MemoryStore, Store};
use switchyard_rpc::breaker::BreakerConfig;
use switchyard_rpc::http::{Json, ServerOptions, router, serve};
use switchyard_rpc::idempotency::{self, Idempotency};
use switchyard_rpc::registry::InProcessRegistry;
use switchyard_rpc::{CallOptions, ClientConfig, HttpClient};

fn payment_app(store: Arc<dyn Store>) -> Router {
    let effects = Arc::new(AtomicUsize::new(0));
    let answers = Arc::new(AtomicUsize::new(0));
    let charge = move |Json(body): Json<Value>| {
        let n = effects.fetch_add(1, Ordering::SeqCst) + 1;
        async move { Json(json!({"order": body["order"], "charged": body["amount"], "effect": n})) }
    };
    // Fault injection: the first answer is lost after the charge was made.
    let lose_first = move |req: Request, next: Next| {
        let answers = answers.clone();
        async move {
            let res = next.run(req).await;
            if answers.fetch_add(1, Ordering::SeqCst) == 0 {
                println!(
                    "payment: charged order 7 (effect #1) -- answer lost on the way back (503)"
                );
                return StatusCode::SERVICE_UNAVAILABLE.into_response();
            }
            res
        }
    };
    let idem = Idempotency::new(store, "payment.charge");
    Router::new().route(
        "/charge",
        post(charge)
            .layer(from_fn_with_state(idem, idempotency::middleware))
            .layer(from_fn(lose_first)),
    )
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let registry = InProcessRegistry::new();

    // The payment service.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let _registration = registry.register("payment", &url);
    let opts = ServerOptions::new("payment");
    opts.health.set_ready(true);
    let app = router(payment_app(Arc::new(MemoryStore::new())), &opts);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, app, async {
        let _ = stopped.await;
    }));
    println!("payment listening on {url}, registered as \"payment\"");

    // The order service's client.
    let cfg = ClientConfig {
        breaker: BreakerConfig {
            failure_threshold: 3,
            failure_rate_percent: 50,
            window: Duration::from_secs(10),
            open_for: Duration::from_secs(5),
        },
        ..ClientConfig::default()
    };
    let client = HttpClient::with_config(Arc::new(registry.clone()), cfg);
    let payment = client.service("payment");
    let call = CallOptions::new()
        .timeout(Duration::from_secs(2))
        .idempotency_key("order-7-charge");
    let body = json!({"order": 7, "amount": 1200});
    let v: Value = payment.post_json_with("/charge", &body, &call).await?;
    println!("order: charge succeeded after a retry: {v}");
    let v: Value = payment.post_json_with("/charge", &body, &call).await?;
    println!(
        "order: same key again -> stored answer, effect #{} (no second charge)",
        v["effect"]
    );

    // Stop payment: connect errors open the breaker, then calls fail fast.
    let _ = stop.send(());
    server.await??;
    println!("payment stopped");
    for i in 1..=3 {
        let r: Result<Value, _> = payment
            .post_json_with(
                "/charge",
                &body,
                &call.clone().idempotency_key(format!("k{i}")),
            )
            .await;
        if let Err(e) = r {
            println!("order: call {i} failed: {:?}", e.kind());
        }
    }
    for (instance, state) in payment.breaker_states() {
        println!("order: breaker of {instance} is {state:?}");
    }
    Ok(())
}
