//! A fixed number of the `rpc` suite's round trips, to count their cost per call
//! (instructions, allocations) under valgrind: wall-clock figures on a shared machine
//! are too noisy to compare builds by, counts are not.
//!
//! The servers, clients and per-call options are those of `bench rpc`
//! (`src/rpc.rs`, `src/rpc_grpc.rs`): the same echo exchange against the raw peer
//! (axum + hyper-util, plain tonic) and through the switchyard stack with every layer on.
//!
//! Run with:
//!
//! ```text
//! cargo run --release -p bench --example rpc_counts -- <http|grpc> <raw|switchyard> <seq|seq2|c64> [calls] [warm-up]
//! ```
//!
//! Run it under `valgrind --tool=callgrind` twice with different `calls` (e.g. 2000 and
//! 6000) and divide the difference of the two totals by the difference of the calls: the
//! start-up and warm-up cost cancels out, what is left is one round trip, client and
//! server together. Allocations per round trip are the calls to the allocator
//! (`mi_malloc_aligned`, `mi_zalloc_aligned`, `mi_realloc_aligned`) in the same two
//! profiles, treated the same way. `seq` runs one caller on a current-thread runtime
//! (`seq2`: on the two-worker runtime, as the bench times round trips);
//! `c64` runs 64 callers on a two-worker runtime (valgrind runs one thread at a time, so
//! this counts the work-stealing and wake-up paths, not lock contention).
//!
//! By default no `tracing` subscriber is installed, as in `bench rpc`. With
//! `RPC_COUNTS_FILTER=<directives>` (e.g. `warn` or `info`, the `EnvFilter` syntax) a
//! level-filtered `fmt` subscriber writing to stderr is installed first, the same for
//! both sides — as the shop's services run (`RUST_LOG`, default `info`). Without a
//! subscriber, `tracing`'s `log` feature (on in this build: sqlx asks for it) makes every
//! span and event of h2, hyper, tonic and switchyard evaluate its fields on both sides.

use std::sync::Arc;

use axum::routing::post;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Uri;
use hyper::header::{ACCEPT, CONTENT_TYPE};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use switchyard_rpc::grpc::echo::{EchoClient, EchoRequest, EchoService};
use switchyard_rpc::grpc::{GrpcChannel, GrpcClient, GrpcRequestExt, GrpcServer};
use switchyard_rpc::http::{ServerOptions, router, serve};
use switchyard_rpc::registry::StaticRegistry;
use switchyard_rpc::{CallContext, CallOptions, ClientConfig, HttpClient, ServiceClient};
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The bench's allocator (its per-call cost is part of what is counted).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const PATH: &str = "/echo";
const SERVICE: &str = "echo";
const METHOD: &str = "/switchyard.test.v1.Echo/Echo";

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

/// One side's client, as in `bench rpc`.
#[derive(Clone)]
enum Peer {
    HttpRaw(Client<HttpConnector, Full<Bytes>>, Uri),
    HttpSwitchyard(ServiceClient),
    GrpcRaw(EchoClient<Channel>),
    GrpcSwitchyard(EchoClient<GrpcChannel>, CallContext),
}

impl Peer {
    async fn call(&mut self, seq: u64) -> Result<(), BoxError> {
        match self {
            Peer::HttpRaw(client, uri) => {
                let body = serde_json::to_vec(&echo(seq))?;
                let req = hyper::Request::post(uri.clone())
                    .header(CONTENT_TYPE, "application/json")
                    .header(ACCEPT, "application/json")
                    .body(Full::new(Bytes::from(body)))?;
                let resp = client.request(req).await?;
                let bytes = resp.into_body().collect().await?.to_bytes();
                let back: Echo = serde_json::from_slice(&bytes)?;
                check(back.seq, seq)
            }
            Peer::HttpSwitchyard(svc) => {
                let opts = CallOptions::new().idempotency_key(format!("bench-{seq}"));
                let back: Echo = svc.post_json_with(PATH, &echo(seq), &opts).await?;
                check(back.seq, seq)
            }
            Peer::GrpcRaw(c) => Ok(c.echo(tonic::Request::new(request())).await.map(drop)?),
            Peer::GrpcSwitchyard(c, ctx) => {
                let req = tonic::Request::new(request())
                    .with_options(CallOptions::new().context(ctx.clone()));
                Ok(c.echo(req).await.map(drop)?)
            }
        }
    }
}

