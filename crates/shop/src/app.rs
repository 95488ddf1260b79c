//! The whole shop in one process: [`ShopApp::start`] runs the six services — an
//! embedded bus under `<data_dir>/bus`, one embedded store per service under
//! `<data_dir>/<service>`, the five backing servers on loopback ports registered in an
//! in-process registry, the Order service's HTTP and gRPC clients and its requester,
//! the saga orchestrator (on the order store), every router and outbox relay the
//! patterns need, and the choreography monitor — and [`ShopApp::desk`] places orders in
//! every pattern.
//!
//! Restarting on the same data directory resumes where it stopped: sagas resume in the
//! orchestrator, durable subscriptions continue, outboxes drain, and the flows that run
//! in the Order service's memory (sync, request-reply, hybrid) run again for every order
//! still accepted (each step is idempotent; see [`crate::patterns`]).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use shop::app::{AppConfig, ShopApp};
//! use shop::model::Item;
//! use shop::order::{NewOrder, Pattern};
//!
//! let app = ShopApp::start(AppConfig::new("/tmp/shop-data")).await?;
//! let order = app
//!     .desk()
//!     .place(&NewOrder {
//!         order_id: None,
//!         customer: "ada".into(),
//!         items: vec![Item::new("sku-001", 2)],
//!         payment_token: "tok_ok".into(),
//!         pattern: Pattern::Orchestration,
//!     })
//!     .await?;
//! let done = app.book().wait(&order.id, std::time::Duration::from_secs(10)).await?;
//! println!("{} {}", done.id, done.status);
//! app.shutdown().await?;
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchyard::Bus;
use switchyard::relay::OutboxRelay;
use switchyard::reply::Requester;
use switchyard::router::Router;
use switchyard::saga::{Orchestrator, SagaState};
use switchyard::store::Store;
use switchyard_embedded::{EmbeddedBus, EmbeddedStore, StoreConfig};
use switchyard_rpc::grpc::GrpcClient;
use switchyard_rpc::registry::{InProcessRegistry, Registration};
use switchyard_rpc::{ClientConfig, HttpClient};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::faults::Faults;
use crate::model::Catalog;
use crate::order::{OrderBook, OrderDesk, OrderStatus, Pattern};
use crate::patterns::choreography::{self, ChoreographyFlow, MonitorStats};
use crate::patterns::hybrid::HybridFlow;
use crate::patterns::orchestration::{self, OrchestrationFlow};
use crate::patterns::request_reply::RequestReplyFlow;
use crate::patterns::sync::SyncFlow;
use crate::patterns::{self, Deps, Driven};
use crate::services::analytics::{self, Analytics, AnalyticsClient};
use crate::services::inventory::{self, Inventory, InventoryClient};
use crate::services::notification::{self, NotificationClient, Notifier};
use crate::services::payment::{self, PaymentClient, Payments};
use crate::services::shipping::{self, Shipping, ShippingClient};
use crate::services::{Running, ServeError};

/// The ports of the five backing servers on 127.0.0.1 (0: any free port).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ports {
    /// Inventory (REST).
    pub inventory: u16,
    /// Payment (gRPC).
    pub payment: u16,
    /// Shipping (REST).
    pub shipping: u16,
    /// Notification (REST).
    pub notification: u16,
    /// Analytics (REST).
    pub analytics: u16,
}

/// How to run the shop.
#[derive(Clone)]
pub struct AppConfig {
    /// Where the bus, the stores, labels and mail live.
    pub data_dir: PathBuf,
    /// The servers' ports.
    pub ports: Ports,
    /// A bus to use instead of the embedded one under `<data_dir>/bus` (e.g. one wrapped
    /// in a chaos layer); the app closes it at shutdown.
    pub bus: Option<Arc<dyn Bus>>,
    /// The patterns to run (default: all).
    pub patterns: Vec<Pattern>,
    /// The Order service's client settings (timeouts, retries, breakers).
    pub client: ClientConfig,
    /// After how long without an expected reaction a choreography flow is flagged
    /// stalled (default 10 s).
    pub stall_after: Duration,
    /// How long one request over the bus waits for its reply (default 2 s).
    pub request_timeout: Duration,
    /// Attempts of the orchestration's ship step before the saga gives up and
    /// compensates (default 300, about ten minutes).
    pub ship_attempts: u32,
}

