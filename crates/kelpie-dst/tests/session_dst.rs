//! The lease session in the simulator, as in production: each node runs a `LeaseSession`
//! (its keeper and its driver, on the node's drifting clock) over the simulated network and
//! store, campaigns for actors, holds guards for a while and drops them, under the swarm's
//! partitions, message and storage faults.
//!
//! Judged after every step, beside the five invariants (the sessions' keepers are on the
//! belief board): **GuardInsideBelief**, a guard whose token is not cancelled is backed by its
//! keeper's belief, so the cancellation fires before the belief ends. Clock jumps are left out
//! of the mix: a forward jump past the cancel lead ends the belief and the guard in the same
//! instant (the keeper-level invariants cover jumps; fencing covers what a late guard does).
//!
//! The production [`Placement`] runs the same way over each node's session, with the actors'
//! state in a fenced state store: nodes campaign, activate, write while the activation is
//! active, and deactivate. Judged after every step: **ActivationInsideBelief**, an activation
//! not cancelled is backed by its keeper's belief in its token; and **WritesUnderBelief**,
//! every write the state store accepted came from a node that believed its token, and an
//! actor's accepted tokens never go down.
//!
//! `DST_SEEDS=<n>` sets how many seeds run; `DST_SEED=<n>` runs exactly one.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use kelpie_core::{ActorId, FencingToken, NodeId};
use kelpie_dst::{swarm_faults, LeaseScenario, SimLeaseCluster, SwarmWorld, SWARM_LEASE_FAULTS};
use kelpie_lease::{
    Activation, KeeperConfig, LeaseGuard, LeaseSession, MemoryFencedStateStore, Placement,
    PlacementError, SessionConfig, SessionDriver, SessionError, StateError,
};
use kelpie_sim::{FaultType, SimConfig, SimEnv, SimError, SimReport, Simulation};

/// Seeds run when `DST_SEEDS` is not set.
const SEEDS_DEFAULT: u64 = 16;
/// Nodes with a session.
const NODES_COUNT: usize = 4;
/// Actors they campaign for.
const ACTORS_COUNT: usize = 3;
/// Simulated time the sessions run under faults.
const FAULTY_MS: u64 = 20_000;
/// Longest a node keeps a guard before dropping it, in ms on its clock.
const HOLD_MS_MAX: u64 = 3_000;

type Session = LeaseSession<kelpie_dst::NetLeaseManager>;

/// Every guard a node holds now, beside its session.
struct Node {
    session: Session,
    guards: RefCell<Vec<LeaseGuard>>,
}

fn seeds() -> Vec<u64> {
    kelpie_sim::test_seeds(SEEDS_DEFAULT)
}

#[test]
fn test_dst_session_guards_are_cancelled_before_their_beliefs_end() {
    let (mut cancelled, mut granted) = (0u64, 0u64);
    let mut faults = std::collections::BTreeMap::new();
    for seed in seeds() {
        let (report, figures) = run_seed(seed);
        for (fault, count) in &report.faults_fired {
            *faults.entry(*fault).or_insert(0u64) += count;
        }
        granted += figures.0;
        cancelled += figures.1;
    }
    println!("sessions: {granted} guards granted, {cancelled} cancelled before their belief ended");
    println!("faults fired: {faults:?}");
    assert!(granted > 0, "no guard was ever granted");
    if seeds().len() as u64 >= SEEDS_DEFAULT {
        // Every fault of the mix took effect somewhere in the sweep (a replay of one seed, or
        // a few, need not meet each), and guards were cancelled.
        let fired = |f: FaultType| faults.get(&f).copied().unwrap_or(0);
        for fault in session_faults() {
            assert!(
                fired(fault) > 0,
                "{} never fired in {} seeds",
                fault.name(),
                seeds().len()
            );
        }
        assert!(
            cancelled > 0,
            "no guard was ever cancelled by its belief running out"
        );
    }
}

/// The faults the sessions run under: the swarm's, but for node crashes and clock jumps, which
/// this scenario does not drive.
fn session_faults() -> Vec<FaultType> {
    SWARM_LEASE_FAULTS
        .iter()
        .copied()
        .filter(|f| *f != FaultType::ClockJump && *f != FaultType::NodeCrash)
        .collect()
}

/// One seed; returns the report and (guards granted, guards cancelled while held).
fn run_seed(seed: u64) -> (SimReport, (u64, u64)) {
    let mut simulation = Simulation::new(SimConfig::new(seed));
    for fault in swarm_faults(seed, &session_faults()) {
        simulation = simulation.with_fault(fault);
    }
    let figures = Rc::new(RefCell::new((0u64, 0u64)));
    let out = Rc::clone(&figures);
    let report = simulation
        .run(move |env| {
            let figures = Rc::clone(&figures);
            async move { drive(env, figures).await }
        })
        .unwrap_or_else(|error| panic!("{error}"));
    let figures = *out.borrow();
    (report, figures)
}

