//! The `shop` binary: see [`shop::cli`] for the commands and their configuration.
//!
//! `shop up` runs the whole shop in this process through [`shop::launch::AppLauncher`].

use std::process::ExitCode;

fn main() -> ExitCode {
    shop::cli::main(Some(&shop::launch::AppLauncher))
}
