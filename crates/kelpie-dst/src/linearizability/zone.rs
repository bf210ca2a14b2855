//! Store instants nobody observed, kept symbolic: a difference-bound matrix (DBM) over the few
//! instants the future of the search can still depend on.
//!
//! Every timing rule of the lease model compares two instants or an instant with a constant:
//! an operation takes effect within its interval, effects never go back in time, a lease is
//! valid while `now < expires`, a renewal extends to `max(now + duration, expires)`, and a
//! reply names an instant exactly. Each is a difference constraint `x - y <= c`, so the set of
//! instants consistent with a path of the search is a convex zone, and projecting a
//! closed DBM on fewer variables is exact: the zone keeps exactly the valuations some
//! choice of the forgotten instants extends.

/// No bound.
pub(super) const INF: i64 = i64::MAX / 4;

/// A variable of the zone.
pub(super) type Slot = usize;
/// The constant zero: `x - Z <= c` is an upper bound on `x`.
pub(super) const Z: Slot = 0;
/// The instant of the last effect placed.
pub(super) const T: Slot = 1;
/// The record's acquisition instant.
pub(super) const A: Slot = 2;
/// The record's expiry.
pub(super) const E: Slot = 3;
/// The instant of the effect being placed (free between steps).
pub(super) const N: Slot = 4;
const SLOTS: usize = 5;

/// A closed difference-bound matrix: `bounds[i][j]` is the tightest `c` with `x_i - x_j <= c`.
/// Free slots have no bound.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Zone {
    bounds: [[i64; SLOTS]; SLOTS],
}

fn add(a: i64, b: i64) -> i64 {
    if a >= INF || b >= INF {
        INF
    } else {
        a + b
    }
}

/// A millisecond value as a bound (`u64::MAX` and other huge values mean no bound).
pub(super) fn ms(value: u64) -> i64 {
    i64::try_from(value).map_or(INF, |v| v.min(INF))
}

impl Zone {
    /// Every slot free.
    pub(super) fn unconstrained() -> Self {
        let mut bounds = [[INF; SLOTS]; SLOTS];
        for (i, row) in bounds.iter_mut().enumerate() {
            row[i] = 0;
        }
        Self { bounds }
    }

    /// Adds `x - y <= c`; false if the zone became empty (it is then left unusable).
    #[must_use]
    #[inline(always)]
    pub(super) fn constrain(&mut self, x: Slot, y: Slot, c: i64) -> bool {
        // Most constraints the search adds are implied already: that test is inlined, the
        // closure is not.
        c >= self.bounds[x][y] || self.tighten(x, y, c)
    }

    /// [`Zone::constrain`] with a constraint `x - y <= c` tighter than the zone's.
    #[must_use]
    #[inline(never)]
    fn tighten(&mut self, x: Slot, y: Slot, c: i64) -> bool {
        if add(c, self.bounds[y][x]) < 0 {
            self.bounds[x][x] = -1;
            return false;
        }
        // Closing a closed matrix after one tightened edge: every shortest path that improves
        // goes through it, and the rows and columns it goes through do not change. Row `y` is
        // read once, and unbounded entries of it are skipped (they improve nothing), as are
        // rows with no bounded path to `y` through the new edge.
        let from_y = self.bounds[y];
        for i in 0..SLOTS {
            let to_y = add(self.bounds[i][x], c);
            if to_y >= INF {
                continue;
            }
            for (j, &y_to) in from_y.iter().enumerate() {
                // Both bounded: `add` is the plain sum.
                if y_to >= INF {
                    continue;
                }
                let via = to_y + y_to;
                if via < self.bounds[i][j] {
                    self.bounds[i][j] = via;
                }
            }
        }
        true
    }

    /// Adds `T - N <= 0`, `N >= lo` and `N <= hi` (`hi >= INF`: no upper bound) for a free
    /// `N`; false if the zone became empty. The same zone as those three [`Zone::constrain`]s
    /// (a closed matrix is unique), in one pass: `N`'s column and row follow from its three
    /// edges, and every other entry can only improve through `N`.
    #[must_use]
    pub(super) fn enter(&mut self, lo: i64, hi: i64) -> bool {
        debug_assert!(
            (0..SLOTS).all(|i| i == N || (self.bounds[i][N] >= INF && self.bounds[N][i] >= INF)),
            "N is free"
        );
        let mut to_n = [INF; SLOTS];
        let mut from_n = [INF; SLOTS];
        for i in 0..SLOTS {
            if i != N {
                // `i - N <= (i - T) + (T - N)` or `(i - Z) + (Z - N)`.
                to_n[i] = self.bounds[i][T].min(add(self.bounds[i][Z], -lo));
                // `N - i <= (N - Z) + (Z - i)`.
                from_n[i] = add(hi, self.bounds[Z][i]);
            }
        }
        to_n[N] = 0;
        from_n[N] = 0;
        if add(from_n[Z], to_n[Z]) < 0 {
            self.bounds[N][N] = -1;
            return false;
        }
        for i in 0..SLOTS {
            self.bounds[i][N] = to_n[i];
            self.bounds[N][i] = from_n[i];
        }
        if hi < INF {
            for (i, &i_to_n) in to_n.iter().enumerate() {
                if i_to_n >= INF {
                    continue;
                }
                for (j, &n_to_j) in from_n.iter().enumerate() {
                    let via = add(i_to_n, n_to_j);
                    if via < self.bounds[i][j] {
                        self.bounds[i][j] = via;
                    }
                }
            }
        }
        true
    }

