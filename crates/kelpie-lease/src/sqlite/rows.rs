//! The bridge between lease records and SQLite rows, and the store clock.
//!
//! Everything read from the file is validated here before it becomes a [`LeaseRecord`]: the
//! file may have been edited, damaged or written by something else, and a bad row must be a
//! [`StoreError::Corrupt`] for the caller, never a panic deep inside the protocol.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kelpie_core::limits::LEASE_DURATION_MS_MAX;
use kelpie_core::{ActorId, FencingToken, NodeId, SharedClock};
use rusqlite::types::Value;
use rusqlite::{params, Connection};

use super::SQLITE_STORE_TIME_MS_MAX;
use crate::error::StoreError;
use crate::lease::LeaseRecord;
use crate::protocol::assert_record_well_formed;

/// The `meta` key under which the store clock's high-water mark is persisted.
pub(super) const CLOCK_HIGH_WATER_KEY: &str = "clock_high_water_ms";
/// The `meta` keys of the monotonic mark ([`MonoMark`]): the boot it was taken in, the
/// monotonic clock's reading then, and the high-water mark it belongs to. Files written before
/// it lack them, and a build that does not know them updates only the high-water mark, which
/// the third key then no longer matches: either way the mark is not used.
const CLOCK_MONO_BOOT_KEY: &str = "clock_mono_boot";
const CLOCK_MONO_MS_KEY: &str = "clock_mono_ms";
const CLOCK_MONO_AT_KEY: &str = "clock_mono_at_high_water_ms";

const LOAD_RECORD_SQL: &str = "SELECT holder, fencing_token, acquired_at_ms, expires_at_ms, \
     renewal_count FROM leases WHERE actor_id = ?1";
const SCAN_RECORDS_SQL: &str = "SELECT actor_id, holder, fencing_token, acquired_at_ms, \
     expires_at_ms, renewal_count FROM leases ORDER BY actor_id";
const STORE_RECORD_SQL: &str = "INSERT INTO leases (actor_id, holder, fencing_token, \
     acquired_at_ms, expires_at_ms, renewal_count) VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
     ON CONFLICT (actor_id) DO UPDATE SET holder = excluded.holder, \
     fencing_token = excluded.fencing_token, acquired_at_ms = excluded.acquired_at_ms, \
     expires_at_ms = excluded.expires_at_ms, renewal_count = excluded.renewal_count";
const LOAD_HIGH_WATER_SQL: &str = "SELECT value FROM meta WHERE key = ?1";
const STORE_HIGH_WATER_SQL: &str = "UPDATE meta SET value = ?2 WHERE key = ?1 AND value < ?2";
const STORE_META_SQL: &str = "INSERT INTO meta (key, value) VALUES (?1, ?2) \
     ON CONFLICT (key) DO UPDATE SET value = excluded.value";
const DELETE_MONO_MARK_SQL: &str = "DELETE FROM meta WHERE key IN (?1, ?2, ?3)";

/// A failed read: either SQLite failed, or it returned data that is not a valid record.
#[derive(Debug)]
pub(super) enum RowError {
    /// SQLite itself failed; the caller decides what that means for its operation.
    Sql(rusqlite::Error),
    /// The data read back is not something this store writes.
    Corrupt(StoreError),
}

impl From<rusqlite::Error> for RowError {
    fn from(error: rusqlite::Error) -> Self {
        RowError::Sql(error)
    }
}

/// Checks that every statement the store runs compiles against the file's schema, so a file
/// whose tables do not match is refused when it is opened rather than on first use.
pub(super) fn check_statements(conn: &Connection) -> rusqlite::Result<()> {
    for sql in [
        LOAD_RECORD_SQL,
        SCAN_RECORDS_SQL,
        STORE_RECORD_SQL,
        LOAD_HIGH_WATER_SQL,
        STORE_HIGH_WATER_SQL,
        STORE_META_SQL,
        DELETE_MONO_MARK_SQL,
    ] {
        conn.prepare_cached(sql)?;
    }
    Ok(())
}

