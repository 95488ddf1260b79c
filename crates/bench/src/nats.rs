//! The `nats` suite: switchyard's `NatsBus` against a raw async-nats JetStream program on
//! the same nats-server, in the same run, plus the end-to-end cost of the embedded bus
//! against NATS through the `Bus` trait.
//!
//! The suite starts one nats-server (testkit harness: free loopback port, store in a
//! temporary directory kept for the whole suite) and stops it by pid at the end. Every
//! measurement uses a fresh stream (deleted afterwards) and a fresh connection.
//!
//! Both sides use the same stream settings (file storage, one subject, 2-minute duplicate
//! window, everything else default), the same message size (the switchyard envelope with
//! a 256-byte payload; the raw side sends an opaque payload of the same length), the same
//! dedup header (`Nats-Msg-Id`, unique per message) and the same ack semantics (publish:
//! the JetStream ack is awaited; consume: durable pull consumer, explicit ack per
//! message, the same `ack_wait`, `max_deliver` and `max_ack_pending`).
//!
//! Each run opens both sides (fresh connections and streams, one warm-up publish each),
//! then they take turns in 8 slices of `secs / 8` (the consume figures: `backlog / 8`
//! messages) each, the order alternating slice by slice, so a change in the load of this
//! shared machine hits both alike; each ratio is switchyard / raw of one run, and the
//! median of those ratios is reported.

use std::collections::VecDeque;
use std::future::IntoFuture;
use std::io::Write;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy};
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use switchyard::{Bus, Envelope, SubscribeOptions};
use switchyard_nats::{NatsBus, NatsConfig};
use switchyard_testkit::servers::NatsServer;

use crate::Settings;
use crate::report::Figure;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Payload bytes of every message (the switchyard envelope adds its attributes).
pub const PAYLOAD_BYTES: usize = 256;

/// Publishes in flight in the `async1000` figures.
pub const IN_FLIGHT: usize = 1000;

/// Messages asked for per pull (both sides) in the consume figures.
const PULL_BATCH: usize = 1024;

/// The topic switchyard publishes to (its stream is `SY_<namespace>_bench`).
const TOPIC: &str = "bench";

/// The consumer group / durable name of the consume figures.
const GROUP: &str = "bench";

fn progress(label: &str) {
    eprint!("\r\x1b[2K  {label}");
    let _ = std::io::stderr().flush();
}

