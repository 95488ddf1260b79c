//! The circuit breaker: a pure state machine (time is passed in), one per instance.
//!
//! - **Closed**: calls pass; failures and successes are counted in a sliding `window`.
//!   When at least `failure_threshold` failures fall within the window **and** they are
//!   at least `failure_rate_percent` of the window's calls, the breaker opens. The rate
//!   keeps a busy caller's breaker closed through a few scattered failures (20 % of
//!   thousands of calls reach any count quickly), which would otherwise turn a flaky
//!   dependency into a dead one for every cool-off.
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
    /// Failures within `window` that open the breaker (with the rate below).
    pub failure_threshold: u32,
    /// The share of the window's calls that must have failed, in percent (1–100).
    pub failure_rate_percent: u8,
    /// The sliding window failures are counted in.
    pub window: Duration,
    /// How long the breaker stays open before a probe is let through.
    pub open_for: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failure_threshold: 5,
            failure_rate_percent: 50,
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
    Closed {
        failures: VecDeque<Instant>,
        /// Successes in the window, in buckets of a tenth of it: (bucket start, count).
        successes: VecDeque<(Instant, u32)>,
    },
    Open {
        until: Instant,
    },
    HalfOpen {
        probe_since: Option<Instant>,
    },
}

impl Inner {
    fn closed() -> Self {
        Inner::Closed {
            failures: VecDeque::new(),
            successes: VecDeque::new(),
        }
    }
}

/// Drops the entries of `q` (oldest first) older than `window` at `now`.
fn prune<T>(q: &mut VecDeque<T>, now: Instant, window: Duration, at: impl Fn(&T) -> Instant) {
    while q
        .front()
        .is_some_and(|e| now.saturating_duration_since(at(e)) > window)
    {
        q.pop_front();
    }
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
            inner: Inner::closed(),
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
    pub fn on_success(&mut self, now: Instant) {
        let bucket = self.cfg.window / 10;
        match &mut self.inner {
            Inner::Closed { successes, .. } => {
                match successes.back_mut() {
                    Some((start, n)) if now.saturating_duration_since(*start) < bucket => *n += 1,
                    _ => successes.push_back((now, 1)),
                }
                prune(successes, now, self.cfg.window, |(t, _)| *t);
            }
            // A success closes a half-open breaker (and one from a call admitted before
            // the breaker opened is ignored while it is open).
            Inner::HalfOpen { .. } => self.inner = Inner::closed(),
            Inner::Open { .. } => {}
        }
    }

    /// Records a failed call (connect error, timeout, 5xx).
    pub fn on_failure(&mut self, now: Instant) {
        let open = Inner::Open {
            until: now + self.cfg.open_for,
        };
        match &mut self.inner {
            Inner::Closed {
                failures,
                successes,
            } => {
                failures.push_back(now);
                prune(failures, now, self.cfg.window, |t| *t);
                prune(successes, now, self.cfg.window, |(t, _)| *t);
                let failed = failures.len() as u64;
                let calls = failed + successes.iter().map(|(_, n)| u64::from(*n)).sum::<u64>();
                let rate = u64::from(self.cfg.failure_rate_percent.clamp(1, 100));
                if failed >= u64::from(self.cfg.failure_threshold.max(1))
                    && failed * 100 >= rate * calls
                {
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
            failure_rate_percent: 50,
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
    fn scattered_failures_among_many_successes_do_not_open_it() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut b = Breaker::new(cfg());
        // 20 % of 500 calls over 5 s fail: 100 failures, far past the count, under the rate.
        for i in 0..500u64 {
            let t = t0 + ms(i * 10);
            if i % 5 == 0 {
                b.on_failure(t);
            } else {
                b.on_success(t);
            }
            assert_eq!(b.state(t), BreakerState::Closed, "call {i}");
        }
        // Then the dependency dies: failures take over the window and it opens.
        let mut t = t0 + ms(5_000);
        let mut calls = 0;
        while b.state(t) == BreakerState::Closed {
            t += ms(10);
            b.on_failure(t);
            calls += 1;
            assert!(calls < 1_000, "never opened");
        }
        assert_eq!(b.state(t), BreakerState::Open);
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
