//! The request/reply cases: a `Requester` against a responder (`Router::respond`) over
//! the bus's transient channel and a store from the backend under test (the bus under
//! `<dir>/bus`, the store under `<dir>/store`). Typed replies, no cross-talk between
//! requesters, timeouts with late replies dropped and counted, repeated requests
//! answered from the store without repeating the effect, expired requests skipped,
//! responder errors as typed remote errors, retryable errors retried in place, no
//! responders failing fast, a responder restart, a responder without effects answering
//! without a commit. None asserts on speed: every wait is a generous upper bound.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use switchyard::reply::{REPLIES, RemoteErrorKind, RequestError, RequestOptions, Requester};
use switchyard::router::{Context, HandlerError, Router, RouterStats};
use switchyard::store::{Store, Table, Txn};
use switchyard::{
    Bus, Envelope, ErrorKind, Event, RedeliveryPolicy, SubscribeOptions, Timestamp, codec,
};

use crate::router_child::{close_both, open_bus, open_store};
use crate::{BusFactory, Settings, StoreFactory};

/// Upper bound for anything that should happen (a disk backend on a busy machine).
const EVENTUALLY: Duration = Duration::from_secs(30);
/// The timeout of requests that are expected to be answered.
const ANSWERED: Duration = Duration::from_secs(30);
/// Where the responder listens.
const REQUESTS: &str = "calc.requests";

pub(crate) async fn dispatch<B: BusFactory, S: StoreFactory>(
    bf: &B,
    sf: &S,
    name: &str,
    dir: &Path,
) {
    match name {
        "a_request_gets_its_typed_reply" => typed_reply(bf, sf, dir).await,
        "concurrent_requesters_each_get_their_own_replies" => no_cross_talk(bf, sf, dir).await,
        "a_timeout_is_typed_and_the_late_reply_is_dropped_and_counted" => {
            timeout_and_late_reply(bf, sf, dir).await
        }
        "a_repeated_request_id_applies_once_and_gets_the_same_reply" => {
            repeated_request(bf, sf, dir).await
        }
        "a_retry_with_the_same_idempotency_key_gets_the_stored_reply" => {
            idempotency_key(bf, sf, dir).await
        }
        "an_expired_request_is_not_processed" => expired_request(bf, sf, dir).await,
        "a_responder_error_arrives_as_a_typed_remote_error" => remote_errors(bf, sf, dir).await,
        "a_request_without_a_responder_fails_fast_with_no_responders" => {
            no_responders(bf, sf, dir).await
        }
        "a_restarted_responder_answers_again_and_a_keyed_retry_applies_once" => {
            responder_restart(bf, sf, dir).await
        }
        "a_responder_without_effects_answers_without_a_commit" => {
            without_effects(bf, sf, dir).await
        }
        "concurrent_requests_with_the_same_key_apply_once" => {
            concurrent_same_key(bf, sf, dir).await
        }
        other => panic!("no reply conformance case `{other}`"),
    }
}

