//! [`EtcdApi`] over a real cluster, with the `etcd-client` crate (feature `etcd`).
//!
//! # One member at a time, and failover
//!
//! `etcd-client` spreads requests over the endpoints it is given with one balanced channel, and
//! a member it cannot connect to stays in the balance: every request the balancer hands to a
//! down member fails ("tcp connect error"), about half of them with one member of two down.
//! [`EtcdClient`] instead keeps one `etcd-client` client per endpoint, each with a channel of
//! its own, and sends every request to one member, the *preferred* one. A request that fails
//! before it was sent (tonic could not connect to the member: TCP, TLS handshake or connect
//! timeout, see [`never_sent`]) is sent again to the next member, each member tried at most
//! once per request; this is safe for writes too, since etcd never saw the first attempt. Any
//! other failure is returned as it is (a write whose connection broke after it left may have
//! been applied, and retrying it here would hide that), but a member that gave no answer
//! (its connection broke, it said it has no leader, or the caller stopped waiting for it)
//! stops being the preferred one, so the next request goes to the next member. The whole
//! failover stays inside the caller's request timeout, which bounds every request of the
//! backend (`errors::bounded`); the tonic connect timeout of each member is a share of the
//! connect timeout, so that one pass over every member fits in it (see
//! `EtcdOptions::client_options`).
//!
//! A process starts at a member chosen by its process id, so that a fleet's processes spread
//! over the cluster's members; each then stays on its member while the member answers, as
//! etcd's own clients did before 3.4 (etcd forwards writes to its leader whichever member
//! receives them).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use etcd_client::{
    Client, Compare as ClientCompare, CompareOp, ConnectOptions, EventType, GetOptions, KeyValue,
    LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn as ClientTxn, TxnOp as ClientTxnOp,
    TxnOpResponse, WatchFilterType, WatchOptions,
};
use tokio::sync::OnceCell;

use super::api::{
    CompareTarget, EtcdApi, EtcdApiError, EtcdKeyValue, LeaseGrant, RangeReply, RangeRequest, Txn,
    TxnOp, TxnOpResult, TxnReply,
};

// gRPC status codes (https://grpc.github.io/grpc/core/md_doc_statuscodes.html), read as numbers
// so that this module need not name tonic's `Code` (tonic is a dependency only to recognise a
// connect failure, see `never_sent`).
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

/// Most errors looked at in an error's chain of sources when looking for a connect failure; the
/// chains tonic builds are three or four deep.
const ERROR_SOURCES_MAX: usize = 16;

/// A lease's open keepalive stream, and the member it is open to.
struct KeepAliveStream {
    member: usize,
    keeper: LeaseKeeper,
    responses: LeaseKeepAliveStream,
}

/// One member of the cluster: its endpoint and the client for it alone, built on first use
/// (building one authenticates when credentials are set, which needs the member to answer).
struct Member {
    endpoint: String,
    client: OnceCell<Client>,
}

/// A real etcd cluster, through `etcd-client`: one client per member, requests to one member
/// at a time, moving on to the next member when one cannot be reached (see the module
/// documentation).
pub struct EtcdClient {
    members: Vec<Member>,
    /// The options every member's client is built with.
    options: ConnectOptions,
    /// The index of the member requests go to first.
    preferred: AtomicUsize,
    /// One keepalive stream per lease kept alive, reused across keepalives (etcd's clients
    /// keep one stream open per lease).
    streams: Mutex<BTreeMap<i64, KeepAliveStream>>,
}

