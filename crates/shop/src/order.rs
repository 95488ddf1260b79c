//! The Order service's core: what an order is, its status and timeline, the order book
//! (the Order service's store of orders), and the contract every pattern implements.
//!
//! Everything that happens to an order — in whichever service, in whichever pattern —
//! is appended to its timeline ([`Order::history`]) with a timestamp and the service
//! that did it, so `GET /orders/{id}` and `shop status` can show the whole flow.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use switchyard::Timestamp;
use switchyard::store::{Store, Table, Txn, transact};
use tokio::sync::watch;

use crate::model::{Catalog, Cents, Invalid, Item, normalize_items, validate_id};

/// The five ways the shop can place an order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pattern {
    /// Order calls every service in turn and waits for each.
    Sync,
    /// Services react to each other's events; no coordinator.
    Choreography,
    /// Order asks Payment over the bus and continues on the reply.
    RequestReply,
    /// A saga in the Order service drives the steps, with compensations.
    Orchestration,
    /// Sync checks on the critical path, the rest asynchronously through the outbox.
    Hybrid,
}

impl Pattern {
    /// Every pattern, in the order the README presents them.
    pub const ALL: [Pattern; 5] = [
        Pattern::Sync,
        Pattern::Choreography,
        Pattern::RequestReply,
        Pattern::Orchestration,
        Pattern::Hybrid,
    ];

    /// The name on the command line and in the API (`request-reply`).
    pub fn as_str(self) -> &'static str {
        match self {
            Pattern::Sync => "sync",
            Pattern::Choreography => "choreography",
            Pattern::RequestReply => "request-reply",
            Pattern::Orchestration => "orchestration",
            Pattern::Hybrid => "hybrid",
        }
    }

    /// The name in benchmark figures (`request_reply`).
    pub fn figure_name(self) -> &'static str {
        match self {
            Pattern::RequestReply => "request_reply",
            other => other.as_str(),
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Pattern {
    type Err = Invalid;

    fn from_str(s: &str) -> Result<Self, Invalid> {
        Pattern::ALL
            .into_iter()
            .find(|p| p.as_str() == s || p.figure_name() == s)
            .ok_or_else(|| {
                Invalid::new(
                    "pattern",
                    format!(
                        "unknown pattern `{s}`; use one of sync, choreography, request-reply, orchestration, hybrid"
                    ),
                )
            })
    }
}

/// Where an order is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    /// Accepted and in flight.
    Accepted,
    /// Paid, reserved, shipped. Terminal.
    Completed,
    /// Could not be placed (declined, out of stock, a dependency down); whatever was
    /// done was undone. Terminal.
    Failed,
}

impl OrderStatus {
    /// The name in the API and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Accepted => "accepted",
            OrderStatus::Completed => "completed",
            OrderStatus::Failed => "failed",
        }
    }

    /// Completed or failed: nothing more will happen.
    pub fn is_terminal(self) -> bool {
        self != OrderStatus::Accepted
    }
}

impl fmt::Display for OrderStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for OrderStatus {
    type Err = Invalid;

    fn from_str(s: &str) -> Result<Self, Invalid> {
        match s {
            "accepted" => Ok(OrderStatus::Accepted),
            "completed" => Ok(OrderStatus::Completed),
            "failed" => Ok(OrderStatus::Failed),
            other => Err(Invalid::new(
                "status",
                format!("unknown status `{other}`; use accepted, completed or failed"),
            )),
        }
    }
}

/// One entry of an order's timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimelineEntry {
    /// When it was recorded.
    pub at: Timestamp,
    /// The service that did it (`order`, `inventory`, `payment`, …).
    pub service: String,
    /// What happened (`reserved`, `charged`, `PaymentFailed`, …).
    pub what: String,
    /// Details (a tracking number, a decline reason, …).
    pub detail: Option<String>,
}

