//! **Orchestration**: a durable saga in the Order service ([`switchyard::saga`]) drives
//! the steps and undoes them in reverse order when one fails for good:
//!
//! | step | action | compensation |
//! | --- | --- | --- |
//! | `accept` | record the order in the book (if not yet) | cancel the shipment of a ship step that failed for good, settle a charge whose outcome is unknown (below), release any reservation left by a reserve that failed for good, fail the order with the saga's error |
//! | `reserve` | Inventory reserve (REST) | Inventory release |
//! | `charge` | Payment charge (gRPC) | Payment refund |
//! | `ship` | Shipping create + Inventory commit (REST) | — (the point of no return; retried long, and if it still fails, the `accept` compensation cancels the shipment: its create may have happened with the answer lost) |
//! | `complete` | complete the order | — |
//!
//! **Neither the order nor the saga is lost**: `place` first starts the saga under the
//! order id ([`Orchestrator::start_with_id`], one commit on the order store; starting
//! twice starts once, so a second `place` with the id is `Exists`), then records the
//! order. The saga's first step records the order too (if absent), so a crash between
//! the two commits leaves a saga that, resumed, creates the order. The order's end is
//! a saga step as well (`complete`), or the first step's compensation (the last one to
//! run when the saga compensates): both are committed work of the saga, never an
//! observer that a crash could skip. Every action and compensation passes
//! [`StepContext::idempotency_key`] to its callee.
//!
//! **A charge that failed for good may have charged** (the payment service did it, the
//! answer was lost, and every retry then failed): the saga only compensates completed
//! steps, so the `accept` compensation settles it — when the `charge` step failed for a
//! reason other than a decline, it asks Payment again with the charge step's own key
//! (idempotent: the charge made then, or a new one) and refunds what it gets. Net zero
//! either way; while Payment is unreachable the compensation is retried, and past its
//! limit the saga needs attention rather than leaving money on a failed order.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use switchyard::saga::{
    Orchestrator, Phase, Saga, SagaRecord, Step, StepContext, StepError, StepPolicy, StepStatus,
};
use switchyard_rpc::CallOptions;

use super::sync::charge_request;
use super::{Deps, ORDER_SERVICE};
use crate::order::{BookError, Flow, Order, Pattern, PlaceError};
use crate::services::ErrorClass;
use crate::services::{inventory, payment, shipping};

/// The saga's name.
pub const SAGA: &str = "place_order";

/// The orchestration flow.
#[derive(Debug, Clone)]
pub struct OrchestrationFlow {
    deps: Deps,
    orchestrator: Orchestrator,
}

impl OrchestrationFlow {
    /// The flow over `deps`, starting sagas on `orchestrator` (which must have [`saga`]
    /// registered).
    pub fn new(deps: Deps, orchestrator: Orchestrator) -> Self {
        OrchestrationFlow { deps, orchestrator }
    }
}

#[async_trait]
impl Flow for OrchestrationFlow {
    fn pattern(&self) -> Pattern {
        Pattern::Orchestration
    }

    async fn place(&self, order: Order) -> Result<Order, PlaceError> {
        let started = self
            .orchestrator
            .start_with_id(SAGA, &order.id, &order)
            .await
            .map_err(|e| PlaceError::Unavailable(format!("starting the saga failed: {e}")))?;
        if !started.created {
            return Err(PlaceError::Exists(order.id));
        }
        match self.deps.book.create(&order).await {
            Ok(()) | Err(BookError::Exists(_)) => {}
            // The saga's first step records it.
            Err(e) => {
                tracing::warn!(order = %order.id, error = %e, "recording the order failed; the saga records it")
            }
        }
        Ok(order)
    }
}

fn opts<I>(cx: &StepContext<I>) -> CallOptions {
    CallOptions::new().idempotency_key(cx.idempotency_key())
}

