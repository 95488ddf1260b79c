//! Partition leases (decision 0013): at any moment one bus per group pulls a partition of
//! a topic, so every unsettled message of a subject is held by one process.
//!
//! Leases and group members live in a stream used as a key-value store (one subject per
//! key, the last value kept), as the ledger does: async-nats' key-value calls fail
//! against nats-server 2.9.10. A lease is taken and renewed by compare-and-set
//! (`Nats-Expected-Last-Subject-Sequence` = the revision read), released by writing it
//! empty. A lease is free to take when it is empty, when its holder's ping subject has
//! no responders (its connection is gone: killed or closed), or when its revision has
//! not changed for [`TTL`] as seen by this bus's own clock (a holder that stalls; no
//! clocks are compared across machines).
//!
//! Each bus aims at `ceil(P / members)` partitions of a group: it takes free or expired
//! ones up to that share and, above it, *drains* one partition per tick (stops pulling
//! it, waits for its deliveries in flight, hands the waiting ones back in stream order,
//! then frees the lease). The bus that takes a partition takes its unsettled messages
//! over with the hold of decision 0009 before it pulls, so they come first and in order.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::stream::{self, LastRawMessageErrorKind};
use bytes::Bytes;
use futures_util::TryStreamExt;
use switchyard::Result;
use tokio::sync::{OnceCell, watch};

use crate::consumer::{self, Group, GroupState};
use crate::{Inner, NatsError, lock};

/// How often a bus renews its leases and looks for partitions to take or give up.
const TICK: Duration = Duration::from_secs(1);

/// A lease whose revision did not change for this long (seen here) is expired.
pub(crate) const TTL: Duration = Duration::from_secs(10);

/// How long a ping of a holder is waited for (no answer: taken as alive).
const PING_WAIT: Duration = Duration::from_millis(500);

/// Members' keys not written for this long are dropped by the server.
const MAX_AGE: Duration = Duration::from_secs(3600);

/// A partition lease this bus holds.
pub(crate) struct Owned {
    /// The revision of the lease key written last by this bus.
    rev: u64,
    /// The partition's lane.
    lane: Arc<GroupState>,
    /// Being drained (no longer pulled); `drained` once its messages are handed back.
    draining: bool,
    drained: bool,
}

/// The lease stream of one bus (its namespace), and this bus's identity in it.
pub(crate) struct Leases {
    stream: String,
    prefix: String,
    /// This bus's member id.
    member: String,
    handle: OnceCell<stream::Stream>,
    /// The subject this bus answers pings on (its connection is alive while it does).
    ping: OnceCell<String>,
}

/// What a lease or member key holds: the holder's id and ping subject, or nothing.
fn encode(member: &str, ping: &str) -> Bytes {
    Bytes::from(format!("{member} {ping}"))
}

fn decode(b: &[u8]) -> Option<(String, String)> {
    let s = std::str::from_utf8(b).ok()?;
    let (m, p) = s.split_once(' ')?;
    (!m.is_empty() && !p.is_empty()).then(|| (m.to_string(), p.to_string()))
}

/// A unique member id: the process id and 64 random bits (no `.` or space in it).
fn member_id() -> String {
    use std::hash::{BuildHasher, RandomState};
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let r = RandomState::new().hash_one((std::process::id(), nanos));
    format!("{}-{r:016x}", std::process::id())
}

/// Whether a holder answered a ping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Liveness {
    Alive,
    Dead,
}

impl Leases {
    /// Leases in stream `stream`, keys under `prefix`.
    pub(crate) fn new(stream: String, prefix: String) -> Self {
        Leases {
            stream,
            prefix,
            member: member_id(),
            handle: OnceCell::new(),
            ping: OnceCell::new(),
        }
    }

    async fn handle(&self, inner: &Inner) -> Result<&stream::Stream> {
        self.handle
            .get_or_try_init(|| async {
                crate::ledger::key_value_stream(inner, &self.stream, &self.prefix, MAX_AGE).await
            })
            .await
    }

