//! Global invariants over a running shop (what tests assert and `shop check` prints):
//!
//! - **stock**: per SKU, initial = available + reserved + committed (units are never
//!   created or lost; `u64` rows cannot go negative);
//! - **money**: every completed order charged exactly once and not refunded; every
//!   refund belongs to a failed order (or one being undone); no failed order left
//!   charged net; no order charged twice; no charge for an unknown order;
//! - **stock holds**: no failed order keeps a reservation open;
//! - **shipments** (not cancelled) only for completed orders (or orders still in flight);
//! - **orders**: every order terminal or in flight — the in-flight ones are listed with
//!   their age (not a violation by themselves: check a quiet shop to expect none).

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use switchyard::store::Txn;

use crate::model::Catalog;
use crate::order::{Order, OrderBook, OrderStatus, Pattern};
use crate::services::inventory::{InventoryError, RESERVATIONS, Reservation, ReservationState};
use crate::services::payment::PaymentError;
use crate::services::shipping::ShippingError;

/// One broken invariant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Violation {
    /// Which invariant (`stock`, `charge`, `refund`, `net`, `hold`, `shipment`).
    pub kind: String,
    /// What exactly (the SKU or order and the figures).
    pub detail: String,
}

/// An order not terminal yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InFlight {
    /// The order.
    pub id: String,
    /// Its pattern.
    pub pattern: Pattern,
    /// Milliseconds since it was accepted.
    pub age_ms: u64,
    /// Its last timeline entry (`service what`).
    pub last: String,
}

/// What [`check`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckReport {
    /// Orders per status (`accepted`, `completed`, `failed`).
    pub orders: BTreeMap<String, u64>,
    /// The orders in flight, oldest first.
    pub in_flight: Vec<InFlight>,
    /// Stock units now, all SKUs together.
    pub stock_units: u64,
    /// Stock units the catalog started with.
    pub initial_units: u64,
    /// Cents charged, all orders together.
    pub charged_cents: u64,
    /// Cents refunded, all orders together.
    pub refunded_cents: u64,
    /// Shipments that were not cancelled.
    pub shipments: usize,
    /// Every broken invariant (empty: all hold).
    pub violations: Vec<Violation>,
}

impl CheckReport {
    /// No violation.
    pub fn is_clean(&self) -> bool {
        self.violations.is_empty()
    }

    /// No violation and no order in flight.
    pub fn is_settled(&self) -> bool {
        self.is_clean() && self.in_flight.is_empty()
    }
}

