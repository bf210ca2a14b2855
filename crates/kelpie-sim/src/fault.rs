//! The faults a simulation can inject, their configuration, and counts of how often each fired.

use crate::error::SimError;
use std::collections::BTreeMap;
use std::fmt;

/// A kind of fault. Each has a kebab-case name (see [`FaultType::name`]) used in messages and
/// on command lines.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FaultType {
    /// A storage write fails and nothing is applied.
    StorageWriteFail,
    /// A storage read (or the read half of a read-modify-write) fails.
    StorageReadFail,
    /// A storage write is applied but the caller receives an error.
    StorageCommitUnknown,
    /// A storage operation takes an extra latency spike.
    StorageLatency,
    /// A network message is silently dropped.
    NetworkMessageLoss,
    /// A network message is delivered twice.
    NetworkDuplicate,
    /// A network message takes an extra latency spike (so it is also reordered).
    NetworkDelay,
    /// A network message takes the shortest latency, overtaking messages sent before it on
    /// the same link.
    NetworkReorder,
    /// A network message was dropped because its link was partitioned. Partitions are set by
    /// the scenario; this counts the messages they cost.
    NetworkPartition,
    /// A node is cut off from the store in both directions for a window, then healed.
    PartitionTwoWay,
    /// One direction between a node and the store is cut for a window (requests or replies
    /// lost), then healed.
    PartitionOneWay,
    /// A node crashes, losing its memory, and restarts after a window.
    NodeCrash,
    /// A node's monotonic clock jumps forward (as after a suspended VM resumes).
    ClockJump,
    /// The store crashes and restarts after a window; what it acknowledged survives.
    StorageCrash,
    /// A message reached a full mailbox and was dropped. Mailboxes are bounded by
    /// `NetworkConfig::mailbox_capacity`; this counts the messages the bound cost.
    NetworkQueueOverflow,
}

/// Every fault type, in declaration order. Also the order of the fault counters.
const ALL_FAULT_TYPES: [FaultType; 15] = [
    FaultType::StorageWriteFail,
    FaultType::StorageReadFail,
    FaultType::StorageCommitUnknown,
    FaultType::StorageLatency,
    FaultType::NetworkMessageLoss,
    FaultType::NetworkDuplicate,
    FaultType::NetworkDelay,
    FaultType::NetworkReorder,
    FaultType::NetworkPartition,
    FaultType::PartitionTwoWay,
    FaultType::PartitionOneWay,
    FaultType::NodeCrash,
    FaultType::ClockJump,
    FaultType::StorageCrash,
    FaultType::NetworkQueueOverflow,
];

/// How many fault types exist; the length of per-fault tables.
pub(crate) const FAULT_TYPE_COUNT: usize = ALL_FAULT_TYPES.len();

impl FaultType {
    /// The kebab-case name, for example `"storage-write-fail"`.
    pub fn name(&self) -> &'static str {
        match self {
            FaultType::StorageWriteFail => "storage-write-fail",
            FaultType::StorageReadFail => "storage-read-fail",
            FaultType::StorageCommitUnknown => "storage-commit-unknown",
            FaultType::StorageLatency => "storage-latency",
            FaultType::NetworkMessageLoss => "network-message-loss",
            FaultType::NetworkDuplicate => "network-duplicate",
            FaultType::NetworkDelay => "network-delay",
            FaultType::NetworkReorder => "network-reorder",
            FaultType::NetworkPartition => "network-partition",
            FaultType::PartitionTwoWay => "partition",
            FaultType::PartitionOneWay => "partition-one-way",
            FaultType::NodeCrash => "node-crash",
            FaultType::ClockJump => "clock-jump",
            FaultType::StorageCrash => "storage-crash",
            FaultType::NetworkQueueOverflow => "network-queue-overflow",
        }
    }

    /// Every fault type.
    pub fn all() -> &'static [FaultType] {
        &ALL_FAULT_TYPES
    }

    /// Whether the simulator's components draw this fault themselves with its configured
    /// probability (storage and network faults). The others fire when a scenario acts on
    /// them: the swarm's chaos task draws partitions, crashes and clock jumps; a partition or
    /// a full mailbox counts the messages it drops.
    pub fn is_drawn_by_components(self) -> bool {
        matches!(
            self,
            FaultType::StorageWriteFail
                | FaultType::StorageReadFail
                | FaultType::StorageCommitUnknown
                | FaultType::StorageLatency
                | FaultType::NetworkMessageLoss
                | FaultType::NetworkDuplicate
                | FaultType::NetworkDelay
                | FaultType::NetworkReorder
        )
    }

    /// Why no probability can be set for this fault, if none can: it only counts the messages
    /// something else dropped. `None` for a fault a probability injects.
    pub fn counted_only_reason(self) -> Option<&'static str> {
        match self {
            FaultType::NetworkPartition => Some(
                "it counts the messages partitions drop; partitions are injected as partition \
                 or partition-one-way",
            ),
            FaultType::NetworkQueueOverflow => Some(
                "it counts the messages full mailboxes drop; the mailboxes' bound \
                 (NetworkConfig::mailbox_capacity) decides when that happens",
            ),
            _ => None,
        }
    }

    /// Whether a probability injects this fault (see [`FaultType::counted_only_reason`]).
    pub fn is_injectable(self) -> bool {
        self.counted_only_reason().is_none()
    }

    /// The fault type whose [`name`](FaultType::name) is `name`.
    pub fn from_name(name: &str) -> Option<FaultType> {
        ALL_FAULT_TYPES
            .iter()
            .copied()
            .find(|fault| fault.name() == name)
    }

    /// The position of this fault in [`FaultType::all`]; indexes per-fault tables.
    pub(crate) fn index(self) -> usize {
        let index = self as usize;
        assert!(
            ALL_FAULT_TYPES[index] == self,
            "ALL_FAULT_TYPES is out of declaration order"
        );
        index
    }
}

