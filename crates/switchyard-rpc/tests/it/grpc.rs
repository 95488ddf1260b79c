//! The gRPC equivalents of the HTTP client and server tests: real tonic servers on
//! 127.0.0.1 port 0, called by name through `GrpcClient`.

use std::sync::Arc;
use std::time::Duration;

use switchyard_rpc::balance::BalanceConfig;
use switchyard_rpc::breaker::{BreakerConfig, BreakerState};
use switchyard_rpc::context::TraceParent;
use switchyard_rpc::grpc::echo::{EchoClient, EchoRequest, EchoService};
use switchyard_rpc::grpc::{GrpcChannel, GrpcClient, GrpcRequestExt, GrpcServer};
use switchyard_rpc::registry::{InProcessRegistry, Registry, StaticRegistry};
use switchyard_rpc::{CallContext, CallOptions, ClientConfig, ErrorKind};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::Code;

/// An Echo server on a loopback port; stopped (gracefully) on drop.
struct EchoServerHandle {
    url: String,
    svc: EchoService,
    stop: Option<oneshot::Sender<()>>,
}

impl Drop for EchoServerHandle {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

async fn spawn_echo() -> EchoServerHandle {
    spawn_echo_on(TcpListener::bind("127.0.0.1:0").await.unwrap())
}

fn spawn_echo_on(listener: TcpListener) -> EchoServerHandle {
    let addr = listener.local_addr().unwrap();
    let svc = EchoService::new();
    let server = GrpcServer::new("echo").add_service(svc.clone().server());
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(async move {
        server
            .serve(listener, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
    });
    EchoServerHandle {
        url: format!("http://{addr}"),
        svc,
        stop: Some(tx),
    }
}

fn fast_config() -> ClientConfig {
    ClientConfig {
        backoff_base: Duration::from_millis(5),
        backoff_max: Duration::from_millis(20),
        ..ClientConfig::default()
    }
}

fn echo_client(reg: impl Registry, cfg: ClientConfig) -> (GrpcClient, EchoClient<GrpcChannel>) {
    let c = GrpcClient::with_config(Arc::new(reg), cfg);
    let e = EchoClient::new(c.channel("echo"));
    (c, e)
}

fn req(message: &str) -> EchoRequest {
    EchoRequest {
        message: message.into(),
        ..EchoRequest::default()
    }
}

#[tokio::test]
async fn grpc_callee_sees_the_propagated_deadline_and_context() {
    let s = spawn_echo().await;
    let (_c, mut echo) = echo_client(
        StaticRegistry::default().with("echo", &s.url),
        fast_config(),
    );
    let parent = TraceParent::new_root();
    let ctx = CallContext {
        traceparent: Some(parent),
        correlation_id: Some("order-42".into()),
        ..CallContext::default()
    };
    let reply = echo
        .echo(
            tonic::Request::new(req("hi")).with_options(
                CallOptions::new()
                    .timeout(Duration::from_secs(2))
                    .context(ctx)
                    .idempotency_key("k-ctx"),
            ),
        )
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.message, "hi");
    assert!(
        reply.remaining_ms > 0 && reply.remaining_ms <= 2000,
        "{reply:?}"
    );
    assert_eq!(reply.trace_id, parent.trace_id_hex());
    assert_eq!(reply.correlation_id, "order-42");
    assert_eq!(reply.idempotency_key, "k-ctx");
    // tonic's own `set_timeout` is honoured as the budget too.
    let mut r = tonic::Request::new(req("hi"));
    r.set_timeout(Duration::from_millis(500));
    let reply = echo.echo(r).await.unwrap().into_inner();
    assert!(
        reply.remaining_ms > 0 && reply.remaining_ms <= 500,
        "{reply:?}"
    );
    assert_eq!(reply.trace_id.len(), 32);
}

#[tokio::test]
async fn grpc_timeout_fires_and_the_callee_is_cancelled() {
    let s = spawn_echo().await;
    let (c, mut echo) = echo_client(
        StaticRegistry::default().with("echo", &s.url),
        fast_config(),
    );
    let started = std::time::Instant::now();
    let status = echo
        .echo(
            tonic::Request::new(EchoRequest {
                delay_ms: 30_000,
                ..req("slow")
            })
            .with_options(CallOptions::new().timeout(Duration::from_millis(200))),
        )
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    let err = c.channel("echo").error(status);
    assert_eq!(err.kind(), ErrorKind::DeadlineExceeded);
    assert!(s.svc.hits() >= 1);
    // The callee's deadline layer cancelled the handler: its effect never ran.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(s.svc.effects(), 0);
    // An expired caller deadline: nothing is sent.
    let hits = s.svc.hits();
    let expired = CallContext {
        deadline: Some(switchyard::Timestamp::from_unix_micros(1_000_000)),
        ..CallContext::default()
    };
    let status = echo
        .echo(tonic::Request::new(req("x")).with_options(CallOptions::new().context(expired)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded);
    assert_eq!(s.svc.hits(), hits);
}

#[tokio::test]
async fn grpc_retry_with_key_does_not_duplicate_the_effect_and_no_key_is_never_retried() {
    let s = spawn_echo().await;
    let cfg = ClientConfig {
        breaker: BreakerConfig {
            failure_threshold: 1000,
            ..BreakerConfig::default()
        },
        balance: BalanceConfig {
            eject_after: 1000,
            ..BalanceConfig::default()
        },
        ..fast_config()
    };
    let (c, mut echo) = echo_client(StaticRegistry::default().with("echo", &s.url), cfg);
    let failing = || EchoRequest {
        fail: true,
        ..req("pay")
    };
    // No key, not marked idempotent: one attempt only.
    let status = echo.echo(tonic::Request::new(failing())).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(
        c.channel("echo").error(status).kind(),
        ErrorKind::Unavailable
    );
    assert_eq!(s.svc.hits(), 1);
    // With a key: retried (3 attempts), the effect ran once for the key.
    let _ = echo
        .echo(
            tonic::Request::new(failing()).with_options(CallOptions::new().idempotency_key("k-1")),
        )
        .await
        .unwrap_err();
    assert_eq!(s.svc.hits(), 1 + 3);
    assert_eq!(s.svc.effects_for("k-1"), 1);
    // Marked idempotent: retried too.
    let _ = echo
        .echo(tonic::Request::new(failing()).with_options(CallOptions::new().idempotent()))
        .await
        .unwrap_err();
    assert_eq!(s.svc.hits(), 4 + 3);
    // A key set directly in the metadata counts as well.
    let mut r = tonic::Request::new(failing());
    r.metadata_mut()
        .insert("idempotency-key", "k-2".parse().unwrap());
    let _ = echo.echo(r).await.unwrap_err();
    assert_eq!(s.svc.hits(), 7 + 3);
    assert_eq!(s.svc.effects_for("k-2"), 1);
}

/// A connection that breaks after the request went out leaves the outcome unknown (the
/// callee may have acted: ask again with the same key); the callee's own UNAVAILABLE
/// answer does not.
#[tokio::test]
async fn grpc_outcome_is_unknown_when_the_connection_breaks_after_sending() {
    use tokio::io::AsyncReadExt;
    // A "server" that reads the request and then drops the connection, as a callee
    // killed mid-call does.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let mut buf = vec![0u8; 4096];
            let mut read = 0;
            // The preface, SETTINGS and the request's HEADERS and DATA frames.
            while read < 100 {
                match tokio::time::timeout(Duration::from_secs(2), conn.read(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => read += n,
                    _ => break,
                }
            }
            drop(conn);
        }
    });
    let (c, mut echo) = echo_client(StaticRegistry::default().with("echo", &url), fast_config());
    let status = echo
        .echo(tonic::Request::new(req("pay")))
        .await
        .unwrap_err();
    let e = c.channel("echo").error(status);
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert!(e.outcome_unknown(), "{e}");

