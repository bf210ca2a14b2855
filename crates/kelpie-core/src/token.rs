//! Fencing tokens.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A number issued with every new lease holder, strictly greater than every token issued
/// before for the same actor. A resource that remembers the highest token it has accepted can
/// refuse writes from a stale holder, even one that still (wrongly) believes it holds the lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct FencingToken(pub u64);

impl FencingToken {
    /// The token before any lease was ever granted. No holder is ever issued it.
    pub const ZERO: FencingToken = FencingToken(0);

    /// The token the next holder receives.
    ///
    /// # Panics
    /// On overflow of `u64`, which would need 2^64 takeovers of one actor.
    pub fn next(self) -> FencingToken {
        let next = self.0.checked_add(1).expect("fencing token overflowed u64");
        assert!(next > self.0);
        FencingToken(next)
    }
}

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_is_strictly_greater() {
        assert!(FencingToken::ZERO.next() > FencingToken::ZERO);
        assert_eq!(FencingToken(41).next(), FencingToken(42));
    }
}
