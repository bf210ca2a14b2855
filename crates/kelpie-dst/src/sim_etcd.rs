//! A simulated etcd: the store the production etcd backend (`EtcdLeaseManager`) runs against
//! in the swarm, over the simulated network, with etcd's behaviour under faults.
//!
//! What it models, and where each rule comes from:
//!
//! - **MVCC** (<https://etcd.io/docs/v3.5/learning/data_model/>): one cluster-wide revision,
//!   incremented by every transaction that writes (one revision per transaction, however many
//!   keys it touches); a key's `create_revision` is the revision that created it since it was
//!   last deleted, `mod_revision` the last that wrote it, `version` the writes since creation.
//!   A deleted key's next put starts again at version 1 with a new `create_revision`.
//! - **Transactions** (<https://etcd.io/docs/v3.5/learning/api/#transaction>): compares on
//!   version, create/mod revision, value and lease, all evaluated on one revision, then one
//!   branch applied atomically. A put naming a lease that does not exist fails the whole
//!   transaction with "requested lease not found" and applies nothing (etcd checks leases
//!   before applying, `checkRequestPut`).
//! - **Leases** (<https://etcd.io/docs/v3.5/learning/api/#lease-api>): TTLs counted on the
//!   leader's clock (here: global simulated time), raised to etcd's minimum TTL
//!   ([`ETCD_MIN_TTL_S`]); a keepalive resets the expiry to now + TTL; a keepalive of a
//!   lease whose TTL ran out but that is not revoked yet answers "lease not found" (etcd
//!   3.4+ waits for the revocation instead of extending it). Expired leases are revoked, and
//!   every key attached to them deleted in one revision, by a loop that runs every
//!   [`ETCD_EXPIRY_CHECK_INTERVAL_MS`] (etcd's `revokeExpiredLeases`), so a key outlives its
//!   TTL by up to that long.
//! - **Leader change** (etcd's `lessor.Promote`): while an election runs the cluster answers
//!   nothing (requests fail as etcd's "leader changed"; a request may already have been
//!   applied), watches are cancelled and keepalive streams break; the new leader extends
//!   every lease, expired-but-unrevoked ones included, to a full TTL from its takeover (at
//!   the end of the election).
//! - **Watches** (<https://etcd.io/docs/v3.5/learning/api/#watch-api>): events from a start
//!   revision, replayed from history; a start revision at or below the compaction revision is
//!   refused as compacted. History is compacted every [`SIM_ETCD_COMPACT_EVERY_REVISIONS`].
//! - **Faults**, drawn from the run's fault mix: `StorageLatency` delays an apply (slow disk
//!   or a slow follower), `StorageCommitUnknown` applies a request and loses its reply,
//!   `StorageWriteFail` loses a request before it is applied, `StorageReadFail` times out a
//!   linearizable read, and `StorageCrash` is a leader election; the network's own loss, delay, duplication and partitions act on every
//!   message.
//!
//! The server also feeds the checkers: every actor whose lease key changed, the ground truth
//! per actor as a [`LeaseRecord`] (holder, `create_revision` as token, and the session's TTL
//! deadline as expiry) with the lease that deadline is read from, every lease whose deadline
//! moved later (a keepalive or a new leader's takeover: one entry, however many keys the lease
//! carries), and a [`DecisionRecord`] for every lease transaction it applied, read from the
//! transaction's shape (acquire: "version is 0"; renew: "value and lease"; release: a delete).

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::rc::Rc;
use std::time::Duration;

use foldhash::fast::FixedState;
use futures_channel::oneshot;
use indexmap::IndexMap;
use kelpie_core::{ActorId, FencingToken, NodeId};
use kelpie_lease::backend::{Decision, LeaseOp, LeaseRecord, LeaseRequest};
use kelpie_lease::etcd_api::{
    CompareTarget, EtcdApi, EtcdApiError, EtcdKeyValue, LeaseGrant, RangeReply, RangeRequest, Txn,
    TxnOp, TxnOpResult, TxnReply,
};
use kelpie_lease::limits::ETCD_EXPIRY_CHECK_INTERVAL_MS;
use kelpie_lease::{Lease, LeaseError};
use kelpie_sim::{FaultType, HostId, SimClock, SimEnv, SimNetwork};

use crate::checkers::DecisionRecord;
use crate::etcd_history::{Answered, EtcdHistory};
use crate::lease_net::{route_replies, LeaseMessage, Replies, STORE_HOST};
use crate::sim_thread::SimThread;

/// etcd's smallest lease TTL with its default heartbeat (100 ms) and election timeout (1 s):
/// `ceil(3/2 * election ticks * heartbeat)`, 1.5 s, rounded up to whole seconds.
pub const ETCD_MIN_TTL_S: i64 = 2;

/// How many revisions of history the simulated etcd keeps before compacting (as an
/// auto-compaction by revision would).
pub const SIM_ETCD_COMPACT_EVERY_REVISIONS: i64 = 1_000;

/// Longest election, in ms: the cluster answers nothing for up to this long after its leader
/// is lost (a few election timeouts).
pub const SIM_ETCD_ELECTION_MS_MAX: u64 = 3_000;

/// Longest extra time an apply takes under `StorageLatency`.
pub const SIM_ETCD_SLOW_APPLY_MS_MAX: u64 = 200;

/// A request to the simulated etcd.
#[derive(Debug, Clone)]
pub enum EtcdRequest {
    /// A transaction.
    Txn(Txn),
    /// A range read.
    Range(RangeRequest),
    /// Grant a lease of this many seconds.
    Grant(i64),
    /// Keep a lease alive.
    KeepAlive(i64),
    /// Revoke a lease.
    Revoke(i64),
    /// A lease's remaining TTL.
    TimeToLive(i64),
    /// Watch a key for its deletion from a revision.
    WatchDelete {
        /// The key.
        key: Vec<u8>,
        /// The first revision watched.
        start_revision: i64,
    },
}

/// The simulated etcd's answer.
#[derive(Debug, Clone)]
pub enum EtcdResponse {
    /// A transaction's.
    Txn(TxnReply),
    /// A range read's.
    Range(RangeReply),
    /// A grant's.
    Grant(LeaseGrant),
    /// A keepalive's: whether the lease was extended.
    KeepAlive(bool),
    /// A revoke's.
    Revoked,
    /// A time-to-live's: remaining seconds, if the lease exists.
    TimeToLive(Option<i64>),
    /// A watch's: the revision of the delete seen.
    Deleted(i64),
}

/// One etcd lease.
#[derive(Debug, Clone)]
struct SimLease {
    ttl_s: i64,
    /// When its TTL runs out, on the leader's clock.
    expires_at_ms: u64,
    keys: BTreeSet<Vec<u8>>,
}

