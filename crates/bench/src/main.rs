//! The switchyard benchmark program.
//!
//! `cargo run --release -p bench -- <suite> [--json]` runs a suite several times and
//! prints each figure's median and range, with the raw peer measured in the same run.
//! Figures are documented in `crates/bench/README.md`.

mod bus;
mod nats;
mod reply;
mod report;
mod rpc;
mod rpc_grpc;
mod saga;
mod shop;
mod store;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// The allocator the `shop` binary uses, so that the suites measure what users run.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Measures switchyard against the raw peers on this machine.
#[derive(Parser, Debug)]
#[command(name = "bench", version, about)]
struct Cli {
    #[command(subcommand)]
    suite: Suite,
}

#[derive(Subcommand, Debug)]
enum Suite {
    /// The embedded bus: durable publish, end to end, latency, backlog memory.
    Bus(Args),
    /// The stores: durable commits with outbox and inbox (embedded, and PostgreSQL when installed).
    Store(Args),
    /// Sync calls: the switchyard HTTP stack against raw axum + hyper-util.
    Rpc(Args),
    /// Request/reply over the embedded bus: round trip and throughput.
    Reply(Args),
    /// Durable 3-step sagas: latency, throughput, fsyncs per saga, memory in flight.
    Saga(Args),
    /// NATS JetStream: switchyard's NatsBus against raw async-nats, and embedded vs NATS end to end.
    Nats(Args),
    /// The shop: completed orders/s and latencies per pattern, 64 clients over REST.
    Shop(Args),
    /// Internal: hold sagas in flight in a fresh process and print its peak RSS.
    #[command(hide = true)]
    SagaInflightChild {
        /// Data directory of the store.
        dir: PathBuf,
        /// Sagas to hold in flight.
        n: u64,
    },
    /// Internal: the `shop` command line (`shop-process serve payment …`): the service
    /// processes of the `shop.processes.*` figures, this same binary.
    #[command(hide = true)]
    ShopProcess {
        /// The shop's arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// Internal: consume a backlog in a fresh process and print its peak RSS.
    #[command(hide = true)]
    BacklogChild {
        /// Data directory of the bus.
        dir: PathBuf,
        /// Messages to consume.
        n: u64,
    },
}

#[derive(clap::Args, Debug, Clone)]
struct Args {
    /// Print one JSON object per figure per line instead of a table.
    #[arg(long)]
    json: bool,
    /// Runs per figure (the median is reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Seconds per throughput run.
    #[arg(long, default_value_t = 2.0)]
    secs: f64,
    /// Messages in the backlog figure.
    #[arg(long, default_value_t = 1_000_000)]
    backlog: u64,
    /// Fewer, shorter runs (3 runs of 1 s, one backlog run) for a quick look.
    #[arg(long)]
    quick: bool,
    /// Only figures whose name contains this text (the fdatasync floor always runs).
    #[arg(long)]
    only: Option<String>,
    /// Where the `shop` suite keeps its runs' data, left in place afterwards (default: a
    /// temporary directory, deleted at the end).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

/// Settings every suite reads.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Runs per figure.
    pub runs: usize,
    /// Seconds per throughput run.
    pub secs: f64,
    /// Backlog size.
    pub backlog: u64,
    /// Runs of the backlog figure.
    pub backlog_runs: usize,
    /// Only figures whose name contains this.
    pub only: Option<String>,
    /// Where the `shop` suite keeps its data (kept afterwards), if not in a temporary
    /// directory.
    pub data_dir: Option<PathBuf>,
}

impl Settings {
    /// Whether the figure (or group of figures) `name` is to be measured.
    pub fn selected(&self, name: &str) -> bool {
        self.only
            .as_deref()
            .is_none_or(|o| name.contains(o) || o.contains(name))
    }
}

fn settings(args: &Args) -> Settings {
    Settings {
        runs: if args.quick { 3 } else { args.runs.max(1) },
        secs: if args.quick { 1.0 } else { args.secs },
        backlog: args.backlog,
        backlog_runs: if args.quick { 1 } else { 3 },
        only: args.only.clone(),
        data_dir: args.data_dir.clone(),
    }
}

fn print(args: &Args, figures: &[report::Figure]) {
    if args.json {
        report::print_json(figures);
    } else {
        report::print_table(figures);
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Suite::ShopProcess { args } = cli.suite {
        // A service process of the multi-process shop: the shop's own main (its runtime,
        // its logs).
        return ::shop::cli::main_from(
            std::iter::once(std::ffi::OsString::from("shop")).chain(args),
            Some(&::shop::launch::AppLauncher),
        );
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bench: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.suite {
            Suite::Bus(args) => {
                let settings = settings(&args);
                eprintln!(
                    "bench bus: {} runs per figure, {} s each, {}-byte payloads; medians with ranges",
                    settings.runs,
                    settings.secs,
                    bus::PAYLOAD_BYTES
                );
                let figures = bus::run(&settings).await?;
                print(&args, &figures);
                Ok(())
            }
            Suite::Store(args) => {
                let settings = settings(&args);
                eprintln!(
                    "bench store: {} runs per figure, {} s each; medians with ranges",
                    settings.runs, settings.secs
                );
                let figures = store::run(&settings).await?;
                print(&args, &figures);
                Ok(())
            }
            Suite::Rpc(args) => {
                let settings = settings(&args);
                eprintln!(
                    "bench rpc: {} runs per figure, {} s each, {} in flight for c64; medians with ranges",
                    settings.runs,
                    settings.secs,
                    rpc::IN_FLIGHT
                );
                let figures = rpc::run(&settings).await?;
                print(&args, &figures);
                Ok(())
            }
            Suite::Reply(args) => {
                let settings = settings(&args);
                eprintln!(
                    "bench reply: {} runs per figure, {} s each, {} in flight for c64; medians with ranges",
                    settings.runs,
                    settings.secs,
                    reply::IN_FLIGHT
                );
                let figures = reply::run(&settings).await?;
                print(&args, &figures);
                Ok(())
            }
            Suite::Saga(args) => {
                let settings = settings(&args);
                eprintln!(
                    "bench saga: {} runs per figure, {} s each, 3 local steps, fsync; medians with ranges",
                    settings.runs, settings.secs
                );
                let figures = saga::run(&settings).await?;
                print(&args, &figures);
                Ok(())
            }
            Suite::Nats(args) => {
                let settings = settings(&args);
                eprintln!(
                    "bench nats: {} runs per figure, {} s each, {}-byte payloads, {} in flight for async; medians with ranges",
                    settings.runs,
                    settings.secs,
                    nats::PAYLOAD_BYTES,
                    nats::IN_FLIGHT
                );
                let figures = nats::run(&settings).await?;
                print(&args, &figures);
                Ok(())
            }
            Suite::Shop(args) => {
                let settings = settings(&args);
                eprintln!(
                    "bench shop: {} runs per pattern, {} s each, {} clients; medians with ranges",
                    settings.runs,
                    settings.secs,
                    shop::CLIENTS
                );
                let figures = shop::run(&settings).await?;
                print(&args, &figures);
                Ok(())
            }
            Suite::SagaInflightChild { dir, n } => saga::inflight_child(&dir, n).await,
            Suite::BacklogChild { dir, n } => bus::backlog_child(&dir, n).await,
            Suite::ShopProcess { .. } => Err("shop-process is handled before the runtime".into()),
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
