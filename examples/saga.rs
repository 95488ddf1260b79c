//! # Sagas: placing an order across three services
//!
//! The `order` service places orders with a saga of three steps, each a different kind
//! of action, each with an idempotency key (`<saga id>/<step>/<phase>`) it hands to the
//! callee:
//!
//! | step | action | compensation |
//! | --- | --- | --- |
//! | `reserve` | request/reply over the embedded bus to `inventory` | `release`, the same way |
//! | `charge` | HTTP `POST /charges` to `payment`, by service name | `POST /refunds` |
//! | `ship` | local code in `order` | — |
//!
//! 1. `o-1` goes through: reserved, charged (the first call meets a 503; the HTTP client
//!    retries it — the idempotency key makes a POST retryable — and the card is charged
//!    once), shipped.
//! 2. `o-2` is declined by `payment` (a 402: final, not retried): the reservation is
//!    released — exactly the completed steps are compensated, in reverse order.
//! 3. `o-3` has no shipping address: `ship` fails after the charge, so the refund and the
//!    release run — but `payment` refuses refunds for a while, the refund's retries run
//!    out (and the client's circuit breaker for `payment` opens), and the saga stops in
//!    `needs_attention` with the error, visible. The operator fixes `payment`, waits for
//!    the breaker to let a probe through, and retries the saga: it finishes, compensated.
//!
//! Every transition is committed to `order`'s embedded store before the next action
//! starts; killed at any point, the orchestrator resumes each saga from its last
//! transition when it runs again (the conformance suite does exactly that with SIGKILL).
//!
//! Run with:
//!
//! ```text
//! cargo run --release --example saga
//! ```
//!
//! Expected output (ports and timings vary):
//!
//! ```text
//! payment listening on http://127.0.0.1:40505
//! inventory: reserve 2 × lamp for o-1 (stock 10 → 8)
//! payment: 503 for o-1 (injected)
//! payment: charged 4000 for o-1
//! order: shipped o-1
//! o-1: completed
//!   started
//!   step done       reserve  1 attempt      0.6 ms
//!   step done       charge   1 attempt     20.1 ms
//!   step done       ship     1 attempt      0.3 ms
//!   completed
//! inventory: reserve 1 × lamp for o-2 (stock 8 → 7)
//! payment: declined 90000 for o-2
//! inventory: release 1 × lamp for o-2 (stock 7 → 8)
//! o-2: compensated (payment declined: 90000 is over the 50000 limit)
//!   started
//!   step done       reserve  1 attempt      0.7 ms
//!   step failed     charge   1 attempt      0.4 ms
//!   compensating    reserve
//!   compensated     reserve  1 attempt      2.5 ms
//!   all compensated
//! inventory: reserve 1 × lamp for o-3 (stock 8 → 7)
//! payment: charged 2000 for o-3
//! o-3: needs_attention (circuit open for every instance of `payment`; next probe in 272.518686ms (after 3 attempts))
//!   started
//!   step done       reserve  1 attempt      0.5 ms
//!   step done       charge   1 attempt      0.4 ms
//!   step failed     ship     1 attempt      0.0 ms
//!   compensating    charge
//!   needs attention charge   3 attempts    64.5 ms
//! operator: 1 saga(s) need attention: ["o-3"]
//! operator: payment fixed, retrying o-3
//! payment: refunded 2000 for o-3
//! inventory: release 1 × lamp for o-3 (stock 7 → 8)
//! o-3: compensated (o-3 has no shipping address)
//!   started
//!   step done       reserve  1 attempt      0.5 ms
//!   step done       charge   1 attempt      0.4 ms
//!   step failed     ship     1 attempt      0.0 ms
//!   compensating    charge
//!   needs attention charge   3 attempts    64.5 ms
//!   operator retry
//!   compensated     charge   1 attempt      0.7 ms
//!   compensating    reserve
//!   compensated     reserve  1 attempt      0.6 ms
//!   all compensated
//! sagas: 1 completed, 2 compensated, 0 need attention; lamp stock 8; payment: charged 6000, refunded 2000
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::{Deserialize, Serialize};
use switchyard::reply::{RequestError, RequestOptions, Requester};
use switchyard::router::{Context, HandlerError, Router};
use switchyard::saga::{
    Orchestrator, Saga, SagaRecord, Step, StepContext, StepError, StepPolicy, TransitionKind,
};
use switchyard::store::{MemoryStore, Store, Table, Txn, transact};
use switchyard::{Bus, Event};
use switchyard_embedded::{EmbeddedBus, EmbeddedStore, StoreConfig};
use switchyard_rpc::breaker::BreakerConfig;
use switchyard_rpc::http::{Json, ServerOptions, router, serve};
use switchyard_rpc::idempotency::{self, Idempotency};
use switchyard_rpc::registry::InProcessRegistry;
use switchyard_rpc::{CallOptions, ClientConfig, ErrorKind, HttpClient, Problem};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

