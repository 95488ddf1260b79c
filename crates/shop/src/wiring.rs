//! The pieces the shop is assembled from, shared by [`ShopApp`](crate::app::ShopApp)
//! (every service in one process) and [`crate::serve`] (one service per process), so
//! that a service runs the same way in both:
//!
//! - [`Stores`]: the services' stores (embedded under the data directory, or schemas on
//!   PostgreSQL), opened and closed with the shop's error mapping;
//! - [`Backing`]: one backing service over its store — its server, its router handlers
//!   for the patterns that run, whether the caller relays its outbox;
//! - [`OrderService`]: the Order service's clients, flows, saga orchestrator and desk,
//!   its router, and the resuming of the orders its in-memory flows left accepted;
//! - [`Tasks`]: the background work (flows, routers and orchestrator; relays; servers)
//!   and the order it stops in.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchyard::Bus;
use switchyard::relay::OutboxRelay;
use switchyard::reply::Requester;
use switchyard::router::Router;
use switchyard::saga::{Orchestrator, SagaState};
use switchyard::store::Store;
use switchyard_embedded::{EmbeddedStore, StoreConfig};
use switchyard_nats::{NatsBus, NatsConfig};
use switchyard_postgres::{PgStore, PgStoreConfig};
use switchyard_rpc::grpc::GrpcClient;
use switchyard_rpc::registry::Registry;
use switchyard_rpc::{ClientConfig, HttpClient};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::app::AppError;
use crate::faults::Faults;
use crate::model::Catalog;
use crate::order::{OrderBook, OrderDesk, OrderStatus, Pattern};
use crate::patterns::choreography::{self, ChoreographyFlow, MonitorStats};
use crate::patterns::hybrid::HybridFlow;
use crate::patterns::orchestration::{self, OrchestrationFlow};
use crate::patterns::request_reply::RequestReplyFlow;
use crate::patterns::sync::SyncFlow;
use crate::patterns::{self, Deps, Driven};
use crate::services::analytics::{self, AnalyticsClient};
use crate::services::inventory::{self, Inventory, InventoryClient};
use crate::services::notification::{self, NotificationClient};
use crate::services::payment::{self, PaymentClient};
use crate::services::shipping::{self, ShippingClient};
use crate::services::{Running, ServeError};

/// The Order service's name (its store, router, requester and orchestrator).
pub(crate) const ORDER: &str = "order";

/// Creates the data directory.
pub(crate) fn create_data_dir(dir: &Path) -> Result<(), AppError> {
    std::fs::create_dir_all(dir).map_err(|source| AppError::DataDir {
        path: dir.to_path_buf(),
        source,
    })
}

/// Where the services' stores live: `embedded` (one store per service under the data
/// directory) or a PostgreSQL URL (one schema per service, named after it, shared by the
/// service's instances).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum StoreBackend {
    /// Embedded stores under `<data_dir>/<service>`.
    #[default]
    Embedded,
    /// PostgreSQL at this URL (`postgres://…`).
    Postgres(String),
}

impl StoreBackend {
    /// Parses `--store`: `embedded`, or a `postgres://` / `postgresql://` URL.
    pub fn parse(text: &str) -> Option<StoreBackend> {
        match text.trim() {
            "embedded" => Some(StoreBackend::Embedded),
            url if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                Some(StoreBackend::Postgres(url.to_string()))
            }
            _ => None,
        }
    }
}

/// Which bus the services share: `embedded` (a log under the data directory, private to
/// one process) or a NATS server (JetStream streams shared by every process).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum BusBackend {
    /// The embedded bus.
    #[default]
    Embedded,
    /// NATS at this URL (`nats://…`).
    Nats(String),
}

impl BusBackend {
    /// Parses `--bus`: `embedded`, or a `nats://` / `tls://` URL.
    pub fn parse(text: &str) -> Option<BusBackend> {
        match text.trim() {
            "embedded" => Some(BusBackend::Embedded),
            url if url.starts_with("nats://") || url.starts_with("tls://") => {
                Some(BusBackend::Nats(url.to_string()))
            }
            _ => None,
        }
    }

