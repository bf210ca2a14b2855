//! The simulated lease cluster: the production protocol over the simulated store, the board
//! of every node's beliefs (fed by the nodes' production keepers, see
//! [`crate::lease_swarm`]), and the checkers judging every step.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;

use indexmap::map::MutableKeys;
use kelpie_core::ActorId;
use kelpie_lease::{
    backend::DecideFn, backend::LeaseOp, backend::LeaseRecord, backend::ProtocolLeaseManager,
    machine::BeliefConfig, LeaseConfig, LeaseKeeper, LeaseManager,
};

use crate::beliefs::BeliefBoard;
use crate::checkers::{ActorMap, ActorView, BeliefView, CheckerSet, DecisionRecord, LeaseWorld};
use crate::lease_events::{EventLog, LeaseEventKind};
use crate::sim_etcd::SimEtcd;
use crate::sim_lease_store::{SimLeaseStore, StoreWriteMutation};
use crate::swarm_manager::SwarmStore;
use kelpie_lease::limits::ETCD_KEY_PREFIX_DEFAULT;
use kelpie_sim::{SimEnv, SimStorage};

/// Counts of the nodes' lease requests by outcome, each request once. On the simulated lease
/// store they are counted as the store answers them ([`SimLeaseStore::outcome_counts`]): a
/// request lost on the network before it reached the store is not counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LeaseOpCounts {
    /// Acquires granted.
    pub acquired: u64,
    /// Renewals granted.
    pub renewed: u64,
    /// Releases done.
    pub released: u64,
    /// Requests the protocol refused.
    pub refused: u64,
    /// Requests the store failed (including commit unknown, and a decision whose write
    /// failed).
    pub store_failed: u64,
}

impl std::ops::AddAssign for LeaseOpCounts {
    fn add_assign(&mut self, other: LeaseOpCounts) {
        self.acquired += other.acquired;
        self.renewed += other.renewed;
        self.released += other.released;
        self.refused += other.refused;
        self.store_failed += other.store_failed;
    }
}

impl LeaseOpCounts {
    /// Every request made.
    pub fn total(&self) -> u64 {
        self.acquired + self.renewed + self.released + self.refused + self.store_failed
    }
}

/// Settings shared by every node of a cluster.
#[derive(Debug, Clone, Copy)]
pub struct ClusterConfig {
    /// Lease duration on the store's clock.
    pub lease_duration_ms: u64,
    /// Bound on the drift of each node's clock against the store's.
    pub clock_drift_ppm_max: u64,
    /// Safety margin of each node's belief.
    pub safety_margin_ms: u64,
    /// Which invariants are checked after every step.
    pub checkers: CheckerSet,
    /// The store's decision function; replaced only to show that the checkers catch a
    /// broken protocol. The store owns it: requests never carry one.
    pub decide: DecideFn,
    /// A deliberately broken write path of the store, if any.
    pub store_write_mutation: Option<StoreWriteMutation>,
    /// The store the nodes use: the protocol's own, or etcd. With etcd, the checkers judge the
    /// simulated etcd's keys (see [`crate::sim_etcd`]); `decide` and the write mutation are
    /// not used.
    pub store: SwarmStore,
    /// A deliberately broken etcd backend on every node, if any (with `store` etcd).
    pub etcd_mutation: Option<kelpie_lease::EtcdMutation>,
}

/// The store, the protocol over it, and every node's belief, with the checkers installed.
#[derive(Clone)]
pub struct SimLeaseCluster {
    store: SimLeaseStore,
    /// The simulated etcd, when the nodes use the etcd backend: then it is the ground truth.
    etcd: Option<SimEtcd>,
    manager: Arc<ProtocolLeaseManager<SimLeaseStore>>,
    board: BeliefBoard,
    counts: Rc<Cell<LeaseOpCounts>>,
    /// Whether requests are counted where the store answers them (for nodes whose keepers
    /// renew out of sight) rather than by the clients: the simulated lease store counts each
    /// answer by its outcome ([`SimLeaseStore::outcome_counts`]); on etcd, grants and
    /// refusals are counted from its decisions and store failures by the clients.
    count_decisions: Rc<Cell<bool>>,
    events: EventLog,
}