/// Reads one actor's record, validated.
pub(super) fn load_record(
    conn: &Connection,
    path: &str,
    actor_id: &ActorId,
) -> Result<Option<LeaseRecord>, RowError> {
    let mut statement = conn.prepare_cached(LOAD_RECORD_SQL)?;
    let mut rows = statement.query(params![actor_id.as_str()])?;
    let Some(row) = rows.next()? else {
        return Ok(None);
    };
    let values = [
        row.get(0)?,
        row.get(1)?,
        row.get(2)?,
        row.get(3)?,
        row.get(4)?,
    ];
    let record = decode_record(&values).map_err(|reason| corrupt_row(path, actor_id, reason))?;
    Ok(Some(record))
}

/// Reads every record in actor id order, validated. SQLite compares `TEXT` bytewise, which is
/// the order of [`ActorId`]'s `Ord`.
pub(super) fn scan_records(
    conn: &Connection,
    path: &str,
) -> Result<Vec<(ActorId, LeaseRecord)>, RowError> {
    let mut statement = conn.prepare_cached(SCAN_RECORDS_SQL)?;
    let mut rows = statement.query([])?;
    let mut records = Vec::new();
    while let Some(row) = rows.next()? {
        let actor_value: Value = row.get(0)?;
        let values = [
            row.get(1)?,
            row.get(2)?,
            row.get(3)?,
            row.get(4)?,
            row.get(5)?,
        ];
        let Value::Text(actor_text) = actor_value else {
            return Err(RowError::Corrupt(StoreError::Corrupt {
                location: format!("{path} (leases table)"),
                reason: format!("actor_id {actor_value:?} is not text"),
            }));
        };
        let actor_id = ActorId::new(&actor_text).map_err(|error| {
            RowError::Corrupt(StoreError::Corrupt {
                location: format!("{path} (leases table)"),
                reason: format!("actor_id {actor_text:?}: {error}"),
            })
        })?;
        let record =
            decode_record(&values).map_err(|reason| corrupt_row(path, &actor_id, reason))?;
        records.push((actor_id, record));
    }
    Ok(records)
}

/// Inserts or replaces one actor's record.
pub(super) fn store_record(
    conn: &Connection,
    actor_id: &ActorId,
    record: &LeaseRecord,
) -> rusqlite::Result<()> {
    let mut statement = conn.prepare_cached(STORE_RECORD_SQL)?;
    let changed = statement.execute(params![
        actor_id.as_str(),
        record.holder.as_ref().map(NodeId::as_str),
        sql_integer(record.fencing_token.0, "fencing_token")?,
        sql_integer(record.acquired_at_ms, "acquired_at_ms")?,
        sql_integer(record.expires_at_ms, "expires_at_ms")?,
        sql_integer(record.renewal_count, "renewal_count")?,
    ])?;
    assert_eq!(changed, 1, "an upsert changes exactly one row");
    Ok(())
}

/// Reads the persisted high-water mark of the store clock.
pub(super) fn load_high_water_ms(conn: &Connection, path: &str) -> Result<u64, RowError> {
    match load_meta(conn, path, CLOCK_HIGH_WATER_KEY)? {
        Some(high_water_ms) => Ok(high_water_ms),
        None => Err(meta_corrupt(
            path,
            format!("the {CLOCK_HIGH_WATER_KEY} row is missing"),
        )),
    }
}

/// Reads the store clock's persisted state: the high-water mark, and the monotonic mark if
/// there is one that belongs to it.
pub(super) fn load_clock_mark(conn: &Connection, path: &str) -> Result<ClockMark, RowError> {
    let high_water_ms = load_high_water_ms(conn, path)?;
    let boot = load_meta(conn, path, CLOCK_MONO_BOOT_KEY)?;
    let mono_ms = load_meta(conn, path, CLOCK_MONO_MS_KEY)?;
    let at_high_water_ms = load_meta(conn, path, CLOCK_MONO_AT_KEY)?;
    for (key, value) in [
        (CLOCK_HIGH_WATER_KEY, Some(high_water_ms)),
        (CLOCK_MONO_MS_KEY, mono_ms),
        (CLOCK_MONO_AT_KEY, at_high_water_ms),
    ] {
        if let Some(ms) = value.filter(|&ms| ms > SQLITE_STORE_TIME_MS_MAX) {
            return Err(meta_corrupt(
                path,
                format!("{key} {ms} is past SQLITE_STORE_TIME_MS_MAX ({SQLITE_STORE_TIME_MS_MAX})"),
            ));
        }
    }
    let mono = match (boot, mono_ms, at_high_water_ms) {
        (Some(boot), Some(mono_ms), Some(at_ms)) if at_ms == high_water_ms => {
            Some(MonoMark { boot, mono_ms })
        }
        _ => None,
    };
    Ok(ClockMark {
        high_water_ms,
        mono,
    })
}

