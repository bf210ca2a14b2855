//! The node-side lease keeper: renews held leases in the background and keeps the node's
//! belief, the local time until which the node may act as holder.
//!
//! Safety argument, written out where it lives: every grant or renewal the keeper believes is
//! measured from the moment the request was *sent*, on the node's monotonic clock, through the
//! pure [`Belief`] state machine, which shortens it by the drift bound and a safety margin. The
//! store measures the same lease from the moment it *applied* the request, which is later. So
//! the belief ends before the store's expiry whatever the network delay and within the allowed
//! drift; when renewals keep failing the belief simply runs out, the keeper drops it and tells
//! the owner, and only after that can the store's expiry pass and another node be granted the
//! lease. The keeper never reads another node's clock or the store's.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use kelpie_core::{ActorId, FencingToken, NodeId, SharedClock};

mod core;
mod deadlines;

pub use self::core::{
    AcquireTicket, ClosingProgress, KeeperCore, KeeperRequest, MARK_GRANT_OVERTAKEN_BY_RELEASE,
};

use crate::belief::{BeliefConfig, HeldBelief};
use crate::error::{ConfigError, LeaseError, StoreError};
use crate::lease::{FencedRequest, Lease};
use crate::manager::LeaseManager;

/// Coverage mark: a renewal failed at the store or in the network (for instance a partition).
pub const MARK_RENEWAL_FAILED: &str = "keeper.renewal_failed";
/// Coverage mark: the keeper's belief ran out (before the store's expiry) and it let go.
pub const MARK_BELIEF_ENDED: &str = "keeper.belief_ended_before_expiry";
/// Coverage mark: an acquire whose outcome was unknown was retried and the lease is now held.
pub const MARK_COMMIT_UNKNOWN_RESOLVED: &str = "keeper.commit_unknown_resolved";
/// Coverage mark: the store refused a renewal (the lease was lost or taken over). Rare in a
/// correct system, since the belief ends first; not required by swarm runs.
pub const MARK_RENEWAL_REFUSED: &str = "keeper.renewal_refused";
/// Coverage mark: a belief ran out while its renewal was still in flight (a partition or a
/// slow store), and the keeper stopped waiting for it.
pub const MARK_RENEWAL_ABANDONED: &str = "keeper.renewal_abandoned";

/// A new incarnation for a process lifetime: 64 bits from the OS-seeded keys of std's
/// `RandomState`, mixed with a per-process counter so two keepers of one process differ.
/// Never called inside the simulator, which chooses incarnations from its seed.
fn random_incarnation() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static KEEPERS_BUILT: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(KEEPERS_BUILT.fetch_add(1, Ordering::Relaxed));
    hasher.finish()
}

/// Every coverage mark the lease layer defines; a swarm run checks each is hit.
pub const COVERAGE_MARKS: &[&str] = &[
    crate::protocol::MARK_TAKEOVER_AFTER_EXPIRY,
    crate::protocol::MARK_EXPIRED_LEASE_SEEN,
    MARK_RENEWAL_FAILED,
    MARK_BELIEF_ENDED,
    MARK_COMMIT_UNKNOWN_RESOLVED,
    MARK_RENEWAL_ABANDONED,
];

/// A release the store does not answer is retried until it answers, its retry interval
/// doubling after each failure up to this many retry intervals (with the default
/// retry interval, a twelfth of the lease, about two-thirds of a lease duration). Until it is
/// answered the actor cannot be acquired again by this keeper, so the keeper never gives up:
/// giving up would leave the actor blocked for the rest of the process.
pub const RELEASE_BACKOFF_INTERVALS_MAX: u64 = 8;

/// Default bound on clock drift between a node and the store: 1 %.
pub const CLOCK_DRIFT_PPM_MAX_DEFAULT: u64 = 10_000;

/// How the keeper renews and measures its belief, relative to the lease duration of the
/// manager it renews through. The duration itself is not here: the keeper reads it from its
/// manager ([`LeaseManager::lease_duration_ms`]), so the two cannot disagree. Every setting is
/// validated against that duration when the keeper is built ([`KeeperConfig::timing_for`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KeeperConfig {
    renew_interval_ms: Option<u64>,
    retry_interval_ms: Option<u64>,
    clock_drift_ppm_max: Option<u64>,
    safety_margin_ms: Option<u64>,
    #[cfg(feature = "mutations")]
    belief_from_reply: bool,
}

/// The keeper's settings resolved against a lease duration and validated together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct KeeperTiming {
    /// Lease duration the store grants (the manager's).
    pub lease_duration_ms: u64,
    /// Time between renewals of a held lease (default: a third of the duration).
    pub renew_interval_ms: u64,
    /// Time before retrying a renewal or release that failed at the store or in the network
    /// (default: a twelfth of the duration).
    pub retry_interval_ms: u64,
    /// Bound on clock drift against the store, in parts per million (default 1 %).
    pub clock_drift_ppm_max: u64,
    /// How long before the earliest possible store expiry the belief ends (default 2 % of
    /// the duration, at least 1 ms).
    pub safety_margin_ms: u64,
}

impl KeeperConfig {
    /// Sets the renewal interval.
    pub fn with_renew_interval_ms(mut self, renew_interval_ms: u64) -> Self {
        self.renew_interval_ms = Some(renew_interval_ms);
        self
    }

    /// Sets the retry interval.
    pub fn with_retry_interval_ms(mut self, retry_interval_ms: u64) -> Self {
        self.retry_interval_ms = Some(retry_interval_ms);
        self
    }

    /// Sets the drift bound and the safety margin.
    pub fn with_belief_bounds(mut self, clock_drift_ppm_max: u64, safety_margin_ms: u64) -> Self {
        self.clock_drift_ppm_max = Some(clock_drift_ppm_max);
        self.safety_margin_ms = Some(safety_margin_ms);
        self
    }

