//! The gRPC half of the `rpc` suite: the switchyard gRPC stack against raw tonic.
//!
//! Both sides serve `switchyard.test.v1.Echo` (`switchyard_rpc::grpc::echo::EchoService`,
//! a short message, no delay) on a loopback port of this process:
//!
//! - **raw**: `tonic::transport::Server` with only the Echo service, called through a
//!   `tonic::transport::Channel` (one HTTP/2 connection, `TCP_NODELAY`);
//! - **switchyard**: the same service behind `switchyard_rpc::grpc::GrpcServer` (context
//!   layer with `grpc-timeout` deadline and cancellation, span, panic guard, health),
//!   called **by name** through `GrpcClient` with every layer on: deadline (sent as
//!   `grpc-timeout`), bulkhead, retry policy with budget (the method is declared
//!   idempotent, so every call is retry-eligible and its request is buffered), breaker per
//!   instance, power-of-two-choices balancing with ejection, and context propagation
//!   (`traceparent`, correlation id).
//!
//! Figures: `rpc.grpc.{raw,switchyard}.rtt.{p50,p99}` (µs, sequential round trips on one
//! connection), `rpc.grpc.{raw,switchyard}.c64` (req/s, 64 calls in flight on one
//! connection), and `rpc.grpc.ratio.{c64,p50}` (switchyard / raw, pair by pair within
//! each run, then the median). The order of the two sides alternates between runs.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use switchyard_rpc::grpc::echo::{EchoClient, EchoRequest, EchoService};
use switchyard_rpc::grpc::{GrpcChannel, GrpcClient, GrpcServer};
use switchyard_rpc::registry::StaticRegistry;
use switchyard_rpc::{CallContext, CallOptions, ClientConfig};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint};

use crate::Settings;
use crate::report::Figure;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Calls in flight in the throughput figures.
const IN_FLIGHT: usize = 64;

/// The service name the switchyard client calls.
const SERVICE: &str = "echo";

/// The Echo method's path (declared idempotent on the switchyard client).
const METHOD: &str = "/switchyard.test.v1.Echo/Echo";

/// Time each loop runs before its measurement starts (connections, caches).
const WARMUP: Duration = Duration::from_millis(300);

/// A server on a loopback port, stopped on drop.
struct Running {
    url: String,
    stop: Option<oneshot::Sender<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

async fn raw_server() -> Result<Running, BoxError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let (tx, rx) = oneshot::channel::<()>();
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    tokio::spawn(async move {
        let served = tonic::transport::Server::builder()
            .add_service(EchoService::new().server())
            .serve_with_incoming_shutdown(incoming, async {
                let _ = rx.await;
            })
            .await;
        if let Err(e) = served {
            eprintln!("bench rpc: raw gRPC server failed: {e}");
        }
    });
    Ok(Running {
        url,
        stop: Some(tx),
    })
}

async fn switchyard_server() -> Result<Running, BoxError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let (tx, rx) = oneshot::channel::<()>();
    let server = GrpcServer::new(SERVICE).add_service(EchoService::new().server());
    tokio::spawn(async move {
        let served = server
            .serve(listener, async {
                let _ = rx.await;
            })
            .await;
        if let Err(e) = served {
            eprintln!("bench rpc: switchyard gRPC server failed: {e}");
        }
    });
    Ok(Running {
        url,
        stop: Some(tx),
    })
}

fn request() -> EchoRequest {
    EchoRequest {
        message: "hello from the rpc benchmark".into(),
        ..EchoRequest::default()
    }
}

/// A call as the switchyard side makes it: in a context (trace, correlation id).
fn switchyard_request(ctx: &CallContext) -> tonic::Request<EchoRequest> {
    use switchyard_rpc::grpc::GrpcRequestExt;
    tonic::Request::new(request()).with_options(CallOptions::new().context(ctx.clone()))
}

/// One side's client: how to make one call.
trait Side: Clone + Send + 'static {
    fn call(&mut self) -> impl Future<Output = Result<(), tonic::Status>> + Send;
}

#[derive(Clone)]
struct Raw(EchoClient<Channel>);

impl Side for Raw {
    async fn call(&mut self) -> Result<(), tonic::Status> {
        self.0.echo(tonic::Request::new(request())).await.map(drop)
    }
}

#[derive(Clone)]
struct Switchyard {
    client: EchoClient<GrpcChannel>,
    ctx: CallContext,
}

impl Side for Switchyard {
    async fn call(&mut self) -> Result<(), tonic::Status> {
        let req = switchyard_request(&self.ctx);
        self.client.echo(req).await.map(drop)
    }
}

/// Sequential round trips for `secs`: (p50, p99) in µs.
async fn rtt(mut side: impl Side, secs: f64) -> Result<(f64, f64), BoxError> {
    let warm_until = Instant::now() + WARMUP;
    while Instant::now() < warm_until {
        side.call().await?;
    }
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let until = Instant::now() + Duration::from_secs_f64(secs);
    while Instant::now() < until {
        let t = Instant::now();
        side.call().await?;
        h.record(t.elapsed().as_micros().max(1) as u64)?;
    }
    Ok((
        h.value_at_quantile(0.5) as f64,
        h.value_at_quantile(0.99) as f64,
    ))
}

