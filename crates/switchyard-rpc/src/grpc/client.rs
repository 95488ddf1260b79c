//! The gRPC client: [`GrpcClient::channel`] gives a [`GrpcChannel`] for a service name,
//! a `tower::Service` over `http::Request<tonic::body::Body>` that any tonic-generated
//! client wraps (`EchoClient::new(channel)`). Unary calls go through, outermost first:
//!
//! 1. **deadline** — the budget of [`CallOptions::timeout`], else the request's own
//!    `grpc-timeout` (`tonic::Request::set_timeout`), else
//!    [`ClientConfig::default_timeout`]; never later than the deadline of the request
//!    being handled ([`CallContext::current`]). Each attempt sends its remaining budget
//!    as `grpc-timeout`, with `traceparent`, `x-correlation-id` and `idempotency-key`.
//! 2. **bulkhead** — a semaphore per service (the wait for a slot is bounded by the
//!    deadline).
//! 3. **retry** — `tower::retry::Retry`, the same backoff, jitter and budget as HTTP,
//!    only for calls marked idempotent ([`CallOptions::idempotent`], or a method listed
//!    with [`GrpcClient::idempotent_methods`]) or carrying an idempotency key, on
//!    UNAVAILABLE, RESOURCE_EXHAUSTED and attempt timeouts (not on a DEADLINE_EXCEEDED
//!    answered by the callee: the call's own deadline has passed then).
//! 4. **balance + breaker** — the same per-service pool as HTTP (`crate::pool`):
//!    breaker per instance, power of two choices, ejection. An instance's outcome is a
//!    failure for UNAVAILABLE, INTERNAL, UNKNOWN, DATA_LOSS, transport errors and
//!    attempt timeouts.
//!
//! The request message of a call that may be retried is buffered (once) so retries can
//! resend it; any other call's body is sent as it comes, unbuffered. The outcome is read
//! from the response *headers* — tonic answers a handler's error "trailers-only", with
//! `grpc-status` in the headers. A status sent in trailers after a response body
//! counts as a success for the breaker. Streaming calls pass through the same path, but
//! the request stream of a retryable call is collected before sending: use this channel
//! for unary calls.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http::uri::PathAndQuery;
use http_body_util::BodyExt;
use hyper::body::{Frame, SizeHint};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tonic::body::Body;
use tonic::{Code, Status};
use tower::ServiceExt;
use tower::retry::Retry;
use tracing::Instrument;

use super::{
    GRPC_TIMEOUT_NAME, LOCAL_ERROR_METADATA, header_status, timeout_from_headers, timeout_value,
};

use crate::balance::FnvBuild;
use crate::breaker::BreakerState;
use crate::client::{CallOptions, ClientConfig};
use crate::conn::{ConnectError, Http2Body, send_body};
use crate::context::{CallContext, IDEMPOTENCY_NAME, TraceIdField};
use crate::error::Error;
use crate::pool::Pool;
use crate::registry::Registry;
use crate::retry::Retrier;

/// Per-call options on a tonic request (they travel in its extensions).
pub trait GrpcRequestExt: Sized {
    /// Attaches `opts` (timeout, idempotency key, `idempotent`, context) to the call.
    fn with_options(self, opts: CallOptions) -> Self;
}

impl<T> GrpcRequestExt for tonic::Request<T> {
    fn with_options(mut self, opts: CallOptions) -> Self {
        self.extensions_mut().insert(opts);
        self
    }
}

fn local_status(code: Code, message: String, marker: &'static str) -> Status {
    let mut s = Status::new(code, message);
    s.metadata_mut().insert(
        LOCAL_ERROR_METADATA,
        tonic::metadata::MetadataValue::from_static(marker),
    );
    s
}

fn error_status(e: &Error) -> Status {
    match e {
        Error::CircuitOpen { .. } => local_status(Code::Unavailable, e.to_string(), "circuit-open"),
        Error::NoInstances { .. } => local_status(Code::Unavailable, e.to_string(), "no-instances"),
        _ => Status::unknown(e.to_string()),
    }
}

/// One request as the layers see it (cheap to clone for retries: the pieces are
/// shared).
pub struct GrpcCall {
    inner: Arc<CallParts>,
    /// The request body of a call that is not retried, sent as it comes (`None`: the
    /// buffered `CallParts::body` is sent).
    stream: Option<Body>,
}

