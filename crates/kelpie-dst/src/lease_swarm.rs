//! The swarm scenario: nodes that run the production [`LeaseKeeper`] reach the store only
//! through the simulated network, while a chaos task partitions them (both ways and one way),
//! crashes and restarts them and the store, and jumps their clocks, each as often as the
//! seed's fault mix says. After the safety phase everything heals, and in the liveness phase
//! every actor a live node wants must get a holder within two lease durations. Every lease
//! operation the nodes make is recorded in a [`History`], and at the end of the run the
//! history must be linearizable against the lease store's sequential model.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use futures_channel::mpsc::UnboundedReceiver;
use kelpie_core::{ActorId, NodeId};
use kelpie_lease::{
    KeeperConfig, KeeperEvent, LeaseConfig, LeaseError, LeaseKeeper, ProtocolLeaseManager,
};

use crate::history::History;
use crate::lease_cluster::{ClusterConfig, SimLeaseCluster};
use crate::lease_net::{
    serve_leases, serve_leases_with_stale_reads, LeaseMessage, NetLeaseStore, STORE_HOST,
};
use crate::linearizability::{check_history, LinearizabilityReport};
use crate::mutations::LINEARIZABILITY;
use kelpie_sim::DeterministicRng;
use kelpie_sim::FaultType;
use kelpie_sim::SimClock;
use kelpie_sim::{HostId, SimNetwork};
use kelpie_sim::{JoinHandle, SimEnv};

/// Interval at which the chaos task draws whether each scripted fault starts.
pub const CHAOS_TICK_MS: u64 = 250;
/// Probability that a node holding a lease in the safety phase releases it on a visit.
const RELEASE_PROBABILITY: f64 = 0.1;

/// A simulated node's keeper: the production keeper over the networked store.
pub type Keeper = LeaseKeeper<ProtocolLeaseManager<NetLeaseStore>>;

/// A simulated node's lease manager: the production protocol over the networked store.
pub type NetLeaseManager = ProtocolLeaseManager<NetLeaseStore>;

/// Which phase a run is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Faults on; the checkers judge safety.
    Safety,
    /// Everything healed; every wanted actor must get a holder.
    Liveness,
}

/// Settings of the networked nodes.
#[derive(Debug, Clone, Copy)]
pub struct SwarmSettings {
    /// Nodes (hosts 1..=n; the store is host 0).
    pub nodes_count: usize,
    /// Actors.
    pub actors_count: usize,
    /// Length of the safety phase.
    pub safety_phase_ms: u64,
    /// Longest pause between two visits of a node's loop, on its clock.
    pub think_time_ms_max: u64,
    /// How long a node waits for the store's reply.
    pub request_timeout_ms: u64,
    /// Deliberately wrong keeper: belief from the reply's arrival.
    pub bug_belief_from_reply: bool,
    /// Deliberately wrong keeper: it assumes no drift, while clocks do drift.
    pub bug_no_drift_margin: bool,
    /// Whether to run the liveness phase.
    pub check_liveness: bool,
    /// Whether each node runs its own loop of acquires and releases. Targeted tests turn it
    /// off and drive the keepers themselves.
    pub app_loop: bool,
    /// Deliberately wrong store: it sometimes decides on the previous version of a record
    /// (see [`serve_leases_with_stale_reads`]).
    pub bug_stale_reads: bool,
    /// Whether the history is checked for linearizability against the production protocol.
    /// Off when a run deliberately uses another decision function: the store applies that one
    /// atomically, so checking it against the production model would only re-detect the
    /// mutation the invariant checkers are there to catch.
    pub check_linearizability: bool,
}

