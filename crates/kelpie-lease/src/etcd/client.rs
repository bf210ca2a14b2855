//! [`EtcdApi`] over a real cluster, with the `etcd-client` crate (feature `etcd`).

use std::collections::BTreeMap;
use std::sync::Mutex;

use etcd_client::{
    Client, Compare as ClientCompare, CompareOp, EventType, GetOptions, KeyValue, LeaseClient,
    LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn as ClientTxn, TxnOp as ClientTxnOp,
    TxnOpResponse, WatchFilterType, WatchOptions,
};

use super::api::{
    CompareTarget, EtcdApi, EtcdApiError, EtcdKeyValue, LeaseGrant, RangeReply, RangeRequest, Txn,
    TxnOp, TxnOpResult, TxnReply,
};

// gRPC status codes (https://grpc.github.io/grpc/core/md_doc_statuscodes.html), read as numbers
// so that this crate need not depend on tonic directly.
const GRPC_INVALID_ARGUMENT: i32 = 3;
const GRPC_NOT_FOUND: i32 = 5;
const GRPC_ALREADY_EXISTS: i32 = 6;
const GRPC_PERMISSION_DENIED: i32 = 7;
const GRPC_RESOURCE_EXHAUSTED: i32 = 8;
const GRPC_FAILED_PRECONDITION: i32 = 9;
const GRPC_OUT_OF_RANGE: i32 = 11;
const GRPC_UNIMPLEMENTED: i32 = 12;
const GRPC_UNAUTHENTICATED: i32 = 16;

/// The message etcd answers with when a request names a lease that is gone (expired or
/// revoked).
const LEASE_NOT_FOUND: &str = "requested lease not found";

/// Fragments of etcd's messages about credentials, which it sends with several status codes
/// ("authentication failed, invalid user ID or password" and "user name is empty" as
/// InvalidArgument, "authentication is not enabled" as FailedPrecondition, ...).
const CREDENTIAL_MESSAGES: [&str; 4] = [
    "authentication",
    "user name",
    "invalid auth token",
    "permission denied",
];

/// A lease's open keepalive stream.
type KeepAliveStream = (LeaseKeeper, LeaseKeepAliveStream);

/// A real etcd cluster, through `etcd-client`.
pub struct EtcdClient {
    client: Client,
    /// One keepalive stream per lease kept alive, reused across keepalives (etcd's clients
    /// keep one stream open per lease).
    streams: Mutex<BTreeMap<i64, KeepAliveStream>>,
}

impl EtcdClient {
    /// Wraps a connected client.
    pub fn new(client: Client) -> Self {
        Self {
            client,
            streams: Mutex::new(BTreeMap::new()),
        }
    }

    fn take_stream(&self, lease_id: i64) -> Option<KeepAliveStream> {
        self.streams_map().remove(&lease_id)
    }

    fn streams_map(&self) -> std::sync::MutexGuard<'_, BTreeMap<i64, KeepAliveStream>> {
        self.streams
            .lock()
            .expect("keepalive stream map poisoned by a panic")
    }
}

impl std::fmt::Debug for EtcdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdClient").finish_non_exhaustive()
    }
}