impl std::fmt::Debug for AppConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppConfig")
            .field("data_dir", &self.data_dir)
            .field("ports", &self.ports)
            .field("bus", &self.bus.as_ref().map(|_| "custom"))
            .field("patterns", &self.patterns)
            .field("stall_after", &self.stall_after)
            .field("request_timeout", &self.request_timeout)
            .field("ship_attempts", &self.ship_attempts)
            .finish_non_exhaustive()
    }
}

impl AppConfig {
    /// Every pattern, any ports, the embedded bus, under `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        AppConfig {
            data_dir: data_dir.into(),
            ports: Ports::default(),
            bus: None,
            patterns: Pattern::ALL.to_vec(),
            client: ClientConfig {
                default_timeout: Duration::from_secs(5),
                backoff_base: Duration::from_millis(10),
                backoff_max: Duration::from_millis(200),
                ..ClientConfig::default()
            },
            stall_after: choreography::DEFAULT_STALL_AFTER,
            request_timeout: Duration::from_secs(2),
            ship_attempts: orchestration::SHIP_ATTEMPTS,
        }
    }

    /// This config with `bus` instead of the embedded one.
    pub fn with_bus(mut self, bus: Arc<dyn Bus>) -> Self {
        self.bus = Some(bus);
        self
    }

    /// This config running only `patterns`.
    pub fn with_patterns(mut self, patterns: &[Pattern]) -> Self {
        self.patterns = patterns.to_vec();
        self
    }
}

/// Why the shop could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// A service's store could not be opened or closed (another shop has the data
    /// directory, or it is not writable).
    #[error(
        "the {service} store at {path} failed: {source}; check the data directory (is another shop using it?)"
    )]
    Store {
        /// The service.
        service: &'static str,
        /// Its directory.
        path: PathBuf,
        /// The store's error.
        #[source]
        source: switchyard::Error,
    },
    /// The bus could not be opened or closed.
    #[error("the bus failed: {0}; check <data_dir>/bus (is another shop using it?)")]
    Bus(#[source] switchyard::Error),
    /// A server's port could not be bound.
    #[error("cannot listen for {service} on 127.0.0.1:{port}: {source}; choose another port or 0")]
    Bind {
        /// The service.
        service: &'static str,
        /// The port.
        port: u16,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// A server could not start.
    #[error("the {service} server failed: {source}")]
    Serve {
        /// The service.
        service: &'static str,
        /// Why.
        #[source]
        source: ServeError,
    },
    /// The Order service's machinery (requester, routers, orchestrator) could not start.
    #[error("starting the order service failed: {0}")]
    Start(#[source] switchyard::Error),
    /// The data directory could not be created.
    #[error("cannot create the data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// The core handles of the five backing services (over their stores), for checks.
#[derive(Debug, Clone)]
pub struct Services {
    /// Inventory.
    pub inventory: Inventory,
    /// Payment.
    pub payments: Payments,
    /// Shipping.
    pub shipping: Shipping,
    /// Notification.
    pub notifier: Notifier,
    /// Analytics.
    pub analytics: Analytics,
}

/// The base URLs of the five servers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Urls {
    /// Inventory (REST).
    pub inventory: String,
    /// Payment (gRPC, and `/admin/fault` over HTTP/1.1).
    pub payment: String,
    /// Shipping (REST).
    pub shipping: String,
    /// Notification (REST).
    pub notification: String,
    /// Analytics (REST).
    pub analytics: String,
}

/// The fault injection handle of each server.
#[derive(Debug, Clone)]
pub struct ServiceFaults {
    /// Inventory.
    pub inventory: Faults,
    /// Payment.
    pub payment: Faults,
    /// Shipping.
    pub shipping: Faults,
    /// Notification.
    pub notification: Faults,
    /// Analytics.
    pub analytics: Faults,
}

/// Totals of durable writes since the app started (see [`ShopApp::disk_stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskStats {
    /// Commits applied by the services' stores.
    pub store_commits: u64,
    /// Journal writes of the services' stores (each one sync, in the default durability).
    pub store_syncs: u64,
    /// Messages written by the embedded bus.
    pub bus_messages: u64,
    /// fdatasync calls of the embedded bus.
    pub bus_syncs: u64,
}

impl std::ops::Sub for DiskStats {
    type Output = DiskStats;
    fn sub(self, o: DiskStats) -> DiskStats {
        DiskStats {
            store_commits: self.store_commits.saturating_sub(o.store_commits),
            store_syncs: self.store_syncs.saturating_sub(o.store_syncs),
            bus_messages: self.bus_messages.saturating_sub(o.bus_messages),
            bus_syncs: self.bus_syncs.saturating_sub(o.bus_syncs),
        }
    }
}

/// The running shop. See the [module docs](self).
pub struct ShopApp {
    desk: OrderDesk,
    book: OrderBook,
    services: Services,
    urls: Urls,
    faults: ServiceFaults,
    orchestrator: Orchestrator,
    saga_cell: orchestration::OrchestratorCell,
    monitor: Arc<MonitorStats>,
    bus: Arc<dyn Bus>,
    stores: Vec<(&'static str, PathBuf, EmbeddedStore)>,
    /// The embedded bus, when the app opened it (not given one).
    embedded_bus: Option<EmbeddedBus>,
    /// Stops flows, routers, the orchestrator and the monitor.
    stop_flows: watch::Sender<bool>,
    /// Stops the relays (after the routers).
    stop_relays: watch::Sender<bool>,
    /// Stops the servers (last).
    stop_servers: watch::Sender<bool>,
    flow_tasks: Vec<(String, JoinHandle<()>)>,
    relay_tasks: Vec<JoinHandle<()>>,
    servers: Vec<(&'static str, Running)>,
    _registrations: Vec<Registration>,
    requester: Arc<Requester>,
}

impl std::fmt::Debug for ShopApp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShopApp")
            .field("urls", &self.urls)
            .field("patterns", &self.desk.patterns())
            .finish_non_exhaustive()
    }
}

fn stopped(rx: &watch::Receiver<bool>) -> impl std::future::Future<Output = ()> + Send + 'static {
    let mut rx = rx.clone();
    async move {
        let _ = rx.wait_for(|s| *s).await;
    }
}

