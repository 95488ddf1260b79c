//! Payment over real gRPC, and as a bus responder.

use std::sync::Arc;
use std::time::Duration;

use shop::model::{ChargeReply, ChargeRequest, PAYMENT_REQUESTS, RefundReply, RefundRequest};
use shop::services::payment::{self, DECLINE_TOKEN, PaymentClient, PaymentError, Payments};
use switchyard::reply::{RequestOptions, Requester};
use switchyard::router::Router;
use switchyard::store::Store;
use switchyard_rpc::CallOptions;

use crate::support::{Harness, listener};

fn charge(order: &str, customer: &str, cents: u64, token: &str) -> ChargeRequest {
    ChargeRequest {
        order_id: order.into(),
        customer: customer.into(),
        amount_cents: cents,
        payment_token: token.into(),
    }
}

async fn setup() -> (Harness, Arc<dyn Store>, PaymentClient) {
    let mut h = Harness::new();
    let store = h.store("payment");
    let running = payment::start(store.clone(), listener().await, h.shutdown())
        .await
        .unwrap();
    h.register(payment::SERVICE, &running);
    let client = PaymentClient::new(&h.grpc);
    (h, store, client)
}

fn key(k: &str) -> CallOptions {
    CallOptions::new().idempotency_key(k)
}

#[tokio::test]
async fn charges_declines_and_refunds_over_grpc() {
    let (_h, store, client) = setup().await;
    let ledger = async || Payments::new(store.clone()).ledger().await.unwrap();

    let ok = client
        .charge(&charge("o-1", "ann", 4_200, "tok_ok"), &key("o-1:charge"))
        .await
        .unwrap();
    assert_eq!((ok.status.as_str(), ok.amount_cents), ("succeeded", 4_200));
    // Same key: the same charge, charged once.
    let again = client
        .charge(&charge("o-1", "ann", 4_200, "tok_ok"), &key("o-1:charge"))
        .await
        .unwrap();
    assert_eq!(again.charge_id, ok.charge_id);
    assert_eq!(ledger().await.charges.get("o-1"), Some(&1));
    assert_eq!(ledger().await.charged.get("o-1"), Some(&4_200));
    // Same key, different amount: a clear error, nothing charged.
    match client
        .charge(&charge("o-1", "ann", 9_999, "tok_ok"), &key("o-1:charge"))
        .await
    {
        Err(PaymentError::KeyReused { detail, .. }) => {
            assert!(detail.contains("o-1"), "{detail}")
        }
        other => panic!("expected KeyReused, got {other:?}"),
    }

    // Declines: over the limit, a broke customer, the decline token. Nothing recorded.
    for (req, why) in [
        (charge("o-2", "ann", 100_001, "tok_ok"), "limit"),
        (charge("o-3", "broke-bob", 1, "tok_ok"), "limit"),
        (charge("o-4", "vip-cy", 50, DECLINE_TOKEN), "declined"),
    ] {
        match client
            .charge(&req, &key(&format!("{}:charge", req.order_id)))
            .await
        {
            Err(PaymentError::Declined { reason }) => assert!(reason.contains(why), "{reason}"),
            other => panic!("expected Declined, got {other:?}"),
        }
        assert!(!ledger().await.charged.contains_key(&req.order_id));
    }
    // A VIP may spend more.
    client
        .charge(
            &charge("o-5", "vip-cy", 5_000_000, "tok_ok"),
            &key("o-5:charge"),
        )
        .await
        .unwrap();

    // Refund: once, however often asked.
    let r1 = client
        .refund("o-1", &ok.charge_id, &key("o-1:refund"))
        .await
        .unwrap();
    let r2 = client
        .refund("o-1", &ok.charge_id, &CallOptions::new())
        .await
        .unwrap();
    assert_eq!(r1.refund_id, r2.refund_id);
    assert_eq!(r1.amount_cents, 4_200);
    assert_eq!(ledger().await.refunded.get("o-1"), Some(&4_200));
    assert_eq!(ledger().await.net("o-1"), 0);
    assert!(matches!(
        client
            .refund("o-1", "ch_unknown", &CallOptions::new())
            .await,
        Err(PaymentError::UnknownCharge { .. })
    ));
    assert!(ledger().await.charged_twice().is_empty());
}

