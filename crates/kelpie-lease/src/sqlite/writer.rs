//! The writer thread: the one owner of the write connection, and where group commit happens.
//!
//! The thread blocks for one job, then takes whatever else is already queued, and applies
//! the batch in one `BEGIN IMMEDIATE` transaction, taking in jobs that arrive while it does
//! (up to [`GROUP_COMMIT_BATCH_MAX`] in all): one commit, so one fsync, however many
//! operations it carries. Jobs queue up while the previous commit's fsync runs, so batches
//! grow exactly when the disk is the bottleneck, and the writer never waits for a job it does
//! not have. Each job still gets its own decision, made on the record as the jobs before it
//! in the batch left it, and every reply is sent only after the commit returned.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;

use futures_channel::oneshot;
use kelpie_core::ActorId;
use rusqlite::Connection;

use super::rows::{load_clock_mark, load_record, store_clock_mark, store_record, ClockMark};
use super::rows::{RowError, StoreClock};
use super::GROUP_COMMIT_BATCH_MAX;
use crate::error::StoreError;
use crate::lease::LeaseRequest;
use crate::protocol::{assert_record_well_formed, decide, Decision};

/// What a job's caller receives: its result, or the panic its decision raised, to be resumed
/// on the caller's thread where it belongs.
pub(super) type JobReply = std::thread::Result<Result<Decision, StoreError>>;

/// One `apply` waiting for the writer.
pub(super) struct WriteJob {
    pub(super) actor_id: ActorId,
    pub(super) request: LeaseRequest,
    pub(super) reply: oneshot::Sender<JobReply>,
}

/// Counters of committed work, shared with the store handle.
#[derive(Debug, Default)]
pub(super) struct CommitCounters {
    pub(super) transactions: AtomicU64,
    pub(super) operations: AtomicU64,
}

/// How a batch ended.
enum BatchOutcome {
    /// Committed; one result per job, in order.
    Committed(Vec<Result<Decision, StoreError>>),
    /// Nothing committed, or not known to have; every job gets this error.
    Failed(StoreError),
    /// The decision of job `index` panicked; the transaction was rolled back.
    Panicked {
        index: usize,
        payload: Box<dyn Any + Send>,
    },
}

/// The state the writer thread owns.
pub(super) struct Writer {
    pub(super) conn: Connection,
    pub(super) path: String,
    pub(super) clock: Arc<StoreClock>,
    pub(super) group_commit: bool,
    pub(super) counters: Arc<CommitCounters>,
}

impl Writer {
    /// Serves jobs until every sender is gone, which happens when the store is dropped. The
    /// connection closes when this returns, checkpointing the WAL into the main file.
    pub(super) fn run(mut self, jobs: Receiver<WriteJob>) {
        while let Ok(first) = jobs.recv() {
            let mut batch = vec![first];
            self.take_queued(&mut batch, &jobs);
            let outcome = self.apply_batch(&mut batch, &jobs);
            self.reply(batch, outcome);
        }
    }

