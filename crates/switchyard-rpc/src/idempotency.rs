//! Server-side idempotency: a request carrying `Idempotency-Key` runs its handler once.
//!
//! ```no_run
//! # use std::sync::Arc;
//! use axum::{Router, routing::post, middleware::from_fn_with_state};
//! use switchyard_rpc::idempotency::{self, Idempotency};
//! # async fn charge() -> &'static str { "ok" }
//! let store: Arc<dyn switchyard::store::Store> = Arc::new(switchyard::store::MemoryStore::new());
//! let idem = Idempotency::new(store, "payment.charge");
//! let app: Router = Router::new()
//!     .route("/charge", post(charge).layer(from_fn_with_state(idem, idempotency::middleware)));
//! ```
//!
//! | request | answer |
//! | --- | --- |
//! | no `Idempotency-Key` | the handler runs (no protection) |
//! | new key | an *in progress* record is committed first (optimistic, via [`Txn`]: of two racing first requests exactly one commit succeeds, the store's conflict rule decides), then the handler runs; a 2xx/4xx answer is stored (status, content type, body), a 5xx answer deletes the record so a retry runs the handler again |
//! | same key, same request, completed | the stored answer, with `idempotent-replayed: true`; the handler does not run |
//! | same key, same request, still in flight | 409 problem+json with `Retry-After: 1` (retry later with the same key) |
//! | same key, different method/path/body | 422 problem+json |
//!
//! The request fingerprint is FNV-1a 64 of method, path and body (stable across
//! releases, unlike `std`'s hasher; it detects mistakes, it is not a security boundary).
//! An *in progress* record left by a cancelled handler is removed when the handler is
//! dropped; one left by a crash is taken over after `in_progress_ttl`. Completed records
//! are kept until removed (expiry is not implemented yet).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde::{Deserialize, Serialize};
use switchyard::store::{Store, Table, Txn};

use crate::context::{IDEMPOTENCY_HEADER, unix_millis};
use crate::problem::{Problem, types};

/// The table the records live in (keys: `<scope>:<idempotency key>`).
pub const RECORDS: Table<Record> = Table::new("switchyard_rpc_idempotency");

/// The header set on a replayed answer.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";

/// A stored idempotency record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Record {
    /// The first request is running.
    InProgress {
        /// Request fingerprint (hex).
        fingerprint: String,
        /// When it started (Unix ms).
        started_ms: u64,
    },
    /// The first request finished with this answer.
    Completed {
        /// Request fingerprint (hex).
        fingerprint: String,
        /// Response status.
        status: u16,
        /// Response content type.
        content_type: Option<String>,
        /// Response body.
        body: Vec<u8>,
    },
}

impl Record {
    fn fingerprint(&self) -> &str {
        match self {
            Record::InProgress { fingerprint, .. } | Record::Completed { fingerprint, .. } => {
                fingerprint
            }
        }
    }
}

/// The idempotency helper's settings and store (cheap to clone).
#[derive(Clone)]
pub struct Idempotency {
    store: Arc<dyn Store>,
    scope: Arc<str>,
    /// After this long an *in progress* record is considered abandoned (default 60 s).
    pub in_progress_ttl: Duration,
    /// The largest request body buffered for fingerprinting (default 1 MiB).
    pub max_body: usize,
}

impl std::fmt::Debug for Idempotency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idempotency")
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

impl Idempotency {
    /// Records in `store`, keys scoped by `scope` (e.g. the operation name).
    pub fn new(store: Arc<dyn Store>, scope: &str) -> Self {
        Idempotency {
            store,
            scope: Arc::from(scope),
            in_progress_ttl: Duration::from_secs(60),
            max_body: 1024 * 1024,
        }
    }

    /// The stored record for `key`, if any.
    pub async fn record(&self, key: &str) -> switchyard::Result<Option<Record>> {
        Txn::new(self.store.clone())
            .get(&RECORDS, &self.row_key(key))
            .await
    }

    fn row_key(&self, key: &str) -> String {
        format!("{}:{key}", self.scope)
    }
}