async fn bind(service: &'static str, port: u16) -> Result<TcpListener, AppError> {
    TcpListener::bind(("127.0.0.1", port))
        .await
        .map_err(|source| AppError::Bind {
            service,
            port,
            source,
        })
}

impl ShopApp {
    /// Starts the shop (see the [module docs](self)).
    pub async fn start(config: AppConfig) -> Result<ShopApp, AppError> {
        let dir = config.data_dir.clone();
        std::fs::create_dir_all(&dir).map_err(|source| AppError::DataDir {
            path: dir.clone(),
            source,
        })?;
        let mut stores = Vec::new();
        let mut open = |service: &'static str| -> Result<Arc<dyn Store>, AppError> {
            let path = dir.join(service);
            let store = EmbeddedStore::open(&path, StoreConfig::default()).map_err(|source| {
                AppError::Store {
                    service,
                    path: path.clone(),
                    source,
                }
            })?;
            stores.push((service, path, store.clone()));
            Ok(Arc::new(store))
        };
        let order_store = open("order")?;
        let inventory_store = open(inventory::SERVICE)?;
        let payment_store = open(payment::SERVICE)?;
        let shipping_store = open(shipping::SERVICE)?;
        let notification_store = open(notification::SERVICE)?;
        let analytics_store = open(analytics::SERVICE)?;
        let (bus, embedded_bus): (Arc<dyn Bus>, _) = match &config.bus {
            Some(b) => (b.clone(), None),
            None => {
                let b = EmbeddedBus::open(dir.join("bus")).map_err(AppError::Bus)?;
                (Arc::new(b.clone()), Some(b))
            }
        };

        let (stop_flows, flows_rx) = watch::channel(false);
        let (stop_relays, relays_rx) = watch::channel(false);
        let (stop_servers, servers_rx) = watch::channel(false);
        let serve_err = |service| move |source| AppError::Serve { service, source };

