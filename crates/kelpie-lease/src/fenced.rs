//! Fenced actor state: every write carries the writer's fencing token, and the store refuses
//! a token lower than the highest it has accepted for that actor.
//!
//! Why: a lease bounds *when* a node may act, but a node can act late anyway (a write that was
//! delayed in the network, a process paused between checking its lease and writing). Fencing
//! tokens strictly increase across holders, so remembering the highest token per actor is
//! enough to refuse every write of an earlier holder once a later one has been seen. A new
//! holder calls [`FencedStateStore::fence`] when it activates the actor, so that from then on
//! the earlier holder's writes are refused even before the new holder writes anything.
//! Equal tokens are accepted: the same holder writes repeatedly.
//!
//! - [`MemoryFencedStateStore`]: a map under a mutex.
//! - [`SqliteFencedStateStore`]: one table in its own SQLite file (WAL, `synchronous = FULL`);
//!   the check and the write are one conditional upsert inside one `BEGIN IMMEDIATE`
//!   transaction, so they are atomic across the processes sharing the file.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use kelpie_core::{ActorId, FencingToken};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use crate::error::StoreError;
use crate::sqlite::{corrupt, open_file, FileKind};

/// Largest state value accepted for one actor: 16 MiB. A bigger value is refused with
/// [`StateError::ValueTooLarge`] rather than stored. The etcd store accepts less, as etcd
/// refuses large requests: `ETCD_STATE_VALUE_BYTES_MAX` (1 MiB).
pub const STATE_VALUE_BYTES_MAX: usize = 16 * 1024 * 1024;

/// `PRAGMA application_id` of a Kelpie fenced state file ("KLPS" in ASCII). A file with any
/// other id is not ours and is refused.
pub const STATE_SQLITE_APPLICATION_ID: i32 = 0x4B4C_5053;

/// The schema version this build creates and reads, kept in `PRAGMA user_version`.
pub const STATE_SQLITE_SCHEMA_VERSION: i32 = 1;

/// How long a state store connection waits for another process's write lock, by default.
pub const STATE_SQLITE_BUSY_TIMEOUT_MS_DEFAULT: u64 = 5_000;

/// Longest busy timeout accepted: ten minutes, as for the lease store.
pub const STATE_SQLITE_BUSY_TIMEOUT_MS_MAX: u64 = 600_000;

const _: () = assert!(STATE_SQLITE_BUSY_TIMEOUT_MS_DEFAULT <= STATE_SQLITE_BUSY_TIMEOUT_MS_MAX);
const _: () = assert!(STATE_VALUE_BYTES_MAX <= i32::MAX as usize);

/// Why a state operation was refused or failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// The writer's token is lower than one the store already accepted for the actor: the
    /// writer's lease was superseded, and it must stop acting as the actor's holder.
    #[error(
        "stale fencing token {token} for {actor_id}: the store has accepted token {highest_token}"
    )]
    StaleToken {
        /// The actor written.
        actor_id: ActorId,
        /// The token the write carried.
        token: FencingToken,
        /// The highest token the store has accepted for the actor.
        highest_token: FencingToken,
    },
    /// The store ties fencing to the lease itself (etcd) and holds no lease on the actor with
    /// this token: it expired or was released, and no later holder's token was seen to report.
    #[error(
        "no lease on {actor_id} carries token {token} any more (it expired or was released); \
         write refused"
    )]
    NotHolder {
        /// The actor written.
        actor_id: ActorId,
        /// The token the write carried.
        token: FencingToken,
    },
    /// Token zero is never issued to a lease holder, so a write carrying it has no lease.
    #[error("fencing token 0 is never issued to a lease holder; write to {actor_id} refused")]
    ZeroToken {
        /// The actor written.
        actor_id: ActorId,
    },
    /// The value exceeds the store's bound: [`STATE_VALUE_BYTES_MAX`], or in etcd the smaller
    /// `ETCD_STATE_VALUE_BYTES_MAX`; `bytes_max` says which.
    #[error("state of {actor_id} is {bytes} bytes, over the limit of {bytes_max} bytes")]
    ValueTooLarge {
        /// The actor written.
        actor_id: ActorId,
        /// The value's size.
        bytes: usize,
        /// The limit.
        bytes_max: usize,
    },
    /// The store failed: it could not be opened, read or written, or its file is not ours.
    #[error("{}", StateStoreFailure(.0))]
    Store(#[from] StoreError),
}

