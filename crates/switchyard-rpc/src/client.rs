//! The HTTP client: calls services by name, with every resilience layer on.
//!
//! One call goes through, outermost first:
//!
//! 1. **deadline** — the per-call budget (`CallOptions::timeout`, tightened by the
//!    deadline of the request being handled, if any). A call whose deadline has passed
//!    fails fast without sending; the remaining budget travels downstream in
//!    `x-switchyard-deadline`.
//! 2. **bulkhead** — a semaphore per service: at most
//!    `max_concurrency` calls (with their retries) in flight; further calls wait for a
//!    slot, within their deadline.
//! 3. **retry** — `tower::retry::Retry` with [`RetryPolicy`]: exponential backoff with
//!    full jitter, a `tower` `TpsBudget`, only for idempotent methods
//!    (GET/HEAD/PUT/DELETE/OPTIONS) or calls carrying an idempotency key; on connect
//!    errors, resets, attempt timeouts, 502/503/504, and 429 (waiting at least its
//!    `Retry-After` seconds). A retry that would end past the deadline is not made.
//! 4. **balance + breaker** — per attempt: instances whose breaker admits a call, minus
//!    ejected ones ([`crate::balance`]), power of two choices; the breaker of the
//!    chosen instance ([`crate::breaker`]) records the outcome. When every breaker is
//!    open the attempt fails fast with [`Error::CircuitOpen`] and nothing is sent.
//!
//! Metrics (the `metrics` facade; install any recorder): gauge
//! `switchyard_rpc_breaker_state{service,instance}` (0 closed, 1 open, 2 half-open),
//! counters `switchyard_rpc_retries_total{service}`, `switchyard_rpc_ejections_total{service,instance}`,
//! `switchyard_rpc_retry_budget_exhausted_total{service}`.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tower::ServiceExt;
use tower::retry::Retry;
use tracing::Instrument;

use crate::balance::BalanceConfig;
use crate::breaker::{BreakerConfig, BreakerState};
use crate::conn::Http1Connections;
use crate::context::{CallContext, TraceIdField, WireContext};
use crate::error::{Error, Result};
use crate::pool::Pool;
use crate::problem::{PROBLEM_JSON, Problem};
use crate::registry::Registry;
use crate::retry::Retrier;

/// Client settings (per client; every service gets the same).
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The budget of a call without an explicit timeout.
    pub default_timeout: Duration,
    /// The longest one attempt may take (`None`: the whole remaining budget).
    pub attempt_timeout: Option<Duration>,
    /// Attempts per call, the first included.
    pub max_attempts: u32,
    /// Backoff before the first retry is drawn from `0..=backoff_base`, then doubles.
    pub backoff_base: Duration,
    /// The cap of the backoff.
    pub backoff_max: Duration,
    /// Retry budget: retries may add at most this fraction to the call rate…
    pub retry_ratio: f32,
    /// …plus this many retries per second regardless…
    pub retry_min_per_sec: u32,
    /// …measured over this window.
    pub retry_budget_window: Duration,
    /// The circuit breaker of each instance.
    pub breaker: BreakerConfig,
    /// Load balancing and ejection.
    pub balance: BalanceConfig,
    /// Calls in flight per service (the bulkhead).
    pub max_concurrency: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            default_timeout: Duration::from_secs(10),
            attempt_timeout: None,
            max_attempts: 3,
            backoff_base: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
            retry_ratio: 0.2,
            retry_min_per_sec: 10,
            retry_budget_window: Duration::from_secs(10),
            breaker: BreakerConfig::default(),
            balance: BalanceConfig::default(),
            max_concurrency: 256,
        }
    }
}

/// Options of one call.
#[derive(Debug, Clone, Default)]
pub struct CallOptions {
    /// The call's budget (default: [`ClientConfig::default_timeout`]); a deadline
    /// inherited from the request being handled is never extended.
    pub timeout: Option<Duration>,
    /// The idempotency key (makes a non-idempotent method retryable).
    pub idempotency_key: Option<String>,
    /// The context to continue (default: the current request's, see [`CallContext::current`]).
    pub context: Option<CallContext>,
    /// Marks the call idempotent: retryable even without a key (e.g. a POST, or a
    /// gRPC method, that is safe to repeat).
    pub idempotent: bool,
}

impl CallOptions {
    /// Default options.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the call's budget.
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = Some(d);
        self
    }

    /// Sets the idempotency key.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// Marks the call as safe to repeat (retryable without an idempotency key).
    pub fn idempotent(mut self) -> Self {
        self.idempotent = true;
        self
    }

    /// Continues `ctx` (its trace, correlation id and deadline).
    pub fn context(mut self, ctx: CallContext) -> Self {
        self.context = Some(ctx);
        self
    }
}

