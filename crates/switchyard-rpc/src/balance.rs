//! Client-side load balancing: a pure state machine (time and randomness passed in).
//!
//! **Power of two choices** over in-flight counts: two distinct healthy instances are
//! drawn at random and the one with fewer calls in flight is used (the first on a tie).
//! It spreads load like least-loaded without a global scan and without herding onto one
//! instance that just became idle.
//!
//! **Ejection.** After `eject_after` consecutive failures (connect errors, timeouts, 5xx)
//! an instance is ejected for a cool-off of `base_ejection * 2^n` (capped at
//! `max_ejection`), where `n` counts its earlier ejections; each success lowers `n` by
//! one. After the cool-off it takes traffic again (a failure there counts from zero).
//!
//! **Never "no instances" without trying.** When every candidate is ejected, the one
//! whose ejection ends first is used anyway (panic mode): the call is tried rather than
//! failed locally, and its success brings the instance back.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::time::{Duration, Instant};

/// FNV-1a, for the client's small per-call lookups. The keys are the few instance URLs of
/// one service, taken from the registry, or method paths configured on the client (never
/// anything a remote peer chooses), so an unkeyed hash is safe; the default SipHash of a
/// URL was a visible part of every call's cost (the balancer's map is consulted about
/// five times per call).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fnv(u64);

/// A map or set hasher using [`Fnv`].
pub(crate) type FnvBuild = BuildHasherDefault<Fnv>;

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// Ejection settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BalanceConfig {
    /// Consecutive failures that eject an instance.
    pub eject_after: u32,
    /// The first ejection's cool-off.
    pub base_ejection: Duration,
    /// The longest cool-off.
    pub max_ejection: Duration,
}

