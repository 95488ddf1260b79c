//! The five ways to place an order, one [`Flow`](crate::order::Flow) each, over the five
//! backing services. [`crate::app::ShopApp`] wires them; every flow records each step on
//! the order's timeline and ends it with [`OrderBook::finish`] (completed, or failed with
//! the reason), and every failure path leaves stock and money whole.
//!
//! | module | pattern | `place` returns |
//! | --- | --- | --- |
//! | [`sync`] | Order calls Inventory, Payment (gRPC), Notification, Analytics, Shipping in turn | when the order is terminal |
//! | [`choreography`] | services react to each other's events; no coordinator; a monitor flags stalls and divergence against the declared spec | once order + `OrderCreated` are committed (202) |
//! | [`request_reply`] | inventory over REST, payment over the bus (reply-to + correlation id) | once recorded (202); the flow runs in the background |
//! | [`orchestration`] | a durable saga in the Order service with compensations | once the saga and the order are committed (202) |
//! | [`hybrid`] | sync reserve + charge, then order + events committed atomically; shipping, notification, analytics follow from the events | when the order is completed for the customer (or failed) |
//!
//! # Idempotency and resuming
//!
//! Every call a flow makes carries an idempotency key `<order id>/<step>` (the saga's
//! own keys for orchestration), so every step can be repeated safely. The flows that run
//! in the Order service's memory (sync, request-reply, hybrid) are therefore resumed
//! after a restart simply by running them again from the start for every order still
//! `accepted` ([`Driven::drive`]); the saga resumes in the orchestrator, and choreography
//! lives in durable subscriptions.

pub mod choreography;
pub mod hybrid;
pub mod orchestration;
pub mod request_reply;
pub mod sync;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use switchyard::router::{Context, HandlerError, Router};
use switchyard::{Envelope, Event};
use switchyard_rpc::CallOptions;
use tokio::sync::watch;

use crate::order::{Order, OrderBook, Pattern};
use crate::services::analytics::AnalyticsClient;
use crate::services::inventory::{Inventory, InventoryClient};
use crate::services::notification::NotificationClient;
use crate::services::payment::PaymentClient;
use crate::services::shipping::ShippingClient;

/// The envelope extension naming the pattern of the order an event belongs to (set on the
/// events the Order service publishes), so that a reaction meant for one pattern ignores
/// the same event type published by another.
pub const PATTERN_EXTENSION: &str = "shoppattern";

/// The timeline's name of the Order service.
pub const ORDER_SERVICE: &str = "order";

/// What the flows share: the Order service's clients of the backing services, the order
/// book, and the switch that stops background work at shutdown. Cheap to clone.
#[derive(Clone)]
pub struct Deps {
    /// The order book.
    pub book: OrderBook,
    /// Inventory over REST.
    pub inventory: InventoryClient,
    /// Payment over gRPC.
    pub payment: PaymentClient,
    /// Shipping over REST.
    pub shipping: ShippingClient,
    /// Notification over REST.
    pub notification: NotificationClient,
    /// Analytics over REST.
    pub analytics: AnalyticsClient,
    /// Request/reply over the bus.
    pub requester: Arc<switchyard::reply::Requester>,
    /// How long one request over the bus waits for its reply.
    pub request_timeout: Duration,
    /// Attempts of the orchestration's ship step (see
    /// [`orchestration::SHIP_ATTEMPTS`]).
    pub ship_attempts: u32,
    /// Set to true at shutdown: background flows stop where they are (and resume after
    /// the restart).
    pub stop: watch::Receiver<bool>,
}

impl std::fmt::Debug for Deps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deps").finish_non_exhaustive()
    }
}

impl Deps {
    /// Call options with the idempotency key `<order id>/<step>`.
    pub fn opts(order_id: &str, step: &str) -> CallOptions {
        CallOptions::new().idempotency_key(format!("{order_id}/{step}"))
    }

    /// Notes a step on the order's timeline (written with the order's next commit; see
    /// [`OrderBook`]).
    pub fn note(&self, order_id: &str, service: &str, what: &str, detail: Option<String>) {
        self.book.note(order_id, service, what, detail);
    }

    /// Records on the order's timeline now (its own commit, with the entries noted before
    /// it), logging (not failing) if the store refuses. For what a rerun after a crash
    /// must see (`undoing`).
    pub async fn record(&self, order_id: &str, service: &str, what: &str, detail: Option<String>) {
        if let Err(e) = self.book.record(order_id, service, what, detail).await {
            tracing::warn!(order = order_id, error = %e, "recording a timeline entry failed");
        }
    }

    /// Runs `fut` unless shutdown starts first (then `None`: the flow stopped where it
    /// was and resumes after the restart).
    pub async fn until_stopped<T>(&self, fut: impl Future<Output = T>) -> Option<T> {
        let mut stop = self.stop.clone();
        if *stop.borrow() {
            return None;
        }
        tokio::select! {
            out = fut => Some(out),
            _ = stop.wait_for(|s| *s) => None,
        }
    }
}

