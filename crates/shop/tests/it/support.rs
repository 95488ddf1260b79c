//! The test harness: a temp data directory, embedded stores and bus in it, an
//! in-process registry with HTTP and gRPC clients, and one shutdown switch.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use shop::services::Running;
use switchyard::Bus;
use switchyard::router::Router;
use switchyard::store::Store;
use switchyard_embedded::{EmbeddedBus, EmbeddedConfig, EmbeddedStore, StoreConfig};
use switchyard_rpc::grpc::GrpcClient;
use switchyard_rpc::registry::{InProcessRegistry, Registration};
use switchyard_rpc::{ClientConfig, HttpClient};
use switchyard_testkit::Child;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub registry: InProcessRegistry,
    pub http: HttpClient,
    pub grpc: GrpcClient,
    stop: watch::Sender<bool>,
    registrations: Vec<Registration>,
}

pub fn client_config() -> ClientConfig {
    ClientConfig {
        default_timeout: Duration::from_secs(10),
        backoff_base: Duration::from_millis(5),
        backoff_max: Duration::from_millis(20),
        ..ClientConfig::default()
    }
}

impl Harness {
    pub fn new() -> Self {
        let registry = InProcessRegistry::new();
        let http = HttpClient::with_config(Arc::new(registry.clone()), client_config());
        let grpc = GrpcClient::with_config(Arc::new(registry.clone()), client_config());
        Harness {
            dir: tempfile::tempdir().unwrap(),
            registry,
            http,
            grpc,
            stop: watch::channel(false).0,
            registrations: Vec::new(),
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn store(&self, name: &str) -> Arc<dyn Store> {
        Arc::new(
            EmbeddedStore::open(
                self.dir.path().join("stores").join(name),
                StoreConfig::default(),
            )
            .unwrap(),
        )
    }

    /// An embedded bus; without publisher dedup, so a test can deliver a duplicate.
    pub fn bus(&self, dedup: bool) -> Arc<dyn Bus> {
        let config = EmbeddedConfig {
            dedup_window: if dedup {
                Duration::from_secs(120)
            } else {
                Duration::ZERO
            },
            ..EmbeddedConfig::default()
        };
        Arc::new(EmbeddedBus::open_with(self.dir.path().join("bus"), config).unwrap())
    }

    pub fn shutdown(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.stop.subscribe();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    }

    pub fn register(&mut self, service: &str, running: &Running) {
        self.registrations
            .push(self.registry.register(service, &running.url));
    }

    /// Binds and runs `router` until the harness stops.
    pub async fn run_router(&self, router: Router) -> tokio::task::JoinHandle<()> {
        let bound = router.bind().await.unwrap();
        let shutdown = self.shutdown();
        tokio::spawn(async move {
            bound.run(shutdown).await.unwrap();
        })
    }

    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop();
    }
}

pub async fn listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.unwrap()
}

/// A raw HTTP/1.1 exchange (for bodies and content types a well-behaved client never sends).
pub struct RawResponse {
    pub status: u16,
    pub content_type: String,
    pub body: String,
}

impl RawResponse {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

pub async fn raw(
    url: &str,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: &[u8],
) -> RawResponse {
    let addr = url.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(ct) = content_type {
        req.push_str(&format!("Content-Type: {ct}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    // The server may answer (413) before reading the whole body and close.
    let _ = s.write_all(body).await;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let content_type = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    RawResponse {
        status,
        content_type,
        body: body.to_string(),
    }
}

/// Polls `f` every 20 ms until it is true, for at most 10 s.
pub async fn eventually(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !f().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `shop` binary, without the caller's `SHOP_*` and `SWITCHYARD_SERVICES`.
pub fn shop_command() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_shop"));
    for (k, _) in std::env::vars() {
        if k.starts_with("SHOP_") || k == "SWITCHYARD_SERVICES" {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// Runs the `shop` binary with `args` against `url` (see [`shop_command`]).
pub async fn shop_cli(url: &str, args: &[&str]) -> Output {
    let mut all: Vec<String> = vec!["--url".into(), url.into()];
    all.extend(args.iter().map(|s| s.to_string()));
    tokio::task::spawn_blocking(move || shop_command().args(&all).output().unwrap())
        .await
        .unwrap()
}

pub fn out(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// How long a `shop` process may take to start or to stop (a debug build on a busy
/// machine).
pub const PROCESS_PATIENCE: Duration = Duration::from_secs(120);

/// The URL table a `shop up` / `shop serve` process prints once it serves: name → URL.
pub fn printed_urls(child: &Child, what: &str) -> HashMap<String, String> {
    let mut urls = HashMap::new();
    loop {
        let line = child
            .next_line(PROCESS_PATIENCE)
            .unwrap_or_else(|| panic!("`shop {what}` printed no URL table"));
        if line.contains("is running;") {
            return urls;
        }
        if let [name, _protocol, url] = line.split_whitespace().collect::<Vec<_>>()[..]
            && url.starts_with("http://")
        {
            urls.insert(name.to_string(), url.to_string());
        }
    }
}

/// Asks `child` to stop (SIGTERM, by pid) and checks that it exits 0.
pub fn stop_child(mut child: Child, what: &str) {
    child.terminate().unwrap();
    let status = child
        .wait_timeout(PROCESS_PATIENCE)
        .unwrap()
        .unwrap_or_else(|| panic!("`shop {what}` did not stop after SIGTERM"));
    assert_eq!(status.code(), Some(0), "`shop {what}` exited {status}");
}

/// A nats-server and a PostgreSQL on loopback ports, or `None` (said loudly; a failure
/// under `CI=true`) when one is not installed.
pub fn nats_and_postgres() -> Option<(
    switchyard_testkit::servers::NatsServer,
    switchyard_testkit::servers::Postgres,
)> {
    let nats = switchyard_testkit::servers::NatsServer::start().expect("start nats-server")?;
    let pg = switchyard_testkit::servers::Postgres::start().expect("start PostgreSQL")?;
    Some((nats, pg))
}
