//! `shop up`: the whole shop ([`ShopApp`]) behind the Order service's public API, wired
//! to the command line — plus the operator endpoints ([`api::Admin`]) and the demo
//! orders. `shop serve <service>`: one service in its own process ([`crate::serve`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use switchyard::Bus;
use switchyard::bus::ReplayFilter;
use switchyard::saga::{Orchestrator, SagaRecord, SagaState};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api::{
    self, AdminError, CheckItem, CheckReport, DeadLetterView, ReplayOutcome, ReplayRequest,
    ServiceInfo,
};
use crate::app::{AppConfig, BusBackend, Ports, ShopApp};
use crate::cli::up::{LaunchError, Launched, Launcher, ServeConfig, Shutdown, UpConfig};
use crate::model::{Item, RARE_SKU, TOPICS};
use crate::order::{NewOrder, OrderDesk, OrderStatus};

/// Runs the shop for `shop up` and one service for `shop serve` (see
/// [`crate::cli::up::Launcher`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct AppLauncher;

#[async_trait]
impl Launcher for AppLauncher {
    async fn up(&self, c: UpConfig, shutdown: Shutdown) -> Result<Launched, LaunchError> {
        let (bus, store) = crate::serve::backends(&c.bus, &c.store)?;
        if matches!(bus, BusBackend::Nats(_)) {
            // A shared broker: every service its own process.
            return crate::processes::up(c, shutdown).await;
        }
        if !c.replicas.is_empty() {
            return Err(
                "--replicas runs services as several processes, which needs a shared bus: \
                        add --bus nats://host:4222 (and --store postgres://… to share state)"
                    .into(),
            );
        }
        let mut config = AppConfig::new(&c.data_dir)
            .with_patterns(&c.patterns)
            .with_store(store);
        if let BusBackend::Nats(url) = &bus {
            config = config.with_bus(BusBackend::nats(url));
        }
        if c.port != 0 {
            config.ports = Ports {
                inventory: c.addr(2)?.port(),
                payment: c.addr(3)?.port(),
                shipping: c.addr(4)?.port(),
                notification: c.addr(5)?.port(),
                analytics: c.addr(6)?.port(),
            };
        }
        let app = Arc::new(ShopApp::start(config).await?);
        let admin = AppAdmin { app: app.clone() };
        let mut services = api::Admin::services(&admin);
        let (stop_api, api_stopped) = watch::channel(false);
        let api = api::start(
            app.desk().clone(),
            Arc::new(admin),
            TcpListener::bind(c.addr(0)?).await?,
            TcpListener::bind(c.addr(1)?).await?,
            async move {
                let mut rx = api_stopped;
                let _ = rx.wait_for(|s| *s).await;
            },
        )
        .await?;
        services.insert(0, ServiceInfo::new("order", &api.rest_url, "http"));
        services.insert(1, ServiceInfo::new("order-grpc", &api.grpc_url, "grpc"));
        let (stop_demo, demo_stopped) = watch::channel(false);
        let demo = c
            .demo
            .then(|| tokio::spawn(demo(app.desk().clone(), demo_stopped)));
        Ok(Launched {
            services,
            stopped: Box::pin(async move {
                shutdown.await;
                let _ = stop_demo.send(true);
                if let Some(demo) = demo {
                    let _ = demo.await;
                }
                let _ = stop_api.send(true);
                api.join().await.map_err(|e| e.to_string())?;
                let app = Arc::try_unwrap(app)
                    .map_err(|_| "the shop is still in use after the API stopped".to_string())?;
                app.shutdown().await.map_err(|e| e.to_string())
            }),
        })
    }

    async fn serve(&self, c: ServeConfig, shutdown: Shutdown) -> Result<Launched, LaunchError> {
        Ok(crate::serve::serve(c, shutdown).await?)
    }
}

/// The operator endpoints of the Order API, answered by the running app.
struct AppAdmin {
    app: Arc<ShopApp>,
}

#[async_trait]
impl api::Admin for AppAdmin {
    fn services(&self) -> Vec<ServiceInfo> {
        let u = self.app.urls();
        vec![
            ServiceInfo::new("inventory", &u.inventory, "http"),
            ServiceInfo::new("payment", &u.payment, "grpc"),
            ServiceInfo::new("shipping", &u.shipping, "http"),
            ServiceInfo::new("notification", &u.notification, "http"),
            ServiceInfo::new("analytics", &u.analytics, "http"),
        ]
    }

