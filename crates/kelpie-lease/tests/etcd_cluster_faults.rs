//! The etcd backend under cluster faults.
//!
//! A three-member etcd cluster on loopback ports. Five workers (nodes), each with its own
//! `EtcdLeaseManager` on all three endpoints, contend for three actors: they acquire (waiting
//! for a release through a watch), write to a fenced resource carrying their token, renew with
//! the token, and release, sometimes abandon a lease, and sometimes stall past their lease's
//! expiry and then write with the token they remember, as a process after a long GC pause would.
//! Meanwhile a harness thread SIGKILLs the leader and restarts it, SIGSTOPs and resumes members
//! (sometimes two at once, so the cluster loses quorum), and restarts members. Then the faults
//! stop, every member runs, and the workers keep going for a healing phase.
//!
//! Every write also goes to the actors' state in etcd through [`EtcdFencedStateStore`], which
//! fences with the lease key itself; each new holder first fences it and reads the state.
//!
//! Asserted:
//! - the fenced resource never accepted a write with a token lower than one it had accepted,
//!   and never accepted one token from two holders (never two holders at once);
//! - the etcd fenced state store lost no acknowledged write and accepted no stale one: every
//!   fence (and the final read) sees a write at least as new, by (token, write number), as
//!   every write acknowledged before the fence was sent (a stale write accepted over a newer
//!   one would show as an older value). Late writes after a stall are counted (refused once
//!   etcd expired the lease; accepted while a lost quorum kept it alive, which is safe: nobody
//!   else can hold it then), and so are writes made in belief that etcd refused (the request
//!   arrived after the lease ended: slow under faults, not stale);
//! - tokens strictly increase per actor across holders: each token was granted to one node,
//!   and a grant that completed before another was requested has the smaller token;
//! - renewals never change the token, and no write a worker made while it believed it held the
//!   lease (by `Lease::expires_at_ms`, a lower bound of etcd's expiry) was refused as stale;
//! - no acknowledged release was lost: once etcd acknowledged a release, no later read of the
//!   actor (the releasing worker reads it right after) and no later grant, by any worker, shows
//!   the released token as the current holder's;
//! - after the faults healed, etcd answered every worker again, and the workers together
//!   acquired at least once per worker and wrote.
//!
//! Ignored by `cargo test`; `scripts/etcd-cluster-faults` runs it. Environment:
//! `KELPIE_FAULT_SECS` (fault phase, default 60), `KELPIE_HEAL_SECS` (healing phase, default
//! 20), `KELPIE_FAULT_SEED` (the workers' and the harness's choices, default 1), `ETCD_BIN`.

