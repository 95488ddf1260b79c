//! The router: typed handlers for (topic, group), with exactly-once effects in the
//! service's store.
//!
//! Per message: decode (unknown type or malformed payload: to the DLQ at once, with the
//! reason) → inbox check (already processed: ack and skip) → the handler, which gets a
//! transaction on the service's store and may publish only into that transaction's
//! outbox → one atomic commit of state, outbox and inbox mark → ack. A handler that
//! changed nothing in the store commits nothing (there is no effect to protect).
//!
//! A handler returns `Ok`, a retryable error (redelivered with backoff, then the DLQ) or
//! a terminal one (the DLQ at once). Ordering per subject comes from the bus: a failing
//! message keeps only its own subject waiting; other subjects keep flowing.
//!
//! A responder ([`Router::respond`]) is a handler whose return value becomes the reply
//! to a request. Requests arrive on the bus's transient channel (a subscription separate
//! from the durable routes, even on the same topic name): an expired request is skipped,
//! a repeated one gets its stored reply again, effects are committed with the inbox mark
//! and the stored reply before the reply is sent, and a handler without effects answers
//! without a commit. See [`crate::reply`] for the whole exchange and its decisions.
//!
//! ```no_run
//! # use std::sync::Arc;
//! use switchyard::router::{Context, HandlerError, Router};
//! use switchyard::store::Table;
//! # #[derive(serde::Serialize, serde::Deserialize)] struct OrderCreated { order_id: String }
//! # impl switchyard::Event for OrderCreated { const TYPE: &'static str = "order.created.v1"; }
//! # async fn demo(bus: Arc<dyn switchyard::Bus>, store: Arc<dyn switchyard::store::Store>) {
//! const SEEN: Table<u64> = Table::new("seen");
//! let mut router = Router::new("billing", bus, store);
//! router.on("orders", "billing", |ctx: Context, ev: OrderCreated| async move {
//!     let n = ctx.txn.get(&SEEN, &ev.order_id).await?.unwrap_or(0);
//!     ctx.txn.put(&SEEN, &ev.order_id, &(n + 1))?;
//!     Ok::<(), HandlerError>(())
//! });
//! router.run(std::future::pending()).await.unwrap();
//! # }
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;

mod respond;

use crate::bus::{Bus, Delivery, SubscribeOptions};
use crate::codec::{self, Event};
use crate::envelope::{Envelope, MessageId, Timestamp};
use crate::error::{Error, Result};
use crate::store::{Store, Txn};

/// Why a handler failed, which decides what happens to the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandlerError {
    /// Worth retrying (a dependency is down, a conflict): redelivered with backoff, then the DLQ.
    #[error("retryable: {0}")]
    Retryable(String),
    /// Never worth retrying (invalid input, a business rule): to the DLQ at once, with the reason.
    #[error("terminal: {0}")]
    Terminal(String),
}

impl HandlerError {
    /// A retryable failure.
    pub fn retryable(reason: impl Into<String>) -> Self {
        HandlerError::Retryable(reason.into())
    }

    /// Dead-letters the message now with `reason` (a terminal failure).
    pub fn dead_letter(reason: impl Into<String>) -> Self {
        HandlerError::Terminal(reason.into())
    }
}

impl From<Error> for HandlerError {
    /// Store and bus errors are retryable except invalid input and decode errors.
    fn from(e: Error) -> Self {
        use crate::error::ErrorKind::*;
        match e.kind() {
            InvalidInput | Decode => HandlerError::Terminal(e.to_string()),
            _ => HandlerError::Retryable(e.to_string()),
        }
    }
}

/// What a handler gets besides the event: the transaction and the incoming message.
#[derive(Clone)]
pub struct Context {
    /// The transaction on the service's store; committed with the inbox mark when the
    /// handler returns `Ok`. Publish through it (its outbox) — there is no other way.
    pub txn: Txn,
    /// The incoming message.
    pub envelope: Arc<Envelope>,
    /// 1 for the first delivery, 2 for the first redelivery, …
    pub attempt: u32,
    service: Arc<str>,
    held: Held,
}

/// What a handler asked the router to keep until its transaction is settled.
pub(crate) type Held = Arc<std::sync::Mutex<Vec<Box<dyn std::any::Any + Send>>>>;