/// Persists the store clock's state after a write transaction at `now`: raises the
/// high-water mark to its time (never lowers it) and records the monotonic reading it was
/// taken with, or removes the monotonic mark where there is none.
pub(super) fn store_clock_mark(conn: &Connection, now: &StoreNow) -> rusqlite::Result<()> {
    // The bound `load_clock_mark` holds a file to: a mark past it would make the store refuse
    // its own file, so the write that would leave one fails instead, and nothing is written.
    if now.store_now_ms > SQLITE_STORE_TIME_MS_MAX {
        let reason = format!(
            "store time {} ms is past SQLITE_STORE_TIME_MS_MAX ({SQLITE_STORE_TIME_MS_MAX}): \
             the store's clock has run out",
            now.store_now_ms
        );
        return Err(rusqlite::Error::ToSqlConversionFailure(reason.into()));
    }
    let mut statement = conn.prepare_cached(STORE_HIGH_WATER_SQL)?;
    statement.execute(params![
        CLOCK_HIGH_WATER_KEY,
        sql_integer(now.store_now_ms, CLOCK_HIGH_WATER_KEY)?
    ])?;
    match now.mono {
        Some(mark) => {
            let mut statement = conn.prepare_cached(STORE_META_SQL)?;
            for (key, value) in [
                (CLOCK_MONO_BOOT_KEY, mark.boot),
                (CLOCK_MONO_MS_KEY, mark.mono_ms),
                (CLOCK_MONO_AT_KEY, now.store_now_ms),
            ] {
                statement.execute(params![key, sql_integer(value, key)?])?;
            }
        }
        None => {
            let mut statement = conn.prepare_cached(DELETE_MONO_MARK_SQL)?;
            statement.execute(params![
                CLOCK_MONO_BOOT_KEY,
                CLOCK_MONO_MS_KEY,
                CLOCK_MONO_AT_KEY
            ])?;
        }
    }
    Ok(())
}

/// One non-negative integer of the `meta` table, or `None` if its row is missing.
fn load_meta(conn: &Connection, path: &str, key: &str) -> Result<Option<u64>, RowError> {
    let mut statement = conn.prepare_cached(LOAD_HIGH_WATER_SQL)?;
    let mut rows = statement.query(params![key])?;
    let Some(row) = rows.next()? else {
        return Ok(None);
    };
    let value: Value = row.get(0)?;
    non_negative(&value, key)
        .map(Some)
        .map_err(|reason| meta_corrupt(path, reason))
}

fn meta_corrupt(path: &str, reason: String) -> RowError {
    RowError::Corrupt(StoreError::Corrupt {
        location: format!("{path} (meta table)"),
        reason,
    })
}

/// Validates the five record columns (holder, token, acquired, expires, renewals).
fn decode_record(values: &[Value; 5]) -> Result<LeaseRecord, String> {
    let holder = match &values[0] {
        Value::Null => None,
        Value::Text(text) => {
            Some(NodeId::new(text).map_err(|error| format!("holder {text:?}: {error}"))?)
        }
        other => return Err(format!("holder {other:?} is neither text nor null")),
    };
    let record = LeaseRecord {
        holder,
        fencing_token: FencingToken(non_negative(&values[1], "fencing_token")?),
        acquired_at_ms: non_negative(&values[2], "acquired_at_ms")?,
        expires_at_ms: non_negative(&values[3], "expires_at_ms")?,
        renewal_count: non_negative(&values[4], "renewal_count")?,
    };
    if record.fencing_token == FencingToken::ZERO {
        return Err("fencing_token is 0, which no holder is ever issued".to_string());
    }
    if record.acquired_at_ms > SQLITE_STORE_TIME_MS_MAX
        || record.expires_at_ms > SQLITE_STORE_TIME_MS_MAX + LEASE_DURATION_MS_MAX
    {
        return Err(format!(
            "acquired at {} ms, expiring at {} ms: past SQLITE_STORE_TIME_MS_MAX \
             ({SQLITE_STORE_TIME_MS_MAX}) and the longest lease after it",
            record.acquired_at_ms, record.expires_at_ms
        ));
    }
    if record.holder.is_some() && record.expires_at_ms <= record.acquired_at_ms {
        return Err(format!(
            "held lease expires at {} ms, not after it was acquired at {} ms",
            record.expires_at_ms, record.acquired_at_ms
        ));
    }
    // The record was asserted well-formed when it was written; this is the other half of the
    // pair, and after the checks above it cannot fail.
    assert_record_well_formed(&record);
    Ok(record)
}