    let s = spawn_echo().await;
    let (c, mut echo) = echo_client(
        StaticRegistry::default().with("echo", &s.url),
        fast_config(),
    );
    let failing = EchoRequest {
        fail: true,
        ..req("pay")
    };
    let status = echo.echo(tonic::Request::new(failing)).await.unwrap_err();
    let e = c.channel("echo").error(status);
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert!(!e.outcome_unknown(), "{e}");
}

/// A call that may not be retried sends its body as it comes (unbuffered); one that may
/// be retried is buffered once. Both arrive whole, also when larger than one frame.
#[tokio::test]
async fn grpc_bodies_arrive_whole_buffered_or_not() {
    let s = spawn_echo().await;
    let (_c, mut echo) = echo_client(
        StaticRegistry::default().with("echo", &s.url),
        fast_config(),
    );
    let big = "x".repeat(256 * 1024);
    let plain = echo.echo(tonic::Request::new(req(&big))).await.unwrap();
    assert_eq!(plain.get_ref().message, big);
    let keyed = echo
        .echo(tonic::Request::new(req(&big)).with_options(CallOptions::new().idempotency_key("k")))
        .await
        .unwrap();
    assert_eq!(keyed.get_ref().message, big);
    assert_eq!(keyed.get_ref().idempotency_key, "k");
    assert_eq!(s.svc.hits(), 2);
}

