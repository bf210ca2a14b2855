//! The swarm scenario: nodes that run the production [`LeaseKeeper`] reach the store only
//! through the simulated network, while a chaos task partitions them (both ways and one way),
//! crashes and restarts them and the store, and jumps their clocks, each as often as the
//! seed's fault mix says. After the safety phase everything heals, and in the liveness phase
//! every actor must be held by the node that wants it within the liveness bound below. Every
//! lease operation the nodes make is recorded in a [`History`], and at the end of the run the
//! history must be linearizable against the lease store's sequential model.
//!
//! # The liveness bound
//!
//! At healing (`t0`) every fault stops for good and every crashed node restarts. Actor `i` is
//! then wanted by node `i mod nodes`, and each node's app loop sweeps the actors in order: it
//! acquires each actor it wants and does not hold, releases each it holds and does not want,
//! one request at a time, then thinks before the next sweep. Every actor must be seen held by
//! the node that wants it no later than `t0 + bound` (global time):
//!
//! ```text
//! bound = D + L + R + max(think' + V·R, retry' + R) + think' + V·R + R
//! ```
//!
//! where, in global ms, with `x'` a node-local duration `x` on the slowest clock the run allows
//! (`x / (1 − drift)`, rounded up, plus 1 ms):
//!
//! - `L`: the lease duration.
//! - `R = 2·net + store`: the longest request round trip once healed, with `net` the run's
//!   longest one-way network latency and `store` its longest store operation.
//! - `D = (1 + NETWORK_DELAY_SPIKE_FACTOR)·net + (1 + STORAGE_LATENCY_SPIKE_FACTOR)·store +
//!   timeout'`: by `t0 + D` every request sent before healing has been applied or lost and its
//!   sender has had its answer or given up (`timeout`: the nodes' request timeout).
//! - `think`: the longest pause between two sweeps; `retry`: the keeper's retry interval.
//! - `V = max over nodes of (W + U + 1)`: the most requests one sweep of a node can make, with
//!   `W` the actors it wants, `U` the actors it believes it holds at healing without wanting
//!   them, and one for the visit in progress at healing (it may still acquire an actor).
//!
//! Why that bound. Let `Q = t0 + D`; from `Q` on, every request takes at most `R`.
//! 1. A node finishes the visit in progress at healing by `Q`, thinks, and its first liveness
//!    sweep makes at most `V` requests: it ends by `Q + think' + V·R`. From then on the node
//!    believes no actor it does not want; it never acquires one again.
//! 2. An actor wanted by node `n` is kept from it only by (a) a lease another node believes:
//!    that node releases it in its first sweep, by `Q + think' + V·R`; (b) a lease nobody
//!    believes (a crashed incarnation's, an acquire whose answer was lost, a belief that ran
//!    out): its holder renewed it only while it believed it, so never after its first sweep
//!    reached the actor (it would have released it then), and the store lets it expire `L` after
//!    the last request it applied, by `Q + think' + V·R + R + L`; (c) `n`'s own release from the
//!    faulty phase, still unanswered, which the keeper retries every `retry'`: answered by
//!    `Q + L + retry' + 2R` (renewal rounds that beliefs from the faulty phase cut short while
//!    they run out, all within `L` of healing, delay the retry at most that long).
//! 3. Let `X` be the latest of these. Node `n` begins its visits to an actor at most
//!    `think' + V·R` apart (one pause, at most `V − 1` other requests, the visit itself), so
//!    one begins in `(X, X + think' + V·R]`, and its acquire is granted `R` later.
//!
//! The renew interval does not appear: the keeper renews a held lease at least twice within
//! its belief (its configuration requires it), and a lease stops being renewed when its holder
//! stops believing it, so renewals never hold up a free lease. The bound grows with the number
//! of actors a node must visit: with 200 actors on 5 nodes and one-second leases it is about
//! 9 s, far beyond two lease durations (an actor whose release comes after its wanter's first
//! visit waits for the second sweep; two sweeps of some 60 requests each take over 2 s).
//!
//! The check is exact: the window records when each wanted actor is first seen held by the
//! node that wants it (at healing, or when that node's visit finds it held or acquires it),
//! and the run fails if any actor was not held by `t0 + bound`, however soon before the
//! deadline its belief started (the old check sampled every twentieth of a lease and missed
//! beliefs started in the last sample interval). A node that never acquires a free actor it
//! wants is reported, after `bound`.
//!
//! Held once is not enough: a keeper that never renews, an app that lets go of what it just
//! acquired, a store that dies at healing (every actor held then) all get every actor held for
//! a moment. So once every wanted actor was held, each must be kept: held by its node without
//! a break, with one token, for `kept = L'` (the lease duration on the slowest clock), which
//! no belief from a single grant lasts, by `t0 + bound + kept`. The window learns of breaks
//! from the visits (only a visit acquires, and it looks first), and the check also asks the
//! node whether it holds the actor with that token at the end. The phase ends as soon as every
//! actor is kept, about `kept` after the last was first held, so the bound only lengthens runs
//! that fail.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;

use crate::lease_scenario::LeaseScenario;
use std::sync::Arc;
use std::time::Duration;

use futures_channel::oneshot;
use kelpie_core::{ActorId, FencingToken, NodeId};
use kelpie_lease::limits::{ETCD_EXPIRY_CHECK_INTERVAL_MS, ETCD_KEY_PREFIX_DEFAULT};
use kelpie_lease::{
    backend::ProtocolLeaseManager, EtcdLeaseManager, KeeperConfig, KeeperEvent, KeeperEvents,
    LeaseConfig, LeaseError, LeaseKeeper, LeaseManager,
};

use crate::etcd_history::{check_etcd_history, EtcdHistory};
use crate::history::History;
use crate::lease_cluster::{ClusterConfig, SimLeaseCluster};
use crate::lease_net::{
    serve_leases, serve_leases_with_stale_reads, LeaseMessage, NetLeaseStore, STORE_HOST,
};
use crate::linearizability::{
    check_history, check_history_with_store_log, Delivery, Duplicates, LinearizabilityReport,
};
use crate::mutations::LINEARIZABILITY;
use crate::sim_etcd::{serve_etcd, NetEtcd, ETCD_MIN_TTL_S, SIM_ETCD_ELECTION_MS_MAX};
use crate::swarm_manager::SwarmManager;

/// What reports a failed liveness check after healing, among the invariants' names.
pub const LIVENESS: &str = "Liveness";
use kelpie_sim::DeterministicRng;
use kelpie_sim::FaultType;
use kelpie_sim::SimClock;
use kelpie_sim::SimConfig;
use kelpie_sim::{HostId, SimNetwork};
use kelpie_sim::{JoinHandle, SimEnv};

/// Interval at which the chaos task draws whether each scripted fault starts.
pub const CHAOS_TICK_MS: u64 = 250;
/// Probability that a node refused an actor on etcd waits for it by watch before going on.
pub const WATCH_PROBABILITY: f64 = 0.5;
/// Probability that a node holding a lease in the safety phase releases it on a visit.
const RELEASE_PROBABILITY: f64 = 0.1;

