//! The client's error type, with a [`ErrorKind`] that says what to do about it.

use std::time::Duration;

use http::StatusCode;

use crate::problem::Problem;

/// Result alias for client calls.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong with a call, in a form code can branch on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// No instance answered (none registered, connect failed, 502/503 after the retries):
    /// retry later or degrade.
    Unavailable,
    /// Every instance's circuit breaker is open: fail fast, use a fallback, don't retry now.
    CircuitOpen,
    /// The call's deadline passed (here or at the callee): give up; the caller's caller
    /// is no longer waiting either.
    DeadlineExceeded,
    /// The callee rejected the request (4xx other than the ones below): fix the request,
    /// never retry it unchanged.
    Rejected,
    /// 404: the thing asked for does not exist.
    NotFound,
    /// 409: a conflicting request (e.g. the same idempotency key still in flight): retry
    /// later with the same key.
    Conflict,
    /// 429: the callee is shedding load; retry after its `Retry-After`.
    Overloaded,
    /// The callee failed (500 and other 5xx): its logs say why; retry only if idempotent.
    Server,
    /// The response did not decode into the expected type: a contract mismatch.
    Decode,
    /// The request could not be built (bad path, body that does not encode).
    InvalidInput,
}

/// An error from a call to another service.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The registry has no instance of the service.
    #[error("no instance of `{service}` is registered; check the registry (SWITCHYARD_SERVICES)")]
    NoInstances {
        /// The service name.
        service: String,
    },
    /// Every instance's breaker is open; nothing was sent.
    #[error("circuit open for every instance of `{service}`; next probe in {retry_in:?}")]
    CircuitOpen {
        /// The service name.
        service: String,
        /// Time until a probe call may be made.
        retry_in: Duration,
    },
    /// The call's deadline passed (possibly before anything was sent).
    #[error("deadline exceeded calling `{service}`")]
    DeadlineExceeded {
        /// The service name.
        service: String,
    },
    /// One attempt took longer than the attempt timeout.
    #[error("attempt to `{service}` at {instance} timed out")]
    AttemptTimeout {
        /// The service name.
        service: String,
        /// The instance URL.
        instance: String,
    },
    /// The connection to an instance could not be made.
    #[error("cannot connect to `{service}` at {instance}: {source}")]
    Connect {
        /// The service name.
        service: String,
        /// The instance URL.
        instance: String,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The connection failed mid-request (reset, closed).
    #[error("transport error calling `{service}` at {instance}: {source}")]
    Transport {
        /// The service name.
        service: String,
        /// The instance URL.
        instance: String,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The callee answered with a non-2xx status.
    #[error("`{service}` answered {status}{}", problem.as_ref().map(|p| format!(": {p}")).unwrap_or_default())]
    Status {
        /// The service name.
        service: String,
        /// The status code.
        status: StatusCode,
        /// The parsed `application/problem+json` body, if it was one.
        problem: Option<Box<Problem>>,
    },
    /// The response body did not decode.
    #[error("response from `{service}` does not decode: {source}")]
    Decode {
        /// The service name.
        service: String,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// The request could not be built.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// A gRPC call ended with a non-OK status (from the callee, or from this client's
    /// own layers: see [`crate::grpc`]).
    #[error("`{service}` answered gRPC {}: {}", status.code(), status.message())]
    Grpc {
        /// The service name.
        service: String,
        /// The status.
        status: Box<tonic::Status>,
    },
}

impl Error {
    /// The kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::NoInstances { .. } | Error::Connect { .. } | Error::Transport { .. } => {
                ErrorKind::Unavailable
            }
            Error::CircuitOpen { .. } => ErrorKind::CircuitOpen,
            Error::DeadlineExceeded { .. } | Error::AttemptTimeout { .. } => {
                ErrorKind::DeadlineExceeded
            }
            Error::Status { status, .. } => match *status {
                StatusCode::NOT_FOUND => ErrorKind::NotFound,
                StatusCode::CONFLICT => ErrorKind::Conflict,
                StatusCode::TOO_MANY_REQUESTS => ErrorKind::Overloaded,
                StatusCode::GATEWAY_TIMEOUT => ErrorKind::DeadlineExceeded,
                StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE => ErrorKind::Unavailable,
                s if s.is_server_error() => ErrorKind::Server,
                _ => ErrorKind::Rejected,
            },
            Error::Decode { .. } => ErrorKind::Decode,
            Error::InvalidRequest(_) => ErrorKind::InvalidInput,
            Error::Grpc { status, .. } => crate::grpc::status_kind(status),
        }
    }

    /// Whether the callee may have acted on the request although the call failed: the
    /// connection broke after the request was sent, the deadline passed, the callee
    /// failed (5xx, gRPC `UNKNOWN`/`INTERNAL`) without saying what it did, or its answer
    /// did not decode. Repeat the call with the same idempotency key to learn the outcome
    /// before assuming nothing happened. `false` when nothing was sent (no instance,
    /// circuit open, connect failed) or the callee answered without acting (4xx, 503).
    pub fn outcome_unknown(&self) -> bool {
        match self {
            Error::NoInstances { .. }
            | Error::CircuitOpen { .. }
            | Error::Connect { .. }
            | Error::InvalidRequest(_) => false,
            Error::Transport { .. }
            | Error::DeadlineExceeded { .. }
            | Error::AttemptTimeout { .. }
            | Error::Decode { .. } => true,
            Error::Status { status, .. } => {
                status.is_server_error() && *status != StatusCode::SERVICE_UNAVAILABLE
            }
            Error::Grpc { status, .. } => crate::grpc::status_outcome_unknown(status),
        }
    }

    /// The typed error of a gRPC call to `service` that ended with `status`.
    pub fn from_grpc(service: impl Into<String>, status: tonic::Status) -> Self {
        Error::Grpc {
            service: service.into(),
            status: Box::new(status),
        }
    }

    /// The gRPC status, for an error from a gRPC call.
    pub fn grpc_status(&self) -> Option<&tonic::Status> {
        match self {
            Error::Grpc { status, .. } => Some(status),
            _ => None,
        }
    }

    /// The request field a validation failure names (problem+json `field`, or the
    /// `x-switchyard-field` metadata of a gRPC INVALID_ARGUMENT).
    pub fn field(&self) -> Option<&str> {
        match self {
            Error::Status { problem, .. } => {
                problem.as_deref().and_then(|p| p.extension_str("field"))
            }
            Error::Grpc { status, .. } => status
                .metadata()
                .get(crate::grpc::FIELD_METADATA)
                .and_then(|v| v.to_str().ok()),
            _ => None,
        }
    }

    /// The callee's problem document, if it sent one.
    pub fn problem(&self) -> Option<&Problem> {
        match self {
            Error::Status { problem, .. } => problem.as_deref(),
            _ => None,
        }
    }

    /// The HTTP status the callee answered with, if it answered.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Error::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// True for transport failures a retry may fix (connect errors, resets, attempt timeouts).
    pub(crate) fn is_transient_transport(&self) -> bool {
        matches!(
            self,
            Error::Connect { .. } | Error::Transport { .. } | Error::AttemptTimeout { .. }
        )
    }
}
