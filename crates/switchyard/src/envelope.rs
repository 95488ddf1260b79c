//! The message envelope: CloudEvents 1.0 attributes plus switchyard's extensions.
//!
//! Every message on every bus is an [`Envelope`]. Its JSON form is CloudEvents
//! structured mode (`specversion`, `id`, `type`, `source`, `subject`, `time`,
//! `datacontenttype`, `data`) with the extensions `correlationid`, `causationid`,
//! `replyto`, `traceparent` and `deadline`. Backends store it in a compact binary
//! form ([`Envelope::to_bytes`]) that round-trips every attribute.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

/// The CloudEvents spec version every envelope declares.
pub const SPEC_VERSION: &str = "1.0";

/// The content type of payloads written by the JSON codec.
pub const JSON_CONTENT_TYPE: &str = "application/json";

/// A message id: a UUIDv7, time-ordered, and the publisher-dedup key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(pub Uuid);

impl MessageId {
    /// A fresh id: UUIDv7 (48-bit millisecond timestamp, then 74 random bits), ordered by
    /// creation time across milliseconds. Random bits come from a fast thread-local
    /// generator, not a system call per id.
    pub fn new() -> Self {
        Self::at(Timestamp::now())
    }

    /// A fresh id whose UUIDv7 time prefix is `time` (to the millisecond).
    pub(crate) fn at(time: Timestamp) -> Self {
        let ms = time.unix_micros() / 1000;
        let mut random = [0u8; 10];
        fastrand::fill(&mut random);
        MessageId(uuid::Builder::from_unix_timestamp_millis(ms, &random).into_uuid())
    }

    /// The id as a 128-bit integer, the compact key dedup windows store.
    pub fn as_u128(&self) -> u128 {
        self.0.as_u128()
    }
}

impl Default for MessageId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({})", self.0)
    }
}

impl FromStr for MessageId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(MessageId)
    }
}

impl Serialize for MessageId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for MessageId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Uuid::deserialize(d).map(MessageId)
    }
}

/// A point in time with microsecond precision, serialised as RFC 3339 (UTC).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Timestamp(u64);

impl Timestamp {
    /// The current wall-clock time.
    pub fn now() -> Self {
        Self::from_system_time(SystemTime::now())
    }

    /// From microseconds since the Unix epoch.
    pub const fn from_unix_micros(micros: u64) -> Self {
        Timestamp(micros)
    }

    /// Microseconds since the Unix epoch.
    pub const fn unix_micros(self) -> u64 {
        self.0
    }

    /// From a `SystemTime` (times before 1970 clamp to the epoch).
    pub fn from_system_time(t: SystemTime) -> Self {
        let micros = t
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        Timestamp(micros)
    }

    /// As a `SystemTime`.
    pub fn to_system_time(self) -> SystemTime {
        UNIX_EPOCH + Duration::from_micros(self.0)
    }

    /// This time plus a duration (saturating).
    pub fn saturating_add(self, d: Duration) -> Self {
        Timestamp(self.0.saturating_add(d.as_micros() as u64))
    }

