//! [`SimStorage`]: a linearizable, versioned key-value store inside the simulation.
//!
//! Every operation travels to the store and back: a latency is drawn per operation and split
//! into a request half and a reply half. The operation takes effect atomically at the single
//! simulated instant its request arrives, which is what makes the store linearizable. Faults
//! are drawn at that instant: a failed read or write applies nothing; a commit-unknown write
//! is applied but the caller gets an error. The store is durable: a crash makes it
//! unavailable, and everything applied before the crash is still there after a restart.
//!
//! An operation is awaited on the caller's task, or submitted without one
//! ([`SimStorage::transact_then`]): then the store's own timed events carry it, as the network's
//! carry messages. Operations due at one instant take effect in the order they were submitted,
//! before any task runs at that instant, and the invariants are evaluated after them.

use crate::env::SimEnv;
use crate::fault::FaultType;
use crate::in_flight::InFlightQueue;
use crate::rng::{fnv1a, DeterministicRng};
use crate::runtime::{EventSource, SourceDeadline};
use crate::trace::event;
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::fmt;
use std::rc::Rc;

/// A latency fault adds an extra delay of up to this many times the configured maximum.
pub const STORAGE_LATENCY_SPIKE_FACTOR: u64 = 10;

/// A stored value with its version: 1 after the first write, +1 per write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned<V> {
    /// The value.
    pub value: V,
    /// The version, starting at 1.
    pub version: u64,
}

/// The outcome of a compare-and-swap that reached the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CasOutcome {
    /// The expected version matched and the new value was written.
    Applied {
        /// The version now stored.
        version: u64,
    },
    /// The expected version did not match; nothing was written.
    Conflict {
        /// The version actually stored (`None`: the key is absent).
        current_version: Option<u64>,
    },
}

/// Why a storage operation failed.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorageError {
    /// The write failed and nothing was applied.
    WriteFailed {
        /// The key written.
        key: String,
    },
    /// The read failed.
    ReadFailed {
        /// The key read.
        key: String,
    },
    /// The write was applied, but the caller cannot know that.
    CommitUnknown {
        /// The key written.
        key: String,
    },
    /// The store was crashed; the operation may or may not have been applied.
    Unavailable {
        /// The store's name.
        store: String,
        /// The key of the operation.
        key: String,
    },
}

impl StorageError {
    /// Writes this error's message (its [`Display`](fmt::Display)) to `out`.
    ///
    /// Into a `String`, the pieces are appended directly, without the formatting machinery a
    /// `{}` goes through: the swarm's storage faults turn thousands of these into a lease
    /// store's error message a seed, and `format!` cost five times as much.
    pub fn write_message(&self, out: &mut impl fmt::Write) -> fmt::Result {
        match self {
            StorageError::WriteFailed { key } => {
                out.write_str("write to ")?;
                write_quoted(out, key)?;
                out.write_str(" failed; nothing was applied")
            }
            StorageError::ReadFailed { key } => {
                out.write_str("read of ")?;
                write_quoted(out, key)?;
                out.write_str(" failed")
            }
            StorageError::CommitUnknown { key } => {
                out.write_str("write to ")?;
                write_quoted(out, key)?;
                out.write_str(" returned an error but may have been applied (commit unknown)")
            }
            StorageError::Unavailable { store, key } => {
                out.write_str("store ")?;
                write_quoted(out, store)?;
                out.write_str(" is unavailable; the operation on ")?;
                write_quoted(out, key)?;
                out.write_str(" may or may not have been applied")
            }
        }
    }
}

impl fmt::Display for StorageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write_message(f)
    }
}

/// Writes `text` as `{:?}` shows it (quoted, escaped), in one piece when it needs no escape:
/// keys are mostly ids.
fn write_quoted(out: &mut impl fmt::Write, text: &str) -> fmt::Result {
    let plain = text
        .bytes()
        .all(|b| matches!(b, b' '..=b'~') && b != b'"' && b != b'\\');
    if plain {
        out.write_char('"')?;
        out.write_str(text)?;
        out.write_char('"')
    } else {
        write!(out, "{text:?}")
    }
}

/// Operation kinds, folded into the trace.
#[derive(Debug, Clone, Copy)]
enum OpKind {
    Get = 1,
    Put = 2,
    CompareAndSwap = 3,
    Transact = 4,
}

