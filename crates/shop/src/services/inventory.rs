//! Inventory: stock per SKU and reservations per order, over internal REST.
//!
//! # Rules
//!
//! - **All or nothing.** [`Inventory::reserve`] reserves every line of an order in one
//!   commit, or nothing: the first short SKU is reported as
//!   [`InventoryError::OutOfStock`] (with the quantities) and the stock is unchanged. An
//!   unknown SKU is [`InventoryError::UnknownSku`].
//! - **Idempotent per order id.** Reserving an order again (with the same items)
//!   returns its existing reservation (in whatever state it is) without touching the
//!   stock; with other items it is [`InventoryError::ReservedDifferently`]. Release and
//!   commit are idempotent too (release is a no-op for an order never reserved or
//!   already committed).
//! - **Conservation.** Per SKU, `available + reserved + committed` never changes, and
//!   `available` never goes negative; [`Inventory::total_units`] sums it all for
//!   invariant checks.
//!
//! # REST
//!
//! | request | answer |
//! | --- | --- |
//! | `POST /reservations` `{"order_id","items":[{"sku","qty"}]}` | 200 [`Reservation`]; 409 [`problems::OUT_OF_STOCK`] / [`problems::RESERVATION_MISMATCH`]; 422 validation / [`problems::UNKNOWN_SKU`] |
//! | `POST /reservations/{order_id}/release` | 200 [`ReleaseOutcome`] |
//! | `POST /reservations/{order_id}/commit` | 200 [`Reservation`]; 404 [`problems::NO_RESERVATION`]; 409 [`problems::RESERVATION_RELEASED`] |
//! | `GET /reservations/{order_id}` | 200 [`Reservation`]; 404 |
//! | `GET /stock/{sku}` | 200 [`StockLevel`]; 404 |
//! | `GET /stock` | 200 [`StockReport`] |
//!
//! Plus `/healthz`, `/readyz` and `/admin/fault` (see [`crate::faults`]).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::StatusCode;
use serde::{Deserialize, Serialize};
use switchyard::store::{Store, Table, Txn};
use switchyard_rpc::http::{Json, ServerOptions};
use switchyard_rpc::problem::types;
use switchyard_rpc::{CallOptions, HttpClient, Problem, ServiceClient};
use tokio::net::TcpListener;

use super::{
    ErrorClass, KeyLocks, Running, ServeError, atomically, class_of_call, now_ms, problems,
    spawn_http,
};
use crate::model::{Catalog, Invalid, Item, normalize_items, validate_id};

/// The service's name (in the registry and in spans).
pub const SERVICE: &str = "inventory";

/// The largest request body the REST API accepts (64 KiB).
pub const BODY_LIMIT: usize = 64 * 1024;

/// Stock per SKU (key: SKU).
pub const STOCK: Table<StockLevel> = Table::new("inventory.stock");

/// Reservations per order (key: order id).
pub const RESERVATIONS: Table<Reservation> = Table::new("inventory.reservations");

/// One SKU's stock. `available + reserved + committed` is constant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockLevel {
    /// The SKU.
    pub sku: String,
    /// Units free to reserve.
    pub available: u64,
    /// Units held by open reservations.
    pub reserved: u64,
    /// Units of committed (shipped) reservations.
    pub committed: u64,
}

impl StockLevel {
    /// Every unit of the SKU, whatever its state.
    pub fn total(&self) -> u64 {
        self.available + self.reserved + self.committed
    }
}

/// The whole stock (`GET /stock`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockReport {
    /// Every SKU, by SKU.
    pub skus: Vec<StockLevel>,
    /// The sum of every SKU's units (the conservation invariant).
    pub total_units: u64,
}

/// Where a reservation is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReservationState {
    /// The units are held for the order.
    Reserved,
    /// The units went back to the stock (the order failed).
    Released,
    /// The units left with the shipment.
    Committed,
}

/// An order's reservation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    /// The order.
    pub order_id: String,
    /// One line per SKU (repeated SKUs of the order merged), by SKU.
    pub items: Vec<Item>,
    /// Its state.
    pub state: ReservationState,
    /// When it was made (Unix ms).
    pub created_ms: u64,
    /// When its state last changed (Unix ms).
    pub updated_ms: u64,
}