/// A watch waiting for a key's deletion.
struct Watcher {
    key: Vec<u8>,
    start_revision: i64,
    reply: oneshot::Sender<Result<i64, EtcdApiError>>,
}

/// etcd's keys. Every request looks keys up one by one (renewals only ever do), so they are
/// hashed (at a fixed seed, and never iterated); the sorted set of their names serves range
/// reads, and changes only when a key is created or deleted. In a sorted map, each lookup
/// compared about a dozen byte strings; at 50 nodes and 10,000 actors, these sorted lookups
/// (with those of the tokens below) took about a quarter of a seed's time.
#[derive(Clone, Default)]
struct KeySpace {
    by_key: IndexMap<Vec<u8>, EtcdKeyValue, FixedState>,
    ordered: BTreeSet<Vec<u8>>,
}

impl KeySpace {
    fn get(&self, key: &[u8]) -> Option<&EtcdKeyValue> {
        self.by_key.get(key)
    }

    /// Stores `kv` under its key, creating the key if it is new.
    fn put(&mut self, kv: EtcdKeyValue) {
        match self.by_key.get_mut(kv.key.as_slice()) {
            Some(stored) => *stored = kv,
            None => {
                self.ordered.insert(kv.key.clone());
                self.by_key.insert(kv.key.clone(), kv);
            }
        }
        debug_assert_eq!(self.by_key.len(), self.ordered.len());
    }

    fn remove(&mut self, key: &[u8]) -> Option<EtcdKeyValue> {
        let removed = self.by_key.swap_remove(key)?;
        let listed = self.ordered.remove(key);
        assert!(listed, "every stored key is listed once");
        Some(removed)
    }

    /// The keys from `start` on, in key order.
    fn from<'a>(&'a self, start: &[u8]) -> impl Iterator<Item = &'a EtcdKeyValue> + 'a {
        let names = self
            .ordered
            .range::<[u8], _>((Bound::Included(start), Bound::Unbounded));
        names.map(|name| &self.by_key[name.as_slice()])
    }
}

/// etcd's state.
#[derive(Default)]
struct EtcdState {
    revision: i64,
    compact_revision: i64,
    keys: KeySpace,
    /// Delete events since the compaction revision: (revision, key).
    deletes: Vec<(i64, Vec<u8>)>,
    leases: BTreeMap<i64, SimLease>,
    next_lease_id: i64,
    watchers: Vec<Watcher>,
    /// No leader until this instant (an election is running).
    electing_until_ms: u64,
    /// An election ran and its winner has not extended the leases yet.
    promotion_pending: bool,
    /// Deliberately broken: range reads are served from the keys as they were before the
    /// latest write (a lagging follower answering without a read index).
    stale_reads: bool,
    /// The keys and revision before the latest write, for `stale_reads`.
    lagging: Option<(i64, KeySpace)>,
    /// The last token each actor's key had, for the truth of a deleted key (looked up, never
    /// iterated).
    last_tokens: IndexMap<ActorId, FencingToken, FixedState>,
    /// Actors whose lease key changed since the checkers last looked.
    changed: BTreeSet<ActorId>,
    /// Leases extended since the checkers last looked, in order, possibly repeated.
    extended: Vec<i64>,
    decisions: Vec<DecisionRecord>,
    /// The holders named in lease keys' values, by value: a handful of nodes, read for every
    /// changed actor in every step.
    holders: IndexMap<Vec<u8>, Option<NodeId>, FixedState>,
    /// Reused by [`SimEtcd::truth`].
    key_buffer: Vec<u8>,
    actor_ids: ActorIds,
}

/// The actor of each key seen, if it is a lease key: parsed once, then handed out as the same
/// id (one allocation, so that comparing it with the checkers' copy stops at the pointer).
type ActorIds = IndexMap<Vec<u8>, Option<ActorId>, FixedState>;

/// The actor whose lease key (under `prefix`) `key` is, if it is one.
fn actor_of(prefix: &[u8], actor_ids: &mut ActorIds, key: &[u8]) -> Option<ActorId> {
    if let Some(actor_id) = actor_ids.get(key) {
        return actor_id.clone();
    }
    let parse = |name: &[u8]| ActorId::new(std::str::from_utf8(name).ok()?).ok();
    let actor_id = key.strip_prefix(prefix).and_then(parse);
    actor_ids.insert(key.to_vec(), actor_id.clone());
    actor_id
}

/// The simulated etcd cluster, on [`STORE_HOST`].
#[derive(Clone)]
pub struct SimEtcd {
    env: SimEnv,
    prefix: Rc<Vec<u8>>,
    state: Rc<RefCell<EtcdState>>,
}

impl SimEtcd {
    /// An empty etcd whose lease keys live under `prefix`.
    pub fn new(env: &SimEnv, prefix: &str) -> Self {
        let state = EtcdState {
            next_lease_id: 0x7a00,
            ..EtcdState::default()
        };
        Self {
            env: env.clone(),
            prefix: Rc::new(prefix.as_bytes().to_vec()),
            state: Rc::new(RefCell::new(state)),
        }
    }

    /// Makes this etcd serve range reads from the keys as they were before its latest write: a
    /// deliberately broken store, which the etcd history check must catch.
    pub fn with_stale_reads(self) -> Self {
        self.state.borrow_mut().stale_reads = true;
        self
    }

    /// Keeps the state before a write, when serving stale reads.
    fn before_write(state: &mut EtcdState) {
        if state.stale_reads {
            state.lagging = Some((state.revision, state.keys.clone()));
        }
    }

    /// The leader's clock: global simulated time.
    pub fn now_ms(&self) -> u64 {
        self.env.now_ms()
    }

    /// The actor whose lease key `key` is, if it is one.
    fn actor_of(&self, actor_ids: &mut ActorIds, key: &[u8]) -> Option<ActorId> {
        actor_of(&self.prefix, actor_ids, key)
    }

    /// Whether an election is running.
    pub fn is_electing(&self) -> bool {
        self.state.borrow().electing_until_ms > self.now_ms()
    }

    /// The ground truth of `actor_id`'s lease.
    pub fn truth(&self, actor_id: &ActorId) -> Option<LeaseRecord> {
        self.truth_and_lease(actor_id).map(|(record, _)| record)
    }

