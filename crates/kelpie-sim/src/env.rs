//! [`SimEnv`]: the handle a scenario gets to the simulated world.

use crate::clock::SimClock;
use crate::config::SimConfig;
use crate::fault::{FaultStats, FaultType};
use crate::network::SimNetwork;
use crate::rng::DeterministicRng;
use crate::runtime::Runtime;
use crate::storage::SimStorage;
use crate::task::{join_pair, JoinHandle, YieldNow};
use crate::timer::{duration_to_ms_ceil, Sleep};
use crate::trace::event;
use std::cell::Cell;
use std::fmt;
use std::future::Future;
use std::rc::Rc;
use std::time::Duration;

/// The scenario's handle to the simulation: spawning, time, randomness, components, faults,
/// invariants and the trace. Cloning is a reference-count increment.
#[derive(Clone)]
pub struct SimEnv {
    runtime: Rc<Runtime>,
}

impl SimEnv {
    pub(crate) fn new(runtime: Rc<Runtime>) -> Self {
        Self { runtime }
    }

    #[inline]
    pub(crate) fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    /// The run's root seed.
    pub fn seed(&self) -> u64 {
        self.runtime.config.seed
    }

    /// The run's configuration.
    pub fn config(&self) -> &SimConfig {
        &self.runtime.config
    }

    /// Global (true) simulated time, in ms since the start of the run.
    #[inline]
    pub fn now_ms(&self) -> u64 {
        self.runtime.shared.now_ms()
    }

    /// Executor steps taken so far.
    pub fn step(&self) -> u64 {
        self.runtime.steps()
    }

    /// Tasks alive now (spawned and not finished or aborted), the running one included: for
    /// tests that a component's tasks end with it.
    pub fn tasks_alive(&self) -> u64 {
        self.runtime.tasks_alive()
    }