impl Clone for GrpcCall {
    /// Only retryable calls are cloned (for a retry), and their body is buffered.
    fn clone(&self) -> Self {
        GrpcCall {
            inner: self.inner.clone(),
            stream: None,
        }
    }
}

struct CallParts {
    uri: http::Uri,
    headers: HeaderMap,
    body: Bytes,
    deadline: Instant,
    retryable: bool,
}

struct Core {
    pool: Arc<Pool>,
    cfg: ClientConfig,
}

/// The `user-agent` of calls that do not set their own.
const USER_AGENT: &str = concat!("switchyard-rpc/", env!("CARGO_PKG_VERSION"));

/// Why an attempt got no response.
enum SendError {
    /// No connection could be made, or it would not take the call's stream: nothing
    /// was sent.
    Connect(ConnectError),
    /// The connection or the stream failed while the call was on it.
    Transport(h2::Error),
}

/// The outcome class of a status: (a failure of the instance, retryable).
fn classify(code: Code, local_attempt_timeout: bool) -> (bool, bool) {
    match code {
        Code::Unavailable => (true, true),
        Code::ResourceExhausted => (false, true),
        Code::DeadlineExceeded => (local_attempt_timeout, local_attempt_timeout),
        Code::Internal | Code::Unknown | Code::DataLoss => (true, false),
        _ => (false, false),
    }
}

fn is_attempt_timeout(s: &Status) -> bool {
    s.metadata()
        .get(LOCAL_ERROR_METADATA)
        .is_some_and(|v| v.as_bytes() == b"attempt-timeout")
}

/// Failures of the client's own pool (every breaker open, no instance): nothing was
/// sent, and retrying right away would fail the same way (as with HTTP).
fn is_local_fail_fast(s: &Status) -> bool {
    s.metadata()
        .get(LOCAL_ERROR_METADATA)
        .is_some_and(|v| v.as_bytes() == b"circuit-open" || v.as_bytes() == b"no-instances")
}

/// The buffered request message of a call that may be retried, sent as one DATA frame.
///
/// Unlike `http_body_util::Full` it does not report its exact length: hyper adds a
/// `content-length` header to a request whose body does, and gRPC has no use for one
/// (messages carry their own length prefix; tonic's own request bodies never send it).
/// Such a header is a literal in HPACK on every call (h2 never indexes its value), is
/// decoded into a new value on the server and made the request's header map outgrow its
/// first allocation on both ends.
struct BufferedBody(Option<Bytes>);

impl hyper::body::Body for BufferedBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let data = self.get_mut().0.take().filter(|d| !d.is_empty());
        Poll::Ready(data.map(|d| Ok(Frame::data(d))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.as_ref().is_none_or(Bytes::is_empty)
    }

    fn size_hint(&self) -> SizeHint {
        // Not exact on purpose (see above): at least what is left.
        let mut hint = SizeHint::new();
        hint.set_lower(self.0.as_ref().map_or(0, |d| d.len() as u64));
        hint
    }
}

/// The innermost service: one attempt on one instance.
#[derive(Clone)]
struct Attempt {
    core: Arc<Core>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl tower::Service<GrpcCall> for Attempt {
    type Response = http::Response<Body>;
    type Error = Status;
    type Future = BoxFuture<Result<http::Response<Body>, Status>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: GrpcCall) -> Self::Future {
        let core = self.core.clone();
        Box::pin(async move { attempt(&core, req).await })
    }
}

