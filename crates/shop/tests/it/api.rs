//! The Order API over real ports (REST and gRPC) on an `OrderDesk` with test flows, and
//! the `shop` CLI against it: bad input, conflicts, unavailable patterns, waiting,
//! lists, timelines, faults.

use std::process::Output;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use shop::api::grpc::proto::{self, orders_client::OrdersClient};
use shop::api::{self, Admin, NoAdmin, OrderApi, ServiceInfo};
use shop::model::{Catalog, Item};
use shop::order::{Flow, NewOrder, Order, OrderBook, OrderDesk, OrderStatus, Pattern, PlaceError};
use shop::services::inventory;
use switchyard_rpc::grpc::FIELD_METADATA;
use tonic::Code;

use crate::support::{Harness, RawResponse, listener, raw};

/// How a test flow ends the orders it places.
#[derive(Clone, Copy)]
enum End {
    /// Before `place` returns (like the sync pattern).
    Now,
    /// This long after `place` returned.
    After(Duration),
    /// Never (stays accepted).
    Never,
}

/// A flow that records the order and ends it per `end`: completed, or failed for the
/// token `tok_decline`.
struct TestFlow {
    pattern: Pattern,
    book: OrderBook,
    end: End,
}

impl TestFlow {
    async fn finish(book: &OrderBook, order: &Order) {
        book.record(&order.id, "inventory", "reserved", None)
            .await
            .unwrap();
        let reason = (order.payment_token == "tok_decline").then(|| "payment declined".to_string());
        book.finish(&order.id, "order", reason).await.unwrap();
    }
}

#[async_trait]
impl Flow for TestFlow {
    fn pattern(&self) -> Pattern {
        self.pattern
    }

    async fn place(&self, order: Order) -> Result<Order, PlaceError> {
        self.book.create(&order).await?;
        match self.end {
            End::Now => Self::finish(&self.book, &order).await,
            End::After(d) => {
                let book = self.book.clone();
                let o = order.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(d).await;
                    Self::finish(&book, &o).await;
                });
            }
            End::Never => {}
        }
        Ok(self.book.get(&order.id).await?.unwrap_or(order))
    }
}

/// An admin that knows the inventory's URL.
struct TestAdmin {
    services: Vec<ServiceInfo>,
}

impl Admin for TestAdmin {
    fn services(&self) -> Vec<ServiceInfo> {
        self.services.clone()
    }
}

struct Shop {
    h: Harness,
    book: OrderBook,
    api: OrderApi,
}

impl Shop {
    async fn counts(&self) -> (u64, u64, u64) {
        let c = self.book.counts().await.unwrap();
        (
            c[&OrderStatus::Accepted],
            c[&OrderStatus::Completed],
            c[&OrderStatus::Failed],
        )
    }

