//! How a simulation run is configured: its seed, bounds and component latencies.

use crate::error::SimError;
use rand::RngCore;

/// Executor steps after which a run fails with [`SimError::StepLimit`] unless configured.
pub const SIM_STEPS_MAX_DEFAULT: u64 = 10_000_000;
/// Simulated time (one day) after which a run fails with [`SimError::TimeLimit`] unless
/// configured.
pub const SIM_TIME_MS_MAX_DEFAULT: u64 = 24 * 60 * 60 * 1000;
/// Shortest storage round trip by default.
pub const STORAGE_LATENCY_MS_MIN_DEFAULT: u64 = 1;
/// Longest storage round trip by default (before latency faults).
pub const STORAGE_LATENCY_MS_MAX_DEFAULT: u64 = 5;
/// Shortest one-way network latency by default.
pub const NETWORK_LATENCY_MS_MIN_DEFAULT: u64 = 1;
/// Longest one-way network latency by default (before delay faults).
pub const NETWORK_LATENCY_MS_MAX_DEFAULT: u64 = 20;
/// Environment variable holding the seed to replay, a decimal `u64`.
pub const DST_SEED_ENV: &str = "DST_SEED";
/// Environment variable that, when `1`, runs every simulation twice and compares traces.
pub const DST_CHECK_DETERMINISM_ENV: &str = "DST_CHECK_DETERMINISM";

const _: () = assert!(STORAGE_LATENCY_MS_MIN_DEFAULT <= STORAGE_LATENCY_MS_MAX_DEFAULT);
const _: () = assert!(NETWORK_LATENCY_MS_MIN_DEFAULT <= NETWORK_LATENCY_MS_MAX_DEFAULT);

/// The configuration of a simulation run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimConfig {
    /// The root seed every random decision derives from.
    pub seed: u64,
    /// Executor steps (task polls) after which the run fails.
    pub steps_max: u64,
    /// Simulated time after which the run fails.
    pub sim_time_ms_max: u64,
    /// Shortest storage round trip, in simulated ms.
    pub storage_latency_ms_min: u64,
    /// Longest storage round trip, in simulated ms (latency faults add to it).
    pub storage_latency_ms_max: u64,
    /// Shortest one-way network latency, in simulated ms.
    pub network_latency_ms_min: u64,
    /// Longest one-way network latency, in simulated ms (delay faults add to it).
    pub network_latency_ms_max: u64,
    /// Run every simulation twice and fail on the first divergent step. Defaults to whether
    /// `DST_CHECK_DETERMINISM=1` is set.
    pub check_determinism: bool,
    /// The command printed to reproduce a failure. When `None`, one is derived from the test
    /// binary and test name.
    pub reproduce_command: Option<String>,
    /// Whether a failing run prints the `DST_SEED=<n>` banner to stderr. A caller that prints
    /// its own banner first (the `kelpie` command) turns it off.
    pub print_failure_banner: bool,
}

impl SimConfig {
    /// A configuration with `seed` and default bounds and latencies.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            steps_max: SIM_STEPS_MAX_DEFAULT,
            sim_time_ms_max: SIM_TIME_MS_MAX_DEFAULT,
            storage_latency_ms_min: STORAGE_LATENCY_MS_MIN_DEFAULT,
            storage_latency_ms_max: STORAGE_LATENCY_MS_MAX_DEFAULT,
            network_latency_ms_min: NETWORK_LATENCY_MS_MIN_DEFAULT,
            network_latency_ms_max: NETWORK_LATENCY_MS_MAX_DEFAULT,
            check_determinism: check_determinism_from_env(),
            reproduce_command: None,
            print_failure_banner: true,
        }
    }

    /// The seed from `DST_SEED`, or a fresh random one.
    ///
    /// # Panics
    /// If `DST_SEED` is set but is not a decimal `u64`: silently running a random seed instead
    /// of the one asked for would make a replay look like it passed. Use
    /// [`SimConfig::from_env`] to handle that as an error.
    pub fn from_env_or_random() -> Self {
        match Self::from_env() {
            Ok(config) => config,
            Err(err) => panic!("{err}"),
        }
    }

    /// The seed from `DST_SEED`, or a fresh random one; an error if `DST_SEED` is malformed.
    pub fn from_env() -> Result<Self, SimError> {
        let seed = seed_from_env()?.unwrap_or_else(random_seed);
        Ok(Self::new(seed))
    }

    /// The seed in `DST_SEED`: `Ok(None)` if unset, [`SimError::InvalidSeed`] if malformed.
    pub fn seed_from_env() -> Result<Option<u64>, SimError> {
        seed_from_env()
    }

    /// Turns the stderr failure banner on or off.
    pub fn with_failure_banner(mut self, print: bool) -> Self {
        self.print_failure_banner = print;
        self
    }

    /// Sets the step bound.
    pub fn with_steps_max(mut self, steps_max: u64) -> Self {
        self.steps_max = steps_max;
        self
    }

    /// Sets the simulated-time bound.
    pub fn with_sim_time_ms_max(mut self, sim_time_ms_max: u64) -> Self {
        self.sim_time_ms_max = sim_time_ms_max;
        self
    }

    /// Sets the storage round-trip latency range (inclusive).
    pub fn with_storage_latency_ms(mut self, min_ms: u64, max_ms: u64) -> Self {
        self.storage_latency_ms_min = min_ms;
        self.storage_latency_ms_max = max_ms;
        self
    }

    /// Sets the one-way network latency range (inclusive).
    pub fn with_network_latency_ms(mut self, min_ms: u64, max_ms: u64) -> Self {
        self.network_latency_ms_min = min_ms;
        self.network_latency_ms_max = max_ms;
        self
    }

    /// Turns the double-run determinism check on or off, overriding the environment.
    pub fn with_check_determinism(mut self, check_determinism: bool) -> Self {
        self.check_determinism = check_determinism;
        self
    }

    /// Sets the command printed to reproduce a failure.
    pub fn with_reproduce_command(mut self, command: impl Into<String>) -> Self {
        self.reproduce_command = Some(command.into());
        self
    }

    /// Checks that the ranges are ordered.
    pub fn validate(&self) -> Result<(), SimError> {
        if self.storage_latency_ms_min > self.storage_latency_ms_max {
            return Err(SimError::InvalidConfig {
                message: format!(
                    "storage_latency_ms_min {} exceeds storage_latency_ms_max {}",
                    self.storage_latency_ms_min, self.storage_latency_ms_max
                ),
            });
        }
        if self.network_latency_ms_min > self.network_latency_ms_max {
            return Err(SimError::InvalidConfig {
                message: format!(
                    "network_latency_ms_min {} exceeds network_latency_ms_max {}",
                    self.network_latency_ms_min, self.network_latency_ms_max
                ),
            });
        }
        Ok(())
    }
}

