//! The test service `switchyard.test.v1.Echo` (`proto/echo.proto`): the generated
//! messages, client and server, and [`EchoService`], a reference implementation the
//! integration tests and the `rpc` benchmark serve.
//!
//! The generated code is checked in (`generated/switchyard.test.v1.rs`, see
//! `docs/decisions/0005-grpc-codegen.md`) and depends only on `tonic::codegen`,
//! `tonic_prost` and `prost`; nothing else in the crate reaches into it but this module.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::server::require_non_empty;
use crate::context::CallContext;

#[allow(missing_docs, clippy::all, clippy::pedantic, clippy::unwrap_used)]
#[rustfmt::skip]
#[path = "generated/switchyard.test.v1.rs"]
mod pb;

pub use pb::echo_client::EchoClient;
pub use pb::echo_server::{Echo, EchoServer};
pub use pb::{EchoReply, EchoRequest};

#[derive(Debug, Default)]
struct Counts {
    hits: AtomicU64,
    effects: AtomicU64,
    by_key: Mutex<HashMap<String, u64>>,
}

/// The reference `Echo`: sleeps `delay_ms`, runs its "effect" (a counter) once per
/// idempotency key (every time without a key), then answers UNAVAILABLE if `fail`,
/// else the reply with what it saw of the call context. An empty `message` is
/// INVALID_ARGUMENT naming `message`. Cheap to clone; clones share the counters.
#[derive(Debug, Clone, Default)]
pub struct EchoService {
    counts: Arc<Counts>,
}

impl EchoService {
    /// A fresh service.
    pub fn new() -> Self {
        Self::default()
    }

    /// The tonic service to serve.
    pub fn server(self) -> EchoServer<Self> {
        EchoServer::new(self)
    }

    /// Calls that reached the handler.
    pub fn hits(&self) -> u64 {
        self.counts.hits.load(Ordering::SeqCst)
    }

    /// Effects run in total.
    pub fn effects(&self) -> u64 {
        self.counts.effects.load(Ordering::SeqCst)
    }

    /// Effects run for idempotency key `key`.
    pub fn effects_for(&self, key: &str) -> u64 {
        self.counts
            .by_key
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .copied()
            .unwrap_or(0)
    }

    fn effect(&self, key: Option<&str>) -> u64 {
        match key {
            None => self.counts.effects.fetch_add(1, Ordering::SeqCst) + 1,
            Some(k) => {
                let mut m = self
                    .counts
                    .by_key
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                let n = m.entry(k.to_string()).or_insert(0);
                if *n == 0 {
                    *n = 1;
                    self.counts.effects.fetch_add(1, Ordering::SeqCst);
                }
                *n
            }
        }
    }
}

#[tonic::async_trait]
impl Echo for EchoService {
    async fn echo(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        self.counts.hits.fetch_add(1, Ordering::SeqCst);
        // Taken out of the extensions rather than cloned.
        let (_, mut extensions, req) = request.into_parts();
        let ctx = extensions
            .remove::<CallContext>()
            .or_else(CallContext::current)
            .unwrap_or_default();
        require_non_empty("message", &req.message)?;
        let remaining_ms = ctx
            .remaining()
            .map(|r| u64::try_from(r.as_millis()).unwrap_or(u64::MAX).max(1))
            .unwrap_or(0);
        if req.delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(req.delay_ms.into())).await;
        }
        let count = self.effect(ctx.idempotency_key.as_deref());
        if req.fail {
            return Err(Status::unavailable("asked to fail"));
        }
        Ok(Response::new(EchoReply {
            message: req.message,
            remaining_ms,
            trace_id: ctx
                .traceparent
                .map(|t| t.trace_id_hex())
                .unwrap_or_default(),
            correlation_id: ctx.correlation_id.unwrap_or_default(),
            idempotency_key: ctx.idempotency_key.unwrap_or_default(),
            count,
        }))
    }
}
