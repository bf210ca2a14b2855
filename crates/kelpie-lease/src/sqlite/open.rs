//! Opening the file: creating it with private permissions, recognising it as ours, creating
//! the schema in a new file, and refusing anything else without writing to it.
//!
//! The order matters. Everything that can tell a foreign or damaged file apart from ours
//! (its header, `application_id`, `user_version`, `quick_check`) runs before the first write
//! to an existing file, which is the switch to WAL mode.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OpenFlags, Transaction, TransactionBehavior};

use super::rows::{check_statements, load_clock_mark, RowError};
use super::{SqliteOptions, SQLITE_APPLICATION_ID, SQLITE_BUSY_TIMEOUT_MS_MAX};
use super::{SQLITE_FILE_MODE, SQLITE_SCHEMA_VERSION};
use crate::error::StoreError;

/// The first 16 bytes of every SQLite database file.
const SQLITE_HEADER: &[u8; 16] = b"SQLite format 3\0";

/// Longest pause between two attempts to switch a file to WAL mode.
const WAL_SWITCH_PAUSE_MS_MAX: u64 = 50;

/// How many problems `PRAGMA quick_check` reports before stopping.
const QUICK_CHECK_ERRORS_MAX: u32 = 8;

/// The tables of schema versions 1 and 2 (2 only adds rows to `meta`). `STRICT` makes SQLite
/// itself refuse a value of the wrong type, and the checks restate the record invariants so
/// that not even a buggy writer can store a record the protocol would refuse to read.
const SCHEMA_V1_SQL: &str = "
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY NOT NULL,
        value INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE leases (
        actor_id       TEXT PRIMARY KEY NOT NULL,
        holder         TEXT,
        fencing_token  INTEGER NOT NULL CHECK (fencing_token > 0),
        acquired_at_ms INTEGER NOT NULL CHECK (acquired_at_ms >= 0),
        expires_at_ms  INTEGER NOT NULL CHECK (expires_at_ms >= 0),
        renewal_count  INTEGER NOT NULL CHECK (renewal_count >= 0),
        CHECK (holder IS NULL OR expires_at_ms > acquired_at_ms)
    ) STRICT, WITHOUT ROWID;
    INSERT INTO meta (key, value) VALUES ('clock_high_water_ms', 0);
";

/// One kind of Kelpie SQLite file: the lease store's or the fenced state store's. Both are
/// opened by [`open_file`], which only these settings tell apart.
pub(crate) struct FileKind {
    /// Which store, in [`StoreError::Open`] and [`StoreError::SchemaTooNew`]: "lease store".
    pub(crate) store: &'static str,
    /// What the file is, in messages: "Kelpie lease store".
    pub(crate) what: &'static str,
    /// `PRAGMA application_id` of the kind.
    pub(crate) application_id: i32,
    /// `PRAGMA user_version` this build creates and reads.
    pub(crate) schema_version: i32,
    /// Earlier versions this build upgrades in place to `schema_version` when it opens them,
    /// by setting `user_version` alone: their tables are the same.
    pub(crate) upgrades_from: &'static [i64],
    /// The schema and first rows of a new file, run in the transaction that creates it.
    pub(crate) schema_sql: &'static str,
    /// Longest busy timeout accepted.
    pub(crate) busy_timeout_ms_max: u64,
    /// Checks that an existing file's tables are this kind's (its statements compile, its
    /// rows are sane); runs before the first write to the file.
    pub(crate) check_tables: fn(&Connection, &str) -> Result<(), StoreError>,
}

/// The lease store, as its errors name it.
pub(crate) const LEASE_STORE: &str = "lease store";

/// The lease store's file.
const LEASE_FILE: FileKind = FileKind {
    store: LEASE_STORE,
    what: "Kelpie lease store",
    application_id: SQLITE_APPLICATION_ID,
    schema_version: SQLITE_SCHEMA_VERSION,
    upgrades_from: &[1],
    schema_sql: SCHEMA_V1_SQL,
    busy_timeout_ms_max: SQLITE_BUSY_TIMEOUT_MS_MAX,
    check_tables: check_lease_tables,
};

