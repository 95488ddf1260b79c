//! The `shop` command line: place and follow orders against a running shop, inject
//! faults, look at sagas and dead letters, check invariants, and run the shop.
//!
//! Configuration, strongest first: flags, environment variables (`SHOP_URL`,
//! `SHOP_TIMEOUT`, `SHOP_PATTERN`, …, shown in each `--help`), the TOML file of
//! `--config` / `SHOP_CONFIG` (see [`config`]), built-in defaults. Logs go to stderr
//! through `tracing`, filtered by `RUST_LOG` (default `warn`; `info` for `up`/`serve`).
//!
//! | module | what |
//! | --- | --- |
//! | [`client`] | [`client::ShopClient`]: typed calls to the Order API and `/admin/fault` |
//! | [`commands`] | one function per client command |
//! | [`config`] | the TOML file |
//! | [`table`] | plain-text tables |
//! | [`up`] | `shop up` / `shop serve` over a [`up::Launcher`] the app implements |
//!
//! Exit codes: 0 success; 1 the command failed (the shop unreachable, a refused
//! request, a bad configuration); 2 usage errors (clap); 3 the order failed; 4 the order
//! was still in flight when the wait ended; 5 a check failed.

pub mod client;
pub mod commands;
pub mod config;
pub mod lab;
pub mod table;
pub mod up;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::order::{OrderStatus, Pattern};
use config::FileConfig;

/// The default Order API URL.
pub const DEFAULT_URL: &str = "http://127.0.0.1:7000";

/// The default per-request timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The default wait of `shop order` for the order's outcome.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(30);

