//! `shop up` and `shop serve`: the CLI side of running the shop. What to run is not
//! decided here but by a [`Launcher`] the binary passes to [`super::main`]: the app
//! implements it (starting every service, or one), this module resolves the settings,
//! prints where everything listens, and stops it all on Ctrl-C or SIGTERM.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::CliError;
use super::table::Table;
use crate::api::ServiceInfo;
use crate::order::Pattern;

/// A future that completes when the launched services must stop.
pub type Shutdown = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// The shop's services, as `shop serve` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ServiceName {
    /// The Order service (its public REST + gRPC API, the patterns' flows).
    Order,
    /// Inventory (REST).
    Inventory,
    /// Payment (gRPC + bus responder).
    Payment,
    /// Shipping (REST + label writer).
    Shipping,
    /// Notification (REST + e-mail on events).
    Notification,
    /// Analytics (REST + counters).
    Analytics,
}

impl ServiceName {
    /// Every service, in port order after the Order API's two ports.
    pub const ALL: [ServiceName; 6] = [
        ServiceName::Order,
        ServiceName::Inventory,
        ServiceName::Payment,
        ServiceName::Shipping,
        ServiceName::Notification,
        ServiceName::Analytics,
    ];

    /// The name in registries and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceName::Order => "order",
            ServiceName::Inventory => "inventory",
            ServiceName::Payment => "payment",
            ServiceName::Shipping => "shipping",
            ServiceName::Notification => "notification",
            ServiceName::Analytics => "analytics",
        }
    }
}

/// The settings of `shop up`, resolved (flag, else environment, else config file, else
/// default).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpConfig {
    /// Where the embedded bus and stores live (default `./shop-data`).
    pub data_dir: PathBuf,
    /// The address every server listens on (default `127.0.0.1`).
    pub host: String,
    /// The first port (default 7000): the Order REST API; then, one each, the Order
    /// gRPC API, inventory, payment, shipping, notification, analytics (7000–7006).
    /// 0: every server on a free port.
    pub port: u16,
    /// The patterns to run (default all five).
    pub patterns: Vec<Pattern>,
    /// The bus: `embedded` (default) or a broker URL (`nats://…`).
    pub bus: String,
    /// The stores: `embedded` (default) or a database URL (`postgres://…`).
    pub store: String,
    /// Place demo orders through every pattern (default on; `--no-demo`).
    pub demo: bool,
    /// Processes per backing service in the distributed mode (`--replicas payment=3`);
    /// one each when not named.
    #[serde(default)]
    pub replicas: Vec<(String, u32)>,
}

impl UpConfig {
    /// The address of the `n`th server (0: Order REST, 1: Order gRPC, 2: inventory, …),
    /// or port 0 for every one if [`port`](Self::port) is 0.
    pub fn addr(&self, n: u16) -> Result<SocketAddr, CliError> {
        let port = if self.port == 0 {
            0
        } else {
            self.port.checked_add(n).ok_or_else(|| {
                CliError::Usage(format!("--port {} leaves no room for 7 servers", self.port))
            })?
        };
        format!("{}:{port}", self.host)
            .parse()
            .or_else(|_| format!("[{}]:{port}", self.host).parse())
            .map_err(|_| CliError::Usage(format!("--host `{}` is not an IP address", self.host)))
    }
}

/// The settings of `shop serve <service>`, resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServeConfig {
    /// The service to run.
    pub service: ServiceName,
    /// Where its embedded store lives (default `./shop-data`).
    pub data_dir: PathBuf,
    /// The address to listen on (default `127.0.0.1:0`; the Order service takes
    /// `grpc_listen` too).
    pub listen: SocketAddr,
    /// The Order service's gRPC address (default: `listen`'s port + 1, or 0).
    pub grpc_listen: Option<SocketAddr>,
    /// Where the other services are: `name=http://host:port[,…];…` (the format of
    /// `SWITCHYARD_SERVICES`).
    pub registry: Option<String>,
    /// The patterns to run (the Order service).
    pub patterns: Vec<Pattern>,
    /// Whether [`patterns`](Self::patterns) was asked for (flag, environment or config
    /// file) rather than left at the default: a pattern that cannot run in this mode is
    /// then an error instead of being left out with a warning.
    #[serde(default)]
    pub patterns_explicit: bool,
    /// The bus: `embedded` or a broker URL.
    pub bus: String,
    /// The store: `embedded` or a database URL.
    pub store: String,
    /// The host name or IP other services reach this one at, registered on NATS with the
    /// port it listens on (default: `listen`'s IP, which must then not be `0.0.0.0`/`::`).
    #[serde(default)]
    pub advertise: Option<String>,
}