    async fn grpc(&self) -> OrdersClient<tonic::transport::Channel> {
        let channel = tonic::transport::Channel::from_shared(self.api.grpc_url.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        OrdersClient::new(channel)
    }

    async fn post(&self, path: &str, body: &str) -> RawResponse {
        raw(
            &self.api.rest_url,
            "POST",
            path,
            Some("application/json"),
            body.as_bytes(),
        )
        .await
    }

    async fn get(&self, path: &str) -> RawResponse {
        raw(&self.api.rest_url, "GET", path, None, b"").await
    }
}

/// Sync ends at once, choreography after 300 ms, orchestration never; request-reply and
/// hybrid are not running.
async fn shop_with(admin: Arc<dyn Admin>) -> Shop {
    let h = Harness::new();
    let book = OrderBook::new(h.store("order"));
    let flow = |pattern, end| -> Arc<dyn Flow> {
        Arc::new(TestFlow {
            pattern,
            book: book.clone(),
            end,
        })
    };
    let desk = OrderDesk::new(Arc::new(Catalog::standard()), book.clone())
        .with_flow(flow(Pattern::Sync, End::Now))
        .with_flow(flow(
            Pattern::Choreography,
            End::After(Duration::from_millis(300)),
        ))
        .with_flow(flow(Pattern::Orchestration, End::Never));
    let api = api::start(
        desk,
        admin,
        listener().await,
        listener().await,
        h.shutdown(),
    )
    .await
    .unwrap();
    Shop { h, book, api }
}

async fn ids(s: &Shop, path: &str) -> Vec<String> {
    let r = s.get(path).await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["orders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["id"].as_str().unwrap().to_string())
        .collect()
}

async fn shop() -> Shop {
    shop_with(Arc::new(NoAdmin)).await
}

fn body(id: &str, pattern: &str) -> String {
    format!(
        r#"{{"order_id":"{id}","customer":"ada","items":[{{"sku":"sku-001","qty":2}}],"payment_token":"tok_ok","pattern":"{pattern}"}}"#
    )
}

fn assert_problem(r: &RawResponse, status: u16, field: Option<&str>, case: &str) {
    assert_eq!(r.status, status, "{case}: {}", r.body);
    assert!(
        r.content_type.starts_with("application/problem+json"),
        "{case}: content type {}",
        r.content_type
    );
    let p = r.json();
    if let Some(f) = field {
        assert_eq!(p["field"], f, "{case}: {}", r.body);
    }
    assert!(
        p["detail"].as_str().is_some_and(|d| !d.is_empty()) || status == 413,
        "{case}: no detail in {}",
        r.body
    );
}

#[tokio::test]
async fn rest_bad_input_is_a_problem_naming_the_field_and_records_nothing() {
    let s = shop().await;
    let ok = body("o-x", "sync");
    let with = |from: &str, to: &str| ok.replace(from, to);
    let huge = format!(
        r#"{{"customer":"ada","items":[{{"sku":"{}","qty":1}}],"payment_token":"t","pattern":"sync"}}"#,
        "x".repeat(70 * 1024)
    );
    /// (case, content type, body, status, field)
    type Case<'a> = (&'a str, Option<&'a str>, String, u16, Option<&'a str>);
    let cases: Vec<Case> = vec![
        (
            "malformed JSON",
            Some("application/json"),
            r#"{"customer":"#.into(),
            400,
            None,
        ),
        (
            "trailing garbage",
            Some("application/json"),
            format!("{ok} x"),
            400,
            None,
        ),
        (
            "wrong content type",
            Some("text/plain"),
            ok.clone(),
            415,
            None,
        ),
        ("no content type", None, ok.clone(), 415, None),
        (
            "missing customer",
            Some("application/json"),
            with(r#""customer":"ada","#, ""),
            422,
            Some("customer"),
        ),
        (
            "missing items",
            Some("application/json"),
            with(r#""items":[{"sku":"sku-001","qty":2}],"#, ""),
            422,
            Some("items"),
        ),
        (
            "missing pattern",
            Some("application/json"),
            with(r#","pattern":"sync""#, ""),
            422,
            Some("pattern"),
        ),
        (
            "unknown pattern",
            Some("application/json"),
            with(r#""pattern":"sync""#, r#""pattern":"telepathy""#),
            422,
            Some("pattern"),
        ),
        (
            "unknown SKU",
            Some("application/json"),
            with("sku-001", "sku-999"),
            422,
            Some("items[0].sku"),
        ),
        (
            "zero quantity",
            Some("application/json"),
            with(r#""qty":2"#, r#""qty":0"#),
            422,
            Some("items[0].qty"),
        ),
        (
            "negative quantity",
            Some("application/json"),
            with(r#""qty":2"#, r#""qty":-1"#),
            422,
            Some("items[0].qty"),
        ),
        (
            "quantity over the maximum",
            Some("application/json"),
            with(r#""qty":2"#, r#""qty":1000001"#),
            422,
            Some("items[0].qty"),
        ),
        (
            "quantity over u32",
            Some("application/json"),
            with(r#""qty":2"#, r#""qty":99999999999"#),
            422,
            Some("items[0].qty"),
        ),
        (
            "fractional quantity",
            Some("application/json"),
            with(r#""qty":2"#, r#""qty":1.5"#),
            422,
            Some("items[0].qty"),
        ),
        (
            "no items",
            Some("application/json"),
            with(r#"[{"sku":"sku-001","qty":2}]"#, "[]"),
            422,
            Some("items"),
        ),
        (
            "items not a list",
            Some("application/json"),
            with(r#"[{"sku":"sku-001","qty":2}]"#, "7"),
            422,
            Some("items"),
        ),
        (
            "bad order id characters",
            Some("application/json"),
            with("o-x", "o/x"),
            422,
            Some("order_id"),
        ),
        (
            "empty order id",
            Some("application/json"),
            with(r#""o-x""#, r#""""#),
            422,
            Some("order_id"),
        ),
        (
            "bad customer",
            Some("application/json"),
            with(r#""ada""#, r#""ada lovelace""#),
            422,
            Some("customer"),
        ),
        (
            "empty token",
            Some("application/json"),
            with(r#""tok_ok""#, r#""""#),
            422,
            Some("payment_token"),
        ),
        ("oversize body", Some("application/json"), huge, 413, None),
    ];
    for (case, ct, b, status, field) in cases {
        let r = raw(&s.api.rest_url, "POST", "/orders", ct, b.as_bytes()).await;
        assert_problem(&r, status, field, case);
    }
    for (case, path, status, field) in [
        ("bad wait", "/orders?wait=soon", 422, Some("wait")),
        (
            "unknown query parameter",
            "/orders?wiat=5s",
            422,
            Some("wiat"),
        ),
        (
            "bad percent-encoding",
            "/orders?wait=%zz",
            422,
            Some("wait"),
        ),
    ] {
        assert_problem(&s.post(path, &ok).await, status, field, case);
    }
    for (case, path, status, field) in [
        ("id with a space", "/orders/a%20b", 422, Some("order_id")),
        (
            "id starting with a dot",
            "/orders/.hidden",
            422,
            Some("order_id"),
        ),
        ("id not UTF-8", "/orders/%FF", 422, Some("order_id")),
        ("unknown order", "/orders/o-nope", 404, None),
        ("bad status", "/orders?status=lost", 422, Some("status")),
        ("zero limit", "/orders?limit=0", 422, Some("limit")),
        ("huge limit", "/orders?limit=100000", 422, Some("limit")),
        (
            "bad wait on get",
            "/orders/o-nope?wait=-1s",
            422,
            Some("wait"),
        ),
        ("unknown route", "/nope", 404, None),
    ] {
        let r = s.get(path).await;
        assert!(
            r.content_type.starts_with("application/problem+json"),
            "{case}: {}",
            r.content_type
        );
        assert_eq!(r.status, status, "{case}: {}", r.body);
        if let Some(f) = field {
            assert_eq!(r.json()["field"], f, "{case}: {}", r.body);
        }
    }
    let r = s.get("/orders/o-nope").await;
    assert_eq!(r.json()["type"], api::problems::UNKNOWN_ORDER);
    assert_eq!(r.json()["order_id"], "o-nope");
    assert_eq!(s.counts().await, (0, 0, 0));
    // The server is still fine.
    assert_eq!(s.post("/orders", &ok).await.status, 201);
    assert_eq!(s.counts().await, (0, 1, 0));
}

#[tokio::test]
async fn rest_place_conflict_unavailable_and_wait() {
    let s = shop().await;
    // Sync: 201 with the terminal order and its Location.
    let r = s.post("/orders", &body("o-sync", "sync")).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let o: Order = serde_json::from_str(&r.body).unwrap();
    assert_eq!(o.status, OrderStatus::Completed);
    assert_eq!(o.amount_cents, 1000);
    // Same id again: 409, nothing changes.
    let r = s.post("/orders", &body("o-sync", "sync")).await;
    assert_problem(&r, 409, None, "existing id");
    assert_eq!(r.json()["type"], api::problems::ORDER_EXISTS);
    assert_eq!(r.json()["order_id"], "o-sync");
    // A pattern without a flow: 503, nothing recorded.
    for p in ["request-reply", "hybrid"] {
        let r = s.post("/orders", &body("o-503", p)).await;
        assert_problem(&r, 503, None, p);
        assert_eq!(r.json()["type"], api::problems::UNAVAILABLE);
    }
    assert!(s.book.get("o-503").await.unwrap().is_none());
    // Async without wait: 202 accepted + Location.
    let r = raw(
        &s.api.rest_url,
        "POST",
        "/orders",
        Some("application/json"),
        body("o-async", "choreography").as_bytes(),
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.json()["status"], "accepted");
    // The Location header, through the switchyard client.
    let _reg = s.h.registry.register(api::SERVICE, &s.api.rest_url);
    let r =
        s.h.http
            .service(api::SERVICE)
            .call(
                http::Method::POST,
                "/orders",
                Some(body("o-loc", "orchestration").into()),
                &switchyard_rpc::CallOptions::new(),
            )
            .await
            .unwrap();
    assert_eq!(r.status, 202);
    assert_eq!(r.headers["location"], "/orders/o-loc");
    // Async with wait: answered once it ends (~300 ms), 201.
    let t = Instant::now();
    let r = s
        .post("/orders?wait=5s", &body("o-async-wait", "choreography"))
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.json()["status"], "completed");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    // Never ends: 202 after the wait.
    let t = Instant::now();
    let r = s
        .post("/orders?wait=300ms", &body("o-stuck", "orchestration"))
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert!(t.elapsed() >= Duration::from_millis(300));
    // GET ?wait= on a terminal order answers at once; on a stuck one after the wait.
    let t = Instant::now();
    let r = s.get("/orders/o-sync?wait=30s").await;
    assert_eq!(
        (r.status, r.json()["status"].as_str()),
        (200, Some("completed"))
    );
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    let t = Instant::now();
    let r = s.get("/orders/o-stuck?wait=250ms").await;
    assert_eq!(
        (r.status, r.json()["status"].as_str()),
        (200, Some("accepted"))
    );
    assert!(t.elapsed() >= Duration::from_millis(250));
    // A declined sync order is placed (201) and failed.
    let r = s
        .post(
            "/orders",
            &body("o-declined", "sync").replace("tok_ok", "tok_decline"),
        )
        .await;
    assert_eq!(r.status, 201);
    assert_eq!(r.json()["status"], "failed");
    assert_eq!(r.json()["reason"], "payment declined");

    // Lists and counts.
    crate::support::eventually("o-async completes", async || {
        s.book.get("o-async").await.unwrap().unwrap().status == OrderStatus::Completed
    })
    .await;
    assert_eq!(
        ids(&s, "/orders?status=completed").await,
        ["o-async", "o-async-wait", "o-sync"]
    );
    assert_eq!(ids(&s, "/orders?status=failed").await, ["o-declined"]);
    assert_eq!(
        ids(&s, "/orders?status=accepted").await,
        ["o-loc", "o-stuck"]
    );
    assert_eq!(ids(&s, "/orders?limit=2").await.len(), 2);
    assert_eq!(ids(&s, "/orders").await.len(), 6);
    let c = s.get("/orders/counts").await.json();
    assert_eq!(
        (
            c["accepted"].as_u64(),
            c["completed"].as_u64(),
            c["failed"].as_u64()
        ),
        (Some(2), Some(3), Some(1))
    );
    let p = s.get("/patterns").await.json();
    assert_eq!(
        p["patterns"],
        serde_json::json!(["sync", "choreography", "orchestration"])
    );
}

#[tokio::test]
async fn rest_get_shows_the_timeline_of_an_order_in_the_book() {
    let s = shop().await;
    let order = NewOrder {
        order_id: Some("o-direct".into()),
        customer: "ada".into(),
        items: vec![Item::new("sku-002", 1)],
        payment_token: "tok_ok".into(),
        pattern: Pattern::Hybrid,
    }
    .validate(&Catalog::standard())
    .unwrap();
    s.book.create(&order).await.unwrap();
    s.book
        .record(
            "o-direct",
            "inventory",
            "reserved",
            Some("sku-002 x1".into()),
        )
        .await
        .unwrap();
    s.book
        .record("o-direct", "payment", "charged", Some("ch_1".into()))
        .await
        .unwrap();
    let r = s.get("/orders/o-direct").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let o: Order = serde_json::from_str(&r.body).unwrap();
    let steps: Vec<_> = o
        .history
        .iter()
        .map(|e| (e.service.as_str(), e.what.as_str()))
        .collect();
    assert_eq!(
        steps,
        [
            ("order", "accepted"),
            ("inventory", "reserved"),
            ("payment", "charged")
        ]
    );
    assert!(
        r.json()["history"][1]["at"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );
    assert_eq!(o.history[2].detail.as_deref(), Some("ch_1"));
}

#[tokio::test]
async fn operator_endpoints_are_501_until_wired_and_services_lists_the_api() {
    let s = shop().await;
    for path in ["/sagas", "/dlq", "/check"] {
        let r = s.get(path).await;
        assert_problem(&r, 501, None, path);
        assert_eq!(r.json()["type"], api::problems::NOT_WIRED);
    }
    let r = s.post("/dlq/replay", r#"{"topic":"shop.orders"}"#).await;
    assert_eq!(r.status, 501);
    let r = s
        .post("/dlq/replay", r#"{"topic":"shop.orders","ids":["nope"]}"#)
        .await;
    assert_problem(&r, 422, Some("ids[0]"), "bad message id");
    assert_problem(
        &s.get("/sagas?state=lost").await,
        422,
        Some("state"),
        "bad saga state",
    );
    let r = s.get("/services").await.json();
    assert_eq!(r["services"][0]["name"], "order");
    assert_eq!(r["services"][0]["url"], s.api.rest_url.as_str());
    assert_eq!(r["services"][1]["name"], "order-grpc");
    assert_eq!(r["services"][1]["protocol"], "grpc");
    // Faults act on the order endpoints only.
    s.api.faults.set(shop::faults::FaultConfig {
        error_rate: 1.0,
        ..Default::default()
    });
    assert_eq!(s.get("/orders/counts").await.status, 503);
    assert_eq!(s.get("/services").await.status, 200);
    let e = s
        .grpc()
        .await
        .list_orders(proto::ListOrdersRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    s.api.faults.clear();
    assert_eq!(s.get("/orders/counts").await.status, 200);
}

fn place_request(id: &str, pattern: &str) -> proto::PlaceOrderRequest {
    proto::PlaceOrderRequest {
        order_id: Some(id.into()),
        customer: "ada".into(),
        items: vec![proto::Item {
            sku: "sku-001".into(),
            qty: 2,
        }],
        payment_token: "tok_ok".into(),
        pattern: pattern.into(),
        wait_ms: 0,
    }
}

fn field_of(s: &tonic::Status) -> Option<String> {
    s.metadata()
        .get(FIELD_METADATA)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

#[tokio::test]
async fn grpc_bad_input_is_invalid_argument_naming_the_field() {
    let s = shop().await;
    let mut c = s.grpc().await;
    type Edit = fn(&mut proto::PlaceOrderRequest);
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "unknown pattern",
            |r| r.pattern = "telepathy".into(),
            "pattern",
        ),
        ("empty pattern", |r| r.pattern.clear(), "pattern"),
        ("empty customer", |r| r.customer.clear(), "customer"),
        (
            "bad order id",
            |r| r.order_id = Some("o/1".into()),
            "order_id",
        ),
        (
            "empty order id",
            |r| r.order_id = Some(String::new()),
            "order_id",
        ),
        ("no items", |r| r.items.clear(), "items"),
        ("zero quantity", |r| r.items[0].qty = 0, "items[0].qty"),
        (
            "huge quantity",
            |r| r.items[0].qty = u32::MAX,
            "items[0].qty",
        ),
        (
            "unknown SKU",
            |r| r.items[0].sku = "sku-999".into(),
            "items[0].sku",
        ),
        ("empty token", |r| r.payment_token.clear(), "payment_token"),
    ];
    for (case, edit, field) in cases {
        let mut req = place_request("o-g", "sync");
        edit(&mut req);
        let e = c.place_order(req).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{case}: {e:?}");
        assert_eq!(field_of(&e).as_deref(), Some(field), "{case}: {e:?}");
        assert!(e.message().contains(field), "{case}: {}", e.message());
    }
    let e = c
        .get_order(proto::GetOrderRequest {
            order_id: "a b".into(),
            wait_ms: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), field_of(&e).as_deref()),
        (Code::InvalidArgument, Some("order_id"))
    );
    let e = c
        .list_orders(proto::ListOrdersRequest {
            status: 42,
            limit: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), field_of(&e).as_deref()),
        (Code::InvalidArgument, Some("status"))
    );
    let e = c
        .list_orders(proto::ListOrdersRequest {
            status: 0,
            limit: 5000,
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), field_of(&e).as_deref()),
        (Code::InvalidArgument, Some("limit"))
    );
    assert_eq!(s.counts().await, (0, 0, 0));
}

#[tokio::test]
async fn grpc_place_get_list_with_rest_semantics() {
    let s = shop().await;
    let mut c = s.grpc().await;
    let r = c
        .place_order(place_request("o-1", "sync"))
        .await
        .unwrap()
        .into_inner();
    assert!(r.terminal);
    let o = r.order.unwrap();
    assert_eq!(o.status, proto::OrderStatus::Completed as i32);
    assert_eq!(o.history.len(), 3);
    assert_eq!(o.history[1].service, "inventory");
    let e = c
        .place_order(place_request("o-1", "sync"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    let e = c
        .place_order(place_request("o-2", "request_reply"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    let e = c
        .get_order(proto::GetOrderRequest {
            order_id: "o-404".into(),
            wait_ms: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let mut wait = place_request("o-3", "choreography");
    wait.wait_ms = 5000;
    let r = c.place_order(wait).await.unwrap().into_inner();
    assert!(r.terminal, "{r:?}");
    let r = c
        .place_order(place_request("o-4", "orchestration"))
        .await
        .unwrap()
        .into_inner();
    assert!(!r.terminal);
    let t = Instant::now();
    let o = c
        .get_order(proto::GetOrderRequest {
            order_id: "o-4".into(),
            wait_ms: 200,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(o.status, proto::OrderStatus::Accepted as i32);
    assert!(t.elapsed() >= Duration::from_millis(200));
    let list = c
        .list_orders(proto::ListOrdersRequest {
            status: proto::OrderStatus::Completed as i32,
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<_> = list.orders.iter().map(|o| o.id.as_str()).collect();
    assert_eq!(ids, ["o-1", "o-3"]);
    assert_eq!(s.counts().await, (1, 2, 0));
}

// ---------------------------------------------------------------- CLI

/// Runs the `shop` binary with `args` (off the runtime's threads), without the
/// caller's `SHOP_*` variables.
async fn shop_cli(args: &[&str]) -> Output {
    shop_cli_env(args, &[]).await
}

/// [`shop_cli`] with environment variables.
async fn shop_cli_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_shop"));
        for (k, _) in std::env::vars() {
            if k.starts_with("SHOP_") {
                cmd.env_remove(k);
            }
        }
        cmd.args(&args).envs(env).output().unwrap()
    })
    .await
    .unwrap()
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}

#[tokio::test]
async fn cli_help_runs_for_every_command() {
    for args in [
        vec!["--help"],
        vec!["order", "--help"],
        vec!["status", "--help"],
        vec!["orders", "--help"],
        vec!["fault", "--help"],
        vec!["up", "--help"],
        vec!["serve", "--help"],
        vec!["sagas", "--help"],
        vec!["dlq", "--help"],
        vec!["dlq", "replay", "--help"],
        vec!["check", "--help"],
    ] {
        let o = shop_cli(&args).await;
        let (out, err) = text(&o);
        assert!(o.status.success(), "{args:?}: {err}");
        assert!(out.contains("Usage: shop"), "{args:?}: {out}");
    }
    let (out, _) = text(&shop_cli(&["order", "--help"]).await);
    for flag in [
        "--pattern",
        "--sku",
        "--qty",
        "--customer",
        "--token",
        "--wait",
        "--url",
        "SHOP_URL",
    ] {
        assert!(out.contains(flag), "order --help lacks {flag}: {out}");
    }
    let o = shop_cli(&["order", "--pattern", "telepathy"]).await;
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).1.contains("unknown pattern"));
}

#[tokio::test]
async fn cli_order_status_and_orders_against_a_running_api() {
    let s = shop().await;
    let url = s.api.rest_url.clone();
    let o = shop_cli(&[
        "order",
        "--pattern",
        "sync",
        "--sku",
        "sku-001",
        "--qty",
        "3",
        "--order-id",
        "o-cli",
        "--url",
        &url,
    ])
    .await;
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(out.contains("completed"), "{out}");
    assert!(out.contains("SERVICE"), "{out}");
    assert!(
        out.contains("inventory") && out.contains("reserved"),
        "{out}"
    );
    assert_eq!(
        s.book.get("o-cli").await.unwrap().unwrap().items,
        [Item::new("sku-001", 3)]
    );

    // A declined order: exit code 3 and the reason.
    let o = shop_cli(&[
        "order",
        "--pattern",
        "sync",
        "--token",
        "tok_decline",
        "--url",
        &url,
    ])
    .await;
    assert_eq!(o.status.code(), Some(3), "{:?}", text(&o));
    assert!(text(&o).1.contains("payment declined"));

    // Placing an existing id: exit 1 with the problem.
    let o = shop_cli(&[
        "order",
        "--pattern",
        "sync",
        "--order-id",
        "o-cli",
        "--url",
        &url,
    ])
    .await;
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("409"), "{:?}", text(&o));

    // Still in flight after the wait: exit 4.
    let o = shop_cli(&[
        "order",
        "--pattern",
        "orchestration",
        "--wait",
        "200ms",
        "--url",
        &url,
    ])
    .await;
    assert_eq!(o.status.code(), Some(4), "{:?}", text(&o));

    // The status of an order built in the book directly.
    let order = NewOrder {
        order_id: Some("o-book".into()),
        customer: "ada".into(),
        items: vec![Item::new("sku-002", 1)],
        payment_token: "tok_ok".into(),
        pattern: Pattern::Hybrid,
    }
    .validate(&Catalog::standard())
    .unwrap();
    s.book.create(&order).await.unwrap();
    s.book
        .record("o-book", "shipping", "shipped", Some("TRK-42".into()))
        .await
        .unwrap();
    let o = shop_cli(&["status", "o-book", "--url", &url]).await;
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    for want in [
        "o-book", "accepted", "shipping", "shipped", "TRK-42", "TIME", "DETAIL",
    ] {
        assert!(out.contains(want), "status lacks {want}: {out}");
    }
    let o = shop_cli(&["status", "o-missing", "--url", &url]).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("404"), "{:?}", text(&o));

    // The list, with a status filter.
    let o = shop_cli(&["orders", "--status", "failed", "--url", &url]).await;
    let (out, _) = text(&o);
    assert!(o.status.success());
    assert!(out.contains("failed") && !out.contains("o-cli"), "{out}");
    let o = shop_cli(&["orders", "--counts", "--url", &url]).await;
    assert!(
        text(&o).0.contains("o-cli") && text(&o).0.contains("completed 1"),
        "{:?}",
        text(&o)
    );

    // Operator commands not wired: a clear error.
    let o = shop_cli(&["sagas", "--url", &url]).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("501"), "{:?}", text(&o));
    // One service on a backend this build does not know: a clear error naming the forms
    // that work, not a hang (refused before anything is opened; `serve` itself is tested
    // in `serve.rs`).
    let o = shop_cli(&["serve", "inventory", "--bus", "kafka://127.0.0.1:9092"]).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).1.contains("unknown backend") && text(&o).1.contains("nats://"),
        "{:?}",
        text(&o)
    );
}

#[tokio::test]
async fn cli_says_when_the_shop_is_not_running() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}");
    let o = shop_cli(&["status", "o-1", "--url", &url]).await;
    assert_eq!(o.status.code(), Some(1));
    let err = text(&o).1;
    assert!(err.contains("is `shop up` running"), "{err}");
    assert!(err.contains(&url), "{err}");
    let o = shop_cli(&["orders", "--url", "ftp://x"]).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("http://"), "{:?}", text(&o));
}

#[tokio::test]
async fn cli_fault_sets_and_clears_a_running_service_s_faults() {
    let h = Harness::new();
    let inv = inventory::start(h.store("inventory"), listener().await, h.shutdown())
        .await
        .unwrap();
    let s = shop_with(Arc::new(TestAdmin {
        services: vec![ServiceInfo::new("inventory", &inv.url, "http")],
    }))
    .await;
    let url = s.api.rest_url.clone();
    // Through the shop's service list.
    let o = shop_cli(&[
        "fault",
        "inventory",
        "--latency",
        "200ms",
        "--error-rate",
        "0.2",
        "--url",
        &url,
    ])
    .await;
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(out.contains("200ms") && out.contains("0.2"), "{out}");
    let st = inv.faults.status();
    assert_eq!((st.latency_ms, st.error_rate), (200, 0.2));
    let o = shop_cli(&["fault", "inventory", "--clear", "--url", &url]).await;
    assert!(o.status.success(), "{:?}", text(&o));
    assert_eq!(inv.faults.status(), shop::faults::FaultStatus::default());
    // Directly by URL, and "down".
    let o = shop_cli(&[
        "fault",
        "inventory",
        "--down",
        "10s",
        "--service-url",
        &inv.url,
    ])
    .await;
    assert!(o.status.success(), "{:?}", text(&o));
    assert!(inv.faults.status().down_remaining_ms > 5_000);
    let o = shop_cli(&["fault", "inventory", "--clear", "--service-url", &inv.url]).await;
    assert!(o.status.success());
    assert_eq!(inv.faults.status().down_remaining_ms, 0);
    // The Order API's own faults, and an unknown service.
    let o = shop_cli(&["fault", "order", "--error-rate", "1", "--url", &url]).await;
    assert!(o.status.success(), "{:?}", text(&o));
    assert_eq!(s.api.faults.status().error_rate, 1.0);
    let o = shop_cli(&["fault", "order", "--clear", "--url", &url]).await;
    assert!(o.status.success(), "{:?}", text(&o));
    let o = shop_cli(&["fault", "warehouse", "--clear", "--url", &url]).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("inventory"), "{:?}", text(&o));
    let o = shop_cli(&["fault", "inventory", "--error-rate", "2", "--url", &url]).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).1.contains("error_rate") || text(&o).1.contains("0.0 and 1.0"),
        "{:?}",
        text(&o)
    );
    drop(h);
    drop(s.h);
}

#[tokio::test]
async fn cli_takes_settings_from_flags_then_environment_then_config_file() {
    let s = shop().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("shop.toml");
    std::fs::write(
        &file,
        format!(
            "url = \"{}\"\ntimeout = \"5s\"\n[order]\npattern = \"sync\"\ncustomer = \"grace\"\nwait = \"2s\"\n",
            s.api.rest_url
        ),
    )
    .unwrap();
    let file = file.to_str().unwrap();
    // Everything from the file.
    let o = shop_cli(&["order", "--order-id", "o-file", "--config", file]).await;
    assert!(o.status.success(), "{:?}", text(&o));
    assert_eq!(
        s.book.get("o-file").await.unwrap().unwrap().customer,
        "grace"
    );
    // The environment wins over the file, a flag over the environment.
    let o = shop_cli_env(
        &["order", "--order-id", "o-env"],
        &[("SHOP_CONFIG", file), ("SHOP_CUSTOMER", "linus")],
    )
    .await;
    assert!(o.status.success(), "{:?}", text(&o));
    assert_eq!(
        s.book.get("o-env").await.unwrap().unwrap().customer,
        "linus"
    );
    let o = shop_cli_env(
        &[
            "order",
            "--order-id",
            "o-flag",
            "--customer",
            "ada",
            "--pattern",
            "choreography",
        ],
        &[("SHOP_CONFIG", file), ("SHOP_CUSTOMER", "linus")],
    )
    .await;
    assert!(o.status.success(), "{:?}", text(&o));
    let o = s.book.get("o-flag").await.unwrap().unwrap();
    assert_eq!(
        (o.customer.as_str(), o.pattern),
        ("ada", Pattern::Choreography)
    );
    // SHOP_URL wins over the file's url.
    let o = shop_cli_env(
        &["status", "o-file", "--config", file],
        &[("SHOP_URL", "http://127.0.0.1:1")],
    )
    .await;
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("127.0.0.1:1"), "{:?}", text(&o));
    // A bad file says which file and which key.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "urll = \"x\"\n").unwrap();
    let o = shop_cli(&["orders", "--config", bad.to_str().unwrap()]).await;
    assert_eq!(o.status.code(), Some(1));
    let err = text(&o).1;
    assert!(err.contains("bad.toml") && err.contains("urll"), "{err}");
    // Without a pattern anywhere: a usage error naming the flag.
    let o = shop_cli(&["order", "--url", &s.api.rest_url]).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("--pattern"), "{:?}", text(&o));
}

/// An admin with one saga, one dead letter and a failing check.
struct FullAdmin;

#[async_trait]
impl Admin for FullAdmin {
    async fn sagas(
        &self,
        state: Option<switchyard::saga::SagaState>,
        limit: usize,
    ) -> Result<Vec<switchyard::saga::SagaRecord>, api::AdminError> {
        assert_eq!(
            (state, limit),
            (Some(switchyard::saga::SagaState::NeedsAttention), 50)
        );
        let now = switchyard::Timestamp::now();
        Ok(vec![switchyard::saga::SagaRecord {
            id: "o-saga".into(),
            saga: "place-order".into(),
            state: switchyard::saga::SagaState::NeedsAttention,
            input: switchyard::saga::Json::null(),
            steps: Vec::new(),
            cursor: 0,
            resume: None,
            error: Some("refund kept failing".into()),
            history: Vec::new(),
            created_at: now,
            updated_at: now,
        }])
    }

    async fn dead_letters(
        &self,
        topic: Option<String>,
        _limit: usize,
    ) -> Result<Vec<api::DeadLetterView>, api::AdminError> {
        let now = switchyard::Timestamp::now();
        Ok(vec![api::DeadLetterView {
            dlq_offset: 0,
            topic: topic.unwrap_or_else(|| "shop.orders".into()),
            group: "shipping".into(),
            id: switchyard::MessageId::new().to_string(),
            event_type: "shop.order.created.v1".into(),
            subject: Some("o-poison".into()),
            reason: "payload does not decode".into(),
            attempts: 5,
            first_failure: now,
            last_failure: now,
        }])
    }

    async fn replay(
        &self,
        request: api::ReplayRequest,
    ) -> Result<api::ReplayOutcome, api::AdminError> {
        Ok(api::ReplayOutcome {
            replayed: request.ids.map_or(3, |ids| ids.len() as u64),
            topic: request.topic,
        })
    }

    async fn check(&self) -> Result<api::CheckReport, api::AdminError> {
        Ok(api::CheckReport::new(vec![
            api::CheckItem {
                name: "orders placed = orders terminal".into(),
                ok: true,
                detail: "3 = 3".into(),
            },
            api::CheckItem {
                name: "no duplicate charge".into(),
                ok: false,
                detail: "o-7 charged twice".into(),
            },
        ]))
    }
}

#[tokio::test]
async fn cli_operator_commands_print_what_the_admin_answers() {
    let s = shop_with(Arc::new(FullAdmin)).await;
    let url = s.api.rest_url.as_str();
    let o = shop_cli(&["sagas", "--state", "needs_attention", "--url", url]).await;
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    for want in [
        "o-saga",
        "place-order",
        "needs_attention",
        "refund kept failing",
    ] {
        assert!(out.contains(want), "sagas lacks {want}: {out}");
    }
    let o = shop_cli(&["sagas", "--state", "lost", "--url", url]).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("`state`"), "{:?}", text(&o));
    let o = shop_cli(&["dlq", "list", "--topic", "shop.shipping", "--url", url]).await;
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    for want in [
        "shop.shipping",
        "o-poison",
        "payload does not decode",
        "ATTEMPTS",
    ] {
        assert!(out.contains(want), "dlq list lacks {want}: {out}");
    }
    let o = shop_cli(&["dlq", "replay", "--topic", "shop.orders", "--url", url]).await;
    assert!(text(&o).0.contains("replayed 3"), "{:?}", text(&o));
    let id = switchyard::MessageId::new().to_string();
    let o = shop_cli(&[
        "dlq",
        "replay",
        "--topic",
        "shop.orders",
        "--id",
        &id,
        "--url",
        url,
    ])
    .await;
    assert!(text(&o).0.contains("replayed 1"), "{:?}", text(&o));
    let o = shop_cli(&["check", "--url", url]).await;
    assert_eq!(o.status.code(), Some(5), "{:?}", text(&o));
    let (out, err) = text(&o);
    assert!(
        out.contains("FAILED") && out.contains("o-7 charged twice"),
        "{out}"
    );
    assert!(err.contains("1 check(s) failed"), "{err}");
    let o = shop_cli(&["check", "--json", "--url", url]).await;
    let report: api::CheckReport = serde_json::from_slice(&o.stdout).unwrap();
    assert!(!report.ok);
}