// ---------------------------------------------------------------- the saga's input

/// What the order service asks for.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PlaceOrder {
    order_id: String,
    sku: String,
    qty: u32,
    cents: u64,
    address: Option<String>,
}

// ---------------------------------------------------------------- inventory (bus)

const INVENTORY: &str = "inventory.requests";
const STOCK: Table<u32> = Table::new("stock");

#[derive(Serialize, Deserialize)]
struct Reserve {
    order_id: String,
    sku: String,
    qty: u32,
}
impl Event for Reserve {
    const TYPE: &'static str = "inventory.reserve.v1";
}

#[derive(Serialize, Deserialize)]
struct Release {
    order_id: String,
    sku: String,
    qty: u32,
}
impl Event for Release {
    const TYPE: &'static str = "inventory.release.v1";
}

#[derive(Debug, Serialize, Deserialize)]
struct Stock {
    sku: String,
    left: u32,
}
impl Event for Stock {
    const TYPE: &'static str = "inventory.stock.v1";
}

fn inventory(bus: Arc<dyn Bus>, store: Arc<dyn Store>) -> Router {
    let mut router = Router::new("inventory", bus, store);
    router.respond(
        INVENTORY,
        "inventory",
        |ctx: Context, r: Reserve| async move {
            let stock = ctx.txn.get(&STOCK, &r.sku).await?.unwrap_or(0);
            if stock < r.qty {
                return Err(HandlerError::dead_letter(format!(
                    "only {stock} × {} left",
                    r.sku
                )));
            }
            let left = stock - r.qty;
            println!(
                "inventory: reserve {} × {} for {} (stock {stock} → {left})",
                r.qty, r.sku, r.order_id
            );
            ctx.txn.put(&STOCK, &r.sku, &left)?;
            Ok(Stock { sku: r.sku, left })
        },
    );
    router.respond(
        INVENTORY,
        "inventory",
        |ctx: Context, r: Release| async move {
            let stock = ctx.txn.get(&STOCK, &r.sku).await?.unwrap_or(0);
            let left = stock + r.qty;
            println!(
                "inventory: release {} × {} for {} (stock {stock} → {left})",
                r.qty, r.sku, r.order_id
            );
            ctx.txn.put(&STOCK, &r.sku, &left)?;
            Ok::<_, HandlerError>(Stock { sku: r.sku, left })
        },
    );
    router
}

// ---------------------------------------------------------------- payment (HTTP)

const LIMIT_CENTS: u64 = 50_000;
/// How long `order`'s circuit breaker stays open after `payment` kept failing.
const BREAKER_OPEN_FOR: Duration = Duration::from_millis(300);

#[derive(Default)]
struct Payment {
    charged: Mutex<HashMap<String, u64>>,
    refunded: Mutex<HashMap<String, u64>>,
    /// The next N charges answer 503 before doing anything.
    fail_charges: AtomicUsize,
    /// While set, refunds answer 503.
    refunds_down: AtomicBool,
}