    /// Deliberately wrong: measure beliefs from the reply's arrival instead of the request's
    /// sending. Only for showing that the simulator catches it.
    #[cfg(feature = "mutations")]
    pub fn with_mutation_belief_from_reply(mut self) -> Self {
        self.belief_from_reply = true;
        self
    }

    /// These settings for leases of `lease_duration_ms`, validated together: the duration
    /// within the lease limits, a belief that stays positive after drift and margin, positive
    /// intervals, and two renewal attempts inside one belief.
    pub fn timing_for(&self, lease_duration_ms: u64) -> Result<KeeperTiming, ConfigError> {
        crate::lease::LeaseConfig::new(lease_duration_ms)?;
        let timing = KeeperTiming {
            lease_duration_ms,
            renew_interval_ms: self.renew_interval_ms.unwrap_or(lease_duration_ms / 3),
            retry_interval_ms: self
                .retry_interval_ms
                .unwrap_or((lease_duration_ms / 12).max(1)),
            clock_drift_ppm_max: self
                .clock_drift_ppm_max
                .unwrap_or(CLOCK_DRIFT_PPM_MAX_DEFAULT),
            safety_margin_ms: self
                .safety_margin_ms
                .unwrap_or((lease_duration_ms / 50).max(1)),
        };
        let belief = timing.belief_config_checked()?;
        let invalid = |reason: String| Err(ConfigError::Keeper { reason });
        if timing.renew_interval_ms == 0 || timing.retry_interval_ms == 0 {
            return invalid("renew and retry intervals must be positive".into());
        }
        // Two renewal attempts must fit inside one belief, or a single lost renewal would end it.
        if timing.renew_interval_ms.saturating_mul(2) > belief.belief_duration_ms() {
            return invalid(format!(
                "renew interval {} ms is not well below the belief of {} ms (at most half)",
                timing.renew_interval_ms,
                belief.belief_duration_ms()
            ));
        }
        if timing.retry_interval_ms > timing.renew_interval_ms {
            return invalid(format!(
                "retry interval {} ms is longer than the renew interval {} ms",
                timing.retry_interval_ms, timing.renew_interval_ms
            ));
        }
        Ok(timing)
    }
}

impl KeeperTiming {
    /// The belief settings these imply.
    pub fn belief_config(&self) -> BeliefConfig {
        self.belief_config_checked()
            .expect("validated by KeeperConfig::timing_for")
    }

    fn belief_config_checked(&self) -> Result<BeliefConfig, ConfigError> {
        BeliefConfig::new(
            self.lease_duration_ms,
            self.clock_drift_ppm_max,
            self.safety_margin_ms,
        )
    }
}

/// Why the keeper stopped believing it holds a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LostReason {
    /// The store refused a renewal: the lease expired or another node holds it.
    Refused(LeaseError),
    /// Renewals failed for so long that the belief ran out.
    BeliefExpired,
    /// The store answered a renewal with another fencing token than the lease's: it broke the
    /// lease contract (a renewal keeps the token), so nothing it says about this lease can be
    /// trusted and the belief ends.
    TokenChanged {
        /// The token the store's answer carried.
        answered: FencingToken,
    },
}

impl std::fmt::Display for LostReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LostReason::Refused(refusal) => write!(f, "the store refused a renewal: {refusal}"),
            LostReason::BeliefExpired => f.write_str(
                "no renewal was confirmed before the belief ran out (renewals failed or answered too \
                 late; ended before the store's expiry)",
            ),
            LostReason::TokenChanged { answered } => write!(
                f,
                "the store answered a renewal with token {answered}, not the lease's: a store \
                 bug"
            ),
        }
    }
}

/// What the keeper tells its owner: every change of what the node holds, in order.
/// `until_local_ms` is the node's belief, on the clock the keeper was given.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeeperEvent {
    /// A lease was granted: the node holds `actor_id` until `until_local_ms`.
    Acquired {
        /// The actor.
        actor_id: ActorId,
        /// The lease's token.
        fencing_token: FencingToken,
        /// The local time the belief ends unless renewed.
        until_local_ms: u64,
    },
    /// A renewal (or an idempotent re-acquire) extended the belief.
    Renewed {
        /// The actor.
        actor_id: ActorId,
        /// The lease's token (unchanged by a renewal).
        fencing_token: FencingToken,
        /// The local time the belief now ends.
        until_local_ms: u64,
    },
    /// A renewal failed at the store or in the network; it is retried while the belief lasts.
    RenewalFailed {
        /// The actor.
        actor_id: ActorId,
        /// The lease's token.
        fencing_token: FencingToken,
        /// The store's failure.
        error: StoreError,
    },
    /// The store answered a release of the lease (released, or already not this node's).
    Released {
        /// The actor.
        actor_id: ActorId,
        /// The token of the released lease.
        fencing_token: FencingToken,
    },
    /// The node must stop acting as holder of `actor_id`.
    Lost {
        /// The actor.
        actor_id: ActorId,
        /// The token of the lost lease.
        fencing_token: FencingToken,
        /// Why.
        reason: LostReason,
    },
}

/// Bytes the keeper appends to a node id: `@` and a decimal `u64` incarnation.
pub const HOLDER_SUFFIX_BYTES_MAX: usize = 1 + 20;

/// Whether `holder`, as a store reports it, is `node_id`: the node id itself (a
/// [`LeaseManager`] called directly), or one of the holder ids its keepers hold leases under,
/// `<node id>@<incarnation>` with a decimal incarnation (a [`LeaseKeeper`], and so a
/// `LeaseSession` and `kelpie node`). `n1@7` is `n1`'s; `n1@x@7` is node `n1@x`'s, not `n1`'s.
pub fn is_node_or_incarnation(holder: &NodeId, node_id: &NodeId) -> bool {
    let Some(rest) = holder.as_str().strip_prefix(node_id.as_str()) else {
        return false;
    };
    match rest.strip_prefix('@') {
        None => rest.is_empty(),
        Some(incarnation) => {
            !incarnation.is_empty() && incarnation.bytes().all(|b| b.is_ascii_digit())
        }
    }
}

