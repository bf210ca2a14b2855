//! [`Simulation`]: configures and runs one scenario under one seed.

use crate::config::SimConfig;
use crate::env::SimEnv;
use crate::error::SimError;
use crate::failure::{catch_panic, print_failure};
use crate::fault::FaultConfig;
use crate::report::SimReport;
use crate::runtime::Runtime;
use crate::trace::first_divergent_step;
use std::cell::RefCell;
use std::fmt::Display;
use std::future::Future;
use std::rc::Rc;

/// A simulation ready to run: a configuration plus the faults to inject.
#[derive(Debug, Clone)]
pub struct Simulation {
    config: SimConfig,
    faults: Vec<FaultConfig>,
}

/// One run's result plus its per-step hashes (recorded only for the determinism check).
struct RunOutcome {
    result: Result<SimReport, SimError>,
    step_hashes: Vec<u64>,
}

/// Where the main task leaves the scenario's result.
type MainSlot = Rc<RefCell<Option<Result<(), String>>>>;

impl Simulation {
    /// A simulation with `config` and no faults.
    pub fn new(config: SimConfig) -> Self {
        Self {
            config,
            faults: Vec::new(),
        }
    }

    /// Adds a fault to inject. A fault added twice keeps the last probability.
    pub fn with_fault(mut self, fault: FaultConfig) -> Self {
        self.faults.push(fault);
        self
    }

    /// The configuration.
    pub fn config(&self) -> &SimConfig {
        &self.config
    }

    /// Runs `scenario` to completion under the configured seed and returns the run's report.
    ///
    /// `scenario` is `Fn`, not `FnOnce`, so that with `DST_CHECK_DETERMINISM=1` (or
    /// [`SimConfig::check_determinism`]) it can be run twice and the traces compared. On any
    /// failure the first line printed to stderr is `DST_SEED=<n>`, followed by the command
    /// that reproduces it, unless [`SimConfig::with_failure_banner`] turned the banner off (a
    /// caller that prints its own, as `kelpie sim` does).
    pub fn run<F, Fut, E>(self, scenario: F) -> Result<SimReport, SimError>
    where
        F: Fn(SimEnv) -> Fut,
        Fut: Future<Output = Result<(), E>> + 'static,
        E: Display,
    {
        let result = self.validate().and_then(|()| {
            if self.config.check_determinism {
                self.run_twice(&scenario)
            } else {
                self.run_once(&scenario, false).result
            }
        });
        if let Err(error) = &result {
            print_failure(&self.config, error);
        }
        result
    }

    fn validate(&self) -> Result<(), SimError> {
        self.config.validate()?;
        self.faults.iter().try_for_each(FaultConfig::validate)
    }

    /// Runs the scenario twice with per-step hashes and fails on the first divergent step.
    fn run_twice<F, Fut, E>(&self, scenario: &F) -> Result<SimReport, SimError>
    where
        F: Fn(SimEnv) -> Fut,
        Fut: Future<Output = Result<(), E>> + 'static,
        E: Display,
    {
        let first = self.run_once(scenario, true);
        let second = self.run_once(scenario, true);
        let divergent = first_divergent_step(&first.step_hashes, &second.step_hashes);
        let divergent = divergent
            .or_else(|| (first.result != second.result).then_some(first.step_hashes.len() as u64));
        if let Some(step) = divergent {
            let index = usize::try_from(step.saturating_sub(1)).expect("step fits usize");
            return Err(SimError::Nondeterministic {
                seed: self.config.seed,
                step,
                first_hash: first.step_hashes.get(index).copied(),
                second_hash: second.step_hashes.get(index).copied(),
                detail: format!(
                    "first run: {}; second run: {}",
                    describe(&first.result),
                    describe(&second.result)
                ),
            });
        }
        first.result.map(|report| SimReport {
            determinism_checked: true,
            ..report
        })
    }

    /// One run from a fresh runtime.
    fn run_once<F, Fut, E>(&self, scenario: &F, record_steps: bool) -> RunOutcome
    where
        F: Fn(SimEnv) -> Fut,
        Fut: Future<Output = Result<(), E>> + 'static,
        E: Display,
    {
        let runtime = Rc::new(Runtime::new(
            self.config.clone(),
            &self.faults,
            record_steps,
        ));
        let env = SimEnv::new(runtime.clone());
        let main_slot: MainSlot = Rc::default();
        let result = match catch_panic(|| scenario(env)) {
            Ok(future) => {
                let slot = main_slot.clone();
                let main = runtime.spawn(Box::pin(async move {
                    let outcome = future.await.map_err(|error| error.to_string());
                    *slot.borrow_mut() = Some(outcome);
                }));
                runtime
                    .drive(main, &|| main_slot.borrow().is_some())
                    .and_then(|()| self.finish(&runtime, &main_slot))
            }
            Err(message) => Err(SimError::Panicked {
                seed: self.config.seed,
                step: 0,
                sim_time_ms: 0,
                message,
            }),
        };
        runtime.teardown();
        RunOutcome {
            result,
            step_hashes: runtime.trace.take_step_hashes(),
        }
    }

    /// The report of a run whose main task finished, or the scenario's error.
    fn finish(&self, runtime: &Runtime, main_slot: &MainSlot) -> Result<SimReport, SimError> {
        let outcome = main_slot
            .borrow_mut()
            .take()
            .expect("the main task finished");
        let sim_time_ms = runtime.shared.now_ms();
        if let Err(message) = outcome {
            return Err(SimError::ScenarioFailed {
                seed: self.config.seed,
                step: runtime.steps(),
                sim_time_ms,
                message,
            });
        }
        Ok(SimReport {
            seed: self.config.seed,
            steps: runtime.steps(),
            sim_time_ms,
            faults_fired: runtime.faults.stats().into_map(),
            trace_hash: runtime.trace.hash(),
            checks_evaluated: runtime.checks_evaluated(),
            tasks_spawned: runtime.tasks_spawned(),
            timers_fired: runtime.timers_fired(),
            determinism_checked: false,
        })
    }
}

fn describe(result: &Result<SimReport, SimError>) -> String {
    match result {
        Ok(report) => format!("finished ({report})"),
        Err(error) => format!("failed ({error})"),
    }
}

/// Whether what `keep` built in a run (and returns a weak handle to) is gone once the run
/// ends: for tests that a component, and what it holds that holds it back, is dropped with
/// the run.
#[cfg(test)]
pub(crate) fn dropped_with_the_run<T: 'static>(
    config: SimConfig,
    keep: impl Fn(&SimEnv) -> std::rc::Weak<T> + 'static,
) -> bool {
    let kept = std::rc::Rc::new(RefCell::new(None));
    let slot = std::rc::Rc::clone(&kept);
    Simulation::new(config)
        .run(move |env| {
            *slot.borrow_mut() = Some(keep(&env));
            async { Ok::<(), String>(()) }
        })
        .expect("the run ends");
    let kept = kept.take().expect("the scenario ran");
    kept.upgrade().is_none()
}
