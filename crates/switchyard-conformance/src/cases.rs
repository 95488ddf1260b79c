//! The cases. Each opens the backend in a fresh directory and asserts one part of the
//! contract; none asserts on speed.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use switchyard::{
    Bus, Delivery, Envelope, ErrorKind, MessageId, RedeliveryPolicy, ReplayFilter, StartPosition,
    SubscribeOptions, Subscription, TransientSubscription,
};
use switchyard_testkit::{Child, Ledger};

use crate::child::{DIR_VAR, MODE_VAR, N_VAR, PUBLISHERS};
use crate::{BusFactory, Settings};

const ARRIVES: Duration = Duration::from_secs(15);
const QUIET: Duration = Duration::from_millis(300);

pub(crate) async fn dispatch<F: BusFactory>(f: &F, name: &str, dir: &Path, entry: &str) {
    match name {
        "publish_and_consume_in_order" => publish_and_consume_in_order(f, dir).await,
        "every_group_gets_every_message" => every_group_gets_every_message(f, dir).await,
        "competing_consumers_split_a_group" => competing_consumers_split_a_group(f, dir).await,
        "ordering_per_subject_with_competing_consumers" => {
            ordering_per_subject_with_competing_consumers(f, dir).await
        }
        "a_parked_subject_with_a_long_backlog_does_not_stall_others" => {
            parked_subject(f, dir).await
        }
        "nack_with_delay_redelivers_after_the_delay" => nack_with_delay(f, dir).await,
        "ack_timeout_redelivers_and_stale_ack_is_rejected" => ack_timeout(f, dir).await,
        "exhausted_attempts_go_to_the_dlq_with_reason" => exhausted_to_dlq(f, dir).await,
        "explicit_dead_letter_is_immediate" => explicit_dead_letter(f, dir).await,
        "replay_goes_back_to_the_failing_group_only" => replay(f, dir).await,
        "duplicate_ids_are_stored_once_within_the_window" => dedup(f, dir).await,
        "failed_publish_can_be_retried_with_the_same_id" => retry_same_id(f, dir).await,
        "oversized_message_is_rejected_with_a_typed_error" => oversized(f, dir).await,
        "invalid_names_are_rejected" => invalid_names(f, dir).await,
        "start_latest_skips_the_backlog" => start_latest(f, dir).await,
        "close_wakes_waiting_consumers" => close_wakes(f, dir).await,
        "positions_and_dead_letters_survive_reopen" => survive_reopen(f, dir).await,
        "publish_survives_sigkill" => publish_survives_sigkill(f, dir, entry).await,
        "consumer_killed_mid_message_is_redelivered" => consumer_killed(f, dir, entry).await,
        "backlog_of_1m_with_bounded_memory" => backlog(f, dir, entry).await,
        "transient_one_member_of_each_group_gets_each_message" => transient_groups(f, dir).await,
        "transient_unsubscribes_on_drop_and_close" => transient_unsubscribe(f, dir).await,
        "transient_messages_are_not_persisted" => transient_not_persisted(f, dir).await,
        other => panic!("no conformance case `{other}`"),
    }
}

fn msg(i: u64, subject: Option<&str>) -> Envelope {
    let mut e = Envelope::new(
        "test.v1",
        "/conformance",
        "application/json",
        format!("{{\"i\":{i}}}"),
    );
    e.subject = subject.map(String::from);
    e
}

fn index(d: &Delivery) -> u64 {
    let v: serde_json::Value = serde_json::from_slice(&d.envelope().data).unwrap();
    v["i"].as_u64().unwrap()
}

async fn recv(sub: &mut Subscription) -> Delivery {
    tokio::time::timeout(ARRIVES, sub.next())
        .await
        .expect("a delivery should have arrived")
        .expect("next() failed")
}

async fn quiet(sub: &mut Subscription) {
    if let Ok(d) = tokio::time::timeout(QUIET, sub.next()).await {
        panic!("expected no delivery, got {:?}", d.map(|d| index(&d)));
    }
}

fn fast_retry(max_attempts: u32) -> SubscribeOptions {
    SubscribeOptions {
        redelivery: RedeliveryPolicy {
            max_attempts,
            initial_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(20),
            multiplier: 2.0,
            jitter: 0.2,
        },
        ..Default::default()
    }
}

async fn open<F: BusFactory>(f: &F, dir: &Path) -> F::Bus {
    f.open(dir, &Settings::default()).expect("open the bus")
}

