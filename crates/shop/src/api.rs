//! The Order service's public API over an [`OrderDesk`]: REST (axum, through
//! [`switchyard_rpc::http`]) and gRPC (`shop.order.v1.Orders`, `proto/order.proto`, see
//! [`grpc`]), plus the operator endpoints the `shop` CLI talks to.
//!
//! # REST
//!
//! | request | answer |
//! | --- | --- |
//! | `POST /orders[?wait=5s]` [`NewOrder`] | `201` the terminal [`Order`] (the sync pattern, or an async one that ended within `wait`); `202` the accepted order with `Location: /orders/{id}` (still in flight); `409` [`problems::ORDER_EXISTS`]; `422` validation naming the `field`; `503` [`problems::UNAVAILABLE`] (the pattern is not running, a store is down: retry with the same `order_id`) |
//! | `GET /orders/{id}[?wait=5s]` | `200` the [`Order`] with its timeline (after waiting up to `wait` for a terminal status; check its `status`); `404` [`problems::UNKNOWN_ORDER`]; `422` for an id with bad characters |
//! | `GET /orders[?status=accepted\|completed\|failed][&limit=50]` | `200` [`OrderList`] (by id; without `status`, every status); `422` naming `status` / `limit` |
//! | `GET /orders/counts` | `200` [`OrderCounts`] |
//! | `GET /patterns` | `200` [`PatternList`]: the patterns this shop runs |
//! | `GET /services` | `200` [`ServiceList`]: every service's URL (for `shop fault`) |
//! | `GET /sagas[?state=running][&limit=50]` | `200` [`SagaList`] ([`Admin::sagas`]) |
//! | `GET /dlq[?topic=shop.orders][&limit=100]` | `200` [`DeadLetterList`] ([`Admin::dead_letters`]) |
//! | `POST /dlq/replay` [`ReplayRequest`] | `200` [`ReplayOutcome`] ([`Admin::replay`]) |
//! | `GET /check` | `200` [`CheckReport`] ([`Admin::check`]) |
//!
//! `wait` is a [humantime](https://docs.rs/humantime) duration (`500ms`, `5s`; a bare
//! number is seconds), capped at [`MAX_WAIT`]. Every malformed request — bad JSON, a
//! missing field, an unknown SKU or pattern, a zero or huge quantity, an oversize body
//! ([`BODY_LIMIT`]), a wrong content type, an unknown query parameter, an id with bad
//! characters — is a 4xx `application/problem+json` naming what is wrong, and records
//! nothing. The operator endpoints answer `501` [`problems::NOT_WIRED`] until an
//! [`Admin`] implements them.
//!
//! Plus `/healthz`, `/readyz` and `/admin/fault` (see [`crate::faults`]; the fault
//! settings act on the order endpoints of both servers, never on the operator ones, so
//! `shop fault` keeps working while the Order service is "down").
//!
//! # Starting
//!
//! ```no_run
//! # async fn demo(desk: shop::order::OrderDesk) -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! let rest = tokio::net::TcpListener::bind("127.0.0.1:7000").await?;
//! let grpc = tokio::net::TcpListener::bind("127.0.0.1:7001").await?;
//! let api = shop::api::start(desk, Arc::new(shop::api::NoAdmin), rest, grpc, std::future::pending()).await?;
//! println!("REST {} gRPC {}", api.rest_url, api.grpc_url);
//! # Ok(()) }
//! ```

pub mod grpc;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::extract::{FromRequestParts, Path, State};
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::request::Parts;
use http::{HeaderValue, StatusCode, Uri, header};
use serde::{Deserialize, Serialize};
use switchyard::Timestamp;
use switchyard::bus::DeadLetter;
use switchyard::saga::{SagaRecord, SagaState};
use switchyard_rpc::Problem;
use switchyard_rpc::http::{Json, ServerOptions, router, serve};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::faults::{self, Faults};
use crate::model::{Invalid, validate_id};
use crate::order::{BookError, NewOrder, Order, OrderDesk, OrderStatus, Pattern, PlaceError};
use crate::services::ServeError;

/// The service's name (in the registry, in spans and in [`ServiceList`]).
pub const SERVICE: &str = "order";