    /// The NATS bus at `url` (it connects on first use, and reconnects by itself).
    pub fn nats(url: &str) -> Arc<dyn Bus> {
        Arc::new(NatsBus::new(NatsConfig::new(url)))
    }
}

/// `url` with its database name replaced by `database` (the query string kept).
fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let host_start = base.find("://").map_or(0, |i| i + 3);
    let base = match base[host_start..].find('/') {
        Some(slash) => &base[..host_start + slash],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{database}?{q}"),
        None => format!("{base}/{database}"),
    }
}

/// Creates database `name` on the server of `url` (the role needs `CREATEDB`); returns
/// the URL of the new database. For runs that need a database of their own (the lab).
pub async fn create_database(url: &str, name: &str) -> Result<String, sqlx::Error> {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(url).await?;
    sqlx::query(&format!("CREATE DATABASE \"{name}\""))
        .execute(&mut conn)
        .await?;
    conn.close().await?;
    Ok(with_database(url, name))
}

/// Drops database `name` on the server of `url` (its sessions ended first).
pub async fn drop_database(url: &str, name: &str) -> Result<(), sqlx::Error> {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(url).await?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .execute(&mut conn)
        .await?;
    conn.close().await
}

/// One open store.
enum OpenStore {
    Embedded(PathBuf, EmbeddedStore),
    Postgres(PgStore),
}

/// The stores a process opened, one per service, closed together at shutdown.
#[derive(Default)]
pub(crate) struct Stores {
    open: Vec<(&'static str, OpenStore)>,
}

impl Stores {
    /// Opens the store of `service` on `backend`: under `dir/<service>` when embedded (an
    /// error names the service and says to check that no other shop uses the directory),
    /// in the schema `<service>` on PostgreSQL.
    pub(crate) async fn open(
        &mut self,
        backend: &StoreBackend,
        dir: &Path,
        service: &'static str,
    ) -> Result<Arc<dyn Store>, AppError> {
        match backend {
            StoreBackend::Embedded => {
                let path = dir.join(service);
                let store =
                    EmbeddedStore::open(&path, StoreConfig::default()).map_err(|source| {
                        AppError::Store {
                            service,
                            path: path.clone(),
                            source,
                        }
                    })?;
                self.open
                    .push((service, OpenStore::Embedded(path, store.clone())));
                Ok(Arc::new(store))
            }
            StoreBackend::Postgres(url) => {
                let store = PgStore::connect(PgStoreConfig::new(url.clone(), service))
                    .await
                    .map_err(|source| AppError::Postgres { service, source })?;
                self.open
                    .push((service, OpenStore::Postgres(store.clone())));
                Ok(Arc::new(store))
            }
        }
    }

    /// The embedded stores opened, for their statistics.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &EmbeddedStore> {
        self.open.iter().filter_map(|(_, s)| match s {
            OpenStore::Embedded(_, store) => Some(store),
            OpenStore::Postgres(_) => None,
        })
    }

    /// Closes every store; the first failure, if any (the others are closed anyway).
    pub(crate) async fn close(self) -> Result<(), AppError> {
        let mut first = Ok(());
        for (service, store) in self.open {
            match store {
                OpenStore::Embedded(path, store) => {
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
                OpenStore::Postgres(store) => store.close().await,
            }
        }
        first
    }
}

/// A future that completes once `rx` turns true.
pub(crate) fn stopped(rx: &watch::Receiver<bool>) -> impl Future<Output = ()> + Send + 'static {
    let mut rx = rx.clone();
    async move {
        let _ = rx.wait_for(|s| *s).await;
    }
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn database_names_are_replaced() {
        assert_eq!(
            with_database("postgres://u:p@h:5432/shop", "run1"),
            "postgres://u:p@h:5432/run1"
        );
        assert_eq!(
            with_database("postgres://u@h/shop?sslmode=disable", "run1"),
            "postgres://u@h/run1?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h", "run1"), "postgres://h/run1");
    }
}

