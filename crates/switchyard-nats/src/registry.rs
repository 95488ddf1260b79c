//! The service registry on NATS (feature `registry`): services register their HTTP or
//! gRPC endpoints when they start and disappear when they stop or die; clients of
//! `switchyard-rpc` read it through [`switchyard_rpc::registry::Registry`].
//!
//! # How it works (decision 0010)
//!
//! - One JetStream key-value bucket (default [`DEFAULT_BUCKET`]), history 1, whose
//!   `max_age` is the **TTL** of an entry. Key `<service>.<instance id>`, value JSON
//!   `{"url": "...", "metadata": {...}}`.
//! - [`NatsRegistry::register`] puts the entry and starts a heartbeat that puts it again
//!   every `heartbeat` (default TTL / 3). [`Registration::stop`] (or dropping the
//!   [`Registration`]) ends the heartbeat and deletes the entry: watchers drop it at once.
//! - A process that dies stops its heartbeat: the server removes the entry `max_age` after
//!   its last put, and every watcher drops it when it has not seen a put of it for one TTL
//!   (the server does not announce expiries). **Bound: a dead instance is gone from every
//!   connected client within one TTL of its last heartbeat**, so at most TTL after its death.
//! - Each [`NatsRegistry`] runs one watcher task: it replays the bucket (the last value of
//!   every key) into a local view, then follows changes; [`Registry::instances`] is a
//!   lock and an `Arc` clone, and returns the same `Arc` until the set of a service changes.
//! - While a client is disconnected from the server it keeps its last view (stale rather
//!   than empty) and expires nothing; after it reconnects, every entry gets a full TTL to
//!   be heard from again. A watch that fails is rebuilt from a fresh replay. Registrations
//!   keep putting through a server restart, so their entries come back within one
//!   heartbeat of the reconnect.
//!
//! The TTL is the bucket's: the first process to create the bucket sets it from
//! [`RegistryConfig::ttl`]; later processes read it from the bucket (and derive their
//! heartbeat from it), so every participant agrees.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream;
use async_nats::jetstream::kv::{self, Operation};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use switchyard_rpc::registry::{Instance, Registry};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::lock;

/// The bucket the registry uses unless configured otherwise.
pub const DEFAULT_BUCKET: &str = "sy_registry";

/// The TTL used when this process creates the bucket.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);

/// How long the first replay of a watch may stay silent before the view is taken as
/// complete (entries can expire between the bucket's count and the replay).
const REPLAY_IDLE: Duration = Duration::from_secs(2);

/// Pause before a failed watch is rebuilt.
const REWATCH_PAUSE: Duration = Duration::from_millis(250);

/// How to reach the server and which bucket to use.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// Server URL, e.g. `nats://127.0.0.1:4222`.
    pub url: String,
    /// The key-value bucket; letters, digits, `-` and `_`.
    pub bucket: String,
    /// Entry TTL (the bucket's `max_age`), used only when this process creates the bucket.
    pub ttl: Duration,
    /// Heartbeat period of registrations; default: the bucket's TTL / 3.
    pub heartbeat: Option<Duration>,
}

impl RegistryConfig {
    /// Defaults for `url`: bucket [`DEFAULT_BUCKET`], TTL [`DEFAULT_TTL`], heartbeat TTL / 3.
    pub fn new(url: impl Into<String>) -> Self {
        RegistryConfig {
            url: url.into(),
            bucket: DEFAULT_BUCKET.to_string(),
            ttl: DEFAULT_TTL,
            heartbeat: None,
        }
    }
}

/// What failed, to branch on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RegistryErrorKind {
    /// The server could not be reached.
    Connect,
    /// The bucket could not be created or read.
    Bucket,
    /// The bucket could not be watched.
    Watch,
    /// An entry could not be put.
    Register,
    /// An entry could not be deleted.
    Deregister,
    /// A service name, instance id or URL is not usable.
    Invalid,
}