/// The name of the Order service's gRPC server in [`ServiceList`].
pub const GRPC_SERVICE: &str = "order-grpc";

/// The largest request body the REST API accepts (64 KiB; an order has at most 100
/// lines).
pub const BODY_LIMIT: usize = 64 * 1024;

/// The longest a request may wait for an order to end (`?wait=`, `wait_ms`); longer
/// waits are cut to this.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

/// How many orders, sagas or dead letters a list answers without a `limit`.
pub const DEFAULT_LIMIT: usize = 50;

/// The largest `limit` of a list.
pub const MAX_LIMIT: usize = 1000;

/// The `type` URIs of the Order API's own problem documents (validation, malformed
/// JSON, too large, wrong content type come from [`switchyard_rpc::problem::types`]).
pub mod problems {
    /// An order with this id exists already; `order_id` names it. Read it with
    /// `GET /orders/{id}`.
    pub const ORDER_EXISTS: &str = "https://switchyard.dev/problems/shop/order-exists";
    /// No order with this id; `order_id` names it.
    pub const UNKNOWN_ORDER: &str = "https://switchyard.dev/problems/shop/unknown-order";
    /// The shop cannot take the order now (its pattern is not running, a store or a
    /// dependency is down): retry later with the same `order_id`.
    pub const UNAVAILABLE: &str = "https://switchyard.dev/problems/shop/unavailable";
    /// The operator endpoint is not available in this shop (no [`Admin`](super::Admin)
    /// implements it).
    pub const NOT_WIRED: &str = "https://switchyard.dev/problems/shop/not-wired";
}

// ---------------------------------------------------------------- errors

/// What an operator endpoint ([`Admin`]) can fail with.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// This shop does not offer the operation (501): it runs without the part that
    /// answers it (e.g. no orchestration pattern, so no sagas).
    #[error("`{0}` is not available in this shop (it is not wired to the running app)")]
    NotWired(&'static str),
    /// This process cannot answer the operation in the way it runs (501): `how` says
    /// what to run instead.
    #[error("`{what}` is not available from this process: {how}")]
    NotHere {
        /// The operation.
        what: &'static str,
        /// How to run the shop so that it is.
        how: &'static str,
    },
    /// The request is invalid (422): the field and why.
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// The operation failed (503): a store or the bus is unavailable; retry later.
    #[error("{0}; retry later")]
    Failed(String),
}

