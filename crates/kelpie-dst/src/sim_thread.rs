//! [`SimThread`]: a value that stays on the simulation's thread, carried across the `Send`
//! bound of the lease traits (their futures must be `Send` so that real nodes can run them on
//! tokio, while the simulator is single-threaded and its store and network are `Rc`-based).
//!
//! It does what `send_wrapper::SendWrapper` did here, with a cheaper check: the thread is
//! identified by a [`ThreadId`] cached in a thread-local ([`current_thread_id`], which the
//! simulator's timers check too), instead of asking
//! `std::thread::current()` (an atomic reference count taken and dropped) on every access and
//! every poll, which cost several per cent of a swarm run.

use std::future::Future;
use std::mem::ManuallyDrop;
use std::ops::{Deref, DerefMut};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::thread::ThreadId;

use kelpie_sim::current_thread_id;

/// A value usable only on the thread that made it. Touching it (deref, poll) from another
/// thread panics; dropping it on another thread leaks it (and panics, unless that thread is
/// already panicking), so its non-`Send` insides are never used off their thread.
pub struct SimThread<T> {
    value: ManuallyDrop<T>,
    thread: ThreadId,
}

// SAFETY: the value is reached only through `Deref`, `DerefMut`, `poll` and `Drop`, and each
// checks that it runs on the thread that made the wrapper (`assert_on_thread`), or, for `Drop`,
// leaks the value instead. So the value is only ever used on its own thread, whichever thread
// holds the wrapper: the reasoning of `send_wrapper`, which this replaces.
unsafe impl<T> Send for SimThread<T> {}
// SAFETY: as for `Send`: a shared reference on another thread cannot reach the value.
unsafe impl<T> Sync for SimThread<T> {}

impl<T> SimThread<T> {
    /// Wraps `value`, bound to the current thread.
    pub fn new(value: T) -> Self {
        Self {
            value: ManuallyDrop::new(value),
            thread: current_thread_id(),
        }
    }

    #[inline]
    fn assert_on_thread(&self) {
        assert!(
            current_thread_id() == self.thread,
            "a simulation value was used on a thread other than the simulation's"
        );
    }
}

impl<T> Deref for SimThread<T> {
    type Target = T;

    #[inline]
    fn deref(&self) -> &T {
        self.assert_on_thread();
        &self.value
    }
}

impl<T> DerefMut for SimThread<T> {
    #[inline]
    fn deref_mut(&mut self) -> &mut T {
        self.assert_on_thread();
        &mut self.value
    }
}

impl<T> Drop for SimThread<T> {
    fn drop(&mut self) {
        if current_thread_id() == self.thread {
            // SAFETY: dropped once, here, on its own thread; never used afterwards.
            unsafe { ManuallyDrop::drop(&mut self.value) };
        } else if !std::thread::panicking() {
            panic!("a simulation value was dropped on a thread other than the simulation's");
        }
    }
}

impl<F: Future> Future for SimThread<F> {
    type Output = F::Output;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.assert_on_thread();
        // SAFETY: the future is structurally pinned: it is never moved out of the wrapper
        // (the wrapper has no method that moves it, and `Drop` drops it in place).
        let future = unsafe { self.map_unchecked_mut(|wrapper| &mut *wrapper.value) };
        future.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usable_on_its_thread_and_refused_on_another() {
        let wrapped = SimThread::new(std::rc::Rc::new(5));
        assert_eq!(**wrapped, 5);
        let elsewhere = std::thread::spawn(move || {
            let touched = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| **wrapped));
            assert!(touched.is_err(), "deref on another thread must panic");
            std::mem::forget(wrapped);
        });
        elsewhere.join().unwrap();
        let future = SimThread::new(async { 7 });
        let mut context = Context::from_waker(std::task::Waker::noop());
        assert_eq!(std::pin::pin!(future).poll(&mut context), Poll::Ready(7));
    }
}
