//! The etcd backend: leases for a deployment that outgrew one host, in the store Kubernetes
//! trusts for exactly this.
//!
//! Unlike the in-process stores, this backend does not run [`decide`](crate::backend::decide) on a
//! clock of its own: etcd decides expiry with its lease TTLs, counted on the etcd leader's
//! clock, and no client clock is ever compared with another. [`EtcdLeaseManager`] therefore
//! implements [`LeaseManager`] directly, with the semantics the conformance suite holds every
//! backend to.
//!
//! # Layout in etcd
//!
//! A held lease is one key, `<prefix><actor id>`, whose value is the holder's node id, attached
//! to the holder's *node session*: one etcd lease per (manager, node) with TTL = the lease
//! duration rounded up to whole seconds (etcd raises it to its minimum, 2 s with etcd's default
//! heartbeat and election timeout). The key exists exactly while the lease is held. The fencing
//! token is the key's `create_revision` (see `codec`), which strictly increases across
//! successive holders of an actor, including a takeover after expiry, and stays fixed while one
//! holder keeps the key.
//!
//! - **Acquire** runs one transaction on the node's session (granted first if the node has
//!   none): if the key is absent (`version == 0`), put it with the session lease attached;
//!   otherwise read it. Unless the session's confirmed expiry already lies a TTL ahead, a
//!   keepalive of the session is sent concurrently with the transaction (not before it, which
//!   would add a round trip), so the key lasts at least a TTL from the acquire's send time. A
//!   put naming a session etcd has expired is refused, so the keepalive's order does not
//!   matter for correctness. The caller's own key under its current session is an idempotent
//!   success (same token, expiry refreshed by the keepalive). The caller's node id under a session this manager does not
//!   own (a previous incarnation of the node, or a session that expired but whose key etcd has
//!   not deleted yet) is deleted and re-created, so the caller gets a new, larger token and the
//!   old incarnation's writes are fenced off.
//! - **Renew** is one transaction, "if the key names the caller and hangs off its live session,
//!   rewrite it" (which bumps `version`, the renewal count, and keeps the token), followed by a
//!   keepalive of the session. A session etcd reported gone is never revived, so an expired
//!   lease cannot be renewed.
//! - **Release** deletes the key in a transaction guarded by the holder's node id.
//! - **Fenced renew and release** add "the key's `create_revision` equals the caller's token"
//!   to the same transaction, so a delayed request from an earlier tenure cannot touch a later
//!   one.
//! - **Expiry**: when a session's lease runs out, etcd deletes all its keys. etcd checks for
//!   expired leases every [`ETCD_EXPIRY_CHECK_INTERVAL_MS`], so a lease is free once etcd has
//!   deleted its key: up to about that long after its TTL ran out. Until then it is still held.
//!
//! # Node sessions
//!
//! Every key a node holds through a manager hangs off the node's one session lease. One
//! keepalive extends all of the node's leases, so renewal cost does not grow with the number
//! of actors: call [`EtcdLeaseManager::keep_alive_node`] once per period, or renew actors
//! individually (their keepalives take turns: renewals waiting while one keepalive is in
//! flight share the next). [`EtcdLeaseManager::revoke_node`] releases them all in one request.
//!
//! # Abandoned keys
//!
//! Because one keepalive extends every key of a session, a key the node stopped renewing (a
//! keeper gave up on it, or an acquire whose reply was lost created it) would live as long as
//! the node renews anything else, and its actor would be lost to everyone: the simulator found
//! exactly this (`kelpie sim --store etcd`). So the manager notes, per actor, when it last sent
//! an acquire or renewal, and after each keepalive it confirms it deletes (a few at a time,
//! [`ETCD_STALE_KEYS_PER_GRANT_MAX`]) the session's keys on which nothing was sent for a lease
//! duration: by the lease contract they have expired. A delete is guarded by the key's
//! `mod_revision` as read, and every grant writes the key (a renewal, or an acquire of a key
//! the node already holds), so a request racing the delete either makes it fail or finds the
//! key gone. An actor stays noted for [`ETCD_APPLY_LATE_MS_MAX`] after its last request, so a
//! request etcd applies late is cleaned up too. [`EtcdLeaseManager::keep_alive_node`] counts
//! as a request on every key: it keeps all of the node's leases. Finding the abandoned keys
//! costs O(log n) per key that went quiet, not a scan of the node's n keys after every
//! keepalive (`etcd/tracked.rs`), so a node's renewals cost O(n log n) per lease duration,
//! not O(n²). A key looked at is not looked at again for a lease duration: an actor the node
//! tried and was refused stays noted for [`ETCD_APPLY_LATE_MS_MAX`], and was read after every
//! keepalive until then (three reads per lease operation in `kelpie sim --store etcd`, each
//! holding up the renewal it followed); now it is read about once per lease duration.
//!
//! # Times in a [`Lease`]
//!
//! etcd reports no clock, only TTLs, so `acquired_at_ms` and `expires_at_ms` are on the
//! *manager's* clock (a tokio clock started at [`EtcdLeaseManager::connect`], or
//! [`EtcdOptions::clock`]) and mean nothing to another process:
//!
//! - for a lease held through this manager's own session, `expires_at_ms` is the send time of
//!   the latest keepalive (or grant) etcd confirmed plus the TTL etcd granted: a *lower bound* of
//!   etcd's own expiry, since etcd starts counting only when the request reaches its leader
//!   (assuming this host's clock does not run faster than the leader's). `acquired_at_ms` is
//!   the send time of the acquiring transaction;
//! - for a lease held through another manager (another process, or `HeldByOther`),
//!   `expires_at_ms` is when etcd's answer arrived plus its remaining TTL rounded *up* to the
//!   next whole second (etcd truncates it): an upper bound, which is what a contender needs.
//!   `acquired_at_ms` is then the time this manager read the lease, not when it was acquired.
//!
//! # Tokens and etcd's history
//!
//! Tokens increase for as long as the cluster's revision history does: across leader changes,
//! member restarts and compaction. Restoring a snapshot or rebuilding the cluster from scratch
//! resets revisions, and with them the guarantee.
//!
//! # Fast handover
//!
//! [`EtcdLeaseManager::wait_until_free`] watches the actor's key and returns as soon as it is
//! deleted (released or expired), so a contender can acquire right after a voluntary release
//! instead of polling; [`EtcdLeaseManager::acquire_waiting`] combines the two.
//!
//! The manager spawns tasks, so it must be used inside a tokio runtime.