    /// The subject this bus answers pings on; subscribed on first use.
    async fn ping(&self, inner: &Inner) -> Result<&str> {
        self.ping
            .get_or_try_init(|| async {
                let (client, _) = inner.conn().await?;
                let subject = client.new_inbox();
                let mut sub = client
                    .subscribe(subject.clone())
                    .await
                    .map_err(|e| NatsError::consume("subscribing to the ping subject".into(), e))?;
                let client = client.clone();
                let mut closed = inner.closed.subscribe();
                // Answers until the connection ends (`close` drains it after freeing the
                // leases: a closing bus is alive until its messages are back) or the bus
                // is dropped; then pings find no responders.
                tokio::spawn(async move {
                    use futures_util::StreamExt;
                    loop {
                        let m = tokio::select! {
                            r = closed.changed() => match r {
                                Ok(()) => continue,
                                Err(_) => return,
                            },
                            m = sub.next() => m,
                        };
                        let Some(m) = m else { return };
                        if let Some(reply) = m.reply {
                            let _ = client.publish(reply, Bytes::new()).await;
                        }
                    }
                });
                Ok::<_, switchyard::Error>(subject)
            })
            .await
            .map(String::as_str)
    }

    fn key(&self, stream: &str, consumer: &str, what: &str) -> String {
        format!("{}.{stream}.{consumer}.{what}", self.prefix)
    }

    /// The revision (0: none) and value of `subject`.
    async fn read(&self, inner: &Inner, subject: &str) -> Result<(u64, Bytes)> {
        let s = self.handle(inner).await?;
        match s.get_last_raw_message_by_subject(subject).await {
            Ok(m) => Ok((m.sequence, m.payload)),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok((0, Bytes::new())),
            Err(e) => Err(NatsError::consume(format!("reading lease `{subject}`"), e)),
        }
    }

    /// Writes `value` to `subject` if its revision is still `expected` (0: no value).
    /// Returns the new revision, or `None` when another bus wrote it first.
    async fn cas(
        &self,
        inner: &Inner,
        subject: &str,
        value: Bytes,
        expected: u64,
    ) -> Result<Option<u64>> {
        self.handle(inner).await?;
        let js = inner.js()?;
        let publish = async_nats::jetstream::context::Publish::build()
            .payload(value)
            .expected_last_subject_sequence(expected);
        let fail = |e: async_nats::jetstream::context::PublishError| {
            NatsError::consume(format!("writing lease `{subject}`"), e)
        };
        let ack = match js.send_publish(subject.to_string(), publish).await {
            Ok(ack) => ack.await,
            Err(e) => Err(e),
        };
        match ack {
            Ok(ack) => Ok(Some(ack.sequence)),
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Ok(None),
            Err(e) => Err(fail(e)),
        }
    }

    /// Writes `value` to `subject` unconditionally.
    async fn put(&self, inner: &Inner, subject: &str, value: Bytes) -> Result<()> {
        self.handle(inner).await?;
        let js = inner.js()?;
        let fail = |e: async_nats::jetstream::context::PublishError| {
            NatsError::consume(format!("writing `{subject}`"), e)
        };
        js.publish(subject.to_string(), value)
            .await
            .map_err(fail)?
            .await
            .map_err(fail)?;
        Ok(())
    }

    /// The subjects under `filter` that hold a value.
    async fn list(&self, inner: &Inner, filter: &str) -> Result<Vec<String>> {
        let s = self.handle(inner).await?;
        let fail = |e: async_nats::Error| NatsError::consume(format!("listing `{filter}`"), e);
        let mut info = s
            .info_with_subjects(filter)
            .await
            .map_err(|e| fail(e.into()))?;
        let mut out = Vec::new();
        while let Some((subject, _)) = info.try_next().await.map_err(|e| fail(e.into()))? {
            out.push(subject);
        }
        Ok(out)
    }
}

