//! A fixed number of the `nats` suite's `publish.async1000` publishes, to count their
//! client-side cost per message (instructions, allocations) under valgrind: wall-clock
//! figures on a shared machine are too noisy to compare builds by, counts are not.
//!
//! The two sides are those of `bench nats` (`src/nats.rs`): the raw async-nats
//! JetStream publisher (prebuilt payload, a unique `Nats-Msg-Id` each) and
//! `NatsBus::publish` called through the `Bus` trait with a fresh envelope each, both with
//! 1,000 publishes in flight. The nats-server is not started here (valgrind would count
//! nothing of it anyway): pass its URL.
//!
//! Run with:
//!
//! ```text
//! nats-server -js -a 127.0.0.1 -p 4333 -sd /tmp/js &
//! cargo run --release -p bench --example nats_counts -- nats://127.0.0.1:4333 <raw|switchyard> [messages]
//! ```
//!
//! Run it under `valgrind --tool=callgrind` twice with different `messages` (e.g. 20000
//! and 60000) and divide the difference of the two totals by the difference of the
//! messages: start-up and warm-up cancel out, what is left is one publish.
//!
//! The `consume` figures are counted the same way, with the backlog written first by a
//! run outside valgrind (`<side>-fill`), then drained under it (`<side>-consume`), both
//! with the same `<name>`:
//!
//! ```text
//! nats_counts nats://127.0.0.1:4333 switchyard-fill c1 20000
//! valgrind --tool=callgrind nats_counts nats://127.0.0.1:4333 switchyard-consume c1 20000
//! ```
//!
//! The consumer is the bench's: a durable pull consumer asking for 1,024 at a time,
//! every message acked on its own (`bench nats`, `consume`). Each drain prints its rate
//! and CPU per message (the server's too when `SERVER_PID` is set), so pairs of runs can
//! be compared by wall clock as well.
//!
//! To find what the server pays for in switchyard's layout, the raw side can take its
//! features one at a time (set on both the fill and the consume run):
//!
//! - `RAW_CFG=1`: switchyard's consumer settings (5 s `ack_wait`, unlimited
//!   `max_deliver`, 4 × the window);
//! - `RAW_WILDCARD=1`: a second, wildcard subject in the stream and a subject filter;
//! - `RAW_EXTRA=16`: that many idle consumers, each with a waiting pull request (the
//!   partitions);
//! - `RAW_BATCH=n`: pull requests of `n` instead of 1,024.
//!
//! `SY_SUBJECTS=1` on `switchyard-fill` gives every message an ordering key (1,024, round
//! robin), so the drain goes through the topic's 16 partition lanes.

use std::future::IntoFuture;
use std::task::Poll;

use async_nats::jetstream;
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use switchyard::{Bus, Envelope};
use switchyard_nats::{NatsBus, NatsConfig};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The bench's allocator (its per-call cost is part of what is counted).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const IN_FLIGHT: usize = 1000;
const TOPIC: &str = "counts";

fn payload() -> Bytes {
    let mut data = String::from("{\"pad\":\"");
    while data.len() < 254 {
        data.push('x');
    }
    data.push_str("\"}");
    Bytes::from(data)
}

fn envelope(payload: &Bytes) -> Envelope {
    Envelope::new(
        "bench.event.v1",
        "/bench",
        "application/json",
        payload.clone(),
    )
}

async fn raw(url: &str, messages: u64) -> Result<(), BoxError> {
    let client = async_nats::connect(url).await?;
    let js = jetstream::new(client.clone());
    let name = format!("RAW_COUNTS_{}", std::process::id());
    let subject = format!("raw.counts.{}", std::process::id());
    let stream = js
        .get_or_create_stream(jetstream::stream::Config {
            name: name.clone(),
            subjects: vec![subject.clone()],
            duplicate_window: std::time::Duration::from_secs(120),
            ..Default::default()
        })
        .await?;
    drop(stream);
    let body = payload();
    let mut acks = FuturesUnordered::new();
    let mut acked = 0u64;
    let mut next = 0u64;
    while acked < messages {
        while acks.len() < IN_FLIGHT && next < messages {
            let mut h = async_nats::HeaderMap::new();
            h.insert("Nats-Msg-Id", format!("raw-{next:032}").as_str());
            next += 1;
            let ack = js
                .publish_with_headers(subject.clone(), h, body.clone())
                .await?;
            acks.push(ack.into_future());
        }
        if let Some(r) = acks.next().await {
            r?;
            acked += 1;
        }
    }
    js.delete_stream(&name).await?;
    Ok(())
}

