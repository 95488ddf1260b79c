//! # shop
//!
//! The switchyard reference system: the classic order flow (Order, Inventory, Payment,
//! Shipping, Notification, Analytics) implemented in every communication pattern, with a
//! lab that measures them and a dashboard that shows each order's flow.
//!
//! For now this is only the command-line skeleton (`shop --help`, `shop --version`,
//! `shop version`); the services, the patterns, the lab and the dashboard land in later
//! issues.

use clap::{Parser, Subcommand};

/// The switchyard reference order system (for now only `version`; the services and
/// patterns land in later issues).
#[derive(Debug, Parser)]
#[command(name = "shop", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the versions of shop and of the switchyard crate it is built with.
    Version,
}

/// The version of the `switchyard` crate. It is a member of this workspace and inherits
/// the workspace version (`version.workspace = true`), as `shop` does.
const SWITCHYARD_VERSION: &str = switchyard::VERSION;

fn main() {
    match Cli::parse().command {
        Command::Version => {
            println!("{} {}", env!("CARGO_PKG_NAME"), env!("CARGO_PKG_VERSION"));
            println!("switchyard {SWITCHYARD_VERSION}");
        }
    }
}