/// A registry failure; the message says what to check.
#[derive(Debug, thiserror::Error)]
#[error("{what}{}", .source.as_ref().map(|s| format!(": {s}")).unwrap_or_default())]
pub struct RegistryError {
    kind: RegistryErrorKind,
    what: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl RegistryError {
    /// The kind of failure.
    pub fn kind(&self) -> RegistryErrorKind {
        self.kind
    }

    fn new(
        kind: RegistryErrorKind,
        what: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        RegistryError {
            kind,
            what: what.into(),
            source: Some(source.into()),
        }
    }

    fn invalid(what: String) -> Self {
        RegistryError {
            kind: RegistryErrorKind::Invalid,
            what,
            source: None,
        }
    }
}

/// Options of one registration.
#[derive(Debug, Clone, Default)]
pub struct RegisterOptions {
    /// The instance id (letters, digits, `-`, `_`); default: unique per registration. A
    /// stable id lets a restarted instance replace the entry of its previous life.
    pub id: Option<String>,
    /// Free-form metadata stored with the entry (zone, version, protocol, ...).
    pub metadata: BTreeMap<String, String>,
}

/// One registered instance as a watcher sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisteredInstance {
    /// The service name.
    pub service: String,
    /// The instance id.
    pub id: String,
    /// The base URL.
    pub url: String,
    /// The metadata it registered with.
    pub metadata: BTreeMap<String, String>,
    /// The bucket revision of its latest put (grows with every heartbeat).
    pub revision: u64,
}

/// The stored value of an entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    url: String,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
}

/// One entry in the local view.
#[derive(Debug, Clone)]
struct Local {
    record: Record,
    revision: u64,
    /// When its latest put was made, on this process's clock (estimated for a replay).
    seen: Instant,
}

/// The instances of one service and the snapshot handed out.
#[derive(Debug)]
struct ServiceView {
    by_id: BTreeMap<String, Local>,
    snapshot: Arc<[Instance]>,
}

impl ServiceView {
    fn build(by_id: BTreeMap<String, Local>) -> Self {
        let snapshot = by_id
            .values()
            .map(|l| Instance::new(l.record.url.as_str()))
            .collect();
        ServiceView { by_id, snapshot }
    }
}

/// What the watcher task and the readers share.
struct Shared {
    view: Mutex<HashMap<String, ServiceView>>,
    empty: Arc<[Instance]>,
    /// Bumped whenever a service's snapshot changes.
    generation: watch::Sender<u64>,
}

impl Shared {
    /// Replaces the instances of `service` (none: removes it); bumps the generation when
    /// the snapshot changes, keeping the old `Arc` when the list of URLs is the same.
    fn set_service(&self, service: &str, by_id: BTreeMap<String, Local>) {
        let mut view = lock(&self.view);
        if by_id.is_empty() {
            if view.remove(service).is_some() {
                drop(view);
                self.generation.send_modify(|g| *g += 1);
            }
            return;
        }
        let new = ServiceView::build(by_id);
        let changed = match view.get_mut(service) {
            Some(old) if *old.snapshot == *new.snapshot => {
                old.by_id = new.by_id;
                false
            }
            _ => {
                view.insert(service.to_string(), new);
                true
            }
        };
        drop(view);
        if changed {
            self.generation.send_modify(|g| *g += 1);
        }
    }

    fn service(&self, service: &str) -> BTreeMap<String, Local> {
        lock(&self.view)
            .get(service)
            .map(|s| s.by_id.clone())
            .unwrap_or_default()
    }

    fn services(&self) -> Vec<String> {
        lock(&self.view).keys().cloned().collect()
    }
}

/// A distributed [`Registry`] on a JetStream key-value bucket. Cheap to clone; clones
/// share one connection and one watcher, which stops when the last clone is dropped.
#[derive(Clone)]
pub struct NatsRegistry {
    inner: Arc<RegistryInner>,
}

struct RegistryInner {
    shared: Arc<Shared>,
    kv: kv::Store,
    ttl: Duration,
    heartbeat: Duration,
    watcher: JoinHandle<()>,
}

impl Drop for RegistryInner {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

impl std::fmt::Debug for NatsRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsRegistry")
            .field("bucket", &self.inner.kv.name)
            .field("ttl", &self.inner.ttl)
            .field("heartbeat", &self.inner.heartbeat)
            .finish()
    }
}