/// Opens (creating if needed) the connection the writer thread owns, with the file checked,
/// the schema in place, WAL mode and `synchronous = FULL`.
pub(super) fn open_writer(path: &Path, options: &SqliteOptions) -> Result<Connection, StoreError> {
    open_file(path, options.busy_timeout_ms, &LEASE_FILE)
}

/// Opens one of our files, creating it if missing: the settings are checked before anything
/// touches the file system; a new file is created with [`SQLITE_FILE_MODE`] and gets its
/// schema in one transaction; an existing one must be of `kind` and pass `quick_check` and
/// `kind.check_tables` before the first write to it (the switch to WAL mode); then
/// `synchronous = FULL`. Every error names the path, and none writes to a file not ours.
pub(crate) fn open_file(
    path: &Path,
    busy_timeout_ms: u64,
    kind: &FileKind,
) -> Result<Connection, StoreError> {
    open_file_of_kind(path, busy_timeout_ms, kind).map_err(|error| named(error, kind.store))
}

/// `error`, naming `store` if it is an error of opening a file (the checks of a path name
/// the lease store, and are shared by both kinds).
fn named(error: StoreError, store: &'static str) -> StoreError {
    match error {
        StoreError::Open { path, reason, .. } => StoreError::Open {
            store,
            path,
            reason,
        },
        StoreError::SchemaTooNew {
            path,
            found_version,
            supported_version,
            ..
        } => StoreError::SchemaTooNew {
            store,
            path,
            found_version,
            supported_version,
        },
        other => other,
    }
}

fn open_file_of_kind(
    path: &Path,
    busy_timeout_ms: u64,
    kind: &FileKind,
) -> Result<Connection, StoreError> {
    let shown = path.display().to_string();
    if busy_timeout_ms > kind.busy_timeout_ms_max {
        let reason = format!(
            "busy_timeout_ms {busy_timeout_ms} exceeds the limit of {} ms",
            kind.busy_timeout_ms_max
        );
        return Err(open_error(&shown, reason));
    }
    prepare_file(path, &shown)?;
    let conn = connect(path, &shown, busy_timeout_ms)?;
    initialise_if_empty(&conn, &shown, kind)?;
    let upgrade = check_ours(&conn, &shown, kind)?;
    check_integrity(&conn, &shown)?;
    (kind.check_tables)(&conn, &shown)?;
    if upgrade {
        upgrade_schema(&conn, &shown, kind)?;
    }
    let journal_mode = enable_wal(&conn, busy_timeout_ms)
        .map_err(|error| sqlite_open_error(&shown, "enabling WAL", error))?;
    if !journal_mode.eq_ignore_ascii_case("wal") {
        return Err(open_error(
            &shown,
            format!("could not enable WAL mode (journal_mode is {journal_mode})"),
        ));
    }
    // FULL makes every WAL commit wait for its fsync, so an acknowledged operation survives a
    // crash of the process or the host.
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(|error| sqlite_open_error(&shown, "setting synchronous=FULL", error))?;
    Ok(conn)
}

/// Switches the file to WAL mode (a no-op once it is), returning the resulting journal mode.
///
/// The switch needs an exclusive lock, and SQLite answers `SQLITE_BUSY` at once, without its
/// busy handler, when another connection holds a lock it cannot wait for without risking a
/// deadlock: which happens when several processes open a new file at the same moment. So
/// this waits and retries itself, for up to `busy_timeout_ms` in all.
fn enable_wal(conn: &Connection, busy_timeout_ms: u64) -> rusqlite::Result<String> {
    let mut waited_ms = 0;
    let mut pause_ms = 1;
    loop {
        match conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0)) {
            Err(error)
                if error.sqlite_error_code() == Some(ErrorCode::DatabaseBusy)
                    && waited_ms < busy_timeout_ms =>
            {
                pause_ms = pause_ms.min(busy_timeout_ms - waited_ms);
                wait_for_lock(pause_ms);
                waited_ms += pause_ms;
                pause_ms = (pause_ms * 2).min(WAL_SWITCH_PAUSE_MS_MAX);
            }
            result => return result,
        }
    }
}

// The SQLite store runs against real files shared with other processes, never inside the
// simulator, so waiting for another process's lock takes real time.
#[allow(clippy::disallowed_methods)]
fn wait_for_lock(pause_ms: u64) {
    std::thread::sleep(Duration::from_millis(pause_ms));
}

