//! Placement end to end under faults: many networked nodes activate, use and deactivate the
//! same few actors through [`KeeperPlacement`] on production keepers, and write the actors' state
//! through a fenced state store, while the swarm's chaos partitions them (both ways and one
//! way), crashes and restarts them, jumps their clocks and crashes the lease store, and the
//! seed's fault mix fails and delays storage and messages. Then everything heals.
//!
//! A node activates an actor by acquiring its lease and then fencing the state store with its
//! token; it writes only while `active_token` says it is active, and every write travels to
//! the state store on its own, with a delay drawn on the node's clock (before healing,
//! sometimes long), while the node goes on: that delay is how a node that lost its lease ends
//! up writing late.
//! Judged, per seed:
//!
//! - at no simulated instant are two nodes active on the same actor: after every step, every
//!   actor a placement says is active is held by that node at the store, with that token,
//!   unexpired; and the activity intervals (from each keeper's belief, ending at the global
//!   instant the belief ends) of two nodes on one actor never overlap;
//! - the state store accepted tokens in non-decreasing order per actor;
//! - every activation read the actor's state as the last write accepted before its fence left
//!   it (the successor continues from its predecessor's last word);
//! - every write by a node that had lost its lease to a node that then activated the actor
//!   (fenced the store) was rejected, no other write was, and no write of the lease's current
//!   holder was. A late write that lands before any successor activated is accepted: the
//!   store orders it before the successor's activation, which reads it;
//! - after healing every actor is active on the node that wants it, and the store agrees;
//! - the lease history is linearizable.
//!
//! `DST_SEEDS=<n>` sets how many seeds run (default [`SEEDS_DEFAULT`]); `DST_SEED=<n>` runs
//! exactly one. `--nocapture` prints the figures.
//!
//! Three deliberately broken variants show the checks failing: a placement whose activation
//! outlives the lease (caught by SingleActivation), a state store that accepts a stale token
//! (caught by the fencing check of the state operations) and a state store whose activation
//! reads come from a replica one write behind (caught by the activation-read check).

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use kelpie_core::{ActorId, FencingToken, NodeId};
use kelpie_dst::lease_swarm::Phase;
use kelpie_dst::{
    swarm_faults, Keeper, LeaseScenario, NetLeaseManager, SimLeaseCluster, SwarmWorld,
    SWARM_LEASE_FAULTS,
};
use kelpie_lease::{
    FencedState, FencedStateStore, KeeperEvent, KeeperPlacement, Location, MemoryFencedStateStore,
    StateError,
};
use kelpie_sim::{DeterministicRng, FaultType, SimConfig, SimEnv, SimError, SimReport, Simulation};

/// Seeds run when `DST_SEEDS` is not set.
const SEEDS_DEFAULT: u64 = 16;
/// Nodes contending.
const NODES_COUNT: usize = 5;
/// Actors they contend for: few, so that every actor changes hands often.
const ACTORS_COUNT: usize = 4;
/// Length of the phase with faults.
const SAFETY_PHASE_MS: u64 = 20_000;
/// Lease durations given to the healed world before every wanted actor must be active.
const SETTLE_LEASE_DURATIONS: u64 = 3;
/// Longest pause between two visits of a node's loop, on its clock.
const THINK_TIME_MS_MAX: u64 = 100;
/// Probability that a node deactivates an actor it is active on, on a visit.
const DEACTIVATE_PROBABILITY: f64 = 0.15;
/// Probability that a state write or fence sent before healing is held up in the network for
/// long.
const LONG_DELAY_PROBABILITY: f64 = 0.1;
/// Longest such hold-up, in lease durations.
const LONG_DELAY_LEASE_DURATIONS_MAX: u64 = 2;
/// Longest ordinary network delay of a state write, in ms.
const SHORT_DELAY_MS_MAX: u64 = 5;

type NodePlacement = KeeperPlacement<NetLeaseManager>;

/// Seeds a deliberately broken variant may survive before its check must have failed.
const MUTATION_SEEDS_MAX: u64 = 50;

/// Which deliberately broken variant a run uses, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Broken {
    /// Everything as in production.
    Nothing,
    /// The placement keeps an actor active after its lease belief ended.
    ActivationOutlivesLease,
    /// The state store accepts any token, stale ones included.
    StateStoreIgnoresTokens,
    /// The state an activation reads comes from a replica one write behind.
    StaleReplicaReads,
    /// The scenario, not the placement: state messages are still sometimes delayed by up to
    /// [`LONG_DELAY_LEASE_DURATIONS_MAX`] lease durations after healing, which breaks the
    /// scenario's own liveness bound (as it did before 99675a9).
    LongDelaysAfterHealing,
}

/// The state store a run writes to: the production fenced store, or the broken one.
enum StateStore {
    Fenced(MemoryFencedStateStore),
    /// Accepts every write and fence and remembers the last token, not the highest.
    Lax(RefCell<BTreeMap<ActorId, FencedState>>),
    /// The production store, but a fence answers with the value before the latest write, as
    /// a read from a lagging replica would.
    StaleReplica {
        store: MemoryFencedStateStore,
        previous: RefCell<BTreeMap<ActorId, Option<Vec<u8>>>>,
    },
}

impl StateStore {
    async fn write(
        &self,
        actor_id: &ActorId,
        token: FencingToken,
        value: &[u8],
    ) -> Result<(), StateError> {
        match self {
            StateStore::Fenced(store) => store.write(actor_id, token, value).await,
            StateStore::StaleReplica { store, previous } => {
                let before = futures_now(store.read(actor_id)).map_err(|e| e.to_string());
                let before = before.ok().flatten().and_then(|state| state.value);
                store.write(actor_id, token, value).await?;
                previous.borrow_mut().insert(actor_id.clone(), before);
                Ok(())
            }
            StateStore::Lax(states) => {
                let state = FencedState {
                    highest_token: token,
                    value: Some(value.to_vec()),
                };
                states.borrow_mut().insert(actor_id.clone(), state);
                Ok(())
            }
        }
    }