/// An order as the Order service keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    /// The order's id.
    pub id: String,
    /// Who ordered.
    pub customer: String,
    /// What, one line per SKU.
    pub items: Vec<Item>,
    /// The price, from the catalog.
    pub amount_cents: Cents,
    /// The payment token (`tok_decline` always declines).
    pub payment_token: String,
    /// How it is placed.
    pub pattern: Pattern,
    /// Where it is.
    pub status: OrderStatus,
    /// Why it failed, for failed orders.
    pub reason: Option<String>,
    /// Everything that happened to it, oldest first.
    pub history: Vec<TimelineEntry>,
    /// When it was accepted.
    pub created_at: Timestamp,
    /// When it last changed.
    pub updated_at: Timestamp,
}

/// An order as a client asks for it (the body of `POST /orders`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewOrder {
    /// The id to use (makes placing idempotent); a fresh one when absent.
    #[serde(default)]
    pub order_id: Option<String>,
    /// Who orders.
    pub customer: String,
    /// What, `[{sku, qty}]`.
    pub items: Vec<Item>,
    /// The payment token.
    pub payment_token: String,
    /// How to place it.
    pub pattern: Pattern,
}

impl NewOrder {
    /// Checks the request and prices it: a new [`Order`] in status `accepted`, or what
    /// is wrong with the request (ids, items, unknown SKUs).
    pub fn validate(&self, catalog: &Catalog) -> Result<Order, Invalid> {
        let id = match &self.order_id {
            Some(id) => {
                validate_id("order_id", id)?;
                id.clone()
            }
            None => format!("o-{}", switchyard::MessageId::new()),
        };
        validate_id("customer", &self.customer)?;
        if self.payment_token.is_empty() || self.payment_token.len() > 128 {
            return Err(Invalid::new("payment_token", "must be 1 to 128 characters"));
        }
        let lines = normalize_items(&self.items)?;
        for (i, it) in self.items.iter().enumerate() {
            if catalog.get(&it.sku).is_none() {
                return Err(Invalid::new(
                    format!("items[{i}].sku"),
                    format!("unknown SKU `{}`", it.sku),
                ));
            }
        }
        let items: Vec<Item> = lines
            .into_iter()
            .map(|(sku, qty)| Item::new(sku, u32::try_from(qty).unwrap_or(u32::MAX)))
            .collect();
        let amount_cents = catalog
            .price(&items)
            .ok_or_else(|| Invalid::new("items", "the order's price overflows"))?;
        let now = Timestamp::now();
        Ok(Order {
            id,
            customer: self.customer.clone(),
            items,
            amount_cents,
            payment_token: self.payment_token.clone(),
            pattern: self.pattern,
            status: OrderStatus::Accepted,
            reason: None,
            history: vec![TimelineEntry {
                at: now,
                service: "order".into(),
                what: "accepted".into(),
                detail: Some(format!("pattern {}", self.pattern)),
            }],
            created_at: now,
            updated_at: now,
        })
    }
}

/// The orders table of the Order service's store.
pub const ORDERS_TABLE: Table<Order> = Table::new("orders");
/// Index of orders by status: key `<status>/<id>`.
pub const ORDERS_BY_STATUS: Table<bool> = Table::new("orders_by_status");

fn status_key(status: OrderStatus, id: &str) -> String {
    format!("{}/{id}", status.as_str())
}

/// Why an order could not be recorded.
#[derive(Debug, thiserror::Error)]
pub enum BookError {
    /// An order with this id exists already (placing twice with one id places once).
    #[error("order {0} exists already")]
    Exists(String),
    /// No order with this id.
    #[error("no order {0}")]
    NotFound(String),
    /// The store failed; retry.
    #[error(transparent)]
    Store(#[from] switchyard::Error),
}

/// The Order service's orders: create, append to the timeline, finish, read, wait.
///
/// Every change is one transaction on the Order service's store; the `*_in` variants
/// join a transaction the caller commits (a router handler's, with its inbox mark and
/// outbox events) — call [`OrderBook::changed`] after such a commit so that waiters wake.
///
/// A flow that runs in the Order service's memory notes its progress with
/// [`note`](OrderBook::note): the entry (with its time) is held in memory, shown by
/// [`get`](OrderBook::get) at once, and written with the order's next commit (the next
/// [`record`](OrderBook::record), or the end). Such a flow is run again from the start
/// after a crash, every step idempotent, so its notes are written again; what must
/// survive a crash to steer the rerun (`undoing`) is recorded, not noted. One commit per
/// order instead of one per step is what lets the sync flow keep up with its callers.
#[derive(Clone)]
pub struct OrderBook {
    store: Arc<dyn Store>,
    watchers: Arc<Mutex<HashMap<String, watch::Sender<u64>>>>,
    /// Noted timeline entries not written yet, by order id.
    pending: Arc<Mutex<HashMap<String, Vec<TimelineEntry>>>>,
}

impl fmt::Debug for OrderBook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OrderBook").finish_non_exhaustive()
    }
}