        // The five servers.
        let ports = config.ports;
        // One inventory core for the server and the event handlers: they share its
        // in-process stock locks.
        let inventory_core = Inventory::new(inventory_store.clone());
        let inv = inventory::start_with(
            inventory_core.clone(),
            bind(inventory::SERVICE, ports.inventory).await?,
            stopped(&servers_rx),
        )
        .await
        .map_err(serve_err(inventory::SERVICE))?;
        let pay = payment::start(
            payment_store.clone(),
            bind(payment::SERVICE, ports.payment).await?,
            stopped(&servers_rx),
        )
        .await
        .map_err(serve_err(payment::SERVICE))?;
        let ship = shipping::start(
            shipping_store.clone(),
            bus.clone(),
            bind(shipping::SERVICE, ports.shipping).await?,
            stopped(&servers_rx),
        )
        .await
        .map_err(serve_err(shipping::SERVICE))?;
        let notif = notification::start(
            notification_store.clone(),
            dir.clone(),
            bind(notification::SERVICE, ports.notification).await?,
            stopped(&servers_rx),
        )
        .await
        .map_err(serve_err(notification::SERVICE))?;
        let anal = analytics::start(
            analytics_store.clone(),
            bind(analytics::SERVICE, ports.analytics).await?,
            stopped(&servers_rx),
        )
        .await
        .map_err(serve_err(analytics::SERVICE))?;
        let urls = Urls {
            inventory: inv.url.clone(),
            payment: pay.url.clone(),
            shipping: ship.url.clone(),
            notification: notif.url.clone(),
            analytics: anal.url.clone(),
        };
        let faults = ServiceFaults {
            inventory: inv.faults.clone(),
            payment: pay.faults.clone(),
            shipping: ship.faults.clone(),
            notification: notif.faults.clone(),
            analytics: anal.faults.clone(),
        };
        let registry = InProcessRegistry::new();
        let registrations = vec![
            registry.register(inventory::SERVICE, &urls.inventory),
            registry.register(payment::SERVICE, &urls.payment),
            registry.register(shipping::SERVICE, &urls.shipping),
            registry.register(notification::SERVICE, &urls.notification),
            registry.register(analytics::SERVICE, &urls.analytics),
        ];
        let servers = vec![
            (inventory::SERVICE, inv),
            (payment::SERVICE, pay),
            (shipping::SERVICE, ship),
            (notification::SERVICE, notif),
            (analytics::SERVICE, anal),
        ];

        // The Order service's clients and flows.
        let http = HttpClient::with_config(Arc::new(registry.clone()), config.client.clone());
        let grpc = GrpcClient::with_config(Arc::new(registry.clone()), config.client.clone());
        let requester = Arc::new(
            Requester::new("order", bus.clone())
                .await
                .map_err(AppError::Start)?,
        );
        let book = OrderBook::new(order_store.clone());
        let deps = Deps {
            book: book.clone(),
            inventory: InventoryClient::new(&http),
            payment: PaymentClient::new(&grpc),
            shipping: ShippingClient::new(&http),
            notification: NotificationClient::new(&http),
            analytics: AnalyticsClient::new(&http),
            requester: requester.clone(),
            request_timeout: config.request_timeout,
            ship_attempts: config.ship_attempts,
            stop: flows_rx.clone(),
        };
        let cell: orchestration::OrchestratorCell = Arc::new(Mutex::new(None));
        let observed_book = book.clone();
        let orchestrator = Orchestrator::builder("order", order_store.clone())
            .saga(orchestration::saga(deps.clone(), cell.clone()))
            .on_transition(move |rec| {
                if rec.state == SagaState::NeedsAttention {
                    let book = observed_book.clone();
                    let id = rec.id.clone();
                    let error = rec.error.clone();
                    tokio::spawn(async move {
                        let _ = book
                            .record(&id, "order", "saga_needs_attention", error)
                            .await;
                    });
                }
            })
            .build()
            .map_err(AppError::Start)?;
        *cell.lock().unwrap_or_else(|p| p.into_inner()) = Some(orchestrator.clone());

        let enabled = |p: Pattern| config.patterns.contains(&p);
        let mut desk = OrderDesk::new(Arc::new(Catalog::standard()), book.clone());
        let mut drivers: HashMap<Pattern, Arc<dyn Driven>> = HashMap::new();
        if enabled(Pattern::Sync) {
            let f = SyncFlow::new(deps.clone());
            drivers.insert(Pattern::Sync, Arc::new(f.clone()));
            desk = desk.with_flow(Arc::new(f));
        }
        if enabled(Pattern::Choreography) {
            desk = desk.with_flow(Arc::new(ChoreographyFlow::new(deps.clone())));
        }
        if enabled(Pattern::RequestReply) {
            let f = RequestReplyFlow::new(deps.clone());
            drivers.insert(Pattern::RequestReply, Arc::new(f.clone()));
            desk = desk.with_flow(Arc::new(f));
        }
        if enabled(Pattern::Orchestration) {
            desk = desk.with_flow(Arc::new(OrchestrationFlow::new(
                deps.clone(),
                orchestrator.clone(),
            )));
        }
        if enabled(Pattern::Hybrid) {
            let f = HybridFlow::new(deps.clone());
            drivers.insert(Pattern::Hybrid, Arc::new(f.clone()));
            desk = desk.with_flow(Arc::new(f));
        }

