//! Analytics: counts shop events per type and per minute, queryable over REST.
//!
//! - Async: [`subscribe`] consumes every event of every shop topic in its own group
//!   ([`GROUP`]); the router's inbox makes a redelivered message count once.
//! - Sync: `POST /events` `{"type","order_id"}` counts one event, once per
//!   (order, type) (a repeat answers `counted_now: false`).
//! - `GET /stats` → [`Stats`]: totals per type and a per-minute series (the last
//!   [`MINUTES_SERVED`] minutes that saw events).
//!
//! The counters are a few hot rows that every event would update. So nobody writes them
//! on the event's path: counting an event writes a row of its own to [`PENDING`] (a key
//! no other writer touches, so counts never conflict and commit in groups at any rate),
//! and a folder task folds the pending rows into [`TOTALS`] and [`PER_MINUTE`] in one
//! transaction every [`FOLD_EVERY`]. Reads add the pending rows, so every answer is
//! exact at once.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::StatusCode;
use serde::{Deserialize, Serialize};
use switchyard::Event;
use switchyard::Timestamp;
use switchyard::router::{Context, HandlerError, Router};
use switchyard::store::{Store, Table, Txn};
use switchyard_rpc::http::{Json, ServerOptions};
use switchyard_rpc::problem::types;
use switchyard_rpc::{CallOptions, HttpClient, Problem, ServiceClient};
use tokio::net::TcpListener;

use super::{ErrorClass, Running, ServeError, atomically, class_of_call, problems, spawn_http};
use crate::model::{
    INVENTORY, Invalid, InventoryReleased, InventoryReserved, LabelGenerated, ORDERS,
    OrderCompleted, OrderCreated, OrderFailed, OutOfStock, PAYMENTS, PaymentCompleted,
    PaymentFailed, PaymentRefunded, SHIPPING, ShipmentCancelled, ShipmentCreated, validate_id,
};

/// The service's name (in the registry and in spans).
pub const SERVICE: &str = "analytics";

/// The consumer group of [`subscribe`]'s handlers.
pub const GROUP: &str = "analytics";

/// The largest request body the REST API accepts (4 KiB).
pub const BODY_LIMIT: usize = 4 * 1024;

/// How many minutes (the latest that saw events) `GET /stats` returns.
pub const MINUTES_SERVED: usize = 120;

/// Events per type (key: event type).
pub const TOTALS: Table<u64> = Table::new("analytics.totals");

/// Events per minute and type (key: `<unix minute start, 12 digits>|<event type>`).
pub const PER_MINUTE: Table<u64> = Table::new("analytics.per_minute");

/// (order, type) pairs counted through `POST /events` (key: `<order_id>|<type>`).
pub const SEEN: Table<u64> = Table::new("analytics.seen");

/// Counted events not folded into the counters yet, one row each (key:
/// `<unix minute start, 12 digits>|<event type>|<message or order id>`).
pub const PENDING: Table<u64> = Table::new("analytics.pending");

/// How often the folder folds [`PENDING`] into the counters.
pub const FOLD_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// The most pending rows one fold takes.
pub const FOLD_BATCH: usize = 20_000;

/// One minute of the series.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MinuteCounts {
    /// The minute's start, Unix seconds.
    pub minute: u64,
    /// Events per type in that minute.
    pub counts: BTreeMap<String, u64>,
}

/// What `GET /stats` answers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Events per type, ever.
    pub totals: BTreeMap<String, u64>,
    /// All events, ever.
    pub total: u64,
    /// The latest minutes, oldest first.
    pub per_minute: Vec<MinuteCounts>,
}

/// What `POST /events` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordOutcome {
    /// True if this call counted the event (false for a repeat of (order, type)).
    pub counted_now: bool,
}

