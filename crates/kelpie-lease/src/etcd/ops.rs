//! The lease operations as etcd requests. See the module documentation of `etcd` for the
//! protocol these implement.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures_util::future::join;
use kelpie_core::{ActorId, FencingToken, NodeId};

use super::api::{
    Compare, EtcdApi, EtcdApiError, EtcdKeyValue, RangeRequest, Txn, TxnOp, TxnReply,
};
use super::codec::StoredLease;
use super::errors::{bounded, store_error, timed_out, within, Effect};
use super::session::{KeepAlive, Session};
use super::{
    EtcdLeaseManager, ETCD_ACQUIRE_ATTEMPTS_MAX, ETCD_APPLY_LATE_MS_MAX, ETCD_SCAN_PAGE_KEYS,
    ETCD_STALE_KEYS_PER_GRANT_MAX,
};
use crate::error::{LeaseError, StoreError};
use crate::lease::Lease;

/// How a transaction on a lease key ended.
enum TxnOutcome {
    /// etcd applied it (or evaluated its comparison as false and ran the other branch).
    Done(TxnReply),
    /// etcd refused it because the session lease it attaches the key to is gone.
    SessionGone,
}

impl<A: EtcdApi> EtcdLeaseManager<A> {
    pub(super) async fn acquire_lease(
        &self,
        actor_id: &ActorId,
        node_id: &NodeId,
    ) -> Result<Lease, LeaseError> {
        let key = self.keys.actor_key(actor_id);
        for _ in 0..ETCD_ACQUIRE_ATTEMPTS_MAX {
            let session = self
                .sessions
                .current(&self.connection, node_id, self.ttl_s)
                .await?;
            // Read before the transaction is sent (and after the caller sent its acquire), so
            // it is no later than etcd's applying it: the tenure's start.
            let sent_at_ms = self.connection.clock.now_ms();
            let mut txn = acquire_txn(&key, node_id, session.lease_id());
            if self.puts_blindly(actor_id) {
                txn.compares.clear();
            }
            // Until an answer says otherwise, the key may be created on this session: if the
            // reply is lost, the node must still delete it once nobody renews it.
            session.note_sent(actor_id, sent_at_ms);
            // The new key must last at least a full TTL (which is at least the lease duration)
            // from `sent_at_ms`, since a caller counts its lease from its own send time (see
            // `belief`). If the session's confirmed expiry already covers that, the
            // transaction alone suffices. Otherwise the session is extended by a keepalive
            // sent *concurrently* with the transaction rather than before it: the keepalive
            // task sends it after this request is queued (a keepalive already in flight does
            // not answer it), so it is sent no earlier than `sent_at_ms`, and etcd keeps the
            // key until at least its send time plus the TTL. Correctness of the write does not
            // depend on the keepalive's order: etcd refuses a put naming a lease that is gone
            // ("requested lease not found"), and a keepalive finding the lease gone retires the
            // session whatever the transaction did.
            let covered = session.expires_at_ms() >= sent_at_ms.saturating_add(session.ttl_ms());
            let (written, kept_alive) = if covered {
                (self.write_txn("acquire", txn).await, None)
            } else {
                let (written, kept_alive) =
                    join(self.write_txn("acquire", txn), session.keep_alive()).await;
                (written, Some(kept_alive))
            };
            match kept_alive {
                None => {}
                Some(Ok(KeepAlive::Alive { .. })) => {
                    // The keepalive extended every key of the session, abandoned ones too.
                    self.delete_stale(&session, node_id).await;
                }
                Some(Ok(KeepAlive::Expired)) => {
                    // A key the transaction may have created hangs off the dead session; etcd
                    // deletes it, or the next attempt deletes it as a previous incarnation's.
                    self.sessions.retire(node_id, &session);
                    continue;
                }
                Some(Err(error)) => {
                    return Err(match written {
                        Ok(TxnOutcome::Done(response)) if response.succeeded => {
                            // The key was created, but its expiry is unknown; a retry returns
                            // it (acquiring is idempotent) with an expiry known again.
                            StoreError::CommitUnknown {
                                reason: format!("acquired, then {error}"),
                            }
                        }
                        _ => error,
                    }
                    .into());
                }
            }
            let response = match written? {
                TxnOutcome::Done(response) => response,
                TxnOutcome::SessionGone => {
                    self.sessions.retire(node_id, &session);
                    continue;
                }
            };
            let stored = self.txn_key(&response)?.ok_or_else(|| missing_key(&key))?;
            // A lower bound of etcd's expiry of the key: the send time of the latest keepalive
            // (or grant) of its session that etcd confirmed, plus the TTL. Whichever keepalive
            // that is (the one above, a concurrent caller's, or one confirmed before the
            // transaction), etcd extended the session to at least that instant, the key lives
            // as long as the session, and etcd never shortens a lease. By the choice above it
            // is at least `sent_at_ms` plus the TTL.
            let expires_at_ms = session.expires_at_ms();
            if response.succeeded {
                session.remember_acquired(actor_id, stored.create_revision, sent_at_ms);
                return Ok(stored.lease(sent_at_ms, expires_at_ms));
            }
            if stored.holder != *node_id {
                // The actor stays noted: a duplicate or late copy of this request (or of an
                // earlier one) may still create the key once its holder lets go.
                let expires_at_ms = self.observed_expiry_ms(stored.session_lease_id).await?;
                return Err(LeaseError::HeldByOther {
                    actor_id: actor_id.clone(),
                    holder: stored.holder,
                    expires_at_ms,
                });
            }
            if stored.session_lease_id == session.lease_id() {
                // Idempotent: the caller already holds it, now for at least a TTL from
                // `sent_at_ms` (see above). The key is rewritten, as a renewal would, so that
                // a deletion of it as abandoned that raced this request fails (see
                // `delete_stale`).
                if !self.touch(&key, &stored, &session).await? {
                    continue;
                }
                session.remember_acquired(actor_id, stored.create_revision, sent_at_ms);
                let acquired_at_ms = session
                    .acquired_at_ms(actor_id, stored.create_revision)
                    .unwrap_or(sent_at_ms);
                return Ok(stored.lease(acquired_at_ms, expires_at_ms));
            }
            self.delete_other_incarnation(&key, &stored).await?;
        }
        Err(StoreError::Contention {
            attempts: ETCD_ACQUIRE_ATTEMPTS_MAX,
        }
        .into())
    }

