//! The NATS service registry against a real nats-server (one per test): registration,
//! deregistration, a killed process expiring after the TTL, late clients, a server
//! restart, and `switchyard-rpc`'s client balancing over registered axum servers.
//!
//! Waits have a generous ceiling only so that a broken build fails instead of hanging;
//! nothing asserts how long anything took.

use std::collections::BTreeSet;
use std::process::Stdio;
use std::time::Duration;

use switchyard_nats::registry::{NatsRegistry, RegisterOptions, RegistryConfig};
use switchyard_rpc::registry::{Instance, Registry};
use switchyard_testkit::servers::NatsServer;
use tokio::io::{AsyncBufReadExt, BufReader};

/// Ceiling of every wait (a hung test fails instead of running forever).
const CEILING: Duration = Duration::from_secs(120);

fn server() -> Option<NatsServer> {
    let s = NatsServer::start().expect("start nats-server");
    if s.is_none() {
        println!("nats-server not installed: test skipped");
    }
    s
}

fn config(url: &str, ttl: Duration) -> RegistryConfig {
    let mut c = RegistryConfig::new(url);
    c.ttl = ttl;
    c
}

fn urls(r: &NatsRegistry, service: &str) -> BTreeSet<String> {
    r.instances(service).iter().map(|i| i.url.clone()).collect()
}

