//! **Choreography**: no coordinator — each service reacts to the previous event on its
//! own store and announces the next one through its outbox.
//!
//! 1. Order commits the order and `OrderCreated` in one transaction (`place` returns
//!    then: 202 semantics).
//! 2. Payment, on `OrderCreated`: charge → `PaymentCompleted` | `PaymentFailed`.
//! 3. Inventory, on `PaymentCompleted`: reserve → `InventoryReserved` | `OutOfStock`;
//!    Payment, on `OutOfStock`: refund → `PaymentRefunded`.
//! 4. Shipping, on `InventoryReserved`: create the shipment → `ShipmentCreated`;
//!    Inventory commits the stock on it.
//! 5. Order follows the events on the order's timeline: completed on `ShipmentCreated`
//!    (then `OrderCompleted`), failed on `PaymentFailed` or `PaymentRefunded` (then
//!    `OrderFailed`). Notification and Analytics subscribe to everything.
//!
//! Every reaction is a router handler on the reacting service's own store: it applies
//! the effect with the service's `*_in` function in the message's transaction and
//! publishes the next event through the outbox — one commit with the inbox mark, so a
//! redelivered event has its effect once. Services keep the copy of the order data
//! they need (the items, learned from `OrderCreated`).
//!
//! # The flow, declared as data
//!
//! [`ChoreographySpec::standard`] is the table of expected reactions. Tests check every
//! observed flow against it ([`ChoreographySpec::check_flow`]); at run time the Order's
//! own handlers check each event as it arrives ([`ChoreographySpec::admits`]: an event
//! the flow cannot produce is **diverged**), and [`run_monitor`] flags a flow with no
//! expected reaction within the stall time (**stalled**): a `tracing::warn!`, a timeline
//! entry by [`MONITOR`] (`stalled` / `diverged`), and a count in [`MonitorStats`].

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use switchyard::Event;
use switchyard::router::{Context, HandlerError, Router};
use switchyard::store::{Table, Txn, transact};

use super::{Deps, ORDER_SERVICE, ignore, order_event, pattern_of, retryable};
use crate::model::{
    INVENTORY, InventoryReleased, InventoryReserved, LabelGenerated, ORDERS, OrderCompleted,
    OrderCreated, OrderFailed, OutOfStock, PAYMENTS, PaymentCompleted, PaymentFailed,
    PaymentRefunded, SHIPPING, ShipmentCreated,
};
use crate::order::{Flow, Order, OrderBook, OrderStatus, Pattern, PlaceError};
use crate::services::inventory::{self, Inventory, InventoryError};
use crate::services::payment::{self, CHARGE_KEYS, PaymentError};
use crate::services::shipping;

/// The service name of the monitor's timeline entries.
pub const MONITOR: &str = "choreography-monitor";

/// The default time after which a flow without an expected reaction is flagged.
pub const DEFAULT_STALL_AFTER: Duration = Duration::from_secs(10);

/// Payment's consumer group for the choreography.
pub const PAYMENT_GROUP: &str = "payment-choreography";
/// Inventory's consumer group for the choreography.
pub const INVENTORY_GROUP: &str = "inventory-choreography";
/// Shipping's consumer group for the choreography.
pub const SHIPPING_GROUP: &str = "shipping-choreography";
/// The Order service's consumer group for the choreography (and the monitor).
pub const ORDER_GROUP: &str = "order-choreography";

/// Where each choreography flow is (order store; key: order id).
pub const FLOWS: Table<FlowProgress> = Table::new("order.choreography_flows");

// ---------------------------------------------------------------- the spec

/// One expected reaction: on event `on`, `service` emits one of `emits`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reaction {
    /// The event type reacted to.
    pub on: &'static str,
    /// The reacting service.
    pub service: &'static str,
    /// The event types it may emit (exactly one of them).
    pub emits: Vec<&'static str>,
}

/// A choreography declared as data: where it starts, who reacts to what, where it ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChoreographySpec {
    /// The event that starts a flow.
    pub start: &'static str,
    /// The expected reactions.
    pub reactions: Vec<Reaction>,
    /// The events that end a flow.
    pub terminal: Vec<&'static str>,
}

/// One observed event of a flow (for [`ChoreographySpec::check_flow`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// The event's id.
    pub id: String,
    /// Its type.
    pub event_type: String,
    /// The id of the event that caused it.
    pub causation: Option<String>,
}

