//! The task table and ready queue of the single-threaded executor.
//!
//! Tasks live in a slab of slots addressed by index and generation, so a waker that outlives
//! its task can never wake a newer task that reused the slot. Wakers must be `Send + Sync`
//! (the [`kelpie_core::Clock`] contract lets a sleep future travel), so the ready queue, the
//! clock and the timers live in [`Shared`]: the clock in atomics, the queue of wakes from other
//! threads behind a mutex, and the timers owned by the simulation's thread
//! ([`ThreadOwned`](crate::owned::ThreadOwned): reached from another thread, they panic).
//!
//! Each runtime has its own ready queue ([`LocalReady`]) that it takes from directly. While it
//! drives its tasks, a thread-local slot points at that queue ([`DrivingGuard`]): a wake on the
//! driving thread, which is every wake of a simulation, then pushes there with no lock and no
//! atomic read-modify-write. A wake from any other thread still goes through the mutex, and the
//! runtime takes those in before each step.

use crate::owned::{OwnedGuard, ThreadOwned};
use crate::timer::TimerQueue;
use std::cell::RefCell;
use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Wake, Waker};

/// A spawned task's future, type-erased.
pub(crate) type LocalTask = Pin<Box<dyn Future<Output = ()>>>;

/// Locks `mutex`, ignoring poisoning: a panic inside the simulation is caught and reported,
/// and the state the lock guards (a queue of ids or wakers) stays consistent regardless.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The part of the executor that wakers and clocks reach: `Send + Sync`.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    now_ms: AtomicU64,
    /// Tasks woken while the runtime was not driving, or from another thread.
    ready: Mutex<Vec<TaskKey>>,
    /// Set when `ready` received a task while the runtime was driving.
    woken_elsewhere: AtomicBool,
    /// Set, removed and fired at nearly every step, always on the simulation's thread.
    timers: ThreadOwned<TimerQueue>,
    /// Whether any timer is pending, and the earliest deadline: published by [`TimersGuard`]
    /// whenever the timers change, so the run loop finds the next event without borrowing them.
    timer_pending: AtomicBool,
    next_timer_ms: AtomicU64,
    /// The last node clock id handed out ([`Self::new_clock_id`]).
    last_clock_id: AtomicU64,
}

/// The borrowed timers. Releasing them publishes their earliest deadline in [`Shared`].
pub(crate) struct TimersGuard<'a> {
    queue: OwnedGuard<'a, TimerQueue>,
    shared: &'a Shared,
}

impl Deref for TimersGuard<'_> {
    type Target = TimerQueue;

    fn deref(&self) -> &TimerQueue {
        &self.queue
    }
}

impl DerefMut for TimersGuard<'_> {
    fn deref_mut(&mut self) -> &mut TimerQueue {
        &mut self.queue
    }
}

impl Drop for TimersGuard<'_> {
    fn drop(&mut self) {
        let next_ms = self.queue.next_deadline_ms();
        self.shared
            .next_timer_ms
            .store(next_ms.unwrap_or(0), Ordering::Release);
        self.shared
            .timer_pending
            .store(next_ms.is_some(), Ordering::Release);
    }
}

/// The ready queue of one runtime. The runtime takes from it directly (no lock, no
/// thread-local lookup); while the runtime drives, a wake on its thread, which is every wake
/// of a simulation, finds it through [`DRIVING`] and pushes with no lock and no atomic
/// read-modify-write. Wakes from elsewhere go to [`Shared`]'s mutex and are taken in before
/// each step.
#[derive(Debug)]
pub(crate) struct LocalReady {
    /// The address of the runtime's [`Shared`]: its identity for wakers, unique while the
    /// runtime is alive.
    owner: usize,
    queue: RefCell<Vec<TaskKey>>,
}

thread_local! {
    /// The ready queue of the runtime driving on this thread, if any.
    static DRIVING: RefCell<Option<Rc<LocalReady>>> = const { RefCell::new(None) };
}