    /// Fences the actor's state with `token`; returns the value the activation reads.
    async fn fence(
        &self,
        actor_id: &ActorId,
        token: FencingToken,
    ) -> Result<Option<Vec<u8>>, StateError> {
        match self {
            StateStore::Fenced(store) => Ok(store.fence(actor_id, token).await?.value),
            StateStore::StaleReplica { store, previous } => {
                let fresh = store.fence(actor_id, token).await?.value;
                Ok(previous.borrow().get(actor_id).cloned().unwrap_or(fresh))
            }
            StateStore::Lax(states) => {
                let mut states = states.borrow_mut();
                let state = states.entry(actor_id.clone()).or_insert(FencedState {
                    highest_token: token,
                    value: None,
                });
                state.highest_token = token;
                Ok(state.value.clone())
            }
        }
    }

    fn highest_token(&self, actor_id: &ActorId) -> Result<Option<FencingToken>, String> {
        let state = match self {
            StateStore::Fenced(store) | StateStore::StaleReplica { store, .. } => {
                futures_now(store.read(actor_id)).map_err(|e| e.to_string())?
            }
            StateStore::Lax(states) => states.borrow().get(actor_id).cloned(),
        };
        Ok(state.map(|s| s.highest_token))
    }
}

/// A state operation as it reached the state store.
#[derive(Debug, Clone)]
struct StateOp {
    actor_id: ActorId,
    node: usize,
    token: FencingToken,
    /// An activation's fence rather than a write.
    fence: bool,
    /// A write's value, or what an accepted fence read.
    value: Option<Vec<u8>>,
    arrival_ms: u64,
    accepted: bool,
    /// Whether the lease store had the writer as holder with this token, unexpired, when the
    /// operation arrived.
    held_at_arrival: bool,
}

/// One node's activity on one actor: from the keeper's belief start to its end, on global
/// time.
#[derive(Debug, Clone, Copy)]
struct Interval {
    node: usize,
    token: FencingToken,
    start_ms: u64,
    end_ms: u64,
}

/// What each node is active on, as its keeper believes, followed after every step.
#[derive(Default)]
struct Activations {
    /// Per node: what was seen of it last.
    seen: Vec<NodeSeen>,
    /// Per actor, every interval so far (by index in `all`).
    all: Vec<(ActorId, Interval)>,
}

/// A node's keeper as last seen, and the intervals open on it.
struct NodeSeen {
    keeper: Option<Arc<Keeper>>,
    belief_epoch: u64,
    /// Per actor, the index of its open interval in [`Activations::all`].
    open: BTreeMap<ActorId, usize>,
}

/// Figures of one seed.
#[derive(Debug, Default, Clone, Copy)]
struct Figures {
    activations: u64,
    deactivations: u64,
    routed: u64,
    lost_events: u64,
    writes_accepted: u64,
    writes_rejected: u64,
    late_writes_rejected: u64,
    late_writes_accepted_before_successor: u64,
    /// Fences sent before healing that arrived after it: their nodes' loops waited for them
    /// into the settling time.
    fences_in_flight_at_healing: u64,
}

/// Shared by the nodes' loops and the checks of one run.
struct Ctx {
    env: SimEnv,
    world: Rc<SwarmWorld>,
    broken: Broken,
    state: StateStore,
    ops: RefCell<Vec<StateOp>>,
    placements: RefCell<Vec<Option<Rc<NodePlacement>>>>,
    figures: Cell<Figures>,
    write_seq: Cell<u64>,
}

impl Ctx {
    fn count(&self, update: impl FnOnce(&mut Figures)) {
        let mut figures = self.figures.get();
        update(&mut figures);
        self.figures.set(figures);
    }

    fn is_current(&self, node: usize, keeper: &Arc<Keeper>) -> bool {
        self.world
            .keeper(node)
            .is_some_and(|current| Arc::ptr_eq(&current, keeper))
    }
}

fn seeds() -> Vec<u64> {
    kelpie_sim::test_seeds(SEEDS_DEFAULT)
}

/// The node that wants `actor_index` once everything healed.
fn wanter(actor_index: usize) -> usize {
    actor_index % NODES_COUNT
}

/// Seeds on which a node's loop was still waiting for a long fence, sent before healing, when
/// the settling time began. Each fails the liveness check when long delays are still drawn
/// after healing ([`Broken::LongDelaysAfterHealing`]), when the node's next fence can hold it
/// for as long again. A change to the simulation changes every trajectory: then
/// `scan_for_fence_in_flight_at_healing_seeds` (ignored; run it with `--ignored --nocapture`)
/// prints new ones.
const FENCE_IN_FLIGHT_AT_HEALING_SEEDS: [u64; 3] = [
    13_147_362_805_967_694_994,
    3_716_625_514_623_892_260,
    11_415_927_901_575_209_783,
];

/// Regression: a fence in flight at healing holds its node's loop, so the node reaches its
/// other actors late; every wanted actor must still be active once the settling time is over.
#[test]
fn test_dst_liveness_waits_out_a_fence_in_flight_at_healing() {
    for seed in FENCE_IN_FLIGHT_AT_HEALING_SEEDS {
        let (_, figures) = run_seed(seed, Broken::Nothing).unwrap_or_else(|e| panic!("{e}"));
        let stale = "the simulation changed: pick new seeds with \
             `scan_for_fence_in_flight_at_healing_seeds`";
        assert!(
            figures.fences_in_flight_at_healing > 0,
            "seed {seed} no longer has a fence in flight at healing ({stale})"
        );
        assert!(
            fails_liveness_with_long_delays_after_healing(seed),
            "seed {seed} no longer fails liveness with long delays after healing ({stale})"
        );
    }
}

