//! Node sessions: one etcd lease per (manager, node), with one keepalive stream.
//!
//! Every actor key a node holds through a manager is attached to the node's session lease, so
//! one keepalive extends all of them, and one expiry (or revocation) deletes all of them at
//! once. A session's keepalive stream is owned by one spawned task; callers queue keepalive
//! requests to it, and every request that arrives while one keepalive is in flight is answered
//! by the next one, so concurrent renewals of many actors cost one round trip.
//!
//! Once etcd reports the session lease gone, the session is dead for good: its keys are (or
//! are about to be) deleted by etcd, and the node's next acquire grants a new session. A dead
//! session is never revived, because that would resurrect leases etcd has expired.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Client, LeaseClient, LeaseKeepAliveStream, LeaseKeeper};
use kelpie_core::{ActorId, NodeId, SharedClock};
use tokio::sync::{mpsc, oneshot};

use super::errors::{bounded, is_lease_not_found, store_error, timed_out, Effect};
use crate::error::StoreError;

/// Keepalive requests that may wait for a session's task before callers queue behind them.
const SESSION_KEEPALIVE_QUEUE_MAX: usize = 1_024;

/// How many times [`NodeSessions::current`] looks for (or grants) a live session before giving
/// up. Two passes suffice unless sessions keep expiring as they are granted.
const SESSION_GRANT_ATTEMPTS_MAX: u32 = 3;

/// What etcd and the manager's clock are, shared by every session of a manager.
pub(super) struct Connection {
    pub client: Client,
    pub clock: SharedClock,
    pub request_timeout_ms: u64,
    pub counters: Arc<Counters>,
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

type Waiter = oneshot::Sender<Result<KeepAlive, StoreError>>;

/// What the session's task and its users share.
struct SessionState {
    lease_id: i64,
    ttl_ms: u64,
    /// Send time of the latest keepalive (or the grant) etcd confirmed.
    alive_sent_at_ms: AtomicU64,
    dead: AtomicBool,
}

/// When this manager's node first acquired an actor, by the key's create revision.
#[derive(Debug, Clone, Copy)]
struct Acquired {
    create_revision: i64,
    acquired_at_ms: u64,
}

/// One node's etcd lease and the handle to its keepalive task.
pub(super) struct Session {
    state: Arc<SessionState>,
    requests: mpsc::Sender<Waiter>,
    acquired: Mutex<BTreeMap<ActorId, Acquired>>,
    task: tokio::task::JoinHandle<()>,
    /// How long a caller waits for its keepalive: one in flight ahead of it plus its own.
    wait_timeout_ms: u64,
}

impl Session {
    /// Grants a new etcd lease of `ttl_s` seconds and starts its keepalive task.
    pub async fn grant(connection: &Connection, ttl_s: i64) -> Result<Session, StoreError> {
        let mut lease = connection.client.lease_client();
        let sent_at_ms = connection.clock.now_ms();
        let what = "granting a session lease";
        let timeout_ms = connection.request_timeout_ms;
        let reply = bounded(what, Effect::ReadOnly, timeout_ms, lease.grant(ttl_s, None)).await?;
        // etcd may raise the TTL to its minimum; the TTL it answers with is the one it keeps.
        let ttl_ms = u64::try_from(reply.ttl())
            .ok()
            .filter(|&ttl_s| ttl_s > 0)
            .and_then(|ttl_s| ttl_s.checked_mul(1_000));
        let (Some(ttl_ms), true) = (ttl_ms, reply.error().is_empty()) else {
            let reason = format!("{what}: ttl {} s, error {:?}", reply.ttl(), reply.error());
            return Err(StoreError::Unavailable { reason });
        };
        connection
            .counters
            .sessions_granted
            .fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(SessionState {
            lease_id: reply.id(),
            ttl_ms,
            alive_sent_at_ms: AtomicU64::new(sent_at_ms),
            dead: AtomicBool::new(false),
        });
        let (requests, receiver) = mpsc::channel(SESSION_KEEPALIVE_QUEUE_MAX);
        let keeper = KeepAliveTask {
            lease,
            state: state.clone(),
            clock: connection.clock.clone(),
            counters: connection.counters.clone(),
            timeout_ms,
            stream: None,
        };
        let task = tokio::spawn(keeper.run(receiver));
        Ok(Session {
            state,
            requests,
            acquired: Mutex::new(BTreeMap::new()),
            task,
            wait_timeout_ms: timeout_ms.saturating_mul(2),
        })
    }

    /// The etcd lease id every key of this session is attached to.
    pub fn lease_id(&self) -> i64 {
        self.state.lease_id
    }

