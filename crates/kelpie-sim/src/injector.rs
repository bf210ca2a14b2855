//! The run-time side of fault injection: decides whether a configured fault fires, counts the
//! firings, and folds every decision into the trace.
//!
//! Each fault type draws from its own stream forked from the root seed, so configuring one
//! more fault, or one component asking more often, does not shift another fault's draws.

use crate::fault::{FaultConfig, FaultStats, FaultType, FAULT_TYPE_COUNT};
use crate::rng::DeterministicRng;
use crate::trace::{event, Trace};
use crate::trials::BernoulliTrials;
use std::cell::Cell;
use std::collections::BTreeMap;

/// Per-fault trials (with their probabilities) and counters.
#[derive(Debug)]
pub(crate) struct FaultInjector {
    /// Each configured fault's trials, drawn from its own stream a gap between firings at a
    /// time.
    streams: [Option<BernoulliTrials>; FAULT_TYPE_COUNT],
    fired: [Cell<u64>; FAULT_TYPE_COUNT],
    /// Cleared to heal: no configured fault fires while it is false.
    enabled: Cell<bool>,
}

impl FaultInjector {
    /// An injector for `faults`; a fault listed twice keeps its last probability.
    pub fn new(root: &DeterministicRng, faults: &[FaultConfig]) -> Self {
        let mut streams = [const { None }; FAULT_TYPE_COUNT];
        for config in faults {
            let index = config.fault.index();
            assert!(
                (0.0..=1.0).contains(&config.probability),
                "fault {} has probability {}, outside 0..=1",
                config.fault.name(),
                config.probability
            );
            let stream = root.fork(&format!("fault/{}", config.fault.name()));
            streams[index] = Some(BernoulliTrials::new(stream, config.probability));
        }
        Self {
            streams,
            fired: Default::default(),
            enabled: Cell::new(true),
        }
    }

    /// The configured probability of `fault`, if configured.
    pub fn probability(&self, fault: FaultType) -> Option<f64> {
        self.streams[fault.index()]
            .as_ref()
            .map(BernoulliTrials::probability)
    }

    /// Draws whether `fault` fires now; counts and traces the decision. Always `false`, with
    /// no draw, if the fault is not configured.
    ///
    /// Inline: most trials of a configured fault fall within a gap between firings
    /// ([`BernoulliTrials`]), where deciding is a decrement.
    #[inline]
    pub fn should_inject(&self, fault: FaultType, trace: &Trace) -> bool {
        let fires = self.draw(fault, trace);
        if fires {
            self.record(fault);
        }
        fires
    }

    /// [`should_inject`](Self::should_inject) without counting the firing: for a caller whose
    /// fault may find nothing to do, which then counts only what took effect
    /// ([`record`](Self::record)).
    pub fn draw(&self, fault: FaultType, trace: &Trace) -> bool {
        let index = fault.index();
        let Some(trials) = &self.streams[index] else {
            return false;
        };
        if !self.enabled.get() {
            return false;
        }
        let fires = trials.next();
        trace.event(event::FAULT, index as u64, u64::from(fires));
        fires
    }

    /// Turns every configured fault on or off (off: the run's liveness phase).
    pub fn set_enabled(&self, enabled: bool) {
        self.enabled.set(enabled);
    }

    /// Counts one firing of `fault` decided elsewhere (for example a partition dropping a
    /// message, or a scenario crashing a store).
    pub fn record(&self, fault: FaultType) {
        let counter = &self.fired[fault.index()];
        counter.set(counter.get() + 1);
    }

    /// How often `fault` fired.
    pub fn fired(&self, fault: FaultType) -> u64 {
        self.fired[fault.index()].get()
    }

    /// Counts of every configured fault and every fault that fired.
    pub fn stats(&self) -> FaultStats {
        let counts: BTreeMap<FaultType, u64> = FaultType::all()
            .iter()
            .filter(|fault| self.probability(**fault).is_some() || self.fired(**fault) > 0)
            .map(|fault| (*fault, self.fired(*fault)))
            .collect();
        FaultStats::from_map(counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unconfigured_faults_never_fire_and_certain_ones_always_do() {
        let root = DeterministicRng::new(1);
        let always = FaultConfig::new(FaultType::StorageReadFail, 1.0).unwrap();
        let injector = FaultInjector::new(&root, &[always]);
        let trace = Trace::new(false);
        assert_eq!(injector.probability(FaultType::StorageReadFail), Some(1.0));
        assert_eq!(injector.probability(FaultType::StorageWriteFail), None);
        assert!(!injector.should_inject(FaultType::StorageWriteFail, &trace));
        assert!(injector.should_inject(FaultType::StorageReadFail, &trace));
        injector.record(FaultType::NetworkPartition);
        let stats = injector.stats();
        assert_eq!(stats.get(FaultType::StorageReadFail), 1);
        assert_eq!(stats.get(FaultType::NetworkPartition), 1);
        assert!(!stats.as_map().contains_key(&FaultType::StorageWriteFail));
    }
}