/// Coverage mark: a node crashed while its keeper believed it held a lease.
pub const MARK_CRASH_WHILE_HOLDING: &str = "swarm.node_crashed_while_holding";
/// Coverage mark: a node's clock jumped forward while its keeper believed it held a lease.
pub const MARK_CLOCK_JUMP_WHILE_BELIEVING: &str = "swarm.clock_jumped_while_believing";
/// Coverage mark: the lease store crashed while it held a valid lease.
pub const MARK_STORE_CRASH_WITH_LEASES: &str = "swarm.store_crashed_with_valid_leases";
/// The swarm's own coverage marks, on the fault paths: a sweep fails if any is never hit,
/// beside the lease code's marks (`kelpie_lease::coverage::COVERAGE_MARKS`).
pub const SWARM_COVERAGE_MARKS: &[&str] = &[
    MARK_CRASH_WHILE_HOLDING,
    MARK_CLOCK_JUMP_WHILE_BELIEVING,
    MARK_STORE_CRASH_WITH_LEASES,
];

/// A simulated node's keeper: the production keeper over the networked store.
pub type Keeper = LeaseKeeper<SwarmManager>;

/// A simulated node's lease manager: the production protocol over the networked store.
pub type NetLeaseManager = SwarmManager;

/// Which phase a run is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Faults on; the checkers judge safety.
    Safety,
    /// Everything healed; every wanted actor must get a holder.
    Liveness,
}

/// A [`LeaseScenario`]'s settings as the world uses them, with the think time and request
/// timeout fitted to the lease (see the scenario's methods). Built only from a scenario, so
/// every setting is given once, there.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SwarmSettings {
    /// Nodes (hosts 1..=n; the store is host 0).
    pub(crate) nodes_count: usize,
    /// Actors.
    pub(crate) actors_count: usize,
    /// Length of the safety phase.
    pub(crate) safety_phase_ms: u64,
    /// Longest pause between two visits of a node's loop, on its clock.
    pub(crate) think_time_ms_max: u64,
    /// How long a node waits for the store's reply.
    pub(crate) request_timeout_ms: u64,
    /// Deliberately wrong keeper: belief from the reply's arrival.
    pub(crate) bug_belief_from_reply: bool,
    /// Deliberately wrong keeper: it assumes no drift, while clocks do drift.
    pub(crate) bug_no_drift_margin: bool,
    /// Whether to run the liveness phase.
    pub(crate) check_liveness: bool,
    /// Whether each node runs its own loop of acquires and releases. Targeted tests turn it
    /// off and drive the keepers themselves.
    pub(crate) app_loop: bool,
    /// Deliberately wrong store: it sometimes decides on the previous version of a record
    /// (see [`serve_leases_with_stale_reads`]).
    pub(crate) bug_stale_reads: bool,
    /// Whether the history is checked for linearizability against the production protocol.
    /// Off when a run deliberately uses another decision function: the store applies that one
    /// atomically, so checking it against the production model would only re-detect the
    /// mutation the invariant checkers are there to catch.
    pub(crate) check_linearizability: bool,
    /// Whether the store logs what it decided for that check to try first.
    pub(crate) linearize_from_store_log: bool,
    /// Deliberately wrong app: in the liveness phase node 0 never acquires an actor it wants,
    /// as a keeper that never takes a free lease would look. The liveness check must report it.
    pub(crate) bug_node_never_acquires: bool,
    /// Deliberately wrong app: in the liveness phase every node releases each actor it wants
    /// as soon as its acquire is granted, so every actor is held, each for a moment. The
    /// liveness check must report that it is not kept.
    pub(crate) bug_app_lets_go: bool,
    /// Deliberately wrong store: it crashes at healing and stays down, so every actor held
    /// then is held until its belief runs out, and none is renewed or held again. The
    /// liveness check must report it.
    pub(crate) bug_store_dies_at_heal: bool,
}

/// The networked lease world: the store host serving leases, and nodes with production
/// keepers that can be started, crashed, partitioned and skewed. The swarm drives it with a
/// chaos task; targeted tests drive it by hand.
pub struct SwarmWorld {
    env: SimEnv,
    cluster: SimLeaseCluster,
    config: ClusterConfig,
    settings: SwarmSettings,
    network: SimNetwork<LeaseMessage>,
    actors: Vec<ActorId>,
    /// Each actor's index in `actors`.
    actor_indices: BTreeMap<ActorId, usize>,
    phase: Cell<Phase>,
    nodes: RefCell<Vec<Rc<SwarmNode>>>,
    /// The liveness phase's record, from healing on (when liveness is checked).
    liveness: RefCell<Option<LivenessWindow>>,
    /// Told once every wanted actor was held, to end the liveness phase early.
    all_held: RefCell<Option<oneshot::Sender<()>>>,
    history: History,
    /// Every request the nodes made to the simulated etcd, when they use it.
    etcd_history: EtcdHistory,
}

/// One networked node and its current incarnation.
struct SwarmNode {
    index: usize,
    node_id: NodeId,
    clock: SimClock,
    incarnation: Cell<u32>,
    /// The identity this incarnation holds leases under: `node-<i>@<incarnation>`. A restarted
    /// process is a new holder, so a delayed request from its previous life (a release still
    /// in the network when it crashed) can never match a lease it holds now.
    holder_id: RefCell<NodeId>,
    keeper: RefCell<Option<Arc<Keeper>>>,
    manager: RefCell<Option<Arc<NetLeaseManager>>>,
    lost: RefCell<Option<KeeperEvents>>,
    tasks: RefCell<Vec<JoinHandle<()>>>,
}

impl SwarmNode {
    fn host(&self) -> HostId {
        self.index + 1
    }

    fn is_up(&self) -> bool {
        self.keeper.borrow().is_some()
    }

    /// Starts a new incarnation with empty memory.
    fn start(self: &Rc<Self>, world: &Rc<SwarmWorld>) -> Result<(), String> {
        let incarnation = self.incarnation.get() + 1;
        self.incarnation.set(incarnation);
        let timeout_ms = world.settings.request_timeout_ms;
        let lease_config =
            LeaseConfig::new(world.config.lease_duration_ms).map_err(|e| e.to_string())?;
        let manager = if world.cluster.etcd().is_some() {
            let etcd = NetEtcd::connect(
                world.network.clone(),
                self.host(),
                incarnation,
                self.clock.clone(),
                Some(world.etcd_history.clone()),
            );
            let clock: kelpie_core::SharedClock = Arc::new(self.clock.clone());
            let manager = EtcdLeaseManager::with_api(
                etcd,
                lease_config,
                ETCD_KEY_PREFIX_DEFAULT,
                timeout_ms,
                clock,
            )
            .map_err(|e| e.to_string())?;
            let manager = match world.config.etcd_mutation {
                Some(mutation) => manager.with_mutation(mutation),
                None => manager,
            };
            SwarmManager::Etcd(manager)
        } else {
            let truth = world.cluster.store().clone();
            let store = NetLeaseStore::connect(
                world.network.clone(),
                self.host(),
                incarnation,
                self.clock.clone(),
                timeout_ms,
                truth,
            );
            store.record_history(world.history.clone());
            let manager = ProtocolLeaseManager::new(store, lease_config);
            SwarmManager::Protocol(manager)
        };
        let manager = Arc::new(manager);
        let keeper_config = keeper_config(&world.config, &world.settings);
        let clock = Arc::new(self.clock.clone());
        // The keeper appends the incarnation to the node id (`node-0@2`); in production it
        // draws one at random, here the run's restart count chooses it.
        let (keeper, lost) = LeaseKeeper::with_incarnation(
            Arc::clone(&manager),
            clock,
            self.node_id.clone(),
            u64::from(incarnation),
            keeper_config,
        )
        .map_err(|e| e.to_string())?;
        let holder_id = keeper.holder_id().clone();
        *self.holder_id.borrow_mut() = holder_id.clone();
        world.cluster.board().set_keeper(
            &holder_id,
            self.clock.clone(),
            Rc::new(Arc::clone(&keeper)),
        );
        let renewer = Arc::clone(&keeper);
        let mut tasks = vec![world.env.spawn(async move { renewer.run().await })];
        if world.settings.app_loop {
            let app = app_loop(Rc::clone(world), Rc::clone(self), Arc::clone(&keeper));
            tasks.push(world.env.spawn(app));
        }
        *self.keeper.borrow_mut() = Some(keeper);
        *self.manager.borrow_mut() = Some(manager);
        *self.lost.borrow_mut() = Some(lost);
        *self.tasks.borrow_mut() = tasks;
        Ok(())
    }