impl Default for BalanceConfig {
    fn default() -> Self {
        BalanceConfig {
            eject_after: 3,
            base_ejection: Duration::from_secs(1),
            max_ejection: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Host {
    in_flight: u32,
    consecutive_failures: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
}

/// The balancer of one service.
#[derive(Debug, Clone, Default)]
pub struct Balancer {
    cfg: BalanceConfig,
    hosts: HashMap<String, Host, FnvBuild>,
}

impl Balancer {
    /// A balancer with `cfg`.
    pub fn new(cfg: BalanceConfig) -> Self {
        Balancer {
            cfg,
            hosts: HashMap::default(),
        }
    }

    /// Whether `instance` is ejected at `now`.
    pub fn is_ejected(&self, instance: &str, now: Instant) -> bool {
        self.hosts
            .get(instance)
            .and_then(|h| h.ejected_until)
            .is_some_and(|u| now < u)
    }

    /// Calls in flight to `instance`.
    pub fn in_flight(&self, instance: &str) -> u32 {
        self.hosts.get(instance).map_or(0, |h| h.in_flight)
    }

    /// Picks one of `candidates` (index), or `None` if there are none. `rand(n)` returns
    /// a uniform number in `0..n`.
    pub fn pick(
        &self,
        candidates: &[&str],
        now: Instant,
        rand: &mut impl FnMut(usize) -> usize,
    ) -> Option<usize> {
        // No allocation: the healthy candidates are counted, then the two drawn are
        // found by rank.
        if candidates.len() == 1 {
            // The only candidate is used whether ejected or not (see the panic mode
            // below), so its state need not be looked up.
            return Some(0);
        }
        let healthy = |i: &usize| !self.is_ejected(candidates[*i], now);
        let n = (0..candidates.len()).filter(healthy).count();
        let nth = |k: usize| (0..candidates.len()).filter(healthy).nth(k);
        match n {
            0 => (0..candidates.len()).min_by_key(|&i| {
                self.hosts
                    .get(candidates[i])
                    .and_then(|h| h.ejected_until)
                    .unwrap_or(now)
            }),
            1 => nth(0),
            n => {
                let a = rand(n);
                let mut b = rand(n - 1);
                if b >= a {
                    b += 1;
                }
                let (a, b) = (nth(a)?, nth(b)?);
                if self.in_flight(candidates[b]) < self.in_flight(candidates[a]) {
                    Some(b)
                } else {
                    Some(a)
                }
            }
        }
    }

    /// A call to `instance` starts.
    pub fn start(&mut self, instance: &str) {
        // Looked up first: the key is only allocated for a new instance.
        match self.hosts.get_mut(instance) {
            Some(h) => h.in_flight += 1,
            None => {
                self.hosts.insert(
                    instance.to_string(),
                    Host {
                        in_flight: 1,
                        ..Host::default()
                    },
                );
            }
        }
    }

    /// A call to `instance` ended; `ok` is false for connect errors, timeouts and 5xx.
    /// Returns true if this failure ejected the instance.
    pub fn finish(&mut self, instance: &str, ok: bool, now: Instant) -> bool {
        let cfg = self.cfg;
        // Looked up once; the key is only allocated for an instance not seen before.
        match self.hosts.get_mut(instance) {
            Some(h) => Self::record(cfg, h, ok, now),
            None => Self::record(
                cfg,
                self.hosts.entry(instance.to_string()).or_default(),
                ok,
                now,
            ),
        }
    }

    /// [`finish`](Self::finish) on the host's state.
    fn record(cfg: BalanceConfig, h: &mut Host, ok: bool, now: Instant) -> bool {
        h.in_flight = h.in_flight.saturating_sub(1);
        if h.ejected_until.is_some_and(|u| now >= u) {
            h.ejected_until = None;
        }
        if ok {
            h.consecutive_failures = 0;
            h.ejections = h.ejections.saturating_sub(1);
            h.ejected_until = None;
            return false;
        }
        if h.ejected_until.is_some() {
            return false;
        }
        h.consecutive_failures += 1;
        if h.consecutive_failures < cfg.eject_after.max(1) {
            return false;
        }
        let factor = 1u32.checked_shl(h.ejections.min(20)).unwrap_or(u32::MAX);
        let cool = cfg
            .base_ejection
            .saturating_mul(factor)
            .min(cfg.max_ejection);
        h.ejected_until = Some(now + cool);
        h.ejections += 1;
        h.consecutive_failures = 0;
        true
    }

    /// A call to `instance` was abandoned (its caller went away): no outcome recorded.
    pub fn cancel(&mut self, instance: &str) {
        if let Some(h) = self.hosts.get_mut(instance) {
            h.in_flight = h.in_flight.saturating_sub(1);
        }
    }

    /// Forgets instances not in `keep` (they left the registry).
    pub fn retain(&mut self, keep: &[&str]) {
        self.hosts
            .retain(|k, h| h.in_flight > 0 || keep.contains(&k.as_str()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BalanceConfig {
        BalanceConfig {
            eject_after: 2,
            base_ejection: Duration::from_secs(1),
            max_ejection: Duration::from_secs(3),
        }
    }

    #[test]
    fn p2c_prefers_fewer_in_flight() {
        let mut b = Balancer::new(cfg());
        b.start("a");
        b.start("a");
        let now = Instant::now();
        let mut seq = [0usize, 0].into_iter();
        let mut rand = |_n: usize| seq.next().unwrap_or(0);
        // Draws a (index 0) and b (index 1): b has fewer in flight.
        assert_eq!(b.pick(&["a", "b"], now, &mut rand), Some(1));
        assert_eq!(b.pick(&[], now, &mut rand), None);
    }

    #[test]
    fn ejects_after_consecutive_failures_with_doubling_capped_cool_off() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut b = Balancer::new(cfg());
        let mut rand = |n: usize| n - 1;
        b.start("a");
        assert!(!b.finish("a", false, t0));
        b.start("a");
        assert!(b.finish("a", false, t0));
        assert!(b.is_ejected("a", t0));
        // Traffic goes to b while a is ejected.
        for _ in 0..5 {
            assert_eq!(b.pick(&["a", "b"], t0, &mut rand), Some(1));
        }
        // Back after 1s.
        assert!(!b.is_ejected("a", t0 + s(1)));
        // Ejected again: 2s, then 3s (cap).
        for (at, cool) in [(1, 2), (10, 3), (20, 3)] {
            let now = t0 + s(at);
            b.start("a");
            b.finish("a", false, now);
            b.start("a");
            assert!(b.finish("a", false, now));
            assert!(b.is_ejected("a", now + s(cool) - Duration::from_millis(1)));
            assert!(!b.is_ejected("a", now + s(cool)));
        }
    }

    #[test]
    fn all_ejected_still_picks_the_one_returning_first() {
        let t0 = Instant::now();
        let mut b = Balancer::new(cfg());
        let mut rand = |_n: usize| 0;
        for h in ["a", "b"] {
            for _ in 0..2 {
                b.start(h);
                b.finish(h, false, t0);
            }
        }
        // a was ejected longer ago? Both at t0; eject b again later so a returns first.
        assert!(b.is_ejected("a", t0) && b.is_ejected("b", t0));
        assert!(b.pick(&["a", "b"], t0, &mut rand).is_some());
        // A success brings it back.
        b.start("a");
        b.finish("a", true, t0);
        assert!(!b.is_ejected("a", t0));
        assert_eq!(b.pick(&["a", "b"], t0, &mut rand), Some(0));
    }
}
