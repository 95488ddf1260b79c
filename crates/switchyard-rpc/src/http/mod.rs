//! Serving a service over HTTP: [`router`] adds the standard endpoints and layers to an
//! axum app, [`serve`] runs it with graceful shutdown.
//!
//! What [`router`] adds:
//!
//! - `GET /healthz` (liveness: 200 while the process serves) and `GET /readyz`
//!   (readiness: 200 when [`Health::set_ready`] was given `true`, else 503 problem+json);
//! - the call context middleware: [`CallContext`] in the request extensions (also an
//!   extractor), a `rpc.server` `tracing` span with its fields, the context made current
//!   for the handler's task (so outgoing calls continue it), and the **deadline**: a
//!   handler still running when the caller's propagated deadline passes is cancelled
//!   (its future dropped) and the answer is 504 problem+json;
//! - a request body limit answered with 413 problem+json (a declared `content-length`
//!   over it at once, before the body is read; a body without one when it gets there),
//!   and problem+json for unknown routes (404) and wrong methods (405).
//!
//! Handler errors are [`Problem`]s; JSON bodies go through [`Json`].

mod json;

pub(crate) use json::too_large as json_too_large;
pub use json::{Json, parse_body};

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Request};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::request::Parts;
use http::{StatusCode, header};
use tokio::net::TcpListener;
use tokio::task::futures::TaskLocalFuture;
use tracing::Instrument;
use tracing::instrument::Instrumented;

use crate::context::{
    CallContext, TraceIdField, TraceParent, UntilDeadline, deadline_to_millis, until_deadline,
};
use crate::problem::{PROBLEM_JSON, Problem, types};

/// The readiness flag of a service (liveness needs none: answering is being alive).
#[derive(Debug, Clone, Default)]
pub struct Health {
    ready: Arc<AtomicBool>,
}

impl Health {
    /// A flag that starts not ready.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets readiness (e.g. true once dependencies are reachable, false while draining).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// The current readiness.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }
}

/// Settings of [`router`].
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// The service's name (in spans).
    pub service: String,
    /// The largest accepted request body, in bytes (default 1 MiB).
    pub body_limit: usize,
    /// The readiness flag served at `/readyz`.
    pub health: Health,
}

impl ServerOptions {
    /// Options for service `name` with defaults.
    pub fn new(name: impl Into<String>) -> Self {
        ServerOptions {
            service: name.into(),
            body_limit: 1024 * 1024,
            health: Health::new(),
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for CallContext {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<CallContext>()
            .cloned()
            .unwrap_or_else(|| CallContext::from_headers(&parts.headers)))
    }
}

fn deadline_exceeded() -> Response {
    Problem::new(
        types::DEADLINE_EXCEEDED,
        StatusCode::GATEWAY_TIMEOUT,
        "Deadline exceeded",
    )
    .with_detail("the caller's deadline passed before the handler finished")
    .into_response()
}

/// The layer [`router`] wraps the app in: the call context and deadline middleware and
/// the problem+json rewrite of the framework's plain-text 413/405 answers, in one
/// service (one named future per request, not boxed).
#[derive(Debug, Clone)]
struct ServerLayer {
    service: Arc<str>,
    body_limit: usize,
}

impl<S> tower::Layer<S> for ServerLayer {
    type Service = ServerService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ServerService {
            inner,
            service: self.service.clone(),
            body_limit: self.body_limit,
        }
    }
}

/// The service of [`ServerLayer`].
#[derive(Debug, Clone)]
struct ServerService<S> {
    inner: S,
    service: Arc<str>,
    body_limit: usize,
}

pin_project_lite::pin_project! {
    /// The response future of [`ServerService`]: a named future, not a boxed one.
    #[project = ServerFutureProj]
    enum ServerFuture<F> {
        /// Answered without running the handler (its deadline had passed).
        Done { response: Option<Response> },
        /// The handler, in its span, current context and deadline.
        Run {
            #[pin]
            run: Instrumented<Handler<F>>,
        },
    }
}

pin_project_lite::pin_project! {
    /// The handler's future with the context current and the deadline applied, and its
    /// answer turned into a response.
    struct Handler<F> {
        #[pin]
        fut: UntilDeadline<TaskLocalFuture<CallContext, F>>,
    }
}

impl<F, R> Future for Handler<F>
where
    F: Future<Output = Result<R, Infallible>>,
    R: IntoResponse,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Poll::Ready(res) = self.project().fut.poll(cx) else {
            return Poll::Pending;
        };
        Poll::Ready(Ok(match res {
            None => {
                tracing::warn!("deadline passed; handler cancelled");
                deadline_exceeded()
            }
            Some(Ok(r)) => problem_errors(r.into_response()),
            Some(Err(never)) => match never {},
        }))
    }
}

impl<F, R> Future for ServerFuture<F>
where
    F: Future<Output = Result<R, Infallible>>,
    R: IntoResponse,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            ServerFutureProj::Done { response } => match response.take() {
                Some(r) => Poll::Ready(Ok(r)),
                None => Poll::Pending,
            },
            ServerFutureProj::Run { run } => run.poll(cx),
        }
    }
}