async fn drive(env: SimEnv, figures: Rc<RefCell<(u64, u64)>>) -> Result<(), String> {
    let (world, cluster, scenario) = world_of(&env, NODES_COUNT, ACTORS_COUNT)?;
    let mut nodes = Vec::new();
    for index in 0..NODES_COUNT {
        let (node, driver) = new_node(&world, &cluster, &scenario, index)?;
        drop(env.spawn(driver.run()));
        nodes.push(node);
    }
    let watched = nodes.clone();
    env.add_invariant("GuardInsideBelief", move || guards_inside_beliefs(&watched));
    for (index, node) in nodes.iter().enumerate() {
        let (env, world, node) = (env.clone(), Rc::clone(&world), Rc::clone(node));
        let figures = Rc::clone(&figures);
        drop(env.clone().spawn(async move {
            node_loop(env, world, index, node, figures).await;
        }));
    }
    let chaos = world.spawn_chaos();
    env.sleep(Duration::from_millis(FAULTY_MS)).await;
    chaos.abort();
    for node in &nodes {
        node.guards.borrow_mut().clear();
        node.session.shutdown().await;
    }
    Ok(())
}

/// A world of `nodes` started nodes (their keepers driven by the sessions, not an app loop)
/// and `actors` actors, without a liveness phase; its cluster and scenario.
fn world_of(
    env: &SimEnv,
    nodes: usize,
    actors: usize,
) -> Result<(Rc<SwarmWorld>, SimLeaseCluster, LeaseScenario), String> {
    let mut scenario = LeaseScenario::default();
    (scenario.nodes_count, scenario.actors_count) = (nodes, actors);
    scenario.app_loop = false;
    scenario.check_liveness = false;
    let cluster = SimLeaseCluster::new(env, scenario.cluster)?;
    let world = SwarmWorld::new(env, cluster.clone(), scenario);
    world.start_all()?;
    Ok((world, cluster, scenario))
}

/// Node `index`'s session over the world's manager, on the node's clock, and its driver (not
/// running yet).
fn new_node(
    world: &SwarmWorld,
    cluster: &SimLeaseCluster,
    scenario: &LeaseScenario,
    index: usize,
) -> Result<(Rc<Node>, SessionDriver<kelpie_dst::NetLeaseManager>), String> {
    let manager = world.manager(index).ok_or("the node runs")?;
    let clock = world.clock(index);
    let node_id = NodeId::new(format!("session-{index}")).map_err(|e| e.to_string())?;
    // The node clocks drift up to the scenario's bound; the keeper must be told it.
    let drift = (
        scenario.cluster.clock_drift_ppm_max,
        scenario.cluster.safety_margin_ms,
    );
    let keeper = KeeperConfig::default().with_belief_bounds(drift.0, drift.1);
    let config = SessionConfig::default().with_keeper(keeper);
    let incarnation = 1;
    let (session, driver) = LeaseSession::with_incarnation(
        manager,
        Arc::new(clock.clone()),
        node_id,
        incarnation,
        config,
    )
    .map_err(|e| e.to_string())?;
    cluster.watch_keeper(session.keeper(), clock);
    let node = Rc::new(Node {
        session,
        guards: RefCell::default(),
    });
    Ok((node, driver))
}

/// A node's life: campaign for a random actor (giving up after a while), hold the guard for
/// a random time or until it is cancelled, drop it.
async fn node_loop(
    env: SimEnv,
    world: Rc<SwarmWorld>,
    index: usize,
    node: Rc<Node>,
    figures: Rc<RefCell<(u64, u64)>>,
) {
    let mut rng = env.rng(&format!("session-node-{index}"));
    let clock = world.clock(index);
    loop {
        let actor: ActorId = world.actors()[rng.choose_index(ACTORS_COUNT)].clone();
        let campaign = node.session.campaign(&actor);
        let give_up = clock.sleep_local(Duration::from_millis(HOLD_MS_MAX));
        let guard = match futures_util::future::select(Box::pin(campaign), Box::pin(give_up)).await
        {
            futures_util::future::Either::Left((Ok(guard), _)) => guard,
            futures_util::future::Either::Left((Err(SessionError::ShuttingDown), _)) => return,
            _ => continue,
        };
        figures.borrow_mut().0 += 1;
        let cancellation = guard.cancellation().clone();
        node.guards.borrow_mut().push(guard);
        let hold_ms = rng.gen_range(1..=HOLD_MS_MAX);
        let held = clock.sleep_local(Duration::from_millis(hold_ms));
        let lost = cancellation.cancelled();
        if let futures_util::future::Either::Right(_) =
            futures_util::future::select(Box::pin(held), Box::pin(lost)).await
        {
            figures.borrow_mut().1 += 1;
        }
        // Dropping the guard releases the lease.
        node.guards.borrow_mut().retain(|g| g.actor_id() != &actor);
    }
}

