//! gRPC (tonic) with the same layers as HTTP: calls by service name through the
//! registry, deadline, retry with backoff, jitter and budget, a breaker per instance,
//! power of two choices with ejection, a bulkhead and context propagation.
//!
//! ```no_run
//! use std::sync::Arc;
//! use switchyard_rpc::grpc::{GrpcClient, GrpcRequestExt, echo::{EchoClient, EchoRequest}};
//! use switchyard_rpc::{CallOptions, ClientConfig, registry::StaticRegistry};
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let registry = StaticRegistry::parse("echo=http://127.0.0.1:7005,http://127.0.0.1:7015")?;
//! let client = GrpcClient::with_config(Arc::new(registry), ClientConfig::default());
//! // A tower service over every instance of `echo`: wrap it in any tonic client.
//! let mut echo = EchoClient::new(client.channel("echo"));
//! let request = tonic::Request::new(EchoRequest { message: "hi".into(), ..Default::default() })
//!     .with_options(CallOptions::new().idempotency_key("order-7"));
//! let reply = echo.echo(request).await.map_err(|s| switchyard_rpc::Error::from_grpc("echo", s))?;
//! # Ok(()) }
//! ```
//!
//! | module | what |
//! | --- | --- |
//! | [`client`] | [`GrpcClient`] → [`GrpcChannel`] (a tower service tonic clients wrap); per-call [`CallOptions`](crate::CallOptions) via [`GrpcRequestExt`] |
//! | [`server`] | [`GrpcServer`]: serve tonic services on a listener with health, the context/deadline layer and graceful shutdown; [`invalid_argument`] and friends |
//! | [`echo`] | the test service `switchyard.test.v1.Echo` (generated code and a reference implementation), used by the tests and the benchmark |
//!
//! **Status codes → [`ErrorKind`].** [`Error::from_grpc`](crate::Error::from_grpc) wraps
//! a [`tonic::Status`]; its `kind()` is [`status_kind`]. Failures made by the client's
//! own layers (no instance, every breaker open, deadline) come back to the tonic client
//! as ordinary statuses (UNAVAILABLE / DEADLINE_EXCEEDED) carrying the metadata
//! [`LOCAL_ERROR_METADATA`], so a circuit-open failure still has kind
//! [`ErrorKind::CircuitOpen`].
//!
//! **Metadata on the wire.** `grpc-timeout` (the remaining budget of each attempt),
//! `traceparent`, `x-correlation-id`, `idempotency-key` (see [`crate::context`]).

pub mod client;
pub mod echo;
pub mod server;

use std::time::Duration;

use http::HeaderMap;
use tonic::Code;

use crate::error::ErrorKind;

pub use client::{GrpcChannel, GrpcClient, GrpcRequestExt};
pub use server::{
    ContextLayer, ContextService, GrpcServer, invalid_argument, require, require_non_empty,
};

/// The header carrying a gRPC call's timeout (`<digits><unit>`, unit one of `HMSmun`).
pub const GRPC_TIMEOUT_HEADER: &str = "grpc-timeout";

/// [`GRPC_TIMEOUT_HEADER`] as a name (a `&str` name is parsed on every lookup).
pub(crate) const GRPC_TIMEOUT_NAME: http::HeaderName =
    http::HeaderName::from_static(GRPC_TIMEOUT_HEADER);

/// `grpc-status`, as a name.
pub(crate) const GRPC_STATUS_NAME: http::HeaderName = http::HeaderName::from_static("grpc-status");

/// The status a response carries in its headers (a "trailers-only" answer), if any.
/// Cheap for the usual answer, which has none: one lookup by a prepared name before
/// `Status::from_header_map` (which parses its names on each call) is consulted.
pub(crate) fn header_status(headers: &HeaderMap) -> Option<tonic::Status> {
    if headers.contains_key(&GRPC_STATUS_NAME) {
        tonic::Status::from_header_map(headers)
    } else {
        None
    }
}

/// Metadata naming the request field an INVALID_ARGUMENT is about.
pub const FIELD_METADATA: &str = "x-switchyard-field";