    /// Moves jobs already queued into the batch, without waiting for any, up to
    /// [`GROUP_COMMIT_BATCH_MAX`]. Returns whether any were added.
    fn take_queued(&self, batch: &mut Vec<WriteJob>, jobs: &Receiver<WriteJob>) -> bool {
        let before = batch.len();
        while self.group_commit && batch.len() < GROUP_COMMIT_BATCH_MAX {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        batch.len() > before
    }

    fn apply_batch(
        &mut self,
        batch: &mut Vec<WriteJob>,
        jobs: &Receiver<WriteJob>,
    ) -> BatchOutcome {
        if let Err(error) = self.conn.execute_batch("BEGIN IMMEDIATE") {
            return BatchOutcome::Failed(self.not_applied(&error));
        }
        let results = match self.apply_in_transaction(batch, jobs) {
            Ok(results) => results,
            Err(outcome) => {
                self.roll_back();
                return outcome;
            }
        };
        match self.conn.execute_batch("COMMIT") {
            Ok(()) => BatchOutcome::Committed(results),
            Err(error) => {
                // A failed COMMIT may have written some or all of the WAL frames before it
                // failed (an fsync error, say), so whether the batch is durable is unknown.
                self.roll_back();
                BatchOutcome::Failed(StoreError::CommitUnknown {
                    reason: format!("{}: commit failed: {error}", self.path),
                })
            }
        }
    }

    /// Applies every job inside the open transaction, taking in jobs that arrive meanwhile:
    /// callers answered by the previous commit resubmit while this batch is being applied,
    /// and joining it costs them no fsync of their own. Nothing waits for them, so a lone
    /// caller's commit is not delayed. An `Err` is the batch's outcome; the caller rolls back.
    fn apply_in_transaction(
        &self,
        batch: &mut Vec<WriteJob>,
        jobs: &Receiver<WriteJob>,
    ) -> Result<Vec<Result<Decision, StoreError>>, BatchOutcome> {
        let mut mark = match load_clock_mark(&self.conn, &self.path) {
            Ok(mark) => mark,
            Err(RowError::Corrupt(error)) => return Err(BatchOutcome::Failed(error)),
            Err(RowError::Sql(error)) => {
                return Err(BatchOutcome::Failed(self.not_applied(&error)));
            }
        };
        let mut results = Vec::with_capacity(batch.len());
        let mut now = None;
        loop {
            for (index, job) in batch.iter().enumerate().skip(results.len()) {
                let store_now = self.clock.now(&mark);
                let store_now_ms = store_now.store_now_ms;
                mark = ClockMark {
                    high_water_ms: store_now_ms,
                    mono: store_now.mono,
                };
                now = Some(store_now);
                match catch_unwind(AssertUnwindSafe(|| self.apply_job(job, store_now_ms))) {
                    Ok(Ok(result)) => results.push(result),
                    Ok(Err(error)) => return Err(BatchOutcome::Failed(self.not_applied(&error))),
                    Err(payload) => return Err(BatchOutcome::Panicked { index, payload }),
                }
            }
            if !self.take_queued(batch, jobs) {
                break;
            }
        }
        // Persisting the clock with every write transaction is what keeps store time from
        // going backwards across restarts and between processes sharing the file, and lets
        // the next reader run on from it on the monotonic clock.
        if let Some(now) = now {
            store_clock_mark(&self.conn, &now)
                .map_err(|error| BatchOutcome::Failed(self.not_applied(&error)))?;
        }
        Ok(results)
    }

    /// One job: read its record, decide, write the decision. The outer `Err` is an SQLite
    /// failure, which fails the batch; the inner one is this job's own (a corrupt row).
    fn apply_job(
        &self,
        job: &WriteJob,
        store_now_ms: u64,
    ) -> rusqlite::Result<Result<Decision, StoreError>> {
        let record = match load_record(&self.conn, &self.path, &job.actor_id) {
            Ok(record) => record,
            Err(RowError::Corrupt(error)) => return Ok(Err(error)),
            Err(RowError::Sql(error)) => return Err(error),
        };
        let decision = decide(&job.actor_id, record.as_ref(), &job.request, store_now_ms);
        if let Some(written) = &decision.write {
            assert_record_well_formed(written);
            store_record(&self.conn, &job.actor_id, written)?;
        }
        Ok(Ok(decision))
    }

    fn reply(&self, batch: Vec<WriteJob>, outcome: BatchOutcome) {
        // A send fails only if the caller stopped waiting (its future was dropped); the
        // operation's outcome stands either way.
        match outcome {
            BatchOutcome::Committed(results) => {
                assert_eq!(results.len(), batch.len(), "one result per job");
                let operations = u64::try_from(batch.len()).expect("batch length fits u64");
                self.counters.transactions.fetch_add(1, Ordering::Relaxed);
                self.counters
                    .operations
                    .fetch_add(operations, Ordering::Relaxed);
                for (job, result) in batch.into_iter().zip(results) {
                    let _ = job.reply.send(Ok(result));
                }
            }
            BatchOutcome::Failed(error) => {
                for job in batch {
                    let _ = job.reply.send(Ok(Err(error.clone())));
                }
            }
            BatchOutcome::Panicked { index, payload } => {
                let mut payload = Some(payload);
                for (position, job) in batch.into_iter().enumerate() {
                    let reply = if position == index {
                        Err(payload.take().expect("one panicking job"))
                    } else {
                        Ok(Err(StoreError::WriteFailed {
                            reason: format!(
                                "{}: rolled back because another decision in the same \
                                 transaction panicked",
                                self.path
                            ),
                        }))
                    };
                    let _ = job.reply.send(reply);
                }
            }
        }
    }

    /// An error from inside the transaction, which is then rolled back: nothing was applied.
    fn not_applied(&self, error: &rusqlite::Error) -> StoreError {
        StoreError::WriteFailed {
            reason: format!("{}: {error}", self.path),
        }
    }

    fn roll_back(&self) {
        // Some failures (a full disk, an I/O error) make SQLite roll back by itself, leaving no
        // transaction to end; rolling back an open one cannot fail in a way that matters,
        // because an uncommitted transaction is never durable.
        if !self.conn.is_autocommit() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
    }
}