/// When the saga's `charge` step failed for good but not by a decline, asks Payment again
/// with that step's idempotency key and refunds whatever it charged (see the module docs).
async fn settle_unknown_charge(
    d: &Deps,
    cx: &StepContext<Order>,
    rec: &SagaRecord,
) -> Result<(), StepError> {
    let charge_failed = rec
        .steps
        .iter()
        .any(|s| s.name == "charge" && s.status == StepStatus::Failed);
    let declined = rec.history.iter().any(|t| {
        t.error
            .as_deref()
            .is_some_and(|e| e.contains(DECLINED_MARK))
    });
    if !charge_failed || declined {
        return Ok(());
    }
    let o = cx.input();
    let key = format!("{}/charge/{}", cx.saga_id(), Phase::Action.as_str());
    let charge = match d
        .payment
        .charge(&charge_request(o), &CallOptions::new().idempotency_key(key))
        .await
    {
        Ok(c) => c,
        Err(e) if e.class() == ErrorClass::Refused => return Ok(()),
        Err(e) => return Err(StepError::retryable(format!("settling the charge: {e}"))),
    };
    let r = d
        .payment
        .refund(&o.id, &charge.charge_id, &opts(cx))
        .await
        .map_err(|e| StepError::retryable(format!("refunding the unsettled charge: {e}")))?;
    d.note(
        &o.id,
        payment::SERVICE,
        "refunded",
        Some(format!("{} (charge outcome was unknown)", r.refund_id)),
    );
    Ok(())
}

/// When the ship step failed for good, its shipment may exist anyway (an answer lost):
/// cancel it — Shipping marks a created one cancelled (Inventory puts the goods back) or
/// blocks a create still on its way. Retried like every compensation.
async fn settle_unknown_shipment(
    d: &Deps,
    cx: &StepContext<Order>,
    rec: &SagaRecord,
) -> Result<(), StepError> {
    let ship_failed = rec
        .steps
        .iter()
        .any(|s| s.name == "ship" && s.status == StepStatus::Failed);
    if !ship_failed {
        return Ok(());
    }
    let id = &cx.input().id;
    let c = d
        .shipping
        .cancel(id, &opts(cx))
        .await
        .map_err(|e| StepError::retryable(format!("cancelling the shipment: {e}")))?;
    if c.cancelled_now {
        d.note(id, shipping::SERVICE, "shipment_cancelled", c.tracking);
    }
    Ok(())
}

/// Attempts of the ship step by default: with its backoff (0.1 s doubling to 2 s), about
/// ten minutes of trying before the saga compensates.
pub const SHIP_ATTEMPTS: u32 = 300;

/// How a decline reads (`PaymentError::Declined`): the charge step's error starts with
/// it when Payment said no, so settling knows nothing was charged.
const DECLINED_MARK: &str = "payment declined:";

fn step_error(class: ErrorClass, e: impl std::fmt::Display) -> StepError {
    if class.is_retryable() {
        StepError::retryable(e)
    } else {
        StepError::failed(e)
    }
}

/// The orchestrator, once built, for the saga's own steps (the first step's
/// compensation reads the saga's error from it). Clear it at shutdown: the saga holds
/// it, and it holds the saga.
pub type OrchestratorCell = Arc<Mutex<Option<Orchestrator>>>;

