//! Serving tonic services: [`GrpcServer`] runs them on a listener with health
//! (`grpc.health.v1.Health`, from `tonic-health`), the [`ContextLayer`] and graceful
//! shutdown; [`invalid_argument`], [`require`] and [`require_non_empty`] turn
//! validation failures into INVALID_ARGUMENT naming the field.
//!
//! What the [`ContextLayer`] does for every call, like the HTTP middleware:
//!
//! - reads the [`CallContext`] from the metadata — `grpc-timeout` (and
//!   `x-switchyard-deadline`, if sent; the earlier wins) is the deadline — puts it in the
//!   request extensions (`request.extensions().get::<CallContext>()`) and makes it the
//!   [current](CallContext::current) context of the handler's task, so calls the handler
//!   makes continue the trace, correlation id and deadline;
//! - opens an `rpc.server` `tracing` span with its fields;
//! - cancels the handler (drops its future) when the deadline passes and answers
//!   DEADLINE_EXCEEDED (a call whose deadline already passed is not run);
//! - answers INTERNAL if the handler panics (the connection and the other calls on it
//!   live on).

use std::any::Any;
use std::convert::Infallible;
use std::fmt::Display;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::net::TcpListener;
use tokio::task::futures::TaskLocalFuture;
use tonic::Status;
use tonic::body::Body;
use tonic::metadata::MetadataValue;
use tonic::server::NamedService;
use tonic::service::Routes;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tracing::Instrument;
use tracing::instrument::Instrumented;

use super::{FIELD_METADATA, timeout_from_headers};
use crate::context::{
    CallContext, TraceIdField, TraceParent, UntilDeadline, deadline_to_millis, until_deadline,
};

/// INVALID_ARGUMENT about request field `field` (named in the message and in the
/// [`FIELD_METADATA`] metadata, read back by [`crate::Error::field`]).
pub fn invalid_argument(field: &str, message: impl Display) -> Status {
    let mut s = Status::invalid_argument(format!("invalid field `{field}`: {message}"));
    if let Ok(v) = MetadataValue::try_from(field) {
        s.metadata_mut().insert(FIELD_METADATA, v);
    }
    s
}

/// `Ok(())` if `ok`, else [`invalid_argument`]`(field, message)`.
pub fn require(ok: bool, field: &str, message: impl Display) -> Result<(), Status> {
    if ok {
        Ok(())
    } else {
        Err(invalid_argument(field, message))
    }
}

/// `value` if it is not empty (after trimming), else INVALID_ARGUMENT naming `field`.
pub fn require_non_empty<'a>(field: &str, value: &'a str) -> Result<&'a str, Status> {
    require(!value.trim().is_empty(), field, "must not be empty")?;
    Ok(value)
}

/// The tower layer that serves every call in its [`CallContext`] (see the
/// [module docs](self)).
#[derive(Debug, Clone)]
pub struct ContextLayer {
    service: Arc<str>,
}

impl ContextLayer {
    /// The layer for service `name` (named in the spans).
    pub fn new(name: &str) -> Self {
        ContextLayer {
            service: Arc::from(name),
        }
    }
}

impl<S> tower::Layer<S> for ContextLayer {
    type Service = ContextService<S>;

    fn layer(&self, inner: S) -> ContextService<S> {
        ContextService {
            inner,
            service: self.service.clone(),
        }
    }
}

/// The service [`ContextLayer`] makes.
#[derive(Debug, Clone)]
pub struct ContextService<S> {
    inner: S,
    service: Arc<str>,
}