impl OrderBook {
    /// The book over the Order service's store.
    pub fn new(store: Arc<dyn Store>) -> Self {
        OrderBook {
            store,
            watchers: Arc::new(Mutex::new(HashMap::new())),
            pending: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// The Order service's store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Records a new order in `txn`; fails with [`BookError::Exists`] for a known id.
    pub async fn create_in(&self, txn: &Txn, order: &Order) -> Result<(), BookError> {
        if txn.get(&ORDERS_TABLE, &order.id).await?.is_some() {
            return Err(BookError::Exists(order.id.clone()));
        }
        txn.put(&ORDERS_TABLE, &order.id, order)?;
        txn.put(
            &ORDERS_BY_STATUS,
            &status_key(order.status, &order.id),
            &true,
        )?;
        Ok(())
    }

    /// Records a new order (its own commit).
    pub async fn create(&self, order: &Order) -> Result<(), BookError> {
        let result = transact(&self.store, |txn| async move {
            Ok(self.create_in(&txn, order).await)
        })
        .await?;
        result?;
        self.changed(&order.id);
        Ok(())
    }

    /// Appends `what` (by `service`) to the order's timeline in `txn`.
    pub async fn record_in(
        &self,
        txn: &Txn,
        id: &str,
        service: &str,
        what: &str,
        detail: Option<String>,
    ) -> Result<(), BookError> {
        let mut order = txn
            .get(&ORDERS_TABLE, id)
            .await?
            .ok_or_else(|| BookError::NotFound(id.to_string()))?;
        self.merge_pending(&mut order);
        let now = Timestamp::now();
        order.history.push(TimelineEntry {
            at: now,
            service: service.to_string(),
            what: what.to_string(),
            detail,
        });
        order.updated_at = now;
        txn.put(&ORDERS_TABLE, id, &order)?;
        Ok(())
    }

    /// Appends to the timeline (its own commit).
    pub async fn record(
        &self,
        id: &str,
        service: &str,
        what: &str,
        detail: Option<String>,
    ) -> Result<(), BookError> {
        let result = transact(&self.store, |txn| {
            let detail = detail.clone();
            async move { Ok(self.record_in(&txn, id, service, what, detail).await) }
        })
        .await?;
        result?;
        self.changed(id);
        Ok(())
    }

    /// Ends the order as `completed` (`reason` None) or `failed` (with the reason) in
    /// `txn`, with a last timeline entry by `service`. Ending an order that has ended
    /// changes nothing (the first outcome stands) and returns false.
    pub async fn finish_in(
        &self,
        txn: &Txn,
        id: &str,
        service: &str,
        reason: Option<String>,
    ) -> Result<bool, BookError> {
        let mut order = txn
            .get(&ORDERS_TABLE, id)
            .await?
            .ok_or_else(|| BookError::NotFound(id.to_string()))?;
        if order.status.is_terminal() {
            return Ok(false);
        }
        self.merge_pending(&mut order);
        let before = order.status;
        let now = Timestamp::now();
        order.status = match reason {
            None => OrderStatus::Completed,
            Some(_) => OrderStatus::Failed,
        };
        order.history.push(TimelineEntry {
            at: now,
            service: service.to_string(),
            what: order.status.as_str().to_string(),
            detail: reason.clone(),
        });
        order.reason = reason;
        order.updated_at = now;
        txn.put(&ORDERS_TABLE, id, &order)?;
        txn.delete(&ORDERS_BY_STATUS, &status_key(before, id));
        txn.put(&ORDERS_BY_STATUS, &status_key(order.status, id), &true)?;
        Ok(true)
    }

    /// Ends the order (its own commit); see [`finish_in`](Self::finish_in).
    pub async fn finish(
        &self,
        id: &str,
        service: &str,
        reason: Option<String>,
    ) -> Result<bool, BookError> {
        let result = transact(&self.store, |txn| {
            let reason = reason.clone();
            async move { Ok(self.finish_in(&txn, id, service, reason).await) }
        })
        .await?;
        let ended = result?;
        self.changed(id);
        Ok(ended)
    }

    /// Wakes whoever waits on order `id` (call after committing a `*_in` change), and
    /// forgets the noted entries that are written now.
    pub fn changed(&self, id: &str) {
        if lock(&self.pending).contains_key(id)
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            // The stored order is read asynchronously; until then the entries stay noted
            // (reads merge them without duplicates).
            let (book, id) = (self.clone(), id.to_string());
            runtime.spawn(async move { book.forget_written(&id).await });
        }
        let watchers = lock(&self.watchers);
        if let Some(tx) = watchers.get(id) {
            tx.send_modify(|n| *n += 1);
        }
    }

    /// Notes `what` (by `service`) on the order's timeline, to be written with the
    /// order's next commit (see the [type docs](Self)).
    pub fn note(&self, id: &str, service: &str, what: &str, detail: Option<String>) {
        lock(&self.pending)
            .entry(id.to_string())
            .or_default()
            .push(TimelineEntry {
                at: Timestamp::now(),
                service: service.to_string(),
                what: what.to_string(),
                detail,
            });
    }

    /// Appends the noted entries of `order` that its history lacks, in time order.
    fn merge_pending(&self, order: &mut Order) {
        let pending = lock(&self.pending);
        let Some(entries) = pending.get(&order.id) else {
            return;
        };
        let mut added = false;
        for e in entries {
            if !order.history.contains(e) {
                order.history.push(e.clone());
                added = true;
            }
        }
        if added {
            order.history.sort_by_key(|e| e.at);
            if let Some(last) = order.history.last() {
                order.updated_at = order.updated_at.max(last.at);
            }
        }
    }

    /// Drops the noted entries of order `id` that its stored history holds (all of them
    /// once the order has ended, or is gone).
    async fn forget_written(&self, id: &str) {
        let stored = Txn::new(self.store.clone()).get(&ORDERS_TABLE, id).await;
        let mut pending = lock(&self.pending);
        match stored {
            Ok(Some(order)) if !order.status.is_terminal() => {
                if let Some(entries) = pending.get_mut(id) {
                    entries.retain(|e| !order.history.contains(e));
                    if entries.is_empty() {
                        pending.remove(id);
                    }
                }
            }
            Ok(_) => {
                pending.remove(id);
            }
            // Unreadable now: keep them; the next change tries again.
            Err(_) => {}
        }
    }

    /// The order `id`, if it exists, with the entries noted but not written yet.
    pub async fn get(&self, id: &str) -> Result<Option<Order>, BookError> {
        let mut order = Txn::new(self.store.clone()).get(&ORDERS_TABLE, id).await?;
        if let Some(o) = &mut order {
            self.merge_pending(o);
        }
        Ok(order)
    }

    /// Up to `limit` orders in `status` (by id).
    pub async fn list(&self, status: OrderStatus, limit: usize) -> Result<Vec<Order>, BookError> {
        let txn = Txn::new(self.store.clone());
        let prefix = format!("{}/", status.as_str());
        let mut out = Vec::new();
        for (key, _) in txn.scan(&ORDERS_BY_STATUS, &prefix, limit).await? {
            if let Some(id) = key.strip_prefix(&prefix)
                && let Some(order) = txn.get(&ORDERS_TABLE, id).await?
            {
                out.push(order);
            }
        }
        Ok(out)
    }

    /// How many orders are in each status.
    pub async fn counts(&self) -> Result<HashMap<OrderStatus, u64>, BookError> {
        let txn = Txn::new(self.store.clone());
        let mut out = HashMap::new();
        for status in [
            OrderStatus::Accepted,
            OrderStatus::Completed,
            OrderStatus::Failed,
        ] {
            let prefix = format!("{}/", status.as_str());
            let n = txn
                .scan(&ORDERS_BY_STATUS, &prefix, usize::MAX)
                .await?
                .len() as u64;
            out.insert(status, n);
        }
        Ok(out)
    }

    /// Waits up to `timeout` for order `id` to be terminal; returns it as it is then
    /// (terminal or not), or `NotFound`.
    pub async fn wait(&self, id: &str, timeout: Duration) -> Result<Order, BookError> {
        let mut rx = {
            let mut watchers = lock(&self.watchers);
            watchers
                .entry(id.to_string())
                .or_insert_with(|| watch::channel(0).0)
                .subscribe()
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let result = loop {
            let order = match self.get(id).await {
                Ok(Some(o)) => o,
                Ok(None) => break Err(BookError::NotFound(id.to_string())),
                Err(e) => break Err(e),
            };
            if order.status.is_terminal() {
                break Ok(order);
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                _ => break Ok(order),
            }
        };
        drop(rx);
        let mut watchers = lock(&self.watchers);
        if watchers.get(id).is_some_and(|tx| tx.receiver_count() == 0) {
            watchers.remove(id);
        }
        result
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Why an order could not be placed.
#[derive(Debug, thiserror::Error)]
pub enum PlaceError {
    /// The request is invalid (422 / INVALID_ARGUMENT): the field and why.
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// An order with this id exists already (409 / ALREADY_EXISTS).
    #[error("order {0} exists already")]
    Exists(String),
    /// The shop cannot take orders now (a store or a dependency is down; 503 /
    /// UNAVAILABLE): retry with the same order id.
    #[error("cannot place the order now: {0}; retry with the same order id")]
    Unavailable(String),
}

impl From<BookError> for PlaceError {
    fn from(e: BookError) -> Self {
        match e {
            BookError::Exists(id) => PlaceError::Exists(id),
            other => PlaceError::Unavailable(other.to_string()),
        }
    }
}

/// One pattern's way of placing an order.
///
/// `place` gets a validated, priced order that is not yet recorded. It records it in
/// the [`OrderBook`] (for the async patterns atomically with whatever starts the flow:
/// the `OrderCreated` event in the outbox, the saga start) and returns once the order
/// is accepted — for the sync pattern, once it is terminal. The order's later progress
/// goes to its timeline, and its end to [`OrderBook::finish_in`].
#[async_trait]
pub trait Flow: Send + Sync + 'static {
    /// The pattern this flow implements.
    fn pattern(&self) -> Pattern;

    /// Places `order`; returns it as recorded when `place` returns.
    async fn place(&self, order: Order) -> Result<Order, PlaceError>;
}

/// The Order service's front desk: validates and prices a request, hands it to the
/// flow of its pattern, and answers reads. What the public REST and gRPC APIs and the
/// CLI talk to.
#[derive(Clone)]
pub struct OrderDesk {
    catalog: Arc<Catalog>,
    book: OrderBook,
    flows: HashMap<Pattern, Arc<dyn Flow>>,
}

impl fmt::Debug for OrderDesk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OrderDesk")
            .field("patterns", &self.patterns())
            .finish_non_exhaustive()
    }
}

impl OrderDesk {
    /// A desk over `book` pricing with `catalog`, with no flow yet.
    pub fn new(catalog: Arc<Catalog>, book: OrderBook) -> Self {
        OrderDesk {
            catalog,
            book,
            flows: HashMap::new(),
        }
    }

