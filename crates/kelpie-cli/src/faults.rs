//! `--faults`: `swarm` (a mix drawn per seed), `none`, or a list such as
//! `storage-write-fail=0.1,partition=0.05`.
//!
//! Names are the simulator's [`FaultType`] names, so a fault type added there is accepted here
//! without a change. A name that is not exact is accepted if it is the last part of exactly
//! one fault type's name (`write-fail` for `storage-write-fail`), which keeps command lines
//! short; one that ends several is refused with their names. The two fault types that only
//! count drops (`network-partition`, `network-queue-overflow`) are refused a probability.

use std::fmt;
use std::str::FromStr;

use kelpie_dst::{swarm_faults, SWARM_LEASE_FAULTS};
use kelpie_sim::{FaultConfig, FaultType};

/// The faults a run injects.
#[derive(Debug, Clone, PartialEq)]
pub enum FaultPlan {
    /// Each seed draws its own mix ([`swarm_faults`]).
    Swarm,
    /// The same list for every seed (possibly empty: `none`).
    List(Vec<FaultConfig>),
}

/// Why a `--faults` value was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FaultsError {
    /// An entry was not `NAME=PROBABILITY`.
    #[error("{entry:?} is not NAME=PROBABILITY (e.g. storage-write-fail=0.1)")]
    BadEntry {
        /// The refused entry.
        entry: String,
    },
    /// No fault type has that name.
    #[error("no fault is called {name:?}; known faults: {}", known_names())]
    UnknownFault {
        /// The refused name.
        name: String,
    },
    /// The name is the last part of more than one fault type's name.
    #[error(
        "{name:?} is short for more than one fault: {}; give one of them in full",
        candidates.join(", ")
    )]
    AmbiguousFault {
        /// The refused name.
        name: String,
        /// The faults whose names end with it, in the simulator's order.
        candidates: Vec<String>,
    },
    /// The fault only counts what something else dropped: no probability injects it.
    #[error("fault {name} cannot be given a probability: {reason}")]
    NotInjectable {
        /// The fault's name.
        name: String,
        /// What it counts instead.
        reason: &'static str,
    },
    /// The probability was not a number in 0..=1.
    #[error("fault {name} has probability {value:?}; it must be a number in 0..=1")]
    BadProbability {
        /// The fault's name.
        name: String,
        /// The refused value.
        value: String,
    },
    /// The same fault was listed twice.
    #[error("fault {name} is listed twice")]
    Duplicate {
        /// The fault's name.
        name: String,
    },
}

fn known_names() -> String {
    let names: Vec<&str> = (FaultType::all().iter())
        .filter(|fault| fault.is_injectable())
        .map(FaultType::name)
        .collect();
    format!("{} (or swarm, or none)", names.join(", "))
}

/// The fault type called `name`, or the only one whose name ends with `-name`. A name that
/// ends several is refused with their names, so the user can pick one rather than be told
/// the name is unknown.
pub fn fault_by_name(name: &str) -> Result<FaultType, FaultsError> {
    if let Some(fault) = FaultType::from_name(name) {
        return Ok(fault);
    }
    let suffix = format!("-{name}");
    let matches: Vec<FaultType> = FaultType::all()
        .iter()
        .copied()
        .filter(|fault| fault.name().ends_with(&suffix))
        .collect();
    match matches.as_slice() {
        [fault] => Ok(*fault),
        [] => Err(FaultsError::UnknownFault {
            name: name.to_string(),
        }),
        several => Err(FaultsError::AmbiguousFault {
            name: name.to_string(),
            candidates: several.iter().map(|f| f.name().to_string()).collect(),
        }),
    }
}

impl FromStr for FaultPlan {
    type Err = FaultsError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value.trim() {
            "swarm" => return Ok(FaultPlan::Swarm),
            // An empty value is refused as an entry, not taken for `none`: `--faults ""` is more
            // likely an unset variable than a choice.
            "none" => return Ok(FaultPlan::List(Vec::new())),
            _ => {}
        }
        let mut list: Vec<FaultConfig> = Vec::new();
        for entry in value.split(',').map(str::trim) {
            let (name, probability) = entry.split_once('=').ok_or(FaultsError::BadEntry {
                entry: entry.to_string(),
            })?;
            let (name, probability) = (name.trim(), probability.trim());
            let fault = fault_by_name(name)?;
            if let Some(reason) = fault.counted_only_reason() {
                return Err(FaultsError::NotInjectable {
                    name: fault.name().to_string(),
                    reason,
                });
            }
            let bad_probability = || FaultsError::BadProbability {
                name: fault.name().to_string(),
                value: probability.to_string(),
            };
            let parsed: f64 = probability.parse().map_err(|_| bad_probability())?;
            let config = FaultConfig::new(fault, parsed).map_err(|_| bad_probability())?;
            if list.iter().any(|c| c.fault == fault) {
                return Err(FaultsError::Duplicate {
                    name: fault.name().to_string(),
                });
            }
            list.push(config);
        }
        Ok(FaultPlan::List(list))
    }
}