    async fn sagas(
        &self,
        state: Option<SagaState>,
        limit: usize,
    ) -> Result<Vec<SagaRecord>, AdminError> {
        list_sagas(self.app.orchestrator(), state, limit).await
    }

    async fn dead_letters(
        &self,
        topic: Option<String>,
        limit: usize,
    ) -> Result<Vec<DeadLetterView>, AdminError> {
        list_dead_letters(self.app.bus().as_ref(), topic, limit).await
    }

    async fn replay(&self, request: ReplayRequest) -> Result<ReplayOutcome, AdminError> {
        replay_dead_letters(self.app.bus().as_ref(), request).await
    }

    async fn check(&self) -> Result<CheckReport, AdminError> {
        let report = crate::check::check(&self.app)
            .await
            .map_err(|e| AdminError::Failed(e.to_string()))?;
        Ok(to_api_report(&report))
    }
}

/// Up to `limit` sagas of `orchestrator`, only those in `state` if given (every state's
/// in [`SagaState::ALL`] order otherwise): `GET /sagas`.
pub(crate) async fn list_sagas(
    orchestrator: &Orchestrator,
    state: Option<SagaState>,
    limit: usize,
) -> Result<Vec<SagaRecord>, AdminError> {
    let states = match state {
        Some(s) => vec![s],
        None => SagaState::ALL.to_vec(),
    };
    let mut out = Vec::new();
    for s in states {
        let left = limit.saturating_sub(out.len());
        if left == 0 {
            break;
        }
        out.extend(
            orchestrator
                .list(s, left)
                .await
                .map_err(|e| AdminError::Failed(e.to_string()))?,
        );
    }
    Ok(out)
}

/// Up to `limit` dead letters of `topic` on `bus` (every shop topic if `None`): `GET
/// /dlq`.
pub(crate) async fn list_dead_letters(
    bus: &dyn Bus,
    topic: Option<String>,
    limit: usize,
) -> Result<Vec<DeadLetterView>, AdminError> {
    let topics: Vec<String> = match topic {
        Some(t) => vec![t],
        None => TOPICS.iter().map(|t| t.to_string()).collect(),
    };
    let mut out = Vec::new();
    for t in topics {
        let left = limit.saturating_sub(out.len());
        if left == 0 {
            break;
        }
        let letters = bus
            .dead_letters(&t, left)
            .await
            .map_err(|e| AdminError::Failed(e.to_string()))?;
        out.extend(letters.iter().map(DeadLetterView::from));
    }
    Ok(out)
}