/// FNV-1a 64 of method, path and body.
pub fn fingerprint(method: &str, path: &str, body: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in [method.as_bytes(), b"\0", path.as_bytes(), b"\0", body] {
        for b in part {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

enum Begin {
    Run,
    Replay(Record),
    InProgress,
    Mismatch,
}

fn classify(rec: Record, fp: &str, now_ms: u64, ttl: Duration) -> Option<Begin> {
    if rec.fingerprint() != fp {
        return Some(Begin::Mismatch);
    }
    match rec {
        Record::Completed { .. } => Some(Begin::Replay(rec)),
        Record::InProgress { started_ms, .. }
            if now_ms.saturating_sub(started_ms) < ttl.as_millis() as u64 =>
        {
            Some(Begin::InProgress)
        }
        // Abandoned: take it over.
        Record::InProgress { .. } => None,
    }
}

async fn begin(idem: &Idempotency, row: &str, fp: &str) -> switchyard::Result<Begin> {
    let now_ms = unix_millis(SystemTime::now());
    let txn = Txn::new(idem.store.clone());
    if let Some(rec) = txn.get(&RECORDS, row).await?
        && let Some(b) = classify(rec, fp, now_ms, idem.in_progress_ttl)
    {
        return Ok(b);
    }
    txn.put(
        &RECORDS,
        row,
        &Record::InProgress {
            fingerprint: fp.to_string(),
            started_ms: now_ms,
        },
    )?;
    match txn.commit().await {
        Ok(()) => Ok(Begin::Run),
        Err(switchyard::Error::Conflict { .. }) => {
            // Another request with this key committed first.
            let rec = Txn::new(idem.store.clone()).get(&RECORDS, row).await?;
            Ok(rec
                .and_then(|r| classify(r, fp, now_ms, Duration::MAX))
                .unwrap_or(Begin::InProgress))
        }
        Err(e) => Err(e),
    }
}

/// Deletes the in-progress record if the handler never finished (cancelled or panicked).
struct Abandon {
    store: Arc<dyn Store>,
    row: String,
    armed: bool,
}

impl Drop for Abandon {
    fn drop(&mut self) {
        if self.armed {
            let store = self.store.clone();
            let row = std::mem::take(&mut self.row);
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let txn = Txn::new(store);
                    txn.delete(&RECORDS, &row);
                    if let Err(e) = txn.commit().await {
                        tracing::warn!(error = %e, row, "could not release idempotency record");
                    }
                });
            }
        }
    }
}

fn store_failed(e: switchyard::Error) -> Response {
    tracing::error!(error = %e, "idempotency store failed");
    let mut r = Problem::new(
        "https://switchyard.dev/problems/unavailable",
        StatusCode::SERVICE_UNAVAILABLE,
        "Idempotency store unavailable",
    )
    .into_response();
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

fn replay(rec: Record) -> Response {
    let Record::Completed {
        status,
        content_type,
        body,
        ..
    } = rec
    else {
        return Problem::internal().into_response();
    };
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    if let Some(ct) = content_type.and_then(|c| HeaderValue::from_str(&c).ok()) {
        r.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    r.headers_mut()
        .insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
    r
}

/// The middleware (use with `axum::middleware::from_fn_with_state`); see the module docs.
pub async fn middleware(State(idem): State<Idempotency>, req: Request, next: Next) -> Response {
    let Some(key) = req
        .headers()
        .get(IDEMPOTENCY_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
    else {
        return next.run(req).await;
    };
    if key.len() > 255 {
        return Problem::validation("Idempotency-Key", "must be at most 255 characters")
            .into_response();
    }
    let (parts, body) = req.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, idem.max_body).await else {
        return crate::http::json_too_large().into_response();
    };
    let fp = fingerprint(parts.method.as_str(), parts.uri.path(), &bytes);
    let row = idem.row_key(&key);
    match begin(&idem, &row, &fp).await {
        Err(e) => return store_failed(e),
        Ok(Begin::Replay(rec)) => return replay(rec),
        Ok(Begin::Mismatch) => {
            return Problem::new(
                types::IDEMPOTENCY_MISMATCH,
                StatusCode::UNPROCESSABLE_ENTITY,
                "Idempotency key reused with a different request",
            )
            .with("field", "Idempotency-Key")
            .into_response();
        }
        Ok(Begin::InProgress) => {
            let mut r = Problem::new(
                types::IDEMPOTENCY_IN_PROGRESS,
                StatusCode::CONFLICT,
                "A request with this idempotency key is in progress",
            )
            .into_response();
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return r;
        }
        Ok(Begin::Run) => {}
    }
    let mut guard = Abandon {
        store: idem.store.clone(),
        row: row.clone(),
        armed: true,
    };
    let res = next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await;
    let (rparts, rbody) = res.into_parts();
    let rbytes = match axum::body::to_bytes(rbody, usize::MAX).await {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "handler response body failed");
            return Problem::internal().into_response();
        }
    };
    let txn = Txn::new(idem.store.clone());
    if rparts.status.is_server_error() {
        txn.delete(&RECORDS, &row);
    } else {
        let rec = Record::Completed {
            fingerprint: fp,
            status: rparts.status.as_u16(),
            content_type: rparts
                .headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            body: rbytes.to_vec(),
        };
        if let Err(e) = txn.put(&RECORDS, &row, &rec) {
            return store_failed(e);
        }
    }
    if let Err(e) = txn.commit().await {
        return store_failed(e);
    }
    guard.armed = false;
    Response::from_parts(rparts, Body::from(rbytes))
}
