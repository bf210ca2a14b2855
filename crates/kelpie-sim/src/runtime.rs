//! The executor's run loop: picks ready tasks with the scheduler stream, polls them, checks
//! invariants after every step, and jumps simulated time to the next event when nothing is
//! ready (checking invariants again if an event changed what they judge).

use crate::config::SimConfig;
use crate::error::SimError;
use crate::executor::{DrivingGuard, LocalReady, LocalTask, Shared, TaskKey, TaskRef, TaskSlab};
use crate::failure::catch_panic;
use crate::fault::FaultConfig;
use crate::injector::FaultInjector;
use crate::rng::DeterministicRng;
use crate::trace::{event, Trace};
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::task::{Context, Waker};

/// Something other than a timer that schedules events in simulated time (the network's
/// in-flight messages). Keeping them out of the timer map lets a component deliver many
/// events per instant without a waker per event.
pub(crate) trait EventSource {
    /// When the source's next event is due.
    fn next_deadline_ms(&self) -> Option<u64>;
    /// Delivers every event due at `now_ms`; nothing, and cheaply, if none is due.
    fn fire_due(&self, now_ms: u64);
    /// Drops every pending event at the end of the run: an event may hold handles that
    /// lead back to the source.
    fn teardown(&self) {}
}

/// A source's next deadline, as the source published it: the source sets it whenever its
/// earliest event changes (to [`EventSource::next_deadline_ms`]), so that the run loop finds
/// the next instant, and the sources due at it, without a call into each source.
pub(crate) type SourceDeadline = Rc<Cell<Option<u64>>>;

/// A registered event source and the deadline it publishes.
struct SourceEntry {
    source: Weak<dyn EventSource>,
    next_ms: SourceDeadline,
}

/// Named checks evaluated after every step, as one call: a group shares the work of finding
/// what changed in a step, and sets `at` to the index in `names` of the check it is running,
/// so that a violation or a panic is reported under that check's name.
struct Invariant {
    names: Vec<&'static str>,
    check: Box<InvariantCheck>,
    /// Added to [`Runtime::checks_evaluated`] per passing step: one per name, none for an
    /// observer (which keeps pace with the run without judging it).
    evaluations_per_pass: u64,
}

/// A group's check: `at` is the index of the check running.
pub(crate) type InvariantCheck = dyn Fn(&Cell<usize>) -> Result<(), String>;

/// Everything one simulation run shares: executor, streams, trace, faults, invariants.
pub(crate) struct Runtime {
    pub config: SimConfig,
    pub shared: Arc<Shared>,
    /// The tasks ready to run.
    ready: Rc<LocalReady>,
    pub trace: Trace,
    pub faults: FaultInjector,
    root_rng: DeterministicRng,
    scheduler_rng: RefCell<DeterministicRng>,
    tasks: RefCell<TaskSlab>,
    invariants: RefCell<Vec<Invariant>>,
    /// Invariants registered while `invariants` is being evaluated (by a check): moved into
    /// it after the pass, so the list is borrowed, not moved out and back, on every step.
    added_invariants: RefCell<Vec<Invariant>>,
    sources: RefCell<Vec<SourceEntry>>,
    steps: Cell<u64>,
    /// The task of the latest poll (the one in progress, during a poll).
    polling: Cell<Option<TaskKey>>,
    checks_evaluated: Cell<u64>,
    /// Set by an event source that changed what invariants judge ([`Self::request_check`]).
    check_requested: Cell<bool>,
    timers_fired: Cell<u64>,
    /// Reused buffer of the timers due at one instant.
    due_timers: RefCell<Vec<(crate::timer::TimerKey, Waker)>>,
    /// Components created so far, per kind, for naming their random streams.
    components: RefCell<BTreeMap<&'static str, u64>>,
}

impl Runtime {
    /// A runtime for one run; `record_steps` keeps per-step hashes for the determinism check.
    pub fn new(config: SimConfig, faults: &[FaultConfig], record_steps: bool) -> Self {
        let root_rng = DeterministicRng::new(config.seed);
        let shared = Arc::new(Shared::default());
        Self {
            ready: Rc::new(LocalReady::new(&shared)),
            shared,
            trace: Trace::new(record_steps),
            faults: FaultInjector::new(&root_rng, faults),
            scheduler_rng: RefCell::new(root_rng.fork("scheduler")),
            root_rng,
            tasks: RefCell::new(TaskSlab::default()),
            invariants: RefCell::new(Vec::new()),
            added_invariants: RefCell::new(Vec::new()),
            sources: RefCell::new(Vec::new()),
            steps: Cell::new(0),
            polling: Cell::new(None),
            checks_evaluated: Cell::new(0),
            check_requested: Cell::new(false),
            timers_fired: Cell::new(0),
            due_timers: RefCell::new(Vec::new()),
            components: RefCell::new(BTreeMap::new()),
            config,
        }
    }

