//! [`ThreadOwned`]: a value reached only on the thread that made it, without a lock.
//!
//! The executor's shared part must be `Send + Sync` (wakers and node clocks' sleeps may travel,
//! by the [`kelpie_core::Clock`] contract), but a simulation runs on one thread, and its timers
//! are set, removed and fired at nearly every step. Behind a mutex each of those took two
//! atomic read-modify-writes (lock and unlock), which `perf` put at about 2% of a swarm run's
//! time. A [`ThreadOwned`] checks the thread instead (a thread-local read and a compare) and
//! panics on any other: a simulated sleep polled or dropped off its simulation's thread is a
//! bug, as is a simulated value used off it elsewhere (`kelpie_dst::SimThread`).

use std::cell::{Cell, UnsafeCell};
use std::ops::{Deref, DerefMut};
use std::thread::ThreadId;

thread_local! {
    /// This thread's id, taken once. `ThreadId`s are never reused.
    static THREAD_ID: ThreadId = std::thread::current().id();
}

/// The current thread's id, cached in a thread-local: for values bound to a simulation's
/// thread, which check it on every touch. `std::thread::current()` takes and drops an atomic
/// reference count on each call.
#[inline]
pub fn current_thread_id() -> ThreadId {
    THREAD_ID.with(|id| *id)
}

/// A value only the thread that made it may borrow, one borrow at a time.
pub(crate) struct ThreadOwned<T> {
    owner: ThreadId,
    borrowed: Cell<bool>,
    value: UnsafeCell<T>,
}

// SAFETY: `value` and `borrowed` are reached only through `borrow`, which checks first that it
// runs on the owner's thread (and panics otherwise, before touching either), so no two threads
// ever touch them; and only one borrow at a time exists (`borrowed`). Dropping or moving the
// whole needs no thread check: whoever does it holds the only reference, and `T: Send` lets its
// value be dropped on any thread.
unsafe impl<T: Send> Send for ThreadOwned<T> {}
// SAFETY: as for `Send`: a shared reference on another thread cannot reach the value.
unsafe impl<T: Send> Sync for ThreadOwned<T> {}

impl<T> ThreadOwned<T> {
    /// `value`, owned by the current thread.
    pub(crate) fn new(value: T) -> Self {
        Self {
            owner: current_thread_id(),
            borrowed: Cell::new(false),
            value: UnsafeCell::new(value),
        }
    }

    /// The value, until the guard is dropped.
    ///
    /// # Panics
    /// Off the owner's thread, or while the value is borrowed already (where a mutex would
    /// deadlock): both bugs.
    #[inline]
    pub(crate) fn borrow(&self) -> OwnedGuard<'_, T> {
        assert!(
            current_thread_id() == self.owner,
            "a simulation's timers were reached from a thread other than the simulation's"
        );
        assert!(
            !self.borrowed.replace(true),
            "a simulation's timers were borrowed while borrowed"
        );
        OwnedGuard { owned: self }
    }
}

impl<T: Default> Default for ThreadOwned<T> {
    fn default() -> Self {
        Self::new(T::default())
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for ThreadOwned<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not borrowed here: a debug print from another thread must not panic.
        f.debug_struct("ThreadOwned")
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

/// A borrow of a [`ThreadOwned`] value; the value is free again when it is dropped.
pub(crate) struct OwnedGuard<'a, T> {
    owned: &'a ThreadOwned<T>,
}

impl<T> Deref for OwnedGuard<'_, T> {
    type Target = T;

    #[inline]
    fn deref(&self) -> &T {
        // SAFETY: the guard is the one borrow, on the owner's thread (`ThreadOwned::borrow`).
        unsafe { &*self.owned.value.get() }
    }
}

impl<T> DerefMut for OwnedGuard<'_, T> {
    #[inline]
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as for `deref`; `&mut self` makes this the only reference through the guard.
        unsafe { &mut *self.owned.value.get() }
    }
}

impl<T> Drop for OwnedGuard<'_, T> {
    #[inline]
    fn drop(&mut self) {
        self.owned.borrowed.set(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn borrowed_on_its_thread_one_borrow_at_a_time() {
        let owned = ThreadOwned::new(vec![1]);
        owned.borrow().push(2);
        assert_eq!(*owned.borrow(), [1, 2]);
        let held = owned.borrow();
        let twice = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| owned.borrow().len()));
        assert!(twice.is_err(), "a second borrow at once must panic");
        drop(held);
        assert_eq!(
            owned.borrow().len(),
            2,
            "free again once the guard is dropped"
        );
    }

    #[test]
    fn refused_on_another_thread_and_dropped_anywhere() {
        let owned = Arc::new(ThreadOwned::new(vec![1]));
        let elsewhere = Arc::clone(&owned);
        std::thread::spawn(move || {
            let touched =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| elsewhere.borrow().len()));
            assert!(touched.is_err(), "a borrow on another thread must panic");
        })
        .join()
        .unwrap();
        assert_eq!(
            owned.borrow().len(),
            1,
            "a refused borrow leaves the value free"
        );
        let last = Arc::clone(&owned);
        drop(owned);
        std::thread::spawn(move || drop(last)).join().unwrap();
    }
}