/// Renews a node's leases and keeps its beliefs. Share it with `Arc`; drive
/// [`run`](Self::run) on a task of the node's runtime (tokio in a process, the simulator in
/// tests).
///
/// The keeper holds leases under a holder id of its own, `<node id>@<incarnation>`, with an
/// incarnation drawn at random when it is built: requests of a crashed process can still be in
/// the network, and a release from an earlier life must not match a lease the new process
/// holds under the same id and token (TLC's StaleRequests trace, `docs/tla/README.md`). So a
/// restarted process is a new holder, and gets a new fencing token, by construction. Within
/// one process the keeper never re-acquires an actor while its release is unresolved.
pub struct LeaseKeeper<M> {
    manager: Arc<M>,
    clock: SharedClock,
    node_id: NodeId,
    holder_id: NodeId,
    timing: KeeperTiming,
    core: Mutex<KeeperCore>,
    events: flume::Sender<KeeperEvent>,
    /// Told after every step that changed a belief, once an observer asked
    /// ([`watch_beliefs`](Self::watch_beliefs)). Set once, so that telling it takes no lock:
    /// it is read after nearly every renewal.
    watcher: OnceLock<BeliefWatcher>,
    /// Wakes [`run`](Self::run) before its planned wake-up: a grant arrived whose renewal is
    /// due already (its reply came late), which the loop, asleep until its next renewal or
    /// belief end, would otherwise reach only then, perhaps after the new belief ended.
    overdue: tokio::sync::Notify,
}

/// What [`LeaseKeeper::watch_beliefs`] calls after a step that changed a belief.
pub type BeliefWatcher = Box<dyn Fn() + Send + Sync>;

/// A keeper and the receiver of its [`KeeperEvent`]s.
pub type KeeperParts<M> = (Arc<LeaseKeeper<M>>, KeeperEvents);

/// The receiver of a keeper's [`KeeperEvent`]s, in the order they happened: unbounded, so
/// read them (`try_recv`, `drain`, `recv_async`) or drop it. A channel with one lock per
/// send and per receive: a keeper sends an event for nearly every renewal.
pub type KeeperEvents = flume::Receiver<KeeperEvent>;

impl<M: LeaseManager> LeaseKeeper<M> {
    /// A keeper for one process lifetime of `node_id`, renewing through `manager` with the
    /// manager's lease duration, and the receiver of its [`KeeperEvent`]s.
    ///
    /// # Errors
    /// [`ConfigError`] if `config` does not fit the manager's lease duration, or if `node_id`
    /// leaves no room for the incarnation suffix ([`HOLDER_SUFFIX_BYTES_MAX`] bytes).
    pub fn new(
        manager: Arc<M>,
        clock: SharedClock,
        node_id: NodeId,
        config: KeeperConfig,
    ) -> Result<KeeperParts<M>, ConfigError> {
        Self::build(manager, clock, node_id, random_incarnation(), config)
    }

    /// As [`new`](Self::new), with the incarnation chosen by the caller: a simulator draws it
    /// from its seed so that runs replay. Never reuse an incarnation for a node id.
    #[cfg(feature = "simulation")]
    pub fn with_incarnation(
        manager: Arc<M>,
        clock: SharedClock,
        node_id: NodeId,
        incarnation: u64,
        config: KeeperConfig,
    ) -> Result<KeeperParts<M>, ConfigError> {
        Self::build(manager, clock, node_id, incarnation, config)
    }

    fn build(
        manager: Arc<M>,
        clock: SharedClock,
        node_id: NodeId,
        incarnation: u64,
        config: KeeperConfig,
    ) -> Result<KeeperParts<M>, ConfigError> {
        let timing = config.timing_for(manager.lease_duration_ms())?;
        // Checked against the longest suffix, not this incarnation's: a node id accepted once
        // is accepted on every restart, whatever incarnation the next process draws.
        let node_id_bytes_max = kelpie_core::limits::ID_LENGTH_BYTES_MAX - HOLDER_SUFFIX_BYTES_MAX;
        if node_id.as_str().len() > node_id_bytes_max {
            return Err(ConfigError::Keeper {
                reason: format!(
                    "node id {node_id} is {} bytes; at most {node_id_bytes_max} leave room for \
                     the incarnation suffix ({HOLDER_SUFFIX_BYTES_MAX} bytes)",
                    node_id.as_str().len()
                ),
            });
        }
        let holder_id = NodeId::new(format!("{node_id}@{incarnation}")).map_err(|error| {
            ConfigError::Keeper {
                reason: format!(
                    "node id {node_id} leaves no room for the incarnation suffix \
                     ({HOLDER_SUFFIX_BYTES_MAX} bytes): {error}"
                ),
            }
        })?;
        let (events, receiver) = flume::unbounded();
        #[cfg(feature = "mutations")]
        let belief_from_reply = config.belief_from_reply;
        #[cfg(not(feature = "mutations"))]
        let belief_from_reply = false;
        let core = KeeperCore::new(timing).with_belief_from_reply(belief_from_reply);
        let keeper = Self {
            manager,
            clock,
            node_id,
            holder_id,
            timing,
            core: Mutex::new(core),
            events,
            watcher: OnceLock::new(),
            overdue: tokio::sync::Notify::new(),
        };
        Ok((Arc::new(keeper), receiver))
    }

    /// The node this keeper acts for, as given.
    pub fn node_id(&self) -> &NodeId {
        &self.node_id
    }

    /// The identity the store sees: the node id and this process's incarnation
    /// (`node-a@8412…`). Leases held by this keeper name it as their holder.
    pub fn holder_id(&self) -> &NodeId {
        &self.holder_id
    }