/// The request: double `n`; `tag` names the effect row; optional delay and failure.
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
struct Ask {
    n: u64,
    tag: String,
    sleep_ms: u64,
    /// `terminal:<reason>` or `retryable:<reason>`: the handler fails after writing its effect.
    fail: Option<String>,
}
impl Event for Ask {
    const TYPE: &'static str = "test.ask.v1";
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
struct Answer {
    n: u64,
    doubled: u64,
    tag: String,
}
impl Event for Answer {
    const TYPE: &'static str = "test.answer.v1";
}

/// How many times each tag's effect was committed.
const EFFECTS: Table<u64> = Table::new("effects");

fn ask(n: u64, tag: &str) -> Ask {
    Ask {
        n,
        tag: tag.into(),
        ..Default::default()
    }
}

/// A read-only request: how many times `tag`'s effect was committed (no effects).
#[derive(Serialize, Deserialize, Clone, Debug)]
struct Peek {
    tag: String,
}
impl Event for Peek {
    const TYPE: &'static str = "test.peek.v1";
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
struct Peeked {
    effects: u64,
}
impl Event for Peeked {
    const TYPE: &'static str = "test.peeked.v1";
}

/// A responder service ("calc") over one bus and one store. No outbox relay runs:
/// replies do not go through the outbox.
struct Calc {
    bus: Arc<dyn Bus>,
    store: Arc<dyn Store>,
    stats: Arc<RouterStats>,
    calls: Arc<Mutex<HashMap<String, u32>>>,
    stop: tokio::sync::watch::Sender<bool>,
    router: tokio::task::JoinHandle<switchyard::Result<()>>,
}

impl Calc {
    /// Starts the responder; returns once it is subscribed (requests are received).
    async fn start(bus: Arc<dyn Bus>, store: Arc<dyn Store>) -> Calc {
        let calls = Arc::new(Mutex::new(HashMap::<String, u32>::new()));
        let mut router = Router::new("calc", bus.clone(), store.clone());
        router.options(
            REQUESTS,
            "calc",
            SubscribeOptions {
                redelivery: RedeliveryPolicy {
                    max_attempts: 2,
                    initial_backoff: Duration::from_millis(5),
                    max_backoff: Duration::from_millis(20),
                    multiplier: 2.0,
                    jitter: 0.1,
                },
                ..Default::default()
            },
        );
        let c = calls.clone();
        router.respond(REQUESTS, "calc", move |ctx: Context, ask: Ask| {
            let calls = c.clone();
            async move {
                *calls.lock().unwrap().entry(ask.tag.clone()).or_default() += 1;
                let n = ctx.txn.get(&EFFECTS, &ask.tag).await?.unwrap_or(0);
                ctx.txn.put(&EFFECTS, &ask.tag, &(n + 1))?;
                if ask.sleep_ms > 0 {
                    tokio::time::sleep(Duration::from_millis(ask.sleep_ms)).await;
                }
                match ask.fail.as_deref().map(|f| f.split_once(':')) {
                    Some(Some(("terminal", why))) => return Err(HandlerError::dead_letter(why)),
                    Some(Some(("retryable", why))) => return Err(HandlerError::retryable(why)),
                    _ => {}
                }
                Ok::<_, HandlerError>(Answer {
                    n: ask.n,
                    doubled: ask.n * 2,
                    tag: ask.tag,
                })
            }
        });
        let c = calls.clone();
        router.respond(REQUESTS, "calc", move |ctx: Context, peek: Peek| {
            let calls = c.clone();
            async move {
                *calls
                    .lock()
                    .unwrap()
                    .entry(format!("peek:{}", peek.tag))
                    .or_default() += 1;
                let effects = ctx.txn.get(&EFFECTS, &peek.tag).await?.unwrap_or(0);
                Ok::<_, HandlerError>(Peeked { effects })
            }
        });
        let stats = router.stats();
        let bound = router.bind().await.expect("the responder subscribes");
        let (stop, mut rx) = tokio::sync::watch::channel(false);
        let router = tokio::spawn(bound.run(async move {
            let _ = rx.changed().await;
        }));
        Calc {
            bus,
            store,
            stats,
            calls,
            stop,
            router,
        }
    }

    async fn effects(&self, tag: &str) -> u64 {
        Txn::new(self.store.clone())
            .get(&EFFECTS, tag)
            .await
            .unwrap()
            .unwrap_or(0)
    }

    fn calls(&self, tag: &str) -> u32 {
        self.calls.lock().unwrap().get(tag).copied().unwrap_or(0)
    }

