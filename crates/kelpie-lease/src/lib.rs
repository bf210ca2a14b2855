//! Leases on actors, with fencing tokens.
//!
//! A node acquires a time-bounded lease on an actor, renews it, releases it; an expired lease
//! can be claimed by anyone. Every new holder receives a [`FencingToken`](kelpie_core::FencingToken)
//! strictly greater than its predecessors', so a resource can refuse a stale holder.
//!
//! # Map
//!
//! - **Stores**, behind one [`LeaseManager`] trait: [`SqliteLeaseManager`] (the embedded,
//!   durable default: one file shared by a host's processes), [`MemoryLeaseManager`] (tests,
//!   one process) and, with the cargo feature `etcd`, `EtcdLeaseManager` (clusters).
//! - **A node's session**: [`LeaseSession`] renews the node's leases in the background and
//!   hands out a [`LeaseGuard`] per held lease, with its fencing token and a
//!   [`CancellationToken`] that fires before the node's belief ends; [`SessionEvent`]s say what
//!   happened. [`LeaseKeeper`] is the lower-level renewer it drives.
//! - **Placement**: [`Placement`] activates an actor on at most one node at a time over a
//!   session, fencing its state store on activation (an [`Activation`] writes with its
//!   token), and says where an actor lives. [`KeeperPlacement`] does the same over a bare
//!   keeper, leaving the fencing to its caller.
//! - **Fenced state**: [`FencedStateStore`] refuses writes whose token was superseded
//!   ([`MemoryFencedStateStore`], [`SqliteFencedStateStore`]; with the feature `etcd`,
//!   `EtcdFencedStateStore`, fenced by the lease keys themselves).
//! - **Errors**: [`LeaseError`] (refusals), [`StoreError`] (the store failed), [`ConfigError`]
//!   (refused at construction), [`SessionError`], [`StateError`].
//! - Modules for fewer readers: [`limits`] (every bound and default), [`backend`] (the stored
//!   record, the pure decision every store applies, the store trait, for writing a store),
//!   [`machine`] (the pure state machines the drivers wrap, which the simulator and the TLA+
//!   mapping speak of) and [`coverage`] (marks for simulation sweeps).
//!
//! See `docs/EMBEDDING.md` for a service built on a session, and the session module's
//! example below for the shortest one.
//!
//! ```
//! use kelpie_core::{ActorId, ManualClock, NodeId};
//! use kelpie_lease::{LeaseConfig, LeaseManager, MemoryLeaseManager};
//! # futures::executor::block_on(async {
//! let clock = ManualClock::new(0);
//! let leases = MemoryLeaseManager::in_memory(std::sync::Arc::new(clock.clone()), LeaseConfig::default());
//! let actor = ActorId::new("counter-1").unwrap();
//! let (a, b) = (NodeId::new("node-a").unwrap(), NodeId::new("node-b").unwrap());
//! let first = leases.acquire(&actor, &a).await.unwrap();
//! assert!(leases.acquire(&actor, &b).await.is_err());
//! clock.advance_ms(LeaseConfig::default().lease_duration_ms);
//! let second = leases.acquire(&actor, &b).await.unwrap();
//! assert!(second.fencing_token > first.fencing_token);
//! # });
//! ```

#![warn(missing_docs)]

mod activation;
mod belief;
mod error;
mod etcd;
mod fenced;
mod join;
mod keeper;
mod lease;
mod manager;
mod memory;
mod placement;
mod protocol;
mod session;
mod sqlite;
mod store;
#[cfg(test)]
mod test_support;

// The crate root: what a runtime embedding leases uses.
pub use activation::{Activation, Placed, Placement, PlacementError};
pub use error::{ConfigError, LeaseError, StoreError};
#[cfg(feature = "etcd")]
pub use etcd::EtcdClient;
#[cfg(feature = "mutations")]
pub use etcd::EtcdMutation;
pub use etcd::{EtcdCredentials, EtcdFencedStateStore, EtcdLeaseManager, EtcdOptions};
pub use fenced::{
    FencedState, FencedStateStore, MemoryFencedStateStore, SqliteFencedStateStore, StateError,
};
pub use keeper::{
    is_node_or_incarnation, ClosingProgress, KeeperConfig, KeeperEvent, KeeperEvents, LeaseKeeper,
    LostReason,
};
pub use lease::{FencedOp, FencedRequest, Lease, LeaseConfig};
pub use manager::{LeaseManager, MemoryLeaseManager};
pub use placement::{KeeperPlacement, Location};
pub use session::{
    CancelReason, EventsError, LeaseGuard, LeaseSession, SessionConfig, SessionDriver,
    SessionError, SessionEvent, SessionEvents, SessionTiming, ShutdownReport,
};
pub use sqlite::{SqliteLeaseManager, SqliteOptions};
pub use tokio_util::sync::CancellationToken;

