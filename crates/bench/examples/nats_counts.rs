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
            h.insert("Nats-Msg-Id", format!("raw-{next}").as_str());
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

fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().collect();
    let url = args
        .get(1)
        .ok_or("usage: nats_counts <url> <raw|switchyard> [messages]")?;
    let side = args.get(2).map(String::as_str).unwrap_or("raw");
    let messages: u64 = args
        .get(3)
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
            other => Err(format!("unknown side {other}: raw or switchyard").into()),
        }
    })
}