impl Context {
    /// Publishes a typed event caused by the incoming message (via the outbox, after the
    /// commit): correlation id, causation id, trace context and deadline are carried over.
    ///
    /// When the incoming message is a request ([`crate::reply`]), the published event's
    /// `correlationid` is the caller's business flow (the request's
    /// [`FLOW_EXTENSION`](crate::reply::FLOW_EXTENSION)), not the exchange id.
    pub fn publish<E: Event>(&self, topic: &str, event: &E) -> Result<MessageId> {
        let mut env = codec::encode(event, &format!("/{}", self.service))
            .map_err(|e| Error::InvalidArgument(e.to_string()))?
            .caused_by(&self.envelope);
        if let Some(flow) = self.envelope.extension(crate::reply::FLOW_EXTENSION) {
            env.correlationid = Some(flow.to_string());
        }
        Ok(self.txn.publish_envelope(topic, env))
    }

    /// Keeps `value` alive until the handler's transaction has been committed (or given
    /// up), then drops it. For in-process locks on hot rows: a lock taken in the handler
    /// and held here makes the writers of one row take turns through the commit instead
    /// of failing each other's optimistic commits.
    pub fn hold<T: Send + 'static>(&self, value: T) {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(Box::new(value));
    }

    /// The service this router runs for.
    pub fn service(&self) -> &str {
        &self.service
    }
}

/// What a handler produced: nothing (an event handler) or a reply's type and JSON payload
/// (a responder).
struct ReplyBody {
    event_type: &'static str,
    data: String,
}

type BoxFuture =
    Pin<Box<dyn Future<Output = std::result::Result<Option<ReplyBody>, HandlerError>> + Send>>;
type Handler = Arc<dyn Fn(Context, Arc<Envelope>) -> BoxFuture + Send + Sync>;

/// Called after a message's effect is committed and before it is acknowledged, with the
/// consumer (`topic/group`) and the message (for flow records, metrics — and crash tests).
pub type CommitObserver = Arc<dyn Fn(&str, &Envelope) + Send + Sync>;

/// Counters of a router (all routes).
#[derive(Debug, Default)]
pub struct RouterStats {
    /// Messages whose effect was committed (or that had nothing to commit) and were
    /// acknowledged; requests answered successfully by a responder the same way.
    pub processed: AtomicU64,
    /// Deliveries skipped because the inbox had them (duplicates).
    pub duplicates: AtomicU64,
    /// Retryable failures (nacked for redelivery, or retried in place by a responder).
    pub retried: AtomicU64,
    /// Messages sent to the DLQ by the router (terminal, undecodable, unknown type).
    pub dead_lettered: AtomicU64,
    /// Replies sent by responders for the first time (answers and error replies).
    pub replies: AtomicU64,
    /// Stored replies sent again to a repeated request (same id or idempotency key).
    pub replies_resent: AtomicU64,
    /// Replies that found no requester subscribed to their `replyto` (it stopped).
    pub replies_undeliverable: AtomicU64,
    /// Requests dropped without processing because their deadline had passed.
    pub expired: AtomicU64,
    /// Requests dropped because they had no `replyto` (nowhere to answer).
    pub requests_without_replyto: AtomicU64,
}

struct Route {
    topic: String,
    group: String,
    /// Durable event handlers by type.
    handlers: HashMap<&'static str, Handler>,
    /// Responders by request type (a transient subscription of their own).
    responders: HashMap<&'static str, Handler>,
    options: SubscribeOptions,
    concurrency: usize,
}

/// What a router's gate ([`Router::gate`]) decides for one message before its handler.
#[derive(Debug, Clone)]
pub enum GateDecision {
    /// Handle it now.
    Pass,
    /// Not now: the delivery goes back to the bus and comes again after `delay` (one
    /// attempt used). A request on the transient channel is not answered.
    Defer {
        /// When to try again.
        delay: Duration,
        /// Why (kept with the delivery, and in the DLQ if attempts run out).
        reason: String,
    },
    /// Fail this attempt as the handler would have (retried with backoff, or to the DLQ).
    Fail(HandlerError),
}

/// The check every message of a router passes before its handler (see [`Router::gate`]).
pub type Gate =
    Arc<dyn Fn(&Envelope) -> Pin<Box<dyn Future<Output = GateDecision> + Send>> + Send + Sync>;