    /// How long from now until this time; zero if it has passed.
    pub fn remaining(self) -> Duration {
        Duration::from_micros(self.0.saturating_sub(Timestamp::now().0))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        humantime::format_rfc3339_micros(self.to_system_time()).fmt(f)
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Timestamp {
    type Err = humantime::TimestampError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        humantime::parse_rfc3339_weak(s).map(Timestamp::from_system_time)
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One message: CloudEvents attributes, switchyard extensions, and the encoded payload.
///
/// Build one with [`Envelope::new`] or, for typed events, [`crate::codec::encode`].
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Envelope {
    /// Unique id (UUIDv7); the publisher-dedup and inbox key.
    pub id: MessageId,
    /// The event type, e.g. `order.created.v1`.
    pub event_type: String,
    /// The producer, e.g. `/shop/order`.
    pub source: String,
    /// The ordering key (e.g. the order id): messages of one subject are consumed in order within a group.
    pub subject: Option<String>,
    /// When the event happened.
    pub time: Timestamp,
    /// Media type of `data`, e.g. `application/json`.
    pub datacontenttype: String,
    /// The business flow this message belongs to.
    pub correlationid: Option<String>,
    /// The message or call that caused this one.
    pub causationid: Option<String>,
    /// Where a reply to this message should go (request/reply).
    pub replyto: Option<String>,
    /// W3C trace context of the producer.
    pub traceparent: Option<String>,
    /// The time budget of the flow: work past it is wasted.
    pub deadline: Option<Timestamp>,
    /// Further CloudEvents extension attributes (lowercase alphanumeric names).
    pub extensions: BTreeMap<String, String>,
    /// The encoded payload.
    pub data: Bytes,
}

impl Envelope {
    /// A new envelope with a fresh id, the current time and the given type, source and payload.
    pub fn new(
        event_type: impl Into<String>,
        source: impl Into<String>,
        datacontenttype: impl Into<String>,
        data: impl Into<Bytes>,
    ) -> Self {
        // One clock read for both: the id's time prefix and `time` agree (to the ms).
        let time = Timestamp::now();
        Envelope {
            id: MessageId::at(time),
            event_type: event_type.into(),
            source: source.into(),
            subject: None,
            time,
            datacontenttype: datacontenttype.into(),
            correlationid: None,
            causationid: None,
            replyto: None,
            traceparent: None,
            deadline: None,
            extensions: BTreeMap::new(),
            data: data.into(),
        }
    }

    /// Sets the ordering key.
    pub fn with_subject(mut self, subject: impl Into<String>) -> Self {
        self.subject = Some(subject.into());
        self
    }

    /// Sets the id (e.g. to retry a publish idempotently with the same id).
    pub fn with_id(mut self, id: MessageId) -> Self {
        self.id = id;
        self
    }

    /// Sets the correlation id (the business flow).
    pub fn with_correlation(mut self, id: impl Into<String>) -> Self {
        self.correlationid = Some(id.into());
        self
    }

    /// Sets an extension attribute.
    pub fn with_extension(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.extensions.insert(name.into(), value.into());
        self
    }

    /// Marks this envelope as caused by `cause`: copies its correlation id (or uses its id
    /// as the flow's id), trace context and deadline, and sets `causationid` to its id.
    pub fn caused_by(mut self, cause: &Envelope) -> Self {
        self.causationid = Some(cause.id.to_string());
        self.correlationid = Some(
            cause
                .correlationid
                .clone()
                .unwrap_or_else(|| cause.id.to_string()),
        );
        if self.traceparent.is_none() {
            self.traceparent = cause.traceparent.clone();
        }
        if self.deadline.is_none() {
            self.deadline = cause.deadline;
        }
        self
    }

    /// An extension attribute's value.
    pub fn extension(&self, name: &str) -> Option<&str> {
        self.extensions.get(name).map(String::as_str)
    }

    /// Approximate encoded size in bytes (payload plus attributes), used for size limits.
    pub fn encoded_len(&self) -> usize {
        let opt = |s: &Option<String>| s.as_ref().map_or(0, String::len);
        64 + self.event_type.len()
            + self.source.len()
            + opt(&self.subject)
            + self.datacontenttype.len()
            + opt(&self.correlationid)
            + opt(&self.causationid)
            + opt(&self.replyto)
            + opt(&self.traceparent)
            + self
                .extensions
                .iter()
                .map(|(k, v)| k.len() + v.len() + 8)
                .sum::<usize>()
            + self.data.len()
    }

    /// The compact binary form backends store (version byte, then length-prefixed fields).
    pub fn to_bytes(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(self.encoded_len() + 32);
        self.write_bytes(&mut b);
        b.freeze()
    }

    /// Appends the compact binary form to `b`.
    pub fn write_bytes(&self, b: &mut impl BufMut) {
        fn put_str(b: &mut impl BufMut, s: &str) {
            b.put_u32_le(s.len() as u32);
            b.put_slice(s.as_bytes());
        }
        fn put_opt(b: &mut impl BufMut, s: &Option<String>) {
            match s {
                Some(s) => {
                    b.put_u8(1);
                    put_str(b, s);
                }
                None => b.put_u8(0),
            }
        }
        b.put_u8(WIRE_VERSION);
        b.put_u128_le(self.id.as_u128());
        put_str(b, &self.event_type);
        put_str(b, &self.source);
        put_opt(b, &self.subject);
        b.put_u64_le(self.time.0);
        put_str(b, &self.datacontenttype);
        put_opt(b, &self.correlationid);
        put_opt(b, &self.causationid);
        put_opt(b, &self.replyto);
        put_opt(b, &self.traceparent);
        match self.deadline {
            Some(d) => {
                b.put_u8(1);
                b.put_u64_le(d.0);
            }
            None => b.put_u8(0),
        }
        b.put_u32_le(self.extensions.len() as u32);
        for (k, v) in &self.extensions {
            put_str(b, k);
            put_str(b, v);
        }
        b.put_u32_le(self.data.len() as u32);
        b.put_slice(&self.data);
    }

    /// Parses the compact binary form; the payload is a zero-copy slice of `bytes`.
    pub fn from_bytes(bytes: &Bytes) -> Result<Envelope, WireError> {
        let mut r = Reader { all: bytes, pos: 0 };
        let version = r.u8()?;
        if version != WIRE_VERSION {
            return Err(WireError(format!(
                "unknown envelope wire version {version}"
            )));
        }
        let id = MessageId(Uuid::from_u128(r.u128()?));
        let event_type = r.string()?;
        let source = r.string()?;
        let subject = r.opt_string()?;
        let time = Timestamp(r.u64()?);
        let datacontenttype = r.string()?;
        let correlationid = r.opt_string()?;
        let causationid = r.opt_string()?;
        let replyto = r.opt_string()?;
        let traceparent = r.opt_string()?;
        let deadline = match r.u8()? {
            0 => None,
            _ => Some(Timestamp(r.u64()?)),
        };
        let n = r.u32()? as usize;
        let mut extensions = BTreeMap::new();
        for _ in 0..n {
            let k = r.string()?;
            let v = r.string()?;
            extensions.insert(k, v);
        }
        let len = r.u32()? as usize;
        let data = r.bytes(len)?;
        Ok(Envelope {
            id,
            event_type,
            source,
            subject,
            time,
            datacontenttype,
            correlationid,
            causationid,
            replyto,
            traceparent,
            deadline,
            extensions,
            data,
        })
    }
}

const WIRE_VERSION: u8 = 1;

/// Reads only the id from the stored binary form (cheap: for rebuilding dedup windows).
pub fn id_from_bytes(bytes: &[u8]) -> Option<MessageId> {
    if bytes.first() != Some(&WIRE_VERSION) {
        return None;
    }
    let raw: [u8; 16] = bytes.get(1..17)?.try_into().ok()?;
    Some(MessageId(Uuid::from_u128(u128::from_le_bytes(raw))))
}

/// The stored binary form of an envelope could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed stored envelope: {0}")]
pub struct WireError(pub String);

struct Reader<'a> {
    all: &'a Bytes,
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], WireError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.all.len())
            .ok_or_else(|| WireError(format!("truncated at byte {}", self.pos)))?;
        let s = &self.all[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok((&mut self.take(4)?).get_u32_le())
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok((&mut self.take(8)?).get_u64_le())
    }
    fn u128(&mut self) -> Result<u128, WireError> {
        Ok((&mut self.take(16)?).get_u128_le())
    }
    fn string(&mut self) -> Result<String, WireError> {
        let n = self.u32()? as usize;
        let s = self.take(n)?;
        String::from_utf8(s.to_vec()).map_err(|e| WireError(e.to_string()))
    }
    fn opt_string(&mut self) -> Result<Option<String>, WireError> {
        match self.u8()? {
            0 => Ok(None),
            _ => self.string().map(Some),
        }
    }
    fn bytes(&mut self, n: usize) -> Result<Bytes, WireError> {
        let start = self.pos;
        self.take(n)?;
        Ok(self.all.slice(start..start + n))
    }
}

