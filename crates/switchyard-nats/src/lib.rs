//! # switchyard-nats
//!
//! The NATS JetStream backend of the [`switchyard::Bus`] contract, for the distributed
//! mode: every service process connects to one nats-server (or cluster) instead of
//! sharing an embedded log.
//!
//! ```no_run
//! # async fn demo() -> switchyard::Result<()> {
//! use switchyard::{Bus, Envelope};
//! use switchyard_nats::{NatsBus, NatsConfig};
//!
//! let bus = NatsBus::new(NatsConfig::new("nats://127.0.0.1:4222"));
//! let e = Envelope::new("order.created.v1", "/orders", "application/json", "{}");
//! bus.publish("orders", e).await?;
//! # Ok(()) }
//! ```
//!
//! # Mapping (decision 0009)
//!
//! | contract | JetStream |
//! | --- | --- |
//! | topic `t` | stream `SY_<t escaped>` with the subjects `sy.t` (no subject) and `syp.t.<p>` (16 partitions by subject) |
//! | offset | the stream sequence |
//! | publisher dedup | `Nats-Msg-Id` = envelope id, the stream's duplicate window |
//! | durable publish | the JetStream publish ack is awaited |
//! | group | a durable pull consumer for `sy.t` and one per partition, explicit ack; the client counts attempts |
//! | ordering across processes | one owner per partition and group at a time: leases in a KV-layout stream (decision 0013) |
//! | attempt | the delivery count, minus deliveries that were no attempts (a ledger stream) |
//! | per-subject ordering | a sequencer per group in each bus parks a message while an earlier one of its subject is unsettled |
//! | ack_wait | the server's is at most 5 s; the bus keeps what it holds alive with `+WPI` for the lease's whole `ack_wait` |
//! | nack with delay | `-NAK` with a delay (policy backoff when none is given) |
//! | last attempt | the client publishes to the `<t>.dlq` stream, then terminates (`+TERM`) |
//! | transient channel | core NATS `syt.t` with queue groups; no responders = no subscribers |
//!
//! Durability is the server's: nats-server 2.9.10 (Debian) never fsyncs JetStream data,
//! so an acknowledged publish survives a crash of any client process and a restart of the
//! server, but not a power loss; run a server with `sync_interval: always` for that.
//!
//! Conformance: every case of the bus suite (23), the router suite (10, the SIGKILL cases
//! included) and the request/reply suite (11) passes against a real nats-server, with the
//! embedded store beside the bus; none is ignored and no gap is declared (the router's
//! crash children retry with a short backoff, so their idle window outlasts it: 11 of 11
//! runs of `router_killed_between_commit_and_ack_applies_the_effect_once` passed).
//!
//! **Not provided yet** (details in `docs/decisions/0009-nats-bus.md`):
//!
//! - **Ordering across processes holds, with the limits of leases** (decision 0013).
//!   Messages with a subject go to one of 16 partitions of their topic; each partition
//!   is pulled by one `NatsBus` per group at a time (see [`NatsBus::owned_partitions`]).
//!   An owner that stalls past the lease TTL (10 s), or whose connection blips, may
//!   overlap one handler with its successor's until its next renewal fails. A group
//!   consumer made before partitions existed must be deleted once.
//! - **Taking over is not polite to live members.** A new process redelivers what a live
//!   member of the group holds too; that member's settle still succeeds and the effect
//!   stays once through the inbox, but the message is handled twice.
//! - **Attempts.** A delivery lost in flight, or made ready but not handed out before its
//!   process died, still counts as an attempt.
//! - **The window.** The server's `max_ack_pending` is 4 × `max_pending` for the group's
//!   own consumer and that divided by 16 (at least 16) for each partition's, and the bus
//!   may hold that many messages in memory; a subject parked behind a backlog longer than
//!   its partition's window stalls the other subjects of the partition until it moves.
//!
//! | module | what |
//! | --- | --- |
//! | `names` | topic and group names to stream, consumer and subject names |
//! | `consumer` | the delivery source, settler, keep-alive and take-over of a group |
//! | `order` | per-subject ordering of a group's messages (a state machine, no I/O) |
//! | `lease` | partition leases: one owner per partition and group, fair share, drain, take-over |
//! | `ledger` | deliveries that were no attempts, in a stream used as a key-value store |
//! | `transient` | the transient channel on core NATS |
//! | `error` | this crate's error type |
//! | `registry` | (feature `registry`) the service registry on a JetStream KV bucket, for `switchyard-rpc` clients (decision 0010) |
//!
//! | feature | what it adds |
//! | --- | --- |
//! | `registry` | `registry::NatsRegistry`, a `switchyard_rpc::registry::Registry` on a KV bucket with TTL and heartbeats; pulls in `switchyard-rpc` (and the HTTP/gRPC stacks), so it is off by default |