fn valid_token(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn check_token(what: &str, s: &str) -> Result<(), RegistryError> {
    if valid_token(s) {
        Ok(())
    } else {
        Err(RegistryError::invalid(format!(
            "invalid {what} `{s}`: use letters, digits, `-` and `_` only"
        )))
    }
}

/// A unique instance id: the process id and 64 random bits.
fn unique_id() -> String {
    use std::hash::{BuildHasher, RandomState};
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let r = RandomState::new().hash_one((std::process::id(), nanos));
    format!("{}-{r:016x}", std::process::id())
}

impl NatsRegistry {
    /// Connects, opens (or creates) the bucket and replays it: when this returns,
    /// [`Registry::instances`] already lists every live registration.
    pub async fn connect(config: RegistryConfig) -> Result<Self, RegistryError> {
        let client = async_nats::ConnectOptions::new()
            .name("switchyard-registry")
            .connect(config.url.as_str())
            .await
            .map_err(|e| {
                RegistryError::new(
                    RegistryErrorKind::Connect,
                    format!(
                        "connecting to nats-server at {} (is it running, with `-js`?)",
                        config.url
                    ),
                    e,
                )
            })?;
        Self::with_client(client, config).await
    }

    /// Like [`NatsRegistry::connect`] on an existing connection (`config.url` unused).
    pub async fn with_client(
        client: async_nats::Client,
        config: RegistryConfig,
    ) -> Result<Self, RegistryError> {
        if !config
            .bucket
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            || config.bucket.is_empty()
        {
            return Err(RegistryError::invalid(format!(
                "invalid bucket name `{}`",
                config.bucket
            )));
        }
        let js = jetstream::new(client.clone());
        let kv = open_bucket(&js, &config).await?;
        let bucket_err = |e| {
            RegistryError::new(
                RegistryErrorKind::Bucket,
                format!("reading the registry bucket `{}`", config.bucket),
                e,
            )
        };
        let status = kv.status().await.map_err(bucket_err)?;
        // A bucket without max_age never expires dead entries: fall back to ours locally.
        let ttl = match status.max_age() {
            d if d.is_zero() => config.ttl,
            d => d,
        };
        let heartbeat = config
            .heartbeat
            .unwrap_or(ttl / 3)
            .max(Duration::from_millis(10));
        let shared = Arc::new(Shared {
            view: Default::default(),
            empty: Arc::from(Vec::new()),
            generation: watch::channel(0).0,
        });
        let watcher = Watcher {
            shared: shared.clone(),
            kv: kv.clone(),
            client,
            ttl,
        };
        let w = watcher.replay().await?;
        let task = tokio::spawn(watcher.run(w));
        Ok(NatsRegistry {
            inner: Arc::new(RegistryInner {
                shared,
                kv,
                ttl,
                heartbeat,
                watcher: task,
            }),
        })
    }

    /// The TTL of an entry (the bucket's `max_age`): the bound on how long a dead
    /// instance stays listed after its last heartbeat.
    pub fn ttl(&self) -> Duration {
        self.inner.ttl
    }

    /// The heartbeat period of registrations made through this registry.
    pub fn heartbeat(&self) -> Duration {
        self.inner.heartbeat
    }

    /// Registers `url` as an instance of `service` (a fresh instance id, no metadata).
    pub async fn register(&self, service: &str, url: &str) -> Result<Registration, RegistryError> {
        self.register_with(service, url, RegisterOptions::default())
            .await
    }

    /// Registers `url` as an instance of `service`; the entry is put before this returns
    /// and kept alive by a heartbeat until the [`Registration`] is stopped or dropped.
    pub async fn register_with(
        &self,
        service: &str,
        url: &str,
        options: RegisterOptions,
    ) -> Result<Registration, RegistryError> {
        check_token("service name", service)?;
        let id = options.id.unwrap_or_else(unique_id);
        check_token("instance id", &id)?;
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(RegistryError::invalid(format!(
                "invalid instance URL `{url}`: expected http://host:port or https://..."
            )));
        }
        let record = Record {
            url: Instance::new(url).url,
            metadata: options.metadata,
        };
        let value = bytes::Bytes::from(serde_json::to_vec(&record).map_err(|e| {
            RegistryError::new(RegistryErrorKind::Invalid, "encoding the entry", e)
        })?);
        let key = format!("{service}.{id}");
        self.inner.kv.put(&key, value.clone()).await.map_err(|e| {
            RegistryError::new(
                RegistryErrorKind::Register,
                format!("registering `{key}`"),
                e,
            )
        })?;
        let heartbeat = tokio::spawn(heartbeat(
            self.inner.kv.clone(),
            key.clone(),
            value,
            self.inner.heartbeat,
        ));
        tracing::info!(service, id, url, "registered");
        Ok(Registration {
            kv: self.inner.kv.clone(),
            service: service.to_string(),
            id,
            heartbeat: Some(heartbeat),
        })
    }

    /// Every instance of `service` with its id, metadata and revision, ordered by id.
    pub fn entries(&self, service: &str) -> Vec<RegisteredInstance> {
        self.inner
            .shared
            .service(service)
            .into_iter()
            .map(|(id, l)| RegisteredInstance {
                service: service.to_string(),
                id,
                url: l.record.url,
                metadata: l.record.metadata,
                revision: l.revision,
            })
            .collect()
    }

    /// The services with at least one instance.
    pub fn services(&self) -> Vec<String> {
        let mut v = self.inner.shared.services();
        v.sort_unstable();
        v
    }

    /// A receiver of a counter that grows whenever the instances of a service change,
    /// to wait for a change without polling.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.inner.shared.generation.subscribe()
    }
}