/// The [`EtcdApiError`] for an `etcd-client` error.
pub(super) fn classify(error: &etcd_client::Error) -> EtcdApiError {
    let reason = error.to_string();
    let status = match error {
        etcd_client::Error::GRpcStatus(status) => status,
        etcd_client::Error::LeaseKeepAliveError(message) if message.contains("lease not found") => {
            return EtcdApiError::LeaseNotFound
        }
        etcd_client::Error::InvalidArgs(_) | etcd_client::Error::InvalidUri(_) => {
            return EtcdApiError::Refused { reason }
        }
        // Transport and I/O errors: the connection failed, possibly after the request left.
        _ => return EtcdApiError::NoAnswer { reason },
    };
    let message = status.message();
    let code = i32::from(status.code());
    if code == GRPC_NOT_FOUND && message.contains(LEASE_NOT_FOUND) {
        return EtcdApiError::LeaseNotFound;
    }
    let about_credentials = CREDENTIAL_MESSAGES.iter().any(|m| message.contains(m));
    match code {
        GRPC_UNAUTHENTICATED | GRPC_PERMISSION_DENIED => EtcdApiError::AccessDenied { reason },
        _ if about_credentials => EtcdApiError::AccessDenied { reason },
        // etcd refused the request before applying it.
        GRPC_INVALID_ARGUMENT
        | GRPC_NOT_FOUND
        | GRPC_ALREADY_EXISTS
        | GRPC_RESOURCE_EXHAUSTED
        | GRPC_FAILED_PRECONDITION
        | GRPC_OUT_OF_RANGE
        | GRPC_UNIMPLEMENTED => EtcdApiError::Refused { reason },
        // Unavailable, DeadlineExceeded, Unknown, Internal, Aborted, Cancelled: etcd says
        // "request timed out", "leader changed" or the stream broke; a write may have
        // committed.
        _ => EtcdApiError::NoAnswer { reason },
    }
}