/// A flow that runs in the Order service's memory and is resumed after a restart by
/// running it again (every step is idempotent).
#[async_trait]
pub trait Driven: Send + Sync + 'static {
    /// The pattern.
    fn pattern(&self) -> Pattern;

    /// Drives `order` (recorded, `accepted`) to a terminal state, from the start; safe to
    /// call again for an order that was half done.
    async fn drive(&self, order: Order);
}

/// Records `order` and drives it to its end in its own task (a caller that goes away
/// does not cut the flow in the middle); returns the order as recorded then. The `place`
/// of the flows whose customer waits for the outcome (sync, hybrid).
pub(crate) async fn place_and_drive<F: Driven + Clone>(
    flow: &F,
    book: &crate::order::OrderBook,
    order: Order,
) -> Result<Order, crate::order::PlaceError> {
    book.create(&order).await?;
    let me = flow.clone();
    let id = order.id.clone();
    let _ = tokio::spawn(async move { me.drive(order).await }).await;
    book.get(&id)
        .await?
        .ok_or_else(|| crate::order::PlaceError::Unavailable(format!("order {id} vanished")))
}

/// Retries `f` while it fails with a retryable error, up to `attempts` times with a short
/// doubling backoff; returns the last result.
pub(crate) async fn retry<T, E, F, Fut>(
    attempts: u32,
    retryable: impl Fn(&E) -> bool,
    mut f: F,
) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut delay = Duration::from_millis(50);
    let mut n = 1;
    loop {
        match f().await {
            Err(e) if n < attempts && retryable(&e) => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
                n += 1;
            }
            other => return other,
        }
    }
}

/// Registers a handler that acknowledges events of type `E` without effect (a consumer
/// group must handle every type of its topic, or the others go to the DLQ).
pub(crate) fn ignore<E: Event>(router: &mut Router, topic: &str, group: &str) {
    router.on(topic, group, |_ctx: Context, _ev: E| async {
        Ok::<(), HandlerError>(())
    });
}

/// The pattern an event says it belongs to ([`PATTERN_EXTENSION`]).
pub(crate) fn pattern_of(env: &Envelope) -> Option<Pattern> {
    env.extension(PATTERN_EXTENSION)?.parse().ok()
}

/// `event` as an envelope from the Order service, tagged with `pattern` and correlated
/// with the order (`correlationid` = order id, unless `cause` gives a flow).
pub(crate) fn order_event<E: Event>(
    event: &E,
    pattern: Pattern,
    order_id: &str,
    cause: Option<&Envelope>,
) -> Result<Envelope, switchyard::Error> {
    let env = switchyard::codec::encode(event, &format!("/{ORDER_SERVICE}"))
        .map_err(|e| switchyard::Error::InvalidArgument(e.to_string()))?
        .with_extension(PATTERN_EXTENSION, pattern.as_str());
    Ok(match cause {
        Some(c) => env.caused_by(c),
        None => env.with_correlation(order_id),
    })
}

/// A service error in a handler: retried if `retryable`, else to the DLQ at once.
pub(crate) fn by_class(retryable: bool, e: impl std::fmt::Display) -> HandlerError {
    if retryable {
        HandlerError::Retryable(e.to_string())
    } else {
        HandlerError::Terminal(e.to_string())
    }
}

/// A store error in a handler: retryable.
pub(crate) fn retryable(e: impl std::fmt::Display) -> HandlerError {
    HandlerError::Retryable(e.to_string())
}

// ---------------------------------------------------------------- reactions shared by the event-driven patterns

/// The items of every order Shipping learned from `OrderCreated` (key: order id), in the
/// shipping store: a service keeps the copy of the data it needs to react on its own.
pub const SHIPPING_ORDER_ITEMS: switchyard::store::Table<Vec<crate::model::Item>> =
    switchyard::store::Table::new("shipping.order_items");

/// Creates the order's shipment in the handler's transaction, from `items` or else the
/// items remembered from its `OrderCreated` ([`SHIPPING_ORDER_ITEMS`]); retried while
/// neither is known.
pub(crate) async fn ship_in(
    ctx: &Context,
    order_id: &str,
    items: Option<Vec<crate::model::Item>>,
) -> Result<(), HandlerError> {
    let items = match items {
        Some(items) => Some(items),
        None => ctx
            .txn
            .get(&SHIPPING_ORDER_ITEMS, order_id)
            .await
            .map_err(retryable)?,
    };
    let Some(items) = items else {
        return Err(retryable(format!(
            "the items of order {order_id} are not known yet (OrderCreated not seen)"
        )));
    };
    crate::services::shipping::create_in(
        &ctx.txn,
        order_id,
        &items,
        crate::services::Cause::Message(&ctx.envelope),
    )
    .await
    .map_err(|e| by_class(e.is_retryable(), e))?;
    Ok(())
}