struct StorageInner<V> {
    env: SimEnv,
    id: u64,
    name: String,
    /// Looked up by hashing; [`SimStorage::keys`] and [`SimStorage::snapshot`] sort.
    data: RefCell<indexmap::IndexMap<String, Versioned<V>, foldhash::fast::FixedState>>,
    crashed: Cell<bool>,
    /// Incremented at every crash, so an operation can tell it spanned one.
    epoch: Cell<u64>,
    operations: Cell<u64>,
    rng: RefCell<DeterministicRng>,
    /// The places in `data` of the keys written since the changed keys were last taken
    /// ([`SimStorage::take_changed_keys`], [`SimStorage::take_changed_places_into`]).
    changed: RefCell<Vec<usize>>,
    /// The operations submitted with [`SimStorage::transact_then`], by the instant of their
    /// next phase; created (and the store registered as an event source) by the first.
    pending: RefCell<Option<InFlightQueue<Box<dyn PendingOp<V>>>>>,
    /// `pending`'s earliest instant, published to the runtime after every change.
    next_pending_ms: SourceDeadline,
}

/// An operation submitted with [`SimStorage::transact_then`], between its phases: its request
/// on the way to the store, then its reply on the way back.
trait PendingOp<V> {
    /// Runs the operation's next phase at `now_ms`: the effect at the store, or the answer.
    /// Returns when the phase after it is due; `None` once the operation is answered.
    fn fire(&mut self, store: &StorageInner<V>, now_ms: u64) -> Option<u64>;
}

/// A [`SimStorage::transact_then`] in flight.
struct Transaction<K, F, R, D> {
    key: K,
    /// The store's crash count at the call: a crash since loses the request or the reply.
    epoch: u64,
    reply_ms: u64,
    phase: Phase<F, R>,
    /// Called with the outcome, once.
    done: Option<D>,
}

/// Where a [`Transaction`] is.
enum Phase<F, R> {
    /// On its way to the store, with its step.
    Request(F),
    /// Applied, its outcome on its way back.
    Reply(Result<R, StorageError>),
    /// Answered.
    Answered,
}

impl<V, K, F, R, D> PendingOp<V> for Transaction<K, F, R, D>
where
    V: Clone + 'static,
    K: AsRef<str>,
    F: FnOnce(Option<&Versioned<V>>, u64) -> (Option<V>, R),
    D: FnOnce(Result<R, StorageError>),
{
    fn fire(&mut self, store: &StorageInner<V>, now_ms: u64) -> Option<u64> {
        let key = self.key.as_ref();
        let lost = store.lost_since(self.epoch);
        let result = match std::mem::replace(&mut self.phase, Phase::Answered) {
            // The request was lost with the crash; nothing was applied.
            Phase::Request(_) if lost => Err(store.unavailable(key)),
            Phase::Request(step) => {
                let (result, version) = store.read_modify_write_at(key, step, now_ms);
                store.trace_op(OpKind::Transact, key, &result, version);
                store.env.runtime().request_check();
                self.phase = Phase::Reply(result);
                return Some(now_ms + self.reply_ms);
            }
            // The reply was lost with the crash; the operation may have been applied.
            Phase::Reply(_) if lost => Err(store.unavailable(key)),
            Phase::Reply(result) => result,
            Phase::Answered => unreachable!("an answered operation fired again"),
        };
        (self.done.take().expect("an operation is answered once"))(result);
        None
    }
}

/// A shared handle to a simulated store holding values of type `V`. Cloning shares the store.
pub struct SimStorage<V> {
    inner: Rc<StorageInner<V>>,
}