fn set(v: &[&str]) -> BTreeSet<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Waits until `cond` holds on `r`'s view, woken by its change counter (and every 100 ms,
/// for conditions on things other than the view).
async fn wait_until(r: &NatsRegistry, what: &str, cond: impl Fn(&NatsRegistry) -> bool) {
    let mut changes = r.changes();
    let r2 = r.clone();
    let waited = tokio::time::timeout(CEILING, async move {
        while !cond(&r2) {
            let _ = tokio::time::timeout(Duration::from_millis(100), changes.changed()).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "gave up waiting for: {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_are_listed_and_a_stopped_one_goes_at_once() {
    let Some(server) = server() else { return };
    // A TTL far longer than the test's ceiling: only the delete can remove an entry here.
    let ttl = Duration::from_secs(3600);
    let watcher = NatsRegistry::connect(config(&server.url(), ttl))
        .await
        .unwrap();
    let owner = NatsRegistry::connect(config(&server.url(), ttl))
        .await
        .unwrap();
    let mut meta = RegisterOptions::default();
    meta.metadata.insert("zone".into(), "a".into());
    let a = owner
        .register_with("payment", "http://127.0.0.1:7003/", meta)
        .await
        .unwrap();
    let b = owner
        .register("payment", "http://127.0.0.1:7013")
        .await
        .unwrap();
    assert_eq!(watcher.ttl(), ttl);
    wait_until(&watcher, "both instances listed", |r| {
        r.instances("payment").len() == 2
    })
    .await;
    assert_eq!(
        urls(&watcher, "payment"),
        set(&["http://127.0.0.1:7003", "http://127.0.0.1:7013"])
    );
    let entries = watcher.entries("payment");
    let ea = entries.iter().find(|e| e.id == a.id()).unwrap();
    assert_eq!(ea.metadata.get("zone").map(String::as_str), Some("a"));
    assert_eq!(ea.url, "http://127.0.0.1:7003");
    assert_eq!(watcher.services(), vec!["payment".to_string()]);
    // The snapshot is shared until the set changes.
    let s1 = watcher.instances("payment");
    let s2 = watcher.instances("payment");
    assert!(std::sync::Arc::ptr_eq(&s1, &s2));
    assert!(watcher.instances("nobody").is_empty());

    a.stop().await.unwrap();
    wait_until(&watcher, "the stopped instance gone", |r| {
        r.instances("payment").len() == 1
    })
    .await;
    assert_eq!(
        *watcher.instances("payment"),
        [Instance::new("http://127.0.0.1:7013")]
    );
    // A client starting now reads the server's state: the deletion is stored there.
    let late = NatsRegistry::connect(config(&server.url(), ttl))
        .await
        .unwrap();
    assert_eq!(urls(&late, "payment"), set(&["http://127.0.0.1:7013"]));

    // Dropping a registration deregisters it too.
    drop(b);
    wait_until(&watcher, "the dropped instance gone", |r| {
        r.instances("payment").is_empty()
    })
    .await;
    assert!(watcher.services().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_started_after_registration_sees_it_at_once() {
    let Some(server) = server() else { return };
    let owner = NatsRegistry::connect(config(&server.url(), Duration::from_secs(3600)))
        .await
        .unwrap();
    let _r = owner
        .register("inventory", "http://127.0.0.1:7004")
        .await
        .unwrap();
    let _s = owner
        .register("shipping", "http://127.0.0.1:7005")
        .await
        .unwrap();
    // `connect` returns after the replay: no waiting.
    let late = NatsRegistry::connect(config(&server.url(), Duration::from_secs(1)))
        .await
        .unwrap();
    assert_eq!(urls(&late, "inventory"), set(&["http://127.0.0.1:7004"]));
    assert_eq!(urls(&late, "shipping"), set(&["http://127.0.0.1:7005"]));
    // The bucket's TTL is the first creator's.
    assert_eq!(late.ttl(), Duration::from_secs(3600));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_names_are_rejected_with_a_typed_error() {
    let Some(server) = server() else { return };
    let r = NatsRegistry::connect(RegistryConfig::new(server.url()))
        .await
        .unwrap();
    use switchyard_nats::registry::RegistryErrorKind::Invalid;
    let e = r.register("a.b", "http://x:1").await.unwrap_err();
    assert_eq!(e.kind(), Invalid);
    let e = r.register("pay", "ftp://x:1").await.unwrap_err();
    assert_eq!(e.kind(), Invalid);
    let opts = RegisterOptions {
        id: Some("has space".into()),
        ..Default::default()
    };
    let e = r
        .register_with("pay", "http://x:1", opts)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), Invalid);
    let e = NatsRegistry::connect(RegistryConfig::new("nats://127.0.0.1:1"))
        .await
        .unwrap_err();
    assert_eq!(
        e.kind(),
        switchyard_nats::registry::RegistryErrorKind::Connect
    );
}

const CHILD_URL: &str = "SY_REGISTRY_CHILD_NATS";

/// The child process of the kill test: registers and waits to be killed (does nothing
/// unless started as that child).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_child() {
    let Ok(url) = std::env::var(CHILD_URL) else {
        return;
    };
    let r = NatsRegistry::connect(RegistryConfig::new(url))
        .await
        .unwrap();
    let reg = r.register("orders", "http://127.0.0.1:7999").await.unwrap();
    println!("REGISTERED {}", reg.id());
    tokio::time::sleep(Duration::from_secs(3600)).await;
    drop(reg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_process_disappears_after_the_ttl() {
    let Some(server) = server() else { return };
    let ttl = Duration::from_secs(2);
    // Creates the bucket with this TTL; the child reads it from the bucket.
    let watcher = NatsRegistry::connect(config(&server.url(), ttl))
        .await
        .unwrap();
    let live = watcher
        .register("orders", "http://127.0.0.1:7001")
        .await
        .unwrap();
    wait_until(&watcher, "the live one listed", |r| {
        !r.instances("orders").is_empty()
    })
    .await;
    let live_revision = watcher.entries("orders")[0].revision;
    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args(["registry::registry_child", "--exact", "--nocapture"])
        .env(CHILD_URL, server.url())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let id = tokio::time::timeout(CEILING, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(id) = line.strip_prefix("REGISTERED ") {
                return id.to_string();
            }
        }
        panic!("the child exited without registering");
    })
    .await
    .expect("the child registers");
    wait_until(&watcher, "the child listed", |r| {
        r.entries("orders").iter().any(|e| e.id == id)
    })
    .await;
    assert_eq!(
        urls(&watcher, "orders"),
        set(&["http://127.0.0.1:7001", "http://127.0.0.1:7999"])
    );

    // SIGKILL by pid: no deregistration, the heartbeat just stops.
    child.kill().await.unwrap();
    wait_until(&watcher, "the killed child expired", |r| {
        r.instances("orders").len() == 1
    })
    .await;
    assert_eq!(urls(&watcher, "orders"), set(&["http://127.0.0.1:7001"]));
    // The live one stayed, heartbeating (its entry was put again meanwhile).
    assert!(watcher.entries("orders")[0].revision > live_revision);
    // The server expired it too: a fresh client does not see it.
    let late = NatsRegistry::connect(config(&server.url(), ttl))
        .await
        .unwrap();
    assert!(late.entries("orders").iter().all(|e| e.id != id));
    live.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_and_the_watcher_recover_from_a_server_restart() {
    let Some(mut server) = server() else { return };
    let ttl = Duration::from_secs(2);
    let url = server.url();
    let owner = NatsRegistry::connect(config(&url, ttl)).await.unwrap();
    let watcher = NatsRegistry::connect(config(&url, ttl)).await.unwrap();
    let a = owner
        .register("payment", "http://127.0.0.1:1")
        .await
        .unwrap();
    let b = owner
        .register("payment", "http://127.0.0.1:2")
        .await
        .unwrap();
    wait_until(&watcher, "both listed", |r| {
        r.instances("payment").len() == 2
    })
    .await;
    let before = watcher
        .entries("payment")
        .iter()
        .map(|e| e.revision)
        .max()
        .unwrap();

    // A crash, and an outage longer than the TTL: the stored entries are past max_age
    // when the server comes back.
    tokio::task::block_in_place(|| server.kill()).unwrap();
    tokio::time::sleep(ttl * 2).await;
    // While disconnected the watcher keeps its last view instead of emptying it.
    assert_eq!(watcher.instances("payment").len(), 2);
    tokio::task::block_in_place(|| server.restart()).unwrap();

    // The heartbeats put the entries again (newer revisions than before the crash), and
    // the watcher follows the restarted server.
    wait_until(&watcher, "both re-put after the restart", |r| {
        let e = r.entries("payment");
        e.len() == 2 && e.iter().all(|e| e.revision > before)
    })
    .await;
    // The watch works after the restart: a new registration and a deregistration show.
    let c = owner
        .register("payment", "http://127.0.0.1:3")
        .await
        .unwrap();
    wait_until(&watcher, "the new instance listed", |r| {
        r.instances("payment").len() == 3
    })
    .await;
    a.stop().await.unwrap();
    wait_until(&watcher, "the stopped instance gone", |r| {
        urls(r, "payment") == set(&["http://127.0.0.1:2", "http://127.0.0.1:3"])
    })
    .await;
    // A fresh client agrees (the server has the re-put entries).
    let late = NatsRegistry::connect(config(&url, ttl)).await.unwrap();
    assert_eq!(
        urls(&late, "payment"),
        set(&["http://127.0.0.1:2", "http://127.0.0.1:3"])
    );
    b.stop().await.unwrap();
    c.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_client_balances_over_registered_servers() {
    use axum::routing::get;
    let Some(server) = server() else { return };
    let registry = NatsRegistry::connect(config(&server.url(), Duration::from_secs(3600)))
        .await
        .unwrap();
    let mut registrations = Vec::new();
    let mut stops = Vec::new();
    for n in 0..2u32 {
        let app = axum::Router::new().route(
            "/who",
            get(move || async move { axum::Json(serde_json::json!({ "server": n })) }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
        });
        stops.push(stop);
        registrations.push(registry.register("who", &url).await.unwrap());
    }
    wait_until(&registry, "both servers listed", |r| {
        r.instances("who").len() == 2
    })
    .await;
    let client = switchyard_rpc::HttpClient::new(registry.clone());
    let svc = client.service("who");
    let mut seen = BTreeSet::new();
    for _ in 0..200 {
        let v: serde_json::Value = svc.get_json("/who").await.unwrap();
        seen.insert(v["server"].as_u64().unwrap());
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(
        seen,
        BTreeSet::from([0, 1]),
        "calls reach both registered servers"
    );

    // Deregister server 0: every later call goes to server 1.
    let first = registrations.remove(0);
    first.stop().await.unwrap();
    wait_until(&registry, "server 0 gone", |r| {
        r.instances("who").len() == 1
    })
    .await;
    for _ in 0..20 {
        let v: serde_json::Value = svc.get_json("/who").await.unwrap();
        assert_eq!(v["server"], 1);
    }
    for s in stops {
        let _ = s.send(());
    }
}
