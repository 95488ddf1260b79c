//! The instances of one service as a client sees them, shared by the HTTP and the gRPC
//! client: the registry lookup, the [`Balancer`] (power of two choices with ejection)
//! and one [`Breaker`] per instance, behind one lock. Transport-agnostic: an attempt
//! [`pick`](Pool::pick)s an instance, gets a [`Lease`], and reports the outcome on it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::balance::{BalanceConfig, Balancer};
use crate::breaker::{Admit, Breaker, BreakerConfig, BreakerState};
use crate::error::{Error, Result};
use crate::registry::Registry;

struct State {
    balancer: Balancer,
    breakers: BTreeMap<String, Breaker>,
}

/// The balancer and breakers of one service.
pub(crate) struct Pool {
    name: Arc<str>,
    registry: Arc<dyn Registry>,
    breaker: BreakerConfig,
    state: Mutex<State>,
}

impl Pool {
    pub(crate) fn new(
        name: &str,
        registry: Arc<dyn Registry>,
        breaker: BreakerConfig,
        balance: BalanceConfig,
    ) -> Self {
        Pool {
            name: Arc::from(name),
            registry,
            breaker,
            state: Mutex::new(State {
                balancer: Balancer::new(balance),
                breakers: BTreeMap::new(),
            }),
        }
    }

    /// The service's name.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn publish_state(&self, instance: &str, state: BreakerState) {
        metrics::gauge!("switchyard_rpc_breaker_state", "service" => self.name.to_string(), "instance" => instance.to_string())
            .set(state as u8 as f64);
    }

    /// Chooses the instance for one attempt: instances whose breaker admits a call,
    /// minus ejected ones, power of two choices. Fails fast with
    /// [`Error::NoInstances`] or [`Error::CircuitOpen`] (nothing is sent then).
    pub(crate) fn pick(self: &Arc<Self>) -> Result<Lease> {
        let service = || self.name.to_string();
        let instances = self.registry.instances(&self.name);
        if instances.is_empty() {
            return Err(Error::NoInstances { service: service() });
        }
        let now = std::time::Instant::now();
        let mut s = self.lock();
        let urls: Vec<&str> = instances.iter().map(|i| i.url.as_str()).collect();
        s.balancer.retain(&urls);
        s.breakers.retain(|k, _| urls.contains(&k.as_str()));
        let admitted: Vec<&str> = urls
            .iter()
            .copied()
            .filter(|u| s.breakers.get(*u).is_none_or(|b| b.would_admit(now)))
            .collect();
        if admitted.is_empty() {
            let retry_in = s
                .breakers
                .values_mut()
                .filter_map(|b| match b.admit(now) {
                    Admit::No { retry_in } => Some(retry_in),
                    _ => None,
                })
                .min()
                .unwrap_or_default();
            return Err(Error::CircuitOpen {
                service: service(),
                retry_in,
            });
        }
        let idx = s
            .balancer
            .pick(&admitted, now, &mut |n| fastrand::usize(..n))
            .unwrap_or(0);
        let url = admitted[idx].to_string();
        let cfg = self.breaker;
        let created = !s.breakers.contains_key(&url);
        let (before, after) = {
            let b = s
                .breakers
                .entry(url.clone())
                .or_insert_with(|| Breaker::new(cfg));
            let before = b.state(now);
            b.admit(now);
            (before, b.state(now))
        };
        s.balancer.start(&url);
        drop(s);
        if created || before != after {
            self.publish_state(&url, after);
        }
        Ok(Lease {
            pool: self.clone(),
            instance: url,
            done: false,
        })
    }

    fn record(&self, instance: &str, ok: bool) {
        let now = std::time::Instant::now();
        let (ejected, before, after) = {
            let mut s = self.lock();
            let ejected = s.balancer.finish(instance, ok, now);
            let cfg = self.breaker;
            let b = s
                .breakers
                .entry(instance.to_string())
                .or_insert_with(|| Breaker::new(cfg));
            let before = b.state(now);
            if ok {
                b.on_success(now);
            } else {
                b.on_failure(now);
            }
            (ejected, before, b.state(now))
        };
        if before != after {
            self.publish_state(instance, after);
        }
        if ejected {
            metrics::counter!("switchyard_rpc_ejections_total", "service" => self.name.to_string(), "instance" => instance.to_string()).increment(1);
            tracing::warn!(service = %self.name, instance, "instance ejected after consecutive failures");
        }
    }

    /// The breaker state of each instance called so far.
    pub(crate) fn breaker_states(&self) -> Vec<(String, BreakerState)> {
        let now = std::time::Instant::now();
        let s = self.lock();
        s.breakers
            .iter()
            .map(|(k, b)| (k.clone(), b.state(now)))
            .collect()
    }
}

/// One attempt's hold on an instance: [`finish`](Lease::finish) records the outcome;
/// dropped unfinished (the caller went away), it only releases the in-flight count.
pub(crate) struct Lease {
    pool: Arc<Pool>,
    instance: String,
    done: bool,
}

impl Lease {
    /// The chosen instance's base URL.
    pub(crate) fn instance(&self) -> &str {
        &self.instance
    }

    /// Records the outcome: `ok` is false for connect errors, timeouts and server failures.
    pub(crate) fn finish(mut self, ok: bool) {
        self.done = true;
        self.pool.record(&self.instance, ok);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if !self.done {
            self.pool.lock().balancer.cancel(&self.instance);
        }
    }
}
