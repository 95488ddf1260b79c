//! What only a disk-backed bus has: reopening, torn tails, retention, the directory lock.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use switchyard::{Bus, Envelope, ErrorKind, SubscribeOptions, Subscription};
use switchyard_embedded::{EmbeddedBus, EmbeddedConfig};

fn msg(i: u64) -> Envelope {
    Envelope::new(
        "t.v1",
        "/test",
        "application/json",
        format!("{{\"i\":{i},\"pad\":\"{}\"}}", "x".repeat(200)),
    )
    .with_subject(format!("k{}", i % 4))
}

fn index(e: &Envelope) -> u64 {
    let v: serde_json::Value = serde_json::from_slice(&e.data).unwrap();
    v["i"].as_u64().unwrap()
}

async fn drain(sub: &mut Subscription) -> Vec<u64> {
    let mut out = Vec::new();
    while let Ok(batch) =
        tokio::time::timeout(Duration::from_millis(500), sub.next_batch(512)).await
    {
        for d in batch.unwrap() {
            out.push(index(d.envelope()));
            d.ack().await.unwrap();
        }
    }
    out.sort();
    out
}

fn segments(dir: &Path, topic: &str) -> Vec<PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir.join("topics").join(topic).join("log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    v.sort();
    v
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
    assert_eq!(drain(&mut sub).await, (0..10).collect::<Vec<_>>());
    bus.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torn_and_corrupt_tails_are_cut_back_to_the_last_good_record() {
    let dir = tempfile::tempdir().unwrap();
    {
        let bus = EmbeddedBus::open(dir.path()).unwrap();
        bus.publish_batch("t", (0..100).map(msg).collect())
            .await
            .unwrap();
        bus.close().await.unwrap();
    }
    let seg = segments(dir.path(), "t").pop().unwrap();
    // A torn write: half a record of garbage after the last good one.
    let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
    f.write_all(&[0x55; 37]).unwrap();
    drop(f);
    {
        let bus = EmbeddedBus::open(dir.path()).unwrap();
        let mut sub = bus
            .subscribe("t", "g", SubscribeOptions::default())
            .await
            .unwrap();
        assert_eq!(drain(&mut sub).await, (0..100).collect::<Vec<_>>());
        let report = &bus.storage().recoveries()[0].1;
        assert_eq!(report.truncated_bytes, 37, "the torn tail was reported");
        assert!(report.corrupt_at.is_some());
        // Appending continues after the repaired tail.
        bus.publish("t", msg(100)).await.unwrap();
        assert_eq!(drain(&mut sub).await, vec![100]);
        bus.close().await.unwrap();
    }
    // Cut the last record in half: it is dropped, the 100 before it survive.
    let len = std::fs::metadata(&seg).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(len - 20)
        .unwrap();
    let bus = EmbeddedBus::open(dir.path()).unwrap();
    let mut sub = bus
        .subscribe("t", "fresh", SubscribeOptions::default())
        .await
        .unwrap();
    assert_eq!(drain(&mut sub).await, (0..100).collect::<Vec<_>>());
    assert!(bus.storage().recoveries()[0].1.truncated_bytes > 0);
    bus.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_are_reclaimed_and_disk_use_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let config = EmbeddedConfig {
        segment_bytes: 64 * 1024,
        ..Default::default()
    };
    let bus = EmbeddedBus::open_with(dir.path(), config).unwrap();
    let mut fast = bus
        .subscribe("r", "fast", SubscribeOptions::default())
        .await
        .unwrap();
    let mut slow = bus
        .subscribe("r", "slow", SubscribeOptions::default())
        .await
        .unwrap();
    let mut written = 0u64;
    for round in 0..10u64 {
        for chunk in 0..10 {
            let from = round * 1000 + chunk * 100;
            bus.publish_batch("r", (from..from + 100).map(msg).collect())
                .await
                .unwrap();
        }
        written += 1000;
        assert_eq!(drain(&mut fast).await.len(), 1000);
    }
    let held = segments(dir.path(), "r").len();
    assert!(held > 20, "a lagging group keeps the log ({held} segments)");
    assert_eq!(drain(&mut slow).await.len() as u64, written);
    // Reclaim runs as positions advance (at most twice a second).
    tokio::time::sleep(Duration::from_millis(600)).await;
    bus.publish_batch("r", (10_000..10_010).map(msg).collect())
        .await
        .unwrap();
    drain(&mut fast).await;
    drain(&mut slow).await;
    let left = segments(dir.path(), "r").len();
    let bytes = bus.storage().disk_bytes("r").unwrap();
    assert!(
        left <= 2 && bytes < 3 * 64 * 1024,
        "consumed segments are deleted: {left} segments, {bytes} bytes left of ~{} written",
        written * 300
    );
    bus.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_bus_on_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bus = EmbeddedBus::open(dir.path()).unwrap();
    let err = EmbeddedBus::open(dir.path()).err().unwrap();
    assert_eq!(err.kind(), ErrorKind::Locked);
    assert!(err.to_string().contains("locked"), "{err}");
    bus.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_kept_until_replayed_even_when_another_group_reads_the_dlq() {
    let dir = tempfile::tempdir().unwrap();
    let config = EmbeddedConfig {
        segment_bytes: 16 * 1024,
        ..Default::default()
    };
    let bus = EmbeddedBus::open_with(dir.path(), config).unwrap();
    let mut sub = bus
        .subscribe("t", "g", SubscribeOptions::default())
        .await
        .unwrap();
    for chunk in 0..10u64 {
        bus.publish_batch("t", (chunk * 20..chunk * 20 + 20).map(msg).collect())
            .await
            .unwrap();
        for _ in 0..20 {
            let d = tokio::time::timeout(Duration::from_secs(5), sub.next())
                .await
                .unwrap()
                .unwrap();
            d.dead_letter("bad").await.unwrap();
        }
    }
    // An alerting group reads the DLQ topic and acknowledges everything.
    let mut alerts = bus
        .subscribe("t.dlq", "alerts", SubscribeOptions::default())
        .await
        .unwrap();
    assert_eq!(drain(&mut alerts).await.len(), 200);
    tokio::time::sleep(Duration::from_millis(600)).await;
    bus.publish("t", msg(999)).await.unwrap();
    let d = sub.next().await.unwrap();
    d.dead_letter("bad").await.unwrap();
    drain(&mut alerts).await;
    assert_eq!(
        bus.dead_letters("t", 1000).await.unwrap().len(),
        201,
        "retention kept every unreplayed dead letter"
    );
    bus.close().await.unwrap();
}
