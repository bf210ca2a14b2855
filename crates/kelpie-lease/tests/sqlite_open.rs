//! Opening the SQLite store: a new file is created private, and every file or path the store
//! cannot use is refused with a typed error naming the path, leaving the file as it was.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use kelpie_core::{ActorId, ManualClock, NodeId};
use kelpie_lease::{
    backend::SqliteLeaseStore, limits::SQLITE_APPLICATION_ID, limits::SQLITE_FILE_MODE,
    limits::SQLITE_SCHEMA_VERSION, limits::SQLITE_STORE_TIME_MS_MAX, LeaseConfig, LeaseManager,
    SqliteLeaseManager, SqliteOptions, StoreError,
};
use rusqlite::Connection;

fn open_error(path: &Path) -> StoreError {
    match SqliteLeaseStore::open(path) {
        Ok(_) => panic!("{} opened but should have been refused", path.display()),
        Err(error) => {
            let shown = path.display().to_string();
            assert!(error.to_string().contains(&shown), "{error} lacks {shown}");
            println!("refused as expected: {error}");
            error
        }
    }
}

/// A store at `path` holding one lease, closed again.
fn populated_store(path: &Path) {
    let store = SqliteLeaseStore::open(path).unwrap();
    let manager = SqliteLeaseManager::new(store, LeaseConfig::default());
    let actor = ActorId::new("a1").unwrap();
    futures::executor::block_on(manager.acquire(&actor, &NodeId::new("n1").unwrap())).unwrap();
}

/// Runs `open_error` and checks the file's bytes did not change.
fn refused_untouched(path: &Path) -> StoreError {
    let before = fs::read(path).unwrap();
    let error = open_error(path);
    assert_eq!(
        fs::read(path).unwrap(),
        before,
        "a refused file was modified"
    );
    error
}

#[test]
fn new_file_is_created_private_with_our_schema() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("leases.db");
    populated_store(&path);
    let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, SQLITE_FILE_MODE, "mode {mode:o}");
    let conn = Connection::open(&path).unwrap();
    let application_id: i32 = conn
        .query_row("PRAGMA application_id", [], |r| r.get(0))
        .unwrap();
    let user_version: i32 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    let journal_mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(
        (application_id, user_version, journal_mode.as_str()),
        (SQLITE_APPLICATION_ID, SQLITE_SCHEMA_VERSION, "wal")
    );
    drop(conn);
    // Reopening our own file works and keeps the lease.
    let store = SqliteLeaseStore::open(&path).unwrap();
    // SQLite gives the WAL and shared-memory files the database file's permissions.
    for suffix in ["-wal", "-shm"] {
        let side_file = PathBuf::from(format!("{}{suffix}", path.display()));
        let mode = fs::metadata(&side_file).unwrap().permissions().mode() & 0o777;
        assert_eq!(
            mode,
            SQLITE_FILE_MODE,
            "{} has mode {mode:o}",
            side_file.display()
        );
    }
    let manager = SqliteLeaseManager::new(store, LeaseConfig::default());
    let lease = futures::executor::block_on(manager.get(&ActorId::new("a1").unwrap())).unwrap();
    assert_eq!(lease.unwrap().holder, NodeId::new("n1").unwrap());
}

#[test]
fn an_empty_existing_file_becomes_a_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.db");
    fs::write(&path, b"").unwrap();
    SqliteLeaseStore::open(&path).unwrap();
}

#[test]
fn a_file_that_is_not_a_database_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.txt");
    fs::write(
        &path,
        "these are someone's notes, not a database\n".repeat(100),
    )
    .unwrap();
    let error = refused_untouched(&path);
    assert!(matches!(error, StoreError::Corrupt { .. }), "{error:?}");
}

#[test]
fn a_damaged_store_is_corrupt_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("leases.db");
    populated_store(&path);
    // Overwrite everything after the 100-byte header of page 1 (which holds the catalogue)
    // and the first bytes of page 2 (the first table), keeping the header intact.
    let mut bytes = fs::read(&path).unwrap();
    assert!(bytes.len() > 4_200, "the store has at least two pages");
    bytes[100..4_200].fill(0xA5);
    fs::write(&path, &bytes).unwrap();
    let error = refused_untouched(&path);
    assert!(matches!(error, StoreError::Corrupt { .. }), "{error:?}");
}