/// What a [`Launcher`] hands back once everything it started serves.
pub struct Launched {
    /// Every server started, for the table `shop up` prints (and `GET /services`).
    pub services: Vec<ServiceInfo>,
    /// Completes when everything has stopped after the shutdown future completed
    /// (`Err`: why a part stopped badly).
    pub stopped: Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'static>>,
}

impl std::fmt::Debug for Launched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Launched")
            .field("services", &self.services)
            .finish_non_exhaustive()
    }
}

/// Why launching failed (shown to the user as is: say what to do).
pub type LaunchError = Box<dyn std::error::Error + Send + Sync>;

/// Starts the shop for `shop up` / `shop serve`: implemented by the app and passed to
/// [`super::main`] by the binary.
#[async_trait]
pub trait Launcher: Send + Sync {
    /// Starts every service per `config`; returns once all serve. They stop when
    /// `shutdown` completes.
    async fn up(&self, config: UpConfig, shutdown: Shutdown) -> Result<Launched, LaunchError>;

    /// Starts one service per `config`; returns once it serves. It stops when
    /// `shutdown` completes. By default: not supported (implement [`up`](Self::up)
    /// first).
    async fn serve(
        &self,
        config: ServeConfig,
        shutdown: Shutdown,
    ) -> Result<Launched, LaunchError> {
        drop(shutdown);
        Err(format!(
            "this build cannot run the {} service on its own yet; use `shop up`",
            config.service.as_str()
        )
        .into())
    }
}

/// Completes on Ctrl-C or SIGTERM.
pub async fn interrupted() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Runs what `start` launches until `stop` completes, printing where it listens; then
/// stops it, within `grace` (or at once on a second interrupt).
pub async fn run_until<F, Fut>(
    what: &str,
    start: F,
    stop: impl Future<Output = ()>,
    grace: Duration,
) -> Result<Vec<ServiceInfo>, CliError>
where
    F: FnOnce(Shutdown) -> Fut,
    Fut: Future<Output = Result<Launched, LaunchError>>,
{
    let (tx, rx) = tokio::sync::watch::channel(false);
    let shutdown: Shutdown = Box::pin(async move {
        let mut rx = rx;
        let _ = rx.wait_for(|s| *s).await;
    });
    let launched = start(shutdown).await.map_err(|e| CliError::Launch {
        what: what.to_string(),
        cause: e.to_string(),
    })?;
    let mut t = Table::new(["SERVICE", "PROTOCOL", "URL"]);
    for s in &launched.services {
        t.row([s.name.clone(), s.protocol.clone(), s.url.clone()]);
    }
    println!("{t}");
    println!("{what} is running; press Ctrl-C to stop.");
    stop.await;
    eprintln!("stopping {what}… (again to exit at once)");
    let _ = tx.send(true);
    let unclean = |cause: String| CliError::Launch {
        what: what.to_string(),
        cause,
    };
    tokio::select! {
        stopped = launched.stopped => stopped.map_err(unclean)?,
        _ = tokio::time::sleep(grace) => {
            return Err(unclean(format!(
                "it did not stop within {grace:?} (is the broker or the database unreachable?); \
                 exiting without a clean stop — what was in flight is redelivered or resumed \
                 on the next start"
            )));
        }
        _ = interrupted() => {
            return Err(unclean(
                "interrupted again; exiting without a clean stop — what was in flight is \
                 redelivered or resumed on the next start"
                    .to_string(),
            ));
        }
    }
    eprintln!("stopped.");
    Ok(launched.services)
}

/// How long `shop serve` may take to stop cleanly before it exits anyway (a broker or a
/// database that went away can keep a clean stop waiting forever).
pub const SERVE_STOP_GRACE: Duration = Duration::from_secs(30);

/// The same for `shop up`, which in the distributed mode stops its service processes one
/// after the other (each within [`SERVE_STOP_GRACE`]).
pub const UP_STOP_GRACE: Duration = Duration::from_secs(240);

/// `shop up`: runs every service until Ctrl-C / SIGTERM.
pub async fn up(launcher: Option<&dyn Launcher>, config: UpConfig) -> Result<(), CliError> {
    let launcher = launcher.ok_or(CliError::NotWired("up"))?;
    tracing::info!(?config, "starting the shop");
    run_until(
        "the shop",
        |s| launcher.up(config, s),
        interrupted(),
        UP_STOP_GRACE,
    )
    .await?;
    Ok(())
}

/// Set by `shop up` on the service processes it starts: a process whose standard input
/// closes (its `shop up` is gone, even killed) stops as if interrupted, so no service
/// outlives the shop it belongs to.
pub const EXIT_WITH_PARENT: &str = "SHOP_EXIT_WITH_PARENT";

/// Completes when standard input reaches its end (see [`EXIT_WITH_PARENT`]); never
/// when the variable is not set.
async fn parent_gone() {
    if std::env::var_os(EXIT_WITH_PARENT).is_none() {
        return std::future::pending().await;
    }
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
        let _ = tx.send(());
    });
    let _ = rx.await;
    eprintln!("the shop that started this service is gone; stopping");
}

