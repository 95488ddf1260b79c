//! [`ChaosBus`]: wraps any [`Bus`] and makes its consumers' lives harder — duplicate
//! deliveries, redeliveries and delays, with configurable probabilities and a seed — so
//! that you can test that **your** services' handlers are idempotent and order-tolerant
//! the way the bus contract says they must be.
//!
//! ```no_run
//! # async fn demo(inner: std::sync::Arc<dyn switchyard::Bus>) {
//! use std::sync::Arc;
//! use std::time::Duration;
//! use switchyard_testkit::chaos_bus::{ChaosBus, ChaosConfig};
//!
//! let bus = Arc::new(ChaosBus::new(
//!     inner,
//!     ChaosConfig {
//!         duplicate: 0.2,
//!         redeliver: 0.05,
//!         delay: 0.2,
//!         max_delay: Duration::from_millis(50),
//!         seed: 42,
//!         ..ChaosConfig::default()
//!     },
//! ));
//! // Build your routers on `bus`, run your scenario, check your invariants.
//! # let _ = bus;
//! # }
//! ```
//!
//! # What it does, and why the contract still holds
//!
//! Only durable subscriptions are touched; publishing, dead letters, replay and the
//! transient channel pass through unchanged.
//!
//! - **Duplicate** (probability `duplicate`): once a delivery is **acknowledged**, the
//!   same envelope (same id) is handed to the subscriber once more, as a delivery whose
//!   settle does nothing. This is exactly what a consumer sees when an ack is lost in a
//!   crash: at-least-once delivery. An inbox absorbs it.
//! - **Redelivery** (probability `redeliver`, only on attempts up to
//!   `redeliver_max_attempt` so it cannot exhaust a retry policy on its own): a real
//!   delivery is **nacked** with a short delay instead of being handed over, so the
//!   backend delivers it again later with attempt + 1 — as after a handler failure.
//! - **Delay** (probability `delay`, up to `max_delay`): a delivery is handed over late.
//!   Per-subject ordering is kept by the backend (a subject's next message is not handed
//!   out while this one is unsettled), and the delay counts against `ack_wait` like a
//!   slow network would.
//!
//! The randomness is a seeded generator: the same seed gives the same decisions for the
//! same sequence of deliveries (the interleaving of concurrent consumers still varies).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use switchyard::bus::{
    Capabilities, DeadLetter, Delivery, DeliveryInfo, DeliverySource, Published, ReplayFilter,
    Settle, Settler, SubscribeOptions, Subscription, TransientSubscription,
};
use switchyard::{Bus, Envelope, Result};
use tokio::sync::mpsc;

/// What [`ChaosBus`] injects. Probabilities are 0.0 to 1.0 per delivery.
#[derive(Debug, Clone, PartialEq)]
pub struct ChaosConfig {
    /// Probability that an acknowledged delivery is delivered once more.
    pub duplicate: f64,
    /// Probability that a delivery is nacked (redelivered later) instead of handed over.
    pub redeliver: f64,
    /// Only deliveries with an attempt number up to this one are nacked by the chaos.
    pub redeliver_max_attempt: u32,
    /// The delay of an injected redelivery.
    pub redeliver_delay: Duration,
    /// Probability that a delivery is handed over late.
    pub delay: f64,
    /// The longest injected delay.
    pub max_delay: Duration,
    /// The seed of the decisions.
    pub seed: u64,
}

impl Default for ChaosConfig {
    /// No chaos at all (every probability 0); set what you want.
    fn default() -> Self {
        ChaosConfig {
            duplicate: 0.0,
            redeliver: 0.0,
            redeliver_max_attempt: 1,
            redeliver_delay: Duration::from_millis(20),
            delay: 0.0,
            max_delay: Duration::from_millis(50),
            seed: 0,
        }
    }
}

/// What [`ChaosBus`] injected so far.
#[derive(Debug, Default)]
pub struct ChaosStats {
    /// Duplicate deliveries handed out.
    pub duplicates: AtomicU64,
    /// Deliveries nacked by the chaos.
    pub redeliveries: AtomicU64,
    /// Deliveries handed over late.
    pub delays: AtomicU64,
}

/// A [`Bus`] that injects duplicates, redeliveries and delays into the deliveries of
/// another. See the [module docs](self).
pub struct ChaosBus {
    inner: Arc<dyn Bus>,
    config: ChaosConfig,
    rng: Arc<Mutex<fastrand::Rng>>,
    stats: Arc<ChaosStats>,
}

impl std::fmt::Debug for ChaosBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChaosBus")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl ChaosBus {
    /// Wraps `inner` with `config`.
    pub fn new(inner: Arc<dyn Bus>, config: ChaosConfig) -> Self {
        let rng = fastrand::Rng::with_seed(config.seed);
        ChaosBus {
            inner,
            config,
            rng: Arc::new(Mutex::new(rng)),
            stats: Arc::new(ChaosStats::default()),
        }
    }

    /// What was injected so far.
    pub fn stats(&self) -> Arc<ChaosStats> {
        self.stats.clone()
    }

    /// The wrapped bus.
    pub fn inner(&self) -> &Arc<dyn Bus> {
        &self.inner
    }
}