/// CloudEvents structured-mode JSON: attributes at top level, JSON payloads under
/// `data`, other payloads base64-free as a UTF-8 string under `data` or, when not
/// UTF-8, as a byte array under `data_bytes`.
impl Serialize for Envelope {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{Error, SerializeMap};
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("specversion", SPEC_VERSION)?;
        m.serialize_entry("id", &self.id)?;
        m.serialize_entry("type", &self.event_type)?;
        m.serialize_entry("source", &self.source)?;
        if let Some(v) = &self.subject {
            m.serialize_entry("subject", v)?;
        }
        m.serialize_entry("time", &self.time)?;
        m.serialize_entry("datacontenttype", &self.datacontenttype)?;
        for (k, v) in [
            ("correlationid", &self.correlationid),
            ("causationid", &self.causationid),
            ("replyto", &self.replyto),
            ("traceparent", &self.traceparent),
        ] {
            if let Some(v) = v {
                m.serialize_entry(k, v)?;
            }
        }
        if let Some(d) = &self.deadline {
            m.serialize_entry("deadline", d)?;
        }
        for (k, v) in &self.extensions {
            m.serialize_entry(k, v)?;
        }
        if is_json(&self.datacontenttype) {
            match serde_json::from_slice::<&serde_json::value::RawValue>(&self.data) {
                Ok(raw) => m.serialize_entry("data", raw)?,
                Err(e) => return Err(S::Error::custom(format!("data is not valid JSON: {e}"))),
            }
        } else if let Ok(text) = std::str::from_utf8(&self.data) {
            m.serialize_entry("data", text)?;
        } else {
            m.serialize_entry("data_bytes", &self.data[..])?;
        }
        m.end()
    }
}