    /// Crashes the node: its tasks stop and its memory, beliefs included, is gone.
    fn crash(&self, world: &SwarmWorld) {
        for task in self.tasks.borrow_mut().drain(..) {
            task.abort();
        }
        *self.keeper.borrow_mut() = None;
        *self.manager.borrow_mut() = None;
        *self.lost.borrow_mut() = None;
        world.cluster.board().crashed(&self.holder_id.borrow());
    }
}

fn keeper_config(config: &ClusterConfig, settings: &SwarmSettings) -> KeeperConfig {
    let drift_ppm = if settings.bug_no_drift_margin {
        0
    } else {
        config.clock_drift_ppm_max
    };
    let keeper = KeeperConfig::default().with_belief_bounds(drift_ppm, config.safety_margin_ms);
    if settings.bug_belief_from_reply {
        keeper.with_mutation_belief_from_reply()
    } else {
        keeper
    }
}

/// Runs the swarm in `env`: safety phase, healing, liveness phase, and the linearizability
/// check of the whole history. Returns a message naming the failure if the history is not
/// linearizable or liveness fails; safety violations fail the run through the checkers.
pub(crate) async fn run_swarm(
    env: SimEnv,
    cluster: SimLeaseCluster,
    scenario: LeaseScenario,
) -> Result<LinearizabilityReport, String> {
    let settings = scenario.swarm_settings();
    let world = SwarmWorld::new(&env, cluster, scenario);
    world.start_all()?;
    let chaos = world.spawn_chaos();
    env.sleep(Duration::from_millis(settings.safety_phase_ms))
        .await;
    chaos.abort();
    world.heal()?;
    let check_history = |world: &SwarmWorld| match settings.check_linearizability {
        true => world.check_linearizability(),
        false => Ok(LinearizabilityReport::default()),
    };
    if !settings.check_liveness {
        return match check_history(&world) {
            Ok(checked) => Ok(checked),
            Err(message) => Err(fail_as_invariant(&env, LINEARIZABILITY, message).await),
        };
    }
    // No task ran since healing: the window opens at the instant the faults stopped.
    let all_held = world.open_liveness_window()?;
    let deadline_ms = world.liveness_deadline_ms();
    // Until every wanted actor was held, or just past the deadline, so that an actor first
    // held at the deadline's very millisecond is on record before the check.
    let past_deadline_ms = deadline_ms + 1 - env.now_ms();
    let past_deadline = env.sleep(Duration::from_millis(past_deadline_ms));
    if let futures_util::future::Either::Left(_) =
        futures_util::future::select(all_held, std::pin::pin!(past_deadline)).await
    {
        // Held once is not enough: each must then be kept, its lease renewed.
        world.wait_until_kept().await;
    }
    // A history that is not linearizable is the deeper failure, so it is judged first.
    let checked = match check_history(&world) {
        Ok(checked) => checked,
        Err(message) => return Err(fail_as_invariant(&env, LINEARIZABILITY, message).await),
    };
    if let Err(message) = world.check_liveness() {
        return Err(fail_as_invariant(&env, LIVENESS, message).await);
    }
    Ok(checked)
}

/// Fails the run as a violation of `invariant`, reported by the simulator like any other
/// (with its step, time and the `DST_SEED` banner), for a check made once at the end of the
/// run rather than after every step: the check is registered and fails at the next step.
/// Returns the message, should the run go on regardless.
async fn fail_as_invariant(env: &SimEnv, invariant: &'static str, message: String) -> String {
    let reported = message.clone();
    env.add_invariant(invariant, move || Err(reported.clone()));
    env.yield_now().await;
    message
}

/// The liveness bound of a run and what it is made of (see the [module docs](self)). Local
/// durations are given on the node's clock; [`total_ms`](Self::total_ms) is on global time,
/// from healing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LivenessBound {
    /// `L`: the lease duration (on etcd, how long a lease nobody renews keeps its actor: the
    /// lease duration, the session's TTL and a pass of etcd's revoke loop).
    pub lease_duration_ms: u64,
    /// The longest a node's belief from a single grant lasts, on its clock: the configured
    /// lease duration (a belief ends short of it), on etcd too, whose `L` is longer.
    pub belief_duration_ms_max: u64,
    /// `retry`: the keeper's retry interval (local).
    pub retry_interval_ms: u64,
    /// `think`: the longest pause between two sweeps of a node's app loop (local).
    pub think_time_ms_max: u64,
    /// `timeout`: how long a node waits for the store's reply (local).
    pub request_timeout_ms: u64,
    /// The bound on each node's clock drift, in parts per million.
    pub clock_drift_ppm_max: u64,
    /// `net`: the run's longest one-way network latency, before faults.
    pub network_latency_ms_max: u64,
    /// `store`: the run's longest store operation, before faults.
    pub storage_latency_ms_max: u64,
    /// `V`: the most requests one sweep of a node can make ([`sweep_requests_max`]).
    pub sweep_requests_max: u64,
}

/// The most requests one liveness sweep of a node can make: one per actor it wants
/// (`wanted`), one per actor it believes it holds at healing without wanting it
/// (`unwanted_held`), and one for the visit in progress at healing.
pub fn sweep_requests_max(wanted: u64, unwanted_held: u64) -> u64 {
    wanted + unwanted_held + 1
}