    /// The ground truth of `actor_id`'s lease, with the etcd lease its key is attached to
    /// (`None` once the key is deleted): the record's expiry is that lease's, and moves with
    /// it (see [`SimEtcd::take_extended_leases_into`]).
    pub fn truth_and_lease(&self, actor_id: &ActorId) -> Option<(LeaseRecord, Option<i64>)> {
        let mut state = self.state.borrow_mut();
        // The checkers ask for every changed actor in every step: the key is built in a
        // buffer kept for it.
        let mut key = std::mem::take(&mut state.key_buffer);
        key.clear();
        key.extend_from_slice(&self.prefix);
        key.extend_from_slice(actor_id.as_str().as_bytes());
        let record = record_of(&mut state, &key, actor_id, self.now_ms());
        let lease_id = state.keys.get(&key).map(|kv| kv.lease);
        state.key_buffer = key;
        record.map(|record| (record, lease_id))
    }

    /// The expiry of a key attached to `lease_id`, as its truth reads now.
    pub fn lease_expires_at_ms(&self, lease_id: i64) -> u64 {
        key_expires_at_ms(&self.state.borrow(), lease_id, self.now_ms())
    }

    /// Moves the leases extended since the last call into `leases`, in order, possibly
    /// repeated. Extending a lease moves the expiry of every key attached to it, and nothing
    /// else about them: their actors are not reported changed.
    pub fn take_extended_leases_into(&self, leases: &mut Vec<i64>) {
        leases.append(&mut self.state.borrow_mut().extended);
    }

    /// The actors of the lease keys attached to `lease_id`, in key order.
    pub fn lease_actors(&self, lease_id: i64) -> Vec<ActorId> {
        let state = &mut *self.state.borrow_mut();
        let Some(lease) = state.leases.get(&lease_id) else {
            return Vec::new();
        };
        let actor_ids = &mut state.actor_ids;
        (lease.keys.iter())
            .filter_map(|key| self.actor_of(actor_ids, key))
            .collect()
    }

    /// Moves the actors whose lease key changed since the last call into `actors`.
    pub fn take_changed_actors_into(&self, actors: &mut Vec<ActorId>) {
        actors.extend(std::mem::take(&mut self.state.borrow_mut().changed));
    }

    /// Whether a decision, a changed key or an extended lease is waiting to be taken.
    pub fn has_changes(&self) -> bool {
        let state = self.state.borrow();
        !(state.decisions.is_empty() && state.changed.is_empty() && state.extended.is_empty())
    }

    /// Moves the lease decisions made since the last call into `decisions`.
    pub fn take_decisions_into(&self, decisions: &mut Vec<DecisionRecord>) {
        decisions.clear();
        decisions.append(&mut self.state.borrow_mut().decisions);
    }

    /// Whether any session lease is alive with keys attached: a leader change now matters.
    pub fn holds_leases(&self) -> bool {
        let state = self.state.borrow();
        state.leases.values().any(|l| !l.keys.is_empty())
    }

    /// Loses the leader: nothing is answered for `election_ms`, watches are cancelled, and
    /// the new leader, when it takes over, extends every lease to a full TTL from then.
    pub fn elect(&self, election_ms: u64) {
        self.env.record_fault(FaultType::StorageCrash);
        let until_ms = self.now_ms() + election_ms;
        let mut state = self.state.borrow_mut();
        state.electing_until_ms = state.electing_until_ms.max(until_ms);
        state.promotion_pending = true;
        for watcher in state.watchers.drain(..) {
            let reason = "etcdserver: leader changed".to_string();
            let _ = watcher.reply.send(Err(EtcdApiError::NoAnswer { reason }));
        }
    }

    /// The new leader's takeover, once the election is over (etcd's `lessor.Promote`): every
    /// lease, expired-but-unrevoked ones included, lasts a full TTL from the takeover.
    fn promote_if_elected(&self, state: &mut EtcdState) {
        let now_ms = self.now_ms();
        if !state.promotion_pending || state.electing_until_ms > now_ms {
            return;
        }
        state.promotion_pending = false;
        let takeover_ms = state.electing_until_ms;
        for (&lease_id, lease) in state.leases.iter_mut() {
            let ttl_ms = u64::try_from(lease.ttl_s).unwrap_or(0) * 1_000;
            extend(lease, takeover_ms + ttl_ms);
            state.extended.push(lease_id);
        }
    }

    /// Ends any election at once (the faults are healed).
    pub fn end_election(&self) {
        let now_ms = self.now_ms();
        let mut state = self.state.borrow_mut();
        state.electing_until_ms = state.electing_until_ms.min(now_ms);
        self.promote_if_elected(&mut state);
    }

    /// Revokes every lease whose TTL ran out: etcd's revoke loop, one pass.
    fn revoke_expired(&self) {
        let now_ms = self.now_ms();
        let mut state = self.state.borrow_mut();
        if state.electing_until_ms > now_ms {
            return;
        }
        self.promote_if_elected(&mut state);
        let expired: Vec<i64> = (state.leases.iter())
            .filter(|(_, l)| l.expires_at_ms <= now_ms)
            .map(|(id, _)| *id)
            .collect();
        for lease_id in expired {
            revoke(&mut state, &self.prefix, lease_id);
        }
    }

    /// Applies one request at this instant.
    fn apply(&self, request: EtcdRequest) -> Result<EtcdResponse, EtcdApiError> {
        let now_ms = self.now_ms();
        let mut state = self.state.borrow_mut();
        self.promote_if_elected(&mut state);
        Ok(match request {
            EtcdRequest::Txn(txn) => EtcdResponse::Txn(self.txn(&mut state, txn, now_ms)?),
            EtcdRequest::Range(range) => match &state.lagging {
                Some((revision, keys)) if state.stale_reads => {
                    let lagging = EtcdState {
                        revision: *revision,
                        keys: keys.clone(),
                        ..EtcdState::default()
                    };
                    EtcdResponse::Range(range_of(&lagging, &range)?)
                }
                _ => EtcdResponse::Range(range_of(&state, &range)?),
            },
            EtcdRequest::Grant(ttl_s) => {
                let ttl_s = ttl_s.max(ETCD_MIN_TTL_S);
                state.next_lease_id += 1;
                let id = state.next_lease_id;
                let lease = SimLease {
                    ttl_s,
                    expires_at_ms: now_ms + u64::try_from(ttl_s).unwrap_or(0) * 1_000,
                    keys: BTreeSet::new(),
                };
                state.leases.insert(id, lease);
                EtcdResponse::Grant(LeaseGrant { id, ttl_s })
            }
            EtcdRequest::KeepAlive(lease_id) => {
                let state = &mut *state;
                match state.leases.get_mut(&lease_id) {
                    Some(lease) if lease.expires_at_ms > now_ms => {
                        let ttl_ms = u64::try_from(lease.ttl_s).unwrap_or(0) * 1_000;
                        extend(lease, now_ms + ttl_ms);
                        // Every key of the lease now lives longer: the checkers must see it.
                        state.extended.push(lease_id);
                        EtcdResponse::KeepAlive(true)
                    }
                    _ => EtcdResponse::KeepAlive(false),
                }
            }
            EtcdRequest::Revoke(lease_id) => {
                revoke(&mut state, &self.prefix, lease_id);
                EtcdResponse::Revoked
            }
            EtcdRequest::TimeToLive(lease_id) => {
                let remaining = state.leases.get(&lease_id).map(|l| {
                    let left_ms = l.expires_at_ms.saturating_sub(now_ms);
                    i64::try_from(left_ms / 1_000).unwrap_or(i64::MAX)
                });
                EtcdResponse::TimeToLive(remaining)
            }
            EtcdRequest::WatchDelete { .. } => unreachable!("watches are served by `watch`"),
        })
    }

