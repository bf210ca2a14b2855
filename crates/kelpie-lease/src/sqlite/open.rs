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

use super::rows::{check_statements, load_high_water_ms, RowError, CLOCK_HIGH_WATER_KEY};
use super::{SqliteOptions, SQLITE_APPLICATION_ID, SQLITE_BUSY_TIMEOUT_MS_MAX};
use super::{SQLITE_FILE_MODE, SQLITE_SCHEMA_VERSION};
use crate::error::StoreError;

/// The first 16 bytes of every SQLite database file.
const SQLITE_HEADER: &[u8; 16] = b"SQLite format 3\0";

/// Longest pause between two attempts to switch a file to WAL mode.
const WAL_SWITCH_PAUSE_MS_MAX: u64 = 50;

/// How many problems `PRAGMA quick_check` reports before stopping.
const QUICK_CHECK_ERRORS_MAX: u32 = 8;

/// Schema version 1. `STRICT` makes SQLite itself refuse a value of the wrong type, and the
/// checks restate the record invariants so that not even a buggy writer can store a record
/// the protocol would refuse to read.
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
";

/// Opens (creating if needed) the connection the writer thread owns, with the file checked,
/// the schema in place, WAL mode and `synchronous = FULL`.
pub(super) fn open_writer(path: &Path, options: &SqliteOptions) -> Result<Connection, StoreError> {
    let shown = path.display().to_string();
    // Settings are checked before anything touches the file system.
    if options.busy_timeout_ms > SQLITE_BUSY_TIMEOUT_MS_MAX {
        let reason = format!(
            "busy_timeout_ms {} exceeds the limit of {SQLITE_BUSY_TIMEOUT_MS_MAX} ms",
            options.busy_timeout_ms
        );
        return Err(open_error(&shown, reason));
    }
    prepare_file(path, &shown)?;
    let conn = connect(path, &shown, options)?;
    initialise_if_empty(&conn, &shown)?;
    check_ours(&conn, &shown)?;
    check_integrity(&conn, &shown)?;
    let journal_mode = enable_wal(&conn, options.busy_timeout_ms)
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
    let conn = connect(path, &shown, options)?;
    conn.pragma_update(None, "query_only", true)
        .map_err(|error| sqlite_open_error(&shown, "making the reader query-only", error))?;
    Ok(conn)
}

/// Checks the path, creating a missing file with [`SQLITE_FILE_MODE`] before SQLite sees it
/// (SQLite would create it with the umask's permissions), and refuses an existing file that
/// does not start with SQLite's header, without SQLite ever opening it.
pub(crate) fn prepare_file(path: &Path, shown: &str) -> Result<(), StoreError> {
    match std::fs::metadata(path) {
        Ok(metadata) if metadata.is_dir() => Err(open_error(shown, "it is a directory")),
        Ok(metadata) if !metadata.is_file() => Err(open_error(shown, "it is not a regular file")),
        Ok(_) => check_header(path, shown),
        Err(error) if error.kind() == ErrorKind::NotFound => create_file(path, shown),
        Err(error) => Err(open_error(shown, error.to_string())),
    }
}

fn create_file(path: &Path, shown: &str) -> Result<(), StoreError> {
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    match std::fs::metadata(parent) {
        Ok(metadata) if metadata.is_dir() => {}
        Ok(_) => {
            let reason = format!("its parent {} is not a directory", parent.display());
            return Err(open_error(shown, reason));
        }
        Err(error) => {
            let reason = format!("its parent directory {}: {error}", parent.display());
            return Err(open_error(shown, reason));
        }
    }
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

fn connect(path: &Path, shown: &str, options: &SqliteOptions) -> Result<Connection, StoreError> {
    assert!(
        options.busy_timeout_ms <= SQLITE_BUSY_TIMEOUT_MS_MAX,
        "busy timeout was checked by open_writer"
    );
    // No SQLITE_OPEN_CREATE: the file was created above with private permissions, and if it
    // has vanished since then SQLite must not recreate it with the umask's.
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)
        .map_err(|error| sqlite_open_error(shown, "opening", error))?;
    conn.busy_timeout(Duration::from_millis(options.busy_timeout_ms))
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
fn initialise_if_empty(conn: &Connection, shown: &str) -> Result<(), StoreError> {
    let state = FileState::read(conn)
        .map_err(|error| sqlite_open_error(shown, "checking whether it is new", error))?;
    if !state.is_empty() {
        return Ok(());
    }
    let initialise = || -> rusqlite::Result<()> {
        let transaction = Transaction::new_unchecked(conn, TransactionBehavior::Immediate)?;
        if FileState::read(&transaction)?.is_empty() {
            transaction.execute_batch(SCHEMA_V1_SQL)?;
            transaction.execute(
                "INSERT INTO meta (key, value) VALUES (?1, 0)",
                [CLOCK_HIGH_WATER_KEY],
            )?;
            transaction.pragma_update(None, "application_id", SQLITE_APPLICATION_ID)?;
            transaction.pragma_update(None, "user_version", SQLITE_SCHEMA_VERSION)?;
        }
        transaction.commit()
    };
    initialise().map_err(|error| sqlite_open_error(shown, "creating the schema", error))
}

/// Refuses a file that another program wrote, or a newer Kelpie.
fn check_ours(conn: &Connection, shown: &str) -> Result<(), StoreError> {
    let state = FileState::read(conn)
        .map_err(|error| sqlite_open_error(shown, "checking it is ours", error))?;
    if state.application_id != i64::from(SQLITE_APPLICATION_ID) {
        let reason = format!(
            "its application_id is {:#x}, not Kelpie's {SQLITE_APPLICATION_ID:#x}: it is not a \
             Kelpie lease store",
            state.application_id
        );
        return Err(corrupt(shown, reason));
    }
    if state.user_version > i64::from(SQLITE_SCHEMA_VERSION) {
        return Err(StoreError::SchemaTooNew {
            path: shown.to_string(),
            found_version: state.user_version,
            supported_version: i64::from(SQLITE_SCHEMA_VERSION),
        });
    }
    if state.user_version < i64::from(SQLITE_SCHEMA_VERSION) {
        // No earlier schema was ever released, so there is nothing to migrate from.
        let reason = format!(
            "its schema version {} was never released",
            state.user_version
        );
        return Err(corrupt(shown, reason));
    }
    Ok(())
}

/// Runs `PRAGMA quick_check` and checks that the tables and the clock row are as we wrote them.
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
    check_statements(conn).map_err(|error| {
        corrupt(
            shown,
            format!("its tables are not Kelpie's lease schema: {error}"),
        )
    })?;
    match load_high_water_ms(conn, shown) {
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
        _ => open_error(shown, reason),
    }
}

pub(crate) fn open_error(shown: &str, reason: impl Into<String>) -> StoreError {
    StoreError::Open {
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