mod ack;
mod consumer;
mod error;
mod lease;
mod ledger;
mod names;
mod order;
#[cfg(feature = "registry")]
pub mod registry;
mod transient;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy};
use async_trait::async_trait;
use switchyard::bus::{REPLAY_GROUP_EXTENSION, dlq_topic};
use switchyard::error::validate_name;
use switchyard::{
    Bus, Capabilities, DeadLetter, Envelope, Error, Published, ReplayFilter, Result, StartPosition,
    SubscribeOptions, Subscription, TransientSubscription,
};
use tokio::sync::{OnceCell, watch};

pub use error::{NatsError, NatsErrorKind};

use consumer::{Group, PARK_ROOM, Source};
use lease::Leases;
use ledger::Ledger;
use names::Names;

/// How to reach the server and how to lay out topics on it.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    /// Server URL, e.g. `nats://127.0.0.1:4222`.
    pub url: String,
    /// Optional namespace put into every stream and subject name, so several independent
    /// buses (tests, tenants) can share one server. Letters, digits, `-` and `_` only.
    pub namespace: Option<String>,
    /// Publisher-dedup window set on the streams this bus creates; zero turns publisher
    /// dedup off.
    pub dedup_window: Duration,
    /// Largest envelope accepted (see [`Envelope::encoded_len`]).
    pub max_message_bytes: usize,
    /// Capacity of one transient member's queue.
    pub transient_queue: usize,
}

impl NatsConfig {
    /// Defaults for `url`: no namespace, a 2-minute dedup window, 1 MiB messages.
    pub fn new(url: impl Into<String>) -> Self {
        NatsConfig {
            url: url.into(),
            namespace: None,
            dedup_window: Duration::from_secs(120),
            max_message_bytes: switchyard::bus::DEFAULT_MAX_MESSAGE_BYTES,
            transient_queue: switchyard::bus::DEFAULT_TRANSIENT_QUEUE,
        }
    }
}

/// A [`Bus`] on NATS JetStream. Cheap to clone; clones share one connection.
///
/// The connection is made on first use, so [`NatsBus::new`] never blocks; an unreachable
/// server shows as an `Unavailable` error from the first operation.
#[derive(Clone)]
pub struct NatsBus {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for NatsBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsBus")
            .field("url", &self.inner.config.url)
            .field("namespace", &self.inner.config.namespace)
            .finish()
    }
}

pub(crate) struct Inner {
    pub(crate) config: NatsConfig,
    pub(crate) names: Names,
    /// Deliveries that were no attempts.
    pub(crate) ledger: Ledger,
    /// Partition leases and group members (decision 0013).
    pub(crate) leases: Leases,
    conn: OnceCell<(async_nats::Client, jetstream::Context)>,
    /// Streams known to exist (created or looked up once), by topic. A plain lock: the
    /// publish path only reads it.
    streams: Mutex<HashMap<String, Arc<TopicStream>>>,
    /// Held while a stream is created or looked up, so each is asked for once.
    creating: tokio::sync::Mutex<()>,
    /// In-flight state of each (topic, group) used through this bus.
    groups: Mutex<HashMap<(String, String), Arc<Group>>>,
    pub(crate) closed: watch::Sender<bool>,
    /// Transient members dropped whose unsubscribe is not handed to the connection yet.
    pub(crate) leaving: watch::Sender<usize>,
    /// Transient members whose forwarding task still runs.
    pub(crate) live_members: watch::Sender<usize>,
}