mod etcd_support;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_support::{etcd_binary, sleep_ms, EtcdMember, Stopwatch};
use kelpie_core::{ActorId, FencingToken, NodeId, SharedClock, TokioClock};
use kelpie_lease::{
    limits::ETCD_EXPIRY_CHECK_INTERVAL_MS, EtcdFencedStateStore, EtcdLeaseManager, EtcdOptions,
    FencedStateStore, Lease, LeaseConfig, LeaseError, LeaseManager, StateError,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const MEMBERS: usize = 3;
const WORKERS: usize = 5;
const ACTORS: usize = 3;
const LEASE_DURATION_MS: u64 = 2_000;
/// A worker writes only while its lease's expiry is at least this far ahead on its clock.
const BELIEF_MARGIN_MS: u64 = 300;
/// How long a worker waits for a held actor before trying another.
const ACQUIRE_WAIT_MS: u64 = 2_500;
/// etcd's raft timing for the cluster: half its defaults, so that a new leader is elected
/// about half a second after the old one dies. Its minimum lease TTL stays below 2 s.
const ETCD_TIMING_ARGS: [&str; 4] = ["--heartbeat-interval", "50", "--election-timeout", "500"];
const REQUEST_TIMEOUT_MS: u64 = 1_000;
const CONNECT_TIMEOUT_MS: u64 = 3_000;
/// One hold in this many stalls past expiry and then writes late.
const STALL_ONE_IN: u32 = 5;
/// How long a stall lasts beyond the time etcd needs to expire and delete the lease, at most:
/// long enough for a waiting contender to take the actor over first.
const STALL_BEYOND_EXPIRY_MS_MAX: u64 = 3_000;
/// One hold in this many ends without a release.
const ABANDON_ONE_IN: u32 = 8;
const WRITES_PER_HOLD_MAX: u32 = 5;
const FAULT_SECS_DEFAULT: u64 = 60;
const HEAL_SECS_DEFAULT: u64 = 20;
/// How long the cluster may take to elect a leader at start.
const LEADER_WAIT_MS: u64 = 20_000;
/// How long workers may take to finish their current operation once told to stop.
const WORKER_STOP_TIMEOUT_MS: u64 = 20_000;

/// A resource that refuses writes carrying a token lower than the highest it accepted for the
/// actor, as a fenced database or object store does. It logs what it accepted.
#[derive(Default)]
struct FencedResource {
    accepted: Mutex<BTreeMap<ActorId, Vec<(FencingToken, NodeId)>>>,
}

impl FencedResource {
    /// Applies a write; `true` if accepted, `false` if refused as stale.
    fn write(&self, actor_id: &ActorId, node_id: &NodeId, token: FencingToken) -> bool {
        let mut accepted = self.accepted.lock().unwrap();
        let log = accepted.entry(actor_id.clone()).or_default();
        if log.last().is_some_and(|(highest, _)| token < *highest) {
            return false;
        }
        log.push((token, node_id.clone()));
        true
    }

    /// Accepted writes that break fencing: a lower token after a higher one, or one token from
    /// two holders.
    fn violations(&self) -> Vec<String> {
        let accepted = self.accepted.lock().unwrap();
        let mut violations = Vec::new();
        for (actor_id, log) in accepted.iter() {
            for pair in log.windows(2) {
                let ((t0, n0), (t1, n1)) = (&pair[0], &pair[1]);
                if t1 < t0 {
                    violations.push(format!("{actor_id}: accepted token {t1} after {t0}"));
                }
                if t1 == t0 && n1 != n0 {
                    violations.push(format!("{actor_id}: token {t0} written by {n0} and {n1}"));
                }
            }
        }
        violations
    }

    fn accepted_total(&self) -> usize {
        self.accepted.lock().unwrap().values().map(Vec::len).sum()
    }
}

/// What a state write carries, in the order etcd must keep: the writer's token, then the
/// history position the write was numbered with (a holder writes one at a time).
type StateKey = (u64, u64);

fn state_value((token, number): StateKey) -> Vec<u8> {
    format!("{token}:{number}").into_bytes()
}

fn state_key_of(value: &[u8]) -> StateKey {
    let text = std::str::from_utf8(value).expect("state values are text");
    let (token, number) = text.split_once(':').expect("token:number");
    (token.parse().unwrap(), number.parse().unwrap())
}

/// What the lost-write check found: the violations, and the reads it excused.
#[derive(Debug, Default)]
struct LostWrites {
    /// Reads that missed an acknowledged write, described.
    violations: Vec<String>,
    /// Reads that showed a write of unknown outcome, with the same token as (so by the same
    /// holder as) the newest acknowledged one, and older: the request reached etcd after its
    /// writer had given up on it and written again. Equal tokens are accepted, so the store
    /// allows this (see `FencedStateStore::write`).
    late_own_writes: usize,
}

/// Acknowledged writes the etcd state store lost: a fence (or the final read) that saw an
/// older write than one acknowledged before it was sent, unless what it saw is the same
/// holder's write of unknown outcome landing late.
fn lost_state_writes(
    writes: &[(ActorId, StateKey, u64)],
    unknown: &[(ActorId, StateKey)],
    fences: &[(ActorId, Option<StateKey>, u64)],
) -> LostWrites {
    let mut found = LostWrites::default();
    for (actor_id, seen, sent_seq) in fences {
        let newest_acknowledged = writes
            .iter()
            .filter(|(a, _, acked_seq)| a == actor_id && acked_seq < sent_seq)
            .map(|(_, key, _)| *key)
            .max();
        let Some(newest) = newest_acknowledged else {
            continue;
        };
        match seen {
            Some(seen) if *seen >= newest => {}
            Some(seen)
                if seen.0 == newest.0
                    && unknown.iter().any(|(a, key)| a == actor_id && key == seen) =>
            {
                found.late_own_writes += 1;
            }
            _ => found.violations.push(format!(
                "{actor_id}: a read sent at position {sent_seq} saw {seen:?}, but {newest:?} \
                 was acknowledged before"
            )),
        }
    }
    found
}

/// One successful acquire, timed on the shared clock.
#[derive(Debug, Clone)]
struct Grant {
    actor_id: ActorId,
    node_id: NodeId,
    token: FencingToken,
    requested_at_ms: u64,
    granted_at_ms: u64,
    /// The history position when the acquire was sent (see [`Shared::next_seq`]).
    requested_seq: u64,
}

/// A release etcd acknowledged.
#[derive(Debug, Clone)]
struct Release {
    actor_id: ActorId,
    node_id: NodeId,
    token: FencingToken,
    /// The history position when the acknowledgement arrived.
    acknowledged_seq: u64,
}

/// A read of an actor's lease: the token of whoever held it then, if anyone did.
#[derive(Debug, Clone)]
struct Observation {
    actor_id: ActorId,
    token: Option<FencingToken>,
    /// The history position when the read was sent.
    requested_seq: u64,
}

/// What the release check found.
#[derive(Debug, Default)]
struct ReleaseCheck {
    /// Acknowledged releases followed by at least one read or grant of the actor.
    checked: usize,
    /// Later reads and grants compared with an acknowledged release.
    comparisons: usize,
    violations: Vec<String>,
}

/// Checks that no acknowledged release was lost: every read or grant of the actor sent after a
/// release was acknowledged must show another token than the released one (or none). A read
/// still showing it would mean the key survived the delete etcd acknowledged; a grant of it
/// would mean its holder re-acquired a lease it had released without getting a new token.
fn release_check(
    releases: &[Release],
    grants: &[Grant],
    observations: &[Observation],
) -> ReleaseCheck {
    let mut check = ReleaseCheck::default();
    for release in releases {
        let after = |actor_id: &ActorId, requested_seq: u64| {
            *actor_id == release.actor_id && requested_seq > release.acknowledged_seq
        };
        let read_tokens = observations
            .iter()
            .filter(|o| after(&o.actor_id, o.requested_seq))
            .map(|o| ("read", o.token));
        let granted_tokens = grants
            .iter()
            .filter(|g| after(&g.actor_id, g.requested_seq))
            .map(|g| ("grant", Some(g.token)));
        let mut compared = 0;
        for (what, token) in read_tokens.chain(granted_tokens) {
            compared += 1;
            if token == Some(release.token) {
                check.violations.push(format!(
                    "{}: a {what} after {}'s release of token {} was acknowledged still shows it",
                    release.actor_id, release.node_id, release.token
                ));
            }
        }
        check.comparisons += compared;
        if compared > 0 {
            check.checked += 1;
        }
    }
    check
}

/// Grants that break "tokens strictly increase per actor across holders".
fn grant_violations(grants: &[Grant]) -> Vec<String> {
    let mut violations = Vec::new();
    let mut holders: BTreeMap<(ActorId, FencingToken), NodeId> = BTreeMap::new();
    for g in grants {
        let key = (g.actor_id.clone(), g.token);
        match holders.get(&key) {
            Some(holder) if *holder != g.node_id => violations.push(format!(
                "{}: token {} granted to {holder} and {}",
                g.actor_id, g.token, g.node_id
            )),
            Some(_) => {}
            None => {
                holders.insert(key, g.node_id.clone());
            }
        }
    }
    for earlier in grants {
        for later in grants {
            let ordered = earlier.granted_at_ms < later.requested_at_ms;
            let same_actor = earlier.actor_id == later.actor_id;
            if same_actor && ordered && earlier.token != later.token && earlier.token > later.token
            {
                violations.push(format!(
                    "{}: token {} granted before {} was asked for, which got {}",
                    earlier.actor_id, earlier.token, later.node_id, later.token
                ));
            }
        }
    }
    violations
}

/// What one worker did.
#[derive(Default)]
struct WorkerStats {
    acquires: AtomicU64,
    refused: AtomicU64,
    renewals: AtomicU64,
    lost: AtomicU64,
    releases: AtomicU64,
    abandoned: AtomicU64,
    store_errors: AtomicU64,
    writes_accepted: AtomicU64,
    /// Writes made while the worker believed it held the lease, refused as stale. Must be 0.
    believed_writes_refused: AtomicU64,
    /// Late writes after a stall, refused because another holder had a larger token.
    late_writes_refused: AtomicU64,
    /// Late writes accepted because nobody had taken the actor meanwhile.
    late_writes_accepted: AtomicU64,
    /// Renewals that returned another token. Must be 0.
    renewals_changing_token: AtomicU64,
    /// Writes to the etcd state store acknowledged.
    state_writes_acknowledged: AtomicU64,
    /// Writes to the etcd state store made in belief and refused: the request reached etcd
    /// after the lease ended.
    state_believed_writes_refused: AtomicU64,
    /// Late writes to the etcd state store after a stall, refused.
    state_late_writes_refused: AtomicU64,
    /// Late writes to the etcd state store after a stall, accepted: etcd had not expired the
    /// lease (a lost quorum keeps leases alive), so nobody else held it.
    state_late_writes_accepted: AtomicU64,
    /// Operations etcd answered, with a lease or a refusal: the worker is not stuck.
    answered: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

fn read(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// What the workers share.
struct Shared {
    endpoints: Vec<String>,
    clock: SharedClock,
    actors: Vec<ActorId>,
    resource: FencedResource,
    grants: Mutex<Vec<Grant>>,
    releases: Mutex<Vec<Release>>,
    /// Writes the etcd state store acknowledged: (actor, (token, write number), position).
    state_writes: Mutex<Vec<(ActorId, StateKey, u64)>>,
    /// Writes whose outcome stayed unknown (a store error): they may land later.
    state_writes_unknown: Mutex<Vec<(ActorId, StateKey)>>,
    /// Fences of the etcd state store: (actor, what it read, position when it was sent).
    state_fences: Mutex<Vec<(ActorId, Option<StateKey>, u64)>>,
    observations: Mutex<Vec<Observation>>,
    /// Orders the recorded history: an event whose position is taken after another's
    /// happened after it (the counter is sequentially consistent across workers).
    sequence: AtomicU64,
    workers: Vec<WorkerStats>,
    stop: AtomicBool,
}

impl Shared {
    /// The next position in the recorded history.
    fn next_seq(&self) -> u64 {
        self.sequence.fetch_add(1, Ordering::SeqCst)
    }
}

/// How every worker (and the final read) connects.
fn worker_options(shared: &Shared) -> EtcdOptions {
    EtcdOptions::new(shared.endpoints.clone())
        .with_key_prefix("/kelpie-faults/")
        .with_lease_config(LeaseConfig::new(LEASE_DURATION_MS).unwrap())
        .with_request_timeout_ms(REQUEST_TIMEOUT_MS)
        .with_connect_timeout_ms(CONNECT_TIMEOUT_MS)
        .with_clock(shared.clock.clone())
}

async fn connect_worker(shared: &Shared) -> Option<EtcdLeaseManager> {
    let options = worker_options(shared);
    while !shared.stop.load(Ordering::SeqCst) {
        match EtcdLeaseManager::connect(options.clone()).await {
            Ok(manager) => return Some(manager),
            Err(_) => sleep_ms(200).await,
        }
    }
    None
}

async fn run_worker(shared: Arc<Shared>, index: usize, seed: u64) {
    let me = NodeId::new(format!("worker-{index}")).unwrap();
    let Some(manager) = connect_worker(&shared).await else {
        return;
    };
    let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_add(index as u64));
    let stats = &shared.workers[index];
    while !shared.stop.load(Ordering::SeqCst) {
        let actor_id = shared.actors[rng.gen_range(0..ACTORS)].clone();
        let requested_at_ms = shared.clock.now_ms();
        let requested_seq = shared.next_seq();
        match manager
            .acquire_waiting(&actor_id, &me, ACQUIRE_WAIT_MS)
            .await
        {
            Ok(lease) => {
                bump(&stats.acquires);
                bump(&stats.answered);
                shared.grants.lock().unwrap().push(Grant {
                    actor_id: actor_id.clone(),
                    node_id: me.clone(),
                    token: lease.fencing_token,
                    requested_at_ms,
                    granted_at_ms: shared.clock.now_ms(),
                    requested_seq,
                });
                hold(&shared, &manager, lease, &mut rng, stats).await;
            }
            Err(LeaseError::HeldByOther { .. }) => {
                bump(&stats.refused);
                bump(&stats.answered);
            }
            Err(_) => {
                bump(&stats.store_errors);
                sleep_ms(100).await;
            }
        }
    }
}

/// Writes and renews while the lease holds, then releases (or abandons) it.
async fn hold(
    shared: &Shared,
    manager: &EtcdLeaseManager,
    mut lease: Lease,
    rng: &mut ChaCha8Rng,
    stats: &WorkerStats,
) {
    let (actor_id, me, token) = (
        lease.actor_id.clone(),
        lease.holder.clone(),
        lease.fencing_token,
    );
    let state = manager.fenced_state_store();
    let fence_seq = shared.next_seq();
    match state.fence(&actor_id, token).await {
        Ok(fenced) => {
            let seen = fenced.value.as_deref().map(state_key_of);
            shared
                .state_fences
                .lock()
                .unwrap()
                .push((actor_id.clone(), seen, fence_seq));
        }
        Err(StateError::Store(_)) => bump(&stats.store_errors),
        // Lost already (the lease expired during a fault): nothing to write under it.
        Err(_) => return bump(&stats.lost),
    }
    if rng.gen_ratio(1, STALL_ONE_IN) {
        return stall_then_write_late(shared, &state, &lease, rng, stats).await;
    }
    for _ in 0..rng.gen_range(1..=WRITES_PER_HOLD_MAX) {
        // Check the belief and write with nothing in between that could yield.
        let believed = shared.clock.now_ms() + BELIEF_MARGIN_MS < lease.expires_at_ms;
        if !believed {
            break;
        }
        if shared.resource.write(&actor_id, &me, token) {
            bump(&stats.writes_accepted);
        } else {
            bump(&stats.believed_writes_refused);
        }
        write_state(shared, &state, &actor_id, token, stats).await;
        sleep_ms(rng.gen_range(100..400)).await;
        match manager.renew_fenced(&actor_id, &me, token).await {
            Ok(renewed) => {
                bump(&stats.renewals);
                bump(&stats.answered);
                if renewed.fencing_token != token {
                    bump(&stats.renewals_changing_token);
                }
                lease = renewed;
            }
            Err(error) if error.is_refusal() => {
                bump(&stats.answered);
                return bump(&stats.lost);
            }
            // The outcome is unknown or etcd is unreachable: keep the old belief, which runs
            // out on its own.
            Err(_) => bump(&stats.store_errors),
        }
    }
    if rng.gen_ratio(1, ABANDON_ONE_IN) {
        return bump(&stats.abandoned);
    }
    match manager.release_fenced(&actor_id, &me, token).await {
        Ok(_) => {
            bump(&stats.releases);
            bump(&stats.answered);
            shared.releases.lock().unwrap().push(Release {
                actor_id: actor_id.clone(),
                node_id: me.clone(),
                token,
                acknowledged_seq: shared.next_seq(),
            });
            observe(shared, manager, &actor_id, stats).await;
        }
        Err(error) if error.is_refusal() => {
            bump(&stats.lost);
            bump(&stats.answered);
        }
        Err(_) => bump(&stats.store_errors),
    }
}

/// Writes the actor's state in etcd under `token`, in belief, and records the acknowledgement.
async fn write_state(
    shared: &Shared,
    state: &EtcdFencedStateStore,
    actor_id: &ActorId,
    token: FencingToken,
    stats: &WorkerStats,
) {
    let key = (token.0, shared.next_seq());
    match state.write(actor_id, token, &state_value(key)).await {
        Ok(()) => {
            bump(&stats.state_writes_acknowledged);
            let acked_seq = shared.next_seq();
            shared
                .state_writes
                .lock()
                .unwrap()
                .push((actor_id.clone(), key, acked_seq));
        }
        Err(StateError::Store(_)) => {
            bump(&stats.store_errors);
            let unknown = (actor_id.clone(), key);
            shared.state_writes_unknown.lock().unwrap().push(unknown);
        }
        // The lease ended before the write reached etcd's compare (a slow request).
        Err(_) => bump(&stats.state_believed_writes_refused),
    }
}

/// Reads the actor's lease and records whose token it shows, for the release check.
async fn observe(
    shared: &Shared,
    manager: &EtcdLeaseManager,
    actor_id: &ActorId,
    stats: &WorkerStats,
) {
    let requested_seq = shared.next_seq();
    match manager.get(actor_id).await {
        Ok(lease) => shared.observations.lock().unwrap().push(Observation {
            actor_id: actor_id.clone(),
            token: lease.map(|l| l.fencing_token),
            requested_seq,
        }),
        Err(_) => bump(&stats.store_errors),
    }
}

/// Stalls past the lease's expiry (no keepalives, as in a long pause), then writes with the
/// remembered token without checking anything, as a paused process would on waking.
async fn stall_then_write_late(
    shared: &Shared,
    state: &EtcdFencedStateStore,
    lease: &Lease,
    rng: &mut ChaCha8Rng,
    stats: &WorkerStats,
) {
    let expired_ms = LEASE_DURATION_MS + 2 * ETCD_EXPIRY_CHECK_INTERVAL_MS;
    let stall_ms = expired_ms + rng.gen_range(1_000..STALL_BEYOND_EXPIRY_MS_MAX);
    sleep_ms(stall_ms).await;
    if shared
        .resource
        .write(&lease.actor_id, &lease.holder, lease.fencing_token)
    {
        bump(&stats.late_writes_accepted);
    } else {
        bump(&stats.late_writes_refused);
    }
    let key = (lease.fencing_token.0, shared.next_seq());
    let value = state_value(key);
    match state
        .write(&lease.actor_id, lease.fencing_token, &value)
        .await
    {
        Ok(()) => bump(&stats.state_late_writes_accepted),
        Err(StateError::Store(_)) => bump(&stats.store_errors),
        Err(_) => bump(&stats.state_late_writes_refused),
    }
}

/// What the harness did to the cluster.
#[derive(Debug, Default, Clone, Copy)]
struct FaultCounts {
    leader_kills: u64,
    member_kills: u64,
    restarts: u64,
    stops: u64,
    quorum_losses: u64,
    no_leader_found: u64,
}

/// The three members and a way to ask them who leads.
struct Cluster {
    members: Vec<EtcdMember>,
    runtime: tokio::runtime::Runtime,
}

impl Cluster {
    fn start(binary: &Path, dir: &Path) -> Self {
        let members = EtcdMember::start_cluster(binary, dir, MEMBERS, &ETCD_TIMING_ARGS);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let cluster = Self { members, runtime };
        let waited = Stopwatch::start();
        while cluster.leader().is_none() {
            assert!(waited.elapsed_ms() < LEADER_WAIT_MS, "no leader elected");
            blocking_sleep_ms(100);
        }
        cluster
    }

    fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(EtcdMember::endpoint).collect()
    }

    /// The index of the member that says it leads, asking each running member in turn.
    fn leader(&self) -> Option<usize> {
        let alive = |m: &&EtcdMember| m.is_running() && !m.is_stopped();
        for (index, member) in self.members.iter().enumerate().filter(|(_, m)| alive(m)) {
            let asking = async {
                let mut client = etcd_client::Client::connect([member.endpoint()], None).await?;
                client.status().await
            };
            let timeout = Duration::from_millis(500);
            let Ok(Ok(status)) = self
                .runtime
                .block_on(async { tokio::time::timeout(timeout, asking).await })
            else {
                continue;
            };
            let own_id = status.header().map(|h| h.member_id());
            if own_id == Some(status.leader()) {
                return Some(index);
            }
        }
        None
    }

    /// Every member running and resumed.
    fn heal(&mut self) {
        for member in &mut self.members {
            if member.is_stopped() {
                member.resume();
            }
            if !member.is_running() {
                member.start();
            }
        }
    }
}

/// A real sleep on the harness's own OS thread, which drives real processes and never runs
/// inside the simulator.
#[allow(clippy::disallowed_methods)]
fn blocking_sleep_ms(duration_ms: u64) {
    std::thread::sleep(Duration::from_millis(duration_ms));
}

/// Injects faults, one kind at a time, for `fault_ms`.
fn inject_faults(cluster: &mut Cluster, fault_ms: u64, rng: &mut ChaCha8Rng) -> FaultCounts {
    let mut counts = FaultCounts::default();
    let clock = Stopwatch::start();
    while clock.elapsed_ms() < fault_ms {
        blocking_sleep_ms(rng.gen_range(1_000..2_500));
        match rng.gen_range(0..10) {
            0..=3 => cluster.kill_leader_for_a_while(rng, &mut counts),
            4..=6 => cluster.pause_one_for_a_while(rng, &mut counts),
            7..=8 => cluster.restart_one(rng, &mut counts),
            _ => cluster.lose_quorum_for_a_while(rng, &mut counts),
        }
    }
    counts
}

impl Cluster {
    /// SIGKILLs the leader, leaves it down for 1 to 3 s, and restarts it.
    fn kill_leader_for_a_while(&mut self, rng: &mut ChaCha8Rng, counts: &mut FaultCounts) {
        let Some(leader) = self.leader() else {
            counts.no_leader_found += 1;
            return;
        };
        self.members[leader].kill();
        counts.leader_kills += 1;
        blocking_sleep_ms(rng.gen_range(1_000..3_000));
        self.members[leader].start();
        counts.restarts += 1;
    }

    /// SIGSTOPs a member for 1 to 4 s, then SIGCONTs it.
    fn pause_one_for_a_while(&mut self, rng: &mut ChaCha8Rng, counts: &mut FaultCounts) {
        let index = rng.gen_range(0..MEMBERS);
        self.members[index].pause();
        counts.stops += 1;
        blocking_sleep_ms(rng.gen_range(1_000..4_000));
        self.members[index].resume();
    }

    /// SIGKILLs a member and starts it again at once.
    fn restart_one(&mut self, rng: &mut ChaCha8Rng, counts: &mut FaultCounts) {
        let index = rng.gen_range(0..MEMBERS);
        self.members[index].kill();
        counts.member_kills += 1;
        self.members[index].start();
        counts.restarts += 1;
    }

    /// SIGSTOPs two of the three members for 1 to 2.5 s: no quorum, so no writes and no
    /// expiry until they resume.
    fn lose_quorum_for_a_while(&mut self, rng: &mut ChaCha8Rng, counts: &mut FaultCounts) {
        let first = rng.gen_range(0..MEMBERS);
        let second = (first + rng.gen_range(1..MEMBERS)) % MEMBERS;
        self.members[first].pause();
        self.members[second].pause();
        counts.stops += 2;
        counts.quorum_losses += 1;
        blocking_sleep_ms(rng.gen_range(1_000..2_500));
        self.members[first].resume();
        self.members[second].resume();
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a whole number")),
        Err(_) => default,
    }
}

/// One worker's progress counters at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Progress {
    writes: u64,
    acquires: u64,
    answered: u64,
}

