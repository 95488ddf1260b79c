use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::{get, post};
use serde_json::{Value, json};
use switchyard_rpc::balance::BalanceConfig;
use switchyard_rpc::breaker::{BreakerConfig, BreakerState};
use switchyard_rpc::context::TraceParent;
use switchyard_rpc::registry::{InProcessRegistry, StaticRegistry};
use switchyard_rpc::{CallContext, CallOptions, ClientConfig, ErrorKind, HttpClient};

use crate::support::{Counter, spawn};

fn fast_config() -> ClientConfig {
    ClientConfig {
        backoff_base: Duration::from_millis(5),
        backoff_max: Duration::from_millis(20),
        ..ClientConfig::default()
    }
}

fn client(reg: StaticRegistry, cfg: ClientConfig) -> HttpClient {
    HttpClient::with_config(Arc::new(reg), cfg)
}

#[tokio::test]
async fn callee_sees_the_propagated_deadline_and_context() {
    let app = Router::new().route(
        "/echo",
        get(|ctx: CallContext| async move {
            axum::Json(json!({
                "remaining_ms": ctx.remaining().map(|d| d.as_millis() as u64),
                "traceparent": ctx.traceparent.map(|t| t.to_string()),
                "correlation_id": ctx.correlation_id,
            }))
        }),
    );
    let s = spawn(app).await;
    let c = client(
        StaticRegistry::default().with("echo", &s.url),
        fast_config(),
    );
    let parent = TraceParent::new_root();
    let ctx = CallContext {
        traceparent: Some(parent),
        correlation_id: Some("order-42".into()),
        ..CallContext::default()
    };
    let v: Value = c
        .service("echo")
        .get_json_with(
            "/echo",
            &CallOptions::new()
                .timeout(Duration::from_secs(2))
                .context(ctx),
        )
        .await
        .unwrap();
    let remaining = v["remaining_ms"].as_u64().unwrap();
    assert!(remaining > 0 && remaining <= 2000, "{v}");
    let tp = TraceParent::parse(v["traceparent"].as_str().unwrap()).unwrap();
    assert_eq!(tp.trace_id, parent.trace_id);
    assert_ne!(tp.span_id, parent.span_id);
    assert_eq!(v["correlation_id"], "order-42");
}

#[tokio::test]
async fn raw_call_names_the_instance_that_answered() {
    let app = Router::new().route("/ok", get(|| async { "ok" }));
    let s = spawn(app).await;
    let c = client(StaticRegistry::default().with("ok", &s.url), fast_config());
    let svc = c.service("ok");
    for _ in 0..2 {
        let r = svc
            .call(axum::http::Method::GET, "/ok", None, &CallOptions::new())
            .await
            .unwrap();
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(&*r.instance, s.url.as_str());
        assert_eq!(&r.body[..], b"ok");
    }
}

#[tokio::test]
async fn timeout_fires_and_expired_deadline_fails_fast_without_sending() {
    let hits = Counter::default();
    let h = hits.clone();
    let app = Router::new().route(
        "/slow",
        get(move || {
            h.inc();
            async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                "late"
            }
        }),
    );
    let s = spawn(app).await;
    let c = client(
        StaticRegistry::default().with("slow", &s.url),
        fast_config(),
    );
    let err = c
        .service("slow")
        .get_json_with::<Value>(
            "/slow",
            &CallOptions::new().timeout(Duration::from_millis(200)),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::DeadlineExceeded, "{err}");
    let before = hits.get();
    assert!(before >= 1);
    // A caller whose own deadline has passed: nothing is sent.
    let expired = CallContext {
        deadline: Some(switchyard::Timestamp::from_unix_micros(1_000_000)),
        ..CallContext::default()
    };
    let err = c
        .service("slow")
        .get_json_with::<Value>("/slow", &CallOptions::new().context(expired))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::DeadlineExceeded);
    assert_eq!(hits.get(), before);
}

