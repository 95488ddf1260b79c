//! Service discovery: which instances serve a name.
//!
//! - [`StaticRegistry`]: a fixed map from config (`payment=http://127.0.0.1:7003,http://127.0.0.1:7013;inventory=...`)
//!   or the `SWITCHYARD_SERVICES` environment variable.
//! - [`InProcessRegistry`]: services register when they start and the returned
//!   [`Registration`] deregisters them when dropped (or on [`Registration::stop`]).
//!
//! The distributed registry comes with the NATS backend.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

/// The environment variable [`StaticRegistry::from_env`] reads.
pub const SERVICES_ENV: &str = "SWITCHYARD_SERVICES";

/// One instance of a service: its base URL (`http://host:port`, no trailing slash).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Instance {
    /// The base URL, e.g. `http://127.0.0.1:7003`.
    pub url: String,
}

impl Instance {
    /// An instance at `url` (a trailing `/` is removed).
    pub fn new(url: impl Into<String>) -> Self {
        let mut url = url.into();
        while url.ends_with('/') {
            url.pop();
        }
        Instance { url }
    }
}

/// Where the instances of a service are.
pub trait Registry: Send + Sync + 'static {
    /// The instances currently serving `service` (possibly none), in a stable order.
    ///
    /// Called on every attempt: return a shared snapshot (cloning the `Arc` is enough)
    /// and a new one only when the set changes — callers compare snapshots by pointer
    /// to skip re-deriving their per-instance state.
    fn instances(&self, service: &str) -> Arc<[Instance]>;
}

/// A registry configuration error.
#[derive(Debug, thiserror::Error)]
#[error(
    "invalid service registry entry `{entry}`: {reason} (expected `name=http://host:port[,http://...];name2=...`)"
)]
pub struct RegistryConfigError {
    /// The offending entry.
    pub entry: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// A fixed map of service names to instances.
#[derive(Debug, Clone, Default)]
pub struct StaticRegistry {
    services: BTreeMap<String, Arc<[Instance]>>,
}

impl StaticRegistry {
    /// Parses `name=url[,url...][;name=...]` (whitespace around items is ignored).
    pub fn parse(config: &str) -> Result<Self, RegistryConfigError> {
        let mut services: BTreeMap<String, Vec<Instance>> = BTreeMap::new();
        for entry in config.split(';').map(str::trim).filter(|e| !e.is_empty()) {
            let err = |reason| RegistryConfigError {
                entry: entry.to_string(),
                reason,
            };
            let (name, urls) = entry.split_once('=').ok_or_else(|| err("missing `=`"))?;
            let name = name.trim();
            if name.is_empty() {
                return Err(err("empty service name"));
            }
            let list = services.entry(name.to_string()).or_default();
            for url in urls.split(',').map(str::trim).filter(|u| !u.is_empty()) {
                if !url.starts_with("http://") {
                    return Err(err("instance URLs must start with http://"));
                }
                if url.parse::<http::Uri>().is_err() {
                    return Err(err("not a valid URL"));
                }
                list.push(Instance::new(url));
            }
            if list.is_empty() {
                return Err(err("no instance URLs"));
            }
        }
        Ok(StaticRegistry {
            services: services
                .into_iter()
                .map(|(k, v)| (k, Arc::from(v)))
                .collect(),
        })
    }

    /// Parses the `SWITCHYARD_SERVICES` environment variable (empty registry if unset).
    pub fn from_env() -> Result<Self, RegistryConfigError> {
        match std::env::var(SERVICES_ENV) {
            Ok(v) => Self::parse(&v),
            Err(_) => Ok(Self::default()),
        }
    }

    /// Adds an instance of `service`.
    pub fn with(mut self, service: &str, url: &str) -> Self {
        let mut list: Vec<Instance> = self
            .services
            .get(service)
            .map(|l| l.to_vec())
            .unwrap_or_default();
        list.push(Instance::new(url));
        self.services.insert(service.to_string(), Arc::from(list));
        self
    }
}

impl Registry for StaticRegistry {
    fn instances(&self, service: &str) -> Arc<[Instance]> {
        self.services
            .get(service)
            .cloned()
            .unwrap_or_else(|| Arc::from(Vec::new()))
    }
}

/// The instances of one service by registration id, and the snapshot handed out
/// (rebuilt only after a change).
#[derive(Debug, Default)]
struct Entry {
    by_id: BTreeMap<u64, Instance>,
    snapshot: Option<Arc<[Instance]>>,
}

type Map = BTreeMap<String, Entry>;

/// A registry that services of one process register in as they start.
#[derive(Debug, Clone, Default)]
pub struct InProcessRegistry {
    inner: Arc<Mutex<(u64, Map)>>,
}

impl InProcessRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `url` as an instance of `service` until the returned guard is dropped.
    #[must_use = "the instance is deregistered when the registration is dropped"]
    pub fn register(&self, service: &str, url: &str) -> Registration {
        let mut g = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        g.0 += 1;
        let id = g.0;
        let e = g.1.entry(service.to_string()).or_default();
        e.by_id.insert(id, Instance::new(url));
        e.snapshot = None;
        Registration {
            registry: self.clone(),
            service: service.to_string(),
            id,
        }
    }

    fn deregister(&self, service: &str, id: u64) {
        let mut g = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(m) = g.1.get_mut(service) {
            m.by_id.remove(&id);
            m.snapshot = None;
            if m.by_id.is_empty() {
                g.1.remove(service);
            }
        }
    }
}

impl Registry for InProcessRegistry {
    fn instances(&self, service: &str) -> Arc<[Instance]> {
        let mut g = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        match g.1.get_mut(service) {
            Some(e) => e
                .snapshot
                .get_or_insert_with(|| e.by_id.values().cloned().collect())
                .clone(),
            None => Arc::from(Vec::new()),
        }
    }
}

/// An instance's registration; deregisters on drop.
#[derive(Debug)]
pub struct Registration {
    registry: InProcessRegistry,
    service: String,
    id: u64,
}

impl Registration {
    /// Deregisters now (same as dropping).
    pub fn stop(self) {}
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.deregister(&self.service, self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_static_config() {
        let r = StaticRegistry::parse(
            "payment=http://127.0.0.1:7003, http://127.0.0.1:7013/ ; inventory=http://127.0.0.1:7004",
        )
        .unwrap();
        assert_eq!(
            *r.instances("payment"),
            [
                Instance::new("http://127.0.0.1:7003"),
                Instance::new("http://127.0.0.1:7013")
            ]
        );
        assert_eq!(r.instances("inventory").len(), 1);
        assert!(r.instances("nope").is_empty());
        assert!(StaticRegistry::parse("payment").is_err());
        assert!(StaticRegistry::parse("payment=").is_err());
        assert!(StaticRegistry::parse("payment=ftp://x").is_err());
    }

    #[test]
    fn in_process_registers_and_deregisters() {
        let r = InProcessRegistry::new();
        let a = r.register("payment", "http://127.0.0.1:1");
        let b = r.register("payment", "http://127.0.0.1:2");
        assert_eq!(r.instances("payment").len(), 2);
        drop(a);
        assert_eq!(
            *r.instances("payment"),
            [Instance::new("http://127.0.0.1:2")]
        );
        b.stop();
        assert!(r.instances("payment").is_empty());
    }
}