// ---------------------------------------------------------------- backing services

/// One of the five backing services over its own store: starts its server, registers
/// its router handlers, and says whether its outbox needs a relay from the caller.
#[derive(Clone)]
pub(crate) enum Backing {
    /// Inventory, over the one core its server and its handlers share (they take the
    /// same in-process stock locks).
    Inventory(Inventory),
    /// Payment (gRPC).
    Payment(Arc<dyn Store>),
    /// Shipping (runs the relay of its own store).
    Shipping(Arc<dyn Store>),
    /// Notification.
    Notification(Arc<dyn Store>),
    /// Analytics.
    Analytics(Arc<dyn Store>),
}

impl Backing {
    /// The service's name (in registries, on timelines, as its store's directory).
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Backing::Inventory(_) => inventory::SERVICE,
            Backing::Payment(_) => payment::SERVICE,
            Backing::Shipping(_) => shipping::SERVICE,
            Backing::Notification(_) => notification::SERVICE,
            Backing::Analytics(_) => analytics::SERVICE,
        }
    }

    /// The protocol of its server, as `GET /services` shows it.
    pub(crate) fn protocol(&self) -> &'static str {
        match self {
            Backing::Payment(_) => "grpc",
            _ => "http",
        }
    }

    /// Its store.
    pub(crate) fn store(&self) -> Arc<dyn Store> {
        match self {
            Backing::Inventory(core) => core.store().clone(),
            Backing::Payment(s)
            | Backing::Shipping(s)
            | Backing::Notification(s)
            | Backing::Analytics(s) => s.clone(),
        }
    }

    /// Starts its server on `listener` until `shutdown` (shipping publishes through
    /// `bus`; notification writes its mail under `dir`).
    pub(crate) async fn start(
        &self,
        bus: &Arc<dyn Bus>,
        dir: &Path,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<Running, AppError> {
        let started = match self {
            Backing::Inventory(core) => {
                inventory::start_with(core.clone(), listener, shutdown).await
            }
            Backing::Payment(store) => payment::start(store.clone(), listener, shutdown).await,
            Backing::Shipping(store) => {
                shipping::start(store.clone(), bus.clone(), listener, shutdown).await
            }
            Backing::Notification(store) => {
                notification::start(store.clone(), dir.to_path_buf(), listener, shutdown).await
            }
            Backing::Analytics(store) => analytics::start(store.clone(), listener, shutdown).await,
        };
        started.map_err(|source: ServeError| AppError::Serve {
            service: self.name(),
            source,
        })
    }

    /// Whether it has router handlers when `enabled` patterns run (payment has only
    /// pattern-specific ones).
    pub(crate) fn has_router(&self, enabled: &[Pattern]) -> bool {
        match self {
            Backing::Payment(_) => {
                enabled.contains(&Pattern::Choreography) || enabled.contains(&Pattern::RequestReply)
            }
            _ => true,
        }
    }

    /// Registers its handlers on `router` (built on its store) for the `enabled`
    /// patterns: the reactions every pattern relies on, plus the choreography's and the
    /// request-reply responder when those run. Labels and mail go under `dir`.
    pub(crate) fn subscribe(&self, router: &mut Router, dir: &Path, enabled: &[Pattern]) {
        let choreo = enabled.contains(&Pattern::Choreography);
        match self {
            Backing::Inventory(core) => {
                if choreo {
                    choreography::subscribe_inventory(router, core.clone());
                }
                patterns::subscribe_inventory_shipments(router, core.clone());
            }
            Backing::Payment(_) => {
                if enabled.contains(&Pattern::RequestReply) {
                    payment::respond(router);
                }
                if choreo {
                    choreography::subscribe_payment(router);
                }
            }
            Backing::Shipping(_) => {
                if choreo {
                    choreography::subscribe_shipping(router);
                }
                patterns::subscribe_shipping_orders(router);
                shipping::subscribe(router, dir.to_path_buf());
            }
            Backing::Notification(_) => notification::subscribe(router, dir.to_path_buf()),
            Backing::Analytics(_) => analytics::subscribe(router),
        }
    }

    /// Its router on `bus` with its handlers for `enabled`, if it has any, gated by the
    /// service's `faults` (an injected outage pauses its handlers too).
    pub(crate) fn router(
        &self,
        bus: &Arc<dyn Bus>,
        dir: &Path,
        enabled: &[Pattern],
        faults: &Faults,
    ) -> Option<Router> {
        if !self.has_router(enabled) {
            return None;
        }
        let faults = faults.clone();
        let mut router = Router::new(self.name(), bus.clone(), self.store()).gate(move |_| {
            let faults = faults.clone();
            async move { faults.gate().await }
        });
        self.subscribe(&mut router, dir, enabled);
        Some(router)
    }

    /// Whether the caller runs the outbox relay of its store: the stores whose handlers
    /// publish (shipping runs its own relay; notification and analytics publish nothing).
    pub(crate) fn relayed(&self) -> bool {
        matches!(self, Backing::Inventory(_) | Backing::Payment(_))
    }
}

