//! The per-call context that travels on every hop: deadline, W3C trace context,
//! correlation id and idempotency key.
//!
//! | header | meaning |
//! | --- | --- |
//! | `x-switchyard-deadline` | absolute deadline, Unix milliseconds (clocks of one deployment are assumed NTP-synced) |
//! | `traceparent` | W3C trace context (`00-<trace id>-<span id>-<flags>`) |
//! | `x-correlation-id` | the business flow this call belongs to |
//! | `idempotency-key` | the caller's key for "apply this at most once" |
//!
//! The server side ([`crate::http::router`]) extracts it into request extensions, opens a
//! `tracing` span with its fields and makes it the *current* context for the handler's
//! task, so a client call made by the handler propagates it (same trace and correlation
//! id, a new span id, the same or an earlier deadline) without plumbing.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderName, HeaderValue};
use switchyard::Timestamp;

/// Header carrying the absolute deadline in Unix milliseconds.
pub const DEADLINE_HEADER: &str = "x-switchyard-deadline";
/// The W3C trace context header.
pub const TRACEPARENT_HEADER: &str = "traceparent";
/// Header carrying the correlation id.
pub const CORRELATION_HEADER: &str = "x-correlation-id";
/// Header carrying the idempotency key.
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";

// The header names as constants: inserting a `&'static str` name parses it on every call.
const DEADLINE_NAME: HeaderName = HeaderName::from_static(DEADLINE_HEADER);
const TRACEPARENT_NAME: HeaderName = HeaderName::from_static(TRACEPARENT_HEADER);
const CORRELATION_NAME: HeaderName = HeaderName::from_static(CORRELATION_HEADER);
const IDEMPOTENCY_NAME: HeaderName = HeaderName::from_static(IDEMPOTENCY_HEADER);

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Writes `v` as `buf.len()` lowercase hex digits (zero-padded).
fn put_hex(buf: &mut [u8], mut v: u128) {
    for b in buf.iter_mut().rev() {
        *b = HEX[(v & 0xf) as usize];
        v >>= 4;
    }
}

tokio::task_local! {
    static CURRENT: CallContext;
}

/// A W3C `traceparent`: trace id, parent (span) id and flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// The 128-bit trace id (never zero).
    pub trace_id: u128,
    /// The 64-bit id of the span that made this call (never zero).
    pub span_id: u64,
    /// Trace flags (bit 0: sampled).
    pub flags: u8,
}

impl TraceParent {
    /// A new trace (random ids, sampled).
    pub fn new_root() -> Self {
        TraceParent {
            trace_id: fastrand::u128(1..),
            span_id: fastrand::u64(1..),
            flags: 1,
        }
    }

    /// The same trace with a new span id (the next hop).
    pub fn child(&self) -> Self {
        TraceParent {
            span_id: fastrand::u64(1..),
            ..*self
        }
    }

    /// Parses version-00 `traceparent`; `None` if malformed or all-zero ids.
    pub fn parse(s: &str) -> Option<Self> {
        let mut parts = s.trim().split('-');
        let (v, t, p, f) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || v != "00" || t.len() != 32 || p.len() != 16 || f.len() != 2 {
            return None;
        }
        let trace_id = u128::from_str_radix(t, 16).ok()?;
        let span_id = u64::from_str_radix(p, 16).ok()?;
        let flags = u8::from_str_radix(f, 16).ok()?;
        (trace_id != 0 && span_id != 0).then_some(TraceParent {
            trace_id,
            span_id,
            flags,
        })
    }

    /// The `traceparent` header value, formatted without intermediate strings.
    pub fn header_value(&self) -> HeaderValue {
        let mut buf = *b"00-00000000000000000000000000000000-0000000000000000-00";
        put_hex(&mut buf[3..35], self.trace_id);
        put_hex(&mut buf[36..52], u128::from(self.span_id));
        put_hex(&mut buf[53..55], u128::from(self.flags));
        // Only hex digits and `-`: always a valid header value.
        HeaderValue::from_bytes(&buf).unwrap_or_else(|_| HeaderValue::from_static("00"))
    }

    /// The trace id as 32 lowercase hex digits.
    pub fn trace_id_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }
}

impl std::fmt::Display for TraceParent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.span_id, self.flags
        )
    }
}

/// The context of one call, as received (server) or to be sent (client).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallContext {
    /// When the caller stops waiting; `None`: no deadline.
    pub deadline: Option<Timestamp>,
    /// The trace context of the hop.
    pub traceparent: Option<TraceParent>,
    /// The business flow id.
    pub correlation_id: Option<String>,
    /// The caller's idempotency key.
    pub idempotency_key: Option<String>,
}

fn header_str<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

/// A deadline as Unix milliseconds (rounded down, so the callee never gets more budget).
pub fn deadline_to_millis(t: Timestamp) -> u64 {
    t.unix_micros() / 1000
}

impl CallContext {
    /// The context read from request headers; a malformed header counts as absent
    /// (a malformed deadline is ignored rather than rejected, as is a bad `traceparent`).
    pub fn from_headers(headers: &HeaderMap) -> Self {
        CallContext {
            deadline: header_str(headers, &DEADLINE_NAME)
                .and_then(|s| s.parse::<u64>().ok())
                .map(|ms| Timestamp::from_unix_micros(ms.saturating_mul(1000))),
            traceparent: header_str(headers, &TRACEPARENT_NAME).and_then(TraceParent::parse),
            correlation_id: header_str(headers, &CORRELATION_NAME).map(str::to_string),
            idempotency_key: header_str(headers, &IDEMPOTENCY_NAME).map(str::to_string),
        }
    }