/// Asks whether the bus answering on `ping` is connected.
async fn ping(client: &async_nats::Client, ping: &str) -> Liveness {
    match tokio::time::timeout(PING_WAIT, client.request(ping.to_string(), Bytes::new())).await {
        Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => Liveness::Dead,
        // Answered, or slow (a stalled holder: the TTL decides).
        _ => Liveness::Alive,
    }
}

/// What the lease task remembers between ticks: when each key's revision was first seen.
#[derive(Default)]
struct Seen {
    revs: HashMap<String, (u64, Instant)>,
}

impl Seen {
    /// Whether `subject` has had revision `rev` for [`TTL`] or longer.
    fn stale(&mut self, subject: &str, rev: u64, now: Instant) -> bool {
        let e = self.revs.entry(subject.to_string()).or_insert((rev, now));
        if e.0 != rev {
            *e = (rev, now);
        }
        now.duration_since(e.1) >= TTL
    }
}

/// Runs the lease task of `group` until the bus closes or is dropped.
pub(crate) fn spawn(inner: Weak<Inner>, group: Arc<Group>, mut closed: watch::Receiver<bool>) {
    tokio::spawn(async move {
        let mut seen = Seen::default();
        let mut registered = false;
        loop {
            if *closed.borrow() {
                return;
            }
            let Some(strong) = inner.upgrade() else {
                return;
            };
            if let Err(e) = tick(&strong, &group, &mut seen, &mut registered).await {
                tracing::debug!(topic = %group.topic, group = %group.group, error = %e,
                    "partition lease round failed; retried");
            }
            drop(strong);
            tokio::select! {
                _ = closed.wait_for(|c| *c) => return,
                _ = tokio::time::sleep(TICK) => {}
            }
        }
    });
}

