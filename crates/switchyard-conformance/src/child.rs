//! The child side of the crash cases: the test binary re-run with an environment
//! variable naming what to do, so the parent can SIGKILL it at any moment.

use std::path::PathBuf;
use std::time::Duration;

use switchyard::{Bus, Envelope, SubscribeOptions};

use crate::{BusFactory, Settings};

pub(crate) const MODE_VAR: &str = "SWITCHYARD_CONFORMANCE_CHILD";
pub(crate) const DIR_VAR: &str = "SWITCHYARD_CONFORMANCE_DIR";
pub(crate) const N_VAR: &str = "SWITCHYARD_CONFORMANCE_N";

/// Publishers in the crash case; the first half publish one by one, the rest in batches.
pub(crate) const PUBLISHERS: u64 = 8;

/// Entry point of the `conformance_child` test: does nothing unless the parent set the
/// mode variable, otherwise runs that mode and exits the process.
pub fn child_entry<F: BusFactory>(factory: &F) {
    let Ok(mode) = std::env::var(MODE_VAR) else {
        return;
    };
    // The harness printed a status line without a newline; start markers on a fresh line.
    println!();
    let dir = PathBuf::from(std::env::var(DIR_VAR).expect("child needs a directory"));
    let n: u64 = std::env::var(N_VAR)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let bus = factory.open(&dir, &Settings::default()).unwrap();
        match mode.as_str() {
            "publish-loop" => publish_loop(bus).await,
            "consume-hold" => consume_hold(bus).await,
            "consume-all" => consume_all(bus, n).await,
            other => panic!("unknown child mode {other}"),
        }
    });
    std::process::exit(0);
}

pub(crate) fn message(p: u64, seq: u64) -> Envelope {
    Envelope::new(
        "crash.v1",
        "/conformance",
        "application/json",
        format!("{{\"p\":{p},\"seq\":{seq}}}"),
    )
    .with_subject(format!("p{p}"))
}

async fn publish_loop<B: Bus + Clone>(bus: B) {
    let mut tasks = Vec::new();
    for p in 0..PUBLISHERS {
        let bus = bus.clone();
        tasks.push(tokio::spawn(async move {
            let mut seq = 1;
            loop {
                if p < PUBLISHERS / 2 {
                    bus.publish("crash", message(p, seq)).await.unwrap();
                    println!("ACK {p} {seq}");
                    seq += 1;
                } else {
                    let batch: Vec<_> = (seq..seq + 16).map(|s| message(p, s)).collect();
                    bus.publish_batch("crash", batch).await.unwrap();
                    for s in seq..seq + 16 {
                        println!("ACK {p} {s}");
                    }
                    seq += 16;
                }
            }
        }));
    }
    // The publishers run until the parent kills this process.
    futures_join(tasks).await;
}

async fn futures_join(tasks: Vec<tokio::task::JoinHandle<()>>) {
    for t in tasks {
        if let Err(e) = t.await {
            panic!("publisher task failed: {e}");
        }
    }
}

async fn consume_hold<B: Bus>(bus: B) {
    let options = SubscribeOptions {
        ack_wait: Duration::from_secs(600),
        ..Default::default()
    };
    let mut sub = bus.subscribe("hold", "g", options).await.unwrap();
    let d = sub.next().await.unwrap();
    println!("GOT {}", d.envelope().id);
    // Hold the delivery unsettled until the parent kills this process.
    std::future::pending::<()>().await;
}

async fn consume_all<B: Bus>(bus: B, n: u64) {
    let mut sub = bus
        .subscribe("backlog", "g", SubscribeOptions::default())
        .await
        .unwrap();
    let mut count = 0u64;
    while count < n {
        let batch = sub.next_batch(1024).await.unwrap();
        for d in batch {
            d.ack().await.unwrap();
            count += 1;
        }
    }
    println!("COUNT {count}");
    println!("RSS {}", switchyard_testkit::peak_rss_kb().unwrap_or(0));
    bus.close().await.unwrap();
}