fn always_503(hits: Counter) -> Router {
    Router::new().route(
        "/pay",
        post(move || {
            hits.inc();
            async {
                switchyard_rpc::Problem::new(
                    "https://switchyard.dev/problems/unavailable",
                    StatusCode::SERVICE_UNAVAILABLE,
                    "down",
                )
            }
        }),
    )
}

#[tokio::test]
async fn non_idempotent_post_without_key_is_never_retried() {
    let hits = Counter::default();
    let s = spawn(always_503(hits.clone())).await;
    let c = client(
        StaticRegistry::default().with("payment", &s.url),
        fast_config(),
    );
    let err = c
        .service("payment")
        .post_json::<_, Value>("/pay", &json!({"amount": 1}))
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::SERVICE_UNAVAILABLE));
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    assert_eq!(err.problem().unwrap().title, "down");
    assert_eq!(hits.get(), 1);
    // The same POST with a key is retried (3 attempts).
    let _ = c
        .service("payment")
        .post_json_with::<_, Value>(
            "/pay",
            &json!({"amount": 1}),
            &CallOptions::new().idempotency_key("k-1"),
        )
        .await
        .unwrap_err();
    assert_eq!(hits.get(), 1 + 3);
}

#[tokio::test]
async fn breaker_opens_fails_fast_half_opens_and_closes() {
    let hits = Counter::default();
    let healthy = Arc::new(AtomicBool::new(false));
    let (h, ok) = (hits.clone(), healthy.clone());
    let app = Router::new().route(
        "/x",
        get(move || {
            h.inc();
            let ok = ok.load(Ordering::SeqCst);
            async move {
                if ok {
                    (StatusCode::OK, "{}")
                } else {
                    (StatusCode::INTERNAL_SERVER_ERROR, "{}")
                }
            }
        }),
    );
    let s = spawn(app).await;
    let cfg = ClientConfig {
        breaker: BreakerConfig {
            failure_threshold: 3,
            failure_rate_percent: 50,
            window: Duration::from_secs(60),
            open_for: Duration::from_millis(300),
        },
        balance: BalanceConfig {
            eject_after: 1000,
            ..BalanceConfig::default()
        },
        ..fast_config()
    };
    let c = client(StaticRegistry::default().with("x", &s.url), cfg);
    let svc = c.service("x");
    for _ in 0..3 {
        let e = svc.get_json::<Value>("/x").await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Server);
    }
    assert_eq!(hits.get(), 3);
    assert_eq!(
        svc.breaker_states(),
        vec![(s.url.clone(), BreakerState::Open)]
    );
    assert_eq!(c.breaker_states()[0].2, BreakerState::Open);
    // Open: fails fast, nothing reaches the server.
    for _ in 0..5 {
        let e = svc.get_json::<Value>("/x").await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::CircuitOpen, "{e}");
    }
    assert_eq!(hits.get(), 3);
    // After the cool-off the probe passes and closes the breaker.
    healthy.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(svc.breaker_states()[0].1, BreakerState::HalfOpen);
    let _: Value = svc.get_json("/x").await.unwrap();
    assert_eq!(hits.get(), 4);
    assert_eq!(svc.breaker_states()[0].1, BreakerState::Closed);
}

#[tokio::test]
async fn failing_instance_is_ejected_and_traffic_moves_to_the_healthy_one() {
    let (bad_hits, good_hits) = (Counter::default(), Counter::default());
    let bh = bad_hits.clone();
    let bad = spawn(Router::new().route(
        "/x",
        get(move || {
            bh.inc();
            async { (StatusCode::INTERNAL_SERVER_ERROR, "{}") }
        }),
    ))
    .await;
    let gh = good_hits.clone();
    let good = spawn(Router::new().route(
        "/x",
        get(move || {
            gh.inc();
            async { "{}" }
        }),
    ))
    .await;
    let reg = InProcessRegistry::new();
    let _a = reg.register("x", &bad.url);
    let _b = reg.register("x", &good.url);
    let cfg = ClientConfig {
        balance: BalanceConfig {
            eject_after: 2,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(60),
        },
        breaker: BreakerConfig {
            failure_threshold: 1000,
            ..BreakerConfig::default()
        },
        ..fast_config()
    };
    let c = HttpClient::with_config(Arc::new(reg.clone()), cfg);
    let svc = c.service("x");
    let mut failures = 0;
    for _ in 0..40 {
        if svc.get_json::<Value>("/x").await.is_err() {
            failures += 1;
        }
    }
    assert!(bad_hits.get() <= 2, "bad got {}", bad_hits.get());
    assert_eq!(failures, bad_hits.get());
    assert_eq!(good_hits.get(), 40 - bad_hits.get());
    // Deregistered instances are no longer called.
    drop(_b);
    use switchyard_rpc::registry::Registry;
    assert_eq!(reg.instances("x").len(), 1);
}