    /// The stream named `name`, forked from the root seed.
    pub fn fork_rng(&self, name: &str) -> DeterministicRng {
        self.root_rng.fork(name)
    }

    /// The next number for naming a component of `kind` ("storage", "network"). Numbered per
    /// kind, so creating a network does not rename (and so reseed) the stores created after it.
    pub fn next_component_id(&self, kind: &'static str) -> u64 {
        let mut components = self.components.borrow_mut();
        let next = components.entry(kind).or_insert(0);
        let id = *next;
        *next += 1;
        id
    }

    /// Adds a task, ready to run.
    pub fn spawn(&self, future: LocalTask) -> TaskKey {
        let (key, id) = self.tasks.borrow_mut().insert(&self.shared, future);
        self.trace.event(event::SPAWN, id, self.steps.get());
        key
    }

    /// Aborts a task; its future is dropped now, or after its current poll.
    pub fn abort(&self, key: TaskKey) {
        let future = self.tasks.borrow_mut().abort(key);
        // Dropped outside the borrow: its destructors may spawn or abort tasks.
        drop(future);
    }

    /// The task being polled, if `waker` is its own waker: a component called from that poll
    /// may keep it to wake the task later with [`Self::wake_task`].
    pub fn polling_task(&self, waker: &Waker) -> Option<TaskRef> {
        let key = self.polling.get()?;
        self.tasks.borrow().task_ref(key, waker)
    }

    /// Wakes `task` as its waker would, without the waker. Only for event sources firing
    /// ([`EventSource::fire_due`]): the runtime is then driving on this thread, so a wake of
    /// the waker would land in this runtime's ready queue, where this puts it.
    #[inline]
    pub fn wake_task(&self, task: &TaskRef) {
        self.ready.wake(task);
    }

    /// Registers invariants checked after every step, by one call (see [`Invariant`]).
    pub fn add_invariants(&self, names: Vec<&'static str>, check: Box<InvariantCheck>) {
        assert!(
            !names.is_empty(),
            "a group of invariants names at least one"
        );
        let evaluations_per_pass = names.len() as u64;
        self.register(Invariant {
            names,
            check,
            evaluations_per_pass,
        });
    }

    /// Registers `observe` to run after every step where invariants run, uncounted; a
    /// panic in it fails the run naming `name`.
    pub fn add_observer(&self, name: &'static str, observe: Box<InvariantCheck>) {
        self.register(Invariant {
            names: vec![name],
            check: observe,
            evaluations_per_pass: 0,
        });
    }

    /// Adds `invariant` to the list, or, while the list is being evaluated (a check
    /// registering another), to the ones added after the pass.
    fn register(&self, invariant: Invariant) {
        match self.invariants.try_borrow_mut() {
            Ok(mut invariants) => invariants.push(invariant),
            Err(_) => self.added_invariants.borrow_mut().push(invariant),
        }
    }

    /// Registers a source of timed events, which keeps `next_ms` equal to its
    /// [`EventSource::next_deadline_ms`].
    pub fn add_source(&self, source: Weak<dyn EventSource>, next_ms: SourceDeadline) {
        self.sources
            .borrow_mut()
            .push(SourceEntry { source, next_ms });
    }

    /// Asks for the invariants to be evaluated once the events due at this instant have
    /// fired: for an event source whose events change state that invariants judge (a storage
    /// operation taking effect), as a task's step does.
    pub fn request_check(&self) {
        self.check_requested.set(true);
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.steps.get()
    }

    /// Invariant evaluations so far.
    pub fn checks_evaluated(&self) -> u64 {
        self.checks_evaluated.get()
    }

    /// Timers fired so far.
    pub fn timers_fired(&self) -> u64 {
        self.timers_fired.get()
    }

    /// Tasks spawned so far (including the main one).
    pub fn tasks_spawned(&self) -> u64 {
        self.tasks.borrow().spawned()
    }

    /// Tasks alive now.
    pub fn tasks_alive(&self) -> u64 {
        self.tasks.borrow().live()
    }