/// The switchyard reference order system: six services, five communication patterns.
///
/// Start the shop with `shop up`, then place orders with `shop order --pattern hybrid`,
/// follow them with `shop status <id>`, break services with `shop fault`.
#[derive(Debug, Parser)]
#[command(name = "shop", version, propagate_version = true)]
pub struct Cli {
    /// Options of every command.
    #[command(flatten)]
    pub global: Global,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Options of every command.
#[derive(Debug, Clone, Args)]
pub struct Global {
    /// The Order API of a running shop [default: http://127.0.0.1:7000].
    #[arg(long, global = true, env = "SHOP_URL", value_name = "URL")]
    pub url: Option<String>,
    /// A TOML configuration file (flags and environment variables win over it).
    #[arg(long, global = true, env = "SHOP_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// How long one request may take, e.g. 500ms, 10s [default: 10s].
    #[arg(long, global = true, env = "SHOP_TIMEOUT", value_name = "DURATION", value_parser = parse_duration)]
    pub timeout: Option<Duration>,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the versions of shop and of the switchyard crate it is built with.
    Version,
    /// Place an order against a running shop and wait for its outcome.
    Order(OrderArgs),
    /// Show an order's status and timeline.
    Status(StatusArgs),
    /// List orders.
    Orders(OrdersArgs),
    /// Inject faults into a service (latency, error rate, downtime), or clear them.
    Fault(FaultArgs),
    /// Run the whole shop (every service, every pattern): in this process, or with
    /// --bus nats://… every service as its own process.
    Up(UpArgs),
    /// Run one service of the shop (e.g. on its own machine, with --bus and --store).
    Serve(ServeArgs),
    /// List the orchestration pattern's sagas.
    Sagas(SagasArgs),
    /// List or replay dead letters.
    Dlq(DlqArgs),
    /// Check the shop's invariants (orders placed = orders terminal, no duplicate
    /// charge, inventory conserved, no lost event).
    Check(CheckArgs),
    /// Measure every pattern under load and faults: latency, throughput, coupling,
    /// consistency (fresh shops of its own; needs no running shop).
    Lab(lab::LabArgs),
}

/// `shop order`.
#[derive(Debug, Clone, Args)]
pub struct OrderArgs {
    /// The pattern: sync, choreography, request-reply, orchestration, hybrid.
    #[arg(long, short, env = "SHOP_PATTERN", value_parser = parse_pattern)]
    pub pattern: Option<Pattern>,
    /// A SKU to order (repeat for more lines; sku-001 … sku-020, sku-rare) [default: sku-001].
    #[arg(long = "sku", value_name = "SKU")]
    pub skus: Vec<String>,
    /// The quantity of each --sku, in the same order (repeat; missing ones are 1).
    #[arg(long = "qty", value_name = "N")]
    pub qtys: Vec<u32>,
    /// The customer (`vip-*` high limit, `broke-*` none) [default: ada].
    #[arg(long, env = "SHOP_CUSTOMER")]
    pub customer: Option<String>,
    /// The payment token (`tok_decline` always declines) [default: tok_ok].
    #[arg(long, env = "SHOP_TOKEN")]
    pub token: Option<String>,
    /// The order id (placing an id twice is refused) [default: a fresh one].
    #[arg(long)]
    pub order_id: Option<String>,
    /// How long to wait for the outcome; 0 to return once accepted [default: 30s].
    #[arg(long, env = "SHOP_WAIT", value_parser = parse_duration)]
    pub wait: Option<Duration>,
    /// Print the order as JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// `shop status`.
#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// The order id.
    pub order_id: String,
    /// Wait up to this long for the order to end first (e.g. 5s) [default: 0].
    #[arg(long, value_parser = parse_duration)]
    pub wait: Option<Duration>,
    /// Print the order as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `shop orders`.
#[derive(Debug, Clone, Args)]
pub struct OrdersArgs {
    /// Only orders in this status: accepted, completed, failed.
    #[arg(long, value_parser = parse_status)]
    pub status: Option<OrderStatus>,
    /// At most this many.
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
    /// Print the counts per status too.
    #[arg(long)]
    pub counts: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `shop fault`.
#[derive(Debug, Clone, Args)]
pub struct FaultArgs {
    /// The service: order, order-grpc, inventory, payment, shipping, notification,
    /// analytics (as `GET /services` of the shop lists them).
    pub service: String,
    /// Add this latency to every call (e.g. 200ms).
    #[arg(long, value_parser = parse_duration)]
    pub latency: Option<Duration>,
    /// Fail this fraction of calls (0.0 to 1.0).
    #[arg(long)]
    pub error_rate: Option<f64>,
    /// Fail every call for this long from now (e.g. 10s).
    #[arg(long, value_parser = parse_duration)]
    pub down: Option<Duration>,
    /// Clear every fault of the service.
    #[arg(long, conflicts_with_all = ["latency", "error_rate", "down"])]
    pub clear: bool,
    /// The service's base URL, instead of asking the shop at --url.
    #[arg(long, value_name = "URL")]
    pub service_url: Option<String>,
}

/// `shop up`.
#[derive(Debug, Clone, Args)]
pub struct UpArgs {
    /// Where the embedded bus and stores live [default: ./shop-data].
    #[arg(long, env = "SHOP_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// The address to listen on [default: 127.0.0.1].
    #[arg(long, env = "SHOP_HOST")]
    pub host: Option<String>,
    /// The first port: Order REST; then Order gRPC, inventory, payment, shipping,
    /// notification, analytics; 0 for free ports [default: 7000].
    #[arg(long, env = "SHOP_PORT")]
    pub port: Option<u16>,
    /// The patterns to run, comma-separated [default: all].
    #[arg(long, env = "SHOP_PATTERNS", value_delimiter = ',', value_parser = parse_pattern)]
    pub patterns: Vec<Pattern>,
    /// The bus: embedded, or a broker URL (nats://…) [default: embedded].
    #[arg(long, env = "SHOP_BUS")]
    pub bus: Option<String>,
    /// The stores: embedded, or a database URL (postgres://…) [default: embedded].
    #[arg(long, env = "SHOP_STORE")]
    pub store: Option<String>,
    /// Do not place demo orders (by default a few per second, through every pattern,
    /// some declined or out of stock on purpose).
    #[arg(long, env = "SHOP_NO_DEMO")]
    pub no_demo: bool,
    /// Processes per backing service in the distributed mode, e.g. payment=3,inventory=2
    /// (needs --bus nats://…) [default: one each].
    #[arg(long, env = "SHOP_REPLICAS", value_delimiter = ',', value_parser = parse_replicas)]
    pub replicas: Vec<(String, u32)>,
}

/// Parses `name=count` of `--replicas`.
fn parse_replicas(s: &str) -> Result<(String, u32), String> {
    let (name, n) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}`: use name=count, e.g. payment=3"))?;
    let n: u32 = n
        .trim()
        .parse()
        .map_err(|_| format!("`{s}`: the count must be a whole number"))?;
    if n == 0 {
        return Err(format!("`{s}`: at least one process"));
    }
    Ok((name.trim().to_string(), n))
}

/// `shop serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// The service to run.
    #[arg(value_enum)]
    pub service: up::ServiceName,
    /// Where its embedded store lives [default: ./shop-data].
    #[arg(long, env = "SHOP_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// The address to listen on [default: 127.0.0.1:0].
    #[arg(long, env = "SHOP_LISTEN")]
    pub listen: Option<std::net::SocketAddr>,
    /// The Order service's gRPC address [default: --listen's port + 1].
    #[arg(long, env = "SHOP_GRPC_LISTEN")]
    pub grpc_listen: Option<std::net::SocketAddr>,
    /// Where the other services are: name=http://host:port[,…];…
    #[arg(long, env = "SWITCHYARD_SERVICES")]
    pub registry: Option<String>,
    /// The patterns to run (the Order service), comma-separated [default: all that work
    /// across processes on the bus; with the embedded bus: sync, orchestration].
    #[arg(long, env = "SHOP_PATTERNS", value_delimiter = ',', value_parser = parse_pattern)]
    pub patterns: Vec<Pattern>,
    /// The bus: embedded, or a broker URL [default: embedded].
    #[arg(long, env = "SHOP_BUS")]
    pub bus: Option<String>,
    /// The store: embedded, or a database URL [default: embedded].
    #[arg(long, env = "SHOP_STORE")]
    pub store: Option<String>,
    /// The host name or IP the other services reach this one at, registered on NATS
    /// with the port it listens on [default: --listen's IP; needed when that is 0.0.0.0].
    #[arg(long, env = "SHOP_ADVERTISE", value_name = "HOST")]
    pub advertise: Option<String>,
}

/// `shop sagas`.
#[derive(Debug, Clone, Args)]
pub struct SagasArgs {
    /// Only sagas in this state: running, compensating, completed, compensated,
    /// needs_attention.
    #[arg(long)]
    pub state: Option<String>,
    /// At most this many.
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `shop dlq`.
#[derive(Debug, Clone, Args)]
pub struct DlqArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: DlqCommand,
}

/// `shop dlq list|replay`.
#[derive(Debug, Clone, Subcommand)]
pub enum DlqCommand {
    /// List dead letters.
    List {
        /// Only this topic (shop.orders, shop.payments, shop.inventory, shop.shipping).
        #[arg(long)]
        topic: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Publish dead letters of a topic again.
    Replay {
        /// The topic.
        #[arg(long)]
        topic: String,
        /// Only those dead-lettered by this consumer group.
        #[arg(long)]
        group: Option<String>,
        /// Only these message ids (repeat) [default: every dead letter of the topic].
        #[arg(long = "id", value_name = "MESSAGE_ID")]
        ids: Vec<String>,
    },
}

/// `shop check`.
#[derive(Debug, Clone, Args)]
pub struct CheckArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("`{s}` is not a duration ({e}); use e.g. 500ms, 10s"))
}

pub(crate) fn parse_pattern(s: &str) -> Result<Pattern, String> {
    s.parse::<Pattern>().map_err(|e| e.reason)
}

fn parse_status(s: &str) -> Result<OrderStatus, String> {
    s.parse::<OrderStatus>().map_err(|e| e.reason)
}

/// Why a command failed; [`CliError::exit_code`] is the process's exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Nothing answered at the URL.
    #[error(
        "cannot reach the shop at {url}: is `shop up` running there? (set --url or SHOP_URL; {cause})"
    )]
    NotRunning {
        /// The URL.
        url: String,
        /// The transport error.
        cause: String,
    },
    /// The server did not answer in time.
    #[error("{url} did not answer within {timeout:?}; raise --timeout or check the shop's logs")]
    Timeout {
        /// The URL.
        url: String,
        /// The timeout.
        timeout: Duration,
    },
    /// The server refused the request (a problem document).
    #[error("{url} answered {status} {title}{}{}", field.as_ref().map(|f| format!(" (field `{f}`)")).unwrap_or_default(), if detail.is_empty() { String::new() } else { format!(": {detail}") })]
    Api {
        /// The URL.
        url: String,
        /// The HTTP status.
        status: u16,
        /// The problem's title.
        title: String,
        /// The problem's detail.
        detail: String,
        /// The field the problem names.
        field: Option<String>,
    },
    /// The answer was not what this CLI expects (a different shop version?).
    #[error("unexpected answer from {url}: {cause}; is it a shop of the same version?")]
    Protocol {
        /// The URL.
        url: String,
        /// What was wrong.
        cause: String,
    },
    /// A flag or setting is wrong.
    #[error("{0}")]
    Usage(String),
    /// The configuration file is unreadable or invalid.
    #[error("configuration file {}: {cause}", path.display())]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        cause: String,
    },
    /// The order failed.
    #[error("order {id} failed: {reason}")]
    OrderFailed {
        /// The order.
        id: String,
        /// Why.
        reason: String,
    },
    /// The order was still in flight when the wait ended.
    #[error("order {id} is still in flight; follow it with `shop status {id} --wait 30s`")]
    InFlight {
        /// The order.
        id: String,
    },
    /// A check failed.
    #[error("{0} check(s) failed")]
    CheckFailed(usize),
    /// The service is unknown to the shop.
    #[error(
        "the shop at {url} lists no service `{service}` (it has: {known}); or pass --service-url"
    )]
    UnknownService {
        /// The shop's URL.
        url: String,
        /// The service asked for.
        service: String,
        /// The services listed.
        known: String,
    },
    /// This binary runs no shop (no launcher).
    #[error("`shop {0}` is not wired to the app in this build; run a shop built with it")]
    NotWired(&'static str),
    /// Starting or running the shop failed.
    #[error("{what} failed: {cause}")]
    Launch {
        /// What was started.
        what: String,
        /// Why it failed.
        cause: String,
    },
}

