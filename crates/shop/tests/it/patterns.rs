//! The five patterns end to end through `ShopApp`: real servers on loopback ports,
//! embedded stores and bus in a temp dir, the bus wrapped in a `ChaosBus` (duplicates,
//! redeliveries, delays) — then the global invariants of `shop::check`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shop::api::grpc::proto::{self, orders_client::OrdersClient};
use shop::app::{AppConfig, ShopApp};
use shop::check::{CheckReport, check};
use shop::faults::FaultConfig;
use shop::model::{self, Item, PaymentFailed};
use shop::order::{NewOrder, Order, OrderStatus, Pattern};
use shop::patterns::choreography::{ChoreographySpec, MONITOR, Observed};
use switchyard::Bus;
use switchyard::bus::SubscribeOptions;
use switchyard_embedded::EmbeddedBus;
use switchyard_testkit::chaos_bus::{ChaosBus, ChaosConfig, ChaosStats};

const WAIT: Duration = Duration::from_secs(30);

pub(crate) fn chaos_bus(dir: &Path, seed: u64) -> Arc<ChaosBus> {
    let inner: Arc<dyn Bus> = Arc::new(EmbeddedBus::open(dir.join("bus")).unwrap());
    Arc::new(ChaosBus::new(
        inner,
        ChaosConfig {
            duplicate: 0.1,
            redeliver: 0.02,
            delay: 0.1,
            max_delay: Duration::from_millis(20),
            seed,
            ..ChaosConfig::default()
        },
    ))
}

async fn start(dir: &Path, seed: u64) -> ShopApp {
    start_with_stats(dir, seed).await.0
}

async fn start_with_stats(dir: &Path, seed: u64) -> (ShopApp, Arc<ChaosStats>) {
    let bus = chaos_bus(dir, seed);
    let stats = bus.stats();
    let mut config = AppConfig::new(dir).with_bus(bus);
    config.stall_after = Duration::from_millis(500);
    (ShopApp::start(config).await.unwrap(), stats)
}

fn order(id: &str, pattern: Pattern, customer: &str, items: Vec<Item>, token: &str) -> NewOrder {
    NewOrder {
        order_id: Some(id.into()),
        customer: customer.into(),
        items,
        payment_token: token.into(),
        pattern,
    }
}

async fn place_and_wait(app: &ShopApp, req: NewOrder) -> Order {
    let placed = app.desk().place(&req).await.unwrap();
    let done = app.book().wait(&placed.id, WAIT).await.unwrap();
    assert!(
        done.status.is_terminal(),
        "order {} did not end: {:#?}",
        done.id,
        done.history
    );
    done
}