async fn attempt(core: &Core, call: GrpcCall) -> Result<http::Response<Body>, Status> {
    let now = Instant::now();
    let deadline = call.inner.deadline;
    if now >= deadline {
        return Err(local_status(
            Code::DeadlineExceeded,
            format!("deadline exceeded calling `{}`", core.pool.name()),
            "deadline",
        ));
    }
    let lease = core.pool.pick().map_err(|e| error_status(&e))?;
    let target = lease.target().clone();
    let cannot_connect = |e: &dyn std::fmt::Display| {
        local_status(
            Code::Unavailable,
            format!(
                "cannot connect to `{}` at {}: {e}",
                core.pool.name(),
                lease.instance()
            ),
            "connect",
        )
    };
    let origin = match target.origin() {
        Ok(o) => o,
        Err(e) => {
            let s = cannot_connect(&e);
            lease.finish(false);
            return Err(s);
        }
    };
    let attempt_deadline = match core.cfg.attempt_timeout {
        Some(t) => deadline.min(now + t),
        None => deadline,
    };
    // A call kept for no retry is ours alone: its pieces move instead of being copied.
    let (uri, mut headers, body) = match Arc::try_unwrap(call.inner) {
        Ok(p) => (p.uri, p.headers, p.body),
        Err(shared) => (
            shared.uri.clone(),
            shared.headers.clone(),
            shared.body.clone(),
        ),
    };
    headers.insert(
        GRPC_TIMEOUT_NAME,
        timeout_value(attempt_deadline.saturating_duration_since(now)),
    );
    let body = match call.stream {
        Some(stream) => stream,
        None => Body::new(BufferedBody(Some(body))),
    };
    let path = uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let mut request = http::Request::new(body);
    *request.uri_mut() = origin
        .uri(path)
        .map_err(|e| Status::invalid_argument(format!("request path: {e}")))?;
    *request.headers_mut() = headers;
    let conn = &target.connections().http2;
    let send = async {
        let (head, body) = request.into_parts();
        let mut sender = conn
            .ready_sender(origin)
            .await
            .map_err(SendError::Connect)?;
        let eos = hyper::body::Body::is_end_stream(&body);
        let (response, stream) = sender
            .send_request(http::Request::from_parts(head, ()), eos)
            .map_err(|e| SendError::Connect(ConnectError::Refused(e)))?;
        if !eos {
            send_body(body, stream).await;
        }
        let response = response.await.map_err(SendError::Transport)?;
        Ok(response.map(|recv| Body::new(Http2Body::new(recv))))
    };
    let out = match tokio::time::timeout_at(attempt_deadline, send).await {
        Ok(Ok(resp)) => Ok(resp),
        Ok(Err(_)) | Err(_) if Instant::now() >= attempt_deadline => {
            Err(if attempt_deadline >= deadline {
                local_status(
                    Code::DeadlineExceeded,
                    format!("deadline exceeded calling `{}`", core.pool.name()),
                    "deadline",
                )
            } else {
                local_status(
                    Code::DeadlineExceeded,
                    format!(
                        "attempt to `{}` at {} timed out",
                        core.pool.name(),
                        lease.instance()
                    ),
                    "attempt-timeout",
                )
            })
        }
        Ok(Err(SendError::Connect(e))) => Err(cannot_connect(&e)),
        Ok(Err(SendError::Transport(e))) => {
            // The connection failed (no status from the callee). Marked: the request
            // may have reached the callee before it did (`Error::outcome_unknown`). A
            // stream reset keeps its gRPC meaning (CANCEL: CANCELLED, …).
            let code = match e.reason() {
                Some(h2::Reason::CANCEL) => Code::Cancelled,
                Some(h2::Reason::ENHANCE_YOUR_CALM) => Code::ResourceExhausted,
                _ => Code::Unavailable,
            };
            Err(local_status(
                code,
                format!(
                    "transport error calling `{}` at {}: {e}",
                    core.pool.name(),
                    lease.instance(),
                ),
                "transport",
            ))
        }
        Err(_) => Err(Status::deadline_exceeded("attempt timed out")),
    };
    let failed = match &out {
        Ok(resp) => header_status(resp.headers()).is_some_and(|s| classify(s.code(), false).0),
        Err(s) => classify(s.code(), is_attempt_timeout(s)).0,
    };
    lease.finish(!failed);
    out
}

/// The retry policy of gRPC calls (see the [module docs](self)).
#[derive(Clone)]
pub struct GrpcRetryPolicy {
    retrier: Retrier,
}

impl tower::retry::Policy<GrpcCall, http::Response<Body>, Status> for GrpcRetryPolicy {
    type Future = tokio::time::Sleep;

    fn retry(
        &mut self,
        req: &mut GrpcCall,
        result: &mut Result<http::Response<Body>, Status>,
    ) -> Option<Self::Future> {
        let retryable_outcome = match result {
            Ok(resp) => header_status(resp.headers()).is_some_and(|s| classify(s.code(), false).1),
            Err(s) => !is_local_fail_fast(s) && classify(s.code(), is_attempt_timeout(s)).1,
        };
        self.retrier
            .next(
                retryable_outcome.then_some(Duration::ZERO),
                req.inner.retryable,
                req.inner.deadline,
            )
            .map(tokio::time::sleep)
    }