/// One round: renew what this bus holds, count the live members, then take or give up
/// partitions towards the fair share.
async fn tick(
    inner: &Arc<Inner>,
    group: &Arc<Group>,
    seen: &mut Seen,
    registered: &mut bool,
) -> Result<()> {
    let leases = &inner.leases;
    let stream = inner.names.stream(&group.topic);
    let consumer = inner.names.consumer(&group.group);
    let ping_subject = leases.ping(inner).await?.to_string();
    let mine = encode(&leases.member, &ping_subject);
    let lease_key = |p: u32| leases.key(&stream, &consumer, &format!("p.{p}"));

    // Drained partitions are freed; the others renewed.
    let held: Vec<(u32, u64, bool)> = lock(&group.owned)
        .iter()
        .map(|(p, o)| (*p, o.rev, o.drained))
        .collect();
    for (p, rev, drained) in held {
        let value = if drained { Bytes::new() } else { mine.clone() };
        let sent = Instant::now();
        match leases.cas(inner, &lease_key(p), value, rev).await? {
            Some(new) if !drained => {
                if let Some(o) = lock(&group.owned).get_mut(&p) {
                    o.rev = new;
                    o.lane.lease_renewed(sent);
                }
            }
            Some(_) => {
                lock(&group.owned).remove(&p);
                tracing::debug!(topic = %group.topic, group = %group.group, p, "partition released");
            }
            None => {
                tracing::warn!(topic = %group.topic, group = %group.group, p,
                    "partition lease lost to another member (this bus stalled past the TTL?); what it held here is forgotten, the new holder has it");
                abandon(group, p).await;
            }
        }
    }

    let member_key = leases.key(&stream, &consumer, &format!("m.{}", leases.member));
    if group.sources.load(Ordering::SeqCst) == 0 {
        // No subscriber left here: give every partition up.
        if *registered {
            leases.put(inner, &member_key, Bytes::new()).await?;
            *registered = false;
        }
        let all: Vec<u32> = lock(&group.owned).keys().copied().collect();
        for p in all {
            drain(inner, group, p);
        }
        return Ok(());
    }
    leases.put(inner, &member_key, mine.clone()).await?;
    *registered = true;

    let (client, _) = inner.conn().await?;
    let now = Instant::now();
    let mut pings: HashMap<String, Liveness> = HashMap::new();
    let mut live = 0u32;
    let prefix = leases.key(&stream, &consumer, "m.");
    for subject in leases.list(inner, &format!("{prefix}*")).await? {
        let (rev, value) = leases.read(inner, &subject).await?;
        let Some((member, ping_at)) = decode(&value) else {
            continue;
        };
        if member == leases.member {
            live += 1;
            continue;
        }
        if seen.stale(&subject, rev, now) {
            continue;
        }
        let alive = *match pings.get(&ping_at) {
            Some(l) => l,
            None => pings
                .entry(ping_at.clone())
                .or_insert(ping(client, &ping_at).await),
        };
        if alive == Liveness::Alive {
            live += 1;
        }
    }
    let live = live.max(1);
    let share = group.partitions.div_ceil(live);
    let active: Vec<u32> = lock(&group.owned)
        .iter()
        .filter(|(_, o)| !o.draining)
        .map(|(p, _)| *p)
        .collect();
    let mut count = u32::try_from(active.len()).unwrap_or(u32::MAX);
    if count > share {
        // One partition per round goes to the members below their share.
        if let Some(p) = active.last() {
            drain(inner, group, *p);
        }
        return Ok(());
    }
    if count == share {
        return Ok(());
    }
    let mut candidates = Vec::new();
    for p in 0..group.partitions {
        if lock(&group.owned).contains_key(&p) {
            continue;
        }
        let subject = lease_key(p);
        let (rev, value) = leases.read(inner, &subject).await?;
        let stale = seen.stale(&subject, rev, now);
        let takeable = match decode(&value) {
            None => true,
            Some((holder, _)) if holder == leases.member => true,
            Some((_, ping_at)) => {
                stale
                    || match pings.get(&ping_at) {
                        Some(l) => *l == Liveness::Dead,
                        None => {
                            let l = ping(client, &ping_at).await;
                            pings.insert(ping_at, l);
                            l == Liveness::Dead
                        }
                    }
            }
        };
        if takeable {
            candidates.push((p, rev));
        }
    }
    for (p, rev) in candidates {
        if count >= share || *inner.closed.borrow() {
            break;
        }
        let sent = Instant::now();
        let Some(new) = leases.cas(inner, &lease_key(p), mine.clone(), rev).await? else {
            continue;
        };
        match acquire(inner, group, p).await {
            Ok(lane) => {
                lane.lease_renewed(sent);
                lock(&group.owned).insert(
                    p,
                    Owned {
                        rev: new,
                        lane: lane.clone(),
                        draining: false,
                        drained: false,
                    },
                );
                group.add_lane(lane);
                count += 1;
                tracing::debug!(topic = %group.topic, group = %group.group, p, "partition taken");
            }
            Err(e) => {
                tracing::warn!(topic = %group.topic, group = %group.group, p, error = %e,
                    "could not start pulling a partition; its lease is given back");
                let _ = leases.cas(inner, &lease_key(p), Bytes::new(), new).await;
            }
        }
    }
    Ok(())
}

/// Prepares the lane of partition `p` (lease just taken): what the previous owner left
/// unsettled is redelivered now and held in order before anything later.
async fn acquire(inner: &Arc<Inner>, group: &Arc<Group>, p: u32) -> Result<Arc<GroupState>> {
    let stream_name = inner.names.stream(&group.topic);
    let name = inner.names.partition_consumer(&group.group, p);
    let stream = inner.stream(&group.topic).await?;
    let consumer: async_nats::jetstream::consumer::PullConsumer = stream
        .get_consumer(&name)
        .await
        .map_err(|e| NatsError::consumer(&group.topic, &group.group, e))?;
    let info = consumer.cached_info();
    let lane = group.new_lane(
        p,
        format!("{stream_name}.{name}"),
        format!("$JS.API.CONSUMER.MSG.NEXT.{stream_name}.{name}"),
    );
    lane.set_inherited(info.num_ack_pending);
    let (client, _) = inner.conn().await?;
    consumer::spawn_keep_alive(
        lane.clone(),
        Arc::downgrade(inner),
        client.clone(),
        inner.closed.subscribe(),
    );
    if let Err(e) = consumer::take_over(client, &stream_name, &name, info).await {
        lane.retire();
        return Err(e);
    }
    Ok(lane)
}

