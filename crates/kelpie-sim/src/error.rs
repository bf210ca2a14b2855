//! Why a simulation run failed.

use crate::fault::FaultType;

/// The failure of a simulation run, or of its configuration.
///
/// Every run failure carries the seed and the executor step at which it happened, so the
/// same seed replays it to the same step.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SimError {
    /// The run reached `steps_max` executor steps before the scenario finished.
    #[error(
        "step bound reached: {steps_max} executor steps without the scenario finishing (seed \
         {seed}, simulated time {sim_time_ms} ms); if the scenario legitimately needs more, \
         raise steps_max with SimConfig::with_steps_max"
    )]
    StepLimit {
        /// The run's seed.
        seed: u64,
        /// The bound that was reached (also the step at which the run stopped).
        steps_max: u64,
        /// Simulated time when it stopped.
        sim_time_ms: u64,
    },
    /// The next event lay beyond `sim_time_ms_max`.
    #[error(
        "simulated-time bound reached: the next event is at {next_event_ms} ms, beyond \
         sim_time_ms_max = {sim_time_ms_max} ms (seed {seed}, step {step}); if the scenario \
         legitimately runs longer, raise it with SimConfig::with_sim_time_ms_max"
    )]
    TimeLimit {
        /// The run's seed.
        seed: u64,
        /// Steps taken when it stopped.
        step: u64,
        /// The bound.
        sim_time_ms_max: u64,
        /// When the next timer or message was due.
        next_event_ms: u64,
    },
    /// The scenario's main future was pending with nothing ready and nothing scheduled.
    #[error(
        "deadlock at step {step}, simulated time {sim_time_ms} ms (seed {seed}): the scenario's \
         main future is pending, no task is ready, and no timer or message is pending, so \
         nothing can ever wake it; {tasks_blocked} other task(s) are blocked too"
    )]
    Deadlock {
        /// The run's seed.
        seed: u64,
        /// Steps taken when it stopped.
        step: u64,
        /// Simulated time when it stopped.
        sim_time_ms: u64,
        /// Live tasks besides the main one.
        tasks_blocked: u64,
    },
    /// An invariant registered with `SimEnv::add_invariant` returned an error.
    #[error(
        "invariant {invariant:?} violated at step {step}, simulated time {sim_time_ms} ms (seed \
         {seed}): {message}"
    )]
    InvariantViolated {
        /// The run's seed.
        seed: u64,
        /// The step after which the check failed.
        step: u64,
        /// Simulated time then.
        sim_time_ms: u64,
        /// The invariant's name.
        invariant: String,
        /// What the check reported.
        message: String,
    },
    /// The scenario's main future returned an error.
    #[error(
        "scenario failed at step {step}, simulated time {sim_time_ms} ms (seed {seed}): {message}"
    )]
    ScenarioFailed {
        /// The run's seed.
        seed: u64,
        /// The step in which the scenario returned.
        step: u64,
        /// Simulated time then.
        sim_time_ms: u64,
        /// The error, displayed.
        message: String,
    },
    /// A task (or an invariant check) panicked.
    #[error("panic at step {step}, simulated time {sim_time_ms} ms (seed {seed}): {message}")]
    Panicked {
        /// The run's seed.
        seed: u64,
        /// The step in which the panic happened (0: while creating the scenario).
        step: u64,
        /// Simulated time then.
        sim_time_ms: u64,
        /// The panic message and location.
        message: String,
    },
    /// Two runs with the same seed took different paths (`DST_CHECK_DETERMINISM=1`).
    #[error(
        "nondeterminism: two runs with seed {seed} diverged at step {step} (trace hash \
         {first_hash:?} vs {second_hash:?}; none means that run had already ended): {detail}. \
         Something in the scenario reads real time, real randomness, or iterates a HashMap"
    )]
    Nondeterministic {
        /// The seed both runs used.
        seed: u64,
        /// The first step whose trace hash differed.
        step: u64,
        /// The first run's trace hash after that step.
        first_hash: Option<u64>,
        /// The second run's trace hash after that step.
        second_hash: Option<u64>,
        /// What else differed.
        detail: String,
    },
    /// A fault probability was not finite or outside 0..=1.
    #[error("fault {fault} has probability {probability}; it must be a finite number in 0..=1")]
    InvalidProbability {
        /// The fault.
        fault: FaultType,
        /// The refused probability.
        probability: f64,
    },
    /// A probability was given for a fault that only counts what something else dropped.
    #[error("fault {fault} cannot be given a probability: {reason}")]
    NotInjectable {
        /// The fault.
        fault: FaultType,
        /// What it counts instead.
        reason: &'static str,
    },
    /// `DST_SEED` was set but not a decimal `u64`.
    #[error("DST_SEED={value:?} is not a decimal u64 seed; unset it for a random seed")]
    InvalidSeed {
        /// The refused value.
        value: String,
    },
    /// A configuration value was inconsistent.
    #[error("invalid simulation config: {message}")]
    InvalidConfig {
        /// What was wrong.
        message: String,
    },
}