    /// Deletes the caller's node's key held under a session this manager does not keep alive,
    /// if it has not changed since it was read, so that the next attempt re-creates it with a
    /// larger token.
    async fn delete_other_incarnation(
        &self,
        key: &[u8],
        stored: &StoredLease,
    ) -> Result<(), StoreError> {
        let txn = Txn {
            compares: vec![Compare::mod_revision(key, stored.mod_revision)],
            success: vec![TxnOp::delete(key)],
            failure: Vec::new(),
        };
        // Whether or not the key changed meanwhile, the next attempt reads it afresh.
        self.write_txn("deleting a previous incarnation's lease", txn)
            .await
            .map(|_| ())
    }

    /// Renews; with `fencing_token`, only while the key still carries it (its create
    /// revision), checked in the same transaction.
    pub(super) async fn renew_lease(
        &self,
        actor_id: &ActorId,
        node_id: &NodeId,
        fencing_token: Option<FencingToken>,
    ) -> Result<Lease, LeaseError> {
        let key = self.keys.actor_key(actor_id);
        let sent_at_ms = self.connection.clock.now_ms();
        let live = self.sessions.live(node_id);
        if let Some(session) = &live {
            session.note_sent(actor_id, sent_at_ms);
        }
        let guard = self.token_guard(&key, fencing_token);
        let (Some(session), Some(mut compares)) = (live, guard) else {
            let stored = self.read_key(actor_id).await?;
            return Err(self.refusal(actor_id, node_id, stored));
        };
        compares.extend([
            Compare::value(&key, node_id.as_str().as_bytes()),
            Compare::lease(&key, session.lease_id()),
        ]);
        let txn = Txn {
            compares,
            success: vec![
                TxnOp::put(&key, node_id.as_str().as_bytes(), session.lease_id()),
                TxnOp::get(&key),
            ],
            failure: vec![TxnOp::get(&key)],
        };
        let response = match self.write_txn("renew", txn).await? {
            TxnOutcome::Done(response) => response,
            TxnOutcome::SessionGone => {
                return Err(self.session_expired(actor_id, node_id, &session))
            }
        };
        let stored = match self.txn_key(&response)? {
            Some(stored) if response.succeeded => stored,
            stored => {
                kelpie_core::coverage::mark(super::MARK_ETCD_COMPARE_FAILED);
                return Err(self.refusal(actor_id, node_id, stored));
            }
        };
        match session.keep_alive().await? {
            KeepAlive::Alive { sent_at_ms } => {
                self.delete_stale(&session, node_id).await;
                let acquired_at_ms = session
                    .acquired_at_ms(actor_id, stored.create_revision)
                    .unwrap_or(sent_at_ms);
                Ok(stored.lease(acquired_at_ms, sent_at_ms.saturating_add(session.ttl_ms())))
            }
            KeepAlive::Expired => Err(self.session_expired(actor_id, node_id, &session)),
        }
    }