/// A raw response.
#[derive(Debug, Clone)]
pub struct CallResponse {
    /// The status.
    pub status: StatusCode,
    /// The headers.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
    /// The instance that answered (its URL, shared with the client's pool: no copy is
    /// made per call).
    pub instance: Arc<str>,
}

/// One outgoing request as the layers see it (cheap to clone for retries: the pieces
/// are shared).
#[derive(Debug, Clone)]
pub struct CallRequest {
    inner: Arc<CallParts>,
}

#[derive(Debug)]
struct CallParts {
    method: Method,
    path: PathAndQuery,
    body: Option<Bytes>,
    /// The context's header values, made once per call.
    wire: WireContext,
    deadline: Instant,
    retryable: bool,
}

/// Headers of an attempt: reserved up front so that neither ours nor the ones hyper
/// adds (`host`, `content-length`) make the map grow.
const ATTEMPT_HEADERS: usize = 12;

struct Core {
    pool: Arc<Pool>,
    cfg: ClientConfig,
}

impl Core {
    fn name(&self) -> &str {
        self.pool.name()
    }
}

/// The innermost service: one attempt on one instance.
#[derive(Clone)]
struct Attempt {
    core: Arc<Core>,
}

impl tower::Service<CallRequest> for Attempt {
    type Response = CallResponse;
    type Error = Error;
    type Future = Pin<Box<dyn Future<Output = Result<CallResponse>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: CallRequest) -> Self::Future {
        let core = self.core.clone();
        Box::pin(async move { attempt(&core, req).await })
    }
}

