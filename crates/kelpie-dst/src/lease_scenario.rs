//! The lease scenario: simulated nodes run the production lease keeper and acquire and release
//! leases on a few contended actors over the simulated network and store, under the run's
//! fault mix, while the checkers judge every step; then everything heals and liveness is
//! checked ([`crate::lease_swarm`]). `kelpie sim`, the swarm and the lease tests all run it.

use kelpie_lease::backend::decide;
use std::cell::{Cell, RefCell};
use std::rc::Rc;

use crate::checkers::CheckerSet;
use crate::lease_cluster::{ClusterConfig, LeaseOpCounts, SimLeaseCluster};
use crate::lease_events::{EventLog, LeaseEvent};
use crate::lease_swarm::{liveness_bound, run_swarm, sweep_requests_max, SwarmSettings};
use crate::swarm_manager::SwarmStore;

use crate::linearizability::LinearizabilityReport;
use kelpie_sim::{SimConfig, SimEnv, SimError, SimReport, Simulation};

/// Shortest request timeout: two network hops at the longest default latency plus the
/// store's longest default latency, with room to spare.
pub const REQUEST_TIMEOUT_MS_MIN: u64 = 60;

/// Settings of a lease scenario run.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct LeaseScenario {
    /// Simulated nodes contending.
    pub nodes_count: usize,
    /// Actors they contend for.
    pub actors_count: usize,
    /// Simulated time the nodes run for.
    pub sim_duration_ms: u64,
    /// Longest pause between a node's operations, on its clock.
    pub think_time_ms_max: u64,
    /// Store, belief and checker settings.
    pub cluster: ClusterConfig,
    /// How long a networked node waits for the store's reply.
    pub request_timeout_ms: u64,
    /// Whether a networked run heals and checks liveness after `sim_duration_ms`.
    pub check_liveness: bool,
    /// Whether each node runs its own loop of acquires and releases. Targeted tests turn it
    /// off and drive the keepers of a [`SwarmWorld`](crate::SwarmWorld) themselves.
    pub app_loop: bool,
    /// Deliberately wrong keeper: belief measured from the reply's arrival.
    pub bug_belief_from_reply: bool,
    /// Deliberately wrong keeper: no drift margin, while clocks do drift.
    pub bug_no_drift_margin: bool,
    /// Deliberately wrong store: it sometimes decides a request on the
    /// previous version of the record. The linearizability check must catch it.
    pub bug_stale_reads: bool,
    /// Whether a networked run checks its history for linearizability (see
    /// [`crate::mutations::Mutation::apply`]). Off when a run deliberately uses another
    /// decision function: the store applies that one atomically, so checking it against the
    /// production model would only re-detect the mutation the invariant checkers catch.
    pub check_linearizability: bool,
    /// Whether that check first tries the linearization the store's own log proposes
    /// ([`crate::check_history_with_store_log`]): the same verdict, without the search on a
    /// correct store's history. Off, every actor's history is searched, as tests of the search
    /// on real histories want.
    pub linearize_from_store_log: bool,
    /// Deliberately wrong app: in the liveness phase node 0 never acquires an actor it wants
    /// as a keeper that never takes a free lease would look. The liveness check must report
    /// it.
    pub bug_node_never_acquires: bool,
    /// Deliberately wrong app: in the liveness phase every node releases each actor it wants
    /// as soon as it is granted, so each is held only for a moment. The liveness check must
    /// report that it is not kept.
    pub bug_app_lets_go: bool,
    /// Deliberately wrong store: it crashes at healing and stays down. The liveness check
    /// must report it, though every actor may be held at that instant.
    pub bug_store_dies_at_heal: bool,
}

impl Default for LeaseScenario {
    fn default() -> Self {
        Self {
            nodes_count: 4,
            actors_count: 8,
            sim_duration_ms: 20_000,
            think_time_ms_max: 250,
            cluster: ClusterConfig {
                lease_duration_ms: 1_000,
                // 5 %: far beyond real oscillators, so that a keeper that forgets the drift
                // bound is caught (its error then exceeds the safety margin and the latency).
                clock_drift_ppm_max: 50_000,
                safety_margin_ms: 10,
                checkers: CheckerSet::ALL,
                decide,
                store_write_mutation: None,
                store: SwarmStore::Protocol,
                etcd_mutation: None,
            },
            request_timeout_ms: 200,
            check_liveness: true,
            app_loop: true,
            bug_belief_from_reply: false,
            bug_no_drift_margin: false,
            bug_stale_reads: false,
            check_linearizability: true,
            linearize_from_store_log: true,
            bug_node_never_acquires: false,
            bug_app_lets_go: false,
            bug_store_dies_at_heal: false,
        }
    }
}

/// What a lease scenario run produced.
#[derive(Debug, Clone)]
pub struct LeaseRunReport {
    /// The simulator's report.
    pub sim: SimReport,
    /// What the nodes did.
    pub ops: LeaseOpCounts,
    /// What the linearizability check of the lease history covered (all zero when the check
    /// was turned off).
    pub linearizability: Option<LinearizabilityReport>,
}

