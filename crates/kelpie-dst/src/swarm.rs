//! Swarm testing: each seed draws its own fault mix, so a sweep over many seeds explores runs
//! with few faults, many faults, and everything between, instead of one fixed mix.

use kelpie_sim::DeterministicRng;
use kelpie_sim::{FaultConfig, FaultType};

/// Probability that a seed enables any one fault.
pub const SWARM_FAULT_ENABLED_PROBABILITY: f64 = 0.6;
/// Highest rate a swarm draws for a fault.
pub const SWARM_FAULT_PROBABILITY_MAX: f64 = 0.2;

/// The faults a swarm draws from for the lease scenario.
pub const SWARM_LEASE_FAULTS: &[FaultType] = &[
    FaultType::StorageWriteFail,
    FaultType::StorageReadFail,
    FaultType::StorageCommitUnknown,
    FaultType::StorageLatency,
    FaultType::NetworkMessageLoss,
    FaultType::NetworkDuplicate,
    FaultType::NetworkDelay,
    FaultType::NetworkReorder,
    FaultType::PartitionTwoWay,
    FaultType::PartitionOneWay,
    FaultType::NodeCrash,
    FaultType::ClockJump,
    FaultType::StorageCrash,
];

/// The fault mix of `seed`: each fault of `faults` enabled with
/// [`SWARM_FAULT_ENABLED_PROBABILITY`], at a rate drawn up to [`SWARM_FAULT_PROBABILITY_MAX`].
/// The draw uses its own stream, so it does not shift any of the run's other draws.
pub fn swarm_faults(seed: u64, faults: &[FaultType]) -> Vec<FaultConfig> {
    let mut rng = DeterministicRng::new(seed).fork("swarm");
    let mut drawn = Vec::new();
    for &fault in faults {
        if rng.gen_bool(SWARM_FAULT_ENABLED_PROBABILITY) {
            let probability = rng.gen_range(0.001..SWARM_FAULT_PROBABILITY_MAX);
            drawn.push(FaultConfig::new(fault, probability).expect("drawn within 0..=1"));
        }
    }
    drawn
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_seed_draws_its_own_mix_deterministically() {
        assert_eq!(
            swarm_faults(7, SWARM_LEASE_FAULTS),
            swarm_faults(7, SWARM_LEASE_FAULTS)
        );
        let mixes: std::collections::BTreeSet<usize> = (0..64)
            .map(|seed| swarm_faults(seed, SWARM_LEASE_FAULTS).len())
            .collect();
        assert!(
            mixes.len() > 2,
            "seeds draw different numbers of faults: {mixes:?}"
        );
        for seed in 0..64 {
            for config in swarm_faults(seed, SWARM_LEASE_FAULTS) {
                assert!(
                    config.probability > 0.0 && config.probability < SWARM_FAULT_PROBABILITY_MAX
                );
            }
        }
    }
}