impl SimError {
    /// The seed of the failed run, if this is a run failure.
    pub fn seed(&self) -> Option<u64> {
        match self {
            SimError::StepLimit { seed, .. }
            | SimError::TimeLimit { seed, .. }
            | SimError::Deadlock { seed, .. }
            | SimError::InvariantViolated { seed, .. }
            | SimError::ScenarioFailed { seed, .. }
            | SimError::Panicked { seed, .. }
            | SimError::Nondeterministic { seed, .. } => Some(*seed),
            SimError::InvalidProbability { .. }
            | SimError::NotInjectable { .. }
            | SimError::InvalidSeed { .. }
            | SimError::InvalidConfig { .. } => None,
        }
    }

    /// The executor step at which the run failed, if this is a run failure.
    pub fn step(&self) -> Option<u64> {
        match self {
            SimError::StepLimit {
                steps_max: step, ..
            }
            | SimError::TimeLimit { step, .. }
            | SimError::Deadlock { step, .. }
            | SimError::InvariantViolated { step, .. }
            | SimError::ScenarioFailed { step, .. }
            | SimError::Panicked { step, .. }
            | SimError::Nondeterministic { step, .. } => Some(*step),
            SimError::InvalidProbability { .. }
            | SimError::NotInjectable { .. }
            | SimError::InvalidSeed { .. }
            | SimError::InvalidConfig { .. } => None,
        }
    }

    /// A short kebab-case name of the failure kind, for the failure banner.
    pub fn kind(&self) -> &'static str {
        match self {
            SimError::StepLimit { .. } => "step-limit",
            SimError::TimeLimit { .. } => "time-limit",
            SimError::Deadlock { .. } => "deadlock",
            SimError::InvariantViolated { .. } => "invariant-violated",
            SimError::ScenarioFailed { .. } => "scenario-failed",
            SimError::Panicked { .. } => "panicked",
            SimError::Nondeterministic { .. } => "nondeterministic",
            SimError::InvalidProbability { .. } => "invalid-probability",
            SimError::NotInjectable { .. } => "not-injectable",
            SimError::InvalidSeed { .. } => "invalid-seed",
            SimError::InvalidConfig { .. } => "invalid-config",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_failures_carry_seed_and_step() {
        let err = SimError::Deadlock {
            seed: 9,
            step: 12,
            sim_time_ms: 40,
            tasks_blocked: 2,
        };
        assert_eq!(err.seed(), Some(9));
        assert_eq!(err.step(), Some(12));
        assert!(err.to_string().contains("deadlock at step 12"));
        let err = SimError::InvalidSeed { value: "x".into() };
        assert_eq!(err.seed(), None);
        assert!(err.to_string().contains("DST_SEED"));
    }
}