    fn txn(&self, state: &mut EtcdState, txn: Txn, now_ms: u64) -> Result<TxnReply, EtcdApiError> {
        let holds = txn.compares.iter().all(|c| {
            let kv = state.keys.get(&c.key);
            match &c.target {
                CompareTarget::Version(v) => kv.map_or(0, |kv| kv.version) == *v,
                CompareTarget::CreateRevision(r) => kv.map_or(0, |kv| kv.create_revision) == *r,
                CompareTarget::ModRevision(r) => kv.map_or(0, |kv| kv.mod_revision) == *r,
                CompareTarget::Value(v) => kv.is_some_and(|kv| kv.value == *v),
                CompareTarget::Lease(l) => kv.map_or(0, |kv| kv.lease) == *l,
            }
        });
        let ops = if holds { &txn.success } else { &txn.failure };
        // etcd checks every lease a put names before applying anything.
        for op in ops {
            if let TxnOp::Put { lease, .. } = op {
                if *lease != 0 && !state.leases.contains_key(lease) {
                    return Err(EtcdApiError::LeaseNotFound);
                }
            }
        }
        let writes = ops.iter().any(|op| !matches!(op, TxnOp::Get { .. }));
        if writes {
            Self::before_write(state);
        }
        let revision = if writes {
            state.revision + 1
        } else {
            state.revision
        };
        let decision = self.lease_decision(state, &txn, now_ms);
        let mut results = Vec::with_capacity(ops.len());
        for op in ops {
            results.push(match op {
                TxnOp::Put { key, value, lease } => {
                    put(state, key, value, *lease, revision);
                    self.note_change(state, key);
                    TxnOpResult::Put
                }
                TxnOp::Get { key } => TxnOpResult::Get(state.keys.get(key).cloned()),
                TxnOp::Delete { key } => {
                    let deleted = delete(state, key, revision);
                    if deleted.is_some() {
                        self.note_change(state, key);
                    }
                    TxnOpResult::Delete(deleted)
                }
            });
        }
        state.revision = revision;
        if writes {
            notify_watchers(state);
            compact_if_due(state);
        }
        if let Some((actor_id, request, before)) = decision {
            let reply = lease_reply(state, &actor_id, &request, before.as_ref(), holds, now_ms);
            state.decisions.push(DecisionRecord {
                actor_id,
                request,
                before,
                store_now_ms: now_ms,
                decision: Decision { write: None, reply },
            });
        }
        Ok(TxnReply {
            succeeded: holds,
            revision,
            results,
        })
    }

    fn note_change(&self, state: &mut EtcdState, key: &[u8]) {
        if let Some(actor_id) = self.actor_of(&mut state.actor_ids, key) {
            if let Some(kv) = state.keys.get(key) {
                let token = FencingToken(u64::try_from(kv.create_revision).unwrap_or(0));
                state.last_tokens.insert(actor_id.clone(), token);
            }
            state.changed.insert(actor_id);
        }
    }

    /// The lease request a transaction on a lease key stands for, read from its shape, with
    /// the record as it was before (a key whose TTL ran out but that etcd has not deleted is
    /// still held: nobody else can create it until it is deleted). `None` for any other
    /// transaction (a fenced state write, deleting a previous incarnation's key).
    fn lease_decision(
        &self,
        state: &mut EtcdState,
        txn: &Txn,
        now_ms: u64,
    ) -> Option<(ActorId, LeaseRequest, Option<LeaseRecord>)> {
        let first = txn.compares.first()?;
        let actor_id = self.actor_of(&mut state.actor_ids, &first.key)?;
        let (op, node) = match (&first.target, txn.success.first()?) {
            (_, TxnOp::Put { key, .. }) if *key != first.key => return None,
            (CompareTarget::Version(0), TxnOp::Put { value, .. }) => (LeaseOp::Acquire, value),
            (_, TxnOp::Put { value, .. }) => (LeaseOp::Renew, value),
            (_, TxnOp::Delete { .. }) => {
                let node = txn.compares.iter().find_map(|c| match &c.target {
                    CompareTarget::Value(v) => Some(v),
                    _ => None,
                })?;
                (LeaseOp::Release, node)
            }
            _ => return None,
        };
        let node_id = NodeId::new(std::str::from_utf8(node).ok()?).ok()?;
        let before = record_of(state, &first.key, &actor_id, now_ms)
            .filter(|r| r.holder.is_some())
            .map(|mut r| {
                r.expires_at_ms = r.expires_at_ms.max(now_ms + 1);
                r
            });
        let request = LeaseRequest {
            op,
            node_id,
            lease_duration_ms: 0,
            fencing_token: None,
        };
        Some((actor_id, request, before))
    }

    /// Registers a watch for `key`'s deletion from `start_revision`; answered at once from
    /// history if one happened, or refused if the revision was compacted.
    fn watch(
        &self,
        key: Vec<u8>,
        start_revision: i64,
    ) -> oneshot::Receiver<Result<i64, EtcdApiError>> {
        let (sender, receiver) = oneshot::channel();
        let mut state = self.state.borrow_mut();
        if start_revision <= state.compact_revision {
            let compact_revision = state.compact_revision;
            let _ = sender.send(Err(EtcdApiError::Compacted { compact_revision }));
            return receiver;
        }
        let seen = (state.deletes.iter()).find(|(rev, k)| *rev >= start_revision && *k == key);
        if let Some((revision, _)) = seen {
            let _ = sender.send(Ok(*revision));
            return receiver;
        }
        state.watchers.push(Watcher {
            key,
            start_revision,
            reply: sender,
        });
        receiver
    }
}