/// Runs typed handlers against a bus and a store. See the [module docs](self).
pub struct Router {
    service: Arc<str>,
    bus: Arc<dyn Bus>,
    store: Arc<dyn Store>,
    routes: Vec<Route>,
    inbox_window: Duration,
    stats: Arc<RouterStats>,
    observer: Option<CommitObserver>,
    gate: Option<Gate>,
}

/// How many times a commit conflict re-runs the handler before the message is nacked.
const CONFLICT_RETRIES: u32 = 8;

impl Router {
    /// A router for `service` (used as the `source` of what it publishes).
    pub fn new(service: &str, bus: Arc<dyn Bus>, store: Arc<dyn Store>) -> Self {
        Router {
            service: Arc::from(service),
            bus,
            store,
            routes: Vec::new(),
            inbox_window: Duration::from_secs(24 * 3600),
            stats: Arc::new(RouterStats::default()),
            observer: None,
            gate: None,
        }
    }

    /// Calls `f` after each committed effect, before the ack.
    pub fn on_committed(mut self, f: impl Fn(&str, &Envelope) + Send + Sync + 'static) -> Self {
        self.observer = Some(Arc::new(f));
        self
    }

    /// Sets a check every message passes before its handler (durable events and
    /// requests alike): a service that is paused — for maintenance, or a fault injected
    /// to see how its callers cope — defers its messages rather than handling them, so
    /// they wait on the bus like they would for a stopped process, and come back when it
    /// is up. It may also add latency (await inside it) or fail an attempt.
    pub fn gate<F, Fut>(mut self, f: F) -> Self
    where
        F: Fn(&Envelope) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = GateDecision> + Send + 'static,
    {
        self.gate = Some(Arc::new(move |env: &Envelope| {
            Box::pin(f(env)) as Pin<Box<dyn Future<Output = GateDecision> + Send>>
        }));
        self
    }

    /// How long inbox marks are kept (default 24 h). Must exceed the redelivery horizon
    /// of every route (`run` checks), or an old duplicate could be applied twice.
    pub fn inbox_window(mut self, window: Duration) -> Self {
        self.inbox_window = window;
        self
    }

    /// The router's counters.
    pub fn stats(&self) -> Arc<RouterStats> {
        self.stats.clone()
    }

    fn route_mut(&mut self, topic: &str, group: &str) -> &mut Route {
        if let Some(i) = self
            .routes
            .iter()
            .position(|r| r.topic == topic && r.group == group)
        {
            return &mut self.routes[i];
        }
        self.routes.push(Route {
            topic: topic.to_string(),
            group: group.to_string(),
            handlers: HashMap::new(),
            responders: HashMap::new(),
            options: SubscribeOptions::default(),
            concurrency: 64,
        });
        let last = self.routes.len() - 1;
        &mut self.routes[last]
    }