    /// A call that may not be retried is not kept for a retry (its budget deposit is
    /// made when it starts).
    fn clone_request(&mut self, req: &GrpcCall) -> Option<GrpcCall> {
        req.inner.retryable.then(|| req.clone())
    }
}

struct Shared {
    core: Arc<Core>,
    /// The retry layer over one attempt (cloned per call: a few reference counts).
    retry: Retry<GrpcRetryPolicy, Attempt>,
    /// The bulkhead: one permit per call in flight, held across its retries.
    bulkhead: Arc<Semaphore>,
    /// The per-service retry state (for the budget deposit of non-retryable calls).
    retrier: Retrier,
    idempotent: Arc<HashSet<String, FnvBuild>>,
}

struct ClientInner {
    registry: Arc<dyn Registry>,
    cfg: ClientConfig,
    idempotent: Arc<HashSet<String, FnvBuild>>,
    services: Mutex<HashMap<String, GrpcChannel>>,
}

/// A gRPC client for calling services by name. Cheap to clone; clones share
/// connections (one HTTP/2 connection per instance), breakers and balancer state.
#[derive(Clone)]
pub struct GrpcClient {
    inner: Arc<ClientInner>,
}

impl std::fmt::Debug for GrpcClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcClient")
            .field("cfg", &self.inner.cfg)
            .finish_non_exhaustive()
    }
}

impl GrpcClient {
    /// A client over `registry` with default settings.
    pub fn new(registry: impl Registry) -> Self {
        Self::with_config(Arc::new(registry), ClientConfig::default())
    }

