//! Notification: "sends" order e-mails by writing real files, one per message, in a
//! maildir under the data directory — `<data>/mail/new/<order_id>.<kind>.eml`, written
//! to `mail/tmp/` first and renamed, so a reader never sees half a message.
//!
//! A message is sent once per (order, kind): the send is recorded in the service's
//! store ([`SENT`]), and a second send of the same (order, kind) writes nothing and
//! answers the first one's record.
//!
//! - Sync: `POST /notifications` `{"order_id","kind","to","detail"?}` → [`SendOutcome`];
//!   `GET /notifications/{order_id}` → the order's [`SentMail`]s.
//! - Async: [`subscribe`] sends on order events — [`OrderCompleted`] → `confirmation`,
//!   [`OrderFailed`] → `failure`, [`ShipmentCreated`] → `shipped` — addressed to
//!   `<customer>@shop.example` (the customer learned from [`OrderCreated`]) or, when the
//!   order was not seen, `order-<order_id>@shop.example`.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Path as UrlPath, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::StatusCode;
use serde::{Deserialize, Serialize};
use switchyard::router::{Context, HandlerError, Router};
use switchyard::store::{Store, Table, Txn};
use switchyard_rpc::http::{Json, ServerOptions};
use switchyard_rpc::problem::types;
use switchyard_rpc::{CallOptions, HttpClient, Problem, ServiceClient};
use tokio::net::TcpListener;

use super::{
    ErrorClass, KeyLocks, Running, ServeError, atomically, class_of_call, now_ms, problems,
    spawn_http, write_atomically,
};
use crate::model::{
    Invalid, LabelGenerated, ORDERS, OrderCompleted, OrderCreated, OrderFailed, SHIPPING,
    ShipmentCancelled, ShipmentCreated, validate_id,
};

/// The service's name (in the registry and in spans).
pub const SERVICE: &str = "notification";

/// The consumer group of [`subscribe`]'s handlers.
pub const GROUP: &str = "notification";

/// The largest request body the REST API accepts (16 KiB).
pub const BODY_LIMIT: usize = 16 * 1024;

/// The mail domain of addresses made from customer and order ids.
pub const MAIL_DOMAIN: &str = "shop.example";

/// Messages sent (key: `<order_id>|<kind>`).
pub const SENT: Table<SentMail> = Table::new("notification.sent");

/// Customers by order, learned from [`OrderCreated`] (key: order id).
pub const CUSTOMERS: Table<String> = Table::new("notification.customers");

/// Which e-mail of an order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MailKind {
    /// The order went through.
    Confirmation,
    /// The order failed.
    Failure,
    /// The order shipped.
    Shipped,
}

impl MailKind {
    /// The kind's name (`confirmation`, `failure`, `shipped`), as in file names.
    pub fn as_str(self) -> &'static str {
        match self {
            MailKind::Confirmation => "confirmation",
            MailKind::Failure => "failure",
            MailKind::Shipped => "shipped",
        }
    }

    fn subject(self, order_id: &str) -> String {
        match self {
            MailKind::Confirmation => format!("Your order {order_id} is confirmed"),
            MailKind::Failure => format!("Your order {order_id} could not be completed"),
            MailKind::Shipped => format!("Your order {order_id} has shipped"),
        }
    }
}

/// A sent message, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SentMail {
    /// The order.
    pub order_id: String,
    /// Which message.
    pub kind: MailKind,
    /// The recipient.
    pub to: String,
    /// The file, relative to the data directory (`mail/new/<order_id>.<kind>.eml`).
    pub path: String,
    /// When it was written (Unix ms).
    pub at_ms: u64,
}

/// What a send did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendOutcome {
    /// The message (the first send's, for a repeat).
    pub mail: SentMail,
    /// True if this call wrote the file (false for every repeat).
    pub sent_now: bool,
}

