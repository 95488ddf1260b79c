//! Payment: charges and refunds, over internal gRPC (`shop.payment.v1.Payment`,
//! `proto/payment.proto`) and as a request/reply responder on the bus.
//!
//! # Rules
//!
//! - **Idempotent charge.** A charge runs once per idempotency key (the call's
//!   `idempotency-key`; without one, `order:<order_id>`, so an order is charged at most
//!   once by default). The same key again returns the same charge; the same key with a
//!   different order, customer, amount or token is [`PaymentError::KeyReused`].
//! - **Declines by rule** ([`PaymentError::Declined`], gRPC `FAILED_PRECONDITION`):
//!   the token [`DECLINE_TOKEN`] always declines; an amount over the customer's limit
//!   declines ([`limit_for`]: `vip-*` 10 000 000 cents, `broke-*` 0, others 100 000,
//!   overridable per customer in [`LIMITS`]). A decline records nothing.
//! - **Idempotent refund.** A charge is refunded in full at most once; refunding it
//!   again returns the same refund. Refunding an unknown charge is
//!   [`PaymentError::UnknownCharge`].
//! - [`Payments::ledger`] sums charged and refunded cents per order, for invariant
//!   checks (zero duplicate charges).
//!
//! The same core serves the gRPC API ([`start`], [`PaymentClient`]) and the bus
//! responder ([`respond`]), where the effect commits in the request's transaction with
//! the stored reply.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use switchyard::reply::{IDEMPOTENCY_KEY_EXTENSION, RemoteErrorKind, RequestError};
use switchyard::router::{Context, HandlerError, Router};
use switchyard::store::{Store, Table, Txn};
use switchyard_rpc::grpc::{GrpcClient, GrpcRequestExt, invalid_argument};
use switchyard_rpc::{CallContext, CallOptions};
use tokio::net::TcpListener;
use tonic::metadata::MetadataValue;
use tonic::{Code, Request, Response, Status};

use super::{ErrorClass, Running, ServeError, atomically, class_of_call, now_ms, url_of};
use crate::faults::{FaultLayer, Faults};
use crate::model::{
    Cents, ChargeReply, ChargeRequest, Invalid, OrderId, PAYMENT_REQUESTS, RefundReply,
    RefundRequest, validate_id,
};

/// The generated gRPC code of `proto/payment.proto` (messages, client, server).
#[allow(missing_docs, clippy::all, clippy::pedantic, clippy::unwrap_used)]
#[rustfmt::skip]
#[path = "generated/shop.payment.v1.rs"]
pub mod proto;

/// The service's name (in the registry and in spans).
pub const SERVICE: &str = "payment";

/// The consumer group of the bus responder ([`respond`]).
pub const GROUP: &str = "payment";

/// The token that always declines.
pub const DECLINE_TOKEN: &str = "tok_decline";

/// The limit of an ordinary customer, in cents.
pub const DEFAULT_LIMIT: Cents = 100_000;

/// The limit of a `vip-*` customer, in cents.
pub const VIP_LIMIT: Cents = 10_000_000;

/// Metadata on the service's FAILED_PRECONDITION / NOT_FOUND statuses saying which
/// rule answered: `declined`, `idempotency-mismatch` or `unknown-charge`.
pub const ERROR_METADATA: &str = "x-shop-error";

/// Charges (key: charge id).
pub const CHARGES: Table<Charge> = Table::new("payment.charges");

/// Charge ids by idempotency key.
pub const CHARGE_KEYS: Table<String> = Table::new("payment.charge_keys");

/// Refunds (key: the refunded charge's id).
pub const REFUNDS: Table<Refund> = Table::new("payment.refunds");

/// Per-customer limit overrides, in cents (key: customer id).
pub const LIMITS: Table<Cents> = Table::new("payment.limits");

/// A charge as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Charge {
    /// Its id (`ch_…`).
    pub charge_id: String,
    /// The order.
    pub order_id: OrderId,
    /// The customer.
    pub customer: String,
    /// The amount.
    pub amount_cents: Cents,
    /// The idempotency key it was made under.
    pub key: String,
    /// Fingerprint of the request (order, customer, amount, token): a reused key must
    /// match it.
    pub fingerprint: String,
    /// When (Unix ms).
    pub at_ms: u64,
}