impl Progress {
    fn since(self, earlier: Progress) -> Progress {
        Progress {
            writes: self.writes - earlier.writes,
            acquires: self.acquires - earlier.acquires,
            answered: self.answered - earlier.answered,
        }
    }
}

/// Each worker's progress so far.
fn progress(shared: &Shared) -> Vec<Progress> {
    let workers = shared.workers.iter();
    workers
        .map(|w| Progress {
            writes: read(&w.writes_accepted),
            acquires: read(&w.acquires),
            answered: read(&w.answered),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "runs a three-member etcd cluster under faults for over a minute; run scripts/etcd-cluster-faults"]
async fn contending_workers_stay_fenced_through_cluster_faults() {
    let Some(binary) = etcd_binary("etcd_cluster_faults") else {
        return;
    };
    let fault_ms = env_u64("KELPIE_FAULT_SECS", FAULT_SECS_DEFAULT) * 1_000;
    let heal_ms = env_u64("KELPIE_HEAL_SECS", HEAL_SECS_DEFAULT) * 1_000;
    let seed = env_u64("KELPIE_FAULT_SEED", 1);
    let dir = tempfile::tempdir().unwrap();
    let started = Stopwatch::start();
    let cluster_dir = dir.path().to_path_buf();
    let mut cluster = tokio::task::spawn_blocking(move || Cluster::start(&binary, &cluster_dir))
        .await
        .unwrap();
    let shared = Arc::new(Shared {
        endpoints: cluster.endpoints(),
        clock: Arc::new(TokioClock::new()),
        actors: (0..ACTORS)
            .map(|i| ActorId::new(format!("actor-{i}")).unwrap())
            .collect(),
        resource: FencedResource::default(),
        grants: Mutex::new(Vec::new()),
        releases: Mutex::new(Vec::new()),
        state_writes: Mutex::new(Vec::new()),
        state_writes_unknown: Mutex::new(Vec::new()),
        state_fences: Mutex::new(Vec::new()),
        observations: Mutex::new(Vec::new()),
        sequence: AtomicU64::new(0),
        workers: (0..WORKERS).map(|_| WorkerStats::default()).collect(),
        stop: AtomicBool::new(false),
    });
    let workers: Vec<_> = (0..WORKERS)
        .map(|i| tokio::spawn(run_worker(shared.clone(), i, seed)))
        .collect();
    let (cluster, faults) = tokio::task::spawn_blocking(move || {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_fa17);
        let faults = inject_faults(&mut cluster, fault_ms, &mut rng);
        cluster.heal();
        (cluster, faults)
    })
    .await
    .unwrap();
    let at_heal = progress(&shared);
    sleep_ms(heal_ms).await;
    let at_end = progress(&shared);
    shared.stop.store(true, Ordering::SeqCst);
    let stopping = futures::future::join_all(workers);
    let stopped = tokio::time::timeout(Duration::from_millis(WORKER_STOP_TIMEOUT_MS), stopping);
    assert!(stopped.await.is_ok(), "workers did not stop");
    final_state_reads(&shared).await;
    let elapsed_s = started.elapsed_ms() / 1_000;
    // The cluster owns a runtime of its own, which may only be dropped outside async code.
    tokio::task::spawn_blocking(move || drop(cluster))
        .await
        .unwrap();
    report_and_check(&shared, &faults, &at_heal, &at_end, elapsed_s);
}

/// Reads every actor's state once the workers stopped, as fences at the end of the history.
async fn final_state_reads(shared: &Shared) {
    let manager = EtcdLeaseManager::connect(worker_options(shared))
        .await
        .expect("etcd answers after healing");
    let state = manager.fenced_state_store();
    for actor_id in &shared.actors {
        let sent_seq = shared.next_seq();
        let read = state
            .read(actor_id)
            .await
            .expect("etcd answers after healing");
        let seen = read.and_then(|r| r.value).as_deref().map(state_key_of);
        shared
            .state_fences
            .lock()
            .unwrap()
            .push((actor_id.clone(), seen, sent_seq));
    }
}

fn report_and_check(
    shared: &Shared,
    faults: &FaultCounts,
    at_heal: &[Progress],
    at_end: &[Progress],
    elapsed_s: u64,
) {
    let sum = |f: fn(&WorkerStats) -> &AtomicU64| -> u64 {
        shared.workers.iter().map(|w| read(f(w))).sum()
    };
    let grants = shared.grants.lock().unwrap().clone();
    println!(
        "etcd cluster faults: {MEMBERS} members, {WORKERS} workers, {ACTORS} actors, {elapsed_s} s"
    );
    println!(
        "  faults: {} leader SIGKILLs, {} other member SIGKILLs, {} restarts, {} SIGSTOPs \
         ({} with two members stopped: quorum lost), {} times no leader to kill",
        faults.leader_kills,
        faults.member_kills,
        faults.restarts,
        faults.stops,
        faults.quorum_losses,
        faults.no_leader_found
    );
    println!(
        "  operations: {} acquires ({} refused as held), {} renewals, {} releases, \
         {} leases lost, {} abandoned, {} store errors (unavailable or outcome unknown)",
        sum(|w| &w.acquires),
        sum(|w| &w.refused),
        sum(|w| &w.renewals),
        sum(|w| &w.releases),
        sum(|w| &w.lost),
        sum(|w| &w.abandoned),
        sum(|w| &w.store_errors)
    );
    println!(
        "  fenced writes: {} accepted; after stalls past expiry: {} stale writes rejected, \
         {} accepted (nobody had taken the actor); {} writes made in belief refused",
        shared.resource.accepted_total(),
        sum(|w| &w.late_writes_refused),
        sum(|w| &w.late_writes_accepted),
        sum(|w| &w.believed_writes_refused)
    );
    let state_writes = shared.state_writes.lock().unwrap().clone();
    let state_fences = shared.state_fences.lock().unwrap().clone();
    let state_unknown = shared.state_writes_unknown.lock().unwrap().clone();
    let lost_writes = lost_state_writes(&state_writes, &state_unknown, &state_fences);
    println!(
        "  etcd fenced state: {} writes acknowledged, {} reads by fences and at the end, \
         {} acknowledged writes lost, {} of {} writes of unknown outcome seen landing after \
         their holder's later writes; after stalls: {} late writes refused, {} accepted; \
         {} writes made in belief refused",
        sum(|w| &w.state_writes_acknowledged),
        state_fences.len(),
        lost_writes.violations.len(),
        lost_writes.late_own_writes,
        state_unknown.len(),
        sum(|w| &w.state_late_writes_refused),
        sum(|w| &w.state_late_writes_accepted),
        sum(|w| &w.state_believed_writes_refused)
    );
    let releases = shared.releases.lock().unwrap().clone();
    let observations = shared.observations.lock().unwrap().clone();
    let released = release_check(&releases, &grants, &observations);
    println!(
        "  acknowledged releases: {} in all, {} checked (a later read or grant of the actor \
         seen; {} such comparisons, {} reads recorded), {} lost (released token seen again)",
        releases.len(),
        released.checked,
        released.comparisons,
        observations.len(),
        released.violations.len()
    );
    let healed: Vec<Progress> = at_end
        .iter()
        .zip(at_heal)
        .map(|(e, h)| e.since(*h))
        .collect();
    let per_worker: Vec<_> = healed
        .iter()
        .map(|p| (p.answered, p.acquires, p.writes))
        .collect();
    println!("  after healing, per worker (operations answered, acquires, accepted writes): {per_worker:?}");

    let fencing = shared.resource.violations();
    assert!(fencing.is_empty(), "fencing violated: {fencing:#?}");
    assert!(
        lost_writes.violations.is_empty(),
        "acknowledged state writes lost: {:#?}",
        lost_writes.violations
    );
    assert!(
        sum(|w| &w.state_writes_acknowledged) > 0 && sum(|w| &w.state_late_writes_refused) > 0,
        "the etcd state store was not exercised"
    );
    let ordering = grant_violations(&grants);
    assert!(
        ordering.is_empty(),
        "tokens did not increase: {ordering:#?}"
    );
    assert!(
        released.violations.is_empty(),
        "acknowledged releases lost: {:#?}",
        released.violations
    );
    assert!(released.checked > 0, "no acknowledged release was checked");
    assert_eq!(
        sum(|w| &w.renewals_changing_token),
        0,
        "a renewal changed a token"
    );
    assert_eq!(
        sum(|w| &w.believed_writes_refused),
        0,
        "a write made while its lease was believed valid was refused as stale"
    );
    assert!(faults.leader_kills + faults.member_kills > 0 && faults.stops > 0);
    // Every worker's requests are answered again, and the workers as a group hold and write.
    for (index, progress) in healed.iter().enumerate() {
        assert!(
            progress.answered > 0,
            "worker-{index} got no answer from etcd after the faults healed"
        );
    }
    let healed_writes: u64 = healed.iter().map(|p| p.writes).sum();
    let healed_acquires: u64 = healed.iter().map(|p| p.acquires).sum();
    assert!(
        healed_writes > 0 && healed_acquires >= WORKERS as u64,
        "too little progress after healing: {healed_acquires} acquires, {healed_writes} writes"
    );
}

/// The release check itself, on a made-up history: it must flag a read or a grant sent after
/// an acknowledged release that still shows the released token, and nothing else.
/// The lost-write check flags a read that misses a write acknowledged before it was sent, and
/// nothing else; a read showing the same holder's write of unknown outcome is counted apart.
#[test]
fn lost_state_writes_flags_only_a_read_older_than_an_earlier_acknowledgement() {
    let a = ActorId::new("a").unwrap();
    let writes = vec![(a.clone(), (5, 10), 11), (a.clone(), (7, 20), 21)];
    let fine = vec![
        (a.clone(), None, 3),
        (a.clone(), Some((5, 10)), 12),
        (a.clone(), Some((7, 20)), 30),
        (a.clone(), Some((5, 10)), 21),
    ];
    let found = lost_state_writes(&writes, &[], &fine);
    assert!(found.violations.is_empty(), "{:?}", found.violations);
    assert_eq!(found.late_own_writes, 0);
    let lost = vec![(a.clone(), Some((5, 10)), 22), (a.clone(), None, 12)];
    assert_eq!(lost_state_writes(&writes, &[], &lost).violations.len(), 2);

    // Token 7's write 15 went unanswered, and its holder wrote 20: 15 may land after 20. Token
    // 5's write 16 went unanswered too, but a lower token landing after 7's write is lost
    // fencing, as is an older write that was acknowledged (5, 10).
    let unknown = vec![(a.clone(), (7, 15)), (a.clone(), (5, 16))];
    let late_own = vec![(a.clone(), Some((7, 15)), 25)];
    let found = lost_state_writes(&writes, &unknown, &late_own);
    assert!(found.violations.is_empty(), "{:?}", found.violations);
    assert_eq!(found.late_own_writes, 1);
    let still_lost = vec![
        (a.clone(), Some((5, 16)), 25),
        (a.clone(), Some((5, 10)), 25),
        (a.clone(), None, 25),
    ];
    let found = lost_state_writes(&writes, &unknown, &still_lost);
    assert_eq!(found.violations.len(), 3, "{:?}", found.violations);
    assert_eq!(found.late_own_writes, 0);
}

#[test]
fn release_check_flags_only_a_released_token_seen_after_the_acknowledgement() {
    let actor = ActorId::new("actor-0").unwrap();
    let other_actor = ActorId::new("actor-1").unwrap();
    let node = NodeId::new("worker-0").unwrap();
    let released = FencingToken(10);
    let release = Release {
        actor_id: actor.clone(),
        node_id: node.clone(),
        token: released,
        acknowledged_seq: 5,
    };
    let read = |actor_id: &ActorId, token: Option<FencingToken>, requested_seq: u64| Observation {
        actor_id: actor_id.clone(),
        token,
        requested_seq,
    };
    let grant = |token: FencingToken, requested_seq: u64| Grant {
        actor_id: actor.clone(),
        node_id: node.clone(),
        token,
        requested_at_ms: 0,
        granted_at_ms: 0,
        requested_seq,
    };
    // Before the acknowledgement, or of another actor, the token may show; after it, only
    // other tokens or none.
    let fine_reads = [
        read(&actor, Some(released), 4),
        read(&other_actor, Some(released), 6),
        read(&actor, None, 6),
        read(&actor, Some(FencingToken(11)), 7),
    ];
    let fine_grants = [grant(released, 3), grant(FencingToken(12), 8)];
    let fine = release_check(std::slice::from_ref(&release), &fine_grants, &fine_reads);
    assert!(fine.violations.is_empty(), "{:?}", fine.violations);
    assert_eq!((fine.checked, fine.comparisons), (1, 3));
    let lost_read = release_check(
        std::slice::from_ref(&release),
        &[],
        &[read(&actor, Some(released), 6)],
    );
    assert_eq!(lost_read.violations.len(), 1);
    let lost_grant = release_check(std::slice::from_ref(&release), &[grant(released, 6)], &[]);
    assert_eq!(lost_grant.violations.len(), 1);
    let unchecked = release_check(std::slice::from_ref(&release), &[], &[]);
    assert_eq!(unchecked.checked, 0);
}
