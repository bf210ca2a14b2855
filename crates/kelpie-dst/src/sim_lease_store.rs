//! The lease protocol's store inside the simulator: [`SimStorage`] as a [`LeaseStore`].
//!
//! Each `apply` is one `transact` on the simulated store (`apply_then`, the network server's,
//! one `transact_then`, the same operation without a task), so the production decision
//! function runs at the single simulated instant the request reaches the store, with every
//! storage fault (write failure, read failure, commit unknown, latency, crash) applied around
//! it.
//! Every decision is also logged for the decision-level checkers, whether or not a fault then
//! kept it from being written or answered.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

use kelpie_core::ActorId;
use kelpie_lease::{
    backend::decide, backend::DecideFn, backend::Decision, backend::LeaseOp, backend::LeaseRecord,
    backend::LeaseRequest, backend::LeaseStore, backend::RecordSnapshot, backend::StoreSnapshot,
    Lease, LeaseError, StoreError,
};

use crate::recycled::Recycled;
use crate::sim_thread::SimThread;

use crate::checkers::DecisionRecord;
use crate::lease_cluster::LeaseOpCounts;
use crate::linearizability::StoreEffect;
use kelpie_sim::{SimStorage, StorageError, Versioned};

/// A deliberately broken store: it writes something other than what the decision returned,
/// while replying (and logging) the decision as made. Only the store-truth halves of the
/// invariants, which judge the stored records, can catch these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreWriteMutation {
    /// A takeover of an expired lease is written as an extension of the old holder's lease.
    ExtendsExpiredLeases,
    /// A takeover of an expired lease is written with the previous holder's token.
    KeepsOldToken,
}

impl StoreWriteMutation {
    /// What the broken store writes instead of `decision.write`.
    fn write(
        self,
        before: Option<&LeaseRecord>,
        request: &LeaseRequest,
        decision: &Decision,
        now_ms: u64,
    ) -> Option<LeaseRecord> {
        let honest = decision.write.clone();
        match (self, before) {
            (StoreWriteMutation::ExtendsExpiredLeases, Some(record))
                if record.holder.is_some()
                    && record.valid_holder(now_ms).is_none()
                    && honest.as_ref().is_some_and(|w| w.holder != record.holder) =>
            {
                let mut extended = record.clone();
                extended.expires_at_ms = now_ms + request.lease_duration_ms;
                Some(extended)
            }
            (StoreWriteMutation::KeepsOldToken, Some(record)) => honest.map(|mut written| {
                if written.holder.is_some() && written.holder != record.holder {
                    written.fencing_token = record.fencing_token;
                }
                written
            }),
            _ => honest,
        }
    }
}

/// A [`LeaseStore`] over the simulator's storage.
pub struct SimLeaseStore {
    storage: SimThread<SimStorage<LeaseRecord>>,
    /// What the store logs as it decides; shared by its clones. On the simulation's thread,
    /// as the storage is: a decision takes no lock and no atomic reference count.
    logs: SimThread<Rc<Logs>>,
    /// The production [`decide`], or a mutation the test world swapped in: the store owns
    /// its protocol, requests never carry one.
    decide: DecideFn,
    /// A deliberately broken write path, if any.
    write_mutation: Option<StoreWriteMutation>,
}

/// The store's logs: the decisions for the checkers, and the effects for the linearizability
/// check. One borrow for both, since each decision writes to both, and one handle for a
/// decision step to hold.
#[derive(Default)]
struct Logs {
    logged: RefCell<Logged>,
    /// Set when a decision was logged since the decisions were last taken.
    decided: Cell<bool>,
    /// Each request the store answered, counted once by its outcome.
    outcomes: Cell<LeaseOpCounts>,
}

impl Logs {
    /// Counts a request on `op` the store answered with `outcome`: a grant, a refusal, or a
    /// storage failure, whichever the store's answer says. A decision whose write then failed
    /// (or whose answer a crash lost) counts as a failure, not a grant: its node never got one.
    fn count_outcome(&self, op: LeaseOp, outcome: &Result<Decision, StorageError>) {
        let mut counts = self.outcomes.get();
        match outcome.as_ref().map(|decision| &decision.reply) {
            Err(_) => counts.store_failed += 1,
            Ok(Err(_)) => counts.refused += 1,
            Ok(Ok(_)) => match op {
                LeaseOp::Acquire => counts.acquired += 1,
                LeaseOp::Renew => counts.renewed += 1,
                LeaseOp::Release => counts.released += 1,
            },
        }
        self.outcomes.set(counts);
    }
}

#[derive(Default)]
struct Logged {
    /// The decisions since the checkers last took them.
    decisions: Vec<DecisionRecord>,
    /// The requests applied, in order, once [`SimLeaseStore::log_effects`] was called.
    effects: Option<Recycled<StoreEffect>>,
}

thread_local! {
    /// The emptied effect log of the last store dropped on this thread ([`Recycled`]).
    static SPARE_EFFECTS: RefCell<Vec<StoreEffect>> = const { RefCell::new(Vec::new()) };
}

