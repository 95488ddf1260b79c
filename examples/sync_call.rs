//! # Sync calls: HTTP by service name
//!
//! An `order` service calls `inventory` — two instances registered under one name in an
//! in-process registry — through `switchyard_rpc::HttpClient`, and the toolkit keeps each
//! failure from spreading:
//!
//! 1. **Deadline.** A call with a 500 ms budget: the callee sees what is left of it (the
//!    deadline travels in `x-switchyard-deadline`). A slow call with a 300 ms budget fails
//!    with `DeadlineExceeded`, and the callee's handler is cancelled at the same deadline
//!    instead of working for nobody.
//! 2. **Retry of an idempotent call.** One instance answers a `GET` with 503; the client
//!    retries (backoff with jitter, within the budget) and another attempt answers.
//! 3. **Idempotency-Key.** A `POST /reservations` with a key: the reservation is made, but
//!    the answer is lost (503). The keyed POST is retried, and the idempotency middleware
//!    (backed by a `MemoryStore` both instances share) replays the stored answer instead
//!    of reserving twice. The same lost answer without a key is not retried.
//! 4. **Validation.** A request with a wrong field type is answered with a 422
//!    `application/problem+json` naming the field.
//! 5. **Ejection.** `inventory-2` starts failing every request; after two consecutive
//!    failures the balancer ejects it, and the traffic moves to `inventory-1`.
//! 6. **Circuit breaker.** Both instances stop. The first calls fail with `Unavailable`
//!    (connect errors, retried); once each instance's breaker has seen 3 failures it opens,
//!    and the calls fail fast with `CircuitOpen` without sending anything.
//!
//! Parts 5 and 6 each start a fresh client, so their failure counts start from zero.
//!
//! Run with:
//!
//! ```text
//! cargo run --release --example sync_call
//! ```
//!
//! It exits by itself in under a second, with status 0. Expected output (ports,
//! instance numbers, call counts and times vary: the balancer picks at random); the
//! client's warnings (handler cancelled, instance ejected) go to stderr:
//!
//! ```text
//! inventory-1 listening on http://127.0.0.1:43235
//! inventory-2 listening on http://127.0.0.1:45965
//! 1. deadline
//! inventory-2: GET /stock/widget, 499 ms of the caller's budget left
//! order: widget: 12 available (answered by inventory-2)
//! inventory-1: forecast for widget cancelled at the caller's deadline, 300 ms in
//! order: forecast with a 300 ms budget: DeadlineExceeded after 301 ms
//! 2. retry of an idempotent call
//! inventory-1: GET /stock/gadget -> 503 (injected)
//! inventory-1: GET /stock/gadget, 9981 ms of the caller's budget left
//! order: gadget: 12 available (answered by inventory-1 after a retry)
//! 3. POST with an Idempotency-Key
//! inventory-2: reserved 2 x widget for o-1001 (reservation #1)
//! inventory-2: answer to POST /reservations lost on the way back (503)
//! inventory-1: key o-1001-reserve seen before: stored answer replayed, nothing reserved
//! order: o-1001 reserved: reservation #1; reservations made: 1
//! inventory-2: reserved 1 x gadget for o-1002 (reservation #2)
//! inventory-2: answer to POST /reservations lost on the way back (503)
//! order: o-1002 without a key: Unavailable, not retried (was it reserved? the caller cannot tell)
//! 4. validation
//! order: bad request: 422 https://switchyard.dev/problems/validation, field `qty`: invalid type: string "two", expected u32 at line 1 column 32
//! 5. ejection
//! inventory-2: GET /stock/widget -> 503 (unhealthy)
//! inventory-2: GET /stock/widget -> 503 (unhealthy)
//! order: inventory-2 failed 2 calls in a row and was ejected; 3 calls so far, all answered
//! order: the next 5 calls were answered by inventory-1 x5
//! 6. circuit breaker
//! inventory stopped (both instances; the registry still lists them)
//! order: call 1: Unavailable after 44 ms
//! order: call 2: Unavailable after 34 ms
//! order: call 3: CircuitOpen after 7.4 µs, nothing sent
//! order: call 4: CircuitOpen after 0.9 µs, nothing sent
//! order: breakers: inventory-1 Open, inventory-2 Open
//! ```
//!
//! `RUST_LOG=debug` also shows the client's retries on stderr.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::{Next, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};
use switchyard::store::{MemoryStore, Store};
use switchyard_rpc::balance::BalanceConfig;
use switchyard_rpc::breaker::BreakerConfig;
use switchyard_rpc::context::IDEMPOTENCY_HEADER;
use switchyard_rpc::http::{Json, ServerOptions, router, serve};
use switchyard_rpc::idempotency::{self, Idempotency, REPLAYED_HEADER};
use switchyard_rpc::registry::{InProcessRegistry, Registration};
use switchyard_rpc::{CallContext, CallOptions, ClientConfig, ErrorKind, HttpClient, Problem};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing_subscriber::EnvFilter;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Fault switches and counters shared by both inventory instances.
#[derive(Default)]
struct Faults {
    /// Print a line for every stock lookup.
    verbose: AtomicBool,
    /// The next N requests (whichever instance gets them) answer 503 before any work.
    fail_next: AtomicUsize,
    /// The next N POST answers are lost after the work was done (replaced by a 503).
    lose_next: AtomicUsize,
    /// Reservations made (the effect that must not be duplicated).
    reservations: AtomicUsize,
}

