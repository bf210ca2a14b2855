//! `kelpie`: the Kelpie command line.
//!
//! - `kelpie sim`: the lease scenario in the deterministic simulator over many seeds.
//! - `kelpie lease`: acquire, renew, release, get and list leases in a store.
//! - `kelpie bench`: lease operations per second against a store.
//! - `kelpie node`: a long-running node holding actors under leases, with metrics.
//!
//! Exit codes: 0 done, 1 refused or a failing seed, 2 bad usage or configuration, 3 store
//! unavailable.

mod bench;
mod error;
mod events;
mod faults;
mod lease_cmd;
mod merge;
mod node;
mod progress;
mod report;
mod sim;
mod store_url;
mod timeline;
mod timing;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::error::{CliError, EXIT_REFUSED};

/// Kelpie: leases with fencing tokens for virtual actors, and the simulator that checks them.
#[derive(Debug, Parser)]
#[command(name = "kelpie", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the lease scenario in the deterministic simulator over many seeds.
    Sim(sim::SimArgs),
    /// Acquire, renew, release, get and list leases in a store.
    #[command(subcommand, after_help = lease_cmd::EXIT_CODES_HELP)]
    Lease(lease_cmd::LeaseCommand),
    /// Measure lease operations per second against a store.
    Bench(bench::BenchArgs),
    /// Run a node: hold actors under leases, write their state fenced, until SIGTERM.
    #[command(after_help = node::NODE_AFTER_HELP)]
    Node(node::NodeArgs),
}

/// A simulation sweep allocates and frees several small blocks per lease operation; mimalloc
/// does that in a fraction of glibc's instructions (see the workspace manifest).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Keeps the memory a finished seed frees for the next one. mimalloc otherwise hands freed
/// pages back to the OS soon after (a purge), and a sweep, which builds and drops a world per
/// seed, faults them back in. With transparent huge pages each fault clears 2 MiB: most of a
/// sweep's system time, and up to about 4% of `swarm_bench`'s time. The process keeps its
/// peak heap instead, which the next seed reuses.
fn keep_freed_memory() {
    /// `mi_option_purge_delay` in the mimalloc sources the pinned `libmimalloc-sys` bundles
    /// (the crate names no constant for it); -1: never purge.
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: sets one of the allocator's options and takes no pointer. Called before the
    // process starts any other thread, so no thread reads the option while it is written.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

fn main() -> ExitCode {
    // Clap prints usage errors itself and exits with 2.
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Sim(args) => {
            keep_freed_memory();
            sim::run(args)
        }
        Command::Lease(command) => lease_cmd::run(command).map(|()| true),
        Command::Bench(args) => bench::run(args).map(|()| true),
        Command::Node(args) => node::run(args).map(|()| true),
    };
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(EXIT_REFUSED),
        Err(error) => exit_with(&error),
    }
}

fn exit_with(error: &CliError) -> ExitCode {
    eprintln!("kelpie: error: {error}");
    ExitCode::from(error.exit_code())
}