/// Metadata on statuses made by the client's own layers: `circuit-open`,
/// `no-instances`, `deadline`, `attempt-timeout`, `transport` (the connection failed).
pub const LOCAL_ERROR_METADATA: &str = "x-switchyard-local";

/// Whether the callee may have acted on a call that ended with `status` (the gRPC side
/// of [`crate::Error::outcome_unknown`]): the connection failed, the deadline passed, or
/// the callee failed without saying what it did.
pub fn status_outcome_unknown(status: &tonic::Status) -> bool {
    let local = status
        .metadata()
        .get(LOCAL_ERROR_METADATA)
        .map(|v| v.as_bytes());
    if local == Some(b"transport".as_slice()) {
        return true;
    }
    match status.code() {
        Code::DeadlineExceeded | Code::Unknown | Code::Internal | Code::DataLoss => true,
        Code::Cancelled => local.is_none(),
        _ => false,
    }
}

/// What a status means to the caller (the gRPC side of [`crate::Error::kind`]).
pub fn status_kind(status: &tonic::Status) -> ErrorKind {
    if status
        .metadata()
        .get(LOCAL_ERROR_METADATA)
        .is_some_and(|v| v.as_bytes() == b"circuit-open")
    {
        return ErrorKind::CircuitOpen;
    }
    match status.code() {
        Code::Unavailable | Code::Cancelled => ErrorKind::Unavailable,
        Code::DeadlineExceeded => ErrorKind::DeadlineExceeded,
        Code::NotFound => ErrorKind::NotFound,
        Code::AlreadyExists | Code::Aborted => ErrorKind::Conflict,
        Code::ResourceExhausted => ErrorKind::Overloaded,
        Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::OutOfRange
        | Code::PermissionDenied
        | Code::Unauthenticated
        | Code::Unimplemented => ErrorKind::Rejected,
        Code::Ok | Code::Unknown | Code::Internal | Code::DataLoss => ErrorKind::Server,
    }
}

/// Encodes `d` as a `grpc-timeout` value, rounded down (the callee never gets more
/// budget than the caller has): microseconds under one second, milliseconds from one
/// second on (at most 0.1 % less budget), seconds past eight digits. Whole milliseconds
/// repeat from call to call, so HPACK sends most of them as an index into the
/// connection's table instead of a new literal each time.
pub fn encode_timeout(d: Duration) -> String {
    let mut buf = [0u8; TIMEOUT_LEN];
    String::from_utf8_lossy(timeout_bytes(d, &mut buf)).into_owned()
}

/// The longest `grpc-timeout` value: eight digits and a unit.
const TIMEOUT_LEN: usize = 9;

/// [`encode_timeout`] written at the end of `buf` (no allocation).
fn timeout_bytes(d: Duration, buf: &mut [u8; TIMEOUT_LEN]) -> &[u8] {
    const MAX: u128 = 99_999_999;
    let (n, unit) = if d < Duration::from_secs(1) {
        (d.as_micros(), b'u')
    } else if d.as_millis() <= MAX {
        (d.as_millis(), b'm')
    } else {
        (u128::from(d.as_secs()).min(MAX), b'S')
    };
    // At most eight digits in every branch.
    let mut n = n.min(MAX) as u64;
    let mut i = TIMEOUT_LEN - 1;
    buf[i] = unit;
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[i..]
}

/// `d` as a `grpc-timeout` header value (see [`encode_timeout`]), formatted on the stack.
pub(crate) fn timeout_value(d: Duration) -> http::HeaderValue {
    let mut buf = [0u8; TIMEOUT_LEN];
    // Digits and a unit letter: always a valid header value.
    http::HeaderValue::from_bytes(timeout_bytes(d, &mut buf))
        .unwrap_or_else(|_| http::HeaderValue::from_static("0u"))
}