    /// Runs until `main_done` says the scenario finished, or a failure.
    ///
    /// `main_done` is asked at the start and after every poll of the task `main`: only that
    /// task's poll can finish the scenario.
    pub fn drive(&self, main: TaskKey, main_done: &dyn Fn() -> bool) -> Result<(), SimError> {
        let _driving = DrivingGuard::new(&self.ready);
        if main_done() {
            return Ok(());
        }
        loop {
            let polled = match self.poll_next()? {
                Some(polled) => Some(polled),
                None => {
                    self.advance_time()?;
                    if !self.check_requested.replace(false) {
                        continue;
                    }
                    None
                }
            };
            // One call site, so that the pass inlines into the loop.
            self.check_invariants()?;
            if polled == Some(main) && main_done() {
                return Ok(());
            }
        }
    }

    /// Polls one ready task chosen by the scheduler stream and returns its key; `Ok(None)` if
    /// none is ready.
    fn poll_next(&self) -> Result<Option<TaskKey>, SimError> {
        loop {
            let chosen = self.ready.take(&self.shared, |count| {
                self.scheduler_rng.borrow_mut().choose_index(count)
            });
            let Some(key) = chosen else {
                return Ok(None);
            };
            // A stale key belongs to a task that finished or was aborted after being woken.
            let Some((id, future, waker)) = self.tasks.borrow_mut().begin_poll(key) else {
                continue;
            };
            let step = self.steps.get();
            if step >= self.config.steps_max {
                drop(self.tasks.borrow_mut().end_poll(key, future, false));
                return Err(SimError::StepLimit {
                    seed: self.config.seed,
                    steps_max: self.config.steps_max,
                    sim_time_ms: self.shared.now_ms(),
                });
            }
            self.steps.set(step + 1);
            self.polling.set(Some(key));
            self.trace.event(event::STEP, step + 1, id);
            self.poll_task(key, future, &waker)?;
            self.trace.end_step();
            return Ok(Some(key));
        }
    }

    /// Polls one task's future, catching a panic.
    fn poll_task(
        &self,
        key: TaskKey,
        mut future: LocalTask,
        waker: &Waker,
    ) -> Result<(), SimError> {
        let mut context = Context::from_waker(waker);
        match catch_panic(|| future.as_mut().poll(&mut context)) {
            Ok(poll) => {
                let finished = self
                    .tasks
                    .borrow_mut()
                    .end_poll(key, future, poll.is_ready());
                // Dropped outside the borrow: destructors may spawn or abort tasks.
                drop(finished);
                Ok(())
            }
            Err(message) => {
                let finished = self.tasks.borrow_mut().end_poll(key, future, true);
                // The task is broken; a second panic from its destructor adds nothing.
                let _ = catch_panic(move || drop(finished));
                Err(SimError::Panicked {
                    seed: self.config.seed,
                    step: self.steps.get(),
                    sim_time_ms: self.shared.now_ms(),
                    message,
                })
            }
        }
    }

    /// Evaluates every invariant; the first violation (or panic) fails the run.
    fn check_invariants(&self) -> Result<(), SimError> {
        let invariants = self.invariants.borrow();
        if invariants.is_empty() {
            return Ok(());
        }
        // A check may register further invariants meanwhile: they wait in `added_invariants`
        // and join the list after this pass.
        let result = self.evaluate(&invariants);
        drop(invariants);
        let mut added = self.added_invariants.borrow_mut();
        if !added.is_empty() {
            self.invariants.borrow_mut().append(&mut added);
        }
        result
    }

    fn evaluate(&self, invariants: &[Invariant]) -> Result<(), SimError> {
        for invariant in invariants {
            let at = Cell::new(0);
            let message = match catch_panic(|| (invariant.check)(&at)) {
                Ok(Ok(())) => {
                    // A failed run reports no count.
                    let evaluated = invariant.evaluations_per_pass;
                    self.checks_evaluated
                        .set(self.checks_evaluated.get() + evaluated);
                    continue;
                }
                Ok(Err(message)) => message,
                Err(panic) => format!("the check panicked: {panic}"),
            };
            let name = *invariant
                .names
                .get(at.get())
                .expect("a group's check names one of its invariants");
            return Err(SimError::InvariantViolated {
                seed: self.config.seed,
                step: self.steps.get(),
                sim_time_ms: self.shared.now_ms(),
                invariant: name.to_string(),
                message,
            });
        }
        Ok(())
    }