    /// The comparison "the key still carries `fencing_token`" (none without a token), or
    /// `None` if the token cannot be a create revision at all, so no key carries it.
    fn token_guard(&self, key: &[u8], fencing_token: Option<FencingToken>) -> Option<Vec<Compare>> {
        let guard = token_guard(key, fencing_token)?;
        #[cfg(feature = "mutations")]
        if self.keys.mod_revision_token {
            let to_mod = |c: Compare| match c.target {
                super::api::CompareTarget::CreateRevision(r) => Compare::mod_revision(&c.key, r),
                _ => c,
            };
            return Some(guard.into_iter().map(to_mod).collect());
        }
        Some(guard)
    }

    /// Rewrites the caller's own key on its session, unchanged, if it is still `stored`'s
    /// tenure: `Ok(false)` if it is not (deleted meanwhile).
    async fn touch(
        &self,
        key: &[u8],
        stored: &StoredLease,
        session: &Session<A>,
    ) -> Result<bool, StoreError> {
        let txn = Txn {
            compares: vec![
                Compare::create_revision(key, stored.create_revision),
                Compare::value(key, stored.holder.as_str().as_bytes()),
                Compare::lease(key, session.lease_id()),
            ],
            success: vec![TxnOp::put(
                key,
                stored.holder.as_str().as_bytes(),
                session.lease_id(),
            )],
            failure: Vec::new(),
        };
        match self.write_txn("acquire", txn).await? {
            TxnOutcome::Done(reply) => Ok(reply.succeeded),
            TxnOutcome::SessionGone => Ok(false),
        }
    }

