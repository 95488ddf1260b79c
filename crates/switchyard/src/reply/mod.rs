//! Request/reply over the bus: ask a service and wait for its correlated answer.
//!
//! The calling side is a [`Requester`], one per service instance; the answering side is
//! a router handler registered with [`Router::respond`](crate::router::Router::respond),
//! whose return value becomes the reply.
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use std::time::Duration;
//! use switchyard::reply::Requester;
//! use switchyard::router::{Context, HandlerError, Router};
//! # #[derive(serde::Serialize, serde::Deserialize)] struct Reserve { sku: String }
//! # impl switchyard::Event for Reserve { const TYPE: &'static str = "stock.reserve.v1"; }
//! # #[derive(serde::Serialize, serde::Deserialize)] struct Reserved { left: u32 }
//! # impl switchyard::Event for Reserved { const TYPE: &'static str = "stock.reserved.v1"; }
//! # async fn demo(bus: Arc<dyn switchyard::Bus>, store: Arc<dyn switchyard::store::Store>) -> Result<(), Box<dyn std::error::Error>> {
//! // Responder (the inventory service); its outbox relay must run for replies to leave.
//! let mut router = Router::new("inventory", bus.clone(), store.clone());
//! router.respond("inventory.requests", "inventory", |ctx: Context, r: Reserve| async move {
//!     Ok::<_, HandlerError>(Reserved { left: 41 })
//! });
//! tokio::spawn(router.run(std::future::pending()));
//! tokio::spawn(switchyard::relay::OutboxRelay::new(store, bus.clone()).run(std::future::pending()));
//!
//! // Caller (one requester per process of the order service).
//! let requester = Requester::new("order", bus).await?;
//! let reply: Reserved = requester
//!     .request("inventory.requests", &Reserve { sku: "s-1".into() }, Duration::from_secs(2))
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! # The exchange
//!
//! 1. The requester publishes the request to the responder's topic with `replyto` = its
//!    own reply topic, `correlationid` = a fresh id naming this exchange, `deadline` =
//!    now + timeout, and the request's own `id` (the responder's dedup key).
//! 2. The responder's router checks the deadline (expired: acked, not processed,
//!    counted in [`RouterStats::expired`](crate::router::RouterStats::expired)), then the
//!    stored replies (already answered: the same reply again), then runs the handler in a
//!    transaction and commits, atomically, the handler's effects, the inbox mark, the
//!    reply stored under the request's key ([`REPLIES`]) and the reply itself as an
//!    outbox entry addressed to `replyto`. Then it acks the request.
//! 3. The outbox relay publishes the reply; the requester's consumer matches its
//!    `correlationid` to the waiting call, hands it over and acks it.
//!
//! # Decisions
//!
//! - **One reply topic per instance** (`_reply.<service>.<instance-uuid>`, group
//!   `requester`, starting at the latest message). Replies must reach the one process
//!   whose call is waiting. A shared reply topic with one group would hand a reply to
//!   whichever instance competes for it first (whose waiter map does not know it); a
//!   shared topic with a group per instance would make every instance read every other
//!   instance's replies. A topic of its own makes the bus route each reply to exactly
//!   its requester, and `Latest` means a new instance never reads replies meant for an
//!   earlier process (whose waiters died with it). Cost: every start of a process makes
//!   a topic; the bus contract has no topic deletion yet, so durable backends keep the
//!   (empty, consumed) topic until one is added. One `Requester` per process suffices:
//!   it is `Send + Sync` and serves any number of concurrent calls.
//! - **`correlationid` names the exchange, not the business flow.** It must be unique
//!   per call to match replies safely. The caller's business correlation (given as
//!   [`RequestOptions::flow`], or already on an envelope passed to
//!   [`Requester::request_envelope`]) travels in the [`FLOW_EXTENSION`] extension of
//!   the request and of its reply; events a responder publishes through
//!   [`Context::publish`](crate::router::Context::publish) carry that flow as their
//!   `correlationid` (and the request's id as `causationid`), so choreography timelines
//!   stay whole. [`flow_of`] reads the flow of either kind of envelope.
//! - **Timeouts** cover the publish and the wait. On [`RequestError::Timeout`] the
//!   waiter is removed; a reply arriving later is dropped and counted
//!   ([`RequesterStats::late_replies`]), never handed to another call (correlation ids
//!   are never reused). Further replies to an answered call (a repeated request) count
//!   as [`RequesterStats::duplicate_replies`], replies with an id this instance never
//!   issued (or issued more than 10 minutes ago) as [`RequesterStats::unknown_replies`].
//!   Every reply is acked once matched or dropped. A call whose future is dropped counts
//!   as given up, like a timeout.
//! - **Idempotent responders.** The reply is stored in the responder's store under the
//!   request's key (its [`IDEMPOTENCY_KEY_EXTENSION`] if it has one, else its id) in the
//!   same commit as the effect. A repeated request (a redelivery, or a retry with the
//!   same id or key) gets the stored reply again — re-addressed to *its* `replyto` and
//!   `correlationid`, under a fresh message id so bus dedup does not swallow it — and the
//!   handler does not run. Note that the bus's publisher dedup drops a re-published
//!   request with the same id within its window (2 minutes by default), so a caller that
//!   retries after a timeout should send a new request with the same idempotency key
//!   ([`RequestOptions::idempotency_key`]). Stored replies are forgotten after the
//!   router's inbox window.
//! - **Responder errors are answers.** A terminal [`HandlerError`](crate::router::HandlerError)
//!   is replied as [`RequestError::Remote`] with [`RemoteErrorKind::Terminal`] and the
//!   request is acked — not dead-lettered: the caller has its answer, and the error is
//!   stored like a success, so a retry gets the same refusal. The handler's effects are
//!   discarded. A retryable error follows the route's redelivery policy; if the request
//!   expires meanwhile it is dropped (the caller has timed out). When the last attempt
//!   fails, the caller gets [`RemoteErrorKind::Retryable`] (not stored: a later request
//!   may succeed) and the request goes to the DLQ as usual. A request that cannot be
//!   decoded is answered with a terminal error; one of a type no handler of the route
//!   knows, or without `replyto`, goes to the DLQ.
//! - **The deadline is checked before the handler runs**, not after: a handler that
//!   started in time commits its effect and reply even if the caller gave up meanwhile
//!   (that reply is then late, and counted).
//! - **The outbox relay must run** ([`OutboxRelay`](crate::relay::OutboxRelay)) on the
//!   responder's store: replies leave through the outbox, so a crash after the commit
//!   never loses a reply whose effect committed.