/// Why an Order API request failed; each variant is one HTTP status and one gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The order could not be placed (422 / 409 / 503).
    #[error(transparent)]
    Place(#[from] PlaceError),
    /// A request field or parameter is invalid (422, INVALID_ARGUMENT naming it).
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// No order with this id (404, NOT_FOUND).
    #[error("no order `{0}`; list orders with `GET /orders`")]
    NotFound(String),
    /// The order book failed (503, UNAVAILABLE): retry later.
    #[error("the order store failed: {0}; retry later")]
    Store(String),
    /// An operator endpoint failed.
    #[error(transparent)]
    Admin(#[from] AdminError),
}

impl From<BookError> for ApiError {
    fn from(e: BookError) -> Self {
        match e {
            BookError::NotFound(id) => ApiError::NotFound(id),
            BookError::Exists(id) => ApiError::Place(PlaceError::Exists(id)),
            BookError::Store(e) => ApiError::Store(e.to_string()),
        }
    }
}

impl ApiError {
    /// The problem document the REST API answers with.
    pub fn to_problem(&self) -> Problem {
        let unavailable = |detail: String| {
            Problem::new(
                problems::UNAVAILABLE,
                StatusCode::SERVICE_UNAVAILABLE,
                "Cannot take the order now",
            )
            .with_detail(detail)
        };
        match self {
            ApiError::Place(PlaceError::Invalid(i)) | ApiError::Invalid(i) => {
                Problem::validation(&i.field, &i.reason)
            }
            ApiError::Admin(AdminError::Invalid(i)) => Problem::validation(&i.field, &i.reason),
            ApiError::Place(PlaceError::Exists(id)) => Problem::new(
                problems::ORDER_EXISTS,
                StatusCode::CONFLICT,
                "Order exists",
            )
            .with_detail(format!(
                "order `{id}` exists already; read it with GET /orders/{id} or use a new order_id"
            ))
            .with("order_id", id.as_str()),
            ApiError::Place(PlaceError::Unavailable(why)) => {
                unavailable(self.to_string()).with("reason", why.as_str())
            }
            ApiError::NotFound(id) => Problem::new(
                problems::UNKNOWN_ORDER,
                StatusCode::NOT_FOUND,
                "Unknown order",
            )
            .with_detail(self.to_string())
            .with("order_id", id.as_str()),
            ApiError::Store(e) => {
                tracing::error!(error = %e, "order store failed");
                unavailable(self.to_string())
            }
            ApiError::Admin(AdminError::NotWired(what) | AdminError::NotHere { what, .. }) => {
                Problem::new(
                    problems::NOT_WIRED,
                    StatusCode::NOT_IMPLEMENTED,
                    "Not available",
                )
                .with_detail(self.to_string())
                .with("operation", *what)
            }
            ApiError::Admin(AdminError::Failed(e)) => {
                tracing::error!(error = %e, "operator endpoint failed");
                unavailable(self.to_string())
            }
        }
    }

    /// The gRPC status the gRPC API answers with.
    pub fn to_status(&self) -> tonic::Status {
        match self {
            ApiError::Place(PlaceError::Invalid(i))
            | ApiError::Invalid(i)
            | ApiError::Admin(AdminError::Invalid(i)) => {
                switchyard_rpc::grpc::invalid_argument(&i.field, &i.reason)
            }
            ApiError::Place(PlaceError::Exists(_)) => {
                tonic::Status::already_exists(self.to_string())
            }
            ApiError::NotFound(_) => tonic::Status::not_found(self.to_string()),
            ApiError::Place(PlaceError::Unavailable(_))
            | ApiError::Store(_)
            | ApiError::Admin(AdminError::Failed(_)) => {
                tonic::Status::unavailable(self.to_string())
            }
            ApiError::Admin(AdminError::NotWired(_) | AdminError::NotHere { .. }) => {
                tonic::Status::unimplemented(self.to_string())
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.to_problem().into_response()
    }
}

// ---------------------------------------------------------------- bodies

/// `GET /orders`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderList {
    /// The orders, by id.
    pub orders: Vec<Order>,
}

/// `GET /orders/counts`: how many orders are in each status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderCounts {
    /// In flight.
    pub accepted: u64,
    /// Completed.
    pub completed: u64,
    /// Failed.
    pub failed: u64,
}

/// `GET /patterns`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatternList {
    /// The patterns this shop can place orders with.
    pub patterns: Vec<Pattern>,
}

/// One running service, as `GET /services` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceInfo {
    /// Its name (`order`, `inventory`, `payment`, …).
    pub name: String,
    /// Its base URL; `<url>/admin/fault` sets its faults.
    pub url: String,
    /// `http` (REST) or `grpc` (gRPC, with the admin routes over HTTP/1.1 on the same port).
    pub protocol: String,
}

impl ServiceInfo {
    /// Service `name` at `url`, speaking `protocol`.
    pub fn new(
        name: impl Into<String>,
        url: impl Into<String>,
        protocol: impl Into<String>,
    ) -> Self {
        ServiceInfo {
            name: name.into(),
            url: url.into(),
            protocol: protocol.into(),
        }
    }
}

/// `GET /services`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceList {
    /// Every service, the Order API's own two servers first.
    pub services: Vec<ServiceInfo>,
}

/// `GET /sagas`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SagaList {
    /// The sagas.
    pub sagas: Vec<SagaRecord>,
}

/// A dead letter as `GET /dlq` shows it (the envelope's payload left out).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetterView {
    /// Its position in `<topic>.dlq`.
    pub dlq_offset: u64,
    /// The topic the message came from.
    pub topic: String,
    /// The consumer group that failed it.
    pub group: String,
    /// The message id (replay by it).
    pub id: String,
    /// The event type.
    pub event_type: String,
    /// The subject (the order id for shop events).
    pub subject: Option<String>,
    /// Why it failed last.
    pub reason: String,
    /// Deliveries made.
    pub attempts: u32,
    /// When it first failed.
    pub first_failure: Timestamp,
    /// When it last failed.
    pub last_failure: Timestamp,
}