/// Every bound and default, by the module that enforces it.
pub mod limits {
    pub use crate::belief::CLOCK_DRIFT_PPM_MAX_LIMIT;
    pub use crate::etcd::{
        ETCD_ACQUIRE_ATTEMPTS_MAX, ETCD_APPLY_LATE_MS_MAX, ETCD_CONNECT_TIMEOUT_MS_DEFAULT,
        ETCD_ENDPOINTS_ENV, ETCD_ENDPOINTS_MAX, ETCD_EXPIRY_CHECK_INTERVAL_MS,
        ETCD_KEY_PREFIX_BYTES_MAX, ETCD_KEY_PREFIX_DEFAULT, ETCD_PORT_DEFAULT,
        ETCD_REQUEST_TIMEOUT_MS_DEFAULT, ETCD_SCAN_PAGE_KEYS, ETCD_STALE_KEYS_PER_GRANT_MAX,
        ETCD_STATE_VALUE_BYTES_MAX, ETCD_TIMEOUT_MS_MAX, ETCD_TIMEOUT_MS_MIN,
        ETCD_WATCH_FAILURES_MAX,
    };
    pub use crate::fenced::{
        STATE_SQLITE_APPLICATION_ID, STATE_SQLITE_BUSY_TIMEOUT_MS_DEFAULT,
        STATE_SQLITE_BUSY_TIMEOUT_MS_MAX, STATE_SQLITE_SCHEMA_VERSION, STATE_VALUE_BYTES_MAX,
    };
    pub use crate::keeper::{
        CLOCK_DRIFT_PPM_MAX_DEFAULT, HOLDER_SUFFIX_BYTES_MAX, RELEASE_BACKOFF_INTERVALS_MAX,
    };
    pub use crate::session::{SESSION_EVENTS_CAPACITY_DEFAULT, SESSION_EVENTS_CAPACITY_MAX};
    pub use crate::sqlite::{
        GROUP_COMMIT_BATCH_MAX, SQLITE_APPLICATION_ID, SQLITE_BUSY_TIMEOUT_MS_DEFAULT,
        SQLITE_BUSY_TIMEOUT_MS_MAX, SQLITE_FILE_MODE, SQLITE_SCHEMA_VERSION,
        SQLITE_STORE_TIME_MS_MAX,
    };
    pub use crate::store::STORE_CONFLICT_RETRIES_MAX;
}

/// For implementing or driving a store directly: the stored record, the request, the pure
/// decision every store applies in its atomic step, the store trait and the stores.
pub mod backend {
    pub use crate::etcd::{parse_endpoints, EtcdStats, NodeSession};
    pub use crate::lease::{LeaseOp, LeaseRecord, LeaseRequest};
    pub use crate::manager::ProtocolLeaseManager;
    pub use crate::memory::MemoryLeaseStore;
    pub use crate::protocol::{assert_record_well_formed, decide, DecideFn, Decision};
    pub use crate::sqlite::{SqliteLeaseStore, SqliteStats};
    pub use crate::store::{LeaseStore, RecordSnapshot, StoreSnapshot};
}

/// The part of etcd's API the etcd backend uses ([`EtcdApi`](etcd_api::EtcdApi)), for running
/// [`EtcdLeaseManager`] against another etcd than a real cluster, such as the simulator's.
pub mod etcd_api {
    pub use crate::etcd::{
        Compare, CompareTarget, DefaultEtcdApi, EtcdApi, EtcdApiError, EtcdKeyValue, LeaseGrant,
        RangeReply, RangeRequest, Txn, TxnOp, TxnOpResult, TxnReply,
    };
}

/// The pure state machines the drivers wrap, and that the simulator and the TLA+ model's
/// mapping speak of: the keeper's ([`machine::KeeperCore`]) and one belief's
/// ([`machine::Belief`]).
pub mod machine {
    pub use crate::belief::{Belief, BeliefConfig, HeldBelief};
    pub use crate::keeper::{AcquireTicket, KeeperCore, KeeperParts, KeeperRequest, KeeperTiming};
}

/// Coverage marks the keeper hits on its rare paths, for simulation sweeps that assert each
/// was reached (see `kelpie_core::coverage`).
pub mod coverage {
    pub use crate::etcd::{
        ETCD_COVERAGE_MARKS, MARK_ETCD_COMPARE_FAILED, MARK_ETCD_HANDOVER_BY_WATCH,
        MARK_ETCD_KEEPALIVE_LOST, MARK_ETCD_SESSION_EXPIRED,
    };
    pub use crate::keeper::{
        COVERAGE_MARKS, MARK_BELIEF_ENDED, MARK_COMMIT_UNKNOWN_RESOLVED,
        MARK_GRANT_OVERTAKEN_BY_RELEASE, MARK_RENEWAL_ABANDONED, MARK_RENEWAL_FAILED,
        MARK_RENEWAL_REFUSED,
    };
    pub use crate::protocol::{MARK_EXPIRED_LEASE_SEEN, MARK_TAKEOVER_AFTER_EXPIRY};
}