impl SimLeaseCluster {
    /// A cluster on a new simulated store, checked by `config.checkers` after every step.
    pub fn new(env: &SimEnv, config: ClusterConfig) -> Result<Self, String> {
        let lease_config = LeaseConfig::new(config.lease_duration_ms).map_err(|e| e.to_string())?;
        // Validated here so that a bad configuration fails the run before any node starts.
        BeliefConfig::new(
            config.lease_duration_ms,
            config.clock_drift_ppm_max,
            config.safety_margin_ms,
        )
        .map_err(|e| e.to_string())?;
        let store = SimLeaseStore::with_decide_fn(env.storage(), config.decide)
            .with_write_mutation(config.store_write_mutation);
        let manager = ProtocolLeaseManager::new(store.clone(), lease_config);
        let etcd =
            (config.store == SwarmStore::Etcd).then(|| SimEtcd::new(env, ETCD_KEY_PREFIX_DEFAULT));
        let cluster = Self {
            store,
            etcd,
            manager: Arc::new(manager),
            board: BeliefBoard::default(),
            counts: Rc::default(),
            count_decisions: Rc::default(),
            events: EventLog::default(),
        };
        cluster.install_checkers(env, &config.checkers);
        Ok(cluster)
    }

    /// The simulated store.
    pub fn store(&self) -> &SimLeaseStore {
        &self.store
    }

    /// The simulated etcd, when the nodes use the etcd backend.
    pub fn etcd(&self) -> Option<&SimEtcd> {
        self.etcd.as_ref()
    }

    /// The ground truth of `actor_id`'s lease: the simulated store's record, or what the
    /// simulated etcd's keys say.
    pub fn truth(&self, actor_id: &ActorId) -> Option<LeaseRecord> {
        match &self.etcd {
            Some(etcd) => etcd.truth(actor_id),
            None => self.store.peek(actor_id),
        }
    }

    /// The protocol over the store, without belief bookkeeping.
    pub fn manager(&self) -> &ProtocolLeaseManager<SimLeaseStore> {
        &self.manager
    }

    /// What the nodes did so far.
    pub fn counts(&self) -> LeaseOpCounts {
        let mut counts = self.counts.get();
        if self.etcd.is_none() && self.count_decisions.get() {
            counts += self.store.outcome_counts();
        }
        counts
    }

    /// Every event of the run so far.
    pub fn events(&self) -> &EventLog {
        &self.events
    }

    /// Registers the checkers as one group of invariants: after every step the cache is
    /// brought up to date with what changed in it, then each checker, in order, judges it.
    /// With no checker, the cache is still brought up to date after every step.
    fn install_checkers(&self, env: &SimEnv, set: &CheckerSet) {
        let checkers = set.build();
        // A step that changed nothing costs one call, not one per checker.
        let names: Vec<&'static str> = checkers.iter().map(|checker| checker.name()).collect();
        let checkers = RefCell::new(checkers);
        let cache = RefCell::new(StepCache::default());
        let cluster = self.clone();
        let judge = move |at: &Cell<usize>| {
            // Most steps change nothing the cache follows: then there is nothing to judge.
            if !cluster.has_changes() {
                return Ok(());
            }
            let mut cache = cache.borrow_mut();
            cache.refresh(&cluster);
            if cache.changed.is_empty() && cache.decisions.is_empty() {
                return Ok(());
            }
            let world = LeaseWorld {
                store_now_ms: cache.store_now_ms,
                actors: &cache.actors,
                changed_indices: &cache.changed,
                decisions: &cache.decisions,
                held_until_deleted: cluster.etcd.is_some(),
            };
            for (index, checker) in checkers.borrow_mut().iter_mut().enumerate() {
                at.set(index);
                if let Err(message) = checker.check(&world) {
                    let kind = LeaseEventKind::Violation {
                        invariant: checker.name().into(),
                        message: message.clone(),
                    };
                    cluster.events.push(cache.store_now_ms, None, None, kind);
                    return Err(message);
                }
            }
            Ok(())
        };
        if names.is_empty() {
            // Judged by nothing, the step cache still takes in every step: that drains the
            // store's decision log (counting the operations) and the records and beliefs
            // changed, which would otherwise pile up for the whole run.
            env.add_observer("the checkers' step cache", move || {
                let judged = judge(&Cell::new(0));
                assert!(judged.is_ok(), "no checker, no verdict");
            });
        } else {
            env.add_invariants(names, judge);
        }
    }