/// The liveness bound of a run of `config` and `settings` on `sim`'s latencies, on etcd or
/// on the lease store, where one sweep of a node makes at most `requests_max` requests
/// ([`sweep_requests_max`]).
pub(crate) fn liveness_bound(
    config: &ClusterConfig,
    settings: &SwarmSettings,
    sim: &SimConfig,
    on_etcd: bool,
    requests_max: u64,
) -> Result<LivenessBound, String> {
    let timing = keeper_config(config, settings)
        .timing_for(config.lease_duration_ms)
        .map_err(|e| e.to_string())?;
    // On etcd, a lease nobody renews keeps its actor until its node deletes it as abandoned
    // (at the node's first grant a lease duration after its last renewal) or its session
    // expires: at most a lease duration plus the session's TTL (whole seconds, at least
    // etcd's minimum) plus one pass of etcd's revoke loop. An acquire costs up to two round
    // trips more (a session grant, and a keepalive beside the transaction).
    let (held_ms, requests_max) = if on_etcd {
        let ttl_s = config.lease_duration_ms.div_ceil(1_000);
        let ttl_s = ttl_s.max(ETCD_MIN_TTL_S.unsigned_abs());
        let held_ms = config.lease_duration_ms + ttl_s * 1_000 + ETCD_EXPIRY_CHECK_INTERVAL_MS;
        (held_ms, requests_max * 3)
    } else {
        (config.lease_duration_ms, requests_max)
    };
    Ok(LivenessBound {
        lease_duration_ms: held_ms,
        belief_duration_ms_max: config.lease_duration_ms,
        retry_interval_ms: timing.retry_interval_ms,
        think_time_ms_max: settings.think_time_ms_max,
        request_timeout_ms: settings.request_timeout_ms,
        clock_drift_ppm_max: config.clock_drift_ppm_max,
        network_latency_ms_max: sim.network_latency_ms_max,
        storage_latency_ms_max: sim.storage_latency_ms_max,
        sweep_requests_max: requests_max,
    })
}

impl LivenessBound {
    /// `x'`: the longest global time a local duration `x` takes on a node's clock.
    pub fn slowest_ms(&self, local_ms: u64) -> u64 {
        let ppm = 1_000_000u128;
        let slowest_rate = ppm - u128::from(self.clock_drift_ppm_max);
        let global = (u128::from(local_ms) * ppm).div_ceil(slowest_rate) + 1;
        u64::try_from(global).unwrap_or(u64::MAX)
    }

    /// `R`: the longest request round trip once healed.
    pub fn round_trip_ms(&self) -> u64 {
        2 * self.network_latency_ms_max + self.storage_latency_ms_max
    }

    /// `D`: by healing plus this, every request sent before healing has been applied or lost
    /// and its sender has had its answer or given up.
    pub fn drain_ms(&self) -> u64 {
        (1 + kelpie_sim::NETWORK_DELAY_SPIKE_FACTOR) * self.network_latency_ms_max
            + (1 + kelpie_sim::STORAGE_LATENCY_SPIKE_FACTOR) * self.storage_latency_ms_max
            + self.slowest_ms(self.request_timeout_ms)
    }

    /// `think' + V·R`: the longest sweep of a node's app loop with the pause before it; also
    /// the longest time between the starts of two visits of one node to one actor.
    pub fn sweep_ms(&self) -> u64 {
        self.slowest_ms(self.think_time_ms_max) + self.sweep_requests_max * self.round_trip_ms()
    }

    /// `X − t0 − D`: after the drain, how long a wanted actor can be kept from its node.
    pub fn freed_ms(&self) -> u64 {
        let r = self.round_trip_ms();
        let released_or_expired = self.sweep_ms() + r + self.lease_duration_ms;
        let own_release_answered =
            self.lease_duration_ms + self.slowest_ms(self.retry_interval_ms) + 2 * r;
        released_or_expired.max(own_release_answered)
    }

    /// The bound, from healing, on global time.
    pub fn total_ms(&self) -> u64 {
        self.drain_ms() + self.freed_ms() + self.sweep_ms() + self.round_trip_ms()
    }
}

impl std::fmt::Display for LivenessBound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ms = drain {} + freed {} (lease {}, sweep {}, round trip {}, retry {}) + \
             sweep {} (think {}, {} requests of {} ms) + round trip {}",
            self.total_ms(),
            self.drain_ms(),
            self.freed_ms(),
            self.lease_duration_ms,
            self.sweep_ms(),
            self.round_trip_ms(),
            self.slowest_ms(self.retry_interval_ms),
            self.sweep_ms(),
            self.slowest_ms(self.think_time_ms_max),
            self.sweep_requests_max,
            self.round_trip_ms(),
            self.round_trip_ms(),
        )
    }
}

/// The liveness phase's record: from healing, when each wanted actor was first seen held by
/// the node that wants it, and the verdict against the [`LivenessBound`].
#[derive(Debug, Clone)]
pub struct LivenessWindow {
    heal_ms: u64,
    bound: LivenessBound,
    /// Per wanted actor, in the order wanted: the node that wants it and when it was first
    /// seen held by it.
    wanted: Vec<(ActorId, NodeId, Option<u64>)>,
    /// Per wanted actor, in the same order: since when (global) its node has held it without
    /// a break, and the token, as its node's visits saw it (only a visit acquires, and it
    /// looks first, so a visit sees every break).
    held_since: Vec<Option<(u64, FencingToken)>>,
    index: BTreeMap<ActorId, usize>,
    unheld: usize,
}

/// A wanted actor that was not held by its node within the bound, or not kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LivenessViolation {
    /// The actor.
    pub actor_id: ActorId,
    /// The node that wants it.
    pub wanter: NodeId,
    /// When it was first seen held, if ever.
    pub held_at_ms: Option<u64>,
    /// When the faults healed.
    pub heal_ms: u64,
    /// The bound it missed.
    pub bound: LivenessBound,
    /// Set if it was held in time but not kept: when the check ran, and since when (and with
    /// which token) its node had held it without a break, if it held it then.
    pub not_kept: Option<NotKept>,
}

/// An actor held in time but not kept for [`LivenessWindow::kept_ms`] by the kept deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotKept {
    /// When the check ran (global).
    pub checked_ms: u64,
    /// Since when its node held it without a break, and the token, if it held it then.
    pub held_since: Option<(u64, FencingToken)>,
    /// How long it had to be held without a break.
    pub kept_ms: u64,
}

impl std::fmt::Display for LivenessViolation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let deadline_ms = self.heal_ms + self.bound.total_ms();
        let held = match self.held_at_ms {
            Some(at_ms) => format!("first held at {at_ms} ms"),
            None => "never held".to_string(),
        };
        if let Some(not_kept) = &self.not_kept {
            let since = match not_kept.held_since {
                Some((since_ms, token)) => {
                    format!("held since {since_ms} ms with token {}", token.0)
                }
                None => "not held".to_string(),
            };
            return write!(
                f,
                "liveness violation: {}, wanted by {}, was held ({held}) but not kept: at {} \
                 ms it was {since}, short of {} ms without a break, which no single grant's \
                 belief lasts (healing at {} ms, deadline {deadline_ms} ms; bound {})",
                self.actor_id,
                self.wanter,
                not_kept.checked_ms,
                not_kept.kept_ms,
                self.heal_ms,
                self.bound
            );
        }
        write!(
            f,
            "liveness violation: {}, wanted by {}, was not held by it within the liveness \
             bound of healing at {} ms (deadline {deadline_ms} ms; {held}); bound {}",
            self.actor_id, self.wanter, self.heal_ms, self.bound
        )
    }
}

impl LivenessWindow {
    /// A window opening at `heal_ms` (global), judged against `bound`.
    pub fn new(heal_ms: u64, bound: LivenessBound) -> Self {
        Self {
            heal_ms,
            bound,
            wanted: Vec::new(),
            held_since: Vec::new(),
            index: BTreeMap::new(),
            unheld: 0,
        }
    }