    /// Adds `x = value`.
    #[must_use]
    pub(super) fn fix(&mut self, x: Slot, value: i64) -> bool {
        self.constrain(x, Z, value) && self.constrain(Z, x, -value)
    }

    /// Forgets `x` (existential projection: exact on a closed matrix).
    pub(super) fn free(&mut self, x: Slot) {
        for i in 0..SLOTS {
            self.bounds[x][i] = INF;
            self.bounds[i][x] = INF;
        }
        self.bounds[x][x] = 0;
    }

    /// Sets `x := y + offset`, forgetting what `x` was.
    pub(super) fn assign(&mut self, x: Slot, y: Slot, offset: i64) {
        debug_assert_ne!(x, y);
        self.free(x);
        for j in 0..SLOTS {
            if j != x {
                self.bounds[x][j] = add(self.bounds[y][j], offset);
                self.bounds[j][x] = add(self.bounds[j][y], -offset);
            }
        }
        self.bounds[x][y] = offset;
        self.bounds[y][x] = -offset;
    }

    /// Whether every valuation of `other` is one of `self`.
    pub(super) fn includes(&self, other: &Zone) -> bool {
        (0..SLOTS).all(|i| (0..SLOTS).all(|j| other.bounds[i][j] <= self.bounds[i][j]))
    }

    /// The earliest value of `x` (`-INF` if it has no lower bound).
    pub(super) fn earliest(&self, x: Slot) -> i64 {
        -self.bounds[Z][x].min(INF)
    }

    /// The earliest and latest value of `x` (`None` for no bound).
    #[cfg(test)]
    pub(super) fn range(&self, x: Slot) -> (Option<i64>, Option<i64>) {
        let bound = |b: i64| (b < INF).then_some(b);
        (
            bound(self.bounds[Z][x]).map(|b| -b),
            bound(self.bounds[x][Z]),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constraints_close_and_project_exactly() {
        let mut zone = Zone::unconstrained();
        assert!(zone.fix(T, 100));
        assert!(zone.constrain(T, N, 0), "N >= T");
        assert!(zone.constrain(N, Z, 150), "N <= 150");
        zone.assign(E, N, 1_000);
        assert_eq!(zone.range(E), (Some(1_100), Some(1_150)));
        zone.assign(T, N, 0);
        zone.free(N);
        // Revealing the expiry pins the instant that set it.
        assert!(zone.fix(E, 1_120));
        assert_eq!(zone.range(T), (Some(120), Some(120)));
        assert!(
            !zone.clone().constrain(T, Z, 119),
            "T = 120 cannot be <= 119"
        );
        let wider = {
            let mut z = Zone::unconstrained();
            assert!(z.constrain(T, Z, 200));
            z
        };
        assert!(wider.includes(&zone) && !zone.includes(&wider));
    }

    /// `enter` gives the zone the three constraints it stands for give, or none where they
    /// leave none.
    #[test]
    fn entering_n_is_constraining_it() {
        let mut checked = 0;
        for t in [(0, 0), (10, 10), (5, 30), (0, INF)] {
            for a in [None, Some((0, 5)), Some((20, 20))] {
                for gap in [None, Some(1_000), Some(3)] {
                    for (lo, hi) in [(0, INF), (0, 40), (12, 25), (31, 50), (40, 8), (-5, 2)] {
                        let mut zone = Zone::unconstrained();
                        let mut ok = zone.constrain(Z, T, -t.0) && zone.constrain(T, Z, t.1);
                        if let Some((a_lo, a_hi)) = a {
                            ok = ok && zone.constrain(Z, A, -a_lo) && zone.constrain(A, Z, a_hi);
                            ok = ok && zone.constrain(A, T, 0);
                        }
                        if let Some(gap) = gap {
                            ok = ok && zone.constrain(E, T, gap);
                        }
                        if !ok {
                            continue; // A after T: no zone to start from.
                        }
                        let mut stepwise = zone.clone();
                        let expected = stepwise.constrain(T, N, 0)
                            && stepwise.constrain(Z, N, -lo)
                            && (hi >= INF || stepwise.constrain(N, Z, hi));
                        let mut entered = zone.clone();
                        assert_eq!(entered.enter(lo, hi), expected, "{t:?} {a:?} {lo} {hi}");
                        if expected {
                            assert_eq!(entered, stepwise, "{t:?} {a:?} {gap:?} {lo} {hi}");
                        }
                        checked += 1;
                    }
                }
            }
        }
        assert!(checked >= 3 * 3 * 6, "{checked}");
    }
}