fn payload() -> Bytes {
    let mut data = String::from("{\"pad\":\"");
    while data.len() < PAYLOAD_BYTES - 2 {
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

/// The subscribe options of the switchyard side, and the raw consumer's equivalents.
fn subscribe_options() -> SubscribeOptions {
    SubscribeOptions::default()
}

/// Slices of each side per run: the two sides take turns slice by slice (the order
/// alternating), so a change in the machine's load during a run hits both alike.
const SLICES: usize = 8;

/// CPU time (nanoseconds, all threads) that `pid` has run for, from the scheduler's
/// per-thread accounting in `/proc/<pid>/task/*/schedstat`; `None` where it is missing.
fn cpu_ns(pid: &str) -> Option<u64> {
    let mut total = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let Ok(task) = task else { continue };
        // A thread that ended between the listing and the read counts nothing more.
        let Ok(stat) = std::fs::read_to_string(task.path().join("schedstat")) else {
            continue;
        };
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

/// CPU time of this process and of the server since the probe was taken.
#[derive(Clone)]
struct CpuProbe {
    server_pid: String,
    client: Option<u64>,
    server: Option<u64>,
}

impl CpuProbe {
    fn start(server_pid: &str) -> CpuProbe {
        CpuProbe {
            server_pid: server_pid.to_string(),
            client: cpu_ns("self"),
            server: cpu_ns(server_pid),
        }
    }

    /// (client, server) CPU nanoseconds since [`start`](Self::start).
    fn elapsed(&self) -> (Option<u64>, Option<u64>) {
        let since = |before: Option<u64>, now: Option<u64>| Some(now?.saturating_sub(before?));
        (
            since(self.client, cpu_ns("self")),
            since(self.server, cpu_ns(&self.server_pid)),
        )
    }
}

/// Messages, seconds and CPU time measured. The two sides take turns, so the CPU time of
/// the bench process during a side's slices is that side's client work (the other side
/// is idle meanwhile), and the server's is what that side's load cost the server.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    msgs: u64,
    secs: f64,
    client_ns: Option<u64>,
    server_ns: Option<u64>,
}

impl Tally {
    fn add(&mut self, msgs: u64, start: Instant) {
        self.msgs += msgs;
        self.secs += start.elapsed().as_secs_f64();
    }

    /// Adds the CPU time spent since `cpu` was taken (one slice of this side).
    fn add_cpu(&mut self, cpu: &CpuProbe) {
        let (client, server) = cpu.elapsed();
        let sum = |total: Option<u64>, slice: Option<u64>| Some(total.unwrap_or(0) + slice?);
        self.client_ns = sum(self.client_ns, client);
        self.server_ns = sum(self.server_ns, server);
    }

    fn rate(&self) -> f64 {
        self.msgs as f64 / self.secs.max(1e-9)
    }

    /// CPU microseconds per message, client and server.
    fn cpu_per_msg(&self) -> (Option<f64>, Option<f64>) {
        let per = |ns: Option<u64>| ns.map(|ns| ns as f64 / 1000.0 / self.msgs.max(1) as f64);
        (per(self.client_ns), per(self.server_ns))
    }
}

/// One raw side: a connection and the stream (name, subject) it uses.
struct Raw {
    client: async_nats::Client,
    js: jetstream::Context,
    stream: String,
    subject: String,
    /// A message of the same length as switchyard's encoded envelope.
    body: Bytes,
    next: u64,
    messages: Option<jetstream::consumer::pull::Stream>,
}

impl Raw {
    async fn new(url: &str, tag: &str, body_len: usize) -> Result<Raw, BoxError> {
        let client = async_nats::connect(url).await?;
        let js = jetstream::new(client.clone());
        let stream = format!("RAW_{tag}");
        let subject = format!("raw.{tag}");
        js.create_stream(jetstream::stream::Config {
            name: stream.clone(),
            subjects: vec![subject.clone()],
            duplicate_window: Duration::from_secs(120),
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await?;
        let mut raw = Raw {
            client,
            js,
            stream,
            subject,
            body: Bytes::from(vec![b'x'; body_len]),
            next: 0,
            messages: None,
        };
        // Warm: one acknowledged publish.
        raw.send().await?.await?;
        Ok(raw)
    }

    /// Sends the next message; the returned future resolves to the JetStream ack.
    ///
    /// Its `Nats-Msg-Id` is as long as switchyard's (a hyphenated UUID, 36 characters),
    /// so both sides store and deliver the same number of bytes per message.
    async fn send(&mut self) -> Result<jetstream::context::PublishAckFuture, BoxError> {
        let mut h = async_nats::HeaderMap::new();
        h.insert("Nats-Msg-Id", format!("raw-{:032}", self.next).as_str());
        self.next += 1;
        Ok(self
            .js
            .publish_with_headers(self.subject.clone(), h, self.body.clone())
            .await?)
    }

    async fn publish_c1(&mut self, secs: f64, t: &mut Tally) -> Result<(), BoxError> {
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed().as_secs_f64() < secs {
            self.send().await?.await?;
            n += 1;
        }
        t.add(n, start);
        Ok(())
    }

    async fn publish_window(&mut self, secs: f64, t: &mut Tally) -> Result<(), BoxError> {
        let start = Instant::now();
        let mut acks = FuturesUnordered::new();
        let mut acked = 0u64;
        while start.elapsed().as_secs_f64() < secs {
            while acks.len() < IN_FLIGHT {
                acks.push(self.send().await?.into_future());
            }
            if let Some(r) = acks.next().await {
                r?;
                acked += 1;
            }
        }
        while let Some(r) = acks.next().await {
            r?;
            acked += 1;
        }
        t.add(acked, start);
        Ok(())
    }

    /// Publishes `n` messages (untimed), `IN_FLIGHT` at a time, and opens the consumer
    /// with the settings `NatsBus` gives a group subscribed with
    /// `SubscribeOptions::default()`.
    async fn fill(&mut self, n: u64) -> Result<(), BoxError> {
        let mut acks = VecDeque::new();
        for _ in 0..n {
            acks.push_back(self.send().await?);
            if acks.len() >= IN_FLIGHT
                && let Some(a) = acks.pop_front()
            {
                a.await?;
            }
        }
        for a in acks {
            a.await?;
        }
        let o = subscribe_options();
        let stream = self.js.get_stream(&self.stream).await?;
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::Config {
                durable_name: Some(GROUP.into()),
                ack_policy: AckPolicy::Explicit,
                ack_wait: o.ack_wait,
                max_deliver: i64::from(o.redelivery.max_attempts) + 1,
                max_ack_pending: o.max_pending as i64,
                deliver_policy: DeliverPolicy::All,
                ..Default::default()
            })
            .await?;
        self.messages = Some(
            consumer
                .stream()
                .max_messages_per_batch(PULL_BATCH)
                .messages()
                .await?,
        );
        Ok(())
    }

    /// Consumes and acks `n` messages.
    async fn consume(&mut self, n: u64, t: &mut Tally) -> Result<(), BoxError> {
        let messages = self.messages.as_mut().ok_or("fill first")?;
        let start = Instant::now();
        let mut seen = 0u64;
        while seen < n {
            let m = messages
                .next()
                .await
                .ok_or("the raw consumer's stream ended")??;
            m.ack().await?;
            seen += 1;
        }
        t.add(seen, start);
        Ok(())
    }

    async fn finish(mut self) -> Result<(), BoxError> {
        self.messages = None;
        self.js.delete_stream(&self.stream).await?;
        self.client.drain().await?;
        Ok(())
    }
}

/// One switchyard side: a fresh `NatsBus` in its own namespace.
struct Switchyard {
    bus: NatsBus,
    stream: String,
    payload: Bytes,
    sub: Option<switchyard::Subscription>,
}

impl Switchyard {
    async fn new(url: &str, tag: &str) -> Result<Switchyard, BoxError> {
        let mut config = NatsConfig::new(url);
        config.namespace = Some(tag.to_string());
        let w = Switchyard {
            bus: NatsBus::new(config),
            // The bus's naming scheme (decision 0009): `SY_<namespace>_<topic>`.
            stream: format!("SY_{tag}_{TOPIC}"),
            payload: payload(),
            sub: None,
        };
        // Warm: connects and creates the stream.
        w.bus.publish(TOPIC, envelope(&w.payload)).await?;
        Ok(w)
    }

    async fn publish_c1(&mut self, secs: f64, t: &mut Tally) -> Result<(), BoxError> {
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed().as_secs_f64() < secs {
            self.bus.publish(TOPIC, envelope(&self.payload)).await?;
            n += 1;
        }
        t.add(n, start);
        Ok(())
    }

    async fn publish_window(&mut self, secs: f64, t: &mut Tally) -> Result<(), BoxError> {
        let start = Instant::now();
        let mut inflight = FuturesUnordered::new();
        let mut acked = 0u64;
        while start.elapsed().as_secs_f64() < secs {
            while inflight.len() < IN_FLIGHT {
                let mut publish = self.bus.publish(TOPIC, envelope(&self.payload));
                match poll_once(publish.as_mut()).await {
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
        while let Some(r) = inflight.next().await {
            r?;
            acked += 1;
        }
        t.add(acked, start);
        Ok(())
    }

    /// Publishes `n` messages (untimed) in batches of `IN_FLIGHT`, with ordering keys
    /// (`SUBJECTS`, round robin) when `subjects`, and subscribes.
    async fn fill(&mut self, n: u64, subjects: bool) -> Result<(), BoxError> {
        let mut left = n;
        while left > 0 {
            let k = left.min(IN_FLIGHT as u64);
            let batch = (0..k)
                .map(|i| {
                    let e = envelope(&self.payload);
                    if subjects {
                        e.with_subject(format!("k{}", (left + i) % SUBJECTS))
                    } else {
                        e
                    }
                })
                .collect();
            self.bus.publish_batch(TOPIC, batch).await?;
            left -= k;
        }
        self.sub = Some(
            self.bus
                .subscribe(TOPIC, GROUP, subscribe_options())
                .await?,
        );
        Ok(())
    }

    /// Consumes and acks `n` messages (a batch may bring a few more; they count).
    async fn consume(&mut self, n: u64, t: &mut Tally) -> Result<(), BoxError> {
        let sub = self.sub.as_mut().ok_or("fill first")?;
        let start = Instant::now();
        let mut seen = 0u64;
        while seen < n {
            let want = usize::try_from(n - seen)
                .unwrap_or(PULL_BATCH)
                .min(PULL_BATCH);
            for d in sub.next_batch(want).await? {
                d.ack().await?;
                seen += 1;
            }
        }
        t.add(seen, start);
        Ok(())
    }

    async fn finish(mut self, admin: &jetstream::Context) -> Result<(), BoxError> {
        self.sub = None;
        self.bus.close().await?;
        admin.delete_stream(&self.stream).await?;
        Ok(())
    }
}

/// Polls `f` once with the calling task's waker: it starts (here: the message is sent)
/// now, as the raw side's `send().await` sends before its ack future is collected.
/// Without it, a publish pushed into `FuturesUnordered` is first polled only when the
/// queue reaches it, behind the acks already in: fewer than `IN_FLIGHT` messages are
/// really at the server (decision 0009, *Hot paths*).
async fn poll_once<F: Future + ?Sized>(mut f: Pin<&mut F>) -> Poll<F::Output> {
    std::future::poll_fn(|cx| Poll::Ready(f.as_mut().poll(cx))).await
}

/// Which figure family a pair measures.
#[derive(Clone, Copy)]
enum Case {
    PublishC1,
    PublishAsync,
    Consume,
    /// `Consume` with an ordering key on every message ([`SUBJECTS`] of them, round
    /// robin): the messages go through the topic's 16 partition lanes and the
    /// per-subject ordering. Switchyard alone (no raw turns): its 16 lanes each read
    /// ahead, and what a side asked for before its slice ended is delivered in the next
    /// side's slice, so taking turns with the raw peer would bill the peer for it.
    /// Compare with `nats.switchyard.consume`.
    ConsumeSubjects,
}

/// Distinct ordering keys (`Envelope::subject`) in the `consume.subjects` figures.
const SUBJECTS: u64 = 1024;

/// Measures `case` on a fresh raw side and a fresh switchyard side, taking turns slice by
/// slice; returns the (raw, switchyard) tallies.
async fn pair(
    server_pid: &str,
    url: &str,
    admin: &jetstream::Context,
    case: Case,
    tag: &str,
    raw_first: bool,
    s: &Settings,
) -> Result<(Tally, Tally), BoxError> {
    let body_len = envelope(&payload()).to_bytes().len();
    let mut raw = Raw::new(url, &format!("{tag}r"), body_len).await?;
    let mut sy = Switchyard::new(url, &format!("{tag}s")).await?;
    // The consume backlog: about what a side consumes in `secs`.
    let backlog = ((s.secs * 100_000.0) as u64).max(SLICES as u64);
    match case {
        Case::Consume => {
            raw.fill(backlog).await?;
            sy.fill(backlog, false).await?;
        }
        Case::ConsumeSubjects => sy.fill(backlog, true).await?,
        Case::PublishC1 | Case::PublishAsync => {}
    }
    let slice_secs = s.secs / SLICES as f64;
    let per_slice = backlog / SLICES as u64;
    let (mut tr, mut tw) = (Tally::default(), Tally::default());
    for k in 0..SLICES {
        for side in 0..2 {
            let raw_turn = (side == 0) == (raw_first == (k % 2 == 0));
            if raw_turn && matches!(case, Case::ConsumeSubjects) {
                continue;
            }
            let cpu = CpuProbe::start(server_pid);
            match (case, raw_turn) {
                (Case::PublishC1, true) => raw.publish_c1(slice_secs, &mut tr).await?,
                (Case::PublishC1, false) => sy.publish_c1(slice_secs, &mut tw).await?,
                (Case::PublishAsync, true) => raw.publish_window(slice_secs, &mut tr).await?,
                (Case::PublishAsync, false) => sy.publish_window(slice_secs, &mut tw).await?,
                (Case::Consume, true) => raw.consume(per_slice, &mut tr).await?,
                (Case::Consume | Case::ConsumeSubjects, false) => {
                    sy.consume(per_slice, &mut tw).await?
                }
                (Case::ConsumeSubjects, true) => {}
            }
            if raw_turn {
                tr.add_cpu(&cpu);
            } else {
                tw.add_cpu(&cpu);
            }
        }
    }
    raw.finish().await?;
    sy.finish(admin).await?;
    Ok((tr, tw))
}

/// 4 batch publishers (1000 per batch) and 2 members of one group consuming and acking
/// at once, through the `Bus` trait; returns acked msg/s.
async fn end_to_end<B: Bus + Clone + 'static>(bus: B, secs: f64) -> Result<f64, BoxError> {
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let payload = payload();
    let mut consumers = Vec::new();
    for _ in 0..2 {
        let mut sub = bus.subscribe("e2e", GROUP, subscribe_options()).await?;
        let stop = stop.clone();
        let acked = acked.clone();
        consumers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let Ok(batch) =
                    tokio::time::timeout(Duration::from_millis(100), sub.next_batch(PULL_BATCH))
                        .await
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
    for _ in 0..4 {
        let bus = bus.clone();
        let stop = stop.clone();
        let payload = payload.clone();
        publishers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let envs: Vec<_> = (0..1000).map(|_| envelope(&payload)).collect();
                bus.publish_batch("e2e", envs).await?;
            }
            Ok::<_, switchyard::Error>(())
        }));
    }
    // Unmeasured start (connections, streams, first pulls).
    tokio::time::sleep(Duration::from_millis(300)).await;
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

/// Runs the `nats` suite and returns its figures.
pub async fn run(s: &Settings) -> Result<Vec<Figure>, BoxError> {
    let server = tokio::task::block_in_place(NatsServer::start)?
        .ok_or("nats-server is not installed (`apt-get install nats-server`)")?;
    let url = server.url();
    let server_pid = server.pid().to_string();
    let admin_client = async_nats::connect(url.as_str()).await?;
    let admin = jetstream::new(admin_client.clone());
    let mut figures = Vec::new();

    let cases = [
        (
            Case::PublishC1,
            "publish.c1",
            "publish, ack awaited, one at a time",
        ),
        (
            Case::PublishAsync,
            "publish.async1000",
            "publish with 1,000 acks in flight",
        ),
        (
            Case::Consume,
            "consume",
            "durable pull consumer draining a backlog, explicit ack per message",
        ),
        (
            Case::ConsumeSubjects,
            "consume.subjects",
            "the same backlog with 1,024 ordering keys (16 partition lanes, per-subject order), alone: compare with nats.switchyard.consume",
        ),
    ];
    for (ci, (case, name, what)) in cases.into_iter().enumerate() {
        let raw_name = format!("nats.raw.{name}");
        let sy_name = format!("nats.switchyard.{name}");
        let ratio_name = format!("nats.ratio.{name}");
        if ![&raw_name, &sy_name, &ratio_name]
            .iter()
            .any(|n| s.selected(n))
        {
            continue;
        }
        let alone = matches!(case, Case::ConsumeSubjects);
        let (mut raw, mut sy, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
        // CPU µs per message: (raw client, switchyard client, raw server, switchyard
        // server, switchyard / raw client).
        let mut cpu: [Vec<f64>; 5] = Default::default();
        for run in 0..s.runs {
            progress(&format!("nats.{name} (run {}/{})", run + 1, s.runs));
            let tag = format!("b{ci}r{run}");
            let (r, w) = pair(&server_pid, &url, &admin, case, &tag, run % 2 == 0, s).await?;
            sy.push(w.rate());
            if !alone {
                raw.push(r.rate());
                ratio.push(w.rate() / r.rate());
            }
            let ((rc, rs), (wc, ws)) = (r.cpu_per_msg(), w.cpu_per_msg());
            for (i, v) in [rc, wc, rs, ws].into_iter().enumerate() {
                cpu[i].extend(v);
            }
            if let (Some(rc), Some(wc)) = (rc, wc) {
                cpu[4].push(wc / rc);
            }
        }
        if alone {
            figures.push(
                Figure::from_runs(&sy_name, "msg/s", sy)
                    .with_note(format!("switchyard NatsBus, {what}")),
            );
            for (figure, values, note) in [
                (
                    format!("{sy_name}.cpu_us"),
                    std::mem::take(&mut cpu[1]),
                    "bench process CPU per message",
                ),
                (
                    format!("{sy_name}.server_cpu_us"),
                    std::mem::take(&mut cpu[3]),
                    "nats-server CPU per message",
                ),
            ] {
                if !values.is_empty() {
                    figures.push(Figure::from_runs(&figure, "µs/msg", values).with_note(note));
                }
            }
            continue;
        }
        figures.push(
            Figure::from_runs(&raw_name, "msg/s", raw)
                .with_note(format!("raw peer: async-nats JetStream, {what}")),
        );
        figures.push(
            Figure::from_runs(&sy_name, "msg/s", sy)
                .with_note(format!("switchyard NatsBus, {what}")),
        );
        figures.push(
            Figure::from_runs(&ratio_name, "x", ratio)
                .with_note("switchyard / raw, pair by pair per run"),
        );
        let [raw_client, sy_client, raw_server, sy_server, cpu_ratio] = cpu;
        for (figure, values, note) in [
            (
                format!("{raw_name}.cpu_us"),
                raw_client,
                "bench process CPU per message, raw side's slices",
            ),
            (
                format!("{sy_name}.cpu_us"),
                sy_client,
                "bench process CPU per message, switchyard side's slices",
            ),
            (
                format!("{raw_name}.server_cpu_us"),
                raw_server,
                "nats-server CPU per message, raw side's slices",
            ),
            (
                format!("{sy_name}.server_cpu_us"),
                sy_server,
                "nats-server CPU per message, switchyard side's slices",
            ),
            (
                format!("{ratio_name}.cpu"),
                cpu_ratio,
                "switchyard / raw client CPU per message, pair by pair per run",
            ),
        ] {
            if !values.is_empty() {
                let unit = if figure.ends_with(".cpu") {
                    "x"
                } else {
                    "µs/msg"
                };
                figures.push(Figure::from_runs(&figure, unit, values).with_note(note));
            }
        }
    }

    for name in ["nats.e2e.embedded", "nats.e2e.nats"] {
        if !s.selected(name) {
            continue;
        }
        let mut v = Vec::new();
        for run in 0..s.runs {
            progress(&format!("{name} (run {}/{})", run + 1, s.runs));
            if name == "nats.e2e.embedded" {
                let dir = tempfile::tempdir()?;
                let bus = switchyard_embedded::EmbeddedBus::open(dir.path())?;
                v.push(end_to_end(bus, s.secs).await?);
            } else {
                let tag = format!("e{run}");
                let mut config = NatsConfig::new(url.as_str());
                config.namespace = Some(tag.clone());
                v.push(end_to_end(NatsBus::new(config), s.secs).await?);
                admin.delete_stream(format!("SY_{tag}_e2e")).await?;
            }
        }
        let note = if name == "nats.e2e.embedded" {
            "embedded bus (fsync durability), 4 batch publishers + 2 consumers, publish -> consume -> ack"
        } else {
            "NatsBus on the suite's nats-server (2.9.10 does not fsync), same load"
        };
        figures.push(Figure::from_runs(name, "msg/s", v).with_note(note));
    }

    admin_client.drain().await?;
    tokio::task::block_in_place(|| drop(server));
    eprint!("\r\x1b[2K");
    Ok(figures)
}
