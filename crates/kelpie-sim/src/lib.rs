//! The deterministic simulation engine: async Rust code runs on a single-threaded executor
//! under one seed, with virtual time, per-node clocks, a simulated store and network, and
//! injected faults. The seed decides every interleaving, latency and fault, so a failing seed
//! replays the same failure at the same step. This crate knows nothing of leases; the lease
//! world built on it lives in `kelpie-dst`.
//!
//! Modules are private; everything a scenario needs is re-exported here:
//! - [`Simulation`] runs a scenario and returns a [`SimReport`] or a [`SimError`];
//!   [`SimConfig`] holds the seed (from `DST_SEED`), bounds and latencies.
//! - [`SimEnv`], the scenario's handle: spawn, sleep, rng, clocks, components, faults.
//! - [`SimClock`], a per-node [`kelpie_core::Clock`] with offset, drift and jumps.
//! - [`JoinHandle`], [`Cancelled`], [`YieldNow`], [`Sleep`]: tasks and timers.
//! - [`DeterministicRng`]: seeded streams forked by name.
//! - [`FaultType`], [`FaultConfig`], [`FaultStats`]: faults, their probabilities and how often
//!   each fired.
//! - [`SimStorage`]: a linearizable versioned store with faults and crashes.
//! - [`SimNetwork`]: hosts with mailboxes, latency, partitions and faults.
//! - [`test_seeds`], [`render_failure`], [`reproduce_command`]: multi-seed tests and the
//!   `DST_SEED=<n>` failure banner.
//! - [`Sweep`], [`test_sweep`]: many seeds on several threads, delivered in seed order, optionally one
//!   [`Shard`] of a sweep split across processes (`sweep`).
//!
//! Inside: `runtime` (the run loop: picks ready tasks with the seed, jumps time), `executor`
//! (the task table, wakers and ready queue), `timer`, `in_flight` (the network's messages by
//! delivery instant), `injector` (draws fault decisions and counts firings) and `trace` (the
//! hash every decision is folded into).
//!
//! ```
//! use kelpie_sim::{FaultConfig, FaultType, SimConfig, Simulation};
//! use std::time::Duration;
//!
//! let fault = FaultConfig::new(FaultType::StorageLatency, 0.5).unwrap();
//! let report = Simulation::new(SimConfig::new(42))
//!     .with_fault(fault)
//!     .run(|env| async move {
//!         let store = env.storage::<u64>();
//!         let version = store.put("counter", 1).await.map_err(|e| e.to_string())?;
//!         env.sleep(Duration::from_secs(3600)).await; // an hour passes instantly
//!         assert_eq!(store.peek("counter").map(|v| v.version), Some(version));
//!         Ok::<(), String>(())
//!     })
//!     .unwrap();
//! assert!(report.sim_time_ms >= 3_600_000);
//! assert_eq!(report.seed, 42);
//! ```

#![warn(missing_docs)]

mod clock;
mod config;
mod env;
mod error;
mod executor;
mod failure;
mod fault;
mod in_flight;
mod injector;
mod network;
mod owned;
mod report;
mod rng;
mod runtime;
mod sim;
mod storage;
mod sweep;
mod task;
mod timer;
mod trace;
mod trials;

pub use clock::{ClockSleep, SimClock, CLOCK_DRIFT_PPM_ABS_MAX};
pub use config::{
    check_determinism_from_env, parse_seed, seed_from_env, test_seeds, test_sweep, SimConfig,
    DST_CHECK_DETERMINISM_ENV, DST_SEEDS_ENV, DST_SEED_ENV, NETWORK_LATENCY_MS_MAX_DEFAULT,
    NETWORK_LATENCY_MS_MIN_DEFAULT, SIM_STEPS_MAX_DEFAULT, SIM_TIME_MS_MAX_DEFAULT,
    STORAGE_LATENCY_MS_MAX_DEFAULT, STORAGE_LATENCY_MS_MIN_DEFAULT,
};
pub use env::SimEnv;
pub use error::SimError;
pub use failure::{render_failure, reproduce_command};
pub use fault::{FaultConfig, FaultStats, FaultType};
pub use network::{
    HostId, NetworkConfig, Recv, SimNetwork, NETWORK_DELAY_SPIKE_FACTOR, NETWORK_HOSTS_MAX,
    NETWORK_MAILBOX_CAPACITY_DEFAULT,
};
pub use owned::current_thread_id;
pub use report::SimReport;
pub use rng::{derive_seed, DeterministicRng};
pub use sim::Simulation;
pub use storage::{CasOutcome, SimStorage, StorageError, Versioned, STORAGE_LATENCY_SPIKE_FACTOR};
pub use sweep::{
    Shard, ShardError, Sweep, SweepEnd, SWEEP_JOBS_MAX, SWEEP_REORDER_WINDOW_PER_JOB,
    SWEEP_WORKER_STACK_BYTES,
};
pub use task::{Cancelled, JoinHandle, YieldNow};
pub use timer::Sleep;
