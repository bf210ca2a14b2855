//! A node's lease session: what a runtime embeds (the shape of etcd's `concurrency.Session`
//! and client-go's `LeaderElector`).
//!
//! A [`LeaseSession`] is built once from a manager (the store), a node id and one
//! [`SessionConfig`], validated against the manager's lease duration. It owns the node's
//! [`LeaseKeeper`] (which adds the per-process incarnation to the node id) and drives it;
//! [`acquire`](LeaseSession::acquire) and [`campaign`](LeaseSession::campaign) hand out a
//! [`LeaseGuard`] per held lease, carrying the fencing token and a [`CancellationToken`] that
//! fires *before* the node's belief ends (by the configured lead), so the work tied to the
//! lease stops in time. Dropping the guard, or [`LeaseSession::release`], releases the lease;
//! [`LeaseSession::shutdown`] releases every lease and returns once the store has answered or
//! the bound has passed. [`LeaseSession::events`] is a bounded stream of what happened.
//!
//! The session is runtime-agnostic like the keeper: [`LeaseSession::new`] returns a
//! [`SessionDriver`] whose [`run`](SessionDriver::run) future does the work (spawn it on
//! tokio, or on the simulator in tests); [`LeaseSession::start`] does that on the current
//! tokio runtime with the real clock.
//!
//! ```
//! use std::sync::Arc;
//! use kelpie_core::{ActorId, NodeId};
//! use kelpie_lease::{LeaseConfig, LeaseSession, SessionConfig, SqliteLeaseManager};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! # let path = dir.path().join("leases.db");
//! // The store times the leases in the file on the host's monotonic clock.
//! let manager = Arc::new(SqliteLeaseManager::open(&path, LeaseConfig::new(2_000)?)?);
//! let node = NodeId::new("node-a")?;
//! let session = LeaseSession::start(manager, node, SessionConfig::default())?;
//!
//! let guard = session.campaign(&ActorId::new("counter-1")?).await?;
//! // Work as the holder, carrying the token to every fenced write, until this fires:
//! let stop = guard.cancellation().clone();
//! assert!(!stop.is_cancelled() && guard.fencing_token().0 > 0);
//!
//! let report = session.shutdown().await; // releases every lease the session holds
//! assert_eq!((report.released, report.unanswered), (1, 0));
//! assert!(stop.is_cancelled());
//! # Ok(())
//! # }
//! ```

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::{select, Either};
use futures_util::stream::{FuturesUnordered, StreamExt};
use kelpie_core::{ActorId, FencingToken, NodeId, SharedClock};
use tokio::sync::{broadcast, Notify};
use tokio_util::sync::CancellationToken;

use crate::belief::HeldBelief;
use crate::error::{ConfigError, LeaseError, StoreError};
use crate::keeper::{KeeperConfig, KeeperEvent, KeeperTiming, LeaseKeeper};
use crate::lease::Lease;
use crate::manager::LeaseManager;

/// Most events a session keeps for a slow reader before the oldest are dropped (the reader
/// is told how many it missed).
pub const SESSION_EVENTS_CAPACITY_MAX: usize = 65_536;
/// Events kept for a slow reader by default.
pub const SESSION_EVENTS_CAPACITY_DEFAULT: usize = 1_024;

/// How a session runs, relative to the lease duration of its manager. Every setting has a
/// default derived from that duration and is validated with it when the session is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionConfig {
    keeper: KeeperConfig,
    cancel_lead_ms: Option<u64>,
    campaign_poll_ms_max: Option<u64>,
    shutdown_timeout_ms: Option<u64>,
    events_capacity: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            keeper: KeeperConfig::default(),
            cancel_lead_ms: None,
            campaign_poll_ms_max: None,
            shutdown_timeout_ms: None,
            events_capacity: SESSION_EVENTS_CAPACITY_DEFAULT,
        }
    }
}

/// A [`SessionConfig`] resolved against a lease duration and validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct SessionTiming {
    /// The keeper's renewal settings.
    pub keeper: KeeperTiming,
    /// How long before the belief ends a guard's token is cancelled (default: the keeper's
    /// retry interval).
    pub cancel_lead_ms: u64,
    /// Longest wait between two attempts of a campaign (default: a quarter of the lease).
    pub campaign_poll_ms_max: u64,
    /// Longest wait for the store to answer the releases of a shutdown (default: one lease
    /// duration, after which every lease has expired anyway).
    pub shutdown_timeout_ms: u64,
    /// Events kept for a slow reader.
    pub events_capacity: usize,
}

impl SessionConfig {
    /// The keeper's settings (renew and retry intervals, drift bound, margin).
    pub fn with_keeper(mut self, keeper: KeeperConfig) -> Self {
        self.keeper = keeper;
        self
    }

    /// How long before the belief ends a guard's token is cancelled.
    pub fn with_cancel_lead_ms(mut self, cancel_lead_ms: u64) -> Self {
        self.cancel_lead_ms = Some(cancel_lead_ms);
        self
    }

    /// The longest wait between two attempts of a campaign.
    pub fn with_campaign_poll_ms_max(mut self, campaign_poll_ms_max: u64) -> Self {
        self.campaign_poll_ms_max = Some(campaign_poll_ms_max);
        self
    }

    /// The longest wait for the releases of a shutdown.
    pub fn with_shutdown_timeout_ms(mut self, shutdown_timeout_ms: u64) -> Self {
        self.shutdown_timeout_ms = Some(shutdown_timeout_ms);
        self
    }

    /// How many events are kept for a slow reader.
    pub fn with_events_capacity(mut self, events_capacity: usize) -> Self {
        self.events_capacity = events_capacity;
        self
    }

    /// These settings for leases of `lease_duration_ms`, validated together.
    ///
    /// # Errors
    /// [`ConfigError`] if the keeper's settings do not fit the duration, the cancel lead is
    /// zero or not shorter than the belief, a wait is zero, or the event capacity is outside
    /// `1..=`[`SESSION_EVENTS_CAPACITY_MAX`].
    pub fn timing_for(&self, lease_duration_ms: u64) -> Result<SessionTiming, ConfigError> {
        let keeper = self.keeper.timing_for(lease_duration_ms)?;
        let belief_ms = keeper.belief_config().belief_duration_ms();
        let timing = SessionTiming {
            keeper,
            cancel_lead_ms: self.cancel_lead_ms.unwrap_or(keeper.retry_interval_ms),
            campaign_poll_ms_max: self
                .campaign_poll_ms_max
                .unwrap_or((lease_duration_ms / 4).max(1)),
            shutdown_timeout_ms: self.shutdown_timeout_ms.unwrap_or(lease_duration_ms),
            events_capacity: self.events_capacity,
        };
        let invalid = |reason: String| Err(ConfigError::Keeper { reason });
        if timing.cancel_lead_ms == 0 || timing.cancel_lead_ms >= belief_ms {
            return invalid(format!(
                "cancel lead {} ms must be in 1..{belief_ms} ms (the belief)",
                timing.cancel_lead_ms
            ));
        }
        if timing.campaign_poll_ms_max == 0 || timing.shutdown_timeout_ms == 0 {
            return invalid("campaign poll and shutdown timeout must be positive".into());
        }
        if !(1..=SESSION_EVENTS_CAPACITY_MAX).contains(&timing.events_capacity) {
            return invalid(format!(
                "events capacity {} is outside 1..={SESSION_EVENTS_CAPACITY_MAX}",
                timing.events_capacity
            ));
        }
        Ok(timing)
    }
}

/// What a session tells its readers.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionEvent {
    /// A change of what this node holds: acquired, renewed, renewal failed, released, lost.
    Lease(KeeperEvent),
    /// A campaign found the actor held by another holder than before (or for the first time).
    HolderChanged {
        /// The actor.
        actor_id: ActorId,
        /// Its holder now: a node id and that process's incarnation.
        holder: NodeId,
    },
    /// A guard's token was cancelled because its belief is about to end (or ended).
    GuardCancelled {
        /// The actor.
        actor_id: ActorId,
        /// The guard's token.
        fencing_token: FencingToken,
        /// Why: the belief was about to end, or the keeper had already dropped it.
        reason: CancelReason,
    },
    /// A campaign's attempt to acquire failed other than by the lease being held elsewhere:
    /// the store failed or could not be reached, or its grant came too late to believe. The
    /// campaign waits and tries again; this says why it has not got the lease yet.
    AcquireFailed {
        /// The actor.
        actor_id: ActorId,
        /// The campaign's failed attempts in a row so far, this one included (1 for the first).
        attempts: u64,
        /// What failed.
        error: LeaseError,
    },
}

