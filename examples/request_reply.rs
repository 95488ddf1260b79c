//! Request/reply over the embedded bus: `order` asks `inventory` to reserve stock and
//! waits for the answer.
//!
//! - Asked before `inventory` runs, the request fails at once with `NoResponders` (no
//!   waiting for the timeout).
//! - A reservation changes the inventory's store: the stock row, the inbox mark of the
//!   request and the reply are committed together, then the reply is sent.
//! - The same reservation asked again with the same idempotency key (a retry after a
//!   lost reply) gets the stored reply; the stock is reserved once.
//! - A stock query changes nothing: it is answered without a commit.
//! - A refusal (not enough stock) arrives as a typed remote error.
//! - A call that gives up before the responder answers gets `Timeout`; the reply that
//!   arrives later is dropped and counted, never handed to another call.
//!
//! Requests and replies travel on the bus's transient channel: nothing about the
//! conversation is written to disk; the effect's durability comes from the inventory's
//! store commit.
//!
//! Run with:
//!
//! ```text
//! cargo run --release --example request_reply
//! ```
//!
//! Expected output (timings vary):
//!
//! ```text
//! order: before inventory runs: no responder for `inventory.requests`: no Router::respond is running on that topic; start the responder or check the topic name
//! inventory: reserve 3 × sku-1 for o-1 (stock 10 → 7)
//! order: o-1 reserved, 7 left (round trip 0.2 ms)
//! order: o-1 asked again with key o-1/reserve: 7 left — the stored reply, reserved once
//! order: stock of sku-1: 7 (answered without a commit)
//! order: o-2 refused: the responder failed (terminal): only 7 × sku-1 left, 50 asked
//! inventory: reserve 1 × sku-1 for o-3 (stock 7 → 6)
//! order: o-3 gave up: no reply from `inventory.requests` within 100ms; ...
//! order: requester stats: 4 replies, 1 timeout, 1 late reply dropped, 1 no-responders
//! inventory: 5 replies sent (1 re-sent from the store), 3 store commits (none for the query); stock of sku-1 is 6
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use switchyard::reply::{RequestError, RequestOptions, Requester};
use switchyard::router::{Context, HandlerError, Router};
use switchyard::store::{Store, Table, Txn, transact};
use switchyard::{Bus, Event};
use switchyard_embedded::{EmbeddedBus, EmbeddedStore, StoreConfig};

const REQUESTS: &str = "inventory.requests";
const STOCK: Table<u32> = Table::new("stock");

#[derive(Serialize, Deserialize)]
struct Reserve {
    order_id: String,
    sku: String,
    qty: u32,
    /// How long the (pretend) warehouse system takes, to show a timeout.
    delay_ms: u64,
}
impl Event for Reserve {
    const TYPE: &'static str = "inventory.reserve.v1";
}

#[derive(Debug, Serialize, Deserialize)]
struct Reserved {
    order_id: String,
    left: u32,
}
impl Event for Reserved {
    const TYPE: &'static str = "inventory.reserved.v1";
}

#[derive(Serialize, Deserialize)]
struct StockLevel {
    sku: String,
}
impl Event for StockLevel {
    const TYPE: &'static str = "inventory.stock-level.v1";
}

#[derive(Serialize, Deserialize)]
struct Level {
    qty: u32,
}
impl Event for Level {
    const TYPE: &'static str = "inventory.level.v1";
}

