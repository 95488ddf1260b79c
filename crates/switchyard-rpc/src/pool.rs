//! The instances of one service as a client sees them, shared by the HTTP and the gRPC
//! client: the registry lookup, the [`Balancer`] (power of two choices with ejection)
//! and one [`Breaker`] per instance, behind one lock. Transport-agnostic: an attempt
//! [`pick`](Pool::pick)s an instance, gets a [`Lease`], and reports the outcome on it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::balance::{BalanceConfig, Balancer};
use crate::breaker::{Admit, Breaker, BreakerConfig, BreakerState};
use crate::conn::{ConnectError, Connections, Origin};
use crate::error::{Error, Result};
use crate::registry::{Instance, Registry};

/// One instance as the pool keeps it: its URL, parsed once, and its connections, made
/// on first use (dropped with the instance when it leaves the registry).
pub(crate) struct Target {
    url: Arc<str>,
    conns: Connections,
}

impl Target {
    fn new(url: &str) -> Self {
        Target {
            url: Arc::from(url),
            conns: Connections::new(url),
        }
    }

    /// Where the instance is, or why its URL cannot be called.
    pub(crate) fn origin(&self) -> std::result::Result<&Origin, Arc<ConnectError>> {
        self.conns.origin.as_ref().map_err(Arc::clone)
    }

    /// The instance's connections.
    pub(crate) fn connections(&self) -> &Connections {
        &self.conns
    }
}

struct State {
    balancer: Balancer,
    breakers: BTreeMap<Arc<str>, Breaker>,
    /// The registry snapshot `targets` was derived from.
    snapshot: Option<Arc<[Instance]>>,
    targets: Vec<Arc<Target>>,
}

impl State {
    /// Re-derives the targets after the registry's snapshot changed (keeping the
    /// targets, and so the connections, of instances still listed).
    fn refresh(&mut self, instances: Arc<[Instance]>) {
        let old = std::mem::take(&mut self.targets);
        self.targets = instances
            .iter()
            .map(|i| {
                old.iter()
                    .find(|t| *t.url == *i.url)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(Target::new(&i.url)))
            })
            .collect();
        let urls: Vec<&str> = instances.iter().map(|i| i.url.as_str()).collect();
        self.balancer.retain(&urls);
        self.breakers.retain(|k, _| urls.contains(&&**k));
        self.snapshot = Some(instances);
    }
}

/// Candidates kept on the stack up to this many instances.
const STACK_CANDIDATES: usize = 16;

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
                snapshot: None,
                targets: Vec::new(),
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
        let mut guard = self.lock();
        if !guard
            .snapshot
            .as_ref()
            .is_some_and(|s| Arc::ptr_eq(s, &instances))
        {
            guard.refresh(instances);
        }
        let s = &mut *guard;
        // The admitted candidates (name, index into `targets`), on the stack for the
        // usual handful of instances.
        let admits = |t: &Arc<Target>| s.breakers.get(&*t.url).is_none_or(|b| b.would_admit(now));
        let mut stack_names = [""; STACK_CANDIDATES];
        let mut stack_idx = [0usize; STACK_CANDIDATES];
        let (mut heap_names, mut heap_idx) = (Vec::new(), Vec::new());
        let (names, idx): (&[&str], &[usize]) = if s.targets.len() <= STACK_CANDIDATES {
            let mut n = 0;
            for (i, t) in s.targets.iter().enumerate().filter(|(_, t)| admits(t)) {
                stack_names[n] = &t.url;
                stack_idx[n] = i;
                n += 1;
            }
            (&stack_names[..n], &stack_idx[..n])
        } else {
            for (i, t) in s.targets.iter().enumerate().filter(|(_, t)| admits(t)) {
                heap_names.push(&*t.url);
                heap_idx.push(i);
            }
            (&heap_names, &heap_idx)
        };
        if names.is_empty() {
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
        let pick = s
            .balancer
            .pick(names, now, &mut |n| fastrand::usize(..n))
            .unwrap_or(0);
        let target = s.targets[idx[pick]].clone();
        let admit = |b: &mut Breaker| {
            let before = b.state(now);
            b.admit(now);
            (before, b.state(now))
        };
        // Looked up once; inserted only for an instance called for the first time.
        let (created, (before, after)) = match s.breakers.get_mut(&*target.url) {
            Some(b) => (false, admit(b)),
            None => {
                let mut b = Breaker::new(self.breaker);
                let states = admit(&mut b);
                s.breakers.insert(target.url.clone(), b);
                (true, states)
            }
        };
        s.balancer.start(&target.url);
        drop(guard);
        if created || before != after {
            self.publish_state(&target.url, after);
        }
        Ok(Lease {
            pool: self.clone(),
            target,
            done: false,
        })
    }

    fn record(&self, target: &Target, ok: bool) {
        let now = std::time::Instant::now();
        let instance: &str = &target.url;
        let (ejected, before, after) = {
            let mut s = self.lock();
            let ejected = s.balancer.finish(instance, ok, now);
            let outcome = |b: &mut Breaker| {
                let before = b.state(now);
                if ok {
                    b.on_success(now);
                } else {
                    b.on_failure(now);
                }
                (before, b.state(now))
            };
            // Looked up once; inserted only if the instance has no breaker yet.
            let (before, after) = match s.breakers.get_mut(instance) {
                Some(b) => outcome(b),
                None => {
                    let mut b = Breaker::new(self.breaker);
                    let states = outcome(&mut b);
                    s.breakers.insert(target.url.clone(), b);
                    states
                }
            };
            (ejected, before, after)
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
            .map(|(k, b)| (k.to_string(), b.state(now)))
            .collect()
    }
}

/// One attempt's hold on an instance: [`finish`](Lease::finish) records the outcome;
/// dropped unfinished (the caller went away), it only releases the in-flight count.
pub(crate) struct Lease {
    pool: Arc<Pool>,
    target: Arc<Target>,
    done: bool,
}

impl Lease {
    /// The chosen instance's base URL.
    pub(crate) fn instance(&self) -> &str {
        &self.target.url
    }

    /// The chosen instance's URL, shared (a reference count, not a copy).
    pub(crate) fn instance_url(&self) -> Arc<str> {
        self.target.url.clone()
    }

    /// The chosen instance.
    pub(crate) fn target(&self) -> &Arc<Target> {
        &self.target
    }

    /// Records the outcome: `ok` is false for connect errors, timeouts and server failures.
    pub(crate) fn finish(mut self, ok: bool) {
        self.done = true;
        self.pool.record(&self.target, ok);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if !self.done {
            self.pool.lock().balancer.cancel(&self.target.url);
        }
    }
}
