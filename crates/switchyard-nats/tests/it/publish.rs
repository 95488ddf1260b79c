//! The single-message publish path reads the server's answer itself (`src/ack.rs`): a
//! stored message gives its sequence, a duplicate id the earlier sequence, a message the
//! server refuses an error with the server's words, and a stream gone from under a known
//! topic an error — never a hang.

use std::time::Duration;

use async_nats::jetstream;
use switchyard::{Bus, Envelope, Error};
use switchyard_nats::{NatsBus, NatsConfig};
use switchyard_testkit::servers::NatsServer;

use crate::runtime;

/// Far above the publish's own ack timeout (5 s): a publish must have ended by then.
const ENDS: Duration = Duration::from_secs(30);

fn message(bytes: usize) -> Envelope {
    Envelope::new(
        "test.v1",
        "/it",
        "application/octet-stream",
        vec![b'x'; bytes],
    )
}

#[test]
fn a_publish_answers_with_the_servers_ack_its_refusal_or_an_error() {
    let Some(server) = NatsServer::start().expect("start nats-server") else {
        println!("nats-server not installed: case skipped");
        return;
    };
    let url = server.url();
    runtime().block_on(async move {
        let mut config = NatsConfig::new(url.clone());
        config.namespace = Some("pub".into());
        let bus = NatsBus::new(config);

        // Stored: sequences in order; the same id again is a duplicate of the first.
        let first = message(10);
        let a = bus.publish("t", first.clone()).await.unwrap();
        let b = bus.publish("t", message(10)).await.unwrap();
        assert_eq!((a.offset, a.duplicate), (1, false));
        assert_eq!((b.offset, b.duplicate), (2, false));
        let again = bus.publish("t", first).await.unwrap();
        assert_eq!((again.offset, again.duplicate), (1, true));

        // Refused: the stream now takes at most 200 bytes per message.
        let admin = jetstream::new(async_nats::connect(url.as_str()).await.unwrap());
        let mut stream = admin.get_stream("SY_pub_t").await.unwrap();
        let mut limits = stream.info().await.unwrap().config.clone();
        limits.max_message_size = 200;
        admin.update_stream(limits).await.unwrap();
        let refused = tokio::time::timeout(ENDS, bus.publish("t", message(1000)))
            .await
            .expect("the publish should have ended");
        match refused {
            Err(Error::Unavailable(text)) => {
                assert!(text.contains("topic `t`"), "{text}");
                assert!(text.contains("refused"), "{text}");
                assert!(text.to_lowercase().contains("message size"), "{text}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        // Nothing of it was stored; the next small one follows the first two.
        let c = bus.publish("t", message(10)).await.unwrap();
        assert_eq!(c.offset, 3);

        // Gone: the stream is deleted under the bus, which still knows the topic.
        admin.delete_stream("SY_pub_t").await.unwrap();
        let gone = tokio::time::timeout(ENDS, bus.publish("t", message(10)))
            .await
            .expect("the publish should have ended");
        match gone {
            Err(Error::Unavailable(text)) => assert!(text.contains("topic `t`"), "{text}"),
            other => panic!("expected an error, got {other:?}"),
        }
        bus.close().await.unwrap();
    });
}