    /// Adds (or replaces) the flow of its pattern.
    pub fn with_flow(mut self, flow: Arc<dyn Flow>) -> Self {
        self.flows.insert(flow.pattern(), flow);
        self
    }

    /// The patterns this desk can place orders with.
    pub fn patterns(&self) -> Vec<Pattern> {
        let mut p: Vec<Pattern> = self.flows.keys().copied().collect();
        p.sort();
        p
    }

    /// The order book.
    pub fn book(&self) -> &OrderBook {
        &self.book
    }

    /// The catalog orders are priced with.
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// Validates `request`, then places it with its pattern's flow. Placing an id that
    /// exists fails with [`PlaceError::Exists`] (nothing is placed twice).
    pub async fn place(&self, request: &NewOrder) -> Result<Order, PlaceError> {
        let order = request.validate(&self.catalog)?;
        let flow = self.flows.get(&order.pattern).ok_or_else(|| {
            PlaceError::Unavailable(format!(
                "the pattern `{}` is not running in this shop",
                order.pattern
            ))
        })?;
        if self.book.get(&order.id).await?.is_some() {
            return Err(PlaceError::Exists(order.id));
        }
        flow.place(order).await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use switchyard::store::MemoryStore;

    fn request(id: &str) -> NewOrder {
        NewOrder {
            order_id: Some(id.into()),
            customer: "ada".into(),
            items: vec![Item::new("sku-001", 2), Item::new("sku-001", 1)],
            payment_token: "tok_ok".into(),
            pattern: Pattern::Hybrid,
        }
    }

    #[test]
    fn a_request_is_validated_priced_and_merged() {
        let catalog = Catalog::standard();
        let order = request("o-1").validate(&catalog).unwrap();
        assert_eq!(order.items, vec![Item::new("sku-001", 3)]);
        assert_eq!(
            order.amount_cents,
            catalog.price(&[Item::new("sku-001", 3)]).unwrap()
        );
        assert_eq!(order.status, OrderStatus::Accepted);
        let mut bad = request("o-2");
        bad.items[1].sku = "sku-nope".into();
        assert_eq!(bad.validate(&catalog).unwrap_err().field, "items[1].sku");
        let mut bad = request("o 3");
        bad.customer = "ada".into();
        assert_eq!(bad.validate(&catalog).unwrap_err().field, "order_id");
        assert_eq!(
            "request_reply".parse::<Pattern>().unwrap(),
            Pattern::RequestReply
        );
        assert_eq!("nope".parse::<Pattern>().unwrap_err().field, "pattern");
    }

    #[tokio::test]
    async fn the_book_records_finishes_once_and_wakes_waiters() {
        let book = OrderBook::new(Arc::new(MemoryStore::new()));
        let order = request("o-1").validate(&Catalog::standard()).unwrap();
        book.create(&order).await.unwrap();
        assert!(matches!(
            book.create(&order).await,
            Err(BookError::Exists(_))
        ));
        let waiter = {
            let book = book.clone();
            tokio::spawn(async move { book.wait("o-1", Duration::from_secs(30)).await })
        };
        book.record("o-1", "payment", "charged", Some("ch-1".into()))
            .await
            .unwrap();
        assert!(book.finish("o-1", "order", None).await.unwrap());
        assert!(
            !book
                .finish("o-1", "order", Some("late".into()))
                .await
                .unwrap()
        );
        let done = waiter.await.unwrap().unwrap();
        assert_eq!(done.status, OrderStatus::Completed);
        let whats: Vec<_> = done.history.iter().map(|e| e.what.as_str()).collect();
        assert_eq!(whats, ["accepted", "charged", "completed"]);
        assert_eq!(
            book.list(OrderStatus::Completed, 10).await.unwrap().len(),
            1
        );
        assert!(
            book.list(OrderStatus::Accepted, 10)
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(book.counts().await.unwrap()[&OrderStatus::Completed], 1);
        let missing = book.wait("o-404", Duration::from_millis(10)).await;
        assert!(matches!(missing, Err(BookError::NotFound(_))));
    }
}