impl EtcdClient {
    /// A client for the members at `endpoints`, each reached with `options`. Every endpoint's
    /// client is built here without credentials, which contacts nothing and refuses a malformed
    /// endpoint at once; without credentials that client is the member's. With credentials a
    /// member's client is built on its first request, since building it authenticates.
    pub(super) async fn connect(
        endpoints: &[String],
        options: ConnectOptions,
        anonymous: ConnectOptions,
        authenticates: bool,
    ) -> Result<Self, etcd_client::Error> {
        assert!(
            !endpoints.is_empty(),
            "options are validated before connecting"
        );
        let mut members = Vec::with_capacity(endpoints.len());
        for endpoint in endpoints {
            let checked = Client::connect([endpoint.as_str()], Some(anonymous.clone())).await?;
            let client = match authenticates {
                true => OnceCell::new(),
                false => OnceCell::new_with(Some(checked)),
            };
            members.push(Member {
                endpoint: endpoint.clone(),
                client,
            });
        }
        let first = usize::try_from(std::process::id()).unwrap_or(0) % members.len();
        Ok(Self {
            members,
            options,
            preferred: AtomicUsize::new(first),
            streams: Mutex::new(BTreeMap::new()),
        })
    }

    /// The endpoint requests go to first now: the last member that answered, or the next one
    /// after the last that did not.
    pub fn preferred_endpoint(&self) -> &str {
        &self.members[self.preferred.load(Ordering::Relaxed)].endpoint
    }

    /// The client of member `index`, built if it was not yet.
    async fn member(&self, index: usize) -> Result<Client, etcd_client::Error> {
        let member = &self.members[index];
        // Boxed, as is each request in `call`: `etcd-client`'s futures take kilobytes each, and
        // held inline they made every request's future (and those of the lease session and
        // keeper awaiting it) large enough to overflow a tokio worker's stack in debug builds.
        let building = || {
            Box::pin(Client::connect(
                [member.endpoint.as_str()],
                Some(self.options.clone()),
            ))
        };
        member.client.get_or_try_init(building).await.cloned()
    }

    /// Makes the member after `index` the preferred one, if `index` still is (a concurrent
    /// request may have moved on already, and must not make this one skip a member).
    fn move_off(&self, index: usize) {
        let next = (index + 1) % self.members.len();
        let _ =
            (self.preferred).compare_exchange(index, next, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Sends `request` to the preferred member, and to each following member in turn while the
    /// attempts fail before being sent (see [`never_sent`]); each member is tried at most once.
    /// Returns the answer and the index of the member that gave it, or the last attempt's error.
    async fn call<T, F, R>(&self, mut request: F) -> Result<(usize, T), etcd_client::Error>
    where
        F: FnMut(Client) -> R,
        R: Future<Output = Result<T, etcd_client::Error>>,
    {
        let first = self.preferred.load(Ordering::Relaxed);
        let count = self.members.len();
        let mut unsent = None;
        for step in 0..count {
            let index = (first + step) % count;
            let attempt = Attempt::start(self, index);
            let answer = match Box::pin(self.member(index)).await {
                Ok(client) => Box::pin(request(client)).await,
                Err(error) => Err(error),
            };
            attempt.finish(answer.as_ref().err());
            match answer {
                Ok(reply) => return Ok((index, reply)),
                Err(error) if never_sent(&error) => unsent = Some(error),
                Err(error) => return Err(error),
            }
        }
        Err(unsent.expect("a cluster has at least one member, and each failure is kept"))
    }

    fn streams_map(&self) -> std::sync::MutexGuard<'_, BTreeMap<i64, KeepAliveStream>> {
        self.streams
            .lock()
            .expect("keepalive stream map poisoned by a panic")
    }
}

/// One request's attempt on a member. If the attempt is dropped before it finished (the
/// caller's timeout ran out while the member said nothing, as a stopped or cut-off member
/// does), or it finished without an answer, the member stops being the preferred one; without
/// this a silent member would keep every later request waiting until its timeout too.
struct Attempt<'a> {
    client: &'a EtcdClient,
    member: usize,
    finished: bool,
}

impl<'a> Attempt<'a> {
    fn start(client: &'a EtcdClient, member: usize) -> Self {
        Self {
            client,
            member,
            finished: false,
        }
    }

