//! `shop serve <service>`: one service of the shop in its own process, wired the way
//! [`ShopApp`](crate::app::ShopApp) wires it (the same pieces, from the crate's
//! `wiring` module), so `shop up` and `shop serve` can take turns on one data
//! directory.
//!
//! - A **backing service** (`inventory`, `payment`, `shipping`, `notification`,
//!   `analytics`) opens its store at `<data_dir>/<service>` and its own embedded bus at
//!   `<data_dir>/bus-<service>`, serves on `--listen`, and runs its router handlers and
//!   the outbox relay its store needs.
//! - **`order`** opens the order store and `<data_dir>/bus-order`, finds the five
//!   backing services through a [`StaticRegistry`] (`--registry`, the format of
//!   `SWITCHYARD_SERVICES`), and serves the public API (REST on `--listen`, gRPC on
//!   `--grpc-listen`) over the flows, the saga orchestrator (resuming unfinished sagas)
//!   and the orders its in-memory flows left accepted.
//!
//! With `--bus nats://…` every process shares the broker: events, requests and replies
//! cross processes, every pattern runs, and the backing services register their URL in
//! the registry on NATS, where the Order service finds them (no `--registry` needed).
//! With `--store postgres://…` each service's store is a schema of one database; the
//! Order process then also answers `shop check` (it reads every schema). Its operator
//! endpoints: sagas always (the saga log is in the order store), dead letters and replay
//! on a shared bus.
//!
//! The embedded bus is a directory one process locks, so each process has a private
//! one: events do not cross processes. The patterns that work this way are those in
//! which the Order service calls every service itself ([`CROSS_PROCESS`]: sync, and
//! orchestration, whose saga lives in the order store). Choreography, request-reply and
//! hybrid need a bus the services share: asked for explicitly, they are refused with
//! an error; by default they are left out with a warning.
//!
//! ```text
//! shop serve inventory --listen 127.0.0.1:7102
//! shop serve order --listen 127.0.0.1:7000 \
//!     --registry "inventory=http://127.0.0.1:7102;payment=http://127.0.0.1:7103;…"
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use switchyard::Bus;
use switchyard::store::Store;
use switchyard_embedded::EmbeddedBus;
use switchyard_nats::registry::{NatsRegistry, RegistryConfig};
use switchyard_rpc::registry::{Registry, RegistryConfigError, StaticRegistry};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api::{self, ServiceInfo};
use crate::app::{AppConfig, AppError};
use crate::cli::up::{Launched, ServeConfig, ServiceName, Shutdown};
use crate::order::Pattern;
use crate::patterns::choreography::MonitorStats;
use crate::services::inventory::Inventory;
use crate::services::{ServeError, analytics, inventory, notification, payment, shipping};
use crate::wiring::{
    self, Backing, BusBackend, OrderService, OrderSettings, StoreBackend, Stores, Tasks,
};

/// The `--bus` / `--store` value of the embedded backends (the default).
pub const EMBEDDED: &str = "embedded";

/// The patterns that run with a bus private to each process: the Order service calls
/// every service over HTTP/gRPC itself (sync), or from its saga (orchestration).
pub const CROSS_PROCESS: [Pattern; 2] = [Pattern::Sync, Pattern::Orchestration];

/// The services the Order service calls, which `--registry` must name.
pub const ORDER_NEEDS: [&str; 5] = [
    inventory::SERVICE,
    payment::SERVICE,
    shipping::SERVICE,
    notification::SERVICE,
    analytics::SERVICE,
];

/// An example `--registry` value, for error messages.
const REGISTRY_EXAMPLE: &str = "inventory=http://127.0.0.1:7102;payment=http://127.0.0.1:7103;\
shipping=http://127.0.0.1:7104;notification=http://127.0.0.1:7105;analytics=http://127.0.0.1:7106";

