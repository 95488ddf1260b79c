//! **Hybrid**: the checks the customer must wait for are sync — Inventory reserves and
//! Payment charges (gRPC) on the critical path — and the rest follows asynchronously.
//! Once both succeeded, the order is completed for the customer **and** its
//! `OrderCreated` and `OrderCompleted` events go into the Order service's outbox in the
//! same commit (nothing can complete without its events, nor announce an order that did
//! not complete). From the events: Shipping creates the shipment
//! ([`subscribe_shipping_orders`](super::subscribe_shipping_orders)), Inventory commits
//! the stock on `ShipmentCreated`
//! ([`subscribe_inventory_shipments`](super::subscribe_inventory_shipments)),
//! Notification mails, Analytics counts — none of them can fail the order, and an outage
//! of any of them only delays its part.
//!
//! A decline (or a dependency of the critical path down) releases the reservation (and
//! refunds a charge) synchronously and fails the order — with its `OrderCreated` and
//! `OrderFailed` events in the same commit, so the failure e-mail and the counts follow
//! the same way. `place` returns the order terminal for the customer; a restart re-runs
//! the critical path of accepted orders with the same keys.

use async_trait::async_trait;
use switchyard::store::transact;

use super::sync::{
    charge_request, charged_id, compensate, reserve, undoing_reason, unknown_charge,
};
use super::{Deps, Driven, ORDER_SERVICE, order_event};
use crate::model::{ORDERS, OrderCompleted, OrderCreated, OrderFailed};
use crate::order::{Flow, Order, OrderStatus, Pattern, PlaceError};
use crate::services::ErrorClass;
use crate::services::inventory::ReservationState;
use crate::services::payment;

/// The hybrid flow.
#[derive(Debug, Clone)]
pub struct HybridFlow {
    deps: Deps,
}

impl HybridFlow {
    /// The flow over `deps`.
    pub fn new(deps: Deps) -> Self {
        HybridFlow { deps }
    }
}

#[async_trait]
impl Flow for HybridFlow {
    fn pattern(&self) -> Pattern {
        Pattern::Hybrid
    }

    async fn place(&self, order: Order) -> Result<Order, PlaceError> {
        super::place_and_drive(self, &self.deps.book, order).await
    }
}

#[async_trait]
impl Driven for HybridFlow {
    fn pattern(&self) -> Pattern {
        Pattern::Hybrid
    }

    async fn drive(&self, order: Order) {
        let _ = self.deps.until_stopped(run(&self.deps, &order)).await;
    }
}

async fn run(deps: &Deps, order: &Order) {
    let id = order.id.as_str();
    let order = match deps.book.get(id).await {
        Ok(Some(o)) if o.status == OrderStatus::Accepted => o,
        _ => return,
    };
    if let Some(reason) = undoing_reason(&order) {
        return fail(deps, &order, charged_id(&order).as_deref(), reason).await;
    }
    match reserve(deps, &order).await {
        Ok(ReservationState::Reserved) | Ok(ReservationState::Committed) => {}
        Ok(ReservationState::Released) => {
            let reason = "the reservation was released".to_string();
            return fail(deps, &order, charged_id(&order).as_deref(), reason).await;
        }
        Err(reason) => return fail(deps, &order, None, reason).await,
    }
    let charge = match deps
        .payment
        .charge(&charge_request(&order), &Deps::opts(id, "charge"))
        .await
    {
        Ok(c) => c,
        Err(e) if e.class() == ErrorClass::Refused => {
            deps.note(id, payment::SERVICE, "declined", Some(e.to_string()));
            return fail(deps, &order, None, e.to_string()).await;
        }
        Err(e) => {
            let charge = unknown_charge(deps, &order, &e).await;
            let reason = format!("payment unavailable: {e}");
            return fail(deps, &order, charge.as_deref(), reason).await;
        }
    };
    deps.note(
        id,
        payment::SERVICE,
        "charged",
        Some(charge.charge_id.clone()),
    );
    end(deps, &order, None).await;
}

/// Undoes what the critical path did (refund, release) and fails the order with its
/// events.
async fn fail(deps: &Deps, order: &Order, charge_id: Option<&str>, reason: String) {
    compensate(deps, &order.id, charge_id, &reason).await;
    end(deps, order, Some(reason)).await;
}

/// Ends the order — completed (`reason` None) or failed — and puts its `OrderCreated`
/// and `OrderCompleted` / `OrderFailed` events in the outbox, in one commit.
async fn end(deps: &Deps, order: &Order, reason: Option<String>) {
    let id = order.id.as_str();
    let created = OrderCreated {
        order_id: order.id.clone(),
        customer: order.customer.clone(),
        items: order.items.clone(),
        amount_cents: order.amount_cents,
        payment_token: order.payment_token.clone(),
    };
    let book = deps.book.clone();
    let committed = transact(book.store(), |txn| {
        let book = book.clone();
        let created = created.clone();
        let reason = reason.clone();
        async move {
            let first = order_event(&created, Pattern::Hybrid, id, None)?;
            let second = match &reason {
                None => order_event(
                    &OrderCompleted {
                        order_id: id.to_string(),
                    },
                    Pattern::Hybrid,
                    id,
                    Some(&first),
                )?,
                Some(why) => order_event(
                    &OrderFailed {
                        order_id: id.to_string(),
                        reason: why.clone(),
                    },
                    Pattern::Hybrid,
                    id,
                    Some(&first),
                )?,
            };
            let ended = book.finish_in(&txn, id, ORDER_SERVICE, reason).await;
            if matches!(ended, Ok(true)) {
                txn.publish_envelope(ORDERS, first);
                txn.publish_envelope(ORDERS, second);
            }
            Ok(ended)
        }
    })
    .await;
    deps.book.changed(id);
    match committed {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!(order = id, error = %e, "ending the order failed"),
        Err(e) => {
            tracing::warn!(order = id, error = %e, "ending the order failed; the restart ends it")
        }
    }
}