/// The reply a lease decision stands for, after its transaction: the lease as stored if the
/// compares held, a refusal naming the holder otherwise.
fn lease_reply(
    state: &EtcdState,
    actor_id: &ActorId,
    request: &LeaseRequest,
    before: Option<&LeaseRecord>,
    holds: bool,
    now_ms: u64,
) -> Result<Lease, LeaseError> {
    let node_id = &request.node_id;
    let refused = || LeaseError::NotHolder {
        actor_id: actor_id.clone(),
        node_id: node_id.clone(),
        holder: before.and_then(|b| b.holder.clone()),
    };
    if !holds {
        return Err(refused());
    }
    let token = match (request.op, before) {
        (LeaseOp::Release, Some(before)) => before.fencing_token,
        _ => *state.last_tokens.get(actor_id).ok_or_else(refused)?,
    };
    Ok(Lease {
        actor_id: actor_id.clone(),
        holder: node_id.clone(),
        fencing_token: token,
        acquired_at_ms: now_ms,
        expires_at_ms: now_ms,
        renewal_count: 0,
    })
}

/// The truth of the lease key `key` of `actor_id`.
fn record_of(
    state: &mut EtcdState,
    key: &[u8],
    actor_id: &ActorId,
    now_ms: u64,
) -> Option<LeaseRecord> {
    match state.keys.get(key) {
        Some(kv) => {
            let holder = match state.holders.get(kv.value.as_slice()) {
                Some(holder) => holder.clone(),
                None => {
                    let holder = std::str::from_utf8(&kv.value)
                        .ok()
                        .and_then(|v| NodeId::new(v).ok());
                    state.holders.insert(kv.value.clone(), holder.clone());
                    holder
                }
            };
            let expires_at_ms = key_expires_at_ms(state, kv.lease, now_ms);
            Some(LeaseRecord {
                holder,
                fencing_token: FencingToken(u64::try_from(kv.create_revision).unwrap_or(0)),
                acquired_at_ms: 0,
                expires_at_ms,
                renewal_count: u64::try_from(kv.version - 1).unwrap_or(0),
            })
        }
        None => state.last_tokens.get(actor_id).map(|token| LeaseRecord {
            holder: None,
            fencing_token: *token,
            acquired_at_ms: 0,
            expires_at_ms: 0,
            renewal_count: 0,
        }),
    }
}

/// When the TTL of `lease_id`, which a key is attached to, runs out: `now_ms` for a lease that
/// is gone (a key cannot outlive its lease).
fn key_expires_at_ms(state: &EtcdState, lease_id: i64, now_ms: u64) -> u64 {
    (state.leases.get(&lease_id)).map_or(now_ms, |lease| lease.expires_at_ms)
}

/// Moves `lease`'s expiry to `expires_at_ms`, which is never earlier: the checkers rely on it
/// (an extension alone cannot break an invariant, so they judge a key only when it or a
/// belief in its actor changes, see `StepCache` in `lease_cluster.rs`).
fn extend(lease: &mut SimLease, expires_at_ms: u64) {
    assert!(
        expires_at_ms >= lease.expires_at_ms,
        "a lease's expiry moved earlier: {} -> {expires_at_ms} ms",
        lease.expires_at_ms
    );
    lease.expires_at_ms = expires_at_ms;
}

fn put(state: &mut EtcdState, key: &[u8], value: &[u8], lease: i64, revision: i64) {
    // (lease, create_revision, version) of the key as it was.
    let previous = (state.keys.get(key)).map(|p| (p.lease, p.create_revision, p.version));
    if let Some((previous_lease, _, _)) = previous {
        if previous_lease != lease {
            if let Some(old) = state.leases.get_mut(&previous_lease) {
                old.keys.remove(key);
            }
        }
    }
    if let Some(new) = state.leases.get_mut(&lease) {
        new.keys.insert(key.to_vec());
    }
    state.keys.put(EtcdKeyValue {
        key: key.to_vec(),
        value: value.to_vec(),
        create_revision: previous.map_or(revision, |(_, created, _)| created),
        mod_revision: revision,
        version: previous.map_or(1, |(_, _, version)| version + 1),
        lease,
    });
}

fn delete(state: &mut EtcdState, key: &[u8], revision: i64) -> Option<EtcdKeyValue> {
    let deleted = state.keys.remove(key)?;
    if let Some(lease) = state.leases.get_mut(&deleted.lease) {
        lease.keys.remove(key);
    }
    state.deletes.push((revision, key.to_vec()));
    Some(deleted)
}

/// Revokes `lease_id`: deletes every key attached to it, in one revision.
fn revoke(state: &mut EtcdState, prefix: &[u8], lease_id: i64) {
    let Some(lease) = state.leases.remove(&lease_id) else {
        return;
    };
    if lease.keys.is_empty() {
        return;
    }
    SimEtcd::before_write(state);
    let revision = state.revision + 1;
    for key in &lease.keys {
        if delete(state, key, revision).is_some() {
            if let Some(actor_id) = actor_of(prefix, &mut state.actor_ids, key) {
                state.changed.insert(actor_id);
            }
        }
    }
    state.revision = revision;
    notify_watchers(state);
    compact_if_due(state);
}

fn notify_watchers(state: &mut EtcdState) {
    let deletes = &state.deletes;
    let mut still = Vec::with_capacity(state.watchers.len());
    for watcher in state.watchers.drain(..) {
        let seen = deletes
            .iter()
            .rev()
            .take_while(|(rev, _)| *rev >= watcher.start_revision)
            .find(|(_, k)| *k == watcher.key);
        match seen {
            Some((revision, _)) => {
                let _ = watcher.reply.send(Ok(*revision));
            }
            None => still.push(watcher),
        }
    }
    state.watchers = still;
}

fn compact_if_due(state: &mut EtcdState) {
    if state.revision - state.compact_revision < 2 * SIM_ETCD_COMPACT_EVERY_REVISIONS {
        return;
    }
    let compact_revision = state.revision - SIM_ETCD_COMPACT_EVERY_REVISIONS;
    state.compact_revision = compact_revision;
    state.deletes.retain(|(rev, _)| *rev > compact_revision);
    let mut still = Vec::with_capacity(state.watchers.len());
    for watcher in state.watchers.drain(..) {
        if watcher.start_revision <= compact_revision {
            let _ = watcher
                .reply
                .send(Err(EtcdApiError::Compacted { compact_revision }));
        } else {
            still.push(watcher);
        }
    }
    state.watchers = still;
}