/// Publishes the dead letters `request` selects on `bus` again: `POST /dlq/replay`.
pub(crate) async fn replay_dead_letters(
    bus: &dyn Bus,
    request: ReplayRequest,
) -> Result<ReplayOutcome, AdminError> {
    let ids = match request.ids {
        Some(ids) => Some(
            ids.iter()
                .map(|id| {
                    id.parse().map_err(|_| {
                        AdminError::Invalid(crate::model::Invalid::new(
                            "ids",
                            format!("`{id}` is not a message id (a UUID)"),
                        ))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
        None => None,
    };
    let replayed = bus
        .replay_dead_letters(
            &request.topic,
            ReplayFilter {
                group: request.group,
                ids,
            },
        )
        .await
        .map_err(|e| AdminError::Failed(e.to_string()))?;
    Ok(ReplayOutcome {
        topic: request.topic,
        replayed: replayed as u64,
    })
}

/// The invariant report as the Order API shows it: one line per invariant, then the
/// orders in flight with their ages.
pub(crate) fn to_api_report(r: &crate::check::CheckReport) -> CheckReport {
    let kinds = [
        ("stock", "stock conserved per SKU, never negative"),
        ("charge", "every completed order charged exactly once"),
        ("refund", "every refund matches a failed order"),
        ("net", "no failed order left charged"),
        ("hold", "no failed order keeps a reservation"),
        ("shipment", "shipments only for completed orders"),
    ];
    let mut checks = Vec::new();
    for (kind, what) in kinds {
        let broken: Vec<&str> = r
            .violations
            .iter()
            .filter(|v| v.kind == kind)
            .map(|v| v.detail.as_str())
            .collect();
        checks.push(CheckItem {
            name: kind.to_string(),
            ok: broken.is_empty(),
            detail: if broken.is_empty() {
                what.to_string()
            } else {
                broken.join("; ")
            },
        });
    }
    for v in r
        .violations
        .iter()
        .filter(|v| !kinds.iter().any(|(k, _)| *k == v.kind))
    {
        checks.push(CheckItem {
            name: v.kind.clone(),
            ok: false,
            detail: v.detail.clone(),
        });
    }
    let orders: Vec<String> = r.orders.iter().map(|(s, n)| format!("{n} {s}")).collect();
    let oldest: Vec<String> = r
        .in_flight
        .iter()
        .take(5)
        .map(|f| {
            format!(
                "{} ({}, {} ms, last: {})",
                f.id, f.pattern, f.age_ms, f.last
            )
        })
        .collect();
    checks.push(CheckItem {
        name: "orders".into(),
        ok: true,
        detail: format!(
            "{}; {} in flight{}{}",
            orders.join(", "),
            r.in_flight.len(),
            if oldest.is_empty() { "" } else { ": " },
            oldest.join(", ")
        ),
    });
    checks.push(CheckItem {
        name: "money".into(),
        ok: true,
        detail: format!(
            "charged {} cents, refunded {} cents; {} shipments; stock {} of {} units",
            r.charged_cents, r.refunded_cents, r.shipments, r.stock_units, r.initial_units
        ),
    });
    CheckReport::new(checks)
}

/// Places demo orders until `stop`: every pattern in turn, a few per second; every
/// sixth is declined (token `tok_decline`), every seventh asks for more `sku-rare` than
/// there is. Prints one line per finished order.
async fn demo(desk: OrderDesk, mut stop: watch::Receiver<bool>) {
    let patterns = desk.patterns();
    if patterns.is_empty() {
        return;
    }
    let mut n: u64 = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(400));
    let mut running = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            _ = tick.tick() => {}
        }
        n += 1;
        let pattern = patterns[(n as usize) % patterns.len()];
        // 6 and 7 are prime to the number of patterns, so each failure case visits each.
        let (items, token, note) = if n.is_multiple_of(7) {
            (
                vec![Item::new(RARE_SKU, 6)],
                "tok_ok",
                "out of stock on purpose",
            )
        } else if n.is_multiple_of(6) {
            (
                vec![Item::new("sku-002", 1)],
                "tok_decline",
                "declined on purpose",
            )
        } else {
            (
                vec![Item::new(
                    format!("sku-{:03}", 1 + n % 20),
                    1 + (n % 3) as u32,
                )],
                "tok_ok",
                "",
            )
        };
        let request = NewOrder {
            order_id: Some(format!("demo-{}-{n}", std::process::id())),
            customer: format!("demo-{}", n % 9),
            items,
            payment_token: token.into(),
            pattern,
        };
        let desk = desk.clone();
        running.spawn(async move {
            let started = Instant::now();
            let placed = match desk.place(&request).await {
                Ok(o) => o,
                Err(e) => {
                    println!(
                        "demo  {:<13} {:<24} not placed: {e}",
                        pattern.as_str(),
                        request.order_id.unwrap_or_default()
                    );
                    return;
                }
            };
            let order = match desk.book().wait(&placed.id, Duration::from_secs(30)).await {
                Ok(o) => o,
                Err(e) => {
                    println!("demo  {:<13} {:<24} {e}", pattern.as_str(), placed.id);
                    return;
                }
            };
            let took = started.elapsed().as_secs_f64() * 1000.0;
            let what = match order.status {
                OrderStatus::Completed => format!("completed in {took:.0} ms"),
                OrderStatus::Failed => format!(
                    "failed in {took:.0} ms: {}",
                    order.reason.as_deref().unwrap_or("?")
                ),
                OrderStatus::Accepted => format!("still in flight after {took:.0} ms"),
            };
            let note = if note.is_empty() {
                String::new()
            } else {
                format!(" ({note})")
            };
            println!(
                "demo  {:<13} {:<24} {what}{note}",
                pattern.as_str(),
                order.id
            );
        });
        while running.try_join_next().is_some() {}
    }
    while running.join_next().await.is_some() {}
}