impl LocalReady {
    /// The ready queue of the runtime whose shared part is `shared`.
    pub(crate) fn new(shared: &Arc<Shared>) -> Self {
        Self {
            owner: shared.id(),
            queue: RefCell::new(Vec::new()),
        }
    }

    /// Takes in the tasks woken elsewhere, then removes and returns the task `choose(count)`
    /// picks among the `count` ready ones; `None` if none is ready.
    #[inline(always)]
    pub(crate) fn take(
        &self,
        shared: &Shared,
        choose: impl FnOnce(usize) -> usize,
    ) -> Option<TaskKey> {
        let mut queue = self.queue.borrow_mut();
        if shared.woken_elsewhere.load(Ordering::Acquire) {
            shared.woken_elsewhere.store(false, Ordering::Release);
            queue.append(&mut shared.ready());
        }
        match queue.len() {
            0 => None,
            1 => queue.pop(),
            count => Some(queue.swap_remove(choose(count))),
        }
    }

    /// Queues `task` exactly as waking its [`Waker`] would while this runtime drives on this
    /// thread (a wake then lands in this queue), minus the waker's vtable call and
    /// thread-local lookup: the network wakes its receivers this way, one per message burst.
    #[inline]
    pub(crate) fn wake(&self, task: &TaskRef) {
        debug_assert!(
            DRIVING.with(|d| d
                .borrow()
                .as_ref()
                .is_some_and(|local| local.owner == self.owner)),
            "a task was woken directly while its runtime was not driving on this thread"
        );
        let flag = &task.0;
        if flag.scheduled.load(Ordering::Acquire) {
            return;
        }
        flag.scheduled.store(true, Ordering::Release);
        self.queue.borrow_mut().push(flag.key());
    }

    /// Forgets every queued task (at the end of a run).
    pub(crate) fn clear(&self) {
        self.queue.borrow_mut().clear();
    }
}

/// While alive, the runtime owning `local` is driving on this thread: wakes here push to its
/// queue. Dropping it (on return or unwind) restores whatever this thread was driving before.
pub(crate) struct DrivingGuard {
    previous: Option<Rc<LocalReady>>,
}

impl DrivingGuard {
    pub(crate) fn new(local: &Rc<LocalReady>) -> Self {
        let previous = DRIVING.with(|d| d.borrow_mut().replace(Rc::clone(local)));
        Self { previous }
    }
}

impl Drop for DrivingGuard {
    fn drop(&mut self) {
        let previous = self.previous.take();
        let mine = DRIVING.with(|d| std::mem::replace(&mut *d.borrow_mut(), previous));
        drop(mine);
    }
}

impl Shared {
    /// Global simulated time.
    #[inline]
    pub fn now_ms(&self) -> u64 {
        self.now_ms.load(Ordering::Acquire)
    }

    /// Moves global simulated time forward to `now_ms`.
    pub fn set_now_ms(&self, now_ms: u64) {
        let before_ms = self.now_ms();
        assert!(
            now_ms >= before_ms,
            "simulated time went backwards: {before_ms} -> {now_ms}"
        );
        self.now_ms.store(now_ms, Ordering::Release);
    }

    /// The queue of tasks woken while the runtime was not driving on this thread.
    #[inline]
    pub fn ready(&self) -> MutexGuard<'_, Vec<TaskKey>> {
        lock(&self.ready)
    }

    fn id(&self) -> usize {
        self as *const Shared as usize
    }

    /// Queues `key`: on the driving thread's queue if this runtime is driving here, else on
    /// the shared one.
    #[inline(always)]
    pub fn push_ready(&self, key: TaskKey) {
        let id = self.id();
        let local = DRIVING.with(|d| match &*d.borrow() {
            Some(local) if local.owner == id => {
                local.queue.borrow_mut().push(key);
                true
            }
            _ => false,
        });
        if !local {
            self.push_ready_elsewhere(key);
        }
    }

    /// [`Self::push_ready`] off the driving thread, or while the runtime is not driving.
    #[cold]
    #[inline(never)]
    fn push_ready_elsewhere(&self, key: TaskKey) {
        self.ready().push(key);
        self.woken_elsewhere.store(true, Ordering::Release);
    }

    /// A new node clock's id: unique within the run, and never
    /// [`GLOBAL_TIME`](crate::timer::GLOBAL_TIME).
    pub fn new_clock_id(&self) -> u64 {
        self.last_clock_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The pending timers.
    #[inline]
    pub fn timers(&self) -> TimersGuard<'_> {
        TimersGuard {
            queue: self.timers.borrow(),
            shared: self,
        }
    }

    /// The earliest timer's deadline, as of the last release of [`Self::timers`].
    #[inline]
    pub fn next_timer_ms(&self) -> Option<u64> {
        self.timer_pending
            .load(Ordering::Acquire)
            .then(|| self.next_timer_ms.load(Ordering::Acquire))
    }
}

