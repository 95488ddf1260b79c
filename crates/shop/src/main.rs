//! The `shop` binary: see [`shop::cli`] for the commands and their configuration.
//!
//! `shop up` runs the whole shop in this process, and `shop serve <service>` one of its
//! services, through [`shop::launch::AppLauncher`].

use std::process::ExitCode;

/// mimalloc: the shop allocates many small, short-lived buffers per order (JSON, HTTP
/// frames, store rows) across threads; see docs/decisions/0008-shop-throughput.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    shop::cli::main(Some(&shop::launch::AppLauncher))
}