/// Whether `seed` fails the liveness check when long delays are drawn after healing too.
fn fails_liveness_with_long_delays_after_healing(seed: u64) -> bool {
    match run_seed(seed, Broken::LongDelaysAfterHealing) {
        Err(SimError::ScenarioFailed { message, .. }) => message.contains("liveness violation"),
        _ => false,
    }
}

/// Prints seeds for [`FENCE_IN_FLIGHT_AT_HEALING_SEEDS`]: ones that fail liveness with long
/// delays after healing, and pass, with a fence in flight at healing, without them. About
/// one seed in 2,400 qualifies (the three above are seeds 4,630, 5,252 and 7,082 of the scan);
/// one in 6,700 before a keeper's round travelled as one message, one in 2,500 before the
/// keeper renewed a late grant at once. This scans up to 20,000 (under two minutes in
/// release).
#[test]
#[ignore = "a seed scan, run by hand when the simulation changed"]
fn scan_for_fence_in_flight_at_healing_seeds() {
    let mut rng = DeterministicRng::new(0x5eed_2026_1204);
    let mut found = 0;
    for scanned in 1..=20_000 {
        let seed = rng.next_u64();
        if !fails_liveness_with_long_delays_after_healing(seed) {
            continue;
        }
        let (_, figures) = run_seed(seed, Broken::Nothing).unwrap_or_else(|e| panic!("{e}"));
        if figures.fences_in_flight_at_healing > 0 {
            println!("seed {seed} (seed {scanned} of the scan)");
            found += 1;
            if found == FENCE_IN_FLIGHT_AT_HEALING_SEEDS.len() {
                return;
            }
        }
    }
    panic!("found {found} seeds in 20,000");
}

#[test]
fn test_dst_single_activation_under_faults() {
    let seeds = seeds();
    let mut faults: BTreeMap<FaultType, u64> = BTreeMap::new();
    let mut total = Figures::default();
    for &seed in &seeds {
        let (report, figures) = run_seed(seed, Broken::Nothing).unwrap_or_else(|e| panic!("{e}"));
        for (fault, count) in &report.faults_fired {
            *faults.entry(*fault).or_default() += count;
        }
        assert!(
            figures.activations > 0,
            "seed {seed}: nothing was activated"
        );
        assert!(
            figures.writes_accepted > 0,
            "seed {seed}: nothing was written"
        );
        total = add(total, figures);
    }
    println!(
        "placement: {} seeds, zero violations; {total:?}",
        seeds.len()
    );
    for (fault, count) in &faults {
        println!("  fault {:<24} fired {count}", fault.name());
    }
    if seeds.len() as u64 >= SEEDS_DEFAULT {
        let fired = |list: &[FaultType]| {
            list.iter()
                .map(|f| faults.get(f).copied().unwrap_or(0))
                .sum::<u64>()
        };
        // Every fault of the swarm's mix took effect somewhere in the sweep (a replay of one
        // seed, or a few, need not meet each).
        for fault in SWARM_LEASE_FAULTS {
            assert!(fired(&[*fault]) > 0, "{} never fired", fault.name());
        }
        assert!(
            total.late_writes_rejected > 0,
            "the fence never had to reject a late write"
        );
        assert!(
            total.lost_events > 0,
            "no keeper ever reported a lost lease"
        );
        assert!(
            total.routed > 0,
            "no request was ever routed to another node"
        );
    }
}

fn add(a: Figures, b: Figures) -> Figures {
    Figures {
        activations: a.activations + b.activations,
        deactivations: a.deactivations + b.deactivations,
        routed: a.routed + b.routed,
        lost_events: a.lost_events + b.lost_events,
        writes_accepted: a.writes_accepted + b.writes_accepted,
        writes_rejected: a.writes_rejected + b.writes_rejected,
        late_writes_rejected: a.late_writes_rejected + b.late_writes_rejected,
        late_writes_accepted_before_successor: a.late_writes_accepted_before_successor
            + b.late_writes_accepted_before_successor,
        fences_in_flight_at_healing: a.fences_in_flight_at_healing + b.fences_in_flight_at_healing,
    }
}

/// Runs `broken` over consecutive seeds until a check fails; returns how many seeds that took
/// and the failure.
fn caught_within(broken: Broken) -> (u64, SimError) {
    let base = SimConfig::from_env_or_random().seed;
    for i in 0..MUTATION_SEEDS_MAX {
        if let Err(error) = run_seed(base.wrapping_add(i), broken) {
            return (i + 1, error);
        }
    }
    panic!("{broken:?} survived {MUTATION_SEEDS_MAX} seeds from {base}");
}

#[test]
fn test_dst_activation_outliving_its_lease_is_caught_by_single_activation() {
    let (seeds, error) = caught_within(Broken::ActivationOutlivesLease);
    println!("activation outliving its lease caught after {seeds} seeds: {error}");
    assert!(
        matches!(&error, SimError::InvariantViolated { invariant, .. } if invariant == "SingleActivation"),
        "caught otherwise: {error}"
    );
    // By the check at each step that the store agrees (the intervals come from the keepers'
    // beliefs, which the broken placement does not change).
    let SimError::InvariantViolated { message, .. } = &error else {
        unreachable!()
    };
    assert!(
        message.contains("but the store has"),
        "caught otherwise: {message}"
    );
}

// The checks fed wrong inputs directly: each branch that reports a violation, rejecting.