async fn switchyard(url: &str, messages: u64) -> Result<(), BoxError> {
    let mut config = NatsConfig::new(url);
    config.namespace = Some(format!("counts{}", std::process::id()));
    let bus = NatsBus::new(config);
    let body = payload();
    let mut inflight = FuturesUnordered::new();
    let mut acked = 0u64;
    let mut next = 0u64;
    while acked < messages {
        while inflight.len() < IN_FLIGHT && next < messages {
            // Started at once, as `bench nats` does (see its `poll_once`).
            let mut publish = bus.publish(TOPIC, envelope(&body));
            next += 1;
            match std::future::poll_fn(|cx| Poll::Ready(publish.as_mut().poll(cx))).await {
                Poll::Ready(r) => {
                    r?;
                    acked += 1;
                }
                Poll::Pending => inflight.push(publish),
            }
        }
        if let Some(r) = inflight.next().await {
            r?;
            acked += 1;
        }
    }
    drop(inflight);
    let stream = format!("SY_counts{}_{TOPIC}", std::process::id());
    bus.close().await?;
    let client = async_nats::connect(url).await?;
    jetstream::new(client).delete_stream(&stream).await?;
    Ok(())
}

/// Wall and CPU time of a drain (the consume loop only: connecting, subscribing and
/// deleting are left out), printed to stderr; the server's CPU too when `SERVER_PID` is set.
struct Drain {
    at: std::time::Instant,
    cpu: (Option<u64>, Option<u64>),
}

impl Drain {
    fn start() -> Drain {
        Drain {
            at: std::time::Instant::now(),
            cpu: (cpu_ticks("self"), server_ticks()),
        }
    }

    fn report(&self, messages: u64) {
        let secs = self.at.elapsed().as_secs_f64();
        let per = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) => format!("{:.2}", (b - a) as f64 * 1e4 / messages as f64),
            _ => "-".into(),
        };
        eprintln!(
            "drain msgs/s {:.0} client_us/msg {} server_us/msg {}",
            messages as f64 / secs,
            per(self.cpu.0, cpu_ticks("self")),
            per(self.cpu.1, server_ticks()),
        );
    }
}

/// User + system CPU ticks (1/100 s) of process `pid` ("self" for this one).
fn cpu_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

fn server_ticks() -> Option<u64> {
    cpu_ticks(&std::env::var("SERVER_PID").ok()?)
}

/// Messages asked for per pull, as in `bench nats`.
const PULL_BATCH: usize = 1024;

/// The group (and the raw side's durable consumer) of the consume figures.
const GROUP: &str = "counts";

/// The raw side's stream and subject for backlog `name`.
fn raw_names(name: &str) -> (String, String) {
    (format!("RAW_COUNTS_{name}"), format!("raw.counts.{name}"))
}

