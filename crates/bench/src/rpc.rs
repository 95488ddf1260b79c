//! The `rpc` suite: sync calls over HTTP, the switchyard stack against the raw peer.
//!
//! Both sides run a trivial JSON echo (`POST /echo`, `{"seq":…,"msg":"…"}` in and out) on
//! a loopback port of this process:
//!
//! - **raw**: an axum router with `axum::Json` served by `axum::serve`, called through a
//!   `hyper_util` legacy client (pooled keep-alive, `TCP_NODELAY`) with a pre-parsed URI;
//! - **switchyard**: the same handler behind `switchyard_rpc::http::router` (context and
//!   deadline middleware, body limit, problem+json) served by `switchyard_rpc::http::serve`,
//!   called **by name** through `HttpClient` with every layer on: deadline (propagated in
//!   `x-switchyard-deadline`), bulkhead, retry policy with budget (each call carries an
//!   idempotency key, so it is retry-eligible), per-instance breaker, power-of-two-choices
//!   balancing with ejection, and context propagation (`traceparent`, idempotency key).
//!
//! Each run measures both sides back to back (the order alternates between runs), and the
//! ratios are taken pair by pair within a run, then their median is reported.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::routing::post;
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::Uri;
use hyper::header::{ACCEPT, CONTENT_TYPE};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use switchyard_rpc::http::{ServerOptions, router, serve};
use switchyard_rpc::registry::StaticRegistry;
use switchyard_rpc::{CallOptions, ClientConfig, HttpClient, ServiceClient};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::Settings;
use crate::report::Figure;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Requests in flight in the throughput figures.
pub const IN_FLIGHT: usize = 64;

/// The echo path on both servers.
const PATH: &str = "/echo";

/// The service name the switchyard client calls.
const SERVICE: &str = "echo";

/// Time each closed loop runs before its measurement starts (connections, caches).
const WARMUP: Duration = Duration::from_millis(300);

/// The echoed document (about 90 bytes of JSON).
#[derive(Debug, Serialize, Deserialize)]
struct Echo {
    seq: u64,
    msg: String,
}

fn echo(seq: u64) -> Echo {
    Echo {
        seq,
        msg: "the quick brown fox jumps over the lazy dog, twice: the quick brown fox".into(),
    }
}

fn progress(label: &str) {
    eprint!("\r\x1b[2K  {label}");
    let _ = std::io::stderr().flush();
}

/// A server on a loopback port; stopped (gracefully) by [`Server::stop`].
struct Server {
    url: String,
    stop: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Server {
    async fn stop(self) -> Result<(), BoxError> {
        let _ = self.stop.send(());
        self.task.await??;
        Ok(())
    }
}

/// The raw peer's server: plain axum, `axum::Json` in and out, nothing else.
async fn raw_server() -> Result<Server, BoxError> {
    let app = axum::Router::new().route(
        PATH,
        post(|axum::Json(e): axum::Json<Echo>| async move { axum::Json(e) }),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await
    });
    Ok(Server { url, stop, task })
}

/// The switchyard server: the same handler with `switchyard_rpc::http::Json`, wrapped by
/// `router()` and run by `serve()`.
async fn switchyard_server() -> Result<Server, BoxError> {
    use switchyard_rpc::http::Json;
    let app = axum::Router::new().route(PATH, post(|Json(e): Json<Echo>| async move { Json(e) }));
    let opts = ServerOptions::new(SERVICE);
    opts.health.set_ready(true);
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(listener, router(app, &opts), async {
        let _ = stopped.await;
    }));
    Ok(Server { url, stop, task })
}

/// The raw peer's client: `hyper_util`'s legacy client and the echo URI.
#[derive(Clone)]
struct RawClient {
    client: Client<HttpConnector, Full<Bytes>>,
    uri: Uri,
}

/// One side of the comparison, as a client ready to call its server.
#[derive(Clone)]
enum Peer {
    /// The raw peer.
    Raw(Box<RawClient>),
    /// The switchyard client of service `echo`.
    Switchyard(ServiceClient),
}