impl Logged {
    /// Logs that the store decided `request` on `actor_id` at `store_now_ms`, on the record
    /// `current`, if effects are logged.
    fn log_effect(
        &mut self,
        actor_id: &ActorId,
        request: &LeaseRequest,
        current: Option<&Versioned<LeaseRecord>>,
        store_now_ms: u64,
        decided: (&Result<Lease, LeaseError>, bool),
    ) {
        if let Some(effects) = self.effects.as_mut() {
            let (reply, wrote) = decided;
            effects.push(StoreEffect {
                actor_id: actor_id.clone(),
                request: request.clone(),
                store_now_ms,
                record_version: current.map_or(0, |v| v.version),
                reply: reply.clone(),
                wrote,
            });
        }
    }
}

impl Clone for SimLeaseStore {
    fn clone(&self) -> Self {
        let storage = SimThread::new((*self.storage).clone());
        Self {
            storage,
            logs: SimThread::new(Rc::clone(&self.logs)),
            decide: self.decide,
            write_mutation: self.write_mutation,
        }
    }
}

impl SimLeaseStore {
    /// A lease store over `storage`, deciding with the production [`decide`].
    pub fn new(storage: SimStorage<LeaseRecord>) -> Self {
        Self::with_decide_fn(storage, decide)
    }

    /// A lease store deciding with `decide`: a deliberately broken protocol (see
    /// [`crate::mutations`]) that the checkers must catch.
    pub fn with_decide_fn(storage: SimStorage<LeaseRecord>, decide: DecideFn) -> Self {
        Self {
            storage: SimThread::new(storage),
            logs: SimThread::new(Rc::default()),
            decide,
            write_mutation: None,
        }
    }

    /// This store, writing as `mutation` says (see [`StoreWriteMutation`]).
    pub fn with_write_mutation(mut self, mutation: Option<StoreWriteMutation>) -> Self {
        self.write_mutation = mutation;
        self
    }

    /// From now on, logs every request the store decides, in order, with its instant and the
    /// version of the record it decided on: the log [`check_history_with_store_log`] reads as
    /// a proposed linearization (and checks, so a wrong log costs time, never a wrong verdict).
    ///
    /// [`check_history_with_store_log`]: crate::check_history_with_store_log
    pub fn log_effects(&self) {
        self.logs
            .logged
            .borrow_mut()
            .effects
            .get_or_insert_with(|| Recycled::new(&SPARE_EFFECTS));
    }

    /// `read` of the effect log, if [`SimLeaseStore::log_effects`] started one.
    pub fn with_effects<R>(&self, read: impl FnOnce(Option<&[StoreEffect]>) -> R) -> R {
        let logged = self.logs.logged.borrow();
        read(logged.effects.as_deref().map(Vec::as_slice))
    }

    /// Logs that the store decided `request` on `actor_id` at `store_now_ms`, on the record
    /// `current`, with `decided` (its reply, and whether it writes), if effects are logged.
    pub(crate) fn log_effect(
        &self,
        actor_id: &ActorId,
        request: &LeaseRequest,
        current: Option<&Versioned<LeaseRecord>>,
        store_now_ms: u64,
        decided: (&Result<Lease, LeaseError>, bool),
    ) {
        let mut logged = self.logs.logged.borrow_mut();
        logged.log_effect(actor_id, request, current, store_now_ms, decided);
    }

    /// The decision function this store applies.
    pub fn decide_fn(&self) -> DecideFn {
        self.decide
    }

    /// The underlying simulated storage (to crash and restart it).
    pub fn storage(&self) -> &SimStorage<LeaseRecord> {
        &self.storage
    }

    /// Every record, read without latency or faults: the ground truth checkers judge.
    pub fn truth(&self) -> BTreeMap<ActorId, LeaseRecord> {
        self.storage
            .snapshot()
            .into_iter()
            .map(|(key, versioned)| {
                let actor_id = ActorId::new(&key).expect("keys are written from valid actor ids");
                (actor_id, versioned.value)
            })
            .collect()
    }

    /// The decisions made since the last call.
    pub fn take_decisions(&self) -> Vec<DecisionRecord> {
        let mut logged = self.logs.logged.borrow_mut();
        self.logs.decided.set(false);
        std::mem::take(&mut logged.decisions)
    }

    /// The requests the store answered so far, each counted once by its answer: granted,
    /// refused, or failed by the storage (a write that failed after the decision, a read that
    /// failed, a commit of unknown outcome, an answer lost in a crash).
    pub fn outcome_counts(&self) -> LeaseOpCounts {
        self.logs.outcomes.get()
    }

    /// Whether a decision was made since the decisions were last taken.
    pub fn has_decisions(&self) -> bool {
        self.logs.decided.get()
    }

    /// Moves the decisions made since the last call into `decisions` (cleared first), keeping
    /// both buffers' memory, for a checker that asks after every step.
    pub fn take_decisions_into(&self, decisions: &mut Vec<DecisionRecord>) {
        decisions.clear();
        // Most steps decide nothing: a flag read then, not a borrow.
        if !self.has_decisions() {
            return;
        }
        let mut logged = self.logs.logged.borrow_mut();
        self.logs.decided.set(false);
        std::mem::swap(decisions, &mut logged.decisions);
    }