/// Runs `judge` on a world whose nodes are started and nothing else runs (see [`new_ctx`]);
/// returns what it reported.
fn rejection<Fut>(judge: impl Fn(Rc<Ctx>) -> Fut) -> String
where
    Fut: std::future::Future<Output = Result<(), String>> + 'static,
{
    let outcome = Simulation::new(SimConfig::new(1)).run(|env| {
        let judged = new_ctx(&env, Broken::Nothing).map(&judge);
        async move { judged?.await }
    });
    match outcome {
        Err(SimError::ScenarioFailed { message, .. }) => message,
        other => panic!("the check did not reject: {other:?}"),
    }
}

fn actor(name: &str) -> ActorId {
    ActorId::new(name).unwrap()
}

fn interval(node: usize, token: u64, start_ms: u64, end_ms: u64) -> Interval {
    Interval {
        node,
        token: FencingToken(token),
        start_ms,
        end_ms,
    }
}

#[test]
fn test_single_activation_rejects_two_nodes_active_at_once_and_only_that() {
    let check = |all: Vec<(ActorId, Interval)>| {
        let last = all.len() - 1;
        Activations {
            seen: Vec::new(),
            all,
        }
        .check(last)
    };
    let a = actor("a");
    let overlapping = vec![
        (a.clone(), interval(0, 1, 0, 100)),
        (a.clone(), interval(1, 2, 50, 150)),
    ];
    let message = check(overlapping).expect_err("two nodes active at once accepted");
    assert!(
        message.contains(
            "a is active on node-1 (token 2, 50..150 ms) and on node-0 (token 1, 0..100 ms) \
             at once"
        ),
        "{message}"
    );
    // One after the other, on one node twice, or on two actors: fine.
    let handed_over = vec![
        (a.clone(), interval(0, 1, 0, 100)),
        (a.clone(), interval(1, 2, 100, 150)),
    ];
    assert_eq!(check(handed_over), Ok(()));
    let same_node = vec![
        (a.clone(), interval(0, 1, 0, 100)),
        (a.clone(), interval(0, 2, 50, 150)),
    ];
    assert_eq!(check(same_node), Ok(()));
    let two_actors = vec![
        (a, interval(0, 1, 0, 100)),
        (actor("b"), interval(1, 2, 50, 150)),
    ];
    assert_eq!(check(two_actors), Ok(()));
}

/// Makes node 0 active on the first actor with a placement whose activation outlives the
/// lease, then releases the lease behind its back: node 0 is still active, and the store has
/// no holder.
async fn active_without_a_lease(ctx: &Ctx) -> Result<(ActorId, FencingToken), String> {
    let keeper = ctx.world.keeper(0).ok_or("node-0 runs")?;
    let placement =
        KeeperPlacement::new(Arc::clone(&keeper)).with_mutation_activation_outlives_lease();
    let actor_id = ctx.world.actors()[0].clone();
    let token = match placement.activate_or_locate(&actor_id).await {
        Ok(Location::Local { fencing_token }) => fencing_token,
        other => return Err(format!("activation failed: {other:?}")),
    };
    keeper.release(&actor_id).await.map_err(|e| e.to_string())?;
    ctx.placements.borrow_mut()[0] = Some(Rc::new(placement));
    Ok((actor_id, token))
}

#[test]
fn test_single_activation_rejects_an_activation_the_store_does_not_back() {
    let message = rejection(|ctx| async move {
        check_active_under_lease(&ctx, ctx.env.now_ms())?;
        let (actor_id, token) = active_without_a_lease(&ctx).await?;
        assert_eq!(
            ctx.placements.borrow()[0]
                .as_ref()
                .unwrap()
                .active_token(&actor_id),
            Some(token)
        );
        check_active_under_lease(&ctx, ctx.env.now_ms())
    });
    assert!(
        message.contains("is active on node-0 with token 1 at")
            && message.contains("but the store has Some(LeaseRecord { holder: None"),
        "{message}"
    );
}

#[test]
fn test_liveness_check_rejects_a_node_not_running() {
    let message = rejection(|ctx| async move { check_liveness(&ctx).await });
    assert!(message.contains("node-0 is not running"), "{message}");
}

#[test]
fn test_liveness_check_rejects_an_activation_the_store_names_no_one_for() {
    let message = rejection(|ctx| async move {
        active_without_a_lease(&ctx).await?;
        check_liveness(&ctx).await
    });
    assert!(
        message.contains("is active on node-0 but the store names None"),
        "{message}"
    );
}

fn state_op(node: usize, token: u64, accepted: bool, held_at_arrival: bool) -> StateOp {
    StateOp {
        actor_id: actor("a"),
        node,
        token: FencingToken(token),
        fence: false,
        value: Some(format!("node-{node} token {token}").into_bytes()),
        arrival_ms: 0,
        accepted,
        held_at_arrival,
    }
}

/// Writes `op` to the state store for real (it is accepted), and records it.
async fn write_accepted(ctx: &Ctx, op: StateOp) -> Result<(), String> {
    let value = op.value.clone().unwrap_or_default();
    ctx.state
        .write(&op.actor_id, op.token, &value)
        .await
        .map_err(|e| e.to_string())?;
    ctx.ops.borrow_mut().push(op);
    Ok(())
}

#[test]
fn test_state_ops_check_rejects_a_rejection_nothing_superseded() {
    let message = rejection(|ctx| async move {
        ctx.ops.borrow_mut().push(state_op(0, 1, false, false));
        check_state_ops(&ctx)
    });
    assert!(
        message.contains("state store rejected an operation nothing superseded"),
        "{message}"
    );
}

