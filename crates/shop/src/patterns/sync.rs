//! **Sync**: the Order service calls every service in turn and waits for each — Inventory
//! (reserve), Payment (charge, gRPC), Notification (confirmation), Analytics, Shipping
//! (create), Inventory (commit). `place` returns once the order is terminal.
//!
//! Any dependency down fails the order (on purpose: this is the coupling the pattern is
//! known for) and undoes what was done: cancel the shipment (if it was asked for), refund,
//! release. The calls that may fail the order (notification and analytics included) all
//! come **before** the shipment, so a created shipment is the point of no return (an
//! order that shipped completes; a commit that fails after it is done by Inventory when
//! it sees `ShipmentCreated`). Only a create whose answer did not come (a timeout, the
//! service going down) fails the order after the request: the undo then cancels the
//! shipment — Shipping marks a created one cancelled (Inventory puts the goods back on
//! `ShipmentCancelled`) or blocks one still on its way.
//!
//! Every call carries the idempotency key `<order id>/<step>`; a run cut by a shutdown is
//! run again from the start after the restart ([`Driven`]), each step answering what it
//! answered the first time. An order that was being undone (timeline entry `undoing`)
//! finishes its undo.

use async_trait::async_trait;

use super::{Deps, Driven, ORDER_SERVICE, retry};
use crate::model::ChargeRequest;
use crate::order::{Flow, Order, OrderStatus, Pattern, PlaceError};
use crate::services::ErrorClass;
use crate::services::inventory::{self, ReservationState};
use crate::services::notification::{self, MailKind};
use crate::services::{analytics, payment, shipping};

/// The sync flow.
#[derive(Debug, Clone)]
pub struct SyncFlow {
    deps: Deps,
}

impl SyncFlow {
    /// The flow over `deps`.
    pub fn new(deps: Deps) -> Self {
        SyncFlow { deps }
    }
}

#[async_trait]
impl Flow for SyncFlow {
    fn pattern(&self) -> Pattern {
        Pattern::Sync
    }

    async fn place(&self, order: Order) -> Result<Order, PlaceError> {
        super::place_and_drive(self, &self.deps.book, order).await
    }
}

#[async_trait]
impl Driven for SyncFlow {
    fn pattern(&self) -> Pattern {
        Pattern::Sync
    }

    async fn drive(&self, order: Order) {
        let _ = self.deps.until_stopped(run(&self.deps, &order)).await;
    }
}

/// The charge id recorded on the order's timeline (`payment` / `charged`).
pub(crate) fn charged_id(order: &Order) -> Option<String> {
    order
        .history
        .iter()
        .rev()
        .find(|e| e.service == payment::SERVICE && e.what == "charged")
        .and_then(|e| e.detail.clone())
}

/// Why the order is being undone, if a run started undoing it (timeline `undoing`).
pub(crate) fn undoing_reason(order: &Order) -> Option<String> {
    order
        .history
        .iter()
        .find(|e| e.service == ORDER_SERVICE && e.what == "undoing")
        .and_then(|e| e.detail.clone())
}

/// Undoes an order: refunds its charge (if `charge_id`), releases its reservation,
/// retrying each until it succeeds (a compensation is never dropped; a shutdown stops
/// it, and the restart finishes it), then fails the order with `reason`.
pub(crate) async fn undo(deps: &Deps, order_id: &str, charge_id: Option<&str>, reason: String) {
    compensate(deps, order_id, charge_id, &reason).await;
    finish(deps, order_id, Some(reason)).await;
}

/// What [`undo`] does before failing the order: records `undoing` (so that a rerun after
/// a crash undoes too), refunds, releases.
pub(crate) async fn compensate(deps: &Deps, order_id: &str, charge_id: Option<&str>, reason: &str) {
    // Recorded, not noted: a rerun after a crash must undo, not carry on.
    deps.record(order_id, ORDER_SERVICE, "undoing", Some(reason.to_string()))
        .await;
    match shipment_asked(deps, order_id).await {
        ShipmentAsked::No => {}
        // The create may have happened with its answer lost: cancel until Shipping
        // answers — which also keeps a create still on its way from shipping a failed
        // order.
        ShipmentAsked::Unknown => {
            let cancelled = retry(
                u32::MAX,
                |_| true,
                || async {
                    let r = cancel_shipment(deps, order_id).await;
                    if let Err(e) = &r {
                        tracing::warn!(order = order_id, error = %e, "cancelling the shipment failed; retrying");
                    }
                    r
                },
            )
            .await;
            note_cancelled(deps, order_id, cancelled);
        }
        // Shipping refused or was down: nothing should exist, but an earlier attempt of
        // the call may have timed out; one cancel, best effort.
        ShipmentAsked::Refused => {
            let cancelled = cancel_shipment(deps, order_id).await;
            if let Err(e) = &cancelled {
                tracing::info!(order = order_id, error = %e, "best-effort shipment cancel failed");
            }
            note_cancelled(deps, order_id, cancelled);
        }
    }
    if let Some(charge) = charge_id {
        let refunded = retry(
            u32::MAX,
            |_| true,
            || async {
                let r = deps
                    .payment
                    .refund(order_id, charge, &Deps::opts(order_id, "refund"))
                    .await;
                if let Err(e) = &r {
                    tracing::warn!(order = order_id, error = %e, "refund failed; retrying");
                }
                r
            },
        )
        .await;
        if let Ok(r) = refunded {
            deps.note(order_id, payment::SERVICE, "refunded", Some(r.refund_id));
        }
    }
    let released = retry(
        u32::MAX,
        |_| true,
        || async {
            let r = deps
                .inventory
                .release(order_id, &Deps::opts(order_id, "release"))
                .await;
            if let Err(e) = &r {
                tracing::warn!(order = order_id, error = %e, "release failed; retrying");
            }
            r
        },
    )
    .await;
    if let Ok(r) = released
        && r.released_now
    {
        deps.note(order_id, inventory::SERVICE, "released", None);
    }
}

