//! RFC 9457 problem details (`application/problem+json`) with stable `type` URIs.

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde::{Deserialize, Serialize};

/// The media type of a problem document.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// The stable `type` URIs this crate emits. Clients branch on these, never on `title`.
pub mod types {
    /// The body is not valid JSON (syntax); `line` and `column` say where.
    pub const MALFORMED: &str = "https://switchyard.dev/problems/malformed";
    /// The JSON is well formed but a field is missing or invalid; `field` names it.
    pub const VALIDATION: &str = "https://switchyard.dev/problems/validation";
    /// The body exceeds the server's limit.
    pub const TOO_LARGE: &str = "https://switchyard.dev/problems/payload-too-large";
    /// The body is not `application/json`.
    pub const UNSUPPORTED_MEDIA_TYPE: &str =
        "https://switchyard.dev/problems/unsupported-media-type";
    /// The caller's propagated deadline passed before the handler finished.
    pub const DEADLINE_EXCEEDED: &str = "https://switchyard.dev/problems/deadline-exceeded";
    /// No route matches the request.
    pub const NOT_FOUND: &str = "https://switchyard.dev/problems/not-found";
    /// The same `Idempotency-Key` was sent with a different request body.
    pub const IDEMPOTENCY_MISMATCH: &str =
        "https://switchyard.dev/problems/idempotency-key-mismatch";
    /// A request with this `Idempotency-Key` is still being processed.
    pub const IDEMPOTENCY_IN_PROGRESS: &str =
        "https://switchyard.dev/problems/idempotency-key-in-progress";
    /// The service is not ready to take traffic.
    pub const NOT_READY: &str = "https://switchyard.dev/problems/not-ready";
    /// The server failed; the detail is in its logs.
    pub const INTERNAL: &str = "https://switchyard.dev/problems/internal";
}

/// An RFC 9457 problem document; also a handler error (it implements `IntoResponse`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Problem {
    /// A URI identifying the problem type (see [`types`]); `about:blank` if absent.
    #[serde(rename = "type", default = "about_blank")]
    pub type_uri: String,
    /// A short human-readable summary of the type.
    #[serde(default)]
    pub title: String,
    /// The HTTP status code.
    #[serde(default)]
    pub status: u16,
    /// What happened this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Extension members (e.g. `field`, `line`, `column`).
    #[serde(flatten)]
    pub extensions: serde_json::Map<String, serde_json::Value>,
}

fn about_blank() -> String {
    "about:blank".to_string()
}

impl Problem {
    /// A problem of `type_uri` with `status` and `title`.
    pub fn new(type_uri: impl Into<String>, status: StatusCode, title: impl Into<String>) -> Self {
        Problem {
            type_uri: type_uri.into(),
            title: title.into(),
            status: status.as_u16(),
            detail: None,
            extensions: serde_json::Map::new(),
        }
    }

    /// Sets the detail.
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// Adds an extension member.
    pub fn with(mut self, name: &str, value: impl Into<serde_json::Value>) -> Self {
        self.extensions.insert(name.to_string(), value.into());
        self
    }

    /// The extension member `name`, if it is a string.
    pub fn extension_str(&self, name: &str) -> Option<&str> {
        self.extensions.get(name).and_then(|v| v.as_str())
    }

    /// A 422 validation problem naming `field`.
    pub fn validation(field: impl Into<String>, detail: impl Into<String>) -> Self {
        let field = field.into();
        Problem::new(
            types::VALIDATION,
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid request field",
        )
        .with_detail(detail)
        .with("field", field)
    }

    /// A 500 problem (details belong in the logs, not the response).
    pub fn internal() -> Self {
        Problem::new(
            types::INTERNAL,
            StatusCode::INTERNAL_SERVER_ERROR,
            "Internal server error",
        )
    }

    /// The status as a `StatusCode` (500 if out of range).
    pub fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}, {})", self.title, self.status, self.type_uri)?;
        if let Some(d) = &self.detail {
            write!(f, ": {d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Problem {}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = self.status_code();
        let body = serde_json::to_vec(&self).unwrap_or_else(|_| b"{}".to_vec());
        let mut res = (status, body).into_response();
        res.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_extensions() {
        let p = Problem::validation("amount", "missing field `amount`");
        let json = serde_json::to_string(&p).unwrap();
        assert!(json.contains(r#""type":"https://switchyard.dev/problems/validation""#));
        let back: Problem = serde_json::from_str(&json).unwrap();
        assert_eq!(back, p);
        assert_eq!(back.extension_str("field"), Some("amount"));
    }
}