#[test]
fn test_state_ops_check_rejects_a_rejected_write_of_the_current_holder() {
    let message = rejection(|ctx| async move {
        write_accepted(&ctx, state_op(1, 2, true, true)).await?;
        // Superseded by token 2, so rightly rejected, unless its writer still held the lease.
        ctx.ops.borrow_mut().push(state_op(0, 1, false, false));
        check_state_ops(&ctx)?;
        ctx.ops.borrow_mut().push(state_op(0, 1, false, true));
        check_state_ops(&ctx)
    });
    assert!(
        message.contains("a write of the lease's current holder was rejected"),
        "{message}"
    );
}

#[test]
fn test_state_ops_check_rejects_a_store_whose_highest_token_differs() {
    let message = rejection(|ctx| async move {
        write_accepted(&ctx, state_op(0, 1, true, true)).await?;
        check_state_ops(&ctx)?;
        // Recorded as accepted, but never reached the store.
        ctx.ops.borrow_mut().push(state_op(1, 2, true, true));
        check_state_ops(&ctx)
    });
    assert!(
        message.contains("a: the store's highest token is Some(FencingToken(1)), not 2"),
        "{message}"
    );
}

#[test]
fn test_dst_state_read_from_a_stale_replica_is_caught_by_the_activation_read_check() {
    let (seeds, error) = caught_within(Broken::StaleReplicaReads);
    println!("activation reads from a stale replica caught after {seeds} seeds: {error}");
    let SimError::ScenarioFailed { message, .. } = &error else {
        panic!("caught otherwise: {error}");
    };
    assert!(
        message.contains("read the state as"),
        "caught otherwise: {message}"
    );
}

#[test]
fn test_dst_state_store_accepting_stale_tokens_is_caught_by_the_fencing_check() {
    let (seeds, error) = caught_within(Broken::StateStoreIgnoresTokens);
    println!("state store ignoring tokens caught after {seeds} seeds: {error}");
    let SimError::ScenarioFailed { message, .. } = &error else {
        panic!("caught otherwise: {error}");
    };
    assert!(
        message.contains("state store accepted token"),
        "caught otherwise: {message}"
    );
}

/// Runs one seed; the simulator's failure names the seed.
fn run_seed(seed: u64, broken: Broken) -> Result<(SimReport, Figures), SimError> {
    let mut simulation = Simulation::new(SimConfig::new(seed));
    for fault in swarm_faults(seed, SWARM_LEASE_FAULTS) {
        simulation = simulation.with_fault(fault);
    }
    let figures = Rc::new(Cell::new(Figures::default()));
    let figures_out = Rc::clone(&figures);
    let report = simulation.run(move |env| {
        let figures = Rc::clone(&figures);
        async move {
            let ctx = start(&env, broken)?;
            let outcome = drive(&ctx).await;
            figures.set(ctx.figures.get());
            outcome
        }
    })?;
    Ok((report, figures_out.get()))
}

/// Builds the world, its nodes' loops and the activation check.
fn start(env: &SimEnv, broken: Broken) -> Result<Rc<Ctx>, String> {
    let ctx = new_ctx(env, broken)?;
    let activations = RefCell::new(Activations::default());
    let watched = Rc::clone(&ctx);
    env.add_invariant("SingleActivation", move || {
        activations.borrow_mut().observe(&watched)
    });
    for node in 0..NODES_COUNT {
        drop(env.spawn(supervise(Rc::clone(&ctx), node)));
    }
    Ok(ctx)
}

/// Builds the world with its nodes started, and nothing running on them: no placement, no
/// state operation, no activation check.
fn new_ctx(env: &SimEnv, broken: Broken) -> Result<Rc<Ctx>, String> {
    let mut scenario = LeaseScenario::default();
    (scenario.nodes_count, scenario.actors_count) = (NODES_COUNT, ACTORS_COUNT);
    scenario.app_loop = false;
    let cluster = SimLeaseCluster::new(env, scenario.cluster)?;
    let world = SwarmWorld::new(env, cluster, scenario);
    world.start_all()?;
    let ctx = Rc::new(Ctx {
        env: env.clone(),
        world,
        broken,
        state: match broken {
            Broken::StateStoreIgnoresTokens => StateStore::Lax(RefCell::default()),
            Broken::StaleReplicaReads => StateStore::StaleReplica {
                store: MemoryFencedStateStore::new(),
                previous: RefCell::default(),
            },
            _ => StateStore::Fenced(MemoryFencedStateStore::new()),
        },
        ops: RefCell::default(),
        placements: RefCell::new(vec![None; NODES_COUNT]),
        figures: Cell::default(),
        write_seq: Cell::new(0),
    });
    Ok(ctx)
}

/// The run: faults, healing, settling, then the end-of-run checks.
async fn drive(ctx: &Rc<Ctx>) -> Result<(), String> {
    let chaos = ctx.world.spawn_chaos();
    ctx.env.sleep(Duration::from_millis(SAFETY_PHASE_MS)).await;
    chaos.abort();
    ctx.world.heal()?;
    let lease_ms = LeaseScenario::default().cluster.lease_duration_ms;
    // A node's loop waits for its fences, and one sent just before healing may hold the node
    // for up to `LONG_DELAY_LEASE_DURATIONS_MAX`: the settling time covers that, and then a
    // release, a think time and an acquire of each wanted actor.
    let settle_ms = SETTLE_LEASE_DURATIONS * lease_ms;
    ctx.env.sleep(Duration::from_millis(settle_ms)).await;
    check_liveness(ctx).await?;
    ctx.world.check_linearizability()?;
    check_state_ops(ctx)
}

