//! Fault injection shared by every service: added latency, an error rate, and "down
//! for N ms", switched at run time so the lab and `shop fault` can show how each
//! pattern copes.
//!
//! One [`Faults`] handle per service instance. It acts on the service's own routes
//! through [`middleware`] (REST, an axum middleware) or [`FaultLayer`] (gRPC, a tower
//! layer); health, readiness and the admin routes are never affected, so a "down"
//! service can still be told to come back. The admin routes ([`admin_routes`]):
//!
//! | request | effect |
//! | --- | --- |
//! | `POST /admin/fault` `{"latency_ms":200,"error_rate":0.5,"down_ms":3000}` (every field optional, default 0) | replaces the settings |
//! | `DELETE /admin/fault` | clears them |
//! | `GET /admin/fault` | the settings and the down time left |
//!
//! The same settings apply to the service's event handlers and responders through
//! [`Faults::gate`] (set as each service router's gate).
//!
//! Per call, in order: while down, answer unavailable at once (no latency); else wait
//! `latency_ms`; then fail with probability `error_rate`. Unavailable is HTTP 503
//! problem+json (type [`UNAVAILABLE`]) or gRPC `UNAVAILABLE`, so callers see exactly
//! what a real outage looks like and their retries, breakers and compensations kick in.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::StatusCode;
use serde::{Deserialize, Serialize};
use switchyard_rpc::Problem;
use switchyard_rpc::http::Json;
use tokio::time::Instant;

/// The problem `type` of an injected failure.
pub const UNAVAILABLE: &str = "https://switchyard.dev/problems/unavailable";

/// The largest latency that may be injected (one minute).
pub const MAX_LATENCY_MS: u64 = 60_000;

/// The longest a service may be taken down at once (one hour).
pub const MAX_DOWN_MS: u64 = 3_600_000;

/// The settings of `POST /admin/fault`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultConfig {
    /// Added to every call, in milliseconds (at most [`MAX_LATENCY_MS`]).
    #[serde(default)]
    pub latency_ms: u64,
    /// The fraction of calls that fail, 0.0 to 1.0.
    #[serde(default)]
    pub error_rate: f64,
    /// Every call fails for this long from now, in milliseconds (at most [`MAX_DOWN_MS`]).
    #[serde(default)]
    pub down_ms: u64,
}

impl FaultConfig {
    /// Checks the ranges; `Err` names the field.
    pub fn validate(&self) -> Result<(), Problem> {
        if self.latency_ms > MAX_LATENCY_MS {
            return Err(Problem::validation(
                "latency_ms",
                format!("must be at most {MAX_LATENCY_MS}"),
            ));
        }
        if !(0.0..=1.0).contains(&self.error_rate) {
            return Err(Problem::validation(
                "error_rate",
                "must be between 0.0 and 1.0",
            ));
        }
        if self.down_ms > MAX_DOWN_MS {
            return Err(Problem::validation(
                "down_ms",
                format!("must be at most {MAX_DOWN_MS}"),
            ));
        }
        Ok(())
    }
}

/// What `GET /admin/fault` answers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct FaultStatus {
    /// Added latency, ms.
    pub latency_ms: u64,
    /// Error rate.
    pub error_rate: f64,
    /// Down time left, ms (0: up).
    pub down_remaining_ms: u64,
}

#[derive(Debug, Default)]
struct State_ {
    latency: Duration,
    error_rate: f64,
    down_until: Option<Instant>,
}

/// Why an injected fault failed a call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Injected {
    /// The service is "down" for this much longer.
    #[error("injected fault: service down for another {0:?}")]
    Down(Duration),
    /// The call drew an error (error rate).
    #[error("injected fault: error rate {0}")]
    Error(String),
}

/// A service instance's fault settings. Cheap to clone; clones share the settings.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    state: Arc<Mutex<State_>>,
}

impl Faults {
    /// No faults.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State_> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Replaces the settings (validate first: out-of-range values are clamped).
    pub fn set(&self, cfg: FaultConfig) {
        let mut s = self.lock();
        s.latency = Duration::from_millis(cfg.latency_ms.min(MAX_LATENCY_MS));
        s.error_rate = if cfg.error_rate.is_nan() {
            0.0
        } else {
            cfg.error_rate.clamp(0.0, 1.0)
        };
        s.down_until = (cfg.down_ms > 0)
            .then(|| Instant::now() + Duration::from_millis(cfg.down_ms.min(MAX_DOWN_MS)));
    }

    /// Clears every fault.
    pub fn clear(&self) {
        *self.lock() = State_::default();
    }

    /// The current settings.
    pub fn status(&self) -> FaultStatus {
        let s = self.lock();
        FaultStatus {
            latency_ms: s.latency.as_millis() as u64,
            error_rate: s.error_rate,
            down_remaining_ms: s
                .down_until
                .map(|d| d.saturating_duration_since(Instant::now()).as_millis() as u64)
                .unwrap_or(0),
        }
    }