mod api;
#[cfg(feature = "etcd")]
mod client;
mod codec;
mod errors;
mod fenced;
mod handover;
mod ops;
mod options;
mod session;
mod tracked;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use kelpie_core::{ActorId, FencingToken, NodeId, SharedClock};

pub use api::{
    Compare, CompareTarget, EtcdApi, EtcdApiError, EtcdKeyValue, LeaseGrant, RangeReply,
    RangeRequest, Txn, TxnOp, TxnOpResult, TxnReply,
};
#[cfg(feature = "etcd")]
pub use client::EtcdClient;
pub use options::{
    parse_endpoints, EtcdCredentials, EtcdOptions, ETCD_CONNECT_TIMEOUT_MS_DEFAULT,
    ETCD_ENDPOINTS_ENV, ETCD_ENDPOINTS_MAX, ETCD_KEY_PREFIX_BYTES_MAX, ETCD_KEY_PREFIX_DEFAULT,
    ETCD_PORT_DEFAULT, ETCD_REQUEST_TIMEOUT_MS_DEFAULT, ETCD_TIMEOUT_MS_MAX, ETCD_TIMEOUT_MS_MIN,
};

pub use fenced::{EtcdFencedStateStore, ETCD_STATE_VALUE_BYTES_MAX};
pub use handover::ETCD_WATCH_FAILURES_MAX;

use crate::error::{LeaseError, StoreError};
use crate::lease::{Lease, LeaseConfig};
use crate::manager::LeaseManager;
use codec::Keys;
use session::{Connection, Counters, KeepAlive, NodeSessions};

/// How often etcd looks for expired leases (its lessor's revoke loop, fixed in etcd 3.4 and
/// 3.5). A lease whose TTL ran out is deleted up to about this much later.
pub const ETCD_EXPIRY_CHECK_INTERVAL_MS: u64 = 500;