/// The address of a task: slot index plus the slot's generation when the task was spawned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TaskKey {
    index: u32,
    generation: u32,
}

impl TaskKey {
    #[inline(always)]
    fn pack(self) -> u64 {
        (u64::from(self.generation) << 32) | u64::from(self.index)
    }

    #[inline(always)]
    fn unpack(packed: u64) -> Self {
        Self {
            index: packed as u32,
            generation: (packed >> 32) as u32,
        }
    }
}

/// A task's waker: queues the task once until it is next polled.
#[derive(Debug)]
struct TaskWaker {
    /// The task's [`TaskKey`], packed ([`TaskKey::pack`]): rewritten when the slab reuses
    /// this waker for the slot's next task, which it does only while it holds every reference.
    key: AtomicU64,
    scheduled: AtomicBool,
    shared: Arc<Shared>,
}

impl TaskWaker {
    #[inline(always)]
    fn key(&self) -> TaskKey {
        TaskKey::unpack(self.key.load(Ordering::Relaxed))
    }
}

impl Wake for TaskWaker {
    #[inline]
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    #[inline]
    fn wake_by_ref(self: &Arc<Self>) {
        // A task already queued needs nothing. Across threads the check and the set may race
        // and queue a task twice, which only polls it once more; a wake is never lost, since
        // the flag is cleared before the poll that answers it (`begin_poll`).
        if self.scheduled.load(Ordering::Acquire) {
            return;
        }
        self.scheduled.store(true, Ordering::Release);
        self.shared.push_ready(self.key());
    }
}

/// A task of one runtime, to wake from inside that runtime with [`LocalReady::wake`]. Holds
/// the task's wake flag, as its waker does, so a task that finished is "woken" exactly as its
/// waker would be (its stale key is queued once).
#[derive(Debug, Clone)]
pub(crate) struct TaskRef(Arc<TaskWaker>);

/// A live task.
struct TaskEntry {
    /// Spawn sequence number, folded into the trace (deterministic, unlike slot reuse).
    id: u64,
    /// `None` while the task is being polled.
    future: Option<LocalTask>,
    /// Shared with the poll in progress without touching the waker's atomic reference count.
    waker: Rc<Waker>,
    flag: Arc<TaskWaker>,
    /// Set when a task is aborted while it is being polled (it aborted itself).
    abort_requested: bool,
}

struct Slot {
    generation: u32,
    entry: Option<TaskEntry>,
    /// The waker of the slot's last task, for its next one if nobody else kept a reference
    /// (two allocations saved per spawn: most tasks, a store's request handlers, are short).
    spare: Option<(Rc<Waker>, Arc<TaskWaker>)>,
}

/// What [`TaskSlab::begin_poll`] hands out: the task's id, its future and its waker.
pub(crate) type PollTicket = (u64, LocalTask, Rc<Waker>);

/// All live tasks.
#[derive(Default)]
pub(crate) struct TaskSlab {
    slots: Vec<Slot>,
    free: Vec<u32>,
    live: u64,
    spawned: u64,
}

