//! The `shop` suite: orders placed through the Order service's public REST API, per
//! pattern, by 64 concurrent clients against the whole shop in one process (embedded bus
//! and stores, real HTTP and gRPC between the services) — `shop.<pattern>.*` — and, when
//! nats-server and PostgreSQL are installed, the same with the bus on NATS JetStream and
//! the stores on PostgreSQL (servers the suite starts on loopback ports), first with every
//! service in this process talking through the servers — `shop.nats_pg.<pattern>.*` —
//! then with every service its own OS process, as `shop up --bus nats://… --store
//! postgres://…` runs them — `shop.processes.<pattern>.*`.
//!
//! A client places an order (`POST /orders`) and then waits for its end
//! (`GET /orders/{id}?wait=60s`; the sync pattern answers `POST` with the final order).
//! Placement latency is the `POST`'s; completion latency runs from before the `POST` to
//! the terminal order. Every order is one of `sku-001`..`sku-020` (never out of stock)
//! with a token that is never declined, so each completes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::header::{CONTENT_TYPE, LOCATION};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use shop::app::{AppConfig, ShopApp, StoreBackend};
use shop::model::Item;
use shop::order::{NewOrder, Order, OrderStatus, Pattern};
use tokio::net::TcpListener;

use crate::Settings;
use crate::report::Figure;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Concurrent clients.
pub const CLIENTS: usize = 64;