    /// Deletes the keys of `session` on which the node sent nothing for a lease duration (see
    /// [`Session::stale`]): keys the keeper gave up on, or created by an acquire whose reply
    /// was lost. Without this, the keepalives the node sends for its other actors would keep
    /// them, and their actors, from everyone for ever.
    ///
    /// Safe against requests racing it: each key is read first, the node is checked to have
    /// sent nothing on it since (so any grant the read saw was for a request sent at least a
    /// lease duration ago, whose belief has ended), and the delete is guarded by the key's
    /// `mod_revision` as read. Every grant writes the key (renewals, and acquires of a key the
    /// node already holds, see `touch`), so a request sent after the check and granted before
    /// the delete makes the delete fail; one applied after it finds the key gone.
    pub(super) async fn delete_stale(&self, session: &Arc<Session<A>>, node_id: &NodeId) {
        let now_ms = self.connection.clock.now_ms();
        // A few per grant, so that the grant this runs after is not held up; the ones looked
        // at longest ago first, so that every abandoned key is reached.
        let count = ETCD_STALE_KEYS_PER_GRANT_MAX;
        for (actor_id, last_sent_ms) in session.stale(now_ms, count) {
            let key = self.keys.actor_key(&actor_id);
            let reading = self.connection.api.range(single_key(&key));
            let Ok(read) = self
                .bounded("reading a lease", Effect::ReadOnly, reading)
                .await
            else {
                continue;
            };
            let ours = read.kvs.first().filter(|kv| {
                kv.value == node_id.as_str().as_bytes() && kv.lease == session.lease_id()
            });
            let Some(kv) = ours else {
                // Not (or no longer) this session's. An acquire sent before the read (or a
                // duplicate of one) may still be applied after it and create the key, so the
                // actor is forgotten only once no request sent by then can be applied any more.
                let applied_by_ms = last_sent_ms
                    .saturating_add(self.connection.lease_duration_ms)
                    .saturating_add(ETCD_APPLY_LATE_MS_MAX);
                if applied_by_ms <= self.connection.clock.now_ms() {
                    session.forget_unless_sent_since(&actor_id, last_sent_ms);
                }
                continue;
            };
            if !session.nothing_sent_since(&actor_id, last_sent_ms) {
                continue;
            }
            let txn = Txn {
                compares: vec![
                    Compare::mod_revision(&key, kv.mod_revision),
                    Compare::lease(&key, session.lease_id()),
                ],
                success: vec![TxnOp::delete(&key)],
                failure: Vec::new(),
            };
            let deleting = self.write_txn("deleting an abandoned lease", txn).await;
            if let Ok(TxnOutcome::Done(reply)) = deleting {
                if reply.succeeded {
                    // Still noted, until no late request can create the key again.
                    kelpie_core::coverage::mark(super::MARK_ETCD_ABANDONED_KEY_DELETED);
                }
            }
        }
    }

    fn session_expired(
        &self,
        actor_id: &ActorId,
        node_id: &NodeId,
        session: &Arc<Session<A>>,
    ) -> LeaseError {
        self.sessions.retire(node_id, session);
        LeaseError::Expired {
            actor_id: actor_id.clone(),
            node_id: node_id.clone(),
            expired_at_ms: session.expires_at_ms(),
        }
    }

    /// Why `node_id` may not renew the lease as stored: nobody or another node holds it
    /// (`NotHolder`), or the node's own key hangs off its expired session (`Expired`).
    fn refusal(
        &self,
        actor_id: &ActorId,
        node_id: &NodeId,
        stored: Option<StoredLease>,
    ) -> LeaseError {
        let retired = self.sessions.retired(node_id);
        if let (Some(stored), Some(retired)) = (&stored, retired) {
            if stored.holder == *node_id && stored.session_lease_id == retired.lease_id {
                return LeaseError::Expired {
                    actor_id: actor_id.clone(),
                    node_id: node_id.clone(),
                    expired_at_ms: retired.expired_at_ms,
                };
            }
        }
        LeaseError::NotHolder {
            actor_id: actor_id.clone(),
            node_id: node_id.clone(),
            holder: stored.map(|s| s.holder),
        }
    }

    /// Releases; with `fencing_token`, only while the key still carries it.
    pub(super) async fn release_lease(
        &self,
        actor_id: &ActorId,
        node_id: &NodeId,
        fencing_token: Option<FencingToken>,
    ) -> Result<Lease, LeaseError> {
        let key = self.keys.actor_key(actor_id);
        let Some(mut compares) = self.token_guard(&key, fencing_token) else {
            let holder = self.read_key(actor_id).await?.map(|s| s.holder);
            return Err(not_holder(actor_id, node_id, holder));
        };
        // The holder may release whichever session the key hangs off, even an expired one.
        compares.push(Compare::value(&key, node_id.as_str().as_bytes()));
        let txn = Txn {
            compares,
            success: vec![TxnOp::delete(&key)],
            failure: vec![TxnOp::get(&key)],
        };
        let TxnOutcome::Done(response) = self.write_txn("release", txn).await? else {
            // A delete names no lease, so etcd has no reason to answer this; if it does, the
            // release was refused.
            let reason = "etcd answered a release with \"lease not found\"".to_string();
            return Err(StoreError::WriteFailed { reason }.into());
        };
        let stored = match self.txn_key(&response)? {
            Some(stored) if response.succeeded => stored,
            stored => {
                kelpie_core::coverage::mark(super::MARK_ETCD_COMPARE_FAILED);
                return Err(not_holder(actor_id, node_id, stored.map(|s| s.holder)));
            }
        };
        // The actor stays noted in the session: a late acquire of it could still create the
        // key again, and the abandoned-key sweep must then find it.
        Ok(self.lease_of(&stored).await?)
    }