impl<'de> Deserialize<'de> for Envelope {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let mut map = BTreeMap::<String, serde_json::Value>::deserialize(d)?;
        let mut take_str = |k: &str| -> Result<Option<String>, D::Error> {
            match map.remove(k) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::String(s)) => Ok(Some(s)),
                Some(other) => Err(D::Error::custom(format!(
                    "attribute `{k}` must be a string, got {other}"
                ))),
            }
        };
        let required = |v: Option<String>, k: &str| {
            v.ok_or_else(|| D::Error::custom(format!("missing required attribute `{k}`")))
        };
        let spec = required(take_str("specversion")?, "specversion")?;
        if spec != SPEC_VERSION {
            return Err(D::Error::custom(format!(
                "unsupported specversion `{spec}`, expected `{SPEC_VERSION}`"
            )));
        }
        let id = required(take_str("id")?, "id")?
            .parse()
            .map_err(|e| D::Error::custom(format!("attribute `id`: {e}")))?;
        let event_type = required(take_str("type")?, "type")?;
        let source = required(take_str("source")?, "source")?;
        let subject = take_str("subject")?;
        let time = match take_str("time")? {
            Some(t) => t
                .parse()
                .map_err(|e| D::Error::custom(format!("attribute `time`: {e}")))?,
            None => Timestamp::now(),
        };
        let datacontenttype =
            take_str("datacontenttype")?.unwrap_or_else(|| JSON_CONTENT_TYPE.to_string());
        let correlationid = take_str("correlationid")?;
        let causationid = take_str("causationid")?;
        let replyto = take_str("replyto")?;
        let traceparent = take_str("traceparent")?;
        let deadline = match take_str("deadline")? {
            Some(t) => Some(
                t.parse()
                    .map_err(|e| D::Error::custom(format!("attribute `deadline`: {e}")))?,
            ),
            None => None,
        };
        let data = match (map.remove("data"), map.remove("data_bytes")) {
            (Some(v), _) if is_json(&datacontenttype) => {
                Bytes::from(serde_json::to_vec(&v).map_err(|e| D::Error::custom(e.to_string()))?)
            }
            (Some(serde_json::Value::String(s)), _) => Bytes::from(s),
            (_, Some(v)) => Bytes::from(
                serde_json::from_value::<Vec<u8>>(v)
                    .map_err(|e| D::Error::custom(format!("`data_bytes`: {e}")))?,
            ),
            (Some(other), None) => {
                return Err(D::Error::custom(format!(
                    "`data` of a non-JSON content type must be a string, got {other}"
                )));
            }
            (None, None) => Bytes::new(),
        };
        let mut extensions = BTreeMap::new();
        for (k, v) in map {
            match v {
                serde_json::Value::String(s) => {
                    extensions.insert(k, s);
                }
                other => {
                    extensions.insert(k, other.to_string());
                }
            }
        }
        Ok(Envelope {
            id,
            event_type,
            source,
            subject,
            time,
            datacontenttype,
            correlationid,
            causationid,
            replyto,
            traceparent,
            deadline,
            extensions,
            data,
        })
    }
}