/// The consumer group of Shipping's reactions to order events.
pub const SHIPPING_ORDERS_GROUP: &str = "shipping-orders";

/// The consumer group of Inventory's reaction to shipments.
pub const INVENTORY_SHIPMENTS_GROUP: &str = "inventory-shipments";

/// Registers Shipping's reactions to order events on `router` (shipping store), group
/// [`SHIPPING_ORDERS_GROUP`]: `OrderCreated` of a hybrid order → remember the items
/// ([`SHIPPING_ORDER_ITEMS`]); `OrderCompleted` of a **hybrid** order → create its
/// shipment (with `ShipmentCreated` through the shipping outbox); `OrderFailed` → nothing.
pub fn subscribe_shipping_orders(router: &mut Router) {
    use crate::model::{ORDERS, OrderCompleted, OrderCreated, OrderFailed};

    router.on(
        ORDERS,
        SHIPPING_ORDERS_GROUP,
        |ctx: Context, ev: OrderCreated| async move {
            // Only hybrid orders ship from `OrderCompleted`; the choreography's
            // `InventoryReserved` carries its items.
            if pattern_of(&ctx.envelope) == Some(Pattern::Hybrid) {
                ctx.txn
                    .put(&SHIPPING_ORDER_ITEMS, &ev.order_id, &ev.items)
                    .map_err(retryable)?;
            }
            Ok(())
        },
    );
    router.on(
        ORDERS,
        SHIPPING_ORDERS_GROUP,
        |ctx: Context, ev: OrderCompleted| async move {
            if pattern_of(&ctx.envelope) != Some(Pattern::Hybrid) {
                return Ok(());
            }
            ship_in(&ctx, &ev.order_id, None).await
        },
    );
    ignore::<OrderFailed>(router, ORDERS, SHIPPING_ORDERS_GROUP);
}

/// Registers Inventory's reactions to shipments on `router` (inventory store), group
/// [`INVENTORY_SHIPMENTS_GROUP`]: `ShipmentCreated` → commit the order's reservation (the
/// goods left; idempotent, and a no-op for an order without an open reservation);
/// `ShipmentCancelled` → put committed goods back (`InventoryReleased`).
///
/// `inventory` is the process's inventory core: its stock locks are held through the
/// handler's commit.
pub fn subscribe_inventory_shipments(router: &mut Router, inventory: Inventory) {
    use crate::model::{LabelGenerated, SHIPPING, ShipmentCancelled, ShipmentCreated};
    use crate::services::inventory::{self, RESERVATIONS, ReservationState};
    let inventory_for_cancel = inventory.clone();
    router.on(
        SHIPPING,
        INVENTORY_SHIPMENTS_GROUP,
        move |ctx: Context, ev: ShipmentCreated| {
            let stock = inventory.clone();
            async move {
                // Lock the SKUs of an open reservation first (read outside the
                // transaction), then read and write under the locks.
                if let Some(r) = stock.reservation(&ev.order_id).await.map_err(retryable)?
                    && r.state == ReservationState::Reserved
                {
                    let skus: Vec<String> = r.items.into_iter().map(|i| i.sku).collect();
                    ctx.hold(stock.lock(&ev.order_id, &skus).await);
                }
                match ctx
                    .txn
                    .get(&RESERVATIONS, &ev.order_id)
                    .await.map_err(retryable)?
                {
                    Some(r) if r.state == ReservationState::Reserved => {
                        inventory::commit_in(&ctx.txn, &ev.order_id)
                            .await.map_err(|e| by_class(e.is_retryable(), e))?;
                    }
                    Some(r) if r.state == ReservationState::Released => {
                        tracing::warn!(order = %ev.order_id, "a shipment was created for a released reservation");
                    }
                    _ => {}
                }
                Ok(())
            }
        },
    );
    ignore::<LabelGenerated>(router, SHIPPING, INVENTORY_SHIPMENTS_GROUP);
    let stock = inventory_for_cancel;
    router.on(
        SHIPPING,
        INVENTORY_SHIPMENTS_GROUP,
        move |ctx: Context, ev: ShipmentCancelled| {
            let stock = stock.clone();
            async move {
                if let Some(r) = stock.reservation(&ev.order_id).await.map_err(retryable)? {
                    let skus: Vec<String> = r.items.into_iter().map(|i| i.sku).collect();
                    ctx.hold(stock.lock(&ev.order_id, &skus).await);
                }
                if inventory::restock_in(&ctx.txn, &ev.order_id)
                    .await
                    .map_err(|e| by_class(e.is_retryable(), e))?
                {
                    ctx.publish(
                        crate::model::INVENTORY,
                        &crate::model::InventoryReleased {
                            order_id: ev.order_id,
                        },
                    )
                    .map_err(retryable)?;
                }
                Ok(())
            }
        },
    );
}