/// A topic's stream, known to exist, and the subjects its messages are published to.
pub(crate) struct TopicStream {
    pub(crate) stream: jetstream::stream::Stream,
    /// Messages without a subject (and streams without partitions).
    subject: async_nats::Subject,
    /// The partition subjects, `partitions[p]` for partition `p` (decision 0013); empty
    /// for a stream whose layout has no partitions.
    partitions: Vec<async_nats::Subject>,
}

impl TopicStream {
    /// Where `e` is published: its subject's partition, or the topic's own subject.
    fn subject_for(&self, e: &Envelope) -> &async_nats::Subject {
        match (e.subject.as_deref(), self.partitions.len()) {
            (Some(key), n) if n > 0 => {
                let p = names::partition_of(key, u32::try_from(n).unwrap_or(u32::MAX));
                self.partitions.get(p as usize).unwrap_or(&self.subject)
            }
            _ => &self.subject,
        }
    }

    /// How many partitions the topic has (0: none).
    pub(crate) fn partition_count(&self) -> u32 {
        u32::try_from(self.partitions.len()).unwrap_or(0)
    }
}

/// Partitions of a topic created by this bus (decision 0013). Fixed at stream creation
/// and written into the stream's description, which every bus reads: a later default
/// never changes an existing topic's layout.
pub(crate) const DEFAULT_PARTITIONS: u32 = 16;

const PARTITIONS_TAG: &str = "switchyard partitions=";

/// The server window (`max_ack_pending`) of one partition consumer: the group's window
/// (`PARK_ROOM` × `max_pending`) divided among the partitions, at least 16.
fn partition_window(max_pending: usize, partitions: u32) -> usize {
    let window = max_pending.max(1).saturating_mul(PARK_ROOM);
    window.div_ceil(partitions.max(1) as usize).max(16)
}

