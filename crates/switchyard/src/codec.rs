//! Typed events and the JSON codec.
//!
//! A Rust type is one event type: implement [`Event`] with its `type` string, then
//! [`encode`] it into an [`Envelope`] and [`decode`] it back. Decoding never panics:
//! a different `type` or a malformed payload is a [`DecodeError`], which the router
//! treats as terminal (straight to the DLQ with the reason, no retries).

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::envelope::{Envelope, JSON_CONTENT_TYPE};

/// A typed event: one Rust type maps to exactly one CloudEvents `type` string.
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use switchyard::codec::{self, Event};
///
/// #[derive(Serialize, Deserialize, PartialEq, Debug)]
/// struct OrderCreated { order_id: String, total_cents: u64 }
///
/// impl Event for OrderCreated {
///     const TYPE: &'static str = "order.created.v1";
/// }
///
/// let env = codec::encode(&OrderCreated { order_id: "o-1".into(), total_cents: 4200 }, "/shop/order")?;
/// assert_eq!(env.event_type, "order.created.v1");
/// let back: OrderCreated = codec::decode(&env)?;
/// assert_eq!(back.total_cents, 4200);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub trait Event: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The CloudEvents `type`, versioned, e.g. `order.created.v1`.
    const TYPE: &'static str;

    /// The ordering key of this event (e.g. the order id), if it has one.
    fn subject(&self) -> Option<String> {
        None
    }
}

/// A typed event could not be encoded.
#[derive(Debug, thiserror::Error)]
#[error("cannot encode event `{event_type}` as JSON: {source}")]
pub struct EncodeError {
    /// The event type that failed.
    pub event_type: &'static str,
    /// The serializer's error.
    #[source]
    pub source: serde_json::Error,
}

/// An envelope could not be decoded into the expected event. Never worth retrying.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The envelope's `type` is not one this consumer knows.
    #[error("unknown event type `{found}` (this consumer handles {expected})")]
    UnknownType {
        /// What the consumer handles (one type or a list).
        expected: String,
        /// The envelope's `type`.
        found: String,
    },
    /// The payload does not parse as the event's schema.
    #[error("malformed payload for `{event_type}`: {reason}")]
    Malformed {
        /// The envelope's `type`.
        event_type: String,
        /// What the parser said (with line and column).
        reason: String,
    },
    /// The payload's content type is not one the codec reads.
    #[error(
        "unsupported content type `{content_type}` for `{event_type}` (expected application/json)"
    )]
    UnsupportedContentType {
        /// The envelope's `type`.
        event_type: String,
        /// The envelope's `datacontenttype`.
        content_type: String,
    },
}

/// Encodes a typed event as JSON into a fresh envelope (new id, current time, subject from the event).
pub fn encode<E: Event>(event: &E, source: &str) -> Result<Envelope, EncodeError> {
    let data = serde_json::to_vec(event).map_err(|source| EncodeError {
        event_type: E::TYPE,
        source,
    })?;
    let mut env = Envelope::new(E::TYPE, source, JSON_CONTENT_TYPE, data);
    env.subject = event.subject();
    Ok(env)
}

/// Decodes an envelope into the typed event `E`, checking the `type` first.
pub fn decode<E: Event>(env: &Envelope) -> Result<E, DecodeError> {
    if env.event_type != E::TYPE {
        return Err(DecodeError::UnknownType {
            expected: format!("`{}`", E::TYPE),
            found: env.event_type.clone(),
        });
    }
    decode_payload(env)
}

/// Decodes the payload as `T` without checking the `type` (for routers that matched it already).
pub fn decode_payload<T: DeserializeOwned>(env: &Envelope) -> Result<T, DecodeError> {
    let base = env.datacontenttype.split(';').next().unwrap_or("").trim();
    if !(base == JSON_CONTENT_TYPE || base.ends_with("+json")) {
        return Err(DecodeError::UnsupportedContentType {
            event_type: env.event_type.clone(),
            content_type: env.datacontenttype.clone(),
        });
    }
    serde_json::from_slice(&env.data).map_err(|e| DecodeError::Malformed {
        event_type: env.event_type.clone(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct PaymentCompleted {
        order_id: String,
        amount_cents: u64,
    }
    impl Event for PaymentCompleted {
        const TYPE: &'static str = "payment.completed.v1";
        fn subject(&self) -> Option<String> {
            Some(self.order_id.clone())
        }
    }

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct Other {}
    impl Event for Other {
        const TYPE: &'static str = "other.v1";
    }

    #[test]
    fn roundtrip_sets_type_and_subject() {
        let ev = PaymentCompleted {
            order_id: "o-9".into(),
            amount_cents: 100,
        };
        let env = encode(&ev, "/payment").unwrap();
        assert_eq!(env.event_type, "payment.completed.v1");
        assert_eq!(env.subject.as_deref(), Some("o-9"));
        assert_eq!(decode::<PaymentCompleted>(&env).unwrap(), ev);
    }

    #[test]
    fn unknown_type_is_a_typed_error() {
        let env = encode(&Other {}, "/x").unwrap();
        match decode::<PaymentCompleted>(&env) {
            Err(DecodeError::UnknownType { found, .. }) => assert_eq!(found, "other.v1"),
            other => panic!("expected UnknownType, got {other:?}"),
        }
    }

    #[test]
    fn malformed_payload_is_a_typed_error_with_the_reason() {
        let mut env = encode(
            &PaymentCompleted {
                order_id: "o".into(),
                amount_cents: 1,
            },
            "/x",
        )
        .unwrap();
        env.data = bytes::Bytes::from_static(b"{\"order_id\": 5");
        let err = decode::<PaymentCompleted>(&env).unwrap_err();
        assert!(matches!(err, DecodeError::Malformed { .. }));
        assert!(err.to_string().contains("payment.completed.v1"));
        env.data = bytes::Bytes::from_static(b"\xff\xfe garbage");
        assert!(matches!(
            decode::<PaymentCompleted>(&env),
            Err(DecodeError::Malformed { .. })
        ));
    }

    #[test]
    fn non_json_content_type_is_rejected() {
        let mut env = encode(&Other {}, "/x").unwrap();
        env.datacontenttype = "text/plain".into();
        assert!(matches!(
            decode::<Other>(&env),
            Err(DecodeError::UnsupportedContentType { .. })
        ));
    }
}