fn non_negative(value: &Value, column: &str) -> Result<u64, String> {
    match value {
        Value::Integer(integer) => {
            u64::try_from(*integer).map_err(|_| format!("{column} is negative: {integer}"))
        }
        other => Err(format!("{column} {other:?} is not an integer")),
    }
}

fn corrupt_row(path: &str, actor_id: &ActorId, reason: String) -> RowError {
    RowError::Corrupt(StoreError::Corrupt {
        location: format!("{path} (leases row for actor {actor_id})"),
        reason,
    })
}

/// SQLite integers are signed 64-bit; a value past `i64::MAX` (which no clock or token
/// reaches in practice) is refused rather than wrapped.
fn sql_integer(value: u64, column: &str) -> rusqlite::Result<i64> {
    i64::try_from(value).map_err(|_| {
        let reason = format!(
            "{column} {value} is past the largest integer SQLite stores ({}): the store has run \
             out of them",
            i64::MAX
        );
        rusqlite::Error::ToSqlConversionFailure(reason.into())
    })
}

/// Where store time comes from: a wall clock, to start from, and a monotonic clock shared by
/// every process of the boot, to run on.
#[derive(Clone)]
pub(super) enum TimeSource {
    /// The host's wall clock (ms since the UNIX epoch) and its monotonic clock
    /// (`CLOCK_MONOTONIC`, with the boot it counts from), where it has one.
    Wall,
    /// A given clock, for tests: it is both clocks.
    Given(SharedClock),
    /// A wall clock and a monotonic one that can disagree, for the clock's own tests.
    #[cfg(test)]
    Split {
        wall: SharedClock,
        mono: SharedClock,
        boot: u64,
    },
}

/// The boot a given clock counts from: one that no host's boot id maps to (see
/// [`boot_key`]), so a file a test wrote never reads as written in this boot.
const GIVEN_CLOCK_BOOT: u64 = u64::MAX >> 1;

impl TimeSource {
    /// The wall clock, in ms.
    fn wall_ms(&self) -> u64 {
        match self {
            TimeSource::Wall => wall_clock_now_ms(),
            TimeSource::Given(clock) => clock.now_ms(),
            #[cfg(test)]
            TimeSource::Split { wall, .. } => wall.now_ms(),
        }
    }

    /// The monotonic clock, in ms, with the boot it counts from; `None` where the host has no
    /// monotonic clock shared by its processes that this build can read (not Linux).
    fn mono(&self, boot: Option<u64>) -> Option<MonoMark> {
        match self {
            TimeSource::Wall => Some(MonoMark {
                boot: boot?,
                mono_ms: monotonic_now_ms()?,
            }),
            TimeSource::Given(clock) => Some(MonoMark {
                boot: GIVEN_CLOCK_BOOT,
                mono_ms: clock.now_ms(),
            }),
            #[cfg(test)]
            TimeSource::Split { mono, boot, .. } => Some(MonoMark {
                boot: *boot,
                mono_ms: mono.now_ms(),
            }),
        }
    }
}

// The SQLite store never runs inside the simulator: it is a real file shared by processes on
// one host, and the host's clocks are the only clocks those processes have in common, so
// reading them here is the point rather than a leak of real time into simulated code.
#[allow(clippy::disallowed_methods)]
fn wall_clock_now_ms() -> u64 {
    // A clock set before 1970 reads as the epoch; the high-water mark keeps time from going
    // backwards regardless.
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    u64::try_from(since_epoch.as_millis()).expect("wall clock is within 2^64 ms of 1970")
}

/// `CLOCK_MONOTONIC` in ms: one clock for every process of a boot, which no setting of the
/// wall clock moves, and which stops, as the nodes' lease clocks do, while the host sleeps.
#[cfg(target_os = "linux")]
fn monotonic_now_ms() -> Option<u64> {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let secs = u64::try_from(now.tv_sec).ok()?;
    let millis = u64::try_from(now.tv_nsec / 1_000_000).ok()?;
    secs.checked_mul(1_000)?.checked_add(millis)
}