/// The partition count a stream description records.
fn partitions_in(description: Option<&str>) -> Option<u32> {
    let d = description?;
    let at = d.find(PARTITIONS_TAG)? + PARTITIONS_TAG.len();
    let digits: String = d[at..].chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok().filter(|p| (1..=1024).contains(p))
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain maps behind the lock: a panic elsewhere leaves them consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl NatsBus {
    /// A bus for `config`; connects on first use.
    pub fn new(config: NatsConfig) -> Self {
        let names = Names::new(config.namespace.as_deref());
        NatsBus {
            inner: Arc::new(Inner {
                config,
                ledger: Ledger::new(names.ledger_stream(), names.ledger_subjects()),
                leases: Leases::new(names.lease_stream(), names.lease_subjects()),
                names,
                conn: OnceCell::new(),
                streams: Default::default(),
                creating: Default::default(),
                groups: Default::default(),
                closed: watch::channel(false).0,
                leaving: watch::channel(0).0,
                live_members: watch::channel(0).0,
            }),
        }
    }
}

impl NatsBus {
    /// The partitions of `topic` whose messages of `group` this bus pulls now (decision
    /// 0013): each partition has at most one such bus among the group's members. Empty
    /// before the first subscribe, for a topic without partitions, and after close.
    pub fn owned_partitions(&self, topic: &str, group: &str) -> Vec<u32> {
        let key = (topic.to_string(), group.to_string());
        match lock(&self.inner.groups).get(&key) {
            Some(g) => lease::owned(g),
            None => Vec::new(),
        }
    }
}

impl Inner {
    pub(crate) fn check_open(&self) -> Result<()> {
        if *self.closed.borrow() {
            return Err(Error::Closed);
        }
        Ok(())
    }

    fn check_size(&self, e: &Envelope) -> Result<()> {
        let size = e.encoded_len();
        let limit = self.config.max_message_bytes;
        if size > limit {
            return Err(Error::PayloadTooLarge { size, limit });
        }
        Ok(())
    }

    /// The connection's client, once connected (every held message came through it).
    pub(crate) fn client(&self) -> Result<&async_nats::Client> {
        match self.conn.get() {
            Some((client, _)) => Ok(client),
            None => Err(Error::Closed),
        }
    }

    /// The connection's JetStream context, once connected (usable while closing).
    pub(crate) fn js(&self) -> Result<&jetstream::Context> {
        match self.conn.get() {
            Some((_, js)) => Ok(js),
            None => Err(Error::Closed),
        }
    }

    pub(crate) async fn conn(&self) -> Result<&(async_nats::Client, jetstream::Context)> {
        self.check_open()?;
        if let Some(conn) = self.conn.get() {
            return Ok(conn);
        }
        // Boxed: connecting is a large future, and every caller's future (the publish
        // path's included) would otherwise carry its size and be copied with it.
        Box::pin(self.connect()).await
    }

    /// Connects once (concurrent callers wait for the first).
    async fn connect(&self) -> Result<&(async_nats::Client, jetstream::Context)> {
        self.conn
            .get_or_try_init(|| async {
                let client = async_nats::ConnectOptions::new()
                    .name("switchyard")
                    .connect(self.config.url.as_str())
                    .await
                    .map_err(|e| NatsError::connect(&self.config.url, e))?;
                let js = jetstream::new(client.clone());
                Ok::<_, Error>((client, js))
            })
            .await
    }

    /// The stream of `topic`, created when missing. After the first call for a topic this
    /// is a map lookup under a plain lock (no stream handle is cloned).
    pub(crate) async fn topic(&self, topic: &str) -> Result<Arc<TopicStream>> {
        if let Some(t) = self.known_topic(topic) {
            return Ok(t);
        }
        // Boxed for the same reason as `connect`: looking up or creating a stream is a
        // large future that the publish path's future would otherwise carry.
        Box::pin(self.create_topic(topic)).await
    }

    /// The stream of `topic` if this bus has used it before (its name was valid then).
    fn known_topic(&self, topic: &str) -> Option<Arc<TopicStream>> {
        lock(&self.streams).get(topic).cloned()
    }

    /// Looks up or creates the stream of `topic` (once, however many callers ask).
    async fn create_topic(&self, topic: &str) -> Result<Arc<TopicStream>> {
        let _creating = self.creating.lock().await;
        if let Some(t) = lock(&self.streams).get(topic) {
            return Ok(t.clone());
        }
        let (_, js) = self.conn().await?;
        let subject = self.names.subject(topic);
        let wildcard = self.names.partition_wildcard(topic);
        let config = jetstream::stream::Config {
            name: self.names.stream(topic),
            subjects: vec![subject.clone(), wildcard.clone()],
            description: Some(format!("{PARTITIONS_TAG}{DEFAULT_PARTITIONS}")),
            duplicate_window: self.config.dedup_window,
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        };
        let mut stream = js
            .get_or_create_stream(config)
            .await
            .map_err(|e| NatsError::stream(topic, e))?;
        let mut count = partitions_in(stream.cached_info().config.description.as_deref());
        if count.is_none() && !stream.cached_info().config.subjects.contains(&wildcard) {
            // A stream made before partitions existed: add them. Until every consumer
            // of the topic runs this version, its old group consumers (no subject
            // filter) would also see the partitioned messages.
            let mut config = stream.cached_info().config.clone();
            config.subjects.push(wildcard);
            config.description = Some(format!("{PARTITIONS_TAG}{DEFAULT_PARTITIONS}"));
            match js.update_stream(config).await {
                Ok(info) => {
                    count = partitions_in(info.config.description.as_deref());
                    stream = js
                        .get_stream(self.names.stream(topic))
                        .await
                        .map_err(|e| NatsError::stream(topic, e))?;
                }
                Err(e) => tracing::warn!(topic, error = %e,
                    "could not add partitions to an existing stream; its subjects are ordered per process only"),
            }
        }
        let partitions = (0..count.unwrap_or(0))
            .map(|p| self.names.partition_subject(topic, p).into())
            .collect();
        let t = Arc::new(TopicStream {
            stream,
            subject: subject.into(),
            partitions,
        });
        lock(&self.streams).insert(topic.to_string(), t.clone());
        Ok(t)
    }

    /// The stream of `topic` (a handle of its own), created when missing.
    pub(crate) async fn stream(&self, topic: &str) -> Result<jetstream::stream::Stream> {
        Ok(self.topic(topic).await?.stream.clone())
    }

    /// The payload and headers of `e`'s message: `headers` plus `Nats-Msg-Id` = `msg_id` or
    /// the envelope id (none when dedup is off); `None` when there is no header at all.
    fn message(
        &self,
        e: &Envelope,
        msg_id: Option<String>,
        mut headers: async_nats::HeaderMap,
    ) -> (bytes::Bytes, Option<async_nats::HeaderMap>) {
        // A window of zero means no dedup: the server would read a zero
        // `duplicate_window` as its default (2 minutes), so the id is not sent at all.
        let id = match msg_id {
            Some(id) => Some(id),
            None if !self.config.dedup_window.is_zero() => Some(
                e.id.0
                    .hyphenated()
                    .encode_lower(&mut uuid::Uuid::encode_buffer())
                    .to_owned(),
            ),
            None => None,
        };
        if let Some(id) = id {
            headers.insert(async_nats::header::NATS_MESSAGE_ID, id);
        }
        let headers = (!headers.is_empty()).then_some(headers);
        (e.to_bytes(), headers)
    }

    /// Sends `e` to `t`'s subject (its partition's when `route`; see [`Inner::message`]);
    /// the returned future resolves to the ack future. A plain function returning the
    /// client's future: the message is built before the first await.
    fn send<'a>(
        &self,
        js: &'a jetstream::Context,
        t: &TopicStream,
        e: &Envelope,
        route: bool,
        msg_id: Option<String>,
        headers: async_nats::HeaderMap,
    ) -> impl Future<
        Output = std::result::Result<
            jetstream::context::PublishAckFuture,
            jetstream::context::PublishError,
        >,
    > + 'a {
        let (payload, headers) = self.message(e, msg_id, headers);
        let mut publish = jetstream::context::Publish::build().payload(payload);
        if let Some(headers) = headers {
            publish = publish.headers(headers);
        }
        let subject = if route { t.subject_for(e) } else { &t.subject };
        js.send_publish(subject.clone(), publish)
    }

    /// Publishes one envelope (size checked by the caller) and awaits its ack; `route`
    /// sends a message with a subject to its partition (not for the DLQ, read in order).
    pub(crate) async fn publish_one(
        &self,
        topic: &str,
        e: &Envelope,
        route: bool,
        msg_id: Option<String>,
        headers: async_nats::HeaderMap,
    ) -> Result<Published> {
        let t = self.topic(topic).await?;
        self.publish_to(&t, topic, e, route, msg_id, headers).await
    }

    /// Publishes one envelope to the known stream `t` of `topic` (to its partition when
    /// `route`) and awaits its ack.
    async fn publish_to(
        &self,
        t: &TopicStream,
        topic: &str,
        e: &Envelope,
        route: bool,
        msg_id: Option<String>,
        headers: async_nats::HeaderMap,
    ) -> Result<Published> {
        let (client, _) = self.conn().await?;
        // The JetStream publish as the core request it is, its answer read by `ack::read`
        // (decision 0009, *Hot paths*). One timer bounds both the hand-over to the
        // connection (which waits while a reconnecting client's queue is full) and the ack.
        let (payload, headers) = self.message(e, msg_id, headers);
        let mut request = async_nats::Request::new().payload(payload).timeout(None);
        if let Some(headers) = headers {
            request = request.headers(headers);
        }
        let subject = if route { t.subject_for(e) } else { &t.subject };
        let answer = tokio::time::timeout(
            ack::ACK_TIMEOUT,
            client.send_request(subject.clone(), request),
        )
        .await
        .map_err(|_| NatsError::publish(topic, ack::AckError::TimedOut))?
        .map_err(|err| NatsError::publish(topic, err))?;
        let ack = ack::read(&answer.payload).map_err(|err| NatsError::publish(topic, err))?;
        Ok(Published {
            id: e.id,
            offset: ack.sequence,
            duplicate: ack.duplicate,
        })
    }

    /// Publishes `envelopes` to `topic` (sizes checked by the caller), sending all before
    /// awaiting the acks: one round trip for the batch.
    async fn publish_all(&self, topic: &str, envelopes: Vec<Envelope>) -> Result<Vec<Published>> {
        let t = self.topic(topic).await?;
        let (_, js) = self.conn().await?;
        let mut acks = Vec::with_capacity(envelopes.len());
        for e in &envelopes {
            let ack = self
                .send(js, &t, e, true, None, async_nats::HeaderMap::new())
                .await
                .map_err(|err| NatsError::publish(topic, err))?;
            acks.push(ack);
        }
        let mut out = Vec::with_capacity(acks.len());
        for (e, ack) in envelopes.iter().zip(acks) {
            let ack = ack.await.map_err(|err| NatsError::publish(topic, err))?;
            out.push(Published {
                id: e.id,
                offset: ack.sequence,
                duplicate: ack.duplicate,
            });
        }
        Ok(out)
    }

    /// The state of (`topic`, `group`) in this bus, and whether it was created now.
    fn group_state(
        &self,
        topic: &str,
        group: &str,
        options: &SubscribeOptions,
        partitions: u32,
    ) -> (Arc<Group>, bool) {
        let mut groups = lock(&self.groups);
        let key = (topic.to_string(), group.to_string());
        let (g, created) = match groups.get(&key) {
            Some(g) => (g.clone(), false),
            None => {
                let (stream, consumer) = (self.names.stream(topic), self.names.consumer(group));
                let key_prefix = format!("{stream}.{consumer}");
                // The default JetStream API prefix (`jetstream::new`), as async-nats uses.
                let next_subject = format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}");
                let g = Arc::new(Group::new(
                    topic,
                    group,
                    key_prefix,
                    next_subject,
                    partitions,
                ));
                groups.insert(key, g.clone());
                (g, true)
            }
        };
        g.set_settings(options.redelivery.clone(), options.ack_wait);
        (g, created)
    }
}