/// The saga definition over `deps`; `orchestrator` is set once the orchestrator is built.
pub fn saga(deps: Deps, orchestrator: OrchestratorCell) -> Saga<Order> {
    let ship_attempts = deps.ship_attempts.max(1);
    let (d1, d2, d3, d4, d5, d6, d7, d8) = (
        deps.clone(),
        deps.clone(),
        deps.clone(),
        deps.clone(),
        deps.clone(),
        deps.clone(),
        deps.clone(),
        deps,
    );
    Saga::new(SAGA)
        .step(
            Step::new("accept", move |cx: StepContext<Order>| {
                let d = d1.clone();
                async move {
                    match d.book.create(cx.input()).await {
                        Ok(()) | Err(BookError::Exists(_)) => Ok(()),
                        Err(e) => Err(StepError::retryable(e)),
                    }
                }
            })
            .compensate(move |cx: StepContext<Order>, (): ()| {
                let d = d2.clone();
                let orchestrator = orchestrator.clone();
                async move {
                    let current = orchestrator
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone();
                    let record = match current {
                        Some(o) => o.get(cx.saga_id()).await.ok().flatten(),
                        None => None,
                    };
                    if let Some(rec) = &record {
                        settle_unknown_shipment(&d, &cx, rec).await?;
                        settle_unknown_charge(&d, &cx, rec).await?;
                    }
                    let reason = record
                        .and_then(|rec| rec.error)
                        .unwrap_or_else(|| "the saga failed".into());
                    // A reserve that failed for good may still have reserved (its reply
                    // lost): release by order id (a no-op when nothing is held).
                    d.inventory
                        .release(&cx.input().id, &opts(&cx))
                        .await
                        .map_err(StepError::retryable)?;
                    d.book
                        .finish(&cx.input().id, ORDER_SERVICE, Some(reason))
                        .await
                        .map_err(StepError::retryable)?;
                    Ok(())
                }
            }),
        )
        .step(
            Step::new("reserve", move |cx: StepContext<Order>| {
                let d = d3.clone();
                async move {
                    let o = cx.input();
                    d.inventory
                        .reserve(&o.id, &o.items, &opts(&cx))
                        .await
                        .map_err(|e| {
                            step_error(
                                e.class(),
                                format!("out of stock or inventory unavailable: {e}"),
                            )
                        })?;
                    d.note(&o.id, inventory::SERVICE, "reserved", None);
                    Ok(())
                }
            })
            .compensate(move |cx: StepContext<Order>, (): ()| {
                let d = d4.clone();
                async move {
                    let id = &cx.input().id;
                    let r = d
                        .inventory
                        .release(id, &opts(&cx))
                        .await
                        .map_err(StepError::retryable)?;
                    if r.released_now {
                        d.note(id, inventory::SERVICE, "released", None);
                    }
                    Ok(())
                }
            }),
        )
        .step(
            Step::new("charge", move |cx: StepContext<Order>| {
                let d = d5.clone();
                async move {
                    let o = cx.input();
                    match d.payment.charge(&charge_request(o), &opts(&cx)).await {
                        Ok(c) => {
                            d.note(
                                &o.id,
                                payment::SERVICE,
                                "charged",
                                Some(c.charge_id.clone()),
                            );
                            Ok(c.charge_id)
                        }
                        Err(e) => {
                            if e.class() == ErrorClass::Refused {
                                d.note(&o.id, payment::SERVICE, "declined", Some(e.to_string()));
                                // Its text starts with DECLINED_MARK.
                                return Err(StepError::failed(e));
                            }
                            Err(step_error(e.class(), e))
                        }
                    }
                }
            })
            .compensate(move |cx: StepContext<Order>, charge_id: String| {
                let d = d6.clone();
                async move {
                    let id = &cx.input().id;
                    let r = d
                        .payment
                        .refund(id, &charge_id, &opts(&cx))
                        .await
                        .map_err(StepError::retryable)?;
                    d.note(id, payment::SERVICE, "refunded", Some(r.refund_id));
                    Ok(())
                }
            }),
        )
        .step(
            Step::new("ship", move |cx: StepContext<Order>| {
                let d = d7.clone();
                async move {
                    let o = cx.input();
                    let s = d
                        .shipping
                        .create(&o.id, &o.items, &opts(&cx))
                        .await
                        .map_err(|e| StepError::retryable(format!("shipping: {e}")))?;
                    d.note(
                        &o.id,
                        shipping::SERVICE,
                        "shipment_created",
                        Some(s.tracking),
                    );
                    d.inventory
                        .commit(&o.id, &opts(&cx))
                        .await
                        .map_err(|e| StepError::retryable(format!("commit: {e}")))?;
                    d.note(&o.id, inventory::SERVICE, "committed", None);
                    Ok(())
                }
            })
            // Past the shipment there is no way back: retry for about ten minutes.
            .policy(
                StepPolicy::action()
                    .attempts(ship_attempts)
                    .backoff(Duration::from_millis(100), Duration::from_secs(2)),
            ),
        )
        .step(Step::new("complete", move |cx: StepContext<Order>| {
            let d = d8.clone();
            async move {
                d.book
                    .finish(&cx.input().id, ORDER_SERVICE, None)
                    .await
                    .map_err(StepError::retryable)?;
                Ok(())
            }
        }))
}
