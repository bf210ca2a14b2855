//! The node's belief: "I hold this lease until local time T".
//!
//! A pure state machine fed with readings of the node's own monotonic clock. It never sees
//! the store's clock. Safety argument: the store grants or renews a lease for
//! `lease_duration_ms` *from the instant it applies the request*, which is no earlier than
//! the instant the node sent it. The node therefore measures from the send time on its local
//! clock. A local clock that runs slow by up to `clock_drift_ppm_max` counts at most
//! `lease_duration_ms * (1 - drift)` local milliseconds while `lease_duration_ms` pass on the
//! store's clock, so the node believes for that much less a safety margin, and its belief ends
//! before the store's expiry under any allowed drift and delay. A forward clock jump only
//! ends the belief sooner; the clock never goes backwards.

use kelpie_core::FencingToken;

use crate::error::ConfigError;

/// Largest relative clock drift the belief can account for: 10 %. Beyond it a node's clock
/// is broken, not drifting.
pub const CLOCK_DRIFT_PPM_MAX_LIMIT: u64 = 100_000;

const PPM_PER_UNIT: u64 = 1_000_000;

/// How conservatively a node measures its belief.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct BeliefConfig {
    /// Bound on the drift between the node's clock and the store's, in parts per million.
    pub clock_drift_ppm_max: u64,
    /// Extra time the belief ends before the earliest possible store expiry.
    pub safety_margin_ms: u64,
    /// The lease duration the store grants.
    pub lease_duration_ms: u64,
}

impl BeliefConfig {
    /// Validated settings: a positive margin, drift within [`CLOCK_DRIFT_PPM_MAX_LIMIT`], and
    /// a belief that still lasts at least half the lease.
    pub fn new(
        lease_duration_ms: u64,
        clock_drift_ppm_max: u64,
        safety_margin_ms: u64,
    ) -> Result<Self, ConfigError> {
        let invalid = |reason: String| Err(ConfigError::Belief { reason });
        if safety_margin_ms == 0 {
            return invalid("safety margin must be positive".into());
        }
        if clock_drift_ppm_max > CLOCK_DRIFT_PPM_MAX_LIMIT {
            return invalid(format!(
                "clock drift bound {clock_drift_ppm_max} ppm exceeds {CLOCK_DRIFT_PPM_MAX_LIMIT}"
            ));
        }
        let config = Self {
            clock_drift_ppm_max,
            safety_margin_ms,
            lease_duration_ms,
        };
        if config.belief_duration_ms().saturating_mul(2) < lease_duration_ms {
            return invalid(format!(
                "drift {clock_drift_ppm_max} ppm and margin {safety_margin_ms} ms leave less \
                 than half of the {lease_duration_ms} ms lease"
            ));
        }
        Ok(config)
    }

    /// Local milliseconds a grant may be believed, counted from the request's send time.
    pub fn belief_duration_ms(&self) -> u64 {
        let drift_ms = match self.lease_duration_ms.checked_mul(self.clock_drift_ppm_max) {
            Some(product) => product.div_ceil(PPM_PER_UNIT),
            // Only for a lease far beyond any the store grants; in 128 bits, exact.
            None => {
                let product =
                    u128::from(self.lease_duration_ms) * u128::from(self.clock_drift_ppm_max);
                let drift_ms = product.div_ceil(u128::from(PPM_PER_UNIT));
                u64::try_from(drift_ms).unwrap_or(u64::MAX)
            }
        };
        self.lease_duration_ms
            .saturating_sub(drift_ms)
            .saturating_sub(self.safety_margin_ms)
    }
}

/// A held belief.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldBelief {
    /// The token of the lease the node believes it holds.
    pub fencing_token: FencingToken,
    /// Local time at which the belief ends (exclusive).
    pub until_local_ms: u64,
}

/// A node's belief about one actor's lease.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Belief {
    held: Option<HeldBelief>,
}

impl Belief {
    /// No belief.
    pub fn new() -> Self {
        Self { held: None }
    }

    /// The store granted or renewed the lease with `fencing_token`, in reply to a request the
    /// node sent at local time `sent_local_ms`.
    pub fn on_granted(&mut self, config: &BeliefConfig, sent_local_ms: u64, token: FencingToken) {
        let until_local_ms = sent_local_ms + config.belief_duration_ms();
        let until_local_ms = match self.held {
            // A reply to an older request may arrive after a newer one; never shorten.
            Some(held) if held.fencing_token == token => held.until_local_ms.max(until_local_ms),
            _ => until_local_ms,
        };
        self.held = Some(HeldBelief {
            fencing_token: token,
            until_local_ms,
        });
        assert!(self.held.is_some_and(|h| h.until_local_ms >= sent_local_ms));
    }

    /// The node stops believing: a refusal, a release, or a crash.
    pub fn on_lost(&mut self) {
        self.held = None;
        assert!(self.held.is_none());
    }

    /// The belief in force at local time `now_local_ms`, if any.
    pub fn held_at(&self, now_local_ms: u64) -> Option<HeldBelief> {
        self.held.filter(|h| now_local_ms < h.until_local_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_settings_give_a_verdict_not_an_overflow() {
        // A lease far beyond any the store grants, with the largest drift bound: refused or
        // accepted, never a panic (the drift was a u64 product).
        for lease_duration_ms in [u64::MAX, u64::MAX / 2, 1 << 50] {
            let verdict = BeliefConfig::new(lease_duration_ms, CLOCK_DRIFT_PPM_MAX_LIMIT, 1);
            let config = verdict.unwrap();
            assert!(config.belief_duration_ms() < lease_duration_ms);
            assert!(config.belief_duration_ms() >= lease_duration_ms / 2);
        }
    }

    #[test]
    fn belief_is_shortened_by_drift_and_margin() {
        let config = BeliefConfig::new(1_000, 50_000, 20).unwrap();
        assert_eq!(config.belief_duration_ms(), 1_000 - 50 - 20);
        let mut belief = Belief::new();
        belief.on_granted(&config, 100, FencingToken(3));
        assert_eq!(
            belief.held_at(1_029).map(|h| h.fencing_token),
            Some(FencingToken(3))
        );
        assert_eq!(belief.held_at(1_030), None);
    }

    #[test]
    fn late_reply_never_shortens_and_loss_clears() {
        let config = BeliefConfig::new(1_000, 0, 10).unwrap();
        let mut belief = Belief::new();
        belief.on_granted(&config, 500, FencingToken(1));
        belief.on_granted(&config, 100, FencingToken(1));
        assert_eq!(belief.held_at(0).unwrap().until_local_ms, 1_490);
        belief.on_lost();
        assert_eq!(belief.held_at(0), None);
    }

    #[test]
    fn config_refuses_zero_margin_and_excess_drift() {
        assert!(BeliefConfig::new(1_000, 0, 0).is_err());
        assert!(BeliefConfig::new(1_000, CLOCK_DRIFT_PPM_MAX_LIMIT + 1, 1).is_err());
        assert!(BeliefConfig::new(1_000, 0, 600).is_err());
    }
}
