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

use std::task::Poll;
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
pub(crate) const IDEMPOTENCY_NAME: HeaderName = HeaderName::from_static(IDEMPOTENCY_HEADER);

const HEX: &[u8; 16] = b"0123456789abcdef";

/// The length of a version-00 `traceparent`.
const TRACEPARENT_LEN: usize = 55;

/// Writes `v` as `buf.len()` (at most 16) lowercase hex digits (zero-padded).
fn put_hex(buf: &mut [u8], mut v: u64) {
    for b in buf.iter_mut().rev() {
        *b = HEX[(v & 0xf) as usize];
        v >>= 4;
    }
}

/// The value of each byte as a hex digit (either case); `0xff` if it is not one.
const UNHEX: [u8; 256] = {
    let mut t = [0xffu8; 256];
    let mut i = 0;
    while i < 16 {
        t[HEX[i] as usize] = i as u8;
        t[HEX[i].to_ascii_uppercase() as usize] = i as u8;
        i += 1;
    }
    t
};

/// `digits` (at most 16 hex digits, either case) as a number; `None` on any other byte.
fn parse_hex(digits: &[u8]) -> Option<u64> {
    let mut acc = 0u64;
    // Valid digits are 0..=15, so any invalid byte (0xff) shows in the high bits.
    let mut seen = 0u8;
    for &d in digits {
        let v = UNHEX[usize::from(d)];
        seen |= v;
        acc = acc << 4 | u64::from(v & 0xf);
    }
    (seen & 0xf0 == 0).then_some(acc)
}

/// The decimal digits of `v`, written at the end of `buf`.
fn decimal(buf: &mut [u8; 20], mut v: u64) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    &buf[i..]
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
        // `00-<32 hex>-<16 hex>-<2 hex>`, read byte by byte (no splitting, no radix
        // parsing): this runs for every incoming call.
        let b = s.trim().as_bytes();
        if b.len() != 55 || !b.starts_with(b"00-") || b[35] != b'-' || b[52] != b'-' {
            return None;
        }
        let trace_id = u128::from(parse_hex(&b[3..19])?) << 64 | u128::from(parse_hex(&b[19..35])?);
        let span_id = parse_hex(&b[36..52])?;
        let flags = u8::try_from(parse_hex(&b[53..55])?).ok()?;
        (trace_id != 0 && span_id != 0).then_some(TraceParent {
            trace_id,
            span_id,
            flags,
        })
    }

    /// The `traceparent` header value, formatted without intermediate strings.
    pub fn header_value(&self) -> HeaderValue {
        // Only hex digits and `-`: always a valid header value.
        HeaderValue::from_bytes(&self.header_bytes())
            .unwrap_or_else(|_| HeaderValue::from_static("00"))
    }

    /// The `traceparent` text, formatted on the stack.
    fn header_bytes(&self) -> [u8; TRACEPARENT_LEN] {
        let mut buf = *b"00-00000000000000000000000000000000-0000000000000000-00";
        put_hex(&mut buf[3..19], (self.trace_id >> 64) as u64);
        put_hex(&mut buf[19..35], self.trace_id as u64);
        put_hex(&mut buf[36..52], self.span_id);
        put_hex(&mut buf[53..55], u64::from(self.flags));
        buf
    }

    /// The trace id as 32 lowercase hex digits.
    pub fn trace_id_hex(&self) -> String {
        let mut buf = [0u8; 32];
        put_hex(&mut buf[..16], (self.trace_id >> 64) as u64);
        put_hex(&mut buf[16..], self.trace_id as u64);
        // Only hex digits: always UTF-8 (one allocation of the exact size).
        String::from_utf8(buf.to_vec()).unwrap_or_default()
    }
}

/// The trace id of an optional `traceparent` as a span field: 32 lowercase hex digits,
/// or nothing. Formatted only if something records the field (a span's fields are
/// evaluated even when no subscriber wants it, e.g. for the `log` fallback), so a call
/// that nobody traces pays no string for it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TraceIdField(pub(crate) Option<TraceParent>);

impl std::fmt::Display for TraceIdField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Some(t) = self.0 else {
            return Ok(());
        };
        let mut buf = [0u8; 32];
        put_hex(&mut buf[..16], (t.trace_id >> 64) as u64);
        put_hex(&mut buf[16..], t.trace_id as u64);
        // Only hex digits: always UTF-8.
        f.write_str(std::str::from_utf8(&buf).unwrap_or_default())
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

