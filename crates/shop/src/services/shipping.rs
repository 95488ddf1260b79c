//! Shipping: shipments per order over internal REST, and shipping labels written as an
//! asynchronous side effect.
//!
//! - `POST /shipments` `{"order_id","items"}` creates the order's shipment and answers
//!   its [`Shipment`] (with the tracking number); a repeat answers the same shipment
//!   (same tracking number). The commit that creates it also puts a
//!   [`ShipmentCreated`] event in the store's outbox, published by the outbox relay
//!   [`start`] runs.
//! - [`subscribe`] registers the label writer: on `ShipmentCreated` it writes
//!   `<data>/labels/<tracking>.txt` (to a temporary name, then renamed) and publishes
//!   [`LabelGenerated`], once per shipment (the router's inbox drops redeliveries; the
//!   shipment's `label` field drops copies).
//! - `POST /shipments/{order_id}/cancel` cancels it (idempotent): a shipment that exists
//!   is marked cancelled with a [`ShipmentCancelled`] event (Inventory puts the goods
//!   back); for an order without one, a cancelled placeholder is recorded so that a
//!   create still on its way is refused (409) rather than shipping a failed order.
//! - `GET /shipments/{order_id}` answers the shipment (404 if none).

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::{Path as UrlPath, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::StatusCode;
use serde::{Deserialize, Serialize};
use switchyard::Bus;
use switchyard::codec;
use switchyard::relay::OutboxRelay;
use switchyard::router::{Context, HandlerError, Router};
use switchyard::store::{Store, Table, Txn};
use switchyard_rpc::http::{Json, ServerOptions};
use switchyard_rpc::problem::types;
use switchyard_rpc::{CallContext, CallOptions, HttpClient, Problem, ServiceClient};
use tokio::net::TcpListener;

use super::{
    Cause, ErrorClass, Running, ServeError, atomically, class_of_call, http_server, now_ms,
    problems, write_atomically,
};
use crate::model::{
    Invalid, Item, LabelGenerated, SHIPPING, ShipmentCancelled, ShipmentCreated, normalize_items,
    validate_id,
};

/// The service's name (in the registry, in spans, and the `source` of its events).
pub const SERVICE: &str = "shipping";

/// The consumer group of the label writer.
pub const LABEL_GROUP: &str = "shipping-labels";

/// The largest request body the REST API accepts (64 KiB).
pub const BODY_LIMIT: usize = 64 * 1024;

/// Shipments (key: order id).
pub const SHIPMENTS: Table<Shipment> = Table::new("shipping.shipments");

/// An order's shipment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shipment {
    /// The order.
    pub order_id: String,
    /// The tracking number (`TRK-…`).
    pub tracking: String,
    /// What ships.
    pub items: Vec<Item>,
    /// When it was created (Unix ms).
    pub created_ms: u64,
    /// The label file, relative to the data directory, once written.
    #[serde(default)]
    pub label: Option<String>,
    /// When it was cancelled (Unix ms), if it was. A cancelled shipment does not ship.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancelled_ms: Option<u64>,
}

impl Shipment {
    /// Whether it was cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled_ms.is_some()
    }
}

/// What `POST /shipments/{order_id}/cancel` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelOutcome {
    /// The order.
    pub order_id: String,
    /// True if this call cancelled (false: cancelled before).
    pub cancelled_now: bool,
    /// The tracking number of the cancelled shipment (`None`: none had been created).
    pub tracking: Option<String>,
}