/// Opens a second connection for reads, which WAL lets run beside the writer's transactions.
/// Call only after [`open_writer`] succeeded on the same path.
pub(super) fn open_reader(path: &Path, options: &SqliteOptions) -> Result<Connection, StoreError> {
    let shown = path.display().to_string();
    let conn = connect(path, &shown, options.busy_timeout_ms)?;
    conn.pragma_update(None, "query_only", true)
        .map_err(|error| sqlite_open_error(&shown, "making the reader query-only", error))?;
    Ok(conn)
}

/// Checks the path, creating a missing file with [`SQLITE_FILE_MODE`] before SQLite sees it
/// (SQLite would create it with the umask's permissions), and refuses an existing file that
/// does not start with SQLite's header, without SQLite ever opening it.
pub(crate) fn prepare_file(path: &Path, shown: &str) -> Result<(), StoreError> {
    // Names SQLite reads as something other than a file: checked before a file of that name
    // is created (it was, and then left behind, empty, when the open failed).
    let name = path.as_os_str().as_encoded_bytes();
    if name == b":memory:" || name.starts_with(b"file:") {
        return Err(open_error(
            shown,
            "SQLite reads this name as an in-memory database or a URI, not a file path (write \
             ./:memory: or ./file:... for a file of that name)",
        ));
    }
    match std::fs::metadata(path) {
        Ok(metadata) if metadata.is_dir() => Err(open_error(shown, "it is a directory")),
        Ok(metadata) if !metadata.is_file() => Err(open_error(shown, "it is not a regular file")),
        Ok(_) => check_header(path, shown),
        Err(error) if error.kind() == ErrorKind::NotFound => create_file(path, shown),
        Err(error) => Err(open_error(shown, error.to_string())),
    }
}

/// Whether a file is at `path`: `Ok(false)` for a missing file in a directory that exists
/// (which opening would create), an error for a path where no store could be created (a parent
/// that is missing or not a directory, a path the file system refuses to look up). Whether an
/// existing path is a store is left to opening it.
pub(crate) fn file_exists(path: &Path, shown: &str) -> Result<bool, StoreError> {
    match std::fs::metadata(path) {
        Ok(_) => Ok(true),
        Err(error) if error.kind() == ErrorKind::NotFound => {
            parent_dir(path, shown)?;
            Ok(false)
        }
        // E.g. a parent that is a regular file: "Not a directory".
        Err(error) => Err(open_error(shown, error.to_string())),
    }
}

/// The directory a missing file at `path` would be created in, refused unless it is one.
fn parent_dir<'p>(path: &'p Path, shown: &str) -> Result<&'p Path, StoreError> {
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    match std::fs::metadata(parent) {
        Ok(metadata) if metadata.is_dir() => Ok(parent),
        Ok(_) => {
            let reason = format!("its parent {} is not a directory", parent.display());
            Err(open_error(shown, reason))
        }
        Err(error) => {
            let reason = format!("its parent directory {}: {error}", parent.display());
            Err(open_error(shown, reason))
        }
    }
}

fn create_file(path: &Path, shown: &str) -> Result<(), StoreError> {
    let parent = parent_dir(path, shown)?;
    let created = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(SQLITE_FILE_MODE)
        .open(path);
    match created {
        // The directory entry is synced so that the file a later acknowledged commit lives in
        // cannot itself vanish in a host crash.
        Ok(_) => File::open(parent)
            .and_then(|directory| directory.sync_all())
            .map_err(|error| open_error(shown, format!("syncing its directory: {error}"))),
        // Another process created it first; it is checked like any existing file.
        Err(error) if error.kind() == ErrorKind::AlreadyExists => check_header(path, shown),
        Err(error) if error.kind() == ErrorKind::PermissionDenied => Err(open_error(
            shown,
            format!("cannot create the file, is the directory read-only? ({error})"),
        )),
        Err(error) => Err(open_error(
            shown,
            format!("cannot create the file: {error}"),
        )),
    }
}