impl From<&DeadLetter> for DeadLetterView {
    fn from(d: &DeadLetter) -> Self {
        DeadLetterView {
            dlq_offset: d.dlq_offset,
            topic: d.topic.clone(),
            group: d.group.clone(),
            id: d.envelope.id.to_string(),
            event_type: d.envelope.event_type.clone(),
            subject: d.envelope.subject.clone(),
            reason: d.reason.clone(),
            attempts: d.attempts,
            first_failure: d.first_failure,
            last_failure: d.last_failure,
        }
    }
}

/// `GET /dlq`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetterList {
    /// The dead letters.
    pub dead_letters: Vec<DeadLetterView>,
}

/// The body of `POST /dlq/replay`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayRequest {
    /// The topic whose dead letters to replay (`shop.orders`, …).
    pub topic: String,
    /// Only those dead-lettered by this consumer group (absent: every group).
    #[serde(default)]
    pub group: Option<String>,
    /// Only these message ids (absent: every dead letter of the topic).
    #[serde(default)]
    pub ids: Option<Vec<String>>,
}

/// The answer of `POST /dlq/replay`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplayOutcome {
    /// The topic.
    pub topic: String,
    /// How many messages were published again.
    pub replayed: u64,
}

/// One invariant or health check of `GET /check`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckItem {
    /// What is checked (`orders placed = orders terminal`, `no duplicate charge`, …).
    pub name: String,
    /// Whether it holds.
    pub ok: bool,
    /// The figures behind it.
    pub detail: String,
}

/// `GET /check`: the shop's invariants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckReport {
    /// Every check holds.
    pub ok: bool,
    /// The checks.
    pub checks: Vec<CheckItem>,
}

impl CheckReport {
    /// A report of `checks` (ok when every one is).
    pub fn new(checks: Vec<CheckItem>) -> Self {
        CheckReport {
            ok: checks.iter().all(|c| c.ok),
            checks,
        }
    }
}

// ---------------------------------------------------------------- admin

/// The operator side of the shop that the Order API exposes but does not own: the
/// running app implements it (the services' URLs, the saga orchestrator, the bus's
/// dead letters, the invariant checks). Every method has a default answering
/// [`AdminError::NotWired`] (`501`), so an app implements what it has.
#[async_trait]
pub trait Admin: Send + Sync + 'static {
    /// The running services other than the Order API itself (which `GET /services`
    /// adds): name, URL, protocol.
    fn services(&self) -> Vec<ServiceInfo> {
        Vec::new()
    }

    /// Up to `limit` sagas, only those in `state` if given.
    async fn sagas(
        &self,
        state: Option<SagaState>,
        limit: usize,
    ) -> Result<Vec<SagaRecord>, AdminError> {
        let _ = (state, limit);
        Err(AdminError::NotWired("sagas"))
    }

    /// Up to `limit` dead letters of `topic` (every shop topic if `None`).
    async fn dead_letters(
        &self,
        topic: Option<String>,
        limit: usize,
    ) -> Result<Vec<DeadLetterView>, AdminError> {
        let _ = (topic, limit);
        Err(AdminError::NotWired("dead letters"))
    }

    /// Publishes dead letters again.
    async fn replay(&self, request: ReplayRequest) -> Result<ReplayOutcome, AdminError> {
        let _ = request;
        Err(AdminError::NotWired("dead-letter replay"))
    }

    /// Checks the shop's invariants.
    async fn check(&self) -> Result<CheckReport, AdminError> {
        Err(AdminError::NotWired("check"))
    }
}

/// An [`Admin`] with nothing wired: every operator endpoint answers `501`, `GET
/// /services` lists only the Order API.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoAdmin;

impl Admin for NoAdmin {}

// ---------------------------------------------------------------- parameters