fn take_one(n: &AtomicUsize) -> bool {
    n.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1))
        .is_ok()
}

/// One inventory instance.
struct Inventory {
    name: &'static str,
    /// Answers every request with 503 while set.
    unhealthy: AtomicBool,
    /// Requests answered with 503 because of `unhealthy`.
    failures: AtomicUsize,
    faults: Arc<Faults>,
}

fn unavailable() -> Response {
    Problem::new(
        "https://switchyard.dev/problems/unavailable",
        StatusCode::SERVICE_UNAVAILABLE,
        "Unavailable",
    )
    .into_response()
}

/// Fault injection around the whole app: 503s before the work, lost answers after it,
/// and a line when the idempotency middleware replays a stored answer.
async fn faults(State(inv): State<Arc<Inventory>>, req: Request, next: Next) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    if inv.unhealthy.load(Ordering::SeqCst) {
        inv.failures.fetch_add(1, Ordering::SeqCst);
        println!("{}: {method} {path} -> 503 (unhealthy)", inv.name);
        return unavailable();
    }
    if take_one(&inv.faults.fail_next) {
        println!("{}: {method} {path} -> 503 (injected)", inv.name);
        return unavailable();
    }
    let key = req
        .headers()
        .get(IDEMPOTENCY_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let lose = method == Method::POST && take_one(&inv.faults.lose_next);
    let res = next.run(req).await;
    if res.headers().contains_key(REPLAYED_HEADER) {
        println!(
            "{}: key {} seen before: stored answer replayed, nothing reserved",
            inv.name,
            key.as_deref().unwrap_or("?")
        );
    }
    if lose {
        println!(
            "{}: answer to {method} {path} lost on the way back (503)",
            inv.name
        );
        return unavailable();
    }
    res
}

async fn stock(
    State(inv): State<Arc<Inventory>>,
    ctx: CallContext,
    Path(sku): Path<String>,
) -> Json<Value> {
    if inv.faults.verbose.load(Ordering::SeqCst) {
        let left = ctx.remaining().unwrap_or_default().as_millis();
        println!(
            "{}: GET /stock/{sku}, {left} ms of the caller's budget left",
            inv.name
        );
    }
    Json(json!({"sku": sku, "available": 12, "instance": inv.name}))
}

/// Prints a line if the handler is dropped before it finished (cancelled at the deadline).
struct CancelNotice {
    name: &'static str,
    sku: String,
    started: Instant,
    finished: bool,
}

impl Drop for CancelNotice {
    fn drop(&mut self) {
        if !self.finished {
            println!(
                "{}: forecast for {} cancelled at the caller's deadline, {} ms in",
                self.name,
                self.sku,
                self.started.elapsed().as_millis()
            );
        }
    }
}

