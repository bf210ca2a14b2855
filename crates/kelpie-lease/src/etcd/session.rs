//! Node sessions: one etcd lease per (manager, node).
//!
//! Every actor key a node holds through a manager is attached to the node's session lease, so
//! one keepalive extends all of them, and one expiry (or revocation) deletes all of them at
//! once. Keepalives of a session take turns, and a caller whose request was made before a
//! keepalive that etcd then confirmed was *sent* is answered by that one, so concurrent
//! renewals of many actors cost one round trip each turn. No task is spawned: the caller that
//! takes the turn sends the keepalive, which is what lets the backend run inside the
//! simulator as well as on tokio.
//!
//! Once etcd reports the session lease gone, the session is dead for good: its keys are (or
//! are about to be) deleted by etcd, and the node's next acquire grants a new session. A dead
//! session is never revived, because that would resurrect leases etcd has expired.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kelpie_core::{ActorId, NodeId, SharedClock};

use super::api::EtcdApi;
use super::errors::{bounded, store_error, timed_out, within, Effect};
use super::tracked::Tracked;
use crate::error::StoreError;

/// How many times [`NodeSessions::current`] looks for (or grants) a live session before giving
/// up. Two passes suffice unless sessions keep expiring as they are granted.
const SESSION_GRANT_ATTEMPTS_MAX: u32 = 3;

/// What etcd and the manager's clock are, shared by every session of a manager.
pub(super) struct Connection<A> {
    pub api: Arc<A>,
    pub clock: SharedClock,
    pub request_timeout_ms: u64,
    /// The configured lease duration (at most the TTL): what a keeper measures beliefs with,
    /// and how long a key goes without a request before it counts as abandoned.
    pub lease_duration_ms: u64,
    pub counters: Arc<Counters>,
    /// Mutation: a keepalive counts from its reply, not its send time.
    #[cfg(feature = "mutations")]
    pub belief_from_reply: bool,
    /// Mutation: a keepalive that finds the session expired is taken as one that kept it.
    #[cfg(feature = "mutations")]
    pub ignore_expired_keepalive: bool,
}

/// Running totals, for tests and operators to see what sessions cost.
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub sessions_granted: AtomicU64,
    pub keep_alives_sent: AtomicU64,
}

/// The answer to a keepalive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum KeepAlive {
    /// etcd extended the session by its TTL; the keepalive was sent at `sent_at_ms` on the
    /// manager's clock, so every key of the session lasts at least until `sent_at_ms + ttl`.
    Alive { sent_at_ms: u64 },
    /// The session lease is gone: expired or revoked.
    Expired,
}

/// One node's etcd lease.
pub(super) struct Session<A> {
    api: Arc<A>,
    clock: SharedClock,
    counters: Arc<Counters>,
    lease_id: i64,
    ttl_ms: u64,
    /// Send time of the latest keepalive (or the grant) etcd confirmed.
    alive_sent_at_ms: AtomicU64,
    dead: AtomicBool,
    /// Keepalives take turns; the holder of the turn sends one.
    turn: tokio::sync::Mutex<()>,
    /// The keys the node holds (or may hold) through this session.
    tracked: Mutex<Tracked>,
    request_timeout_ms: u64,
    #[cfg(feature = "mutations")]
    belief_from_reply: bool,
    #[cfg(feature = "mutations")]
    ignore_expired_keepalive: bool,
}