/// Polls the invariant check until the shop is settled (no order in flight, no
/// violation), for at most `within`; returns the last report.
pub(crate) async fn settled(app: &ShopApp, within: Duration) -> CheckReport {
    let deadline = Instant::now() + within;
    loop {
        let report = check(app).await.unwrap();
        if report.is_settled() || Instant::now() > deadline {
            return report;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Collects every shop event by order (subject), from its own consumer groups.
async fn observe(bus: &Arc<dyn Bus>) -> Arc<Mutex<HashMap<String, Vec<Observed>>>> {
    let seen: Arc<Mutex<HashMap<String, Vec<Observed>>>> = Arc::default();
    for topic in model::TOPICS {
        let mut sub = bus
            .subscribe(topic, "test-spec-observer", SubscribeOptions::default())
            .await
            .unwrap();
        let seen = seen.clone();
        tokio::spawn(async move {
            while let Ok(d) = sub.next().await {
                let env = d.envelope().clone();
                if let Some(subject) = &env.subject {
                    seen.lock()
                        .unwrap()
                        .entry(subject.clone())
                        .or_default()
                        .push(Observed {
                            id: env.id.to_string(),
                            event_type: env.event_type.clone(),
                            causation: env.causationid.clone(),
                        });
                }
                let _ = d.ack().await;
            }
        });
    }
    seen
}

fn flow_of(
    all: &HashMap<String, Vec<Observed>>,
    id: &str,
    spec: &ChoreographySpec,
) -> Vec<Observed> {
    all.get(id)
        .map(|v| {
            v.iter()
                .filter(|o| o.event_type == spec.start || spec.emitted_by(&o.event_type).is_some())
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_pattern_succeeds_declines_and_runs_out_of_stock_with_stock_and_money_whole() {
    let dir = tempfile::tempdir().unwrap();
    let app = start(dir.path(), 1).await;
    let events = observe(app.bus()).await;
    // Orders come in through the public API: REST and gRPC in turn.
    let (stop_api, api_stopped) = tokio::sync::oneshot::channel::<()>();
    let api = shop::api::start(
        app.desk().clone(),
        Arc::new(shop::api::NoAdmin),
        crate::support::listener().await,
        crate::support::listener().await,
        async move {
            let _ = api_stopped.await;
        },
    )
    .await
    .unwrap();
    let mut grpc = OrdersClient::new(
        tonic::transport::Channel::from_shared(api.grpc_url.clone())
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let mut over_grpc = false;
    let mut place_and_wait = async |app: &ShopApp, req: NewOrder| {
        over_grpc = !over_grpc;
        place_through_api(&api.rest_url, &mut grpc, over_grpc, &req).await;
        let done = app
            .book()
            .wait(req.order_id.as_deref().unwrap(), WAIT)
            .await
            .unwrap();
        assert!(done.status.is_terminal(), "{:#?}", done.history);
        done
    };
    let spec = ChoreographySpec::standard();
    for pattern in Pattern::ALL {
        let p = pattern.as_str();
        let ok = place_and_wait(
            &app,
            order(
                &format!("{p}-ok"),
                pattern,
                "ada",
                vec![Item::new("sku-001", 2)],
                "tok_ok",
            ),
        )
        .await;
        assert_eq!(ok.status, OrderStatus::Completed, "{p}: {:#?}", ok.history);
        let broke = place_and_wait(
            &app,
            order(
                &format!("{p}-broke"),
                pattern,
                "broke-bob",
                vec![Item::new("sku-002", 1)],
                "tok_ok",
            ),
        )
        .await;
        assert_eq!(
            broke.status,
            OrderStatus::Failed,
            "{p}: {:#?}",
            broke.history
        );
        let declined = place_and_wait(
            &app,
            order(
                &format!("{p}-declined"),
                pattern,
                "cy",
                vec![Item::new("sku-002", 1)],
                "tok_decline",
            ),
        )
        .await;
        assert_eq!(declined.status, OrderStatus::Failed, "{p}");
        assert!(
            declined
                .reason
                .as_deref()
                .unwrap_or("")
                .contains("declined"),
            "{p}: {:?}",
            declined.reason
        );
        let rare = place_and_wait(
            &app,
            order(
                &format!("{p}-rare"),
                pattern,
                "dee",
                vec![Item::new(model::RARE_SKU, 6)],
                "tok_ok",
            ),
        )
        .await;
        assert_eq!(rare.status, OrderStatus::Failed, "{p}: {:#?}", rare.history);
        assert!(
            rare.reason
                .as_deref()
                .unwrap_or("")
                .contains("out of stock"),
            "{p}: {:?}",
            rare.reason
        );
    }
    // The choreography's out-of-stock path charged and refunded.
    let ledger = app.services().payments.ledger().await.unwrap();
    assert_eq!(ledger.net("choreography-rare"), 0);
    assert!(ledger.refunded.contains_key("choreography-rare"));

    let mut report = settled(&app, WAIT).await;
    assert!(report.is_settled(), "{report:#?}");
    // The hybrid order completes for the customer before its shipment exists (shipping
    // follows its events): wait for the asynchronous part too.
    let deadline = Instant::now() + WAIT;
    while report.shipments < 5 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        report = check(&app).await.unwrap();
    }
    assert_eq!(report.shipments, 5, "one shipment per completed order");
    assert!(report.is_settled(), "{report:#?}");
    assert_eq!(report.stock_units, report.initial_units);

    // A failed hybrid order announces its failure like a completed one: its events
    // bring the failure e-mail.
    for id in ["hybrid-declined", "hybrid-rare", "hybrid-broke"] {
        let deadline = Instant::now() + WAIT;
        loop {
            let mails = app.services().notifier.sent(id).await.unwrap();
            if mails
                .iter()
                .any(|m| m.kind == shop::services::notification::MailKind::Failure)
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no failure e-mail for {id}: {mails:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // Every observed choreography flow matches the declared spec.
    let deadline = Instant::now() + WAIT;
    for id in [
        "choreography-ok",
        "choreography-broke",
        "choreography-declined",
        "choreography-rare",
    ] {
        loop {
            let flow = flow_of(&events.lock().unwrap(), id, &spec);
            match spec.check_flow(&flow) {
                Ok(()) => break,
                Err(e) if Instant::now() > deadline => panic!("{id}: {e}: {flow:#?}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
    assert_eq!(app.diverged_events(), 0);
    let _ = stop_api.send(());
    api.join().await.unwrap();
    app.shutdown().await.unwrap();
}

/// Places `req` through the Order API: `POST /orders` on `rest`, or `PlaceOrder` on
/// `grpc`; the order must be accepted (201/202, or OK).
async fn place_through_api(
    rest: &str,
    grpc: &mut OrdersClient<tonic::transport::Channel>,
    over_grpc: bool,
    req: &NewOrder,
) {
    if over_grpc {
        grpc.place_order(proto::PlaceOrderRequest {
            order_id: req.order_id.clone(),
            customer: req.customer.clone(),
            items: req
                .items
                .iter()
                .map(shop::api::grpc::item_to_proto)
                .collect(),
            payment_token: req.payment_token.clone(),
            pattern: req.pattern.as_str().into(),
            wait_ms: 0,
        })
        .await
        .unwrap();
    } else {
        let body = serde_json::to_vec(req).unwrap();
        let r = crate::support::raw(rest, "POST", "/orders", Some("application/json"), &body).await;
        assert!(
            r.status == 201 || r.status == 202,
            "{} {}",
            r.status,
            r.body
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_outage_fails_sync_orders_but_not_choreography_or_hybrid() {
    let dir = tempfile::tempdir().unwrap();
    let app = start(dir.path(), 2).await;
    app.faults().notification.set(FaultConfig {
        error_rate: 1.0,
        ..FaultConfig::default()
    });
    let items = || vec![Item::new("sku-003", 1)];
    let sync = place_and_wait(
        &app,
        order("n-sync", Pattern::Sync, "ada", items(), "tok_ok"),
    )
    .await;
    assert_eq!(sync.status, OrderStatus::Failed);
    assert!(
        sync.reason
            .as_deref()
            .unwrap_or("")
            .contains("notification"),
        "{:?}",
        sync.reason
    );
    let choreo = place_and_wait(
        &app,
        order("n-choreo", Pattern::Choreography, "ada", items(), "tok_ok"),
    )
    .await;
    assert_eq!(choreo.status, OrderStatus::Completed);
    let hybrid = place_and_wait(
        &app,
        order("n-hybrid", Pattern::Hybrid, "ada", items(), "tok_ok"),
    )
    .await;
    assert_eq!(hybrid.status, OrderStatus::Completed);
    app.faults().notification.clear();
    // Their mail follows from the events.
    let deadline = Instant::now() + WAIT;
    for id in ["n-choreo", "n-hybrid"] {
        while app.services().notifier.sent(id).await.unwrap().is_empty() {
            assert!(Instant::now() < deadline, "no mail for {id}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let report = settled(&app, WAIT).await;
    assert!(report.is_settled(), "{report:#?}");
    app.shutdown().await.unwrap();
}

pub(crate) fn mixed(i: usize, prefix: &str) -> NewOrder {
    let pattern = Pattern::ALL[i % 5];
    let (customer, token) = match i % 10 {
        3 => ("broke-x".to_string(), "tok_ok"),
        7 => (format!("c{i}"), "tok_decline"),
        _ => (format!("c{i}"), "tok_ok"),
    };
    let items = match i % 13 {
        5 => vec![Item::new(model::RARE_SKU, 1)],
        11 => vec![Item::new(model::RARE_SKU, 6), Item::new("sku-004", 1)],
        n => vec![Item::new(
            format!("sku-{:03}", 1 + n % 20),
            1 + (i % 3) as u32,
        )],
    };
    order(&format!("{prefix}-{i}"), pattern, &customer, items, token)
}

pub(crate) async fn diverged(app: &ShopApp) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for status in [
        OrderStatus::Completed,
        OrderStatus::Failed,
        OrderStatus::Accepted,
    ] {
        for o in app.book().list(status, usize::MAX).await.unwrap() {
            if o.history.iter().any(|e| e.what == "diverged") {
                let h = o
                    .history
                    .iter()
                    .map(|e| format!("{} {} {:?}", e.service, e.what, e.detail))
                    .collect();
                out.push((o.id.clone(), h));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_mixed_orders_keep_every_invariant() {
    let dir = tempfile::tempdir().unwrap();
    let (app, chaos) = start_with_stats(dir.path(), 3).await;
    let started = Instant::now();
    let desk = app.desk().clone();
    let mut workers = Vec::new();
    for w in 0..16 {
        let desk = desk.clone();
        workers.push(tokio::spawn(async move {
            for i in (w..1000).step_by(16) {
                desk.place(&mixed(i, "m")).await.unwrap();
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    let placed = started.elapsed();
    let report = settled(&app, Duration::from_secs(120)).await;
    println!(
        "1000 mixed orders: placed in {placed:?}, settled in {:?}; {:?}",
        started.elapsed(),
        report.orders
    );
    assert!(report.is_settled(), "{report:#?}");
    assert_eq!(report.orders.values().sum::<u64>(), 1000);
    assert_eq!(app.diverged_events(), 0, "{:#?}", diverged(&app).await);
    let duplicates = chaos.duplicates.load(std::sync::atomic::Ordering::Relaxed);
    let redeliveries = chaos
        .redeliveries
        .load(std::sync::atomic::Ordering::Relaxed);
    println!("chaos: {duplicates} duplicate deliveries, {redeliveries} injected redeliveries");
    assert!(duplicates > 0 && redeliveries > 0);
    app.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_in_the_middle_of_a_batch_completes_everything() {
    let dir = tempfile::tempdir().unwrap();
    let app = start(dir.path(), 4).await;
    let desk = app.desk().clone();
    let placed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::new();
    for w in 0..8 {
        let desk = desk.clone();
        let placed = placed.clone();
        workers.push(tokio::spawn(async move {
            for i in (w..300).step_by(8) {
                if desk.place(&mixed(i, "r")).await.is_ok() {
                    placed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }));
    }
    while placed.load(std::sync::atomic::Ordering::Relaxed) < 80 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for w in &workers {
        w.abort();
    }
    let in_flight = app.book().counts().await.unwrap()[&OrderStatus::Accepted];
    drop(desk);
    app.shutdown().await.unwrap();

    let app = start(dir.path(), 5).await;
    let report = settled(&app, Duration::from_secs(90)).await;
    println!(
        "restart: {in_flight} orders in flight at shutdown; after: {:?}",
        report.orders
    );
    assert!(report.is_settled(), "{report:#?}");
    app.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_or_diverging_choreography_is_flagged() {
    let dir = tempfile::tempdir().unwrap();
    let app = start(dir.path(), 6).await;
    // Stalled: an order whose OrderCreated never went out (as if the event were lost).
    let lost = order(
        "lost-1",
        Pattern::Choreography,
        "ada",
        vec![Item::new("sku-001", 1)],
        "tok_ok",
    )
    .validate(app.desk().catalog())
    .unwrap();
    app.book().create(&lost).await.unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let o = app.book().get("lost-1").await.unwrap().unwrap();
        if o.history
            .iter()
            .any(|e| e.service == MONITOR && e.what == "stalled")
        {
            break;
        }
        assert!(Instant::now() < deadline, "not flagged: {:#?}", o.history);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(app.stalled_flows() >= 1);

    // Diverged: a PaymentFailed for an order that completed.
    let done = place_and_wait(
        &app,
        order(
            "div-1",
            Pattern::Choreography,
            "ada",
            vec![Item::new("sku-001", 1)],
            "tok_ok",
        ),
    )
    .await;
    assert_eq!(done.status, OrderStatus::Completed);
    let env = switchyard::codec::encode(
        &PaymentFailed {
            order_id: "div-1".into(),
            reason: "test: an unexpected event".into(),
        },
        "/test",
    )
    .unwrap();
    app.bus().publish(model::PAYMENTS, env).await.unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let o = app.book().get("div-1").await.unwrap().unwrap();
        if o.history
            .iter()
            .any(|e| e.service == MONITOR && e.what == "diverged")
        {
            assert_eq!(o.status, OrderStatus::Completed, "the first outcome stands");
            break;
        }
        assert!(Instant::now() < deadline, "not flagged: {:#?}", o.history);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(app.diverged_events() >= 1);
    app.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dependency_down_fails_sync_orders_and_undoes_them() {
    let dir = tempfile::tempdir().unwrap();
    let app = start(dir.path(), 7).await;
    app.faults().payment.set(FaultConfig {
        down_ms: 60_000,
        ..FaultConfig::default()
    });
    let o = place_and_wait(
        &app,
        order(
            "pd-sync",
            Pattern::Sync,
            "ada",
            vec![Item::new("sku-005", 2)],
            "tok_ok",
        ),
    )
    .await;
    assert_eq!(o.status, OrderStatus::Failed);
    assert!(
        o.reason
            .as_deref()
            .unwrap_or("")
            .contains("payment unavailable"),
        "{:?}",
        o.reason
    );
    let stock = app
        .services()
        .inventory
        .stock("sku-005")
        .await
        .unwrap()
        .unwrap();
    assert_eq!((stock.available, stock.reserved), (10_000, 0), "released");
    app.faults().payment.clear();
    app.faults().shipping.set(FaultConfig {
        down_ms: 60_000,
        ..FaultConfig::default()
    });
    let o = place_and_wait(
        &app,
        order(
            "sd-sync",
            Pattern::Sync,
            "ada",
            vec![Item::new("sku-006", 1)],
            "tok_ok",
        ),
    )
    .await;
    assert_eq!(o.status, OrderStatus::Failed);
    let whats: Vec<&str> = o.history.iter().map(|e| e.what.as_str()).collect();
    assert!(
        whats.contains(&"refunded") && whats.contains(&"released"),
        "{whats:?}"
    );
    app.faults().shipping.clear();
    let report = settled(&app, WAIT).await;
    assert!(report.is_settled(), "{report:#?}");
    app.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_started_without_its_order_records_it_and_runs_to_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let app = start(dir.path(), 8).await;
    // As if the shop crashed between starting the saga and recording the order.
    let o = order(
        "saga-only",
        Pattern::Orchestration,
        "ada",
        vec![Item::new("sku-007", 1)],
        "tok_ok",
    )
    .validate(app.desk().catalog())
    .unwrap();
    app.orchestrator()
        .start_with_id(shop::patterns::orchestration::SAGA, &o.id, &o)
        .await
        .unwrap();
    let rec = app.orchestrator().wait(&o.id).await.unwrap();
    assert_eq!(rec.state, switchyard::saga::SagaState::Completed);
    let done = app.book().wait(&o.id, WAIT).await.unwrap();
    assert_eq!(done.status, OrderStatus::Completed, "{:#?}", done.history);
    // Placing the id again places nothing.
    let again = app
        .desk()
        .place(&order(
            "saga-only",
            Pattern::Orchestration,
            "ada",
            vec![Item::new("sku-007", 1)],
            "tok_ok",
        ))
        .await;
    assert!(matches!(again, Err(shop::order::PlaceError::Exists(_))));
    let report = settled(&app, WAIT).await;
    assert!(report.is_settled(), "{report:#?}");
    app.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_reply_timeouts_fail_the_order_with_money_and_stock_whole() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = AppConfig::new(dir.path()).with_patterns(&[Pattern::RequestReply]);
    // Far too short for any reply: every charge request times out.
    config.request_timeout = Duration::from_micros(1);
    let app = ShopApp::start(config).await.unwrap();
    for i in 0..5 {
        let o = place_and_wait(
            &app,
            order(
                &format!("rr-to-{i}"),
                Pattern::RequestReply,
                "ada",
                vec![Item::new("sku-008", 1)],
                "tok_ok",
            ),
        )
        .await;
        assert_eq!(o.status, OrderStatus::Failed, "{:#?}", o.history);
        assert!(
            o.reason.as_deref().unwrap_or("").contains("did not answer"),
            "{:?}",
            o.reason
        );
    }
    let report = settled(&app, WAIT).await;
    assert!(report.is_settled(), "{report:#?}");
    println!("requester: {:?}", app.requester().stats());
    app.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orchestrated_charge_with_an_unknown_outcome_is_refunded() {
    use switchyard::saga::StepStatus;
    let dir = tempfile::tempdir().unwrap();
    let app = start(dir.path(), 11).await;
    let id = "unknown-charge";
    // Payment is unreachable for the saga's charge step ...
    app.faults().payment.set(FaultConfig {
        down_ms: 60_000,
        ..FaultConfig::default()
    });
    let placed = app
        .desk()
        .place(&order(
            id,
            Pattern::Orchestration,
            "ada",
            vec![Item::new("sku-007", 1)],
            "tok_ok",
        ))
        .await
        .unwrap();
    // ... but the charge did happen (its answer was lost): applied at Payment under the
    // step's own idempotency key.
    let request = model::ChargeRequest {
        order_id: placed.id.clone(),
        customer: placed.customer.clone(),
        amount_cents: placed.amount_cents,
        payment_token: placed.payment_token.clone(),
    };
    app.services()
        .payments
        .charge(&request, Some(&format!("{id}/charge/action")))
        .await
        .unwrap();
    // Once the charge step has failed for good, Payment comes back.
    let deadline = Instant::now() + WAIT;
    loop {
        let rec = app.orchestrator().get(id).await.unwrap().unwrap();
        if rec
            .steps
            .iter()
            .any(|s| s.name == "charge" && s.status == StepStatus::Failed)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the charge step never failed: {rec:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    app.faults().payment.clear();
    let done = app.book().wait(id, WAIT).await.unwrap();
    assert_eq!(done.status, OrderStatus::Failed, "{:#?}", done.history);
    let ledger = app.services().payments.ledger().await.unwrap();
    assert_eq!(
        ledger.net(id),
        0,
        "the unknown charge was refunded: {ledger:?}"
    );
    assert_eq!(
        ledger.charges.get(id).copied(),
        Some(1),
        "charged once, not again"
    );
    let report = settled(&app, WAIT).await;
    assert!(report.is_settled(), "{report:#?}");
    app.shutdown().await.unwrap();
}

/// A shipment whose create answer is lost: the shipment exists (an earlier attempt
/// created it) and every call to Shipping outlasts the caller's 300 ms deadline until
/// `heal_after`. The `pattern` order over it must fail with the shipment cancelled
/// (`steps` on its timeline), a late create refused, the goods back on the shelf, money
/// whole and no live shipment for a failed order.
async fn lost_shipment_answer(
    id: &str,
    pattern: Pattern,
    sku: &str,
    ship_attempts: u32,
    heal_after: Duration,
    steps: &[&str],
) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = AppConfig::new(dir.path()).with_bus(chaos_bus(dir.path(), 11));
    config.client.default_timeout = Duration::from_millis(300);
    config.ship_attempts = ship_attempts;
    let app = ShopApp::start(config).await.unwrap();
    let items = vec![Item::new(sku, 3)];
    let shipping = &app.services().shipping;
    shipping
        .create(id, &items, shop::services::Cause::None)
        .await
        .unwrap();
    app.faults().shipping.set(FaultConfig {
        latency_ms: 1_000,
        ..FaultConfig::default()
    });
    let faults = app.faults().shipping.clone();
    let healed = tokio::spawn(async move {
        tokio::time::sleep(heal_after).await;
        faults.clear();
    });
    let o = place_and_wait(&app, order(id, pattern, "ada", items.clone(), "tok_ok")).await;
    healed.await.unwrap();
    assert_eq!(o.status, OrderStatus::Failed, "{:#?}", o.history);
    let whats: Vec<&str> = o.history.iter().map(|e| e.what.as_str()).collect();
    for step in steps {
        assert!(whats.contains(step), "{step} missing: {whats:?}");
    }
    assert!(shipping.get(id).await.unwrap().unwrap().is_cancelled());
    let late = shipping
        .create(id, &items, shop::services::Cause::None)
        .await;
    assert!(
        late.is_err(),
        "a create still on its way is refused: {late:?}"
    );
    let report = settled(&app, WAIT).await;
    assert!(report.is_settled(), "{report:#?}");
    assert_eq!(report.stock_units, report.initial_units);
    let deadline = Instant::now() + WAIT;
    loop {
        let stock = app.services().inventory.stock(sku).await.unwrap().unwrap();
        if (stock.available, stock.reserved, stock.committed) == (10_000, 0, 0) {
            break;
        }
        assert!(Instant::now() < deadline, "stock not restored: {stock:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    app.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shipment_whose_answer_was_lost_is_cancelled_when_the_sync_order_fails() {
    let steps = ["shipment_unknown", "shipment_cancelled", "refunded"];
    lost_shipment_answer(
        "lost-sync",
        Pattern::Sync,
        "sku-007",
        1,
        Duration::from_millis(1_500),
        &steps,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orchestrated_ship_step_that_fails_for_good_cancels_its_shipment() {
    lost_shipment_answer(
        "lost-saga",
        Pattern::Orchestration,
        "sku-008",
        2,
        Duration::from_millis(2_500),
        &["shipment_cancelled", "refunded"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_injected_outage_pauses_the_service_s_event_handlers_until_it_ends() {
    let dir = tempfile::tempdir().unwrap();
    let app = start(dir.path(), 13).await;
    // Payment "down": its API refuses calls and its handlers leave their events on the
    // bus, as a stopped process would.
    app.faults().payment.set(FaultConfig {
        down_ms: 1_500,
        ..FaultConfig::default()
    });
    let started = Instant::now();
    let o = place_and_wait(
        &app,
        order(
            "down-choreo",
            Pattern::Choreography,
            "ada",
            vec![Item::new("sku-009", 1)],
            "tok_ok",
        ),
    )
    .await;
    assert_eq!(o.status, OrderStatus::Completed, "{:#?}", o.history);
    assert!(
        started.elapsed() >= Duration::from_millis(1_400),
        "the order completed during Payment's outage ({:?})",
        started.elapsed()
    );
    for topic in model::TOPICS {
        let dead = app.bus().dead_letters(topic, 10).await.unwrap();
        assert!(dead.is_empty(), "{topic}: {dead:?}");
    }
    let report = settled(&app, WAIT).await;
    assert!(report.is_settled(), "{report:#?}");
    app.shutdown().await.unwrap();
}
