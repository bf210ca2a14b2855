//! A run of independent trials that each succeed with one probability, drawn a gap at a time.
//!
//! A fault is asked about far more often than it fires (the swarm's rates are 0.1% to 20%), and
//! drawing 64 random bits for every question cost about 70 instructions a trial: 3% of a swarm's
//! run. The trials are independent, so the number of failures before the next success is
//! geometric, and drawing that number once per success is the same process: each trial still
//! succeeds with the configured probability, independently of the others, but a trial costs a
//! decrement. The gap is drawn from one 64-bit word by a table lookup in integer arithmetic
//! (no logarithm, whose last bit can differ between platforms' libraries), so a seed gives the
//! same trials on every machine.

use std::cell::{Cell, RefCell};

use crate::rng::DeterministicRng;

/// Gaps the table covers: a gap of this many failures or more is handed out as this many
/// failures, after which the next gap is drawn afresh (the trials are memoryless, so that is
/// the same process). At the swarm's lowest rate (0.1%) a redraw comes every 128 trials.
const GAP_TABLE_LEN: usize = 128;

/// 2^64 as the scale of probabilities in 64-bit fixed point.
const SCALE: f64 = 18_446_744_073_709_551_616.0;

/// Trials that each succeed with probability `p`, independently: [`Self::next`] answers one.
///
/// Asked through a shared reference: a trial within a gap touches one counter, with no borrow
/// flag to check; only the trial that ends a gap borrows the stream.
#[derive(Debug)]
pub(crate) struct BernoulliTrials {
    /// As configured (the table holds it rounded).
    probability: f64,
    /// Failures to hand out before the next decision.
    failures_left: Cell<u32>,
    gaps: RefCell<Gaps>,
}

/// Where gaps come from, and how the current one ends.
#[derive(Debug)]
struct Gaps {
    rng: DeterministicRng,
    /// `survive[k - 1]`: the probability that the next `k` trials all fail, in 64-bit fixed
    /// point (rounded down), for `k` in `1..=GAP_TABLE_LEN`. Non-increasing.
    survive: Box<[u64; GAP_TABLE_LEN]>,
    /// Whether the trial after the current gap's failures succeeds (else a new gap is drawn
    /// for it).
    success_after: bool,
    /// `p` is zero: no trial ever succeeds, and nothing is drawn.
    never: bool,
}

impl BernoulliTrials {
    /// Trials succeeding with `probability` (within `0.0..=1.0`), drawn from `rng`.
    ///
    /// # Panics
    /// If `probability` is outside `0.0..=1.0`: a bug in the caller, which validates it.
    pub(crate) fn new(rng: DeterministicRng, probability: f64) -> Self {
        assert!(
            (0.0..=1.0).contains(&probability),
            "trial probability {probability} outside 0..=1"
        );
        // The probability of one failure, in 64-bit fixed point: a difference and a product
        // of floats, each rounded alike on every IEEE machine, and a cast that saturates (at
        // `probability` 0, whose table is never read). Then its powers, in integers.
        let fail = u128::from(((1.0 - probability) * SCALE) as u64);
        let mut survive = Box::new([0u64; GAP_TABLE_LEN]);
        let mut all_fail = 1u128 << 64;
        for entry in survive.iter_mut() {
            all_fail = (all_fail * fail) >> 64;
            *entry = u64::try_from(all_fail).expect("a product of fractions is a fraction");
        }
        let mut gaps = Gaps {
            rng,
            survive,
            success_after: false,
            never: probability == 0.0,
        };
        let failures = gaps.draw();
        Self {
            probability,
            failures_left: Cell::new(failures),
            gaps: RefCell::new(gaps),
        }
    }

    /// The probability of a success, as configured.
    pub(crate) fn probability(&self) -> f64 {
        self.probability
    }

    /// Whether the next trial succeeds.
    #[inline]
    pub(crate) fn next(&self) -> bool {
        let left = self.failures_left.get();
        if left > 0 {
            self.failures_left.set(left - 1);
            return false;
        }
        self.decide()
    }