    /// Whether the store made a decision or changed a record, or a belief changed, since the
    /// step cache last took them in: a step with none leaves every verdict as it was.
    fn has_changes(&self) -> bool {
        let store_changed = match &self.etcd {
            Some(etcd) => etcd.has_changes(),
            None => self.store.has_decisions() || self.store.storage().has_changed_keys(),
        };
        store_changed || self.board.has_changes()
    }

    /// Counts requests where the store answers them instead of by the clients (see
    /// [`SimLeaseCluster::counts`]).
    pub fn count_decisions(&self, enabled: bool) {
        self.count_decisions.set(enabled);
    }

    /// Updates the operation counts.
    pub(crate) fn count(&self, update: impl FnOnce(&mut LeaseOpCounts)) {
        let mut counts = self.counts.get();
        update(&mut counts);
        self.counts.set(counts);
    }

    /// The simulated world's belief board, for nodes whose beliefs a keeper holds.
    pub(crate) fn board(&self) -> &BeliefBoard {
        &self.board
    }

    /// Puts `keeper`'s beliefs (on `clock`) under the checkers, as the world does for its
    /// nodes' keepers: for keepers a test builds itself, such as a lease session's.
    pub fn watch_keeper<M: LeaseManager + 'static>(
        &self,
        keeper: &Arc<LeaseKeeper<M>>,
        clock: kelpie_sim::SimClock,
    ) {
        let source: Rc<dyn crate::beliefs::BeliefSource> = Rc::new(Arc::clone(keeper));
        self.board.set_keeper(keeper.holder_id(), clock, source);
    }
}

/// The actor at `index` in the step cache's map.
fn actor_at(actors: &ActorMap<ActorView>, index: usize) -> &ActorId {
    actors.get_index(index).expect("an actor's index").0
}

/// A store place whose actor [`StepCache`] has not looked up yet.
const ABSENT_INDEX: usize = usize::MAX;

/// Truth, beliefs and decisions as of one executor step, maintained from what changed.
#[derive(Default)]
struct StepCache {
    store_now_ms: u64,
    /// Every actor's record and beliefs, one entry each.
    actors: ActorMap<ActorView>,
    /// The indices in `actors` of the actors changed in this step, in actor order, each once
    /// (sorted at the end of [`StepCache::refresh`]).
    changed: Vec<usize>,
    decisions: Vec<DecisionRecord>,
    /// Reused buffer of the store's places written in a step.
    written_places: Vec<usize>,
    /// Reused buffer of (index in `actors`, store place) of the records written in a step.
    written: Vec<(usize, usize)>,
    /// By the store's place of a key: the index in `actors` of its actor, once seen
    /// ([`ABSENT_INDEX`] before), so that a written record is found without hashing its key.
    index_by_place: Vec<usize>,
    /// On etcd, by actor index: the etcd lease the actor's key is attached to, whose expiry
    /// is the record's (`None`: no key).
    etcd_leases: Vec<Option<i64>>,
    /// Reused buffer of the etcd leases extended in a step.
    extended_leases: Vec<i64>,
}

impl StepCache {
    /// Takes in what changed since the last call: the checkers' group calls it once per step.
    fn refresh(&mut self, cluster: &SimLeaseCluster) {
        self.changed.clear();
        if let Some(etcd) = &cluster.etcd {
            self.refresh_from_etcd(cluster, etcd);
        } else {
            self.refresh_from_store(cluster);
        }
        self.refresh_beliefs(cluster);
        if let Some(etcd) = &cluster.etcd {
            self.refresh_etcd_expiries(etcd);
        }
        // In actor order, each once, as the checkers have always seen them. Indices and
        // actors correspond one to one, so equal ids sort next to each other.
        let id = |index: usize| actor_at(&self.actors, index);
        self.changed.sort_unstable_by(|&a, &b| id(a).cmp(id(b)));
        self.changed.dedup();
    }