/// A slow lookup (2 s): only finishes if the caller waits that long.
async fn forecast(State(inv): State<Arc<Inventory>>, Path(sku): Path<String>) -> Json<Value> {
    let mut notice = CancelNotice {
        name: inv.name,
        sku: sku.clone(),
        started: Instant::now(),
        finished: false,
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    notice.finished = true;
    Json(json!({"sku": sku, "next_week": 40}))
}

#[derive(Deserialize)]
struct Reserve {
    order_id: String,
    sku: String,
    qty: u32,
}

async fn reserve(State(inv): State<Arc<Inventory>>, Json(r): Json<Reserve>) -> Json<Value> {
    let n = inv.faults.reservations.fetch_add(1, Ordering::SeqCst) + 1;
    println!(
        "{}: reserved {} x {} for {} (reservation #{n})",
        inv.name, r.qty, r.sku, r.order_id
    );
    Json(json!({"order_id": r.order_id, "reservation": n, "instance": inv.name}))
}

fn inventory_app(inv: Arc<Inventory>, store: Arc<dyn Store>) -> Router {
    let idem = Idempotency::new(store, "inventory.reserve");
    Router::new()
        .route("/stock/{sku}", get(stock))
        .route("/stock/{sku}/forecast", get(forecast))
        .route(
            "/reservations",
            post(reserve).layer(from_fn_with_state(idem, idempotency::middleware)),
        )
        .layer(from_fn_with_state(inv.clone(), faults))
        .with_state(inv)
}

/// A running inventory instance.
struct Running {
    inv: Arc<Inventory>,
    url: String,
    stop: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
    /// Kept after the instance stops: a registry can list an instance that is down.
    registration: Registration,
}

async fn start_inventory(
    name: &'static str,
    faults: Arc<Faults>,
    store: Arc<dyn Store>,
    registry: &InProcessRegistry,
) -> Result<Running, BoxError> {
    let inv = Arc::new(Inventory {
        name,
        unhealthy: AtomicBool::new(false),
        failures: AtomicUsize::new(0),
        faults,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let opts = ServerOptions::new(name);
    opts.health.set_ready(true);
    let app = router(inventory_app(inv.clone(), store), &opts);
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(listener, app, async {
        let _ = stopped.await;
    }));
    let registration = registry.register("inventory", &url);
    println!("{name} listening on {url}");
    Ok(Running {
        inv,
        url,
        stop,
        task,
        registration,
    })
}

fn config() -> ClientConfig {
    ClientConfig {
        backoff_base: Duration::from_millis(20),
        backoff_max: Duration::from_millis(100),
        ..ClientConfig::default()
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_target(false)
        .without_time()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();

    let registry = InProcessRegistry::new();
    let faults = Arc::new(Faults::default());
    // One idempotency store for the service, shared by its instances.
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let instances = [
        start_inventory("inventory-1", faults.clone(), store.clone(), &registry).await?,
        start_inventory("inventory-2", faults.clone(), store.clone(), &registry).await?,
    ];
    let names: HashMap<String, &str> = instances
        .iter()
        .map(|r| (r.url.clone(), r.inv.name))
        .collect();

    let client = HttpClient::with_config(Arc::new(registry.clone()), config());
    let inventory = client.service("inventory");

    println!("1. deadline");
    faults.verbose.store(true, Ordering::SeqCst);
    let v: Value = inventory
        .get_json_with(
            "/stock/widget",
            &CallOptions::new().timeout(Duration::from_millis(500)),
        )
        .await?;
    println!(
        "order: widget: {} available (answered by {})",
        v["available"],
        v["instance"].as_str().unwrap_or("?")
    );
    let t0 = Instant::now();
    let r = inventory
        .get_json_with::<Value>(
            "/stock/widget/forecast",
            &CallOptions::new().timeout(Duration::from_millis(300)),
        )
        .await;
    let took = t0.elapsed().as_millis();
    // Let the callee's cancellation line come first.
    tokio::time::sleep(Duration::from_millis(20)).await;
    match r {
        Err(e) => println!(
            "order: forecast with a 300 ms budget: {:?} after {took} ms",
            e.kind()
        ),
        Ok(v) => return Err(format!("the slow call was expected to time out, got {v}").into()),
    }

    println!("2. retry of an idempotent call");
    faults.fail_next.store(1, Ordering::SeqCst);
    let v: Value = inventory.get_json("/stock/gadget").await?;
    println!(
        "order: gadget: {} available (answered by {} after a retry)",
        v["available"],
        v["instance"].as_str().unwrap_or("?")
    );
    faults.verbose.store(false, Ordering::SeqCst);

    println!("3. POST with an Idempotency-Key");
    faults.lose_next.store(1, Ordering::SeqCst);
    let body = json!({"order_id": "o-1001", "sku": "widget", "qty": 2});
    let keyed = CallOptions::new().idempotency_key("o-1001-reserve");
    let v: Value = inventory
        .post_json_with("/reservations", &body, &keyed)
        .await?;
    println!(
        "order: o-1001 reserved: reservation #{}; reservations made: {}",
        v["reservation"],
        faults.reservations.load(Ordering::SeqCst)
    );
    faults.lose_next.store(1, Ordering::SeqCst);
    let body = json!({"order_id": "o-1002", "sku": "gadget", "qty": 1});
    match inventory
        .post_json::<_, Value>("/reservations", &body)
        .await
    {
        Err(e) => println!(
            "order: o-1002 without a key: {:?}, not retried (was it reserved? the caller cannot tell)",
            e.kind()
        ),
        Ok(v) => return Err(format!("the lost answer was expected to fail, got {v}").into()),
    }

    println!("4. validation");
    let bad = json!({"order_id": "o-1003", "sku": "widget", "qty": "two"});
    match inventory.post_json::<_, Value>("/reservations", &bad).await {
        Err(e) => {
            let p = e.problem().ok_or("a 4xx without a problem document")?;
            println!(
                "order: bad request: {} {}, field `{}`: {}",
                p.status,
                p.type_uri,
                p.extension_str("field").unwrap_or("?"),
                p.detail.as_deref().unwrap_or("")
            );
        }
        Ok(v) => return Err(format!("the bad request was expected to fail, got {v}").into()),
    }

    println!("5. ejection");
    let cfg = ClientConfig {
        balance: BalanceConfig {
            eject_after: 2,
            base_ejection: Duration::from_secs(3),
            max_ejection: Duration::from_secs(30),
        },
        ..config()
    };
    let inventory = HttpClient::with_config(Arc::new(registry.clone()), cfg).service("inventory");
    let sick = instances[1].inv.clone();
    sick.unhealthy.store(true, Ordering::SeqCst);
    // A call that lands on inventory-2 gets a 503 and is retried; the balancer counts
    // inventory-2's consecutive failures and ejects it at the second.
    let mut calls = 0;
    while sick.failures.load(Ordering::SeqCst) < 2 {
        if calls == 50 {
            return Err("inventory-2 was picked fewer than 2 times in 50 calls".into());
        }
        let _: Value = inventory.get_json("/stock/widget").await?;
        calls += 1;
    }
    println!(
        "order: inventory-2 failed 2 calls in a row and was ejected; {calls} calls so far, all answered"
    );
    let mut answered = Vec::new();
    for _ in 0..5 {
        let v: Value = inventory.get_json("/stock/widget").await?;
        answered.push(v["instance"].as_str().unwrap_or("?").to_string());
    }
    if answered.iter().all(|a| a == "inventory-1") {
        println!("order: the next 5 calls were answered by inventory-1 x5");
    } else {
        println!(
            "order: the next 5 calls were answered by {}",
            answered.join(", ")
        );
    }

    println!("6. circuit breaker");
    let mut registrations = Vec::new();
    for r in instances {
        let _ = r.stop.send(());
        r.task.await??;
        registrations.push(r.registration);
    }
    println!("inventory stopped (both instances; the registry still lists them)");
    let cfg = ClientConfig {
        breaker: BreakerConfig {
            failure_threshold: 3,
            failure_rate_percent: 50,
            window: Duration::from_secs(10),
            open_for: Duration::from_secs(5),
        },
        ..config()
    };
    let client = HttpClient::with_config(Arc::new(registry.clone()), cfg);
    let inventory = client.service("inventory");
    let mut fast_failures = 0;
    for i in 1..=10 {
        let t0 = Instant::now();
        let r = inventory.get_json::<Value>("/stock/widget").await;
        let took = t0.elapsed();
        let Err(e) = r else {
            return Err("inventory is stopped; the call was expected to fail".into());
        };
        let took = if took < Duration::from_millis(1) {
            format!("{:.1} µs", took.as_secs_f64() * 1e6)
        } else {
            format!("{} ms", took.as_millis())
        };
        if e.kind() == ErrorKind::CircuitOpen {
            println!("order: call {i}: CircuitOpen after {took}, nothing sent");
            fast_failures += 1;
            if fast_failures == 2 {
                break;
            }
        } else {
            println!("order: call {i}: {:?} after {took}", e.kind());
        }
    }
    let mut states: Vec<String> = client
        .breaker_states()
        .into_iter()
        .map(|(_, url, state)| format!("{} {state:?}", names.get(&url).copied().unwrap_or("?")))
        .collect();
    states.sort();
    println!("order: breakers: {}", states.join(", "));
    drop(registrations);
    Ok(())
}