// ---------------------------------------------------------------- the Order service

/// The Order service's settings (see [`AppConfig`](crate::app::AppConfig)).
#[derive(Debug, Clone)]
pub(crate) struct OrderSettings {
    /// Its clients' settings.
    pub client: ClientConfig,
    /// How long one request over the bus waits for its reply.
    pub request_timeout: Duration,
    /// Attempts of the orchestration's ship step.
    pub ship_attempts: u32,
    /// The patterns it runs.
    pub patterns: Vec<Pattern>,
}

/// The Order service: its order book, its clients of the backing services (found
/// through a registry), the flow of every enabled pattern on its desk, and the saga
/// orchestrator on its store.
pub(crate) struct OrderService {
    /// The desk placing orders in every enabled pattern.
    pub desk: OrderDesk,
    /// The order book.
    pub book: OrderBook,
    /// The saga orchestrator (orchestration).
    pub orchestrator: Orchestrator,
    /// The orchestrator as its saga's steps reach it (a cycle broken at shutdown).
    pub saga_cell: orchestration::OrchestratorCell,
    /// Request/reply over the bus.
    pub requester: Arc<Requester>,
    /// The flows running in memory, resumed for orders still accepted.
    pub drivers: HashMap<Pattern, Arc<dyn Driven>>,
    /// The patterns it runs.
    pub patterns: Vec<Pattern>,
}

impl OrderService {
    /// Builds the Order service over its `store` and `bus`, calling the backing services
    /// found in `registry`; background flows stop when `stop` turns true.
    pub(crate) async fn build(
        store: Arc<dyn Store>,
        bus: &Arc<dyn Bus>,
        registry: Arc<dyn Registry>,
        settings: &OrderSettings,
        stop: watch::Receiver<bool>,
    ) -> Result<OrderService, AppError> {
        let http = HttpClient::with_config(registry.clone(), settings.client.clone());
        let grpc = GrpcClient::with_config(registry, settings.client.clone());
        let requester = Arc::new(
            Requester::new(ORDER, bus.clone())
                .await
                .map_err(AppError::Start)?,
        );
        let book = OrderBook::new(store.clone());
        let deps = Deps {
            book: book.clone(),
            inventory: InventoryClient::new(&http),
            payment: PaymentClient::new(&grpc),
            shipping: ShippingClient::new(&http),
            notification: NotificationClient::new(&http),
            analytics: AnalyticsClient::new(&http),
            requester: requester.clone(),
            request_timeout: settings.request_timeout,
            ship_attempts: settings.ship_attempts,
            stop,
        };
        let cell: orchestration::OrchestratorCell = Arc::new(Mutex::new(None));
        let observed_book = book.clone();
        let orchestrator = Orchestrator::builder(ORDER, store)
            .saga(orchestration::saga(deps.clone(), cell.clone()))
            .on_transition(move |rec| {
                if rec.state == SagaState::NeedsAttention {
                    let book = observed_book.clone();
                    let id = rec.id.clone();
                    let error = rec.error.clone();
                    tokio::spawn(async move {
                        let _ = book.record(&id, ORDER, "saga_needs_attention", error).await;
                    });
                }
            })
            .build()
            .map_err(AppError::Start)?;
        *cell.lock().unwrap_or_else(|p| p.into_inner()) = Some(orchestrator.clone());

        let enabled = |p: Pattern| settings.patterns.contains(&p);
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
        Ok(OrderService {
            desk,
            book,
            orchestrator,
            saga_cell: cell,
            requester,
            drivers,
            patterns: settings.patterns.clone(),
        })
    }