fn key_value(kv: &KeyValue) -> EtcdKeyValue {
    EtcdKeyValue {
        key: kv.key().to_vec(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        version: kv.version(),
        lease: kv.lease(),
    }
}

fn client_compare(compare: &super::api::Compare) -> ClientCompare {
    let key = compare.key.as_slice();
    match &compare.target {
        CompareTarget::Version(v) => ClientCompare::version(key, CompareOp::Equal, *v),
        CompareTarget::CreateRevision(r) => {
            ClientCompare::create_revision(key, CompareOp::Equal, *r)
        }
        CompareTarget::ModRevision(r) => ClientCompare::mod_revision(key, CompareOp::Equal, *r),
        CompareTarget::Value(v) => ClientCompare::value(key, CompareOp::Equal, v.as_slice()),
        CompareTarget::Lease(l) => ClientCompare::lease(key, CompareOp::Equal, *l),
    }
}

fn client_op(op: &TxnOp) -> ClientTxnOp {
    match op {
        TxnOp::Put { key, value, lease } => {
            let options = (*lease != 0).then(|| PutOptions::new().with_lease(*lease));
            ClientTxnOp::put(key.as_slice(), value.as_slice(), options)
        }
        TxnOp::Get { key } => ClientTxnOp::get(key.as_slice(), None),
        TxnOp::Delete { key } => ClientTxnOp::delete(
            key.as_slice(),
            Some(etcd_client::DeleteOptions::new().with_prev_key()),
        ),
    }
}

impl EtcdApi for EtcdClient {
    async fn txn(&self, txn: Txn) -> Result<TxnReply, EtcdApiError> {
        let request = ClientTxn::new()
            .when(txn.compares.iter().map(client_compare).collect::<Vec<_>>())
            .and_then(txn.success.iter().map(client_op).collect::<Vec<_>>())
            .or_else(txn.failure.iter().map(client_op).collect::<Vec<_>>());
        let reply = self
            .client
            .kv_client()
            .txn(request)
            .await
            .map_err(|e| classify(&e))?;
        let results = reply
            .op_responses()
            .into_iter()
            .map(|op| match op {
                TxnOpResponse::Put(_) => TxnOpResult::Put,
                TxnOpResponse::Get(get) => TxnOpResult::Get(get.kvs().first().map(key_value)),
                TxnOpResponse::Delete(delete) => {
                    TxnOpResult::Delete(delete.prev_kvs().first().map(key_value))
                }
                TxnOpResponse::Txn(_) => TxnOpResult::Put,
            })
            .collect();
        Ok(TxnReply {
            succeeded: reply.succeeded(),
            revision: reply.header().map_or(0, |h| h.revision()),
            results,
        })
    }

    async fn range(&self, request: RangeRequest) -> Result<RangeReply, EtcdApiError> {
        let mut options = GetOptions::new().with_revision(request.revision);
        if !request.range_end.is_empty() {
            options = options.with_range(request.range_end);
        }
        if request.limit > 0 {
            options = options.with_limit(request.limit);
        }
        let reply = self
            .client
            .kv_client()
            .get(request.key, Some(options))
            .await
            .map_err(|e| classify(&e))?;
        Ok(RangeReply {
            kvs: reply.kvs().iter().map(key_value).collect(),
            more: reply.more(),
            revision: reply.header().map_or(0, |h| h.revision()),
        })
    }

    async fn grant(&self, ttl_s: i64) -> Result<LeaseGrant, EtcdApiError> {
        let reply = self
            .client
            .lease_client()
            .grant(ttl_s, None)
            .await
            .map_err(|e| classify(&e))?;
        if !reply.error().is_empty() {
            let reason = format!("granting a lease: {}", reply.error());
            return Err(EtcdApiError::Refused { reason });
        }
        Ok(LeaseGrant {
            id: reply.id(),
            ttl_s: reply.ttl(),
        })
    }

    async fn keep_alive(&self, lease_id: i64) -> Result<bool, EtcdApiError> {
        if let Some((mut keeper, mut responses)) = self.take_stream(lease_id) {
            let exchange = async {
                keeper.keep_alive().await?;
                responses.message().await
            };
            if let Ok(Some(response)) = exchange.await {
                if response.ttl() > 0 {
                    self.streams_map().insert(lease_id, (keeper, responses));
                    return Ok(true);
                }
                return Ok(false);
            }
            // The stream closed or failed (a leader change, a restarted member). A late answer
            // on it would be taken for the next request's, so it is dropped and a new one
            // opened, which sends a keepalive of its own.
        }
        let mut lease: LeaseClient = self.client.lease_client();
        match lease.keep_alive(lease_id).await {
            Ok(opened) => {
                // Opening the stream sent a keepalive and read its answer (a lease that is gone
                // fails the open with "lease not found").
                self.streams_map().insert(lease_id, opened);
                Ok(true)
            }
            Err(error) => match classify(&error) {
                EtcdApiError::LeaseNotFound => Ok(false),
                other => Err(other),
            },
        }
    }

    async fn revoke(&self, lease_id: i64) -> Result<(), EtcdApiError> {
        self.streams_map().remove(&lease_id);
        match self.client.lease_client().revoke(lease_id).await {
            Ok(_) => Ok(()),
            Err(error) => match classify(&error) {
                EtcdApiError::LeaseNotFound => Ok(()),
                other => Err(other),
            },
        }
    }

    async fn time_to_live(&self, lease_id: i64) -> Result<Option<i64>, EtcdApiError> {
        let reply = self
            .client
            .lease_client()
            .time_to_live(lease_id, None)
            .await
            .map_err(|e| classify(&e))?;
        Ok((reply.ttl() >= 0).then_some(reply.ttl()))
    }

    async fn watch_delete(&self, key: &[u8], start_revision: i64) -> Result<i64, EtcdApiError> {
        let options = WatchOptions::new()
            .with_start_revision(start_revision)
            .with_filters([WatchFilterType::NoPut]);
        let mut stream = self
            .client
            .watch_client()
            .watch(key, Some(options))
            .await
            .map_err(|e| classify(&e))?;
        loop {
            let Some(response) = stream.message().await.map_err(|e| classify(&e))? else {
                let reason = "the watch stream closed".to_string();
                return Err(EtcdApiError::NoAnswer { reason });
            };
            if response.canceled() {
                let compact_revision = response.compact_revision();
                if compact_revision > 0 {
                    return Err(EtcdApiError::Compacted { compact_revision });
                }
                let reason = format!("watch canceled: {:?}", response.cancel_reason());
                return Err(EtcdApiError::NoAnswer { reason });
            }
            let deleted = response
                .events()
                .iter()
                .find(|e| e.event_type() == EventType::Delete);
            if let Some(event) = deleted {
                return Ok(event.kv().map_or(0, |kv| kv.mod_revision()));
            }
        }
    }
}