impl CliError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::OrderFailed { .. } => 3,
            CliError::InFlight { .. } => 4,
            CliError::CheckFailed(_) => 5,
            _ => 1,
        }
    }
}

/// The settings every client command uses, resolved.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The Order API URL.
    pub url: String,
    /// The per-request timeout.
    pub timeout: Duration,
    /// The configuration file's contents (empty if none).
    pub file: FileConfig,
    /// The configuration file, if any.
    pub config_path: Option<PathBuf>,
}

/// Resolves the global options: flags/env, else the file, else the defaults.
pub fn resolve(global: &Global) -> Result<Resolved, CliError> {
    let file = match &global.config {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    let url = global
        .url
        .clone()
        .or_else(|| file.url.clone())
        .unwrap_or_else(|| DEFAULT_URL.to_string());
    let timeout = match (global.timeout, &file.timeout) {
        (Some(t), _) => t,
        (None, Some(t)) => parse_duration(t).map_err(|cause| CliError::Config {
            path: global.config.clone().unwrap_or_default(),
            cause: format!("timeout: {cause}"),
        })?,
        (None, None) => DEFAULT_TIMEOUT,
    };
    Ok(Resolved {
        url,
        timeout,
        file,
        config_path: global.config.clone(),
    })
}

fn init_logs(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Runs `cli`; `launcher` runs the shop for `up` and `serve` (`None`: those commands
/// say they are not wired).
pub async fn run(cli: Cli, launcher: Option<&dyn up::Launcher>) -> Result<(), CliError> {
    let r = resolve(&cli.global)?;
    match cli.command {
        Command::Version => {
            println!("{} {}", env!("CARGO_PKG_NAME"), env!("CARGO_PKG_VERSION"));
            println!("switchyard {}", switchyard::VERSION);
            Ok(())
        }
        Command::Order(a) => commands::order(&r, a).await,
        Command::Status(a) => commands::status(&r, a).await,
        Command::Orders(a) => commands::orders(&r, a).await,
        Command::Fault(a) => commands::fault(&r, a).await,
        Command::Sagas(a) => commands::sagas(&r, a).await,
        Command::Dlq(a) => commands::dlq(&r, a).await,
        Command::Check(a) => commands::check(&r, a).await,
        Command::Lab(a) => lab::lab(a).await,
        Command::Up(a) => up::up(launcher, commands::up_config(&r, a)?).await,
        Command::Serve(a) => up::serve(launcher, commands::serve_config(&r, a)?).await,
    }
}

/// The `shop` binary: parses the command line, sets up logging, runs the command on a
/// tokio runtime, prints the error and returns its exit code. `launcher` runs the shop
/// for `shop up` / `shop serve`.
pub fn main(launcher: Option<&dyn up::Launcher>) -> ExitCode {
    main_from(std::env::args_os(), launcher)
}

/// [`main`] with the command line given (the program's name first): for programs that
/// embed the shop's commands, e.g. a benchmark that runs the services as its own
/// processes.
pub fn main_from<I, T>(args: I, launcher: Option<&dyn up::Launcher>) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = Cli::parse_from(args);
    init_logs(match cli.command {
        Command::Up(_) | Command::Serve(_) => "info,fjall=warn,lsm_tree=warn",
        // The lab injects faults on purpose: the warnings they cause are expected.
        Command::Lab(_) => "error",
        _ => "warn",
    });
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli, launcher)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