impl ChoreographySpec {
    /// The shop's order choreography.
    pub fn standard() -> Self {
        ChoreographySpec {
            start: OrderCreated::TYPE,
            reactions: vec![
                Reaction {
                    on: OrderCreated::TYPE,
                    service: payment::SERVICE,
                    emits: vec![PaymentCompleted::TYPE, PaymentFailed::TYPE],
                },
                Reaction {
                    on: PaymentCompleted::TYPE,
                    service: inventory::SERVICE,
                    emits: vec![InventoryReserved::TYPE, OutOfStock::TYPE],
                },
                Reaction {
                    on: OutOfStock::TYPE,
                    service: payment::SERVICE,
                    emits: vec![PaymentRefunded::TYPE],
                },
                Reaction {
                    on: InventoryReserved::TYPE,
                    service: shipping::SERVICE,
                    emits: vec![ShipmentCreated::TYPE],
                },
            ],
            terminal: vec![
                ShipmentCreated::TYPE,
                PaymentFailed::TYPE,
                PaymentRefunded::TYPE,
            ],
        }
    }

    /// The reaction expected to `event_type`, if any.
    pub fn reaction_to(&self, event_type: &str) -> Option<&Reaction> {
        self.reactions.iter().find(|r| r.on == event_type)
    }

    /// The reaction that emits `event_type`, if any.
    pub fn emitted_by(&self, event_type: &str) -> Option<&Reaction> {
        self.reactions
            .iter()
            .find(|r| r.emits.contains(&event_type))
    }

    /// Whether `event_type` ends a flow.
    pub fn is_terminal(&self, event_type: &str) -> bool {
        self.terminal.contains(&event_type)
    }

    /// The reactions still expected after `seen` (event types): those to seen events
    /// whose outcome has not been seen. Empty when the flow ended.
    pub fn expected(&self, seen: &BTreeSet<String>) -> Vec<&Reaction> {
        if seen.iter().any(|t| self.is_terminal(t)) {
            return Vec::new();
        }
        self.reactions
            .iter()
            .filter(|r| seen.contains(r.on) && !r.emits.iter().any(|e| seen.contains(*e)))
            .collect()
    }

    /// Whether a flow that has seen `seen` may see `event_type` next (in any arrival
    /// order: consumers of different topics see events in different orders); `Err` says
    /// how it diverges — a type the flow does not have, a second event of one type, an
    /// alternative outcome of a reaction already seen, or anything after the end.
    pub fn admits(&self, seen: &BTreeSet<String>, event_type: &str) -> Result<(), String> {
        if event_type != self.start && self.emitted_by(event_type).is_none() {
            return Err(format!("`{event_type}` is not part of the flow"));
        }
        if seen.contains(event_type) {
            return Err(format!("a second `{event_type}`"));
        }
        if let Some(r) = self.emitted_by(event_type)
            && let Some(other) = r.emits.iter().find(|e| seen.contains(**e))
        {
            return Err(format!(
                "`{event_type}` after `{other}`: {} emits one of {}",
                r.service,
                r.emits.join(" | ")
            ));
        }
        // A late arrival of an earlier step of the path that ended is fine.
        let on_the_way = seen.iter().any(|t| self.ancestors(t).contains(&event_type));
        if !on_the_way && let Some(end) = seen.iter().find(|t| self.is_terminal(t)) {
            return Err(format!("`{event_type}` after the flow ended with `{end}`"));
        }
        Ok(())
    }