impl TaskSlab {
    /// Adds a task and queues it as ready. Returns its key and id.
    pub fn insert(&mut self, shared: &Arc<Shared>, future: LocalTask) -> (TaskKey, u64) {
        let index = match self.free.pop() {
            Some(index) => index,
            None => {
                let index = u32::try_from(self.slots.len()).expect("more than 2^32 live tasks");
                self.slots.push(Slot {
                    generation: 0,
                    entry: None,
                    spare: None,
                });
                index
            }
        };
        let slot = &mut self.slots[index as usize];
        assert!(
            slot.entry.is_none(),
            "free list pointed at an occupied task slot"
        );
        let key = TaskKey {
            index,
            generation: slot.generation,
        };
        let (waker, flag) = match slot.spare.take() {
            // Ours alone (the `Rc` here, the `Arc` here and in the `Waker`): no clone of the
            // old task's waker survives to wake the new task under the old key.
            Some((waker, flag))
                if Rc::strong_count(&waker) == 1 && Arc::strong_count(&flag) == 2 =>
            {
                debug_assert!(
                    Arc::ptr_eq(&flag.shared, shared),
                    "a waker of another runtime"
                );
                flag.key.store(key.pack(), Ordering::Relaxed);
                flag.scheduled.store(true, Ordering::Release);
                (waker, flag)
            }
            _ => {
                let flag = Arc::new(TaskWaker {
                    key: AtomicU64::new(key.pack()),
                    scheduled: AtomicBool::new(true),
                    shared: shared.clone(),
                });
                (Rc::new(Waker::from(flag.clone())), flag)
            }
        };
        let id = self.spawned;
        self.spawned += 1;
        self.live += 1;
        slot.entry = Some(TaskEntry {
            id,
            future: Some(future),
            waker,
            flag,
            abort_requested: false,
        });
        shared.push_ready(key);
        (key, id)
    }

    #[inline(always)]
    fn entry_mut(&mut self, key: TaskKey) -> Option<&mut TaskEntry> {
        let slot = self.slots.get_mut(key.index as usize)?;
        if slot.generation != key.generation {
            return None;
        }
        slot.entry.as_mut()
    }

    /// The task `key`, if it is alive and `waker` wakes it and nothing else (its own waker,
    /// by [`Waker::will_wake`]).
    pub fn task_ref(&self, key: TaskKey, waker: &Waker) -> Option<TaskRef> {
        let slot = self.slots.get(key.index as usize)?;
        if slot.generation != key.generation {
            return None;
        }
        let entry = slot.entry.as_ref()?;
        waker
            .will_wake(&entry.waker)
            .then(|| TaskRef(entry.flag.clone()))
    }

    /// Takes a ready task's future out for polling. `None` if the key is stale.
    #[inline(always)]
    pub fn begin_poll(&mut self, key: TaskKey) -> Option<PollTicket> {
        let entry = self.entry_mut(key)?;
        // Cleared before the poll, so a wake during the poll queues the task again.
        entry.flag.scheduled.store(false, Ordering::Release);
        let future = entry.future.take()?;
        Some((entry.id, future, Rc::clone(&entry.waker)))
    }

    /// Returns a polled future. When the task finished or was aborted meanwhile, frees the
    /// slot and hands the future back to be dropped by the caller, outside any borrow.
    #[inline(always)]
    pub fn end_poll(
        &mut self,
        key: TaskKey,
        future: LocalTask,
        finished: bool,
    ) -> Option<LocalTask> {
        let entry = self
            .entry_mut(key)
            .expect("a task's slot was freed while it was being polled");
        if finished || entry.abort_requested {
            self.free_slot(key);
            return Some(future);
        }
        entry.future = Some(future);
        None
    }

    /// Aborts a task: frees it and returns its future to be dropped by the caller. If the task
    /// is being polled right now, marks it to be freed when the poll returns.
    pub fn abort(&mut self, key: TaskKey) -> Option<LocalTask> {
        let entry = self.entry_mut(key)?;
        match entry.future.take() {
            Some(future) => {
                self.free_slot(key);
                Some(future)
            }
            None => {
                entry.abort_requested = true;
                None
            }
        }
    }

