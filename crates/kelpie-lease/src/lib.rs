//! Leases on actors, with fencing tokens.
//!
//! A node acquires a time-bounded lease on an actor, renews it, releases it; an expired lease
//! can be claimed by anyone. Every new holder receives a [`FencingToken`](kelpie_core::FencingToken)
//! strictly greater than its predecessors', so a resource can refuse a stale holder.
//!
//! - `lease`: [`Lease`], the stored [`LeaseRecord`], [`LeaseRequest`], [`LeaseConfig`].
//! - `protocol`: [`decide`], the pure decision every store applies in its atomic step.
//! - `store`: the [`LeaseStore`] trait the stores implement.
//! - `memory`: [`MemoryLeaseStore`].
//! - `sqlite`: [`SqliteLeaseStore`], durable leases in one file shared by a host's processes,
//!   with group commit.
//! - `etcd` (cargo feature `etcd`): `EtcdLeaseManager`, leases in an etcd cluster for deployments beyond one host:
//!   expiry by etcd's lease TTLs, tokens from etcd revisions, one keepalive per node.
//! - `manager`: the [`LeaseManager`] trait and [`ProtocolLeaseManager`], the protocol over a store.
//! - `keeper`: [`LeaseKeeper`], which renews a node's leases and keeps its beliefs: a thin async
//!   driver around [`KeeperCore`], the pure state machine (clock readings and replies in,
//!   requests and events out) whose inputs are the TLA+ model's node actions.
//! - `belief`: [`Belief`], the node's pure state machine of "I hold it until local time T".
//! - `error`: [`LeaseError`], [`StoreError`], [`ConfigError`].
//! - `placement`: [`Placement`], which activates an actor on a node only while the node's
//!   keeper holds its lease, and says where an actor lives.
//! - `fenced`: [`FencedStateStore`], actor state whose writes carry fencing tokens and are
//!   refused once a higher token was seen; [`MemoryFencedStateStore`], [`SqliteFencedStateStore`].
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

mod belief;
mod error;
#[cfg(feature = "etcd")]
mod etcd;
mod fenced;
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

pub use belief::{Belief, BeliefConfig, HeldBelief, CLOCK_DRIFT_PPM_MAX_LIMIT};
pub use error::{ConfigError, LeaseError, StoreError};
#[cfg(feature = "etcd")]
pub use etcd::{
    parse_endpoints, EtcdCredentials, EtcdLeaseManager, EtcdOptions, EtcdStats, NodeSession,
    ETCD_ACQUIRE_ATTEMPTS_MAX, ETCD_CONNECT_TIMEOUT_MS_DEFAULT, ETCD_ENDPOINTS_ENV,
    ETCD_ENDPOINTS_MAX, ETCD_EXPIRY_CHECK_INTERVAL_MS, ETCD_KEY_PREFIX_BYTES_MAX,
    ETCD_KEY_PREFIX_DEFAULT, ETCD_PORT_DEFAULT, ETCD_REQUEST_TIMEOUT_MS_DEFAULT,
    ETCD_SCAN_PAGE_KEYS, ETCD_TIMEOUT_MS_MAX, ETCD_TIMEOUT_MS_MIN, ETCD_WATCH_FAILURES_MAX,
};
pub use fenced::{
    FencedState, FencedStateStore, MemoryFencedStateStore, SqliteFencedStateStore, StateError,
    STATE_SQLITE_APPLICATION_ID, STATE_SQLITE_BUSY_TIMEOUT_MS_DEFAULT,
    STATE_SQLITE_BUSY_TIMEOUT_MS_MAX, STATE_SQLITE_SCHEMA_VERSION, STATE_VALUE_BYTES_MAX,
};
pub use keeper::{
    AcquireTicket, KeeperConfig, KeeperCore, KeeperEvent, KeeperParts, KeeperRequest, KeeperTiming,
    LeaseKeeper, LostReason, CLOCK_DRIFT_PPM_MAX_DEFAULT, COVERAGE_MARKS, HOLDER_SUFFIX_BYTES_MAX,
    MARK_BELIEF_ENDED, MARK_COMMIT_UNKNOWN_RESOLVED, MARK_GRANT_OVERTAKEN_BY_RELEASE,
    MARK_RENEWAL_ABANDONED, MARK_RENEWAL_FAILED, MARK_RENEWAL_REFUSED, RELEASE_ATTEMPTS_MAX,
};
pub use lease::{Lease, LeaseConfig, LeaseOp, LeaseRecord, LeaseRequest};
pub use manager::{LeaseManager, MemoryLeaseManager, ProtocolLeaseManager};
pub use memory::MemoryLeaseStore;
pub use placement::{Location, Placement};
pub use protocol::{assert_record_well_formed, decide, DecideFn, Decision};
pub use session::{
    EventsError, LeaseGuard, LeaseSession, SessionConfig, SessionDriver, SessionError,
    SessionEvent, SessionEvents, SessionTiming, ShutdownReport, SESSION_EVENTS_CAPACITY_DEFAULT,
    SESSION_EVENTS_CAPACITY_MAX,
};
pub use sqlite::{
    SqliteLeaseManager, SqliteLeaseStore, SqliteOptions, SqliteStats, GROUP_COMMIT_BATCH_MAX,
    SQLITE_APPLICATION_ID, SQLITE_BUSY_TIMEOUT_MS_DEFAULT, SQLITE_BUSY_TIMEOUT_MS_MAX,
    SQLITE_FILE_MODE, SQLITE_SCHEMA_VERSION,
};
pub use store::{LeaseStore, RecordSnapshot, StoreSnapshot, STORE_CONFLICT_RETRIES_MAX};
pub use tokio_util::sync::CancellationToken;