/// Parses a `grpc-timeout` value; `None` if malformed (more than 8 digits, bad unit).
pub fn parse_timeout(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s.len() < 2 || s.len() > 9 {
        return None;
    }
    let (digits, unit) = s.split_at(s.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The `grpc-timeout` of a request's headers, if present and well formed.
pub fn timeout_from_headers(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get(&GRPC_TIMEOUT_NAME)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_timeout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeout_round_trip_rounds_down() {
        let d = Duration::from_nanos(1_234_567_891);
        assert_eq!(encode_timeout(d), "1234m");
        assert_eq!(encode_timeout(Duration::from_nanos(999_999_999)), "999999u");
        assert_eq!(
            parse_timeout("1234567u"),
            Some(Duration::from_micros(1_234_567))
        );
        assert_eq!(encode_timeout(Duration::from_secs(1000)), "1000000m");
        assert_eq!(
            encode_timeout(Duration::from_secs(200_000_000)),
            "99999999S"
        );
        assert_eq!(parse_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(encode_timeout(Duration::ZERO), "0u");
        assert_eq!(timeout_value(Duration::from_millis(10_000)), "10000m");
        assert_eq!(timeout_value(Duration::from_micros(1)), "1u");
        assert_eq!(parse_timeout("123456789m"), None);
        assert_eq!(parse_timeout("12x"), None);
        assert_eq!(parse_timeout("m"), None);
    }

    #[test]
    fn kinds() {
        let k = |c| status_kind(&tonic::Status::new(c, "x"));
        assert_eq!(k(Code::Unavailable), ErrorKind::Unavailable);
        assert_eq!(k(Code::InvalidArgument), ErrorKind::Rejected);
        assert_eq!(k(Code::ResourceExhausted), ErrorKind::Overloaded);
        let mut s = tonic::Status::unavailable("open");
        s.metadata_mut().insert(
            LOCAL_ERROR_METADATA,
            tonic::metadata::MetadataValue::from_static("circuit-open"),
        );
        assert_eq!(status_kind(&s), ErrorKind::CircuitOpen);
    }

    #[test]
    fn an_outcome_is_unknown_only_when_the_callee_may_have_acted() {
        let marked = |code, marker: &'static str| {
            let mut s = tonic::Status::new(code, "x");
            s.metadata_mut().insert(
                LOCAL_ERROR_METADATA,
                tonic::metadata::MetadataValue::from_static(marker),
            );
            crate::Error::from_grpc("payment", s)
        };
        let answered = |code| crate::Error::from_grpc("payment", tonic::Status::new(code, "x"));
        // The connection broke after the request went out; the deadline passed; the
        // callee failed without saying what it did.
        assert!(marked(Code::Unavailable, "transport").outcome_unknown());
        assert!(marked(Code::DeadlineExceeded, "attempt-timeout").outcome_unknown());
        assert!(answered(Code::DeadlineExceeded).outcome_unknown());
        assert!(answered(Code::Internal).outcome_unknown());
        assert!(answered(Code::Unknown).outcome_unknown());
        // Nothing was sent, or the callee answered without acting.
        assert!(!marked(Code::Unavailable, "circuit-open").outcome_unknown());
        assert!(!marked(Code::Unavailable, "no-instances").outcome_unknown());
        assert!(!answered(Code::Unavailable).outcome_unknown());
        assert!(!answered(Code::FailedPrecondition).outcome_unknown());
        assert!(!answered(Code::InvalidArgument).outcome_unknown());
        // HTTP: the same rule.
        let status = |s: u16| crate::Error::Status {
            service: "inventory".into(),
            status: http::StatusCode::from_u16(s).unwrap_or_default(),
            problem: None,
        };
        assert!(status(500).outcome_unknown());
        assert!(status(504).outcome_unknown());
        assert!(!status(503).outcome_unknown());
        assert!(!status(409).outcome_unknown());
        let io = || Box::new(std::io::Error::other("reset")) as Box<_>;
        assert!(
            crate::Error::Transport {
                service: "inventory".into(),
                instance: "http://127.0.0.1:1".into(),
                source: io(),
            }
            .outcome_unknown()
        );
        assert!(
            !crate::Error::Connect {
                service: "inventory".into(),
                instance: "http://127.0.0.1:1".into(),
                source: io(),
            }
            .outcome_unknown()
        );
    }
}