    /// The earliest pending timer or event of a live source.
    #[inline]
    fn next_event_ms(&self, timer_ms: Option<u64>) -> Option<u64> {
        let sources = self.sources.borrow();
        let source_ms = sources
            .iter()
            .filter(|entry| entry.source.strong_count() > 0)
            .filter_map(|entry| {
                debug_assert_eq!(
                    entry.next_ms.get(),
                    entry.source.upgrade().and_then(|s| s.next_deadline_ms()),
                    "an event source's published deadline is stale"
                );
                entry.next_ms.get()
            })
            .min();
        match (timer_ms, source_ms) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Nothing is ready: jumps time to the next event and fires everything due then.
    fn advance_time(&self) -> Result<(), SimError> {
        // The earliest deadline is read without borrowing the timers, which are borrowed only
        // when one is due (most instants are a source's: messages arriving).
        let timer_ms = self.shared.next_timer_ms();
        let Some(next_ms) = self.next_event_ms(timer_ms) else {
            return Err(SimError::Deadlock {
                seed: self.config.seed,
                step: self.steps.get(),
                sim_time_ms: self.shared.now_ms(),
                tasks_blocked: self.tasks.borrow().live().saturating_sub(1),
            });
        };
        if next_ms > self.config.sim_time_ms_max {
            return Err(SimError::TimeLimit {
                seed: self.config.seed,
                step: self.steps.get(),
                sim_time_ms_max: self.config.sim_time_ms_max,
                next_event_ms: next_ms,
            });
        }
        let now_ms = next_ms.max(self.shared.now_ms());
        self.shared.set_now_ms(now_ms);
        self.trace.event(event::TIME, now_ms, 0);
        if timer_ms.is_some_and(|timer_ms| timer_ms <= now_ms) {
            let mut due = self.due_timers.take();
            let mut timers = self.shared.timers();
            while let Some(timer) = timers.pop_due(now_ms) {
                due.push(timer);
            }
            drop(timers);
            self.fire_timers(&mut due);
            self.due_timers.replace(due);
        }
        self.fire_sources(now_ms)
    }

    /// Wakes the timers `due` (taken from the borrowed timers, in deadline then insertion
    /// order), with the borrow released: a waker may touch the timers.
    fn fire_timers(&self, due: &mut Vec<(crate::timer::TimerKey, Waker)>) {
        for (key, waker) in due.drain(..) {
            self.timers_fired.set(self.timers_fired.get() + 1);
            self.trace
                .event(event::TIMER, key.deadline_ms, key.sequence);
            waker.wake();
        }
    }

    /// Fires every live source with an event due at `now_ms`, in registration order. A
    /// source with nothing due is not called (its `fire_due` would do nothing).
    fn fire_sources(&self, now_ms: u64) -> Result<(), SimError> {
        // By index, without collecting: a source fired here may register another, which is
        // then seen in this round too (it has nothing due yet).
        let mut index = 0;
        let mut any_dropped = false;
        loop {
            let source = match self.sources.borrow().get(index) {
                Some(entry) if entry.next_ms.get().is_some_and(|at_ms| at_ms <= now_ms) => {
                    entry.source.upgrade()
                }
                Some(entry) => {
                    any_dropped |= entry.source.strong_count() == 0;
                    index += 1;
                    continue;
                }
                None => break,
            };
            index += 1;
            let Some(source) = source else {
                any_dropped = true;
                continue;
            };
            catch_panic(|| source.fire_due(now_ms)).map_err(|message| SimError::Panicked {
                seed: self.config.seed,
                step: self.steps.get(),
                sim_time_ms: now_ms,
                message,
            })?;
        }
        // Forgetting a dropped source is rare (a network or store went away): only then is
        // the list rewritten.
        if any_dropped {
            self.sources
                .borrow_mut()
                .retain(|entry| entry.source.strong_count() > 0);
        }
        Ok(())
    }

    /// Ends the run: drops every task, timer, invariant and source so no reference cycle
    /// through the runtime outlives it.
    pub fn teardown(&self) {
        // Bounded: a destructor may spawn a task, which the next round drops.
        for _ in 0..16 {
            let futures = self.tasks.borrow_mut().drain();
            if futures.is_empty() {
                break;
            }
            let _ = catch_panic(move || drop(futures));
        }
        self.shared.timers().clear();
        self.shared.ready().clear();
        self.ready.clear();
        let invariants = self.invariants.take();
        let added = self.added_invariants.take();
        let _ = catch_panic(move || drop((invariants, added)));
        let sources = std::mem::take(&mut *self.sources.borrow_mut());
        for source in sources.iter().filter_map(|entry| entry.source.upgrade()) {
            let _ = catch_panic(|| source.teardown());
        }
    }
}