impl<V> Clone for SimStorage<V> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<V: Clone + 'static> SimStorage<V> {
    /// A new, empty store named after its creation order (`storage-0`, `storage-1`, ...).
    pub fn new(env: &SimEnv) -> Self {
        let id = env.runtime().next_component_id("storage");
        Self::with_id(env, id, format!("storage-{id}"))
    }

    /// A new, empty store with a chosen name (which also names its random stream, so the
    /// store's latencies do not depend on how many other stores were created before it).
    pub fn named(env: &SimEnv, name: &str) -> Self {
        let id = env.runtime().next_component_id("storage");
        Self::with_id(env, id, name.to_string())
    }

    fn with_id(env: &SimEnv, id: u64, name: String) -> Self {
        let inner = StorageInner {
            env: env.clone(),
            id,
            rng: RefCell::new(env.rng(&format!("storage/{name}"))),
            name,
            data: RefCell::new(indexmap::IndexMap::default()),
            crashed: Cell::new(false),
            epoch: Cell::new(0),
            operations: Cell::new(0),
            changed: RefCell::new(Vec::new()),
            pending: RefCell::new(None),
            next_pending_ms: SourceDeadline::default(),
        };
        Self {
            inner: Rc::new(inner),
        }
    }

    /// The store's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Reads `key`.
    pub async fn get(&self, key: &str) -> Result<Option<Versioned<V>>, StorageError> {
        self.execute(OpKind::Get, key, |store, key, _| {
            if store.env.should_inject(FaultType::StorageReadFail) {
                return store.read_failed(key);
            }
            let current = store.data.borrow().get(key).cloned();
            let version = current.as_ref().map_or(0, |v| v.version);
            (Ok(current), version)
        })
        .await
    }

    /// Writes `value` to `key` unconditionally; returns the new version.
    pub async fn put(&self, key: &str, value: V) -> Result<u64, StorageError> {
        self.execute(OpKind::Put, key, |store, key, _| {
            let current = store
                .data
                .borrow()
                .get_full(key)
                .map(|(at, _, v)| (at, v.version));
            store.write(key, current, value)
        })
        .await
    }

    /// Writes `value` if the stored version is `expected_version` (`None`: the key must be
    /// absent).
    pub async fn compare_and_swap(
        &self,
        key: &str,
        expected_version: Option<u64>,
        value: V,
    ) -> Result<CasOutcome, StorageError> {
        self.read_modify_write(OpKind::CompareAndSwap, key, move |current, _| {
            let current_version = current.map(|v| v.version);
            if current_version == expected_version {
                let version = current_version.unwrap_or(0) + 1;
                (Some(value), CasOutcome::Applied { version })
            } else {
                (None, CasOutcome::Conflict { current_version })
            }
        })
        .await
    }

    /// The general atomic step. At the instant the request reaches the store, calls
    /// `f(current, store_now_ms)`. If it returns `(Some(new), r)`, `new` is written with the
    /// next version (subject to write faults: a write failure applies nothing, a
    /// commit-unknown applies it but returns an error); with `(None, r)` nothing is written.
    /// Read faults apply either way. Returns `r`.
    ///
    /// `current` is the stored value itself, not a copy: the store stays borrowed while `f`
    /// runs, so `f` may read it (say, through [`SimStorage::peek`]) but must not write it.
    ///
    /// # Panics
    /// If `f` writes to this store: the step's own write is what it returns.
    pub async fn transact<R>(
        &self,
        key: &str,
        f: impl FnOnce(Option<&Versioned<V>>, u64) -> (Option<V>, R),
    ) -> Result<R, StorageError> {
        self.read_modify_write(OpKind::Transact, key, f).await
    }

    /// A read-modify-write step shared by `transact` and `compare_and_swap`.
    async fn read_modify_write<R>(
        &self,
        kind: OpKind,
        key: &str,
        f: impl FnOnce(Option<&Versioned<V>>, u64) -> (Option<V>, R),
    ) -> Result<R, StorageError> {
        self.execute(kind, key, |store, key, now_ms| {
            store.read_modify_write_at(key, f, now_ms)
        })
        .await
    }

    /// [`SimStorage::transact`] without a task: `done` is called with the outcome when the
    /// reply arrives, from the store's own timed events, as the network delivers messages.
    /// The operation takes the same course (latency drawn at the call, effect when the request
    /// arrives, faults, crashes), with no future to poll: at each phase a task would be woken
    /// and polled, an event fires instead, and the invariants are evaluated after the effect
    /// as after a task's step. If the store is crashed, `done` is called at once.
    pub fn transact_then<K, R, F, D>(&self, key: K, f: F, done: D)
    where
        K: AsRef<str> + 'static,
        R: 'static,
        F: FnOnce(Option<&Versioned<V>>, u64) -> (Option<V>, R) + 'static,
        D: FnOnce(Result<R, StorageError>) + 'static,
    {
        let store = &*self.inner;
        let (epoch, request_ms, reply_ms) = match store.begin(key.as_ref()) {
            Ok(begun) => begun,
            Err(unavailable) => return done(Err(unavailable)),
        };
        let operation = Transaction {
            key,
            epoch,
            reply_ms,
            phase: Phase::Request(f),
            done: Some(done),
        };
        let now_ms = store.env.now_ms();
        let mut pending = store.pending.borrow_mut();
        let queue = pending.get_or_insert_with(|| {
            let source: Rc<dyn EventSource> = self.inner.clone();
            store
                .env
                .runtime()
                .add_source(Rc::downgrade(&source), store.next_pending_ms.clone());
            InFlightQueue::new(store.latency_ms_max())
        });
        queue.push(now_ms, now_ms + request_ms, Box::new(operation));
        store.next_pending_ms.set(queue.next_deadline_ms());
    }

    /// The keys written since the last call (a key written twice appears twice), for checkers
    /// that follow the truth incrementally instead of scanning it.
    pub fn take_changed_keys(&self) -> Vec<String> {
        let places = std::mem::take(&mut *self.inner.changed.borrow_mut());
        let key = |place: usize| self.key_at(place).expect("a written key's place");
        places.into_iter().map(key).collect()
    }

    /// Whether any key was written since the changed keys were last taken.
    pub fn has_changed_keys(&self) -> bool {
        !self.inner.changed.borrow().is_empty()
    }

    /// Moves the places of the keys written since the changed keys were last taken into
    /// `places` (cleared first; a key written twice appears twice), keeping both buffers'
    /// memory: a checker that asks after every step allocates nothing, and reads each key and
    /// value at its place ([`SimStorage::key_at`], [`SimStorage::peek_at`]) without hashing
    /// the key. A place is a key's for as long as the store lives: keys are never removed.
    pub fn take_changed_places_into(&self, places: &mut Vec<usize>) {
        places.clear();
        std::mem::swap(places, &mut *self.inner.changed.borrow_mut());
    }

    /// The key at `place` (see [`SimStorage::take_changed_places_into`]), if there is one.
    pub fn key_at(&self, place: usize) -> Option<String> {
        let data = self.inner.data.borrow();
        data.get_index(place).map(|(key, _)| key.clone())
    }

    /// The stored value of `key`: ground truth for checkers, with no latency, no faults, and
    /// nothing traced.
    pub fn peek(&self, key: &str) -> Option<Versioned<V>> {
        self.inner.data.borrow().get(key).cloned()
    }

    /// [`SimStorage::peek`] of the key at `place`.
    pub fn peek_at(&self, place: usize) -> Option<Versioned<V>> {
        let data = self.inner.data.borrow();
        data.get_index(place).map(|(_, value)| value.clone())
    }

    /// All keys, in order.
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.inner.data.borrow().keys().cloned().collect();
        keys.sort_unstable();
        keys
    }

    /// A copy of the whole store.
    pub fn snapshot(&self) -> BTreeMap<String, Versioned<V>> {
        let data = self.inner.data.borrow();
        data.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// The store's clock: global simulated time.
    pub fn now_ms(&self) -> u64 {
        self.inner.env.now_ms()
    }

    /// Crashes the store: operations fail with [`StorageError::Unavailable`] until
    /// [`SimStorage::restart`]. Applied writes are durable and survive.
    pub fn crash(&self) {
        self.inner.crashed.set(true);
        self.inner.epoch.set(self.inner.epoch.get() + 1);
        self.inner
            .env
            .trace(fnv1a(b"storage-crash") ^ self.inner.id);
    }

    /// Brings a crashed store back with everything it had applied.
    pub fn restart(&self) {
        self.inner.crashed.set(false);
        self.inner
            .env
            .trace(fnv1a(b"storage-restart") ^ self.inner.id);
    }

    /// Whether the store is crashed.
    pub fn is_crashed(&self) -> bool {
        self.inner.crashed.get()
    }

    /// Operations issued so far (including failed ones).
    pub fn operations(&self) -> u64 {
        self.inner.operations.get()
    }

    /// The longest an operation can take from its call to its effect at the store: the
    /// request half of the longest latency, spike included.
    pub fn request_latency_ms_max(&self) -> u64 {
        self.inner.request_latency_ms_max()
    }

    /// Runs one operation: request latency, `apply` at the store, reply latency.
    async fn execute<R>(
        &self,
        kind: OpKind,
        key: &str,
        apply: impl FnOnce(&StorageInner<V>, &str, u64) -> (Result<R, StorageError>, u64),
    ) -> Result<R, StorageError> {
        let store = &*self.inner;
        let (epoch, request_ms, reply_ms) = store.begin(key)?;
        store.env.sleep_ms(request_ms).await;
        if store.lost_since(epoch) {
            // The request was lost with the crash; nothing was applied.
            return Err(store.unavailable(key));
        }
        let (result, version) = apply(store, key, store.env.now_ms());
        store.trace_op(kind, key, &result, version);
        store.env.sleep_ms(reply_ms).await;
        if store.lost_since(epoch) {
            // The reply was lost with the crash; the operation may have been applied.
            return Err(store.unavailable(key));
        }
        result
    }
}