/// Writes `messages` raw messages (unique `Nats-Msg-Id`s) to the stream of `name`.
async fn raw_fill(url: &str, name: &str, messages: u64) -> Result<(), BoxError> {
    let client = async_nats::connect(url).await?;
    let js = jetstream::new(client.clone());
    let (stream, subject) = raw_names(name);
    let mut subjects = vec![subject.clone()];
    if std::env::var_os("RAW_WILDCARD").is_some() {
        subjects.push(format!("rawp.counts.{name}.*"));
    }
    js.get_or_create_stream(jetstream::stream::Config {
        name: stream,
        subjects,
        duplicate_window: std::time::Duration::from_secs(120),
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await?;
    // The same bytes as switchyard's messages: an encoded envelope, a UUID-long id.
    let body = envelope(&payload()).to_bytes();
    let mut acks = FuturesUnordered::new();
    for next in 0..messages {
        let mut h = async_nats::HeaderMap::new();
        h.insert("Nats-Msg-Id", format!("{next:036}").as_str());
        acks.push(
            js.publish_with_headers(subject.clone(), h, body.clone())
                .await?
                .into_future(),
        );
        if acks.len() >= IN_FLIGHT {
            acks.next().await.transpose()?;
        }
    }
    while let Some(r) = acks.next().await {
        r?;
    }
    client.flush().await?;
    Ok(())
}

/// Drains `messages` from the raw backlog `name`, acking each, then deletes the stream.
async fn raw_consume(url: &str, name: &str, messages: u64) -> Result<(), BoxError> {
    let client = async_nats::connect(url).await?;
    let js = jetstream::new(client.clone());
    let (stream_name, _) = raw_names(name);
    let o = switchyard::SubscribeOptions::default();
    let stream = js.get_stream(&stream_name).await?;
    let env = |k: &str| std::env::var(k).ok();
    let sy_cfg = env("RAW_CFG").is_some();
    let five_secs = std::time::Duration::from_secs(5);
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some(GROUP.into()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: if sy_cfg { five_secs } else { o.ack_wait },
            max_deliver: if sy_cfg {
                -1
            } else {
                i64::from(o.redelivery.max_attempts) + 1
            },
            max_ack_pending: if sy_cfg {
                4 * o.max_pending as i64
            } else {
                o.max_pending as i64
            },
            deliver_policy: jetstream::consumer::DeliverPolicy::All,
            filter_subject: if env("RAW_WILDCARD").is_some() {
                raw_names(name).1
            } else {
                String::new()
            },
            ..Default::default()
        })
        .await?;
    let mut extra_subs = Vec::new();
    if let Some(k) = env("RAW_EXTRA") {
        for p in 0..k.parse::<u32>()? {
            let cname = format!("{GROUP}_p{p}");
            stream
                .create_consumer(jetstream::consumer::pull::Config {
                    durable_name: Some(cname.clone()),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    filter_subject: format!("rawp.counts.{name}.{p}"),
                    ..Default::default()
                })
                .await?;
            let inbox = client.new_inbox();
            let sub = client.subscribe(inbox.clone()).await?;
            client
                .publish_with_reply(
                    format!("$JS.API.CONSUMER.MSG.NEXT.{stream_name}.{cname}"),
                    inbox,
                    bytes::Bytes::from_static(br#"{"batch":64,"expires":27000000000}"#),
                )
                .await?;
            extra_subs.push(sub);
        }
    }
    let batch = env("RAW_BATCH")
        .map(|b| b.parse())
        .transpose()?
        .unwrap_or(PULL_BATCH);
    let mut stream_of = consumer
        .stream()
        .max_messages_per_batch(batch)
        .messages()
        .await?;
    let drain = Drain::start();
    let mut seen = 0u64;
    while seen < messages {
        let m = stream_of
            .next()
            .await
            .ok_or("the consumer's stream ended")??;
        m.ack().await?;
        seen += 1;
    }
    drain.report(seen);
    drop(stream_of);
    js.delete_stream(&stream_name).await?;
    Ok(())
}

/// A bus in the namespace of backlog `name`.
fn bus_of(url: &str, name: &str) -> NatsBus {
    let mut config = NatsConfig::new(url);
    config.namespace = Some(format!("counts{name}"));
    NatsBus::new(config)
}

/// Writes `messages` envelopes to `TOPIC` in the namespace of backlog `name`.
async fn switchyard_fill(url: &str, name: &str, messages: u64) -> Result<(), BoxError> {
    let bus = bus_of(url, name);
    let body = payload();
    let mut left = messages;
    while left > 0 {
        let k = left.min(IN_FLIGHT as u64);
        // `SY_SUBJECTS=1`: an ordering key on every message (1,024 round robin), so
        // the drain goes through the topic's 16 partition lanes.
        let keys = std::env::var_os("SY_SUBJECTS").is_some();
        let batch = (0..k)
            .map(|i| {
                let e = envelope(&body);
                if keys {
                    e.with_subject(format!("k{}", (left + i) % 1024))
                } else {
                    e
                }
            })
            .collect();
        bus.publish_batch(TOPIC, batch).await?;
        left -= k;
    }
    bus.close().await?;
    Ok(())
}

/// Drains `messages` of backlog `name` through a group subscription, acking each, then
/// deletes the stream.
async fn switchyard_consume(url: &str, name: &str, messages: u64) -> Result<(), BoxError> {
    let bus = bus_of(url, name);
    let mut sub = bus
        .subscribe(TOPIC, GROUP, switchyard::SubscribeOptions::default())
        .await?;
    let drain = Drain::start();
    let mut seen = 0u64;
    while seen < messages {
        let want = usize::try_from(messages - seen)
            .unwrap_or(PULL_BATCH)
            .min(PULL_BATCH);
        for d in sub.next_batch(want).await? {
            d.ack().await?;
            seen += 1;
        }
    }
    drain.report(seen);
    drop(sub);
    bus.close().await?;
    let client = async_nats::connect(url).await?;
    jetstream::new(client)
        .delete_stream(format!("SY_counts{name}_{TOPIC}"))
        .await?;
    Ok(())
}

fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().collect();
    let url = args
        .get(1)
        .ok_or("usage: nats_counts <url> <raw|switchyard> [messages], or <url> <side>-<fill|consume> <name> [messages]")?;
    let side = args.get(2).map(String::as_str).unwrap_or("raw");
    // The consume modes take a backlog name before the count.
    let (name, count_at) = if side.contains('-') {
        (
            args.get(3)
                .ok_or("the consume modes need a backlog name")?
                .as_str(),
            4,
        )
    } else {
        ("", 3)
    };
    let messages: u64 = args
        .get(count_at)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(20_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        match side {
            "raw" => raw(url, messages).await,
            "switchyard" => switchyard(url, messages).await,
            "raw-fill" => raw_fill(url, name, messages).await,
            "raw-consume" => raw_consume(url, name, messages).await,
            "switchyard-fill" => switchyard_fill(url, name, messages).await,
            "switchyard-consume" => switchyard_consume(url, name, messages).await,
            other => Err(format!(
                "unknown mode {other}: raw, switchyard, raw-fill, raw-consume, switchyard-fill or switchyard-consume"
            )
            .into()),
        }
    })
}
