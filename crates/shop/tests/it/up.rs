//! The whole shop as `shop up` runs it (the real app behind the public API, every
//! pattern), driven from the outside: the `shop` binary against its REST API, and the
//! gRPC API. What a user does after reading the README.

use std::time::Duration;

use shop::api::grpc::proto::{self, orders_client::OrdersClient};
use shop::cli::up::{Launcher, UpConfig};
use shop::launch::AppLauncher;
use shop::order::Pattern;

use crate::support::{out, shop_cli};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_pattern_through_the_public_api_then_the_check_passes() {
    let dir = tempfile::tempdir().unwrap();
    let config = UpConfig {
        data_dir: dir.path().to_path_buf(),
        host: "127.0.0.1".into(),
        port: 0,
        patterns: Pattern::ALL.to_vec(),
        bus: "embedded".into(),
        store: "embedded".into(),
        demo: false,
        replicas: Vec::new(),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let launched = AppLauncher
        .up(
            config,
            Box::pin(async move {
                let _ = stopped.await;
            }),
        )
        .await
        .unwrap();
    let rest = launched.services[0].url.clone();
    let grpc = launched.services[1].url.clone();
    assert_eq!(launched.services[0].name, "order");

    for pattern in Pattern::ALL {
        let p = pattern.as_str();
        // Success: the CLI places the order, waits, and exits 0.
        let o = shop_cli(
            &rest,
            &["order", "--pattern", p, "--sku", "sku-003", "--qty", "2"],
        )
        .await;
        assert_eq!(o.status.code(), Some(0), "{p}: {}", out(&o));
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("completed"),
            "{p}: {}",
            out(&o)
        );
        // Declined: the order fails (exit 3), nothing is kept.
        let o = shop_cli(&rest, &["order", "--pattern", p, "--token", "tok_decline"]).await;
        assert_eq!(o.status.code(), Some(3), "{p} declined: {}", out(&o));
        // Out of stock: fails, and whatever was done is undone.
        let o = shop_cli(
            &rest,
            &["order", "--pattern", p, "--sku", "sku-rare", "--qty", "6"],
        )
        .await;
        assert_eq!(o.status.code(), Some(3), "{p} out of stock: {}", out(&o));
    }

    // Bad input is refused before anything is recorded.
    let o = shop_cli(&rest, &["order", "--pattern", "hybrid", "--sku", "sku-404"]).await;
    assert_ne!(o.status.code(), Some(0), "{}", out(&o));
    assert!(out(&o).contains("sku-404"), "{}", out(&o));

    // The gRPC API places and reads the same orders.
    let channel = tonic::transport::Channel::from_shared(grpc)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = OrdersClient::new(channel);
    let placed = client
        .place_order(proto::PlaceOrderRequest {
            order_id: Some("grpc-1".into()),
            customer: "ada".into(),
            items: vec![proto::Item {
                sku: "sku-001".into(),
                qty: 1,
            }],
            payment_token: "tok_ok".into(),
            pattern: "orchestration".into(),
            wait_ms: 30_000,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(placed.terminal, "{placed:?}");
    let order = placed.order.unwrap();
    assert_eq!(order.status, proto::OrderStatus::Completed as i32);
    let services: Vec<&str> = order.history.iter().map(|e| e.service.as_str()).collect();
    for s in ["order", "inventory", "payment", "shipping"] {
        assert!(services.contains(&s), "{s} missing from {services:?}");
    }

    // The timeline, and the invariants over everything placed.
    let o = shop_cli(&rest, &["status", "grpc-1"]).await;
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("payment"),
        "{}",
        out(&o)
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let o = shop_cli(&rest, &["check"]).await;
        if o.status.code() == Some(0) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the check did not pass: {}",
            out(&o)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let o = shop_cli(&rest, &["sagas"]).await;
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("completed"),
        "{}",
        out(&o)
    );

    stop.send(()).unwrap();
    launched.stopped.await.unwrap();
}

/// `shop up` in the distributed mode: every service its own process on a real
/// nats-server and PostgreSQL, two payment processes behind one name; orders through
/// every pattern; SIGTERM stops them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shop_up_on_nats_and_postgres_runs_every_service_as_a_process() {
    let Some((nats, pg)) = crate::support::nats_and_postgres() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = crate::support::shop_command();
    cmd.args(["up", "--port", "0", "--no-demo", "--replicas", "payment=2"])
        .args(["--bus", &nats.url(), "--store", &pg.url()])
        .arg("--data-dir")
        .arg(dir.path());
    let up = switchyard_testkit::Child::spawn(cmd).unwrap();
    let urls = crate::support::printed_urls(&up, "up (distributed)");
    let rest = urls["order"].clone();
    for name in [
        "inventory",
        "shipping",
        "notification",
        "analytics",
        "order-grpc",
    ] {
        assert!(urls.contains_key(name), "{name} missing: {urls:?}");
    }
    for pattern in [
        "sync",
        "choreography",
        "request-reply",
        "orchestration",
        "hybrid",
    ] {
        let id = format!("up-{pattern}");
        let o = crate::support::shop_cli(
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
        assert_eq!(
            o.status.code(),
            Some(0),
            "{pattern}: {}",
            crate::support::out(&o)
        );
    }
    assert!(
        urls.contains_key("payment-1") && urls.contains_key("payment-2"),
        "two payment processes: {urls:?}"
    );
    crate::support::stop_child(up, "up (distributed)");
}