/// Neither a buffered (retryable) nor a streamed request carries `content-length`
/// (gRPC messages carry their own length; the header only cost HPACK literals), and
/// the message, key, trace and correlation id still arrive.
#[tokio::test]
async fn grpc_requests_carry_no_content_length_and_everything_else_arrives() {
    use std::sync::Mutex;
    use switchyard_rpc::grpc::echo::EchoServer;

    /// What the server saw of one call: `content-length`, `idempotency-key`,
    /// `x-correlation-id`, whether `traceparent` came.
    type Seen = (bool, Option<String>, Option<String>, bool);
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let record = seen.clone();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let svc = EchoServer::with_interceptor(EchoService::new(), move |r: tonic::Request<()>| {
        let m = r.metadata();
        let text = |name: &str| m.get(name).and_then(|v| v.to_str().ok()).map(String::from);
        record.lock().unwrap().push((
            m.contains_key("content-length"),
            text("idempotency-key"),
            text("x-correlation-id"),
            m.contains_key("traceparent"),
        ));
        Ok(r)
    });
    let (tx, rx) = oneshot::channel::<()>();
    // A plain tonic server: what the client sends is under test, not our server.
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = rx.await;
            }),
    );
    let (_c, mut echo) = echo_client(StaticRegistry::default().with("echo", &url), fast_config());
    let ctx = CallContext {
        correlation_id: Some("order-7".into()),
        ..CallContext::default()
    };
    // Keyed: retryable, so its message is buffered; plain: streamed.
    let keyed = echo
        .echo(
            tonic::Request::new(req("keyed")).with_options(
                CallOptions::new()
                    .idempotency_key("k-1")
                    .context(ctx.clone()),
            ),
        )
        .await
        .unwrap();
    assert_eq!(keyed.get_ref().message, "keyed");
    let plain = echo
        .echo(tonic::Request::new(req("plain")).with_options(CallOptions::new().context(ctx)))
        .await
        .unwrap();
    assert_eq!(plain.get_ref().message, "plain");
    let order = Some("order-7".to_string());
    assert_eq!(
        *seen.lock().unwrap(),
        vec![
            (false, Some("k-1".to_string()), order.clone(), true),
            (false, None, order, true),
        ]
    );
    let _ = tx.send(());
}