/// Parses a `wait` value: a humantime duration (`500ms`, `5s`, `1m`) or a bare number
/// of seconds; longer than [`MAX_WAIT`] is cut to it.
pub fn parse_wait(s: &str) -> Result<Duration, Invalid> {
    let s = s.trim();
    let d = if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        s.parse::<u64>()
            .map(Duration::from_secs)
            .map_err(|e| Invalid::new("wait", e.to_string()))?
    } else {
        humantime::parse_duration(s).map_err(|e| {
            Invalid::new(
                "wait",
                format!("`{s}` is not a duration ({e}); use e.g. 500ms, 5s, 1m"),
            )
        })?
    };
    Ok(d.min(MAX_WAIT))
}

/// Parses a `limit` value: 1 to [`MAX_LIMIT`].
pub fn parse_limit(s: &str) -> Result<usize, Invalid> {
    match s.trim().parse::<usize>() {
        Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
        _ => Err(Invalid::new(
            "limit",
            format!("`{s}` is not a number from 1 to {MAX_LIMIT}"),
        )),
    }
}

/// Parses a saga state (`running`, `compensating`, `completed`, `compensated`,
/// `needs_attention`).
pub fn parse_saga_state(s: &str) -> Result<SagaState, Invalid> {
    SagaState::ALL
        .into_iter()
        .find(|st| st.as_str() == s)
        .ok_or_else(|| {
            Invalid::new(
                "state",
                format!(
                    "unknown saga state `{s}`; use running, compensating, completed, compensated or needs_attention"
                ),
            )
        })
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn percent_decode(name: &str, s: &str) -> Result<String, Invalid> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let v = bytes
                    .get(i + 1)
                    .and_then(|&h| hex(h))
                    .zip(bytes.get(i + 2).and_then(|&l| hex(l)))
                    .map(|(h, l)| h * 16 + l)
                    .ok_or_else(|| Invalid::new(name, "bad percent-encoding"))?;
                out.push(v);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| Invalid::new(name, "is not UTF-8"))
}

/// The query parameters of `uri`, refusing any not in `allowed` and repeated ones.
fn query(uri: &Uri, allowed: &[&str]) -> Result<HashMap<String, String>, Invalid> {
    let mut out = HashMap::new();
    let Some(q) = uri.query() else {
        return Ok(out);
    };
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = percent_decode("query", k)?;
        if !allowed.contains(&k.as_str()) {
            let hint = if allowed.is_empty() {
                "this endpoint takes no query parameters".to_string()
            } else {
                format!("use {}", allowed.join(", "))
            };
            return Err(Invalid::new(k, format!("unknown query parameter; {hint}")));
        }
        let v = percent_decode(&k, v)?;
        if out.insert(k.clone(), v).is_some() {
            return Err(Invalid::new(k, "given more than once"));
        }
    }
    Ok(out)
}

/// The `{id}` path segment; a segment that does not decode is a 422 naming `order_id`.
struct IdPath(String);

impl<S: Send + Sync> FromRequestParts<S> for IdPath {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Problem> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(id)) => Ok(IdPath(id)),
            Err(e) => Err(Problem::validation("order_id", e.body_text())),
        }
    }
}

// ---------------------------------------------------------------- handlers

#[derive(Clone)]
struct ApiState {
    desk: OrderDesk,
    admin: Arc<dyn Admin>,
    own: Arc<Vec<ServiceInfo>>,
}

/// `order` once it is terminal or `wait` has passed (no wait: as it is).
pub(crate) async fn settle(
    desk: &OrderDesk,
    order: Order,
    wait: Option<Duration>,
) -> Result<Order, ApiError> {
    match wait {
        Some(w) if !w.is_zero() && !order.status.is_terminal() => {
            Ok(desk.book().wait(&order.id, w.min(MAX_WAIT)).await?)
        }
        _ => Ok(order),
    }
}

fn wait_param(params: &HashMap<String, String>) -> Result<Option<Duration>, Invalid> {
    params.get("wait").map(|w| parse_wait(w)).transpose()
}