impl<A: EtcdApi> Session<A> {
    /// Grants a new etcd lease of `ttl_s` seconds.
    pub async fn grant(connection: &Connection<A>, ttl_s: i64) -> Result<Session<A>, StoreError> {
        let clock = &connection.clock;
        let sent_at_ms = clock.now_ms();
        let what = "granting a session lease";
        let timeout_ms = connection.request_timeout_ms;
        let granting = connection.api.grant(ttl_s);
        let reply = bounded(clock, what, Effect::ReadOnly, timeout_ms, granting).await?;
        // etcd may raise the TTL to its minimum; the TTL it answers with is the one it keeps.
        let ttl_ms = u64::try_from(reply.ttl_s)
            .ok()
            .filter(|&ttl_s| ttl_s > 0)
            .and_then(|ttl_s| ttl_s.checked_mul(1_000));
        let Some(ttl_ms) = ttl_ms else {
            let reason = format!("{what}: etcd granted a ttl of {} s", reply.ttl_s);
            return Err(StoreError::Unavailable { reason });
        };
        connection
            .counters
            .sessions_granted
            .fetch_add(1, Ordering::Relaxed);
        Ok(Session {
            api: Arc::clone(&connection.api),
            clock: Arc::clone(&connection.clock),
            counters: Arc::clone(&connection.counters),
            lease_id: reply.id,
            ttl_ms,
            alive_sent_at_ms: AtomicU64::new(sent_at_ms),
            dead: AtomicBool::new(false),
            turn: tokio::sync::Mutex::new(()),
            tracked: Mutex::new(Tracked::new(connection.lease_duration_ms)),
            request_timeout_ms: timeout_ms,
            #[cfg(feature = "mutations")]
            belief_from_reply: connection.belief_from_reply,
            #[cfg(feature = "mutations")]
            ignore_expired_keepalive: connection.ignore_expired_keepalive,
        })
    }

    /// The etcd lease id every key of this session is attached to.
    pub fn lease_id(&self) -> i64 {
        self.lease_id
    }

    /// The TTL etcd granted.
    pub fn ttl_ms(&self) -> u64 {
        self.ttl_ms
    }

    /// The manager-clock time when the session was last granted or extended.
    pub fn alive_sent_at_ms(&self) -> u64 {
        self.alive_sent_at_ms.load(Ordering::SeqCst)
    }

    /// A lower bound of when etcd expires the session, on the manager's clock: the send time
    /// of the last confirmed keepalive plus the TTL. etcd starts its countdown only when the
    /// keepalive reaches the leader, after it was sent.
    pub fn expires_at_ms(&self) -> u64 {
        self.alive_sent_at_ms().saturating_add(self.ttl_ms())
    }