#[cfg(not(target_os = "linux"))]
fn monotonic_now_ms() -> Option<u64> {
    None
}

/// This boot, as a number that fits the file's integers: the first 62 bits of the kernel's
/// boot id (a random UUID per boot). `None` where there is none to read.
fn boot_key() -> Option<u64> {
    #[allow(clippy::disallowed_methods)] // a file of the kernel's, read once per store
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let hex: String = boot_id
        .chars()
        .filter(char::is_ascii_hexdigit)
        .take(16)
        .collect();
    let bits = u64::from_str_radix(&hex, 16).ok()?;
    // Below GIVEN_CLOCK_BOOT, and non-negative as an SQLite integer.
    Some(bits >> 2)
}

/// A monotonic clock reading and the boot it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct MonoMark {
    /// The boot the reading counts from ([`boot_key`]).
    pub(super) boot: u64,
    /// The monotonic clock's reading, in ms.
    pub(super) mono_ms: u64,
}

/// The store clock's persisted state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ClockMark {
    /// No store time is ever below it.
    pub(super) high_water_ms: u64,
    /// The monotonic reading taken when store time was the high-water mark, if it was taken
    /// this way by a build that keeps it.
    pub(super) mono: Option<MonoMark>,
}

/// A reading of the store clock, with the monotonic reading it was taken with (persisted by
/// [`store_clock_mark`] after a write).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct StoreNow {
    pub(super) store_now_ms: u64,
    pub(super) mono: Option<MonoMark>,
}

/// The store's clock. Store time starts from the wall clock and then runs on the host's
/// monotonic clock: it is the high-water mark persisted in the file plus the monotonic time
/// elapsed since the mark was taken, in the same boot. So a step of the wall clock moves
/// nothing: one forward would end every lease early against its holder's belief (which runs on
/// the node's monotonic clock), and one backward would hold store time still until the wall
/// clock caught up (a 1 s lease lasting as long as the step). The wall clock is read only
/// where the monotonic mark cannot be used: a new file, a new boot (no process of the last one
/// survives), a mark written by a build that did not keep it; store time is then the wall
/// clock, never below the high-water mark. Nor is it ever below an earlier reading in this
/// process.
pub(super) struct StoreClock {
    source: TimeSource,
    /// This boot ([`boot_key`]), read once.
    boot: Option<u64>,
    last_ms: AtomicU64,
}

impl StoreClock {
    /// A clock over `source` that has read nothing yet.
    pub(super) fn new(source: TimeSource) -> Self {
        let boot = match source {
            TimeSource::Wall => boot_key(),
            _ => None,
        };
        Self {
            source,
            boot,
            last_ms: AtomicU64::new(0),
        }
    }

