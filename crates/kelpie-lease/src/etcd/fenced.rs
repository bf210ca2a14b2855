//! Actor state in etcd, fenced by the lease keys themselves.
//!
//! Every write is one etcd transaction that compares the actor's lease key's
//! `create_revision` (its fencing token, see `codec.rs`) with the writer's token and only then
//! puts the state: etcd itself refuses the write of a holder whose lease expired, was released
//! or passed to another node, however late the write arrives. No highest-token bookkeeping is
//! needed: the lease key is the fence. A fence (an activation) is the same comparison with a
//! read of the state, in one transaction, so the new holder reads exactly what the last
//! accepted write left.
//!
//! State keys live beside the lease keys but outside their range: `<prefix end>state/<actor>`,
//! where the prefix end is the first key after every key under the lease prefix (its last byte
//! incremented: `/kelpie/leases0state/` for the default `/kelpie/leases/`), so lease scans
//! never see them and two lease prefixes never share state. The value is the writer's token
//! (8 bytes, big-endian) followed by the state. State keys are not attached to any lease: they
//! outlive the holder, which is the point.

use std::sync::Arc;

use kelpie_core::limits::ID_LENGTH_BYTES_MAX;
use kelpie_core::{ActorId, FencingToken, SharedClock};

use super::api::{Compare, EtcdApi, EtcdKeyValue, Txn, TxnOp, TxnReply};
use super::codec::Keys;
use super::errors::{bounded, Effect};
use super::ops::single_key;
use super::options::ETCD_KEY_PREFIX_BYTES_MAX;
use crate::error::StoreError;
use crate::fenced::{check_write, FencedState, FencedStateStore, StateError};

/// Bytes of the token at the start of a state value.
const TOKEN_BYTES: usize = 8;

/// etcd's default `--max-request-bytes`: the largest request its members accept (1.5 MiB). A
/// bigger one is refused with "etcdserver: request is too large" (or, far bigger, by gRPC's
/// message size limit).
const ETCD_MAX_REQUEST_BYTES_DEFAULT: usize = 1_536 * 1_024;

/// Largest state value the etcd fenced state store accepts for one actor: 1 MiB. A write is
/// one etcd request carrying the value, the token and two keys, and etcd refuses requests over
/// its `--max-request-bytes` (1.5 MiB by default) with an error that says nothing of the
/// value; a bigger value is refused here instead, with [`StateError::ValueTooLarge`] naming
/// this bound, before anything is sent. It is below the general
/// [`STATE_VALUE_BYTES_MAX`](crate::limits::STATE_VALUE_BYTES_MAX) the other stores allow.
pub const ETCD_STATE_VALUE_BYTES_MAX: usize = 1_024 * 1_024;

/// Room for everything a state write sends besides the value: the token, the lease key in the
/// compare and the state key in the put (each at most the prefix, `state/` and an actor id),
/// and protobuf's framing, with a wide margin.
const ETCD_STATE_WRITE_OVERHEAD_BYTES_MAX: usize =
    TOKEN_BYTES + 2 * (ETCD_KEY_PREFIX_BYTES_MAX + ID_LENGTH_BYTES_MAX + 16) + 4 * 1_024;

const _: () = assert!(
    ETCD_STATE_VALUE_BYTES_MAX + ETCD_STATE_WRITE_OVERHEAD_BYTES_MAX
        <= ETCD_MAX_REQUEST_BYTES_DEFAULT
);
const _: () = assert!(ETCD_STATE_VALUE_BYTES_MAX <= crate::fenced::STATE_VALUE_BYTES_MAX);

/// Actor state in the etcd of an [`EtcdLeaseManager`](super::EtcdLeaseManager), under its key
/// prefix; made by [`EtcdLeaseManager::fenced_state_store`](super::EtcdLeaseManager::fenced_state_store)
/// so that the two cannot disagree on where the leases are. See the module docs.
pub struct EtcdFencedStateStore<A = super::DefaultEtcdApi> {
    api: Arc<A>,
    clock: SharedClock,
    keys: Keys,
    request_timeout_ms: u64,
}

impl<A> Clone for EtcdFencedStateStore<A> {
    fn clone(&self) -> Self {
        Self {
            api: Arc::clone(&self.api),
            clock: Arc::clone(&self.clock),
            keys: self.keys.clone(),
            request_timeout_ms: self.request_timeout_ms,
        }
    }
}

impl<A> std::fmt::Debug for EtcdFencedStateStore<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdFencedStateStore")
            .field("lease_prefix", &self.keys.prefix())
            .finish_non_exhaustive()
    }
}

impl<A: EtcdApi> EtcdFencedStateStore<A> {
    pub(super) fn new(
        api: Arc<A>,
        clock: SharedClock,
        keys: Keys,
        request_timeout_ms: u64,
    ) -> Self {
        Self {
            api,
            clock,
            keys,
            request_timeout_ms,
        }
    }

