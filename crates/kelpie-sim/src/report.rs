//! [`SimReport`]: what a successful run reports.

use crate::fault::FaultType;
use std::collections::BTreeMap;
use std::fmt;

/// The figures of a finished run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimReport {
    /// The root seed.
    pub seed: u64,
    /// Executor steps (task polls) taken.
    pub steps: u64,
    /// Simulated time when the scenario finished.
    pub sim_time_ms: u64,
    /// How often each configured (or recorded) fault fired.
    pub faults_fired: BTreeMap<FaultType, u64>,
    /// The hash of every scheduling decision, timer, fault decision, storage operation and
    /// network delivery.
    pub trace_hash: u64,
    /// Invariant evaluations (one per invariant per step).
    pub checks_evaluated: u64,
    /// Tasks spawned, including the scenario's main task.
    pub tasks_spawned: u64,
    /// Timers that fired.
    pub timers_fired: u64,
    /// Whether the run was executed twice and both traces matched.
    pub determinism_checked: bool,
}

impl SimReport {
    /// How often `fault` fired.
    pub fn fault_fired(&self, fault: FaultType) -> u64 {
        self.faults_fired.get(&fault).copied().unwrap_or(0)
    }
}

impl fmt::Display for SimReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seed={} steps={} sim_time_ms={} trace_hash={:016x} checks={} tasks={} timers={}",
            self.seed,
            self.steps,
            self.sim_time_ms,
            self.trace_hash,
            self.checks_evaluated,
            self.tasks_spawned,
            self.timers_fired
        )?;
        for (fault, count) in &self.faults_fired {
            write!(f, " {fault}={count}")?;
        }
        Ok(())
    }
}