/// Coverage mark: etcd reported a node's session gone (expired or revoked) to a keepalive or
/// a transaction.
pub const MARK_ETCD_SESSION_EXPIRED: &str = "etcd.session_expired";
/// Coverage mark: a session keepalive got no answer in time (or failed).
pub const MARK_ETCD_KEEPALIVE_LOST: &str = "etcd.keepalive_lost";
/// Coverage mark: a watch saw a held lease's key deleted, handing the actor over.
pub const MARK_ETCD_HANDOVER_BY_WATCH: &str = "etcd.handover_by_watch";
/// Coverage mark: a renew or release transaction's compare failed.
pub const MARK_ETCD_COMPARE_FAILED: &str = "etcd.compare_failed";

/// Coverage mark: a key of a live session that nobody renewed for a lease duration was deleted.
pub const MARK_ETCD_ABANDONED_KEY_DELETED: &str = "etcd.abandoned_key_deleted";

/// Every coverage mark of the etcd backend; an etcd sweep checks each is hit.
pub const ETCD_COVERAGE_MARKS: &[&str] = &[
    MARK_ETCD_ABANDONED_KEY_DELETED,
    MARK_ETCD_SESSION_EXPIRED,
    MARK_ETCD_KEEPALIVE_LOST,
    MARK_ETCD_HANDOVER_BY_WATCH,
    MARK_ETCD_COMPARE_FAILED,
];

/// Deliberately broken variants of the etcd backend, which the simulator's mutation runs must
/// catch (feature `mutations`; never in a node's build).
#[cfg(feature = "mutations")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EtcdMutation {
    /// Acquire puts the key without comparing its version: a blind put over another holder.
    BlindPut,
    /// The fencing token is the key's `mod_revision`, which every renewal changes.
    ModRevisionToken,
    /// A session's confirmed expiry is measured from a keepalive's reply, not its send time.
    BeliefFromReply,
    /// After a watch saw the key deleted, the next acquire of it puts blindly, trusting the
    /// event instead of the transaction's compare.
    TrustWatch,
    /// A keepalive that finds the session expired (its TTL ran out, maybe not revoked yet) is
    /// taken as one that extended it: grants on the dying session are believed.
    IgnoreExpiredKeepAlive,
}

/// How late after its sending the backend assumes etcd may still apply a request: etcd fails
/// a proposal it has not committed within its server-side request timeout (5 s plus two
/// election timeouts, 7 s with the defaults). An abandoned key's actor is tracked at least this
/// long after the node's last request on it, so an acquire applied late is still cleaned up.
pub const ETCD_APPLY_LATE_MS_MAX: u64 = 7_000;

/// Most abandoned keys looked at after one grant (a read and a delete each), so that the
/// grant's caller is not held up; the rest wait for the next grant.
pub const ETCD_STALE_KEYS_PER_GRANT_MAX: usize = 4;

/// How many times an acquire retries when its session expired under it or it deleted a
/// previous incarnation's key, before giving up with [`StoreError::Contention`].
pub const ETCD_ACQUIRE_ATTEMPTS_MAX: u32 = 4;

/// Most keys read per request when listing leases, so one listing never asks etcd for an
/// unbounded reply.
pub const ETCD_SCAN_PAGE_KEYS: i64 = 1_000;

/// The etcd a manager talks to unless told otherwise: a real cluster through `etcd-client`
/// (feature `etcd`).
#[cfg(feature = "etcd")]
pub type DefaultEtcdApi = EtcdClient;

/// Without the feature `etcd` there is no real cluster's client: a manager is always given
/// its [`EtcdApi`] (such as the simulator's etcd), and this uninhabited type only fills the
/// default.
#[cfg(not(feature = "etcd"))]
#[derive(Debug)]
pub enum DefaultEtcdApi {}

/// Leases on actors, in etcd. The comments at the top of `src/etcd/mod.rs` explain the key
/// layout, the fencing token, node sessions and what the times in a [`Lease`] mean.
///
/// Generic over the etcd it talks to: by default a real cluster (`EtcdClient`, feature
/// `etcd`), or any other [`EtcdApi`], such as the simulator's etcd.
pub struct EtcdLeaseManager<A = DefaultEtcdApi> {
    connection: Connection<A>,
    keys: Keys,
    /// The TTL asked of etcd for each session, in whole seconds.
    ttl_s: i64,
    sessions: NodeSessions<A>,
    #[cfg(feature = "mutations")]
    mutation: Option<EtcdMutation>,
    /// Actors a watch saw freed, for [`EtcdMutation::TrustWatch`].
    #[cfg(feature = "mutations")]
    trusted_free: std::sync::Mutex<std::collections::BTreeSet<ActorId>>,
}