impl FaultPlan {
    /// The faults seed `seed` runs with.
    pub fn resolve(&self, seed: u64) -> Vec<FaultConfig> {
        match self {
            FaultPlan::Swarm => swarm_faults(seed, SWARM_LEASE_FAULTS),
            FaultPlan::List(list) => list.clone(),
        }
    }
}

impl fmt::Display for FaultPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FaultPlan::Swarm => f.write_str("swarm"),
            FaultPlan::List(list) => f.write_str(&describe(list)),
        }
    }
}

/// A fault list as `--faults` takes it: `none`, or `name=p,...` in the list's order. Rust
/// prints the shortest decimal that parses back to the same `f64`, so a printed list replays
/// exactly the probabilities that ran.
pub fn describe(faults: &[FaultConfig]) -> String {
    if faults.is_empty() {
        return "none".to_string();
    }
    let entries: Vec<String> = faults
        .iter()
        .map(|c| format!("{}={}", c.fault.name(), c.probability))
        .collect();
    entries.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_parse_and_print_back_exactly() {
        let plan: FaultPlan = "storage-write-fail=0.1, storage-latency=0.123456789012345"
            .parse()
            .unwrap();
        let FaultPlan::List(list) = &plan else {
            panic!("{plan:?}");
        };
        assert_eq!(list[0].fault, FaultType::StorageWriteFail);
        assert_eq!(plan.to_string().parse::<FaultPlan>().unwrap(), plan);
        assert_eq!("swarm".parse::<FaultPlan>().unwrap(), FaultPlan::Swarm);
        assert_eq!("none".parse::<FaultPlan>().unwrap().to_string(), "none");
    }

    #[test]
    fn swarm_draws_replay_as_explicit_lists() {
        for seed in 0..32 {
            let drawn = FaultPlan::Swarm.resolve(seed);
            let replayed: FaultPlan = describe(&drawn).parse().unwrap();
            assert_eq!(replayed.resolve(seed), drawn);
        }
    }

    #[test]
    fn a_unique_suffix_names_a_fault() {
        // An exact name first: `partition` is a fault of its own, though `network-partition`
        // ends with it too.
        assert_eq!(fault_by_name("partition"), Ok(FaultType::PartitionTwoWay));
        assert_eq!(fault_by_name("write-fail"), Ok(FaultType::StorageWriteFail));
        // Not unique: storage-write-fail and storage-read-fail both end with it.
        assert!(matches!(
            fault_by_name("fail"),
            Err(FaultsError::AmbiguousFault { .. })
        ));
        assert!(matches!(
            fault_by_name("nosuchfault"),
            Err(FaultsError::UnknownFault { .. })
        ));
    }

    #[test]
    fn an_ambiguous_suffix_is_refused_with_the_faults_it_could_mean() {
        let error = "crash=0.1".parse::<FaultPlan>().unwrap_err();
        assert_eq!(
            error,
            FaultsError::AmbiguousFault {
                name: "crash".to_string(),
                candidates: vec!["node-crash".to_string(), "storage-crash".to_string()],
            }
        );
        assert_eq!(
            error.to_string(),
            "\"crash\" is short for more than one fault: node-crash, storage-crash; give one \
             of them in full"
        );
    }

    #[test]
    fn a_fault_that_only_counts_drops_is_refused_with_what_to_set_instead() {
        for (entry, hint) in [
            ("network-partition=1", "partition-one-way"),
            ("queue-overflow=0.5", "mailbox_capacity"),
        ] {
            let error = entry.parse::<FaultPlan>().unwrap_err();
            assert!(
                matches!(error, FaultsError::NotInjectable { .. }),
                "{error}"
            );
            assert!(error.to_string().contains(hint), "{error}");
        }
        // Nor are they offered in the list of known faults.
        let error = "nosuchfault=0.1".parse::<FaultPlan>().unwrap_err();
        assert!(!error.to_string().contains("network-partition"), "{error}");
        assert!(error.to_string().contains("partition-one-way"), "{error}");
    }

    #[test]
    fn bad_values_are_refused_with_a_reason() {
        let error = "storage-write-fail=1.5".parse::<FaultPlan>().unwrap_err();
        assert!(matches!(error, FaultsError::BadProbability { .. }));
        assert!(error.to_string().contains("0..=1"), "{error}");
        let error = "nosuchfault=0.1".parse::<FaultPlan>().unwrap_err();
        assert!(error.to_string().contains("storage-write-fail"), "{error}");
        for bad in [
            "",
            " ",
            ",",
            "storage-write-fail",
            "storage-write-fail=x",
            "storage-write-fail=NaN",
        ] {
            assert!(bad.parse::<FaultPlan>().is_err(), "{bad}");
        }
        assert!(matches!(
            "write-fail=0.1,storage-write-fail=0.2".parse::<FaultPlan>(),
            Err(FaultsError::Duplicate { .. })
        ));
    }
}
