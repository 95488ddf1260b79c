//! Notification: one file per (order, kind), via HTTP and via events.

use std::path::Path;
use std::time::Duration;

use shop::model::{
    Item, ORDERS, OrderCompleted, OrderCreated, OrderFailed, SHIPPING, ShipmentCreated,
};
use shop::services::notification::{
    self, MailKind, NotificationClient, NotificationError, Notifier, file_name,
};
use switchyard::codec;
use switchyard::router::Router;
use switchyard_rpc::CallOptions;

use crate::support::{Harness, eventually, listener, raw};

fn mails(data: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(data.join("mail/new"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[tokio::test]
async fn http_sends_once_per_order_and_kind() {
    let mut h = Harness::new();
    let store = h.store("notification");
    let running = notification::start(store.clone(), h.data_dir(), listener().await, h.shutdown())
        .await
        .unwrap();
    h.register(notification::SERVICE, &running);
    let client = NotificationClient::new(&h.http);
    let opts = CallOptions::new();

    let first = client
        .send("o-1", MailKind::Confirmation, "ann@example.com", &opts)
        .await
        .unwrap();
    assert!(first.sent_now);
    let path = h.data_dir().join(&first.mail.path);
    let modified = std::fs::metadata(&path).unwrap().modified().unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("To: ann@example.com"), "{text}");
    assert!(
        text.contains("Subject: Your order o-1 is confirmed"),
        "{text}"
    );

    let again = client
        .send("o-1", MailKind::Confirmation, "ann@example.com", &opts)
        .await
        .unwrap();
    assert!(!again.sent_now);
    assert_eq!(again.mail, first.mail);
    assert_eq!(
        std::fs::metadata(&path).unwrap().modified().unwrap(),
        modified
    );
    client
        .send("o-1", MailKind::Shipped, "ann@example.com", &opts)
        .await
        .unwrap();
    assert_eq!(
        mails(&h.data_dir()),
        vec![
            file_name("o-1", MailKind::Confirmation),
            file_name("o-1", MailKind::Shipped)
        ]
    );
    assert_eq!(client.sent("o-1", &opts).await.unwrap().len(), 2);
    // Nothing left in tmp/.
    assert_eq!(
        std::fs::read_dir(h.data_dir().join("mail/tmp"))
            .unwrap()
            .count(),
        0
    );

    // Concurrent sends of one (order, kind): one file, one "sent now".
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let c = client.clone();
        tasks.push(tokio::spawn(async move {
            c.send(
                "o-2",
                MailKind::Failure,
                "bob@example.com",
                &CallOptions::new(),
            )
            .await
            .unwrap()
            .sent_now
        }));
    }
    let mut sent_now = 0;
    for t in tasks {
        sent_now += usize::from(t.await.unwrap());
    }
    assert_eq!(sent_now, 1);

    // Bad input: a header injection, an unknown kind; nothing written.
    let err = client
        .send(
            "o-3",
            MailKind::Confirmation,
            "x@y\r\nBcc: all@example.com",
            &opts,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, NotificationError::Invalid(ref i) if i.field == "to"),
        "{err:?}"
    );
    let r = raw(
        &running.url,
        "POST",
        "/notifications",
        Some("application/json"),
        br#"{"order_id":"o-3","kind":"spam","to":"a@b"}"#,
    )
    .await;
    assert_eq!((r.status, r.json()["field"].as_str()), (422, Some("kind")));
    assert_eq!(
        Notifier::new(store, h.data_dir())
            .all_sent()
            .await
            .unwrap()
            .len(),
        3
    );
}

#[tokio::test]
async fn order_events_send_once() {
    let h = Harness::new();
    let bus = h.bus(true);
    let store = h.store("notification");
    let mut router = Router::new(notification::SERVICE, bus.clone(), store.clone());
    notification::subscribe(&mut router, h.data_dir());
    let _router = h.run_router(router).await;

    let publish = |topic: &'static str, env: switchyard::Envelope| {
        let bus = bus.clone();
        async move { bus.publish(topic, env).await.unwrap() }
    };
    let created = OrderCreated {
        order_id: "o-1".into(),
        customer: "ann".into(),
        items: vec![Item::new("sku-001", 1)],
        amount_cents: 500,
        payment_token: "tok".into(),
    };
    publish(ORDERS, codec::encode(&created, "/test").unwrap()).await;
    let done = OrderCompleted {
        order_id: "o-1".into(),
    };
    publish(ORDERS, codec::encode(&done, "/test").unwrap()).await;
    // The same event again under another id (a producer's retry): no second e-mail.
    publish(ORDERS, codec::encode(&done, "/test").unwrap()).await;
    let shipped = ShipmentCreated {
        order_id: "o-1".into(),
        tracking: "TRK-1".into(),
    };
    publish(SHIPPING, codec::encode(&shipped, "/test").unwrap()).await;
    let failed = OrderFailed {
        order_id: "o-2".into(),
        reason: "out of stock".into(),
    };
    publish(ORDERS, codec::encode(&failed, "/test").unwrap()).await;

    let data = h.data_dir();
    let want = {
        let mut v = vec![
            file_name("o-1", MailKind::Confirmation),
            file_name("o-1", MailKind::Shipped),
            file_name("o-2", MailKind::Failure),
        ];
        v.sort();
        v
    };
    eventually("three e-mails", async || mails(&data) == want).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(mails(&data), want);
    let confirmation = std::fs::read_to_string(
        data.join("mail/new")
            .join(file_name("o-1", MailKind::Confirmation)),
    )
    .unwrap();
    assert!(
        confirmation.contains("To: ann@shop.example"),
        "{confirmation}"
    );
    let failure = std::fs::read_to_string(
        data.join("mail/new")
            .join(file_name("o-2", MailKind::Failure)),
    )
    .unwrap();
    assert!(failure.contains("To: order-o-2@shop.example"), "{failure}");
    assert!(failure.contains("out of stock"), "{failure}");
    assert_eq!(
        Notifier::new(store, data).all_sent().await.unwrap().len(),
        3
    );
}