impl<S> tower::Service<Request> for ServerService<S>
where
    S: tower::Service<Request, Error = Infallible>,
    S::Response: IntoResponse,
{
    type Response = Response;
    type Error = Infallible;
    type Future = ServerFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request) -> Self::Future {
        let mut ctx = CallContext::from_headers(req.headers());
        if ctx.traceparent.is_none() {
            ctx.traceparent = Some(TraceParent::new_root());
        }
        let span = tracing::info_span!(
            "rpc.server",
            service = %self.service,
            method = %req.method(),
            path = %req.uri().path(),
            trace_id = %TraceIdField(ctx.traceparent),
            correlation_id = ctx.correlation_id.as_deref().unwrap_or(""),
            idempotency_key = ctx.idempotency_key.as_deref().unwrap_or(""),
            deadline_ms = ctx.deadline.map(deadline_to_millis).unwrap_or(0),
        );
        let remaining = ctx.remaining();
        if remaining.is_some_and(|r| r.is_zero()) {
            span.in_scope(|| tracing::info!("deadline already passed; not running the handler"));
            return ServerFuture::Done {
                response: Some(deadline_exceeded()),
            };
        }
        // The body limit. A declared length is checked here (hyper delivers no more
        // than it declares); only a body without one is counted as it is read.
        match body_length(&req) {
            BodyLength::Declared(n) if n > self.body_limit as u64 => {
                span.in_scope(|| tracing::info!(length = n, "request body over the limit"));
                return ServerFuture::Done {
                    response: Some(json::too_large().into_response()),
                };
            }
            BodyLength::Declared(_) | BodyLength::Empty => {}
            BodyLength::Unknown => {
                let limit = self.body_limit;
                req = req.map(|body| Body::new(http_body_util::Limited::new(body, limit)));
            }
        }
        // Fixed now; the timer itself is armed only if the handler has to wait.
        let deadline = remaining.map(|r| tokio::time::Instant::now() + r);
        req.extensions_mut().insert(ctx.clone());
        let fut = ctx.scope_future(self.inner.call(req));
        ServerFuture::Run {
            run: Handler {
                fut: until_deadline(fut, deadline),
            }
            .instrument(span),
        }
    }
}

/// What a request says of its body's length.
enum BodyLength {
    /// `content-length` (a malformed one never gets past hyper).
    Declared(u64),
    /// No body at all.
    Empty,
    /// Chunked, or HTTP/2 without `content-length`.
    Unknown,
}

fn body_length(req: &Request) -> BodyLength {
    if let Some(n) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse().ok())
    {
        return BodyLength::Declared(n);
    }
    if hyper::body::Body::is_end_stream(req.body()) {
        BodyLength::Empty
    } else {
        BodyLength::Unknown
    }
}

/// Rewrites the plain-text 413/405 answers of the layers below into problem+json.
fn problem_errors(res: Response) -> Response {
    match res.status() {
        StatusCode::PAYLOAD_TOO_LARGE | StatusCode::METHOD_NOT_ALLOWED => {}
        _ => return res,
    }
    let is_problem = res
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(PROBLEM_JSON.as_bytes()));
    if is_problem {
        return res;
    }
    match res.status() {
        StatusCode::PAYLOAD_TOO_LARGE => json::too_large().into_response(),
        _ => Problem::new(
            "https://switchyard.dev/problems/method-not-allowed",
            StatusCode::METHOD_NOT_ALLOWED,
            "Method not allowed",
        )
        .into_response(),
    }
}

async fn not_found() -> Problem {
    Problem::new(types::NOT_FOUND, StatusCode::NOT_FOUND, "No such route")
}

/// `app` with `/healthz`, `/readyz`, the context/deadline middleware, the body limit and
/// problem+json for framework errors (see the [module docs](self)).
pub fn router(app: Router, opts: &ServerOptions) -> Router {
    let health = opts.health.clone();
    let service: Arc<str> = Arc::from(opts.service.as_str());
    app.route(
        "/healthz",
        get(|| async { Json(serde_json::json!({"status": "ok"})) }),
    )
    .route(
        "/readyz",
        get(move || {
            let ready = health.is_ready();
            async move {
                if ready {
                    Json(serde_json::json!({"status": "ready"})).into_response()
                } else {
                    Problem::new(
                        types::NOT_READY,
                        StatusCode::SERVICE_UNAVAILABLE,
                        "Not ready",
                    )
                    .into_response()
                }
            }
        }),
    )
    .fallback(not_found)
    // One stack, applied once: `Router::layer` wraps every route in a boxed, cloned-per-
    // request service for each call, so three separate layers would cost three of those.
    .layer(
        tower::ServiceBuilder::new()
            .layer(ServerLayer {
                service,
                body_limit: opts.body_limit,
            })
            .layer(DefaultBodyLimit::disable()),
    )
}

/// Serves `app` on `listener` until `shutdown` completes, then stops accepting and waits
/// for in-flight requests to finish (graceful).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