/// Why one service could not start (each variant says what to do).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A backend other than the embedded one was asked for.
    #[error(
        "unknown backend (got --bus {bus} --store {store}): use --bus embedded or --bus nats://host:4222, \
         and --store embedded or --store postgres://user@host:port/db"
    )]
    Backend {
        /// The `--bus` given.
        bus: String,
        /// The `--store` given.
        store: String,
    },
    /// Patterns were asked for that need a bus shared by the services' processes.
    #[error(
        "{} {} {} a bus shared by the services' processes; run {} in one process with `shop up`, \
         or in the distributed mode (here only {} run: pass `--patterns sync,orchestration` or leave \
         --patterns out)",
        if patterns.len() == 1 { "pattern" } else { "patterns" },
        list(patterns),
        if patterns.len() == 1 { "needs" } else { "need" },
        if patterns.len() == 1 { "it" } else { "them" },
        list(&CROSS_PROCESS)
    )]
    NeedsSharedBus {
        /// The patterns refused.
        patterns: Vec<Pattern>,
    },
    /// The Order service was started without a registry.
    #[error(
        "`shop serve order` needs to know where the services it calls are: pass --registry (or set \
         SWITCHYARD_SERVICES) naming {} as `name=http://host:port[,…];…`, e.g. --registry \"{REGISTRY_EXAMPLE}\"",
        ORDER_NEEDS.join(", ")
    )]
    NoRegistry,
    /// The registry on NATS could not be reached.
    #[error("the service registry on NATS failed: {0}")]
    NatsRegistry(#[source] switchyard_nats::registry::RegistryError),
    /// The registry does not parse.
    #[error("--registry: {0}")]
    Registry(#[from] RegistryConfigError),
    /// The registry leaves out services the Order service calls.
    #[error(
        "--registry names no {}; the order service calls {}: add `<name>=http://host:port` for each",
        missing.join(", "),
        ORDER_NEEDS.join(", ")
    )]
    MissingServices {
        /// The services not in the registry.
        missing: Vec<&'static str>,
    },
    /// A backing service on NATS listens on every interface but was not told which host
    /// the others should call it at.
    #[error(
        "--listen {listen} is not an address the other services can call: pass --advertise \
         <this machine's host name or IP> (registered on NATS with port {port})",
        port = listen.port()
    )]
    NoAdvertisedHost {
        /// `--listen`.
        listen: SocketAddr,
    },
    /// `--advertise` is not a host name or IP.
    #[error(
        "--advertise `{0}`: expected a host name or IP (no scheme, no port), e.g. 10.0.0.12 or payment.internal"
    )]
    BadAdvertisedHost(String),
    /// `--grpc-listen` was left to its default but `--listen`'s port has no successor.
    #[error("--listen port {port} leaves no room for the gRPC port (+1); pass --grpc-listen")]
    GrpcPort {
        /// `--listen`'s port.
        port: u16,
    },
    /// An address could not be bound.
    #[error("cannot listen for {service} on {addr}: {source}; choose another address, or port 0")]
    Bind {
        /// The service.
        service: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// The service's bus could not be opened.
    #[error(
        "the bus at {} failed: {source}; is another `shop serve {service}` using that data directory?",
        path.display()
    )]
    Bus {
        /// The service.
        service: &'static str,
        /// The bus directory.
        path: PathBuf,
        /// The bus's error.
        #[source]
        source: switchyard::Error,
    },
    /// The store, a server or the Order service's machinery failed to start.
    #[error(transparent)]
    App(#[from] AppError),
    /// The Order API could not start.
    #[error("the order API failed to start: {0}")]
    Api(#[source] ServeError),
}

fn list(patterns: &[Pattern]) -> String {
    patterns
        .iter()
        .map(|p| p.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The bus and store backends `--bus` and `--store` name (a URL this build does not
/// know is refused). Shared by `shop up` and `shop serve`.
pub fn backends(bus: &str, store: &str) -> Result<(BusBackend, StoreBackend), StartError> {
    let refused = || StartError::Backend {
        bus: bus.to_string(),
        store: store.to_string(),
    };
    Ok((
        BusBackend::parse(bus).ok_or_else(refused)?,
        StoreBackend::parse(store).ok_or_else(refused)?,
    ))
}

/// The patterns a process of `config` runs, and those left out: with the embedded bus
/// only [`CROSS_PROCESS`] (an explicit request for another one is an error).
pub fn patterns_to_run(config: &ServeConfig) -> Result<(Vec<Pattern>, Vec<Pattern>), StartError> {
    if config.bus != EMBEDDED {
        return Ok((config.patterns.clone(), Vec::new()));
    }
    let (run, left_out): (Vec<Pattern>, Vec<Pattern>) = config
        .patterns
        .iter()
        .partition(|p| CROSS_PROCESS.contains(p));
    if config.patterns_explicit && !left_out.is_empty() {
        return Err(StartError::NeedsSharedBus { patterns: left_out });
    }
    Ok((run, left_out))
}

/// The registry of the Order service: `--registry`, naming every service in
/// [`ORDER_NEEDS`].
pub fn order_registry(config: &ServeConfig) -> Result<Option<StaticRegistry>, StartError> {
    let given = config.registry.as_deref().filter(|r| !r.trim().is_empty());
    let Some(text) = given else {
        // On NATS the services find each other through the registry there.
        return match BusBackend::parse(&config.bus) {
            Some(BusBackend::Nats(_)) => Ok(None),
            _ => Err(StartError::NoRegistry),
        };
    };
    let registry = StaticRegistry::parse(text)?;
    let missing: Vec<&'static str> = ORDER_NEEDS
        .into_iter()
        .filter(|s| registry.instances(s).is_empty())
        .collect();
    if !missing.is_empty() {
        return Err(StartError::MissingServices { missing });
    }
    Ok(Some(registry))
}

/// The URL a backing service registers on NATS: `--advertise` (a host) or `--listen`'s
/// IP, with the port it listens on.
pub fn advertised_url(config: &ServeConfig, port: u16) -> Result<String, StartError> {
    let host = match &config.advertise {
        Some(h) => {
            let h = h.trim();
            let ip = h.trim_start_matches('[').trim_end_matches(']');
            match ip.parse::<std::net::IpAddr>() {
                Ok(std::net::IpAddr::V6(v6)) => format!("[{v6}]"),
                Ok(v4) => v4.to_string(),
                Err(_) if is_host_name(h) => h.to_string(),
                Err(_) => return Err(StartError::BadAdvertisedHost(h.to_string())),
            }
        }
        None if config.listen.ip().is_unspecified() => {
            return Err(StartError::NoAdvertisedHost {
                listen: config.listen,
            });
        }
        None => match config.listen.ip() {
            std::net::IpAddr::V6(v6) => format!("[{v6}]"),
            v4 => v4.to_string(),
        },
    };
    Ok(format!("http://{host}:{port}"))
}

/// A DNS host name: dot-separated labels of letters, digits and inner hyphens.
fn is_host_name(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// The service registry on the NATS server at `url` (a KV bucket with TTL heartbeats).
async fn nats_registry(url: &str) -> Result<NatsRegistry, StartError> {
    NatsRegistry::connect(RegistryConfig::new(url))
        .await
        .map_err(StartError::NatsRegistry)
}

/// The Order service's gRPC address: `--grpc-listen`, else `--listen`'s port + 1 (or
/// port 0 if `--listen`'s is 0).
pub fn grpc_addr(config: &ServeConfig) -> Result<SocketAddr, StartError> {
    if let Some(addr) = config.grpc_listen {
        return Ok(addr);
    }
    let mut addr = config.listen;
    if addr.port() != 0 {
        let port = addr.port();
        addr.set_port(port.checked_add(1).ok_or(StartError::GrpcPort { port })?);
    }
    Ok(addr)
}

async fn bind(service: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind {
            service,
            addr,
            source,
        })
}

/// Starts the service of `config`; returns once it serves (the table of its URLs in
/// [`Launched::services`]). It stops cleanly when `shutdown` completes: the Order API
/// first, then flows and routers, relays, the server, and last the bus and the store.
pub async fn serve(config: ServeConfig, shutdown: Shutdown) -> Result<Launched, StartError> {
    let (bus_backend, store_backend) = backends(&config.bus, &config.store)?;
    let (patterns, left_out) = patterns_to_run(&config)?;
    let name = config.service.as_str();
    // Check the Order service's registry and bind the addresses before opening anything.
    let listen = config.listen;
    if config.service != ServiceName::Order && matches!(bus_backend, BusBackend::Nats(_)) {
        // Refuse an address the others cannot call before anything starts.
        advertised_url(&config, listen.port())?;
    }
    let backing = |make: fn(Arc<dyn Store>) -> Backing| async move {
        Ok::<_, StartError>(Role::Backing {
            make,
            listener: bind(name, listen).await?,
        })
    };
    let role = match config.service {
        ServiceName::Order => {
            let registry = order_registry(&config)?;
            let grpc = grpc_addr(&config)?;
            Role::Order {
                registry,
                rest: bind(api::SERVICE, config.listen).await?,
                grpc: bind(api::GRPC_SERVICE, grpc).await?,
            }
        }
        ServiceName::Inventory => {
            backing(|store| Backing::Inventory(Inventory::new(store))).await?
        }
        ServiceName::Payment => backing(Backing::Payment).await?,
        ServiceName::Shipping => backing(Backing::Shipping).await?,
        ServiceName::Notification => backing(Backing::Notification).await?,
        ServiceName::Analytics => backing(Backing::Analytics).await?,
    };
    if !left_out.is_empty() {
        let why = "they need a bus shared by the services' processes (the embedded bus is \
                   private to each); run them with `shop up`, or in the distributed mode";
        if config.service == ServiceName::Order {
            tracing::warn!(service = name, left_out = %list(&left_out), running = %list(&patterns), "patterns left out: {why}");
        } else {
            tracing::debug!(service = name, left_out = %list(&left_out), "handlers of patterns left out: {why}");
        }
    }

    let dir = config.data_dir.clone();
    wiring::create_data_dir(&dir)?;
    let mut stores = Stores::default();
    let store = stores.open(&store_backend, &dir, name).await?;
    let bus: Arc<dyn Bus> = match &bus_backend {
        BusBackend::Embedded => {
            let bus_dir = dir.join(format!("bus-{name}"));
            Arc::new(
                EmbeddedBus::open(&bus_dir).map_err(|source| StartError::Bus {
                    service: name,
                    path: bus_dir.clone(),
                    source,
                })?,
            )
        }
        BusBackend::Nats(url) => BusBackend::nats(url),
    };
    let nats = match &bus_backend {
        BusBackend::Nats(url) => Some(url.clone()),
        BusBackend::Embedded => None,
    };
    let parts = Parts {
        nats,
        store_backend: store_backend.clone(),
        dir,
        stores,
        store,
        bus,
        patterns,
    };
    match role {
        Role::Order {
            registry,
            rest,
            grpc,
        } => serve_order(registry, rest, grpc, parts, shutdown).await,
        Role::Backing { make, listener } => {
            // On NATS, the URL the others find it at.
            let advertised = match &parts.nats {
                Some(_) => {
                    let port = listener.local_addr().map_or(listen.port(), |a| a.port());
                    Some(advertised_url(&config, port)?)
                }
                None => None,
            };
            let service = make(parts.store.clone());
            serve_backing(service, listener, advertised, parts, shutdown).await
        }
    }
}

/// What a process serves: the Order service with its registry and its two listeners,
/// or a backing service (built over its store once open) and its listener.
enum Role {
    Order {
        /// `--registry`, else (on NATS) the registry there.
        registry: Option<StaticRegistry>,
        rest: TcpListener,
        grpc: TcpListener,
    },
    Backing {
        make: fn(Arc<dyn Store>) -> Backing,
        listener: TcpListener,
    },
}

/// What every service's process opens first.
struct Parts {
    /// The NATS server, when the bus is there (and so the registry).
    nats: Option<String>,
    /// Where the stores live.
    store_backend: StoreBackend,
    dir: PathBuf,
    stores: Stores,
    store: Arc<dyn Store>,
    bus: Arc<dyn Bus>,
    patterns: Vec<Pattern>,
}

async fn serve_backing(
    service: Backing,
    listener: TcpListener,
    advertised: Option<String>,
    parts: Parts,
    shutdown: Shutdown,
) -> Result<Launched, StartError> {
    let Parts {
        nats,
        store_backend: _,
        dir,
        stores,
        store,
        bus,
        patterns,
    } = parts;
    let name = service.name();
    let mut tasks = Tasks::new();
    let running = service
        .start(&bus, &dir, listener, tasks.servers_stopped())
        .await?;
    let info = ServiceInfo::new(name, &running.url, service.protocol());
    // On NATS, announce this instance; the entry goes when it stops (or, if it dies,
    // when its heartbeats stop for the registry's TTL).
    let registration = match (&nats, &advertised) {
        (Some(url), Some(advertised)) => Some(
            nats_registry(url)
                .await?
                .register(name, advertised)
                .await
                .map_err(StartError::NatsRegistry)?,
        ),
        _ => None,
    };
    let faults = running.faults.clone();
    tasks.add_server(name, running);
    if let Some(router) = service.router(&bus, &dir, &patterns, &faults) {
        tasks.spawn_router(name, router).await?;
    }
    if service.relayed() {
        tasks.spawn_relay(&store, &bus);
    }
    Ok(Launched {
        services: vec![info],
        stopped: Box::pin(async move {
            shutdown.await;
            if let Some(registration) = registration
                && let Err(e) = registration.stop().await
            {
                tracing::warn!(service = name, error = %e, "leaving the registry failed; the entry expires after its TTL");
            }
            tasks.stop().await;
            wiring::close(None, bus, stores)
                .await
                .map_err(|e| e.to_string())
        }),
    })
}

async fn serve_order(
    registry: Option<StaticRegistry>,
    rest: TcpListener,
    grpc: TcpListener,
    parts: Parts,
    shutdown: Shutdown,
) -> Result<Launched, StartError> {
    let Parts {
        nats,
        store_backend,
        dir,
        stores,
        store,
        bus,
        patterns,
    } = parts;
    let registry: Arc<dyn Registry> = match (registry, &nats) {
        (Some(r), _) => Arc::new(r),
        (None, Some(url)) => Arc::new(nats_registry(url).await?),
        (None, None) => return Err(StartError::NoRegistry),
    };
    // The same client settings, reply timeout and stall limit as `shop up`.
    let defaults = AppConfig::new(&dir);
    let mut tasks = Tasks::new();
    let order = OrderService::build(
        store.clone(),
        &bus,
        registry.clone(),
        &OrderSettings {
            client: defaults.client,
            request_timeout: defaults.request_timeout,
            ship_attempts: defaults.ship_attempts,
            patterns,
        },
        tasks.flows_rx(),
    )
    .await?;
    let monitor = Arc::new(MonitorStats::default());
    if let Some(router) = order.router(&bus, &store, &monitor) {
        tasks.spawn_router(wiring::ORDER, router).await?;
    }
    tasks.spawn_relay(&store, &bus);
    order.spawn_background(&mut tasks, &monitor, defaults.stall_after);
    order.resume_accepted().await?;

    // The operator endpoints: sagas from the orchestrator here; dead letters when the bus
    // is shared (on NATS every service's dead letters are there; an embedded bus holds
    // only this process's); the invariant check when the stores share one database
    // (PostgreSQL), which lets this process read every service's schema.
    let check = match &store_backend {
        StoreBackend::Postgres(url) => {
            Some(DatabaseCheck::connect(url, order.book.clone(), &dir).await?)
        }
        StoreBackend::Embedded => None,
    };
    let admin = Arc::new(ServeAdmin {
        registry: registry.clone(),
        orchestrator: order.orchestrator.clone(),
        bus: nats.is_some().then(|| bus.clone()),
        check,
    });
    let (stop_api, api_stopped) = watch::channel(false);
    let api = api::start(
        order.desk.clone(),
        admin,
        rest,
        grpc,
        wiring::stopped(&api_stopped),
    )
    .await
    .map_err(StartError::Api)?;
    let services = vec![
        ServiceInfo::new(api::SERVICE, &api.rest_url, "http"),
        ServiceInfo::new(api::GRPC_SERVICE, &api.grpc_url, "grpc"),
    ];
    Ok(Launched {
        services,
        stopped: Box::pin(async move {
            shutdown.await;
            let _ = stop_api.send(true);
            let api_stopped = api.join().await;
            tasks.stop().await;
            let closed = wiring::close(Some(order), bus, stores).await;
            api_stopped.map_err(|e| format!("the order API stopped badly: {e}"))?;
            closed.map_err(|e| e.to_string())
        }),
    })
}

/// The operator endpoints of a `shop serve order` process (see [`serve_order`]): what
/// this process can reach answers, the rest is `501`.
struct ServeAdmin {
    /// Where the backing services are (`GET /services`).
    registry: Arc<dyn Registry>,
    /// The orchestration pattern's sagas live in the order store.
    orchestrator: switchyard::saga::Orchestrator,
    /// The bus, when every service shares it (dead letters and replay).
    bus: Option<Arc<dyn Bus>>,
    /// The invariant check, when every service's store is readable from here.
    check: Option<DatabaseCheck>,
}

#[async_trait::async_trait]
impl api::Admin for ServeAdmin {
    fn services(&self) -> Vec<ServiceInfo> {
        ORDER_NEEDS
            .iter()
            .flat_map(|name| {
                let protocol = if *name == payment::SERVICE {
                    "grpc"
                } else {
                    "http"
                };
                self.registry
                    .instances(name)
                    .iter()
                    .map(|i| ServiceInfo::new(*name, &i.url, protocol))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    async fn sagas(
        &self,
        state: Option<switchyard::saga::SagaState>,
        limit: usize,
    ) -> Result<Vec<switchyard::saga::SagaRecord>, api::AdminError> {
        crate::launch::list_sagas(&self.orchestrator, state, limit).await
    }

    async fn dead_letters(
        &self,
        topic: Option<String>,
        limit: usize,
    ) -> Result<Vec<api::DeadLetterView>, api::AdminError> {
        match &self.bus {
            Some(bus) => crate::launch::list_dead_letters(bus.as_ref(), topic, limit).await,
            None => Err(api::AdminError::NotHere {
                what: "dead letters",
                how: EMBEDDED_BUS_HINT,
            }),
        }
    }

    async fn replay(
        &self,
        request: api::ReplayRequest,
    ) -> Result<api::ReplayOutcome, api::AdminError> {
        match &self.bus {
            Some(bus) => crate::launch::replay_dead_letters(bus.as_ref(), request).await,
            None => Err(api::AdminError::NotHere {
                what: "dead-letter replay",
                how: EMBEDDED_BUS_HINT,
            }),
        }
    }

    async fn check(&self) -> Result<api::CheckReport, api::AdminError> {
        match &self.check {
            Some(c) => c.check().await,
            None => Err(api::AdminError::NotHere {
                what: "check",
                how: "every service's embedded store is in its own process; run the services \
                      with --store postgres://… (or the whole shop with `shop up`)",
            }),
        }
    }
}

/// Why an Order process on embedded buses cannot show dead letters.
const EMBEDDED_BUS_HINT: &str = "each process's embedded bus keeps its own dead letters; run the \
services with --bus nats://… (or the whole shop with `shop up`)";

/// The invariant check of an Order process whose services' stores are schemas of one
/// PostgreSQL database: it reads every schema (the services' own processes keep writing
/// meanwhile, so an order may be counted in flight).
struct DatabaseCheck {
    book: crate::order::OrderBook,
    services: crate::app::Services,
}

impl DatabaseCheck {
    async fn connect(
        url: &str,
        book: crate::order::OrderBook,
        dir: &std::path::Path,
    ) -> Result<Self, StartError> {
        let open = |service: &'static str| async move {
            let mut config = switchyard_postgres::PgStoreConfig::new(url, service);
            // Reads for the operator only: few connections (the services' own processes
            // hold theirs; the server's limit is shared).
            config.max_connections = 2;
            switchyard_postgres::PgStore::connect(config)
                .await
                .map(|s| Arc::new(s) as Arc<dyn Store>)
                .map_err(|source| StartError::App(AppError::Postgres { service, source }))
        };
        Ok(DatabaseCheck {
            book,
            services: crate::app::Services {
                inventory: Inventory::new(open(crate::services::inventory::SERVICE).await?),
                payments: crate::services::payment::Payments::new(
                    open(crate::services::payment::SERVICE).await?,
                ),
                shipping: crate::services::shipping::Shipping::new(
                    open(crate::services::shipping::SERVICE).await?,
                ),
                notifier: crate::services::notification::Notifier::new(
                    open(crate::services::notification::SERVICE).await?,
                    dir.to_path_buf(),
                ),
                analytics: crate::services::analytics::Analytics::new(
                    open(crate::services::analytics::SERVICE).await?,
                ),
            },
        })
    }

    async fn check(&self) -> Result<api::CheckReport, api::AdminError> {
        let report = crate::check::check_parts(
            &self.book,
            &self.services,
            &crate::model::Catalog::standard(),
        )
        .await
        .map_err(|e| api::AdminError::Failed(e.to_string()))?;
        Ok(crate::launch::to_api_report(&report))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn config(service: ServiceName) -> ServeConfig {
        ServeConfig {
            service,
            data_dir: "unused".into(),
            listen: "127.0.0.1:0".parse().unwrap(),
            grpc_listen: None,
            registry: None,
            patterns: Pattern::ALL.to_vec(),
            patterns_explicit: false,
            bus: EMBEDDED.into(),
            store: EMBEDDED.into(),
            advertise: None,
        }
    }

    #[test]
    fn by_default_only_the_cross_process_patterns_run() {
        let (run, left) = patterns_to_run(&config(ServiceName::Order)).unwrap();
        assert_eq!(run, CROSS_PROCESS.to_vec());
        assert_eq!(
            left,
            vec![
                Pattern::Choreography,
                Pattern::RequestReply,
                Pattern::Hybrid
            ]
        );
    }

    #[test]
    fn explicit_patterns_that_need_a_shared_bus_are_refused() {
        let mut c = config(ServiceName::Order);
        c.patterns = vec![Pattern::Sync, Pattern::Hybrid];
        c.patterns_explicit = true;
        let e = patterns_to_run(&c).unwrap_err().to_string();
        assert!(e.starts_with("pattern hybrid needs a bus shared"), "{e}");
        assert!(e.contains("shop up"), "{e}");
        c.patterns = vec![Pattern::Orchestration];
        assert_eq!(
            patterns_to_run(&c).unwrap(),
            (vec![Pattern::Orchestration], vec![])
        );
    }

    #[test]
    fn the_order_service_needs_every_service_in_its_registry() {
        let mut c = config(ServiceName::Order);
        let e = order_registry(&c).unwrap_err().to_string();
        for s in ORDER_NEEDS {
            assert!(e.contains(s), "{s} not named: {e}");
        }
        assert!(e.contains("name=http://host:port"), "{e}");
        c.registry = Some("inventory=http://127.0.0.1:1;payment=http://127.0.0.1:2".into());
        let e = order_registry(&c).unwrap_err().to_string();
        assert!(e.contains("no shipping, notification, analytics"), "{e}");
        c.registry = Some("inventory".into());
        assert!(matches!(order_registry(&c), Err(StartError::Registry(_))));
        c.registry = Some(REGISTRY_EXAMPLE.into());
        assert!(order_registry(&c).is_ok());
    }

    #[test]
    fn the_grpc_port_follows_the_rest_port() {
        let mut c = config(ServiceName::Order);
        assert_eq!(grpc_addr(&c).unwrap().port(), 0);
        c.listen = "127.0.0.1:7000".parse().unwrap();
        assert_eq!(grpc_addr(&c).unwrap().port(), 7001);
        c.listen = "127.0.0.1:65535".parse().unwrap();
        assert!(matches!(grpc_addr(&c), Err(StartError::GrpcPort { .. })));
        c.grpc_listen = Some("127.0.0.1:9000".parse().unwrap());
        assert_eq!(grpc_addr(&c).unwrap().port(), 9000);
    }

    #[test]
    fn a_backing_service_registers_a_url_the_others_can_call() {
        let mut c = config(ServiceName::Payment);
        assert_eq!(advertised_url(&c, 7103).unwrap(), "http://127.0.0.1:7103");
        c.listen = "0.0.0.0:7103".parse().unwrap();
        let e = advertised_url(&c, 7103).unwrap_err().to_string();
        assert!(e.contains("--listen 0.0.0.0:7103"), "{e}");
        assert!(e.contains("--advertise"), "{e}");
        c.advertise = Some("payment.internal".into());
        assert_eq!(
            advertised_url(&c, 7103).unwrap(),
            "http://payment.internal:7103"
        );
        c.advertise = Some("10.0.0.12".into());
        assert_eq!(advertised_url(&c, 40000).unwrap(), "http://10.0.0.12:40000");
        c.advertise = Some("::1".into());
        assert_eq!(advertised_url(&c, 7103).unwrap(), "http://[::1]:7103");
        for bad in ["http://10.0.0.12", "host:7103", "-bad.example", "", "a..b"] {
            c.advertise = Some(bad.into());
            assert!(
                matches!(
                    advertised_url(&c, 7103),
                    Err(StartError::BadAdvertisedHost(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn unknown_backends_are_refused() {
        let e = backends("kafka://127.0.0.1:9092", EMBEDDED).unwrap_err();
        assert!(e.to_string().contains("--bus kafka://"), "{e}");
        assert_eq!(
            backends(EMBEDDED, EMBEDDED).unwrap(),
            (BusBackend::Embedded, StoreBackend::Embedded)
        );
        assert_eq!(
            backends("nats://127.0.0.1:4222", "postgres://shop@127.0.0.1/shop").unwrap(),
            (
                BusBackend::Nats("nats://127.0.0.1:4222".into()),
                StoreBackend::Postgres("postgres://shop@127.0.0.1/shop".into())
            )
        );
        assert!(backends(EMBEDDED, "mysql://x").is_err());
    }
}