/// Everything that can go wrong with a shipping operation (server and client).
#[derive(Debug, thiserror::Error)]
pub enum ShippingError {
    /// The request is malformed; fix the named field.
    #[error("{0}")]
    Invalid(#[from] Invalid),
    /// The shipping store failed; retry later.
    #[error("the shipping store failed: {0}; retry later")]
    Store(#[from] switchyard::Error),
    /// The order's shipment was cancelled; it cannot be created (409).
    #[error("the shipment of order {order_id} was cancelled")]
    Cancelled {
        /// The order.
        order_id: String,
    },
    /// Writing the label file failed; check the data directory (the event is retried).
    #[error("writing the label {path} failed: {source}; check the data directory")]
    Label {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The call to the shipping service failed (client side): see its `kind()`.
    #[error("calling shipping failed: {0}")]
    Call(#[source] switchyard_rpc::Error),
}

impl ShippingError {
    /// What to do about it (see [`ErrorClass`]).
    pub fn class(&self) -> ErrorClass {
        match self {
            ShippingError::Invalid(_) => ErrorClass::Invalid,
            ShippingError::Cancelled { .. } => ErrorClass::Refused,
            ShippingError::Store(_) | ShippingError::Label { .. } => ErrorClass::Unavailable,
            ShippingError::Call(e) => class_of_call(e),
        }
    }

    /// Whether trying again later may succeed.
    pub fn is_retryable(&self) -> bool {
        self.class().is_retryable()
    }

    fn from_call(e: switchyard_rpc::Error) -> Self {
        match e.problem() {
            Some(p) if p.type_uri == types::VALIDATION => ShippingError::Invalid(Invalid::new(
                p.extension_str("field").unwrap_or_default(),
                p.detail.clone().unwrap_or_default(),
            )),
            Some(p) if p.type_uri == problems::SHIPMENT_CANCELLED => ShippingError::Cancelled {
                order_id: p.extension_str("order_id").unwrap_or_default().to_string(),
            },
            _ => ShippingError::Call(e),
        }
    }
}

impl IntoResponse for ShippingError {
    fn into_response(self) -> Response {
        match &self {
            ShippingError::Invalid(i) => Problem::validation(&i.field, &i.reason),
            ShippingError::Cancelled { order_id } => Problem::new(
                problems::SHIPMENT_CANCELLED,
                StatusCode::CONFLICT,
                "Shipment cancelled",
            )
            .with_detail(format!(
                "the shipment of order `{order_id}` was cancelled; it cannot be created"
            ))
            .with("order_id", order_id.as_str()),
            _ => {
                tracing::error!(error = %self, "shipping failed");
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

/// Creates the order's shipment in `txn` (a repeat returns the existing one and
/// publishes nothing) and appends [`ShipmentCreated`] to the outbox, linked to `cause`
/// (so the flow's correlation, causation and trace carry over).
pub async fn create_in(
    txn: &Txn,
    order_id: &str,
    items: &[Item],
    cause: Cause<'_>,
) -> Result<Shipment, ShippingError> {
    validate_id("order_id", order_id)?;
    normalize_items(items)?;
    if let Some(s) = txn.get(&SHIPMENTS, order_id).await? {
        if s.is_cancelled() {
            return Err(ShippingError::Cancelled {
                order_id: order_id.to_string(),
            });
        }
        return Ok(s);
    }
    let shipment = Shipment {
        order_id: order_id.to_string(),
        tracking: format!("TRK-{}", uuid::Uuid::now_v7().simple()),
        items: items.to_vec(),
        created_ms: now_ms(),
        label: None,
        cancelled_ms: None,
    };
    txn.put(&SHIPMENTS, order_id, &shipment)?;
    let event = ShipmentCreated {
        order_id: order_id.to_string(),
        tracking: shipment.tracking.clone(),
    };
    let env = codec::encode(&event, &format!("/{SERVICE}"))
        .map_err(|e| switchyard::Error::InvalidArgument(e.to_string()))?;
    txn.publish_envelope(SHIPPING, cause.link(env));
    Ok(shipment)
}

/// Cancels the order's shipment in `txn` (see the [module docs](self)): a live one gets
/// `cancelled_ms` and a [`ShipmentCancelled`] in the outbox, linked to `cause`; for an
/// order without one, a cancelled placeholder (no tracking number, no items) blocks a
/// later create. Idempotent.
pub async fn cancel_in(
    txn: &Txn,
    order_id: &str,
    cause: Cause<'_>,
) -> Result<CancelOutcome, ShippingError> {
    validate_id("order_id", order_id)?;
    let now = now_ms();
    match txn.get(&SHIPMENTS, order_id).await? {
        Some(s) if s.is_cancelled() => Ok(CancelOutcome {
            order_id: order_id.to_string(),
            cancelled_now: false,
            tracking: (!s.tracking.is_empty()).then_some(s.tracking),
        }),
        Some(mut s) => {
            s.cancelled_ms = Some(now);
            txn.put(&SHIPMENTS, order_id, &s)?;
            let event = ShipmentCancelled {
                order_id: order_id.to_string(),
                tracking: s.tracking.clone(),
            };
            let env = codec::encode(&event, &format!("/{SERVICE}"))
                .map_err(|e| switchyard::Error::InvalidArgument(e.to_string()))?;
            txn.publish_envelope(SHIPPING, cause.link(env));
            Ok(CancelOutcome {
                order_id: order_id.to_string(),
                cancelled_now: true,
                tracking: Some(s.tracking),
            })
        }
        None => {
            let placeholder = Shipment {
                order_id: order_id.to_string(),
                tracking: String::new(),
                items: Vec::new(),
                created_ms: now,
                label: None,
                cancelled_ms: Some(now),
            };
            txn.put(&SHIPMENTS, order_id, &placeholder)?;
            Ok(CancelOutcome {
                order_id: order_id.to_string(),
                cancelled_now: true,
                tracking: None,
            })
        }
    }
}

/// The shipping core over its store. Cheap to clone.
#[derive(Clone)]
pub struct Shipping {
    store: Arc<dyn Store>,
}

impl std::fmt::Debug for Shipping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shipping").finish_non_exhaustive()
    }
}

impl Shipping {
    /// The shipping core over `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Shipping { store }
    }

    /// Creates the order's shipment once (see [`create_in`]).
    pub async fn create(
        &self,
        order_id: &str,
        items: &[Item],
        cause: Cause<'_>,
    ) -> Result<Shipment, ShippingError> {
        atomically(&self.store, |txn| async move {
            create_in(&txn, order_id, items, cause).await
        })
        .await
    }

    /// Cancels the order's shipment (see [`cancel_in`]).
    pub async fn cancel(
        &self,
        order_id: &str,
        cause: Cause<'_>,
    ) -> Result<CancelOutcome, ShippingError> {
        atomically(&self.store, |txn| async move {
            cancel_in(&txn, order_id, cause).await
        })
        .await
    }

    /// The order's shipment, if any.
    pub async fn get(&self, order_id: &str) -> Result<Option<Shipment>, ShippingError> {
        Ok(Txn::new(self.store.clone())
            .get(&SHIPMENTS, order_id)
            .await?)
    }

    /// Every shipment, by order id.
    pub async fn all(&self) -> Result<Vec<Shipment>, ShippingError> {
        Ok(Txn::new(self.store.clone())
            .scan(&SHIPMENTS, "", usize::MAX)
            .await?
            .into_iter()
            .map(|(_, s)| s)
            .collect())
    }
}

/// The label file of `tracking`, relative to the data directory.
pub fn label_path(tracking: &str) -> String {
    format!("labels/{tracking}.txt")
}

async fn write_label(
    ctx: Context,
    ev: ShipmentCreated,
    data_dir: Arc<PathBuf>,
) -> Result<(), ShippingError> {
    validate_id("order_id", &ev.order_id)?;
    validate_id("tracking", &ev.tracking)?;
    let Some(mut shipment) = ctx.txn.get(&SHIPMENTS, &ev.order_id).await? else {
        return Err(Invalid::new(
            "order_id",
            format!("no shipment for order `{}`", ev.order_id),
        )
        .into());
    };
    if shipment.tracking != ev.tracking || shipment.label.is_some() || shipment.is_cancelled() {
        // A copy of the event, one for another shipment, or a cancelled one: nothing to do.
        return Ok(());
    }
    let rel = label_path(&ev.tracking);
    let text = format!(
        "SHIPPING LABEL\ntracking: {}\norder: {}\nitems:\n{}",
        ev.tracking,
        ev.order_id,
        shipment
            .items
            .iter()
            .map(|i| format!("  {} x {}\n", i.qty, i.sku))
            .collect::<String>()
    );
    let dir = data_dir.join("labels");
    let path = dir.join(format!("{}.txt", ev.tracking));
    let staging = dir.join(format!(".tmp-{}.txt", ev.tracking));
    write_atomically(staging, path.clone(), text.into_bytes())
        .await
        .map_err(|source| ShippingError::Label { path, source })?;
    shipment.label = Some(rel.clone());
    ctx.txn.put(&SHIPMENTS, &ev.order_id, &shipment)?;
    ctx.publish(
        SHIPPING,
        &LabelGenerated {
            order_id: ev.order_id,
            tracking: ev.tracking,
            path: rel,
        },
    )?;
    Ok(())
}

/// Registers the label writer on `router` (which must run on the shipping store):
/// [`ShipmentCreated`] on [`SHIPPING`], group [`LABEL_GROUP`], writes the label under
/// `data_dir` and publishes [`LabelGenerated`] (see the [module docs](self)).
/// [`LabelGenerated`] on the same topic is acknowledged without effect.
pub fn subscribe(router: &mut Router, data_dir: impl Into<PathBuf>) {
    let data_dir = Arc::new(data_dir.into());
    router.on(
        SHIPPING,
        LABEL_GROUP,
        move |ctx: Context, ev: ShipmentCreated| {
            let data_dir = data_dir.clone();
            async move {
                write_label(ctx, ev, data_dir).await.map_err(|e| match e {
                    ShippingError::Invalid(i) => HandlerError::Terminal(i.to_string()),
                    other => HandlerError::Retryable(other.to_string()),
                })
            }
        },
    );
    router.on(
        SHIPPING,
        LABEL_GROUP,
        |_ctx: Context, _ev: LabelGenerated| async { Ok::<(), HandlerError>(()) },
    );
    router.on(
        SHIPPING,
        LABEL_GROUP,
        |_ctx: Context, _ev: ShipmentCancelled| async { Ok::<(), HandlerError>(()) },
    );
}

// ---------------------------------------------------------------- REST

/// The body of `POST /shipments`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateShipment {
    /// The order.
    pub order_id: String,
    /// What ships.
    pub items: Vec<Item>,
}

async fn http_create(
    State(s): State<Shipping>,
    ctx: CallContext,
    Json(req): Json<CreateShipment>,
) -> Result<Json<Shipment>, ShippingError> {
    s.create(&req.order_id, &req.items, Cause::Call(&ctx))
        .await
        .map(Json)
}

async fn http_cancel(
    State(s): State<Shipping>,
    ctx: CallContext,
    UrlPath(order_id): UrlPath<String>,
) -> Result<Json<CancelOutcome>, ShippingError> {
    s.cancel(&order_id, Cause::Call(&ctx)).await.map(Json)
}

async fn http_get(
    State(s): State<Shipping>,
    UrlPath(order_id): UrlPath<String>,
) -> Result<Response, ShippingError> {
    validate_id("order_id", &order_id)?;
    Ok(match s.get(&order_id).await? {
        Some(sh) => Json(sh).into_response(),
        None => Problem::new(problems::NO_SHIPMENT, StatusCode::NOT_FOUND, "No shipment")
            .with_detail(format!("order `{order_id}` has no shipment"))
            .into_response(),
    })
}

/// The REST routes over `shipping` (without the standard layers; [`start`] adds them).
pub fn routes(shipping: Shipping) -> axum::Router {
    axum::Router::new()
        .route("/shipments", post(http_create))
        .route("/shipments/{order_id}", get(http_get))
        .route("/shipments/{order_id}/cancel", post(http_cancel))
        .with_state(shipping)
}

/// Serves the REST API over `store` on `listener` until `shutdown` completes, and runs
/// the outbox relay of `store` to `bus` (so `ShipmentCreated` and `LabelGenerated`
/// reach the bus; run no other relay on this store). Registers nothing.
pub async fn start(
    store: Arc<dyn Store>,
    bus: Arc<dyn Bus>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Running, ServeError> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let relay = OutboxRelay::new(store.clone(), bus);
    let mut rx = stop_rx.clone();
    let relay_task = tokio::spawn(relay.run(async move {
        let _ = rx.wait_for(|stopped| *stopped).await;
    }));
    let stop_tx = Arc::new(stop_tx);
    let stop = stop_tx.clone();
    let shutdown = async move {
        shutdown.await;
        let _ = stop.send(true);
    };
    let mut opts = ServerOptions::new(SERVICE);
    opts.body_limit = BODY_LIMIT;
    let server = http_server(routes(Shipping::new(store)), opts, listener, shutdown)?;
    let serve = server.serve;
    let task = tokio::spawn(async move {
        let served = serve.await;
        // The server may also stop by failing: stop the relay either way.
        let _ = stop_tx.send(true);
        if let Err(e) = relay_task.await {
            tracing::warn!(error = %e, "shipping outbox relay task failed");
        }
        served
    });
    Ok(Running {
        url: server.url,
        faults: server.faults,
        task,
    })
}

// ---------------------------------------------------------------- client

/// The typed client of the shipping service, by service name [`SERVICE`]. Creating a
/// shipment is idempotent per order, so calls are retryable. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ShippingClient {
    svc: ServiceClient,
}

impl ShippingClient {
    /// The client of service [`SERVICE`] through `http`.
    pub fn new(http: &HttpClient) -> Self {
        ShippingClient {
            svc: http.service(SERVICE),
        }
    }

    /// `POST /shipments`: the order's shipment (created once).
    pub async fn create(
        &self,
        order_id: &str,
        items: &[Item],
        opts: &CallOptions,
    ) -> Result<Shipment, ShippingError> {
        let body = CreateShipment {
            order_id: order_id.to_string(),
            items: items.to_vec(),
        };
        self.svc
            .post_json_with("/shipments", &body, &opts.clone().idempotent())
            .await
            .map_err(ShippingError::from_call)
    }

    /// `POST /shipments/{order_id}/cancel`: cancels the order's shipment, or blocks its
    /// creation (idempotent).
    pub async fn cancel(
        &self,
        order_id: &str,
        opts: &CallOptions,
    ) -> Result<CancelOutcome, ShippingError> {
        validate_id("order_id", order_id)?;
        self.svc
            .post_json_with(
                &format!("/shipments/{order_id}/cancel"),
                &serde_json::json!({}),
                &opts.clone().idempotent(),
            )
            .await
            .map_err(ShippingError::from_call)
    }

    /// `GET /shipments/{order_id}` (`None`: no shipment).
    pub async fn get(
        &self,
        order_id: &str,
        opts: &CallOptions,
    ) -> Result<Option<Shipment>, ShippingError> {
        validate_id("order_id", order_id)?;
        match self
            .svc
            .get_json_with(&format!("/shipments/{order_id}"), opts)
            .await
        {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.kind() == switchyard_rpc::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ShippingError::from_call(e)),
        }
    }
}