    fn free_slot(&mut self, key: TaskKey) {
        let slot = &mut self.slots[key.index as usize];
        let entry = slot.entry.take().expect("freed an empty task slot");
        slot.spare = Some((entry.waker, entry.flag));
        slot.generation = slot.generation.wrapping_add(1);
        self.free.push(key.index);
        self.live -= 1;
    }

    /// Removes every task, returning their futures to be dropped by the caller.
    pub fn drain(&mut self) -> Vec<LocalTask> {
        let mut futures = Vec::new();
        for slot in &mut self.slots {
            if let Some(entry) = slot.entry.take() {
                futures.extend(entry.future);
                slot.generation = slot.generation.wrapping_add(1);
            }
        }
        self.free = (0..u32::try_from(self.slots.len()).expect("slot count fits u32")).collect();
        self.live = 0;
        futures
    }

    /// Tasks currently alive.
    pub fn live(&self) -> u64 {
        self.live
    }

    /// Tasks spawned since the start.
    pub fn spawned(&self) -> u64 {
        self.spawned
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noop() -> LocalTask {
        Box::pin(async {})
    }

    #[test]
    fn stale_keys_never_reach_a_reused_slot() {
        let shared = Arc::new(Shared::default());
        let mut slab = TaskSlab::default();
        let (first, first_id) = slab.insert(&shared, noop());
        let (_, future, _) = slab.begin_poll(first).unwrap();
        assert!(slab.end_poll(first, future, true).is_some());
        let (second, second_id) = slab.insert(&shared, noop());
        assert_ne!(first, second);
        assert_ne!(first_id, second_id);
        assert!(
            slab.begin_poll(first).is_none(),
            "stale key reached the new task"
        );
        assert!(slab.begin_poll(second).is_some());
        assert_eq!(slab.live(), 1);
        assert_eq!(slab.spawned(), 2);
    }

    #[test]
    fn a_slot_reuses_its_waker_only_when_no_clone_survives() {
        let shared = Arc::new(Shared::default());
        let mut slab = TaskSlab::default();
        let run_to_end = |slab: &mut TaskSlab, key| {
            let (_, future, waker) = slab.begin_poll(key).unwrap();
            drop(waker);
            assert!(slab.end_poll(key, future, true).is_some());
        };
        let (first, _) = slab.insert(&shared, noop());
        let first_flag = Arc::as_ptr(&slab.entry_mut(first).unwrap().flag);
        run_to_end(&mut slab, first);
        let (second, _) = slab.insert(&shared, noop());
        let second_entry = slab.entry_mut(second).unwrap();
        assert_eq!(
            Arc::as_ptr(&second_entry.flag),
            first_flag,
            "spare waker not reused"
        );
        assert_eq!(
            second_entry.flag.key(),
            second,
            "a reused waker must wake the new task"
        );
        // A clone kept past the task's end (say, by a timer) must not wake the slot's next task.
        let kept = (*second_entry.waker).clone();
        run_to_end(&mut slab, second);
        let (third, _) = slab.insert(&shared, noop());
        let third_flag = Arc::as_ptr(&slab.entry_mut(third).unwrap().flag);
        assert_ne!(
            third_flag, first_flag,
            "a waker with a surviving clone was reused"
        );
        shared.ready().clear();
        kept.wake();
        assert_eq!(shared.ready().len(), 1);
        let stale = shared.ready().pop().unwrap();
        assert_eq!(stale, second);
        assert!(
            slab.begin_poll(stale).is_none(),
            "the kept clone reached the new task"
        );
        assert!(slab.begin_poll(third).is_some());
    }

    #[test]
    fn waking_twice_queues_once() {
        let shared = Arc::new(Shared::default());
        let mut slab = TaskSlab::default();
        let (key, _) = slab.insert(&shared, noop());
        shared.ready().clear();
        let (_, future, waker) = slab.begin_poll(key).unwrap();
        waker.wake_by_ref();
        waker.wake_by_ref();
        assert_eq!(shared.ready().len(), 1);
        assert!(slab.end_poll(key, future, false).is_none());
        assert_eq!(slab.drain().len(), 1);
    }
}
