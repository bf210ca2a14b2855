//! The bridge between lease records and SQLite rows, and the store clock.
//!
//! Everything read from the file is validated here before it becomes a [`LeaseRecord`]: the
//! file may have been edited, damaged or written by something else, and a bad row must be a
//! [`StoreError::Corrupt`] for the caller, never a panic deep inside the protocol.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kelpie_core::{ActorId, FencingToken, NodeId, SharedClock};
use rusqlite::types::Value;
use rusqlite::{params, Connection};

use crate::error::StoreError;
use crate::lease::LeaseRecord;
use crate::protocol::assert_record_well_formed;

/// The `meta` key under which the store clock's high-water mark is persisted.
pub(super) const CLOCK_HIGH_WATER_KEY: &str = "clock_high_water_ms";

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
        sql_integer(record.fencing_token.0)?,
        sql_integer(record.acquired_at_ms)?,
        sql_integer(record.expires_at_ms)?,
        sql_integer(record.renewal_count)?,
    ])?;
    assert_eq!(changed, 1, "an upsert changes exactly one row");
    Ok(())
}

/// Reads the persisted high-water mark of the store clock.
pub(super) fn load_high_water_ms(conn: &Connection, path: &str) -> Result<u64, RowError> {
    let mut statement = conn.prepare_cached(LOAD_HIGH_WATER_SQL)?;
    let mut rows = statement.query(params![CLOCK_HIGH_WATER_KEY])?;
    let corrupt = |reason: String| {
        RowError::Corrupt(StoreError::Corrupt {
            location: format!("{path} (meta table)"),
            reason,
        })
    };
    let Some(row) = rows.next()? else {
        return Err(corrupt(format!(
            "the {CLOCK_HIGH_WATER_KEY} row is missing"
        )));
    };
    let value: Value = row.get(0)?;
    non_negative(&value, CLOCK_HIGH_WATER_KEY).map_err(corrupt)
}

/// Raises the persisted high-water mark to `store_now_ms`; never lowers it.
pub(super) fn store_high_water_ms(conn: &Connection, store_now_ms: u64) -> rusqlite::Result<()> {
    let mut statement = conn.prepare_cached(STORE_HIGH_WATER_SQL)?;
    statement.execute(params![CLOCK_HIGH_WATER_KEY, sql_integer(store_now_ms)?])?;
    Ok(())
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
fn sql_integer(value: u64) -> rusqlite::Result<i64> {
    i64::try_from(value).map_err(|error| rusqlite::Error::ToSqlConversionFailure(Box::new(error)))
}

/// Where store time comes from before the persisted high-water mark is applied.
#[derive(Clone)]
pub(super) enum TimeSource {
    /// The host's wall clock, in ms since the UNIX epoch.
    Wall,
    /// A given clock, for tests.
    Given(SharedClock),
}

impl TimeSource {
    fn now_ms(&self) -> u64 {
        match self {
            TimeSource::Wall => wall_clock_now_ms(),
            TimeSource::Given(clock) => clock.now_ms(),
        }
    }
}

// The SQLite store never runs inside the simulator: it is a real file shared by processes on
// one host, and the host's wall clock is the only clock those processes have in common, so
// reading it here is the point rather than a leak of real time into simulated code.
#[allow(clippy::disallowed_methods)]
fn wall_clock_now_ms() -> u64 {
    // A clock set before 1970 reads as the epoch; the high-water mark keeps time from going
    // backwards regardless.
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    u64::try_from(since_epoch.as_millis()).expect("wall clock is within 2^64 ms of 1970")
}

/// The store's clock: its time source, never below the high-water mark persisted in the file
/// nor below any earlier reading in this process.
pub(super) struct StoreClock {
    source: TimeSource,
    last_ms: AtomicU64,
}

impl StoreClock {
    /// A clock over `source` that has read nothing yet.
    pub(super) fn new(source: TimeSource) -> Self {
        Self {
            source,
            last_ms: AtomicU64::new(0),
        }
    }

    /// Store time, given the high-water mark just read from the file.
    pub(super) fn now_ms(&self, high_water_ms: u64) -> u64 {
        let now_ms = self.source.now_ms().max(high_water_ms);
        let previous_ms = self.last_ms.fetch_max(now_ms, Ordering::SeqCst);
        now_ms.max(previous_ms)
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

    #[test]
    fn store_clock_never_goes_backwards() {
        let manual = ManualClock::new(100);
        let clock = StoreClock::new(TimeSource::Given(Arc::new(manual.clone())));
        assert_eq!(clock.now_ms(0), 100);
        assert_eq!(clock.now_ms(500), 500, "the persisted high-water mark wins");
        assert_eq!(
            clock.now_ms(0),
            500,
            "an earlier reading in this process wins"
        );
        manual.advance_ms(1_000);
        assert_eq!(clock.now_ms(0), 1_100);
    }

    #[test]
    fn wall_clock_reads_milliseconds_since_the_epoch() {
        // 2020-01-01 in ms since the epoch: any host running this is past it.
        assert!(TimeSource::Wall.now_ms() > 1_577_836_800_000);
    }

    #[test]
    fn sql_integer_refuses_values_past_i64() {
        assert_eq!(sql_integer(7).unwrap(), 7);
        assert!(sql_integer(u64::MAX).is_err());
    }
}