impl<V: Clone + 'static> EventSource for StorageInner<V> {
    fn next_deadline_ms(&self) -> Option<u64> {
        self.pending.borrow().as_ref()?.next_deadline_ms()
    }

    fn fire_due(&self, now_ms: u64) {
        loop {
            // Out of the queue while it fires: its answer may submit another operation.
            let due = (self.pending.borrow_mut().as_mut()).and_then(|queue| queue.pop_due(now_ms));
            let Some(mut operation) = due else { break };
            if let Some(at_ms) = operation.fire(self, now_ms) {
                let mut pending = self.pending.borrow_mut();
                let queue = pending
                    .as_mut()
                    .expect("a store with operations has a queue");
                queue.push(now_ms, at_ms, operation);
            }
        }
        self.next_pending_ms.set(self.next_deadline_ms());
    }

    fn teardown(&self) {
        // Dropped outside the borrow: an operation's answer may hold this store.
        let pending = self.pending.take();
        drop(pending);
        self.next_pending_ms.set(None);
    }
}

impl<V: Clone + 'static> StorageInner<V> {
    /// Starts an operation on `key`: counts it and, unless the store is crashed (then it is
    /// unavailable at once), draws its latency. Returns the crash count it started in, and the
    /// request and reply halves of its latency.
    fn begin(&self, key: &str) -> Result<(u64, u64, u64), StorageError> {
        self.operations.set(self.operations.get() + 1);
        if self.crashed.get() {
            return Err(self.unavailable(key));
        }
        let (request_ms, reply_ms) = self.draw_latency_ms();
        Ok((self.epoch.get(), request_ms, reply_ms))
    }

    /// Whether an operation begun in crash count `epoch` lost its request or its reply: the
    /// store is down, or crashed (and maybe restarted) since.
    fn lost_since(&self, epoch: u64) -> bool {
        self.crashed.get() || self.epoch.get() != epoch
    }

    /// The read-modify-write step of `transact` and `compare_and_swap` at `now_ms`, the
    /// instant its request reaches the store: read faults, `f`, then the write with its faults.
    fn read_modify_write_at<R>(
        &self,
        key: &str,
        f: impl FnOnce(Option<&Versioned<V>>, u64) -> (Option<V>, R),
        now_ms: u64,
    ) -> (Result<R, StorageError>, u64) {
        if self.env.should_inject(FaultType::StorageReadFail) {
            return self.read_failed(key);
        }
        // `f` sees the stored value in place, not a clone (whose fields' reference counts
        // would go up and down for nothing): the data stays borrowed while it runs, so `f`
        // may read the store (say, through `peek`), and a write from `f` panics (see
        // `SimStorage::transact`).
        let (stored, new_value, result) = {
            let data = self.data.borrow();
            let found = data.get_full(key);
            let stored = found.map(|(at, _, current)| (at, current.version));
            let (new_value, result) = f(found.map(|(_, _, current)| current), now_ms);
            (stored, new_value, result)
        };
        match new_value {
            Some(value) => {
                let (written, version) = self.write(key, stored, value);
                (written.map(|_| result), version)
            }
            None => (Ok(result), stored.map_or(0, |(_, version)| version)),
        }
    }

    /// A read that failed, with the key's version (which it leaves as it was).
    #[cold]
    fn read_failed<R>(&self, key: &str) -> (Result<R, StorageError>, u64) {
        let version = self.data.borrow().get(key).map_or(0, |v| v.version);
        let error = StorageError::ReadFailed {
            key: key.to_string(),
        };
        (Err(error), version)
    }

    /// Writes `value` as the version after the stored one, drawing write faults. `stored` is
    /// the key's place in the map and its version, as the caller read them in this operation
    /// (`None`: the key is absent); keys are never removed, so the place stays the key's.
    /// Returns the outcome and the key's version afterwards (still the stored one if the
    /// write failed).
    fn write(
        &self,
        key: &str,
        stored: Option<(usize, u64)>,
        value: V,
    ) -> (Result<u64, StorageError>, u64) {
        let current_version = stored.map(|(_, version)| version);
        if self.env.should_inject(FaultType::StorageWriteFail) {
            let error = StorageError::WriteFailed {
                key: key.to_string(),
            };
            return (Err(error), current_version.unwrap_or(0));
        }
        let version = current_version.unwrap_or(0) + 1;
        let versioned = Versioned { value, version };
        let mut data = self.data.borrow_mut();
        // The key is copied only the first time it is written.
        let place = match stored {
            Some((at, _)) => {
                let (at_key, slot) = data.get_index_mut(at).expect("a stored key's place");
                debug_assert_eq!(at_key, key, "the place is the key's");
                *slot = versioned;
                at
            }
            None => {
                let (at, previous) = data.insert_full(key.to_string(), versioned);
                debug_assert!(previous.is_none(), "an absent key was absent");
                at
            }
        };
        drop(data);
        self.changed.borrow_mut().push(place);
        if self.env.should_inject(FaultType::StorageCommitUnknown) {
            let error = StorageError::CommitUnknown {
                key: key.to_string(),
            };
            return (Err(error), version);
        }
        (Ok(version), version)
    }

    /// The request and reply halves of this operation's latency.
    fn draw_latency_ms(&self) -> (u64, u64) {
        let config = self.env.config();
        let (min_ms, max_ms) = (config.storage_latency_ms_min, config.storage_latency_ms_max);
        let mut rng = self.rng.borrow_mut();
        let mut latency_ms = rng.between(min_ms, max_ms);
        if self.env.should_inject(FaultType::StorageLatency) {
            let spike_base_ms = max_ms.max(1);
            latency_ms += rng.between(spike_base_ms, spike_base_ms * STORAGE_LATENCY_SPIKE_FACTOR);
        }
        let request_ms = latency_ms / 2;
        assert!(
            request_ms <= self.request_latency_ms_max(),
            "a storage request drew {request_ms} ms, beyond request_latency_ms_max {} ms",
            self.request_latency_ms_max()
        );
        (request_ms, latency_ms - request_ms)
    }

    /// The longest latency an operation can draw, spike included.
    fn latency_ms_max(&self) -> u64 {
        let max_ms = self.env.config().storage_latency_ms_max;
        max_ms + max_ms.max(1) * STORAGE_LATENCY_SPIKE_FACTOR
    }

    /// The request half of [`Self::latency_ms_max`].
    fn request_latency_ms_max(&self) -> u64 {
        self.latency_ms_max() / 2
    }

    fn unavailable(&self, key: &str) -> StorageError {
        StorageError::Unavailable {
            store: self.name.clone(),
            key: key.to_string(),
        }
    }

    /// Folds an operation into the trace: its kind and key, its outcome, and the key's
    /// version afterwards (`version`, 0 for an absent key).
    fn trace_op<R>(&self, kind: OpKind, key: &str, result: &Result<R, StorageError>, version: u64) {
        let outcome = match result {
            Ok(_) => 0,
            Err(StorageError::WriteFailed { .. }) => 1,
            Err(StorageError::ReadFailed { .. }) => 2,
            Err(StorageError::CommitUnknown { .. }) => 3,
            Err(StorageError::Unavailable { .. }) => 4,
        };
        debug_assert_eq!(
            version,
            self.data.borrow().get(key).map_or(0, |v| v.version),
            "the traced version is the key's"
        );
        self.env.runtime().trace.event(
            event::STORAGE,
            (self.id << 8) | kind as u64,
            fnv1a(key.as_bytes()),
        );
        self.env
            .runtime()
            .trace
            .event(event::STORAGE, outcome, version);
    }
}

