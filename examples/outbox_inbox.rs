//! Two services, `orders` and `billing`, each with its own durable store, exchange events
//! over the embedded bus through the router — with the transactional outbox on the way
//! out and the inbox on the way in.
//!
//! - `orders` writes an order row and its `order.placed.v1` event in ONE commit (no dual
//!   write: both or neither); the outbox relay publishes the event afterwards.
//! - `billing` handles `order.placed.v1`: charges the customer's balance and publishes
//!   `payment.completed.v1` or `payment.declined.v1`, state and event again in one commit,
//!   together with the inbox mark of the incoming message.
//! - `orders` handles the payment events and moves each order to `paid` or `declined`.
//! - One charge is slow on purpose: its lease expires, the bus delivers the message a
//!   second time, the second attempt commits, and the first attempt's commit finds the
//!   message in the inbox and writes nothing — charged once.
//! - Billing handles four messages at once; two charges of one customer at the same time
//!   conflict on the balance row, and the loser's handler runs again (its line prints twice).
//!
//! Run with:
//!
//! ```text
//! cargo run --release --example outbox_inbox
//! ```
//!
//! Expected output (abridged):
//!
//! ```text
//! orders: o-1 placed for ada (12.00) — row and order.placed.v1 in one commit
//! ...
//! billing: o-3 attempt 1: slow bank call (600 ms), longer than its 300 ms lease
//! ...
//! billing: o-3 attempt 2: charge grace 30.00
//! billing: o-3 committed: its effects and its inbox mark, in one commit
//! billing: o-3 attempt 1 resumes; its commit will find o-3 in the inbox
//! billing: o-3 attempt 1: charge grace 30.00
//! ...
//! order  customer  total   status
//! o-1    ada       12.00   paid
//! o-5    ada       500.00  declined
//! balances: ada 980.00, grace 125.00 (each charge applied once)
//! billing: 5 messages applied, 1 redelivery skipped by the inbox; outbox backlog: orders 0, billing 0
//! ```

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use switchyard::relay::OutboxRelay;
use switchyard::router::{Context, HandlerError, Router};
use switchyard::store::{Store, Table, Txn, transact};
use switchyard::{Bus, Event, SubscribeOptions};
use switchyard_embedded::{EmbeddedBus, EmbeddedStore, StoreConfig};

#[derive(Serialize, Deserialize, Clone)]
struct Order {
    customer: String,
    total_cents: u64,
    status: String,
}

#[derive(Serialize, Deserialize)]
struct OrderPlaced {
    order_id: String,
    customer: String,
    total_cents: u64,
}
impl Event for OrderPlaced {
    const TYPE: &'static str = "order.placed.v1";
    fn subject(&self) -> Option<String> {
        Some(self.order_id.clone())
    }
}

#[derive(Serialize, Deserialize)]
struct PaymentCompleted {
    order_id: String,
}
impl Event for PaymentCompleted {
    const TYPE: &'static str = "payment.completed.v1";
    fn subject(&self) -> Option<String> {
        Some(self.order_id.clone())
    }
}

#[derive(Serialize, Deserialize)]
struct PaymentDeclined {
    order_id: String,
    reason: String,
}
impl Event for PaymentDeclined {
    const TYPE: &'static str = "payment.declined.v1";
    fn subject(&self) -> Option<String> {
        Some(self.order_id.clone())
    }
}

const ORDERS: Table<Order> = Table::new("orders");
const BALANCES: Table<u64> = Table::new("balances");