    /// Applies the faults to one call: `Err` if it must fail; waits the latency first.
    pub async fn apply(&self) -> Result<(), Injected> {
        let (latency, rate, down) = {
            let s = self.lock();
            (s.latency, s.error_rate, s.down_until)
        };
        if let Some(until) = down {
            let left = until.saturating_duration_since(Instant::now());
            if !left.is_zero() {
                return Err(Injected::Down(left));
            }
        }
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        if rate > 0.0 && fastrand::f64() < rate {
            return Err(Injected::Error(format!("{rate}")));
        }
        Ok(())
    }
}

impl Faults {
    /// The same faults for the service's event handlers and responders (a router's
    /// gate): while down, its messages wait on the bus (deferred until it is up again,
    /// as they would for a stopped process) and its responders do not answer; latency is
    /// added before each handler; the error rate fails attempts (retried with backoff).
    pub async fn gate(&self) -> switchyard::router::GateDecision {
        use switchyard::router::{GateDecision, HandlerError};
        match self.apply().await {
            Ok(()) => GateDecision::Pass,
            Err(Injected::Down(left)) => GateDecision::Defer {
                // Come back right after the outage (not before: that would only use up
                // attempts).
                delay: left + Duration::from_millis(50),
                reason: Injected::Down(left).to_string(),
            },
            Err(e @ Injected::Error(_)) => {
                GateDecision::Fail(HandlerError::Retryable(e.to_string()))
            }
        }
    }
}

fn unavailable(why: &Injected) -> Response {
    Problem::new(UNAVAILABLE, StatusCode::SERVICE_UNAVAILABLE, "Unavailable")
        .with_detail(why.to_string())
        .into_response()
}

/// The REST middleware (`axum::middleware::from_fn_with_state(faults, faults::middleware)`),
/// for a service's own routes.
pub async fn middleware(State(faults): State<Faults>, req: Request, next: Next) -> Response {
    match faults.apply().await {
        Ok(()) => next.run(req).await,
        Err(why) => unavailable(&why),
    }
}

async fn get_fault(State(f): State<Faults>) -> Json<FaultStatus> {
    Json(f.status())
}

async fn set_fault(
    State(f): State<Faults>,
    Json(cfg): Json<FaultConfig>,
) -> Result<Json<FaultStatus>, Problem> {
    cfg.validate()?;
    f.set(cfg);
    tracing::info!(?cfg, "fault settings changed");
    Ok(Json(f.status()))
}

async fn clear_fault(State(f): State<Faults>) -> Json<FaultStatus> {
    f.clear();
    tracing::info!("faults cleared");
    Json(f.status())
}

/// `GET|POST|DELETE /admin/fault` for `faults` (see the [module docs](self)).
pub fn admin_routes(faults: Faults) -> axum::Router {
    axum::Router::new()
        .route(
            "/admin/fault",
            get(get_fault).post(set_fault).delete(clear_fault),
        )
        .with_state(faults)
}

/// The gRPC form: a tower layer failing calls with `UNAVAILABLE` per the [`Faults`].
#[derive(Debug, Clone)]
pub struct FaultLayer {
    faults: Faults,
}

impl FaultLayer {
    /// The layer for `faults`.
    pub fn new(faults: Faults) -> Self {
        FaultLayer { faults }
    }
}

impl<S> tower::Layer<S> for FaultLayer {
    type Service = FaultService<S>;

    fn layer(&self, inner: S) -> FaultService<S> {
        FaultService {
            inner,
            faults: self.faults.clone(),
        }
    }
}

/// The service [`FaultLayer`] makes; keeps the inner service's gRPC name.
#[derive(Debug, Clone)]
pub struct FaultService<S> {
    inner: S,
    faults: Faults,
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for FaultService<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tower::Service<http::Request<B>> for FaultService<S>
where
    S: tower::Service<
            http::Request<B>,
            Response = http::Response<tonic::body::Body>,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        // The ready inner service serves this call; a fresh clone waits for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let faults = self.faults.clone();
        Box::pin(async move {
            match faults.apply().await {
                Ok(()) => inner.call(req).await,
                Err(why) => Ok(tonic::Status::unavailable(why.to_string()).into_http()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn settings_apply_in_order() {
        let f = Faults::new();
        assert_eq!(f.apply().await, Ok(()));
        f.set(FaultConfig {
            error_rate: 1.0,
            ..Default::default()
        });
        assert!(matches!(f.apply().await, Err(Injected::Error(_))));
        f.set(FaultConfig {
            down_ms: 100,
            ..Default::default()
        });
        assert!(matches!(f.apply().await, Err(Injected::Down(_))));
        tokio::time::advance(Duration::from_millis(101)).await;
        assert_eq!(f.apply().await, Ok(()));
        f.set(FaultConfig {
            latency_ms: 50,
            ..Default::default()
        });
        let t = Instant::now();
        assert_eq!(f.apply().await, Ok(()));
        assert!(t.elapsed() >= Duration::from_millis(50));
        f.clear();
        assert_eq!(f.status(), FaultStatus::default());
        assert!(
            FaultConfig {
                error_rate: 1.5,
                ..Default::default()
            }
            .validate()
            .is_err()
        );
    }
}
