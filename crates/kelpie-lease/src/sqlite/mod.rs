//! The SQLite store: durable leases on one host, shared by its processes, with no server.
//!
//! - Durability: WAL mode with `synchronous = FULL`, so an acknowledged operation has been
//!   fsynced. A reply is sent only after its transaction committed.
//! - Sharing: every write transaction is `BEGIN IMMEDIATE`, which takes SQLite's write lock
//!   before reading, so the read-decide-write step is atomic across processes too.
//! - Group commit: one writer thread per store applies all operations that arrived while the
//!   previous commit ran in one transaction, with one fsync (see `writer`).
//! - Time: a mark persisted in every write transaction plus the host's monotonic clock since
//!   (`CLOCK_MONOTONIC`, shared by the processes of a boot), so store time neither goes
//!   backwards across restarts or between processes nor moves when the wall clock is stepped;
//!   the wall clock only where that mark cannot be used (a new file, a new boot), never below
//!   it (see `rows::StoreClock`). Or a given clock, for tests.
//! - Safety of the file: created with mode 0600; a file that is not ours, has a newer schema
//!   or is damaged is refused with an error naming it, and never written to.

mod open;

use crate::lease::LeaseConfig;
pub(crate) use open::{corrupt, open_file, FileKind};
mod rows;
mod writer;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use futures_channel::oneshot;
use kelpie_core::{ActorId, SharedClock};
use rusqlite::Connection;

use crate::error::StoreError;
use crate::lease::LeaseRequest;
use crate::manager::ProtocolLeaseManager;
use crate::protocol::Decision;
use crate::store::{LeaseStore, RecordSnapshot, StoreSnapshot};
use rows::{RowError, StoreClock, TimeSource};
use writer::{CommitCounters, WriteJob, Writer};

/// `PRAGMA application_id` of a Kelpie lease store ("KLPL" in ASCII). A file with any other
/// id is not ours and is refused.
pub const SQLITE_APPLICATION_ID: i32 = 0x4B4C_504C;

/// The schema version this build creates and reads, kept in `PRAGMA user_version`. A file with
/// a newer version is refused with [`StoreError::SchemaTooNew`].
///
/// Version 2 keeps the store clock's monotonic mark in `meta` (see `rows::StoreClock`); its
/// tables are version 1's. A version 1 file is upgraded when a build of version 2 opens it, so
/// that builds of version 1, which time decisions by the wall clock alone and move only the
/// high-water mark on, refuse it from then on: sharing a file, the two could read one lease's
/// expiry at different times.
pub const SQLITE_SCHEMA_VERSION: i32 = 2;

/// The latest store time a file may hold, in ms since the UNIX epoch: 10000-01-01T00:00:00Z.
/// Store time starts from the wall clock and runs on the monotonic clock, so no store this
/// code writes gets near it. A clock row past it (or a monotonic reading past it, which would
/// be millennia of uptime) is damage or an edit, refused as [`StoreError::Corrupt`], where it
/// would otherwise stop store time or make every write fail; likewise a lease row acquired
/// past it, or expiring later than the longest lease after it.
pub const SQLITE_STORE_TIME_MS_MAX: u64 = 253_402_300_800_000;

/// Most operations applied in one group-commit transaction. Bounds how long the first
/// operation of a batch waits behind the others, and the memory a batch holds.
pub const GROUP_COMMIT_BATCH_MAX: usize = 256;

/// How long a connection waits for another process's write lock, by default.
pub const SQLITE_BUSY_TIMEOUT_MS_DEFAULT: u64 = 5_000;

/// Longest busy timeout accepted: ten minutes. SQLite takes it as a 32-bit count of ms, and a
/// longer wait is a hung process rather than contention.
pub const SQLITE_BUSY_TIMEOUT_MS_MAX: u64 = 600_000;

/// Permissions of a database file the store creates: owner read and write only, because
/// whoever can write the file can hand themselves any lease.
pub const SQLITE_FILE_MODE: u32 = 0o600;

const _: () = assert!(GROUP_COMMIT_BATCH_MAX >= 1);
const _: () = assert!(SQLITE_BUSY_TIMEOUT_MS_DEFAULT <= SQLITE_BUSY_TIMEOUT_MS_MAX);
const _: () = assert!(SQLITE_BUSY_TIMEOUT_MS_MAX <= i32::MAX as u64);