    /// The manager the keeper renews through.
    pub fn manager(&self) -> &Arc<M> {
        &self.manager
    }

    /// The keeper's settings, resolved against the manager's lease duration.
    pub fn timing(&self) -> KeeperTiming {
        self.timing
    }

    /// Acquires the lease on `actor_id` and starts renewing it. A retry after an unknown
    /// outcome is safe: acquiring a lease the node already holds is idempotent.
    ///
    /// # Errors
    /// The store's refusal or failure; [`LeaseError::Store`] also while a release of the
    /// actor is unresolved (retry later).
    pub async fn acquire(&self, actor_id: &ActorId) -> Result<Lease, LeaseError> {
        let ticket = self.lock().begin_acquire(actor_id)?;
        // Counted in flight until the reply is applied or this future is dropped: a shutdown
        // waits for it, since its grant may still come.
        let in_flight = AcquireInFlight { keeper: self };
        let sent_local_ms = self.clock.now_ms();
        let result = self.manager.acquire(actor_id, &self.holder_id).await;
        let now_ms = self.clock.now_ms();
        // The reply is applied and the acquire ends under one lock; the guard's own lock is
        // only for a future dropped before this.
        std::mem::forget(in_flight);
        let (event, overdue) = self.change(|core| {
            core.acquire_ended();
            let event = core.acquire_replied(actor_id, ticket, sent_local_ms, now_ms, &result);
            // A grant disowned just now is released by the loop's next round.
            (
                event,
                core.renewal_due_by(now_ms) || core.release_due_by(now_ms),
            )
        });
        self.notify(event);
        if overdue {
            // Stores a permit if the loop is mid-round: its next sleep then ends at once.
            self.overdue.notify_one();
        }
        result
    }

    /// Stops believing, then releases the lease at the store. The belief ends first, so the
    /// node never acts as holder of a lease the store may already have handed on.
    ///
    /// A release whose outcome is unknown is retried by [`run`](Self::run) until the store
    /// answers it, and the actor cannot be acquired again meanwhile: otherwise a delayed copy
    /// of the release could arrive after an idempotent re-acquire (which keeps the token) and
    /// free the lease under the node's new belief (TLC's StaleRequests trace).
    ///
    /// # Errors
    /// [`LeaseError::NotHolder`] if no lease on the actor is believed; the store's answer
    /// otherwise.
    pub async fn release(&self, actor_id: &ActorId) -> Result<Lease, LeaseError> {
        self.release_of(actor_id, None).await
    }

    /// [`release`](Self::release) of the lease on `actor_id` only if the node believes it
    /// with `fencing_token`: the lease of one tenure, never a later one of the same actor
    /// that started meanwhile (a guard dropped, and the actor acquired again, on another
    /// thread).
    ///
    /// # Errors
    /// [`LeaseError::NotHolder`] if no lease on the actor is believed with that token; the
    /// store's answer otherwise.
    pub async fn release_token(
        &self,
        actor_id: &ActorId,
        fencing_token: FencingToken,
    ) -> Result<Lease, LeaseError> {
        self.release_of(actor_id, Some(fencing_token)).await
    }

    async fn release_of(
        &self,
        actor_id: &ActorId,
        fencing_token: Option<FencingToken>,
    ) -> Result<Lease, LeaseError> {
        let now_ms = self.clock.now_ms();
        let begun = self.change(|core| core.begin_release_of(actor_id, fencing_token, now_ms));
        let Some(token) = begun else {
            return Err(LeaseError::NotHolder {
                actor_id: actor_id.clone(),
                node_id: self.holder_id.clone(),
                holder: None,
            });
        };
        let result = self
            .manager
            .release_fenced(actor_id, &self.holder_id, token)
            .await;
        let now_ms = self.clock.now_ms();
        let (events, due) = self.change(|core| {
            let events = core.release_replied(actor_id, token, now_ms, &result);
            (events, core.release_due_by(now_ms))
        });
        self.notify(events);
        if due {
            // A disowned grant's release, due once this one was answered: the loop's next
            // round sends it.
            self.overdue.notify_one();
        }
        result
    }

    /// The token of the lease on `actor_id` the node may act on now, if any.
    pub fn holds(&self, actor_id: &ActorId) -> Option<FencingToken> {
        let now_ms = self.clock.now_ms();
        self.lock().holds(actor_id, now_ms)
    }

    /// The belief in the lease on `actor_id` in force now, if any: its token and its end.
    pub fn belief(&self, actor_id: &ActorId) -> Option<HeldBelief> {
        let now_ms = self.clock.now_ms();
        self.lock().belief(actor_id, now_ms)
    }

    /// Every belief in force now.
    pub fn beliefs(&self) -> Vec<(ActorId, HeldBelief)> {
        let now_ms = self.clock.now_ms();
        self.lock().beliefs(now_ms)
    }

    /// A number that changes whenever a belief starts, is extended or is dropped.
    pub fn belief_epoch(&self) -> u64 {
        self.lock().belief_epoch()
    }

    /// Calls `on_change` after every step of the keeper that started, extended or dropped a
    /// belief, and from then on remembers which actors changed, for
    /// [`take_changed_beliefs`](Self::take_changed_beliefs). An observer (the simulator's
    /// checkers) thus re-reads only what changed, instead of every belief after every step.
    ///
    /// # Panics
    /// If the keeper has a watcher already: it has at most one.
    pub fn watch_beliefs(&self, on_change: BeliefWatcher) {
        self.lock().track_changes();
        assert!(
            self.watcher.set(on_change).is_ok(),
            "a keeper's beliefs are watched by one watcher"
        );
    }

    /// The actors whose belief changed since the last call, each with its belief in force
    /// now, if any (see [`watch_beliefs`](Self::watch_beliefs); empty without it).
    pub fn take_changed_beliefs(&self) -> Vec<(ActorId, Option<HeldBelief>)> {
        let now_ms = self.clock.now_ms();
        self.lock().take_changed_beliefs(now_ms)
    }