#[tokio::test]
async fn bad_input_is_invalid_argument_naming_the_field() {
    let (_h, store, client) = setup().await;
    for (req, field) in [
        (charge("", "ann", 1, "tok"), "order_id"),
        (charge("o/1", "ann", 1, "tok"), "order_id"),
        (charge("o-1", "", 1, "tok"), "customer"),
        (charge("o-1", "ann", 0, "tok"), "amount_cents"),
        (charge("o-1", "ann", 1, " "), "payment_token"),
    ] {
        let err = client.charge(&req, &CallOptions::new()).await.unwrap_err();
        match err {
            PaymentError::Invalid(i) => assert_eq!(i.field, field),
            other => panic!("expected Invalid({field}), got {other:?}"),
        }
    }
    // The raw status is INVALID_ARGUMENT.
    let mut raw = payment::proto::payment_client::PaymentClient::new(h_channel(&_h));
    let status = raw
        .charge(payment::proto::ChargeRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let status = raw
        .refund(payment::proto::RefundRequest {
            order_id: "o-1".into(),
            charge_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        Payments::new(store)
            .ledger()
            .await
            .unwrap()
            .charged
            .is_empty()
    );
}

fn h_channel(h: &Harness) -> switchyard_rpc::grpc::GrpcChannel {
    h.grpc.channel(payment::SERVICE)
}

#[tokio::test]
async fn the_bus_responder_answers_a_requester() {
    let h = Harness::new();
    let bus = h.bus(true);
    let store = h.store("payment");
    let mut router = Router::new(payment::SERVICE, bus.clone(), store.clone());
    payment::respond(&mut router);
    let _router = h.run_router(router).await;
    let requester = Requester::new("order", bus.clone()).await.unwrap();
    let opts = |k: &str| RequestOptions::new(Duration::from_secs(5)).idempotency_key(k);

    let req = charge("o-1", "ann", 1_500, "tok_ok");
    let a: ChargeReply = requester
        .request_with(PAYMENT_REQUESTS, &req, opts("o-1:charge"))
        .await
        .unwrap();
    let b: ChargeReply = requester
        .request_with(PAYMENT_REQUESTS, &req, opts("o-1:charge"))
        .await
        .unwrap();
    assert_eq!(a.charge_id, b.charge_id);
    assert_eq!(a.amount_cents, 1_500);
    let ledger = Payments::new(store.clone()).ledger().await.unwrap();
    assert_eq!(ledger.charges.get("o-1"), Some(&1));

    let declined = requester
        .request_with::<_, ChargeReply>(
            PAYMENT_REQUESTS,
            &charge("o-2", "ann", 10, DECLINE_TOKEN),
            opts("o-2:charge"),
        )
        .await
        .unwrap_err();
    match PaymentError::from_request_error(declined) {
        PaymentError::Declined { reason } => assert!(reason.contains(DECLINE_TOKEN), "{reason}"),
        other => panic!("expected Declined, got {other:?}"),
    }

    let refund = RefundRequest {
        order_id: "o-1".into(),
        charge_id: a.charge_id.clone(),
    };
    let r1: RefundReply = requester
        .request_with(PAYMENT_REQUESTS, &refund, opts("o-1:refund"))
        .await
        .unwrap();
    let r2: RefundReply = requester
        .request_with(PAYMENT_REQUESTS, &refund, opts("o-1:refund:again"))
        .await
        .unwrap();
    assert_eq!(r1.refund_id, r2.refund_id);
    let ledger = Payments::new(store).ledger().await.unwrap();
    assert_eq!(ledger.net("o-1"), 0);
}