        // Routers, one per service store.
        let monitor = Arc::new(MonitorStats::default());
        let choreo = enabled(Pattern::Choreography);
        let changed_book = book.clone();
        let mut order_router = Router::new("order", bus.clone(), order_store.clone()).on_committed(
            move |_consumer, env| {
                if let Some(id) = &env.subject {
                    changed_book.changed(id);
                }
            },
        );
        let mut payment_router = Router::new(payment::SERVICE, bus.clone(), payment_store.clone());
        let mut inventory_router =
            Router::new(inventory::SERVICE, bus.clone(), inventory_store.clone());
        let mut shipping_router =
            Router::new(shipping::SERVICE, bus.clone(), shipping_store.clone());
        let mut notification_router = Router::new(
            notification::SERVICE,
            bus.clone(),
            notification_store.clone(),
        );
        let mut analytics_router =
            Router::new(analytics::SERVICE, bus.clone(), analytics_store.clone());
        if enabled(Pattern::RequestReply) {
            payment::respond(&mut payment_router);
        }
        if choreo {
            choreography::subscribe_order(&mut order_router, book.clone(), monitor.clone());
            choreography::subscribe_payment(&mut payment_router);
            choreography::subscribe_inventory(&mut inventory_router, inventory_core.clone());
            choreography::subscribe_shipping(&mut shipping_router);
        }
        patterns::subscribe_inventory_shipments(&mut inventory_router, inventory_core.clone());
        patterns::subscribe_shipping_orders(&mut shipping_router);
        shipping::subscribe(&mut shipping_router, dir.clone());
        notification::subscribe(&mut notification_router, dir.clone());
        analytics::subscribe(&mut analytics_router);

        let mut flow_tasks = Vec::new();
        let mut routers = vec![
            ("order", order_router),
            (inventory::SERVICE, inventory_router),
            (shipping::SERVICE, shipping_router),
            (notification::SERVICE, notification_router),
            (analytics::SERVICE, analytics_router),
        ];
        if choreo || enabled(Pattern::RequestReply) {
            routers.push((payment::SERVICE, payment_router));
        }
        for (name, router) in routers {
            if !choreo && name == "order" {
                continue;
            }
            let bound = router.bind().await.map_err(AppError::Start)?;
            let shutdown = stopped(&flows_rx);
            flow_tasks.push((
                format!("{name} router"),
                tokio::spawn(async move {
                    if let Err(e) = bound.run(shutdown).await {
                        tracing::error!(router = name, error = %e, "router stopped with an error");
                    }
                }),
            ));
        }

        // Relays of the stores whose handlers or flows publish (shipping runs its own).
        let mut relay_tasks = Vec::new();
        for store in [&order_store, &payment_store, &inventory_store] {
            let relay = OutboxRelay::new(store.clone(), bus.clone());
            relay_tasks.push(tokio::spawn(relay.run(stopped(&relays_rx))));
        }

        // The orchestrator (resumes unfinished sagas first) and the monitor.
        let orch = orchestrator.clone();
        let shutdown = stopped(&flows_rx);
        flow_tasks.push((
            "orchestrator".into(),
            tokio::spawn(async move {
                if let Err(e) = orch.run(shutdown).await {
                    tracing::error!(error = %e, "the orchestrator stopped with an error");
                }
            }),
        ));
        if choreo {
            flow_tasks.push((
                "choreography monitor".into(),
                tokio::spawn(choreography::run_monitor(
                    book.clone(),
                    monitor.clone(),
                    config.stall_after,
                    flows_rx.clone(),
                )),
            ));
        }

        // Resume the in-memory flows of orders still accepted.
        let accepted = book
            .list(OrderStatus::Accepted, usize::MAX)
            .map_err(|e| AppError::Start(switchyard::Error::InvalidArgument(e.to_string())))?;
        let mut resumed = 0;
        for order in accepted {
            if let Some(driver) = drivers.get(&order.pattern) {
                let driver = driver.clone();
                resumed += 1;
                tokio::spawn(async move { driver.drive(order).await });
            }
        }
        if resumed > 0 {
            tracing::info!(orders = resumed, "resuming orders in flight");
        }