impl fmt::Display for FaultType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One fault to inject, with the probability that it fires at each opportunity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FaultConfig {
    /// Which fault.
    pub fault: FaultType,
    /// Probability in `0.0..=1.0` that it fires each time a component asks.
    pub probability: f64,
}

impl FaultConfig {
    /// A fault with its probability, refused unless the probability is finite and in 0..=1.
    pub fn new(fault: FaultType, probability: f64) -> Result<FaultConfig, SimError> {
        let config = FaultConfig { fault, probability };
        config.validate()?;
        Ok(config)
    }

    /// Checks the probability again; the fields are public, so [`Simulation`] re-validates.
    ///
    /// [`Simulation`]: crate::Simulation
    pub fn validate(&self) -> Result<(), SimError> {
        if let Some(reason) = self.fault.counted_only_reason() {
            return Err(SimError::NotInjectable {
                fault: self.fault,
                reason,
            });
        }
        if self.probability.is_finite() && (0.0..=1.0).contains(&self.probability) {
            Ok(())
        } else {
            Err(SimError::InvalidProbability {
                fault: self.fault,
                probability: self.probability,
            })
        }
    }
}

/// How often each fault fired. A cheap snapshot: cloning copies a small map.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FaultStats {
    counts: BTreeMap<FaultType, u64>,
}

impl FaultStats {
    /// Stats from a map of counts.
    pub fn from_map(counts: BTreeMap<FaultType, u64>) -> Self {
        Self { counts }
    }

    /// How often `fault` fired (zero if never or not configured).
    pub fn get(&self, fault: FaultType) -> u64 {
        self.counts.get(&fault).copied().unwrap_or(0)
    }

    /// The total over all faults.
    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }

    /// The counts as a map, in [`FaultType`] order.
    pub fn as_map(&self) -> &BTreeMap<FaultType, u64> {
        &self.counts
    }

    /// The counts as an owned map.
    pub fn into_map(self) -> BTreeMap<FaultType, u64> {
        self.counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fault_that_only_counts_drops_is_refused_a_probability() {
        for fault in [FaultType::NetworkPartition, FaultType::NetworkQueueOverflow] {
            assert!(!fault.is_injectable());
            let refused = FaultConfig::new(fault, 0.5).unwrap_err();
            assert!(
                matches!(refused, SimError::NotInjectable { fault: f, .. } if f == fault),
                "{refused}"
            );
            // A config built field by field is checked again before a run.
            let built = FaultConfig {
                fault,
                probability: 0.5,
            };
            assert!(built.validate().is_err());
        }
        let injectable: Vec<_> = FaultType::all()
            .iter()
            .filter(|f| f.is_injectable())
            .collect();
        assert_eq!(injectable.len(), FaultType::all().len() - 2);
        assert!(FaultConfig::new(FaultType::PartitionTwoWay, 0.5).is_ok());
    }

    #[test]
    fn names_round_trip_and_are_kebab_case() {
        for fault in FaultType::all() {
            assert_eq!(FaultType::from_name(fault.name()), Some(*fault));
            assert!(fault
                .name()
                .chars()
                .all(|c| c.is_ascii_lowercase() || c == '-'));
            assert_eq!(FaultType::all()[fault.index()], *fault);
        }
        assert_eq!(FaultType::from_name("nope"), None);
    }

    #[test]
    fn probability_must_be_finite_and_within_zero_and_one() {
        assert!(FaultConfig::new(FaultType::StorageLatency, 0.0).is_ok());
        assert!(FaultConfig::new(FaultType::StorageLatency, 1.0).is_ok());
        for bad in [-0.1, 1.5, f64::NAN, f64::INFINITY] {
            assert!(matches!(
                FaultConfig::new(FaultType::StorageLatency, bad),
                Err(SimError::InvalidProbability {
                    fault: FaultType::StorageLatency,
                    ..
                })
            ));
        }
    }
}