impl<V> fmt::Debug for SimStorage<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimStorage")
            .field("name", &self.inner.name)
            .field("keys", &self.inner.data.borrow().len())
            .field("crashed", &self.inner.crashed.get())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{SimConfig, SimError, Simulation};

    /// A key shows in errors exactly as `{:?}` shows it, whether written in one piece or
    /// escaped.
    #[test]
    fn a_quoted_key_reads_as_its_debug_form() {
        let keys = [
            "actor-0042",
            "",
            " ~",
            "a\"b",
            "back\\slash",
            "tab\there",
            "new\nline",
            "nul\0",
            "del\u{7f}",
            "é",
            "it's",
            "{}",
        ];
        for key in keys {
            let mut quoted = String::new();
            write_quoted(&mut quoted, key).unwrap();
            assert_eq!(quoted, format!("{key:?}"), "{key:?}");
        }
        let key = || "a\"b".to_string();
        let messages = [
            (
                StorageError::WriteFailed { key: key() },
                "write to \"a\\\"b\" failed; nothing was applied",
            ),
            (
                StorageError::ReadFailed { key: key() },
                "read of \"a\\\"b\" failed",
            ),
            (
                StorageError::CommitUnknown { key: key() },
                "write to \"a\\\"b\" returned an error but may have been applied (commit unknown)",
            ),
            (
                StorageError::Unavailable {
                    store: "s\n1".to_string(),
                    key: "k".to_string(),
                },
                "store \"s\\n1\" is unavailable; the operation on \"k\" may or may not have been \
                 applied",
            ),
        ];
        for (error, message) in messages {
            assert_eq!(error.to_string(), message);
            let mut written = String::new();
            error.write_message(&mut written).unwrap();
            assert_eq!(written, message);
        }
    }

    #[test]
    fn versions_count_writes_and_cas_detects_conflicts() {
        let report = Simulation::new(SimConfig::new(1).with_check_determinism(false))
            .run(|env| async move {
                let store = env.storage::<&'static str>();
                assert_eq!(store.put("k", "a").await, Ok(1));
                assert_eq!(store.put("k", "b").await, Ok(2));
                let stale = store.compare_and_swap("k", Some(1), "c").await;
                assert_eq!(
                    stale,
                    Ok(CasOutcome::Conflict {
                        current_version: Some(2)
                    })
                );
                let absent = store.compare_and_swap("new", None, "x").await;
                assert_eq!(absent, Ok(CasOutcome::Applied { version: 1 }));
                let seen = store
                    .transact("k", |current, now_ms| (None, (current.cloned(), now_ms)))
                    .await;
                let (current, at_ms) = seen.map_err(|e| e.to_string())?;
                assert_eq!(current.map(|v| (v.value, v.version)), Some(("b", 2)));
                assert!(
                    at_ms < env.now_ms(),
                    "applied at the request's arrival, before the reply"
                );
                assert_eq!(store.keys(), vec!["k".to_string(), "new".to_string()]);
                assert_eq!(store.operations(), 5);
                Ok::<(), String>(())
            })
            .unwrap();
        assert!(
            report.sim_time_ms >= 5,
            "five operations of at least 1 ms each"
        );
    }

    /// A transaction's step sees the stored value in place, and may read the store meanwhile.
    #[test]
    fn a_transactions_step_may_read_its_store() {
        Simulation::new(SimConfig::new(1).with_check_determinism(false))
            .run(|env| async move {
                let store = env.storage::<u32>();
                for (key, value) in [("a", 1), ("b", 2)] {
                    store.put(key, value).await.map_err(|e| e.to_string())?;
                }
                let reader = store.clone();
                let step = move |current: Option<&Versioned<u32>>, _| {
                    let other = reader.peek("b").map(|v| v.value);
                    let value = current.map(|v| v.value);
                    (value.map(|value| value + 10), (value, other))
                };
                assert_eq!(store.transact("a", step).await, Ok((Some(1), Some(2))));
                assert_eq!(store.peek("a").map(|v| (v.value, v.version)), Some((11, 2)));
                Ok::<(), String>(())
            })
            .unwrap();
    }

    #[test]
    fn changed_keys_are_taken_by_place_once_each() {
        Simulation::new(SimConfig::new(1).with_check_determinism(false))
            .run(|env| async move {
                let store = env.storage::<u32>();
                let mut places = vec![99];
                store.take_changed_places_into(&mut places);
                assert!(
                    places.is_empty(),
                    "nothing written yet, and the buffer cleared"
                );
                assert_eq!(store.put("a", 1).await, Ok(1));
                assert_eq!(store.put("bb", 2).await, Ok(1));
                assert_eq!(store.put("a", 3).await, Ok(2));
                assert!(store.has_changed_keys());
                store.take_changed_places_into(&mut places);
                let keys: Vec<String> =
                    (places.iter()).map(|&p| store.key_at(p).unwrap()).collect();
                assert_eq!(keys, ["a", "bb", "a"]);
                assert_eq!(places[0], places[2], "one place per key");
                assert_eq!(
                    store.peek_at(places[0]).map(|v| (v.value, v.version)),
                    Some((3, 2))
                );
                assert_eq!(store.peek_at(places[1]), store.peek("bb"));
                assert!(!store.has_changed_keys(), "taken");
                let buffer = places.as_ptr();
                assert_eq!(store.put("c", 4).await, Ok(1));
                store.take_changed_places_into(&mut places);
                assert_eq!(places.len(), 1, "only what was written since");
                assert_eq!(store.key_at(places[0]).as_deref(), Some("c"));
                assert_eq!(store.put("bb", 5).await, Ok(2));
                store.take_changed_places_into(&mut places);
                assert_eq!(store.take_changed_keys(), Vec::<String>::new(), "taken");
                assert_eq!(
                    places.as_ptr(),
                    buffer,
                    "the buffers are swapped, not reallocated"
                );
                assert_eq!(store.key_at(places[0]).as_deref(), Some("bb"));
                assert_eq!(store.key_at(9), None);
                assert_eq!(store.peek_at(9), None);
                assert_eq!(store.put("d", 6).await, Ok(1));
                assert_eq!(store.take_changed_keys(), ["d"]);
                Ok::<(), String>(())
            })
            .unwrap();
    }

    /// The outcome of a [`SimStorage::transact_then`], with the instant it was answered.
    type Answer<R> = Rc<RefCell<Option<(Result<R, StorageError>, u64)>>>;

    /// Submits a write of `value` to `k` whose answer lands in the returned cell.
    fn submit(env: &SimEnv, store: &SimStorage<u32>, value: u32) -> Answer<u64> {
        let answer: Answer<u64> = Rc::default();
        let (slot, answer_env) = (Rc::clone(&answer), env.clone());
        store.transact_then(
            "k",
            move |_, now_ms| (Some(value), now_ms),
            move |result| *slot.borrow_mut() = Some((result, answer_env.now_ms())),
        );
        answer
    }

    /// Storage latency of exactly 10 ms: 5 ms to the store, 5 ms back.
    fn fixed_latency() -> SimConfig {
        SimConfig::new(1)
            .with_check_determinism(false)
            .with_storage_latency_ms(10, 10)
    }

    /// Without a task, an operation takes the course `transact` takes: its effect when the
    /// request arrives, its answer when the reply does, with nothing in between.
    #[test]
    fn an_operation_without_a_task_takes_effect_on_arrival_and_is_answered_on_reply() {
        Simulation::new(fixed_latency())
            .run(|env| async move {
                let store = env.storage::<u32>();
                let answer = submit(&env, &store, 7);
                assert_eq!(store.operations(), 1);
                env.sleep_ms(4).await;
                assert_eq!(store.peek("k"), None, "still on its way");
                env.sleep_until_ms(5).await;
                let applied = store.peek("k").map(|v| (v.value, v.version));
                assert_eq!(applied, Some((7, 1)), "applied on arrival");
                assert!(answer.borrow().is_none(), "the reply is on its way");
                env.sleep_until_ms(10).await;
                assert_eq!(
                    answer.take(),
                    Some((Ok(5), 10)),
                    "decided at 5, answered at 10"
                );
                // `transact` takes the same course.
                let awaited = store.transact("k", |_, now_ms| (Some(8), now_ms)).await;
                assert_eq!((awaited, env.now_ms()), (Ok(15), 20));
                Ok::<(), String>(())
            })
            .unwrap();
    }

    /// A crash loses the request (nothing applied) or the reply (applied); a crashed store
    /// answers at once. Each answer says the operation may or may not have been applied.
    #[test]
    fn a_crash_loses_an_operations_request_or_its_reply() {
        Simulation::new(fixed_latency())
            .run(|env| async move {
                let store = env.storage::<u32>();
                let unavailable = Err(store.inner.unavailable("k"));

                store.crash();
                let at_once = submit(&env, &store, 1);
                assert_eq!(at_once.take(), Some((unavailable.clone(), 0)));
                store.restart();

                let request_lost = submit(&env, &store, 2);
                env.sleep_ms(2).await;
                store.crash();
                store.restart();
                env.sleep_until_ms(10).await;
                assert_eq!(request_lost.take(), Some((unavailable.clone(), 5)));
                assert_eq!(store.peek("k"), None, "the lost request applied nothing");

                let reply_lost = submit(&env, &store, 3);
                env.sleep_ms(7).await;
                assert_eq!(store.peek("k").map(|v| v.value), Some(3));
                store.crash();
                store.restart();
                env.sleep_ms(10).await;
                assert_eq!(reply_lost.take(), Some((unavailable, 20)));
                assert_eq!(
                    store.peek("k").map(|v| v.value),
                    Some(3),
                    "applied all the same"
                );
                assert_eq!(store.operations(), 3);
                Ok::<(), String>(())
            })
            .unwrap();
    }

    /// The invariants judge an operation's effect at its instant, as they judge a task's step,
    /// though no task runs then: here the next task's step comes 95 ms later.
    #[test]
    fn invariants_are_evaluated_after_an_operations_effect() {
        let error = Simulation::new(fixed_latency())
            .run(|env| async move {
                let store = env.storage::<u32>();
                let judged = store.clone();
                env.add_invariant("k is never written", move || match judged.peek("k") {
                    Some(_) => Err("k was written".to_string()),
                    None => Ok(()),
                });
                let _answer = submit(&env, &store, 1);
                env.sleep_ms(100).await;
                Ok::<(), String>(())
            })
            .unwrap_err();
        match error {
            SimError::InvariantViolated {
                sim_time_ms,
                invariant,
                ..
            } => assert_eq!((sim_time_ms, invariant.as_str()), (5, "k is never written")),
            other => panic!("expected the invariant to fail at the effect, got {other}"),
        }
    }

    /// An operation still in flight when the run ends is dropped with it, although its
    /// answer holds the store that holds the operation.
    #[test]
    fn operations_in_flight_at_the_end_are_dropped() {
        let dropped = crate::sim::dropped_with_the_run(fixed_latency(), |env| {
            let store = env.storage::<u32>();
            let held = store.clone();
            store.transact_then("k", |_, _| (Some(1), ()), move |_| drop(held));
            Rc::downgrade(&store.inner)
        });
        assert!(dropped, "the store and its operation were dropped");
    }
}