/// Everything that can go wrong with analytics (server and client).
#[derive(Debug, thiserror::Error)]
pub enum AnalyticsError {
    /// The request is malformed; fix the named field.
    #[error("{0}")]
    Invalid(#[from] Invalid),
    /// The analytics store failed; retry later.
    #[error("the analytics store failed: {0}; retry later")]
    Store(#[from] switchyard::Error),
    /// The call to the analytics service failed (client side): see its `kind()`.
    #[error("calling analytics failed: {0}")]
    Call(#[source] switchyard_rpc::Error),
}

impl AnalyticsError {
    /// What to do about it (see [`ErrorClass`]).
    pub fn class(&self) -> ErrorClass {
        match self {
            AnalyticsError::Invalid(_) => ErrorClass::Invalid,
            AnalyticsError::Store(_) => ErrorClass::Unavailable,
            AnalyticsError::Call(e) => class_of_call(e),
        }
    }

    /// Whether trying again later may succeed.
    pub fn is_retryable(&self) -> bool {
        self.class().is_retryable()
    }

    fn from_call(e: switchyard_rpc::Error) -> Self {
        match e.problem() {
            Some(p) if p.type_uri == types::VALIDATION => AnalyticsError::Invalid(Invalid::new(
                p.extension_str("field").unwrap_or_default(),
                p.detail.clone().unwrap_or_default(),
            )),
            _ => AnalyticsError::Call(e),
        }
    }
}

impl IntoResponse for AnalyticsError {
    fn into_response(self) -> Response {
        match &self {
            AnalyticsError::Invalid(i) => Problem::validation(&i.field, &i.reason),
            _ => {
                tracing::error!(error = %self, "analytics failed");
                Problem::new(
                    problems::STORE_UNAVAILABLE,
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Store unavailable",
                )
            }
        }
        .into_response()
    }
}

// ---------------------------------------------------------------- core logic

fn minute_of(t: Timestamp) -> u64 {
    t.unix_micros() / 1_000_000 / 60 * 60
}

/// Counts one event of `event_type` that happened at `at`, in `txn`: a [`PENDING`] row
/// keyed by `unique` (the message id, or the order id for a once-per-(order, type) count).
pub fn count_in(
    txn: &Txn,
    event_type: &str,
    at: Timestamp,
    unique: &str,
) -> Result<(), AnalyticsError> {
    let key = format!("{:012}|{event_type}|{unique}", minute_of(at));
    txn.put(&PENDING, &key, &1)?;
    Ok(())
}

/// A [`PENDING`] key's minute and event type.
fn pending_parts(key: &str) -> Option<(u64, &str)> {
    let mut parts = key.splitn(3, '|');
    let minute = parts.next()?.parse().ok()?;
    let ty = parts.next()?;
    Some((minute, ty))
}

/// Folds up to [`FOLD_BATCH`] pending counts into [`TOTALS`] and [`PER_MINUTE`] in one
/// transaction; returns how many it folded.
pub async fn fold(store: &Arc<dyn Store>) -> Result<usize, AnalyticsError> {
    atomically(store, |txn| async move {
        let pending = txn.scan(&PENDING, "", FOLD_BATCH).await?;
        let mut totals: BTreeMap<&str, u64> = BTreeMap::new();
        let mut minutes: BTreeMap<(u64, &str), u64> = BTreeMap::new();
        for (key, n) in &pending {
            if let Some((minute, ty)) = pending_parts(key) {
                *totals.entry(ty).or_default() += n;
                *minutes.entry((minute, ty)).or_default() += n;
            }
            txn.delete(&PENDING, key);
        }
        for (ty, n) in totals {
            let total = txn.get(&TOTALS, ty).await?.unwrap_or(0);
            txn.put(&TOTALS, ty, &(total + n))?;
        }
        for ((minute, ty), n) in minutes {
            let key = format!("{minute:012}|{ty}");
            let before = txn.get(&PER_MINUTE, &key).await?.unwrap_or(0);
            txn.put(&PER_MINUTE, &key, &(before + n))?;
        }
        Ok::<_, AnalyticsError>(pending.len())
    })
    .await
}

/// Folds every [`FOLD_EVERY`] until `stop` turns true (what is left is folded after the
/// restart; reads count it meanwhile).
async fn fold_until(store: Arc<dyn Store>, mut stop: tokio::sync::watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(FOLD_EVERY) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        loop {
            match fold(&store).await {
                Ok(n) if n == FOLD_BATCH => continue,
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "folding the analytics counts failed; retrying later");
                    break;
                }
            }
        }
    }
}