    /// `actor_id` must be held by `wanter`.
    pub fn want(&mut self, actor_id: ActorId, wanter: NodeId) {
        if self.index.contains_key(&actor_id) {
            return;
        }
        self.index.insert(actor_id.clone(), self.wanted.len());
        self.wanted.push((actor_id, wanter, None));
        self.held_since.push(None);
        self.unheld += 1;
    }

    /// Its node was seen holding `actor_id` with `token` at `at_ms` (global). The first time
    /// counts for the deadline; a new token starts a new stretch held without a break.
    pub fn held(&mut self, actor_id: &ActorId, at_ms: u64, token: FencingToken) {
        let Some(&index) = self.index.get(actor_id) else {
            return;
        };
        let at_ms = at_ms.max(self.heal_ms);
        let held_at_ms = &mut self.wanted[index].2;
        if held_at_ms.is_none() {
            *held_at_ms = Some(at_ms);
            self.unheld -= 1;
        }
        let since = &mut self.held_since[index];
        if since.is_none_or(|(_, held_token)| held_token != token) {
            *since = Some((at_ms, token));
        }
    }

    /// Its node was seen not holding `actor_id`: the stretch held without a break ends.
    pub fn unheld(&mut self, actor_id: &ActorId) {
        if let Some(&index) = self.index.get(actor_id) {
            self.held_since[index] = None;
        }
    }

    /// How long each wanted actor must then be held without a break: longer than any belief
    /// a single grant gives lasts on any node's clock ([`LivenessBound::slowest_ms`] of
    /// [`LivenessBound::belief_duration_ms_max`] in global time), so only a lease its node
    /// renewed passes. Not the bound's `L`, which on etcd is several times longer: a stretch
    /// of that many renewals without a break is not what liveness promises. Held once is not enough: a keeper that never renews, an app that
    /// lets go of what it just acquired, a store that answers nothing after healing all get
    /// every actor held for a moment.
    pub fn kept_ms(&self) -> u64 {
        self.bound.slowest_ms(self.bound.belief_duration_ms_max)
    }

    /// The last instant (global) by which every wanted actor must have been held without a
    /// break for [`kept_ms`](Self::kept_ms): after the deadline for holding it at all, the
    /// time to keep it.
    pub fn kept_deadline_ms(&self) -> u64 {
        self.deadline_ms() + self.kept_ms()
    }

    /// When every wanted actor held without a break now will have been held for
    /// [`kept_ms`](Self::kept_ms); `None` while some is not held.
    pub fn kept_at_ms(&self) -> Option<u64> {
        let kept_ms = self.kept_ms();
        self.held_since.iter().try_fold(0, |latest_ms, since| {
            since.map(|(since_ms, _)| latest_ms.max(since_ms + kept_ms))
        })
    }

    /// The first wanted actor (in the order wanted) that at `now_ms` has not been held by its
    /// node without a break for [`kept_ms`](Self::kept_ms), with the token its node holds now
    /// (`holds`), if any.
    pub fn check_kept(
        &self,
        now_ms: u64,
        holds: impl Fn(&ActorId) -> Option<FencingToken>,
    ) -> Result<(), Box<LivenessViolation>> {
        let kept_ms = self.kept_ms();
        let wanted = self.wanted.iter().zip(&self.held_since);
        for ((actor_id, wanter, held_at_ms), since) in wanted {
            let kept = since.is_some_and(|(since_ms, token)| {
                holds(actor_id) == Some(token) && since_ms + kept_ms <= now_ms
            });
            if !kept {
                return Err(Box::new(LivenessViolation {
                    actor_id: actor_id.clone(),
                    wanter: wanter.clone(),
                    held_at_ms: *held_at_ms,
                    heal_ms: self.heal_ms,
                    bound: self.bound,
                    not_kept: Some(NotKept {
                        checked_ms: now_ms,
                        held_since: *since,
                        kept_ms,
                    }),
                }));
            }
        }
        Ok(())
    }

    /// Whether every wanted actor was held.
    pub fn all_held(&self) -> bool {
        self.unheld == 0
    }

    /// The last instant (global) at which a wanted actor may first be held.
    pub fn deadline_ms(&self) -> u64 {
        self.heal_ms + self.bound.total_ms()
    }

    /// The bound.
    pub fn bound(&self) -> LivenessBound {
        self.bound
    }

    /// The first wanted actor (in the order wanted) not held by the deadline, if any.
    pub fn check(&self) -> Result<(), Box<LivenessViolation>> {
        let deadline_ms = self.deadline_ms();
        let late = self
            .wanted
            .iter()
            .find(|(_, _, held)| held.is_none_or(|at_ms| at_ms > deadline_ms));
        match late {
            None => Ok(()),
            Some((actor_id, wanter, held_at_ms)) => Err(Box::new(LivenessViolation {
                actor_id: actor_id.clone(),
                wanter: wanter.clone(),
                held_at_ms: *held_at_ms,
                heal_ms: self.heal_ms,
                bound: self.bound,
                not_kept: None,
            })),
        }
    }
}

impl SwarmWorld {
    /// A world on `cluster`'s store, set up as `scenario` says (its nodes, actors, timing and
    /// deliberate bugs; `scenario.app_loop` off to drive the keepers by hand): the store host
    /// serves leases; no node runs yet.
    pub fn new(env: &SimEnv, cluster: SimLeaseCluster, scenario: LeaseScenario) -> Rc<Self> {
        let (config, settings) = (scenario.cluster, scenario.swarm_settings());
        let network = SimNetwork::new(env, settings.nodes_count + 1);
        let (server_env, server_network, store) =
            (env.clone(), network.clone(), cluster.store().clone());
        if cluster.etcd().is_none()
            && settings.check_linearizability
            && settings.linearize_from_store_log
        {
            // The store logs what it applied; the linearizability check reads that as a
            // proposed linearization, and verifies it.
            store.log_effects();
        }
        if let Some(etcd) = cluster.etcd() {
            let etcd = match settings.bug_stale_reads {
                true => etcd.clone().with_stale_reads(),
                false => etcd.clone(),
            };
            drop(env.spawn(serve_etcd(server_env, server_network, etcd)));
        } else if settings.bug_stale_reads {
            serve_leases_with_stale_reads(&server_env, &server_network, store);
        } else {
            serve_leases(&server_network, store);
        }
        let actors: Vec<ActorId> = (0..settings.actors_count)
            .map(|i| ActorId::new(format!("actor-{i}")).expect("valid actor id"))
            .collect();
        let actor_indices = (actors.iter().cloned()).zip(0..).collect();
        let world = Rc::new(SwarmWorld {
            env: env.clone(),
            cluster,
            config,
            settings,
            network,
            actors,
            actor_indices,
            phase: Cell::new(Phase::Safety),
            nodes: RefCell::new(Vec::new()),
            liveness: RefCell::new(None),
            all_held: RefCell::new(None),
            history: History::new(),
            etcd_history: EtcdHistory::default(),
        });
        let nodes = (0..settings.nodes_count)
            .map(|i| Rc::new(new_node(&world, i)))
            .collect();
        *world.nodes.borrow_mut() = nodes;
        world
    }

    fn node(&self, index: usize) -> Rc<SwarmNode> {
        Rc::clone(&self.nodes.borrow()[index])
    }

    fn all_nodes(&self) -> Vec<Rc<SwarmNode>> {
        self.nodes.borrow().clone()
    }

