//! The optional configuration file (`--config shop.toml` or `SHOP_CONFIG`). Every key
//! is optional; a flag or an environment variable wins over the file, the file over
//! the built-in default.
//!
//! ```toml
//! url = "http://127.0.0.1:7000"   # the Order API of a running shop (--url, SHOP_URL)
//! timeout = "10s"                  # per request (--timeout, SHOP_TIMEOUT)
//!
//! [order]                          # defaults of `shop order`
//! pattern = "hybrid"
//! customer = "ada"
//! token = "tok_ok"
//! wait = "30s"
//!
//! [up]                             # `shop up` / `shop serve`
//! data_dir = "./shop-data"
//! host = "127.0.0.1"
//! port = 7000                      # first port: order REST; then order gRPC, inventory, …
//! patterns = ["sync", "choreography", "request-reply", "orchestration", "hybrid"]
//! bus = "embedded"
//! store = "embedded"
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::CliError;

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// The Order API's base URL.
    pub url: Option<String>,
    /// The per-request timeout (humantime).
    pub timeout: Option<String>,
    /// Defaults of `shop order`.
    #[serde(default)]
    pub order: OrderDefaults,
    /// Settings of `shop up` / `shop serve`.
    #[serde(default)]
    pub up: UpDefaults,
}

/// `[order]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrderDefaults {
    /// The pattern.
    pub pattern: Option<String>,
    /// The customer.
    pub customer: Option<String>,
    /// The payment token.
    pub token: Option<String>,
    /// How long to wait for the outcome (humantime).
    pub wait: Option<String>,
}

/// `[up]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpDefaults {
    /// The data directory.
    pub data_dir: Option<PathBuf>,
    /// The address to listen on.
    pub host: Option<String>,
    /// The first port.
    pub port: Option<u16>,
    /// The patterns to run.
    pub patterns: Option<Vec<String>>,
    /// The bus (`embedded` or a URL).
    pub bus: Option<String>,
    /// The stores (`embedded` or a URL).
    pub store: Option<String>,
    /// Place demo orders.
    pub demo: Option<bool>,
}

impl FileConfig {
    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<Self, CliError> {
        let text = std::fs::read_to_string(path).map_err(|e| CliError::Config {
            path: path.to_path_buf(),
            cause: e.to_string(),
        })?;
        Self::parse(&text).map_err(|cause| CliError::Config {
            path: path.to_path_buf(),
            cause,
        })
    }

    /// Parses the text of a file.
    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses_unknown_keys() {
        let c = FileConfig::parse(
            "url = \"http://h:1\"\n[order]\npattern = \"sync\"\n[up]\nport = 8000\n",
        )
        .unwrap();
        assert_eq!(c.url.as_deref(), Some("http://h:1"));
        assert_eq!(c.order.pattern.as_deref(), Some("sync"));
        assert_eq!(c.up.port, Some(8000));
        assert!(FileConfig::parse("urll = 1").unwrap_err().contains("urll"));
    }
}