    /// The event types that must come before `event_type` on its path (its cause, its
    /// cause's cause, …).
    pub fn ancestors(&self, event_type: &str) -> Vec<&'static str> {
        let mut out = Vec::new();
        let mut current = event_type.to_string();
        while let Some(r) = self.emitted_by(&current) {
            if out.contains(&r.on) {
                break;
            }
            out.push(r.on);
            current = r.on.to_string();
        }
        out
    }

    /// Checks one complete flow: one start event, every other event caused by an event
    /// whose reaction may emit it, at most one outcome per reaction, and one terminal
    /// event with every reaction on the way answered. Repeated ids (duplicate
    /// deliveries) count once.
    pub fn check_flow(&self, events: &[Observed]) -> Result<(), String> {
        let mut unique: Vec<&Observed> = Vec::new();
        for e in events {
            if !unique.iter().any(|u| u.id == e.id) {
                unique.push(e);
            }
        }
        let starts = unique.iter().filter(|e| e.event_type == self.start).count();
        if starts != 1 {
            return Err(format!("{starts} start events `{}`", self.start));
        }
        let mut seen = BTreeSet::new();
        for e in &unique {
            self.admits(&BTreeSet::new(), &e.event_type)?;
            if !seen.insert(e.event_type.clone()) {
                return Err(format!("a second `{}`", e.event_type));
            }
            if e.event_type == self.start {
                continue;
            }
            let r = self.emitted_by(&e.event_type).ok_or("unreachable")?;
            let cause = unique
                .iter()
                .find(|c| Some(&c.id) == e.causation.as_ref())
                .ok_or_else(|| format!("`{}` has no observed cause", e.event_type))?;
            if cause.event_type != r.on {
                return Err(format!(
                    "`{}` was caused by `{}`, the spec says by `{}`",
                    e.event_type, cause.event_type, r.on
                ));
            }
        }
        for r in &self.reactions {
            let n = r.emits.iter().filter(|t| seen.contains(**t)).count();
            if n > 1 {
                return Err(format!("{} emitted {n} outcomes to `{}`", r.service, r.on));
            }
        }
        let ends = seen.iter().filter(|t| self.is_terminal(t)).count();
        if ends != 1 {
            return Err(format!("{ends} terminal events"));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- the monitor

/// Counts of the choreography monitor (exposed by the app).
#[derive(Debug, Default)]
pub struct MonitorStats {
    /// Flows flagged as stalled.
    pub stalled: AtomicU64,
    /// Events flagged as diverging from the spec.
    pub diverged: AtomicU64,
}

/// Where a choreography flow is, as the Order service sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowProgress {
    /// Event types seen, in arrival order.
    pub seen: Vec<String>,
    /// When the last one arrived (Unix ms).
    pub last_ms: u64,
    /// The number of events seen when the flow was last flagged as stalled (flag once
    /// per stage).
    pub stalled_at: Option<usize>,
}

fn now_ms() -> u64 {
    switchyard::Timestamp::now().unix_micros() / 1000
}

/// Checks running choreography flows every `stall_after / 4` (at least 50 ms) until
/// `stop` turns true, flagging each flow whose last event is older than `stall_after`
/// while a reaction is still expected.
pub async fn run_monitor(
    book: OrderBook,
    stats: Arc<MonitorStats>,
    stall_after: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let spec = ChoreographySpec::standard();
    let every = (stall_after / 4).max(Duration::from_millis(50));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let accepted = match book.list(OrderStatus::Accepted, usize::MAX).await {
            Ok(list) => list,
            Err(e) => {
                tracing::warn!(error = %e, "choreography monitor: listing orders failed");
                continue;
            }
        };
        for order in accepted
            .into_iter()
            .filter(|o| o.pattern == Pattern::Choreography)
        {
            let created_ms = order.created_at.unix_micros() / 1000;
            if let Err(e) =
                check_stall(&book, &spec, &stats, &order.id, created_ms, stall_after).await
            {
                tracing::warn!(order = %order.id, error = %e, "choreography monitor: check failed");
            }
        }
    }
}

async fn check_stall(
    book: &OrderBook,
    spec: &ChoreographySpec,
    stats: &MonitorStats,
    id: &str,
    created_ms: u64,
    stall_after: Duration,
) -> Result<(), switchyard::Error> {
    let flagged = transact(book.store(), |txn| async move {
        // No progress row: the order was recorded, nothing else is known.
        let mut p = txn.get(&FLOWS, id).await?.unwrap_or_else(|| FlowProgress {
            seen: vec![OrderCreated::TYPE.to_string()],
            last_ms: created_ms,
            stalled_at: None,
        });
        let age = now_ms().saturating_sub(p.last_ms);
        if age < stall_after.as_millis() as u64 || p.stalled_at == Some(p.seen.len()) {
            return Ok(None);
        }
        let seen: BTreeSet<String> = p.seen.iter().cloned().collect();
        let expected: Vec<String> = spec
            .expected(&seen)
            .iter()
            .map(|r| format!("{} to emit {}", r.service, r.emits.join(" | ")))
            .collect();
        if expected.is_empty() {
            return Ok(None);
        }
        let detail = format!(
            "no reaction for {age} ms after {}; expected {}",
            p.seen.last().map(String::as_str).unwrap_or("?"),
            expected.join(", ")
        );
        p.stalled_at = Some(p.seen.len());
        txn.put(&FLOWS, id, &p)?;
        let _ = book
            .record_in(&txn, id, MONITOR, "stalled", Some(detail.clone()))
            .await;
        Ok(Some(detail))
    })
    .await?;
    if let Some(detail) = flagged {
        book.changed(id);
        stats.stalled.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("shop_choreography_stalled_total").increment(1);
        tracing::warn!(order = id, %detail, "choreography flow stalled");
    }
    Ok(())
}