#[async_trait]
impl Bus for NatsBus {
    fn capabilities(&self) -> Capabilities {
        // Durable, CrashSafe (a SIGKILL of a client loses nothing acknowledged), Reopen
        // and bounded memory all hold: the server keeps the data and the positions. Power
        // loss is another matter (no `Capability` names it): see the crate docs.
        Capabilities::all()
    }

    async fn publish(&self, topic: &str, envelope: Envelope) -> Result<Published> {
        self.inner.check_open()?;
        // A topic this bus has a stream for was valid when it was first used.
        let known = self.inner.known_topic(topic);
        if known.is_none() {
            validate_name("topic", topic)?;
        }
        self.inner.check_size(&envelope)?;
        let t = match known {
            Some(t) => t,
            None => self.inner.topic(topic).await?,
        };
        self.inner
            .publish_to(
                &t,
                topic,
                &envelope,
                true,
                None,
                async_nats::HeaderMap::new(),
            )
            .await
    }

    async fn publish_batch(&self, topic: &str, envelopes: Vec<Envelope>) -> Result<Vec<Published>> {
        self.inner.check_open()?;
        validate_name("topic", topic)?;
        for e in &envelopes {
            self.inner.check_size(e)?;
        }
        self.inner.publish_all(topic, envelopes).await
    }

