//! The five backing services of the shop, one module each. Every module has the same
//! shape:
//!
//! - **core logic** as methods of a small handle over the service's own
//!   `Arc<dyn Store>` (e.g. [`inventory::Inventory::reserve`]), each also available as
//!   a `*_in(&Txn, …)` function so a router handler can apply the same effect inside its
//!   message's transaction (exactly once with the inbox mark);
//! - a **server**: `start(…, listener, shutdown) -> Running`, serving REST (axum via
//!   `switchyard_rpc::http`) or gRPC (tonic) with health and readiness, the
//!   [fault injection](crate::faults) admin routes, and graceful shutdown. `start`
//!   registers nothing: the caller puts [`Running::url`] in its registry;
//! - a **typed client** (`InventoryClient`, …) calling the service by name through
//!   `switchyard_rpc` (deadline, retries, breaker, balancing), with a typed error;
//! - for the event-driven patterns, `subscribe(&mut Router, …)` (and for payment,
//!   `respond`) registering the service's router handlers. The router must be built on
//!   the service's own store.
//!
//! | service | sync API | async API |
//! | --- | --- | --- |
//! | [`inventory`] | REST: reservations, stock | — (patterns call the core from their handlers) |
//! | [`payment`] | gRPC `shop.payment.v1.Payment` | request/reply responder on [`PAYMENT_REQUESTS`](crate::model::PAYMENT_REQUESTS) |
//! | [`shipping`] | REST: shipments | label writer on `ShipmentCreated` |
//! | [`notification`] | REST: notifications | e-mails on order events |
//! | [`analytics`] | REST: events, stats | counts every shop event |

pub mod analytics;
pub mod inventory;
pub mod notification;
pub mod payment;
pub mod shipping;

use std::collections::hash_map::DefaultHasher;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::middleware::from_fn_with_state;
use switchyard::store::{Store, Txn};
use switchyard_rpc::http::{ServerOptions, router, serve};
use tokio::net::TcpListener;
use tokio::sync::{Mutex, OwnedMutexGuard};
use tokio::task::JoinHandle;

use crate::faults::{self, Faults};

/// The `type` URIs of the shop's own problem documents (the generic ones — validation,
/// malformed JSON, too large — come from [`switchyard_rpc::problem::types`]).
pub mod problems {
    /// A SKU of the order is short; `sku`, `requested` and `available` say which.
    pub const OUT_OF_STOCK: &str = "https://switchyard.dev/problems/shop/out-of-stock";
    /// A SKU is not in the catalog; `field` and `sku` name it.
    pub const UNKNOWN_SKU: &str = "https://switchyard.dev/problems/shop/unknown-sku";
    /// The order has no reservation.
    pub const NO_RESERVATION: &str = "https://switchyard.dev/problems/shop/no-reservation";
    /// The order was reserved before with other items.
    pub const RESERVATION_MISMATCH: &str =
        "https://switchyard.dev/problems/shop/reservation-mismatch";
    /// The reservation was released and can no longer be committed.
    pub const RESERVATION_RELEASED: &str =
        "https://switchyard.dev/problems/shop/reservation-released";
    /// The order has no shipment.
    pub const NO_SHIPMENT: &str = "https://switchyard.dev/problems/shop/no-shipment";
    /// The order's shipment was cancelled: it cannot be created again.
    pub const SHIPMENT_CANCELLED: &str = "https://switchyard.dev/problems/shop/shipment-cancelled";
    /// The service's store failed; retry later.
    pub const STORE_UNAVAILABLE: &str = "https://switchyard.dev/problems/shop/store-unavailable";
}