// ---------------------------------------------------------------- the flow

/// The choreography flow: `place` commits the order and `OrderCreated` together.
#[derive(Debug, Clone)]
pub struct ChoreographyFlow {
    deps: Deps,
}

impl ChoreographyFlow {
    /// The flow over `deps`.
    pub fn new(deps: Deps) -> Self {
        ChoreographyFlow { deps }
    }
}

#[async_trait]
impl Flow for ChoreographyFlow {
    fn pattern(&self) -> Pattern {
        Pattern::Choreography
    }

    async fn place(&self, order: Order) -> Result<Order, PlaceError> {
        let book = &self.deps.book;
        let event = OrderCreated {
            order_id: order.id.clone(),
            customer: order.customer.clone(),
            items: order.items.clone(),
            amount_cents: order.amount_cents,
            payment_token: order.payment_token.clone(),
        };
        let env = order_event(&event, Pattern::Choreography, &order.id, None)
            .map_err(|e| PlaceError::Unavailable(e.to_string()))?;
        let created = transact(book.store(), |txn| {
            let env = env.clone();
            let order = &order;
            async move {
                if let Err(e) = book.create_in(&txn, order).await {
                    return Ok(Err(e));
                }
                txn.put(
                    &FLOWS,
                    &order.id,
                    &FlowProgress {
                        seen: vec![OrderCreated::TYPE.to_string()],
                        last_ms: now_ms(),
                        stalled_at: None,
                    },
                )?;
                txn.publish_envelope(ORDERS, env);
                Ok(Ok(()))
            }
        })
        .await
        .map_err(|e| PlaceError::Unavailable(e.to_string()))?;
        created?;
        book.changed(&order.id);
        Ok(order)
    }
}

// ---------------------------------------------------------------- reactions

fn terminal(e: impl std::fmt::Display) -> HandlerError {
    HandlerError::Terminal(e.to_string())
}

fn payment_error(e: PaymentError) -> HandlerError {
    if e.is_retryable() {
        retryable(e)
    } else {
        terminal(e)
    }
}

/// Registers Payment's reactions on `router` (payment store), group [`PAYMENT_GROUP`]:
/// `OrderCreated` of a choreography order → charge (key `<order>/charge`) →
/// `PaymentCompleted` | `PaymentFailed`; `OutOfStock` → refund → `PaymentRefunded`.
pub fn subscribe_payment(router: &mut Router) {
    router.on(
        ORDERS,
        PAYMENT_GROUP,
        |ctx: Context, ev: OrderCreated| async move {
            if pattern_of(&ctx.envelope) != Some(Pattern::Choreography) {
                return Ok(());
            }
            let req = crate::model::ChargeRequest {
                order_id: ev.order_id.clone(),
                customer: ev.customer,
                amount_cents: ev.amount_cents,
                payment_token: ev.payment_token,
            };
            let key = format!("{}/charge", ev.order_id);
            match payment::charge_in(&ctx.txn, &req, Some(&key)).await {
                Ok(c) => ctx
                    .publish(
                        PAYMENTS,
                        &PaymentCompleted {
                            order_id: ev.order_id,
                            charge_id: c.charge_id,
                            amount_cents: c.amount_cents,
                            items: ev.items,
                        },
                    )
                    .map_err(retryable)?,
                Err(PaymentError::Declined { reason }) => ctx
                    .publish(
                        PAYMENTS,
                        &PaymentFailed {
                            order_id: ev.order_id,
                            reason,
                        },
                    )
                    .map_err(retryable)?,
                Err(e) => return Err(payment_error(e)),
            };
            Ok(())
        },
    );
    ignore::<OrderCompleted>(router, ORDERS, PAYMENT_GROUP);
    ignore::<OrderFailed>(router, ORDERS, PAYMENT_GROUP);
    router.on(
        INVENTORY,
        PAYMENT_GROUP,
        |ctx: Context, ev: OutOfStock| async move {
            let key = format!("{}/charge", ev.order_id);
            let Some(charge_id) = ctx.txn.get(&CHARGE_KEYS, &key).await.map_err(retryable)? else {
                return Err(terminal(format!(
                    "order {} is out of stock but has no charge to refund",
                    ev.order_id
                )));
            };
            let r = payment::refund_in(&ctx.txn, &ev.order_id, &charge_id)
                .await
                .map_err(payment_error)?;
            ctx.publish(
                PAYMENTS,
                &PaymentRefunded {
                    order_id: ev.order_id,
                    charge_id,
                    amount_cents: r.amount_cents,
                },
            )
            .map_err(retryable)?;
            Ok(())
        },
    );
    ignore::<InventoryReserved>(router, INVENTORY, PAYMENT_GROUP);
    ignore::<InventoryReleased>(router, INVENTORY, PAYMENT_GROUP);
}