impl Registry for NatsRegistry {
    fn instances(&self, service: &str) -> Arc<[Instance]> {
        let shared = &self.inner.shared;
        lock(&shared.view)
            .get(service)
            .map(|s| s.snapshot.clone())
            .unwrap_or_else(|| shared.empty.clone())
    }
}

/// Opens the bucket, creating it when missing (a concurrent creator is tolerated).
///
/// The bucket's stream is created directly with the settings async-nats gives a KV bucket
/// (`create_key_value` first asks for the account info, whose answer from nats-server
/// 2.9 async-nats 0.42 cannot parse).
async fn open_bucket(
    js: &jetstream::Context,
    config: &RegistryConfig,
) -> Result<kv::Store, RegistryError> {
    if let Ok(kv) = js.get_key_value(config.bucket.as_str()).await {
        return Ok(kv);
    }
    let created = js
        .create_stream(jetstream::stream::Config {
            name: format!("KV_{}", config.bucket),
            description: Some("switchyard service registry".into()),
            subjects: vec![format!("$KV.{}.>", config.bucket)],
            max_messages_per_subject: 1,
            max_age: config.ttl,
            storage: jetstream::stream::StorageType::File,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            discard: jetstream::stream::DiscardPolicy::New,
            num_replicas: 1,
            ..Default::default()
        })
        .await;
    let failed = |e: Box<dyn std::error::Error + Send + Sync>| {
        RegistryError::new(
            RegistryErrorKind::Bucket,
            format!(
                "creating the registry bucket `{}` (is JetStream enabled?)",
                config.bucket
            ),
            e,
        )
    };
    match js.get_key_value(config.bucket.as_str()).await {
        Ok(kv) => Ok(kv),
        Err(e) => Err(match created {
            Err(first) => failed(first.into()),
            Ok(_) => failed(e.into()),
        }),
    }
}

/// Puts the entry every `period` until aborted; failures are logged and retried.
async fn heartbeat(kv: kv::Store, key: String, value: bytes::Bytes, period: Duration) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tick.tick().await;
        match kv.put(&key, value.clone()).await {
            Ok(_) => {
                if failing {
                    tracing::info!(key, "registry heartbeat succeeds again");
                }
                failing = false;
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(key, error = %e, "registry heartbeat failed; retrying every period");
                }
                failing = true;
            }
        }
    }
}

/// An instance's registration: heartbeats until stopped; deletes its entry on
/// [`Registration::stop`] or (in the background) on drop.
#[derive(Debug)]
pub struct Registration {
    kv: kv::Store,
    service: String,
    id: String,
    heartbeat: Option<JoinHandle<()>>,
}