    /// The lease as stored, with times on this manager's clock (see the module documentation).
    pub(super) async fn lease_of(&self, stored: &StoredLease) -> Result<Lease, StoreError> {
        if let Some(session) = self.own_session(stored) {
            let expires_at_ms = session.expires_at_ms();
            let acquired_at_ms = session
                .acquired_at_ms(&stored.actor_id, stored.create_revision)
                .unwrap_or_else(|| session.alive_sent_at_ms());
            return Ok(stored.lease(acquired_at_ms, expires_at_ms));
        }
        let read_at_ms = self.connection.clock.now_ms();
        let expires_at_ms = self.observed_expiry_ms(stored.session_lease_id).await?;
        Ok(stored.lease(read_at_ms, expires_at_ms))
    }

    /// The holder's live session in this manager, if the key hangs off it.
    fn own_session(&self, stored: &StoredLease) -> Option<Arc<Session<A>>> {
        self.sessions
            .live(&stored.holder)
            .filter(|s| s.lease_id() == stored.session_lease_id)
    }

    /// An upper bound of when etcd expires `lease_id`, on this manager's clock: when etcd's
    /// answer arrived plus its remaining TTL, which etcd truncates to whole seconds, plus one
    /// second. A lease etcd already considers expired gives the time of the answer.
    pub(super) async fn observed_expiry_ms(&self, lease_id: i64) -> Result<u64, StoreError> {
        let asking = self.connection.api.time_to_live(lease_id);
        let what = "reading a lease's remaining TTL";
        let remaining_s = self.bounded(what, Effect::ReadOnly, asking).await?;
        let answered_at_ms = self.connection.clock.now_ms();
        Ok(match remaining_s.and_then(|s| u64::try_from(s).ok()) {
            Some(remaining_s) => answered_at_ms.saturating_add((remaining_s + 1) * 1_000),
            None => answered_at_ms,
        })
    }

    /// `request`, bounded by the request timeout on the manager's clock.
    pub(super) async fn bounded<T>(
        &self,
        what: &str,
        effect: Effect,
        request: impl std::future::Future<Output = Result<T, EtcdApiError>>,
    ) -> Result<T, StoreError> {
        let connection = &self.connection;
        let timeout_ms = connection.request_timeout_ms;
        bounded(&connection.clock, what, effect, timeout_ms, request).await
    }

    /// The actor's lease key, read linearizably.
    pub(super) async fn read_key(
        &self,
        actor_id: &ActorId,
    ) -> Result<Option<StoredLease>, StoreError> {
        let key = self.keys.actor_key(actor_id);
        let reading = self.connection.api.range(single_key(&key));
        let reply = self
            .bounded("reading a lease", Effect::ReadOnly, reading)
            .await?;
        reply.kvs.first().map(|kv| self.keys.decode(kv)).transpose()
    }

    /// Every valid lease whose holder `holds` accepts, in actor id order, read at one etcd
    /// revision. Reads every lease key under the prefix (in pages), whoever holds it.
    pub(super) async fn scan_held_by(
        &self,
        holds: impl Fn(&NodeId) -> bool,
    ) -> Result<Vec<Lease>, StoreError> {
        let mut held = Vec::new();
        // Leases held through other managers share sessions; ask etcd once per session.
        let mut expiries: BTreeMap<i64, u64> = BTreeMap::new();
        for stored in self.scan().await? {
            if !holds(&stored.holder) {
                continue;
            }
            if self.own_session(&stored).is_some() {
                held.push(self.lease_of(&stored).await?);
                continue;
            }
            let lease_id = stored.session_lease_id;
            let expires_at_ms = match expiries.get(&lease_id) {
                Some(&expires_at_ms) => expires_at_ms,
                None => self.observed_expiry_ms(lease_id).await?,
            };
            expiries.insert(lease_id, expires_at_ms);
            held.push(stored.lease(self.connection.clock.now_ms(), expires_at_ms));
        }
        Ok(held)
    }