/// Why a guard was cancelled ([`SessionEvent::GuardCancelled`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CancelReason {
    /// The keeper still believed the lease, but its belief ends within the cancel lead: no
    /// renewal was confirmed in time (the store failed, or answered too late). The lease is
    /// lost to this node; the session releases it. No [`KeeperEvent::Lost`] follows for it
    /// unless the belief runs out before the release begins.
    BeliefEnding,
    /// The keeper no longer believed the guard's lease: it was lost, released or replaced,
    /// which the keeper reported with its own event.
    BeliefGone,
}

/// Why reading a session's events failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EventsError {
    /// The reader fell behind by this many events, which are gone; later ones follow.
    #[error("the reader fell behind and missed {0} events")]
    Lagged(u64),
    /// The session is gone.
    #[error("the session is closed")]
    Closed,
}

/// A reader of a session's events: bounded, every reader sees every event unless it falls
/// behind by more than the capacity.
#[derive(Debug)]
pub struct SessionEvents {
    receiver: broadcast::Receiver<SessionEvent>,
}

impl SessionEvents {
    /// The next event.
    ///
    /// # Errors
    /// [`EventsError::Lagged`] after the reader fell behind, [`EventsError::Closed`] once the
    /// session is gone.
    pub async fn recv(&mut self) -> Result<SessionEvent, EventsError> {
        self.receiver.recv().await.map_err(|error| match error {
            broadcast::error::RecvError::Lagged(missed) => EventsError::Lagged(missed),
            broadcast::error::RecvError::Closed => EventsError::Closed,
        })
    }

    /// The next event if one is waiting.
    pub fn try_recv(&mut self) -> Option<Result<SessionEvent, EventsError>> {
        match self.receiver.try_recv() {
            Ok(event) => Some(Ok(event)),
            Err(broadcast::error::TryRecvError::Empty) => None,
            Err(broadcast::error::TryRecvError::Lagged(missed)) => {
                Some(Err(EventsError::Lagged(missed)))
            }
            Err(broadcast::error::TryRecvError::Closed) => Some(Err(EventsError::Closed)),
        }
    }
}

/// Why a session refused a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The store refused or failed.
    #[error(transparent)]
    Lease(#[from] LeaseError),
    /// This session already holds a guard on the actor; one guard per actor.
    #[error("this session already holds a guard on {actor_id}")]
    AlreadyGuarded {
        /// The actor.
        actor_id: ActorId,
    },
    /// The session is shutting down.
    #[error("the lease session is shutting down")]
    ShuttingDown,
}

/// What a shutdown did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ShutdownReport {
    /// Releases the store answered once the shutdown began: leases released (or found already
    /// not this node's), by the shutdown itself, by guards released or dropped meanwhile, and
    /// by acquires granted after it began.
    pub released: usize,
    /// What was left when the bound ran out: leases still believed, releases the store had
    /// not answered, and acquires still in flight (the store may grant them). Those leases
    /// expire on their own.
    pub unanswered: usize,
}

/// One held lease: the fencing token to carry with every action taken as holder, and a
/// cancellation token that fires before the node's belief in the lease ends. Dropping it
/// releases the lease.
#[derive(Debug)]
pub struct LeaseGuard {
    actor_id: ActorId,
    fencing_token: FencingToken,
    cancel: CancellationToken,
    shared: Arc<Shared>,
    released: bool,
}

impl LeaseGuard {
    /// The actor.
    pub fn actor_id(&self) -> &ActorId {
        &self.actor_id
    }

    /// The lease's fencing token.
    pub fn fencing_token(&self) -> FencingToken {
        self.fencing_token
    }

    /// Fires before the belief in the lease ends (and when it is lost or released): stop the
    /// work tied to the lease then.
    pub fn cancellation(&self) -> &CancellationToken {
        &self.cancel
    }

    /// Whether the lease may still be acted on: its token not cancelled, and the node's belief
    /// in the lease, read against the clock now, ending beyond the cancel lead. The second
    /// half does not wait for the session's driver, which cancels the token on its own
    /// schedule: a runtime too busy to run it, or one that stopped it, leaves the token
    /// uncancelled past the deadline, and this answers `false` (and cancels it) regardless.
    pub fn is_valid(&self) -> bool {
        if self.cancel.is_cancelled() {
            return false;
        }
        if self
            .shared
            .believed_beyond_the_lead(&self.actor_id, self.fencing_token)
        {
            return true;
        }
        self.cancel.cancel();
        false
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        self.cancel.cancel();
        self.shared.drop_guard(&self.actor_id, self.fencing_token);
    }
}

/// The keeper's belief in the lease on an actor now, for guards, which are not generic over
/// the manager.
type BeliefNow = Box<dyn Fn(&ActorId) -> Option<HeldBelief> + Send + Sync>;

/// The state a session shares with its guards and its driver.
struct Shared {
    /// Actors with a live guard: the guard's token and cancellation. A token is guarded at
    /// most once (see `guarded_max`), so (actor, token) names one guard.
    guards: Mutex<BTreeMap<ActorId, (FencingToken, CancellationToken)>>,
    /// The highest token this session ever handed out a guard for, per actor (one entry per
    /// actor ever guarded). A new guard's token must be higher: a guard keeps its token after
    /// it is cancelled, and a fence cannot tell a cancelled guard that runs late from a new
    /// one with the same token.
    guarded_max: Mutex<BTreeMap<ActorId, FencingToken>>,
    belief_now: BeliefNow,
    clock: SharedClock,
    cancel_lead_ms: u64,
    /// Leases whose guard was dropped or cancelled: the driver releases them.
    to_release: Mutex<Vec<(ActorId, FencingToken)>>,
    /// Wakes the driver: a guard came or went.
    changed: Notify,
    events: broadcast::Sender<SessionEvent>,
    closing: CancellationToken,
    /// Cancelled when the shutdown has done all it will: the driver, which keeps the
    /// keeper's loop running until then, returns.
    stopped: CancellationToken,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("guards", &self.guards)
            .field("to_release", &self.to_release)
            .field("cancel_lead_ms", &self.cancel_lead_ms)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// Whether the node believes it holds the lease on `actor_id` with `token` beyond the
    /// cancel lead from now.
    fn believed_beyond_the_lead(&self, actor_id: &ActorId, token: FencingToken) -> bool {
        let Some(belief) = (self.belief_now)(actor_id) else {
            return false;
        };
        belief.fencing_token == token
            && self.deadline_ms(belief.until_local_ms) > self.clock.now_ms()
    }

    /// When a guard on a belief ending at `until_local_ms` is cancelled: the cancel lead
    /// before it.
    fn deadline_ms(&self, until_local_ms: u64) -> u64 {
        until_local_ms.saturating_sub(self.cancel_lead_ms)
    }

    /// Whether `actor_id` has a guard that is still valid. A guard that is not (cancelled, or
    /// its deadline passed while the driver did not run) gives way: it is cancelled and its
    /// lease queued for release, as the driver would have done.
    fn has_live_guard(&self, actor_id: &ActorId) -> bool {
        let mut guards = self.lock_guards();
        let Some((token, cancel)) = guards.get(actor_id) else {
            return false;
        };
        let token = *token;
        if !cancel.is_cancelled() && self.believed_beyond_the_lead(actor_id, token) {
            return true;
        }
        cancel.cancel();
        guards.remove(actor_id);
        drop(guards);
        self.lock_release().push((actor_id.clone(), token));
        self.changed.notify_one();
        false
    }