    /// Handles events of type `E` arriving on `topic` for consumer group `group`. Several
    /// event types may share one (topic, group); any other type goes to the DLQ.
    pub fn on<E, F, Fut>(&mut self, topic: &str, group: &str, handler: F) -> &mut Self
    where
        E: Event,
        F: Fn(Context, E) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<(), HandlerError>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let erased: Handler = Arc::new(move |ctx: Context, env: Arc<Envelope>| {
            let handler = handler.clone();
            Box::pin(async move {
                let event: E = codec::decode_payload(&env)
                    .map_err(|e| HandlerError::Terminal(e.to_string()))?;
                handler(ctx, event).await.map(|()| None)
            }) as BoxFuture
        });
        self.route_mut(topic, group)
            .handlers
            .insert(E::TYPE, erased);
        self
    }

    /// Answers requests of type `Req` arriving on the transient topic `topic` for group
    /// `group` (see [`crate::reply`]; the members of a group share the requests). The
    /// handler gets the same [`Context`] as [`on`](Self::on) and returns the reply. When
    /// it changed the store, its effects, the inbox mark and the reply (stored under the
    /// request's key) are committed together before the reply is sent; when it changed
    /// nothing, the reply is sent without a commit. A repeated request gets the stored
    /// reply without the handler running again; an expired one is dropped unprocessed; a
    /// terminal error is replied (and stored) as an error; a retryable one is retried in
    /// place per the route's redelivery policy but never past the request's deadline,
    /// then replied as a retryable error. At most the route's
    /// [`concurrency`](Self::concurrency) requests run at once.
    pub fn respond<Req, Resp, F, Fut>(&mut self, topic: &str, group: &str, handler: F) -> &mut Self
    where
        Req: Event,
        Resp: Event,
        F: Fn(Context, Req) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<Resp, HandlerError>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let erased: Handler = Arc::new(move |ctx: Context, env: Arc<Envelope>| {
            let handler = handler.clone();
            Box::pin(async move {
                let request: Req = codec::decode_payload(&env)
                    .map_err(|e| HandlerError::Terminal(e.to_string()))?;
                let reply = handler(ctx, request).await?;
                let data = serde_json::to_string(&reply).map_err(|e| {
                    HandlerError::Terminal(format!("cannot encode the reply `{}`: {e}", Resp::TYPE))
                })?;
                Ok(Some(ReplyBody {
                    event_type: Resp::TYPE,
                    data,
                }))
            }) as BoxFuture
        });
        self.route_mut(topic, group)
            .responders
            .insert(Req::TYPE, erased);
        self
    }

    /// Sets the subscription options (ack wait, redelivery policy) of (topic, group); a
    /// responder of (topic, group) uses the redelivery policy for its in-place retries.
    pub fn options(&mut self, topic: &str, group: &str, options: SubscribeOptions) -> &mut Self {
        self.route_mut(topic, group).options = options;
        self
    }

    /// Sets how many messages of (topic, group) are handled at once (default 64); the
    /// durable handlers and the responders of (topic, group) each get this many.
    pub fn concurrency(&mut self, topic: &str, group: &str, n: usize) -> &mut Self {
        self.route_mut(topic, group).concurrency = n.max(1);
        self
    }

    /// Runs every route until `shutdown` completes; then stops taking messages and waits
    /// for in-flight handlers to finish (their messages are acked or redelivered later —
    /// nothing is lost). Same as [`bind`](Self::bind) then [`BoundRouter::run`].
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
        self.bind().await?.run(shutdown).await
    }

    /// Checks the settings and subscribes every route (durable and transient) without
    /// handling anything yet. Once it returns, requests to the router's responders are
    /// received (queued until [`BoundRouter::run`]) rather than refused with "no
    /// responders": bind before announcing that a responder is up.
    pub async fn bind(self) -> Result<BoundRouter> {
        for r in self.routes.iter().filter(|r| !r.handlers.is_empty()) {
            let p = &r.options.redelivery;
            let horizon =
                r.options.ack_wait * p.max_attempts.max(1) + p.max_backoff * p.max_attempts.max(1);
            if self.inbox_window <= horizon {
                return Err(Error::InvalidArgument(format!(
                    "inbox window {:?} must exceed the redelivery horizon {:?} of {}/{}; raise `inbox_window`",
                    self.inbox_window, horizon, r.topic, r.group
                )));
            }
        }
        let mut workers = Vec::new();
        for route in self.routes {
            let consumer: Arc<str> = Arc::from(format!("{}/{}", route.topic, route.group));
            if !route.responders.is_empty() {
                let sub = self
                    .bus
                    .subscribe_transient(&route.topic, &route.group)
                    .await?;
                let worker = respond::RespondWorker {
                    consumer: consumer.clone(),
                    handlers: Arc::new(route.responders),
                    store: self.store.clone(),
                    bus: self.bus.clone(),
                    service: self.service.clone(),
                    stats: self.stats.clone(),
                    concurrency: route.concurrency,
                    observer: self.observer.clone(),
                    policy: route.options.redelivery.clone(),
                    gate: self.gate.clone(),
                };
                workers.push(Worker::Transient(worker, sub));
            }
            if route.handlers.is_empty() {
                continue;
            }
            let sub = self
                .bus
                .subscribe(&route.topic, &route.group, route.options.clone())
                .await?;
            let worker = RouteWorker {
                consumer,
                handlers: Arc::new(route.handlers),
                store: self.store.clone(),
                service: self.service.clone(),
                stats: self.stats.clone(),
                concurrency: route.concurrency,
                observer: self.observer.clone(),
                gate: self.gate.clone(),
            };
            workers.push(Worker::Durable(worker, sub));
        }
        Ok(BoundRouter {
            workers,
            store: self.store,
            inbox_window: self.inbox_window,
        })
    }
}

/// A route's worker with its subscription, ready to run.
enum Worker {
    Durable(RouteWorker, crate::bus::Subscription),
    Transient(respond::RespondWorker, crate::bus::TransientSubscription),
}