/// A refund as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refund {
    /// Its id (`re_…`).
    pub refund_id: String,
    /// The refunded charge.
    pub charge_id: String,
    /// The order.
    pub order_id: OrderId,
    /// The amount refunded (the whole charge).
    pub amount_cents: Cents,
    /// When (Unix ms).
    pub at_ms: u64,
}

/// Charged and refunded money per order (for invariant checks).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    /// Cents charged per order.
    pub charged: BTreeMap<OrderId, Cents>,
    /// Number of charges per order (more than one is a duplicate charge unless the
    /// caller used distinct keys on purpose).
    pub charges: BTreeMap<OrderId, u32>,
    /// Cents refunded per order.
    pub refunded: BTreeMap<OrderId, Cents>,
}

impl Ledger {
    /// Charged minus refunded for `order_id`.
    pub fn net(&self, order_id: &str) -> i128 {
        i128::from(self.charged.get(order_id).copied().unwrap_or(0))
            - i128::from(self.refunded.get(order_id).copied().unwrap_or(0))
    }

    /// Orders charged more than once.
    pub fn charged_twice(&self) -> Vec<&str> {
        self.charges
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(o, _)| o.as_str())
            .collect()
    }
}

/// Everything that can go wrong with a payment operation, on the server (core logic)
/// and in the clients (gRPC and bus) alike.
#[derive(Debug, thiserror::Error)]
pub enum PaymentError {
    /// The request is malformed; fix the named field.
    #[error("{0}")]
    Invalid(#[from] Invalid),
    /// The payment was declined (a business answer: asking again gets the same).
    #[error("payment declined: {reason}")]
    Declined {
        /// Why.
        reason: String,
    },
    /// The idempotency key was used before for a different charge: use a new key per
    /// charge.
    #[error("idempotency key `{key}` was used for a different charge ({detail}); use a new key")]
    KeyReused {
        /// The key.
        key: String,
        /// What differs.
        detail: String,
    },
    /// No such charge (refund of an unknown charge id).
    #[error("unknown charge `{charge_id}`; refund a charge id returned by Charge")]
    UnknownCharge {
        /// The charge id.
        charge_id: String,
    },
    /// The payment store failed; retry later (with the same idempotency key).
    #[error("the payment store failed: {0}; retry later with the same key")]
    Store(#[from] switchyard::Error),
    /// The gRPC call failed (client side): see its `kind()`.
    #[error("calling payment failed: {0}")]
    Call(#[source] switchyard_rpc::Error),
    /// The bus request failed (request/reply client side).
    #[error("requesting payment over the bus failed: {0}")]
    Request(#[source] RequestError),
}

const DECLINED: &str = "declined";
const MISMATCH: &str = "idempotency-mismatch";
const UNKNOWN_CHARGE: &str = "unknown-charge";
const INVALID: &str = "invalid";

impl PaymentError {
    /// What to do about it (see [`ErrorClass`]).
    pub fn class(&self) -> ErrorClass {
        match self {
            PaymentError::Invalid(_) | PaymentError::KeyReused { .. } => ErrorClass::Invalid,
            PaymentError::Declined { .. } | PaymentError::UnknownCharge { .. } => {
                ErrorClass::Refused
            }
            PaymentError::Store(_) => ErrorClass::Unavailable,
            PaymentError::Call(e) => class_of_call(e),
            PaymentError::Request(e) => match e {
                RequestError::Timeout { .. } => ErrorClass::DeadlineExceeded,
                RequestError::NoResponders { .. } | RequestError::Bus(_) => ErrorClass::Unavailable,
                RequestError::Remote {
                    kind: RemoteErrorKind::Retryable,
                    ..
                } => ErrorClass::Unavailable,
                _ => ErrorClass::Internal,
            },
        }
    }

    /// Whether Payment may have acted on the request although it failed (the deadline
    /// passed, the connection broke after it was sent, an answer that makes no sense):
    /// ask again with the same key to learn what happened.
    pub fn outcome_unknown(&self) -> bool {
        match self {
            PaymentError::Call(e) => e.outcome_unknown(),
            _ => matches!(
                self.class(),
                ErrorClass::DeadlineExceeded | ErrorClass::Internal
            ),
        }
    }

    /// Whether trying again later (with the same key) may succeed.
    pub fn is_retryable(&self) -> bool {
        self.class().is_retryable()
    }

    /// The gRPC status the server answers with.
    pub fn to_status(&self) -> Status {
        let tagged = |code: Code, tag: &'static str| {
            let mut s = Status::new(code, self.to_string());
            s.metadata_mut()
                .insert(ERROR_METADATA, MetadataValue::from_static(tag));
            s
        };
        match self {
            PaymentError::Invalid(i) => invalid_argument(&i.field, &i.reason),
            PaymentError::Declined { .. } => tagged(Code::FailedPrecondition, DECLINED),
            PaymentError::KeyReused { .. } => tagged(Code::FailedPrecondition, MISMATCH),
            PaymentError::UnknownCharge { .. } => tagged(Code::NotFound, UNKNOWN_CHARGE),
            PaymentError::Store(e) => {
                tracing::error!(error = %e, "payment store failed");
                Status::unavailable("the payment store failed; retry later with the same key")
            }
            PaymentError::Call(_) | PaymentError::Request(_) => Status::internal(self.to_string()),
        }
    }

    /// The typed error of a failed gRPC call.
    pub fn from_status(status: Status) -> Self {
        let tag = status
            .metadata()
            .get(ERROR_METADATA)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let message = status.message().to_string();
        match (status.code(), tag.as_deref()) {
            (Code::FailedPrecondition, Some(DECLINED)) => PaymentError::Declined {
                reason: message
                    .strip_prefix("payment declined: ")
                    .unwrap_or(&message)
                    .to_string(),
            },
            (Code::FailedPrecondition, Some(MISMATCH)) => PaymentError::KeyReused {
                key: String::new(),
                detail: message,
            },
            (Code::NotFound, Some(UNKNOWN_CHARGE)) => PaymentError::UnknownCharge {
                charge_id: String::new(),
            },
            _ => {
                let e = switchyard_rpc::Error::from_grpc(SERVICE, status);
                match (e.kind(), e.field()) {
                    (switchyard_rpc::ErrorKind::Rejected, Some(field)) => {
                        PaymentError::Invalid(Invalid::new(field, e.to_string()))
                    }
                    _ => PaymentError::Call(e),
                }
            }
        }
    }

    /// The handler error of the bus responder: business answers are terminal (replied
    /// and stored), store trouble retryable. The reason starts with a tag
    /// ([`from_request_error`](Self::from_request_error) reads it back).
    pub fn to_handler_error(&self) -> HandlerError {
        match self {
            PaymentError::Declined { reason } => {
                HandlerError::Terminal(format!("{DECLINED}: {reason}"))
            }
            PaymentError::KeyReused { .. } => HandlerError::Terminal(format!("{MISMATCH}: {self}")),
            PaymentError::UnknownCharge { charge_id } => {
                HandlerError::Terminal(format!("{UNKNOWN_CHARGE}: {charge_id}"))
            }
            PaymentError::Invalid(i) => {
                HandlerError::Terminal(format!("{INVALID}: {}: {}", i.field, i.reason))
            }
            PaymentError::Store(_) | PaymentError::Call(_) | PaymentError::Request(_) => {
                HandlerError::Retryable(self.to_string())
            }
        }
    }

    /// The typed error of a failed bus request to the responder.
    pub fn from_request_error(e: RequestError) -> Self {
        if let RequestError::Remote {
            kind: RemoteErrorKind::Terminal,
            reason,
        } = &e
        {
            // The router may prefix the handler's reason (e.g. "terminal: …").
            for (tag, make) in [
                (DECLINED, 0),
                (MISMATCH, 1),
                (UNKNOWN_CHARGE, 2),
                (INVALID, 3),
            ] {
                let Some(pos) = reason.find(&format!("{tag}: ")) else {
                    continue;
                };
                let rest = reason[pos + tag.len() + 2..].to_string();
                return match make {
                    0 => PaymentError::Declined { reason: rest },
                    1 => PaymentError::KeyReused {
                        key: String::new(),
                        detail: rest,
                    },
                    2 => PaymentError::UnknownCharge { charge_id: rest },
                    _ => {
                        let (field, why) = rest.split_once(": ").unwrap_or(("", rest.as_str()));
                        PaymentError::Invalid(Invalid::new(field, why))
                    }
                };
            }
        }
        PaymentError::Request(e)
    }
}

// ---------------------------------------------------------------- core logic

/// The limit of `customer` without an override: `vip-*` [`VIP_LIMIT`], `broke-*` 0,
/// others [`DEFAULT_LIMIT`].
pub fn limit_for(customer: &str) -> Cents {
    if customer.starts_with("vip-") {
        VIP_LIMIT
    } else if customer.starts_with("broke-") {
        0
    } else {
        DEFAULT_LIMIT
    }
}

fn validate_charge(req: &ChargeRequest) -> Result<(), Invalid> {
    validate_id("order_id", &req.order_id)?;
    validate_id("customer", &req.customer)?;
    if req.amount_cents == 0 {
        return Err(Invalid::new("amount_cents", "must be at least 1"));
    }
    if req.payment_token.trim().is_empty() {
        return Err(Invalid::new("payment_token", "must not be empty"));
    }
    if req.payment_token.len() > 256 {
        return Err(Invalid::new(
            "payment_token",
            "must be at most 256 characters",
        ));
    }
    Ok(())
}

fn fingerprint(req: &ChargeRequest) -> String {
    let body = format!(
        "{}\0{}\0{}\0{}",
        req.order_id, req.customer, req.amount_cents, req.payment_token
    );
    switchyard_rpc::idempotency::fingerprint("charge", "", body.as_bytes())
}

/// The key a charge runs under: `key` if given (and not blank), else `order:<order_id>`.
pub fn charge_key(key: Option<&str>, order_id: &str) -> String {
    match key.map(str::trim).filter(|k| !k.is_empty()) {
        Some(k) => k.to_string(),
        None => format!("order:{order_id}"),
    }
}

/// Charges in `txn` per the [rules](self): once per key, declines by rule.
pub async fn charge_in(
    txn: &Txn,
    req: &ChargeRequest,
    key: Option<&str>,
) -> Result<ChargeReply, PaymentError> {
    validate_charge(req)?;
    let key = charge_key(key, &req.order_id);
    if key.len() > 255 {
        return Err(Invalid::new("idempotency-key", "must be at most 255 characters").into());
    }
    let fp = fingerprint(req);
    if let Some(id) = txn.get(&CHARGE_KEYS, &key).await?
        && let Some(c) = txn.get(&CHARGES, &id).await?
    {
        if c.fingerprint != fp {
            return Err(PaymentError::KeyReused {
                key,
                detail: format!(
                    "first used for order `{}`, {} cents",
                    c.order_id, c.amount_cents
                ),
            });
        }
        return Ok(reply_of(&c));
    }
    if req.payment_token == DECLINE_TOKEN {
        return Err(PaymentError::Declined {
            reason: format!("the card was declined (token `{DECLINE_TOKEN}`)"),
        });
    }
    let limit = txn
        .get(&LIMITS, &req.customer)
        .await?
        .unwrap_or_else(|| limit_for(&req.customer));
    if req.amount_cents > limit {
        return Err(PaymentError::Declined {
            reason: format!(
                "{} cents is over the limit of customer `{}` ({limit} cents)",
                req.amount_cents, req.customer
            ),
        });
    }
    let charge = Charge {
        charge_id: format!("ch_{}", uuid::Uuid::now_v7().simple()),
        order_id: req.order_id.clone(),
        customer: req.customer.clone(),
        amount_cents: req.amount_cents,
        key: key.clone(),
        fingerprint: fp,
        at_ms: now_ms(),
    };
    txn.put(&CHARGES, &charge.charge_id, &charge)?;
    txn.put(&CHARGE_KEYS, &key, &charge.charge_id)?;
    Ok(reply_of(&charge))
}

fn reply_of(c: &Charge) -> ChargeReply {
    ChargeReply {
        order_id: c.order_id.clone(),
        charge_id: c.charge_id.clone(),
        status: "succeeded".into(),
        amount_cents: c.amount_cents,
    }
}

/// Refunds charge `charge_id` of `order_id` in `txn`, once.
pub async fn refund_in(
    txn: &Txn,
    order_id: &str,
    charge_id: &str,
) -> Result<RefundReply, PaymentError> {
    validate_id("order_id", order_id)?;
    validate_id("charge_id", charge_id)?;
    let Some(charge) = txn.get(&CHARGES, charge_id).await? else {
        return Err(PaymentError::UnknownCharge {
            charge_id: charge_id.to_string(),
        });
    };
    if charge.order_id != order_id {
        return Err(Invalid::new(
            "charge_id",
            format!("charge `{charge_id}` belongs to another order"),
        )
        .into());
    }
    let refund = match txn.get(&REFUNDS, charge_id).await? {
        Some(r) => r,
        None => {
            let r = Refund {
                refund_id: format!("re_{}", uuid::Uuid::now_v7().simple()),
                charge_id: charge_id.to_string(),
                order_id: order_id.to_string(),
                amount_cents: charge.amount_cents,
                at_ms: now_ms(),
            };
            txn.put(&REFUNDS, charge_id, &r)?;
            r
        }
    };
    Ok(RefundReply {
        order_id: refund.order_id,
        refund_id: refund.refund_id,
        amount_cents: refund.amount_cents,
    })
}

/// The payment core over its store. Cheap to clone.
#[derive(Clone)]
pub struct Payments {
    store: Arc<dyn Store>,
}

impl std::fmt::Debug for Payments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Payments").finish_non_exhaustive()
    }
}

impl Payments {
    /// The payment core over `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Payments { store }
    }