async fn publish_and_consume_in_order<F: BusFactory>(f: &F, dir: &Path) {
    let bus = open(f, dir).await;
    let mut offsets = Vec::new();
    for i in 0..50 {
        offsets.push(
            bus.publish("orders", msg(i, Some("s")))
                .await
                .unwrap()
                .offset,
        );
    }
    let batch: Vec<_> = (50..150).map(|i| msg(i, Some("s"))).collect();
    let ids: Vec<MessageId> = batch.iter().map(|e| e.id).collect();
    let published = bus.publish_batch("orders", batch).await.unwrap();
    assert_eq!(published.iter().map(|p| p.id).collect::<Vec<_>>(), ids);
    assert!(published.iter().all(|p| !p.duplicate));
    offsets.extend(published.iter().map(|p| p.offset));
    assert!(offsets.windows(2).all(|w| w[0] < w[1]), "offsets increase");
    let mut sub = bus
        .subscribe("orders", "g", SubscribeOptions::default())
        .await
        .unwrap();
    for i in 0..150 {
        let d = recv(&mut sub).await;
        assert_eq!(index(&d), i, "delivered in publish order");
        assert_eq!(d.attempt(), 1);
        assert_eq!(d.envelope().subject.as_deref(), Some("s"));
        d.ack().await.unwrap();
    }
    quiet(&mut sub).await;
    bus.close().await.unwrap();
}

async fn every_group_gets_every_message<F: BusFactory>(f: &F, dir: &Path) {
    let bus = open(f, dir).await;
    let batch: Vec<_> = (0..50).map(|i| msg(i, None)).collect();
    bus.publish_batch("t", batch).await.unwrap();
    for group in ["a", "b", "c"] {
        let mut sub = bus
            .subscribe("t", group, SubscribeOptions::default())
            .await
            .unwrap();
        let mut seen = HashSet::new();
        for _ in 0..50 {
            let d = recv(&mut sub).await;
            assert!(seen.insert(index(&d)), "group {group} saw a duplicate");
            d.ack().await.unwrap();
        }
        quiet(&mut sub).await;
    }
    bus.close().await.unwrap();
}

async fn competing_consumers_split_a_group<F: BusFactory>(f: &F, dir: &Path) {
    let bus = open(f, dir).await;
    const N: u64 = 400;
    let seen = Arc::new(Mutex::new(HashMap::<u64, usize>::new()));
    let mut tasks = Vec::new();
    for c in 0..4 {
        let mut sub = bus
            .subscribe("work", "workers", SubscribeOptions::default())
            .await
            .unwrap();
        let seen = seen.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let Ok(Ok(d)) = tokio::time::timeout(Duration::from_millis(500), sub.next()).await
                else {
                    return;
                };
                *seen.lock().unwrap().entry(index(&d)).or_default() += 1;
                if c % 2 == 0 {
                    tokio::task::yield_now().await;
                }
                d.ack().await.unwrap();
            }
        }));
    }
    let batch: Vec<_> = (0..N).map(|i| msg(i, None)).collect();
    bus.publish_batch("work", batch).await.unwrap();
    for t in tasks {
        t.await.unwrap();
    }
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len() as u64, N, "every message reached the group");
        assert!(
            seen.values().all(|n| *n == 1),
            "each message went to exactly one member"
        );
    }
    bus.close().await.unwrap();
}