/// A [`Router`] whose routes are subscribed ([`Router::bind`]); [`run`](Self::run) handles
/// messages. Dropping it unsubscribes everything (durable messages are redelivered
/// later, queued transient requests are lost and time out at their requesters).
pub struct BoundRouter {
    workers: Vec<Worker>,
    store: Arc<dyn Store>,
    inbox_window: Duration,
}

impl std::fmt::Debug for BoundRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoundRouter")
            .field("workers", &self.workers.len())
            .finish()
    }
}

impl BoundRouter {
    /// Handles messages until `shutdown` completes; then stops taking messages and waits
    /// for in-flight handlers to finish (durable messages are acked or redelivered later —
    /// nothing is lost; requests in flight still get their replies).
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut tasks = JoinSet::new();
        for worker in self.workers {
            match worker {
                Worker::Durable(w, sub) => tasks.spawn(w.run(sub, stop_rx.clone())),
                Worker::Transient(w, sub) => tasks.spawn(w.run(sub, stop_rx.clone())),
            };
        }
        let store = self.store.clone();
        let window = self.inbox_window;
        let mut expiry_stop = stop_rx.clone();
        tasks.spawn(async move {
            loop {
                let before = Timestamp::from_unix_micros(
                    Timestamp::now()
                        .unix_micros()
                        .saturating_sub(window.as_micros() as u64),
                );
                match store.expire_inbox(before).await {
                    Ok(n) if n > 0 => tracing::debug!(expired = n, "expired inbox marks"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "expiring inbox marks failed; will retry"),
                }
                match respond::expire_replies(&store, before).await {
                    Ok(n) if n > 0 => tracing::debug!(expired = n, "expired stored replies"),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "expiring stored replies failed; will retry")
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep((window / 24).min(Duration::from_secs(600))) => {}
                    _ = expiry_stop.changed() => return Ok(()),
                }
            }
        });
        let first = tokio::select! {
            _ = shutdown => None,
            r = tasks.join_next() => r,
        };
        let _ = stop_tx.send(true);
        let mut result = Ok(());
        if let Some(Ok(Err(e))) = first {
            result = Err(e);
        }
        while let Some(r) = tasks.join_next().await {
            if let Ok(Err(e)) = r
                && result.is_ok()
            {
                result = Err(e);
            }
        }
        result
    }
}

struct RouteWorker {
    consumer: Arc<str>,
    handlers: Arc<HashMap<&'static str, Handler>>,
    store: Arc<dyn Store>,
    service: Arc<str>,
    stats: Arc<RouterStats>,
    concurrency: usize,
    observer: Option<CommitObserver>,
    gate: Option<Gate>,
}