#[derive(Serialize, Deserialize)]
struct Charge {
    order_id: String,
    cents: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Receipt {
    order_id: String,
    cents: u64,
}

fn problem(status: StatusCode, title: &str) -> Response {
    Problem::new(
        format!(
            "https://switchyard.dev/problems/{}",
            title.to_lowercase().replace(' ', "-")
        ),
        status,
        title,
    )
    .into_response()
}

async fn charge(State(p): State<Arc<Payment>>, Json(c): Json<Charge>) -> Response {
    if p.fail_charges
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        println!("payment: 503 for {} (injected)", c.order_id);
        return problem(StatusCode::SERVICE_UNAVAILABLE, "Unavailable");
    }
    if c.cents > LIMIT_CENTS {
        println!("payment: declined {} for {}", c.cents, c.order_id);
        return Problem::new(
            "https://switchyard.dev/problems/declined",
            StatusCode::PAYMENT_REQUIRED,
            "Declined",
        )
        .with_detail(format!(
            "payment declined: {} is over the {LIMIT_CENTS} limit",
            c.cents
        ))
        .into_response();
    }
    println!("payment: charged {} for {}", c.cents, c.order_id);
    *p.charged
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(c.order_id.clone())
        .or_default() += c.cents;
    Json(Receipt {
        order_id: c.order_id,
        cents: c.cents,
    })
    .into_response()
}

async fn refund(State(p): State<Arc<Payment>>, Json(c): Json<Charge>) -> Response {
    if p.refunds_down.load(Ordering::SeqCst) {
        return problem(StatusCode::SERVICE_UNAVAILABLE, "Refunds Unavailable");
    }
    println!("payment: refunded {} for {}", c.cents, c.order_id);
    *p.refunded
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(c.order_id.clone())
        .or_default() += c.cents;
    Json(Receipt {
        order_id: c.order_id,
        cents: c.cents,
    })
    .into_response()
}

fn payment_app(p: Arc<Payment>, store: Arc<dyn Store>) -> axum::Router {
    let charges = Idempotency::new(store.clone(), "payment.charges");
    let refunds = Idempotency::new(store, "payment.refunds");
    axum::Router::new()
        .route(
            "/charges",
            post(charge).layer(from_fn_with_state(charges, idempotency::middleware)),
        )
        .route(
            "/refunds",
            post(refund).layer(from_fn_with_state(refunds, idempotency::middleware)),
        )
        .with_state(p)
}

// ---------------------------------------------------------------- order (the saga)

const SHIPMENTS: Table<String> = Table::new("shipments");

/// A failed call as a saga step sees it: a refusal is final, the rest is worth retrying.
fn step_error(e: switchyard_rpc::Error) -> StepError {
    let detail = e
        .problem()
        .and_then(|p| p.detail.clone())
        .unwrap_or_else(|| e.to_string());
    match e.kind() {
        ErrorKind::Rejected | ErrorKind::InvalidInput | ErrorKind::NotFound => {
            StepError::failed(detail)
        }
        _ => StepError::retryable(detail),
    }
}

fn request_error(e: RequestError) -> StepError {
    if e.is_retryable() {
        StepError::retryable(e)
    } else {
        StepError::failed(e)
    }
}