fn range_of(state: &EtcdState, range: &RangeRequest) -> Result<RangeReply, EtcdApiError> {
    if range.revision != 0 && range.revision != state.revision {
        // Reads at an older revision are served only while nothing was written since: pages of
        // one listing that straddle a write start over, as they would after a compaction.
        if range.revision <= state.compact_revision || range.revision > state.revision {
            let compact_revision = state.compact_revision;
            return Err(EtcdApiError::Compacted { compact_revision });
        }
    }
    let mut kvs: Vec<EtcdKeyValue> = match range.range_end.is_empty() {
        // One key: a lookup, not a walk of the sorted names.
        true => state.keys.get(&range.key).cloned().into_iter().collect(),
        false => (state.keys.from(&range.key))
            .take_while(|kv| kv.key < range.range_end)
            .cloned()
            .collect(),
    };
    let limit = usize::try_from(range.limit).unwrap_or(0);
    let more = limit > 0 && kvs.len() > limit;
    if more {
        kvs.truncate(limit);
    }
    Ok(RangeReply {
        kvs,
        more,
        revision: state.revision,
    })
}

/// Serves etcd requests arriving at [`STORE_HOST`], and runs etcd's revoke loop.
pub async fn serve_etcd(env: SimEnv, network: SimNetwork<LeaseMessage>, etcd: SimEtcd) {
    let revoker = {
        let (env, etcd) = (env.clone(), etcd.clone());
        async move {
            loop {
                env.sleep(Duration::from_millis(ETCD_EXPIRY_CHECK_INTERVAL_MS))
                    .await;
                etcd.revoke_expired();
            }
        }
    };
    drop(env.spawn(revoker));
    let mut rng = env.rng("sim-etcd/faults");
    loop {
        let (from, message) = network.recv(STORE_HOST).await;
        let LeaseMessage::EtcdRequest {
            request_id,
            request,
        } = message
        else {
            continue;
        };
        let slow_ms = if env.should_inject(FaultType::StorageLatency) {
            rng.gen_range(1..=SIM_ETCD_SLOW_APPLY_MS_MAX)
        } else {
            0
        };
        // Drawn now, counted where they take effect: a request lost while no leader would
        // have answered it, or a reply lost for a request that was never applied, did nothing.
        let lose_request = env.draw_fault(FaultType::StorageWriteFail);
        // A linearizable read that times out (its read index could not be confirmed).
        let is_read = matches!(request, EtcdRequest::Range(_) | EtcdRequest::TimeToLive(_));
        let fail_read = is_read && env.draw_fault(FaultType::StorageReadFail);
        let lose_reply = env.draw_fault(FaultType::StorageCommitUnknown);
        let (env, network, etcd) = (env.clone(), network.clone(), etcd.clone());
        env.clone().spawn_detached(async move {
            if slow_ms > 0 {
                env.sleep(Duration::from_millis(slow_ms)).await;
            }
            if etcd.is_electing() {
                // No leader: no answer.
                return;
            }
            if lose_request {
                // Lost before it was proposed: no answer.
                env.count_fault(FaultType::StorageWriteFail);
                return;
            }
            let outcome = match request {
                _ if fail_read => {
                    env.count_fault(FaultType::StorageReadFail);
                    Err(EtcdApiError::NoAnswer {
                        reason: "etcdserver: request timed out".to_string(),
                    })
                }
                EtcdRequest::WatchDelete {
                    key,
                    start_revision,
                } => {
                    let waiting = etcd.watch(key, start_revision);
                    match waiting.await {
                        Ok(result) => result.map(EtcdResponse::Deleted),
                        Err(_cancelled) => return,
                    }
                }
                request => etcd.apply(request),
            };
            if lose_reply {
                // Applied, but the reply is lost (etcd's "request timed out" after commit).
                env.count_fault(FaultType::StorageCommitUnknown);
                return;
            }
            network.send(
                STORE_HOST,
                from,
                LeaseMessage::EtcdReply {
                    request_id,
                    outcome,
                },
            );
        });
    }
}

type Pending = Rc<Replies<Result<EtcdResponse, EtcdApiError>>>;

struct NetEtcdInner {
    network: SimNetwork<LeaseMessage>,
    host: HostId,
    clock: SimClock,
    pending: Pending,
    next_request_id: Cell<u64>,
    history: Option<EtcdHistory>,
}

/// A node's connection to the simulated etcd, across the simulated network: the
/// [`EtcdApi`] the production backend runs on in the swarm. Requests never time out here (a
/// real client's call may hang as long); the backend bounds each on its own clock.
pub struct NetEtcd {
    inner: SimThread<Rc<NetEtcdInner>>,
}

impl NetEtcd {
    /// The etcd as seen from `host` (incarnation `incarnation`), recording every request and
    /// what its answer showed in `history` (on global time, read from `clock`). Replies
    /// arriving at `host` go to this connection from now on; those to an earlier incarnation's
    /// requests are dropped.
    pub fn connect(
        network: SimNetwork<LeaseMessage>,
        host: HostId,
        incarnation: u32,
        clock: SimClock,
        history: Option<EtcdHistory>,
    ) -> Self {
        let pending: Pending = Rc::default();
        let reply = |message| match message {
            LeaseMessage::EtcdReply {
                request_id,
                outcome,
            } => Some((request_id, outcome)),
            _ => None,
        };
        route_replies(&network, host, Rc::clone(&pending), reply);
        let inner = NetEtcdInner {
            network,
            host,
            clock,
            pending,
            next_request_id: Cell::new(u64::from(incarnation) << 32),
            history,
        };
        Self {
            inner: SimThread::new(Rc::new(inner)),
        }
    }

    async fn call(&self, request: EtcdRequest) -> Result<EtcdResponse, EtcdApiError> {
        let inner = Rc::clone(&self.inner);
        SimThread::new(async move {
            let Some(history) = inner.history.clone() else {
                return inner.exchange(request).await;
            };
            let index = history.invoke(inner.clock.global_now_ms());
            let outcome = inner.exchange(request.clone()).await;
            let answered_ms = inner.clock.global_now_ms();
            let answered = match (&request, &outcome) {
                (EtcdRequest::Txn(txn), Ok(EtcdResponse::Txn(reply))) => {
                    Some(Answered::of_txn(answered_ms, txn, reply))
                }
                (EtcdRequest::Range(range), Ok(EtcdResponse::Range(reply))) => {
                    Some(Answered::of_range(answered_ms, range, reply))
                }
                _ => None,
            };
            if let Some(answered) = answered {
                history.answer(index, answered);
            }
            outcome
        })
        .await
    }
}

impl NetEtcdInner {
    async fn exchange(&self, request: EtcdRequest) -> Result<EtcdResponse, EtcdApiError> {
        let request_id = self.next_request_id.get();
        self.next_request_id.set(request_id + 1);
        // Dropped with this future if the caller gives up (its timeout): a later reply is
        // then dropped.
        let reply = self.pending.expect(request_id);
        let message = LeaseMessage::EtcdRequest {
            request_id,
            request,
        };
        self.network.send(self.host, STORE_HOST, message);
        reply
            .await
            .expect("a reply awaited without a deadline is never given up")
    }
}

