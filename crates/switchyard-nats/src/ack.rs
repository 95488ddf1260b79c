//! The server's answer to a JetStream publish, read straight into the two fields the bus
//! uses.
//!
//! A JetStream publish is a core NATS request to the stream's subject; the server answers
//! `{"stream":…,"seq":…,"duplicate":…}` or `{"error":{…}}`. async-nats reads it through a
//! generic untagged response enum, which buffers every field before it picks a variant
//! (~3,400 instructions per ack, more than the rest of a publish; decision 0009, *Hot
//! paths*). This reads the same JSON with a borrowed struct.

use std::borrow::Cow;

use serde::Deserialize;

/// How long a publish waits for its ack: async-nats' JetStream default.
pub(crate) const ACK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// A stored (or deduplicated) publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ack {
    /// The message's stream sequence (the earlier copy's, for a duplicate).
    pub(crate) sequence: u64,
    /// The stream already had a message with this `Nats-Msg-Id` within its window.
    pub(crate) duplicate: bool,
}

/// Why an answer is not an ack.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AckError {
    /// The server refused the message (e.g. a stream limit, a wrong expected sequence).
    #[error("the server refused the message: {description} (code {code}, error code {err_code})")]
    Refused {
        /// HTTP-like status.
        code: u16,
        /// JetStream's own error code.
        err_code: u64,
        /// The server's words.
        description: String,
    },
    /// No answer within [`ACK_TIMEOUT`]: the message may or may not be stored.
    #[error("no ack within {ACK_TIMEOUT:?}; the message may or may not be stored")]
    TimedOut,
    /// The answer is neither an ack nor an error.
    #[error("the answer to a publish is not a JetStream ack: {0}")]
    Malformed(String),
}

#[derive(Deserialize)]
struct Answer<'a> {
    #[serde(borrow, default)]
    stream: Option<Cow<'a, str>>,
    #[serde(default)]
    seq: u64,
    #[serde(default)]
    duplicate: bool,
    #[serde(borrow, default)]
    error: Option<ApiError<'a>>,
}

#[derive(Deserialize)]
struct ApiError<'a> {
    #[serde(default)]
    code: u16,
    #[serde(default)]
    err_code: u64,
    #[serde(borrow, default)]
    description: Cow<'a, str>,
}

/// Reads the server's answer to a publish.
pub(crate) fn read(payload: &[u8]) -> Result<Ack, AckError> {
    let answer: Answer<'_> = serde_json::from_slice(payload)
        .map_err(|e| AckError::Malformed(format!("{e}: {}", String::from_utf8_lossy(payload))))?;
    if let Some(e) = answer.error {
        return Err(AckError::Refused {
            code: e.code,
            err_code: e.err_code,
            description: e.description.into_owned(),
        });
    }
    if answer.stream.is_none() || answer.seq == 0 {
        return Err(AckError::Malformed(
            String::from_utf8_lossy(payload).into_owned(),
        ));
    }
    Ok(Ack {
        sequence: answer.seq,
        duplicate: answer.duplicate,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ack_gives_its_sequence_and_whether_it_was_a_duplicate() {
        let a = read(br#"{"stream":"SY_x_orders","seq":42}"#).map_err(|e| e.to_string());
        assert_eq!(
            a,
            Ok(Ack {
                sequence: 42,
                duplicate: false
            })
        );
        let a = read(br#"{"stream":"SY_x_orders","domain":"hub","seq":7,"duplicate":true}"#)
            .map_err(|e| e.to_string());
        assert_eq!(
            a,
            Ok(Ack {
                sequence: 7,
                duplicate: true
            })
        );
    }

    #[test]
    fn an_error_answer_is_refused_with_the_servers_words() {
        let e = read(
            br#"{"error":{"code":400,"err_code":10071,"description":"wrong last sequence: 3"},"stream":"S","seq":0}"#,
        );
        match e {
            Err(AckError::Refused {
                code,
                err_code,
                description,
            }) => {
                assert_eq!((code, err_code), (400, 10071));
                assert_eq!(description, "wrong last sequence: 3");
            }
            other => panic!("expected Refused, got {other:?}"),
        }
    }

    #[test]
    fn anything_else_is_malformed() {
        for body in [
            &b""[..],
            b"{}",
            b"{\"seq\":3}",
            b"not json",
            b"{\"stream\":\"S\"}",
        ] {
            assert!(
                matches!(read(body), Err(AckError::Malformed(_))),
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