fn check(got: u64, want: u64) -> Result<(), BoxError> {
    if got == want {
        Ok(())
    } else {
        Err(format!("echo of {want} came back as {got}").into())
    }
}

fn request() -> EchoRequest {
    EchoRequest {
        message: "hello from the rpc benchmark".into(),
        ..EchoRequest::default()
    }
}

async fn listener() -> Result<(TcpListener, String), BoxError> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", l.local_addr()?);
    Ok((l, url))
}

/// Starts the server of `transport`/`side` and returns its client.
async fn start(transport: &str, side: &str) -> Result<Peer, BoxError> {
    let (l, url) = listener().await?;
    Ok(match (transport, side) {
        ("http", "raw") => {
            let app = axum::Router::new().route(
                PATH,
                post(|axum::Json(e): axum::Json<Echo>| async move { axum::Json(e) }),
            );
            tokio::spawn(async move { axum::serve(l, app).await });
            let mut connector = HttpConnector::new();
            connector.set_nodelay(true);
            let client = Client::builder(TokioExecutor::new()).build(connector);
            Peer::HttpRaw(client, format!("{url}{PATH}").parse()?)
        }
        ("http", "switchyard") => {
            use switchyard_rpc::http::Json;
            let app =
                axum::Router::new().route(PATH, post(|Json(e): Json<Echo>| async move { Json(e) }));
            let opts = ServerOptions::new(SERVICE);
            tokio::spawn(serve(l, router(app, &opts), std::future::pending()));
            let registry = StaticRegistry::default().with(SERVICE, &url);
            let client = HttpClient::with_config(Arc::new(registry), ClientConfig::default());
            Peer::HttpSwitchyard(client.service(SERVICE))
        }
        ("grpc", "raw") => {
            let incoming = TcpIncoming::from(l).with_nodelay(Some(true));
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(EchoService::new().server())
                    .serve_with_incoming(incoming),
            );
            let ch = Endpoint::from_shared(url)?
                .tcp_nodelay(true)
                .connect()
                .await?;
            Peer::GrpcRaw(EchoClient::new(ch))
        }
        ("grpc", "switchyard") => {
            let server = GrpcServer::new(SERVICE).add_service(EchoService::new().server());
            tokio::spawn(server.serve(l, std::future::pending()));
            let registry = StaticRegistry::default().with(SERVICE, &url);
            let client = GrpcClient::with_config(Arc::new(registry), ClientConfig::default())
                .idempotent_methods([METHOD]);
            let ctx = CallContext {
                correlation_id: Some("bench-rpc-grpc".into()),
                ..CallContext::default()
            }
            .downstream();
            Peer::GrpcSwitchyard(EchoClient::new(client.channel(SERVICE)), ctx)
        }
        _ => return Err(format!("unknown transport/side {transport}/{side}").into()),
    })
}

/// `calls` round trips: one caller in sequence, or 64 callers sharing them.
async fn run(peer: &Peer, callers: u64, calls: u64) -> Result<(), BoxError> {
    let mut tasks = Vec::new();
    for t in 0..callers {
        let mut peer = peer.clone();
        let n = calls / callers + u64::from(t < calls % callers);
        tasks.push(tokio::spawn(async move {
            for i in 0..n {
                peer.call(t << 40 | i).await?;
            }
            Ok::<_, BoxError>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, d: &str| args.get(i).cloned().unwrap_or_else(|| d.to_string());
    let (transport, side, shape) = (arg(0, "http"), arg(1, "switchyard"), arg(2, "seq"));
    let calls: u64 = arg(3, "2000").parse()?;
    let warm: u64 = arg(4, "2000").parse()?;
    if let Ok(filter) = std::env::var("RPC_COUNTS_FILTER") {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .try_init()?;
    }
    let (rt, callers) = match shape.as_str() {
        "seq" => (
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?,
            1,
        ),
        // One caller on the two-worker runtime, as `bench rpc` measures round-trip times.
        "seq2" => (
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?,
            1,
        ),
        "c64" => (
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?,
            64,
        ),
        other => return Err(format!("unknown shape {other}").into()),
    };
    rt.block_on(async {
        let peer = start(&transport, &side).await?;
        run(&peer, callers, warm).await?;
        run(&peer, callers, calls).await?;
        println!("{transport} {side} {shape}: {warm} + {calls} calls");
        Ok::<_, BoxError>(())
    })?;
    rt.shutdown_background();
    Ok(())
}