/// Settings for [`SqliteLeaseStore::open_with`]. Build from `Default` with the `with_*`
/// methods; more settings may be added.
#[derive(Clone)]
#[non_exhaustive]
pub struct SqliteOptions {
    /// The store's time source; `None` means the host's clocks: ms since the UNIX epoch on the
    /// wall clock to start from, then on the monotonic clock (see the module docs). Either way,
    /// store time never goes below the high-water mark persisted in the file.
    pub clock: Option<SharedClock>,
    /// Whether concurrent operations share one transaction and one fsync (the default).
    /// `false` gives every operation its own transaction, for comparison.
    pub group_commit: bool,
    /// How long to wait for another process's write lock before failing the operation, up to
    /// [`SQLITE_BUSY_TIMEOUT_MS_MAX`].
    pub busy_timeout_ms: u64,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self {
            clock: None,
            group_commit: true,
            busy_timeout_ms: SQLITE_BUSY_TIMEOUT_MS_DEFAULT,
        }
    }
}

impl SqliteOptions {
    /// Times the store with `clock` instead of the wall clock (for tests: a `ManualClock`).
    pub fn with_clock(mut self, clock: SharedClock) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Turns group commit on or off.
    pub fn with_group_commit(mut self, enabled: bool) -> Self {
        self.group_commit = enabled;
        self
    }

    /// Sets how long to wait for another process's write lock.
    pub fn with_busy_timeout_ms(mut self, busy_timeout_ms: u64) -> Self {
        self.busy_timeout_ms = busy_timeout_ms;
        self
    }
}

impl fmt::Debug for SqliteOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let clock = if self.clock.is_some() {
            "given"
        } else {
            "wall"
        };
        f.debug_struct("SqliteOptions")
            .field("clock", &clock)
            .field("group_commit", &self.group_commit)
            .field("busy_timeout_ms", &self.busy_timeout_ms)
            .finish()
    }
}

/// How much work a store has committed since it was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SqliteStats {
    /// Write transactions committed, each with one fsync.
    pub transactions_committed: u64,
    /// Operations applied by those transactions.
    pub operations_committed: u64,
}

/// The lease protocol over a SQLite file.
pub type SqliteLeaseManager = ProtocolLeaseManager<SqliteLeaseStore>;

impl ProtocolLeaseManager<SqliteLeaseStore> {
    /// Opens (creating if missing) the lease file at `path`, timed by the host's clocks,
    /// and manages leases of `config`'s duration in it.
    ///
    /// # Errors
    /// As [`SqliteLeaseStore::open`].
    pub fn open(path: impl AsRef<Path>, config: LeaseConfig) -> Result<Self, StoreError> {
        Ok(Self::new(SqliteLeaseStore::open(path)?, config))
    }

    /// Opens the lease file at `path` with `options`.
    ///
    /// # Errors
    /// As [`SqliteLeaseStore::open_with`].
    pub fn open_with(
        path: impl AsRef<Path>,
        options: SqliteOptions,
        config: LeaseConfig,
    ) -> Result<Self, StoreError> {
        Ok(Self::new(
            SqliteLeaseStore::open_with(path, options)?,
            config,
        ))
    }
}

/// Lease records in a SQLite file. See the module documentation for the guarantees.
///
/// ```
/// use kelpie_core::{ActorId, NodeId};
/// use kelpie_lease::{LeaseConfig, LeaseManager, SqliteLeaseManager};
/// # futures::executor::block_on(async {
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("leases.db");
/// let leases = SqliteLeaseManager::open(&path, LeaseConfig::default())?;
/// let (actor, node) = (ActorId::new("counter-1").unwrap(), NodeId::new("node-a").unwrap());
/// let lease = leases.acquire(&actor, &node).await.unwrap();
/// drop(leases);
/// // Acknowledged means committed and fsynced: a later handle, or process, finds it.
/// let leases = SqliteLeaseManager::open(&path, LeaseConfig::default())?;
/// assert_eq!(leases.get(&actor).await.unwrap(), Some(lease));
/// # Ok::<(), kelpie_lease::StoreError>(())
/// # }).unwrap();
/// ```
///
/// Writes go to a dedicated thread that owns the write connection; reads use a second
/// connection, which WAL mode lets run beside the writer. Dropping the store stops the thread
/// after it finishes the batch in hand, and closes the file.
pub struct SqliteLeaseStore {
    path: PathBuf,
    jobs: Option<mpsc::Sender<WriteJob>>,
    writer: Option<JoinHandle<()>>,
    reader: Mutex<Connection>,
    clock: Arc<StoreClock>,
    counters: Arc<CommitCounters>,
}