/// Registers Inventory's reactions on `router` (inventory store), group
/// [`INVENTORY_GROUP`]: `PaymentCompleted` (which carries the items) → reserve →
/// `InventoryReserved` (carrying them on) | `OutOfStock`. (The commit on `ShipmentCreated` is
/// [`subscribe_inventory_shipments`](super::subscribe_inventory_shipments).)
///
/// `inventory` is the process's inventory core: its stock locks are held through each
/// reservation's commit.
pub fn subscribe_inventory(router: &mut Router, inventory: Inventory) {
    router.on(
        PAYMENTS,
        INVENTORY_GROUP,
        move |ctx: Context, ev: PaymentCompleted| {
            let stock = inventory.clone();
            async move {
                if ev.items.is_empty() {
                    return Err(terminal(format!(
                        "PaymentCompleted of order {} carries no items (published by an older version of the shop)",
                        ev.order_id
                    )));
                }
                let items = ev.items;
                let skus: Vec<String> = items.iter().map(|i| i.sku.clone()).collect();
                ctx.hold(stock.lock(&ev.order_id, &skus).await);
                match inventory::reserve_in(&ctx.txn, &ev.order_id, &items).await {
                    Ok(_) => ctx
                        .publish(
                            INVENTORY,
                            &InventoryReserved {
                                order_id: ev.order_id,
                                items,
                            },
                        )
                        .map_err(retryable)?,
                    Err(InventoryError::OutOfStock {
                        sku,
                        requested,
                        available,
                    }) => ctx
                        .publish(
                            INVENTORY,
                            &OutOfStock {
                                order_id: ev.order_id,
                                sku,
                                requested,
                                available,
                            },
                        )
                        .map_err(retryable)?,
                    Err(InventoryError::UnknownSku { sku, .. }) => ctx
                        .publish(
                            INVENTORY,
                            &OutOfStock {
                                order_id: ev.order_id,
                                sku,
                                requested: 0,
                                available: 0,
                            },
                        )
                        .map_err(retryable)?,
                    Err(e) if e.is_retryable() => return Err(retryable(e)),
                    Err(e) => return Err(terminal(e)),
                };
                Ok(())
            }
        },
    );
    ignore::<PaymentFailed>(router, PAYMENTS, INVENTORY_GROUP);
    ignore::<PaymentRefunded>(router, PAYMENTS, INVENTORY_GROUP);
}

/// Registers Shipping's reactions on `router` (shipping store), group
/// [`SHIPPING_GROUP`]: `InventoryReserved` → create the shipment (its `ShipmentCreated`
/// goes out through the shipping outbox). The items come from
/// [`SHIPPING_ORDER_ITEMS`] (see [`subscribe_shipping_orders`](super::subscribe_shipping_orders)).
pub fn subscribe_shipping(router: &mut Router) {
    router.on(
        INVENTORY,
        SHIPPING_GROUP,
        |ctx: Context, ev: InventoryReserved| async move {
            // The event carries the items (older ones do not: then the table written from
            // `OrderCreated`).
            let items = (!ev.items.is_empty()).then_some(ev.items);
            super::ship_in(&ctx, &ev.order_id, items).await
        },
    );
    ignore::<OutOfStock>(router, INVENTORY, SHIPPING_GROUP);
    ignore::<InventoryReleased>(router, INVENTORY, SHIPPING_GROUP);
}