/// What a manager's sessions cost so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct EtcdStats {
    /// Session leases granted.
    pub sessions_granted: u64,
    /// Keepalive round trips sent, across all sessions.
    pub keep_alives_sent: u64,
}

/// A node's current session, as [`EtcdLeaseManager::node_session`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct NodeSession {
    /// The etcd lease id every key of the node's session is attached to.
    pub lease_id: i64,
    /// The TTL etcd granted, in ms (whole seconds).
    pub ttl_ms: u64,
    /// Lower bound of the session's expiry on the manager's clock.
    pub expires_at_ms: u64,
}

#[cfg(feature = "etcd")]
impl EtcdLeaseManager<EtcdClient> {
    /// Connects to etcd and checks within [`EtcdOptions::connect_timeout_ms`] that it answers
    /// and lets the caller read the key prefix. Fails with [`StoreError::InvalidOption`] for bad
    /// options, [`StoreError::Unavailable`] if etcd cannot be reached in time, and
    /// [`StoreError::AccessDenied`] if it refuses the credentials.
    pub async fn connect(options: EtcdOptions) -> Result<Self, StoreError> {
        options.validate()?;
        let timeout_ms = options.connect_timeout_ms;
        let api = connect_client(&options).await?;
        let clock = options
            .clock
            .clone()
            .unwrap_or_else(|| Arc::new(kelpie_core::TokioClock::new()));
        let manager = Self::with_api(
            api,
            options.lease,
            &options.key_prefix,
            options.request_timeout_ms,
            clock,
        )?;
        // The client connects lazily, so ask etcd something to find out whether it answers.
        // The read goes to one member after another while they cannot be connected to (see
        // `client.rs`), so this succeeds if any member answers in time.
        let probe = RangeRequest {
            key: manager.keys.prefix().as_bytes().to_vec(),
            range_end: manager.keys.prefix_end(),
            limit: 1,
            revision: 0,
        };
        let reading = manager.connection.api.range(probe);
        let clock = &manager.connection.clock;
        let what = "reading the key prefix";
        errors::bounded(clock, what, errors::Effect::ReadOnly, timeout_ms, reading).await?;
        Ok(manager)
    }
}

impl<A: EtcdApi> EtcdLeaseManager<A> {
    /// Leases in the etcd behind `api`, under `key_prefix`, each request bounded by
    /// `request_timeout_ms` on `clock` (which also times every [`Lease`] this manager returns).
    /// Fails with [`StoreError::InvalidOption`] for a bad prefix or timeout.
    pub fn with_api(
        api: A,
        lease: LeaseConfig,
        key_prefix: &str,
        request_timeout_ms: u64,
        clock: SharedClock,
    ) -> Result<Self, StoreError> {
        options::check_key_prefix(key_prefix)?;
        options::check_timeout("request_timeout_ms", request_timeout_ms)?;
        let lease_duration_ms = lease.lease_duration_ms;
        let ttl_s = i64::try_from(lease_duration_ms.div_ceil(1_000))
            .expect("lease durations are bounded by LEASE_DURATION_MS_MAX");
        Ok(Self {
            connection: Connection {
                api: Arc::new(api),
                clock,
                request_timeout_ms,
                lease_duration_ms,
                counters: Arc::new(Counters::default()),
                #[cfg(feature = "mutations")]
                belief_from_reply: false,
                #[cfg(feature = "mutations")]
                ignore_expired_keepalive: false,
            },
            keys: Keys::new(key_prefix),
            ttl_s,
            sessions: NodeSessions::default(),
            #[cfg(feature = "mutations")]
            mutation: None,
            #[cfg(feature = "mutations")]
            trusted_free: std::sync::Mutex::new(std::collections::BTreeSet::new()),
        })
    }