impl RouteWorker {
    async fn run(
        self,
        mut sub: crate::bus::Subscription,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> Result<()> {
        let limit = Arc::new(Semaphore::new(self.concurrency));
        let me = Arc::new(self);
        let mut inflight = JoinSet::new();
        loop {
            let permits = tokio::select! {
                p = limit.clone().acquire_many_owned(1) => p,
                _ = stop.changed() => break,
            };
            let Ok(first_permit) = permits else { break };
            let available = limit.available_permits() + 1;
            let batch = tokio::select! {
                b = sub.next_batch(available) => b,
                _ = stop.changed() => break,
            };
            let batch = match batch {
                Ok(b) => b,
                Err(e) if e.kind() == crate::error::ErrorKind::Closed => break,
                Err(e) => {
                    tracing::warn!(consumer = %me.consumer, error = %e, "receiving failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let mut first_permit = Some(first_permit);
            for delivery in batch {
                let permit = match first_permit.take() {
                    Some(p) => p,
                    None => match limit.clone().acquire_owned().await {
                        Ok(p) => p,
                        Err(_) => break,
                    },
                };
                let me = me.clone();
                inflight.spawn(async move {
                    me.process(delivery).await;
                    drop(permit);
                });
            }
            while inflight.try_join_next().is_some() {}
        }
        while inflight.join_next().await.is_some() {}
        Ok(())
    }

    async fn process(&self, delivery: Delivery) {
        let env = delivery.envelope_arc();
        if let Some(gate) = &self.gate {
            match gate(&env).await {
                GateDecision::Pass => {}
                GateDecision::Defer { delay, reason } => {
                    self.stats.retried.fetch_add(1, Ordering::Relaxed);
                    self.settle(delivery.nack(Some(delay), reason).await);
                    return;
                }
                GateDecision::Fail(HandlerError::Retryable(reason)) => {
                    return self.retry(delivery, reason).await;
                }
                GateDecision::Fail(HandlerError::Terminal(reason)) => {
                    return self.dead_letter(delivery, reason).await;
                }
            }
        }
        let Some(handler) = self.handlers.get(env.event_type.as_str()).cloned() else {
            let mut known: Vec<_> = self.handlers.keys().copied().collect();
            known.sort();
            let reason = format!(
                "unknown event type `{}` for {} (handles {})",
                env.event_type,
                self.consumer,
                known.join(", ")
            );
            self.dead_letter(delivery, reason).await;
            return;
        };
        match self.store.inbox_contains(&self.consumer, env.id).await {
            Ok(true) => {
                self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                self.settle(delivery.ack().await);
                return;
            }
            Ok(false) => {}
            Err(e) => {
                self.retry(delivery, format!("inbox check failed: {e}"))
                    .await;
                return;
            }
        }
        let mut conflicts = 0;
        loop {
            // Dropped at the end of this attempt: after the commit.
            let held = Held::default();
            let ctx = Context {
                txn: Txn::new(self.store.clone()),
                envelope: env.clone(),
                attempt: delivery.attempt(),
                service: self.service.clone(),
                held: held.clone(),
            };
            let txn = ctx.txn.clone();
            let result = run_handler(&handler, ctx, env.clone()).await.map(|_| ());
            match result {
                Ok(()) if !txn.has_effects() => {
                    // Nothing to make exactly-once: no commit, no inbox mark.
                    self.stats.processed.fetch_add(1, Ordering::Relaxed);
                    self.settle(delivery.ack().await);
                }
                Ok(()) => {
                    txn.mark_processed(&self.consumer, env.id);
                    match txn.commit().await {
                        Ok(()) => {
                            self.stats.processed.fetch_add(1, Ordering::Relaxed);
                            if let Some(observe) = &self.observer {
                                observe(&self.consumer, &env);
                            }
                            self.settle(delivery.ack().await);
                        }
                        Err(Error::AlreadyProcessed { .. }) => {
                            self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                            self.settle(delivery.ack().await);
                        }
                        Err(Error::Conflict { .. }) if conflicts < CONFLICT_RETRIES => {
                            conflicts += 1;
                            continue;
                        }
                        Err(e) => self.retry(delivery, format!("commit failed: {e}")).await,
                    }
                }
                Err(HandlerError::Retryable(reason)) => self.retry(delivery, reason).await,
                Err(HandlerError::Terminal(reason)) => self.dead_letter(delivery, reason).await,
            }
            return;
        }
    }

    async fn retry(&self, delivery: Delivery, reason: String) {
        self.stats.retried.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(consumer = %self.consumer, id = %delivery.envelope().id, attempt = delivery.attempt(), %reason, "handler failed; will retry");
        self.settle(delivery.nack(None, reason).await);
    }

    async fn dead_letter(&self, delivery: Delivery, reason: String) {
        self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
        self.settle(delivery.dead_letter(reason).await);
    }

    fn settle(&self, r: Result<()>) {
        match r {
            Ok(()) => {}
            // The lease expired and the message was handed out again; the inbox absorbs
            // the duplicate.
            Err(e) if e.kind() == crate::error::ErrorKind::StaleDelivery => {
                tracing::info!(consumer = %self.consumer, error = %e, "ack refused as stale; the redelivery will be skipped by the inbox")
            }
            // Anything else: the message stays unsettled and comes back.
            Err(e) => {
                tracing::warn!(consumer = %self.consumer, error = %e, "settling a delivery failed")
            }
        }
    }
}

/// Runs a handler in its own task, so a panic is a failed attempt, not a crash.
async fn run_handler(
    handler: &Handler,
    ctx: Context,
    env: Arc<Envelope>,
) -> std::result::Result<Option<ReplyBody>, HandlerError> {
    match tokio::spawn((handler)(ctx, env)).await {
        Ok(r) => r,
        Err(e) if e.is_panic() => Err(HandlerError::Retryable(format!(
            "handler panicked: {}",
            panic_message(e)
        ))),
        Err(e) => Err(HandlerError::Retryable(format!("handler cancelled: {e}"))),
    }
}

fn panic_message(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(p) => crate::error::panic_text(p),
        Err(_) => "cancelled".into(),
    }
}
