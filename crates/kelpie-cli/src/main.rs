//! `kelpie`: the Kelpie command line.
//!
//! - `kelpie sim`: the lease scenario in the deterministic simulator over many seeds.
//! - `kelpie lease`: acquire, renew, release, get and list leases in a store.
//! - `kelpie bench`: lease operations per second against a store.
//! - `kelpie node`: a long-running node holding actors under leases, with metrics.
//!
//! Exit codes: 0 done, 1 refused or a failing seed, 2 bad usage or configuration, 3 store
//! unavailable, 4 done but the answer could not be written to stdout.

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
mod stop_signals;
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

fn main() -> ExitCode {
    // Clap prints usage errors itself and exits with 2.
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Sim(args) => {
            kelpie_dst::allocator::set_sweep_policy();
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