impl LeaseScenario {
    /// The default cluster settings with another lease duration.
    pub fn cluster_with_lease_duration_ms(&self, lease_duration_ms: u64) -> ClusterConfig {
        ClusterConfig {
            lease_duration_ms,
            ..self.cluster
        }
    }

    /// The pause between a node's visits, capped at a quarter lease so that short leases
    /// still see wanted actors acquired well inside the liveness window.
    pub fn think_time_for_lease_ms(&self) -> u64 {
        self.think_time_ms_max
            .min(self.cluster.lease_duration_ms / 4)
            .max(1)
    }

    /// The request timeout, capped at half a lease but never below
    /// [`REQUEST_TIMEOUT_MS_MIN`], the longest undisturbed round trip.
    pub fn request_timeout_for_lease_ms(&self) -> u64 {
        let capped_ms = self
            .request_timeout_ms
            .min(self.cluster.lease_duration_ms / 2);
        capped_ms.max(REQUEST_TIMEOUT_MS_MIN)
    }

    /// The latest global instant a run of this scenario under `sim`'s latencies can reach:
    /// the safety phase, then (when liveness is checked) the liveness bound at its worst, as
    /// if each node wanted every actor and believed it held every other at healing. For the
    /// simulation's bounds on time and steps, which stop only a run gone wrong, and which a
    /// long lease stretches (the liveness phase lasts a few lease durations).
    pub fn planned_duration_ms_max(&self, sim: &SimConfig) -> Result<u64, String> {
        if !self.check_liveness {
            return Ok(self.sim_duration_ms);
        }
        let actors = self.actors_count as u64;
        let on_etcd = self.cluster.store == SwarmStore::Etcd;
        let requests_max = sweep_requests_max(actors, actors);
        let bound = liveness_bound(
            &self.cluster,
            &self.swarm_settings(),
            sim,
            on_etcd,
            requests_max,
        )?;
        Ok(self.sim_duration_ms.saturating_add(bound.total_ms()))
    }

    /// Runs the scenario under `simulation`.
    pub fn run(self, simulation: Simulation) -> Result<LeaseRunReport, SimError> {
        self.run_inner(simulation, false).0
    }

    /// Runs the scenario and also returns its events (the last
    /// [`EVENTS_KEPT_MAX`](crate::lease_events::EVENTS_KEPT_MAX) of them),
    /// whether it passed or failed.
    pub fn run_recorded(
        self,
        simulation: Simulation,
    ) -> (Result<LeaseRunReport, SimError>, Vec<LeaseEvent>) {
        self.run_inner(simulation, true)
    }

    /// Runs the scenario, recording events only if `record` (nobody reads them otherwise).
    fn run_inner(
        self,
        simulation: Simulation,
        record: bool,
    ) -> (Result<LeaseRunReport, SimError>, Vec<LeaseEvent>) {
        let counts = Rc::new(Cell::new(LeaseOpCounts::default()));
        let events = Rc::new(RefCell::new(EventLog::default()));
        let checked = Rc::new(Cell::new(None));
        let (counts_out, events_out, checked_out) =
            (counts.clone(), events.clone(), checked.clone());
        let sim = simulation.run(move |env| {
            let (counts, events, checked) = (counts.clone(), events.clone(), checked.clone());
            async move {
                let cluster = SimLeaseCluster::new(&env, self.cluster)?;
                cluster.count_decisions(true);
                cluster.events().set_enabled(record);
                *events.borrow_mut() = cluster.events().clone();
                let outcome = self.drive(&env, &cluster).await;
                counts.set(cluster.counts());
                checked.set(outcome.as_ref().ok().copied());
                outcome.map(|_| ())
            }
        });
        let events = events_out.borrow().to_vec();
        (
            sim.map(|sim| LeaseRunReport {
                sim,
                ops: counts_out.get(),
                linearizability: checked_out.get(),
            }),
            events,
        )
    }

    async fn drive(
        self,
        env: &SimEnv,
        cluster: &SimLeaseCluster,
    ) -> Result<LinearizabilityReport, String> {
        run_swarm(env.clone(), cluster.clone(), self).await
    }

    /// The settings as the world uses them.
    pub(crate) fn swarm_settings(&self) -> SwarmSettings {
        SwarmSettings {
            nodes_count: self.nodes_count,
            actors_count: self.actors_count,
            safety_phase_ms: self.sim_duration_ms,
            think_time_ms_max: self.think_time_for_lease_ms(),
            request_timeout_ms: self.request_timeout_for_lease_ms(),
            bug_belief_from_reply: self.bug_belief_from_reply,
            bug_no_drift_margin: self.bug_no_drift_margin,
            check_liveness: self.check_liveness,
            app_loop: self.app_loop,
            bug_stale_reads: self.bug_stale_reads,
            // On etcd, the history checked is etcd's own (`crate::etcd_history`).
            check_linearizability: self.check_linearizability,
            linearize_from_store_log: self.linearize_from_store_log,
            bug_node_never_acquires: self.bug_node_never_acquires,
            bug_app_lets_go: self.bug_app_lets_go,
            bug_store_dies_at_heal: self.bug_store_dies_at_heal,
        }
    }
}