    /// Charges once per key (see [`charge_in`]).
    pub async fn charge(
        &self,
        req: &ChargeRequest,
        key: Option<&str>,
    ) -> Result<ChargeReply, PaymentError> {
        atomically(
            &self.store,
            |txn| async move { charge_in(&txn, req, key).await },
        )
        .await
    }

    /// Refunds once (see [`refund_in`]).
    pub async fn refund(
        &self,
        order_id: &str,
        charge_id: &str,
    ) -> Result<RefundReply, PaymentError> {
        atomically(&self.store, |txn| async move {
            refund_in(&txn, order_id, charge_id).await
        })
        .await
    }

    /// Sets `customer`'s limit (overrides [`limit_for`]).
    pub async fn set_limit(&self, customer: &str, cents: Cents) -> Result<(), PaymentError> {
        validate_id("customer", customer)?;
        atomically(&self.store, |txn| {
            std::future::ready(
                txn.put(&LIMITS, customer, &cents)
                    .map_err(PaymentError::from),
            )
        })
        .await
    }

    /// Charged and refunded cents per order.
    pub async fn ledger(&self) -> Result<Ledger, PaymentError> {
        let txn = Txn::new(self.store.clone());
        let mut ledger = Ledger::default();
        for (_, c) in txn.scan(&CHARGES, "", usize::MAX).await? {
            *ledger.charged.entry(c.order_id.clone()).or_default() += c.amount_cents;
            *ledger.charges.entry(c.order_id).or_default() += 1;
        }
        for (_, r) in txn.scan(&REFUNDS, "", usize::MAX).await? {
            *ledger.refunded.entry(r.order_id).or_default() += r.amount_cents;
        }
        Ok(ledger)
    }
}

