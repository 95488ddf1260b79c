//! The factories the suites open their backends with.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use switchyard::Capabilities;
use switchyard_conformance::{BusFactory, Settings, StoreFactory};
use switchyard_embedded::{EmbeddedBus, EmbeddedConfig};
use switchyard_nats::{NatsBus, NatsConfig};
use switchyard_postgres::{PgStore, PgStoreConfig};
use switchyard_testkit::servers::Postgres;

/// The file naming the server of test process `pid`: a crash case's child process
/// (started by the test process, given only the case directory) reads its parent's.
fn url_file(pid: u32) -> PathBuf {
    std::env::temp_dir().join(format!("switchyard-postgres-tests-{pid}.url"))
}

/// A running server and the file that names it (removed when the server stops).
pub(crate) struct Server {
    postgres: Postgres,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(url_file(std::process::id()));
    }
}

/// One server for the tests that run at the same time: each test holds it, the last one
/// to finish stops it (by pid), the next test starts a new one.
static SHARED: Mutex<Weak<Server>> = Mutex::new(Weak::new());

/// Opens a `PgStore` per case directory, in a schema named after the directory (so a
/// reopen of the directory finds its rows).
pub(crate) struct Pg {
    server: Option<Arc<Server>>,
}

impl Pg {
    /// For a test: the shared server, started if none runs; `None` (after saying so
    /// loudly) when PostgreSQL is not installed — under `CI=true` that panics instead.
    pub(crate) fn start() -> Option<Pg> {
        let mut shared = SHARED.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(server) = shared.upgrade() {
            return Some(Pg {
                server: Some(server),
            });
        }
        let postgres = Postgres::start().expect("start PostgreSQL")?;
        std::fs::write(url_file(std::process::id()), postgres.url()).unwrap();
        let server = Arc::new(Server { postgres });
        *shared = Arc::downgrade(&server);
        Some(Pg {
            server: Some(server),
        })
    }

    /// The shared server's URL (`None` in a crash case's child).
    pub(crate) fn url(&self) -> Option<String> {
        self.server.as_ref().map(|s| s.postgres.url())
    }

    /// For a crash case's child process: the server named in the case directory.
    pub(crate) fn child() -> Pg {
        Pg { server: None }
    }
}

impl StoreFactory for Pg {
    type Store = PgStore;

    fn open(&self, dir: &Path) -> switchyard::Result<Arc<PgStore>> {
        let url = match &self.server {
            Some(server) => server.postgres.url(),
            None => std::fs::read_to_string(url_file(std::os::unix::process::parent_id()))
                .expect("the test process names its PostgreSQL server"),
        };
        let mut h = DefaultHasher::new();
        dir.hash(&mut h);
        let config = PgStoreConfig::new(url, format!("case_{:016x}", h.finish()));
        let schema = config.schema.clone();
        let parent = self.server.is_some();
        let open = async {
            let store = PgStore::connect(config).await?;
            if parent {
                settle(&store, &schema).await;
            }
            Ok::<PgStore, switchyard_postgres::PgError>(store)
        };
        let store =
            tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(open))?;
        Ok(Arc::new(store))
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::all()
    }

    async fn close(&self, store: &PgStore) -> switchyard::Result<()> {
        store.close().await;
        Ok(())
    }
}

/// Waits (up to 10 s) until no other session of the schema is in a transaction. A crash
/// case opens the store right after killing the committing child: the server may still
/// be finishing a commit the child had sent (it lands whole, after the kill), and the
/// case's checks read the store in several queries, which must see one state.
async fn settle(store: &PgStore, schema: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        let busy: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 \
             AND pid <> pg_backend_pid() AND state IN ('active', 'idle in transaction')",
        )
        .bind(switchyard_postgres::application_name(schema))
        .fetch_one(store.pool())
        .await
        .unwrap();
        if busy == 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The embedded bus, for the suites that need a bus next to the store.
pub(crate) struct Embedded;

impl BusFactory for Embedded {
    type Bus = EmbeddedBus;
    fn open(&self, dir: &Path, settings: &Settings) -> switchyard::Result<EmbeddedBus> {
        EmbeddedBus::open_with(
            dir,
            EmbeddedConfig {
                dedup_window: settings.dedup_window,
                max_message_bytes: settings.max_message_bytes,
                ..Default::default()
            },
        )
    }
}

/// The NATS bus, one namespace per case directory on a server the test started. The
/// test process writes the URL into the directory when it opens the bus there, so a
/// crash case's child (which gets only the directory) reaches the same server.
pub(crate) struct Nats {
    url: Option<String>,
}

impl Nats {
    /// The factory of a test process, which started the server at `url`.
    pub(crate) fn new(url: String) -> Self {
        Nats { url: Some(url) }
    }

    /// The factory of a child process: reads the URL from the directory.
    pub(crate) fn child() -> Self {
        Nats { url: None }
    }
}

const NATS_URL_FILE: &str = "nats-url";

impl BusFactory for Nats {
    type Bus = NatsBus;

    fn open(&self, dir: &Path, settings: &Settings) -> switchyard::Result<NatsBus> {
        let mut h = DefaultHasher::new();
        dir.hash(&mut h);
        let url = match &self.url {
            Some(url) => {
                std::fs::create_dir_all(dir).unwrap();
                std::fs::write(dir.join(NATS_URL_FILE), url).unwrap();
                url.clone()
            }
            None => std::fs::read_to_string(dir.join(NATS_URL_FILE)).unwrap(),
        };
        let mut config = NatsConfig::new(url);
        config.namespace = Some(format!("c{:016x}", h.finish()));
        config.dedup_window = settings.dedup_window;
        config.max_message_bytes = settings.max_message_bytes;
        Ok(NatsBus::new(config))
    }
}

/// Generates one test per case of a suite, each with the shared server (skipped, said
/// loudly, when PostgreSQL is missing outside CI), plus a check that every case of the
/// suite has its test.
macro_rules! pg_cases {
    ($cases:expr, |$pg:ident, $name:ident| $run:expr; $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                let Some($pg) = $crate::factory::Pg::start() else {
                    return;
                };
                let $name = stringify!($case);
                $run;
            }
        )*

        /// Every case of the suite has a test here (a new case cannot be missed silently).
        #[test]
        fn every_case_is_generated() {
            let mut generated = vec![$(stringify!($case)),*];
            let mut listed: Vec<&str> = $cases.iter().map(|(n, _)| *n).collect();
            generated.sort_unstable();
            listed.sort_unstable();
            assert_eq!(generated, listed, "add the new conformance case to the list below");
        }
    };
}
pub(crate) use pg_cases;
