//! Turning etcd client failures into [`StoreError`]s, and bounding every request in time.
//!
//! The distinction that matters to callers is whether a failed request may have been applied:
//! a read, or a write etcd refused outright, was not; a write whose reply was lost (a timeout,
//! a dropped connection, a leader change mid-request) may have been, which is
//! [`StoreError::CommitUnknown`].

use std::future::Future;
use std::time::Duration;

use crate::error::StoreError;

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

/// Whether a request can have changed etcd's state, which decides how its failure is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Effect {
    /// A read, or a write to etcd state no other party relies on (granting or keeping alive a
    /// session): its failure is [`StoreError::Unavailable`].
    ReadOnly,
    /// A write to a lease key: a lost reply is [`StoreError::CommitUnknown`].
    Write,
}

/// Runs `request`, failing it with a timeout error if etcd has not answered within
/// `timeout_ms`. The client has its own per-request timeout, but a balanced channel with no
/// reachable endpoint can wait for one indefinitely before that timer starts.
pub(super) async fn bounded<T>(
    what: &str,
    effect: Effect,
    timeout_ms: u64,
    request: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(Duration::from_millis(timeout_ms), request).await {
        Ok(Ok(reply)) => Ok(reply),
        Ok(Err(error)) => Err(store_error(what, effect, &error)),
        Err(_elapsed) => Err(timed_out(what, effect, timeout_ms)),
    }
}

/// The error for a request etcd did not answer within `timeout_ms`.
pub(super) fn timed_out(what: &str, effect: Effect, timeout_ms: u64) -> StoreError {
    let reason = format!("etcd did not answer {what} within {timeout_ms} ms");
    match effect {
        Effect::ReadOnly => StoreError::Unavailable { reason },
        Effect::Write => StoreError::CommitUnknown { reason },
    }
}

/// The [`StoreError`] for an etcd client error on the request described by `what`.
pub(super) fn store_error(what: &str, effect: Effect, error: &etcd_client::Error) -> StoreError {
    let reason = format!("{what}: {error}");
    let etcd_client::Error::GRpcStatus(status) = error else {
        // Transport and I/O errors: the connection failed, possibly after the request left.
        return match effect {
            Effect::ReadOnly => StoreError::Unavailable { reason },
            Effect::Write => StoreError::CommitUnknown { reason },
        };
    };
    let message = status.message();
    let about_credentials = CREDENTIAL_MESSAGES.iter().any(|m| message.contains(m));
    match i32::from(status.code()) {
        GRPC_UNAUTHENTICATED | GRPC_PERMISSION_DENIED => StoreError::AccessDenied { reason },
        _ if about_credentials => StoreError::AccessDenied { reason },
        // etcd refused the request before applying it.
        GRPC_INVALID_ARGUMENT
        | GRPC_NOT_FOUND
        | GRPC_ALREADY_EXISTS
        | GRPC_RESOURCE_EXHAUSTED
        | GRPC_FAILED_PRECONDITION
        | GRPC_OUT_OF_RANGE
        | GRPC_UNIMPLEMENTED
            if effect == Effect::Write =>
        {
            StoreError::WriteFailed { reason }
        }
        _ if effect == Effect::ReadOnly => StoreError::Unavailable { reason },
        // Unavailable, DeadlineExceeded, Unknown, Internal, Aborted, Cancelled: etcd says
        // "request timed out", "leader changed" or the stream broke; the write may have
        // committed.
        _ => StoreError::CommitUnknown { reason },
    }
}

/// Whether etcd refused a request because the lease it named is gone: the node's session
/// expired (or was revoked) between being checked and being used.
pub(super) fn is_lease_not_found(error: &etcd_client::Error) -> bool {
    match error {
        etcd_client::Error::GRpcStatus(status) => {
            i32::from(status.code()) == GRPC_NOT_FOUND && status.message().contains(LEASE_NOT_FOUND)
        }
        etcd_client::Error::LeaseKeepAliveError(message) => message.contains("lease not found"),
        _ => false,
    }
}
