//! The `bus` suite: the embedded bus against the disk's raw floor.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use switchyard::{Bus, Envelope, SubscribeOptions};
use switchyard_embedded::{Durability, EmbeddedBus, EmbeddedConfig};

use crate::Settings;
use crate::report::Figure;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Payload bytes of every benchmark message (plus ~100 bytes of envelope attributes).
pub const PAYLOAD_BYTES: usize = 128;

fn message(i: u64, subject: &str) -> Envelope {
    let mut data = format!("{{\"i\":{i},\"pad\":\"");
    while data.len() < PAYLOAD_BYTES - 2 {
        data.push('x');
    }
    data.push_str("\"}");
    Envelope::new("bench.event.v1", "/bench", "application/json", data).with_subject(subject)
}

fn config(durability: Durability) -> EmbeddedConfig {
    EmbeddedConfig {
        durability,
        ..Default::default()
    }
}

const BUFFERED: Durability = Durability::Buffered {
    interval: Duration::from_millis(10),
};

fn progress(label: &str) {
    eprint!("\r\x1b[2K  {label}");
    let _ = std::io::stderr().flush();
}

/// Runs the whole suite and returns its figures.
pub async fn run(s: &Settings) -> Result<Vec<Figure>, BoxError> {
    let mut figures = Vec::new();
    let runs = |name: &str| {
        progress(&format!("{name} ({} runs)", s.runs));
    };

    runs("bus.floor.fdatasync");
    let mut floor = Vec::new();
    for _ in 0..s.runs {
        floor.push(fdatasync_floor(s.secs.min(1.0))?);
    }
    let floor = Figure::from_runs("bus.floor.fdatasync", "ops/s", floor);

    let publish =
        |name: &str, durability, concurrency, batch| -> (String, Durability, usize, usize) {
            (name.to_string(), durability, concurrency, batch)
        };
    let cases = [
        publish("bus.publish.fsync.c1", Durability::Fsync, 1, 1),
        publish("bus.publish.fsync.c64", Durability::Fsync, 64, 1),
        publish("bus.publish.fsync.c1024", Durability::Fsync, 1024, 1),
        publish("bus.publish.fsync.batch", Durability::Fsync, 4, 1000),
        publish("bus.publish.buffered.c64", BUFFERED, 64, 1),
    ];
    let mut per_fsync_c64 = Vec::new();
    for (name, durability, concurrency, batch) in cases {
        if !s.selected(&name) {
            continue;
        }
        runs(&name);
        let mut v = Vec::new();
        for _ in 0..s.runs {
            let r = publish_throughput(durability, concurrency, batch, s.secs).await?;
            if name == "bus.publish.fsync.c64" {
                per_fsync_c64.push(r.1);
            }
            v.push(r.0);
        }
        let f = Figure::from_runs(&name, "msg/s", v);
        let note = format!(
            "{:.1}x the fdatasync floor",
            f.median / floor.median.max(1.0)
        );
        figures.push(f.with_note(note));
    }
    if !per_fsync_c64.is_empty() {
        figures.push(
            Figure::from_runs("bus.msgs_per_fsync.c64", "msg/fsync", per_fsync_c64)
                .with_note("group commit: messages sharing one fdatasync"),
        );
    }

    for (name, durability) in [
        ("bus.e2e.fsync.batch", Durability::Fsync),
        ("bus.e2e.buffered.batch", BUFFERED),
    ] {
        if !s.selected(name) {
            continue;
        }
        runs(name);
        let mut v = Vec::new();
        for _ in 0..s.runs {
            v.push(end_to_end(durability, s.secs).await?);
        }
        figures.push(
            Figure::from_runs(name, "msg/s", v)
                .with_note("publish batches -> consume -> ack, concurrently"),
        );
    }

    for (name, with_store, n, note) in [
        (
            "router.e2e.noop",
            false,
            200_000u64,
            "router draining a backlog, no-op handler (nothing to commit)",
        ),
        (
            "router.e2e.store_commit",
            true,
            100_000,
            "router: handler updates 1 row + appends 1 outbox event; one durable commit with the inbox mark",
        ),
    ] {
        if !s.selected(name) {
            continue;
        }
        runs(name);
        let mut v = Vec::new();
        for _ in 0..s.runs {
            v.push(crate::store::router_drain(n, with_store).await?);
        }
        figures.push(Figure::from_runs(name, "msg/s", v).with_note(note));
    }

    if s.selected("bus.latency.fsync.5k") {
        runs("bus.latency.fsync.5k");
        let (mut p50, mut p99, mut publish_p99) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..s.runs {
            let l = latency_at_rate(5_000, s.secs.max(2.0)).await?;
            p50.push(l.delivered_p50);
            p99.push(l.delivered_p99);
            publish_p99.push(l.publish_p99);
        }
        figures.push(
            Figure::from_runs("bus.latency.fsync.5k.p50", "ms", p50)
                .with_note("publish -> delivered, open loop at 5,000 msg/s"),
        );
        figures.push(Figure::from_runs("bus.latency.fsync.5k.p99", "ms", p99));
        figures.push(
            Figure::from_runs("bus.latency.fsync.5k.publish_p99", "ms", publish_p99)
                .with_note("until publish returned (durable)"),
        );
    }

    if s.selected("bus.backlog_1m.peak_rss_mb") {
        runs("bus.backlog_1m.peak_rss_mb");
        let mut rss = Vec::new();
        for _ in 0..s.backlog_runs {
            rss.push(backlog_peak_rss(s.backlog).await?);
        }
        figures.push(
            Figure::from_runs("bus.backlog_1m.peak_rss_mb", "MiB", rss).with_note(format!(
                "{} messages consumed by a fresh process",
                s.backlog
            )),
        );
    }
    figures.push(floor.with_note("raw peer: one writer, 200-byte appends, fdatasync each"));
    eprint!("\r\x1b[2K");
    Ok(figures)
}