/// A [`StoreError`] of the state store, worded for it: the lease store's wording of a store
/// failure ("lease store unavailable: …") would name the wrong store.
struct StateStoreFailure<'a>(&'a StoreError);

impl std::fmt::Display for StateStoreFailure<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            StoreError::Unavailable { reason } => write!(f, "state store unavailable: {reason}"),
            StoreError::WriteFailed { reason } => {
                write!(f, "state store write failed, not applied: {reason}")
            }
            StoreError::CommitUnknown { reason } => write!(
                f,
                "state store outcome unknown, the write may have been applied: {reason}"
            ),
            StoreError::AccessDenied { reason } => {
                write!(f, "state store refused access: {reason}")
            }
            StoreError::Contention { attempts } => write!(
                f,
                "state store contention: gave up after {attempts} conflicting attempts"
            ),
            // The others name their store or file themselves.
            other => write!(f, "{other}"),
        }
    }
}

/// An actor's state as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FencedState {
    /// The highest token the store accepted for the actor, by a write or a fence.
    pub highest_token: FencingToken,
    /// The last value written, if any.
    pub value: Option<Vec<u8>>,
}

/// Actor state guarded by fencing tokens. Implementations apply each operation atomically:
/// the token check and the write cannot be separated by another writer.
///
/// Tokens are counted per actor by the lease store: pass the token of the actor's own lease
/// (a token of another actor's lease is a number this store cannot tell apart, and may fence
/// out that actor's holder), and keep the state store with the lease store it was fenced by (a
/// lease store started over, or restored from an older backup, counts tokens from where it
/// left them, below what this store has seen). `Placement` and `Activation` pair the actor and
/// the token for you.
pub trait FencedStateStore: Send + Sync {
    /// Stores `value` as the actor's state if `token` is at least the highest token accepted
    /// for it, and raises that to `token`.
    ///
    /// # Errors
    /// [`StateError::StaleToken`] if a higher token was accepted before (nothing is written),
    /// [`StateError::NotHolder`] where the store checks the lease itself and it is gone,
    /// [`StateError::ZeroToken`], [`StateError::ValueTooLarge`], or [`StateError::Store`].
    /// After [`StateError::Store`] the write may still be applied, later: a remote store
    /// (etcd) can apply a request whose answer was lost or timed out after the writer has moved
    /// on, even after the same holder's later writes, since equal tokens are accepted. Fencing
    /// still holds (a later holder's token refuses it); a holder that needs its own writes in
    /// order writes nothing else until it has learnt the outcome (a read, or the same write
    /// again).
    fn write(
        &self,
        actor_id: &ActorId,
        token: FencingToken,
        value: &[u8],
    ) -> impl Future<Output = Result<(), StateError>> + Send;

    /// Raises the actor's highest accepted token to `token` without writing a value, and
    /// returns the state as it then is. A new holder calls it when it activates the actor, so
    /// every later write of an earlier holder is refused.
    ///
    /// # Errors
    /// As [`write`](Self::write), except that there is no value to be too large.
    fn fence(
        &self,
        actor_id: &ActorId,
        token: FencingToken,
    ) -> impl Future<Output = Result<FencedState, StateError>> + Send;

    /// The actor's state, or `None` if no write or fence ever reached it.
    ///
    /// # Errors
    /// [`StateError::Store`] if the store could not be read.
    fn read(
        &self,
        actor_id: &ActorId,
    ) -> impl Future<Output = Result<Option<FencedState>, StateError>> + Send;
}

/// The checks every store makes before touching its data.
pub(crate) fn check_write(
    actor_id: &ActorId,
    token: FencingToken,
    bytes: usize,
) -> Result<(), StateError> {
    if token == FencingToken::ZERO {
        return Err(StateError::ZeroToken {
            actor_id: actor_id.clone(),
        });
    }
    if bytes > STATE_VALUE_BYTES_MAX {
        return Err(StateError::ValueTooLarge {
            actor_id: actor_id.clone(),
            bytes,
            bytes_max: STATE_VALUE_BYTES_MAX,
        });
    }
    Ok(())
}

