//! The CLI's HTTP client of a running shop's Order API (and of any service's
//! `/admin/fault`), through `switchyard_rpc`'s client with a static registry.

use std::sync::Arc;
use std::time::Duration;

use http::Method;
use serde::de::DeserializeOwned;
use switchyard_rpc::registry::StaticRegistry;
use switchyard_rpc::{CallOptions, ClientConfig, ErrorKind, HttpClient, ServiceClient};

use super::CliError;
use crate::api::{
    CheckReport, DeadLetterList, OrderCounts, OrderList, PatternList, ReplayOutcome, ReplayRequest,
    SagaList, ServiceList,
};
use crate::faults::{FaultConfig, FaultStatus};
use crate::order::{NewOrder, Order, OrderStatus};

/// The name the target is registered under in the client's static registry.
const TARGET: &str = "shop";

/// Checks a base URL (`http://host:port`, no path) and returns it without a trailing `/`.
pub fn base_url(url: &str, flag: &str) -> Result<String, CliError> {
    let u = url.trim().trim_end_matches('/');
    let bad = |why: &str| {
        CliError::Usage(format!(
            "{flag} `{url}`: {why} (e.g. http://127.0.0.1:7000)"
        ))
    };
    if !u.starts_with("http://") {
        return Err(bad("must start with http://"));
    }
    let uri: http::Uri = u.parse().map_err(|_| bad("is not a URL"))?;
    if uri.host().is_none() {
        return Err(bad("has no host"));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() || u.contains([',', ';']) {
        return Err(bad("must be a base URL without a path"));
    }
    Ok(u.to_string())
}

/// A client of one server at a base URL: typed calls whose failures are [`CliError`]s
/// that say what to do (connection refused → "is `shop up` running at the URL?").
#[derive(Debug, Clone)]
pub struct ShopClient {
    url: String,
    svc: ServiceClient,
    timeout: Duration,
}

impl ShopClient {
    /// A client of the server at `url` (a base URL), each call bounded by `timeout`.
    pub fn new(url: &str, timeout: Duration) -> Result<Self, CliError> {
        let url = base_url(url, "--url")?;
        let registry = StaticRegistry::default().with(TARGET, &url);
        let cfg = ClientConfig {
            default_timeout: timeout,
            max_attempts: 2,
            backoff_base: Duration::from_millis(50),
            backoff_max: Duration::from_millis(200),
            ..ClientConfig::default()
        };
        let http = HttpClient::with_config(Arc::new(registry), cfg);
        Ok(ShopClient {
            svc: http.service(TARGET),
            url,
            timeout,
        })
    }

    /// The base URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn error(&self, e: switchyard_rpc::Error) -> CliError {
        if let Some(status) = e.status() {
            let p = e.problem();
            return CliError::Api {
                url: self.url.clone(),
                status: status.as_u16(),
                title: p
                    .map(|p| p.title.clone())
                    .unwrap_or_else(|| status.to_string()),
                detail: p.and_then(|p| p.detail.clone()).unwrap_or_default(),
                field: e.field().map(str::to_string),
            };
        }
        match e.kind() {
            ErrorKind::Unavailable | ErrorKind::CircuitOpen => CliError::NotRunning {
                url: self.url.clone(),
                cause: e.to_string(),
            },
            ErrorKind::DeadlineExceeded => CliError::Timeout {
                url: self.url.clone(),
                timeout: self.timeout,
            },
            _ => CliError::Protocol {
                url: self.url.clone(),
                cause: e.to_string(),
            },
        }
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        extra: Duration,
    ) -> Result<T, CliError> {
        let opts = CallOptions::new().timeout(self.timeout + extra);
        let r = self
            .svc
            .call(method, path, body.map(bytes::Bytes::from), &opts)
            .await
            .map_err(|e| self.error(e))?;
        serde_json::from_slice(&r.body).map_err(|e| CliError::Protocol {
            url: self.url.clone(),
            cause: format!("the answer to {path} does not decode: {e}"),
        })
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, CliError> {
        self.call(Method::GET, path, None, Duration::ZERO).await
    }

    async fn post<B: serde::Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        extra: Duration,
    ) -> Result<T, CliError> {
        let body = serde_json::to_vec(body).map_err(|e| CliError::Usage(e.to_string()))?;
        self.call(Method::POST, path, Some(body), extra).await
    }

    /// `POST /orders?wait=…`: places `order`, waiting up to `wait` for its outcome.
    pub async fn place(&self, order: &NewOrder, wait: Duration) -> Result<Order, CliError> {
        self.post(&format!("/orders?wait={}ms", wait.as_millis()), order, wait)
            .await
    }

    /// `GET /orders/{id}?wait=…`.
    pub async fn order(&self, id: &str, wait: Duration) -> Result<Order, CliError> {
        crate::model::validate_id("order_id", id).map_err(|e| CliError::Usage(e.to_string()))?;
        self.call(
            Method::GET,
            &format!("/orders/{id}?wait={}ms", wait.as_millis()),
            None,
            wait,
        )
        .await
    }

    /// `GET /orders?status=…&limit=…`.
    pub async fn orders(
        &self,
        status: Option<OrderStatus>,
        limit: usize,
    ) -> Result<OrderList, CliError> {
        let mut path = format!("/orders?limit={limit}");
        if let Some(s) = status {
            path.push_str(&format!("&status={s}"));
        }
        self.get(&path).await
    }

    /// `GET /orders/counts`.
    pub async fn counts(&self) -> Result<OrderCounts, CliError> {
        self.get("/orders/counts").await
    }

    /// `GET /patterns`.
    pub async fn patterns(&self) -> Result<PatternList, CliError> {
        self.get("/patterns").await
    }

    /// `GET /services`.
    pub async fn services(&self) -> Result<ServiceList, CliError> {
        self.get("/services").await
    }

    /// `GET /sagas?state=…&limit=…`.
    pub async fn sagas(&self, state: Option<&str>, limit: usize) -> Result<SagaList, CliError> {
        let mut path = format!("/sagas?limit={limit}");
        if let Some(s) = state {
            path.push_str(&format!("&state={s}"));
        }
        self.get(&path).await
    }

    /// `GET /dlq?topic=…&limit=…`.
    pub async fn dead_letters(
        &self,
        topic: Option<&str>,
        limit: usize,
    ) -> Result<DeadLetterList, CliError> {
        let mut path = format!("/dlq?limit={limit}");
        if let Some(t) = topic {
            crate::model::validate_id("--topic", t).map_err(|e| CliError::Usage(e.to_string()))?;
            path.push_str(&format!("&topic={t}"));
        }
        self.get(&path).await
    }

    /// `POST /dlq/replay`.
    pub async fn replay(&self, req: &ReplayRequest) -> Result<ReplayOutcome, CliError> {
        self.post("/dlq/replay", req, Duration::ZERO).await
    }

    /// `GET /check`.
    pub async fn check(&self) -> Result<CheckReport, CliError> {
        self.get("/check").await
    }

    /// `GET /admin/fault`.
    pub async fn fault_status(&self) -> Result<FaultStatus, CliError> {
        self.get("/admin/fault").await
    }

    /// `POST /admin/fault`.
    pub async fn set_fault(&self, cfg: &FaultConfig) -> Result<FaultStatus, CliError> {
        self.post("/admin/fault", cfg, Duration::ZERO).await
    }

    /// `DELETE /admin/fault`.
    pub async fn clear_fault(&self) -> Result<FaultStatus, CliError> {
        self.call(Method::DELETE, "/admin/fault", None, Duration::ZERO)
            .await
    }
}