/// The disk's floor: one writer appending 200 bytes and calling fdatasync each time.
pub fn fdatasync_floor(secs: f64) -> Result<f64, BoxError> {
    let dir = tempfile::tempdir()?;
    let mut f = std::fs::File::create(dir.path().join("floor"))?;
    let buf = [7u8; 200];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        f.write_all(&buf)?;
        f.sync_data()?;
        n += 1;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// Publishers in a closed loop for `secs`; returns (msg/s, messages per fsync).
async fn publish_throughput(
    durability: Durability,
    concurrency: usize,
    batch: usize,
    secs: f64,
) -> Result<(f64, f64), BoxError> {
    let dir = tempfile::tempdir()?;
    let bus = EmbeddedBus::open_with(dir.path(), config(durability))?;
    bus.publish("bench", message(0, "warm")).await?;
    let fsyncs0 = bus.storage().stats().fsyncs.load(Ordering::Relaxed);
    let msgs0 = bus.storage().stats().messages.load(Ordering::Relaxed);
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let start = Instant::now();
    for p in 0..concurrency {
        let bus = bus.clone();
        let stop = stop.clone();
        let count = count.clone();
        tasks.push(tokio::spawn(async move {
            let subject = format!("s{p}");
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if batch == 1 {
                    bus.publish("bench", message(i, &subject)).await?;
                    i += 1;
                    count.fetch_add(1, Ordering::Relaxed);
                } else {
                    let envs: Vec<_> = (i..i + batch as u64)
                        .map(|j| message(j, &subject))
                        .collect();
                    bus.publish_batch("bench", envs).await?;
                    i += batch as u64;
                    count.fetch_add(batch as u64, Ordering::Relaxed);
                }
            }
            Ok::<_, switchyard::Error>(())
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await??;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let n = count.load(Ordering::Relaxed);
    let fsyncs = bus.storage().stats().fsyncs.load(Ordering::Relaxed) - fsyncs0;
    let msgs = bus.storage().stats().messages.load(Ordering::Relaxed) - msgs0;
    bus.close().await?;
    let per_fsync = if fsyncs > 0 {
        msgs as f64 / fsyncs as f64
    } else {
        0.0
    };
    Ok((n as f64 / elapsed, per_fsync))
}

/// Batch publishers and acking consumers at once; returns acked msg/s.
async fn end_to_end(durability: Durability, secs: f64) -> Result<f64, BoxError> {
    let dir = tempfile::tempdir()?;
    let bus = EmbeddedBus::open_with(dir.path(), config(durability))?;
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let mut consumers = Vec::new();
    for _ in 0..2 {
        let mut sub = bus
            .subscribe("e2e", "bench", SubscribeOptions::default())
            .await?;
        let stop = stop.clone();
        let acked = acked.clone();
        consumers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let Ok(batch) =
                    tokio::time::timeout(Duration::from_millis(100), sub.next_batch(1024)).await
                else {
                    continue;
                };
                for d in batch? {
                    d.ack().await?;
                    acked.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok::<_, switchyard::Error>(())
        }));
    }
    let mut publishers = Vec::new();
    for p in 0..4 {
        let bus = bus.clone();
        let stop = stop.clone();
        publishers.push(tokio::spawn(async move {
            let subject = format!("s{p}");
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let envs: Vec<_> = (i..i + 1000).map(|j| message(j, &subject)).collect();
                bus.publish_batch("e2e", envs).await?;
                i += 1000;
            }
            Ok::<_, switchyard::Error>(())
        }));
    }
    let start = Instant::now();
    let a0 = acked.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    let n = acked.load(Ordering::Relaxed) - a0;
    let elapsed = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in publishers.into_iter().chain(consumers) {
        t.await??;
    }
    bus.close().await?;
    Ok(n as f64 / elapsed)
}

/// Latencies of one open-loop run, in ms.
struct Latency {
    delivered_p50: f64,
    delivered_p99: f64,
    publish_p99: f64,
}

/// Open-loop publishes at `rate` msg/s: publish-to-delivery p50/p99 and publish p99.
async fn latency_at_rate(rate: u64, secs: f64) -> Result<Latency, BoxError> {
    let dir = tempfile::tempdir()?;
    let bus = EmbeddedBus::open_with(dir.path(), config(Durability::Fsync))?;
    let base = Instant::now();
    let mut sub = bus
        .subscribe("lat", "bench", SubscribeOptions::default())
        .await?;
    let total = (rate as f64 * secs) as u64;
    let consumer = tokio::spawn(async move {
        let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
        let mut seen = 0u64;
        while seen < total {
            for d in sub.next_batch(1024).await? {
                let sent: u64 = d
                    .envelope()
                    .extension("sentus")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let now = base.elapsed().as_micros() as u64;
                h.record(now.saturating_sub(sent).max(1))?;
                d.ack().await?;
                seen += 1;
            }
        }
        Ok::<_, BoxError>(h)
    });
    // 1 ms ticks, `rate / 1000` independent publishes per tick (open loop: a slow
    // publish does not delay the next tick's sends).
    let per_tick = (rate / 1000).max(1);
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sent = 0u64;
    let mut inflight = tokio::task::JoinSet::new();
    let mut publish_h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    while sent < total {
        tick.tick().await;
        for _ in 0..per_tick.min(total - sent) {
            let bus = bus.clone();
            let at = base.elapsed().as_micros() as u64;
            let env =
                message(sent, &format!("s{}", sent % 64)).with_extension("sentus", at.to_string());
            inflight.spawn(async move {
                bus.publish("lat", env).await?;
                Ok::<u64, switchyard::Error>((base.elapsed().as_micros() as u64).saturating_sub(at))
            });
            sent += 1;
        }
        while let Some(r) = inflight.try_join_next() {
            publish_h.record(r??.max(1))?;
        }
    }
    while let Some(r) = inflight.join_next().await {
        publish_h.record(r??.max(1))?;
    }
    let h = consumer.await??;
    bus.close().await?;
    Ok(Latency {
        delivered_p50: h.value_at_quantile(0.50) as f64 / 1000.0,
        delivered_p99: h.value_at_quantile(0.99) as f64 / 1000.0,
        publish_p99: publish_h.value_at_quantile(0.99) as f64 / 1000.0,
    })
}

/// Publishes a backlog, then a fresh process consumes it all; returns its peak RSS in MiB.
async fn backlog_peak_rss(n: u64) -> Result<f64, BoxError> {
    let dir = tempfile::tempdir()?;
    {
        let bus = EmbeddedBus::open(dir.path())?;
        let mut i = 0;
        while i < n {
            let envs: Vec<_> = (i..(i + 1000).min(n))
                .map(|j| message(j, &format!("s{}", j % 64)))
                .collect();
            i += envs.len() as u64;
            bus.publish_batch("backlog", envs).await?;
        }
        bus.close().await?;
    }
    let kb = crate::report::child_peak_rss_kb(&[
        "backlog-child".as_ref(),
        dir.path().as_os_str(),
        n.to_string().as_ref(),
    ])
    .await?;
    Ok(kb / 1024.0)
}

/// The child side of the backlog figure: consume `n` messages, print peak RSS.
pub async fn backlog_child(dir: &Path, n: u64) -> Result<(), BoxError> {
    let bus = EmbeddedBus::open(dir)?;
    let mut sub = bus
        .subscribe("backlog", "bench", SubscribeOptions::default())
        .await?;
    let mut seen = 0;
    while seen < n {
        for d in sub.next_batch(1024).await? {
            d.ack().await?;
            seen += 1;
        }
    }
    bus.close().await?;
    println!(
        "RSS_KB {}",
        switchyard_testkit::peak_rss_kb().ok_or("cannot read /proc/self/status")?
    );
    Ok(())
}