    /// Whether the choreography runs (then the Order service has a router and the
    /// monitor runs).
    pub(crate) fn choreography(&self) -> bool {
        self.patterns.contains(&Pattern::Choreography)
    }

    /// Its router on `bus` and its `store` (the choreography's order handlers, waking
    /// the order's waiters after each commit), if the choreography runs.
    pub(crate) fn router(
        &self,
        bus: &Arc<dyn Bus>,
        store: &Arc<dyn Store>,
        monitor: &Arc<MonitorStats>,
    ) -> Option<Router> {
        if !self.choreography() {
            return None;
        }
        let changed_book = self.book.clone();
        let mut router =
            Router::new(ORDER, bus.clone(), store.clone()).on_committed(move |_consumer, env| {
                if let Some(id) = &env.subject {
                    changed_book.changed(id);
                }
            });
        choreography::subscribe_order(&mut router, self.book.clone(), monitor.clone());
        Some(router)
    }

    /// Spawns the orchestrator (it resumes unfinished sagas first) and, with the
    /// choreography, its monitor.
    pub(crate) fn spawn_background(
        &self,
        tasks: &mut Tasks,
        monitor: &Arc<MonitorStats>,
        stall_after: Duration,
    ) {
        let orch = self.orchestrator.clone();
        let shutdown = tasks.flows_stopped();
        tasks.spawn_flow("orchestrator", async move {
            if let Err(e) = orch.run(shutdown).await {
                tracing::error!(error = %e, "the orchestrator stopped with an error");
            }
        });
        if self.choreography() {
            tasks.spawn_flow(
                "choreography monitor",
                choreography::run_monitor(
                    self.book.clone(),
                    monitor.clone(),
                    stall_after,
                    tasks.flows_rx(),
                ),
            );
        }
    }

    /// Runs again, each in its own task, the in-memory flow of every order still
    /// accepted whose pattern runs here (see [`crate::patterns`]); returns how many.
    pub(crate) async fn resume_accepted(&self) -> Result<usize, AppError> {
        let accepted = self
            .book
            .list(OrderStatus::Accepted, usize::MAX)
            .await
            .map_err(|e| AppError::Start(switchyard::Error::InvalidArgument(e.to_string())))?;
        let mut resumed = 0;
        for order in accepted {
            if let Some(driver) = self.drivers.get(&order.pattern) {
                let driver = driver.clone();
                resumed += 1;
                tokio::spawn(async move { driver.drive(order).await });
            }
        }
        if resumed > 0 {
            tracing::info!(orders = resumed, "resuming orders in flight");
        }
        Ok(resumed)
    }

    /// Lets go of everything that holds the bus and the store (after the tasks
    /// stopped): the desk, the requester, and the orchestrator with its saga's cycle.
    pub(crate) fn release(self) {
        drop(self.desk);
        drop(self.requester);
        drop(self.drivers);
        self.saga_cell
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        drop(self.orchestrator);
    }
}

// ---------------------------------------------------------------- tasks