impl SqliteLeaseStore {
    /// Opens the store at `path`, creating it if missing, timed by the host's clocks.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with(path, SqliteOptions::default())
    }

    /// Whether a file is at `path`, for a reader that must not create a store: `Ok(false)`
    /// for a missing file in a directory that exists (which [`SqliteLeaseStore::open`] would
    /// create), `Ok(true)` for an existing path (which opening then checks is a store).
    ///
    /// # Errors
    /// [`StoreError::Open`], as opening would give it, for a path where no store could be
    /// created: a parent that is missing or not a directory, or a path the file system
    /// refuses to look up.
    pub fn exists(path: impl AsRef<Path>) -> Result<bool, StoreError> {
        let path = path.as_ref();
        open::file_exists(path, &path.display().to_string())
    }

    /// Opens the store at `path`, creating it if missing.
    ///
    /// # Errors
    /// [`StoreError::Open`] if the path is a directory, its parent is missing or read-only, the
    /// file is read-only for this process, or SQLite cannot open it; [`StoreError::Corrupt`] if the file is not a SQLite database, not
    /// a Kelpie lease store, or fails `quick_check`; [`StoreError::SchemaTooNew`] if a newer
    /// Kelpie wrote it. Each names the path, and none writes to an existing file.
    pub fn open_with(path: impl AsRef<Path>, options: SqliteOptions) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let conn = open::open_writer(&path, &options)?;
        let reader = open::open_reader(&path, &options)?;
        let source = options.clock.map_or(TimeSource::Wall, TimeSource::Given);
        let clock = Arc::new(StoreClock::new(source));
        let counters = Arc::new(CommitCounters::default());
        let writer = Writer {
            conn,
            path: path.display().to_string(),
            clock: Arc::clone(&clock),
            group_commit: options.group_commit,
            counters: Arc::clone(&counters),
        };
        let (jobs, queue) = mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("kelpie-sqlite-writer".to_string())
            .spawn(move || writer.run(queue))
            .map_err(|error| StoreError::Open {
                store: open::LEASE_STORE,
                path: path.display().to_string(),
                reason: format!("cannot start the writer thread: {error}"),
            })?;
        Ok(Self {
            path,
            jobs: Some(jobs),
            writer: Some(handle),
            reader: Mutex::new(reader),
            clock,
            counters,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Transactions and operations committed so far by this handle.
    pub fn stats(&self) -> SqliteStats {
        SqliteStats {
            transactions_committed: self.counters.transactions.load(Ordering::Relaxed),
            operations_committed: self.counters.operations.load(Ordering::Relaxed),
        }
    }

    /// Store time now, as a decision made now would read it (for showing a lease's times
    /// relative to now: it need not be the wall clock, see the module docs).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] if the file cannot be read; [`StoreError::Corrupt`] if its
    /// clock rows are damaged.
    pub fn now_ms(&self) -> Result<u64, StoreError> {
        self.read(|_, _| Ok(()))
            .map(|((), store_now_ms)| store_now_ms)
    }

    /// Runs `read` in one read transaction on the reader connection, with store time taken
    /// right after the transaction's snapshot was fixed by reading the high-water mark.
    fn read<T>(
        &self,
        read: impl FnOnce(&Connection, &str) -> Result<T, RowError>,
    ) -> Result<(T, u64), StoreError> {
        let shown = self.path.display().to_string();
        let failed = |error: rusqlite::Error| StoreError::Unavailable {
            reason: format!("{shown}: {error}"),
        };
        let mut conn = self
            .reader
            .lock()
            .expect("reader mutex poisoned by a panic");
        let transaction = conn.transaction().map_err(failed)?;
        let result = rows::load_clock_mark(&transaction, &shown).and_then(|mark| {
            let store_now_ms = self.clock.now(&mark).store_now_ms;
            Ok((read(&transaction, &shown)?, store_now_ms))
        });
        let (value, store_now_ms) = result.map_err(|error| match error {
            RowError::Corrupt(error) => error,
            RowError::Sql(error) => failed(error),
        })?;
        transaction.commit().map_err(failed)?;
        Ok((value, store_now_ms))
    }
}

impl Drop for SqliteLeaseStore {
    fn drop(&mut self) {
        // Closing the channel ends the writer's loop once the batch in hand is committed.
        drop(self.jobs.take());
        if let Some(writer) = self.writer.take() {
            // A writer that panicked outside a decision has already reported it; dropping
            // must not panic again.
            let _ = writer.join();
        }
    }
}

impl LeaseStore for SqliteLeaseStore {
    async fn apply(
        &self,
        actor_id: &ActorId,
        request: &LeaseRequest,
    ) -> Result<Decision, StoreError> {
        let (reply, replied) = oneshot::channel();
        let job = WriteJob {
            actor_id: actor_id.clone(),
            request: request.clone(),
            reply,
        };
        let jobs = self.jobs.as_ref().expect("the sender lives until drop");
        jobs.send(job).map_err(|_| StoreError::Unavailable {
            reason: format!("{}: the writer thread has stopped", self.path.display()),
        })?;
        match replied.await {
            Ok(Ok(result)) => result,
            Ok(Err(panic)) => std::panic::resume_unwind(panic),
            Err(oneshot::Canceled) => Err(StoreError::CommitUnknown {
                reason: format!(
                    "{}: the writer thread stopped while applying the operation",
                    self.path.display()
                ),
            }),
        }
    }

    async fn load(&self, actor_id: &ActorId) -> Result<RecordSnapshot, StoreError> {
        let (record, store_now_ms) =
            self.read(|conn, shown| rows::load_record(conn, shown, actor_id))?;
        Ok(RecordSnapshot {
            record,
            store_now_ms,
        })
    }

    async fn scan(&self) -> Result<StoreSnapshot, StoreError> {
        let (records, store_now_ms) = self.read(rows::scan_records)?;
        Ok(StoreSnapshot {
            records,
            store_now_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manager::LeaseManager;
    use kelpie_core::{ActorId, ManualClock, NodeId};

    #[test]
    fn options_default_to_wall_clock_group_commit_and_build_up() {
        let options = SqliteOptions::default();
        assert!(options.clock.is_none() && options.group_commit);
        assert_eq!(options.busy_timeout_ms, SQLITE_BUSY_TIMEOUT_MS_DEFAULT);
        let options = options
            .with_clock(Arc::new(ManualClock::new(7)))
            .with_group_commit(false)
            .with_busy_timeout_ms(10);
        assert_eq!(options.clock.as_ref().map(|c| c.now_ms()), Some(7));
        assert_eq!((options.group_commit, options.busy_timeout_ms), (false, 10));
        let shown = format!("{options:?}");
        assert!(
            shown.contains("given") && shown.contains("false"),
            "{shown}"
        );
    }

    /// The store's own time, for showing a lease's times: the store's clock (given here),
    /// not the reader's wall clock, and never below the mark a write left in the file.
    #[test]
    fn now_is_the_stores_clock_and_never_below_its_mark() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leases.db");
        let clock = ManualClock::new(5_000);
        let options = SqliteOptions::default().with_clock(Arc::new(clock.clone()));
        let store = SqliteLeaseStore::open_with(&path, options).unwrap();
        assert_eq!(store.now_ms().unwrap(), 5_000);
        clock.advance_ms(250);
        assert_eq!(store.now_ms().unwrap(), 5_250);
        let manager = ProtocolLeaseManager::new(store, LeaseConfig::default());
        let (actor, node) = (ActorId::new("a").unwrap(), NodeId::new("n").unwrap());
        futures::executor::block_on(manager.acquire(&actor, &node)).unwrap();
        drop(manager);
        // Another handle whose clock is behind reads the mark, not its clock.
        let behind = SqliteOptions::default().with_clock(Arc::new(ManualClock::new(10)));
        let reopened = SqliteLeaseStore::open_with(&path, behind).unwrap();
        assert!(reopened.now_ms().unwrap() >= 5_250);
    }

    #[test]
    fn a_busy_timeout_past_the_limit_is_refused_naming_the_path() {
        // The settings are refused before the file system is touched, so the file never exists.
        let path = std::env::temp_dir().join("kelpie-sqlite-busy-timeout-never-created.db");
        let options = SqliteOptions::default().with_busy_timeout_ms(SQLITE_BUSY_TIMEOUT_MS_MAX + 1);
        let error = SqliteLeaseStore::open_with(&path, options).err().unwrap();
        assert!(matches!(error, StoreError::Open { .. }), "{error:?}");
        assert!(
            error.to_string().contains(&path.display().to_string()),
            "{error}"
        );
        assert!(!path.exists());
    }
}