fn place_order(
    requester: Arc<Requester>,
    payment: HttpClient,
    store: Arc<dyn Store>,
) -> Saga<PlaceOrder> {
    let (r1, r2) = (requester.clone(), requester);
    let (p1, p2) = (payment.clone(), payment);
    let ask = |cx: &StepContext<PlaceOrder>| {
        RequestOptions::new(Duration::from_secs(2)).idempotency_key(cx.idempotency_key())
    };
    Saga::new("place_order")
        .step(
            Step::new("reserve", move |cx: StepContext<PlaceOrder>| {
                let requester = r1.clone();
                async move {
                    let o = cx.input();
                    let reserve = Reserve {
                        order_id: o.order_id.clone(),
                        sku: o.sku.clone(),
                        qty: o.qty,
                    };
                    let stock: Stock = requester
                        .request_with(INVENTORY, &reserve, ask(&cx))
                        .await
                        .map_err(request_error)?;
                    Ok(stock.left)
                }
            })
            .compensate(move |cx: StepContext<PlaceOrder>, _left: u32| {
                let requester = r2.clone();
                async move {
                    let o = cx.input();
                    let release = Release {
                        order_id: o.order_id.clone(),
                        sku: o.sku.clone(),
                        qty: o.qty,
                    };
                    let _: Stock = requester
                        .request_with(INVENTORY, &release, ask(&cx))
                        .await
                        .map_err(request_error)?;
                    Ok(())
                }
            }),
        )
        .step(
            Step::new("charge", move |cx: StepContext<PlaceOrder>| {
                let payment = p1.clone();
                async move {
                    let o = cx.input();
                    let body = Charge {
                        order_id: o.order_id.clone(),
                        cents: o.cents,
                    };
                    let opts = CallOptions::new().idempotency_key(cx.idempotency_key());
                    let receipt: Receipt = payment
                        .service("payment")
                        .post_json_with("/charges", &body, &opts)
                        .await
                        .map_err(step_error)?;
                    Ok(receipt)
                }
            })
            .compensate(move |cx: StepContext<PlaceOrder>, receipt: Receipt| {
                let payment = p2.clone();
                async move {
                    let opts = CallOptions::new().idempotency_key(cx.idempotency_key());
                    let body = Charge {
                        order_id: receipt.order_id,
                        cents: receipt.cents,
                    };
                    let _: Receipt = payment
                        .service("payment")
                        .post_json_with("/refunds", &body, &opts)
                        .await
                        .map_err(step_error)?;
                    Ok(())
                }
            }),
        )
        .step(Step::new("ship", move |cx: StepContext<PlaceOrder>| {
            let store = store.clone();
            async move {
                let o = cx.input();
                let Some(address) = o.address.clone() else {
                    return Err(StepError::failed(format!(
                        "{} has no shipping address",
                        o.order_id
                    )));
                };
                let id = o.order_id.clone();
                transact(&store, |txn: Txn| {
                    let (id, address) = (id.clone(), address.clone());
                    async move { txn.put(&SHIPMENTS, &id, &address) }
                })
                .await?;
                println!("order: shipped {}", o.order_id);
                Ok(address)
            }
        }))
}