    /// [`take_changed_beliefs`](Self::take_changed_beliefs), appended to `taken`: an observer
    /// that takes after every step reuses one buffer.
    pub fn take_changed_beliefs_into(&self, taken: &mut Vec<(ActorId, Option<HeldBelief>)>) {
        let now_ms = self.clock.now_ms();
        self.lock().take_changed_beliefs_into(now_ms, taken);
    }

    /// Makes [`run`](Self::run) return, waking it if it sleeps.
    pub fn stop(&self) {
        self.lock().stop();
        self.overdue.notify_one();
    }

    /// Closes the keeper for shutdown: every [`acquire`](Self::acquire) is refused from now
    /// on, and the releases the store answers are counted. Acquires already in flight may
    /// still be granted, and their leases believed: release those too before stopping
    /// ([`closing_progress`](Self::closing_progress) says when nothing is left).
    pub fn close(&self) {
        self.lock().close();
    }

    /// How far the shutdown begun with [`close`](Self::close) has come.
    pub fn closing_progress(&self) -> ClosingProgress {
        let now_ms = self.clock.now_ms();
        self.lock().closing_progress(now_ms)
    }

    /// The renewal loop: renews every lease that is due, drops every belief that ran out,
    /// then sleeps until the next renewal or belief end. Returns after [`stop`](Self::stop).
    pub async fn run(&self) {
        loop {
            let Some(wake_local_ms) = self.tick().await else {
                return;
            };
            let sleep_ms = wake_local_ms.saturating_sub(self.clock.now_ms()).max(1);
            let sleep = self.clock.sleep(Duration::from_millis(sleep_ms));
            let overdue = std::pin::pin!(self.overdue.notified());
            futures_util::future::select(sleep, overdue).await;
        }
    }

    /// One round; returns the local time of the next one, or `None` once stopped.
    ///
    /// Requests run concurrently, and the round also watches the earliest belief end: if a
    /// belief runs out while renewals hang (a partition, a slow store), the round stops
    /// waiting for them and drops it at once, so the owner hears before the store's expiry.
    async fn tick(&self) -> Option<u64> {
        let now_ms = self.clock.now_ms();
        // One lock for what the round starts from: what is due, and when the first belief ends
        // (or, with nothing to send, when the next round is).
        let (events, requests, until_ms, idle_wake_ms) = self.change(|core| {
            let (events, requests) = core.poll(now_ms)?;
            let idle_wake_ms = requests.is_empty().then(|| core.next_wake_ms(now_ms));
            let until_ms = core.earliest_belief_end_ms().unwrap_or(u64::MAX);
            Some((events, requests, until_ms, idle_wake_ms))
        })?;
        self.notify(events);
        if let Some(wake_ms) = idle_wake_ms {
            return Some(wake_ms);
        }
        // Answers are applied together and in the order the requests were made.
        let work = std::pin::pin!(async {
            // Most rounds make one request: it is awaited as it is, without the vectors of a
            // round.
            if let [only] = &requests[..] {
                let result = match only {
                    KeeperRequest::Renew {
                        actor_id,
                        fencing_token,
                        ..
                    } => {
                        let renewing =
                            self.manager
                                .renew_fenced(actor_id, &self.holder_id, *fencing_token);
                        renewing.await
                    }
                    KeeperRequest::Release {
                        actor_id,
                        fencing_token,
                    } => {
                        let releasing =
                            self.manager
                                .release_fenced(actor_id, &self.holder_id, *fencing_token);
                        releasing.await
                    }
                };
                let only = requests.into_iter().next().expect("one request");
                return OneOrMore::one((only, result));
            }
            // More go to the manager as one round, which a store may carry as one batch.
            let round: Vec<FencedRequest> = requests.iter().map(KeeperRequest::fenced).collect();
            let results = self.manager.fenced_round(&self.holder_id, &round).await;
            assert_eq!(
                results.len(),
                requests.len(),
                "one result per request of a round"
            );
            OneOrMore::many(requests.into_iter().zip(results).collect())
        });
        let wait_ms = until_ms.saturating_sub(self.clock.now_ms()).max(1);
        let belief_ends = self.clock.sleep(Duration::from_millis(wait_ms));
        // The next round's time is read under the lock that applies this one's outcome.
        let next_wake_ms = match futures_util::future::select(work, belief_ends).await {
            futures_util::future::Either::Left((answered, _)) => {
                let now_ms = self.clock.now_ms();
                let mut events = OneOrMore::default();
                let mut core = self.lock();
                for (request, result) in answered {
                    match request {
                        KeeperRequest::Renew {
                            actor_id,
                            fencing_token,
                            sent_local_ms,
                        } => events.extend(core.renew_replied(
                            &actor_id,
                            fencing_token,
                            sent_local_ms,
                            now_ms,
                            result,
                        )),
                        KeeperRequest::Release {
                            actor_id,
                            fencing_token,
                        } => events.extend(core.release_replied(
                            &actor_id,
                            fencing_token,
                            now_ms,
                            &result,
                        )),
                    }
                }
                let changed = core.has_changed_beliefs();
                let next_wake_ms = core.next_wake_ms(now_ms);
                drop(core);
                if changed {
                    self.tell_watcher();
                }
                self.notify(events);
                next_wake_ms
            }
            // The requests still in flight are abandoned; renewals that were applied only
            // extend the store's lease, and the next round renews what is still believed.
            futures_util::future::Either::Right(_) => {
                kelpie_core::coverage::mark(MARK_RENEWAL_ABANDONED);
                let now_ms = self.clock.now_ms();
                let (events, next_wake_ms) =
                    self.change(|core| (core.expire(now_ms), core.next_wake_ms(now_ms)));
                self.notify(events);
                next_wake_ms
            }
        };
        Some(next_wake_ms)
    }

