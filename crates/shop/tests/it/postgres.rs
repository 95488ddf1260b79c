//! The shop with its six stores on a real PostgreSQL (one schema per service), started by
//! the test on a loopback port: every pattern through a chaos bus (duplicates,
//! redeliveries, delays), then a restart on the same database.

use std::time::{Duration, Instant};

use shop::app::{AppConfig, ShopApp, StoreBackend};
use switchyard_testkit::servers::Postgres;

use crate::patterns::{chaos_bus, diverged, mixed, settled};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_orders_keep_every_invariant_with_the_stores_on_postgres() {
    let Some(pg) = Postgres::start().expect("start PostgreSQL") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = |seed| {
        let mut c = AppConfig::new(dir.path())
            .with_bus(chaos_bus(dir.path(), seed))
            .with_store(StoreBackend::Postgres(pg.url()));
        c.stall_after = Duration::from_millis(500);
        c
    };

    let app = ShopApp::start(config(5)).await.unwrap();
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..16 {
        let desk = app.desk().clone();
        workers.push(tokio::spawn(async move {
            for i in (w..500).step_by(16) {
                desk.place(&mixed(i, "pg")).await.unwrap();
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    let report = settled(&app, Duration::from_secs(120)).await;
    println!(
        "500 mixed orders on PostgreSQL: settled in {:?}; {:?}",
        started.elapsed(),
        report.orders
    );
    assert!(report.is_settled(), "{report:#?}");
    assert_eq!(report.orders.values().sum::<u64>(), 500);
    assert_eq!(app.diverged_events(), 0, "{:#?}", diverged(&app).await);
    app.shutdown().await.unwrap();

    // The state lives in the database: a new process finds every order, and more orders
    // keep the invariants.
    let app = ShopApp::start(config(6)).await.unwrap();
    for i in 500..600 {
        app.desk().place(&mixed(i, "pg")).await.unwrap();
    }
    let report = settled(&app, Duration::from_secs(120)).await;
    assert!(report.is_settled(), "{report:#?}");
    assert_eq!(report.orders.values().sum::<u64>(), 600);
    app.shutdown().await.unwrap();
}