fn money(cents: u64) -> String {
    format!("{}.{:02}", cents / 100, cents % 100)
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
        .unwrap_or_else(|| "./data/outbox_inbox".into());
    let dir = std::path::PathBuf::from(dir);
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    let bus = EmbeddedBus::open(dir.join("bus"))?;
    let orders_store = EmbeddedStore::open(dir.join("orders"), StoreConfig::default())?;
    let billing_store = EmbeddedStore::open(dir.join("billing"), StoreConfig::default())?;
    let dyn_bus: Arc<dyn Bus> = Arc::new(bus.clone());
    let orders_db: Arc<dyn Store> = Arc::new(orders_store.clone());
    let billing_db: Arc<dyn Store> = Arc::new(billing_store.clone());

    // Billing starts with balances.
    transact(&billing_db, |txn: Txn| async move {
        txn.put(&BALANCES, "ada", &100_000)?;
        txn.put(&BALANCES, "grace", &20_000)?;
        Ok(())
    })
    .await?;

    // Orders: each order row and its event in one commit.
    let orders = [
        ("o-1", "ada", 1_200),
        ("o-2", "grace", 4_500),
        ("o-3", "grace", 3_000),
        ("o-4", "ada", 800),
        ("o-5", "grace", 50_000),
    ];
    for (id, customer, total) in orders {
        transact(&orders_db, |txn: Txn| async move {
            let order = Order {
                customer: customer.into(),
                total_cents: total,
                status: "placed".into(),
            };
            txn.put(&ORDERS, id, &order)?;
            let placed = OrderPlaced {
                order_id: id.into(),
                customer: customer.into(),
                total_cents: total,
            };
            txn.publish("orders", &placed, "/orders")?;
            Ok(())
        })
        .await?;
        println!(
            "orders: {id} placed for {customer} ({}) — row and order.placed.v1 in one commit",
            money(total)
        );
    }
    println!(
        "orders: outbox holds {} events until the relay publishes them\n",
        orders_db.outbox_len().await?
    );

    // Billing's router: charge, then publish the outcome through its own outbox.
    let mut billing = Router::new("billing", dyn_bus.clone(), billing_db.clone()).on_committed(
        |_consumer, env| {
            let order = env.subject.as_deref().unwrap_or("?");
            println!(
                "billing: {order} committed: charge + payment event + inbox mark, in one commit"
            );
        },
    );
    billing.options(
        "orders",
        "billing",
        SubscribeOptions {
            ack_wait: Duration::from_millis(300),
            ..Default::default()
        },
    );
    billing.concurrency("orders", "billing", 4);
    billing.on(
        "orders",
        "billing",
        |ctx: Context, ev: OrderPlaced| async move {
            if ev.order_id == "o-3" && ctx.attempt == 1 {
                // A slow call before any work: the 300 ms lease expires meanwhile, and the
                // bus hands the message out again.
                println!(
                    "billing: o-3 attempt 1: slow bank call (600 ms), longer than its 300 ms lease"
                );
                tokio::time::sleep(Duration::from_millis(600)).await;
                println!("billing: o-3 attempt 1 resumes; its commit will find o-3 in the inbox");
            }
            let balance = ctx.txn.get(&BALANCES, &ev.customer).await?.unwrap_or(0);
            if balance < ev.total_cents {
                println!(
                    "billing: {} declined: {} has {}",
                    ev.order_id,
                    ev.customer,
                    money(balance)
                );
                ctx.publish(
                    "payments",
                    &PaymentDeclined {
                        order_id: ev.order_id,
                        reason: "insufficient balance".into(),
                    },
                )?;
                return Ok(());
            }
            ctx.txn
                .put(&BALANCES, &ev.customer, &(balance - ev.total_cents))?;
            ctx.publish(
                "payments",
                &PaymentCompleted {
                    order_id: ev.order_id.clone(),
                },
            )?;
            println!(
                "billing: {} attempt {}: charge {} {}",
                ev.order_id,
                ctx.attempt,
                ev.customer,
                money(ev.total_cents)
            );
            Ok::<(), HandlerError>(())
        },
    );
    let billing_stats = billing.stats();

    // Orders' router: follow the payment outcome.
    let mut follow = Router::new("orders", dyn_bus.clone(), orders_db.clone());
    follow.on(
        "payments",
        "orders",
        |ctx: Context, ev: PaymentCompleted| async move { set_status(&ctx, &ev.order_id, "paid").await },
    );
    follow.on(
        "payments",
        "orders",
        |ctx: Context, ev: PaymentDeclined| async move {
            set_status(&ctx, &ev.order_id, &format!("declined ({})", ev.reason)).await
        },
    );

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let until = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.changed().await;
    };
    let tasks = vec![
        tokio::spawn(billing.run(until(stopped.clone()))),
        tokio::spawn(follow.run(until(stopped.clone()))),
    ];
    let relays = vec![
        tokio::spawn(
            OutboxRelay::new(orders_db.clone(), dyn_bus.clone()).run(until(stopped.clone())),
        ),
        tokio::spawn(
            OutboxRelay::new(billing_db.clone(), dyn_bus.clone()).run(until(stopped.clone())),
        ),
    ];

    // Wait until every order is settled, and a little more for the late redelivery.
    for _ in 0..200 {
        let txn = Txn::new(orders_db.clone());
        let rows = txn.scan(&ORDERS, "o-", 100).await?;
        if rows.iter().all(|(_, o)| o.status != "placed") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(800)).await;

    println!("\norder  customer  total   status");
    for (id, o) in Txn::new(orders_db.clone()).scan(&ORDERS, "o-", 100).await? {
        println!(
            "{id:<6} {:<9} {:<7} {}",
            o.customer,
            money(o.total_cents),
            o.status
        );
    }
    let txn = Txn::new(billing_db.clone());
    println!(
        "\nbalances: ada {}, grace {} (each charge applied once)",
        money(txn.get(&BALANCES, "ada").await?.unwrap_or(0)),
        money(txn.get(&BALANCES, "grace").await?.unwrap_or(0))
    );
    println!(
        "billing: {} messages applied, {} redelivery skipped by the inbox; outbox backlog: orders {}, billing {}",
        billing_stats
            .processed
            .load(std::sync::atomic::Ordering::Relaxed),
        billing_stats
            .duplicates
            .load(std::sync::atomic::Ordering::Relaxed),
        orders_db.outbox_len().await?,
        billing_db.outbox_len().await?
    );

    let _ = stop.send(true);
    for t in tasks {
        t.await??;
    }
    for r in relays {
        r.await?;
    }
    bus.close().await?;
    orders_store.close().await?;
    billing_store.close().await?;
    Ok(())
}

async fn set_status(ctx: &Context, order_id: &str, status: &str) -> Result<(), HandlerError> {
    let Some(mut order) = ctx.txn.get(&ORDERS, order_id).await? else {
        return Err(HandlerError::dead_letter(format!("no order {order_id}")));
    };
    order.status = status.to_string();
    ctx.txn.put(&ORDERS, order_id, &order)?;
    println!("orders: {order_id} is {status}");
    Ok(())
}