    fn notify(&self, events: impl IntoIterator<Item = KeeperEvent>) {
        for event in events {
            // The owner may have stopped listening; the belief is dropped either way.
            let _ = self.events.send(event);
        }
    }

    /// Runs a step of the core that may change beliefs, then tells the watcher if it did.
    fn change<R>(&self, step: impl FnOnce(&mut KeeperCore) -> R) -> R {
        let (result, changed) = {
            let mut core = self.lock();
            let result = step(&mut core);
            (result, core.has_changed_beliefs())
        };
        if changed {
            self.tell_watcher();
        }
        result
    }

    fn tell_watcher(&self) {
        if let Some(watcher) = self.watcher.get() {
            watcher();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, KeeperCore> {
        self.core.lock().expect("keeper state poisoned by a panic")
    }
}

/// An acquire in flight, counted by the keeper's core until its reply is applied (which ends
/// it under the same lock, and forgets this) or its future is dropped (this ends it).
struct AcquireInFlight<'a, M: LeaseManager> {
    keeper: &'a LeaseKeeper<M>,
}

impl<M: LeaseManager> Drop for AcquireInFlight<'_, M> {
    fn drop(&mut self) {
        // A panic elsewhere poisons the lock; the count no longer matters then.
        if let Ok(mut core) = self.keeper.core.lock() {
            core.acquire_ended();
        }
    }
}

/// A round's answers or events, in order. Most rounds make one request and so have at most
/// one of each: that one is kept without allocating a vector, for every renewal of a run.
#[derive(Debug)]
struct OneOrMore<T> {
    first: Option<T>,
    rest: Vec<T>,
}

impl<T> Default for OneOrMore<T> {
    fn default() -> Self {
        Self {
            first: None,
            rest: Vec::new(),
        }
    }
}

impl<T> OneOrMore<T> {
    fn one(only: T) -> Self {
        Self {
            first: Some(only),
            rest: Vec::new(),
        }
    }

    fn many(all: Vec<T>) -> Self {
        Self {
            first: None,
            rest: all,
        }
    }
}

impl<T> Extend<T> for OneOrMore<T> {
    fn extend<I: IntoIterator<Item = T>>(&mut self, items: I) {
        for item in items {
            match self.first {
                None if self.rest.is_empty() => self.first = Some(item),
                _ => self.rest.push(item),
            }
        }
    }
}

impl<T> IntoIterator for OneOrMore<T> {
    type Item = T;
    type IntoIter = std::iter::Chain<std::option::IntoIter<T>, std::vec::IntoIter<T>>;