    async fn stop(self) {
        self.stop.send(true).unwrap();
        self.router.await.unwrap().unwrap();
    }
}

/// Opens both backends, starts the responder, runs `case`, stops and closes everything.
async fn with_calc<B, S, F, Fut>(bf: &B, sf: &S, dir: &Path, settings: Settings, case: F)
where
    B: BusFactory,
    S: StoreFactory,
    F: FnOnce(Arc<Calc>) -> Fut,
    Fut: Future<Output = ()>,
{
    let raw_bus = open_bus(bf, dir, &settings);
    let raw_store = open_store(sf, dir);
    let calc = Arc::new(
        Calc::start(
            Arc::new(raw_bus.clone()),
            raw_store.clone() as Arc<dyn Store>,
        )
        .await,
    );
    case(calc.clone()).await;
    let calc = Arc::into_inner(calc).expect("the case let go of the responder");
    calc.stop().await;
    close_both(&raw_bus, sf, &raw_store).await;
}

async fn eventually(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + EVENTUALLY;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(f(), "timed out after {EVENTUALLY:?} waiting for: {what}");
}

fn load(c: &std::sync::atomic::AtomicU64) -> u64 {
    c.load(std::sync::atomic::Ordering::SeqCst)
}

/// Waits until a router counter equals `n` (the router counts after its commit, which
/// races with the reply's delivery), then checks it stays there a moment.
async fn reaches(what: &str, c: &std::sync::atomic::AtomicU64, n: u64) {
    eventually(&format!("{what} == {n}"), || load(c) >= n).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(load(c), n, "{what}");
}

async fn typed_reply<B: BusFactory, S: StoreFactory>(bf: &B, sf: &S, dir: &Path) {
    with_calc(bf, sf, dir, Settings::default(), |calc| async move {
        let requester = Requester::new("shop", calc.bus.clone()).await.unwrap();
        assert!(
            requester.reply_topic().starts_with("_reply.shop."),
            "{}",
            requester.reply_topic()
        );
        let answer: Answer = requester
            .request(REQUESTS, &ask(21, "typed"), ANSWERED)
            .await
            .unwrap();
        assert_eq!(
            answer,
            Answer {
                n: 21,
                doubled: 42,
                tag: "typed".into()
            }
        );
        let s = requester.stats();
        assert_eq!((s.requests, s.replies, s.timeouts), (1, 1, 0), "{s:?}");
        assert_eq!(calc.effects("typed").await, 1);
        assert_eq!(
            calc.store.outbox_len().await.unwrap(),
            0,
            "the reply did not go through the outbox"
        );
        reaches("router stat `replies`", &calc.stats.replies, 1).await;
        // A flow id travels as the flow, not as the exchange's correlation id.
        let again: Answer = requester
            .request_with(
                REQUESTS,
                &ask(1, "typed-flow"),
                RequestOptions::new(ANSWERED).flow("order-7"),
            )
            .await
            .unwrap();
        assert_eq!(again.doubled, 2);
    })
    .await;
}

async fn no_cross_talk<B: BusFactory, S: StoreFactory>(bf: &B, sf: &S, dir: &Path) {
    with_calc(bf, sf, dir, Settings::default(), |calc| async move {
        const EACH: u64 = 25;
        let a = Arc::new(Requester::new("shop", calc.bus.clone()).await.unwrap());
        let b = Arc::new(Requester::new("shop", calc.bus.clone()).await.unwrap());
        assert_ne!(
            a.reply_topic(),
            b.reply_topic(),
            "one reply topic per instance"
        );
        let mut tasks = Vec::new();
        for (name, requester) in [("a", a.clone()), ("b", b.clone())] {
            for i in 0..EACH {
                let requester = requester.clone();
                tasks.push(tokio::spawn(async move {
                    let n = if name == "a" { i } else { 1000 + i };
                    let tag = format!("{name}-{i}");
                    let answer: Answer = requester
                        .request(REQUESTS, &ask(n, &tag), ANSWERED)
                        .await
                        .unwrap();
                    assert_eq!(
                        answer,
                        Answer {
                            n,
                            doubled: 2 * n,
                            tag
                        },
                        "own reply"
                    );
                }));
            }
        }
        for t in tasks {
            t.await.unwrap();
        }
        for (name, r) in [("a", &a), ("b", &b)] {
            let s = r.stats();
            assert_eq!(s.replies, EACH, "{name}: {s:?}");
            assert_eq!(
                (
                    s.late_replies,
                    s.duplicate_replies,
                    s.unknown_replies,
                    s.timeouts
                ),
                (0, 0, 0, 0),
                "{name}: {s:?}"
            );
        }
        reaches("router stat `replies`", &calc.stats.replies, 2 * EACH).await;
    })
    .await;
}

async fn timeout_and_late_reply<B: BusFactory, S: StoreFactory>(bf: &B, sf: &S, dir: &Path) {
    with_calc(bf, sf, dir, Settings::default(), |calc| async move {
        let requester = Requester::new("shop", calc.bus.clone()).await.unwrap();
        // The timeout leaves the responder ample time to start (a request whose deadline
        // passed before it starts is skipped, and would send no late reply).
        let timeout = Duration::from_secs(2);
        let slow = Ask {
            sleep_ms: 4000,
            ..ask(5, "slow")
        };
        let started = Instant::now();
        let err = requester
            .request::<Ask, Answer>(REQUESTS, &slow, timeout)
            .await
            .unwrap_err();
        let took = started.elapsed();
        assert!(
            matches!(err, RequestError::Timeout { timeout: t, .. } if t == timeout),
            "{err:?}"
        );
        assert!(err.is_retryable());
        assert!(took >= timeout, "not before the timeout: {took:?}");
        assert!(took < timeout + EVENTUALLY, "within a safe bound: {took:?}");
        assert_eq!(requester.stats().timeouts, 1);
        // The responder finishes, commits and replies anyway: the reply is dropped and counted.
        eventually("the late reply arrives and is counted", || {
            requester.stats().late_replies == 1
        })
        .await;
        assert_eq!(calc.effects("slow").await, 1, "the effect committed once");
        // The next call gets its own reply, not the late one.
        let answer: Answer = requester
            .request(REQUESTS, &ask(8, "after"), ANSWERED)
            .await
            .unwrap();
        assert_eq!(answer.n, 8);
        let s = requester.stats();
        assert_eq!(
            (s.replies, s.late_replies, s.unknown_replies),
            (1, 1, 0),
            "{s:?}"
        );
    })
    .await;
}

/// A request envelope addressed by hand (not through a `Requester`), replying to `replyto`.
fn manual_request(req: &Ask, replyto: &str, correlation: &str, deadline: Timestamp) -> Envelope {
    let mut env = codec::encode(req, "/test").unwrap();
    env.replyto = Some(replyto.to_string());
    env.correlationid = Some(correlation.to_string());
    env.deadline = Some(deadline);
    env
}

async fn repeated_request<B: BusFactory, S: StoreFactory>(bf: &B, sf: &S, dir: &Path) {
    with_calc(bf, sf, dir, Settings::default(), |calc| async move {
        let bus = calc.bus.clone();
        let mut replies = bus
            .subscribe_transient("test.replies", "test")
            .await
            .unwrap();
        let deadline = Timestamp::now().saturating_add(Duration::from_secs(120));
        let req = manual_request(&ask(4, "dup"), "test.replies", "exchange-1", deadline);
        // The same request (same id) sent twice: applied once, answered twice.
        bus.publish_transient(REQUESTS, req.clone()).await.unwrap();
        let first = tokio::time::timeout(EVENTUALLY, replies.next())
            .await
            .expect("the first reply arrives")
            .unwrap();
        bus.publish_transient(REQUESTS, req.clone()).await.unwrap();
        let second = tokio::time::timeout(EVENTUALLY, replies.next())
            .await
            .expect("the second reply arrives")
            .unwrap();
        for r in [&first, &second] {
            let answer: Answer = codec::decode(r).unwrap();
            assert_eq!(answer.doubled, 8);
            assert_eq!(r.correlationid.as_deref(), Some("exchange-1"));
            assert_eq!(r.causationid, Some(req.id.to_string()));
        }
        assert_eq!(first.event_type, second.event_type);
        assert_eq!(first.data, second.data, "the same reply");
        assert_ne!(first.id, second.id, "re-sent under a fresh id");
        assert_eq!(calc.effects("dup").await, 1, "one effect for two requests");
        assert_eq!(calc.calls("dup"), 1, "the handler ran once");
        reaches("router stat `replies`", &calc.stats.replies, 1).await;
        reaches(
            "router stat `replies_resent`",
            &calc.stats.replies_resent,
            1,
        )
        .await;

        // Through a requester: a copy of its request (seen by a second group on the
        // request topic) sent again reaches an exchange that was already answered; its
        // reply is dropped and counted.
        let requester = Requester::new("shop", bus.clone()).await.unwrap();
        let mut tap = bus.subscribe_transient(REQUESTS, "tap").await.unwrap();
        let answer: Answer = requester
            .request(REQUESTS, &ask(6, "dup2"), ANSWERED)
            .await
            .unwrap();
        assert_eq!(answer.doubled, 12);
        let copy = tokio::time::timeout(EVENTUALLY, tap.next())
            .await
            .expect("the tap sees the request")
            .unwrap();
        bus.publish_transient(REQUESTS, (*copy).clone())
            .await
            .unwrap();
        eventually("the second reply is dropped as a duplicate", || {
            requester.stats().duplicate_replies == 1
        })
        .await;
        assert_eq!(calc.effects("dup2").await, 1);
        assert_eq!(calc.calls("dup2"), 1, "the handler did not run again");
        let s = requester.stats();
        assert_eq!(
            (s.replies, s.late_replies, s.unknown_replies),
            (1, 0, 0),
            "{s:?}"
        );
    })
    .await;
}

async fn idempotency_key<B: BusFactory, S: StoreFactory>(bf: &B, sf: &S, dir: &Path) {
    with_calc(bf, sf, dir, Settings::default(), |calc| async move {
        let requester = Requester::new("shop", calc.bus.clone()).await.unwrap();
        let options = || RequestOptions::new(ANSWERED).idempotency_key("saga-1/step-2/forward");
        let first: Answer = requester
            .request_with(REQUESTS, &ask(3, "keyed"), options())
            .await
            .unwrap();
        // A retry: a new request (new id, new exchange) with the same key.
        let second: Answer = requester
            .request_with(REQUESTS, &ask(3, "keyed"), options())
            .await
            .unwrap();
        assert_eq!(first, second, "the same reply");
        assert_eq!(calc.effects("keyed").await, 1, "the effect applied once");
        assert_eq!(calc.calls("keyed"), 1, "the handler ran once");
        reaches(
            "router stat `replies_resent`",
            &calc.stats.replies_resent,
            1,
        )
        .await;
        assert_eq!(requester.stats().replies, 2);
    })
    .await;
}

async fn expired_request<B: BusFactory, S: StoreFactory>(bf: &B, sf: &S, dir: &Path) {
    with_calc(bf, sf, dir, Settings::default(), |calc| async move {
        let bus = calc.bus.clone();
        let mut replies = bus
            .subscribe_transient("test.replies", "test")
            .await
            .unwrap();
        let past = Timestamp::from_unix_micros(Timestamp::now().unix_micros() - 1_000_000);
        bus.publish_transient(
            REQUESTS,
            manual_request(&ask(1, "expired"), "test.replies", "exchange-x", past),
        )
        .await
        .unwrap();
        let stats = calc.stats.clone();
        eventually("the expired request is dropped and counted", || {
            load(&stats.expired) == 1
        })
        .await;
        // The responder is alive and answers a request in time.
        let requester = Requester::new("shop", bus.clone()).await.unwrap();
        let answer: Answer = requester
            .request(REQUESTS, &ask(2, "fresh"), ANSWERED)
            .await
            .unwrap();
        assert_eq!(answer.doubled, 4);
        assert_eq!(calc.calls("expired"), 0, "the handler never ran");
        assert_eq!(calc.effects("expired").await, 0);
        reaches(
            "only the fresh request was answered",
            &calc.stats.replies,
            1,
        )
        .await;
        let nothing = tokio::time::timeout(Duration::from_millis(200), replies.next()).await;
        assert!(nothing.is_err(), "no reply to the expired request");
    })
    .await;
}

async fn remote_errors<B: BusFactory, S: StoreFactory>(bf: &B, sf: &S, dir: &Path) {
    with_calc(bf, sf, dir, Settings::default(), |calc| async move {
        let requester = Requester::new("shop", calc.bus.clone()).await.unwrap();
        let refused = Ask {
            fail: Some("terminal:out of stock".into()),
            ..ask(1, "refused")
        };
        let options = || RequestOptions::new(ANSWERED).idempotency_key("refused-1");
        let err = requester
            .request_with::<Ask, Answer>(REQUESTS, &refused, options())
            .await
            .unwrap_err();
        match &err {
            RequestError::Remote { kind, reason } => {
                assert_eq!(*kind, RemoteErrorKind::Terminal);
                assert!(reason.contains("out of stock"), "{reason}");
            }
            other => panic!("expected a remote terminal error, got {other:?}"),
        }
        assert!(!err.is_retryable());
        assert_eq!(calc.effects("refused").await, 0, "a refusal's effects are discarded");
        // Asking again with the same key gets the same refusal, from the store.
        let again = requester
            .request_with::<Ask, Answer>(REQUESTS, &refused, options())
            .await
            .unwrap_err();
        assert!(
            matches!(&again, RequestError::Remote { kind: RemoteErrorKind::Terminal, reason } if reason.contains("out of stock")),
            "{again:?}"
        );
        assert_eq!(calc.calls("refused"), 1, "answered from the store");
        assert!(
            calc.bus.dead_letters(REQUESTS, 10).await.unwrap().is_empty(),
            "a refusal is an answer, not a dead letter"
        );

        // Retryable: retried in place per the route's policy (2 attempts), then answered
        // as a retryable remote error.
        let flaky = Ask {
            fail: Some("retryable:bank down".into()),
            ..ask(1, "flaky")
        };
        let err = requester
            .request::<Ask, Answer>(REQUESTS, &flaky, ANSWERED)
            .await
            .unwrap_err();
        match &err {
            RequestError::Remote { kind, reason } => {
                assert_eq!(*kind, RemoteErrorKind::Retryable);
                assert!(reason.contains("bank down"), "{reason}");
            }
            other => panic!("expected a remote retryable error, got {other:?}"),
        }
        assert!(err.is_retryable());
        assert_eq!(calc.calls("flaky"), 2, "every attempt ran");
        assert_eq!(calc.effects("flaky").await, 0, "a failed attempt's effects are discarded");
        reaches("router stat `retried`", &calc.stats.retried, 1).await;
        assert!(
            calc.bus.dead_letters(REQUESTS, 10).await.unwrap().is_empty(),
            "the caller has its answer: nothing is dead-lettered"
        );
        // Not stored: the same key asked again runs the handler again.
        let again = requester
            .request_with::<Ask, Answer>(
                REQUESTS,
                &flaky,
                RequestOptions::new(ANSWERED).idempotency_key("flaky-1"),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(&again, RequestError::Remote { kind: RemoteErrorKind::Retryable, .. }),
            "{again:?}"
        );
        assert_eq!(calc.calls("flaky"), 4, "a retryable failure is not stored");

        // A request no responder of the route knows is refused at once.
        let err = requester
            .request::<Answer, Answer>(
                REQUESTS,
                &Answer {
                    n: 1,
                    doubled: 2,
                    tag: "x".into(),
                },
                ANSWERED,
            )
            .await
            .unwrap_err();
        assert!(
            matches!(&err, RequestError::Remote { kind: RemoteErrorKind::Terminal, reason } if reason.contains("unknown request type")),
            "{err:?}"
        );
    })
    .await;
}

async fn no_responders<B: BusFactory, S: StoreFactory>(bf: &B, sf: &S, dir: &Path) {
    with_calc(bf, sf, dir, Settings::default(), |calc| async move {
        let requester = Requester::new("shop", calc.bus.clone()).await.unwrap();
        let started = Instant::now();
        let err = requester
            .request::<Ask, Answer>("nobody.listens", &ask(1, "void"), ANSWERED)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, RequestError::NoResponders { topic } if topic == "nobody.listens"),
            "{err:?}"
        );
        assert!(err.is_retryable(), "a responder may start later");
        assert!(
            started.elapsed() < ANSWERED,
            "failed without waiting for the timeout: {:?}",
            started.elapsed()
        );
        let s = requester.stats();
        assert_eq!(
            (s.no_responders, s.requests, s.timeouts),
            (1, 0, 0),
            "{s:?}"
        );
        // The bus says the same to a plain transient publish.
        let e = calc
            .bus
            .publish_transient(
                "nobody.listens",
                codec::encode(&ask(1, "void"), "/t").unwrap(),
            )
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NoSubscribers);
        // A durable subscriber of the same topic name is not a responder.
        let _durable = calc
            .bus
            .subscribe("nobody.listens", "g", SubscribeOptions::default())
            .await
            .unwrap();
        let err = requester
            .request::<Ask, Answer>("nobody.listens", &ask(1, "void"), ANSWERED)
            .await
            .unwrap_err();
        assert!(matches!(err, RequestError::NoResponders { .. }), "{err:?}");
        assert_eq!(calc.calls("void"), 0);
    })
    .await;
}

