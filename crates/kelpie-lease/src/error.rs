//! Errors handed to callers. Impossible states are assertions, not variants.

use kelpie_core::{ActorId, NodeId};

/// Why a lease operation was refused or could not complete.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LeaseError {
    /// Another node holds a valid lease on the actor.
    #[error("lease on {actor_id} is held by {holder} until store time {expires_at_ms} ms")]
    HeldByOther {
        /// The actor asked for.
        actor_id: ActorId,
        /// Its current holder.
        holder: NodeId,
        /// When the holder's lease expires on the store's clock.
        expires_at_ms: u64,
    },
    /// The caller asked to renew or release a lease it does not hold.
    #[error("{}", not_holder_message(.actor_id, .node_id, .holder))]
    NotHolder {
        /// The actor asked for.
        actor_id: ActorId,
        /// The caller.
        node_id: NodeId,
        /// Who holds it instead, if anyone.
        holder: Option<NodeId>,
    },
    /// The caller's lease expired before the renewal reached the store.
    #[error("lease on {actor_id} held by {node_id} expired at store time {expired_at_ms} ms")]
    Expired {
        /// The actor asked for.
        actor_id: ActorId,
        /// The caller, its last holder.
        node_id: NodeId,
        /// When it expired on the store's clock.
        expired_at_ms: u64,
    },
    /// The store failed; see [`StoreError`] for whether the operation may have been applied.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// "`n1` does not hold the lease (holder: `n2`)"; when the holder is the caller's own node id
/// (on etcd, where a lease belongs to the session of the process that acquired it: another
/// process of the node, or an earlier session), it says so instead of naming the caller as
/// both.
fn not_holder_message(actor_id: &ActorId, node_id: &NodeId, holder: &Option<NodeId>) -> String {
    match holder {
        Some(holder) if holder == node_id => format!(
            "the lease on {actor_id} is held by {node_id} through another session (another \
             process of {node_id}, or an earlier session), not this one"
        ),
        Some(holder) => {
            format!("{node_id} does not hold the lease on {actor_id} (holder: {holder})")
        }
        None => format!("{node_id} does not hold the lease on {actor_id} (holder: none)"),
    }
}

impl LeaseError {
    /// Whether the store refused on the protocol's terms (as opposed to failing).
    pub fn is_refusal(&self) -> bool {
        !matches!(self, LeaseError::Store(_))
    }
}

/// A store failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store could not be reached or is not running; nothing was applied.
    #[error("lease store unavailable: {reason}")]
    Unavailable {
        /// What failed.
        reason: String,
    },
    /// The write failed and was not applied.
    #[error("lease store write failed, not applied: {reason}")]
    WriteFailed {
        /// What failed.
        reason: String,
    },
    /// The write may or may not have been applied: the reply was lost. Retrying an acquire is
    /// safe, because acquiring a lease the caller already holds is idempotent.
    #[error("lease store outcome unknown, the write may have been applied: {reason}")]
    CommitUnknown {
        /// What failed.
        reason: String,
    },
    /// Optimistic concurrency retries ran out ([`crate::limits::STORE_CONFLICT_RETRIES_MAX`]).
    #[error("lease store contention: gave up after {attempts} conflicting attempts")]
    Contention {
        /// How many attempts were made.
        attempts: u32,
    },
    /// The store's data is not what this version of Kelpie wrote.
    #[error("store {location} is corrupt or not ours: {reason}")]
    Corrupt {
        /// The file or key at fault.
        location: String,
        /// What was wrong.
        reason: String,
    },
    /// The store's file could not be opened or created: the path is a directory, its parent
    /// is missing or read-only, the file is read-only for this process, or the file system
    /// refused. Nothing was written.
    #[error("cannot open {store} {path}: {reason}")]
    Open {
        /// Which store the file is for: `"lease store"`, or `"state store"` for the fenced
        /// state store, which is opened by the same code.
        store: &'static str,
        /// The path that was asked for.
        path: String,
        /// What failed.
        reason: String,
    },
    /// The store was written by a newer version of Kelpie, with a schema this build does not
    /// know. It is left untouched rather than rewritten.
    #[error(
        "{store} {path} has schema version {found_version}, newer than version \
         {supported_version} which this build supports; refusing to touch it"
    )]
    SchemaTooNew {
        /// Which store the file is for, as in [`StoreError::Open`].
        store: &'static str,
        /// The store's file.
        path: String,
        /// The schema version found in the file.
        found_version: i64,
        /// The newest schema version this build reads and writes.
        supported_version: i64,
    },
    /// A store option (an endpoint URL, a timeout, a key prefix, a TLS file) is malformed or out
    /// of bounds. Nothing was contacted.
    #[error("invalid lease store option {option}: {reason}")]
    InvalidOption {
        /// The option at fault, as named in the store's options.
        option: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The store refused the caller's credentials or did not let it touch the lease keys.
    /// Nothing was applied.
    #[error("lease store refused access: {reason}")]
    AccessDenied {
        /// What the store said.
        reason: String,
    },
}

/// A configuration value out of bounds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The lease duration is outside the allowed range.
    #[error("lease duration {lease_duration_ms} ms is outside {min_ms}..={max_ms} ms")]
    LeaseDurationOutOfRange {
        /// The refused value.
        lease_duration_ms: u64,
        /// Smallest allowed.
        min_ms: u64,
        /// Largest allowed.
        max_ms: u64,
    },
    /// The lease keeper's settings are inconsistent.
    #[error("invalid lease keeper settings: {reason}")]
    Keeper {
        /// What is wrong.
        reason: String,
    },
    /// The node-side belief settings are inconsistent.
    #[error("invalid belief settings: {reason}")]
    Belief {
        /// What is wrong.
        reason: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn not_holder(node: &str, holder: Option<&str>) -> String {
        LeaseError::NotHolder {
            actor_id: ActorId::new("c1").unwrap(),
            node_id: NodeId::new(node).unwrap(),
            holder: holder.map(|h| NodeId::new(h).unwrap()),
        }
        .to_string()
    }

    #[test]
    fn a_refusal_never_names_the_caller_as_both_refused_and_holder() {
        assert_eq!(
            not_holder("n1", Some("n2")),
            "n1 does not hold the lease on c1 (holder: n2)"
        );
        assert_eq!(
            not_holder("n1", None),
            "n1 does not hold the lease on c1 (holder: none)"
        );
        let own = not_holder("n1", Some("n1"));
        assert!(!own.contains("does not hold"), "{own}");
        assert!(own.contains("another session"), "{own}");
    }
}