    async fn scan(&self) -> Result<Vec<StoredLease>, StoreError> {
        let end = self.keys.prefix_end();
        let mut start = self.keys.prefix().as_bytes().to_vec();
        let mut revision = 0;
        let mut leases = Vec::new();
        loop {
            let request = RangeRequest {
                key: start.clone(),
                range_end: end.clone(),
                limit: ETCD_SCAN_PAGE_KEYS,
                revision,
            };
            let reading = self.connection.api.range(request);
            let page = self
                .bounded("listing leases", Effect::ReadOnly, reading)
                .await?;
            // Later pages are read at the first page's revision, so the listing is a snapshot.
            revision = page.revision;
            for kv in &page.kvs {
                leases.push(self.keys.decode(kv)?);
            }
            match page.kvs.last() {
                Some(last) if page.more => start = key_after(last),
                _ => return Ok(leases),
            }
        }
    }

    /// Runs a transaction that writes a lease key.
    async fn write_txn(&self, what: &str, txn: Txn) -> Result<TxnOutcome, StoreError> {
        let timeout_ms = self.connection.request_timeout_ms;
        let running = self.connection.api.txn(txn);
        match within(&self.connection.clock, timeout_ms, running).await {
            Some(Ok(response)) => Ok(TxnOutcome::Done(response)),
            Some(Err(EtcdApiError::LeaseNotFound)) => {
                kelpie_core::coverage::mark(super::MARK_ETCD_SESSION_EXPIRED);
                Ok(TxnOutcome::SessionGone)
            }
            Some(Err(error)) => Err(store_error(what, Effect::Write, &error)),
            None => Err(timed_out(what, Effect::Write, timeout_ms)),
        }
    }

    /// The key a lease transaction read (its last `get`), or deleted (its `delete`'s previous
    /// value), if it existed.
    fn txn_key(&self, response: &TxnReply) -> Result<Option<StoredLease>, StoreError> {
        response
            .last_key()
            .map(|kv| self.keys.decode(kv))
            .transpose()
    }
}

/// A read of `key` alone, at the latest revision.
pub(super) fn single_key(key: &[u8]) -> RangeRequest {
    RangeRequest {
        key: key.to_vec(),
        range_end: Vec::new(),
        limit: 0,
        revision: 0,
    }
}

/// "If the key is absent, create it attached to the session, then read it; else read it."
fn acquire_txn(key: &[u8], node_id: &NodeId, session_lease_id: i64) -> Txn {
    Txn {
        compares: vec![Compare::version(key, 0)],
        success: vec![
            TxnOp::put(key, node_id.as_str().as_bytes(), session_lease_id),
            TxnOp::get(key),
        ],
        failure: vec![TxnOp::get(key)],
    }
}

/// The comparison "the key still carries `fencing_token`" (none without a token), or `None` if
/// the token cannot be a create revision at all, so no key carries it.
fn token_guard(key: &[u8], fencing_token: Option<FencingToken>) -> Option<Vec<Compare>> {
    let Some(token) = fencing_token else {
        return Some(Vec::new());
    };
    let revision = i64::try_from(token.0).ok()?;
    Some(vec![Compare::create_revision(key, revision)])
}

fn not_holder(actor_id: &ActorId, node_id: &NodeId, holder: Option<NodeId>) -> LeaseError {
    LeaseError::NotHolder {
        actor_id: actor_id.clone(),
        node_id: node_id.clone(),
        holder,
    }
}

/// The smallest key after `kv`'s.
fn key_after(kv: &EtcdKeyValue) -> Vec<u8> {
    let mut key = kv.key.clone();
    key.push(0);
    key
}

fn missing_key(key: &[u8]) -> StoreError {
    StoreError::Corrupt {
        location: format!("etcd key {:?}", String::from_utf8_lossy(key)),
        reason: "the acquire transaction answered without the key it wrote or found".to_string(),
    }
}