/// Runs node `node`'s placement loop, one incarnation after another: a crash replaces the
/// node's keeper, and its memory (the placement with it) is gone.
async fn supervise(ctx: Rc<Ctx>, node: usize) {
    let mut incarnation = 0u32;
    loop {
        let Some(keeper) = ctx.world.keeper(node) else {
            ctx.env.sleep(Duration::from_millis(10)).await;
            continue;
        };
        incarnation += 1;
        let placement = KeeperPlacement::new(Arc::clone(&keeper));
        let placement = match ctx.broken {
            Broken::ActivationOutlivesLease => placement.with_mutation_activation_outlives_lease(),
            _ => placement,
        };
        let placement = Rc::new(placement);
        ctx.placements.borrow_mut()[node] = Some(Rc::clone(&placement));
        let mut rng = ctx.env.rng(&format!("placement/node-{node}-{incarnation}"));
        while ctx.is_current(node, &keeper) {
            // The actor may already be inactive (its belief ended), so every event counts.
            while let Some(event) = ctx.world.next_keeper_event(node) {
                placement.on_keeper_event(&event);
                if matches!(event, KeeperEvent::Lost { .. }) {
                    ctx.count(|f| f.lost_events += 1);
                }
            }
            match ctx.world.phase() {
                Phase::Safety => visit_random(&ctx, node, &keeper, &placement, &mut rng).await,
                Phase::Liveness => visit_wanted(&ctx, node, &keeper, &placement, &mut rng).await,
            }
            let think_ms = rng.gen_range(1..=THINK_TIME_MS_MAX);
            let clock = ctx.world.clock(node);
            clock.sleep_local(Duration::from_millis(think_ms)).await;
        }
        ctx.placements.borrow_mut()[node] = None;
    }
}

async fn visit_random(
    ctx: &Rc<Ctx>,
    node: usize,
    keeper: &Arc<Keeper>,
    placement: &NodePlacement,
    rng: &mut DeterministicRng,
) {
    let actor_id = ctx.world.actors()[rng.choose_index(ACTORS_COUNT)].clone();
    match placement.active_token(&actor_id) {
        Some(_) if rng.gen_bool(DEACTIVATE_PROBABILITY) => {
            // A release the store never confirmed still deactivates: the lease expires.
            let _ = placement.deactivate(&actor_id).await;
            ctx.count(|f| f.deactivations += 1);
        }
        Some(token) => write(ctx, node, placement, &actor_id, token, rng),
        None => activate(ctx, node, keeper, placement, &actor_id, rng).await,
    }
}

async fn visit_wanted(
    ctx: &Rc<Ctx>,
    node: usize,
    keeper: &Arc<Keeper>,
    placement: &NodePlacement,
    rng: &mut DeterministicRng,
) {
    let actors = ctx.world.actors().to_vec();
    for (index, actor_id) in actors.iter().enumerate() {
        if !ctx.is_current(node, keeper) {
            return;
        }
        let active = placement.active_token(actor_id);
        match (wanter(index) == node, active) {
            (true, None) => activate(ctx, node, keeper, placement, actor_id, rng).await,
            (true, Some(token)) => write(ctx, node, placement, actor_id, token, rng),
            (false, Some(_)) => {
                let _ = placement.deactivate(actor_id).await;
                ctx.count(|f| f.deactivations += 1);
            }
            // Not active here, but the keeper still holds the lease (a grant that arrived
            // after its activation was given up, say): let it go, or it is renewed for ever.
            (false, None) if keeper.holds(actor_id).is_some() => {
                let _ = placement.deactivate(actor_id).await;
                ctx.count(|f| f.deactivations += 1);
            }
            (false, None) => {}
        }
    }
}

/// Activates `actor_id` here if it can: acquires the lease, then fences the state store with
/// the new token so that no earlier holder's late write can land after this activation.
async fn activate(
    ctx: &Ctx,
    node: usize,
    keeper: &Arc<Keeper>,
    placement: &NodePlacement,
    actor_id: &ActorId,
    rng: &mut DeterministicRng,
) {
    match placement.activate_or_locate(actor_id).await {
        Ok(Location::Local { fencing_token }) if ctx.is_current(node, keeper) => {
            ctx.count(|f| f.activations += 1);
            let writer = (node, placement.keeper().holder_id().clone());
            let delay_ms = draw_delay_ms(ctx, rng);
            let fenced = send_state_op(ctx, writer, actor_id, fencing_token, None, delay_ms).await;
            if matches!(fenced, Err(StateError::StaleToken { .. })) {
                // Superseded before the activation completed: not ours any more.
                let _ = placement.deactivate(actor_id).await;
            }
        }
        Ok(Location::Remote { holder }) => {
            assert_ne!(
                &holder,
                placement.keeper().holder_id(),
                "a node is routed to itself"
            );
            ctx.count(|f| f.routed += 1);
        }
        // A crashed incarnation's late activation, a store failure or a refusal: the next
        // visit tries again.
        _ => {}
    }
}

/// Writes the actor's state if this node is active on it, carrying the token it is active
/// under. The write travels on its own: the node goes on (and may deactivate, or lose the
/// lease) while it is in flight.
fn write(
    ctx: &Rc<Ctx>,
    node: usize,
    placement: &NodePlacement,
    actor_id: &ActorId,
    token: FencingToken,
    rng: &mut DeterministicRng,
) {
    // Checked right before the write leaves the node; the write itself may arrive late.
    if placement.active_token(actor_id) != Some(token) {
        return;
    }
    let seq = ctx.write_seq.get() + 1;
    ctx.write_seq.set(seq);
    let value = format!("node-{node} token {token} write {seq}").into_bytes();
    let writer = (node, placement.keeper().holder_id().clone());
    let delay_ms = draw_delay_ms(ctx, rng);
    let (sender, actor_id) = (Rc::clone(ctx), actor_id.clone());
    drop(ctx.env.spawn(async move {
        let _ = send_state_op(&sender, writer, &actor_id, token, Some(value), delay_ms).await;
    }));
}