    async fn subscribe(
        &self,
        topic: &str,
        group: &str,
        options: SubscribeOptions,
    ) -> Result<Subscription> {
        self.inner.check_open()?;
        validate_name("topic", topic)?;
        validate_name("group", group)?;
        if group.starts_with('$') {
            return Err(Error::InvalidName {
                what: "group",
                name: group.to_string(),
                reason: "names starting with `$` are reserved for the bus",
            });
        }
        let t = self.inner.topic(topic).await?;
        let stream = t.stream.clone();
        let partitions = t.partition_count();
        let config = jetstream::consumer::pull::Config {
            durable_name: Some(self.inner.names.consumer(group)),
            // With partitions, the group's own consumer takes the topic's own subject
            // (messages without a subject); each partition has a consumer of its own.
            filter_subject: if partitions > 0 {
                self.inner.names.subject(topic)
            } else {
                String::new()
            },
            ack_policy: AckPolicy::Explicit,
            // At most `LIVENESS`: this bus keeps what it holds alive with `+WPI`, so what a
            // dead process held comes back soon; the lease itself is kept by the bus.
            ack_wait: consumer::server_ack_wait(options.ack_wait),
            // Unlimited: the client counts attempts and dead-letters the delivery after
            // the last one (an ack timeout on the last attempt).
            max_deliver: -1,
            // Room for messages parked behind their subject, so other subjects still flow.
            max_ack_pending: i64::try_from(options.max_pending.max(1).saturating_mul(PARK_ROOM))
                .unwrap_or(i64::MAX),
            deliver_policy: match options.start {
                StartPosition::Earliest => DeliverPolicy::All,
                StartPosition::Latest => DeliverPolicy::New,
            },
            ..Default::default()
        };
        let consumer = match stream.create_consumer(config.clone()).await {
            Ok(c) => c,
            // An existing group whose settings cannot change (e.g. its start): keep it.
            Err(first) => stream
                .get_consumer(&self.inner.names.consumer(group))
                .await
                .map_err(|_| NatsError::consumer(topic, group, first))?,
        };
        if consumer.cached_info().config.filter_subject != config.filter_subject {
            tracing::warn!(
                topic,
                group,
                "the group's consumer predates partitions (no subject filter): its members also get partitioned messages, ordered per process only; delete the consumer to fix it"
            );
        }
        // One consumer per partition, all made now so they start where the group does.
        for p in 0..partitions {
            let name = self.inner.names.partition_consumer(group, p);
            let config = jetstream::consumer::pull::Config {
                durable_name: Some(name.clone()),
                filter_subject: self.inner.names.partition_subject(topic, p),
                // The group's window shared by its partitions (so a bus holding them
                // all holds at most twice the window of a group without partitions).
                max_ack_pending: i64::try_from(partition_window(options.max_pending, partitions))
                    .unwrap_or(i64::MAX),
                ..config.clone()
            };
            if let Err(first) = stream.create_consumer(config).await {
                stream
                    .get_consumer::<jetstream::consumer::pull::Config>(&name)
                    .await
                    .map_err(|_| NatsError::consumer(topic, group, first))?;
            }
        }
        let (g, created) = self.inner.group_state(topic, group, &options, partitions);
        if created {
            let state = g.base.clone();
            state.set_inherited(consumer.cached_info().num_ack_pending);
            let (client, _) = self.inner.conn().await?;
            consumer::spawn_keep_alive(
                state.clone(),
                Arc::downgrade(&self.inner),
                client.clone(),
                self.inner.closed.subscribe(),
            );
            // What another process holds unsettled (a killed one) comes back now, before
            // any later message of the group.
            if let Err(e) = consumer::take_over(
                client,
                &self.inner.names.stream(topic),
                &self.inner.names.consumer(group),
                consumer.cached_info(),
            )
            .await
            {
                tracing::warn!(topic, group, error = %e,
                    "could not take over the group's unsettled messages; they come back after the server's ack_wait");
            }
        }
        let source = Source::new(self.inner.clone(), g.clone());
        if created && partitions > 0 {
            lease::spawn(
                Arc::downgrade(&self.inner),
                g,
                self.inner.closed.subscribe(),
            );
        }
        Ok(Subscription::new(Box::new(source)))
    }