async fn responder_restart<B: BusFactory, S: StoreFactory>(bf: &B, sf: &S, dir: &Path) {
    let raw_bus = open_bus(bf, dir, &Settings::default());
    let raw_store = open_store(sf, dir);
    let bus: Arc<dyn Bus> = Arc::new(raw_bus.clone());
    let store: Arc<dyn Store> = raw_store.clone();
    let requester = Requester::new("shop", bus.clone()).await.unwrap();
    let calc = Calc::start(bus.clone(), store.clone()).await;
    let before: Answer = requester
        .request(REQUESTS, &ask(1, "before"), ANSWERED)
        .await
        .unwrap();
    assert_eq!(before.doubled, 2);
    calc.stop().await;

    // Down: the request fails fast (no responder) or times out; nothing is applied.
    let keyed = || RequestOptions::new(Duration::from_secs(2)).idempotency_key("restart-1");
    let err = requester
        .request_with::<Ask, Answer>(REQUESTS, &ask(5, "restart"), keyed())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            RequestError::NoResponders { .. } | RequestError::Timeout { .. }
        ),
        "{err:?}"
    );
    assert!(err.is_retryable());

    // Up again (the same store): the retry with the same key applies the effect once,
    // and another retry gets the stored reply.
    let calc = Calc::start(bus.clone(), store.clone()).await;
    assert_eq!(
        calc.effects("restart").await,
        0,
        "nothing applied while down"
    );
    let retry = || RequestOptions::new(ANSWERED).idempotency_key("restart-1");
    let first: Answer = requester
        .request_with(REQUESTS, &ask(5, "restart"), retry())
        .await
        .unwrap();
    let second: Answer = requester
        .request_with(REQUESTS, &ask(5, "restart"), retry())
        .await
        .unwrap();
    assert_eq!(first.doubled, 10);
    assert_eq!(first, second);
    assert_eq!(calc.effects("restart").await, 1, "applied once");
    assert_eq!(
        calc.calls("restart"),
        1,
        "the second retry was answered from the store"
    );
    let s = requester.stats();
    assert_eq!(s.replies, 3, "{s:?}");
    assert_eq!(s.no_responders + s.timeouts, 1, "{s:?}");
    calc.stop().await;
    drop(requester);
    close_both(&raw_bus, sf, &raw_store).await;
}