/// The context of an incoming call: headers plus `grpc-timeout`, a trace if none came.
pub fn context_from_request<B>(req: &http::Request<B>) -> CallContext {
    let mut ctx = CallContext::from_headers(req.headers());
    if let Some(t) = timeout_from_headers(req.headers()) {
        let mut by_timeout = CallContext::default();
        by_timeout.tighten(t);
        ctx.deadline = match (ctx.deadline, by_timeout.deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
    if ctx.traceparent.is_none() {
        ctx.traceparent = Some(TraceParent::new_root());
    }
    ctx
}

pin_project_lite::pin_project! {
    /// Awaits `fut`, turning a panic while polling it into `Err(payload)`.
    struct CatchUnwind<F> {
        #[pin]
        fut: F,
    }
}

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, Box<dyn Any + Send>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let fut = self.project().fut;
        match std::panic::catch_unwind(AssertUnwindSafe(|| fut.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Err(p) => Poll::Ready(Err(p)),
        }
    }
}

pin_project_lite::pin_project! {
    /// The handler's future in its context, under its deadline and the panic guard,
    /// its answer turned into a response.
    struct Handler<F> {
        #[pin]
        fut: UntilDeadline<CatchUnwind<TaskLocalFuture<CallContext, F>>>,
    }
}

impl<F, RB, E> Future for Handler<F>
where
    F: Future<Output = Result<http::Response<RB>, E>>,
    RB: tonic::codegen::Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<tonic::codegen::StdError>,
{
    type Output = Result<http::Response<Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Poll::Ready(res) = self.project().fut.poll(cx) else {
            return Poll::Pending;
        };
        Poll::Ready(match res {
            None => {
                tracing::warn!("deadline passed; handler cancelled");
                Ok(deadline_exceeded())
            }
            Some(Ok(Ok(resp))) => Ok(resp.map(Body::new)),
            Some(Ok(Err(e))) => Err(e),
            Some(Err(_panic)) => {
                tracing::error!("handler panicked");
                Ok(Status::internal("the handler failed").into_http())
            }
        })
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`ContextService`] (a named future: nothing is boxed).
    pub struct ContextFuture<F> {
        // Answered without running the handler (its deadline had passed).
        done: Option<http::Response<Body>>,
        #[pin]
        run: Option<Instrumented<Handler<F>>>,
    }
}

impl<F, RB, E> Future for ContextFuture<F>
where
    F: Future<Output = Result<http::Response<RB>, E>>,
    RB: tonic::codegen::Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<tonic::codegen::StdError>,
{
    type Output = Result<http::Response<Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match (this.done.take(), this.run.as_pin_mut()) {
            (Some(resp), _) => Poll::Ready(Ok(resp)),
            (None, Some(run)) => run.poll(cx),
            (None, None) => Poll::Pending,
        }
    }
}

impl<S, B, RB> tower::Service<http::Request<B>> for ContextService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    RB: tonic::codegen::Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<tonic::codegen::StdError>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = ContextFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let ctx = context_from_request(&req);
        req.extensions_mut().insert(ctx.clone());
        let span = tracing::info_span!(
            "rpc.server",
            service = %self.service,
            method = %req.uri().path(),
            trace_id = %TraceIdField(ctx.traceparent),
            correlation_id = ctx.correlation_id.as_deref().unwrap_or(""),
            idempotency_key = ctx.idempotency_key.as_deref().unwrap_or(""),
            deadline_ms = ctx.deadline.map(deadline_to_millis).unwrap_or(0),
        );
        // The deadline as a tokio instant, fixed now (before tonic's own `grpc-timeout`
        // timer, which wraps this service, so ours fires first).
        let remaining = ctx.remaining();
        let deadline = remaining.map(|r| tokio::time::Instant::now() + r);
        if remaining.is_some_and(|r| r.is_zero()) {
            span.in_scope(|| tracing::info!("deadline already passed; not running the handler"));
            return ContextFuture {
                done: Some(deadline_exceeded()),
                run: None,
            };
        }
        let fut = CatchUnwind {
            fut: ctx.scope_future(self.inner.call(req)),
        };
        ContextFuture {
            done: None,
            // The timer is armed only if the handler has to wait (see `until_deadline`).
            run: Some(
                Handler {
                    fut: until_deadline(fut, deadline),
                }
                .instrument(span),
            ),
        }
    }
}

fn deadline_exceeded() -> http::Response<Body> {
    Status::deadline_exceeded("the caller's deadline passed before the handler finished")
        .into_http()
}

/// Tonic services served with the standard layers (see the [module docs](self)).
pub struct GrpcServer {
    name: String,
    routes: Routes,
    names: Vec<&'static str>,
    health: HealthReporter,
}

impl std::fmt::Debug for GrpcServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcServer")
            .field("name", &self.name)
            .field("services", &self.names)
            .finish_non_exhaustive()
    }
}

impl GrpcServer {
    /// A server for service `name` (named in spans), with `grpc.health.v1.Health`.
    pub fn new(name: impl Into<String>) -> Self {
        let (health, health_service) = tonic_health::server::health_reporter();
        GrpcServer {
            name: name.into(),
            routes: Routes::new(health_service),
            names: Vec::new(),
            health,
        }
    }