#[test]
fn another_programs_database_is_not_ours() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("other.db");
    let conn = Connection::open(&path).unwrap();
    conn.execute_batch("CREATE TABLE photos (id INTEGER PRIMARY KEY, name TEXT)")
        .unwrap();
    drop(conn);
    let error = refused_untouched(&path);
    match &error {
        StoreError::Corrupt { reason, .. } => assert!(reason.contains("application_id")),
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("leases.db");
    populated_store(&path);
    let conn = Connection::open(&path).unwrap();
    conn.pragma_update(None, "user_version", SQLITE_SCHEMA_VERSION + 1)
        .unwrap();
    drop(conn);
    let error = refused_untouched(&path);
    assert_eq!(
        error,
        StoreError::SchemaTooNew {
            store: "lease store",
            path: path.display().to_string(),
            found_version: i64::from(SQLITE_SCHEMA_VERSION) + 1,
            supported_version: i64::from(SQLITE_SCHEMA_VERSION),
        }
    );
}

/// A store of schema version 1, which timed decisions by the wall clock alone, is upgraded to
/// version 2 when this build opens it, with its leases intact; from then on a version 1 build
/// refuses it (as `a_newer_schema_is_refused` shows for any newer version), so the two never
/// share it. A version this build never released is refused, untouched.
#[test]
fn a_version_1_store_is_upgraded_and_an_unknown_version_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("leases.db");
    populated_store(&path);
    let conn = Connection::open(&path).unwrap();
    conn.pragma_update(None, "user_version", 1).unwrap();
    drop(conn);
    let store = SqliteLeaseStore::open(&path).unwrap();
    let version: i64 = Connection::open(&path)
        .unwrap()
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .unwrap();
    assert_eq!(version, i64::from(SQLITE_SCHEMA_VERSION));
    let manager = SqliteLeaseManager::new(store, LeaseConfig::default());
    let actor = ActorId::new("a1").unwrap();
    let held = futures::executor::block_on(manager.get(&actor)).unwrap();
    assert_eq!(held.map(|l| l.holder), Some(NodeId::new("n1").unwrap()));
    drop(manager);

    let other = dir.path().join("other.db");
    populated_store(&other);
    let conn = Connection::open(&other).unwrap();
    conn.pragma_update(None, "user_version", 0).unwrap();
    drop(conn);
    match refused_untouched(&other) {
        StoreError::Corrupt { reason, .. } => assert!(reason.contains("never released")),
        error => panic!("expected Corrupt, got {error:?}"),
    }
}

#[test]
fn a_store_missing_its_clock_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("leases.db");
    populated_store(&path);
    let conn = Connection::open(&path).unwrap();
    conn.execute("DELETE FROM meta", []).unwrap();
    drop(conn);
    let error = refused_untouched(&path);
    match &error {
        StoreError::Corrupt { reason, .. } => assert!(reason.contains("clock_high_water_ms")),
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

/// A clock row edited past any time this store writes is refused at open, and the file left
/// as it was: a high-water mark near `i64::MAX` made every write fail later, and a monotonic
/// mark there held store time still, so no lease ever expired.
#[test]
fn a_store_whose_clock_rows_were_edited_past_any_time_is_corrupt() {
    for (key, value) in [
        ("clock_high_water_ms", i64::MAX),
        ("clock_mono_ms", i64::MAX),
        ("clock_high_water_ms", SQLITE_STORE_TIME_MS_MAX as i64 + 1),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leases.db");
        populated_store(&path);
        let conn = Connection::open(&path).unwrap();
        let changed = conn
            .execute(
                "UPDATE meta SET value = ?2 WHERE key = ?1",
                rusqlite::params![key, value],
            )
            .unwrap();
        assert_eq!(changed, 1, "{key} is a row the store writes");
        drop(conn);
        let error = refused_untouched(&path);
        match &error {
            StoreError::Corrupt { reason, .. } => {
                assert!(reason.contains(key), "{reason}");
                assert!(reason.contains("SQLITE_STORE_TIME_MS_MAX"), "{reason}");
            }
            other => panic!("{key} = {value}: expected Corrupt, got {other:?}"),
        }
    }
}

/// A store whose time has passed the bound a file is held to refuses the write that would
/// record it, and its file stays readable: the write used to succeed and leave a clock mark
/// past the bound, and every later open refused the file as corrupt.
#[test]
fn a_write_past_the_stores_time_bound_is_refused_and_the_file_stays_readable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("leases.db");
    populated_store(&path);
    let clock = ManualClock::new(SQLITE_STORE_TIME_MS_MAX - 5);
    let options = SqliteOptions::default().with_clock(Arc::new(clock.clone()));
    let manager = SqliteLeaseManager::new(
        SqliteLeaseStore::open_with(&path, options).unwrap(),
        LeaseConfig::default(),
    );
    let (actor, node) = (ActorId::new("a2").unwrap(), NodeId::new("n2").unwrap());
    futures::executor::block_on(manager.acquire(&actor, &node)).unwrap();
    clock.advance_ms(10);
    let refused = futures::executor::block_on(manager.release(&actor, &node)).unwrap_err();
    assert!(
        refused.to_string().contains("SQLITE_STORE_TIME_MS_MAX"),
        "{refused}"
    );
    drop(manager);
    let reopened = SqliteLeaseManager::new(
        SqliteLeaseStore::open(&path).unwrap(),
        LeaseConfig::default(),
    );
    let lease = futures::executor::block_on(reopened.get(&actor)).unwrap();
    assert_eq!(
        lease.map(|lease| lease.holder),
        Some(node),
        "the lease is kept"
    );
}

