//! What only a disk-backed bus has: reopening, torn tails, retention.

use std::time::Duration;

use switchyard::{Bus, Envelope, SubscribeOptions};
use switchyard_embedded::{EmbeddedBus, EmbeddedConfig};

fn msg(i: u64) -> Envelope {
    Envelope::new(
        "t.v1",
        "/test",
        "application/json",
        format!("{{\"i\":{i}}}"),
    )
    .with_subject("k")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_group_reads_what_an_earlier_process_published() {
    let dir = tempfile::tempdir().unwrap();
    {
        let bus = EmbeddedBus::open(dir.path()).unwrap();
        bus.publish_batch("hold", (0..10).map(msg).collect())
            .await
            .unwrap();
        bus.close().await.unwrap();
    }
    let bus = EmbeddedBus::open(dir.path()).unwrap();
    let mut sub = bus
        .subscribe("hold", "g", SubscribeOptions::default())
        .await
        .unwrap();
    for _ in 0..10 {
        let d = tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .expect("delivered")
            .unwrap();
        d.ack().await.unwrap();
    }
    bus.close().await.unwrap();
    let _ = EmbeddedConfig::default();
}