fn is_json(content_type: &str) -> bool {
    let base = content_type.split(';').next().unwrap_or("").trim();
    base == "application/json" || base.ends_with("+json")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> Envelope {
        let mut e = Envelope::new(
            "order.created.v1",
            "/shop/order",
            JSON_CONTENT_TYPE,
            r#"{"order":"o-1","total":42}"#,
        )
        .with_subject("o-1")
        .with_correlation("flow-7")
        .with_extension("tenant", "acme");
        e.causationid = Some("cause".into());
        e.replyto = Some("_reply.abc".into());
        e.traceparent = Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
        e.deadline = Some(Timestamp::now().saturating_add(Duration::from_secs(5)));
        e
    }

    #[test]
    fn binary_roundtrip_keeps_every_attribute() {
        let e = full();
        let b = e.to_bytes();
        assert_eq!(Envelope::from_bytes(&b).unwrap(), e);
        assert_eq!(id_from_bytes(&b), Some(e.id));
        let minimal = Envelope::new("t", "s", "application/octet-stream", vec![0u8, 255, 7]);
        assert_eq!(Envelope::from_bytes(&minimal.to_bytes()).unwrap(), minimal);
    }

    #[test]
    fn binary_truncation_is_an_error_not_a_panic() {
        let b = full().to_bytes();
        for cut in 0..b.len() {
            assert!(
                Envelope::from_bytes(&b.slice(..cut)).is_err(),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn json_uses_cloudevents_names_and_roundtrips() {
        let e = full();
        let v: serde_json::Value = serde_json::to_value(&e).unwrap();
        assert_eq!(v["specversion"], "1.0");
        assert_eq!(v["type"], "order.created.v1");
        assert_eq!(v["subject"], "o-1");
        assert_eq!(v["correlationid"], "flow-7");
        assert_eq!(v["tenant"], "acme");
        assert_eq!(v["data"]["total"], 42);
        let back: Envelope = serde_json::from_value(v).unwrap();
        assert_eq!(back.id, e.id);
        assert_eq!(back.extensions, e.extensions);
        assert_eq!(back.deadline, e.deadline);
        let d1: serde_json::Value = serde_json::from_slice(&back.data).unwrap();
        let d2: serde_json::Value = serde_json::from_slice(&e.data).unwrap();
        assert_eq!(d1, d2);
    }

    #[test]
    fn json_rejects_missing_required_attributes() {
        let err = serde_json::from_str::<Envelope>(r#"{"specversion":"1.0","type":"t"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("`id`"), "{err}");
    }

    #[test]
    fn caused_by_propagates_the_flow() {
        let cause = full();
        let next = Envelope::new(
            "payment.completed.v1",
            "/shop/payment",
            JSON_CONTENT_TYPE,
            "{}",
        )
        .caused_by(&cause);
        assert_eq!(next.correlationid.as_deref(), Some("flow-7"));
        assert_eq!(next.causationid, Some(cause.id.to_string()));
        assert_eq!(next.traceparent, cause.traceparent);
        assert_eq!(next.deadline, cause.deadline);
    }

    #[test]
    fn ids_are_v7_and_time_ordered_across_milliseconds() {
        let a = MessageId::new();
        std::thread::sleep(Duration::from_millis(2));
        let b = MessageId::new();
        assert!(a < b);
        assert_eq!(a.0.get_version_num(), 7);
        let many: std::collections::HashSet<_> = (0..10_000).map(|_| MessageId::new()).collect();
        assert_eq!(many.len(), 10_000);
    }
}
