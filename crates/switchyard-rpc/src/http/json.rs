//! A JSON extractor whose rejections are problem documents: 400 with `line`/`column`
//! for malformed JSON, 422 naming the `field` for a missing or invalid one, 413 for an
//! oversize body, 415 for a non-JSON content type. Never a 500, never a panic.

use axum::extract::{FromRequest, Request};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::problem::{Problem, types};

/// JSON request body (extractor) and JSON response (responder).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Json<T>(pub T);

fn is_json(ct: &str) -> bool {
    let mime = ct.split(';').next().unwrap_or("").trim();
    mime.eq_ignore_ascii_case("application/json")
        || (mime.starts_with("application/") && mime.ends_with("+json"))
}

/// The problem for a body that failed to deserialize into `T`.
pub fn body_problem(err: serde_path_to_error::Error<serde_json::Error>) -> Problem {
    let path = err.path().to_string();
    let inner = err.into_inner();
    match inner.classify() {
        serde_json::error::Category::Data => {
            let msg = inner.to_string();
            // `missing field `x`` / `unknown field `x`` are reported at the containing
            // object; name the field itself.
            let named = ["missing field `", "unknown field `"]
                .iter()
                .find_map(|p| msg.strip_prefix(p))
                .and_then(|rest| rest.split('`').next());
            let field = match (named, path.as_str()) {
                (Some(n), ".") => n.to_string(),
                (Some(n), p) => format!("{p}.{n}"),
                (None, p) => p.to_string(),
            };
            Problem::validation(field, msg)
                .with("line", inner.line())
                .with("column", inner.column())
        }
        _ => Problem::new(types::MALFORMED, StatusCode::BAD_REQUEST, "Malformed JSON")
            .with_detail(inner.to_string())
            .with("line", inner.line())
            .with("column", inner.column()),
    }
}

/// Deserializes `bytes` as `T`, or the problem to answer with.
pub fn parse_body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Problem> {
    // The common case, a valid body, without tracking the path; a failure is parsed
    // again with the path tracked, to name the field in the problem.
    if let Ok(v) = serde_json::from_slice(bytes) {
        return Ok(v);
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let v: T = serde_path_to_error::deserialize(&mut de).map_err(body_problem)?;
    de.end().map_err(|e| {
        Problem::new(types::MALFORMED, StatusCode::BAD_REQUEST, "Malformed JSON")
            .with_detail(e.to_string())
            .with("line", e.line())
            .with("column", e.column())
    })?;
    Ok(v)
}

/// The 413 problem.
pub fn too_large() -> Problem {
    Problem::new(
        types::TOO_LARGE,
        StatusCode::PAYLOAD_TOO_LARGE,
        "Request body too large",
    )
}

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Json<T> {
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Problem> {
        let ct = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !is_json(ct) {
            return Err(Problem::new(
                types::UNSUPPORTED_MEDIA_TYPE,
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "Expected application/json",
            )
            .with_detail(format!("content-type was `{ct}`")));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|rej| {
            if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
                too_large()
            } else {
                Problem::new(types::MALFORMED, StatusCode::BAD_REQUEST, "Unreadable body")
                    .with_detail(rej.body_text())
            }
        })?;
        parse_body(&bytes).map(Json)
    }
}

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        match serde_json::to_vec(&self.0) {
            Ok(body) => (
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                )],
                body,
            )
                .into_response(),
            Err(e) => {
                tracing::error!(error = %e, "response does not serialize");
                Problem::internal().into_response()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Pay {
        amount: u64,
        items: Vec<Item>,
    }
    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Item {
        qty: u32,
    }

    #[test]
    fn classifies_errors() {
        let p = parse_body::<Pay>(b"{\"amount\": 1,").unwrap_err();
        assert_eq!(p.status, 400);
        assert!(p.extensions.contains_key("line"));
        let p = parse_body::<Pay>(b"{\"items\": []}").unwrap_err();
        assert_eq!((p.status, p.extension_str("field")), (422, Some("amount")));
        let p = parse_body::<Pay>(br#"{"amount": 1, "items": [{"qty": "x"}]}"#).unwrap_err();
        assert_eq!(
            (p.status, p.extension_str("field")),
            (422, Some("items[0].qty"))
        );
        let p = parse_body::<Pay>(br#"{"amount": 1, "items": [{}]}"#).unwrap_err();
        assert_eq!(p.extension_str("field"), Some("items[0].qty"));
        let p = parse_body::<Pay>(br#"{"amount": 1, "items": []} x"#).unwrap_err();
        assert_eq!(p.status, 400);
    }
}