fn unexpected(response: EtcdResponse) -> EtcdApiError {
    EtcdApiError::NoAnswer {
        reason: format!("unexpected answer {response:?}"),
    }
}

impl EtcdApi for NetEtcd {
    async fn txn(&self, txn: Txn) -> Result<TxnReply, EtcdApiError> {
        match self.call(EtcdRequest::Txn(txn)).await? {
            EtcdResponse::Txn(reply) => Ok(reply),
            other => Err(unexpected(other)),
        }
    }

    async fn range(&self, request: RangeRequest) -> Result<RangeReply, EtcdApiError> {
        match self.call(EtcdRequest::Range(request)).await? {
            EtcdResponse::Range(reply) => Ok(reply),
            other => Err(unexpected(other)),
        }
    }

    async fn grant(&self, ttl_s: i64) -> Result<LeaseGrant, EtcdApiError> {
        match self.call(EtcdRequest::Grant(ttl_s)).await? {
            EtcdResponse::Grant(grant) => Ok(grant),
            other => Err(unexpected(other)),
        }
    }

    async fn keep_alive(&self, lease_id: i64) -> Result<bool, EtcdApiError> {
        match self.call(EtcdRequest::KeepAlive(lease_id)).await? {
            EtcdResponse::KeepAlive(alive) => Ok(alive),
            other => Err(unexpected(other)),
        }
    }