    async fn dead_letters(&self, topic: &str, limit: usize) -> Result<Vec<DeadLetter>> {
        self.inner.check_open()?;
        validate_name("topic", topic)?;
        let entries = consumer::read_dead_letters(&self.inner, topic, limit).await?;
        Ok(entries.into_iter().map(|(_, d)| d).collect())
    }

    async fn replay_dead_letters(&self, topic: &str, filter: ReplayFilter) -> Result<usize> {
        self.inner.check_open()?;
        validate_name("topic", topic)?;
        let entries = consumer::read_dead_letters(&self.inner, topic, usize::MAX).await?;
        let dlq = self.inner.stream(&dlq_topic(topic)).await?;
        let mut replayed = 0;
        for (seq, dl) in entries {
            let group_ok = filter.group.as_deref().is_none_or(|g| g == dl.group);
            let id_ok = filter
                .ids
                .as_ref()
                .is_none_or(|ids| ids.contains(&dl.envelope.id));
            if !(group_ok && id_ok && dl.topic == topic) {
                continue;
            }
            let mut e = dl.envelope;
            e.extensions
                .insert(REPLAY_GROUP_EXTENSION.to_string(), dl.group.clone());
            // A fresh dedup key: the original id is still within the window.
            let msg_id = format!("{}.replay.{seq}", e.id);
            // Published first, then removed from the DLQ: a crash between the two replays
            // twice (at least once), never zero times.
            self.inner
                .publish_one(topic, &e, true, Some(msg_id), async_nats::HeaderMap::new())
                .await?;
            dlq.delete_message(seq)
                .await
                .map_err(|err| NatsError::stream(&dlq_topic(topic), err))?;
            replayed += 1;
        }
        if replayed > 0 {
            tracing::info!(topic, replayed, group = ?filter.group, "replayed dead letters");
        }
        Ok(replayed)
    }