    /// The attempt ended, with `error` if it failed.
    fn finish(mut self, error: Option<&etcd_client::Error>) {
        self.finished = true;
        if error.is_some_and(|e| matches!(classify(e), EtcdApiError::NoAnswer { .. })) {
            self.client.move_off(self.member);
        }
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.client.move_off(self.member);
        }
    }
}

impl std::fmt::Debug for EtcdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let endpoints: Vec<&str> = self.members.iter().map(|m| m.endpoint.as_str()).collect();
        f.debug_struct("EtcdClient")
            .field("endpoints", &endpoints)
            .field("preferred", &self.preferred_endpoint())
            .finish_non_exhaustive()
    }
}

/// Whether `error` proves that the request was never sent: tonic failed to connect to the
/// member (the TCP connect, the TLS handshake, or the connect timeout), which it reports as a
/// `tonic::ConnectError` among the error's sources. A request fails so only before tonic hands
/// it to a connection: once a connection exists, its failures are hyper's and h2's errors,
/// after which the request may have reached etcd. Only these failures are retried on another
/// member.
fn never_sent(error: &etcd_client::Error) -> bool {
    let error: &(dyn std::error::Error + 'static) = match error {
        etcd_client::Error::GRpcStatus(status) => status_error(status),
        etcd_client::Error::TransportError(transport) => transport,
        _ => return false,
    };
    std::iter::successors(Some(error), |e| e.source())
        .take(ERROR_SOURCES_MAX)
        .any(|e| e.is::<tonic::ConnectError>())
}

/// `status` as an error. Naming tonic's `Status` here ties the `tonic` this crate depends on to
/// the one `etcd-client` uses: were they different versions, this would not compile, rather
/// than `never_sent` silently never recognising a connect failure.
fn status_error(status: &tonic::Status) -> &(dyn std::error::Error + 'static) {
    status
}