    /// The TTL etcd granted.
    pub fn ttl_ms(&self) -> u64 {
        self.state.ttl_ms
    }

    /// The manager-clock time when the session was last granted or extended.
    pub fn alive_sent_at_ms(&self) -> u64 {
        self.state.alive_sent_at_ms.load(Ordering::SeqCst)
    }

    /// A lower bound of when etcd expires the session, on the manager's clock: the send time
    /// of the last confirmed keepalive plus the TTL. etcd starts its countdown only when the
    /// keepalive reaches the leader, after it was sent.
    pub fn expires_at_ms(&self) -> u64 {
        self.alive_sent_at_ms().saturating_add(self.ttl_ms())
    }

    /// Whether etcd reported the session gone.
    pub fn is_dead(&self) -> bool {
        self.state.dead.load(Ordering::SeqCst)
    }

    fn mark_dead(&self) {
        self.state.dead.store(true, Ordering::SeqCst);
    }

    /// Extends the session (and so every key attached to it) by its TTL. Requests that queue
    /// while a keepalive is in flight share the next one.
    pub async fn keep_alive(&self) -> Result<KeepAlive, StoreError> {
        if self.is_dead() {
            return Ok(KeepAlive::Expired);
        }
        let (waiter, reply) = oneshot::channel();
        if self.requests.send(waiter).await.is_err() {
            // The task stops only once the session is dead.
            return Ok(KeepAlive::Expired);
        }
        let timeout = Duration::from_millis(self.wait_timeout_ms);
        match tokio::time::timeout(timeout, reply).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_dropped)) if self.is_dead() => Ok(KeepAlive::Expired),
            Ok(Err(_dropped)) => Err(StoreError::Unavailable {
                reason: "the session's keepalive task stopped".to_string(),
            }),
            Err(_elapsed) => Err(timed_out(
                "a session keepalive",
                Effect::ReadOnly,
                self.wait_timeout_ms,
            )),
        }
    }

    /// Revokes the session lease: etcd deletes every key attached to it in one step.
    pub async fn revoke(&self, connection: &Connection) -> Result<(), StoreError> {
        let mut lease = connection.client.lease_client();
        let timeout_ms = connection.request_timeout_ms;
        match tokio::time::timeout(
            Duration::from_millis(timeout_ms),
            lease.revoke(self.lease_id()),
        )
        .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(error)) if is_lease_not_found(&error) => {}
            Ok(Err(error)) => return Err(store_error("revoking a session", Effect::Write, &error)),
            Err(_elapsed) => {
                return Err(timed_out("revoking a session", Effect::Write, timeout_ms))
            }
        }
        self.mark_dead();
        Ok(())
    }

    /// Notes that this session created `actor_id`'s key at `create_revision` at `at_ms`.
    pub fn remember_acquired(&self, actor_id: &ActorId, create_revision: i64, at_ms: u64) {
        let acquired = Acquired {
            create_revision,
            acquired_at_ms: at_ms,
        };
        self.acquired_map().insert(actor_id.clone(), acquired);
    }

    /// When this session acquired the key `actor_id` has at `create_revision`, if it did.
    pub fn acquired_at_ms(&self, actor_id: &ActorId, create_revision: i64) -> Option<u64> {
        self.acquired_map()
            .get(actor_id)
            .filter(|a| a.create_revision == create_revision)
            .map(|a| a.acquired_at_ms)
    }

    /// Forgets `actor_id` after its key was deleted.
    pub fn forget(&self, actor_id: &ActorId) {
        self.acquired_map().remove(actor_id);
    }

    fn acquired_map(&self) -> std::sync::MutexGuard<'_, BTreeMap<ActorId, Acquired>> {
        self.acquired
            .lock()
            .expect("session map mutex poisoned by a panic")
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // The session lease is left to expire on its TTL, as for a crashed node; stopping the
        // task only stops the keepalives.
        self.task.abort();
    }
}

/// The task that owns a session's keepalive stream.
struct KeepAliveTask {
    lease: LeaseClient,
    state: Arc<SessionState>,
    clock: SharedClock,
    counters: Arc<Counters>,
    timeout_ms: u64,
    stream: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
}

