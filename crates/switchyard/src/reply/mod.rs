//! Request/reply over the bus: ask a service and wait for its correlated answer.
//!
//! The calling side is a [`Requester`], one per service instance; the answering side is
//! a router handler registered with [`Router::respond`](crate::router::Router::respond),
//! whose return value becomes the reply. Requests and replies travel on the bus's
//! [transient channel](crate::bus#the-transient-channel): nothing about the conversation
//! is persisted; the responder's store commit is what makes its effect durable and
//! exactly once.
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
//! // Responder (the inventory service).
//! let mut router = Router::new("inventory", bus.clone(), store.clone());
//! router.respond("inventory.requests", "inventory", |ctx: Context, r: Reserve| async move {
//!     Ok::<_, HandlerError>(Reserved { left: 41 })
//! });
//! tokio::spawn(router.run(std::future::pending()));
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
//! 1. The requester publishes the request transiently to the responder's topic with
//!    `replyto` = its own reply topic, `correlationid` = a fresh id naming this exchange,
//!    `deadline` = now + timeout, and the request's own `id`. With no responder
//!    subscribed, the publish fails at once: [`RequestError::NoResponders`].
//! 2. One member of the responder's group gets it. It checks the deadline (expired:
//!    dropped, counted in [`RouterStats::expired`](crate::router::RouterStats::expired)),
//!    then the stored replies (answered before: the same reply again, the handler does
//!    not run), then runs the handler in a transaction. If the handler changed the store,
//!    its effects, the inbox mark of the request and the reply stored under the request's
//!    key ([`REPLIES`]) are committed atomically, *then* the reply is sent. If it changed
//!    nothing, the reply is sent without a commit.
//! 3. The requester's consumer matches the reply's `correlationid` to the waiting call
//!    and hands it over.
//!
//! # Decisions
//!
//! - **Transient, not durable** (decision 0006 in `docs/decisions`). A request whose
//!   caller timed out or died is useless, and a retry with the same idempotency key
//!   recovers anything lost in transit; durability and exactly-once of the *effect* come
//!   from the responder's commit (inbox mark + stored reply), not from persisting the
//!   messages. Persisting them cost three sequential fsyncs per round trip. A lost
//!   request or reply (a responder or requester restart) shows up as a timeout.
//! - **One reply topic per instance** (`_reply.<service>.<instance-uuid>`, group
//!   `requester`). Replies must reach the one process whose call is waiting; a topic of
//!   its own makes the bus route each reply to exactly its requester, and a new process
//!   never sees replies meant for an earlier one (its subscription did not exist then).
//!   One `Requester` per process suffices: it is `Send + Sync` and serves any number of
//!   concurrent calls.
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
//!   A call whose future is dropped counts as given up, like a timeout.
//! - **No responders fail fast.** A request to a topic without a responder fails with
//!   [`RequestError::NoResponders`] at once (like NATS's no-responders status) instead
//!   of waiting out its timeout; it is retryable (a responder may start).
//! - **Idempotent responders.** A reply whose handler made effects is stored in the
//!   responder's store under the request's key (its [`IDEMPOTENCY_KEY_EXTENSION`] if it
//!   has one, else its id) in the same commit as the effect. A repeated request (a retry
//!   with the same key, or the same envelope sent again) gets the stored reply again —
//!   re-addressed to *its* `replyto` and `correlationid`, under a fresh message id — and
//!   the handler does not run. A handler without effects has nothing to duplicate: a
//!   repeat runs it again. A caller that retries after a timeout sends a new request
//!   with the same idempotency key ([`RequestOptions::idempotency_key`]). Stored replies
//!   are forgotten after the router's inbox window.
//! - **Responder errors are answers.** A terminal [`HandlerError`](crate::router::HandlerError)
//!   is replied as [`RequestError::Remote`] with [`RemoteErrorKind::Terminal`]; the
//!   refusal is stored like a success (so a retry gets the same refusal) and the
//!   handler's effects are discarded. A retryable error (a panic counts as one) is
//!   retried in place with the route's redelivery policy (backoff, max attempts) but
//!   never past the request's deadline; then the caller gets
//!   [`RemoteErrorKind::Retryable`] (not stored: a later request may succeed). Nothing
//!   goes to a dead-letter queue: the caller has its answer. A request that cannot be
//!   decoded, or of a type no responder of the route knows, is answered with a terminal
//!   error; one without `replyto` is dropped and counted.
//! - **The deadline is checked before the handler runs**, not after: a handler that
//!   started in time commits its effect and replies even if the caller gave up meanwhile
//!   (that reply is then late, and counted).
//! - **Backpressure.** A responder runs at most its route's `concurrency` requests at
//!   once; requests beyond that wait in its bounded transient queue, and a request that
//!   waited past its deadline is skipped. A publisher never blocks on a full queue (see
//!   [`crate::bus::transient`]).

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
        "no reply from `{topic}` within {timeout:?}; the responder is slow or stopped meanwhile: retry with the same idempotency key, or raise the timeout"
    )]
    Timeout {
        /// Where the request went.
        topic: String,
        /// The timeout that passed.
        timeout: Duration,
    },
    /// No responder is subscribed to the topic: nothing was sent, and asking again
    /// before one starts gets the same answer at once.
    #[error(
        "no responder for `{topic}`: no Router::respond is running on that topic; start the responder or check the topic name"
    )]
    NoResponders {
        /// Where the request was to go.
        topic: String,
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
            RequestError::Timeout { .. } | RequestError::NoResponders { .. } => true,
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