/// Counts one `event_type` event of `order_id` in `txn`, once per (order, type);
/// returns whether this call counted it.
pub async fn record_in(
    txn: &Txn,
    event_type: &str,
    order_id: &str,
) -> Result<bool, AnalyticsError> {
    validate_id("type", event_type)?;
    validate_id("order_id", order_id)?;
    let key = format!("{order_id}|{event_type}");
    if txn.get(&SEEN, &key).await?.is_some() {
        return Ok(false);
    }
    let now = Timestamp::now();
    txn.put(&SEEN, &key, &(now.unix_micros() / 1000))?;
    count_in(txn, event_type, now, order_id)?;
    Ok(true)
}

/// The counters in `store` (folded and pending): totals and the latest
/// [`MINUTES_SERVED`] minutes.
pub async fn stats_of(store: &Arc<dyn Store>) -> Result<Stats, AnalyticsError> {
    let txn = Txn::new(store.clone());
    let mut totals: BTreeMap<String, u64> = txn
        .scan(&TOTALS, "", usize::MAX)
        .await?
        .into_iter()
        .collect();
    let mut minutes: BTreeMap<u64, BTreeMap<String, u64>> = BTreeMap::new();
    for (key, n) in txn.scan(&PER_MINUTE, "", usize::MAX).await? {
        let Some((minute, ty)) = key.split_once('|') else {
            continue;
        };
        let Ok(minute) = minute.parse::<u64>() else {
            continue;
        };
        *minutes
            .entry(minute)
            .or_default()
            .entry(ty.to_string())
            .or_default() += n;
    }
    for (key, n) in txn.scan(&PENDING, "", usize::MAX).await? {
        if let Some((minute, ty)) = pending_parts(&key) {
            *totals.entry(ty.to_string()).or_default() += n;
            *minutes
                .entry(minute)
                .or_default()
                .entry(ty.to_string())
                .or_default() += n;
        }
    }
    let total = totals.values().sum();
    let skip = minutes.len().saturating_sub(MINUTES_SERVED);
    let per_minute = minutes
        .into_iter()
        .skip(skip)
        .map(|(minute, counts)| MinuteCounts { minute, counts })
        .collect();
    Ok(Stats {
        totals,
        total,
        per_minute,
    })
}

/// The analytics core over its store. Cheap to clone.
#[derive(Clone)]
pub struct Analytics {
    store: Arc<dyn Store>,
}

impl std::fmt::Debug for Analytics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Analytics").finish_non_exhaustive()
    }
}

impl Analytics {
    /// The analytics core over `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Analytics { store }
    }

    /// Counts an event once per (order, type) (see [`record_in`]).
    pub async fn record(&self, event_type: &str, order_id: &str) -> Result<bool, AnalyticsError> {
        atomically(&self.store, |txn| async move {
            record_in(&txn, event_type, order_id).await
        })
        .await
    }

    /// The counters (see [`stats_of`]).
    pub async fn stats(&self) -> Result<Stats, AnalyticsError> {
        stats_of(&self.store).await
    }
}

// ---------------------------------------------------------------- events

fn count<E: Event>(router: &mut Router, topic: &str) {
    router.on(topic, GROUP, |ctx: Context, _ev: E| async move {
        let id = ctx.envelope.id.to_string();
        count_in(&ctx.txn, E::TYPE, ctx.envelope.time, &id).map_err(|e| match e {
            AnalyticsError::Invalid(i) => HandlerError::Terminal(i.to_string()),
            other => HandlerError::Retryable(other.to_string()),
        })
    });
}