/// A placed order: 201 if terminal, else 202 (with `Location` either way); a read
/// order: 200.
fn order_response(order: Order, placed: bool) -> Response {
    let status = match (placed, order.status.is_terminal()) {
        (true, true) => StatusCode::CREATED,
        (true, false) => StatusCode::ACCEPTED,
        (false, _) => StatusCode::OK,
    };
    let location = HeaderValue::try_from(format!("/orders/{}", order.id)).ok();
    let mut res = (status, Json(order)).into_response();
    if placed && let Some(l) = location {
        res.headers_mut().insert(header::LOCATION, l);
    }
    res
}

async fn http_place(
    State(s): State<ApiState>,
    uri: Uri,
    Json(req): Json<NewOrder>,
) -> Result<Response, ApiError> {
    let wait = wait_param(&query(&uri, &["wait"])?)?;
    let order = s.desk.place(&req).await?;
    tracing::info!(order_id = %order.id, pattern = %order.pattern, status = %order.status, "order placed");
    let order = settle(&s.desk, order, wait).await?;
    Ok(order_response(order, true))
}

async fn http_get(
    State(s): State<ApiState>,
    uri: Uri,
    IdPath(id): IdPath,
) -> Result<Response, ApiError> {
    validate_id("order_id", &id)?;
    let wait = wait_param(&query(&uri, &["wait"])?)?;
    let order = s
        .desk
        .book()
        .get(&id)
        .await?
        .ok_or_else(|| ApiError::NotFound(id.clone()))?;
    let order = settle(&s.desk, order, wait).await?;
    Ok(order_response(order, false))
}

/// Up to `limit` orders in `status` (every status if `None`), by id.
pub(crate) async fn list_orders(
    desk: &OrderDesk,
    status: Option<OrderStatus>,
    limit: usize,
) -> Result<Vec<Order>, ApiError> {
    let mut orders = match status {
        Some(st) => desk.book().list(st, limit).await?,
        None => {
            let mut all = Vec::new();
            for st in [
                OrderStatus::Accepted,
                OrderStatus::Completed,
                OrderStatus::Failed,
            ] {
                all.extend(desk.book().list(st, limit).await?);
            }
            all.sort_by(|a, b| a.id.cmp(&b.id));
            all
        }
    };
    orders.truncate(limit);
    Ok(orders)
}

async fn http_list(State(s): State<ApiState>, uri: Uri) -> Result<Json<OrderList>, ApiError> {
    let q = query(&uri, &["status", "limit"])?;
    let status = q
        .get("status")
        .map(|v| v.parse::<OrderStatus>())
        .transpose()?;
    let limit = q
        .get("limit")
        .map(|v| parse_limit(v))
        .transpose()?
        .unwrap_or(DEFAULT_LIMIT);
    Ok(Json(OrderList {
        orders: list_orders(&s.desk, status, limit).await?,
    }))
}

async fn http_counts(State(s): State<ApiState>, uri: Uri) -> Result<Json<OrderCounts>, ApiError> {
    query(&uri, &[])?;
    let c = s.desk.book().counts().await?;
    let n = |st| c.get(&st).copied().unwrap_or(0);
    Ok(Json(OrderCounts {
        accepted: n(OrderStatus::Accepted),
        completed: n(OrderStatus::Completed),
        failed: n(OrderStatus::Failed),
    }))
}

async fn http_patterns(State(s): State<ApiState>) -> Json<PatternList> {
    Json(PatternList {
        patterns: s.desk.patterns(),
    })
}

async fn http_services(State(s): State<ApiState>) -> Json<ServiceList> {
    let mut services: Vec<ServiceInfo> = s.own.as_ref().clone();
    services.extend(
        s.admin
            .services()
            .into_iter()
            .filter(|x| x.name != SERVICE && x.name != GRPC_SERVICE),
    );
    Json(ServiceList { services })
}

async fn http_sagas(State(s): State<ApiState>, uri: Uri) -> Result<Json<SagaList>, ApiError> {
    let q = query(&uri, &["state", "limit"])?;
    let state = q.get("state").map(|v| parse_saga_state(v)).transpose()?;
    let limit = q
        .get("limit")
        .map(|v| parse_limit(v))
        .transpose()?
        .unwrap_or(DEFAULT_LIMIT);
    Ok(Json(SagaList {
        sagas: s.admin.sagas(state, limit).await?,
    }))
}