/// Ends the order, retrying the store a few times.
pub(crate) async fn finish(deps: &Deps, order_id: &str, reason: Option<String>) {
    let r = retry(
        5,
        |_| true,
        || deps.book.finish(order_id, ORDER_SERVICE, reason.clone()),
    )
    .await;
    if let Err(e) = r {
        tracing::error!(order = order_id, error = %e, "finishing the order failed; it stays accepted until the next restart");
    }
}

/// Reserves the order's items; `Err(reason)` when the order must fail (nothing to undo
/// but a possible reservation, released by the caller).
pub(crate) async fn reserve(deps: &Deps, order: &Order) -> Result<ReservationState, String> {
    match deps
        .inventory
        .reserve(&order.id, &order.items, &Deps::opts(&order.id, "reserve"))
        .await
    {
        Ok(r) => {
            if r.state == ReservationState::Reserved {
                deps.note(&order.id, inventory::SERVICE, "reserved", None);
            }
            Ok(r.state)
        }
        Err(e) if e.class() == ErrorClass::Refused => Err(e.to_string()),
        Err(e) => Err(format!("inventory unavailable: {e}")),
    }
}

/// How far the flow got with the order's shipment (from its timeline).
enum ShipmentAsked {
    /// Not asked for.
    No,
    /// Asked for, and Shipping answered with an error or was down.
    Refused,
    /// Asked for, and the answer did not come (timeout, broken answer): it may exist.
    Unknown,
}

async fn shipment_asked(deps: &Deps, order_id: &str) -> ShipmentAsked {
    let Ok(Some(order)) = deps.book.get(order_id).await else {
        return ShipmentAsked::No;
    };
    let has = |what: &str| {
        order
            .history
            .iter()
            .any(|e| e.service == ORDER_SERVICE && e.what == what)
    };
    if has("shipment_unknown") {
        ShipmentAsked::Unknown
    } else if has("shipment_requested") {
        ShipmentAsked::Refused
    } else {
        ShipmentAsked::No
    }
}

async fn cancel_shipment(
    deps: &Deps,
    order_id: &str,
) -> Result<shipping::CancelOutcome, shipping::ShippingError> {
    deps.shipping
        .cancel(order_id, &Deps::opts(order_id, "cancel-shipment"))
        .await
}

fn note_cancelled(
    deps: &Deps,
    order_id: &str,
    cancelled: Result<shipping::CancelOutcome, shipping::ShippingError>,
) {
    if let Ok(c) = cancelled
        && c.cancelled_now
    {
        deps.note(
            order_id,
            shipping::SERVICE,
            "shipment_cancelled",
            c.tracking,
        );
    }
}

/// The charge request of an order.
pub(crate) fn charge_request(order: &Order) -> ChargeRequest {
    ChargeRequest {
        order_id: order.id.clone(),
        customer: order.customer.clone(),
        amount_cents: order.amount_cents,
        payment_token: order.payment_token.clone(),
    }
}

/// After a charge that failed without a business answer: if the outcome is unknown (the
/// deadline passed, the connection broke after the request was sent, or the answer did
/// not make sense: [`payment::PaymentError::outcome_unknown`]), asks again with the same key
/// until Payment answers — a charge made the first time comes back as is (else it is
/// made now) — and returns it, to be refunded. `None` when nothing can have been charged
/// (Payment said it is unavailable, or declined the repeat).
pub(crate) async fn unknown_charge(
    deps: &Deps,
    order: &Order,
    error: &payment::PaymentError,
) -> Option<String> {
    if !error.outcome_unknown() {
        return None;
    }
    deps.note(
        &order.id,
        payment::SERVICE,
        "charge_unknown",
        Some(error.to_string()),
    );
    let opts = Deps::opts(&order.id, "charge");
    let req = charge_request(order);
    retry(
        u32::MAX,
        |e: &payment::PaymentError| e.is_retryable(),
        || deps.payment.charge(&req, &opts),
    )
    .await
    .ok()
    .map(|c| c.charge_id)
}