mod requester;
mod wire;

pub use requester::{Requester, RequesterStats};
pub use wire::{
    ERROR_REPLY_TYPE, ErrorReply, FLOW_EXTENSION, IDEMPOTENCY_KEY_EXTENSION, REPLIES,
    REPLY_TOPIC_PREFIX, REQUESTER_GROUP, RemoteErrorKind, StoredReply, flow_of,
};
pub(crate) use wire::{REPLIES_BY_TIME, reply_key, time_key};

use std::time::Duration;

use crate::codec::DecodeError;

/// Why a request got no usable reply.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// No reply within the timeout (the request may still be processed; its reply will
    /// be dropped and counted as late).
    #[error(
        "no reply from `{topic}` within {timeout:?}; is a responder running for that topic, and its outbox relay?"
    )]
    Timeout {
        /// Where the request went.
        topic: String,
        /// The timeout that passed.
        timeout: Duration,
    },
    /// The responder's handler failed and said so.
    #[error("the responder failed ({kind}): {reason}")]
    Remote {
        /// Terminal (asking again gets the same answer) or retryable (a later request may succeed).
        kind: RemoteErrorKind,
        /// The handler's reason.
        reason: String,
    },
    /// The request could not be encoded.
    #[error("cannot send the request: {0}")]
    Encode(String),
    /// The reply could not be decoded as the expected response type.
    #[error("the reply does not decode as the expected response: {0}")]
    Decode(#[source] DecodeError),
    /// Publishing the request failed.
    #[error("publishing the request failed: {0}")]
    Bus(#[source] crate::Error),
    /// The requester's reply consumer stopped (the bus closed).
    #[error("the requester stopped (its bus is closed); create a new one")]
    Closed,
}

impl RequestError {
    /// Whether asking again (with the same idempotency key) may give another outcome.
    pub fn is_retryable(&self) -> bool {
        match self {
            RequestError::Timeout { .. } => true,
            RequestError::Remote { kind, .. } => *kind == RemoteErrorKind::Retryable,
            RequestError::Bus(e) => !matches!(
                e.kind(),
                crate::ErrorKind::InvalidInput | crate::ErrorKind::Closed
            ),
            RequestError::Encode(_) | RequestError::Decode(_) | RequestError::Closed => false,
        }
    }
}

/// How to send one request ([`Requester::request_with`]).
#[derive(Debug, Clone)]
pub struct RequestOptions {
    /// How long to wait for the reply, publishing included; also sets the request's
    /// `deadline`.
    pub timeout: Duration,
    /// The business flow (correlation id of the caller's flow), carried in
    /// [`FLOW_EXTENSION`].
    pub flow: Option<String>,
    /// The responder answers every request with this key once (see the module docs).
    pub idempotency_key: Option<String>,
    /// The request's ordering key (default: the request event's `subject()`).
    pub subject: Option<String>,
}

impl RequestOptions {
    /// Options with `timeout` and nothing else.
    pub fn new(timeout: Duration) -> Self {
        RequestOptions {
            timeout,
            flow: None,
            idempotency_key: None,
            subject: None,
        }
    }

    /// Sets the business flow.
    pub fn flow(mut self, flow: impl Into<String>) -> Self {
        self.flow = Some(flow.into());
        self
    }

    /// Sets the idempotency key.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// Sets the subject.
    pub fn subject(mut self, subject: impl Into<String>) -> Self {
        self.subject = Some(subject.into());
        self
    }
}