async fn http_dlq(State(s): State<ApiState>, uri: Uri) -> Result<Json<DeadLetterList>, ApiError> {
    let q = query(&uri, &["topic", "limit"])?;
    let topic = q.get("topic").cloned();
    if let Some(t) = &topic {
        validate_id("topic", t)?;
    }
    let limit = q
        .get("limit")
        .map(|v| parse_limit(v))
        .transpose()?
        .unwrap_or(100);
    Ok(Json(DeadLetterList {
        dead_letters: s.admin.dead_letters(topic, limit).await?,
    }))
}

async fn http_replay(
    State(s): State<ApiState>,
    Json(req): Json<ReplayRequest>,
) -> Result<Json<ReplayOutcome>, ApiError> {
    validate_id("topic", &req.topic)?;
    if let Some(g) = &req.group {
        validate_id("group", g)?;
    }
    for (i, id) in req.ids.iter().flatten().enumerate() {
        if id.parse::<switchyard::MessageId>().is_err() {
            return Err(
                Invalid::new(format!("ids[{i}]"), format!("`{id}` is not a message id")).into(),
            );
        }
    }
    Ok(Json(s.admin.replay(req).await?))
}

async fn http_check(State(s): State<ApiState>) -> Result<Json<CheckReport>, ApiError> {
    Ok(Json(s.admin.check().await?))
}

/// The order endpoints (`/orders…`, `/patterns`), without the standard layers.
pub fn order_routes(desk: OrderDesk) -> axum::Router {
    order_router().with_state(state(desk, Arc::new(NoAdmin), Vec::new()))
}

fn state(desk: OrderDesk, admin: Arc<dyn Admin>, own: Vec<ServiceInfo>) -> ApiState {
    ApiState {
        desk,
        admin,
        own: Arc::new(own),
    }
}

fn order_router() -> axum::Router<ApiState> {
    axum::Router::new()
        .route("/orders", post(http_place).get(http_list))
        .route("/orders/counts", get(http_counts))
        .route("/orders/{id}", get(http_get))
        .route("/patterns", get(http_patterns))
}

fn operator_router() -> axum::Router<ApiState> {
    axum::Router::new()
        .route("/services", get(http_services))
        .route("/sagas", get(http_sagas))
        .route("/dlq", get(http_dlq))
        .route("/dlq/replay", post(http_replay))
        .route("/check", get(http_check))
}

// ---------------------------------------------------------------- start

/// The started Order API.
#[derive(Debug)]
pub struct OrderApi {
    /// The REST base URL (`http://127.0.0.1:<port>`): register it as [`SERVICE`].
    pub rest_url: String,
    /// The gRPC base URL: register it as [`SERVICE`] in the gRPC registry.
    pub grpc_url: String,
    /// The fault settings of the order endpoints (also at `<rest_url>/admin/fault` and
    /// `<grpc_url>/admin/fault`).
    pub faults: Faults,
    /// The REST server: ends after shutdown, once the requests in flight finish.
    pub rest_task: JoinHandle<Result<(), ServeError>>,
    /// The gRPC server: ends after shutdown, once the calls in flight finish.
    pub grpc_task: JoinHandle<Result<(), ServeError>>,
}

impl OrderApi {
    /// Waits for both servers to end; the first failure, if any.
    pub async fn join(self) -> Result<(), ServeError> {
        let (a, b) = tokio::join!(self.rest_task, self.grpc_task);
        for r in [a, b] {
            match r {
                Ok(r) => r?,
                Err(e) => {
                    return Err(ServeError::Io(std::io::Error::other(format!(
                        "an Order API server task failed: {e}"
                    ))));
                }
            }
        }
        Ok(())
    }
}

