//! Redelivery policy: how many attempts, and how long to wait between them.

use std::time::Duration;

/// How a group retries a message that failed (nack without a delay, or ack timeout).
///
/// Attempt `n` (1-based) that fails waits `initial_backoff * multiplier^(n-1)`, capped at
/// `max_backoff`, with ±`jitter` (a fraction) of random spread so that many consumers
/// failing together don't retry in lockstep. After `max_attempts` deliveries the message
/// moves to the topic's dead-letter queue.
#[derive(Debug, Clone, PartialEq)]
pub struct RedeliveryPolicy {
    /// Deliveries before the message is dead-lettered (at least 1).
    pub max_attempts: u32,
    /// Wait after the first failure.
    pub initial_backoff: Duration,
    /// Upper bound of the wait.
    pub max_backoff: Duration,
    /// Growth factor per attempt.
    pub multiplier: f64,
    /// Random spread as a fraction of the wait, 0.0 to 1.0.
    pub jitter: f64,
}

impl Default for RedeliveryPolicy {
    fn default() -> Self {
        RedeliveryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(60),
            multiplier: 2.0,
            jitter: 0.2,
        }
    }
}

impl RedeliveryPolicy {
    /// The wait after failed attempt `attempt` (1-based), jitter included.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .multiplier
            .max(1.0)
            .powi(attempt.saturating_sub(1).min(64) as i32);
        let base = (self.initial_backoff.as_secs_f64() * exp).min(self.max_backoff.as_secs_f64());
        let jitter = self.jitter.clamp(0.0, 1.0);
        let factor = 1.0 + jitter * (fastrand::f64() * 2.0 - 1.0);
        Duration::from_secs_f64((base * factor).max(0.0))
    }

    /// True when a message delivered `attempts` times must not be delivered again.
    pub fn exhausted(&self, attempts: u32) -> bool {
        attempts >= self.max_attempts.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_exponentially_within_jitter_and_caps() {
        let p = RedeliveryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            multiplier: 2.0,
            jitter: 0.2,
        };
        for _ in 0..100 {
            let b1 = p.backoff(1).as_secs_f64();
            let b3 = p.backoff(3).as_secs_f64();
            let b9 = p.backoff(9).as_secs_f64();
            assert!((0.08..=0.12).contains(&b1), "{b1}");
            assert!((0.32..=0.48).contains(&b3), "{b3}");
            assert!((0.8..=1.2).contains(&b9), "{b9}");
        }
        assert!(!p.exhausted(9));
        assert!(p.exhausted(10));
    }

    #[test]
    fn jitter_spreads_values() {
        let p = RedeliveryPolicy::default();
        let a: Vec<_> = (0..20).map(|_| p.backoff(2)).collect();
        assert!(a.iter().any(|x| *x != a[0]));
    }
}