/// Gives partition `p` up in the background: stops pulling it, waits for its deliveries
/// in flight (their ack_wait at most), hands the waiting ones back, then marks the lease
/// to be freed by the next round (which keeps renewing it meanwhile).
fn drain(inner: &Arc<Inner>, group: &Arc<Group>, p: u32) {
    {
        let mut owned = lock(&group.owned);
        match owned.get_mut(&p) {
            Some(o) if !o.draining => o.draining = true,
            _ => return,
        }
    }
    let inner = inner.clone();
    let group = group.clone();
    tokio::spawn(async move {
        let lane = group.remove_lane(p);
        if let Some(lane) = &lane {
            let limit = Instant::now() + lane.settings_ack_wait() + consumer::LIVENESS;
            while lane.busy() && Instant::now() < limit && !*inner.closed.borrow() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            lane.release_all(&inner).await;
            if let Ok(client) = inner.client()
                && let Err(e) = crate::transient::round_trip(client, None).await
            {
                tracing::debug!(error = %e, "round trip after handing a partition back");
            }
            lane.retire();
        }
        if let Some(o) = lock(&group.owned).get_mut(&p) {
            o.drained = true;
        }
    });
}

/// Partition `p`'s lease was lost: stop at once and forget what the lane held (the new
/// holder took it over; see [`GroupState::forget_all`]).
async fn abandon(group: &Arc<Group>, p: u32) {
    let owned = lock(&group.owned).remove(&p);
    if group.remove_lane(p).is_some()
        && let Some(o) = owned
    {
        o.lane.forget_all().await;
    }
}

/// The bus closes: frees every lease of `group` (its messages were handed back) and its
/// membership.
pub(crate) async fn release(inner: &Inner, group: &Group) {
    let leases = &inner.leases;
    let stream = inner.names.stream(&group.topic);
    let consumer = inner.names.consumer(&group.group);
    let held: Vec<(u32, u64)> = std::mem::take(&mut *lock(&group.owned))
        .into_iter()
        .map(|(p, o)| {
            o.lane.retire();
            (p, o.rev)
        })
        .collect();
    for (p, rev) in held {
        let key = leases.key(&stream, &consumer, &format!("p.{p}"));
        if let Err(e) = leases.cas(inner, &key, Bytes::new(), rev).await {
            tracing::debug!(key, error = %e, "freeing a partition lease on close (it expires)");
        }
    }
    if leases.handle.get().is_some() {
        let key = leases.key(&stream, &consumer, &format!("m.{}", leases.member));
        let _ = leases.put(inner, &key, Bytes::new()).await;
    }
}

/// The partitions of `group` this bus pulls now.
pub(crate) fn owned(group: &Group) -> Vec<u32> {
    lock(&group.owned)
        .iter()
        .filter(|(_, o)| !o.draining)
        .map(|(p, _)| *p)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip() {
        assert_eq!(
            decode(&encode("m1", "_INBOX.x")),
            Some(("m1".to_string(), "_INBOX.x".to_string()))
        );
        assert_eq!(decode(b""), None);
        assert_eq!(decode(b"m1"), None);
    }

    #[test]
    fn a_revision_is_stale_after_the_ttl_seen_here() {
        let mut seen = Seen::default();
        let t0 = Instant::now();
        assert!(!seen.stale("k", 3, t0));
        assert!(!seen.stale("k", 3, t0 + TTL / 2));
        assert!(seen.stale("k", 3, t0 + TTL));
        // A new revision starts the wait again.
        assert!(!seen.stale("k", 4, t0 + TTL));
        assert!(seen.stale("k", 4, t0 + 2 * TTL));
    }
}