/// Registers the counters on `router` (which must run on the analytics store): every
/// event type of [`ORDERS`], [`PAYMENTS`], [`INVENTORY`] and [`SHIPPING`], group
/// [`GROUP`]. Run [`start`] (or [`fold`]) on the same store to fold the counts.
pub fn subscribe(router: &mut Router) {
    count::<OrderCreated>(router, ORDERS);
    count::<OrderCompleted>(router, ORDERS);
    count::<OrderFailed>(router, ORDERS);
    count::<PaymentCompleted>(router, PAYMENTS);
    count::<PaymentFailed>(router, PAYMENTS);
    count::<PaymentRefunded>(router, PAYMENTS);
    count::<InventoryReserved>(router, INVENTORY);
    count::<OutOfStock>(router, INVENTORY);
    count::<InventoryReleased>(router, INVENTORY);
    count::<ShipmentCreated>(router, SHIPPING);
    count::<LabelGenerated>(router, SHIPPING);
    count::<ShipmentCancelled>(router, SHIPPING);
}

// ---------------------------------------------------------------- REST

/// The body of `POST /events`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordRequest {
    /// The event type (e.g. `shop.order.created.v1`).
    #[serde(rename = "type")]
    pub event_type: String,
    /// The order.
    pub order_id: String,
}

async fn http_record(
    State(a): State<Analytics>,
    Json(req): Json<RecordRequest>,
) -> Result<Json<RecordOutcome>, AnalyticsError> {
    let counted_now = a.record(&req.event_type, &req.order_id).await?;
    Ok(Json(RecordOutcome { counted_now }))
}

async fn http_stats(State(a): State<Analytics>) -> Result<Json<Stats>, AnalyticsError> {
    a.stats().await.map(Json)
}

/// The REST routes over `analytics` (without the standard layers; [`start`] adds them).
pub fn routes(analytics: Analytics) -> axum::Router {
    axum::Router::new()
        .route("/events", post(http_record))
        .route("/stats", get(http_stats))
        .with_state(analytics)
}

/// Serves the REST API over `store` on `listener`, and folds the counts (see the
/// [module docs](self)), until `shutdown` completes. Registers nothing.
pub async fn start(
    store: Arc<dyn Store>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Running, ServeError> {
    let mut opts = ServerOptions::new(SERVICE);
    opts.body_limit = BODY_LIMIT;
    let (stop_folding, stop) = tokio::sync::watch::channel(false);
    let folder = tokio::spawn(fold_until(store.clone(), stop));
    let mut running = spawn_http(routes(Analytics::new(store)), opts, listener, async move {
        shutdown.await;
        let _ = stop_folding.send(true);
    })?;
    let server = running.task;
    running.task = tokio::spawn(async move {
        let served = server.await;
        let _ = folder.await;
        served.unwrap_or_else(|e| Err(ServeError::Io(std::io::Error::other(e))))
    });
    Ok(running)
}

// ---------------------------------------------------------------- client

/// The typed client of the analytics service, by service name [`SERVICE`]. Recording
/// is idempotent per (order, type), so calls are retryable. Cheap to clone.
#[derive(Debug, Clone)]
pub struct AnalyticsClient {
    svc: ServiceClient,
}

impl AnalyticsClient {
    /// The client of service [`SERVICE`] through `http`.
    pub fn new(http: &HttpClient) -> Self {
        AnalyticsClient {
            svc: http.service(SERVICE),
        }
    }

    /// `POST /events`: counts the event once per (order, type); true if this call did.
    pub async fn record(
        &self,
        event_type: &str,
        order_id: &str,
        opts: &CallOptions,
    ) -> Result<bool, AnalyticsError> {
        let body = RecordRequest {
            event_type: event_type.to_string(),
            order_id: order_id.to_string(),
        };
        let out: RecordOutcome = self
            .svc
            .post_json_with("/events", &body, &opts.clone().idempotent())
            .await
            .map_err(AnalyticsError::from_call)?;
        Ok(out.counted_now)
    }

    /// `GET /stats`.
    pub async fn stats(&self, opts: &CallOptions) -> Result<Stats, AnalyticsError> {
        self.svc
            .get_json_with("/stats", opts)
            .await
            .map_err(AnalyticsError::from_call)
    }
}