/// `IN_FLIGHT` closed loops for `secs`: completed calls per second.
async fn throughput(side: impl Side, secs: f64) -> Result<f64, BoxError> {
    let done = Arc::new(AtomicU64::new(0));
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::with_capacity(IN_FLIGHT);
    for _ in 0..IN_FLIGHT {
        let mut side = side.clone();
        let (done, measuring, stop) = (done.clone(), measuring.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                side.call().await?;
                if measuring.load(Ordering::Relaxed) {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok::<(), tonic::Status>(())
        }));
    }
    tokio::time::sleep(WARMUP).await;
    measuring.store(true, Ordering::Relaxed);
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    let n = done.load(Ordering::Relaxed);
    let elapsed = t.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await??;
    }
    Ok(n as f64 / elapsed)
}

/// One run of one side: (p50 µs, p99 µs, req/s).
async fn measure(s: &Settings, side: impl Side, kind: &str) -> Result<[f64; 3], BoxError> {
    let (p50, p99) =
        if s.selected(&format!("rpc.grpc.{kind}.rtt")) || s.selected("rpc.grpc.ratio.p50") {
            rtt(side.clone(), s.secs).await?
        } else {
            (0.0, 0.0)
        };
    let c64 = if s.selected(&format!("rpc.grpc.{kind}.c64")) || s.selected("rpc.grpc.ratio.c64") {
        throughput(side, s.secs).await?
    } else {
        0.0
    };
    Ok([p50, p99, c64])
}

/// Measures the gRPC figures (see the [module docs](self)).
pub async fn figures(s: &Settings) -> Result<Vec<Figure>, BoxError> {
    if !s.selected("rpc.grpc") {
        return Ok(Vec::new());
    }
    let raw_srv = raw_server().await?;
    let sy_srv = switchyard_server().await?;
    let raw = Raw(EchoClient::new(
        Endpoint::from_shared(raw_srv.url.clone())?
            .tcp_nodelay(true)
            .connect()
            .await?,
    ));
    let registry = StaticRegistry::default().with(SERVICE, &sy_srv.url);
    let client = GrpcClient::with_config(Arc::new(registry), ClientConfig::default())
        .idempotent_methods([METHOD]);
    let ctx = CallContext {
        correlation_id: Some("bench-rpc-grpc".into()),
        ..CallContext::default()
    }
    .downstream();
    let sy = Switchyard {
        client: EchoClient::new(client.channel(SERVICE)),
        ctx,
    };
    let mut raw_runs: Vec<[f64; 3]> = Vec::new();
    let mut sy_runs: Vec<[f64; 3]> = Vec::new();
    for run in 0..s.runs.max(1) {
        let (r, y) = if run % 2 == 0 {
            let r = measure(s, raw.clone(), "raw").await?;
            (r, measure(s, sy.clone(), "switchyard").await?)
        } else {
            let y = measure(s, sy.clone(), "switchyard").await?;
            (measure(s, raw.clone(), "raw").await?, y)
        };
        raw_runs.push(r);
        sy_runs.push(y);
    }
    let col = |runs: &[[f64; 3]], i: usize| runs.iter().map(|r| r[i]).collect::<Vec<_>>();
    let ratio = |i: usize| {
        raw_runs
            .iter()
            .zip(&sy_runs)
            .map(|(r, y)| if r[i] > 0.0 { y[i] / r[i] } else { 0.0 })
            .collect::<Vec<_>>()
    };
    let all = [
        Figure::from_runs("rpc.grpc.raw.rtt.p50", "µs", col(&raw_runs, 0))
            .with_note("raw peer: tonic server + tonic client, sequential, 1 connection"),
        Figure::from_runs("rpc.grpc.raw.rtt.p99", "µs", col(&raw_runs, 1))
            .with_note("raw peer, sequential, 1 connection"),
        Figure::from_runs("rpc.grpc.raw.c64", "req/s", col(&raw_runs, 2))
            .with_note("raw peer, 64 requests in flight"),
        Figure::from_runs("rpc.grpc.switchyard.rtt.p50", "µs", col(&sy_runs, 0))
            .with_note("switchyard GrpcServer + GrpcChannel by name, all layers on"),
        Figure::from_runs("rpc.grpc.switchyard.rtt.p99", "µs", col(&sy_runs, 1))
            .with_note("switchyard, sequential, 1 connection"),
        Figure::from_runs("rpc.grpc.switchyard.c64", "req/s", col(&sy_runs, 2))
            .with_note("switchyard, 64 requests in flight"),
        Figure::from_runs("rpc.grpc.ratio.c64", "x", ratio(2))
            .with_note("switchyard / raw req/s, pair by pair per run (target >= 0.90)"),
        Figure::from_runs("rpc.grpc.ratio.p50", "x", ratio(0))
            .with_note("switchyard / raw rtt p50, pair by pair per run (target <= 1.10)"),
    ];
    drop((raw_srv, sy_srv));
    Ok(all.into_iter().filter(|f| s.selected(&f.figure)).collect())
}