async fn attempt(core: &Core, req: CallRequest) -> Result<CallResponse> {
    let req = &*req.inner;
    let service = || core.name().to_string();
    let now = Instant::now();
    if now >= req.deadline {
        return Err(Error::DeadlineExceeded { service: service() });
    }
    let lease = core.pool.pick()?;
    let target = lease.target().clone();
    let instance = || lease.instance().to_string();
    let origin = match target.origin() {
        Ok(o) => o,
        Err(e) => {
            let err = Error::Connect {
                service: service(),
                instance: instance(),
                source: Box::new(e),
            };
            lease.finish(false);
            return Err(err);
        }
    };
    // Origin-form: the connection is to the instance already.
    let path = match &origin.path_prefix {
        None => req.path.clone(),
        Some(prefix) => PathAndQuery::try_from(format!("{prefix}{}", req.path))
            .map_err(|e| Error::InvalidRequest(e.to_string()))?,
    };
    let mut request = http::Request::new(Full::new(req.body.clone().unwrap_or_default()));
    *request.method_mut() = req.method.clone();
    *request.uri_mut() = Uri::from(path);
    let mut headers = HeaderMap::with_capacity(ATTEMPT_HEADERS.max(5 + req.wire.len()));
    headers.insert(header::HOST, origin.host_header().clone());
    headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
    if req.body.is_some() {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    req.wire.write(&mut headers);
    *request.headers_mut() = headers;
    let attempt_deadline = match core.cfg.attempt_timeout {
        Some(t) => req.deadline.min(now + t),
        None => req.deadline,
    };
    let transport = |e: Box<dyn std::error::Error + Send + Sync>| Error::Transport {
        service: service(),
        instance: instance(),
        source: e,
    };
    let conns = &target.connections().http1;
    let fut = async {
        let mut request = request;
        loop {
            let (mut sender, reused) = match conns.take() {
                Some(s) => (s, true),
                None => {
                    let s =
                        Http1Connections::connect(origin)
                            .await
                            .map_err(|e| Error::Connect {
                                service: service(),
                                instance: instance(),
                                source: Box::new(e),
                            })?;
                    (s, false)
                }
            };
            // A connection given back the moment its last response ended may not have
            // taken that in yet; one that closed meanwhile is dropped.
            if reused && !sender.is_ready() && sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(request).await {
                Ok(resp) => {
                    let (parts, body) = resp.into_parts();
                    let body = body
                        .collect()
                        .await
                        .map_err(|e| transport(Box::new(e)))?
                        .to_bytes();
                    conns.put(sender);
                    return Ok(CallResponse {
                        status: parts.status,
                        headers: parts.headers,
                        body,
                        instance: lease.instance_url(),
                    });
                }
                Err(mut e) => match e.take_message() {
                    // Not written: a kept-alive connection closed under it (the
                    // server ended it while idle). Sent again on another connection.
                    Some(r) if reused => request = r,
                    _ => return Err(transport(Box::new(e.into_error()))),
                },
            }
        }
    };
    let out = match tokio::time::timeout_at(attempt_deadline, fut).await {
        Ok(r) => r,
        Err(_) if attempt_deadline >= req.deadline => {
            Err(Error::DeadlineExceeded { service: service() })
        }
        Err(_) => Err(Error::AttemptTimeout {
            service: service(),
            instance: instance(),
        }),
    };
    let ok = match &out {
        Ok(r) => !r.status.is_server_error(),
        Err(_) => false,
    };
    lease.finish(ok);
    out
}

/// The retry policy (see the [module docs](self)). One clone per call holds its attempt count.
#[derive(Clone)]
pub struct RetryPolicy {
    retrier: Retrier,
}

fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get(header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

impl RetryPolicy {
    /// The delay before retry number `n` (1-based): uniform in `0..=min(max, base * 2^(n-1))`.
    pub fn backoff(&self, n: u32) -> Duration {
        self.retrier.backoff(n)
    }
}

impl tower::retry::Policy<CallRequest, CallResponse, Error> for RetryPolicy {
    type Future = tokio::time::Sleep;

    fn retry(
        &mut self,
        req: &mut CallRequest,
        result: &mut Result<CallResponse>,
    ) -> Option<Self::Future> {
        let floor = match result {
            Ok(r) => match r.status.as_u16() {
                502..=504 => Some(Duration::ZERO),
                429 => Some(retry_after(&r.headers).unwrap_or_default()),
                _ => None,
            },
            Err(e) if e.is_transient_transport() => Some(Duration::ZERO),
            Err(_) => None,
        };
        self.retrier
            .next(floor, req.inner.retryable, req.inner.deadline)
            .map(tokio::time::sleep)
    }

    /// A call that may not be retried is not kept for a retry (its budget deposit is
    /// made when it starts, see `ServiceClient::call`).
    fn clone_request(&mut self, req: &CallRequest) -> Option<CallRequest> {
        req.inner.retryable.then(|| req.clone())
    }
}

struct Shared {
    core: Arc<Core>,
    /// The retry layer over one attempt (cloned per call: a few reference counts).
    retry: Retry<RetryPolicy, Attempt>,
    /// The bulkhead: one permit per call in flight, held across its retries.
    bulkhead: Arc<Semaphore>,
    /// The per-service retry state (for the budget deposit of non-retryable calls).
    retrier: Retrier,
}

struct ClientInner {
    registry: Arc<dyn Registry>,
    cfg: ClientConfig,
    services: Mutex<HashMap<String, Arc<Shared>>>,
}

/// A client for calling services by name. Cheap to clone; clones share connections,
/// breakers and balancer state.
#[derive(Clone)]
pub struct HttpClient {
    inner: Arc<ClientInner>,
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpClient")
            .field("cfg", &self.inner.cfg)
            .finish_non_exhaustive()
    }
}

impl HttpClient {
    /// A client over `registry` with default settings.
    pub fn new(registry: impl Registry) -> Self {
        Self::with_config(Arc::new(registry), ClientConfig::default())
    }

    /// A client over `registry` with `cfg`.
    pub fn with_config(registry: Arc<dyn Registry>, cfg: ClientConfig) -> Self {
        HttpClient {
            inner: Arc::new(ClientInner {
                registry,
                cfg,
                services: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The client of service `name` (created on first use, then shared).
    pub fn service(&self, name: &str) -> ServiceClient {
        let mut services = self
            .inner
            .services
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let shared = services
            .entry(name.to_string())
            .or_insert_with(|| {
                let cfg = self.inner.cfg.clone();
                let core = Arc::new(Core {
                    pool: Arc::new(Pool::new(
                        name,
                        self.inner.registry.clone(),
                        cfg.breaker,
                        cfg.balance,
                    )),
                    cfg: cfg.clone(),
                });
                let retrier = Retrier::new(&cfg, name);
                let policy = RetryPolicy {
                    retrier: retrier.clone(),
                };
                Arc::new(Shared {
                    retry: Retry::new(policy, Attempt { core: core.clone() }),
                    bulkhead: Arc::new(Semaphore::new(cfg.max_concurrency.max(1))),
                    retrier,
                    core,
                })
            })
            .clone();
        ServiceClient { shared }
    }

    /// The breaker state of every instance called so far: (service, instance, state).
    pub fn breaker_states(&self) -> Vec<(String, String, BreakerState)> {
        let services: Vec<Arc<Shared>> = self
            .inner
            .services
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        let mut out = Vec::new();
        for s in services {
            for (inst, st) in (ServiceClient { shared: s.clone() }).breaker_states() {
                out.push((s.core.name().to_string(), inst, st));
            }
        }
        out.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        out
    }
}

fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::PUT | Method::DELETE | Method::OPTIONS
    )
}

/// The client of one service, by name.
#[derive(Clone)]
pub struct ServiceClient {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ServiceClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceClient")
            .field("service", &self.shared.core.name())
            .finish()
    }
}

impl ServiceClient {
    /// The service's name.
    pub fn name(&self) -> &str {
        self.shared.core.name()
    }

    /// The breaker state of each instance called so far.
    pub fn breaker_states(&self) -> Vec<(String, BreakerState)> {
        self.shared.core.pool.breaker_states()
    }

    /// `GET path`, decoding a JSON response.
    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.get_json_with(path, &CallOptions::default()).await
    }

    /// `GET path` with options.
    pub async fn get_json_with<T: DeserializeOwned>(
        &self,
        path: &str,
        opts: &CallOptions,
    ) -> Result<T> {
        let r = self.call(Method::GET, path, None, opts).await?;
        self.decode(r)
    }

    /// `POST path` with a JSON body, decoding a JSON response.
    pub async fn post_json<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T> {
        self.post_json_with(path, body, &CallOptions::default())
            .await
    }

    /// `POST path` with a JSON body and options (an idempotency key makes it retryable).
    pub async fn post_json_with<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        opts: &CallOptions,
    ) -> Result<T> {
        let body = serde_json::to_vec(body).map_err(|e| Error::InvalidRequest(e.to_string()))?;
        let r = self
            .call(Method::POST, path, Some(Bytes::from(body)), opts)
            .await?;
        self.decode(r)
    }

    fn decode<T: DeserializeOwned>(&self, r: CallResponse) -> Result<T> {
        let body = if r.body.is_empty() && r.status == StatusCode::NO_CONTENT {
            Bytes::from_static(b"null")
        } else {
            r.body
        };
        serde_json::from_slice(&body).map_err(|source| Error::Decode {
            service: self.name().to_string(),
            source,
        })
    }

    /// Makes a call through every layer; a non-2xx answer becomes [`Error::Status`]
    /// (with the callee's problem document when it sent one).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        opts: &CallOptions,
    ) -> Result<CallResponse> {
        let core = &self.shared.core;
        let service = || core.name().to_string();
        if !path.starts_with('/') {
            return Err(Error::InvalidRequest(format!(
                "path `{path}` must start with `/`"
            )));
        }
        let mut ctx = match &opts.context {
            Some(c) => c.downstream(),
            None => CallContext::current_downstream()
                .unwrap_or_else(|| CallContext::default().downstream()),
        };
        ctx.tighten(opts.timeout.unwrap_or(core.cfg.default_timeout));
        let remaining = ctx.remaining().unwrap_or_default();
        if remaining.is_zero() {
            return Err(Error::DeadlineExceeded { service: service() });
        }
        let deadline = Instant::now() + remaining;
        let retryable = is_idempotent(&method) || opts.idempotent || opts.idempotency_key.is_some();
        let path = PathAndQuery::try_from(path)
            .map_err(|e| Error::InvalidRequest(format!("path `{path}`: {e}")))?;
        let span = tracing::info_span!(
            "rpc.client",
            service = %core.name(),
            method = %method,
            path = path.as_str(),
            trace_id = %TraceIdField(ctx.traceparent),
            correlation_id = ctx.correlation_id.as_deref().unwrap_or(""),
            idempotency_key = opts.idempotency_key.as_deref().unwrap_or(""),
        );
        let wire = ctx.wire_with(true, opts.idempotency_key.as_deref());
        let req = CallRequest {
            inner: Arc::new(CallParts {
                method,
                path,
                body,
                wire,
                deadline,
                retryable,
            }),
        };
        if !retryable {
            self.shared.retrier.deposit();
        }
        // The deadline bounds the wait for a bulkhead slot; then every attempt is bounded
        // by it (and a retry that would end past it is not made).
        let run = async {
            let _permit = match self.shared.bulkhead.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => match tokio::time::timeout_at(
                    deadline,
                    self.shared.bulkhead.clone().acquire_owned(),
                )
                .await
                {
                    Ok(Ok(p)) => p,
                    _ => return Err(Error::DeadlineExceeded { service: service() }),
                },
            };
            self.shared.retry.clone().oneshot(req).await
        };
        let resp = run.instrument(span).await?;
        if resp.status.is_success() {
            return Ok(resp);
        }
        let is_problem = resp
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with(PROBLEM_JSON) || ct.starts_with("application/json"));
        let problem = is_problem
            .then(|| serde_json::from_slice::<Problem>(&resp.body).ok())
            .flatten()
            .map(Box::new);
        Err(Error::Status {
            service: service(),
            status: resp.status,
            problem,
        })
    }
}