/// Creates the shipment and commits the stock; `Err(reason)` if the shipment could not be
/// created (the undo cancels it, in case it was created and only the answer was lost).
pub(crate) async fn ship(deps: &Deps, order: &Order) -> Result<(), String> {
    let id = &order.id;
    // From here an undo cancels the shipment (see `compensate`).
    deps.note(id, ORDER_SERVICE, "shipment_requested", None);
    let shipment = match deps
        .shipping
        .create(id, &order.items, &Deps::opts(id, "ship"))
        .await
    {
        Ok(s) => s,
        Err(e) => {
            if matches!(
                e.class(),
                ErrorClass::DeadlineExceeded | ErrorClass::Internal
            ) {
                deps.note(id, ORDER_SERVICE, "shipment_unknown", Some(e.to_string()));
            }
            return Err(format!("shipping unavailable: {e}"));
        }
    };
    deps.note(
        id,
        shipping::SERVICE,
        "shipment_created",
        Some(shipment.tracking),
    );
    // The point of no return: the goods leave. A failing commit is retried, and done by
    // Inventory on `ShipmentCreated` anyway.
    let commit_opts = Deps::opts(id, "commit");
    match retry(
        5,
        |e: &inventory::InventoryError| e.is_retryable(),
        || deps.inventory.commit(id, &commit_opts),
    )
    .await
    {
        Ok(_) => deps.note(id, inventory::SERVICE, "committed", None),
        Err(e) => {
            tracing::warn!(order = %id, error = %e, "committing the stock failed; inventory commits it on ShipmentCreated")
        }
    }
    Ok(())
}

async fn run(deps: &Deps, order: &Order) {
    let id = order.id.as_str();
    // A resumed run reads where the last one got to.
    let order = match deps.book.get(id).await {
        Ok(Some(o)) if o.status == OrderStatus::Accepted => o,
        Ok(_) => return,
        Err(e) => {
            tracing::warn!(order = id, error = %e, "reading the order failed");
            return;
        }
    };
    if let Some(reason) = undoing_reason(&order) {
        return undo(deps, id, charged_id(&order).as_deref(), reason).await;
    }
    match reserve(deps, &order).await {
        Ok(ReservationState::Reserved) => {}
        Ok(ReservationState::Committed) => return finish(deps, id, None).await,
        Ok(ReservationState::Released) => {
            return undo(
                deps,
                id,
                charged_id(&order).as_deref(),
                "the reservation was released".into(),
            )
            .await;
        }
        Err(reason) => return undo(deps, id, None, reason).await,
    }
    let charge = match deps
        .payment
        .charge(&charge_request(&order), &Deps::opts(id, "charge"))
        .await
    {
        Ok(c) => c,
        Err(e) if e.class() == ErrorClass::Refused => {
            deps.note(id, payment::SERVICE, "declined", Some(e.to_string()));
            return undo(deps, id, None, e.to_string()).await;
        }
        Err(e) => {
            let charge = unknown_charge(deps, &order, &e).await;
            let reason = format!("payment unavailable: {e}");
            return undo(deps, id, charge.as_deref(), reason).await;
        }
    };
    deps.note(
        id,
        payment::SERVICE,
        "charged",
        Some(charge.charge_id.clone()),
    );
    let to = format!("{}@{}", order.customer, notification::MAIL_DOMAIN);
    if let Err(e) = deps
        .notification
        .send(id, MailKind::Confirmation, &to, &Deps::opts(id, "notify"))
        .await
    {
        let reason = format!("notification unavailable: {e}");
        return undo(deps, id, Some(&charge.charge_id), reason).await;
    }
    deps.note(id, notification::SERVICE, "confirmation_sent", None);
    if let Err(e) = deps
        .analytics
        .record(
            <crate::model::OrderCompleted as switchyard::Event>::TYPE,
            id,
            &Deps::opts(id, "analytics"),
        )
        .await
    {
        let reason = format!("analytics unavailable: {e}");
        return undo(deps, id, Some(&charge.charge_id), reason).await;
    }
    deps.note(id, analytics::SERVICE, "counted", None);
    if let Err(reason) = ship(deps, &order).await {
        return undo(deps, id, Some(&charge.charge_id), reason).await;
    }
    finish(deps, id, None).await;
}