fn stale(actor_id: &ActorId, token: FencingToken, highest_token: FencingToken) -> StateError {
    assert!(token < highest_token, "only a lower token is stale");
    StateError::StaleToken {
        actor_id: actor_id.clone(),
        token,
        highest_token,
    }
}

/// Fenced state in process memory. The mutex is the atomic step.
#[derive(Debug, Default)]
pub struct MemoryFencedStateStore {
    states: Mutex<BTreeMap<ActorId, FencedState>>,
}

impl MemoryFencedStateStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies a write (`Some(value)`) or a fence (`None`) in one step.
    fn apply(
        &self,
        actor_id: &ActorId,
        token: FencingToken,
        value: Option<&[u8]>,
    ) -> Result<FencedState, StateError> {
        check_write(actor_id, token, value.map_or(0, <[u8]>::len))?;
        let mut states = self.states.lock().expect("state store poisoned by a panic");
        let state = states
            .entry(actor_id.clone())
            .or_insert_with(|| FencedState {
                highest_token: token,
                value: None,
            });
        if token < state.highest_token {
            return Err(stale(actor_id, token, state.highest_token));
        }
        state.highest_token = token;
        if let Some(value) = value {
            state.value = Some(value.to_vec());
        }
        Ok(state.clone())
    }
}

impl FencedStateStore for MemoryFencedStateStore {
    async fn write(
        &self,
        actor_id: &ActorId,
        token: FencingToken,
        value: &[u8],
    ) -> Result<(), StateError> {
        self.apply(actor_id, token, Some(value)).map(|_| ())
    }

    async fn fence(
        &self,
        actor_id: &ActorId,
        token: FencingToken,
    ) -> Result<FencedState, StateError> {
        self.apply(actor_id, token, None)
    }

    async fn read(&self, actor_id: &ActorId) -> Result<Option<FencedState>, StateError> {
        let states = self.states.lock().expect("state store poisoned by a panic");
        Ok(states.get(actor_id).cloned())
    }
}

/// The schema, version 1. `STRICT` and the check make SQLite itself refuse a row that is not
/// a valid state, whoever writes it.
const STATE_SCHEMA_V1_SQL: &str = "
    CREATE TABLE actor_state (
        actor_id      TEXT PRIMARY KEY NOT NULL,
        highest_token INTEGER NOT NULL CHECK (highest_token > 0),
        value         BLOB
    ) STRICT, WITHOUT ROWID;
";

/// The conditional upsert of a write: inserted for a new actor, updated only if the token is
/// not lower than the stored one. `changes() == 0` means refused.
const WRITE_SQL: &str = "INSERT INTO actor_state (actor_id, highest_token, value) \
     VALUES (?1, ?2, ?3) ON CONFLICT (actor_id) DO UPDATE SET \
     highest_token = excluded.highest_token, value = excluded.value \
     WHERE excluded.highest_token >= actor_state.highest_token";
/// The conditional upsert of a fence: as a write, but the value is left as it is.
const FENCE_SQL: &str = "INSERT INTO actor_state (actor_id, highest_token, value) \
     VALUES (?1, ?2, NULL) ON CONFLICT (actor_id) DO UPDATE SET \
     highest_token = excluded.highest_token \
     WHERE excluded.highest_token >= actor_state.highest_token";
const READ_SQL: &str = "SELECT highest_token, value FROM actor_state WHERE actor_id = ?1";

/// Fenced state in a SQLite file of its own, shared by the processes of a host.
///
/// Each operation is one transaction on one connection, run on the calling thread: the
/// futures complete without waiting on anything else, after the transaction committed (and,
/// for writes, was fsynced). Run it on a blocking-friendly thread if the caller's executor
/// must not wait for a disk.
///
/// ```
/// use kelpie_core::{ActorId, FencingToken};
/// use kelpie_lease::{FencedStateStore, SqliteFencedStateStore, StateError};
/// # futures::executor::block_on(async {
/// let dir = tempfile::tempdir().unwrap();
/// let store = SqliteFencedStateStore::open(dir.path().join("state.db"))?;
/// let actor = ActorId::new("counter-1").unwrap();
/// store.fence(&actor, FencingToken(2)).await?;
/// let late = store.write(&actor, FencingToken(1), b"from the old holder").await;
/// assert!(matches!(late, Err(StateError::StaleToken { .. })));
/// store.write(&actor, FencingToken(2), b"from the new holder").await?;
/// # Ok::<(), StateError>(())
/// # }).unwrap();
/// ```
pub struct SqliteFencedStateStore {
    path: PathBuf,
    conn: Mutex<Connection>,
}

