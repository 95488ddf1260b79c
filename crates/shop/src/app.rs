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

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use switchyard::Bus;
use switchyard::reply::Requester;
use switchyard::router::RouterStats;
use switchyard::saga::Orchestrator;
use switchyard_embedded::EmbeddedBus;
use switchyard_rpc::ClientConfig;
use switchyard_rpc::registry::{InProcessRegistry, Registration};
use tokio::net::TcpListener;

use crate::faults::Faults;
use crate::order::{OrderBook, OrderDesk, Pattern};
use crate::patterns::choreography::{self, MonitorStats};
use crate::services::ServeError;
use crate::services::analytics::{self, Analytics};
use crate::services::inventory::{self, Inventory};
use crate::services::notification::{self, Notifier};
use crate::services::payment::{self, Payments};
use crate::services::shipping::{self, Shipping};
use crate::wiring::{self, Backing, OrderService, OrderSettings, Stores, Tasks};
pub use crate::wiring::{BusBackend, StoreBackend, create_database, drop_database};

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
    /// Where the services' stores live (default: embedded, under `data_dir`).
    pub store: StoreBackend,
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
            .field("store", &self.store)
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
            store: StoreBackend::Embedded,
            patterns: Pattern::ALL.to_vec(),
            client: ClientConfig {
                default_timeout: Duration::from_secs(5),
                backoff_base: Duration::from_millis(10),
                backoff_max: Duration::from_millis(200),
                ..ClientConfig::default()
            },
            stall_after: choreography::DEFAULT_STALL_AFTER,
            request_timeout: Duration::from_secs(2),
            ship_attempts: crate::patterns::orchestration::SHIP_ATTEMPTS,
        }
    }

    /// This config with the services' stores on `store`.
    pub fn with_store(mut self, store: StoreBackend) -> Self {
        self.store = store;
        self
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
    /// A service's PostgreSQL store could not be opened.
    #[error("the {service} store on PostgreSQL failed: {source}")]
    Postgres {
        /// The service.
        service: &'static str,
        /// The store's error.
        #[source]
        source: switchyard_postgres::PgError,
    },
    /// The embedded bus could not be opened.
    #[error("the bus failed: {0}; check <data_dir>/bus (is another shop using it?)")]
    Bus(#[source] switchyard::Error),
    /// The bus could not be closed cleanly (e.g. its broker is gone): the messages it held
    /// go back to the broker or the log by themselves.
    #[error(
        "closing the bus failed: {0}; what it held unsettled is delivered again after its ack timeout"
    )]
    BusClose(#[source] switchyard::Error),
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

impl ServiceFaults {
    /// The handle of service `name` (`inventory`, `payment`, …), if it is one of them.
    pub fn of(&self, name: &str) -> Option<Faults> {
        Some(match name {
            inventory::SERVICE => self.inventory.clone(),
            payment::SERVICE => self.payment.clone(),
            shipping::SERVICE => self.shipping.clone(),
            notification::SERVICE => self.notification.clone(),
            analytics::SERVICE => self.analytics.clone(),
            _ => return None,
        })
    }
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

/// Totals of the counters of every router of the app (see [`ShopApp::router_stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RouterTotals {
    /// Messages handled and acknowledged (requests answered).
    pub processed: u64,
    /// Deliveries skipped as duplicates (the inbox had them).
    pub duplicates: u64,
    /// Retryable handler failures: events nacked for redelivery, requests retried in
    /// place by a responder.
    pub retried: u64,
    /// Messages the routers sent to a DLQ.
    pub dead_lettered: u64,
}

/// The running shop. See the [module docs](self).
pub struct ShopApp {
    order: OrderService,
    services: Services,
    urls: Urls,
    faults: ServiceFaults,
    monitor: Arc<MonitorStats>,
    bus: Arc<dyn Bus>,
    stores: Stores,
    /// The embedded bus, when the app opened it (not given one).
    embedded_bus: Option<EmbeddedBus>,
    tasks: Tasks,
    /// The counters of every router started, by service.
    router_stats: Vec<(&'static str, Arc<RouterStats>)>,
    _registrations: Vec<Registration>,
}

impl std::fmt::Debug for ShopApp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShopApp")
            .field("urls", &self.urls)
            .field("patterns", &self.order.desk.patterns())
            .finish_non_exhaustive()
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
        wiring::create_data_dir(&dir)?;
        let mut stores = Stores::default();
        let order_store = stores.open(&config.store, &dir, wiring::ORDER).await?;
        let inventory_store = stores.open(&config.store, &dir, inventory::SERVICE).await?;
        let payment_store = stores.open(&config.store, &dir, payment::SERVICE).await?;
        let shipping_store = stores.open(&config.store, &dir, shipping::SERVICE).await?;
        let notification_store = stores
            .open(&config.store, &dir, notification::SERVICE)
            .await?;
        let analytics_store = stores.open(&config.store, &dir, analytics::SERVICE).await?;
        let (bus, embedded_bus): (Arc<dyn Bus>, _) = match &config.bus {
            Some(b) => (b.clone(), None),
            None => {
                let b = EmbeddedBus::open(dir.join("bus")).map_err(AppError::Bus)?;
                (Arc::new(b.clone()), Some(b))
            }
        };
        let mut tasks = Tasks::new();

        // The five servers. One inventory core for the server and the event handlers:
        // they share its in-process stock locks.
        let ports = config.ports;
        let inventory_core = Inventory::new(inventory_store.clone());
        let inventory_svc = Backing::Inventory(inventory_core.clone());
        let payment_svc = Backing::Payment(payment_store.clone());
        let shipping_svc = Backing::Shipping(shipping_store.clone());
        let notification_svc = Backing::Notification(notification_store.clone());
        let analytics_svc = Backing::Analytics(analytics_store.clone());
        let inv = inventory_svc
            .start(
                &bus,
                &dir,
                bind(inventory::SERVICE, ports.inventory).await?,
                tasks.servers_stopped(),
            )
            .await?;
        let pay = payment_svc
            .start(
                &bus,
                &dir,
                bind(payment::SERVICE, ports.payment).await?,
                tasks.servers_stopped(),
            )
            .await?;
        let ship = shipping_svc
            .start(
                &bus,
                &dir,
                bind(shipping::SERVICE, ports.shipping).await?,
                tasks.servers_stopped(),
            )
            .await?;
        let notif = notification_svc
            .start(
                &bus,
                &dir,
                bind(notification::SERVICE, ports.notification).await?,
                tasks.servers_stopped(),
            )
            .await?;
        let anal = analytics_svc
            .start(
                &bus,
                &dir,
                bind(analytics::SERVICE, ports.analytics).await?,
                tasks.servers_stopped(),
            )
            .await?;
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
        for (service, running) in [
            (inventory::SERVICE, inv),
            (payment::SERVICE, pay),
            (shipping::SERVICE, ship),
            (notification::SERVICE, notif),
            (analytics::SERVICE, anal),
        ] {
            tasks.add_server(service, running);
        }
        let backing = [
            inventory_svc,
            payment_svc,
            shipping_svc,
            notification_svc,
            analytics_svc,
        ];

        // The Order service's clients and flows.
        let order = OrderService::build(
            order_store.clone(),
            &bus,
            Arc::new(registry.clone()),
            &OrderSettings {
                client: config.client.clone(),
                request_timeout: config.request_timeout,
                ship_attempts: config.ship_attempts,
                patterns: config.patterns.clone(),
            },
            tasks.flows_rx(),
        )
        .await?;

        // Routers, one per service store.
        let monitor = Arc::new(MonitorStats::default());
        let mut router_stats = Vec::new();
        if let Some(router) = order.router(&bus, &order_store, &monitor) {
            router_stats.push((wiring::ORDER, router.stats()));
            tasks.spawn_router(wiring::ORDER, router).await?;
        }
        for service in &backing {
            let service_faults = faults.of(service.name()).unwrap_or_default();
            if let Some(router) = service.router(&bus, &dir, &config.patterns, &service_faults) {
                router_stats.push((service.name(), router.stats()));
                tasks.spawn_router(service.name(), router).await?;
            }
        }

        // Relays of the stores whose handlers or flows publish (shipping runs its own).
        tasks.spawn_relay(&order_store, &bus);
        for service in &backing {
            if service.relayed() {
                tasks.spawn_relay(&service.store(), &bus);
            }
        }

        // The orchestrator (resumes unfinished sagas first) and the monitor; then the
        // in-memory flows of orders still accepted.
        order.spawn_background(&mut tasks, &monitor, config.stall_after);
        order.resume_accepted().await?;

        Ok(ShopApp {
            order,
            services: Services {
                inventory: inventory_core,
                payments: Payments::new(payment_store),
                shipping: Shipping::new(shipping_store),
                notifier: Notifier::new(notification_store, dir.clone()),
                analytics: Analytics::new(analytics_store),
            },
            urls,
            faults,
            monitor,
            bus,
            stores,
            tasks,
            router_stats,
            _registrations: registrations,
            embedded_bus,
        })
    }

    /// What the app has written durably so far: commits and syncs of every service's
    /// store, and messages and syncs of the embedded bus (zero when the app was given
    /// another bus). Benchmarks divide it by the orders placed.
    pub fn disk_stats(&self) -> DiskStats {
        use std::sync::atomic::Ordering::Relaxed;
        let mut d = DiskStats::default();
        for store in self.stores.iter() {
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

    /// The counters of every router (the Order service's and the backing services'),
    /// summed: redeliveries, duplicates skipped, dead letters.
    pub fn router_stats(&self) -> RouterTotals {
        use std::sync::atomic::Ordering::Relaxed;
        let mut t = RouterTotals::default();
        for (_, s) in &self.router_stats {
            t.processed += s.processed.load(Relaxed);
            t.duplicates += s.duplicates.load(Relaxed);
            t.retried += s.retried.load(Relaxed);
            t.dead_lettered += s.dead_lettered.load(Relaxed);
        }
        t
    }

    /// The order desk, with the flow of every running pattern.
    pub fn desk(&self) -> &OrderDesk {
        &self.order.desk
    }

    /// The Order service's order book.
    pub fn book(&self) -> &OrderBook {
        &self.order.book
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
        &self.order.orchestrator
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
        &self.order.requester
    }

    /// Stops everything cleanly, in order: the flows, routers, orchestrator and monitor
    /// (orders in flight stop where they are and resume at the next start), then the
    /// relays, then the servers; then closes the bus and the stores.
    pub async fn shutdown(self) -> Result<(), AppError> {
        self.tasks.stop().await;
        wiring::close(Some(self.order), self.bus, self.stores).await
    }
}