/// An empty file is a new store; anything else must begin with SQLite's header.
fn check_header(path: &Path, shown: &str) -> Result<(), StoreError> {
    let mut header = Vec::with_capacity(SQLITE_HEADER.len());
    File::open(path)
        .and_then(|file| {
            file.take(SQLITE_HEADER.len() as u64)
                .read_to_end(&mut header)
        })
        .map_err(|error| open_error(shown, error.to_string()))?;
    if header.is_empty() || header == SQLITE_HEADER {
        return Ok(());
    }
    Err(corrupt(
        shown,
        "it is not a SQLite database (its header does not match)",
    ))
}

fn connect(path: &Path, shown: &str, busy_timeout_ms: u64) -> Result<Connection, StoreError> {
    assert!(
        busy_timeout_ms <= SQLITE_BUSY_TIMEOUT_MS_MAX,
        "busy timeout was checked by open_file"
    );
    // No SQLITE_OPEN_CREATE: the file was created above with private permissions, and if it
    // has vanished since then SQLite must not recreate it with the umask's.
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)
        .map_err(|error| sqlite_open_error(shown, "opening", error))?;
    // SQLite opens a file this process may not write read-only, without an error: every
    // write would then fail instead, long after the open was taken as a success.
    let read_only = conn
        .is_readonly(rusqlite::MAIN_DB)
        .map_err(|error| sqlite_open_error(shown, "checking write access", error))?;
    if read_only {
        return Err(open_error(
            shown,
            "the file is read-only for this process (its permissions or the file system); \
             the store writes on every operation",
        ));
    }
    conn.busy_timeout(Duration::from_millis(busy_timeout_ms))
        .map_err(|error| sqlite_open_error(shown, "setting the busy timeout", error))?;
    Ok(conn)
}

/// What the file's header and catalogue say about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileState {
    application_id: i64,
    user_version: i64,
    schema_objects: i64,
}

impl FileState {
    fn read(conn: &Connection) -> rusqlite::Result<Self> {
        Ok(Self {
            application_id: conn.query_row("PRAGMA application_id", [], |row| row.get(0))?,
            user_version: conn.query_row("PRAGMA user_version", [], |row| row.get(0))?,
            schema_objects: conn
                .query_row("SELECT count(*) FROM sqlite_schema", [], |row| row.get(0))?,
        })
    }

    /// A file nobody has written anything into: a zero-length file or an empty database.
    fn is_empty(self) -> bool {
        self.application_id == 0 && self.user_version == 0 && self.schema_objects == 0
    }
}

/// Creates the schema in an empty file, in one transaction. `BEGIN IMMEDIATE` and the second
/// look inside it make two processes opening a new file at once initialise it exactly once.
fn initialise_if_empty(conn: &Connection, shown: &str, kind: &FileKind) -> Result<(), StoreError> {
    let state = FileState::read(conn)
        .map_err(|error| sqlite_open_error(shown, "checking whether it is new", error))?;
    if !state.is_empty() {
        return Ok(());
    }
    let initialise = || -> rusqlite::Result<()> {
        let transaction = Transaction::new_unchecked(conn, TransactionBehavior::Immediate)?;
        if FileState::read(&transaction)?.is_empty() {
            transaction.execute_batch(kind.schema_sql)?;
            transaction.pragma_update(None, "application_id", kind.application_id)?;
            transaction.pragma_update(None, "user_version", kind.schema_version)?;
        }
        transaction.commit()
    };
    initialise().map_err(|error| sqlite_open_error(shown, "creating the schema", error))
}

/// Refuses a file that another program wrote, or a newer Kelpie. `Ok(true)` if it is of an
/// earlier version that this build upgrades ([`FileKind::upgrades_from`]).
fn check_ours(conn: &Connection, shown: &str, kind: &FileKind) -> Result<bool, StoreError> {
    let state = FileState::read(conn)
        .map_err(|error| sqlite_open_error(shown, "checking it is ours", error))?;
    if state.application_id != i64::from(kind.application_id) {
        let reason = format!(
            "its application_id is {:#x}, not {:#x}: it is not a {}{}",
            state.application_id,
            kind.application_id,
            kind.what,
            known_kind(state.application_id)
        );
        return Err(corrupt(shown, reason));
    }
    if state.user_version > i64::from(kind.schema_version) {
        return Err(StoreError::SchemaTooNew {
            store: kind.store,
            path: shown.to_string(),
            found_version: state.user_version,
            supported_version: i64::from(kind.schema_version),
        });
    }
    if state.user_version < i64::from(kind.schema_version) {
        if kind.upgrades_from.contains(&state.user_version) {
            return Ok(true);
        }
        let reason = format!(
            "its schema version {} was never released",
            state.user_version
        );
        return Err(corrupt(shown, reason));
    }
    Ok(false)
}