    /// The index of `actor_id` in `actors`, with an empty view if it is new.
    fn index_of(&mut self, actor_id: &ActorId) -> usize {
        match self.actors.get_index_of(actor_id) {
            Some(index) => index,
            None => {
                self.actors
                    .insert_full(actor_id.clone(), ActorView::default())
                    .0
            }
        }
    }

    /// [`Self::index_of`] for an id a keeper reported (the world's clone of it), which the map
    /// then keeps as its key if it is a long one: an actor first seen in the store has a key
    /// built from the store's string, while its beliefs, looked up after every change, come
    /// with the world's clone. Once the key is that clone, their lookups compare pointers
    /// instead of bytes (at 10,000 actors, a cache miss on each of two strings). A short id is
    /// compared by its two words wherever it came from.
    fn believer_index_of(&mut self, actor_id: &ActorId) -> usize {
        match self.actors.get_full_mut2(actor_id) {
            Some((index, key, _)) => {
                if !actor_id.is_inline() && !key.same_allocation(actor_id) {
                    // Equal ids, so the map's hashing and order are unchanged.
                    *key = actor_id.clone();
                }
                index
            }
            None => self.index_of(actor_id),
        }
    }

    /// Truth and decisions from the simulated etcd.
    fn refresh_from_etcd(&mut self, cluster: &SimLeaseCluster, etcd: &SimEtcd) {
        self.store_now_ms = etcd.now_ms();
        etcd.take_decisions_into(&mut self.decisions);
        if cluster.count_decisions.get() {
            cluster.count(|counts| tally_decisions(counts, &self.decisions));
        }
        let mut changed = Vec::new();
        etcd.take_changed_actors_into(&mut changed);
        for actor_id in changed {
            let Some((record, lease_id)) = etcd.truth_and_lease(&actor_id) else {
                continue;
            };
            self.record_truth(cluster, &actor_id, &record);
            let index = self.index_of(&actor_id);
            self.actors[index].record = Some(record);
            if self.etcd_leases.len() <= index {
                self.etcd_leases.resize(index + 1, None);
            }
            self.etcd_leases[index] = lease_id;
            self.changed.push(index);
        }
        // An extended lease moves the expiry of every key attached to it, hundreds at scale,
        // and nothing else. No invariant can break by that alone (a later expiry backs every
        // belief it backed; holder and token stay; on etcd an extension is not judged as a
        // renewal), so those actors are not judged now: each record's expiry is read from its
        // lease whenever the actor is judged (`refresh_etcd_expiries`). The event log still
        // shows every key's new truth.
        let mut extended = std::mem::take(&mut self.extended_leases);
        etcd.take_extended_leases_into(&mut extended);
        if cluster.events.is_enabled() {
            for &lease_id in &extended {
                for actor_id in etcd.lease_actors(lease_id) {
                    if let Some(record) = etcd.truth(&actor_id) {
                        self.record_truth(cluster, &actor_id, &record);
                    }
                }
            }
        }
        extended.clear();
        self.extended_leases = extended;
    }

    /// Brings the expiry of each changed actor's record to its etcd lease's now.
    fn refresh_etcd_expiries(&mut self, etcd: &SimEtcd) {
        for &index in &self.changed {
            let Some(&Some(lease_id)) = self.etcd_leases.get(index) else {
                continue;
            };
            if let Some(record) = &mut self.actors[index].record {
                record.expires_at_ms = etcd.lease_expires_at_ms(lease_id);
            }
        }
    }

    fn record_truth(&self, cluster: &SimLeaseCluster, actor_id: &ActorId, record: &LeaseRecord) {
        if cluster.events.is_enabled() {
            record_truth(&cluster.events, self.store_now_ms, actor_id, record);
        }
    }