fn reserve(order_id: &str, qty: u32, delay_ms: u64) -> Reserve {
    Reserve {
        order_id: order_id.into(),
        sku: "sku-1".into(),
        qty,
        delay_ms,
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "./data/request_reply".into());
    let dir = std::path::PathBuf::from(dir);
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    let bus = EmbeddedBus::open(dir.join("bus"))?;
    let inventory_store = EmbeddedStore::open(dir.join("inventory"), StoreConfig::default())?;
    let dyn_bus: Arc<dyn Bus> = Arc::new(bus.clone());
    let inventory_db: Arc<dyn Store> = Arc::new(inventory_store.clone());
    transact(&inventory_db, |txn: Txn| async move {
        txn.put(&STOCK, "sku-1", &10)?;
        Ok(())
    })
    .await?;

    // order: one requester per process, shared by every call.
    let requester = Requester::new("order", dyn_bus.clone()).await?;
    let timeout = Duration::from_secs(2);

    // Nobody answers yet: a typed error at once.
    match requester
        .request::<_, Reserved>(REQUESTS, &reserve("o-0", 1, 0), timeout)
        .await
    {
        Err(e @ RequestError::NoResponders { .. }) => {
            println!("order: before inventory runs: {e}")
        }
        other => return Err(format!("expected NoResponders, got {other:?}").into()),
    }

    // inventory: two responders on one topic.
    let commits = Arc::new(AtomicU64::new(0));
    let counted = commits.clone();
    let mut router = Router::new("inventory", dyn_bus.clone(), inventory_db.clone()).on_committed(
        move |_, _| {
            counted.fetch_add(1, Ordering::Relaxed);
        },
    );
    router.respond(
        REQUESTS,
        "inventory",
        |ctx: Context, r: Reserve| async move {
            let stock = ctx.txn.get(&STOCK, &r.sku).await?.unwrap_or(0);
            if stock < r.qty {
                return Err(HandlerError::dead_letter(format!(
                    "only {stock} × {} left, {} asked",
                    r.sku, r.qty
                )));
            }
            println!(
                "inventory: reserve {} × {} for {} (stock {stock} → {})",
                r.qty,
                r.sku,
                r.order_id,
                stock - r.qty
            );
            ctx.txn.put(&STOCK, &r.sku, &(stock - r.qty))?;
            tokio::time::sleep(Duration::from_millis(r.delay_ms)).await;
            Ok(Reserved {
                order_id: r.order_id,
                left: stock - r.qty,
            })
        },
    );
    router.respond(
        REQUESTS,
        "inventory",
        |ctx: Context, q: StockLevel| async move {
            let qty = ctx.txn.get(&STOCK, &q.sku).await?.unwrap_or(0);
            Ok::<_, HandlerError>(Level { qty })
        },
    );
    let router_stats = router.stats();
    // Bound: subscribed from here on, so the next request finds a responder.
    let bound = router.bind().await?;
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let inventory = tokio::spawn(bound.run(async move {
        let _ = stopped.changed().await;
    }));

    // A reservation, with an idempotency key so that a retry is safe.
    let keyed = || RequestOptions::new(timeout).idempotency_key("o-1/reserve");
    let started = Instant::now();
    let first: Reserved = requester
        .request_with(REQUESTS, &reserve("o-1", 3, 0), keyed())
        .await?;
    println!(
        "order: {} reserved, {} left (round trip {:.1} ms)",
        first.order_id,
        first.left,
        started.elapsed().as_secs_f64() * 1000.0
    );
    let again: Reserved = requester
        .request_with(REQUESTS, &reserve("o-1", 3, 0), keyed())
        .await?;
    println!(
        "order: {} asked again with key o-1/reserve: {} left — the stored reply, reserved once",
        again.order_id, again.left
    );

    // A query: no effect, no commit.
    let level: Level = requester
        .request(
            REQUESTS,
            &StockLevel {
                sku: "sku-1".into(),
            },
            timeout,
        )
        .await?;
    println!(
        "order: stock of sku-1: {} (answered without a commit)",
        level.qty
    );

    // A refusal is an answer.
    match requester
        .request::<_, Reserved>(REQUESTS, &reserve("o-2", 50, 0), timeout)
        .await
    {
        Err(e @ RequestError::Remote { .. }) => println!("order: o-2 refused: {e}"),
        other => return Err(format!("expected a refusal, got {other:?}").into()),
    }

    // Giving up early: the reply comes later and is dropped, counted.
    match requester
        .request::<_, Reserved>(
            REQUESTS,
            &reserve("o-3", 1, 400),
            Duration::from_millis(100),
        )
        .await
    {
        Err(e @ RequestError::Timeout { .. }) => println!("order: o-3 gave up: {e}"),
        other => return Err(format!("expected a timeout, got {other:?}").into()),
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while requester.stats().late_replies == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let s = requester.stats();
    println!(
        "order: requester stats: {} replies, {} timeout, {} late reply dropped, {} no-responders",
        s.replies, s.timeouts, s.late_replies, s.no_responders
    );
    let _ = stop.send(true);
    inventory.await??;
    let left = Txn::new(inventory_db.clone())
        .get(&STOCK, "sku-1")
        .await?
        .unwrap_or(0);
    println!(
        "inventory: {} replies sent ({} re-sent from the store), {} store commits (none for the query); stock of sku-1 is {left}",
        router_stats.replies.load(Ordering::Relaxed)
            + router_stats.replies_resent.load(Ordering::Relaxed),
        router_stats.replies_resent.load(Ordering::Relaxed),
        commits.load(Ordering::Relaxed),
    );
    drop(requester);
    bus.close().await?;
    inventory_store.close().await?;
    Ok(())
}