    fn into_iter(self) -> Self::IntoIter {
        self.first.into_iter().chain(self.rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::ready as block_on;
    use crate::test_support::FlakyStore;
    use crate::{backend::ProtocolLeaseManager, LeaseConfig};
    use kelpie_core::{Clock, ManualClock};

    type Manager = ProtocolLeaseManager<FlakyStore>;

    #[test]
    fn a_node_s_incarnations_are_its_holders_and_no_other_node_s() {
        let id = |s: &str| NodeId::new(s).unwrap();
        for (holder, node, expected) in [
            ("m1", "m1", true),
            ("m1@7", "m1", true),
            ("m1@18446744073709551615", "m1", true),
            ("m1@", "m1", false),
            ("m1@x", "m1", false),
            ("m1@x@7", "m1", false),
            ("m1@x@7", "m1@x", true),
            ("m10@7", "m1", false),
            ("m1", "m10", false),
        ] {
            assert_eq!(
                is_node_or_incarnation(&id(holder), &id(node)),
                expected,
                "{holder} of {node}"
            );
        }
    }

    #[test]
    fn an_interval_too_long_is_refused_not_an_overflow() {
        // renew_interval_ms * 2 overflowed: a panic in place of the ConfigError.
        let config = KeeperConfig::default().with_renew_interval_ms(u64::MAX);
        let refused = config.timing_for(1_000).unwrap_err();
        assert!(matches!(refused, ConfigError::Keeper { .. }), "{refused}");
    }

    /// A node id is judged by its length alone: one that fits the longest incarnation is
    /// taken with every incarnation, one byte more with none (before, a 108-byte id was taken
    /// or refused by the decimal length of the incarnation drawn).
    #[test]
    fn a_node_id_fits_every_incarnation_or_none() {
        let shared: SharedClock = Arc::new(ManualClock::new(0));
        let manager = Arc::new(crate::MemoryLeaseManager::in_memory(
            Arc::clone(&shared),
            LeaseConfig::new(1_000).unwrap(),
        ));
        let longest = kelpie_core::limits::ID_LENGTH_BYTES_MAX - HOLDER_SUFFIX_BYTES_MAX;
        for incarnation in [0, 7, u64::MAX] {
            let build = |bytes: usize| {
                let node = NodeId::new("n".repeat(bytes)).unwrap();
                let config = KeeperConfig::default();
                LeaseKeeper::build(
                    Arc::clone(&manager),
                    Arc::clone(&shared),
                    node,
                    incarnation,
                    config,
                )
            };
            let (keeper, _events) = build(longest).unwrap();
            assert!(keeper
                .holder_id()
                .as_str()
                .ends_with(&format!("@{incarnation}")));
            let refused = build(longest + 1).err().expect("one byte too long");
            assert!(
                refused.to_string().contains("incarnation suffix"),
                "{refused}"
            );
        }
    }

    #[test]
    fn one_or_more_keeps_order() {
        let mut events = OneOrMore::default();
        events.extend(None);
        events.extend(Some(1));
        events.extend([2, 3]);
        assert_eq!(events.into_iter().collect::<Vec<_>>(), [1, 2, 3]);
        let mut answers = OneOrMore::one(1);
        answers.extend(Some(2));
        assert_eq!(answers.into_iter().collect::<Vec<_>>(), [1, 2]);
        let mut answers = OneOrMore::many(vec![1, 2]);
        answers.extend(Some(3));
        assert_eq!(answers.into_iter().collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(OneOrMore::<u8>::default().into_iter().count(), 0);
    }

    /// Keeper rounds a test drives before giving up on what it waits for: far more than a
    /// correct keeper needs (a belief of 900 ms ends within a few dozen wake-ups).
    const TICKS_UNTIL_BELIEF_ENDS_MAX: u32 = 10_000;

    fn setup() -> (
        ManualClock,
        Arc<Manager>,
        Arc<LeaseKeeper<Manager>>,
        KeeperEvents,
    ) {
        let clock = ManualClock::new(0);
        let store = FlakyStore::new(Arc::new(clock.clone()));
        let manager = Arc::new(Manager::new(store, LeaseConfig::new(900).unwrap()));
        let node = NodeId::new("n1").unwrap();
        let shared = Arc::new(clock.clone());
        let (keeper, events) =
            LeaseKeeper::new(Arc::clone(&manager), shared, node, KeeperConfig::default()).unwrap();
        (clock, manager, keeper, events)
    }

    /// Every event sent so far, in order.
    fn drain(events: &KeeperEvents) -> Vec<KeeperEvent> {
        events.drain().collect()
    }

    #[test]
    #[should_panic(expected = "watched by one watcher")]
    fn a_second_belief_watcher_is_a_bug() {
        let (_, _, keeper, _) = setup();
        keeper.watch_beliefs(Box::new(|| {}));
        keeper.watch_beliefs(Box::new(|| {}));
    }

    #[test]
    fn lost_reasons_read_as_sentences() {
        let expired = LostReason::BeliefExpired.to_string();
        assert!(expired.contains("belief ran out"), "{expired}");
        let refusal = LeaseError::NotHolder {
            actor_id: ActorId::new("a").unwrap(),
            node_id: NodeId::new("n1@1").unwrap(),
            holder: None,
        };
        let refused = LostReason::Refused(refusal).to_string();
        assert!(
            refused.starts_with("the store refused a renewal: n1@1"),
            "{refused}"
        );
        let changed = LostReason::TokenChanged {
            answered: FencingToken(7),
        };
        assert!(changed.to_string().contains("token 7"), "{changed}");
    }

    #[test]
    fn config_defaults_and_refusals() {
        let config = KeeperConfig::default();
        let timing = config.timing_for(900).unwrap();
        assert_eq!(
            (timing.renew_interval_ms, timing.retry_interval_ms),
            (300, 75)
        );
        assert!(config.with_renew_interval_ms(600).timing_for(900).is_err());
        assert!(config.with_renew_interval_ms(0).timing_for(900).is_err());
        assert!(config.with_retry_interval_ms(301).timing_for(900).is_err());
        assert!(config
            .with_belief_bounds(10_000, 0)
            .timing_for(900)
            .is_err());
        assert!(config.with_belief_bounds(10_000, 5).timing_for(900).is_ok());
        assert!(config
            .with_belief_bounds(10_000, 900)
            .timing_for(900)
            .is_err());
        assert!(config.timing_for(10).is_err());
    }

    /// The lease duration is the manager's: a keeper configured for renewals that fit a 10 s
    /// lease cannot be built over a manager granting 1 s leases, so it can never believe
    /// longer than the store grants (the two-holder case of issue 12).
    #[test]
    fn the_duration_is_the_managers_and_mismatched_settings_are_refused() {
        let clock = ManualClock::new(0);
        let shared: SharedClock = Arc::new(clock.clone());
        let short = Arc::new(crate::MemoryLeaseManager::in_memory(
            Arc::clone(&shared),
            LeaseConfig::new(1_000).unwrap(),
        ));
        let node = NodeId::new("n1").unwrap();
        let for_ten_seconds = KeeperConfig::default().with_renew_interval_ms(3_333);
        let refused = LeaseKeeper::new(
            Arc::clone(&short),
            Arc::clone(&shared),
            node.clone(),
            for_ten_seconds,
        );
        assert!(matches!(refused, Err(ConfigError::Keeper { .. })));
        let (keeper, _events) =
            LeaseKeeper::new(Arc::clone(&short), shared, node, KeeperConfig::default()).unwrap();
        assert_eq!(keeper.timing().lease_duration_ms, 1_000);
        let actor = ActorId::new("a").unwrap();
        let lease = block_on(keeper.acquire(&actor)).unwrap();
        // Without renewals the belief ends before the store's expiry, so before any other
        // node can be granted the lease.
        clock.advance_ms(lease.expires_at_ms - 1);
        assert_eq!(keeper.holds(&actor), None);
        assert!(block_on(short.is_valid(&actor, keeper.holder_id())).unwrap());
    }

    /// Two keepers built for one node id (a process and its restart) are two holders: the
    /// second cannot inherit the first's lease or token, and a late release from the first
    /// does not free the second's lease.
    #[test]
    fn a_restarted_process_is_a_new_holder_with_a_new_token() {
        let clock = ManualClock::new(0);
        let shared: SharedClock = Arc::new(clock.clone());
        let manager = Arc::new(crate::MemoryLeaseManager::in_memory(
            Arc::clone(&shared),
            LeaseConfig::new(900).unwrap(),
        ));
        let node = NodeId::new("n1").unwrap();
        let build = || {
            let shared = Arc::clone(&shared);
            LeaseKeeper::new(
                Arc::clone(&manager),
                shared,
                node.clone(),
                KeeperConfig::default(),
            )
            .unwrap()
            .0
        };
        let (old, new) = (build(), build());
        assert_ne!(old.holder_id(), new.holder_id());
        assert_eq!(old.node_id(), new.node_id());
        assert!(old.holder_id().as_str().starts_with("n1@"));
        let actor = ActorId::new("a").unwrap();
        let first = block_on(old.acquire(&actor)).unwrap();
        assert!(
            block_on(new.acquire(&actor)).is_err(),
            "held by the old process"
        );
        clock.advance_ms(first.expires_at_ms);
        let second = block_on(new.acquire(&actor)).unwrap();
        assert!(second.fencing_token > first.fencing_token);
        let late = block_on(manager.release_fenced(&actor, old.holder_id(), first.fencing_token));
        assert!(late.is_err());
        assert!(block_on(manager.is_valid(&actor, new.holder_id())).unwrap());
    }

    #[test]
    fn renews_in_background_and_extends_the_belief() {
        let (clock, manager, keeper, _events) = setup();
        let actor = ActorId::new("a").unwrap();
        let lease = block_on(keeper.acquire(&actor)).unwrap();
        assert_eq!(keeper.holds(&actor), Some(lease.fencing_token));
        clock.advance_ms(300);
        assert_eq!(block_on(keeper.tick()), Some(600));
        let renewed = block_on(manager.get(&actor)).unwrap().unwrap();
        assert_eq!(renewed.expires_at_ms, 1_200);
        clock.advance_ms(800);
        assert_eq!(
            keeper.holds(&actor),
            Some(lease.fencing_token),
            "belief was extended"
        );
    }

    /// A round renews every lease due whatever its size (one request awaited alone, more as
    /// the manager's round, which this store awaits a few joined and more in a set), and
    /// reports the renewals in actor order.
    #[test]
    fn rounds_of_every_size_renew_every_lease_due_in_actor_order() {
        use crate::join::JOINED_REQUESTS_MAX;
        for count in [1, 2, JOINED_REQUESTS_MAX, JOINED_REQUESTS_MAX + 1, 20] {
            let (clock, manager, keeper, events) = setup();
            // Acquired in reverse order, so that actor order is not acquisition order.
            let actors: Vec<ActorId> = (0..count)
                .rev()
                .map(|i| ActorId::new(format!("actor-{i:02}")).unwrap())
                .collect();
            for actor in &actors {
                block_on(keeper.acquire(actor)).unwrap();
            }
            drain(&events);
            clock.advance_ms(300);
            assert_eq!(block_on(keeper.tick()), Some(600), "{count} leases");
            let renewed: Vec<ActorId> = drain(&events)
                .into_iter()
                .map(|event| match event {
                    KeeperEvent::Renewed { actor_id, .. } => actor_id,
                    other => panic!("{count} leases: {other:?}"),
                })
                .collect();
            let mut in_order = actors.clone();
            in_order.sort();
            assert_eq!(renewed, in_order, "{count} leases");
            for actor in &actors {
                let lease = block_on(manager.get(actor)).unwrap().unwrap();
                assert_eq!(lease.expires_at_ms, 1_200, "{count} leases: {actor}");
            }
        }
    }

    #[test]
    fn belief_runs_out_before_store_expiry_and_owner_is_told() {
        let (clock, manager, keeper, events) = setup();
        let actor = ActorId::new("a").unwrap();
        let lease = block_on(keeper.acquire(&actor)).unwrap();
        manager.store().set_down(true);
        let mut ended_at_ms = None;
        // Bounded, so that a keeper that never lets go fails here instead of hanging.
        for _ in 0..TICKS_UNTIL_BELIEF_ENDS_MAX {
            if ended_at_ms.is_some() {
                break;
            }
            let wake_ms = block_on(keeper.tick()).unwrap();
            clock.advance_ms(wake_ms.saturating_sub(clock.now_ms()).max(1));
            block_on(keeper.tick());
            if keeper.holds(&actor).is_none() {
                ended_at_ms = Some(clock.now_ms());
            }
        }
        let ended_at_ms = ended_at_ms.expect("the belief ran out within the tick bound");
        assert!(
            ended_at_ms < lease.expires_at_ms,
            "{ended_at_ms} >= {}",
            lease.expires_at_ms
        );
        let seen = drain(&events);
        let acquired = KeeperEvent::Acquired {
            actor_id: actor.clone(),
            fencing_token: lease.fencing_token,
            until_local_ms: keeper.timing().belief_config().belief_duration_ms(),
        };
        assert_eq!(seen.first(), Some(&acquired), "{seen:?}");
        let failed = |e: &KeeperEvent| matches!(e, KeeperEvent::RenewalFailed { .. });
        assert!(seen.iter().any(failed), "{seen:?}");
        let expected = KeeperEvent::Lost {
            actor_id: actor.clone(),
            fencing_token: lease.fencing_token,
            reason: LostReason::BeliefExpired,
        };
        assert_eq!(seen.last(), Some(&expected), "{seen:?}");
    }

    #[test]
    fn refused_renewal_drops_belief_and_release_drops_it_first() {
        let (clock, manager, keeper, events) = setup();
        let (a, b) = (ActorId::new("a").unwrap(), ActorId::new("b").unwrap());
        block_on(keeper.acquire(&a)).unwrap();
        block_on(keeper.acquire(&b)).unwrap();
        // Another tenure of "a" replaces ours at the store: our token-guarded renewal fails.
        block_on(manager.release(&a, keeper.holder_id())).unwrap();
        block_on(manager.acquire(&a, keeper.holder_id())).unwrap();
        clock.advance_ms(300);
        block_on(keeper.tick());
        assert_eq!(keeper.holds(&a), None);
        let seen = drain(&events);
        let lost = seen
            .into_iter()
            .find(|e| matches!(e, KeeperEvent::Lost { .. }))
            .unwrap();
        assert!(matches!(
            lost,
            KeeperEvent::Lost {
                reason: LostReason::Refused(_),
                ..
            }
        ));
        block_on(keeper.release(&b)).unwrap();
        assert_eq!(keeper.holds(&b), None);
        assert_eq!(block_on(manager.get(&b)).unwrap(), None);
        assert!(block_on(keeper.release(&b)).is_err());
    }
}