    /// Starts every node.
    pub fn start_all(self: &Rc<Self>) -> Result<(), String> {
        self.all_nodes()
            .iter()
            .try_for_each(|node| node.start(self))
    }

    /// Starts (or restarts) node `index` with empty memory.
    pub fn start_node(self: &Rc<Self>, index: usize) -> Result<(), String> {
        self.node(index).start(self)
    }

    /// Crashes node `index`, counting a [`FaultType::NodeCrash`].
    pub fn crash_node(&self, index: usize) {
        self.env.record_fault(FaultType::NodeCrash);
        self.node(index).crash(self);
        log_fault(self, format!("crash {}", self.node(index).node_id));
    }

    /// Node `index`'s keeper, if it is up.
    pub fn keeper(&self, index: usize) -> Option<Arc<Keeper>> {
        self.node(index).keeper.borrow().clone()
    }

    /// Node `index`'s lease manager (the one its keeper uses), if it is up.
    pub fn manager(&self, index: usize) -> Option<Arc<NetLeaseManager>> {
        self.node(index).manager.borrow().clone()
    }

    /// Starts the chaos task: partitions, crashes and restarts, clock jumps and store crashes,
    /// each as often as the seed's fault mix says, until it is aborted.
    pub fn spawn_chaos(self: &Rc<Self>) -> JoinHandle<()> {
        self.env.spawn(chaos_loop(Rc::clone(self)))
    }

    /// The phase the run is in: [`Phase::Liveness`] once [`heal`](Self::heal) was called.
    pub fn phase(&self) -> Phase {
        self.phase.get()
    }

    /// Every lease operation the nodes made so far, as they saw it.
    pub fn history(&self) -> &History {
        &self.history
    }

    /// Checks that the history so far is linearizable against the lease store's sequential
    /// model. A request may have reached the store twice only if the run's fault mix includes
    /// network duplication, and it took effect, if at all, within the longest network delivery
    /// plus the longest storage request latency of its invocation (both asserted where they
    /// are drawn). The error names the actor and lists the smallest offending window.
    pub fn check_linearizability(&self) -> Result<LinearizabilityReport, String> {
        if self.cluster.etcd().is_some() {
            // The etcd backend's lease operations are not atomic at the lease level; what
            // must be linearizable is etcd's own history (see `crate::etcd_history`).
            let report = check_etcd_history(&self.etcd_history.ops())?;
            return Ok(LinearizabilityReport {
                actors_checked: 0,
                operations_checked: report.answered as usize,
                unknown_operations: report.unanswered as usize,
                states_explored: report.key_states,
                actors_linearized_by_store_log: 0,
            });
        }
        let delivery = Delivery {
            duplicates: Duplicates::possible_if(
                self.env
                    .fault_probability(FaultType::NetworkDuplicate)
                    .is_some(),
            ),
            effect_within_ms: Some(
                self.network.delivery_ms_max()
                    + self.cluster.store().storage().request_latency_ms_max(),
            ),
        };
        let store = self.cluster.store();
        self.history
            .with_ops(|ops| {
                store.with_effects(|effects| match effects {
                    Some(effects) => check_history_with_store_log(ops, delivery, effects),
                    None => check_history(ops, delivery),
                })
            })
            .map_err(|error| error.to_string())
    }

    /// The next event node `index`'s keeper sent its owner, if any.
    pub fn next_keeper_event(&self, index: usize) -> Option<KeeperEvent> {
        self.node(index).lost.borrow_mut().as_mut()?.try_recv().ok()
    }

    /// Node `index`'s current holder id: its name and incarnation (`node-0@1`), the identity
    /// the store knows its leases under.
    pub fn node_id(&self, index: usize) -> NodeId {
        self.node(index).holder_id.borrow().clone()
    }

    /// Node `index`'s clock.
    pub fn clock(&self, index: usize) -> SimClock {
        self.node(index).clock.clone()
    }

    /// Node `index`'s network host.
    pub fn host(&self, index: usize) -> HostId {
        self.node(index).host()
    }

    /// The network.
    pub fn network(&self) -> &SimNetwork<LeaseMessage> {
        &self.network
    }

    /// The store's record of `actor_id` now (ground truth).
    pub fn truth(&self, actor_id: &ActorId) -> Option<kelpie_lease::backend::LeaseRecord> {
        self.cluster.truth(actor_id)
    }

    /// The actors.
    pub fn actors(&self) -> &[ActorId] {
        &self.actors
    }

    /// Ends every fault: heals the network, restarts the store and every crashed node.
    pub fn heal(self: &Rc<Self>) -> Result<(), String> {
        self.env.set_faults_enabled(false);
        self.network.heal();
        match self.settings.bug_store_dies_at_heal {
            true => self.cluster.store().storage().crash(),
            false => self.cluster.store().storage().restart(),
        }
        if let Some(etcd) = self.cluster.etcd() {
            etcd.end_election();
        }
        self.phase.set(Phase::Liveness);
        log_fault(self, "heal all".into());
        for node in self.all_nodes().iter().filter(|n| !n.is_up()) {
            node.start(self)?;
        }
        Ok(())
    }

    /// Opens the liveness window at healing: computes the bound from the settings, the run's
    /// latencies and what each node believes now, and records the wanted actors already held.
    /// The receiver is told once every wanted actor was held.
    fn open_liveness_window(&self) -> Result<oneshot::Receiver<()>, String> {
        let nodes = self.all_nodes();
        let wanter_of: BTreeMap<&ActorId, usize> = (self.actors.iter().enumerate())
            .map(|(index, actor_id)| (actor_id, wanter(index, nodes.len())))
            .collect();
        let mut requests_max = 0;
        for node in &nodes {
            let wanted = (0..self.actors.len())
                .filter(|&i| wanter(i, nodes.len()) == node.index)
                .count() as u64;
            let keeper = node.keeper.borrow();
            let beliefs = keeper.as_ref().map(|k| k.beliefs()).unwrap_or_default();
            let unwanted_held = beliefs
                .iter()
                .filter(|(actor_id, _)| wanter_of.get(actor_id) != Some(&node.index))
                .count() as u64;
            requests_max = requests_max.max(sweep_requests_max(wanted, unwanted_held));
        }
        let on_etcd = self.cluster.etcd().is_some();
        let bound = liveness_bound(
            &self.config,
            &self.settings,
            self.env.config(),
            on_etcd,
            requests_max,
        )?;
        let now_ms = self.env.now_ms();
        let mut window = LivenessWindow::new(now_ms, bound);
        for (index, actor_id) in self.actors.iter().enumerate() {
            let node = &nodes[wanter(index, nodes.len())];
            window.want(actor_id.clone(), node.holder_id.borrow().clone());
            let keeper = node.keeper.borrow();
            if let Some(token) = keeper.as_ref().and_then(|k| k.holds(actor_id)) {
                window.held(actor_id, now_ms, token);
            }
        }
        let (sender, receiver) = oneshot::channel();
        *self.all_held.borrow_mut() = Some(sender);
        *self.liveness.borrow_mut() = Some(window);
        self.notify_if_all_held();
        Ok(receiver)
    }

    /// The liveness deadline (global), once the window is open.
    fn liveness_deadline_ms(&self) -> u64 {
        let window = self.liveness.borrow();
        window.as_ref().map_or(0, LivenessWindow::deadline_ms)
    }