#[tokio::test]
async fn grpc_invalid_input_is_invalid_argument_naming_the_field() {
    let s = spawn_echo().await;
    let (c, mut echo) = echo_client(
        StaticRegistry::default().with("echo", &s.url),
        fast_config(),
    );
    let status = echo.echo(tonic::Request::new(req(""))).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("message"), "{status:?}");
    let err = c.channel("echo").error(status);
    assert_eq!(err.kind(), ErrorKind::Rejected);
    assert_eq!(err.field(), Some("message"));
    // Not a failure of the instance: the breaker stays closed.
    assert_eq!(
        c.channel("echo").breaker_states()[0].1,
        BreakerState::Closed
    );
}

#[tokio::test]
async fn grpc_breaker_opens_fails_fast_half_opens_and_closes() {
    let s = spawn_echo().await;
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
    let (c, mut echo) = echo_client(StaticRegistry::default().with("echo", &s.url), cfg);
    let ch = c.channel("echo");
    let failing = || EchoRequest {
        fail: true,
        ..req("x")
    };
    for _ in 0..3 {
        let st = echo.echo(tonic::Request::new(failing())).await.unwrap_err();
        assert_eq!(st.code(), Code::Unavailable);
    }
    assert_eq!(s.svc.hits(), 3);
    assert_eq!(
        ch.breaker_states(),
        vec![(s.url.clone(), BreakerState::Open)]
    );
    for _ in 0..5 {
        let st = echo.echo(tonic::Request::new(req("x"))).await.unwrap_err();
        assert_eq!(ch.error(st).kind(), ErrorKind::CircuitOpen);
    }
    assert_eq!(s.svc.hits(), 3);
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(ch.breaker_states()[0].1, BreakerState::HalfOpen);
    echo.echo(tonic::Request::new(req("x"))).await.unwrap();
    assert_eq!(s.svc.hits(), 4);
    assert_eq!(ch.breaker_states()[0].1, BreakerState::Closed);
}

#[tokio::test]
async fn grpc_failing_instance_is_ejected_and_traffic_moves() {
    let good = spawn_echo().await;
    // The bad instance: nothing listens there any more (connection refused).
    let bad_url = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let reg = InProcessRegistry::new();
    let _a = reg.register("echo", &bad_url);
    let _b = reg.register("echo", &good.url);
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
    let (_c, mut echo) = echo_client(reg.clone(), cfg);
    let mut failures = 0;
    for _ in 0..40 {
        // Not retryable: a failure on the bad instance surfaces.
        if echo.echo(tonic::Request::new(req("x"))).await.is_err() {
            failures += 1;
        }
    }
    assert!(failures <= 2, "failures {failures}");
    assert_eq!(good.svc.hits(), 40 - failures);
}

#[tokio::test]
async fn grpc_health_is_served() {
    let s = spawn_echo().await;
    let ch = tonic::transport::Endpoint::from_shared(s.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
    for name in ["", "switchyard.test.v1.Echo"] {
        let r = h
            .check(tonic_health::pb::HealthCheckRequest {
                service: name.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
    }
}

/// The callee restarts on the same port: the client's connection to the old process
/// ended, and the next call — one that may not be retried — goes out on a new one.
#[tokio::test]
async fn grpc_calls_reconnect_after_the_callee_restarts() {
    let first = spawn_echo().await;
    let addr: std::net::SocketAddr = first.url.trim_start_matches("http://").parse().unwrap();
    let (_c, mut echo) = echo_client(
        StaticRegistry::default().with("echo", &first.url),
        fast_config(),
    );
    echo.echo(tonic::Request::new(req("one"))).await.unwrap();
    assert_eq!(first.svc.hits(), 1);
    // A graceful stop: GOAWAY, then the connection closes.
    drop(first);
    let mut listener = None;
    for _ in 0..250 {
        match TcpListener::bind(addr).await {
            Ok(l) => {
                listener = Some(l);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let second = spawn_echo_on(listener.expect("the port is free again within 5 s"));
    // Time for the client to see its old connection end.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let two = echo.echo(tonic::Request::new(req("two"))).await;
    assert_eq!(
        two.map(|r| r.into_inner().message).ok().as_deref(),
        Some("two")
    );
    assert_eq!(second.svc.hits(), 1);
}