    /// Whether etcd reported the session gone.
    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }

    fn mark_dead(&self) {
        self.dead.store(true, Ordering::SeqCst);
    }

    /// Extends the session (and so every key attached to it) by its TTL, with a keepalive sent
    /// no earlier than this call. Callers that wait while another's keepalive is in flight
    /// share the next one, or that one if it was sent after they called.
    pub async fn keep_alive(&self) -> Result<KeepAlive, StoreError> {
        if self.is_dead() {
            return Ok(KeepAlive::Expired);
        }
        let requested_at_ms = self.clock.now_ms();
        // One keepalive in flight ahead of this caller, plus its own.
        let wait_timeout_ms = self.request_timeout_ms.saturating_mul(2);
        let what = "a session keepalive";
        let Some(_turn) = within(&self.clock, wait_timeout_ms, self.turn.lock()).await else {
            return Err(timed_out(what, Effect::ReadOnly, wait_timeout_ms));
        };
        if self.is_dead() {
            return Ok(KeepAlive::Expired);
        }
        let confirmed_sent_at_ms = self.alive_sent_at_ms();
        if confirmed_sent_at_ms >= requested_at_ms {
            // A keepalive sent since this caller asked was confirmed while it waited.
            return Ok(KeepAlive::Alive {
                sent_at_ms: confirmed_sent_at_ms,
            });
        }
        let sent_at_ms = self.clock.now_ms();
        self.counters
            .keep_alives_sent
            .fetch_add(1, Ordering::Relaxed);
        let timeout_ms = self.request_timeout_ms;
        match within(&self.clock, timeout_ms, self.api.keep_alive(self.lease_id)).await {
            Some(Ok(true)) => {
                #[cfg(feature = "mutations")]
                let sent_at_ms = match self.belief_from_reply {
                    true => self.clock.now_ms(),
                    false => sent_at_ms,
                };
                self.alive_sent_at_ms
                    .fetch_max(sent_at_ms, Ordering::SeqCst);
                Ok(KeepAlive::Alive { sent_at_ms })
            }
            #[cfg(feature = "mutations")]
            Some(Ok(false)) if self.ignore_expired_keepalive => {
                // Broken on purpose: etcd said the session expired (its TTL ran out, maybe not
                // revoked yet); this believes it was extended.
                self.alive_sent_at_ms
                    .fetch_max(sent_at_ms, Ordering::SeqCst);
                Ok(KeepAlive::Alive { sent_at_ms })
            }
            Some(Ok(false)) => {
                kelpie_core::coverage::mark(super::MARK_ETCD_SESSION_EXPIRED);
                self.mark_dead();
                Ok(KeepAlive::Expired)
            }
            Some(Err(error)) => {
                kelpie_core::coverage::mark(super::MARK_ETCD_KEEPALIVE_LOST);
                Err(store_error(what, Effect::ReadOnly, &error))
            }
            None => {
                kelpie_core::coverage::mark(super::MARK_ETCD_KEEPALIVE_LOST);
                Err(timed_out(what, Effect::ReadOnly, timeout_ms))
            }
        }
    }

    /// Revokes the session lease: etcd deletes every key attached to it in one step.
    pub async fn revoke(&self) -> Result<(), StoreError> {
        let what = "revoking a session";
        let timeout_ms = self.request_timeout_ms;
        let revoking = self.api.revoke(self.lease_id);
        bounded(&self.clock, what, Effect::Write, timeout_ms, revoking).await?;
        self.mark_dead();
        Ok(())
    }

    /// Notes that an acquire or renewal of `actor_id` is about to be sent at `sent_at_ms`:
    /// until a lease duration after it, the key is not abandoned (see [`Session::stale`]).
    pub fn note_sent(&self, actor_id: &ActorId, sent_at_ms: u64) {
        self.tracked().note_sent(actor_id, sent_at_ms);
    }

    /// Notes a request sent at `sent_at_ms` on every key of the session (a keepalive of the
    /// whole node).
    pub fn note_sent_all(&self, sent_at_ms: u64) {
        self.tracked().note_sent_all(sent_at_ms);
    }

    /// Notes that this session created `actor_id`'s key at `create_revision` by a request
    /// sent at `at_ms`.
    pub fn remember_acquired(&self, actor_id: &ActorId, create_revision: i64, at_ms: u64) {
        self.tracked()
            .remember_acquired(actor_id, create_revision, at_ms);
    }

    /// Forgets `actor_id` if the node sent nothing on it since `last_sent_ms` (an answer
    /// showed the key is not, or no longer, this session's).
    pub fn forget_unless_sent_since(&self, actor_id: &ActorId, last_sent_ms: u64) {
        self.tracked()
            .forget_unless_sent_since(actor_id, last_sent_ms);
    }

    /// Up to `count` of the actors of this session's keys on which the node sent nothing for
    /// a lease duration before `now_ms`, with the send time of their last request, the ones
    /// looked at longest ago first (and marked as looked at now), none looked at within the
    /// last lease duration. No caller can believe it holds them any more (a belief never
    /// outlasts the lease duration from its request's send time), but the session's
    /// keepalives for its other keys keep them alive. Costs O(log n) per key found and per key
    /// that went quiet since the last call, not O(n).
    pub fn stale(&self, now_ms: u64, count: usize) -> Vec<(ActorId, u64)> {
        self.tracked().stale(now_ms, count)
    }

    /// Whether the node sent nothing on `actor_id` since `last_sent_ms`.
    pub fn nothing_sent_since(&self, actor_id: &ActorId, last_sent_ms: u64) -> bool {
        self.tracked().nothing_sent_since(actor_id, last_sent_ms)
    }

    /// When this session acquired the key `actor_id` has at `create_revision`, if it did.
    pub fn acquired_at_ms(&self, actor_id: &ActorId, create_revision: i64) -> Option<u64> {
        self.tracked().acquired_at_ms(actor_id, create_revision)
    }

    fn tracked(&self) -> std::sync::MutexGuard<'_, Tracked> {
        self.tracked
            .lock()
            .expect("session key mutex poisoned by a panic")
    }
}