    /// Store time, given the clock's state just read from the file.
    pub(super) fn now(&self, mark: &ClockMark) -> StoreNow {
        let mono = self.source.mono(self.boot);
        let elapsed_ms = match (mark.mono, mono) {
            // A reading behind the mark counts as none: the mark is read under the file's
            // lock and the reading taken after, and every process of a boot reads one
            // monotonic clock, so only an edited or faked mark is ahead. Counted as no time
            // elapsed, it would hold store time still until this clock caught up with it.
            (Some(then), Some(now)) if then.boot == now.boot && now.mono_ms >= then.mono_ms => {
                Some(now.mono_ms - then.mono_ms)
            }
            _ => None,
        };
        let now_ms = match elapsed_ms {
            Some(elapsed_ms) => mark.high_water_ms.saturating_add(elapsed_ms),
            None => self.source.wall_ms().max(mark.high_water_ms),
        };
        let previous_ms = self.last_ms.fetch_max(now_ms, Ordering::SeqCst);
        StoreNow {
            store_now_ms: now_ms.max(previous_ms),
            mono,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kelpie_core::ManualClock;
    use std::sync::Arc;

    fn row(holder: Value, token: i64, acquired: i64, expires: i64) -> [Value; 5] {
        let int = Value::Integer;
        [holder, int(token), int(acquired), int(expires), int(0)]
    }

    #[test]
    fn decodes_held_and_released_records() {
        let held = decode_record(&row(Value::Text("n1".into()), 3, 10, 20)).unwrap();
        assert_eq!(held.holder, Some(NodeId::new("n1").unwrap()));
        assert_eq!(held.fencing_token, FencingToken(3));
        let released = decode_record(&row(Value::Null, 3, 10, 10)).unwrap();
        assert_eq!(released.holder, None);
    }

    #[test]
    fn refuses_rows_this_store_never_writes() {
        let text = |s: &str| Value::Text(s.to_string());
        let cases = [
            (row(text("bad id!"), 1, 0, 10), "holder"),
            (row(Value::Integer(7), 1, 0, 10), "neither text nor null"),
            (row(text("n1"), 0, 0, 10), "fencing_token is 0"),
            (row(text("n1"), -1, 0, 10), "negative"),
            (row(text("n1"), 1, 10, 10), "not after it was acquired"),
            (row(text("n1"), 1, 10, 5), "not after it was acquired"),
            (
                row(text("n1"), 1, i64::MAX - 1, i64::MAX),
                "past SQLITE_STORE_TIME_MS_MAX",
            ),
            (
                row(Value::Null, 1, 10, i64::MAX),
                "past SQLITE_STORE_TIME_MS_MAX",
            ),
        ];
        for (values, expected) in cases {
            let reason = decode_record(&values).unwrap_err();
            assert!(reason.contains(expected), "{reason:?} lacks {expected:?}");
        }
        let mut values = row(Value::Null, 1, 0, 10);
        values[3] = Value::Real(1.5);
        assert!(decode_record(&values)
            .unwrap_err()
            .contains("not an integer"));
    }

    /// A wall clock the test can set anywhere, backwards too (a `Clock` never goes back).
    #[derive(Clone, Default)]
    struct SteppedWall(Arc<AtomicU64>);

    impl SteppedWall {
        fn set_ms(&self, now_ms: u64) {
            self.0.store(now_ms, Ordering::SeqCst);
        }
    }

    impl kelpie_core::Clock for SteppedWall {
        fn now_ms(&self) -> u64 {
            self.0.load(Ordering::SeqCst)
        }

        fn sleep(&self, _: Duration) -> kelpie_core::SleepFuture<'_> {
            unreachable!("the store clock never sleeps")
        }
    }

    /// A store clock over a wall clock and a monotonic clock that the test moves apart.
    fn split_clock(boot: u64) -> (SteppedWall, ManualClock, StoreClock) {
        let (wall, mono) = (SteppedWall::default(), ManualClock::new(50));
        wall.set_ms(10_000_000);
        let source = TimeSource::Split {
            wall: Arc::new(wall.clone()),
            mono: Arc::new(mono.clone()),
            boot,
        };
        (wall, mono, StoreClock::new(source))
    }

    /// The mark a write at `now` persists.
    fn persisted(now: StoreNow) -> ClockMark {
        ClockMark {
            high_water_ms: now.store_now_ms,
            mono: now.mono,
        }
    }

    #[test]
    fn store_clock_never_goes_backwards() {
        let manual = ManualClock::new(100);
        let clock = StoreClock::new(TimeSource::Given(Arc::new(manual.clone())));
        let unmarked = |high_water_ms| ClockMark {
            high_water_ms,
            mono: None,
        };
        assert_eq!(clock.now(&unmarked(0)).store_now_ms, 100);
        let high = clock.now(&unmarked(500)).store_now_ms;
        assert_eq!(high, 500, "the persisted high-water mark wins");
        let again = clock.now(&unmarked(0)).store_now_ms;
        assert_eq!(again, 500, "an earlier reading in this process wins");
        manual.advance_ms(1_000);
        assert_eq!(clock.now(&unmarked(0)).store_now_ms, 1_100);
    }

    /// The wall clock steps back an hour, then forward two: store time keeps running at the
    /// monotonic clock's pace through both. It stood still for the hour (every lease granted
    /// meanwhile lasting that long), and would have jumped an hour ahead of the nodes' beliefs.
    #[test]
    fn store_time_runs_on_the_monotonic_clock_through_wall_clock_steps() {
        let (wall, mono, clock) = split_clock(7);
        let first = clock.now(&ClockMark {
            high_water_ms: 0,
            mono: None,
        });
        assert_eq!(
            first.store_now_ms, 10_000_000,
            "a new file starts at the wall clock"
        );
        let mut mark = persisted(first);
        let hour_ms = 3_600_000;
        wall.set_ms(10_000_000 - hour_ms);
        mono.advance_ms(1_000);
        let later = clock.now(&mark);
        assert_eq!(
            later.store_now_ms, 10_001_000,
            "a step back holds nothing still"
        );
        mark = persisted(later);
        wall.set_ms(10_000_000 + hour_ms);
        mono.advance_ms(1_000);
        let later = clock.now(&mark);
        assert_eq!(
            later.store_now_ms, 10_002_000,
            "a step forward jumps nothing"
        );
    }

    /// Where the monotonic mark cannot be used, store time is the wall clock, never below the
    /// high-water mark: a mark from another boot, or one a build that does not keep it has
    /// left behind (its high-water mark moved on without it, so `load_clock_mark` drops it).
    #[test]
    fn another_boots_mark_falls_back_to_the_wall_clock() {
        let (wall, _mono, clock) = split_clock(7);
        let other_boot = ClockMark {
            high_water_ms: 20_000_000,
            mono: Some(MonoMark {
                boot: 8,
                mono_ms: 10,
            }),
        };
        assert_eq!(clock.now(&other_boot).store_now_ms, 20_000_000);
        wall.set_ms(30_000_000);
        assert_eq!(clock.now(&other_boot).store_now_ms, 30_000_000);
    }

    /// A mark ahead of this boot's monotonic clock can only be an edit or a fake: it counts as
    /// none, and store time follows the wall clock, where counting no time elapsed since it
    /// held store time still until the monotonic clock caught up.
    #[test]
    fn a_mark_ahead_of_the_monotonic_clock_falls_back_to_the_wall_clock() {
        let (wall, mono, clock) = split_clock(7);
        let ahead = ClockMark {
            high_water_ms: 20_000_000,
            mono: Some(MonoMark {
                boot: 7,
                mono_ms: 1_000_000,
            }),
        };
        assert_eq!(clock.now(&ahead).store_now_ms, 20_000_000);
        wall.set_ms(30_000_000);
        mono.advance_ms(1_000);
        assert_eq!(clock.now(&ahead).store_now_ms, 30_000_000);
    }

    #[test]
    fn the_clock_mark_round_trips_and_a_stale_one_is_dropped() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE meta (key TEXT PRIMARY KEY NOT NULL, value INTEGER NOT NULL) STRICT;
             INSERT INTO meta (key, value) VALUES ('clock_high_water_ms', 0);",
        )
        .unwrap();
        let unmarked = load_clock_mark(&conn, "t.db").unwrap();
        assert_eq!(unmarked.mono, None, "a file from before the mark");
        let now = StoreNow {
            store_now_ms: 1_234,
            mono: Some(MonoMark {
                boot: 7,
                mono_ms: 55,
            }),
        };
        store_clock_mark(&conn, &now).unwrap();
        assert_eq!(load_clock_mark(&conn, "t.db").unwrap(), persisted(now));
        // An older build moves only the high-water mark on.
        conn.execute(
            "UPDATE meta SET value = 2000 WHERE key = 'clock_high_water_ms'",
            [],
        )
        .unwrap();
        let stale = load_clock_mark(&conn, "t.db").unwrap();
        assert_eq!(stale.high_water_ms, 2_000);
        assert_eq!(stale.mono, None, "a mark that no longer belongs to it");
        store_clock_mark(
            &conn,
            &StoreNow {
                store_now_ms: 2_500,
                mono: None,
            },
        )
        .unwrap();
        assert_eq!(load_clock_mark(&conn, "t.db").unwrap().mono, None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_host_has_a_boot_and_a_monotonic_clock() {
        let boot = boot_key().expect("Linux has a boot id");
        assert!(boot < GIVEN_CLOCK_BOOT);
        let first = monotonic_now_ms().expect("Linux has CLOCK_MONOTONIC");
        assert!(monotonic_now_ms().unwrap() >= first);
    }

    #[test]
    fn wall_clock_reads_milliseconds_since_the_epoch() {
        // 2020-01-01 in ms since the epoch: any host running this is past it.
        assert!(TimeSource::Wall.wall_ms() > 1_577_836_800_000);
    }

    #[test]
    fn sql_integer_refuses_values_past_i64() {
        assert_eq!(sql_integer(7, "fencing_token").unwrap(), 7);
        let error = sql_integer(u64::MAX, "fencing_token")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("fencing_token 18446744073709551615 is past the largest integer"),
            "{error}"
        );
    }
}