/// A state message's network delay: mostly short, sometimes (before healing) up to
/// [`LONG_DELAY_LEASE_DURATIONS_MAX`] lease durations. A healed network delays nothing for
/// long.
fn draw_delay_ms(ctx: &Ctx, rng: &mut DeterministicRng) -> u64 {
    let lease_ms = LeaseScenario::default().cluster.lease_duration_ms;
    let faulty =
        ctx.world.phase() == Phase::Safety || matches!(ctx.broken, Broken::LongDelaysAfterHealing);
    if faulty && rng.gen_bool(LONG_DELAY_PROBABILITY) {
        rng.gen_range(1..=LONG_DELAY_LEASE_DURATIONS_MAX * lease_ms)
    } else {
        rng.gen_range(1..=SHORT_DELAY_MS_MAX)
    }
}

/// Sends a write (or, with no value, a fence) from `writer` (its index and the identity of its
/// incarnation) to the state store, arriving `delay_ms` later on the writer's clock, and
/// records how it landed.
async fn send_state_op(
    ctx: &Ctx,
    (node, writer_id): (usize, NodeId),
    actor_id: &ActorId,
    token: FencingToken,
    value: Option<Vec<u8>>,
    delay_ms: u64,
) -> Result<(), StateError> {
    let clock = ctx.world.clock(node);
    let sent_before_healing = ctx.world.phase() == Phase::Safety;
    clock.sleep_local(Duration::from_millis(delay_ms)).await;
    let arrival_ms = ctx.env.now_ms();
    let healed_in_flight = sent_before_healing && ctx.world.phase() == Phase::Liveness;
    if value.is_none() && healed_in_flight {
        ctx.count(|f| f.fences_in_flight_at_healing += 1);
    }
    // A restarted node is a new holder, so the writer is its incarnation.
    let held_at_arrival = ctx.world.truth(actor_id).is_some_and(|r| {
        r.holder.as_ref() == Some(&writer_id)
            && r.fencing_token == token
            && arrival_ms < r.expires_at_ms
    });
    let fence = value.is_none();
    let (result, value) = match value {
        Some(value) => (ctx.state.write(actor_id, token, &value).await, Some(value)),
        None => match ctx.state.fence(actor_id, token).await {
            Ok(read) => (Ok(()), read),
            Err(error) => (Err(error), None),
        },
    };
    ctx.ops.borrow_mut().push(StateOp {
        actor_id: actor_id.clone(),
        node,
        token,
        fence,
        value,
        arrival_ms,
        accepted: result.is_ok(),
        held_at_arrival,
    });
    result
}

impl Activations {
    /// Brings every node's intervals up to date with its keeper and checks the changed ones.
    fn observe(&mut self, ctx: &Ctx) -> Result<(), String> {
        if self.seen.is_empty() {
            self.seen = (0..NODES_COUNT)
                .map(|_| NodeSeen {
                    keeper: None,
                    belief_epoch: u64::MAX,
                    open: BTreeMap::new(),
                })
                .collect();
        }
        let now_ms = ctx.env.now_ms();
        for node in 0..NODES_COUNT {
            let keeper = ctx.world.keeper(node);
            let same = match (&keeper, &self.seen[node].keeper) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            };
            let epoch = keeper.as_ref().map_or(0, |k| k.belief_epoch());
            if same && epoch == self.seen[node].belief_epoch {
                continue;
            }
            if !same {
                // A crash or a restart: the old incarnation's memory is gone.
                self.close_all(node, now_ms);
            }
            self.seen[node].keeper = keeper.clone();
            self.seen[node].belief_epoch = epoch;
            if let Some(keeper) = keeper {
                self.follow(ctx, node, &keeper, now_ms)?;
            }
        }
        check_active_under_lease(ctx, now_ms)
    }

    fn close_all(&mut self, node: usize, now_ms: u64) {
        for (_, index) in std::mem::take(&mut self.seen[node].open) {
            let interval = &mut self.all[index].1;
            interval.end_ms = interval.end_ms.min(now_ms);
        }
    }

    /// Updates node `node`'s intervals from its keeper's beliefs now.
    fn follow(
        &mut self,
        ctx: &Ctx,
        node: usize,
        keeper: &Keeper,
        now_ms: u64,
    ) -> Result<(), String> {
        let clock = ctx.world.clock(node);
        let beliefs: BTreeMap<ActorId, (FencingToken, u64)> = keeper
            .beliefs()
            .into_iter()
            .map(|(actor_id, held)| {
                let end_ms = clock.global_when_local_reaches(held.until_local_ms);
                (actor_id, (held.fencing_token, end_ms))
            })
            .collect();
        let open = std::mem::take(&mut self.seen[node].open);
        for (actor_id, index) in open {
            let interval = &mut self.all[index].1;
            match beliefs.get(&actor_id) {
                Some(&(token, end_ms)) if token == interval.token => {
                    interval.end_ms = end_ms;
                    self.seen[node].open.insert(actor_id, index);
                }
                _ => interval.end_ms = interval.end_ms.min(now_ms),
            }
        }
        for (actor_id, (token, end_ms)) in beliefs {
            if let Some(&index) = self.seen[node].open.get(&actor_id) {
                self.check(index)?;
                continue;
            }
            let interval = Interval {
                node,
                token,
                start_ms: now_ms,
                end_ms,
            };
            self.all.push((actor_id.clone(), interval));
            self.seen[node].open.insert(actor_id, self.all.len() - 1);
            self.check(self.all.len() - 1)?;
        }
        Ok(())
    }

    /// Fails if interval `index` overlaps another node's interval on the same actor.
    fn check(&self, index: usize) -> Result<(), String> {
        let (actor_id, a) = &self.all[index];
        for (other_actor, b) in &self.all {
            if other_actor != actor_id || b.node == a.node {
                continue;
            }
            if a.start_ms < b.end_ms && b.start_ms < a.end_ms {
                return Err(format!(
                    "{actor_id} is active on node-{} (token {}, {}..{} ms) and on node-{} \
                     (token {}, {}..{} ms) at once",
                    a.node, a.token, a.start_ms, a.end_ms, b.node, b.token, b.start_ms, b.end_ms
                ));
            }
        }
        Ok(())
    }
}