impl Registration {
    /// The service name.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The instance id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Ends the heartbeat and deletes the entry; watchers drop the instance when they see
    /// the deletion (no TTL wait).
    pub async fn stop(mut self) -> Result<(), RegistryError> {
        let key = format!("{}.{}", self.service, self.id);
        if let Some(h) = self.heartbeat.take() {
            h.abort();
            // Wait for it to end, so no put of it can follow the delete.
            let _ = h.await;
        }
        self.kv.delete(&key).await.map_err(|e| {
            RegistryError::new(
                RegistryErrorKind::Deregister,
                format!("deregistering `{key}` (it expires after the TTL anyway)"),
                e,
            )
        })?;
        tracing::info!(service = %self.service, id = %self.id, "deregistered");
        Ok(())
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let Some(h) = self.heartbeat.take() else {
            return;
        };
        h.abort();
        let key = format!("{}.{}", self.service, self.id);
        let kv = self.kv.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    let _ = h.await;
                    if let Err(e) = kv.delete(&key).await {
                        tracing::warn!(key, error = %e, "deregistering on drop failed; the entry expires after the TTL");
                    }
                });
            }
            Err(_) => {
                tracing::warn!(
                    key,
                    "registration dropped outside a runtime; the entry expires after the TTL"
                );
            }
        }
    }
}

/// The watcher task: keeps [`Shared::view`] equal to the bucket.
struct Watcher {
    shared: Arc<Shared>,
    kv: kv::Store,
    client: async_nats::Client,
    ttl: Duration,
}

/// A watch entry decoded: service, id, and the record (None: deleted).
fn decode(entry: &kv::Entry) -> Option<(String, String, Option<Record>)> {
    let (service, id) = entry.key.split_once('.')?;
    let record = match entry.operation {
        Operation::Put => match serde_json::from_slice::<Record>(&entry.value) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(key = %entry.key, error = %e, "undecodable registry entry ignored");
                return None;
            }
        },
        Operation::Delete | Operation::Purge => None,
    };
    Some((service.to_string(), id.to_string(), record))
}