impl Peer {
    fn raw(url: &str) -> Result<Peer, BoxError> {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(Peer::Raw(Box::new(RawClient {
            client,
            uri: format!("{url}{PATH}").parse()?,
        })))
    }

    fn switchyard(url: &str) -> Peer {
        let registry = StaticRegistry::default().with(SERVICE, url);
        let client = HttpClient::with_config(Arc::new(registry), ClientConfig::default());
        Peer::Switchyard(client.service(SERVICE))
    }

    /// One round trip; the answer is decoded and checked.
    async fn call(&self, seq: u64) -> Result<(), BoxError> {
        let back: Echo = match self {
            Peer::Raw(raw) => {
                let RawClient { client, uri } = &**raw;
                let body = serde_json::to_vec(&echo(seq))?;
                let req = hyper::Request::post(uri.clone())
                    .header(CONTENT_TYPE, "application/json")
                    .header(ACCEPT, "application/json")
                    .body(Full::new(Bytes::from(body)))?;
                let resp = client.request(req).await?;
                if !resp.status().is_success() {
                    return Err(format!("raw echo answered {}", resp.status()).into());
                }
                let bytes = resp.into_body().collect().await?.to_bytes();
                serde_json::from_slice(&bytes)?
            }
            Peer::Switchyard(svc) => {
                let opts = CallOptions::new().idempotency_key(format!("bench-{seq}"));
                svc.post_json_with(PATH, &echo(seq), &opts).await?
            }
        };
        if back.seq != seq {
            return Err(format!("echo of {seq} came back as {}", back.seq).into());
        }
        Ok(())
    }
}

/// Round-trip latencies of one run, in µs.
struct Rtt {
    p50: f64,
    p99: f64,
}

/// Sequential round trips on one connection for `secs` (after a warm-up).
async fn rtt(peer: &Peer, secs: f64) -> Result<Rtt, BoxError> {
    let warm_until = Instant::now() + WARMUP;
    let mut seq = 0u64;
    while Instant::now() < warm_until {
        peer.call(seq).await?;
        seq += 1;
    }
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < secs {
        let t0 = Instant::now();
        peer.call(seq).await?;
        h.record((t0.elapsed().as_nanos() as u64).max(1))?;
        seq += 1;
    }
    Ok(Rtt {
        p50: h.value_at_quantile(0.50) as f64 / 1000.0,
        p99: h.value_at_quantile(0.99) as f64 / 1000.0,
    })
}

/// [`IN_FLIGHT`] callers in a closed loop; completed calls per second over `secs`.
async fn throughput(peer: &Peer, secs: f64) -> Result<f64, BoxError> {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(IN_FLIGHT);
    for t in 0..IN_FLIGHT as u64 {
        let (peer, stop, done) = (peer.clone(), stop.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut seq = t << 40;
            while !stop.load(Ordering::Relaxed) {
                peer.call(seq).await?;
                done.fetch_add(1, Ordering::Relaxed);
                seq += 1;
            }
            Ok::<_, BoxError>(())
        }));
    }
    tokio::time::sleep(WARMUP).await;
    let (n0, t0) = (done.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    let (n1, elapsed) = (done.load(Ordering::Relaxed), t0.elapsed().as_secs_f64());
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await??;
    }
    Ok((n1 - n0) as f64 / elapsed)
}

/// The figures of one side, one value per run.
#[derive(Default)]
struct Side {
    p50: Vec<f64>,
    p99: Vec<f64>,
    c64: Vec<f64>,
}