/// Names SQLite reads as an in-memory database or a URI are refused before anything is
/// created: the open used to create an empty file of that name in the working directory, then
/// fail on it (WAL cannot be enabled in memory), and leave it behind.
#[test]
fn names_sqlite_does_not_read_as_files_are_refused_and_nothing_is_created() {
    for name in [":memory:", "file:kelpie-test-uri.db?mode=ro"] {
        let path = Path::new(name);
        let error = open_error(path);
        assert!(matches!(error, StoreError::Open { .. }), "{error:?}");
        assert!(error.to_string().contains("not a file path"), "{error}");
        assert!(!path.exists(), "{name} was created");
    }
}

#[test]
fn a_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let error = open_error(dir.path());
    assert!(matches!(error, StoreError::Open { .. }), "{error:?}");
    assert!(error.to_string().contains("directory"), "{error}");
}

#[test]
fn a_missing_parent_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no-such-dir").join("leases.db");
    let error = open_error(&path);
    assert!(matches!(error, StoreError::Open { .. }), "{error:?}");
    assert!(!path.parent().unwrap().exists(), "nothing was created");
}

#[test]
fn a_parent_that_is_a_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plain-file");
    fs::write(&file, b"x").unwrap();
    let error = open_error(&file.join("leases.db"));
    assert!(matches!(error, StoreError::Open { .. }), "{error:?}");
}

#[test]
fn exists_answers_without_creating_and_refuses_what_opening_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("leases.db");
    assert!(!SqliteLeaseStore::exists(&missing).unwrap());
    assert!(!missing.exists(), "asking created nothing");
    drop(SqliteLeaseStore::open(&missing).unwrap());
    assert!(SqliteLeaseStore::exists(&missing).unwrap());
    let file = dir.path().join("plain-file");
    fs::write(&file, b"x").unwrap();
    for path in [
        dir.path().join("no-such-dir").join("leases.db"),
        file.join("leases.db"),
    ] {
        let error = SqliteLeaseStore::exists(&path).unwrap_err();
        assert!(matches!(error, StoreError::Open { .. }), "{error:?}");
        // The same refusal as opening gives.
        assert_eq!(error.to_string(), open_error(&path).to_string());
    }
}

/// A directory with mode 0500: nobody but root can create a file in it.
fn read_only_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let locked = dir.path().join("locked");
    fs::create_dir(&locked).unwrap();
    fs::set_permissions(&locked, fs::Permissions::from_mode(0o500)).unwrap();
    (dir, locked)
}

/// Whether permission bits bind this process: they do not for root (as in CI), which may
/// write into a 0500 directory regardless. Probed by trying, rather than by asking who we are.
fn permission_bits_bind(read_only: &Path) -> bool {
    let probe = read_only.join("probe");
    match fs::write(&probe, b"") {
        Ok(()) => {
            fs::remove_file(&probe).unwrap();
            false
        }
        Err(_) => true,
    }
}

/// Set in the copy of a test that [`rerun_unprivileged`] starts, so it never recurses.
const UNPRIVILEGED_CHILD_ENV: &str = "KELPIE_TEST_UNPRIVILEGED_CHILD";