    /// The node that wants `actor_id` holds it now with `token` (once the liveness window is
    /// open).
    fn seen_held(&self, actor_id: &ActorId, token: FencingToken) {
        if let Some(window) = self.liveness.borrow_mut().as_mut() {
            window.held(actor_id, self.env.now_ms(), token);
        }
        self.notify_if_all_held();
    }

    /// The node that wants `actor_id` does not hold it now.
    fn seen_unheld(&self, actor_id: &ActorId) {
        if let Some(window) = self.liveness.borrow_mut().as_mut() {
            window.unheld(actor_id);
        }
    }

    /// Waits, once every wanted actor was held, until each has been held by its node without
    /// a break for the window's [`kept_ms`](LivenessWindow::kept_ms), or the kept deadline.
    async fn wait_until_kept(&self) {
        loop {
            let (kept_at_ms, kept_deadline_ms) = {
                let window = self.liveness.borrow();
                let Some(window) = window.as_ref() else {
                    return;
                };
                (window.kept_at_ms(), window.kept_deadline_ms())
            };
            let now_ms = self.env.now_ms();
            let until_ms = kept_at_ms.unwrap_or(kept_deadline_ms).min(kept_deadline_ms);
            if until_ms <= now_ms && (self.all_kept(now_ms) || now_ms >= kept_deadline_ms) {
                return;
            }
            // A break seen meanwhile moves the instant on; past it, look again a little later.
            let wait_ms = until_ms.saturating_sub(now_ms).max(1);
            self.env.sleep(Duration::from_millis(wait_ms)).await;
        }
    }

    /// Whether every wanted actor has been held by its node without a break for the window's
    /// [`kept_ms`](LivenessWindow::kept_ms) at `now_ms`.
    fn all_kept(&self, now_ms: u64) -> bool {
        let window = self.liveness.borrow();
        window
            .as_ref()
            .is_some_and(|w| w.check_kept(now_ms, |a| self.wanter_holds(a)).is_ok())
    }

    /// The token of the lease on `actor_id` its wanter holds now, if any.
    fn wanter_holds(&self, actor_id: &ActorId) -> Option<FencingToken> {
        let index = *self.actor_indices.get(actor_id)?;
        let nodes = self.all_nodes();
        let node = &nodes[wanter(index, nodes.len())];
        let keeper = node.keeper.borrow();
        keeper.as_ref().and_then(|k| k.holds(actor_id))
    }

    fn notify_if_all_held(&self) {
        let done = self
            .liveness
            .borrow()
            .as_ref()
            .is_some_and(LivenessWindow::all_held);
        if let Some(sender) = done.then(|| self.all_held.borrow_mut().take()).flatten() {
            let _ = sender.send(());
        }
    }

    /// Every wanted actor must have been held by the node that wants it within the liveness
    /// bound of healing.
    fn check_liveness(&self) -> Result<(), String> {
        let window = self.liveness.borrow();
        let Some(window) = window.as_ref() else {
            return Ok(());
        };
        let now_ms = self.env.now_ms();
        let checked = window
            .check()
            .and_then(|()| window.check_kept(now_ms, |actor_id| self.wanter_holds(actor_id)));
        checked.map_err(|violation| {
            let record = self.cluster.truth(&violation.actor_id);
            format!("{violation}; the store has {record:?}")
        })
    }
}

fn new_node(world: &SwarmWorld, index: usize) -> SwarmNode {
    let mut rng = world.env.rng(&format!("swarm/node-clock-{index}"));
    let bound = i64::try_from(world.config.clock_drift_ppm_max).expect("drift bound is small");
    // Half the nodes sit exactly at a drift bound, slow or fast: the edges are where bugs live.
    let drift_ppm = match index % 4 {
        0 => -bound,
        1 => bound,
        _ => rng.gen_range(-bound..=bound),
    };
    let offset_ms = rng.gen_range(0..1_000_000u64);
    SwarmNode {
        index,
        node_id: NodeId::new(format!("node-{index}")).expect("valid"),
        clock: world.env.node_clock(offset_ms, drift_ppm),
        incarnation: Cell::new(0),
        holder_id: RefCell::new(NodeId::new(format!("node-{index}@0")).expect("valid")),
        keeper: RefCell::new(None),
        manager: RefCell::new(None),
        lost: RefCell::new(None),
        tasks: RefCell::new(Vec::new()),
    }
}

/// The node that wants `actor` in the liveness phase.
fn wanter(actor_index: usize, nodes_count: usize) -> usize {
    actor_index % nodes_count
}

async fn app_loop(world: Rc<SwarmWorld>, node: Rc<SwarmNode>, keeper: Arc<Keeper>) {
    let mut rng = world.env.rng(&format!(
        "swarm/app-{}-{}",
        node.index,
        node.incarnation.get()
    ));
    loop {
        // The app acts on the keeper's beliefs; its events are read and dropped, as an app's
        // event loop would, so a long run does not queue every renewal's event.
        if let Some(events) = node.lost.borrow_mut().as_mut() {
            events.drain().for_each(drop);
        }
        match world.phase.get() {
            Phase::Safety => visit_random(&world, &keeper, &mut rng).await,
            Phase::Liveness => visit_wanted(&world, &node, &keeper).await,
        }
        let think_ms = rng.between(1, world.settings.think_time_ms_max);
        node.clock
            .sleep_local(Duration::from_millis(think_ms))
            .await;
    }
}

async fn visit_random(world: &SwarmWorld, keeper: &Keeper, rng: &mut DeterministicRng) {
    let actor_id = &world.actors[rng.choose_index(world.actors.len())];
    if keeper.holds(actor_id).is_some() {
        if rng.gen_bool(RELEASE_PROBABILITY) {
            let result = keeper.release(actor_id).await;
            count_failure(&world.cluster, result.map(|_| ()));
        }
        return;
    }
    let result = keeper.acquire(actor_id).await;
    let held_by_other = matches!(result, Err(LeaseError::HeldByOther { .. }));
    count_failure(&world.cluster, result.map(|_| ()));
    // On etcd, a contender sometimes waits for the holder to let go by watching the key, as
    // a campaign does, and acquires the moment it is deleted.
    if held_by_other && world.cluster.etcd().is_some() && rng.gen_bool(WATCH_PROBABILITY) {
        let max_wait_ms = world.config.lease_duration_ms;
        let freed = keeper
            .manager()
            .watch_until_free(actor_id, max_wait_ms)
            .await;
        if let Ok(Some(true)) = freed {
            let result = keeper.acquire(actor_id).await;
            count_failure(&world.cluster, result.map(|_| ()));
        }
    }
}