/// What the Order's handler does once an event is admitted.
enum Outcome {
    /// Only the timeline.
    Progress,
    /// Complete the order (publishing `OrderCompleted`).
    Complete,
    /// Fail the order with the reason (publishing `OrderFailed`).
    Fail(String),
}

/// Registers the Order service's handlers on `router` (order store), group
/// [`ORDER_GROUP`]: every event of a choreography order goes to its timeline after the
/// spec admits it (else it is flagged `diverged`); `ShipmentCreated` completes the order,
/// `PaymentFailed` and `PaymentRefunded` fail it. Events of orders of other patterns are
/// acknowledged without effect. Call [`OrderBook::changed`] from the router's
/// `on_committed` so that waiters wake.
pub fn subscribe_order(router: &mut Router, book: OrderBook, stats: Arc<MonitorStats>) {
    let ctx_of = move || (book.clone(), stats.clone());
    macro_rules! handle {
        ($topic:expr, $ty:ty, $service:expr, |$ev:ident| $detail:expr, $outcome:expr) => {{
            let (book, stats) = ctx_of();
            router.on($topic, ORDER_GROUP, move |ctx: Context, $ev: $ty| {
                let book = book.clone();
                let stats = stats.clone();
                async move {
                    let id = $ev.order_id.clone();
                    let detail: Option<String> = $detail;
                    let outcome: Outcome = $outcome;
                    follow(
                        &ctx,
                        &book,
                        &stats,
                        &id,
                        <$ty>::TYPE,
                        $service,
                        detail,
                        outcome,
                    )
                    .await
                }
            });
        }};
    }
    handle!(
        PAYMENTS,
        PaymentCompleted,
        payment::SERVICE,
        |ev| Some(ev.charge_id.clone()),
        Outcome::Progress
    );
    handle!(
        PAYMENTS,
        PaymentFailed,
        payment::SERVICE,
        |ev| Some(ev.reason.clone()),
        Outcome::Fail(format!("payment declined: {}", ev.reason))
    );
    handle!(
        PAYMENTS,
        PaymentRefunded,
        payment::SERVICE,
        |ev| Some(ev.charge_id.clone()),
        Outcome::Fail("out of stock; the payment was refunded".into())
    );
    handle!(
        INVENTORY,
        InventoryReserved,
        inventory::SERVICE,
        |ev| None,
        Outcome::Progress
    );
    handle!(
        INVENTORY,
        OutOfStock,
        inventory::SERVICE,
        |ev| Some(format!(
            "{}: {} requested, {} available",
            ev.sku, ev.requested, ev.available
        )),
        Outcome::Progress
    );
    handle!(
        SHIPPING,
        ShipmentCreated,
        shipping::SERVICE,
        |ev| Some(ev.tracking.clone()),
        Outcome::Complete
    );
    ignore::<InventoryReleased>(router, INVENTORY, ORDER_GROUP);
    ignore::<LabelGenerated>(router, SHIPPING, ORDER_GROUP);
    ignore::<crate::model::ShipmentCancelled>(router, SHIPPING, ORDER_GROUP);
}