        Ok(ShopApp {
            desk,
            book,
            services: Services {
                inventory: inventory_core,
                payments: Payments::new(payment_store),
                shipping: Shipping::new(shipping_store),
                notifier: Notifier::new(notification_store, dir.clone()),
                analytics: Analytics::new(analytics_store),
            },
            urls,
            faults,
            orchestrator,
            saga_cell: cell,
            monitor,
            bus,
            stores,
            stop_flows,
            stop_relays,
            stop_servers,
            flow_tasks,
            relay_tasks,
            servers,
            _registrations: registrations,
            requester,
            embedded_bus,
        })
    }

    /// What the app has written durably so far: commits and syncs of every service's
    /// store, and messages and syncs of the embedded bus (zero when the app was given
    /// another bus). Benchmarks divide it by the orders placed.
    pub fn disk_stats(&self) -> DiskStats {
        use std::sync::atomic::Ordering::Relaxed;
        let mut d = DiskStats::default();
        for (_, _, store) in &self.stores {
            d.store_commits += store.stats().commits.load(Relaxed);
            d.store_syncs += store.stats().groups.load(Relaxed);
        }
        if let Some(bus) = &self.embedded_bus {
            let w = bus.storage().stats();
            d.bus_messages = w.messages.load(Relaxed);
            d.bus_syncs = w.fsyncs.load(Relaxed);
        }
        d
    }

    /// The order desk, with the flow of every running pattern.
    pub fn desk(&self) -> &OrderDesk {
        &self.desk
    }

    /// The Order service's order book.
    pub fn book(&self) -> &OrderBook {
        &self.book
    }

    /// The backing services' core handles (stock, ledger, shipments, mail, counters).
    pub fn services(&self) -> &Services {
        &self.services
    }

    /// The servers' URLs.
    pub fn urls(&self) -> &Urls {
        &self.urls
    }

    /// The servers' fault injection.
    pub fn faults(&self) -> &ServiceFaults {
        &self.faults
    }

    /// The saga orchestrator of the orchestration pattern.
    pub fn orchestrator(&self) -> &Orchestrator {
        &self.orchestrator
    }

    /// The bus.
    pub fn bus(&self) -> &Arc<dyn Bus> {
        &self.bus
    }

    /// The choreography monitor's counters.
    pub fn monitor(&self) -> &Arc<MonitorStats> {
        &self.monitor
    }

    /// Choreography flows flagged as stalled so far.
    pub fn stalled_flows(&self) -> u64 {
        self.monitor.stalled.load(Ordering::Relaxed)
    }

    /// Choreography events flagged as diverging so far.
    pub fn diverged_events(&self) -> u64 {
        self.monitor.diverged.load(Ordering::Relaxed)
    }

    /// The Order service's requester (its counters show timeouts and late replies).
    pub fn requester(&self) -> &Arc<Requester> {
        &self.requester
    }

    /// Stops everything cleanly, in order: the flows, routers, orchestrator and monitor
    /// (orders in flight stop where they are and resume at the next start), then the
    /// relays, then the servers; then closes the bus and the stores.
    pub async fn shutdown(self) -> Result<(), AppError> {
        let _ = self.stop_flows.send(true);
        for (name, task) in self.flow_tasks {
            if let Err(e) = task.await {
                tracing::warn!(task = %name, error = %e, "task failed");
            }
        }
        let _ = self.stop_relays.send(true);
        for task in self.relay_tasks {
            let _ = task.await;
        }
        let _ = self.stop_servers.send(true);
        for (name, running) in self.servers {
            match running.task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(service = name, error = %e, "server stopped with an error")
                }
                Err(e) => tracing::warn!(service = name, error = %e, "server task failed"),
            }
        }
        drop(self.desk);
        drop(self.requester);
        // Break the orchestrator <-> saga cycle so that everything holding the bus goes.
        self.saga_cell
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        drop(self.orchestrator);
        // Let flows cut at an await point drop their handles before the stores close.
        tokio::time::sleep(Duration::from_millis(20)).await;
        self.bus.close().await.map_err(AppError::Bus)?;
        let mut first = Ok(());
        for (service, path, store) in self.stores {
            if let Err(source) = store.close().await
                && first.is_ok()
            {
                first = Err(AppError::Store {
                    service,
                    path,
                    source,
                });
            }
        }
        first
    }
}