    /// The actors whose records were written since the last call.
    pub fn take_changed_actors(&self) -> BTreeSet<ActorId> {
        let keys = self.storage.take_changed_keys();
        keys.iter()
            .map(|key| ActorId::new(key).expect("keys are valid actor ids"))
            .collect()
    }

    /// One record, read without latency or faults.
    pub fn peek(&self, actor_id: &ActorId) -> Option<LeaseRecord> {
        self.storage.peek(actor_id.as_str()).map(|v| v.value)
    }

    /// Applies `request` at the store, for a server that received it over the network, and
    /// calls `answer` with the outcome when the store replies: the same operation as
    /// [`LeaseStore::apply`], as timed events of the store instead of a task
    /// ([`SimStorage::transact_then`]).
    pub(crate) fn apply_then(
        &self,
        actor_id: ActorId,
        request: LeaseRequest,
        answer: impl FnOnce(Result<Decision, StoreError>) + 'static,
    ) {
        let op = request.op;
        let step = self.decision_step(actor_id.clone(), request);
        let logs = Rc::clone(&self.logs);
        let done = move |outcome: Result<Decision, StorageError>| {
            logs.count_outcome(op, &outcome);
            answer(outcome.map_err(store_error));
        };
        self.storage.transact_then(actor_id, step, done);
    }

    /// The atomic step of applying `request`: the decision on the stored record at the
    /// store's instant, logged for the checkers (and the effect log), and the write.
    fn decision_step(
        &self,
        actor_id: ActorId,
        request: LeaseRequest,
    ) -> impl FnOnce(Option<&Versioned<LeaseRecord>>, u64) -> (Option<LeaseRecord>, Decision) + 'static
    {
        let (decide, write_mutation) = (self.decide, self.write_mutation);
        let logs = Rc::clone(&self.logs);
        move |current: Option<&Versioned<LeaseRecord>>, now_ms: u64| {
            let before = current.map(|v| &v.value);
            let decision = decide(&actor_id, before, &request, now_ms);
            let write = match write_mutation {
                Some(mutation) => mutation.write(before, &request, &decision, now_ms),
                None => decision.write.clone(),
            };
            let mut logged = logs.logged.borrow_mut();
            let decided = (&decision.reply, write.is_some());
            logged.log_effect(&actor_id, &request, current, now_ms, decided);
            let record = DecisionRecord {
                actor_id,
                request,
                before: before.cloned(),
                store_now_ms: now_ms,
                decision: decision.clone(),
            };
            logged.decisions.push(record);
            drop(logged);
            logs.decided.set(true);
            (write, decision)
        }
    }
}

/// The lease store's view of a simulated storage failure: whether it may have been applied.
pub(crate) fn store_error(error: StorageError) -> StoreError {
    let reason = error_reason(&error);
    match error {
        StorageError::CommitUnknown { .. } => StoreError::CommitUnknown { reason },
        StorageError::WriteFailed { .. } => StoreError::WriteFailed { reason },
        _ => StoreError::Unavailable { reason },
    }
}

/// Room for a storage failure's message on a typical key, so that writing it allocates once
/// (`to_string` starts empty and grows three or four times).
const ERROR_REASON_BYTES_TYPICAL: usize = 96;

/// `error`'s message, appended in pieces ([`StorageError::write_message`]).
fn error_reason(error: &StorageError) -> String {
    let mut reason = String::with_capacity(ERROR_REASON_BYTES_TYPICAL);
    error
        .write_message(&mut reason)
        .expect("writing to a String cannot fail");
    reason
}

impl LeaseStore for SimLeaseStore {
    async fn apply(
        &self,
        actor_id: &ActorId,
        request: &LeaseRequest,
    ) -> Result<Decision, StoreError> {
        // The key is the id's own string, borrowed: no copy per request.
        let key = actor_id.clone();
        let step = self.decision_step(actor_id.clone(), request.clone());
        let storage = (*self.storage).clone();
        let outcome =
            SimThread::new(async move { storage.transact(key.as_str(), step).await }).await;
        self.logs.count_outcome(request.op, &outcome);
        outcome.map_err(store_error)
    }

    async fn load(&self, actor_id: &ActorId) -> Result<RecordSnapshot, StoreError> {
        let read = |current: Option<&Versioned<LeaseRecord>>, now_ms: u64| {
            (
                None,
                RecordSnapshot {
                    record: current.map(|v| v.value.clone()),
                    store_now_ms: now_ms,
                },
            )
        };
        let (storage, key) = ((*self.storage).clone(), actor_id.as_str().to_string());
        let outcome = SimThread::new(async move { storage.transact(&key, read).await }).await;
        outcome.map_err(store_error)
    }

    async fn scan(&self) -> Result<StoreSnapshot, StoreError> {
        // Scans are administrative; they read the truth without latency or faults.
        let records = self.truth().into_iter().collect();
        Ok(StoreSnapshot {
            records,
            store_now_ms: self.storage.now_ms(),
        })
    }
}