/// What a caller should do about a failed service operation (every service error has
/// a `class()`): the patterns decide between retrying, failing the order and
/// compensating by this, never by parsing messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// The request is malformed: fix it; never retry it unchanged.
    Invalid,
    /// The service said no for a business reason (out of stock, declined, …): the same
    /// request gets the same answer; fail the order (and compensate what was done).
    Refused,
    /// The service or its store is unavailable or overloaded: retry later, with the same
    /// idempotency key.
    Unavailable,
    /// The deadline passed: the outcome is unknown; retry with the same idempotency key
    /// to learn it (or compensate).
    DeadlineExceeded,
    /// A bug or a contract mismatch (a 5xx, an answer that does not decode): see the logs.
    Internal,
}

impl ErrorClass {
    /// True for the classes a retry may fix ([`Unavailable`](Self::Unavailable),
    /// [`DeadlineExceeded`](Self::DeadlineExceeded)).
    pub fn is_retryable(self) -> bool {
        matches!(self, ErrorClass::Unavailable | ErrorClass::DeadlineExceeded)
    }
}

/// The class of a failed call that no service-specific problem type explained.
pub(crate) fn class_of_call(e: &switchyard_rpc::Error) -> ErrorClass {
    use switchyard_rpc::ErrorKind as K;
    match e.kind() {
        K::Unavailable | K::CircuitOpen | K::Overloaded | K::Conflict => ErrorClass::Unavailable,
        K::DeadlineExceeded => ErrorClass::DeadlineExceeded,
        K::Rejected | K::InvalidInput => ErrorClass::Invalid,
        _ => ErrorClass::Internal,
    }
}

/// What caused an event a service publishes, so the event continues the flow: its
/// correlation id, causation id, trace and deadline come from the cause.
#[derive(Debug, Clone, Copy, Default)]
pub enum Cause<'a> {
    /// Nothing known (a new flow).
    #[default]
    None,
    /// A message being handled (a router handler's `ctx.envelope`).
    Message(&'a switchyard::Envelope),
    /// A sync call being handled (its [`CallContext`](switchyard_rpc::CallContext)).
    Call(&'a switchyard_rpc::CallContext),
}

impl Cause<'_> {
    /// `env`, linked to this cause.
    pub fn link(self, mut env: switchyard::Envelope) -> switchyard::Envelope {
        match self {
            Cause::None => env,
            Cause::Message(m) => env.caused_by(m),
            Cause::Call(ctx) => {
                env.correlationid = ctx.correlation_id.clone();
                env.traceparent = ctx.traceparent.map(|t| t.child().to_string());
                env.deadline = ctx.deadline;
                env
            }
        }
    }
}

/// A started server.
#[derive(Debug)]
pub struct Running {
    /// Its base URL (`http://127.0.0.1:<port>`): register it under the service's name.
    pub url: String,
    /// Its fault injection settings (also reachable at `<url>/admin/fault`).
    pub faults: Faults,
    /// The server task: ends after the shutdown future completes and the calls in
    /// flight finish (or when serving fails).
    pub task: JoinHandle<Result<(), ServeError>>,
}

