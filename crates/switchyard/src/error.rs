//! The one error type of the contract, with a [`ErrorKind`] to branch on.

use std::path::PathBuf;

use crate::codec::DecodeError;

/// Result alias for switchyard operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, in a form code can branch on (retry, reject, alert).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The caller passed something invalid (a name, a size); fix the input, don't retry.
    InvalidInput,
    /// An ack/nack for a delivery whose lease expired and that was handed out again.
    StaleDelivery,
    /// The bus or subscription was closed.
    Closed,
    /// The storage under the backend failed (disk full, permission, corruption).
    Storage,
    /// Another process holds the data directory.
    Locked,
    /// A payload could not be decoded into the expected type.
    Decode,
    /// The named thing does not exist.
    NotFound,
    /// A remote backend is unreachable or timed out; retrying later may help.
    Unavailable,
    /// A transaction read a row that another commit changed; retry the transaction.
    Conflict,
    /// The message was already processed by this consumer (inbox); skip it.
    AlreadyProcessed,
    /// A transient publish found no subscriber on its topic; nobody would receive it.
    NoSubscribers,
}

/// An error from a bus or its machinery. Each message says what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The envelope is larger than the bus's configured maximum.
    #[error(
        "message of {size} bytes exceeds the bus limit of {limit} bytes; send a reference to the data instead, or raise `max_message_bytes`"
    )]
    PayloadTooLarge {
        /// Encoded size of the rejected envelope.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// A topic or group name is not allowed.
    #[error("invalid {what} name `{name}`: {reason}")]
    InvalidName {
        /// `topic` or `group`.
        what: &'static str,
        /// The rejected name.
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// Some other argument is invalid.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The delivery's ack deadline passed and it was handed to another consumer; this settle was not applied.
    #[error(
        "stale delivery of {topic}/{group} offset {offset}: its ack timeout passed and it was redelivered; raise `ack_wait` if handlers need longer"
    )]
    StaleDelivery {
        /// Topic of the delivery.
        topic: String,
        /// Consumer group of the delivery.
        group: String,
        /// Position of the message in the topic.
        offset: u64,
    },
    /// The bus was closed.
    #[error("the bus is closed")]
    Closed,
    /// The data directory is in use by another process.
    #[error("data directory {path} is locked by another process; stop it or use another directory")]
    Locked {
        /// The locked directory.
        path: PathBuf,
    },
    /// The backend's storage failed.
    #[error("storage error while {context}: {source}")]
    Storage {
        /// What the backend was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Decoding a payload failed.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// Something named does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// A remote backend could not be reached.
    #[error("backend unavailable: {0}; retry later")]
    Unavailable(String),
    /// Optimistic concurrency: a row this transaction read changed before it committed.
    #[error(
        "conflict on {table}/{key}: another commit changed it after this transaction read it; run the transaction again"
    )]
    Conflict {
        /// Table of the changed row.
        table: String,
        /// Key of the changed row.
        key: String,
    },
    /// A transient publish found no member subscribed to the topic (nothing is stored, so
    /// the message would reach nobody).
    #[error(
        "no subscriber on transient topic `{topic}`; start its consumer (for requests: a responder on that topic) or check the topic name"
    )]
    NoSubscribers {
        /// The topic.
        topic: String,
    },
    /// A transient publish found every member of every group with a full queue.
    #[error(
        "every subscriber of transient topic `{topic}` has a full queue ({capacity} messages); the consumers are too slow, retry later or add members"
    )]
    SubscribersFull {
        /// The topic.
        topic: String,
        /// Capacity of one member's queue.
        capacity: usize,
    },
    /// The inbox already holds this message for this consumer: its effect was applied.
    #[error("message {id} was already processed by `{consumer}`; nothing was written")]
    AlreadyProcessed {
        /// The consumer (e.g. `topic/group`).
        consumer: String,
        /// The message id.
        id: String,
    },
}

impl Error {
    /// The kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::PayloadTooLarge { .. }
            | Error::InvalidName { .. }
            | Error::InvalidArgument(_) => ErrorKind::InvalidInput,
            Error::StaleDelivery { .. } => ErrorKind::StaleDelivery,
            Error::Closed => ErrorKind::Closed,
            Error::Locked { .. } => ErrorKind::Locked,
            Error::Storage { .. } => ErrorKind::Storage,
            Error::Decode(_) => ErrorKind::Decode,
            Error::NotFound(_) => ErrorKind::NotFound,
            Error::Unavailable(_) | Error::SubscribersFull { .. } => ErrorKind::Unavailable,
            Error::NoSubscribers { .. } => ErrorKind::NoSubscribers,
            Error::Conflict { .. } => ErrorKind::Conflict,
            Error::AlreadyProcessed { .. } => ErrorKind::AlreadyProcessed,
        }
    }

    /// Wraps a backend error with what was being done.
    pub fn storage(
        context: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Error::Storage {
            context: context.into(),
            source: source.into(),
        }
    }
}

/// Checks a topic or group name: 1–200 characters of `[A-Za-z0-9._-]`, not starting with `.`,
/// or starting with `$` for names reserved to the bus itself.
pub fn validate_name(what: &'static str, name: &str) -> Result<()> {
    let bad = |reason| {
        Err(Error::InvalidName {
            what,
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() || name.len() > 200 {
        return bad("must be 1 to 200 characters");
    }
    let body = name.strip_prefix('$').unwrap_or(name);
    if body.starts_with('.') || body.is_empty() {
        return bad("must not start with `.`");
    }
    if !body
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return bad("only ASCII letters, digits, `.`, `_` and `-` are allowed");
    }
    Ok(())
}

/// The message of a caught panic (`panic!("...")` payloads are `&str` or `String`).
pub(crate) fn panic_text(panic: Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("topic", "orders").is_ok());
        assert!(validate_name("topic", "orders.dlq").is_ok());
        assert!(validate_name("group", "$dlq").is_ok());
        assert!(validate_name("topic", "").is_err());
        assert!(validate_name("topic", "../etc").is_err());
        assert!(validate_name("topic", "a/b").is_err());
        assert!(validate_name("topic", "a b").is_err());
        let e = validate_name("topic", "a/b").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert!(e.to_string().contains("a/b"));
    }
}