    /// The key of `actor_id`'s state.
    fn state_key(&self, actor_id: &ActorId) -> Vec<u8> {
        let mut key = self.keys.prefix_end();
        key.extend_from_slice(b"state/");
        key.extend_from_slice(actor_id.as_str().as_bytes());
        key
    }

    /// "The actor's lease key was created by the transaction with revision `token`."
    fn holds(&self, actor_id: &ActorId, token: FencingToken) -> Result<Compare, StateError> {
        let revision = i64::try_from(token.0).map_err(|_| StateError::NotHolder {
            actor_id: actor_id.clone(),
            token,
        })?;
        let lease_key = self.keys.actor_key(actor_id);
        Ok(Compare::create_revision(&lease_key, revision))
    }

    async fn txn(&self, what: &str, effect: Effect, txn: Txn) -> Result<TxnReply, StateError> {
        let timeout_ms = self.request_timeout_ms;
        let reply = bounded(&self.clock, what, effect, timeout_ms, self.api.txn(txn)).await;
        reply.map_err(StateError::Store)
    }

    /// Why a transaction's comparison failed: the lease key it read in its `else` branch.
    fn refusal(&self, actor_id: &ActorId, token: FencingToken, response: &TxnReply) -> StateError {
        let current = response.last_key().map(|kv| kv.create_revision);
        match current.and_then(|revision| u64::try_from(revision).ok()) {
            Some(revision) if revision > token.0 => StateError::StaleToken {
                actor_id: actor_id.clone(),
                token,
                highest_token: FencingToken(revision),
            },
            _ => StateError::NotHolder {
                actor_id: actor_id.clone(),
                token,
            },
        }
    }

    fn decode(&self, actor_id: &ActorId, kv: &EtcdKeyValue) -> Result<FencedState, StateError> {
        let value = kv.value.as_slice();
        let token = value
            .get(..TOKEN_BYTES)
            .and_then(|bytes| <[u8; TOKEN_BYTES]>::try_from(bytes).ok())
            .map(u64::from_be_bytes)
            .filter(|&token| token > 0)
            .ok_or_else(|| {
                StateError::Store(StoreError::Corrupt {
                    location: String::from_utf8_lossy(&kv.key).into_owned(),
                    reason: format!("the state of {actor_id} does not start with a fencing token"),
                })
            })?;
        Ok(FencedState {
            highest_token: FencingToken(token),
            value: Some(value[TOKEN_BYTES..].to_vec()),
        })
    }
}

impl<A: EtcdApi> FencedStateStore for EtcdFencedStateStore<A> {
    async fn write(
        &self,
        actor_id: &ActorId,
        token: FencingToken,
        value: &[u8],
    ) -> Result<(), StateError> {
        check_write(actor_id, token, value.len())?;
        if value.len() > ETCD_STATE_VALUE_BYTES_MAX {
            return Err(StateError::ValueTooLarge {
                actor_id: actor_id.clone(),
                bytes: value.len(),
                bytes_max: ETCD_STATE_VALUE_BYTES_MAX,
            });
        }
        let lease_key = self.keys.actor_key(actor_id);
        let mut stored = Vec::with_capacity(TOKEN_BYTES + value.len());
        stored.extend_from_slice(&token.0.to_be_bytes());
        stored.extend_from_slice(value);
        let txn = Txn {
            compares: vec![self.holds(actor_id, token)?],
            success: vec![TxnOp::put(&self.state_key(actor_id), &stored, 0)],
            failure: vec![TxnOp::get(&lease_key)],
        };
        let response = self.txn("writing actor state", Effect::Write, txn).await?;
        if response.succeeded {
            return Ok(());
        }
        Err(self.refusal(actor_id, token, &response))
    }

    async fn fence(
        &self,
        actor_id: &ActorId,
        token: FencingToken,
    ) -> Result<FencedState, StateError> {
        check_write(actor_id, token, 0)?;
        let lease_key = self.keys.actor_key(actor_id);
        let txn = Txn {
            compares: vec![self.holds(actor_id, token)?],
            success: vec![TxnOp::get(&self.state_key(actor_id))],
            failure: vec![TxnOp::get(&lease_key)],
        };
        let response = self
            .txn("fencing actor state", Effect::ReadOnly, txn)
            .await?;
        if !response.succeeded {
            return Err(self.refusal(actor_id, token, &response));
        }
        let value = match response.last_key() {
            Some(kv) => self.decode(actor_id, kv)?.value,
            None => None,
        };
        Ok(FencedState {
            highest_token: token,
            value,
        })
    }

    async fn read(&self, actor_id: &ActorId) -> Result<Option<FencedState>, StateError> {
        let key = self.state_key(actor_id);
        let reading = self.api.range(single_key(&key));
        let timeout_ms = self.request_timeout_ms;
        let what = "reading actor state";
        let reply = bounded(&self.clock, what, Effect::ReadOnly, timeout_ms, reading).await?;
        reply
            .kvs
            .first()
            .map(|kv| self.decode(actor_id, kv))
            .transpose()
    }
}