/// Why the check could not read a service's state (retry).
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The order book.
    #[error("reading the orders failed: {0}")]
    Orders(#[from] crate::order::BookError),
    /// Inventory.
    #[error("reading the inventory failed: {0}")]
    Inventory(#[from] InventoryError),
    /// Payment.
    #[error("reading the payment ledger failed: {0}")]
    Payment(#[from] PaymentError),
    /// Shipping.
    #[error("reading the shipments failed: {0}")]
    Shipping(#[from] ShippingError),
    /// A store.
    #[error("reading a store failed: {0}")]
    Store(#[from] switchyard::Error),
}

fn violation(kind: &str, detail: String) -> Violation {
    Violation {
        kind: kind.into(),
        detail,
    }
}

/// Checks the invariants over the running `app`.
pub async fn check(app: &crate::app::ShopApp) -> Result<CheckReport, CheckError> {
    check_parts(app.book(), app.services(), &Catalog::standard()).await
}

/// Checks the invariants over the order book and the services' stores (`catalog`: the
/// one the inventory was seeded from).
pub async fn check_parts(
    book: &OrderBook,
    services: &crate::app::Services,
    catalog: &Catalog,
) -> Result<CheckReport, CheckError> {
    let mut report = CheckReport::default();
    // Listed status by status while orders move on: one that ends between two listings
    // is listed twice; it counts once, with the status its row has (read last).
    let mut orders: HashMap<String, Order> = HashMap::new();
    let statuses = [
        OrderStatus::Accepted,
        OrderStatus::Completed,
        OrderStatus::Failed,
    ];
    for status in statuses {
        for o in book.list(status, usize::MAX).await? {
            orders.insert(o.id.clone(), o);
        }
    }
    for status in statuses {
        let n = orders.values().filter(|o| o.status == status).count();
        report.orders.insert(status.as_str().to_string(), n as u64);
    }
    let now = switchyard::Timestamp::now().unix_micros();
    let mut in_flight: Vec<InFlight> = orders
        .values()
        .filter(|o| o.status == OrderStatus::Accepted)
        .map(|o| InFlight {
            id: o.id.clone(),
            pattern: o.pattern,
            age_ms: now.saturating_sub(o.created_at.unix_micros()) / 1000,
            last: o
                .history
                .last()
                .map(|e| format!("{} {}", e.service, e.what))
                .unwrap_or_default(),
        })
        .collect();
    in_flight.sort_by_key(|f| std::cmp::Reverse(f.age_ms));
    report.in_flight = in_flight;

    // Stock.
    let stock = services.inventory.all_stock().await?;
    report.stock_units = stock.iter().map(|s| s.total()).sum();
    report.initial_units = catalog.total_initial_units();
    for p in catalog.products() {
        match stock.iter().find(|s| s.sku == p.sku) {
            Some(s) if s.total() == p.initial_stock => {}
            Some(s) => report.violations.push(violation(
                "stock",
                format!(
                    "{}: started with {}, now available {} + reserved {} + committed {} = {}",
                    p.sku,
                    p.initial_stock,
                    s.available,
                    s.reserved,
                    s.committed,
                    s.total()
                ),
            )),
            None => report
                .violations
                .push(violation("stock", format!("{}: no stock row", p.sku))),
        }
    }
    let reservations: Vec<Reservation> = Txn::new(services.inventory.store().clone())
        .scan(&RESERVATIONS, "", usize::MAX)
        .await?
        .into_iter()
        .map(|(_, r)| r)
        .collect();
    for r in &reservations {
        if r.state == ReservationState::Reserved
            && orders
                .get(&r.order_id)
                .is_some_and(|o| o.status == OrderStatus::Failed)
        {
            report.violations.push(violation(
                "hold",
                format!("failed order {} still holds its reservation", r.order_id),
            ));
        }
    }

    // Money.
    let ledger = services.payments.ledger().await?;
    report.charged_cents = ledger.charged.values().sum();
    report.refunded_cents = ledger.refunded.values().sum();
    for (id, n) in &ledger.charges {
        let Some(order) = orders.get(id) else {
            report.violations.push(violation(
                "charge",
                format!("charge for unknown order {id}"),
            ));
            continue;
        };
        if *n > 1 {
            report
                .violations
                .push(violation("charge", format!("order {id} charged {n} times")));
        }
        if order.status == OrderStatus::Failed && ledger.net(id) != 0 {
            report.violations.push(violation(
                "net",
                format!("failed order {id} is charged {} cents net", ledger.net(id)),
            ));
        }
    }
    for (id, cents) in &ledger.refunded {
        match orders.get(id).map(|o| o.status) {
            Some(OrderStatus::Failed) | Some(OrderStatus::Accepted) => {}
            other => report.violations.push(violation(
                "refund",
                format!(
                    "{cents} cents refunded for order {id}, which is {}",
                    other.map_or("unknown", OrderStatus::as_str)
                ),
            )),
        }
    }
    for o in orders.values() {
        if o.status != OrderStatus::Completed {
            continue;
        }
        let n = ledger.charges.get(&o.id).copied().unwrap_or(0);
        if n != 1 || ledger.net(&o.id) != i128::from(o.amount_cents) {
            report.violations.push(violation(
                "charge",
                format!(
                    "completed order {} has {n} charges, {} cents net (price {})",
                    o.id,
                    ledger.net(&o.id),
                    o.amount_cents
                ),
            ));
        }
    }

    // Shipments.
    let shipments: Vec<_> = services
        .shipping
        .all()
        .await?
        .into_iter()
        .filter(|s| !s.is_cancelled())
        .collect();
    report.shipments = shipments.len();
    for s in &shipments {
        match orders.get(&s.order_id).map(|o| o.status) {
            Some(OrderStatus::Completed) | Some(OrderStatus::Accepted) => {}
            other => report.violations.push(violation(
                "shipment",
                format!(
                    "shipment {} for order {}, which is {}",
                    s.tracking,
                    s.order_id,
                    other.map_or("unknown", OrderStatus::as_str)
                ),
            )),
        }
    }
    Ok(report)
}