    /// Writes this context into outgoing headers (values that are not valid header
    /// values are skipped).
    pub fn write_headers(&self, headers: &mut HeaderMap) {
        self.wire().write(headers);
    }

    /// Writes everything but the deadline (`traceparent`, correlation id, idempotency
    /// key): gRPC carries the deadline in `grpc-timeout` instead.
    pub fn write_trace_headers(&self, headers: &mut HeaderMap) {
        let mut w = self.wire();
        w.deadline = None;
        w.write(headers);
    }

    /// The header values of this context, made once per call and written on each
    /// attempt.
    pub(crate) fn wire(&self) -> WireContext {
        let value = |s: &Option<String>| s.as_deref().and_then(|s| HeaderValue::from_str(s).ok());
        WireContext {
            deadline: self
                .deadline
                .map(|d| HeaderValue::from(deadline_to_millis(d))),
            traceparent: self.traceparent.map(|t| t.header_value()),
            correlation_id: value(&self.correlation_id),
            idempotency_key: value(&self.idempotency_key),
        }
    }

    /// The time left until the deadline (`None` without a deadline; zero once passed).
    pub fn remaining(&self) -> Option<Duration> {
        self.deadline.map(Timestamp::remaining)
    }

    /// True when the deadline has passed.
    pub fn expired(&self) -> bool {
        self.remaining().is_some_and(|r| r.is_zero())
    }

    /// The context for a call made while handling this one: same trace (new span id),
    /// same correlation id and deadline; no idempotency key (keys are per operation).
    pub fn downstream(&self) -> CallContext {
        CallContext {
            deadline: self.deadline,
            traceparent: Some(
                self.traceparent
                    .map(|t| t.child())
                    .unwrap_or_else(TraceParent::new_root),
            ),
            correlation_id: self.correlation_id.clone(),
            idempotency_key: None,
        }
    }

    /// Keeps the earlier of this deadline and `now + budget`.
    pub fn tighten(&mut self, budget: Duration) {
        let d = Timestamp::from_system_time(SystemTime::now() + budget);
        self.deadline = Some(match self.deadline {
            Some(cur) if cur <= d => cur,
            _ => d,
        });
    }

    /// The context of the request being handled on this task, if any (set by the server
    /// middleware of [`crate::http::router`]).
    pub fn current() -> Option<CallContext> {
        CURRENT.try_with(|c| c.clone()).ok()
    }

    /// The [downstream](Self::downstream) context of the current one, if any (without
    /// cloning the current context first).
    pub(crate) fn current_downstream() -> Option<CallContext> {
        CURRENT.try_with(CallContext::downstream).ok()
    }

    /// Runs `fut` with `self` as the [current](Self::current) context.
    pub async fn scope<F: Future>(self, fut: F) -> F::Output {
        CURRENT.scope(self, fut).await
    }
}

/// The context's headers, ready to write (see [`CallContext::wire`]).
#[derive(Debug, Clone, Default)]
pub(crate) struct WireContext {
    pub(crate) deadline: Option<HeaderValue>,
    pub(crate) traceparent: Option<HeaderValue>,
    pub(crate) correlation_id: Option<HeaderValue>,
    pub(crate) idempotency_key: Option<HeaderValue>,
}

impl WireContext {
    /// How many headers [`write`](Self::write) adds.
    pub(crate) fn len(&self) -> usize {
        [
            &self.deadline,
            &self.traceparent,
            &self.correlation_id,
            &self.idempotency_key,
        ]
        .iter()
        .filter(|v| v.is_some())
        .count()
    }

    /// Inserts the headers into `headers`.
    pub(crate) fn write(&self, headers: &mut HeaderMap) {
        let all = [
            (DEADLINE_NAME, &self.deadline),
            (TRACEPARENT_NAME, &self.traceparent),
            (CORRELATION_NAME, &self.correlation_id),
            (IDEMPOTENCY_NAME, &self.idempotency_key),
        ];
        for (name, v) in all {
            if let Some(v) = v {
                headers.insert(name, v.clone());
            }
        }
    }
}

/// Unix milliseconds of `t` (helper for logs and tests).
pub fn unix_millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trip_and_child() {
        let s = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let tp = TraceParent::parse(s).unwrap();
        assert_eq!(tp.to_string(), s);
        assert_eq!(tp.header_value().to_str().unwrap(), s);
        let c = tp.child();
        assert_eq!(c.trace_id, tp.trace_id);
        assert!(
            TraceParent::parse("00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_none()
        );
        assert!(TraceParent::parse("garbage").is_none());
    }

    #[test]
    fn headers_round_trip() {
        let mut ctx = CallContext {
            traceparent: Some(TraceParent::new_root()),
            correlation_id: Some("order-7".into()),
            idempotency_key: Some("k1".into()),
            deadline: None,
        };
        ctx.tighten(Duration::from_secs(5));
        let mut h = HeaderMap::new();
        ctx.write_headers(&mut h);
        let back = CallContext::from_headers(&h);
        assert_eq!(back.traceparent, ctx.traceparent);
        assert_eq!(back.correlation_id.as_deref(), Some("order-7"));
        assert_eq!(back.idempotency_key.as_deref(), Some("k1"));
        let ms = |t: Timestamp| t.unix_micros() / 1000;
        assert_eq!(ms(back.deadline.unwrap()), ms(ctx.deadline.unwrap()));
    }

    #[test]
    fn tighten_keeps_earlier() {
        let mut ctx = CallContext::default();
        ctx.tighten(Duration::from_millis(100));
        let first = ctx.deadline;
        ctx.tighten(Duration::from_secs(100));
        assert_eq!(ctx.deadline, first);
    }
}
