//! Deterministic simulation testing for Kelpie: async Rust code runs on a single-threaded
//! executor under one seed, with virtual time, a simulated store and network, and injected
//! faults. The seed decides every interleaving, latency and fault, so a failing seed replays
//! the same failure at the same step.
//!
//! - [`sim`]: [`Simulation`] runs a scenario and returns a [`SimReport`] or a [`SimError`].
//! - [`config`]: [`SimConfig`] (seed from `DST_SEED`, bounds, latencies) and its defaults.
//! - [`env`]: [`SimEnv`], the scenario's handle: spawn, sleep, rng, clocks, components, faults.
//! - [`runtime`] (private): the run loop; picks ready tasks with the seed, jumps time.
//! - [`executor`] (private): the task table, wakers and ready queue.
//! - [`timer`]: timers on global simulated time and the [`Sleep`] future.
//! - [`clock`]: [`SimClock`], a per-node [`kelpie_core::Clock`] with offset and drift.
//! - [`task`]: [`JoinHandle`], [`Cancelled`], [`YieldNow`].
//! - [`rng`]: [`DeterministicRng`], seeded streams forked by name.
//! - [`fault`]: [`FaultType`], [`FaultConfig`], [`FaultStats`].
//! - [`injector`] (private): draws fault decisions and counts firings.
//! - [`storage`]: [`SimStorage`], a linearizable versioned store with faults and crashes.
//! - [`network`]: [`SimNetwork`], hosts with mailboxes, latency, partitions and faults.
//! - [`trace`] (private): the trace hash every decision is folded into.
//! - [`failure`]: the `DST_SEED=<n>` failure banner, reproduce command and panic capture.
//! - [`report`]: [`SimReport`], the figures of a finished run.
//! - [`sim_lease_store`]: [`SimLeaseStore`], the production lease protocol over [`SimStorage`].
//! - [`checkers`]: the TLA+ invariants, one per file, evaluated after every step.
//! - [`lease_cluster`]: [`SimLeaseCluster`] and [`SimLeaseClient`], simulated lease nodes.
//! - [`lease_events`]: [`LeaseEvent`], what happened in a lease run, for reports and timelines.
//! - [`lease_net`]: [`lease_net::NetLeaseStore`], leases over the simulated network.
//! - [`lease_swarm`]: [`SwarmWorld`], networked nodes with production keepers, and chaos.
//! - [`lease_scenario`]: [`LeaseScenario`], nodes contending for leases under faults.
//! - [`mutations`]: deliberately broken protocols the checkers must catch.
//! - [`history`]: [`History`], every lease operation's invocation and response as nodes saw them.
//! - [`linearizability`]: [`check_history`], a Wing–Gong checker of such histories against the
//!   lease store's sequential model, run at the end of every swarm seed.
//! - [`swarm`]: [`swarm_faults`], a fault mix drawn per seed.
//! - [`error`]: [`SimError`], why a run (or its configuration) failed.
//!
//! ```
//! use kelpie_dst::{FaultConfig, FaultType, SimConfig, Simulation};
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

mod beliefs;
pub mod checkers;
pub mod clock;
pub mod config;
pub mod env;
pub mod error;
mod executor;
pub mod failure;
pub mod fault;
pub mod history;
mod injector;
pub mod lease_cluster;
pub mod lease_events;
pub mod lease_net;
pub mod lease_scenario;
pub mod lease_swarm;
pub mod linearizability;
pub mod mutations;
pub mod network;
pub mod report;
pub mod rng;
mod runtime;
pub mod sim;
pub mod sim_lease_store;
pub mod storage;
pub mod swarm;
pub mod task;
pub mod timer;
mod trace;

pub use clock::{ClockSleep, SimClock, CLOCK_DRIFT_PPM_ABS_MAX};
pub use config::{
    SimConfig, DST_CHECK_DETERMINISM_ENV, DST_SEED_ENV, NETWORK_LATENCY_MS_MAX_DEFAULT,
    NETWORK_LATENCY_MS_MIN_DEFAULT, SIM_STEPS_MAX_DEFAULT, SIM_TIME_MS_MAX_DEFAULT,
    STORAGE_LATENCY_MS_MAX_DEFAULT, STORAGE_LATENCY_MS_MIN_DEFAULT,
};
pub use env::SimEnv;
pub use error::SimError;
pub use fault::{FaultConfig, FaultStats, FaultType};
pub use history::{History, HistoryOp, HistoryOpId, OpOutcome};
pub use lease_cluster::{
    ClusterConfig, LeaseOpCounts, SimLeaseClient, SimLeaseCluster, STORE_RETRIES_MAX,
};
pub use lease_events::{EventLog, LeaseEvent, LeaseEventKind};
pub use lease_scenario::{LeaseRunReport, LeaseScenario};
pub use lease_swarm::{Keeper, NetLeaseManager, SwarmSettings, SwarmWorld};
pub use linearizability::{
    check_history, LinearizabilityError, LinearizabilityReport, OffendingWindow,
    LINEARIZABILITY_SEARCH_STATES_MAX,
};
pub use network::{HostId, NetworkConfig, Recv, SimNetwork};
pub use report::SimReport;
pub use rng::DeterministicRng;
pub use sim::Simulation;
pub use sim_lease_store::SimLeaseStore;
pub use storage::{CasOutcome, SimStorage, StorageError, Versioned};
pub use swarm::{swarm_faults, SWARM_LEASE_FAULTS};
pub use task::{Cancelled, JoinHandle, YieldNow};
pub use timer::Sleep;