/// Every actor a node's placement says is active there is held by that node at the store,
/// with the same token, unexpired: a node acts as holder only while the store agrees. (So no
/// two nodes are active at once at any step; the intervals above cover the instants between.)
fn check_active_under_lease(ctx: &Ctx, now_ms: u64) -> Result<(), String> {
    let placements = ctx.placements.borrow();
    for (node, placement) in placements.iter().enumerate() {
        let Some(placement) = placement else {
            continue;
        };
        if !ctx.is_current(node, placement.keeper()) {
            continue;
        }
        for actor_id in ctx.world.actors() {
            let Some(token) = placement.active_token(actor_id) else {
                continue;
            };
            let record = ctx.world.truth(actor_id);
            let held = record.as_ref().is_some_and(|r| {
                r.holder.as_ref() == Some(placement.keeper().holder_id())
                    && r.fencing_token == token
                    && now_ms < r.expires_at_ms
            });
            if !held {
                return Err(format!(
                    "{actor_id} is active on node-{node} with token {token} at {now_ms} ms, \
                     but the store has {record:?}"
                ));
            }
        }
    }
    Ok(())
}

/// After healing, every actor is active on the node that wants it, and the store says so.
async fn check_liveness(ctx: &Ctx) -> Result<(), String> {
    for (index, actor_id) in ctx.world.actors().iter().enumerate() {
        let node = wanter(index);
        let placement = ctx.placements.borrow()[node].clone();
        let placement = placement.ok_or_else(|| format!("node-{node} is not running"))?;
        if placement.active_token(actor_id).is_none() {
            return Err(format!(
                "liveness violation: {actor_id}, wanted by node-{node}, is not active there \
                 {} lease durations after healing; the store has {:?}",
                SETTLE_LEASE_DURATIONS,
                ctx.world.truth(actor_id)
            ));
        }
        let holder = placement
            .where_is(actor_id)
            .await
            .map_err(|e| e.to_string())?;
        if holder.as_ref() != Some(placement.keeper().holder_id()) {
            return Err(format!(
                "{actor_id} is active on node-{node} but the store names {holder:?}"
            ));
        }
    }
    Ok(())
}

/// The fencing properties, over every state operation in arrival order.
fn check_state_ops(ctx: &Ctx) -> Result<(), String> {
    let ops = ctx.ops.borrow();
    // Per actor: the highest token accepted so far, and by which operation.
    let mut highest: BTreeMap<&ActorId, (FencingToken, usize)> = BTreeMap::new();
    // Per actor: the last value accepted so far.
    let mut last_written: BTreeMap<&ActorId, &[u8]> = BTreeMap::new();
    for (position, op) in ops.iter().enumerate() {
        if op.accepted {
            let last = last_written.get(&op.actor_id).copied();
            match (&op.value, op.fence) {
                (Some(value), false) => {
                    last_written.insert(&op.actor_id, value);
                }
                (read, true) if read.as_deref() != last => {
                    return Err(format!(
                        "activation of {} by node-{} (token {}) at {} ms read the state as \
                         {:?}, but the last write accepted before it was {:?}",
                        op.actor_id,
                        op.node,
                        op.token,
                        op.arrival_ms,
                        read.as_deref().map(String::from_utf8_lossy),
                        last.map(String::from_utf8_lossy)
                    ));
                }
                _ => {}
            }
        }
        let before = highest.get(&op.actor_id).copied();
        let superseded = before.filter(|(token, _)| *token > op.token);
        if op.accepted {
            if let Some((token, by)) = superseded {
                return Err(format!(
                    "state store accepted token {} for {} from node-{} at {} ms after it had \
                     accepted token {token} ({:?})",
                    op.token, op.actor_id, op.node, op.arrival_ms, ops[by]
                ));
            }
            highest.insert(&op.actor_id, (op.token, position));
        } else if superseded.is_none() {
            return Err(format!(
                "state store rejected an operation nothing superseded: {op:?}"
            ));
        }
        if op.held_at_arrival && !op.accepted {
            return Err(format!(
                "a write of the lease's current holder was rejected: {op:?}"
            ));
        }
        count_write(ctx, op);
    }
    for (actor_id, (token, _)) in highest {
        let stored = ctx.state.highest_token(actor_id)?;
        if stored != Some(token) {
            return Err(format!(
                "{actor_id}: the store's highest token is {stored:?}, not {token}"
            ));
        }
    }
    Ok(())
}

fn count_write(ctx: &Ctx, op: &StateOp) {
    if op.fence {
        return;
    }
    ctx.count(|f| match (op.accepted, op.held_at_arrival) {
        (true, true) => f.writes_accepted += 1,
        (true, false) => {
            f.writes_accepted += 1;
            f.late_writes_accepted_before_successor += 1;
        }
        (false, _) => {
            f.writes_rejected += 1;
            f.late_writes_rejected += 1;
        }
    });
}

/// The memory store's futures are ready at once.
fn futures_now<T>(future: impl std::future::Future<Output = T>) -> T {
    let mut context = std::task::Context::from_waker(std::task::Waker::noop());
    match std::pin::pin!(future).poll(&mut context) {
        std::task::Poll::Ready(value) => value,
        std::task::Poll::Pending => panic!("memory state store futures are ready at once"),
    }
}