// ---------------------------------------------------------------- gRPC

/// The gRPC implementation of `shop.payment.v1.Payment` over [`Payments`].
#[derive(Debug, Clone)]
pub struct PaymentService {
    payments: Payments,
}

impl PaymentService {
    /// The service over `payments`.
    pub fn new(payments: Payments) -> Self {
        PaymentService { payments }
    }
}

fn key_of<T>(req: &Request<T>) -> Option<String> {
    req.extensions()
        .get::<CallContext>()
        .cloned()
        .or_else(CallContext::current)
        .and_then(|c| c.idempotency_key)
}

#[tonic::async_trait]
impl proto::payment_server::Payment for PaymentService {
    async fn charge(
        &self,
        request: Request<proto::ChargeRequest>,
    ) -> Result<Response<proto::ChargeReply>, Status> {
        let key = key_of(&request);
        let m = request.into_inner();
        let req = ChargeRequest {
            order_id: m.order_id,
            customer: m.customer,
            amount_cents: m.amount_cents,
            payment_token: m.payment_token,
        };
        let r = self
            .payments
            .charge(&req, key.as_deref())
            .await
            .map_err(|e| e.to_status())?;
        Ok(Response::new(proto::ChargeReply {
            charge_id: r.charge_id,
            status: r.status,
            amount_cents: r.amount_cents,
        }))
    }

