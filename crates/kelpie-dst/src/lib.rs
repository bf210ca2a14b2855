//! The lease world in the deterministic simulator (`kelpie-sim`): production lease code (the
//! protocol, the stores' decision, the keeper, placement) runs on simulated nodes, networks,
//! stores and clocks under one seed, and checkers enforce the TLA+ spec's invariants after every
//! step. The seed decides every interleaving, latency and fault, so a failing seed replays the
//! same failure at the same step.
//!
//! - [`sim_lease_store`]: [`SimLeaseStore`], the production lease protocol over [`kelpie_sim::SimStorage`].
//! - [`checkers`]: the TLA+ invariants, one per file, evaluated after every step.
//! - [`lease_cluster`]: [`SimLeaseCluster`], the simulated store, the nodes' beliefs and the
//!   checkers.
//! - [`lease_events`]: [`LeaseEvent`], what happened in a lease run, for reports and timelines.
//! - [`lease_net`]: [`lease_net::NetLeaseStore`], leases over the simulated network.
//! - [`lease_swarm`]: [`SwarmWorld`], networked nodes with production keepers, and chaos; the
//!   liveness bound ([`LivenessBound`]) and its check ([`LivenessWindow`]).
//! - [`lease_scenario`]: [`LeaseScenario`], nodes contending for leases under faults.
//! - [`mutations`]: deliberately broken protocols the checkers must catch.
//! - `sim_thread`: `SimThread`, a simulation value carried across the lease traits' `Send` bound.
//! - [`history`]: [`History`], every lease operation's invocation and response as nodes saw them.
//! - [`linearizability`]: [`check_history`], a Wing–Gong checker of such histories against the
//!   lease store's sequential model, run at the end of every swarm seed.
//! - [`swarm`]: [`swarm_faults`], a fault mix drawn per seed.
//! - [`allocator`]: [`allocator::set_sweep_policy`], the sweeping processes' allocator policy.
//!
//! ```
//! use kelpie_dst::LeaseScenario;
//! use kelpie_sim::{SimConfig, Simulation};
//!
//! let scenario = LeaseScenario::default();
//! let report = scenario.run(Simulation::new(SimConfig::new(42))).unwrap();
//! assert_eq!(report.sim.seed, 42);
//! ```

#![warn(missing_docs)]

pub mod allocator;
mod beliefs;
pub mod checkers;
pub mod etcd_history;
pub mod history;
pub mod lease_cluster;
pub mod lease_events;
pub mod lease_net;
pub mod lease_scenario;
pub mod lease_swarm;
pub mod linearizability;
pub mod mutations;
mod recycled;
pub mod sim_etcd;
pub mod sim_lease_store;
mod sim_thread;
pub mod swarm;
pub mod swarm_manager;

pub use history::{History, HistoryOp, HistoryOpId, OpOutcome};
pub use lease_cluster::{ClusterConfig, LeaseOpCounts, SimLeaseCluster};
pub use lease_events::{EventLog, LeaseEvent, LeaseEventKind};
pub use lease_scenario::{LeaseRunReport, LeaseScenario};
pub use lease_swarm::{
    sweep_requests_max, Keeper, LivenessBound, LivenessViolation, LivenessWindow, NetLeaseManager,
    SwarmWorld, LIVENESS, SWARM_COVERAGE_MARKS,
};
pub use linearizability::{
    check_history, check_history_with_store_log, Delivery, Duplicates, LinearizabilityError,
    LinearizabilityReport, OffendingWindow, StoreEffect, LINEARIZABILITY_SEARCH_STATES_MAX,
};
pub use sim_etcd::SimEtcd;
pub use sim_lease_store::{SimLeaseStore, StoreWriteMutation};
pub use swarm::{swarm_faults, SWARM_LEASE_FAULTS};
pub use swarm_manager::{SwarmManager, SwarmStore};