/// One liveness sweep of `node`: in actor order, acquires each actor it wants and does not
/// hold, releases each it holds and does not want. Only the actors it wants or believed at the
/// start of the sweep can need a request: in this phase a node never acquires an actor it does
/// not want, so one it did not believe then is not believed when its turn comes. Visiting just
/// those makes the same requests at the same moments as visiting every actor, without a look
/// at each of the world's actors per node per sweep (with 10,000 actors on 50 nodes that was
/// most of the liveness phase's cost).
async fn visit_wanted(world: &SwarmWorld, node: &SwarmNode, keeper: &Keeper) {
    let nodes_count = world.settings.nodes_count;
    let wanted_indices = (node.index..world.actors.len()).step_by(nodes_count);
    let believed = keeper.beliefs();
    let believed_indices = believed
        .iter()
        .filter_map(|(actor_id, _)| world.actor_indices.get(actor_id).copied());
    let mut visits: Vec<usize> = wanted_indices.chain(believed_indices).collect();
    visits.sort_unstable();
    visits.dedup();
    for index in visits {
        let actor_id = &world.actors[index];
        let wanted = wanter(index, nodes_count) == node.index;
        let held = keeper.holds(actor_id).is_some();
        if wanted {
            let idle = world.settings.bug_node_never_acquires && node.index == 0;
            if !held {
                world.seen_unheld(actor_id);
            }
            if !held && !idle {
                let result = keeper.acquire(actor_id).await;
                let granted = result.is_ok();
                count_failure(&world.cluster, result.map(|_| ()));
                if world.settings.bug_app_lets_go && granted {
                    let result = keeper.release(actor_id).await;
                    let released = result.as_ref().ok().map(|lease| lease.fencing_token);
                    count_failure(&world.cluster, result.map(|_| ()));
                    // Seen held for the moment between the two, as a check of "held once"
                    // would see it.
                    if let Some(token) = released {
                        world.seen_held(actor_id, token);
                    }
                }
            }
            // Held when the visit ends, whether it was already (say, acquired by the visit in
            // progress at healing) or the acquire just made it so.
            if let Some(token) = keeper.holds(actor_id) {
                world.seen_held(actor_id, token);
            }
        } else if held {
            let result = keeper.release(actor_id).await;
            count_failure(&world.cluster, result.map(|_| ()));
        }
    }
}

/// Counts a store failure seen by a node on etcd, whose grants and refusals are counted from
/// its decisions, where the keeper's renewals show up too. The lease store counts every
/// request it answers by its outcome, failures included, so that a decision whose write
/// failed is counted once, as a failure.
fn count_failure(cluster: &SimLeaseCluster, result: Result<(), LeaseError>) {
    if cluster.etcd().is_some() {
        if let Err(LeaseError::Store(_)) = result {
            cluster.count(|c| c.store_failed += 1);
        }
    }
}

async fn chaos_loop(world: Rc<SwarmWorld>) {
    let nodes = world.all_nodes();
    let mut rng = world.env.rng("swarm/chaos");
    loop {
        world.env.sleep(Duration::from_millis(CHAOS_TICK_MS)).await;
        let node = Rc::clone(&nodes[rng.choose_index(nodes.len())]);
        let window_ms =
            rng.gen_range(world.config.lease_duration_ms / 4..=world.config.lease_duration_ms * 3);
        // Each fault is counted only where it took effect: a node already down is not
        // crashed, a link already cut not cut (the draws, and so the run, are the same).
        let reachable = |from, to| world.network.is_reachable(from, to);
        if world.env.draw_fault(FaultType::PartitionTwoWay) {
            if reachable(node.host(), STORE_HOST) || reachable(STORE_HOST, node.host()) {
                world.env.count_fault(FaultType::PartitionTwoWay);
            }
            world.network.partition(&[node.host()], &[STORE_HOST]);
            spawn_heal(&world, window_ms, format!("partition {}", node.node_id));
        } else if world.env.draw_fault(FaultType::PartitionOneWay) {
            let (from, to) = if rng.gen_bool(0.5) {
                (node.host(), STORE_HOST)
            } else {
                (STORE_HOST, node.host())
            };
            if reachable(from, to) {
                world.env.count_fault(FaultType::PartitionOneWay);
            }
            world.network.partition_one_way(&[from], &[to]);
            spawn_heal(&world, window_ms, format!("partition one way {from}->{to}"));
        }
        if world.env.draw_fault(FaultType::NodeCrash) && node.is_up() {
            world.env.count_fault(FaultType::NodeCrash);
            if node
                .keeper
                .borrow()
                .as_ref()
                .is_some_and(|k| !k.beliefs().is_empty())
            {
                kelpie_core::coverage::mark(MARK_CRASH_WHILE_HOLDING);
            }
            node.crash(&world);
            log_fault(&world, format!("crash {}", node.node_id));
            let (world, node) = (Rc::clone(&world), Rc::clone(&node));
            drop(world.env.clone().spawn(async move {
                world.env.sleep(Duration::from_millis(window_ms)).await;
                if world.phase.get() == Phase::Safety && !node.is_up() {
                    log_fault(&world, format!("restart {}", node.node_id));
                    node.start(&world)
                        .expect("settings were valid at the first start");
                }
            }));
        }
        if world.env.should_inject(FaultType::ClockJump) {
            let jump_ms = rng.gen_range(1..=world.config.lease_duration_ms);
            if node
                .keeper
                .borrow()
                .as_ref()
                .is_some_and(|k| !k.beliefs().is_empty())
            {
                kelpie_core::coverage::mark(MARK_CLOCK_JUMP_WHILE_BELIEVING);
            }
            node.clock.jump_forward(jump_ms);
            world.cluster.board().clock_jumped(&node.holder_id.borrow());
            log_fault(&world, format!("clock jump {} +{jump_ms} ms", node.node_id));
        }
        if let Some(etcd) = world.cluster.etcd() {
            // `elect` counts the leader's loss itself.
            if world.env.draw_fault(FaultType::StorageCrash) {
                if etcd.holds_leases() {
                    kelpie_core::coverage::mark(MARK_STORE_CRASH_WITH_LEASES);
                }
                let election_ms = rng.gen_range(1..=SIM_ETCD_ELECTION_MS_MAX);
                etcd.elect(election_ms);
                log_fault(
                    &world,
                    format!("etcd leader lost, election {election_ms} ms"),
                );
            }
        } else if world.env.draw_fault(FaultType::StorageCrash) {
            if !world.cluster.store().storage().is_crashed() {
                world.env.count_fault(FaultType::StorageCrash);
            }
            let now_ms = world.env.now_ms();
            let truth = world.cluster.store().truth();
            if truth.values().any(|r| r.valid_holder(now_ms).is_some()) {
                kelpie_core::coverage::mark(MARK_STORE_CRASH_WITH_LEASES);
            }
            world.cluster.store().storage().crash();
            log_fault(&world, "storage crash".into());
            let down_ms = rng.gen_range(10..=world.config.lease_duration_ms / 2);
            let world = Rc::clone(&world);
            drop(world.env.clone().spawn(async move {
                world.env.sleep(Duration::from_millis(down_ms)).await;
                world.cluster.store().storage().restart();
                log_fault(&world, "storage restart".into());
            }));
        }
    }
}

fn spawn_heal(world: &Rc<SwarmWorld>, window_ms: u64, what: String) {
    log_fault(world, format!("{what} start"));
    let world = Rc::clone(world);
    drop(world.env.clone().spawn(async move {
        world.env.sleep(Duration::from_millis(window_ms)).await;
        // Heal only what the safety phase still has; the liveness phase healed everything.
        if world.phase.get() == Phase::Safety {
            world.network.heal();
            log_fault(&world, format!("{what} end"));
        }
    }));
}

fn log_fault(world: &SwarmWorld, what: String) {
    world.cluster.events().push(
        world.env.now_ms(),
        None,
        None,
        crate::LeaseEventKind::Fault { what },
    );
}
