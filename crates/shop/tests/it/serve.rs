//! The shop as six processes, `shop serve <service>` each, the Order service finding the
//! others through `--registry`: orders placed with the `shop` binary against the Order
//! process's REST API, the payment process's own store checked after it stopped, and
//! the configurations `shop serve order` refuses.

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
