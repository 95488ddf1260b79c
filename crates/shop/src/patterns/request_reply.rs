//! **Request/reply**: the Order service reserves the stock (sync REST), then *asks*
//! Payment over the bus — a [`ChargeRequest`](crate::model::ChargeRequest) on [`PAYMENT_REQUESTS`] with a reply-to
//! address and a correlation id, a timeout and the idempotency key `<order>/charge`
//! ([`Requester::request_with`](switchyard::reply::Requester::request_with)) — and
//! continues on the reply: ship + commit on a charge, release on a decline.
//!
//! **`place` returns at once (202 semantics)**: it records the order and runs the flow
//! in the background, so a slow payment holds no caller. A restart runs the flow again
//! for every order still accepted ([`Driven`]); the responder answers a repeated key with
//! its stored reply, so nothing is charged twice.
//!
//! A timeout is retried with the **same key** (the responder may have charged and the
//! reply got lost; the repeat learns the outcome). When every attempt timed out the
//! outcome is unknown: the flow keeps asking with the same key and growing timeouts until
//! Payment answers (its stored charge, or — if the request never got through — a charge
//! made now), refunds that charge (a [`RefundRequest`] over the bus), then releases the
//! stock and fails the order. Money stays whole at the price of a charge-and-refund when
//! the first request was lost. "No responders" (payment's responder is not running) means nothing
//! was sent: retried, then the order fails without a refund.

use std::time::Duration;

use async_trait::async_trait;
use switchyard::reply::{RequestError, RequestOptions};

use super::sync::{charge_request, charged_id, finish, reserve, ship, undo, undoing_reason};
use super::{Deps, Driven};
use crate::model::{ChargeReply, PAYMENT_REQUESTS, RefundReply, RefundRequest};
use crate::order::{Flow, Order, OrderStatus, Pattern, PlaceError};
use crate::services::ErrorClass;
use crate::services::inventory::ReservationState;
use crate::services::payment::{self, PaymentError};

/// Attempts of one charge request (the same key each time).
pub const CHARGE_ATTEMPTS: u32 = 3;

/// The request/reply flow.
#[derive(Debug, Clone)]
pub struct RequestReplyFlow {
    deps: Deps,
}

impl RequestReplyFlow {
    /// The flow over `deps`.
    pub fn new(deps: Deps) -> Self {
        RequestReplyFlow { deps }
    }
}

#[async_trait]
impl Flow for RequestReplyFlow {
    fn pattern(&self) -> Pattern {
        Pattern::RequestReply
    }

    async fn place(&self, order: Order) -> Result<Order, PlaceError> {
        self.deps.book.create(&order).await?;
        let me = self.clone();
        let placed = order.clone();
        tokio::spawn(async move { me.drive(placed).await });
        Ok(order)
    }
}

#[async_trait]
impl Driven for RequestReplyFlow {
    fn pattern(&self) -> Pattern {
        Pattern::RequestReply
    }

    async fn drive(&self, order: Order) {
        let _ = self.deps.until_stopped(run(&self.deps, &order)).await;
    }
}

fn options(order_id: &str, timeout: Duration) -> RequestOptions {
    RequestOptions::new(timeout)
        .idempotency_key(format!("{order_id}/charge"))
        .flow(order_id)
}

async fn run(deps: &Deps, order: &Order) {
    let id = order.id.as_str();
    let order = match deps.book.get(id).await {
        Ok(Some(o)) if o.status == OrderStatus::Accepted => o,
        _ => return,
    };
    if let Some(reason) = undoing_reason(&order) {
        return undo(deps, id, charged_id(&order).as_deref(), reason).await;
    }
    match reserve(deps, &order).await {
        Ok(ReservationState::Reserved) => {}
        Ok(ReservationState::Committed) => return finish(deps, id, None).await,
        Ok(ReservationState::Released) => {
            let reason = "the reservation was released".to_string();
            return undo(deps, id, charged_id(&order).as_deref(), reason).await;
        }
        Err(reason) => return undo(deps, id, None, reason).await,
    }
    let req = charge_request(&order);
    let mut timed_out = false;
    let mut last = String::new();
    let mut charge = None;
    for attempt in 1..=CHARGE_ATTEMPTS {
        deps.note(
            id,
            "order",
            "charge_requested",
            Some(format!("attempt {attempt}, key {id}/charge")),
        );
        let reply = deps
            .requester
            .request_with::<_, ChargeReply>(
                PAYMENT_REQUESTS,
                &req,
                options(id, deps.request_timeout),
            )
            .await
            .map_err(PaymentError::from_request_error);
        match reply {
            Ok(r) => {
                charge = Some(r);
                break;
            }
            Err(e) if e.class() == ErrorClass::Refused => {
                deps.note(id, payment::SERVICE, "declined", Some(e.to_string()));
                return undo(deps, id, None, e.to_string()).await;
            }
            Err(e) => {
                if matches!(e, PaymentError::Request(RequestError::Timeout { .. })) {
                    timed_out = true;
                }
                last = e.to_string();
                deps.note(id, payment::SERVICE, "no_reply", Some(last.clone()));
                tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
            }
        }
    }
    let Some(charge) = charge else {
        let reason = format!("payment did not answer: {last}");
        let to_refund = if timed_out {
            settle_unknown(deps, &order).await
        } else {
            None
        };
        return undo(deps, id, to_refund.as_deref(), reason).await;
    };
    deps.note(
        id,
        payment::SERVICE,
        "charged",
        Some(charge.charge_id.clone()),
    );
    if let Err(reason) = ship(deps, &order).await {
        return undo(deps, id, Some(&charge.charge_id), reason).await;
    }
    finish(deps, id, None).await;
}

/// The outcome of the charge is unknown (every request timed out): asks again with the
/// same key, doubling the timeout each time (up to 30 s), until Payment answers — its
/// stored reply if it charged, else a charge made now — and refunds that charge over the
/// bus. Returns the charge id still to refund (over gRPC) when the refund request failed;
/// `None` when nothing is charged (declined, or refunded here). A shutdown cuts it; the
/// restart runs the flow again.
async fn settle_unknown(deps: &Deps, order: &Order) -> Option<String> {
    let id = order.id.as_str();
    let mut timeout = deps.request_timeout * 2;
    let charge = loop {
        let reply = deps
            .requester
            .request_with::<_, ChargeReply>(
                PAYMENT_REQUESTS,
                &charge_request(order),
                options(id, timeout),
            )
            .await
            .map_err(PaymentError::from_request_error);
        match reply {
            Ok(c) => break c,
            Err(e) if e.is_retryable() => {
                tracing::info!(order = id, error = %e, "settling an unknown charge; asking again");
                timeout = (timeout * 2).min(Duration::from_secs(30));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(_) => return None,
        }
    };
    let refund = RefundRequest {
        order_id: id.to_string(),
        charge_id: charge.charge_id.clone(),
    };
    let refunded = deps
        .requester
        .request_with::<_, RefundReply>(
            PAYMENT_REQUESTS,
            &refund,
            RequestOptions::new(deps.request_timeout * 5)
                .idempotency_key(format!("{id}/refund"))
                .flow(id),
        )
        .await;
    match refunded {
        Ok(r) => {
            deps.note(id, payment::SERVICE, "refunded", Some(r.refund_id));
            None
        }
        Err(e) => {
            tracing::warn!(order = id, error = %e, "refund request failed; refunding over gRPC");
            Some(charge.charge_id)
        }
    }
}