    async fn revoke(&self, lease_id: i64) -> Result<(), EtcdApiError> {
        match self.call(EtcdRequest::Revoke(lease_id)).await? {
            EtcdResponse::Revoked => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    async fn time_to_live(&self, lease_id: i64) -> Result<Option<i64>, EtcdApiError> {
        match self.call(EtcdRequest::TimeToLive(lease_id)).await? {
            EtcdResponse::TimeToLive(ttl) => Ok(ttl),
            other => Err(unexpected(other)),
        }
    }

    async fn watch_delete(&self, key: &[u8], start_revision: i64) -> Result<i64, EtcdApiError> {
        let request = EtcdRequest::WatchDelete {
            key: key.to_vec(),
            start_revision,
        };
        match self.call(request).await? {
            EtcdResponse::Deleted(revision) => Ok(revision),
            other => Err(unexpected(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kelpie_lease::etcd_api::Compare;
    use kelpie_sim::SimConfig;

    const KEY: &[u8] = b"/p/a";

    /// Runs `check` against a fresh simulated etcd inside a simulation.
    fn with_etcd(check: impl Fn(&SimEtcd, &SimEnv) + 'static) {
        let check = Rc::new(check);
        kelpie_sim::Simulation::new(SimConfig::new(1))
            .run(move |env| {
                let check = Rc::clone(&check);
                async move {
                    let etcd = SimEtcd::new(&env, "/p/");
                    check(&etcd, &env);
                    Ok::<(), String>(())
                }
            })
            .expect("the simulation runs");
    }

    fn grant(etcd: &SimEtcd, ttl_s: i64) -> LeaseGrant {
        match etcd.apply(EtcdRequest::Grant(ttl_s)) {
            Ok(EtcdResponse::Grant(grant)) => grant,
            other => panic!("{other:?}"),
        }
    }

    fn txn(etcd: &SimEtcd, txn: Txn) -> Result<TxnReply, EtcdApiError> {
        match etcd.apply(EtcdRequest::Txn(txn)) {
            Ok(EtcdResponse::Txn(reply)) => Ok(reply),
            Ok(other) => panic!("{other:?}"),
            Err(error) => Err(error),
        }
    }

    fn create_if_absent(value: &[u8], lease: i64) -> Txn {
        Txn {
            compares: vec![Compare::version(KEY, 0)],
            success: vec![TxnOp::put(KEY, value, lease), TxnOp::get(KEY)],
            failure: vec![TxnOp::get(KEY)],
        }
    }

    #[test]
    fn revisions_versions_and_create_revision_follow_etcd() {
        with_etcd(|etcd, _| {
            let lease = grant(etcd, 5);
            assert_eq!(lease.ttl_s, 5);
            let first = txn(etcd, create_if_absent(b"n1", lease.id)).unwrap();
            assert!(first.succeeded);
            let kv = first.last_key().unwrap().clone();
            assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (1, 1, 1));
            // The compare fails for a second creator; nothing is written.
            let second = txn(etcd, create_if_absent(b"n2", lease.id)).unwrap();
            assert!(!second.succeeded);
            assert_eq!(second.revision, 1);
            assert_eq!(second.last_key().unwrap().value, b"n1");
            // A put keeps the create revision and bumps version and mod revision.
            let rewrite = Txn {
                compares: vec![Compare::create_revision(KEY, 1)],
                success: vec![TxnOp::put(KEY, b"n1", lease.id), TxnOp::get(KEY)],
                failure: vec![],
            };
            let kv = txn(etcd, rewrite).unwrap().last_key().unwrap().clone();
            assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (1, 2, 2));
            // Deleted and created again: a larger create revision, version 1.
            let delete = Txn {
                compares: vec![],
                success: vec![TxnOp::delete(KEY)],
                failure: vec![],
            };
            assert!(txn(etcd, delete).unwrap().succeeded);
            let again = txn(etcd, create_if_absent(b"n2", lease.id)).unwrap();
            let kv = again.last_key().unwrap();
            assert_eq!((kv.create_revision, kv.version), (4, 1));
        });
    }

    /// Range reads list the live keys in key order, whatever order they were created,
    /// rewritten and deleted in; a single-key read finds exactly its key.
    #[test]
    fn ranges_list_live_keys_in_order_and_single_reads_find_one() {
        with_etcd(|etcd, _| {
            let lease = grant(etcd, 5);
            let write = |op: TxnOp| {
                let request = Txn {
                    compares: vec![],
                    success: vec![op],
                    failure: vec![],
                };
                assert!(txn(etcd, request).unwrap().succeeded);
            };
            for name in ["/p/c", "/p/a", "/q/x", "/p/b", "/p/d", "/p/a"] {
                write(TxnOp::put(name.as_bytes(), b"n1", lease.id));
            }
            write(TxnOp::delete(b"/p/b"));
            let range = |key: &[u8], range_end: &[u8], limit: i64| {
                let request = RangeRequest {
                    key: key.to_vec(),
                    range_end: range_end.to_vec(),
                    limit,
                    revision: 0,
                };
                let reply = range_of(&etcd.state.borrow(), &request).unwrap();
                let names: Vec<Vec<u8>> = reply.kvs.iter().map(|kv| kv.key.clone()).collect();
                (names, reply.more)
            };
            let names = |list: &[&str]| -> Vec<Vec<u8>> {
                list.iter().map(|n| n.as_bytes().to_vec()).collect()
            };
            assert_eq!(
                range(b"/p/", b"/p0", 0),
                (names(&["/p/a", "/p/c", "/p/d"]), false)
            );
            assert_eq!(range(b"/p/", b"/p0", 2), (names(&["/p/a", "/p/c"]), true));
            assert_eq!(range(b"/p/b", b"/p0", 0).0, names(&["/p/c", "/p/d"]));
            assert_eq!(range(b"/p/c", b"", 0).0, names(&["/p/c"]));
            assert_eq!(range(b"/p/b", b"", 0).0, names(&[]));
            let state = etcd.state.borrow();
            let a = state.keys.get(b"/p/a").unwrap();
            assert_eq!((a.version, a.mod_revision), (2, 6));
        });
    }

    #[test]
    fn a_put_naming_a_missing_lease_applies_nothing() {
        with_etcd(|etcd, _| {
            let refused = txn(etcd, create_if_absent(b"n1", 999));
            assert_eq!(refused, Err(EtcdApiError::LeaseNotFound));
            assert!(etcd.truth(&ActorId::new("a").unwrap()).is_none());
            assert_eq!(etcd.state.borrow().revision, 0);
        });
    }

    #[test]
    fn grants_are_raised_to_the_minimum_ttl_and_revocation_deletes_the_keys() {
        with_etcd(|etcd, _| {
            let lease = grant(etcd, 1);
            assert_eq!(lease.ttl_s, ETCD_MIN_TTL_S);
            txn(etcd, create_if_absent(b"n1", lease.id)).unwrap();
            let actor = ActorId::new("a").unwrap();
            assert_eq!(etcd.truth(&actor).unwrap().holder.unwrap().as_str(), "n1");
            etcd.apply(EtcdRequest::Revoke(lease.id)).unwrap();
            let truth = etcd.truth(&actor).unwrap();
            assert_eq!((truth.holder, truth.fencing_token), (None, FencingToken(1)));
            match etcd.apply(EtcdRequest::KeepAlive(lease.id)) {
                Ok(EtcdResponse::KeepAlive(alive)) => assert!(!alive),
                other => panic!("{other:?}"),
            }
        });
    }

    /// A keepalive reports its lease extended, not each key's actor changed; a key's truth
    /// names its lease, whose expiry is the record's; a revocation reports the actors.
    #[test]
    fn keepalives_report_the_lease_and_truths_name_it() {
        with_etcd(|etcd, env| {
            let lease = grant(etcd, 5);
            txn(etcd, create_if_absent(b"n1", lease.id)).unwrap();
            let actor = ActorId::new("a").unwrap();
            let (mut changed, mut extended) = (Vec::new(), Vec::new());
            etcd.take_changed_actors_into(&mut changed);
            assert_eq!(changed, vec![actor.clone()]);
            // As if the lease were granted a while ago.
            etcd.state
                .borrow_mut()
                .leases
                .get_mut(&lease.id)
                .unwrap()
                .expires_at_ms = env.now_ms() + 1;
            match etcd.apply(EtcdRequest::KeepAlive(lease.id)) {
                Ok(EtcdResponse::KeepAlive(alive)) => assert!(alive),
                other => panic!("{other:?}"),
            }
            changed.clear();
            etcd.take_changed_actors_into(&mut changed);
            etcd.take_extended_leases_into(&mut extended);
            assert_eq!(
                (changed.len(), extended.as_slice()),
                (0, [lease.id].as_slice())
            );
            let expires_at_ms = env.now_ms() + 5_000;
            assert_eq!(etcd.lease_expires_at_ms(lease.id), expires_at_ms);
            let (record, lease_id) = etcd.truth_and_lease(&actor).unwrap();
            assert_eq!(
                (record.expires_at_ms, lease_id),
                (expires_at_ms, Some(lease.id))
            );
            assert_eq!(etcd.lease_actors(lease.id), vec![actor.clone()]);
            etcd.apply(EtcdRequest::Revoke(lease.id)).unwrap();
            etcd.take_changed_actors_into(&mut changed);
            assert_eq!(changed, vec![actor.clone()]);
            let (record, lease_id) = etcd.truth_and_lease(&actor).unwrap();
            assert_eq!((record.holder, lease_id), (None, None));
            assert_eq!(etcd.lease_expires_at_ms(lease.id), env.now_ms(), "gone");
            assert!(etcd.lease_actors(lease.id).is_empty());
        });
    }

    #[test]
    fn an_expired_lease_is_not_kept_alive_but_a_new_leader_extends_it() {
        with_etcd(|etcd, env| {
            let lease = grant(etcd, 2);
            txn(etcd, create_if_absent(b"n1", lease.id)).unwrap();
            // Past its TTL but not yet revoked (the revoke loop has not run).
            etcd.state
                .borrow_mut()
                .leases
                .get_mut(&lease.id)
                .unwrap()
                .expires_at_ms = env.now_ms();
            match etcd.apply(EtcdRequest::KeepAlive(lease.id)) {
                Ok(EtcdResponse::KeepAlive(alive)) => assert!(!alive),
                other => panic!("{other:?}"),
            }
            etcd.elect(0);
            etcd.end_election();
            let expiry = etcd.state.borrow().leases[&lease.id].expires_at_ms;
            assert_eq!(expiry, env.now_ms() + 2_000, "a full TTL from the takeover");
            assert_eq!(env.fault_fired(FaultType::StorageCrash), 1);
        });
    }

    #[test]
    fn watches_see_deletes_from_their_start_revision_and_refuse_compacted_ones() {
        with_etcd(|etcd, _| {
            let lease = grant(etcd, 5);
            txn(etcd, create_if_absent(b"n1", lease.id)).unwrap();
            let delete = Txn {
                compares: vec![],
                success: vec![TxnOp::delete(KEY)],
                failure: vec![],
            };
            txn(etcd, delete).unwrap();
            let mut seen = etcd.watch(KEY.to_vec(), 1);
            assert_eq!(seen.try_recv().unwrap(), Some(Ok(2)));
            let mut later = etcd.watch(KEY.to_vec(), 3);
            assert_eq!(later.try_recv().unwrap(), None, "waits for a later delete");
            etcd.state.borrow_mut().compact_revision = 2;
            let mut compacted = etcd.watch(KEY.to_vec(), 2);
            assert_eq!(
                compacted.try_recv().unwrap(),
                Some(Err(EtcdApiError::Compacted {
                    compact_revision: 2
                }))
            );
        });
    }
}