fn print_history(rec: &SagaRecord) {
    match &rec.error {
        Some(e) => println!("{}: {} ({e})", rec.id, rec.state),
        None => println!("{}: {}", rec.id, rec.state),
    }
    for t in &rec.history {
        let kind = match t.kind {
            TransitionKind::Started => "started",
            TransitionKind::StepDone => "step done",
            TransitionKind::StepFailed => "step failed",
            TransitionKind::Compensating => "compensating",
            TransitionKind::StepCompensated => "compensated",
            TransitionKind::Completed => "completed",
            TransitionKind::Compensated => "all compensated",
            TransitionKind::NeedsAttention => "needs attention",
            TransitionKind::Retried => "operator retry",
        };
        match t.step {
            Some(k) if t.attempts > 0 => println!(
                "  {kind:<15} {:<8} {} attempt{} {:>7.1} ms",
                rec.steps[k].name,
                t.attempts,
                if t.attempts == 1 { " " } else { "s" },
                t.took_us as f64 / 1000.0
            ),
            Some(k) => println!("  {kind:<15} {}", rec.steps[k].name),
            None => println!("  {kind}"),
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let dir = std::path::PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "./data/saga".into()),
    );
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }

    // inventory: a responder on the embedded bus, its stock in its own store.
    let bus = EmbeddedBus::open(dir.join("bus"))?;
    let dyn_bus: Arc<dyn Bus> = Arc::new(bus.clone());
    let inventory_store = EmbeddedStore::open(dir.join("inventory"), StoreConfig::default())?;
    let inventory_db: Arc<dyn Store> = Arc::new(inventory_store.clone());
    transact(&inventory_db, |txn: Txn| async move {
        txn.put(&STOCK, "lamp", &10)
    })
    .await?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut s = stopped.clone();
    let bound = inventory(dyn_bus.clone(), inventory_db.clone())
        .bind()
        .await?;
    let inventory_task = tokio::spawn(bound.run(async move {
        let _ = s.changed().await;
    }));

    // payment: an HTTP service registered by name.
    let payment = Arc::new(Payment::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let opts = ServerOptions::new("payment");
    opts.health.set_ready(true);
    let app = router(
        payment_app(payment.clone(), Arc::new(MemoryStore::new())),
        &opts,
    );
    let mut s = stopped.clone();
    let payment_task = tokio::spawn(serve(listener, app, async move {
        let _ = s.changed().await;
    }));
    let registry = InProcessRegistry::new();
    let _registration = registry.register("payment", &url);
    println!("payment listening on {url}");
    let client = HttpClient::with_config(
        Arc::new(registry),
        ClientConfig {
            backoff_base: Duration::from_millis(20),
            backoff_max: Duration::from_millis(100),
            breaker: BreakerConfig {
                open_for: BREAKER_OPEN_FOR,
                ..BreakerConfig::default()
            },
            ..ClientConfig::default()
        },
    );

    // order: the orchestrator over its own embedded store.
    let order_store = EmbeddedStore::open(dir.join("order"), StoreConfig::default())?;
    let order_db: Arc<dyn Store> = Arc::new(order_store.clone());
    let requester = Arc::new(Requester::new("order", dyn_bus.clone()).await?);
    let orchestrator = Orchestrator::builder("order", order_db.clone())
        .saga(place_order(requester.clone(), client, order_db.clone()))
        .action_policy(
            StepPolicy::action().backoff(Duration::from_millis(10), Duration::from_millis(50)),
        )
        .compensation_policy(
            StepPolicy::compensation()
                .attempts(3)
                .backoff(Duration::from_millis(10), Duration::from_millis(50)),
        )
        .build()?;
    let mut s = stopped.clone();
    let orchestrator_task = tokio::spawn(orchestrator.clone().run(async move {
        let _ = s.changed().await;
    }));

    let order = |id: &str, qty: u32, cents: u64, address: Option<&str>| PlaceOrder {
        order_id: id.into(),
        sku: "lamp".into(),
        qty,
        cents,
        address: address.map(str::to_string),
    };

    // 1. Through, with one retried charge.
    payment.fail_charges.store(1, Ordering::SeqCst);
    orchestrator
        .start_with_id(
            "place_order",
            "o-1",
            &order("o-1", 2, 4_000, Some("1 Main St")),
        )
        .await?;
    print_history(&orchestrator.wait("o-1").await?);

    // 2. Declined: the reservation is released.
    orchestrator
        .start_with_id(
            "place_order",
            "o-2",
            &order("o-2", 1, 90_000, Some("2 Main St")),
        )
        .await?;
    print_history(&orchestrator.wait("o-2").await?);

    // 3. No address, and refunds down: needs attention, then an operator retry.
    payment.refunds_down.store(true, Ordering::SeqCst);
    orchestrator
        .start_with_id("place_order", "o-3", &order("o-3", 1, 2_000, None))
        .await?;
    let parked = orchestrator.wait("o-3").await?;
    print_history(&parked);
    let waiting = orchestrator
        .list(switchyard::saga::SagaState::NeedsAttention, 10)
        .await?;
    println!(
        "operator: {} saga(s) need attention: {:?}",
        waiting.len(),
        waiting.iter().map(|r| r.id.as_str()).collect::<Vec<_>>()
    );
    payment.refunds_down.store(false, Ordering::SeqCst);
    // The refunds kept failing, so the client's breaker for `payment` opened; a retry
    // right now would fail fast. The operator waits for it to let a probe through.
    tokio::time::sleep(BREAKER_OPEN_FOR).await;
    println!("operator: payment fixed, retrying o-3");
    orchestrator.retry("o-3").await?;
    print_history(&orchestrator.wait("o-3").await?);

    let counts = orchestrator.counts().await?;
    let stock = Txn::new(inventory_db.clone())
        .get(&STOCK, "lamp")
        .await?
        .unwrap_or(0);
    let sum = |m: &Mutex<HashMap<String, u64>>| -> u64 {
        m.lock().unwrap_or_else(|e| e.into_inner()).values().sum()
    };
    println!(
        "sagas: {} completed, {} compensated, {} need attention; lamp stock {stock}; payment: charged {}, refunded {}",
        counts.completed,
        counts.compensated,
        counts.needs_attention,
        sum(&payment.charged),
        sum(&payment.refunded)
    );

    let _ = stop.send(true);
    orchestrator_task.await??;
    inventory_task.await??;
    payment_task.await??;
    drop(requester);
    bus.close().await?;
    order_store.close().await?;
    inventory_store.close().await?;
    if counts.completed != 1 || counts.compensated != 2 || stock != 8 {
        return Err("unexpected outcome".into());
    }
    Ok(())
}