async fn ordering_per_subject_with_competing_consumers<F: BusFactory>(f: &F, dir: &Path) {
    let bus = open(f, dir).await;
    const SUBJECTS: u64 = 8;
    const PER: u64 = 40;
    let mut batch = Vec::new();
    for seq in 0..PER {
        for s in 0..SUBJECTS {
            batch.push(msg(s * 1000 + seq, Some(&format!("s{s}"))));
        }
    }
    bus.publish_batch("ordered", batch).await.unwrap();
    let log = Arc::new(Mutex::new(HashMap::<u64, Vec<u64>>::new()));
    let mut tasks = Vec::new();
    for c in 0..4u64 {
        let mut sub = bus
            .subscribe("ordered", "g", fast_retry(100))
            .await
            .unwrap();
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            loop {
                let Ok(Ok(d)) = tokio::time::timeout(Duration::from_millis(800), sub.next()).await
                else {
                    return;
                };
                n += 1;
                // Some deliveries fail and are retried: order must hold across retries.
                if (n + c).is_multiple_of(7) && d.attempt() == 1 {
                    d.nack(None, "transient").await.unwrap();
                    continue;
                }
                let i = index(&d);
                log.lock()
                    .unwrap()
                    .entry(i / 1000)
                    .or_default()
                    .push(i % 1000);
                if n.is_multiple_of(3) {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                d.ack().await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    {
        let log = log.lock().unwrap();
        assert_eq!(log.len() as u64, SUBJECTS);
        for (s, seqs) in log.iter() {
            let expected: Vec<u64> = (0..PER).collect();
            assert_eq!(
                seqs, &expected,
                "subject s{s} was processed in order, once each"
            );
        }
    }
    bus.close().await.unwrap();
}

async fn parked_subject<F: BusFactory>(f: &F, dir: &Path) {
    let bus = open(f, dir).await;
    let hot: Vec<_> = (0..100).map(|i| msg(i, Some("hot"))).collect();
    bus.publish_batch("parked", hot).await.unwrap();
    let cold: Vec<_> = (1000..1005).map(|i| msg(i, Some("cold"))).collect();
    bus.publish_batch("parked", cold).await.unwrap();
    // A small window: 100 messages of one subject would fill it many times over.
    let options = SubscribeOptions {
        max_pending: 40,
        ..Default::default()
    };
    let mut sub = bus.subscribe("parked", "g", options).await.unwrap();
    let head = recv(&mut sub).await;
    assert_eq!(index(&head), 0);
    for i in 1000..1005 {
        let d = recv(&mut sub).await;
        assert_eq!(index(&d), i, "another subject flows while `hot` is parked");
        d.ack().await.unwrap();
    }
    quiet(&mut sub).await;
    head.ack().await.unwrap();
    for i in 1..100 {
        let d = recv(&mut sub).await;
        assert_eq!(index(&d), i, "`hot` resumes in order");
        d.ack().await.unwrap();
    }
    quiet(&mut sub).await;
    bus.close().await.unwrap();
}

async fn nack_with_delay<F: BusFactory>(f: &F, dir: &Path) {
    let bus = open(f, dir).await;
    bus.publish("t", msg(1, None)).await.unwrap();
    let mut sub = bus
        .subscribe("t", "g", SubscribeOptions::default())
        .await
        .unwrap();
    let d = recv(&mut sub).await;
    let nacked = Instant::now();
    d.nack(Some(Duration::from_millis(400)), "try later")
        .await
        .unwrap();
    let d = recv(&mut sub).await;
    assert!(
        nacked.elapsed() >= Duration::from_millis(380),
        "redelivered only after the delay (after {:?})",
        nacked.elapsed()
    );
    assert_eq!(d.attempt(), 2);
    assert_eq!(index(&d), 1);
    d.ack().await.unwrap();
    quiet(&mut sub).await;
    bus.close().await.unwrap();
}

async fn ack_timeout<F: BusFactory>(f: &F, dir: &Path) {
    let bus = open(f, dir).await;
    bus.publish("t", msg(7, None)).await.unwrap();
    let options = SubscribeOptions {
        ack_wait: Duration::from_millis(300),
        ..fast_retry(5)
    };
    let mut a = bus.subscribe("t", "g", options.clone()).await.unwrap();
    let mut b = bus.subscribe("t", "g", options).await.unwrap();
    let first = recv(&mut a).await;
    assert_eq!(first.attempt(), 1);
    let second = recv(&mut b).await;
    assert_eq!(index(&second), 7);
    assert_eq!(second.attempt(), 2, "redelivered after the ack timeout");
    let err = first.ack().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::StaleDelivery, "{err}");
    second.ack().await.unwrap();
    quiet(&mut a).await;
    quiet(&mut b).await;
    bus.close().await.unwrap();
}

async fn exhausted_to_dlq<F: BusFactory>(f: &F, dir: &Path) {
    let bus = open(f, dir).await;
    let poison = msg(1, Some("order-1"));
    let poison_id = poison.id;
    bus.publish("pay", poison).await.unwrap();
    bus.publish("pay", msg(2, Some("order-1"))).await.unwrap();
    let mut other = bus
        .subscribe("pay", "audit", SubscribeOptions::default())
        .await
        .unwrap();
    let mut sub = bus.subscribe("pay", "g", fast_retry(3)).await.unwrap();
    for attempt in 1..=3 {
        let d = recv(&mut sub).await;
        assert_eq!(index(&d), 1, "the next message of the subject waits");
        assert_eq!(d.attempt(), attempt);
        d.nack(None, format!("boom {attempt}")).await.unwrap();
    }
    let next = recv(&mut sub).await;
    assert_eq!(
        index(&next),
        2,
        "the subject is released once the poison is in the DLQ"
    );
    next.ack().await.unwrap();
    let dl = bus.dead_letters("pay", 10).await.unwrap();
    assert_eq!(dl.len(), 1);
    let dl = &dl[0];
    assert_eq!(dl.envelope.id, poison_id);
    assert_eq!(dl.reason, "boom 3");
    assert_eq!(dl.attempts, 3);
    assert_eq!(dl.group, "g");
    assert_eq!(dl.topic, "pay");
    assert!(dl.first_failure <= dl.last_failure);
    assert!(dl.first_failure.unix_micros() > 0);
    assert_eq!(&dl.envelope.data[..], b"{\"i\":1}");
    assert!(
        dl.envelope.extensions.is_empty(),
        "the original envelope is returned unchanged"
    );
    for i in 1..=2 {
        let d = recv(&mut other).await;
        assert_eq!(index(&d), i, "another group is not affected");
        d.ack().await.unwrap();
    }
    bus.close().await.unwrap();
}

async fn explicit_dead_letter<F: BusFactory>(f: &F, dir: &Path) {
    let bus = open(f, dir).await;
    bus.publish("t", msg(1, None)).await.unwrap();
    let mut sub = bus
        .subscribe("t", "g", SubscribeOptions::default())
        .await
        .unwrap();
    let d = recv(&mut sub).await;
    d.dead_letter("unknown event type `x.v9`").await.unwrap();
    quiet(&mut sub).await;
    let dl = bus.dead_letters("t", 10).await.unwrap();
    assert_eq!(dl.len(), 1);
    assert_eq!(dl[0].attempts, 1, "no retries for a terminal failure");
    assert_eq!(dl[0].reason, "unknown event type `x.v9`");
    bus.close().await.unwrap();
}

async fn replay<F: BusFactory>(f: &F, dir: &Path) {
    let bus = open(f, dir).await;
    let original = msg(5, Some("k"));
    let id = original.id;
    bus.publish("t", original).await.unwrap();
    let mut a = bus.subscribe("t", "a", fast_retry(1)).await.unwrap();
    let mut b = bus
        .subscribe("t", "b", SubscribeOptions::default())
        .await
        .unwrap();
    let d = recv(&mut b).await;
    d.ack().await.unwrap();
    let d = recv(&mut a).await;
    d.nack(None, "dependency down").await.unwrap();
    quiet(&mut a).await;
    assert_eq!(bus.dead_letters("t", 10).await.unwrap().len(), 1);
    let none = ReplayFilter {
        group: Some("zzz".into()),
        ids: None,
    };
    assert_eq!(bus.replay_dead_letters("t", none).await.unwrap(), 0);
    let wrong_id = ReplayFilter {
        group: None,
        ids: Some(vec![MessageId::new()]),
    };
    assert_eq!(bus.replay_dead_letters("t", wrong_id).await.unwrap(), 0);
    let only_a = ReplayFilter {
        group: Some("a".into()),
        ids: Some(vec![id]),
    };
    assert_eq!(bus.replay_dead_letters("t", only_a).await.unwrap(), 1);
    let d = recv(&mut a).await;
    assert_eq!(d.envelope().id, id, "replayed with its original id");
    assert_eq!(index(&d), 5);
    d.ack().await.unwrap();
    quiet(&mut b).await;
    assert!(
        bus.dead_letters("t", 10).await.unwrap().is_empty(),
        "replayed entries leave the DLQ"
    );
    assert_eq!(
        bus.replay_dead_letters("t", ReplayFilter::default())
            .await
            .unwrap(),
        0
    );
    bus.close().await.unwrap();
}

async fn dedup<F: BusFactory>(f: &F, dir: &Path) {
    let settings = Settings {
        dedup_window: Duration::from_millis(1500),
        ..Default::default()
    };
    let bus = f.open(dir, &settings).unwrap();
    let e = msg(1, None);
    let first = bus.publish("t", e.clone()).await.unwrap();
    assert!(!first.duplicate);
    let again = bus.publish("t", e.clone()).await.unwrap();
    assert!(again.duplicate);
    assert_eq!(again.offset, first.offset);
    let e2 = msg(2, None);
    let batch = bus
        .publish_batch("t", vec![e2.clone(), e.clone(), e2.clone()])
        .await
        .unwrap();
    assert_eq!(
        batch.iter().map(|p| p.duplicate).collect::<Vec<_>>(),
        vec![false, true, true],
        "duplicates inside a batch are detected too"
    );
    let mut sub = bus
        .subscribe("t", "g", SubscribeOptions::default())
        .await
        .unwrap();
    for i in [1, 2] {
        let d = recv(&mut sub).await;
        assert_eq!(index(&d), i);
        d.ack().await.unwrap();
    }
    quiet(&mut sub).await;
    tokio::time::sleep(Duration::from_millis(1800)).await;
    let later = bus.publish("t", e.clone()).await.unwrap();
    assert!(
        !later.duplicate,
        "outside the window the id is stored again"
    );
    assert_eq!(index(&recv(&mut sub).await), 1);
    bus.close().await.unwrap();
}

async fn retry_same_id<F: BusFactory>(f: &F, dir: &Path) {
    let settings = Settings {
        max_message_bytes: 1024,
        ..Default::default()
    };
    let bus = f.open(dir, &settings).unwrap();
    let mut big = msg(1, None);
    big.data = format!("{{\"i\":1,\"pad\":\"{}\"}}", "x".repeat(4096)).into();
    let id = big.id;
    assert!(bus.publish("t", big).await.is_err());
    let ok = bus.publish("t", msg(1, None).with_id(id)).await.unwrap();
    assert!(
        !ok.duplicate,
        "a failed publish does not mark its id as seen"
    );
    let mut sub = bus
        .subscribe("t", "g", SubscribeOptions::default())
        .await
        .unwrap();
    let d = recv(&mut sub).await;
    assert_eq!(d.envelope().id, id);
    d.ack().await.unwrap();
    bus.close().await.unwrap();
}

async fn oversized<F: BusFactory>(f: &F, dir: &Path) {
    let settings = Settings {
        max_message_bytes: 1024,
        ..Default::default()
    };
    let bus = f.open(dir, &settings).unwrap();
    let mut big = msg(1, None);
    big.data = vec![b'x'; 2048].into();
    big.datacontenttype = "application/octet-stream".into();
    let err = bus.publish("t", big.clone()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert!(
        matches!(err, switchyard::Error::PayloadTooLarge { limit: 1024, .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("1024"),
        "the message names the limit: {err}"
    );
    let err = bus
        .publish_batch("t", vec![msg(2, None), big])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    let mut sub = bus
        .subscribe("t", "g", SubscribeOptions::default())
        .await
        .unwrap();
    quiet(&mut sub).await;
    bus.close().await.unwrap();
    let default_bus_dir = dir.join("default");
    let bus = open(f, &default_bus_dir).await;
    let mut just_over = msg(3, None);
    just_over.data = vec![b'x'; switchyard::bus::DEFAULT_MAX_MESSAGE_BYTES].into();
    just_over.datacontenttype = "application/octet-stream".into();
    let err = bus.publish("t", just_over).await.unwrap_err();
    assert!(
        matches!(err, switchyard::Error::PayloadTooLarge { .. }),
        "default limit is 1 MiB"
    );
    bus.close().await.unwrap();
}

async fn invalid_names<F: BusFactory>(f: &F, dir: &Path) {
    let bus = open(f, dir).await;
    for topic in ["", "a/b", "../up", "with space"] {
        let err = bus.publish(topic, msg(1, None)).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "topic {topic:?}");
    }
    let err = bus
        .subscribe("t", "$reserved", SubscribeOptions::default())
        .await
        .err()
        .unwrap();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    bus.close().await.unwrap();
}

async fn start_latest<F: BusFactory>(f: &F, dir: &Path) {
    let bus = open(f, dir).await;
    bus.publish("t", msg(1, None)).await.unwrap();
    let options = SubscribeOptions {
        start: StartPosition::Latest,
        ..Default::default()
    };
    let mut sub = bus.subscribe("t", "late", options).await.unwrap();
    bus.publish("t", msg(2, None)).await.unwrap();
    let d = recv(&mut sub).await;
    assert_eq!(index(&d), 2);
    d.ack().await.unwrap();
    let mut early = bus
        .subscribe("t", "early", SubscribeOptions::default())
        .await
        .unwrap();
    assert_eq!(
        index(&recv(&mut early).await),
        1,
        "Earliest sees the backlog"
    );
    bus.close().await.unwrap();
}

async fn close_wakes<F: BusFactory>(f: &F, dir: &Path) {
    let bus = open(f, dir).await;
    let mut sub = bus
        .subscribe("t", "g", SubscribeOptions::default())
        .await
        .unwrap();
    let waiter = tokio::spawn(async move { sub.next().await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(100)).await;
    bus.close().await.unwrap();
    let r = tokio::time::timeout(ARRIVES, waiter)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.unwrap_err().kind(), ErrorKind::Closed);
    assert_eq!(
        bus.publish("t", msg(1, None)).await.unwrap_err().kind(),
        ErrorKind::Closed
    );
}

async fn survive_reopen<F: BusFactory>(f: &F, dir: &Path) {
    {
        let bus = open(f, dir).await;
        let batch: Vec<_> = (0..10).map(|i| msg(i, None)).collect();
        bus.publish_batch("t", batch).await.unwrap();
        let mut sub = bus.subscribe("t", "g", fast_retry(1)).await.unwrap();
        for _ in 0..5 {
            recv(&mut sub).await.ack().await.unwrap();
        }
        // Offset 5 is delivered but never settled before the close.
        let held = recv(&mut sub).await;
        assert_eq!(index(&held), 5);
        let mut fail = bus.subscribe("p", "g", fast_retry(1)).await.unwrap();
        bus.publish("p", msg(99, None)).await.unwrap();
        recv(&mut fail).await.nack(None, "poison").await.unwrap();
        quiet(&mut fail).await;
        bus.close().await.unwrap();
    }
    let bus = open(f, dir).await;
    let mut sub = bus
        .subscribe("t", "g", SubscribeOptions::default())
        .await
        .unwrap();
    for i in 5..10 {
        let d = recv(&mut sub).await;
        assert_eq!(index(&d), i, "resumes at the first unacknowledged message");
        d.ack().await.unwrap();
    }
    quiet(&mut sub).await;
    let dl = bus.dead_letters("p", 10).await.unwrap();
    assert_eq!(dl.len(), 1, "dead letters are durable");
    assert_eq!(dl[0].reason, "poison");
    bus.publish("t", msg(10, None)).await.unwrap();
    assert_eq!(
        index(&recv(&mut sub).await),
        10,
        "new offsets continue after the old ones"
    );
    bus.close().await.unwrap();
}

async fn publish_survives_sigkill<F: BusFactory>(f: &F, dir: &Path, entry: &str) {
    let dir_s = dir.display().to_string();
    let mut child = Child::spawn_test_entry(
        entry,
        &[(MODE_VAR, "publish-loop".into()), (DIR_VAR, dir_s.clone())],
    )
    .unwrap();
    let mut ledger = Ledger::new();
    let mut acked = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked < 3000 && Instant::now() < deadline {
        let Some(line) = child.next_line(Duration::from_secs(30)) else {
            break;
        };
        if let Some(rest) = line.strip_prefix("ACK ") {
            let mut it = rest.split(' ');
            let p: u64 = it.next().unwrap().parse().unwrap();
            let seq: u64 = it.next().unwrap().parse().unwrap();
            ledger.acknowledged(&format!("{p}-{seq}"), &format!("p{p}"), seq);
            acked += 1;
        }
    }
    assert!(
        acked >= 100,
        "the child published too little before the kill ({acked})"
    );
    child.kill().unwrap();
    // Lines already written before the kill are acknowledgements too.
    for line in child.drain(Duration::from_millis(200)) {
        if let Some(rest) = line.strip_prefix("ACK ") {
            let mut it = rest.split(' ');
            let p: u64 = it.next().unwrap().parse().unwrap();
            let seq: u64 = it.next().unwrap().parse().unwrap();
            ledger.acknowledged(&format!("{p}-{seq}"), &format!("p{p}"), seq);
        }
    }
    verify_after_crash(f, dir, ledger).await;
}

async fn verify_after_crash<F: BusFactory>(f: &F, dir: &Path, mut ledger: Ledger) {
    let bus = open(f, dir).await;
    let mut sub = bus
        .subscribe("crash", "verify", SubscribeOptions::default())
        .await
        .unwrap();
    let mut observed = 0u64;
    while let Ok(batch) = tokio::time::timeout(Duration::from_secs(2), sub.next_batch(1024)).await {
        for d in batch.unwrap() {
            let v: serde_json::Value = serde_json::from_slice(&d.envelope().data).unwrap();
            let (p, seq) = (v["p"].as_u64().unwrap(), v["seq"].as_u64().unwrap());
            ledger.observed(&format!("{p}-{seq}"), &format!("p{p}"), seq);
            observed += 1;
            d.ack().await.unwrap();
        }
    }
    bus.close().await.unwrap();
    let v = ledger.verdict();
    println!(
        "after SIGKILL: {} acknowledged, {} stored ({} distinct); lost {}, duplicated {}, out of order {}",
        v.acknowledged,
        observed,
        v.observed,
        v.lost.len(),
        v.duplicated.len(),
        v.out_of_order.len()
    );
    assert!(
        v.lost.is_empty(),
        "acknowledged publishes lost: {:?}",
        &v.lost[..v.lost.len().min(10)]
    );
    assert!(
        v.duplicated.is_empty(),
        "stored twice: {:?}",
        &v.duplicated[..v.duplicated.len().min(10)]
    );
    assert!(
        v.out_of_order.is_empty(),
        "out of order per subject: {:?}",
        &v.out_of_order[..v.out_of_order.len().min(10)]
    );
    assert!(v.acknowledged > 0 && PUBLISHERS > 0);
}

async fn consumer_killed<F: BusFactory>(f: &F, dir: &Path, entry: &str) {
    let ids: Vec<MessageId> = {
        let bus = open(f, dir).await;
        let batch: Vec<_> = (0..10).map(|i| msg(i, Some("k"))).collect();
        let ids = batch.iter().map(|e| e.id).collect();
        bus.publish_batch("hold", batch).await.unwrap();
        bus.close().await.unwrap();
        ids
    };
    let mut child = Child::spawn_test_entry(
        entry,
        &[
            (MODE_VAR, "consume-hold".into()),
            (DIR_VAR, dir.display().to_string()),
        ],
    )
    .unwrap();
    let got = child
        .wait_for("GOT ", Duration::from_secs(60))
        .expect("the child received a message");
    assert_eq!(got, ids[0].to_string());
    child.kill().unwrap();
    let bus = open(f, dir).await;
    let mut sub = bus
        .subscribe("hold", "g", SubscribeOptions::default())
        .await
        .unwrap();
    for (i, id) in ids.iter().enumerate() {
        let d = recv(&mut sub).await;
        assert_eq!(
            &d.envelope().id,
            id,
            "message {i} redelivered in order after the kill"
        );
        d.ack().await.unwrap();
    }
    quiet(&mut sub).await;
    bus.close().await.unwrap();
}

async fn backlog<F: BusFactory>(f: &F, dir: &Path, entry: &str) {
    let n: u64 = std::env::var("SWITCHYARD_BACKLOG_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    {
        let bus = open(f, dir).await;
        let mut i = 0;
        while i < n {
            let batch: Vec<_> = (i..(i + 1000).min(n))
                .map(|j| msg(j, Some(&format!("s{}", j % 64))))
                .collect();
            i += batch.len() as u64;
            bus.publish_batch("backlog", batch).await.unwrap();
        }
        bus.close().await.unwrap();
    }
    let mut child = Child::spawn_test_entry(
        entry,
        &[
            (MODE_VAR, "consume-all".into()),
            (DIR_VAR, dir.display().to_string()),
            (N_VAR, n.to_string()),
        ],
    )
    .unwrap();
    let count: u64 = child
        .wait_for("COUNT ", Duration::from_secs(280))
        .expect("the consumer finished")
        .parse()
        .unwrap();
    let rss_kb: u64 = child
        .wait_for("RSS ", Duration::from_secs(10))
        .unwrap()
        .parse()
        .unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(count, n);
    println!(
        "consumed a backlog of {n} messages with peak RSS {} MiB",
        rss_kb / 1024
    );
    assert!(
        rss_kb < 200 * 1024,
        "peak RSS {} MiB while consuming the backlog; the bound is 200 MiB",
        rss_kb / 1024
    );
}

async fn recv_transient(sub: &mut TransientSubscription) -> Arc<Envelope> {
    tokio::time::timeout(ARRIVES, sub.next())
        .await
        .expect("a transient message should have arrived")
        .expect("next() failed")
}

async fn quiet_transient(sub: &mut TransientSubscription) {
    if let Ok(m) = tokio::time::timeout(QUIET, sub.next()).await {
        panic!("expected no transient message, got {:?}", m.map(|e| e.id));
    }
}

fn index_of(e: &Envelope) -> u64 {
    let v: serde_json::Value = serde_json::from_slice(&e.data).unwrap();
    v["i"].as_u64().unwrap()
}

/// Drains whatever `sub` holds (waiting up to `QUIET` for more each time).
async fn drain_transient(sub: &mut TransientSubscription) -> Vec<u64> {
    let mut out = Vec::new();
    while let Ok(batch) = tokio::time::timeout(QUIET, sub.next_batch(1024)).await {
        out.extend(batch.unwrap().iter().map(|e| index_of(e)));
    }
    out
}

async fn transient_groups<F: BusFactory>(f: &F, dir: &Path) {
    let bus = open(f, dir).await;
    const N: u64 = 300;
    let mut workers = Vec::new();
    for _ in 0..3 {
        workers.push(bus.subscribe_transient("calls", "workers").await.unwrap());
    }
    let mut audit = bus.subscribe_transient("calls", "audit").await.unwrap();
    // A durable group on the same topic name is another channel: it sees nothing.
    let mut durable = bus
        .subscribe("calls", "workers", SubscribeOptions::default())
        .await
        .unwrap();
    for i in 0..N {
        bus.publish_transient("calls", msg(i, None)).await.unwrap();
    }
    let mut seen = HashMap::<u64, usize>::new();
    let mut per_member = Vec::new();
    for w in &mut workers {
        let got = drain_transient(w).await;
        per_member.push(got.len());
        for i in got {
            *seen.entry(i).or_default() += 1;
        }
    }
    assert_eq!(seen.len() as u64, N, "every message reached the group");
    assert!(
        seen.values().all(|n| *n == 1),
        "each message went to exactly one member of the group"
    );
    assert!(
        per_member.iter().all(|n| *n > 0),
        "the members share the messages: {per_member:?}"
    );
    let mut audited = drain_transient(&mut audit).await;
    audited.sort();
    assert_eq!(
        audited,
        (0..N).collect::<Vec<_>>(),
        "another group gets its own copy of each"
    );
    quiet(&mut durable).await;
    // No member on a topic: a typed error, at once.
    let err = bus
        .publish_transient("nobody", msg(0, None))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NoSubscribers, "{err}");
    assert!(
        matches!(&err, switchyard::Error::NoSubscribers { topic } if topic == "nobody"),
        "{err}"
    );
    // A durable message does not reach transient members.
    bus.publish("calls", msg(999, None)).await.unwrap();
    quiet_transient(&mut audit).await;
    // The size limit holds here too.
    let mut big = msg(1, None);
    big.data = vec![b'x'; switchyard::bus::DEFAULT_MAX_MESSAGE_BYTES + 1].into();
    big.datacontenttype = "application/octet-stream".into();
    let err = bus.publish_transient("calls", big).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    bus.close().await.unwrap();
}

async fn transient_unsubscribe<F: BusFactory>(f: &F, dir: &Path) {
    let bus = open(f, dir).await;
    let mut stays = bus.subscribe_transient("t", "g").await.unwrap();
    let leaves = bus.subscribe_transient("t", "g").await.unwrap();
    drop(leaves);
    for i in 0..20 {
        bus.publish_transient("t", msg(i, None)).await.unwrap();
    }
    let mut got = drain_transient(&mut stays).await;
    got.sort();
    assert_eq!(
        got,
        (0..20).collect::<Vec<_>>(),
        "a dropped member gets nothing: everything goes to the one left"
    );
    drop(stays);
    let err = bus.publish_transient("t", msg(21, None)).await.unwrap_err();
    assert_eq!(
        err.kind(),
        ErrorKind::NoSubscribers,
        "the last member left: {err}"
    );
    // Closing the bus ends the subscriptions; a waiting member wakes with Closed.
    let mut waiting = bus.subscribe_transient("t", "g").await.unwrap();
    let waiter = tokio::spawn(async move { waiting.next().await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(100)).await;
    bus.close().await.unwrap();
    let r = tokio::time::timeout(ARRIVES, waiter)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.unwrap_err().kind(), ErrorKind::Closed);
    assert_eq!(
        bus.publish_transient("t", msg(22, None))
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::Closed
    );
}

async fn transient_not_persisted<F: BusFactory>(f: &F, dir: &Path) {
    {
        let bus = open(f, dir).await;
        let mut sub = bus.subscribe_transient("t", "g").await.unwrap();
        bus.publish_transient("t", msg(1, None)).await.unwrap();
        assert_eq!(index_of(&*recv_transient(&mut sub).await), 1);
        // Queued but never received before the close.
        bus.publish_transient("t", msg(2, None)).await.unwrap();
        bus.close().await.unwrap();
    }
    let bus = open(f, dir).await;
    // Membership did not survive: nobody is subscribed after the reopen.
    assert_eq!(
        bus.publish_transient("t", msg(3, None))
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::NoSubscribers
    );
    // Nothing was stored: neither a new member nor a durable group sees the old messages.
    let mut sub = bus.subscribe_transient("t", "g").await.unwrap();
    quiet_transient(&mut sub).await;
    let mut durable = bus
        .subscribe("t", "g", SubscribeOptions::default())
        .await
        .unwrap();
    quiet(&mut durable).await;
    bus.publish_transient("t", msg(4, None)).await.unwrap();
    assert_eq!(index_of(&*recv_transient(&mut sub).await), 4);
    bus.close().await.unwrap();
}
