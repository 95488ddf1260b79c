//! The errors of this crate, and how they map onto [`switchyard::Error`].

use switchyard::Error;

/// What failed, to branch on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum NatsErrorKind {
    /// The server could not be reached.
    Connect,
    /// A stream could not be created or read.
    Stream,
    /// A durable consumer could not be created.
    Consumer,
    /// A publish was not acknowledged.
    Publish,
    /// Fetching, acknowledging or subscribing failed.
    Consume,
}

/// A failure talking to nats-server; each message says what to check.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct NatsError {
    kind: NatsErrorKind,
    what: String,
    #[source]
    source: Box<dyn std::error::Error + Send + Sync>,
}

impl NatsError {
    /// The kind of failure.
    pub fn kind(&self) -> NatsErrorKind {
        self.kind
    }

    /// Builds the error and maps it onto the contract's error.
    fn build(
        kind: NatsErrorKind,
        what: String,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Error {
        let e = NatsError {
            kind,
            what,
            source: source.into(),
        };
        match kind {
            NatsErrorKind::Connect | NatsErrorKind::Publish | NatsErrorKind::Consume => {
                Error::Unavailable(e.to_string())
            }
            NatsErrorKind::Stream | NatsErrorKind::Consumer => Error::storage(e.what.clone(), e),
        }
    }

    pub(crate) fn connect(
        url: &str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Error {
        Self::build(
            NatsErrorKind::Connect,
            format!("connecting to nats-server at {url} (is it running, with `-js`?)"),
            source,
        )
    }

    pub(crate) fn stream(
        topic: &str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Error {
        Self::build(
            NatsErrorKind::Stream,
            format!(
                "creating or reading the JetStream stream of topic `{topic}` (is JetStream enabled and within its limits?)"
            ),
            source,
        )
    }

    pub(crate) fn consumer(
        topic: &str,
        group: &str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Error {
        Self::build(
            NatsErrorKind::Consumer,
            format!("creating the durable consumer of group `{group}` on topic `{topic}`"),
            source,
        )
    }

    pub(crate) fn publish(
        topic: &str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Error {
        Self::build(
            NatsErrorKind::Publish,
            format!("publishing to topic `{topic}` was not acknowledged; retry with the same id"),
            source,
        )
    }

    pub(crate) fn consume(
        what: String,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Error {
        Self::build(NatsErrorKind::Consume, what, source)
    }
}