    /// The highest token guarded on `actor_id` so far.
    fn guarded_max(&self, actor_id: &ActorId) -> FencingToken {
        let guarded = self.guarded_max.lock().expect("guarded tokens poisoned");
        guarded.get(actor_id).copied().unwrap_or(FencingToken::ZERO)
    }

    fn drop_guard(&self, actor_id: &ActorId, token: FencingToken) {
        let mut guards = self.lock_guards();
        if guards.get(actor_id).is_some_and(|(t, _)| *t == token) {
            guards.remove(actor_id);
            drop(guards);
            self.lock_release().push((actor_id.clone(), token));
            self.changed.notify_one();
        }
    }

    fn emit(&self, event: SessionEvent) {
        // No reader is fine: events are for whoever listens.
        let _ = self.events.send(event);
    }

    fn lock_guards(
        &self,
    ) -> std::sync::MutexGuard<'_, BTreeMap<ActorId, (FencingToken, CancellationToken)>> {
        self.guards
            .lock()
            .expect("session guards poisoned by a panic")
    }

    fn lock_release(&self) -> std::sync::MutexGuard<'_, Vec<(ActorId, FencingToken)>> {
        self.to_release
            .lock()
            .expect("session releases poisoned by a panic")
    }
}

/// A node's lease session; see the module docs. Cheap to clone.
pub struct LeaseSession<M> {
    keeper: Arc<LeaseKeeper<M>>,
    timing: SessionTiming,
    shared: Arc<Shared>,
}

impl<M> Clone for LeaseSession<M> {
    fn clone(&self) -> Self {
        Self {
            keeper: Arc::clone(&self.keeper),
            timing: self.timing,
            shared: Arc::clone(&self.shared),
        }
    }
}

/// The work of a session: renewals, guard cancellation, releases of dropped guards. Drive
/// [`run`](Self::run) on a task; it returns after [`LeaseSession::shutdown`], and only then:
/// the driver holds the session, so dropping every handle of it does not stop the task (nor
/// release the leases of guards still alive). End a session with `shutdown`.
pub struct SessionDriver<M> {
    session: LeaseSession<M>,
    keeper_events: crate::keeper::KeeperEvents,
}