    /// This manager, deliberately broken as `mutation` says, for the simulator's mutation
    /// runs.
    #[cfg(feature = "mutations")]
    pub fn with_mutation(mut self, mutation: EtcdMutation) -> Self {
        self.mutation = Some(mutation);
        self.connection.belief_from_reply = mutation == EtcdMutation::BeliefFromReply;
        self.connection.ignore_expired_keepalive = mutation == EtcdMutation::IgnoreExpiredKeepAlive;
        self.keys.mod_revision_token = mutation == EtcdMutation::ModRevisionToken;
        self
    }

    /// Whether this acquire of `actor_id` puts its key blindly, without comparing its version:
    /// only ever under a mutation.
    fn puts_blindly(&self, actor_id: &ActorId) -> bool {
        #[cfg(feature = "mutations")]
        match self.mutation {
            Some(EtcdMutation::BlindPut) => return true,
            Some(EtcdMutation::TrustWatch) => {
                let mut trusted = self.trusted_free.lock().expect("mutation set poisoned");
                return trusted.remove(actor_id);
            }
            _ => {}
        }
        let _ = actor_id;
        false
    }

    /// Notes that a watch saw `actor_id`'s key deleted (used only by a mutation).
    fn watched_free(&self, actor_id: &ActorId) {
        #[cfg(feature = "mutations")]
        if self.mutation == Some(EtcdMutation::TrustWatch) {
            let mut trusted = self.trusted_free.lock().expect("mutation set poisoned");
            trusted.insert(actor_id.clone());
        }
        let _ = actor_id;
    }

    /// The etcd this manager talks to.
    pub fn api(&self) -> &A {
        &self.connection.api
    }

    /// The prefix every lease key starts with.
    pub fn key_prefix(&self) -> &str {
        self.keys.prefix()
    }

    /// The session TTL asked of etcd: the lease duration rounded up to whole seconds. etcd may
    /// grant more (its minimum); [`NodeSession::ttl_ms`] is what it granted.
    pub fn lease_ttl_ms(&self) -> u64 {
        u64::try_from(self.ttl_s).expect("ttl is positive") * 1_000
    }

    /// Sessions granted and keepalives sent so far.
    pub fn stats(&self) -> EtcdStats {
        let counters = &self.connection.counters;
        EtcdStats {
            sessions_granted: counters.sessions_granted.load(Ordering::Relaxed),
            keep_alives_sent: counters.keep_alives_sent.load(Ordering::Relaxed),
        }
    }

    /// The node's live session in this manager, if it has one.
    pub fn node_session(&self, node_id: &NodeId) -> Option<NodeSession> {
        self.sessions.live(node_id).map(|s| NodeSession {
            lease_id: s.lease_id(),
            ttl_ms: s.ttl_ms(),
            expires_at_ms: s.expires_at_ms(),
        })
    }

    /// The fenced state store in the same etcd, beside these leases: its writes are fenced by
    /// the lease keys themselves (see [`EtcdFencedStateStore`]).
    pub fn fenced_state_store(&self) -> EtcdFencedStateStore<A> {
        EtcdFencedStateStore::new(
            Arc::clone(&self.connection.api),
            Arc::clone(&self.connection.clock),
            self.keys.clone(),
            self.connection.request_timeout_ms,
        )
    }

    /// Extends every lease the node holds through this manager with one keepalive, and returns
    /// the new lower bound of their expiry on the manager's clock. `Ok(None)` if the node has
    /// no live session: it holds nothing here, or its session expired and its leases with it.
    pub async fn keep_alive_node(&self, node_id: &NodeId) -> Result<Option<u64>, StoreError> {
        let Some(session) = self.sessions.live(node_id) else {
            return Ok(None);
        };
        // The caller asks to keep every lease of the node: none of them is abandoned.
        session.note_sent_all(self.connection.clock.now_ms());
        match session.keep_alive().await? {
            KeepAlive::Alive { sent_at_ms } => {
                Ok(Some(sent_at_ms.saturating_add(session.ttl_ms())))
            }
            KeepAlive::Expired => {
                self.sessions.retire(node_id, &session);
                Ok(None)
            }
        }
    }

    /// Releases every lease the node holds through this manager in one request, by revoking its
    /// session. Returns whether there was a live session to revoke.
    pub async fn revoke_node(&self, node_id: &NodeId) -> Result<bool, StoreError> {
        let Some(session) = self.sessions.live(node_id) else {
            return Ok(false);
        };
        session.revoke().await?;
        self.sessions.retire(node_id, &session);
        Ok(true)
    }

