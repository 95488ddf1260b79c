//! `shop up` killed with SIGKILL in the middle of a batch of orders through every
//! pattern, then started again on the same data directory: every order that was
//! accepted ends, and `shop check` (no lost or doubled charge, stock conserved, refunds
//! matching failures, no shipment for a failed order) passes against the restarted shop.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shop::api::grpc::proto::{self, orders_client::OrdersClient};
use shop::order::Pattern;
use switchyard_testkit::Child;

use crate::support::{printed_urls, shop_command, stop_child};
use tonic::Code;
use tonic::transport::Channel;

/// A running `shop up` process and its Order API's URLs.
struct Shop {
    child: Child,
    rest: String,
    grpc: String,
}

/// Starts `shop up` on free ports over `dir`, without demo orders; returns once it serves.
fn start(dir: &Path) -> Shop {
    let mut cmd = shop_command();
    cmd.args(["up", "--port", "0", "--no-demo", "--data-dir"])
        .arg(dir)
        .env("RUST_LOG", "warn");
    let child = Child::spawn(cmd).unwrap();
    let urls = printed_urls(&child, "up");
    Shop {
        child,
        rest: urls["order"].clone(),
        grpc: urls["order-grpc"].clone(),
    }
}

/// The order `n` of the batch: every pattern, some declined, some out of stock.
fn request(n: usize) -> proto::PlaceOrderRequest {
    let pattern = Pattern::ALL[n % Pattern::ALL.len()];
    let (sku, qty, token) = match n % 9 {
        4 => ("sku-rare".to_string(), 6, "tok_decline"),
        7 => ("sku-rare".to_string(), 6, "tok_ok"),
        8 => (format!("sku-{:03}", 1 + n % 10), 1, "tok_decline"),
        _ => (
            format!("sku-{:03}", 1 + n % 10),
            1 + (n % 3) as u32,
            "tok_ok",
        ),
    };
    proto::PlaceOrderRequest {
        order_id: Some(format!("crash-{n:04}")),
        customer: format!("c-{}", n % 13),
        items: vec![proto::Item { sku, qty }],
        payment_token: token.into(),
        pattern: pattern.as_str().into(),
        wait_ms: 0,
    }
}

async fn connect(url: &str) -> OrdersClient<Channel> {
    let channel = Channel::from_shared(url.to_string())
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(30))
        .connect()
        .await
        .unwrap();
    OrdersClient::new(channel)
}

/// Places orders `from..to` with 8 concurrent clients; returns the ids the shop
/// accepted (placed now or before: `ALREADY_EXISTS`) and those whose outcome is unknown
/// (the call failed, e.g. the shop died under it).
async fn place(
    url: &str,
    numbers: Vec<usize>,
    progress: Arc<AtomicUsize>,
) -> (BTreeSet<String>, Vec<usize>) {
    let queue = Arc::new(Mutex::new(numbers));
    let accepted = Arc::new(Mutex::new(BTreeSet::new()));
    let unknown = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (queue, accepted, unknown, progress) = (
            queue.clone(),
            accepted.clone(),
            unknown.clone(),
            progress.clone(),
        );
        let mut client = connect(url).await;
        tasks.push(tokio::spawn(async move {
            loop {
                let Some(n) = queue.lock().unwrap().pop() else {
                    break;
                };
                let req = request(n);
                let id = req.order_id.clone().unwrap_or_default();
                match client.place_order(req).await {
                    Ok(_) => {
                        accepted.lock().unwrap().insert(id);
                        progress.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(s) if s.code() == Code::AlreadyExists => {
                        accepted.lock().unwrap().insert(id);
                    }
                    Err(_) => unknown.lock().unwrap().push(n),
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let accepted = accepted.lock().unwrap().clone();
    let unknown = unknown.lock().unwrap().clone();
    (accepted, unknown)
}

/// Runs `shop check` against `url`; true when it passes.
fn check_passes(url: &str) -> (bool, String) {
    let o = shop_command()
        .args(["check", "--url", url])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shop_killed_in_the_middle_of_a_batch_finishes_every_order_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    const TOTAL: usize = 600;
    let mut first = start(dir.path());
    let url = first.grpc.clone();
    // Place the batch in the background and kill the shop (SIGKILL, by pid) a third of
    // the way in, while orders are placed and flows, sagas and events are in flight.
    let progress = Arc::new(AtomicUsize::new(0));
    let placed = progress.clone();
    let batch = tokio::spawn(async move { place(&url, (0..TOTAL).rev().collect(), placed).await });
    let deadline = Instant::now() + Duration::from_secs(60);
    while progress.load(Ordering::Relaxed) < TOTAL / 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    first.child.kill().unwrap();
    let (mut accepted, unknown) = batch.await.unwrap();
    assert!(
        !accepted.is_empty() && accepted.len() < TOTAL,
        "the kill should land in the middle of the batch ({} of {TOTAL} accepted)",
        accepted.len()
    );

    // Started again on the same data: place what had no answer (the same ids).
    let second = start(dir.path());
    let (again, still_unknown) = place(&second.grpc, unknown, Arc::default()).await;
    assert!(still_unknown.is_empty(), "{still_unknown:?}");
    accepted.extend(again);
    assert_eq!(accepted.len(), TOTAL);

    // Every order ends.
    let mut client = connect(&second.grpc).await;
    for id in &accepted {
        let order = client
            .get_order(proto::GetOrderRequest {
                order_id: id.clone(),
                wait_ms: 60_000,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(
            order.status == proto::OrderStatus::Completed as i32
                || order.status == proto::OrderStatus::Failed as i32,
            "order {id} did not end: {order:?}"
        );
    }
    // And the invariants hold once the asynchronous parts are done.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (ok, text) = check_passes(&second.rest);
        if ok {
            break;
        }
        assert!(Instant::now() < deadline, "shop check failed:\n{text}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // A clean stop (SIGTERM by pid) exits 0.
    stop_child(second.child, "up");
}