/// A header value as trimmed, non-empty text (`None` otherwise).
fn value_str(value: Option<&HeaderValue>) -> Option<&str> {
    value
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
        // One pass over the headers instead of one lookup (a hash of the name) per field.
        // As with `HeaderMap::get`, the first value of a repeated name is the one read.
        let (mut deadline, mut traceparent, mut correlation, mut key) = (None, None, None, None);
        for (name, value) in headers {
            let slot = match name.as_str() {
                DEADLINE_HEADER => &mut deadline,
                TRACEPARENT_HEADER => &mut traceparent,
                CORRELATION_HEADER => &mut correlation,
                IDEMPOTENCY_HEADER => &mut key,
                _ => continue,
            };
            slot.get_or_insert(value);
        }
        CallContext {
            deadline: value_str(deadline)
                .and_then(|s| s.parse::<u64>().ok())
                .map(|ms| Timestamp::from_unix_micros(ms.saturating_mul(1000))),
            traceparent: value_str(traceparent).and_then(TraceParent::parse),
            correlation_id: value_str(correlation).map(str::to_string),
            idempotency_key: value_str(key).map(str::to_string),
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
        self.wire_with(false, self.idempotency_key.as_deref())
            .write(headers);
    }

    /// The header values of this context, made once per call and written on each
    /// attempt.
    pub(crate) fn wire(&self) -> WireContext {
        self.wire_with(true, self.idempotency_key.as_deref())
    }

    /// The header values of this context, with the deadline if `deadline` and with
    /// `idempotency_key` (instead of this context's own key).
    ///
    /// All values are slices of one buffer: two allocations per call, and writing them
    /// on an attempt only bumps a reference count (values made one by one cost an
    /// allocation each, and another when first cloned).
    pub(crate) fn wire_with(&self, deadline: bool, idempotency_key: Option<&str>) -> WireContext {
        let correlation_id = self.correlation_id.as_deref();
        let mut buf = Vec::with_capacity(
            20 + TRACEPARENT_LEN
                + correlation_id.map_or(0, str::len)
                + idempotency_key.map_or(0, str::len),
        );
        let mut put = |bytes: &[u8]| {
            let start = buf.len();
            buf.extend_from_slice(bytes);
            start..buf.len()
        };
        let mut digits = [0u8; 20];
        let deadline = self
            .deadline
            .filter(|_| deadline)
            .map(|d| put(decimal(&mut digits, deadline_to_millis(d))));
        let traceparent = self.traceparent.map(|t| put(&t.header_bytes()));
        let correlation = correlation_id.map(|c| put(c.as_bytes()));
        let key = idempotency_key.map(|k| put(k.as_bytes()));
        let buf = bytes::Bytes::from(buf);
        // Values that are not valid header values (e.g. a control character in a
        // correlation id) are skipped, as before.
        let value = |r: Option<std::ops::Range<usize>>| {
            r.and_then(|r| HeaderValue::from_maybe_shared(buf.slice(r)).ok())
        };
        WireContext {
            deadline: value(deadline),
            // A new value on every call: over HTTP/2 it is sent "never indexed", so HPACK
            // neither inserts it into both ends' tables (evicting the headers that do
            // repeat) nor walks the chain of earlier values of the name on every call.
            // HTTP/1.1 ignores the flag.
            traceparent: value(traceparent).map(|mut v| {
                v.set_sensitive(true);
                v
            }),
            correlation_id: value(correlation),
            idempotency_key: value(key),
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

    /// [`scope`](Self::scope) as a named future (for the server layers' own futures).
    pub(crate) fn scope_future<F: Future>(
        self,
        fut: F,
    ) -> tokio::task::futures::TaskLocalFuture<CallContext, F> {
        CURRENT.scope(self, fut)
    }
}

pin_project_lite::pin_project! {
    /// Runs `fut` but not past `deadline`: `None` if the deadline came first (`fut` is
    /// then dropped with this future, i.e. cancelled). With no deadline, just runs `fut`.
    ///
    /// The timer is armed only if `fut` does not finish on its first poll, so a handler
    /// that answers at once costs no timer at all; one that waits is bounded exactly as
    /// with `tokio::time::timeout_at` (the deadline is fixed by the caller beforehand).
    /// A named future (not an `async fn`), so the server layers need not box it.
    pub(crate) struct UntilDeadline<F> {
        #[pin]
        fut: F,
        deadline: Option<tokio::time::Instant>,
        #[pin]
        timer: Option<tokio::time::Sleep>,
    }
}

/// See [`UntilDeadline`].
pub(crate) fn until_deadline<F: Future>(
    fut: F,
    deadline: Option<tokio::time::Instant>,
) -> UntilDeadline<F> {
    UntilDeadline {
        fut,
        deadline,
        timer: None,
    }
}

impl<F: Future> Future for UntilDeadline<F> {
    type Output = Option<F::Output>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Poll::Ready(out) = this.fut.poll(cx) {
            return Poll::Ready(Some(out));
        }
        let Some(deadline) = *this.deadline else {
            return Poll::Pending;
        };
        if this.timer.is_none() {
            this.timer.set(Some(tokio::time::sleep_until(deadline)));
        }
        match this.timer.as_pin_mut().map(|t| t.poll(cx)) {
            Some(Poll::Ready(())) => Poll::Ready(None),
            _ => Poll::Pending,
        }
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
    fn from_headers_reads_the_first_value_and_ignores_other_headers() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut h = HeaderMap::new();
        h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("x"));
        h.append(CORRELATION_NAME, HeaderValue::from_static(" first "));
        h.append(CORRELATION_NAME, HeaderValue::from_static("second"));
        // An empty first value is absent, as before (the second is not consulted).
        h.append(IDEMPOTENCY_NAME, HeaderValue::from_static(""));
        h.append(IDEMPOTENCY_NAME, HeaderValue::from_static("k2"));
        h.insert(TRACEPARENT_NAME, HeaderValue::from_static(tp));
        h.insert(DEADLINE_NAME, HeaderValue::from_static("1700000000123"));
        h.insert("x-other", HeaderValue::from_static("1"));
        let ctx = CallContext::from_headers(&h);
        assert_eq!(ctx.correlation_id.as_deref(), Some("first"));
        assert_eq!(ctx.idempotency_key, None);
        assert_eq!(ctx.traceparent, TraceParent::parse(tp));
        assert_eq!(
            ctx.deadline,
            Some(Timestamp::from_unix_micros(1_700_000_000_123_000))
        );
        assert_eq!(
            CallContext::from_headers(&HeaderMap::new()),
            CallContext::default()
        );
        let mut bad = HeaderMap::new();
        bad.insert(DEADLINE_NAME, HeaderValue::from_static("soon"));
        bad.insert(TRACEPARENT_NAME, HeaderValue::from_static("garbage"));
        assert_eq!(CallContext::from_headers(&bad), CallContext::default());
    }

    #[test]
    fn traceparent_parse_rejects_malformed() {
        let ok = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert!(TraceParent::parse(ok).is_some());
        assert_eq!(
            TraceParent::parse(&ok.to_uppercase()),
            TraceParent::parse(ok),
            "hex digits in either case"
        );
        assert_eq!(
            TraceParent::parse(&format!("  {ok} ")),
            TraceParent::parse(ok)
        );
        for bad in [
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn wire_values() {
        let tp = TraceParent::new_root();
        let ctx = CallContext {
            deadline: Some(Timestamp::from_unix_micros(1_700_000_000_123_456)),
            traceparent: Some(tp),
            correlation_id: Some("order-7".into()),
            idempotency_key: Some("bad\nkey".into()),
        };
        let mut h = HeaderMap::new();
        ctx.wire_with(true, Some("k-1")).write(&mut h);
        assert_eq!(h[DEADLINE_HEADER], "1700000000123");
        assert_eq!(h[TRACEPARENT_HEADER], tp.to_string().as_str());
        assert!(
            h[TRACEPARENT_HEADER].is_sensitive(),
            "never indexed by HPACK"
        );
        assert!(!h[CORRELATION_HEADER].is_sensitive());
        assert_eq!(h[CORRELATION_HEADER], "order-7");
        assert_eq!(h[IDEMPOTENCY_HEADER], "k-1");
        let mut h = HeaderMap::new();
        ctx.wire_with(false, None).write(&mut h);
        assert_eq!(h.len(), 2, "no deadline, no key: {h:?}");
        // A value that is not a valid header value is skipped.
        let mut h = HeaderMap::new();
        ctx.write_headers(&mut h);
        assert!(h.get(IDEMPOTENCY_HEADER).is_none());
        assert_eq!(h.len(), 3);
        let zero = CallContext {
            deadline: Some(Timestamp::from_unix_micros(0)),
            ..CallContext::default()
        };
        let mut h = HeaderMap::new();
        zero.wire().write(&mut h);
        assert_eq!(h[DEADLINE_HEADER], "0");
        assert_eq!(tp.trace_id_hex(), format!("{:032x}", tp.trace_id));
        assert_eq!(TraceIdField(Some(tp)).to_string(), tp.trace_id_hex());
        assert_eq!(TraceIdField(None).to_string(), "");
    }

    #[tokio::test(start_paused = true)]
    async fn until_deadline_cancels_only_a_waiting_future() {
        use tokio::time::{Instant, sleep};
        let soon = Some(Instant::now() + Duration::from_secs(1));
        assert_eq!(until_deadline(async { 7 }, soon).await, Some(7));
        assert_eq!(until_deadline(async { 7 }, None).await, Some(7));
        let start = Instant::now();
        let slow = async {
            sleep(Duration::from_secs(10)).await;
            7
        };
        assert_eq!(until_deadline(slow, soon).await, None);
        assert_eq!(
            start.elapsed(),
            Duration::from_secs(1),
            "cancelled at the deadline"
        );
        let quick = async {
            sleep(Duration::from_millis(10)).await;
            7
        };
        let later = Some(Instant::now() + Duration::from_secs(1));
        assert_eq!(until_deadline(quick, later).await, Some(7));
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