/// The background work of a running shop (or of one service), stopped in order by
/// [`Tasks::stop`]: first the flows, routers, orchestrator and monitor (orders in
/// flight stop where they are and resume at the next start), then the outbox relays
/// (so what the routers committed last is published), then the servers.
pub(crate) struct Tasks {
    stop_flows: watch::Sender<bool>,
    flows_rx: watch::Receiver<bool>,
    stop_relays: watch::Sender<bool>,
    relays_rx: watch::Receiver<bool>,
    stop_servers: watch::Sender<bool>,
    servers_rx: watch::Receiver<bool>,
    flow_tasks: Vec<(String, JoinHandle<()>)>,
    relay_tasks: Vec<JoinHandle<()>>,
    servers: Vec<(&'static str, Running)>,
}

impl Tasks {
    /// Nothing running yet.
    pub(crate) fn new() -> Self {
        let (stop_flows, flows_rx) = watch::channel(false);
        let (stop_relays, relays_rx) = watch::channel(false);
        let (stop_servers, servers_rx) = watch::channel(false);
        Tasks {
            stop_flows,
            flows_rx,
            stop_relays,
            relays_rx,
            stop_servers,
            servers_rx,
            flow_tasks: Vec::new(),
            relay_tasks: Vec::new(),
            servers: Vec::new(),
        }
    }

    /// Turns true when the flows must stop (for [`Deps::stop`]).
    pub(crate) fn flows_rx(&self) -> watch::Receiver<bool> {
        self.flows_rx.clone()
    }

    /// Completes when the flows must stop.
    pub(crate) fn flows_stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        stopped(&self.flows_rx)
    }

    /// Completes when the servers must stop (their shutdown future).
    pub(crate) fn servers_stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        stopped(&self.servers_rx)
    }

    /// Keeps `running` (started with [`servers_stopped`](Self::servers_stopped)) to
    /// wait for it at the end.
    pub(crate) fn add_server(&mut self, service: &'static str, running: Running) {
        self.servers.push((service, running));
    }

    /// Runs `task` with the flows (stopped first).
    pub(crate) fn spawn_flow(
        &mut self,
        name: impl Into<String>,
        task: impl Future<Output = ()> + Send + 'static,
    ) {
        self.flow_tasks.push((name.into(), tokio::spawn(task)));
    }

    /// Binds `router` (its consumer groups exist from now on) and runs it with the
    /// flows.
    pub(crate) async fn spawn_router(
        &mut self,
        name: &'static str,
        router: Router,
    ) -> Result<(), AppError> {
        let bound = router.bind().await.map_err(AppError::Start)?;
        let shutdown = self.flows_stopped();
        self.spawn_flow(format!("{name} router"), async move {
            if let Err(e) = bound.run(shutdown).await {
                tracing::error!(router = name, error = %e, "router stopped with an error");
            }
        });
        Ok(())
    }

    /// Runs the outbox relay of `store` to `bus` (stopped after the routers).
    pub(crate) fn spawn_relay(&mut self, store: &Arc<dyn Store>, bus: &Arc<dyn Bus>) {
        let relay = OutboxRelay::new(store.clone(), bus.clone());
        self.relay_tasks
            .push(tokio::spawn(relay.run(stopped(&self.relays_rx))));
    }

    /// Stops everything in order (see [`Tasks`]) and waits for each part; failures are
    /// logged.
    pub(crate) async fn stop(self) {
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
    }
}

/// Closes what a process opened, after its [`Tasks`] stopped: lets the Order service go
/// (if it ran here), gives flows cut at an await point a moment to drop their handles,
/// then closes the bus and the stores.
pub(crate) async fn close(
    order: Option<OrderService>,
    bus: Arc<dyn Bus>,
    stores: Stores,
) -> Result<(), AppError> {
    if let Some(order) = order {
        order.release();
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    bus.close().await.map_err(AppError::BusClose)?;
    stores.close().await
}
