//! Spawned tasks' handles, and yielding.

use crate::executor::TaskKey;
use crate::runtime::Runtime;
use std::cell::RefCell;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::task::{Context, Poll, Waker};

/// A task was aborted, or the run ended, before the task finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the task was cancelled before it finished")]
pub struct Cancelled;

/// What a task and its handle share.
struct JoinState<T> {
    result: Option<T>,
    finished: bool,
    cancelled: bool,
    waiter: Option<Waker>,
}

/// Completes the shared state when the task finishes, or marks it cancelled if the task's
/// future is dropped first (abort, or the end of the run).
pub(crate) struct Completion<T> {
    state: Rc<RefCell<JoinState<T>>>,
}

impl<T> Completion<T> {
    /// Records the task's output and wakes the joiner.
    pub fn complete(self, value: T) {
        let waiter = {
            let mut state = self.state.borrow_mut();
            state.result = Some(value);
            state.finished = true;
            state.waiter.take()
        };
        if let Some(waiter) = waiter {
            waiter.wake();
        }
    }
}

impl<T> Drop for Completion<T> {
    fn drop(&mut self) {
        let waiter = {
            let mut state = self.state.borrow_mut();
            if state.finished {
                return;
            }
            state.cancelled = true;
            state.waiter.take()
        };
        if let Some(waiter) = waiter {
            waiter.wake();
        }
    }
}

/// A handle to a spawned task: await it for the task's output (or [`Cancelled`]). Dropping
/// the handle detaches the task; it keeps running.
#[must_use = "dropping a JoinHandle detaches the task; await it or call abort"]
pub struct JoinHandle<T> {
    state: Rc<RefCell<JoinState<T>>>,
    key: TaskKey,
    runtime: Weak<Runtime>,
}

/// A join handle's shared state and the completion the task keeps.
pub(crate) fn join_pair<T>(
    runtime: &Rc<Runtime>,
) -> (Completion<T>, impl FnOnce(TaskKey) -> JoinHandle<T>) {
    let state = Rc::new(RefCell::new(JoinState {
        result: None,
        finished: false,
        cancelled: false,
        waiter: None,
    }));
    let completion = Completion {
        state: state.clone(),
    };
    let runtime = Rc::downgrade(runtime);
    (completion, move |key| JoinHandle {
        state,
        key,
        runtime,
    })
}

impl<T> JoinHandle<T> {
    /// Stops the task: its future is dropped now (or right after its current poll, if it
    /// aborts itself), and awaiting this handle gives [`Cancelled`].
    pub fn abort(&self) {
        if self.state.borrow().finished {
            return;
        }
        if let Some(runtime) = self.runtime.upgrade() {
            runtime.abort(self.key);
        }
    }

    /// Whether the task has finished (successfully or by cancellation).
    pub fn is_finished(&self) -> bool {
        let state = self.state.borrow();
        state.finished || state.cancelled
    }
}

impl<T> Future for JoinHandle<T> {
    type Output = Result<T, Cancelled>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.state.borrow_mut();
        if let Some(value) = state.result.take() {
            return Poll::Ready(Ok(value));
        }
        if state.cancelled || state.finished {
            return Poll::Ready(Err(Cancelled));
        }
        match &state.waiter {
            Some(waiter) if waiter.will_wake(cx.waker()) => {}
            _ => state.waiter = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl<T> fmt::Debug for JoinHandle<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinHandle")
            .field("finished", &self.is_finished())
            .finish()
    }
}

/// A future that gives other ready tasks a turn: pending once, then ready.
#[derive(Debug, Default)]
#[must_use = "a YieldNow does nothing unless awaited"]
pub struct YieldNow {
    yielded: bool,
}

impl Future for YieldNow {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.yielded {
            return Poll::Ready(());
        }
        self.yielded = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use crate::{SimConfig, Simulation};
    use std::cell::Cell;
    use std::rc::Rc;

    #[test]
    fn yield_lets_a_spawned_task_run_and_a_self_abort_cancels() {
        Simulation::new(SimConfig::new(1).with_check_determinism(false))
            .run(|env| async move {
                let ran = Rc::new(Cell::new(false));
                let flag = ran.clone();
                let handle = env.spawn(async move { flag.set(true) });
                // Each yield leaves the scheduler a choice between this task and the spawned
                // one, drawn from the seed with even odds, so the spawned one runs within a
                // few yields; which yield depends on the seed.
                let mut yields = 0;
                while !ran.get() {
                    assert!(yields < 64, "the spawned task never ran in {yields} yields");
                    env.yield_now().await;
                    yields += 1;
                }
                assert!(yields > 0 && handle.is_finished());
                let slot = Rc::new(Cell::new(None));
                let own = slot.clone();
                let env2 = env.clone();
                let handle = env.spawn(async move {
                    let me: crate::JoinHandle<()> = own.take().expect("handle was stored");
                    me.abort();
                    env2.yield_now().await;
                    unreachable!("an aborted task is never polled again");
                });
                slot.set(Some(handle));
                env.sleep_ms(1).await;
                Ok::<(), String>(())
            })
            .unwrap();
    }
}