    /// Adds a tonic service (reported SERVING by the health service while served).
    pub fn add_service<S>(mut self, svc: S) -> Self
    where
        S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.routes = self.routes.add_service(svc);
        self.names.push(S::NAME);
        self
    }

    /// The health reporter, to mark services NOT_SERVING (e.g. a lost dependency).
    pub fn health(&self) -> HealthReporter {
        self.health.clone()
    }

    /// Serves on `listener` until `shutdown` completes; then health reports
    /// NOT_SERVING, no new calls are accepted, and calls in flight finish (graceful).
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), tonic::transport::Error> {
        let health = self.health.clone();
        for n in ["", self.name.as_str()]
            .into_iter()
            .chain(self.names.iter().copied())
        {
            health.set_service_status(n, ServingStatus::Serving).await;
        }
        let names: Vec<String> = std::iter::once(String::new())
            .chain(std::iter::once(self.name.clone()))
            .chain(self.names.iter().map(|s| s.to_string()))
            .collect();
        let shutdown = async move {
            shutdown.await;
            for n in names {
                health
                    .set_service_status(n, ServingStatus::NotServing)
                    .await;
            }
        };
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        tonic::transport::Server::builder()
            .layer(ContextLayer::new(&self.name))
            .add_routes(self.routes)
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    use tower::{Layer, ServiceExt};

    use super::*;

    fn code(resp: &http::Response<Body>) -> tonic::Code {
        Status::from_header_map(resp.headers()).map_or(tonic::Code::Ok, |s| s.code())
    }

    #[tokio::test]
    async fn a_panicking_handler_answers_internal() {
        let svc = ContextLayer::new("t").layer(tower::service_fn(
            |_req: http::Request<Body>| async move {
                if std::hint::black_box(true) {
                    panic!("boom");
                }
                Ok::<_, Infallible>(http::Response::new(Body::empty()))
            },
        ));
        let resp = svc
            .oneshot(http::Request::new(Body::empty()))
            .await
            .unwrap();
        assert_eq!(code(&resp), tonic::Code::Internal);
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_cancels_a_waiting_handler() {
        let dropped = Arc::new(AtomicU32::new(0));
        struct OnDrop(Arc<AtomicU32>);
        impl Drop for OnDrop {
            fn drop(&mut self) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let d = dropped.clone();
        let svc =
            ContextLayer::new("t").layer(tower::service_fn(move |_req: http::Request<Body>| {
                let guard = OnDrop(d.clone());
                async move {
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    drop(guard);
                    Ok::<_, Infallible>(http::Response::new(Body::empty()))
                }
            }));
        let mut req = http::Request::new(Body::empty());
        req.headers_mut()
            .insert("grpc-timeout", http::HeaderValue::from_static("100m"));
        let start = tokio::time::Instant::now();
        let resp = svc.oneshot(req).await.unwrap();
        assert_eq!(code(&resp), tonic::Code::DeadlineExceeded);
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(dropped.load(Ordering::SeqCst), 1, "the handler was dropped");
    }

    #[tokio::test]
    async fn an_expired_deadline_is_not_run_and_a_quick_handler_answers() {
        let runs = Arc::new(AtomicU32::new(0));
        let r = runs.clone();
        let svc =
            ContextLayer::new("t").layer(tower::service_fn(move |req: http::Request<Body>| {
                r.fetch_add(1, Ordering::SeqCst);
                let has_ctx = req.extensions().get::<CallContext>().is_some()
                    && CallContext::current().is_none();
                async move {
                    // The context is current while the handler's future runs.
                    assert!(has_ctx && CallContext::current().is_some());
                    Ok::<_, Infallible>(http::Response::new(Body::empty()))
                }
            }));
        let mut expired = http::Request::new(Body::empty());
        expired.headers_mut().insert(
            crate::context::DEADLINE_HEADER,
            http::HeaderValue::from_static("1"),
        );
        let resp = svc.clone().oneshot(expired).await.unwrap();
        assert_eq!(code(&resp), tonic::Code::DeadlineExceeded);
        assert_eq!(runs.load(Ordering::SeqCst), 0);
        let resp = svc
            .oneshot(http::Request::new(Body::empty()))
            .await
            .unwrap();
        assert_eq!(code(&resp), tonic::Code::Ok);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }
}
