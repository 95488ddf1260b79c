//! The shop as six processes, `shop serve <service>` each, the Order service finding the
//! others through `--registry`: orders placed with the `shop` binary against the Order
//! process's REST API, the payment process's own store checked after it stopped, and
//! the configurations `shop serve order` refuses; then the distributed mode, the six
//! processes sharing a real nats-server and PostgreSQL, through a kill and a broker
//! restart.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shop::services::payment::Payments;
use switchyard_embedded::{EmbeddedStore, StoreConfig};
use switchyard_testkit::Child;

use crate::support::{
    PROCESS_PATIENCE, out, printed_urls, raw, shop_cli, shop_command, stop_child,
};

/// The backing services, in the order `--registry` lists them.
const BACKING: [&str; 5] = [
    "inventory",
    "payment",
    "shipping",
    "notification",
    "analytics",
];

/// Starts `shop serve <args…> --data-dir <dir>`.
fn spawn_serve(dir: &Path, args: &[&str]) -> Child {
    let mut cmd = shop_command();
    cmd.arg("serve").args(args).arg("--data-dir").arg(dir);
    Child::spawn(cmd).unwrap()
}

/// Runs `shop serve <args…>`, which must fail at once, to its end.
fn serve_fails(dir: &Path, args: &[&str]) -> Output {
    let mut child = shop_command()
        .arg("serve")
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + PROCESS_PATIENCE;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`shop serve {args:?}` did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = child.wait_with_output().unwrap();
    assert_ne!(o.status.code(), Some(0), "{}", out(&o));
    o
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_processes_place_sync_and_orchestration_orders() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");

    // The five backing services, each in its own process on a free port.
    let backing: Vec<(&str, Child)> = BACKING
        .iter()
        .map(|s| (*s, spawn_serve(&data, &[s, "--listen", "127.0.0.1:0"])))
        .collect();
    let mut registry = Vec::new();
    let mut url_of = HashMap::new();
    for (name, child) in &backing {
        let urls = printed_urls(child, &format!("serve {name}"));
        let url = urls
            .get(*name)
            .unwrap_or_else(|| panic!("{name} printed no URL of its own: {urls:?}"))
            .clone();
        assert_eq!(urls.len(), 1, "{name} serves one thing: {urls:?}");
        registry.push(format!("{name}={url}"));
        url_of.insert(*name, url);
    }
    let registry = registry.join(";");

    // The Order service, calling them through the registry.
    let order = spawn_serve(
        &data,
        &["order", "--registry", &registry, "--listen", "127.0.0.1:0"],
    );
    let order_urls = printed_urls(&order, "serve order");
    let rest = order_urls["order"].clone();
    assert!(order_urls.contains_key("order-grpc"), "{order_urls:?}");

    // Sync and orchestration complete across the processes; a declined order fails.
    for (pattern, id) in [("sync", "serve-sync"), ("orchestration", "serve-saga")] {
        let o = shop_cli(
            &rest,
            &[
                "order",
                "--pattern",
                pattern,
                "--order-id",
                id,
                "--sku",
                "sku-003",
                "--qty",
                "2",
            ],
        )
        .await;
        assert_eq!(o.status.code(), Some(0), "{pattern}: {}", out(&o));
        assert!(stdout(&o).contains("completed"), "{pattern}: {}", out(&o));
        let o = shop_cli(
            &rest,
            &[
                "order",
                "--pattern",
                pattern,
                "--order-id",
                &format!("{id}-declined"),
                "--token",
                "tok_decline",
            ],
        )
        .await;
        assert_eq!(o.status.code(), Some(3), "{pattern} declined: {}", out(&o));

        // The timeline shows the payment process's charge; the shipping process has the
        // shipment.
        let o = shop_cli(&rest, &["status", id]).await;
        assert_eq!(o.status.code(), Some(0), "{}", out(&o));
        let timeline = stdout(&o);
        assert!(
            timeline
                .lines()
                .any(|l| l.contains("payment") && l.contains("charged")),
            "{}",
            out(&o)
        );
        let shipment = raw(
            &url_of["shipping"],
            "GET",
            &format!("/shipments/{id}"),
            None,
            b"",
        )
        .await;
        assert_eq!(shipment.status, 200, "{}", shipment.body);
    }

    // The shipping process writes the labels from its own bus.
    let labels = data.join("labels");
    crate::support::eventually("two shipping labels", async || {
        std::fs::read_dir(&labels).map(|d| d.count()).unwrap_or(0) >= 2
    })
    .await;

    // What needs a bus shared by the processes is refused, and so is an Order service
    // that does not know where the others are.
    let elsewhere = dir.path().join("elsewhere");
    let o = serve_fails(
        &elsewhere,
        &[
            "order",
            "--patterns",
            "hybrid",
            "--registry",
            &registry,
            "--listen",
            "127.0.0.1:0",
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("pattern hybrid needs a bus shared by the services' processes"),
        "{}",
        out(&o)
    );
    let o = serve_fails(&elsewhere, &["order", "--listen", "127.0.0.1:0"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--registry"), "{}", out(&o));
    for s in BACKING {
        assert!(err.contains(s), "{s} not named: {}", out(&o));
    }

    // The operator endpoints: the sagas are in the order store here; dead letters and
    // the invariant check need what the other processes hold, and say how to get them.
    let sagas = raw(&rest, "GET", "/sagas", None, b"").await;
    assert_eq!(sagas.status, 200, "{}", sagas.body);
    assert!(sagas.body.contains("serve-saga"), "{}", sagas.body);
    for (path, hint) in [("/dlq", "--bus nats://"), ("/check", "--store postgres://")] {
        let r = raw(&rest, "GET", path, None, b"").await;
        assert_eq!(r.status, 501, "{path}: {}", r.body);
        assert!(r.body.contains(hint), "{path}: {}", r.body);
    }

    // Every process stops cleanly on SIGTERM.
    stop_child(order, "serve order");
    for (name, child) in backing {
        stop_child(child, &format!("serve {name}"));
    }

    // The payment process charged each completed order once, the declined ones never.
    let store = EmbeddedStore::open(data.join("payment"), StoreConfig::default()).unwrap();
    let ledger = Payments::new(Arc::new(store.clone()))
        .ledger()
        .await
        .unwrap();
    for id in ["serve-sync", "serve-saga"] {
        assert_eq!(ledger.charges.get(id), Some(&1), "{id}: {ledger:?}");
        assert!(ledger.net(id) > 0, "{id}: {ledger:?}");
    }
    for id in ["serve-sync-declined", "serve-saga-declined"] {
        assert_eq!(ledger.net(id), 0, "{id}: {ledger:?}");
    }
    store.close().await.unwrap();
}

/// The distributed mode on one machine: six `shop serve` processes sharing a real
/// nats-server (events, requests, replies) and a real PostgreSQL (one schema per
/// service), orders through every pattern, then 1,000 orders during which the payment
/// process is killed by pid and started again, and nats-server restarts: every order ends,
/// and the payment schema holds one charge per completed order and nothing for failed
/// ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_processes_on_nats_and_postgres_run_every_pattern_and_survive_a_kill() {
    let Some((mut nats, pg)) = crate::support::nats_and_postgres() else {
        return;
    };
    let (bus, db) = (nats.url(), pg.url());
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let distributed = |service: &str, listen: &str| {
        spawn_serve(
            &data,
            &[service, "--listen", listen, "--bus", &bus, "--store", &db],
        )
    };

    let mut backing: HashMap<&str, Child> = HashMap::new();
    let mut registry = Vec::new();
    let mut url_of = HashMap::new();
    for name in BACKING {
        let child = distributed(name, "127.0.0.1:0");
        let url = printed_urls(&child, &format!("serve {name}"))[name].clone();
        registry.push(format!("{name}={url}"));
        url_of.insert(name, url);
        backing.insert(name, child);
    }
    let registry = registry.join(";");
    let order = spawn_serve(
        &data,
        &[
            "order",
            "--registry",
            &registry,
            "--listen",
            "127.0.0.1:0",
            "--bus",
            &bus,
            "--store",
            &db,
        ],
    );
    let rest = printed_urls(&order, "serve order")["order"].clone();

    // Every pattern completes across the processes; a declined payment fails the order.
    for pattern in [
        "sync",
        "choreography",
        "request_reply",
        "orchestration",
        "hybrid",
    ] {
        let id = format!("d-{pattern}");
        let o = shop_cli(
            &rest,
            &[
                "order",
                "--pattern",
                pattern,
                "--order-id",
                &id,
                "--wait",
                "30s",
            ],
        )
        .await;
        assert_eq!(o.status.code(), Some(0), "{pattern}: {}", out(&o));
        assert!(stdout(&o).contains("completed"), "{pattern}: {}", out(&o));
        let o = shop_cli(
            &rest,
            &[
                "order",
                "--pattern",
                pattern,
                "--order-id",
                &format!("{id}-declined"),
                "--token",
                "tok_decline",
                "--wait",
                "30s",
            ],
        )
        .await;
        assert_eq!(o.status.code(), Some(3), "{pattern} declined: {}", out(&o));
    }

    // The operator endpoints of the Order process: its sagas, the shared bus's dead
    // letters (none: nothing failed for good), the services it calls.
    let sagas = raw(&rest, "GET", "/sagas", None, b"").await;
    assert_eq!(sagas.status, 200, "{}", sagas.body);
    for id in ["d-orchestration", "d-orchestration-declined"] {
        assert!(
            sagas.body.contains(id),
            "{id} not in /sagas: {}",
            sagas.body
        );
    }
    let dlq = raw(&rest, "GET", "/dlq", None, b"").await;
    assert_eq!(dlq.status, 200, "{}", dlq.body);
    let dlq: serde_json::Value = serde_json::from_str(&dlq.body).unwrap();
    assert_eq!(
        dlq["dead_letters"].as_array().map(Vec::len),
        Some(0),
        "{dlq}"
    );
    let services = raw(&rest, "GET", "/services", None, b"").await;
    for name in BACKING {
        assert!(
            services.body.contains(&url_of[name]),
            "{name} not in /services: {}",
            services.body
        );
    }

    // 1,000 orders through every pattern from 8 clients; the payment process is killed by
    // pid a third of the way in (with calls and events in flight) and started again on
    // its address.
    const BATCH: usize = 1000;
    let patterns = [
        "sync",
        "choreography",
        "request-reply",
        "orchestration",
        "hybrid",
    ];
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..8 {
        let (next, rest) = (next.clone(), rest.clone());
        clients.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if i >= BATCH {
                    return;
                }
                let body = serde_json::json!({
                    "order_id": format!("k-{i}"),
                    "customer": format!("c{i}"),
                    "items": [{"sku": format!("sku-{:03}", 1 + i % 20), "qty": 1}],
                    "payment_token": "tok_ok",
                    "pattern": patterns[i % patterns.len()],
                })
                .to_string();
                // While the payment process is down a sync placement may fail (5xx): the
                // order is then failed or was never accepted, and must not stay in flight.
                let r = raw(
                    &rest,
                    "POST",
                    "/orders",
                    Some("application/json"),
                    body.as_bytes(),
                )
                .await;
                assert!(
                    !(400..500).contains(&r.status),
                    "order k-{i} refused: {} {}",
                    r.status,
                    r.body
                );
            }
        }));
    }
    while next.load(std::sync::atomic::Ordering::SeqCst) < BATCH / 3 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut payment = backing.remove("payment").unwrap();
    payment.kill().unwrap();
    let addr = url_of["payment"].trim_start_matches("http://").to_string();
    let again = distributed("payment", &addr);
    printed_urls(&again, "serve payment (restarted)");
    backing.insert("payment", again);
    // Two thirds in, the broker itself restarts (same port, same store): publishers and
    // consumers reconnect by themselves.
    while next.load(std::sync::atomic::Ordering::SeqCst) < 2 * BATCH / 3 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    nats.restart().unwrap();
    for c in clients {
        c.await.unwrap();
    }
    let placed: Vec<String> = (0..BATCH).map(|i| format!("k-{i}")).collect();
    // Every accepted order ends.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut ended: HashMap<String, String> = HashMap::new();
    while ended.len() < placed.len() && Instant::now() < deadline {
        for id in &placed {
            if ended.contains_key(id) {
                continue;
            }
            let r = raw(&rest, "GET", &format!("/orders/{id}"), None, b"").await;
            if r.status == 404 {
                ended.insert(id.clone(), "never accepted".into());
                continue;
            }
            let o: serde_json::Value = serde_json::from_str(&r.body).unwrap();
            let status = o["status"].as_str().unwrap_or_default().to_string();
            if status == "completed" || status == "failed" {
                ended.insert(id.clone(), status);
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let stuck: Vec<&String> = placed
        .iter()
        .filter(|id| !ended.contains_key(*id))
        .collect();
    assert!(stuck.is_empty(), "orders still in flight: {stuck:?}");
    let completed = ended.values().filter(|s| *s == "completed").count();
    println!(
        "distributed batch of {BATCH} with the payment process killed and nats-server restarted: {completed} completed, {} failed, {} never accepted",
        ended.values().filter(|s| *s == "failed").count(),
        ended.values().filter(|s| *s == "never accepted").count()
    );
    assert!(completed > BATCH / 2, "{ended:?}");
    // `shop check` against the Order process, which reads every service's schema: stock
    // conserved, every completed order charged once, nothing kept for a failed one.
    // (One query per order and service: over a minute for a debug build on a busy
    // machine.)
    let o = shop_cli(&rest, &["--timeout", "300s", "check"]).await;
    assert_eq!(o.status.code(), Some(0), "shop check: {}", out(&o));

    stop_child(order, "serve order");
    for (name, child) in backing {
        stop_child(child, &format!("serve {name}"));
    }

    // The payment schema: one charge per completed order, nothing kept for a failed one.
    let store = switchyard_postgres::PgStore::connect(switchyard_postgres::PgStoreConfig::new(
        db.clone(),
        "payment",
    ))
    .await
    .unwrap();
    let ledger = Payments::new(Arc::new(store.clone()))
        .ledger()
        .await
        .unwrap();
    for (id, status) in &ended {
        let charges = ledger.charges.get(id).copied().unwrap_or(0);
        match status.as_str() {
            "completed" => assert_eq!(charges, 1, "{id}: one charge"),
            _ => assert_eq!(ledger.net(id), 0, "{id} ({status}): no money kept"),
        }
    }
    store.close().await;
}

/// A service whose broker and database went away still stops on SIGTERM — cleanly if it
/// can, else after its grace, with an error — instead of waiting for them forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_whose_servers_are_gone_still_stops() {
    let Some((mut nats, pg)) = crate::support::nats_and_postgres() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut payment = spawn_serve(
        dir.path(),
        &[
            "payment",
            "--listen",
            "127.0.0.1:0",
            "--bus",
            &nats.url(),
            "--store",
            &pg.url(),
        ],
    );
    printed_urls(&payment, "serve payment");
    nats.kill().unwrap();
    drop(pg);
    payment.terminate().unwrap();
    let started = Instant::now();
    let status = payment
        .wait_timeout(PROCESS_PATIENCE)
        .unwrap()
        .unwrap_or_else(|| panic!("`shop serve payment` did not stop within {PROCESS_PATIENCE:?} of SIGTERM with its servers gone"));
    println!(
        "`shop serve payment` with its servers gone stopped in {:?}: {status}",
        started.elapsed()
    );
}