    /// The trial at the end of a gap: it succeeds if the gap ended in a success; if the gap
    /// only ran out of the table, a new gap is drawn and the trial is its first.
    #[inline(never)]
    fn decide(&self) -> bool {
        let mut gaps = self.gaps.borrow_mut();
        loop {
            let succeeds = gaps.success_after;
            let failures = gaps.draw();
            if succeeds || failures > 0 {
                self.failures_left.set(failures - u32::from(!succeeds));
                return succeeds;
            }
        }
    }
}

impl Gaps {
    /// Draws the failures before the next success: `k` or more with probability
    /// `survive[k - 1]`, from one uniform word (`k` or more iff the word is below it).
    fn draw(&mut self) -> u32 {
        if self.never {
            self.success_after = false;
            return u32::MAX;
        }
        let word = self.rng.next_u64();
        let failures = self.survive.partition_point(|&survive| word < survive);
        self.success_after = failures < GAP_TABLE_LEN;
        u32::try_from(failures).expect("a gap within the table")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Successes in `trials` trials at `probability`, and the longest run of failures.
    fn run(seed: u64, probability: f64, trials: u64) -> (u64, u64) {
        let bernoulli = BernoulliTrials::new(DeterministicRng::new(seed), probability);
        let (mut successes, mut run, mut longest) = (0, 0, 0);
        for _ in 0..trials {
            if bernoulli.next() {
                successes += 1;
                run = 0;
            } else {
                run += 1;
                longest = u64::max(longest, run);
            }
        }
        (successes, longest)
    }

    #[test]
    fn zero_never_succeeds_and_one_always_does() {
        assert_eq!(run(1, 0.0, 100_000), (0, 100_000));
        assert_eq!(run(1, 1.0, 100_000), (100_000, 0));
    }

    #[test]
    fn successes_come_at_the_configured_rate() {
        const TRIALS: u64 = 2_000_000;
        for (seed, probability) in [(1, 0.001), (2, 0.01), (3, 0.05), (4, 0.2), (5, 0.5)] {
            let (successes, _) = run(seed, probability, TRIALS);
            let expected = probability * TRIALS as f64;
            let sigma = (expected * (1.0 - probability)).sqrt();
            assert!(
                (successes as f64 - expected).abs() < 5.0 * sigma,
                "p = {probability}: {successes} successes, expected {expected} ± {sigma}"
            );
        }
    }

    #[test]
    fn gaps_longer_than_the_table_continue_as_the_same_process() {
        // At 0.1% most gaps outrun the table, and runs of failures far longer than it occur.
        let (successes, longest) = run(7, 0.001, 2_000_000);
        assert!(longest > 4 * GAP_TABLE_LEN as u64, "longest run {longest}");
        assert!((1_800..2_200).contains(&successes), "{successes} successes");
    }

    #[test]
    fn pairs_of_trials_are_independent() {
        // Successes in consecutive trials at the product of their rates: a table that handed out
        // gaps wrongly (one too short, say) would make a success followed by one far too common
        // or too rare.
        let trials = BernoulliTrials::new(DeterministicRng::new(11), 0.2);
        let (mut previous, mut both) = (false, 0u64);
        const TRIALS: u64 = 1_000_000;
        for _ in 0..TRIALS {
            let now = trials.next();
            both += u64::from(previous && now);
            previous = now;
        }
        let expected = 0.04 * TRIALS as f64;
        let sigma = (expected * 0.96).sqrt();
        assert!(
            (both as f64 - expected).abs() < 5.0 * sigma,
            "{both} consecutive successes, expected {expected} ± {sigma}"
        );
    }

    #[test]
    fn the_seed_decides_the_trials() {
        let answers = |seed| {
            let trials = BernoulliTrials::new(DeterministicRng::new(seed), 0.1);
            (0..1_000).map(|_| trials.next()).collect::<Vec<_>>()
        };
        assert_eq!(answers(3), answers(3));
        assert_ne!(answers(3), answers(4));
    }
}