/// The unprivileged user the root-bypassed checks run as: `nobody`.
const UNPRIVILEGED_UID: u32 = 65_534;

/// Runs `test` of this binary again as `nobody` (with `setpriv`), where permission bits bind,
/// and asserts that it ran there and passed. Root (as in CI) writes through mode 0500, so a
/// read-only refusal cannot be observed in a root process. Without `setpriv`, or if `nobody`
/// cannot run this binary, the check is skipped with a notice (a failure under `CI=true`).
fn rerun_unprivileged(test: &str) {
    assert!(
        std::env::var_os(UNPRIVILEGED_CHILD_ENV).is_none(),
        "{test}: permission bits do not bind even as uid {UNPRIVILEGED_UID}"
    );
    let binary = std::env::current_exe().unwrap();
    let output = std::process::Command::new("setpriv")
        .arg(format!("--reuid={UNPRIVILEGED_UID}"))
        .arg(format!("--regid={UNPRIVILEGED_UID}"))
        .arg("--clear-groups")
        .arg(&binary)
        .args(["--exact", test, "--test-threads=1", "--nocapture"])
        .env(UNPRIVILEGED_CHILD_ENV, "1")
        .env("TMPDIR", std::env::temp_dir())
        .output();
    let output = match output {
        Ok(output) => output,
        Err(error) => {
            kelpie_core::testing::missing_requirement(
                test,
                &format!("running as root, and setpriv cannot start ({error})"),
                "install util-linux, or run the tests as an unprivileged user",
            );
            return;
        }
    };
    let said = String::from_utf8_lossy(&output.stdout);
    let errors = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() && errors.contains("Permission denied") {
        kelpie_core::testing::missing_requirement(
            test,
            &format!("uid {UNPRIVILEGED_UID} cannot run {}", binary.display()),
            "make the checkout and target directory readable by others",
        );
        return;
    }
    assert!(
        output.status.success() && said.contains("1 passed"),
        "{test} as uid {UNPRIVILEGED_UID}: {}\n{said}\n{errors}",
        output.status
    );
    println!("{test}: ran as uid {UNPRIVILEGED_UID} (root bypasses permission bits) and passed");
}

#[test]
fn a_read_only_directory_is_refused() {
    let (_dir, locked) = read_only_dir();
    let path = locked.join("leases.db");
    if permission_bits_bind(&locked) {
        let error = open_error(&path);
        assert!(matches!(error, StoreError::Open { .. }), "{error:?}");
        assert!(!path.exists(), "nothing was created");
    } else {
        // Root writes through mode 0500; the store still creates its file private.
        drop(SqliteLeaseStore::open(&path).unwrap());
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, SQLITE_FILE_MODE);
        rerun_unprivileged("a_read_only_directory_is_refused");
    }
    fs::set_permissions(&locked, fs::Permissions::from_mode(0o700)).unwrap();
}

/// A store file this process may only read (mode 0400) is refused at open, untouched, rather
/// than opened read-only by SQLite to fail on the first write.
#[test]
fn a_read_only_store_file_is_refused_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("leases.db");
    populated_store(&path);
    fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
    // Root writes through mode 0400 as through a 0500 directory.
    if fs::OpenOptions::new().append(true).open(&path).is_err() {
        let error = refused_untouched(&path);
        assert!(matches!(error, StoreError::Open { .. }), "{error:?}");
        assert!(error.to_string().contains("read-only"), "{error}");
    } else {
        rerun_unprivileged("a_read_only_store_file_is_refused_at_open");
    }
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
}

#[test]
fn an_existing_store_in_a_read_only_directory_is_refused() {
    // WAL needs to create its -wal and -shm files beside the database, so a store in a
    // directory that became read-only cannot be opened for writing.
    let (_dir, locked) = read_only_dir();
    let path = locked.join("leases.db");
    fs::set_permissions(&locked, fs::Permissions::from_mode(0o700)).unwrap();
    populated_store(&path);
    fs::set_permissions(&locked, fs::Permissions::from_mode(0o500)).unwrap();
    if permission_bits_bind(&locked) {
        let error = refused_untouched(&path);
        assert!(matches!(error, StoreError::Open { .. }), "{error:?}");
    } else {
        rerun_unprivileged("an_existing_store_in_a_read_only_directory_is_refused");
    }
    fs::set_permissions(&locked, fs::Permissions::from_mode(0o700)).unwrap();
}