    /// Every valid lease held by `node_id` itself or by one of its incarnations
    /// (`node_id@<incarnation>`, as a `LeaseSession` or `kelpie node` holds them; see
    /// [`is_node_or_incarnation`](crate::is_node_or_incarnation)), in actor id order, read at
    /// one etcd revision. [`LeaseManager::leases_held_by`] matches the holder exactly.
    pub async fn leases_of_node(&self, node_id: &NodeId) -> Result<Vec<Lease>, StoreError> {
        let holds = |holder: &NodeId| crate::keeper::is_node_or_incarnation(holder, node_id);
        self.scan_held_by(holds).await
    }

    /// The lease key of `actor_id`, for tools and tests that look at etcd directly.
    pub fn actor_key(&self, actor_id: &ActorId) -> Vec<u8> {
        self.keys.actor_key(actor_id)
    }
}

impl<A: EtcdApi> LeaseManager for EtcdLeaseManager<A> {
    fn lease_duration_ms(&self) -> u64 {
        self.connection.lease_duration_ms
    }

    async fn watch_until_free(
        &self,
        actor_id: &ActorId,
        max_wait_ms: u64,
    ) -> Result<Option<bool>, LeaseError> {
        let freed = self.wait_until_free(actor_id, max_wait_ms).await;
        freed.map(Some).map_err(LeaseError::Store)
    }

    async fn acquire(&self, actor_id: &ActorId, node_id: &NodeId) -> Result<Lease, LeaseError> {
        self.acquire_lease(actor_id, node_id).await
    }

    async fn renew(&self, actor_id: &ActorId, node_id: &NodeId) -> Result<Lease, LeaseError> {
        self.renew_lease(actor_id, node_id, None).await
    }

    async fn release(&self, actor_id: &ActorId, node_id: &NodeId) -> Result<Lease, LeaseError> {
        self.release_lease(actor_id, node_id, None).await
    }

    /// Atomic: the token is compared with the key's create revision in the renewing
    /// transaction.
    async fn renew_fenced(
        &self,
        actor_id: &ActorId,
        node_id: &NodeId,
        fencing_token: FencingToken,
    ) -> Result<Lease, LeaseError> {
        self.renew_lease(actor_id, node_id, Some(fencing_token))
            .await
    }

    /// Atomic: the token is compared with the key's create revision in the deleting
    /// transaction.
    async fn release_fenced(
        &self,
        actor_id: &ActorId,
        node_id: &NodeId,
        fencing_token: FencingToken,
    ) -> Result<Lease, LeaseError> {
        self.release_lease(actor_id, node_id, Some(fencing_token))
            .await
    }

    async fn is_valid(&self, actor_id: &ActorId, node_id: &NodeId) -> Result<bool, LeaseError> {
        let stored = self.read_key(actor_id).await?;
        Ok(stored.is_some_and(|s| s.holder == *node_id))
    }

    async fn get(&self, actor_id: &ActorId) -> Result<Option<Lease>, LeaseError> {
        let Some(stored) = self.read_key(actor_id).await? else {
            return Ok(None);
        };
        Ok(Some(self.lease_of(&stored).await?))
    }

    async fn leases_held_by(&self, node_id: &NodeId) -> Result<Vec<Lease>, LeaseError> {
        Ok(self.scan_held_by(|holder| holder == node_id).await?)
    }
}

/// Builds one client per endpoint, contacting nothing yet: a malformed endpoint is refused here.
#[cfg(feature = "etcd")]
async fn connect_client(options: &EtcdOptions) -> Result<EtcdClient, StoreError> {
    let client_options = options.client_options(true)?;
    let anonymous = options.client_options(false)?;
    let authenticates = options.credentials.is_some();
    let connecting =
        EtcdClient::connect(&options.endpoints, client_options, anonymous, authenticates);
    match connecting.await {
        Ok(client) => Ok(client),
        Err(error @ (etcd_client::Error::InvalidArgs(_) | etcd_client::Error::InvalidUri(_))) => {
            Err(StoreError::InvalidOption {
                option: "endpoints".to_string(),
                reason: error.to_string(),
            })
        }
        Err(error) => Err(errors::store_error(
            "connecting",
            errors::Effect::ReadOnly,
            &client::classify(&error),
        )),
    }
}