impl SwarmSettings {
    /// Settings for `nodes_count` nodes and `actors_count` actors with the swarm's defaults.
    pub fn new(nodes_count: usize, actors_count: usize) -> Self {
        Self {
            nodes_count,
            actors_count,
            safety_phase_ms: 20_000,
            think_time_ms_max: 250,
            request_timeout_ms: 200,
            bug_belief_from_reply: false,
            bug_no_drift_margin: false,
            check_liveness: true,
            app_loop: true,
            bug_stale_reads: false,
            check_linearizability: true,
        }
    }
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
    phase: Cell<Phase>,
    nodes: RefCell<Vec<Rc<SwarmNode>>>,
    /// Wanted actors seen held by their wanting node during the liveness window.
    liveness_satisfied: RefCell<std::collections::BTreeSet<ActorId>>,
    history: History,
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
    lost: RefCell<Option<UnboundedReceiver<KeeperEvent>>>,
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
        let truth = world.cluster.store().clone();
        let (store, router) = NetLeaseStore::connect(
            &world.env,
            world.network.clone(),
            self.host(),
            incarnation,
            self.clock.clone(),
            timeout_ms,
            truth,
        );
        store.record_history(world.history.clone());
        let lease_config =
            LeaseConfig::new(world.config.lease_duration_ms).map_err(|e| e.to_string())?;
        let manager = Arc::new(ProtocolLeaseManager::new(store, lease_config));
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
        let mut tasks = vec![router, world.env.spawn(async move { renewer.run().await })];
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
    config: ClusterConfig,
    settings: SwarmSettings,
) -> Result<LinearizabilityReport, String> {
    let world = SwarmWorld::new(&env, cluster, config, settings);
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
    // Messages sent during the faulty phase may still be in flight (a delay fault holds one
    // for up to ten times the longest latency), and requests still waiting for them time out.
    // The liveness window starts once they have drained.
    let drain_ms = env.config().network_latency_ms_max
        * (1 + kelpie_sim::NETWORK_DELAY_SPIKE_FACTOR)
        + settings.request_timeout_ms;
    env.sleep(Duration::from_millis(drain_ms)).await;
    let heal_ms = env.now_ms();
    let watcher = env.spawn(watch_wanted(Rc::clone(&world)));
    env.sleep(Duration::from_millis(2 * config.lease_duration_ms))
        .await;
    watcher.abort();
    // A history that is not linearizable is the deeper failure, so it is judged first.
    let checked = match check_history(&world) {
        Ok(checked) => checked,
        Err(message) => return Err(fail_as_invariant(&env, LINEARIZABILITY, message).await),
    };
    world.check_liveness(heal_ms)?;
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

impl SwarmWorld {
    /// A world on `cluster`'s store: the store host serves leases; no node runs yet.
    pub fn new(
        env: &SimEnv,
        cluster: SimLeaseCluster,
        config: ClusterConfig,
        settings: SwarmSettings,
    ) -> Rc<Self> {
        let network = SimNetwork::new(env, settings.nodes_count + 1);
        let (server_env, server_network, store) =
            (env.clone(), network.clone(), cluster.store().clone());
        if settings.bug_stale_reads {
            drop(env.spawn(serve_leases_with_stale_reads(
                server_env,
                server_network,
                store,
            )));
        } else {
            drop(env.spawn(serve_leases(server_env, server_network, store)));
        }
        let actors = (0..settings.actors_count)
            .map(|i| ActorId::new(format!("actor-{i}")).expect("valid actor id"))
            .collect();
        let world = Rc::new(SwarmWorld {
            env: env.clone(),
            cluster,
            config,
            settings,
            network,
            actors,
            phase: Cell::new(Phase::Safety),
            nodes: RefCell::new(Vec::new()),
            liveness_satisfied: RefCell::new(std::collections::BTreeSet::new()),
            history: History::new(),
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
    /// model. The error names the actor and lists the smallest offending window.
    pub fn check_linearizability(&self) -> Result<LinearizabilityReport, String> {
        self.history
            .with_ops(check_history)
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
    pub fn truth(&self, actor_id: &ActorId) -> Option<kelpie_lease::LeaseRecord> {
        self.cluster.store().peek(actor_id)
    }

    /// The actors.
    pub fn actors(&self) -> &[ActorId] {
        &self.actors
    }

    /// Ends every fault: heals the network, restarts the store and every crashed node.
    pub fn heal(self: &Rc<Self>) -> Result<(), String> {
        self.env.set_faults_enabled(false);
        self.network.heal();
        self.cluster.store().storage().restart();
        self.phase.set(Phase::Liveness);
        log_fault(self, "heal all".into());
        for node in self.all_nodes().iter().filter(|n| !n.is_up()) {
            node.start(self)?;
        }
        Ok(())
    }

    /// Every wanted actor must have been held by the node that wants it at some instant of
    /// the liveness window ([`watch_wanted`] samples it).
    fn check_liveness(&self, heal_ms: u64) -> Result<(), String> {
        let nodes = self.all_nodes();
        let satisfied = self.liveness_satisfied.borrow();
        for (index, actor_id) in self.actors.iter().enumerate() {
            let node = &nodes[wanter(index, nodes.len())];
            if !satisfied.contains(actor_id) {
                let record = self.cluster.store().peek(actor_id);
                return Err(format!(
                    "liveness violation: {actor_id}, wanted by {}, got no holder within {} ms \
                     (two lease durations) from {heal_ms} ms, after healing and draining the \
                     faulty phase's messages; the store has {record:?}",
                    node.node_id,
                    self.env.now_ms() - heal_ms
                ));
            }
        }
        Ok(())
    }
}

/// Samples, through the liveness window, which wanted actors their wanting node holds, every
/// twentieth of a lease (a held lease lasts far longer than that).
async fn watch_wanted(world: Rc<SwarmWorld>) {
    let interval_ms = (world.config.lease_duration_ms / 20).max(1);
    loop {
        let nodes = world.all_nodes();
        for (index, actor_id) in world.actors.iter().enumerate() {
            let node = &nodes[wanter(index, nodes.len())];
            let keeper = node.keeper.borrow();
            if keeper.as_ref().and_then(|k| k.holds(actor_id)).is_some() {
                world
                    .liveness_satisfied
                    .borrow_mut()
                    .insert(actor_id.clone());
            }
        }
        world.env.sleep(Duration::from_millis(interval_ms)).await;
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
        match world.phase.get() {
            Phase::Safety => visit_random(&world, &keeper, &mut rng).await,
            Phase::Liveness => visit_wanted(&world, &node, &keeper).await,
        }
        let think_ms = rng.gen_range(1..=world.settings.think_time_ms_max);
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
    count_failure(&world.cluster, result.map(|_| ()));
}

async fn visit_wanted(world: &SwarmWorld, node: &SwarmNode, keeper: &Keeper) {
    for (index, actor_id) in world.actors.iter().enumerate() {
        let wanted = wanter(index, world.settings.nodes_count) == node.index;
        let held = keeper.holds(actor_id).is_some();
        if wanted && !held {
            let result = keeper.acquire(actor_id).await;
            count_failure(&world.cluster, result.map(|_| ()));
        } else if !wanted && held {
            let result = keeper.release(actor_id).await;
            count_failure(&world.cluster, result.map(|_| ()));
        }
    }
}

/// Counts a store failure seen by a node; grants and refusals are counted from the store's
/// decisions, where the keeper's renewals show up too.
fn count_failure(cluster: &SimLeaseCluster, result: Result<(), LeaseError>) {
    if let Err(LeaseError::Store(_)) = result {
        cluster.count(|c| c.store_failed += 1);
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
        if world.env.should_inject(FaultType::PartitionTwoWay) {
            world.network.partition(&[node.host()], &[STORE_HOST]);
            spawn_heal(&world, window_ms, format!("partition {}", node.node_id));
        } else if world.env.should_inject(FaultType::PartitionOneWay) {
            let (from, to) = if rng.gen_bool(0.5) {
                (node.host(), STORE_HOST)
            } else {
                (STORE_HOST, node.host())
            };
            world.network.partition_one_way(&[from], &[to]);
            spawn_heal(&world, window_ms, format!("partition one way {from}->{to}"));
        }
        if world.env.should_inject(FaultType::NodeCrash) && node.is_up() {
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
            node.clock.jump_forward(jump_ms);
            world.cluster.board().clock_jumped(&node.holder_id.borrow());
            log_fault(&world, format!("clock jump {} +{jump_ms} ms", node.node_id));
        }
        if world.env.should_inject(FaultType::StorageCrash) {
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
