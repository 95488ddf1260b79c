//! What the NATS bus adds to JetStream's ack_wait: the server's `ack_wait` is at most
//! 5 s, and a live bus keeps what it holds with in-progress acks, so a delivery may be
//! held for its whole (longer) ack_wait, while what a dead member held comes back to a
//! live one within seconds. No assertion on speed: the waits are upper bounds (and the
//! "nothing arrives" windows are longer than the server's ack_wait).

use std::time::Duration;

use switchyard::{Bus, Envelope, SubscribeOptions, Subscription};
use switchyard_nats::{NatsBus, NatsConfig};
use switchyard_testkit::servers::NatsServer;

use crate::runtime;

/// Longer than the server's ack_wait (5 s): a message not kept alive would be back by then.
const PAST_SERVER_ACK_WAIT: Duration = Duration::from_secs(8);
const ARRIVES: Duration = Duration::from_secs(30);

fn bus(url: &str) -> NatsBus {
    let mut config = NatsConfig::new(url);
    config.namespace = Some("keepalive".into());
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

fn long_lease() -> SubscribeOptions {
    SubscribeOptions {
        ack_wait: Duration::from_secs(600),
        ..Default::default()
    }
}

async fn recv(sub: &mut Subscription) -> switchyard::Delivery {
    tokio::time::timeout(ARRIVES, sub.next())
        .await
        .expect("a delivery should have arrived")
        .expect("next() failed")
}

#[test]
fn a_delivery_is_held_past_the_server_ack_wait_while_its_own_lasts() {
    let Some(server) = NatsServer::start().expect("start nats-server") else {
        println!("nats-server not installed: case skipped");
        return;
    };
    runtime().block_on(async {
        let bus = bus(&server.url());
        let sent = message(1);
        let id = sent.id;
        bus.publish("t", sent).await.unwrap();
        let mut a = bus.subscribe("t", "g", long_lease()).await.unwrap();
        let mut b = bus.subscribe("t", "g", long_lease()).await.unwrap();
        let held = recv(&mut a).await;
        assert_eq!(held.envelope().id, id);
        // b competes for the group meanwhile: a redelivery would reach it.
        if let Ok(d) = tokio::time::timeout(PAST_SERVER_ACK_WAIT, b.next()).await {
            panic!(
                "the held message was handed out again: {:?}",
                d.map(|d| d.attempt())
            );
        }
        held.ack()
            .await
            .expect("the lease is still the current one");
        assert!(
            tokio::time::timeout(Duration::from_millis(300), b.next())
                .await
                .is_err(),
            "acknowledged: never delivered again"
        );
        bus.close().await.unwrap();
    });
}

#[test]
fn what_a_dead_member_held_comes_back_to_a_live_one_within_seconds() {
    let Some(server) = NatsServer::start().expect("start nats-server") else {
        println!("nats-server not installed: case skipped");
        return;
    };
    runtime().block_on(async {
        let live = bus(&server.url());
        // Without a subject: any member of the group may take it. (A message with one
        // goes to its partition, which only its owner reads: the partition cases in
        // `partitions.rs` kill an owner by pid.)
        let sent = Envelope::new("test.v1", "/it", "application/json", "{\"i\":1}");
        let id = sent.id;
        live.publish("t", sent).await.unwrap();
        // Joins the group first, but asks for nothing until the other member holds the
        // message.
        let mut survivor = live.subscribe("t", "g", long_lease()).await.unwrap();
        {
            let doomed = bus(&server.url());
            let mut sub = doomed.subscribe("t", "g", long_lease()).await.unwrap();
            let d = recv(&mut sub).await;
            assert_eq!(d.envelope().id, id);
            // The member dies holding it: no settle, no close, its connection goes away.
            drop((d, sub, doomed));
        }
        // Its own ack_wait is 600 s; it comes back after the server's (5 s) instead.
        let back = recv(&mut survivor).await;
        assert_eq!(
            back.envelope().id,
            id,
            "the dead member's message comes back"
        );
        // The dead member's delivery counts (more, if a redelivery was lost in flight).
        assert!(back.attempt() >= 2, "attempt {}", back.attempt());
        back.ack().await.unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(300), survivor.next())
                .await
                .is_err(),
            "acknowledged: never delivered again"
        );
        live.close().await.unwrap();
    });
}