impl<M: LeaseManager + 'static> LeaseSession<M> {
    /// A session for one process lifetime of `node_id` over `manager`, timed by `clock`, and
    /// the driver to run.
    ///
    /// # Errors
    /// [`ConfigError`] if `config` does not fit the manager's lease duration or `node_id`
    /// leaves no room for the incarnation.
    pub fn new(
        manager: Arc<M>,
        clock: SharedClock,
        node_id: NodeId,
        config: SessionConfig,
    ) -> Result<(Self, SessionDriver<M>), ConfigError> {
        let timing = config.timing_for(manager.lease_duration_ms())?;
        let parts = LeaseKeeper::new(manager, Arc::clone(&clock), node_id, config.keeper)?;
        Ok(Self::assemble(parts, clock, timing))
    }

    /// As [`new`](Self::new), with the keeper's incarnation chosen by a simulator.
    #[cfg(feature = "simulation")]
    pub fn with_incarnation(
        manager: Arc<M>,
        clock: SharedClock,
        node_id: NodeId,
        incarnation: u64,
        config: SessionConfig,
    ) -> Result<(Self, SessionDriver<M>), ConfigError> {
        let timing = config.timing_for(manager.lease_duration_ms())?;
        let keeper = config.keeper;
        let parts = LeaseKeeper::with_incarnation(
            manager,
            Arc::clone(&clock),
            node_id,
            incarnation,
            keeper,
        )?;
        Ok(Self::assemble(parts, clock, timing))
    }

    /// A session on the current tokio runtime with the real clock, its driver spawned.
    ///
    /// # Errors
    /// As [`new`](Self::new), and [`ConfigError::Keeper`] outside a tokio runtime.
    pub fn start(
        manager: Arc<M>,
        node_id: NodeId,
        config: SessionConfig,
    ) -> Result<Self, ConfigError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|e| ConfigError::Keeper {
            reason: format!("LeaseSession::start needs a tokio runtime: {e}"),
        })?;
        let clock: SharedClock = Arc::new(kelpie_core::TokioClock::new());
        let (session, driver) = Self::new(manager, clock, node_id, config)?;
        drop(runtime.spawn(driver.run()));
        Ok(session)
    }

    fn assemble(
        (keeper, keeper_events): crate::keeper::KeeperParts<M>,
        clock: SharedClock,
        timing: SessionTiming,
    ) -> (Self, SessionDriver<M>) {
        let (events, _) = broadcast::channel(timing.events_capacity);
        let believer = Arc::clone(&keeper);
        let shared = Arc::new(Shared {
            guards: Mutex::new(BTreeMap::new()),
            guarded_max: Mutex::new(BTreeMap::new()),
            belief_now: Box::new(move |actor_id| believer.belief(actor_id)),
            clock,
            cancel_lead_ms: timing.cancel_lead_ms,
            to_release: Mutex::new(Vec::new()),
            changed: Notify::new(),
            events,
            closing: CancellationToken::new(),
            stopped: CancellationToken::new(),
        });
        let session = Self {
            keeper,
            timing,
            shared,
        };
        let driver = SessionDriver {
            session: session.clone(),
            keeper_events,
        };
        (session, driver)
    }

    /// The node this session acts for.
    pub fn node_id(&self) -> &NodeId {
        self.keeper.node_id()
    }

    /// The identity the store sees: the node id and this process's incarnation.
    pub fn holder_id(&self) -> &NodeId {
        self.keeper.holder_id()
    }

    /// The session's clock: the node's, which its keeper and guards read too.
    fn clock(&self) -> &SharedClock {
        &self.shared.clock
    }

    /// The keeper the session drives (its beliefs, timing and manager).
    pub fn keeper(&self) -> &Arc<LeaseKeeper<M>> {
        &self.keeper
    }

    /// The session's settings, resolved against the manager's lease duration.
    pub fn timing(&self) -> SessionTiming {
        self.timing
    }

    /// A new reader of the session's events, from now on.
    pub fn events(&self) -> SessionEvents {
        SessionEvents {
            receiver: self.shared.events.subscribe(),
        }
    }

    /// Acquires the lease on `actor_id` once.
    ///
    /// # Errors
    /// [`SessionError::Lease`] with the store's refusal ([`LeaseError::HeldByOther`]) or
    /// failure; [`SessionError::AlreadyGuarded`]; [`SessionError::ShuttingDown`].
    pub async fn acquire(&self, actor_id: &ActorId) -> Result<LeaseGuard, SessionError> {
        if self.shared.closing.is_cancelled() {
            return Err(SessionError::ShuttingDown);
        }
        if self.shared.has_live_guard(actor_id) {
            return Err(SessionError::AlreadyGuarded {
                actor_id: actor_id.clone(),
            });
        }
        let lease = self.acquire_unguarded_token(actor_id).await?;
        let token = self
            .believed_beyond_the_cancel_lead(actor_id, lease.expires_at_ms)
            .await?;
        let cancel = CancellationToken::new();
        let shut_down = {
            let mut guards = self.shared.lock_guards();
            // Another acquire of this session guarded the actor meanwhile (this one's token,
            // if that guard already went stale).
            let taken = guards.contains_key(actor_id) || token <= self.shared.guarded_max(actor_id);
            if taken {
                return Err(SessionError::AlreadyGuarded {
                    actor_id: actor_id.clone(),
                });
            }
            // Checked under the guards' lock, which shutdown takes after it starts closing:
            // either shutdown finds this guard and cancels it, or this sees the session closing.
            // A guard handed out after shutdown took the guards would never be cancelled (the
            // driver has stopped), though the lease is no longer renewed.
            let shut_down = self.shared.closing.is_cancelled();
            if !shut_down {
                guards.insert(actor_id.clone(), (token, cancel.clone()));
                let mut guarded = self
                    .shared
                    .guarded_max
                    .lock()
                    .expect("guarded tokens poisoned");
                let before = guarded.insert(actor_id.clone(), token);
                assert!(before.is_none_or(|b| b < token), "a token is guarded once");
            }
            shut_down
        };
        if shut_down {
            // The lease was granted while the session shut down: give it back.
            let _ = self.keeper.release_token(actor_id, token).await;
            return Err(SessionError::ShuttingDown);
        }
        self.shared.changed.notify_one();
        Ok(LeaseGuard {
            actor_id: actor_id.clone(),
            fencing_token: token,
            cancel,
            shared: Arc::clone(&self.shared),
            released: false,
        })
    }

    /// Acquires the lease on `actor_id` with a token no guard of this session had. The store
    /// answers an acquire by the holder it already counts with the same token (idempotent):
    /// after a guard was dropped or cancelled while the store still counted this process
    /// (its release not yet sent, or its belief run out on a runtime too busy to release it),
    /// that would hand the new guard the old one's token, and the old guard, if still at
    /// work, would pass every fence the new one passes. That lease is released first, so the
    /// store grants a new token.
    ///
    /// # Errors
    /// As [`LeaseKeeper::acquire`] and [`LeaseKeeper::release`]; [`LeaseError::Expired`] if
    /// the stale grant's reply came too late to be believed (nothing to release from here);
    /// [`StoreError::Corrupt`] if the store grants a used token again after the release.
    async fn acquire_unguarded_token(&self, actor_id: &ActorId) -> Result<Lease, SessionError> {
        let lease = self.keeper.acquire(actor_id).await?;
        let guarded_max = self.shared.guarded_max(actor_id);
        if lease.fencing_token > guarded_max {
            return Ok(lease);
        }
        if self.keeper.holds(actor_id).is_none() {
            return Err(SessionError::Lease(LeaseError::Expired {
                actor_id: actor_id.clone(),
                node_id: self.holder_id().clone(),
                expired_at_ms: lease.expires_at_ms,
            }));
        }
        // A live guard of this session holds that token: another acquire of the actor, on
        // another thread, was granted it first and guards it. Releasing it would end that
        // guard's lease under it.
        let guarded = self
            .shared
            .lock_guards()
            .get(actor_id)
            .is_some_and(|(token, cancel)| *token == lease.fencing_token && !cancel.is_cancelled());
        if guarded {
            return Err(SessionError::AlreadyGuarded {
                actor_id: actor_id.clone(),
            });
        }
        // Only that tenure's lease: a later one begun meanwhile is not this call's to end. If
        // it is no longer believed (the driver began releasing a dropped guard's lease, or
        // another acquire on another thread moved on), the lease changed hands meanwhile:
        // the caller retries, as after a store failure.
        let released = self.keeper.release_token(actor_id, lease.fencing_token);
        match released.await {
            Ok(_) => {}
            Err(LeaseError::NotHolder { .. }) => {
                let reason =
                    format!("the lease on {actor_id} changed hands while it was acquired; retry");
                let error = LeaseError::Store(StoreError::Unavailable { reason });
                return Err(SessionError::Lease(error));
            }
            Err(error) => return Err(error.into()),
        }
        let lease = self.keeper.acquire(actor_id).await?;
        if lease.fencing_token > guarded_max {
            return Ok(lease);
        }
        let _ = self
            .keeper
            .release_token(actor_id, lease.fencing_token)
            .await;
        Err(SessionError::Lease(LeaseError::Store(
            StoreError::Corrupt {
                location: format!("the lease on {actor_id}"),
                reason: format!(
                    "the store granted {actor_id} with token {} after this process released it, \
                 though it had guarded token {} before: tokens must rise with each grant",
                    lease.fencing_token.0, guarded_max.0
                ),
            },
        )))
    }

    /// The token to guard, once the belief in the lease just granted on `actor_id` ends
    /// beyond the cancel lead. A grant whose reply came late starts a belief that ends within
    /// the lead, and a guard on it would be cancelled as it was handed out, its lease released
    /// and taken again with a new token. The keeper's renewal of it is due already, so this
    /// waits for that renewal instead, until the belief ends.
    ///
    /// # Errors
    /// [`LeaseError::Expired`] if no belief holds (a reply that came too late supports none)
    /// or it ran out before a renewal; [`SessionError::ShuttingDown`], the lease released.
    async fn believed_beyond_the_cancel_lead(
        &self,
        actor_id: &ActorId,
        expired_at_ms: u64,
    ) -> Result<FencingToken, SessionError> {
        // Subscribed only for a grant that must wait (most need not), and then before the
        // belief is read again: a renewal between the two is not missed.
        let mut events: Option<broadcast::Receiver<SessionEvent>> = None;
        loop {
            let now_ms = self.clock().now_ms();
            let Some(belief) = self.keeper.belief(actor_id) else {
                return Err(SessionError::Lease(LeaseError::Expired {
                    actor_id: actor_id.clone(),
                    node_id: self.holder_id().clone(),
                    expired_at_ms,
                }));
            };
            if self.shared.deadline_ms(belief.until_local_ms) > now_ms {
                return Ok(belief.fencing_token);
            }
            let Some(events) = events.as_mut() else {
                events = Some(self.shared.events.subscribe());
                continue;
            };
            // Until this actor's belief changes (any event may be it: each is checked above),
            // or it ends, or the session shuts down.
            let changed = std::pin::pin!(events.recv());
            let ends = self
                .clock()
                .sleep(Duration::from_millis(belief.until_local_ms - now_ms));
            let closing = std::pin::pin!(self.shared.closing.cancelled());
            if let Either::Right(_) = select(select(changed, ends), closing).await {
                let _ = self
                    .keeper
                    .release_token(actor_id, belief.fencing_token)
                    .await;
                return Err(SessionError::ShuttingDown);
            }
        }
    }

    /// Waits until the lease on `actor_id` is held here: tries, and while another node holds
    /// it, waits for the store to see it freed where the store can watch (etcd:
    /// [`LeaseManager::watch_until_free`], at most one lease duration per wait) and tries
    /// again at once; elsewhere (SQLite, memory), or after a store failure, it waits a
    /// jittered share of [`campaign_poll_ms_max`](SessionTiming::campaign_poll_ms_max).
    /// Reports each new holder it meets as [`SessionEvent::HolderChanged`], and each attempt
    /// that failed otherwise (the store failed, or its grant came too late) as
    /// [`SessionEvent::AcquireFailed`]. Cancel it by dropping the future; it ends with [`SessionError::ShuttingDown`] when the session shuts
    /// down.
    ///
    /// # Errors
    /// A refusal other than "held by another node" (which it waits out), and as
    /// [`acquire`](Self::acquire).
    pub async fn campaign(&self, actor_id: &ActorId) -> Result<LeaseGuard, SessionError> {
        let mut seen_holder: Option<NodeId> = None;
        let mut failures = 0u64;
        for attempt in 0u64.. {
            match self.acquire(actor_id).await {
                Ok(guard) => return Ok(guard),
                Err(SessionError::Lease(LeaseError::HeldByOther { holder, .. })) => {
                    failures = 0;
                    if seen_holder.as_ref() != Some(&holder) {
                        self.shared.emit(SessionEvent::HolderChanged {
                            actor_id: actor_id.clone(),
                            holder: holder.clone(),
                        });
                        seen_holder = Some(holder);
                    }
                    if self.watched_until_free(actor_id).await? {
                        continue;
                    }
                }
                Err(SessionError::Lease(
                    error @ (LeaseError::Store(_) | LeaseError::Expired { .. }),
                )) => {
                    failures += 1;
                    self.shared.emit(SessionEvent::AcquireFailed {
                        actor_id: actor_id.clone(),
                        attempts: failures,
                        error,
                    });
                }
                Err(other) => return Err(other),
            }
            let wait_ms = self.campaign_wait_ms(actor_id, attempt);
            let waiting = self.clock().sleep(Duration::from_millis(wait_ms));
            let closing = self.shared.closing.cancelled();
            if let Either::Right(_) = select(waiting, std::pin::pin!(closing)).await {
                return Err(SessionError::ShuttingDown);
            }
        }
        unreachable!("the attempts run until one succeeds or fails")
    }

    /// Waits for the store to see the lease freed, where it can watch: true if it waited (try
    /// again at once), false if the store cannot watch or the watch failed (poll instead).
    async fn watched_until_free(&self, actor_id: &ActorId) -> Result<bool, SessionError> {
        let manager = self.keeper.manager();
        let watch = manager.watch_until_free(actor_id, manager.lease_duration_ms());
        let closing = self.shared.closing.cancelled();
        match select(std::pin::pin!(watch), std::pin::pin!(closing)).await {
            Either::Left((Ok(Some(_)), _)) => Ok(true),
            Either::Left((Ok(None) | Err(_), _)) => Ok(false),
            Either::Right(_) => Err(SessionError::ShuttingDown),
        }
    }

    /// Half to all of the longest poll, drawn from (holder, actor, attempt): contenders spread
    /// out without reading real randomness, so simulated runs replay.
    fn campaign_wait_ms(&self, actor_id: &ActorId, attempt: u64) -> u64 {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        (self.holder_id().as_str(), actor_id.as_str(), attempt).hash(&mut hasher);
        let max_ms = self.timing.campaign_poll_ms_max;
        let half_ms = max_ms / 2;
        half_ms + hasher.finish() % (max_ms - half_ms + 1)
    }

    /// Releases the guard's lease now and waits for the store's answer.
    ///
    /// # Errors
    /// The store's answer if it refused or failed (the lease then expires on its own).
    /// [`LeaseError::NotHolder`] for a guard another session handed out: that guard is
    /// dropped, so the session it came from releases its lease, as for any dropped guard.
    pub async fn release(&self, mut guard: LeaseGuard) -> Result<(), LeaseError> {
        if !Arc::ptr_eq(&guard.shared, &self.shared) {
            let actor_id = guard.actor_id.clone();
            drop(guard);
            return Err(LeaseError::NotHolder {
                actor_id,
                node_id: self.holder_id().clone(),
                holder: None,
            });
        }
        guard.released = true;
        guard.cancel.cancel();
        {
            let mut guards = self.shared.lock_guards();
            if guards
                .get(&guard.actor_id)
                .is_some_and(|(t, _)| *t == guard.fencing_token)
            {
                guards.remove(&guard.actor_id);
            }
        }
        self.shared.changed.notify_one();
        // The guard's own lease: a later guard's, begun since this one was cancelled, is not
        // this call's to release.
        let releasing = self
            .keeper
            .release_token(&guard.actor_id, guard.fencing_token);
        releasing.await.map(|_| ())
    }

    /// Releases every lease this session holds and stops it: guards are cancelled at once and
    /// no acquire is sent from then on; acquires already in flight are awaited, since the
    /// store may yet grant them, and every lease held is released, those granted meanwhile
    /// too. All of it for at most [`shutdown_timeout_ms`](SessionTiming::shutdown_timeout_ms):
    /// leases still held or in flight then expire on their own. The driver returns afterwards.
    pub async fn shutdown(&self) -> ShutdownReport {
        self.shared.closing.cancel();
        let guards = std::mem::take(&mut *self.shared.lock_guards());
        for (_, cancel) in guards.values() {
            cancel.cancel();
        }
        self.shared.lock_release().clear();
        self.keeper.close();
        let clock = self.clock();
        let deadline_ms = clock
            .now_ms()
            .saturating_add(self.timing.shutdown_timeout_ms);
        // Until nothing is held, in flight or unanswered: each pass releases what is believed
        // now (a grant of an acquire in flight may have started a belief since the last),
        // and waits for one of the releases in flight to be answered, or a retry interval
        // (acquires in flight; releases the keeper's loop retries; a release that hangs must
        // not keep a grant that comes meanwhile from being released).
        let retry_ms = self.keeper.timing().retry_interval_ms;
        let mut releasing = FuturesUnordered::new();
        loop {
            let now_ms = clock.now_ms();
            if self.keeper.closing_progress().is_done() || now_ms >= deadline_ms {
                break;
            }
            for (actor_id, belief) in self.keeper.beliefs() {
                let keeper = &self.keeper;
                releasing.push(async move {
                    let _ = keeper.release_token(&actor_id, belief.fencing_token).await;
                });
            }
            let answered = async {
                match releasing.is_empty() {
                    true => futures_util::future::pending().await,
                    false => releasing.next().await,
                }
            };
            let wait_ms = retry_ms.min(deadline_ms - now_ms);
            let tick = clock.sleep(Duration::from_millis(wait_ms));
            select(std::pin::pin!(answered), tick).await;
        }
        let progress = self.keeper.closing_progress();
        self.keeper.stop();
        self.shared.stopped.cancel();
        self.shared.changed.notify_one();
        ShutdownReport {
            released: progress.released,
            unanswered: progress.beliefs + progress.acquires_in_flight + progress.releases_pending,
        }
    }
}