/// Everything that can go wrong with a notification (server and client).
#[derive(Debug, thiserror::Error)]
pub enum NotificationError {
    /// The request is malformed; fix the named field.
    #[error("{0}")]
    Invalid(#[from] Invalid),
    /// The notification store failed; retry later.
    #[error("the notification store failed: {0}; retry later")]
    Store(#[from] switchyard::Error),
    /// Writing the message file failed; check the data directory.
    #[error("writing {path} failed: {source}; check the data directory")]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The call to the notification service failed (client side): see its `kind()`.
    #[error("calling notification failed: {0}")]
    Call(#[source] switchyard_rpc::Error),
}

impl NotificationError {
    /// What to do about it (see [`ErrorClass`]).
    pub fn class(&self) -> ErrorClass {
        match self {
            NotificationError::Invalid(_) => ErrorClass::Invalid,
            NotificationError::Store(_) | NotificationError::Write { .. } => {
                ErrorClass::Unavailable
            }
            NotificationError::Call(e) => class_of_call(e),
        }
    }

    /// Whether trying again later may succeed.
    pub fn is_retryable(&self) -> bool {
        self.class().is_retryable()
    }

    fn from_call(e: switchyard_rpc::Error) -> Self {
        match e.problem() {
            Some(p) if p.type_uri == types::VALIDATION => NotificationError::Invalid(Invalid::new(
                p.extension_str("field").unwrap_or_default(),
                p.detail.clone().unwrap_or_default(),
            )),
            _ => NotificationError::Call(e),
        }
    }

    fn to_handler_error(&self) -> HandlerError {
        match self {
            NotificationError::Invalid(i) => HandlerError::Terminal(i.to_string()),
            other => HandlerError::Retryable(other.to_string()),
        }
    }
}

impl IntoResponse for NotificationError {
    fn into_response(self) -> Response {
        match &self {
            NotificationError::Invalid(i) => Problem::validation(&i.field, &i.reason),
            _ => {
                tracing::error!(error = %self, "notification failed");
                Problem::new(
                    problems::STORE_UNAVAILABLE,
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Unavailable",
                )
                .with_detail("the notification could not be recorded; retry later")
            }
        }
        .into_response()
    }
}

/// Checks an e-mail address: at most 254 characters, one `@` between a non-empty local
/// part and domain, and only characters that are safe in a mail header (no spaces, no
/// line breaks, no `<>,;:"`).
pub fn validate_address(field: &str, to: &str) -> Result<(), Invalid> {
    if to.is_empty() || to.len() > 254 {
        return Err(Invalid::new(field, "must be 1 to 254 characters"));
    }
    let safe = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+/=?^_`{|}~.-@".contains(c);
    if let Some(c) = to.chars().find(|c| !safe(*c)) {
        return Err(Invalid::new(
            field,
            format!("character {c:?} is not allowed in an address"),
        ));
    }
    match to.split_once('@') {
        Some((local, domain))
            if !local.is_empty() && !domain.is_empty() && !domain.contains('@') =>
        {
            Ok(())
        }
        _ => Err(Invalid::new(field, "must look like name@domain")),
    }
}

fn sent_key(order_id: &str, kind: MailKind) -> String {
    format!("{order_id}|{}", kind.as_str())
}

/// The file name of a message.
pub fn file_name(order_id: &str, kind: MailKind) -> String {
    format!("{order_id}.{}.eml", kind.as_str())
}

fn message(order_id: &str, kind: MailKind, to: &str, detail: &str) -> String {
    let mut body = match kind {
        MailKind::Confirmation => format!("Thank you! Order {order_id} is paid and on its way.\n"),
        MailKind::Failure => format!(
            "We are sorry: order {order_id} could not be completed.\nNothing was charged (or the charge was refunded).\n"
        ),
        MailKind::Shipped => format!("Order {order_id} has left our warehouse.\n"),
    };
    if !detail.is_empty() {
        body.push_str(&format!("\n{detail}\n"));
    }
    format!(
        "From: shop <orders@{MAIL_DOMAIN}>\r\nTo: {to}\r\nSubject: {}\r\nMessage-ID: <{order_id}.{}@{MAIL_DOMAIN}>\r\nX-Shop-Order: {order_id}\r\nX-Shop-Kind: {}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{}",
        kind.subject(order_id),
        kind.as_str(),
        kind.as_str(),
        body.replace('\n', "\r\n"),
    )
}

/// Writes `contents` as `<mail>/new/<name>` the maildir way (via `<mail>/tmp/<name>`).
async fn deliver(mail_dir: &Path, name: &str, contents: String) -> Result<(), NotificationError> {
    let dst = mail_dir.join("new").join(name);
    let cur = mail_dir.join("cur");
    if !cur.exists() {
        tokio::fs::create_dir_all(&cur)
            .await
            .map_err(|source| NotificationError::Write { path: cur, source })?;
    }
    write_atomically(
        mail_dir.join("tmp").join(name),
        dst.clone(),
        contents.into_bytes(),
    )
    .await
    .map_err(|source| NotificationError::Write { path: dst, source })
}

/// Sends the (order, kind) message once, in `txn`: if it was recorded before, answers
/// that record and writes nothing; else writes the file under `data_dir` and records
/// it (the record commits with `txn`; a failed commit leaves a file a retry rewrites
/// with the same name).
pub async fn send_in(
    txn: &Txn,
    data_dir: &Path,
    order_id: &str,
    kind: MailKind,
    to: &str,
    detail: &str,
) -> Result<SendOutcome, NotificationError> {
    validate_id("order_id", order_id)?;
    validate_address("to", to)?;
    if detail.len() > 2_000 {
        return Err(Invalid::new("detail", "must be at most 2000 characters").into());
    }
    let key = sent_key(order_id, kind);
    if let Some(mail) = txn.get(&SENT, &key).await? {
        return Ok(SendOutcome {
            mail,
            sent_now: false,
        });
    }
    let name = file_name(order_id, kind);
    deliver(
        &data_dir.join("mail"),
        &name,
        message(order_id, kind, to, detail),
    )
    .await?;
    let mail = SentMail {
        order_id: order_id.to_string(),
        kind,
        to: to.to_string(),
        path: format!("mail/new/{name}"),
        at_ms: now_ms(),
    };
    txn.put(&SENT, &key, &mail)?;
    Ok(SendOutcome {
        mail,
        sent_now: true,
    })
}

/// The notification core over its store and data directory. Cheap to clone.
#[derive(Clone)]
pub struct Notifier {
    store: Arc<dyn Store>,
    data_dir: Arc<PathBuf>,
    locks: KeyLocks,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier")
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
}

impl Notifier {
    /// The notifier over `store`, writing under `data_dir`.
    pub fn new(store: Arc<dyn Store>, data_dir: impl Into<PathBuf>) -> Self {
        Notifier {
            store,
            data_dir: Arc::new(data_dir.into()),
            locks: KeyLocks::new(64),
        }
    }

    /// Sends the (order, kind) message once (see [`send_in`]); concurrent sends of one
    /// (order, kind) in this process take turns, so the file is written once.
    pub async fn send(
        &self,
        order_id: &str,
        kind: MailKind,
        to: &str,
        detail: &str,
    ) -> Result<SendOutcome, NotificationError> {
        let key = sent_key(order_id, kind);
        let _guard = self.locks.lock([key.as_str()]).await;
        let dir = self.data_dir.as_path();
        atomically(&self.store, |txn| async move {
            send_in(&txn, dir, order_id, kind, to, detail).await
        })
        .await
    }

    /// The messages sent for `order_id`.
    pub async fn sent(&self, order_id: &str) -> Result<Vec<SentMail>, NotificationError> {
        validate_id("order_id", order_id)?;
        Ok(Txn::new(self.store.clone())
            .scan(&SENT, &format!("{order_id}|"), 16)
            .await?
            .into_iter()
            .map(|(_, m)| m)
            .collect())
    }

    /// Every message sent, by (order, kind).
    pub async fn all_sent(&self) -> Result<Vec<SentMail>, NotificationError> {
        Ok(Txn::new(self.store.clone())
            .scan(&SENT, "", usize::MAX)
            .await?
            .into_iter()
            .map(|(_, m)| m)
            .collect())
    }
}

// ---------------------------------------------------------------- events

async fn address_for(txn: &Txn, order_id: &str) -> Result<String, NotificationError> {
    let customer = txn.get(&CUSTOMERS, order_id).await?;
    Ok(match customer {
        Some(c) if validate_address("to", &format!("{c}@{MAIL_DOMAIN}")).is_ok() => {
            format!("{c}@{MAIL_DOMAIN}")
        }
        _ => format!("order-{order_id}@{MAIL_DOMAIN}"),
    })
}

async fn on_event(
    ctx: Context,
    data_dir: Arc<PathBuf>,
    order_id: String,
    kind: MailKind,
    detail: String,
) -> Result<(), HandlerError> {
    let run = async {
        validate_id("order_id", &order_id)?;
        let to = address_for(&ctx.txn, &order_id).await?;
        send_in(&ctx.txn, &data_dir, &order_id, kind, &to, &detail).await
    };
    run.await.map(|_| ()).map_err(|e| e.to_handler_error())
}

/// Registers the e-mail handlers on `router` (which must run on the notification
/// store), group [`GROUP`]: on [`ORDERS`], [`OrderCreated`] (remembers the customer),
/// [`OrderCompleted`] (`confirmation`), [`OrderFailed`] (`failure`); on [`SHIPPING`],
/// [`ShipmentCreated`] (`shipped`) and [`LabelGenerated`] (ignored). Files go under
/// `data_dir`.
pub fn subscribe(router: &mut Router, data_dir: impl Into<PathBuf>) {
    let dir = Arc::new(data_dir.into());
    router.on(ORDERS, GROUP, |ctx: Context, ev: OrderCreated| async move {
        validate_id("customer", &ev.customer)
            .and_then(|()| validate_id("order_id", &ev.order_id))
            .map_err(|e| HandlerError::Terminal(e.to_string()))?;
        ctx.txn.put(&CUSTOMERS, &ev.order_id, &ev.customer)?;
        Ok(())
    });
    let d = dir.clone();
    router.on(ORDERS, GROUP, move |ctx: Context, ev: OrderCompleted| {
        on_event(
            ctx,
            d.clone(),
            ev.order_id,
            MailKind::Confirmation,
            String::new(),
        )
    });
    let d = dir.clone();
    router.on(ORDERS, GROUP, move |ctx: Context, ev: OrderFailed| {
        let detail = format!(
            "Reason: {}",
            ev.reason.chars().take(500).collect::<String>()
        );
        on_event(ctx, d.clone(), ev.order_id, MailKind::Failure, detail)
    });
    let d = dir;
    router.on(SHIPPING, GROUP, move |ctx: Context, ev: ShipmentCreated| {
        let detail = format!("Tracking number: {}", ev.tracking);
        on_event(ctx, d.clone(), ev.order_id, MailKind::Shipped, detail)
    });
    router.on(
        SHIPPING,
        GROUP,
        |_ctx: Context, _ev: LabelGenerated| async { Ok::<(), HandlerError>(()) },
    );
    // The order's `OrderFailed` (or the sync flow's answer) tells the customer.
    router.on(
        SHIPPING,
        GROUP,
        |_ctx: Context, _ev: ShipmentCancelled| async { Ok::<(), HandlerError>(()) },
    );
}

// ---------------------------------------------------------------- REST

/// The body of `POST /notifications`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendRequest {
    /// The order.
    pub order_id: String,
    /// Which message.
    pub kind: MailKind,
    /// The recipient.
    pub to: String,
    /// An optional paragraph added to the message (at most 2000 characters).
    #[serde(default)]
    pub detail: String,
}

async fn http_send(
    State(n): State<Notifier>,
    Json(req): Json<SendRequest>,
) -> Result<Json<SendOutcome>, NotificationError> {
    n.send(&req.order_id, req.kind, &req.to, &req.detail)
        .await
        .map(Json)
}

async fn http_sent(
    State(n): State<Notifier>,
    UrlPath(order_id): UrlPath<String>,
) -> Result<Json<Vec<SentMail>>, NotificationError> {
    n.sent(&order_id).await.map(Json)
}

/// The REST routes over `notifier` (without the standard layers; [`start`] adds them).
pub fn routes(notifier: Notifier) -> axum::Router {
    axum::Router::new()
        .route("/notifications", post(http_send))
        .route("/notifications/{order_id}", get(http_sent))
        .with_state(notifier)
}

/// Serves the REST API over `store`, writing messages under `data_dir`, on `listener`
/// until `shutdown` completes. Registers nothing.
pub async fn start(
    store: Arc<dyn Store>,
    data_dir: impl Into<PathBuf>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Running, ServeError> {
    let mut opts = ServerOptions::new(SERVICE);
    opts.body_limit = BODY_LIMIT;
    spawn_http(
        routes(Notifier::new(store, data_dir)),
        opts,
        listener,
        shutdown,
    )
}

// ---------------------------------------------------------------- client

/// The typed client of the notification service, by service name [`SERVICE`]. Sends
/// are idempotent per (order, kind), so calls are retryable. Cheap to clone.
#[derive(Debug, Clone)]
pub struct NotificationClient {
    svc: ServiceClient,
}

impl NotificationClient {
    /// The client of service [`SERVICE`] through `http`.
    pub fn new(http: &HttpClient) -> Self {
        NotificationClient {
            svc: http.service(SERVICE),
        }
    }

    /// `POST /notifications`: sends the (order, kind) message once.
    pub async fn send(
        &self,
        order_id: &str,
        kind: MailKind,
        to: &str,
        opts: &CallOptions,
    ) -> Result<SendOutcome, NotificationError> {
        let body = SendRequest {
            order_id: order_id.to_string(),
            kind,
            to: to.to_string(),
            detail: String::new(),
        };
        self.svc
            .post_json_with("/notifications", &body, &opts.clone().idempotent())
            .await
            .map_err(NotificationError::from_call)
    }

    /// `GET /notifications/{order_id}`: the messages sent for the order.
    pub async fn sent(
        &self,
        order_id: &str,
        opts: &CallOptions,
    ) -> Result<Vec<SentMail>, NotificationError> {
        validate_id("order_id", order_id)?;
        self.svc
            .get_json_with(&format!("/notifications/{order_id}"), opts)
            .await
            .map_err(NotificationError::from_call)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert!(validate_address("to", "ann@shop.example").is_ok());
        for bad in ["", "ann", "a@b@c", "@x", "x@", "a b@c", "a@b\r\nBcc: x@y"] {
            assert!(validate_address("to", bad).is_err(), "{bad:?}");
        }
    }
}
