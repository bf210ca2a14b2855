//! What a lease is: the record a store keeps, the lease a holder is handed, the requests a node
//! can make, and the validated configuration.

use kelpie_core::limits::{
    LEASE_DURATION_MS_DEFAULT, LEASE_DURATION_MS_MAX, LEASE_DURATION_MS_MIN,
};
use kelpie_core::{ActorId, FencingToken, NodeId};
use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

/// A granted lease, as handed to its holder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The actor the lease is on.
    pub actor_id: ActorId,
    /// The node that holds it.
    pub holder: NodeId,
    /// Strictly greater than the token of every earlier holder of this actor.
    pub fencing_token: FencingToken,
    /// Store time at which this holder first acquired it.
    pub acquired_at_ms: u64,
    /// Store time from which the lease is expired and claimable by anyone.
    pub expires_at_ms: u64,
    /// How many times this holder renewed it.
    pub renewal_count: u64,
}

impl Lease {
    /// Whether the lease is still valid at store time `store_now_ms`.
    pub fn is_valid_at(&self, store_now_ms: u64) -> bool {
        store_now_ms < self.expires_at_ms
    }
}

/// What a store keeps per actor. The record outlives release and expiry so that the next
/// holder's fencing token is always larger than every token issued before.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// The holder, or `None` once released. An expired lease still names its last holder.
    pub holder: Option<NodeId>,
    /// The token of the current (or last) holder; never decreases.
    pub fencing_token: FencingToken,
    /// Store time the current holder acquired the lease.
    pub acquired_at_ms: u64,
    /// Store time the lease expires.
    pub expires_at_ms: u64,
    /// Renewals by the current holder.
    pub renewal_count: u64,
}

impl LeaseRecord {
    /// The lease this record describes, if it names a holder (valid or expired).
    #[inline]
    pub fn lease(&self, actor_id: &ActorId) -> Option<Lease> {
        let holder = self.holder.clone()?;
        Some(Lease {
            actor_id: actor_id.clone(),
            holder,
            fencing_token: self.fencing_token,
            acquired_at_ms: self.acquired_at_ms,
            expires_at_ms: self.expires_at_ms,
            renewal_count: self.renewal_count,
        })
    }

    /// The holder of a lease that is valid at `store_now_ms`, if any.
    #[inline]
    pub fn valid_holder(&self, store_now_ms: u64) -> Option<&NodeId> {
        self.holder
            .as_ref()
            .filter(|_| store_now_ms < self.expires_at_ms)
    }
}

/// The three things a node can ask of a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum LeaseOp {
    /// Take a free or expired lease, or confirm one already held.
    Acquire,
    /// Extend a lease the node holds and that has not expired.
    Renew,
    /// Give up a lease the node holds.
    Release,
}

impl LeaseOp {
    /// Lower-case name for logs and reports.
    pub fn name(self) -> &'static str {
        match self {
            LeaseOp::Acquire => "acquire",
            LeaseOp::Renew => "renew",
            LeaseOp::Release => "release",
        }
    }
}

/// What a fenced request of a round asks ([`LeaseManager::fenced_round`]).
///
/// [`LeaseManager::fenced_round`]: crate::LeaseManager::fenced_round
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FencedOp {
    /// [`LeaseManager::renew_fenced`](crate::LeaseManager::renew_fenced).
    Renew,
    /// [`LeaseManager::release_fenced`](crate::LeaseManager::release_fenced).
    Release,
}

impl From<FencedOp> for LeaseOp {
    fn from(op: FencedOp) -> Self {
        match op {
            FencedOp::Renew => LeaseOp::Renew,
            FencedOp::Release => LeaseOp::Release,
        }
    }
}

/// One request of a round ([`LeaseManager::fenced_round`]): renew or release the caller's
/// lease on `actor_id` only if it still carries `fencing_token`.
///
/// [`LeaseManager::fenced_round`]: crate::LeaseManager::fenced_round
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FencedRequest {
    /// Renew or release.
    pub op: FencedOp,
    /// The actor.
    pub actor_id: ActorId,
    /// The token the caller believes it holds.
    pub fencing_token: FencingToken,
}

/// A node's request, as it reaches the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRequest {
    /// What is asked.
    pub op: LeaseOp,
    /// Who asks.
    pub node_id: NodeId,
    /// How long a granted or renewed lease lasts, on the store's clock: within
    /// [`LEASE_DURATION_MS_MIN`]..=[`LEASE_DURATION_MS_MAX`], as a [`LeaseConfig`] holds it
    /// (the managers build every request from theirs). [`decide`](crate::backend::decide)
    /// panics on a zero duration or one that overflows store time: a request built by hand
    /// for a store must take its duration from a `LeaseConfig`.
    pub lease_duration_ms: u64,
    /// For renew and release: the token the caller believes it holds. The store refuses if
    /// the record carries another token, so a delayed or duplicated request from an earlier
    /// tenure can never extend or free a later one.
    pub fencing_token: Option<FencingToken>,
}

impl LeaseRequest {
    /// A request without a token guard.
    pub fn new(op: LeaseOp, node_id: NodeId, lease_duration_ms: u64) -> Self {
        Self {
            op,
            node_id,
            lease_duration_ms,
            fencing_token: None,
        }
    }
}

/// Validated lease settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct LeaseConfig {
    /// Lease length on the store's clock, within
    /// [`LEASE_DURATION_MS_MIN`]..=[`LEASE_DURATION_MS_MAX`].
    pub lease_duration_ms: u64,
}

impl LeaseConfig {
    /// A configuration with the given duration, refused if out of range.
    pub fn new(lease_duration_ms: u64) -> Result<Self, ConfigError> {
        if !(LEASE_DURATION_MS_MIN..=LEASE_DURATION_MS_MAX).contains(&lease_duration_ms) {
            return Err(ConfigError::LeaseDurationOutOfRange {
                lease_duration_ms,
                min_ms: LEASE_DURATION_MS_MIN,
                max_ms: LEASE_DURATION_MS_MAX,
            });
        }
        Ok(Self { lease_duration_ms })
    }
}

impl Default for LeaseConfig {
    fn default() -> Self {
        Self {
            lease_duration_ms: LEASE_DURATION_MS_DEFAULT,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_refuses_out_of_range_durations() {
        assert!(LeaseConfig::new(LEASE_DURATION_MS_MIN).is_ok());
        assert!(LeaseConfig::new(LEASE_DURATION_MS_MAX).is_ok());
        let err = LeaseConfig::new(LEASE_DURATION_MS_MIN - 1).unwrap_err();
        assert!(err.to_string().contains("99"), "{err}");
        assert!(LeaseConfig::new(LEASE_DURATION_MS_MAX + 1).is_err());
        assert!(LeaseConfig::new(0).is_err());
    }
}