#[tokio::test]
async fn unknown_service_and_stopped_instance() {
    let c = client(StaticRegistry::default(), fast_config());
    let e = c
        .service("nobody")
        .get_json::<Value>("/")
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable);
    // Nothing listens on this port any more: connect error, retried, then Unavailable.
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let c = client(
        StaticRegistry::default().with("gone", &format!("http://{addr}")),
        fast_config(),
    );
    let e = c.service("gone").get_json::<Value>("/").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
}

/// A hand-written HTTP/1.1 server that answers `{}` to every request and closes each
/// connection after `per_connection` answers, without saying so (no `connection:
/// close`), as a server ending idle keep-alive connections does; or, with `say_close`,
/// announcing it on the last answer. Returns its URL and the count of connections taken.
async fn closing_server(per_connection: usize, say_close: bool) -> (String, Counter) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let accepted = Counter::default();
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            count.inc();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                for answered in 1..=per_connection {
                    // One request: its head, then `content-length` bytes of body.
                    let head_end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        let mut chunk = [0u8; 4096];
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse().unwrap());
                    while buf.len() < head_end + len {
                        let mut chunk = [0u8; 4096];
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    buf.drain(..head_end + len);
                    let close = if say_close && answered == per_connection {
                        "connection: close\r\n"
                    } else {
                        ""
                    };
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n{close}\r\n{{}}"
                    );
                    if conn.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
                // Closed after the last answer.
            });
        }
    });
    (url, accepted)
}

/// Calls reuse an idle keep-alive connection; one the server closed is not used again,
/// so even calls that may never be retried (a POST without a key) all succeed.
#[tokio::test]
async fn keep_alive_connections_are_reused_and_closed_ones_are_not() {
    for say_close in [false, true] {
        let (url, accepted) = closing_server(3, say_close).await;
        let c = client(StaticRegistry::default().with("svc", &url), fast_config());
        let svc = c.service("svc");
        for i in 0..10 {
            let r: Result<Value, _> = svc.post_json("/pay", &json!({ "n": i })).await;
            assert!(r.is_ok(), "call {i} (say_close {say_close}): {r:?}");
            // Time for the client to see a connection the server closed (one closed
            // under a request already written is the race no client can win).
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Three answers per connection: ten calls need four, not ten.
        assert_eq!(accepted.get(), 4, "say_close {say_close}");
    }
}

/// An instance registered with a path (`http://host:port/api`) gets it before every
/// request's path.
#[tokio::test]
async fn an_instance_url_with_a_path_prefixes_every_request() {
    let app = Router::new().route("/api/ok", get(|| async { axum::Json(json!("prefixed")) }));
    let s = spawn(app).await;
    let c = client(
        StaticRegistry::default().with("svc", &format!("{}/api", s.url)),
        fast_config(),
    );
    let v: Value = c.service("svc").get_json("/ok").await.unwrap();
    assert_eq!(v, "prefixed");
}

/// An instance URL the client cannot call (TLS is not built in) fails as a connect
/// error naming the URL; nothing is sent.
#[tokio::test]
async fn an_https_instance_is_a_connect_error_that_says_why() {
    let c = client(
        StaticRegistry::default().with("svc", "https://127.0.0.1:1"),
        fast_config(),
    );
    let e = c.service("svc").get_json::<Value>("/").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert!(!e.outcome_unknown(), "{e}");
    assert!(e.to_string().contains("plain `http`"), "{e}");
}
