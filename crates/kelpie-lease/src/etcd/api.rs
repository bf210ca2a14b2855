//! The part of etcd's v3 API the backend uses, as a trait, so that the same backend code runs
//! against a real cluster (`EtcdClient`, feature `etcd`) and against the simulator's etcd
//! (`kelpie-dst`), where every reply can be lost, delayed or refused.
//!
//! Only what the lease protocol needs is here, in etcd's own terms
//! (<https://etcd.io/docs/v3.5/learning/api/>): transactions whose compares are equalities on
//! a key's `version`, `create_revision`, `mod_revision`, value or lease, and whose branches
//! put (optionally attached to a lease), get and delete single keys; range reads in pages at a
//! fixed revision; lease grant, keepalive, revoke and time-to-live; and a watch for a key's
//! deletion from a revision.
//!
//! Errors are classified by what the caller may assume about the request, which is all the
//! backend decides on: refused before it was applied, or possibly applied.

use std::future::Future;

/// A key as etcd stores it (`mvccpb.KeyValue`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdKeyValue {
    /// The key.
    pub key: Vec<u8>,
    /// The value.
    pub value: Vec<u8>,
    /// Revision of the write that created the key (since it was last deleted).
    pub create_revision: i64,
    /// Revision of the last write to the key.
    pub mod_revision: i64,
    /// Writes to the key since it was created (1 after the creating put).
    pub version: i64,
    /// The etcd lease the key is attached to, 0 for none.
    pub lease: i64,
}

/// What a compare looks at; every compare is an equality (`CompareResult.EQUAL`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CompareTarget {
    /// The key's version (0 if the key does not exist).
    Version(i64),
    /// The key's create revision (0 if it does not exist).
    CreateRevision(i64),
    /// The key's mod revision (0 if it does not exist).
    ModRevision(i64),
    /// The key's value (false if it does not exist).
    Value(Vec<u8>),
    /// The lease the key is attached to (0 if none or if it does not exist).
    Lease(i64),
}

/// One compare of a transaction: `key`'s `target` equals the given value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compare {
    /// The key compared.
    pub key: Vec<u8>,
    /// What is compared, and with what.
    pub target: CompareTarget,
}

impl Compare {
    /// "`key`'s version is `version`".
    pub fn version(key: &[u8], version: i64) -> Self {
        Self::of(key, CompareTarget::Version(version))
    }
    /// "`key`'s create revision is `revision`".
    pub fn create_revision(key: &[u8], revision: i64) -> Self {
        Self::of(key, CompareTarget::CreateRevision(revision))
    }
    /// "`key`'s mod revision is `revision`".
    pub fn mod_revision(key: &[u8], revision: i64) -> Self {
        Self::of(key, CompareTarget::ModRevision(revision))
    }
    /// "`key`'s value is `value`".
    pub fn value(key: &[u8], value: &[u8]) -> Self {
        Self::of(key, CompareTarget::Value(value.to_vec()))
    }
    /// "`key` is attached to lease `lease_id`".
    pub fn lease(key: &[u8], lease_id: i64) -> Self {
        Self::of(key, CompareTarget::Lease(lease_id))
    }
    fn of(key: &[u8], target: CompareTarget) -> Self {
        Self {
            key: key.to_vec(),
            target,
        }
    }
}

/// One operation of a transaction's branch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnOp {
    /// Put `value` at `key`, attached to etcd lease `lease` (0: none). etcd refuses the whole
    /// transaction with "requested lease not found" if the lease does not exist.
    Put {
        /// The key.
        key: Vec<u8>,
        /// The value.
        value: Vec<u8>,
        /// The lease to attach the key to, 0 for none.
        lease: i64,
    },
    /// Read `key`.
    Get {
        /// The key.
        key: Vec<u8>,
    },
    /// Delete `key`, answering with the value it had.
    Delete {
        /// The key.
        key: Vec<u8>,
    },
}

impl TxnOp {
    /// A put of `value` at `key`, attached to `lease` (0: none).
    pub fn put(key: &[u8], value: &[u8], lease: i64) -> Self {
        TxnOp::Put {
            key: key.to_vec(),
            value: value.to_vec(),
            lease,
        }
    }
    /// A read of `key`.
    pub fn get(key: &[u8]) -> Self {
        TxnOp::Get { key: key.to_vec() }
    }
    /// A delete of `key`.
    pub fn delete(key: &[u8]) -> Self {
        TxnOp::Delete { key: key.to_vec() }
    }
}

/// A transaction: if every compare holds, run `success`, else `failure`; atomically, at one
/// revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    /// The compares, all of which must hold.
    pub compares: Vec<Compare>,
    /// Run if every compare holds.
    pub success: Vec<TxnOp>,
    /// Run otherwise.
    pub failure: Vec<TxnOp>,
}