/// Runs the `rpc` suite and returns its figures.
pub async fn run(s: &Settings) -> Result<Vec<Figure>, BoxError> {
    let want = |names: &[&str]| names.iter().any(|n| s.selected(n));
    let want_rtt = want(&[
        "rpc.http.raw.rtt.p50",
        "rpc.http.raw.rtt.p99",
        "rpc.http.switchyard.rtt.p50",
        "rpc.http.switchyard.rtt.p99",
        "rpc.http.ratio.p50",
    ]);
    let want_c64 = want(&[
        "rpc.http.raw.c64",
        "rpc.http.switchyard.c64",
        "rpc.http.ratio.c64",
    ]);
    let mut figures = Vec::new();

    if want_rtt || want_c64 {
        let raw_srv = raw_server().await?;
        let sy_srv = switchyard_server().await?;
        let (mut raw, mut sy) = (Side::default(), Side::default());
        let (mut ratio_p50, mut ratio_c64) = (Vec::new(), Vec::new());
        for run in 0..s.runs {
            // Alternate who goes first, so a drift of the machine does not favour one side.
            let raw_first = run % 2 == 0;
            if want_rtt {
                progress(&format!("rpc.http rtt (run {}/{})", run + 1, s.runs));
                let (r, w) = measure_pair(raw_first, &raw_srv.url, &sy_srv.url, async |p| {
                    rtt(p, s.secs).await
                })
                .await?;
                ratio_p50.push(w.p50 / r.p50);
                raw.p50.push(r.p50);
                raw.p99.push(r.p99);
                sy.p50.push(w.p50);
                sy.p99.push(w.p99);
            }
            if want_c64 {
                progress(&format!("rpc.http c64 (run {}/{})", run + 1, s.runs));
                let (r, w) = measure_pair(raw_first, &raw_srv.url, &sy_srv.url, async |p| {
                    throughput(p, s.secs).await
                })
                .await?;
                ratio_c64.push(w / r);
                raw.c64.push(r);
                sy.c64.push(w);
            }
        }
        raw_srv.stop().await?;
        sy_srv.stop().await?;

        if want_rtt {
            figures.push(
                Figure::from_runs("rpc.http.raw.rtt.p50", "µs", raw.p50).with_note(
                    "raw peer: axum server + hyper-util client, sequential, 1 connection",
                ),
            );
            figures.push(Figure::from_runs("rpc.http.raw.rtt.p99", "µs", raw.p99));
        }
        if want_c64 {
            figures.push(
                Figure::from_runs("rpc.http.raw.c64", "req/s", raw.c64)
                    .with_note("raw peer, 64 requests in flight"),
            );
        }
        if want_rtt {
            figures.push(
                Figure::from_runs("rpc.http.switchyard.rtt.p50", "µs", sy.p50)
                    .with_note("switchyard router/serve + HttpClient by name, all layers on"),
            );
            figures.push(Figure::from_runs(
                "rpc.http.switchyard.rtt.p99",
                "µs",
                sy.p99,
            ));
        }
        if want_c64 {
            figures.push(
                Figure::from_runs("rpc.http.switchyard.c64", "req/s", sy.c64)
                    .with_note("switchyard, 64 requests in flight"),
            );
            figures.push(
                Figure::from_runs("rpc.http.ratio.c64", "x", ratio_c64)
                    .with_note("switchyard / raw req/s, pair by pair per run (target >= 0.90)"),
            );
        }
        if want_rtt {
            figures.push(
                Figure::from_runs("rpc.http.ratio.p50", "x", ratio_p50)
                    .with_note("switchyard / raw rtt p50, pair by pair per run (target <= 1.10)"),
            );
        }
    }

    figures.extend(crate::rpc_grpc::figures(s).await?);

    eprint!("\r\x1b[2K");
    Ok(figures)
}

/// Measures `f` on a fresh raw client and a fresh switchyard client, in the given order;
/// returns (raw, switchyard).
async fn measure_pair<T>(
    raw_first: bool,
    raw_url: &str,
    switchyard_url: &str,
    f: impl AsyncFn(&Peer) -> Result<T, BoxError>,
) -> Result<(T, T), BoxError> {
    if raw_first {
        let r = f(&Peer::raw(raw_url)?).await?;
        let w = f(&Peer::switchyard(switchyard_url)).await?;
        Ok((r, w))
    } else {
        let w = f(&Peer::switchyard(switchyard_url)).await?;
        let r = f(&Peer::raw(raw_url)?).await?;
        Ok((r, w))
    }
}
