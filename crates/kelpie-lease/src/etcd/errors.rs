//! Turning etcd failures ([`EtcdApiError`]) into [`StoreError`]s, and bounding every request in time.
//!
//! The distinction that matters to callers is whether a failed request may have been applied:
//! a read, or a write etcd refused outright, was not; a write whose reply was lost (a timeout,
//! a dropped connection, a leader change mid-request) may have been, which is
//! [`StoreError::CommitUnknown`].

use std::future::Future;
use std::time::Duration;

use futures_util::future::{select, Either};
use kelpie_core::SharedClock;

use super::api::EtcdApiError;
use crate::error::StoreError;

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
/// `timeout_ms` on `clock`. A real client has its own per-request timeout, but it starts anew
/// on each member a request is passed on to (see `client.rs`), and a simulated request has
/// none. This bound covers the request's every attempt.
pub(super) async fn bounded<T>(
    clock: &SharedClock,
    what: &str,
    effect: Effect,
    timeout_ms: u64,
    request: impl Future<Output = Result<T, EtcdApiError>>,
) -> Result<T, StoreError> {
    match within(clock, timeout_ms, request).await {
        Some(Ok(reply)) => Ok(reply),
        Some(Err(error)) => Err(store_error(what, effect, &error)),
        None => Err(timed_out(what, effect, timeout_ms)),
    }
}

/// `future`'s output, or `None` if `timeout_ms` passed on `clock` first.
pub(super) async fn within<T>(
    clock: &SharedClock,
    timeout_ms: u64,
    future: impl Future<Output = T>,
) -> Option<T> {
    let future = std::pin::pin!(future);
    let sleep = clock.sleep(Duration::from_millis(timeout_ms));
    match select(future, sleep).await {
        Either::Left((output, _)) => Some(output),
        Either::Right(((), _)) => None,
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

/// The [`StoreError`] for a failed etcd request described by `what`.
pub(super) fn store_error(what: &str, effect: Effect, error: &EtcdApiError) -> StoreError {
    let reason = format!("{what}: {error}");
    match (error, effect) {
        (EtcdApiError::AccessDenied { .. }, _) => StoreError::AccessDenied { reason },
        // Refused before it was applied.
        (EtcdApiError::Refused { .. } | EtcdApiError::LeaseNotFound, Effect::Write) => {
            StoreError::WriteFailed { reason }
        }
        (EtcdApiError::NoAnswer { .. }, Effect::Write) => StoreError::CommitUnknown { reason },
        // Never sent (no member could be connected to): nothing was applied, write or not.
        (EtcdApiError::Unreachable { .. }, _) => StoreError::Unavailable { reason },
        (_, _) => StoreError::Unavailable { reason },
    }
}