impl SqliteFencedStateStore {
    /// Opens the store at `path`, creating it if missing, with the default busy timeout.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StateError> {
        Self::open_with_busy_timeout_ms(path, STATE_SQLITE_BUSY_TIMEOUT_MS_DEFAULT)
    }

    /// Opens the store at `path`, creating it (mode 0600) if missing.
    ///
    /// # Errors
    /// [`StoreError::Open`] if the path cannot be opened or created or the timeout exceeds
    /// [`STATE_SQLITE_BUSY_TIMEOUT_MS_MAX`]; [`StoreError::Corrupt`] if the file is not a
    /// Kelpie state store; [`StoreError::SchemaTooNew`] if a newer Kelpie wrote it. Each names
    /// the path, and none writes to a file that is not ours.
    pub fn open_with_busy_timeout_ms(
        path: impl AsRef<Path>,
        busy_timeout_ms: u64,
    ) -> Result<Self, StateError> {
        let path = path.as_ref().to_path_buf();
        let conn = open_file(&path, busy_timeout_ms, &STATE_FILE)?;
        Ok(Self {
            path,
            conn: Mutex::new(conn),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A write (`Some(value)`) or a fence (`None`) in one `BEGIN IMMEDIATE` transaction.
    fn apply(
        &self,
        actor_id: &ActorId,
        token: FencingToken,
        value: Option<&[u8]>,
    ) -> Result<FencedState, StateError> {
        check_write(actor_id, token, value.map_or(0, <[u8]>::len))?;
        let token_sql = token_to_sql(&self.path, token)?;
        let mut conn = self
            .conn
            .lock()
            .expect("state connection poisoned by a panic");
        let failed = |e| self.unavailable(e);
        let transaction = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(failed)?;
        let changed = match value {
            Some(value) => {
                transaction.execute(WRITE_SQL, params![actor_id.as_str(), token_sql, value])
            }
            None => transaction.execute(FENCE_SQL, params![actor_id.as_str(), token_sql]),
        }
        .map_err(failed)?;
        let state = self
            .load(&transaction, actor_id)?
            .expect("the upsert inserted or kept a row");
        if changed == 0 {
            // Refused: nothing was written, so there is nothing to commit.
            return Err(stale(actor_id, token, state.highest_token));
        }
        transaction.commit().map_err(failed)?;
        assert!(
            state.highest_token == token,
            "an accepted token is the highest"
        );
        Ok(state)
    }

    fn load(
        &self,
        conn: &Connection,
        actor_id: &ActorId,
    ) -> Result<Option<FencedState>, StateError> {
        let row = conn
            .query_row(READ_SQL, params![actor_id.as_str()], |row| {
                Ok((row.get::<_, i64>(0)?, row.get::<_, Option<Vec<u8>>>(1)?))
            })
            .optional()
            .map_err(|e| self.unavailable(e))?;
        let Some((token, value)) = row else {
            return Ok(None);
        };
        let highest_token = u64::try_from(token)
            .ok()
            .filter(|t| *t > 0)
            .map(FencingToken)
            .ok_or_else(|| StoreError::Corrupt {
                location: self.path.display().to_string(),
                reason: format!("actor {actor_id} has highest token {token}"),
            })?;
        Ok(Some(FencedState {
            highest_token,
            value,
        }))
    }

    fn unavailable(&self, error: rusqlite::Error) -> StateError {
        StateError::Store(StoreError::Unavailable {
            reason: format!("{}: {error}", self.path.display()),
        })
    }
}

impl FencedStateStore for SqliteFencedStateStore {
    async fn write(
        &self,
        actor_id: &ActorId,
        token: FencingToken,
        value: &[u8],
    ) -> Result<(), StateError> {
        self.apply(actor_id, token, Some(value)).map(|_| ())
    }

    async fn fence(
        &self,
        actor_id: &ActorId,
        token: FencingToken,
    ) -> Result<FencedState, StateError> {
        self.apply(actor_id, token, None)
    }

    async fn read(&self, actor_id: &ActorId) -> Result<Option<FencedState>, StateError> {
        let conn = self
            .conn
            .lock()
            .expect("state connection poisoned by a panic");
        self.load(&conn, actor_id)
    }
}

/// SQLite integers are signed; a token beyond `i64::MAX` cannot be stored.
fn token_to_sql(path: &Path, token: FencingToken) -> Result<i64, StateError> {
    i64::try_from(token.0).map_err(|_| {
        StateError::Store(StoreError::WriteFailed {
            reason: format!(
                "{}: token {token} does not fit SQLite's integers",
                path.display()
            ),
        })
    })
}

/// The fenced state store's file, opened by the same code as the lease store's.
const STATE_FILE: FileKind = FileKind {
    store: "state store",
    what: "Kelpie fenced state store",
    application_id: STATE_SQLITE_APPLICATION_ID,
    schema_version: STATE_SQLITE_SCHEMA_VERSION,
    upgrades_from: &[],
    schema_sql: STATE_SCHEMA_V1_SQL,
    busy_timeout_ms_max: STATE_SQLITE_BUSY_TIMEOUT_MS_MAX,
    check_tables: check_state_tables,
};

/// Checks that the statements the store runs compile against the file's tables.
fn check_state_tables(conn: &Connection, shown: &str) -> Result<(), StoreError> {
    for sql in [WRITE_SQL, FENCE_SQL, READ_SQL] {
        conn.prepare_cached(sql).map_err(|error| {
            corrupt(
                shown,
                format!("its tables are not Kelpie's state schema: {error}"),
            )
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::executor::block_on;

    fn actor(name: &str) -> ActorId {
        ActorId::new(name).unwrap()
    }

    /// The fencing rules every store must follow.
    fn fencing_rules(store: &impl FencedStateStore) {
        let a = actor("a");
        assert_eq!(block_on(store.read(&a)).unwrap(), None);
        block_on(store.write(&a, FencingToken(3), b"three")).unwrap();
        block_on(store.write(&a, FencingToken(3), b"three again")).unwrap();
        let stale_write = block_on(store.write(&a, FencingToken(2), b"two")).unwrap_err();
        let expected = StateError::StaleToken {
            actor_id: a.clone(),
            token: FencingToken(2),
            highest_token: FencingToken(3),
        };
        assert_eq!(stale_write, expected);
        let state = block_on(store.read(&a)).unwrap().unwrap();
        assert_eq!(state.value.as_deref(), Some(&b"three again"[..]));
        // A fence raises the bar without touching the value.
        let fenced = block_on(store.fence(&a, FencingToken(5))).unwrap();
        assert_eq!(fenced.highest_token, FencingToken(5));
        assert_eq!(fenced.value.as_deref(), Some(&b"three again"[..]));
        let late = block_on(store.write(&a, FencingToken(4), b"four"));
        assert!(
            matches!(late, Err(StateError::StaleToken { .. })),
            "{late:?}"
        );
        assert!(block_on(store.fence(&a, FencingToken(4))).is_err());
        block_on(store.write(&a, FencingToken(5), b"five")).unwrap();
        // Actors are fenced independently.
        let b = actor("b");
        block_on(store.write(&b, FencingToken(1), b"one")).unwrap();
        let fenced_new = block_on(store.fence(&actor("c"), FencingToken(7))).unwrap();
        assert_eq!(
            (fenced_new.highest_token, fenced_new.value),
            (FencingToken(7), None)
        );
        let zero = block_on(store.write(&b, FencingToken::ZERO, b""));
        assert!(matches!(zero, Err(StateError::ZeroToken { .. })));
        let huge = vec![0u8; STATE_VALUE_BYTES_MAX + 1];
        let too_large = block_on(store.write(&b, FencingToken(9), &huge)).unwrap_err();
        assert!(matches!(too_large, StateError::ValueTooLarge { .. }));
        assert_eq!(
            block_on(store.read(&b)).unwrap().unwrap().highest_token,
            FencingToken(1),
            "refused writes change nothing"
        );
    }

    #[test]
    fn memory_store_fences() {
        fencing_rules(&MemoryFencedStateStore::new());
    }

    #[test]
    fn sqlite_store_fences_and_persists() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        fencing_rules(&SqliteFencedStateStore::open(&path).unwrap());
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        let reopened = SqliteFencedStateStore::open(&path).unwrap();
        let state = block_on(reopened.read(&actor("a"))).unwrap().unwrap();
        assert_eq!(state.highest_token, FencingToken(5));
        assert_eq!(state.value.as_deref(), Some(&b"five"[..]));
    }

    #[test]
    fn two_handles_on_one_file_share_the_fence() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let (first, second) = (
            SqliteFencedStateStore::open(&path).unwrap(),
            SqliteFencedStateStore::open(&path).unwrap(),
        );
        let a = actor("a");
        block_on(first.write(&a, FencingToken(1), b"old holder")).unwrap();
        block_on(second.fence(&a, FencingToken(2))).unwrap();
        let late = block_on(first.write(&a, FencingToken(1), b"late"));
        assert!(
            matches!(late, Err(StateError::StaleToken { .. })),
            "{late:?}"
        );
    }

    #[test]
    fn sqlite_store_refuses_files_that_are_not_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let garbage = dir.path().join("garbage.db");
        std::fs::write(&garbage, b"definitely not sqlite, long enough to be read").unwrap();
        let error = SqliteFencedStateStore::open(&garbage).err().unwrap();
        assert!(
            matches!(error, StateError::Store(StoreError::Corrupt { .. })),
            "{error}"
        );
        assert!(error.to_string().contains("garbage.db"), "{error}");
        // A lease store is a SQLite file too, but not a state store.
        let leases = dir.path().join("leases.db");
        drop(crate::backend::SqliteLeaseStore::open(&leases).unwrap());
        let error = SqliteFencedStateStore::open(&leases).err().unwrap();
        assert!(error.to_string().contains("application_id"), "{error}");
        let said = error.to_string();
        assert!(
            said.contains("not a Kelpie fenced state store (it is a Kelpie lease store)"),
            "{said}"
        );
        assert!(!said.contains("lease store leases.db"), "{said}");
        // And the other way round.
        let state = dir.path().join("state.db");
        drop(SqliteFencedStateStore::open(&state).unwrap());
        let error = crate::backend::SqliteLeaseStore::open(&state)
            .err()
            .unwrap()
            .to_string();
        assert!(
            error.contains("(it is a Kelpie fenced state store)"),
            "{error}"
        );
        let directory = SqliteFencedStateStore::open(dir.path()).err().unwrap();
        assert!(matches!(
            directory,
            StateError::Store(StoreError::Open { .. })
        ));
        // Named as the state store it is, though the lease store's code checked the path.
        assert!(
            (directory.to_string()).contains(&format!(
                "cannot open state store {}: it is a directory",
                dir.path().display()
            )),
            "{directory}"
        );
        let timeout = STATE_SQLITE_BUSY_TIMEOUT_MS_MAX + 1;
        let refused = SqliteFencedStateStore::open_with_busy_timeout_ms(&garbage, timeout);
        assert!(matches!(
            refused,
            Err(StateError::Store(StoreError::Open { .. }))
        ));
    }

    #[test]
    fn sqlite_store_refuses_a_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        drop(SqliteFencedStateStore::open(&path).unwrap());
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", STATE_SQLITE_SCHEMA_VERSION + 1)
            .unwrap();
        drop(conn);
        let error = SqliteFencedStateStore::open(&path).err().unwrap();
        assert!(
            matches!(
                error,
                StateError::Store(StoreError::SchemaTooNew {
                    store: "state store",
                    ..
                })
            ),
            "{error}"
        );
    }

    /// A state store's failure names the state store: it read "lease store unavailable",
    /// which sent an operator to the wrong file.
    #[test]
    fn a_state_store_failure_names_the_state_store() {
        let reason = || "s.db: attempt to write a readonly database".to_string();
        let failures = [
            StoreError::Unavailable { reason: reason() },
            StoreError::WriteFailed { reason: reason() },
            StoreError::CommitUnknown { reason: reason() },
            StoreError::AccessDenied { reason: reason() },
            StoreError::Contention { attempts: 3 },
        ];
        for failure in failures {
            let shown = StateError::Store(failure.clone()).to_string();
            assert!(shown.starts_with("state store "), "{shown}");
            assert!(!shown.contains("lease store"), "{shown}");
            let lease_shown = failure.to_string();
            assert_eq!(
                shown.strip_prefix("state store "),
                lease_shown.strip_prefix("lease store "),
                "the same words but the store's name"
            );
        }
    }
}
