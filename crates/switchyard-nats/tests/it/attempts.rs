//! Attempts count handler attempts, not server deliveries: a message that only waited
//! behind its subject when its bus closed or its process died does not lose an attempt
//! (the bus's ledger, decision 0009).

use std::time::Duration;

use switchyard::{Bus, Envelope, MessageId, SubscribeOptions, Subscription};
use switchyard_nats::{NatsBus, NatsConfig};
use switchyard_testkit::servers::NatsServer;

use crate::runtime;

const ARRIVES: Duration = Duration::from_secs(30);

fn bus(url: &str) -> NatsBus {
    let mut config = NatsConfig::new(url);
    config.namespace = Some("attempts".into());
    NatsBus::new(config)
}

fn message(i: u64) -> Envelope {
    Envelope::new(
        "test.v1",
        "/it",
        "application/json",
        format!("{{\"i\":{i}}}"),
    )
    .with_subject("k")
}

async fn recv(sub: &mut Subscription) -> switchyard::Delivery {
    tokio::time::timeout(ARRIVES, sub.next())
        .await
        .expect("a delivery should have arrived")
        .expect("next() failed")
}

/// Publishes three messages of one subject; a first bus takes the first and, asking for
/// more, parks the other two behind it. Returns the ids and the first bus's delivery.
async fn hold_one_park_two(
    first: &NatsBus,
) -> (Vec<MessageId>, Subscription, switchyard::Delivery) {
    let batch: Vec<_> = (0..3).map(message).collect();
    let ids = batch.iter().map(|e| e.id).collect();
    first.publish_batch("t", batch).await.unwrap();
    let mut sub = first
        .subscribe("t", "g", SubscribeOptions::default())
        .await
        .unwrap();
    let held = recv(&mut sub).await;
    assert_eq!(held.attempt(), 1);
    // Asking for more fetches the other two, which must wait behind the first.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), sub.next_batch(10))
            .await
            .is_err(),
        "the rest of the subject waits while the first is unsettled"
    );
    (ids, sub, held)
}

async fn expect_in_order(sub: &mut Subscription, ids: &[MessageId], attempts: [u32; 3]) {
    for (i, (id, attempt)) in ids.iter().zip(attempts).enumerate() {
        let d = recv(sub).await;
        assert_eq!(&d.envelope().id, id, "message {i} in order");
        assert_eq!(d.attempt(), attempt, "attempt of message {i}");
        d.ack().await.unwrap();
    }
}

#[test]
fn waiting_through_a_close_costs_no_attempt() {
    let Some(server) = NatsServer::start().expect("start nats-server") else {
        println!("nats-server not installed: case skipped");
        return;
    };
    runtime().block_on(async {
        let first = bus(&server.url());
        let (ids, sub, held) = hold_one_park_two(&first).await;
        drop(held);
        drop(sub);
        first.close().await.unwrap();
        let second = bus(&server.url());
        let mut sub = second
            .subscribe("t", "g", SubscribeOptions::default())
            .await
            .unwrap();
        // The first was handed out once already; the other two only waited.
        expect_in_order(&mut sub, &ids, [2, 1, 1]).await;
        second.close().await.unwrap();
    });
}

#[test]
fn waiting_in_a_process_that_died_costs_no_attempt() {
    let Some(server) = NatsServer::start().expect("start nats-server") else {
        println!("nats-server not installed: case skipped");
        return;
    };
    runtime().block_on(async {
        let first = bus(&server.url());
        let (ids, sub, held) = hold_one_park_two(&first).await;
        // Dies: no settle, no close.
        drop((held, sub, first));
        let second = bus(&server.url());
        let mut sub = second
            .subscribe("t", "g", SubscribeOptions::default())
            .await
            .unwrap();
        expect_in_order(&mut sub, &ids, [2, 1, 1]).await;
        second.close().await.unwrap();
    });
}
