//! What request/reply puts on the bus and in the responder's store: the attribute names,
//! the error reply, the stored reply and how a reply envelope is addressed.

use serde::{Deserialize, Serialize};

use crate::envelope::{Envelope, JSON_CONTENT_TYPE, MessageId, Timestamp};
use crate::store::Table;

/// First segment of every requester's reply topic: `_reply.<service>.<instance-uuid>`.
pub const REPLY_TOPIC_PREFIX: &str = "_reply";

/// The consumer group a requester reads its reply topic with.
pub const REQUESTER_GROUP: &str = "requester";

/// Extension carrying the caller's business correlation id (the flow) on a request and
/// its reply, while `correlationid` names the one request/reply exchange.
pub const FLOW_EXTENSION: &str = "flowid";

/// Extension carrying the caller's idempotency key: a responder that already answered a
/// request with this key (on this route) answers again from its store, without running
/// the handler. Without it, the request id is the key.
pub const IDEMPOTENCY_KEY_EXTENSION: &str = "idempotencykey";

/// The `type` of a reply that reports a responder's failure ([`ErrorReply`] payload).
pub const ERROR_REPLY_TYPE: &str = "switchyard.reply.error.v1";

/// Where a responder keeps the replies it sent, keyed by route and request key
/// (see [`crate::reply`]), so a repeated request gets the same reply.
pub const REPLIES: Table<StoredReply> = Table::new("_switchyard.replies");

/// Index of [`REPLIES`] by time (`<micros, 20 digits>|<replies key>` → replies key), so the
/// router can forget stored replies older than its inbox window.
pub(crate) const REPLIES_BY_TIME: Table<String> = Table::new("_switchyard.replies_by_time");

/// Whether a responder's failure is worth retrying (it mirrors the handler's
/// [`HandlerError`](crate::router::HandlerError)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RemoteErrorKind {
    /// The responder refused the request (invalid input, a business rule): asking again
    /// gets the same answer.
    Terminal,
    /// The responder failed on its last attempt with a transient error; a new request
    /// (later) may succeed.
    Retryable,
}

impl std::fmt::Display for RemoteErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RemoteErrorKind::Terminal => "terminal",
            RemoteErrorKind::Retryable => "retryable",
        })
    }
}

/// The payload of an [`ERROR_REPLY_TYPE`] reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// Terminal or retryable.
    pub kind: RemoteErrorKind,
    /// What the responder's handler said.
    pub reason: String,
}

/// A reply as a responder stores it: enough to send the same reply again to a repeated
/// request (addressed to that request's `replyto` and correlation id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredReply {
    /// The reply's `type` (the response event's, or [`ERROR_REPLY_TYPE`]).
    pub event_type: String,
    /// The reply's JSON payload, as text.
    pub data: String,
    /// The request that produced it first.
    pub request_id: MessageId,
    /// When it was stored.
    pub at: Timestamp,
}

impl StoredReply {
    /// A reply carrying `data` (JSON) of type `event_type`, first produced for `request`.
    pub(crate) fn new(event_type: &str, data: String, request: MessageId) -> Self {
        StoredReply {
            event_type: event_type.to_string(),
            data,
            request_id: request,
            at: Timestamp::now(),
        }
    }

    /// An error reply for `request`.
    pub(crate) fn error(kind: RemoteErrorKind, reason: &str, request: MessageId) -> Self {
        let body = ErrorReply {
            kind,
            reason: reason.to_string(),
        };
        // A struct of an enum and a string always serialises.
        let data = serde_json::to_string(&body).unwrap_or_else(|_| "{}".to_string());
        StoredReply::new(ERROR_REPLY_TYPE, data, request)
    }

    /// The reply envelope answering `request` (a fresh id: every reply sent, a re-sent
    /// one too, is its own message): `correlationid` is the request's exchange id, `causationid` the
    /// request's id, trace context and flow carried over.
    pub(crate) fn envelope(&self, request: &Envelope, source: &str) -> Envelope {
        let mut env = Envelope::new(
            self.event_type.clone(),
            source,
            JSON_CONTENT_TYPE,
            self.data.clone(),
        );
        env.correlationid = request.correlationid.clone();
        env.causationid = Some(request.id.to_string());
        env.traceparent = request.traceparent.clone();
        if let Some(flow) = request.extension(FLOW_EXTENSION) {
            env.extensions
                .insert(FLOW_EXTENSION.to_string(), flow.to_string());
        }
        env
    }
}

/// The [`REPLIES`] key of `request` on the route `consumer` (`topic/group`): its
/// idempotency key when it has one, else its id.
pub(crate) fn reply_key(consumer: &str, request: &Envelope) -> String {
    match request.extension(IDEMPOTENCY_KEY_EXTENSION) {
        Some(k) => format!("{consumer}|key:{k}"),
        None => format!("{consumer}|id:{}", request.id),
    }
}

/// The [`REPLIES_BY_TIME`] key of a reply stored at `at` under `key`.
pub(crate) fn time_key(at: Timestamp, key: &str) -> String {
    format!("{:020}|{key}", at.unix_micros())
}

/// The business flow of `env`: its [`FLOW_EXTENSION`] (a request or reply), else its
/// correlation id.
pub fn flow_of(env: &Envelope) -> Option<&str> {
    env.extension(FLOW_EXTENSION)
        .or(env.correlationid.as_deref())
}