fn progress(label: &str) {
    use std::io::Write;
    eprint!("\r\x1b[2K  {label}");
    let _ = std::io::stderr().flush();
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// One run's figures for one pattern.
struct Run {
    per_sec: f64,
    placement_p50: f64,
    placement_p99: f64,
    completion_p50: f64,
    completion_p99: f64,
    /// Store commits per completed order.
    commits_per_order: f64,
    /// Syncs (store journal writes + bus fdatasyncs) per completed order.
    syncs_per_order: f64,
}

async fn send(
    http: &HttpClient,
    method: Method,
    uri: Uri,
    body: Option<Vec<u8>>,
) -> Result<(StatusCode, Option<String>, Bytes), BoxError> {
    let mut req = Request::builder().method(method).uri(uri);
    if body.is_some() {
        req = req.header(CONTENT_TYPE, "application/json");
    }
    let req = req.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
    let res = http.request(req).await?;
    let status = res.status();
    let location = res
        .headers()
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = res.into_body().collect().await?.to_bytes();
    Ok((status, location, body))
}

/// Places one order and waits for its end; returns (placement, completion) in µs.
async fn one(
    http: &HttpClient,
    base: &str,
    pattern: Pattern,
    n: u64,
) -> Result<(u64, u64), BoxError> {
    let order = NewOrder {
        order_id: None,
        customer: format!("c-{}", n % 97),
        items: vec![Item::new(format!("sku-{:03}", 1 + n % 20), 1)],
        payment_token: "tok_ok".into(),
        pattern,
    };
    let started = Instant::now();
    let (status, location, body) = send(
        http,
        Method::POST,
        format!("{base}/orders").parse()?,
        Some(serde_json::to_vec(&order)?),
    )
    .await?;
    let placed = started.elapsed();
    let mut order: Order = match status {
        StatusCode::CREATED | StatusCode::ACCEPTED => serde_json::from_slice(&body)?,
        other => {
            return Err(format!(
                "POST /orders ({pattern}): {other}: {}",
                String::from_utf8_lossy(&body)
            )
            .into());
        }
    };
    if !order.status.is_terminal() {
        let location = location.unwrap_or_else(|| format!("/orders/{}", order.id));
        let (status, _, body) = send(
            http,
            Method::GET,
            format!("{base}{location}?wait=60s").parse()?,
            None,
        )
        .await?;
        if status != StatusCode::OK {
            return Err(format!("GET {location}: {status}").into());
        }
        order = serde_json::from_slice(&body)?;
    }
    let done = started.elapsed();
    if order.status != OrderStatus::Completed {
        return Err(format!(
            "order {} ({pattern}) ended {} ({:?})",
            order.id, order.status, order.reason
        )
        .into());
    }
    Ok((placed.as_micros() as u64, done.as_micros() as u64))
}

/// Where a run's shop keeps its state.
#[derive(Clone, Copy)]
enum Backends<'a> {
    /// The embedded bus and stores.
    Embedded,
    /// A NATS JetStream server and a PostgreSQL server (started by the suite): each run
    /// gets its own namespace on NATS and its own database.
    NatsPostgres(&'a DistributedServers),
    /// The same servers, every service its own OS process (each run its own nats-server
    /// and database).
    Processes(&'a DistributedServers),
}

/// The servers of the distributed runs.
struct DistributedServers {
    nats: switchyard_testkit::servers::NatsServer,
    postgres: switchyard_testkit::servers::Postgres,
    runs: std::sync::atomic::AtomicU32,
}

impl DistributedServers {
    /// Starts both, or `None` when one is not installed (said on stderr).
    fn start() -> Result<Option<Self>, BoxError> {
        let Some(nats) = switchyard_testkit::servers::NatsServer::start()? else {
            return Ok(None);
        };
        let Some(postgres) = switchyard_testkit::servers::Postgres::start()? else {
            return Ok(None);
        };
        Ok(Some(DistributedServers {
            nats,
            postgres,
            runs: std::sync::atomic::AtomicU32::new(0),
        }))
    }

    /// A fresh namespace and database for one run: the app's config on them.
    async fn config(&self, config: AppConfig) -> Result<AppConfig, BoxError> {
        let n = self.runs.fetch_add(1, Ordering::Relaxed);
        let db = shop::app::create_database(&self.postgres.url(), &format!("run{n}")).await?;
        let mut bus = switchyard_nats::NatsConfig::new(self.nats.url());
        bus.namespace = Some(format!("run{n}"));
        Ok(config
            .with_bus(Arc::new(switchyard_nats::NatsBus::new(bus)))
            .with_store(StoreBackend::Postgres(db)))
    }
}

/// `CLIENTS` closed-loop clients placing `pattern` orders for `secs` against a fresh shop
/// whose data lives in a new directory under `data` (and, distributed, on the servers).
async fn run_pattern(
    pattern: Pattern,
    secs: f64,
    data: &std::path::Path,
    backends: Backends<'_>,
) -> Result<Run, BoxError> {
    let dir = tempfile::tempdir_in(data)?.keep();
    let config = AppConfig::new(&dir).with_patterns(&[pattern]);
    let config = match backends {
        Backends::Embedded => config,
        Backends::NatsPostgres(servers) => servers.config(config).await?,
        Backends::Processes(servers) => return run_processes(pattern, secs, &dir, servers).await,
    };
    let app = ShopApp::start(config).await?;
    let (stop_api, api_stopped) = tokio::sync::oneshot::channel::<()>();
    let api = shop::api::start(
        app.desk().clone(),
        Arc::new(shop::api::NoAdmin),
        TcpListener::bind("127.0.0.1:0").await?,
        TcpListener::bind("127.0.0.1:0").await?,
        async move {
            let _ = api_stopped.await;
        },
    )
    .await?;
    let http = http_client();
    warm_up(&http, &api.rest_url, pattern).await?;
    let disk_before = app.disk_stats();
    let load = load(&http, &api.rest_url, pattern, secs).await?;
    let disk = app.disk_stats() - disk_before;
    let _ = stop_api.send(());
    api.join().await?;
    app.shutdown().await?;
    let orders = load.completion.len().max(1) as f64;
    Ok(load.run(
        disk.store_commits as f64 / orders,
        (disk.store_syncs + disk.bus_syncs) as f64 / orders,
    ))
}

/// The multi-process variant: `shop up --bus nats://… --store postgres://…` as this
/// binary would run it — every service its own process (this binary's hidden
/// `shop-process` command), on a nats-server of the run's own (the services' registry
/// and streams start empty) and a fresh database.
async fn run_processes(
    pattern: Pattern,
    secs: f64,
    dir: &std::path::Path,
    servers: &DistributedServers,
) -> Result<Run, BoxError> {
    let nats = switchyard_testkit::servers::NatsServer::start()?
        .ok_or("nats-server is no longer installed")?;
    let n = servers.runs.fetch_add(1, Ordering::Relaxed);
    let store =
        shop::app::create_database(&servers.postgres.url(), &format!("processes{n}")).await?;
    let config = shop::cli::up::UpConfig {
        data_dir: dir.to_path_buf(),
        host: "127.0.0.1".into(),
        port: 0,
        patterns: vec![pattern],
        bus: nats.url(),
        store,
        demo: false,
        replicas: Vec::new(),
    };
    let command = shop::processes::ServiceCommand {
        program: std::env::current_exe()?,
        prefix: vec!["shop-process".into()],
        env: vec![("RUST_LOG".into(), "warn".into())],
        echo: shop::processes::Echo::Stderr,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let launched = shop::processes::up_with(
        command,
        config,
        Box::pin(async move {
            let _ = stopped.await;
        }),
    )
    .await?;
    let base = launched
        .services
        .iter()
        .find(|s| s.name == shop::api::SERVICE)
        .map(|s| s.url.clone())
        .ok_or("the order process printed no REST URL")?;
    let http = http_client();
    let measured = async {
        warm_up(&http, &base, pattern).await?;
        load(&http, &base, pattern, secs).await
    }
    .await;
    let _ = stop.send(());
    launched.stopped.await?;
    drop(nats);
    Ok(measured?.run(f64::NAN, f64::NAN))
}

fn http_client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new()).build(connector)
}

/// Warm-up: connections, caches, the first sagas.
async fn warm_up(http: &HttpClient, base: &str, pattern: Pattern) -> Result<(), BoxError> {
    for n in 0..20 {
        one(http, base, pattern, n).await?;
    }
    Ok(())
}

/// What the closed loop measured.
struct Load {
    elapsed: f64,
    placement: Histogram<u64>,
    completion: Histogram<u64>,
}

impl Load {
    fn run(&self, commits_per_order: f64, syncs_per_order: f64) -> Run {
        let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        Run {
            per_sec: self.completion.len() as f64 / self.elapsed,
            placement_p50: ms(&self.placement, 0.5),
            placement_p99: ms(&self.placement, 0.99),
            completion_p50: ms(&self.completion, 0.5),
            completion_p99: ms(&self.completion, 0.99),
            commits_per_order,
            syncs_per_order,
        }
    }
}

/// `CLIENTS` closed-loop clients placing `pattern` orders at `base` for `secs`.
async fn load(
    http: &HttpClient,
    base: &str,
    pattern: Pattern,
    secs: f64,
) -> Result<Load, BoxError> {
    let base = Arc::new(base.to_string());
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..CLIENTS as u64 {
        let (http, base, stop) = (http.clone(), base.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut placement = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
            let mut completion = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
            let mut n = 1_000 + c * 1_000_000;
            while !stop.load(Ordering::Relaxed) {
                let (p, d) = one(&http, &base, pattern, n).await?;
                placement.record(p.max(1))?;
                completion.record(d.max(1))?;
                n += 1;
            }
            Ok::<_, BoxError>((placement, completion))
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut placement = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let mut completion = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    for t in tasks {
        let (p, c) = t.await??;
        placement.add(p)?;
        completion.add(c)?;
    }
    Ok(Load {
        elapsed: started.elapsed().as_secs_f64(),
        placement,
        completion,
    })
}

/// Runs the `shop` suite.
pub async fn run(s: &Settings) -> Result<Vec<Figure>, BoxError> {
    let mut figures = Vec::new();
    // Every run's data (stores, logs, mail, labels) stays until the whole suite is done:
    // on a file system without a journal, ext4 skips recently deleted inodes when it
    // allocates new ones, so deleting one run's tens of thousands of files would slow
    // the next run's file creation for minutes.
    let (data, _temporary) = match &s.data_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            (dir.clone(), None)
        }
        None => {
            let t = tempfile::tempdir()?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    // The same load on NATS JetStream + PostgreSQL (services in this process, talking
    // through the servers), when both are installed.
    let distributed = if Pattern::ALL.iter().any(|p| {
        ["shop.nats_pg", "shop.processes"]
            .iter()
            .any(|prefix| s.selected(&format!("{prefix}.{}", p.figure_name())))
    }) {
        DistributedServers::start()?
    } else {
        None
    };
    let mut variants = vec![("shop".to_string(), Backends::Embedded)];
    if let Some(servers) = &distributed {
        variants.push(("shop.nats_pg".to_string(), Backends::NatsPostgres(servers)));
        variants.push(("shop.processes".to_string(), Backends::Processes(servers)));
    }
    for (prefix, backends) in variants {
        for pattern in Pattern::ALL {
            let name = format!("{prefix}.{}", pattern.figure_name());
            if !s.selected(&name) {
                continue;
            }
            let mut runs = Vec::new();
            for i in 0..s.runs {
                progress(&format!("{name} run {}/{}", i + 1, s.runs));
                runs.push(run_pattern(pattern, s.secs, &data, backends).await?);
            }
            push_figures(
                &mut figures,
                &name,
                &runs,
                matches!(backends, Backends::Embedded),
            );
        }
    }
    eprint!("\r\x1b[2K");
    Ok(figures)
}

/// The figures of one pattern's runs under `name` (`disk`: the embedded backends, whose
/// commits and syncs are counted).
fn push_figures(figures: &mut Vec<Figure>, name: &str, runs: &[Run], disk: bool) {
    let col = |f: fn(&Run) -> f64| runs.iter().map(f).collect::<Vec<f64>>();
    figures.push(
        Figure::from_runs(&format!("{name}.c64"), "orders/s", col(|r| r.per_sec))
            .with_note(format!("{CLIENTS} clients, REST, completed orders")),
    );
    figures.push(Figure::from_runs(
        &format!("{name}.placement.p50"),
        "ms",
        col(|r| r.placement_p50),
    ));
    figures.push(Figure::from_runs(
        &format!("{name}.placement.p99"),
        "ms",
        col(|r| r.placement_p99),
    ));
    figures.push(Figure::from_runs(
        &format!("{name}.completion.p50"),
        "ms",
        col(|r| r.completion_p50),
    ));
    figures.push(Figure::from_runs(
        &format!("{name}.completion.p99"),
        "ms",
        col(|r| r.completion_p99),
    ));
    if !disk {
        return;
    }
    figures.push(
        Figure::from_runs(
            &format!("{name}.commits_per_order"),
            "commits",
            col(|r| r.commits_per_order),
        )
        .with_note("store commits, all six services"),
    );
    figures.push(
        Figure::from_runs(
            &format!("{name}.syncs_per_order"),
            "syncs",
            col(|r| r.syncs_per_order),
        )
        .with_note("store journal syncs + bus fdatasyncs"),
    );
}