/// A dead session, remembered so that renewing one of its leases says `Expired`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Retired {
    pub lease_id: i64,
    pub expired_at_ms: u64,
}

/// One node's current session.
struct NodeSlot<A> {
    current: Mutex<Option<Arc<Session<A>>>>,
    /// Held while granting, so that concurrent acquires by one node grant one session.
    granting: tokio::sync::Mutex<()>,
    retired: Mutex<Option<Retired>>,
}

impl<A> Default for NodeSlot<A> {
    fn default() -> Self {
        Self {
            current: Mutex::new(None),
            granting: tokio::sync::Mutex::new(()),
            retired: Mutex::new(None),
        }
    }
}

impl<A: EtcdApi> NodeSlot<A> {
    fn live(&self) -> Option<Arc<Session<A>>> {
        let current = self.current.lock().expect("node slot mutex poisoned");
        current.as_ref().filter(|s| !s.is_dead()).cloned()
    }

    fn retire(&self, session: &Arc<Session<A>>) {
        session.mark_dead();
        let mut current = self.current.lock().expect("node slot mutex poisoned");
        if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, session)) {
            *current = None;
            *self.retired.lock().expect("node slot mutex poisoned") = Some(Retired {
                lease_id: session.lease_id(),
                expired_at_ms: session.expires_at_ms(),
            });
        }
    }
}

/// The sessions of every node that acquired through one manager.
pub(super) struct NodeSessions<A> {
    nodes: Mutex<BTreeMap<NodeId, Arc<NodeSlot<A>>>>,
}

impl<A> Default for NodeSessions<A> {
    fn default() -> Self {
        Self {
            nodes: Mutex::new(BTreeMap::new()),
        }
    }
}

impl<A: EtcdApi> NodeSessions<A> {
    fn slot(&self, node_id: &NodeId) -> Arc<NodeSlot<A>> {
        let mut nodes = self.nodes.lock().expect("node sessions mutex poisoned");
        nodes.entry(node_id.clone()).or_default().clone()
    }

    fn existing_slot(&self, node_id: &NodeId) -> Option<Arc<NodeSlot<A>>> {
        let nodes = self.nodes.lock().expect("node sessions mutex poisoned");
        nodes.get(node_id).cloned()
    }

    /// The node's session, if it has one etcd has not reported gone.
    pub fn live(&self, node_id: &NodeId) -> Option<Arc<Session<A>>> {
        self.existing_slot(node_id)?.live()
    }

    /// The node's last dead session, if any.
    pub fn retired(&self, node_id: &NodeId) -> Option<Retired> {
        let slot = self.existing_slot(node_id)?;
        let retired = slot.retired.lock().expect("node slot mutex poisoned");
        *retired
    }

    /// Marks `session` dead and stops using it for `node_id`.
    pub fn retire(&self, node_id: &NodeId, session: &Arc<Session<A>>) {
        if let Some(slot) = self.existing_slot(node_id) {
            slot.retire(session);
        }
    }

    /// The node's live session, granting one if it has none. Unlike a keepalive, this costs
    /// no round trip when the node has a session: the caller decides whether to extend it.
    pub async fn current(
        &self,
        connection: &Connection<A>,
        node_id: &NodeId,
        ttl_s: i64,
    ) -> Result<Arc<Session<A>>, StoreError> {
        let slot = self.slot(node_id);
        for _ in 0..SESSION_GRANT_ATTEMPTS_MAX {
            if let Some(session) = slot.live() {
                return Ok(session);
            }
            let _granting = slot.granting.lock().await;
            if slot.live().is_some() {
                // Another task granted one while this one waited; use that one instead.
                continue;
            }
            let session = Arc::new(Session::grant(connection, ttl_s).await?);
            *slot.current.lock().expect("node slot mutex poisoned") = Some(session.clone());
            return Ok(session);
        }
        Err(StoreError::Contention {
            attempts: SESSION_GRANT_ATTEMPTS_MAX,
        })
    }
}