impl KeepAliveTask {
    async fn run(mut self, mut requests: mpsc::Receiver<Waiter>) {
        while let Some(first) = requests.recv().await {
            let mut waiters = vec![first];
            while let Ok(waiter) = requests.try_recv() {
                waiters.push(waiter);
            }
            // Every waiter queued before this instant, so this keepalive is recent enough for
            // all of them.
            let sent_at_ms = self.clock.now_ms();
            self.counters
                .keep_alives_sent
                .fetch_add(1, Ordering::Relaxed);
            let reply = match self.keep_alive_once().await {
                Ok(true) => {
                    let alive = &self.state.alive_sent_at_ms;
                    alive.fetch_max(sent_at_ms, Ordering::SeqCst);
                    Ok(KeepAlive::Alive { sent_at_ms })
                }
                Ok(false) => {
                    self.state.dead.store(true, Ordering::SeqCst);
                    Ok(KeepAlive::Expired)
                }
                Err(error) => Err(error),
            };
            for waiter in waiters {
                // A waiter that timed out has gone; nothing to tell it.
                let _ = waiter.send(reply.clone());
            }
            if self.state.dead.load(Ordering::SeqCst) {
                break;
            }
        }
    }

    /// One keepalive round trip: `Ok(true)` if etcd extended the lease, `Ok(false)` if the
    /// lease is gone.
    async fn keep_alive_once(&mut self) -> Result<bool, StoreError> {
        let timeout = Duration::from_millis(self.timeout_ms);
        if let Some((keeper, responses)) = self.stream.as_mut() {
            let exchange = async {
                keeper.keep_alive().await?;
                responses.message().await
            };
            match tokio::time::timeout(timeout, exchange).await {
                Ok(Ok(Some(response))) => return Ok(response.ttl() > 0),
                // The stream closed, failed or timed out (a leader change, a restarted member).
                // A late answer on it would be taken for the next request's, so it is dropped
                // and a new one opened, which sends a keepalive of its own.
                _ => self.stream = None,
            }
        }
        match tokio::time::timeout(timeout, self.lease.keep_alive(self.state.lease_id)).await {
            Ok(Ok(opened)) => {
                self.stream = Some(opened);
                Ok(true)
            }
            Ok(Err(error)) if is_lease_not_found(&error) => Ok(false),
            Ok(Err(error)) => Err(store_error("a session keepalive", Effect::ReadOnly, &error)),
            Err(_elapsed) => Err(timed_out(
                "a session keepalive",
                Effect::ReadOnly,
                self.timeout_ms,
            )),
        }
    }
}

/// A dead session, remembered so that renewing one of its leases says `Expired`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Retired {
    pub lease_id: i64,
    pub expired_at_ms: u64,
}

/// One node's current session.
#[derive(Default)]
struct NodeSlot {
    current: Mutex<Option<Arc<Session>>>,
    /// Held while granting, so that concurrent acquires by one node grant one session.
    granting: tokio::sync::Mutex<()>,
    retired: Mutex<Option<Retired>>,
}

impl NodeSlot {
    fn live(&self) -> Option<Arc<Session>> {
        let current = self.current.lock().expect("node slot mutex poisoned");
        current.as_ref().filter(|s| !s.is_dead()).cloned()
    }

    fn retire(&self, session: &Arc<Session>) {
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
#[derive(Default)]
pub(super) struct NodeSessions {
    nodes: Mutex<BTreeMap<NodeId, Arc<NodeSlot>>>,
}

impl NodeSessions {
    fn slot(&self, node_id: &NodeId) -> Arc<NodeSlot> {
        let mut nodes = self.nodes.lock().expect("node sessions mutex poisoned");
        nodes.entry(node_id.clone()).or_default().clone()
    }

    fn existing_slot(&self, node_id: &NodeId) -> Option<Arc<NodeSlot>> {
        let nodes = self.nodes.lock().expect("node sessions mutex poisoned");
        nodes.get(node_id).cloned()
    }

    /// The node's session, if it has one etcd has not reported gone.
    pub fn live(&self, node_id: &NodeId) -> Option<Arc<Session>> {
        self.existing_slot(node_id)?.live()
    }

    /// The node's last dead session, if any.
    pub fn retired(&self, node_id: &NodeId) -> Option<Retired> {
        let slot = self.existing_slot(node_id)?;
        let retired = slot.retired.lock().expect("node slot mutex poisoned");
        *retired
    }

    /// Marks `session` dead and stops using it for `node_id`.
    pub fn retire(&self, node_id: &NodeId, session: &Arc<Session>) {
        if let Some(slot) = self.existing_slot(node_id) {
            slot.retire(session);
        }
    }

    /// The node's live session, granting one if it has none. Unlike a keepalive, this costs
    /// no round trip when the node has a session: the caller decides whether to extend it.
    pub async fn current(
        &self,
        connection: &Connection,
        node_id: &NodeId,
        ttl_s: i64,
    ) -> Result<Arc<Session>, StoreError> {
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