/// Every guard not cancelled is backed by its keeper's belief in its token.
fn guards_inside_beliefs(nodes: &[Rc<Node>]) -> Result<(), String> {
    for node in nodes {
        for guard in node.guards.borrow().iter() {
            // The token, which the driver cancels, not `is_valid`, which reads the belief
            // itself (and would cancel the token from inside a check).
            if guard.cancellation().is_cancelled() {
                continue;
            }
            let believed = node.session.keeper().holds(guard.actor_id());
            if believed != Some(guard.fencing_token()) {
                return Err(format!(
                    "{} still has a valid guard on {} (token {}) but believes {believed:?}",
                    node.session.holder_id(),
                    guard.actor_id(),
                    guard.fencing_token()
                ));
            }
        }
    }
    Ok(())
}

/// GuardInsideBelief fed a wrong world: a guard still valid after its keeper stopped believing
/// in the lease. The keeper releases the lease behind the session's back, and the session's
/// driver, which would cancel the guard, is not running.
#[test]
fn test_guard_inside_belief_rejects_a_valid_guard_its_keeper_does_not_back() {
    let outcome = Simulation::new(SimConfig::new(1)).run(|env| async move {
        let (world, cluster, scenario) = world_of(&env, 1, 1)?;
        let (node, _driver) = new_node(&world, &cluster, &scenario, 0)?;
        let actor = world.actors()[0].clone();
        let guard = node
            .session
            .acquire(&actor)
            .await
            .map_err(|e| e.to_string())?;
        node.guards.borrow_mut().push(guard);
        let nodes = [node];
        guards_inside_beliefs(&nodes)?;
        nodes[0]
            .session
            .keeper()
            .release(&actor)
            .await
            .map_err(|e| e.to_string())?;
        guards_inside_beliefs(&nodes)
    });
    let Err(SimError::ScenarioFailed { message, .. }) = outcome else {
        panic!("the check did not reject: {outcome:?}");
    };
    assert!(
        message.contains("still has a valid guard on") && message.contains("but believes None"),
        "{message}"
    );
}

/// The actors' state, shared by every node's placement.
type State = MemoryFencedStateStore;
/// An activation of the production placement.
type Active = Arc<Activation<State>>;

/// How often an active actor writes its state, in ms on its node's clock.
const WRITE_EVERY_MS: u64 = 100;

/// A node's placement over its session, and the activations its loop holds now.
struct PlacementNode {
    node: Rc<Node>,
    placement: Placement<kelpie_dst::NetLeaseManager, State>,
    activations: RefCell<Vec<Active>>,
}

/// A write the state store accepted: the node that made it, the actor, its token.
#[derive(Debug, Clone)]
struct Accepted {
    node: usize,
    actor: ActorId,
    token: FencingToken,
}

/// What a placement run did: activations, writes accepted, writes refused as stale.
#[derive(Debug, Default, Clone, Copy)]
struct PlacementFigures {
    activations: u64,
    writes: u64,
    stale: u64,
}

#[test]
fn test_dst_placement_over_sessions_keeps_writes_under_beliefs() {
    let mut total = PlacementFigures::default();
    let mut faults = std::collections::BTreeMap::new();
    for seed in seeds() {
        let mut simulation = Simulation::new(SimConfig::new(seed));
        for fault in swarm_faults(seed, &session_faults()) {
            simulation = simulation.with_fault(fault);
        }
        let figures = Rc::new(RefCell::new(PlacementFigures::default()));
        let out = Rc::clone(&figures);
        let report = simulation
            .run(move |env| drive_placement(env, Rc::clone(&figures)))
            .unwrap_or_else(|error| panic!("{error}"));
        for (fault, count) in &report.faults_fired {
            *faults.entry(*fault).or_insert(0u64) += count;
        }
        let figures = *out.borrow();
        assert!(
            figures.activations > 0,
            "seed {seed}: nothing was activated"
        );
        total.activations += figures.activations;
        total.writes += figures.writes;
        total.stale += figures.stale;
    }
    println!("placement over sessions: {total:?}; faults fired: {faults:?}");
    assert!(total.writes > 0, "nothing was written");
    if seeds().len() as u64 >= SEEDS_DEFAULT {
        for fault in session_faults() {
            assert!(
                faults.get(&fault).copied().unwrap_or(0) > 0,
                "{} never fired",
                fault.name()
            );
        }
    }
}