    /// Runs `future` as a new task. The returned handle gives its output; dropping the handle
    /// detaches the task.
    pub fn spawn<T: 'static>(&self, future: impl Future<Output = T> + 'static) -> JoinHandle<T> {
        let (completion, make_handle) = join_pair(&self.runtime);
        let key = self.runtime.spawn(Box::pin(async move {
            let value = future.await;
            completion.complete(value);
        }));
        make_handle(key)
    }

    /// Spawns `future` as a task nobody joins or aborts: as [`spawn`](Self::spawn) with its
    /// handle dropped at once (same task id, same place in the schedule), without the join
    /// state (for servers spawning a task per request).
    pub fn spawn_detached(&self, future: impl Future<Output = ()> + 'static) {
        self.runtime.spawn(Box::pin(future));
    }

    /// Completes after `duration` of global simulated time (rounded up to whole ms).
    pub fn sleep(&self, duration: Duration) -> Sleep {
        self.sleep_ms(duration_to_ms_ceil(duration))
    }

    /// Completes after `duration_ms` of global simulated time.
    #[inline]
    pub fn sleep_ms(&self, duration_ms: u64) -> Sleep {
        self.sleep_until_ms(self.now_ms().saturating_add(duration_ms))
    }

    /// Completes once global simulated time reaches `deadline_ms`.
    #[inline]
    pub fn sleep_until_ms(&self, deadline_ms: u64) -> Sleep {
        Sleep::until(self.runtime.shared.clone(), deadline_ms)
    }

    /// Lets every other ready task run before this one continues.
    pub fn yield_now(&self) -> YieldNow {
        YieldNow::default()
    }

    /// The random stream named `name`, forked from the root seed. The same name always gives
    /// the same stream, so give each component its own name.
    pub fn rng(&self, name: &str) -> DeterministicRng {
        self.runtime.fork_rng(name)
    }

    /// A clock on global simulated time.
    pub fn clock(&self) -> SimClock {
        self.node_clock(0, 0)
    }

    /// A node's local clock: `offset_ms` ahead of global time, running `drift_ppm` parts per
    /// million fast (negative: slow).
    ///
    /// # Panics
    /// If `|drift_ppm|` exceeds [`crate::clock::CLOCK_DRIFT_PPM_ABS_MAX`].
    pub fn node_clock(&self, offset_ms: u64, drift_ppm: i64) -> SimClock {
        SimClock::new(self.runtime.shared.clone(), offset_ms, drift_ppm)
    }

    /// A new, empty store with the configured latency and the run's storage faults.
    pub fn storage<V: Clone + 'static>(&self) -> SimStorage<V> {
        SimStorage::new(self)
    }

    /// A new network of `hosts` hosts with the configured latency and network faults.
    pub fn network<M: Clone + 'static>(&self, hosts: usize) -> SimNetwork<M> {
        SimNetwork::new(self, hosts)
    }

    /// Registers a check evaluated after every executor step, and after the instant a
    /// storage operation without a task takes effect ([`SimStorage::transact_then`]); an
    /// `Err` fails the run with [`crate::SimError::InvariantViolated`] naming `name`.
    pub fn add_invariant(
        &self,
        name: &'static str,
        check: impl Fn() -> Result<(), String> + 'static,
    ) {
        self.runtime
            .add_invariants(vec![name], Box::new(move |_: &Cell<usize>| check()));
    }

    /// Registers the checks `names` as one call after every executor step, for checks that
    /// share work (such as finding what a step changed). `check` runs them in order, setting
    /// its argument to the index in `names` of the one running; an `Err` (or a panic) fails
    /// the run naming that one. A step that passes counts as `names.len()` evaluations.
    ///
    /// # Panics
    /// If `names` is empty.
    pub fn add_invariants(
        &self,
        names: Vec<&'static str>,
        check: impl Fn(&Cell<usize>) -> Result<(), String> + 'static,
    ) {
        self.runtime.add_invariants(names, Box::new(check));
    }

    /// Registers `observe` to run after every executor step, where invariants run, for work
    /// that must keep pace with the run without judging it (draining a log that a check
    /// would otherwise drain). It is no check: it adds nothing to the count of checks
    /// evaluated, and it cannot fail the run except by panicking, which is reported under
    /// `name` as a violation.
    pub fn add_observer(&self, name: &'static str, observe: impl Fn() + 'static) {
        let check = move |_: &Cell<usize>| {
            observe();
            Ok(())
        };
        self.runtime.add_observer(name, Box::new(check));
    }

    /// How often `fault` has fired so far.
    pub fn fault_fired(&self, fault: FaultType) -> u64 {
        self.runtime.faults.fired(fault)
    }

    /// Counts of every configured or fired fault so far.
    pub fn faults(&self) -> FaultStats {
        self.runtime.faults.stats()
    }

    /// The configured probability of `fault`, or `None` if it is not configured.
    pub fn fault_probability(&self, fault: FaultType) -> Option<f64> {
        self.runtime.faults.probability(fault)
    }

    /// Draws whether `fault` fires now, from that fault's own stream, with its configured
    /// probability; counts and traces the decision. `false` if the fault is not configured.
    #[inline]
    pub fn should_inject(&self, fault: FaultType) -> bool {
        self.runtime
            .faults
            .should_inject(fault, &self.runtime.trace)
    }

    /// Turns every configured fault on or off. A scenario turns them off to heal the world
    /// before its liveness phase.
    pub fn set_faults_enabled(&self, enabled: bool) {
        self.runtime.faults.set_enabled(enabled);
        self.trace(u64::from(enabled));
    }

    /// Whether `fault` fires now, as [`should_inject`](Self::should_inject) draws it, without
    /// counting it: for a scenario whose fault may find nothing to do (a node already down, a
    /// link already cut), which counts with [`count_fault`](Self::count_fault) only the firings
    /// that took effect. The same draws as `should_inject`, so a run takes the same course.
    pub fn draw_fault(&self, fault: FaultType) -> bool {
        self.runtime.faults.draw(fault, &self.runtime.trace)
    }

    /// Counts a firing of `fault` drawn with [`draw_fault`](Self::draw_fault) that took effect
    /// (the draw is in the trace already).
    pub fn count_fault(&self, fault: FaultType) {
        self.runtime.faults.record(fault);
    }

    /// Counts one firing of `fault` that the scenario decided itself (a crash it caused, say).
    pub fn record_fault(&self, fault: FaultType) {
        self.runtime.faults.record(fault);
        self.runtime
            .trace
            .event(event::FAULT, fault.index() as u64, u64::MAX);
    }

    /// Folds an arbitrary event into the trace hash.
    pub fn trace(&self, event_word: u64) {
        self.runtime.trace.event(event::USER, event_word, 0);
    }

    /// The trace hash so far.
    pub fn trace_hash(&self) -> u64 {
        self.runtime.trace.hash()
    }
}

impl fmt::Debug for SimEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimEnv")
            .field("seed", &self.seed())
            .field("now_ms", &self.now_ms())
            .field("step", &self.step())
            .finish()
    }
}