struct Chaos {
    config: ChaosConfig,
    rng: Arc<Mutex<fastrand::Rng>>,
    stats: Arc<ChaosStats>,
}

impl Chaos {
    fn roll(&self, p: f64) -> bool {
        p > 0.0 && self.rng.lock().unwrap_or_else(|e| e.into_inner()).f64() < p
    }

    fn delay(&self) -> Duration {
        let max = self.config.max_delay.as_micros() as u64;
        let us = self
            .rng
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .u64(0..=max.max(1));
        Duration::from_micros(us)
    }
}

/// Settles the real delivery, then (on an ack, with the duplicate probability) queues
/// the same envelope once more for the subscriber.
struct DuplicatingSettler {
    inner: Arc<dyn Settler>,
    envelope: Arc<Envelope>,
    chaos: Arc<Chaos>,
    extra: mpsc::UnboundedSender<Delivery>,
}

#[async_trait]
impl Settler for DuplicatingSettler {
    async fn settle(&self, info: &DeliveryInfo, how: Settle) -> Result<()> {
        let acked = matches!(how, Settle::Ack);
        self.inner.settle(info, how).await?;
        if acked && info.lease != COPY_LEASE && self.chaos.roll(self.chaos.config.duplicate) {
            self.chaos.stats.duplicates.fetch_add(1, Ordering::Relaxed);
            let mut info = info.clone();
            info.lease = COPY_LEASE;
            let copy = Delivery::new(self.envelope.clone(), info, Arc::new(NoopSettler));
            let _ = self.extra.send(copy);
        }
        Ok(())
    }
}

/// The lease number that marks a duplicate (never duplicated or nacked again).
const COPY_LEASE: u64 = u64::MAX;

/// The settler of a duplicate: the original was settled already.
struct NoopSettler;

#[async_trait]
impl Settler for NoopSettler {
    async fn settle(&self, _info: &DeliveryInfo, _how: Settle) -> Result<()> {
        Ok(())
    }
}

/// The real delivery's settler, kept so that the wrapper can forward to it.
struct Forward {
    settler: Mutex<Option<Delivery>>,
}

#[async_trait]
impl Settler for Forward {
    async fn settle(&self, _info: &DeliveryInfo, how: Settle) -> Result<()> {
        let d = self
            .settler
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let Some(d) = d else { return Ok(()) };
        match how {
            Settle::Ack => d.ack().await,
            Settle::Nack { delay, reason } => d.nack(delay, reason).await,
            Settle::DeadLetter { reason } => d.dead_letter(reason).await,
        }
    }
}

/// Pumps the inner subscription into a channel (so waiting is cancel-safe and copies
/// can join the stream), applying the chaos on the way.
struct ChaosSource {
    rx: mpsc::UnboundedReceiver<Result<Delivery>>,
    pump: tokio::task::JoinHandle<()>,
}

impl Drop for ChaosSource {
    fn drop(&mut self) {
        self.pump.abort();
    }
}

#[async_trait]
impl DeliverySource for ChaosSource {
    async fn next_batch(&mut self, max: usize) -> Result<Vec<Delivery>> {
        let first = match self.rx.recv().await {
            Some(r) => r?,
            None => return Err(switchyard::Error::Closed),
        };
        let mut out = vec![first];
        while out.len() < max.max(1) {
            match self.rx.try_recv() {
                Ok(Ok(d)) => out.push(d),
                Ok(Err(e)) => {
                    // Hand over what we have; the error comes with the next call.
                    tracing::debug!(error = %e, "chaos source: error after a partial batch");
                    break;
                }
                Err(_) => break,
            }
        }
        Ok(out)
    }
}