impl Watcher {
    /// Starts a watch of every key with the last value of each, reads the replay into a
    /// fresh view and installs it; returns the watch to follow.
    async fn replay(&self) -> Result<kv::Watch, RegistryError> {
        let watch_err = |e: Box<dyn std::error::Error + Send + Sync>| {
            RegistryError::new(
                RegistryErrorKind::Watch,
                format!("watching the registry bucket `{}`", self.kv.name),
                e,
            )
        };
        let mut w = self
            .kv
            .watch_with_history(">")
            .await
            .map_err(|e| watch_err(e.into()))?;
        let stored = self
            .kv
            .status()
            .await
            .map_err(|e| {
                RegistryError::new(
                    RegistryErrorKind::Bucket,
                    format!("reading the registry bucket `{}`", self.kv.name),
                    e,
                )
            })?
            .values();
        let mut fresh: HashMap<String, BTreeMap<String, Local>> = HashMap::new();
        let now = Instant::now();
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as i128)
            .unwrap_or(0);
        let mut done = stored == 0;
        while !done {
            let entry = match tokio::time::timeout(REPLAY_IDLE, w.next()).await {
                // Nothing more arrived: what was counted expired meanwhile.
                Err(_) => break,
                Ok(None) => return Err(watch_err("the watch ended during its replay".into())),
                Ok(Some(Err(e))) => return Err(watch_err(e.into())),
                Ok(Some(Ok(e))) => e,
            };
            done = entry.delta == 0 || entry.seen_current;
            let Some((service, id, record)) = decode(&entry) else {
                continue;
            };
            let ids = fresh.entry(service.clone()).or_default();
            match record {
                None => {
                    ids.remove(&id);
                }
                Some(record) => {
                    // Keep what this process knows of an entry it saw already; otherwise
                    // its age is the server's timestamp against our clock (at most a TTL).
                    let known = self
                        .shared
                        .service(&service)
                        .get(&id)
                        .filter(|l| l.revision == entry.revision)
                        .map(|l| l.seen);
                    let seen = match known {
                        Some(seen) => seen,
                        None => {
                            let age_ns = (wall - entry.created.unix_timestamp_nanos()).max(0);
                            let age =
                                Duration::from_nanos(u64::try_from(age_ns).unwrap_or(u64::MAX));
                            // Silent for a TTL: its process is gone. The server removes it
                            // too, but not necessarily at once (nats-server 2.15 still
                            // replayed such entries), so a fresh view must not list it.
                            if age >= self.ttl {
                                ids.remove(&id);
                                continue;
                            }
                            now.checked_sub(age).unwrap_or(now)
                        }
                    };
                    ids.insert(
                        id,
                        Local {
                            record,
                            revision: entry.revision,
                            seen,
                        },
                    );
                }
            }
        }
        let mut gone = self.shared.services();
        gone.retain(|s| !fresh.contains_key(s));
        for s in gone {
            self.shared.set_service(&s, BTreeMap::new());
        }
        for (s, ids) in fresh {
            self.shared.set_service(&s, ids);
        }
        Ok(w)
    }

    /// Follows the watch; rebuilds it from a replay when it fails; expires silent entries.
    async fn run(self, mut w: kv::Watch) {
        let sweep_every = (self.ttl / 10).clamp(Duration::from_millis(20), Duration::from_secs(1));
        let mut sweep = tokio::time::interval(sweep_every);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Since when the connection is up (None: down); entries get a full TTL after it.
        let mut connected_since = Some(Instant::now());
        loop {
            let failed = tokio::select! {
                entry = w.next() => match entry {
                    Some(Ok(entry)) => {
                        self.apply(&entry);
                        None
                    }
                    Some(Err(e)) => Some(e.to_string()),
                    None => Some("the watch ended".to_string()),
                },
                _ = sweep.tick() => {
                    let up = self.client.connection_state() == async_nats::connection::State::Connected;
                    match (up, connected_since) {
                        (false, _) => connected_since = None,
                        (true, None) => connected_since = Some(Instant::now()),
                        (true, Some(since)) => self.expire(since),
                    }
                    None
                }
            };
            if let Some(reason) = failed {
                tracing::warn!(bucket = %self.kv.name, reason, "registry watch failed; rebuilding it");
                loop {
                    tokio::time::sleep(REWATCH_PAUSE).await;
                    match self.replay().await {
                        Ok(new) => {
                            w = new;
                            break;
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "rebuilding the registry watch failed; retrying")
                        }
                    }
                }
            }
        }
    }

    fn apply(&self, entry: &kv::Entry) {
        let Some((service, id, record)) = decode(entry) else {
            return;
        };
        let mut ids = self.shared.service(&service);
        match record {
            Some(record) => {
                ids.insert(
                    id,
                    Local {
                        record,
                        revision: entry.revision,
                        seen: Instant::now(),
                    },
                );
            }
            None => {
                ids.remove(&id);
            }
        }
        self.shared.set_service(&service, ids);
    }

    /// Drops entries not put for a TTL (counting from `since`, when the connection last
    /// came up).
    fn expire(&self, since: Instant) {
        let now = Instant::now();
        let stale: Vec<(String, BTreeMap<String, Local>)> = {
            let view = lock(&self.shared.view);
            view.iter()
                .filter(|(_, s)| {
                    s.by_id
                        .values()
                        .any(|l| now.duration_since(l.seen.max(since)) >= self.ttl)
                })
                .map(|(name, s)| {
                    let mut ids = s.by_id.clone();
                    ids.retain(|_, l| now.duration_since(l.seen.max(since)) < self.ttl);
                    (name.clone(), ids)
                })
                .collect()
        };
        for (service, ids) in stale {
            tracing::info!(service, "registry entries expired (no heartbeat for a TTL)");
            self.shared.set_service(&service, ids);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(valid_token("payment"));
        assert!(valid_token("pay-ment_2"));
        assert!(!valid_token(""));
        assert!(!valid_token("a.b"));
        assert!(!valid_token("a*"));
        assert!(valid_token(&unique_id()));
        assert_ne!(unique_id(), unique_id());
    }

    #[test]
    fn record_round_trips_and_tolerates_missing_metadata() {
        let r: Record = serde_json::from_str(r#"{"url":"http://127.0.0.1:1"}"#).unwrap();
        assert!(r.metadata.is_empty());
        let back: Record = serde_json::from_slice(&serde_json::to_vec(&r).unwrap()).unwrap();
        assert_eq!(back, r);
    }
}