impl<M: LeaseManager + 'static> SessionDriver<M> {
    /// Renews the session's leases (the keeper's loop), forwards the keeper's events,
    /// cancels each guard's token before its belief ends, and releases the leases of dropped
    /// guards. Returns after [`LeaseSession::shutdown`].
    pub async fn run(self) {
        let keeper = Arc::clone(&self.session.keeper);
        let shared = Arc::clone(&self.session.shared);
        let renewals = std::pin::pin!(keeper.run());
        let watch = std::pin::pin!(self.watch());
        if let Either::Right(((), renewals)) = select(renewals, watch).await {
            // Shutdown began: the keeper's loop goes on renewing what is not yet released and
            // retrying releases the store did not answer, until the shutdown is over. Then
            // the driver returns, even from a round waiting on a store that never answers.
            let stopped = std::pin::pin!(shared.stopped.cancelled());
            select(renewals, stopped).await;
        }
    }

    async fn watch(self) {
        let session = self.session.clone();
        // Releases in flight, awaited beside the loop's waits: a release the store does not
        // answer must not hold up the cancellation of every other guard, whose beliefs end
        // on their own schedule.
        let mut releasing = FuturesUnordered::new();
        loop {
            while let Ok(event) = self.keeper_events.try_recv() {
                self.on_keeper_event(event);
            }
            if session.shared.closing.is_cancelled() {
                return;
            }
            let next_deadline_ms = self.cancel_due_guards();
            for (actor_id, token) in self.dropped_to_release() {
                let keeper = Arc::clone(&session.keeper);
                // A failed release is retried by the keeper until the store answers. By token:
                // by the time this runs, the actor may have been acquired again.
                releasing.push(async move {
                    let _ = keeper.release_token(&actor_id, token).await;
                });
            }
            let released = async {
                match releasing.is_empty() {
                    true => futures_util::future::pending().await,
                    false => releasing.next().await,
                }
            };
            let now_ms = session.clock().now_ms();
            // With no guard there is no deadline to wake for: wait for a change only.
            let sleep = match next_deadline_ms {
                Some(deadline_ms) => {
                    let wait_ms = deadline_ms.saturating_sub(now_ms).max(1);
                    Either::Left(session.clock().sleep(Duration::from_millis(wait_ms)))
                }
                None => Either::Right(futures_util::future::pending::<()>()),
            };
            let changed = std::pin::pin!(session.shared.changed.notified());
            let closing = std::pin::pin!(session.shared.closing.cancelled());
            let event = self.keeper_events.recv_async();
            let released = std::pin::pin!(released);
            let changed_or_released = select(changed, released);
            let woken = select(select(changed_or_released, closing), select(sleep, event));
            if let Either::Right((Either::Right((Ok(event), _)), _)) = woken.await {
                self.on_keeper_event(event);
            }
        }
    }

    fn on_keeper_event(&self, event: KeeperEvent) {
        let shared = &self.session.shared;
        if let KeeperEvent::Lost {
            actor_id,
            fencing_token,
            ..
        } = &event
        {
            // Lost before its deadline (a refused renewal): the work stops now.
            let mut guards = shared.lock_guards();
            if guards
                .get(actor_id)
                .is_some_and(|(t, _)| t == fencing_token)
            {
                if let Some((_, cancel)) = guards.remove(actor_id) {
                    cancel.cancel();
                }
            }
        }
        shared.emit(SessionEvent::Lease(event));
    }

    /// Cancels every guard whose belief ends within the cancel lead (or has ended), queueing
    /// its lease for release; returns the earliest deadline of the others.
    fn cancel_due_guards(&self) -> Option<u64> {
        let session = &self.session;
        // The beliefs are read under the guards' lock (the order `has_live_guard` takes them
        // in too): a guard is inserted once its belief started, so every guard in the map
        // has its belief in the read, unless it ended. Read before the lock, an acquire on
        // another thread could start a belief and insert its guard in between, and the
        // guard was cancelled at once as if its belief were gone (kelpie node, 2,000 actors).
        let mut guards = session.shared.lock_guards();
        let now_ms = session.clock().now_ms();
        let beliefs: BTreeMap<ActorId, (FencingToken, u64)> = session
            .keeper
            .beliefs()
            .into_iter()
            .map(|(a, b)| (a, (b.fencing_token, b.until_local_ms)))
            .collect();
        let mut next_deadline_ms: Option<u64> = None;
        let mut cancelled = Vec::new();
        guards.retain(|actor_id, (token, cancel)| {
            let (deadline_ms, reason) = match beliefs.get(actor_id) {
                Some((held, until_ms)) if held == token => (
                    session.shared.deadline_ms(*until_ms),
                    CancelReason::BeliefEnding,
                ),
                _ => (0, CancelReason::BeliefGone),
            };
            if deadline_ms > now_ms {
                next_deadline_ms =
                    Some(next_deadline_ms.map_or(deadline_ms, |d| d.min(deadline_ms)));
                return true;
            }
            cancel.cancel();
            cancelled.push((actor_id.clone(), *token, reason));
            false
        });
        drop(guards);
        for (actor_id, fencing_token, reason) in cancelled {
            session
                .shared
                .lock_release()
                .push((actor_id.clone(), fencing_token));
            session.shared.emit(SessionEvent::GuardCancelled {
                actor_id,
                fencing_token,
                reason,
            });
        }
        next_deadline_ms
    }

    /// The leases of guards that were dropped or cancelled, to release now: those still
    /// believed with the guard's token (no later guard has it: each token is guarded once).
    fn dropped_to_release(&self) -> Vec<(ActorId, FencingToken)> {
        let dropped = std::mem::take(&mut *self.session.shared.lock_release());
        dropped
            .into_iter()
            .filter(|(actor_id, token)| self.session.keeper.holds(actor_id) == Some(*token))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{FlakyStore, PausedClock};
    use crate::{backend::LeaseOp, backend::ProtocolLeaseManager, LeaseConfig};

    type Manager = ProtocolLeaseManager<FlakyStore>;

    /// Short leases, on tokio's paused clock: the tests take no real time, and no scheduling
    /// delay of a loaded machine can lapse a lease.
    const LEASE_MS: u64 = 300;
    /// Longest a test waits (paused time) for something that must happen within a lease or two.
    const WAIT_MS_MAX: u64 = 5_000;

    fn manager(clock: &SharedClock) -> Arc<Manager> {
        let store = FlakyStore::new(Arc::clone(clock));
        Arc::new(Manager::new(store, LeaseConfig::new(LEASE_MS).unwrap()))
    }

    fn node(name: &str) -> NodeId {
        NodeId::new(name).unwrap()
    }

    fn actor(name: &str) -> ActorId {
        ActorId::new(name).unwrap()
    }

    fn session(manager: &Arc<Manager>, clock: &SharedClock, name: &str) -> LeaseSession<Manager> {
        let (session, driver) = session_and_driver(manager, clock, name);
        drop(tokio::spawn(driver.run()));
        session
    }

    /// A session of node `name` with default settings, and its driver, not started.
    fn session_and_driver(
        manager: &Arc<Manager>,
        clock: &SharedClock,
        name: &str,
    ) -> (LeaseSession<Manager>, SessionDriver<Manager>) {
        let config = SessionConfig::default();
        let built = LeaseSession::new(Arc::clone(manager), Arc::clone(clock), node(name), config);
        built.unwrap()
    }

    /// Sessions of nodes `n1` and `n2` on one store.
    fn two_sessions(
        manager: &Arc<Manager>,
        clock: &SharedClock,
    ) -> (LeaseSession<Manager>, LeaseSession<Manager>) {
        (session(manager, clock, "n1"), session(manager, clock, "n2"))
    }

    /// Polls `done` on the test's clock until it holds, failing after [`WAIT_MS_MAX`].
    async fn eventually(clock: &SharedClock, what: &str, done: impl Fn() -> bool) {
        let start_ms = clock.now_ms();
        while !done() {
            assert!(
                clock.now_ms() - start_ms < WAIT_MS_MAX,
                "{what} never happened"
            );
            clock.sleep(Duration::from_millis(2)).await;
        }
    }

    /// Waits until the store has no lease on `name` (released), failing after
    /// [`WAIT_MS_MAX`].
    async fn eventually_free(clock: &SharedClock, leases: &Arc<Manager>, name: &str) {
        let (store, actor_id) = (Arc::clone(leases), actor(name));
        eventually(clock, &format!("the release of {name}"), move || {
            futures_util::FutureExt::now_or_never(store.get(&actor_id))
                .is_some_and(|lease| lease.unwrap().is_none())
        })
        .await;
    }

    #[test]
    fn settings_are_validated_against_the_managers_duration() {
        let config = SessionConfig::default();
        let timing = config.timing_for(LEASE_MS).unwrap();
        assert_eq!(timing.cancel_lead_ms, timing.keeper.retry_interval_ms);
        assert_eq!(timing.campaign_poll_ms_max, LEASE_MS / 4);
        assert!(config.with_cancel_lead_ms(0).timing_for(LEASE_MS).is_err());
        assert!(config
            .with_cancel_lead_ms(LEASE_MS)
            .timing_for(LEASE_MS)
            .is_err());
        assert!(config.with_events_capacity(0).timing_for(LEASE_MS).is_err());
        let too_many = SESSION_EVENTS_CAPACITY_MAX + 1;
        assert!(config
            .with_events_capacity(too_many)
            .timing_for(LEASE_MS)
            .is_err());
        assert!(config
            .with_campaign_poll_ms_max(0)
            .timing_for(LEASE_MS)
            .is_err());
        assert!(config.timing_for(10).is_err(), "below the lease limits");
    }

    /// Renewals keep failing: the guard's token is cancelled while the node still believes
    /// it holds the lease, so work tied to it stops before the belief (and the lease) ends.
    /// The lead is the default (a retry interval). On the real clock this failed now and then
    /// on a loaded machine; paused time moves only when every task waits, so the test reads
    /// the time at the instant of the cancellation. The simulator checks the same
    /// (`session_dst`).
    #[tokio::test(start_paused = true)]
    async fn the_guard_is_cancelled_before_the_belief_ends() {
        let clock: SharedClock = PausedClock::shared();
        let leases = manager(&clock);
        let session = session(&leases, &clock, "n1");
        let mut events = session.events();
        let guard = session.acquire(&actor("a")).await.unwrap();
        assert!(guard.is_valid());
        leases.store().set_down(true);
        guard.cancellation().cancelled().await;
        let cancelled_ms = clock.now_ms();
        assert!(!guard.is_valid());
        let mut seen = Vec::new();
        while let Some(Ok(event)) = events.try_recv() {
            seen.push(event);
        }
        // The belief's end, as the keeper last extended it.
        let until_ms = seen.iter().rev().find_map(|e| match e {
            SessionEvent::Lease(
                KeeperEvent::Acquired { until_local_ms, .. }
                | KeeperEvent::Renewed { until_local_ms, .. },
            ) => Some(*until_local_ms),
            _ => None,
        });
        let until_ms = until_ms.unwrap_or_else(|| panic!("no grant among {seen:?}"));
        assert!(
            cancelled_ms < until_ms,
            "cancelled at {cancelled_ms} ms, the belief ended at {until_ms} ms"
        );
        let position = |wanted: fn(&SessionEvent) -> bool| seen.iter().position(wanted);
        // Cancelled while the keeper still believed it: a loss the event names as such (a
        // node counts it; the keeper reports none unless the belief runs out first).
        let cancelled = position(|e| {
            matches!(
                e,
                SessionEvent::GuardCancelled {
                    reason: CancelReason::BeliefEnding,
                    ..
                }
            )
        });
        let lost = position(|e| matches!(e, SessionEvent::Lease(KeeperEvent::Lost { .. })));
        assert!(cancelled.is_some(), "{seen:?}");
        assert!(lost.is_none_or(|lost| Some(lost) > cancelled), "{seen:?}");
    }

    /// An acquire whose reply comes back when most of the belief is gone (a slow store, a
    /// node starting with many actors) gets a guard that lasts: the session waits for the
    /// keeper's renewal, which is due, instead of handing out a guard it cancels at once (its
    /// lease then released and taken again with a new token).
    #[tokio::test(start_paused = true)]
    async fn a_late_grant_is_guarded_once_renewed_not_cancelled_as_handed_out() {
        let clock: SharedClock = PausedClock::shared();
        let leases = manager(&clock);
        let session = session(&leases, &clock, "n1");
        let mut events = session.events();
        let belief_ms = session
            .keeper()
            .timing()
            .belief_config()
            .belief_duration_ms();
        let lead_ms = session.timing().cancel_lead_ms;
        leases.store().hold(Some(LeaseOp::Acquire));
        let acquirer = session.clone();
        let acquiring = tokio::spawn(async move { acquirer.acquire(&actor("a")).await });
        let store = Arc::clone(&leases);
        eventually(&clock, "the acquire reaching the store", move || {
            store.store().waiting() == 1
        })
        .await;
        // The grant arrives with half the cancel lead of its belief left, and the renewal the
        // keeper sends at once takes a quarter of the lead.
        clock
            .sleep(Duration::from_millis(belief_ms - lead_ms / 2))
            .await;
        leases.store().hold(Some(LeaseOp::Renew));
        let (store, renewal_clock) = (Arc::clone(&leases), Arc::clone(&clock));
        drop(tokio::spawn(async move {
            renewal_clock
                .sleep(Duration::from_millis(lead_ms / 4))
                .await;
            store.store().hold(None);
        }));
        let guard = acquiring.await.unwrap().unwrap();
        assert!(guard.is_valid(), "handed out cancelled");
        clock.sleep(Duration::from_millis(lead_ms)).await;
        assert!(guard.is_valid(), "cancelled right after it was handed out");
        assert_eq!(guard.fencing_token(), FencingToken(1), "no second tenure");
        while let Some(Ok(event)) = events.try_recv() {
            assert!(
                !matches!(event, SessionEvent::GuardCancelled { .. }),
                "{event:?}"
            );
        }
    }

    /// A campaign against a store that fails reports each failed attempt, counted, instead of
    /// retrying in silence (a node on a read-only store said only "ready"), and gets the
    /// lease once the store is back.
    #[tokio::test(start_paused = true)]
    async fn a_campaign_reports_each_failed_attempt() {
        let clock: SharedClock = PausedClock::shared();
        let leases = manager(&clock);
        let session = session(&leases, &clock, "n1");
        let mut events = session.events();
        leases.store().set_down(true);
        let campaigner = session.clone();
        let campaign = tokio::spawn(async move { campaigner.campaign(&actor("a")).await });
        let mut attempts_seen = Vec::new();
        while attempts_seen.len() < 3 {
            match events.recv().await.unwrap() {
                SessionEvent::AcquireFailed {
                    actor_id,
                    attempts,
                    error: LeaseError::Store(_),
                } if actor_id == actor("a") => attempts_seen.push(attempts),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(attempts_seen, [1, 2, 3]);
        leases.store().set_down(false);
        let guard = campaign.await.unwrap().unwrap();
        assert!(guard.is_valid());
    }

    /// Dropping a guard releases its lease; one guard per actor.
    #[tokio::test(start_paused = true)]
    async fn dropping_the_guard_releases_the_lease() {
        let clock: SharedClock = PausedClock::shared();
        let leases = manager(&clock);
        let session = session(&leases, &clock, "n1");
        let guard = session.acquire(&actor("a")).await.unwrap();
        let again = session.acquire(&actor("a")).await.err().unwrap();
        assert!(
            matches!(again, SessionError::AlreadyGuarded { .. }),
            "{again}"
        );
        let cancellation = guard.cancellation().clone();
        drop(guard);
        assert!(cancellation.is_cancelled());
        eventually_free(&clock, &leases, "a").await;
    }

    /// A guard whose belief ran out while its driver did not run answers `is_valid() ==
    /// false` (and is cancelled) at its deadline. The store still counts the process as holder
    /// then, and a new acquire must not get the old guard's token (the store's idempotent
    /// answer): the late old guard would pass every fence the new one passes. Dropping the old
    /// guard afterwards must not release the new guard's lease.
    #[tokio::test(start_paused = true)]
    async fn a_guard_whose_belief_ran_out_unseen_is_invalid_and_its_token_never_guarded_again() {
        let clock: SharedClock = PausedClock::shared();
        let leases = manager(&clock);
        // Its driver never runs (a runtime too busy to schedule it, or one that dropped it):
        // nothing renews or cancels, and the guard must see the clock itself.
        let (session, _driver) = session_and_driver(&leases, &clock, "n1");
        let old = session.acquire(&actor("a")).await.unwrap();
        let deadline_ms = session.keeper().belief(&actor("a")).unwrap().until_local_ms
            - session.timing().cancel_lead_ms;
        clock
            .sleep(Duration::from_millis(deadline_ms - clock.now_ms() - 1))
            .await;
        assert!(old.is_valid(), "valid until its deadline");
        clock.sleep(Duration::from_millis(1)).await;
        assert!(!old.is_valid(), "invalid at its deadline, with no driver");
        assert!(old.cancellation().is_cancelled());

        // Past the belief, before the store's expiry: the store still counts n1's process.
        clock
            .sleep(Duration::from_millis(session.timing().cancel_lead_ms))
            .await;
        assert!(session.keeper().belief(&actor("a")).is_none());
        let stored = leases
            .get(&actor("a"))
            .await
            .unwrap()
            .expect("not expired yet");
        assert_eq!(stored.fencing_token, old.fencing_token());

        let new = session.acquire(&actor("a")).await;
        let new = new.unwrap_or_else(|e| panic!("{e:?}"));
        assert!(
            new.fencing_token() > old.fencing_token(),
            "{:?} guarded twice",
            new.fencing_token()
        );
        drop(old);
        assert!(new.is_valid());
        let stored = leases.get(&actor("a")).await.unwrap().expect("held");
        assert_eq!(
            (stored.holder, stored.fencing_token),
            (session.holder_id().clone(), new.fencing_token())
        );
        assert_eq!(
            session.shared.lock_guards().len(),
            1,
            "the new guard's entry stays"
        );
    }

    /// A guard dropped and acquired again before the driver released its lease: the new
    /// guard gets a new token, and the driver then releases nothing under it.
    #[tokio::test(start_paused = true)]
    async fn a_guard_dropped_and_acquired_again_gets_a_new_token() {
        let clock: SharedClock = PausedClock::shared();
        let leases = manager(&clock);
        let session = session(&leases, &clock, "n1");
        let first = session.acquire(&actor("a")).await.unwrap();
        let first_token = first.fencing_token();
        drop(first);
        let second = session.acquire(&actor("a")).await.unwrap();
        assert!(second.fencing_token() > first_token);
        clock.sleep(Duration::from_millis(3 * LEASE_MS)).await;
        assert!(
            second.is_valid(),
            "renewed by the driver, released by nobody"
        );
        let stored = leases.get(&actor("a")).await.unwrap().expect("held");
        assert_eq!(stored.fencing_token, second.fencing_token());
    }

    /// A campaign waits while another session holds the actor, reports the holder, and wins
    /// soon after the holder releases.
    #[tokio::test(start_paused = true)]
    async fn a_campaign_waits_for_the_holder_and_takes_over() {
        let clock: SharedClock = PausedClock::shared();
        let leases = manager(&clock);
        let (first, second) = two_sessions(&leases, &clock);
        let mut events = second.events();
        let held = first.acquire(&actor("a")).await.unwrap();
        let campaigner = second.clone();
        let campaign = tokio::spawn(async move { campaigner.campaign(&actor("a")).await });
        let holder = loop {
            if let SessionEvent::HolderChanged { holder, .. } = events.recv().await.unwrap() {
                break holder;
            }
        };
        assert_eq!(&holder, first.holder_id());
        assert!(!campaign.is_finished(), "still held by the first session");
        let released_ms = clock.now_ms();
        first.release(held).await.unwrap();
        let won = campaign.await.unwrap().unwrap();
        let took_ms = clock.now_ms() - released_ms;
        assert!(
            took_ms <= second.timing().campaign_poll_ms_max,
            "{took_ms} ms"
        );
        assert!(won.is_valid());
    }

    /// An acquire the store answers after shutdown began hands out no guard: the driver has
    /// stopped, so nothing would cancel it before its belief ended. The shutdown waits for
    /// that answer and gives the lease back, and the acquire is refused.
    #[tokio::test(start_paused = true)]
    async fn a_grant_that_arrives_during_shutdown_is_refused_and_released() {
        let (leases, _session, acquire, shutdown) = shutdown_while_an_acquire_waits().await;
        assert!(
            !shutdown.is_finished(),
            "it waits for the acquire in flight"
        );
        leases.store().hold(None);
        let refused = acquire.await.unwrap().err();
        assert_eq!(refused, Some(SessionError::ShuttingDown));
        let report = shutdown.await.unwrap();
        assert_eq!(
            report,
            ShutdownReport {
                released: 1,
                unanswered: 0
            }
        );
        assert_eq!(leases.get(&actor("a")).await.unwrap(), None, "given back");
    }

    /// The caller of an acquire in flight stops waiting once the shutdown returns, as a
    /// process that exits does: the shutdown must not return before the store answered it.
    /// It used to return at once, and the grant that came after it stayed held, with nobody
    /// left to release it, until it expired (`kelpie node` on SIGTERM during start-up).
    #[tokio::test(start_paused = true)]
    async fn a_shutdown_releases_the_grant_of_an_acquire_whose_caller_then_gave_up() {
        let (leases, session, acquire, shutdown) = shutdown_while_an_acquire_waits().await;
        leases.store().hold(None);
        let report = shutdown.await.unwrap();
        acquire.abort();
        assert_eq!(
            report,
            ShutdownReport {
                released: 1,
                unanswered: 0
            }
        );
        assert_eq!(leases.get(&actor("a")).await.unwrap(), None, "released");
        assert!(session.keeper.beliefs().is_empty());
    }

    /// A session of "n1" whose acquire of "a" waits at the store (held there), and its
    /// shutdown, begun meanwhile: the manager, the session and the two tasks.
    async fn shutdown_while_an_acquire_waits() -> (
        Arc<Manager>,
        LeaseSession<Manager>,
        tokio::task::JoinHandle<Result<LeaseGuard, SessionError>>,
        tokio::task::JoinHandle<ShutdownReport>,
    ) {
        let clock: SharedClock = PausedClock::shared();
        let leases = manager(&clock);
        let session = session(&leases, &clock, "n1");
        leases.store().hold(Some(LeaseOp::Acquire));
        let acquiring = session.clone();
        let acquire = tokio::spawn(async move { acquiring.acquire(&actor("a")).await });
        let store = Arc::clone(&leases);
        eventually(&clock, "the acquire reaching the store", move || {
            store.store().waiting() == 1
        })
        .await;
        let stopping = session.clone();
        let shutdown = tokio::spawn(async move { stopping.shutdown().await });
        let closing = session.clone();
        eventually(&clock, "the shutdown beginning", move || {
            closing.shared.closing.is_cancelled()
        })
        .await;
        (leases, session, acquire, shutdown)
    }

    /// The driver returns once the shutdown is over, even while the keeper's loop waits on a
    /// release the store never answers: it went on awaiting that loop, which only a round's
    /// end lets see the stop, and never returned (a task, and the session, leaked).
    #[tokio::test(start_paused = true)]
    async fn the_driver_returns_after_a_shutdown_whose_release_hangs() {
        let clock: SharedClock = PausedClock::shared();
        let leases = manager(&clock);
        let (session, driver) = session_and_driver(&leases, &clock, "n1");
        let driving = tokio::spawn(driver.run());
        std::mem::forget(session.acquire(&actor("a")).await.unwrap());
        leases.store().hold(Some(LeaseOp::Release));
        let report = session.shutdown().await;
        assert_eq!(
            report,
            ShutdownReport {
                released: 0,
                unanswered: 1
            }
        );
        let waited = tokio::time::timeout(Duration::from_millis(WAIT_MS_MAX), driving).await;
        assert!(waited.is_ok(), "the driver did not return");
    }

    /// A release the store never answers holds up no other guard's cancellation.
    #[tokio::test(start_paused = true)]
    async fn a_hanging_release_does_not_delay_another_guards_cancellation() {
        let clock: SharedClock = PausedClock::shared();
        let leases = manager(&clock);
        let session = session(&leases, &clock, "n1");
        let dropped = session.acquire(&actor("a")).await.unwrap();
        let kept = session.acquire(&actor("b")).await.unwrap();
        leases.store().hold(Some(LeaseOp::Release));
        drop(dropped);
        let store = Arc::clone(&leases);
        eventually(&clock, "the release reaching the store", move || {
            store.store().waiting() == 1
        })
        .await;
        // Renewals fail from now on: the kept guard must be cancelled within its belief.
        leases.store().set_down(true);
        let until_ms = session
            .keeper
            .beliefs()
            .iter()
            .find_map(|(actor_id, belief)| {
                (*actor_id == actor("b")).then_some(belief.until_local_ms)
            });
        let until_ms = until_ms.expect("b is believed");
        let wait = Duration::from_millis(until_ms - clock.now_ms());
        let cancelled = tokio::time::timeout(wait, kept.cancellation().cancelled()).await;
        assert!(cancelled.is_ok(), "not cancelled by the belief's end");
        assert!(
            leases.store().waiting() >= 1,
            "the first release still hangs"
        );
    }

    /// A guard from another session is not this one's to release: refused, and dropped, so
    /// its own session releases the lease (it was left held and renewed).
    #[tokio::test(start_paused = true)]
    async fn another_sessions_guard_is_refused_and_its_lease_released_by_its_own() {
        let clock: SharedClock = PausedClock::shared();
        let leases = manager(&clock);
        let (first, second) = two_sessions(&leases, &clock);
        let guard = first.acquire(&actor("a")).await.unwrap();
        let refused = second.release(guard).await.err();
        assert!(
            matches!(refused, Some(LeaseError::NotHolder { .. })),
            "{refused:?}"
        );
        eventually_free(&clock, &leases, "a").await;
        assert!(first.acquire(&actor("a")).await.is_ok(), "not left guarded");
    }

    /// Shutdown cancels every guard, releases every lease, and ends campaigns.
    #[tokio::test(start_paused = true)]
    async fn shutdown_releases_everything_within_its_bound() {
        let clock: SharedClock = PausedClock::shared();
        let leases = manager(&clock);
        let (first, second) = two_sessions(&leases, &clock);
        let guards = [
            first.acquire(&actor("a")).await.unwrap(),
            first.acquire(&actor("b")).await.unwrap(),
        ];
        let campaigner = first.clone();
        let waiting = second.acquire(&actor("c")).await.unwrap();
        let campaign = tokio::spawn(async move { campaigner.campaign(&actor("c")).await });
        let report = first.shutdown().await;
        assert_eq!(
            report,
            ShutdownReport {
                released: 2,
                unanswered: 0
            }
        );
        assert!(guards.iter().all(|g| !g.is_valid()));
        let ended = campaign.await.unwrap().err().unwrap();
        assert_eq!(ended, SessionError::ShuttingDown);
        assert!(first.acquire(&actor("d")).await.is_err());
        for name in ["a", "b"] {
            assert_eq!(leases.get(&actor(name)).await.unwrap(), None, "{name}");
        }
        assert!(waiting.is_valid());
    }
}