/// What a release did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseOutcome {
    /// The order.
    pub order_id: String,
    /// The reservation's state after the call (`None`: the order was never reserved).
    pub state: Option<ReservationState>,
    /// True if this call returned units to the stock (false for every repeat).
    pub released_now: bool,
}

/// Everything that can go wrong with an inventory operation, on the server (core
/// logic) and in the client alike.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    /// The request is malformed; fix the named field.
    #[error("{0}")]
    Invalid(#[from] Invalid),
    /// A SKU of the order is not in the catalog; fix the order.
    #[error("unknown SKU `{sku}` (field `{field}`); order from the catalog")]
    UnknownSku {
        /// The request field.
        field: String,
        /// The SKU.
        sku: String,
    },
    /// A SKU is short; nothing was reserved. Order less, or fail the order.
    #[error("out of stock: `{sku}` has {available} units, the order asks for {requested}")]
    OutOfStock {
        /// The first short SKU.
        sku: String,
        /// Units asked for.
        requested: u64,
        /// Units available.
        available: u64,
    },
    /// The order was reserved before with other items: one order id, one set of items.
    #[error("order `{order_id}` was reserved with other items; use a new order id")]
    ReservedDifferently {
        /// The order.
        order_id: String,
    },
    /// The order has no reservation (commit without reserve): reserve first.
    #[error("order `{order_id}` has no reservation; reserve it first")]
    NoReservation {
        /// The order.
        order_id: String,
    },
    /// The reservation was released (the order failed) and cannot be committed.
    #[error("the reservation of order `{order_id}` was released; it cannot be committed")]
    Released {
        /// The order.
        order_id: String,
    },
    /// The inventory's store failed; retry later.
    #[error("the inventory store failed: {0}; retry later")]
    Store(#[from] switchyard::Error),
    /// The call to the inventory service failed (client side): see its `kind()`.
    #[error("calling inventory failed: {0}")]
    Call(#[source] switchyard_rpc::Error),
}

impl InventoryError {
    /// What to do about it (see [`ErrorClass`]).
    pub fn class(&self) -> ErrorClass {
        match self {
            InventoryError::Invalid(_) | InventoryError::ReservedDifferently { .. } => {
                ErrorClass::Invalid
            }
            InventoryError::UnknownSku { .. }
            | InventoryError::OutOfStock { .. }
            | InventoryError::NoReservation { .. }
            | InventoryError::Released { .. } => ErrorClass::Refused,
            InventoryError::Store(_) => ErrorClass::Unavailable,
            InventoryError::Call(e) => class_of_call(e),
        }
    }

    /// Whether trying again later may succeed (store or transport trouble), as opposed
    /// to an answer that stays the same.
    pub fn is_retryable(&self) -> bool {
        self.class().is_retryable()
    }

    /// The problem document the REST API answers with.
    pub fn to_problem(&self) -> Problem {
        match self {
            InventoryError::Invalid(i) => Problem::validation(&i.field, &i.reason),
            InventoryError::UnknownSku { field, sku } => Problem::new(
                problems::UNKNOWN_SKU,
                StatusCode::UNPROCESSABLE_ENTITY,
                "Unknown SKU",
            )
            .with_detail(self.to_string())
            .with("field", field.as_str())
            .with("sku", sku.as_str()),
            InventoryError::OutOfStock {
                sku,
                requested,
                available,
            } => Problem::new(problems::OUT_OF_STOCK, StatusCode::CONFLICT, "Out of stock")
                .with_detail(self.to_string())
                .with("sku", sku.as_str())
                .with("requested", *requested)
                .with("available", *available),
            InventoryError::NoReservation { order_id } => Problem::new(
                problems::NO_RESERVATION,
                StatusCode::NOT_FOUND,
                "No reservation",
            )
            .with_detail(self.to_string())
            .with("order_id", order_id.as_str()),
            InventoryError::ReservedDifferently { order_id } => Problem::new(
                problems::RESERVATION_MISMATCH,
                StatusCode::CONFLICT,
                "Reserved with other items",
            )
            .with_detail(self.to_string())
            .with("order_id", order_id.as_str()),
            InventoryError::Released { order_id } => Problem::new(
                problems::RESERVATION_RELEASED,
                StatusCode::CONFLICT,
                "Reservation released",
            )
            .with_detail(self.to_string())
            .with("order_id", order_id.as_str()),
            InventoryError::Store(e) => {
                tracing::error!(error = %e, "inventory store failed");
                Problem::new(
                    problems::STORE_UNAVAILABLE,
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Store unavailable",
                )
            }
            InventoryError::Call(_) => Problem::internal(),
        }
    }

    /// The typed error of a failed call: the service's problem types become their
    /// variants, anything else is [`InventoryError::Call`].
    pub fn from_call(e: switchyard_rpc::Error) -> Self {
        let Some(p) = e.problem() else {
            return InventoryError::Call(e);
        };
        let s = |name: &str| p.extension_str(name).unwrap_or_default().to_string();
        let n = |name: &str| p.extensions.get(name).and_then(|v| v.as_u64()).unwrap_or(0);
        match p.type_uri.as_str() {
            problems::OUT_OF_STOCK => InventoryError::OutOfStock {
                sku: s("sku"),
                requested: n("requested"),
                available: n("available"),
            },
            problems::UNKNOWN_SKU => InventoryError::UnknownSku {
                field: s("field"),
                sku: s("sku"),
            },
            problems::NO_RESERVATION => InventoryError::NoReservation {
                order_id: s("order_id"),
            },
            problems::RESERVATION_MISMATCH => InventoryError::ReservedDifferently {
                order_id: s("order_id"),
            },
            problems::RESERVATION_RELEASED => InventoryError::Released {
                order_id: s("order_id"),
            },
            types::VALIDATION => InventoryError::Invalid(Invalid::new(
                s("field"),
                p.detail.clone().unwrap_or_default(),
            )),
            _ => InventoryError::Call(e),
        }
    }
}

impl IntoResponse for InventoryError {
    fn into_response(self) -> Response {
        self.to_problem().into_response()
    }
}

// ---------------------------------------------------------------- core logic

/// Adds every product of `catalog` missing from the stock table, with its initial
/// stock; returns how many were added (0 when already seeded: existing stock is never
/// reset).
pub async fn seed_in(txn: &Txn, catalog: &Catalog) -> Result<u64, InventoryError> {
    let mut added = 0;
    for p in catalog.products() {
        if txn.get(&STOCK, &p.sku).await?.is_none() {
            txn.put(
                &STOCK,
                &p.sku,
                &StockLevel {
                    sku: p.sku.clone(),
                    available: p.initial_stock,
                    reserved: 0,
                    committed: 0,
                },
            )?;
            added += 1;
        }
    }
    Ok(added)
}

/// Reserves every line of `items` for `order_id` in `txn`, or nothing (see the
/// [module docs](self)). A repeat returns the existing reservation unchanged (the same
/// items are required).
pub async fn reserve_in(
    txn: &Txn,
    order_id: &str,
    items: &[Item],
) -> Result<Reservation, InventoryError> {
    validate_id("order_id", order_id)?;
    let wanted = normalize_items(items)?;
    if let Some(existing) = txn.get(&RESERVATIONS, order_id).await? {
        if existing.items != lines(&wanted) {
            return Err(InventoryError::ReservedDifferently {
                order_id: order_id.to_string(),
            });
        }
        return Ok(existing);
    }
    // Check everything before writing anything.
    let mut rows = Vec::with_capacity(wanted.len());
    for (sku, &qty) in &wanted {
        let Some(row) = txn.get(&STOCK, sku).await? else {
            let i = items.iter().position(|it| &it.sku == sku).unwrap_or(0);
            return Err(InventoryError::UnknownSku {
                field: format!("items[{i}].sku"),
                sku: sku.clone(),
            });
        };
        if row.available < qty {
            return Err(InventoryError::OutOfStock {
                sku: sku.clone(),
                requested: qty,
                available: row.available,
            });
        }
        rows.push((row, qty));
    }
    for (mut row, qty) in rows {
        row.available -= qty;
        row.reserved += qty;
        txn.put(&STOCK, &row.sku.clone(), &row)?;
    }
    let now = now_ms();
    let reservation = Reservation {
        order_id: order_id.to_string(),
        items: lines(&wanted),
        state: ReservationState::Reserved,
        created_ms: now,
        updated_ms: now,
    };
    txn.put(&RESERVATIONS, order_id, &reservation)?;
    Ok(reservation)
}

fn lines(wanted: &BTreeMap<String, u64>) -> Vec<Item> {
    wanted
        .iter()
        .map(|(sku, &qty)| Item::new(sku.clone(), u32::try_from(qty).unwrap_or(u32::MAX)))
        .collect()
}

/// Where a reservation's units sit in a stock row.
#[derive(Clone, Copy)]
enum Units {
    Available,
    Reserved,
    Committed,
}

fn units(row: &mut StockLevel, u: Units) -> &mut u64 {
    match u {
        Units::Available => &mut row.available,
        Units::Reserved => &mut row.reserved,
        Units::Committed => &mut row.committed,
    }
}

/// Moves a reservation's units from one part of their stock rows to another (reserved →
/// available on release, reserved → committed on commit, committed → available on a
/// restock).
async fn shift(txn: &Txn, r: &Reservation, from: Units, to: Units) -> Result<(), InventoryError> {
    for it in &r.items {
        let qty = u64::from(it.qty);
        let mut row = txn.get(&STOCK, &it.sku).await?.ok_or_else(|| {
            switchyard::Error::storage(
                format!(
                    "stock row `{}` of reservation `{}` is missing",
                    it.sku, r.order_id
                ),
                "inconsistent inventory store",
            )
        })?;
        let taken = units(&mut row, from);
        *taken = taken.saturating_sub(qty);
        *units(&mut row, to) += qty;
        txn.put(&STOCK, &it.sku, &row)?;
    }
    Ok(())
}

/// Releases the order's reservation in `txn` (idempotent; a no-op for an order never
/// reserved, already released or committed).
pub async fn release_in(txn: &Txn, order_id: &str) -> Result<ReleaseOutcome, InventoryError> {
    validate_id("order_id", order_id)?;
    let Some(mut r) = txn.get(&RESERVATIONS, order_id).await? else {
        return Ok(ReleaseOutcome {
            order_id: order_id.to_string(),
            state: None,
            released_now: false,
        });
    };
    let released_now = r.state == ReservationState::Reserved;
    if released_now {
        shift(txn, &r, Units::Reserved, Units::Available).await?;
        r.state = ReservationState::Released;
        r.updated_ms = now_ms();
        txn.put(&RESERVATIONS, order_id, &r)?;
    }
    Ok(ReleaseOutcome {
        order_id: order_id.to_string(),
        state: Some(r.state),
        released_now,
    })
}

/// Commits the order's reservation in `txn` (the units leave with the shipment;
/// idempotent). Fails for an order never reserved or already released.
pub async fn commit_in(txn: &Txn, order_id: &str) -> Result<Reservation, InventoryError> {
    validate_id("order_id", order_id)?;
    let Some(mut r) = txn.get(&RESERVATIONS, order_id).await? else {
        return Err(InventoryError::NoReservation {
            order_id: order_id.to_string(),
        });
    };
    match r.state {
        ReservationState::Committed => Ok(r),
        ReservationState::Released => Err(InventoryError::Released {
            order_id: order_id.to_string(),
        }),
        ReservationState::Reserved => {
            shift(txn, &r, Units::Reserved, Units::Committed).await?;
            r.state = ReservationState::Committed;
            r.updated_ms = now_ms();
            txn.put(&RESERVATIONS, order_id, &r)?;
            Ok(r)
        }
    }
}

/// Puts a committed reservation's units back on the shelf in `txn` (the shipment was
/// cancelled before it left): `committed` → `available`, the reservation `released`.
/// Returns whether it did (a no-op for a reservation that is not committed).
pub async fn restock_in(txn: &Txn, order_id: &str) -> Result<bool, InventoryError> {
    validate_id("order_id", order_id)?;
    let Some(mut r) = txn.get(&RESERVATIONS, order_id).await? else {
        return Ok(false);
    };
    if r.state != ReservationState::Committed {
        return Ok(false);
    }
    shift(txn, &r, Units::Committed, Units::Available).await?;
    r.state = ReservationState::Released;
    r.updated_ms = now_ms();
    txn.put(&RESERVATIONS, order_id, &r)?;
    Ok(true)
}

/// In-process locks of an order and its SKUs (see [`Inventory::lock`]); released on drop.
#[derive(Debug)]
pub struct StockLocks(#[allow(dead_code)] Vec<tokio::sync::OwnedMutexGuard<()>>);

/// The inventory's core over its store. Cheap to clone.
#[derive(Clone)]
pub struct Inventory {
    store: Arc<dyn Store>,
    locks: KeyLocks,
}

impl std::fmt::Debug for Inventory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inventory").finish_non_exhaustive()
    }
}

impl Inventory {
    /// The inventory over `store` (not seeded: see [`seed`](Self::seed)).
    pub fn new(store: Arc<dyn Store>) -> Self {
        Inventory {
            store,
            locks: KeyLocks::new(1024),
        }
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Takes the in-process locks of the order and of `skus`: writers of one SKU's stock
    /// row take turns instead of failing each other's optimistic commits. Hold them until
    /// the transaction that writes the rows is committed (in a router handler:
    /// [`Context::hold`](switchyard::router::Context::hold)).
    pub async fn lock(&self, order_id: &str, skus: &[String]) -> StockLocks {
        StockLocks(
            self.locks
                .lock(std::iter::once(order_id).chain(skus.iter().map(String::as_str)))
                .await,
        )
    }

    /// Runs `f` atomically while holding [`lock`](Self::lock)'s locks.
    async fn locked<R, F, Fut>(
        &self,
        order_id: &str,
        skus: &[String],
        f: F,
    ) -> Result<R, InventoryError>
    where
        F: Fn(Txn) -> Fut,
        Fut: Future<Output = Result<R, InventoryError>>,
    {
        let _locks = self.lock(order_id, skus).await;
        atomically(&self.store, f).await
    }

    /// Seeds the stock from `catalog` where missing (see [`seed_in`]).
    pub async fn seed(&self, catalog: &Catalog) -> Result<u64, InventoryError> {
        atomically(
            &self.store,
            |txn| async move { seed_in(&txn, catalog).await },
        )
        .await
    }

    /// Reserves all of `items` for `order_id` or nothing (see [`reserve_in`]).
    pub async fn reserve(
        &self,
        order_id: &str,
        items: &[Item],
    ) -> Result<Reservation, InventoryError> {
        let skus: Vec<String> = items.iter().map(|i| i.sku.clone()).collect();
        self.locked(order_id, &skus, |txn| async move {
            reserve_in(&txn, order_id, items).await
        })
        .await
    }

    /// The SKUs of the order's reservation, for locking.
    async fn skus_of(&self, order_id: &str) -> Result<Vec<String>, InventoryError> {
        Ok(self
            .reservation(order_id)
            .await?
            .map(|r| r.items.into_iter().map(|i| i.sku).collect())
            .unwrap_or_default())
    }

    /// Releases the order's reservation (see [`release_in`]).
    pub async fn release(&self, order_id: &str) -> Result<ReleaseOutcome, InventoryError> {
        validate_id("order_id", order_id)?;
        let skus = self.skus_of(order_id).await?;
        self.locked(order_id, &skus, |txn| async move {
            release_in(&txn, order_id).await
        })
        .await
    }

    /// Commits the order's reservation (see [`commit_in`]).
    pub async fn commit(&self, order_id: &str) -> Result<Reservation, InventoryError> {
        validate_id("order_id", order_id)?;
        let skus = self.skus_of(order_id).await?;
        self.locked(order_id, &skus, |txn| async move {
            commit_in(&txn, order_id).await
        })
        .await
    }

    /// The order's reservation, if any.
    pub async fn reservation(&self, order_id: &str) -> Result<Option<Reservation>, InventoryError> {
        Ok(Txn::new(self.store.clone())
            .get(&RESERVATIONS, order_id)
            .await?)
    }

    /// The stock of `sku`, if it is a catalog SKU.
    pub async fn stock(&self, sku: &str) -> Result<Option<StockLevel>, InventoryError> {
        Ok(Txn::new(self.store.clone()).get(&STOCK, sku).await?)
    }

    /// Units of `sku` free to reserve (`None`: unknown SKU).
    pub async fn available(&self, sku: &str) -> Result<Option<u64>, InventoryError> {
        Ok(self.stock(sku).await?.map(|s| s.available))
    }

    /// Every SKU's stock, by SKU.
    pub async fn all_stock(&self) -> Result<Vec<StockLevel>, InventoryError> {
        Ok(Txn::new(self.store.clone())
            .scan(&STOCK, "", usize::MAX)
            .await?
            .into_iter()
            .map(|(_, s)| s)
            .collect())
    }

    /// Every unit of every SKU (available + reserved + committed): constant while the
    /// inventory works correctly.
    pub async fn total_units(&self) -> Result<u64, InventoryError> {
        Ok(self.all_stock().await?.iter().map(StockLevel::total).sum())
    }
}

// ---------------------------------------------------------------- REST

/// The body of `POST /reservations`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReserveRequest {
    /// The order.
    pub order_id: String,
    /// Its lines.
    pub items: Vec<Item>,
}

async fn http_reserve(
    State(inv): State<Inventory>,
    Json(req): Json<ReserveRequest>,
) -> Result<Json<Reservation>, InventoryError> {
    inv.reserve(&req.order_id, &req.items).await.map(Json)
}

async fn http_release(
    State(inv): State<Inventory>,
    Path(order_id): Path<String>,
) -> Result<Json<ReleaseOutcome>, InventoryError> {
    inv.release(&order_id).await.map(Json)
}

async fn http_commit(
    State(inv): State<Inventory>,
    Path(order_id): Path<String>,
) -> Result<Json<Reservation>, InventoryError> {
    inv.commit(&order_id).await.map(Json)
}

async fn http_reservation(
    State(inv): State<Inventory>,
    Path(order_id): Path<String>,
) -> Result<Json<Reservation>, InventoryError> {
    validate_id("order_id", &order_id)?;
    inv.reservation(&order_id)
        .await?
        .map(Json)
        .ok_or(InventoryError::NoReservation { order_id })
}

async fn http_stock(
    State(inv): State<Inventory>,
    Path(sku): Path<String>,
) -> Result<Response, InventoryError> {
    Ok(match inv.stock(&sku).await? {
        Some(s) => Json(s).into_response(),
        None => Problem::new(types::NOT_FOUND, StatusCode::NOT_FOUND, "Unknown SKU")
            .with_detail(format!("no SKU `{sku}` in the catalog"))
            .with("sku", sku)
            .into_response(),
    })
}

async fn http_all_stock(State(inv): State<Inventory>) -> Result<Json<StockReport>, InventoryError> {
    let skus = inv.all_stock().await?;
    let total_units = skus.iter().map(StockLevel::total).sum();
    Ok(Json(StockReport { skus, total_units }))
}

/// The REST routes over `inventory` (without the standard layers; [`start`] adds them).
pub fn routes(inventory: Inventory) -> axum::Router {
    axum::Router::new()
        .route("/reservations", post(http_reserve))
        .route("/reservations/{order_id}", get(http_reservation))
        .route("/reservations/{order_id}/release", post(http_release))
        .route("/reservations/{order_id}/commit", post(http_commit))
        .route("/stock", get(http_all_stock))
        .route("/stock/{sku}", get(http_stock))
        .with_state(inventory)
}

/// Seeds `store` from the standard [`Catalog`] where missing, then serves the REST API
/// on `listener` until `shutdown` completes. Registers nothing.
pub async fn start(
    store: Arc<dyn Store>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Running, ServeError> {
    start_with(Inventory::new(store), listener, shutdown).await
}

/// [`start`] with a given core, so that the process's other writers of the stock (the
/// inventory's event handlers) share its in-process locks.
pub async fn start_with(
    inventory: Inventory,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Running, ServeError> {
    inventory
        .seed(&Catalog::standard())
        .await
        .map_err(|e| match e {
            InventoryError::Store(e) => ServeError::Store(e),
            other => ServeError::Store(switchyard::Error::InvalidArgument(other.to_string())),
        })?;
    let mut opts = ServerOptions::new(SERVICE);
    opts.body_limit = BODY_LIMIT;
    spawn_http(routes(inventory), opts, listener, shutdown)
}

// ---------------------------------------------------------------- client

/// The typed client of the inventory, by service name [`SERVICE`]. Every operation is
/// idempotent per order id, so every call is retryable (the caller's idempotency key,
/// if any, is passed through too). Cheap to clone.
#[derive(Debug, Clone)]
pub struct InventoryClient {
    svc: ServiceClient,
}

fn idempotent(opts: &CallOptions) -> CallOptions {
    opts.clone().idempotent()
}

impl InventoryClient {
    /// The client of service [`SERVICE`] through `http`.
    pub fn new(http: &HttpClient) -> Self {
        InventoryClient {
            svc: http.service(SERVICE),
        }
    }

    /// `POST /reservations`: reserves all of `items` for `order_id`, or fails with
    /// [`InventoryError::OutOfStock`] / [`InventoryError::UnknownSku`].
    pub async fn reserve(
        &self,
        order_id: &str,
        items: &[Item],
        opts: &CallOptions,
    ) -> Result<Reservation, InventoryError> {
        let body = ReserveRequest {
            order_id: order_id.to_string(),
            items: items.to_vec(),
        };
        self.svc
            .post_json_with("/reservations", &body, &idempotent(opts))
            .await
            .map_err(InventoryError::from_call)
    }

    /// `POST /reservations/{order_id}/release`.
    pub async fn release(
        &self,
        order_id: &str,
        opts: &CallOptions,
    ) -> Result<ReleaseOutcome, InventoryError> {
        validate_id("order_id", order_id)?;
        self.svc
            .post_json_with(
                &format!("/reservations/{order_id}/release"),
                &serde_json::json!({}),
                &idempotent(opts),
            )
            .await
            .map_err(InventoryError::from_call)
    }

    /// `POST /reservations/{order_id}/commit`.
    pub async fn commit(
        &self,
        order_id: &str,
        opts: &CallOptions,
    ) -> Result<Reservation, InventoryError> {
        validate_id("order_id", order_id)?;
        self.svc
            .post_json_with(
                &format!("/reservations/{order_id}/commit"),
                &serde_json::json!({}),
                &idempotent(opts),
            )
            .await
            .map_err(InventoryError::from_call)
    }

    /// `GET /reservations/{order_id}` (`None`: no reservation).
    pub async fn reservation(
        &self,
        order_id: &str,
        opts: &CallOptions,
    ) -> Result<Option<Reservation>, InventoryError> {
        validate_id("order_id", order_id)?;
        match self
            .svc
            .get_json_with(&format!("/reservations/{order_id}"), opts)
            .await
            .map_err(InventoryError::from_call)
        {
            Ok(r) => Ok(Some(r)),
            Err(InventoryError::NoReservation { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `GET /stock/{sku}` (`None`: unknown SKU).
    pub async fn stock(
        &self,
        sku: &str,
        opts: &CallOptions,
    ) -> Result<Option<StockLevel>, InventoryError> {
        validate_id("sku", sku)?;
        match self.svc.get_json_with(&format!("/stock/{sku}"), opts).await {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.kind() == switchyard_rpc::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(InventoryError::from_call(e)),
        }
    }

    /// `GET /stock`.
    pub async fn all_stock(&self, opts: &CallOptions) -> Result<StockReport, InventoryError> {
        self.svc
            .get_json_with("/stock", opts)
            .await
            .map_err(InventoryError::from_call)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard::store::MemoryStore;

    fn inv() -> Inventory {
        Inventory::new(Arc::new(MemoryStore::new()))
    }

    #[tokio::test]
    async fn reserve_release_commit() {
        let inv = inv();
        assert_eq!(inv.seed(&Catalog::standard()).await.unwrap(), 21);
        assert_eq!(inv.seed(&Catalog::standard()).await.unwrap(), 0);
        let total = inv.total_units().await.unwrap();
        let r = inv
            .reserve("o-1", &[Item::new("sku-001", 2), Item::new("sku-001", 1)])
            .await
            .unwrap();
        assert_eq!(r.items, vec![Item::new("sku-001", 3)]);
        assert_eq!(inv.available("sku-001").await.unwrap(), Some(9_997));
        let again = inv
            .reserve("o-1", &[Item::new("sku-001", 3)])
            .await
            .unwrap();
        assert_eq!(again, r);
        assert_eq!(inv.available("sku-001").await.unwrap(), Some(9_997));
        let c = inv.commit("o-1").await.unwrap();
        assert_eq!(c.state, ReservationState::Committed);
        let rel = inv.release("o-1").await.unwrap();
        assert!(!rel.released_now);
        assert_eq!(inv.stock("sku-001").await.unwrap().unwrap().committed, 3);
        assert_eq!(inv.total_units().await.unwrap(), total);
        assert!(matches!(
            inv.commit("o-none").await,
            Err(InventoryError::NoReservation { .. })
        ));
    }
}