async fn drive_placement(
    env: SimEnv,
    figures: Rc<RefCell<PlacementFigures>>,
) -> Result<(), String> {
    let (world, cluster, scenario) = world_of(&env, NODES_COUNT, ACTORS_COUNT)?;
    let state = Arc::new(State::new());
    let mut nodes = Vec::new();
    for index in 0..NODES_COUNT {
        let (node, driver) = new_node(&world, &cluster, &scenario, index)?;
        drop(env.spawn(driver.run()));
        let placement = Placement::new(node.session.clone(), Arc::clone(&state));
        nodes.push(Rc::new(PlacementNode {
            node,
            placement,
            activations: RefCell::default(),
        }));
    }
    let accepted: Rc<RefCell<Vec<Accepted>>> = Rc::default();
    let watched = nodes.clone();
    env.add_invariant("ActivationInsideBelief", move || {
        activations_inside_beliefs(&watched)
    });
    let (watched, log) = (nodes.clone(), Rc::clone(&accepted));
    let checked = RefCell::new(0);
    env.add_invariant("WritesUnderBelief", move || {
        let log = log.borrow();
        let mut checked = checked.borrow_mut();
        let sessions: Vec<&Session> = watched.iter().map(|n| &n.node.session).collect();
        let result = writes_under_beliefs(&sessions, &log[*checked..])
            .and_then(|()| tokens_never_go_down(&log));
        *checked = log.len();
        result
    });
    for (index, node) in nodes.iter().enumerate() {
        let (env, world, node) = (env.clone(), Rc::clone(&world), Rc::clone(node));
        let (figures, accepted) = (Rc::clone(&figures), Rc::clone(&accepted));
        drop(env.clone().spawn(async move {
            placement_loop(env, world, index, node, figures, accepted).await;
        }));
    }
    let chaos = world.spawn_chaos();
    env.sleep(Duration::from_millis(FAULTY_MS)).await;
    chaos.abort();
    for node in &nodes {
        node.activations.borrow_mut().clear();
        node.node.session.shutdown().await;
    }
    Ok(())
}

/// A node's life with the placement: campaign for a random actor (giving up after a while),
/// write its state while the activation is active, for a random time, then deactivate it.
async fn placement_loop(
    env: SimEnv,
    world: Rc<SwarmWorld>,
    index: usize,
    node: Rc<PlacementNode>,
    figures: Rc<RefCell<PlacementFigures>>,
    accepted: Rc<RefCell<Vec<Accepted>>>,
) {
    let mut rng = env.rng(&format!("placement-node-{index}"));
    let clock = world.clock(index);
    loop {
        let actor: ActorId = world.actors()[rng.choose_index(ACTORS_COUNT)].clone();
        let campaign = node.placement.campaign(&actor);
        let give_up = clock.sleep_local(Duration::from_millis(HOLD_MS_MAX));
        let activation =
            match futures_util::future::select(Box::pin(campaign), Box::pin(give_up)).await {
                futures_util::future::Either::Left((Ok(activation), _)) => activation,
                futures_util::future::Either::Left((
                    Err(PlacementError::Session(SessionError::ShuttingDown)),
                    _,
                )) => return,
                _ => continue,
            };
        figures.borrow_mut().activations += 1;
        node.activations.borrow_mut().push(Arc::clone(&activation));
        let until_ms = clock.now_ms() + rng.gen_range(1..=HOLD_MS_MAX);
        let mut seq = 0u64;
        while clock.now_ms() < until_ms && activation.is_active() {
            seq += 1;
            let value = format!("{index}:{}:{seq}", activation.fencing_token().0);
            match activation.write(value.as_bytes()).await {
                Ok(()) => {
                    figures.borrow_mut().writes += 1;
                    accepted.borrow_mut().push(Accepted {
                        node: index,
                        actor: actor.clone(),
                        token: activation.fencing_token(),
                    });
                }
                Err(StateError::StaleToken { .. }) => {
                    figures.borrow_mut().stale += 1;
                    break;
                }
                Err(_) => break,
            }
            clock
                .sleep_local(Duration::from_millis(WRITE_EVERY_MS))
                .await;
        }
        node.activations
            .borrow_mut()
            .retain(|a| !Arc::ptr_eq(a, &activation));
        let _ = node.placement.deactivate(&actor).await;
    }
}

