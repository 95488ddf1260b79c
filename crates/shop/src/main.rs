//! The `shop` binary: see [`shop::cli`] for the commands and their configuration.
//!
//! `shop up` and `shop serve` run the shop through a [`shop::cli::up::Launcher`]; this
//! build passes none yet, so they say they are not wired.

use std::process::ExitCode;

fn main() -> ExitCode {
    shop::cli::main(None)
}