/// Raises an earlier version's file to this build's, in one write transaction (once, however
/// many processes open it at once: the version is read again inside it).
fn upgrade_schema(conn: &Connection, shown: &str, kind: &FileKind) -> Result<(), StoreError> {
    let upgrade = || -> rusqlite::Result<()> {
        let transaction = Transaction::new_unchecked(conn, TransactionBehavior::Immediate)?;
        let version: i64 = transaction.query_row("PRAGMA user_version", [], |row| row.get(0))?;
        if kind.upgrades_from.contains(&version) {
            transaction.pragma_update(None, "user_version", kind.schema_version)?;
        }
        transaction.commit()
    };
    upgrade().map_err(|error| sqlite_open_error(shown, "upgrading its schema version", error))
}

/// Names the other kind of Kelpie file, for a message about opening one as the other.
fn known_kind(application_id: i64) -> &'static str {
    if application_id == i64::from(SQLITE_APPLICATION_ID) {
        " (it is a Kelpie lease store)"
    } else if application_id == i64::from(crate::fenced::STATE_SQLITE_APPLICATION_ID) {
        " (it is a Kelpie fenced state store)"
    } else {
        ""
    }
}

/// Runs `PRAGMA quick_check`.
fn check_integrity(conn: &Connection, shown: &str) -> Result<(), StoreError> {
    let sql = format!("PRAGMA quick_check({QUICK_CHECK_ERRORS_MAX})");
    let problems = conn
        .prepare(&sql)
        .and_then(|mut statement| {
            statement
                .query_map([], |row| row.get::<_, String>(0))?
                .collect::<rusqlite::Result<Vec<_>>>()
        })
        .map_err(|error| sqlite_open_error(shown, "quick_check", error))?;
    if problems != ["ok"] {
        return Err(corrupt(
            shown,
            format!("quick_check: {}", problems.join("; ")),
        ));
    }
    Ok(())
}

/// Checks that the lease tables and the clock row are as we wrote them.
fn check_lease_tables(conn: &Connection, shown: &str) -> Result<(), StoreError> {
    check_statements(conn).map_err(|error| {
        corrupt(
            shown,
            format!("its tables are not Kelpie's lease schema: {error}"),
        )
    })?;
    match load_clock_mark(conn, shown) {
        Ok(_) => Ok(()),
        Err(RowError::Corrupt(error)) => Err(error),
        Err(RowError::Sql(error)) => Err(sqlite_open_error(shown, "reading the clock", error)),
    }
}

/// Classifies an SQLite failure while opening: damage is [`StoreError::Corrupt`], anything else
/// (permissions, a read-only directory, locks) is [`StoreError::Open`].
pub(crate) fn sqlite_open_error(shown: &str, step: &str, error: rusqlite::Error) -> StoreError {
    let reason = format!("{step}: {error}");
    match error.sqlite_error_code() {
        Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => corrupt(shown, reason),
        // Another process held the file locked past the busy timeout: the store is there and
        // will answer once the lock goes; nothing is wrong with the path or its settings.
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => StoreError::Unavailable {
            reason: format!("{shown}: {reason}"),
        },
        _ => open_error(shown, reason),
    }
}

pub(crate) fn open_error(shown: &str, reason: impl Into<String>) -> StoreError {
    StoreError::Open {
        store: LEASE_STORE,
        path: shown.to_string(),
        reason: reason.into(),
    }
}

pub(crate) fn corrupt(shown: &str, reason: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        location: shown.to_string(),
        reason: reason.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_lease_file_starts_with_the_clock_row() {
        let row = format!("'{}'", super::super::rows::CLOCK_HIGH_WATER_KEY);
        assert!(
            SCHEMA_V1_SQL.contains(&row),
            "{row} missing from the schema"
        );
        assert_eq!(LEASE_FILE.application_id, SQLITE_APPLICATION_ID);
    }
}