    /// A client over `registry` with `cfg` (the same settings as the HTTP client).
    pub fn with_config(registry: Arc<dyn Registry>, cfg: ClientConfig) -> Self {
        GrpcClient {
            inner: Arc::new(ClientInner {
                registry,
                cfg,
                idempotent: Arc::new(HashSet::default()),
                services: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Declares methods safe to repeat (retried without an idempotency key), by path:
    /// `/package.Service/Method`. Applies to channels made after this call.
    pub fn idempotent_methods<I, S>(self, methods: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut set = (*self.inner.idempotent).clone();
        set.extend(methods.into_iter().map(Into::into));
        GrpcClient {
            inner: Arc::new(ClientInner {
                registry: self.inner.registry.clone(),
                cfg: self.inner.cfg.clone(),
                idempotent: Arc::new(set),
                services: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The channel of service `name` (created on first use, then shared).
    pub fn channel(&self, name: &str) -> GrpcChannel {
        let mut services = self
            .inner
            .services
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        services
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
                let policy = GrpcRetryPolicy {
                    retrier: retrier.clone(),
                };
                GrpcChannel {
                    shared: Arc::new(Shared {
                        retry: Retry::new(policy, Attempt { core: core.clone() }),
                        bulkhead: Arc::new(Semaphore::new(cfg.max_concurrency.max(1))),
                        retrier,
                        core,
                        idempotent: self.inner.idempotent.clone(),
                    }),
                }
            })
            .clone()
    }
}

/// Every instance of one service behind the layers, as a tower service for tonic
/// clients. Cheap to clone. Its errors are always answered as gRPC statuses, so the
/// error type is [`Infallible`].
#[derive(Clone)]
pub struct GrpcChannel {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for GrpcChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcChannel")
            .field("service", &self.shared.core.pool.name())
            .finish()
    }
}

impl GrpcChannel {
    /// The service's name.
    pub fn name(&self) -> &str {
        self.shared.core.pool.name()
    }

    /// The breaker state of each instance called so far.
    pub fn breaker_states(&self) -> Vec<(String, BreakerState)> {
        self.shared.core.pool.breaker_states()
    }

    /// The typed error of a status answered on this channel.
    pub fn error(&self, status: Status) -> Error {
        Error::from_grpc(self.name(), status)
    }
}

fn status_response(s: Status) -> http::Response<Body> {
    s.into_http()
}

impl tower::Service<http::Request<Body>> for GrpcChannel {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let shared = self.shared.clone();
        let (mut parts, body) = req.into_parts();
        let opts = parts.extensions.remove::<CallOptions>().unwrap_or_default();
        let mut ctx = match &opts.context {
            Some(c) => c.downstream(),
            None => CallContext::current_downstream()
                .unwrap_or_else(|| CallContext::default().downstream()),
        };
        ctx.idempotency_key = opts.idempotency_key.clone().or_else(|| {
            parts
                .headers
                .get(&IDEMPOTENCY_NAME)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        });
        let budget = opts
            .timeout
            .or_else(|| timeout_from_headers(&parts.headers))
            .unwrap_or(shared.core.cfg.default_timeout);
        ctx.tighten(budget);
        let remaining = ctx.remaining().unwrap_or_default();
        let deadline = Instant::now() + remaining;
        let retryable = opts.idempotent
            || ctx.idempotency_key.is_some()
            || shared.idempotent.contains(parts.uri.path());
        // Room for the context headers and each attempt's `grpc-timeout`, so that
        // neither these inserts nor the per-attempt copy make the map grow.
        parts.headers.reserve(5);
        ctx.write_trace_headers(&mut parts.headers);
        if !parts.headers.contains_key(http::header::USER_AGENT) {
            parts.headers.insert(
                http::header::USER_AGENT,
                http::HeaderValue::from_static(USER_AGENT),
            );
        }
        let span = tracing::info_span!(
            "rpc.client",
            service = %shared.core.pool.name(),
            method = %parts.uri.path(),
            trace_id = %TraceIdField(ctx.traceparent),
            correlation_id = ctx.correlation_id.as_deref().unwrap_or(""),
            idempotency_key = ctx.idempotency_key.as_deref().unwrap_or(""),
        );
        Box::pin(
            async move {
                let name = shared.core.pool.name();
                let deadline_status = || {
                    local_status(
                        Code::DeadlineExceeded,
                        format!("deadline exceeded calling `{name}`"),
                        "deadline",
                    )
                };
                if remaining.is_zero() {
                    return Ok(status_response(deadline_status()));
                }
                // Buffered once if a retry may resend it (a unary request's body is ready
                // at once: no timer is armed then); else sent as it comes.
                let (body, stream) = if retryable {
                    match tokio::time::timeout_at(deadline, body.collect()).await {
                        Ok(Ok(c)) => (c.to_bytes(), None),
                        Ok(Err(s)) => return Ok(status_response(s)),
                        Err(_) => return Ok(status_response(deadline_status())),
                    }
                } else {
                    (Bytes::new(), Some(body))
                };
                let call = GrpcCall {
                    inner: Arc::new(CallParts {
                        uri: parts.uri,
                        headers: parts.headers,
                        body,
                        deadline,
                        retryable,
                    }),
                    stream,
                };
                if !retryable {
                    shared.retrier.deposit();
                }
                // The deadline bounds the wait for a bulkhead slot; then every attempt
                // is bounded by it (and a retry that would end past it is not made).
                let _permit = match shared.bulkhead.clone().try_acquire_owned() {
                    Ok(p) => p,
                    Err(_) => match tokio::time::timeout_at(
                        deadline,
                        shared.bulkhead.clone().acquire_owned(),
                    )
                    .await
                    {
                        Ok(Ok(p)) => p,
                        _ => return Ok(status_response(deadline_status())),
                    },
                };
                Ok(match shared.retry.clone().oneshot(call).await {
                    Ok(resp) => resp,
                    Err(s) => status_response(s),
                })
            }
            .instrument(span),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::body::Body as _;

    #[tokio::test]
    async fn buffered_body_sends_its_bytes_once_without_an_exact_length() {
        let body = BufferedBody(Some(Bytes::from_static(b"\0\0\0\0\x05hello")));
        assert!(!body.is_end_stream());
        // An exact length would make hyper send `content-length`.
        assert_eq!(body.size_hint().exact(), None);
        assert_eq!(body.size_hint().lower(), 10);
        let collected = body.collect().await.map(|c| c.to_bytes());
        assert_eq!(collected.ok().as_deref(), Some(&b"\0\0\0\0\x05hello"[..]));
    }

    #[tokio::test]
    async fn empty_buffered_body_ends_at_once() {
        let mut body = BufferedBody(Some(Bytes::new()));
        assert!(body.is_end_stream());
        assert!(body.frame().await.is_none());
        assert!(body.is_end_stream());
    }
}