/// The [`EtcdApiError`] for the error [`EtcdClient::call`] ended with. It returns a failure
/// that proves the request was never sent ([`never_sent`]) only once every member failed so,
/// so the request reached no member and nothing was applied: [`EtcdApiError::Unreachable`],
/// which the backend reports as unavailable even for a write, not as an unknown outcome.
fn classify_call(error: &etcd_client::Error) -> EtcdApiError {
    match never_sent(error) {
        true => EtcdApiError::Unreachable {
            reason: error.to_string(),
        },
        false => classify(error),
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
        let sending = |client: Client| {
            let request = ClientTxn::new()
                .when(txn.compares.iter().map(client_compare).collect::<Vec<_>>())
                .and_then(txn.success.iter().map(client_op).collect::<Vec<_>>())
                .or_else(txn.failure.iter().map(client_op).collect::<Vec<_>>());
            async move { client.kv_client().txn(request).await }
        };
        let (_, reply) = self.call(sending).await.map_err(|e| classify_call(&e))?;
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
            options = options.with_range(request.range_end.clone());
        }
        if request.limit > 0 {
            options = options.with_limit(request.limit);
        }
        let sending = |client: Client| {
            let (key, options) = (request.key.clone(), options.clone());
            async move { client.kv_client().get(key, Some(options)).await }
        };
        let (_, reply) = self.call(sending).await.map_err(|e| classify_call(&e))?;
        Ok(RangeReply {
            kvs: reply.kvs().iter().map(key_value).collect(),
            more: reply.more(),
            revision: reply.header().map_or(0, |h| h.revision()),
        })
    }

    async fn grant(&self, ttl_s: i64) -> Result<LeaseGrant, EtcdApiError> {
        let sending =
            |client: Client| async move { client.lease_client().grant(ttl_s, None).await };
        let (_, reply) = self.call(sending).await.map_err(|e| classify_call(&e))?;
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
        let open = self.streams_map().remove(&lease_id);
        if let Some(mut stream) = open {
            let attempt = Attempt::start(self, stream.member);
            let exchange = async {
                stream.keeper.keep_alive().await?;
                stream.responses.message().await
            };
            let answer = exchange.await;
            attempt.finish(answer.as_ref().err());
            if let Ok(Some(response)) = answer {
                if response.ttl() > 0 {
                    self.streams_map().insert(lease_id, stream);
                    return Ok(true);
                }
                return Ok(false);
            }
            // The stream closed or failed (a leader change, a restarted member). A late answer
            // on it would be taken for the next request's, so it is dropped and a new one
            // opened, which sends a keepalive of its own.
        }
        let opening =
            |client: Client| async move { client.lease_client().keep_alive(lease_id).await };
        match self.call(opening).await {
            Ok((member, (keeper, responses))) => {
                // Opening the stream sent a keepalive and read its answer (a lease that is gone
                // fails the open with "lease not found").
                let stream = KeepAliveStream {
                    member,
                    keeper,
                    responses,
                };
                self.streams_map().insert(lease_id, stream);
                Ok(true)
            }
            Err(error) => match classify_call(&error) {
                EtcdApiError::LeaseNotFound => Ok(false),
                other => Err(other),
            },
        }
    }

    async fn revoke(&self, lease_id: i64) -> Result<(), EtcdApiError> {
        self.streams_map().remove(&lease_id);
        let sending = |client: Client| async move { client.lease_client().revoke(lease_id).await };
        match self.call(sending).await {
            Ok(_) => Ok(()),
            Err(error) => match classify_call(&error) {
                EtcdApiError::LeaseNotFound => Ok(()),
                other => Err(other),
            },
        }
    }

    async fn time_to_live(&self, lease_id: i64) -> Result<Option<i64>, EtcdApiError> {
        let sending = |client: Client| async move {
            client.lease_client().time_to_live(lease_id, None).await
        };
        let (_, reply) = self.call(sending).await.map_err(|e| classify_call(&e))?;
        Ok((reply.ttl() >= 0).then_some(reply.ttl()))
    }

    async fn watch_delete(&self, key: &[u8], start_revision: i64) -> Result<i64, EtcdApiError> {
        let options = WatchOptions::new()
            .with_start_revision(start_revision)
            .with_filters([WatchFilterType::NoPut]);
        let opening = |client: Client| {
            let (key, options) = (key.to_vec(), options.clone());
            async move { client.watch_client().watch(key, Some(options)).await }
        };
        let (member, mut stream) = self.call(opening).await.map_err(|e| classify_call(&e))?;
        // Waiting on the watch is not an attempt: the caller stops waiting whenever it likes,
        // which says nothing about the member. A stream that breaks does.
        loop {
            let message = stream.message().await.map_err(|error| {
                self.move_off(member);
                classify(&error)
            })?;
            let Some(response) = message else {
                self.move_off(member);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A failed connection attempt, as tonic's connector reports it.
    fn connect_error() -> tonic::ConnectError {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        tonic::ConnectError(Box::new(refused))
    }

    #[test]
    fn only_a_failed_connection_attempt_counts_as_never_sent() {
        // tonic turns a request's failure into a status keeping the failure as its source.
        let refused = tonic::Status::from_error(Box::new(connect_error()));
        assert!(never_sent(&etcd_client::Error::GRpcStatus(refused)));
        // The same code and message without the connect failure behind it: etcd said it, or a
        // connection broke after the request left. Either may have been applied.
        let unavailable = tonic::Status::unavailable("tcp connect error");
        assert!(!never_sent(&etcd_client::Error::GRpcStatus(unavailable)));
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        let broken = tonic::Status::from_error(Box::new(reset));
        assert!(!never_sent(&etcd_client::Error::GRpcStatus(broken)));
        let timed_out = tonic::Status::deadline_exceeded("request timed out");
        assert!(!never_sent(&etcd_client::Error::GRpcStatus(timed_out)));
        assert!(!never_sent(&etcd_client::Error::LeaseKeepAliveError(
            "stream closed".to_string()
        )));
    }
}