/// `shop serve <service>`: runs one service until Ctrl-C / SIGTERM (or, started by
/// `shop up`, until that process is gone).
pub async fn serve(launcher: Option<&dyn Launcher>, config: ServeConfig) -> Result<(), CliError> {
    let launcher = launcher.ok_or(CliError::NotWired("serve"))?;
    tracing::info!(?config, "starting one service");
    let what = format!("service {}", config.service.as_str());
    let stop = async {
        tokio::select! {
            _ = interrupted() => {}
            _ = parent_gone() => {}
        }
    };
    run_until(&what, |s| launcher.serve(config, s), stop, SERVE_STOP_GRACE).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;

    use super::*;
    use crate::api::{self, NoAdmin};
    use crate::model::Catalog;
    use crate::order::{OrderBook, OrderDesk};

    /// A launcher running the Order API alone (what the app's does for every service);
    /// remembers the URL it serves at.
    #[derive(Default)]
    struct ApiOnly {
        url: Arc<std::sync::Mutex<Option<String>>>,
    }

    #[async_trait]
    impl Launcher for ApiOnly {
        async fn up(&self, config: UpConfig, shutdown: Shutdown) -> Result<Launched, LaunchError> {
            let book = OrderBook::new(Arc::new(switchyard::store::MemoryStore::new()));
            let desk = OrderDesk::new(Arc::new(Catalog::standard()), book);
            let rest = tokio::net::TcpListener::bind(config.addr(0)?).await?;
            let grpc = tokio::net::TcpListener::bind(config.addr(1)?).await?;
            let running = api::start(desk, Arc::new(NoAdmin), rest, grpc, shutdown).await?;
            *self.url.lock().unwrap() = Some(running.rest_url.clone());
            Ok(Launched {
                services: vec![ServiceInfo::new("order", &running.rest_url, "http")],
                stopped: Box::pin(async move { running.join().await.map_err(|e| e.to_string()) }),
            })
        }
    }

    fn config() -> UpConfig {
        UpConfig {
            data_dir: "unused".into(),
            host: "127.0.0.1".into(),
            port: 0,
            patterns: Pattern::ALL.to_vec(),
            bus: "embedded".into(),
            store: "embedded".into(),
            demo: false,
            replicas: Vec::new(),
        }
    }

    #[tokio::test]
    async fn a_stop_that_hangs_ends_after_the_grace_with_an_error() {
        // What a service whose broker is gone does: its clean stop never completes.
        let start = |_shutdown: Shutdown| async {
            Ok::<_, LaunchError>(Launched {
                services: Vec::new(),
                stopped: Box::pin(std::future::pending()),
            })
        };
        let e = run_until(
            "service payment",
            start,
            async {},
            Duration::from_millis(50),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(e.contains("did not stop within 50ms"), "{e}");
        assert!(e.contains("service payment"), "{e}");
    }

    #[tokio::test]
    async fn up_runs_what_the_launcher_starts_until_stopped() {
        let launcher = ApiOnly::default();
        let url = launcher.url.clone();
        // Stops once the launched server accepts a connection.
        let stop = async move {
            loop {
                let addr = url.lock().unwrap().clone();
                if let Some(addr) = addr
                    && tokio::net::TcpStream::connect(addr.trim_start_matches("http://"))
                        .await
                        .is_ok()
                {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        };
        let services = run_until(
            "the shop",
            |s| launcher.up(config(), s),
            stop,
            UP_STOP_GRACE,
        )
        .await
        .unwrap();
        assert_eq!(services[0].name, "order");
        // After the stop, the server is gone.
        let addr = services[0].url.trim_start_matches("http://").to_string();
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
        // Without a launcher: not wired.
        assert!(matches!(
            up(None, config()).await,
            Err(CliError::NotWired("up"))
        ));
    }

    #[tokio::test]
    async fn serve_is_not_supported_by_default_and_bad_hosts_are_refused() {
        let cfg = ServeConfig {
            service: ServiceName::Inventory,
            data_dir: "unused".into(),
            listen: "127.0.0.1:0".parse().unwrap(),
            grpc_listen: None,
            registry: None,
            patterns: Vec::new(),
            patterns_explicit: false,
            bus: "embedded".into(),
            store: "embedded".into(),
            advertise: None,
        };
        let err = ApiOnly::default()
            .serve(cfg, Box::pin(std::future::pending()))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("inventory"), "{err}");
        let mut c = config();
        c.host = "not a host".into();
        assert!(matches!(c.addr(0), Err(CliError::Usage(_))));
        c.host = "::1".into();
        c.port = 7000;
        assert_eq!(c.addr(2).unwrap().port(), 7002);
    }
}