/// What one operation of the branch that ran answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnOpResult {
    /// A put was applied.
    Put,
    /// A get: the key, if it existed.
    Get(Option<EtcdKeyValue>),
    /// A delete: the key it deleted, if it existed.
    Delete(Option<EtcdKeyValue>),
}

/// A transaction's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnReply {
    /// Whether the compares held (so `success` ran).
    pub succeeded: bool,
    /// The cluster revision after the transaction.
    pub revision: i64,
    /// One result per operation of the branch that ran.
    pub results: Vec<TxnOpResult>,
}

impl TxnReply {
    /// The key the last get read, or the last delete deleted, if it existed.
    pub fn last_key(&self) -> Option<&EtcdKeyValue> {
        self.results
            .iter()
            .rev()
            .find_map(|r| match r {
                TxnOpResult::Get(kv) | TxnOpResult::Delete(kv) => Some(kv.as_ref()),
                TxnOpResult::Put => None,
            })
            .flatten()
    }
}

/// A read of the keys in `[key, range_end)` (or only `key` if `range_end` is empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeRequest {
    /// The first key.
    pub key: Vec<u8>,
    /// The first key after the range; empty for `key` alone.
    pub range_end: Vec<u8>,
    /// Most keys answered; 0 for no limit.
    pub limit: i64,
    /// The revision to read at; 0 for the latest.
    pub revision: i64,
}

/// A range read's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeReply {
    /// The keys, in key order.
    pub kvs: Vec<EtcdKeyValue>,
    /// Whether keys beyond the limit remain.
    pub more: bool,
    /// The revision read at.
    pub revision: i64,
}

/// A granted etcd lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseGrant {
    /// Its id.
    pub id: i64,
    /// The TTL etcd granted, in seconds (it may raise the one asked for to its minimum).
    pub ttl_s: i64,
}

/// Why an etcd request failed, by what the caller may assume.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EtcdApiError {
    /// The request named an etcd lease that does not exist (expired or revoked): refused, not
    /// applied.
    #[error("requested lease not found")]
    LeaseNotFound,
    /// etcd refused the request before applying it.
    #[error("refused: {reason}")]
    Refused {
        /// etcd's message.
        reason: String,
    },
    /// etcd refused the credentials.
    #[error("access denied: {reason}")]
    AccessDenied {
        /// etcd's message.
        reason: String,
    },
    /// No answer (the connection failed, a leader change, a timeout): a write may have been
    /// applied.
    #[error("no answer: {reason}")]
    NoAnswer {
        /// What happened.
        reason: String,
    },
    /// No member could be connected to, so the request was never sent: nothing was applied.
    #[error("no member reachable, not sent: {reason}")]
    Unreachable {
        /// What happened.
        reason: String,
    },
    /// A watch's start revision was compacted away; read again and watch from a later one.
    #[error("watch start revision compacted (compaction at revision {compact_revision})")]
    Compacted {
        /// The revision etcd compacted to.
        compact_revision: i64,
    },
}

/// The etcd operations the backend uses. Every future must be bounded by the caller: the
/// backend wraps each in its request timeout on its own clock.
pub trait EtcdApi: Send + Sync + 'static {
    /// Runs a transaction.
    fn txn(&self, txn: Txn) -> impl Future<Output = Result<TxnReply, EtcdApiError>> + Send;

    /// Reads a range of keys.
    fn range(
        &self,
        request: RangeRequest,
    ) -> impl Future<Output = Result<RangeReply, EtcdApiError>> + Send;

    /// Grants a lease of `ttl_s` seconds.
    fn grant(&self, ttl_s: i64) -> impl Future<Output = Result<LeaseGrant, EtcdApiError>> + Send;

    /// One keepalive of `lease_id`, on the lease's keepalive stream (opened if needed):
    /// `Ok(true)` if etcd extended it by its TTL, `Ok(false)` if the lease is gone.
    fn keep_alive(&self, lease_id: i64) -> impl Future<Output = Result<bool, EtcdApiError>> + Send;

    /// Revokes `lease_id`, deleting every key attached to it; a lease already gone is not an
    /// error.
    fn revoke(&self, lease_id: i64) -> impl Future<Output = Result<(), EtcdApiError>> + Send;

    /// The remaining TTL of `lease_id` in whole seconds (etcd truncates), or `None` if it is
    /// gone.
    fn time_to_live(
        &self,
        lease_id: i64,
    ) -> impl Future<Output = Result<Option<i64>, EtcdApiError>> + Send;

    /// Watches `key` from `start_revision` and returns once a delete of it is seen, with the
    /// delete's revision. Never times out by itself (the caller bounds the wait); fails with
    /// [`EtcdApiError::Compacted`] if `start_revision` was compacted away.
    fn watch_delete(
        &self,
        key: &[u8],
        start_revision: i64,
    ) -> impl Future<Output = Result<i64, EtcdApiError>> + Send;
}