    async fn refund(
        &self,
        request: Request<proto::RefundRequest>,
    ) -> Result<Response<proto::RefundReply>, Status> {
        let m = request.into_inner();
        let r = self
            .payments
            .refund(&m.order_id, &m.charge_id)
            .await
            .map_err(|e| e.to_status())?;
        Ok(Response::new(proto::RefundReply {
            refund_id: r.refund_id,
            amount_cents: r.amount_cents,
        }))
    }
}

/// Serves `shop.payment.v1.Payment` over `store` on `listener` until `shutdown`
/// completes, with `grpc.health.v1.Health`, switchyard-rpc's context/deadline layer,
/// the [fault layer](crate::faults::FaultLayer) on the payment calls, and the fault
/// admin routes over HTTP/1.1 on the same port (`/admin/fault`). Registers nothing.
pub async fn start(
    store: Arc<dyn Store>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Running, ServeError> {
    let url = url_of(&listener)?;
    let faults = Faults::new();
    let payment = tower::Layer::layer(
        &FaultLayer::new(faults.clone()),
        proto::payment_server::PaymentServer::new(PaymentService::new(Payments::new(store))),
    );
    let task = super::spawn_grpc(SERVICE, payment, faults.clone(), listener, shutdown).await;
    tracing::info!(service = SERVICE, %url, "serving gRPC");
    Ok(Running { url, faults, task })
}

// ---------------------------------------------------------------- client

/// The typed gRPC client of the payment service, by service name [`SERVICE`]. Pass an
/// idempotency key in the [`CallOptions`] of every charge (e.g. `<order>:charge`): it
/// makes the call retryable and the charge happen once. Cheap to clone.
#[derive(Debug, Clone)]
pub struct PaymentClient {
    inner: proto::payment_client::PaymentClient<switchyard_rpc::grpc::GrpcChannel>,
}

impl PaymentClient {
    /// The client of service [`SERVICE`] through `grpc`.
    pub fn new(grpc: &GrpcClient) -> Self {
        PaymentClient {
            inner: proto::payment_client::PaymentClient::new(grpc.channel(SERVICE)),
        }
    }

    /// Charges an order (see the [rules](self)).
    pub async fn charge(
        &self,
        req: &ChargeRequest,
        opts: &CallOptions,
    ) -> Result<ChargeReply, PaymentError> {
        let msg = proto::ChargeRequest {
            order_id: req.order_id.clone(),
            customer: req.customer.clone(),
            amount_cents: req.amount_cents,
            payment_token: req.payment_token.clone(),
        };
        let r = self
            .inner
            .clone()
            .charge(Request::new(msg).with_options(opts.clone()))
            .await
            .map_err(|s| match PaymentError::from_status(s) {
                PaymentError::KeyReused { detail, .. } => PaymentError::KeyReused {
                    key: charge_key(opts.idempotency_key.as_deref(), &req.order_id),
                    detail,
                },
                other => other,
            })?
            .into_inner();
        Ok(ChargeReply {
            order_id: req.order_id.clone(),
            charge_id: r.charge_id,
            status: r.status,
            amount_cents: r.amount_cents,
        })
    }

    /// Refunds a charge (idempotent: the call is always retryable).
    pub async fn refund(
        &self,
        order_id: &str,
        charge_id: &str,
        opts: &CallOptions,
    ) -> Result<RefundReply, PaymentError> {
        let msg = proto::RefundRequest {
            order_id: order_id.to_string(),
            charge_id: charge_id.to_string(),
        };
        let r = self
            .inner
            .clone()
            .refund(Request::new(msg).with_options(opts.clone().idempotent()))
            .await
            .map_err(|s| match PaymentError::from_status(s) {
                PaymentError::UnknownCharge { .. } => PaymentError::UnknownCharge {
                    charge_id: charge_id.to_string(),
                },
                other => other,
            })?
            .into_inner();
        Ok(RefundReply {
            order_id: order_id.to_string(),
            refund_id: r.refund_id,
            amount_cents: r.amount_cents,
        })
    }
}

// ---------------------------------------------------------------- bus responder

/// Registers the payment responders on `router` (which must run on the payment
/// service's store): [`ChargeRequest`] → [`ChargeReply`] and [`RefundRequest`] →
/// [`RefundReply`] on [`PAYMENT_REQUESTS`], group [`GROUP`]. The charge's key is the
/// request's idempotency key (`RequestOptions::idempotency_key`), else
/// `order:<order_id>`; the effect commits in the request's transaction with the stored
/// reply. A decline is a terminal error reply (`declined: …`), read back on the caller
/// side with [`PaymentError::from_request_error`].
pub fn respond(router: &mut Router) {
    router.respond(
        PAYMENT_REQUESTS,
        GROUP,
        |ctx: Context, req: ChargeRequest| async move {
            let key = ctx
                .envelope
                .extension(IDEMPOTENCY_KEY_EXTENSION)
                .map(str::to_string);
            charge_in(&ctx.txn, &req, key.as_deref())
                .await
                .map_err(|e| e.to_handler_error())
        },
    );
    router.respond(
        PAYMENT_REQUESTS,
        GROUP,
        |ctx: Context, req: RefundRequest| async move {
            refund_in(&ctx.txn, &req.order_id, &req.charge_id)
                .await
                .map_err(|e| e.to_handler_error())
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard::store::MemoryStore;

    fn req(order: &str, customer: &str, cents: u64, token: &str) -> ChargeRequest {
        ChargeRequest {
            order_id: order.into(),
            customer: customer.into(),
            amount_cents: cents,
            payment_token: token.into(),
        }
    }

    #[tokio::test]
    async fn rules() {
        let p = Payments::new(Arc::new(MemoryStore::new()));
        let a = p
            .charge(&req("o-1", "c", 500, "tok"), Some("k1"))
            .await
            .unwrap();
        let b = p
            .charge(&req("o-1", "c", 500, "tok"), Some("k1"))
            .await
            .unwrap();
        assert_eq!(a, b);
        assert!(matches!(
            p.charge(&req("o-1", "c", 600, "tok"), Some("k1")).await,
            Err(PaymentError::KeyReused { .. })
        ));
        assert!(matches!(
            p.charge(&req("o-2", "c", 100_001, "tok"), None).await,
            Err(PaymentError::Declined { .. })
        ));
        assert!(
            p.charge(&req("o-2", "vip-1", 100_001, "tok"), None)
                .await
                .is_ok()
        );
        assert!(matches!(
            p.charge(&req("o-3", "broke-1", 1, "tok"), None).await,
            Err(PaymentError::Declined { .. })
        ));
        assert!(matches!(
            p.charge(&req("o-3", "c", 1, DECLINE_TOKEN), None).await,
            Err(PaymentError::Declined { .. })
        ));
        let r1 = p.refund("o-1", &a.charge_id).await.unwrap();
        let r2 = p.refund("o-1", &a.charge_id).await.unwrap();
        assert_eq!(r1, r2);
        assert!(matches!(
            p.refund("o-1", "ch_nope").await,
            Err(PaymentError::UnknownCharge { .. })
        ));
        let l = p.ledger().await.unwrap();
        assert_eq!(l.charged.get("o-1"), Some(&500));
        assert_eq!(l.refunded.get("o-1"), Some(&500));
        assert_eq!(l.net("o-1"), 0);
        assert!(l.charged_twice().is_empty());
    }

    #[test]
    fn handler_errors_round_trip() {
        let e = PaymentError::Declined {
            reason: "too much".into(),
        };
        let HandlerError::Terminal(reason) = e.to_handler_error() else {
            panic!("terminal expected")
        };
        let back = PaymentError::from_request_error(RequestError::Remote {
            kind: RemoteErrorKind::Terminal,
            reason,
        });
        assert!(matches!(back, PaymentError::Declined { reason } if reason == "too much"));
    }
}