/// Environment variable with how many seeds a multi-seed test runs.
pub const DST_SEEDS_ENV: &str = "DST_SEEDS";

/// The seeds a multi-seed test runs: exactly the one in `DST_SEED` if it is set (a replay),
/// otherwise `DST_SEEDS` (or `default_count`) consecutive seeds from a random base.
///
/// # Panics
/// If `DST_SEED` or `DST_SEEDS` is set but malformed: running other seeds than the ones asked
/// for would make a replay look like it passed.
pub fn test_seeds(default_count: u64) -> Vec<u64> {
    if let Some(seed) = seed_from_env().unwrap_or_else(|error| panic!("{error}")) {
        return vec![seed];
    }
    let count = match std::env::var(DST_SEEDS_ENV) {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|_| panic!("{DST_SEEDS_ENV}={value:?} is not a number of seeds")),
        Err(_) => default_count,
    };
    let base = SimConfig::from_env_or_random().seed;
    (0..count).map(|i| base.wrapping_add(i)).collect()
}

/// The seeds of [`test_seeds`] as a [`Sweep`](crate::Sweep) on every available core, so a
/// multi-seed test runs its seeds in parallel and still sees their outcomes in seed order.
///
/// # Panics
/// As [`test_seeds`].
pub fn test_sweep(default_count: u64) -> crate::Sweep {
    let seeds = test_seeds(default_count);
    let jobs = std::thread::available_parallelism()
        .unwrap_or(std::num::NonZeroUsize::MIN)
        .min(std::num::NonZeroUsize::new(crate::SWEEP_JOBS_MAX).expect("positive"));
    let base = seeds.first().copied().unwrap_or(0);
    crate::Sweep::new(base, seeds.len() as u64).with_jobs(jobs)
}

/// The seed in `DST_SEED`: `Ok(None)` if unset, an error if set but not a decimal `u64`.
pub fn seed_from_env() -> Result<Option<u64>, SimError> {
    match std::env::var(DST_SEED_ENV) {
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(raw)) => Err(SimError::InvalidSeed {
            value: raw.to_string_lossy().into_owned(),
        }),
        Ok(value) => parse_seed(&value).map(Some),
    }
}

/// Parses a decimal `u64` seed, allowing surrounding whitespace.
pub fn parse_seed(value: &str) -> Result<u64, SimError> {
    value
        .trim()
        .parse::<u64>()
        .map_err(|_| SimError::InvalidSeed {
            value: value.to_string(),
        })
}

/// Whether `DST_CHECK_DETERMINISM=1` is set.
pub fn check_determinism_from_env() -> bool {
    std::env::var(DST_CHECK_DETERMINISM_ENV).is_ok_and(|value| value.trim() == "1")
}

/// A seed from the operating system. This is the one place real randomness enters: it only
/// picks which seed to run, and that seed is printed on failure so the run can be replayed.
fn random_seed() -> u64 {
    rand::rngs::OsRng.next_u64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_decimal_seeds_and_refuses_others() {
        assert_eq!(parse_seed("42").unwrap(), 42);
        assert_eq!(parse_seed(" 18446744073709551615 ").unwrap(), u64::MAX);
        for bad in ["", "-1", "0x10", "abc", "18446744073709551616"] {
            let err = parse_seed(bad).unwrap_err();
            assert!(
                matches!(err, SimError::InvalidSeed { .. }),
                "{bad:?} gave {err:?}"
            );
            assert!(err.to_string().contains("DST_SEED"));
        }
    }

    #[test]
    fn builders_set_fields_and_validate_checks_ranges() {
        let config = SimConfig::new(1).with_steps_max(5).with_sim_time_ms_max(6);
        assert_eq!((config.steps_max, config.sim_time_ms_max), (5, 6));
        assert!(config.validate().is_ok());
        let bad = SimConfig::new(1).with_storage_latency_ms(5, 1);
        assert!(matches!(
            bad.validate(),
            Err(SimError::InvalidConfig { .. })
        ));
        let bad = SimConfig::new(1).with_network_latency_ms(5, 1);
        assert!(matches!(
            bad.validate(),
            Err(SimError::InvalidConfig { .. })
        ));
    }
}
