//! The circuit breaker: a pure state machine (time is passed in), one per instance.
//!
//! - **Closed**: calls pass; failures are counted in a sliding `window`. When
//!   `failure_threshold` failures fall within the window, the breaker opens.
//! - **Open**: calls fail fast (no request is sent) until `open_for` has passed.
//! - **Half-open**: one probe call passes; success closes the breaker, failure opens it
//!   again for another `open_for`. A probe whose outcome is never reported (its caller
//!   was cancelled) is given up after `open_for`, and another probe is admitted.
//!
//! Why not `tower-resilience`'s breaker: see `docs/decisions/0004-resilience-layers.md`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Breaker settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Failures within `window` that open the breaker.
    pub failure_threshold: u32,
    /// The sliding window failures are counted in.
    pub window: Duration,
    /// How long the breaker stays open before a probe is let through.
    pub open_for: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failure_threshold: 5,
            window: Duration::from_secs(10),
            open_for: Duration::from_secs(5),
        }
    }
}

/// The observable state (the metric value is the discriminant: 0, 1, 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BreakerState {
    /// Calls pass.
    Closed = 0,
    /// Calls fail fast.
    Open = 1,
    /// One probe call may pass.
    HalfOpen = 2,
}

/// What the breaker says about a call about to be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Make the call.
    Yes,
    /// Make the call; it is the half-open probe.
    Probe,
    /// Don't: the breaker is open (or a probe is in flight) for at least this long.
    No {
        /// Time until a probe may be admitted.
        retry_in: Duration,
    },
}

#[derive(Debug, Clone)]
enum Inner {
    Closed { failures: VecDeque<Instant> },
    Open { until: Instant },
    HalfOpen { probe_since: Option<Instant> },
}

/// One circuit breaker.
#[derive(Debug, Clone)]
pub struct Breaker {
    cfg: BreakerConfig,
    inner: Inner,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(cfg: BreakerConfig) -> Self {
        Breaker {
            cfg,
            inner: Inner::Closed {
                failures: VecDeque::new(),
            },
        }
    }

    /// The state at `now` (an open breaker whose cool-off passed reports half-open).
    pub fn state(&self, now: Instant) -> BreakerState {
        match &self.inner {
            Inner::Closed { .. } => BreakerState::Closed,
            Inner::Open { until } if now >= *until => BreakerState::HalfOpen,
            Inner::Open { .. } => BreakerState::Open,
            Inner::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Whether [`admit`](Self::admit) would let a call through at `now` (no state change).
    pub fn would_admit(&self, now: Instant) -> bool {
        !matches!(self.check(now), Admit::No { .. })
    }

    fn check(&self, now: Instant) -> Admit {
        match &self.inner {
            Inner::Closed { .. } => Admit::Yes,
            Inner::Open { until } if now >= *until => Admit::Probe,
            Inner::Open { until } => Admit::No {
                retry_in: *until - now,
            },
            Inner::HalfOpen { probe_since: None } => Admit::Probe,
            Inner::HalfOpen {
                probe_since: Some(t),
            } => {
                let giveup = *t + self.cfg.open_for;
                if now >= giveup {
                    Admit::Probe
                } else {
                    Admit::No {
                        retry_in: giveup - now,
                    }
                }
            }
        }
    }

    /// Asks to make a call at `now`; a `Probe` answer moves the breaker to half-open
    /// with that probe in flight.
    pub fn admit(&mut self, now: Instant) -> Admit {
        let a = self.check(now);
        if a == Admit::Probe {
            self.inner = Inner::HalfOpen {
                probe_since: Some(now),
            };
        }
        a
    }

    /// Records a successful call.
    pub fn on_success(&mut self, _now: Instant) {
        match &mut self.inner {
            Inner::Closed { .. } => {}
            // A success closes a half-open breaker (and one from a call admitted before
            // the breaker opened is ignored while it is open).
            Inner::HalfOpen { .. } => {
                self.inner = Inner::Closed {
                    failures: VecDeque::new(),
                }
            }
            Inner::Open { .. } => {}
        }
    }

    /// Records a failed call (connect error, timeout, 5xx).
    pub fn on_failure(&mut self, now: Instant) {
        let open = Inner::Open {
            until: now + self.cfg.open_for,
        };
        match &mut self.inner {
            Inner::Closed { failures } => {
                failures.push_back(now);
                while failures
                    .front()
                    .is_some_and(|t| now.saturating_duration_since(*t) > self.cfg.window)
                {
                    failures.pop_front();
                }
                if failures.len() >= self.cfg.failure_threshold.max(1) as usize {
                    self.inner = open;
                }
            }
            Inner::HalfOpen { .. } => self.inner = open,
            Inner::Open { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BreakerConfig {
        BreakerConfig {
            failure_threshold: 3,
            window: Duration::from_secs(10),
            open_for: Duration::from_secs(5),
        }
    }

    #[test]
    fn opens_after_threshold_in_window_then_half_opens_and_closes() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut b = Breaker::new(cfg());
        b.on_failure(t0);
        b.on_failure(t0 + s(1));
        assert_eq!(b.state(t0 + s(1)), BreakerState::Closed);
        b.on_failure(t0 + s(2));
        assert_eq!(b.state(t0 + s(2)), BreakerState::Open);
        assert_eq!(b.admit(t0 + s(3)), Admit::No { retry_in: s(4) });
        // Cool-off over: exactly one probe.
        assert_eq!(b.state(t0 + s(7)), BreakerState::HalfOpen);
        assert_eq!(b.admit(t0 + s(7)), Admit::Probe);
        assert!(matches!(b.admit(t0 + s(7)), Admit::No { .. }));
        b.on_success(t0 + s(8));
        assert_eq!(b.state(t0 + s(8)), BreakerState::Closed);
        assert_eq!(b.admit(t0 + s(8)), Admit::Yes);
    }

    #[test]
    fn failures_outside_the_window_do_not_count() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut b = Breaker::new(cfg());
        b.on_failure(t0);
        b.on_failure(t0 + s(1));
        b.on_failure(t0 + s(20));
        assert_eq!(b.state(t0 + s(20)), BreakerState::Closed);
    }

    #[test]
    fn failed_probe_reopens_and_lost_probe_is_given_up() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut b = Breaker::new(cfg());
        for i in 0..3 {
            b.on_failure(t0 + s(i));
        }
        assert_eq!(b.admit(t0 + s(8)), Admit::Probe);
        b.on_failure(t0 + s(8));
        assert_eq!(b.state(t0 + s(9)), BreakerState::Open);
        assert_eq!(b.admit(t0 + s(13)), Admit::Probe);
        // The probe's caller vanished: another probe after open_for.
        assert!(!b.would_admit(t0 + s(14)));
        assert_eq!(b.admit(t0 + s(18)), Admit::Probe);
    }
}