#[allow(clippy::too_many_arguments)]
async fn follow(
    ctx: &Context,
    book: &OrderBook,
    stats: &MonitorStats,
    id: &str,
    event_type: &str,
    service: &str,
    detail: Option<String>,
    outcome: Outcome,
) -> Result<(), HandlerError> {
    let txn: &Txn = &ctx.txn;
    let Some(order) = txn
        .get(&crate::order::ORDERS_TABLE, id)
        .await
        .map_err(retryable)?
    else {
        return Ok(());
    };
    if order.pattern != Pattern::Choreography {
        return Ok(());
    }
    let mut progress = txn
        .get(&FLOWS, id)
        .await
        .map_err(retryable)?
        .unwrap_or_default();
    let seen: BTreeSet<String> = progress.seen.iter().cloned().collect();
    let spec = ChoreographySpec::standard();
    if let Err(why) = spec.admits(&seen, event_type) {
        tracing::warn!(order = id, event = event_type, %why, "choreography flow diverged");
        stats.diverged.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("shop_choreography_diverged_total").increment(1);
        book.record_in(txn, id, MONITOR, "diverged", Some(why))
            .await
            .map_err(retryable)?;
        return Ok(());
    }
    progress.seen.push(event_type.to_string());
    progress.last_ms = now_ms();
    txn.put(&FLOWS, id, &progress).map_err(retryable)?;
    let what = event_type
        .trim_start_matches("shop.")
        .trim_end_matches(".v1")
        .to_string();
    book.record_in(txn, id, service, &what, detail)
        .await
        .map_err(retryable)?;
    match outcome {
        Outcome::Progress => {}
        Outcome::Complete => {
            if book
                .finish_in(txn, id, ORDER_SERVICE, None)
                .await
                .map_err(retryable)?
            {
                let env = order_event(
                    &OrderCompleted {
                        order_id: id.to_string(),
                    },
                    Pattern::Choreography,
                    id,
                    Some(&ctx.envelope),
                )
                .map_err(retryable)?;
                txn.publish_envelope(ORDERS, env);
            }
        }
        Outcome::Fail(reason) => {
            if book
                .finish_in(txn, id, ORDER_SERVICE, Some(reason.clone()))
                .await
                .map_err(retryable)?
            {
                let env = order_event(
                    &OrderFailed {
                        order_id: id.to_string(),
                        reason,
                    },
                    Pattern::Choreography,
                    id,
                    Some(&ctx.envelope),
                )
                .map_err(retryable)?;
                txn.publish_envelope(ORDERS, env);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(id: &str, t: &str, cause: Option<&str>) -> Observed {
        Observed {
            id: id.into(),
            event_type: t.into(),
            causation: cause.map(str::to_string),
        }
    }

    #[test]
    fn the_spec_accepts_the_three_paths_and_nothing_else() {
        let spec = ChoreographySpec::standard();
        let ok = [
            obs("1", OrderCreated::TYPE, None),
            obs("2", PaymentCompleted::TYPE, Some("1")),
            obs("3", InventoryReserved::TYPE, Some("2")),
            obs("4", ShipmentCreated::TYPE, Some("3")),
            obs("4", ShipmentCreated::TYPE, Some("3")),
        ];
        spec.check_flow(&ok).unwrap();
        let declined = [
            obs("1", OrderCreated::TYPE, None),
            obs("2", PaymentFailed::TYPE, Some("1")),
        ];
        spec.check_flow(&declined).unwrap();
        let refunded = [
            obs("1", OrderCreated::TYPE, None),
            obs("2", PaymentCompleted::TYPE, Some("1")),
            obs("3", OutOfStock::TYPE, Some("2")),
            obs("4", PaymentRefunded::TYPE, Some("3")),
        ];
        spec.check_flow(&refunded).unwrap();
        assert!(spec.check_flow(&ok[..3]).is_err(), "incomplete");
        let both = [
            obs("1", OrderCreated::TYPE, None),
            obs("2", PaymentCompleted::TYPE, Some("1")),
            obs("3", PaymentFailed::TYPE, Some("1")),
        ];
        assert!(spec.check_flow(&both).is_err());
        let seen: BTreeSet<String> = [OrderCreated::TYPE, PaymentFailed::TYPE]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert!(spec.admits(&seen, InventoryReserved::TYPE).is_err());
        assert!(spec.admits(&seen, PaymentCompleted::TYPE).is_err());
        assert!(spec.admits(&seen, "shop.other.v1").is_err());
        let seen: BTreeSet<String> = [OrderCreated::TYPE].iter().map(|s| s.to_string()).collect();
        assert!(
            spec.admits(&seen, ShipmentCreated::TYPE).is_ok(),
            "early arrival is fine"
        );
        let ended: BTreeSet<String> = [OrderCreated::TYPE, ShipmentCreated::TYPE]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert!(
            spec.admits(&ended, PaymentCompleted::TYPE).is_ok(),
            "late arrival is fine"
        );
        assert!(spec.admits(&ended, PaymentFailed::TYPE).is_err());
        assert_eq!(spec.expected(&seen).len(), 1);
    }
}