/// Every activation not cancelled is backed by its keeper's belief in its token.
fn activations_inside_beliefs(nodes: &[Rc<PlacementNode>]) -> Result<(), String> {
    for node in nodes {
        for activation in node.activations.borrow().iter() {
            // The token, not `is_active`, which reads the belief and cancels it itself.
            if activation.cancellation().is_cancelled() {
                continue;
            }
            let believed = node.node.session.keeper().holds(activation.actor_id());
            if believed != Some(activation.fencing_token()) {
                return Err(format!(
                    "{} still has an active activation of {} (token {}) but believes \
                     {believed:?}",
                    node.node.session.holder_id(),
                    activation.actor_id(),
                    activation.fencing_token()
                ));
            }
        }
    }
    Ok(())
}

/// Each write in `accepted` (the ones accepted since the last check, in this step) came from
/// a node that believes its token now: the state store answers at once, so the node's belief
/// then is its belief now.
fn writes_under_beliefs(sessions: &[&Session], accepted: &[Accepted]) -> Result<(), String> {
    for write in accepted {
        let session = sessions[write.node];
        let believed = session.keeper().holds(&write.actor);
        if believed != Some(write.token) {
            return Err(format!(
                "the state store accepted a write of {} with token {} from {}, which believes \
                 {believed:?}",
                write.actor,
                write.token,
                session.holder_id()
            ));
        }
    }
    Ok(())
}

/// Per actor, the tokens of accepted writes never go down.
fn tokens_never_go_down(accepted: &[Accepted]) -> Result<(), String> {
    let mut highest: std::collections::BTreeMap<&ActorId, FencingToken> = Default::default();
    for write in accepted {
        let high = highest.entry(&write.actor).or_insert(write.token);
        if write.token < *high {
            return Err(format!(
                "the state store accepted a write of {} with token {} after one with token {}",
                write.actor, write.token, high
            ));
        }
        *high = write.token;
    }
    Ok(())
}

/// WritesUnderBelief's token order fed a wrong log: an earlier token accepted after a later.
#[test]
fn test_writes_under_belief_rejects_a_token_going_down() {
    let actor = ActorId::new("a").unwrap();
    let write = |token| Accepted {
        node: 0,
        actor: actor.clone(),
        token: FencingToken(token),
    };
    assert!(tokens_never_go_down(&[write(1), write(2), write(2)]).is_ok());
    let error = tokens_never_go_down(&[write(1), write(3), write(2)]).unwrap_err();
    assert!(error.contains("token 2 after one with token 3"), "{error}");
}

/// ActivationInsideBelief and WritesUnderBelief fed a wrong world: an activation still active,
/// and a write accepted, after its keeper stopped believing in the lease (the keeper releases
/// it behind the placement's back; the session's driver, which would cancel the activation,
/// is not running).
#[test]
fn test_placement_checks_reject_an_activation_and_a_write_its_keeper_does_not_back() {
    let outcome = Simulation::new(SimConfig::new(1)).run(|env| async move {
        let (world, cluster, scenario) = world_of(&env, 1, 1)?;
        let (node, _driver) = new_node(&world, &cluster, &scenario, 0)?;
        let placement = Placement::new(node.session.clone(), Arc::new(State::new()));
        let node = Rc::new(PlacementNode {
            node,
            placement,
            activations: RefCell::default(),
        });
        let actor = world.actors()[0].clone();
        let activation = node
            .placement
            .campaign(&actor)
            .await
            .map_err(|e| e.to_string())?;
        node.activations.borrow_mut().push(Arc::clone(&activation));
        let write = Accepted {
            node: 0,
            actor: actor.clone(),
            token: activation.fencing_token(),
        };
        let nodes = [Rc::clone(&node)];
        let sessions = [&node.node.session];
        activations_inside_beliefs(&nodes)?;
        writes_under_beliefs(&sessions, std::slice::from_ref(&write))?;
        node.node
            .session
            .keeper()
            .release(&actor)
            .await
            .map_err(|e| e.to_string())?;
        let written = writes_under_beliefs(&sessions, std::slice::from_ref(&write));
        let Err(message) = written else {
            return Err("WritesUnderBelief did not reject".into());
        };
        assert!(message.contains("which believes None"), "{message}");
        activations_inside_beliefs(&nodes)
    });
    let Err(SimError::ScenarioFailed { message, .. }) = outcome else {
        panic!("the check did not reject: {outcome:?}");
    };
    assert!(
        message.contains("still has an active activation of")
            && message.contains("but believes None"),
        "{message}"
    );
}