/// Serves the Order API over `desk` — REST on `rest`, gRPC on `grpc` — until `shutdown`
/// completes; `admin` answers the operator endpoints (pass [`NoAdmin`] for none).
/// Registers nothing.
pub async fn start(
    desk: OrderDesk,
    admin: Arc<dyn Admin>,
    rest: TcpListener,
    grpc: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<OrderApi, ServeError> {
    let rest_url = format!("http://{}", rest.local_addr()?);
    let grpc_url = format!("http://{}", grpc.local_addr()?);
    let faults = Faults::new();
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let own = vec![
        ServiceInfo::new(SERVICE, &rest_url, "http"),
        ServiceInfo::new(GRPC_SERVICE, &grpc_url, "grpc"),
    ];
    let st = state(desk.clone(), admin, own);
    let app = order_router()
        .layer(from_fn_with_state(faults.clone(), faults::middleware))
        .merge(operator_router())
        .with_state(st)
        .merge(faults::admin_routes(faults.clone()));
    let mut opts = ServerOptions::new(SERVICE);
    opts.body_limit = BODY_LIMIT;
    let app = router(app, &opts);
    opts.health.set_ready(true);
    let health = opts.health.clone();
    let rest_stop = stopped();
    let rest_shutdown = async move {
        rest_stop.await;
        health.set_ready(false);
    };
    tracing::info!(service = SERVICE, url = %rest_url, "serving REST");
    let rest_task = tokio::spawn(async move { Ok(serve(rest, app, rest_shutdown).await?) });
    let grpc_task = grpc::spawn(desk, faults.clone(), grpc, stopped()).await?;
    tracing::info!(service = SERVICE, url = %grpc_url, "serving gRPC");
    Ok(OrderApi {
        rest_url,
        grpc_url,
        faults,
        rest_task,
        grpc_task,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn waits_limits_and_queries_parse() {
        assert_eq!(parse_wait("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_wait("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_wait("3").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_wait("2h").unwrap(), MAX_WAIT);
        assert_eq!(
            parse_wait("99999999999999999999").unwrap_err().field,
            "wait"
        );
        assert_eq!(parse_wait("soon").unwrap_err().field, "wait");
        assert_eq!(parse_wait("").unwrap_err().field, "wait");
        assert_eq!(parse_limit("10").unwrap(), 10);
        assert!(parse_limit("0").is_err() && parse_limit("1001").is_err());
        assert_eq!(
            parse_saga_state("needs_attention").unwrap(),
            SagaState::NeedsAttention
        );
        let uri: Uri = "/orders?status=completed&limit=5&wait=1%20s"
            .parse()
            .unwrap();
        let q = query(&uri, &["status", "limit", "wait"]).unwrap();
        assert_eq!(q["wait"], "1 s");
        assert_eq!(q["limit"], "5");
        assert_eq!(query(&uri, &["status"]).unwrap_err().field, "limit");
        let twice: Uri = "/orders?limit=1&limit=2".parse().unwrap();
        assert_eq!(query(&twice, &["limit"]).unwrap_err().field, "limit");
        let bad: Uri = "/orders?limit=%F".parse().unwrap();
        assert_eq!(query(&bad, &["limit"]).unwrap_err().field, "limit");
        let not_utf8: Uri = "/orders?limit=%FF".parse().unwrap();
        assert!(query(&not_utf8, &["limit"]).is_err());
    }

    #[test]
    fn errors_map_to_one_status_and_one_code() {
        let cases: Vec<(ApiError, u16, tonic::Code)> = vec![
            (
                Invalid::new("items[0].qty", "must be 1 to 1000000").into(),
                422,
                tonic::Code::InvalidArgument,
            ),
            (
                PlaceError::Exists("o-1".into()).into(),
                409,
                tonic::Code::AlreadyExists,
            ),
            (
                PlaceError::Unavailable("down".into()).into(),
                503,
                tonic::Code::Unavailable,
            ),
            (ApiError::NotFound("o-1".into()), 404, tonic::Code::NotFound),
            (
                AdminError::NotWired("sagas").into(),
                501,
                tonic::Code::Unimplemented,
            ),
        ];
        for (e, status, code) in cases {
            assert_eq!(e.to_problem().status, status, "{e}");
            assert_eq!(e.to_status().code(), code, "{e}");
        }
        let p = ApiError::from(Invalid::new("customer", "must not be empty")).to_problem();
        assert_eq!(p.extension_str("field"), Some("customer"));
    }
}