async fn without_effects<B: BusFactory, S: StoreFactory>(bf: &B, sf: &S, dir: &Path) {
    with_calc(bf, sf, dir, Settings::default(), |calc| async move {
        let requester = Requester::new("shop", calc.bus.clone()).await.unwrap();
        let _: Answer = requester
            .request(REQUESTS, &ask(1, "seen"), ANSWERED)
            .await
            .unwrap();
        let stored_before = Txn::new(calc.store.clone())
            .scan(&REPLIES, "", 1000)
            .await
            .unwrap()
            .len();
        assert_eq!(stored_before, 1, "the effectful request stored its reply");
        let keyed = || RequestOptions::new(ANSWERED).idempotency_key("peek-1");
        let peek = Peek { tag: "seen".into() };
        let a: Peeked = requester
            .request_with(REQUESTS, &peek, keyed())
            .await
            .unwrap();
        let b: Peeked = requester
            .request_with(REQUESTS, &peek, keyed())
            .await
            .unwrap();
        assert_eq!((a.effects, b.effects), (1, 1));
        assert_eq!(
            calc.calls("peek:seen"),
            2,
            "nothing was stored, so the repeat ran the handler again"
        );
        let stored_after = Txn::new(calc.store.clone())
            .scan(&REPLIES, "", 1000)
            .await
            .unwrap()
            .len();
        assert_eq!(
            stored_after, stored_before,
            "no reply stored without effects"
        );
        assert_eq!(load(&calc.stats.replies_resent), 0);
        reaches("router stat `replies`", &calc.stats.replies, 3).await;
    })
    .await;
}