    /// Truth and decisions from the simulated lease store.
    fn refresh_from_store(&mut self, cluster: &SimLeaseCluster) {
        self.store_now_ms = cluster.store.storage().now_ms();
        cluster.store.take_decisions_into(&mut self.decisions);
        let storage = cluster.store.storage();
        let mut places = std::mem::take(&mut self.written_places);
        storage.take_changed_places_into(&mut places);
        let mut written = std::mem::take(&mut self.written);
        written.clear();
        for &place in &places {
            written.push((self.index_at_place(storage, place), place));
        }
        // In actor order, each once, as the event log has always seen them.
        let id = |index: usize| actor_at(&self.actors, index);
        written.sort_unstable_by(|&(a, _), &(b, _)| id(a).cmp(id(b)));
        written.dedup();
        for &(index, place) in &written {
            let (actor_id, view) = self.actors.get_index_mut(index).expect("an actor's index");
            let record = storage
                .peek_at(place)
                .expect("a written record exists")
                .value;
            if cluster.events.is_enabled() {
                record_truth(&cluster.events, self.store_now_ms, actor_id, &record);
            }
            view.record = Some(record);
            self.changed.push(index);
        }
        self.written_places = places;
        self.written = written;
    }

    /// The index in `actors` of the actor whose record is at `place` in the store.
    fn index_at_place(&mut self, storage: &SimStorage<LeaseRecord>, place: usize) -> usize {
        if let Some(&index) = self
            .index_by_place
            .get(place)
            .filter(|&&i| i != ABSENT_INDEX)
        {
            return index;
        }
        // Once per place, so the id built here costs nothing that matters.
        let key = storage.key_at(place).expect("a written key's place");
        let actor_id = ActorId::new(&key).expect("keys are written from valid actor ids");
        let index = self.index_of(&actor_id);
        if place >= self.index_by_place.len() {
            self.index_by_place.resize(place + 1, ABSENT_INDEX);
        }
        self.index_by_place[place] = index;
        index
    }

    /// The beliefs that changed in this step.
    fn refresh_beliefs(&mut self, cluster: &SimLeaseCluster) {
        let events = &cluster.events;
        cluster.board.take_changes(|node_id, actor_id, after| {
            if events.is_enabled() {
                self.record_belief_change(events, node_id, &actor_id, after.as_ref());
            }
            let index = self.believer_index_of(&actor_id);
            let views = &mut self.actors[index].beliefs;
            views.retain(|v| &v.node_id != node_id);
            views.extend(after);
            self.changed.push(index);
        });
    }

    fn record_belief_change(
        &self,
        events: &EventLog,
        node_id: &kelpie_core::NodeId,
        actor_id: &ActorId,
        after: Option<&BeliefView>,
    ) {
        let node = Some(node_id);
        let kind = match after {
            Some(view) => LeaseEventKind::BeliefStarted {
                fencing_token: view.held.fencing_token,
                until_ms: view.until_global_ms,
            },
            None => LeaseEventKind::BeliefEnded,
        };
        events.push(self.store_now_ms, node, Some(actor_id), kind);
    }
}

/// Logs the store's truth for `actor_id`.
fn record_truth(events: &EventLog, store_now_ms: u64, actor_id: &ActorId, record: &LeaseRecord) {
    let kind = LeaseEventKind::Truth {
        holder: record.holder.clone(),
        fencing_token: record.fencing_token,
        expires_at_ms: record.expires_at_ms,
    };
    events.push(store_now_ms, None, Some(actor_id), kind);
}

fn tally_decisions(counts: &mut LeaseOpCounts, decisions: &[DecisionRecord]) {
    for d in decisions {
        match (&d.decision.reply, d.request.op) {
            (Err(_), _) => counts.refused += 1,
            (Ok(_), LeaseOp::Acquire) => counts.acquired += 1,
            (Ok(_), LeaseOp::Renew) => counts.renewed += 1,
            (Ok(_), LeaseOp::Release) => counts.released += 1,
        }
    }
}
