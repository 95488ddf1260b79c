//! The retry decision shared by the HTTP and the gRPC client's `tower::retry::Policy`:
//! attempts, exponential backoff with full jitter, the retry budget
//! (`tower::retry::budget::TpsBudget`) and the deadline. What counts as a retryable
//! *outcome* is the transport's business (status codes); whether the *call* may be
//! retried at all (idempotent, or carrying an idempotency key) is decided per call.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tower::retry::budget::{Budget, TpsBudget};

use crate::client::ClientConfig;

/// The per-call retry state: one clone per call (tower clones the policy per request).
#[derive(Clone)]
pub(crate) struct Retrier {
    attempts: u32,
    max_attempts: u32,
    base: Duration,
    max: Duration,
    budget: Arc<TpsBudget>,
    service: Arc<str>,
}

impl Retrier {
    /// The retrier of service `service` (its budget is shared by all its calls).
    pub(crate) fn new(cfg: &ClientConfig, service: &str) -> Self {
        Retrier {
            attempts: 0,
            max_attempts: cfg.max_attempts.max(1),
            base: cfg.backoff_base,
            max: cfg.backoff_max,
            budget: Arc::new(TpsBudget::new(
                cfg.retry_budget_window,
                cfg.retry_min_per_sec,
                cfg.retry_ratio,
            )),
            service: Arc::from(service),
        }
    }

    /// The delay before retry number `n` (1-based): uniform in `0..=min(max, base * 2^(n-1))`.
    pub(crate) fn backoff(&self, n: u32) -> Duration {
        let cap = self
            .base
            .saturating_mul(
                1u32.checked_shl(n.saturating_sub(1).min(20))
                    .unwrap_or(u32::MAX),
            )
            .min(self.max);
        let nanos = u64::try_from(cap.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(fastrand::u64(0..=nanos))
    }

    /// Counts a call that will not consult [`next`](Self::next) (not retryable) in the
    /// budget's base rate, as `next` does for the others.
    pub(crate) fn deposit(&self) {
        self.budget.deposit();
    }

    /// Called after each attempt. `floor`: `None` if the outcome is not retryable, else
    /// the least delay before a retry (e.g. `Retry-After`). `retryable`: whether the
    /// call may be repeated at all. Returns the sleep before the next attempt, or `None`
    /// (no retry: not retryable, out of attempts, past the deadline, or out of budget).
    pub(crate) fn next(
        &mut self,
        floor: Option<Duration>,
        retryable: bool,
        deadline: Instant,
    ) -> Option<Duration> {
        if self.attempts == 0 {
            self.budget.deposit();
        }
        self.attempts += 1;
        let floor = floor?;
        if !retryable || self.attempts >= self.max_attempts {
            return None;
        }
        let delay = self.backoff(self.attempts).max(floor);
        if Instant::now() + delay >= deadline {
            return None;
        }
        if !self.budget.withdraw() {
            metrics::counter!("switchyard_rpc_retry_budget_exhausted_total", "service" => self.service.to_string()).increment(1);
            return None;
        }
        metrics::counter!("switchyard_rpc_retries_total", "service" => self.service.to_string())
            .increment(1);
        tracing::debug!(service = %self.service, attempt = self.attempts + 1, ?delay, "retrying");
        Some(delay)
    }
}