/// Why a server could not start or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The listener failed (address unavailable, socket error).
    #[error("serving failed: {0}; check the listener's address")]
    Io(#[from] std::io::Error),
    /// The gRPC transport failed.
    #[error("gRPC serving failed: {0}")]
    Grpc(#[from] tonic::transport::Error),
    /// The service's store failed while starting (e.g. seeding the stock).
    #[error("the service's store failed while starting: {0}; check the data directory")]
    Store(#[from] switchyard::Error),
}

/// The URL of `listener`.
fn url_of(listener: &TcpListener) -> Result<String, ServeError> {
    Ok(format!("http://{}", listener.local_addr()?))
}

/// A REST server ready to run: its URL, its fault settings and the future serving it.
struct HttpServer<F> {
    url: String,
    faults: Faults,
    serve: F,
}

/// Prepares a REST service: its `routes` behind the fault middleware, the fault admin
/// routes, health and readiness (ready once serving, not ready once shutting down),
/// the context/deadline middleware and the body limit of `opts`.
fn http_server(
    routes: axum::Router,
    opts: ServerOptions,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<HttpServer<impl Future<Output = Result<(), ServeError>> + Send + 'static>, ServeError> {
    let url = url_of(&listener)?;
    let faults = Faults::new();
    let app = routes
        .layer(from_fn_with_state(faults.clone(), faults::middleware))
        .merge(faults::admin_routes(faults.clone()));
    let app = router(app, &opts);
    opts.health.set_ready(true);
    let health = opts.health.clone();
    let shutdown = async move {
        shutdown.await;
        health.set_ready(false);
    };
    tracing::info!(service = %opts.service, %url, "serving");
    Ok(HttpServer {
        url,
        faults,
        serve: async move { Ok(serve(listener, app, shutdown).await?) },
    })
}

/// [`http_server`], spawned.
fn spawn_http(
    routes: axum::Router,
    opts: ServerOptions,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Running, ServeError> {
    let s = http_server(routes, opts, listener, shutdown)?;
    Ok(Running {
        url: s.url,
        faults: s.faults,
        task: tokio::spawn(s.serve),
    })
}

/// Runs `f` in a fresh transaction and commits it, like [`switchyard::store::transact`],
/// but a business error (`Err` from `f`) commits nothing and is returned as is, and a
/// commit conflict is retried up to 64 times with a short jittered backoff (hot rows
/// such as one SKU's stock see many concurrent writers).
pub(crate) async fn atomically<R, E, F, Fut>(store: &Arc<dyn Store>, f: F) -> Result<R, E>
where
    F: Fn(Txn) -> Fut,
    Fut: Future<Output = Result<R, E>>,
    E: From<switchyard::Error>,
{
    let mut attempt: u32 = 0;
    loop {
        let txn = Txn::new(store.clone());
        let out = f(txn.clone()).await?;
        match txn.commit().await {
            Ok(()) => return Ok(out),
            Err(switchyard::Error::Conflict { .. }) if attempt < 64 => {
                attempt += 1;
                let cap = 1u64 << attempt.min(5);
                tokio::time::sleep(Duration::from_micros(fastrand::u64(100..=cap * 500))).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// In-process locks by key (striped): writers of the same hot rows in one process take
/// turns instead of failing each other's optimistic commits. Several instances of a
/// service still meet at the store's conflict check, which [`atomically`] retries.
#[derive(Debug, Clone)]
pub(crate) struct KeyLocks {
    stripes: Arc<[Arc<Mutex<()>>]>,
}

impl KeyLocks {
    pub(crate) fn new(n: usize) -> Self {
        KeyLocks {
            stripes: (0..n.max(1)).map(|_| Arc::new(Mutex::new(()))).collect(),
        }
    }

    fn stripe(&self, key: &str) -> usize {
        let mut h = DefaultHasher::new();
        key.hash(&mut h);
        (h.finish() % self.stripes.len() as u64) as usize
    }

    /// Locks the stripes of `keys` in ascending order (no deadlock between callers).
    pub(crate) async fn lock<'a>(
        &self,
        keys: impl IntoIterator<Item = &'a str>,
    ) -> Vec<OwnedMutexGuard<()>> {
        let mut idx: Vec<usize> = keys.into_iter().map(|k| self.stripe(k)).collect();
        idx.sort_unstable();
        idx.dedup();
        let mut guards = Vec::with_capacity(idx.len());
        for i in idx {
            guards.push(self.stripes[i].clone().lock_owned().await);
        }
        guards
    }
}

/// Spawns a gRPC server on `listener` until `shutdown` completes: `service` (already
/// behind its fault layer) registered with `grpc.health.v1.Health` — serving under "",
/// `name` and the service's proto name, not serving once shutdown starts — behind
/// switchyard-rpc's context/deadline layer, with the fault admin routes of `faults` over
/// HTTP/1.1 on the same port. What the payment service and the Order API's gRPC side
/// share.
pub(crate) async fn spawn_grpc<S>(
    name: &'static str,
    service: S,
    faults: Faults,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> JoinHandle<Result<(), ServeError>>
where
    S: tower::Service<http::Request<tonic::body::Body>, Error = std::convert::Infallible>
        + tonic::server::NamedService
        + Clone
        + Send
        + Sync
        + 'static,
    S::Response: axum::response::IntoResponse,
    S::Future: Send + 'static,
{
    use tonic_health::ServingStatus;
    let (health, health_service) = tonic_health::server::health_reporter();
    let names = [String::new(), name.to_string(), S::NAME.to_string()];
    for n in &names {
        health.set_service_status(n, ServingStatus::Serving).await;
    }
    let routes = tonic::service::Routes::new(health_service)
        .add_service(service)
        .into_axum_router()
        .merge(faults::admin_routes(faults));
    let shutdown = async move {
        shutdown.await;
        for n in names {
            health
                .set_service_status(n, ServingStatus::NotServing)
                .await;
        }
    };
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .accept_http1(true)
            .layer(switchyard_rpc::grpc::ContextLayer::new(name))
            .add_routes(tonic::service::Routes::from(routes))
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await?;
        Ok(())
    })
}

/// Writes `contents` as `path` so that no reader ever sees part of it: to `staging`
/// first (same file system), then renamed over `path`; the directories are created when
/// missing. Not fsynced: a message or label lost in a crash is written again by the
/// redelivery its unfinished commit causes.
///
/// The writes of the whole process go through one thread, one after the other: file
/// creation in one directory serializes on the directory's lock in the kernel anyway,
/// and many threads spinning on that lock (or handing each file to a pool thread and
/// back) cost more than one thread that takes every queued write in turn.
pub(crate) async fn write_atomically(
    staging: PathBuf,
    path: PathBuf,
    contents: Vec<u8>,
) -> std::io::Result<()> {
    let (reply, answer) = tokio::sync::oneshot::channel();
    let job = FileJob {
        staging,
        path,
        contents,
        reply,
    };
    file_writer()?
        .send(job)
        .map_err(|_| std::io::Error::other("the file writer thread stopped"))?;
    answer
        .await
        .map_err(|_| std::io::Error::other("the file writer thread stopped"))?
}

/// One file for the file writer thread.
struct FileJob {
    staging: PathBuf,
    path: PathBuf,
    contents: Vec<u8>,
    reply: tokio::sync::oneshot::Sender<std::io::Result<()>>,
}

impl FileJob {
    fn run(self) {
        let write = || {
            std::fs::write(&self.staging, &self.contents)?;
            std::fs::rename(&self.staging, &self.path)
        };
        let done = match write() {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let dirs = [self.staging.parent(), self.path.parent()];
                dirs.into_iter()
                    .flatten()
                    .try_for_each(std::fs::create_dir_all)
                    .and_then(|()| write())
            }
            done => done,
        };
        let _ = self.reply.send(done);
    }
}

/// The sender to the process's file writer thread (started on first use).
fn file_writer() -> std::io::Result<&'static std::sync::mpsc::Sender<FileJob>> {
    static WRITER: std::sync::LazyLock<Option<std::sync::mpsc::Sender<FileJob>>> =
        std::sync::LazyLock::new(|| {
            let (tx, rx) = std::sync::mpsc::channel::<FileJob>();
            std::thread::Builder::new()
                .name("shop-files".into())
                .spawn(move || {
                    while let Ok(job) = rx.recv() {
                        job.run();
                    }
                })
                .ok()?;
            Some(tx)
        });
    WRITER
        .as_ref()
        .ok_or_else(|| std::io::Error::other("could not start the file writer thread"))
}

/// Milliseconds since the Unix epoch, now.
pub(crate) fn now_ms() -> u64 {
    switchyard::Timestamp::now().unix_micros() / 1000
}