async fn pump(
    mut sub: Subscription,
    chaos: Arc<Chaos>,
    tx: mpsc::UnboundedSender<Result<Delivery>>,
) {
    let (extra_tx, mut extra_rx) = mpsc::unbounded_channel::<Delivery>();
    loop {
        let batch = tokio::select! {
            b = sub.next_batch(64) => b,
            Some(copy) = extra_rx.recv() => Ok(vec![copy]),
        };
        let batch = match batch {
            Ok(b) => b,
            Err(e) => {
                let closed = e.kind() == switchyard::ErrorKind::Closed;
                if tx.send(Err(e)).is_err() || closed {
                    return;
                }
                continue;
            }
        };
        for d in batch {
            let attempt = d.attempt();
            let is_copy = d.info().lease == COPY_LEASE;
            if !is_copy
                && attempt <= chaos.config.redeliver_max_attempt
                && chaos.roll(chaos.config.redeliver)
            {
                chaos.stats.redeliveries.fetch_add(1, Ordering::Relaxed);
                let _ = d
                    .nack(
                        Some(chaos.config.redeliver_delay),
                        "chaos: injected redelivery",
                    )
                    .await;
                continue;
            }
            let envelope = d.envelope_arc();
            let info = d.info().clone();
            let forward = Arc::new(Forward {
                settler: Mutex::new(Some(d)),
            });
            let wrapped = Delivery::new(
                envelope.clone(),
                info,
                Arc::new(DuplicatingSettler {
                    inner: forward,
                    envelope,
                    chaos: chaos.clone(),
                    extra: extra_tx.clone(),
                }),
            );
            if chaos.roll(chaos.config.delay) {
                chaos.stats.delays.fetch_add(1, Ordering::Relaxed);
                let wait = chaos.delay();
                let tx = tx.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(wait).await;
                    let _ = tx.send(Ok(wrapped));
                });
            } else if tx.send(Ok(wrapped)).is_err() {
                return;
            }
        }
    }
}

#[async_trait]
impl Bus for ChaosBus {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn publish(&self, topic: &str, envelope: Envelope) -> Result<Published> {
        self.inner.publish(topic, envelope).await
    }

    async fn publish_batch(&self, topic: &str, envelopes: Vec<Envelope>) -> Result<Vec<Published>> {
        self.inner.publish_batch(topic, envelopes).await
    }

    async fn subscribe(
        &self,
        topic: &str,
        group: &str,
        options: SubscribeOptions,
    ) -> Result<Subscription> {
        let sub = self.inner.subscribe(topic, group, options).await?;
        let chaos = Arc::new(Chaos {
            config: self.config.clone(),
            rng: self.rng.clone(),
            stats: self.stats.clone(),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let pump = tokio::spawn(pump(sub, chaos, tx));
        Ok(Subscription::new(Box::new(ChaosSource { rx, pump })))
    }

    async fn dead_letters(&self, topic: &str, limit: usize) -> Result<Vec<DeadLetter>> {
        self.inner.dead_letters(topic, limit).await
    }

    async fn replay_dead_letters(&self, topic: &str, filter: ReplayFilter) -> Result<usize> {
        self.inner.replay_dead_letters(topic, filter).await
    }

    async fn publish_transient(&self, topic: &str, envelope: Envelope) -> Result<()> {
        self.inner.publish_transient(topic, envelope).await
    }

    async fn subscribe_transient(&self, topic: &str, group: &str) -> Result<TransientSubscription> {
        self.inner.subscribe_transient(topic, group).await
    }

    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::HashMap;

    use super::*;
    use switchyard::memory::MemoryBus;

    #[derive(serde::Serialize, serde::Deserialize)]
    struct Ping {
        n: u32,
    }

    impl switchyard::Event for Ping {
        const TYPE: &'static str = "test.ping.v1";
    }

    #[tokio::test]
    async fn injects_duplicates_redeliveries_and_delays_without_losing_anything() {
        let inner: Arc<dyn Bus> = Arc::new(MemoryBus::in_memory());
        let bus = ChaosBus::new(
            inner,
            ChaosConfig {
                duplicate: 0.3,
                redeliver: 0.2,
                delay: 0.2,
                max_delay: Duration::from_millis(5),
                seed: 7,
                ..ChaosConfig::default()
            },
        );
        let mut ids = Vec::new();
        for n in 0..200 {
            let env = switchyard::codec::encode(&Ping { n }, "/test").unwrap();
            ids.push(env.id);
            bus.publish("t", env).await.unwrap();
        }
        let mut sub = bus
            .subscribe("t", "g", SubscribeOptions::default())
            .await
            .unwrap();
        let mut seen: HashMap<switchyard::MessageId, (u32, Envelope)> = HashMap::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::time::Instant::now() < deadline {
            let Ok(Ok(d)) = tokio::time::timeout(Duration::from_millis(300), sub.next()).await
            else {
                break;
            };
            let env = d.envelope().clone();
            let entry = seen.entry(env.id).or_insert((0, env.clone()));
            entry.0 += 1;
            assert_eq!(entry.1, env, "a duplicate is the same envelope");
            d.ack().await.unwrap();
        }
        for id in &ids {
            assert!(seen.contains_key(id), "message {id} lost");
        }
        let stats = bus.stats();
        let dups = seen.values().filter(|(n, _)| *n > 1).count();
        assert!(dups > 0, "no duplicate seen");
        assert!(stats.duplicates.load(Ordering::Relaxed) > 0);
        assert!(stats.redeliveries.load(Ordering::Relaxed) > 0);
        assert!(stats.delays.load(Ordering::Relaxed) > 0);
        assert!(bus.inner().dead_letters("t", 10).await.unwrap().is_empty());
    }
}