async fn concurrent_same_key<B: BusFactory, S: StoreFactory>(bf: &B, sf: &S, dir: &Path) {
    with_calc(bf, sf, dir, Settings::default(), |calc| async move {
        // The effect row exists, so both handler runs read (and would overwrite) it.
        let seed = Txn::new(calc.store.clone());
        seed.put(&EFFECTS, "race", &10).unwrap();
        seed.commit().await.unwrap();
        let requester = Arc::new(Requester::new("shop", calc.bus.clone()).await.unwrap());
        // Two requests (two ids, two exchanges) with one key, both in the handler at once:
        // one commits, the other's commit conflicts and it answers with the stored reply.
        let slow = Ask {
            sleep_ms: 200,
            ..ask(7, "race")
        };
        let send = |requester: Arc<Requester>, slow: Ask| async move {
            requester
                .request_with::<Ask, Answer>(
                    REQUESTS,
                    &slow,
                    RequestOptions::new(ANSWERED).idempotency_key("race-1"),
                )
                .await
                .unwrap()
        };
        let (a, b) = tokio::join!(
            send(requester.clone(), slow.clone()),
            send(requester.clone(), slow)
        );
        assert_eq!(a, b, "the same reply to both");
        assert_eq!(calc.effects("race").await, 11, "applied once");
        reaches("router stat `replies`", &calc.stats.replies, 1).await;
        reaches(
            "router stat `replies_resent`",
            &calc.stats.replies_resent,
            1,
        )
        .await;
        let s = requester.stats();
        assert_eq!((s.replies, s.duplicate_replies), (2, 0), "{s:?}");
    })
    .await;
}