    async fn publish_transient(&self, topic: &str, envelope: Envelope) -> Result<()> {
        self.inner.check_open()?;
        validate_name("topic", topic)?;
        self.inner.check_size(&envelope)?;
        transient::publish(&self.inner, topic, envelope).await
    }

    async fn subscribe_transient(&self, topic: &str, group: &str) -> Result<TransientSubscription> {
        self.inner.check_open()?;
        validate_name("topic", topic)?;
        validate_name("group", group)?;
        transient::subscribe(&self.inner, topic, group).await
    }

    async fn close(&self) -> Result<()> {
        if self.inner.closed.send_replace(true) {
            return Ok(());
        }
        let Some((client, _)) = self.inner.conn.get() else {
            return Ok(());
        };
        // Transient members unsubscribe; wait for them (bounded).
        let mut live = self.inner.live_members.subscribe();
        let _ = tokio::time::timeout(Duration::from_secs(5), live.wait_for(|n| *n == 0)).await;
        // Unsettled deliveries go back to the group now instead of after their ack_wait.
        let groups: Vec<_> = lock(&self.inner.groups).values().cloned().collect();
        for g in &groups {
            g.release_all(&self.inner).await;
        }
        // A barrier: the server has processed every ack, nak and unsubscribe sent above,
        // so a bus opened next on another connection sees their effect.
        transient::round_trip(client, None)
            .await
            .map_err(|e| Error::Unavailable(format!("closing the NATS bus: {e}")))?;
        // Only then are the partitions free for other members (their messages are back).
        for g in &groups {
            lease::release(&self.inner, g).await;
        }
        if let Err(e) = client.drain().await {
            tracing::debug!(error = %e, "draining the NATS connection on close");
        }
        Ok(())
    }
}
